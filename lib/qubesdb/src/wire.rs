//! `struct qdb_hdr { uint8_t type; char path[64]; uint32_t data_len; }`:
//! with C alignment, `data_len` sits at offset 68 and the header is 72
//! bytes; it is followed by `data_len` bytes of data.

use std::fmt;

pub const HEADER_LEN: usize = 72;
pub const MAX_PATH: usize = 64;
/// `QDB_MAX_DATA`; the daemon refuses `data_len >= MAX_DATA`.
pub const MAX_DATA: usize = 3072;
const DATA_LEN_AT: usize = 68;

/// `enum qdb_msg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MsgType {
    Read = 0,
    Write = 1,
    Multiread = 2,
    List = 3,
    Rm = 4,
    Watch = 5,
    Unwatch = 6,
    Ok = 7,
    ErrorNoent = 8,
    Error = 9,
    RespRead = 10,
    RespMultiread = 11,
    RespList = 12,
    RespWatch = 13,
}

impl MsgType {
    pub fn from_u8(v: u8) -> Option<MsgType> {
        use MsgType::*;
        Some(match v {
            0 => Read,
            1 => Write,
            2 => Multiread,
            3 => List,
            4 => Rm,
            5 => Watch,
            6 => Unwatch,
            7 => Ok,
            8 => ErrorNoent,
            9 => Error,
            10 => RespRead,
            11 => RespMultiread,
            12 => RespList,
            13 => RespWatch,
            _ => return None,
        })
    }

    /// Whether this message may arrive from a VM over the vchan
    /// (`verify_hdr(.., vchan=1)`): only the commands that keep the two
    /// copies in step, and the responses to ours.
    pub fn allowed_on_vchan(self) -> bool {
        use MsgType::*;
        matches!(self, Multiread | Write | Rm | Ok | Error | RespMultiread)
    }

    /// Whether a local client may send it.
    pub fn allowed_locally(self) -> bool {
        use MsgType::*;
        matches!(self, Read | Write | Multiread | List | Rm | Watch | Unwatch)
    }
}

/// A path as QubesDB allows it: under 64 bytes, of `[A-Za-z0-9_-/.:@]`.
/// (Whether it must start with `/` or may end with one depends on the
/// command; see [`crate::db`].)
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QdbPath(String);

impl QdbPath {
    pub fn new(s: &str) -> Result<QdbPath, WireError> {
        if s.len() >= MAX_PATH {
            return Err(WireError::PathTooLong(s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "_-/.:@".contains(*c)))
        {
            return Err(WireError::PathChar(c));
        }
        Ok(QdbPath(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for QdbPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for QdbPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message type {0} does not exist")]
    UnknownType(u8),
    #[error("message type {0:?} is not allowed here")]
    NotAllowed(MsgType),
    #[error("path of {0} bytes (the limit is {MAX_PATH} with its terminator)")]
    PathTooLong(usize),
    #[error("path has no terminating NUL within {MAX_PATH} bytes")]
    PathUnterminated,
    #[error("path contains the character {0:?}")]
    PathChar(char),
    #[error("path is not valid UTF-8")]
    PathEncoding,
    #[error("data length {0} is over the limit of 3071 bytes")]
    DataTooLong(u32),
    #[error("data contains a NUL byte")]
    DataNul,
    #[error("{0:?} carries {1} bytes of data, which it must not")]
    UnexpectedData(MsgType, u32),
}

/// A checked header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: MsgType,
    pub path: QdbPath,
    pub data_len: u32,
}

impl Header {
    pub fn new(kind: MsgType, path: QdbPath, data_len: usize) -> Header {
        assert!(data_len < MAX_DATA, "data length checked by the caller");
        Header {
            kind,
            path,
            data_len: u32::try_from(data_len).expect("under MAX_DATA"),
        }
    }

    /// Parses and checks a header from an untrusted peer. The type is only
    /// checked to exist; where it may arrive is the caller's rule.
    pub fn parse(raw: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let kind = MsgType::from_u8(raw[0]).ok_or(WireError::UnknownType(raw[0]))?;
        let path_bytes = &raw[1..1 + MAX_PATH];
        let end = path_bytes
            .iter()
            .position(|b| *b == 0)
            .ok_or(WireError::PathUnterminated)?;
        let path = std::str::from_utf8(&path_bytes[..end]).map_err(|_| WireError::PathEncoding)?;
        let path = QdbPath::new(path)?;
        let data_len = u32::from_ne_bytes([
            raw[DATA_LEN_AT],
            raw[DATA_LEN_AT + 1],
            raw[DATA_LEN_AT + 2],
            raw[DATA_LEN_AT + 3],
        ]);
        if data_len as usize >= MAX_DATA {
            return Err(WireError::DataTooLong(data_len));
        }
        Ok(Header {
            kind,
            path,
            data_len,
        })
    }

    pub fn render(&self) -> [u8; HEADER_LEN] {
        let mut raw = [0u8; HEADER_LEN];
        raw[0] = self.kind as u8;
        let p = self.path.as_str().as_bytes();
        raw[1..1 + p.len()].copy_from_slice(p);
        raw[DATA_LEN_AT..DATA_LEN_AT + 4].copy_from_slice(&self.data_len.to_ne_bytes());
        raw
    }

    /// The header followed by its data, as one message.
    pub fn message(kind: MsgType, path: &QdbPath, data: &[u8]) -> Vec<u8> {
        let h = Header::new(kind, path.clone(), data.len());
        let mut m = h.render().to_vec();
        m.extend_from_slice(data);
        m
    }
}

/// Values may hold any byte but NUL (`verify_data`).
pub fn check_data(data: &[u8]) -> Result<(), WireError> {
    if data.contains(&0) {
        return Err(WireError::DataNul);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_layout() {
        let h = Header::new(MsgType::Write, QdbPath::new("/name").unwrap(), 6);
        let raw = h.render();
        assert_eq!(raw[0], 1);
        assert_eq!(&raw[1..6], b"/name");
        assert_eq!(raw[6], 0);
        assert_eq!(&raw[68..72], &6u32.to_le_bytes());
        assert_eq!(Header::parse(&raw).unwrap(), h);
    }

    #[test]
    fn hostile_headers() {
        let mut raw = [0u8; HEADER_LEN];
        raw[0] = 14;
        assert_eq!(Header::parse(&raw), Err(WireError::UnknownType(14)));
        raw[0] = 1;
        raw[1..65].fill(b'a');
        assert_eq!(Header::parse(&raw), Err(WireError::PathUnterminated));
        raw[1..65].fill(0);
        raw[1] = b'/';
        raw[2] = b' ';
        assert_eq!(Header::parse(&raw), Err(WireError::PathChar(' ')));
        raw[2] = b'x';
        raw[68..72].copy_from_slice(&3072u32.to_le_bytes());
        assert_eq!(Header::parse(&raw), Err(WireError::DataTooLong(3072)));
        raw[68..72].copy_from_slice(&3071u32.to_le_bytes());
        assert!(Header::parse(&raw).is_ok());
        assert_eq!(check_data(b"a\0b"), Err(WireError::DataNul));
    }
}
