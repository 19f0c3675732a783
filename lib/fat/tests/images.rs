#![allow(clippy::unwrap_used)]
//! Real FAT images made by dosfstools and filled by mtools: what `locate`
//! finds must be exactly what mtools put there, and what `write_in_place`
//! writes must be what mtools reads back and what fsck.fat accepts.

use std::fs::{self, OpenOptions};
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::process::{Command, Output};

use qfat::{locate, read_file, write_in_place, Error, FileExtents};
use tempfile::TempDir;

const HOST_TOOLS: &str =
    "these tests need dosfstools and mtools: apt-get install -y dosfstools mtools";
const MIB: u64 = 1 << 20;

/// mkfs.vfat and fsck.fat live in /usr/sbin, which is not always in PATH.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found; {HOST_TOOLS}"))
}

fn run(name: &str, args: &[&str]) -> Output {
    let out = Command::new(tool(name))
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}; {HOST_TOOLS}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deterministic filler so every test file's bytes are distinct.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn grubenv(text: &str) -> Vec<u8> {
    let mut env = format!("# GRUB Environment Block\n{text}").into_bytes();
    env.resize(1024, b'#');
    env
}

struct Image {
    dir: TempDir,
    path: PathBuf,
}

impl Image {
    fn new(fat: u8, kib: u32, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("esp.img");
        let (fat, kib) = (fat.to_string(), kib.to_string());
        let mut args = vec!["-C", "-F", &fat, "-n", "ESP"];
        args.extend_from_slice(extra);
        args.extend([path.to_str().unwrap(), &kib]);
        run("mkfs.vfat", &args);
        Image { dir, path }
    }

    fn img(&self) -> &str {
        self.path.to_str().unwrap()
    }

    fn mmd(&self, dir: &str) {
        run("mmd", &["-i", self.img(), &format!("::{dir}")]);
    }

    fn put(&self, dest: &str, data: &[u8]) {
        let src = self.dir.path().join("src");
        fs::write(&src, data).unwrap();
        run(
            "mcopy",
            &[
                "-i",
                self.img(),
                src.to_str().unwrap(),
                &format!("::{dest}"),
            ],
        );
    }

    fn del(&self, dest: &str) {
        run("mdel", &["-i", self.img(), &format!("::{dest}")]);
    }

    fn mtype(&self, path: &str) -> Vec<u8> {
        run("mtype", &["-i", self.img(), &format!("::{path}")]).stdout
    }

    fn fsck(&self) {
        run("fsck.fat", &["-n", self.img()]);
    }

    fn bytes(&self) -> Vec<u8> {
        fs::read(&self.path).unwrap()
    }

    fn len(&self) -> u64 {
        fs::metadata(&self.path).unwrap().len()
    }

    fn locate(&self, path: &str) -> Result<FileExtents, Error> {
        let mut f = fs::File::open(&self.path).unwrap();
        locate(&mut f, 0, self.len(), path)
    }

    fn read(&self, fe: &FileExtents) -> Vec<u8> {
        read_file(&mut fs::File::open(&self.path).unwrap(), 0, fe).unwrap()
    }

    fn write(&self, fe: &FileExtents, data: &[u8]) -> Result<(), Error> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap();
        write_in_place(&mut f, 0, fe, data)
    }
}

/// An ESP laid out like the appliance's, with a deleted file and other
/// files before `grubenv` and `big` so their chains do not start the data area.
fn esp(fat: u8, kib: u32, extra: &[&str]) -> Image {
    let img = Image::new(fat, kib, extra);
    img.mmd("/EFI");
    img.mmd("/EFI/BOOT");
    img.put("/EFI/BOOT/first", &pattern(3000, 1));
    img.put("/EFI/BOOT/gone.efi", &pattern(5000, 2));
    img.put("/EFI/BOOT/third", &pattern(3000, 3));
    img.del("/EFI/BOOT/gone.efi");
    img.put("/EFI/BOOT/big.bin", &pattern(100 * 1024 + 17, 4));
    img.put("/EFI/BOOT/grubenv", &grubenv("saved_entry=a\n"));
    img.put("/EFI/BOOT/A Long File Name.cfg", &pattern(700, 5));
    img
}

