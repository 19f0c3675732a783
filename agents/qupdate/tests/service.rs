//! qupdated on a private bus (busd, as in dom0) over file-backed slots: the
//! CLI goes through it, a client sees progress and the completion signal,
//! and a second apply while one runs is refused.

#![allow(clippy::unwrap_used)] // test fixtures

mod common;

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{world, World, COMPATIBLE};
use futures_util::StreamExt;
use qcontract::Slot;
use qupdate::dbus::{ServiceError, Update1Proxy};

/// A bus on a socket in `dir`, served from a thread for the rest of the test
/// process. Returns its address.
fn start_bus(dir: &std::path::Path) -> String {
    let path = dir.join("bus/system_bus_socket");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut bus = qbus::SystemBus::bind(&path).await.unwrap();
            tx.send(bus.address()).unwrap();
            let _ = bus.run().await;
        });
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn slot_args(w: &World) -> Vec<String> {
    let d = w.dir.path();
    vec![
        "--trust".into(),
        d.join("trust.toml").display().to_string(),
        "--state".into(),
        d.join("state/state.json").display().to_string(),
    ]
}

/// Starts qupdated and waits for its sd_notify READY=1, as qinit does.
fn start_daemon(w: &World, bus: &str) -> Daemon {
    let notify = w.dir.path().join("notify");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_qupdate"))
        .arg("service")
        .arg("--disk")
        .arg(&w.disk)
        .args(["--booted", "A", "--compatible", COMPATIBLE])
        .args(["--image-version", "0.1.0", "--image-epoch", "1"])
        .args(slot_args(w))
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
        .env("NOTIFY_SOCKET", &notify)
        .spawn()
        .unwrap();
    let daemon = Daemon(child);
    let mut buf = [0u8; 256];
    let n = rx.recv(&mut buf).expect("qupdated never said READY=1");
    assert!(buf[..n].starts_with(b"READY=1\n"), "{:?}", &buf[..n]);
    daemon
}

