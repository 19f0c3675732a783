//! Event channels through `/dev/xen/evtchn`: one open device per channel,
//! as libxenvchan does, so a poll on it wakes for this channel only.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use super::ioctl::{self, none};
use super::{DomId, SysError};

pub const DEVICE: &str = "/dev/xen/evtchn";

#[repr(C)]
struct BindInterdomain {
    remote_domain: u32,
    remote_port: u32,
}

#[repr(C)]
struct BindUnbound {
    remote_domain: u32,
}

#[repr(C)]
struct PortArg {
    port: u32,
}

const BIND_INTERDOMAIN: rustix::ioctl::Opcode = none(b'E', 1, size_of::<BindInterdomain>());
const BIND_UNBOUND_PORT: rustix::ioctl::Opcode = none(b'E', 2, size_of::<BindUnbound>());
const NOTIFY: rustix::ioctl::Opcode = none(b'E', 4, size_of::<PortArg>());

/// One bound event channel. Closing it (drop) unbinds the port.
#[derive(Debug)]
pub struct EventChannel {
    file: File,
    port: u32,
}

fn call_err(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> SysError {
    SysError::call(DEVICE, op)
}

impl EventChannel {
    /// A new port that `remote` may bind to (the server side).
    pub fn bind_unbound(remote: DomId) -> Result<EventChannel, SysError> {
        let file = super::open(DEVICE, true)?;
        let mut arg = BindUnbound {
            remote_domain: remote.into(),
        };
        // SAFETY: BIND_UNBOUND_PORT reads exactly a `BindUnbound`.
        let port = unsafe { ioctl::call(&file, BIND_UNBOUND_PORT, &mut arg) }
            .map_err(call_err("bind unbound port"))?;
        Self::bound(file, port)
    }

    /// Binds to `remote`'s port `remote_port` (the client side).
    pub fn bind_interdomain(remote: DomId, remote_port: u32) -> Result<EventChannel, SysError> {
        let file = super::open(DEVICE, true)?;
        let mut arg = BindInterdomain {
            remote_domain: remote.into(),
            remote_port,
        };
        // SAFETY: BIND_INTERDOMAIN reads exactly a `BindInterdomain`.
        let port = unsafe { ioctl::call(&file, BIND_INTERDOMAIN, &mut arg) }
            .map_err(call_err("bind interdomain port"))?;
        Self::bound(file, port)
    }

    fn bound(file: File, port: i32) -> Result<EventChannel, SysError> {
        let port = u32::try_from(port)
            .map_err(|_| call_err("bind returned a negative port")(rustix::io::Errno::INVAL))?;
        let ch = EventChannel { file, port };
        // The driver delivers a port masked until it is written back.
        ch.unmask()?;
        Ok(ch)
    }

    /// The local port number.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Signals the peer.
    pub fn notify(&self) -> Result<(), SysError> {
        let mut arg = PortArg { port: self.port };
        // SAFETY: NOTIFY reads exactly a `PortArg`.
        unsafe { ioctl::call(&self.file, NOTIFY, &mut arg) }.map_err(call_err("notify"))?;
        Ok(())
    }

    fn unmask(&self) -> Result<(), SysError> {
        (&self.file)
            .write_all(&self.port.to_ne_bytes())
            .map_err(SysError::io(DEVICE, "unmask"))
    }

    /// Consumes pending events without blocking and unmasks the port again;
    /// true if there was one.
    pub fn drain(&self) -> Result<bool, SysError> {
        let mut buf = [0u8; 64];
        let mut fired = false;
        loop {
            match (&self.file).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    fired |= buf[..n]
                        .chunks_exact(4)
                        .any(|c| c == self.port.to_ne_bytes());
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SysError::io(DEVICE, "read pending")(e)),
            }
        }
        if fired {
            self.unmask()?;
        }
        Ok(fired)
    }

    /// Waits up to `timeout` for an event and consumes it; false on timeout.
    pub fn wait(&self, timeout: Duration) -> Result<bool, SysError> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let ts = Timespec::try_from(timeout)
            .map_err(|_| call_err("poll timeout")(rustix::io::Errno::INVAL))?;
        let mut fds = [PollFd::new(&self.file, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) => Ok(false),
            Ok(_) => self.drain(),
            Err(rustix::io::Errno::INTR) => Ok(false),
            Err(e) => Err(call_err("poll")(e)),
        }
    }
}

impl AsFd for EventChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
