//! Per-service confinement, applied in the forked child just before exec:
//! own session, own cgroup, capability bounding set and sets, uid/gid,
//! no_new_privs.
//!
//! Everything the child needs is computed in the parent ([`Prepared`]), so
//! the child only makes raw syscalls: no allocation, no locks, nothing that
//! could deadlock after fork in a process that might have had other
//! threads. rustix's calls are thin syscall wrappers, fine to use there,
//! and they leave this module without any `unsafe` of its own.

#![forbid(unsafe_code)]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::sys::signal::SigSet;
use rustix::io::Errno;
use rustix::process::{Gid, Uid};
use rustix::thread::{CapabilitySet, CapabilitySets};

use crate::services::Hardening;

/// The root of qinit's cgroup subtree.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/qinit";

/// Confinement ready to apply in a child.
#[derive(Debug)]
pub struct Prepared {
    session: bool,
    controlling_tty: bool,
    cgroup_procs: Option<OwnedFd>,
    /// Capabilities kept; `None` keeps root's full set (nothing dropped).
    keep: Option<CapabilitySet>,
    /// The uid and gid to switch to; the gid defaults to the uid.
    ids: Option<(Uid, Gid)>,
    no_new_privs: bool,
}

/// The cgroup directory of a service.
pub fn cgroup_dir(service: &str) -> PathBuf {
    Path::new(CGROUP_ROOT).join(service)
}

/// Computes what the child will do; creates the service's cgroup.
pub fn prepare(service: &str, h: &Hardening, tty: bool) -> std::io::Result<Prepared> {
    let cgroup_procs = if h.cgroup {
        let dir = cgroup_dir(service);
        let ctx = |what: &str, e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("{what} {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(|e| ctx("creating cgroup", e))?;
        let procs = File::options()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map_err(|e| ctx("opening cgroup.procs of", e))?;
        Some(OwnedFd::from(procs))
    } else {
        None
    };
    Ok(Prepared {
        session: h.new_session || tty,
        controlling_tty: tty,
        cgroup_procs,
        keep: h.capabilities,
        ids: h
            .user
            .map(|uid| (Uid::from_raw(uid), Gid::from_raw(h.group.unwrap_or(uid)))),
        no_new_privs: h.no_new_privs,
    })
}

/// Each capability of `set` on its own, as the prctl calls take them.
/// Allocates nothing, so the child may call it.
fn each_capability(set: CapabilitySet) -> impl Iterator<Item = CapabilitySet> {
    (0..u64::BITS)
        .map(|bit| CapabilitySet::from_bits_retain(1 << bit))
        .filter(move |cap| set.contains(*cap))
}

impl Prepared {
    /// Applies the confinement to the calling process. Meant for the child
    /// between fork and exec (see [`crate::supervisor`]); it only makes
    /// async-signal-safe syscalls.
    ///
    /// rustix's uid, gid, groups and capability calls are the raw syscalls,
    /// which act on the calling thread only (libc's `setuid` signals every
    /// thread to do the same). The forked child has exactly one thread, so
    /// here the thread is the process.
    pub fn apply(&self) -> std::io::Result<()> {
        // qinit blocks the signals it reads through its signalfd, and a
        // child inherits the mask: without this a daemon would never see
        // SIGTERM. rustix has this only in its `runtime` module, as a call
        // its callers must prove sound, so this stays on nix
        // (pthread_sigmask on a set on the stack).
        SigSet::empty().thread_set_mask()?;
        if self.session {
            rustix::process::setsid()?;
        }
        if self.controlling_tty {
            // The tty was set up as stdin by the parent.
            rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
        }
        if let Some(fd) = &self.cgroup_procs {
            // "0" moves the writing process into the cgroup.
            rustix::io::write(fd, b"0")?;
        }
        if let Some(keep) = self.keep {
            // Every capability not kept leaves the bounding set, including
            // any newer than rustix's names: "keep only these" must hold on
            // a newer kernel too.
            for cap in each_capability(keep.complement()) {
                match rustix::thread::remove_capability_from_bounding_set(cap) {
                    // The kernel does not have this capability at all.
                    Ok(()) | Err(Errno::INVAL) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if let Some((uid, gid)) = self.ids {
            if self.keep.is_some() {
                // Keep the permitted set across the uid change, so the
                // capset below can still grant the kept capabilities.
                rustix::thread::set_keep_capabilities(true)?;
            }
            rustix::thread::set_thread_groups(&[])?;
            rustix::thread::set_thread_gid(gid)?;
            rustix::thread::set_thread_uid(uid)?;
        }
        if let Some(keep) = self.keep {
            rustix::thread::set_capabilities(
                None,
                CapabilitySets {
                    effective: keep,
                    permitted: keep,
                    inheritable: keep,
                },
            )?;
            if self.ids.is_some_and(|(uid, _)| !uid.is_root()) {
                // Only ambient capabilities survive exec for a non-root uid.
                for cap in each_capability(keep) {
                    rustix::thread::configure_capability_in_ambient_set(cap, true)?;
                }
            }
        }
        if self.no_new_privs {
            rustix::thread::set_no_new_privs(true)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_one_by_one() {
        let keep = CapabilitySet::NET_ADMIN | CapabilitySet::SYS_ADMIN | CapabilitySet::PERFMON;
        let each: Vec<_> = each_capability(keep).collect();
        assert_eq!(
            each,
            [
                CapabilitySet::NET_ADMIN,
                CapabilitySet::SYS_ADMIN,
                CapabilitySet::PERFMON
            ]
        );
        // What the bounding set loses: all 64 bits but the kept three.
        let dropped: Vec<_> = each_capability(keep.complement()).collect();
        assert_eq!(dropped.len(), 64 - 3);
        assert!(dropped.contains(&CapabilitySet::CHOWN));
        assert!(!dropped.contains(&CapabilitySet::NET_ADMIN));
    }

    #[test]
    fn user_without_group_uses_the_uid() {
        let h = Hardening {
            user: Some(65534),
            ..Hardening::default()
        };
        let p = prepare("t", &h, false).unwrap();
        assert_eq!(p.ids, Some((Uid::from_raw(65534), Gid::from_raw(65534))));
    }

    #[test]
    fn nothing_asked_nothing_done() {
        let p = prepare("t", &Hardening::default(), false).unwrap();
        assert!(p.keep.is_none() && p.ids.is_none() && p.cgroup_procs.is_none());
    }
}
