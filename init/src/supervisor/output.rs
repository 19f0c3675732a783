//! A service's output on its way to the kernel log, free of I/O: bytes cut
//! into lines, and a rate limit so a chatty or hostile service cannot
//! flood the log.

use std::time::Instant;

/// A line longer than this is logged in pieces.
pub const MAX_LINE: usize = 4096;
/// Log rate limit per service: a burst, then this many lines a second.
const LOG_BURST: f64 = 200.0;
const LOG_PER_SEC: f64 = 50.0;

/// Bytes read from a service's output, not yet a complete line.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The complete lines so far. What is left over comes out as a line
    /// too when it is longer than [`MAX_LINE`], or at the end of the
    /// output (`end`).
    pub fn lines(&mut self, end: bool) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            lines.push(String::from_utf8_lossy(&line[..pos]).into_owned());
        }
        if self.buf.len() > MAX_LINE || (end && !self.buf.is_empty()) {
            lines.push(String::from_utf8_lossy(&self.buf).into_owned());
            self.buf.clear();
        }
        lines
    }
}

/// A token bucket over a service's log lines.
#[derive(Debug)]
pub struct RateLimit {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(now: Instant) -> Self {
        Self {
            tokens: LOG_BURST,
            last: now,
            suppressed: 0,
        }
    }

    /// Returns whether a line may be logged, and how many were dropped
    /// before it (to report once the limit lifts).
    pub fn admit(&mut self, now: Instant) -> (bool, u64) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * LOG_PER_SEC).min(LOG_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            (true, std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            (false, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rate_limit_allows_a_burst_then_counts_drops() {
        let t = Instant::now();
        let mut r = RateLimit::new(t);
        let admitted = (0..300).filter(|_| r.admit(t).0).count();
        assert_eq!(admitted, 200);
        // One second later 50 more fit, and the first reports the drops.
        let (ok, dropped) = r.admit(t + Duration::from_secs(1));
        assert!(ok);
        assert_eq!(dropped, 100);
    }

    #[test]
    fn lines_are_cut_at_newlines_long_runs_and_the_end() {
        let mut b = LineBuffer::default();
        b.push(b"one\ntwo\nthr");
        assert_eq!(b.lines(false), ["one", "two"]);
        b.push(b"ee\n\npart");
        assert_eq!(b.lines(false), ["three", ""]);
        assert_eq!(b.lines(true), ["part"]);
        assert!(b.lines(true).is_empty());
        b.push(&[b'x'; MAX_LINE + 1]);
        assert_eq!(b.lines(false), ["x".repeat(MAX_LINE + 1)]);
        b.push(&[b'y'; MAX_LINE]);
        assert!(
            b.lines(false).is_empty(),
            "up to MAX_LINE waits for its newline"
        );
        b.push(b"\xff\n");
        assert_eq!(b.lines(false), ["y".repeat(MAX_LINE) + "\u{fffd}"]);
    }
}
