//! Restart delays: the first restart waits the definition's initial delay,
//! each further one twice as long up to the maximum. A domain that stays
//! up for the maximum delay earns a fresh start.

use std::time::Duration;

use crate::definition::Restart;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// Restarts since the domain last stayed up long enough.
    failures: u32,
}

impl Backoff {
    pub fn new(r: &Restart) -> Self {
        Self {
            initial: Duration::from_millis(r.initial_delay_ms),
            max: Duration::from_millis(r.max_delay_ms),
            failures: 0,
        }
    }

    /// The delay before the next restart, counting this failure.
    pub fn next_delay(&mut self) -> Duration {
        let shift = self.failures.min(31);
        self.failures = self.failures.saturating_add(1);
        self.initial
            .checked_mul(1u32 << shift)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The domain ran for `uptime`: long enough resets the sequence.
    pub fn ran_for(&mut self, uptime: Duration) {
        if uptime >= self.max {
            self.failures = 0;
        }
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::RestartPolicy;

    fn restart(initial: u64, max: u64) -> Restart {
        Restart {
            policy: RestartPolicy::Always,
            initial_delay_ms: initial,
            max_delay_ms: max,
        }
    }

    #[test]
    fn doubles_up_to_the_cap_and_resets_after_a_long_run() {
        let mut b = Backoff::new(&restart(1000, 5000));
        let ms: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [1000, 2000, 4000, 5000, 5000]);
        b.ran_for(Duration::from_millis(4999));
        assert_eq!(b.next_delay().as_millis(), 5000);
        b.ran_for(Duration::from_secs(5));
        assert_eq!(b.failures(), 0);
        assert_eq!(b.next_delay().as_millis(), 1000);
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(&restart(1, 3_600_000));
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(3600));
        }
    }
}
