//! How many connections a uid may hold open. Root's are not counted (the
//! agents); every other uid may hold [`MAX_PER_UID`], as dbus-daemon's
//! `max_connections_per_user` bounds them, so a local process cannot use
//! up the bus's file descriptors. A connection's [`Slot`] is given back
//! when busd drops the connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::socket::Peer;

/// Connections one non-root uid may hold at once.
pub const MAX_PER_UID: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct Limits {
    open: Arc<Mutex<HashMap<u32, usize>>>,
}

/// Why a connection was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("reading the client's credentials")]
    Credentials(#[source] std::io::Error),
    #[error("uid {uid} (pid {pid}) already holds {MAX_PER_UID} connections")]
    TooMany { uid: u32, pid: i32 },
}

/// One admitted connection.
#[derive(Debug)]
pub struct Slot {
    uid: u32,
    pid: i32,
    /// `None` for root, which is not counted.
    open: Option<Arc<Mutex<HashMap<u32, usize>>>>,
}

impl Limits {
    /// Takes a place for the client at the other end of `stream`, by the
    /// uid the kernel says it has.
    pub fn admit(&self, stream: &impl std::os::fd::AsFd) -> Result<Slot, Refused> {
        let cred = rustix::net::sockopt::socket_peercred(stream)
            .map_err(|e| Refused::Credentials(e.into()))?;
        self.admit_uid(cred.uid.as_raw(), cred.pid.as_raw_nonzero().get())
    }

    fn admit_uid(&self, uid: u32, pid: i32) -> Result<Slot, Refused> {
        if uid == qcontract::accounts::ROOT.uid {
            return Ok(Slot {
                uid,
                pid,
                open: None,
            });
        }
        // A poisoned count is still a count: the guard below only adds
        // and subtracts.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(uid).or_default();
        if *n >= MAX_PER_UID {
            return Err(Refused::TooMany { uid, pid });
        }
        *n += 1;
        Ok(Slot {
            uid,
            pid,
            open: Some(self.open.clone()),
        })
    }

    #[cfg(test)]
    fn held(&self, uid: u32) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&uid)
            .copied()
            .unwrap_or(0)
    }
}

impl Slot {
    /// The client as busd numbers it.
    pub fn peer(&self, id: usize) -> Peer {
        Peer {
            id,
            uid: self.uid,
            pid: self.pid,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = open.get_mut(&self.uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.uid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_holds_at_most_its_share_and_gets_it_back() {
        let limits = Limits::default();
        let mut held: Vec<Slot> = (0..MAX_PER_UID)
            .map(|_| limits.admit_uid(65534, 7).unwrap())
            .collect();
        let e = limits.admit_uid(65534, 7).unwrap_err();
        assert_eq!(
            e.to_string(),
            "uid 65534 (pid 7) already holds 64 connections"
        );
        // Another uid, and root, are not held back by it.
        let other = limits.admit_uid(101, 8).unwrap();
        let roots: Vec<Slot> = (0..2 * MAX_PER_UID)
            .map(|_| limits.admit_uid(0, 1).unwrap())
            .collect();
        held.pop();
        assert_eq!(limits.held(65534), MAX_PER_UID - 1);
        limits.admit_uid(65534, 7).unwrap();
        drop((held, other, roots));
        assert_eq!(limits.held(65534), 0);
        assert_eq!(limits.held(101), 0);
    }
}
