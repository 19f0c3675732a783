//! The service supervisor: one single-threaded event loop over a signalfd,
//! the services' output pipes and their notify sockets. One reaper owns
//! `waitid(P_ALL)`, so no exit status is lost to another waiter; exits of
//! reparented orphans are reaped and logged.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{kill, killpg, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::services::{Readiness, RestartPolicy, Service};

const SIGNAL_TOKEN: u64 = u64::MAX;
const KIND_OUTPUT: u64 = 1;
const KIND_NOTIFY: u64 = 2;
const PATH_POLL: Duration = Duration::from_millis(20);
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const RESTART_LIMIT: u32 = 10;
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_LINE: usize = 4096;

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
    Stopped,
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
    output: Option<(OwnedFd, Vec<u8>)>,
    notify: Option<(UnixDatagram, PathBuf)>,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    Reboot,
    Poweroff,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("event loop setup: {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("notify socket directory {path}")]
    NotifyDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Supervisor {
    units: Vec<Unit>,
    epoll: Epoll,
    sigfd: SignalFd,
    kmsg: Option<File>,
    notify_dir: PathBuf,
    critical_announced: bool,
    critical_failed: bool,
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
    pub fn new(services: Vec<Service>, notify_dir: &Path) -> Result<Self, SupervisorError> {
        let setup = |what| move |source| SupervisorError::Setup { what, source };
        let signals = handled_signals();
        signals.thread_block().map_err(setup("block signals"))?;
        let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(setup("signalfd"))?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(setup("epoll"))?;
        epoll
            .add(
                sigfd.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, SIGNAL_TOKEN),
            )
            .map_err(setup("epoll add signalfd"))?;
        std::fs::create_dir_all(notify_dir).map_err(|source| SupervisorError::NotifyDir {
            path: notify_dir.to_owned(),
            source,
        })?;
        let kmsg = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/kmsg")
            .ok();
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
                output: None,
                notify: None,
            })
            .collect();
        Ok(Self {
            units,
            epoll,
            sigfd,
            kmsg,
            notify_dir: notify_dir.to_owned(),
            critical_announced: false,
            critical_failed: false,
        })
    }

    /// A snapshot for status displays and tests.
    pub fn states(&self) -> Vec<(String, State, Option<i32>, u32)> {
        self.units
            .iter()
            .map(|u| {
                (
                    u.svc.name.clone(),
                    u.state.clone(),
                    u.pid.map(Pid::as_raw),
                    u.restarts,
                )
            })
            .collect()
    }

    /// Runs until a shutdown is requested, then stops every service in
    /// reverse start order and returns what was asked for.
    pub fn run(&mut self, hooks: &mut dyn Hooks) -> Shutdown {
        let kind = loop {
            self.schedule(hooks);
            let timeout = self.next_timeout();
            let mut events = [EpollEvent::empty(); 16];
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => {
                    log::error!("epoll_wait: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    0
                }
            };
            let mut shutdown = None;
            for ev in &events[..n] {
                match ev.data() {
                    SIGNAL_TOKEN => shutdown = shutdown.or(self.on_signals(hooks)),
                    token => self.on_fd(token),
                }
            }
            if let Some(k) = shutdown {
                break k;
            }
        };
        self.stop_all();
        kind
    }

    fn next_timeout(&self) -> EpollTimeout {
        let now = Instant::now();
        let mut next: Option<Duration> = None;
        let mut consider = |d: Duration| next = Some(next.map_or(d, |n: Duration| n.min(d)));
        for u in &self.units {
            match u.state {
                State::Starting => {
                    if u.svc.ready == Readiness::Path {
                        consider(PATH_POLL);
                    }
                    if let Some(t) = u.started_at {
                        let deadline = t + Duration::from_millis(u.svc.ready_timeout_ms);
                        consider(deadline.saturating_duration_since(now));
                    }
                }
                State::Backoff => {
                    if let Some(t) = u.next_start {
                        consider(t.saturating_duration_since(now));
                    }
                }
                _ => {}
            }
        }
        match next {
            None => EpollTimeout::NONE,
            Some(d) => {
                let ms = u16::try_from(d.as_millis().clamp(1, 60_000)).unwrap_or(u16::MAX);
                EpollTimeout::from(ms)
            }
        }
    }

    /// Starts what can start, checks readiness probes and deadlines.
    fn schedule(&mut self, hooks: &mut dyn Hooks) {
        let now = Instant::now();
        for i in 0..self.units.len() {
            match self.units[i].state {
                State::Waiting => {
                    let ready = self.units[i].svc.after.iter().all(|d| {
                        self.units
                            .iter()
                            .find(|u| u.svc.name == *d)
                            // An `after` on a service that was rejected at
                            // load is ordering only; `requires` was resolved.
                            .is_none_or(|u| u.is_up())
                    });
                    let failed_req = self.units[i].svc.requires.iter().find(|d| {
                        self.units
                            .iter()
                            .any(|u| u.svc.name == **d && matches!(u.state, State::Failed(_)))
                    });
                    if let Some(d) = failed_req {
                        let reason = format!("required service {d} failed");
                        self.fail(i, reason, hooks);
                    } else if ready {
                        self.spawn(i, hooks);
                    }
                }
                State::Backoff if self.units[i].next_start.is_some_and(|t| t <= now) => {
                    self.spawn(i, hooks);
                }
                State::Starting => {
                    let u = &self.units[i];
                    if u.svc.ready == Readiness::Path
                        && u.svc.ready_path.as_deref().is_some_and(Path::exists)
                    {
                        self.mark_ready(i);
                    } else if u.started_at.is_some_and(|t| {
                        now.duration_since(t) > Duration::from_millis(u.svc.ready_timeout_ms)
                    }) {
                        let reason = format!("not ready within {} ms", u.svc.ready_timeout_ms);
                        if let Some(pid) = u.pid {
                            let _ = killpg(pid, Signal::SIGKILL);
                        }
                        self.fail(i, reason, hooks);
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
            }
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
            let path = self.notify_dir.join(format!("{}.sock", svc.name));
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
        let is_tty = tty.is_some();
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setsid(2) and ioctl(2), which are async-signal-safe; it
        // touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                if is_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn();
        // The parent must not keep the pipe's write end, or EOF never comes.
        drop(cmd);
        let child = child?;
        let raw = i32::try_from(child.id()).map_err(|_| std::io::Error::other("pid overflow"))?;
        // `child` is dropped without waiting: the reaper owns every exit.
        Ok(Pid::from_raw(raw))
    }

    fn on_signals(&mut self, hooks: &mut dyn Hooks) -> Option<Shutdown> {
        let mut shutdown = None;
        loop {
            match self.sigfd.read_signal() {
                Ok(Some(info)) => {
                    let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
                    match Signal::try_from(signo) {
                        Ok(Signal::SIGCHLD) => self.reap(hooks),
                        // SIGINT is Ctrl-Alt-Del once CAD is disabled.
                        Ok(Signal::SIGTERM | Signal::SIGINT) => shutdown = Some(Shutdown::Reboot),
                        Ok(Signal::SIGPWR | Signal::SIGUSR2) => shutdown = Some(Shutdown::Poweroff),
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
        shutdown
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
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waitid: {e}");
                    break;
                }
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, how: ExitKind, hooks: &mut dyn Hooks) {
        let Some(i) = self.units.iter().position(|u| u.pid == Some(pid)) else {
            log::debug!("reaped orphan {pid} ({how})");
            return;
        };
        self.drain_output(i, true);
        let u = &mut self.units[i];
        u.pid = None;
        if let Some((sock, path)) = u.notify.take() {
            let _ = self.epoll.delete(sock.as_fd());
            let _ = std::fs::remove_file(path);
        }
        let name = u.svc.name.clone();
        let success = how == ExitKind::Code(0);
        if u.state == State::Stopped {
            log::info!("{name}: stopped ({how})");
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
        let Some((fd, buf)) = self.units[i].output.as_mut() else {
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
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            crate::kmsg::service_line(&mut self.kmsg, &name, &text);
        }
        if buf.len() > MAX_LINE || ((eof || closed) && !buf.is_empty()) {
            let text = String::from_utf8_lossy(buf).into_owned();
            buf.clear();
            crate::kmsg::service_line(&mut self.kmsg, &name, &text);
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

    /// Stops services in reverse start order: SIGTERM to each process
    /// group, then SIGKILL to whatever is left after the timeout.
    fn stop_all(&mut self) {
        let running: Vec<usize> = (0..self.units.len())
            .rev()
            .filter(|i| self.units[*i].pid.is_some())
            .collect();
        for &i in &running {
            let u = &mut self.units[i];
            u.state = State::Stopped;
            if let Some(pid) = u.pid {
                log::info!("{}: stopping (pid {pid})", u.svc.name);
                if killpg(pid, Signal::SIGTERM).is_err() {
                    let _ = kill(pid, Signal::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut noop = NoHooks;
        while self.units.iter().any(|u| u.pid.is_some()) && Instant::now() < deadline {
            let mut events = [EpollEvent::empty(); 16];
            let _ = self.epoll.wait(&mut events, EpollTimeout::from(100u16));
            let _ = self.on_signals(&mut noop);
        }
        for u in &mut self.units {
            if let Some(pid) = u.pid.take() {
                log::warn!("{}: did not stop in time; killing", u.svc.name);
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        self.reap(&mut noop);
    }

    /// The raw fd of the signalfd, for tests that poll it.
    pub fn signal_fd(&self) -> i32 {
        self.sigfd.as_raw_fd()
    }
}

struct NoHooks;
impl Hooks for NoHooks {
    fn all_critical_ready(&mut self) {}
    fn critical_failed(&mut self, _: &str, _: &str) {}
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
}
