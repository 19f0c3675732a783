//! A xenstore client, one for every program here (qinit's probe, qdomd,
//! the guest stand-in, the vchan connection layer).
//!
//! - [`wire`]: the protocol of Xen's `xs_wire.h`: message types, the
//!   16-byte header, payload rules and reply parsing, without I/O.
//! - [`client`]: a blocking client over xenstored's unix socket (dom0) or
//!   the `/dev/xen/xenbus` device (a guest), with transactions, watches
//!   queued beside replies, and a timeout on every reply.
//!
//! Everything a xenstore daemon sends is treated as hostile: lengths are
//! checked before allocation, a reply must answer the request it claims
//! to, and a malformed message is an error that names what was wrong.

pub mod client;
pub mod wire;

pub use client::{Transaction, Xs, XsError};
pub use wire::{Perm, PermKind, WatchEvent};
