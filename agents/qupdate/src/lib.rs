//! qupdate: signed A/B updates.
//!
//! `apply` verifies a bundle ([`qbundle`]) before anything is touched,
//! invalidates the inactive slot in the boot state, streams the payloads
//! into its partitions while hashing, syncs, reads everything back and
//! recomputes the blake3 hashes and the dm-verity root hash, and only then
//! makes the slot bootable with a number of tries and first in the order.
//! `mark_good` (qinit's boot-complete hook) marks the booted slot good and
//! only then raises the anti-rollback floor.
//!
//! Two locks beside the state file keep the operations apart without
//! starving anyone: the apply lock (one apply at a time, held for its
//! whole run) and the state lock (every read-modify-write of the boot
//! state and the state file, held for milliseconds). Mark-good, rollback
//! and status take only the state lock, so an apply that runs for minutes,
//! or a stalled one, never keeps the boot-complete hook waiting.

pub mod args;
pub mod backend;
pub mod bootenv;
pub mod client;
pub mod dbus;
pub mod disk;
pub mod service;
pub mod stall;
pub mod state;
pub mod status;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use qbundle::{BundleError, KeyError, PayloadKind, TrustStore};
use qcontract::Slot;
use serde::{Deserialize, Serialize};

use crate::bootenv::BootEnvError;
use crate::disk::{Disk, DiskError, Part};
use crate::state::{SlotInfo, State, StateError};
pub use crate::status::{SlotState, SlotStatus, Status};

pub const TRUST_STORE: &str = "/etc/qupdate/trust.toml";
pub const STATE_FILE: &str = "/var/lib/qupdate/state.json";
/// How long to wait for another updater to finish.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Tries a freshly installed slot gets before the boot loader gives up.
pub const DEFAULT_TRIES: u8 = 3;
/// The longest stall timeout an apply accepts, in seconds.
pub const MAX_STALL_SECS: u32 = 3600;

/// How one apply runs: what the caller chose, checked by [`ApplyOptions::check`]
/// before anything is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Tries the boot loader gives the new slot (1 to [`grubenv::MAX_TRIES`]).
    pub tries: u8,
    /// Install even though the booted slot is not marked good, which may
    /// overwrite the only slot proven to boot.
    pub force: bool,
    /// How long the bundle stream may go without a byte (1 s to
    /// [`MAX_STALL_SECS`]) before the apply ends.
    pub stall_timeout: std::time::Duration,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self {
            tries: DEFAULT_TRIES,
            force: false,
            stall_timeout: stall::STALL_TIMEOUT,
        }
    }
}

