//! The client side of the sd_notify protocol, as qinit speaks it: one
//! datagram of `KEY=value` lines to the socket named by `$NOTIFY_SOCKET`.
//! Agents call [`ready`] once they serve; without the variable (run by hand,
//! or in a test) it does nothing.

use std::ffi::OsString;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("creating a datagram socket for $NOTIFY_SOCKET")]
    Socket(#[source] std::io::Error),
    #[error("sending to $NOTIFY_SOCKET {socket:?}")]
    Send {
        socket: OsString,
        #[source]
        source: std::io::Error,
    },
}

/// Sends `READY=1` and a status line, if a supervisor asked for it.
pub fn ready(status: &str) -> Result<(), NotifyError> {
    Notifier::connect()?.ready(status)
}

/// The notify socket, connected now and written later: a daemon that
/// drops its privileges connects first, while it may still reach the
/// supervisor's socket (the kernel checks the path at connect(2), not at
/// each send).
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(std::os::unix::net::UnixDatagram, OsString)>,
}

impl Notifier {
    /// Connects to `$NOTIFY_SOCKET`; without the variable, a notifier that
    /// sends nothing.
    pub fn connect() -> Result<Self, NotifyError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(path) => Self::to(path),
            None => Ok(Self { socket: None }),
        }
    }

    /// Connects to the notify socket at `path`.
    fn to(path: OsString) -> Result<Self, NotifyError> {
        Ok(Self {
            socket: Some((connect(&path)?, path)),
        })
    }

    /// Sends `READY=1` and a status line.
    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        let Some((s, path)) = &self.socket else {
            return Ok(());
        };
        s.send(message(status).as_bytes())
            .map_err(|source| NotifyError::Send {
                socket: path.clone(),
                source,
            })?;
        Ok(())
    }
}

fn connect(socket: &OsString) -> Result<std::os::unix::net::UnixDatagram, NotifyError> {
    let s = std::os::unix::net::UnixDatagram::unbound().map_err(NotifyError::Socket)?;
    s.connect(socket).map_err(|source| NotifyError::Send {
        socket: socket.clone(),
        source,
    })?;
    Ok(s)
}

fn message(status: &str) -> String {
    // A newline would start a new assignment: keep the status one line.
    let status: String = status
        .chars()
        .map(|c| if c == '\n' { ' ' } else { c })
        .collect();
    format!("READY=1\nSTATUS={status}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_ready_and_a_one_line_status() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        Notifier::to(path.clone().into_os_string())
            .unwrap()
            .ready("up\nREADY=0")
            .unwrap();
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up READY=0");
    }

    #[test]
    fn a_missing_socket_is_an_error_naming_it() {
        let err = Notifier::to("/nonexistent/notify".into()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/notify"), "{err}");
    }
}
