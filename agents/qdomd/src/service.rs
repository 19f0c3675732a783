//! The server side of `org.qubesos.Domains1` (see [`crate::dbus`]). Calls
//! become [`Request`]s for the daemon's loop; `List` reads the list the
//! loop publishes after every change.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::Connection;

use crate::daemon::{Request, Shared};
use crate::dbus::{DomainsError, INTERFACE};

#[derive(Debug)]
pub struct DomainsService {
    uid: u32,
    shared: Arc<Mutex<Shared>>,
    requests: mpsc::UnboundedSender<Request>,
}

impl DomainsService {
    pub fn new(shared: Arc<Mutex<Shared>>, requests: mpsc::UnboundedSender<Request>) -> Self {
        Self {
            uid: qagent::peer::own_uid(),
            shared,
            requests,
        }
    }

    async fn authorize(&self, conn: &Connection, hdr: &Header<'_>) -> Result<(), DomainsError> {
        qagent::peer::authorize(conn, hdr, self.uid, INTERFACE)
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
