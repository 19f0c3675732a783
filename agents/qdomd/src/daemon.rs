//! `qdom service` (run by qinit as `qdomd`): executes the [`Supervisor`]'s
//! actions. Domains are created with Xen's own `xl`, followed with xenstore
//! watches (`@introduceDomain`, `@releaseDomain`, each guest's readiness
//! key) on a thread of their own (qxenstore), restarted with backoff, and shut down (then
//! destroyed after a timeout) when qinit stops the service.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use crate::definition::{DomainSet, Role};
use crate::lifecycle::{Action, Event, Phase, Supervisor, STOP_TIMEOUT};
use crate::xs::{self, Tracker};

/// Where the generated xl configurations go.
pub const RUN_DIR: &str = "/run/qdomd";

/// The programs qdomd runs.
#[derive(Debug, Clone)]
pub struct Programs {
    /// Xen's toolstack.
    pub xl: PathBuf,
    /// The QubesDB daemon (`qubesdb-daemon <domid> <name>`).
    pub qubesdb_daemon: PathBuf,
    /// The qrexec daemon (`qrexec-daemon <domid> <name> <default user>`).
    pub qrexec_daemon: PathBuf,
    /// dom0's qrexec client, for the policy's `policy.Ask` calls.
    pub qrexec_client: PathBuf,
}

/// How long a new QubesDB daemon may take to offer its socket.
const QUBESDB_START_TIMEOUT: Duration = Duration::from_secs(20);

/// One domain as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: String,
    pub phase: Phase,
    /// 0 when it has none (dom0's id is never a guest's).
    pub domid: u32,
}

/// What the API asks of the daemon.
#[derive(Debug)]
pub enum Request {
    Start(String),
    Shutdown(String),
    Kill(String),
}

/// One VM as the policy and the Admin API see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmView {
    pub name: String,
    /// Its Qubes class (`AppVM`, ...).
    pub class: &'static str,
    pub label: String,
    pub memory_mib: u64,
    pub tags: std::collections::BTreeSet<String>,
    pub phase: Phase,
    pub domid: Option<u32>,
    /// The GUI VM that serves it (none for the GUI VM itself).
    pub guivm: Option<String>,
}

impl VmView {
    /// Whether the domain exists and runs (Qubes' `Running`).
    pub fn running(&self) -> bool {
        self.phase.is_up()
    }

    /// Whether it is down (Qubes' `Halted`).
    pub fn halted(&self) -> bool {
        self.phase.is_halted()
    }
}

/// Shared with the D-Bus side, the policy and the Admin API: the domain
/// list after every change.
#[derive(Debug, Default)]
pub struct Shared {
    pub domains: Vec<DomainInfo>,
    pub vms: Vec<VmView>,
}

/// The domain list as last published (the policy's and the Admin API's
/// view of the moment).
pub fn vms_now(shared: &Mutex<Shared>) -> std::result::Result<Vec<VmView>, String> {
    Ok(shared
        .lock()
        .map_err(|_| "state lock poisoned".to_string())?
        .vms
        .clone())
}

