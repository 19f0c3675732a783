//! `qimage verify`: rebuild a profile and compare the result with a
//! published build, so anyone with the source and the Debian archive can
//! check that a released image is what the source makes.
//!
//! The rebuild follows the published `packages.lock` when there is one (or
//! `--lock`), takes `SOURCE_DATE_EPOCH` from the published `image.info`,
//! and goes into a scratch directory; the published files are only read.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use qcontract::paths::output::{BOOT_IMAGE, DISK_IMAGE, IMAGE_INFO, ROOT_IMAGE, ROOT_VERITY};
use qcontract::ImageInfo;

use crate::pipeline::{self, BuildOptions};

/// The build outputs compared file by file, when the published build has
/// them. Bundles (`*.bundle`) are added as found.
pub const COMPARED: &[&str] = &[
    DISK_IMAGE,
    BOOT_IMAGE,
    ROOT_IMAGE,
    qcontract::paths::output::INITRD,
    ROOT_VERITY,
    IMAGE_INFO,
    qcontract::paths::output::PACKAGES_LOCK,
    qcontract::paths::output::SBOM,
    qcontract::paths::output::ROOT_FILES,
];

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a root.verity")]
    Verity {
        path: PathBuf,
        #[source]
        source: verity::Error,
    },
    #[error("--root-hash `{0}` is not 64 hex digits")]
    RootHash(String),
    #[error(transparent)]
    Info(#[from] qcontract::InfoError),
    #[error(transparent)]
    Hash(#[from] crate::archive::ArchiveError),
}

/// What a rebuild is compared against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub root_hash: String,
    /// (file name, sha256) of the published files, sorted by name.
    pub files: Vec<(String, String)>,
    /// The published build's `SOURCE_DATE_EPOCH`, from `image.info`.
    pub epoch: Option<u64>,
    /// The published build's lock, if it has one.
    pub lock: Option<PathBuf>,
}

impl Published {
    /// Only a root hash (`--root-hash`).
    pub fn root_hash(hex: &str) -> Result<Self, VerifyError> {
        let h = hex.trim().to_ascii_lowercase();
        if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(VerifyError::RootHash(hex.to_owned()));
        }
        Ok(Self {
            root_hash: h,
            files: Vec::new(),
            epoch: None,
            lock: None,
        })
    }

    /// A build output directory (needs at least `root.verity`).
    pub fn from_dir(dir: &Path) -> Result<Self, VerifyError> {
        let verity_path = dir.join(ROOT_VERITY);
        let text = read(&verity_path)?;
        let vinfo = verity::VerityInfo::from_text(&text).map_err(|source| VerifyError::Verity {
            path: verity_path.clone(),
            source,
        })?;
        let info_path = dir.join(IMAGE_INFO);
        let epoch = if info_path.exists() {
            Some(ImageInfo::load(&info_path)?.build_epoch)
        } else {
            None
        };
        let files = hashes(dir)?;
        let lock = dir.join(qcontract::paths::output::PACKAGES_LOCK);
        Ok(Self {
            root_hash: vinfo.root_hash_hex(),
            files,
            epoch,
            lock: lock.exists().then_some(lock),
        })
    }
}

fn read(path: &Path) -> Result<String, VerifyError> {
    fs::read_to_string(path).map_err(|source| VerifyError::Io {
        path: path.to_owned(),
        op: "read",
        source,
    })
}

/// sha256 of each compared file present in `dir`.
fn hashes(dir: &Path) -> Result<Vec<(String, String)>, VerifyError> {
    let mut names: Vec<String> = COMPARED.iter().map(|s| (*s).to_owned()).collect();
    let entries = fs::read_dir(dir).map_err(|source| VerifyError::Io {
        path: dir.to_owned(),
        op: "list",
        source,
    })?;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(qcontract::paths::output::BUNDLE_SUFFIX) {
            names.push(n);
        }
    }
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let path = dir.join(&n);
        if path.exists() {
            let h = crate::archive::sha256_file(&path)?;
            out.push((n, h));
        }
    }
    Ok(out)
}

