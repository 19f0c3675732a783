//! `qdom`: the domain agent's command line, and (`qdom service`) the agent
//! itself, which qinit runs as the `qdomd` service.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use qdomd::daemon::{Daemon, Shared};
use qdomd::dbus::{Domains1Proxy, DomainsError, BUS_NAME, OBJECT_PATH};
use qdomd::definition;
use qdomd::service::DomainsService;

/// Dom0's domains: the GUI VM and the others defined in /etc/qdomd/domains.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Every defined domain, its state and domid.
    List,
    /// Start a domain.
    Start { name: String },
    /// Ask a domain to shut down (destroyed if it does not within 30 s).
    Shutdown { name: String },
    /// Destroy a domain now.
    Kill { name: String },
    /// Wait until a domain is ready (its guest wrote the readiness key);
    /// fails after the timeout. The health gate's `guivm-ready` unit runs
    /// this for the GUI VM where the profile makes it count.
    WaitReady {
        name: String,
        /// Seconds to wait at most.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Run the agent (qinit's `qdomd` service).
    Service {
        /// Shipped definitions.
        #[arg(long, default_value = definition::SHIPPED_DIR)]
        definitions: PathBuf,
        /// Machine-local overrides.
        #[arg(long, default_value = definition::LOCAL_DIR)]
        local: PathBuf,
        /// Xen's toolstack.
        #[arg(long, default_value = "/usr/sbin/xl")]
        xl: PathBuf,
        /// The QubesDB daemon started for each VM.
        #[arg(long, default_value = "/usr/sbin/qubesdb-daemon")]
        qubesdb_daemon: PathBuf,
        /// The qrexec daemon started for each VM once it runs.
        #[arg(long, default_value = "/usr/sbin/qrexec-daemon")]
        qrexec_daemon: PathBuf,
        /// dom0's qrexec client (the policy's `ask` calls the GUI VM's
        /// `policy.Ask` with it).
        #[arg(long, default_value = "/usr/sbin/qrexec-client")]
        qrexec_client: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qdom: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qdom: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// An error of the service as its user should read it. The derived text
/// of a zbus error is its generic name alone; the bus's refusals
/// (`AccessDenied: uid 65534 may not call ...`) are in zbus's own text.
fn said(e: DomainsError) -> anyhow::Error {
    match e {
        // zbus's text of a standard error repeats its source's: once.
        DomainsError::ZBus(zbus::Error::FDO(f)) => (*f).into(),
        DomainsError::ZBus(z) => z.into(),
        other => other.into(),
    }
}

/// Polls the domain list until `name` is ready. A domain that is not
/// defined is an error at once; one that fails and restarts is waited for.
async fn wait_ready(
    proxy: &Domains1Proxy<'_>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let list = proxy.list().await.map_err(said).context("qdomd")?;
        let Some((_, state, _)) = list.iter().find(|(n, _, _)| n == name) else {
            anyhow::bail!("no domain named {name:?} is defined");
        };
        if state == qdomd::lifecycle::Phase::Ready.as_str() {
            return Ok(());
        }
        last.clone_from(state);
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{name} is not ready after {} s (it is {last})",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let name = match cli.command {
        Cmd::Service {
            definitions,
            local,
            xl,
            qubesdb_daemon,
            qrexec_daemon,
            qrexec_client,
        } => {
            return serve(
                definitions,
                local,
                qdomd::daemon::Programs {
                    xl,
                    qubesdb_daemon,
                    qrexec_daemon,
                    qrexec_client,
                },
            )
            .await
        }
        Cmd::List => None,
        Cmd::Start { ref name }
        | Cmd::Shutdown { ref name }
        | Cmd::Kill { ref name }
        | Cmd::WaitReady { ref name, .. } => Some(name.clone()),
    };
    let conn = zbus::connection::Builder::system()
        .build()
        .await
        .context("connecting to the system bus")?;
    let proxy = Domains1Proxy::new(&conn).await?;
    match (cli.command, name) {
        (Cmd::List, _) => {
            let list = proxy.list().await.map_err(said).context("qdomd")?;
            println!("{:<20} {:<10} {:>5}", "NAME", "STATE", "DOMID");
            for (name, state, domid) in list {
                let id = if domid == 0 {
                    "-".into()
                } else {
                    domid.to_string()
                };
                println!("{name:<20} {state:<10} {id:>5}");
            }
        }
        (Cmd::Start { .. }, Some(n)) => proxy.start(&n).await.map_err(said).context("qdomd")?,
        (Cmd::Shutdown { .. }, Some(n)) => {
            proxy.shutdown(&n).await.map_err(said).context("qdomd")?
        }
        (Cmd::Kill { .. }, Some(n)) => proxy.kill(&n).await.map_err(said).context("qdomd")?,
        (Cmd::WaitReady { timeout, .. }, Some(n)) => {
            wait_ready(&proxy, &n, Duration::from_secs(timeout)).await?;
            println!("{n} is ready");
        }
        _ => {}
    }
    Ok(())
}

async fn serve(
    definitions: PathBuf,
    local: PathBuf,
    programs: qdomd::daemon::Programs,
) -> anyhow::Result<()> {
    qagent::logger::init();
    let trust = qdomd::trust::Trust::for_image(
        std::path::Path::new(qcontract::paths::IMAGE_INFO),
        std::path::Path::new(qdomd::trust::ALLOW_FILE),
    );
    let set = definition::load(&definitions, &local, &trust);
    let shared = Arc::new(Mutex::new(Shared::default()));
    let (req_tx, req_rx) = tokio::sync::mpsc::unbounded_channel();
    let (chg_tx, mut chg_rx) = tokio::sync::mpsc::unbounded_channel::<qdomd::daemon::DomainInfo>();
    let policy = tokio::spawn(qdomd::policy::serve(
        qdomd::rootsock::bind(std::path::Path::new(qpolicy::SOCKET))?,
        qdomd::policy::Dirs::default(),
        programs.qrexec_client.clone(),
        shared.clone(),
        req_tx.clone(),
    ));
    let (events_tx, _) = tokio::sync::broadcast::channel::<qdomd::daemon::DomainInfo>(256);
    let admin = tokio::spawn(qdomd::admin::serve(
        qdomd::rootsock::bind(std::path::Path::new(qdomd::admin::SOCKET))?,
        shared.clone(),
        req_tx.clone(),
        events_tx.clone(),
    ));
    let conn = zbus::connection::Builder::system()
        .name(BUS_NAME)
        .serve_at(OBJECT_PATH, DomainsService::new(shared.clone(), req_tx))
        .build()
        .await
        .with_context(|| format!("owning {BUS_NAME} on the system bus"))?;
    // State changes become the D-Bus signal and the Admin API's events;
    // the events go out whether or not the signal can.
    let signals = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let iface = conn
                .object_server()
                .interface::<_, DomainsService>(OBJECT_PATH)
                .await
                .inspect_err(|e| log::warn!("no StateChanged signal: {e}"))
                .ok();
            while let Some(c) = chg_rx.recv().await {
                // Nobody listening for Admin API events is no error.
                let _ = events_tx.send(c.clone());
                let Some(iface) = &iface else { continue };
                if let Err(e) = DomainsService::state_changed(
                    iface.signal_emitter(),
                    &c.name,
                    c.phase.as_str(),
                    c.domid,
                )
                .await
                {
                    log::warn!("emitting StateChanged: {e}");
                }
            }
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let n = set.domains.len();
    Daemon::run(
        set,
        programs,
        shared,
        chg_tx,
        req_rx,
        || {
            log::info!("serving {BUS_NAME}; {n} domain(s) defined");
            if let Err(e) = qagent::notify::ready(&format!("{n} domain(s)")) {
                log::error!("{e}");
            }
        },
        async move {
            term.recv().await;
        },
    )
    .await?;
    signals.abort();
    policy.abort();
    admin.abort();
    Ok(())
}
