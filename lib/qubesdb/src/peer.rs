//! The two ends of the QubesDB vchan as state machines: bytes in, bytes to
//! send and database changes out. The executor owns the vchan.
//!
//! - [`Dom0Side`]: dom0's daemon for one VM. The VM's daemon connects,
//!   asks once for the whole database (MULTIREAD with an empty path), and
//!   then both sides forward their local writes and removals to each other
//!   and acknowledge the other's (`db-cmds.c::handle_vchan_data`).
//! - [`VmSide`]: a VM's end (our guest stand-in's client), the mirror.
//!
//! Anything a peer sends that the C daemon would treat as fatal is an
//! error here, and the caller drops the connection; what the C daemon
//! answers with `QDB_RESP_ERROR` and survives (a value with a NUL, data on
//! a removal) is answered the same way.

use crate::db::Db;
use crate::wire::{check_data, Header, MsgType, QdbPath, WireError, HEADER_LEN};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("bad header: {0}")]
    Wire(#[from] WireError),
    #[error("{0:?} is not allowed on the vchan")]
    NotAllowed(MsgType),
    #[error("a second MULTIREAD: only one is allowed after connecting")]
    SpuriousMultiread,
    #[error("a MULTIREAD response nobody asked for")]
    SpuriousMultireadResponse,
    #[error("write of {path} refused: {reason}")]
    Write { path: QdbPath, reason: String },
    #[error("removal of {0}, which does not exist: the two databases differ")]
    RemoveMissing(QdbPath),
    #[error("an error response carrying {0} bytes of data")]
    ErrorWithData(u32),
    #[error("a value with a NUL byte for {0}")]
    NulInValue(QdbPath),
}

/// Splits a byte stream into messages.
#[derive(Debug, Default)]
struct Framer {
    buf: Vec<u8>,
    pending: Option<Header>,
}

impl Framer {
    /// The next whole message, if the buffer holds one.
    fn next(
        &mut self,
        allowed: impl Fn(MsgType) -> bool,
    ) -> Result<Option<(Header, Vec<u8>)>, PeerError> {
        if self.pending.is_none() {
            if self.buf.len() < HEADER_LEN {
                return Ok(None);
            }
            let mut raw = [0u8; HEADER_LEN];
            raw.copy_from_slice(&self.buf[..HEADER_LEN]);
            let h = Header::parse(&raw)?;
            if !allowed(h.kind) {
                return Err(PeerError::NotAllowed(h.kind));
            }
            self.buf.drain(..HEADER_LEN);
            self.pending = Some(h);
        }
        let len = self.pending.as_ref().map_or(0, |h| h.data_len as usize);
        if self.buf.len() < len {
            return Ok(None);
        }
        let data: Vec<u8> = self.buf.drain(..len).collect();
        Ok(self.pending.take().map(|h| (h, data)))
    }
}

/// What processing input produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Bytes to send to the peer, in order.
    pub send: Vec<u8>,
    /// Paths the peer changed (for local watches).
    pub changed: Vec<QdbPath>,
}

fn reply(out: &mut Output, kind: MsgType, path: &QdbPath) {
    out.send
        .extend_from_slice(&Header::message(kind, path, &[]));
}

/// A WRITE or RM from the peer, applied the way both C daemons do.
fn apply_remote(db: &mut Db, out: &mut Output, h: &Header, data: &[u8]) -> Result<(), PeerError> {
    match h.kind {
        MsgType::Write => {
            if check_data(data).is_err() {
                // The C daemon answers with an error and carries on.
                reply(out, MsgType::Error, &h.path);
                return Ok(());
            }
            db.write(&h.path, data).map_err(|e| PeerError::Write {
                path: h.path.clone(),
                reason: e.to_string(),
            })?;
            reply(out, MsgType::Ok, &h.path);
            out.changed.push(h.path.clone());
        }
        MsgType::Rm => {
            if !data.is_empty() {
                reply(out, MsgType::Error, &h.path);
                return Ok(());
            }
            if !db.remove(&h.path) {
                return Err(PeerError::RemoveMissing(h.path.clone()));
            }
            reply(out, MsgType::Ok, &h.path);
            out.changed.push(h.path.clone());
        }
        _ => unreachable!("only called for WRITE and RM"),
    }
    Ok(())
}

