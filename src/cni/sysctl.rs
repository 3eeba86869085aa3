//! The few host `/proc/sys/net` settings ADD makes. `/proc/sys/net` shows the namespace of the
//! thread that opens it, so these run on the plugin's main thread, which never leaves the host
//! namespace.
//!
//! - `net.ipv4.ip_forward = 1`: pod traffic is routed by the host, to other pods and into the
//!   TUN (a fresh namespace starts with 0; ptp and bridge enable it the same way). Written only
//!   when it is not already 1, because a write resets per-interface settings.
//! - `net.ipv4.conf.<host veth>.rp_filter = 1`: strict reverse-path filtering, so a pod cannot
//!   send with another pod's source address (Calico does the same on its workload interfaces). The
//!   host's /32 route to the pod makes the strict check exact.
//! - `net.ipv6.conf.<host veth>.disable_ipv6 = 1`: weft's pods are IPv4; without IPv6 on the
//!   host end a pod's router advertisements cannot reach the host's IPv6 stack
//!   (CVE-2020-10749). Best effort: a kernel without IPv6 has no such file.

use std::io;
use std::path::{Path, PathBuf};

/// A setting that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("sysctl {path}: {source}")]
pub struct SysctlError {
    /// The file under /proc/sys.
    pub path: PathBuf,
    /// Why.
    pub source: io::Error,
}

fn write(path: &Path, value: &str) -> Result<(), SysctlError> {
    std::fs::write(path, value).map_err(|source| SysctlError { path: path.into(), source })
}

/// Turns on IPv4 forwarding if it is off.
///
/// # Errors
/// [`SysctlError`].
pub fn enable_ipv4_forwarding() -> Result<(), SysctlError> {
    let path = Path::new("/proc/sys/net/ipv4/ip_forward");
    let now = std::fs::read_to_string(path).map_err(|source| SysctlError { path: path.into(), source })?;
    if now.trim() == "1" { Ok(()) } else { write(path, "1") }
}

/// Sets up the host end `name` of a pod's veth: strict rp_filter, and no IPv6 (best effort).
/// `name` is one weft generated (letters and hex digits), so it is safe in a path.
///
/// # Errors
/// [`SysctlError`] if rp_filter cannot be written.
pub fn harden_host_veth(name: &str) -> Result<(), SysctlError> {
    let v6 = PathBuf::from(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"));
    if v6.exists() {
        // Only IPv6 chatter is at stake if this fails; the pod still works.
        let _ = write(&v6, "1");
    }
    write(&PathBuf::from(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter")), "1")
}
