//! The units state machine, free of I/O: events in (a spawn's or a
//! probe's outcome, a process exit, a readiness notification, a control
//! request, a shutdown request, the loop's tick), each with "now" passed
//! in; actions out (spawn, probe, signal, log, the boot hooks, a control
//! reply, when to tick next). The executor ([`super::executor`]) does the
//! I/O; the tests below drive this directly.
//!
//! # One turn of the loop
//!
//! The executor hands over what happened ([`Event::Exited`],
//! [`Event::Notified`], [`Event::Control`], [`Event::Shutdown`]); those
//! only change state. Then it sends [`Event::Tick`], and the machine does
//! what is due: it walks the units in start order, failing those whose
//! requirement failed, starting those whose dependencies are up,
//! probing readiness, enforcing readiness and stop deadlines, and
//! announcing the health gate. The walk pauses at each [`Action::Spawn`]
//! and [`Action::Probe`] until the executor answers with
//! [`Event::Spawned`] / [`Event::SpawnFailed`] or [`Event::Probed`], so a
//! later unit sees an earlier one's outcome within the same turn, in
//! order: a chain of `ready = "started"` services starts in one turn. A
//! turn ends with [`Action::Wake`]: when to tick next, if nothing else
//! happens first.
//!
//! # Shutdown
//!
//! After a shutdown request, the next tick closes the control socket and
//! stops the units one at a time in reverse start order: the stop signal,
//! then SIGKILL after the unit's `stop_timeout_ms`, and the next unit only
//! once its process is gone. [`Action::Finished`] ends the loop.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use qbackoff::Backoff;

use crate::control::{ControlError, Reply, Request, ServiceState, ServiceStatus, Shutdown};
use crate::services::{Readiness, RestartPolicy, Service};

/// How often `path` and `xenstore` readiness is probed.
pub const PROBE_POLL: Duration = Duration::from_millis(20);
/// The first restart's delay; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Restarts after which a service that keeps exiting has failed. Only a
/// control `start` or `restart` resets the count.
pub const RESTART_LIMIT: u32 = 10;

/// A unit: a service's place in start order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnitId(usize);

impl UnitId {
    pub fn index(self) -> usize {
        self.0
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "status {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// Why a unit failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("required service {0} failed")]
    Required(String),
    #[error("not ready within {0} ms")]
    NotReady(u64),
    /// A boot-critical unit still not ready this long after its first
    /// start, through its restarts: the health gate is never held open
    /// by a unit that keeps failing.
    #[error("not ready within {0} ms of its first start (restarting)")]
    NeverReady(u64),
    /// `error` is the spawn's error as text: events and actions are plain
    /// data that tests compare.
    #[error("cannot start {program}: {error}")]
    CannotStart { program: String, error: String },
    #[error("restart limit ({limit}) reached; last exit {last}")]
    RestartLimit { limit: u32, last: Exit },
    #[error("exited ({0})")]
    Exited(Exit),
}

/// Where a unit is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Waiting for what it starts after; a boot-complete hook also for
    /// the health gate.
    Waiting,
    /// Spawned, not ready yet.
    Starting,
    Ready,
    /// A oneshot that exited 0.
    Done,
    /// To be restarted at `until`.
    Backoff {
        until: Instant,
    },
    Failed(Failure),
    /// Stopped by request; while its process lives, SIGKILL follows at
    /// `kill_at` (cleared once sent), and `then_start` starts it again once
    /// the process is gone (a `restart`).
    Stopped {
        kill_at: Option<Instant>,
        then_start: bool,
    },
}

impl State {
    const STOPPED: State = State::Stopped {
        kill_at: None,
        then_start: false,
    };

    fn is_up(&self) -> bool {
        matches!(self, State::Ready | State::Done)
    }
}

impl From<&State> for ServiceState {
    fn from(s: &State) -> Self {
        match s {
            State::Waiting => ServiceState::Waiting,
            State::Starting => ServiceState::Starting,
            State::Ready => ServiceState::Ready,
            State::Done => ServiceState::Done,
            State::Backoff { .. } => ServiceState::Backoff,
            State::Failed(f) => ServiceState::Failed(f.to_string()),
            State::Stopped { .. } => ServiceState::Stopped,
        }
    }
}

/// What to look at for a unit's readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `ready = "path"`: the path exists.
    Path(PathBuf),
    /// `ready = "xenstore"`: the xenstore key exists.
    Xenstore(String),
}

/// The executor's answer to a [`Probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probed {
    Ready,
    NotYet,
    /// The probe itself failed (xenstored refused the request, say): not
    /// ready, and logged once per change of error.
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The executor handed over everything that happened (a timer firing
    /// included): do what is due. Sent once per loop turn, before it sleeps.
    Tick,
    /// The answer to [`Action::Spawn`]: the unit's process runs.
    Spawned { unit: UnitId, pid: Pid },
    /// The answer to [`Action::Spawn`]: it could not be started.
    SpawnFailed { unit: UnitId, error: String },
    /// The answer to [`Action::Probe`].
    Probed { unit: UnitId, answer: Probed },
    /// A child was reaped: a unit's process or an orphan.
    Exited { pid: Pid, exit: Exit },
    /// The unit sent `READY=1` to its notify socket.
    Notified { unit: UnitId },
    /// A control request; answered by [`Action::Reply`].
    Control(Request),
    /// A signal asked for a shutdown; the first request wins.
    Shutdown(Shutdown),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fork and exec the unit; answer with [`Event::Spawned`] or
    /// [`Event::SpawnFailed`] before anything else. Ends its batch.
    Spawn(UnitId),
    /// Check the unit's readiness; answer with [`Event::Probed`] before
    /// anything else. Ends its batch.
    Probe {
        unit: UnitId,
        probe: Probe,
    },
    /// Signal the unit's process group (its process, if it has none).
    Signal {
        unit: UnitId,
        pid: Pid,
        signal: Signal,
    },
    Log(Notice),
    /// Every boot-critical unit is up (once).
    BootReady,
    /// A boot-critical unit cannot come up (once, and never after
    /// [`Action::BootReady`]).
    BootFailed {
        service: String,
        reason: Failure,
    },
    /// The answer to [`Event::Control`].
    Reply(Result<Reply, ControlError>),
    /// The stop sequence began: take no more control requests.
    CloseControl,
    /// Send [`Event::Tick`] at this instant unless something happens
    /// first; `None`: nothing is time-driven now. Ends a turn.
    Wake(Option<Instant>),
    /// Every unit is stopped: reap what is left and go down.
    Finished(Shutdown),
}

/// A line for the log, rendered by [`std::fmt::Display`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Started {
        name: String,
        pid: Pid,
    },
    Ready {
        name: String,
        after: Duration,
    },
    /// A oneshot exited 0.
    Completed {
        name: String,
    },
    Exited {
        name: String,
        exit: Exit,
    },
    Restarting {
        name: String,
        restart: u32,
        delay: Duration,
    },
    Failed {
        name: String,
        reason: Failure,
    },
    Stopping {
        name: String,
        pid: Pid,
        signal: Signal,
    },
    Stopped {
        name: String,
        exit: Exit,
    },
    /// The stop timeout passed: SIGKILL.
    Killing {
        name: String,
        timeout_ms: u64,
    },
    /// A reparented orphan was reaped.
    Orphan {
        pid: Pid,
        exit: Exit,
    },
    /// The readiness probe started failing, or fails differently now.
    ProbeFailing {
        name: String,
        error: String,
    },
    /// The readiness probe answers again after failing.
    ProbeAnswers {
        name: String,
    },
}

