//! The bus's policy held to the real thing: the `qbus` binary, started as
//! root as qinit starts it (it drops to `messagebus`), a root service that
//! owns `org.qubesos.Update1`, and clients of other uids in their own
//! processes (`setpriv`), which may neither take a name nor call Update1
//! or Domains1 by any route. A root client calling the same service is the
//! control: the refusals are the policy's, not a broken bus. Needs root
//! (CI runs as root) and util-linux's `setpriv`.

#![allow(clippy::unwrap_used)] // test harness code: a panic is a test failure

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qcontract::accounts::{MESSAGEBUS, NOBODY};
use qcontract::bus::{DOMAINS1, UPDATE1};

/// The environment variable that turns [`client_of_another_uid`] from a
/// no-op into the client the parent test runs under another uid.
const CHILD_ADDRESS: &str = "QBUS_TEST_CHILD_ADDRESS";
const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";

struct Bus {
    child: Child,
    path: PathBuf,
}

impl Bus {
    fn start(dir: &Path) -> Bus {
        let path = dir.join("dbus/system_bus_socket");
        let child = Command::new(env!("CARGO_BIN_EXE_qbus"))
            .env("QBUS_SOCKET", &path)
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let bus = Bus { child, path };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&bus.path).is_err() {
            assert!(Instant::now() < deadline, "qbus did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        bus
    }

    fn address(&self) -> String {
        format!("unix:path={}", self.path.display())
    }

    /// A `/proc/<pid>/status` field of the bus process.
    fn status(&self, field: &str) -> String {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The stand-in for qupdated: it owns Update1 and counts the calls that
/// reach it.
struct FakeUpdate1 {
    calls: Arc<AtomicUsize>,
}

#[zbus::interface(name = "org.qubesos.Update1")]
impl FakeUpdate1 {
    fn mark_good(&self) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        "A".into()
    }

    #[zbus(property)]
    fn status(&self) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        "{}".into()
    }
}

async fn connect(address: &str) -> zbus::Connection {
    zbus::connection::Builder::address(address)
        .build()
        .await
        .unwrap()
}

/// The control: root calls the stand-in service and is answered.
async fn mark_good_as_root(root: &zbus::Connection) {
    let reply = root
        .call_method(
            Some(UPDATE1.name),
            UPDATE1.path,
            Some(UPDATE1.name),
            "MarkGood",
            &(),
        )
        .await
        .unwrap();
    assert_eq!(reply.body().deserialize::<String>().unwrap(), "A");
}

fn method_error(r: zbus::Result<zbus::Message>) -> String {
    match r {
        Ok(m) => panic!("the call went through: {m:?}"),
        // `<error name>: <text>`, as a bus error (FDO) or any other.
        Err(e) => e.to_string(),
    }
}

#[test]
fn other_uids_neither_own_nor_call_the_agents_apis() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the bus drops from root to messagebus and the clients run as other uids: run as root"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bus = Bus::start(dir.path());

