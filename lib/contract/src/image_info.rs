//! `/etc/qinit/image`: what image this is. qimage writes it into the
//! initramfs and the root (and a copy, `image.info`, next to the build's
//! slot images); qinit reads whether the image is a production one,
//! qupdate its compatibility string and security epoch, `qimage bundle`
//! and `verify` the version and the build epoch.
//!
//! `key=value` lines, every key exactly once, nothing else. The file is
//! part of the verified slot, but it is still parsed strictly, and every
//! reader on a security path treats an error as "refuse": an unreadable
//! file never makes a production image a debug one.

use std::path::{Path, PathBuf};

/// The identity of a built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The profile's image name (`qemu`, `hw`, ...).
    pub name: String,
    /// The version in the ready marker and in bundles.
    pub version: String,
    /// Which bundles this image accepts: theirs must say the same.
    pub compatible: String,
    /// The kernel's version (its modules directory).
    pub kernel: String,
    /// `SOURCE_DATE_EPOCH` of the build.
    pub build_epoch: u64,
    /// A production image: no shell, no debug switches, no terminals.
    pub production: bool,
    /// The anti-rollback epoch: once booted good, older bundles are
    /// refused.
    pub security_epoch: u64,
    /// How far above the floor (or this image's epoch, if higher) a
    /// bundle's epoch may be: a bigger jump is refused. At least 1.
    pub max_epoch_step: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: `{field}`: {reason}")]
    Invalid {
        path: PathBuf,
        /// 0 when the field is missing.
        line: usize,
        field: String,
        reason: String,
    },
}

/// The keys, in the order written.
const KEYS: [&str; 8] = [
    "name",
    "version",
    "compatible",
    "kernel",
    "build_epoch",
    "production",
    "security_epoch",
    "max_epoch_step",
];

/// A profile's `update.max_epoch_step` unless it says otherwise, and
/// `qupdate --disk`'s: large enough to skip many releases at one epoch
/// each, small enough that one key cannot pin the floor at `u64::MAX`.
pub const DEFAULT_MAX_EPOCH_STEP: u64 = 100;

/// The file is a few hundred bytes; anything much bigger is not it.
const MAX_BYTES: u64 = 4096;

