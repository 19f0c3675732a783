//! Domain definitions: one TOML file per VM shipped in the image
//! (`/etc/qdomd/domains/<name>.toml`), with machine-local overrides on the
//! data partition (`/var/lib/qdomd/domains/<name>.toml`) merged key by key
//! over the shipped file. An override without a shipped file defines a
//! local domain. A file that fails to parse or validate is reported with
//! its path and field and skipped; the other domains still load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qbackoff::Backoff;
use serde::Deserialize;

use crate::trust::{Over, Trust};

/// Shipped definitions (read-only root).
pub const SHIPPED_DIR: &str = "/etc/qdomd/domains";
/// Machine-local overrides and additions (data partition).
pub const LOCAL_DIR: &str = "/var/lib/qdomd/domains";

/// Definition files larger than this are refused unread.
const MAX_FILE_LEN: u64 = 64 * 1024;
const MAX_MEMORY_MIB: u64 = 1 << 20;
const MAX_VCPUS: u32 = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DefinitionError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("{path}: field `{field}`: {reason}")]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    Pv,
    Pvh,
    Hvm,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pv => "pv",
            Self::Pvh => "pvh",
            Self::Hvm => "hvm",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The GUI VM: started at boot, kept alive, its readiness announced.
    Gui,
    /// No special role.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart on its own.
    Never,
    /// Restart when it goes away without qdomd stopping it. Xen's shutdown
    /// reason is gone once the domain is released, so a guest's own
    /// poweroff counts too: today this behaves as `Always`.
    OnFailure,
    /// Restart whenever it goes away, unless qdomd was asked to stop it.
    Always,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Block device or image file in dom0.
    pub target: String,
    /// Guest device name (xvda, xvdb, ...).
    pub vdev: String,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    #[serde(default = "default_policy")]
    pub policy: RestartPolicy,
    /// First delay before a restart; doubles up to `max_delay_ms`.
    #[serde(default = "default_initial_delay")]
    pub initial_delay_ms: u64,
    #[serde(default = "default_max_delay")]
    pub max_delay_ms: u64,
}

fn default_policy() -> RestartPolicy {
    RestartPolicy::OnFailure
}
fn default_initial_delay() -> u64 {
    1000
}
fn default_max_delay() -> u64 {
    60_000
}
fn default_vcpus() -> u32 {
    1
}
fn default_role() -> Role {
    Role::None
}

impl Default for Restart {
    fn default() -> Self {
        Self {
            policy: default_policy(),
            initial_delay_ms: default_initial_delay(),
            max_delay_ms: default_max_delay(),
        }
    }
}

impl Restart {
    /// The restart delays these settings give; a domain that stays up for
    /// the maximum delay earns a fresh start ([`Backoff::ran_for`]).
    pub fn backoff(&self) -> Backoff {
        Backoff::new(
            Duration::from_millis(self.initial_delay_ms),
            Duration::from_millis(self.max_delay_ms),
        )
    }
}

/// The Qubes class of a VM (`/type` in its QubesDB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmClass {
    AppVM,
    TemplateVM,
    StandaloneVM,
    DispVM,
}

impl VmClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AppVM => "AppVM",
            Self::TemplateVM => "TemplateVM",
            Self::StandaloneVM => "StandaloneVM",
            Self::DispVM => "DispVM",
        }
    }

    /// Whether its root persists (Qubes' `updateable`).
    pub fn updateable(self) -> bool {
        matches!(self, Self::TemplateVM | Self::StandaloneVM)
    }
}

/// What a VM is told about itself through QubesDB, and how the Admin API
/// shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QubesInfo {
    #[serde(default = "default_class")]
    pub class: VmClass,
    #[serde(default = "default_user")]
    pub default_user: String,
    /// The template it is based on, if any.
    pub template: Option<String>,
    #[serde(default = "default_label")]
    pub label: String,
    /// Entries of the definition's own, added to the standard ones.
    #[serde(default)]
    pub qubesdb: BTreeMap<String, String>,
    /// Its tags, for the policy's `@tag:` tokens.
    #[serde(default)]
    pub tags: std::collections::BTreeSet<String>,
}

