//! The shared-library closure of the ELF binaries an image includes.
//!
//! We read each binary's dynamic section (DT_NEEDED, DT_RUNPATH/DT_RPATH,
//! PT_INTERP) instead of running `ldd`: the binaries are for the target's
//! glibc, which may be newer than the build host's.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

use crate::packages::{resolve_link_target, Located, PackageError, PackageSet};
use crate::rootfs::usrmerge_spellings;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed ELF: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("binary {binary} needs {library}, which no package of the profile ships (searched {searched})")]
    MissingLibrary {
        binary: String,
        library: String,
        searched: String,
    },
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error("{path}: symlink chain too long")]
    LinkLoop { path: String },
}

/// What the dynamic loader needs to run one ELF file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DynamicInfo {
    pub interpreter: Option<String>,
    pub needed: Vec<String>,
    pub search_paths: Vec<String>,
}

/// Reads the dynamic information of `path`; `None` if it is not ELF.
pub fn read_dynamic(path: &Path) -> Result<Option<DynamicInfo>, ElfError> {
    let bytes = std::fs::read(path).map_err(|source| ElfError::Read {
        path: path.to_owned(),
        source,
    })?;
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Ok(None);
    }
    let elf = goblin::elf::Elf::parse(&bytes).map_err(|e| ElfError::Malformed {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut search_paths = Vec::new();
    for p in elf.runpaths.iter().chain(elf.rpaths.iter()) {
        search_paths.extend(p.split(':').filter(|s| !s.is_empty()).map(str::to_owned));
    }
    Ok(Some(DynamicInfo {
        interpreter: elf.interpreter.map(str::to_owned),
        needed: elf.libraries.iter().map(|s| (*s).to_owned()).collect(),
        search_paths,
    }))
}

/// The loader's default directories for x86_64 Debian (multiarch first).
const DEFAULT_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
    "/lib",
];

fn locate_any(set: &PackageSet, path: &str) -> Result<Option<Located>, ElfError> {
    // Packages may ship either spelling of a merged-/usr path.
    for variant in usrmerge_spellings(path) {
        if let Some(mut l) = set.try_locate(&variant)? {
            // Keep the spelling the loader uses; the root has usrmerge links.
            l.image_path = variant;
            return Ok(Some(l));
        }
    }
    Ok(None)
}

/// Adds a located file and, if it is a symlink, every link in its chain.
fn add_with_links(
    set: &PackageSet,
    located: Located,
    out: &mut BTreeMap<String, Located>,
    queue: &mut VecDeque<Located>,
) -> Result<(), ElfError> {
    let mut current = located;
    for _ in 0..16 {
        let meta = current
            .host_path
            .symlink_metadata()
            .map_err(|source| ElfError::Read {
                path: current.host_path.clone(),
                source,
            })?;
        if out.contains_key(&current.image_path) {
            return Ok(());
        }
        out.insert(current.image_path.clone(), current.clone());
        if !meta.file_type().is_symlink() {
            queue.push_back(current);
            return Ok(());
        }
        let target = std::fs::read_link(&current.host_path).map_err(|source| ElfError::Read {
            path: current.host_path.clone(),
            source,
        })?;
        let target_path = resolve_link_target(&current.image_path, &target);
        current = locate_any(set, &target_path)?.ok_or_else(|| PackageError::NotFound {
            field: format!("symlink {}", current.image_path),
            path: target_path.clone(),
            packages: String::new(),
        })?;
    }
    Err(ElfError::LinkLoop {
        path: current.image_path,
    })
}

