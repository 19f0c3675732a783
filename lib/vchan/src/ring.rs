//! One end of a vchan over its shared memory: the ring arithmetic and the
//! notification bits of libxenvchan's `io.c`, without any device. The
//! executor ([`crate::Vchan`]) signals the event channel when a call here
//! says so, and waits on it when a call here made no progress.
//!
//! The peer can write any value into the shared page at any time, so:
//! - our own indices (the consumer index of the ring we read, the producer
//!   index of the ring we write) are kept here and only ever *written* to
//!   the page, never read back;
//! - the peer's indices are read once per call and checked: a peer that
//!   claims more data than its ring holds, or more free space than ours
//!   has, breaks the connection with [`RingError::Corrupt`];
//! - the ring orders are read once at setup ([`crate::layout::Orders::validate`]).

use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU8, Ordering};

use crate::layout::{self, NOTIFY_READ, NOTIFY_WRITE};

/// A region of memory shared with a peer (another domain, or in tests
/// another thread). It does not own the memory.
#[derive(Debug, Clone, Copy)]
pub struct SharedMem {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the memory is accessed only through atomics and byte copies, the
// same way whichever thread holds the view.
unsafe impl Send for SharedMem {}

impl SharedMem {
    /// # Safety
    ///
    /// `ptr` must be valid for reads and writes of `len` bytes, aligned to 4,
    /// for as long as this view or a copy of it is used, and the memory must
    /// only be accessed through such views (or by the peer).
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> SharedMem {
        debug_assert_eq!(ptr.as_ptr() as usize % 4, 0);
        SharedMem { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The part `[offset, offset + len)`.
    pub fn slice(&self, offset: usize, len: usize) -> SharedMem {
        assert!(offset.checked_add(len).is_some_and(|e| e <= self.len));
        SharedMem {
            // SAFETY: in bounds, checked above.
            ptr: unsafe { self.ptr.add(offset) },
            len,
        }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.len);
        // SAFETY: in bounds and aligned (checked), valid for the view's
        // life (constructor contract); shared memory is only ever accessed
        // atomically or as raw bytes.
        unsafe { AtomicU32::from_ptr(self.ptr.add(offset).as_ptr().cast()) }
    }

    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        assert!(offset.is_multiple_of(2) && offset + 2 <= self.len);
        // SAFETY: as in `u32_at`.
        unsafe { AtomicU16::from_ptr(self.ptr.add(offset).as_ptr().cast()) }
    }

    fn u8_at(&self, offset: usize) -> &AtomicU8 {
        assert!(offset < self.len);
        // SAFETY: as in `u32_at`.
        unsafe { AtomicU8::from_ptr(self.ptr.add(offset).as_ptr()) }
    }

    pub fn load_u32(&self, offset: usize) -> u32 {
        self.u32_at(offset).load(Ordering::Acquire)
    }

    pub fn store_u32(&self, offset: usize, v: u32) {
        self.u32_at(offset).store(v, Ordering::Release)
    }

    pub fn load_u16(&self, offset: usize) -> u16 {
        self.u16_at(offset).load(Ordering::Acquire)
    }

    pub fn store_u16(&self, offset: usize, v: u16) {
        self.u16_at(offset).store(v, Ordering::Release)
    }

    pub fn load_u8(&self, offset: usize) -> u8 {
        self.u8_at(offset).load(Ordering::Acquire)
    }

    pub fn store_u8(&self, offset: usize, v: u8) {
        self.u8_at(offset).store(v, Ordering::Release)
    }

    fn or_u8(&self, offset: usize, bits: u8) {
        self.u8_at(offset).fetch_or(bits, Ordering::SeqCst);
    }

    fn take_u8(&self, offset: usize, bits: u8) -> u8 {
        self.u8_at(offset).fetch_and(!bits, Ordering::SeqCst)
    }

    /// Copies out `dst.len()` bytes at `offset`.
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= self.len);
        // SAFETY: in bounds (checked); the source is shared memory whose
        // bytes the peer may change at any time, which can only give us
        // wrong bytes (the peer's own data), never touch our memory: it is
        // treated as untrusted input like a DMA buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.add(offset).as_ptr(),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }

    /// Copies `src` in at `offset`.
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        assert!(offset + src.len() <= self.len);
        // SAFETY: in bounds (checked); see `read_bytes`.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(offset).as_ptr(), src.len())
        }
    }

    /// Zeroes the whole region.
    pub(crate) fn zero(&self) {
        // SAFETY: the whole region is ours to write (constructor contract).
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), 0, self.len) }
    }
}

