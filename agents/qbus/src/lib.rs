//! The dom0 system bus: busd's broker, with the policy busd lacks.
//!
//! busd (zbus's broker) routes messages, keeps the name registry and
//! delivers a reply only to the call it answers, but it does not enforce
//! dbus-daemon `<policy>`. qbus puts a policy layer in front of it rather
//! than write a broker of its own: it accepts each client itself, reads
//! the client's uid from `SO_PEERCRED`, and hands busd a socket whose
//! halves check [`policy`] on every message in and every signal out (see
//! [`socket`]). Who may own and call what is `qcontract::bus`, the table
//! the agents check their callers against too. busd's own listener is
//! bound on a private path that is unlinked at once, so no client reaches
//! busd but through the policy. The socket is mode 0666, as a system bus
//! is: the policy, not the file mode, decides.

pub mod limits;
pub mod policy;
pub mod socket;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use qcontract::bus::SYSTEM_BUS_SOCKET;

/// The bus's GUID: 128 random bits in hex. It identifies the server and
/// is no secret (dbus-daemon reads it from /dev/urandom without waiting),
/// so it is taken from the pool whether or not the pool is initialised.
/// busd would make its own with a getrandom that waits for the pool, which
/// on a machine without RDRAND or a hardware RNG can take minutes, and the
/// bus is on the boot path.
fn server_guid() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut done = 0;
    while done < bytes.len() {
        match rustix::rand::getrandom(&mut bytes[done..], rustix::rand::GetRandomFlags::INSECURE) {
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A bound bus ready to run.
pub struct SystemBus {
    bus: busd::bus::Bus,
    listener: tokio::net::UnixListener,
    path: PathBuf,
    next_id: usize,
    limits: limits::Limits,
}

impl std::fmt::Debug for SystemBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemBus")
            .field("path", &self.path)
            .finish()
    }
}

/// Removes `path` if it is there.
fn remove_stale(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
}

impl SystemBus {
    /// Binds the bus at `path` (in a directory the caller may write).
    pub async fn bind(path: &Path) -> Result<Self> {
        let dir = path
            .parent()
            .with_context(|| format!("{}: a socket path needs a directory", path.display()))?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        remove_stale(path)?;
        let guid = server_guid().context("making the bus's GUID")?;

        // busd must listen somewhere; it listens where only this process
        // can reach, for as long as it takes to bind, and the name goes
        // at once: from then on clients come only through `run`.
        let private = dir.join(format!(".qbus-{}", &guid[..16]));
        let _ = std::fs::remove_dir_all(&private);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .with_context(|| format!("creating {}", private.display()))?;
        let inner = private.join("busd");
        let bus = busd::bus::Bus::for_address(Some(&format!(
            "unix:path={},guid={guid}",
            inner.display()
        )))
        .await;
        let removed = std::fs::remove_dir_all(&private);
        let bus = bus.with_context(|| format!("starting busd at {}", inner.display()))?;
        removed.with_context(|| format!("removing {}", private.display()))?;

        // The umask keeps everyone else out until the socket is complete;
        // then it opens to all, and the policy decides.
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        let listener = std::os::unix::net::UnixListener::bind(path);
        rustix::process::umask(old);
        let listener =
            listener.with_context(|| format!("binding the bus at {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .with_context(|| format!("chmod {}", path.display()))?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        Ok(Self {
            bus,
            listener,
            path: path.to_owned(),
            next_id: 0,
            limits: limits::Limits::default(),
        })
    }

    pub fn address(&self) -> String {
        format!("unix:path={}", self.path.display())
    }

    /// Serves clients for as long as the process lives. An accept that
    /// fails (out of file descriptors, a client gone before it was
    /// accepted) is said and retried after a pause: the bus does not end
    /// for one client.
    pub async fn run(&mut self) -> Result<()> {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("accepting on {}: {e}", self.path.display());
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            };
            let slot = match self.limits.admit(&stream) {
                Ok(slot) => slot,
                Err(e) => {
                    eprintln!("connection refused: {e}");
                    continue;
                }
            };
            self.next_id += 1;
            let id = self.next_id;
            let peers = self.bus.peers().clone();
            let guid = self.bus.guid().clone();
            tokio::spawn(async move {
                if let Err(e) = serve(stream, id, peers, guid, slot).await {
                    eprintln!(":busd.{id}: {e:#}");
                }
            });
        }
    }

    /// Removes the socket.
    pub fn cleanup(self) -> Result<()> {
        remove_stale(&self.path)
    }
}

/// How long a client may take to authenticate (dbus-daemon's
/// `auth_timeout` is 30 s): one that never does holds nothing for long.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The pause after a failed accept.
const ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Hands one accepted client to busd through the policy's socket halves.
async fn serve(
    stream: tokio::net::UnixStream,
    id: usize,
    peers: std::sync::Arc<busd::peers::Peers>,
    guid: zbus::OwnedGuid,
    slot: limits::Slot,
) -> Result<()> {
    let (peer, split) = socket::split(stream, id, peers.clone(), slot)?;
    let add = peers.add(
        &guid,
        id,
        zbus::connection::Builder::socket(split),
        zbus::connection::AuthMechanism::External,
        busd::peer::SEND_TIMEOUT,
    );
    tokio::time::timeout(HANDSHAKE_TIMEOUT, add)
        .await
        .map_err(|_| anyhow::anyhow!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()))
        .and_then(|r| r)
        .with_context(|| format!("uid {} pid {}: connection refused", peer.uid, peer.pid))
}

#[cfg(test)]
mod guid_tests {
    #[test]
    fn the_guid_is_128_bits_of_hex_and_new_each_time() {
        let a = super::server_guid().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, super::server_guid().unwrap());
    }
}