fn default_class() -> VmClass {
    VmClass::AppVM
}
fn default_user() -> String {
    "user".into()
}
fn default_label() -> String {
    "red".into()
}

impl Default for QubesInfo {
    fn default() -> Self {
        Self {
            class: default_class(),
            default_user: default_user(),
            template: None,
            label: default_label(),
            qubesdb: BTreeMap::new(),
            tags: Default::default(),
        }
    }
}

/// One VM, validated.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    /// From the file name; a `name` key, if given, must agree.
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type")]
    pub kind: DomainType,
    pub kernel: Option<String>,
    pub ramdisk: Option<String>,
    pub cmdline: Option<String>,
    pub memory_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// PCI devices to pass through, as `DDDD:BB:DD.F`.
    #[serde(default)]
    pub pci: Vec<String>,
    #[serde(default = "default_role")]
    pub role: Role,
    #[serde(default)]
    pub autostart: bool,
    #[serde(default)]
    pub restart: Restart,
    #[serde(default)]
    pub qubes: QubesInfo,
}

/// Domain names are Qubes VM names: they reach QubesDB, qrexec and the
/// Admin API.
pub fn valid_name(s: &str) -> bool {
    qcontract::vm::valid_vm_name(s)
}

/// Text that goes into xl's configuration inside double quotes: no quotes,
/// backslashes, commas (xl's disk and PCI specs split on them) or control
/// characters.
fn safe_text(s: &str) -> bool {
    !s.chars()
        .any(|c| c.is_control() || c == '"' || c == '\\' || c == ',' || c == '\'')
}

fn valid_bdf(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
}

fn valid_vdev(s: &str) -> bool {
    let rest = s
        .strip_prefix("xvd")
        .or_else(|| s.strip_prefix("hd"))
        .or_else(|| s.strip_prefix("sd"));
    matches!(rest, Some(r) if !r.is_empty() && r.len() <= 2 && r.chars().all(|c| c.is_ascii_lowercase()))
}

impl Domain {
    fn validate(&mut self, path: &Path, name: &str) -> Result<(), DefinitionError> {
        let field = |f: &str, reason: String| DefinitionError::Field {
            path: path.to_owned(),
            field: f.to_owned(),
            reason,
        };
        if self.name.is_empty() {
            self.name = name.to_owned();
        } else if self.name != name {
            return Err(field(
                "name",
                format!("`{}` differs from the file name `{name}`", self.name),
            ));
        }
        for (f, value) in [("kernel", &self.kernel), ("ramdisk", &self.ramdisk)] {
            if let Some(v) = value {
                if !v.starts_with('/') || !safe_text(v) {
                    return Err(field(
                        f,
                        format!("`{v}` must be an absolute path without quotes, commas or control characters"),
                    ));
                }
            }
        }
        if let Some(c) = &self.cmdline {
            if c.chars()
                .any(|ch| ch.is_control() || ch == '"' || ch == '\\')
            {
                return Err(field(
                    "cmdline",
                    "must not hold quotes, backslashes or control characters".into(),
                ));
            }
        }
        match self.kind {
            DomainType::Pv | DomainType::Pvh if self.kernel.is_none() => {
                return Err(field(
                    "kernel",
                    format!("required for type = \"{}\"", self.kind.as_str()),
                ));
            }
            DomainType::Hvm if self.kernel.is_some() || self.ramdisk.is_some() => {
                return Err(field(
                    if self.kernel.is_some() {
                        "kernel"
                    } else {
                        "ramdisk"
                    },
                    "not used with type = \"hvm\" (it boots from its disks)".into(),
                ));
            }
            DomainType::Hvm if self.disks.is_empty() => {
                return Err(field(
                    "disks",
                    "type = \"hvm\" needs a disk to boot from".into(),
                ));
            }
            _ => {}
        }
        if self.ramdisk.is_some() && self.kernel.is_none() {
            return Err(field("ramdisk", "needs a kernel".into()));
        }
        if !(32..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(field(
                "memory_mib",
                format!("{} is outside 32..={MAX_MEMORY_MIB}", self.memory_mib),
            ));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(field(
                "vcpus",
                format!("{} is outside 1..={MAX_VCPUS}", self.vcpus),
            ));
        }
        let mut vdevs = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            if !d.target.starts_with('/') || !safe_text(&d.target) {
                return Err(field(
                    &format!("disks[{i}].target"),
                    format!("`{}` must be an absolute path without quotes, commas or control characters", d.target),
                ));
            }
            if !valid_vdev(&d.vdev) {
                return Err(field(
                    &format!("disks[{i}].vdev"),
                    format!("`{}` is not a device name like xvda", d.vdev),
                ));
            }
            if vdevs.contains(&&d.vdev) {
                return Err(field(
                    &format!("disks[{i}].vdev"),
                    format!("`{}` is used twice", d.vdev),
                ));
            }
            vdevs.push(&d.vdev);
        }
        for (i, p) in self.pci.iter().enumerate() {
            if !valid_bdf(p) {
                return Err(field(
                    &format!("pci[{i}]"),
                    format!("`{p}` is not a PCI address like 0000:00:02.0"),
                ));
            }
        }
        self.validate_qubes(path)?;
        let r = &self.restart;
        if r.initial_delay_ms == 0 || r.initial_delay_ms > r.max_delay_ms {
            return Err(field(
                "restart.initial_delay_ms",
                format!(
                    "{} must be at least 1 and at most restart.max_delay_ms ({})",
                    r.initial_delay_ms, r.max_delay_ms
                ),
            ));
        }
        if r.max_delay_ms > 3_600_000 {
            return Err(field(
                "restart.max_delay_ms",
                format!("{} is more than an hour", r.max_delay_ms),
            ));
        }
        Ok(())
    }
}

