//! A client's socket as busd sees it: the accepted unix stream, split into
//! zbus's read and write halves, with the [`policy`](crate::policy) checked
//! on both. Every message a client sends passes [`PolicyReader`] before
//! busd routes it; every signal busd hands a client passes [`PolicyWriter`]
//! first. A refused call gets dbus-daemon's `AccessDenied` error, written
//! by the reader through the same lock the writer holds for each message,
//! so the two never interleave on the wire.
//!
//! zbus keeps its own unix socket halves private, so this is the small
//! unix transport the bus needs: `recvmsg`/`sendmsg` with file descriptors
//! (`SCM_RIGHTS`, as Update1's `Apply` passes one) and the peer's
//! credentials from `SO_PEERCRED`, which the EXTERNAL handshake and
//! `GetConnectionUnixUser` read.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio::net::UnixStream;
use zbus::connection::socket::{BoxedSplit, ReadHalf, Split, WriteHalf};
use zbus::fdo::ConnectionCredentials;
use zbus::message::{Flags, Type};
use zbus::names::WellKnownName;

use crate::policy::{self, Kind};

type RecvmsgResult = io::Result<(usize, Vec<OwnedFd>)>;

/// At most this many descriptors in one message, as dbus-daemon and busd
/// allow; more in one `recvmsg` is an error, not a silent truncation.
const MAX_FDS: usize = busd::peer::MAX_MESSAGE_FDS;

/// Who is at the other end of a client socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// busd's number for the client: its unique name is `:busd.<id>`.
    pub id: usize,
    pub uid: u32,
    pub pid: i32,
}

impl Peer {
    pub fn unique_name(&self) -> String {
        format!(":busd.{}", self.id)
    }
}

/// The halves of an accepted client socket, ready for
/// `zbus::connection::Builder::socket`.
pub fn split(
    stream: UnixStream,
    id: usize,
    peers: Arc<busd::peers::Peers>,
    slot: crate::limits::Slot,
) -> io::Result<(Peer, BoxedSplit)> {
    let peer = slot.peer(id);
    let io = Arc::new(stream);
    let writer = Arc::new(tokio::sync::Mutex::new(RawWriter {
        io: io.clone(),
        peer,
    }));
    let reader = PolicyReader {
        raw: RawReader {
            io: io.clone(),
            peer,
        },
        writer: writer.clone(),
        peers,
        refused: 0,
        _slot: slot,
    };
    let writer = PolicyWriter { raw: writer, io };
    Ok((peer, Split::new(Box::new(reader), Box::new(writer))))
}

