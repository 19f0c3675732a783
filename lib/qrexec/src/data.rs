//! A data connection (`libqrexec/remote.c`, `process_io.c`): once the
//! vchan is up, both ends send `MSG_HELLO`, then the client side sends
//! `MSG_DATA_STDIN` chunks and the service side `MSG_DATA_STDOUT`,
//! `MSG_DATA_STDERR` and, last, `MSG_DATA_EXIT_CODE` (a signed 32-bit
//! status). End of a stream is a zero-length message of its type. Chunks
//! are at most 64 KiB (protocol 3) and never more than the ring has room
//! for.
//!
//! [`pump`] moves bytes between the vchan and local fds in one poll loop;
//! pipes are non-blocking, so neither side can wedge the other.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use qvchan::{Vchan, VchanError};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;

use crate::framer::Framer;
use crate::wire::{
    message, Header, MsgType, PeerInfo, WireError, HEADER_LEN, MAX_DATA_CHUNK_V3, PROTOCOL_VERSION,
};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Vchan(#[from] VchanError),
    #[error("data connection: {0}")]
    Wire(#[from] WireError),
    #[error("data connection: {0}")]
    Protocol(String),
    #[error("data connection: local {what}")]
    Local {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("socket service {path}")]
    Socket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which end this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Sends stdin, receives stdout, stderr and the exit code
    /// (`qrexec-client`, `qrexec-client-vm`).
    Client,
    /// Runs the process: receives stdin, sends its output and exit code.
    Service,
}

/// Exchanges `MSG_HELLO` (both send at once; the ring holds it) and
/// returns the agreed version. Only protocol 3 is spoken here.
pub fn handshake(chan: &mut Vchan, timeout: Duration) -> Result<u32, DataError> {
    send_hello(chan, timeout)?;
    read_hello(chan, timeout)
}

/// Sends our `MSG_HELLO` (protocol 3).
pub fn send_hello(chan: &mut Vchan, timeout: Duration) -> Result<(), DataError> {
    let hello = PeerInfo {
        version: PROTOCOL_VERSION,
    };
    Ok(chan.write_all(&hello.message(), timeout)?)
}

/// Reads the peer's `MSG_HELLO` and returns the agreed version, the lower
/// of the two; a peer below protocol 3 is refused. The control channel
/// and every data connection greet this way.
pub fn read_hello(chan: &mut Vchan, timeout: Duration) -> Result<u32, DataError> {
    let mut raw = [0u8; HEADER_LEN + 4];
    chan.read_exact(&mut raw, timeout)?;
    let h = Header::parse(raw[..HEADER_LEN].try_into().expect("8 bytes"))?;
    if h.kind != MsgType::Hello || h.len != 4 {
        return Err(DataError::Protocol(format!(
            "expected MSG_HELLO, got {} of {} bytes",
            h.kind, h.len
        )));
    }
    let peer = PeerInfo::parse(&raw[HEADER_LEN..])?;
    let version = peer.version.min(PROTOCOL_VERSION);
    if version < PROTOCOL_VERSION {
        return Err(DataError::Protocol(format!(
            "peer speaks protocol {}; only 3 (Qubes R4.1 and later) is supported",
            peer.version
        )));
    }
    Ok(version)
}

/// What a service that cannot run sends (the agent's answer for a
/// missing one): end of stdout and stderr, then exit code 127.
pub fn send_not_found(chan: &mut Vchan, timeout: Duration) -> Result<(), DataError> {
    let out = [
        message(MsgType::DataStdout, &[]),
        message(MsgType::DataStderr, &[]),
        message(MsgType::DataExitCode, &EXIT_NOT_FOUND.to_le_bytes()),
    ]
    .concat();
    Ok(chan.write_all(&out, timeout)?)
}

/// A service's exit code: not found (or could not start).
pub const EXIT_NOT_FOUND: i32 = 127;

/// Serves a data connection with a socket service
/// ([`crate::service::Found::Socket`]): connect, write `header` (the
/// descriptor line, [`crate::service::socket_header`]), then pass the
/// data both ways on the one stream; the call's exit code is 0.
pub fn serve_socket(
    chan: &mut Vchan,
    path: &std::path::Path,
    header: &[u8],
) -> Result<Outcome, DataError> {
    use std::io::Write;
    let at = |source| DataError::Socket {
        path: path.to_owned(),
        source,
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(at)?;
    s.write_all(header).map_err(at)?;
    let input = s.try_clone().map_err(at)?;
    let local = Local {
        input: Some(OwnedFd::from(input)),
        input_err: None,
        output: Some(OwnedFd::from(s)),
        output_err: None,
    };
    pump(chan, Side::Service, local, &mut || 0)
}

/// A reaped process as an exit code: its status, or 128 + the signal
/// that ended it (`process_io.c`); 255 when it could not be waited for.
pub fn exit_status(st: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match st {
        Ok(st) => st
            .code()
            .or_else(|| st.signal().map(|s| 128 + s))
            .unwrap_or(255),
        Err(_) => 255,
    }
}

/// The local ends of a connection.
#[derive(Debug, Default)]
pub struct Local {
    /// What we read and send: the client's stdin, or the service's stdout.
    pub input: Option<OwnedFd>,
    /// The service's stderr (service side only).
    pub input_err: Option<OwnedFd>,
    /// Where received data goes: the client's stdout, or the service's
    /// stdin.
    pub output: Option<OwnedFd>,
    /// Where received stderr goes (client side only).
    pub output_err: Option<OwnedFd>,
}

/// How the connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Client side: the remote exit code.
    Exited(i32),
    /// Service side: our inputs ended and the exit code was sent.
    Done,
}

const TICK: Duration = Duration::from_millis(500);
/// Received bytes held for a slow local reader before we stop reading the
/// vchan.
const OUTPUT_HIGH_WATER: usize = 256 * 1024;

fn set_nonblocking(fd: &OwnedFd) -> Result<(), DataError> {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
    let local = |e: Errno| DataError::Local {
        what: "fcntl",
        source: e.into(),
    };
    let fl = fcntl_getfl(fd).map_err(local)?;
    fcntl_setfl(fd, fl | OFlags::NONBLOCK).map_err(local)
}

struct Sink {
    fd: Option<OwnedFd>,
    pending: Vec<u8>,
    close_when_flushed: bool,
}

impl Sink {
    fn new(fd: Option<OwnedFd>) -> Result<Sink, DataError> {
        if let Some(f) = &fd {
            set_nonblocking(f)?;
        }
        Ok(Sink {
            fd,
            pending: Vec::new(),
            close_when_flushed: false,
        })
    }

    fn flush(&mut self) -> Result<(), DataError> {
        while !self.pending.is_empty() {
            let Some(fd) = &self.fd else {
                // Nobody to write to (closed by the reader): drop it, as
                // the C code does on EPIPE.
                self.pending.clear();
                break;
            };
            match rustix::io::write(fd, &self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(Errno::AGAIN) => return Ok(()),
                Err(Errno::INTR) => {}
                Err(Errno::PIPE) => {
                    self.fd = None;
                    self.pending.clear();
                }
                Err(e) => {
                    return Err(DataError::Local {
                        what: "write",
                        source: e.into(),
                    })
                }
            }
        }
        if self.close_when_flushed {
            if let Some(fd) = self.fd.take() {
                // A socket service reads and writes one stream: its end of
                // input is a half-close, not the drop of one of its fds.
                match rustix::net::shutdown(&fd, rustix::net::Shutdown::Write) {
                    Ok(()) | Err(Errno::NOTSOCK | Errno::NOTCONN) => {}
                    Err(e) => {
                        return Err(DataError::Local {
                            what: "shutdown",
                            source: e.into(),
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs the connection until it is done. On the service side, `exit_code`
/// is asked for once both inputs have ended (it reaps the process).
pub fn pump(
    chan: &mut Vchan,
    side: Side,
    local: Local,
    exit_code: &mut dyn FnMut() -> i32,
) -> Result<Outcome, DataError> {
    let mut inputs: Vec<(Option<OwnedFd>, MsgType)> = match side {
        Side::Client => vec![(local.input, MsgType::DataStdin)],
        Side::Service => vec![
            (local.input, MsgType::DataStdout),
            (local.input_err, MsgType::DataStderr),
        ],
    };
    for (fd, _) in &inputs {
        if let Some(f) = fd {
            set_nonblocking(f)?;
        }
    }
    let mut out = Sink::new(local.output)?;
    let mut err = Sink::new(local.output_err)?;
    let mut framer = Framer::new(MAX_DATA_CHUNK_V3);
    let mut to_send: Vec<u8> = Vec::new();
    // A service with no stderr says so at once.
    if side == Side::Service {
        for (fd, kind) in &mut inputs {
            if fd.is_none() {
                to_send.extend_from_slice(&message(*kind, &[]));
            }
        }
    }
    let mut remote_stdin_done = false;
    let mut exit_sent = false;
    let mut buf = vec![0u8; MAX_DATA_CHUNK_V3];
    loop {
        // Send what is queued first.
        while !to_send.is_empty() {
            let n = match chan.try_write(&to_send) {
                Ok(n) => n,
                // The service may be done (its exit code in the ring)
                // while our stdin still flows: stop sending, keep reading.
                Err(e) if e.is_peer_gone() && side == Side::Client => {
                    to_send.clear();
                    inputs[0].0 = None;
                    break;
                }
                // The client went away: nobody wants the rest.
                Err(e) if e.is_peer_gone() => return Ok(Outcome::Done),
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                break;
            }
            to_send.drain(..n);
        }
        if side == Side::Service
            && !exit_sent
            && to_send.is_empty()
            && inputs.iter().all(|(fd, _)| fd.is_none())
        {
            let code = exit_code();
            to_send.extend_from_slice(&message(MsgType::DataExitCode, &code.to_le_bytes()));
            exit_sent = true;
            continue;
        }
        if exit_sent && to_send.is_empty() {
            return Ok(Outcome::Done);
        }
        // Take from the vchan while our local writers keep up.
        let reading =
            out.pending.len() < OUTPUT_HIGH_WATER && err.pending.len() < OUTPUT_HIGH_WATER;
        if reading {
            loop {
                let n = match chan.try_read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.is_peer_gone() && side == Side::Service => {
                        // The client went away: nobody wants the rest.
                        return Ok(Outcome::Done);
                    }
                    Err(e) => return Err(e.into()),
                };
                if n == 0 {
                    break;
                }
                framer.push(&buf[..n]);
                while let Some((h, data)) = framer.next_message()? {
                    match (side, h.kind) {
                        (Side::Client, MsgType::DataStdout) => {
                            if data.is_empty() {
                                out.close_when_flushed = true;
                            } else {
                                out.pending.extend_from_slice(&data);
                            }
                        }
                        (Side::Client, MsgType::DataStderr) => err.pending.extend_from_slice(&data),
                        (Side::Client, MsgType::DataExitCode) => {
                            let code = match <[u8; 4]>::try_from(data.get(..4).unwrap_or(&[])) {
                                Ok(b) => i32::from_le_bytes(b),
                                // remote.c: a short exit code is 255.
                                Err(_) => 255,
                            };
                            // Tell the service our stdin is done, if it
                            // is not, then finish our output.
                            if inputs[0].0.take().is_some() {
                                // Best effort: the service is done anyway.
                                let _ = chan.write_all(&message(MsgType::DataStdin, &[]), TICK * 4);
                            }
                            out.close_when_flushed = true;
                            drain_blocking(&mut out)?;
                            drain_blocking(&mut err)?;
                            return Ok(Outcome::Exited(code));
                        }
                        (Side::Service, MsgType::DataStdin) => {
                            if data.is_empty() {
                                remote_stdin_done = true;
                                out.close_when_flushed = true;
                            } else if !remote_stdin_done {
                                out.pending.extend_from_slice(&data);
                            }
                        }
                        // Messages meant for the other direction are
                        // logged and ignored by the C code; a hostile
                        // peer gains nothing from them here either.
                        (Side::Service, MsgType::DataStderr | MsgType::DataExitCode) => {}
                        (_, other) => {
                            return Err(DataError::Protocol(format!(
                                "{other} on a data connection"
                            )))
                        }
                    }
                }
                if out.pending.len() >= OUTPUT_HIGH_WATER || err.pending.len() >= OUTPUT_HIGH_WATER
                {
                    break;
                }
            }
        }
        out.flush()?;
        err.flush()?;
        // Read local inputs while the ring has room for a chunk.
        let space = chan.buffer_space()?;
        if to_send.is_empty() && space > HEADER_LEN {
            let want = (space - HEADER_LEN).min(MAX_DATA_CHUNK_V3);
            for (fd, kind) in &mut inputs {
                let Some(f) = fd else { continue };
                match rustix::io::read(&*f, &mut buf[..want]) {
                    Ok(0) => {
                        *fd = None;
                        to_send.extend_from_slice(&message(*kind, &[]));
                    }
                    Ok(n) => to_send.extend_from_slice(&message(*kind, &buf[..n])),
                    Err(Errno::AGAIN | Errno::INTR) => {}
                    Err(e) => {
                        return Err(DataError::Local {
                            what: "read",
                            source: e.into(),
                        })
                    }
                }
                if !to_send.is_empty() {
                    break;
                }
            }
            if !to_send.is_empty() {
                continue;
            }
        }
        let ring_full = !to_send.is_empty() || space <= HEADER_LEN;
        wait(chan, &inputs, &out, &err, ring_full, reading)?;
    }
}

/// Blocks until a sink is empty (the process is ending).
fn drain_blocking(s: &mut Sink) -> Result<(), DataError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.pending.is_empty() && Instant::now() < deadline {
        s.flush()?;
        if let (Some(fd), false) = (&s.fd, s.pending.is_empty()) {
            let mut fds = [PollFd::new(fd, PollFlags::OUT)];
            let ts = rustix::event::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            let _ = poll(&mut fds, Some(&ts));
        }
    }
    s.fd = None;
    Ok(())
}

/// Sleeps until the vchan, a local input or a blocked local output can
/// move.
fn wait(
    chan: &mut Vchan,
    inputs: &[(Option<OwnedFd>, MsgType)],
    out: &Sink,
    err: &Sink,
    ring_full: bool,
    reading: bool,
) -> Result<(), DataError> {
    // Ask the peer to signal its next read and write, then look once more:
    // what raced the request is not slept through.
    chan.request_notifications();
    // Data waiting counts only while we take it; above the high-water mark
    // we wait for our local reader instead of spinning on the ring.
    if (reading && chan.data_ready()? > 0) || (ring_full && chan.buffer_space()? > HEADER_LEN) {
        return Ok(());
    }
    let ev: BorrowedFd<'_> = chan.event_fd();
    let mut fds = vec![PollFd::new(&ev, PollFlags::IN)];
    if !ring_full {
        for f in inputs.iter().filter_map(|(fd, _)| fd.as_ref()) {
            fds.push(PollFd::new(f, PollFlags::IN));
        }
    }
    for s in [out, err] {
        if let (Some(f), false) = (&s.fd, s.pending.is_empty()) {
            fds.push(PollFd::new(f, PollFlags::OUT));
        }
    }
    let ts = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: i64::from(TICK.subsec_nanos()),
    };
    match poll(&mut fds, Some(&ts)) {
        Ok(_) | Err(Errno::INTR) => {}
        Err(e) => {
            return Err(DataError::Local {
                what: "poll",
                source: e.into(),
            })
        }
    }
    let vchan_hit = !fds[0].revents().is_empty();
    drop(fds);
    if vchan_hit {
        chan.handle_event()?;
    } else if !chan.check_alive(false) {
        return Err(VchanError::PeerGone {
            peer: chan.peer(),
            port: chan.port(),
        }
        .into());
    }
    Ok(())
}