impl ApplyOptions {
    /// Refuses what the boot loader or the stream guard cannot honour.
    pub fn check(&self) -> Result<(), UpdateError> {
        if !(1..=grubenv::MAX_TRIES).contains(&self.tries) {
            return Err(UpdateError::Tries(self.tries));
        }
        let t = self.stall_timeout;
        if t < std::time::Duration::from_secs(1) || t.as_secs() > u64::from(MAX_STALL_SECS) {
            return Err(UpdateError::StallTimeout(t));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("bundle rejected")]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("boot state")]
    BootEnv(#[from] BootEnvError),
    #[error("updater state")]
    State(#[from] StateError),
    #[error("bundle is for `{found}`, this system is `{expected}`")]
    Incompatible { expected: String, found: String },
    #[error("tries {0}: must be 1 to {max}", max = grubenv::MAX_TRIES)]
    Tries(u8),
    #[error("stall timeout {0:?}: must be 1 s to {MAX_STALL_SECS} s")]
    StallTimeout(std::time::Duration),
    #[error(
        "the booted slot {booted} is not marked good yet, so slot {target} may be the only \
         slot proven to boot and installing would overwrite it; wait for mark-good, or pass --force"
    )]
    BootedNotGood { booted: Slot, target: Slot },
    #[error("bundle security epoch {epoch} is below the installed floor {floor} (a downgrade)")]
    BelowFloor { epoch: u64, floor: u64 },
    #[error(
        "slot {0}'s security epoch is not recorded, so a rollback to it could go below the floor"
    )]
    UnknownEpoch(Slot),
    #[error("slot {slot} has security epoch {epoch}, below the floor {floor}: rolling back to it is a downgrade")]
    RollbackBelowFloor { slot: Slot, epoch: u64, floor: u64 },
    #[error(
        "bundle version {version} is older than the running {running} of the same security \
         epoch {epoch} (a downgrade)"
    )]
    OlderInEpoch {
        version: String,
        running: String,
        epoch: u64,
    },
    #[error("{whose} version")]
    Version {
        whose: &'static str,
        #[source]
        source: qcontract::version::VersionError,
    },
    #[error(
        "bundle security epoch {epoch} is more than {step} above {base} (the floor or the running \
         image's epoch): once marked good it would lock later releases out"
    )]
    EpochJump { epoch: u64, base: u64, step: u64 },
    #[error("{kind:?} payload of {size} bytes does not fit partition of {partition} bytes")]
    TooBig {
        kind: PayloadKind,
        size: u64,
        partition: u64,
    },
    #[error("{what} on {disk}")]
    Io {
        what: &'static str,
        disk: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("locking {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the bundle's file type (fstat)")]
    StatBundle(#[source] std::io::Error),
    #[error("opening bundle {path}")]
    OpenBundle {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making slot {slot} bootable")]
    Activate {
        slot: Slot,
        #[source]
        source: grubenv::Error,
    },
    #[error("read-back of the {kind:?} partition: blake3 {actual}, the bundle says {expected}")]
    ReadBack {
        kind: PayloadKind,
        expected: String,
        actual: String,
    },
    #[error(
        "read-back: the written root's verity root hash is {actual}, the bundle says {expected}"
    )]
    VerityMismatch { expected: String, actual: String },
    #[error("verity")]
    Verity(#[from] verity::Error),
    #[error("slot {0} is not good; nothing to roll back to")]
    NotGood(Slot),
    #[error("the bundle has no root payload to verify")]
    NoRootPayload,
    #[error("/proc/cmdline: cannot read")]
    ReadCmdline(#[source] std::io::Error),
    #[error(transparent)]
    Cmdline(#[from] qcontract::CmdlineError),
    #[error("this system's image")]
    ImageInfo(#[from] qcontract::InfoError),
    #[error("{0}")]
    Usage(String),
    #[error("another qupdate holds {0}; try again when it is done")]
    Busy(PathBuf),
}

/// Everything the updater needs to know about the system it runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub disk: PathBuf,
    pub trust: PathBuf,
    pub state: PathBuf,
    pub compatible: String,
    pub booted: Slot,
    pub image_version: String,
    pub image_epoch: u64,
    /// How far above the floor (or the running image's epoch, if higher) a
    /// bundle's epoch may be (the image info's `max_epoch_step`).
    pub max_epoch_step: u64,
    /// How long to wait for another updater ([`LOCK_WAIT`] by default).
    pub lock_wait: std::time::Duration,
}

impl Config {
    /// The running dom0: slot from the kernel command line, identity from
    /// /etc/qinit/image, the disk that holds the slots from sysfs. Each
    /// must read and parse: the updater never guesses its floor or its
    /// compatibility.
    pub fn from_system() -> Result<Self, UpdateError> {
        let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(UpdateError::ReadCmdline)?;
        let booted = qcontract::Cmdline::parse(&cmdline)?.slot;
        let info = qcontract::ImageInfo::load(Path::new(qcontract::paths::IMAGE_INFO))?;
        Ok(Self {
            disk: disk::disk_of(qcontract::Partition::Root(Slot::A))?,
            trust: TRUST_STORE.into(),
            state: STATE_FILE.into(),
            compatible: info.compatible,
            booted,
            image_version: info.version,
            image_epoch: info.security_epoch,
            max_epoch_step: info.max_epoch_step,
            lock_wait: LOCK_WAIT,
        })
    }
}

/// What an apply is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Streaming the payloads into the inactive slot.
    Write,
    /// Reading them back and checking hashes.
    Verify,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Verify => "verify",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "write" => Some(Self::Write),
            "verify" => Some(Self::Verify),
            _ => None,
        }
    }
}

/// Progress of an apply, for a bar or a D-Bus property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
}

impl Progress {
    /// How far the phase is, 0 to 100. Nothing to do (a total of 0 bytes)
    /// is done: 100. A `done` past `total` (from a confused peer: the
    /// client shows what the service sends) is 100 too, never more.
    pub fn percent(&self) -> u8 {
        // In u128, `done * 100` cannot overflow.
        let pct = (u128::from(self.done) * 100)
            .checked_div(u128::from(self.total))
            .unwrap_or(100)
            .min(100);
        u8::try_from(pct).expect("at most 100 after min(100)")
    }
}

