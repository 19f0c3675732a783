//! The executor: one single-threaded event loop over a signalfd, a
//! timerfd, the control socket, the services' output pipes and their
//! notify sockets. It turns what happens into [`Event`]s for the
//! [`Units`] state machine and carries out the [`Action`]s it returns; no
//! decision about a unit is taken here. One reaper owns `waitid(P_ALL)`,
//! so no exit status is lost to another waiter; exits of reparented
//! orphans are reaped and logged.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{kill, killpg, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::output::{LineBuffer, RateLimit};
use super::units::{Action, Event, Exit, Probe, Probed, UnitId, Units};
use crate::control::{ControlError, Reply, Request, Shutdown};
use crate::services::{Readiness, Service};

const SIGNAL_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;
const CONTROL_TOKEN: u64 = u64::MAX - 2;
/// A unit's fds are registered as `index << 2 | kind`.
const KIND_OUTPUT: u64 = 1;
const KIND_NOTIFY: u64 = 2;

/// What the loop tells its owner.
pub trait Hooks {
    /// Every boot-critical service is ready (called once), with each
    /// unit's moments so far (the boot's timeline).
    fn all_critical_ready(&mut self, times: &[super::units::UnitTimes]);
    /// A boot-critical service cannot come up.
    fn critical_failed(&mut self, service: &str, reason: &str);
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("event loop setup: {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Paths the supervisor uses; tests point them into a temporary directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub notify_dir: PathBuf,
    pub control: PathBuf,
    pub xenstore: PathBuf,
}

/// A unit's fds: what the state machine knows nothing about.
#[derive(Debug)]
struct UnitIo {
    output: Option<(OwnedFd, LineBuffer)>,
    notify: Option<(UnixDatagram, PathBuf)>,
    limit: RateLimit,
}

/// What carrying out a batch of actions left for the caller.
#[derive(Debug, Default)]
struct Outcome {
    reply: Option<Result<Reply, ControlError>>,
    finished: Option<Shutdown>,
}

pub struct Supervisor {
    units: Units,
    io: Vec<UnitIo>,
    epoll: Epoll,
    sigfd: SignalFd,
    timer: TimerFd,
    control: Option<UnixListener>,
    kmsg: Option<std::fs::File>,
    paths: Paths,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("units", &self.units)
            .finish_non_exhaustive()
    }
}

/// The signals the loop handles; blocked so they arrive on the signalfd.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPWR,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    set
}

