//! The CLI's side of `org.qubesos.Update1`: when `qupdated` owns its name on
//! the system bus, `qupdate` asks it instead of opening the slots itself.

use std::os::fd::AsFd;

use futures_util::StreamExt;
use qcontract::{Slot, SlotError};

use crate::dbus::{ServiceError, Update1Proxy, BUS_NAME, INTERFACE, OBJECT_PATH};
use crate::{Applied, ApplyOptions, Phase, Progress, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("starting the D-Bus client")]
    Runtime(#[source] std::io::Error),
    #[error("system bus")]
    Bus(#[source] zbus::Error),
    /// An error reply with a standard name: the bus's refusals, or the
    /// service's own `AccessDenied` of a property read.
    #[error("system bus")]
    Refused(#[source] zbus::fdo::Error),
    #[error("qupdated")]
    Service(#[source] ServiceError),
    /// The service's `Completed` said no; `chain` is its whole cause chain.
    #[error("{chain}")]
    ApplyFailed { id: u64, chain: String },
    #[error("qupdated left the bus before apply #{0} completed")]
    Gone(u64),
    #[error("qupdated answered {method} with something that is not a slot")]
    NotASlot {
        method: &'static str,
        #[source]
        source: SlotError,
    },
    #[error("qupdated answered {what} that is not valid JSON")]
    Reply {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// A standard error reply is said once, with its reason (zbus's text of
/// one repeats its source's).
impl From<zbus::Error> for ClientError {
    fn from(e: zbus::Error) -> Self {
        match e {
            zbus::Error::FDO(f) => Self::Refused(*f),
            other => Self::Bus(other),
        }
    }
}

/// A zbus error the service's error type wraps is the bus's: it is said as
/// zbus says it (the bus's refusals carry their reason there), not by the
/// derived generic name.
impl From<ServiceError> for ClientError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::ZBus(z) => z.into(),
            other => Self::Service(other),
        }
    }
}

/// A connection to a running `qupdated`.
pub struct Client {
    rt: tokio::runtime::Runtime,
    proxy: Update1Proxy<'static>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// The service, if the system bus is up and `qupdated` is on it. No bus
    /// or no service is not an error: the caller works on the slots itself.
    /// The bus is `$DBUS_SYSTEM_BUS_ADDRESS` or the standard socket.
    pub fn connect() -> Result<Option<Self>, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        let proxy = rt.block_on(async {
            let Ok(conn) = zbus::connection::Builder::system().build().await else {
                return Ok(None);
            };
            let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
            let name = zbus::names::BusName::try_from(BUS_NAME)?;
            if !dbus.name_has_owner(name).await.map_err(zbus::Error::from)? {
                return Ok(None);
            }
            Ok::<_, ClientError>(Some(Update1Proxy::new(&conn).await?))
        })?;
        Ok(proxy.map(|proxy| Self { rt, proxy }))
    }

    /// Installs the bundle behind `bundle` (a file or a pipe; the service
    /// reads it) and waits for the result, reporting progress on the way.
    pub fn apply(
        &self,
        bundle: impl AsFd,
        opts: &ApplyOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Applied, ClientError> {
        let p = &self.proxy;
        self.rt.block_on(async {
            // Subscribe before the call, so nothing is missed.
            let mut completed = p.receive_completed().await?;
            // The raw PropertiesChanged signals, not a property stream: that
            // keeps only the latest value, and a short apply would show none.
            let props = zbus::fdo::PropertiesProxy::builder(p.inner().connection())
                .destination(BUS_NAME)
                .path(OBJECT_PATH)
                .build()
                .await?;
            let mut changes = props.receive_properties_changed().await?;
            let mut owner = p.inner().receive_owner_changed().await?;
            // Saturating: a timeout past u32 seconds is past the limit too,
            // and the service's check refuses it by name.
            let stall_secs = u32::try_from(opts.stall_timeout.as_secs()).unwrap_or(u32::MAX);
            let id = p
                .apply(
                    zbus::Fd::from(bundle.as_fd()),
                    opts.tries,
                    opts.force,
                    stall_secs,
                )
                .await?;
            loop {
                // Progress first: the changes queued before the signal are
                // shown before the result.
                tokio::select! {
                    biased;
                    Some(change) = changes.next() => {
                        if let Some(p) = progress_of(&change) {
                            progress(p);
                        }
                    }
                    Some(sig) = completed.next() => {
                        let args = sig.args()?;
                        if *args.id() != id {
                            continue;
                        }
                        if !*args.success() {
                            return Err(ClientError::ApplyFailed {
                                id,
                                chain: args.result().clone(),
                            });
                        }
                        return serde_json::from_str(args.result())
                            .map_err(|source| ClientError::Reply { what: "an install", source });
                    }
                    Some(new_owner) = owner.next() => {
                        if new_owner.is_none() {
                            return Err(ClientError::Gone(id));
                        }
                    }
                }
            }
        })
    }

    /// Returns the slot marked good (the booted one).
    pub fn mark_good(&self) -> Result<Slot, ClientError> {
        let name = self.rt.block_on(self.proxy.mark_good())?;
        slot_reply("MarkGood", &name)
    }

    /// Returns the slot that is the default from the next boot.
    pub fn rollback(&self) -> Result<Slot, ClientError> {
        let name = self.rt.block_on(self.proxy.rollback())?;
        slot_reply("Rollback", &name)
    }

    pub fn status(&self) -> Result<Status, ClientError> {
        let json = self.rt.block_on(self.proxy.status())?;
        serde_json::from_str(&json).map_err(|source| ClientError::Reply {
            what: "a status",
            source,
        })
    }
}

/// A method's `s slot` reply (the interface keeps slots as names).
fn slot_reply(method: &'static str, name: &str) -> Result<Slot, ClientError> {
    name.parse()
        .map_err(|source| ClientError::NotASlot { method, source })
}

/// The `Progress` value in a PropertiesChanged signal of our interface.
fn progress_of(change: &zbus::fdo::PropertiesChanged) -> Option<Progress> {
    let args = change.args().ok()?;
    if args.interface_name().as_str() != INTERFACE {
        return None;
    }
    let value = args
        .changed_properties()
        .get("Progress")?
        .try_clone()
        .ok()?;
    let (phase, done, total) = <(String, u64, u64)>::try_from(value).ok()?;
    Some(Progress {
        phase: Phase::from_name(&phase)?,
        done,
        total,
    })
}
