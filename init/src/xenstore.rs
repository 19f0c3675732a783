//! Just enough of the xenstore wire protocol for a readiness probe: does a
//! key exist? (One XS_READ over xenstored's unix socket.)

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const SOCKET: &str = "/run/xenstored/socket";
const XS_READ: u32 = 2;
const XS_ERROR: u32 = 16;
/// xenstored's own limit on a payload.
const XENSTORE_PAYLOAD_MAX: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum XsError {
    #[error("xenstore socket {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("xenstore: {0}")]
    Protocol(String),
}

/// Encodes a request: a 16-byte header (type, request id, transaction id,
/// length) and the payload.
pub fn encode(kind: u32, req_id: u32, payload: &[u8]) -> Result<Vec<u8>, XsError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= XENSTORE_PAYLOAD_MAX)
        .ok_or_else(|| XsError::Protocol("request too long".into()))?;
    let mut msg = Vec::with_capacity(16 + payload.len());
    for v in [kind, req_id, 0, len] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    msg.extend_from_slice(payload);
    Ok(msg)
}

/// Parses a reply header; the length is checked against the protocol cap
/// before anything is allocated for the payload.
pub fn decode_header(h: &[u8; 16]) -> Result<(u32, u32), XsError> {
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let (kind, len) = (word(0), word(12));
    if len > XENSTORE_PAYLOAD_MAX {
        return Err(XsError::Protocol(format!(
            "reply length {len} over the cap"
        )));
    }
    Ok((kind, len))
}

/// True if `key` exists in the store at `socket`.
pub fn exists(socket: &Path, key: &str) -> Result<bool, XsError> {
    let io = |source| XsError::Io {
        path: socket.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(1)))
        .map_err(io)?;
    let mut payload = key.as_bytes().to_vec();
    payload.push(0);
    s.write_all(&encode(XS_READ, 1, &payload)?).map_err(io)?;
    let mut h = [0u8; 16];
    s.read_exact(&mut h).map_err(io)?;
    let (kind, len) = decode_header(&h)?;
    let mut body = vec![0u8; usize::try_from(len).unwrap_or(0)];
    s.read_exact(&mut body).map_err(io)?;
    match kind {
        XS_READ => Ok(true),
        XS_ERROR if body.starts_with(b"ENOENT") => Ok(false),
        XS_ERROR => Err(XsError::Protocol(
            String::from_utf8_lossy(&body)
                .trim_end_matches('\0')
                .to_owned(),
        )),
        other => Err(XsError::Protocol(format!("unexpected reply type {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let m = encode(XS_READ, 7, b"/a\0").unwrap();
        assert_eq!(&m[0..4], &2u32.to_le_bytes());
        assert_eq!(&m[4..8], &7u32.to_le_bytes());
        assert_eq!(&m[12..16], &3u32.to_le_bytes());
        assert_eq!(&m[16..], b"/a\0");
        assert!(encode(XS_READ, 1, &[0u8; 5000]).is_err());
    }

    #[test]
    fn oversized_reply_is_refused() {
        let mut h = [0u8; 16];
        h[12..16].copy_from_slice(&100_000u32.to_le_bytes());
        assert!(decode_header(&h).is_err());
    }

    /// A fake xenstored on a socket pair answers ENOENT, then a value.
    #[test]
    fn probe_against_a_fake_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            for answer in [(XS_ERROR, b"ENOENT\0".to_vec()), (XS_READ, b"1".to_vec())] {
                let (mut c, _) = listener.accept().unwrap();
                let mut h = [0u8; 16];
                c.read_exact(&mut h).unwrap();
                let (_, len) = decode_header(&h).unwrap();
                let mut body = vec![0u8; len as usize];
                c.read_exact(&mut body).unwrap();
                assert_eq!(body, b"/local/domain/0/name\0");
                c.write_all(&encode(answer.0, 1, &answer.1).unwrap())
                    .unwrap();
            }
        });
        assert!(!exists(&path, "/local/domain/0/name").unwrap());
        assert!(exists(&path, "/local/domain/0/name").unwrap());
        t.join().unwrap();
    }
}
