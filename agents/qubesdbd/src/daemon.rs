//! The daemon's loop: one thread, one `poll` over the local socket, its
//! clients and the VM's event channel. The protocol itself is the
//! `qubesdb` crate's state machines ([`Session`] for a local client,
//! [`Dom0Side`] for the VM); this module only moves bytes between them and
//! the sockets and the vchan.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qubesdb::db::Db;
use qubesdb::local::{Change, Session};
use qubesdb::peer::Dom0Side;
use qubesdb::wire::QdbPath;
use qvchan::{State, Vchan, VchanError};
use qxenstore::{Xs, XsError};
use rustix::event::{poll, PollFd, PollFlags};

/// Local clients at once; more are refused until one leaves.
const MAX_CLIENTS: usize = 64;
/// Bytes queued for one local client that is not reading; past this it is
/// disconnected rather than letting it grow our memory.
const CLIENT_BACKLOG: usize = 1 << 20;
/// Bytes queued for the VM that it does not read.
const VM_BACKLOG: usize = 1 << 20;
/// Bytes taken from the VM per turn of the loop, so a flood does not keep
/// local clients waiting.
const VM_TURN: usize = 64 * 1024;
/// How long `poll` sleeps at most: the VM's domain is looked up this often.
const TICK: Duration = qvchan::conn::LIVENESS_INTERVAL;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("local socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("xenstore")]
    Xs(#[from] XsError),
    #[error("offering the vchan to {vm}")]
    Offer {
        vm: String,
        #[source]
        source: VchanError,
    },
    #[error("poll")]
    Poll(#[source] io::Error),
}

/// Why the VM's connection is closed.
#[derive(Debug, thiserror::Error)]
enum VmFault {
    #[error(transparent)]
    Vchan(#[from] VchanError),
    #[error("protocol: {0}")]
    Protocol(#[from] qubesdb::peer::PeerError),
    #[error("it has not read {0} bytes queued for it")]
    NotReading(usize),
}

struct Client {
    stream: UnixStream,
    session: Session,
    out: Vec<u8>,
}

/// The VM's end: its vchan, the sync state, and what waits to be sent.
struct Vm {
    domid: u16,
    name: String,
    own: u16,
    chan: Vchan,
    side: Dom0Side,
    out: Vec<u8>,
    /// A fault found while forwarding a local change; the loop closes the
    /// connection for it.
    fault: Option<VmFault>,
    /// When the VM connected to this offer.
    connected_at: Option<Instant>,
}

impl Vm {
    fn offer(xs: &mut Xs, own: u16, domid: u16, name: &str) -> Result<Vm, DaemonError> {
        let chan = Vchan::server(
            xs,
            own,
            domid,
            qubesdb::VCHAN_PORT,
            qubesdb::VCHAN_RING,
            qubesdb::VCHAN_RING,
        )
        .map_err(|source| DaemonError::Offer {
            vm: name.into(),
            source,
        })?;
        Ok(Vm {
            domid,
            name: name.into(),
            own,
            chan,
            side: Dom0Side::new(),
            out: Vec::new(),
            fault: None,
            connected_at: None,
        })
    }

    /// Moves what the VM sent through the state machine and what is queued
    /// for it into the ring.
    fn service(&mut self, db: &mut Db, clients: &mut [Client]) -> Result<(), VmFault> {
        self.chan.handle_event()?;
        let mut buf = [0u8; 4096];
        let mut taken = 0;
        while taken < VM_TURN {
            let n = self.chan.try_read(&mut buf)?;
            if n == 0 {
                break;
            }
            taken += n;
            let out = self.side.input(db, &buf[..n])?;
            self.out.extend_from_slice(&out.send);
            for path in &out.changed {
                notify_watchers(clients, path);
            }
        }
        self.flush()
    }

    fn flush(&mut self) -> Result<(), VmFault> {
        while !self.out.is_empty() {
            let n = self.chan.try_write(&self.out)?;
            if n == 0 {
                break;
            }
            self.out.drain(..n);
        }
        if self.out.len() > VM_BACKLOG {
            return Err(VmFault::NotReading(self.out.len()));
        }
        Ok(())
    }

    /// A local change, sent on once the VM has its copy (before that, its
    /// MULTIREAD picks it up).
    fn forward(&mut self, change: &Change) -> Result<(), VmFault> {
        let msg = match change {
            Change::Write(p, v) => self.side.forward_write(p, v),
            Change::Rm(p) => self.side.forward_rm(p),
        };
        if let Some(m) = msg {
            self.out.extend_from_slice(&m);
        }
        self.flush()
    }
}

fn notify_watchers(clients: &mut [Client], path: &QdbPath) {
    for c in clients.iter_mut() {
        let ev = c.session.watch_events(path);
        c.out.extend_from_slice(&ev);
    }
}

fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Socket {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket left by an earlier instance for this VM.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    // Root only: the Admin API is the way for anything else.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

fn log(vm: Option<&Vm>, msg: &str) {
    match vm {
        Some(v) => eprintln!("qubesdb-daemon {} (domain {}): {msg}", v.name, v.domid),
        None => eprintln!("qubesdb-daemon dom0: {msg}"),
    }
}

pub fn run(domid: u16, name: Option<&str>, path: &Path) -> Result<(), DaemonError> {
    let mut db = Db::new();
    // A VM's daemon keeps its xenstore connection for the offers it makes.
    let mut vm = match name {
        Some(name) => {
            let mut xs = Xs::open()?;
            let own = xs.own_domid()?;
            let v = Vm::offer(&mut xs, own, domid, name)?;
            Some((v, xs))
        }
        None => None,
    };
    // The socket appears only once the vchan is offered: qdomd takes the
    // socket as "ready", and unpauses the VM after filling the database.
    let listener = bind(path)?;
    log(
        vm.as_ref().map(|(v, _)| v),
        &format!("serving {}", path.display()),
    );
    let mut clients: Vec<Client> = Vec::new();
    let mut reoffer = qbackoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let (listen_ready, vm_ready, client_ready) =
            wait(&listener, vm.as_ref().map(|(v, _)| v), &clients)?;
        if listen_ready {
            accept(&listener, &mut clients, vm.as_ref().map(|(v, _)| v));
        }
        if let Some((v, xs)) = vm.as_mut() {
            let fault = if vm_ready {
                v.service(&mut db, &mut clients).err()
            } else {
                None
            }
            .or(v.fault.take());
            let state = v.chan.state();
            if state == State::Connected && v.connected_at.is_none() {
                v.connected_at = Some(Instant::now());
            }
            if fault.is_some() || state == State::Gone {
                match &fault {
                    Some(VmFault::Vchan(e)) if e.is_peer_gone() => {
                        log(Some(v), "the VM closed its end")
                    }
                    Some(f) => log(Some(v), &format!("closing its connection: {f}")),
                    None => log(Some(v), "the VM closed its end"),
                }
                if !v.chan.check_alive(true) {
                    log(Some(v), "the domain is gone; exiting");
                    return Ok(());
                }
                // The VM's daemon may come back (a restart inside the VM):
                // offer a fresh vchan; it syncs everything again. A VM that
                // breaks its connection again and again waits longer each
                // time (each offer costs dom0 a page and a port); one that
                // stayed connected a while earns a quick new offer.
                if let Some(t) = v.connected_at {
                    reoffer.ran_for(t.elapsed());
                }
                let delay = reoffer.next_delay();
                log(Some(v), &format!("offering a new vchan in {delay:?}"));
                // The old offer and its xenstore entry go before the new
                // one is made at the same path.
                v.chan.close();
                std::thread::sleep(delay);
                let (own, name) = (v.own, v.name.clone());
                *v = Vm::offer(xs, own, domid, &name)?;
            } else if !v.chan.check_alive(false) {
                log(Some(v), "the domain is gone; exiting");
                return Ok(());
            }
        }
        serve_clients(
            &mut clients,
            &client_ready,
            &mut db,
            vm.as_mut().map(|(v, _)| v),
        );
    }
}

type Ready = (bool, bool, Vec<bool>);

/// Polls everything once: which of the listener, the VM's channel and the
/// clients have something.
fn wait(
    listener: &UnixListener,
    vm: Option<&Vm>,
    clients: &[Client],
) -> Result<Ready, DaemonError> {
    let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(2 + clients.len());
    fds.push(PollFd::new(listener, PollFlags::IN));
    let vm_fd: Option<BorrowedFd<'_>> = vm.map(|v| v.chan.event_fd());
    if let Some(fd) = &vm_fd {
        fds.push(PollFd::new(fd, PollFlags::IN));
    }
    for c in clients {
        let mut flags = PollFlags::IN;
        if !c.out.is_empty() {
            flags |= PollFlags::OUT;
        }
        fds.push(PollFd::new(&c.stream, flags));
    }
    // A VM with bytes still queued is looked at every tick regardless.
    let ts = rustix::fs::Timespec {
        tv_sec: i64::try_from(TICK.as_secs()).expect("TICK is a few seconds"),
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(DaemonError::Poll(e.into())),
    }
    let hit = |f: &PollFd<'_>| !f.revents().is_empty();
    let listen = hit(&fds[0]);
    let offset = 1 + usize::from(vm_fd.is_some());
    let vm_hit = (vm_fd.is_some() && hit(&fds[1]))
        || vm.is_some_and(|v| !v.out.is_empty() || v.fault.is_some());
    let clients_hit = fds[offset..].iter().map(hit).collect();
    Ok((listen, vm_hit, clients_hit))
}

fn accept(listener: &UnixListener, clients: &mut Vec<Client>, vm: Option<&Vm>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if clients.len() >= MAX_CLIENTS {
                    log(vm, "refusing a local client: too many connected");
                    continue;
                }
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                clients.push(Client {
                    stream,
                    session: Session::new(),
                    out: Vec::new(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log(vm, &format!("accepting a local client: {e}"));
                return;
            }
        }
    }
}

fn serve_clients(clients: &mut Vec<Client>, ready: &[bool], db: &mut Db, mut vm: Option<&mut Vm>) {
    let mut drop_idx = vec![false; clients.len()];
    for i in 0..clients.len() {
        if !ready.get(i).copied().unwrap_or(false) {
            continue;
        }
        let mut buf = [0u8; 8192];
        let changes = match clients[i].stream.read(&mut buf) {
            Ok(0) => {
                drop_idx[i] = true;
                continue;
            }
            Ok(n) => {
                let c = &mut clients[i];
                match c.session.input(db, &buf[..n]) {
                    Ok(out) => {
                        c.out.extend_from_slice(&out.reply);
                        out.changes
                    }
                    Err(e) => {
                        log(vm.as_deref(), &format!("closing a local client: {e}"));
                        drop_idx[i] = true;
                        continue;
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Vec::new()
            }
            Err(_) => {
                drop_idx[i] = true;
                continue;
            }
        };
        for ch in &changes {
            if let Some(v) = vm.as_mut() {
                if v.fault.is_none() {
                    // The loop closes the connection and offers a new one.
                    v.fault = v.forward(ch).err();
                }
            }
            notify_watchers(clients, ch.path());
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => {
                    drop_idx[i] = true;
                    break;
                }
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    drop_idx[i] = true;
                    break;
                }
            }
        }
        if c.out.len() > CLIENT_BACKLOG {
            log(
                vm.as_deref(),
                "closing a local client that does not read its replies",
            );
            drop_idx[i] = true;
        }
    }
    let mut i = 0;
    clients.retain(|_| {
        let keep = !drop_idx[i];
        i += 1;
        keep
    });
}

impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qubesdb::wire::{Header, MsgType, HEADER_LEN};

    fn request(s: &mut UnixStream, kind: MsgType, path: &str, data: &[u8]) {
        let p = QdbPath::new(path).unwrap();
        s.write_all(&Header::message(kind, &p, data)).unwrap();
    }

    fn reply(s: &mut UnixStream) -> (MsgType, String, Vec<u8>) {
        let mut raw = [0u8; HEADER_LEN];
        s.read_exact(&mut raw).unwrap();
        let h = Header::parse(&raw).unwrap();
        let mut data = vec![0u8; h.data_len as usize];
        s.read_exact(&mut data).unwrap();
        (h.kind, h.path.as_str().to_owned(), data)
    }

    /// dom0's own database (no VM end) over a real socket: a write, a
    /// read, a watch firing for another client's write, and a client that
    /// sends garbage is cut off while the others carry on.
    #[test]
    fn local_socket_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qubesdb.sock");
        let p = path.clone();
        std::thread::spawn(move || run(0, None, &p));
        let connect = || loop {
            if let Ok(s) = UnixStream::connect(&path) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut a = connect();
        let mut b = connect();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        request(&mut b, MsgType::Watch, "/name", &[]);
        assert_eq!(reply(&mut b).0, MsgType::Ok);
        request(&mut a, MsgType::Write, "/name", b"work");
        assert_eq!(reply(&mut a).0, MsgType::Ok);
        let (kind, p, _) = reply(&mut b);
        assert_eq!((kind, p.as_str()), (MsgType::RespWatch, "/name"));
        request(&mut b, MsgType::Read, "/name", &[]);
        assert_eq!(
            reply(&mut b),
            (MsgType::RespRead, "/name".into(), b"work".to_vec())
        );

        let mut bad = connect();
        bad.write_all(&[0xff; HEADER_LEN]).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(
            bad.read(&mut byte).unwrap(),
            0,
            "a bad header closes that client"
        );
        request(&mut a, MsgType::Read, "/missing", &[]);
        assert_eq!(reply(&mut a).0, MsgType::ErrorNoent);
    }
}
