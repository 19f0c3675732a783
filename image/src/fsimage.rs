//! Filesystem images made with the build host's own tools, without root,
//! mounts or loop devices: squashfs for the root, FAT for the ESP and the
//! boot partitions (GRUB reads them), ext4 for the data partition.
//!
//! Every tool is told the build's fixed time and identifiers so two builds
//! of the same inputs give the same bytes.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum FsImageError {
    #[error("{tool} is missing on the build host (Debian package {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{image}: contents ({used} bytes) do not fit in {capacity} bytes")]
    TooBig {
        image: PathBuf,
        used: u64,
        capacity: u64,
    },
}

fn run(tool: &'static str, package: &'static str, cmd: &mut Command) -> Result<(), FsImageError> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            FsImageError::MissingTool { tool, package }
        } else {
            FsImageError::Io {
                path: PathBuf::from(tool),
                op: "spawn",
                source: e,
            }
        }
    })?;
    if !out.status.success() {
        let command = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        return Err(FsImageError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<(), FsImageError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FsImageError::Io {
            path: path.to_owned(),
            op: "remove",
            source,
        }),
    }
}

/// A compressed, read-only squashfs of `tree`, all files owned by root.
pub fn squashfs(tree: &Path, out: &Path, epoch: u64) -> Result<(), FsImageError> {
    remove_if_exists(out)?;
    let e = epoch.to_string();
    run(
        "mksquashfs",
        "squashfs-tools",
        Command::new("mksquashfs")
            .arg(tree)
            .arg(out)
            .args(["-noappend", "-all-root", "-no-xattrs", "-no-progress"])
            .args(["-comp", "xz", "-b", "262144"])
            .args(["-mkfs-time", &e, "-all-time", &e])
            .env_remove("SOURCE_DATE_EPOCH"),
    )
}

/// A FAT32 image of `size_mib` holding `files` (image path -> host path).
/// Directories are created as needed.
pub fn fat(
    out: &Path,
    size_mib: u64,
    label: &str,
    volume_id: u32,
    files: &[(String, PathBuf)],
    epoch: u64,
) -> Result<(), FsImageError> {
    remove_if_exists(out)?;
    let blocks_kib = (size_mib * 1024).to_string();
    run(
        "mkfs.vfat",
        "dosfstools",
        Command::new("mkfs.vfat")
            .args(["-C", "-F", "32", "-n", label, "-i"])
            .arg(format!("{volume_id:08X}"))
            .arg("--invariant")
            .arg(out)
            .arg(&blocks_kib),
    )?;
    let mut dirs: Vec<String> = Vec::new();
    for (image_path, _) in files {
        let mut acc = String::new();
        let parts: Vec<&str> = image_path.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            acc.push('/');
            acc.push_str(part);
            if !dirs.contains(&acc) {
                dirs.push(acc.clone());
            }
        }
    }
    let mtools_env = |cmd: &mut Command| {
        cmd.env("MTOOLS_SKIP_CHECK", "1")
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .env("TZ", "UTC");
    };
    for d in &dirs {
        let mut cmd = Command::new("mmd");
        mtools_env(&mut cmd);
        cmd.arg("-i").arg(out).arg(format!("::{d}"));
        run("mmd", "mtools", &mut cmd)?;
    }
    for (image_path, host) in files {
        set_mtime(host, epoch)?;
        let mut cmd = Command::new("mcopy");
        mtools_env(&mut cmd);
        cmd.arg("-i")
            .arg(out)
            .arg("-m")
            .arg(host)
            .arg(format!("::{image_path}"));
        run("mcopy", "mtools", &mut cmd)?;
    }
    Ok(())
}

