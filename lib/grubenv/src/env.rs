use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::Error;

/// Size of a GRUB environment block file.
pub const BLOCK_SIZE: usize = 1024;
/// First line of every environment block.
pub const HEADER: &str = "# GRUB Environment Block\n";

/// The variables of a GRUB environment block, in file order.
///
/// Order is kept, and variables this crate does not know about survive a
/// load/store cycle, so GRUB's own variables (`saved_entry`, `next_entry`,
/// ...) are not lost when the updater rewrites the A/B state. Comment lines
/// (grub-editenv 2.06 writes a `# WARNING: ...` line after the header) are
/// kept in place too, so a block read and written back is byte-identical.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env {
    lines: Vec<Line>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Line {
    Var(String, String),
    /// The raw line, starting with `#`, without its newline.
    Comment(String),
}

impl Env {
    pub fn new() -> Env {
        Env::default()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Sets a variable, in place if it exists, else at the end.
    ///
    /// Names are restricted to printable ASCII without `=` or `\` (and not
    /// starting with `#`, which would make the line a comment): anything
    /// else is either unparseable by GRUB or unusable from its scripts.
    /// Values may contain anything but NUL; `\` and newline are escaped.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), Error> {
        validate_key(key)?;
        if value.contains('\0') {
            return Err(Error::NulInValue {
                key: key.to_owned(),
            });
        }
        let existing = self.lines.iter_mut().find_map(|line| match line {
            Line::Var(k, v) if k == key => Some(v),
            _ => None,
        });
        match existing {
            Some(v) => value.clone_into(v),
            None => self.lines.push(Line::Var(key.to_owned(), value.to_owned())),
        }
        Ok(())
    }

