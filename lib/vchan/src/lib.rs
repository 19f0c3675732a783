//! A vchan in Rust, byte-compatible with Xen's `libxenvchan` and Qubes'
//! `libvchan-xen` on top of it, so a Qubes VM's unmodified agents can talk
//! to it.
//!
//! - [`layout`]: the shared page (`struct vchan_interface`) and ring sizes.
//! - [`ring`]: the ring protocol of one end, without devices.
//! - [`sys`]: the Linux Xen devices (event channels, grant sharing and
//!   mapping, the event-channel status hypercall).

// The connection layer (setup, the xenstore advertisement, blocking I/O)
// comes with the xenstore client it needs (issue 13).
pub mod layout;
pub mod ring;
pub mod sys;
