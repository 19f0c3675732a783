//! A request: what the host sends to dom0's `qcmd`, one line.
//!
//! ```text
//! QCMD1 <op> <id> <payload> <crc>
//! ```
//!
//! `op` is `run`, `spawn` or `resend`; `payload` is lower-case hex (`-` for
//! none): the shell command for `run` and `spawn`, a comma-separated list
//! of frame numbers for `resend` (none: every frame, or just a sign of
//! life while the command still runs); `crc` is the CRC-32 of everything
//! before its own space, as eight hex digits.

use crate::{crc_hex, parse_payload, payload_hex, valid_id};

/// The first word of every request.
pub const REQUEST_START: &str = "QCMD1";

/// The most payload bytes a request carries. A request is typed into a
/// shell on lab machines, whose line editor takes about 1 KiB; the
/// transports may set a lower bound of their own.
pub const MAX_REQUEST_PAYLOAD: usize = 4096;

/// What the host asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Run a shell command to its end; reply with its output and status.
    Run,
    /// Start a shell command and do not wait for it (a reboot, an update
    /// that a power cut will interrupt); reply at once.
    Spawn,
    /// Print the reply's frames again: the listed ones, or all.
    Resend,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Run => "run",
            Op::Spawn => "spawn",
            Op::Resend => "resend",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "run" => Some(Op::Run),
            "spawn" => Some(Op::Spawn),
            "resend" => Some(Op::Resend),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request: does not start with {REQUEST_START}")]
    NotARequest,
    #[error("request: expected 5 fields separated by single spaces, found {0}")]
    Fields(usize),
    #[error("request field `{field}`: {reason}")]
    Field {
        field: &'static str,
        reason: &'static str,
    },
    /// The line arrived garbled: its text does not match its checksum.
    /// `id` is the id field as it arrived, when it is well formed, so the
    /// sender can be told.
    #[error("request: checksum {found} does not match the text ({expected})")]
    Checksum {
        id: Option<String>,
        found: String,
        expected: String,
    },
    #[error("request: the payload of {op} must be a UTF-8 {what}")]
    Payload {
        op: &'static str,
        what: &'static str,
    },
}

impl RequestError {
    /// The id the request claimed, when it can be trusted enough to answer
    /// to (well formed, even if the checksum failed).
    pub fn id(&self) -> Option<&str> {
        match self {
            RequestError::Checksum { id, .. } => id.as_deref(),
            _ => None,
        }
    }
}

/// The frames a `resend` asks for: `seqs`, and every frame from `from`
/// on. Neither: all of them (or a sign of life while the command runs).
///
/// On the wire a comma-separated list whose last item may be `N-`:
/// `3,5,9-`. The host asks for "from N on" when it has not seen the end
/// frame, whose number it then does not know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resend {
    pub seqs: Vec<u32>,
    pub from: Option<u32>,
}

impl Resend {
    /// Everything.
    pub fn all() -> Self {
        Self::default()
    }

    /// Whether frame `seq` is asked for.
    pub fn wants(&self, seq: u32) -> bool {
        (self.seqs.is_empty() && self.from.is_none())
            || self.seqs.contains(&seq)
            || self.from.is_some_and(|f| seq >= f)
    }

    fn render(&self) -> String {
        let mut items: Vec<String> = self.seqs.iter().map(u32::to_string).collect();
        if let Some(f) = self.from {
            items.push(format!("{f}-"));
        }
        items.join(",")
    }

    fn parse(text: &str) -> Option<Self> {
        let mut r = Self::default();
        if text.is_empty() {
            return Some(r);
        }
        let number = |n: &str| {
            (!n.is_empty() && n.len() <= 10 && n.bytes().all(|b| b.is_ascii_digit()))
                .then(|| n.parse::<u32>().ok())
                .flatten()
        };
        let items: Vec<&str> = text.split(',').collect();
        for (i, item) in items.iter().enumerate() {
            match item.strip_suffix('-') {
                Some(n) if i + 1 == items.len() => r.from = Some(number(n)?),
                Some(_) => return None,
                None => r.seqs.push(number(item)?),
            }
        }
        Some(r)
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub id: String,
    pub payload: Vec<u8>,
}

impl Request {
    /// A request to run `command` and wait for it.
    pub fn run(id: &str, command: &str) -> Self {
        Self {
            op: Op::Run,
            id: id.to_owned(),
            payload: command.as_bytes().to_vec(),
        }
    }

    /// A request to start `command` without waiting for it.
    pub fn spawn(id: &str, command: &str) -> Self {
        Self {
            op: Op::Spawn,
            id: id.to_owned(),
            payload: command.as_bytes().to_vec(),
        }
    }

    /// A request to print frames of `id`'s reply again.
    pub fn resend(id: &str, which: &Resend) -> Self {
        Self {
            op: Op::Resend,
            id: id.to_owned(),
            payload: which.render().into_bytes(),
        }
    }

    /// The shell command of a `run` or `spawn`.
    pub fn command(&self) -> Result<&str, RequestError> {
        std::str::from_utf8(&self.payload).map_err(|_| RequestError::Payload {
            op: self.op.as_str(),
            what: "shell command",
        })
    }

    /// Which frames a `resend` asks for.
    pub fn resend_which(&self) -> Result<Resend, RequestError> {
        let bad = RequestError::Payload {
            op: "resend",
            what: "list of frame numbers (`3,5,9-`)",
        };
        let text = std::str::from_utf8(&self.payload).map_err(|_| bad.clone())?;
        Resend::parse(text).ok_or(bad)
    }

