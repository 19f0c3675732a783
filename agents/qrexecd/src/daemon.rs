//! `qrexec-daemon <domid> <name> [<default user>]`: dom0's qrexec daemon
//! for one VM, with the command line of Qubes' own
//! (`daemon/qrexec-daemon.c`). qdomd starts it once the VM runs.
//!
//! - It connects to the VM's agent, the vchan server on port 512, and
//!   exchanges `MSG_HELLO` (the agent first; protocol 3 only).
//! - dom0's `qrexec-client` reaches it at `/run/qubes/qrexec.<domid>`
//!   (linked as `qrexec.<name>`, root only): after a HELLO each way it
//!   asks to run a command (`MSG_EXEC_CMDLINE`, `MSG_JUST_EXEC`) or to
//!   connect a service call (`MSG_SERVICE_CONNECT`). The daemon hands out
//!   a data port from 513, answers it, substitutes `DEFAULT:` with the
//!   VM's default user and forwards the request to the agent; the data
//!   then flows on a vchan of its own between the client and the agent.
//! - The agent reports `MSG_CONNECTION_TERMINATED` when a data connection
//!   ends; the port is free again and the client that asked for it is let
//!   go.
//! - Service calls from the VM (`MSG_TRIGGER_SERVICE3`) are decided by the
//!   policy daemon, each on a thread of its own ([`qrexecd::call`]): a
//!   refusal is `MSG_SERVICE_REFUSED`; an allowed call to a VM gets its
//!   data port from that VM's daemon, an allowed call to dom0 a port of
//!   ours and the service run here; either way the agent is told where to
//!   connect with `MSG_SERVICE_CONNECT`. Calls are bounded: at most
//!   [`MAX_PENDING`] undecided, and [`CALL_BURST`] at once then
//!   [`CALL_RATE`] a second, so a VM that floods only delays itself.
//!
//! Everything from the VM is hostile. A message of a wrong type or size
//! cuts the VM off: the daemon logs the VM and the reason and exits, and
//! qdomd starts a fresh one. A local client that misbehaves only loses its
//! own connection.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use qrexec::cmdline::substitute_default_user;
use qrexec::data;
use qrexec::framer::Framer;
use qrexec::wire::{
    message, ExecParams, Header, MsgType, PeerInfo, ServiceConnect, ServiceParams, TriggerService3,
    MAX_QREXEC_CMD_LEN, PROTOCOL_VERSION, SERVICE_IDENT_LEN, VCHAN_BASE_PORT,
};
use qrexec::{DATA_PORTS, FIRST_DATA_PORT};
use qrexecd::call::{self, sanitize, Call, Decision};
use qvchan::{Vchan, VchanError};
use rustix::event::{poll, PollFd, PollFlags};

/// How long the VM's agent may take to offer its vchan (Qubes'
/// `QREXEC_STARTUP_TIMEOUT` default).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CLIENTS: usize = 64;
/// Control messages from the agent: a trigger carries a service name of up
/// to 65000 bytes after its 96-byte head.
const MAX_AGENT_MSG: usize = 96 + 65000;
const TICK: Duration = Duration::from_secs(1);
/// Calls waiting for the policy at once (the C daemon's
/// `MAX_PENDING_POLICY`-sized table, 256).
const MAX_PENDING: usize = 256;
/// Calls a VM may make at once, and how many a second after that.
const CALL_BURST: f64 = 100.0;
const CALL_RATE: f64 = 50.0;

