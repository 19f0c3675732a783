//! The domain state machine, free of I/O: events in (requests, xl results,
//! what the xenstore watches saw, timers), actions out (run xl, arm a timer,
//! watch a readiness key, announce). The daemon executes the actions; tests
//! drive it directly or through [`crate::xs::Tracker`] over a fake store.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use qbackoff::Backoff;

use crate::definition::{Domain, RestartPolicy, Role};

/// How long a clean shutdown may take before the domain is destroyed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Stopped,
    /// `xl create` is running, the domain has not shown up yet, or it is
    /// paused while its QubesDB is filled.
    Starting,
    /// The domain exists; its readiness key is not written yet.
    Running,
    /// The guest wrote its readiness key.
    Ready,
    /// A shutdown was asked for.
    Stopping,
    /// Gone without being asked; a restart is due after a delay.
    Backoff,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Ready => "ready",
            Self::Stopping => "stopping",
            Self::Backoff => "backoff",
        }
    }

    /// The domain exists and runs (Qubes' `Running`).
    pub fn is_up(self) -> bool {
        matches!(self, Self::Running | Self::Ready)
    }

    /// No domain, and none on its way (Qubes' `Halted`).
    pub fn is_halted(self) -> bool {
        matches!(self, Self::Stopped | Self::Backoff)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    Restart,
    StopTimeout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A user (D-Bus, CLI) or autostart asks for the domain.
    Start(String),
    /// A user asks for a clean shutdown.
    Stop(String),
    /// A user asks for it to be destroyed now.
    Kill(String),
    /// `xl create` finished.
    Created {
        name: String,
        result: Result<(), String>,
    },
    /// The domain list in xenstore has `name` as `domid`.
    Appeared { name: String, domid: u32 },
    /// `domid` left the domain list.
    Gone { domid: u32 },
    /// `domid` wrote its readiness key.
    ReadyKey { domid: u32 },
    /// The QubesDB daemon for `domid` is up and filled (and the domain
    /// unpaused, if that was asked), or it could not be.
    QubesDbUp {
        domid: u32,
        result: Result<(), String>,
    },
    /// The QubesDB daemon for `domid` exited; `clean` when it said its
    /// domain is gone (exit status 0).
    QubesDbExited { domid: u32, clean: bool },
    /// The qrexec daemon for `domid` exited (`clean` as above).
    QrexecExited { domid: u32, clean: bool },
    /// A timer armed by [`Action::Timer`] fired.
    Timer {
        name: String,
        kind: TimerKind,
        generation: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Create {
        name: String,
    },
    Shutdown {
        name: String,
        domid: u32,
    },
    Destroy {
        name: String,
        domid: u32,
    },
    Timer {
        name: String,
        kind: TimerKind,
        generation: u64,
        after: Duration,
    },
    WatchReady {
        name: String,
        domid: u32,
    },
    /// Start the domain's QubesDB daemon, fill it from the definition
    /// (with the GUI VM's domain, for a VM that is not the GUI VM), then
    /// unpause the domain if `unpause`.
    StartQubesDb {
        name: String,
        domid: u32,
        gui_domid: Option<u32>,
        unpause: bool,
    },
    /// Start the domain's qrexec daemon (once it runs).
    StartQrexec {
        name: String,
        domid: u32,
        default_user: String,
    },
    /// The phase changed (for the D-Bus signal and the log).
    Changed {
        name: String,
        phase: Phase,
        domid: Option<u32>,
    },
    /// The guest is ready; for the GUI VM this is the console marker.
    Ready {
        name: String,
        domid: u32,
        gui: bool,
    },
}

#[derive(Debug)]
pub struct DomainState {
    pub def: Domain,
    pub phase: Phase,
    pub domid: Option<u32>,
    /// Whether it should be running: set by start, cleared by stop and kill.
    pub wanted: bool,
    backoff: Backoff,
    up_since: Option<Instant>,
    timer_generation: u64,
    /// QubesDB daemon restarts in this run of the domain.
    qubesdb_restarts: u32,
    /// qrexec daemon restarts in this run of the domain.
    qrexec_restarts: u32,
}

/// A per-VM daemon (QubesDB, qrexec) that keeps dying is left dead after
/// this many restarts in one run of its domain (the domain itself keeps
/// running).
pub const MAX_DAEMON_RESTARTS: u32 = 5;

#[derive(Debug, Default)]
pub struct Supervisor {
    domains: BTreeMap<String, DomainState>,
}

impl Supervisor {
    pub fn new(defs: impl IntoIterator<Item = Domain>) -> Self {
        let domains = defs
            .into_iter()
            .map(|d| {
                let backoff = d.restart.backoff();
                (
                    d.name.clone(),
                    DomainState {
                        def: d,
                        phase: Phase::Stopped,
                        domid: None,
                        wanted: false,
                        backoff,
                        up_since: None,
                        timer_generation: 0,
                        qubesdb_restarts: 0,
                        qrexec_restarts: 0,
                    },
                )
            })
            .collect();
        Self { domains }
    }

    pub fn get(&self, name: &str) -> Option<&DomainState> {
        self.domains.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &DomainState> {
        self.domains.values()
    }

    /// Start events for every `autostart` domain.
    pub fn autostart(&self) -> Vec<Event> {
        self.domains
            .values()
            .filter(|d| d.def.autostart)
            .map(|d| Event::Start(d.def.name.clone()))
            .collect()
    }

    /// Start events for every running domain's stop, for qdomd's own stop.
    pub fn stop_all(&self) -> Vec<Event> {
        self.domains
            .values()
            .filter(|d| d.domid.is_some() || d.phase == Phase::Backoff)
            .map(|d| Event::Stop(d.def.name.clone()))
            .collect()
    }

    /// Whether nothing is left running (every domain stopped).
    pub fn all_stopped(&self) -> bool {
        self.domains
            .values()
            .all(|d| d.domid.is_none() && d.phase != Phase::Starting)
    }

    fn by_domid(&mut self, domid: u32) -> Option<&mut DomainState> {
        self.domains.values_mut().find(|d| d.domid == Some(domid))
    }

    /// The running GUI VM's domain, for the VMs it serves.
    fn gui_domid(&self, except: &str) -> Option<u32> {
        self.domains
            .values()
            .find(|d| d.def.role == Role::Gui && d.def.name != except)
            .and_then(|d| d.domid)
    }

    pub fn handle(&mut self, ev: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match ev {
            Event::Start(name) => {
                if let Some(d) = self.domains.get_mut(&name) {
                    d.wanted = true;
                    if d.phase.is_halted() {
                        d.timer_generation += 1;
                        set(d, Phase::Starting, &mut out);
                        out.push(Action::Create { name });
                    }
                }
            }
            Event::Stop(name) => {
                if let Some(d) = self.domains.get_mut(&name) {
                    d.wanted = false;
                    match (d.phase, d.domid) {
                        (Phase::Backoff, _) => {
                            d.timer_generation += 1;
                            set(d, Phase::Stopped, &mut out);
                        }
                        // Paused while its QubesDB is filled: it could not
                        // act on a shutdown request.
                        (Phase::Starting, Some(domid)) => {
                            set(d, Phase::Stopping, &mut out);
                            out.push(Action::Destroy { name, domid });
                        }
                        (Phase::Running | Phase::Ready, Some(domid)) => {
                            set(d, Phase::Stopping, &mut out);
                            out.push(Action::Shutdown {
                                name: name.clone(),
                                domid,
                            });
                            out.push(arm(d, TimerKind::StopTimeout, STOP_TIMEOUT));
                        }
                        // Starting without a domid yet: stopped when it
                        // appears (wanted is false now).
                        _ => {}
                    }
                }
            }
            Event::Kill(name) => {
                if let Some(d) = self.domains.get_mut(&name) {
                    d.wanted = false;
                    d.timer_generation += 1;
                    match d.domid {
                        Some(domid) => {
                            set(d, Phase::Stopping, &mut out);
                            out.push(Action::Destroy { name, domid });
                        }
                        None if d.phase == Phase::Backoff => set(d, Phase::Stopped, &mut out),
                        None => {}
                    }
                }
            }
            Event::Created { name, result } => {
                if let Some(d) = self.domains.get_mut(&name) {
                    if let Err(reason) = result {
                        log::warn!("{name}: xl create failed: {reason}");
                        if d.phase == Phase::Starting && d.domid.is_none() {
                            failed(d, &mut out);
                        }
                    }
                }
            }
            Event::Appeared { name, domid } => {
                let gui_domid = self.gui_domid(&name);
                if let Some(d) = self.domains.get_mut(&name) {
                    if d.domid == Some(domid) {
                        return out;
                    }
                    d.domid = Some(domid);
                    d.up_since = Some(now);
                    d.qubesdb_restarts = 0;
                    d.qrexec_restarts = 0;
                    if d.phase == Phase::Starting && !d.wanted {
                        // Stopped while it was being created (paused).
                        set(d, Phase::Stopping, &mut out);
                        out.push(Action::Destroy { name, domid });
                    } else if d.phase == Phase::Starting {
                        // Created paused: its QubesDB first, then unpause.
                        out.push(Action::StartQubesDb {
                            name,
                            domid,
                            gui_domid,
                            unpause: true,
                        });
                    } else {
                        // Created by hand (`xl create`) or found running
                        // when qdomd started: follow it, and treat it as
                        // wanted until someone stops it.
                        d.wanted = true;
                        set(d, Phase::Running, &mut out);
                        out.push(Action::WatchReady { name, domid });
                    }
                }
            }
            Event::QubesDbUp { domid, result } => {
                if let Some(d) = self.by_domid(domid) {
                    let name = d.def.name.clone();
                    match (result, d.phase) {
                        (Ok(()), Phase::Starting) => {
                            set(d, Phase::Running, &mut out);
                            out.push(Action::WatchReady {
                                name: name.clone(),
                                domid,
                            });
                            out.push(Action::StartQrexec {
                                name,
                                domid,
                                default_user: d.def.qubes.default_user.clone(),
                            });
                        }
                        (Ok(()), _) => {}
                        (Err(reason), Phase::Starting) => {
                            // Never run a VM without its database: destroy
                            // it; its disappearance brings the restart
                            // policy.
                            log::error!("{name}: QubesDB: {reason}; destroying domain {domid}");
                            out.push(Action::Destroy { name, domid });
                        }
                        (Err(reason), _) => log::error!("{name}: QubesDB: {reason}"),
                    }
                }
            }
            Event::QrexecExited { domid, clean } => {
                if let Some(d) = self.by_domid(domid) {
                    if !clean && may_restart(d, VmDaemon::Qrexec) {
                        out.push(Action::StartQrexec {
                            name: d.def.name.clone(),
                            domid,
                            default_user: d.def.qubes.default_user.clone(),
                        });
                    }
                }
            }
            Event::QubesDbExited { domid, clean } => {
                let gui = self
                    .by_domid(domid)
                    .map(|d| d.def.name.clone())
                    .and_then(|n| self.gui_domid(&n));
                if let Some(d) = self.by_domid(domid) {
                    if !clean && may_restart(d, VmDaemon::QubesDb) {
                        out.push(Action::StartQubesDb {
                            name: d.def.name.clone(),
                            domid,
                            gui_domid: gui,
                            unpause: false,
                        });
                    }
                }
            }
            Event::ReadyKey { domid } => {
                if let Some(d) = self.by_domid(domid) {
                    if d.phase == Phase::Running {
                        set(d, Phase::Ready, &mut out);
                        out.push(Action::Ready {
                            name: d.def.name.clone(),
                            domid,
                            gui: d.def.role == Role::Gui,
                        });
                    }
                }
            }
            Event::Gone { domid } => {
                if let Some(d) = self.by_domid(domid) {
                    d.domid = None;
                    if let Some(t) = d.up_since.take() {
                        d.backoff.ran_for(now.saturating_duration_since(t));
                    }
                    if d.phase == Phase::Stopping || !d.wanted {
                        d.timer_generation += 1;
                        set(d, Phase::Stopped, &mut out);
                    } else {
                        failed(d, &mut out);
                    }
                }
            }
            Event::Timer {
                name,
                kind,
                generation,
            } => {
                if let Some(d) = self.domains.get_mut(&name) {
                    if generation != d.timer_generation {
                        return out;
                    }
                    match (kind, d.phase, d.domid) {
                        (TimerKind::Restart, Phase::Backoff, _) if d.wanted => {
                            set(d, Phase::Starting, &mut out);
                            out.push(Action::Create { name });
                        }
                        (TimerKind::StopTimeout, Phase::Stopping, Some(domid)) => {
                            log::warn!(
                                "{name}: no clean shutdown within {STOP_TIMEOUT:?}; destroying"
                            );
                            out.push(Action::Destroy { name, domid });
                        }
                        _ => {}
                    }
                }
            }
        }
        out
    }
}

/// The daemons qdomd runs beside each VM.
#[derive(Debug, Clone, Copy)]
enum VmDaemon {
    QubesDb,
    Qrexec,
}

/// Whether a per-VM daemon that exited is started again: only while its
/// VM runs, and at most [`MAX_DAEMON_RESTARTS`] times per run of the VM.
fn may_restart(d: &mut DomainState, which: VmDaemon) -> bool {
    if !d.phase.is_up() {
        return false;
    }
    let (count, what) = match which {
        VmDaemon::QubesDb => (&mut d.qubesdb_restarts, "QubesDB"),
        VmDaemon::Qrexec => (&mut d.qrexec_restarts, "qrexec"),
    };
    let name = &d.def.name;
    if *count < MAX_DAEMON_RESTARTS {
        *count += 1;
        log::warn!("{name}: its {what} daemon exited; restarting it");
        true
    } else {
        log::error!("{name}: its {what} daemon exited {MAX_DAEMON_RESTARTS} times; leaving it");
        false
    }
}

fn set(d: &mut DomainState, phase: Phase, out: &mut Vec<Action>) {
    if d.phase != phase {
        d.phase = phase;
        out.push(Action::Changed {
            name: d.def.name.clone(),
            phase,
            domid: d.domid,
        });
    }
}

fn arm(d: &mut DomainState, kind: TimerKind, after: Duration) -> Action {
    d.timer_generation += 1;
    Action::Timer {
        name: d.def.name.clone(),
        kind,
        generation: d.timer_generation,
        after,
    }
}

/// Gone or failed to start without being asked: restart after a delay,
/// unless the policy says never.
fn failed(d: &mut DomainState, out: &mut Vec<Action>) {
    if d.def.restart.policy == RestartPolicy::Never || !d.wanted {
        d.wanted = false;
        set(d, Phase::Stopped, out);
        return;
    }
    let delay = d.backoff.next_delay();
    set(d, Phase::Backoff, out);
    out.push(arm(d, TimerKind::Restart, delay));
}
