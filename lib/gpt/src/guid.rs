use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::Error;

/// A GUID stored in GPT's on-disk byte order: the first three fields are
/// little-endian, the last two are big-endian ("mixed-endian"). Keeping the
/// on-disk order means entries can be copied to and from the table verbatim.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID, which GPT uses to mark an unused entry.
    pub const ZERO: Guid = Guid([0; 16]);
    /// EFI System Partition.
    pub const ESP: Guid = Guid::from_fields(
        0xC12A_7328,
        0xF81F,
        0x11D2,
        [0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B],
    );
    /// Generic Linux filesystem data.
    pub const LINUX_FS: Guid = Guid::from_fields(
        0x0FC6_3DAF,
        0x8483,
        0x4772,
        [0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4],
    );
    /// Alias of [`Guid::LINUX_FS`], for partitions holding plain data.
    pub const LINUX_DATA: Guid = Guid::LINUX_FS;
    /// Root partition for x86-64 (Discoverable Partitions Specification).
    pub const ROOT_X86_64: Guid = Guid::from_fields(
        0x4F68_BCE3,
        0xE8CD,
        0x4DB1,
        [0x96, 0xE7, 0xFB, 0xCA, 0xF9, 0x84, 0xB7, 0x09],
    );
    /// Extended Boot Loader partition (Boot Loader Specification).
    pub const XBOOTLDR: Guid = Guid::from_fields(
        0xBC13_C2FF,
        0x59E6,
        0x4262,
        [0xA3, 0x52, 0xB2, 0x75, 0xFD, 0x6F, 0x71, 0x72],
    );

    /// Builds a GUID from the fields of its canonical text form
    /// `d1-d2-d3-d4[0..2]-d4[2..8]`.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// Builds a GUID from its 16 bytes in on-disk (mixed-endian) order.
    pub const fn from_bytes(bytes: [u8; 16]) -> Guid {
        Guid(bytes)
    }

    /// The 16 bytes in on-disk (mixed-endian) order.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn is_zero(&self) -> bool {
        *self == Guid::ZERO
    }

    /// Parses the canonical text form, e.g.
    /// `C12A7328-F81F-11D2-BA4B-00A0C93EC93B` (either letter case).
    pub fn parse(text: &str) -> Result<Guid, Error> {
        let invalid = |reason: &'static str| Error::InvalidGuid {
            input: text.to_owned(),
            reason,
        };
        let raw = text.as_bytes();
        if raw.len() != 36 {
            return Err(invalid("expected 36 characters"));
        }
        let mut canonical = [0u8; 16];
        let mut nibbles = 0usize;
        for (i, &c) in raw.iter().enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' {
                    return Err(invalid("expected '-' at positions 8, 13, 18 and 23"));
                }
                continue;
            }
            let v = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return Err(invalid("non-hexadecimal character")),
            };
            canonical[nibbles / 2] |= if nibbles.is_multiple_of(2) { v << 4 } else { v };
            nibbles += 1;
        }
        Ok(Guid::from_canonical(canonical))
    }

    /// Derives a stable name-based GUID from SHA-256 of the inputs, so that
    /// building the same image twice gives byte-identical partition tables.
    ///
    /// This follows the shape of RFC 4122 version 5 (hash of a namespace and
    /// a name, variant bits `10`) but sets the version nibble to 8, which
    /// RFC 9562 reserves for custom layouts such as a SHA-256 based one;
    /// claiming version 5 would promise SHA-1.
    pub fn derive(namespace: &str, name: &str) -> Guid {
        let mut hasher = Sha256::new();
        hasher.update(b"qgpt-derive-v1\0");
        // Length-prefix the namespace so ("ab", "c") and ("a", "bc") differ.
        hasher.update((namespace.len() as u64).to_le_bytes());
        hasher.update(namespace.as_bytes());
        hasher.update(name.as_bytes());
        let digest = hasher.finalize();
        let mut canonical = [0u8; 16];
        canonical.copy_from_slice(&digest[..16]);
        canonical[6] = (canonical[6] & 0x0F) | 0x80;
        canonical[8] = (canonical[8] & 0x3F) | 0x80;
        Guid::from_canonical(canonical)
    }

    /// Converts from the byte order of the text form (big-endian fields).
    fn from_canonical(mut b: [u8; 16]) -> Guid {
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        Guid(b)
    }

    fn to_canonical(self) -> [u8; 16] {
        let mut b = self.0;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        b
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.to_canonical();
        for (i, byte) in b.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

impl FromStr for Guid {
    type Err = Error;

    fn from_str(s: &str) -> Result<Guid, Error> {
        Guid::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esp_on_disk_bytes_are_mixed_endian() {
        assert_eq!(
            Guid::ESP.as_bytes(),
            &[
                0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E,
                0xC9, 0x3B
            ]
        );
    }

    #[test]
    fn parse_and_display_round_trip() {
        for (guid, text) in [
            (Guid::ESP, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
            (Guid::LINUX_FS, "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
            (Guid::ROOT_X86_64, "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
            (Guid::XBOOTLDR, "BC13C2FF-59E6-4262-A352-B275FD6F7172"),
        ] {
            assert_eq!(guid.to_string(), text);
            assert_eq!(Guid::parse(text).unwrap(), guid);
            assert_eq!(Guid::parse(&text.to_lowercase()).unwrap(), guid);
            assert_eq!(text.parse::<Guid>().unwrap(), guid);
        }
        assert_eq!(Guid::LINUX_DATA, Guid::LINUX_FS);
    }

    #[test]
    fn parse_rejects_malformed() {
        for bad in [
            "",
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93",
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93BB",
            "C12A7328F81F-11D2-BA4B-00A0C93EC93B0",
            "G12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            "C12A7328-F81F-11D2-BA4B+00A0C93EC93B",
            "{12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        ] {
            match Guid::parse(bad) {
                Err(Error::InvalidGuid { input, .. }) => assert_eq!(input, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn derive_is_stable_and_distinct() {
        let a = Guid::derive("image", "root_a");
        assert_eq!(a, Guid::derive("image", "root_a"));
        assert_ne!(a, Guid::derive("image", "root_b"));
        assert_ne!(a, Guid::derive("other", "root_a"));
        assert_ne!(Guid::derive("ab", "c"), Guid::derive("a", "bc"));
        let text = a.to_string();
        // Version nibble and RFC variant bits, as they appear in the text form.
        assert_eq!(&text[14..15], "8");
        assert!(matches!(&text[19..20], "8" | "9" | "A" | "B"), "{text}");
        // Pin the derivation: changing it silently would change every image.
        assert_eq!(
            Guid::derive("qgpt-test", "disk").to_string(),
            "3C1B3498-EF9D-8BA1-9311-B306591E2EB2"
        );
    }
}
