//! A blocking client of a QubesDB daemon's local socket, for dom0's tools
//! and qdomd: one request, one reply, each bounded by a timeout. The
//! daemon is trusted more than a VM, but its replies are still checked
//! (the header rules, and that the reply answers the request).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::wire::{check_data, Header, MsgType, QdbPath, WireError, HEADER_LEN};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("QubesDB {socket}")]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QubesDB {socket}: {path}: {source}")]
    Request {
        socket: PathBuf,
        path: String,
        #[source]
        source: WireError,
    },
    #[error("QubesDB {socket}: {op:?} {path} answered {reply:?}")]
    Refused {
        socket: PathBuf,
        op: MsgType,
        path: String,
        reply: MsgType,
    },
    #[error("QubesDB {socket}: malformed reply: {source}")]
    Reply {
        socket: PathBuf,
        #[source]
        source: WireError,
    },
}

/// A connection to one daemon.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    socket: PathBuf,
}

impl Client {
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let io = |source| ClientError::Io {
            socket: socket.into(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        Ok(Client {
            stream,
            socket: socket.into(),
        })
    }

    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<(), ClientError> {
        let p = self.path(path)?;
        check_data(value).map_err(|source| self.request_err(path, source))?;
        if value.len() >= crate::wire::MAX_DATA {
            return Err(self.request_err(
                path,
                WireError::DataTooLong(u32::try_from(value.len()).unwrap_or(u32::MAX)),
            ));
        }
        self.call(MsgType::Write, &p, value, MsgType::Ok).map(drop)
    }

    /// `None` if the entry does not exist.
    pub fn read(&mut self, path: &str) -> Result<Option<Vec<u8>>, ClientError> {
        let p = self.path(path)?;
        self.send(MsgType::Read, &p, &[])?;
        let (h, data) = self.receive()?;
        match h.kind {
            MsgType::RespRead => Ok(Some(data)),
            MsgType::ErrorNoent => Ok(None),
            reply => Err(self.refused(MsgType::Read, path, reply)),
        }
    }

    /// Removes an entry, or a directory (a path ending in `/`).
    pub fn rm(&mut self, path: &str) -> Result<(), ClientError> {
        let p = self.path(path)?;
        self.call(MsgType::Rm, &p, &[], MsgType::Ok).map(drop)
    }

    fn call(
        &mut self,
        op: MsgType,
        path: &QdbPath,
        data: &[u8],
        want: MsgType,
    ) -> Result<Vec<u8>, ClientError> {
        self.send(op, path, data)?;
        let (h, data) = self.receive()?;
        if h.kind != want {
            return Err(self.refused(op, path.as_str(), h.kind));
        }
        Ok(data)
    }

    fn send(&mut self, op: MsgType, path: &QdbPath, data: &[u8]) -> Result<(), ClientError> {
        let msg = Header::message(op, path, data);
        self.stream
            .write_all(&msg)
            .map_err(|source| ClientError::Io {
                socket: self.socket.clone(),
                source,
            })
    }

    fn receive(&mut self) -> Result<(Header, Vec<u8>), ClientError> {
        let io = |source| ClientError::Io {
            socket: self.socket.clone(),
            source,
        };
        let mut raw = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut raw).map_err(io)?;
        let h = Header::parse(&raw).map_err(|source| ClientError::Reply {
            socket: self.socket.clone(),
            source,
        })?;
        let mut data = vec![0u8; h.data_len as usize];
        self.stream.read_exact(&mut data).map_err(io)?;
        Ok((h, data))
    }

    fn path(&self, path: &str) -> Result<QdbPath, ClientError> {
        QdbPath::new(path).map_err(|source| self.request_err(path, source))
    }

    fn request_err(&self, path: &str, source: WireError) -> ClientError {
        ClientError::Request {
            socket: self.socket.clone(),
            path: path.chars().take(80).collect(),
            source,
        }
    }

    fn refused(&self, op: MsgType, path: &str, reply: MsgType) -> ClientError {
        ClientError::Refused {
            socket: self.socket.clone(),
            op,
            path: path.into(),
            reply,
        }
    }
}

/// Why `qubesdb-read` stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadToolError {
    /// Qubes' own words for a missing entry.
    #[error("Failed to read {0}")]
    Missing(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("writing a value: {0}")]
    Output(#[source] io::Error),
}

/// What `qubesdb-read` does with its paths: each value on a line of its
/// own, in order; a missing entry stops it (the tool's exit code 1).
pub fn print_values(
    socket: &Path,
    paths: &[String],
    out: &mut impl Write,
) -> Result<(), ReadToolError> {
    let mut client = Client::connect(socket, Duration::from_secs(10))?;
    for p in paths {
        let v = client
            .read(p)?
            .ok_or_else(|| ReadToolError::Missing(p.clone()))?;
        out.write_all(&v)
            .and_then(|()| out.write_all(b"\n"))
            .map_err(ReadToolError::Output)?;
    }
    Ok(())
}

/// `qubesdb-read`'s run, for dom0's tool and a VM's alike: the values on
/// stdout; on failure the reason on stderr (Qubes' own words for a
/// missing entry) and `false`.
pub fn read_tool(socket: &Path, paths: &[String]) -> bool {
    match print_values(socket, paths, &mut std::io::stdout().lock()) {
        Ok(()) => true,
        Err(e @ ReadToolError::Missing(_)) => {
            eprintln!("{e}");
            false
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg.push_str(&format!(": {c}"));
                cause = c.source();
            }
            eprintln!("qubesdb-read: {msg}");
            false
        }
    }
}
