//! Bundles written and read back, and every way a bad one is refused.

#![allow(clippy::unwrap_used)] // test fixtures: a panic is a test failure

use std::io::Cursor;
use std::path::Path;

use qbundle::*;

struct Fixture {
    _dir: tempfile::TempDir,
    bytes: Vec<u8>,
    manifest: Manifest,
    keys: Vec<PrivateKey>,
}

fn fixture(signers: &[usize], nkeys: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("boot.img");
    let root = dir.path().join("root.img");
    std::fs::write(&boot, vec![0x42u8; 5000]).unwrap();
    let mut r = vec![0u8; 3 * 4096];
    r[..4096].fill(7);
    r[4096..8192].fill(8);
    r[8192..].fill(9);
    std::fs::write(&root, &r).unwrap();
    let (bs, bh) = hash_file(&boot).unwrap();
    let (rs, rh) = hash_file(&root).unwrap();
    let manifest = Manifest {
        compatible: "qubes-dom0-appliance-x86_64".into(),
        version: "0.2.0".into(),
        security_epoch: 2,
        build_id: "b1".into(),
        payloads: vec![
            Payload {
                kind: PayloadKind::Boot,
                size: bs,
                blake3: bh,
            },
            Payload {
                kind: PayloadKind::Root,
                size: rs,
                blake3: rh,
            },
        ],
        root_verity: RootVerity {
            data_blocks: 2,
            data_block_size: 4096,
            hash_block_size: 4096,
            hash_offset: 8192,
            salt: vec![1, 2, 3],
            root_hash: [5; 32],
        },
    };
    let keys: Vec<PrivateKey> = (0..nkeys).map(|_| generate_keypair().unwrap()).collect();
    let signing: Vec<&PrivateKey> = signers.iter().map(|i| &keys[*i]).collect();
    let mut bytes = Vec::new();
    write_bundle(
        &mut bytes,
        &manifest,
        &signing,
        &[
            PayloadSource {
                kind: PayloadKind::Boot,
                path: boot,
            },
            PayloadSource {
                kind: PayloadKind::Root,
                path: root,
            },
        ],
    )
    .unwrap();
    Fixture {
        _dir: dir,
        bytes,
        manifest,
        keys,
    }
}

fn trust(keys: &[&PrivateKey], threshold: usize) -> TrustStore {
    let pubs: Vec<PublicKey> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| k.public(&format!("key{i}")))
        .collect();
    TrustStore::parse(
        Path::new("trust.toml"),
        &TrustStore::render(&pubs, threshold),
    )
    .unwrap()
}

/// Reads a whole bundle the way the updater does.
fn read_all(bytes: &[u8], t: &TrustStore) -> Result<(Verified, Vec<Vec<u8>>), BundleError> {
    let mut r = Cursor::new(bytes);
    let v = read_verified(&mut r, t)?;
    let mut outs = Vec::new();
    for p in &v.manifest.payloads {
        let mut sink = Vec::new();
        stream_payload(&mut r, p, &mut sink, &mut |_| {})?;
        outs.push(sink);
    }
    expect_end(&mut r)?;
    Ok((v, outs))
}

#[test]
fn a_good_bundle_reads_back() {
    let f = fixture(&[0], 1);
    let t = trust(&[&f.keys[0]], 1);
    let (v, outs) = read_all(&f.bytes, &t).unwrap();
    assert_eq!(v.manifest, f.manifest);
    assert_eq!(v.signers, vec!["key0"]);
    assert_eq!(outs[0], vec![0x42u8; 5000]);
    assert_eq!(outs[1].len(), 3 * 4096);
}

#[test]
fn a_threshold_of_two_keys() {
    let f = fixture(&[0, 1], 3);
    let t = trust(&[&f.keys[0], &f.keys[1], &f.keys[2]], 2);
    assert_eq!(read_all(&f.bytes, &t).unwrap().0.signers.len(), 2);
    // Only one of the two required signers.
    let f1 = fixture(&[0], 2);
    let t = trust(&[&f1.keys[0], &f1.keys[1]], 2);
    assert!(matches!(
        read_all(&f1.bytes, &t).unwrap_err(),
        BundleError::TooFewSignatures {
            valid: 1,
            threshold: 2
        }
    ));
}

#[test]
fn unknown_key_and_revoked_key() {
    let f = fixture(&[0], 2);
    let other = trust(&[&f.keys[1]], 1);
    assert!(matches!(
        read_all(&f.bytes, &other).unwrap_err(),
        BundleError::UnknownKey { .. }
    ));
    let text = TrustStore::render(&[f.keys[0].public("old"), f.keys[1].public("new")], 1).replacen(
        "public =",
        "revoked = true\npublic =",
        1,
    );
    let t = TrustStore::parse(Path::new("t"), &text).unwrap();
    assert!(matches!(
        read_all(&f.bytes, &t).unwrap_err(),
        BundleError::TooFewSignatures {
            valid: 0,
            threshold: 1
        }
    ));
}

