//! A vchan connection over the Xen devices: setup of either end, the
//! xenstore advertisement, and I/O that reports a dead peer instead of
//! hanging.
//!
//! The advertisement is Qubes' `libvchan-xen` over Xen's `libxenvchan`:
//! the server writes `ring-ref` (the grant of its shared page) and
//! `event-channel` (its unbound port) under `data/vchan/<client>/<port>`
//! in its own xenstore directory, owned by itself with read access for the
//! client and nobody else, in one transaction. The client reads them from
//! `/local/domain/<server>/data/vchan/<client>/<port>`, binds the port,
//! maps the page and announces itself in the page. The server removes the
//! advertisement once the client is connected (or when it closes), so a
//! second client cannot find it.
//!
//! A peer is gone when its live byte in the page says so (it closed, or
//! the kernel cleared it when its mapping went away), or when its domain
//! no longer exists: a destroyed domain's kernel clears nothing, so every
//! [`LIVENESS_INTERVAL`] of waiting the domain is looked up too.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use qxenstore::{Perm, Xs, XsError};

use crate::layout::{self, LayoutError, Orders, Placement};
use crate::ring::{Endpoint, PeerState, RingError, SharedMem};
use crate::sys::evtchn::EventChannel;
use crate::sys::gntalloc::{self, UnmapNotify};
use crate::sys::gntdev;
use crate::sys::privcmd::Privcmd;
use crate::sys::{DomId, Mapping, SysError};

/// How often a waiting end checks that the peer's domain still exists.
pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum VchanError {
    #[error("vchan with domain {peer} port {port}: {source}")]
    Sys {
        peer: DomId,
        port: u32,
        #[source]
        source: SysError,
    },
    #[error("vchan with domain {peer} port {port}: xenstore")]
    Xs {
        peer: DomId,
        port: u32,
        #[source]
        source: XsError,
    },
    #[error("vchan with domain {peer} port {port}: {source}")]
    Layout {
        peer: DomId,
        port: u32,
        #[source]
        source: LayoutError,
    },
    #[error("vchan with domain {peer} port {port}: {source}")]
    Ring {
        peer: DomId,
        port: u32,
        #[source]
        source: RingError,
    },
    #[error("vchan with domain {peer} port {port}: advertisement {path}: {reason}")]
    BadAdvert {
        peer: DomId,
        port: u32,
        path: String,
        reason: &'static str,
    },
    #[error("vchan with domain {peer} port {port}: the peer is gone")]
    PeerGone { peer: DomId, port: u32 },
    #[error("vchan with domain {peer} port {port}: {what} took over {timeout:?}")]
    Timeout {
        peer: DomId,
        port: u32,
        what: &'static str,
        timeout: Duration,
    },
}

impl VchanError {
    /// The peer closed or died (as opposed to a local fault).
    pub fn is_peer_gone(&self) -> bool {
        matches!(self, VchanError::PeerGone { .. })
    }
}

/// The server's advertisement directory, relative to its own xenstore
/// directory.
pub fn advert_path(client: DomId, port: u32) -> String {
    format!("data/vchan/{client}/{port}")
}

/// Where a client finds the server's advertisement.
pub fn client_advert_path(server: DomId, client: DomId, port: u32) -> String {
    format!("/local/domain/{server}/data/vchan/{client}/{port}")
}

/// What backs one region of the connection: our shared pages, or the
/// peer's pages mapped here.
#[derive(Debug)]
enum Backing {
    Shared(gntalloc::Shared),
    Mapped(gntdev::Mapped),
}

impl Backing {
    fn mapping(&self) -> &Mapping {
        match self {
            Backing::Shared(s) => &s.mapping,
            Backing::Mapped(m) => m.mapping(),
        }
    }

    fn view(&self) -> SharedMem {
        let m = self.mapping();
        // SAFETY: the mapping is page-aligned and `len` bytes long; it
        // lives in the same `Vchan` as every view made of it, and the
        // `Vchan` drops its endpoint (the views) before its backings. The
        // memory is only reached through these views and by the peer.
        unsafe { SharedMem::new(m.as_ptr(), m.len()) }
    }
}

/// What a waiting call waits for.
#[derive(Debug, Clone, Copy)]
enum Want {
    Data,
    Space,
    Connection,
}

impl Want {
    fn what(self) -> &'static str {
        match self {
            Want::Data => "a read",
            Want::Space => "a write",
            Want::Connection => "the client's connection",
        }
    }
}