/// Which end of the vchan this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// What the peer's live byte says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// The client has not connected yet (server side only).
    Waiting,
    Connected,
    /// The peer closed its end, or its end was unmapped (it died).
    Gone,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The peer's index is impossible: it is broken or hostile.
    #[error(
        "the peer's {index} index is impossible: producer {prod}, consumer {cons}, ring of {size} bytes"
    )]
    Corrupt {
        index: &'static str,
        prod: u32,
        cons: u32,
        size: u32,
    },
}

/// One end's view of both rings and the control bytes.
#[derive(Debug)]
pub struct Endpoint {
    page: SharedMem,
    role: Role,
    read: SharedMem,
    write: SharedMem,
    /// Consumer index of the ring we read (ours).
    rd_cons: u32,
    /// Producer index of the ring we write (ours).
    wr_prod: u32,
}

/// Offsets of (our read ring's cons, its prod, our write ring's cons, its
/// prod) in the shared page.
fn index_offsets(role: Role) -> (usize, usize, usize, usize) {
    match role {
        // The server reads the left ring and writes the right one.
        Role::Server => (
            layout::LEFT_CONS,
            layout::LEFT_PROD,
            layout::RIGHT_CONS,
            layout::RIGHT_PROD,
        ),
        Role::Client => (
            layout::RIGHT_CONS,
            layout::RIGHT_PROD,
            layout::LEFT_CONS,
            layout::LEFT_PROD,
        ),
    }
}

impl Endpoint {
    /// The server's end over a page it has just shared (and so owns): the
    /// page is zeroed and its header written. `read` is the left ring,
    /// `write` the right one; their sizes must match `orders`. The grant
    /// list is written separately ([`Endpoint::write_grants`]).
    pub fn new_server(
        page: SharedMem,
        orders: layout::Orders,
        read: SharedMem,
        write: SharedMem,
    ) -> Endpoint {
        assert_eq!(page.len(), layout::PAGE_SIZE);
        assert_eq!(read.len(), 1usize << orders.left);
        assert_eq!(write.len(), 1usize << orders.right);
        page.zero();
        page.store_u16(layout::LEFT_ORDER, orders.left.into());
        page.store_u16(layout::RIGHT_ORDER, orders.right.into());
        page.store_u8(layout::CLI_LIVE, layout::LIVE_WAITING);
        page.store_u8(layout::SRV_LIVE, layout::LIVE_CONNECTED);
        // Tell us when the client writes.
        page.store_u8(layout::CLI_NOTIFY, NOTIFY_WRITE);
        Endpoint {
            page,
            role: Role::Server,
            read,
            write,
            rd_cons: 0,
            wr_prod: 0,
        }
    }

    /// Writes the grant references of the rings' own pages.
    pub fn write_grants(&self, refs: &[u32]) {
        assert!(layout::GRANTS + 4 * refs.len() <= layout::PAGE_SIZE);
        for (i, r) in refs.iter().enumerate() {
            self.page.store_u32(layout::GRANTS + 4 * i, *r);
        }
    }

    /// The client's end over a server's page it mapped; `read` is the right
    /// ring and `write` the left one, sized by the validated orders.
    /// Announces the client as connected.
    pub fn new_client(page: SharedMem, read: SharedMem, write: SharedMem) -> Endpoint {
        assert_eq!(page.len(), layout::PAGE_SIZE);
        let (rd_cons_off, _, _, wr_prod_off) = index_offsets(Role::Client);
        let e = Endpoint {
            page,
            role: Role::Client,
            read,
            write,
            // Whatever the server left there is our starting point; from
            // now on only we write these two.
            rd_cons: page.load_u32(rd_cons_off),
            wr_prod: page.load_u32(wr_prod_off),
        };
        page.store_u8(layout::CLI_LIVE, layout::LIVE_CONNECTED);
        page.store_u8(layout::SRV_NOTIFY, NOTIFY_WRITE);
        e
    }

    /// Reads the orders a server wrote, for a client about to map the rings.
    pub fn read_orders(page: &SharedMem) -> (u16, u16) {
        (
            page.load_u16(layout::LEFT_ORDER),
            page.load_u16(layout::RIGHT_ORDER),
        )
    }