/// Waits until `vm`'s view satisfies `done` (the policy's autostart, the
/// Admin API's start and shutdown with `wait`). A VM that is not defined
/// fails at once; one that never gets there fails at the timeout.
pub async fn wait_for_vm(
    shared: &Mutex<Shared>,
    vm: &str,
    done: impl Fn(&VmView) -> bool,
    timeout: Duration,
) -> std::result::Result<(), String> {
    let wait = async {
        loop {
            let met = shared
                .lock()
                .map_err(|_| "state lock poisoned".to_string())?
                .vms
                .iter()
                .find(|v| v.name == vm)
                .map(&done);
            match met {
                Some(true) => return Ok(()),
                Some(false) => {}
                None => return Err(format!("{vm} is not defined")),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| format!("{vm}: not there after {timeout:?}"))?
}

pub struct Daemon {
    sup: Supervisor,
    tracker: Tracker,
    watcher: std::sync::mpsc::Sender<xs::WatchCmd>,
    events_tx: mpsc::UnboundedSender<Event>,
    started: Instant,
    run_dir: PathBuf,
    xl: PathBuf,
    qubesdb_daemon: PathBuf,
    qrexec_daemon: PathBuf,
    shared: Arc<Mutex<Shared>>,
    changes: mpsc::UnboundedSender<DomainInfo>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

fn infos(sup: &Supervisor) -> Vec<DomainInfo> {
    sup.iter()
        .map(|d| DomainInfo {
            name: d.def.name.clone(),
            phase: d.phase,
            domid: d.domid.unwrap_or(0),
        })
        .collect()
}

fn views(sup: &Supervisor) -> Vec<VmView> {
    let gui = sup
        .iter()
        .find(|d| d.def.role == Role::Gui)
        .map(|d| d.def.name.clone());
    sup.iter()
        .map(|d| VmView {
            name: d.def.name.clone(),
            class: d.def.qubes.class.as_str(),
            label: d.def.qubes.label.clone(),
            memory_mib: d.def.memory_mib,
            tags: d.def.qubes.tags.clone(),
            phase: d.phase,
            domid: d.domid,
            guivm: gui.clone().filter(|g| *g != d.def.name),
        })
        .collect()
}

impl Daemon {
    /// Runs until `stop` resolves, then shuts every domain down and returns.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        set: DomainSet,
        programs: Programs,
        shared: Arc<Mutex<Shared>>,
        changes: mpsc::UnboundedSender<DomainInfo>,
        mut requests: mpsc::UnboundedReceiver<Request>,
        ready: impl FnOnce(),
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        // A refused file: its domain is skipped, or, for a refused
        // override, runs as the image defines it (said beside it).
        for e in &set.errors {
            log::error!("definition refused: {e}");
        }
        let conn = qxenstore::Xs::open().context("connecting to xenstore")?;
        let (news_tx, mut news) = mpsc::unbounded_channel();
        let watcher = xs::spawn_watcher(conn, news_tx).context("watching the domain list")?;
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut d = Daemon {
            sup: Supervisor::new(set.domains.into_values()),
            tracker: Tracker::default(),
            watcher,
            events_tx,
            started: Instant::now(),
            run_dir: RUN_DIR.into(),
            xl: programs.xl,
            qubesdb_daemon: programs.qubesdb_daemon,
            qrexec_daemon: programs.qrexec_daemon,
            shared,
            changes,
        };
        std::fs::create_dir_all(&d.run_dir)
            .with_context(|| format!("creating {}", d.run_dir.display()))?;
        d.publish();
        // Domains already running (qdomd restarted) are adopted first: the
        // domain watches fire once when set, with the current list.
        match news.recv().await {
            Some(n) => d.news(n).await?,
            None => anyhow::bail!("the xenstore watcher stopped"),
        }
        for ev in d.sup.autostart() {
            d.feed(ev).await;
        }
        ready();
        tokio::pin!(stop);
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            if deadline.is_some() && d.sup.all_stopped() {
                log::info!("every domain is stopped");
                return Ok(());
            }
            let until = deadline
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365));
            tokio::select! {
                n = news.recv() => match n {
                    Some(n) => d.news(n).await?,
                    None => anyhow::bail!("the xenstore watcher stopped"),
                },
                Some(ev) = events.recv() => d.feed(ev).await,
                Some(req) = requests.recv() => {
                    let ev = match req {
                        Request::Start(n) => Event::Start(n),
                        Request::Shutdown(n) => Event::Stop(n),
                        Request::Kill(n) => Event::Kill(n),
                    };
                    d.feed(ev).await;
                }
                () = &mut stop, if deadline.is_none() => {
                    log::info!("stopping: shutting every domain down");
                    deadline = Some(tokio::time::Instant::now() + STOP_TIMEOUT + Duration::from_secs(10));
                    for ev in d.sup.stop_all() {
                        d.feed(ev).await;
                    }
                }
                () = tokio::time::sleep_until(until), if deadline.is_some() => {
                    log::warn!("domains still up after the stop timeout; leaving them");
                    return Ok(());
                }
            }
        }
    }

    fn publish(&self) {
        let list = infos(&self.sup);
        let vms = views(&self.sup);
        if let Ok(mut s) = self.shared.lock() {
            s.domains = list;
            s.vms = vms;
        }
    }

    /// What the watcher saw: a new domain list (fed as what is new or
    /// gone), or a readiness key.
    async fn news(&mut self, n: xs::News) -> Result<()> {
        match n {
            xs::News::Domains(snap) => {
                for ev in self.tracker.update(snap) {
                    if let Event::Gone { domid } = &ev {
                        let _ = self.watcher.send(xs::WatchCmd::Forget(*domid));
                    }
                    Box::pin(self.feed(ev)).await;
                }
            }
            xs::News::Event(ev) => self.feed(ev).await,
            xs::News::Failed(e) => anyhow::bail!("xenstore watches: {e}"),
        }
        Ok(())
    }

    async fn feed(&mut self, ev: Event) {
        let actions = self.sup.handle(ev, Instant::now());
        for a in actions {
            self.execute(a).await;
        }
    }

    async fn execute(&mut self, a: Action) {
        match a {
            Action::Create { name } => self.create(name),
            Action::Shutdown { name, domid } => {
                log::info!("{name}: shutting down domain {domid}");
                self.xl(vec!["shutdown".into(), domid.to_string()]);
            }
            Action::Destroy { name, domid } => {
                log::info!("{name}: destroying domain {domid}");
                self.xl(vec!["destroy".into(), domid.to_string()]);
            }
            Action::Timer {
                name,
                kind,
                generation,
                after,
            } => {
                let tx = self.events_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = tx.send(Event::Timer {
                        name,
                        kind,
                        generation,
                    });
                });
            }
            Action::WatchReady { name, domid } => self.watch_ready(name, domid).await,
            Action::StartQubesDb {
                name,
                domid,
                gui_domid,
                unpause,
            } => self.start_qubesdb(name, domid, gui_domid, unpause),
            Action::StartQrexec {
                name,
                domid,
                default_user,
            } => self.start_qrexec(name, domid, default_user),
            Action::Changed { name, phase, domid } => {
                log::info!(
                    "{name}: {}{}",
                    phase.as_str(),
                    domid.map_or(String::new(), |d| format!(" (domain {d})"))
                );
                if phase == Phase::Backoff {
                    if let Some(s) = self.sup.get(&name) {
                        log::warn!(
                            "{name}: gone; restarting after backoff (wanted: {})",
                            s.wanted
                        );
                    }
                }
                self.publish();
                let _ = self.changes.send(DomainInfo {
                    name,
                    phase,
                    domid: domid.unwrap_or(0),
                });
            }
            Action::Ready { name, domid, gui } => {
                let ms = self.started.elapsed().as_millis();
                if gui {
                    // The console contract (design.md): tests and the lab
                    // wait for this line.
                    println!("QDOMD-GUIVM-READY name={name} domid={domid} ms={ms}");
                } else {
                    log::info!("{name}: ready (domain {domid}) after {ms} ms");
                }
            }
        }
    }

    fn create(&mut self, name: String) {
        let Some(state) = self.sup.get(&name) else {
            return;
        };
        let cfg_path = self.run_dir.join(format!("{name}.cfg"));
        let tx = self.events_tx.clone();
        if let Err(e) = std::fs::write(&cfg_path, crate::xl::config(&state.def)) {
            let _ = tx.send(Event::Created {
                name,
                result: Err(format!("writing {}: {e}", cfg_path.display())),
            });
            return;
        }
        log::info!("{name}: xl create {}", cfg_path.display());
        let xl = self.xl.clone();
        tokio::spawn(async move {
            // Paused: it runs only once its QubesDB is filled.
            let result = run_xl(
                &xl,
                &["create".into(), "-p".into(), cfg_path.display().to_string()],
            )
            .await;
            let _ = tx.send(Event::Created { name, result });
        });
    }

    /// Starts the domain's QubesDB daemon, fills it, unpauses the domain if
    /// asked; reports [`Event::QubesDbUp`], and [`Event::QubesDbExited`]
    /// when the daemon exits.
    fn start_qubesdb(&mut self, name: String, domid: u32, gui_domid: Option<u32>, unpause: bool) {
        let Some(state) = self.sup.get(&name) else {
            return;
        };
        // The VM's `/qubes-random-seed` must be real entropy, but waiting
        // for the pool here would stop the whole daemon: a pool not
        // initialised yet fails this start, which backs off and retries.
        let mut seed = [0u8; 64];
        let entries = match ready_random(&mut seed) {
            Ok(()) => crate::qdb::entries(&state.def, gui_domid, &seed),
            Err(e) => {
                let _ = self.events_tx.send(Event::QubesDbUp {
                    domid,
                    result: Err(format!("no random seed for the VM: {e}")),
                });
                return;
            }
        };
        let socket = qubesdb::socket_path(Some(&name));
        // A socket left by the daemon of an earlier run of this VM (it may
        // not have noticed its domain is gone yet): unlink it, so the
        // socket that appears next is the new daemon's.
        let _ = std::fs::remove_file(&socket);
        log::info!("{name}: starting its QubesDB daemon (domain {domid})");
        let child = tokio::process::Command::new(&self.qubesdb_daemon)
            .arg(domid.to_string())
            .arg(&name)
            .stdin(std::process::Stdio::null())
            .spawn();
        let tx = self.events_tx.clone();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Event::QubesDbUp {
                    domid,
                    result: Err(format!("spawning {}: {e}", self.qubesdb_daemon.display())),
                });
                return;
            }
        };
        watch_daemon(child, name.clone(), "QubesDB", tx.clone(), move |clean| {
            Event::QubesDbExited { domid, clean }
        });
        let xl = self.xl.clone();
        tokio::spawn(async move {
            let filled = tokio::task::spawn_blocking(move || fill_qubesdb(&socket, &entries))
                .await
                .map_err(|e| format!("filling QubesDB: {e}"))
                .and_then(|r| r);
            let result = match filled {
                Ok(()) if unpause => run_xl(&xl, &["unpause".into(), domid.to_string()])
                    .await
                    .map_err(|e| format!("xl unpause: {e}")),
                other => other,
            };
            let _ = tx.send(Event::QubesDbUp { domid, result });
        });
    }

    /// Starts the domain's qrexec daemon; reports [`Event::QrexecExited`]
    /// when it exits.
    fn start_qrexec(&mut self, name: String, domid: u32, default_user: String) {
        log::info!("{name}: starting its qrexec daemon (domain {domid})");
        let child = tokio::process::Command::new(&self.qrexec_daemon)
            .arg(domid.to_string())
            .arg(&name)
            .arg(&default_user)
            .stdin(std::process::Stdio::null())
            .spawn();
        let tx = self.events_tx.clone();
        match child {
            Ok(c) => watch_daemon(c, name, "qrexec", tx, move |clean| Event::QrexecExited {
                domid,
                clean,
            }),
            Err(e) => {
                log::error!("{name}: spawning {}: {e}", self.qrexec_daemon.display());
                // Counts as a daemon that died: the restart rule applies.
                let _ = tx.send(Event::QrexecExited {
                    domid,
                    clean: false,
                });
            }
        }
    }

    fn xl(&self, args: Vec<String>) {
        let xl = self.xl.clone();
        tokio::spawn(async move {
            if let Err(e) = run_xl(&xl, &args).await {
                log::warn!("xl {}: {e}", args.join(" "));
            }
        });
    }

    async fn watch_ready(&mut self, name: String, domid: u32) {
        if self.watcher.send(xs::WatchCmd::Ready(domid)).is_err() {
            log::error!("{name}: the xenstore watcher is gone; not watching domain {domid}");
        }
    }
}