/// Connection state as the server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No client yet.
    Waiting,
    Connected,
    Gone,
}

/// One end of a vchan.
#[derive(Debug)]
pub struct Vchan {
    // Field order is drop order: the endpoint's views go before the
    // memory they point into.
    ep: Endpoint,
    /// Held only to keep the memory mapped for the endpoint's life.
    _backings: Vec<Backing>,
    evtchn: EventChannel,
    privcmd: Option<Privcmd>,
    peer: DomId,
    port: u32,
    /// The server's advertisement, until it is removed.
    advert: Option<String>,
    last_liveness: Instant,
    gone: bool,
}

impl Vchan {
    /// Offers a vchan to `client` on `port`: rings of at least `read_min`
    /// bytes (client to server) and `write_min` (server to client), and
    /// the advertisement in our xenstore directory. Returns at once; the
    /// client connects later ([`Vchan::state`]).
    pub fn server(
        xs: &mut Xs,
        own: DomId,
        client: DomId,
        port: u32,
        read_min: usize,
        write_min: usize,
    ) -> Result<Vchan, VchanError> {
        let sys = |source| VchanError::Sys {
            peer: client,
            port,
            source,
        };
        let orders =
            Orders::for_server(read_min, write_min).map_err(|source| VchanError::Layout {
                peer: client,
                port,
                source,
            })?;
        let evtchn = EventChannel::bind_unbound(client).map_err(sys)?;
        // If we die, the kernel clears our live byte and signals the
        // client.
        let page = gntalloc::share(
            client,
            1,
            Some(UnmapNotify {
                offset: layout::SRV_LIVE,
                port: evtchn.port(),
            }),
        )
        .map_err(sys)?;
        let page_ref = page.refs[0];
        let page = Backing::Shared(page);
        let page_view = page.view();
        let mut backings = vec![page];
        let mut grants = Vec::new();
        let mut ring = |order: u8| -> Result<SharedMem, VchanError> {
            Ok(match layout::placement(order) {
                Placement::InPage(offset) => page_view.slice(offset, 1 << order),
                Placement::Pages(n) => {
                    let shared = gntalloc::share(client, n, None).map_err(sys)?;
                    grants.extend_from_slice(&shared.refs);
                    let b = Backing::Shared(shared);
                    let v = b.view();
                    backings.push(b);
                    v
                }
            })
        };
        // The left ring's grants come first in the list, then the right's.
        let read = ring(orders.left)?;
        let write = ring(orders.right)?;
        let ep = Endpoint::new_server(page_view, orders, read, write);
        ep.write_grants(&grants);
        let path = advert_path(client, port);
        let xs_err = |source| VchanError::Xs {
            peer: client,
            port,
            source,
        };
        let perms = [Perm::none(u32::from(own)), Perm::read(u32::from(client))];
        loop {
            let mut tx = xs.transaction().map_err(xs_err)?;
            for (key, value) in [
                ("ring-ref", page_ref.to_string()),
                ("event-channel", evtchn.port().to_string()),
            ] {
                let p = format!("{path}/{key}");
                tx.write(&p, value.as_bytes()).map_err(xs_err)?;
                tx.set_perms(&p, &perms).map_err(xs_err)?;
            }
            if tx.commit().map_err(xs_err)? {
                break;
            }
        }
        Ok(Vchan {
            ep,
            _backings: backings,
            evtchn,
            privcmd: Privcmd::open().ok(),
            peer: client,
            port,
            advert: Some(path),
            last_liveness: Instant::now(),
            gone: false,
        })
    }

