//! The xenstore wire protocol of Xen's `xen/include/public/io/xs_wire.h`.
//!
//! Every message is a 16-byte header (type, request id, transaction id,
//! payload length; little-endian `u32`s on every platform Xen runs on) and
//! at most [`PAYLOAD_MAX`] bytes of payload. Paths and tokens travel
//! NUL-terminated; a written value is the rest of the payload, unterminated.
//! Replies carry the request's type, or `XS_ERROR` with an errno name such
//! as `ENOENT`. Watch events arrive unrequested as `XS_WATCH_EVENT`
//! (`path\0token\0`) in the same stream.

use std::fmt;

pub const HEADER_LEN: usize = 16;
/// `XENSTORE_PAYLOAD_MAX`: xenstored refuses anything longer.
pub const PAYLOAD_MAX: usize = 4096;
/// `XENSTORE_ABS_PATH_MAX`.
pub const ABS_PATH_MAX: usize = 3072;
/// `XENSTORE_REL_PATH_MAX`.
pub const REL_PATH_MAX: usize = 2048;

/// `enum xsd_sockmsg_type`, the types this client sends or accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MsgType {
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
}

impl MsgType {
    pub fn from_u32(v: u32) -> Option<MsgType> {
        use MsgType::*;
        Some(match v {
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use MsgType::*;
        match self {
            Directory => "DIRECTORY",
            Read => "READ",
            GetPerms => "GET_PERMS",
            Watch => "WATCH",
            Unwatch => "UNWATCH",
            TransactionStart => "TRANSACTION_START",
            TransactionEnd => "TRANSACTION_END",
            GetDomainPath => "GET_DOMAIN_PATH",
            Write => "WRITE",
            Mkdir => "MKDIR",
            Rm => "RM",
            SetPerms => "SET_PERMS",
            WatchEvent => "WATCH_EVENT",
            Error => "ERROR",
        }
    }
}

impl fmt::Display for MsgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("payload of {0} bytes is over xenstore's {PAYLOAD_MAX}-byte limit")]
    TooLong(usize),
    #[error("message type {0} is not one xenstore sends")]
    UnknownType(u32),
    #[error("path {path:?}: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("{what}: {reason}")]
    BadPayload {
        what: &'static str,
        reason: &'static str,
    },
}

/// `struct xsd_sockmsg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub len: u32,
}

impl Header {
    /// Parses a header; the length is checked against the protocol's cap
    /// before anyone allocates for the payload.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let h = Header {
            kind: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        };
        if h.payload_len() > PAYLOAD_MAX {
            return Err(WireError::TooLong(h.payload_len()));
        }
        Ok(h)
    }

    pub fn render(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        for (i, v) in [self.kind, self.req_id, self.tx_id, self.len]
            .into_iter()
            .enumerate()
        {
            out[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn payload_len(&self) -> usize {
        // u32 → usize cannot truncate on the 32- and 64-bit targets Xen
        // supports; saturate rather than wrap on anything narrower.
        usize::try_from(self.len).unwrap_or(usize::MAX)
    }
}

/// A whole message, header and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
}

impl Message {
    pub fn kind(&self) -> Result<MsgType, WireError> {
        MsgType::from_u32(self.header.kind).ok_or(WireError::UnknownType(self.header.kind))
    }
}

/// Renders a request with the given payload.
pub fn request(
    kind: MsgType,
    req_id: u32,
    tx_id: u32,
    payload: &[u8],
) -> Result<Vec<u8>, WireError> {
    if payload.len() > PAYLOAD_MAX {
        return Err(WireError::TooLong(payload.len()));
    }
    let header = Header {
        kind: kind as u32,
        req_id,
        tx_id,
        len: u32::try_from(payload.len()).map_err(|_| WireError::TooLong(payload.len()))?,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.render());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Checks a path the way xenstored does (`is_valid_nodename`): absolute
/// paths under [`ABS_PATH_MAX`], relative ones under [`REL_PATH_MAX`],
/// characters from `[A-Za-z0-9/_@-]`, no empty component, no trailing
/// slash except the root. Special watch paths (`@introduceDomain`,
/// `@releaseDomain`) are accepted as they are.
pub fn check_path(path: &str) -> Result<(), WireError> {
    let bad = |reason| {
        Err(WireError::BadPath {
            path: path.chars().take(80).collect(),
            reason,
        })
    };
    if path.is_empty() {
        return bad("empty");
    }
    if let Some(name) = path.strip_prefix('@') {
        if path.len() > 64 || !name.bytes().all(|c| c.is_ascii_alphanumeric()) {
            return bad("not a special watch path");
        }
        return Ok(());
    }
    let max = if path.starts_with('/') {
        ABS_PATH_MAX
    } else {
        REL_PATH_MAX
    };
    if path.len() > max {
        return bad("too long");
    }
    if !path
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"/_@-".contains(&c))
    {
        return bad("a character xenstore does not allow");
    }
    if path.contains("//") {
        return bad("an empty component");
    }
    if path.len() > 1 && path.ends_with('/') {
        return bad("a trailing slash");
    }
    Ok(())
}

/// `path\0`, checked.
pub fn path_payload(path: &str) -> Result<Vec<u8>, WireError> {
    check_path(path)?;
    let mut p = Vec::with_capacity(path.len() + 1);
    p.extend_from_slice(path.as_bytes());
    p.push(0);
    Ok(p)
}

/// `path\0value`: a write's payload (the value is not terminated).
pub fn write_payload(path: &str, value: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut p = path_payload(path)?;
    p.extend_from_slice(value);
    if p.len() > PAYLOAD_MAX {
        return Err(WireError::TooLong(p.len()));
    }
    Ok(p)
}

/// `path\0token\0`: a watch's or unwatch's payload. A token is the
/// caller's own label; it must not hold a NUL.
pub fn watch_payload(path: &str, token: &str) -> Result<Vec<u8>, WireError> {
    if token.as_bytes().contains(&0) {
        return Err(WireError::BadPayload {
            what: "watch token",
            reason: "holds a NUL",
        });
    }
    let mut p = path_payload(path)?;
    p.extend_from_slice(token.as_bytes());
    p.push(0);
    if p.len() > PAYLOAD_MAX {
        return Err(WireError::TooLong(p.len()));
    }
    Ok(p)
}

/// One entry of a node's permission list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PermKind {
    None,
    Read,
    Write,
    Both,
}

