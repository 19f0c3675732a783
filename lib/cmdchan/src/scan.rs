//! Finds frames in a growing byte stream shared with other writers.

use crate::frame::{Frame, FRAME_START, MAX_FRAME_LEN};

/// Scans a transcript that only grows. Each call looks at the bytes past
/// what earlier calls settled, so a long transcript is read once; a frame
/// whose closing brace has not arrived yet is looked at again next time.
#[derive(Debug, Clone)]
pub struct Scanner {
    pos: usize,
}

impl Scanner {
    /// A scanner that starts at byte `pos` of the transcript.
    pub fn at(pos: usize) -> Self {
        Self { pos }
    }

    /// Every frame that is complete in `bytes` (the whole transcript) past
    /// the position reached so far.
    pub fn scan(&mut self, bytes: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut at = self.pos.min(bytes.len());
        loop {
            let Some(start) = find(&bytes[at..], FRAME_START).map(|p| at + p) else {
                // A start token may be arriving at the very end.
                self.pos = bytes.len().saturating_sub(FRAME_START.len() - 1).max(at);
                return frames;
            };
            let window = &bytes[start..bytes.len().min(start + MAX_FRAME_LEN)];
            // Only the first `}` can close a frame, since none occurs in
            // one; a candidate that another writer broke into is dropped
            // and the search goes on right after its start, where the
            // next frame may begin.
            match window.iter().position(|b| *b == b'}') {
                Some(end) => {
                    if let Ok(frame) = Frame::parse(&window[..=end]) {
                        frames.push(frame);
                        at = start + end + 1;
                    } else {
                        at = start + 1;
                    }
                }
                None if window.len() < MAX_FRAME_LEN => {
                    // Not closed yet: more bytes may close it.
                    self.pos = start;
                    return frames;
                }
                None => at = start + 1,
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{reply_frames, Collector, Frame, Outcome, Progress};

    fn stream(frames: &[Frame]) -> Vec<u8> {
        frames
            .iter()
            .flat_map(|f| format!("{}\r\n", f.render()).into_bytes())
            .collect()
    }

    #[test]
    fn frames_are_found_anywhere_and_fed_in_pieces() {
        let frames = vec![Frame::ack("a1"), Frame::wait("a1")];
        let mut bytes = b"dom0# qcmd QCMD1 run a1 6869 00000000\r\n[  1.000000] x".to_vec();
        bytes.extend(stream(&frames));
        bytes.extend(b"dom0# ");
        // Whole.
        assert_eq!(Scanner::at(0).scan(&bytes), frames);
        // Byte by byte, as a serial line delivers it.
        let mut s = Scanner::at(0);
        let mut got = Vec::new();
        for n in 0..=bytes.len() {
            got.extend(s.scan(&bytes[..n]));
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn a_broken_frame_does_not_hide_the_next_one() {
        let a = Frame::ack("a1").render();
        let b = Frame::wait("a1").render();
        // Kernel text cut into the first frame, then the second right after
        // it on the same line, and a start token that never closes.
        let text = format!(
            "{}[   3.1] qinit: y\r\n{}{b}{{QF1 {}",
            &a[..9],
            &a[9..],
            "x".repeat(MAX_FRAME_LEN)
        );
        assert_eq!(
            Scanner::at(0).scan(text.as_bytes()),
            vec![Frame::wait("a1")]
        );
    }

    /// The host test the channel rests on: kernel-style lines at random
    /// points of the stream, inside frames too, and bytes lost, as an
    /// overflowing console buffer loses them. Frames are either found
    /// intact or missing, never wrong, and asking again fills the gaps.
    #[test]
    fn noise_loses_frames_but_never_fakes_or_corrupts_one() {
        let noise = [
            "\r\n[   12.625996] qinit: qupdated: ready after 1677 ms\r\n",
            "[  13.260911] xen-blkback: backend/vbd/1/51712: using 2 queues",
            "(XEN) d1v0 Unhandled: vec 14, #PF[0000]\r\n",
            "QF1 a1 1 data 61 00000000}",
            "{",
            "}",
            " ",
            "0",
        ];
        let mut rng = fastrand::Rng::with_seed(17);
        let mut rounds_with_losses = 0;
        for round in 0..300 {
            let len = rng.usize(0..3000);
            let want = Outcome {
                output: (0..len).map(|_| rng.u8(..)).collect(),
                rc: rng.i32(0..256),
                dropped: 0,
            };
            let frames = reply_frames("r1", &want);
            let mut c = Collector::new("r1");
            let mut passes = 0;
            loop {
                passes += 1;
                assert!(passes < 50, "round {round}: never completed");
                let mut bytes = stream(&frames);
                for _ in 0..rng.usize(0..6) {
                    let at = rng.usize(0..=bytes.len());
                    let n = noise[rng.usize(0..noise.len())];
                    bytes.splice(at..at, n.bytes());
                }
                if rng.bool() && !bytes.is_empty() {
                    let at = rng.usize(0..bytes.len());
                    bytes.remove(at);
                }
                let mut s = Scanner::at(0);
                let mut cut = 0;
                while cut < bytes.len() {
                    cut = (cut + rng.usize(1..400)).min(bytes.len());
                    for f in s.scan(&bytes[..cut]) {
                        assert!(
                            frames.contains(&f),
                            "round {round}: a frame we never sent: {f:?}"
                        );
                        c.accept(&f);
                    }
                }
                match c.progress().expect("digest") {
                    Progress::Complete(got) => {
                        assert_eq!(got, want, "round {round}");
                        break;
                    }
                    Progress::Sent | Progress::Acked | Progress::Missing(_) => {}
                    Progress::Refused(r) => panic!("{r}"),
                }
            }
            if passes > 1 {
                rounds_with_losses += 1;
            }
        }
        assert!(
            rounds_with_losses > 30,
            "the noise hit too few frames: {rounds_with_losses}"
        );
    }
}
