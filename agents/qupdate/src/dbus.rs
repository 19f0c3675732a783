//! `org.qubesos.Update1`: the names both sides agree on, the errors the
//! service returns, and the client proxy.
//!
//! Interface (object `/org/qubesos/Update1`):
//! - `Apply(h bundle, y tries, b force, u stall_timeout_s) -> t id`: starts
//!   installing the bundle read from the passed file descriptor (a file or
//!   a pipe) and returns at once; the end is the `Completed` signal with
//!   the same id. The arguments are `qupdate apply`'s `--tries`, `--force`
//!   and `--stall-timeout` (checked by `ApplyOptions::check`). A second
//!   `Apply` while one runs fails with `Busy` at once.
//! - `MarkGood() -> s slot`, `Rollback() -> s slot`: as the CLI's commands;
//!   they run while an apply is under way (they take only the state lock).
//! - Properties: `Operation` (s: idle, apply, mark-good, rollback),
//!   `Progress` ((stt): phase, bytes done, bytes total), `LastError` (s,
//!   empty if none), `Status` (s: the JSON of `qupdate status --json`).
//! - Signal `Completed(t id, b success, s result)`: the JSON of the install
//!   on success, the error on failure.
//!
//! Who may own and call it is `qcontract::bus::UPDATE1` (root only): the
//! bus enforces it (agents/qbus) and the service checks every call and
//! property read against it again.

use qcontract::bus::UPDATE1;

pub const BUS_NAME: &str = UPDATE1.name;
pub const OBJECT_PATH: &str = UPDATE1.path;
pub const INTERFACE: &str = UPDATE1.name;

/// Errors on the bus: `org.qubesos.Update1.Error.<Variant>`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.qubesos.Update1.Error")]
pub enum ServiceError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// Another operation is under way (in the service or a direct `qupdate`).
    Busy(String),
    /// The caller is not the service's user.
    AccessDenied(String),
    InvalidArgs(String),
    /// The operation failed; the message is the whole cause chain.
    Failed(String),
}

#[zbus::proxy(
    interface = "org.qubesos.Update1",
    default_service = "org.qubesos.Update1",
    default_path = "/org/qubesos/Update1"
)]
pub trait Update1 {
    fn apply(
        &self,
        bundle: zbus::Fd<'_>,
        tries: u8,
        force: bool,
        stall_timeout_s: u32,
    ) -> Result<u64, ServiceError>;
    fn mark_good(&self) -> Result<String, ServiceError>;
    fn rollback(&self) -> Result<String, ServiceError>;

    #[zbus(property)]
    fn operation(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<(String, u64, u64)>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn status(&self) -> zbus::Result<String>;

    #[zbus(signal)]
    fn completed(&self, id: u64, success: bool, result: String) -> zbus::Result<()>;
}