    /// Reads `count` grant references from a server's page.
    pub fn read_grants(page: &SharedMem, count: usize) -> Vec<u32> {
        (0..count)
            .map(|i| page.load_u32(layout::GRANTS + 4 * i))
            .collect()
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// What the peer's live byte says. Any value but "connected" and
    /// "waiting" counts as gone.
    pub fn peer_state(&self) -> PeerState {
        let off = match self.role {
            Role::Server => layout::CLI_LIVE,
            Role::Client => layout::SRV_LIVE,
        };
        match self.page.load_u8(off) {
            layout::LIVE_CONNECTED => PeerState::Connected,
            layout::LIVE_WAITING if self.role == Role::Server => PeerState::Waiting,
            _ => PeerState::Gone,
        }
    }

    /// Marks our end closed; the caller then signals the peer.
    pub fn close(&self) {
        let off = match self.role {
            Role::Server => layout::SRV_LIVE,
            Role::Client => layout::CLI_LIVE,
        };
        self.page.store_u8(off, layout::LIVE_GONE);
    }

    /// The peer marks itself gone on a corrupt ring too, from our side.
    pub fn mark_peer_gone(&self) {
        let off = match self.role {
            Role::Server => layout::CLI_LIVE,
            Role::Client => layout::SRV_LIVE,
        };
        self.page.store_u8(off, layout::LIVE_GONE);
    }

    /// Asks the peer to signal us when it does `bit`.
    fn request_notify(&self, bit: u8) {
        let off = match self.role {
            Role::Server => layout::CLI_NOTIFY,
            Role::Client => layout::SRV_NOTIFY,
        };
        self.page.or_u8(off, bit);
        fence(Ordering::SeqCst);
    }

    /// True if the peer asked to be signalled for `bit` (and clears it).
    fn take_notify(&self, bit: u8) -> bool {
        fence(Ordering::SeqCst);
        let off = match self.role {
            Role::Server => layout::SRV_NOTIFY,
            Role::Client => layout::CLI_NOTIFY,
        };
        self.page.take_u8(off, bit) & bit != 0
    }

    fn raw_ready(&self) -> Result<u32, RingError> {
        let (_, prod_off, _, _) = index_offsets(self.role);
        let prod = self.page.load_u32(prod_off);
        let ready = prod.wrapping_sub(self.rd_cons);
        let size = ring_size(&self.read);
        if ready > size {
            return Err(RingError::Corrupt {
                index: "producer",
                prod,
                cons: self.rd_cons,
                size,
            });
        }
        Ok(ready)
    }

    fn raw_space(&self) -> Result<u32, RingError> {
        let (_, _, cons_off, _) = index_offsets(self.role);
        let cons = self.page.load_u32(cons_off);
        let used = self.wr_prod.wrapping_sub(cons);
        let size = ring_size(&self.write);
        if used > size {
            return Err(RingError::Corrupt {
                index: "consumer",
                prod: self.wr_prod,
                cons,
                size,
            });
        }
        Ok(size - used)
    }

    /// Bytes ready to read. When fewer than `want` are, asks the peer to
    /// signal the next write (and looks again, so a write that raced the
    /// request is not missed).
    pub fn data_ready(&self, want: usize) -> Result<usize, RingError> {
        let ready = self.raw_ready()? as usize;
        if ready >= want {
            return Ok(ready);
        }
        self.request_notify(NOTIFY_WRITE);
        Ok(self.raw_ready()? as usize)
    }

    /// Free space in the ring we write, with the same notification request
    /// as [`Endpoint::data_ready`] for reads.
    pub fn buffer_space(&self, want: usize) -> Result<usize, RingError> {
        let space = self.raw_space()? as usize;
        if space >= want {
            return Ok(space);
        }
        self.request_notify(NOTIFY_READ);
        Ok(self.raw_space()? as usize)
    }

    /// The ring we write, in bytes.
    pub fn write_capacity(&self) -> usize {
        self.write.len()
    }

    /// The ring we read, in bytes.
    pub fn read_capacity(&self) -> usize {
        self.read.len()
    }

    /// Reads up to `buf.len()` bytes that are ready. Returns the count and
    /// whether the peer must be signalled.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<(usize, bool), RingError> {
        let n = self.data_ready(buf.len())?.min(buf.len());
        if n == 0 {
            return Ok((0, false));
        }
        let n32 = u32::try_from(n).expect("n is at most the ring size, 2^20");
        let size = self.read.len();
        let start = self.rd_cons as usize & (size - 1);
        let first = n.min(size - start);
        // Data after the index: the peer wrote it before moving prod.
        fence(Ordering::Acquire);
        self.read.read_bytes(start, &mut buf[..first]);
        if first < n {
            self.read.read_bytes(0, &mut buf[first..n]);
        }
        fence(Ordering::SeqCst);
        self.rd_cons = self.rd_cons.wrapping_add(n32);
        let (cons_off, _, _, _) = index_offsets(self.role);
        self.page.store_u32(cons_off, self.rd_cons);
        Ok((n, self.take_notify(NOTIFY_READ)))
    }

