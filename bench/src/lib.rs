//! weft's system benchmarks (speed is measured here, never asserted in tests). The pieces the
//! `lease-scale` and `vs-kernel` binaries are built from:
//!
//! - [`netns_thread`]: run code on a thread inside a named network namespace, so the bench can
//!   talk to an etcd that is reachable only on the test underlay;
//! - [`prom`]: read counters out of etcd's Prometheus `/metrics`;
//! - [`rr`]: a UDP request/response latency probe (vs-kernel's round-trip figures);
//! - [`sim`]: simulated nodes that acquire subnet leases exactly as a daemon does (the real
//!   [`weft_ipam::LeaseKeeper`] driven by [`weft_ipam::lease_loop::execute`] against a real
//!   [`weft_ipam::EtcdStore`]), minus the data plane.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod netns_thread;
pub mod prom;
pub mod rr;
pub mod sim;

/// Today's UTC date as `YYYY-MM-DD`, from the system clock (no time-zone database needed).
pub fn utc_date() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days(i64::try_from(secs / 86_400).unwrap_or(0));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 → (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, u32::try_from(m).unwrap_or(1), u32::try_from(d).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(utc_date().len(), 10);
    }
}
