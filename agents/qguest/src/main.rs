//! `qguest`: PID 1 of the GUI VM stand-in (a PV guest of the Debian kernel
//! with only this in its initramfs).
//!
//! 1. Mounts /proc, /sys and /dev, and loads the kernel modules its
//!    initramfs lists (`qcontract::paths::GUEST_MODULES`: the Xen devices
//!    vchan runs over).
//! 2. Writes the readiness key `data/ready` under its own xenstore directory
//!    through /dev/xen/xenbus (the handshake qdomd waits for; see qdomd's
//!    `xs` module) and prints `QGUEST-READY domid=<id>` on its console.
//! 3. Syncs its QubesDB from dom0 (the [`vmdb`] module), prints its name
//!    from it and serves it to the VM's programs; as `qubesdb-read` (a
//!    link) it is the tool that reads it.
//! 4. Serves dom0's qrexec as a VM's agent does (the [`agent`] module),
//!    and takes the VM's own service calls on its trigger socket
//!    ([`trigger`]); as `qrexec-client-vm` (a link, or `--qrexec-client-vm`)
//!    it is the program that makes them ([`client_vm`]).
//! 5. Reaps orphans and waits. Xen's shutdown request (`xl shutdown`) makes
//!    the kernel run /sbin/poweroff, which is this same program: it syncs
//!    and powers the guest off. SIGTERM, SIGINT and SIGPWR to PID 1 do the
//!    same.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

mod agent;
mod client_vm;
mod threads;
mod trigger;
mod vmdb;

/// The key qdomd watches, relative to the guest's own directory.
const READY_KEY: &str = "data/ready";
/// The xenbus device may take a moment to appear after boot.
const XENBUS_WAIT: Duration = Duration::from_secs(60);

fn log(msg: &str) {
    // The console is the guest's only output; xenconsoled logs it in dom0.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "qguest: {msg}");
    let _ = out.flush();
}

fn mount_basics() {
    use rustix::mount::{mount, MountFlags};
    for (src, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(
            src,
            target,
            fstype,
            MountFlags::NOSUID | MountFlags::NOEXEC,
            None,
        ) {
            // devtmpfs may already be mounted by the kernel.
            if e != rustix::io::Errno::BUSY {
                log(&format!("mounting {target}: {e}"));
            }
        }
    }
}

/// Connects to xenstore (the xenbus device in a guest) and writes the
/// readiness key; returns the guest's domid.
fn announce_ready() -> Result<String, String> {
    let deadline = Instant::now() + XENBUS_WAIT;
    let mut xs = loop {
        match qxenstore::Xs::open() {
            Ok(xs) => break xs,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("opening xenstore: {e}")),
        }
    };
    let domid = xs
        .read_string("domid")
        .map_err(|e| format!("reading our domid: {e}"))?;
    let stamp = format!("qguest {}", env!("CARGO_PKG_VERSION"));
    xs.write(READY_KEY, stamp.as_bytes())
        .map_err(|e| format!("writing {READY_KEY}: {e}"))?;
    Ok(domid)
}

/// Loads the initramfs's modules in the order qimage resolved. A module
/// that fails is reported and the rest still load: readiness over xenbus
/// needs none of them.
fn load_modules() {
    let list = qcontract::paths::GUEST_MODULES;
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => return log(&format!("{list}: {e}")),
    };
    for path in qcontract::modules::parse_list(&text) {
        let res = std::fs::File::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|f| match rustix::system::finit_module(&f, c"", 0) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
                Err(e) => Err(e.to_string()),
            });
        if let Err(e) = res {
            log(&format!("loading module {}: {e}", path.display()));
        }
    }
}

/// Binds a local socket every process of the VM may use (the qrexec
/// trigger socket and QubesDB's, as in a Qubes VM), replacing a stale one.
fn bind_for_all(path: &str) -> Result<std::os::unix::net::UnixListener, String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{path}: {e}")),
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| format!("{path}: {e}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("{path}: {e}"))?;
    Ok(l)
}