fn acknowledge(h: &Header) -> Result<(), PeerError> {
    match h.kind {
        MsgType::Error if h.data_len > 0 => Err(PeerError::ErrorWithData(h.data_len)),
        _ => Ok(()),
    }
}

/// dom0's end of one VM's QubesDB vchan.
#[derive(Debug, Default)]
pub struct Dom0Side {
    framer: Framer,
    synced: bool,
}

impl Dom0Side {
    pub fn new() -> Dom0Side {
        Dom0Side::default()
    }

    /// True once the VM has its copy: only then are local changes sent.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Takes bytes from the VM.
    pub fn input(&mut self, db: &mut Db, bytes: &[u8]) -> Result<Output, PeerError> {
        self.framer.buf.extend_from_slice(bytes);
        let mut out = Output::default();
        while let Some((h, data)) = self.framer.next(MsgType::allowed_on_vchan)? {
            match h.kind {
                MsgType::Multiread => {
                    if self.synced {
                        return Err(PeerError::SpuriousMultiread);
                    }
                    if !data.is_empty() {
                        reply(&mut out, MsgType::Error, &h.path);
                        continue;
                    }
                    for (path, value) in db.multiread(&h.path) {
                        out.send.extend_from_slice(&Header::message(
                            MsgType::RespMultiread,
                            path,
                            value,
                        ));
                    }
                    let end = QdbPath::new("").expect("the empty path is valid");
                    reply(&mut out, MsgType::RespMultiread, &end);
                    self.synced = true;
                }
                MsgType::Write | MsgType::Rm => apply_remote(db, &mut out, &h, &data)?,
                MsgType::Ok | MsgType::Error => acknowledge(&h)?,
                MsgType::RespMultiread => return Err(PeerError::SpuriousMultireadResponse),
                other => return Err(PeerError::NotAllowed(other)),
            }
        }
        Ok(out)
    }

    /// The message that forwards a local write, once the VM is synced.
    pub fn forward_write(&self, path: &QdbPath, value: &[u8]) -> Option<Vec<u8>> {
        self.synced
            .then(|| Header::message(MsgType::Write, path, value))
    }

    /// The message that forwards a local removal, once the VM is synced.
    pub fn forward_rm(&self, path: &QdbPath) -> Option<Vec<u8>> {
        self.synced.then(|| Header::message(MsgType::Rm, path, &[]))
    }
}

/// A VM's end: asks for the database, then mirrors dom0's changes.
#[derive(Debug, Default)]
pub struct VmSide {
    framer: Framer,
    synced: bool,
}

impl VmSide {
    /// The side and the request it must send first.
    pub fn new() -> (VmSide, Vec<u8>) {
        let all = QdbPath::new("").expect("the empty path is valid");
        (
            VmSide::default(),
            Header::message(MsgType::Multiread, &all, &[]),
        )
    }

