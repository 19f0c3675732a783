//! dm-verity hash trees in pure Rust.
//!
//! Produces exactly what `veritysetup format` produces for format version 1
//! with sha256: a 512-byte superblock at the start of the hash area, then the
//! hash tree, highest level first. The result is accepted by
//! `veritysetup verify` and by the kernel's `verity` device-mapper target
//! (see [`VerityInfo::kernel_table`]).
//!
//! Everything is streaming: the data is read once, in order, and only one
//! hash block per tree level is held in memory.
//!
//! ```no_run
//! # fn main() -> Result<(), verity::Error> {
//! let params = verity::VerityParams::new(b"build-1234".to_vec(), [7; 16])?;
//! let info = verity::append_tree(std::path::Path::new("rootfs.img"), &params)?;
//! println!("0 {} verity {}", info.data_sectors(), info.kernel_table("/dev/sda2", "/dev/sda2"));
//! # Ok(())
//! # }
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

mod superblock;
mod tree;

pub use superblock::{read_superblock, Superblock, SUPERBLOCK_SIZE};

use tree::{Layout, TreeBuilder};

/// The largest salt the superblock (and cryptsetup) can hold.
pub const MAX_SALT_SIZE: usize = 256;

/// Block size used by `veritysetup` unless told otherwise.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

/// cryptsetup's `VERITY_BLOCK_SIZE_OK`: anything outside it is refused by
/// `veritysetup`, so we refuse to write it.
const MIN_BLOCK_SIZE: u32 = 512;
const MAX_BLOCK_SIZE: u32 = 512 * 1024;

/// Data is read in chunks of about this size to keep syscalls few.
const READ_CHUNK: usize = 1024 * 1024;

