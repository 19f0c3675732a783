//! The D-Bus caller check. The bus socket is already root-only (busd does
//! not enforce policy files); each agent also asks the bus for the caller's
//! uid and answers only its own (root in dom0).

use zbus::message::Header;
use zbus::Connection;

/// Why a caller was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("a call without a sender")]
    NoSender,
    #[error("the caller's uid: {0}")]
    Lookup(String),
    #[error("uid {caller} may not use {interface} (only uid {allowed})")]
    Denied {
        caller: u32,
        allowed: u32,
        interface: String,
    },
}

/// The uid this process runs as: the only one it answers.
pub fn own_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Asks the bus who sent `hdr` and checks it against `allowed`.
pub async fn authorize(
    conn: &Connection,
    hdr: &Header<'_>,
    allowed: u32,
    interface: &str,
) -> Result<(), PeerError> {
    let sender = hdr.sender().ok_or(PeerError::NoSender)?;
    let dbus = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(|e| PeerError::Lookup(e.to_string()))?;
    let uid = dbus
        .get_connection_unix_user(sender.clone().into())
        .await
        .map_err(|e| PeerError::Lookup(e.to_string()))?;
    check_uid(uid, allowed, interface)
}

pub fn check_uid(caller: u32, allowed: u32, interface: &str) -> Result<(), PeerError> {
    if caller == allowed {
        Ok(())
    } else {
        Err(PeerError::Denied {
            caller,
            allowed,
            interface: interface.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_agents_own_uid_may_call() {
        assert!(check_uid(0, 0, "org.qubesos.Update1").is_ok());
        let e = check_uid(1000, 0, "org.qubesos.Update1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "uid 1000 may not use org.qubesos.Update1 (only uid 0)"
        );
    }
}
