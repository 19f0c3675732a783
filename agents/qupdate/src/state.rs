//! The updater's own persistent state on the data partition: what each
//! slot holds, the anti-rollback floor and the last error. Written
//! atomically (temporary file, fsync, rename, fsync of the directory), so
//! a power cut leaves either the old or the new state, never a torn one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use qcontract::Slot;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed")]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What is installed in one slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    pub version: String,
    pub security_epoch: u64,
    pub build_id: String,
    pub root_hash: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Bundles with a lower security epoch are refused.
    pub floor: u64,
    /// What the updater installed, or found booted, in each slot; a slot
    /// being overwritten has no entry. Keyed by slot name in the file.
    pub slots: BTreeMap<Slot, SlotInfo>,
    pub last_error: Option<String>,
}

impl State {
    /// Loads the state; a missing file is a fresh state.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_owned(),
                    op: "read",
                    source,
                })
            }
        };
        serde_json::from_str(&text).map_err(|source| StateError::Malformed {
            path: path.to_owned(),
            source,
        })
    }

    pub fn store(&self, path: &Path) -> Result<(), StateError> {
        self.store_journaled(path, None)
    }

    /// [`State::store`], with the rename and the directory sync recorded
    /// in `journal` (see [`crate::disk::DiskOp`]).
    pub fn store_journaled(
        &self,
        path: &Path,
        journal: Option<&crate::disk::Journal>,
    ) -> Result<(), StateError> {
        let io = |op| {
            let path = path.to_owned();
            move |source| StateError::Io { path, op, source }
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io("create directory"))?;
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let text = serde_json::to_string_pretty(self)
            .expect("a State is strings, numbers and maps keyed by slot name: always JSON");
        {
            let mut f = std::fs::File::create(&tmp).map_err(io("create temporary"))?;
            f.write_all(text.as_bytes()).map_err(io("write"))?;
            f.sync_all().map_err(io("fsync"))?;
        }
        std::fs::rename(&tmp, path).map_err(io("rename"))?;
        crate::disk::record(
            journal,
            crate::disk::DiskOp::StateReplaced(text.clone().into_bytes()),
        );
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync directory"))?;
        crate::disk::record(journal, crate::disk::DiskOp::StateDurable);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/state.json");
        assert_eq!(State::load(&p).unwrap(), State::default());
        let mut s = State {
            floor: 3,
            ..State::default()
        };
        s.slots.insert(
            Slot::B,
            SlotInfo {
                version: "1".into(),
                security_epoch: 3,
                build_id: "x".into(),
                root_hash: "ab".into(),
            },
        );
        s.store(&p).unwrap();
        assert_eq!(State::load(&p).unwrap(), s);
        std::fs::write(&p, "{").unwrap();
        assert!(matches!(
            State::load(&p).unwrap_err(),
            StateError::Malformed { .. }
        ));
    }

    /// `/var/lib/qupdate/state.json` as every qupdate so far wrote it.
    const STATE_JSON: &str = r#"{
  "floor": 3,
  "slots": {
    "A": {
      "version": "0.1.0",
      "security_epoch": 1,
      "build_id": "",
      "root_hash": ""
    },
    "B": {
      "version": "0.2.0",
      "security_epoch": 3,
      "build_id": "b2",
      "root_hash": "ab"
    }
  },
  "last_error": "bundle rejected: truncated"
}"#;

    #[test]
    fn the_file_format_is_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        std::fs::write(&p, STATE_JSON).unwrap();
        let s = State::load(&p).unwrap();
        assert_eq!(s.floor, 3);
        assert_eq!(s.slots.len(), 2);
        s.store(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), STATE_JSON);
    }
}
