//! The event-channel status hypercall through `/dev/xen/privcmd`: how a
//! vchan end learns that its peer domain is gone. Xen sends no event when
//! a domain dies; its end of an interdomain channel just stops existing,
//! and ours turns "unbound". libvchan asks the same question the same way.

use std::fs::File;

use super::ioctl::{self, none};
use super::{DomId, SysError};

pub const DEVICE: &str = "/dev/xen/privcmd";

/// `struct privcmd_hypercall`: u64 op, u64 arg[5].
const HYPERCALL: rustix::ioctl::Opcode = none(b'P', 0, 48);
const HYPERVISOR_EVENT_CHANNEL_OP: u64 = 32;
const EVTCHNOP_STATUS: u64 = 5;
const DOMID_SELF: DomId = 0x7ff0;

/// `struct evtchn_status` (xen/include/public/event_channel.h): u16 dom,
/// u32 port, u32 status (out), u32 vcpu (out), 8-byte union (out).
#[repr(C)]
#[derive(Default)]
struct EvtchnStatus {
    dom: u16,
    port: u32,
    status: u32,
    vcpu: u32,
    union: [u32; 2],
}

#[repr(C)]
struct Hypercall {
    op: u64,
    arg: [u64; 5],
}

/// The state of one of our ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    Closed,
    /// Allocated, waiting for the peer to bind (or the peer is gone).
    Unbound,
    /// Bound to a peer's port.
    Interdomain,
    Other(u32),
}

/// An open privcmd device.
#[derive(Debug)]
pub struct Privcmd {
    file: File,
}

impl Privcmd {
    pub fn open() -> Result<Privcmd, SysError> {
        Ok(Privcmd {
            file: super::open(DEVICE, false)?,
        })
    }

    fn status(&self, st: &mut EvtchnStatus) -> Result<(), rustix::io::Errno> {
        let mut call = Hypercall {
            op: HYPERVISOR_EVENT_CHANNEL_OP,
            arg: [EVTCHNOP_STATUS, std::ptr::from_mut(st) as u64, 0, 0, 0],
        };
        // SAFETY: the hypercall reads and writes only `*st`, a live local
        // structure of the layout Xen defines, which stays borrowed (and on
        // a resident stack page) until the call returns; `call` itself is
        // exactly `struct privcmd_hypercall`.
        unsafe { ioctl::call(&self.file, HYPERCALL, &mut call) }.map(|_| ())
    }

    /// The state of our port `port`.
    pub fn port_state(&self, port: u32) -> Result<PortState, SysError> {
        let mut st = EvtchnStatus {
            dom: DOMID_SELF,
            port,
            ..Default::default()
        };
        self.status(&mut st)
            .map_err(SysError::call(DEVICE, "event channel status"))?;
        Ok(match st.status {
            0 => PortState::Closed,
            1 => PortState::Unbound,
            2 => PortState::Interdomain,
            n => PortState::Other(n),
        })
    }

    /// False once `dom` no longer exists. Asking for an invalid port of
    /// another domain fails with ESRCH only when the domain is gone; any
    /// other answer (EPERM from a guest, EINVAL) means it is there.
    pub fn domain_exists(&self, dom: DomId) -> Result<bool, SysError> {
        let mut st = EvtchnStatus {
            dom,
            port: u32::MAX,
            ..Default::default()
        };
        match self.status(&mut st) {
            Err(rustix::io::Errno::SRCH) => Ok(false),
            Ok(())
            | Err(rustix::io::Errno::PERM | rustix::io::Errno::INVAL | rustix::io::Errno::ACCESS) => {
                Ok(true)
            }
            Err(e) => Err(SysError::call(DEVICE, "event channel status")(e)),
        }
    }
}
