//! qrexec as Qubes R4.1/R4.2 speak it (core-qrexec `libqrexec/qrexec.h`),
//! without I/O.
//!
//! - [`wire`]: the 8-byte message header, the message types and the
//!   payload structures, each parsed from hostile bytes with its checks.

pub mod wire;
