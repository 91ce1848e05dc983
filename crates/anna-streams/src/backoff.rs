//! Exponential backoff with jitter, shared by the relay and the consumer runtime.

use std::time::Duration;

use rand::Rng;

/// A std duration as a `time` duration, saturating (for arithmetic on timestamps).
pub fn to_time(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The exponential delay before retry number `attempt` (1-based): `base * 2^(attempt-1)`,
    /// capped at `max`, without jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1).min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max).max(self.base.min(self.max))
    }

    /// A delay drawn uniformly between half the ceiling and the ceiling (never below `base`):
    /// spreads out retries of many entries that failed together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let floor = (ceiling / 2).max(self.base.min(ceiling));
        if floor >= ceiling {
            return ceiling;
        }
        let span = (ceiling - floor).as_micros().min(u128::from(u64::MAX)) as u64;
        floor + Duration::from_micros(rand::rng().random_range(0..=span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_up_to_the_cap() {
        let b = Backoff { base: Duration::from_millis(1000), max: Duration::from_millis(30_000) };
        let ceilings: Vec<u128> = (1..=7).map(|a| b.ceiling(a).as_millis()).collect();
        assert_eq!(ceilings, [1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(b.ceiling(1000), Duration::from_millis(30_000));
    }

    #[test]
    fn jitter_stays_between_bounds() {
        let b = Backoff { base: Duration::from_millis(100), max: Duration::from_millis(5000) };
        for attempt in 1..10 {
            for _ in 0..100 {
                let d = b.delay(attempt);
                assert!(d <= b.ceiling(attempt) && d >= b.base, "{attempt}: {d:?}");
                assert!(d >= b.ceiling(attempt) / 2);
            }
        }
    }
}
