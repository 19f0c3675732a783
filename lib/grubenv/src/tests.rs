use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::*;

fn block_with_body(body: &[u8]) -> Vec<u8> {
    let mut block = HEADER.as_bytes().to_vec();
    block.extend_from_slice(body);
    block.resize(BLOCK_SIZE, b'#');
    block
}

fn sample_env() -> Env {
    let mut env = Env::new();
    env.set("saved_entry", "qubes").unwrap();
    env.set("SLOT_ORDER", "B A").unwrap();
    env.set("path", "C:\\boot\\x").unwrap();
    env.set("multi", "one\ntwo\n").unwrap();
    env.set("empty", "").unwrap();
    env.set("utf8", "héllo ✓").unwrap();
    env
}

#[test]
fn round_trip_keeps_order_and_values() {
    let env = sample_env();
    let block = env.to_block().unwrap();
    let back = Env::parse(&block).unwrap();
    assert_eq!(back, env);
    let keys: Vec<&str> = back.iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        [
            "saved_entry",
            "SLOT_ORDER",
            "path",
            "multi",
            "empty",
            "utf8"
        ]
    );
}

#[test]
fn empty_block_is_header_and_padding() {
    let block = Env::new().to_block().unwrap();
    assert_eq!(block.len(), 1024);
    assert!(block.starts_with(b"# GRUB Environment Block\n"));
    assert!(block[HEADER.len()..].iter().all(|&b| b == b'#'));
    assert!(Env::parse(&block).unwrap().is_empty());
}

#[test]
fn layout_and_escaping_are_exact() {
    let mut env = Env::new();
    env.set("A_OK", "1").unwrap();
    env.set("k", "a\\b\nc").unwrap();
    let block = env.to_block().unwrap();
    let body = b"A_OK=1\nk=a\\\\b\\\nc\n";
    assert_eq!(&block[..HEADER.len()], HEADER.as_bytes());
    assert_eq!(&block[HEADER.len()..HEADER.len() + body.len()], body);
    assert!(block[HEADER.len() + body.len()..]
        .iter()
        .all(|&b| b == b'#'));
    assert_eq!(Env::parse(&block).unwrap().get("k"), Some("a\\b\nc"));
}

#[test]
fn set_get_remove() {
    let mut env = sample_env();
    env.set("SLOT_ORDER", "A B").unwrap();
    assert_eq!(env.get("SLOT_ORDER"), Some("A B"));
    // Replaced in place, not moved to the end.
    assert_eq!(env.iter().nth(1), Some(("SLOT_ORDER", "A B")));
    assert_eq!(env.remove("path").as_deref(), Some("C:\\boot\\x"));
    assert_eq!(env.remove("path"), None);
    assert_eq!(env.get("path"), None);
    assert_eq!(env.len(), 5);
}