    // The broker is messagebus with no capability, on a socket all may
    // open: the policy decides.
    let uid = MESSAGEBUS.uid.to_string();
    assert_eq!(bus.status("Uid"), [uid.as_str(); 4].join(" "));
    assert_eq!(bus.status("CapEff"), "0000000000000000");
    assert_eq!(bus.status("CapPrm"), "0000000000000000");
    let meta = std::fs::metadata(&bus.path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);
    assert_eq!(meta.uid(), MESSAGEBUS.uid);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let address = bus.address();
    let (_service, owner) = rt.block_on(async {
        let service = zbus::connection::Builder::address(address.as_str())
            .name(UPDATE1.name)
            .serve_at(
                UPDATE1.path,
                FakeUpdate1 {
                    calls: calls.clone(),
                },
            )
            .build()
            .await
            .unwrap();
        let owner = service.unique_name().unwrap().to_string();
        // The control: root calls it and is answered.
        let root = connect(&address).await;
        mark_good_as_root(&root).await;
        root.request_name("org.example.RootMayOwnThis")
            .await
            .unwrap();
        (service, owner)
    });
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Run a client as each other uid while the runtime serves the root
    // service. The test binary is copied where those uids may run it.
    let exe = dir.path().join("client");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    for who in [NOBODY, MESSAGEBUS] {
        let out = rt.block_on(async {
            tokio::process::Command::new("setpriv")
                .arg(format!("--reuid={}", who.uid))
                .arg(format!("--regid={}", who.gid))
                .arg("--clear-groups")
                .arg(&exe)
                .args([
                    "--exact",
                    "client_of_another_uid",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ADDRESS, &address)
                .env("QBUS_TEST_OWNER", &owner)
                .output()
                .await
                .expect("util-linux setpriv is needed")
        });
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "as {}: {text}", who.name);
        assert!(
            text.contains("CLIENT-REFUSED-ALL"),
            "as {}: {text}",
            who.name
        );
    }
    // Nothing a refused client sent reached the service.
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // A client that floods refused calls and never reads its answers (nor
    // the signals it asked for) must not freeze the bus for anyone else.
    let mut flood = std::process::Command::new("setpriv")
        .arg(format!("--reuid={}", NOBODY.uid))
        .arg(format!("--regid={}", NOBODY.gid))
        .arg("--clear-groups")
        .arg(&exe)
        .args([
            "--exact",
            "flood_without_reading",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FLOOD_PATH, &bus.path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    rt.block_on(async {
        let root = connect(&address).await;
        for n in 0..5 {
            // Each new name is a NameOwnerChanged broadcast, to the
            // flooding client too.
            let name = format!("org.example.After{n}");
            let step = async {
                root.request_name(name.as_str()).await.unwrap();
                mark_good_as_root(&root).await;
            };
            tokio::time::timeout(Duration::from_secs(10), step)
                .await
                .unwrap_or_else(|_| {
                    panic!("the bus froze behind a client that does not read ({n})")
                });
        }
    });
    let _ = flood.kill();
    let _ = flood.wait();
}

/// Where [`flood_without_reading`] finds the bus.
const FLOOD_PATH: &str = "QBUS_TEST_FLOOD_PATH";

/// Not a test of its own: the hostile client of the flood check, run as
/// another uid. It authenticates by hand, asks for every signal, sends
/// refused calls until the bus stops reading and never reads a byte.
#[test]
fn flood_without_reading() {
    use std::io::{BufRead, Write};
    let Ok(path) = std::env::var(FLOOD_PATH) else {
        return;
    };
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let uid = rustix::process::geteuid().as_raw().to_string();
    s.write_all(format!("\0AUTH EXTERNAL {}\r\n", hex(&uid)).as_bytes())
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line}");
    s.write_all(b"BEGIN\r\n").unwrap();
    let call = |dest: &str, path: &str, iface: &str, member: &str, body: &str| {
        let b = zbus::Message::method_call(path, member)
            .destination(dest)
            .interface(iface);
        let m = if body.is_empty() {
            b.build(&())
        } else {
            b.build(&(body,))
        };
        m.unwrap().data().to_vec()
    };
    let bus = "org.freedesktop.DBus";
    s.write_all(&call(bus, "/org/freedesktop/DBus", bus, "Hello", ""))
        .unwrap();
    s.write_all(&call(
        bus,
        "/org/freedesktop/DBus",
        bus,
        "AddMatch",
        "type='signal'",
    ))
    .unwrap();
    let refused = call(UPDATE1.name, UPDATE1.path, UPDATE1.name, "MarkGood", "");
    // Blocks once the bus stops reading: then it just holds on.
    for _ in 0..100_000 {
        if s.write_all(&refused).is_err() {
            break;
        }
    }
    std::thread::sleep(Duration::from_secs(60));
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Not a test of its own: the client [`other_uids_neither_own_nor_call_the_agents_apis`]
/// runs in a process of another uid. Without its variable it does nothing.
#[test]
fn client_of_another_uid() {
    let Ok(address) = std::env::var(CHILD_ADDRESS) else {
        return;
    };
    let owner = std::env::var("QBUS_TEST_OWNER").unwrap();
    let me = rustix::process::geteuid().as_raw();
    assert_ne!(me, 0, "the client must not run as root");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = connect(&address).await;
        let dbus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
        // The bus's own API is open: the refusals below are the policy's.
        let names = dbus.list_names().await.unwrap();
        assert!(
            names.iter().any(|n| n.as_str() == UPDATE1.name),
            "{names:?}"
        );
        assert_eq!(
            dbus.get_connection_unix_user(conn.unique_name().unwrap().clone().into())
                .await
                .unwrap(),
            me
        );

        // Names: neither a protected one nor any other.
        for name in [UPDATE1.name, DOMAINS1.name, "org.example.Unlisted"] {
            let e = conn.request_name(name).await.unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(&format!("uid {me} may not own {name}")),
                "{name}: {text}"
            );
        }
        let owner_now = dbus
            .get_name_owner(UPDATE1.name.try_into().unwrap())
            .await
            .unwrap();
        assert_eq!(owner_now.as_str(), owner, "the name changed hands");

        // Calls: by the well-known name, by the owner's unique name, to a
        // service nobody owns, and the standard interfaces on them.
        let attempts = [
            (UPDATE1.name, UPDATE1.path, UPDATE1.name, "MarkGood"),
            (owner.as_str(), UPDATE1.path, UPDATE1.name, "MarkGood"),
            (owner.as_str(), "/", "org.example.Any", "Thing"),
            (DOMAINS1.name, DOMAINS1.path, DOMAINS1.name, "List"),
            (
                UPDATE1.name,
                UPDATE1.path,
                "org.freedesktop.DBus.Introspectable",
                "Introspect",
            ),
        ];
        for (dest, path, iface, member) in attempts {
            let e = method_error(
                conn.call_method(Some(dest), path, Some(iface), member, &())
                    .await,
            );
            assert!(e.starts_with(ACCESS_DENIED), "{dest} {member}: {e}");
            assert!(
                e.contains(&format!("uid {me} may not call")),
                "{dest} {member}: {e}"
            );
        }
        let e = method_error(
            conn.call_method(
                Some(UPDATE1.name),
                UPDATE1.path,
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &(UPDATE1.name, "Status"),
            )
            .await,
        );
        assert!(e.starts_with(ACCESS_DENIED), "Status: {e}");
        // Root-only bus methods.
        let e = method_error(
            conn.call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus.Monitoring"),
                "BecomeMonitor",
                &(Vec::<String>::new(), 0u32),
            )
            .await,
        );
        assert!(e.starts_with(ACCESS_DENIED), "BecomeMonitor: {e}");
    });
    println!("CLIENT-REFUSED-ALL uid {me}");
}
