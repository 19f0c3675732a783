//! A reply frame: what dom0 prints back, found anywhere in the stream.
//!
//! ```text
//! {QF1 <id> <seq> <kind> <payload> <crc>}
//! ```
//!
//! `kind` is `ack` (the request arrived; seq 0), `wait` (asked again while
//! the command still runs; seq 0), `data` (a piece of the output; seq 1 to
//! n), `end` (status and digest; seq n+1) or `err` (the request was
//! refused; seq 0, the payload says why). `payload` is lower-case hex, `-`
//! for none, and `crc` is the CRC-32 of the text between `{` and the space
//! before it. Neither brace occurs inside a frame, so a frame that kernel
//! text broke into cannot hide the start of the next one.

use crate::{crc_hex, parse_payload, payload_hex, valid_id, MAX_ID_LEN};

/// How every frame begins.
pub const FRAME_START: &[u8] = b"{QF1 ";
const FRAME_END: u8 = b'}';

/// The most payload bytes one frame carries.
pub const MAX_FRAME_PAYLOAD: usize = 96;

/// The longest a frame can be, braces included: a candidate longer than
/// this without its closing brace is not a frame.
pub const MAX_FRAME_LEN: usize =
    FRAME_START.len() + MAX_ID_LEN + 1 + 10 + 1 + 4 + 1 + 2 * MAX_FRAME_PAYLOAD + 1 + 8 + 1;

/// What a frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Ack,
    Wait,
    Data,
    End,
    Err,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Ack => "ack",
            Kind::Wait => "wait",
            Kind::Data => "data",
            Kind::End => "end",
            Kind::Err => "err",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ack" => Kind::Ack,
            "wait" => Kind::Wait,
            "data" => Kind::Data,
            "end" => Kind::End,
            "err" => Kind::Err,
            _ => return None,
        })
    }
}

