//! Stage 2, PID 1 in the verified root: mount what Xen needs, load the
//! backend modules, supervise the services, announce readiness.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::mount::MountFlags;

use qcontract::{paths, Cmdline, OnFailure, Slot};

use crate::kmsg::marker;
use crate::mounts;
use crate::services;
use crate::supervisor::units::UnitTimes;
use crate::supervisor::{Hooks, Paths, Shutdown, Supervisor};
use crate::timeline::{self, ServiceSpan, Stage1, Timeline};

/// Set by the host integration tests; see [`run`].
pub const SANDBOX_ENV: &str = "QINIT_SANDBOX";

/// Directories on the volatile /run and the persistent /var that Xen's
/// daemons expect to exist.
const RUNTIME_DIRS: &[&str] = &[
    "/run/xen",
    "/run/xenstored",
    "/run/qinit",
    "/var/log/xen/console",
    "/var/lib/xen",
    "/var/lib/xenstored",
];

struct BootHooks {
    slot: Option<Slot>,
    version: String,
    started: Instant,
    offset: Duration,
    on_failure: OnFailure,
    /// Stage 1's steps, if it left them.
    stage1: Option<Stage1>,
    /// When the supervisor began.
    supervisor: Instant,
    /// Where the timeline goes.
    timeline: PathBuf,
}

impl BootHooks {
    /// The boot so far, on the kernel's clock, read once at `clock`
    /// (QINIT-READY).
    fn timeline(&self, times: &[UnitTimes], clock: timeline::Clock) -> Timeline {
        let ms = |t: Option<Instant>| t.map(|t| clock.ms(t));
        Timeline {
            stage1: self.stage1.clone(),
            stage2_ms: clock.ms(self.started),
            supervisor_ms: clock.ms(self.supervisor),
            services: times
                .iter()
                .map(|t| ServiceSpan {
                    name: t.name.clone(),
                    after: t.after.clone(),
                    boot_critical: t.boot_critical,
                    start_ms: ms(t.started),
                    ready_ms: ms(t.ready),
                    exit_ms: ms(t.exited),
                    restarts: t.restarts,
                })
                .collect(),
            ready_ms: clock.at(),
        }
    }
}

impl Hooks for BootHooks {
    fn all_critical_ready(&mut self, times: &[UnitTimes]) {
        let clock = timeline::Clock::now();
        let ms = (self.offset + self.started.elapsed()).as_millis();
        let slot = self
            .slot
            .map(|s| s.to_string())
            .unwrap_or_else(|| "?".into());
        marker(&format!(
            "QINIT-READY slot={slot} version={} ms={ms}",
            self.version
        ));
        // For the boot benchmark: the kernel's uptime at ready.
        if let Some(up) = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|u| u.split_whitespace().next().map(str::to_owned))
        {
            log::info!("ready at uptime={up}");
        }
        // For the boot benchmark and the notes: what PID 1 costs.
        if let Some(rss) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .map(str::to_owned)
            })
        {
            log::info!("memory: rss={}", rss.trim_start_matches("VmRSS:").trim());
        }
        // The boot as one picture (`qinit ctl analyze`); not writing it
        // takes nothing from the boot.
        let t = self.timeline(times, clock);
        match timeline::store(&self.timeline, &t) {
            Ok(()) => log::info!(
                "boot timeline in {} (qinit ctl analyze); the critical chain: {}",
                self.timeline.display(),
                t.critical_chain()
                    .iter()
                    .map(|l| format!("{} +{}ms", l.name, l.took_ms))
                    .collect::<Vec<_>>()
                    .join(" < ")
            ),
            Err(e) => log::warn!("boot timeline: {}", qcontract::error_chain(&e)),
        }
    }

    fn critical_failed(&mut self, service: &str, reason: &str) {
        marker(&format!("QINIT-FAILED reason=service {service}: {reason}"));
        match self.on_failure {
            OnFailure::Halt => log::error!("staying up for inspection (qinit.on_failure=halt)"),
            OnFailure::Reboot | OnFailure::Poweroff => {
                // Delivered through our own signalfd, so shutdown is orderly.
                let sig = if self.on_failure == OnFailure::Reboot {
                    nix::sys::signal::Signal::SIGTERM
                } else {
                    nix::sys::signal::Signal::SIGUSR2
                };
                // rustix has no safe raise; nix's is tgkill on ourselves.
                if let Err(e) = nix::sys::signal::raise(sig) {
                    log::error!("cannot raise {sig} to start the {:?}: {e}", self.on_failure);
                }
            }
        }
    }
}