/// An ext4 image populated from `tree` (may be empty).
pub fn ext4(
    out: &Path,
    size_mib: u64,
    label: &str,
    uuid: &str,
    tree: &Path,
    epoch: u64,
) -> Result<(), FsImageError> {
    remove_if_exists(out)?;
    // mke2fs -d copies each entry's times from the tree.
    let paths = pin_times(tree, Path::new("/"), epoch)?;
    run(
        "mke2fs",
        "e2fsprogs",
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", label, "-U", uuid])
            .arg("-E")
            .arg(format!("root_owner=0:0,hash_seed={uuid}"))
            .arg("-d")
            .arg(tree)
            .arg(out)
            .arg(format!("{size_mib}M"))
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string()),
    )?;
    // mke2fs -d takes each inode's ctime from the tree, and a ctime cannot
    // be set on the host: pin them in the image instead.
    let cmds: String = paths
        .iter()
        .map(|p| format!("sif {p} ctime @{epoch}\n"))
        .collect();
    let cmd_file = out.with_extension("debugfs");
    std::fs::write(&cmd_file, cmds).map_err(|source| FsImageError::Io {
        path: cmd_file.clone(),
        op: "write",
        source,
    })?;
    let r = run(
        "debugfs",
        "e2fsprogs",
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&cmd_file)
            .arg(out)
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string()),
    );
    let _ = std::fs::remove_file(&cmd_file);
    r
}

/// Sets the access and modification times of everything below `dir`, and
/// of `dir` itself, to `epoch`, so a filesystem made from it does not record
/// the build time. Returns the image path (`at` for `dir`) of every entry
/// below, sorted, for what has to be pinned in the image afterwards.
fn pin_times(dir: &Path, at: &Path, epoch: u64) -> Result<Vec<String>, FsImageError> {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    let times = std::fs::FileTimes::new().set_accessed(t).set_modified(t);
    let io = |path: &Path, op: &'static str| {
        let path = path.to_owned();
        move |source| FsImageError::Io { path, op, source }
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(dir, "list"))?
        .collect::<Result<_, _>>()
        .map_err(io(dir, "list"))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    let mut paths = Vec::new();
    for e in entries {
        let p = e.path();
        let image = at.join(e.file_name());
        let name = image.to_string_lossy().into_owned();
        if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(FsImageError::Io {
                path: p,
                op: "pin ctime (debugfs needs names without spaces)",
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        paths.push(name);
        let ft = e.file_type().map_err(io(&p, "stat"))?;
        if ft.is_dir() {
            paths.extend(pin_times(&p, &image, epoch)?);
        } else if ft.is_file() {
            std::fs::File::options()
                .write(true)
                .open(&p)
                .map_err(io(&p, "open to set times"))?
                .set_times(times)
                .map_err(io(&p, "set times"))?;
        }
    }
    std::fs::File::open(dir)
        .map_err(io(dir, "open to set times"))?
        .set_times(times)
        .map_err(io(dir, "set times"))?;
    Ok(paths)
}

/// Sets a file's mtime so tools that copy it (mtools) record a fixed time.
fn set_mtime(path: &Path, epoch: u64) -> Result<(), FsImageError> {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .or_else(|_| std::fs::File::open(path))
        .map_err(|source| FsImageError::Io {
            path: path.to_owned(),
            op: "open to set mtime",
            source,
        })?;
    f.set_modified(t).map_err(|source| FsImageError::Io {
        path: path.to_owned(),
        op: "set mtime",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_image_holds_the_files_and_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("f");
        std::fs::write(&src, b"payload").unwrap();
        let files = vec![("/EFI/BOOT/x.cfg".to_owned(), src.clone())];
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        fat(&a, 40, "ESP", 0x1234_5678, &files, 1_700_000_000).unwrap();
        fat(&b, 40, "ESP", 0x1234_5678, &files, 1_700_000_000).unwrap();
        assert_eq!(std::fs::metadata(&a).unwrap().len(), 40 << 20);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let out = Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&a)
            .arg("::/EFI/BOOT/x.cfg")
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"payload");
    }

    #[test]
    fn squashfs_failure_names_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let err = squashfs(&dir.path().join("missing"), &dir.path().join("o"), 0).unwrap_err();
        match err {
            FsImageError::Failed { command, .. } => assert!(command.starts_with("mksquashfs")),
            FsImageError::MissingTool { .. } => panic!("install squashfs-tools"),
            e => panic!("{e:?}"),
        }
    }
}
