//! A connected vchan: setup of either end (devices, shared pages, the
//! xenstore advertisement) and blocking I/O over the ring protocol of
//! [`crate::ring`].
//!
//! Setup follows libxenvchan and Qubes' libvchan-xen so a C peer sees what
//! it expects:
//! - the server binds an unbound event channel for the peer, shares the
//!   page (with an unmap notification that clears `srv_live` and signals
//!   the channel if we die) and any ring pages, and writes `ring-ref` and
//!   `event-channel` under `data/vchan/<peer>/<port>` in its own xenstore
//!   directory, readable by the peer only;
//! - the client waits for those keys in `/local/domain/<server>/data/vchan/
//!   <own domid>/<port>`, binds the channel, maps the page (its own unmap
//!   notification clears `cli_live`), checks the orders and grant list the
//!   server wrote, maps the rings, and signals the server;
//! - the server removes the advertisement once the client is connected.
//!
//! A peer that dies sends nothing: Xen closes its end of the event channel
//! and ours turns "unbound". Every wait here is bounded by
//! [`LIVENESS_INTERVAL`], after which the channel's state (or, while
//! waiting for a client, whether the peer domain still exists) is checked
//! through the status hypercall, so a dead peer is an error, not a hang.

use std::io;
use std::time::{Duration, Instant};

use crate::layout::{self, Orders, Placement};
use crate::ring::{Endpoint, PeerState, RingError, SharedMem};
use crate::sys::evtchn::EventChannel;
use crate::sys::gntalloc::{self, UnmapNotify};
use crate::sys::gntdev;
use crate::sys::privcmd::{PortState, Privcmd};
use crate::sys::{DomId, SysError};
use crate::xs::{self, Advert};

/// How long a wait goes before the peer's liveness is checked again.
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
    #[error("vchan with domain {peer} port {port}: xenstore: {source}")]
    Xenstore {
        peer: DomId,
        port: u32,
        #[source]
        source: xs::XsError,
    },
    #[error("vchan with domain {peer} port {port}: the server's shared page: {source}")]
    Layout {
        peer: DomId,
        port: u32,
        #[source]
        source: layout::LayoutError,
    },
    #[error("vchan with domain {peer} port {port}: {source}")]
    Ring {
        peer: DomId,
        port: u32,
        #[source]
        source: RingError,
    },
    #[error("vchan with domain {peer} port {port}: the peer is gone")]
    PeerGone { peer: DomId, port: u32 },
    #[error("vchan with domain {peer} port {port}: no peer within {waited:?}")]
    Timeout {
        peer: DomId,
        port: u32,
        waited: Duration,
    },
    #[error("vchan port {port}: domain {peer} is this domain; loopback vchans do not exist")]
    Loopback { peer: DomId, port: u32 },
}