/// Shuts both directions of the client's socket, so busd sees the end of
/// the connection; never waits for anything.
fn hang_up(io: &UnixStream) -> io::Result<()> {
    match rustix::net::shutdown(io, rustix::net::Shutdown::Both) {
        Ok(()) | Err(rustix::io::Errno::NOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn credentials(peer: Peer) -> ConnectionCredentials {
    let creds = ConnectionCredentials::default().set_unix_user_id(peer.uid);
    match u32::try_from(peer.pid) {
        Ok(pid) => creds.set_process_id(pid),
        Err(_) => creds,
    }
}

#[derive(Debug)]
struct RawReader {
    io: Arc<UnixStream>,
    peer: Peer,
}

#[async_trait::async_trait]
impl ReadHalf for RawReader {
    async fn recvmsg(&mut self, buf: &mut [u8]) -> RecvmsgResult {
        loop {
            self.io.readable().await?;
            match self
                .io
                .try_io(Interest::READABLE, || recv_with_fds(self.io.as_fd(), buf))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }

    async fn peer_credentials(&mut self) -> io::Result<ConnectionCredentials> {
        Ok(credentials(self.peer))
    }
}

/// One `recvmsg`: bytes and any descriptors, close-on-exec. End of file is
/// zero bytes, which zbus reports as the end of the connection.
fn recv_with_fds(fd: BorrowedFd<'_>, buf: &mut [u8]) -> RecvmsgResult {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(fd, &mut iov, &mut ancillary, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for m in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the client sent more than {MAX_FDS} file descriptors at once"),
        ));
    }
    Ok((msg.bytes, fds))
}

#[derive(Debug)]
struct RawWriter {
    io: Arc<UnixStream>,
    peer: Peer,
}

#[async_trait::async_trait]
impl WriteHalf for RawWriter {
    async fn sendmsg(&mut self, buf: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        loop {
            self.io.writable().await?;
            match self.io.try_io(Interest::WRITABLE, || {
                send_with_fds(self.io.as_fd(), buf, fds)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    async fn close(&mut self) -> io::Result<()> {
        hang_up(&self.io)
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }

    async fn peer_credentials(&mut self) -> io::Result<ConnectionCredentials> {
        Ok(credentials(self.peer))
    }
}

fn send_with_fds(fd: BorrowedFd<'_>, buf: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let iov = [IoSlice::new(buf)];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !ancillary.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many file descriptors for one message",
        ));
    }
    Ok(rustix::net::sendmsg(
        fd,
        &iov,
        &mut ancillary,
        SendFlags::NOSIGNAL,
    )?)
}

/// The read half busd gets: each message the client sends is checked
/// before busd sees it.
#[derive(Debug)]
pub struct PolicyReader {
    raw: RawReader,
    writer: Arc<tokio::sync::Mutex<RawWriter>>,
    peers: Arc<busd::peers::Peers>,
    /// How many of its messages were refused (the log says the first
    /// [`LOGGED_REFUSALS`]).
    refused: u64,
    /// The client's place under its uid's connection limit, given back
    /// when busd drops the connection.
    _slot: crate::limits::Slot,
}

/// Refusals logged for each client; a client that keeps trying cannot
/// flood the log.
const LOGGED_REFUSALS: u64 = 10;

impl PolicyReader {
    /// The protected services whose names `destination`, a unique name,
    /// owns: a call to it must be one every one of them allows.
    async fn owned_by(&self, destination: &str) -> Vec<&'static qcontract::bus::Service> {
        if !destination.starts_with(':') {
            return Vec::new();
        }
        let registry = self.peers.name_registry().await;
        qcontract::bus::SERVICES
            .iter()
            .filter(|s| {
                WellKnownName::try_from(s.name)
                    .ok()
                    .and_then(|n| registry.lookup(n))
                    .is_some_and(|owner| owner.as_str() == destination)
            })
            .collect()
    }

    async fn check(&self, msg: &zbus::Message) -> Result<(), policy::Denied> {
        let hdr = msg.header();
        let destination = hdr.destination().map(|d| d.as_str());
        let member = hdr.member().map(|m| m.as_str());
        let name_arg = match (destination, member) {
            (Some(policy::BUS_NAME), Some("RequestName")) => msg
                .body()
                .deserialize::<(String, u32)>()
                .ok()
                .map(|(n, _)| n),
            _ => None,
        };
        let view = view(msg, &hdr, name_arg.as_deref());
        let owners = match destination {
            Some(d) if view.kind == Kind::MethodCall => self.owned_by(d).await,
            _ => Vec::new(),
        };
        if owners.is_empty() {
            return policy::may_send(self.raw.peer.uid, &view, None);
        }
        for owner in owners {
            policy::may_send(self.raw.peer.uid, &view, Some(owner))?;
        }
        Ok(())
    }

    /// Answers a refused call with `AccessDenied`, as dbus-daemon does,
    /// unless the caller asked for no reply.
    async fn refuse(&self, msg: &zbus::Message, why: &policy::Denied) -> zbus::Result<()> {
        if msg.message_type() != Type::MethodCall
            || msg
                .primary_header()
                .flags()
                .contains(Flags::NO_REPLY_EXPECTED)
        {
            return Ok(());
        }
        let hdr = msg.header();
        let to = self.raw.peer.unique_name();
        let reply = zbus::Message::error(&hdr, policy::ACCESS_DENIED)
            .sender(policy::BUS_NAME)
            .destination(to.as_str())
            .build(&(why.to_string(),))?;
        // A client that does not read its answers must not hold the
        // writer (and with it busd, which writes to it too): as busd does
        // for its own sends, give up after its send timeout and hang up.
        let send = async { self.writer.lock().await.send_message(&reply).await };
        match tokio::time::timeout(busd::peer::SEND_TIMEOUT, send).await {
            Ok(r) => r,
            Err(_) => {
                hang_up(&self.raw.io)?;
                Err(zbus::Error::InputOutput(Arc::new(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client does not read its answers",
                ))))
            }
        }
    }
}

