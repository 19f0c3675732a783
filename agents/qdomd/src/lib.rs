//! qdomd: the dom0 domain agent.
//!
//! [`definition`] reads the VM definitions (shipped and machine-local),
//! [`xl`] turns one into the configuration Xen's `xl create` takes,
//! [`lifecycle`] is the state machine that starts, watches and restarts
//! domains (with [`backoff`]), and [`xs`] turns xenstore watch firings into
//! its events.

pub mod backoff;
pub mod definition;
pub mod lifecycle;
pub mod xl;
pub mod xs;