/// Waits for a per-VM daemon to exit and reports it: `clean` when it
/// exited 0, which the daemons do only once their domain is gone.
fn watch_daemon(
    mut child: tokio::process::Child,
    name: String,
    what: &'static str,
    tx: mpsc::UnboundedSender<Event>,
    exited: impl FnOnce(bool) -> Event + Send + 'static,
) {
    tokio::spawn(async move {
        let clean = match child.wait().await {
            Ok(st) => {
                log::info!("{name}: {what} daemon exited ({st})");
                st.success()
            }
            Err(e) => {
                log::warn!("{name}: waiting for the {what} daemon: {e}");
                false
            }
        };
        let _ = tx.send(exited(clean));
    });
}

/// Waits for the daemon's socket, then writes every entry (blocking).
/// Fills `buf` from the kernel's pool if it is initialised, without
/// waiting for it.
fn ready_random(buf: &mut [u8]) -> Result<(), String> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::rand::getrandom(&mut buf[done..], rustix::rand::GetRandomFlags::NONBLOCK) {
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => {
                return Err("the kernel's random pool is not initialised yet".into())
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

fn fill_qubesdb(socket: &std::path::Path, entries: &[(String, String)]) -> Result<(), String> {
    let deadline = Instant::now() + QUBESDB_START_TIMEOUT;
    let mut client = loop {
        match qubesdb::client::Client::connect(socket, Duration::from_secs(5)) {
            Ok(c) => break c,
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("no daemon within {QUBESDB_START_TIMEOUT:?}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    for (k, v) in entries {
        client
            .write(k, v.as_bytes())
            .map_err(|e| qcontract::error_chain(&e))?;
    }
    Ok(())
}

async fn run_xl(xl: &std::path::Path, args: &[String]) -> Result<(), String> {
    let out = tokio::process::Command::new(xl)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("spawning {}: {e}", xl.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ))
    }
}
