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

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use qrexec::data::{self, Local, Outcome, Side};
use qrexec::wire::{message, ExecParams, Header, MsgType, PeerInfo, HEADER_LEN, PROTOCOL_VERSION};
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
    let path = qrexec::socket_path(&args.vm);
    let mut s = UnixStream::connect(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    s.set_read_timeout(Some(SOCKET_TIMEOUT))
        .map_err(|e| e.to_string())?;
    // The daemon greets first; protocol 3 exactly on this socket.
    let (h, body) = read_msg(&mut s)?;
    match PeerInfo::parse(&body) {
        Ok(p) if h.kind == MsgType::Hello && p.version == PROTOCOL_VERSION => {}
        _ => {
            return Err(format!(
                "the daemon sent {} instead of a protocol 3 MSG_HELLO",
                h.kind
            ))
        }
    }
    s.write_all(
        &PeerInfo {
            version: PROTOCOL_VERSION,
        }
        .message(),
    )
    .map_err(|e| e.to_string())?;
    let kind = if args.just_exec {
        MsgType::JustExec
    } else {
        MsgType::ExecCmdline
    };
    let req = ExecParams {
        connect_domain: 0,
        connect_port: 0,
        cmdline: args.cmdline.as_bytes().to_vec(),
    };
    s.write_all(&message(kind, &req.render(true)))
        .map_err(|e| e.to_string())?;
    let (h, body) = read_msg(&mut s)?;
    if h.kind != kind || body.len() != 8 {
        return Err(format!(
            "the daemon answered {} of {} bytes",
            h.kind,
            body.len()
        ));
    }
    let reply =
        ExecParams::parse(MsgType::ConnectionTerminated, &body).map_err(|e| e.to_string())?;
    let domid = u16::try_from(reply.connect_domain)
        .map_err(|_| format!("domain {} out of range", reply.connect_domain))?;
    let mut xs = qxenstore::Xs::open().map_err(|e| qcontract::error_chain(&e))?;
    let own = xs.own_domid().map_err(|e| qcontract::error_chain(&e))?;
    let mut chan = Vchan::server(
        &mut xs,
        own,
        domid,
        reply.connect_port,
        qrexec::DATA_RING,
        qrexec::DATA_RING,
    )
    .map_err(|e| qcontract::error_chain(&e))?;
    drop(xs);
    chan.wait_connected(args.wait)
        .map_err(|e| qcontract::error_chain(&e))?;
    data::handshake(&mut chan, SOCKET_TIMEOUT).map_err(|e| qcontract::error_chain(&e))?;
    // The daemon keeps our socket until the agent reports the end.
    drop(s);
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

fn read_msg(s: &mut UnixStream) -> Result<(Header, Vec<u8>), String> {
    let mut raw = [0u8; HEADER_LEN];
    s.read_exact(&mut raw)
        .map_err(|e| format!("reading from the daemon: {e}"))?;
    let h = Header::parse(&raw).map_err(|e| e.to_string())?;
    let len = h.checked_len(64).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .map_err(|e| format!("reading from the daemon: {e}"))?;
    Ok((h, body))
}