impl Notice {
    pub fn level(&self) -> log::Level {
        match self {
            Notice::Failed { .. } => log::Level::Error,
            Notice::Exited { .. } | Notice::Killing { .. } | Notice::ProbeFailing { .. } => {
                log::Level::Warn
            }
            Notice::Started { .. }
            | Notice::ProbeAnswers { .. }
            | Notice::Ready { .. }
            | Notice::Completed { .. }
            | Notice::Restarting { .. }
            | Notice::Stopping { .. }
            | Notice::Stopped { .. }
            | Notice::Orphan { .. } => log::Level::Info,
        }
    }
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::Started { name, pid } => write!(f, "{name}: started, pid {pid}"),
            Notice::Ready { name, after } => {
                write!(f, "{name}: ready after {} ms", after.as_millis())
            }
            Notice::Completed { name } => write!(f, "{name}: completed"),
            Notice::Exited { name, exit } => write!(f, "{name}: exited ({exit})"),
            Notice::Restarting {
                name,
                restart,
                delay,
            } => write!(f, "{name}: restart {restart} in {} ms", delay.as_millis()),
            Notice::Failed { name, reason } => write!(f, "{name}: failed: {reason}"),
            Notice::Stopping { name, pid, signal } => {
                write!(f, "{name}: stopping (pid {pid}, {signal})")
            }
            Notice::Stopped { name, exit } => write!(f, "{name}: stopped ({exit})"),
            Notice::Killing { name, timeout_ms } => {
                write!(f, "{name}: not stopped after {timeout_ms} ms; killing")
            }
            Notice::Orphan { pid, exit } => write!(f, "reaped orphan {pid} ({exit})"),
            Notice::ProbeFailing { name, error } => {
                write!(f, "{name}: readiness probe failing: {error}")
            }
            Notice::ProbeAnswers { name } => write!(f, "{name}: readiness probe answers again"),
        }
    }
}

/// A unit's moments this boot ([`Units::times`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitTimes {
    pub name: String,
    pub after: Vec<String>,
    pub boot_critical: bool,
    pub started: Option<Instant>,
    pub ready: Option<Instant>,
    pub exited: Option<Instant>,
    pub restarts: u32,
}

#[derive(Debug, Clone, Copy)]
struct Process {
    pid: Pid,
    started: Instant,
}

#[derive(Debug)]
struct Unit {
    svc: Service,
    /// `after` ∪ `requires` among the units; a name rejected at load is
    /// ordering only and left out.
    after: Vec<UnitId>,
    requires: Vec<UnitId>,
    probe: Option<Probe>,
    state: State,
    /// Set from spawn to exit: always in `Starting` and `Ready`, and in
    /// `Stopped` and `Failed` until the process is gone.
    process: Option<Process>,
    backoff: Backoff,
    ready_after: Option<Duration>,
    /// When it was first spawned this boot: a boot-critical unit must be
    /// ready within its timeout of this, however often it restarts.
    first_started: Option<Instant>,
    /// When it was first ready (a oneshot: done), and first exited: the
    /// boot's timeline.
    first_ready: Option<Instant>,
    first_exited: Option<Instant>,
    /// The tick in which its readiness was last probed.
    probed_in: u64,
    /// The probe error last logged, so a probe failing every tick is
    /// logged when it starts, changes or stops, not 50 times a second.
    probe_error: Option<String>,
}

/// The answer the walk waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Spawn(UnitId),
    Probe(UnitId),
}

#[derive(Debug, Clone, Copy)]
struct Stopping {
    kind: Shutdown,
    /// Units `0..remaining` are yet to be stopped; `remaining - 1` next.
    remaining: usize,
    /// The stop signal went to unit `remaining - 1`.
    signalled: bool,
}

#[derive(Debug)]
pub struct Units {
    units: Vec<Unit>,
    critical_announced: bool,
    critical_failed: bool,
    shutdown: Option<Shutdown>,
    stopping: Option<Stopping>,
    pending: Option<Pending>,
    /// Counts [`Event::Tick`]s, so each unit is probed once per tick.
    tick: u64,
}

impl Units {
    /// `services` in start order: each after everything it names.
    pub fn new(services: Vec<Service>) -> Self {
        let index = |name: &String| services.iter().position(|s| s.name == *name).map(UnitId);
        let deps: Vec<_> = services
            .iter()
            .map(|s| {
                let after = s.after.iter().filter_map(index).collect();
                let requires = s.requires.iter().filter_map(index).collect();
                (after, requires)
            })
            .collect();
        let units = services
            .into_iter()
            .zip(deps)
            .map(|(svc, (after, requires))| {
                let probe = match svc.ready {
                    Readiness::Path => {
                        Some(Probe::Path(svc.ready_path.clone().expect(
                            "services::parse sets ready_path for ready = \"path\"",
                        )))
                    }
                    Readiness::Xenstore => {
                        Some(Probe::Xenstore(svc.ready_key.clone().expect(
                            "services::parse sets ready_key for ready = \"xenstore\"",
                        )))
                    }
                    Readiness::Started | Readiness::Exit | Readiness::Notify => None,
                };
                Unit {
                    svc,
                    after,
                    requires,
                    probe,
                    state: State::Waiting,
                    process: None,
                    backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX),
                    ready_after: None,
                    first_started: None,
                    first_ready: None,
                    first_exited: None,
                    probed_in: 0,
                    probe_error: None,
                }
            })
            .collect();
        Self {
            units,
            critical_announced: false,
            critical_failed: false,
            shutdown: None,
            stopping: None,
            pending: None,
            tick: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.units.len()
    }

    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// The unit at `index` in start order, if there is one.
    pub fn id(&self, index: usize) -> Option<UnitId> {
        (index < self.units.len()).then_some(UnitId(index))
    }

    pub fn service(&self, unit: UnitId) -> &Service {
        &self.units[unit.0].svc
    }

    pub fn state(&self, unit: UnitId) -> &State {
        &self.units[unit.0].state
    }

    /// The unit whose process `pid` is.
    pub fn by_pid(&self, pid: Pid) -> Option<UnitId> {
        self.units
            .iter()
            .position(|u| u.process.is_some_and(|p| p.pid == pid))
            .map(UnitId)
    }

    /// Every unit's status, in start order.
    /// Each unit's first start, first readiness and first exit, for the
    /// boot's timeline.
    pub fn times(&self) -> Vec<UnitTimes> {
        self.units
            .iter()
            .map(|u| UnitTimes {
                name: u.svc.name.clone(),
                after: u.svc.after.clone(),
                boot_critical: u.svc.boot_critical,
                started: u.first_started,
                ready: u.first_ready,
                exited: u.first_exited,
                restarts: u.backoff.failures(),
            })
            .collect()
    }

    pub fn status(&self) -> Vec<ServiceStatus> {
        self.units
            .iter()
            .map(|u| ServiceStatus {
                name: u.svc.name.clone(),
                state: ServiceState::from(&u.state),
                pid: u.process.map(|p| p.pid),
                restarts: u.backoff.failures(),
                ready_after: u.ready_after,
            })
            .collect()
    }