fn roundtrip(img: &Image) {
    for path in [
        "/EFI/BOOT/grubenv",
        "/efi/boot/GRUBENV",
        "EFI//Boot/GrubEnv",
    ] {
        let fe = img.locate(path).unwrap();
        assert_eq!(fe.size, 1024);
        assert_eq!(fe.extents.iter().map(|e| e.len).sum::<u64>(), 1024);
        assert_eq!(img.read(&fe), grubenv("saved_entry=a\n"), "{path}");
    }
    for (path, seed, len) in [
        ("/EFI/BOOT/big.bin", 4, 100 * 1024 + 17),
        ("/EFI/BOOT/first", 1, 3000),
        ("/EFI/BOOT/third", 3, 3000),
        ("/efi/boot/a long file name.CFG", 5, 700),
        ("/EFI/BOOT/ALONGF~1.CFG", 5, 700),
    ] {
        let fe = img.locate(path).unwrap();
        assert_eq!(img.read(&fe), pattern(len, seed), "{path}");
        assert_eq!(img.read(&fe), img.mtype(path), "{path}");
    }

    let fe = img.locate("/EFI/BOOT/grubenv").unwrap();
    let new = grubenv("saved_entry=b\nnext_entry=b\n");
    img.write(&fe, &new).unwrap();
    assert_eq!(img.mtype("/EFI/BOOT/grubenv"), new);

    let fe = img.locate("/EFI/BOOT/big.bin").unwrap();
    let new = pattern(100 * 1024 + 17, 99);
    img.write(&fe, &new).unwrap();
    assert_eq!(img.mtype("/EFI/BOOT/big.bin"), new);
    assert_eq!(img.mtype("/EFI/BOOT/first"), pattern(3000, 1));
    assert_eq!(img.mtype("/EFI/BOOT/third"), pattern(3000, 3));
    img.fsck();
}

#[test]
fn fat32_roundtrip() {
    roundtrip(&esp(32, 40960, &[]));
}

#[test]
fn fat32_4k_sectors_roundtrip() {
    roundtrip(&esp(32, 300 * 1024, &["-S", "4096"]));
}

#[test]
fn fat16_roundtrip() {
    roundtrip(&esp(16, 20480, &[]));
}

#[test]
fn fat12_roundtrip() {
    roundtrip(&esp(12, 1440, &[]));
}

fn fragmented(fat: u8, kib: u32) {
    let img = Image::new(fat, kib, &[]);
    img.mmd("/EFI");
    // Deleting every other file leaves holes that the next file must fill.
    for i in 0..4 {
        img.put(&format!("/EFI/f{i}"), &pattern(2048, i));
    }
    img.del("/EFI/f1");
    img.del("/EFI/f3");
    if fat == 32 {
        // mtools allocates after FSInfo's next-free hint, never in holes
        // before it; rewinding the (advisory) hint makes it fill the holes.
        let mut bytes = img.bytes();
        let fsinfo = usize::try_from(le16(&bytes, 48) * le16(&bytes, 11)).unwrap();
        bytes[fsinfo + 492..fsinfo + 496].copy_from_slice(&2u32.to_le_bytes());
        fs::write(&img.path, bytes).unwrap();
    }
    let data = pattern(8 * 1024, 7);
    img.put("/EFI/frag", &data);
    let fe = img.locate("/EFI/frag").unwrap();
    assert_eq!(img.read(&fe), data);
    assert!(fe.extents.len() > 1, "expected a fragmented chain: {fe:?}");
    let new = pattern(8 * 1024, 8);
    img.write(&fe, &new).unwrap();
    assert_eq!(img.mtype("/EFI/frag"), new);
    assert_eq!(img.mtype("/EFI/f0"), pattern(2048, 0));
    assert_eq!(img.mtype("/EFI/f2"), pattern(2048, 2));
    img.fsck();
}

#[test]
fn fat32_fragmented_file() {
    fragmented(32, 40960);
}

#[test]
fn fat12_fragmented_file() {
    fragmented(12, 1440);
}

#[test]
fn partition_at_an_offset() {
    let img = esp(32, 40960, &[]);
    let part_len = img.len();
    let dir = tempfile::tempdir().unwrap();
    let disk_path = dir.path().join("disk.img");
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&disk_path)
        .unwrap();
    disk.set_len(MIB + part_len + MIB).unwrap();
    disk.seek(SeekFrom::Start(MIB)).unwrap();
    disk.write_all(&img.bytes()).unwrap();

    let fe = locate(&mut disk, MIB, part_len, "/EFI/BOOT/grubenv").unwrap();
    assert_eq!(
        read_file(&mut disk, MIB, &fe).unwrap(),
        grubenv("saved_entry=a\n")
    );
    let new = grubenv("saved_entry=b\n");
    write_in_place(&mut disk, MIB, &fe, &new).unwrap();

    // A partition shorter than the volume it claims to hold is refused.
    let err = locate(&mut disk, MIB, part_len - 512, "/EFI/BOOT/grubenv").unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidField {
                field: "BPB_TotSec32",
                ..
            }
        ),
        "{err}"
    );

    let mut part = vec![0; usize::try_from(part_len).unwrap()];
    disk.seek(SeekFrom::Start(MIB)).unwrap();
    disk.read_exact(&mut part).unwrap();
    fs::write(&img.path, part).unwrap();
    assert_eq!(img.mtype("/EFI/BOOT/grubenv"), new);
    img.fsck();
}

