use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use crate::table::ENTRY_ARRAY_SECTORS;
use crate::*;

const MIB: u64 = 1 << 20;

/// The appliance's fixed layout, shrunk so tests stay fast.
fn appliance_layout() -> Layout {
    Layout::new()
        .disk_size(64 * MIB)
        .add("esp", Guid::ESP, 8 * MIB)
        .add("boot_a", Guid::XBOOTLDR, 4 * MIB)
        .add("root_a", Guid::ROOT_X86_64, 10 * MIB)
        .add("boot_b", Guid::XBOOTLDR, 4 * MIB)
        .add("root_b", Guid::ROOT_X86_64, 10 * MIB)
        .add_rest("data", Guid::LINUX_DATA)
}

fn appliance_table() -> Table {
    appliance_layout()
        .plan(Guid::derive("qgpt-test", "disk"), |name| {
            Guid::derive("qgpt-test", name)
        })
        .unwrap()
}

fn write_image(dir: &Path, table: &Table) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    write_tables(&mut file, table).unwrap();
    path
}

fn read_path(path: &Path) -> Result<Table, Error> {
    read(&mut File::open(path).unwrap())
}

#[test]
fn plan_places_partitions_on_mib_boundaries() {
    let table = appliance_table();
    let starts: Vec<(u32, &str, u64, u64)> = table
        .partitions
        .iter()
        .map(|p| (p.number, p.name.as_str(), p.first_lba, p.last_lba))
        .collect();
    assert_eq!(
        starts,
        [
            (1, "esp", 2048, 18431),
            (2, "boot_a", 18432, 26623),
            (3, "root_a", 26624, 47103),
            (4, "boot_b", 47104, 55295),
            (5, "root_b", 55296, 75775),
            (6, "data", 75776, 129023),
        ]
    );
    assert_eq!(table.disk_size(), 64 * MIB);
    assert_eq!(table.first_usable_lba, 34);
    assert_eq!(table.last_usable_lba, 131_038);
    let root_b = table.find("root_b").unwrap();
    assert_eq!(root_b.offset(), 27 * MIB);
    assert_eq!(root_b.size(), 10 * MIB);
    assert_eq!(root_b.unique_guid, Guid::derive("qgpt-test", "root_b"));
}

#[test]
fn plan_without_disk_size_rounds_up_to_mib() {
    let table = Layout::new()
        .add("a", Guid::LINUX_FS, 1)
        .add("b", Guid::LINUX_FS, MIB + 1)
        .plan(Guid::derive("t", "d"), |n| Guid::derive("t", n))
        .unwrap();
    // 1 MiB lead-in + 1 MiB + 2 MiB, then the 33 backup sectors need one more MiB.
    assert_eq!(table.disk_size(), 5 * MIB);
    assert_eq!(table.partitions[0].size(), MIB);
    assert_eq!(table.partitions[1].first_lba, 4096);
    assert_eq!(table.partitions[1].size(), 2 * MIB);
    assert_eq!(table.last_usable_lba, 5 * 2048 - 34);
}

#[test]
fn plan_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let a = std::fs::read(write_image(dir.path(), &appliance_table())).unwrap();
    let b = std::fs::read(write_image(dir.path(), &appliance_table())).unwrap();
    assert!(a == b, "two writes of the same plan differ");
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut table = appliance_table();
    table.partitions[2].attributes = 1 << 60;
    let path = write_image(dir.path(), &table);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * MIB);
    let back = read_path(&path).unwrap();
    assert_eq!(back, table);
    assert_eq!(back.source, HeaderSource::Primary);
    assert_eq!(back.find("boot_b").unwrap().number, 4);
    assert!(back.find("nope").is_none());
}

#[test]
fn round_trip_keeps_non_ascii_names_and_partition_contents() {
    let dir = tempfile::tempdir().unwrap();
    // 18 astral characters are 36 UTF-16 code units: exactly the limit.
    let long: String = "\u{1F600}".repeat(18);
    let table = Layout::new()
        .add(&long, Guid::LINUX_FS, MIB)
        .add("données", Guid::LINUX_FS, MIB)
        .plan(Guid::derive("t", "d"), |n| Guid::derive("t", n))
        .unwrap();
    let path = dir.path().join("disk.img");
    // The caller may copy partition contents in before writing the tables.
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let second = &table.partitions[1];
    file.write_all_at(b"payload", second.offset()).unwrap();
    write_tables(&mut file, &table).unwrap();
    let mut payload = [0u8; 7];
    file.read_exact_at(&mut payload, second.offset()).unwrap();
    assert_eq!(&payload, b"payload");
    let back = read_path(&path).unwrap();
    assert_eq!(back, table);
    assert!(back.find(&long).is_some());
}

