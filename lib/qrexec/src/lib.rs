//! qrexec as Qubes R4.1/R4.2 speak it (core-qrexec `libqrexec/qrexec.h`),
//! without I/O.
//!
//! - [`wire`]: the 8-byte message header, the message types and the
//!   payload structures, each parsed from hostile bytes with its checks;
//! - [`framer`]: a byte stream into messages, lengths checked first;
//! - `data` (feature `io`): a data connection's pump over a vchan;
//! - [`cmdline`]: the command lines (`user:command`, `QUBESRPC`) and the
//!   service-name rules;
//! - [`service`]: where a called service lives and what it is told.

pub mod cmdline;
#[cfg(feature = "io")]
pub mod data;
pub mod framer;
pub mod service;
pub mod wire;

/// Where a VM's daemon listens for dom0's `qrexec-client`
/// (`/var/run/qubes/qrexec.<domid>`, with a `qrexec.<name>` link; /var/run
/// is /run here).
pub fn socket_path(vm: &str) -> std::path::PathBuf {
    format!("{SOCKET_DIR}/qrexec.{vm}").into()
}

pub const SOCKET_DIR: &str = "/run/qubes";
/// Where a VM's agent takes service calls from `qrexec-client-vm`
/// (`/var/run/qubes/qrexec-agent`; /var/run is /run in a Qubes VM).
pub const AGENT_TRIGGER_SOCKET: &str = "/run/qubes/qrexec-agent";
/// `qrexec-client-vm`'s exit code when the call is refused
/// (`QREXEC_EXIT_REQUEST_REFUSED`).
pub const EXIT_REQUEST_REFUSED: i32 = 126;
/// The first data port the daemon hands out (`VCHAN_BASE_DATA_PORT`).
pub const FIRST_DATA_PORT: u32 = wire::VCHAN_BASE_PORT + 1;
/// How many data ports a daemon has (`MAX_CLIENTS`-sized table).
pub const DATA_PORTS: u32 = 256;
/// Ring size of a data vchan (qrexec-client's `libvchan_server_init`).
pub const DATA_RING: usize = 65536;
/// Ring size of the control vchan (the agent's `libvchan_server_init`).
pub const CONTROL_RING: usize = 4096;