fn power_off() -> ! {
    rustix::fs::sync();
    let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    // reboot(2) only returns on error; nothing else is left to do.
    std::process::exit(1)
}

/// The qrexec agent runs as a process of its own (`/init --qrexec-agent
/// <domid>`), as Qubes' does: it waits for the commands it starts itself,
/// which PID 1's reaping of orphans would otherwise take from it.
static AGENT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
const AGENT_FLAG: &str = "--qrexec-agent";

fn spawn_agent(domid: u16) {
    match std::process::Command::new("/proc/self/exe")
        .arg(AGENT_FLAG)
        .arg(domid.to_string())
        .spawn()
    {
        Ok(child) => AGENT.store(child.id(), std::sync::atomic::Ordering::SeqCst),
        Err(e) => log(&format!("starting the qrexec agent: {e}")),
    }
}

fn reap() {
    while let Ok(st) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        let pid = match st {
            WaitStatus::StillAlive => break,
            WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _) => pid,
            _ => continue,
        };
        let agent = AGENT.load(std::sync::atomic::Ordering::SeqCst);
        if u32::try_from(pid.as_raw()).is_ok_and(|p| p == agent) {
            log(&format!(
                "the qrexec agent ended ({st:?}); starting it again"
            ));
            std::thread::sleep(Duration::from_secs(1));
            if let Some(domid) = DOMID.get() {
                spawn_agent(*domid);
            }
        }
    }
}

const CLIENT_VM_FLAG: &str = "--qrexec-client-vm";

/// A process exit code as `ExitCode`: its low byte, as the kernel keeps
/// of any exit status (a service's -1 is 255).
fn exit_code(code: i32) -> ExitCode {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    ExitCode::from((code & 0xff) as u8)
}

static DOMID: std::sync::OnceLock<u16> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, domid] = args.as_slice() {
        if flag == AGENT_FLAG {
            return match domid.parse::<u16>() {
                Ok(own) => {
                    agent::run(own, log);
                    ExitCode::SUCCESS
                }
                Err(_) => ExitCode::from(2),
            };
        }
    }
    let argv0 = args.first().cloned().unwrap_or_default();
    // `qrexec-client-vm` is a link to this program in the guest.
    if argv0.ends_with("qrexec-client-vm") {
        return exit_code(client_vm::main(&args[1..]));
    }
    if argv0.ends_with("qubesdb-read") {
        return vmdb::read_tool(&args[1..]);
    }
    if args.get(1).map(String::as_str) == Some(CLIENT_VM_FLAG) {
        return exit_code(client_vm::main(&args[2..]));
    }
    if argv0.ends_with("poweroff") {
        // The kernel's orderly_poweroff() helper, run on `xl shutdown`. A
        // usermode helper has no stdout: say it on the console itself.
        if let Ok(mut k) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
            let _ = k.write_all(b"qguest: poweroff requested\n");
        }
        power_off();
    }
    if rustix::process::getpid().as_raw_nonzero().get() != 1 {
        eprintln!("qguest: this is the GUI VM stand-in's init; it runs as PID 1 only");
        return ExitCode::from(2);
    }
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPWR,
    ] {
        signals.add(s);
    }
    if let Err(e) = signals.thread_block() {
        log(&format!("blocking signals: {e}"));
    }
    mount_basics();
    load_modules();
    match announce_ready() {
        Ok(domid) => {
            log(&format!("ready\nQGUEST-READY domid={domid}"));
            match domid.trim().parse::<u16>() {
                Ok(own) => {
                    std::thread::spawn(move || vmdb::run(own, log));
                    let _ = DOMID.set(own);
                    spawn_agent(own);
                }
                Err(_) => log(&format!("our domid {domid:?} is not a number; no QubesDB")),
            }
        }
        Err(e) => log(&format!("could not announce readiness: {e}")),
    }
    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => reap(),
            Ok(s) => {
                log(&format!("{s}: powering off"));
                power_off();
            }
            Err(e) => {
                log(&format!("sigwait: {e}"));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