#[test]
fn duplicate_signer_is_refused() {
    let f = fixture(&[0, 0], 1);
    let t = trust(&[&f.keys[0]], 1);
    assert!(matches!(
        read_all(&f.bytes, &t).unwrap_err(),
        BundleError::DuplicateSigner { .. }
    ));
}

#[test]
fn altered_manifest_or_signature_is_a_bad_signature() {
    let f = fixture(&[0], 1);
    let t = trust(&[&f.keys[0]], 1);
    let manifest_start = HEADER_LEN + 96;
    let mut b = f.bytes.clone();
    b[manifest_start + 3] ^= 1;
    assert!(matches!(
        read_all(&b, &t).unwrap_err(),
        BundleError::BadSignature { .. }
    ));
    let mut b = f.bytes.clone();
    b[HEADER_LEN + 40] ^= 1;
    assert!(matches!(
        read_all(&b, &t).unwrap_err(),
        BundleError::BadSignature { .. }
    ));
}

#[test]
fn altered_payload_is_a_hash_mismatch() {
    let f = fixture(&[0], 1);
    let t = trust(&[&f.keys[0]], 1);
    let mut b = f.bytes.clone();
    let last = b.len() - 10;
    b[last] ^= 0xff;
    assert!(matches!(
        read_all(&b, &t).unwrap_err(),
        BundleError::PayloadHash {
            kind: PayloadKind::Root,
            ..
        }
    ));
}

#[test]
fn truncation_at_every_section_boundary_and_inside() {
    let f = fixture(&[0], 1);
    let t = trust(&[&f.keys[0]], 1);
    let h = Header::parse(f.bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
    let sigs_end = HEADER_LEN + h.signatures_len as usize;
    let manifest_end = sigs_end + h.manifest_len as usize;
    let boot_end = manifest_end + 5000;
    let cases = [
        (0, Section::Header),
        (10, Section::Header),
        (HEADER_LEN, Section::Signatures),
        (HEADER_LEN + 50, Section::Signatures),
        (sigs_end, Section::Manifest),
        (sigs_end + 1, Section::Manifest),
        (manifest_end, Section::Payload(PayloadKind::Boot)),
        (manifest_end + 100, Section::Payload(PayloadKind::Boot)),
        (boot_end, Section::Payload(PayloadKind::Root)),
        (f.bytes.len() - 1, Section::Payload(PayloadKind::Root)),
    ];
    for (cut, want) in cases {
        match read_all(&f.bytes[..cut], &t).unwrap_err() {
            BundleError::Truncated { section, .. } => assert_eq!(section, want, "cut at {cut}"),
            e => panic!("cut at {cut}: {e:?}"),
        }
    }
}

#[test]
fn header_caps_and_trailing_data() {
    let f = fixture(&[0], 1);
    let t = trust(&[&f.keys[0]], 1);
    let mut b = f.bytes.clone();
    b[16..20].copy_from_slice(&(MAX_MANIFEST_LEN + 1).to_le_bytes());
    assert!(matches!(
        read_all(&b, &t).unwrap_err(),
        BundleError::Header(_)
    ));
    let mut b = f.bytes.clone();
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        read_all(&b, &t).unwrap_err(),
        BundleError::Header(_)
    ));
    let mut b = f.bytes.clone();
    b.push(0);
    assert!(matches!(
        read_all(&b, &t).unwrap_err(),
        BundleError::TrailingData(_)
    ));
    assert!(matches!(
        read_all(
            b"not a bundle at all, clearly longer than sixty-four bytes of header......",
            &t
        )
        .unwrap_err(),
        BundleError::Header(_)
    ));
}

#[test]
fn a_signed_but_invalid_manifest_is_refused_after_verification() {
    // Signed garbage: the signature verifies, decoding fails cleanly.
    let k = generate_keypair().unwrap();
    let t = trust(&[&k], 1);
    let garbage = vec![0xffu8; 40];
    let mut b = Header::new(1, 40).to_bytes().to_vec();
    b.extend_from_slice(k.public("").key.as_bytes());
    b.extend_from_slice(&k.sign(&signed_message(&garbage)));
    b.extend_from_slice(&garbage);
    assert!(matches!(
        read_all(&b, &t).unwrap_err(),
        BundleError::ManifestDecode(_)
    ));
}
