#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;
use crate::profile;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn profile(name: &str) -> Profile {
    profile::load(&repo().join("image/profiles").join(format!("{name}.toml"))).unwrap()
}

/// A minimal owner set: update public keys only (what a build reads).
fn owner_set(keys: usize) -> (tempfile::TempDir, OwnerKeys) {
    let dir = tempfile::tempdir().unwrap();
    let update = dir.path().join(UPDATE_DIR);
    std::fs::create_dir(&update).unwrap();
    for n in 0..keys {
        let k = qbundle::generate_keypair().unwrap();
        k.store(&update.join(format!("o{n}.key"))).unwrap();
        std::fs::write(update.join(format!("o{n}.pub")), k.public("o").to_line()).unwrap();
    }
    let owner = OwnerKeys::open(dir.path()).unwrap();
    (dir, owner)
}

#[test]
fn keys_init_makes_a_full_owner_set_once() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("keys");
    let set = init(&dir, "acme").unwrap();
    assert_eq!(set.update_public.len(), UPDATE_KEYS);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    for d in ["", UPDATE_DIR, SECURE_BOOT_DIR, BOOT_DIR, "boot/gnupg"] {
        assert_eq!(mode(&dir.join(d)), 0o700, "{d}");
    }
    for n in 1..=UPDATE_KEYS {
        let key = dir.join(format!("update/acme-update-{n}.key"));
        assert_eq!(mode(&key), 0o600);
        let public = qbundle::PrivateKey::load(&key).unwrap().public("x");
        let text = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        let listed = qbundle::PublicKey::parse(&key, &text).unwrap();
        assert_eq!(listed.key, public.key);
        assert_eq!(listed.name, format!("acme-update-{n}"));
    }
    for role in SECURE_BOOT_KEYS {
        assert_eq!(mode(&dir.join(format!("secureboot/{role}.key"))), 0o600);
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-in"])
            .arg(dir.join(format!("secureboot/{role}.crt")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{role}: {out:?}");
        let subject = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            subject.contains(&format!("acme Secure Boot {role}")),
            "{subject}"
        );
    }
    let guid = std::fs::read_to_string(dir.join("secureboot/owner-guid")).unwrap();
    assert_eq!(guid.trim().len(), 36, "{guid}");
    // An OpenPGP public key packet, unarmoured: what grub-mkimage embeds.
    let grub = std::fs::read(dir.join("boot/grub.pub")).unwrap();
    assert!(
        grub.len() > 300 && matches!(grub[0], 0x99 | 0xc6),
        "{:x?}",
        &grub[..4]
    );
    let opened = OwnerKeys::open(&dir).unwrap();
    assert_eq!(opened.update_public, set.update_public);

    // Never over keys that are there.
    let e = init(&dir, "acme").unwrap_err();
    assert!(matches!(e, KeyError::NotEmpty { .. }), "{e}");
}

#[test]
fn keys_are_never_made_or_used_inside_a_git_work_tree() {
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join(".git")).unwrap();
    let inside = work.path().join("deep/keys");
    let e = init(&inside, "acme").unwrap_err();
    assert!(matches!(e, KeyError::InRepository { .. }), "{e}");
    assert!(e.to_string().contains("must never be committed"), "{e}");
    assert!(!inside.exists());
    // The repository itself.
    let e = OwnerKeys::open(&repo().join("image/keys")).unwrap_err();
    assert!(matches!(e, KeyError::InRepository { .. }), "{e}");
}

