//! The VM side of qrexec, as a Qubes VM's `qrexec-agent` does it
//! (`agent/qrexec-agent.c`), written against the protocol: the agent is
//! the vchan server on port 512 for dom0 (4096-byte rings), sends
//! `MSG_HELLO` first, and runs what dom0's daemon asks for
//! (`MSG_EXEC_CMDLINE`, `MSG_JUST_EXEC`), each over a data vchan of its
//! own that it connects to as the client. When one ends it reports
//! `MSG_CONNECTION_TERMINATED`.
//!
//! The stand-in has no users: a command runs as root with `/bin/sh -c`,
//! whatever user it names (the test images put busybox in the guest).
//! Services (`QUBESRPC`) are looked up in `/etc/qubes-rpc`, which the
//! stand-in does not have, so a call ends as "not found" (exit 127).
//!
//! One service is the stand-in's own, for the tests of a hostile VM:
//! `qguest.SendGarbage` makes the agent write a malformed message on its
//! control channel, as a compromised VM could.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use qrexec::cmdline::{self, Request};
use qrexec::data::{self, Local, Side};
use qrexec::framer::Framer;
use qrexec::wire::{
    message, ExecParams, MsgType, MAX_QREXEC_CMD_LEN, SERVICE_IDENT_LEN, VCHAN_BASE_PORT,
};
use qvchan::{Vchan, VchanError};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent waits for a data connection's server (the C agent's
/// 120 s).
const DATA_CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// Exit code of a command that could not be started, or a service that
/// does not exist.
const EXIT_NOT_FOUND: i32 = 127;

