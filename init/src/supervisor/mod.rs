//! The service supervisor, in two parts:
//!
//! - [`units`]: the state machine, free of I/O. Events in (a process
//!   exited, a readiness notification or probe result, a control or
//!   shutdown request, the loop's tick, each with "now"), actions out
//!   (spawn, probe, signal, log, the boot hooks, a control reply, when to
//!   tick next). Dependency order, readiness, restarts with backoff,
//!   boot-critical failure, the stop order and stop timeouts all live
//!   there, and its tests run without root.
//! - [`executor`]: the thin loop that owns epoll, the signalfd, the
//!   timerfd, the child processes, their output pipes ([`output`]) and
//!   notify sockets, and the control socket; it turns what happens into
//!   events and carries out the actions. `init/tests/supervisor.rs` runs
//!   it for real, as PID 1 of a namespace.

pub mod executor;
pub mod output;
pub mod units;

pub use crate::control::Shutdown;
pub use executor::{handled_signals, Hooks, Paths, Supervisor, SupervisorError};
