//! Per-service confinement, applied in the forked child just before exec:
//! own session, own cgroup, capability bounding set and sets, uid/gid,
//! no_new_privs.
//!
//! Everything the child needs is computed in the parent ([`Prepared`]), so
//! the child only makes raw syscalls: no allocation, no locks, nothing that
//! is unsafe after fork in a process that might have had other threads.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::services::{Hardening, CAP_LAST};

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The root of qinit's cgroup subtree.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/qinit";

/// Confinement ready to apply in a child.
#[derive(Debug)]
pub struct Prepared {
    session: bool,
    controlling_tty: bool,
    cgroup_procs: Option<OwnedFd>,
    drop_bounding: Vec<u32>,
    keep_mask: Option<[u32; 2]>,
    keep_caps: Vec<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
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
    let (drop_bounding, keep_mask) = match &h.capabilities {
        None => (Vec::new(), None),
        Some(keep) => {
            let drop = (0..=CAP_LAST).filter(|c| !keep.contains(c)).collect();
            let mut mask = [0u32; 2];
            for c in keep {
                let idx = usize::try_from(c / 32).unwrap_or(0).min(1);
                mask[idx] |= 1 << (c % 32);
            }
            (drop, Some(mask))
        }
    };
    Ok(Prepared {
        session: h.new_session || tty,
        controlling_tty: tty,
        cgroup_procs,
        drop_bounding,
        keep_mask,
        keep_caps: h.capabilities.clone().unwrap_or_default(),
        uid: h.user,
        gid: h.group.or(h.user),
        no_new_privs: h.no_new_privs,
    })
}

fn check(rc: libc::c_long) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Prepared {
    /// Applies the confinement to the calling process. Meant for the child
    /// between fork and exec (see [`crate::supervisor`]); it only makes
    /// async-signal-safe syscalls.
    pub fn apply(&self) -> std::io::Result<()> {
        // SAFETY (for every block below): plain syscalls on integer
        // arguments or on pointers to locals that outlive the call; none
        // allocates or takes a lock.
        //
        // qinit blocks the signals it reads through its signalfd, and a
        // child inherits the mask: without this a daemon would never see
        // SIGTERM.
        let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: see above; sigemptyset initialises the set.
        check(unsafe { libc::sigemptyset(empty.as_mut_ptr()) }.into())?;
        // SAFETY: see above; the set was initialised just before.
        let rc = unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        if self.session {
            // SAFETY: see above.
            check(unsafe { libc::setsid() }.into())?;
        }
        if self.controlling_tty {
            // SAFETY: see above; fd 0 is the tty set up as stdin.
            check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) }.into())?;
        }
        if let Some(fd) = &self.cgroup_procs {
            // "0" moves the writing process into the cgroup.
            // SAFETY: see above; the buffer is a static byte string.
            let n = unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            check(n as libc::c_long)?;
        }
        for &cap in &self.drop_bounding {
            // SAFETY: see above.
            let rc =
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
            // A capability newer than the running kernel is already absent.
            if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                return Err(std::io::Error::last_os_error());
            }
        }
        if let Some(uid) = self.uid {
            if self.keep_mask.is_some() {
                // SAFETY: see above.
                check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) }.into())?;
            }
            let gid = self.gid.unwrap_or(uid);
            // SAFETY: see above; a zero-length group list needs no pointer.
            check(unsafe { libc::setgroups(0, std::ptr::null()) }.into())?;
            // SAFETY: see above.
            check(unsafe { libc::setgid(gid) }.into())?;
            // SAFETY: see above.
            check(unsafe { libc::setuid(uid) }.into())?;
        }
        if let Some(mask) = self.keep_mask {
            let mut header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let data = [
                CapData {
                    effective: mask[0],
                    permitted: mask[0],
                    inheritable: mask[0],
                },
                CapData {
                    effective: mask[1],
                    permitted: mask[1],
                    inheritable: mask[1],
                },
            ];
            // SAFETY: see above; header and data are locals with the
            // layout capset(2) documents for version 3 (two data words).
            check(unsafe {
                libc::syscall(
                    libc::SYS_capset,
                    &mut header as *mut CapHeader,
                    data.as_ptr(),
                )
            })?;
            if self.uid.is_some_and(|u| u != 0) {
                for &cap in &self.keep_caps {
                    // Ambient capabilities survive exec for a non-root uid.
                    let raise = libc::c_ulong::try_from(libc::PR_CAP_AMBIENT_RAISE).unwrap_or(2);
                    // SAFETY: see above.
                    let rc = unsafe {
                        libc::prctl(libc::PR_CAP_AMBIENT, raise, libc::c_ulong::from(cap), 0, 0)
                    };
                    check(rc.into())?;
                }
            }
        }
        if self.no_new_privs {
            // SAFETY: see above.
            check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_masks() {
        let h = Hardening {
            capabilities: Some(vec![12, 21, 38]),
            ..Hardening::default()
        };
        let p = prepare("t", &h, false).unwrap();
        assert_eq!(p.keep_mask, Some([(1 << 12) | (1 << 21), 1 << 6]));
        assert!(!p.drop_bounding.contains(&12));
        assert!(p.drop_bounding.contains(&0));
        assert_eq!(
            p.drop_bounding.len(),
            usize::try_from(CAP_LAST + 1 - 3).unwrap()
        );
    }

    #[test]
    fn nothing_asked_nothing_done() {
        let p = prepare("t", &Hardening::default(), false).unwrap();
        assert!(p.drop_bounding.is_empty() && p.keep_mask.is_none() && p.cgroup_procs.is_none());
    }
}
