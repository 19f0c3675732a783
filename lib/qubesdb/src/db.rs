//! The database and its watches, with core-qubesdb's rules
//! (`daemon/db-core.c`): entries are sorted by path (byte order, as
//! `strcmp`); a written path starts with `/` and does not end with one; a
//! removal or watch of a path ending in `/` covers everything under it.

use std::collections::BTreeMap;

use crate::wire::QdbPath;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    #[error("path {0} does not start with '/'")]
    NotAbsolute(QdbPath),
    #[error("path {0} ends with '/', which only removals and watches may")]
    Directory(QdbPath),
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Db {
    entries: BTreeMap<QdbPath, Vec<u8>>,
}

impl Db {
    pub fn new() -> Db {
        Db::default()
    }

    pub fn write(&mut self, path: &QdbPath, value: &[u8]) -> Result<(), DbError> {
        let s = path.as_str();
        if !s.starts_with('/') {
            return Err(DbError::NotAbsolute(path.clone()));
        }
        if s.ends_with('/') {
            return Err(DbError::Directory(path.clone()));
        }
        self.entries.insert(path.clone(), value.to_vec());
        Ok(())
    }

    pub fn read(&self, path: &QdbPath) -> Option<&[u8]> {
        self.entries.get(path).map(Vec::as_slice)
    }

    /// Removes the entry, or with a trailing `/` every entry under it;
    /// false if nothing was there.
    pub fn remove(&mut self, path: &QdbPath) -> bool {
        if path.as_str().ends_with('/') {
            let doomed: Vec<QdbPath> = self
                .prefixed(path.as_str())
                .map(|(p, _)| p.clone())
                .collect();
            for p in &doomed {
                self.entries.remove(p);
            }
            !doomed.is_empty()
        } else {
            self.entries.remove(path).is_some()
        }
    }

    fn prefixed<'a>(&'a self, prefix: &str) -> impl Iterator<Item = (&'a QdbPath, &'a Vec<u8>)> {
        let prefix = prefix.to_owned();
        self.entries
            .iter()
            .filter(move |(p, _)| p.as_str().starts_with(&prefix))
    }

    /// Entries whose path starts with `prefix`, in order; with an empty
    /// prefix the whole database in *reverse* order, as the C daemon sends
    /// its initial dump (so the VM's insertion sort is cheap).
    pub fn multiread<'a>(&'a self, prefix: &QdbPath) -> Vec<(&'a QdbPath, &'a [u8])> {
        if prefix.is_empty() {
            self.entries
                .iter()
                .rev()
                .map(|(p, v)| (p, v.as_slice()))
                .collect()
        } else {
            self.prefixed(prefix.as_str())
                .map(|(p, v)| (p, v.as_slice()))
                .collect()
        }
    }

    /// Paths that start with `prefix`, in order.
    pub fn list<'a>(&'a self, prefix: &QdbPath) -> Vec<&'a QdbPath> {
        self.prefixed(prefix.as_str()).map(|(p, _)| p).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One registered watch: a path, and whether it covers a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    path: QdbPath,
}

impl Watch {
    pub fn new(path: QdbPath) -> Watch {
        Watch { path }
    }

    pub fn path(&self) -> &QdbPath {
        &self.path
    }

    /// `strncmp(watch, changed, cmp_len) == 0`, where `cmp_len` includes
    /// the terminator unless the watch ends with `/`: an exact match, or
    /// anything under a directory watch.
    pub fn matches(&self, changed: &QdbPath) -> bool {
        let w = self.path.as_str();
        if w.ends_with('/') {
            changed.as_str().starts_with(w)
        } else {
            changed.as_str() == w
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> QdbPath {
        QdbPath::new(s).unwrap()
    }

    #[test]
    fn write_rules() {
        let mut db = Db::new();
        assert!(db.write(&p("/name"), b"work").is_ok());
        assert_eq!(
            db.write(&p("name"), b""),
            Err(DbError::NotAbsolute(p("name")))
        );
        assert_eq!(db.write(&p("/a/"), b""), Err(DbError::Directory(p("/a/"))));
        assert_eq!(db.read(&p("/name")), Some(&b"work"[..]));
    }

    #[test]
    fn directory_removal_and_listing() {
        let mut db = Db::new();
        for k in ["/a/x", "/a/y", "/ab", "/b"] {
            db.write(&p(k), k.as_bytes()).unwrap();
        }
        assert_eq!(db.list(&p("/a")).len(), 3, "a prefix, not a directory");
        assert_eq!(
            db.multiread(&p(""))
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
            ["/b", "/ab", "/a/y", "/a/x"]
        );
        assert!(db.remove(&p("/a/")));
        assert!(!db.remove(&p("/a/")));
        assert!(!db.remove(&p("/a")));
        assert_eq!(db.len(), 2);
    }

    #[test]
    fn watch_matching() {
        assert!(Watch::new(p("/a")).matches(&p("/a")));
        assert!(!Watch::new(p("/a")).matches(&p("/ab")));
        assert!(Watch::new(p("/a/")).matches(&p("/a/b")));
        assert!(!Watch::new(p("/a/")).matches(&p("/a")));
    }
}
