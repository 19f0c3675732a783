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
//! Services (`QUBESRPC`) are looked up as in a Qubes VM, in
//! `/usr/local/etc/qubes-rpc`, then `/etc/qubes-rpc` (the image's
//! `[guivm.files]` put some there): an executable runs with the argument
//! as its parameter, a socket gets the descriptor line first; a missing
//! one ends as "not found" (exit 127).
//!
//! The VM's own calls come in on the trigger socket ([`crate::trigger`])
//! and go to dom0 on the control channel; dom0's answer goes back to the
//! caller, and when the caller is done the agent reports the connection
//! terminated.
//!
//! One service is the stand-in's own, for the tests of a hostile VM:
//! `qguest.SendGarbage` makes the agent write a malformed message on its
//! control channel, as a compromised VM could.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};

use qrexec::cmdline::{self, Request};
use qrexec::data::{self, Local, Side};
use qrexec::framer::Framer;
use qrexec::service::{self, Found};
use qrexec::wire::{
    message, ExecParams, MsgType, ServiceConnect, ServiceParams, MAX_QREXEC_CMD_LEN,
    SERVICE_IDENT_LEN, VCHAN_BASE_PORT,
};
use qvchan::{Vchan, VchanError};

use crate::threads::Bounded;

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent waits for a data connection's server (the C agent's
/// 120 s).
const DATA_CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// A VM's service directories (`QREXEC_SERVICE_PATH` of a Qubes VM).
const SERVICE_DIRS: [&str; 2] = ["/usr/local/etc/qubes-rpc", "/etc/qubes-rpc"];

/// The control loop's inbox: messages from the connections' threads and
/// the trigger socket, with a byte on a socket pair to wake its poll.
/// Each message carries the control session it belongs to: what an old
/// session's threads send after dom0's daemon was replaced (a connection
/// ending, say) must not reach the new daemon, which hands out its ports
/// afresh.
#[derive(Clone)]
struct Inbox {
    tx: mpsc::Sender<(u64, ToControl)>,
    wake: Arc<UnixStream>,
    session: u64,
}

impl Inbox {
    fn send(&self, m: ToControl) {
        if self.tx.send((self.session, m)).is_ok() {
            // A full wake pipe already wakes the loop.
            let _ = (&*self.wake).write(&[1]);
        }
    }

    fn for_session(&self, session: u64) -> Inbox {
        Inbox {
            session,
            ..self.clone()
        }
    }
}

/// Session of the trigger socket's messages: they belong to whichever
/// session is current when they arrive (their callers are kept in
/// [`crate::trigger::Pending`], cleared for every new session).
const ANY_SESSION: u64 = u64::MAX;

/// Threads the agent runs for dom0's connections and its callers at once;
/// past this a connection is refused (its port freed at once).
const MAX_THREADS: usize = 512;
static THREADS: std::sync::LazyLock<Bounded> =
    std::sync::LazyLock::new(|| Bounded::new(MAX_THREADS));

