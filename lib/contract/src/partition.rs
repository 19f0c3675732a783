//! The partitions of the disk, by their GPT names (which qimage writes
//! and GRUB, qinit and qupdate look up), and the one way to find a
//! partition through sysfs, which the kernel fills from the partition
//! table (`PARTNAME=` in each `uevent`).

use std::path::{Path, PathBuf};

use crate::Slot;

/// One partition of the fixed layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Partition {
    /// The EFI system partition: GRUB and its environment block.
    Esp,
    /// A slot's boot partition: Xen, the kernel, the initramfs.
    Boot(Slot),
    /// A slot's root: squashfs with its dm-verity tree.
    Root(Slot),
    /// The writable data partition, /var.
    Data,
}

impl Partition {
    /// Every partition in table order: entry `i` is partition number
    /// `i + 1`.
    pub const LAYOUT: [Partition; 6] = [
        Partition::Esp,
        Partition::Boot(Slot::A),
        Partition::Root(Slot::A),
        Partition::Boot(Slot::B),
        Partition::Root(Slot::B),
        Partition::Data,
    ];

    /// The GPT partition name.
    pub fn name(self) -> &'static str {
        match self {
            Partition::Esp => "esp",
            Partition::Boot(Slot::A) => "boot_a",
            Partition::Root(Slot::A) => "root_a",
            Partition::Boot(Slot::B) => "boot_b",
            Partition::Root(Slot::B) => "root_b",
            Partition::Data => "data",
        }
    }

    /// The GPT partition number (1-based) on the fixed layout.
    pub fn number(self) -> u32 {
        let i = Self::LAYOUT
            .iter()
            .position(|p| *p == self)
            .expect("every partition is in LAYOUT");
        u32::try_from(i + 1).expect("the layout has six entries")
    }

    /// The partition called `name`, if it is one of the layout's.
    pub fn from_name(name: &str) -> Option<Partition> {
        Self::LAYOUT.into_iter().find(|p| p.name() == name)
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the kernel lists block devices.
pub const SYS_CLASS_BLOCK: &str = "/sys/class/block";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("partition `{name}` is on both {first} and {second}; refusing to guess")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },
    #[error("no partition named `{name}` in {sys} (block devices seen: {seen})")]
    NotFound {
        name: String,
        sys: PathBuf,
        seen: String,
    },
    #[error("{path}: cannot resolve the disk of partition `{name}`")]
    NoDisk { name: String, path: PathBuf },
}

/// A block device as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name, e.g. `vda3`.
    pub kname: String,
    /// `major:minor`.
    pub dev: String,
    pub partname: Option<String>,
    /// Its directory in sysfs (`/sys/class/block/vda3`).
    pub sys_path: PathBuf,
}

impl BlockDev {
    pub fn node(&self) -> PathBuf {
        Path::new("/dev").join(&self.kname)
    }

    /// The whole disk this partition is on: a partition's sysfs directory
    /// is a child of its disk's.
    pub fn disk(&self) -> Result<PathBuf, LookupError> {
        let no_disk = || LookupError::NoDisk {
            name: self.partname.clone().unwrap_or_else(|| self.kname.clone()),
            path: self.sys_path.clone(),
        };
        let real = std::fs::canonicalize(&self.sys_path).map_err(|_| no_disk())?;
        let disk = real
            .parent()
            .and_then(|p| p.file_name())
            .ok_or_else(no_disk)?;
        Ok(Path::new("/dev").join(disk))
    }
}

/// Parses one `uevent` file's contents.
pub fn parse_uevent(sys_path: &Path, text: &str) -> BlockDev {
    let mut dev = BlockDev {
        kname: String::new(),
        dev: String::new(),
        partname: None,
        sys_path: sys_path.to_owned(),
    };
    let mut major = String::new();
    let mut minor = String::new();
    for line in text.lines() {
        match line.split_once('=') {
            Some(("DEVNAME", v)) => dev.kname = v.to_owned(),
            Some(("MAJOR", v)) => major = v.to_owned(),
            Some(("MINOR", v)) => minor = v.to_owned(),
            Some(("PARTNAME", v)) => dev.partname = Some(v.to_owned()),
            _ => {}
        }
    }
    dev.dev = format!("{major}:{minor}");
    dev
}

