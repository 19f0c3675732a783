//! `org.qubesos.Domains1` at `/org/qubesos/Domains1`:
//! - `List() -> a(ssu)`: every defined domain with its state (stopped,
//!   starting, running, ready, stopping, backoff) and domid (0: none);
//! - `Start(s)`, `Shutdown(s)`, `Kill(s)`: ask for a domain by name; the
//!   result shows in `StateChanged` and `List`;
//! - signal `StateChanged(s name, s state, u domid)`.
//!
//! Who may own and call it is `qcontract::bus::DOMAINS1` (root only): the
//! bus enforces it (agents/qbus) and each call's uid is checked against it
//! again.

use qcontract::bus::DOMAINS1;

pub const BUS_NAME: &str = DOMAINS1.name;
pub const OBJECT_PATH: &str = DOMAINS1.path;
pub const INTERFACE: &str = DOMAINS1.name;

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.qubesos.Domains1.Error")]
pub enum DomainsError {
    #[zbus(error)]
    ZBus(zbus::Error),
    AccessDenied(String),
    /// No definition by that name.
    UnknownDomain(String),
    /// qdomd is stopping.
    Stopping(String),
}

#[zbus::proxy(
    interface = "org.qubesos.Domains1",
    default_service = "org.qubesos.Domains1",
    default_path = "/org/qubesos/Domains1"
)]
pub trait Domains1 {
    fn list(&self) -> Result<Vec<(String, String, u32)>, DomainsError>;
    fn start(&self, name: &str) -> Result<(), DomainsError>;
    fn shutdown(&self, name: &str) -> Result<(), DomainsError>;
    fn kill(&self, name: &str) -> Result<(), DomainsError>;

    #[zbus(signal)]
    fn state_changed(&self, name: String, state: String, domid: u32) -> zbus::Result<()>;
}
