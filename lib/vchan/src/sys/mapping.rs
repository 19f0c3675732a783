//! Pages mapped from a Xen device, unmapped on drop.

use std::ptr::NonNull;

/// A shared mapping of whole pages. Dropping it unmaps them; the device
/// then releases the grant (gntalloc) or its bookkeeping (gntdev's unmap
/// ioctl, which its owner issues after the drop).
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; moving it to
// another thread moves that ownership.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset`, shared, readable and writable
    /// (or read-only).
    pub(crate) fn map(
        fd: impl std::os::fd::AsFd,
        len: usize,
        offset: u64,
        writable: bool,
    ) -> rustix::io::Result<Mapping> {
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: a fresh mapping at an address the kernel picks, so no
        // existing memory is replaced; it is owned by the returned value.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                prot,
                MapFlags::SHARED,
                fd,
                offset,
            )?
        };
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(rustix::io::Errno::FAULT)?;
        Ok(Mapping { ptr, len })
    }

    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and nothing
        // borrows the memory past this value's life (the ring views that
        // point into it are owned by the same connection and dropped
        // first).
        if let Err(e) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            // Only a bad address or length fails, which would be a bug here.
            debug_assert!(false, "munmap: {e}");
        }
    }
}
