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

use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc;
use std::time::Duration;

use qxenstore::{Xs, XsError};

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

/// The reads qdomd makes, so the logic runs against a fake store in tests.
pub trait Store {
    fn directory(&mut self, path: &str) -> Result<Vec<String>, XsError>;
    /// `None` if the node does not exist.
    fn read(&mut self, path: &str) -> Result<Option<Vec<u8>>, XsError>;
}

impl Store for Xs {
    fn directory(&mut self, path: &str) -> Result<Vec<String>, XsError> {
        Xs::directory(self, path)
    }

    fn read(&mut self, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        self.try_read(path)
    }
}

/// Reads `/local/domain` and each domain's `name`. Dom0 is left out, and so
/// is a domain that vanishes between the two reads (the release watch
/// brings the next snapshot).
pub fn snapshot(xs: &mut impl Store) -> Result<Snapshot, XsError> {
    let mut out = Snapshot::new();
    for entry in xs.directory("/local/domain")? {
        let Ok(domid) = entry.parse::<u32>() else {
            continue;
        };
        if domid == 0 {
            continue;
        }
        // libxl writes the name and the guest cannot; a name that is not
        // text is no domain of ours.
        if let Some(name) = xs.read(&format!("/local/domain/{domid}/name"))? {
            match String::from_utf8(name) {
                Ok(n) => {
                    out.insert(domid, n);
                }
                Err(_) => log::warn!("domain {domid}: its name is not UTF-8; ignoring it"),
            }
        }
    }
    Ok(out)
}

/// Whether the readiness key holds a value. The guest writes it, so it is
/// taken as bytes: any non-blank value means ready.
pub fn is_ready(xs: &mut impl Store, domid: u32) -> Result<bool, XsError> {
    Ok(xs
        .read(&ready_path(domid))?
        .is_some_and(|v| v.iter().any(|b| !b.is_ascii_whitespace())))
}

/// What the daemon asks of the watcher.
#[derive(Debug)]
pub enum WatchCmd {
    /// Tell when `domid` writes its readiness key.
    Ready(u32),
    /// `domid` is gone: drop its watch.
    Forget(u32),
}

/// What the watcher reports.
#[derive(Debug)]
pub enum News {
    /// The domain list after a domain watch fired.
    Domains(Snapshot),
    Event(Event),
    /// The connection to xenstore broke; the watcher has stopped.
    Failed(String),
}

const DOMAINS_TOKEN: &str = "domains";
/// How often the watcher looks at its commands while no event comes.
const TICK: Duration = Duration::from_millis(200);

fn ready_token(domid: u32) -> String {
    format!("ready-{domid}")
}

/// Runs the watches on a thread of their own, over one blocking xenstore
/// connection: the domain watches (`@introduceDomain`, `@releaseDomain`;
/// they fire once at once, which brings the first snapshot) and one
/// readiness watch per starting domain.
pub fn spawn_watcher(
    mut xs: Xs,
    news: tokio::sync::mpsc::UnboundedSender<News>,
) -> Result<mpsc::Sender<WatchCmd>, XsError> {
    xs.watch(INTRODUCE_DOMAIN, DOMAINS_TOKEN)?;
    xs.watch(RELEASE_DOMAIN, DOMAINS_TOKEN)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Err(e) = watch_loop(&mut xs, &rx, &news) {
            let _ = news.send(News::Failed(qcontract::error_chain(&e)));
        }
    });
    Ok(tx)
}

fn watch_loop(
    xs: &mut Xs,
    cmds: &mpsc::Receiver<WatchCmd>,
    news: &tokio::sync::mpsc::UnboundedSender<News>,
) -> Result<(), XsError> {
    let mut watching: HashSet<u32> = HashSet::new();
    loop {
        loop {
            match cmds.try_recv() {
                Ok(WatchCmd::Ready(domid)) => {
                    if watching.insert(domid) {
                        // Fires once at once, so a key written before the
                        // watch was set is seen too.
                        xs.watch(&ready_path(domid), &ready_token(domid))?;
                    }
                }
                Ok(WatchCmd::Forget(domid)) => {
                    if watching.remove(&domid) {
                        xs.unwatch(&ready_path(domid), &ready_token(domid))?;
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                // The daemon is gone.
                Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
            }
        }
        let Some(ev) = xs.next_event(TICK)? else {
            continue;
        };
        if ev.token == DOMAINS_TOKEN {
            if news.send(News::Domains(snapshot(xs)?)).is_err() {
                return Ok(());
            }
            continue;
        }
        let Some(domid) = ev
            .token
            .strip_prefix("ready-")
            .and_then(|d| d.parse::<u32>().ok())
        else {
            continue;
        };
        let ready = match is_ready(xs, domid) {
            Ok(r) => r,
            // What a guest does to its own key (or xenstored's refusal to
            // show it) concerns that guest only.
            Err(e @ (XsError::Daemon { .. } | XsError::NotUtf8 { .. })) => {
                log::warn!("domain {domid}: reading its readiness key: {e}");
                false
            }
            Err(e) => return Err(e),
        };
        if watching.contains(&domid) && ready {
            watching.remove(&domid);
            xs.unwatch(&ready_path(domid), &ready_token(domid))?;
            if news.send(News::Event(Event::ReadyKey { domid })).is_err() {
                return Ok(());
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One node, as a guest may have written it.
    struct OneKey(Option<Vec<u8>>);

    impl Store for OneKey {
        fn directory(&mut self, _: &str) -> Result<Vec<String>, XsError> {
            Ok(Vec::new())
        }
        fn read(&mut self, _: &str) -> Result<Option<Vec<u8>>, XsError> {
            Ok(self.0.clone())
        }
    }

    /// The guest owns its readiness key: whatever bytes it writes are an
    /// answer, never an error that could stop the watcher.
    #[test]
    fn any_non_blank_bytes_are_ready() {
        for (value, ready) in [
            (None, false),
            (Some(b"".to_vec()), false),
            (Some(b" \n".to_vec()), false),
            (Some(b"qguest 0.1.0".to_vec()), true),
            (Some(vec![0xff, 0xfe]), true),
        ] {
            assert_eq!(
                is_ready(&mut OneKey(value.clone()), 3).unwrap(),
                ready,
                "{value:?}"
            );
        }
    }
}
