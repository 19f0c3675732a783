//! The signed manifest: what the bundle is for and what its payloads are.

use serde::{Deserialize, Serialize};

/// Largest payload accepted (a slot's partition is far smaller).
pub const MAX_PAYLOAD_SIZE: u64 = 64 << 30;
const MAX_TEXT: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadKind {
    /// The slot's boot partition image (FAT: Xen, kernel, initramfs).
    Boot,
    /// The slot's root partition image (squashfs + verity tree).
    Root,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub kind: PayloadKind,
    pub size: u64,
    pub blake3: [u8; 32],
}

/// The root image's dm-verity parameters, so the updater can recompute
/// the root hash of what it wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootVerity {
    pub data_blocks: u64,
    pub data_block_size: u32,
    pub hash_block_size: u32,
    /// Byte offset of the verity superblock inside the root payload.
    pub hash_offset: u64,
    pub salt: Vec<u8>,
    pub root_hash: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Product string; must equal the running image's.
    pub compatible: String,
    pub version: String,
    /// Anti-rollback floor: a bundle below the installed floor is refused.
    pub security_epoch: u64,
    pub build_id: String,
    pub payloads: Vec<Payload>,
    pub root_verity: RootVerity,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn text(field: &'static str, v: &str) -> Result<(), ManifestError> {
    if v.is_empty() || v.len() > MAX_TEXT {
        return Err(invalid(
            field,
            format!("length {} is not in 1..={MAX_TEXT}", v.len()),
        ));
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.+:~".contains(c))
    {
        return Err(invalid(
            field,
            format!("`{v}` has characters outside [A-Za-z0-9._+:~-]"),
        ));
    }
    Ok(())
}

impl Manifest {
    /// Checks everything the updater relies on; a manifest is only used
    /// after this passed.
    pub fn validate(&self) -> Result<(), ManifestError> {
        text("compatible", &self.compatible)?;
        text("version", &self.version)?;
        text("build_id", &self.build_id)?;
        let kinds: Vec<PayloadKind> = self.payloads.iter().map(|p| p.kind).collect();
        if kinds != [PayloadKind::Boot, PayloadKind::Root] {
            return Err(invalid(
                "payloads",
                format!("must be [Boot, Root], found {kinds:?}"),
            ));
        }
        for p in &self.payloads {
            if p.size == 0 || p.size > MAX_PAYLOAD_SIZE {
                return Err(invalid(
                    "payloads.size",
                    format!("{} is not in 1..={MAX_PAYLOAD_SIZE}", p.size),
                ));
            }
        }
        let v = &self.root_verity;
        for (field, bs) in [
            ("root_verity.data_block_size", v.data_block_size),
            ("root_verity.hash_block_size", v.hash_block_size),
        ] {
            if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
                return Err(invalid(
                    field,
                    format!("{bs} is not a power of two in 512..=65536"),
                ));
            }
        }
        if v.salt.len() > 256 {
            return Err(invalid("root_verity.salt", "longer than 256 bytes"));
        }
        let root_size = self.payloads[1].size;
        let data = v
            .data_blocks
            .checked_mul(u64::from(v.data_block_size))
            .ok_or_else(|| invalid("root_verity.data_blocks", "overflows"))?;
        if v.data_blocks == 0 || data > v.hash_offset {
            return Err(invalid(
                "root_verity.data_blocks",
                "data must be non-empty and end before the hash area",
            ));
        }
        if v.hash_offset >= root_size || !v.hash_offset.is_multiple_of(u64::from(v.hash_block_size))
        {
            return Err(invalid(
                "root_verity.hash_offset",
                "must be block aligned and inside the root payload",
            ));
        }
        Ok(())
    }

    pub fn payload(&self, kind: PayloadKind) -> Option<&Payload> {
        self.payloads.iter().find(|p| p.kind == kind)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Manifest {
        Manifest {
            compatible: "qubes-dom0-appliance-x86_64".into(),
            version: "0.2.0".into(),
            security_epoch: 3,
            build_id: "1795452159".into(),
            payloads: vec![
                Payload {
                    kind: PayloadKind::Boot,
                    size: 4096,
                    blake3: [1; 32],
                },
                Payload {
                    kind: PayloadKind::Root,
                    size: 3 * 4096,
                    blake3: [2; 32],
                },
            ],
            root_verity: RootVerity {
                data_blocks: 2,
                data_block_size: 4096,
                hash_block_size: 4096,
                hash_offset: 8192,
                salt: vec![7; 32],
                root_hash: [9; 32],
            },
        }
    }

    #[test]
    fn sample_is_valid_and_round_trips() {
        let m = sample();
        m.validate().unwrap();
        let bytes = postcard::to_allocvec(&m).unwrap();
        assert_eq!(postcard::from_bytes::<Manifest>(&bytes).unwrap(), m);
    }

    #[test]
    fn each_field_is_checked() {
        type Edit = fn(&mut Manifest);
        let cases: &[(&str, Edit)] = &[
            ("compatible", |m| m.compatible = String::new()),
            ("version", |m| m.version = "1 0".into()),
            ("build_id", |m| m.build_id = "x".repeat(200)),
            ("payloads", |m| m.payloads.reverse()),
            ("payloads", |m| {
                m.payloads.pop();
            }),
            ("payloads.size", |m| m.payloads[0].size = 0),
            ("root_verity.data_block_size", |m| {
                m.root_verity.data_block_size = 1000
            }),
            ("root_verity.salt", |m| m.root_verity.salt = vec![0; 300]),
            ("root_verity.data_blocks", |m| m.root_verity.data_blocks = 0),
            ("root_verity.data_blocks", |m| {
                m.root_verity.data_blocks = u64::MAX
            }),
            ("root_verity.hash_offset", |m| {
                m.root_verity.hash_offset = 1 << 40
            }),
        ];
        for (field, edit) in cases {
            let mut m = sample();
            edit(&mut m);
            match m.validate().unwrap_err() {
                ManifestError::Invalid { field: f, .. } => assert_eq!(f, *field),
            }
        }
    }
}
