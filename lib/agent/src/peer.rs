//! The D-Bus caller check. The bus (agents/qbus) already enforces who may
//! call each service (`qcontract::bus`); each agent asks the bus for the
//! caller's uid and checks it against the same table again, so a bus bug
//! alone does not open an API.

use qcontract::bus::Service;
use zbus::message::Header;
use zbus::Connection;

/// Why a caller was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("a call without a sender")]
    NoSender,
    #[error("the caller's uid: {0}")]
    Lookup(String),
    #[error("uid {caller} may not use {interface}: not among its callers")]
    Denied { caller: u32, interface: String },
}

/// Asks the bus who sent `hdr` and checks it against `service`'s callers.
pub async fn authorize(
    conn: &Connection,
    hdr: &Header<'_>,
    service: &Service,
) -> Result<(), PeerError> {
    let sender = hdr.sender().ok_or(PeerError::NoSender)?;
    let dbus = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(|e| PeerError::Lookup(e.to_string()))?;
    let uid = dbus
        .get_connection_unix_user(sender.clone().into())
        .await
        .map_err(|e| PeerError::Lookup(e.to_string()))?;
    check_uid(uid, service)
}

/// [`authorize`] for a property read: zbus reads a property without a
/// header only for the service's own change signals, which the bus lets
/// only the callers see; a read from the bus always has one.
pub async fn authorize_property(
    conn: &Connection,
    hdr: Option<&Header<'_>>,
    service: &Service,
) -> Result<(), PeerError> {
    match hdr {
        Some(hdr) => authorize(conn, hdr, service).await,
        None => Ok(()),
    }
}

pub fn check_uid(caller: u32, service: &Service) -> Result<(), PeerError> {
    if service.may_call(caller) {
        Ok(())
    } else {
        Err(PeerError::Denied {
            caller,
            interface: service.interface().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcontract::bus::{DOMAINS1, UPDATE1};

    #[test]
    fn only_the_services_callers_may_call() {
        assert!(check_uid(0, &UPDATE1).is_ok());
        let e = check_uid(1000, &UPDATE1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "uid 1000 may not use org.qubesos.Update1: not among its callers"
        );
        assert!(check_uid(101, &DOMAINS1).is_err());
    }
}
