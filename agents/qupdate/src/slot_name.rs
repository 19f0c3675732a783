//! Slots in the JSON qupdate writes (the status, an install's result,
//! `state.json`): by name, through [`Slot`]'s own `Display` and `FromStr`,
//! so the contract crate's renderer and parser are the only ones.
//!
//! Use with `#[serde(with = "crate::slot_name")]` on a [`Slot`], or the
//! [`list`] and [`map`] submodules on a `Vec<Slot>` or a map keyed by slot.

use std::collections::BTreeMap;

use qcontract::Slot;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A slot that (de)serializes as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Name(Slot);

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map(Name).map_err(de::Error::custom)
    }
}

pub fn serialize<S: Serializer>(slot: &Slot, s: S) -> Result<S::Ok, S::Error> {
    Name(*slot).serialize(s)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Slot, D::Error> {
    Ok(Name::deserialize(d)?.0)
}

/// A list of slots (a boot order) as a list of names.
pub mod list {
    use super::*;

    pub fn serialize<S: Serializer>(slots: &[Slot], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(slots.iter().copied().map(Name))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Slot>, D::Error> {
        Ok(Vec::<Name>::deserialize(d)?
            .into_iter()
            .map(|n| n.0)
            .collect())
    }
}

/// A map keyed by slot as an object keyed by slot name.
pub mod map {
    use super::*;

    pub fn serialize<S: Serializer, V: Serialize>(
        m: &BTreeMap<Slot, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (Name(*k), v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, V: Deserialize<'de>>(
        d: D,
    ) -> Result<BTreeMap<Slot, V>, D::Error> {
        Ok(BTreeMap::<Name, V>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| (k.0, v))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Doc {
        #[serde(with = "super")]
        one: Slot,
        #[serde(with = "super::list")]
        order: Vec<Slot>,
        #[serde(with = "super::map")]
        by_slot: BTreeMap<Slot, u8>,
    }

    #[test]
    fn slots_are_their_names_and_nothing_else_parses() {
        let doc = Doc {
            one: Slot::B,
            order: vec![Slot::B, Slot::A],
            by_slot: BTreeMap::from([(Slot::B, 2), (Slot::A, 1)]),
        };
        let text = r#"{"one":"B","order":["B","A"],"by_slot":{"A":1,"B":2}}"#;
        assert_eq!(serde_json::to_string(&doc).unwrap(), text);
        assert_eq!(serde_json::from_str::<Doc>(text).unwrap(), doc);
        for bad in [
            r#"{"one":"C","order":[],"by_slot":{}}"#,
            r#"{"one":"A","order":["a"],"by_slot":{}}"#,
            r#"{"one":"A","order":[],"by_slot":{"":1}}"#,
            r#"{"one":0,"order":[],"by_slot":{}}"#,
        ] {
            assert!(serde_json::from_str::<Doc>(bad).is_err(), "{bad}");
        }
    }
}