/// Everything that can go wrong; each variant names the offending field or
/// the file and offset involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A block size is not a power of two in 512..=524288 bytes.
    #[error("{field} = {value}: must be a power of two from 512 to 524288 bytes")]
    InvalidBlockSize {
        /// `data_block_size` or `hash_block_size`.
        field: &'static str,
        /// The rejected value.
        value: u32,
    },
    /// The salt (or a superblock's `salt_size`) exceeds 256 bytes.
    #[error("salt_size = {len}: the superblock holds at most 256 bytes of salt")]
    SaltTooLong {
        /// The rejected length.
        len: usize,
    },
    /// The data size is not a whole number of data blocks.
    #[error("data_size = {data_size} is not a multiple of data_block_size = {data_block_size}")]
    UnalignedDataSize {
        /// The rejected size in bytes.
        data_size: u64,
        /// The data block size it had to be a multiple of.
        data_block_size: u32,
    },
    /// There is no data to protect.
    #[error("data_size = 0: dm-verity needs at least one data block")]
    EmptyData,
    /// veritysetup only reads superblocks at 512-byte aligned offsets.
    #[error("hash_offset = {hash_offset} is not a multiple of 512")]
    UnalignedHashOffset {
        /// The rejected offset in bytes.
        hash_offset: u64,
    },
    /// A byte offset or block count does not fit in 64 bits.
    #[error("{field} is too large: the hash area would end beyond 2^64 bytes")]
    Overflow {
        /// The input that made it overflow.
        field: &'static str,
    },
    /// The data reader ended before `data_size` bytes.
    #[error("data ended after {read} bytes, expected data_size = {data_size}")]
    DataTooShort {
        /// Bytes actually available.
        read: u64,
        /// Bytes promised by the caller.
        data_size: u64,
    },
    /// Reading the data failed.
    #[error("reading data at byte {offset}: {source}")]
    ReadData {
        /// Offset within the data where the read failed.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// Writing the hash area failed.
    #[error("writing hash area at byte {offset}: {source}")]
    WriteHash {
        /// Offset within the hash device where the write failed.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// Opening, inspecting or syncing a file failed.
    #[error("cannot {op} {}: {source}", path.display())]
    File {
        /// What was being done: "open", "stat", "sync".
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The superblock could not be read at all.
    #[error("reading superblock at byte {offset}: {source}")]
    ReadSuperblock {
        /// Offset of the superblock on the hash device.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// The superblock signature is not `verity\0\0`.
    #[error("superblock signature = {found:02x?}: not a veritysetup superblock")]
    BadSignature {
        /// The 8 bytes found instead.
        found: [u8; 8],
    },
    /// The superblock's `version` is not 1.
    #[error("superblock version = {version}: only version 1 is supported")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// The superblock's `hash_type` is not 1 (normal, salt first).
    #[error("superblock hash_type = {hash_type}: only hash type 1 is supported")]
    UnsupportedHashType {
        /// The hash type found.
        hash_type: u32,
    },
    /// The superblock's `algorithm` is not exactly `sha256`.
    #[error("superblock algorithm = {algorithm:?}: only sha256 is supported")]
    UnsupportedAlgorithm {
        /// The name found, up to its first NUL.
        algorithm: String,
    },
    /// The superblock's `data_blocks` is 0 or describes more than 2^63 bytes.
    #[error(
        "superblock data_blocks = {data_blocks} (data_block_size = {data_block_size}): \
         must be at least 1 and cover less than 2^63 bytes"
    )]
    DataBlocksOutOfRange {
        /// The count found.
        data_blocks: u64,
        /// The block size it was multiplied with.
        data_block_size: u32,
    },
    /// A line of a `root.verity` file ([`VerityInfo::from_text`]) is wrong.
    #[error("root.verity line {line}: `{field}`: {reason}")]
    InfoText {
        /// 1-based line number (0: the file as a whole).
        line: usize,
        /// The key, or the line's text when it has none.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

pub(crate) fn check_block_size(field: &'static str, value: u32) -> Result<(), Error> {
    if value.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&value) {
        Ok(())
    } else {
        Err(Error::InvalidBlockSize { field, value })
    }
}

/// How to build a tree.
///
/// Block sizes must be powers of two from 512 to 512 KiB (what veritysetup
/// accepts); the kernel additionally refuses a `data_block_size` above the
/// page size, so keep the 4096 default for anything it should mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityParams {
    /// Data block size in bytes.
    pub data_block_size: u32,
    /// Hash block size in bytes.
    pub hash_block_size: u32,
    /// Salt hashed before every block. Caller-chosen so builds can be
    /// reproducible (e.g. derived from a build id); at most 256 bytes, may be
    /// empty.
    pub salt: Vec<u8>,
    /// UUID stored in the superblock, bytes in textual order.
    pub uuid: [u8; 16],
}

impl VerityParams {
    /// Parameters with 4096-byte data and hash blocks.
    pub fn new(salt: Vec<u8>, uuid: [u8; 16]) -> Result<Self, Error> {
        let params = VerityParams {
            data_block_size: DEFAULT_BLOCK_SIZE,
            hash_block_size: DEFAULT_BLOCK_SIZE,
            salt,
            uuid,
        };
        params.validate()?;
        Ok(params)
    }

    /// Checks block sizes and salt length; every entry point calls this, as
    /// the fields are public.
    pub fn validate(&self) -> Result<(), Error> {
        check_block_size("data_block_size", self.data_block_size)?;
        check_block_size("hash_block_size", self.hash_block_size)?;
        if self.salt.len() > MAX_SALT_SIZE {
            return Err(Error::SaltTooLong {
                len: self.salt.len(),
            });
        }
        Ok(())
    }

    fn data_blocks(&self, data_size: u64) -> Result<u64, Error> {
        let block = u64::from(self.data_block_size);
        if !data_size.is_multiple_of(block) {
            return Err(Error::UnalignedDataSize {
                data_size,
                data_block_size: self.data_block_size,
            });
        }
        if data_size == 0 {
            return Err(Error::EmptyData);
        }
        Ok(data_size / block)
    }

    /// Hash-block index where the tree starts: the first hash block after the
    /// superblock (cryptsetup's `VERITY_hash_offset_block`).
    fn tree_start_block(&self, hash_offset: u64) -> Result<u64, Error> {
        if !hash_offset.is_multiple_of(SUPERBLOCK_SIZE as u64) {
            return Err(Error::UnalignedHashOffset { hash_offset });
        }
        let block = u64::from(self.hash_block_size);
        let end = hash_offset
            .checked_add(SUPERBLOCK_SIZE as u64 + block - 1)
            .ok_or(Error::Overflow {
                field: "hash_offset",
            })?;
        Ok(end / block)
    }
}

/// What was written, and everything needed to activate or verify it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityInfo {
    /// The root hash to pass to the kernel or to `veritysetup`.
    pub root_hash: [u8; 32],
    /// Salt used.
    pub salt: Vec<u8>,
    /// UUID written to the superblock.
    pub uuid: [u8; 16],
    /// Number of data blocks covered.
    pub data_blocks: u64,
    /// Data block size in bytes.
    pub data_block_size: u32,
    /// Hash block size in bytes.
    pub hash_block_size: u32,
    /// Byte offset of the superblock on the hash device (`--hash-offset`).
    pub hash_offset: u64,
    /// Hash-block index where the tree starts: the kernel table's
    /// `<hash_start_block>`, which skips the superblock.
    pub hash_start_block: u64,
    /// Bytes from `hash_offset` to the end of the tree, superblock included.
    pub tree_size: u64,
}

/// Keys of the `root.verity` text form, in the order written.
const INFO_KEYS: [&str; 9] = [
    "root_hash",
    "salt",
    "uuid",
    "data_blocks",
    "data_block_size",
    "hash_block_size",
    "hash_offset",
    "hash_start_block",
    "tree_size",
];

impl VerityInfo {
    /// The text form kept next to a built root image (`root.verity`):
    /// `key=value` lines, hex for byte strings.
    pub fn to_text(&self) -> String {
        let values = [
            hex::encode(self.root_hash),
            hex::encode(&self.salt),
            hex::encode(self.uuid),
            self.data_blocks.to_string(),
            self.data_block_size.to_string(),
            self.hash_block_size.to_string(),
            self.hash_offset.to_string(),
            self.hash_start_block.to_string(),
            self.tree_size.to_string(),
        ];
        INFO_KEYS
            .iter()
            .zip(values)
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }

