//! Image profiles: the declarative description of what goes into a dom0 image.
//!
//! A profile is a TOML file under `image/profiles/`. It may `extends` another
//! profile of the same directory; tables merge key by key, lists are appended
//! (the child adds packages, files, overlays) and scalars are replaced. Paths
//! that point into the source tree are relative to the repository root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a profile could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile {path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("profile {path}: TOML syntax")]
    Syntax {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("profile {path}: {message}")]
    Schema { path: PathBuf, message: String },
    #[error("profile {path}: field `{field}`: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("profile {path}: unknown key `{field}`")]
    UnknownKey { path: PathBuf, field: String },
    #[error("profile {path}: `extends` chain is deeper than {max} (a cycle?)")]
    ExtendsTooDeep { path: PathBuf, max: usize },
}

/// A fully merged and validated profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Only meaningful in the file; resolved by [`load`].
    #[serde(default)]
    pub extends: Option<String>,
    pub image: ImageSection,
    pub debian: DebianSection,
    pub boot: BootSection,
    pub modules: ModulesSection,
    pub root: RootSection,
    pub disk: DiskSection,
    #[serde(default)]
    pub update: UpdateSection,
    /// Size limits; a root over them fails the build.
    #[serde(default)]
    pub budget: BudgetSection,
    /// The GUI VM stand-in's boot files, shipped in the dom0 root.
    #[serde(default)]
    pub guivm: Option<GuiVmSection>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSection {
    /// The root squashfs (xz) at most this big.
    pub root_compressed_mib: Option<u64>,
    /// The root's files together at most this big.
    pub root_uncompressed_mib: Option<u64>,
}

/// The GUI VM stand-in: the dom0 kernel again, and an initramfs whose only
/// program is a workspace binary as `/init` (and `/sbin/poweroff`, so Xen's
/// shutdown request works), with the kernel modules it loads itself (the
/// Xen devices vchan needs). qdomd's definition points at `dir`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuiVmSection {
    /// Workspace binary that is the guest's PID 1.
    pub agent: String,
    /// Absolute directory in the dom0 root for `vmlinuz` and `initrd.gz`.
    pub dir: String,
    /// Module list files (repository relative) whose modules go into the
    /// initramfs, listed in `qcontract::paths::GUEST_MODULES`.
    #[serde(default)]
    pub modules: Vec<PathBuf>,
    /// Files of the dom0 root copied into the guest initramfs at the same
    /// path (test images: busybox, for the commands qrexec runs there).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Symlinks in the guest initramfs: link → target.
    #[serde(default)]
    pub links: BTreeMap<String, String>,
    /// Repository files put into the guest initramfs: guest path →
    /// repository-relative source (test images: the qrexec services the
    /// scenarios call). A source with an execute bit is installed 0755,
    /// any other 0644.
    #[serde(default)]
    pub files: BTreeMap<String, PathBuf>,
}

/// Update trust and signing. Public keys go into the image; private keys
/// only sign bundles at build time and never enter an image. A production
/// profile names no key at all: it trusts the owner's keys, given at build
/// time (`qimage build --owner-keys`, [`crate::keys`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSection {
    /// Public key files (`qupdate keygen`), repository relative: test
    /// profiles only.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    /// Distinct trusted signatures a bundle needs.
    #[serde(default = "default_threshold")]
    pub threshold: usize,
    /// Private keys that sign this profile's bundle (test profiles keep a
    /// test key in the repository; release keys live elsewhere).
    #[serde(default)]
    pub signing_keys: Vec<PathBuf>,
    /// Anti-rollback epoch of this build.
    #[serde(default)]
    pub security_epoch: u64,
    /// How far above the installed floor (or the running image's epoch,
    /// if higher) a bundle's epoch may be. A jump past it is refused, so a
    /// stolen or careless key cannot pin the floor at `u64::MAX` and lock
    /// every later release out. Large enough to skip many releases.
    #[serde(default = "default_max_epoch_step")]
    pub max_epoch_step: u64,
}

