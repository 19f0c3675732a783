//! A command's outcome as frames (dom0's side) and back (the host's side).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::frame::{Frame, Kind, MAX_FRAME_PAYLOAD};

/// Output bytes per data frame: small enough that a frame rarely meets
/// kernel text on a busy console, large enough to keep the overhead low.
pub const DATA_CHUNK: usize = 64;

/// The most output a reply carries; dom0 reads and counts the rest
/// (`dropped`) without sending it. An end frame that claims more is
/// refused, so a bad one cannot make the host track millions of frames.
pub const MAX_OUTPUT: usize = 4 << 20;
// 65536: the assertion proves at compile time that the cast keeps it.
#[allow(clippy::cast_possible_truncation)]
const MAX_DATA_FRAMES: u32 = {
    assert!(MAX_OUTPUT / DATA_CHUNK <= u32::MAX as usize);
    (MAX_OUTPUT / DATA_CHUNK) as u32
};

/// What a command did: its output (stdout and stderr, in the order it
/// wrote them) and its exit status (128 + the signal when one killed it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub output: Vec<u8>,
    pub rc: i32,
    /// Output bytes dom0 read but did not keep (over its limit).
    pub dropped: u64,
}

/// The `end` frame's payload, 56 bytes big-endian: rc (i32), frames
/// (u32), len (u64), dropped (u64), sha256 (32 bytes). Binary keeps the
/// frame short; a short frame is less often hit by other output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub rc: i32,
    /// Data frames before the end frame (numbered 1 to `frames`).
    pub frames: u32,
    pub len: u64,
    pub dropped: u64,
    pub sha256: [u8; 32],
}

impl End {
    pub const LEN: usize = 56;

    pub fn render(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN);
        v.extend(self.rc.to_be_bytes());
        v.extend(self.frames.to_be_bytes());
        v.extend(self.len.to_be_bytes());
        v.extend(self.dropped.to_be_bytes());
        v.extend(self.sha256);
        v
    }

    pub fn parse(payload: &[u8]) -> Option<Self> {
        if payload.len() != Self::LEN {
            return None;
        }
        let (rc, rest) = payload.split_first_chunk::<4>()?;
        let (frames, rest) = rest.split_first_chunk::<4>()?;
        let (len, rest) = rest.split_first_chunk::<8>()?;
        let (dropped, rest) = rest.split_first_chunk::<8>()?;
        let sha256: [u8; 32] = rest.try_into().ok()?;
        let frames = u32::from_be_bytes(*frames);
        let len = u64::from_be_bytes(*len);
        if frames > MAX_DATA_FRAMES
            || len > MAX_OUTPUT as u64
            || u64::from(frames) != len.div_ceil(DATA_CHUNK as u64)
        {
            return None;
        }
        Some(Self {
            rc: i32::from_be_bytes(*rc),
            frames,
            len,
            dropped: u64::from_be_bytes(*dropped),
            sha256,
        })
    }
}

/// The frames that answer request `id` with `outcome`: the data frames,
/// then the end frame. (The ack went out when the request arrived.)
/// Output past [`MAX_OUTPUT`] is counted as dropped.
pub fn reply_frames(id: &str, outcome: &Outcome) -> Vec<Frame> {
    let kept = &outcome.output[..outcome.output.len().min(MAX_OUTPUT)];
    let dropped = outcome.dropped + (outcome.output.len() - kept.len()) as u64;
    let mut frames: Vec<Frame> = kept
        .chunks(DATA_CHUNK)
        .zip(1u32..)
        .map(|(chunk, seq)| Frame {
            id: id.to_owned(),
            seq,
            kind: Kind::Data,
            payload: chunk.to_vec(),
        })
        .collect();
    let count = u32::try_from(frames.len()).expect("MAX_OUTPUT keeps the frame count small");
    let end = End {
        rc: outcome.rc,
        frames: count,
        len: kept.len() as u64,
        dropped,
        sha256: Sha256::digest(kept).into(),
    };
    let payload = end.render();
    debug_assert!(payload.len() <= MAX_FRAME_PAYLOAD);
    frames.push(Frame {
        id: id.to_owned(),
        seq: count + 1,
        kind: Kind::End,
        payload,
    });
    frames
}

