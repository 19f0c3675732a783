//! A blocking xenstore client.
//!
//! One request is in flight at a time; watch events that arrive while a
//! reply is awaited are queued and handed out by [`Xs::next_event`]. Every
//! wait is bounded by the client's timeout, so a stuck or dead daemon is an
//! error, never a hang. The connection's fd can be polled with others
//! ([`AsFd`]); when it is readable, call [`Xs::next_event`] with a zero
//! timeout.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};

use crate::wire::{self, Decoder, Message, MsgType, Perm, WatchEvent, WireError};

/// xenstored's socket in dom0.
pub const SOCKET: &str = "/run/xenstored/socket";
/// The kernel's xenbus device, the way to xenstore from a guest (and from
/// dom0 when no socket is there).
pub const DEVICE: &str = "/dev/xen/xenbus";
/// How long a reply may take by default. xenstored answers in
/// microseconds; under nested TCG emulation it has been seen to take
/// hundreds of milliseconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum XsError {
    #[error("xenstore {source_name}: {op}")]
    Io {
        source_name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("xenstore {op} {path}: {errno}")]
    Daemon {
        op: MsgType,
        path: String,
        /// The errno name xenstored answered with, e.g. `ENOENT`.
        errno: String,
    },
    #[error("xenstore {op} {path}: {source}")]
    Request {
        op: MsgType,
        path: String,
        #[source]
        source: WireError,
    },
    #[error("xenstore {source_name}: {reason}")]
    Protocol { source_name: String, reason: String },
    #[error("xenstore {source_name}: no reply to {op} {path} within {timeout:?}")]
    Timeout {
        source_name: String,
        op: MsgType,
        path: String,
        timeout: Duration,
    },
    #[error("xenstore {path}: value is not UTF-8")]
    NotUtf8 { path: String },
}

impl XsError {
    /// The node (or its parent) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, XsError::Daemon { errno, .. } if errno == "ENOENT")
    }

    /// The errno name xenstored answered with, if it refused.
    pub fn errno(&self) -> Option<&str> {
        match self {
            XsError::Daemon { errno, .. } => Some(errno),
            _ => None,
        }
    }

    /// A transaction lost a race and must be retried.
    pub fn is_again(&self) -> bool {
        matches!(self, XsError::Daemon { errno, .. } if errno == "EAGAIN")
    }
}

enum Transport {
    Socket(UnixStream),
    Device(File),
}

impl Transport {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Transport::Socket(s) => s.as_fd(),
            Transport::Device(f) => f.as_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Socket(s) => s.read(buf),
            Transport::Device(f) => f.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Transport::Socket(s) => s.write_all(buf),
            // The xenbus device takes a message in one write.
            Transport::Device(f) => f.write_all(buf),
        }
    }
}

/// A connection to xenstore.
pub struct Xs {
    transport: Transport,
    /// Where this connection goes, for error messages.
    source_name: String,
    next_req: u32,
    decoder: Decoder,
    events: VecDeque<WatchEvent>,
    timeout: Duration,
    /// Requests whose reply came too late: when it does arrive it is
    /// dropped, so the connection stays usable after a timeout.
    abandoned: Vec<u32>,
}

/// Late replies awaited at most; past this the daemon is not answering
/// and the connection is given up.
const MAX_ABANDONED: usize = 16;

impl std::fmt::Debug for Xs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xs")
            .field("source", &self.source_name)
            .field("queued_events", &self.events.len())
            .finish()
    }
}

impl Xs {
    /// xenstored's socket if it is there (dom0), else the xenbus device.
    pub fn open() -> Result<Xs, XsError> {
        if Path::new(SOCKET).exists() {
            Xs::open_socket(Path::new(SOCKET))
        } else {
            Xs::open_device(Path::new(DEVICE))
        }
    }

    pub fn open_socket(path: &Path) -> Result<Xs, XsError> {
        let source_name = path.display().to_string();
        let s = UnixStream::connect(path).map_err(|source| XsError::Io {
            source_name: source_name.clone(),
            op: "connecting",
            source,
        })?;
        Ok(Xs::new(Transport::Socket(s), source_name))
    }