/// A permission entry: the first one names the owner (who may do
/// anything) and what every domain not listed may do; the others grant a
/// domain more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perm {
    pub kind: PermKind,
    pub domid: u32,
}

impl Perm {
    pub fn none(domid: u32) -> Perm {
        Perm {
            kind: PermKind::None,
            domid,
        }
    }
    pub fn read(domid: u32) -> Perm {
        Perm {
            kind: PermKind::Read,
            domid,
        }
    }
    pub fn write(domid: u32) -> Perm {
        Perm {
            kind: PermKind::Write,
            domid,
        }
    }
    pub fn both(domid: u32) -> Perm {
        Perm {
            kind: PermKind::Both,
            domid,
        }
    }

    /// `n0`, `r5`, `w3`, `b7`.
    pub fn render(&self) -> String {
        let c = match self.kind {
            PermKind::None => 'n',
            PermKind::Read => 'r',
            PermKind::Write => 'w',
            PermKind::Both => 'b',
        };
        format!("{c}{}", self.domid)
    }

    pub fn parse(s: &str) -> Result<Perm, WireError> {
        let bad = |reason| WireError::BadPayload {
            what: "permission",
            reason,
        };
        let mut chars = s.chars();
        let kind = match chars.next() {
            Some('n') => PermKind::None,
            Some('r') => PermKind::Read,
            Some('w') => PermKind::Write,
            Some('b') => PermKind::Both,
            _ => return Err(bad("not one of n, r, w, b")),
        };
        let digits = chars.as_str();
        if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad("domain id is not a number"));
        }
        let domid = digits.parse().map_err(|_| bad("domain id out of range"))?;
        Ok(Perm { kind, domid })
    }
}

/// `path\0perm\0perm\0…`.
pub fn set_perms_payload(path: &str, perms: &[Perm]) -> Result<Vec<u8>, WireError> {
    if perms.is_empty() {
        return Err(WireError::BadPayload {
            what: "permission list",
            reason: "empty (the first entry names the owner)",
        });
    }
    let mut p = path_payload(path)?;
    for perm in perms {
        p.extend_from_slice(perm.render().as_bytes());
        p.push(0);
    }
    if p.len() > PAYLOAD_MAX {
        return Err(WireError::TooLong(p.len()));
    }
    Ok(p)
}

/// Splits a list of NUL-terminated strings (a directory listing, a
/// permission list, a watch event). Each must be UTF-8; a missing final
/// NUL is tolerated only for the last entry, as xenstored omits it for an
/// empty listing.
pub fn split_strings(payload: &[u8], what: &'static str) -> Result<Vec<String>, WireError> {
    if payload.is_empty() {
        return Ok(Vec::new());
    }
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    body.split(|b| *b == 0)
        .map(|s| {
            String::from_utf8(s.to_vec()).map_err(|_| WireError::BadPayload {
                what,
                reason: "not UTF-8",
            })
        })
        .collect()
}

/// A watch firing: the path that changed and the token it was set with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

impl WatchEvent {
    pub fn parse(payload: &[u8]) -> Result<WatchEvent, WireError> {
        let parts = split_strings(payload, "watch event")?;
        match <[String; 2]>::try_from(parts) {
            Ok([path, token]) => Ok(WatchEvent { path, token }),
            Err(_) => Err(WireError::BadPayload {
                what: "watch event",
                reason: "not a path and a token",
            }),
        }
    }
}

