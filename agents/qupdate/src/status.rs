//! What `qupdate status` reports: per slot, what the boot loader will do
//! with it and what it holds. The JSON form (`status --json`, the
//! service's `Status` property) is a contract the end-to-end tests and
//! LAVA parse; [`SlotState::as_str`] is its one renderer of states.

use std::fmt;
use std::str::FromStr;

use qcontract::Slot;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// What a slot is good for, from the boot loader's record of it
/// (`X_OK`, `X_TRIES`) and the updater's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlotState {
    /// Booted to a healthy userspace and marked good: GRUB boots it
    /// whenever it is first in the order, and rollback may pick it.
    Good,
    /// Installed and on trial: GRUB boots it while it has tries left.
    Bootable,
    /// Installed, but out of tries without having been marked good.
    Bad,
    /// Neither bootable nor holding anything the updater installed (never
    /// written, or invalidated by an apply that did not finish).
    Empty,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a slot state (good, bootable, bad or empty)")]
pub struct SlotStateError(pub String);

impl SlotState {
    pub const ALL: [SlotState; 4] = [Self::Good, Self::Bootable, Self::Bad, Self::Empty];

    /// The state of a slot whose boot-loader record is `boot`; `installed`
    /// says whether the updater knows what the slot holds.
    pub fn classify(boot: grubenv::SlotState, installed: bool) -> Self {
        if boot.ok {
            Self::Good
        } else if boot.tries > 0 {
            Self::Bootable
        } else if installed {
            Self::Bad
        } else {
            Self::Empty
        }
    }

    /// The name in `status` output, text and JSON alike.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::Bootable => "bootable",
            Self::Bad => "bad",
            Self::Empty => "empty",
        }
    }
}

impl fmt::Display for SlotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SlotState {
    type Err = SlotStateError;

    fn from_str(s: &str) -> Result<Self, SlotStateError> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| SlotStateError(s.to_owned()))
    }
}

impl Serialize for SlotState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SlotState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// One slot in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: Slot,
    pub state: SlotState,
    /// Tries left; meaningful for a [`SlotState::Bootable`] slot.
    pub tries: u8,
    pub version: Option<String>,
    pub security_epoch: Option<u64>,
    pub root_hash: Option<String>,
}

/// The whole status: the boot order, the floor, both slots, the last error.
/// The field order is the JSON's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub booted: Slot,
    /// Preferred first, as GRUB's `SLOT_ORDER`.
    pub order: Vec<Slot>,
    pub floor: u64,
    /// Indexed by [`Slot::index`] (A then B); see [`Status::slot`].
    #[serde(deserialize_with = "slots_in_order")]
    pub slots: [SlotStatus; 2],
    pub last_error: Option<String>,
}

impl Status {
    pub fn slot(&self, slot: Slot) -> &SlotStatus {
        &self.slots[slot.index()]
    }
}