#[test]
fn set_rejects_bad_names_and_values() {
    let mut env = Env::new();
    for key in ["", "a=b", "a b", "#x", "a\\b", "é", "a\nb"] {
        match env.set(key, "1") {
            Err(Error::InvalidKey { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{key:?}: {other:?}"),
        }
    }
    assert!(matches!(
        env.set("k", "a\0b"),
        Err(Error::NulInValue { key }) if key == "k"
    ));
    assert!(env.is_empty());
}

#[test]
fn block_filled_exactly_has_no_padding() {
    let mut env = Env::new();
    // Header 25 bytes + "k=" + value + "\n" = 1024.
    let value = "v".repeat(1024 - HEADER.len() - 3);
    env.set("k", &value).unwrap();
    let block = env.to_block().unwrap();
    assert_eq!(block[1023], b'\n');
    assert_eq!(Env::parse(&block).unwrap().get("k"), Some(value.as_str()));
}

#[test]
fn overflow_names_the_variable() {
    let mut env = Env::new();
    env.set("first", &"x".repeat(500)).unwrap();
    env.set("second", &"y".repeat(490)).unwrap();
    env.set("third", "z").unwrap();
    match env.to_block() {
        Err(Error::Overflow { key, needed }) => {
            assert_eq!(key, "second");
            assert_eq!(needed, HEADER.len() + 507 + 498 + 8);
        }
        other => panic!("{other:?}"),
    }
    // Escapes count: 500 backslashes take 1000 bytes.
    let mut env = Env::new();
    env.set("bs", &"\\".repeat(500)).unwrap();
    assert!(matches!(env.to_block(), Err(Error::Overflow { key, .. }) if key == "bs"));
}

#[test]
fn malformed_blocks_are_rejected() {
    type Check = fn(&Error) -> bool;
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        ("empty", vec![], |e| {
            matches!(e, Error::WrongSize { size: 0 })
        }),
        ("short", vec![b'#'; 1023], |e| {
            matches!(e, Error::WrongSize { size: 1023 })
        }),
        ("long", block_with_body(b"").repeat(2), |e| {
            matches!(e, Error::WrongSize { size: 2048 })
        }),
        ("no header", vec![b'#'; 1024], |e| {
            matches!(e, Error::MissingHeader)
        }),
        (
            "header typo",
            {
                let mut b = block_with_body(b"");
                b[2] = b'g';
                b
            },
            |e| matches!(e, Error::MissingHeader),
        ),
        ("no equals", block_with_body(b"A_OK=1\nnovalue\n"), |e| {
            matches!(e, Error::MissingEquals { line: 3 })
        }),
        ("empty line", block_with_body(b"\n"), |e| {
            matches!(e, Error::MissingEquals { line: 2 })
        }),
        ("non-utf8 value", block_with_body(b"k=\xff\xfe\n"), |e| {
            matches!(e, Error::NonUtf8 { line: 2 })
        }),
        ("non-utf8 key", block_with_body(b"\xc3=1\n"), |e| {
            matches!(e, Error::NonUtf8 { line: 2 })
        }),
        ("bad escape", block_with_body(b"k=a\\nb\n"), |e| {
            matches!(e, Error::BadEscape { found: 'n', .. })
        }),
        ("unterminated", block_with_body(b"k=value"), |e| {
            // The value swallows the '#' padding up to the end.
            matches!(e, Error::UnterminatedLine { line: 2, .. })
        }),
        (
            "garbage after padding",
            block_with_body(b"k=v\n###x"),
            |e| matches!(e, Error::BadPadding { found: b'x', .. }),
        ),
        ("garbage after comment", block_with_body(b"# c\n#x#"), |e| {
            matches!(e, Error::BadPadding { found: b'x', .. })
        }),
        (
            "duplicate",
            block_with_body(b"k=1\nj=2\nk=3\n"),
            |e| matches!(e, Error::DuplicateKey { line: 4, key } if key == "k"),
        ),
        (
            "bad key",
            block_with_body(b"a b=1\n"),
            |e| matches!(e, Error::InvalidKey { key, .. } if key == "a b"),
        ),
        (
            "empty key",
            block_with_body(b"=1\n"),
            |e| matches!(e, Error::InvalidKey { key, .. } if key.is_empty()),
        ),
        (
            "nul in value",
            block_with_body(b"k=a\0b\n"),
            |e| matches!(e, Error::NulInValue { key } if key == "k"),
        ),
    ];
    for (name, block, check) in cases {
        match Env::parse(&block) {
            Err(e) => assert!(check(&e), "{name}: wrong error {e:?}"),
            Ok(env) => panic!("{name}: accepted as {env:?}"),
        }
    }
}

#[test]
fn comment_lines_are_kept_in_place() {
    let block = block_with_body(b"a=1\n# note\nb=2\n");
    let mut env = Env::parse(&block).unwrap();
    assert_eq!(env.len(), 2);
    assert_eq!(env.to_block().unwrap().to_vec(), block);
    env.set("c", "3").unwrap();
    env.remove("a");
    assert_eq!(
        env.to_block().unwrap().to_vec(),
        block_with_body(b"# note\nb=2\nc=3\n")
    );
}

#[test]
fn line_numbers_count_escaped_newlines() {
    let block = block_with_body(b"k=a\\\nb\nbroken\n");
    assert!(matches!(
        Env::parse(&block),
        Err(Error::MissingEquals { line: 4 })
    ));
}

#[test]
fn store_new_then_store_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    let env = sample_env();
    env.store_new(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024);
    assert_eq!(Env::load(&path).unwrap(), env);
    assert!(matches!(
        env.store_new(&path),
        Err(Error::Io {
            action: "creating",
            ..
        })
    ));

    let inode = std::fs::metadata(&path).unwrap().ino();
    let mut changed = env.clone();
    changed.remove("multi");
    changed.set("next", "1").unwrap();
    changed.store(&path).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.ino(), inode, "store must not recreate the file");
    assert_eq!(meta.len(), 1024);
    assert_eq!(Env::load(&path).unwrap(), changed);
    assert_eq!(std::fs::read(&path).unwrap(), changed.to_block().unwrap());
}

#[test]
fn store_refuses_to_resize_or_create() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    assert!(matches!(
        Env::new().store(&path),
        Err(Error::Io {
            action: "opening",
            ..
        })
    ));
    assert!(!path.exists());
    std::fs::write(&path, [b'#'; 512]).unwrap();
    match Env::new().store(&path) {
        Err(Error::WrongFileSize { path: p, size: 512 }) => assert_eq!(p, path),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), [b'#'; 512]);
    assert!(matches!(
        Env::load(&path),
        Err(Error::WrongFileSize { size: 512, .. })
    ));
}