    pub fn handle(&mut self, ev: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match ev {
            Event::Tick => {
                self.tick += 1;
                self.settle(now, &mut out);
            }
            Event::Spawned { unit, pid } => {
                self.answered(Pending::Spawn(unit));
                self.started(unit, pid, now, &mut out);
                self.settle(now, &mut out);
            }
            Event::SpawnFailed { unit, error } => {
                self.answered(Pending::Spawn(unit));
                let program = self.units[unit.0].svc.exec[0].clone();
                self.fail(unit, Failure::CannotStart { program, error }, &mut out);
                self.settle(now, &mut out);
            }
            Event::Probed { unit, answer } => {
                self.answered(Pending::Probe(unit));
                self.probed(unit, answer, now, &mut out);
                self.settle(now, &mut out);
            }
            Event::Exited { pid, exit } => self.exited(pid, exit, now, &mut out),
            Event::Notified { unit } => self.mark_ready(unit, now, &mut out),
            Event::Control(req) => {
                let reply = self.control(req, now, &mut out);
                out.push(Action::Reply(reply));
            }
            Event::Shutdown(kind) => {
                self.shutdown.get_or_insert(kind);
            }
        }
        out
    }

    fn answered(&mut self, answer: Pending) {
        let pending = self.pending.take();
        assert_eq!(
            pending,
            Some(answer),
            "the executor answers the spawn or probe asked for, and only that"
        );
    }

    /// The tick's work (see the module documentation). It runs again from
    /// the top after each answer; every step is idempotent, so a rerun
    /// carries on where the last one paused.
    fn settle(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.pending.is_some() {
            return;
        }
        if self.stopping.is_none() {
            if self.schedule(now, out).is_break() {
                return;
            }
            let Some(kind) = self.shutdown else {
                out.push(Action::Wake(self.next_wake(now)));
                return;
            };
            self.stopping = Some(Stopping {
                kind,
                remaining: self.units.len(),
                signalled: false,
            });
            out.push(Action::CloseControl);
        }
        if let Some(kind) = self.stop_next(now, out) {
            out.push(Action::Finished(kind));
            return;
        }
        if self.schedule(now, out).is_break() {
            return;
        }
        out.push(Action::Wake(self.next_wake(now)));
    }

    /// Moves the stop sequence on: past every unit without a process, and
    /// sends the next one its stop signal. Returns the shutdown once every
    /// unit is stopped.
    fn stop_next(&mut self, now: Instant, out: &mut Vec<Action>) -> Option<Shutdown> {
        let mut st = self
            .stopping
            .expect("the stop sequence moves on only once it began");
        let done = loop {
            let Some(i) = st.remaining.checked_sub(1) else {
                break true;
            };
            if self.units[i].process.is_none() {
                self.units[i].state = State::STOPPED;
                st.remaining = i;
                st.signalled = false;
                continue;
            }
            if !st.signalled {
                self.stop(UnitId(i), now, out);
                st.signalled = true;
            }
            break false;
        };
        self.stopping = Some(st);
        done.then_some(st.kind)
    }

    /// One walk over the units, then the health gate; a passed gate lets
    /// the boot-complete hooks start in a second walk.
    fn schedule(&mut self, now: Instant, out: &mut Vec<Action>) -> ControlFlow<()> {
        self.walk(now, out)?;
        if !self.critical_announced
            && !self.critical_failed
            && self
                .units
                .iter()
                .filter(|u| u.svc.boot_critical)
                .all(|u| u.state.is_up())
        {
            self.critical_announced = true;
            out.push(Action::BootReady);
            self.walk(now, out)?;
        }
        ControlFlow::Continue(())
    }

    /// The instant by which a boot-critical unit that restarts must be
    /// ready, while the health gate is still closed.
    fn gate_deadline(&self, u: &Unit) -> Option<Instant> {
        if !u.svc.boot_critical || self.critical_announced || self.critical_failed {
            return None;
        }
        let first = u.first_started?;
        Some(first + Duration::from_millis(u.svc.ready_timeout_ms))
    }

    /// Breaks at a spawn or probe, which the executor answers first.
    fn walk(&mut self, now: Instant, out: &mut Vec<Action>) -> ControlFlow<()> {
        for i in 0..self.units.len() {
            let id = UnitId(i);
            let u = &self.units[i];
            // A first process past its timeout is the plain `NotReady`
            // below; this is for a unit that has restarted since.
            let restarted = u.process.is_none_or(|p| Some(p.started) != u.first_started);
            let waiting = matches!(u.state, State::Starting | State::Backoff { .. });
            if waiting && restarted && self.gate_deadline(u).is_some_and(|d| now > d) {
                if let Some(p) = u.process {
                    out.push(Action::Signal {
                        unit: id,
                        pid: p.pid,
                        signal: Signal::SIGKILL,
                    });
                }
                let ms = u.svc.ready_timeout_ms;
                self.fail(id, Failure::NeverReady(ms), out);
                continue;
            }
            match u.state {
                State::Waiting => {
                    if u.svc.boot_complete && !self.critical_announced {
                        continue;
                    }
                    let failed = u
                        .requires
                        .iter()
                        .find(|d| matches!(self.units[d.0].state, State::Failed(_)));
                    if let Some(d) = failed {
                        let name = self.units[d.0].svc.name.clone();
                        self.fail(id, Failure::Required(name), out);
                    } else if u.after.iter().all(|d| self.units[d.0].state.is_up()) {
                        return self.ask(Pending::Spawn(id), Action::Spawn(id), out);
                    }
                }
                State::Backoff { until } if until <= now => {
                    return self.ask(Pending::Spawn(id), Action::Spawn(id), out);
                }
                State::Starting => {
                    if let Some(probe) = &u.probe {
                        if u.probed_in != self.tick {
                            let probe = probe.clone();
                            self.units[i].probed_in = self.tick;
                            let action = Action::Probe { unit: id, probe };
                            return self.ask(Pending::Probe(id), action, out);
                        }
                    }
                    let u = &self.units[i];
                    let timeout = Duration::from_millis(u.svc.ready_timeout_ms);
                    let process = u.process.expect("a starting unit has a process");
                    if now.saturating_duration_since(process.started) > timeout {
                        out.push(Action::Signal {
                            unit: id,
                            pid: process.pid,
                            signal: Signal::SIGKILL,
                        });
                        self.fail(id, Failure::NotReady(u.svc.ready_timeout_ms), out);
                    }
                }
                State::Stopped {
                    kill_at: Some(at),
                    then_start,
                } if at <= now => {
                    if let Some(p) = u.process {
                        out.push(Action::Log(Notice::Killing {
                            name: u.svc.name.clone(),
                            timeout_ms: u.svc.stop_timeout_ms,
                        }));
                        out.push(Action::Signal {
                            unit: id,
                            pid: p.pid,
                            signal: Signal::SIGKILL,
                        });
                    }
                    self.units[i].state = State::Stopped {
                        kill_at: None,
                        then_start,
                    };
                }
                _ => {}
            }
        }
        ControlFlow::Continue(())
    }

    fn ask(&mut self, pending: Pending, action: Action, out: &mut Vec<Action>) -> ControlFlow<()> {
        self.pending = Some(pending);
        out.push(action);
        ControlFlow::Break(())
    }

    /// The next moment something time-driven is due.
    fn next_wake(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for u in &self.units {
            match u.state {
                State::Starting => {
                    if u.probe.is_some() {
                        consider(now + PROBE_POLL);
                    }
                    if let Some(p) = u.process {
                        consider(p.started + Duration::from_millis(u.svc.ready_timeout_ms));
                    }
                }
                State::Backoff { until } => {
                    consider(until);
                    if let Some(d) = self.gate_deadline(u) {
                        consider(d);
                    }
                }
                State::Stopped {
                    kill_at: Some(at), ..
                } => consider(at),
                _ => {}
            }
        }
        next
    }

