//! The messages of `libqrexec/qrexec.h`: a header `{u32 type, u32 len}`
//! followed by `len` bytes whose layout depends on the type. Integers are
//! little-endian (x86, the only architecture Qubes runs on). Strings in
//! fixed-size fields are NUL-terminated and NUL-padded.

use std::fmt;

pub const HEADER_LEN: usize = 8;
/// `QREXEC_PROTOCOL_VERSION`.
pub const PROTOCOL_VERSION: u32 = 3;
/// `MAX_DATA_CHUNK_V2`: the largest data message of protocol 2.
pub const MAX_DATA_CHUNK_V2: usize = 4096;
/// `MAX_DATA_CHUNK_V3`: the largest data message of protocol 3.
pub const MAX_DATA_CHUNK_V3: usize = 65536;
/// `MAX_SERVICE_NAME_LEN`.
pub const MAX_SERVICE_NAME_LEN: usize = 65000;
/// `MAX_QREXEC_CMD_LEN`.
pub const MAX_QREXEC_CMD_LEN: usize = 65535;
/// `VCHAN_BASE_PORT`: the control channel's port.
pub const VCHAN_BASE_PORT: u32 = 512;
/// `RPC_REQUEST_COMMAND`: a command line `QUBESRPC <service> <source>`
/// calls a service rather than running a command.
pub const RPC_REQUEST_COMMAND: &str = "QUBESRPC";
/// `NOGUI_CMD_PREFIX`.
pub const NOGUI_CMD_PREFIX: &str = "nogui:";

/// Sizes of the fixed parts.
pub const EXEC_PARAMS_LEN: usize = 8;
pub const SERVICE_IDENT_LEN: usize = 32;
pub const TRIGGER3_TARGET_LEN: usize = 64;
pub const TRIGGER3_FIXED_LEN: usize = TRIGGER3_TARGET_LEN + SERVICE_IDENT_LEN;

/// The message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MsgType {
    /// daemon → agent: run a command, its stdio over a data vchan.
    ExecCmdline = 0x200,
    /// daemon → agent: run a command with stdio on /dev/null.
    JustExec = 0x201,
    /// daemon → agent: connect a waiting service call's data vchan.
    ServiceConnect = 0x202,
    /// daemon → agent: a service call was refused.
    ServiceRefused = 0x203,
    /// agent → daemon: call a service (protocol 2).
    TriggerService = 0x210,
    /// agent → daemon: a data connection ended, its port is free.
    ConnectionTerminated = 0x211,
    /// agent → daemon: call a service (protocol 3).
    TriggerService3 = 0x212,
    /// Both: the first message, with the protocol version.
    Hello = 0x300,
    /// Data channel: stdin, towards the process.
    DataStdin = 0x190,
    /// Data channel: the process's stdout.
    DataStdout = 0x191,
    /// Data channel: the process's stderr.
    DataStderr = 0x192,
    /// Data channel: the process's exit code.
    DataExitCode = 0x193,
}

