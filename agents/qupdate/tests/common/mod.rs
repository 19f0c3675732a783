//! The test world shared by the host tests: a small GPT disk like the
//! appliance's, with a FAT ESP holding grubenv, and bundles for it.

#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)] // test fixtures; each test file uses its own part

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::process::Command;

use grubenv::{BootState, Env, Slot};
use qbundle::{Manifest, Payload, PayloadKind, PayloadSource, PrivateKey, RootVerity, TrustStore};
use qupdate::Config;

pub const COMPATIBLE: &str = "qubes-dom0-appliance-x86_64";

pub struct World {
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    pub key: PrivateKey,
}

fn run(cmd: &mut Command) {
    let st = cmd
        .status()
        .expect("dosfstools and mtools are needed: apt-get install dosfstools mtools");
    assert!(st.success(), "{cmd:?}");
}

/// A disk like the appliance's, small: GPT, FAT32 ESP with both grubenv
/// copies in their initial state (A good), slot A filled with a known pattern.
pub fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let esp = dir.path().join("esp.img");
    run(Command::new("mkfs.vfat")
        .args(["-C", "-F", "32"])
        .arg(&esp)
        .arg("40960"));
    let env_file = dir.path().join("grubenv");
    let mut env = Env::new();
    BootState::initial().apply_to(&mut env).unwrap();
    env.store_new(&env_file).unwrap();
    for d in ["::/EFI", "::/EFI/BOOT"] {
        run(Command::new("mmd")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&esp)
            .arg(d));
    }
    for copy in 0..grubenv::COPIES.len() {
        run(Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&esp)
            .arg(&env_file)
            .arg(format!("::{}", grubenv::copy_path(copy))));
    }
    let mib = 1u64 << 20;
    let layout = qgpt::Layout::new()
        .add("esp", qgpt::Guid::ESP, 40 * mib)
        .add("boot_a", qgpt::Guid::XBOOTLDR, 2 * mib)
        .add("root_a", qgpt::Guid::ROOT_X86_64, 4 * mib)
        .add("boot_b", qgpt::Guid::XBOOTLDR, 2 * mib)
        .add("root_b", qgpt::Guid::ROOT_X86_64, 4 * mib)
        .add("data", qgpt::Guid::LINUX_DATA, mib);
    let table = layout
        .plan(qgpt::Guid::derive("t", "disk"), |n| {
            qgpt::Guid::derive("t", n)
        })
        .unwrap();
    let disk = dir.path().join("disk.img");
    let mut f = std::fs::File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    qgpt::write_tables(&mut f, &table).unwrap();
    let espp = table.find("esp").unwrap();
    f.seek(SeekFrom::Start(espp.offset())).unwrap();
    f.write_all(&std::fs::read(&esp).unwrap()).unwrap();
    for name in ["boot_a", "root_a"] {
        let p = table.find(name).unwrap();
        f.seek(SeekFrom::Start(p.offset())).unwrap();
        f.write_all(&vec![0xA5u8; p.size() as usize]).unwrap();
    }
    let key = qbundle::generate_keypair().unwrap();
    let trust = TrustStore::render(&[key.public("test")], 1);
    std::fs::write(dir.path().join("trust.toml"), trust).unwrap();
    World { dir, disk, key }
}

impl World {
    /// The system booted from `booted`: its image info is what the slot
    /// holds, as a running root would say: the world's original image
    /// (0.1.0, epoch 1), or the bundle last installed there.
    pub fn cfg(&self, booted: Slot) -> Config {
        let state = self.dir.path().join("state/state.json");
        let installed = qupdate::state::State::load(&state)
            .unwrap()
            .slots
            .get(&booted)
            .map(|i| (i.version.clone(), i.security_epoch));
        let (image_version, image_epoch) = installed.unwrap_or_else(|| ("0.1.0".into(), 1));
        Config {
            disk: self.disk.clone(),
            trust: self.dir.path().join("trust.toml"),
            state,
            compatible: COMPATIBLE.into(),
            booted,
            image_version,
            image_epoch,
            max_epoch_step: 10,
            lock_wait: std::time::Duration::from_millis(300),
        }
    }

    pub fn part(&self, name: &str) -> Vec<u8> {
        let mut f = std::fs::File::open(&self.disk).unwrap();
        let t = qgpt::read(&mut f).unwrap();
        let p = t.find(name).unwrap();
        let mut buf = vec![0u8; p.size() as usize];
        f.seek(SeekFrom::Start(p.offset())).unwrap();
        f.read_exact(&mut buf).unwrap();
        buf
    }

    pub fn boot_state(&self) -> BootState {
        let mut d = qupdate::disk::Disk::open(&self.disk).unwrap();
        qupdate::bootenv::load(&mut d).unwrap().1
    }

    pub fn store_boot_state(&self, s: &BootState) {
        let mut d = qupdate::disk::Disk::open(&self.disk).unwrap();
        let (mut env, _) = qupdate::bootenv::load(&mut d).unwrap();
        qupdate::bootenv::store(&mut d, &mut env, s).unwrap();
    }

    /// A bundle: a boot payload and a root payload with a real verity tree.
    pub fn bundle(&self, signers: &[&PrivateKey], edit: impl FnOnce(&mut Manifest)) -> Vec<u8> {
        self.bundle_parts(signers, 0, edit).bundle
    }

    /// A bundle whose payload bytes depend on `salt` (two releases differ),
    /// with the payloads as they must land on the disk.
    pub fn bundle_parts(
        &self,
        signers: &[&PrivateKey],
        salt: u32,
        edit: impl FnOnce(&mut Manifest),
    ) -> Parts {
        let d = self.dir.path();
        let boot = d.join("b.img");
        let root = d.join("r.img");
        std::fs::write(
            &boot,
            (0..1_000_000u32)
                .map(|i| ((i + salt) % 251) as u8)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        std::fs::write(
            &root,
            (0..2 * 1024 * 1024u32)
                .map(|i| ((i + salt) % 253) as u8)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let info = verity::append_tree(
            &root,
            &verity::VerityParams::new(vec![3; 32], [4; 16]).unwrap(),
        )
        .unwrap();
        let (bs, bh) = qbundle::hash_file(&boot).unwrap();
        let (rs, rh) = qbundle::hash_file(&root).unwrap();
        let mut m = Manifest {
            compatible: COMPATIBLE.into(),
            version: "0.2.0".into(),
            security_epoch: 5,
            build_id: "b2".into(),
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
                data_blocks: info.data_blocks,
                data_block_size: info.data_block_size,
                hash_block_size: info.hash_block_size,
                hash_offset: info.hash_offset,
                salt: info.salt.clone(),
                root_hash: info.root_hash,
            },
        };
        edit(&mut m);
        let mut out = Vec::new();
        qbundle::write_bundle(
            &mut out,
            &m,
            signers,
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
        Parts {
            boot: std::fs::read(d.join("b.img")).unwrap(),
            root: std::fs::read(d.join("r.img")).unwrap(),
            bundle: out,
        }
    }
}

/// A bundle and the payloads it carries.
pub struct Parts {
    pub bundle: Vec<u8>,
    pub boot: Vec<u8>,
    pub root: Vec<u8>,
}
