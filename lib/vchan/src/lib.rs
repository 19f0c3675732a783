//! A vchan in Rust, byte-compatible with Xen's `libxenvchan` and Qubes'
//! `libvchan-xen` on top of it, so a Qubes VM's unmodified agents can talk
//! to it.
//!
//! - [`layout`]: the shared page (`struct vchan_interface`) and ring sizes.
//! - [`ring`]: the ring protocol of one end, without devices.
//! - [`conn`]: a connection: either end's setup over the devices, the
//!   xenstore advertisement, I/O that reports a dead peer.
//! - `asyncio` (feature `tokio`): the same connection under tokio.
//! - [`sys`]: the Linux Xen devices (event channels, grant sharing and
//!   mapping, the event-channel status hypercall).

#[cfg(feature = "tokio")]
pub mod asyncio;
pub mod conn;
pub mod layout;
pub mod ring;
pub mod sys;

pub use conn::{State, Vchan, VchanError};