#[test]
fn store_does_not_touch_the_file_on_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    Env::new().store_new(&path).unwrap();
    let mut env = Env::new();
    env.set("big", &"x".repeat(2000)).unwrap();
    assert!(matches!(env.store(&path), Err(Error::Overflow { .. })));
    assert!(Env::load(&path).unwrap().is_empty());
}

#[test]
fn load_names_the_file_on_parse_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    std::fs::write(&path, [0u8; 1024]).unwrap();
    match Env::load(&path) {
        Err(err @ Error::InFile { .. }) => {
            let Error::InFile { path: p, source } = &err else {
                unreachable!()
            };
            assert_eq!(p, &path);
            assert!(matches!(**source, Error::MissingHeader));
            assert!(err.to_string().contains("grubenv"), "{err}");
        }
        other => panic!("{other:?}"),
    }
}

const GRUB_EDITENV: &str = "/usr/bin/grub-editenv";

fn grub_editenv(args: &[&str]) -> String {
    assert!(
        Path::new(GRUB_EDITENV).exists(),
        "{GRUB_EDITENV} is missing: this compatibility test needs it; install it with `apt-get install -y grub-common`"
    );
    let out = Command::new(GRUB_EDITENV).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "grub-editenv {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn grub_editenv_reads_our_blocks_and_we_read_its_edits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    let file = path.to_str().unwrap();
    let mut env = Env::new();
    env.set("saved_entry", "qubes").unwrap();
    BootState::initial().apply_to(&mut env).unwrap();
    env.set("path", "a\\b").unwrap();
    env.store_new(&path).unwrap();

    let listed = grub_editenv(&[file, "list"]);
    let expected: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    assert_eq!(listed, expected);

    grub_editenv(&[file, "set", "X=1"]);
    let back = Env::load(&path).unwrap();
    assert_eq!(back.get("X"), Some("1"));
    let mut with_x = env.clone();
    with_x.set("X", "1").unwrap();
    assert_eq!(back, with_x);
    // Byte for byte what we would have written.
    assert_eq!(std::fs::read(&path).unwrap(), with_x.to_block().unwrap());

    // grub-editenv's own escaping of backslash and newline.
    grub_editenv(&[file, "set", "nl=one\ntwo", "bs=c:\\d\\"]);
    grub_editenv(&[file, "unset", "saved_entry"]);
    let back = Env::load(&path).unwrap();
    assert_eq!(back.get("nl"), Some("one\ntwo"));
    assert_eq!(back.get("bs"), Some("c:\\d\\"));
    assert_eq!(back.get("saved_entry"), None);
    assert_eq!(BootState::from_env(&back).unwrap(), BootState::initial());
    assert_eq!(std::fs::read(&path).unwrap(), back.to_block().unwrap());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024);
}

#[test]
fn we_read_and_rewrite_blocks_grub_editenv_creates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    let file = path.to_str().unwrap();
    // Debian's 2.06 adds a "# WARNING: ..." comment line after the header.
    grub_editenv(&[file, "create"]);
    let created = std::fs::read(&path).unwrap();
    let mut env = Env::load(&path).unwrap();
    assert!(env.is_empty());
    assert_eq!(env.to_block().unwrap().to_vec(), created);

    BootState::initial().apply_to(&mut env).unwrap();
    env.store(&path).unwrap();
    grub_editenv(&[file, "set", "A_TRIES=7"]);
    let back = Env::load(&path).unwrap();
    assert_eq!(back.get("A_TRIES"), Some("7"));
    assert_eq!(std::fs::read(&path).unwrap(), back.to_block().unwrap());
    let listed = grub_editenv(&[file, "list"]);
    assert_eq!(
        listed,
        "SLOT_ORDER=A B\nA_OK=1\nA_TRIES=7\nB_OK=0\nB_TRIES=0\nAB_CHECK=A B:10:00\n"
    );
    // An edit that leaves the check behind makes the copy not whole.
    assert!(matches!(
        BootState::from_env(&back),
        Err(Error::Check { .. })
    ));
}

#[test]
fn slot_basics() {
    assert_eq!(Slot::A.other(), Slot::B);
    assert_eq!(Slot::B.other(), Slot::A);
    assert_eq!(Slot::A.to_string(), "A");
    assert_eq!("B".parse::<Slot>().unwrap(), Slot::B);
    for bad in ["", "a", "C", "A ", "AB"] {
        assert_eq!(bad.parse::<Slot>().unwrap_err().value, bad);
    }
    assert_eq!((Slot::A.boot_partition(), Slot::B.boot_partition()), (2, 4));
    assert_eq!((Slot::A.root_partition(), Slot::B.root_partition()), (3, 5));
    assert_eq!(
        (Slot::B.boot_name(), Slot::B.root_name()),
        ("boot_b", "root_b")
    );
}

