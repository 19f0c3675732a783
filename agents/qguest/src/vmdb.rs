//! The VM side of QubesDB, as a Qubes VM's own `qubesdb-daemon` does it:
//! connect to dom0's daemon as the vchan client on port 111, ask for
//! everything (MULTIREAD), and from then on apply dom0's writes and
//! removals, answering each. Written against the protocol
//! (`qubesdb::peer::VmSide`), not against our dom0 daemon.
//!
//! Once the first copy is complete it prints the VM's name and GUI VM
//! (`QGUEST-QUBESDB name=<name> gui-domain-xid=<xid>`), the stand-in's
//! marker for the scenarios. If the connection breaks it reconnects, as
//! the VM-side daemon does when dom0's restarts.
//!
//! The VM's programs read the copy at `/run/qubes/qubesdb.sock` with the
//! local protocol (`qubesdb::local`), as in a Qubes VM; `qubesdb-read
//! <path>...` is this program under that name. The stand-in's copy is
//! dom0's and read-only here: a local write or removal is refused (the
//! client is disconnected), and watches never fire.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qubesdb::db::Db;
use qubesdb::local::Session;
use qubesdb::peer::VmSide;
use qubesdb::wire::QdbPath;
use qvchan::Vchan;

/// How long to wait for dom0's offer after boot (qdomd makes it before
/// unpausing us, so it is normally there at once).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs forever: sync, mirror, reconnect; serve the copy locally.
pub fn run(own: u16, log: fn(&str)) {
    let db = Arc::new(Mutex::new(Db::new()));
    let socket = qubesdb::socket_path(None);
    match crate::bind_for_all(&socket.to_string_lossy()) {
        Ok(listener) => {
            let db = db.clone();
            std::thread::spawn(move || serve_local(listener, &db, log));
        }
        Err(e) => log(&format!("qubesdb: no local socket: {e}")),
    }
    let mut announced = false;
    loop {
        if let Err(e) = session(own, &db, &mut announced, log) {
            log(&format!("qubesdb: {e}; reconnecting"));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Local clients connected at once; more are closed at once.
const MAX_LOCAL_CLIENTS: usize = 32;

/// Accepts the VM's programs, each on a thread of its own (bounded).
fn serve_local(listener: std::os::unix::net::UnixListener, db: &Arc<Mutex<Db>>, log: fn(&str)) {
    let clients = crate::threads::Bounded::new(MAX_LOCAL_CLIENTS);
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of fds, say: wait rather than spin.
                log(&format!("qubesdb: local socket: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let db = db.clone();
        // Past the limit the client is closed at once.
        clients.spawn(move || local_client(stream, &db, log));
    }
}

/// One local client: reads answered from the copy; anything that would
/// change it ends the connection.
fn local_client(mut stream: UnixStream, db: &Mutex<Db>, log: fn(&str)) {
    let mut session = Session::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let out = {
            let Ok(db) = db.lock() else { return };
            // On a scratch copy: what a client changes must not land.
            let mut scratch = db.clone();
            match session.input(&mut scratch, &buf[..n]) {
                Ok(out) => out,
                Err(e) => return log(&format!("qubesdb: a local client: {e}")),
            }
        };
        if !out.changes.is_empty() {
            return log("qubesdb: a local client tried to change the copy; it is read-only here");
        }
        if stream.write_all(&out.reply).is_err() {
            return;
        }
    }
}

/// `qubesdb-read <path>...` in the VM.
pub fn read_tool(paths: &[String]) -> ExitCode {
    if paths.is_empty() || paths.iter().any(|p| p.starts_with('-')) {
        eprintln!("usage: qubesdb-read <path>...");
        return ExitCode::from(2);
    }
    if qubesdb::client::read_tool(&qubesdb::socket_path(None), paths) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn session(
    own: u16,
    shared: &Mutex<Db>,
    announced: &mut bool,
    log: fn(&str),
) -> Result<(), String> {
    let err = |e: &dyn std::error::Error| qcontract::error_chain(e);
    let mut xs = qxenstore::Xs::open().map_err(|e| err(&e))?;
    let mut chan = Vchan::client(&mut xs, own, 0, qubesdb::VCHAN_PORT, CONNECT_TIMEOUT)
        .map_err(|e| err(&e))?;
    drop(xs);
    // A new connection starts from an empty copy, as dom0 sends it all.
    *shared
        .lock()
        .map_err(|_| "the copy's lock is poisoned".to_string())? = Db::new();
    let (mut side, hello) = VmSide::new();
    chan.write_all(&hello, IO_TIMEOUT).map_err(|e| err(&e))?;
    let mut buf = [0u8; 4096];
    loop {
        // Between changes dom0 may stay silent for ever: wait in slices,
        // the vchan checks dom0 is alive meanwhile.
        let n = match chan.read(&mut buf, IO_TIMEOUT) {
            Ok(n) => n,
            Err(qvchan::VchanError::Timeout { .. }) => continue,
            Err(e) => return Err(err(&e)),
        };
        let mut db = shared
            .lock()
            .map_err(|_| "the copy's lock is poisoned".to_string())?;
        let out = side.input(&mut db, &buf[..n]).map_err(|e| err(&e))?;
        let first = side.synced() && !*announced;
        let marker = first.then(|| {
            let get = |p: &str| {
                QdbPath::new(p)
                    .ok()
                    .and_then(|p| db.read(&p).map(|v| String::from_utf8_lossy(v).into_owned()))
                    .unwrap_or_else(|| "-".into())
            };
            format!(
                "QGUEST-QUBESDB name={} gui-domain-xid={} entries={}",
                get("/name"),
                get("/qubes-gui-domain-xid"),
                db.len()
            )
        });
        drop(db);
        chan.write_all(&out.send, IO_TIMEOUT).map_err(|e| err(&e))?;
        if let Some(m) = marker {
            *announced = true;
            log(&m);
        }
    }
}