impl ImageInfo {
    /// Whether `s` may be a name, version, compatibility string or kernel
    /// version: non-empty, `[A-Za-z0-9._+-]` only (the profile checks its
    /// fields with this too, so a built image always parses).
    pub fn valid_name(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let values = [
            self.name.clone(),
            self.version.clone(),
            self.compatible.clone(),
            self.kernel.clone(),
            self.build_epoch.to_string(),
            self.production.to_string(),
            self.security_epoch.to_string(),
            self.max_epoch_step.to_string(),
        ];
        KEYS.iter()
            .zip(values)
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, InfoError> {
        use std::io::Read as _;
        let read = |source| InfoError::Read {
            path: path.to_owned(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read)?
            .take(MAX_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if text.len() as u64 > MAX_BYTES {
            return Err(InfoError::Invalid {
                path: path.to_owned(),
                line: 0,
                field: "(file)".into(),
                reason: format!("larger than {MAX_BYTES} bytes"),
            });
        }
        Self::parse(path, &text)
    }

    /// Parses the text of the file at `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, InfoError> {
        let err = |line: usize, field: &str, reason: String| InfoError::Invalid {
            path: path.to_owned(),
            line,
            field: field.to_owned(),
            reason,
        };
        let mut found: [Option<(usize, &str)>; KEYS.len()] = [None; KEYS.len()];
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            if raw.is_empty() {
                continue;
            }
            let (k, v) = raw
                .split_once('=')
                .ok_or_else(|| err(line, raw, "not key=value".into()))?;
            let at = KEYS
                .iter()
                .position(|known| *known == k)
                .ok_or_else(|| err(line, k, "unknown key".into()))?;
            if found[at].replace((line, v)).is_some() {
                return Err(err(line, k, "given twice".into()));
            }
        }
        let get = |at: usize| found[at].ok_or_else(|| err(0, KEYS[at], "missing".into()));
        let name = |at: usize| -> Result<String, InfoError> {
            let (line, v) = get(at)?;
            if !Self::valid_name(v) {
                return Err(err(
                    line,
                    KEYS[at],
                    format!("{v:?} is not 1 to 128 of [A-Za-z0-9._+-]"),
                ));
            }
            Ok(v.to_owned())
        };
        let number = |at: usize| -> Result<u64, InfoError> {
            let (line, v) = get(at)?;
            // Digits only: `+1` and ` 1` parse as u64 but are not ours.
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(line, KEYS[at], format!("{v:?} is not a number")));
            }
            v.parse()
                .map_err(|e| err(line, KEYS[at], format!("{v:?}: {e}")))
        };
        let (line, production) = get(5)?;
        let production = match production {
            "true" => true,
            "false" => false,
            v => return Err(err(line, KEYS[5], format!("{v:?} is not true or false"))),
        };
        Ok(Self {
            name: name(0)?,
            version: name(1)?,
            compatible: name(2)?,
            kernel: name(3)?,
            build_epoch: number(4)?,
            production,
            security_epoch: number(6)?,
            max_epoch_step: match number(7)? {
                0 => {
                    return Err(err(
                        get(7)?.0,
                        KEYS[7],
                        "0 would refuse every new security epoch".into(),
                    ))
                }
                step => step,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ImageInfo {
        ImageInfo {
            name: "qemu-test".into(),
            version: "0.1.0".into(),
            compatible: "dom0-x86_64".into(),
            kernel: "6.12.117+deb13-amd64".into(),
            build_epoch: 1_700_000_000,
            production: false,
            security_epoch: 1,
            max_epoch_step: 100,
        }
    }

    #[test]
    fn renders_and_parses_back() {
        let text = sample().render();
        assert_eq!(
            text,
            "name=qemu-test\nversion=0.1.0\ncompatible=dom0-x86_64\nkernel=6.12.117+deb13-amd64\n\
             build_epoch=1700000000\nproduction=false\nsecurity_epoch=1\nmax_epoch_step=100\n"
        );
        assert_eq!(ImageInfo::parse(Path::new("i"), &text).unwrap(), sample());
    }

    #[test]
    fn each_fault_names_the_file_the_field_and_the_reason() {
        let good = sample().render();
        let cases = [
            (
                good.replace("production=false", "production=yes"),
                "production",
                "true or false",
            ),
            (
                good.replace("production=false\n", ""),
                "production",
                "missing",
            ),
            (
                good.replace("security_epoch=1", "security_epoch=x"),
                "security_epoch",
                "not a number",
            ),
            (
                good.replace("security_epoch=1", "security_epoch=+1"),
                "security_epoch",
                "not a number",
            ),
            (
                good.replace("security_epoch=1", "security_epoch=99999999999999999999"),
                "security_epoch",
                "too large",
            ),
            (
                good.replace("max_epoch_step=100", "max_epoch_step=0"),
                "max_epoch_step",
                "refuse every new security epoch",
            ),
            (
                good.replace("max_epoch_step=100\n", ""),
                "max_epoch_step",
                "missing",
            ),
            (
                good.replace("version=0.1.0", "version=0 1"),
                "version",
                "A-Za-z0-9",
            ),
            (good.replace("name=qemu-test", "name="), "name", "A-Za-z0-9"),
            (format!("{good}name=again\n"), "name", "given twice"),
            (format!("{good}debug=true\n"), "debug", "unknown key"),
            (format!("{good}garbage\n"), "garbage", "key=value"),
        ];
        for (text, field, reason) in cases {
            let e = ImageInfo::parse(Path::new("/etc/qinit/image"), &text).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("/etc/qinit/image: "), "{msg}");
            assert!(msg.contains(&format!("`{field}`")), "{msg}");
            assert!(msg.contains(reason), "{msg} lacks {reason}");
        }
    }

    #[test]
    fn an_unreadable_or_huge_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ImageInfo::load(&dir.path().join("none")),
            Err(InfoError::Read { .. })
        ));
        let big = dir.path().join("big");
        std::fs::write(&big, "x".repeat(5000)).unwrap();
        assert!(ImageInfo::load(&big)
            .unwrap_err()
            .to_string()
            .contains("larger"));
        let ok = dir.path().join("ok");
        std::fs::write(&ok, sample().render()).unwrap();
        assert_eq!(ImageInfo::load(&ok).unwrap(), sample());
    }
}
