//! The unpacked packages an image is composed from, and lookups into them.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("{field}: `{path}` is in no package of the profile ({packages})")]
    NotFound {
        field: String,
        path: String,
        packages: String,
    },
    #[error("{field}: `{path}` is not in package `{package}`")]
    NotInPackage {
        field: String,
        path: String,
        package: String,
    },
    #[error("{field}: `{path}` is shipped by both `{first}` and `{second}`; name one package")]
    Ambiguous {
        field: String,
        path: String,
        first: String,
        second: String,
    },
}

/// One unpacked package.
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub root: PathBuf,
}

/// Where a file of the image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub package: String,
    /// Absolute path inside the image (`/usr/...`).
    pub image_path: String,
    /// Where it is on the build machine.
    pub host_path: PathBuf,
}

#[derive(Debug, Default)]
pub struct PackageSet {
    packages: Vec<Unpacked>,
}

impl PackageSet {
    pub fn new(packages: Vec<Unpacked>) -> Self {
        Self { packages }
    }

    pub fn packages(&self) -> &[Unpacked] {
        &self.packages
    }

    /// Finds `image_path` (absolute) in exactly one package. Symlinks count
    /// as files: a package shipping a link is the owner of that path.
    pub fn locate(&self, image_path: &str, field: &str) -> Result<Located, PackageError> {
        let mut found: Option<Located> = None;
        for pkg in &self.packages {
            let candidate = pkg.root.join(image_path.trim_start_matches('/'));
            if candidate.symlink_metadata().is_ok() {
                if let Some(first) = &found {
                    return Err(PackageError::Ambiguous {
                        field: field.to_owned(),
                        path: image_path.to_owned(),
                        first: first.package.clone(),
                        second: pkg.name.clone(),
                    });
                }
                found = Some(Located {
                    package: pkg.name.clone(),
                    image_path: image_path.to_owned(),
                    host_path: candidate,
                });
            }
        }
        found.ok_or_else(|| PackageError::NotFound {
            field: field.to_owned(),
            path: image_path.to_owned(),
            packages: self
                .packages
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Finds `image_path` in the named package only (a profile field that
    /// says which package a file comes from, like `boot.xen`).
    pub fn locate_in(
        &self,
        package: &str,
        image_path: &str,
        field: &str,
    ) -> Result<Located, PackageError> {
        let not_in = || PackageError::NotInPackage {
            field: field.to_owned(),
            path: image_path.to_owned(),
            package: package.to_owned(),
        };
        let pkg = self
            .packages
            .iter()
            .find(|p| p.name == package)
            .ok_or_else(not_in)?;
        let host_path = pkg.root.join(image_path.trim_start_matches('/'));
        if host_path.symlink_metadata().is_err() {
            return Err(not_in());
        }
        Ok(Located {
            package: pkg.name.clone(),
            image_path: image_path.to_owned(),
            host_path,
        })
    }

    /// Like [`locate`](Self::locate) but a missing file is `None`.
    pub fn try_locate(&self, image_path: &str) -> Result<Option<Located>, PackageError> {
        match self.locate(image_path, "") {
            Ok(l) => Ok(Some(l)),
            Err(PackageError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Expands a glob (`/boot/vmlinuz-*`) against one package.
    pub fn glob_in(&self, package: &str, pattern: &str) -> Vec<Located> {
        let Some(pkg) = self.packages.iter().find(|p| p.name == package) else {
            return Vec::new();
        };
        let full = pkg.root.join(pattern.trim_start_matches('/'));
        let mut out: Vec<Located> = glob::glob(&full.to_string_lossy())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|host_path| {
                let rel = host_path.strip_prefix(&pkg.root).ok()?;
                Some(Located {
                    package: pkg.name.clone(),
                    image_path: format!("/{}", rel.display()),
                    host_path: host_path.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.image_path.cmp(&b.image_path));
        out
    }
}

/// Resolves a symlink's target relative to the link's image directory.
pub fn resolve_link_target(link_image_path: &str, target: &Path) -> String {
    let joined = if target.is_absolute() {
        target.to_path_buf()
    } else {
        Path::new(link_image_path)
            .parent()
            .unwrap_or(Path::new("/"))
            .join(target)
    };
    let mut parts: Vec<String> = Vec::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                parts.pop();
            }
            std::path::Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_with(files: &[(&str, &str)]) -> (tempfile::TempDir, PackageSet) {
        let dir = tempfile::tempdir().unwrap();
        let mut pkgs = Vec::new();
        for (pkg, path) in files {
            let root = dir.path().join(pkg);
            let p = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
            if !pkgs.iter().any(|u: &Unpacked| u.name == *pkg) {
                pkgs.push(Unpacked {
                    name: (*pkg).into(),
                    version: "1".into(),
                    sha256: String::new(),
                    root,
                });
            }
        }
        (dir, PackageSet::new(pkgs))
    }

    #[test]
    fn locate_finds_the_owner() {
        let (_d, set) = set_with(&[("a", "/usr/bin/x"), ("b", "/usr/bin/y")]);
        let l = set.locate("/usr/bin/y", "root.files[0]").unwrap();
        assert_eq!(l.package, "b");
    }

    #[test]
    fn missing_file_names_field_and_path() {
        let (_d, set) = set_with(&[("a", "/usr/bin/x")]);
        match set.locate("/usr/bin/z", "root.files[3]").unwrap_err() {
            PackageError::NotFound { field, path, .. } => {
                assert_eq!(field, "root.files[3]");
                assert_eq!(path, "/usr/bin/z");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn duplicate_paths_are_ambiguous() {
        let (_d, set) = set_with(&[("a", "/usr/bin/x"), ("b", "/usr/bin/x")]);
        assert!(matches!(
            set.locate("/usr/bin/x", "f").unwrap_err(),
            PackageError::Ambiguous { .. }
        ));
    }

    #[test]
    fn a_file_named_with_its_package_must_be_in_that_package() {
        let (_d, set) = set_with(&[("xen-hv", "/boot/xen.gz"), ("other", "/boot/xen-4.gz")]);
        assert_eq!(
            set.locate_in("xen-hv", "/boot/xen.gz", "boot.xen.path")
                .unwrap()
                .package,
            "xen-hv"
        );
        match set
            .locate_in("xen-hv", "/boot/xen-4.gz", "boot.xen.path")
            .unwrap_err()
        {
            PackageError::NotInPackage {
                field,
                path,
                package,
            } => {
                assert_eq!(field, "boot.xen.path");
                assert_eq!(path, "/boot/xen-4.gz");
                assert_eq!(package, "xen-hv");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn link_targets_resolve() {
        assert_eq!(
            resolve_link_target("/usr/lib64/ld.so", Path::new("../lib/x/ld.so")),
            "/usr/lib/x/ld.so"
        );
        assert_eq!(
            resolve_link_target("/usr/lib/a.so.1", Path::new("a.so.1.2")),
            "/usr/lib/a.so.1.2"
        );
        assert_eq!(resolve_link_target("/x/y", Path::new("/abs/z")), "/abs/z");
    }
}
