//! Service definitions: one TOML file per service under
//! /etc/qinit/services, the file stem is the service name.
//!
//! A broken file fails only its own service (and whatever requires it),
//! never the whole boot; every error names the file and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rustix::thread::CapabilitySet;
use serde::Deserialize;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ServiceError {
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: field `{field}`: {reason}")]
    Field {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("{path}: `{field}` names `{dependency}`, which has no service file")]
    UnknownDependency {
        path: PathBuf,
        field: &'static str,
        dependency: String,
    },
    #[error("{path}: part of a dependency cycle through {cycle}")]
    Cycle { path: PathBuf, cycle: String },
    #[error("{path}: requires `{dependency}`, which is broken")]
    BrokenDependency { path: PathBuf, dependency: String },
}

/// When a service counts as up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Readiness {
    /// As soon as it is spawned.
    Started,
    /// A oneshot: when it exits with status 0.
    Exit,
    /// When it sends `READY=1` to `$NOTIFY_SOCKET` (sd_notify).
    Notify,
    /// When `ready_path` exists.
    Path,
    /// When the xenstore key `ready_key` exists.
    Xenstore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Never,
    OnFailure,
    Always,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    #[serde(default)]
    description: String,
    exec: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    requires: Vec<String>,
    ready: Readiness,
    #[serde(default)]
    ready_path: Option<String>,
    #[serde(default = "default_ready_timeout")]
    ready_timeout_ms: u64,
    #[serde(default = "default_restart")]
    restart: RestartPolicy,
    #[serde(default)]
    boot_critical: bool,
    #[serde(default)]
    ready_key: Option<String>,
    #[serde(default)]
    tty: Option<String>,
    #[serde(default = "default_stop_signal")]
    stop_signal: String,
    #[serde(default = "default_stop_timeout")]
    stop_timeout_ms: u64,
    #[serde(default)]
    user: Option<u32>,
    #[serde(default)]
    group: Option<u32>,
    /// Capabilities kept; `None` keeps root's full set.
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    no_new_privs: bool,
    #[serde(default = "default_true")]
    new_session: bool,
    #[serde(default)]
    cgroup: bool,
    #[serde(default)]
    boot_complete: bool,
}

fn default_stop_signal() -> String {
    "SIGTERM".into()
}

fn default_stop_timeout() -> u64 {
    5_000
}

fn default_true() -> bool {
    true
}

fn default_ready_timeout() -> u64 {
    30_000
}

fn default_restart() -> RestartPolicy {
    RestartPolicy::Never
}

/// A validated service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub path: PathBuf,
    pub description: String,
    pub exec: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Started only after these are ready (`after` ∪ `requires`).
    pub after: Vec<String>,
    /// Fails when one of these fails.
    pub requires: Vec<String>,
    pub ready: Readiness,
    pub ready_path: Option<PathBuf>,
    pub ready_timeout_ms: u64,
    pub restart: RestartPolicy,
    pub boot_critical: bool,
    pub tty: Option<PathBuf>,
    pub ready_key: Option<String>,
    pub stop_signal: nix::sys::signal::Signal,
    pub stop_timeout_ms: u64,
    pub hardening: Hardening,
    /// A boot-complete hook: starts only once every boot-critical service
    /// is ready (the health gate), e.g. the updater's mark-good.
    pub boot_complete: bool,
}

/// Optional confinement applied in the child before exec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hardening {
    pub user: Option<u32>,
    pub group: Option<u32>,
    /// Capabilities to keep; `None` keeps everything.
    pub capabilities: Option<CapabilitySet>,
    pub no_new_privs: bool,
    pub new_session: bool,
    /// Run in its own cgroup v2 (`/sys/fs/cgroup/qinit/<name>`), so stopping
    /// it can kill everything it forked.
    pub cgroup: bool,
}

/// A capability by its `<linux/capability.h>` name, with or without
/// `CAP_`, in any case. rustix's `CapabilitySet` holds the names.
fn parse_capability(name: &str) -> Option<CapabilitySet> {
    let upper = name.to_ascii_uppercase();
    CapabilitySet::from_name(upper.strip_prefix("CAP_").unwrap_or(&upper))
}

