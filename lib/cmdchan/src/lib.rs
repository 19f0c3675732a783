//! The test command channel's wire format, shared by the host (qlab, the
//! QEMU launcher) and the dom0 agent `qcmd` of the test images.
//!
//! A command goes to dom0 as one [`Request`] line; what it printed and its
//! exit status come back as [`Frame`]s. The same bytes travel over two
//! transports:
//!
//! - a dedicated channel (a virtio-serial port in nested QEMU) that nothing
//!   else writes to;
//! - a lab machine's only serial line, typed into the test shell as
//!   `qcmd <request>` and answered on the console that the kernel, Xen and
//!   the services also print to.
//!
//! The framing is built for the second. Every request and every frame
//! carries a CRC-32 of its own text and the command's id, a frame is found
//! anywhere in the byte stream (not only at the start of a line), and the
//! reply's last frame carries the SHA-256 of the whole output. Kernel text
//! that lands inside a frame breaks that frame's checksum, so the frame is
//! missing rather than wrong, and the host asks for it again ([`Op::Resend`]);
//! text that is not ours cannot pass for a frame. A request garbled on its
//! way in is refused by its checksum and sent again; dom0 runs a command
//! once per id however often the request arrives.
//!
//! Nothing here does I/O: [`Scanner`] finds frames in bytes, [`Collector`]
//! turns frames into an [`Outcome`] or says which frames are missing, and
//! [`reply_frames`] is what dom0 prints for an outcome.

mod frame;
mod reply;
mod request;
mod scan;

pub use frame::{Frame, FrameError, Kind, FRAME_START, MAX_FRAME_LEN, MAX_FRAME_PAYLOAD};
pub use reply::{reply_frames, Collector, End, Outcome, Progress, DATA_CHUNK, MAX_OUTPUT};
pub use request::{Op, Request, RequestError, Resend, MAX_REQUEST_PAYLOAD, REQUEST_START};
pub use scan::Scanner;

/// The name of the virtio-serial port that carries the channel in nested
/// QEMU: the launcher gives the port this name, and dom0's `qcmd serve`
/// finds its device by it (`/sys/class/virtio-ports/*/name`).
pub const VIRTIO_PORT_NAME: &str = "org.qubes-dom0.qcmd.0";

/// An id names one command for the whole life of a console transcript:
/// 1 to [`MAX_ID_LEN`] characters of `0-9a-z`.
pub const MAX_ID_LEN: usize = 24;

/// Whether `id` is a well-formed command id.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// The CRC-32 (IEEE) of `text`, as the eight lower-case hex digits the
/// wire carries.
fn crc_hex(text: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(text))
}

/// Lower-case hex of `bytes`, `-` for none (a field is never empty).
fn payload_hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        "-".to_owned()
    } else {
        hex::encode(bytes)
    }
}

/// The bytes of a payload field: `-` or lower-case hex, at most `max`
/// bytes decoded.
fn parse_payload(field: &str, max: usize) -> Result<Vec<u8>, &'static str> {
    if field == "-" {
        return Ok(Vec::new());
    }
    if field.is_empty() {
        return Err("empty payload field");
    }
    if field.len() > 2 * max {
        return Err("payload too long");
    }
    if !field
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("payload is not lower-case hex");
    }
    hex::decode(field).map_err(|_| "payload has an odd number of hex digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("k3x9a1"));
        assert!(!valid_id(""));
        assert!(!valid_id("A1"));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"a".repeat(MAX_ID_LEN + 1)));
    }

    #[test]
    fn payloads() {
        assert_eq!(payload_hex(b""), "-");
        assert_eq!(parse_payload("-", 4), Ok(vec![]));
        assert_eq!(parse_payload("6869", 4), Ok(b"hi".to_vec()));
        assert!(parse_payload("6Z", 4).is_err());
        assert!(parse_payload("686", 4).is_err());
        assert!(parse_payload("6869", 1).is_err());
        assert!(parse_payload("", 4).is_err());
    }
}
