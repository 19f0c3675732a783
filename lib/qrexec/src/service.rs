//! Where a called service lives and what it is told
//! (`libqrexec/exec.c` `find_qrexec_service`, `exec_qubes_rpc2`;
//! `doc/execution.rst`):
//!
//! - each directory is tried for `name+arg` (`name+` without an argument),
//!   then each again for `name`; the first entry that exists wins;
//! - a socket (or a link to one) is a socket service: it gets the
//!   descriptor line first, then the caller's data, on one stream, and the
//!   call's exit code is 0;
//! - anything else must be an executable file: it runs with the argument
//!   as its first parameter and the call's facts in its environment.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// dom0's service directories (`QREXEC_SERVICE_PATH`); dom0's /etc is the
/// read-only image, so only it and the admin's /usr/local would count,
/// and the image has no /usr/local.
pub const DOM0_SERVICE_DIRS: [&str; 1] = ["/etc/qubes-rpc"];

/// A service found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Executable(PathBuf),
    Socket(PathBuf),
}

/// Looks `name` with `arg` (without its `+`) up in `dirs`.
pub fn find(dirs: &[&Path], name: &str, arg: &str) -> Option<Found> {
    let full = format!("{name}+{arg}");
    [full.as_str(), name].iter().find_map(|file| {
        dirs.iter().find_map(|d| {
            let p = d.join(file);
            // An entry that exists decides, even if it is no service (the
            // C code stops at the first `lstat` hit too).
            std::fs::symlink_metadata(&p).ok()?;
            let meta = std::fs::metadata(&p).ok()?;
            if meta.file_type().is_socket() {
                Some(Found::Socket(p))
            } else if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                Some(Found::Executable(p))
            } else {
                None
            }
        })
    })
}

/// What a call to dom0 names as its target (`TARGET_TYPE TARGET` of the
/// descriptor line): `name work`, or `keyword adminvm` for `@adminvm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedTarget {
    pub keyword: bool,
    /// Without the `@` of a keyword.
    pub text: String,
}

impl RequestedTarget {
    /// From the policy's `requested_target`.
    pub fn from_policy(requested: &str) -> RequestedTarget {
        match requested.strip_prefix('@') {
            Some(k) => RequestedTarget {
                keyword: true,
                text: k.to_owned(),
            },
            None => RequestedTarget {
                keyword: false,
                text: requested.to_owned(),
            },
        }
    }

    pub fn kind(&self) -> &'static str {
        if self.keyword {
            "keyword"
        } else {
            "name"
        }
    }
}

/// The line a socket service reads first: `svc+arg source` in a VM,
/// `svc+arg source name|keyword target` in dom0, NUL-terminated.
pub fn socket_header(descriptor: &str, source: &str, target: Option<&RequestedTarget>) -> Vec<u8> {
    let mut s = format!("{descriptor} {source}");
    if let Some(t) = target {
        s.push_str(&format!(" {} {}", t.kind(), t.text));
    }
    s.push('\0');
    s.into_bytes()
}

/// The environment an executable service gets (`exec_qubes_rpc2`).
pub fn environment(
    name: &str,
    arg: &str,
    source: &str,
    target: Option<&RequestedTarget>,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("QREXEC_REMOTE_DOMAIN", source.to_owned()),
        ("QREXEC_SERVICE_FULL_NAME", format!("{name}+{arg}")),
    ];
    if !arg.is_empty() {
        env.push(("QREXEC_SERVICE_ARGUMENT", arg.to_owned()));
    }
    if let Some(t) = target {
        env.push(("QREXEC_REQUESTED_TARGET_TYPE", t.kind().to_owned()));
        env.push(("QREXEC_REQUESTED_TARGET", t.text.clone()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_prefers_the_argument_then_the_name() {
        let d = tempfile::tempdir().unwrap();
        let exe = |p: &Path| {
            std::fs::write(p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        exe(&d.path().join("qubes.Echo"));
        exe(&d.path().join("qubes.Echo+loud"));
        std::fs::write(d.path().join("qubes.Plain"), "not executable").unwrap();
        let dirs = [d.path()];
        assert_eq!(
            find(&dirs, "qubes.Echo", "loud"),
            Some(Found::Executable(d.path().join("qubes.Echo+loud")))
        );
        assert_eq!(
            find(&dirs, "qubes.Echo", "soft"),
            Some(Found::Executable(d.path().join("qubes.Echo")))
        );
        assert_eq!(find(&dirs, "qubes.Plain", ""), None);
        assert_eq!(find(&dirs, "qubes.Missing", ""), None);
        let sock = d.path().join("admin.vm.List");
        let _l = std::os::unix::net::UnixListener::bind(d.path().join("real.sock")).unwrap();
        std::os::unix::fs::symlink(d.path().join("real.sock"), &sock).unwrap();
        assert_eq!(find(&dirs, "admin.vm.List", ""), Some(Found::Socket(sock)));
    }

    #[test]
    fn headers_are_qubes() {
        let t = RequestedTarget::from_policy("@adminvm");
        assert_eq!(
            socket_header("admin.vm.List+", "guivm", Some(&t)),
            b"admin.vm.List+ guivm keyword adminvm\0"
        );
        let n = RequestedTarget::from_policy("work");
        assert_eq!(
            socket_header("admin.vm.Start+", "guivm", Some(&n)),
            b"admin.vm.Start+ guivm name work\0"
        );
        assert_eq!(
            socket_header("qubes.Echo+", "work", None),
            b"qubes.Echo+ work\0"
        );
        let env = environment("qubes.Echo", "", "work", None);
        assert!(env.iter().all(|(k, _)| *k != "QREXEC_SERVICE_ARGUMENT"));
    }
}