/// Runs stage 2. As PID 1 it never returns: it reboots or powers off.
pub fn run(offset: Duration) -> ! {
    let started = Instant::now();
    // In a test sandbox (a fresh PID and mount namespace on a build host)
    // qinit is PID 1 but must not touch the host's mounts, modules or
    // files, and it leaves by exiting, which ends the namespace.
    let sandbox = std::env::var_os(SANDBOX_ENV).is_some();
    let pid1 = rustix::process::getpid().is_init() && !sandbox;
    if sandbox {
        log::info!("sandbox mode: no system setup");
    } else if pid1 {
        if let Err(e) = setup_system() {
            log::error!("system setup: {e}");
        }
    } else if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        log::warn!("cannot become a subreaper: {e}");
    }
    // Fail closed: an image whose info cannot be read is a production one.
    let info = crate::stage1::image_info(Path::new(paths::IMAGE_INFO));
    let version = info
        .as_ref()
        .map_or_else(|| "unknown".to_owned(), |i| i.version.clone());
    let production = info.as_ref().is_none_or(|i| i.production);
    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .ok()
        .and_then(|t| Cmdline::parse(&t).ok());
    let env_path = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| default.into())
    };
    // Stage 1 leaves its steps in /run; a stage 2 started any other way
    // has none.
    let stage1 = match timeline::load::<Stage1>(Path::new(paths::STAGE1_TIMELINE)) {
        Ok(s) => Some(s),
        Err(e) => {
            if !sandbox {
                log::warn!("stage 1's timeline: {}", qcontract::error_chain(&e));
            }
            None
        }
    };
    let mut hooks = BootHooks {
        slot: cmdline.as_ref().map(|c| c.slot),
        version,
        started,
        offset,
        on_failure: cmdline.as_ref().map_or(OnFailure::Reboot, |c| c.on_failure),
        stage1,
        supervisor: started,
        timeline: env_path("QINIT_TIMELINE", paths::BOOT_TIMELINE),
    };
    let dir = env_path("QINIT_SERVICE_DIR", paths::SERVICE_DIR);
    let mut set = services::load_dir(&dir);
    if production {
        // A production image has no shell: a service on a terminal is one.
        let (tty, rest): (Vec<_>, Vec<_>) = set.services.into_iter().partition(|s| s.tty.is_some());
        set.services = rest;
        for s in tty {
            log::error!(
                "service {} rejected: production images run nothing on a terminal",
                s.name
            );
        }
    } else if cmdline.as_ref().is_some_and(|c| c.debug) {
        match debug_shell() {
            Ok(s) if !set.services.iter().any(|x| x.tty == s.tty) => set.services.push(s),
            Ok(_) => {}
            Err(e) => log::error!("qinit.debug: {e}"),
        }
    }
    for (name, err) in &set.rejected {
        log::error!("service {name} rejected: {err}");
    }
    log::info!(
        "{} services loaded from {}",
        set.services.len(),
        dir.display()
    );
    let paths = Paths {
        notify_dir: env_path("QINIT_NOTIFY_DIR", paths::NOTIFY_DIR),
        control: env_path("QINIT_CONTROL", paths::CONTROL_SOCKET),
        xenstore: qxenstore::client::SOCKET.into(),
    };
    hooks.supervisor = Instant::now();
    let shutdown = match Supervisor::new(set.services, paths) {
        Ok(mut sup) => sup.run(&mut hooks),
        Err(e) => {
            marker(&format!("QINIT-FAILED reason=supervisor: {e}"));
            Shutdown::Reboot
        }
    };
    finish(shutdown, pid1)
}

/// The `qinit.debug` shell of non-production images: a root shell on the
/// hypervisor console, defined like any other service.
fn debug_shell() -> Result<services::Service, services::ServiceError> {
    services::parse(
        Path::new("/run/qinit/debug-shell.toml"),
        "description = \"qinit.debug shell\"\nexec = [\"/usr/bin/sh\", \"-i\"]\n\
         ready = \"started\"\nrestart = \"always\"\ntty = \"/dev/hvc0\"\n",
    )
}

