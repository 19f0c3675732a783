//! The dom0 system bus.
//!
//! busd (zbus's broker) parses dbus-daemon policy files but does not
//! enforce them yet, so access control is the socket itself: it is created
//! mode 0600, owned by root, and only root can connect. Every agent API on
//! it (`org.qubesos.Update1`, `org.qubesos.Domains1`) is therefore root
//! only, which is what dom0 needs; a non-root client would need policy
//! enforcement first (see docs/services.md).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where clients find the system bus (the freedesktop default).
pub const SYSTEM_BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

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

/// A bound, root-only bus ready to run.
pub struct SystemBus {
    bus: busd::bus::Bus,
    path: PathBuf,
}

impl std::fmt::Debug for SystemBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemBus")
            .field("path", &self.path)
            .finish()
    }
}

impl SystemBus {
    /// Binds the bus at `path`. The umask keeps group and others out from
    /// the moment the socket exists, so there is no window where they can
    /// connect.
    pub async fn bind(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
        }
        let guid = server_guid().context("making the bus's GUID")?;
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        let bus =
            busd::bus::Bus::for_address(Some(&format!("unix:path={},guid={guid}", path.display())))
                .await;
        rustix::process::umask(old);
        let bus = bus.with_context(|| format!("binding the bus at {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", path.display()))?;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("stat {}", path.display()))?
            .permissions()
            .mode()
            & 0o777;
        if mode != 0o600 {
            bail!("{}: socket mode is {mode:o}, expected 600", path.display());
        }
        Ok(Self {
            bus,
            path: path.to_owned(),
        })
    }

    pub fn address(&self) -> String {
        format!("unix:path={}", self.path.display())
    }

    /// Serves clients until an error.
    pub async fn run(&mut self) -> Result<()> {
        self.bus.run().await
    }

    /// Removes the socket.
    pub async fn cleanup(self) -> Result<()> {
        self.bus.cleanup().await
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn root_only_socket_that_answers_dbus_calls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dbus/system_bus_socket");
        let mut bus = SystemBus::bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let address = bus.address();
        let server = tokio::spawn(async move {
            let _ = bus.run().await;
        });
        let conn = zbus::connection::Builder::address(address.as_str())
            .build()
            .await
            .unwrap();
        let proxy = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
        let names = proxy.list_names().await.unwrap();
        assert!(names.iter().any(|n| n.as_str() == "org.freedesktop.DBus"));
        conn.request_name("org.qubesos.Test1").await.unwrap();
        let names = proxy.list_names().await.unwrap();
        assert!(names.iter().any(|n| n.as_str() == "org.qubesos.Test1"));

        // Anyone but root is refused at connect(2).
        for d in [dir.path(), path.parent().unwrap()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"])
            .arg(format!(
                "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect({:?})\nexcept PermissionError:\n sys.exit(13)\n",
                path.display().to_string()
            ))
            .status()
            .expect("setpriv (util-linux) and /usr/bin/python3 (python3-minimal) are needed");
        assert_eq!(out.code(), Some(13), "a non-root client could connect");
        server.abort();
    }
}