/// The message as the policy reads it: its kind and header fields, and
/// `name_arg` where the caller has read the body.
fn view<'a>(
    msg: &zbus::Message,
    hdr: &'a zbus::message::Header<'_>,
    name_arg: Option<&'a str>,
) -> policy::Message<'a> {
    policy::Message {
        kind: kind(msg.message_type()),
        destination: hdr.destination().map(|d| d.as_str()),
        path: hdr.path().map(|p| p.as_str()),
        interface: hdr.interface().map(|i| i.as_str()),
        member: hdr.member().map(|m| m.as_str()),
        name_arg,
    }
}

fn kind(t: Type) -> Kind {
    match t {
        Type::MethodCall => Kind::MethodCall,
        Type::Signal => Kind::Signal,
        // Method returns and errors, and any type the specification adds:
        // busd passes on only replies to calls it delivered.
        _ => Kind::Reply,
    }
}

#[async_trait::async_trait]
impl ReadHalf for PolicyReader {
    async fn receive_message(
        &mut self,
        seq: u64,
        already_received_bytes: &mut Vec<u8>,
        already_received_fds: &mut Vec<OwnedFd>,
    ) -> zbus::Result<zbus::Message> {
        loop {
            let msg = self
                .raw
                .receive_message(seq, already_received_bytes, already_received_fds)
                .await?;
            match self.check(&msg).await {
                Ok(()) => return Ok(msg),
                Err(why) => {
                    self.refused += 1;
                    if self.refused <= LOGGED_REFUSALS {
                        eprintln!(
                            "refused {} (pid {}): {why}{}",
                            self.raw.peer.unique_name(),
                            self.raw.peer.pid,
                            if self.refused == LOGGED_REFUSALS {
                                "; its further refusals are not logged"
                            } else {
                                ""
                            }
                        );
                    }
                    self.refuse(&msg, &why).await?;
                }
            }
        }
    }

    async fn recvmsg(&mut self, buf: &mut [u8]) -> RecvmsgResult {
        self.raw.recvmsg(buf).await
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }

    async fn peer_credentials(&mut self) -> io::Result<ConnectionCredentials> {
        self.raw.peer_credentials().await
    }
}

/// The write half busd gets: a protected service's signals reach only the
/// clients the policy lets see them.
#[derive(Debug)]
pub struct PolicyWriter {
    raw: Arc<tokio::sync::Mutex<RawWriter>>,
    /// For `close`, which must not wait for the writer's lock.
    io: Arc<UnixStream>,
}

#[async_trait::async_trait]
impl WriteHalf for PolicyWriter {
    async fn send_message(&mut self, msg: &zbus::Message) -> zbus::Result<()> {
        let mut raw = self.raw.lock().await;
        let hdr = msg.header();
        if !policy::may_receive(raw.peer.uid, &view(msg, &hdr, None)) {
            return Ok(());
        }
        raw.send_message(msg).await
    }

    async fn sendmsg(&mut self, buf: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        self.raw.lock().await.sendmsg(buf, fds).await
    }

    async fn close(&mut self) -> io::Result<()> {
        // Not through the lock: a send stuck on a client that does not
        // read holds it, and busd closes exactly such a client.
        hang_up(&self.io)
    }

    fn can_pass_unix_fd(&self) -> bool {
        true
    }

    async fn peer_credentials(&mut self) -> io::Result<ConnectionCredentials> {
        self.raw.lock().await.peer_credentials().await
    }
}
