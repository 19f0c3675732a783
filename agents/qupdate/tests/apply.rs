//! qupdate against a real GPT disk image with a FAT ESP (file-backed
//! slots): install, boot-state transitions, mark-good, rollback, and every
//! kind of bad bundle leaving the running slot the default and untouched.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::type_complexity
)] // test fixtures

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use common::{world, World};
use qbundle::TrustStore;
use qcontract::Slot;
use qupdate::{ApplyOptions, SlotState, UpdateError, Updater};

/// The bundle as a file, as `qupdate apply FILE` reads it.
fn bundle_file(bytes: &[u8]) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f
}

fn apply_with(
    w: &World,
    booted: Slot,
    bytes: &[u8],
    opts: &ApplyOptions,
) -> Result<qupdate::Applied, UpdateError> {
    let mut u = Updater::open(w.cfg(booted)).unwrap();
    u.apply(bundle_file(bytes), opts, &mut |_| {})
}

fn apply(w: &World, booted: Slot, bytes: &[u8]) -> Result<qupdate::Applied, UpdateError> {
    apply_with(w, booted, bytes, &ApplyOptions::default())
}

#[test]
fn install_boot_mark_good_and_roll_back() {
    let w = world();
    // A's first boot marked it good: its epoch (1) is recorded, the floor 1.
    Updater::open(w.cfg(Slot::A)).unwrap().mark_good().unwrap();
    // The same epoch as A, so rolling back to A stays above the floor.
    let bundle = w.bundle(&[&w.key], |m| m.security_epoch = 1);
    let applied = apply(&w, Slot::A, &bundle).unwrap();
    assert_eq!(applied.slot, Slot::B);
    // The payloads are on the disk, byte for byte.
    let boot_b = w.part("boot_b");
    assert_eq!(
        &boot_b[..1000],
        &(0..1000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>()[..]
    );
    let s = w.boot_state();
    assert_eq!(s.order, vec![Slot::B, Slot::A]);
    assert_eq!((s.b.ok, s.b.tries), (false, 3));
    let st = Updater::open(w.cfg(Slot::A)).unwrap().status().unwrap();
    assert_eq!(st.slot(Slot::B).state, SlotState::Bootable);
    assert_eq!(st.slot(Slot::B).version.as_deref(), Some("0.2.0"));
    assert_eq!(st.floor, 1);

    // GRUB spends a try and boots B; B's boot-complete hook marks it good.
    let mut s = w.boot_state();
    assert_eq!(s.spend_try(), Some(Slot::B));
    w.store_boot_state(&s);
    let mut u = Updater::open(w.cfg(Slot::B)).unwrap();
    u.mark_good().unwrap();
    let st = u.status().unwrap();
    assert_eq!(st.floor, 1);
    assert_eq!(st.slot(Slot::B).state, SlotState::Good);
    assert_eq!(w.boot_state().next_boot(), Some(Slot::B));

    // Roll back to A (good since the first boot).
    assert_eq!(u.rollback().unwrap(), Slot::A);
    assert_eq!(w.boot_state().next_boot(), Some(Slot::A));
}

/// One apply at a time; mark-good and status go on beside it (they take
/// only the state lock), and a stalled stream ends the apply and frees it.
#[test]
fn a_second_apply_is_busy_but_mark_good_is_never_starved() {
    let w = world();
    let (reader, writer) = std::io::pipe().unwrap();
    let cfg = w.cfg(Slot::A);
    let first = std::thread::spawn(move || {
        let opts = ApplyOptions {
            stall_timeout: Duration::from_secs(2),
            ..ApplyOptions::default()
        };
        Updater::open(cfg)
            .unwrap()
            .apply(reader, &opts, &mut |_| {})
    });
    // The first apply holds its lock and waits for bundle bytes.
    std::thread::sleep(Duration::from_millis(300));
    let bundle = w.bundle(&[&w.key], |_| {});
    let err = apply(&w, Slot::A, &bundle).unwrap_err();
    assert!(matches!(err, UpdateError::Busy(_)), "{err:?}");
    let mut u = Updater::open(w.cfg(Slot::A)).unwrap();
    u.mark_good().unwrap();
    assert_eq!(u.status().unwrap().slot(Slot::A).state, SlotState::Good);

    // Nothing comes: the stalled apply ends by itself, names why, and
    // leaves B unbootable and the lock free.
    let err = first.join().unwrap().unwrap_err();
    let chain = qcontract::error_chain(&err);
    assert!(chain.contains("no bundle data for 2 s"), "{chain}");
    drop(writer);
    let s = w.boot_state();
    assert_eq!(s.next_boot(), Some(Slot::A));
    assert_eq!((s.b.ok, s.b.tries), (false, 0));
    apply(&w, Slot::A, &bundle).unwrap();
}

/// An apply from a slot still on trial would overwrite the only slot
/// proven to boot: refused, with the reason, unless forced.
#[test]
fn an_apply_from_an_unproven_slot_needs_force() {
    let w = world();
    let bundle = w.bundle(&[&w.key], |_| {});
    apply(&w, Slot::A, &bundle).unwrap();
    // GRUB boots B on trial; it has not been marked good.
    let mut s = w.boot_state();
    assert_eq!(s.spend_try(), Some(Slot::B));
    w.store_boot_state(&s);
    let a_before = (w.part("boot_a"), w.part("root_a"));
    let err = apply(&w, Slot::B, &bundle).unwrap_err();
    assert!(
        matches!(
            err,
            UpdateError::BootedNotGood {
                booted: Slot::B,
                target: Slot::A
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("--force") && text.contains("slot A"),
        "{text}"
    );
    assert_eq!(w.boot_state(), s, "a refused apply changed the boot state");
    assert_eq!((w.part("boot_a"), w.part("root_a")), a_before);
    let st = Updater::open(w.cfg(Slot::B)).unwrap().status().unwrap();
    assert_eq!(st.slot(Slot::A).state, SlotState::Good);
    assert!(st.last_error.unwrap().contains("not marked good"));

    let forced = ApplyOptions {
        force: true,
        ..ApplyOptions::default()
    };
    assert_eq!(
        apply_with(&w, Slot::B, &bundle, &forced).unwrap().slot,
        Slot::A
    );
    assert_eq!(w.boot_state().order, vec![Slot::A, Slot::B]);
}

#[test]
fn a_failing_new_slot_falls_back_after_its_tries() {
    let w = world();
    apply(&w, Slot::A, &w.bundle(&[&w.key], |_| {})).unwrap();
    let mut s = w.boot_state();
    // Three boots of B that never reach mark-good, then A again.
    for _ in 0..3 {
        assert_eq!(s.spend_try(), Some(Slot::B));
    }
    assert_eq!(s.spend_try(), Some(Slot::A));
    w.store_boot_state(&s);
    let st = Updater::open(w.cfg(Slot::A)).unwrap().status().unwrap();
    assert_eq!(st.slot(Slot::B).state, SlotState::Bad);
}

#[test]
fn bad_bundles_leave_slot_a_the_default_and_untouched() {
    let w = world();
    let stranger = qbundle::generate_keypair().unwrap();
    let good = w.bundle(&[&w.key], |_| {});
    let manifest_at = qbundle::HEADER_LEN + 96;
    let mut bad_sig = good.clone();
    bad_sig[manifest_at + 2] ^= 1;
    let mut bad_payload = good.clone();
    let n = bad_payload.len();
    bad_payload[n - 100] ^= 1;
    let mut over_cap = good.clone();
    over_cap[16..20].copy_from_slice(&(qbundle::MAX_MANIFEST_LEN + 1).to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, fn(&UpdateError) -> bool)> = vec![
        ("bad signature", bad_sig, |e| {
            matches!(
                e,
                UpdateError::Bundle(qbundle::BundleError::BadSignature { .. })
            )
        }),
        ("unknown key", w.bundle(&[&stranger], |_| {}), |e| {
            matches!(
                e,
                UpdateError::Bundle(qbundle::BundleError::UnknownKey { .. })
            )
        }),
        ("truncated header", good[..30].to_vec(), |e| {
            matches!(
                e,
                UpdateError::Bundle(qbundle::BundleError::Truncated { .. })
            )
        }),
        (
            "truncated manifest",
            good[..manifest_at + 5].to_vec(),
            |e| {
                matches!(
                    e,
                    UpdateError::Bundle(qbundle::BundleError::Truncated { .. })
                )
            },
        ),
        (
            "truncated payload",
            good[..good.len() - 4096].to_vec(),
            |e| {
                matches!(
                    e,
                    UpdateError::Bundle(qbundle::BundleError::Truncated { .. })
                )
            },
        ),
        ("header over cap", over_cap, |e| {
            matches!(e, UpdateError::Bundle(qbundle::BundleError::Header(_)))
        }),
        ("payload hash", bad_payload, |e| {
            matches!(
                e,
                UpdateError::Bundle(qbundle::BundleError::PayloadHash { .. })
            )
        }),
        (
            "trailing bytes in a file",
            [good.as_slice(), &[0u8; 512]].concat(),
            |e| {
                matches!(
                    e,
                    UpdateError::Bundle(qbundle::BundleError::TrailingData(_))
                )
            },
        ),
        (
            "wrong compatible",
            w.bundle(&[&w.key], |m| m.compatible = "other-product".into()),
            |e| matches!(e, UpdateError::Incompatible { .. }),
        ),
    ];
    let a_before = (w.part("boot_a"), w.part("root_a"));
    let mut messages = Vec::new();
    for (what, bytes, is_expected) in cases {
        let err = apply(&w, Slot::A, &bytes).unwrap_err();
        assert!(is_expected(&err), "{what}: {err:?}");
        let s = w.boot_state();
        assert_eq!(
            s.next_boot(),
            Some(Slot::A),
            "{what}: A must stay the default"
        );
        assert!(!s.b.ok && s.b.tries == 0, "{what}: B must not be bootable");
        assert_eq!(
            (w.part("boot_a"), w.part("root_a")),
            a_before,
            "{what}: slot A changed"
        );
        let st = Updater::open(w.cfg(Slot::A)).unwrap().status().unwrap();
        let msg = st.last_error.unwrap();
        messages.push(msg);
    }
    // Each failure reads differently.
    let mut unique = messages.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), messages.len(), "{messages:#?}");

    // Too few signatures for a threshold of two.
    let second = qbundle::generate_keypair().unwrap();
    std::fs::write(
        w.dir.path().join("trust.toml"),
        TrustStore::render(&[w.key.public("a"), second.public("b")], 2),
    )
    .unwrap();
    let err = apply(&w, Slot::A, &good).unwrap_err();
    assert!(
        matches!(
            err,
            UpdateError::Bundle(qbundle::BundleError::TooFewSignatures {
                valid: 1,
                threshold: 2
            })
        ),
        "{err:?}"
    );
    apply(&w, Slot::A, &w.bundle(&[&w.key, &second], |_| {})).unwrap();
}

/// A loop device over `file`, detached when dropped.
struct Loop(String);

impl Loop {
    fn attach(file: &std::path::Path) -> Loop {
        assert!(
            rustix::process::geteuid().is_root(),
            "a block device test attaches a loop device: run as root"
        );
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(file)
            .output()
            .expect("util-linux losetup is needed");
        assert!(out.status.success(), "losetup: {out:?}");
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["--detach", &self.0])
            .status();
    }
}