    /// Writes as much of `buf` as fits. Returns the count and whether the
    /// peer must be signalled.
    pub fn send(&mut self, buf: &[u8]) -> Result<(usize, bool), RingError> {
        let n = self.buffer_space(buf.len())?.min(buf.len());
        if n == 0 {
            return Ok((0, false));
        }
        let n32 = u32::try_from(n).expect("n is at most the ring size, 2^20");
        let size = self.write.len();
        let start = self.wr_prod as usize & (size - 1);
        let first = n.min(size - start);
        fence(Ordering::SeqCst);
        self.write.write_bytes(start, &buf[..first]);
        if first < n {
            self.write.write_bytes(0, &buf[first..n]);
        }
        // Data before the index.
        fence(Ordering::Release);
        self.wr_prod = self.wr_prod.wrapping_add(n32);
        let (_, _, _, prod_off) = index_offsets(self.role);
        self.page.store_u32(prod_off, self.wr_prod);
        Ok((n, self.take_notify(NOTIFY_WRITE)))
    }

    /// Asks to be told of the next write and read of the peer (for a
    /// waiter outside this module, as libxenvchan's `data_ready` does).
    pub fn request_all_notifications(&self) {
        self.request_notify(NOTIFY_WRITE | NOTIFY_READ);
    }
}

