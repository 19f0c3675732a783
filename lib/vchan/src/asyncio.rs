//! A vchan under tokio: the same connection, with reads and writes that
//! wait on the event channel's fd through [`AsyncFd`] instead of blocking
//! a thread. Dead-peer detection is the blocking side's: a wait wakes at
//! least every [`LIVENESS_INTERVAL`] to look the peer's domain up.

use std::os::fd::{AsRawFd, RawFd};

use tokio::io::unix::AsyncFd;

use crate::conn::{Vchan, VchanError, LIVENESS_INTERVAL};

struct Inner(Vchan);

impl AsRawFd for Inner {
    fn as_raw_fd(&self) -> RawFd {
        self.0.event_fd().as_raw_fd()
    }
}

/// An async vchan end.
pub struct AsyncVchan {
    fd: AsyncFd<Inner>,
}

impl std::fmt::Debug for AsyncVchan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncVchan")
            .field("peer", &self.fd.get_ref().0.peer())
            .field("port", &self.fd.get_ref().0.port())
            .finish()
    }
}

impl AsyncVchan {
    /// Registers the connection with the current tokio runtime. (The event
    /// channel device is opened non-blocking.)
    pub fn new(v: Vchan) -> std::io::Result<AsyncVchan> {
        // SAFETY: the fd is the event channel's, owned by the `Vchan` that
        // the `AsyncFd` owns in turn: it stays open and the same for the
        // `AsyncFd`'s whole life, and `as_raw_fd` always returns it.
        let fd =
            unsafe { AsyncFd::register_with_interest(Inner(v), tokio::io::Interest::READABLE) }
                .map_err(std::io::Error::from)?;
        Ok(AsyncVchan { fd })
    }

    pub fn get_ref(&self) -> &Vchan {
        &self.fd.get_ref().0
    }

    /// Reads at least one byte. Once the peer is gone and the ring is
    /// empty: [`VchanError::PeerGone`].
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<usize, VchanError> {
        loop {
            let n = self.fd.get_mut().0.try_read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            self.wait().await?;
        }
    }

    /// Writes all of `buf`, waiting for ring space as needed.
    pub async fn write_all(&mut self, buf: &[u8]) -> Result<(), VchanError> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.fd.get_mut().0.try_write(&buf[done..])?;
            done += n;
            if n == 0 {
                self.wait().await?;
            }
        }
        Ok(())
    }

    /// Closes our end (the peer sees it at once).
    pub fn close(&mut self) {
        self.fd.get_mut().0.close();
    }

    /// Waits for an event, or the liveness interval. The try_* call just
    /// made asked the peer to signal, and looked again after asking.
    async fn wait(&mut self) -> Result<(), VchanError> {
        match tokio::time::timeout(LIVENESS_INTERVAL, self.fd.readable_mut()).await {
            Ok(Ok(mut guard)) => {
                guard.get_inner_mut().0.handle_event()?;
                guard.clear_ready();
                Ok(())
            }
            Ok(Err(e)) => Err(VchanError::Sys {
                peer: self.get_ref().peer(),
                port: self.get_ref().port(),
                source: crate::sys::SysError::Call {
                    device: crate::sys::evtchn::DEVICE,
                    op: "poll (async)",
                    source: e,
                },
            }),
            Err(_) => {
                let v = &mut self.fd.get_mut().0;
                if v.check_alive(true) {
                    Ok(())
                } else {
                    Err(VchanError::PeerGone {
                        peer: v.peer(),
                        port: v.port(),
                    })
                }
            }
        }
    }
}
