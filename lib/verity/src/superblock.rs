//! The 512-byte veritysetup superblock (`struct verity_sb` in cryptsetup's
//! `lib/verity/verity.c`).
//!
//! The kernel never reads it; it exists so that `veritysetup verify/open`
//! need only the root hash and the hash offset. We also read it back when
//! re-verifying a written slot, and that slot may hold anything, so parsing
//! validates every field before any of them is used as a size.

use std::io::{Read, Seek, SeekFrom};

use crate::{check_block_size, Error, VerityParams, MAX_SALT_SIZE};

/// Size of the on-disk superblock in bytes.
pub const SUPERBLOCK_SIZE: usize = 512;

const SIGNATURE: [u8; 8] = *b"verity\0\0";
const SB_VERSION: u32 = 1;
/// Hash type 1 is the "normal" format (salt first, hash blocks zero padded);
/// 0 is the Chrome OS variant, which this crate does not produce.
const HASH_TYPE: u32 = 1;
const ALGORITHM: &str = "sha256";

// Field offsets of the packed little-endian `struct verity_sb`.
const OFF_VERSION: usize = 8;
const OFF_HASH_TYPE: usize = 12;
const OFF_UUID: usize = 16;
const OFF_ALGORITHM: usize = 32;
const ALGORITHM_LEN: usize = 32;
const OFF_DATA_BLOCK_SIZE: usize = 64;
const OFF_HASH_BLOCK_SIZE: usize = 68;
const OFF_DATA_BLOCKS: usize = 72;
const OFF_SALT_SIZE: usize = 80;
const OFF_SALT: usize = 88;

/// Decoded contents of a veritysetup superblock.
///
/// Values obtained from [`Superblock::parse`] or [`read_superblock`] are
/// validated: block sizes are powers of two that veritysetup accepts, the salt
/// is at most 256 bytes and `data_blocks * data_block_size` fits a 63-bit byte
/// offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// UUID of the hash device, bytes in textual order (as `uuid_parse`).
    pub uuid: [u8; 16],
    /// Data block size in bytes.
    pub data_block_size: u32,
    /// Hash block size in bytes.
    pub hash_block_size: u32,
    /// Number of data blocks covered by the tree.
    pub data_blocks: u64,
    /// Salt, hashed before every block.
    pub salt: Vec<u8>,
}

impl Superblock {
    /// Encodes the superblock, rejecting values [`Superblock::parse`] would
    /// reject so that whatever is written can be read back.
    pub fn to_bytes(&self) -> Result<[u8; SUPERBLOCK_SIZE], Error> {
        self.validate()?;
        let salt_size = u16::try_from(self.salt.len()).map_err(|_| Error::SaltTooLong {
            len: self.salt.len(),
        })?;
        let mut b = [0u8; SUPERBLOCK_SIZE];
        b[..8].copy_from_slice(&SIGNATURE);
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&SB_VERSION.to_le_bytes());
        b[OFF_HASH_TYPE..OFF_HASH_TYPE + 4].copy_from_slice(&HASH_TYPE.to_le_bytes());
        b[OFF_UUID..OFF_UUID + 16].copy_from_slice(&self.uuid);
        b[OFF_ALGORITHM..OFF_ALGORITHM + ALGORITHM.len()].copy_from_slice(ALGORITHM.as_bytes());
        b[OFF_DATA_BLOCK_SIZE..OFF_DATA_BLOCK_SIZE + 4]
            .copy_from_slice(&self.data_block_size.to_le_bytes());
        b[OFF_HASH_BLOCK_SIZE..OFF_HASH_BLOCK_SIZE + 4]
            .copy_from_slice(&self.hash_block_size.to_le_bytes());
        b[OFF_DATA_BLOCKS..OFF_DATA_BLOCKS + 8].copy_from_slice(&self.data_blocks.to_le_bytes());
        b[OFF_SALT_SIZE..OFF_SALT_SIZE + 2].copy_from_slice(&salt_size.to_le_bytes());
        b[OFF_SALT..OFF_SALT + self.salt.len()].copy_from_slice(&self.salt);
        Ok(b)
    }

    /// Decodes and validates a superblock.
    pub fn parse(b: &[u8; SUPERBLOCK_SIZE]) -> Result<Self, Error> {
        let mut signature = [0u8; 8];
        signature.copy_from_slice(&b[..8]);
        if signature != SIGNATURE {
            return Err(Error::BadSignature { found: signature });
        }
        let version = le_u32(b, OFF_VERSION);
        if version != SB_VERSION {
            return Err(Error::UnsupportedVersion { version });
        }
        let hash_type = le_u32(b, OFF_HASH_TYPE);
        if hash_type != HASH_TYPE {
            return Err(Error::UnsupportedHashType { hash_type });
        }
        // Strict: exactly "sha256" NUL padded, as cryptsetup writes it with
        // strncpy; anything else was not written by a format we produce.
        let algorithm = &b[OFF_ALGORITHM..OFF_ALGORITHM + ALGORITHM_LEN];
        let (name, rest) = algorithm.split_at(ALGORITHM.len());
        if name != ALGORITHM.as_bytes() || rest.iter().any(|&c| c != 0) {
            let end = algorithm
                .iter()
                .position(|&c| c == 0)
                .unwrap_or(ALGORITHM_LEN);
            return Err(Error::UnsupportedAlgorithm {
                algorithm: String::from_utf8_lossy(&algorithm[..end]).into_owned(),
            });
        }
        let salt_size = usize::from(le_u16(b, OFF_SALT_SIZE));
        if salt_size > MAX_SALT_SIZE {
            return Err(Error::SaltTooLong { len: salt_size });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[OFF_UUID..OFF_UUID + 16]);
        let sb = Superblock {
            uuid,
            data_block_size: le_u32(b, OFF_DATA_BLOCK_SIZE),
            hash_block_size: le_u32(b, OFF_HASH_BLOCK_SIZE),
            data_blocks: le_u64(b, OFF_DATA_BLOCKS),
            salt: b[OFF_SALT..OFF_SALT + salt_size].to_vec(),
        };
        sb.validate()?;
        Ok(sb)
    }

    fn validate(&self) -> Result<(), Error> {
        check_block_size("data_block_size", self.data_block_size)?;
        check_block_size("hash_block_size", self.hash_block_size)?;
        if self.salt.len() > MAX_SALT_SIZE {
            return Err(Error::SaltTooLong {
                len: self.salt.len(),
            });
        }
        // cryptsetup keeps byte offsets in a signed off_t.
        let fits = self
            .data_blocks
            .checked_mul(u64::from(self.data_block_size))
            .is_some_and(|size| i64::try_from(size).is_ok());
        if self.data_blocks == 0 || !fits {
            return Err(Error::DataBlocksOutOfRange {
                data_blocks: self.data_blocks,
                data_block_size: self.data_block_size,
            });
        }
        Ok(())
    }

    /// The parameters to rebuild or re-verify the tree this superblock
    /// describes.
    pub fn params(&self) -> VerityParams {
        VerityParams {
            data_block_size: self.data_block_size,
            hash_block_size: self.hash_block_size,
            salt: self.salt.clone(),
            uuid: self.uuid,
        }
    }

    /// Size of the covered data in bytes (cannot overflow once validated).
    pub fn data_size(&self) -> u64 {
        self.data_blocks
            .saturating_mul(u64::from(self.data_block_size))
    }
}

