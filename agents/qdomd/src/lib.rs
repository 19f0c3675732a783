//! qdomd: the dom0 domain agent.
//!
//! [`definition`] reads the VM definitions (shipped and machine-local),
//! [`xl`] turns one into the configuration Xen's `xl create` takes,
//! [`qdb`] into the QubesDB entries the VM starts with,
//! [`lifecycle`] is the state machine that starts, watches and restarts
//! domains (with `qbackoff`'s restart delays), and [`xs`] turns xenstore watch firings into
//! its events; [`daemon`] runs it against xenstore and `xl`, and
//! [`service`] serves `org.qubesos.Domains1` ([`dbus`]); [`policy`] is
//! the qrexec policy daemon, and [`admin`] the Admin API the GUI VM
//! calls through qrexec, both on [`rootsock`]'s root-only sockets.

pub mod admin;
pub mod daemon;
pub mod dbus;
pub mod definition;
pub mod lifecycle;
pub mod policy;
pub mod qdb;
pub mod rootsock;
pub mod service;
pub mod trust;
pub mod xl;
pub mod xs;
