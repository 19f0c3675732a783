//! The disk the slots live on: its GPT names the partitions
//! ([`qcontract::Partition`]), so the updater
//! addresses them by name and offset on one open disk, whether that is
//! `/dev/vda` in dom0 or a disk image file in host tests.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

/// One thing the updater did to its disk or its state file, in the order
/// it did them: what a block layer (and, for the state file, the file
/// system) sees. The crash-consistency suite (`tests/crash.rs`) records
/// them under the real code path and replays every prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    /// `data` written at byte `offset` of the disk.
    Write { offset: u64, data: Vec<u8> },
    /// fsync of the disk: everything written before it is durable.
    Flush,
    /// The state file renamed into place with this content (its
    /// temporary file already synced); durable only at the next
    /// [`DiskOp::StateDurable`].
    StateReplaced(Vec<u8>),
    /// The state file's directory synced: the last rename is durable.
    StateDurable,
}

/// Where [`DiskOp`]s are recorded, when they are.
pub type Journal = Arc<Mutex<Vec<DiskOp>>>;

/// Appends `op` to `journal`, if there is one.
pub fn record(journal: Option<&Journal>, op: DiskOp) {
    if let Some(j) = journal {
        // A poisoned journal only means a test thread panicked already.
        j.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(op);
    }
}

/// The disk's file, with every write and fsync recorded in a [`Journal`]
/// when one is attached. Reads, writes and seeks go to the file either way.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    journal: Option<Journal>,
}

impl DiskFile {
    /// fsync, recorded as a barrier.
    pub fn sync_all(&self) -> std::io::Result<()> {
        self.file.sync_all()?;
        record(self.journal.as_ref(), DiskOp::Flush);
        Ok(())
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }
}

impl Read for DiskFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for DiskFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let offset = self.file.stream_position()?;
        let n = self.file.write(buf)?;
        if n > 0 {
            record(
                self.journal.as_ref(),
                DiskOp::Write {
                    offset,
                    data: buf[..n].to_vec(),
                },
            );
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Seek for DiskFile {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

impl AsFd for DiskFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// An opened disk and the partitions the updater uses.
#[derive(Debug)]
pub struct Disk {
    pub path: PathBuf,
    pub file: DiskFile,
    pub esp: Part,
    boot: [Part; 2],
    root: [Part; 2],
}

impl Disk {
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        Self::open_journaled(path, None)
    }

    /// Opens the disk with every write and fsync recorded in `journal`.
    pub fn open_journaled(path: &Path, journal: Option<Journal>) -> Result<Self, DiskError> {
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
            file: DiskFile { file, journal },
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
