//! The server side of `org.qubesos.Update1` (see [`crate::dbus`]), run by
//! `qupdated`. Every operation opens its own [`Updater`], so the service and
//! a direct `qupdate` share the updater's locks. One apply and one short
//! operation (mark-good, rollback) may run at once: the short one takes
//! only the state lock, so an apply never starves the boot-complete hook.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use qcontract::bus::UPDATE1;
use qcontract::error_chain;
use zbus::message::Header;
use zbus::object_server::{InterfaceRef, SignalEmitter};
use zbus::Connection;

use crate::dbus::{ServiceError, OBJECT_PATH};
use crate::{ApplyOptions, Config, Progress, Status, UpdateError, Updater};

/// How long a `Status` read waits for the state lock before it answers
/// with the last status it saw (another short operation holds it).
const STATUS_LOCK_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Idle,
    Apply,
    MarkGood,
    Rollback,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Apply => "apply",
            Self::MarkGood => "mark-good",
            Self::Rollback => "rollback",
        }
    }
}

#[derive(Debug)]
struct Shared {
    /// An apply under way.
    applying: bool,
    /// A short operation under way (never `Apply` or `Idle`).
    short: Option<Operation>,
    /// Numbers each apply, so a client matches `Completed` to its call.
    next_id: u64,
    progress: (String, u64, u64),
    last_error: String,
    status: Option<Status>,
}

#[derive(Debug)]
pub struct UpdateService {
    cfg: Config,
    shared: Arc<Mutex<Shared>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding it is a bug, but the data stays usable.
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn failed(e: &UpdateError) -> ServiceError {
    match e {
        UpdateError::Busy(_) => ServiceError::Busy(error_chain(e)),
        _ => ServiceError::Failed(error_chain(e)),
    }
}

/// Runs blocking updater work off the bus's thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, UpdateError> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Failed(format!("updater task: {e}")))?
        .map_err(|e| failed(&e))
}