    /// Removes a variable, returning its value if it was set.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let index = self
            .lines
            .iter()
            .position(|line| matches!(line, Line::Var(k, _) if k == key))?;
        match self.lines.remove(index) {
            Line::Var(_, value) => Some(value),
            Line::Comment(_) => None,
        }
    }

    /// The variables in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|line| match line {
            Line::Var(k, v) => Some((k.as_str(), v.as_str())),
            Line::Comment(_) => None,
        })
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether there are no variables (comments do not count).
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// Parses a block as GRUB writes it: exactly 1024 bytes, the header
    /// line, `name=value` and `#` comment lines, then `#` padding to the end.
    ///
    /// This is stricter than GRUB, which skips lines it cannot use: a block
    /// that does not look exactly like one GRUB or grub-editenv wrote is
    /// corrupt, and the boot state must not be guessed from a corrupt block.
    pub fn parse(block: &[u8]) -> Result<Env, Error> {
        if block.len() != BLOCK_SIZE {
            return Err(Error::WrongSize { size: block.len() });
        }
        if !block.starts_with(HEADER.as_bytes()) {
            return Err(Error::MissingHeader);
        }
        let mut env = Env::new();
        let mut pos = HEADER.len();
        let mut line = 2;
        while pos < BLOCK_SIZE {
            let rest = &block[pos..];
            if rest[0] == b'#' {
                let Some(end) = comment_end(rest) else {
                    // No newline: this is the padding, which runs to the end.
                    if let Some(offset) = rest.iter().position(|&b| b != b'#') {
                        return Err(Error::BadPadding {
                            offset: pos + offset,
                            found: rest[offset],
                        });
                    }
                    break;
                };
                let text =
                    std::str::from_utf8(&rest[..end]).map_err(|_| Error::NonUtf8 { line })?;
                env.lines.push(Line::Comment(text.to_owned()));
                line += 1 + text.matches('\n').count();
                pos += end + 1;
                continue;
            }
            let eq = match rest.iter().position(|&b| b == b'=' || b == b'\n') {
                Some(i) if rest[i] == b'=' => i,
                _ => return Err(Error::MissingEquals { line }),
            };
            let key = std::str::from_utf8(&rest[..eq]).map_err(|_| Error::NonUtf8 { line })?;
            validate_key(key)?;

            let start_line = line;
            let mut value = Vec::new();
            let mut i = eq + 1;
            loop {
                match rest.get(i) {
                    Some(b'\n') => break,
                    Some(b'\\') => match rest.get(i + 1) {
                        Some(&c @ (b'\\' | b'\n')) => {
                            if c == b'\n' {
                                line += 1;
                            }
                            value.push(c);
                            i += 2;
                        }
                        Some(&c) => {
                            return Err(Error::BadEscape {
                                line,
                                key: key.to_owned(),
                                found: char::from(c),
                            })
                        }
                        None => {
                            return Err(Error::UnterminatedLine {
                                line: start_line,
                                key: key.to_owned(),
                            })
                        }
                    },
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                    None => {
                        return Err(Error::UnterminatedLine {
                            line: start_line,
                            key: key.to_owned(),
                        })
                    }
                }
            }
            let value =
                String::from_utf8(value).map_err(|_| Error::NonUtf8 { line: start_line })?;
            if env.get(key).is_some() {
                return Err(Error::DuplicateKey {
                    line: start_line,
                    key: key.to_owned(),
                });
            }
            env.set(key, &value)?;
            pos += i + 1;
            line += 1;
        }
        Ok(env)
    }

    /// Serialises to a full block, byte-identical to what grub-editenv
    /// writes for the same variables in the same order.
    pub fn to_block(&self) -> Result<[u8; BLOCK_SIZE], Error> {
        let mut out = Vec::with_capacity(BLOCK_SIZE);
        out.extend_from_slice(HEADER.as_bytes());
        let mut overflowed = None;
        for line in &self.lines {
            let key = match line {
                Line::Var(key, value) => {
                    out.extend_from_slice(key.as_bytes());
                    out.push(b'=');
                    for b in value.bytes() {
                        if b == b'\\' || b == b'\n' {
                            out.push(b'\\');
                        }
                        out.push(b);
                    }
                    key
                }
                Line::Comment(text) => {
                    out.extend_from_slice(text.as_bytes());
                    text
                }
            };
            out.push(b'\n');
            if out.len() > BLOCK_SIZE && overflowed.is_none() {
                overflowed = Some(key);
            }
        }
        if let Some(key) = overflowed {
            return Err(Error::Overflow {
                key: key.clone(),
                needed: out.len(),
            });
        }
        let mut block = [b'#'; BLOCK_SIZE];
        block[..out.len()].copy_from_slice(&out);
        Ok(block)
    }

    /// Reads and parses an environment file.
    pub fn load(path: impl AsRef<Path>) -> Result<Env, Error> {
        let path = path.as_ref();
        let io = |action| {
            move |source| Error::Io {
                action,
                path: path.to_owned(),
                source,
            }
        };
        let file = File::open(path).map_err(io("opening"))?;
        let size = file.metadata().map_err(io("inspecting"))?.len();
        if size != BLOCK_SIZE as u64 {
            return Err(Error::WrongFileSize {
                path: path.to_owned(),
                size,
            });
        }
        let mut block = Vec::with_capacity(BLOCK_SIZE);
        // Bounded in case the file grows after the size check.
        file.take(BLOCK_SIZE as u64 + 1)
            .read_to_end(&mut block)
            .map_err(io("reading"))?;
        Env::parse(&block).map_err(|source| Error::InFile {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Rewrites an existing environment file in place.
    ///
    /// GRUB's `save_env` writes through the block list of the file it found
    /// at boot, so the file must keep its blocks: it is never truncated,
    /// recreated or resized, only overwritten from offset 0, and synced
    /// before this returns so a crash cannot lose a state change the
    /// caller believes is stored. A file that is not 1024 bytes is refused
    /// rather than "fixed".
    pub fn store(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        let block = self.to_block()?;
        let io = |action| {
            move |source| Error::Io {
                action,
                path: path.to_owned(),
                source,
            }
        };
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io("opening"))?;
        let size = file.metadata().map_err(io("inspecting"))?.len();
        if size != BLOCK_SIZE as u64 {
            return Err(Error::WrongFileSize {
                path: path.to_owned(),
                size,
            });
        }
        file.write_all_at(&block, 0).map_err(io("writing"))?;
        file.sync_all().map_err(io("syncing"))
    }

    /// Creates a new environment file, for image building. Fails if the
    /// file exists, because replacing a live environment file would break
    /// GRUB's block list (use [`Env::store`] for that).
    pub fn store_new(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        let block = self.to_block()?;
        let io = |action| {
            move |source| Error::Io {
                action,
                path: path.to_owned(),
                source,
            }
        };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io("creating"))?;
        file.write_all_at(&block, 0).map_err(io("writing"))?;
        file.sync_all().map_err(io("syncing"))
    }
}

/// Index of the newline ending a comment line, skipping escaped bytes as
/// GRUB's own line splitter does.
fn comment_end(rest: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < rest.len() {
        match rest[i] {
            b'\\' => i += 2,
            b'\n' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn validate_key(key: &str) -> Result<(), Error> {
    let reason = if key.is_empty() {
        "empty"
    } else if key.starts_with('#') {
        "starts with '#', which makes the line a comment"
    } else if key.contains(['=', '\\']) {
        "contains '=' or '\\'"
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        "contains a character that is not printable ASCII"
    } else {
        return Ok(());
    };
    Err(Error::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}
