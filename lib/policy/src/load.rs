//! The policy directories into one list of rules.
//!
//! As Qubes R4.2 (`AbstractFileSystemLoader`): in each directory, the files
//! whose name ends in `.policy` and does not start with `.`; names only of
//! `[0-9a-z_.-]`; a name in an earlier directory hides the same name in a
//! later one; all of them sorted by name (C-locale order), parsed in turn;
//! `!include` and `!include-dir` are resolved against the including
//! top-level file's directory.
//!
//! A bad file is rejected with its file, line and reason, and the files
//! before it stay in force. In its place stands a rule that denies
//! everything, so a deny it held can never turn into a later file's allow
//! (fail closed; Qubes denies everything as soon as any file is bad). An
//! unreadable policy directory denies everything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::parse::{self, Action, Line, Rule, Token};

/// A policy file larger than this is rejected unread.
pub const MAX_FILE_LEN: u64 = 1 << 20;
/// Includes nest at most this deep (a cycle ends here too).
pub const MAX_INCLUDE_DEPTH: usize = 8;

/// A file that was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct PolicyError {
    pub file: String,
    /// 0 when the file as a whole is at fault.
    pub line: usize,
    pub reason: String,
}

/// The rules in force, and the files that were rejected.
#[derive(Debug, Default)]
pub struct Policy {
    pub rules: Vec<Rule>,
    pub errors: Vec<PolicyError>,
}

fn name_ok(name: &str) -> bool {
    name.bytes()
        .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || b"_.-".contains(&c))
}

/// What stands in for a rejected file: deny every call from here on.
fn deny_all(file: &str) -> Rule {
    Rule {
        service: None,
        argument: None,
        source: Token::Wildcard,
        target: Token::Wildcard,
        action: Action::Deny { notify: true },
        file: file.to_owned(),
        line: 0,
    }
}

type Files = BTreeMap<String, Result<PathBuf, PolicyError>>;

/// The `.policy` files of `dir`, by name; a name that is not allowed is an
/// error in its place.
fn policy_files(dir: &Path, errors: &mut Vec<PolicyError>) -> Files {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
        Err(e) => {
            errors.push(PolicyError {
                file: dir.display().to_string(),
                line: 0,
                reason: format!("cannot read the directory: {e}"),
            });
            return out;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".policy") || name.starts_with('.') || !path.is_file() {
            continue;
        }
        if !name_ok(&name) {
            out.insert(
                name,
                Err(PolicyError {
                    file: path.display().to_string(),
                    line: 0,
                    reason: "invalid filename (only 0-9, a-z, _, . and - are allowed)".into(),
                }),
            );
            continue;
        }
        out.insert(name, Ok(path));
    }
    out
}

/// Loads `dirs` in order: the first holds the owner's rules, the last the
/// shipped ones.
pub fn load(dirs: &[&Path]) -> Policy {
    let mut policy = Policy::default();
    let mut files: Files = BTreeMap::new();
    for dir in dirs {
        for (name, entry) in policy_files(dir, &mut policy.errors) {
            files.entry(name).or_insert(entry);
        }
    }
    if let Some(e) = policy.errors.first() {
        // A directory we cannot read may hold any rule: deny everything.
        policy.rules.push(deny_all(&e.file));
    }
    for entry in files.values() {
        let loaded = entry.clone().and_then(|path| {
            let base = path.parent().unwrap_or(Path::new("/")).to_owned();
            let mut rules = Vec::new();
            load_file(&path, &base, 0, &mut rules).map(|()| rules)
        });
        match loaded {
            Ok(rules) => policy.rules.extend(rules),
            Err(e) => {
                policy.rules.push(deny_all(&e.file));
                policy.errors.push(e);
            }
        }
    }
    policy
}