/// Reads and validates the superblock at byte `offset` of `hash_dev`.
pub fn read_superblock<R: Read + Seek>(mut hash_dev: R, offset: u64) -> Result<Superblock, Error> {
    let mut b = [0u8; SUPERBLOCK_SIZE];
    hash_dev
        .seek(SeekFrom::Start(offset))
        .and_then(|_| hash_dev.read_exact(&mut b))
        .map_err(|source| Error::ReadSuperblock { offset, source })?;
    Superblock::parse(&b)
}

fn le_u16(b: &[u8; SUPERBLOCK_SIZE], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8; SUPERBLOCK_SIZE], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8; SUPERBLOCK_SIZE], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn sample() -> Superblock {
        Superblock {
            uuid: [
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef,
            ],
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: 1,
            salt: vec![0x00, 0x11],
        }
    }

    /// Superblock that veritysetup 2.6.1 wrote for `format --data-blocks=1
    /// --salt=0011 --uuid=01234567-89ab-cdef-0123-456789abcdef`.
    fn veritysetup_bytes() -> [u8; SUPERBLOCK_SIZE] {
        let mut b = [0u8; SUPERBLOCK_SIZE];
        let head: [u8; 0x5a] = [
            0x76, 0x65, 0x72, 0x69, 0x74, 0x79, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00,
            0x00, 0x00, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67,
            0x89, 0xab, 0xcd, 0xef, 0x73, 0x68, 0x61, 0x32, 0x35, 0x36, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x10,
            0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x11,
        ];
        b[..head.len()].copy_from_slice(&head);
        b
    }

    #[test]
    fn encodes_like_veritysetup() {
        assert_eq!(sample().to_bytes().unwrap(), veritysetup_bytes());
    }

    #[test]
    fn round_trip() {
        let mut sb = sample();
        sb.salt = (0..=255).collect();
        sb.data_block_size = 512;
        sb.hash_block_size = 512 * 1024;
        sb.data_blocks = 123_456_789;
        let parsed = Superblock::parse(&sb.to_bytes().unwrap()).unwrap();
        assert_eq!(parsed, sb);
        assert_eq!(parsed.params().salt, sb.salt);
        assert_eq!(parsed.data_size(), 123_456_789 * 512);

        let mut empty_salt = sample();
        empty_salt.salt.clear();
        let parsed = Superblock::parse(&empty_salt.to_bytes().unwrap()).unwrap();
        assert_eq!(parsed, empty_salt);
    }

    #[test]
    fn read_at_offset() {
        let mut dev = vec![0xaa; 8192];
        dev[4096..4608].copy_from_slice(&sample().to_bytes().unwrap());
        assert_eq!(read_superblock(Cursor::new(&dev), 4096).unwrap(), sample());
        let short = read_superblock(Cursor::new(&dev), 8000);
        assert!(matches!(
            short,
            Err(Error::ReadSuperblock { offset: 8000, .. })
        ));
    }

    fn corrupt(f: impl FnOnce(&mut [u8; SUPERBLOCK_SIZE])) -> Error {
        let mut b = veritysetup_bytes();
        f(&mut b);
        Superblock::parse(&b).unwrap_err()
    }

    #[test]
    fn rejects_bad_signature() {
        let e = corrupt(|b| b[0] = b'V');
        assert!(matches!(e, Error::BadSignature { found } if &found == b"Verity\0\0"));
        assert!(e.to_string().contains("signature"), "{e}");
    }

    #[test]
    fn rejects_bad_version() {
        let e = corrupt(|b| b[OFF_VERSION] = 2);
        assert!(matches!(e, Error::UnsupportedVersion { version: 2 }));
        assert!(e.to_string().contains("version"), "{e}");
    }

    #[test]
    fn rejects_chrome_os_hash_type() {
        let e = corrupt(|b| b[OFF_HASH_TYPE] = 0);
        assert!(matches!(e, Error::UnsupportedHashType { hash_type: 0 }));
        assert!(e.to_string().contains("hash_type"), "{e}");
    }

    #[test]
    fn rejects_other_algorithms() {
        let e = corrupt(|b| b[OFF_ALGORITHM + 5] = b'5');
        assert!(matches!(&e, Error::UnsupportedAlgorithm { algorithm } if algorithm == "sha255"));
        assert!(e.to_string().contains("algorithm"), "{e}");
        // Garbage after the NUL would be ignored by cryptsetup; we reject it.
        let e = corrupt(|b| b[OFF_ALGORITHM + 31] = b'x');
        assert!(matches!(e, Error::UnsupportedAlgorithm { .. }));
        let e = corrupt(|b| b[OFF_ALGORITHM..OFF_ALGORITHM + 32].fill(b'a'));
        assert!(matches!(e, Error::UnsupportedAlgorithm { .. }));
    }

    #[test]
    fn rejects_bad_block_sizes() {
        for (off, field) in [
            (OFF_DATA_BLOCK_SIZE, "data_block_size"),
            (OFF_HASH_BLOCK_SIZE, "hash_block_size"),
        ] {
            for bad in [0u32, 256, 1000, 4097, 1024 * 1024, u32::MAX] {
                let e = corrupt(|b| b[off..off + 4].copy_from_slice(&bad.to_le_bytes()));
                assert!(
                    matches!(e, Error::InvalidBlockSize { field: f, value } if f == field && value == bad),
                    "{field}={bad}: {e}"
                );
                assert!(e.to_string().contains(field), "{e}");
            }
        }
    }

    #[test]
    fn rejects_oversized_salt() {
        let e =
            corrupt(|b| b[OFF_SALT_SIZE..OFF_SALT_SIZE + 2].copy_from_slice(&257u16.to_le_bytes()));
        assert!(matches!(e, Error::SaltTooLong { len: 257 }));
        assert!(e.to_string().contains("salt"), "{e}");
        let e = corrupt(|b| b[OFF_SALT_SIZE..OFF_SALT_SIZE + 2].fill(0xff));
        assert!(matches!(e, Error::SaltTooLong { len: 65535 }));
    }

    #[test]
    fn rejects_data_blocks_out_of_range() {
        let set = |n: u64| {
            move |b: &mut [u8; SUPERBLOCK_SIZE]| {
                b[OFF_DATA_BLOCKS..OFF_DATA_BLOCKS + 8].copy_from_slice(&n.to_le_bytes());
            }
        };
        for bad in [
            0,
            u64::MAX,
            u64::MAX / 4096 + 1,
            (i64::MAX as u64) / 4096 + 1,
        ] {
            let e = corrupt(set(bad));
            assert!(
                matches!(e, Error::DataBlocksOutOfRange { data_blocks, .. } if data_blocks == bad),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains("data_blocks"), "{e}");
        }
        let max = (i64::MAX as u64) / 4096;
        let mut b = veritysetup_bytes();
        set(max)(&mut b);
        assert_eq!(Superblock::parse(&b).unwrap().data_blocks, max);
    }

    #[test]
    fn to_bytes_refuses_what_parse_would_reject() {
        let mut sb = sample();
        sb.salt = vec![0; 257];
        assert!(matches!(
            sb.to_bytes(),
            Err(Error::SaltTooLong { len: 257 })
        ));
        let mut sb = sample();
        sb.hash_block_size = 3000;
        assert!(matches!(
            sb.to_bytes(),
            Err(Error::InvalidBlockSize {
                field: "hash_block_size",
                ..
            })
        ));
    }
}
