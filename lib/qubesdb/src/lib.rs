//! QubesDB as Qubes R4.2 speaks it (core-qubesdb `include/qubesdb.h`,
//! `daemon/db-cmds.c`, `daemon/db-core.c`), without I/O:
//!
//! - [`wire`]: the 72-byte `struct qdb_hdr` and its checks;
//! - [`db`]: the database (sorted paths, directory removal) and watches;
//! - [`local`]: the local socket's commands for dom0 tools, and
//!   [`client`], a blocking client of that socket;
//! - [`peer`]: dom0's end of the vchan to a VM's daemon, as a state
//!   machine (bytes in, bytes out), so a hostile VM is handled in code
//!   that is tested and fuzzed without Xen.

pub mod client;
pub mod db;
pub mod local;
pub mod peer;
pub mod wire;

/// The vchan port of QubesDB; dom0's daemon is the server.
pub const VCHAN_PORT: u32 = 111;
/// Ring sizes dom0's daemon asks for (`libvchan_server_init(.., 4096, 4096)`).
pub const VCHAN_RING: usize = 4096;

/// Where dom0's daemon for `vm` listens for dom0's tools (Qubes uses
/// `/var/run/qubes/qubesdb.<vm>.sock`; /var/run is /run here). dom0's own
/// database, which has no VM end, is `qubesdb.sock`.
pub fn socket_path(vm: Option<&str>) -> std::path::PathBuf {
    match vm {
        Some(name) => format!("{SOCKET_DIR}/qubesdb.{name}.sock").into(),
        None => format!("{SOCKET_DIR}/qubesdb.sock").into(),
    }
}

pub const SOCKET_DIR: &str = "/run/qubes";