impl Domain {
    fn validate_qubes(&self, path: &Path) -> Result<(), DefinitionError> {
        let field = |f: &str, reason: String| DefinitionError::Field {
            path: path.to_owned(),
            field: format!("qubes.{f}"),
            reason,
        };
        let q = &self.qubes;
        if !valid_user(&q.default_user) {
            return Err(field(
                "default_user",
                format!(
                    "`{}` is not a user name ([a-z_][a-z0-9_-]*, at most 32)",
                    q.default_user
                ),
            ));
        }
        if let Some(t) = &q.template {
            if !qcontract::vm::valid_vm_name(t) {
                return Err(field("template", format!("`{t}` is not a Qubes VM name")));
            }
        }
        if q.label.is_empty()
            || q.label.len() > 32
            || !q.label.chars().all(|c| c.is_ascii_lowercase())
        {
            return Err(field(
                "label",
                format!("`{}` is not a label name like red", q.label),
            ));
        }
        // Qubes' tag rule (`qubes/tags.py`): the policy's `@tag:` reads
        // them, so nothing else may pass.
        for t in &q.tags {
            if t.is_empty()
                || t.len() > 64
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
            {
                return Err(field(
                    "tags",
                    format!("`{t}` is not a tag ([A-Za-z0-9_-]+)"),
                ));
            }
        }
        for (key, value) in &q.qubesdb {
            let f = format!("qubesdb.{key:?}");
            crate::qdb::check_extra(key, value).map_err(|reason| field(&f, reason))?;
        }
        Ok(())
    }
}

/// A Unix user name as Debian's `adduser` accepts it by default.
fn valid_user(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_lowercase() || f == '_')
        && c.all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || x == '_' || x == '-')
        && s.len() <= 32
}

fn syntax(path: &Path, e: &dyn std::fmt::Display) -> DefinitionError {
    DefinitionError::Syntax {
        path: path.to_owned(),
        reason: e.to_string().trim().replace('\n', " "),
    }
}