#[test]
fn find_refuses_ambiguous_names() {
    let mut table = appliance_table();
    table.partitions[5].name = String::from("root_b");
    assert!(table.find("root_b").is_none());
    assert!(table.find("root_a").is_some());
}

#[test]
fn crc_values() {
    // The IEEE CRC-32 that GPT specifies, by its standard check value.
    assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);

    let dir = tempfile::tempdir().unwrap();
    let table = appliance_table();
    let path = write_image(dir.path(), &table);
    let image = std::fs::read(&path).unwrap();
    let last = table.disk_sectors as usize - 1;
    for (header_lba, entries_lba) in [(1, 2), (last, last - 32)] {
        let h = &image[header_lba * 512..header_lba * 512 + 512];
        let entries = &image[entries_lba * 512..(entries_lba + 32) * 512];
        assert_eq!(&h[88..92], &crc32fast::hash(entries).to_le_bytes());
        let mut zeroed = h[..92].to_vec();
        zeroed[16..20].fill(0);
        assert_eq!(&h[16..20], &crc32fast::hash(&zeroed).to_le_bytes());
        assert!(h[92..].iter().all(|&b| b == 0), "header padding not zero");
    }
    // Same entries, and the headers differ only where they must.
    assert_eq!(
        image[1024..1024 + 16384],
        image[(last - 32) * 512..last * 512]
    );
}

#[test]
fn protective_mbr_covers_disk_and_caps_size() {
    let dir = tempfile::tempdir().unwrap();
    let table = appliance_table();
    let image = std::fs::read(write_image(dir.path(), &table)).unwrap();
    let entry = &image[446..462];
    assert_eq!(entry[4], 0xEE);
    assert_eq!(&entry[8..12], &1u32.to_le_bytes());
    assert_eq!(
        &entry[12..16],
        &(table.disk_sectors as u32 - 1).to_le_bytes()
    );
    assert!(image[462..510].iter().all(|&b| b == 0), "other MBR entries");
    assert_eq!(&image[510..512], &[0x55, 0xAA]);

    // 4 TiB is more than 2^32 sectors: the size is capped.
    let big = Layout::new()
        .disk_size(4 << 40)
        .add_rest("data", Guid::LINUX_FS)
        .plan(Guid::derive("t", "d"), |n| Guid::derive("t", n))
        .unwrap();
    let path = write_image(dir.path(), &big);
    let mut mbr = [0u8; 512];
    File::open(&path).unwrap().read_exact(&mut mbr).unwrap();
    assert_eq!(&mbr[458..462], &[0xFF; 4]);
    assert_eq!(read_path(&path).unwrap(), big);
}

fn sgdisk() -> &'static str {
    const SGDISK: &str = "/usr/sbin/sgdisk";
    assert!(
        Path::new(SGDISK).exists(),
        "{SGDISK} is missing: this known-answer test needs it; install it with `apt-get install -y gdisk`"
    );
    SGDISK
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

#[test]
fn sgdisk_accepts_our_tables() {
    let sgdisk = sgdisk();
    let dir = tempfile::tempdir().unwrap();
    let table = appliance_table();
    let path = write_image(dir.path(), &table);
    let file = path.to_str().unwrap();

    let verify = run(sgdisk, &["-v", file]);
    assert!(
        verify.contains("No problems found") && !verify.contains("Caution"),
        "sgdisk -v complained:\n{verify}"
    );

    let print = run(sgdisk, &["-p", file]);
    assert!(
        print.contains(&format!("Disk identifier (GUID): {}", table.disk_guid)),
        "{print}"
    );
    let listed: Vec<(u32, u64, u64, String)> = print
        .lines()
        .skip_while(|l| !l.starts_with("Number"))
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[6..].join(" "),
            )
        })
        .collect();
    let planned: Vec<(u32, u64, u64, String)> = table
        .partitions
        .iter()
        .map(|p| (p.number, p.first_lba, p.last_lba, p.name.clone()))
        .collect();
    assert_eq!(listed, planned, "sgdisk -p printed:\n{print}");

    let info = run(sgdisk, &["-i", "5", file]);
    let root_b = table.find("root_b").unwrap();
    assert!(
        info.contains(&format!("Partition GUID code: {}", Guid::ROOT_X86_64)),
        "{info}"
    );
    assert!(
        info.contains(&format!("Partition unique GUID: {}", root_b.unique_guid)),
        "{info}"
    );
}

