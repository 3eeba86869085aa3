//! The receive side's replay window, shared by every worker without a lock.
//!
//! WireGuard accepts each counter of a session at most once, and refuses counters too far
//! behind the highest one seen (RFC 6479's sliding window). Workers that receive from the same
//! peer (flows spread over the `SO_REUSEPORT` group) check the same window at the same time,
//! so it must be safe to share without a lock on the data path.
//!
//! Instead of one bit per counter, each of [`WINDOW`] slots keeps the highest counter (plus 1)
//! accepted in it: counter `c` lives in slot `c % WINDOW`. `fetch_max` on that slot decides
//! atomically: an older value there means `c` is new (accepted), `c + 1` means a duplicate, and
//! a larger one means a counter `WINDOW` or more ahead already took the slot, so `c` is too
//! old. No counter can be accepted twice, whatever the interleaving; the cost is 8 bytes per
//! slot instead of one bit (32 KiB per session).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters this far behind the highest accepted are refused (WireGuard's is 8192 minus a
/// word; this is about network reordering across a GRO batch and several workers).
pub const WINDOW: usize = 4096;

/// One session's replay window.
pub struct ReplayWindow {
    slots: Box<[AtomicU64]>,
    /// The highest accepted counter plus 1 (0: none yet).
    top: AtomicU64,
}

impl std::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayWindow").field("top", &self.top.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window (allocated once per session, at the handshake).
    pub fn new() -> Self {
        Self { slots: (0..WINDOW).map(|_| AtomicU64::new(0)).collect(), top: AtomicU64::new(0) }
    }

    /// Whether `counter` could still be accepted: a cheap check before spending the cipher on
    /// a datagram. Does not record anything.
    #[inline]
    pub fn may_accept(&self, counter: u64) -> bool {
        let top = self.top.load(Ordering::Relaxed);
        counter.saturating_add(WINDOW as u64) >= top && counter != u64::MAX
    }

    /// Records `counter` of an authenticated datagram: `true` the first time it is seen and
    /// inside the window, `false` for a replay or a counter too old to tell.
    #[inline]
    pub fn accept(&self, counter: u64) -> bool {
        if !self.may_accept(counter) {
            return false;
        }
        let mark = counter.saturating_add(1);
        let idx = usize::try_from(counter.checked_rem(WINDOW as u64).unwrap_or(0)).unwrap_or(0);
        let Some(slot) = self.slots.get(idx) else { return false };
        let before = slot.fetch_max(mark, Ordering::AcqRel);
        if before >= mark {
            return false;
        }
        self.top.fetch_max(mark, Ordering::AcqRel);
        true
    }

    /// The highest accepted counter plus 1 (0 when nothing was accepted).
    pub fn top(&self) -> u64 {
        self.top.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn each_counter_is_accepted_once() {
        let w = ReplayWindow::new();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(w.accept(5));
        assert!(w.accept(3), "reordered but inside the window");
        assert!(!w.accept(3));
        assert!(!w.accept(5));
        assert_eq!(w.top(), 6);
    }

    #[test]
    fn counters_behind_the_window_are_refused() {
        let w = ReplayWindow::new();
        let far = 10 * WINDOW as u64;
        assert!(w.accept(far));
        assert!(!w.accept(far - WINDOW as u64 - 1), "too old");
        assert!(!w.may_accept(0));
        assert!(w.accept(far - WINDOW as u64 + 1), "just inside");
        // A counter whose slot a newer one took is refused even if the top moved little.
        assert!(w.accept(far + 1));
        assert!(!w.accept(far + 1 - WINDOW as u64));
        assert!(!w.accept(u64::MAX), "the counter WireGuard never uses");
    }

    #[test]
    fn concurrent_workers_never_accept_a_counter_twice() {
        use std::sync::Arc;
        let w = Arc::new(ReplayWindow::new());
        let counts: Vec<_> = (0..4)
            .map(|_| {
                let w = Arc::clone(&w);
                std::thread::spawn(move || (0..20_000u64).filter(|c| w.accept(*c)).count())
            })
            .collect();
        let total: usize = counts.into_iter().map(|h| h.join().unwrap()).sum();
        // Every counter is accepted by exactly one thread, unless it fell behind the window
        // before its turn; never by two.
        assert!(total <= 20_000, "{total}");
        assert!(total >= 20_000 - 4 * WINDOW, "{total}");
    }
}
