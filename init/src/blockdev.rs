//! Finding partitions by their GPT name through sysfs, which the kernel
//! fills from the partition table (`PARTNAME=` in each uevent file).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("no partition named `{name}` appeared within {waited:?} (block devices seen: {seen})")]
    NotFound {
        name: String,
        waited: Duration,
        seen: String,
    },
    #[error("partition `{name}` is on both {first} and {second}; refusing to guess")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },
}

/// A block device as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name, e.g. `vda3`.
    pub kname: String,
    /// `major:minor`.
    pub dev: String,
    pub partname: Option<String>,
}

impl BlockDev {
    pub fn node(&self) -> PathBuf {
        Path::new("/dev").join(&self.kname)
    }
}

/// Parses one `uevent` file's contents.
pub fn parse_uevent(text: &str) -> BlockDev {
    let mut dev = BlockDev {
        kname: String::new(),
        dev: String::new(),
        partname: None,
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

/// Lists block devices under `sys_class_block` (normally /sys/class/block).
pub fn scan(sys_class_block: &Path) -> Vec<BlockDev> {
    let Ok(rd) = std::fs::read_dir(sys_class_block) else {
        return Vec::new();
    };
    let mut out: Vec<BlockDev> = rd
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("uevent")).ok())
        .map(|t| parse_uevent(&t))
        .filter(|d| !d.kname.is_empty())
        .collect();
    out.sort_by(|a, b| a.kname.cmp(&b.kname));
    out
}

/// Finds exactly one partition called `name`.
pub fn find(devs: &[BlockDev], name: &str) -> Result<Option<BlockDev>, BlockError> {
    let mut found: Option<&BlockDev> = None;
    for d in devs.iter().filter(|d| d.partname.as_deref() == Some(name)) {
        if let Some(first) = found {
            return Err(BlockError::Duplicate {
                name: name.to_owned(),
                first: first.kname.clone(),
                second: d.kname.clone(),
            });
        }
        found = Some(d);
    }
    Ok(found.cloned())
}

/// Waits until a partition called `name` shows up (disk drivers probe
/// asynchronously after their module loads).
pub fn wait_for(
    sys_class_block: &Path,
    name: &str,
    timeout: Duration,
) -> Result<BlockDev, BlockError> {
    let start = Instant::now();
    loop {
        let devs = scan(sys_class_block);
        if let Some(d) = find(&devs, name)? {
            return Ok(d);
        }
        if start.elapsed() >= timeout {
            return Err(BlockError::NotFound {
                name: name.to_owned(),
                waited: timeout,
                seen: devs
                    .iter()
                    .map(|d| match &d.partname {
                        Some(p) => format!("{}({p})", d.kname),
                        None => d.kname.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uevent_parsing() {
        let d = parse_uevent(
            "MAJOR=254\nMINOR=3\nDEVNAME=vda3\nDEVTYPE=partition\nPARTN=3\nPARTNAME=root_a\n",
        );
        assert_eq!(d.kname, "vda3");
        assert_eq!(d.dev, "254:3");
        assert_eq!(d.partname.as_deref(), Some("root_a"));
        assert_eq!(d.node(), Path::new("/dev/vda3"));
    }

    fn fake_sys(entries: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (k, part) in entries {
            let d = dir.path().join(k);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(
                d.join("uevent"),
                format!("MAJOR=254\nMINOR=1\nDEVNAME={k}\nPARTNAME={part}\n"),
            )
            .unwrap();
        }
        dir
    }

    #[test]
    fn finds_by_name_and_refuses_duplicates() {
        let sys = fake_sys(&[("vda2", "boot_a"), ("vda3", "root_a"), ("vdb3", "root_b")]);
        let d = wait_for(sys.path(), "root_a", Duration::from_millis(10)).unwrap();
        assert_eq!(d.kname, "vda3");
        let dup = fake_sys(&[("vda3", "root_a"), ("vdb3", "root_a")]);
        assert!(matches!(
            wait_for(dup.path(), "root_a", Duration::from_millis(10)).unwrap_err(),
            BlockError::Duplicate { .. }
        ));
        match wait_for(sys.path(), "data", Duration::from_millis(30)).unwrap_err() {
            BlockError::NotFound { seen, .. } => assert!(seen.contains("vda3(root_a)")),
            e => panic!("{e:?}"),
        }
    }
}