impl From<VchanError> for io::Error {
    fn from(e: VchanError) -> io::Error {
        let kind = match &e {
            VchanError::PeerGone { .. } => io::ErrorKind::BrokenPipe,
            VchanError::Timeout { .. } => io::ErrorKind::TimedOut,
            VchanError::Ring { .. } | VchanError::Layout { .. } => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Whoever owns the memory the endpoint points into.
#[derive(Debug)]
enum Memory {
    Server {
        _page: gntalloc::Shared,
        _rings: Vec<gntalloc::Shared>,
    },
    Client {
        _page: gntdev::Mapped,
        _rings: Vec<gntdev::Mapped>,
    },
}

/// One end of a vchan.
#[derive(Debug)]
pub struct Vchan {
    // Field order matters on drop: the endpoint's views go before the
    // memory they point into.
    endpoint: Endpoint,
    evtchn: EventChannel,
    privcmd: Privcmd,
    _memory: Memory,
    peer: DomId,
    port: u32,
    /// The server's advertisement, until the client is connected.
    advert: Option<Advert>,
}

fn view(m: &crate::sys::Mapping) -> SharedMem {
    // SAFETY: the mapping is owned by the same `Vchan` as every view made
    // from it and outlives them (field order); it is page aligned.
    unsafe { SharedMem::new(m.as_ptr(), m.len()) }
}

impl Vchan {
    fn sys(peer: DomId, port: u32) -> impl Fn(SysError) -> VchanError {
        move |source| VchanError::Sys { peer, port, source }
    }

    fn xs_err(peer: DomId, port: u32) -> impl Fn(xs::XsError) -> VchanError {
        move |source| VchanError::Xenstore { peer, port, source }
    }

    /// The server end for `peer` on `port`, with rings of at least
    /// `read_min` bytes (peer to us) and `write_min` bytes (us to peer).
    /// Returns once the advertisement is written; [`Vchan::wait_connected`]
    /// waits for the client.
    pub fn server(
        peer: DomId,
        port: u32,
        read_min: usize,
        write_min: usize,
    ) -> Result<Vchan, VchanError> {
        let sys = Self::sys(peer, port);
        let orders = Orders::for_server(read_min, write_min).map_err(|source| {
            VchanError::Layout { peer, port, source }
        })?;
        let privcmd = Privcmd::open().map_err(&sys)?;
        let evtchn = EventChannel::bind_unbound(peer).map_err(&sys)?;
        let page = gntalloc::share(
            peer,
            1,
            Some(UnmapNotify {
                offset: layout::SRV_LIVE,
                port: evtchn.port(),
            }),
        )
        .map_err(&sys)?;
        let page_view = view(&page.mapping);
        let mut rings = Vec::new();
        let mut refs = Vec::new();
        let mut ring_view = |order: u8| -> Result<SharedMem, VchanError> {
            Ok(match layout::placement(order) {
                Placement::InPage(off) => page_view.slice(off, 1 << order),
                Placement::Pages(n) => {
                    let shared = gntalloc::share(peer, n, None).map_err(&sys)?;
                    let v = view(&shared.mapping);
                    refs.extend_from_slice(&shared.refs);
                    rings.push(shared);
                    v
                }
            })
        };
        // Grants in the page: the left ring's first, then the right's.
        let left = ring_view(orders.left)?;
        let right = ring_view(orders.right)?;
        let endpoint = Endpoint::new_server(page_view, orders, left, right);
        endpoint.write_grants(&refs);
        let ring_ref = page.refs[0];
        let advert = xs::advertise(peer, port, ring_ref, evtchn.port())
            .map_err(Self::xs_err(peer, port))?;
        Ok(Vchan {
            endpoint,
            evtchn,
            privcmd,
            _memory: Memory::Server {
                _page: page,
                _rings: rings,
            },
            peer,
            port,
            advert: Some(advert),
        })
    }

    /// Waits until the client has connected (server end), at most
    /// `timeout` (`None`: as long as the peer domain exists).
    pub fn wait_connected(&mut self, timeout: Option<Duration>) -> Result<(), VchanError> {
        let start = Instant::now();
        while !self.poll_connected()? {
            if let Some(t) = timeout {
                if start.elapsed() >= t {
                    return Err(VchanError::Timeout {
                        peer: self.peer,
                        port: self.port,
                        waited: t,
                    });
                }
            }
            self.wait()?;
        }
        Ok(())
    }

    /// The client end to `peer`'s server on `port`: waits up to `timeout`
    /// for the server's advertisement.
    pub fn client(peer: DomId, port: u32, timeout: Duration) -> Result<Vchan, VchanError> {
        let sys = Self::sys(peer, port);
        let privcmd = Privcmd::open().map_err(&sys)?;
        let xs_err = Self::xs_err(peer, port);
        let own = xs::own_domid().map_err(&xs_err)?;
        if own == peer {
            return Err(VchanError::Loopback { peer, port });
        }
        let mut watch = xs::AdvertWatch::new(peer, own, port).map_err(&xs_err)?;
        let start = Instant::now();
        let (ring_ref, remote_port) = loop {
            if let Some(found) = watch.read().map_err(&xs_err)? {
                break found;
            }
            if start.elapsed() >= timeout {
                return Err(VchanError::Timeout {
                    peer,
                    port,
                    waited: timeout,
                });
            }
            let changed = watch.wait(LIVENESS_INTERVAL).map_err(&xs_err)?;
            if !changed && !privcmd.domain_exists(peer).map_err(&sys)? {
                return Err(VchanError::PeerGone { peer, port });
            }
        };
        let evtchn = EventChannel::bind_interdomain(peer, remote_port).map_err(&sys)?;
        let page = gntdev::map(
            peer,
            &[ring_ref],
            true,
            Some(UnmapNotify {
                offset: layout::CLI_LIVE,
                port: evtchn.port(),
            }),
        )
        .map_err(&sys)?;
        let page_view = view(page.mapping());
        let (l, r) = Endpoint::read_orders(&page_view);
        let orders = Orders::validate(l, r)
            .map_err(|source| VchanError::Layout { peer, port, source })?;
        let grants = Endpoint::read_grants(&page_view, orders.grant_count());
        let (left_refs, right_refs) = grants.split_at(orders.left_pages());
        let mut rings = Vec::new();
        let mut ring_view = |order: u8, refs: &[u32], writable: bool| {
            Ok::<_, VchanError>(match layout::placement(order) {
                Placement::InPage(off) => page_view.slice(off, 1 << order),
                Placement::Pages(_) => {
                    let m = gntdev::map(peer, refs, writable, None).map_err(&sys)?;
                    let v = view(m.mapping());
                    rings.push(m);
                    v
                }
            })
        };
        // We write the left ring and only read the right one.
        let write = ring_view(orders.left, left_refs, true)?;
        let read = ring_view(orders.right, right_refs, false)?;
        let endpoint = Endpoint::new_client(page_view, read, write);
        evtchn.notify().map_err(&sys)?;
        Ok(Vchan {
            endpoint,
            evtchn,
            privcmd,
            _memory: Memory::Client {
                _page: page,
                _rings: rings,
            },
            peer,
            port,
            advert: None,
        })
    }

    pub fn peer(&self) -> DomId {
        self.peer
    }

    pub fn port(&self) -> u32 {
        self.port
    }

    /// The event channel's descriptor, readable when the peer signalled:
    /// for callers that wait on several vchans in one poll. After it
    /// fires, call [`Vchan::handle_event`].
    pub fn event_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.evtchn.as_fd()
    }

    /// Consumes a pending event (non-blocking) and re-arms the channel.
    pub fn handle_event(&self) -> Result<(), VchanError> {
        self.evtchn
            .drain()
            .map(|_| ())
            .map_err(Self::sys(self.peer, self.port))
    }

    fn ring_err(&self, source: RingError) -> VchanError {
        // A corrupt ring is the end of the connection.
        self.endpoint.mark_peer_gone();
        VchanError::Ring {
            peer: self.peer,
            port: self.port,
            source,
        }
    }

    fn notify(&self) -> Result<(), VchanError> {
        self.evtchn
            .notify()
            .map_err(Self::sys(self.peer, self.port))
    }

    /// Bytes ready to read now.
    pub fn data_ready(&self) -> Result<usize, VchanError> {
        self.endpoint.data_ready(usize::MAX).map_err(|e| self.ring_err(e))
    }

    /// Free space to write now.
    pub fn buffer_space(&self) -> Result<usize, VchanError> {
        self.endpoint
            .buffer_space(usize::MAX)
            .map_err(|e| self.ring_err(e))
    }

    /// True while the peer is connected (or, on the server, not yet).
    pub fn is_open(&self) -> bool {
        self.endpoint.peer_state() != PeerState::Gone
    }

    /// Reads what is ready without waiting: `Ok(None)` if nothing is and
    /// the peer is still there, `Ok(Some(0))` at the end of the stream.
    pub fn try_read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, VchanError> {
        let (n, wake) = self.endpoint.recv(buf).map_err(|e| self.ring_err(e))?;
        if wake {
            self.notify()?;
        }
        if n > 0 || buf.is_empty() {
            return Ok(Some(n));
        }
        // Data the peer wrote before it closed is read first.
        match self.endpoint.peer_state() {
            PeerState::Gone => Ok(Some(0)),
            _ => Ok(None),
        }
    }

    /// Writes what fits without waiting: `Ok(0)` if the ring is full.
    pub fn try_write(&mut self, buf: &[u8]) -> Result<usize, VchanError> {
        if self.endpoint.peer_state() == PeerState::Gone {
            return Err(VchanError::PeerGone {
                peer: self.peer,
                port: self.port,
            });
        }
        let (n, wake) = self.endpoint.send(buf).map_err(|e| self.ring_err(e))?;
        if wake {
            self.notify()?;
        }
        Ok(n)
    }

    /// Waits for the peer's next signal, checking that it still exists
    /// every [`LIVENESS_INTERVAL`].
    fn wait(&mut self) -> Result<(), VchanError> {
        let fired = self
            .evtchn
            .wait(LIVENESS_INTERVAL)
            .map_err(Self::sys(self.peer, self.port))?;
        if !fired {
            self.check_alive()?;
        }
        Ok(())
    }

    /// For poll loops, after a quiet [`LIVENESS_INTERVAL`]: an error if the
    /// peer is gone (its domain died, so Xen closed its end of the event
    /// channel, or it never connected and its domain no longer exists).
    pub fn check_alive(&mut self) -> Result<(), VchanError> {
        let gone = VchanError::PeerGone {
            peer: self.peer,
            port: self.port,
        };
        match self.endpoint.peer_state() {
            PeerState::Gone => return Err(gone),
            PeerState::Waiting => {
                let exists = self
                    .privcmd
                    .domain_exists(self.peer)
                    .map_err(Self::sys(self.peer, self.port))?;
                return if exists { Ok(()) } else { Err(gone) };
            }
            PeerState::Connected => {}
        }
        let st = self
            .privcmd
            .port_state(self.evtchn.port())
            .map_err(Self::sys(self.peer, self.port))?;
        if st != PortState::Interdomain {
            self.endpoint.mark_peer_gone();
            return Err(gone);
        }
        Ok(())
    }

    /// Server end, for poll loops: true once the client is connected (the
    /// advertisement is then taken back), false while it is not yet.
    pub fn poll_connected(&mut self) -> Result<bool, VchanError> {
        match self.endpoint.peer_state() {
            PeerState::Waiting => Ok(false),
            PeerState::Gone => Err(VchanError::PeerGone {
                peer: self.peer,
                port: self.port,
            }),
            PeerState::Connected => {
                if let Some(a) = self.advert.take() {
                    a.remove().map_err(Self::xs_err(self.peer, self.port))?;
                }
                Ok(true)
            }
        }
    }

    /// Reads at least one byte, waiting for it; 0 at the end of the stream.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, VchanError> {
        loop {
            if let Some(n) = self.try_read(buf)? {
                return Ok(n);
            }
            self.wait()?;
        }
    }

    /// Reads exactly `buf.len()` bytes; a stream that ends first is
    /// [`VchanError::PeerGone`].
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), VchanError> {
        let mut at = 0;
        while at < buf.len() {
            match self.read(&mut buf[at..])? {
                0 => {
                    return Err(VchanError::PeerGone {
                        peer: self.peer,
                        port: self.port,
                    })
                }
                n => at += n,
            }
        }
        Ok(())
    }

    /// Writes all of `buf`, waiting for space as the peer reads.
    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), VchanError> {
        let mut at = 0;
        while at < buf.len() {
            match self.try_write(&buf[at..])? {
                0 => self.wait()?,
                n => at += n,
            }
        }
        Ok(())
    }
}

impl Drop for Vchan {
    fn drop(&mut self) {
        self.endpoint.close();
        // The peer learns of the close from the live byte; the signal only
        // wakes it sooner, and the unmap notification signals again.
        let _ = self.evtchn.notify();
        if let Some(a) = self.advert.take() {
            // A server that never saw its client: take the keys back so no
            // client finds a dead ring. Nothing more can be done if
            // xenstore refuses.
            let _ = a.remove();
        }
    }
}

impl io::Read for Vchan {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Vchan::read(self, buf).map_err(io::Error::from)
    }
}

impl io::Write for Vchan {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.try_write(buf)? {
                0 if !buf.is_empty() => self.wait()?,
                n => return Ok(n),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