/// The errno name of an `XS_ERROR` reply (`ENOENT`, `EACCES`, …). Only
/// an uppercase name is accepted, so a hostile daemon cannot put arbitrary
/// text into our logs.
pub fn error_name(payload: &[u8]) -> Result<String, WireError> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if body.is_empty()
        || body.len() > 32
        || !body
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    {
        return Err(WireError::BadPayload {
            what: "error reply",
            reason: "not an errno name",
        });
    }
    Ok(String::from_utf8_lossy(body).into_owned())
}

/// The id in a `TRANSACTION_START` reply (decimal, NUL-terminated).
pub fn parse_tx_id(payload: &[u8]) -> Result<u32, WireError> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    let bad = WireError::BadPayload {
        what: "transaction id",
        reason: "not a non-zero decimal number",
    };
    let s = std::str::from_utf8(body).map_err(|_| bad.clone())?;
    match s.parse::<u32>() {
        Ok(id) if id != 0 && s.bytes().all(|c| c.is_ascii_digit()) => Ok(id),
        _ => Err(bad),
    }
}

/// Reassembles messages from a byte stream that may arrive in any
/// fragmentation.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, if one has arrived. A header over the cap
    /// is an error at once, before its payload is waited for.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        let Some(head) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = Header::parse(head)?;
        let total = HEADER_LEN + header.payload_len();
        if self.buf.len() < total {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(Message { header, payload }))
    }

    /// Bytes held that are not yet a whole message.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let m = request(MsgType::Read, 7, 3, b"/a\0").unwrap();
        assert_eq!(&m[0..4], &2u32.to_le_bytes());
        assert_eq!(&m[4..8], &7u32.to_le_bytes());
        assert_eq!(&m[8..12], &3u32.to_le_bytes());
        assert_eq!(&m[12..16], &3u32.to_le_bytes());
        assert_eq!(&m[16..], b"/a\0");
        assert!(request(MsgType::Read, 1, 0, &[0u8; 5000]).is_err());
        assert_eq!(
            write_payload("/x", b"v").unwrap(),
            b"/x\0v".to_vec(),
            "a written value is not terminated"
        );
        assert_eq!(
            watch_payload("@releaseDomain", "t").unwrap(),
            b"@releaseDomain\0t\0"
        );
    }

    #[test]
    fn paths_follow_xenstored() {
        for ok in [
            "/",
            "/local/domain/0/name",
            "data/vchan/0/111",
            "@introduceDomain",
            "a-b_c@d",
        ] {
            check_path(ok).unwrap();
        }
        for bad in ["", "/a//b", "/a/", "/a b", "/a\0", "@bad/path", "/é"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_path(&format!("/{}", "a".repeat(ABS_PATH_MAX))).is_err());
    }

    #[test]
    fn perms_round_trip() {
        let perms = [Perm::none(0), Perm::read(5), Perm::both(7), Perm::write(9)];
        for p in perms {
            assert_eq!(Perm::parse(&p.render()).unwrap(), p);
        }
        assert_eq!(
            set_perms_payload("/p", &perms[..2]).unwrap(),
            b"/p\0n0\0r5\0".to_vec()
        );
        for bad in ["", "x1", "r", "r-1", "r99999999999", "r1a"] {
            assert!(Perm::parse(bad).is_err(), "{bad:?}");
        }
        assert!(set_perms_payload("/p", &[]).is_err());
    }

    #[test]
    fn replies() {
        assert_eq!(split_strings(b"a\0b\0", "d").unwrap(), ["a", "b"]);
        assert!(split_strings(b"", "d").unwrap().is_empty());
        assert!(split_strings(b"\xff\0", "d").is_err());
        assert_eq!(
            WatchEvent::parse(b"/p\0tok\0").unwrap(),
            WatchEvent {
                path: "/p".into(),
                token: "tok".into()
            }
        );
        assert!(WatchEvent::parse(b"/p\0").is_err());
        assert!(WatchEvent::parse(b"/p\0t\0x\0").is_err());
        assert_eq!(error_name(b"ENOENT\0").unwrap(), "ENOENT");
        assert!(error_name(b"\x1b[31mhi\0").is_err());
        assert_eq!(parse_tx_id(b"42\0").unwrap(), 42);
        for bad in [&b"0\0"[..], b"+4\0", b"x", b""] {
            assert!(parse_tx_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn decoder_reassembles_and_refuses_oversized_headers() {
        let a = request(MsgType::Read, 1, 0, b"one").unwrap();
        let b = request(MsgType::WatchEvent, 0, 0, b"/p\0t\0").unwrap();
        let stream: Vec<u8> = [a, b].concat();
        let mut d = Decoder::default();
        let mut got = Vec::new();
        for byte in stream {
            d.push(&[byte]);
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].payload, b"one");
        assert_eq!(got[1].kind().unwrap(), MsgType::WatchEvent);
        assert_eq!(d.pending(), 0);

        let mut d = Decoder::default();
        let mut h = [0u8; HEADER_LEN];
        h[12..16].copy_from_slice(&100_000u32.to_le_bytes());
        d.push(&h);
        assert_eq!(d.next_message(), Err(WireError::TooLong(100_000)));
    }
}