#[test]
fn path_errors() {
    let img = esp(32, 40960, &[]);
    let err = img.locate("/EFI/BOOT/missing").unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { component } if component == "/EFI/BOOT/missing"),
        "{err}"
    );
    let err = img.locate("/NOPE/grubenv").unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { component } if component == "/NOPE"),
        "{err}"
    );
    let err = img.locate("/EFI/BOOT/grubenv/x").unwrap_err();
    assert!(
        matches!(&err, Error::NotADirectory { component } if component == "/EFI/BOOT/grubenv"),
        "{err}"
    );
    let err = img.locate("/EFI/BOOT").unwrap_err();
    assert!(
        matches!(&err, Error::IsADirectory { component } if component == "/EFI/BOOT"),
        "{err}"
    );
    // The volume label lives in the root directory but is not a file.
    assert!(matches!(
        img.locate("/ESP").unwrap_err(),
        Error::NotFound { .. }
    ));
    for bad in ["/", "", "/EFI/../EFI/BOOT/grubenv", "/EFI/./BOOT/grubenv"] {
        assert!(
            matches!(img.locate(bad).unwrap_err(), Error::InvalidPath { .. }),
            "{bad}"
        );
    }

    let fe = img.locate("/EFI/BOOT/grubenv").unwrap();
    for len in [1023, 1025, 0] {
        let err = img.write(&fe, &vec![b'#'; len]).unwrap_err();
        assert!(matches!(err, Error::SizeMismatch { size: 1024, got } if got == len as u64));
    }
    let mut short = fe.clone();
    short.extents[0].len -= 1;
    assert!(matches!(
        img.write(&short, &grubenv("")).unwrap_err(),
        Error::ExtentsMismatch {
            size: 1024,
            sum: 1023
        }
    ));
    assert_eq!(img.mtype("/EFI/BOOT/grubenv"), grubenv("saved_entry=a\n"));
}

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()))
}

fn locate_in(bytes: &[u8], path: &str) -> Result<FileExtents, Error> {
    locate(&mut Cursor::new(bytes), 0, bytes.len() as u64, path)
}

#[test]
fn corrupt_boot_sector() {
    let img = esp(32, 40960, &[]);
    let good = img.bytes();
    let cases: [(usize, &[u8], &str); 8] = [
        (11, &[0, 0], "BPB_BytsPerSec"),
        (11, &[0, 3], "BPB_BytsPerSec"),
        (13, &[3], "BPB_SecPerClus"),
        (13, &[0], "BPB_SecPerClus"),
        (14, &[0, 0], "BPB_RsvdSecCnt"),
        (16, &[0], "BPB_NumFATs"),
        (36, &[0, 0, 0, 0], "BPB_FATSz32"),
        (44, &[0xFF, 0xFF, 0xFF, 0x0F], "BPB_RootClus"),
    ];
    for (at, patch, field) in cases {
        let mut bytes = good.clone();
        bytes[at..at + patch.len()].copy_from_slice(patch);
        let err = locate_in(&bytes, "/EFI/BOOT/grubenv").unwrap_err();
        assert!(
            matches!(err, Error::InvalidField { field: f, .. } if f == field),
            "{field}: {err}"
        );
    }
    let mut bytes = good.clone();
    bytes[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = locate_in(&bytes, "/EFI/BOOT/grubenv").unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidField {
                field: "BPB_TotSec32",
                ..
            }
        ),
        "{err}"
    );
    let mut bytes = good.clone();
    bytes[510] = 0;
    let err = locate_in(&bytes, "/EFI/BOOT/grubenv").unwrap_err();
    assert!(
        matches!(err, Error::BadSignature { found: 0xAA00 }),
        "{err}"
    );
    let err = locate_in(&good[..300], "/EFI/BOOT/grubenv").unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { .. }), "{err}");
}