fn ring_size(r: &SharedMem) -> u32 {
    u32::try_from(r.len()).expect("ring sizes are at most 2^20 (layout::MAX_ORDER)")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layout::Orders;

    /// Page-aligned zeroed memory for tests.
    pub(crate) struct TestMem {
        buf: Vec<u64>,
    }

    impl TestMem {
        pub(crate) fn new(len: usize) -> TestMem {
            TestMem {
                buf: vec![0u64; len / 8],
            }
        }

        pub(crate) fn view(&mut self) -> SharedMem {
            let len = self.buf.len() * 8;
            let ptr = NonNull::new(self.buf.as_mut_ptr().cast::<u8>()).expect("vec pointer");
            // SAFETY: the Vec outlives every view in these tests and is
            // not touched except through views.
            unsafe { SharedMem::new(ptr, len) }
        }
    }

    /// A connected pair over one page (rings in the page) or separate ring
    /// memory.
    pub(crate) fn pair(
        mem: &mut TestMem,
        rings: &mut TestMem,
        orders: Orders,
    ) -> (Endpoint, Endpoint) {
        let page = mem.view();
        let l = 1usize << orders.left;
        let place = |order: u8, at: usize, rings: &SharedMem| match layout::placement(order) {
            layout::Placement::InPage(off) => page.slice(off, 1 << order),
            layout::Placement::Pages(_) => rings.slice(at, 1 << order),
        };
        let rv = rings.view();
        let left = place(orders.left, 0, &rv);
        let right = place(orders.right, l, &rv);
        let server = Endpoint::new_server(page, orders, left, right);
        let client = Endpoint::new_client(page, right, left);
        (server, client)
    }

    #[test]
    fn header_layout_is_libxenvchans() {
        let mut mem = TestMem::new(4096);
        let mut rings = TestMem::new(8);
        let (s, _c) = pair(
            &mut mem,
            &mut rings,
            Orders {
                left: 10,
                right: 11,
            },
        );
        let bytes: Vec<u8> = mem
            .buf
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take(24)
            .collect();
        assert_eq!(&bytes[16..18], &10u16.to_le_bytes());
        assert_eq!(&bytes[18..20], &11u16.to_le_bytes());
        assert_eq!(bytes[20], 1, "cli_live after the client connected");
        assert_eq!(bytes[21], 1, "srv_live");
        assert_eq!(
            bytes[22], NOTIFY_WRITE,
            "cli_notify: the server waits for writes"
        );
        assert_eq!(
            bytes[23], NOTIFY_WRITE,
            "srv_notify: the client waits for writes"
        );
        assert_eq!(s.peer_state(), PeerState::Connected);
    }

    #[test]
    fn bytes_cross_both_ways_with_wraparound() {
        let mut mem = TestMem::new(4096);
        let mut rings = TestMem::new(8);
        let (mut s, mut c) = pair(
            &mut mem,
            &mut rings,
            Orders {
                left: 10,
                right: 11,
            },
        );
        let mut total = 0usize;
        for round in 0..50u32 {
            let msg: Vec<u8> = (0..700u32)
                .map(|i| (i * 7 + round).to_le_bytes()[0])
                .collect();
            let (n, _) = c.send(&msg).unwrap();
            assert_eq!(n, 700);
            let mut got = vec![0u8; 1024];
            let (m, notify) = s.recv(&mut got).unwrap();
            assert_eq!(&got[..m], &msg[..]);
            let _ = notify;
            let (n, _) = s.send(&msg[..600]).unwrap();
            let (m, _) = c.recv(&mut got).unwrap();
            assert_eq!((n, &got[..m]), (600, &msg[..600]));
            total += 700;
        }
        assert!(total > 1024 * 10, "the indices wrapped the ring many times");
    }

    #[test]
    fn a_full_ring_takes_what_fits_and_asks_for_a_read_signal() {
        let mut mem = TestMem::new(4096);
        let mut rings = TestMem::new(8);
        let (mut s, mut c) = pair(
            &mut mem,
            &mut rings,
            Orders {
                left: 10,
                right: 11,
            },
        );
        let big = vec![0xabu8; 3000];
        assert_eq!(c.send(&big).unwrap().0, 1024);
        assert_eq!(c.send(&big).unwrap().0, 0);
        // The client asked to be told when the server reads.
        let mut buf = vec![0u8; 100];
        let (n, notify) = s.recv(&mut buf).unwrap();
        assert_eq!(n, 100);
        assert!(notify, "the server must signal the waiting writer");
        assert_eq!(c.send(&big).unwrap().0, 100);
    }

    #[test]
    fn the_reader_is_signalled_only_when_it_asked() {
        let mut mem = TestMem::new(4096);
        let mut rings = TestMem::new(8);
        let (mut s, mut c) = pair(
            &mut mem,
            &mut rings,
            Orders {
                left: 10,
                right: 11,
            },
        );
        // The server asked at setup (cli_notify = WRITE).
        assert!(c.send(b"a").unwrap().1);
        // Not asked again yet: no signal for the second write.
        assert!(!c.send(b"b").unwrap().1);
        let mut buf = [0u8; 8];
        assert_eq!(s.recv(&mut buf).unwrap().0, 2);
        // Empty now; looking for more re-arms the request.
        assert_eq!(s.data_ready(1).unwrap(), 0);
        assert!(c.send(b"c").unwrap().1);
    }

    #[test]
    fn hostile_indices_are_errors_not_overreads() {
        let mut mem = TestMem::new(4096);
        let mut rings = TestMem::new(8);
        let (mut s, _c) = pair(
            &mut mem,
            &mut rings,
            Orders {
                left: 10,
                right: 11,
            },
        );
        let page = mem.view();
        // The client claims 5000 bytes in a 1024-byte ring.
        page.store_u32(layout::LEFT_PROD, 5000);
        let mut buf = [0u8; 16];
        assert!(matches!(
            s.recv(&mut buf),
            Err(RingError::Corrupt {
                index: "producer",
                ..
            })
        ));
        // The client claims to have consumed more than the server wrote.
        page.store_u32(layout::LEFT_PROD, 0);
        page.store_u32(layout::RIGHT_CONS, 4000);
        assert!(matches!(
            s.send(b"x"),
            Err(RingError::Corrupt {
                index: "consumer",
                ..
            })
        ));
        // Overwriting our own index in the page changes nothing we read.
        page.store_u32(layout::RIGHT_CONS, 0);
        page.store_u32(layout::LEFT_CONS, 777);
        assert_eq!(s.data_ready(0).unwrap(), 0);
    }

    #[test]
    fn live_bytes() {
        let mut mem = TestMem::new(4096);
        let mut rings = TestMem::new(8);
        let (s, c) = pair(
            &mut mem,
            &mut rings,
            Orders {
                left: 10,
                right: 11,
            },
        );
        c.close();
        assert_eq!(s.peer_state(), PeerState::Gone);
        s.close();
        assert_eq!(c.peer_state(), PeerState::Gone);
        // Garbage in the live byte counts as gone.
        mem.view().store_u8(layout::CLI_LIVE, 7);
        assert_eq!(s.peer_state(), PeerState::Gone);
    }

    #[test]
    fn multi_page_rings() {
        let mut mem = TestMem::new(4096);
        let mut rings = TestMem::new(2 * 65536);
        let (mut s, mut c) = pair(
            &mut mem,
            &mut rings,
            Orders {
                left: 16,
                right: 16,
            },
        );
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i % 251).to_le_bytes()[0])
            .collect();
        let mut out = Vec::new();
        let mut off = 0;
        let mut buf = vec![0u8; 10_000];
        while out.len() < data.len() {
            off += c.send(&data[off..]).unwrap().0;
            let (n, _) = s.recv(&mut buf).unwrap();
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, data);
        assert_eq!(s.read_capacity(), 65536);
        assert_eq!(c.write_capacity(), 65536);
    }
}