fn env_with(vars: &[(&str, &str)]) -> Env {
    let mut env = Env::new();
    for (k, v) in vars {
        env.set(k, v).unwrap();
    }
    env
}

const GOOD: [(&str, &str); 6] = [
    ("SLOT_ORDER", "B A"),
    ("A_OK", "1"),
    ("A_TRIES", "0"),
    ("B_OK", "0"),
    ("B_TRIES", "3"),
    ("AB_CHECK", "B A:10:03"),
];

#[test]
fn from_env_reads_the_contract() {
    let state = BootState::from_env(&env_with(&GOOD)).unwrap();
    assert_eq!(
        state,
        BootState {
            order: vec![Slot::B, Slot::A],
            a: SlotState { ok: true, tries: 0 },
            b: SlotState {
                ok: false,
                tries: 3
            },
        }
    );
}

#[test]
fn from_env_names_missing_variables() {
    for missing in [
        "SLOT_ORDER",
        "A_OK",
        "A_TRIES",
        "B_OK",
        "B_TRIES",
        "AB_CHECK",
    ] {
        let vars: Vec<_> = GOOD
            .iter()
            .copied()
            .filter(|(k, _)| *k != missing)
            .collect();
        match BootState::from_env(&env_with(&vars)) {
            Err(Error::MissingVariable { name }) => assert_eq!(name, missing),
            other => panic!("{missing}: {other:?}"),
        }
    }
}

#[test]
fn from_env_rejects_out_of_range_values() {
    let cases = [
        ("SLOT_ORDER", ""),
        ("SLOT_ORDER", "A"),
        ("SLOT_ORDER", "A A"),
        ("SLOT_ORDER", "A B A"),
        ("SLOT_ORDER", "A C"),
        ("SLOT_ORDER", "a b"),
        // One spelling only: the script's check compares the raw text.
        ("SLOT_ORDER", " A  B "),
        ("SLOT_ORDER", "A  B"),
        ("A_OK", "2"),
        ("A_OK", "yes"),
        ("A_OK", ""),
        ("B_OK", " 1"),
        ("A_TRIES", "10"),
        ("A_TRIES", "-1"),
        ("B_TRIES", "09"),
        ("B_TRIES", "x"),
        ("B_TRIES", ""),
    ];
    for (var, value) in cases {
        let mut env = env_with(&GOOD);
        env.set(var, value).unwrap();
        match BootState::from_env(&env) {
            Err(Error::BadValue { name, value: v, .. }) => {
                assert_eq!((name, v.as_str()), (var, value));
            }
            other => panic!("{var}={value:?}: {other:?}"),
        }
    }
}

/// A copy whose values changed apart from its check (a torn write, a
/// flipped bit) is not whole, whichever value changed.
#[test]
fn from_env_holds_the_values_to_their_check() {
    for (var, value) in [
        ("SLOT_ORDER", "A B"),
        ("A_OK", "0"),
        ("A_TRIES", "1"),
        ("B_OK", "1"),
        ("B_TRIES", "2"),
        ("AB_CHECK", "B A:10:02"),
        ("AB_CHECK", ""),
        ("AB_CHECK", "B A:10:03 "),
    ] {
        let mut env = env_with(&GOOD);
        env.set(var, value).unwrap();
        match BootState::from_env(&env) {
            Err(Error::Check {
                name: "AB_CHECK", ..
            }) => {}
            other => panic!("{var}={value:?}: {other:?}"),
        }
    }
    let state = BootState::from_env(&env_with(&GOOD)).unwrap();
    assert_eq!(state.check_value(), "B A:10:03");
}

/// The first whole copy counts, as in the script; the reasons of both
/// are kept when neither is.
#[test]
fn pick_takes_the_first_whole_copy() {
    let good = env_with(&GOOD).to_block().unwrap();
    let mut other_state = BootState::from_env(&env_with(&GOOD)).unwrap();
    other_state.mark_good(Slot::B);
    let mut other = Env::new();
    other_state.apply_to(&mut other).unwrap();
    let other = other.to_block().unwrap();
    let mut torn = env_with(&GOOD);
    torn.set("B_TRIES", "2").unwrap();
    let torn = torn.to_block().unwrap();
    let garbage = [b'x'; BLOCK_SIZE];

    let p = pick([Ok(&good[..]), Ok(&other[..])]).unwrap();
    assert_eq!((p.copy, p.state.b.tries), (0, 3));
    let p = pick([Ok(&torn[..]), Ok(&other[..])]).unwrap();
    assert_eq!((p.copy, p.state.clone()), (1, other_state));
    let p = pick([Err("no such file".into()), Ok(&good[..])]).unwrap();
    assert_eq!(p.copy, 1);
    let e = pick([Ok(&garbage[..]), Ok(&torn[..])]).unwrap_err();
    assert!(e.reasons[0].contains("does not start with"), "{e}");
    assert!(e.reasons[1].contains("AB_CHECK"), "{e}");
    assert!(
        e.to_string()
            .starts_with("neither copy of the GRUB environment is whole (grubenv: "),
        "{e}"
    );
    assert_eq!(copy_path(1), "/EFI/BOOT/grubenv2");
}