#[test]
fn we_read_tables_sgdisk_writes() {
    let sgdisk = sgdisk();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sg.img");
    File::create(&path).unwrap().set_len(16 * MIB).unwrap();
    let file = path.to_str().unwrap();
    run(
        sgdisk,
        &[
            "-o", "-n", "1:0:+2M", "-t", "1:EF00", "-c", "1:esp", "-n", "3:0:+4M", "-t", "3:8300",
            "-c", "3:root_b", file,
        ],
    );
    let table = read_path(&path).unwrap();
    let root_b = table.find("root_b").unwrap();
    assert_eq!(root_b.number, 3);
    assert_eq!(root_b.type_guid, Guid::LINUX_FS);
    assert_eq!(root_b.size(), 4 * MIB);
    assert_eq!(table.find("esp").unwrap().type_guid, Guid::ESP);
    assert_eq!(table.partitions.len(), 2);
}

#[test]
fn corrupt_primary_header_falls_back_to_backup() {
    let dir = tempfile::tempdir().unwrap();
    let table = appliance_table();
    let path = write_image(dir.path(), &table);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xFF; 8], 512 + 40).unwrap();
    let back = read_path(&path).unwrap();
    assert_eq!(back.source, HeaderSource::Backup);
    assert_eq!(back.partitions, table.partitions);
    assert_eq!(back.disk_guid, table.disk_guid);
}

#[test]
fn corrupt_primary_entries_fall_back_to_backup() {
    let dir = tempfile::tempdir().unwrap();
    let table = appliance_table();
    let path = write_image(dir.path(), &table);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b"garbage", 1024 + 3 * 128 + 60).unwrap();
    let back = read_path(&path).unwrap();
    assert_eq!(back.source, HeaderSource::Backup);
    assert_eq!(back.partitions, table.partitions);
}

#[test]
fn zeroed_primary_sector_falls_back_to_backup() {
    let dir = tempfile::tempdir().unwrap();
    let table = appliance_table();
    let path = write_image(dir.path(), &table);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0; 512 * 34], 0).unwrap();
    assert_eq!(read_path(&path).unwrap().source, HeaderSource::Backup);
}

