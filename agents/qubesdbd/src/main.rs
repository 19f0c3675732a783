//! `qubesdb-daemon <domid> [<name>]`: dom0's QubesDB daemon for one VM, with
//! the command line of Qubes' own (`core-qubesdb/daemon/db-daemon.c`), so
//! Qubes habits carry over. qdomd starts one per VM before unpausing it.
//!
//! - It offers the VM a vchan on port 111 (rings of 4096 bytes each way);
//!   the VM's `qubesdb-daemon` connects, asks for everything (MULTIREAD)
//!   and from then on mirrors dom0's writes and removals.
//! - dom0's tools and qdomd read and write the VM's entries over
//!   `/run/qubes/qubesdb.<name>.sock` (root only) with the same messages.
//! - With domid 0 and no name it is dom0's own database
//!   (`/run/qubes/qubesdb.sock`), with no vchan.
//!
//! Everything from the VM is hostile: a malformed message closes its
//! connection, logged with the VM's name and the reason, and a fresh vchan
//! is offered. The daemon exits when the VM's domain is gone.

use std::process::ExitCode;

mod daemon;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [domid] => domid.parse::<u16>().ok().map(|d| (d, None)),
        [domid, name] => domid.parse::<u16>().ok().map(|d| (d, Some(name.clone()))),
        _ => None,
    };
    let Some((domid, name)) = parsed else {
        eprintln!("usage: qubesdb-daemon <remote-domid> [<remote-name>]");
        return ExitCode::from(2);
    };
    if let Some(n) = &name {
        if !qcontract::vm::valid_vm_name(n) {
            eprintln!("qubesdb-daemon: {n:?} is not a valid VM name");
            return ExitCode::from(2);
        }
    }
    if (domid == 0) != name.is_none() {
        eprintln!("qubesdb-daemon: a VM needs a name, and dom0's own database none");
        return ExitCode::from(2);
    }
    match daemon::run(
        domid,
        name.as_deref(),
        &qubesdb::socket_path(name.as_deref()),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qubesdb-daemon: {}", qcontract::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
