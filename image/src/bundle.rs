//! Signed update bundles from built slots. `qimage build` signs one for a
//! profile with `update.signing_keys`; `qimage bundle` signs one later from
//! a build's output directory (its `boot.img`, `root.img`, `root.verity` and
//! `image.info`), so release keys need not be on the build machine.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use qcontract::paths::output::{BOOT_IMAGE, IMAGE_INFO, ROOT_IMAGE, ROOT_VERITY};
use qcontract::ImageInfo;

/// What the manifest says about the release.
#[derive(Debug, Clone)]
pub struct Release {
    pub compatible: String,
    pub version: String,
    pub security_epoch: u64,
    pub build_id: String,
}

/// Writes a signed bundle of `boot` and `root` (with its verity tree) to
/// `out`, through a temporary file renamed at the end: a failed run leaves
/// no partial bundle under the final name.
pub fn write_signed(
    out: &Path,
    release: &Release,
    boot: &Path,
    root: &Path,
    vinfo: &verity::VerityInfo,
    keys: &[PathBuf],
) -> Result<()> {
    if keys.is_empty() {
        bail!("no signing key given");
    }
    let mut loaded = Vec::new();
    for k in keys {
        loaded.push(qbundle::PrivateKey::load(k).with_context(|| format!("{}", k.display()))?);
    }
    let signers: Vec<&qbundle::PrivateKey> = loaded.iter().collect();
    let (boot_size, boot_hash) = qbundle::hash_file(boot)?;
    let (root_size, root_hash) = qbundle::hash_file(root)?;
    let manifest = qbundle::Manifest {
        compatible: release.compatible.clone(),
        version: release.version.clone(),
        security_epoch: release.security_epoch,
        build_id: release.build_id.clone(),
        payloads: vec![
            qbundle::Payload {
                kind: qbundle::PayloadKind::Boot,
                size: boot_size,
                blake3: boot_hash,
            },
            qbundle::Payload {
                kind: qbundle::PayloadKind::Root,
                size: root_size,
                blake3: root_hash,
            },
        ],
        root_verity: qbundle::RootVerity {
            data_blocks: vinfo.data_blocks,
            data_block_size: vinfo.data_block_size,
            hash_block_size: vinfo.hash_block_size,
            hash_offset: vinfo.hash_offset,
            salt: vinfo.salt.clone(),
            root_hash: vinfo.root_hash,
        },
    };
    let tmp = out.with_extension("bundle.partial");
    let result = (|| -> Result<()> {
        let mut f = std::io::BufWriter::new(
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        qbundle::write_bundle(
            &mut f,
            &manifest,
            &signers,
            &[
                qbundle::PayloadSource {
                    kind: qbundle::PayloadKind::Boot,
                    path: boot.to_owned(),
                },
                qbundle::PayloadSource {
                    kind: qbundle::PayloadKind::Root,
                    path: root.to_owned(),
                },
            ],
        )?;
        f.into_inner()
            .map_err(|e| anyhow::anyhow!("flushing {}: {e}", tmp.display()))?
            .sync_all()?;
        fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `qimage bundle`: signs the slot built into `dir`, with the release
/// identity the build put into the image (so what the manifest says and
/// what the slot says when booted agree). The root image's verity root hash
/// is recomputed first, so a stale or altered `root.img` is never signed.
pub fn from_image_dir(dir: &Path, keys: &[PathBuf], out: Option<&Path>) -> Result<PathBuf> {
    let info_path = dir.join(IMAGE_INFO);
    let info = ImageInfo::load(&info_path).context("not a qimage build output")?;
    let release = Release {
        compatible: info.compatible,
        version: info.version,
        security_epoch: info.security_epoch,
        build_id: info.build_epoch.to_string(),
    };
    let verity_path = dir.join(ROOT_VERITY);
    let vinfo = verity::VerityInfo::from_text(
        &fs::read_to_string(&verity_path).with_context(|| format!("{}", verity_path.display()))?,
    )
    .with_context(|| format!("{}", verity_path.display()))?;
    let root = dir.join(ROOT_IMAGE);
    check_root_hash(&root, &vinfo)?;
    let out = out.map_or_else(
        || {
            dir.join(qcontract::paths::output::bundle_file(
                &info.name,
                &release.version,
            ))
        },
        Path::to_owned,
    );
    write_signed(&out, &release, &dir.join(BOOT_IMAGE), &root, &vinfo, keys)?;
    Ok(out)
}

fn check_root_hash(root: &Path, vinfo: &verity::VerityInfo) -> Result<()> {
    let mut params = verity::VerityParams::new(vinfo.salt.clone(), vinfo.uuid)?;
    params.data_block_size = vinfo.data_block_size;
    params.hash_block_size = vinfo.hash_block_size;
    let size = vinfo
        .data_blocks
        .checked_mul(u64::from(vinfo.data_block_size))
        .context("root.verity: data size overflows")?;
    let f = std::io::BufReader::new(
        fs::File::open(root).with_context(|| format!("opening {}", root.display()))?,
    );
    let actual = verity::compute_root_hash(f, size, &params)
        .with_context(|| format!("hashing {}", root.display()))?;
    if actual != vinfo.root_hash {
        bail!(
            "{}: verity root hash is {}, root.verity says {}: the image changed after the build",
            root.display(),
            hex::encode(actual),
            vinfo.root_hash_hex()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build output directory in miniature.
    fn slot_dir() -> (tempfile::TempDir, PathBuf, qbundle::PrivateKey) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("boot.img"), vec![0xB0; 8192]).unwrap();
        let root = d.join("root.img");
        fs::write(
            &root,
            (0..64 * 1024u32)
                .map(|i| (i % 249) as u8)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let vinfo = verity::append_tree(
            &root,
            &verity::VerityParams::new(vec![5; 32], [6; 16]).unwrap(),
        )
        .unwrap();
        fs::write(d.join(ROOT_VERITY), vinfo.to_text()).unwrap();
        fs::write(
            d.join(IMAGE_INFO),
            "name=t\nversion=1.2.3\ncompatible=c-x86_64\nkernel=k\nbuild_epoch=42\nproduction=false\nsecurity_epoch=7\nmax_epoch_step=100\n",
        )
        .unwrap();
        let key = qbundle::generate_keypair().unwrap();
        let key_path = d.join("k.key");
        key.store(&key_path).unwrap();
        (dir, key_path, key)
    }

    #[test]
    fn signs_a_built_slot_that_qupdate_would_accept() {
        let (dir, key_path, key) = slot_dir();
        let out = from_image_dir(dir.path(), &[key_path], None).unwrap();
        assert_eq!(out, dir.path().join("t-1.2.3.bundle"));
        let trust = qbundle::TrustStore::parse(
            Path::new("trust.toml"),
            &qbundle::TrustStore::render(&[key.public("k")], 1),
        )
        .unwrap();
        let mut f = fs::File::open(&out).unwrap();
        let v = qbundle::read_verified(&mut f, &trust).unwrap();
        assert_eq!(v.manifest.compatible, "c-x86_64");
        assert_eq!(
            (v.manifest.version.as_str(), v.manifest.security_epoch),
            ("1.2.3", 7)
        );
        assert_eq!(v.manifest.build_id, "42");
    }

    #[test]
    fn an_altered_root_or_a_missing_file_is_refused_and_nothing_is_written() {
        let (dir, key_path, _) = slot_dir();
        let root = dir.path().join("root.img");
        let mut bytes = fs::read(&root).unwrap();
        bytes[100] ^= 1;
        fs::write(&root, bytes).unwrap();
        let e = format!(
            "{:#}",
            from_image_dir(dir.path(), std::slice::from_ref(&key_path), None).unwrap_err()
        );
        assert!(e.contains("the image changed after the build"), "{e}");
        assert!(!dir.path().join("t-1.2.3.bundle").exists());
        assert!(!dir.path().join("t-1.2.3.bundle.partial").exists());

        fs::remove_file(dir.path().join(IMAGE_INFO)).unwrap();
        let e = format!(
            "{:#}",
            from_image_dir(dir.path(), &[key_path], None).unwrap_err()
        );
        assert!(
            e.contains("image.info") && e.contains("not a qimage build output"),
            "{e}"
        );
    }
}