/// The CLI without --disk: it finds the service on the bus.
fn qupdate(bus: &str, args: &[&str], stdin: Option<Vec<u8>>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qupdate"))
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        });
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_cli_installs_through_the_service_and_bad_input_changes_nothing() {
    let w = world();
    let bus = start_bus(w.dir.path());
    let mut daemon = start_daemon(&w, &bus);
    let bundle = w.dir.path().join("next.bundle");
    std::fs::write(&bundle, w.bundle(&[&w.key], |_| {})).unwrap();

    let out = qupdate(&bus, &["apply", bundle.to_str().unwrap()], None);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    // Without --disk and outside dom0 only the service could have done it.
    assert!(stderr.contains("through qupdated"), "{stderr}");
    assert!(
        stdout.contains("installed 0.2.0 (epoch 5) into slot B"),
        "{stdout}"
    );
    assert!(
        stderr.contains("qupdate: verify 100%"),
        "no progress: {stderr}"
    );
    assert_eq!(w.boot_state().next_boot(), Some(Slot::B));
    // The health gate's hook, as qinit runs it: through the service.
    let out = qupdate(&bus, &["mark-good", "--through-service"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "slot A marked good\n");

    // A bundle signed by a stranger, piped on stdin: refused, nothing moves.
    let before = w.part("root_b");
    let stranger = qbundle::generate_keypair().unwrap();
    let out = qupdate(&bus, &["apply", "-"], Some(w.bundle(&[&stranger], |_| {})));
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no signature by a trusted key"), "{stderr}");
    assert_eq!(w.boot_state().next_boot(), Some(Slot::B));
    assert!(
        w.part("root_b") == before,
        "root_b changed after a refused bundle"
    );

    let out = qupdate(&bus, &["status", "--json"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["booted"], "A");
    assert_eq!(st["slots"][1]["state"], "bootable");
    assert_eq!(st["slots"][1]["version"], "0.2.0");
    assert!(
        st["last_error"]
            .as_str()
            .unwrap()
            .contains("no signature by a trusted key"),
        "{st}"
    );

    // B is not good yet: no rollback to it; the error comes back by name.
    let out = qupdate(&bus, &["rollback"], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("slot B is not good"),
        "{}",
        text(&out.stderr)
    );

    let pid = rustix::process::Pid::from_raw(i32::try_from(daemon.0.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert!(daemon.0.wait().unwrap().success());
}

#[test]
fn a_client_sees_progress_and_completion_and_a_second_apply_is_busy() {
    let w = world();
    let bus = start_bus(w.dir.path());
    let _daemon = start_daemon(&w, &bus);
    let bundle = w.bundle(&[&w.key], |_| {});
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(bus.as_str())
            .build()
            .await
            .unwrap();
        let proxy = Update1Proxy::new(&conn).await.unwrap();
        let mut completed = proxy.receive_completed().await.unwrap();

        let (reader, mut writer) = std::io::pipe().unwrap();
        // (tries, stall timeout): what the boot loader or the guard cannot honour.
        for (tries, stall) in [(0, 60), (10, 60), (2, 0), (2, 3601)] {
            let bad = proxy
                .apply(zbus::Fd::from(&reader), tries, false, stall)
                .await
                .unwrap_err();
            assert!(
                matches!(bad, ServiceError::InvalidArgs(_)),
                "{tries} {stall}: {bad:?}"
            );
        }

        let id = proxy
            .apply(zbus::Fd::from(&reader), 2, false, 60)
            .await
            .unwrap();
        drop(reader);
        // The service now blocks reading the pipe: it is busy.
        assert_eq!(proxy.operation().await.unwrap(), "apply");
        let (r2, _w2) = std::io::pipe().unwrap();
        let busy = proxy
            .apply(zbus::Fd::from(&r2), 2, false, 60)
            .await
            .unwrap_err();
        assert!(matches!(busy, ServiceError::Busy(_)), "{busy:?}");

        // Mark-good (qinit's hook) is never starved by an apply: it takes
        // only the state lock, and is done while the apply still waits.
        let marked = tokio::time::timeout(Duration::from_secs(10), proxy.mark_good())
            .await
            .expect("mark-good waited for the apply")
            .unwrap();
        assert_eq!(marked, "A");
        assert_eq!(proxy.operation().await.unwrap(), "apply");

        let feeder = std::thread::spawn(move || writer.write_all(&bundle));
        let sig = tokio::time::timeout(Duration::from_secs(60), completed.next())
            .await
            .expect("no Completed within 60 s")
            .unwrap();
        feeder.join().unwrap().unwrap();
        let args = sig.args().unwrap();
        assert_eq!(*args.id(), id);
        assert!(*args.success(), "{}", args.result());
        let applied: qupdate::Applied = serde_json::from_str(args.result()).unwrap();
        assert_eq!(applied.slot, Slot::B);
        let (phase, done, total) = proxy.progress().await.unwrap();
        assert_eq!((phase.as_str(), done), ("verify", total));
        assert_eq!(proxy.operation().await.unwrap(), "idle");
        assert_eq!(proxy.last_error().await.unwrap(), "");
        let st: qupdate::Status = serde_json::from_str(&proxy.status().await.unwrap()).unwrap();
        assert_eq!(st.slot(Slot::B).tries, 2);
    });
    assert_eq!(w.boot_state().next_boot(), Some(Slot::B));
}

/// `--disk` names the slots: the CLI opens them itself, service or not,
/// and says and prints what it always has.
#[test]
fn with_disk_the_cli_works_on_the_slots_itself_even_beside_the_service() {
    let w = world();
    let bus = start_bus(w.dir.path());
    let _daemon = start_daemon(&w, &bus);
    let disk = w.disk.display().to_string();
    let local = |args: &[&str], stdin| {
        let mut all = vec!["--disk", &disk, "--booted", "A", "--compatible", COMPATIBLE];
        all.extend(["--image-version", "0.1.0", "--image-epoch", "1"]);
        let slots = slot_args(&w);
        all.extend(slots.iter().map(String::as_str));
        all.extend(args);
        let out = qupdate(&bus, &all, stdin);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(!stderr.contains("through qupdated"), "{stderr}");
        (out.status.success(), stdout, stderr)
    };

    let (ok, stdout, stderr) = local(&["apply", "-"], Some(w.bundle(&[&w.key], |_| {})));
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(
        stdout,
        "installed 0.2.0 (epoch 5) into slot B, signed by test; it boots next, with 3 tries\n"
    );
    assert!(stderr.contains("qupdate: verify 100%"), "{stderr}");

    let (ok, stdout, stderr) = local(&["status", "--json"], None);
    assert!(ok, "{stderr}");
    let st: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(st["order"], serde_json::json!(["B", "A"]));
    assert_eq!(st["slots"][1]["state"], "bootable");
    let (ok, stdout, stderr) = local(&["status"], None);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("  slot B: bootable (3 tries) version 0.2.0 epoch 5\n"),
        "{stdout}"
    );

    let (ok, _, stderr) = local(&["rollback"], None);
    assert!(!ok);
    assert!(stderr.contains("slot B is not good"), "{stderr}");
    // The health gate's hook never marks a slot good around the service.
    let (ok, _, stderr) = local(&["mark-good", "--through-service"], None);
    assert!(!ok);
    assert!(stderr.contains("not on the system bus"), "{stderr}");
    let (ok, stdout, stderr) = local(&["mark-good"], None);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "slot A marked good\n");
    assert_eq!(w.boot_state().next_boot(), Some(Slot::B));
}