/// The result of a successful apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The slot installed into, which boots next.
    pub slot: Slot,
    pub version: String,
    pub security_epoch: u64,
    pub signers: Vec<String>,
}

pub struct Updater {
    cfg: Config,
    disk: Disk,
}

/// Which of the updater's two locks (see the crate's documentation).
#[derive(Debug, Clone, Copy)]
enum Lock {
    Apply,
    State,
}

impl Lock {
    fn path(self, state: &Path) -> PathBuf {
        match self {
            Self::Apply => state.with_file_name("apply.lock"),
            Self::State => state.with_extension("lock"),
        }
    }
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Writes into one partition, never past its end.
struct PartWriter<'a> {
    file: &'a mut disk::DiskFile,
    part: Part,
    pos: u64,
}

impl Write for PartWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.part.size.saturating_sub(self.pos);
        if buf.len() as u64 > room {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "payload runs past the end of its partition",
            ));
        }
        self.file
            .seek(SeekFrom::Start(self.part.offset + self.pos))?;
        self.file.write_all(buf)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Hashes what passes through it and reports how far it got.
struct HashingReader<'a, R> {
    inner: R,
    hasher: blake3::Hasher,
    done: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.done += n as u64;
        (self.progress)(self.done);
        Ok(n)
    }
}

/// Reads `len` bytes of a partition from its start.
struct PartReader<'a> {
    file: &'a mut disk::DiskFile,
    part: Part,
    pos: u64,
    len: u64,
}

