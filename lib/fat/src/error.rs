use std::io;

/// Everything that can go wrong while locating, reading or rewriting a file.
///
/// The filesystem is outside data, so most variants describe a field or a
/// structure that failed validation rather than an I/O problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{what} at partition byte {offset} (+{len}) lies outside the {part_len}-byte partition"
    )]
    OutOfBounds {
        what: String,
        offset: u64,
        len: u64,
        part_len: u64,
    },
    #[error("boot sector signature is {found:#06x}, expected 0xaa55")]
    BadSignature { found: u16 },
    #[error("boot sector field {field} = {value} is invalid: {reason}")]
    InvalidField {
        field: &'static str,
        value: u64,
        reason: &'static str,
    },
    #[error("{what} refers to cluster {cluster}, outside the data area (2..={max})")]
    ClusterOutOfRange {
        what: String,
        cluster: u32,
        max: u32,
    },
    #[error("cluster chain of {what} reaches cluster {cluster}, which is marked bad")]
    BadCluster { what: String, cluster: u32 },
    #[error("cluster chain of {what} continues from cluster {cluster} into a free cluster")]
    FreeCluster { what: String, cluster: u32 },
    #[error("cluster chain of {what} loops back to cluster {cluster}")]
    ChainLoop { what: String, cluster: u32 },
    #[error("{what} is {size} bytes but its cluster chain ends after {clusters} clusters")]
    ChainTooShort {
        what: String,
        size: u64,
        clusters: u64,
    },
    #[error("{what} is {size} bytes but its cluster chain has more than {clusters} clusters")]
    ChainTooLong {
        what: String,
        size: u64,
        clusters: u64,
    },
    #[error("path {path:?} has no components or contains \".\" or \"..\"")]
    InvalidPath { path: String },
    #[error("{component} not found")]
    NotFound { component: String },
    #[error("{component} is a file, expected a directory")]
    NotADirectory { component: String },
    #[error("{component} is a directory, expected a file")]
    IsADirectory { component: String },
    #[error("extent at offset {offset} (+{len}) overflows a 64-bit device offset")]
    ExtentOverflow { offset: u64, len: u64 },
    #[error("extents hold {sum} bytes but the file is {size} bytes")]
    ExtentsMismatch { size: u64, sum: u64 },
    #[error("new content is {got} bytes but the file is {size} bytes; it can only be rewritten at the same size")]
    SizeMismatch { size: u64, got: u64 },
}