/// Runs forever: offer the control vchan, serve it, offer it again. The
/// trigger socket stays across control sessions.
pub fn run(own: u16, log: fn(&str)) {
    let (tx, rx) = mpsc::channel();
    let (wake_rx, wake_tx) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => return log(&format!("qrexec: a socket pair: {e}")),
    };
    let _ = wake_rx.set_nonblocking(true);
    let _ = wake_tx.set_nonblocking(true);
    let inbox = Inbox {
        tx,
        wake: Arc::new(wake_tx),
        session: ANY_SESSION,
    };
    let pending = Arc::new(crate::trigger::Pending::default());
    match crate::bind_for_all(qrexec::AGENT_TRIGGER_SOCKET) {
        Ok(listener) => {
            let (p, inbox) = (pending.clone(), inbox.clone());
            std::thread::spawn(move || {
                crate::trigger::serve(listener, p, move |m| inbox.send(ToControl::Trigger(m)), log)
            });
        }
        Err(e) => log(&format!(
            "qrexec: no trigger socket, so no calls from here: {e}"
        )),
    }
    for n in 0.. {
        // Calls waiting from an earlier session get no answer now.
        pending.clear();
        if let Err(e) = session(own, &inbox.for_session(n), &rx, &wake_rx, &pending, log) {
            log(&format!("qrexec: {e}; offering the control channel again"));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    qcontract::error_chain(e)
}

fn session(
    own: u16,
    inbox: &Inbox,
    done_rx: &mpsc::Receiver<(u64, ToControl)>,
    wake_rx: &UnixStream,
    pending: &Arc<crate::trigger::Pending>,
    log: fn(&str),
) -> Result<(), String> {
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
    let mut framer = Framer::new(MAX_QREXEC_CMD_LEN);
    let mut buf = [0u8; 4096];
    loop {
        while let Ok((from, m)) = done_rx.try_recv() {
            if from != inbox.session && from != ANY_SESSION {
                continue;
            }
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
                ToControl::Trigger(m) => m,
            };
            ctrl.write_all(&bytes, IO_TIMEOUT).map_err(|e| chain(&e))?;
        }
        let n = ctrl.try_read(&mut buf).map_err(|e| chain(&e))?;
        if n == 0 {
            wait(&mut ctrl, wake_rx)?;
            if !ctrl.check_alive(false) {
                return Err("dom0's end is gone".into());
            }
            continue;
        }
        framer.push(&buf[..n]);
        while let Some((h, body)) = framer.next_message().map_err(|e| e.to_string())? {
            match h.kind {
                MsgType::ExecCmdline | MsgType::JustExec => {
                    if body.len() <= 8 {
                        return Err(format!("{} without a command line", h.kind));
                    }
                    let p = ExecParams::parse(h.kind, &body).map_err(|e| e.to_string())?;
                    let done = inbox.clone();
                    let kind = h.kind;
                    log(&format!(
                        "qrexec: {} from domain {} on port {}",
                        kind, p.connect_domain, p.connect_port
                    ));
                    let (domain, port) = (p.connect_domain, p.connect_port);
                    let started = THREADS.spawn(move || {
                        if let Err(e) = exec(own, kind, p, &done) {
                            log(&format!(
                                "qrexec: connection to domain {domain} port {port}: {e}"
                            ));
                        }
                        done.send(ToControl::Terminated(domain, port));
                    });
                    if !started {
                        // No thread: the port is free again at once (the
                        // peer's connect times out).
                        log(&format!(
                            "qrexec: no thread for domain {domain} port {port}"
                        ));
                        inbox.send(ToControl::Terminated(domain, port));
                    }
                }
                MsgType::ServiceRefused if body.len() == SERVICE_IDENT_LEN => {
                    let id = ServiceParams::parse(h.kind, &body).map_err(|e| e.to_string())?;
                    // Closing the caller's socket is the refusal.
                    if pending.take(&id.ident).is_none() {
                        log(&format!(
                            "qrexec: a refusal for unknown call {:?}",
                            id.ident
                        ));
                    }
                }
                MsgType::ServiceConnect => {
                    let c = ServiceConnect::parse(&body).map_err(|e| e.to_string())?;
                    let Some(client) = pending.take(&c.request_id.ident) else {
                        log(&format!(
                            "qrexec: a connection for unknown call {:?}",
                            c.request_id.ident
                        ));
                        continue;
                    };
                    let (domain, port) = (c.connect_domain, c.connect_port);
                    let done = inbox.clone();
                    // Callers are bounded by the pending table; a failed
                    // spawn drops the caller, who reads end of file.
                    if !THREADS.spawn(move || {
                        caller(client, &c.params());
                        done.send(ToControl::Terminated(domain, port));
                    }) {
                        log("qrexec: no thread for a connected caller");
                        inbox.send(ToControl::Terminated(domain, port));
                    }
                }
                other => return Err(format!("dom0 sent {other} of {} bytes", body.len())),
            }
        }
    }
}