    /// Parses [`VerityInfo::to_text`]'s output: every key exactly once,
    /// nothing else, and block sizes and salt as `VerityParams` allows.
    pub fn from_text(text: &str) -> Result<Self, Error> {
        let mut found: [Option<(usize, &str)>; INFO_KEYS.len()] = [None; INFO_KEYS.len()];
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |field: &str, reason: &str| Error::InfoText {
                line,
                field: field.to_owned(),
                reason: reason.to_owned(),
            };
            if raw.trim().is_empty() {
                continue;
            }
            let (k, v) = raw
                .split_once('=')
                .ok_or_else(|| err(raw, "not key=value"))?;
            let slot = INFO_KEYS
                .iter()
                .position(|known| *known == k)
                .ok_or_else(|| err(k, "unknown key"))?;
            if found[slot].replace((line, v)).is_some() {
                return Err(err(k, "given twice"));
            }
        }
        let get = |idx: usize| {
            found[idx].ok_or_else(|| Error::InfoText {
                line: 0,
                field: INFO_KEYS[idx].to_owned(),
                reason: "missing".into(),
            })
        };
        let num = |idx: usize| -> Result<u64, Error> {
            let (line, v) = get(idx)?;
            v.parse().map_err(|_| Error::InfoText {
                line,
                field: INFO_KEYS[idx].to_owned(),
                reason: format!("{v:?} is not a number"),
            })
        };
        let bytes = |idx: usize, len: Option<usize>| -> Result<Vec<u8>, Error> {
            let (line, v) = get(idx)?;
            let b = hex::decode(v).map_err(|e| Error::InfoText {
                line,
                field: INFO_KEYS[idx].to_owned(),
                reason: format!("not hex: {e}"),
            })?;
            match len {
                Some(n) if b.len() != n => Err(Error::InfoText {
                    line,
                    field: INFO_KEYS[idx].to_owned(),
                    reason: format!("{} bytes, expected {n}", b.len()),
                }),
                _ => Ok(b),
            }
        };
        let small = |idx: usize| -> Result<u32, Error> {
            let v = num(idx)?;
            let v = u32::try_from(v).map_err(|_| Error::InfoText {
                line: get(idx).map_or(0, |(l, _)| l),
                field: INFO_KEYS[idx].to_owned(),
                reason: format!("{v} does not fit 32 bits"),
            })?;
            check_block_size(INFO_KEYS[idx], v)?;
            Ok(v)
        };
        let mut root_hash = [0u8; 32];
        root_hash.copy_from_slice(&bytes(0, Some(32))?);
        let salt = bytes(1, None)?;
        if salt.len() > MAX_SALT_SIZE {
            return Err(Error::SaltTooLong { len: salt.len() });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&bytes(2, Some(16))?);
        // At least one block, and a size that fits a byte count: stage 1
        // builds its dm table from this, and a bad value should be named
        // here rather than come back from the kernel as a bare EINVAL.
        let data_blocks = num(3)?;
        let data_block_size = small(4)?;
        if data_blocks == 0
            || data_blocks
                .checked_mul(u64::from(data_block_size))
                .is_none()
        {
            return Err(Error::InfoText {
                line: get(3).map_or(0, |(l, _)| l),
                field: INFO_KEYS[3].to_owned(),
                reason: format!(
                    "{data_blocks} blocks of {data_block_size} bytes is not a device size"
                ),
            });
        }
        Ok(Self {
            root_hash,
            salt,
            uuid,
            data_blocks,
            data_block_size,
            hash_block_size: small(5)?,
            hash_offset: num(6)?,
            hash_start_block: num(7)?,
            tree_size: num(8)?,
        })
    }

    /// The root hash in lowercase hex.
    pub fn root_hash_hex(&self) -> String {
        hex::encode(self.root_hash)
    }

    /// Length of the data in 512-byte sectors: the length field of the
    /// device-mapper table line `0 <sectors> verity <kernel_table>`.
    pub fn data_sectors(&self) -> u64 {
        self.data_blocks
            .saturating_mul(u64::from(self.data_block_size / 512))
    }

    /// The `verity` target parameters (everything after `verity` in a dm
    /// table line):
    /// `1 <data_dev> <hash_dev> <data_block_size> <hash_block_size>
    /// <data_blocks> <hash_start_block> sha256 <root_hash> <salt|->`.
    pub fn kernel_table(&self, data_dev: &str, hash_dev: &str) -> String {
        let salt = if self.salt.is_empty() {
            "-".to_owned()
        } else {
            hex::encode(&self.salt)
        };
        format!(
            "1 {data_dev} {hash_dev} {} {} {} {} sha256 {} {salt}",
            self.data_block_size,
            self.hash_block_size,
            self.data_blocks,
            self.hash_start_block,
            self.root_hash_hex(),
        )
    }

    /// Arguments for `veritysetup verify`:
    /// `[data_dev, hash_dev, <root_hash>, --hash-offset=<hash_offset>]`; the
    /// remaining parameters come from the superblock.
    pub fn veritysetup_args(&self, data_dev: &str, hash_dev: &str) -> Vec<String> {
        vec![
            data_dev.to_owned(),
            hash_dev.to_owned(),
            self.root_hash_hex(),
            format!("--hash-offset={}", self.hash_offset),
        ]
    }
}

