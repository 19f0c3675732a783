//! The VM side of QubesDB, as a Qubes VM's own `qubesdb-daemon` does it:
//! connect to dom0's daemon as the vchan client on port 111, ask for
//! everything (MULTIREAD), and from then on apply dom0's writes and
//! removals, answering each. Written against the protocol
//! (`qubesdb::peer::VmSide`), not against our dom0 daemon.
//!
//! Once the first copy is complete it prints the VM's name and GUI VM
//! (`QGUEST-QUBESDB name=<name> gui-domain-xid=<xid>`), the stand-in's
//! equivalent of `qubesdb-read /name`. If the connection breaks it
//! reconnects, as the VM-side daemon does when dom0's restarts.

use std::time::Duration;

use qubesdb::db::Db;
use qubesdb::peer::VmSide;
use qubesdb::wire::QdbPath;
use qvchan::Vchan;

/// How long to wait for dom0's offer after boot (qdomd makes it before
/// unpausing us, so it is normally there at once).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs forever: sync, mirror, reconnect.
pub fn run(own: u16, log: fn(&str)) {
    let mut announced = false;
    loop {
        if let Err(e) = session(own, &mut announced, log) {
            log(&format!("qubesdb: {e}; reconnecting"));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn session(own: u16, announced: &mut bool, log: fn(&str)) -> Result<(), String> {
    let err = |e: &dyn std::error::Error| qcontract::error_chain(e);
    let mut xs = qxenstore::Xs::open().map_err(|e| err(&e))?;
    let mut chan = Vchan::client(&mut xs, own, 0, qubesdb::VCHAN_PORT, CONNECT_TIMEOUT)
        .map_err(|e| err(&e))?;
    drop(xs);
    let mut db = Db::new();
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
        let out = side.input(&mut db, &buf[..n]).map_err(|e| err(&e))?;
        chan.write_all(&out.send, IO_TIMEOUT).map_err(|e| err(&e))?;
        if side.synced() && !*announced {
            *announced = true;
            let get = |p: &str| {
                QdbPath::new(p)
                    .ok()
                    .and_then(|p| db.read(&p).map(|v| String::from_utf8_lossy(v).into_owned()))
                    .unwrap_or_else(|| "-".into())
            };
            log(&format!(
                "QGUEST-QUBESDB name={} gui-domain-xid={} entries={}",
                get("/name"),
                get("/qubes-gui-domain-xid"),
                db.len()
            ));
        }
    }
}
