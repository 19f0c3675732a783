//! Restart delays for whatever a supervisor restarts: qinit's services and
//! qdomd's domains. The first restart waits the initial delay, each further
//! one twice as long, up to the maximum.
//!
//! It only counts and computes; what counts as a failure, whether a long run
//! earns a fresh start ([`Backoff::ran_for`]) and how many restarts are too
//! many are the caller's policy. No clock is read here: callers pass
//! durations in, so their state machines stay free of I/O.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// Restarts since the last fresh start.
    failures: u32,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            failures: 0,
        }
    }

    /// The delay before the next restart, counting this failure.
    pub fn next_delay(&mut self) -> Duration {
        // Past 31 doublings the shift would overflow; any delay is capped
        // long before that, and `checked_mul` caps what overflows.
        let shift = self.failures.min(31);
        self.failures = self.failures.saturating_add(1);
        self.initial
            .checked_mul(1u32 << shift)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// What was restarted ran for `uptime`: at least the maximum delay
    /// earns a fresh start.
    pub fn ran_for(&mut self, uptime: Duration) {
        if uptime >= self.max {
            self.reset();
        }
    }

    /// A fresh start: the next delay is the initial one again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Restarts counted since the last fresh start.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(b: &mut Backoff, n: usize) -> Vec<u128> {
        (0..n).map(|_| b.next_delay().as_millis()).collect()
    }

    #[test]
    fn doubles_up_to_the_cap_and_resets_after_a_long_run() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        assert_eq!(ms(&mut b, 5), [1000, 2000, 4000, 5000, 5000]);
        b.ran_for(Duration::from_millis(4999));
        assert_eq!(b.next_delay().as_millis(), 5000);
        b.ran_for(Duration::from_secs(5));
        assert_eq!(b.failures(), 0);
        assert_eq!(b.next_delay().as_millis(), 1000);
    }

    #[test]
    fn counts_failures_and_reset_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        assert_eq!(
            ms(&mut b, 9),
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]
        );
        assert_eq!(b.failures(), 9);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.next_delay().as_millis(), 250);
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_secs(3600));
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(3600));
        }
        // Doubling goes on past 16 steps when the cap allows it.
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_secs(3600));
        assert_eq!(ms(&mut b, 21)[20], 1 << 20);
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(ms(&mut b, 3), [Duration::MAX.as_millis(); 3]);
    }
}