/// Size in bytes of superblock plus tree for `data_size` bytes of data, when
/// the hash area starts on a hash block boundary (e.g. for sizing a hash
/// partition).
pub fn hash_area_size(data_size: u64, params: &VerityParams) -> Result<u64, Error> {
    params.validate()?;
    let data_blocks = params.data_blocks(data_size)?;
    let start = params.tree_start_block(0)?;
    let layout = Layout::new(data_blocks, params.hash_block_size, start)?;
    Ok((start + layout.tree_blocks) * u64::from(params.hash_block_size))
}

/// Reads `data_size` bytes of `data` once and writes the superblock and hash
/// tree to `hash_out` starting at byte `hash_offset` (a multiple of 512).
///
/// Only the hash area is written; bytes before `hash_offset` are left alone,
/// so the hash area may share a file or device with the data. The superblock
/// is written last, so an interrupted build never looks complete.
pub fn build_tree<R: Read, W: Write + Seek>(
    data: R,
    data_size: u64,
    params: &VerityParams,
    mut hash_out: W,
    hash_offset: u64,
) -> Result<VerityInfo, Error> {
    params.validate()?;
    let data_blocks = params.data_blocks(data_size)?;
    let tree_start_block = params.tree_start_block(hash_offset)?;
    let layout = Layout::new(data_blocks, params.hash_block_size, tree_start_block)?;
    let block = u64::from(params.hash_block_size);

    // Blocks of one level are consecutive on disk, so most writes follow the
    // previous one and need no seek (which would also flush a BufWriter).
    let mut position = None;
    let mut write_at = |offset: u64, bytes: &[u8]| -> Result<(), Error> {
        let err = |source| Error::WriteHash { offset, source };
        if position != Some(offset) {
            hash_out.seek(SeekFrom::Start(offset)).map_err(err)?;
        }
        hash_out.write_all(bytes).map_err(err)?;
        position = Some(offset + bytes.len() as u64);
        Ok(())
    };

    let mut builder = TreeBuilder::new(
        &layout,
        params.hash_block_size,
        &params.salt,
        |index, bytes| write_at(index * block, bytes),
    );
    feed(data, data_size, params.data_block_size, &mut builder)?;
    let root_hash = builder.finish()?;

    let superblock = Superblock {
        uuid: params.uuid,
        data_block_size: params.data_block_size,
        hash_block_size: params.hash_block_size,
        data_blocks,
        salt: params.salt.clone(),
    };
    // Zero the gap up to the tree too: a reused slot may hold stale bytes
    // there, and veritysetup's output has zeros.
    let tree_start = tree_start_block * block;
    // At most one hash block plus the superblock, so it always fits.
    let head_len = usize::try_from(tree_start - hash_offset).map_err(|_| Error::Overflow {
        field: "hash_block_size",
    })?;
    let mut head = vec![0u8; head_len];
    head[..SUPERBLOCK_SIZE].copy_from_slice(&superblock.to_bytes()?);
    write_at(hash_offset, &head)?;
    hash_out.flush().map_err(|source| Error::WriteHash {
        offset: hash_offset,
        source,
    })?;

    Ok(VerityInfo {
        root_hash,
        salt: params.salt.clone(),
        uuid: params.uuid,
        data_blocks,
        data_block_size: params.data_block_size,
        hash_block_size: params.hash_block_size,
        hash_offset,
        hash_start_block: tree_start_block,
        tree_size: tree_start + layout.tree_blocks * block - hash_offset,
    })
}

/// Computes the root hash of `data_size` bytes of `data` without writing
/// anything, e.g. to re-verify a written slot against an expected root hash
/// (with parameters from [`read_superblock`]).
pub fn compute_root_hash<R: Read>(
    data: R,
    data_size: u64,
    params: &VerityParams,
) -> Result<[u8; 32], Error> {
    params.validate()?;
    let data_blocks = params.data_blocks(data_size)?;
    // Positions are irrelevant without output; 1 keeps them realistic.
    let layout = Layout::new(data_blocks, params.hash_block_size, 1)?;
    let mut builder =
        TreeBuilder::new(&layout, params.hash_block_size, &params.salt, |_, _| Ok(()));
    feed(data, data_size, params.data_block_size, &mut builder)?;
    builder.finish()
}

