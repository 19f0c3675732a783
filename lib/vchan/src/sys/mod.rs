//! Thin wrappers of the Linux Xen devices a vchan runs over: event
//! channels (`/dev/xen/evtchn`), sharing pages (`/dev/xen/gntalloc`),
//! mapping a peer's pages (`/dev/xen/gntdev`) and the one hypercall that
//! tells whether a peer is still there (`/dev/xen/privcmd`). The structure
//! layouts and ioctl numbers are the kernel's (`include/uapi/xen/*.h`).

pub mod evtchn;
pub mod gntalloc;
pub mod gntdev;
mod ioctl;
mod mapping;
pub mod privcmd;

pub use mapping::Mapping;

/// A Xen domain id.
pub type DomId = u16;

/// What a device call did wrong.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("opening {device}")]
    Open {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{device}: {op}")]
    Call {
        device: &'static str,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl SysError {
    pub(crate) fn call(
        device: &'static str,
        op: &'static str,
    ) -> impl FnOnce(rustix::io::Errno) -> SysError {
        move |e| SysError::Call {
            device,
            op,
            source: e.into(),
        }
    }

    pub(crate) fn io(
        device: &'static str,
        op: &'static str,
    ) -> impl FnOnce(std::io::Error) -> SysError {
        move |source| SysError::Call { device, op, source }
    }

    /// The OS error number of the failure.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            SysError::Call { source, .. } | SysError::Open { source, .. } => source.raw_os_error(),
        }
    }
}

fn open(device: &'static str, nonblock: bool) -> Result<std::fs::File, SysError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true);
    o.custom_flags(
        if nonblock {
            rustix::fs::OFlags::NONBLOCK.bits() as i32
        } else {
            0
        } | rustix::fs::OFlags::CLOEXEC.bits() as i32,
    );
    o.open(device)
        .map_err(|source| SysError::Open { device, source })
}