/// Returns `roots` plus every file (libraries, loader, their symlinks) they
/// need at run time, keyed by image path.
pub fn closure(set: &PackageSet, roots: &[Located]) -> Result<BTreeMap<String, Located>, ElfError> {
    let mut out = BTreeMap::new();
    let mut queue = VecDeque::new();
    for r in roots {
        add_with_links(set, r.clone(), &mut out, &mut queue)?;
    }
    let mut seen_libs: BTreeSet<String> = BTreeSet::new();
    while let Some(file) = queue.pop_front() {
        let Some(info) = read_dynamic(&file.host_path)? else {
            continue;
        };
        if let Some(interp) = &info.interpreter {
            let located = locate_any(set, interp)?.ok_or_else(|| ElfError::MissingLibrary {
                binary: file.image_path.clone(),
                library: interp.clone(),
                searched: "(program interpreter)".into(),
            })?;
            add_with_links(set, located, &mut out, &mut queue)?;
        }
        let origin = Path::new(&file.image_path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into());
        let dirs: Vec<String> = info
            .search_paths
            .iter()
            .map(|p| p.replace("$ORIGIN", &origin).replace("${ORIGIN}", &origin))
            .chain(DEFAULT_DIRS.iter().map(|s| (*s).to_owned()))
            .collect();
        for lib in &info.needed {
            if !seen_libs.insert(format!("{}|{lib}", dirs.join(":"))) {
                continue;
            }
            let mut found = None;
            for dir in &dirs {
                if let Some(l) = locate_any(set, &format!("{dir}/{lib}"))? {
                    found = Some(l);
                    break;
                }
            }
            let located = found.ok_or_else(|| ElfError::MissingLibrary {
                binary: file.image_path.clone(),
                library: lib.clone(),
                searched: dirs.join(":"),
            })?;
            add_with_links(set, located, &mut out, &mut queue)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packages::Unpacked;

    /// Builds a fake package set out of the build host's own `true` binary
    /// and its libraries, which are real ELF files.
    fn host_set(with_libc: bool) -> (tempfile::TempDir, PackageSet) {
        let dir = tempfile::tempdir().unwrap();
        let bin_root = dir.path().join("bin-pkg");
        let lib_root = dir.path().join("libc-pkg");
        let bin = bin_root.join("usr/bin/true");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::copy("/usr/bin/true", &bin).unwrap();
        let host = read_dynamic(Path::new("/usr/bin/true")).unwrap().unwrap();
        let libdir = lib_root.join("usr/lib/x86_64-linux-gnu");
        std::fs::create_dir_all(&libdir).unwrap();
        if with_libc {
            for lib in &host.needed {
                std::fs::copy(format!("/lib/x86_64-linux-gnu/{lib}"), libdir.join(lib)).unwrap();
            }
        }
        let interp = host.interpreter.unwrap();
        let name = Path::new(&interp).file_name().unwrap();
        std::fs::copy(&interp, libdir.join(name)).unwrap();
        std::fs::create_dir_all(lib_root.join("usr/lib64")).unwrap();
        std::os::unix::fs::symlink(
            format!("../lib/x86_64-linux-gnu/{}", name.to_string_lossy()),
            lib_root.join("usr/lib64").join(name),
        )
        .unwrap();
        let set = PackageSet::new(vec![
            Unpacked {
                name: "coreutils".into(),
                version: "1".into(),
                sha256: String::new(),
                root: bin_root,
            },
            Unpacked {
                name: "libc6".into(),
                version: "1".into(),
                sha256: String::new(),
                root: lib_root,
            },
        ]);
        (dir, set)
    }

    #[test]
    fn reads_needed_and_interpreter() {
        let info = read_dynamic(Path::new("/usr/bin/true")).unwrap().unwrap();
        assert!(info.needed.iter().any(|l| l == "libc.so.6"));
        assert_eq!(
            info.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
    }

    #[test]
    fn non_elf_is_none() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"#!/bin/sh\n").unwrap();
        assert_eq!(read_dynamic(f.path()).unwrap(), None);
    }

    #[test]
    fn truncated_elf_is_malformed() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"\x7fELF\x02\x01\x01").unwrap();
        assert!(matches!(
            read_dynamic(f.path()).unwrap_err(),
            ElfError::Malformed { .. }
        ));
    }

    #[test]
    fn closure_pulls_libc_and_the_loader_through_usrmerge_links() {
        let (_d, set) = host_set(true);
        let root = set.locate("/usr/bin/true", "root.files[0]").unwrap();
        let files = closure(&set, &[root]).unwrap();
        assert!(files.contains_key("/usr/bin/true"));
        assert!(
            files.contains_key("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            "{files:?}"
        );
        // PT_INTERP says /lib64/...; the package ships /usr/lib64/..., which
        // the root's /lib64 -> usr/lib64 link makes the same file.
        assert!(
            files.contains_key("/usr/lib64/ld-linux-x86-64.so.2"),
            "{files:?}"
        );
        assert!(files.contains_key("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"));
    }

    #[test]
    fn missing_library_names_binary_and_library() {
        let (_d, set) = host_set(false);
        let root = set.locate("/usr/bin/true", "root.files[0]").unwrap();
        match closure(&set, &[root]).unwrap_err() {
            ElfError::MissingLibrary {
                binary, library, ..
            } => {
                assert_eq!(binary, "/usr/bin/true");
                assert_eq!(library, "libc.so.6");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn usrmerge_spellings_cover_both_forms() {
        assert_eq!(
            usrmerge_spellings("/lib64/ld.so"),
            vec!["/lib64/ld.so", "/usr/lib64/ld.so"]
        );
        assert_eq!(
            usrmerge_spellings("/usr/lib/x/libc.so.6"),
            vec!["/usr/lib/x/libc.so.6", "/lib/x/libc.so.6"]
        );
        assert_eq!(usrmerge_spellings("/etc/x"), vec!["/etc/x"]);
    }
}
