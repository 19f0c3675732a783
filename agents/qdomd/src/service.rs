//! The server side of `org.qubesos.Domains1` (see [`crate::dbus`]). Calls
//! become [`Request`]s for the daemon's loop; `List` reads the list the
//! loop publishes after every change.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::Connection;

use crate::daemon::{Request, Shared};
use qcontract::bus::DOMAINS1;

use crate::dbus::DomainsError;

#[derive(Debug)]
pub struct DomainsService {
    shared: Arc<Mutex<Shared>>,
    requests: mpsc::UnboundedSender<Request>,
}

impl DomainsService {
    pub fn new(shared: Arc<Mutex<Shared>>, requests: mpsc::UnboundedSender<Request>) -> Self {
        Self { shared, requests }
    }

    async fn authorize(&self, conn: &Connection, hdr: &Header<'_>) -> Result<(), DomainsError> {
        qagent::peer::authorize(conn, hdr, &DOMAINS1)
            .await
            .map_err(|e| DomainsError::AccessDenied(e.to_string()))
    }

    fn known(&self, name: &str) -> Result<(), DomainsError> {
        let s = self
            .shared
            .lock()
            .map_err(|_| DomainsError::Stopping("state lock poisoned".into()))?;
        if s.domains.iter().any(|d| d.name == name) {
            Ok(())
        } else {
            Err(DomainsError::UnknownDomain(format!(
                "no domain `{name}` is defined"
            )))
        }
    }

    async fn request(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        name: &str,
        make: fn(String) -> Request,
    ) -> Result<(), DomainsError> {
        self.authorize(conn, hdr).await?;
        self.known(name)?;
        self.requests
            .send(make(name.to_owned()))
            .map_err(|_| DomainsError::Stopping("qdomd is stopping".into()))
    }
}

#[zbus::interface(name = "org.qubesos.Domains1")]
impl DomainsService {
    async fn list(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, String, u32)>, DomainsError> {
        self.authorize(conn, &hdr).await?;
        let s = self
            .shared
            .lock()
            .map_err(|_| DomainsError::Stopping("state lock poisoned".into()))?;
        Ok(s.domains
            .iter()
            .map(|d| (d.name.clone(), d.phase.as_str().to_owned(), d.domid))
            .collect())
    }

    async fn start(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: &str,
    ) -> Result<(), DomainsError> {
        self.request(conn, &hdr, name, Request::Start).await
    }

    async fn shutdown(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: &str,
    ) -> Result<(), DomainsError> {
        self.request(conn, &hdr, name, Request::Shutdown).await
    }

    async fn kill(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: &str,
    ) -> Result<(), DomainsError> {
        self.request(conn, &hdr, name, Request::Kill).await
    }

    #[zbus(signal)]
    pub async fn state_changed(
        emitter: &SignalEmitter<'_>,
        name: &str,
        state: &str,
        domid: u32,
    ) -> zbus::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// zbus takes the interface's name as a literal; it must be the
    /// contract's, which the bus enforces.
    #[test]
    fn the_interface_is_the_contracts() {
        use zbus::object_server::Interface;
        use zbus::proxy::Defaults;
        assert_eq!(DomainsService::name().as_str(), DOMAINS1.name);
        let proxy = crate::dbus::Domains1Proxy::INTERFACE.as_ref();
        assert_eq!(proxy.map(|i| i.as_str()), Some(DOMAINS1.name));
        let dest = crate::dbus::Domains1Proxy::DESTINATION.as_ref();
        assert_eq!(dest.map(|d| d.as_str()), Some(DOMAINS1.name));
        let path = crate::dbus::Domains1Proxy::PATH.as_ref();
        assert_eq!(path.map(|p| p.as_str()), Some(DOMAINS1.path));
    }
}
