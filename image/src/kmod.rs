//! Kernel modules: resolving a module list against the kernel package.
//!
//! The Debian kernel package ships no `modules.dep` (depmod runs at install
//! time), so dependencies come from each module's own `.modinfo` section
//! (`depends=`, and `softdep=pre:` which ext4 uses for crc32c). Modules are
//! decompressed at build time so qinit can load them with a plain
//! `finit_module` in dependency order, without a module loader.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufReader;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{list}:{line}: module `{module}` is neither built in nor shipped by the kernel package"
    )]
    Unknown {
        list: PathBuf,
        line: usize,
        module: String,
    },
    #[error("module `{module}` ({path}): {reason}")]
    Malformed {
        module: String,
        path: PathBuf,
        reason: String,
    },
    #[error("module `{module}` depends on `{dependency}`, which the kernel package does not ship")]
    MissingDependency { module: String, dependency: String },
    #[error("{list}:{line}: `{text}` is not a module name")]
    BadName {
        list: PathBuf,
        line: usize,
        text: String,
    },
}

/// A module ready to go into an image, in load order.
#[derive(Debug, Clone)]
pub struct Module {
    pub name: String,
    /// Path relative to `/usr/lib/modules/<version>/`, without compression suffix.
    pub rel_path: String,
    pub data: Vec<u8>,
}

/// Module names are compared with `-` and `_` folded, as the kernel does.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Reads a module list: one name per line, `#` comments, blanks ignored.
pub fn read_list(path: &Path) -> Result<Vec<(usize, String)>, KmodError> {
    let text = std::fs::read_to_string(path).map_err(|source| KmodError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_list(path, &text)
}

pub fn parse_list(path: &Path, text: &str) -> Result<Vec<(usize, String)>, KmodError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if !line
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(KmodError::BadName {
                list: path.to_owned(),
                line: i + 1,
                text: line.to_owned(),
            });
        }
        out.push((i + 1, line.to_owned()));
    }
    Ok(out)
}

/// The modules of one kernel package.
#[derive(Debug)]
pub struct KernelModules {
    dir: PathBuf,
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

impl KernelModules {
    /// Indexes `/usr/lib/modules/<version>` of an unpacked kernel package.
    pub fn open(modules_dir: &Path) -> Result<Self, KmodError> {
        let mut files = BTreeMap::new();
        let mut stack = vec![modules_dir.join("kernel")];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir).map_err(|source| KmodError::Read {
                path: dir.clone(),
                source,
            })?;
            for entry in rd {
                let entry = entry.map_err(|source| KmodError::Read {
                    path: dir.clone(),
                    source,
                })?;
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let fname = entry.file_name().to_string_lossy().into_owned();
                if let Some(stem) = module_stem(&fname) {
                    files.insert(normalize(stem), path);
                }
            }
        }
        let builtin_path = modules_dir.join("modules.builtin");
        let builtin_text =
            std::fs::read_to_string(&builtin_path).map_err(|source| KmodError::Read {
                path: builtin_path.clone(),
                source,
            })?;
        let builtin = builtin_text
            .lines()
            .filter_map(|l| l.rsplit('/').next())
            .filter_map(module_stem)
            .map(normalize)
            .collect();
        Ok(Self {
            dir: modules_dir.to_owned(),
            files,
            builtin,
        })
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// Resolves the modules named in `lists` with their dependencies, in
    /// an order where every module follows what it needs. Built-in modules
    /// are dropped. `skip` holds modules already loaded by an earlier stage.
    pub fn resolve(
        &self,
        lists: &[(PathBuf, Vec<(usize, String)>)],
        skip: &BTreeSet<String>,
    ) -> Result<Vec<Module>, KmodError> {
        let mut order = Vec::new();
        let mut done: BTreeSet<String> = skip.clone();
        for (list, entries) in lists {
            for (line, name) in entries {
                let n = normalize(name);
                if self.is_builtin(&n) || done.contains(&n) {
                    continue;
                }
                if !self.files.contains_key(&n) {
                    return Err(KmodError::Unknown {
                        list: list.clone(),
                        line: *line,
                        module: name.clone(),
                    });
                }
                self.visit(&n, &mut done, &mut BTreeSet::new(), &mut order)?;
            }
        }
        Ok(order)
    }

    fn resolve_soft(&self, soft: &str) -> Option<String> {
        let n = normalize(soft);
        let base = n.strip_prefix("crypto_").unwrap_or(&n);
        [n.clone(), base.to_owned(), format!("{base}_generic")]
            .into_iter()
            .find(|c| self.files.contains_key(c) || self.is_builtin(c))
    }