#[test]
fn apply_to_keeps_other_variables_and_round_trips() {
    let mut env = env_with(&[("saved_entry", "x"), ("A_OK", "0")]);
    let mut state = BootState::initial();
    state.activate(Slot::B, 9).unwrap();
    state.apply_to(&mut env).unwrap();
    let keys: Vec<&str> = env.iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        [
            "saved_entry",
            "A_OK",
            "SLOT_ORDER",
            "A_TRIES",
            "B_OK",
            "B_TRIES",
            "AB_CHECK"
        ]
    );
    assert_eq!(env.get("SLOT_ORDER"), Some("B A"));
    assert_eq!(env.get("B_TRIES"), Some("9"));
    assert_eq!(BootState::from_env(&env).unwrap(), state);
}

#[test]
fn apply_to_rejects_states_grub_cannot_read() {
    let env = env_with(&[("k", "v")]);
    let mut too_many = BootState::initial();
    too_many.b.tries = 10;
    let mut dup = BootState::initial();
    dup.order = vec![Slot::A, Slot::A];
    let mut short = BootState::initial();
    short.order = vec![Slot::B];
    for (state, check) in [
        (
            too_many,
            (|e| {
                matches!(
                    e,
                    Error::BadTries {
                        slot: Slot::B,
                        tries: 10,
                        ..
                    }
                )
            }) as fn(&Error) -> bool,
        ),
        (dup, |e| matches!(e, Error::BadOrder { .. })),
        (short, |e| matches!(e, Error::BadOrder { .. })),
    ] {
        let mut target = env.clone();
        let err = state.apply_to(&mut target).unwrap_err();
        assert!(check(&err), "{err:?}");
        assert_eq!(target, env, "env changed on error");
    }
}