/// Why a candidate is not a frame. The scanner drops such candidates: on
/// a shared console they are frames that something printed into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame: not framed by `{{QF1 ` and `}}`")]
    Delimiters,
    #[error("frame: not printable ASCII")]
    NotAscii,
    #[error("frame: expected 5 fields after QF1, found {0}")]
    Fields(usize),
    #[error("frame: checksum does not match the text")]
    Checksum,
    #[error("frame field `{field}`: {reason}")]
    Field {
        field: &'static str,
        reason: &'static str,
    },
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: String,
    pub seq: u32,
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn ack(id: &str) -> Self {
        Self::control(id, Kind::Ack, Vec::new())
    }

    pub fn wait(id: &str) -> Self {
        Self::control(id, Kind::Wait, Vec::new())
    }

    /// A refusal; `reason` is cut to fit one frame.
    pub fn err(id: &str, reason: &str) -> Self {
        let mut end = reason.len().min(MAX_FRAME_PAYLOAD);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        Self::control(id, Kind::Err, reason.as_bytes()[..end].to_vec())
    }

    fn control(id: &str, kind: Kind, payload: Vec<u8>) -> Self {
        Self {
            id: id.to_owned(),
            seq: 0,
            kind,
            payload,
        }
    }

    /// The frame as text, without a newline.
    pub fn render(&self) -> String {
        let body = format!(
            "QF1 {} {} {} {}",
            self.id,
            self.seq,
            self.kind.as_str(),
            payload_hex(&self.payload)
        );
        let crc = crc_hex(body.as_bytes());
        format!("{{{body} {crc}}}")
    }

    /// Parses one candidate, `{` to `}` inclusive.
    pub fn parse(bytes: &[u8]) -> Result<Self, FrameError> {
        let inner = bytes
            .strip_prefix(b"{")
            .and_then(|b| b.strip_suffix(&[FRAME_END]))
            .filter(|_| bytes.starts_with(FRAME_START))
            .ok_or(FrameError::Delimiters)?;
        if bytes.len() > MAX_FRAME_LEN {
            return Err(FrameError::Field {
                field: "payload",
                reason: "frame too long",
            });
        }
        if !inner.iter().all(|b| (0x20..0x7f).contains(b)) {
            return Err(FrameError::NotAscii);
        }
        let text = std::str::from_utf8(inner).map_err(|_| FrameError::NotAscii)?;
        let fields: Vec<&str> = text.split(' ').collect();
        let [_, id, seq, kind, payload, crc] = fields[..] else {
            return Err(FrameError::Fields(fields.len().saturating_sub(1)));
        };
        let body = &text[..text.len() - crc.len() - 1];
        if crc != crc_hex(body.as_bytes()) {
            return Err(FrameError::Checksum);
        }
        let field = |field, reason| FrameError::Field { field, reason };
        if !valid_id(id) {
            return Err(field("id", "not 1 to 24 characters of 0-9a-z"));
        }
        if seq.is_empty() || seq.len() > 10 || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(field("seq", "not a decimal number"));
        }
        let seq: u32 = seq.parse().map_err(|_| field("seq", "out of range"))?;
        let kind = Kind::parse(kind).ok_or(field("kind", "unknown"))?;
        let payload =
            parse_payload(payload, MAX_FRAME_PAYLOAD).map_err(|reason| field("payload", reason))?;
        match kind {
            Kind::Ack | Kind::Wait | Kind::Err if seq != 0 => {
                return Err(field("seq", "must be 0 for ack, wait and err"))
            }
            Kind::Data | Kind::End if seq == 0 => {
                return Err(field("seq", "must not be 0 for data and end"))
            }
            Kind::Data if payload.is_empty() => return Err(field("payload", "empty data")),
            _ => {}
        }
        Ok(Self {
            id: id.to_owned(),
            seq,
            kind,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_render_and_parse_back() {
        let frames = [
            Frame::ack("a1"),
            Frame::wait("a1"),
            Frame::err("a1", "request: checksum"),
            Frame {
                id: "a1".into(),
                seq: 1,
                kind: Kind::Data,
                payload: vec![0, 0xff, b'\n', b'{', b'}'],
            },
            Frame {
                id: "z".repeat(MAX_ID_LEN),
                seq: u32::MAX,
                kind: Kind::End,
                payload: vec![b'x'; MAX_FRAME_PAYLOAD],
            },
        ];
        for f in frames {
            let text = f.render();
            assert!(text.len() <= MAX_FRAME_LEN, "{}", text.len());
            assert_eq!(text.matches('{').count() + text.matches('}').count(), 2);
            assert_eq!(Frame::parse(text.as_bytes()), Ok(f));
        }
    }

    #[test]
    fn text_inside_a_frame_breaks_it() {
        let text = Frame {
            id: "a1".into(),
            seq: 1,
            kind: Kind::Data,
            payload: b"hello".to_vec(),
        }
        .render();
        for at in 1..text.len() - 1 {
            for noise in ["a", "\r\n[   12.625996] qinit: x\r\n", "0", " "] {
                let mut t = text.clone();
                t.insert_str(at, noise);
                assert!(Frame::parse(t.as_bytes()).is_err(), "{t}");
            }
            let mut t = text.clone();
            t.remove(at);
            assert!(Frame::parse(t.as_bytes()).is_err(), "{t}");
        }
    }

    #[test]
    fn bad_fields() {
        let framed = |body: &str| format!("{{{body} {}}}", crc_hex(body.as_bytes()));
        for (body, field) in [
            ("QF1 A 0 ack -", "id"),
            ("QF1 a x ack -", "seq"),
            ("QF1 a 99999999999 ack -", "seq"),
            ("QF1 a 0 nope -", "kind"),
            ("QF1 a 1 ack -", "seq"),
            ("QF1 a 0 data 61", "seq"),
            ("QF1 a 1 data -", "payload"),
            ("QF1 a 1 data 6", "payload"),
        ] {
            match Frame::parse(framed(body).as_bytes()) {
                Err(FrameError::Field { field: f, .. }) => assert_eq!(f, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        assert_eq!(
            Frame::parse(framed("QF1 a 0 ack").as_bytes()),
            Err(FrameError::Fields(4))
        );
        assert_eq!(Frame::parse(b"{QF1 }"), Err(FrameError::Fields(1)));
        assert_eq!(Frame::parse(b"QF1 a}"), Err(FrameError::Delimiters));
        assert_eq!(
            Frame::parse("{QF1 \u{e9} 0 ack - 0}".as_bytes()),
            Err(FrameError::NotAscii)
        );
    }
}