    pub fn open_device(path: &Path) -> Result<Xs, XsError> {
        let source_name = path.display().to_string();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| XsError::Io {
                source_name: source_name.clone(),
                op: "opening",
                source,
            })?;
        Ok(Xs::new(Transport::Device(f), source_name))
    }

    fn new(transport: Transport, source_name: String) -> Xs {
        Xs {
            transport,
            source_name,
            next_req: 1,
            decoder: Decoder::default(),
            events: VecDeque::new(),
            timeout: DEFAULT_TIMEOUT,
            abandoned: Vec::new(),
        }
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn read(&mut self, path: &str) -> Result<Vec<u8>, XsError> {
        self.read_in(0, path)
    }

    /// A value that must be UTF-8 text.
    pub fn read_string(&mut self, path: &str) -> Result<String, XsError> {
        let v = self.read(path)?;
        String::from_utf8(v).map_err(|_| XsError::NotUtf8 { path: path.into() })
    }

    /// `None` if the node does not exist.
    pub fn try_read(&mut self, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        match self.read(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<(), XsError> {
        self.write_in(0, path, value)
    }

    pub fn mkdir(&mut self, path: &str) -> Result<(), XsError> {
        self.simple(0, MsgType::Mkdir, path)
    }

    /// Removes a node and everything under it.
    pub fn rm(&mut self, path: &str) -> Result<(), XsError> {
        self.simple(0, MsgType::Rm, path)
    }

    pub fn directory(&mut self, path: &str) -> Result<Vec<String>, XsError> {
        self.directory_in(0, path)
    }

    pub fn get_perms(&mut self, path: &str) -> Result<Vec<Perm>, XsError> {
        let payload = self.payload(MsgType::GetPerms, path, wire::path_payload(path))?;
        let reply = self.call(0, MsgType::GetPerms, path, &payload)?;
        let strings =
            wire::split_strings(&reply, "permission list").map_err(|e| self.bad_reply(e))?;
        strings
            .iter()
            .map(|s| Perm::parse(s).map_err(|e| self.bad_reply(e)))
            .collect()
    }

    pub fn set_perms(&mut self, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        self.set_perms_in(0, path, perms)
    }

    /// Our own domain id (the `domid` key xenstore keeps for every
    /// domain, read relative to our own directory).
    pub fn own_domid(&mut self) -> Result<u16, XsError> {
        let raw = self.read_string("domid")?;
        raw.trim().parse().map_err(|_| XsError::Protocol {
            source_name: self.source_name.clone(),
            reason: format!("our domid {raw:?} is not a domain id"),
        })
    }

    /// `/local/domain/<domid>`, as xenstored names it.
    pub fn get_domain_path(&mut self, domid: u32) -> Result<String, XsError> {
        let arg = domid.to_string();
        let mut payload = arg.clone().into_bytes();
        payload.push(0);
        let reply = self.call(0, MsgType::GetDomainPath, &arg, &payload)?;
        let path = String::from_utf8(reply.strip_suffix(&[0]).unwrap_or(&reply).to_vec())
            .map_err(|_| XsError::NotUtf8 { path: arg.clone() })?;
        wire::check_path(&path).map_err(|e| self.bad_reply(e))?;
        Ok(path)
    }

    /// Sets a watch on `path` and everything under it. xenstored fires it
    /// once at once, so a value written before the watch was set is seen.
    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        let payload = self.payload(MsgType::Watch, path, wire::watch_payload(path, token))?;
        self.call(0, MsgType::Watch, path, &payload).map(drop)
    }

    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        let payload = self.payload(MsgType::Unwatch, path, wire::watch_payload(path, token))?;
        self.call(0, MsgType::Unwatch, path, &payload).map(drop)?;
        // Events of that watch still queued are stale now.
        self.events.retain(|e| e.token != token);
        Ok(())
    }

    /// The next watch event, waiting at most `timeout` (zero: only what
    /// has already arrived).
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<WatchEvent>, XsError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            match self.receive(deadline)? {
                Some(m) => self.unrequested(m)?,
                None => return Ok(None),
            }
        }
    }

    /// Events already queued, without waiting.
    pub fn has_queued_events(&self) -> bool {
        !self.events.is_empty()
    }

    pub fn transaction(&mut self) -> Result<Transaction<'_>, XsError> {
        let reply = self.call(0, MsgType::TransactionStart, "", b"\0")?;
        let id = wire::parse_tx_id(&reply).map_err(|e| self.bad_reply(e))?;
        Ok(Transaction {
            xs: self,
            id,
            open: true,
        })
    }

    fn read_in(&mut self, tx: u32, path: &str) -> Result<Vec<u8>, XsError> {
        let payload = self.payload(MsgType::Read, path, wire::path_payload(path))?;
        self.call(tx, MsgType::Read, path, &payload)
    }

    fn write_in(&mut self, tx: u32, path: &str, value: &[u8]) -> Result<(), XsError> {
        let payload = self.payload(MsgType::Write, path, wire::write_payload(path, value))?;
        self.call(tx, MsgType::Write, path, &payload).map(drop)
    }

    fn directory_in(&mut self, tx: u32, path: &str) -> Result<Vec<String>, XsError> {
        let payload = self.payload(MsgType::Directory, path, wire::path_payload(path))?;
        let reply = self.call(tx, MsgType::Directory, path, &payload)?;
        wire::split_strings(&reply, "directory listing").map_err(|e| self.bad_reply(e))
    }

    fn set_perms_in(&mut self, tx: u32, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        let payload = self.payload(
            MsgType::SetPerms,
            path,
            wire::set_perms_payload(path, perms),
        )?;
        self.call(tx, MsgType::SetPerms, path, &payload).map(drop)
    }

    fn simple(&mut self, tx: u32, op: MsgType, path: &str) -> Result<(), XsError> {
        let payload = self.payload(op, path, wire::path_payload(path))?;
        self.call(tx, op, path, &payload).map(drop)
    }

    fn payload(
        &self,
        op: MsgType,
        path: &str,
        p: Result<Vec<u8>, WireError>,
    ) -> Result<Vec<u8>, XsError> {
        p.map_err(|source| XsError::Request {
            op,
            path: path.chars().take(80).collect(),
            source,
        })
    }

    fn bad_reply(&self, e: WireError) -> XsError {
        XsError::Protocol {
            source_name: self.source_name.clone(),
            reason: format!("malformed reply: {e}"),
        }
    }

    /// Sends one request and waits for its reply, queueing watch events
    /// that come first.
    fn call(
        &mut self,
        tx: u32,
        op: MsgType,
        path: &str,
        payload: &[u8],
    ) -> Result<Vec<u8>, XsError> {
        if self.abandoned.len() >= MAX_ABANDONED {
            return Err(XsError::Protocol {
                source_name: self.source_name.clone(),
                reason: format!(
                    "{MAX_ABANDONED} requests went unanswered; giving the connection up"
                ),
            });
        }
        let req_id = self.next_req;
        // Request id 0 is what xenstored uses for watch events; skip it.
        self.next_req = self.next_req.checked_add(1).unwrap_or(1);
        let msg = wire::request(op, req_id, tx, payload).map_err(|source| XsError::Request {
            op,
            path: path.into(),
            source,
        })?;
        let source_name = self.source_name.clone();
        self.transport
            .write_all(&msg)
            .map_err(|source| XsError::Io {
                source_name,
                op: "sending a request",
                source,
            })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let Some(m) = self.receive(deadline)? else {
                self.abandoned.push(req_id);
                return Err(XsError::Timeout {
                    source_name: self.source_name.clone(),
                    op,
                    path: path.into(),
                    timeout: self.timeout,
                });
            };
            let kind = m.kind().map_err(|e| self.bad_reply(e))?;
            if kind == MsgType::WatchEvent {
                self.unrequested(m)?;
                continue;
            }
            if let Some(i) = self.abandoned.iter().position(|r| *r == m.header.req_id) {
                // The late answer to a request we gave up on.
                self.abandoned.swap_remove(i);
                continue;
            }
            if m.header.req_id != req_id {
                return Err(XsError::Protocol {
                    source_name: self.source_name.clone(),
                    reason: format!(
                        "reply for request {} while {req_id} ({op}) was awaited",
                        m.header.req_id
                    ),
                });
            }
            if kind == MsgType::Error {
                let errno = wire::error_name(&m.payload).map_err(|e| self.bad_reply(e))?;
                return Err(XsError::Daemon {
                    op,
                    path: path.into(),
                    errno,
                });
            }
            if kind != op {
                return Err(XsError::Protocol {
                    source_name: self.source_name.clone(),
                    reason: format!("{kind} reply to a {op} request"),
                });
            }
            return Ok(m.payload);
        }
    }

    /// A message nobody asked for: only a watch event is allowed.
    fn unrequested(&mut self, m: Message) -> Result<(), XsError> {
        match m.kind() {
            Ok(MsgType::WatchEvent) => {
                let e = WatchEvent::parse(&m.payload).map_err(|e| self.bad_reply(e))?;
                self.events.push_back(e);
                Ok(())
            }
            _ => Err(XsError::Protocol {
                source_name: self.source_name.clone(),
                reason: format!(
                    "unrequested message of type {} (request {})",
                    m.header.kind, m.header.req_id
                ),
            }),
        }
    }

    /// The next whole message, or `None` at the deadline.
    fn receive(&mut self, deadline: Instant) -> Result<Option<Message>, XsError> {
        loop {
            if let Some(m) = self.decoder.next_message().map_err(|e| self.bad_reply(e))? {
                return Ok(Some(m));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.wait_readable(left)? {
                return Ok(None);
            }
            let mut buf = [0u8; 4096 + wire::HEADER_LEN];
            let n = match self.transport.read(&mut buf) {
                Ok(0) => {
                    return Err(XsError::Protocol {
                        source_name: self.source_name.clone(),
                        reason: "connection closed".into(),
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(XsError::Io {
                        source_name: self.source_name.clone(),
                        op: "reading",
                        source,
                    })
                }
            };
            self.decoder.push(&buf[..n]);
        }
    }

    fn wait_readable(&self, timeout: Duration) -> Result<bool, XsError> {
        let ts = rustix::fs::Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let fd = self.transport.as_fd();
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        loop {
            match poll(&mut fds, Some(&ts)) {
                Ok(n) => return Ok(n > 0),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(XsError::Io {
                        source_name: self.source_name.clone(),
                        op: "polling",
                        source: e.into(),
                    })
                }
            }
        }
    }
}

impl AsFd for Xs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.transport.as_fd()
    }
}

