//! The package lock: the exact Debian packages (name, version, SHA-256 of
//! the `.deb`, suite) a profile's image was built from.
//!
//! Every build writes its lock into the output (`packages.lock`) and into
//! the package cache (`<cache>/locks/<profile>.lock`). The next build of the
//! profile takes every package it needs from that lock: the `.deb` from the
//! cache if its hash matches, otherwise the same version from the archive,
//! checked against the lock. A package the lock does not name yet (the
//! profile gained it) is resolved from the signed index and added. With an
//! explicit lock (`qimage build --lock FILE`, for checking a published
//! release) every package must be in it. `--refresh` ignores the cache's
//! lock and resolves everything from fresh lists.
//!
//! The lock is not committed to git: Debian's main archive drops
//! superseded versions at each point release, so a committed lock would
//! fail on a fresh machine with an empty cache (docs/images.md).
//!
//! Everything that touches apt goes through [`Archive`], so the decisions
//! here are tested against an in-memory archive.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::archive::{self, Archive, ArchiveError, FetchedPackage, PackageInfo};

/// The lock format this code reads and writes.
pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("lock {path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("lock {path}: not a package lock")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("lock {path}: format {found}, this qimage reads format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("lock {path}: is for suite `{lock}`, the profile uses `{profile}`")]
    Suite {
        path: PathBuf,
        lock: String,
        profile: String,
    },
    #[error(transparent)]
    Mismatch(Box<Mismatch>),
    #[error(
        "lock {lock}: package `{package}` {version} is neither in the package cache nor in the \
         {suite} archive any more (Debian drops superseded versions); rebuild with `--refresh` \
         (and without `--lock`) to lock the archive's current versions"
    )]
    Gone {
        lock: PathBuf,
        package: String,
        version: String,
        suite: String,
    },
    #[error("lock {lock}: has no entry for `{package}` (profile field {field})")]
    NotInLock {
        lock: PathBuf,
        package: String,
        field: String,
    },
    #[error(transparent)]
    Apt(#[from] ArchiveError),
}

/// A `.deb` whose hash is not the lock's (boxed in [`LockError`]: five
/// strings would make every `Result` of this module large).
#[derive(Debug, thiserror::Error)]
#[error(
    "lock {lock}: package `{package}` {version}: the .deb's SHA-256 is {actual} ({origin}), \
     the lock says {expected}"
)]
pub struct Mismatch {
    pub lock: PathBuf,
    pub package: String,
    pub version: String,
    pub expected: String,
    pub actual: String,
    /// Where the other hash came from (the cached file, the signed index).
    pub origin: String,
}

/// A lock file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub format: u32,
    /// Profile name (`image.name`) the lock was written for.
    pub profile: String,
    pub suite: String,
    /// What the profile's kernel metapackage resolved to.
    pub kernel: KernelPin,
    /// Sorted by name.
    #[serde(rename = "package", default)]
    pub packages: Vec<LockedPackage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelPin {
    /// `boot.kernel_package`, e.g. `linux-image-amd64`.
    pub meta: String,
    /// The versioned image package it pulled.
    pub package: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// The suite the package was fetched from.
    pub suite: String,
    /// Path in the archive (`pool/main/...`); names the cached file.
    pub filename: String,
}

impl Lock {
    /// The lock of a build that used `fetched`.
    pub fn new(profile: &str, suite: &str, kernel: KernelPin, fetched: &[FetchedPackage]) -> Self {
        let mut packages: Vec<LockedPackage> = fetched
            .iter()
            .map(|f| LockedPackage {
                name: f.info.name.clone(),
                version: f.info.version.clone(),
                sha256: f.info.sha256.clone(),
                suite: suite.to_owned(),
                filename: f.info.filename.clone(),
            })
            .collect();
        packages.sort_by(|a, b| a.name.cmp(&b.name));
        packages.dedup_by(|a, b| a.name == b.name);
        Self {
            format: FORMAT,
            profile: profile.to_owned(),
            suite: suite.to_owned(),
            kernel,
            packages,
        }
    }

    pub fn get(&self, name: &str) -> Option<&LockedPackage> {
        self.packages.iter().find(|p| p.name == name)
    }