/// Treats the whole current contents of the file at `path` as data and
/// appends superblock and tree after it, at the next multiple of 4096 (or of
/// the hash block size, if larger). The file is synced before returning.
///
/// Pass `info.hash_offset` as `--hash-offset` to veritysetup, or use
/// `info.kernel_table(dev, dev)`.
pub fn append_tree(path: &Path, params: &VerityParams) -> Result<VerityInfo, Error> {
    params.validate()?;
    let file_err = |op| {
        move |source| Error::File {
            op,
            path: path.to_owned(),
            source,
        }
    };
    let data = File::open(path).map_err(file_err("open"))?;
    let data_size = data.metadata().map_err(file_err("stat"))?.len();
    let align = u64::from(params.hash_block_size).max(4096);
    let hash_offset = data_size
        .checked_next_multiple_of(align)
        .ok_or(Error::Overflow { field: "data_size" })?;
    // A separate handle: a cloned one would share the file position with
    // the reader.
    let out = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(file_err("open for writing"))?;
    let info = build_tree(data, data_size, params, &out, hash_offset)?;
    out.sync_all().map_err(file_err("sync"))?;
    Ok(info)
}

/// Streams `data_size` bytes into the builder, one data block at a time.
fn feed<R: Read, S>(
    mut data: R,
    data_size: u64,
    data_block_size: u32,
    builder: &mut TreeBuilder<S>,
) -> Result<(), Error>
where
    S: FnMut(u64, &[u8]) -> Result<(), Error>,
{
    let block = data_block_size as usize;
    let mut buf = vec![0u8; (READ_CHUNK / block).max(1) * block];
    let mut offset = 0u64;
    while offset < data_size {
        // data_size is a multiple of the block size, so `want` is too.
        let want =
            usize::try_from(data_size - offset).map_or(buf.len(), |left| left.min(buf.len()));
        let got =
            read_full(&mut data, &mut buf[..want]).map_err(|(n, source)| Error::ReadData {
                offset: offset + n as u64,
                source,
            })?;
        if got < want {
            return Err(Error::DataTooShort {
                read: offset + got as u64,
                data_size,
            });
        }
        for chunk in buf[..want].chunks_exact(block) {
            builder.add_data_block(chunk)?;
        }
        offset += want as u64;
    }
    Ok(())
}

/// Like `read_exact`, but reports how much was read before EOF or an error.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, (usize, io::Error)> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((n, e)),
        }
    }
    Ok(n)
}