impl Default for UpdateSection {
    fn default() -> Self {
        Self {
            trusted_keys: Vec::new(),
            threshold: default_threshold(),
            signing_keys: Vec::new(),
            security_epoch: 0,
            max_epoch_step: DEFAULT_MAX_EPOCH_STEP,
        }
    }
}

fn default_threshold() -> usize {
    1
}

/// [`UpdateSection::max_epoch_step`] unless a profile says otherwise.
pub use qcontract::DEFAULT_MAX_EPOCH_STEP;

fn default_max_epoch_step() -> u64 {
    DEFAULT_MAX_EPOCH_STEP
}

/// What every test image's compatible string ends in, and no production
/// image's does.
pub const TEST_COMPATIBLE_SUFFIX: &str = "-test";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// Profile name, also the output directory name.
    pub name: String,
    /// The image version printed in the ready marker.
    pub version: String,
    /// Product string an update bundle must carry to be installed.
    pub compatible: String,
    /// Production images carry no shell and no debug switches.
    #[serde(default)]
    pub production: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebianSection {
    pub suite: String,
    pub mirror: String,
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// The archive keyring apt checks the Release signatures against.
    pub keyring: PathBuf,
    /// Exact binary package names to fetch. Files are picked from these only.
    pub packages: Vec<String>,
}