#[derive(Debug, thiserror::Error)]
enum Fatal {
    #[error("connecting to the agent")]
    Connect(#[source] VchanError),
    #[error("the agent's control channel")]
    Channel(#[source] VchanError),
    #[error("cutting the VM off: the agent sent {0}")]
    Agent(String),
    #[error("local socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("xenstore")]
    Xs(#[from] qxenstore::XsError),
    #[error("poll")]
    Poll(#[source] io::Error),
}

#[derive(Debug, PartialEq, Eq)]
enum ClientState {
    Hello,
    Request,
    /// Waiting for its data connection to end.
    Running {
        port: u32,
    },
}

struct Client {
    stream: UnixStream,
    framer: Framer,
    state: ClientState,
}

struct Daemon {
    domid: u16,
    name: String,
    default_user: String,
    ctrl: Vchan,
    framer: Framer,
    /// Per data port: the domain it was handed out for.
    ports: [Option<u32>; DATA_PORTS as usize],
    clients: Vec<Client>,
    /// A forward to the agent that failed part-way: the control stream
    /// can no longer be trusted, so the loop ends with it.
    broken: Option<Fatal>,
    /// Calls being decided, and their results.
    pending: usize,
    finished_tx: mpsc::Sender<Finished>,
    finished_rx: mpsc::Receiver<Finished>,
    /// A byte here wakes the loop when a call is decided.
    wake_rx: UnixStream,
    wake_tx: UnixStream,
    calls: Bucket,
}

/// A decided call, back from its thread.
struct Finished {
    ident: String,
    call: Call,
    decision: Decision,
}

/// A token bucket: `CALL_BURST` calls, refilled at `CALL_RATE` a second.
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Calls refused since the last log line about it.
    refused: u64,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * CALL_RATE;
        self.tokens = (self.tokens + refill).min(CALL_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn log(name: &str, domid: u16, msg: &str) {
    eprintln!("qrexec-daemon {name} (domain {domid}): {msg}");
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (domid, name, default_user) = match args.as_slice() {
        [d, n] => (d, n, "user".to_owned()),
        [d, n, u] => (d, n, u.clone()),
        _ => {
            eprintln!("usage: qrexec-daemon <domid> <vm name> [<default user>]");
            return ExitCode::from(2);
        }
    };
    let Ok(domid) = domid.parse::<u16>() else {
        eprintln!("qrexec-daemon: {domid:?} is not a domain id");
        return ExitCode::from(2);
    };
    if domid == 0 || !qcontract::vm::valid_vm_name(name) {
        eprintln!("qrexec-daemon: needs a VM's domain id and name");
        return ExitCode::from(2);
    }
    if default_user.is_empty() || default_user.contains(':') {
        eprintln!("qrexec-daemon: {default_user:?} is not a user name");
        return ExitCode::from(2);
    }
    match run(domid, name, default_user) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(name, domid, &qcontract::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(domid: u16, name: &str, default_user: String) -> Result<(), Fatal> {
    let mut xs = qxenstore::Xs::open()?;
    let own = xs.own_domid()?;
    let mut ctrl = Vchan::client(&mut xs, own, domid, VCHAN_BASE_PORT, STARTUP_TIMEOUT)
        .map_err(Fatal::Connect)?;
    drop(xs);
    // The agent sends its HELLO first.
    let version = data::read_hello(&mut ctrl, HELLO_TIMEOUT).map_err(hello_error)?;
    data::send_hello(&mut ctrl, HELLO_TIMEOUT).map_err(hello_error)?;
    let listener = bind(domid, name)?;
    log(
        name,
        domid,
        &format!("connected to the agent (protocol {version})"),
    );
    let (wake_rx, wake_tx) = UnixStream::pair().map_err(Fatal::Poll)?;
    wake_rx.set_nonblocking(true).map_err(Fatal::Poll)?;
    let (finished_tx, finished_rx) = mpsc::channel();
    let mut d = Daemon {
        domid,
        name: name.into(),
        default_user,
        ctrl,
        framer: Framer::new(MAX_AGENT_MSG),
        ports: [None; DATA_PORTS as usize],
        clients: Vec::new(),
        broken: None,
        pending: 0,
        finished_tx,
        finished_rx,
        wake_rx,
        wake_tx,
        calls: Bucket {
            tokens: CALL_BURST,
            at: Instant::now(),
            refused: 0,
        },
    };
    d.serve(&listener)
}

/// A failed greeting: the channel broke, or the agent said something else.
fn hello_error(e: data::DataError) -> Fatal {
    match e {
        data::DataError::Vchan(e) => Fatal::Channel(e),
        other => Fatal::Agent(other.to_string()),
    }
}

fn bind(domid: u16, name: &str) -> Result<UnixListener, Fatal> {
    let path = qrexec::socket_path(&domid.to_string());
    let link = qrexec::socket_path(name);
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| Fatal::Socket { path, source }
    };
    std::fs::create_dir_all(qrexec::SOCKET_DIR).map_err(err(Path::new(qrexec::SOCKET_DIR)))?;
    for p in [&path, &link] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(p)(e)),
        }
    }
    let listener = UnixListener::bind(&path).map_err(err(&path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err(&path))?;
    std::os::unix::fs::symlink(format!("qrexec.{domid}"), &link).map_err(err(&link))?;
    listener.set_nonblocking(true).map_err(err(&path))?;
    Ok(listener)
}

impl Daemon {
    fn log(&self, msg: &str) {
        log(&self.name, self.domid, msg);
    }

    fn serve(&mut self, listener: &UnixListener) -> Result<(), Fatal> {
        loop {
            let (listen, agent, ready) = self.wait(listener)?;
            if listen {
                self.accept(listener);
            }
            // Clients first: `ready` holds their positions at poll time,
            // which the agent's messages (a terminated connection drops its
            // client) would shift.
            for (i, r) in ready.iter().enumerate().rev() {
                if *r {
                    self.client_input(i);
                }
            }
            if agent {
                self.ctrl.handle_event().map_err(Fatal::Channel)?;
            }
            self.finish_calls()?;
            // Look at the agent every turn: an event may have been taken
            // by an earlier read.
            match self.agent_input() {
                Ok(()) => {}
                Err(Fatal::Channel(e)) if e.is_peer_gone() => {
                    if !self.ctrl.check_alive(true) {
                        self.log("the domain is gone; exiting");
                        return Ok(());
                    }
                    return Err(Fatal::Channel(e));
                }
                Err(e) => return Err(e),
            }
            if let Some(e) = self.broken.take() {
                return Err(e);
            }
            if !self.ctrl.check_alive(false) {
                self.log("the domain is gone; exiting");
                return Ok(());
            }
        }
    }

    fn wait(&self, listener: &UnixListener) -> Result<(bool, bool, Vec<bool>), Fatal> {
        self.ctrl.request_notifications();
        let ev = self.ctrl.event_fd();
        let mut fds = vec![
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(&ev, PollFlags::IN),
            PollFd::new(&self.wake_rx, PollFlags::IN),
        ];
        for c in &self.clients {
            fds.push(PollFd::new(&c.stream, PollFlags::IN));
        }
        let ts = rustix::event::Timespec {
            tv_sec: TICK.as_secs() as i64,
            tv_nsec: 0,
        };
        // Something already in the ring (it raced the request) needs no
        // sleep.
        let ready_now = self.ctrl.data_ready().map_err(Fatal::Channel)? > 0;
        if !ready_now {
            match poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(Fatal::Poll(e.into())),
            }
        }
        let hit = |f: &PollFd<'_>| !f.revents().is_empty();
        Ok((
            hit(&fds[0]),
            hit(&fds[1]),
            fds[3..].iter().map(hit).collect(),
        ))
    }

    fn accept(&mut self, listener: &UnixListener) {
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        self.log("refusing a local client: too many connected");
                        continue;
                    }
                    // The daemon greets first; the client answers.
                    let hello = PeerInfo {
                        version: PROTOCOL_VERSION,
                    }
                    .message();
                    if stream.write_all(&hello).is_err() || stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.clients.push(Client {
                        stream,
                        framer: Framer::new(MAX_QREXEC_CMD_LEN),
                        state: ClientState::Hello,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.log(&format!("accepting a local client: {e}"));
                    return;
                }
            }
        }
    }

    /// Control messages from the agent.
    fn agent_input(&mut self) -> Result<(), Fatal> {
        let mut buf = [0u8; 4096];
        loop {
            let n = self.ctrl.try_read(&mut buf).map_err(Fatal::Channel)?;
            if n == 0 {
                return Ok(());
            }
            self.framer.push(&buf[..n]);
            while let Some((h, data)) = self
                .framer
                .next_message()
                .map_err(|e| Fatal::Agent(format!("a malformed message ({e})")))?
            {
                match h.kind {
                    MsgType::ConnectionTerminated => self.terminated(&data)?,
                    MsgType::TriggerService3 => self.trigger(&data)?,
                    other => {
                        return Err(Fatal::Agent(format!("{other}, which an agent never sends")))
                    }
                }
            }
        }
    }

    fn terminated(&mut self, data: &[u8]) -> Result<(), Fatal> {
        if data.len() != 8 {
            return Err(Fatal::Agent(format!(
                "MSG_CONNECTION_TERMINATED of {} bytes",
                data.len()
            )));
        }
        let p = ExecParams::parse(MsgType::ConnectionTerminated, data)
            .map_err(|e| Fatal::Agent(e.to_string()))?;
        let Some(idx) = port_index(p.connect_port) else {
            return Err(Fatal::Agent(format!(
                "MSG_CONNECTION_TERMINATED for port {}, outside {FIRST_DATA_PORT}..{}",
                p.connect_port,
                FIRST_DATA_PORT + DATA_PORTS
            )));
        };
        // Only the domain the port was handed out for frees it (the other
        // end of a VM-to-VM call reports the same port to its own daemon).
        if self.ports[idx] == Some(p.connect_domain) {
            self.ports[idx] = None;
            self.clients.retain(|c| {
                c.state
                    != ClientState::Running {
                        port: p.connect_port,
                    }
            });
        }
        Ok(())
    }

    fn trigger(&mut self, data: &[u8]) -> Result<(), Fatal> {
        let t = TriggerService3::parse(data).map_err(|e| Fatal::Agent(e.to_string()))?;
        if !valid_ident(data) {
            return Err(Fatal::Agent("a request id with bytes after its NUL".into()));
        }
        let ident = t.request_id.ident;
        let call = match Call::new(&self.name, self.domid, &t.target_domain, &t.service_name) {
            Ok(c) => c,
            Err(reason) => {
                self.log(&format!("refused a call: {reason}"));
                return self.refuse(&ident);
            }
        };
        if self.pending >= MAX_PENDING || !self.calls.take(Instant::now()) {
            // One line a burst, not one a call: the flood is the VM's.
            if self.calls.refused == 0 {
                self.log("refusing calls: too many at once (rate-limited)");
            }
            self.calls.refused += 1;
            return self.refuse(&ident);
        }
        if self.calls.refused > 0 {
            self.log(&format!(
                "{} call(s) were refused while rate-limited",
                self.calls.refused
            ));
            self.calls.refused = 0;
        }
        self.pending += 1;
        let tx = self.finished_tx.clone();
        let wake = self.wake_tx.try_clone().map_err(Fatal::Poll)?;
        std::thread::spawn(move || {
            let decision = call::decide(&call);
            let _ = tx.send(Finished {
                ident,
                call,
                decision,
            });
            let _ = (&wake).write_all(&[1]);
        });
        Ok(())
    }

    fn refuse(&mut self, ident: &str) -> Result<(), Fatal> {
        let mut p = Vec::with_capacity(SERVICE_IDENT_LEN);
        ServiceParams {
            ident: ident.to_owned(),
        }
        .render(&mut p);
        self.ctrl
            .write_all(&message(MsgType::ServiceRefused, &p), HELLO_TIMEOUT)
            .map_err(Fatal::Channel)
    }

    /// Tells the agent where the call's data connection is.
    fn service_connect(&mut self, ident: &str, domain: u32, port: u32) -> Result<(), Fatal> {
        let m = ServiceConnect {
            connect_domain: domain,
            connect_port: port,
            request_id: ServiceParams {
                ident: ident.to_owned(),
            },
        }
        .message();
        self.ctrl
            .write_all(&m, HELLO_TIMEOUT)
            .map_err(Fatal::Channel)
    }

    /// The calls whose threads are done.
    fn finish_calls(&mut self) -> Result<(), Fatal> {
        let mut b = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut b), Ok(n) if n > 0) {}
        while let Ok(f) = self.finished_rx.try_recv() {
            self.pending -= 1;
            let what = format!(
                "call of {} to {}",
                f.call.descriptor(),
                sanitize(&f.call.target, "@:")
            );
            match f.decision {
                Decision::Refuse(reason) => {
                    self.log(&format!("refused the {what}: {reason}"));
                    self.refuse(&f.ident)?;
                }
                Decision::Connect { target, port } => {
                    self.log(&format!(
                        "{what}: allowed to {target} (domain {}, port {})",
                        port.domain, port.port
                    ));
                    self.service_connect(&f.ident, port.domain, port.port)?;
                }
                Decision::Dom0 { requested } => {
                    let Some(port) = self.allocate(0) else {
                        self.log(&format!("refused the {what}: no free data port"));
                        self.refuse(&f.ident)?;
                        continue;
                    };
                    self.log(&format!("{what}: allowed to dom0 (port {port})"));
                    self.service_connect(&f.ident, 0, port)?;
                    let (name, domid) = (self.name.clone(), self.domid);
                    std::thread::spawn(move || {
                        if let Err(e) = call::serve_dom0(&f.call, port, &requested) {
                            log(
                                &name,
                                domid,
                                &format!("dom0 service {}: {e}", f.call.descriptor()),
                            );
                        }
                    });
                }
            }
        }
        Ok(())
    }

    fn client_input(&mut self, i: usize) {
        let mut buf = [0u8; 8192];
        let n = match self.clients[i].stream.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return
            }
            Err(_) => 0,
        };
        if n == 0 || matches!(self.clients[i].state, ClientState::Running { .. }) {
            // EOF, or bytes from a client whose request is running: either
            // way it is done (the port stays until the agent frees it).
            self.clients.remove(i);
            return;
        }
        self.clients[i].framer.push(&buf[..n]);
        loop {
            let next = self.clients[i].framer.next_message();
            let (h, data) = match next {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => return self.drop_client(i, &e.to_string()),
            };
            let result = match self.clients[i].state {
                ClientState::Hello => match (h.kind, PeerInfo::parse(&data)) {
                    (MsgType::Hello, Ok(p)) if p.version == PROTOCOL_VERSION => {
                        self.clients[i].state = ClientState::Request;
                        Ok(())
                    }
                    _ => Err(format!(
                        "{} instead of a protocol {PROTOCOL_VERSION} MSG_HELLO",
                        h.kind
                    )),
                },
                ClientState::Request => self.request(i, h, &data),
                ClientState::Running { .. } => Err("data after its request".into()),
            };
            if let Err(reason) = result {
                return self.drop_client(i, &reason);
            }
        }
    }

    fn drop_client(&mut self, i: usize, reason: &str) {
        self.log(&format!("closing a local client: {reason}"));
        self.clients.remove(i);
    }

    /// A client's request: hand out a port, answer, forward to the agent.
    fn request(&mut self, i: usize, h: Header, data: &[u8]) -> Result<(), String> {
        if !matches!(
            h.kind,
            MsgType::ExecCmdline | MsgType::JustExec | MsgType::ServiceConnect
        ) {
            return Err(format!("{} is not a request", h.kind));
        }
        let p = ExecParams::parse(h.kind, data).map_err(|e| e.to_string())?;
        let port = if p.connect_port == 0 {
            let Some(port) = self.allocate(p.connect_domain) else {
                return Err("no free data port".into());
            };
            let reply = ExecParams {
                connect_domain: u32::from(self.domid),
                connect_port: port,
                cmdline: Vec::new(),
            };
            let msg = message(h.kind, &reply.render(false));
            let c = &mut self.clients[i];
            let sent = c
                .stream
                .set_nonblocking(false)
                .and_then(|()| c.stream.write_all(&msg))
                .and_then(|()| c.stream.set_nonblocking(true));
            if let Err(e) = sent {
                self.release(port);
                return Err(e.to_string());
            }
            port
        } else if port_index(p.connect_port).is_some() {
            p.connect_port
        } else {
            return Err(format!(
                "connect port {} is not a data port",
                p.connect_port
            ));
        };
        let cmdline = if h.kind == MsgType::ServiceConnect {
            p.cmdline
        } else {
            substitute_default_user(&p.cmdline, &self.default_user)
        };
        let forward = ExecParams {
            connect_domain: p.connect_domain,
            connect_port: port,
            cmdline,
        };
        self.clients[i].state = ClientState::Running { port };
        // A full control ring would mean the agent stopped reading; the
        // timeout turns that into an error for this client.
        if let Err(e) = self
            .ctrl
            .write_all(&message(h.kind, &forward.render(true)), HELLO_TIMEOUT)
        {
            if p.connect_port == 0 {
                self.release(port);
            }
            let reason = format!("forwarding to the agent: {e}");
            self.broken = Some(Fatal::Channel(e));
            return Err(reason);
        }
        Ok(())
    }

    /// The first free port for `domain` (`allocate_vchan_port`): for dom0
    /// any; for a VM peer every other one, on the side of the pair that
    /// keeps the two daemons of a VM-to-VM call from picking the same.
    fn allocate(&mut self, domain: u32) -> Option<u32> {
        let (start, step) = if domain == 0 {
            (0, 1)
        } else if domain > u32::from(self.domid) {
            (1, 2)
        } else {
            (0, 2)
        };
        let idx = (start..DATA_PORTS as usize)
            .step_by(step)
            .find(|i| self.ports[*i].is_none())?;
        self.ports[idx] = Some(domain);
        Some(FIRST_DATA_PORT + u32::try_from(idx).expect("under DATA_PORTS"))
    }
}

impl Daemon {
    fn release(&mut self, port: u32) {
        if let Some(i) = port_index(port) {
            self.ports[i] = None;
        }
    }
}

fn port_index(port: u32) -> Option<usize> {
    port.checked_sub(FIRST_DATA_PORT)
        .filter(|i| *i < DATA_PORTS)
        .map(|i| i as usize)
}

/// The request id of a trigger: NUL-terminated, then only NULs
/// (`validate_request_id`).
fn valid_ident(data: &[u8]) -> bool {
    let ident = &data[64..96];
    let Some(end) = ident.iter().position(|b| *b == 0) else {
        return false;
    };
    ident[..end]
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || b"_.- ".contains(c))
        && ident[end..].iter().all(|b| *b == 0)
}

impl AsFd for Client {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.as_fd()
    }
}
