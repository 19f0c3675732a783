//! A dom0 client of a VM's qrexec-daemon (`qrexec-daemon-common.c`
//! `handle_daemon_handshake`, `negotiate_connection_params`): connect to
//! `/run/qubes/qrexec.<vm>`, take the daemon's `MSG_HELLO` (protocol 3
//! exactly), answer with ours, ask for a data port, and read it back.
//! `qrexec-client` and the daemon's own VM-to-VM calls both use it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use qrexec::wire::{message, ExecParams, Header, MsgType, PeerInfo, HEADER_LEN, PROTOCOL_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon of {vm}: {source}")]
    Io {
        vm: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon of {vm} sent {what}")]
    Protocol { vm: String, what: String },
}

/// A connection to one VM's daemon, greeted.
#[derive(Debug)]
pub struct DaemonConn {
    vm: String,
    stream: UnixStream,
}

/// Where a request's data connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPort {
    /// The VM's domain id (the daemon's answer).
    pub domain: u32,
    pub port: u32,
}

impl DaemonConn {
    /// Connects to `vm`'s daemon and exchanges `MSG_HELLO`.
    pub fn connect(vm: &str, timeout: Duration) -> Result<DaemonConn, LocalError> {
        let path = qrexec::socket_path(vm);
        let stream = UnixStream::connect(&path).map_err(|source| LocalError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let mut c = DaemonConn {
            vm: vm.to_owned(),
            stream,
        };
        c.stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| c.stream.set_write_timeout(Some(timeout)))
            .map_err(|e| c.io(e))?;
        // The daemon greets first; protocol 3 exactly on this socket.
        let (h, body) = c.read_msg()?;
        match PeerInfo::parse(&body) {
            Ok(p) if h.kind == MsgType::Hello && p.version == PROTOCOL_VERSION => {}
            _ => return Err(c.protocol(format!("{} instead of a protocol 3 MSG_HELLO", h.kind))),
        }
        let hello = PeerInfo {
            version: PROTOCOL_VERSION,
        }
        .message();
        c.stream.write_all(&hello).map_err(|e| c.io(e))?;
        Ok(c)
    }

    fn io(&self, source: std::io::Error) -> LocalError {
        LocalError::Io {
            vm: self.vm.clone(),
            source,
        }
    }

    fn protocol(&self, what: String) -> LocalError {
        LocalError::Protocol {
            vm: self.vm.clone(),
            what,
        }
    }

    /// Asks for a data port: `kind` is `MSG_EXEC_CMDLINE` or
    /// `MSG_JUST_EXEC`, `peer` the domain at the other end of the data
    /// connection (0 for dom0), `cmdline` without its NUL.
    pub fn request(
        &mut self,
        kind: MsgType,
        peer: u32,
        cmdline: &[u8],
    ) -> Result<DataPort, LocalError> {
        let req = ExecParams {
            connect_domain: peer,
            connect_port: 0,
            cmdline: cmdline.to_vec(),
        };
        let msg = message(kind, &req.render(true));
        self.stream.write_all(&msg).map_err(|e| self.io(e))?;
        let (h, body) = self.read_msg()?;
        if h.kind != kind || body.len() != 8 {
            return Err(self.protocol(format!("{} of {} bytes as its answer", h.kind, body.len())));
        }
        let reply = ExecParams::parse(MsgType::ConnectionTerminated, &body)
            .map_err(|e| self.protocol(e.to_string()))?;
        Ok(DataPort {
            domain: reply.connect_domain,
            port: reply.connect_port,
        })
    }

    fn read_msg(&mut self) -> Result<(Header, Vec<u8>), LocalError> {
        let mut raw = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut raw).map_err(|e| self.io(e))?;
        let h = Header::parse(&raw).map_err(|e| self.protocol(e.to_string()))?;
        let len = h
            .checked_len(64)
            .map_err(|e| self.protocol(e.to_string()))?;
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).map_err(|e| self.io(e))?;
        Ok((h, body))
    }
}