fn default_components() -> Vec<String> {
    vec!["main".to_owned()]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSection {
    /// Package and path of the compressed Xen image.
    pub xen: PackageFile,
    /// The kernel metapackage (e.g. `linux-image-amd64`); resolved to the
    /// versioned image package it depends on.
    pub kernel_package: String,
    /// The package whose `/usr/lib/grub/x86_64-efi` modules make the EFI image.
    pub grub_package: String,
    /// File holding Xen's command line (one line), repository relative.
    pub xen_cmdline: PathBuf,
    /// dom0 kernel command line; qinit.slot is appended per slot.
    pub kernel_cmdline: String,
    /// GRUB modules built into the EFI image.
    pub grub_modules: Vec<String>,
    /// Seconds GRUB waits (0 in CI images).
    #[serde(default)]
    pub grub_timeout: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageFile {
    pub package: String,
    pub path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModulesSection {
    /// Module list files loaded by stage 1 (initramfs), repository relative.
    pub early: Vec<PathBuf>,
    /// Module list files loaded by stage 2 (the root).
    pub dom0: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootSection {
    /// Absolute paths of files taken from the fetched packages.
    pub files: Vec<String>,
    /// Symbolic links to create: link path -> target.
    #[serde(default)]
    pub links: BTreeMap<String, String>,
    /// Directories copied over the root (service definitions, config).
    #[serde(default)]
    pub overlays: Vec<PathBuf>,
    /// Workspace binaries installed in /usr/sbin.
    pub binaries: Vec<String>,
    /// Empty directories to create.
    #[serde(default)]
    pub dirs: Vec<String>,
    /// Image paths that a later source (an overlay of this profile) may
    /// replace, once each; every one must be replaced. Without it a second
    /// source for a path fails the build. For test releases that break a
    /// shipped service on purpose.
    #[serde(default)]
    pub replace: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    pub esp_mib: u64,
    pub boot_mib: u64,
    pub root_mib: u64,
    pub data_mib: u64,
}

const MAX_EXTENDS_DEPTH: usize = 4;

/// Loads `path`, resolving `extends` against the same directory.
pub fn load(path: &Path) -> Result<Profile, ProfileError> {
    let mut chain = Vec::new();
    let merged = load_merged(path, 0, &mut chain)?;
    let profile = Profile::deserialize(merged).map_err(|e| schema_error(path, &chain, &e))?;
    profile.validate(path)?;
    Ok(profile)
}

/// Parses a profile from text, for tests and fuzzing (no `extends`).
pub fn parse(path: &Path, text: &str) -> Result<Profile, ProfileError> {
    let table: toml::Table = text.parse().map_err(|source| ProfileError::Syntax {
        path: path.to_owned(),
        source,
    })?;
    let chain = vec![(path.to_owned(), table.clone())];
    let profile = Profile::deserialize(without_replace(toml::Value::Table(table)))
        .map_err(|e| schema_error(path, &chain, &e))?;
    profile.validate(path)?;
    Ok(profile)
}

/// serde names an unknown key but not the table it is in, nor (after
/// `extends` merged the files) the file; find both, child file first.
fn schema_error(
    path: &Path,
    chain: &[(PathBuf, toml::Table)],
    e: &toml::de::Error,
) -> ProfileError {
    let message = e.message().trim().to_owned();
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(key, _)| key);
    if let Some(key) = unknown {
        for (file, table) in chain {
            if let Some(field) = find_key(table, key, "") {
                return ProfileError::UnknownKey {
                    path: file.clone(),
                    field,
                };
            }
        }
    }
    ProfileError::Schema {
        path: path.to_owned(),
        message,
    }
}

/// The dotted path of the first table key named `key`, skipping tables
/// whose keys are data (`root.links` maps paths to targets).
fn find_key(table: &toml::Table, key: &str, prefix: &str) -> Option<String> {
    if ["root.links", "guivm.links", "guivm.files"].contains(&prefix) {
        return None;
    }
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    if table.contains_key(key) {
        return Some(join(key));
    }
    table.iter().find_map(|(k, v)| match v {
        toml::Value::Table(t) => find_key(t, key, &join(k)),
        _ => None,
    })
}

fn load_merged(
    path: &Path,
    depth: usize,
    chain: &mut Vec<(PathBuf, toml::Table)>,
) -> Result<toml::Value, ProfileError> {
    if depth > MAX_EXTENDS_DEPTH {
        return Err(ProfileError::ExtendsTooDeep {
            path: path.to_owned(),
            max: MAX_EXTENDS_DEPTH,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut table: toml::Table = text.parse().map_err(|source| ProfileError::Syntax {
        path: path.to_owned(),
        source,
    })?;
    let parent = table.remove("extends");
    chain.push((path.to_owned(), table.clone()));
    let Some(parent) = parent else {
        return Ok(toml::Value::Table(table));
    };
    // One parent, or several merged in order (a base and a mixin such as
    // the test tools), then this file over them.
    let names: Vec<&str> = match &parent {
        toml::Value::String(name) => vec![name.as_str()],
        toml::Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|v| v.as_str())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ProfileError::Invalid {
                path: path.to_owned(),
                field: "extends".into(),
                reason: "must be a profile name or a list of names".into(),
            })?,
        _ => {
            return Err(ProfileError::Invalid {
                path: path.to_owned(),
                field: "extends".into(),
                reason: "must be a profile name or a list of names".into(),
            })
        }
    };
    let mut base: Option<toml::Value> = None;
    for parent_name in names {
        if parent_name.contains('/') || parent_name.is_empty() {
            return Err(ProfileError::Invalid {
                path: path.to_owned(),
                field: "extends".into(),
                reason: format!("`{parent_name}` is not a profile name in the same directory"),
            });
        }
        let parent_path = path
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("{parent_name}.toml"));
        let loaded = load_merged(&parent_path, depth + 1, chain)?;
        match base.as_mut() {
            Some(b) => merge(b, loaded),
            None => base = Some(loaded),
        }
    }
    let mut base = base.unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
    merge(&mut base, toml::Value::Table(table));
    Ok(base)
}

/// Tables merge recursively, arrays append, everything else is replaced.
/// A list given as `{ override = [...] }` replaces the inherited list
/// instead of adding to it (a release profile dropping a key its parent
/// trusts, say). (Not `replace`: `[root]` has a field of that name.)
fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, without_replace(v));
                    }
                }
            }
        }
        (toml::Value::Array(b), toml::Value::Array(o)) => b.extend(o),
        // An override of a list lands here too: it becomes its list.
        (b, o) => *b = without_replace(o),
    }
}

/// The list of a `{ override = [...] }` table.
fn replacement(t: &toml::Table) -> Option<&Vec<toml::Value>> {
    match (t.len(), t.get(OVERRIDE)) {
        (1, Some(toml::Value::Array(list))) => Some(list),
        _ => None,
    }
}