    fn visit(
        &self,
        name: &str,
        done: &mut BTreeSet<String>,
        in_progress: &mut BTreeSet<String>,
        order: &mut Vec<Module>,
    ) -> Result<(), KmodError> {
        if done.contains(name) || self.is_builtin(name) || !in_progress.insert(name.to_owned()) {
            return Ok(());
        }
        let Some(path) = self.files.get(name) else {
            return Err(KmodError::MissingDependency {
                module: in_progress.iter().last().cloned().unwrap_or_default(),
                dependency: name.to_owned(),
            });
        };
        let data = decompress(name, path)?;
        let info = modinfo(name, path, &data)?;
        for dep in &info.depends {
            let dep = normalize(dep);
            if !self.files.contains_key(&dep) && !self.is_builtin(&dep) {
                return Err(KmodError::MissingDependency {
                    module: name.to_owned(),
                    dependency: dep,
                });
            }
            self.visit(&dep, done, in_progress, order)?;
        }
        // Soft dependencies are often aliases ("crypto-crc32c"); resolve
        // the common crypto form, and skip what cannot be found: the
        // module loads without them, possibly slower.
        for soft in &info.softdep_pre {
            match self.resolve_soft(soft) {
                Some(dep) => self.visit(&dep, done, in_progress, order)?,
                None => log::warn!("module {name}: soft dependency {soft} not found; skipped"),
            }
        }
        in_progress.remove(name);
        done.insert(name.to_owned());
        let rel = path
            .strip_prefix(&self.dir)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rel_path = rel
            .strip_suffix(".xz")
            .or_else(|| rel.strip_suffix(".zst"))
            .unwrap_or(&rel)
            .to_owned();
        order.push(Module {
            name: name.to_owned(),
            rel_path,
            data,
        });
        Ok(())
    }
}

fn module_stem(fname: &str) -> Option<&str> {
    fname
        .strip_suffix(".ko.xz")
        .or_else(|| fname.strip_suffix(".ko"))
}

fn decompress(name: &str, path: &Path) -> Result<Vec<u8>, KmodError> {
    let file = std::fs::File::open(path).map_err(|source| KmodError::Read {
        path: path.to_owned(),
        source,
    })?;
    if path.extension().is_some_and(|e| e == "xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut BufReader::new(file), &mut out).map_err(|e| {
            KmodError::Malformed {
                module: name.to_owned(),
                path: path.to_owned(),
                reason: format!("xz: {e:?}"),
            }
        })?;
        Ok(out)
    } else {
        std::fs::read(path).map_err(|source| KmodError::Read {
            path: path.to_owned(),
            source,
        })
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub depends: Vec<String>,
    pub softdep_pre: Vec<String>,
}

/// Parses the `.modinfo` section of an uncompressed module.
pub fn modinfo(name: &str, path: &Path, data: &[u8]) -> Result<ModInfo, KmodError> {
    let malformed = |reason: String| KmodError::Malformed {
        module: name.to_owned(),
        path: path.to_owned(),
        reason,
    };
    let elf = goblin::elf::Elf::parse(data).map_err(|e| malformed(e.to_string()))?;
    let section = elf
        .section_headers
        .iter()
        .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".modinfo"))
        .ok_or_else(|| malformed("no .modinfo section".into()))?;
    let start = usize::try_from(section.sh_offset).map_err(|e| malformed(e.to_string()))?;
    let len = usize::try_from(section.sh_size).map_err(|e| malformed(e.to_string()))?;
    let bytes = start
        .checked_add(len)
        .and_then(|end| data.get(start..end))
        .ok_or_else(|| malformed(".modinfo lies outside the file".into()))?;
    Ok(parse_modinfo(bytes))
}

