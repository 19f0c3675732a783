//! Stage 1, PID 1 in the initramfs: bring up the verified root and hand
//! over to stage 2 in it.

use std::ffi::CString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::mount::{mount_move, MountFlags};

use qcontract::partition::{self, BlockDev, LookupError, SYS_CLASS_BLOCK};
use qcontract::{paths, Cmdline, CmdlineError, ImageInfo, OnFailure, Partition};
use verity::VerityInfo;

use crate::dm::{self, DmError, Target};
use crate::modules::{self, ModuleError};
use crate::mounts::{self, MountError};
use crate::timeline::{self, Stage1Recorder};

pub const NEW_ROOT: &str = "/newroot";
pub const STAGE2: &str = "/usr/sbin/qinit";
const DEVICE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("reading /proc/cmdline")]
    ReadCmdline(#[source] std::io::Error),
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error("early modules")]
    Modules(#[from] ModuleError),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("no partition named `{name}` appeared within {waited:?} (block devices seen: {seen})")]
    NoPartition {
        name: &'static str,
        waited: Duration,
        seen: String,
    },
    #[error("root verity parameters {}: cannot read", paths::ROOT_VERITY)]
    ReadParams(#[source] std::io::Error),
    #[error("root verity parameters {}", paths::ROOT_VERITY)]
    Params(#[source] verity::Error),
    #[error("dm-verity setup")]
    Dm(#[from] DmError),
    #[error(
        "verity: the root of slot {slot} is corrupt (read error at byte {offset} of {device})"
    )]
    Corrupt {
        slot: String,
        device: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("switch root")]
    SwitchRoot(#[source] rustix::io::Errno),
    #[error("exec {STAGE2}")]
    Exec(#[source] nix::errno::Errno),
}

/// Runs stage 1; returns only on failure (success execs stage 2), with
/// what the command line asks for then, if it got that far.
pub fn run(started: Instant) -> Result<std::convert::Infallible, (Stage1Error, Option<OnFailure>)> {
    let mut on_failure = None;
    let r = run_inner(started, &mut on_failure);
    r.map_err(|e| (e, on_failure))
}

fn run_inner(
    started: Instant,
    on_failure: &mut Option<OnFailure>,
) -> Result<std::convert::Infallible, Stage1Error> {
    // The steps on the kernel's clock, for the boot's timeline.
    let mut steps = Stage1Recorder::new(timeline::instant_ms(started));
    steps.step("kernel filesystems");
    mounts::mount_all(&mounts::early_specs())?;
    crate::kmsg::KmsgLogger::retry_open();
    let text = std::fs::read_to_string("/proc/cmdline").map_err(Stage1Error::ReadCmdline)?;
    let cmdline = Cmdline::parse(&text)?;
    *on_failure = Some(cmdline.on_failure);
    log::info!("stage 1: slot {}", cmdline.slot);
    for word in &cmdline.unknown {
        log::warn!("kernel command line: `{word}` is not a qinit switch; ignored");
    }

    steps.step("early modules");
    let n = modules::load_list(Path::new(paths::EARLY_MODULES))?;
    log::info!("loaded {n} early modules");

    steps.step("root partition");
    let root_part = wait_for_partition(Partition::Root(cmdline.slot), DEVICE_TIMEOUT)?;
    log::info!("root of slot {} is {}", cmdline.slot, root_part.kname);

    steps.step("dm-verity");
    let text = std::fs::read_to_string(paths::ROOT_VERITY).map_err(Stage1Error::ReadParams)?;
    let params = VerityInfo::from_text(&text).map_err(Stage1Error::Params)?;
    let control = dm::Control::open()?;
    let (major, minor) = control.create_readonly(
        "root",
        &[Target {
            start_sector: 0,
            sectors: params.data_sectors(),
            target_type: "verity".into(),
            params: params.kernel_table(&root_part.dev, &root_part.dev),
        }],
    )?;
    let root_dev = PathBuf::from(format!("/dev/dm-{minor}"));
    wait_for_node(&root_dev)?;
    log::info!(
        "verity root {major}:{minor} up, root hash {}",
        params.root_hash_hex()
    );

    if cmdline.verify_full {
        steps.step("read the whole root");
        let t = Instant::now();
        read_all(&root_dev).map_err(|(offset, source)| Stage1Error::Corrupt {
            slot: cmdline.slot.to_string(),
            device: root_dev.clone(),
            offset,
            source,
        })?;
        log::info!(
            "verified every block of the root in {} ms",
            t.elapsed().as_millis()
        );
    }

    steps.step("mount root, /var, /run, /tmp");
    let ro = MountFlags::RDONLY | MountFlags::NODEV;
    mounts::mount_one(
        &root_dev.to_string_lossy(),
        Path::new(NEW_ROOT),
        "squashfs",
        ro,
        "",
    )?;
    mount_data(&cmdline)?;
    let tmp = MountFlags::NOSUID | MountFlags::NODEV;
    mounts::mount_one(
        "tmpfs",
        &Path::new(NEW_ROOT).join("run"),
        "tmpfs",
        tmp,
        "mode=0755",
    )?;
    mounts::mount_one(
        "tmpfs",
        &Path::new(NEW_ROOT).join("tmp"),
        "tmpfs",
        tmp,
        "mode=1777",
    )?;
    // Stage 2 finds the steps in the new root's /run; without them it
    // still boots, its timeline just starts later.
    let stage1 = steps.finish();
    let left = Path::new(NEW_ROOT).join(paths::STAGE1_TIMELINE.trim_start_matches('/'));
    if let Err(e) = timeline::store(&left, &stage1) {
        log::warn!("stage 1's timeline: {}", qcontract::error_chain(&e));
    }
    for m in ["/dev", "/proc", "/sys"] {
        let target = Path::new(NEW_ROOT).join(m.trim_start_matches('/'));
        mount_move(m, &target).map_err(Stage1Error::SwitchRoot)?;
    }
    // The initramfs's copy: the same image as the root's.
    let production = is_production(Path::new(paths::IMAGE_INFO));
    let other_init = match &cmdline.init {
        Some(init) if !production => Some(init.clone()),
        Some(init) => {
            log::warn!("qinit.init={init} ignored: production image");
            None
        }
        None => None,
    };
    switch_root(started, other_init)
}

/// The data partition holds /var. If it is missing or unreadable dom0
/// still comes up, on a tmpfs /var, and says so loudly.
fn mount_data(cmdline: &Cmdline) -> Result<(), Stage1Error> {
    let target = Path::new(NEW_ROOT).join("var");
    let flags = MountFlags::NOSUID | MountFlags::NODEV;
    let found = wait_for_partition(Partition::Data, Duration::from_secs(2));
    let mounted = match found {
        Ok(d) => match mounts::mount_one(&d.node().to_string_lossy(), &target, "ext4", flags, "") {
            Ok(()) => true,
            Err(e) => {
                log::error!(
                    "data partition {}: {e}: /var is volatile this boot",
                    d.kname
                );
                false
            }
        },
        Err(e) => {
            log::error!("{e}: /var is volatile this boot");
            false
        }
    };
    if !mounted {
        let _ = cmdline;
        mounts::mount_one("tmpfs", &target, "tmpfs", flags, "mode=0755")?;
    }
    Ok(())
}

/// Whether the image at hand is a production one, failing closed (see
/// [`image_info`]).
pub fn is_production(info: &Path) -> bool {
    image_info(info).is_none_or(|i| i.production)
}

/// The image info at `path`, or `None` after saying why it cannot be
/// read. Both stages then treat the image as a production one: no debug
/// switches, nothing on a terminal.
pub fn image_info(path: &Path) -> Option<ImageInfo> {
    ImageInfo::load(path)
        .inspect_err(|e| {
            log::error!(
                "{}: treating the image as a production one",
                qcontract::error_chain(e)
            );
        })
        .ok()
}

/// Waits until the partition `part` shows up (disk drivers probe
/// asynchronously after their module loads); two of that name are
/// refused at once.
fn wait_for_partition(part: Partition, timeout: Duration) -> Result<BlockDev, Stage1Error> {
    let sys = Path::new(SYS_CLASS_BLOCK);
    let start = Instant::now();
    loop {
        let devs = partition::scan(sys);
        if let Some(d) = partition::find(&devs, part.name())? {
            return Ok(d);
        }
        if start.elapsed() >= timeout {
            return Err(Stage1Error::NoPartition {
                name: part.name(),
                waited: timeout,
                seen: partition::describe(&devs),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_node(path: &Path) -> Result<(), Stage1Error> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > Duration::from_secs(5) {
            return Err(Stage1Error::Io {
                what: format!("{} did not appear", path.display()),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Reads the whole device; dm-verity fails the read of any block whose
/// hash does not match.
fn read_all(dev: &Path) -> Result<u64, (u64, std::io::Error)> {
    let mut f = std::fs::File::open(dev).map_err(|e| (0, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((total, e)),
        }
    }
}

/// Makes /newroot the root and execs stage 2 in it. The initramfs stays
/// in memory (a few MiB); freeing it would mean deleting its files first.
fn switch_root(
    started: Instant,
    other_init: Option<String>,
) -> Result<std::convert::Infallible, Stage1Error> {
    rustix::process::chdir(NEW_ROOT).map_err(Stage1Error::SwitchRoot)?;
    rustix::mount::mount_move(".", "/").map_err(Stage1Error::SwitchRoot)?;
    rustix::process::chroot(".").map_err(Stage1Error::SwitchRoot)?;
    rustix::process::chdir("/").map_err(Stage1Error::SwitchRoot)?;
    if let Some(init) = other_init {
        log::info!("handing over to {init} (qinit.init)");
        let prog =
            CString::new(init).map_err(|_| Stage1Error::SwitchRoot(rustix::io::Errno::INVAL))?;
        let err = nix::unistd::execv(&prog, std::slice::from_ref(&prog))
            .err()
            .unwrap_or(nix::errno::Errno::UnknownErrno);
        return Err(Stage1Error::Exec(err));
    }
    let prog =
        CString::new(STAGE2).map_err(|_| Stage1Error::SwitchRoot(rustix::io::Errno::INVAL))?;
    // Stage 2 reports time since stage 1 started, as the contract says.
    let since = CString::new(format!(
        "--started-ms-ago={}",
        started.elapsed().as_millis()
    ))
    .map_err(|_| Stage1Error::SwitchRoot(rustix::io::Errno::INVAL))?;
    let args = [prog.clone(), c"stage2".to_owned(), since];
    let err = nix::unistd::execv(&prog, &args)
        .err()
        .unwrap_or(nix::errno::Errno::UnknownErrno);
    Err(Stage1Error::Exec(err))
}
