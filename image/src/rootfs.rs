//! The dom0 root tree: selected package files, their library closure,
//! kernel modules, workspace binaries, overlays and generated `/etc`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::kmod::Module;
use crate::packages::Located;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("workspace binary `{name}` not found at {path} (build it first)")]
    MissingBinary { name: String, path: PathBuf },
    #[error("overlay {overlay}: `{path}` is not a regular file, directory or symlink")]
    BadOverlayEntry { overlay: PathBuf, path: PathBuf },
    #[error("{path}: {what} is already in the tree from {first}")]
    Conflict {
        path: String,
        what: String,
        first: String,
    },
    #[error("root.replace: {path} was never replaced (nothing later provides it)")]
    NotReplaced { path: String },
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.to_owned();
    move |source| RootfsError::Io { path, op, source }
}

/// The mode git records for a file (0755 or 0644): the rest of a checked
/// out file's mode is the host's umask, which must not reach the image.
fn git_mode(mode: u32) -> u32 {
    if mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// The merged-/usr layout every image starts from.
pub const USRMERGE_LINKS: &[(&str, &str)] = &[
    ("bin", "usr/bin"),
    ("sbin", "usr/sbin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
];

/// Mount points and directories qinit expects on every root.
pub const BASE_DIRS: &[&str] = &[
    "usr/bin",
    "usr/sbin",
    "usr/lib",
    "usr/lib64",
    "etc",
    "dev",
    "proc",
    "sys",
    "run",
    "tmp",
    "var",
    "root",
];

/// A tree under construction; records where each path came from so a
/// second source for the same path is an error, not a silent overwrite.
#[derive(Debug)]
pub struct RootTree {
    dir: PathBuf,
    origin: BTreeMap<String, String>,
    /// Paths a second source may replace once (the profile's
    /// `root.replace`), canonical.
    replaceable: std::collections::BTreeSet<String>,
}

impl RootTree {
    /// Starts an empty tree at `dir` (removed first if it exists).
    pub fn create(dir: &Path) -> Result<Self, RootfsError> {
        if dir.exists() {
            fs::remove_dir_all(dir).map_err(io(dir, "remove old tree"))?;
        }
        fs::create_dir_all(dir).map_err(io(dir, "create tree"))?;
        let mut tree = Self {
            dir: dir.to_owned(),
            origin: BTreeMap::new(),
            replaceable: std::collections::BTreeSet::new(),
        };
        for d in BASE_DIRS {
            tree.mkdir(&format!("/{d}"))?;
        }
        for (link, target) in USRMERGE_LINKS {
            tree.symlink(&format!("/{link}"), target, "usrmerge")?;
        }
        Ok(tree)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn host(&self, image_path: &str) -> PathBuf {
        self.dir.join(image_path.trim_start_matches('/'))
    }

    /// Where each path came from (`package <name>`, `workspace`, ...),
    /// keyed by the /usr-merged path.
    pub fn origins(&self) -> &BTreeMap<String, String> {
        &self.origin
    }

    /// Lets a second source replace each of `paths` once (a test release
    /// that breaks a shipped service); [`RootTree::check_replaced`] then
    /// holds the profile to every one of them.
    pub fn allow_replace(&mut self, paths: &[String]) {
        self.replaceable.extend(paths.iter().map(|p| canonical(p)));
    }

    /// Every path [`RootTree::allow_replace`] named was replaced.
    pub fn check_replaced(&self) -> Result<(), RootfsError> {
        match self.replaceable.first() {
            Some(path) => Err(RootfsError::NotReplaced { path: path.clone() }),
            None => Ok(()),
        }
    }

    /// Records `what` as the source of `image_path`; true if it replaces
    /// an earlier source the profile let it replace.
    fn claim(&mut self, image_path: &str, what: &str) -> Result<bool, RootfsError> {
        let canonical = canonical(image_path);
        if let Some(first) = self.origin.get(&canonical) {
            if !self.replaceable.remove(&canonical) {
                return Err(RootfsError::Conflict {
                    path: image_path.to_owned(),
                    what: what.to_owned(),
                    first: first.clone(),
                });
            }
            let origin = format!("{what} (replacing {first})");
            self.origin.insert(canonical, origin);
            return Ok(true);
        }
        self.origin.insert(canonical, what.to_owned());
        Ok(false)
    }

    pub fn mkdir(&mut self, image_path: &str) -> Result<(), RootfsError> {
        let p = self.host(image_path);
        fs::create_dir_all(&p).map_err(io(&p, "create directory"))
    }

    /// Claims `image_path` for `what` and readies its host path: parents
    /// made, and a replaced entry removed, so the new one is never written
    /// through it (a symlink would be followed).
    fn place(&mut self, image_path: &str, what: &str) -> Result<PathBuf, RootfsError> {
        let replacing = self.claim(image_path, what)?;
        let p = self.host(image_path);
        self.parent_dirs(&p)?;
        if replacing {
            fs::remove_file(&p).map_err(io(&p, "remove the replaced entry"))?;
        }
        Ok(p)
    }

    fn parent_dirs(&self, host: &Path) -> Result<(), RootfsError> {
        if let Some(parent) = host.parent() {
            fs::create_dir_all(parent).map_err(io(parent, "create directory"))?;
        }
        Ok(())
    }

    pub fn symlink(
        &mut self,
        image_path: &str,
        target: &str,
        what: &str,
    ) -> Result<(), RootfsError> {
        let p = self.place(image_path, what)?;
        symlink(target, &p).map_err(io(&p, "create symlink"))
    }

    pub fn write(
        &mut self,
        image_path: &str,
        mode: u32,
        data: &[u8],
        what: &str,
    ) -> Result<(), RootfsError> {
        let p = self.place(image_path, what)?;
        fs::write(&p, data).map_err(io(&p, "write"))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io(&p, "chmod"))
    }

    /// Copies a file or recreates a symlink from a package.
    pub fn add_located(&mut self, l: &Located) -> Result<(), RootfsError> {
        let what = format!("package {}", l.package);
        let meta = l
            .host_path
            .symlink_metadata()
            .map_err(io(&l.host_path, "stat"))?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&l.host_path).map_err(io(&l.host_path, "readlink"))?;
            return self.symlink(&l.image_path, &target.to_string_lossy(), &what);
        }
        self.copy_file(
            &l.image_path,
            &l.host_path,
            meta.permissions().mode(),
            &what,
        )
    }

    fn copy_file(
        &mut self,
        image_path: &str,
        src: &Path,
        mode: u32,
        what: &str,
    ) -> Result<(), RootfsError> {
        let p = self.place(image_path, what)?;
        fs::copy(src, &p).map_err(io(src, "copy"))?;
        // Only permission bits: setuid/setgid have no place in dom0.
        fs::set_permissions(&p, fs::Permissions::from_mode(mode & 0o777)).map_err(io(&p, "chmod"))
    }

    /// Installs a workspace binary into /usr/sbin.
    pub fn add_binary(&mut self, name: &str, bin_dir: &Path) -> Result<(), RootfsError> {
        let src = bin_dir.join(name);
        if !src.is_file() {
            return Err(RootfsError::MissingBinary {
                name: name.to_owned(),
                path: src,
            });
        }
        self.copy_file(&format!("/usr/sbin/{name}"), &src, 0o755, "workspace")
    }

    /// Copies an overlay directory over the tree. `label` names it in the
    /// inventory: the repository-relative path, never the host's, so the
    /// root does not depend on where the source is checked out.
    pub fn add_overlay(&mut self, overlay: &Path, label: &str) -> Result<(), RootfsError> {
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = overlay.join(&rel);
            let mut entries: Vec<_> = fs::read_dir(&dir)
                .map_err(io(&dir, "read overlay"))?
                .collect::<Result<_, _>>()
                .map_err(io(&dir, "read overlay"))?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let rel_path = rel.join(e.file_name());
                let image_path = format!("/{}", rel_path.display());
                let ft = e.file_type().map_err(io(&e.path(), "stat"))?;
                let what = format!("overlay {label}");
                if ft.is_dir() {
                    self.mkdir(&image_path)?;
                    stack.push(rel_path);
                } else if ft.is_symlink() {
                    let t = fs::read_link(e.path()).map_err(io(&e.path(), "readlink"))?;
                    self.symlink(&image_path, &t.to_string_lossy(), &what)?;
                } else if ft.is_file() {
                    let mode = e
                        .metadata()
                        .map_err(io(&e.path(), "stat"))?
                        .permissions()
                        .mode();
                    self.copy_file(&image_path, &e.path(), git_mode(mode), &what)?;
                } else {
                    return Err(RootfsError::BadOverlayEntry {
                        overlay: overlay.to_owned(),
                        path: rel_path,
                    });
                }
            }
        }
        Ok(())
    }

    /// Installs modules under /usr/lib/modules/<kver> and writes the load
    /// order list qinit reads.
    pub fn add_modules(
        &mut self,
        kver: &str,
        modules: &[Module],
        list_path: &str,
        kernel_package: &str,
    ) -> Result<(), RootfsError> {
        let what = format!("package {kernel_package}");
        let mut paths = Vec::new();
        for m in modules {
            let image_path = format!("/usr/lib/modules/{kver}/{}", m.rel_path);
            self.write(&image_path, 0o644, &m.data, &what)?;
            paths.push(image_path);
        }
        let list = qcontract::modules::render_list(paths.iter().map(String::as_str));
        self.write(list_path, 0o644, list.as_bytes(), "generated")
    }
}

