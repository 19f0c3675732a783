//! What the build needs from a Debian archive, whoever serves it: the
//! index entry of a package, the fetched `.deb`, and the errors. [`crate::apt`]
//! is the archive of real builds; [`crate::lock`] decides what to fetch
//! through the [`Archive`] trait (a map in its tests), so neither module
//! needs the other.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("apt cache {path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("package `{package}` (profile field {field}) is not in {suite}")]
    UnknownPackage {
        package: String,
        field: String,
        suite: String,
    },
    #[error("package `{package}`: the index entry has no `{field}`")]
    BadIndex {
        package: String,
        field: &'static str,
    },
    #[error("package `{package}`: metapackage has no dependency starting with `{prefix}`")]
    NoKernel { package: String, prefix: String },
    #[error(
        "package `{package}` {path}: SHA-256 {actual} does not match the signed index ({expected})"
    )]
    HashMismatch {
        package: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// A package as the signed index describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageInfo {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// Path in the archive (`pool/main/...`).
    pub filename: String,
    pub depends: String,
}

/// A fetched, verified `.deb`.
#[derive(Debug, Clone)]
pub struct FetchedPackage {
    pub info: PackageInfo,
    pub deb: PathBuf,
}

/// The package source behind the lock: apt in production, a map in tests.
pub trait Archive {
    fn suite(&self) -> &str;
    /// The signed index's entry for `name`, at `version` or the candidate
    /// version; `None` when the index has no such package (or version).
    fn lookup(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<PackageInfo>, ArchiveError>;
    /// Downloads fresh package lists.
    fn refresh(&self) -> Result<(), ArchiveError>;
    /// Where the cache keeps `info`'s `.deb` (it may not exist yet).
    fn cached_path(&self, info: &PackageInfo) -> Result<PathBuf, ArchiveError>;
    /// Downloads `info`'s `.deb` to [`cached_path`](Self::cached_path).
    fn download(&self, info: &PackageInfo) -> Result<(), ArchiveError>;
}

/// The SHA-256 of a file, as hex.
pub(crate) fn sha256_file(path: &Path) -> Result<String, ArchiveError> {
    let io = |source| ArchiveError::Io {
        path: path.to_owned(),
        op: "hash",
        source,
    };
    let mut f = fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The kernel package a `linux-image-<flavour>` metapackage depends on.
pub(crate) fn kernel_from_depends(depends: &str) -> Option<String> {
    depends
        .split(',')
        .flat_map(|alt| alt.split('|'))
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_metapackage_resolution() {
        assert_eq!(
            kernel_from_depends("linux-image-6.12.117+deb13-amd64 (= 6.12.117-1)"),
            Some("linux-image-6.12.117+deb13-amd64".into())
        );
        assert_eq!(
            kernel_from_depends("foo, linux-image-6.1.0-1-amd64"),
            Some("linux-image-6.1.0-1-amd64".into())
        );
        assert_eq!(kernel_from_depends("libc6 (>= 2)"), None);
    }
}
