//! Mount tables as data; each mount is idempotent so a restarted stage or
//! a test that runs twice does not stack mounts.

use std::path::{Path, PathBuf};

use rustix::mount::{mount, MountFlags};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount {fstype} {source_dev} on {target}")]
    Mount {
        fstype: String,
        source_dev: String,
        target: PathBuf,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("create mount point {path}")]
    MkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct MountSpec {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MountFlags,
    pub data: &'static str,
}

/// True if `target` is already a mount point (its device differs from its
/// parent's, or it is listed in /proc/self/mountinfo).
pub fn is_mounted(target: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let t = target.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| mp == t)
}

pub fn mount_one(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> Result<(), MountError> {
    std::fs::create_dir_all(target).map_err(|e| MountError::MkDir {
        path: target.to_owned(),
        source: e,
    })?;
    if is_mounted(target) {
        return Ok(());
    }
    let data_c = std::ffi::CString::new(data).map_err(|_| MountError::Mount {
        fstype: fstype.to_owned(),
        source_dev: source.to_owned(),
        target: target.to_owned(),
        source: rustix::io::Errno::INVAL,
    })?;
    let data_opt = (!data.is_empty()).then_some(data_c.as_c_str());
    mount(source, target, fstype, flags, data_opt).map_err(|e| MountError::Mount {
        fstype: fstype.to_owned(),
        source_dev: source.to_owned(),
        target: target.to_owned(),
        source: e,
    })
}

pub fn mount_all(specs: &[MountSpec]) -> Result<(), MountError> {
    for s in specs {
        mount_one(s.source, Path::new(s.target), s.fstype, s.flags, s.data)?;
    }
    Ok(())
}

/// The kernel filesystems every stage needs.
pub fn early_specs() -> [MountSpec; 3] {
    let nosuid = MountFlags::NOSUID | MountFlags::NOEXEC | MountFlags::NODEV;
    [
        MountSpec {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MountFlags::NOSUID,
            data: "mode=0755",
        },
        MountSpec {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nosuid,
            data: "",
        },
        MountSpec {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nosuid,
            data: "",
        },
    ]
}
