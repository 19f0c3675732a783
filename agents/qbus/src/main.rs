//! `qbus`: the dom0 system bus, run by qinit (`ready = "notify"`).
//!
//! Started as root with only CAP_SETUID, CAP_SETGID and CAP_CHOWN, it
//! gives the socket's directory to `messagebus`, connects its notify
//! socket, and becomes `messagebus` with no capability at all before any
//! thread exists, as dbus-daemon does; then it binds and serves. Started
//! as anyone else (a test), it serves as that user.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use qcontract::accounts::MESSAGEBUS;

fn main() -> Result<()> {
    let path = std::env::var_os("QBUS_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| qbus::SYSTEM_BUS_SOCKET.into());
    let notifier = qagent::notify::Notifier::connect()?;
    if rustix::process::geteuid().is_root() {
        give_directory(&path)?;
        drop_privileges()?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(serve(&path, notifier))
}

/// Makes the socket's directory `messagebus`'s, so the bus can bind and
/// unlink its socket after it has dropped root.
fn give_directory(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{}: a socket path needs a directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    rustix::fs::chown(
        dir,
        Some(rustix::process::Uid::from_raw(MESSAGEBUS.uid)),
        Some(rustix::process::Gid::from_raw(MESSAGEBUS.gid)),
    )
    .with_context(|| format!("chown {} to {}", dir.display(), MESSAGEBUS.name))?;
    Ok(())
}

/// Becomes `messagebus`. rustix's calls act on the calling thread only;
/// this runs while `main` is the only thread, so the thread is the
/// process, and every thread the runtime starts later inherits it. Moving
/// every uid off 0 clears all capabilities (no keep-caps), which is
/// checked rather than assumed.
fn drop_privileges() -> Result<()> {
    rustix::thread::set_thread_groups(&[]).context("clearing supplementary groups")?;
    rustix::thread::set_thread_gid(rustix::process::Gid::from_raw(MESSAGEBUS.gid))
        .with_context(|| format!("setgid {}", MESSAGEBUS.gid))?;
    rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(MESSAGEBUS.uid))
        .with_context(|| format!("setuid {}", MESSAGEBUS.uid))?;
    let uid = rustix::process::getuid().as_raw();
    let euid = rustix::process::geteuid().as_raw();
    if uid != MESSAGEBUS.uid || euid != MESSAGEBUS.uid {
        bail!("still uid {uid}/{euid} after setuid({})", MESSAGEBUS.uid);
    }
    let caps = rustix::thread::capabilities(None).context("reading capabilities")?;
    if !caps.effective.is_empty() || !caps.permitted.is_empty() {
        bail!("capabilities left after dropping root: {caps:?}");
    }
    Ok(())
}

async fn serve(path: &Path, notifier: qagent::notify::Notifier) -> Result<()> {
    let mut bus = qbus::SystemBus::bind(path).await?;
    eprintln!(
        "system bus listening on {} as uid {}",
        bus.address(),
        rustix::process::geteuid().as_raw()
    );
    notifier.ready("system bus up")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = bus.run() => r?,
        _ = term.recv() => eprintln!("SIGTERM: stopping"),
    }
    bus.cleanup()
}