/// Where the host stands with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Nothing from dom0 yet.
    Sent,
    /// dom0 has the request; the reply is not (all) here yet.
    Acked,
    /// The end frame is here; these data frames are not.
    Missing(Vec<u32>),
    /// Every frame arrived and the output matches the digest.
    Complete(Outcome),
    /// dom0 refused the request (it arrived garbled, most likely).
    Refused(String),
}

/// Gathers the frames of one request's reply, from a stream that may lose
/// or repeat them.
#[derive(Debug, Clone)]
pub struct Collector {
    id: String,
    acked: bool,
    refused: Option<String>,
    data: BTreeMap<u32, Vec<u8>>,
    end: Option<End>,
}

impl Collector {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            acked: false,
            refused: None,
            data: BTreeMap::new(),
            end: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The highest data frame number seen so far.
    pub fn highest_data(&self) -> Option<u32> {
        self.data.keys().next_back().copied()
    }

    /// Whether data frame `seq` is here.
    pub fn has_data(&self, seq: u32) -> bool {
        self.data.contains_key(&seq)
    }

    /// Whether the end frame is here.
    pub fn has_end(&self) -> bool {
        self.end.is_some()
    }

    /// Takes one frame; returns whether it told something new. Frames of
    /// other requests, repeats and frames past the end are ignored.
    pub fn accept(&mut self, frame: &Frame) -> bool {
        if frame.id != self.id {
            return false;
        }
        match frame.kind {
            Kind::Ack | Kind::Wait => !std::mem::replace(&mut self.acked, true),
            Kind::Err => {
                let reason = String::from_utf8_lossy(&frame.payload).into_owned();
                self.refused.replace(reason).is_none()
            }
            Kind::Data => {
                if self.end.as_ref().is_some_and(|e| frame.seq > e.frames) {
                    return false;
                }
                self.acked = true;
                self.data.insert(frame.seq, frame.payload.clone()).is_none()
            }
            Kind::End => {
                let Some(end) = End::parse(&frame.payload) else {
                    return false;
                };
                if end.frames.checked_add(1) != Some(frame.seq) || self.end.is_some() {
                    return false;
                }
                self.data.retain(|seq, _| *seq <= end.frames);
                self.acked = true;
                self.end = Some(end);
                true
            }
        }
    }

    /// Forgets a refusal, once the request has been sent again.
    pub fn retry(&mut self) {
        self.refused = None;
    }

    /// Forgets every data frame (the digest did not match, which takes a
    /// frame corrupted in a way its own checksum missed): ask for all again.
    pub fn restart_data(&mut self) {
        self.data.clear();
    }