impl MsgType {
    pub fn from_u32(v: u32) -> Option<MsgType> {
        use MsgType::*;
        Some(match v {
            0x200 => ExecCmdline,
            0x201 => JustExec,
            0x202 => ServiceConnect,
            0x203 => ServiceRefused,
            0x210 => TriggerService,
            0x211 => ConnectionTerminated,
            0x212 => TriggerService3,
            0x300 => Hello,
            0x190 => DataStdin,
            0x191 => DataStdout,
            0x192 => DataStderr,
            0x193 => DataExitCode,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use MsgType::*;
        match self {
            ExecCmdline => "MSG_EXEC_CMDLINE",
            JustExec => "MSG_JUST_EXEC",
            ServiceConnect => "MSG_SERVICE_CONNECT",
            ServiceRefused => "MSG_SERVICE_REFUSED",
            TriggerService => "MSG_TRIGGER_SERVICE",
            ConnectionTerminated => "MSG_CONNECTION_TERMINATED",
            TriggerService3 => "MSG_TRIGGER_SERVICE3",
            Hello => "MSG_HELLO",
            DataStdin => "MSG_DATA_STDIN",
            DataStdout => "MSG_DATA_STDOUT",
            DataStderr => "MSG_DATA_STDERR",
            DataExitCode => "MSG_DATA_EXIT_CODE",
        }
    }
}

impl fmt::Display for MsgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message type {0:#x} is not a qrexec message")]
    UnknownType(u32),
    #[error("{kind} of {len} bytes is over the {max}-byte limit")]
    TooLong { kind: MsgType, len: u32, max: usize },
    #[error("{kind}: {reason}")]
    BadPayload { kind: MsgType, reason: &'static str },
}

/// `struct msg_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: MsgType,
    pub len: u32,
}

impl Header {
    /// Parses a header. Its type must be known; the length limit depends
    /// on where the message arrives and is the caller's to check.
    pub fn parse(raw: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let kind_raw = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        let kind = MsgType::from_u32(kind_raw).ok_or(WireError::UnknownType(kind_raw))?;
        Ok(Header { kind, len })
    }

    pub fn render(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&(self.kind as u32).to_le_bytes());
        out[4..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// The payload length, checked against `max`.
    pub fn checked_len(&self, max: usize) -> Result<usize, WireError> {
        let len = self.len as usize;
        if len > max {
            return Err(WireError::TooLong {
                kind: self.kind,
                len: self.len,
                max,
            });
        }
        Ok(len)
    }
}

/// A header and its payload, as one message.
pub fn message(kind: MsgType, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("payloads are far under 4 GiB");
    let mut out = Header { kind, len }.render().to_vec();
    out.extend_from_slice(payload);
    out
}

fn bad(kind: MsgType, reason: &'static str) -> WireError {
    WireError::BadPayload { kind, reason }
}

/// A fixed-size, NUL-terminated field: the text before the NUL, which
/// must be there, and ASCII.
fn fixed_str(kind: MsgType, field: &[u8], what: &'static str) -> Result<String, WireError> {
    let end = field
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| bad(kind, what))?;
    let s = &field[..end];
    if !s.is_ascii() {
        return Err(bad(kind, what));
    }
    Ok(String::from_utf8_lossy(s).into_owned())
}

/// Writes `s` into a fixed field of `len` bytes, NUL-padded; it must
/// leave room for the terminating NUL.
fn put_fixed(out: &mut Vec<u8>, s: &str, len: usize) {
    assert!(s.len() < len, "field checked by the caller");
    out.extend_from_slice(s.as_bytes());
    out.resize(out.len() + (len - s.len()), 0);
}

/// `struct peer_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    pub version: u32,
}

impl PeerInfo {
    pub fn parse(payload: &[u8]) -> Result<PeerInfo, WireError> {
        let b: [u8; 4] = payload
            .try_into()
            .map_err(|_| bad(MsgType::Hello, "not 4 bytes"))?;
        Ok(PeerInfo {
            version: u32::from_le_bytes(b),
        })
    }

    pub fn message(&self) -> Vec<u8> {
        message(MsgType::Hello, &self.version.to_le_bytes())
    }
}

/// `struct exec_params`: where to connect for the data, and a command
/// line (or, for `MSG_SERVICE_CONNECT`, a request id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecParams {
    pub connect_domain: u32,
    pub connect_port: u32,
    /// Without its terminating NUL.
    pub cmdline: Vec<u8>,
}

impl ExecParams {
    pub fn parse(kind: MsgType, payload: &[u8]) -> Result<ExecParams, WireError> {
        if payload.len() < EXEC_PARAMS_LEN {
            return Err(bad(kind, "shorter than struct exec_params"));
        }
        let word = |i: usize| {
            u32::from_le_bytes([payload[i], payload[i + 1], payload[i + 2], payload[i + 3]])
        };
        let rest = &payload[EXEC_PARAMS_LEN..];
        // The command line is NUL-terminated, and the NUL is its end: a
        // NUL inside it would make C and us read different commands.
        let cmdline = match rest.split_last() {
            Some((0, body)) if !body.contains(&0) => body.to_vec(),
            None if kind == MsgType::ConnectionTerminated => Vec::new(),
            _ => return Err(bad(kind, "command line not terminated by its only NUL")),
        };
        Ok(ExecParams {
            connect_domain: word(0),
            connect_port: word(4),
            cmdline,
        })
    }

