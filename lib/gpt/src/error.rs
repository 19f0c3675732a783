use std::fmt;
use std::io;

use crate::Guid;

/// Which of the two copies of the GPT a header-level error refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderSource {
    /// The header at LBA 1 and its entry array.
    Primary,
    /// The header at the last LBA and its entry array.
    Backup,
}

impl fmt::Display for HeaderSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeaderSource::Primary => "primary",
            HeaderSource::Backup => "backup",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid GUID {input:?}: {reason}")]
    InvalidGuid { input: String, reason: &'static str },

    #[error("partition {index} has an empty name")]
    EmptyName { index: usize },

    #[error("partition name {name:?} is {units} UTF-16 code units long; GPT allows at most 36")]
    NameTooLong { name: String, units: usize },

    #[error("partition name {name:?} contains a NUL character, which would end the name on disk")]
    NameContainsNul { name: String },

    #[error("partition name {name:?} is used by more than one partition")]
    DuplicateName { name: String },

    #[error("partition {name:?} has size 0")]
    ZeroSize { name: String },

    #[error("partition {name:?} is too large ({size} bytes)")]
    SizeOverflow { name: String, size: u64 },

    #[error("rest-of-disk partition {name:?} must be the last partition")]
    RestNotLast { name: String },

    #[error("rest-of-disk partition {name:?} needs a total disk size")]
    RestWithoutDiskSize { name: String },

    #[error("disk size {size} is not a multiple of the 512-byte sector size")]
    UnalignedDiskSize { size: u64 },

    #[error("the partitions need a disk of at least {needed} bytes but it is {size} bytes")]
    DiskTooSmall { needed: u64, size: u64 },

    #[error("{count} partitions requested; the table holds at most 128")]
    TooManyPartitions { count: usize },

    #[error("partition {name:?} has partition number {number}; valid numbers are 1..=128")]
    BadPartitionNumber { name: String, number: u32 },

    #[error("partition number {number} is used by both {first:?} and {second:?}")]
    DuplicateNumber {
        number: u32,
        first: String,
        second: String,
    },

    #[error("{field} GUID of {name:?} is all zeros, which GPT reserves for unused entries")]
    ZeroGuid { field: &'static str, name: String },

    #[error("disk GUID is all zeros")]
    ZeroDiskGuid,

    #[error("unique GUID {guid} is used by both {first:?} and {second:?}")]
    DuplicateGuid {
        guid: Guid,
        first: String,
        second: String,
    },

    #[error("disk usable range {first_usable}..={last_usable} does not fit a {disk_sectors}-sector disk with 128 entries on each side")]
    BadUsableRangeForWrite {
        first_usable: u64,
        last_usable: u64,
        disk_sectors: u64,
    },

    #[error("table describes a {table_size}-byte disk but the device is {device_size} bytes")]
    DeviceSizeMismatch { table_size: u64, device_size: u64 },

    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },

    #[error("disk is {size} bytes, too small to hold a GPT")]
    DiskTooSmallForGpt { size: u64 },

    #[error("{header} GPT header: signature is {found:02X?}, expected \"EFI PART\"")]
    BadSignature {
        header: HeaderSource,
        found: [u8; 8],
    },

    #[error("{header} GPT header: unsupported revision {revision:#010x}, expected 0x00010000")]
    UnsupportedRevision { header: HeaderSource, revision: u32 },

    #[error("{header} GPT header: header size {size} is outside 92..=512")]
    BadHeaderSize { header: HeaderSource, size: u32 },

    #[error("{header} GPT header: header CRC32 is {stored:#010x}, computed {computed:#010x}")]
    HeaderCrcMismatch {
        header: HeaderSource,
        stored: u32,
        computed: u32,
    },

    #[error("{header} GPT header: claims to be at LBA {found}, but was read from LBA {expected}")]
    BadMyLba {
        header: HeaderSource,
        expected: u64,
        found: u64,
    },

    #[error(
        "{header} GPT header: partition entry size {size} is not a power of two in 128..=4096"
    )]
    BadEntrySize { header: HeaderSource, size: u32 },

    #[error("{header} GPT header: {count} entries of {entry_size} bytes exceed the 1 MiB limit on the entry array")]
    TooManyEntries {
        header: HeaderSource,
        count: u32,
        entry_size: u32,
    },

    #[error("{header} GPT header: first usable LBA {first} is after last usable LBA {last}")]
    BadUsableRange {
        header: HeaderSource,
        first: u64,
        last: u64,
    },

    #[error("{header} GPT header: usable range {first}..={last} does not fit in the disk's {disk_sectors} sectors outside the headers")]
    UsableRangeOutsideDisk {
        header: HeaderSource,
        first: u64,
        last: u64,
        disk_sectors: u64,
    },

    #[error("{header} GPT header: entry array at LBA {lba} ({sectors} sectors) overlaps the headers, the usable range or the disk end")]
    BadEntryArrayLocation {
        header: HeaderSource,
        lba: u64,
        sectors: u64,
    },

    #[error("{header} GPT: entry array CRC32 is {stored:#010x}, computed {computed:#010x}")]
    EntriesCrcMismatch {
        header: HeaderSource,
        stored: u32,
        computed: u32,
    },

    #[error("partition {number} has a name that is not valid UTF-16")]
    BadPartitionName { number: u32 },

    #[error("partition {number} ({name:?}) starts at LBA {first}, after its last LBA {last}")]
    BadPartitionRange {
        number: u32,
        name: String,
        first: u64,
        last: u64,
    },

    #[error("partition {number} ({name:?}) spans LBA {first}..={last}, outside the usable range {first_usable}..={last_usable}")]
    PartitionOutOfBounds {
        number: u32,
        name: String,
        first: u64,
        last: u64,
        first_usable: u64,
        last_usable: u64,
    },

    #[error("partitions {first:?} and {second:?} overlap")]
    PartitionsOverlap { first: String, second: String },

    #[error("no valid GPT: primary: {primary}; backup: {backup}")]
    NoValidGpt {
        primary: Box<Error>,
        backup: Box<Error>,
    },
}