    /// Connects to `server`'s vchan on `port`, waiting up to `timeout` for
    /// its advertisement.
    pub fn client(
        xs: &mut Xs,
        own: DomId,
        server: DomId,
        port: u32,
        timeout: Duration,
    ) -> Result<Vchan, VchanError> {
        let peer = server;
        let sys = |source| VchanError::Sys { peer, port, source };
        let base = client_advert_path(server, own, port);
        let (page_ref, remote_port) = wait_advert(xs, &base, peer, port, timeout)?;
        let evtchn = EventChannel::bind_interdomain(server, remote_port).map_err(sys)?;
        // If we die, the kernel clears our live byte and signals the
        // server.
        let page = gntdev::map(
            server,
            &[page_ref],
            true,
            Some(UnmapNotify {
                offset: layout::CLI_LIVE,
                port: evtchn.port(),
            }),
        )
        .map_err(sys)?;
        let page = Backing::Mapped(page);
        let page_view = page.view();
        let (left, right) = Endpoint::read_orders(&page_view);
        let orders = Orders::validate(left, right).map_err(|source| VchanError::Layout {
            peer,
            port,
            source,
        })?;
        let grants = Endpoint::read_grants(&page_view, orders.grant_count());
        let (left_refs, right_refs) = grants.split_at(orders.left_pages());
        let mut backings = vec![page];
        let mut ring = |order: u8, refs: &[u32], writable| -> Result<SharedMem, VchanError> {
            Ok(match layout::placement(order) {
                Placement::InPage(offset) => page_view.slice(offset, 1 << order),
                Placement::Pages(_) => {
                    let m = gntdev::map(server, refs, writable, None).map_err(sys)?;
                    let b = Backing::Mapped(m);
                    let v = b.view();
                    backings.push(b);
                    v
                }
            })
        };
        // We write the left ring and only read the right one; it is mapped
        // read-only, as libxenvchan does.
        let write = ring(orders.left, left_refs, true)?;
        let read = ring(orders.right, right_refs, false)?;
        let ep = Endpoint::new_client(page_view, read, write);
        evtchn.notify().map_err(sys)?;
        Ok(Vchan {
            ep,
            _backings: backings,
            evtchn,
            privcmd: Privcmd::open().ok(),
            peer,
            port,
            advert: None,
            last_liveness: Instant::now(),
            gone: false,
        })
    }

    pub fn peer(&self) -> DomId {
        self.peer
    }

    pub fn port(&self) -> u32 {
        self.port
    }