fn valid_xenstore_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() <= 3072
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_-@.".contains(c))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Parses one service file's text.
pub fn parse(path: &Path, text: &str) -> Result<Service, ServiceError> {
    let field = |field: &'static str, reason: String| ServiceError::Field {
        path: path.to_owned(),
        field,
        reason,
    };
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !valid_name(&name) {
        return Err(ServiceError::Parse {
            path: path.to_owned(),
            reason: format!("`{name}` is not a valid service name"),
        });
    }
    let f: ServiceFile = toml::from_str(text).map_err(|e| ServiceError::Parse {
        path: path.to_owned(),
        reason: e.to_string().trim().replace('\n', " "),
    })?;
    match f.exec.first() {
        None => return Err(field("exec", "is empty".into())),
        Some(p) if !p.starts_with('/') => {
            return Err(field("exec", format!("`{p}` must be an absolute path")))
        }
        _ => {}
    }
    for k in f.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(field("env", format!("`{k}` is not a variable name")));
        }
    }
    for (fname, list) in [("after", &f.after), ("requires", &f.requires)] {
        for d in list {
            if !valid_name(d) {
                return Err(field(
                    if fname == "after" {
                        "after"
                    } else {
                        "requires"
                    },
                    format!("`{d}` is not a service name"),
                ));
            }
            if *d == name {
                return Err(field(
                    if fname == "after" {
                        "after"
                    } else {
                        "requires"
                    },
                    "a service cannot depend on itself".into(),
                ));
            }
        }
    }
    let ready_path = match (f.ready, f.ready_path) {
        (Readiness::Path, Some(p)) if p.starts_with('/') => Some(PathBuf::from(p)),
        (Readiness::Path, Some(p)) => {
            return Err(field(
                "ready_path",
                format!("`{p}` must be an absolute path"),
            ))
        }
        (Readiness::Path, None) => {
            return Err(field("ready_path", "required when ready = \"path\"".into()))
        }
        (_, Some(_)) => {
            return Err(field(
                "ready_path",
                "only allowed with ready = \"path\"".into(),
            ))
        }
        (_, None) => None,
    };
    let ready_key = match (f.ready, f.ready_key) {
        (Readiness::Xenstore, Some(k)) if valid_xenstore_path(&k) => Some(k),
        (Readiness::Xenstore, Some(k)) => {
            return Err(field(
                "ready_key",
                format!("`{k}` is not an absolute xenstore path"),
            ))
        }
        (Readiness::Xenstore, None) => {
            return Err(field(
                "ready_key",
                "required when ready = \"xenstore\"".into(),
            ))
        }
        (_, Some(_)) => {
            return Err(field(
                "ready_key",
                "only allowed with ready = \"xenstore\"".into(),
            ))
        }
        (_, None) => None,
    };
    let stop_signal: nix::sys::signal::Signal = f.stop_signal.parse().map_err(|_| {
        field(
            "stop_signal",
            format!("`{}` is not a signal name", f.stop_signal),
        )
    })?;
    if f.stop_timeout_ms == 0 || f.stop_timeout_ms > 600_000 {
        return Err(field(
            "stop_timeout_ms",
            format!("{} is not in 1..=600000", f.stop_timeout_ms),
        ));
    }
    let capabilities = match f.capabilities {
        None => None,
        Some(list) => {
            let mut caps = CapabilitySet::empty();
            for c in &list {
                caps |= parse_capability(c)
                    .ok_or_else(|| field("capabilities", format!("`{c}` is not a capability")))?;
            }
            Some(caps)
        }
    };
    if f.boot_complete && f.boot_critical {
        return Err(field(
            "boot_complete",
            "a boot-complete hook runs after the boot-critical services; it cannot be one".into(),
        ));
    }
    if f.group.is_some() && f.user.is_none() {
        return Err(field("group", "needs `user` as well".into()));
    }
    if f.ready_timeout_ms == 0 || f.ready_timeout_ms > 600_000 {
        return Err(field(
            "ready_timeout_ms",
            format!("{} is not in 1..=600000", f.ready_timeout_ms),
        ));
    }
    if f.ready == Readiness::Exit && f.restart == RestartPolicy::Always {
        return Err(field(
            "restart",
            "\"always\" makes no sense for a oneshot (ready = \"exit\")".into(),
        ));
    }
    let tty = match f.tty {
        Some(t) if t.starts_with("/dev/") && !t.contains("..") => Some(PathBuf::from(t)),
        Some(t) => return Err(field("tty", format!("`{t}` is not a /dev path"))),
        None => None,
    };
    let has_tty = tty.is_some();
    let mut after = f.after.clone();
    for r in &f.requires {
        if !after.contains(r) {
            after.push(r.clone());
        }
    }
    Ok(Service {
        name,
        path: path.to_owned(),
        description: f.description,
        exec: f.exec,
        env: f.env,
        after,
        requires: f.requires,
        ready: f.ready,
        ready_path,
        ready_timeout_ms: f.ready_timeout_ms,
        restart: f.restart,
        boot_critical: f.boot_critical,
        tty,
        ready_key,
        stop_signal,
        stop_timeout_ms: f.stop_timeout_ms,
        boot_complete: f.boot_complete,
        hardening: Hardening {
            user: f.user,
            group: f.group,
            capabilities,
            no_new_privs: f.no_new_privs,
            new_session: f.new_session || has_tty,
            cgroup: f.cgroup,
        },
    })
}

