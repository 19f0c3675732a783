//! Reading a bundle: header, signatures checked over the raw manifest,
//! then the manifest decoded and validated, then payloads streamed with
//! their hashes checked.

use std::io::{Read, Write};

use ed25519_dalek::{Signature, VerifyingKey};

use crate::header::{Header, HeaderError, HEADER_LEN, SIGNATURE_ENTRY_LEN};
use crate::keys::TrustStore;
use crate::manifest::{Manifest, ManifestError, Payload, PayloadKind};

/// Where in the bundle something went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Header,
    Signatures,
    Manifest,
    Payload(PayloadKind),
    End,
}

impl std::fmt::Display for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Section::Header => f.write_str("header"),
            Section::Signatures => f.write_str("signature block"),
            Section::Manifest => f.write_str("manifest"),
            Section::Payload(k) => write!(f, "{k:?} payload"),
            Section::End => f.write_str("end of bundle"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading the {section}")]
    Io {
        section: Section,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle truncated in the {section}: expected {expected} bytes, got {got}")]
    Truncated {
        section: Section,
        expected: u64,
        got: u64,
    },
    #[error("bundle header")]
    Header(#[from] HeaderError),
    #[error("no signature by a trusted key (signed by {signers:?})")]
    UnknownKey { signers: Vec<String> },
    #[error("signature by trusted key `{name}` does not verify: the manifest was altered or the signature is forged")]
    BadSignature { name: String },
    #[error("key `{name}` signed twice")]
    DuplicateSigner { name: String },
    #[error("{valid} valid signature(s) from trusted keys, {threshold} required")]
    TooFewSignatures { valid: usize, threshold: usize },
    #[error("signed manifest does not decode: {0}")]
    ManifestDecode(String),
    #[error("signed manifest is invalid")]
    Manifest(#[from] ManifestError),
    #[error("{kind:?} payload: blake3 {actual} does not match the manifest's {expected}")]
    PayloadHash {
        kind: PayloadKind,
        expected: String,
        actual: String,
    },
    #[error("writing the {kind:?} payload")]
    Sink {
        kind: PayloadKind,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} byte(s) or more after the last payload")]
    TrailingData(u64),
}

/// A bundle whose manifest passed signature and validity checks.
#[derive(Debug, Clone)]
pub struct Verified {
    pub header: Header,
    pub manifest: Manifest,
    /// Names of the trusted keys whose signatures counted.
    pub signers: Vec<String>,
}

/// Reads exactly `buf.len()` bytes, reporting how far it got on EOF.
fn read_section<R: Read>(r: &mut R, buf: &mut [u8], section: Section) -> Result<(), BundleError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(BundleError::Truncated {
                    section,
                    expected: buf.len() as u64,
                    got: got as u64,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(BundleError::Io { section, source }),
        }
    }
    Ok(())
}

/// Checks the signature block against the trust store over `manifest`.
pub fn check_signatures(
    sigs: &[u8],
    manifest: &[u8],
    trust: &TrustStore,
) -> Result<Vec<String>, BundleError> {
    let message = crate::signed_message(manifest);
    let mut counted: Vec<String> = Vec::new();
    let mut seen: Vec<[u8; 32]> = Vec::new();
    let mut strangers = Vec::new();
    let entry = SIGNATURE_ENTRY_LEN as usize;
    for chunk in sigs.chunks_exact(entry) {
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&chunk[..32]);
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&chunk[32..]);
        let Some(trusted) = trust.keys.iter().find(|k| k.key.as_bytes() == &pk) else {
            strangers.push(hex::encode(&pk[..8]));
            continue;
        };
        if seen.contains(&pk) {
            return Err(BundleError::DuplicateSigner {
                name: trusted.name.clone(),
            });
        }
        seen.push(pk);
        if trusted.revoked {
            // A revoked key proves nothing; it neither counts nor blocks.
            continue;
        }
        let key: &VerifyingKey = &trusted.key;
        key.verify_strict(&message, &Signature::from_bytes(&sig))
            .map_err(|_| BundleError::BadSignature {
                name: trusted.name.clone(),
            })?;
        counted.push(trusted.name.clone());
    }
    if counted.len() >= trust.threshold {
        return Ok(counted);
    }
    if seen.is_empty() {
        return Err(BundleError::UnknownKey { signers: strangers });
    }
    Err(BundleError::TooFewSignatures {
        valid: counted.len(),
        threshold: trust.threshold,
    })
}

/// Reads and verifies everything up to the payloads. The manifest bytes
/// are decoded only after the signatures over them verified.
pub fn read_verified<R: Read>(r: &mut R, trust: &TrustStore) -> Result<Verified, BundleError> {
    let mut hb = [0u8; HEADER_LEN];
    read_section(r, &mut hb, Section::Header)?;
    let header = Header::parse(&hb)?;
    let mut sigs = vec![0u8; header.signatures_bytes()];
    read_section(r, &mut sigs, Section::Signatures)?;
    let mut manifest_bytes = vec![0u8; header.manifest_bytes()];
    read_section(r, &mut manifest_bytes, Section::Manifest)?;
    let signers = check_signatures(&sigs, &manifest_bytes, trust)?;
    let (manifest, rest): (Manifest, &[u8]) = postcard::take_from_bytes(&manifest_bytes)
        .map_err(|e| BundleError::ManifestDecode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(BundleError::ManifestDecode(format!(
            "{} byte(s) after the manifest",
            rest.len()
        )));
    }
    manifest.validate()?;
    Ok(Verified {
        header,
        manifest,
        signers,
    })
}

/// Streams one payload from the bundle into `sink`, hashing as it goes;
/// `progress` is told the bytes done so far. The hash is only known at the
/// end, so the sink must be a place that stays unbootable until then.
pub fn stream_payload<R: Read, W: Write>(
    r: &mut R,
    payload: &Payload,
    sink: &mut W,
    progress: &mut dyn FnMut(u64),
) -> Result<(), BundleError> {
    let section = Section::Payload(payload.kind);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < payload.size {
        let want =
            usize::try_from((payload.size - done).min(buf.len() as u64)).unwrap_or(buf.len());
        let n = match r.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(BundleError::Truncated {
                    section,
                    expected: payload.size,
                    got: done,
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(BundleError::Io { section, source }),
        };
        hasher.update(&buf[..n]);
        sink.write_all(&buf[..n])
            .map_err(|source| BundleError::Sink {
                kind: payload.kind,
                source,
            })?;
        done += n as u64;
        progress(done);
    }
    let actual = hasher.finalize();
    if actual.as_bytes() != &payload.blake3 {
        return Err(BundleError::PayloadHash {
            kind: payload.kind,
            expected: hex::encode(payload.blake3),
            actual: actual.to_hex().to_string(),
        });
    }
    Ok(())
}

/// After the last payload the stream must end.
pub fn expect_end<R: Read>(r: &mut R) -> Result<(), BundleError> {
    let mut b = [0u8; 1];
    loop {
        match r.read(&mut b) {
            Ok(0) => return Ok(()),
            Ok(_) => return Err(BundleError::TrailingData(1)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(BundleError::Io {
                    section: Section::End,
                    source,
                })
            }
        }
    }
}