impl Supervisor {
    pub fn new(services: Vec<Service>, paths: Paths) -> Result<Self, SupervisorError> {
        let setup = |what| move |source| SupervisorError::Setup { what, source };
        let signals = handled_signals();
        signals.thread_block().map_err(setup("block signals"))?;
        let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(setup("signalfd"))?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(setup("timerfd"))?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(setup("epoll"))?;
        epoll
            .add(
                sigfd.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, SIGNAL_TOKEN),
            )
            .map_err(setup("epoll add signalfd"))?;
        epoll
            .add(
                timer.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TIMER_TOKEN),
            )
            .map_err(setup("epoll add timerfd"))?;
        std::fs::create_dir_all(&paths.notify_dir).map_err(|source| SupervisorError::Io {
            what: "create notify directory",
            path: paths.notify_dir.clone(),
            source,
        })?;
        let control = bind_control(&paths.control)?;
        epoll
            .add(
                control.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, CONTROL_TOKEN),
            )
            .map_err(setup("epoll add control socket"))?;
        let kmsg = crate::kmsg::open_kmsg();
        let now = Instant::now();
        let io = services
            .iter()
            .map(|_| UnitIo {
                output: None,
                notify: None,
                limit: RateLimit::new(now),
            })
            .collect();
        Ok(Self {
            units: Units::new(services),
            io,
            epoll,
            sigfd,
            timer,
            control: Some(control),
            kmsg,
            paths,
        })
    }

    /// Runs until a shutdown is requested and every service is stopped
    /// (in reverse dependency order), then returns what was asked for.
    pub fn run(&mut self, hooks: &mut dyn Hooks) -> Shutdown {
        let kind = loop {
            if let Some(kind) = self.feed(Event::Tick, hooks).finished {
                break kind;
            }
            let mut events = [EpollEvent::empty(); 16];
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => {
                    log::error!("epoll_wait: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    0
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    SIGNAL_TOKEN => self.on_signals(hooks),
                    TIMER_TOKEN => {
                        // Only wakes the loop; the next tick does the work.
                        let _ = self.timer.wait();
                    }
                    CONTROL_TOKEN => self.on_control(hooks),
                    token => self.on_fd(token, hooks),
                }
            }
        };
        // What the last services left behind.
        self.reap(hooks);
        kind
    }

    /// Hands one event to the state machine and carries out the actions,
    /// answering each spawn and probe at once.
    fn feed(&mut self, event: Event, hooks: &mut dyn Hooks) -> Outcome {
        let mut outcome = Outcome::default();
        let mut next = Some(event);
        while let Some(event) = next.take() {
            for action in self.units.handle(event, Instant::now()) {
                debug_assert!(next.is_none(), "a spawn or probe ends its batch");
                match action {
                    Action::Spawn(unit) => {
                        next = Some(match self.spawn(unit) {
                            Ok(pid) => Event::Spawned { unit, pid },
                            Err(e) => Event::SpawnFailed {
                                unit,
                                error: e.to_string(),
                            },
                        });
                    }
                    Action::Probe { unit, probe } => {
                        let answer = self.probe(&probe);
                        next = Some(Event::Probed { unit, answer });
                    }
                    Action::Signal { pid, signal, .. } => signal_service(pid, signal),
                    Action::Log(notice) => log::log!(notice.level(), "{notice}"),
                    Action::BootReady => hooks.all_critical_ready(&self.units.times()),
                    Action::BootFailed { service, reason } => {
                        hooks.critical_failed(&service, &reason.to_string());
                    }
                    Action::Reply(reply) => outcome.reply = Some(reply),
                    Action::CloseControl => self.control = None,
                    Action::Wake(at) => self.arm_timer(at),
                    Action::Finished(kind) => outcome.finished = Some(kind),
                }
            }
        }
        outcome
    }

    fn arm_timer(&self, at: Option<Instant>) {
        let result = match at {
            None => self.timer.unset(),
            Some(t) => {
                let d = t
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.timer.set(
                    Expiration::OneShot(TimeSpec::from_duration(d)),
                    TimerSetTimeFlags::empty(),
                )
            }
        };
        if let Err(e) = result {
            log::error!("timerfd: {e}");
        }
    }

    fn probe(&self, probe: &Probe) -> Probed {
        let ready = |yes| if yes { Probed::Ready } else { Probed::NotYet };
        match probe {
            Probe::Path(p) => ready(p.exists()),
            // xenstored's socket not there yet is "not ready yet", like a
            // missing path; any other failure is not ready either, but the
            // state machine logs it.
            Probe::Xenstore(key) => match xenstore_has(&self.paths.xenstore, key) {
                Ok(yes) => ready(yes),
                Err(qxenstore::XsError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    Probed::NotYet
                }
                Err(e) => Probed::Error(qcontract::error_chain(&e)),
            },
        }
    }

    fn spawn(&mut self, unit: UnitId) -> std::io::Result<Pid> {
        let index = unit.index() as u64;
        let svc = self.units.service(unit);
        let io = &mut self.io[unit.index()];
        let mut cmd = Command::new(&svc.exec[0]);
        cmd.args(&svc.exec[1..])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin")
            .env("HOME", "/root")
            .envs(&svc.env)
            .stdin(Stdio::null());
        if svc.ready == Readiness::Notify {
            let path = self.paths.notify_dir.join(format!("{}.sock", svc.name));
            let _ = std::fs::remove_file(&path);
            let sock = UnixDatagram::bind(&path)?;
            sock.set_nonblocking(true)?;
            self.epoll
                .add(
                    sock.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, (index << 2) | KIND_NOTIFY),
                )
                .map_err(std::io::Error::from)?;
            cmd.env("NOTIFY_SOCKET", &path);
            io.notify = Some((sock, path));
        }
        let tty = match &svc.tty {
            Some(t) => Some(std::fs::OpenOptions::new().read(true).write(true).open(t)?),
            None => None,
        };
        if let Some(t) = &tty {
            cmd.stdin(t.try_clone()?)
                .stdout(t.try_clone()?)
                .stderr(t.try_clone()?);
        } else {
            let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
            rustix::io::ioctl_fionbio(&r, true)?;
            let w2 = w.try_clone()?;
            cmd.stdout(Stdio::from(w)).stderr(Stdio::from(w2));
            self.epoll
                .add(
                    r.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, (index << 2) | KIND_OUTPUT),
                )
                .map_err(std::io::Error::from)?;
            io.output = Some((r, LineBuffer::default()));
        }
        let prepared = crate::confine::prepare(&svc.name, &svc.hardening, tty.is_some())?;
        // SAFETY: the closure runs in the forked child before exec and only
        // calls `Prepared::apply`, which makes async-signal-safe syscalls
        // on data computed before the fork.
        unsafe {
            cmd.pre_exec(move || prepared.apply());
        }
        let child = cmd.spawn();
        // The parent must not keep the pipe's write end, or EOF never comes.
        drop(cmd);
        let child = child?;
        let raw = i32::try_from(child.id()).map_err(|_| std::io::Error::other("pid overflow"))?;
        // `child` is dropped without waiting: the reaper owns every exit.
        Ok(Pid::from_raw(raw))
    }

    fn on_signals(&mut self, hooks: &mut dyn Hooks) {
        loop {
            match self.sigfd.read_signal() {
                Ok(Some(info)) => {
                    let Ok(signo) = i32::try_from(info.ssi_signo) else {
                        log::warn!("signalfd: signal number {} out of range", info.ssi_signo);
                        continue;
                    };
                    match Signal::try_from(signo) {
                        Ok(Signal::SIGCHLD) => self.reap(hooks),
                        // SIGINT is Ctrl-Alt-Del once CAD is disabled.
                        Ok(Signal::SIGTERM | Signal::SIGINT) => {
                            self.feed(Event::Shutdown(Shutdown::Reboot), hooks);
                        }
                        // SIGPWR: power button / UPS; SIGUSR2 as in systemd.
                        Ok(Signal::SIGPWR | Signal::SIGUSR2) => {
                            self.feed(Event::Shutdown(Shutdown::Poweroff), hooks);
                        }
                        Ok(s) => log::info!("ignoring {s}"),
                        Err(_) => log::warn!("signalfd: unknown signal {signo}"),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log::error!("signalfd read: {e}");
                    break;
                }
            }
        }
    }

    /// Reaps every exited child: services and orphans alike.
    fn reap(&mut self, hooks: &mut dyn Hooks) {
        loop {
            let (pid, exit) = match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig)),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waitid: {e}");
                    break;
                }
            };
            if let Some(unit) = self.units.by_pid(pid) {
                // Its last words come before the news of its exit.
                self.drain_output(unit, true);
                if let Some((sock, path)) = self.io[unit.index()].notify.take() {
                    let _ = self.epoll.delete(sock.as_fd());
                    let _ = std::fs::remove_file(path);
                }
            }
            self.feed(Event::Exited { pid, exit }, hooks);
        }
    }

    fn on_fd(&mut self, token: u64, hooks: &mut dyn Hooks) {
        let Some(unit) = usize::try_from(token >> 2)
            .ok()
            .and_then(|i| self.units.id(i))
        else {
            return;
        };
        match token & 3 {
            KIND_OUTPUT => self.drain_output(unit, false),
            KIND_NOTIFY => {
                let ready = self.read_notify(unit);
                if ready {
                    self.feed(Event::Notified { unit }, hooks);
                }
            }
            _ => {}
        }
    }

    /// Forwards complete lines of a service's output to the kernel log
    /// (the rest too at `eof`, when its process is gone).
    fn drain_output(&mut self, unit: UnitId, eof: bool) {
        let name = &self.units.service(unit).name;
        let io = &mut self.io[unit.index()];
        let Some((fd, buf)) = io.output.as_mut() else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let mut closed = false;
        loop {
            match rustix::io::read(&*fd, &mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => buf.push(&chunk[..n]),
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break,
            }
        }
        let now = Instant::now();
        for text in buf.lines(eof || closed) {
            let (ok, dropped) = io.limit.admit(now);
            if dropped > 0 {
                crate::kmsg::service_line(
                    &mut self.kmsg,
                    name,
                    &format!("({dropped} lines suppressed by the rate limit)"),
                );
            }
            if ok {
                crate::kmsg::service_line(&mut self.kmsg, name, &text);
            }
        }
        if closed {
            if let Some((fd, _)) = io.output.take() {
                let _ = self.epoll.delete(fd.as_fd());
            }
        }
    }

    /// Logs the datagrams' `STATUS=` lines; returns whether one said
    /// `READY=1`.
    fn read_notify(&mut self, unit: UnitId) -> bool {
        let mut buf = [0u8; 4096];
        let mut ready = false;
        if let Some((sock, _)) = &self.io[unit.index()].notify {
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]);
                for line in text.lines() {
                    if line == "READY=1" {
                        ready = true;
                    } else if let Some(status) = line.strip_prefix("STATUS=") {
                        log::info!("{}: {status}", self.units.service(unit).name);
                    }
                }
            }
        }
        ready
    }

    /// Accepts one control connection and answers it. Requests are tiny
    /// and the peer is root, so a short blocking read is acceptable here.
    fn on_control(&mut self, hooks: &mut dyn Hooks) {
        let Some(listener) = &self.control else {
            return;
        };
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        if let Err(e) = self.serve(stream, hooks) {
            log::warn!("control connection: {e}");
        }
    }

    fn serve(&mut self, mut stream: UnixStream, hooks: &mut dyn Hooks) -> std::io::Result<()> {
        let cred = getsockopt(&stream, PeerCredentials).map_err(std::io::Error::from)?;
        let answer = if cred.uid() != 0 {
            log::warn!("control: refused uid {} (pid {})", cred.uid(), cred.pid());
            Err(ControlError::PermissionDenied)
        } else {
            let mut line = String::new();
            let mut reader =
                BufReader::new(stream.try_clone()?).take(crate::control::MAX_REQUEST as u64);
            reader.read_line(&mut line)?;
            match Request::parse(&line) {
                Err(e) => Err(ControlError::from(e)),
                Ok(req) => self
                    .feed(Event::Control(req), hooks)
                    .reply
                    .expect("the state machine answers every control request"),
            }
        };
        stream.write_all(crate::control::render_answer(&answer).as_bytes())
    }
}

fn bind_control(path: &Path) -> Result<UnixListener, SupervisorError> {
    let io = |what| {
        let path = path.to_owned();
        move |source| SupervisorError::Io { what, path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create control directory"))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(io("bind control socket"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod control socket"))?;
    listener
        .set_nonblocking(true)
        .map_err(io("control socket non-blocking"))?;
    Ok(listener)
}

/// Signals a service's whole process group (services run in their own
/// session), falling back to the process alone.
fn signal_service(pid: Pid, sig: Signal) {
    if killpg(pid, sig).is_err() {
        let _ = kill(pid, sig);
    }
}

/// Whether `key` exists in the store behind xenstored's `socket`: one read
/// on a fresh connection, bounded by a short timeout so a wedged xenstored
/// cannot stall PID 1's loop.
fn xenstore_has(socket: &Path, key: &str) -> Result<bool, qxenstore::XsError> {
    let mut xs = qxenstore::Xs::open_socket(socket)?;
    xs.set_timeout(std::time::Duration::from_secs(1));
    Ok(xs.try_read(key)?.is_some())
}
