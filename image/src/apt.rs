//! Fetching Debian packages through apt with a private configuration.
//!
//! The host's apt state is never touched: sources, lists, archives, the dpkg
//! status file and apt's configuration parts all live under the cache
//! directory, selected through `APT_CONFIG` (which apt reads *before* its
//! configuration directory, so the host's `apt.conf.d` is never consulted).
//! Release files are checked against the profile's archive keyring by apt
//! itself (`signed-by`); each `.deb`'s SHA-256 is checked again against the
//! signed index or the package lock before it is used, so a cached file
//! that rotted is caught. Which version to fetch is decided in
//! [`crate::lock`]; this module is its [`Archive`].

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::archive::{Archive, ArchiveError, FetchedPackage, PackageInfo};
use crate::profile::DebianSection;

/// apt with its whole state under `root`.
#[derive(Debug)]
pub struct PrivateApt {
    root: PathBuf,
    suite: String,
}

impl PrivateApt {
    /// Prepares the private apt tree for `debian` under `cache_root`.
    pub fn new(cache_root: &Path, debian: &DebianSection) -> Result<Self, ArchiveError> {
        let root = cache_root.join(format!("apt-{}", debian.suite));
        for dir in [
            "etc/apt.conf.d",
            "etc/sources.list.d",
            "etc/preferences.d",
            "etc/trusted.gpg.d",
            "state/lists/partial",
            "cache/archives/partial",
            "debs",
            "log",
        ] {
            let d = root.join(dir);
            fs::create_dir_all(&d).map_err(|source| ArchiveError::Io {
                path: d.clone(),
                op: "create directory",
                source,
            })?;
        }
        let sources = format!(
            "deb [signed-by={}] {} {} {}\n",
            debian.keyring.display(),
            debian.mirror,
            debian.suite,
            debian.components.join(" ")
        );
        write_if_changed(&root.join("etc/sources.list"), &sources)?;
        let r = root.display();
        let conf = format!(
            r#"Dir::Etc "{r}/etc/";
Dir::Etc::Parts "{r}/etc/apt.conf.d/";
Dir::Etc::Main "{r}/etc/apt.conf";
Dir::Etc::SourceList "{r}/etc/sources.list";
Dir::Etc::SourceParts "{r}/etc/sources.list.d/";
Dir::Etc::Preferences "{r}/etc/preferences";
Dir::Etc::PreferencesParts "{r}/etc/preferences.d/";
Dir::Etc::Trusted "{r}/etc/trusted.gpg";
Dir::Etc::TrustedParts "{r}/etc/trusted.gpg.d/";
Dir::State "{r}/state/";
Dir::State::status "{r}/state/status";
Dir::Cache "{r}/cache/";
Dir::Log "{r}/log/";
APT::Architecture "amd64";
APT::Architectures {{ "amd64"; }};
Acquire::Languages "none";
Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled "false";
Acquire::IndexTargets::deb::CNF::DefaultEnabled "false";
Acquire::Retries "3";
APT::Sandbox::User "root";
"#
        );
        write_if_changed(&root.join("apt.conf"), &conf)?;
        let status = root.join("state/status");
        if !status.exists() {
            fs::write(&status, "").map_err(|source| ArchiveError::Io {
                path: status.clone(),
                op: "create dpkg status",
                source,
            })?;
        }
        Ok(Self {
            root,
            suite: debian.suite.clone(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", self.root.join("apt.conf"))
            .env("LC_ALL", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(self.root.join("state/lists"))
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with("_InRelease"))
            })
            .unwrap_or(false)
    }

    /// Downloads the package lists unless they exist (or `refresh`).
    pub fn update(&self, refresh: bool) -> Result<(), ArchiveError> {
        if self.has_lists() && !refresh {
            log::info!("apt lists for {} are cached; not refreshing", self.suite);
            return Ok(());
        }
        log::info!("apt update ({})", self.suite);
        run(self.command("apt-get").args(["-q", "update"]))?;
        Ok(())
    }

    /// The signed index's stanza for `name` (or `name=version`); `None`
    /// when apt knows no such package or version.
    fn index_entry(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<PackageInfo>, ArchiveError> {
        let spec = match version {
            Some(v) => format!("{name}={v}"),
            None => name.to_owned(),
        };
        let mut cmd = self.command("apt-cache");
        cmd.args(["show", "--no-all-versions", &spec]);
        let text = match run(&mut cmd) {
            Ok(t) => t,
            // apt-cache says so on stderr and exits 100; anything else
            // (a broken list, a missing binary) is a real error.
            Err(ArchiveError::Command { stderr, .. }) if is_not_found(&stderr) => return Ok(None),
            Err(e) => return Err(e),
        };
        let stanza = parse_stanza(&text);
        if stanza.get("Package").map(String::as_str) != Some(name) {
            // apt-cache show also answers for virtual packages via providers.
            return Ok(None);
        }
        let get = |f: &'static str| {
            stanza.get(f).cloned().ok_or(ArchiveError::BadIndex {
                package: name.to_owned(),
                field: f,
            })
        };
        Ok(Some(PackageInfo {
            name: name.to_owned(),
            version: get("Version")?,
            sha256: get("SHA256")?,
            filename: get("Filename")?,
            depends: stanza.get("Depends").cloned().unwrap_or_default(),
        }))
    }

    fn debs_dir(&self) -> PathBuf {
        self.root.join("debs")
    }

    /// Unpacks a fetched package once into the cache and returns its tree.
    pub fn extract(&self, pkg: &FetchedPackage) -> Result<PathBuf, ArchiveError> {
        let dir = self.root.join("extract").join(format!(
            "{}_{}",
            pkg.info.name,
            pkg.info.version.replace(':', "%3a")
        ));
        let done = dir.with_extension("done");
        // The marker holds the hash of the .deb the tree came from, so a
        // tree from other bytes under the same version is not reused.
        if fs::read_to_string(&done).is_ok_and(|h| h == pkg.info.sha256) {
            return Ok(dir);
        }
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|source| ArchiveError::Io {
                path: dir.clone(),
                op: "remove partial extraction",
                source,
            })?;
        }
        fs::create_dir_all(&dir).map_err(|source| ArchiveError::Io {
            path: dir.clone(),
            op: "create directory",
            source,
        })?;
        run(Command::new("dpkg-deb").arg("-x").arg(&pkg.deb).arg(&dir))?;
        fs::write(&done, &pkg.info.sha256).map_err(|source| ArchiveError::Io {
            path: done.clone(),
            op: "write marker",
            source,
        })?;
        Ok(dir)
    }
}