/// Lists the block devices under `sys` (normally [`SYS_CLASS_BLOCK`]),
/// sorted by kernel name. A device whose `uevent` cannot be read is not
/// listed (it is going away, or not set up yet).
pub fn scan(sys: &Path) -> Vec<BlockDev> {
    let Ok(rd) = std::fs::read_dir(sys) else {
        return Vec::new();
    };
    let mut out: Vec<BlockDev> = rd
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let text = std::fs::read_to_string(path.join("uevent")).ok()?;
            Some(parse_uevent(&path, &text))
        })
        .filter(|d| !d.kname.is_empty())
        .collect();
    out.sort_by(|a, b| a.kname.cmp(&b.kname));
    out
}

/// Finds the partition called `name` among `devs`: none, or exactly one.
/// Two disks with the same partition name (a second appliance disk, a
/// USB stick with an old image) are refused rather than guessed between.
pub fn find(devs: &[BlockDev], name: &str) -> Result<Option<BlockDev>, LookupError> {
    let mut found: Option<&BlockDev> = None;
    for d in devs.iter().filter(|d| d.partname.as_deref() == Some(name)) {
        if let Some(first) = found {
            return Err(LookupError::Duplicate {
                name: name.to_owned(),
                first: first.kname.clone(),
                second: d.kname.clone(),
            });
        }
        found = Some(d);
    }
    Ok(found.cloned())
}

/// [`find`] over `sys` now, where the partition must exist.
pub fn lookup(sys: &Path, part: Partition) -> Result<BlockDev, LookupError> {
    let devs = scan(sys);
    find(&devs, part.name())?.ok_or_else(|| LookupError::NotFound {
        name: part.name().to_owned(),
        sys: sys.to_owned(),
        seen: describe(&devs),
    })
}

/// The devices seen, for an error message: `vda vda1(esp) ...`.
pub fn describe(devs: &[BlockDev]) -> String {
    devs.iter()
        .map(|d| match &d.partname {
            Some(p) => format!("{}({p})", d.kname),
            None => d.kname.clone(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        for (i, p) in Partition::LAYOUT.into_iter().enumerate() {
            assert_eq!(p.number() as usize, i + 1);
            assert_eq!(Partition::from_name(p.name()), Some(p));
        }
        assert_eq!(Partition::from_name("root_c"), None);
    }

    fn fake_sys(entries: &[(&str, &str, Option<&str>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (disk, kname, partname) in entries {
            // As in sysfs: the partition's directory is inside its disk's,
            // and class/block links to it.
            let real = dir.path().join("devices").join(disk).join(kname);
            std::fs::create_dir_all(&real).expect("mkdir");
            let mut uevent = format!("MAJOR=254\nMINOR=1\nDEVNAME={kname}\nDEVTYPE=partition\n");
            if let Some(p) = partname {
                uevent.push_str(&format!("PARTNAME={p}\n"));
            }
            std::fs::write(real.join("uevent"), uevent).expect("uevent");
            let class = dir.path().join("class");
            std::fs::create_dir_all(&class).expect("class");
            std::os::unix::fs::symlink(&real, class.join(kname)).expect("link");
        }
        dir
    }

    #[test]
    fn a_partition_is_found_with_its_disk() {
        let sys = fake_sys(&[
            ("vda", "vda3", Some("root_a")),
            ("vda", "vda6", Some("data")),
        ]);
        let class = sys.path().join("class");
        let d = lookup(&class, Partition::Root(Slot::A)).expect("root_a");
        assert_eq!(d.kname, "vda3");
        assert_eq!(d.dev, "254:1");
        assert_eq!(d.node(), Path::new("/dev/vda3"));
        assert_eq!(d.disk().expect("disk"), Path::new("/dev/vda"));
        let e = lookup(&class, Partition::Esp).unwrap_err();
        assert!(e.to_string().contains("vda3(root_a)"), "{e}");
    }

    #[test]
    fn the_same_name_on_two_disks_is_refused() {
        let sys = fake_sys(&[
            ("vda", "vda3", Some("root_a")),
            ("sdb", "sdb3", Some("root_a")),
        ]);
        let e = lookup(&sys.path().join("class"), Partition::Root(Slot::A)).unwrap_err();
        assert!(matches!(e, LookupError::Duplicate { .. }), "{e}");
    }
}