#[cfg(test)]
// Test sizes are a few MiB at most.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::io::Cursor;

    use sha2::{Digest, Sha256};

    use super::*;

    /// Deterministic data that a one-line Python script can reproduce for
    /// veritysetup: every byte of block `b` is `b % 251`, except the first
    /// 8, which hold `b` little endian (so no two blocks are equal).
    struct Pattern {
        block_size: usize,
        len: u64,
        pos: u64,
    }

    impl Pattern {
        fn new(blocks: u64, block_size: u32) -> Self {
            Pattern {
                block_size: block_size as usize,
                len: blocks * u64::from(block_size),
                pos: 0,
            }
        }
    }

    impl Read for Pattern {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let bs = self.block_size as u64;
            let mut n = 0;
            while n < buf.len() && self.pos < self.len {
                let block = self.pos / bs;
                let within = (self.pos % bs) as usize;
                let take = (self.block_size - within).min(buf.len() - n);
                let out = &mut buf[n..n + take];
                out.fill((block % 251) as u8);
                let header = block.to_le_bytes();
                for (i, byte) in out.iter_mut().enumerate() {
                    if let Some(h) = header.get(within + i) {
                        *byte = *h;
                    } else {
                        break;
                    }
                }
                n += take;
                self.pos += take as u64;
            }
            Ok(n)
        }
    }

    const UUID: [u8; 16] = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ];

    struct Known {
        blocks: u64,
        data_block_size: u32,
        hash_block_size: u32,
        salt: &'static [u8],
        root: &'static str,
        /// Size and sha256 of the whole hash file veritysetup wrote.
        area_size: u64,
        area_sha256: &'static str,
    }

    /// Produced with veritysetup 2.6.1: `veritysetup format data hash
    /// --data-block-size=D --hash-block-size=H --salt=S
    /// --uuid=00112233-4455-6677-8899-aabbccddeeff --data-blocks=N` on the
    /// `Pattern` data.
    const KNOWN: &[Known] = &[
        Known {
            blocks: 1,
            data_block_size: 4096,
            hash_block_size: 4096,
            salt: &[0x5e, 0xed],
            root: "5eebfb6f7428199667330bdac856f297478dc96339c066f963fd29c61ee168da",
            area_size: 4096,
            area_sha256: "a418bca667babf11766d8f6585cf59300b75695b3c9dc4bb856466aac86275de",
        },
        Known {
            blocks: 2,
            data_block_size: 4096,
            hash_block_size: 4096,
            salt: &[0x5e, 0xed],
            root: "2f0dcf2c7ae0c83f94740a9d16da18c62d375b15003f008ff1056f18e3425501",
            area_size: 8192,
            area_sha256: "aba75b424f6dc52bb84e0ee6beed4aeb620bb36b979cd3f75bcd5917059405ae",
        },
        Known {
            blocks: 128,
            data_block_size: 4096,
            hash_block_size: 4096,
            salt: &[0x5e, 0xed],
            root: "346410b66e010b49ff610271022c78e5a12b01ac987164c594a152f2a7606f15",
            area_size: 8192,
            area_sha256: "6db98636442718b95ace8dd7a9e1c6efb5f6bbc9b40a902e92b85baa487a40fb",
        },
        Known {
            blocks: 129,
            data_block_size: 4096,
            hash_block_size: 4096,
            salt: &[0x5e, 0xed],
            root: "4dc6145746f0d70cd28507b780d55b72b41d9b992b05a5fd082881acc7d0bd9f",
            area_size: 16384,
            area_sha256: "61a3cc6a1de666b03d6e297129647f5db7c543dc3b9c03849aa7ecd6885ce1d3",
        },
        Known {
            blocks: 129,
            data_block_size: 4096,
            hash_block_size: 4096,
            salt: &[],
            root: "224abaa493df8c074cb31add76d82230cee38e294895d97dcad37db512db4367",
            area_size: 16384,
            area_sha256: "05e5a2607ec9cf11d36ab28fe1ed022d7d5ccbd1802afea98a6f1f2a99a2f5c8",
        },
        // Three levels (129 + 2 + 1 hash blocks). The geometry depends only
        // on the block count, and 512-byte data blocks keep the data at 8 MiB
        // instead of 64 (debug-build sha256 is slow).
        Known {
            blocks: 128 * 128 + 1,
            data_block_size: 512,
            hash_block_size: 4096,
            salt: &[0x5e, 0xed],
            root: "51b63b32102b4ce98d0ff3f79e5dbe8fa3ad1eddaa76e86e952361b8384c2bd0",
            area_size: 544768,
            area_sha256: "483dfd4c3f5b4c396900fd02ac7cc01a8072a745145541da97182be719b1af5f",
        },
        // Three levels with 16 digests per hash block.
        Known {
            blocks: 257,
            data_block_size: 4096,
            hash_block_size: 512,
            salt: &[0x5e, 0xed],
            root: "819f10422df07b9beb8b397dd271090da6cefd7c2f34a2f79a4dd8549f21cf7f",
            area_size: 10752,
            area_sha256: "4c9f217943f943720489d1121e2acfc77370655c6db9f3f6807791a2958b9032",
        },
    ];

    fn params_for(k: &Known) -> VerityParams {
        VerityParams {
            data_block_size: k.data_block_size,
            hash_block_size: k.hash_block_size,
            salt: k.salt.to_vec(),
            uuid: UUID,
        }
    }

    #[test]
    fn matches_veritysetup_known_answers() {
        for k in KNOWN {
            let params = params_for(k);
            let size = k.blocks * u64::from(k.data_block_size);
            let mut out = Cursor::new(Vec::new());
            let info = build_tree(
                Pattern::new(k.blocks, k.data_block_size),
                size,
                &params,
                &mut out,
                0,
            )
            .unwrap();
            let area = out.into_inner();
            let what = format!(
                "{} blocks of {}/{}",
                k.blocks, k.data_block_size, k.hash_block_size
            );
            assert_eq!(info.root_hash_hex(), k.root, "{what}");
            assert_eq!(area.len() as u64, k.area_size, "{what}");
            assert_eq!(info.tree_size, k.area_size, "{what}");
            assert_eq!(hex::encode(Sha256::digest(&area)), k.area_sha256, "{what}");
            assert_eq!(
                hash_area_size(size, &params).unwrap(),
                k.area_size,
                "{what}"
            );

            let root = compute_root_hash(Pattern::new(k.blocks, k.data_block_size), size, &params)
                .unwrap();
            assert_eq!(hex::encode(root), k.root, "{what}");
        }
    }

    #[test]
    fn single_block_root_is_the_block_digest() {
        // No hash levels at all: the kernel compares the data block's digest
        // with the root directly.
        let block = vec![0x42u8; 4096];
        let params = VerityParams::new(b"salt".to_vec(), UUID).unwrap();
        let root = compute_root_hash(&block[..], 4096, &params).unwrap();
        let expected: [u8; 32] = Sha256::new()
            .chain_update(b"salt")
            .chain_update(&block)
            .finalize()
            .into();
        assert_eq!(root, expected);
    }

    #[test]
    fn root_is_salted_hash_of_the_top_block() {
        // Two blocks: one level, one hash block holding two digests.
        let data = [vec![1u8; 4096], vec![2u8; 4096]].concat();
        let params = VerityParams::new(vec![9, 9], UUID).unwrap();
        let h = |b: &[u8]| -> [u8; 32] {
            Sha256::new()
                .chain_update([9, 9])
                .chain_update(b)
                .finalize()
                .into()
        };
        let mut top = vec![0u8; 4096];
        top[..32].copy_from_slice(&h(&data[..4096]));
        top[32..64].copy_from_slice(&h(&data[4096..]));

        let mut out = Cursor::new(Vec::new());
        let info = build_tree(&data[..], 8192, &params, &mut out, 0).unwrap();
        assert_eq!(info.root_hash, h(&top));
        assert_eq!(&out.get_ref()[4096..], &top[..]);
    }

    #[test]
    fn tree_sizes() {
        let p = VerityParams::new(Vec::new(), UUID).unwrap();
        let size = |blocks: u64| hash_area_size(blocks * 4096, &p).unwrap() / 4096;
        assert_eq!(size(1), 1);
        assert_eq!(size(128), 2);
        assert_eq!(size(129), 4);
        assert_eq!(size(128 * 128), 1 + 1 + 128);
        assert_eq!(size(128 * 128 + 1), 1 + 1 + 2 + 129);
        // 1 GiB of data: 2048 + 16 + 1 hash blocks, about 1/128 of the data.
        assert_eq!(size(262_144), 1 + 2048 + 16 + 1);
    }

    #[test]
    fn writes_only_the_hash_area_at_an_offset() {
        let params = VerityParams::new(vec![1, 2, 3], UUID).unwrap();
        let blocks = 300;
        let size = blocks * 4096;
        let mut reference = Cursor::new(Vec::new());
        let at_zero =
            build_tree(Pattern::new(blocks, 4096), size, &params, &mut reference, 0).unwrap();

        for hash_offset in [size, 1024 * 1024, 512] {
            let mut dev = Cursor::new(vec![0xaa; usize::try_from(hash_offset).unwrap()]);
            let info = build_tree(
                Pattern::new(blocks, 4096),
                size,
                &params,
                &mut dev,
                hash_offset,
            )
            .unwrap();
            let dev = dev.into_inner();
            assert_eq!(info.root_hash, at_zero.root_hash);
            assert_eq!(info.hash_offset, hash_offset);
            // The first hash block boundary after the superblock.
            let start = (hash_offset + 512).div_ceil(4096) * 4096;
            assert_eq!(info.hash_start_block, start / 4096, "offset {hash_offset}");
            assert_eq!(dev.len() as u64, hash_offset + info.tree_size);
            let off = hash_offset as usize;
            assert!(dev[..off].iter().all(|&b| b == 0xaa), "data area touched");
            let sb = read_superblock(Cursor::new(&dev), hash_offset).unwrap();
            assert_eq!(sb.params(), params);
            assert_eq!(sb.data_blocks, blocks);
            assert!(dev[off + SUPERBLOCK_SIZE..start as usize]
                .iter()
                .all(|&b| b == 0));
            assert_eq!(&dev[start as usize..], &reference.get_ref()[4096..]);
        }
    }

    #[test]
    fn overwrites_stale_bytes_in_the_hash_area() {
        let params = VerityParams::new(vec![1], UUID).unwrap();
        let mut clean = Cursor::new(Vec::new());
        build_tree(Pattern::new(200, 4096), 200 * 4096, &params, &mut clean, 0).unwrap();
        let mut dirty = Cursor::new(vec![0x55; 64 * 1024]);
        let info = build_tree(Pattern::new(200, 4096), 200 * 4096, &params, &mut dirty, 0).unwrap();
        let dirty = dirty.into_inner();
        assert_eq!(&dirty[..info.tree_size as usize], &clean.get_ref()[..]);
    }

    #[test]
    fn kernel_table_and_veritysetup_args() {
        let params = VerityParams::new(vec![0xab, 0xcd], UUID).unwrap();
        let data = vec![0u8; 129 * 4096];
        let mut dev = Cursor::new(data.clone());
        let info = build_tree(&data[..], 129 * 4096, &params, &mut dev, 129 * 4096).unwrap();
        assert_eq!(info.hash_start_block, 130);
        assert_eq!(info.data_sectors(), 129 * 8);
        assert_eq!(
            info.kernel_table("/dev/vda2", "/dev/vda3"),
            format!(
                "1 /dev/vda2 /dev/vda3 4096 4096 129 130 sha256 {} abcd",
                info.root_hash_hex()
            )
        );
        assert_eq!(
            info.veritysetup_args("a", "b"),
            ["a", "b", &info.root_hash_hex(), "--hash-offset=528384"]
        );
        let unsalted = VerityInfo {
            salt: Vec::new(),
            ..info
        };
        assert!(unsalted.kernel_table("a", "b").ends_with(" -"));
    }

    #[test]
    fn rejects_unaligned_data_size() {
        let params = VerityParams::new(Vec::new(), UUID).unwrap();
        let e = compute_root_hash(&[0u8; 5000][..], 5000, &params).unwrap_err();
        assert!(matches!(
            e,
            Error::UnalignedDataSize {
                data_size: 5000,
                data_block_size: 4096
            }
        ));
        assert!(e.to_string().contains("data_size"), "{e}");
        assert!(e.to_string().contains("data_block_size"), "{e}");
    }

    #[test]
    fn rejects_empty_data() {
        let params = VerityParams::new(Vec::new(), UUID).unwrap();
        let e = compute_root_hash(&[][..], 0, &params).unwrap_err();
        assert!(matches!(e, Error::EmptyData));
    }

    #[test]
    fn rejects_short_data() {
        let params = VerityParams::new(Vec::new(), UUID).unwrap();
        let e = compute_root_hash(Pattern::new(3, 4096), 4 * 4096, &params).unwrap_err();
        assert!(matches!(
            e,
            Error::DataTooShort {
                read: 12288,
                data_size: 16384
            }
        ));
    }

    #[test]
    fn reports_read_errors_with_offset() {
        struct Failing(u64);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk on fire"));
                }
                let n = buf.len().min(self.0 as usize);
                buf[..n].fill(0);
                self.0 -= n as u64;
                Ok(n)
            }
        }
        let params = VerityParams::new(Vec::new(), UUID).unwrap();
        let e = compute_root_hash(Failing(8192), 16384, &params).unwrap_err();
        assert!(matches!(e, Error::ReadData { offset: 8192, .. }), "{e}");
    }

    #[test]
    fn rejects_bad_params() {
        let e = VerityParams::new(vec![0; 257], UUID).unwrap_err();
        assert!(matches!(e, Error::SaltTooLong { len: 257 }));
        assert!(VerityParams::new(vec![0; 256], UUID).is_ok());

        for (field, bad) in [
            ("data_block_size", 0),
            ("data_block_size", 256),
            ("hash_block_size", 1000),
            ("hash_block_size", 1024 * 1024),
        ] {
            let mut p = VerityParams::new(Vec::new(), UUID).unwrap();
            match field {
                "data_block_size" => p.data_block_size = bad,
                _ => p.hash_block_size = bad,
            }
            let e = compute_root_hash(&[0u8; 4096][..], 4096, &p).unwrap_err();
            assert!(
                matches!(e, Error::InvalidBlockSize { field: f, value } if f == field && value == bad),
                "{e}"
            );
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn rejects_unaligned_hash_offset() {
        let params = VerityParams::new(Vec::new(), UUID).unwrap();
        let mut out = Cursor::new(Vec::new());
        let e = build_tree(&[0u8; 4096][..], 4096, &params, &mut out, 4097).unwrap_err();
        assert!(matches!(
            e,
            Error::UnalignedHashOffset { hash_offset: 4097 }
        ));
        assert!(e.to_string().contains("hash_offset"), "{e}");
        assert!(out.get_ref().is_empty());
    }

    #[test]
    fn append_tree_places_superblock_after_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        // Not 4096-aligned: 3 blocks of 512.
        let data: Vec<u8> = (0..1536u32).map(|i| (i % 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let params = VerityParams {
            data_block_size: 512,
            ..VerityParams::new(vec![1, 2], UUID).unwrap()
        };
        let info = append_tree(&path, &params).unwrap();
        assert_eq!(info.hash_offset, 4096);
        assert_eq!(info.hash_start_block, 2);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[..1536], &data[..]);
        assert_eq!(file.len() as u64, info.hash_offset + info.tree_size);
        let sb = read_superblock(Cursor::new(&file), info.hash_offset).unwrap();
        assert_eq!(sb.data_size(), 1536);
        assert_eq!(
            compute_root_hash(&file[..], sb.data_size(), &sb.params()).unwrap(),
            info.root_hash
        );

        let missing = append_tree(&dir.path().join("nope"), &params).unwrap_err();
        assert!(matches!(missing, Error::File { op: "open", .. }));
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    fn sample_info() -> VerityInfo {
        VerityInfo {
            root_hash: [7; 32],
            salt: vec![1, 2, 3],
            uuid: [9; 16],
            data_blocks: 100,
            data_block_size: 4096,
            hash_block_size: 4096,
            hash_offset: 409_600,
            hash_start_block: 101,
            tree_size: 8192,
        }
    }

    #[test]
    fn info_text_round_trips() {
        let info = sample_info();
        assert_eq!(VerityInfo::from_text(&info.to_text()).unwrap(), info);
        let empty_salt = VerityInfo {
            salt: Vec::new(),
            ..info
        };
        assert_eq!(
            VerityInfo::from_text(&empty_salt.to_text()).unwrap(),
            empty_salt
        );
    }

    #[test]
    fn bad_info_text_names_line_field_and_reason() {
        let good = sample_info().to_text();
        let cases: Vec<(String, &str, &str)> = vec![
            (
                good.replace("data_blocks=100", "data_blocks=x"),
                "data_blocks",
                "not a number",
            ),
            (
                good.replace("root_hash=07", "root_hash=zz"),
                "root_hash",
                "not hex",
            ),
            (
                good.replace(&"07".repeat(32), &"07".repeat(31)),
                "root_hash",
                "31 bytes",
            ),
            (
                good.replace("data_block_size=4096", "data_block_size=4000"),
                "data_block_size",
                "power of two",
            ),
            (good.replace("tree_size=8192\n", ""), "tree_size", "missing"),
            (format!("{good}tree_size=1\n"), "tree_size", "twice"),
            (format!("{good}colour=blue\n"), "colour", "unknown key"),
            (format!("{good}garbage\n"), "garbage", "not key=value"),
            (
                good.replace("salt=010203", &format!("salt={}", "00".repeat(257))),
                "salt",
                "256",
            ),
        ];
        for (text, field, reason) in cases {
            let e = VerityInfo::from_text(&text).unwrap_err().to_string();
            assert!(
                e.contains(field) && e.contains(reason),
                "{field}/{reason}: {e}"
            );
        }
    }
}
