//! The service supervisor: one single-threaded event loop over a signalfd,
//! a timerfd, the control socket, the services' output pipes and their
//! notify sockets. One reaper owns `waitid(P_ALL)`, so no exit status is
//! lost to another waiter; exits of reparented orphans are reaped and
//! logged.

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

use crate::control::{ControlError, Reply, Request, ServiceState, ServiceStatus};
use crate::services::{Readiness, RestartPolicy, Service};

const SIGNAL_TOKEN: u64 = u64::MAX;
const TIMER_TOKEN: u64 = u64::MAX - 1;
const CONTROL_TOKEN: u64 = u64::MAX - 2;
const KIND_OUTPUT: u64 = 1;
const KIND_NOTIFY: u64 = 2;
const PROBE_POLL: Duration = Duration::from_millis(20);
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const RESTART_LIMIT: u32 = 10;
const MAX_LINE: usize = 4096;
/// Log rate limit per service: a burst, then this many lines a second.
const LOG_BURST: f64 = 200.0;
const LOG_PER_SEC: f64 = 50.0;

/// Where a service is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Waiting for what it starts after.
    Waiting,
    /// Spawned, not ready yet.
    Starting,
    Ready,
    /// A oneshot that exited 0.
    Done,
    /// Waiting to be restarted.
    Backoff,
    Failed(String),
    /// Stopping (signal sent) or stopped by request.
    Stopped,
}

impl From<&State> for ServiceState {
    fn from(s: &State) -> Self {
        match s {
            State::Waiting => ServiceState::Waiting,
            State::Starting => ServiceState::Starting,
            State::Ready => ServiceState::Ready,
            State::Done => ServiceState::Done,
            State::Backoff => ServiceState::Backoff,
            State::Failed(r) => ServiceState::Failed(r.clone()),
            State::Stopped => ServiceState::Stopped,
        }
    }
}

/// A token bucket so a chatty or hostile service cannot flood the log.
#[derive(Debug)]
struct RateLimit {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl RateLimit {
    fn new() -> Self {
        Self {
            tokens: LOG_BURST,
            last: Instant::now(),
            suppressed: 0,
        }
    }

    /// Returns whether a line may be logged, and how many were dropped
    /// before it (to report once the limit lifts).
    fn admit(&mut self, now: Instant) -> (bool, u64) {
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * LOG_PER_SEC).min(LOG_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            (true, std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            (false, 0)
        }
    }
}

#[derive(Debug)]
struct Unit {
    svc: Service,
    state: State,
    pid: Option<Pid>,
    restarts: u32,
    started_at: Option<Instant>,
    ready_after: Option<Duration>,
    next_start: Option<Instant>,
    stop_deadline: Option<Instant>,
    /// Start again once the stop completes (a `restart` request).
    start_after_stop: bool,
    output: Option<(OwnedFd, Vec<u8>)>,
    notify: Option<(UnixDatagram, PathBuf)>,
    limit: RateLimit,
}

impl Unit {
    fn is_up(&self) -> bool {
        matches!(self.state, State::Ready | State::Done)
    }
}

/// What the loop tells its owner.
pub trait Hooks {
    /// Every boot-critical service is ready (called once).
    fn all_critical_ready(&mut self);
    /// A boot-critical service cannot come up.
    fn critical_failed(&mut self, service: &str, reason: &str);
}

/// Why the loop ended.
pub use crate::control::Shutdown;

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

pub struct Supervisor {
    units: Vec<Unit>,
    epoll: Epoll,
    sigfd: SignalFd,
    timer: TimerFd,
    control: Option<UnixListener>,
    kmsg: Option<std::fs::File>,
    paths: Paths,
    critical_announced: bool,
    critical_failed: bool,
    shutdown: Option<Shutdown>,
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
        let units = services
            .into_iter()
            .map(|svc| Unit {
                svc,
                state: State::Waiting,
                pid: None,
                restarts: 0,
                started_at: None,
                ready_after: None,
                next_start: None,
                stop_deadline: None,
                start_after_stop: false,
                output: None,
                notify: None,
                limit: RateLimit::new(),
            })
            .collect();
        Ok(Self {
            units,
            epoll,
            sigfd,
            timer,
            control: Some(control),
            kmsg,
            paths,
            critical_announced: false,
            critical_failed: false,
            shutdown: None,
        })
    }

