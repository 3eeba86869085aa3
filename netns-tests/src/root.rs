//! Deciding whether a netns test can run: it needs root (namespaces, veths, TUN).
//!
//! Without root the test fails under `CI=true` and otherwise skips with a printed reason; it is
//! never a silent pass.

use anyhow::{Context, Result, bail};

use crate::report;

/// Whether the test `test` can run. Prints why not, or fails under `CI=true`.
///
/// # Errors
///
/// Fails if not root and `CI=true`, or if the effective uid cannot be read.
pub fn skip_unless_root(test: &str) -> Result<bool> {
    let euid = effective_uid()?;
    if euid == 0 {
        return Ok(true);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{test} needs root (network namespaces, veths, TUN) and CI=true; euid is {euid}");
    }
    report(&format!(
        "SKIPPED {test}: needs root (network namespaces, veths, TUN), euid is {euid}; \
         run as root, or set CI=true to make this a failure"
    ));
    Ok(false)
}

/// The effective uid, from `/proc/self/status` (no `unsafe` `geteuid` call needed).
fn effective_uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_euid(&status).context("no Uid line in /proc/self/status")
}

/// The second field of the `Uid:` line (real, effective, saved, filesystem).
fn parse_euid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euid_is_second_field() {
        let status = "Name:\tcargo\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(parse_euid(status), Some(0));
        assert_eq!(parse_euid("Name:\tx\n"), None);
    }
}