/// Both spellings of a path on a merged-/usr root, where `/lib/x` and
/// `/usr/lib/x` are one file (the links are [`USRMERGE_LINKS`]): the path
/// as given first, then the other spelling if it has one.
pub fn usrmerge_spellings(path: &str) -> Vec<String> {
    for (link, target) in USRMERGE_LINKS {
        if let Some(rest) = path.strip_prefix(&format!("/{link}/")) {
            return vec![path.to_owned(), format!("/{target}/{rest}")];
        }
        if let Some(rest) = path.strip_prefix(&format!("/{target}/")) {
            return vec![path.to_owned(), format!("/{link}/{rest}")];
        }
    }
    vec![path.to_owned()]
}

/// The `/usr` spelling: the key under which a file is owned once.
fn canonical(image_path: &str) -> String {
    usrmerge_spellings(image_path)
        .into_iter()
        .find(|p| p.starts_with("/usr/"))
        .unwrap_or_else(|| image_path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listed path is replaced once, through nothing that was there; a
    /// second replacement, or one never made, fails the build.
    #[test]
    fn root_replace_lets_one_later_source_win_once() {
        let d = tempfile::tempdir().unwrap();
        let mut t = RootTree::create(&d.path().join("root")).unwrap();
        let outside = d.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        t.symlink("/etc/s.toml", &outside.display().to_string(), "base")
            .unwrap();
        t.allow_replace(&["/etc/s.toml".into(), "/etc/never".into()]);
        t.write("/etc/s.toml", 0o644, b"broken", "overlay broken")
            .unwrap();
        assert_eq!(
            std::fs::read(d.path().join("root/etc/s.toml")).unwrap(),
            b"broken"
        );
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert_eq!(
            t.origins()["/etc/s.toml"],
            "overlay broken (replacing base)"
        );
        assert!(matches!(
            t.write("/etc/s.toml", 0o644, b"again", "c").unwrap_err(),
            RootfsError::Conflict { .. }
        ));
        match t.check_replaced().unwrap_err() {
            RootfsError::NotReplaced { path } => assert_eq!(path, "/etc/never"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn usrmerge_paths_land_in_usr() {
        let d = tempfile::tempdir().unwrap();
        let mut t = RootTree::create(&d.path().join("root")).unwrap();
        t.write("/lib64/ld.so", 0o755, b"x", "a").unwrap();
        assert!(d.path().join("root/usr/lib64/ld.so").is_file());
        // The same file through the other spelling is a conflict.
        assert!(matches!(
            t.write("/usr/lib64/ld.so", 0o755, b"y", "b").unwrap_err(),
            RootfsError::Conflict { .. }
        ));
    }

    #[test]
    fn missing_binary_is_named() {
        let d = tempfile::tempdir().unwrap();
        let mut t = RootTree::create(&d.path().join("root")).unwrap();
        match t.add_binary("qinit", d.path()).unwrap_err() {
            RootfsError::MissingBinary { name, .. } => assert_eq!(name, "qinit"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn overlays_copy_files_links_and_modes() {
        let d = tempfile::tempdir().unwrap();
        let ov = d.path().join("ov");
        fs::create_dir_all(ov.join("etc/qinit")).unwrap();
        fs::write(ov.join("etc/qinit/a.toml"), b"x").unwrap();
        fs::set_permissions(
            ov.join("etc/qinit/a.toml"),
            fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        fs::write(ov.join("etc/qinit/b.toml"), b"y").unwrap();
        // A checkout under umask 002.
        fs::set_permissions(
            ov.join("etc/qinit/b.toml"),
            fs::Permissions::from_mode(0o664),
        )
        .unwrap();
        symlink("/run", ov.join("etc/mtab")).unwrap();
        let mut t = RootTree::create(&d.path().join("root")).unwrap();
        t.add_overlay(&ov, "image/overlays/x").unwrap();
        let mode = |f: &str| {
            fs::metadata(d.path().join("root").join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("etc/qinit/a.toml"), 0o755);
        assert_eq!(mode("etc/qinit/b.toml"), 0o644);
        assert_eq!(
            t.origins()["/etc/qinit/b.toml"],
            "overlay image/overlays/x",
            "the repository path, not the host's"
        );
        assert_eq!(
            fs::read_link(d.path().join("root/etc/mtab")).unwrap(),
            Path::new("/run")
        );
    }
}