/// The outcome of loading a service directory: the good services in a
/// valid start order, and the rejected ones with their reasons.
#[derive(Debug, Default)]
pub struct ServiceSet {
    pub services: Vec<Service>,
    pub rejected: Vec<(String, ServiceError)>,
}

/// Loads every `*.toml` of `dir`.
pub fn load_dir(dir: &Path) -> ServiceSet {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect(),
        Err(e) => {
            log::error!("{}: {e}", dir.display());
            Vec::new()
        }
    };
    files.sort();
    let parsed = files
        .into_iter()
        .map(|p| {
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let r = std::fs::read_to_string(&p)
                .map_err(|e| ServiceError::Parse {
                    path: p.clone(),
                    reason: e.to_string(),
                })
                .and_then(|t| parse(&p, &t));
            (name, r)
        })
        .collect();
    resolve(parsed)
}

/// Checks references and cycles; orders the services so each comes after
/// what it waits for.
pub fn resolve(parsed: Vec<(String, Result<Service, ServiceError>)>) -> ServiceSet {
    let mut set = ServiceSet::default();
    let known: BTreeSet<String> = parsed.iter().map(|(n, _)| n.clone()).collect();
    let mut good: BTreeMap<String, Service> = BTreeMap::new();
    for (name, r) in parsed {
        match r {
            Ok(s) => {
                let unknown = s.after.iter().find(|d| !known.contains(*d)).map(|d| {
                    (
                        if s.requires.contains(d) {
                            "requires"
                        } else {
                            "after"
                        },
                        d.clone(),
                    )
                });
                if let Some((field, dependency)) = unknown {
                    set.rejected.push((
                        name,
                        ServiceError::UnknownDependency {
                            path: s.path.clone(),
                            field,
                            dependency,
                        },
                    ));
                } else {
                    good.insert(name, s);
                }
            }
            Err(e) => set.rejected.push((name, e)),
        }
    }
    // Propagate breakage through `requires` until nothing changes.
    loop {
        let broken: BTreeSet<String> = set.rejected.iter().map(|(n, _)| n.clone()).collect();
        let victim = good.values().find_map(|s| {
            s.requires
                .iter()
                .find(|r| broken.contains(*r))
                .map(|r| (s.name.clone(), r.clone()))
        });
        let Some((name, dependency)) = victim else {
            break;
        };
        if let Some(s) = good.remove(&name) {
            set.rejected.push((
                name,
                ServiceError::BrokenDependency {
                    path: s.path,
                    dependency,
                },
            ));
        }
    }
    // Kahn's algorithm over `after` edges among the good services; an
    // `after` on a rejected service is dropped (it will never be ready,
    // but `after` is ordering only).
    let mut order = Vec::new();
    let mut placed: BTreeSet<String> = BTreeSet::new();
    loop {
        let next: Vec<String> = good
            .values()
            .filter(|s| !placed.contains(&s.name))
            .filter(|s| {
                s.after
                    .iter()
                    .all(|d| placed.contains(d) || !good.contains_key(d))
            })
            .map(|s| s.name.clone())
            .collect();
        if next.is_empty() {
            break;
        }
        for n in next {
            placed.insert(n.clone());
            order.push(n);
        }
    }
    let cyclic: Vec<String> = good
        .keys()
        .filter(|n| !placed.contains(*n))
        .cloned()
        .collect();
    let cycle_text = cyclic.join(" -> ");
    for n in &cyclic {
        if let Some(s) = good.remove(n) {
            set.rejected.push((
                n.clone(),
                ServiceError::Cycle {
                    path: s.path,
                    cycle: cycle_text.clone(),
                },
            ));
        }
    }
    set.services = order.into_iter().filter_map(|n| good.remove(&n)).collect();
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names() {
        for (name, cap) in [
            ("CAP_NET_ADMIN", Some(CapabilitySet::NET_ADMIN)),
            ("sys_admin", Some(CapabilitySet::SYS_ADMIN)),
            (
                "cap_checkpoint_restore",
                Some(CapabilitySet::CHECKPOINT_RESTORE),
            ),
            ("", None),
            ("CAP_", None),
            ("_", None),
            ("CAP_CAP_CHOWN", None),
            ("NOT_A_CAP", None),
        ] {
            assert_eq!(parse_capability(name), cap, "{name:?}");
        }
    }

    fn svc(name: &str, text: &str) -> (String, Result<Service, ServiceError>) {
        let p = PathBuf::from(format!("/etc/qinit/services/{name}.toml"));
        (name.to_owned(), parse(&p, text))
    }

    const SIMPLE: &str = "exec = [\"/bin/true\"]\nready = \"started\"\n";

    #[test]
    fn parses_a_full_definition() {
        let (_, s) = svc(
            "xenstored",
            r#"
description = "Xen store"
exec = ["/usr/lib/xen-4.20/bin/xenstored", "--no-fork"]
env = { A = "1" }
requires = ["mounts"]
after = ["early"]
ready = "path"
ready_path = "/run/xenstored/socket"
ready_timeout_ms = 5000
restart = "on-failure"
boot_critical = true
stop_signal = "SIGINT"
stop_timeout_ms = 2000
user = 1000
group = 1000
capabilities = ["CAP_NET_ADMIN", "sys_admin"]
no_new_privs = true
cgroup = true
"#,
        );
        let s = s.unwrap();
        assert_eq!(s.after, vec!["early", "mounts"]);
        assert_eq!(s.ready, Readiness::Path);
        assert_eq!(s.restart, RestartPolicy::OnFailure);
        assert!(s.boot_critical);
        assert_eq!(s.stop_signal, nix::sys::signal::Signal::SIGINT);
        assert_eq!(s.stop_timeout_ms, 2000);
        assert_eq!(
            s.hardening.capabilities,
            Some(CapabilitySet::NET_ADMIN | CapabilitySet::SYS_ADMIN)
        );
        assert_eq!(s.hardening.user, Some(1000));
        assert!(s.hardening.no_new_privs && s.hardening.cgroup && s.hardening.new_session);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("exec = []\nready = \"started\"\n", "exec"),
            ("exec = [\"bin/x\"]\nready = \"started\"\n", "exec"),
            ("exec = [\"/x\"]\nready = \"path\"\n", "ready_path"),
            (
                "exec = [\"/x\"]\nready = \"path\"\nready_path = \"rel\"\n",
                "ready_path",
            ),
            (
                "exec = [\"/x\"]\nready = \"exit\"\nready_path = \"/a\"\n",
                "ready_path",
            ),
            (
                "exec = [\"/x\"]\nready = \"exit\"\nrestart = \"always\"\n",
                "restart",
            ),
            (
                "exec = [\"/x\"]\nready = \"exit\"\nready_timeout_ms = 0\n",
                "ready_timeout_ms",
            ),
            (
                "exec = [\"/x\"]\nready = \"exit\"\nafter = [\"a b\"]\n",
                "after",
            ),
            (
                "exec = [\"/x\"]\nready = \"exit\"\nrequires = [\"t\"]\n",
                "requires",
            ),
            (
                "exec = [\"/x\"]\nready = \"exit\"\ntty = \"/etc/passwd\"\n",
                "tty",
            ),
            (
                "exec = [\"/x\"]\nready = \"exit\"\nenv = { \"\" = \"v\" }\n",
                "env",
            ),
        ];
        for (text, want) in cases {
            match svc("t", text).1.unwrap_err() {
                ServiceError::Field { field, .. } => assert_eq!(field, want, "{text}"),
                e => panic!("{text}: {e:?}"),
            }
        }
    }

    #[test]
    fn unknown_keys_and_bad_enums_are_parse_errors() {
        for text in [
            "exec = [\"/x\"]\nready = \"started\"\nrestrat = \"never\"\n",
            "exec = [\"/x\"]\nready = \"soon\"\n",
            "exec = [\"/x\"\n",
        ] {
            assert!(
                matches!(svc("t", text).1.unwrap_err(), ServiceError::Parse { .. }),
                "{text}"
            );
        }
    }

    #[test]
    fn order_follows_dependencies() {
        let set = resolve(vec![
            svc(
                "c",
                "exec = [\"/x\"]\nready = \"started\"\nafter = [\"b\"]\n",
            ),
            svc(
                "b",
                "exec = [\"/x\"]\nready = \"started\"\nrequires = [\"a\"]\n",
            ),
            svc("a", SIMPLE),
        ]);
        let names: Vec<_> = set.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b", "c"]);
        assert!(set.rejected.is_empty());
    }

    #[test]
    fn cycles_unknowns_and_broken_requirements_are_isolated() {
        let set = resolve(vec![
            svc(
                "a",
                "exec = [\"/x\"]\nready = \"started\"\nafter = [\"b\"]\n",
            ),
            svc(
                "b",
                "exec = [\"/x\"]\nready = \"started\"\nafter = [\"a\"]\n",
            ),
            svc(
                "c",
                "exec = [\"/x\"]\nready = \"started\"\nrequires = [\"ghost\"]\n",
            ),
            svc(
                "d",
                "exec = [\"/x\"]\nready = \"started\"\nrequires = [\"broken\"]\n",
            ),
            svc("broken", "exec = 3\n"),
            svc("e", SIMPLE),
        ]);
        let names: Vec<_> = set.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["e"]);
        let why = |n: &str| {
            set.rejected
                .iter()
                .find(|(x, _)| x == n)
                .map(|(_, e)| e.clone())
                .unwrap()
        };
        assert!(matches!(why("a"), ServiceError::Cycle { .. }));
        assert!(matches!(why("b"), ServiceError::Cycle { .. }));
        assert!(matches!(why("c"), ServiceError::UnknownDependency { .. }));
        assert!(matches!(why("d"), ServiceError::BrokenDependency { .. }));
        assert!(matches!(why("broken"), ServiceError::Parse { .. }));
    }
}