    pub fn render(&self, with_cmdline: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(EXEC_PARAMS_LEN + self.cmdline.len() + 1);
        out.extend_from_slice(&self.connect_domain.to_le_bytes());
        out.extend_from_slice(&self.connect_port.to_le_bytes());
        if with_cmdline {
            out.extend_from_slice(&self.cmdline);
            out.push(0);
        }
        out
    }
}

/// `struct service_params`: a service call's request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceParams {
    pub ident: String,
}

impl ServiceParams {
    pub fn parse(kind: MsgType, field: &[u8]) -> Result<ServiceParams, WireError> {
        if field.len() != SERVICE_IDENT_LEN {
            return Err(bad(kind, "request id is not 32 bytes"));
        }
        Ok(ServiceParams {
            ident: fixed_str(kind, field, "request id not NUL-terminated ASCII")?,
        })
    }

    pub fn render(&self, out: &mut Vec<u8>) {
        put_fixed(out, &self.ident, SERVICE_IDENT_LEN);
    }
}

/// `struct trigger_service_params3` and the service name after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerService3 {
    pub target_domain: String,
    pub request_id: ServiceParams,
    /// `<service>[+<argument>]`, unchecked here (see the policy's rules).
    pub service_name: String,
}

impl TriggerService3 {
    pub fn parse(payload: &[u8]) -> Result<TriggerService3, WireError> {
        let kind = MsgType::TriggerService3;
        if payload.len() <= TRIGGER3_FIXED_LEN {
            return Err(bad(kind, "shorter than its fixed part and a service name"));
        }
        let target_domain = fixed_str(
            kind,
            &payload[..TRIGGER3_TARGET_LEN],
            "target not NUL-terminated ASCII",
        )?;
        let request_id =
            ServiceParams::parse(kind, &payload[TRIGGER3_TARGET_LEN..TRIGGER3_FIXED_LEN])?;
        let name = &payload[TRIGGER3_FIXED_LEN..];
        let service = match name.split_last() {
            Some((0, body)) if !body.contains(&0) && body.is_ascii() => body,
            _ => return Err(bad(kind, "service name not terminated by its only NUL")),
        };
        if service.len() > MAX_SERVICE_NAME_LEN {
            return Err(bad(kind, "service name too long"));
        }
        Ok(TriggerService3 {
            target_domain,
            request_id,
            service_name: String::from_utf8_lossy(service).into_owned(),
        })
    }

    pub fn message(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(TRIGGER3_FIXED_LEN + self.service_name.len() + 1);
        put_fixed(&mut p, &self.target_domain, TRIGGER3_TARGET_LEN);
        self.request_id.render(&mut p);
        p.extend_from_slice(self.service_name.as_bytes());
        p.push(0);
        message(MsgType::TriggerService3, &p)
    }
}

/// `MSG_SERVICE_CONNECT` to an agent: where a call's data vchan is
/// (`struct exec_params` without a command line) and the call's request
/// id. The agent hands the first 8 bytes, [`ServiceConnect::params`], to
/// the caller (`qrexec-client-vm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConnect {
    pub connect_domain: u32,
    pub connect_port: u32,
    pub request_id: ServiceParams,
}

impl ServiceConnect {
    pub fn parse(payload: &[u8]) -> Result<ServiceConnect, WireError> {
        let kind = MsgType::ServiceConnect;
        if payload.len() != EXEC_PARAMS_LEN + SERVICE_IDENT_LEN {
            return Err(bad(kind, "not exec_params and a request id"));
        }
        let (params, ident) = payload.split_at(EXEC_PARAMS_LEN);
        let mut p = [0u8; EXEC_PARAMS_LEN];
        p.copy_from_slice(params);
        let (connect_domain, connect_port) = ServiceConnect::parse_params(p);
        Ok(ServiceConnect {
            connect_domain,
            connect_port,
            request_id: ServiceParams::parse(kind, ident)?,
        })
    }

