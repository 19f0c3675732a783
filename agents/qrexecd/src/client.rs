//! `qrexec-client -d <vm> [-e] [-w <seconds>] <user>:<command>`: runs a
//! command in a VM from dom0 (or calls a service there, with
//! `<user>:QUBESRPC <service>[+arg] <source>`), with the command line of
//! Qubes' own (`daemon/qrexec-client.c`). `DEFAULT` as the user means the
//! VM's default user.
//!
//! It asks the VM's qrexec-daemon for a data port, offers a vchan on it
//! (64 KiB rings each way) that the VM's agent connects to, and passes
//! stdin, stdout and stderr through; its exit code is the command's.
//! With `-e` the command runs with its stdio on /dev/null and the client
//! exits at once.

use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::time::Duration;

use qrexec::data::{self, Local, Outcome, Side};
use qrexec::wire::MsgType;
use qrexecd::local::DaemonConn;
use qvchan::Vchan;

const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// Exit codes of Qubes' client for its own failures.
const EXIT_PROBLEM: u8 = 125;

struct Args {
    vm: String,
    just_exec: bool,
    wait: Duration,
    cmdline: String,
}

fn usage() -> ExitCode {
    eprintln!("usage: qrexec-client -d <vm> [-e] [-w <seconds>] <user>:<command>");
    ExitCode::from(2)
}

fn parse_args() -> Option<Args> {
    let mut vm = None;
    let mut just_exec = false;
    let mut wait = Duration::from_secs(5);
    let mut cmdline = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-d" => vm = Some(it.next()?),
            "-e" => just_exec = true,
            "-w" => wait = Duration::from_secs(it.next()?.parse().ok()?),
            s if s.starts_with('-') => return None,
            _ if cmdline.is_none() => cmdline = Some(a),
            _ => return None,
        }
    }
    Some(Args {
        vm: vm?,
        just_exec,
        wait,
        cmdline: cmdline?,
    })
}

fn main() -> ExitCode {
    let Some(args) = parse_args() else {
        return usage();
    };
    if !qcontract::vm::valid_vm_name(&args.vm) {
        eprintln!("qrexec-client: {:?} is not a VM name", args.vm);
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(code) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(EXIT_PROBLEM)),
        Err(e) => {
            eprintln!("qrexec-client: {e}");
            ExitCode::from(EXIT_PROBLEM)
        }
    }
}

fn run(args: &Args) -> Result<i32, String> {
    let mut conn = DaemonConn::connect(&args.vm, SOCKET_TIMEOUT).map_err(|e| e.to_string())?;
    let kind = if args.just_exec {
        MsgType::JustExec
    } else {
        MsgType::ExecCmdline
    };
    let reply = conn
        .request(kind, 0, args.cmdline.as_bytes())
        .map_err(|e| e.to_string())?;
    let domid =
        u16::try_from(reply.domain).map_err(|_| format!("domain {} out of range", reply.domain))?;
    let mut xs = qxenstore::Xs::open().map_err(|e| qcontract::error_chain(&e))?;
    let own = xs.own_domid().map_err(|e| qcontract::error_chain(&e))?;
    let mut chan = Vchan::server(
        &mut xs,
        own,
        domid,
        reply.port,
        qrexec::DATA_RING,
        qrexec::DATA_RING,
    )
    .map_err(|e| qcontract::error_chain(&e))?;
    drop(xs);
    chan.wait_connected(args.wait)
        .map_err(|e| qcontract::error_chain(&e))?;
    data::handshake(&mut chan, SOCKET_TIMEOUT).map_err(|e| qcontract::error_chain(&e))?;
    // The daemon keeps our socket until the agent reports the end.
    drop(conn);
    let local = if args.just_exec {
        Local::default()
    } else {
        Local {
            input: Some(dup(std::io::stdin().as_fd())?),
            input_err: None,
            output: Some(dup(std::io::stdout().as_fd())?),
            output_err: Some(dup(std::io::stderr().as_fd())?),
        }
    };
    match data::pump(&mut chan, Side::Client, local, &mut || 0) {
        Ok(Outcome::Exited(code)) => Ok(code),
        Ok(Outcome::Done) => Ok(0),
        Err(e) => Err(qcontract::error_chain(&e)),
    }
}

fn dup(fd: std::os::fd::BorrowedFd<'_>) -> Result<OwnedFd, String> {
    fd.try_clone_to_owned().map_err(|e| e.to_string())
}