    /// Where this request stands. `Err(())` means every frame is here but
    /// the output does not match the digest.
    #[allow(clippy::result_unit_err)]
    pub fn progress(&self) -> Result<Progress, ()> {
        if let Some(reason) = &self.refused {
            return Ok(Progress::Refused(reason.clone()));
        }
        let Some(end) = &self.end else {
            return Ok(if self.acked {
                Progress::Acked
            } else {
                Progress::Sent
            });
        };
        let missing: Vec<u32> = (1..=end.frames)
            .filter(|s| !self.data.contains_key(s))
            .collect();
        if !missing.is_empty() {
            return Ok(Progress::Missing(missing));
        }
        let output: Vec<u8> = self.data.values().flatten().copied().collect();
        let digest: [u8; 32] = Sha256::digest(&output).into();
        if output.len() as u64 != end.len || digest != end.sha256 {
            return Err(());
        }
        Ok(Progress::Complete(Outcome {
            output,
            rc: end.rc,
            dropped: end.dropped,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(len: usize, rc: i32) -> Outcome {
        Outcome {
            output: (0..len).flat_map(|i| u8::try_from(i % 251)).collect(),
            rc,
            dropped: 0,
        }
    }

    #[test]
    fn end_payload_round_trips_and_fits_a_frame() {
        let end = End {
            rc: i32::MIN,
            frames: MAX_DATA_FRAMES,
            len: MAX_OUTPUT as u64,
            dropped: u64::MAX,
            sha256: [0xab; 32],
        };
        let huge = End {
            frames: u32::MAX,
            len: u64::MAX,
            ..end.clone()
        };
        assert_eq!(End::parse(&huge.render()), None);
        let inconsistent = End {
            frames: 3,
            len: 1,
            ..end.clone()
        };
        assert_eq!(End::parse(&inconsistent.render()), None);
        let bytes = end.render();
        assert_eq!(bytes.len(), End::LEN);
        assert!(bytes.len() <= MAX_FRAME_PAYLOAD);
        assert_eq!(End::parse(&bytes), Some(end));
        assert_eq!(End::parse(&bytes[1..]), None);
        assert_eq!(End::parse(&[bytes.as_slice(), b"x"].concat()), None);
    }

    #[test]
    fn every_frame_in_any_order_gives_the_outcome() {
        for len in [0, 1, DATA_CHUNK, DATA_CHUNK + 1, 5000] {
            let want = outcome(len, 3);
            let mut frames = reply_frames("a1", &want);
            assert_eq!(frames.len(), len.div_ceil(DATA_CHUNK) + 1);
            frames.reverse();
            let mut c = Collector::new("a1");
            assert_eq!(c.progress(), Ok(Progress::Sent));
            for f in &frames {
                assert!(c.accept(f));
                assert!(!c.accept(f), "a repeat tells nothing new");
            }
            assert_eq!(c.progress(), Ok(Progress::Complete(want)));
        }
    }

    #[test]
    fn lost_frames_are_named_and_others_ids_ignored() {
        let frames = reply_frames("a1", &outcome(500, 0));
        let mut c = Collector::new("a1");
        assert!(!c.accept(&Frame::ack("b2")));
        assert!(c.accept(&Frame::ack("a1")));
        assert_eq!(c.progress(), Ok(Progress::Acked));
        for f in frames.iter().filter(|f| f.seq != 2 && f.seq != 4) {
            c.accept(f);
        }
        assert_eq!(c.progress(), Ok(Progress::Missing(vec![2, 4])));
        c.accept(&frames[1]);
        c.accept(&frames[3]);
        assert!(matches!(c.progress(), Ok(Progress::Complete(_))));
    }

    #[test]
    fn a_wrong_digest_is_reported_and_a_refusal_wins() {
        let mut frames = reply_frames("a1", &outcome(200, 0));
        frames[0].payload[0] ^= 1;
        let mut c = Collector::new("a1");
        for f in &frames {
            c.accept(f);
        }
        assert_eq!(c.progress(), Err(()));
        c.restart_data();
        assert!(matches!(c.progress(), Ok(Progress::Missing(m)) if m == vec![1, 2, 3, 4]));

        let mut c = Collector::new("a1");
        c.accept(&Frame::err("a1", "request: checksum"));
        assert_eq!(
            c.progress(),
            Ok(Progress::Refused("request: checksum".into()))
        );
        c.retry();
        assert_eq!(c.progress(), Ok(Progress::Sent));
    }

    #[test]
    fn an_end_frame_must_match_its_own_count() {
        let mut c = Collector::new("a1");
        let mut frames = reply_frames("a1", &outcome(10, 0));
        let end = frames.pop().expect("end");
        let bad = Frame { seq: 7, ..end };
        assert!(!c.accept(&bad));
        assert_eq!(c.progress(), Ok(Progress::Sent));
    }
}