/// `qupdate apply /dev/sdX` of a USB stick written with `dd`: the device
/// holds the bundle and then whatever was there (here bytes that are not
/// zero), and the apply stops at the bundle's own length.
#[test]
fn a_bundle_on_a_block_device_ends_at_its_own_length() {
    let w = world();
    let good = w.bundle(&[&w.key], |_| {});
    let stick = w.dir.path().join("stick.img");
    let mut bytes = good.clone();
    // Padding to a whole number of sectors and a MiB more, none of it zero.
    bytes.resize(good.len().next_multiple_of(512) + (1 << 20), 0xa5);
    std::fs::write(&stick, &bytes).unwrap();
    let dev = Loop::attach(&stick);
    let file = qupdate::open_bundle(std::path::Path::new(&dev.0)).unwrap();
    let mut u = Updater::open(w.cfg(Slot::A)).unwrap();
    let applied = u
        .apply(file, &ApplyOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!(applied.slot, Slot::B);
    assert_eq!(w.boot_state().next_boot(), Some(Slot::B));
    // The same bytes as a file are refused: a file ends with its bundle.
    let err = apply(&w, Slot::A, &bytes).unwrap_err();
    assert!(
        matches!(
            err,
            UpdateError::Bundle(qbundle::BundleError::TrailingData(_))
        ),
        "{err:?}"
    );
}

#[test]
fn epoch_below_the_floor_is_a_downgrade() {
    let w = world();
    apply(&w, Slot::A, &w.bundle(&[&w.key], |_| {})).unwrap();
    let mut s = w.boot_state();
    s.spend_try();
    w.store_boot_state(&s);
    Updater::open(w.cfg(Slot::B)).unwrap().mark_good().unwrap();
    let old = w.bundle(&[&w.key], |m| m.security_epoch = 4);
    let err = apply(&w, Slot::B, &old).unwrap_err();
    assert!(
        matches!(err, UpdateError::BelowFloor { epoch: 4, floor: 5 }),
        "{err:?}"
    );
    assert_eq!(w.boot_state().next_boot(), Some(Slot::B));
}

/// The floor rises to the epoch the booted image itself says (its
/// verified image info), whatever the record on /var says: lowering the
/// record does not lower the floor.
#[test]
fn mark_good_takes_the_epoch_from_the_booted_image_not_the_record() {
    let w = world();
    apply(&w, Slot::A, &w.bundle(&[&w.key], |_| {})).unwrap();
    let mut s = w.boot_state();
    s.spend_try();
    w.store_boot_state(&s);
    let cfg = w.cfg(Slot::B);
    assert_eq!(cfg.image_epoch, 5);
    let state = w.dir.path().join("state/state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    let lowered = text.replace("\"security_epoch\": 5", "\"security_epoch\": 0");
    assert_ne!(text, lowered, "{text}");
    std::fs::write(&state, lowered).unwrap();
    Updater::open(cfg).unwrap().mark_good().unwrap();
    let st = Updater::open(w.cfg(Slot::B)).unwrap().status().unwrap();
    assert_eq!(st.floor, 5);
    let b = &st.slots[1];
    assert_eq!(b.security_epoch, Some(5));
}

/// The floor rises only once the new slot is good, and then a rollback
/// below it is refused, as is one to a slot whose epoch nobody recorded.
#[test]
fn a_rollback_below_the_floor_is_refused() {
    let w = world();
    apply(&w, Slot::A, &w.bundle(&[&w.key], |_| {})).unwrap();
    let st = Updater::open(w.cfg(Slot::A)).unwrap().status().unwrap();
    assert_eq!(
        st.floor, 0,
        "the floor must not rise before the new slot is good"
    );
    let mut s = w.boot_state();
    s.spend_try();
    w.store_boot_state(&s);
    let mut u = Updater::open(w.cfg(Slot::B)).unwrap();
    u.mark_good().unwrap();
    assert_eq!(u.status().unwrap().floor, 5);
    // A is good in the boot state, but nothing recorded its epoch.
    let e = u.rollback().unwrap_err();
    assert!(matches!(e, UpdateError::UnknownEpoch(Slot::A)), "{e:?}");
    // Recorded (as its first boot would have), it is below the floor.
    let state = w.dir.path().join("state/state.json");
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    st["slots"]["A"] = serde_json::json!({
        "version": "0.1.0", "security_epoch": 1, "build_id": "", "root_hash": ""
    });
    std::fs::write(&state, st.to_string()).unwrap();
    let e = u.rollback().unwrap_err();
    assert!(
        matches!(
            e,
            UpdateError::RollbackBelowFloor {
                slot: Slot::A,
                epoch: 1,
                floor: 5
            }
        ),
        "{e:?}"
    );
    assert_eq!(w.boot_state().next_boot(), Some(Slot::B));
}

/// Within the running image's epoch (1 here, version 0.1.0), only the same
/// or a newer version installs (the order of `qcontract::version`); one
/// that cannot be ordered is refused.
#[test]
fn an_older_version_of_the_same_epoch_is_a_downgrade() {
    let w = world();
    for (version, ok) in [
        ("0.1.0-rc1", false),
        ("0.0.9", false),
        ("0.1.0", true),
        ("0.1.1", true),
        ("0.1", false),
    ] {
        let b = w.bundle(&[&w.key], |m| {
            m.security_epoch = 1;
            m.version = version.into();
        });
        let r = apply(&w, Slot::A, &b);
        match (ok, r) {
            (true, Ok(a)) => assert_eq!(a.version, version),
            (
                false,
                Err(UpdateError::OlderInEpoch {
                    running, epoch: 1, ..
                }),
            ) => {
                assert_eq!(running, "0.1.0");
            }
            (false, Err(UpdateError::Version { whose, .. })) if version == "0.1" => {
                assert_eq!(whose, "the bundle's");
            }
            (_, r) => panic!("{version}: {r:?}"),
        }
    }
}

/// An epoch too far above the floor (or the running image's, here 1) is
/// refused before the target is touched: once marked good it would lock
/// every later release out. The step is the image's (10 in these tests).
#[test]
fn an_epoch_jump_past_the_step_is_refused() {
    let w = world();
    for epoch in [12, u64::MAX] {
        let far = w.bundle(&[&w.key], |m| m.security_epoch = epoch);
        let err = apply(&w, Slot::A, &far).unwrap_err();
        assert!(
            matches!(err, UpdateError::EpochJump { epoch: e, base: 1, step: 10 } if e == epoch),
            "{err:?}"
        );
        assert!(err.to_string().contains("lock later releases out"), "{err}");
        let s = w.boot_state();
        assert_eq!(s.next_boot(), Some(Slot::A));
        assert!(!s.b.ok && s.b.tries == 0);
    }
    let edge = w.bundle(&[&w.key], |m| m.security_epoch = 11);
    assert_eq!(apply(&w, Slot::A, &edge).unwrap().security_epoch, 11);
}

/// A power cut after the target was invalidated and half written: the
/// running slot still boots, and the same apply then succeeds.
#[test]
fn an_interrupted_install_leaves_the_running_slot_and_can_be_redone() {
    let w = world();
    let bundle = w.bundle(&[&w.key], |_| {});
    // Stop the stream in the middle of the root payload.
    let cut = bundle.len() - 1_000_000;
    assert!(apply(&w, Slot::A, &bundle[..cut]).is_err());
    assert_eq!(w.boot_state().next_boot(), Some(Slot::A));
    apply(&w, Slot::A, &bundle).unwrap();
    assert_eq!(w.boot_state().next_boot(), Some(Slot::B));
}

/// Tries the boot loader cannot count are refused before the bundle is
/// read or a slot written; the slot stays unbootable and A the default.
#[test]
fn tries_grub_cannot_count_leave_the_new_slot_unbootable() {
    let w = world();
    let bundle = w.bundle(&[&w.key], |_| {});
    for tries in [0, 10] {
        let opts = ApplyOptions {
            tries,
            ..ApplyOptions::default()
        };
        let err = apply_with(&w, Slot::A, &bundle, &opts).unwrap_err();
        assert!(
            matches!(err, UpdateError::Tries(t) if t == tries),
            "{err:?}"
        );
    }
    let opts = ApplyOptions {
        stall_timeout: Duration::from_millis(10),
        ..ApplyOptions::default()
    };
    let err = apply_with(&w, Slot::A, &bundle, &opts).unwrap_err();
    assert!(matches!(err, UpdateError::StallTimeout(_)), "{err:?}");
    let s = w.boot_state();
    assert_eq!(s.next_boot(), Some(Slot::A));
    assert_eq!((s.b.ok, s.b.tries), (false, 0));
}
