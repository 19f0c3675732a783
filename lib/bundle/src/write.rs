//! Writing a bundle (qimage bundle): hash the payloads, sign the manifest,
//! lay it all out.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::header::{Header, MAX_MANIFEST_LEN, MAX_SIGNATURES};
use crate::keys::PrivateKey;
use crate::manifest::{Manifest, ManifestError, PayloadKind};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest")]
    Manifest(#[from] ManifestError),
    #[error("manifest encoding: {0}")]
    Encode(String),
    #[error("{0}")]
    Layout(String),
}

/// A payload file and what it is.
#[derive(Debug, Clone)]
pub struct PayloadSource {
    pub kind: PayloadKind,
    pub path: PathBuf,
}

/// Size and blake3 of a file.
pub fn hash_file(path: &Path) -> Result<(u64, [u8; 32]), WriteError> {
    let io = |op| {
        let path = path.to_owned();
        move |source| WriteError::Io { path, op, source }
    };
    let mut f = std::fs::File::open(path).map_err(io("open"))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io("read"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, *h.finalize().as_bytes()))
}

/// Writes a bundle: `manifest` must already carry the payloads' sizes and
/// hashes (see [`hash_file`]); `sources` are streamed in manifest order.
pub fn write_bundle<W: Write>(
    out: &mut W,
    manifest: &Manifest,
    signers: &[&PrivateKey],
    sources: &[PayloadSource],
) -> Result<(), WriteError> {
    manifest.validate()?;
    if signers.is_empty() || signers.len() > MAX_SIGNATURES as usize {
        return Err(WriteError::Layout(format!(
            "{} signer(s); 1..={MAX_SIGNATURES} allowed",
            signers.len()
        )));
    }
    let bytes = postcard::to_allocvec(manifest).map_err(|e| WriteError::Encode(e.to_string()))?;
    let manifest_len = u32::try_from(bytes.len())
        .ok()
        .filter(|l| *l <= MAX_MANIFEST_LEN)
        .ok_or_else(|| {
            WriteError::Layout(format!("manifest of {} bytes is over the cap", bytes.len()))
        })?;
    let message = crate::signed_message(&bytes);
    let count = u32::try_from(signers.len()).expect("at most MAX_SIGNATURES, checked above");
    let header = Header::new(count, manifest_len);
    let stdout = PathBuf::from("<bundle>");
    let wio = |op| {
        let path = stdout.clone();
        move |source| WriteError::Io { path, op, source }
    };
    out.write_all(&header.to_bytes())
        .map_err(wio("write header"))?;
    for k in signers {
        out.write_all(k.public("").key.as_bytes())
            .map_err(wio("write signatures"))?;
        out.write_all(&k.sign(&message))
            .map_err(wio("write signatures"))?;
    }
    out.write_all(&bytes).map_err(wio("write manifest"))?;
    if sources.len() != manifest.payloads.len() {
        return Err(WriteError::Layout("one source per manifest payload".into()));
    }
    for (src, p) in sources.iter().zip(&manifest.payloads) {
        if src.kind != p.kind {
            return Err(WriteError::Layout(format!(
                "source {:?} where the manifest has {:?}",
                src.kind, p.kind
            )));
        }
        let mut f = std::fs::File::open(&src.path).map_err(|source| WriteError::Io {
            path: src.path.clone(),
            op: "open payload",
            source,
        })?;
        let copied = std::io::copy(&mut f, out).map_err(|source| WriteError::Io {
            path: src.path.clone(),
            op: "copy payload",
            source,
        })?;
        if copied != p.size {
            return Err(WriteError::Layout(format!(
                "{}: {copied} bytes, the manifest says {}",
                src.path.display(),
                p.size
            )));
        }
    }
    out.flush().map_err(wio("flush"))?;
    Ok(())
}