impl Read for PartReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        if left == 0 {
            return Ok(0);
        }
        // More left than a usize can count is more than `buf` holds.
        let n = usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()));
        self.file
            .seek(SeekFrom::Start(self.part.offset + self.pos))?;
        let got = self.file.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Updater {
    pub fn open(cfg: Config) -> Result<Self, UpdateError> {
        Self::open_journaled(cfg, None)
    }

    /// Opens the updater with every write and fsync of its disk, and every
    /// replacement of its state file, recorded in `journal` (the
    /// crash-consistency suite replays them).
    pub fn open_journaled(
        cfg: Config,
        journal: Option<disk::Journal>,
    ) -> Result<Self, UpdateError> {
        let disk = Disk::open_journaled(&cfg.disk, journal)?;
        Ok(Self { cfg, disk })
    }

    fn store_state(&self, state: &State) -> Result<(), StateError> {
        state.store_journaled(&self.cfg.state, self.disk.file.journal())
    }

    /// Takes one of the locks, waiting a while for its holder, but never
    /// forever: a stuck holder must be an error someone sees. Released
    /// when the returned file is dropped.
    fn lock(&self, which: Lock) -> Result<std::fs::File, UpdateError> {
        let path = which.path(&self.cfg.state);
        let lock_err = |source| UpdateError::Lock {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(lock_err)?;
        }
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(lock_err)?;
        let deadline = std::time::Instant::now() + self.cfg.lock_wait;
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(file),
                Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => return Err(UpdateError::Busy(path)),
                Err(e) => return Err(lock_err(e.into())),
            }
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> UpdateError {
        let disk = self.disk.path.clone();
        move |source| UpdateError::Io { what, disk, source }
    }

    /// Installs a bundle into the inactive slot. On any error the running
    /// slot stays the boot default and the target slot stays unbootable.
    /// The bundle is a file, a pipe or a block device: each read waits at
    /// most `opts.stall_timeout` for data. A file or a pipe must end where
    /// the bundle ends; a block device (a USB stick written with `dd`)
    /// holds whatever follows, and is read only up to the bundle's length.
    pub fn apply<R: Read + std::os::fd::AsFd>(
        &mut self,
        bundle: R,
        opts: &ApplyOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Applied, UpdateError> {
        let end = BundleEnd::of(bundle.as_fd()).map_err(UpdateError::StatBundle)?;
        let mut bundle = stall::StallGuard::new(bundle, opts.stall_timeout);
        let result = self.apply_inner(&mut bundle, end, opts, progress);
        let recorded = self.lock(Lock::State).and_then(|_held| {
            let mut state = State::load(&self.cfg.state)?;
            state.last_error = result.as_ref().err().map(|e| qcontract::error_chain(e));
            Ok(self.store_state(&state)?)
        });
        if let Err(e) = recorded {
            // The slot is written (or not) either way: the caller hears
            // the apply's own outcome, and this is logged beside it.
            log::error!(
                "recording the apply's outcome in {}: {}",
                self.cfg.state.display(),
                qcontract::error_chain(&e)
            );
        }
        result
    }

    fn apply_inner<R: Read>(
        &mut self,
        bundle: &mut R,
        end: BundleEnd,
        opts: &ApplyOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Applied, UpdateError> {
        opts.check()?;
        let _apply = self.lock(Lock::Apply)?;
        let target = self.cfg.booted.other();
        // Before a byte of the bundle is read: an install from a slot on
        // trial would write over the one slot known to boot.
        if !opts.force {
            let _held = self.lock(Lock::State)?;
            let (_, boot) = bootenv::load(&mut self.disk)?;
            if !boot.slot(self.cfg.booted).ok {
                return Err(UpdateError::BootedNotGood {
                    booted: self.cfg.booted,
                    target,
                });
            }
        }
        let trust = TrustStore::load(&self.cfg.trust)?;
        let verified = qbundle::read_verified(bundle, &trust)?;
        let m = &verified.manifest;
        if m.compatible != self.cfg.compatible {
            return Err(UpdateError::Incompatible {
                expected: self.cfg.compatible.clone(),
                found: m.compatible.clone(),
            });
        }
        for p in &m.payloads {
            let part = self.disk.payload_part(target, p.kind);
            if p.size > part.size {
                return Err(UpdateError::TooBig {
                    kind: p.kind,
                    size: p.size,
                    partition: part.size,
                });
            }
        }

        // From here on the target slot is touched: make it unbootable first,
        // so a power cut at any later point leaves the running slot the one
        // the boot loader picks. The floor is read under the same lock.
        {
            let _held = self.lock(Lock::State)?;
            let mut state = State::load(&self.cfg.state)?;
            if m.security_epoch < state.floor {
                return Err(UpdateError::BelowFloor {
                    epoch: m.security_epoch,
                    floor: state.floor,
                });
            }
            // Within one epoch, only the same or a newer version: an older
            // release of the same epoch is a downgrade the floor cannot
            // see. A version that does not parse cannot be ordered: refused.
            if m.security_epoch == self.cfg.image_epoch {
                let version = |text: &str, whose: &'static str| {
                    qcontract::version::Version::parse(text)
                        .map_err(|source| UpdateError::Version { whose, source })
                };
                let new = version(&m.version, "the bundle's")?;
                let running = version(&self.cfg.image_version, "the running image's")?;
                if new < running {
                    return Err(UpdateError::OlderInEpoch {
                        version: m.version.clone(),
                        running: self.cfg.image_version.clone(),
                        epoch: m.security_epoch,
                    });
                }
            }
            // Once this slot is marked good the floor becomes its epoch:
            // a jump too far would lock every later release out.
            let base = state.floor.max(self.cfg.image_epoch);
            if m.security_epoch.saturating_sub(base) > self.cfg.max_epoch_step {
                return Err(UpdateError::EpochJump {
                    epoch: m.security_epoch,
                    base,
                    step: self.cfg.max_epoch_step,
                });
            }
            let (mut env, mut boot) = bootenv::load(&mut self.disk)?;
            boot.invalidate(target);
            bootenv::store(&mut self.disk, &mut env, &boot)?;
            state.slots.remove(&target);
            self.store_state(&state)?;
        }

        let total: u64 = m.payloads.iter().map(|p| p.size).sum();
        let mut base = 0u64;
        for p in &m.payloads {
            let part = self.disk.payload_part(target, p.kind);
            let mut w = PartWriter {
                file: &mut self.disk.file,
                part,
                pos: 0,
            };
            qbundle::stream_payload(bundle, p, &mut w, &mut |done| {
                progress(Progress {
                    phase: Phase::Write,
                    done: base + done,
                    total,
                })
            })?;
            base += p.size;
        }
        if end == BundleEnd::Stream {
            qbundle::expect_end(bundle)?;
        }
        self.disk.file.sync_all().map_err(self.io("fsync"))?;

        // Read back what the disk now holds; only that counts. The cached
        // pages are dropped first, so the reads come from the device.
        for p in &m.payloads {
            let part = self.disk.payload_part(target, p.kind);
            rustix::fs::fadvise(
                &self.disk.file,
                part.offset,
                std::num::NonZeroU64::new(p.size),
                rustix::fs::Advice::DontNeed,
            )
            .map_err(|e| self.io("dropping cached pages before the read-back")(e.into()))?;
        }
        let v = &m.root_verity;
        let mut root_hash = None;
        let mut base = 0u64;
        let read_back = self.io("read back");
        let mut read_err = None;
        for p in &m.payloads {
            let part = self.disk.payload_part(target, p.kind);
            let mut report = |done| {
                progress(Progress {
                    phase: Phase::Verify,
                    done: base + done,
                    total,
                })
            };
            // Large reads underneath, whatever size the verity code asks for.
            let mut r = std::io::BufReader::with_capacity(
                1 << 20,
                HashingReader {
                    inner: PartReader {
                        file: &mut self.disk.file,
                        part,
                        pos: 0,
                        len: p.size,
                    },
                    hasher: blake3::Hasher::new(),
                    done: 0,
                    progress: &mut report,
                },
            );
            // One pass per partition: the root's verity tree is recomputed
            // from the same reads that feed blake3.
            if p.kind == PayloadKind::Root {
                let data_size = v.data_blocks * u64::from(v.data_block_size);
                let mut params = verity::VerityParams::new(v.salt.clone(), [0; 16])?;
                params.data_block_size = v.data_block_size;
                params.hash_block_size = v.hash_block_size;
                root_hash = Some(verity::compute_root_hash(&mut r, data_size, &params)?);
            }
            if let Err(e) = std::io::copy(&mut r, &mut std::io::sink()) {
                read_err = Some(e);
                break;
            }
            let actual = r.get_ref().hasher.finalize();
            if actual.as_bytes() != &p.blake3 {
                return Err(UpdateError::ReadBack {
                    kind: p.kind,
                    expected: hex::encode(p.blake3),
                    actual: actual.to_hex().to_string(),
                });
            }
            base += p.size;
        }
        if let Some(e) = read_err {
            return Err(read_back(e));
        }
        let root_hash = root_hash.ok_or(UpdateError::NoRootPayload)?;
        if root_hash != v.root_hash {
            return Err(UpdateError::VerityMismatch {
                expected: hex::encode(v.root_hash),
                actual: hex::encode(root_hash),
            });
        }

        // Verified: bootable, with tries, first in the order. Both records
        // are read afresh: a mark-good may have changed them meanwhile.
        let _held = self.lock(Lock::State)?;
        let (mut env, mut boot) = bootenv::load(&mut self.disk)?;
        boot.activate(target, opts.tries)
            .map_err(|source| UpdateError::Activate {
                slot: target,
                source,
            })?;
        bootenv::store(&mut self.disk, &mut env, &boot)?;
        let mut state = State::load(&self.cfg.state)?;
        state.slots.insert(
            target,
            SlotInfo {
                version: m.version.clone(),
                security_epoch: m.security_epoch,
                build_id: m.build_id.clone(),
                root_hash: hex::encode(v.root_hash),
            },
        );
        self.store_state(&state)?;
        Ok(Applied {
            slot: target,
            version: m.version.clone(),
            security_epoch: m.security_epoch,
            signers: verified.signers.clone(),
        })
    }

    fn booted_info(&self, state: &State) -> SlotInfo {
        state
            .slots
            .get(&self.cfg.booted)
            .cloned()
            .unwrap_or_else(|| SlotInfo {
                version: self.cfg.image_version.clone(),
                security_epoch: self.cfg.image_epoch,
                build_id: String::new(),
                root_hash: String::new(),
            })
    }

    /// The boot-complete hook: the booted slot is good; only now does the
    /// anti-rollback floor rise, to the epoch of the image that booted. That
    /// is the running root's own image info ([`Config::image_epoch`], from
    /// the verified root), not the updater's record on /var of what it
    /// installed, which whoever can write /var could have changed.
    pub fn mark_good(&mut self) -> Result<(), UpdateError> {
        let _held = self.lock(Lock::State)?;
        let booted = self.cfg.booted;
        let (mut env, mut boot) = bootenv::load(&mut self.disk)?;
        boot.mark_good(booted);
        bootenv::store(&mut self.disk, &mut env, &boot)?;
        let mut state = State::load(&self.cfg.state)?;
        let recorded = self.booted_info(&state);
        let info = SlotInfo {
            version: self.cfg.image_version.clone(),
            security_epoch: self.cfg.image_epoch,
            ..recorded
        };
        state.floor = state.floor.max(info.security_epoch);
        state.slots.insert(booted, info);
        self.store_state(&state)?;
        Ok(())
    }

    /// Makes the other slot the default, if it is good and not below the
    /// anti-rollback floor. Its epoch is the one recorded when it was
    /// installed or marked good; with no record it cannot be told, and
    /// the rollback is refused.
    pub fn rollback(&mut self) -> Result<Slot, UpdateError> {
        let _held = self.lock(Lock::State)?;
        let other = self.cfg.booted.other();
        let (mut env, mut boot) = bootenv::load(&mut self.disk)?;
        if !boot.slot(other).ok {
            return Err(UpdateError::NotGood(other));
        }
        let state = State::load(&self.cfg.state)?;
        let epoch = state
            .slots
            .get(&other)
            .map(|i| i.security_epoch)
            .ok_or(UpdateError::UnknownEpoch(other))?;
        if epoch < state.floor {
            return Err(UpdateError::RollbackBelowFloor {
                slot: other,
                epoch,
                floor: state.floor,
            });
        }
        boot.order = vec![other, self.cfg.booted];
        bootenv::store(&mut self.disk, &mut env, &boot)?;
        Ok(other)
    }

    pub fn status(&mut self) -> Result<Status, UpdateError> {
        let _held = self.lock(Lock::State)?;
        let (_, boot) = bootenv::load(&mut self.disk)?;
        let state = State::load(&self.cfg.state)?;
        let slots = Slot::ALL.map(|s| {
            let record = boot.slot(s);
            // The booted slot holds something even if no apply recorded it:
            // the image it was built with.
            let info = if s == self.cfg.booted {
                Some(self.booted_info(&state))
            } else {
                state.slots.get(&s).cloned()
            };
            SlotStatus {
                slot: s,
                state: SlotState::classify(record, info.is_some()),
                tries: record.tries,
                version: info.as_ref().map(|i| i.version.clone()),
                security_epoch: info.as_ref().map(|i| i.security_epoch),
                root_hash: info
                    .as_ref()
                    .map(|i| i.root_hash.clone())
                    .filter(|h| !h.is_empty()),
            }
        });
        Ok(Status {
            booted: self.cfg.booted,
            order: boot.order,
            floor: state.floor,
            slots,
            last_error: state.last_error,
        })
    }
}

/// Where a bundle source ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BundleEnd {
    /// A file or a pipe: the bundle is all of it, and a byte after the last
    /// payload is refused.
    Stream,
    /// A block device: the bundle is its start, and the rest of the device
    /// (padding, or an older, longer bundle) is never read.
    Device,
}

