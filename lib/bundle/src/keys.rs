//! Keys and the trust store.
//!
//! Key files are one line of text so they can be read, diffed and pinned:
//! `qupdate-ed25519-private <64 hex>` and
//! `qupdate-ed25519-public <64 hex> <name>`. The trust store
//! (`/etc/qupdate/trust.toml` in the image) lists public keys and how many
//! distinct trusted keys must sign a bundle; a revoked key stays listed so
//! its signatures are refused by name.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::Deserialize;

const PRIVATE_TAG: &str = "qupdate-ed25519-private";
const PUBLIC_TAG: &str = "qupdate-ed25519-public";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: field `{field}`: {reason}")]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("no randomness for a key: {0}")]
    Random(String),
}

/// An ed25519 signing key. Never put one into an image.
pub struct PrivateKey(SigningKey);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PrivateKey(public {})",
            hex::encode(self.0.verifying_key().as_bytes())
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub key: VerifyingKey,
    pub name: String,
}

fn parse_hex32(path: &Path, what: &str, s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = hex::decode(s).map_err(|e| KeyError::Format {
        path: path.to_owned(),
        reason: format!("{what}: {e}"),
    })?;
    bytes.try_into().map_err(|_| KeyError::Format {
        path: path.to_owned(),
        reason: format!("{what}: not 32 bytes"),
    })
}

/// Splits `<tag> <64 hex> [rest...]`, returning the 32 bytes and the rest.
fn parse_key_line<'a>(
    path: &Path,
    text: &'a str,
    tag: &str,
    what: &str,
) -> Result<([u8; 32], std::str::SplitWhitespace<'a>), KeyError> {
    let mut words = text.split_whitespace();
    if words.next() != Some(tag) {
        return Err(KeyError::Format {
            path: path.to_owned(),
            reason: format!("does not start with `{tag}`"),
        });
    }
    let bytes = parse_hex32(path, what, words.next().unwrap_or(""))?;
    Ok((bytes, words))
}

impl PrivateKey {
    pub fn public(&self, name: &str) -> PublicKey {
        PublicKey {
            key: self.0.verifying_key(),
            name: name.to_owned(),
        }
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, KeyError> {
        let (seed, _) = parse_key_line(path, text, PRIVATE_TAG, "private key")?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Writes the key readable by its owner only.
    pub fn store(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| KeyError::Write {
                path: path.to_owned(),
                source,
            })?;
        writeln!(f, "{PRIVATE_TAG} {}", hex::encode(self.0.to_bytes())).map_err(|source| {
            KeyError::Write {
                path: path.to_owned(),
                source,
            }
        })
    }
}

impl PublicKey {
    pub fn parse(path: &Path, text: &str) -> Result<Self, KeyError> {
        let (bytes, mut words) = parse_key_line(path, text, PUBLIC_TAG, "public key")?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| KeyError::Format {
            path: path.to_owned(),
            reason: format!("public key: {e}"),
        })?;
        let name = words.next().unwrap_or("unnamed").to_owned();
        Ok(Self { key, name })
    }

    pub fn to_line(&self) -> String {
        format!(
            "{PUBLIC_TAG} {} {}\n",
            hex::encode(self.key.as_bytes()),
            self.name
        )
    }
}

/// Makes a new key pair from the kernel's random source.
pub fn generate_keypair() -> Result<PrivateKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(PrivateKey(SigningKey::from_bytes(&seed)))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub name: String,
    pub key: VerifyingKey,
    pub revoked: bool,
}

/// The keys a bundle may be signed by, and how many must sign.
#[derive(Debug, Clone)]
pub struct TrustStore {
    pub keys: Vec<TrustedKey>,
    pub threshold: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    threshold: usize,
    #[serde(rename = "key", default)]
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    public: String,
    #[serde(default)]
    revoked: bool,
}

