//! The root's dm-verity parameters, written by qimage into the slot's
//! initramfs (`/etc/qinit/root.verity`). The initramfs is part of the
//! verified slot, but the file is still parsed strictly.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {reason}")]
    Syntax {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: field `{field}`: {reason}")]
    Field {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootVerity {
    pub data_blocks: u64,
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub hash_start_block: u64,
    pub root_hash: String,
    pub salt: String,
}

impl RootVerity {
    pub fn load(path: &Path) -> Result<Self, ParamsError> {
        let text = std::fs::read_to_string(path).map_err(|source| ParamsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ParamsError> {
        let mut fields = std::collections::BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| ParamsError::Syntax {
                path: path.to_owned(),
                line: i + 1,
                reason: "expected key=value".into(),
            })?;
            if fields
                .insert(k.trim().to_owned(), v.trim().to_owned())
                .is_some()
            {
                return Err(ParamsError::Syntax {
                    path: path.to_owned(),
                    line: i + 1,
                    reason: format!("duplicate key `{k}`"),
                });
            }
        }
        let get = |field: &'static str| {
            fields
                .get(field)
                .cloned()
                .ok_or_else(|| ParamsError::Field {
                    path: path.to_owned(),
                    field,
                    reason: "missing".into(),
                })
        };
        let num = |field: &'static str| -> Result<u64, ParamsError> {
            get(field)?.parse::<u64>().map_err(|e| ParamsError::Field {
                path: path.to_owned(),
                field,
                reason: e.to_string(),
            })
        };
        let block = |field: &'static str| -> Result<u32, ParamsError> {
            let v = num(field)?;
            if !(512..=65536).contains(&v) || !v.is_power_of_two() {
                return Err(ParamsError::Field {
                    path: path.to_owned(),
                    field,
                    reason: format!("{v} is not a power of two in 512..=65536"),
                });
            }
            Ok(u32::try_from(v).unwrap_or(4096))
        };
        let hexfield = |field: &'static str, exact: Option<usize>| -> Result<String, ParamsError> {
            let v = get(field)?;
            let ok_len = exact.map_or(v.len() <= 512, |n| v.len() == n);
            if !ok_len || !v.chars().all(|c| c.is_ascii_hexdigit()) || v.len() % 2 != 0 {
                return Err(ParamsError::Field {
                    path: path.to_owned(),
                    field,
                    reason: "not hex of the right length".into(),
                });
            }
            Ok(v.to_ascii_lowercase())
        };
        let algorithm = get("algorithm")?;
        if algorithm != "sha256" {
            return Err(ParamsError::Field {
                path: path.to_owned(),
                field: "algorithm",
                reason: format!("`{algorithm}` is not supported (sha256)"),
            });
        }
        let data_blocks = num("data_blocks")?;
        if data_blocks == 0 || data_blocks > (1 << 40) {
            return Err(ParamsError::Field {
                path: path.to_owned(),
                field: "data_blocks",
                reason: format!("{data_blocks} is out of range"),
            });
        }
        Ok(Self {
            data_blocks,
            data_block_size: block("data_block_size")?,
            hash_block_size: block("hash_block_size")?,
            hash_start_block: num("hash_start_block")?,
            root_hash: hexfield("root_hash", Some(64))?,
            salt: hexfield("salt", None)?,
        })
    }

    /// Size of the verified device in 512-byte sectors.
    pub fn data_sectors(&self) -> u64 {
        self.data_blocks * u64::from(self.data_block_size) / 512
    }

    /// The dm-verity target parameters for a root whose data and hash
    /// tree share one device (`major:minor`).
    pub fn table(&self, dev: &str) -> String {
        let salt = if self.salt.is_empty() {
            "-"
        } else {
            &self.salt
        };
        format!(
            "1 {dev} {dev} {} {} {} {} sha256 {} {salt}",
            self.data_block_size,
            self.hash_block_size,
            self.data_blocks,
            self.hash_start_block,
            self.root_hash
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "data_blocks=100\ndata_block_size=4096\nhash_block_size=4096\nhash_start_block=101\nalgorithm=sha256\nroot_hash=aa00000000000000000000000000000000000000000000000000000000000000\nsalt=0102\n";

    #[test]
    fn parses_and_builds_table() {
        let v = RootVerity::parse(Path::new("p"), GOOD).unwrap();
        assert_eq!(v.data_sectors(), 800);
        assert_eq!(
            v.table("254:3"),
            "1 254:3 254:3 4096 4096 100 101 sha256 aa00000000000000000000000000000000000000000000000000000000000000 0102"
        );
    }

    #[test]
    fn rejects_each_bad_field() {
        let cases = [
            ("data_blocks=100", "data_blocks=0", "data_blocks"),
            ("data_blocks=100", "data_blocks=x", "data_blocks"),
            (
                "data_block_size=4096",
                "data_block_size=1000",
                "data_block_size",
            ),
            ("algorithm=sha256", "algorithm=md5", "algorithm"),
            ("root_hash=aa", "root_hash=zz", "root_hash"),
            ("salt=0102", "salt=010", "salt"),
            ("hash_start_block=101\n", "", "hash_start_block"),
        ];
        for (from, to, field) in cases {
            let text = GOOD.replacen(from, to, 1);
            match RootVerity::parse(Path::new("p"), &text).unwrap_err() {
                ParamsError::Field { field: f, .. } => assert_eq!(f, field, "{to}"),
                e => panic!("{to}: {e:?}"),
            }
        }
        assert!(matches!(
            RootVerity::parse(Path::new("p"), "garbage").unwrap_err(),
            ParamsError::Syntax { .. }
        ));
        assert!(matches!(
            RootVerity::parse(Path::new("p"), &format!("{GOOD}salt=00\n")).unwrap_err(),
            ParamsError::Syntax { .. }
        ));
    }
}
