//! Token buckets for the ICMP errors weft writes, so a flood of unroutable or oversized
//! packets cannot turn into a flood of ICMP (RFC 1812 §4.3.2.8, RFC 4443 §2.4(f)).
//! Time is passed in; nothing here reads a clock.

#![deny(unsafe_code)]

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::time::Instant;

/// A token bucket counted in nanoseconds of credit: each token costs `1e9 / rate` ns.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    credit_ns: u64,
    cost_ns: u64,
    cap_ns: u64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket allowing `rate_per_sec` on average and `burst` at once.
    pub const fn new(rate_per_sec: u64, burst: u64) -> Self {
        let cost = 1_000_000_000 / if rate_per_sec == 0 { 1 } else { rate_per_sec };
        Self { credit_ns: cost * burst, cost_ns: cost, cap_ns: cost * burst, last: None }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let elapsed = u64::try_from(now.saturating_duration_since(last).as_nanos()).unwrap_or(u64::MAX);
            self.credit_ns = self.credit_ns.saturating_add(elapsed).min(self.cap_ns);
        }
        self.last = Some(now);
    }

    /// Whether a token is available at `now` (refilling first), without taking it.
    pub fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.credit_ns >= self.cost_ns
    }

    /// Takes a token if one is available.
    pub fn take(&mut self, now: Instant) -> bool {
        let ok = self.ready(now);
        if ok {
            self.credit_ns -= self.cost_ns;
        }
        ok
    }
}

const SOURCE_BUCKETS: usize = 64;

/// A global bucket plus a fixed array of per-source buckets indexed by a hash of the
/// source (sources that collide share a bucket: no allocation, bounded memory).
#[derive(Clone, Debug)]
pub struct IcmpLimiter {
    global: TokenBucket,
    per_source: [TokenBucket; SOURCE_BUCKETS],
}

impl Default for IcmpLimiter {
    /// 1000 errors/s in all with bursts of 100, and 100/s per source with bursts of 10.
    fn default() -> Self {
        Self::new(TokenBucket::new(1000, 100), TokenBucket::new(100, 10))
    }
}

impl IcmpLimiter {
    /// A limiter with the given global and per-source buckets.
    pub fn new(global: TokenBucket, per_source: TokenBucket) -> Self {
        Self { global, per_source: [per_source; SOURCE_BUCKETS] }
    }

    /// Whether an error may be sent to `to` now; takes a token from both buckets if so.
    pub fn allow(&mut self, to: IpAddr, now: Instant) -> bool {
        let mut h = rustc_hash::FxHasher::default();
        to.hash(&mut h);
        let i = (h.finish() as usize) % SOURCE_BUCKETS;
        let Some(src) = self.per_source.get_mut(i) else { return false };
        if !src.ready(now) || !self.global.take(now) {
            return false;
        }
        src.take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 10);
        assert_eq!((0..20).filter(|_| b.take(t0)).count(), 10);
        assert!(!b.take(t0 + Duration::from_millis(5)));
        assert!(b.take(t0 + Duration::from_millis(10)));
        // A long pause refills only up to the burst.
        assert_eq!((0..20).filter(|_| b.take(t0 + Duration::from_secs(60))).count(), 10);
    }

    #[test]
    fn one_noisy_source_does_not_exhaust_the_others() {
        let t0 = Instant::now();
        let mut l = IcmpLimiter::default();
        let noisy: IpAddr = "10.244.1.5".parse().unwrap();
        let sent = (0..1000).filter(|_| l.allow(noisy, t0)).count();
        assert_eq!(sent, 10);
        let quiet: IpAddr = "10.244.1.6".parse().unwrap();
        assert!(l.allow(quiet, t0));
    }
}