impl TrustStore {
    pub fn parse(path: &Path, text: &str) -> Result<Self, KeyError> {
        let field = |field: String, reason: String| KeyError::Field {
            path: path.to_owned(),
            field,
            reason,
        };
        let f: TrustFile = toml::from_str(text).map_err(|e| KeyError::Format {
            path: path.to_owned(),
            reason: e.message().to_owned(),
        })?;
        let mut keys = Vec::new();
        for (i, k) in f.keys.iter().enumerate() {
            let bytes = parse_hex32(path, &format!("key[{i}].public"), &k.public)?;
            let key = VerifyingKey::from_bytes(&bytes)
                .map_err(|e| field(format!("key[{i}].public"), e.to_string()))?;
            if keys.iter().any(|t: &TrustedKey| t.key == key) {
                return Err(field(format!("key[{i}].public"), "listed twice".into()));
            }
            keys.push(TrustedKey {
                name: k.name.clone(),
                key,
                revoked: k.revoked,
            });
        }
        let usable = keys.iter().filter(|k| !k.revoked).count();
        if f.threshold == 0 || f.threshold > usable {
            return Err(field(
                "threshold".into(),
                format!(
                    "{} is not in 1..={usable} (the keys not revoked)",
                    f.threshold
                ),
            ));
        }
        Ok(Self {
            keys,
            threshold: f.threshold,
        })
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// A trust file text for `keys` (used by image builds and tests).
    pub fn render(keys: &[PublicKey], threshold: usize) -> String {
        let mut s = format!("# qupdate trust store\nthreshold = {threshold}\n");
        for k in keys {
            s.push_str(&format!(
                "\n[[key]]\nname = \"{}\"\npublic = \"{}\"\n",
                k.name,
                hex::encode(k.key.as_bytes())
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let k = generate_keypair().unwrap();
        let p = dir.path().join("k.priv");
        k.store(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let k2 = PrivateKey::load(&p).unwrap();
        assert_eq!(k.public("a"), k2.public("a"));
        // Never overwrite an existing key.
        assert!(k.store(&p).is_err());
        let line = k.public("release").to_line();
        let pk = PublicKey::parse(Path::new("p"), &line).unwrap();
        assert_eq!(pk.name, "release");
    }

    #[test]
    fn malformed_keys() {
        let p = Path::new("k");
        assert!(PrivateKey::parse(p, "nope 00").is_err());
        assert!(PrivateKey::parse(p, "qupdate-ed25519-private zz").is_err());
        assert!(PrivateKey::parse(p, "qupdate-ed25519-private 0011").is_err());
        assert!(PublicKey::parse(p, "qupdate-ed25519-public").is_err());
    }

    #[test]
    fn trust_store_checks() {
        let a = generate_keypair().unwrap().public("a");
        let b = generate_keypair().unwrap().public("b");
        let p = Path::new("/etc/qupdate/trust.toml");
        let t = TrustStore::parse(p, &TrustStore::render(&[a.clone(), b.clone()], 2)).unwrap();
        assert_eq!(t.keys.len(), 2);
        assert_eq!(t.threshold, 2);
        let field_of = |text: &str| match TrustStore::parse(p, text).unwrap_err() {
            KeyError::Field { field, .. } => field,
            e => panic!("{e:?}"),
        };
        assert_eq!(
            field_of(&TrustStore::render(std::slice::from_ref(&a), 2)),
            "threshold"
        );
        assert_eq!(
            field_of(&TrustStore::render(std::slice::from_ref(&a), 0)),
            "threshold"
        );
        assert_eq!(
            field_of(&TrustStore::render(&[a.clone(), a.clone()], 1)),
            "key[1].public"
        );
        let revoked = TrustStore::render(&[a], 1).replace("public =", "revoked = true\npublic =");
        assert_eq!(field_of(&revoked), "threshold");
        assert!(matches!(
            TrustStore::parse(p, "threshold = 1\nbogus = 2\n").unwrap_err(),
            KeyError::Format { .. }
        ));
    }
}
