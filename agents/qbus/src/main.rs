//! `qbus`: the dom0 system bus, run by qinit (`ready = "notify"`).

use std::path::PathBuf;

use anyhow::Result;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let path = std::env::var_os("QBUS_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| qbus::SYSTEM_BUS_SOCKET.into());
    let mut bus = qbus::SystemBus::bind(&path).await?;
    eprintln!("system bus listening on {}", bus.address());
    qagent::notify::ready("system bus up")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = bus.run() => r?,
        _ = term.recv() => eprintln!("SIGTERM: stopping"),
    }
    bus.cleanup().await
}