/// Patches FAT entries of a located FAT32 file and checks the typed error.
#[test]
fn corrupt_fat_chains() {
    let img = esp(32, 40960, &[]);
    let good = img.bytes();
    let (bps, spc) = (le16(&good, 11), u64::from(good[13]));
    let fat = le16(&good, 14) * bps;
    let data = fat + u64::from(good[16]) * le32(&good, 36) * bps;
    let cluster_of = |offset: u64| (offset - data) / (bps * spc) + 2;
    let entry = |c: u64| usize::try_from(fat + 4 * c).unwrap();

    let env = img.locate("/EFI/BOOT/grubenv").unwrap();
    let env_cluster = cluster_of(env.extents[0].offset);
    let big = img.locate("/EFI/BOOT/big.bin").unwrap();
    let big_first = cluster_of(big.extents[0].offset);
    let last = big.extents.last().unwrap();
    let big_last = cluster_of(last.offset + last.len - 1);
    assert!(big_last > big_first);

    let patched = |c: u64, value: u32, path: &str| {
        let mut bytes = good.clone();
        bytes[entry(c)..entry(c) + 4].copy_from_slice(&value.to_le_bytes());
        locate_in(&bytes, path).unwrap_err()
    };
    let self_loop = u32::try_from(env_cluster).unwrap();
    let err = patched(env_cluster, self_loop, "/EFI/BOOT/grubenv");
    assert!(
        matches!(err, Error::ChainLoop { cluster, .. } if cluster == self_loop),
        "{err}"
    );
    let err = patched(
        big_last,
        u32::try_from(big_first).unwrap(),
        "/EFI/BOOT/big.bin",
    );
    assert!(matches!(err, Error::ChainLoop { .. }), "{err}");
    let err = patched(big_first, 0x0FFF_FFF7, "/EFI/BOOT/big.bin");
    assert!(
        matches!(err, Error::BadCluster { cluster, .. } if u64::from(cluster) == big_first),
        "{err}"
    );
    let err = patched(big_first, 0, "/EFI/BOOT/big.bin");
    assert!(matches!(err, Error::FreeCluster { .. }), "{err}");
    let err = patched(big_first, 0x0FFF_FFF0, "/EFI/BOOT/big.bin");
    assert!(
        matches!(
            err,
            Error::ClusterOutOfRange {
                cluster: 0x0FFF_FFF0,
                ..
            }
        ),
        "{err}"
    );
    let err = patched(big_first, 0x0FFF_FFFF, "/EFI/BOOT/big.bin");
    assert!(
        matches!(err, Error::ChainTooShort { clusters: 1, .. }),
        "{err}"
    );
    let err = patched(
        big_last,
        u32::try_from(env_cluster).unwrap(),
        "/EFI/BOOT/big.bin",
    );
    assert!(matches!(err, Error::ChainTooLong { .. }), "{err}");
}

#[test]
fn directory_chain_loop() {
    let img = Image::new(32, 40960, &[]);
    img.mmd("/MANY");
    // Enough entries that the directory spans several clusters.
    let srcs: Vec<String> = (0..40)
        .map(|i| {
            let p = img.dir.path().join(format!("file{i:02}.txt"));
            fs::write(&p, [b'x'; 10]).unwrap();
            p.to_str().unwrap().to_owned()
        })
        .collect();
    let mut args = vec!["-i", img.img()];
    args.extend(srcs.iter().map(String::as_str));
    args.push("::/MANY/");
    run("mcopy", &args);
    assert_eq!(
        img.read(&img.locate("/many/FILE39.TXT").unwrap()),
        [b'x'; 10]
    );

    let mut bytes = img.bytes();
    let bps = le16(&bytes, 11);
    let fat = usize::try_from(le16(&bytes, 14) * bps).unwrap();
    let first = img.locate("/MANY/file00.txt").unwrap();
    let data = fat as u64 + u64::from(bytes[16]) * le32(&bytes, 36) * bps;
    let file_cluster = (first.extents[0].offset - data) / (bps * u64::from(bytes[13])) + 2;
    // mkfs places /MANY's first cluster right after the root's; find it by
    // scanning for the chain that is not the root's and not a file's.
    let root = le32(&bytes, 44);
    let dir_cluster = (root + 1..file_cluster)
        .find(|&c| le32(&bytes, fat + 4 * usize::try_from(c).unwrap()) != 0)
        .unwrap();
    let at = fat + 4 * usize::try_from(dir_cluster).unwrap();
    bytes[at..at + 4].copy_from_slice(&u32::try_from(dir_cluster).unwrap().to_le_bytes());
    let err = locate_in(&bytes, "/MANY/missing").unwrap_err();
    assert!(matches!(err, Error::ChainLoop { .. }), "{err}");
}

#[test]
fn host_tools_are_installed() {
    for name in ["mkfs.vfat", "fsck.fat", "mmd", "mcopy", "mdel", "mtype"] {
        tool(name);
    }
}
