//! Image versions and their order: `MAJOR.MINOR.PATCH`, optionally
//! followed by `-PRE` (a pre-release) and `+BUILD` (build metadata), as
//! Semantic Versioning 2.0.0 orders them:
//! - release numbers compare numerically, left to right (`0.10.0` is
//!   newer than `0.9.9`);
//! - a pre-release is older than its release (`0.2.0-rc1 < 0.2.0`);
//! - pre-releases compare by their dot-separated identifiers: numeric ones
//!   numerically and older than alphanumeric ones, which compare in ASCII
//!   order, and a shorter list is older when all else is equal;
//! - build metadata does not order at all (`0.2.0+a` = `0.2.0+b`).
//!
//! The order decides one thing: a bundle of the same security epoch as the
//! running image installs only if its version is the same or newer
//! (docs/updates.md). qimage refuses a profile whose version does not
//! parse, so a built image's always does; anything else is refused.

use std::cmp::Ordering;

/// A parsed version; [`Ord`] is the order above.
#[derive(Debug, Clone)]
pub struct Version {
    release: [u64; 3],
    pre: Vec<Identifier>,
    /// Kept for display only.
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Identifier {
    // Declared first: numeric identifiers are older than alphanumeric ones.
    Numeric(u64),
    Alphanumeric(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("version {text:?}: {reason} (MAJOR.MINOR.PATCH[-PRE][+BUILD])")]
pub struct VersionError {
    pub text: String,
    pub reason: String,
}

/// A numeric part: digits only, no sign, no leading zero (but "0"), as
/// SemVer says, and within u64.
fn numeric(part: &str) -> Result<u64, &'static str> {
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return Err("a number must be digits");
    }
    if part.len() > 1 && part.starts_with('0') {
        return Err("a number must not have a leading zero");
    }
    part.parse().map_err(|_| "a number is too large")
}

fn identifier_ok(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Version {
    pub fn parse(text: &str) -> Result<Self, VersionError> {
        let err = |reason: &str| VersionError {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (rest, build) = match text.split_once('+') {
            Some((rest, build)) => (rest, Some(build)),
            None => (text, None),
        };
        if let Some(build) = build {
            if !build.split('.').all(identifier_ok) {
                return Err(err("build metadata must be dot-separated [0-9A-Za-z-]"));
            }
        }
        let (core, pre) = match rest.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (rest, None),
        };
        let parts: Vec<&str> = core.split('.').collect();
        let [major, minor, patch] = parts[..] else {
            return Err(err("the release must be three numbers"));
        };
        let mut release = [0u64; 3];
        for (slot, part) in release.iter_mut().zip([major, minor, patch]) {
            *slot = numeric(part).map_err(err)?;
        }
        let pre = match pre {
            None => Vec::new(),
            Some(pre) => pre
                .split('.')
                .map(|id| {
                    if !identifier_ok(id) {
                        return Err(err("a pre-release must be dot-separated [0-9A-Za-z-]"));
                    }
                    if id.bytes().all(|b| b.is_ascii_digit()) {
                        numeric(id).map(Identifier::Numeric).map_err(err)
                    } else {
                        Ok(Identifier::Alphanumeric(id.to_owned()))
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            release,
            pre,
            text: text.to_owned(),
        })
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.release.cmp(&other.release).then_with(|| {
            match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                // A pre-release is older than the release.
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                // Element by element, then the shorter list is older:
                // Vec's own order.
                (false, false) => self.pre.cmp(&other.pre),
            }
        })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn semver_precedence() {
        // SemVer 2.0.0's own example chain, then ours.
        let chain = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.0.1",
            "1.1.0",
            "1.10.0",
            "2.0.0",
        ];
        for pair in chain.windows(2) {
            assert!(v(pair[0]) < v(pair[1]), "{} < {}", pair[0], pair[1]);
        }
        assert!(v("0.2.0-broken") < v("0.2.0"));
        assert!(v("0.1.0") < v("0.2.0-broken"));
        assert_eq!(v("0.2.0+a"), v("0.2.0+b"));
        assert_eq!(v("0.2.0").to_string(), "0.2.0");
    }

    #[test]
    fn anything_else_is_refused_by_name() {
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "01.2.3",
            "1.2.x",
            "-1.2.3",
            "1.2.3-",
            "1.2.3-a..b",
            "1.2.3-01",
            "1.2.3+",
            "1.2.3+a_b",
            "1.2.3-é",
            " 1.2.3",
            "99999999999999999999.0.0",
        ] {
            let e = Version::parse(bad).unwrap_err();
            assert!(e.to_string().contains("MAJOR.MINOR.PATCH"), "{bad:?}: {e}");
        }
        let e = Version::parse("99999999999999999999.0.0").unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        let e = Version::parse("01.2.3").unwrap_err();
        assert!(e.to_string().contains("leading zero"), "{e}");
    }
}
