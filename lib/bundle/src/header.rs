//! The fixed-size header. Parsed from exactly [`HEADER_LEN`] bytes; every
//! length it carries is checked against a cap before it is used.

pub const MAGIC: [u8; 8] = *b"QUPDBNDL";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
/// The manifest is small metadata; 64 KiB is far more than it needs.
pub const MAX_MANIFEST_LEN: u32 = 64 * 1024;
/// Enough for key rotation with a threshold, small enough to bound work.
pub const MAX_SIGNATURES: u32 = 16;
/// A public key (32 bytes) and its signature (64 bytes).
pub const SIGNATURE_ENTRY_LEN: u32 = 96;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub format_version: u32,
    pub signatures_len: u32,
    pub manifest_len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not an update bundle (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error("bundle format version {0} is not supported (this updater reads {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("header field `{field}`: {value} is over the cap of {cap}")]
    OverCap {
        field: &'static str,
        value: u32,
        cap: u32,
    },
    #[error("header field `{field}`: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

fn u32_at(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Header {
    pub fn new(signatures: u32, manifest_len: u32) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            signatures_len: signatures * SIGNATURE_ENTRY_LEN,
            manifest_len,
        }
    }

    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Self, HeaderError> {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[..8]);
        if magic != MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        let format_version = u32_at(b, 8);
        if format_version != FORMAT_VERSION {
            return Err(HeaderError::UnsupportedVersion(format_version));
        }
        let signatures_len = u32_at(b, 12);
        let manifest_len = u32_at(b, 16);
        if b[20..].iter().any(|x| *x != 0) {
            return Err(HeaderError::Invalid {
                field: "reserved",
                reason: "must be zero",
            });
        }
        let cap = MAX_SIGNATURES * SIGNATURE_ENTRY_LEN;
        if signatures_len > cap {
            return Err(HeaderError::OverCap {
                field: "signatures_len",
                value: signatures_len,
                cap,
            });
        }
        if signatures_len == 0 || !signatures_len.is_multiple_of(SIGNATURE_ENTRY_LEN) {
            return Err(HeaderError::Invalid {
                field: "signatures_len",
                reason: "must be a non-zero multiple of 96",
            });
        }
        if manifest_len > MAX_MANIFEST_LEN {
            return Err(HeaderError::OverCap {
                field: "manifest_len",
                value: manifest_len,
                cap: MAX_MANIFEST_LEN,
            });
        }
        if manifest_len == 0 {
            return Err(HeaderError::Invalid {
                field: "manifest_len",
                reason: "must not be zero",
            });
        }
        Ok(Self {
            format_version,
            signatures_len,
            manifest_len,
        })
    }

    /// The signature section's length in bytes. [`Header::parse`] capped
    /// it at `MAX_SIGNATURES` entries, so it fits any `usize`.
    pub fn signatures_bytes(&self) -> usize {
        self.signatures_len as usize
    }

    /// The manifest's length in bytes, capped at `MAX_MANIFEST_LEN` by
    /// [`Header::parse`].
    pub fn manifest_bytes(&self) -> usize {
        self.manifest_len as usize
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        b[12..16].copy_from_slice(&self.signatures_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.manifest_len.to_le_bytes());
        b
    }

    pub fn signature_count(&self) -> u32 {
        self.signatures_len / SIGNATURE_ENTRY_LEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = Header::new(2, 300);
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
        assert_eq!(h.signature_count(), 2);
    }

    #[test]
    fn each_field_is_checked() {
        let good = Header::new(1, 100).to_bytes();
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(Header::parse(&b), Err(HeaderError::BadMagic(_))));
        let mut b = good;
        b[8] = 2;
        assert_eq!(Header::parse(&b), Err(HeaderError::UnsupportedVersion(2)));
        let mut b = good;
        b[12..16].copy_from_slice(&(17 * 96u32).to_le_bytes());
        assert!(matches!(
            Header::parse(&b),
            Err(HeaderError::OverCap {
                field: "signatures_len",
                ..
            })
        ));
        let mut b = good;
        b[12..16].copy_from_slice(&95u32.to_le_bytes());
        assert!(matches!(
            Header::parse(&b),
            Err(HeaderError::Invalid {
                field: "signatures_len",
                ..
            })
        ));
        let mut b = good;
        b[12..16].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            Header::parse(&b),
            Err(HeaderError::Invalid {
                field: "signatures_len",
                ..
            })
        ));
        let mut b = good;
        b[16..20].copy_from_slice(&(MAX_MANIFEST_LEN + 1).to_le_bytes());
        assert!(matches!(
            Header::parse(&b),
            Err(HeaderError::OverCap {
                field: "manifest_len",
                ..
            })
        ));
        let mut b = good;
        b[16..20].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            Header::parse(&b),
            Err(HeaderError::Invalid {
                field: "manifest_len",
                ..
            })
        ));
        let mut b = good;
        b[63] = 1;
        assert!(matches!(
            Header::parse(&b),
            Err(HeaderError::Invalid {
                field: "reserved",
                ..
            })
        ));
    }
}