    /// The caller's 8 bytes: domain and port.
    pub fn params(&self) -> [u8; EXEC_PARAMS_LEN] {
        let mut p = [0u8; EXEC_PARAMS_LEN];
        p[..4].copy_from_slice(&self.connect_domain.to_le_bytes());
        p[4..].copy_from_slice(&self.connect_port.to_le_bytes());
        p
    }

    /// Domain and port from the caller's 8 bytes.
    pub fn parse_params(p: [u8; EXEC_PARAMS_LEN]) -> (u32, u32) {
        (
            u32::from_le_bytes([p[0], p[1], p[2], p[3]]),
            u32::from_le_bytes([p[4], p[5], p[6], p[7]]),
        )
    }

    pub fn message(&self) -> Vec<u8> {
        let mut p = self.params().to_vec();
        self.request_id.render(&mut p);
        message(MsgType::ServiceConnect, &p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let m = message(MsgType::Hello, &3u32.to_le_bytes());
        assert_eq!(m, [0x00, 0x03, 0, 0, 4, 0, 0, 0, 3, 0, 0, 0]);
        let h = Header::parse(m[..8].try_into().unwrap()).unwrap();
        assert_eq!(
            h,
            Header {
                kind: MsgType::Hello,
                len: 4
            }
        );
        assert_eq!(PeerInfo::parse(&m[8..]).unwrap().version, 3);
        assert!(Header::parse(&[0xff; 8]).is_err());
        assert!(h.checked_len(3).is_err());
    }

    #[test]
    fn exec_params_round_trip_and_checks() {
        let p = ExecParams {
            connect_domain: 0,
            connect_port: 513,
            cmdline: b"user:echo hi".to_vec(),
        };
        let raw = p.render(true);
        assert_eq!(&raw[..8], &[0, 0, 0, 0, 1, 2, 0, 0]);
        assert_eq!(ExecParams::parse(MsgType::ExecCmdline, &raw).unwrap(), p);
        for bad in [
            &b"\0\0\0"[..],
            b"\0\0\0\0\0\0\0\0abc",
            b"\0\0\0\0\0\0\0\0a\0b\0",
        ] {
            assert!(
                ExecParams::parse(MsgType::ExecCmdline, bad).is_err(),
                "{bad:?}"
            );
        }
        let term = ExecParams::parse(MsgType::ConnectionTerminated, &p.render(false)).unwrap();
        assert!(term.cmdline.is_empty());
    }

    #[test]
    fn trigger3_round_trip_and_checks() {
        let t = TriggerService3 {
            target_domain: "@default".into(),
            request_id: ServiceParams {
                ident: "SOCKET7".into(),
            },
            service_name: "qubes.Filecopy+arg".into(),
        };
        let m = t.message();
        let h = Header::parse(m[..8].try_into().unwrap()).unwrap();
        assert_eq!(h.kind, MsgType::TriggerService3);
        assert_eq!(h.len as usize, 64 + 32 + t.service_name.len() + 1);
        assert_eq!(TriggerService3::parse(&m[8..]).unwrap(), t);
        let mut no_nul = m[8..].to_vec();
        no_nul.pop();
        assert!(TriggerService3::parse(&no_nul).is_err());
        let mut target_unterminated = m[8..].to_vec();
        target_unterminated[..64].fill(b'a');
        assert!(TriggerService3::parse(&target_unterminated).is_err());
        assert!(TriggerService3::parse(&m[8..8 + 96]).is_err());
    }

    #[test]
    fn service_connect_round_trips() {
        let c = ServiceConnect {
            connect_domain: 3,
            connect_port: 514,
            request_id: ServiceParams {
                ident: "SOCKET7".into(),
            },
        };
        let m = c.message();
        assert_eq!(&m[..8], &[0x02, 0x02, 0, 0, 40, 0, 0, 0]);
        assert_eq!(&m[8..16], &[3, 0, 0, 0, 2, 2, 0, 0]);
        assert_eq!(ServiceConnect::parse(&m[8..]).unwrap(), c);
        assert_eq!(ServiceConnect::parse_params(c.params()), (3, 514));
        assert!(ServiceConnect::parse(&m[8..47]).is_err());
    }
}
