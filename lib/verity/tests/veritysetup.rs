//! Checks our output against the reference implementation, cryptsetup's
//! `veritysetup` (Debian package cryptsetup-bin). Both tools work on plain
//! files, so no loop devices or root-only device-mapper calls are needed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use verity::{append_tree, read_superblock, VerityParams};

const DATA_SIZE: usize = 5 * 1024 * 1024;
const UUID: [u8; 16] = [
    0x5c, 0x0f, 0xfe, 0xe0, 0x12, 0x34, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67,
];
const UUID_STR: &str = "5c0ffee0-1234-4567-89ab-cdef01234567";

fn veritysetup() -> PathBuf {
    let candidates = [
        "/usr/sbin/veritysetup",
        "/sbin/veritysetup",
        "/usr/bin/veritysetup",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "veritysetup not found (looked in {candidates:?}); this test compares against it: \
                 install it with `apt-get install -y cryptsetup-bin`"
            )
        })
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(veritysetup())
        .args(args)
        // The failure checks below read its messages.
        .env("LC_ALL", "C")
        .output()
        .expect("cannot run veritysetup");
    eprintln!(
        "veritysetup {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// xorshift64: cheap, deterministic, incompressible enough to catch any
/// block mix-up.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = fs::read(path).expect("read image");
    let at = usize::try_from(at).expect("offset fits in memory");
    bytes[at] ^= 0x01;
    fs::write(path, bytes).expect("write image");
}

fn root_hash_from(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|| panic!("no root hash in veritysetup output:\n{stdout}"))
}

#[test]
fn veritysetup_accepts_our_tree_and_builds_the_same_one() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.img");
    let theirs = dir.path().join("theirs.img");
    let data = pseudo_random(DATA_SIZE);
    fs::write(&ours, &data).unwrap();
    fs::write(&theirs, &data).unwrap();

    let salt: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    let params = VerityParams::new(salt.clone(), UUID).unwrap();
    let info = append_tree(&ours, &params).unwrap();
    assert_eq!(info.hash_offset, DATA_SIZE as u64);
    assert_eq!(info.data_blocks, (DATA_SIZE / 4096) as u64);
    let ours_str = ours.to_str().unwrap();
    let hash_offset_arg = format!("--hash-offset={}", info.hash_offset);

    // veritysetup reads everything but the root hash from our superblock.
    let args = info.veritysetup_args(ours_str, ours_str);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&[&["verify"], &args[..]].concat());
    assert!(out.status.success(), "veritysetup verify rejected our tree");

    let out = run(&["dump", ours_str, &hash_offset_arg]);
    assert!(
        out.status.success(),
        "veritysetup dump rejected our superblock"
    );
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(dump.contains(UUID_STR), "uuid not in dump:\n{dump}");
    assert!(
        dump.contains(&hex::encode(&salt)),
        "salt not in dump:\n{dump}"
    );

    // The reference build, same inputs.
    let theirs_str = theirs.to_str().unwrap();
    let salt_arg = format!("--salt={}", hex::encode(&salt));
    let uuid_arg = format!("--uuid={UUID_STR}");
    let blocks_arg = format!("--data-blocks={}", info.data_blocks);
    let out = run(&[
        "format",
        theirs_str,
        theirs_str,
        &hash_offset_arg,
        &salt_arg,
        &uuid_arg,
        &blocks_arg,
    ]);
    assert!(out.status.success(), "veritysetup format failed");
    assert_eq!(root_hash_from(&out), info.root_hash_hex());
    let ours_bytes = fs::read(&ours).unwrap();
    let theirs_bytes = fs::read(&theirs).unwrap();
    assert_eq!(ours_bytes.len() as u64, info.hash_offset + info.tree_size);
    assert_eq!(
        ours_bytes.len(),
        theirs_bytes.len(),
        "hash area sizes differ"
    );
    let first_difference = ours_bytes
        .iter()
        .zip(&theirs_bytes)
        .position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "hash areas differ");

    // Our reader accepts what veritysetup wrote.
    let sb = read_superblock(fs::File::open(&theirs).unwrap(), info.hash_offset).unwrap();
    assert_eq!(sb.params(), params);
    assert_eq!(sb.data_blocks, info.data_blocks);

    // A corrupted hash block must be caught...
    let tree = dir.path().join("tree-corrupt.img");
    fs::copy(&ours, &tree).unwrap();
    flip_byte(&tree, info.hash_start_block * 4096 + 100);
    let tree_str = tree.to_str().unwrap();
    let out = run(&[
        "verify",
        tree_str,
        tree_str,
        &info.root_hash_hex(),
        &hash_offset_arg,
    ]);
    assert!(
        !out.status.success(),
        "veritysetup verify accepted a corrupted hash tree"
    );

    // ...and so must a single flipped data bit.
    flip_byte(&ours, 3 * 1024 * 1024 + 17);
    let out = run(&[
        "verify",
        ours_str,
        ours_str,
        &info.root_hash_hex(),
        &hash_offset_arg,
    ]);
    assert!(
        !out.status.success(),
        "veritysetup verify accepted corrupted data"
    );
}
