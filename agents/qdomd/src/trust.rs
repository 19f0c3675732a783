//! What a definition from /var may do. The data partition is not
//! verified: whoever holds the disk can write it. So what comes from
//! there must not widen what dom0 trusts:
//!
//! - **kernels and ramdisks** dom0 hands a PV or PVH guest come from the
//!   image (`/usr/`); test images also take them from `/var/lib/qdomd/`
//!   (a VM built elsewhere). An HVM guest boots what its own disks hold:
//!   that is the VM's code, not a file dom0 chose;
//! - **disks and PCI devices** named on /var must be on the image's
//!   allow-list (`/etc/qdomd/allow.toml`, in the verified root): disk
//!   images are regular files under an allowed directory (never a block
//!   device, a link, or anything of dom0's), devices are listed by
//!   address. A missing or unreadable list allows nothing;
//! - **on a production image, an override** of a shipped definition may
//!   change only `memory_mib`, `vcpus`, `autostart`, `restart` and
//!   `qubes.qubesdb`.
//!
//! Whether the image is a production one is its image info's word; an
//! unreadable one counts as production (fail closed).

use std::path::Path;

use serde::Deserialize;

use crate::definition::{DefinitionError, Domain};

/// The image's allow-list.
pub const ALLOW_FILE: &str = "/etc/qdomd/allow.toml";
/// Where test images may keep VM kernels and ramdisks.
pub const VAR_BOOT_DIR: &str = "/var/lib/qdomd/";
/// What an override may change on a production image.
const SAFE_KEYS: [&str; 4] = ["memory_mib", "vcpus", "autostart", "restart"];
const SAFE_QUBES_KEYS: [&str; 1] = ["qubesdb"];

/// The image's allow-list for definitions from /var.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allow {
    /// Directories (absolute, ending in `/`) whose regular files may be a
    /// VM's disk images.
    #[serde(default)]
    pub disk_dirs: Vec<String>,
    /// PCI devices (`DDDD:BB:DD.F`) a VM may be given.
    #[serde(default)]
    pub pci: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    pub production: bool,
    pub allow: Allow,
}

impl Trust {
    /// The image's rules, from its image info and allow-list.
    pub fn for_image(info: &Path, allow: &Path) -> Trust {
        let production = match qcontract::ImageInfo::load(info) {
            Ok(i) => i.production,
            Err(e) => {
                log::error!(
                    "{}: treating the image as a production one",
                    qcontract::error_chain(&e)
                );
                true
            }
        };
        let allow = match std::fs::read_to_string(allow) {
            Ok(text) => match toml::from_str::<Allow>(&text) {
                Ok(a) => a,
                Err(e) => {
                    log::error!("{}: {e}; /var may name no disk or device", allow.display());
                    Allow::default()
                }
            },
            Err(e) => {
                log::warn!("{}: {e}; /var may name no disk or device", allow.display());
                Allow::default()
            }
        };
        Trust { production, allow }
    }

    fn boot_file_ok(&self, path: &str) -> bool {
        clean(path)
            && (path.starts_with("/usr/") || (!self.production && path.starts_with(VAR_BOOT_DIR)))
    }

    fn boot_rule(&self) -> &'static str {
        if self.production {
            "must be a file of the image (under /usr/)"
        } else {
            "must be under /usr/ or /var/lib/qdomd/"
        }
    }

    /// A loaded domain's kernel and ramdisk; `blame` is the file that
    /// set them.
    pub fn check_boot_files(&self, d: &Domain, blame: &Path) -> Result<(), DefinitionError> {
        for (f, value) in [("kernel", &d.kernel), ("ramdisk", &d.ramdisk)] {
            if let Some(v) = value {
                if !self.boot_file_ok(v) {
                    return Err(field(blame, f, format!("`{v}` {}", self.boot_rule())));
                }
            }
        }
        Ok(())
    }

    /// The keys an override of a shipped definition sets (production:
    /// the safe subset only). Text that does not parse is left to the
    /// parser's own error.
    pub fn check_override(&self, path: &Path, text: &str) -> Result<Over, DefinitionError> {
        let Ok(table) = text.parse::<toml::Table>() else {
            return Ok(Over::default());
        };
        let over = Over {
            disks: table.contains_key("disks"),
            pci: table.contains_key("pci"),
        };
        if !self.production {
            return Ok(over);
        }
        let why = "a production image lets /var change only memory_mib, vcpus, autostart, \
                   restart and qubes.qubesdb";
        for (k, v) in &table {
            if SAFE_KEYS.contains(&k.as_str()) {
                continue;
            }
            match (k.as_str(), v) {
                ("qubes", toml::Value::Table(q)) => {
                    if let Some(bad) = q.keys().find(|k| !SAFE_QUBES_KEYS.contains(&k.as_str())) {
                        return Err(field(path, &format!("qubes.{bad}"), why.into()));
                    }
                }
                _ => return Err(field(path, k, why.into())),
            }
        }
        Ok(over)
    }

    /// The disks and devices of what came from /var: `over` says which a
    /// local file set (a local-only definition sets all).
    pub fn check_local(&self, d: &Domain, path: &Path, over: Over) -> Result<(), DefinitionError> {
        if over.disks {
            for (i, disk) in d.disks.iter().enumerate() {
                self.check_disk(&disk.target)
                    .map_err(|reason| field(path, &format!("disks[{i}].target"), reason))?;
            }
        }
        if over.pci {
            for (i, dev) in d.pci.iter().enumerate() {
                if !self.allow.pci.contains(dev) {
                    return Err(field(
                        path,
                        &format!("pci[{i}]"),
                        format!("`{dev}` is not on the image's allow-list ({ALLOW_FILE})"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_disk(&self, target: &str) -> Result<(), String> {
        let allowed =
            clean(target)
                && self.allow.disk_dirs.iter().any(|d| {
                    d.starts_with('/') && d.ends_with('/') && target.starts_with(d.as_str())
                });
        if !allowed {
            return Err(format!(
                "`{target}` is not a file under a directory of the image's allow-list ({ALLOW_FILE})"
            ));
        }
        // It may not exist yet (xl then fails); if it does, it must be a
        // plain file, not a link to somewhere else or a device.
        match std::fs::symlink_metadata(target) {
            Ok(m) if !m.file_type().is_file() => Err(format!("`{target}` is not a regular file")),
            _ => Ok(()),
        }
    }
}

/// What a local file set of a definition: for [`Trust::check_local`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Over {
    pub disks: bool,
    pub pci: bool,
}

impl Over {
    /// A definition that comes from /var entirely.
    pub const ALL: Over = Over {
        disks: true,
        pci: true,
    };
}

fn clean(path: &str) -> bool {
    path.starts_with('/') && !path.split('/').any(|c| c == ".." || c == ".")
}

fn field(path: &Path, f: &str, reason: String) -> DefinitionError {
    DefinitionError::Field {
        path: path.to_owned(),
        field: f.to_owned(),
        reason,
    }
}