    /// The request as one line, without the newline.
    pub fn render(&self) -> String {
        let body = format!(
            "{REQUEST_START} {} {} {}",
            self.op.as_str(),
            self.id,
            payload_hex(&self.payload)
        );
        let crc = crc_hex(body.as_bytes());
        format!("{body} {crc}")
    }

    /// Parses one line (surrounding white space, a `\r` included, is not
    /// part of it).
    pub fn parse(line: &str) -> Result<Self, RequestError> {
        let line = line.trim();
        if !line.starts_with(REQUEST_START) {
            return Err(RequestError::NotARequest);
        }
        let fields: Vec<&str> = line.split(' ').collect();
        let [start, op, id, payload, crc] = fields[..] else {
            return Err(RequestError::Fields(fields.len()));
        };
        if start != REQUEST_START {
            return Err(RequestError::NotARequest);
        }
        let id_ok = valid_id(id);
        let body_len = line.len() - crc.len() - 1;
        let expected = crc_hex(&line.as_bytes()[..body_len]);
        if crc != expected {
            return Err(RequestError::Checksum {
                id: id_ok.then(|| id.to_owned()),
                found: crc.chars().take(16).collect(),
                expected,
            });
        }
        let op = Op::parse(op).ok_or(RequestError::Field {
            field: "op",
            reason: "not one of run, spawn, resend",
        })?;
        if !id_ok {
            return Err(RequestError::Field {
                field: "id",
                reason: "not 1 to 24 characters of 0-9a-z",
            });
        }
        let payload =
            parse_payload(payload, MAX_REQUEST_PAYLOAD).map_err(|reason| RequestError::Field {
                field: "payload",
                reason,
            })?;
        let req = Self {
            op,
            id: id.to_owned(),
            payload,
        };
        match op {
            Op::Run | Op::Spawn => {
                if req.command()?.trim().is_empty() {
                    return Err(RequestError::Field {
                        field: "payload",
                        reason: "empty command",
                    });
                }
            }
            Op::Resend => {
                req.resend_which()?;
            }
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_renders_and_parses_back() {
        for req in [
            Request::run("a1", "echo hi; ls / | wc -l"),
            Request::spawn("b2", "qinit ctl reboot"),
            Request::resend(
                "c3",
                &Resend {
                    seqs: vec![1, 7, 4_000_000_000],
                    from: Some(9),
                },
            ),
            Request::resend("c3", &Resend::all()),
        ] {
            let line = req.render();
            assert!(line.is_ascii() && !line.contains('\n'), "{line}");
            assert_eq!(Request::parse(&line), Ok(req.clone()));
            assert_eq!(Request::parse(&format!("  {line}\r")), Ok(req));
        }
        let which = Resend {
            seqs: vec![2, 3],
            from: None,
        };
        let r = Request::parse(&Request::resend("x", &which).render()).expect("parse");
        assert_eq!(r.resend_which(), Ok(which));
        let from = Resend {
            seqs: vec![],
            from: Some(4),
        };
        assert!(!from.wants(3) && from.wants(4) && from.wants(90));
        assert!(Resend::all().wants(1));
        assert_eq!(Resend::parse("1-,2"), None);
        assert_eq!(Resend::parse("-"), None);
        assert_eq!(Resend::parse("1,,2"), None);
    }

    #[test]
    fn a_garbled_request_is_refused_by_its_checksum_and_keeps_its_id() {
        let line = Request::run("a1", "rm -rf /tmp/x").render();
        // One character lost on the way in, as a busy serial line does.
        let mut lost = line.clone();
        lost.remove(20);
        let err = Request::parse(&lost).unwrap_err();
        assert!(matches!(err, RequestError::Checksum { .. }), "{err}");
        assert_eq!(err.id(), Some("a1"));
        // A flipped payload digit.
        let flipped = line.replacen("72", "73", 1);
        assert!(matches!(
            Request::parse(&flipped),
            Err(RequestError::Checksum { .. })
        ));
    }

    #[test]
    fn malformed_requests_name_the_field() {
        let with_crc = |body: &str| format!("{body} {}", crc_hex(body.as_bytes()));
        let cases = [
            ("echo hi", RequestError::NotARequest),
            ("QCMD1 run a1 6869", RequestError::Fields(4)),
            ("QCMD12 run a1 6869 00000000", RequestError::NotARequest),
        ];
        for (line, want) in cases {
            assert_eq!(Request::parse(line), Err(want), "{line}");
        }
        for (body, field) in [
            ("QCMD1 exec a1 6869", "op"),
            ("QCMD1 run A1 6869", "id"),
            ("QCMD1 run a1 68G9", "payload"),
            ("QCMD1 run a1 -", "payload"),
            ("QCMD1 run a1 2020", "payload"),
        ] {
            match Request::parse(&with_crc(body)) {
                Err(RequestError::Field { field: f, .. }) => assert_eq!(f, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(matches!(
            Request::parse(&with_crc("QCMD1 run a1 ff")),
            Err(RequestError::Payload { .. })
        ));
        assert!(matches!(
            Request::parse(&with_crc("QCMD1 resend a1 312c")),
            Err(RequestError::Payload { .. })
        ));
        let long = format!("QCMD1 run a1 {}", "61".repeat(MAX_REQUEST_PAYLOAD + 1));
        assert!(matches!(
            Request::parse(&with_crc(&long)),
            Err(RequestError::Field {
                field: "payload",
                ..
            })
        ));
    }
}