/// Runs forever: offer the control vchan, serve it, offer it again.
pub fn run(own: u16, log: fn(&str)) {
    loop {
        if let Err(e) = session(own, log) {
            log(&format!("qrexec: {e}; offering the control channel again"));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    qcontract::error_chain(e)
}

fn session(own: u16, log: fn(&str)) -> Result<(), String> {
    let mut xs = qxenstore::Xs::open().map_err(|e| chain(&e))?;
    let mut ctrl = Vchan::server(
        &mut xs,
        own,
        0,
        VCHAN_BASE_PORT,
        qrexec::CONTROL_RING,
        qrexec::CONTROL_RING,
    )
    .map_err(|e| chain(&e))?;
    drop(xs);
    // dom0's daemon comes when qdomd starts it; wait as long as it takes.
    loop {
        match ctrl.wait_connected(Duration::from_secs(60)) {
            Ok(()) => break,
            Err(VchanError::Timeout { .. }) => {}
            Err(e) => return Err(chain(&e)),
        }
    }
    data::handshake(&mut ctrl, IO_TIMEOUT).map_err(|e| chain(&e))?;
    log("QGUEST-QREXEC connected");
    let (done_tx, done_rx) = mpsc::channel::<ToControl>();
    let mut framer = Framer::new(MAX_QREXEC_CMD_LEN);
    let mut buf = [0u8; 4096];
    loop {
        while let Ok(m) = done_rx.try_recv() {
            let bytes = match m {
                ToControl::Terminated(domain, port) => {
                    let p = ExecParams {
                        connect_domain: domain,
                        connect_port: port,
                        cmdline: Vec::new(),
                    };
                    message(MsgType::ConnectionTerminated, &p.render(false))
                }
                // A type no agent sends, with a length far over any limit.
                ToControl::Garbage => [0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0x7f].to_vec(),
            };
            ctrl.write_all(&bytes, IO_TIMEOUT).map_err(|e| chain(&e))?;
        }
        let n = match ctrl.read(&mut buf, Duration::from_millis(200)) {
            Ok(n) => n,
            Err(VchanError::Timeout { .. }) => continue,
            Err(e) => return Err(chain(&e)),
        };
        framer.push(&buf[..n]);
        while let Some((h, body)) = framer.next_message().map_err(|e| e.to_string())? {
            match h.kind {
                MsgType::ExecCmdline | MsgType::JustExec => {
                    if body.len() <= 8 {
                        return Err(format!("{} without a command line", h.kind));
                    }
                    let p = ExecParams::parse(h.kind, &body).map_err(|e| e.to_string())?;
                    let done = done_tx.clone();
                    let kind = h.kind;
                    log(&format!(
                        "qrexec: {} from domain {} on port {}",
                        kind, p.connect_domain, p.connect_port
                    ));
                    std::thread::spawn(move || {
                        let (domain, port) = (p.connect_domain, p.connect_port);
                        if let Err(e) = exec(own, kind, p, &done) {
                            log(&format!(
                                "qrexec: connection to domain {domain} port {port}: {e}"
                            ));
                        }
                        let _ = done.send(ToControl::Terminated(domain, port));
                    });
                }
                MsgType::ServiceRefused if body.len() == SERVICE_IDENT_LEN => {}
                other => return Err(format!("dom0 sent {other} of {} bytes", body.len())),
            }
        }
    }
}

/// What a connection's thread asks the control loop to send.
enum ToControl {
    Terminated(u32, u32),
    /// `qguest.SendGarbage`.
    Garbage,
}

/// One data connection: connect, greet, run, pass the data.
fn exec(
    own: u16,
    kind: MsgType,
    p: ExecParams,
    ctrl: &mpsc::Sender<ToControl>,
) -> Result<(), String> {
    let text = String::from_utf8(p.cmdline).map_err(|_| "command line is not UTF-8".to_string())?;
    let request = cmdline::parse(&text).map_err(|e| e.to_string())?;
    let peer =
        u16::try_from(p.connect_domain).map_err(|_| "peer domain out of range".to_string())?;
    let mut xs = qxenstore::Xs::open().map_err(|e| chain(&e))?;
    let mut chan = Vchan::client(&mut xs, own, peer, p.connect_port, DATA_CONNECT_TIMEOUT)
        .map_err(|e| chain(&e))?;
    drop(xs);
    data::handshake(&mut chan, IO_TIMEOUT).map_err(|e| chain(&e))?;
    let command = match request {
        Request::Command { command, .. } => command,
        Request::Service { name, .. } if name == "qguest.SendGarbage" => {
            let _ = ctrl.send(ToControl::Garbage);
            let out = [
                message(MsgType::DataStdout, &[]),
                message(MsgType::DataStderr, &[]),
                message(MsgType::DataExitCode, &0i32.to_le_bytes()),
            ]
            .concat();
            return chan.write_all(&out, IO_TIMEOUT).map_err(|e| chain(&e));
        }
        // No other services in the stand-in: "not found", as the C agent
        // reports a missing one.
        Request::Service { .. } => return not_found(&mut chan),
    };
    let just = kind == MsgType::JustExec;
    let stdio = |piped: bool| if piped { Stdio::piped() } else { Stdio::null() };
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(&command)
        .stdin(stdio(!just))
        .stdout(stdio(!just))
        .stderr(stdio(!just))
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(_) => return not_found(&mut chan),
    };
    if just {
        let out = message(MsgType::DataExitCode, &0i32.to_le_bytes());
        return chan.write_all(&out, IO_TIMEOUT).map_err(|e| chain(&e));
    }
    let local = Local {
        input: child.stdout.take().map(OwnedFd::from),
        input_err: child.stderr.take().map(OwnedFd::from),
        output: child.stdin.take().map(OwnedFd::from),
        output_err: None,
    };
    let mut status = || match child.wait() {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            st.code()
                .or_else(|| st.signal().map(|s| 128 + s))
                .unwrap_or(255)
        }
        Err(_) => 255,
    };
    data::pump(&mut chan, Side::Service, local, &mut status)
        .map(drop)
        .map_err(|e| chain(&e))
}

fn not_found(chan: &mut Vchan) -> Result<(), String> {
    let mut out = message(MsgType::DataStdout, &[]);
    out.extend_from_slice(&message(MsgType::DataStderr, &[]));
    out.extend_from_slice(&message(
        MsgType::DataExitCode,
        &EXIT_NOT_FOUND.to_le_bytes(),
    ));
    chan.write_all(&out, IO_TIMEOUT).map_err(|e| chain(&e))
}