impl Archive for PrivateApt {
    fn suite(&self) -> &str {
        &self.suite
    }

    fn lookup(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<PackageInfo>, ArchiveError> {
        self.index_entry(name, version)
    }

    fn refresh(&self) -> Result<(), ArchiveError> {
        self.update(true)
    }

    fn cached_path(&self, info: &PackageInfo) -> Result<PathBuf, ArchiveError> {
        Path::new(&info.filename)
            .file_name()
            .map(|f| self.debs_dir().join(f))
            .ok_or(ArchiveError::BadIndex {
                package: info.name.clone(),
                field: "Filename",
            })
    }

    /// `apt-get download` checks the file against the signed index itself;
    /// the caller checks it again against what it expects.
    fn download(&self, info: &PackageInfo) -> Result<(), ArchiveError> {
        let path = self.cached_path(info)?;
        let debs = self.debs_dir();
        let mut cmd = self.command("apt-get");
        cmd.current_dir(&debs)
            .args(["-q", "download", &format!("{}={}", info.name, info.version)]);
        run(&mut cmd)?;
        // apt-get download spells an epoch's colon as %3a, the pool file
        // name has no epoch at all.
        if !path.exists() {
            if let Some((epoch, ver)) = info.version.split_once(':') {
                let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
                let arch = file
                    .as_deref()
                    .and_then(|f| f.rsplit('_').next())
                    .unwrap_or("amd64.deb");
                let apt_name = debs.join(format!("{}_{epoch}%3a{ver}_{arch}", info.name));
                fs::rename(&apt_name, &path).map_err(|source| ArchiveError::Io {
                    path: apt_name.clone(),
                    op: "rename downloaded package",
                    source,
                })?;
            }
        }
        Ok(())
    }
}

fn is_not_found(stderr: &str) -> bool {
    [
        "No packages found",
        "Unable to locate package",
        "was not found",
    ]
    .iter()
    .any(|m| stderr.contains(m))
}

fn write_if_changed(path: &Path, content: &str) -> Result<(), ArchiveError> {
    if fs::read_to_string(path).ok().as_deref() == Some(content) {
        return Ok(());
    }
    fs::write(path, content).map_err(|source| ArchiveError::Io {
        path: path.to_owned(),
        op: "write",
        source,
    })
}

fn run(cmd: &mut Command) -> Result<String, ArchiveError> {
    let describe = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd.output().map_err(|source| ArchiveError::Io {
        path: PathBuf::from(cmd.get_program()),
        op: "spawn",
        source,
    })?;
    if !out.status.success() {
        return Err(ArchiveError::Command {
            command: describe,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parses the first RFC-822 stanza of apt-cache output; continuation lines
/// are joined to their field.
fn parse_stanza(text: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some(k) = &last {
                if let Some(v) = fields.get_mut(k) {
                    let v: &mut String = v;
                    v.push('\n');
                    v.push_str(line.trim());
                }
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            fields.insert(k.to_owned(), v.trim().to_owned());
            last = Some(k.to_owned());
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanza_parsing_takes_first_and_joins_continuations() {
        let text =
            "Package: a\nVersion: 1:2.0-1\nDescription: x\n more\nSHA256: ab\n\nPackage: b\n";
        let s = parse_stanza(text);
        assert_eq!(s["Package"], "a");
        assert_eq!(s["Version"], "1:2.0-1");
        assert_eq!(s["Description"], "x\nmore");
        assert_eq!(s["SHA256"], "ab");
    }
}