impl UpdateService {
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            shared: Arc::new(Mutex::new(Shared {
                applying: false,
                short: None,
                next_id: 1,
                progress: (String::new(), 0, 0),
                last_error: String::new(),
                status: None,
            })),
        }
    }

    async fn authorize(&self, conn: &Connection, hdr: &Header<'_>) -> Result<(), ServiceError> {
        qagent::peer::authorize(conn, hdr, &UPDATE1)
            .await
            .map_err(|e| ServiceError::AccessDenied(e.to_string()))
    }

    /// A property read's caller check (see `qagent::peer::authorize_property`).
    async fn authorize_read(conn: &Connection, hdr: Option<&Header<'_>>) -> zbus::fdo::Result<()> {
        qagent::peer::authorize_property(conn, hdr, &UPDATE1)
            .await
            .map_err(|e| zbus::fdo::Error::AccessDenied(e.to_string()))
    }

    /// Claims the service for a short operation (mark-good, rollback),
    /// waiting for another short one under way; an apply under way is no
    /// reason to wait (see the module's documentation).
    async fn begin_short(&self, op: Operation) -> Result<(), ServiceError> {
        let deadline = tokio::time::Instant::now() + self.cfg.lock_wait;
        loop {
            {
                let mut s = lock(&self.shared);
                match s.short {
                    None => {
                        s.short = Some(op);
                        return Ok(());
                    }
                    Some(other) if tokio::time::Instant::now() >= deadline => {
                        return Err(ServiceError::Busy(format!(
                            "qupdated is busy with {}",
                            other.as_str()
                        )));
                    }
                    Some(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Claims the service for an apply; another apply under way is `Busy`
    /// at once.
    fn begin_apply(&self) -> Result<u64, ServiceError> {
        let mut s = lock(&self.shared);
        if s.applying {
            return Err(ServiceError::Busy("qupdated is busy with apply".into()));
        }
        s.applying = true;
        let id = s.next_id;
        s.next_id += 1;
        Ok(id)
    }

    /// Mark-good and rollback: checked, in turn, on a fresh [`Updater`],
    /// then the status changes.
    async fn short_op<T: Send + 'static>(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        op: Operation,
        f: impl FnOnce(&mut Updater) -> Result<T, UpdateError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        self.authorize(conn, hdr).await?;
        self.begin_short(op).await?;
        let cfg = self.cfg.clone();
        let r = blocking(move || f(&mut Updater::open(cfg)?)).await;
        lock(&self.shared).short = None;
        announce(conn, &[Prop::Status]).await;
        r
    }

    /// Reads the status once before serving, so a `Status` read during the
    /// first apply has something to answer with.
    pub fn prime_status(&self) {
        let mut cfg = self.cfg.clone();
        cfg.lock_wait = STATUS_LOCK_WAIT;
        match Updater::open(cfg).and_then(|mut u| u.status()) {
            Ok(st) => lock(&self.shared).status = Some(st),
            Err(e) => log::warn!("first status read: {}", error_chain(&e)),
        }
    }

    async fn iface(conn: &Connection) -> zbus::Result<InterfaceRef<Self>> {
        conn.object_server().interface(OBJECT_PATH).await
    }
}

#[derive(Debug, Clone, Copy)]
enum Prop {
    Operation,
    Progress,
    LastError,
    Status,
}

/// The end of a side effect nobody waits for (a signal, a property
/// change): a failure is logged with what was being done, and the
/// operation's own result stands. Only the error's `Display`: zbus's
/// already includes its source.
fn best_effort(what: &str, r: zbus::Result<()>) {
    if let Err(e) = r {
        log::warn!("{what}: {e}");
    }
}

/// Emits the property changes after an operation, best effort.
async fn announce(conn: &Connection, what: &[Prop]) {
    let r: zbus::Result<()> = async {
        let iface = UpdateService::iface(conn).await?;
        let e = iface.signal_emitter();
        let me = iface.get().await;
        for w in what {
            match w {
                Prop::Operation => me.operation_changed(e).await?,
                Prop::Progress => me.progress_changed(e).await?,
                Prop::LastError => me.last_error_changed(e).await?,
                Prop::Status => me.status_invalidate(e).await?,
            }
        }
        Ok(())
    }
    .await;
    best_effort("emitting property changes", r);
}

/// One apply, from the fd to the `Completed` signal.
async fn run_apply(
    conn: Connection,
    shared: Arc<Mutex<Shared>>,
    cfg: Config,
    opts: ApplyOptions,
    id: u64,
    bundle: zbus::OwnedFd,
) {
    announce(&conn, &[Prop::Operation]).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
    let job = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::from(std::os::fd::OwnedFd::from(bundle));
        let mut updater = Updater::open(cfg)?;
        // A message per percent and phase, not per chunk.
        let mut last = None;
        let mut progress = |p: Progress| {
            let key = (p.phase, p.percent());
            if last != Some(key) {
                last = Some(key);
                // Fails only once `run_apply` is gone (the service is
                // stopping): there is nobody left to show progress to.
                let _ = tx.send(p);
            }
        };
        updater.apply(file, &opts, &mut progress)
    });
    while let Some(p) = rx.recv().await {
        lock(&shared).progress = (p.phase.as_str().to_owned(), p.done, p.total);
        announce(&conn, &[Prop::Progress]).await;
    }
    let result = match job.await {
        Ok(r) => r.map_err(|e| error_chain(&e)),
        Err(e) => Err(format!("updater task: {e}")),
    };
    let (success, detail) = match &result {
        Ok(applied) => {
            log::info!(
                "apply #{id}: installed {} into slot {}",
                applied.version,
                applied.slot
            );
            let json = serde_json::to_string(applied)
                .expect("an Applied is strings and numbers, which always serialize");
            (true, json)
        }
        Err(e) => {
            log::error!("apply #{id} failed: {e}");
            (false, e.clone())
        }
    };
    {
        let mut s = lock(&shared);
        s.last_error = if success {
            String::new()
        } else {
            detail.clone()
        };
        s.applying = false;
    }
    announce(&conn, &[Prop::Operation, Prop::LastError, Prop::Status]).await;
    let r = async {
        let iface = UpdateService::iface(&conn).await?;
        UpdateService::completed(iface.signal_emitter(), id, success, &detail).await
    }
    .await;
    best_effort("emitting Completed", r);
}

#[zbus::interface(name = "org.qubesos.Update1")]
impl UpdateService {
    /// Starts installing the bundle read from `bundle`; returns the id that
    /// the `Completed` signal carries.
    async fn apply(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        bundle: zbus::OwnedFd,
        tries: u8,
        force: bool,
        stall_timeout_s: u32,
    ) -> Result<u64, ServiceError> {
        self.authorize(conn, &hdr).await?;
        let opts = ApplyOptions {
            tries,
            force,
            stall_timeout: Duration::from_secs(u64::from(stall_timeout_s)),
        };
        opts.check()
            .map_err(|e| ServiceError::InvalidArgs(error_chain(&e)))?;
        let id = self.begin_apply()?;
        log::info!(
            "apply #{id} for {}",
            hdr.sender().map_or("?".into(), ToString::to_string)
        );
        lock(&self.shared).progress = (String::new(), 0, 0);
        tokio::spawn(run_apply(
            conn.clone(),
            self.shared.clone(),
            self.cfg.clone(),
            opts,
            id,
            bundle,
        ));
        Ok(id)
    }

    /// Marks the booted slot good; returns its name.
    async fn mark_good(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, ServiceError> {
        let booted = self.cfg.booted;
        self.short_op(conn, &hdr, Operation::MarkGood, |u| u.mark_good())
            .await
            .map(|()| booted.to_string())
    }

    async fn rollback(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, ServiceError> {
        self.short_op(conn, &hdr, Operation::Rollback, |u| u.rollback())
            .await
            .map(|slot| slot.to_string())
    }

    /// The short operation under way if there is one, else `apply` while
    /// one runs, else `idle`.
    #[zbus(property)]
    async fn operation(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<String> {
        Self::authorize_read(conn, hdr.as_ref()).await?;
        let s = lock(&self.shared);
        let op = match (s.short, s.applying) {
            (Some(op), _) => op,
            (None, true) => Operation::Apply,
            (None, false) => Operation::Idle,
        };
        Ok(op.as_str().to_owned())
    }

    #[zbus(property)]
    async fn progress(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<(String, u64, u64)> {
        Self::authorize_read(conn, hdr.as_ref()).await?;
        Ok(lock(&self.shared).progress.clone())
    }

    #[zbus(property)]
    async fn last_error(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<String> {
        Self::authorize_read(conn, hdr.as_ref()).await?;
        Ok(lock(&self.shared).last_error.clone())
    }

    /// The JSON of `qupdate status --json`. While a short operation holds
    /// the state lock, the last status read.
    #[zbus(property(emits_changed_signal = "invalidates"))]
    async fn status(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<String> {
        Self::authorize_read(conn, hdr.as_ref()).await?;
        let mut cfg = self.cfg.clone();
        cfg.lock_wait = STATUS_LOCK_WAIT;
        let fresh = blocking(move || Updater::open(cfg)?.status()).await;
        let status = match fresh {
            Ok(st) => {
                lock(&self.shared).status = Some(st.clone());
                st
            }
            Err(ServiceError::Busy(_)) => lock(&self.shared)
                .status
                .clone()
                .ok_or_else(|| zbus::fdo::Error::Failed("busy, and no status read yet".into()))?,
            Err(e) => return Err(zbus::fdo::Error::Failed(e.to_string())),
        };
        serde_json::to_string(&status).map_err(|e| zbus::fdo::Error::Failed(e.to_string()))
    }

    #[zbus(signal)]
    async fn completed(
        emitter: &SignalEmitter<'_>,
        id: u64,
        success: bool,
        result: &str,
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
        assert_eq!(UpdateService::name().as_str(), UPDATE1.name);
        let proxy = crate::dbus::Update1Proxy::INTERFACE.as_ref();
        assert_eq!(proxy.map(|i| i.as_str()), Some(UPDATE1.name));
        let dest = crate::dbus::Update1Proxy::DESTINATION.as_ref();
        assert_eq!(dest.map(|d| d.as_str()), Some(UPDATE1.name));
        let path = crate::dbus::Update1Proxy::PATH.as_ref();
        assert_eq!(path.map(|p| p.as_str()), Some(UPDATE1.path));
    }
}
