//! The disk the slots live on: its GPT names the partitions (a contract:
//! `esp`, `boot_a`, `root_a`, `boot_b`, `root_b`, `data`), so the updater
//! addresses them by name and offset on one open disk, whether that is
//! `/dev/vda` in dom0 or a disk image file in host tests.

use std::fs::File;
use std::path::{Path, PathBuf};

use grubenv::Slot;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: cannot open")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: partition table")]
    Gpt {
        path: PathBuf,
        #[source]
        source: qgpt::Error,
    },
    #[error("{path}: no partition named `{name}` (or more than one)")]
    NoPartition { path: PathBuf, name: String },
    #[error("cannot find the disk holding partition `{0}` in /sys/class/block")]
    NoDisk(String),
}

/// A byte range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub offset: u64,
    pub size: u64,
}

/// An opened disk and the partitions the updater uses.
#[derive(Debug)]
pub struct Disk {
    pub path: PathBuf,
    pub file: File,
    pub esp: Part,
    boot: [Part; 2],
    root: [Part; 2],
}

fn idx(slot: Slot) -> usize {
    match slot {
        Slot::A => 0,
        Slot::B => 1,
    }
}

impl Disk {
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let mut file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?;
        let table = qgpt::read(&mut file).map_err(|source| DiskError::Gpt {
            path: path.to_owned(),
            source,
        })?;
        let part = |name: &str| -> Result<Part, DiskError> {
            let p = table.find(name).ok_or_else(|| DiskError::NoPartition {
                path: path.to_owned(),
                name: name.to_owned(),
            })?;
            Ok(Part {
                offset: p.offset(),
                size: p.size(),
            })
        };
        Ok(Self {
            path: path.to_owned(),
            esp: part("esp")?,
            boot: [part("boot_a")?, part("boot_b")?],
            root: [part("root_a")?, part("root_b")?],
            file,
        })
    }

    pub fn boot(&self, slot: Slot) -> Part {
        self.boot[idx(slot)]
    }

    pub fn root(&self, slot: Slot) -> Part {
        self.root[idx(slot)]
    }

    /// The partition a bundle payload of `kind` goes to in `slot`.
    pub fn payload_part(&self, slot: Slot, kind: qbundle::PayloadKind) -> Part {
        match kind {
            qbundle::PayloadKind::Boot => self.boot(slot),
            qbundle::PayloadKind::Root => self.root(slot),
        }
    }
}

/// The whole-disk device holding the partition named `partname`, found
/// through sysfs (`/sys/class/block/<part>` is a child of its disk).
pub fn disk_of(partname: &str) -> Result<PathBuf, DiskError> {
    let rd =
        std::fs::read_dir("/sys/class/block").map_err(|_| DiskError::NoDisk(partname.into()))?;
    for e in rd.flatten() {
        let uevent = std::fs::read_to_string(e.path().join("uevent")).unwrap_or_default();
        if !uevent.lines().any(|l| l == format!("PARTNAME={partname}")) {
            continue;
        }
        let real =
            std::fs::canonicalize(e.path()).map_err(|_| DiskError::NoDisk(partname.into()))?;
        let disk = real
            .parent()
            .and_then(|p| p.file_name())
            .ok_or_else(|| DiskError::NoDisk(partname.into()))?;
        return Ok(Path::new("/dev").join(disk));
    }
    Err(DiskError::NoDisk(partname.into()))
}