    /// The event channel's fd, to poll with others; when it is readable
    /// call [`Vchan::handle_event`].
    pub fn event_fd(&self) -> BorrowedFd<'_> {
        self.evtchn.as_fd()
    }

    /// Consumes a pending event. Afterwards try reading and writing again.
    pub fn handle_event(&mut self) -> Result<(), VchanError> {
        self.evtchn.drain().map_err(|source| self.sys(source))?;
        self.settle();
        Ok(())
    }

    /// Where the connection stands. A server whose client has connected
    /// removes its advertisement here.
    pub fn state(&mut self) -> State {
        self.settle();
        if self.gone {
            return State::Gone;
        }
        match self.ep.peer_state() {
            PeerState::Waiting => State::Waiting,
            PeerState::Connected => State::Connected,
            PeerState::Gone => State::Gone,
        }
    }

    fn settle(&mut self) {
        if self.advert.is_some() && self.ep.peer_state() != PeerState::Waiting {
            self.remove_advert();
        }
    }

    /// Checks that the peer's domain exists, at most once per
    /// [`LIVENESS_INTERVAL`] unless `force` is set. False once it is gone.
    pub fn check_alive(&mut self, force: bool) -> bool {
        if self.gone {
            return false;
        }
        if !force && self.last_liveness.elapsed() < LIVENESS_INTERVAL {
            return true;
        }
        self.last_liveness = Instant::now();
        if let Some(p) = &self.privcmd {
            // A failing check says nothing about the peer; only a clear
            // "no such domain" does.
            if let Ok(false) = p.domain_exists(self.peer) {
                self.gone = true;
                self.ep.mark_peer_gone();
            }
        }
        !self.gone
    }

    /// Asks the peer to signal its next write and its next read, for a
    /// caller about to wait on [`Vchan::event_fd`] (look at the rings once
    /// more after this, before sleeping).
    pub fn request_notifications(&self) {
        self.ep.request_all_notifications();
    }

    /// Bytes ready to read now.
    pub fn data_ready(&self) -> Result<usize, VchanError> {
        self.ep.data_ready(0).map_err(|e| self.ring(e))
    }

    /// Free space in the ring we write.
    pub fn buffer_space(&self) -> Result<usize, VchanError> {
        self.ep.buffer_space(0).map_err(|e| self.ring(e))
    }

    /// The size of the ring we write.
    pub fn write_capacity(&self) -> usize {
        self.ep.write_capacity()
    }

    /// Reads what is ready, without waiting. `Ok(0)`: nothing yet. Once
    /// the peer is gone and the ring is empty: [`VchanError::PeerGone`].
    pub fn try_read(&mut self, buf: &mut [u8]) -> Result<usize, VchanError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.recv(buf)?;
        if n == 0 && self.peer_gone() {
            // The peer may have written its last bytes and closed between
            // our look at the ring and our look at its live byte: look at
            // the ring once more before calling it gone.
            return match self.recv(buf)? {
                0 => Err(self.gone_error()),
                n => Ok(n),
            };
        }
        Ok(n)
    }

    /// Writes what fits, without waiting. `Ok(0)`: the ring is full.
    pub fn try_write(&mut self, buf: &[u8]) -> Result<usize, VchanError> {
        if self.peer_gone() {
            return Err(self.gone_error());
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let sent = self.ep.send(buf);
        self.settle_transfer(sent)
    }

    /// Takes what the ring holds, signalling the peer if it asked.
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, VchanError> {
        let got = self.ep.recv(buf);
        self.settle_transfer(got)
    }

    /// After a ring transfer: a corrupt index ends the connection, and a
    /// peer that asked to be told of it gets its signal.
    fn settle_transfer(
        &mut self,
        r: Result<(usize, bool), RingError>,
    ) -> Result<usize, VchanError> {
        let (n, notify) = r.map_err(|e| self.corrupt(e))?;
        if notify {
            self.evtchn.notify().map_err(|source| self.sys(source))?;
        }
        Ok(n)
    }

    /// Reads at least one byte, waiting up to `timeout`.
    pub fn read(&mut self, buf: &mut [u8], timeout: Duration) -> Result<usize, VchanError> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.try_read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            self.wait(deadline, timeout, Want::Data)?;
        }
    }

    /// Reads exactly `buf.len()` bytes, waiting up to `timeout` in all.
    pub fn read_exact(&mut self, buf: &mut [u8], timeout: Duration) -> Result<(), VchanError> {
        let deadline = Instant::now() + timeout;
        let mut done = 0;
        while done < buf.len() {
            let n = self.try_read(&mut buf[done..])?;
            done += n;
            if n == 0 {
                self.wait(deadline, timeout, Want::Data)?;
            }
        }
        Ok(())
    }

    /// Writes all of `buf`, waiting for ring space up to `timeout` in all.
    pub fn write_all(&mut self, buf: &[u8], timeout: Duration) -> Result<(), VchanError> {
        let deadline = Instant::now() + timeout;
        let mut done = 0;
        while done < buf.len() {
            let n = self.try_write(&buf[done..])?;
            done += n;
            if n == 0 {
                self.wait(deadline, timeout, Want::Space)?;
            }
        }
        Ok(())
    }

    /// Waits for the client to connect (server side).
    pub fn wait_connected(&mut self, timeout: Duration) -> Result<(), VchanError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.state() {
                State::Connected => return Ok(()),
                State::Gone => return Err(self.gone_error()),
                State::Waiting => self.wait(deadline, timeout, Want::Connection)?,
            }
        }
    }

    /// Sleeps until an event, the deadline, or the next liveness check.
    fn wait(&mut self, deadline: Instant, timeout: Duration, want: Want) -> Result<(), VchanError> {
        // Ask for a signal on the peer's next read and write, then look
        // once more: a change that raced the request is not missed.
        self.ep.request_all_notifications();
        let ready = match want {
            Want::Data => self.ep.data_ready(0).map_err(|e| self.ring(e))? > 0,
            Want::Space => self.ep.buffer_space(0).map_err(|e| self.ring(e))? > 0,
            Want::Connection => self.ep.peer_state() != PeerState::Waiting,
        };
        if ready {
            return Ok(());
        }
        if !self.check_alive(false) {
            return Err(self.gone_error());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(VchanError::Timeout {
                peer: self.peer,
                port: self.port,
                what: want.what(),
                timeout,
            });
        }
        let slice = (deadline - now).min(LIVENESS_INTERVAL);
        self.evtchn.wait(slice).map_err(|source| self.sys(source))?;
        self.settle();
        Ok(())
    }

    fn peer_gone(&mut self) -> bool {
        if self.gone {
            return true;
        }
        self.settle();
        self.ep.peer_state() == PeerState::Gone
    }

    /// Closes our end: the peer sees it in the page and gets a signal.
    pub fn close(&mut self) {
        self.ep.close();
        let _ = self.evtchn.notify();
        self.remove_advert();
    }

    fn remove_advert(&mut self) {
        let Some(path) = self.advert.take() else {
            return;
        };
        // libvchan does the same with a connection of its own; failing to
        // remove it leaves a stale entry that no client can use (the port
        // is bound already), so it is logged by the caller's daemon, not
        // fatal here.
        if let Ok(mut xs) = Xs::open() {
            let _ = xs.rm(&path);
            // The per-client directory goes too once it is empty.
            if let Some((parent, _)) = path.rsplit_once('/') {
                if xs.directory(parent).is_ok_and(|d| d.is_empty()) {
                    let _ = xs.rm(parent);
                }
            }
        }
    }

    fn sys(&self, source: SysError) -> VchanError {
        VchanError::Sys {
            peer: self.peer,
            port: self.port,
            source,
        }
    }

    fn ring(&self, source: RingError) -> VchanError {
        VchanError::Ring {
            peer: self.peer,
            port: self.port,
            source,
        }
    }

    /// A corrupt index ends the connection for good.
    fn corrupt(&mut self, source: RingError) -> VchanError {
        self.gone = true;
        self.ep.close();
        let _ = self.evtchn.notify();
        self.ring(source)
    }

    fn gone_error(&self) -> VchanError {
        VchanError::PeerGone {
            peer: self.peer,
            port: self.port,
        }
    }
}