/// The slots of a status read from the service, held to the order
/// [`Status::slot`] relies on.
fn slots_in_order<'de, D: Deserializer<'de>>(d: D) -> Result<[SlotStatus; 2], D::Error> {
    let slots = <[SlotStatus; 2]>::deserialize(d)?;
    for (s, expected) in slots.iter().zip(Slot::ALL) {
        if s.slot != expected {
            return Err(de::Error::custom(format_args!(
                "slot {} where slot {expected} belongs",
                s.slot
            )));
        }
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `qupdate status --json` as the end-to-end tests and LAVA read it:
    /// these bytes are the contract, whatever the types behind them.
    const STATUS_JSON: &str = r#"{
  "booted": "B",
  "order": [
    "B",
    "A"
  ],
  "floor": 1,
  "slots": [
    {
      "slot": "A",
      "state": "good",
      "tries": 0,
      "version": "0.1.0",
      "security_epoch": 1,
      "root_hash": null
    },
    {
      "slot": "B",
      "state": "bootable",
      "tries": 2,
      "version": "0.2.0",
      "security_epoch": 5,
      "root_hash": "ab"
    }
  ],
  "last_error": null
}"#;

    /// The same status as the service's `Status` property carries it.
    const STATUS_COMPACT: &str = r#"{"booted":"B","order":["B","A"],"floor":1,"slots":[{"slot":"A","state":"good","tries":0,"version":"0.1.0","security_epoch":1,"root_hash":null},{"slot":"B","state":"bootable","tries":2,"version":"0.2.0","security_epoch":5,"root_hash":"ab"}],"last_error":null}"#;

    fn status() -> Status {
        Status {
            booted: Slot::B,
            order: vec![Slot::B, Slot::A],
            floor: 1,
            slots: [
                SlotStatus {
                    slot: Slot::A,
                    state: SlotState::Good,
                    tries: 0,
                    version: Some("0.1.0".into()),
                    security_epoch: Some(1),
                    root_hash: None,
                },
                SlotStatus {
                    slot: Slot::B,
                    state: SlotState::Bootable,
                    tries: 2,
                    version: Some("0.2.0".into()),
                    security_epoch: Some(5),
                    root_hash: Some("ab".into()),
                },
            ],
            last_error: None,
        }
    }

    #[test]
    fn status_json_is_byte_for_byte_the_contract() {
        assert_eq!(
            serde_json::to_string_pretty(&status()).unwrap(),
            STATUS_JSON
        );
        assert_eq!(serde_json::to_string(&status()).unwrap(), STATUS_COMPACT);
        for text in [STATUS_JSON, STATUS_COMPACT] {
            let back: Status = serde_json::from_str(text).unwrap();
            assert_eq!(back, status());
        }
        assert_eq!(status().slot(Slot::B).state, SlotState::Bootable);
    }

    #[test]
    fn a_status_with_its_slots_out_of_order_is_refused() {
        let swapped = STATUS_COMPACT
            .replace(r#""slot":"A""#, r#""slot":"X""#)
            .replace(r#""slot":"B""#, r#""slot":"A""#)
            .replace(r#""slot":"X""#, r#""slot":"B""#);
        let err = serde_json::from_str::<Status>(&swapped).unwrap_err();
        assert!(
            err.to_string().contains("slot B where slot A belongs"),
            "{err}"
        );
    }

    #[test]
    fn each_state_renders_to_its_name_and_back() {
        let names = ["good", "bootable", "bad", "empty"];
        for (state, name) in SlotState::ALL.into_iter().zip(names) {
            assert_eq!(state.as_str(), name);
            assert_eq!(state.to_string(), name);
            assert_eq!(name.parse(), Ok(state));
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<SlotState>(&json).unwrap(), state);
        }
        for bad in ["Good", "", "ok"] {
            assert_eq!(bad.parse::<SlotState>(), Err(SlotStateError(bad.into())));
        }
    }

    #[test]
    fn the_state_follows_the_boot_record_then_the_install() {
        use grubenv::SlotState as Record;
        let cases = [
            (Record { ok: true, tries: 0 }, false, SlotState::Good),
            (Record { ok: true, tries: 0 }, true, SlotState::Good),
            // A good slot's tries are 0 after mark-good; a stray count
            // does not make it a trial.
            (Record { ok: true, tries: 2 }, true, SlotState::Good),
            (
                Record {
                    ok: false,
                    tries: 3,
                },
                true,
                SlotState::Bootable,
            ),
            (
                Record {
                    ok: false,
                    tries: 1,
                },
                false,
                SlotState::Bootable,
            ),
            (
                Record {
                    ok: false,
                    tries: 0,
                },
                true,
                SlotState::Bad,
            ),
            (
                Record {
                    ok: false,
                    tries: 0,
                },
                false,
                SlotState::Empty,
            ),
        ];
        for (record, installed, expected) in cases {
            assert_eq!(
                SlotState::classify(record, installed),
                expected,
                "{record:?}, installed {installed}"
            );
        }
    }
}
