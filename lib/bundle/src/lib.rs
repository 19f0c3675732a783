//! The update bundle: one file, read front to back so it can come from a
//! pipe (in Qubes the update arrives from an UpdateVM on stdin).
//!
//! ```text
//! offset 0   header      64 bytes: magic, format version, section sizes
//!        64  signatures  n × (ed25519 public key 32 B, signature 64 B)
//!            manifest    postcard-encoded [`Manifest`], signed
//!            payloads    in manifest order, each exactly its declared size
//! ```
//!
//! Every size in the header is capped before anything is allocated. The
//! signatures are checked over the raw manifest bytes **before** the
//! manifest is decoded, so the decoder only ever sees signed input. A
//! payload is trusted only through the blake3 hash the signed manifest
//! carries for it.

mod header;
mod keys;
mod manifest;
mod verify;
mod write;

pub use header::{
    Header, FORMAT_VERSION, HEADER_LEN, MAGIC, MAX_MANIFEST_LEN, MAX_SIGNATURES,
    SIGNATURE_ENTRY_LEN,
};
pub use keys::{generate_keypair, KeyError, PrivateKey, PublicKey, TrustStore, TrustedKey};
pub use manifest::{Manifest, ManifestError, Payload, PayloadKind, RootVerity, MAX_PAYLOAD_SIZE};
pub use verify::{
    check_signatures, expect_end, read_verified, stream_payload, BundleError, Section, Verified,
};
pub use write::{hash_file, write_bundle, PayloadSource, WriteError};

/// The domain-separation prefix of every signed message, so a bundle
/// signature can never be replayed as a signature over anything else.
pub const SIGNING_CONTEXT: &[u8] = b"qupdate bundle manifest v1\0";

/// The exact bytes a signature covers.
pub fn signed_message(manifest: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + manifest.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(manifest);
    m
}
