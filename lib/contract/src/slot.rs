//! The two A/B slots and every name a slot goes by: in the partition
//! table, in the GRUB environment and on the kernel command line.

use std::fmt;
use std::str::FromStr;

/// One of the two A/B slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    A,
    B,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a slot (A or B)")]
pub struct SlotError {
    pub value: String,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// 0 for A, 1 for B: the index into per-slot arrays.
    pub fn index(self) -> usize {
        match self {
            Slot::A => 0,
            Slot::B => 1,
        }
    }

    /// Name of the `<X>_OK` variable in the GRUB environment.
    pub fn ok_var(self) -> &'static str {
        match self {
            Slot::A => "A_OK",
            Slot::B => "B_OK",
        }
    }

    /// Name of the `<X>_TRIES` variable in the GRUB environment.
    pub fn tries_var(self) -> &'static str {
        match self {
            Slot::A => "A_TRIES",
            Slot::B => "B_TRIES",
        }
    }

    /// GPT partition number of the slot's boot partition on the fixed
    /// layout ([`crate::Partition::LAYOUT`]); the GRUB script exports it as
    /// `slot_part`.
    pub fn boot_partition(self) -> u32 {
        crate::Partition::Boot(self).number()
    }

    /// GPT partition number of the slot's root partition.
    pub fn root_partition(self) -> u32 {
        crate::Partition::Root(self).number()
    }

    /// GPT partition name of the slot's boot partition.
    pub fn boot_name(self) -> &'static str {
        crate::Partition::Boot(self).name()
    }

    /// GPT partition name of the slot's root partition.
    pub fn root_name(self) -> &'static str {
        crate::Partition::Root(self).name()
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

impl FromStr for Slot {
    type Err = SlotError;

    fn from_str(s: &str) -> Result<Slot, SlotError> {
        match s {
            "A" => Ok(Slot::A),
            "B" => Ok(Slot::B),
            _ => Err(SlotError {
                value: s.to_owned(),
            }),
        }
    }
}

/// A slot is its name in a document too (qupdate's status and state
/// file): the renderer and parser above, and nothing else parses.
#[cfg(feature = "serde")]
impl serde::Serialize for Slot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Slot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_renders_and_parses_back() {
        for s in Slot::ALL {
            assert_eq!(s.to_string().parse::<Slot>(), Ok(s));
            assert_eq!(s.other().other(), s);
            assert_eq!(Slot::ALL[s.index()], s);
        }
        assert!("a".parse::<Slot>().is_err());
        assert!("".parse::<Slot>().is_err());
    }

    #[cfg(feature = "serde")]
    #[test]
    fn slots_are_their_names_in_json_and_nothing_else_parses() {
        use std::collections::BTreeMap;
        let order = vec![Slot::B, Slot::A];
        let by_slot = BTreeMap::from([(Slot::B, 2), (Slot::A, 1)]);
        assert_eq!(serde_json::to_string(&order).unwrap(), r#"["B","A"]"#);
        assert_eq!(serde_json::to_string(&by_slot).unwrap(), r#"{"A":1,"B":2}"#);
        assert_eq!(
            serde_json::from_str::<Vec<Slot>>(r#"["B","A"]"#).unwrap(),
            order
        );
        assert_eq!(
            serde_json::from_str::<BTreeMap<Slot, u8>>(r#"{"A":1,"B":2}"#).unwrap(),
            by_slot
        );
        for bad in [r#""C""#, r#""a""#, r#""""#, "0"] {
            assert!(serde_json::from_str::<Slot>(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<BTreeMap<Slot, u8>>(r#"{"":1}"#).is_err());
    }

    #[test]
    fn names_follow_the_layout() {
        assert_eq!(Slot::A.boot_name(), "boot_a");
        assert_eq!(Slot::B.root_name(), "root_b");
        assert_eq!(Slot::A.boot_partition(), 2);
        assert_eq!(Slot::B.root_partition(), 5);
        assert_eq!(Slot::B.ok_var(), "B_OK");
    }
}