    /// True once dom0's whole dump has arrived.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn input(&mut self, db: &mut Db, bytes: &[u8]) -> Result<Output, PeerError> {
        self.framer.buf.extend_from_slice(bytes);
        let mut out = Output::default();
        let allowed = |k: MsgType| {
            matches!(
                k,
                MsgType::Write
                    | MsgType::Rm
                    | MsgType::Ok
                    | MsgType::Error
                    | MsgType::RespMultiread
            )
        };
        while let Some((h, data)) = self.framer.next(allowed)? {
            match h.kind {
                MsgType::RespMultiread => {
                    if self.synced {
                        return Err(PeerError::SpuriousMultireadResponse);
                    }
                    if h.path.is_empty() {
                        self.synced = true;
                        continue;
                    }
                    if check_data(&data).is_err() {
                        return Err(PeerError::NulInValue(h.path));
                    }
                    db.write(&h.path, &data).map_err(|e| PeerError::Write {
                        path: h.path.clone(),
                        reason: e.to_string(),
                    })?;
                    out.changed.push(h.path);
                }
                MsgType::Write | MsgType::Rm => apply_remote(db, &mut out, &h, &data)?,
                MsgType::Ok | MsgType::Error => acknowledge(&h)?,
                other => return Err(PeerError::NotAllowed(other)),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> QdbPath {
        QdbPath::new(s).unwrap()
    }

    #[test]
    fn sync_then_forward_both_ways() {
        let mut dom0_db = Db::new();
        dom0_db.write(&p("/name"), b"work").unwrap();
        dom0_db.write(&p("/qubes-vm-type"), b"AppVM").unwrap();
        let mut d = Dom0Side::new();
        assert_eq!(d.forward_write(&p("/x"), b"1"), None, "not before the sync");

        let (mut v, req) = VmSide::new();
        let mut vm_db = Db::new();
        // Byte by byte: framing must survive any split.
        let mut to_vm = Vec::new();
        for b in &req {
            to_vm.extend(d.input(&mut dom0_db, std::slice::from_ref(b)).unwrap().send);
        }
        let out = v.input(&mut vm_db, &to_vm).unwrap();
        assert!(v.synced() && d.synced());
        assert_eq!(vm_db, dom0_db);
        assert_eq!(out.changed.len(), 2);

        // dom0 writes; the VM applies and acknowledges.
        dom0_db.write(&p("/qubes-gui-domain-xid"), b"1").unwrap();
        let msg = d.forward_write(&p("/qubes-gui-domain-xid"), b"1").unwrap();
        let out = v.input(&mut vm_db, &msg).unwrap();
        assert_eq!(vm_db.read(&p("/qubes-gui-domain-xid")), Some(&b"1"[..]));
        let back = d.input(&mut dom0_db, &out.send).unwrap();
        assert_eq!(back, Output::default());

        // The VM writes its own key into dom0's copy.
        let w = Header::message(MsgType::Write, &p("/qubes-service/x"), b"1");
        let out = d.input(&mut dom0_db, &w).unwrap();
        assert_eq!(out.changed, vec![p("/qubes-service/x")]);
        assert_eq!(
            Header::parse(out.send[..HEADER_LEN].try_into().unwrap())
                .unwrap()
                .kind,
            MsgType::Ok
        );
    }

    #[test]
    fn hostile_vm_messages() {
        let mut db = Db::new();
        let mut d = Dom0Side::new();
        // READ is a local command, never a vchan one.
        let r = Header::message(MsgType::Read, &p("/name"), &[]);
        assert_eq!(
            d.input(&mut db, &r),
            Err(PeerError::NotAllowed(MsgType::Read))
        );

        let mut d = Dom0Side::new();
        let m = Header::message(MsgType::Multiread, &p(""), &[]);
        d.input(&mut db, &m).unwrap();
        assert_eq!(d.input(&mut db, &m), Err(PeerError::SpuriousMultiread));

        let mut d = Dom0Side::new();
        let rm = Header::message(MsgType::Rm, &p("/nothing"), &[]);
        assert_eq!(
            d.input(&mut db, &rm),
            Err(PeerError::RemoveMissing(p("/nothing")))
        );

        // A NUL in a value is answered with an error; the link survives.
        let mut d = Dom0Side::new();
        let w = Header::message(MsgType::Write, &p("/a"), b"x\0y");
        let out = d.input(&mut db, &w).unwrap();
        assert_eq!(out.send[0], MsgType::Error as u8);
        assert!(db.is_empty());

        let mut d = Dom0Side::new();
        let w = Header::message(MsgType::Write, &p("rel"), b"x");
        assert!(matches!(d.input(&mut db, &w), Err(PeerError::Write { .. })));
    }
}
