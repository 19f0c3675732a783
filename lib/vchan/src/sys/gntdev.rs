//! Mapping a peer's granted pages through `/dev/xen/gntdev`
//! (libxengnttab's `xengnttab_map_*` calls do the same steps).

use std::fs::File;

use super::gntalloc::{unmap_notify_arg, word8, UnmapNotify};
use super::ioctl::{self, none};
use super::{DomId, Mapping, SysError};
use crate::layout::PAGE_SIZE;

pub const DEVICE: &str = "/dev/xen/gntdev";

/// `struct ioctl_gntdev_map_grant_ref` with one ref: u32 count, u32 pad,
/// u64 index (out), then {u32 domid, u32 ref} per grant.
const MAP_HEADER: usize = 16;
const MAP_GRANT_REF: rustix::ioctl::Opcode = none(b'G', 0, 24);
/// `struct ioctl_gntdev_unmap_grant_ref`: u64 index, u32 count, u32 pad.
const UNMAP_GRANT_REF: rustix::ioctl::Opcode = none(b'G', 1, 16);
/// `struct ioctl_gntdev_unmap_notify`: u64 index, u32 action, u32 port.
const SET_UNMAP_NOTIFY: rustix::ioctl::Opcode = none(b'G', 7, 16);

/// A peer's pages mapped here. Dropping it unmaps them and releases the
/// device's slots.
#[derive(Debug)]
pub struct Mapped {
    mapping: Option<Mapping>,
    file: File,
    index: u64,
    count: u32,
}

impl Mapped {
    pub fn mapping(&self) -> &Mapping {
        self.mapping
            .as_ref()
            .expect("the mapping is only taken in drop")
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // Unmap first: the device refuses to release slots still mapped.
        drop(self.mapping.take());
        // Closing the file releases the slots anyway; this only frees them
        // sooner, so a failure has nothing to undo.
        let _ = unmap_slots(&self.file, self.index, self.count);
    }
}

fn unmap_slots(file: &File, index: u64, count: u32) -> Result<(), SysError> {
    let mut arg = [0u8; 16];
    arg[0..8].copy_from_slice(&index.to_ne_bytes());
    arg[8..12].copy_from_slice(&count.to_ne_bytes());
    // SAFETY: UNMAP_GRANT_REF reads exactly the 16-byte structure.
    unsafe { ioctl::call(file, UNMAP_GRANT_REF, &mut arg) }
        .map_err(SysError::call(DEVICE, "release grant slots"))?;
    Ok(())
}

/// Maps `refs` of domain `peer`, in order, as one contiguous region.
pub fn map(
    peer: DomId,
    refs: &[u32],
    writable: bool,
    notify: Option<UnmapNotify>,
) -> Result<Mapped, SysError> {
    let file = super::open(DEVICE, false)?;
    let count = u32::try_from(refs.len())
        .map_err(|_| SysError::call(DEVICE, "too many grants")(rustix::io::Errno::INVAL))?;
    let mut buf = vec![0u8; (MAP_HEADER + 8 * refs.len()).max(24)];
    buf[0..4].copy_from_slice(&count.to_ne_bytes());
    for (i, r) in refs.iter().enumerate() {
        let at = MAP_HEADER + 8 * i;
        buf[at..at + 4].copy_from_slice(&u32::from(peer).to_ne_bytes());
        buf[at + 4..at + 8].copy_from_slice(&r.to_ne_bytes());
    }
    // SAFETY: MAP_GRANT_REF reads the header and `count` refs, all inside
    // `buf`, and writes `index` into the header.
    unsafe { ioctl::call(&file, MAP_GRANT_REF, buf.as_mut_slice()) }
        .map_err(SysError::call(DEVICE, "map grant refs"))?;
    let index = u64::from_ne_bytes(word8(&buf, 8));
    let mapping = match Mapping::map(&file, refs.len() * PAGE_SIZE, index, writable) {
        Ok(m) => m,
        Err(e) => {
            let _ = unmap_slots(&file, index, count);
            return Err(SysError::call(DEVICE, "mmap granted pages")(e));
        }
    };
    let mapped = Mapped {
        mapping: Some(mapping),
        file,
        index,
        count,
    };
    if let Some(n) = notify {
        let mut arg = unmap_notify_arg(index, n);
        // SAFETY: SET_UNMAP_NOTIFY reads exactly the 16-byte structure.
        unsafe { ioctl::call(&mapped.file, SET_UNMAP_NOTIFY, &mut arg) }
            .map_err(SysError::call(DEVICE, "set unmap notify"))?;
    }
    Ok(mapped)
}