    pub fn render(&self) -> String {
        // A plain struct of strings and tables cannot fail to serialize.
        let body = toml::to_string(self).unwrap_or_default();
        format!(
            "# Debian packages profile `{}` was built from (qimage). Not committed to git:\n\
             # see docs/images.md. `qimage build --lock FILE` rebuilds from exactly these.\n{body}",
            self.profile
        )
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, LockError> {
        let lock: Self = toml::from_str(text).map_err(|source| LockError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if lock.format != FORMAT {
            return Err(LockError::Format {
                path: path.to_owned(),
                found: lock.format,
            });
        }
        Ok(lock)
    }

    pub fn read(path: &Path) -> Result<Self, LockError> {
        let text = fs::read_to_string(path).map_err(|source| LockError::Io {
            path: path.to_owned(),
            op: "read",
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Writes through a temporary file and a rename, so a reader (or a
    /// build that dies half way) never sees half a lock.
    pub fn write(&self, path: &Path) -> Result<(), LockError> {
        let io = |op| {
            let path = path.to_owned();
            move |source| LockError::Io { path, op, source }
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io("create directory"))?;
        }
        let tmp = path.with_extension("lock.tmp");
        fs::write(&tmp, self.render()).map_err(io("write"))?;
        fs::rename(&tmp, path).map_err(io("rename into place"))
    }
}

/// Where the cache keeps the lock of profile `name`.
pub fn cache_lock_path(cache_dir: &Path, name: &str) -> PathBuf {
    cache_dir.join("locks").join(format!("{name}.lock"))
}

/// A package the build needs, and the profile field that asks for it.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub name: String,
    pub field: String,
}

/// The lock a build follows.
#[derive(Debug, Clone)]
pub struct Pin {
    pub lock: Lock,
    pub path: PathBuf,
    /// Every package must be in the lock (an explicit `--lock`); otherwise
    /// packages new to the profile are resolved from the index.
    pub strict: bool,
}

impl Pin {
    /// Checks that the lock can be for this profile's archive.
    pub fn check_suite(&self, suite: &str) -> Result<(), LockError> {
        if self.lock.suite != suite {
            return Err(LockError::Suite {
                path: self.path.clone(),
                lock: self.lock.suite.clone(),
                profile: suite.to_owned(),
            });
        }
        Ok(())
    }
}

/// Resolves and fetches packages, following a lock where there is one.
pub struct Resolver<'a, A: Archive> {
    archive: &'a A,
    pin: Option<&'a Pin>,
    /// The lists are refreshed at most once per build, when a locked
    /// version is missing from them (the lock may be newer than the lists).
    refreshed: Cell<bool>,
}

impl<'a, A: Archive> Resolver<'a, A> {
    pub fn new(archive: &'a A, pin: Option<&'a Pin>) -> Self {
        Self {
            archive,
            pin,
            refreshed: Cell::new(false),
        }
    }

    /// The versioned kernel image package behind metapackage `meta`.
    pub fn kernel(&self, meta: &str) -> Result<KernelPin, LockError> {
        if let Some(pin) = self.pin {
            if pin.lock.kernel.meta == meta {
                return Ok(pin.lock.kernel.clone());
            }
            if pin.strict {
                return Err(LockError::NotInLock {
                    lock: pin.path.clone(),
                    package: meta.to_owned(),
                    field: "boot.kernel_package".into(),
                });
            }
        }
        let info = self.indexed(&Wanted {
            name: meta.to_owned(),
            field: "boot.kernel_package".into(),
        })?;
        let package =
            archive::kernel_from_depends(&info.depends).ok_or(ArchiveError::NoKernel {
                package: meta.to_owned(),
                prefix: "linux-image-".into(),
            })?;
        Ok(KernelPin {
            meta: meta.to_owned(),
            package,
        })
    }

    /// Every wanted package's `.deb`, in the cache and verified.
    pub fn fetch(&self, wanted: &[Wanted]) -> Result<Vec<FetchedPackage>, LockError> {
        let mut out = Vec::with_capacity(wanted.len());
        for w in wanted {
            let locked = self.pin.and_then(|p| p.lock.get(&w.name).map(|l| (p, l)));
            let fetched = match (locked, self.pin) {
                (Some((pin, entry)), _) => self.fetch_locked(pin, entry)?,
                (None, Some(pin)) if pin.strict => {
                    return Err(LockError::NotInLock {
                        lock: pin.path.clone(),
                        package: w.name.clone(),
                        field: w.field.clone(),
                    })
                }
                _ => {
                    let info = self.indexed(w)?;
                    self.fetch_indexed(info)?
                }
            };
            out.push(fetched);
        }
        Ok(out)
    }

    fn indexed(&self, w: &Wanted) -> Result<PackageInfo, LockError> {
        self.archive.lookup(&w.name, None)?.ok_or_else(|| {
            ArchiveError::UnknownPackage {
                package: w.name.clone(),
                field: w.field.clone(),
                suite: self.archive.suite().to_owned(),
            }
            .into()
        })
    }

    /// Cache first; a download is checked against the signed index.
    fn fetch_indexed(&self, info: PackageInfo) -> Result<FetchedPackage, LockError> {
        let path = self.archive.cached_path(&info)?;
        if !(path.exists() && archive::sha256_file(&path)? == info.sha256) {
            log::info!("downloading {} {}", info.name, info.version);
            self.archive.download(&info)?;
            let actual = archive::sha256_file(&path)?;
            if actual != info.sha256 {
                return Err(ArchiveError::HashMismatch {
                    package: info.name.clone(),
                    path,
                    expected: info.sha256.clone(),
                    actual,
                }
                .into());
            }
        }
        Ok(FetchedPackage { info, deb: path })
    }

    /// Cache first; otherwise the locked version from the archive. Either
    /// way the file's hash must be the lock's.
    fn fetch_locked(&self, pin: &Pin, entry: &LockedPackage) -> Result<FetchedPackage, LockError> {
        let info = PackageInfo {
            name: entry.name.clone(),
            version: entry.version.clone(),
            sha256: entry.sha256.clone(),
            filename: entry.filename.clone(),
            depends: String::new(),
        };
        let mismatch = |actual: String, origin: String| {
            LockError::Mismatch(Box::new(Mismatch {
                lock: pin.path.clone(),
                package: entry.name.clone(),
                version: entry.version.clone(),
                expected: entry.sha256.clone(),
                actual,
                origin,
            }))
        };
        let path = self.archive.cached_path(&info)?;
        let cached = if path.exists() {
            let actual = archive::sha256_file(&path)?;
            if actual == entry.sha256 {
                return Ok(FetchedPackage { info, deb: path });
            }
            Some(actual)
        } else {
            None
        };
        let Some(indexed) = self.locked_in_index(entry)? else {
            // A cached file with the wrong hash says more than "gone".
            return Err(match cached {
                Some(actual) => mismatch(actual, format!("cached {}", path.display())),
                None => LockError::Gone {
                    lock: pin.path.clone(),
                    package: entry.name.clone(),
                    version: entry.version.clone(),
                    suite: self.archive.suite().to_owned(),
                },
            });
        };
        if indexed.sha256 != entry.sha256 {
            return Err(mismatch(indexed.sha256, "the signed index".into()));
        }
        log::info!("downloading {} {} (locked)", entry.name, entry.version);
        self.archive.download(&info)?;
        let actual = archive::sha256_file(&path)?;
        if actual != entry.sha256 {
            return Err(mismatch(actual, format!("downloaded {}", path.display())));
        }
        Ok(FetchedPackage { info, deb: path })
    }

    fn locked_in_index(&self, entry: &LockedPackage) -> Result<Option<PackageInfo>, LockError> {
        if let Some(found) = self.archive.lookup(&entry.name, Some(&entry.version))? {
            return Ok(Some(found));
        }
        if self.refreshed.replace(true) {
            return Ok(None);
        }
        log::info!(
            "{} {} is not in the cached lists; refreshing them once",
            entry.name,
            entry.version
        );
        self.archive.refresh()?;
        Ok(self.archive.lookup(&entry.name, Some(&entry.version))?)
    }
}

/// For reports: which packages moved between two locks.
pub fn changes(old: &Lock, new: &Lock) -> Vec<String> {
    let old_v: BTreeMap<&str, &str> = old
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    let mut out = Vec::new();
    for p in &new.packages {
        match old_v.get(p.name.as_str()) {
            None => out.push(format!("{} {} (new)", p.name, p.version)),
            Some(v) if *v != p.version => out.push(format!("{} {v} -> {}", p.name, p.version)),
            Some(_) => {}
        }
    }
    for p in &old.packages {
        if new.get(&p.name).is_none() {
            out.push(format!("{} {} (dropped)", p.name, p.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn sha(data: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(data))
    }

    /// An archive in memory: (name, version) -> .deb bytes; the first
    /// version listed for a name is the candidate.
    struct FakeArchive {
        debs_dir: PathBuf,
        index: RefCell<Vec<(String, String, Vec<u8>)>>,
        /// Versions that appear only after `refresh`.
        after_refresh: Vec<(String, String, Vec<u8>)>,
        /// Serve these bytes instead of the indexed ones (a bad mirror).
        corrupt: Option<Vec<u8>>,
        downloads: RefCell<Vec<String>>,
        refreshes: Cell<u32>,
    }

    impl FakeArchive {
        fn new(dir: &Path, index: &[(&str, &str, &[u8])]) -> Self {
            Self {
                debs_dir: dir.to_owned(),
                index: RefCell::new(
                    index
                        .iter()
                        .map(|(n, v, d)| ((*n).to_owned(), (*v).to_owned(), d.to_vec()))
                        .collect(),
                ),
                after_refresh: Vec::new(),
                corrupt: None,
                downloads: RefCell::new(Vec::new()),
                refreshes: Cell::new(0),
            }
        }
    }

    impl Archive for FakeArchive {
        fn suite(&self) -> &str {
            "trixie"
        }
        fn lookup(
            &self,
            name: &str,
            version: Option<&str>,
        ) -> Result<Option<PackageInfo>, ArchiveError> {
            Ok(self
                .index
                .borrow()
                .iter()
                .find(|(n, v, _)| n == name && version.is_none_or(|want| want == v))
                .map(|(n, v, d)| PackageInfo {
                    name: n.clone(),
                    version: v.clone(),
                    sha256: sha(d),
                    filename: format!("pool/main/{n}_{v}_amd64.deb"),
                    depends: if n == "linux-image-amd64" {
                        "linux-image-6.12.1-amd64 (= 6.12.1-1)".into()
                    } else {
                        String::new()
                    },
                }))
        }
        fn refresh(&self) -> Result<(), ArchiveError> {
            self.refreshes.set(self.refreshes.get() + 1);
            self.index
                .borrow_mut()
                .extend(self.after_refresh.iter().cloned());
            Ok(())
        }
        fn cached_path(&self, info: &PackageInfo) -> Result<PathBuf, ArchiveError> {
            Ok(self
                .debs_dir
                .join(format!("{}_{}.deb", info.name, info.version)))
        }
        fn download(&self, info: &PackageInfo) -> Result<(), ArchiveError> {
            let index = self.index.borrow();
            let (_, _, data) = index
                .iter()
                .find(|(n, v, _)| *n == info.name && *v == info.version)
                .ok_or_else(|| ArchiveError::Command {
                    command: format!("apt-get download {}={}", info.name, info.version),
                    status: "exit status: 100".into(),
                    stderr: "E: not found".into(),
                })?;
            let bytes = self.corrupt.clone().unwrap_or_else(|| data.clone());
            self.downloads.borrow_mut().push(info.name.clone());
            std::fs::write(self.cached_path(info)?, bytes).map_err(|source| ArchiveError::Io {
                path: self.debs_dir.clone(),
                op: "write",
                source,
            })
        }
    }

    fn wanted(names: &[&str]) -> Vec<Wanted> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| Wanted {
                name: (*n).to_owned(),
                field: format!("debian.packages[{i}]"),
            })
            .collect()
    }

    fn lock_of(archive: &FakeArchive, names: &[&str]) -> Pin {
        let fetched = Resolver::new(archive, None).fetch(&wanted(names)).unwrap();
        Pin {
            lock: Lock::new(
                "t",
                "trixie",
                KernelPin {
                    meta: "linux-image-amd64".into(),
                    package: "linux-image-6.12.1-amd64".into(),
                },
                &fetched,
            ),
            path: PathBuf::from("/cache/locks/t.lock"),
            strict: false,
        }
    }

    #[test]
    fn lock_round_trips_through_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let a = FakeArchive::new(
            dir.path(),
            &[("libc6", "2.41-12", b"libc"), ("a", "1", b"a")],
        );
        let pin = lock_of(&a, &["libc6", "a"]);
        assert_eq!(pin.lock.packages[0].name, "a", "sorted by name");
        let path = dir.path().join("locks/t.lock");
        pin.lock.write(&path).unwrap();
        assert_eq!(Lock::read(&path).unwrap(), pin.lock);
        assert!(!path.with_extension("lock.tmp").exists());
    }

    #[test]
    fn bad_lock_files_are_named() {
        let p = Path::new("x.lock");
        assert!(matches!(
            Lock::parse(p, "format = 1\nprofile = \"t\"\n").unwrap_err(),
            LockError::Parse { .. }
        ));
        let future = "format = 9\nprofile = \"t\"\nsuite = \"trixie\"\n\
                      [kernel]\nmeta = \"m\"\npackage = \"k\"\n";
        assert!(matches!(
            Lock::parse(p, future).unwrap_err(),
            LockError::Format { found: 9, .. }
        ));
    }

    #[test]
    fn a_locked_build_keeps_the_locked_version_when_the_archive_moves_on() {
        let dir = tempfile::tempdir().unwrap();
        let a = FakeArchive::new(dir.path(), &[("libc6", "1", b"old")]);
        let pin = lock_of(&a, &["libc6"]);
        // A point release: the archive now offers 2 first, 1 is still there.
        a.index
            .borrow_mut()
            .insert(0, ("libc6".into(), "2".into(), b"new".to_vec()));
        let got = Resolver::new(&a, Some(&pin))
            .fetch(&wanted(&["libc6"]))
            .unwrap();
        assert_eq!(got[0].info.version, "1");
        assert_eq!(a.downloads.borrow().len(), 1, "served from the cache");
        // Without the lock (--refresh) the candidate wins.
        let got = Resolver::new(&a, None).fetch(&wanted(&["libc6"])).unwrap();
        assert_eq!(got[0].info.version, "2");
    }

    #[test]
    fn a_lost_cache_refetches_the_locked_version_from_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let a = FakeArchive::new(dir.path(), &[("libc6", "1", b"old")]);
        let pin = lock_of(&a, &["libc6"]);
        std::fs::remove_file(dir.path().join("libc6_1.deb")).unwrap();
        let got = Resolver::new(&a, Some(&pin))
            .fetch(&wanted(&["libc6"]))
            .unwrap();
        assert_eq!(got[0].info.sha256, sha(b"old"));
        assert_eq!(a.downloads.borrow().len(), 2);
    }

    #[test]
    fn a_deb_that_differs_from_the_lock_fails_with_both_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = FakeArchive::new(dir.path(), &[("libc6", "1", b"good")]);
        let pin = lock_of(&a, &["libc6"]);
        // The cached file rotted and the mirror serves other bytes.
        std::fs::write(dir.path().join("libc6_1.deb"), b"rotten").unwrap();
        a.corrupt = Some(b"evil".to_vec());
        match Resolver::new(&a, Some(&pin))
            .fetch(&wanted(&["libc6"]))
            .unwrap_err()
        {
            LockError::Mismatch(m) => {
                assert_eq!(m.lock, Path::new("/cache/locks/t.lock"));
                assert_eq!(m.package, "libc6");
                assert_eq!(m.expected, sha(b"good"));
                assert_eq!(m.actual, sha(b"evil"));
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn an_index_that_disagrees_with_the_lock_fails_before_downloading() {
        let dir = tempfile::tempdir().unwrap();
        let a = FakeArchive::new(dir.path(), &[("libc6", "1", b"good")]);
        let mut pin = lock_of(&a, &["libc6"]);
        pin.lock.packages[0].sha256 = sha(b"published");
        std::fs::remove_file(dir.path().join("libc6_1.deb")).unwrap();
        let err = Resolver::new(&a, Some(&pin))
            .fetch(&wanted(&["libc6"]))
            .unwrap_err();
        assert!(
            matches!(&err, LockError::Mismatch(m)
                if m.origin == "the signed index" && m.actual == sha(b"good")),
            "{err:?}"
        );
        assert_eq!(a.downloads.borrow().len(), 1);
    }

    #[test]
    fn a_version_gone_from_cache_and_archive_says_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let a = FakeArchive::new(dir.path(), &[("libc6", "1", b"old")]);
        let pin = lock_of(&a, &["libc6"]);
        std::fs::remove_file(dir.path().join("libc6_1.deb")).unwrap();
        *a.index.borrow_mut() = vec![("libc6".into(), "2".into(), b"new".to_vec())];
        let err = Resolver::new(&a, Some(&pin))
            .fetch(&wanted(&["libc6"]))
            .unwrap_err();
        assert!(
            matches!(&err, LockError::Gone { package, version, .. } if package == "libc6" && version == "1"),
            "{err:?}"
        );
        assert!(err.to_string().contains("--refresh"), "{err}");
        assert_eq!(a.refreshes.get(), 1, "the lists were refreshed once first");
    }

    #[test]
    fn a_locked_version_newer_than_the_lists_is_found_after_one_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = FakeArchive::new(dir.path(), &[("libc6", "1", b"old")]);
        let mut pin = lock_of(&a, &["libc6"]);
        pin.lock.packages[0].version = "2".into();
        pin.lock.packages[0].sha256 = sha(b"new");
        a.after_refresh = vec![("libc6".into(), "2".into(), b"new".to_vec())];
        let got = Resolver::new(&a, Some(&pin))
            .fetch(&wanted(&["libc6"]))
            .unwrap();
        assert_eq!(got[0].info.version, "2");
        assert_eq!(a.refreshes.get(), 1);
    }

    #[test]
    fn new_packages_join_a_cache_lock_but_not_a_strict_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = FakeArchive::new(dir.path(), &[("libc6", "1", b"c"), ("busybox", "1", b"b")]);
        let mut pin = lock_of(&a, &["libc6"]);
        let got = Resolver::new(&a, Some(&pin))
            .fetch(&wanted(&["libc6", "busybox"]))
            .unwrap();
        assert_eq!(got.len(), 2);
        pin.strict = true;
        match Resolver::new(&a, Some(&pin))
            .fetch(&wanted(&["libc6", "busybox"]))
            .unwrap_err()
        {
            LockError::NotInLock { package, field, .. } => {
                assert_eq!(package, "busybox");
                assert_eq!(field, "debian.packages[1]");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn unknown_package_names_field_and_item() {
        let dir = tempfile::tempdir().unwrap();
        let a = FakeArchive::new(dir.path(), &[("libc6", "1", b"c")]);
        match Resolver::new(&a, None)
            .fetch(&wanted(&["libc6", "no-such-pkg"]))
            .unwrap_err()
        {
            LockError::Apt(ArchiveError::UnknownPackage {
                package,
                field,
                suite,
            }) => {
                assert_eq!(package, "no-such-pkg");
                assert_eq!(field, "debian.packages[1]");
                assert_eq!(suite, "trixie");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn kernel_follows_the_lock_and_resolves_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = FakeArchive::new(dir.path(), &[("linux-image-amd64", "6.12.1-1", b"m")]);
        let k = Resolver::new(&a, None).kernel("linux-image-amd64").unwrap();
        assert_eq!(k.package, "linux-image-6.12.1-amd64");
        let mut pin = lock_of(&a, &[]);
        pin.lock.kernel.package = "linux-image-6.12.0-amd64".into();
        let k = Resolver::new(&a, Some(&pin))
            .kernel("linux-image-amd64")
            .unwrap();
        assert_eq!(k.package, "linux-image-6.12.0-amd64");
    }

    #[test]
    fn changes_lists_moves() {
        let dir = tempfile::tempdir().unwrap();
        let a = FakeArchive::new(dir.path(), &[("x", "1", b"1"), ("y", "1", b"y")]);
        let old = lock_of(&a, &["x", "y"]).lock;
        a.index
            .borrow_mut()
            .insert(0, ("x".into(), "2".into(), b"2".to_vec()));
        a.index
            .borrow_mut()
            .push(("z".into(), "1".into(), b"z".to_vec()));
        let new = lock_of(&a, &["x", "z"]).lock;
        assert_eq!(
            changes(&old, &new),
            vec!["x 1 -> 2", "z 1 (new)", "y 1 (dropped)"]
        );
    }
}