/// One compared item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub what: String,
    pub published: String,
    /// `None`: the rebuild has no such file.
    pub rebuilt: Option<String>,
}

impl Line {
    pub fn matches(&self) -> bool {
        self.rebuilt.as_deref() == Some(self.published.as_str())
    }
}

/// The outcome: the root hash first, then each published file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub lines: Vec<Line>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.lines.iter().all(Line::matches)
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            if l.matches() {
                s.push_str(&format!("ok        {:<24} {}\n", l.what, l.published));
            } else {
                s.push_str(&format!(
                    "MISMATCH  {:<24} published {}\n          {:<24} rebuilt   {}\n",
                    l.what,
                    l.published,
                    "",
                    l.rebuilt.as_deref().unwrap_or("(missing)")
                ));
            }
        }
        let bad = self.lines.iter().filter(|l| !l.matches()).count();
        if bad == 0 {
            s.push_str("verify: the rebuild is identical to the published build\n");
        } else {
            s.push_str(&format!(
                "verify: {bad} of {} differ from the published build\n",
                self.lines.len()
            ));
        }
        s
    }
}

/// Compares a finished rebuild in `rebuilt_dir` with `published`.
pub fn compare(
    published: &Published,
    rebuilt_dir: &Path,
    rebuilt_root_hash: &str,
) -> Result<Report, VerifyError> {
    let rebuilt = hashes(rebuilt_dir)?;
    let mut lines = vec![Line {
        what: "root hash".into(),
        published: published.root_hash.clone(),
        rebuilt: Some(rebuilt_root_hash.to_owned()),
    }];
    for (name, hash) in &published.files {
        lines.push(Line {
            what: name.clone(),
            published: hash.clone(),
            rebuilt: rebuilt
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, h)| h.clone()),
        });
    }
    Ok(Report { lines })
}

/// How to rebuild.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The build's inputs; `out_dir`, `work_dir`, `lock` and `epoch` are
    /// set here.
    pub build: BuildOptions,
    /// `--lock`; otherwise the published lock, otherwise the cache's.
    pub lock: Option<PathBuf>,
    /// `SOURCE_DATE_EPOCH` from the environment; otherwise the published one.
    pub epoch: Option<u64>,
    /// Keep the rebuild here instead of in a scratch directory.
    pub keep: Option<PathBuf>,
}