    /// Every service's status, in start order.
    pub fn status(&self) -> Vec<ServiceStatus> {
        self.units
            .iter()
            .map(|u| ServiceStatus {
                name: u.svc.name.clone(),
                state: ServiceState::from(&u.state),
                pid: u.pid,
                restarts: u.restarts,
                ready_after: u.ready_after,
            })
            .collect()
    }

    /// Runs until a shutdown is requested, then stops every service in
    /// reverse dependency order and returns what was asked for.
    pub fn run(&mut self, hooks: &mut dyn Hooks) -> Shutdown {
        let kind = loop {
            self.schedule(hooks);
            if let Some(k) = self.shutdown {
                break k;
            }
            self.arm_timer();
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
                        let _ = self.timer.wait();
                    }
                    CONTROL_TOKEN => self.on_control(),
                    token => self.on_fd(token),
                }
            }
        };
        self.stop_all(hooks);
        kind
    }

    /// The next moment something time-driven must happen.
    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        for u in &self.units {
            match u.state {
                State::Starting => {
                    if matches!(u.svc.ready, Readiness::Path | Readiness::Xenstore) {
                        consider(now + PROBE_POLL);
                    }
                    if let Some(t) = u.started_at {
                        consider(t + Duration::from_millis(u.svc.ready_timeout_ms));
                    }
                }
                State::Backoff => {
                    if let Some(t) = u.next_start {
                        consider(t);
                    }
                }
                State::Stopped => {
                    if let Some(t) = u.stop_deadline {
                        consider(t);
                    }
                }
                _ => {}
            }
        }
        next
    }

    fn arm_timer(&self) {
        let result = match self.next_deadline() {
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

    /// Starts what can start, checks readiness probes and deadlines.
    fn schedule(&mut self, hooks: &mut dyn Hooks) {
        let now = Instant::now();
        for i in 0..self.units.len() {
            match self.units[i].state {
                State::Waiting => {
                    if self.units[i].svc.boot_complete && !self.critical_announced {
                        continue;
                    }
                    let after_up = self.units[i].svc.after.iter().all(|d| {
                        self.units
                            .iter()
                            .find(|u| u.svc.name == *d)
                            // An `after` on a service rejected at load is
                            // ordering only; `requires` was resolved then.
                            .is_none_or(Unit::is_up)
                    });
                    let failed_req = self.units[i]
                        .svc
                        .requires
                        .iter()
                        .find(|d| {
                            self.units
                                .iter()
                                .any(|u| u.svc.name == **d && matches!(u.state, State::Failed(_)))
                        })
                        .cloned();
                    if let Some(d) = failed_req {
                        self.fail(i, format!("required service {d} failed"), hooks);
                    } else if after_up {
                        self.spawn(i, hooks);
                    }
                }
                State::Backoff if self.units[i].next_start.is_some_and(|t| t <= now) => {
                    self.spawn(i, hooks);
                }
                State::Starting => self.probe(i, now, hooks),
                State::Stopped => {
                    let u = &mut self.units[i];
                    if let (Some(pid), Some(deadline)) = (u.pid, u.stop_deadline) {
                        if deadline <= now {
                            log::warn!(
                                "{}: not stopped after {} ms; killing",
                                u.svc.name,
                                u.svc.stop_timeout_ms
                            );
                            signal_service(pid, Signal::SIGKILL);
                            u.stop_deadline = None;
                        }
                    }
                }
                _ => {}
            }
        }
        if !self.critical_announced && !self.critical_failed {
            let all = self
                .units
                .iter()
                .filter(|u| u.svc.boot_critical)
                .all(Unit::is_up);
            if all {
                self.critical_announced = true;
                hooks.all_critical_ready();
                // Boot-complete hooks may start now.
                self.schedule(hooks);
            }
        }
    }

    fn probe(&mut self, i: usize, now: Instant, hooks: &mut dyn Hooks) {
        let u = &self.units[i];
        let ready =
            match u.svc.ready {
                Readiness::Path => u.svc.ready_path.as_deref().is_some_and(Path::exists),
                Readiness::Xenstore => u.svc.ready_key.as_deref().is_some_and(|k| {
                    crate::xenstore::exists(&self.paths.xenstore, k).unwrap_or(false)
                }),
                _ => false,
            };
        if ready {
            self.mark_ready(i);
            return;
        }
        let timeout = Duration::from_millis(u.svc.ready_timeout_ms);
        if u.started_at
            .is_some_and(|t| now.duration_since(t) > timeout)
        {
            let reason = format!("not ready within {} ms", u.svc.ready_timeout_ms);
            if let Some(pid) = u.pid {
                signal_service(pid, Signal::SIGKILL);
            }
            self.fail(i, reason, hooks);
        }
    }

    fn fail(&mut self, i: usize, reason: String, hooks: &mut dyn Hooks) {
        let u = &mut self.units[i];
        log::error!("{}: failed: {reason}", u.svc.name);
        u.state = State::Failed(reason.clone());
        if u.svc.boot_critical && !self.critical_announced && !self.critical_failed {
            self.critical_failed = true;
            hooks.critical_failed(&u.svc.name, &reason);
        }
    }

    fn mark_ready(&mut self, i: usize) {
        let u = &mut self.units[i];
        if u.state != State::Starting {
            return;
        }
        let after = u.started_at.map(|t| t.elapsed()).unwrap_or_default();
        u.ready_after = Some(after);
        u.state = State::Ready;
        log::info!("{}: ready after {} ms", u.svc.name, after.as_millis());
    }

    fn spawn(&mut self, i: usize, hooks: &mut dyn Hooks) {
        match self.try_spawn(i) {
            Ok(pid) => {
                let u = &mut self.units[i];
                log::info!("{}: started, pid {pid}", u.svc.name);
                u.pid = Some(pid);
                u.started_at = Some(Instant::now());
                u.state = State::Starting;
                if u.svc.ready == Readiness::Started {
                    self.mark_ready(i);
                }
            }
            Err(e) => {
                let reason = format!("cannot start {}: {e}", self.units[i].svc.exec[0]);
                self.fail(i, reason, hooks);
            }
        }
    }

    fn try_spawn(&mut self, i: usize) -> std::io::Result<Pid> {
        let index = i as u64;
        let svc = self.units[i].svc.clone();
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
            self.units[i].notify = Some((sock, path));
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
            self.units[i].output = Some((r, Vec::new()));
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
                    let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
                    match Signal::try_from(signo) {
                        Ok(Signal::SIGCHLD) => self.reap(hooks),
                        // SIGINT is Ctrl-Alt-Del once CAD is disabled.
                        Ok(Signal::SIGTERM | Signal::SIGINT) => {
                            self.shutdown.get_or_insert(Shutdown::Reboot);
                        }
                        // SIGPWR: power button / UPS; SIGUSR2 as in systemd.
                        Ok(Signal::SIGPWR | Signal::SIGUSR2) => {
                            self.shutdown.get_or_insert(Shutdown::Poweroff);
                        }
                        Ok(s) => log::info!("ignoring {s}"),
                        Err(_) => {}
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
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
                Ok(WaitStatus::Exited(pid, code)) => self.on_exit(pid, ExitKind::Code(code), hooks),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.on_exit(pid, ExitKind::Signal(sig), hooks)
                }
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waitid: {e}");
                    break;
                }
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, how: ExitKind, hooks: &mut dyn Hooks) {
        let Some(i) = self.units.iter().position(|u| u.pid == Some(pid)) else {
            log::info!("reaped orphan {pid} ({how})");
            return;
        };
        self.drain_output(i, true);
        let u = &mut self.units[i];
        u.pid = None;
        u.stop_deadline = None;
        if let Some((sock, path)) = u.notify.take() {
            let _ = self.epoll.delete(sock.as_fd());
            let _ = std::fs::remove_file(path);
        }
        let name = u.svc.name.clone();
        let success = how == ExitKind::Code(0);
        if u.state == State::Stopped {
            log::info!("{name}: stopped ({how})");
            if std::mem::take(&mut u.start_after_stop) {
                u.state = State::Waiting;
                u.restarts = 0;
            }
            return;
        }
        if u.svc.ready == Readiness::Exit && success {
            log::info!("{name}: completed");
            let after = u.started_at.map(|t| t.elapsed()).unwrap_or_default();
            u.ready_after = Some(after);
            u.state = State::Done;
            return;
        }
        log::warn!("{name}: exited ({how})");
        let restart = match u.svc.restart {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Always => true,
        };
        if restart && u.restarts < RESTART_LIMIT {
            let delay = backoff(u.restarts);
            u.restarts += 1;
            u.next_start = Some(Instant::now() + delay);
            u.state = State::Backoff;
            log::info!("{name}: restart {} in {} ms", u.restarts, delay.as_millis());
        } else {
            let reason = if restart {
                format!("restart limit ({RESTART_LIMIT}) reached; last exit {how}")
            } else {
                format!("exited ({how})")
            };
            self.fail(i, reason, hooks);
        }
    }

    fn on_fd(&mut self, token: u64) {
        let Ok(i) = usize::try_from(token >> 2) else {
            return;
        };
        if i >= self.units.len() {
            return;
        }
        match token & 3 {
            KIND_OUTPUT => self.drain_output(i, false),
            KIND_NOTIFY => self.read_notify(i),
            _ => {}
        }
    }

    /// Forwards complete lines of a service's output to the kernel log.
    fn drain_output(&mut self, i: usize, eof: bool) {
        let name = self.units[i].svc.name.clone();
        let unit = &mut self.units[i];
        let Some((fd, buf)) = unit.output.as_mut() else {
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
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break,
            }
        }
        let mut lines = Vec::new();
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            lines.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
        if buf.len() > MAX_LINE || ((eof || closed) && !buf.is_empty()) {
            lines.push(String::from_utf8_lossy(buf).into_owned());
            buf.clear();
        }
        let now = Instant::now();
        for text in lines {
            let (ok, dropped) = unit.limit.admit(now);
            if dropped > 0 {
                crate::kmsg::service_line(
                    &mut self.kmsg,
                    &name,
                    &format!("({dropped} lines suppressed by the rate limit)"),
                );
            }
            if ok {
                crate::kmsg::service_line(&mut self.kmsg, &name, &text);
            }
        }
        if closed {
            if let Some((fd, _)) = self.units[i].output.take() {
                let _ = self.epoll.delete(fd.as_fd());
            }
        }
    }

    fn read_notify(&mut self, i: usize) {
        let mut buf = [0u8; 4096];
        let mut ready = false;
        if let Some((sock, _)) = &self.units[i].notify {
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]);
                for line in text.lines() {
                    if line == "READY=1" {
                        ready = true;
                    } else if let Some(status) = line.strip_prefix("STATUS=") {
                        log::info!("{}: {status}", self.units[i].svc.name);
                    }
                }
            }
        }
        if ready {
            self.mark_ready(i);
        }
    }

    /// Accepts one control connection and answers it. Requests are tiny
    /// and the peer is root, so a short blocking read is acceptable here.
    fn on_control(&mut self) {
        let Some(listener) = &self.control else {
            return;
        };
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        if let Err(e) = self.serve(stream) {
            log::warn!("control connection: {e}");
        }
    }

    fn serve(&mut self, mut stream: UnixStream) -> std::io::Result<()> {
        let cred = getsockopt(&stream, PeerCredentials).map_err(std::io::Error::from)?;
        let answer = if cred.uid() != 0 {
            log::warn!("control: refused uid {} (pid {})", cred.uid(), cred.pid());
            Err(ControlError::PermissionDenied)
        } else {
            let mut line = String::new();
            let mut reader =
                BufReader::new(stream.try_clone()?).take(crate::control::MAX_REQUEST as u64);
            reader.read_line(&mut line)?;
            Request::parse(&line)
                .map_err(ControlError::from)
                .and_then(|req| self.handle(req))
        };
        stream.write_all(crate::control::render_answer(&answer).as_bytes())
    }

    fn handle(&mut self, req: Request) -> Result<Reply, ControlError> {
        let find = |units: &[Unit], name: &str| {
            units
                .iter()
                .position(|u| u.svc.name == name)
                .ok_or_else(|| ControlError::NoService(name.to_owned()))
        };
        match req {
            Request::Status => Ok(Reply::Status(self.status())),
            Request::Stop(name) => {
                let i = find(&self.units, &name)?;
                self.stop(i);
                Ok(Reply::Accepted)
            }
            Request::Start(name) => {
                let i = find(&self.units, &name)?;
                let u = &mut self.units[i];
                match u.state {
                    State::Stopped | State::Failed(_) if u.pid.is_none() => {
                        u.state = State::Waiting;
                        u.restarts = 0;
                        Ok(Reply::Accepted)
                    }
                    State::Stopped => {
                        u.start_after_stop = true;
                        Ok(Reply::Accepted)
                    }
                    ref s => Err(ControlError::NotStartable {
                        state: s.into(),
                        name,
                    }),
                }
            }
            Request::Restart(name) => {
                let i = find(&self.units, &name)?;
                if self.units[i].pid.is_some() {
                    self.stop(i);
                    self.units[i].start_after_stop = true;
                } else {
                    self.units[i].state = State::Waiting;
                    self.units[i].restarts = 0;
                }
                Ok(Reply::Accepted)
            }
            Request::Reboot | Request::Poweroff => {
                let kind = req
                    .shutdown()
                    .expect("reboot and poweroff ask for a shutdown");
                self.shutdown.get_or_insert(kind);
                // The kind asked for, even if an earlier request's wins.
                Ok(Reply::ShuttingDown(kind))
            }
        }
    }

    /// Sends a service its stop signal; SIGKILL follows at its deadline.
    fn stop(&mut self, i: usize) {
        let u = &mut self.units[i];
        u.state = State::Stopped;
        u.start_after_stop = false;
        if let Some(pid) = u.pid {
            log::info!(
                "{}: stopping (pid {pid}, {})",
                u.svc.name,
                u.svc.stop_signal
            );
            signal_service(pid, u.svc.stop_signal);
            u.stop_deadline = Some(Instant::now() + Duration::from_millis(u.svc.stop_timeout_ms));
        }
    }

    /// Stops services one at a time in reverse dependency order, each
    /// within its own timeout; then anything left is killed.
    fn stop_all(&mut self, hooks: &mut dyn Hooks) {
        self.control = None;
        for i in (0..self.units.len()).rev() {
            if self.units[i].pid.is_none() {
                self.units[i].state = State::Stopped;
                continue;
            }
            self.stop(i);
            while self.units[i].pid.is_some() {
                self.schedule(hooks);
                self.arm_timer();
                let mut events = [EpollEvent::empty(); 16];
                let n = self
                    .epoll
                    .wait(&mut events, EpollTimeout::NONE)
                    .unwrap_or(0);
                for ev in &events[..n] {
                    match ev.data() {
                        SIGNAL_TOKEN => self.on_signals(hooks),
                        TIMER_TOKEN => {
                            let _ = self.timer.wait();
                        }
                        CONTROL_TOKEN => {}
                        token => self.on_fd(token),
                    }
                }
            }
        }
        self.reap(hooks);
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitKind {
    Code(i32),
    Signal(Signal),
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "status {c}"),
            ExitKind::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// Exponential backoff: 250 ms, 500 ms, 1 s, ... capped at 30 s.
pub fn backoff(restarts: u32) -> Duration {
    BACKOFF_BASE
        .checked_mul(1u32 << restarts.min(16))
        .unwrap_or(BACKOFF_MAX)
        .min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(250));
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(20), BACKOFF_MAX);
    }

    #[test]
    fn rate_limit_allows_a_burst_then_counts_drops() {
        let mut r = RateLimit::new();
        let t = r.last;
        let admitted = (0..300).filter(|_| r.admit(t).0).count();
        assert_eq!(admitted, 200);
        // One second later 50 more fit, and the first reports the drops.
        let (ok, dropped) = r.admit(t + Duration::from_secs(1));
        assert!(ok);
        assert_eq!(dropped, 100);
    }
}