/// Sleeps until dom0 wrote, an inbox message came, or a second passed.
fn wait(ctrl: &mut Vchan, wake_rx: &UnixStream) -> Result<(), String> {
    ctrl.request_notifications();
    if ctrl.data_ready().map_err(|e| chain(&e))? > 0 {
        return Ok(());
    }
    let ev = ctrl.event_fd();
    let mut fds = [
        PollFd::new(&ev, PollFlags::IN),
        PollFd::new(wake_rx, PollFlags::IN),
    ];
    let ts = rustix::event::Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(format!("poll: {e}")),
    }
    let (event, woken) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
    if event {
        ctrl.handle_event().map_err(|e| chain(&e))?;
    }
    if woken {
        let mut b = [0u8; 64];
        while matches!((&*wake_rx).read(&mut b), Ok(n) if n > 0) {}
    }
    Ok(())
}

/// A caller whose call dom0 connected: it gets the data vchan's domain
/// and port, and the connection lasts until it closes its socket.
fn caller(mut client: UnixStream, params: &[u8]) {
    if client.write_all(params).is_err() {
        return;
    }
    let mut b = [0u8; 64];
    while matches!(client.read(&mut b), Ok(n) if n > 0) {}
}

/// What a connection's thread asks the control loop to send.
enum ToControl {
    Terminated(u32, u32),
    /// `qguest.SendGarbage`.
    Garbage,
    /// A call from the trigger socket, ready for dom0.
    Trigger(Vec<u8>),
}

/// One data connection: connect, greet, run, pass the data.
fn exec(own: u16, kind: MsgType, p: ExecParams, ctrl: &Inbox) -> Result<(), String> {
    let text = String::from_utf8(p.cmdline).map_err(|_| "command line is not UTF-8".to_string())?;
    let request = cmdline::parse(&text).map_err(|e| e.to_string())?;
    let peer =
        u16::try_from(p.connect_domain).map_err(|_| "peer domain out of range".to_string())?;
    let mut xs = qxenstore::Xs::open().map_err(|e| chain(&e))?;
    let mut chan = Vchan::client(&mut xs, own, peer, p.connect_port, DATA_CONNECT_TIMEOUT)
        .map_err(|e| chain(&e))?;
    drop(xs);
    data::handshake(&mut chan, IO_TIMEOUT).map_err(|e| chain(&e))?;
    let mut cmd = match request {
        Request::Command { command, .. } => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(&command);
            c
        }
        Request::Service { name, .. } if name == "qguest.SendGarbage" => {
            ctrl.send(ToControl::Garbage);
            let out = [
                message(MsgType::DataStdout, &[]),
                message(MsgType::DataStderr, &[]),
                message(MsgType::DataExitCode, &0i32.to_le_bytes()),
            ]
            .concat();
            return chan.write_all(&out, IO_TIMEOUT).map_err(|e| chain(&e));
        }
        Request::Service {
            descriptor,
            name,
            arg,
            source,
            ..
        } => {
            let dirs: Vec<&Path> = SERVICE_DIRS.iter().map(Path::new).collect();
            match service::find(&dirs, &name, &arg) {
                None => return not_found(&mut chan),
                Some(Found::Socket(path)) => {
                    let header = service::socket_header(&descriptor, &source, None);
                    return data::serve_socket(&mut chan, &path, &header)
                        .map(drop)
                        .map_err(|e| chain(&e));
                }
                Some(Found::Executable(path)) => {
                    let mut c = Command::new(path);
                    if !arg.is_empty() {
                        c.arg(&arg);
                    }
                    c.envs(service::environment(&name, &arg, &source, None));
                    c
                }
            }
        }
    };
    let just = kind == MsgType::JustExec;
    let stdio = |piped: bool| if piped { Stdio::piped() } else { Stdio::null() };
    let child = cmd
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
    let mut status = || data::exit_status(child.wait());
    data::pump(&mut chan, Side::Service, local, &mut status)
        .map(drop)
        .map_err(|e| chain(&e))
}

/// "Not found", as the C agent reports a missing service or a command
/// that cannot start.
fn not_found(chan: &mut Vchan) -> Result<(), String> {
    data::send_not_found(chan, IO_TIMEOUT).map_err(|e| chain(&e))
}