/// Applies `edit` to both headers and both entry arrays, then recomputes
/// the CRCs the edit would otherwise break, so that the check under test is
/// the one that fires rather than a CRC check before it.
fn corrupt_both(
    path: &Path,
    fix_entries_crc: bool,
    fix_header_crc: bool,
    edit: impl Fn(&mut [u8; 512], &mut [u8]),
) {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let sectors = file.seek(SeekFrom::End(0)).unwrap() / 512;
    for (header_lba, entries_lba) in [(1, 2), (sectors - 1, sectors - 33)] {
        let mut header = [0u8; 512];
        file.read_exact_at(&mut header, header_lba * 512).unwrap();
        let mut entries = vec![0u8; (ENTRY_ARRAY_SECTORS * 512) as usize];
        file.read_exact_at(&mut entries, entries_lba * 512).unwrap();
        edit(&mut header, &mut entries);
        if fix_entries_crc {
            let crc = crc32fast::hash(&entries);
            header[88..92].copy_from_slice(&crc.to_le_bytes());
        }
        if fix_header_crc {
            let size = u32::from_le_bytes(header[12..16].try_into().unwrap()).clamp(92, 512);
            header[16..20].fill(0);
            let crc = crc32fast::hash(&header[..size as usize]);
            header[16..20].copy_from_slice(&crc.to_le_bytes());
        }
        file.write_all_at(&header, header_lba * 512).unwrap();
        file.write_all_at(&entries, entries_lba * 512).unwrap();
    }
    file.flush().unwrap();
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Reads a table corrupted in both copies and returns the two errors.
fn both_errors(path: &Path) -> (Error, Error) {
    match read_path(path) {
        Err(Error::NoValidGpt { primary, backup }) => (*primary, *backup),
        other => panic!("expected NoValidGpt, got {other:?}"),
    }
}

macro_rules! assert_rejected {
    ($name:ident, fix_entries = $fe:expr, fix_header = $fh:expr, $edit:expr, $pattern:pat) => {
        #[test]
        fn $name() {
            let dir = tempfile::tempdir().unwrap();
            let path = write_image(dir.path(), &appliance_table());
            corrupt_both(&path, $fe, $fh, $edit);
            let (primary, backup) = both_errors(&path);
            assert!(matches!(primary, $pattern), "primary: {primary:?}");
            assert!(matches!(backup, $pattern), "backup: {backup:?}");
        }
    };
}

assert_rejected!(
    rejects_bad_signature,
    fix_entries = false,
    fix_header = true,
    |h, _| h[0] = b'X',
    Error::BadSignature { .. }
);
assert_rejected!(
    rejects_unsupported_revision,
    fix_entries = false,
    fix_header = true,
    |h, _| put_u32(h, 8, 0x0002_0000),
    Error::UnsupportedRevision {
        revision: 0x0002_0000,
        ..
    }
);
assert_rejected!(
    rejects_short_header_size,
    fix_entries = false,
    fix_header = true,
    |h, _| put_u32(h, 12, 91),
    Error::BadHeaderSize { size: 91, .. }
);
assert_rejected!(
    rejects_header_size_beyond_sector,
    fix_entries = false,
    fix_header = false,
    |h, _| put_u32(h, 12, 0x7FFF_FFFF),
    Error::BadHeaderSize { .. }
);
assert_rejected!(
    rejects_header_crc_mismatch,
    fix_entries = false,
    fix_header = false,
    |h, _| h[60] ^= 1,
    Error::HeaderCrcMismatch { .. }
);
assert_rejected!(
    rejects_wrong_my_lba,
    fix_entries = false,
    fix_header = true,
    |h, _| put_u64(h, 24, 7),
    Error::BadMyLba { found: 7, .. }
);
assert_rejected!(
    rejects_small_entry_size,
    fix_entries = false,
    fix_header = true,
    |h, _| put_u32(h, 84, 64),
    Error::BadEntrySize { size: 64, .. }
);
assert_rejected!(
    rejects_odd_entry_size,
    fix_entries = false,
    fix_header = true,
    |h, _| put_u32(h, 84, 136),
    Error::BadEntrySize { size: 136, .. }
);
assert_rejected!(
    rejects_huge_entry_size,
    fix_entries = false,
    fix_header = true,
    |h, _| put_u32(h, 84, 1 << 30),
    Error::BadEntrySize { .. }
);
assert_rejected!(
    rejects_too_many_entries,
    fix_entries = false,
    fix_header = true,
    |h, _| put_u32(h, 80, u32::MAX),
    Error::TooManyEntries {
        count: u32::MAX,
        ..
    }
);
assert_rejected!(
    rejects_first_usable_after_last,
    fix_entries = false,
    fix_header = true,
    |h, _| put_u64(h, 40, 200_000),
    Error::BadUsableRange { first: 200_000, .. }
);
assert_rejected!(
    rejects_usable_range_past_disk_end,
    fix_entries = false,
    fix_header = true,
    |h, _| put_u64(h, 48, u64::MAX),
    Error::UsableRangeOutsideDisk { .. }
);
assert_rejected!(
    rejects_entry_array_in_usable_range,
    fix_entries = false,
    fix_header = true,
    |h, _| put_u64(h, 72, 4096),
    Error::BadEntryArrayLocation { lba: 4096, .. }
);
assert_rejected!(
    rejects_entry_array_past_disk_end,
    fix_entries = false,
    fix_header = true,
    |h, _| put_u64(h, 72, u64::MAX - 3),
    Error::BadEntryArrayLocation { .. }
);
assert_rejected!(
    rejects_entries_crc_mismatch,
    fix_entries = false,
    fix_header = true,
    |_, e| e[128 + 40] ^= 1,
    Error::EntriesCrcMismatch { .. }
);
assert_rejected!(
    rejects_partition_first_after_last,
    fix_entries = true,
    fix_header = true,
    // Entry 2 (boot_a): first LBA after its last.
    |_, e| put_u64(e, 128 + 32, 30_000),
    Error::BadPartitionRange {
        number: 2,
        first: 30_000,
        ..
    }
);
assert_rejected!(
    rejects_partition_past_disk_end,
    fix_entries = true,
    fix_header = true,
    |_, e| put_u64(e, 5 * 128 + 40, 10_000_000),
    Error::PartitionOutOfBounds {
        number: 6,
        last: 10_000_000,
        ..
    }
);
assert_rejected!(
    rejects_partition_over_entry_array,
    fix_entries = true,
    fix_header = true,
    |_, e| put_u64(e, 32, 10),
    Error::PartitionOutOfBounds { number: 1, .. }
);
assert_rejected!(
    rejects_overlapping_partitions,
    fix_entries = true,
    fix_header = true,
    // root_a (entry 3) grows into boot_b.
    |_, e| put_u64(e, 2 * 128 + 40, 50_000),
    Error::PartitionsOverlap { .. }
);
assert_rejected!(
    rejects_invalid_utf16_name,
    fix_entries = true,
    fix_header = true,
    // A lone high surrogate.
    |_, e| e[4 * 128 + 56..4 * 128 + 58].copy_from_slice(&0xD800u16.to_le_bytes()),
    Error::BadPartitionName { number: 5 }
);

#[test]
fn rejects_tiny_disk() {
    let mut cursor = std::io::Cursor::new(vec![0u8; 1024]);
    assert!(matches!(
        read(&mut cursor),
        Err(Error::DiskTooSmallForGpt { size: 1024 })
    ));
}

#[test]
fn truncated_image_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_image(dir.path(), &appliance_table());
    // The primary is intact but now describes a bigger disk; the backup is gone.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let (primary, backup) = both_errors(&path);
    assert!(
        matches!(primary, Error::UsableRangeOutsideDisk { .. }),
        "{primary:?}"
    );
    assert!(matches!(backup, Error::BadSignature { .. }), "{backup:?}");
}