impl Drop for Vchan {
    fn drop(&mut self) {
        self.close();
    }
}

/// Waits for a server's advertisement and parses it.
fn wait_advert(
    xs: &mut Xs,
    base: &str,
    peer: DomId,
    port: u32,
    timeout: Duration,
) -> Result<(u32, u32), VchanError> {
    let xs_err = |source| VchanError::Xs { peer, port, source };
    let token = format!("vchan-{peer}-{port}");
    // The key itself, not the directory: xenstored only reports changes a
    // watcher may read, and the directories above the offer are the
    // server's own (libvchan-xen watches the same key for this reason).
    let watched = format!("{base}/event-channel");
    xs.watch(&watched, &token).map_err(xs_err)?;
    let deadline = Instant::now() + timeout;
    // Until the offer exists xenstored answers EACCES rather than ENOENT
    // (the directory above it is not ours to look into): both mean "not
    // yet".
    let read = |xs: &mut Xs, key: &str| match xs.read(&format!("{base}/{key}")) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() || e.errno() == Some("EACCES") => Ok(None),
        Err(e) => Err(xs_err(e)),
    };
    let result = loop {
        let ring = read(xs, "ring-ref")?;
        let evt = read(xs, "event-channel")?;
        if let (Some(r), Some(e)) = (ring, evt) {
            break Ok((
                parse_number(&r, base, "ring-ref", peer, port)?,
                parse_number(&e, base, "event-channel", peer, port)?,
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(VchanError::Timeout {
                peer,
                port,
                what: "the server's advertisement",
                timeout,
            });
        }
        // Any event under the path means look again.
        while xs
            .next_event(left)
            .map_err(xs_err)?
            .is_some_and(|e| e.token != token)
        {}
    };
    // The watch is only ours; failing to remove it costs nothing but a
    // stale event later, which the loop above skips by token.
    let _ = xs.unwatch(&watched, &token);
    result
}

/// A decimal `u32` the server wrote (hostile: no sign, no spaces).
fn parse_number(
    raw: &[u8],
    base: &str,
    key: &str,
    peer: DomId,
    port: u32,
) -> Result<u32, VchanError> {
    let bad = |reason| VchanError::BadAdvert {
        peer,
        port,
        path: format!("{base}/{key}"),
        reason,
    };
    if raw.is_empty() || raw.len() > 10 || !raw.iter().all(u8::is_ascii_digit) {
        return Err(bad("not a decimal number"));
    }
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(bad("out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advert_paths_are_libvchans() {
        assert_eq!(advert_path(5, 111), "data/vchan/5/111");
        assert_eq!(
            client_advert_path(0, 5, 111),
            "/local/domain/0/data/vchan/5/111"
        );
    }

    #[test]
    fn advertised_numbers_are_checked() {
        assert_eq!(parse_number(b"123", "b", "k", 1, 2).unwrap(), 123);
        for bad in [
            &b""[..],
            b"-1",
            b" 1",
            b"12345678901",
            b"4294967296",
            b"1\n",
        ] {
            assert!(parse_number(bad, "b", "k", 1, 2).is_err(), "{bad:?}");
        }
    }
}
