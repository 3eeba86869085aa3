//! Jittered exponential backoff for retrying a store that does not answer.
//!
//! Delays double from `initial` up to `max` and then stay there: weft never gives up on its
//! store (flannel#1244: a daemon that stops retrying needs a human). Each delay is drawn
//! uniformly from [d/2, d] ("equal jitter"), so a fleet of nodes that lost etcd at the same moment
//! does not hammer it in lockstep when it comes back, and no delay is ever near zero (flannel#1830:
//! a retry loop without a floor spun at 200% CPU).

use std::time::Duration;

use rand::Rng;

/// Retry delays: `initial`, doubling, capped at `max`, each jittered into [d/2, d].
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// weft's default for store retries: 1 s doubling to 30 s, so a renewal succeeds within
    /// 30 s of the store coming back.
    pub const DEFAULT_INITIAL: Duration = Duration::from_secs(1);
    /// The cap of [`Self::DEFAULT_INITIAL`]'s doubling.
    pub const DEFAULT_MAX: Duration = Duration::from_secs(30);

    /// A backoff starting at `initial` and capped at `max` (`max` is raised to `initial` if lower).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max: max.max(initial), attempt: 0 }
    }

    /// The delay before the next retry; each call counts one more failure.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        let base = self.initial.checked_mul(factor).unwrap_or(self.max).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        let jitter_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rng.random_range(0..=jitter_nanos))
    }

    /// How many failures in a row have been counted since the last [`Self::reset`].
    pub fn failures(&self) -> u32 {
        self.attempt
    }

    /// Forgets the failures after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Self::DEFAULT_INITIAL, Self::DEFAULT_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn doubles_jitters_and_caps() {
        let mut rng = StdRng::seed_from_u64(9);
        let mut b = Backoff::default();
        let bounds = [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (30, 30), (30, 30)];
        for (i, (hi, _)) in bounds.iter().enumerate() {
            let d = b.next_delay(&mut rng);
            let hi = Duration::from_secs(*hi);
            assert!(d >= hi / 2 && d <= hi, "attempt {i}: {d:?} not in [{:?}, {hi:?}]", hi / 2);
        }
        for _ in 0..1000 {
            let d = b.next_delay(&mut rng);
            assert!(d >= Duration::from_secs(15) && d <= Duration::from_secs(30));
        }
        assert_eq!(b.failures(), 1007);
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_secs(1));
    }
}
