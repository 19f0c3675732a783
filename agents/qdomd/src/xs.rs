//! What qdomd reads from xenstore, and how watch firings become
//! [`Event`]s. The daemon watches `@introduceDomain` and `@releaseDomain`
//! (Xen fires them when any domain is created or destroyed) and each
//! guest's readiness key; on a domain watch it reads the domain list again
//! and [`Tracker`] turns the difference into `Appeared` and `Gone`.
//!
//! The readiness handshake (a contract with the guests): a guest that is up
//! writes a non-empty value to `data/ready` under its own xenstore
//! directory, `/local/domain/<domid>/data/ready`. The `data` directory is
//! the one libxl makes writable by the guest itself.

use std::collections::BTreeMap;
use std::io;

use xenstore_rs::AsyncXs;

use crate::lifecycle::Event;

pub const INTRODUCE_DOMAIN: &str = "@introduceDomain";
pub const RELEASE_DOMAIN: &str = "@releaseDomain";
/// Relative to the guest's own directory, as the guest writes it.
pub const READY_KEY: &str = "data/ready";

pub fn ready_path(domid: u32) -> String {
    format!("/local/domain/{domid}/{READY_KEY}")
}

/// The domain list: domid → name.
pub type Snapshot = BTreeMap<u32, String>;

/// Reads `/local/domain` and each domain's `name`. Dom0 is left out, and so
/// is a domain that vanishes between the two reads (the release watch
/// brings the next snapshot).
pub async fn snapshot<X: AsyncXs>(xs: &X) -> io::Result<Snapshot> {
    let mut out = Snapshot::new();
    for entry in xs.directory("/local/domain").await? {
        let Ok(domid) = entry.parse::<u32>() else {
            continue;
        };
        if domid == 0 {
            continue;
        }
        match xs.read(&format!("/local/domain/{domid}/name")).await {
            Ok(name) => {
                out.insert(domid, name.into_string());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Whether the readiness key holds a value.
pub async fn is_ready<X: AsyncXs>(xs: &X, domid: u32) -> io::Result<bool> {
    match xs.read(&ready_path(domid)).await {
        Ok(v) => Ok(!v.trim().is_empty()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Remembers the last domain list.
#[derive(Debug, Default)]
pub struct Tracker {
    known: Snapshot,
}

impl Tracker {
    /// Events for what changed since the last snapshot: new domids (a
    /// restarted domain comes back under a new one) and vanished ones.
    pub fn update(&mut self, now: Snapshot) -> Vec<Event> {
        let mut events = Vec::new();
        for domid in self.known.keys() {
            if !now.contains_key(domid) {
                events.push(Event::Gone { domid: *domid });
            }
        }
        for (domid, name) in &now {
            if self.known.get(domid) != Some(name) {
                events.push(Event::Appeared {
                    name: name.clone(),
                    domid: *domid,
                });
            }
        }
        self.known = now;
        events
    }
}
