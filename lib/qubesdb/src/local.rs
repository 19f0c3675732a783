//! The daemon's local socket (`/run/qubes/qubesdb.<vm>.sock`): dom0 tools
//! and qdomd read and write a VM's database with the same `qdb_hdr`
//! messages and every command (`db-cmds.c::handle_client_data`). A change
//! is also sent to the VM, and watches fire for it.

use crate::db::{Db, Watch};
use crate::wire::{check_data, Header, MsgType, QdbPath, WireError, HEADER_LEN};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    #[error("bad header: {0}")]
    Wire(#[from] WireError),
    #[error("{0:?} is not a command")]
    NotACommand(MsgType),
    #[error("{0:?} with {1} bytes of data, which it must not carry")]
    UnexpectedData(MsgType, u32),
    #[error("write of {path} refused: {reason}")]
    Write { path: QdbPath, reason: String },
}

/// A change a local client made, which the VM must see too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Write(QdbPath, Vec<u8>),
    Rm(QdbPath),
}

impl Change {
    pub fn path(&self) -> &QdbPath {
        match self {
            Change::Write(p, _) | Change::Rm(p) => p,
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct LocalOutput {
    /// Bytes for this client.
    pub reply: Vec<u8>,
    /// Changes, in order, for the VM and for everyone's watches.
    pub changes: Vec<Change>,
}

/// One local client.
#[derive(Debug, Default)]
pub struct Session {
    buf: Vec<u8>,
    pending: Option<Header>,
    watches: Vec<Watch>,
}

fn msg(out: &mut Vec<u8>, kind: MsgType, path: &QdbPath, data: &[u8]) {
    out.extend_from_slice(&Header::message(kind, path, data));
}

impl Session {
    pub fn new() -> Session {
        Session::default()
    }

    /// The watch event for `changed`, once per matching watch, as the C
    /// daemon sends it.
    pub fn watch_events(&self, changed: &QdbPath) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in self.watches.iter().filter(|w| w.matches(changed)) {
            msg(&mut out, MsgType::RespWatch, changed, &[]);
        }
        out
    }

    /// Takes bytes from the client; an error means disconnect it.
    pub fn input(&mut self, db: &mut Db, bytes: &[u8]) -> Result<LocalOutput, LocalError> {
        self.buf.extend_from_slice(bytes);
        let mut out = LocalOutput::default();
        loop {
            if self.pending.is_none() {
                if self.buf.len() < HEADER_LEN {
                    break;
                }
                let mut raw = [0u8; HEADER_LEN];
                raw.copy_from_slice(&self.buf[..HEADER_LEN]);
                let h = Header::parse(&raw)?;
                if !h.kind.allowed_locally() {
                    return Err(LocalError::NotACommand(h.kind));
                }
                self.buf.drain(..HEADER_LEN);
                self.pending = Some(h);
            }
            let len = self.pending.as_ref().map_or(0, |h| h.data_len as usize);
            if self.buf.len() < len {
                break;
            }
            let data: Vec<u8> = self.buf.drain(..len).collect();
            let Some(h) = self.pending.take() else { break };
            self.command(db, &h, &data, &mut out)?;
        }
        Ok(out)
    }

    fn command(
        &mut self,
        db: &mut Db,
        h: &Header,
        data: &[u8],
        out: &mut LocalOutput,
    ) -> Result<(), LocalError> {
        let no_data = |out: &mut LocalOutput| -> bool {
            if data.is_empty() {
                return true;
            }
            msg(&mut out.reply, MsgType::Error, &h.path, &[]);
            false
        };
        let end = QdbPath::new("").expect("the empty path is valid");
        match h.kind {
            MsgType::Read => {
                if !data.is_empty() {
                    return Err(LocalError::UnexpectedData(h.kind, h.data_len));
                }
                match db.read(&h.path) {
                    Some(v) => msg(&mut out.reply, MsgType::RespRead, &h.path, v),
                    None => msg(&mut out.reply, MsgType::ErrorNoent, &h.path, &[]),
                }
            }
            MsgType::Write => {
                if check_data(data).is_err() {
                    msg(&mut out.reply, MsgType::Error, &h.path, &[]);
                    return Ok(());
                }
                if let Err(e) = db.write(&h.path, data) {
                    msg(&mut out.reply, MsgType::Error, &h.path, &[]);
                    return Err(LocalError::Write {
                        path: h.path.clone(),
                        reason: e.to_string(),
                    });
                }
                msg(&mut out.reply, MsgType::Ok, &h.path, &[]);
                out.changes
                    .push(Change::Write(h.path.clone(), data.to_vec()));
            }
            MsgType::Multiread => {
                if no_data(out) {
                    for (p, v) in db.multiread(&h.path) {
                        msg(&mut out.reply, MsgType::RespMultiread, p, v);
                    }
                    msg(&mut out.reply, MsgType::RespMultiread, &end, &[]);
                }
            }
            MsgType::List => {
                if no_data(out) {
                    for p in db.list(&h.path) {
                        msg(&mut out.reply, MsgType::RespList, p, &[]);
                    }
                    msg(&mut out.reply, MsgType::RespList, &end, &[]);
                }
            }
            MsgType::Rm => {
                if no_data(out) {
                    if db.remove(&h.path) {
                        msg(&mut out.reply, MsgType::Ok, &h.path, &[]);
                        out.changes.push(Change::Rm(h.path.clone()));
                    } else {
                        msg(&mut out.reply, MsgType::ErrorNoent, &h.path, &[]);
                    }
                }
            }
            MsgType::Watch => {
                self.watches.push(Watch::new(h.path.clone()));
                msg(&mut out.reply, MsgType::Ok, &h.path, &[]);
            }
            MsgType::Unwatch => match self.watches.iter().position(|w| w.path() == &h.path) {
                Some(i) => {
                    self.watches.remove(i);
                    msg(&mut out.reply, MsgType::Ok, &h.path, &[]);
                }
                None => msg(&mut out.reply, MsgType::ErrorNoent, &h.path, &[]),
            },
            other => return Err(LocalError::NotACommand(other)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> QdbPath {
        QdbPath::new(s).unwrap()
    }

    fn kinds(mut bytes: &[u8]) -> Vec<(MsgType, String)> {
        let mut v = Vec::new();
        while bytes.len() >= HEADER_LEN {
            let h = Header::parse(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
            v.push((h.kind, h.path.to_string()));
            bytes = &bytes[HEADER_LEN + h.data_len as usize..];
        }
        v
    }

    #[test]
    fn commands() {
        let mut db = Db::new();
        let mut s = Session::new();
        let mut input = Header::message(MsgType::Watch, &p("/a/"), &[]);
        input.extend(Header::message(MsgType::Write, &p("/a/x"), b"1"));
        input.extend(Header::message(MsgType::Read, &p("/a/x"), &[]));
        input.extend(Header::message(MsgType::Read, &p("/nope"), &[]));
        input.extend(Header::message(MsgType::List, &p("/a"), &[]));
        input.extend(Header::message(MsgType::Rm, &p("/a/"), &[]));
        input.extend(Header::message(MsgType::Unwatch, &p("/b"), &[]));
        let out = s.input(&mut db, &input).unwrap();
        use MsgType::*;
        assert_eq!(
            kinds(&out.reply),
            [
                (Ok, "/a/".into()),
                (Ok, "/a/x".into()),
                (RespRead, "/a/x".into()),
                (ErrorNoent, "/nope".into()),
                (RespList, "/a/x".into()),
                (RespList, "".into()),
                (Ok, "/a/".into()),
                (ErrorNoent, "/b".into()),
            ]
        );
        assert_eq!(
            out.changes,
            vec![
                Change::Write(p("/a/x"), b"1".to_vec()),
                Change::Rm(p("/a/"))
            ]
        );
        assert_eq!(
            kinds(&s.watch_events(&p("/a/x"))),
            [(RespWatch, "/a/x".into())]
        );
        assert!(s.watch_events(&p("/b")).is_empty());
    }

    #[test]
    fn responses_are_not_commands() {
        let mut s = Session::new();
        let r = Header::message(MsgType::Ok, &p("/a"), &[]);
        assert_eq!(
            s.input(&mut Db::new(), &r),
            Err(LocalError::NotACommand(MsgType::Ok))
        );
    }
}
