//! Splits a byte stream (a vchan or a socket) into messages, with the
//! length limit of where it arrives checked as soon as the header is in,
//! before anything is buffered for the payload.

use crate::wire::{Header, WireError, HEADER_LEN};

#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    max_len: usize,
}

impl Framer {
    /// `max_len`: the largest payload accepted.
    pub fn new(max_len: usize) -> Framer {
        Framer {
            buf: Vec::new(),
            max_len,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, if one is there. An error means the stream
    /// is broken: close it.
    pub fn next_message(&mut self) -> Result<Option<(Header, Vec<u8>)>, WireError> {
        let Some(raw) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let h = Header::parse(raw)?;
        let len = h.checked_len(self.max_len)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some((h, payload)))
    }

    /// Bytes held that are not a whole message yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{message, MsgType};

    #[test]
    fn reassembles_and_checks_the_length_first() {
        let stream = [
            message(MsgType::DataStdout, b"abc"),
            message(MsgType::DataExitCode, &[0; 4]),
        ]
        .concat();
        let mut f = Framer::new(16);
        let mut got = Vec::new();
        for b in stream {
            f.push(&[b]);
            while let Some(m) = f.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1, b"abc");
        let mut f = Framer::new(16);
        f.push(&message(MsgType::DataStdout, &[0; 17])[..8]);
        assert!(
            f.next_message().is_err(),
            "refused before the payload arrives"
        );
    }
}