#[test]
fn an_owner_set_with_a_readable_private_key_or_no_update_key_is_refused() {
    let (dir, _) = owner_set(1);
    let key = dir.path().join("update/o0.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = OwnerKeys::open(dir.path()).unwrap_err();
    assert!(e.to_string().contains("readable by others"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir(empty.path().join(UPDATE_DIR)).unwrap();
    let e = OwnerKeys::open(empty.path()).unwrap_err();
    assert!(e.to_string().contains("no update public key"), "{e}");
}

#[test]
fn a_production_build_trusts_the_owner_keys_and_nothing_else() {
    let qemu = profile("qemu");
    assert!(qemu.image.production);
    let src = repo();

    let e = custody(&qemu, &src, None).unwrap_err();
    assert!(matches!(e, CustodyError::NoOwnerKeys { .. }), "{e}");
    assert!(e.to_string().contains("qimage keys init"), "{e}");

    let (_dir, owner) = owner_set(2);
    let trust = custody(&qemu, &src, Some(&owner)).unwrap();
    assert_eq!(trust.keys, owner.update_public);
    assert_eq!(trust.threshold, 1);
    assert!(trust.signing_keys.is_empty());

    // A key the profile names is the repository's.
    let mut named = qemu.clone();
    named.update.trusted_keys = vec!["image/keys/test.pub".into()];
    let e = custody(&named, &src, Some(&owner)).unwrap_err();
    assert!(
        matches!(
            e,
            CustodyError::RepositoryKey {
                field: "trusted_keys",
                ..
            }
        ),
        "{e}"
    );
    let mut signs = qemu.clone();
    signs.update.signing_keys = vec!["image/keys/test.key".into()];
    let e = custody(&signs, &src, Some(&owner)).unwrap_err();
    assert!(
        matches!(
            e,
            CustodyError::RepositoryKey {
                field: "signing_keys",
                ..
            }
        ),
        "{e}"
    );

    // The test key copied into an owner set is still the test key.
    let copied = tempfile::tempdir().unwrap();
    std::fs::create_dir(copied.path().join(UPDATE_DIR)).unwrap();
    std::fs::copy(
        src.join("image/keys/test.pub"),
        copied.path().join("update/mine.pub"),
    )
    .unwrap();
    let e = custody(&qemu, &src, Some(&OwnerKeys::open(copied.path()).unwrap())).unwrap_err();
    assert!(
        matches!(e, CustodyError::OwnerKeyIsRepositoryKey { .. }),
        "{e}"
    );

    // More signatures than keys.
    let mut two = qemu.clone();
    two.update.threshold = 2;
    let (_one, single) = owner_set(1);
    let e = custody(&two, &src, Some(&single)).unwrap_err();
    assert!(matches!(e, CustodyError::Threshold { keys: 1, .. }), "{e}");
}

#[test]
fn a_test_build_trusts_the_test_key_only() {
    let test = profile("qemu-test");
    let (_dir, owner) = owner_set(1);
    let trust = custody(&test, &repo(), Some(&owner)).unwrap();
    assert_eq!(trust.keys, [repo().join("image/keys/test.pub")]);
    assert_eq!(trust.signing_keys, [repo().join("image/keys/test.key")]);
}

/// The profiles in the repository keep the rules: no production profile
/// names a key, and every test profile's compatible string is its own, so
/// a test bundle never installs on a production image.
#[test]
fn the_repositorys_profiles_keep_test_keys_out_of_production() {
    let mut production = Vec::new();
    let mut test = Vec::new();
    for e in std::fs::read_dir(repo().join("image/profiles")).unwrap() {
        let path = e.unwrap().path();
        // `base` and `test-tools` are parts of profiles, not profiles.
        let Ok(p) = profile::load(&path) else {
            continue;
        };
        if p.image.production {
            assert!(p.update.trusted_keys.is_empty(), "{}", path.display());
            assert!(p.update.signing_keys.is_empty(), "{}", path.display());
            production.push(p);
        } else {
            assert!(p.image.compatible.ends_with("-test"), "{}", path.display());
            test.push(p);
        }
    }
    let names = |v: &[Profile]| v.iter().map(|p| p.image.name.clone()).collect::<Vec<_>>();
    assert!(
        names(&production).contains(&"qemu".to_owned()),
        "{:?}",
        names(&production)
    );
    assert!(names(&production).contains(&"hw".to_owned()));
    assert!(names(&test).contains(&"qemu-test".to_owned()));
    for t in &test {
        for p in &production {
            assert_ne!(
                t.image.compatible, p.image.compatible,
                "{} / {}",
                t.image.name, p.image.name
            );
        }
    }
}
