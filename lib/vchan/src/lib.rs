//! A vchan in Rust, byte-compatible with Xen's `libxenvchan` and Qubes'
//! `libvchan-xen` on top of it, so a Qubes VM's unmodified agents can talk
//! to it.
//!
//! - [`layout`]: the shared page (`struct vchan_interface`) and ring sizes.
//! - [`ring`]: the ring protocol of one end, without devices.
//! - [`sys`]: the Linux Xen devices (event channels, grant sharing and
//!   mapping, the event-channel status hypercall).
//! - [`Vchan`]: either end, set up and advertised the way libvchan-xen
//!   does it, with blocking reads and writes and an event descriptor for
//!   poll loops.

// The connection (conn.rs, xs.rs) is enabled with the xenstore client.
pub mod layout;
pub mod ring;
pub mod sys;
