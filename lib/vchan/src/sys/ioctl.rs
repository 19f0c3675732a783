//! One generic ioctl over a caller's buffer: the Xen devices use
//! `_IOC(_IOC_NONE, ...)` numbers with structures whose tail grows with a
//! count, which none of rustix's typed patterns expresses.

use std::os::fd::AsFd;

use rustix::ioctl::{opcode, Direction, Ioctl, IoctlOutput, Opcode};

/// `_IOC(_IOC_NONE, group, number, size)`.
pub const fn none(group: u8, number: u8, size: usize) -> Opcode {
    opcode::from_components(Direction::None, group, number, size)
}

struct Raw {
    opcode: Opcode,
    ptr: *mut std::ffi::c_void,
}

// SAFETY: `as_ptr` hands the kernel the caller's buffer, which `call`
// borrows mutably for the whole call; the kernel may write into it, so the
// call is marked mutating, and the output is the plain return value.
unsafe impl Ioctl for Raw {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        self.ptr
    }

    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Runs `opcode` on `fd` with `buf` as its argument and returns the
/// ioctl's value.
///
/// # Safety
///
/// `opcode` must be one whose argument is a structure the kernel reads
/// and writes only within `buf` (its length covers the structure and any
/// tail the structure's count announces), and that has no other effect on
/// this process's memory.
pub unsafe fn call<T: ?Sized>(
    fd: impl AsFd,
    opcode: Opcode,
    buf: &mut T,
) -> rustix::io::Result<IoctlOutput> {
    let raw = Raw {
        opcode,
        ptr: (buf as *mut T).cast(),
    };
    // SAFETY: the caller promises the kernel stays within `buf`, which is
    // borrowed mutably until the call returns.
    unsafe { rustix::ioctl::ioctl(fd, raw) }
}
