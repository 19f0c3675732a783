//! A bundle stream that stops sending ends the apply. A bundle comes from
//! a file, or from a pipe out of an UpdateVM; a pipe that stalls would
//! otherwise hold the apply lock (and keep every other apply out) for as
//! long as its writer likes. [`StallGuard`] waits for each read at most
//! the apply's stall timeout ([`STALL_TIMEOUT`] unless `--stall-timeout`
//! says otherwise); a read that would wait longer is an error, the apply
//! fails on it, and the lock is released.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::time::Duration;

/// How long a bundle stream may go without a byte, by default.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// `inner`, each read bounded by a wait of `timeout` for data.
#[derive(Debug)]
pub struct StallGuard<R> {
    inner: R,
    timeout: Duration,
}

impl<R: Read + AsFd> StallGuard<R> {
    pub fn new(inner: R, timeout: Duration) -> Self {
        StallGuard { inner, timeout }
    }
}

impl<R: Read + AsFd> Read for StallGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let ts = Timespec {
            // Saturating: a timeout past i64 seconds is "for ever" anyway.
            tv_sec: i64::try_from(self.timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(self.timeout.subsec_nanos()),
        };
        // A regular file is always readable; a pipe or socket only once
        // its writer sent something (or went away).
        loop {
            let mut fds = [PollFd::new(&self.inner, PollFlags::IN)];
            match poll(&mut fds, Some(&ts)) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no bundle data for {} s", self.timeout.as_secs()),
                    ))
                }
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_stalled_pipe_ends_the_read_and_a_file_never_waits() {
        let (r, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
        w.write_all(b"abc").unwrap();
        let mut g = StallGuard::new(r, Duration::from_millis(200));
        let mut buf = [0u8; 8];
        assert_eq!(g.read(&mut buf).unwrap(), 3);
        let e = g.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        drop(w);
        // The writer gone: end of file, at once.
        assert_eq!(g.read(&mut buf).unwrap(), 0);
        let f = tempfile::tempfile().unwrap();
        let mut g = StallGuard::new(f, Duration::from_millis(1));
        assert_eq!(g.read(&mut buf).unwrap(), 0);
    }
}
