//! `qlab`: one scenario suite for nested QEMU and for real machines.
//!
//! - [`target`]: what a machine under test can do (flash, power, serial),
//!   with a QEMU target and a lab target driven by the lab's own commands;
//! - [`scenario`]: the scenarios, written once against a target;
//! - [`flash`]: the image a run writes (disk image plus update bundles);
//! - [`runner`]: runs scenarios with a live progress line and keeps the
//!   serial logs, [`junit`] and [`hcl`] are what it reports;
//! - [`lava`]: the same scenarios as LAVA jobs, for labs with many machines.

pub mod flash;
pub mod hcl;
pub mod junit;
pub mod lava;
pub mod runner;
pub mod scenario;
pub mod target;