/// The units the images ship, checked by qinit's own parser and resolver:
/// each overlay's units with the base overlay's, as a profile combines them
/// (the broken test release replaces a base unit of the same name).
#[cfg(test)]
mod shipped {
    use super::*;

    #[test]
    fn every_shipped_unit_parses_and_resolves() {
        let overlays = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/overlays");
        let units = |overlay: &str| -> BTreeMap<String, PathBuf> {
            let dir = overlays.join(overlay).join("etc/qinit/services");
            std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.map(|e| e.unwrap().path())
                        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
                        .collect()
                })
                .unwrap_or_default()
        };
        let base = units("base");
        assert!(base.contains_key("qupdated"), "{base:?}");
        for overlay in ["base", "qemu-test", "broken", "health-guivm"] {
            let mut all = base.clone();
            all.extend(units(overlay));
            let parsed = all
                .iter()
                .map(|(name, p)| {
                    let text = std::fs::read_to_string(p).unwrap();
                    (name.clone(), parse(p, &text))
                })
                .collect();
            let set = resolve(parsed);
            assert!(set.rejected.is_empty(), "{overlay}: {:?}", set.rejected);
        }
        // The health gate: the updater and the domain agent count.
        for name in ["qupdated", "qdomd"] {
            let text = std::fs::read_to_string(&base[name]).unwrap();
            assert!(parse(&base[name], &text).unwrap().boot_critical, "{name}");
        }
    }
}
