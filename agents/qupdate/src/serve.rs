//! `qupdate service`: the updater as a D-Bus service (`org.qubesos.Update1`,
//! see `qupdate::dbus`), run by qinit as `qupdated` (`ready = "notify"`).
//! One binary for both sides, like `rauc service`: the image carries the
//! updater once.

use anyhow::Context;
use qupdate::dbus::{BUS_NAME, OBJECT_PATH};
use qupdate::service::UpdateService;
use qupdate::Config;

/// Serves on the system bus ($DBUS_SYSTEM_BUS_ADDRESS or
/// /run/dbus/system_bus_socket) until SIGTERM.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    qagent::logger::init();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the service's runtime")?
        .block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let booted = cfg.booted;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let service = UpdateService::new(cfg);
    service.prime_status();
    let _conn = zbus::connection::Builder::system()
        .name(BUS_NAME)
        .serve_at(OBJECT_PATH, service)
        .build()
        .await
        .with_context(|| format!("owning {BUS_NAME} on the system bus"))?;
    log::info!("serving {BUS_NAME} (booted slot {booted})");
    qagent::notify::ready(&format!("serving {BUS_NAME}"))?;
    // An apply cut short here is safe by design: its slot was made
    // unbootable before the first byte was written.
    term.recv().await;
    log::info!("SIGTERM: stopping");
    Ok(())
}
