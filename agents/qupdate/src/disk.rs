//! The disk the slots live on: its GPT names the partitions
//! ([`qcontract::Partition`]), so the updater
//! addresses them by name and offset on one open disk, whether that is
//! `/dev/vda` in dom0 or a disk image file in host tests.

use std::fs::File;
use std::path::{Path, PathBuf};

use qcontract::{Partition, Slot};

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
    NoPartition { path: PathBuf, name: &'static str },
    #[error("finding the disk that holds the slots")]
    NoDisk(#[from] qcontract::partition::LookupError),
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
        let part = |p: Partition| -> Result<Part, DiskError> {
            let entry = table.find(p.name()).ok_or(DiskError::NoPartition {
                path: path.to_owned(),
                name: p.name(),
            })?;
            Ok(Part {
                offset: entry.offset(),
                size: entry.size(),
            })
        };
        let slots = |kind: fn(Slot) -> Partition| -> Result<[Part; 2], DiskError> {
            Ok([part(kind(Slot::A))?, part(kind(Slot::B))?])
        };
        Ok(Self {
            path: path.to_owned(),
            esp: part(Partition::Esp)?,
            boot: slots(Partition::Boot)?,
            root: slots(Partition::Root)?,
            file,
        })
    }

    pub fn boot(&self, slot: Slot) -> Part {
        self.boot[slot.index()]
    }

    pub fn root(&self, slot: Slot) -> Part {
        self.root[slot.index()]
    }

    /// The partition a bundle payload of `kind` goes to in `slot`.
    pub fn payload_part(&self, slot: Slot, kind: qbundle::PayloadKind) -> Part {
        match kind {
            qbundle::PayloadKind::Boot => self.boot(slot),
            qbundle::PayloadKind::Root => self.root(slot),
        }
    }
}

/// The whole-disk device holding partition `part`, found through sysfs;
/// two disks with a partition of that name are refused.
pub fn disk_of(part: Partition) -> Result<PathBuf, DiskError> {
    let sys = Path::new(qcontract::partition::SYS_CLASS_BLOCK);
    Ok(qcontract::partition::lookup(sys, part)?.disk()?)
}