#[test]
fn reads_from_a_reader_that_is_not_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let table = appliance_table();
    let path = write_image(dir.path(), &table);
    let image = std::fs::read(path).unwrap();
    let back = read(&mut std::io::Cursor::new(image)).unwrap();
    assert_eq!(back, table);
}

fn plan_err(layout: Layout) -> Error {
    layout
        .plan(Guid::derive("t", "d"), |n| Guid::derive("t", n))
        .unwrap_err()
}

#[test]
fn layout_rejects_bad_names() {
    let long = "x".repeat(37);
    match plan_err(Layout::new().add(&long, Guid::LINUX_FS, MIB)) {
        Error::NameTooLong { name, units: 37 } => assert_eq!(name, long),
        e => panic!("{e:?}"),
    }
    // 19 astral characters: 19 chars but 38 UTF-16 code units.
    let astral: String = "\u{1F600}".repeat(19);
    assert!(matches!(
        plan_err(Layout::new().add(&astral, Guid::LINUX_FS, MIB)),
        Error::NameTooLong { units: 38, .. }
    ));
    assert!(matches!(
        plan_err(
            Layout::new()
                .add("a", Guid::LINUX_FS, MIB)
                .add("", Guid::LINUX_FS, MIB)
        ),
        Error::EmptyName { index: 1 }
    ));
    assert!(matches!(
        plan_err(Layout::new().add("a\0b", Guid::LINUX_FS, MIB)),
        Error::NameContainsNul { .. }
    ));
    match plan_err(Layout::new().add("root_b", Guid::LINUX_FS, MIB).add(
        "root_b",
        Guid::LINUX_FS,
        MIB,
    )) {
        Error::DuplicateName { name } => assert_eq!(name, "root_b"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn layout_rejects_bad_sizes() {
    assert!(matches!(
        plan_err(Layout::new().add("a", Guid::LINUX_FS, 0)),
        Error::ZeroSize { .. }
    ));
    assert!(matches!(
        plan_err(Layout::new().add("a", Guid::LINUX_FS, u64::MAX)),
        Error::SizeOverflow { .. }
    ));
    assert!(matches!(
        plan_err(
            Layout::new()
                .disk_size(64 * MIB)
                .add_rest("data", Guid::LINUX_FS)
                .add("a", Guid::LINUX_FS, MIB)
        ),
        Error::RestNotLast { .. }
    ));
    assert!(matches!(
        plan_err(Layout::new().add_rest("data", Guid::LINUX_FS)),
        Error::RestWithoutDiskSize { .. }
    ));
    assert!(matches!(
        plan_err(
            Layout::new()
                .disk_size(64 * MIB + 1)
                .add("a", Guid::LINUX_FS, MIB)
        ),
        Error::UnalignedDiskSize { .. }
    ));
    match plan_err(
        Layout::new()
            .disk_size(4 * MIB)
            .add("a", Guid::LINUX_FS, 3 * MIB),
    ) {
        Error::DiskTooSmall { needed, size } => {
            assert_eq!(size, 4 * MIB);
            assert_eq!(needed, 4 * MIB + 33 * 512);
        }
        e => panic!("{e:?}"),
    }
    assert!(matches!(
        plan_err(
            Layout::new()
                .disk_size(2 * MIB)
                .add("a", Guid::LINUX_FS, MIB)
                .add_rest("data", Guid::LINUX_FS)
        ),
        Error::DiskTooSmall { .. }
    ));
    let many = (0..129).fold(Layout::new(), |l, i| {
        l.add(&format!("p{i}"), Guid::LINUX_FS, MIB)
    });
    assert!(matches!(
        plan_err(many),
        Error::TooManyPartitions { count: 129 }
    ));
}

#[test]
fn layout_rejects_bad_guids() {
    let layout = Layout::new()
        .add("a", Guid::LINUX_FS, MIB)
        .add("b", Guid::LINUX_FS, MIB);
    assert!(matches!(
        layout.plan(Guid::ZERO, |n| Guid::derive("t", n)),
        Err(Error::ZeroDiskGuid)
    ));
    assert!(matches!(
        layout.plan(Guid::derive("t", "d"), |_| Guid::ZERO),
        Err(Error::ZeroGuid {
            field: "unique",
            ..
        })
    ));
    match layout.plan(Guid::derive("t", "d"), |_| Guid::ESP) {
        Err(Error::DuplicateGuid { first, second, .. }) => {
            assert_eq!((first.as_str(), second.as_str()), ("a", "b"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        plan_err(Layout::new().add("a", Guid::ZERO, MIB)),
        Error::ZeroGuid { field: "type", .. }
    ));
}

#[test]
fn write_rejects_invalid_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.img");
    let mut file = File::create(&path).unwrap();
    type Case = (Box<dyn Fn(&mut Table)>, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        (Box::new(|t| t.partitions[0].number = 129), |e| {
            matches!(e, Error::BadPartitionNumber { number: 129, .. })
        }),
        (Box::new(|t| t.partitions[1].number = 1), |e| {
            matches!(e, Error::DuplicateNumber { number: 1, .. })
        }),
        (
            Box::new(|t| t.partitions[1].last_lba = t.partitions[2].first_lba),
            |e| matches!(e, Error::PartitionsOverlap { .. }),
        ),
        (
            Box::new(|t| t.partitions[5].last_lba = t.disk_sectors - 1),
            |e| matches!(e, Error::PartitionOutOfBounds { number: 6, .. }),
        ),
        (
            Box::new(|t| t.partitions[0].first_lba = t.partitions[0].last_lba + 1),
            |e| matches!(e, Error::BadPartitionRange { number: 1, .. }),
        ),
        (Box::new(|t| t.last_usable_lba = t.disk_sectors - 2), |e| {
            matches!(e, Error::BadUsableRangeForWrite { .. })
        }),
        (Box::new(|t| t.first_usable_lba = 2), |e| {
            matches!(e, Error::BadUsableRangeForWrite { .. })
        }),
        (Box::new(|t| t.partitions[3].name = "y".repeat(40)), |e| {
            matches!(e, Error::NameTooLong { units: 40, .. })
        }),
    ];
    for (i, (mutate, expected)) in cases.iter().enumerate() {
        let mut table = appliance_table();
        mutate(&mut table);
        let err = write_tables(&mut file, &table).unwrap_err();
        assert!(expected(&err), "case {i}: {err:?}");
    }
    // Nothing was written for the rejected tables.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
}

#[test]
fn error_messages_carry_context() {
    let err = plan_err(Layout::new().add(&"n".repeat(40), Guid::LINUX_FS, MIB));
    assert!(err.to_string().contains(&"n".repeat(40)), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = write_image(dir.path(), &appliance_table());
    corrupt_both(&path, true, true, |_, e| {
        put_u64(e, 4 * 128 + 40, 10_000_000)
    });
    let err = read_path(&path).unwrap_err().to_string();
    assert!(
        err.contains("root_b") && err.contains("primary") && err.contains("backup"),
        "{err}"
    );
}

#[test]
fn write_rejects_disk_size_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let mut file = File::create(dir.path().join("x.img")).unwrap();
    let mut table = appliance_table();
    table.disk_sectors = u64::MAX / 256;
    assert!(matches!(
        write_tables(&mut file, &table),
        Err(Error::BadUsableRangeForWrite { .. })
    ));
}
