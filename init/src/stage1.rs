//! Stage 1, PID 1 in the initramfs: bring up the verified root and hand
//! over to stage 2 in it.

use std::ffi::CString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::mount::{mount_move, MountFlags};

use crate::blockdev::{self, BlockError};
use crate::cmdline::{Cmdline, CmdlineError};
use crate::dm::{self, DmError, Target};
use crate::modules::{self, ModuleError};
use crate::mounts::{self, MountError};
use crate::verity_params::{ParamsError, RootVerity};

pub const EARLY_MODULES: &str = "/etc/qinit/modules.early";
pub const ROOT_VERITY: &str = "/etc/qinit/root.verity";
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
    Block(#[from] BlockError),
    #[error("root verity parameters")]
    Params(#[from] ParamsError),
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

/// Runs stage 1; returns only on failure (success execs stage 2).
pub fn run(started: Instant) -> Result<std::convert::Infallible, (Stage1Error, Option<Cmdline>)> {
    let mut cmdline = None;
    let r = run_inner(started, &mut cmdline);
    r.map_err(|e| (e, cmdline))
}

fn run_inner(
    started: Instant,
    cmdline_out: &mut Option<Cmdline>,
) -> Result<std::convert::Infallible, Stage1Error> {
    mounts::mount_all(&mounts::early_specs())?;
    crate::kmsg::KmsgLogger::reopen();
    let text = std::fs::read_to_string("/proc/cmdline").map_err(Stage1Error::ReadCmdline)?;
    let cmdline = Cmdline::parse(&text)?;
    *cmdline_out = Some(cmdline.clone());
    log::info!("stage 1: slot {}", cmdline.slot);

    let n = modules::load_list(Path::new(EARLY_MODULES))?;
    log::info!("loaded {n} early modules");

    let sys = Path::new("/sys/class/block");
    let root_part = blockdev::wait_for(sys, cmdline.slot.root_name(), DEVICE_TIMEOUT)?;
    log::info!("root of slot {} is {}", cmdline.slot, root_part.kname);

    let params = RootVerity::load(Path::new(ROOT_VERITY))?;
    let control = dm::Control::open()?;
    let (major, minor) = control.create_readonly(
        "root",
        &[Target {
            start_sector: 0,
            sectors: params.data_sectors(),
            target_type: "verity".into(),
            params: params.table(&root_part.dev),
        }],
    )?;
    let root_dev = PathBuf::from(format!("/dev/dm-{minor}"));
    wait_for_node(&root_dev)?;
    log::info!(
        "verity root {major}:{minor} up, root hash {}",
        params.root_hash
    );

    if cmdline.verify_full {
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
    for m in ["/dev", "/proc", "/sys"] {
        let target = Path::new(NEW_ROOT).join(m.trim_start_matches('/'));
        mount_move(m, &target).map_err(Stage1Error::SwitchRoot)?;
    }
    let info = std::fs::read_to_string(crate::stage2::IMAGE_INFO).unwrap_or_default();
    let production = crate::stage2::image_field(&info, "production").as_deref() != Some("false");
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
    let found = blockdev::wait_for(
        Path::new("/sys/class/block"),
        "data",
        Duration::from_secs(2),
    );
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
