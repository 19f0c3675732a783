//! Sharing our pages with another domain through `/dev/xen/gntalloc`
//! (libxengnttab's `xengntshr_*` calls do the same steps).

use std::fs::File;

use super::ioctl::{self, none};
use super::{DomId, Mapping, SysError};
use crate::layout::PAGE_SIZE;

pub const DEVICE: &str = "/dev/xen/gntalloc";

/// `struct ioctl_gntalloc_alloc_gref` with one `gref_ids` entry: u16 domid,
/// u16 flags, u32 count, u64 index (out), u32 gref_ids[] (out), padded to 24.
const ALLOC_HEADER: usize = 16;
const ALLOC_GREF: rustix::ioctl::Opcode = none(b'G', 5, 24);
/// `struct ioctl_gntalloc_dealloc_gref`: u64 index, u32 count.
const DEALLOC_GREF: rustix::ioctl::Opcode = none(b'G', 6, 16);
/// `struct ioctl_gntalloc_unmap_notify`: u64 index, u32 action, u32 port.
const SET_UNMAP_NOTIFY: rustix::ioctl::Opcode = none(b'G', 7, 16);
const FLAG_WRITABLE: u16 = 1;
const NOTIFY_CLEAR_BYTE: u32 = 0x1;
const NOTIFY_SEND_EVENT: u32 = 0x2;

/// Pages shared with a peer, and their grant references.
#[derive(Debug)]
pub struct Shared {
    pub mapping: Mapping,
    pub refs: Vec<u32>,
}

/// What the kernel does for the peer when our side unmaps (or dies): clear
/// the byte at `offset` of the first page and signal `port`.
#[derive(Debug, Clone, Copy)]
pub struct UnmapNotify {
    pub offset: usize,
    pub port: u32,
}

/// Shares `count` zeroed pages with `peer`, writable by it.
pub fn share(peer: DomId, count: usize, notify: Option<UnmapNotify>) -> Result<Shared, SysError> {
    let file: File = super::open(DEVICE, false)?;
    let count32 = u32::try_from(count)
        .map_err(|_| SysError::call(DEVICE, "too many pages")(rustix::io::Errno::INVAL))?;
    let mut buf = vec![0u8; (ALLOC_HEADER + 4 * count).max(24)];
    buf[0..2].copy_from_slice(&peer.to_ne_bytes());
    buf[2..4].copy_from_slice(&FLAG_WRITABLE.to_ne_bytes());
    buf[4..8].copy_from_slice(&count32.to_ne_bytes());
    // SAFETY: ALLOC_GREF reads the 16-byte header and writes `index` and
    // `count` grant ids into `buf`, which holds all of them.
    unsafe { ioctl::call(&file, ALLOC_GREF, buf.as_mut_slice()) }
        .map_err(SysError::call(DEVICE, "allocate grants"))?;
    let index = u64::from_ne_bytes(word8(&buf, 8));
    let refs: Vec<u32> = buf[ALLOC_HEADER..ALLOC_HEADER + 4 * count]
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mapped = Mapping::map(&file, count * PAGE_SIZE, index, true)
        .map_err(SysError::call(DEVICE, "map shared pages"));
    let result = mapped.and_then(|mapping| {
        if let Some(n) = notify {
            set_unmap_notify(&file, index, n)?;
        }
        Ok(Shared { mapping, refs })
    });
    // The pages stay allocated while mapped; dropping them from the file's
    // table now means unmapping frees them, whatever happens to us later.
    let mut dealloc = [0u8; 16];
    dealloc[0..8].copy_from_slice(&index.to_ne_bytes());
    dealloc[8..12].copy_from_slice(&count32.to_ne_bytes());
    // SAFETY: DEALLOC_GREF reads exactly the 16-byte structure.
    let freed = unsafe { ioctl::call(&file, DEALLOC_GREF, &mut dealloc) }
        .map_err(SysError::call(DEVICE, "release grant slots"));
    let shared = result?;
    freed?;
    Ok(shared)
}

/// The `unmap_notify` structure both devices take (same layout, same
/// action bits): clear the byte and signal the port.
pub(crate) fn unmap_notify_arg(index: u64, n: UnmapNotify) -> [u8; 16] {
    let mut arg = [0u8; 16];
    let at = index + n.offset as u64;
    arg[0..8].copy_from_slice(&at.to_ne_bytes());
    arg[8..12].copy_from_slice(&(NOTIFY_CLEAR_BYTE | NOTIFY_SEND_EVENT).to_ne_bytes());
    arg[12..16].copy_from_slice(&n.port.to_ne_bytes());
    arg
}

fn set_unmap_notify(file: &File, index: u64, n: UnmapNotify) -> Result<(), SysError> {
    let mut arg = unmap_notify_arg(index, n);
    // SAFETY: SET_UNMAP_NOTIFY reads exactly the 16-byte structure.
    unsafe { ioctl::call(file, SET_UNMAP_NOTIFY, &mut arg) }
        .map_err(SysError::call(DEVICE, "set unmap notify"))?;
    Ok(())
}

pub(crate) fn word8(buf: &[u8], at: usize) -> [u8; 8] {
    let mut w = [0u8; 8];
    w.copy_from_slice(&buf[at..at + 8]);
    w
}