/// Rebuilds and compares.
pub fn run(opts: &VerifyOptions, published: &Published) -> Result<Report> {
    let scratch_parent = opts.build.cache_dir.join("verify");
    fs::create_dir_all(&scratch_parent)
        .with_context(|| format!("creating {}", scratch_parent.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("verify-")
        .tempdir_in(&scratch_parent)
        .with_context(|| {
            format!(
                "creating a scratch directory in {}",
                scratch_parent.display()
            )
        })?;
    let mut build = opts.build.clone();
    build.out_dir = opts
        .keep
        .clone()
        .unwrap_or_else(|| scratch.path().join("out"));
    build.work_dir = Some(scratch.path().join("work"));
    build.lock = opts.lock.clone().or_else(|| published.lock.clone());
    build.update_cache_lock = false;
    build.refresh = false;
    if let (Some(env), Some(publ)) = (opts.epoch, published.epoch) {
        if env != publ {
            log::warn!(
                "SOURCE_DATE_EPOCH={env} but the published build used {publ}; expect a mismatch"
            );
        }
    }
    build.epoch = opts.epoch.or(published.epoch).unwrap_or(build.epoch);
    let out = pipeline::build(&build)?;
    Ok(compare(published, &build.out_dir, &out.root_hash)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake build output: a real root.verity over `root` bytes.
    fn fake_build(dir: &Path, root: &[u8], epoch: u64) -> String {
        fs::create_dir_all(dir).unwrap();
        let img = dir.join(ROOT_IMAGE);
        fs::write(&img, root).unwrap();
        let params = verity::VerityParams::new(vec![7; 32], [1; 16]).unwrap();
        let vinfo = verity::append_tree(&img, &params).unwrap();
        fs::write(dir.join(ROOT_VERITY), vinfo.to_text()).unwrap();
        let info = ImageInfo {
            name: "t".into(),
            version: "1".into(),
            compatible: "c".into(),
            kernel: "k".into(),
            build_epoch: epoch,
            production: false,
            security_epoch: 0,
            max_epoch_step: 1,
        };
        fs::write(dir.join(IMAGE_INFO), info.render()).unwrap();
        fs::write(dir.join(DISK_IMAGE), b"disk").unwrap();
        fs::write(dir.join("t-1.bundle"), b"bundle").unwrap();
        vinfo.root_hash_hex()
    }

    #[test]
    fn identical_builds_verify() {
        let d = tempfile::tempdir().unwrap();
        let h = fake_build(&d.path().join("a"), &[1; 8192], 5);
        fake_build(&d.path().join("b"), &[1; 8192], 5);
        let p = Published::from_dir(&d.path().join("a")).unwrap();
        assert_eq!(p.epoch, Some(5));
        assert_eq!(p.lock, None);
        assert!(p.files.iter().any(|(n, _)| n == "t-1.bundle"));
        let r = compare(&p, &d.path().join("b"), &h).unwrap();
        assert!(r.ok(), "{}", r.render());
        assert!(r.render().contains("identical"));
    }

    #[test]
    fn a_different_root_is_reported_with_both_hashes() {
        let d = tempfile::tempdir().unwrap();
        let published_hash = fake_build(&d.path().join("a"), &[1; 8192], 5);
        let rebuilt_hash = fake_build(&d.path().join("b"), &[2; 8192], 5);
        assert_ne!(published_hash, rebuilt_hash);
        let p = Published::from_dir(&d.path().join("a")).unwrap();
        let r = compare(&p, &d.path().join("b"), &rebuilt_hash).unwrap();
        assert!(!r.ok());
        let bad: Vec<&str> = r
            .lines
            .iter()
            .filter(|l| !l.matches())
            .map(|l| l.what.as_str())
            .collect();
        assert_eq!(bad, ["root hash", ROOT_IMAGE, ROOT_VERITY]);
        let text = r.render();
        assert!(text.contains(&published_hash) && text.contains(&rebuilt_hash));
        assert!(text.contains("3 of"), "{text}");
    }

    #[test]
    fn a_file_missing_from_the_rebuild_is_a_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let h = fake_build(&d.path().join("a"), &[1; 8192], 5);
        fake_build(&d.path().join("b"), &[1; 8192], 5);
        fs::remove_file(d.path().join("b/t-1.bundle")).unwrap();
        let p = Published::from_dir(&d.path().join("a")).unwrap();
        let r = compare(&p, &d.path().join("b"), &h).unwrap();
        let line = r.lines.iter().find(|l| l.what == "t-1.bundle").unwrap();
        assert_eq!(line.rebuilt, None);
        assert!(!r.ok());
    }

    #[test]
    fn a_bare_root_hash_is_checked_alone() {
        let d = tempfile::tempdir().unwrap();
        let h = fake_build(&d.path().join("b"), &[1; 8192], 5);
        let p = Published::root_hash(&h.to_uppercase()).unwrap();
        assert!(compare(&p, &d.path().join("b"), &h).unwrap().ok());
        let other = Published::root_hash(&"0".repeat(64)).unwrap();
        assert!(!compare(&other, &d.path().join("b"), &h).unwrap().ok());
        assert!(matches!(
            Published::root_hash("abc").unwrap_err(),
            VerifyError::RootHash(_)
        ));
    }

    #[test]
    fn a_directory_without_root_verity_is_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            Published::from_dir(d.path()).unwrap_err(),
            VerifyError::Io { .. }
        ));
    }
}