impl BundleEnd {
    fn of(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Self> {
        let st = rustix::fs::fstat(fd)?;
        Ok(match rustix::fs::FileType::from_raw_mode(st.st_mode) {
            rustix::fs::FileType::BlockDevice => Self::Device,
            _ => Self::Stream,
        })
    }
}

/// Convenience for callers that hold a path to a bundle file.
pub fn open_bundle(path: &Path) -> Result<std::fs::File, UpdateError> {
    std::fs::File::open(path).map_err(|source| UpdateError::OpenBundle {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An install's result as `apply --json` prints it and the service's
    /// `Completed` signal carries it.
    #[test]
    fn applied_json_is_the_contract() {
        let applied = Applied {
            slot: Slot::B,
            version: "0.2.0".into(),
            security_epoch: 5,
            signers: vec!["test".into()],
        };
        let text = r#"{"slot":"B","version":"0.2.0","security_epoch":5,"signers":["test"]}"#;
        assert_eq!(serde_json::to_string(&applied).unwrap(), text);
        assert_eq!(serde_json::from_str::<Applied>(text).unwrap(), applied);
    }

    #[test]
    fn percent_is_0_to_100_whatever_the_counts() {
        let half = u64::MAX / 2;
        // (done, total, percent)
        let cases = [
            (0, 10, 0),
            (1, 3, 33),
            (10, 10, 100),
            (0, 0, 100),
            (half, u64::MAX, 49),
            (u64::MAX, u64::MAX, 100),
            (11, 10, 100),
            (u64::MAX, 1, 100),
        ];
        for (done, total, expected) in cases {
            let p = Progress {
                phase: Phase::Write,
                done,
                total,
            };
            assert_eq!(p.percent(), expected, "{done} of {total}");
        }
    }

    #[test]
    fn a_missing_bundle_is_named() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("none.bundle");
        match open_bundle(&path).unwrap_err() {
            UpdateError::OpenBundle { path: p, source } => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            e => panic!("{e:?}"),
        }
    }
}
