//! Test hooks: `WEFT_FAILPOINT=<name>[,<name>…]` makes the daemon fail on purpose at a named
//! place, so that the netns tests can prove a dead worker or task stops the daemon instead of
//! leaving it "ready" with nothing behind it.
//!
//! Read once per site at start-up, never on the packet path. Names:
//! - `worker-exit`: worker 0 returns from its loop after two seconds, as if it had finished;
//! - `worker-panic`: worker 0's thread panics after two seconds;
//! - `lease-panic`: the lease task panics after two seconds.

/// The environment variable that arms failpoints.
pub const ENV: &str = "WEFT_FAILPOINT";

/// Whether failpoint `name` is armed.
pub fn armed(name: &str) -> bool {
    std::env::var(ENV).is_ok_and(|v| v.split(',').any(|n| n.trim() == name))
}