fn setup_system() -> Result<(), Box<dyn std::error::Error>> {
    // Ctrl-Alt-Del becomes SIGINT to us instead of an immediate reboot.
    let _ = rustix::system::reboot(rustix::system::RebootCommand::CadOff);
    let nosuid = MountFlags::NOSUID | MountFlags::NOEXEC;
    mounts::mount_one(
        "devpts",
        Path::new("/dev/pts"),
        "devpts",
        nosuid,
        "gid=5,mode=620,ptmxmode=000",
    )?;
    mounts::mount_one(
        "tmpfs",
        Path::new("/dev/shm"),
        "tmpfs",
        nosuid | MountFlags::NODEV,
        "mode=1777",
    )?;
    // Services that ask for their own cgroup get one under qinit's subtree.
    match mounts::mount_one(
        "cgroup2",
        Path::new("/sys/fs/cgroup"),
        "cgroup2",
        nosuid | MountFlags::NODEV,
        "",
    ) {
        Ok(()) => std::fs::create_dir_all(crate::confine::CGROUP_ROOT)?,
        Err(e) => log::warn!("cgroup2: {e}"),
    }
    for d in RUNTIME_DIRS {
        std::fs::create_dir_all(d)?;
    }
    // Xen's tools use /var/run; /var is the data partition, so the link
    // may be missing on a freshly made one.
    let var_run = Path::new("/var/run");
    if var_run.symlink_metadata().is_err() {
        std::os::unix::fs::symlink("/run", var_run)?;
    }
    // Before any service: the bus and the agents take random bytes at
    // start, and must not wait for a slowly seeded pool.
    load_random_seed();
    let t = Instant::now();
    match crate::modules::load_list(Path::new(paths::DOM0_MODULES)) {
        Ok(n) => log::info!("loaded {n} dom0 modules in {} ms", t.elapsed().as_millis()),
        Err(e) => log::error!("dom0 modules: {e}"),
    }
    if Path::new("/proc/xen").exists() || Path::new("/sys/hypervisor/type").exists() {
        mounts::mount_one(
            "xenfs",
            Path::new("/proc/xen"),
            "xenfs",
            MountFlags::empty(),
            "",
        )?;
    } else {
        log::warn!("not running under Xen: xenfs not mounted");
    }
    Ok(())
}

/// Loads and refreshes the random seed on /var (see [`crate::seed`]).
fn load_random_seed() {
    let mut pool = crate::seed::Kernel {
        seed_file: Path::new(crate::seed::SEED_FILE),
    };
    match crate::seed::boot(&mut pool) {
        crate::seed::Loaded::None => {
            log::info!("random seed: none yet in {}", crate::seed::SEED_FILE);
        }
        crate::seed::Loaded::Mixed(why) => log::warn!("random seed: mixed in, not credited: {why}"),
        crate::seed::Loaded::Credited(bits) => {
            log::info!(
                "random seed: credited {bits} bits from {}",
                crate::seed::SEED_FILE
            );
        }
    }
}

/// Final steps after every service stopped.
fn finish(kind: Shutdown, pid1: bool) -> ! {
    if !pid1 {
        log::info!("shutdown ({kind:?}) requested; exiting (not PID 1)");
        // In a sandbox, what services left behind dies with the namespace.
        // kill(-1) only as the PID 1 of a namespace: anywhere else it
        // would reach every process the user may signal.
        if rustix::process::getpid().is_init() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-1),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::process::exit(0);
    }
    // Straight to the console: kernel log lines printed just before
    // reboot(2) can be lost with the console, and this one tells the lab
    // the shutdown was orderly.
    marker(&format!("qinit: shutdown: {kind:?}: services stopped"));
    // While /var is still mounted: the next boot starts from this pool.
    let mut pool = crate::seed::Kernel {
        seed_file: Path::new(crate::seed::SEED_FILE),
    };
    match crate::seed::save(&mut pool) {
        Ok(creditable) => log::info!("random seed: saved (creditable: {creditable})"),
        Err(e) => log::warn!("random seed: saving at shutdown: {e}"),
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-1),
        nix::sys::signal::Signal::SIGTERM,
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-1),
        nix::sys::signal::Signal::SIGKILL,
    );
    crate::power::sync_with_cap(Duration::from_secs(30));
    unmount_all();
    crate::power::sync_with_cap(Duration::from_secs(10));
    // Let the console drain before the machine goes away.
    std::thread::sleep(Duration::from_millis(300));
    crate::power::power(kind == Shutdown::Reboot)
}

/// Unmounts everything but the root and the kernel's API filesystems, in
/// reverse mount order; what stays busy is detached.
fn unmount_all() {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let keep = ["/", "/proc", "/sys", "/dev"];
    let points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| !keep.contains(mp))
        .map(str::to_owned)
        .collect();
    for mp in points.iter().rev() {
        if let Err(e) = rustix::mount::unmount(mp.as_str(), rustix::mount::UnmountFlags::empty()) {
            log::warn!("unmount {mp}: {e}; detaching");
            let _ = rustix::mount::unmount(mp.as_str(), rustix::mount::UnmountFlags::DETACH);
        }
    }
}