/// The key of a list that replaces the one it inherits.
const OVERRIDE: &str = "override";

/// `v` with every `{ override = [...] }` turned into its list: over an
/// inherited list, or where there is nothing to replace (no parent, or a
/// new key).
fn without_replace(v: toml::Value) -> toml::Value {
    match v {
        toml::Value::Table(t) => match replacement(&t) {
            Some(list) => toml::Value::Array(list.clone()),
            None => toml::Value::Table(
                t.into_iter()
                    .map(|(k, v)| (k, without_replace(v)))
                    .collect(),
            ),
        },
        other => other,
    }
}

impl Profile {
    fn validate(&self, path: &Path) -> Result<(), ProfileError> {
        let invalid = |field: &str, reason: String| ProfileError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            reason,
        };
        // What the image info (qcontract) accepts, so a built image's
        // info always parses.
        let name_ok = qcontract::ImageInfo::valid_name;
        if !name_ok(&self.image.name) {
            return Err(invalid(
                "image.name",
                format!("`{}` must be non-empty [A-Za-z0-9._+-]", self.image.name),
            ));
        }
        if !name_ok(&self.image.version) {
            return Err(invalid(
                "image.version",
                format!("`{}` must be non-empty [A-Za-z0-9._+-]", self.image.version),
            ));
        }
        // qupdate orders versions of the same security epoch; one it
        // cannot order would be refused on the machine.
        if let Err(e) = qcontract::version::Version::parse(&self.image.version) {
            return Err(invalid("image.version", e.to_string()));
        }
        if !name_ok(&self.image.compatible) {
            return Err(invalid(
                "image.compatible",
                format!(
                    "`{}` must be non-empty [A-Za-z0-9._+-]",
                    self.image.compatible
                ),
            ));
        }
        // A test image's bundles must never install on a production one,
        // and the other way round: the two never share a compatible
        // string.
        let test_string = self.image.compatible.ends_with(TEST_COMPATIBLE_SUFFIX);
        if self.image.production == test_string {
            return Err(invalid(
                "image.compatible",
                if self.image.production {
                    format!(
                        "`{}` is a test image's (it ends in `{TEST_COMPATIBLE_SUFFIX}`), \
                         but the profile is production",
                        self.image.compatible
                    )
                } else {
                    format!(
                        "`{}` must end in `{TEST_COMPATIBLE_SUFFIX}` on a test profile \
                         (production = false), so its bundles never install on a \
                         production image",
                        self.image.compatible
                    )
                },
            ));
        }
        if self.update.max_epoch_step == 0 {
            return Err(invalid(
                "update.max_epoch_step",
                "0 would refuse every new security epoch".into(),
            ));
        }
        if self.debian.packages.is_empty() {
            return Err(invalid("debian.packages", "is empty".into()));
        }
        for (i, p) in self.debian.packages.iter().enumerate() {
            if !is_package_name(p) {
                return Err(invalid(
                    &format!("debian.packages[{i}]"),
                    format!("`{p}` is not a Debian package name"),
                ));
            }
        }
        if !is_package_name(&self.boot.kernel_package) {
            return Err(invalid(
                "boot.kernel_package",
                format!(
                    "`{}` is not a Debian package name",
                    self.boot.kernel_package
                ),
            ));
        }
        if !is_package_name(&self.boot.grub_package) {
            return Err(invalid(
                "boot.grub_package",
                format!("`{}` is not a Debian package name", self.boot.grub_package),
            ));
        }
        for (i, f) in self.root.files.iter().enumerate() {
            check_abs(f).map_err(|r| invalid(&format!("root.files[{i}]"), r))?;
        }
        for (i, d) in self.root.dirs.iter().enumerate() {
            check_abs(d).map_err(|r| invalid(&format!("root.dirs[{i}]"), r))?;
        }
        for link in self.root.links.keys() {
            check_abs(link).map_err(|r| invalid(&format!("root.links.\"{link}\""), r))?;
        }
        check_abs(&self.boot.xen.path).map_err(|r| invalid("boot.xen.path", r))?;
        for (i, b) in self.root.binaries.iter().enumerate() {
            if !name_ok(b) {
                return Err(invalid(
                    &format!("root.binaries[{i}]"),
                    format!("`{b}` is not a binary name"),
                ));
            }
        }
        if self.boot.kernel_cmdline.contains('\n') {
            return Err(invalid("boot.kernel_cmdline", "contains a newline".into()));
        }
        // GRUB appends qinit.slot per slot, and qinit refuses any qinit key
        // given twice: a profile that named one twice, or the slot at all,
        // would build an image that never boots.
        let mut seen = std::collections::BTreeSet::new();
        for word in self.boot.kernel_cmdline.split_whitespace() {
            let key = word.split_once('=').map_or(word, |(k, _)| k);
            if key == qcontract::cmdline::SLOT_KEY {
                return Err(invalid(
                    "boot.kernel_cmdline",
                    format!("`{key}` is the boot loader's to pass"),
                ));
            }
            if key.starts_with("qinit.") && !seen.insert(key) {
                return Err(invalid(
                    "boot.kernel_cmdline",
                    format!("`{key}` is given twice"),
                ));
            }
        }
        for (field, v) in [
            ("disk.esp_mib", self.disk.esp_mib),
            ("disk.boot_mib", self.disk.boot_mib),
            ("disk.root_mib", self.disk.root_mib),
            ("disk.data_mib", self.disk.data_mib),
        ] {
            if v == 0 || v > 64 * 1024 {
                return Err(invalid(field, format!("{v} is not in 1..=65536 MiB")));
            }
        }
        if !self.update.trusted_keys.is_empty()
            && (self.update.threshold == 0
                || self.update.threshold > self.update.trusted_keys.len())
        {
            return Err(invalid(
                "update.threshold",
                format!(
                    "{} is not in 1..={}",
                    self.update.threshold,
                    self.update.trusted_keys.len()
                ),
            ));
        }
        if self.disk.esp_mib < 33 {
            // FAT32 needs at least 65525 clusters; firmware is happiest with FAT32.
            return Err(invalid(
                "disk.esp_mib",
                format!("{} MiB is too small for FAT32 (min 33)", self.disk.esp_mib),
            ));
        }
        Ok(())
    }
}