fn parse_modinfo(bytes: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for entry in bytes.split(|b| *b == 0) {
        let Ok(entry) = std::str::from_utf8(entry) else {
            continue;
        };
        if let Some(deps) = entry.strip_prefix("depends=") {
            info.depends
                .extend(deps.split(',').filter(|d| !d.is_empty()).map(str::to_owned));
        } else if let Some(soft) = entry.strip_prefix("softdep=") {
            // "pre: a b post: c" — only `pre` must be loaded first.
            let mut in_pre = false;
            for word in soft.split_whitespace() {
                match word {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    w if in_pre => info.softdep_pre.push(w.to_owned()),
                    _ => {}
                }
            }
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_parsing_skips_comments_and_rejects_junk() {
        let p = Path::new("early.list");
        let l = parse_list(p, "# c\ndm-verity\n\n  ext4 # fs\n").unwrap();
        assert_eq!(l, vec![(2, "dm-verity".into()), (4, "ext4".into())]);
        match parse_list(p, "ok\nrm -rf /\n").unwrap_err() {
            KmodError::BadName { line, .. } => assert_eq!(line, 2),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn modinfo_depends_and_softdeps() {
        let raw = b"license=GPL\0depends=mbcache,jbd2,crc16\0softdep=pre: crc32c post: x\0\0";
        let info = parse_modinfo(raw);
        assert_eq!(info.depends, vec!["mbcache", "jbd2", "crc16"]);
        assert_eq!(info.softdep_pre, vec!["crc32c"]);
        assert_eq!(parse_modinfo(b"depends=\0"), ModInfo::default());
    }

    #[test]
    fn names_fold_dashes() {
        assert_eq!(normalize("dm-verity"), "dm_verity");
        assert_eq!(module_stem("dm-mod.ko.xz"), Some("dm-mod"));
        assert_eq!(module_stem("x.ko"), Some("x"));
        assert_eq!(module_stem("x.txt"), None);
    }

    /// A fake kernel tree with uncompressed "modules" that are real ELF
    /// objects carrying a .modinfo section, made with the host's `cc`.
    fn fake_kernel(modules: &[(&str, &str)], builtin: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let kdir = dir.path().join("kernel/drivers");
        std::fs::create_dir_all(&kdir).unwrap();
        for (name, modinfo) in modules {
            let src = dir.path().join(format!("{name}.c"));
            let escaped = modinfo.replace('\0', "\\0");
            std::fs::write(
                &src,
                format!(
                    "__attribute__((section(\".modinfo\"), used)) static const char m[] = \"{escaped}\";\n"
                ),
            )
            .unwrap();
            let status = std::process::Command::new("cc")
                .args(["-c", "-o"])
                .arg(kdir.join(format!("{name}.ko")))
                .arg(&src)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let builtin_text: String = builtin
            .iter()
            .map(|b| format!("kernel/x/{b}.ko\n"))
            .collect();
        std::fs::write(dir.path().join("modules.builtin"), builtin_text).unwrap();
        dir
    }

    #[test]
    fn resolution_orders_dependencies_first_and_drops_builtins() {
        let k = fake_kernel(
            &[
                (
                    "ext4",
                    "depends=jbd2,mbcache\0softdep=pre: crc32c missing\0",
                ),
                ("jbd2x", "depends=\0softdep=pre: crypto-crc32c\0"),
                ("jbd2", "depends=\0"),
                ("mbcache", "depends=\0"),
                ("crc32c_generic", "depends=\0"),
                ("dm-verity", "depends=dm-bufio,dm-mod\0"),
                ("dm-bufio", "depends=dm-mod\0"),
                ("dm-mod", "depends=\0"),
            ],
            &["virtio_pci"],
        );
        let km = KernelModules::open(k.path()).unwrap();
        let list = vec![(
            PathBuf::from("early.list"),
            vec![
                (1, "virtio_pci".to_owned()),
                (2, "dm-verity".to_owned()),
                (3, "ext4".to_owned()),
            ],
        )];
        let mods = km.resolve(&list, &BTreeSet::new()).unwrap();
        let names: Vec<_> = mods.iter().map(|m| m.name.as_str()).collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert!(!names.contains(&"virtio_pci"));
        assert!(pos("dm_mod") < pos("dm_bufio"));
        assert!(pos("dm_bufio") < pos("dm_verity"));
        assert!(pos("jbd2") < pos("ext4"));
        assert!(pos("crc32c_generic") < pos("ext4"));
        assert_eq!(names.len(), 7);
        assert!(mods[0].rel_path.starts_with("kernel/drivers/"));

        // A later stage skips what the earlier one loaded.
        let done: BTreeSet<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let again = km.resolve(&list, &done).unwrap();
        assert!(again.is_empty());
    }

    #[test]
    fn unknown_module_names_the_list_and_line() {
        let k = fake_kernel(&[("a", "depends=\0")], &[]);
        let km = KernelModules::open(k.path()).unwrap();
        let list = vec![(PathBuf::from("l"), vec![(7, "nope".to_owned())])];
        match km.resolve(&list, &BTreeSet::new()).unwrap_err() {
            KmodError::Unknown { line, module, .. } => {
                assert_eq!(line, 7);
                assert_eq!(module, "nope");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn missing_dependency_is_reported() {
        let k = fake_kernel(&[("a", "depends=ghost\0")], &[]);
        let km = KernelModules::open(k.path()).unwrap();
        let list = vec![(PathBuf::from("l"), vec![(1, "a".to_owned())])];
        assert!(matches!(
            km.resolve(&list, &BTreeSet::new()).unwrap_err(),
            KmodError::MissingDependency { .. }
        ));
    }
}