    fn started(&mut self, unit: UnitId, pid: Pid, now: Instant, out: &mut Vec<Action>) {
        let u = &mut self.units[unit.0];
        out.push(Action::Log(Notice::Started {
            name: u.svc.name.clone(),
            pid,
        }));
        u.process = Some(Process { pid, started: now });
        u.first_started.get_or_insert(now);
        u.state = State::Starting;
        // First probed on the next tick: a process spawned this instant
        // has had no time to get ready.
        u.probed_in = self.tick;
        // A new process's probe failing is news again.
        u.probe_error = None;
        if u.svc.ready == Readiness::Started {
            self.mark_ready(unit, now, out);
        }
    }

    fn probed(&mut self, unit: UnitId, answer: Probed, now: Instant, out: &mut Vec<Action>) {
        let u = &mut self.units[unit.0];
        match answer {
            Probed::Error(error) => {
                if u.probe_error.as_ref() != Some(&error) {
                    out.push(Action::Log(Notice::ProbeFailing {
                        name: u.svc.name.clone(),
                        error: error.clone(),
                    }));
                    u.probe_error = Some(error);
                }
            }
            Probed::Ready | Probed::NotYet => {
                if u.probe_error.take().is_some() {
                    out.push(Action::Log(Notice::ProbeAnswers {
                        name: u.svc.name.clone(),
                    }));
                }
                if answer == Probed::Ready {
                    self.mark_ready(unit, now, out);
                }
            }
        }
    }

    fn mark_ready(&mut self, unit: UnitId, now: Instant, out: &mut Vec<Action>) {
        let u = &mut self.units[unit.0];
        if u.state != State::Starting {
            return;
        }
        let started = u.process.expect("a starting unit has a process").started;
        let after = now.saturating_duration_since(started);
        u.ready_after = Some(after);
        u.first_ready.get_or_insert(now);
        u.state = State::Ready;
        out.push(Action::Log(Notice::Ready {
            name: u.svc.name.clone(),
            after,
        }));
    }

    fn exited(&mut self, pid: Pid, exit: Exit, now: Instant, out: &mut Vec<Action>) {
        let Some(unit) = self.by_pid(pid) else {
            out.push(Action::Log(Notice::Orphan { pid, exit }));
            return;
        };
        let u = &mut self.units[unit.0];
        let process = u.process.take().expect("by_pid found its process");
        u.first_exited.get_or_insert(now);
        let name = u.svc.name.clone();
        if let State::Stopped { then_start, .. } = u.state {
            out.push(Action::Log(Notice::Stopped { name, exit }));
            u.state = if then_start {
                u.backoff.reset();
                State::Waiting
            } else {
                State::STOPPED
            };
            return;
        }
        let success = exit == Exit::Code(0);
        if u.svc.ready == Readiness::Exit && success {
            out.push(Action::Log(Notice::Completed { name }));
            u.ready_after = Some(now.saturating_duration_since(process.started));
            u.first_ready.get_or_insert(now);
            u.state = State::Done;
            return;
        }
        out.push(Action::Log(Notice::Exited {
            name: name.clone(),
            exit,
        }));
        let restart = match u.svc.restart {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Always => true,
        };
        if restart && u.backoff.failures() < RESTART_LIMIT {
            let delay = u.backoff.next_delay();
            u.state = State::Backoff { until: now + delay };
            out.push(Action::Log(Notice::Restarting {
                name,
                restart: u.backoff.failures(),
                delay,
            }));
        } else {
            let reason = if restart {
                Failure::RestartLimit {
                    limit: RESTART_LIMIT,
                    last: exit,
                }
            } else {
                Failure::Exited(exit)
            };
            self.fail(unit, reason, out);
        }
    }

    fn fail(&mut self, unit: UnitId, reason: Failure, out: &mut Vec<Action>) {
        let u = &mut self.units[unit.0];
        out.push(Action::Log(Notice::Failed {
            name: u.svc.name.clone(),
            reason: reason.clone(),
        }));
        u.state = State::Failed(reason.clone());
        if u.svc.boot_critical && !self.critical_announced && !self.critical_failed {
            self.critical_failed = true;
            out.push(Action::BootFailed {
                service: u.svc.name.clone(),
                reason,
            });
        }
    }

    /// Sends the unit its stop signal; SIGKILL follows at its deadline.
    fn stop(&mut self, unit: UnitId, now: Instant, out: &mut Vec<Action>) {
        let u = &mut self.units[unit.0];
        let Some(p) = u.process else {
            u.state = State::STOPPED;
            return;
        };
        let signal = u.svc.stop_signal;
        out.push(Action::Log(Notice::Stopping {
            name: u.svc.name.clone(),
            pid: p.pid,
            signal,
        }));
        out.push(Action::Signal {
            unit,
            pid: p.pid,
            signal,
        });
        u.state = State::Stopped {
            kill_at: Some(now + Duration::from_millis(u.svc.stop_timeout_ms)),
            then_start: false,
        };
    }