fn name_of(path: &Path) -> Result<String, DefinitionError> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if valid_name(&name) {
        Ok(name)
    } else {
        Err(DefinitionError::File {
            path: path.to_owned(),
            reason: format!(
                "`{name}` is not a Qubes VM name (a letter, then [A-Za-z0-9._-], at most 31)"
            ),
        })
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Parses a definition, with an optional override (path and text) merged
/// over it. Errors name the file that holds the bad field: the override if
/// it set the field, the shipped file otherwise.
pub fn parse(
    path: &Path,
    text: &str,
    local: Option<(&Path, &str)>,
) -> Result<Domain, DefinitionError> {
    let name = name_of(path)?;
    let mut table: toml::Table = text.parse().map_err(|e| syntax(path, &e))?;
    let mut blame = path;
    if let Some((lpath, ltext)) = local {
        let over: toml::Table = ltext.parse().map_err(|e| syntax(lpath, &e))?;
        blame = lpath;
        merge(&mut table, over);
    }
    let mut d: Domain = toml::Value::Table(table)
        .try_into()
        .map_err(|e| syntax(blame, &e))?;
    d.validate(blame, &name)?;
    Ok(d)
}

/// A definition file's text: a regular file (not a link, FIFO or
/// device, opened without blocking and without following a link), of at
/// most [`MAX_FILE_LEN`] bytes however it grows while read.
fn read_limited(path: &Path) -> Result<String, DefinitionError> {
    use rustix::fs::{Mode, OFlags};
    use std::io::Read;
    let err = |reason: String| DefinitionError::File {
        path: path.to_owned(),
        reason,
    };
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = rustix::fs::open(path, flags, Mode::empty()).map_err(|e| err(e.to_string()))?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(err("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(err(format!("over {MAX_FILE_LEN} bytes")));
    }
    String::from_utf8(bytes).map_err(|_| err("not UTF-8".into()))
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

/// Every domain of `shipped` and `local`, and the errors of those that did
/// not load.
#[derive(Debug, Default)]
pub struct DomainSet {
    pub domains: BTreeMap<String, Domain>,
    pub errors: Vec<DefinitionError>,
}

/// Loads every definition; what comes from /var is held to `trust`'s
/// rules ([`crate::trust`]), and one that breaks them is refused like a
/// malformed one.
pub fn load(shipped: &Path, local: &Path, trust: &Trust) -> DomainSet {
    let mut set = DomainSet::default();
    let locals = toml_files(local);
    let local_of = |name: &std::ffi::OsStr| locals.iter().find(|p| p.file_name() == Some(name));
    let shipped_files = toml_files(shipped);
    let mut seen = Vec::new();
    for path in &shipped_files {
        let Some(fname) = path.file_name() else {
            continue;
        };
        seen.push(fname.to_owned());
        let shipped_only = |text: &str| {
            parse(path, text, None).and_then(|d| {
                trust.check_boot_files(&d, path)?;
                Ok(d)
            })
        };
        let result = read_limited(path).and_then(|text| match local_of(fname) {
            Some(lp) => {
                let with_override = read_limited(lp).and_then(|ltext| {
                    let over = trust.check_override(lp, &ltext)?;
                    let d = parse(path, &text, Some((lp, &ltext)))?;
                    trust.check_boot_files(&d, lp)?;
                    trust.check_local(&d, lp, over)?;
                    Ok(d)
                });
                match with_override {
                    Ok(d) => Ok(d),
                    // A refused override leaves the image's definition
                    // standing: /var can take a change away, not the VM.
                    Err(e) => {
                        set.errors.push(e);
                        let d = shipped_only(&text)?;
                        log::warn!(
                            "{}: refused; {} runs as the image defines it",
                            lp.display(),
                            d.name
                        );
                        Ok(d)
                    }
                }
            }
            None => shipped_only(&text),
        });
        match result {
            Ok(d) => {
                set.domains.insert(d.name.clone(), d);
            }
            Err(e) => set.errors.push(e),
        }
    }
    for lp in &locals {
        if lp.file_name().is_some_and(|f| seen.iter().any(|s| s == f)) {
            continue;
        }
        match read_limited(lp)
            .and_then(|t| parse(lp, &t, None))
            .and_then(|d| {
                trust.check_boot_files(&d, lp)?;
                trust.check_local(&d, lp, Over::ALL)?;
                Ok(d)
            }) {
            Ok(d) => {
                set.domains.insert(d.name.clone(), d);
            }
            Err(e) => set.errors.push(e),
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::Allow;

    fn trust(production: bool) -> Trust {
        Trust {
            production,
            allow: Allow {
                disk_dirs: vec!["/var/lib/qdomd/vms/".into()],
                pci: vec!["0000:00:02.0".into()],
            },
        }
    }

    const GOOD: &str = r#"
type = "pv"
kernel = "/usr/lib/qdomd/guivm/vmlinuz"
ramdisk = "/usr/lib/qdomd/guivm/initrd.gz"
cmdline = "console=hvc0"
memory_mib = 256
role = "gui"
autostart = true
[restart]
policy = "always"
"#;

    fn shipped() -> PathBuf {
        PathBuf::from("/etc/qdomd/domains/gui.toml")
    }

    #[test]
    fn a_good_definition_with_defaults() {
        let d = parse(&shipped(), GOOD, None).unwrap();
        assert_eq!(d.name, "gui");
        assert_eq!((d.kind, d.vcpus, d.role), (DomainType::Pv, 1, Role::Gui));
        assert_eq!(d.restart.policy, RestartPolicy::Always);
        assert_eq!(
            (d.restart.initial_delay_ms, d.restart.max_delay_ms),
            (1000, 60_000)
        );
    }

    /// Each malformed field: the error names the file and the field.
    #[test]
    fn each_bad_field_is_named() {
        let cases: &[(&str, &str, &str)] = &[
            ("type = \"pv\"\nmemory_mib = 256\n", "kernel", "required"),
            ("type = \"xen\"\nmemory_mib = 256\n", "type", "unknown variant"),
            (&GOOD.replace("memory_mib = 256", "memory_mib = 8"), "memory_mib", "outside"),
            (&GOOD.replace("memory_mib = 256", "memory_mib = \"lots\""), "memory_mib", "invalid type"),
            (&GOOD.replace("memory_mib = 256\n", ""), "memory_mib", "missing field"),
            (&format!("{GOOD}\n"), "", ""),
            (&GOOD.replace("role = \"gui\"", "vcpus = 0"), "vcpus", "outside"),
            (&GOOD.replace("/usr/lib/qdomd/guivm/vmlinuz", "vmlinuz"), "kernel", "absolute"),
            (&GOOD.replace("/usr/lib/qdomd/guivm/initrd.gz", "/a\\\",b"), "ramdisk", "quotes"),
            (&GOOD.replace("console=hvc0", "a\\\"b"), "cmdline", "quotes"),
            (&GOOD.replace("role = \"gui\"", "role = \"admin\""), "role", "unknown variant"),
            (&GOOD.replace("autostart = true", "colour = \"blue\""), "colour", "unknown field"),
            (&GOOD.replace("role = \"gui\"", "name = \"other\""), "name", "differs"),
            (&GOOD.replace("role = \"gui\"", "pci = [\"00:02.0\"]"), "pci[0]", "PCI address"),
            (&GOOD.replace("role = \"gui\"", "disks = [{ target = \"/dev/x\", vdev = \"vda\" }]"), "disks[0].vdev", "device name"),
            (&GOOD.replace("role = \"gui\"", "disks = [{ target = \"x\", vdev = \"xvda\" }]"), "disks[0].target", "absolute"),
            (&GOOD.replace("role = \"gui\"", "disks = [{ target = \"/a\", vdev = \"xvda\" }, { target = \"/b\", vdev = \"xvda\" }]"), "disks[1].vdev", "twice"),
            (&GOOD.replace("policy = \"always\"", "policy = \"sometimes\""), "policy", "unknown variant"),
            (&GOOD.replace("policy = \"always\"", "initial_delay_ms = 0"), "restart.initial_delay_ms", "at least 1"),
            (&GOOD.replace("policy = \"always\"", "max_delay_ms = 99999999"), "restart.max_delay_ms", "more than an hour"),
            (&GOOD.replace("policy = \"always\"", "max_delay_ms = 10"), "restart.initial_delay_ms", "at most"),
            ("type = \"hvm\"\nmemory_mib = 512\n", "disks", "needs a disk"),
            ("type = \"hvm\"\nmemory_mib = 512\nkernel = \"/k\"\n", "kernel", "not used"),
            ("type = \"pv\"\nmemory_mib = 256\nkernel = \"/k\"\nmemory_mib = 3\n", "memory_mib", "duplicate"),
            ("type = \"pv\"\n[[[", "", "invalid"),
        ];
        for (text, field, reason) in cases {
            let r = parse(&shipped(), text, None);
            if field.is_empty() && reason.is_empty() {
                assert!(r.is_ok(), "{text}: {r:?}");
                continue;
            }
            let e = r.unwrap_err().to_string();
            assert!(e.starts_with("/etc/qdomd/domains/gui.toml"), "{e}");
            assert!(
                e.contains(field) && e.contains(reason),
                "{field}/{reason}: {e}"
            );
        }
        let e = parse(Path::new("/etc/qdomd/domains/bad name.toml"), GOOD, None).unwrap_err();
        assert!(e.to_string().contains("not a Qubes VM name"), "{e}");
    }

    #[test]
    fn a_local_override_merges_key_by_key_and_takes_the_blame() {
        let local = PathBuf::from("/var/lib/qdomd/domains/gui.toml");
        let d = parse(
            &shipped(),
            GOOD,
            Some((
                &local,
                "memory_mib = 1024\npci = [\"0000:01:00.0\"]\n[restart]\nmax_delay_ms = 5000\n",
            )),
        )
        .unwrap();
        assert_eq!(d.memory_mib, 1024);
        assert_eq!(d.pci, vec!["0000:01:00.0".to_owned()]);
        // The rest of [restart] stays as shipped.
        assert_eq!(
            (d.restart.policy, d.restart.max_delay_ms),
            (RestartPolicy::Always, 5000)
        );
        assert_eq!(d.kernel.as_deref(), Some("/usr/lib/qdomd/guivm/vmlinuz"));

        let e = parse(&shipped(), GOOD, Some((&local, "vcpus = 500\n"))).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/var/lib/qdomd/domains/gui.toml: field `vcpus`"),
            "{e}"
        );
        let e = parse(&shipped(), GOOD, Some((&local, "vcpus = [\n"))).unwrap_err();
        assert!(
            e.to_string().starts_with("/var/lib/qdomd/domains/gui.toml"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_file_does_not_stop_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (etc, var) = (dir.path().join("etc"), dir.path().join("var"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&var).unwrap();
        std::fs::write(etc.join("gui.toml"), GOOD).unwrap();
        std::fs::write(etc.join("broken.toml"), "type = \"pv\"\n").unwrap();
        std::fs::write(etc.join("notes.txt"), "not a definition").unwrap();
        std::fs::write(var.join("gui.toml"), "vcpus = 2\n").unwrap();
        std::fs::write(
            var.join("local.toml"),
            "type = \"pvh\"\nkernel = \"/usr/k\"\nmemory_mib = 64\n",
        )
        .unwrap();
        std::fs::write(etc.join("huge.toml"), "#".repeat(70_000)).unwrap();
        let set = load(&etc, &var, &trust(true));
        let names: Vec<&String> = set.domains.keys().collect();
        assert_eq!(names, ["gui", "local"]);
        assert_eq!(set.domains["gui"].vcpus, 2);
        assert_eq!(set.errors.len(), 2, "{:?}", set.errors);
        assert!(
            set.errors[0]
                .to_string()
                .contains("broken.toml: missing field `memory_mib`"),
            "{:?}",
            set.errors
        );
        assert!(
            set.errors[1].to_string().contains("huge.toml"),
            "{:?}",
            set.errors
        );
    }

    /// Kernels from /var only on test images; nothing outside /usr and
    /// /var/lib/qdomd, and no `..`, anywhere.
    #[test]
    fn boot_files_from_var_only_on_test_images() {
        let dir = tempfile::tempdir().unwrap();
        let (etc, var) = (dir.path().join("etc"), dir.path().join("var"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&var).unwrap();
        let def = |kernel: &str| {
            format!(
                "type = \"pv\"\nkernel = \"{kernel}\"\nramdisk = \"/usr/lib/r\"\nmemory_mib = 64\n"
            )
        };
        std::fs::write(
            var.join("qubes.toml"),
            def("/var/lib/qdomd/vms/qubes/vmlinuz"),
        )
        .unwrap();
        std::fs::write(var.join("tmp.toml"), def("/tmp/vmlinuz")).unwrap();
        std::fs::write(var.join("dots.toml"), def("/usr/../var/lib/x")).unwrap();
        let test = load(&etc, &var, &trust(false));
        assert_eq!(test.domains.keys().collect::<Vec<_>>(), ["qubes"]);
        assert_eq!(test.errors.len(), 2, "{:?}", test.errors);
        let prod = load(&etc, &var, &trust(true));
        assert!(!prod.domains.contains_key("qubes"));
        let e = prod
            .errors
            .iter()
            .map(ToString::to_string)
            .find(|e| e.contains("qubes.toml"))
            .unwrap();
        assert!(
            e.contains("field `kernel`") && e.contains("must be a file of the image"),
            "{e}"
        );
        // An unreadable image info means production, and a missing
        // allow-list allows nothing.
        assert_eq!(
            Trust::for_image(&dir.path().join("missing"), &dir.path().join("none")),
            Trust {
                production: true,
                allow: Default::default()
            }
        );
    }

    /// On a production image an override changes only the safe subset;
    /// disks and devices from /var must be on the image's allow-list;
    /// files that are not regular are refused unread.
    #[test]
    fn var_cannot_widen_what_dom0_trusts() {
        let dir = tempfile::tempdir().unwrap();
        let (etc, var) = (dir.path().join("etc"), dir.path().join("var"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&var).unwrap();
        std::fs::write(etc.join("gui.toml"), GOOD).unwrap();
        std::fs::write(
            var.join("gui.toml"),
            "memory_mib = 512\nvcpus = 2\n[qubes.qubesdb]\n\"/x\" = \"1\"\n",
        )
        .unwrap();
        let ok = load(&etc, &var, &trust(true));
        assert_eq!(ok.domains["gui"].memory_mib, 512, "{:?}", ok.errors);
        for (over, field) in [
            ("kernel = \"/usr/lib/other\"\n", "kernel"),
            ("[qubes]\nlabel = \"black\"\n", "qubes.label"),
            ("pci = [\"0000:00:02.0\"]\n", "pci"),
        ] {
            std::fs::write(var.join("gui.toml"), over).unwrap();
            let prod = load(&etc, &var, &trust(true));
            // The override is refused; the image's definition stands.
            assert_eq!(prod.domains["gui"].memory_mib, 256, "{over}");
            let e = prod.errors[0].to_string();
            assert!(
                e.contains(&format!("field `{field}`")) && e.contains("production"),
                "{e}"
            );
            // A test image takes the same override.
            assert!(load(&etc, &var, &trust(false)).errors.is_empty(), "{over}");
        }
        std::fs::remove_file(var.join("gui.toml")).unwrap();
        let local = |disk: &str, pci: &str| {
            format!(
                "type = \"hvm\"\nmemory_mib = 64\npci = [{pci}]\n\
                 [[disks]]\ntarget = \"{disk}\"\nvdev = \"xvda\"\n"
            )
        };
        std::fs::write(var.join("vm.toml"), local("/var/lib/qdomd/vms/vm.img", "")).unwrap();
        assert!(load(&etc, &var, &trust(true)).errors.is_empty());
        for (text, field) in [
            (local("/dev/vda", ""), "disks[0].target"),
            (local("/var/lib/qdomd/vms/../../x", ""), "disks[0].target"),
            (
                local("/var/lib/qdomd/vms/vm.img", "\"0000:01:00.0\""),
                "pci[0]",
            ),
        ] {
            std::fs::write(var.join("vm.toml"), &text).unwrap();
            let set = load(&etc, &var, &trust(false));
            assert!(
                set.errors[0]
                    .to_string()
                    .contains(&format!("field `{field}`")),
                "{:?}",
                set.errors
            );
        }
        std::fs::remove_file(var.join("vm.toml")).unwrap();
        // A link to a device, and a FIFO: refused, and nothing hangs.
        std::os::unix::fs::symlink("/dev/zero", var.join("zero.toml")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            var.join("fifo.toml"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let set = load(&etc, &var, &trust(false));
        assert_eq!(set.errors.len(), 2, "{:?}", set.errors);
        assert!(set.domains.contains_key("gui"));
    }
}