fn is_package_name(p: &str) -> bool {
    p.len() >= 2
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
        && p.starts_with(|c: char| c.is_ascii_alphanumeric())
}

fn check_abs(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("`{p}` must be an absolute path"));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(format!("`{p}` must not contain `..`"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[image]
name = "t"
version = "1.0.0"
compatible = "dom0-x86_64-test"

[debian]
suite = "trixie"
mirror = "http://deb.debian.org/debian"
keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
packages = ["libc6", "xen-utils-4.20"]

[boot]
xen = { package = "xen-hypervisor-4.20-amd64", path = "/boot/xen-4.20-amd64.gz" }
kernel_package = "linux-image-amd64"
grub_package = "grub-efi-amd64-bin"
xen_cmdline = "xen/qemu.cmdline"
kernel_cmdline = "console=hvc0"
grub_modules = ["part_gpt"]

[modules]
early = ["kernel-config/early.list"]
dom0 = []

[root]
files = ["/usr/lib/xen-4.20/bin/xenstored"]
binaries = ["qinit"]

[disk]
esp_mib = 40
boot_mib = 64
root_mib = 128
data_mib = 64
"#;

    fn parse_str(s: &str) -> Result<Profile, ProfileError> {
        parse(Path::new("t.toml"), s)
    }

    #[test]
    fn good_profile_parses() {
        let p = parse_str(GOOD).unwrap();
        assert_eq!(p.image.name, "t");
        assert_eq!(p.debian.components, vec!["main"]);
        assert!(!p.image.production);
    }

    fn field_of(err: ProfileError) -> String {
        match err {
            ProfileError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn malformed_fields_are_named() {
        let cases = [
            ("name = \"t\"", "name = \"\"", "image.name"),
            ("version = \"1.0.0\"", "version = \"1 0\"", "image.version"),
            ("version = \"1.0.0\"", "version = \"1.0\"", "image.version"),
            (
                "packages = [\"libc6\", \"xen-utils-4.20\"]",
                "packages = [\"libc6\", \"Bad Name\"]",
                "debian.packages[1]",
            ),
            (
                "packages = [\"libc6\", \"xen-utils-4.20\"]",
                "packages = []",
                "debian.packages",
            ),
            (
                "files = [\"/usr/lib/xen-4.20/bin/xenstored\"]",
                "files = [\"usr/lib/x\"]",
                "root.files[0]",
            ),
            (
                "files = [\"/usr/lib/xen-4.20/bin/xenstored\"]",
                "files = [\"/usr/../etc/shadow\"]",
                "root.files[0]",
            ),
            (
                "kernel_cmdline = \"console=hvc0\"",
                "kernel_cmdline = \"console=hvc0 qinit.slot=A\"",
                "boot.kernel_cmdline",
            ),
            (
                "kernel_cmdline = \"console=hvc0\"",
                "kernel_cmdline = \"qinit.verify=lazy qinit.verify=full\"",
                "boot.kernel_cmdline",
            ),
            ("esp_mib = 40", "esp_mib = 8", "disk.esp_mib"),
            ("root_mib = 128", "root_mib = 0", "disk.root_mib"),
            (
                "binaries = [\"qinit\"]",
                "binaries = [\"../x\"]",
                "root.binaries[0]",
            ),
        ];
        for (from, to, field) in cases {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "case {field} did not change the text");
            assert_eq!(field_of(parse_str(&text).unwrap_err()), field, "{to}");
        }
    }

    #[test]
    fn unknown_key_names_file_table_and_key() {
        let text = GOOD.replace("[disk]", "[disk]\nswap_mib = 3");
        match parse_str(&text).unwrap_err() {
            ProfileError::UnknownKey { field, path } => {
                assert_eq!(field, "disk.swap_mib");
                assert_eq!(path, Path::new("t.toml"));
            }
            other => panic!("{other:?}"),
        }
        let text = GOOD.replace("[image]", "colour = \"red\"\n[image]");
        assert!(matches!(
            parse_str(&text).unwrap_err(),
            ProfileError::UnknownKey { field, .. } if field == "colour"
        ));
    }

    #[test]
    fn unknown_key_in_a_child_names_the_child_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.toml"), GOOD).unwrap();
        let child = dir.path().join("child.toml");
        std::fs::write(&child, "extends = \"base\"\n[boot.xen]\nsize = 1\n").unwrap();
        match load(&child).unwrap_err() {
            ProfileError::UnknownKey { field, path } => {
                assert_eq!(field, "boot.xen.size");
                assert_eq!(path, child);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err = parse_str(&GOOD.replace("esp_mib = 40", "esp_mib = = 40")).unwrap_err();
        assert!(matches!(err, ProfileError::Syntax { .. }), "{err:?}");
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            chain.contains("t.toml") && chain.contains("line"),
            "{chain}"
        );
    }

    #[test]
    fn missing_section_is_a_schema_error() {
        let text = &GOOD[..GOOD.find("[disk]").unwrap()];
        match parse_str(text).unwrap_err() {
            ProfileError::Schema { message, .. } => assert!(message.contains("disk"), "{message}"),
            other => panic!("{other:?}"),
        }
        // A misspelt section is an unknown key.
        let text = GOOD.replace("[disk]", "[disks]");
        assert!(matches!(
            parse_str(&text).unwrap_err(),
            ProfileError::UnknownKey { field, .. } if field == "disks"
        ));
    }

    #[test]
    fn syntax_error_is_reported() {
        assert!(matches!(
            parse_str("[image\nname=").unwrap_err(),
            ProfileError::Syntax { .. }
        ));
    }

    #[test]
    fn extends_appends_lists_and_replaces_scalars() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.toml"), GOOD).unwrap();
        std::fs::write(
            dir.path().join("child.toml"),
            "extends = \"base\"\n[image]\nname = \"child\"\n[debian]\npackages = [\"busybox-static\"]\n",
        )
        .unwrap();
        let p = load(&dir.path().join("child.toml")).unwrap();
        assert_eq!(p.image.name, "child");
        assert_eq!(p.image.version, "1.0.0");
        assert_eq!(
            p.debian.packages,
            vec!["libc6", "xen-utils-4.20", "busybox-static"]
        );
    }

    /// A release profile can drop what a parent lists (a key it trusts,
    /// say): `{ override = [...] }` replaces the inherited list.
    #[test]
    fn extends_can_replace_an_inherited_list() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("base.toml"),
            GOOD.replace(
                "[disk]",
                "[update]\ntrusted_keys = [\"image/keys/test.pub\"]\n[disk]",
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("child.toml"),
            "extends = \"base\"\n[image]\nname = \"child\"\n\
             [debian]\npackages = { override = [\"busybox-static\"] }\n\
             [update]\ntrusted_keys = { override = [] }\n",
        )
        .unwrap();
        let p = load(&dir.path().join("child.toml")).unwrap();
        assert_eq!(p.debian.packages, ["busybox-static"]);
        assert!(p.update.trusted_keys.is_empty());
        let base = load(&dir.path().join("base.toml")).unwrap();
        assert_eq!(
            base.update.trusted_keys,
            [PathBuf::from("image/keys/test.pub")]
        );
        // With nothing to replace, the form is just the list.
        let alone = parse_str(&GOOD.replace(
            "packages = [\"libc6\", \"xen-utils-4.20\"]",
            "packages = { override = [\"libc6\"] }",
        ))
        .unwrap();
        assert_eq!(alone.debian.packages, ["libc6"]);
    }

    /// Test and production images never share a compatible string.
    #[test]
    fn only_test_profiles_have_a_test_compatible_string() {
        let production = GOOD.replace("[image]", "[image]\nproduction = true");
        let e = parse_str(&production).unwrap_err().to_string();
        assert!(
            e.contains("a test image's") && e.contains("image.compatible"),
            "{e}"
        );
        parse_str(&production.replace("dom0-x86_64-test", "dom0-x86_64")).unwrap();
        let e = parse_str(&GOOD.replace("dom0-x86_64-test", "dom0-x86_64"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("must end in `-test`"), "{e}");
        let e = parse_str(&GOOD.replace("[disk]", "[update]\nmax_epoch_step = 0\n[disk]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("update.max_epoch_step"), "{e}");
    }

    #[test]
    fn extends_takes_a_list_merged_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.toml"), GOOD).unwrap();
        std::fs::write(
            dir.path().join("tools.toml"),
            "[debian]\npackages = [\"busybox-static\"]\n[root]\nfiles = [\"/usr/bin/busybox\"]\n",
        )
        .unwrap();
        let child = dir.path().join("child.toml");
        std::fs::write(
            &child,
            "extends = [\"base\", \"tools\"]\n[image]\nname = \"child\"\n",
        )
        .unwrap();
        let p = load(&child).unwrap();
        assert_eq!(p.image.name, "child");
        assert_eq!(
            p.debian.packages.last().map(String::as_str),
            Some("busybox-static")
        );
        assert!(p.root.files.iter().any(|f| f == "/usr/bin/busybox"));
        for bad in ["extends = []\n", "extends = [1]\n", "extends = 3\n"] {
            std::fs::write(&child, bad).unwrap();
            let e = load(&child).unwrap_err();
            assert!(e.to_string().contains("field `extends`"), "{e}");
        }
    }

    #[test]
    fn extends_cycle_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "extends = \"b\"\n").unwrap();
        std::fs::write(dir.path().join("b.toml"), "extends = \"a\"\n").unwrap();
        assert!(matches!(
            load(&dir.path().join("a.toml")).unwrap_err(),
            ProfileError::ExtendsTooDeep { .. }
        ));
    }

    #[test]
    fn extends_must_be_a_local_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "extends = \"../etc/x\"\n").unwrap();
        assert_eq!(
            field_of(load(&dir.path().join("a.toml")).unwrap_err()),
            "extends"
        );
    }
}