    fn control(
        &mut self,
        req: Request,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Result<Reply, ControlError> {
        let find = |name: &str| {
            self.units
                .iter()
                .position(|u| u.svc.name == name)
                .map(UnitId)
                .ok_or_else(|| ControlError::NoService(name.to_owned()))
        };
        match req {
            Request::Status => Ok(Reply::Status(self.status())),
            Request::Stop(name) => {
                let unit = find(&name)?;
                self.stop(unit, now, out);
                Ok(Reply::Accepted)
            }
            Request::Start(name) => {
                let unit = find(&name)?;
                let u = &mut self.units[unit.0];
                match (&mut u.state, u.process) {
                    (State::Stopped { .. } | State::Failed(_), None) => {
                        u.state = State::Waiting;
                        u.backoff.reset();
                        Ok(Reply::Accepted)
                    }
                    (State::Stopped { then_start, .. }, Some(_)) => {
                        *then_start = true;
                        Ok(Reply::Accepted)
                    }
                    (state, _) => Err(ControlError::NotStartable {
                        state: ServiceState::from(&*state),
                        name,
                    }),
                }
            }
            Request::Restart(name) => {
                let unit = find(&name)?;
                if self.units[unit.0].process.is_some() {
                    self.stop(unit, now, out);
                    if let State::Stopped { then_start, .. } = &mut self.units[unit.0].state {
                        *then_start = true;
                    }
                } else {
                    let u = &mut self.units[unit.0];
                    u.state = State::Waiting;
                    u.backoff.reset();
                }
                Ok(Reply::Accepted)
            }
            Request::Reboot | Request::Poweroff => {
                let kind = req
                    .shutdown()
                    .expect("reboot and poweroff ask for a shutdown");
                self.shutdown.get_or_insert(kind);
                // The kind asked for, even where an earlier request's wins.
                Ok(Reply::ShuttingDown(kind))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const ENOENT: &str = "No such file or directory (os error 2)";

    /// A service `name` running `/bin/<name>`, defined by `toml` lines.
    fn svc(name: &str, toml: &str) -> Service {
        let path = format!("/etc/qinit/services/{name}.toml");
        let text = format!("exec = [\"/bin/{name}\"]\n{toml}\n");
        crate::services::parse(Path::new(&path), &text).unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Drives [`Units`] as the executor does: spawns get pids from 100 up
    /// (or fail, for the names in `broken`), and probes pass for the names
    /// in `ready`.
    struct Sim {
        units: Units,
        t0: Instant,
        now: Instant,
        next_pid: i32,
        ready: Vec<&'static str>,
        broken: Vec<&'static str>,
        /// What a probe that is not ready answers with; `None`: not yet.
        probe_error: Option<String>,
    }

    impl Sim {
        fn new(services: Vec<Service>) -> Self {
            let t0 = Instant::now();
            Self {
                units: Units::new(services),
                t0,
                now: t0,
                next_pid: 100,
                ready: Vec::new(),
                broken: Vec::new(),
                probe_error: None,
            }
        }

        fn at(&mut self, ms: u64) -> &mut Self {
            self.now = self.t0 + Duration::from_millis(ms);
            self
        }

        fn set(&mut self, now: Instant) -> &mut Self {
            self.now = now;
            self
        }

        fn t(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        /// Every action the event led to, the answered spawns' and probes'
        /// included, in order.
        fn feed(&mut self, ev: Event) -> Vec<Action> {
            let mut all = Vec::new();
            let mut next = Some(ev);
            while let Some(ev) = next.take() {
                for a in self.units.handle(ev, self.now) {
                    assert!(next.is_none(), "{a:?} follows a spawn or probe");
                    match a {
                        Action::Spawn(unit) => {
                            let name = self.units.service(unit).name.as_str();
                            next = Some(if self.broken.contains(&name) {
                                Event::SpawnFailed {
                                    unit,
                                    error: ENOENT.into(),
                                }
                            } else {
                                self.next_pid += 1;
                                Event::Spawned {
                                    unit,
                                    pid: Pid::from_raw(self.next_pid - 1),
                                }
                            });
                        }
                        Action::Probe { unit, .. } => {
                            let name = self.units.service(unit).name.as_str();
                            let answer = if self.ready.contains(&name) {
                                Probed::Ready
                            } else if let Some(e) = &self.probe_error {
                                Probed::Error(e.clone())
                            } else {
                                Probed::NotYet
                            };
                            next = Some(Event::Probed { unit, answer });
                        }
                        _ => {}
                    }
                    all.push(a);
                }
            }
            all
        }

        fn tick(&mut self) -> Vec<Action> {
            self.feed(Event::Tick)
        }

        /// What a tick spawns.
        fn tick_spawns(&mut self) -> Vec<String> {
            let actions = self.tick();
            self.spawned(&actions)
        }

        fn id(&self, name: &str) -> UnitId {
            (0..self.units.len())
                .map(UnitId)
                .find(|u| self.units.service(*u).name == name)
                .unwrap()
        }

        fn pid(&self, name: &str) -> Pid {
            self.status(name).pid.unwrap()
        }

        fn status(&self, name: &str) -> ServiceStatus {
            self.units
                .status()
                .into_iter()
                .find(|s| s.name == name)
                .unwrap()
        }

        fn state(&self, name: &str) -> &State {
            self.units.state(self.id(name))
        }

        fn exit(&mut self, name: &str, exit: Exit) -> Vec<Action> {
            let pid = self.pid(name);
            self.feed(Event::Exited { pid, exit })
        }

        fn control(&mut self, req: Request) -> (Result<Reply, ControlError>, Vec<Action>) {
            let mut actions = self.feed(Event::Control(req));
            match actions.pop() {
                Some(Action::Reply(reply)) => (reply, actions),
                other => panic!("no reply last: {other:?}"),
            }
        }

        fn spawned(&self, actions: &[Action]) -> Vec<String> {
            actions
                .iter()
                .filter_map(|a| match a {
                    Action::Spawn(u) => Some(self.units.service(*u).name.clone()),
                    _ => None,
                })
                .collect()
        }

        fn signals(&self, actions: &[Action]) -> Vec<(String, Signal)> {
            actions
                .iter()
                .filter_map(|a| match a {
                    Action::Signal { unit, pid, signal } => {
                        assert_eq!(self.units.units[unit.0].process.map(|p| p.pid), Some(*pid));
                        Some((self.units.service(*unit).name.clone(), *signal))
                    }
                    _ => None,
                })
                .collect()
        }
    }

    /// The log lines, as the executor writes them.
    fn lines(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Log(n) => Some(n.to_string()),
                _ => None,
            })
            .collect()
    }

    /// When the turn asks to be woken; every turn ends with it.
    fn wake(actions: &[Action]) -> Option<Instant> {
        match actions.last() {
            Some(Action::Wake(at)) => *at,
            other => panic!("the turn did not end with a wake: {other:?}"),
        }
    }

    #[test]
    fn dependencies_order_the_start_and_a_ready_chain_starts_in_one_tick() {
        let mut sim = Sim::new(vec![
            svc("a", "ready = \"started\""),
            svc("b", "ready = \"started\"\nafter = [\"a\"]"),
            svc("x", "ready = \"started\""),
            svc("c", "ready = \"notify\"\nrequires = [\"b\"]"),
            svc(
                "d",
                "ready = \"started\"\nafter = [\"c\", \"rejected-at-load\"]",
            ),
        ]);
        let actions = sim.tick();
        // In start order, each after what it waits for: b sees a ready
        // within the same tick.
        assert_eq!(sim.spawned(&actions), ["a", "b", "x", "c"]);
        assert_eq!(
            lines(&actions),
            [
                "a: started, pid 100",
                "a: ready after 0 ms",
                "b: started, pid 101",
                "b: ready after 0 ms",
                "x: started, pid 102",
                "x: ready after 0 ms",
                "c: started, pid 103",
            ]
        );
        // The readiness deadline of c is the only thing time-driven.
        assert_eq!(wake(&actions), Some(sim.t(30_000)));
        assert_eq!(sim.state("d"), &State::Waiting);

        // The notification only marks c ready; d starts on the next tick.
        let c = sim.id("c");
        let actions = sim.at(150).feed(Event::Notified { unit: c });
        assert_eq!(lines(&actions), ["c: ready after 150 ms"]);
        assert_eq!(sim.status("c").ready_after, Some(ms(150)));
        let actions = sim.tick();
        assert_eq!(sim.spawned(&actions), ["d"]);
        assert_eq!(wake(&actions), None);
    }

    #[test]
    fn a_spawn_pauses_the_tick_until_it_is_answered() {
        let mut units = Units::new(vec![
            svc("a", "ready = \"started\""),
            svc("b", "ready = \"started\""),
        ]);
        let t = Instant::now();
        assert_eq!(units.handle(Event::Tick, t), [Action::Spawn(UnitId(0))]);
        // Nothing more happens until the answer, and nothing twice.
        assert!(units.handle(Event::Tick, t).is_empty());
        let actions = units.handle(
            Event::SpawnFailed {
                unit: UnitId(0),
                error: ENOENT.into(),
            },
            t,
        );
        assert_eq!(
            actions,
            [
                Action::Log(Notice::Failed {
                    name: "a".into(),
                    reason: Failure::CannotStart {
                        program: "/bin/a".into(),
                        error: ENOENT.into(),
                    },
                }),
                Action::Spawn(UnitId(1)),
            ]
        );
    }

    #[test]
    #[should_panic(expected = "the executor answers the spawn or probe asked for")]
    fn an_answer_nobody_asked_for_is_a_bug() {
        let mut units = Units::new(vec![svc("a", "ready = \"started\"")]);
        units.handle(
            Event::Spawned {
                unit: UnitId(0),
                pid: Pid::from_raw(7),
            },
            Instant::now(),
        );
    }

    #[test]
    fn path_probes_run_every_tick_from_the_one_after_the_spawn() {
        let mut sim = Sim::new(vec![
            svc("p", "ready = \"path\"\nready_path = \"/run/p.ready\""),
            svc("q", "ready = \"started\"\nafter = [\"p\"]"),
        ]);
        let actions = sim.tick();
        assert_eq!(sim.spawned(&actions), ["p"]);
        assert!(!actions.iter().any(|a| matches!(a, Action::Probe { .. })));
        assert_eq!(wake(&actions), Some(sim.t(20)));

        let actions = sim.at(20).tick();
        assert_eq!(
            actions[0],
            Action::Probe {
                unit: sim.id("p"),
                probe: Probe::Path("/run/p.ready".into()),
            }
        );
        assert_eq!(sim.state("p"), &State::Starting);
        assert_eq!(wake(&actions), Some(sim.t(40)));

        // Ready: q starts in the same tick.
        sim.ready.push("p");
        let actions = sim.at(40).tick();
        assert_eq!(lines(&actions)[0], "p: ready after 40 ms");
        assert_eq!(sim.spawned(&actions), ["q"]);
        assert_eq!(wake(&actions), None);
    }

    #[test]
    fn a_failing_probe_is_logged_once_per_change_not_every_tick() {
        let mut sim = Sim::new(vec![svc(
            "xs",
            "ready = \"xenstore\"\nready_key = \"/local/domain/0/x\"",
        )]);
        sim.tick();
        sim.probe_error = Some("xenstore socket /x: connection refused".into());
        let actions = sim.at(20).tick();
        assert_eq!(
            lines(&actions),
            ["xs: readiness probe failing: xenstore socket /x: connection refused"]
        );
        assert!(lines(&sim.at(40).tick()).is_empty());
        assert!(lines(&sim.at(60).tick()).is_empty());
        sim.probe_error = Some("xenstore: EACCES".into());
        assert_eq!(
            lines(&sim.at(80).tick()),
            ["xs: readiness probe failing: xenstore: EACCES"]
        );
        sim.probe_error = None;
        assert_eq!(
            lines(&sim.at(100).tick()),
            ["xs: readiness probe answers again"]
        );
        assert!(lines(&sim.at(120).tick()).is_empty());
        assert_eq!(sim.state("xs"), &State::Starting);
        sim.ready.push("xs");
        assert_eq!(lines(&sim.at(140).tick()), ["xs: ready after 140 ms"]);
    }

    #[test]
    fn a_service_not_ready_in_time_is_killed_and_fails() {
        let mut sim = Sim::new(vec![svc(
            "slow",
            "ready = \"xenstore\"\nready_key = \"/local/domain/0/x\"\nready_timeout_ms = 300",
        )]);
        sim.tick();
        // At the deadline it still has its chance; the timer is due now.
        let actions = sim.at(300).tick();
        assert_eq!(
            actions[0],
            Action::Probe {
                unit: sim.id("slow"),
                probe: Probe::Xenstore("/local/domain/0/x".into()),
            }
        );
        assert!(sim.signals(&actions).is_empty());
        assert_eq!(wake(&actions), Some(sim.t(300)));

        let actions = sim.at(301).tick();
        assert_eq!(sim.signals(&actions), [("slow".into(), Signal::SIGKILL)]);
        assert_eq!(lines(&actions), ["slow: failed: not ready within 300 ms"]);
        assert_eq!(sim.state("slow"), &State::Failed(Failure::NotReady(300)));
        // Still listed with its pid until the process is reaped.
        assert_eq!(sim.status("slow").pid, Some(Pid::from_raw(100)));
        assert_eq!(wake(&actions), None);

        let actions = sim.exit("slow", Exit::Signal(Signal::SIGKILL));
        assert_eq!(
            lines(&actions),
            [
                "slow: exited (signal SIGKILL)",
                "slow: failed: exited (signal SIGKILL)"
            ]
        );
        assert_eq!(sim.status("slow").pid, None);
    }

    #[test]
    fn restarts_back_off_from_250_ms_to_30_s_then_the_service_fails() {
        let mut sim = Sim::new(vec![svc(
            "crasher",
            "ready = \"started\"\nrestart = \"on-failure\"",
        )]);
        sim.tick();
        let mut delays = Vec::new();
        for restart in 1..=RESTART_LIMIT {
            let exited = sim.now + ms(10);
            let actions = sim.set(exited).exit("crasher", Exit::Code(3));
            let State::Backoff { until } = *sim.state("crasher") else {
                panic!("{:?}", sim.state("crasher"));
            };
            let delay = until - exited;
            assert_eq!(
                lines(&actions),
                [
                    "crasher: exited (status 3)".to_owned(),
                    format!("crasher: restart {restart} in {} ms", delay.as_millis()),
                ]
            );
            assert_eq!(sim.status("crasher").restarts, restart);
            delays.push(delay.as_millis());
            // The tick asks to be woken then, and not a moment early does
            // the restart come.
            assert_eq!(wake(&sim.tick()), Some(until));
            let early = sim.set(until - ms(1)).tick();
            assert!(sim.spawned(&early).is_empty());
            let due = sim.set(until).tick();
            assert_eq!(sim.spawned(&due), ["crasher"]);
        }
        assert_eq!(
            delays,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        let actions = sim.exit("crasher", Exit::Code(3));
        assert_eq!(
            lines(&actions)[1],
            "crasher: failed: restart limit (10) reached; last exit status 3"
        );
        assert_eq!(
            sim.state("crasher"),
            &State::Failed(Failure::RestartLimit {
                limit: 10,
                last: Exit::Code(3)
            })
        );
    }

    #[test]
    fn restart_policies_and_oneshots() {
        let mut sim = Sim::new(vec![
            svc("never", "ready = \"started\""),
            svc(
                "on-failure",
                "ready = \"started\"\nrestart = \"on-failure\"",
            ),
            svc("always", "ready = \"started\"\nrestart = \"always\""),
            svc("oneshot", "ready = \"exit\""),
            svc("bad-oneshot", "ready = \"exit\"\nrestart = \"on-failure\""),
        ]);
        sim.tick();
        sim.at(100);
        for name in ["never", "on-failure", "always", "oneshot"] {
            sim.exit(name, Exit::Code(0));
        }
        sim.exit("bad-oneshot", Exit::Code(1));
        assert_eq!(
            sim.state("never"),
            &State::Failed(Failure::Exited(Exit::Code(0)))
        );
        // A clean exit is no failure to restart from...
        assert_eq!(
            sim.state("on-failure"),
            &State::Failed(Failure::Exited(Exit::Code(0)))
        );
        // ... unless the policy is `always`.
        assert_eq!(sim.state("always"), &State::Backoff { until: sim.t(350) });
        // A oneshot that exits 0 is done: up, for what starts after it.
        assert_eq!(sim.state("oneshot"), &State::Done);
        assert_eq!(sim.status("oneshot").ready_after, Some(ms(100)));
        assert_eq!(
            sim.state("bad-oneshot"),
            &State::Backoff { until: sim.t(350) }
        );
        let actions = sim.at(350).tick();
        assert_eq!(sim.spawned(&actions), ["always", "bad-oneshot"]);
    }

    #[test]
    fn reaped_orphans_are_logged() {
        let mut sim = Sim::new(vec![svc("a", "ready = \"started\"")]);
        sim.tick();
        let actions = sim.feed(Event::Exited {
            pid: Pid::from_raw(4242),
            exit: Exit::Signal(Signal::SIGTERM),
        });
        assert_eq!(lines(&actions), ["reaped orphan 4242 (signal SIGTERM)"]);
        assert_eq!(sim.state("a"), &State::Ready);
    }

    /// A boot-critical service that keeps failing and restarting fails the
    /// boot once its readiness timeout has passed since its first start,
    /// not after the whole restart sequence.
    #[test]
    fn a_critical_service_restarting_fails_the_boot_by_its_first_deadline() {
        let mut sim = Sim::new(vec![svc(
            "upd",
            "ready = \"notify\"\nboot_critical = true\nrestart = \"on-failure\"\nready_timeout_ms = 1000",
        )]);
        sim.tick();
        let mut failed = None;
        for step in 0..40 {
            let at = step * 100;
            let actions = if sim.state("upd") == &State::Starting {
                sim.at(at);
                sim.exit("upd", Exit::Code(1))
            } else {
                sim.at(at).tick()
            };
            if let Some(a) = actions
                .iter()
                .find(|a| matches!(a, Action::BootFailed { .. }))
            {
                failed = Some((at, a.clone()));
                break;
            }
        }
        let (at, action) = failed.expect("the boot never failed");
        assert!((1000..=1300).contains(&at), "failed at {at} ms");
        assert_eq!(
            action,
            Action::BootFailed {
                service: "upd".into(),
                reason: Failure::NeverReady(1000)
            }
        );
    }

    #[test]
    fn the_health_gate_opens_once_every_critical_service_is_up() {
        let mut sim = Sim::new(vec![
            svc("k1", "ready = \"started\"\nboot_critical = true"),
            svc("k2", "ready = \"notify\"\nboot_critical = true"),
            svc("mark-good", "ready = \"exit\"\nboot_complete = true"),
            svc("other", "ready = \"started\""),
        ]);
        let actions = sim.tick();
        // The hook waits for the gate; what comes after it does not.
        assert_eq!(sim.spawned(&actions), ["k1", "k2", "other"]);
        assert!(!actions.contains(&Action::BootReady));

        let k2 = sim.id("k2");
        sim.at(50).feed(Event::Notified { unit: k2 });
        let actions = sim.tick();
        let hook = sim.id("mark-good");
        assert_eq!(
            actions[..2],
            [Action::BootReady, Action::Spawn(hook)],
            "the marker comes before the hooks start"
        );
        assert_eq!(
            sim.tick()
                .iter()
                .filter(|a| **a == Action::BootReady)
                .count(),
            0
        );

        // A critical service failing after the gate is no boot failure.
        let actions = sim.exit("k1", Exit::Code(1));
        assert_eq!(
            lines(&actions),
            ["k1: exited (status 1)", "k1: failed: exited (status 1)"]
        );
        assert!(!actions
            .iter()
            .any(|a| matches!(a, Action::BootFailed { .. })));
    }

    #[test]
    fn a_critical_failure_is_reported_once_and_fails_what_requires_it() {
        let mut sim = Sim::new(vec![
            svc("xenstored", "ready = \"started\"\nboot_critical = true"),
            svc("qdomd", "ready = \"started\"\nboot_critical = true"),
            svc("console", "ready = \"started\"\nrequires = [\"xenstored\"]"),
            svc("late", "ready = \"started\"\nafter = [\"xenstored\"]"),
            svc("mark-good", "ready = \"exit\"\nboot_complete = true"),
        ]);
        sim.broken = vec!["xenstored", "qdomd"];
        let actions = sim.tick();
        let cannot_start = |program: &str| Failure::CannotStart {
            program: program.into(),
            error: ENOENT.into(),
        };
        let failed: Vec<_> = actions
            .iter()
            .filter(|a| matches!(a, Action::BootFailed { .. }))
            .collect();
        assert_eq!(
            failed,
            [&Action::BootFailed {
                service: "xenstored".into(),
                reason: cannot_start("/bin/xenstored"),
            }]
        );
        assert_eq!(
            sim.state("qdomd"),
            &State::Failed(cannot_start("/bin/qdomd"))
        );
        assert_eq!(
            sim.state("console"),
            &State::Failed(Failure::Required("xenstored".into()))
        );
        assert_eq!(
            lines(&actions)[2],
            "console: failed: required service xenstored failed"
        );
        // `after` is ordering only: it waits, it does not fail.
        assert_eq!(sim.state("late"), &State::Waiting);
        assert_eq!(sim.state("mark-good"), &State::Waiting);
        assert_eq!(sim.spawned(&actions), ["xenstored", "qdomd"]);
    }

    /// a ← b ← c, and a oneshot that is done.
    fn running_chain() -> Sim {
        let mut sim = Sim::new(vec![
            svc("a", "ready = \"started\""),
            svc("b", "ready = \"started\"\nrequires = [\"a\"]"),
            svc("once", "ready = \"exit\"\nafter = [\"a\"]"),
            svc(
                "c",
                "ready = \"started\"\nafter = [\"b\"]\nstop_signal = \"SIGINT\"",
            ),
        ]);
        sim.tick();
        sim.exit("once", Exit::Code(0));
        sim
    }

    #[test]
    fn shutdown_stops_one_service_at_a_time_in_reverse_order() {
        let mut sim = running_chain();
        assert!(sim.feed(Event::Shutdown(Shutdown::Poweroff)).is_empty());
        let actions = sim.at(1000).tick();
        assert_eq!(actions[0], Action::CloseControl);
        assert_eq!(sim.signals(&actions), [("c".into(), Signal::SIGINT)]);
        assert_eq!(lines(&actions), ["c: stopping (pid 103, SIGINT)"]);
        assert_eq!(wake(&actions), Some(sim.t(6000)));
        // A second request changes nothing: the first one wins.
        sim.feed(Event::Shutdown(Shutdown::Reboot));
        let mut log = Vec::new();
        for name in ["c", "b", "a"] {
            log.extend(lines(&sim.exit(name, Exit::Signal(Signal::SIGTERM))));
            let actions = sim.tick();
            log.extend(lines(&actions));
            if name == "a" {
                assert_eq!(actions, [Action::Finished(Shutdown::Poweroff)]);
            }
        }
        assert_eq!(
            log,
            [
                "c: stopped (signal SIGTERM)",
                "b: stopping (pid 101, SIGTERM)",
                "b: stopped (signal SIGTERM)",
                "a: stopping (pid 100, SIGTERM)",
                "a: stopped (signal SIGTERM)",
            ]
        );
        for s in sim.units.status() {
            assert_eq!(s.state, ServiceState::Stopped, "{s:?}");
        }
    }

    #[test]
    fn a_stop_timeout_escalates_to_sigkill() {
        let mut sim = Sim::new(vec![
            svc("first", "ready = \"started\""),
            svc("stubborn", "ready = \"started\"\nstop_timeout_ms = 500"),
        ]);
        sim.tick();
        sim.feed(Event::Shutdown(Shutdown::Reboot));
        let actions = sim.at(1000).tick();
        assert_eq!(
            sim.signals(&actions),
            [("stubborn".into(), Signal::SIGTERM)]
        );
        assert_eq!(wake(&actions), Some(sim.t(1500)));
        let actions = sim.at(1499).tick();
        assert_eq!(actions, [Action::Wake(Some(sim.t(1500)))]);

        let actions = sim.at(1500).tick();
        assert_eq!(
            sim.signals(&actions),
            [("stubborn".into(), Signal::SIGKILL)]
        );
        assert_eq!(
            lines(&actions),
            ["stubborn: not stopped after 500 ms; killing"]
        );
        assert_eq!(wake(&actions), None, "once is enough");
        // The next one waits for the process to be gone.
        assert_eq!(sim.at(5000).tick(), [Action::Wake(None)]);

        let actions = sim.exit("stubborn", Exit::Signal(Signal::SIGKILL));
        assert_eq!(lines(&actions), ["stubborn: stopped (signal SIGKILL)"]);
        let actions = sim.tick();
        assert_eq!(sim.signals(&actions), [("first".into(), Signal::SIGTERM)]);
        sim.exit("first", Exit::Code(0));
        assert_eq!(sim.tick(), [Action::Finished(Shutdown::Reboot)]);
    }

    #[test]
    fn services_without_a_process_are_passed_over_and_not_restarted() {
        let mut sim = Sim::new(vec![
            svc("waiting", "ready = \"started\"\nafter = [\"never-ready\"]"),
            svc("never-ready", "ready = \"notify\""),
            svc("crasher", "ready = \"started\"\nrestart = \"always\""),
        ]);
        sim.tick();
        sim.at(10).exit("crasher", Exit::Code(1));
        sim.feed(Event::Shutdown(Shutdown::Poweroff));
        let actions = sim.at(20).tick();
        // The crasher in backoff is passed over; never-ready is stopped.
        assert_eq!(
            sim.signals(&actions),
            [("never-ready".into(), Signal::SIGTERM)]
        );
        assert_eq!(sim.state("crasher"), &State::STOPPED);
        // Its restart was due at 260 ms: it does not come.
        let late = sim.at(1000).tick();
        assert!(sim.spawned(&late).is_empty());
        sim.exit("never-ready", Exit::Signal(Signal::SIGTERM));
        assert_eq!(sim.tick(), [Action::Finished(Shutdown::Poweroff)]);
        assert_eq!(sim.state("waiting"), &State::STOPPED);
    }

    #[test]
    fn control_status_start_stop_and_restart() {
        let mut sim = running_chain();
        let no_service = |name: &str| ControlError::NoService(name.into());

        let (reply, actions) = sim.control(Request::Status);
        assert!(actions.is_empty());
        let Ok(Reply::Status(status)) = reply else {
            panic!("{reply:?}");
        };
        assert_eq!(
            status
                .iter()
                .map(ServiceStatus::to_line)
                .collect::<Vec<_>>(),
            [
                "a state=ready pid=100 restarts=0 ready_ms=0",
                "b state=ready pid=101 restarts=0 ready_ms=0",
                "once state=done pid=- restarts=0 ready_ms=0",
                "c state=ready pid=103 restarts=0 ready_ms=0",
            ]
        );

        assert_eq!(
            sim.control(Request::Stop("zz".into())).0,
            Err(no_service("zz"))
        );
        assert_eq!(
            sim.control(Request::Start("a".into())).0,
            Err(ControlError::NotStartable {
                name: "a".into(),
                state: ServiceState::Ready,
            })
        );

        // restart: stopped, then started again once the process is gone.
        let (reply, actions) = sim.at(100).control(Request::Restart("a".into()));
        assert_eq!(reply, Ok(Reply::Accepted));
        assert_eq!(sim.signals(&actions), [("a".into(), Signal::SIGTERM)]);
        assert_eq!(
            sim.state("a"),
            &State::Stopped {
                kill_at: Some(sim.t(5100)),
                then_start: true
            }
        );
        let actions = sim.exit("a", Exit::Code(0));
        assert_eq!(lines(&actions), ["a: stopped (status 0)"]);
        assert_eq!(sim.state("a"), &State::Waiting);
        let actions = sim.tick();
        assert_eq!(sim.spawned(&actions), ["a"]);
        assert_eq!(sim.pid("a"), Pid::from_raw(104));

        // stop, and a start while it is still stopping: started once gone.
        let (reply, _) = sim.control(Request::Stop("c".into()));
        assert_eq!(reply, Ok(Reply::Accepted));
        assert_eq!(
            sim.control(Request::Start("c".into())).0,
            Ok(Reply::Accepted)
        );
        sim.exit("c", Exit::Signal(Signal::SIGINT));
        assert_eq!(sim.tick_spawns(), ["c"]);

        // stop without a restart leaves it stopped.
        assert_eq!(
            sim.control(Request::Stop("c".into())).0,
            Ok(Reply::Accepted)
        );
        sim.exit("c", Exit::Signal(Signal::SIGINT));
        assert_eq!(sim.state("c"), &State::STOPPED);
        assert!(sim.tick_spawns().is_empty());
        assert_eq!(
            sim.control(Request::Start("c".into())).1,
            [],
            "a start only makes it wait for its turn"
        );
        assert_eq!(sim.tick_spawns(), ["c"]);
    }

    #[test]
    fn start_and_restart_reset_the_restart_count() {
        let mut sim = Sim::new(vec![svc(
            "crasher",
            "ready = \"started\"\nrestart = \"on-failure\"",
        )]);
        sim.tick();
        for _ in 0..=RESTART_LIMIT {
            sim.exit("crasher", Exit::Code(1));
            let State::Backoff { until } = *sim.state("crasher") else {
                break;
            };
            sim.set(until).tick();
        }
        assert!(matches!(
            sim.state("crasher"),
            State::Failed(Failure::RestartLimit { .. })
        ));
        assert_eq!(
            sim.control(Request::Start("crasher".into())).0,
            Ok(Reply::Accepted)
        );
        assert_eq!(sim.status("crasher").restarts, 0);
        assert_eq!(sim.tick_spawns(), ["crasher"]);

        // In backoff, a restart starts it now rather than after the delay.
        sim.exit("crasher", Exit::Code(1));
        assert!(matches!(sim.state("crasher"), State::Backoff { .. }));
        assert_eq!(
            sim.control(Request::Restart("crasher".into())).0,
            Ok(Reply::Accepted)
        );
        assert_eq!(sim.tick_spawns(), ["crasher"]);
        assert_eq!(sim.status("crasher").restarts, 0);
    }

    #[test]
    fn reboot_and_poweroff_by_request_first_one_wins() {
        let mut sim = running_chain();
        assert_eq!(
            sim.control(Request::Reboot),
            (Ok(Reply::ShuttingDown(Shutdown::Reboot)), vec![])
        );
        // Answered as asked, but the reboot stands.
        assert_eq!(
            sim.control(Request::Poweroff).0,
            Ok(Reply::ShuttingDown(Shutdown::Poweroff))
        );
        let actions = sim.tick();
        assert_eq!(actions[0], Action::CloseControl);
        for name in ["c", "b", "a"] {
            sim.exit(name, Exit::Code(0));
            sim.tick();
        }
        assert_eq!(sim.tick(), [Action::Finished(Shutdown::Reboot)]);
    }

    /// The kernel log priority follows the level: failures are errors, an
    /// unasked exit and a SIGKILL after the stop timeout are warnings.
    #[test]
    fn notices_keep_their_log_levels() {
        let name = || "s".to_owned();
        let pid = Pid::from_raw(1);
        let exit = Exit::Code(1);
        let cases = [
            (
                Notice::Failed {
                    name: name(),
                    reason: Failure::Exited(exit),
                },
                log::Level::Error,
            ),
            (Notice::Exited { name: name(), exit }, log::Level::Warn),
            (
                Notice::Killing {
                    name: name(),
                    timeout_ms: 1,
                },
                log::Level::Warn,
            ),
            (Notice::Started { name: name(), pid }, log::Level::Info),
            (
                Notice::Ready {
                    name: name(),
                    after: ms(1),
                },
                log::Level::Info,
            ),
            (Notice::Completed { name: name() }, log::Level::Info),
            (
                Notice::Restarting {
                    name: name(),
                    restart: 1,
                    delay: ms(1),
                },
                log::Level::Info,
            ),
            (
                Notice::Stopping {
                    name: name(),
                    pid,
                    signal: Signal::SIGTERM,
                },
                log::Level::Info,
            ),
            (Notice::Stopped { name: name(), exit }, log::Level::Info),
            (Notice::Orphan { pid, exit }, log::Level::Info),
        ];
        for (notice, level) in cases {
            assert_eq!(notice.level(), level, "{notice}");
        }
    }
}