#[test]
fn activate_rejects_bad_try_counts() {
    for tries in [0, 10, 255] {
        let mut state = BootState::initial();
        assert!(matches!(
            state.activate(Slot::B, tries),
            Err(Error::BadTries { slot: Slot::B, tries: t, .. }) if t == tries
        ));
        assert_eq!(state, BootState::initial());
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Invalidate(Slot),
    Activate(Slot, u8),
    MarkGood(Slot),
    /// One GRUB boot: the slot picked by the rules, or `None` for the
    /// fallback, which must then be the given slot.
    Boot(Option<Slot>, Slot),
}

use Slot::{A, B};
use Step::*;

fn ok() -> SlotState {
    SlotState { ok: true, tries: 0 }
}

fn trial(tries: u8) -> SlotState {
    SlotState { ok: false, tries }
}

#[test]
fn ab_cycles() {
    struct Scenario {
        name: &'static str,
        start: BootState,
        steps: Vec<Step>,
        end: BootState,
    }
    let scenarios = [
        Scenario {
            name: "fresh image boots A and spends nothing",
            start: BootState::initial(),
            steps: vec![Boot(Some(A), A), Boot(Some(A), A)],
            end: BootState::initial(),
        },
        Scenario {
            name: "update to B that never comes up falls back to A",
            start: BootState::initial(),
            steps: vec![
                Invalidate(B),
                Activate(B, 3),
                Boot(Some(B), B),
                Boot(Some(B), B),
                Boot(Some(B), B),
                Boot(Some(A), A),
                Boot(Some(A), A),
            ],
            end: BootState {
                order: vec![B, A],
                a: ok(),
                b: trial(0),
            },
        },
        Scenario {
            name: "failed B is invalidated by the updater back on A",
            start: BootState {
                order: vec![B, A],
                a: ok(),
                b: trial(0),
            },
            steps: vec![Invalidate(B), Boot(Some(A), A)],
            end: BootState::initial(),
        },
        Scenario {
            name: "update to B succeeds on its second try",
            start: BootState::initial(),
            steps: vec![
                Invalidate(B),
                Activate(B, 2),
                Boot(Some(B), B),
                Boot(Some(B), B),
                MarkGood(B),
                Boot(Some(B), B),
                Boot(Some(B), B),
            ],
            end: BootState {
                order: vec![B, A],
                a: ok(),
                b: ok(),
            },
        },
        Scenario {
            name: "next update goes back to A, which fails; B still good",
            start: BootState {
                order: vec![B, A],
                a: ok(),
                b: ok(),
            },
            steps: vec![
                Invalidate(A),
                Activate(A, 1),
                Boot(Some(A), A),
                Boot(Some(B), B),
            ],
            end: BootState {
                order: vec![A, B],
                a: trial(0),
                b: ok(),
            },
        },
        Scenario {
            name: "nothing bootable: GRUB falls back to the first slot",
            start: BootState::initial(),
            steps: vec![
                Invalidate(A),
                Activate(B, 1),
                Boot(Some(B), B),
                Boot(None, B),
                Boot(None, B),
            ],
            end: BootState {
                order: vec![B, A],
                a: trial(0),
                b: trial(0),
            },
        },
        Scenario {
            name: "an OK slot later in the order loses to a trial slot first",
            start: BootState {
                order: vec![A, B],
                a: trial(2),
                b: ok(),
            },
            steps: vec![Boot(Some(A), A), Boot(Some(A), A), Boot(Some(B), B)],
            end: BootState {
                order: vec![A, B],
                a: trial(0),
                b: ok(),
            },
        },
        Scenario {
            name: "re-activating resets the try budget",
            start: BootState::initial(),
            steps: vec![
                Activate(B, 9),
                Boot(Some(B), B),
                Activate(B, 1),
                Boot(Some(B), B),
                Boot(Some(A), A),
            ],
            end: BootState {
                order: vec![B, A],
                a: ok(),
                b: trial(0),
            },
        },
    ];

    for scenario in scenarios {
        let name = scenario.name;
        let mut state = scenario.start;
        for (i, step) in scenario.steps.iter().enumerate() {
            match *step {
                Invalidate(slot) => state.invalidate(slot),
                Activate(slot, tries) => state.activate(slot, tries).unwrap(),
                MarkGood(slot) => state.mark_good(slot),
                Boot(picked, booted) => {
                    assert_eq!(state.next_boot(), picked, "{name}: step {i}");
                    let before = state.clone();
                    assert_eq!(state.spend_try(), picked, "{name}: step {i}");
                    assert_eq!(
                        picked.unwrap_or(state.fallback()),
                        booted,
                        "{name}: step {i}"
                    );
                    if picked.is_none() {
                        assert_eq!(state, before, "{name}: fallback spent a try");
                    }
                }
            }
            // Every intermediate state survives the trip through the block.
            let mut env = Env::new();
            state.apply_to(&mut env).unwrap();
            let block = env.to_block().unwrap();
            let back = BootState::from_env(&Env::parse(&block).unwrap()).unwrap();
            assert_eq!(back, state, "{name}: step {i} {step:?}");
        }
        assert_eq!(state, scenario.end, "{name}");
    }
}

#[test]
fn spend_try_counts_down_from_nine() {
    let mut state = BootState::initial();
    state.activate(B, 9).unwrap();
    for left in (0..9).rev() {
        assert_eq!(state.spend_try(), Some(B));
        assert_eq!(state.b.tries, left);
    }
    assert_eq!(state.spend_try(), Some(A));
}

#[test]
fn script_mentions_every_variable_and_the_full_chain() {
    let script = grub_script();
    let vars = "SLOT_ORDER A_OK A_TRIES B_OK B_TRIES AB_CHECK";
    assert!(
        script.contains(&format!(
            "if load_env -f \"${{prefix}}/${{ab_copy}}\" {vars}; then\n"
        )),
        "{script}"
    );
    assert!(
        script.contains("for ab_copy in grubenv grubenv2; do"),
        "{script}"
    );
    assert!(script.contains("for ab_slot in ${SLOT_ORDER}; do"));
    let lines: Vec<&str> = script.lines().map(str::trim).collect();
    for slot in Slot::ALL {
        let ok = slot.ok_var();
        let tries = slot.tries_var();
        assert!(lines.contains(&format!("if [ \"${{{ok}}}\" = \"1\" ]; then").as_str()));
        for n in 1..=9 {
            let test = format!("elif [ \"${{{tries}}}\" = \"{n}\" ]; then");
            let at = lines
                .iter()
                .position(|l| *l == test)
                .unwrap_or_else(|| panic!("missing {test}\n{script}"));
            assert_eq!(lines[at + 1], format!("set {tries}={}", n - 1));
            assert_eq!(
                lines[at + 2],
                "set AB_CHECK=\"${SLOT_ORDER}:${A_OK}${A_TRIES}:${B_OK}${B_TRIES}\""
            );
            assert_eq!(
                lines[at + 3],
                format!("if save_env -f \"${{ab_env}}\" {vars}; then")
            );
            assert_eq!(lines[at + 4], format!("set slot={slot}"));
        }
        // Nothing decrements from 0 or from an out-of-range value.
        assert!(!script.contains(&format!("\"${{{tries}}}\" = \"0\"")));
        assert!(!script.contains(&format!("\"${{{tries}}}\" = \"10\"")));
        assert!(lines.contains(
            &format!(
                "if [ \"${{slot}}\" = \"{slot}\" ]; then set slot_part={}; fi",
                slot.boot_partition()
            )
            .as_str()
        ));
    }
    assert!(script.contains("set slot_part=2"));
    assert!(script.contains("set slot_part=4"));
    assert!(script.contains("falling back"));
    assert!(!script.contains("menuentry"));
}

#[test]
fn script_passes_grub_script_check() {
    const CHECK: &str = "/usr/bin/grub-script-check";
    assert!(
        Path::new(CHECK).exists(),
        "{CHECK} is missing: install it with `apt-get install -y grub-common`"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ab.cfg");
    std::fs::write(&path, grub_script()).unwrap();
    let out = Command::new(CHECK).arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "grub-script-check rejected the script: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs GRUB itself (grub-emu) on `grub_script()` with `blocks` as the
/// environment's two copies on a FAT image (where `save_env` can write
/// them, as on the ESP). Returns the slot it boots, the copies it leaves
/// and its error lines.
fn grub_emu_boot(
    dir: &Path,
    template: &Path,
    blocks: [&[u8]; 2],
) -> (String, [Vec<u8>; 2], Vec<String>) {
    let img = dir.join("esp.img");
    std::fs::copy(template, &img).unwrap();
    let mtools = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    let targets = COPIES.map(|c| format!("::{ESP_DIR}/{c}"));
    for (block, target) in blocks.iter().zip(&targets) {
        let env = dir.join("grubenv.in");
        std::fs::write(&env, block).unwrap();
        mtools(&[
            "mcopy".as_ref(),
            "-o".as_ref(),
            "-i".as_ref(),
            img.as_os_str(),
            env.as_os_str(),
            target.as_ref(),
        ]);
    }
    let mut child = Command::new("/usr/bin/grub-emu")
        .arg("-m")
        .arg(dir.join("device.map"))
        .args(["-r", "host", "-d"])
        .arg(dir.join("cfg"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // grub-emu that never reaches `exit` sits at a prompt for ever.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("grub-emu did not exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    // Its console output is coloured: drop the escape sequences.
    let mut clean = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            clean.push(c);
        }
    }
    let body: Vec<&str> = clean
        .lines()
        .skip_while(|l| *l != "@@BEGIN")
        .take_while(|l| *l != "@@END")
        .collect();
    assert!(body.len() > 1, "grub-emu: {clean}");
    let errors = body
        .iter()
        .filter(|l| l.starts_with("error:"))
        .map(|l| (*l).to_owned())
        .collect();
    let slot = body
        .iter()
        .find_map(|l| l.strip_prefix("A/B: booting slot "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no slot in: {body:?}"))
        .to_owned();
    let after = targets.map(|target| {
        let back = dir.join("grubenv.after");
        mtools(&[
            "mcopy".as_ref(),
            "-o".as_ref(),
            "-i".as_ref(),
            img.as_os_str(),
            target.as_ref(),
            back.as_os_str(),
        ]);
        std::fs::read(&back).unwrap()
    });
    (slot, after, errors)
}

/// The state a copy holds if it is whole.
fn whole(block: &[u8]) -> Option<BootState> {
    crate::whole(block).ok().map(|(_, state)| state)
}

/// The model the crash-consistency suite decides with ([`pick`] the first
/// whole copy, [`BootState::spend_try`], else [`BootState::fallback`]; no
/// whole copy boots A) is what GRUB itself does: grub-emu runs the script
/// over a sample of states, with both copies whole and with the primary
/// torn, and the slot it boots and the copies it writes back must be the
/// model's.
#[test]
fn grub_itself_boots_what_the_model_says() {
    const EMU: &str = "/usr/bin/grub-emu";
    assert!(
        Path::new(EMU).exists(),
        "{EMU} is missing: install it with `apt-get install -y grub-emu`"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fragment.cfg"), grub_script()).unwrap();
    std::fs::create_dir(d.join("cfg")).unwrap();
    std::fs::write(
        d.join("cfg/grub.cfg"),
        format!(
            "set enable_progress_indicator=0\nset pager=0\nset root=hd0\n\
             set prefix=(hd0){ESP_DIR}\necho \"@@BEGIN\"\nsource (host){}\n\
             echo \"@@END\"\nexit\n",
            d.join("fragment.cfg").display()
        ),
    )
    .unwrap();
    let template = d.join("template.img");
    let run = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    let t = template.to_str().unwrap();
    run(&["mkfs.vfat", "-C", t, "2048"]);
    run(&["mmd", "-i", t, "::/EFI", "::/EFI/BOOT"]);
    std::fs::write(
        d.join("device.map"),
        format!("(hd0) {}\n", d.join("esp.img").display()),
    )
    .unwrap();

    let mut checked = 0;
    for order in [vec![A, B], vec![B, A]] {
        for a in [(false, 0), (false, 1), (false, 9), (true, 0), (true, 2)] {
            for b in [(false, 0), (false, 1), (false, 3), (true, 0)] {
                let state = BootState {
                    order: order.clone(),
                    a: SlotState {
                        ok: a.0,
                        tries: a.1,
                    },
                    b: SlotState {
                        ok: b.0,
                        tries: b.1,
                    },
                };
                let mut env = Env::new();
                state.apply_to(&mut env).unwrap();
                let block = env.to_block().unwrap();
                let mut model = state.clone();
                let expected = model.spend_try().unwrap_or_else(|| model.fallback());
                let spent = model != state;

                // Both copies whole: both end as the model's.
                let (slot, after, errors) = grub_emu_boot(d, &template, [&block, &block]);
                assert!(errors.is_empty(), "{state:?}: {errors:?}");
                assert_eq!(slot, expected.to_string(), "{state:?}");
                for (copy, after) in after.iter().enumerate() {
                    assert_eq!(
                        whole(after).as_ref(),
                        Some(&model),
                        "copy {copy} after {state:?}"
                    );
                }

                // The primary torn (its values apart from its check): the
                // secondary counts, and a try spent repairs the primary.
                let mut torn = env.clone();
                torn.set(CHECK, "torn").unwrap();
                let torn = torn.to_block().unwrap();
                let (slot, after, errors) = grub_emu_boot(d, &template, [&torn, &block]);
                assert!(errors.is_empty(), "torn {state:?}: {errors:?}");
                assert_eq!(slot, expected.to_string(), "torn {state:?}");
                assert_eq!(whole(&after[1]).as_ref(), Some(&model), "torn {state:?}");
                if spent {
                    assert_eq!(whole(&after[0]).as_ref(), Some(&model), "torn {state:?}");
                } else {
                    assert_eq!(after[0], torn.to_vec(), "torn {state:?}");
                }
                let picked = pick([Ok(&after[0][..]), Ok(&after[1][..])]).unwrap();
                assert_eq!(picked.state, model, "torn {state:?}");
                checked += 2;
            }
        }
    }

    let mut trial = BootState::initial();
    trial.activate(B, 3).unwrap();
    let mut env = Env::new();
    trial.apply_to(&mut env).unwrap();
    let good = env.to_block().unwrap();
    let mut spent = trial.clone();
    spent.spend_try();
    let mut garbage = [b'x'; BLOCK_SIZE];
    garbage[..7].copy_from_slice(b"garbage");

    // A primary GRUB cannot even load: the secondary counts and is saved;
    // the primary stays as it was (save_env cannot write it either).
    let (slot, after, errors) = grub_emu_boot(d, &template, [&garbage, &good]);
    assert_eq!(slot, "B");
    assert!(
        errors
            .iter()
            .any(|l| l.contains("invalid environment block")),
        "{errors:?}"
    );
    assert_eq!(after[0], garbage.to_vec());
    assert_eq!(whole(&after[1]), Some(spent.clone()));
    // A secondary GRUB cannot write: the primary counts and is saved.
    let (slot, after, _) = grub_emu_boot(d, &template, [&good, &garbage]);
    assert_eq!(slot, "B");
    assert_eq!(whole(&after[0]), Some(spent.clone()));
    assert_eq!(after[1], garbage.to_vec());
    checked += 2;

    // No whole copy, or values that name nothing: A, and the blocks are
    // left as they were.
    let mut odd = Env::new();
    odd.set(SLOT_ORDER, "C D").unwrap();
    odd.set("A_OK", "yes").unwrap();
    odd.set(CHECK, "C D:yes:").unwrap();
    let odd = odd.to_block().unwrap();
    let mut torn = env.clone();
    torn.set("B_TRIES", "9").unwrap();
    let torn = torn.to_block().unwrap();
    for blocks in [[&odd, &garbage], [&garbage, &garbage], [&torn, &odd]] {
        let (slot, after, _) = grub_emu_boot(d, &template, [&blocks[0][..], &blocks[1][..]]);
        assert_eq!(slot, "A");
        assert_eq!(after, [blocks[0].to_vec(), blocks[1].to_vec()]);
        checked += 1;
    }
    assert_eq!(checked, 85);
}