fn load_file(
    path: &Path,
    base: &Path,
    depth: usize,
    rules: &mut Vec<Rule>,
) -> Result<(), PolicyError> {
    let label = path.display().to_string();
    let whole = |reason: String| PolicyError {
        file: label.clone(),
        line: 0,
        reason,
    };
    if depth > MAX_INCLUDE_DEPTH {
        return Err(whole(format!(
            "includes nested deeper than {MAX_INCLUDE_DEPTH}"
        )));
    }
    let meta = std::fs::metadata(path).map_err(|e| whole(format!("failed to load: {e}")))?;
    if meta.len() > MAX_FILE_LEN {
        return Err(whole(format!(
            "{} bytes; at most {MAX_FILE_LEN}",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| whole(format!("failed to load: {e}")))?;
    for (i, l) in text.lines().enumerate() {
        let at = |reason: String| PolicyError {
            file: label.clone(),
            line: i + 1,
            reason,
        };
        match parse::line(l, &label, i + 1).map_err(at)? {
            Line::Blank => {}
            Line::Rule(r) => rules.push(*r),
            Line::Include(p) => {
                let target = base.join(&p);
                if !target.is_file() {
                    return Err(at(format!("not a file: {}", target.display())));
                }
                load_file(&target, base, depth + 1, rules)?;
            }
            Line::IncludeDir(p) => {
                let dir = base.join(&p);
                if !dir.is_dir() {
                    return Err(at(format!("not a directory: {}", dir.display())));
                }
                let mut errors = Vec::new();
                let inner = policy_files(&dir, &mut errors);
                if let Some(e) = errors.into_iter().next() {
                    return Err(e);
                }
                for f in inner.into_values() {
                    load_file(&f?, base, depth + 1, rules)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_first_sorted_shadowed_includes_and_bad_files_alone() {
        let owner = tempfile::tempdir().unwrap();
        let shipped = tempfile::tempdir().unwrap();
        let w = |d: &Path, n: &str, t: &str| std::fs::write(d.join(n), t).unwrap();
        w(
            shipped.path(),
            "90-default.policy",
            "* * @anyvm @anyvm deny\n",
        );
        w(
            shipped.path(),
            "50-admin.policy",
            "admin.vm.List * guivm @adminvm allow\n",
        );
        w(
            owner.path(),
            "50-admin.policy",
            "admin.vm.List * work @adminvm allow\n",
        );
        w(
            owner.path(),
            "30-user.policy",
            "!include extra.inc\nsvc * a b allow target=c\n",
        );
        w(owner.path(), "extra.inc", "# included\nsvc2 * a b deny\n");
        w(owner.path(), "40-bad.policy", "svc * a\n");
        w(owner.path(), "Bad.policy", "svc * a b deny\n");
        w(owner.path(), "notes.txt", "garbage\n");
        let p = load(&[owner.path(), shipped.path()]);
        let order: Vec<(&str, Option<&str>)> = p
            .rules
            .iter()
            .map(|r| (r.file.rsplit('/').next().unwrap(), r.service.as_deref()))
            .collect();
        assert_eq!(
            order,
            [
                ("extra.inc", Some("svc2")),
                ("30-user.policy", Some("svc")),
                // The bad file: deny everything from its place on.
                ("40-bad.policy", None),
                ("50-admin.policy", Some("admin.vm.List")),
                ("90-default.policy", None),
                ("Bad.policy", None),
            ]
        );
        assert_eq!(p.rules[2].line, 0);
        assert!(matches!(p.rules[2].action, Action::Deny { .. }));
        // The owner's 50-admin hides the shipped one.
        assert_eq!(p.rules[3].source, Token::Name("work".into()));
        let errs: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("40-bad.policy:1: wrong number of fields")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("Bad.policy:0: invalid filename")),
            "{errs:?}"
        );
    }

    #[test]
    fn include_cycles_end() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.policy"), "!include a.policy\n").unwrap();
        let p = load(&[d.path()]);
        assert_eq!(p.rules.len(), 1, "only the deny-all in its place");
        assert!(
            p.errors[0].reason.contains("nested deeper"),
            "{:?}",
            p.errors
        );
    }
}