/// An open transaction. Dropping it without [`Transaction::commit`] aborts
/// it.
pub struct Transaction<'a> {
    xs: &'a mut Xs,
    id: u32,
    open: bool,
}

impl Transaction<'_> {
    pub fn read(&mut self, path: &str) -> Result<Vec<u8>, XsError> {
        self.xs.read_in(self.id, path)
    }

    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<(), XsError> {
        self.xs.write_in(self.id, path, value)
    }

    pub fn mkdir(&mut self, path: &str) -> Result<(), XsError> {
        self.xs.simple(self.id, MsgType::Mkdir, path)
    }

    pub fn rm(&mut self, path: &str) -> Result<(), XsError> {
        self.xs.simple(self.id, MsgType::Rm, path)
    }

    pub fn directory(&mut self, path: &str) -> Result<Vec<String>, XsError> {
        self.xs.directory_in(self.id, path)
    }

    pub fn set_perms(&mut self, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        self.xs.set_perms_in(self.id, path, perms)
    }

    /// Commits. `Ok(false)`: another writer got there first and nothing
    /// was applied; run the transaction again.
    pub fn commit(mut self) -> Result<bool, XsError> {
        self.end(true)
    }

    pub fn abort(mut self) -> Result<(), XsError> {
        self.end(false).map(drop)
    }

    fn end(&mut self, commit: bool) -> Result<bool, XsError> {
        self.open = false;
        let payload: &[u8] = if commit { b"T\0" } else { b"F\0" };
        match self.xs.call(self.id, MsgType::TransactionEnd, "", payload) {
            Ok(_) => Ok(true),
            Err(e) if commit && e.is_again() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.open {
            // Best effort: if the abort cannot be sent the connection is
            // broken, and xenstored drops its transactions with it.
            let _ = self.end(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A fake xenstored: answers each request with what `reply` returns
    /// for it (type, payload), after any extra messages it asks to send.
    fn fake(
        script: impl Fn(&Message) -> Vec<(u32, u32, Vec<u8>)> + Send + 'static,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        thread::JoinHandle<Vec<Message>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            let mut d = Decoder::default();
            let mut buf = [0u8; 8192];
            loop {
                let n = c.read(&mut buf).unwrap();
                if n == 0 {
                    return seen;
                }
                d.push(&buf[..n]);
                while let Some(m) = d.next_message().unwrap() {
                    for (kind, req, payload) in script(&m) {
                        let mut out = wire::Header {
                            kind,
                            req_id: req,
                            tx_id: m.header.tx_id,
                            len: u32::try_from(payload.len()).unwrap(),
                        }
                        .render()
                        .to_vec();
                        out.extend_from_slice(&payload);
                        // Byte by byte: the client must reassemble.
                        for b in out {
                            c.write_all(&[b]).unwrap();
                        }
                    }
                    seen.push(m);
                }
            }
        });
        (dir, path, t)
    }

    #[test]
    fn requests_replies_and_interleaved_watch_events() {
        let (_dir, path, t) = fake(|m| {
            let r = m.header.req_id;
            match MsgType::from_u32(m.header.kind).unwrap() {
                MsgType::Read if m.payload == b"/missing\0" => {
                    vec![(16, r, b"ENOENT\0".to_vec())]
                }
                MsgType::Read => vec![(15, 0, b"/w\0tok\0".to_vec()), (2, r, b"value".to_vec())],
                MsgType::Watch => vec![(4, r, b"OK\0".to_vec()), (15, 0, b"/w\0tok\0".to_vec())],
                MsgType::Directory => vec![(1, r, b"a\0b\0".to_vec())],
                MsgType::TransactionStart => vec![(6, r, b"9\0".to_vec())],
                MsgType::TransactionEnd => vec![(16, r, b"EAGAIN\0".to_vec())],
                MsgType::SetPerms | MsgType::Write => vec![(m.header.kind, r, b"OK\0".to_vec())],
                _ => vec![(16, r, b"EINVAL\0".to_vec())],
            }
        });
        let mut xs = Xs::open_socket(&path).unwrap();
        xs.watch("/w", "tok").unwrap();
        assert_eq!(xs.read("/k").unwrap(), b"value");
        assert!(xs.try_read("/missing").unwrap().is_none());
        assert_eq!(xs.directory("/d").unwrap(), ["a", "b"]);
        assert_eq!(xs.next_event(Duration::ZERO).unwrap().unwrap().token, "tok");
        assert!(xs.next_event(Duration::ZERO).unwrap().is_some());
        assert!(xs.next_event(Duration::from_millis(20)).unwrap().is_none());
        {
            let mut tx = xs.transaction().unwrap();
            tx.write("/t/x", b"1").unwrap();
            tx.set_perms("/t/x", &[Perm::none(0), Perm::read(3)])
                .unwrap();
            assert!(!tx.commit().unwrap(), "EAGAIN means retry");
        }
        drop(xs);
        let seen = t.join().unwrap();
        let tx_msgs: Vec<_> = seen.iter().filter(|m| m.header.tx_id == 9).collect();
        assert_eq!(tx_msgs.len(), 3, "write, set_perms and end carry the id");
        assert_eq!(tx_msgs[1].payload, b"/t/x\0n0\0r3\0");
        assert_eq!(tx_msgs[2].payload, b"T\0");
    }

    #[test]
    fn hostile_replies_are_errors() {
        let (_dir, path, _t) = fake(|m| {
            let r = m.header.req_id;
            match m.payload.as_slice() {
                b"/wrong-id\0" => vec![(2, r + 5, b"x".to_vec())],
                _ => vec![(11, r, b"OK\0".to_vec())],
            }
        });
        let mut xs = Xs::open_socket(&path).unwrap();
        let e = xs.read("/wrong-type").unwrap_err();
        assert!(e.to_string().contains("WRITE reply to a READ"), "{e}");
        let e = xs.read("/wrong-id").unwrap_err();
        assert!(e.to_string().contains("was awaited"), "{e}");
        assert!(matches!(
            xs.read("/bad path").unwrap_err(),
            XsError::Request { .. }
        ));
    }

    #[test]
    fn a_late_reply_is_dropped_and_the_connection_stays_usable() {
        use std::sync::atomic::{AtomicBool, Ordering};
        static FIRST: AtomicBool = AtomicBool::new(true);
        let (_dir, path, _t) = fake(|m| {
            let r = m.header.req_id;
            if FIRST.swap(false, Ordering::SeqCst) {
                // No answer now; it comes with the next one.
                return Vec::new();
            }
            vec![(2, r - 1, b"late".to_vec()), (2, r, b"on time".to_vec())]
        });
        let mut xs = Xs::open_socket(&path).unwrap();
        xs.set_timeout(Duration::from_millis(50));
        assert!(matches!(
            xs.read("/a").unwrap_err(),
            XsError::Timeout { .. }
        ));
        xs.set_timeout(Duration::from_secs(5));
        assert_eq!(xs.read("/b").unwrap(), b"on time");
    }

    #[test]
    fn silence_is_a_timeout() {
        let (_dir, path, _t) = fake(|_| Vec::new());
        let mut xs = Xs::open_socket(&path).unwrap();
        xs.set_timeout(Duration::from_millis(50));
        assert!(matches!(
            xs.read("/k").unwrap_err(),
            XsError::Timeout { .. }
        ));
    }
}
