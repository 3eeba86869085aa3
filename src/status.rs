//! What `weft status` shows: the daemon's identity, its peers with their traffic, and every
//! drop reason with its count. The daemon serialises a [`Status`] over the API socket; the
//! CLI prints it as JSON or as a table for a person.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Where a rootless daemon's overlay lives.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct RootlessStatus {
    /// `/proc/<pid>/task/<tid>/ns/user`.
    pub userns: String,
    /// `/proc/<pid>/task/<tid>/ns/net`.
    pub netns: String,
}

/// The `wireguard` backend's own state.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct WireGuardStatus {
    /// Our public key (base64), what peers list or find in our lease.
    pub public_key: String,
    /// Handshakes completed since start (either side).
    pub handshakes: u64,
    /// Initiations sent.
    pub initiations_sent: u64,
    /// Handshake messages refused (bad mac1, failed authentication, unknown key, replayed).
    pub handshakes_refused: u64,
}

/// One peer's WireGuard session.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct PeerWireGuard {
    /// The first 8 characters of its public key, as `wg show` users know it.
    pub key_fingerprint: String,
    /// Seconds since the handshake of the session we send with; `None`: no session.
    pub handshake_age_secs: Option<u64>,
    /// Datagrams from it that authenticated.
    pub authenticated: u64,
    /// Datagrams from its address that failed authentication or replayed (dropped).
    pub failed: u64,
    /// Packets to it dropped for want of a session.
    pub no_session: u64,
}

/// A snapshot of a running daemon.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Status {
    /// This node's name.
    pub node_name: String,
    /// Wire format (`udp`, `vxlan` or `wireguard`).
    pub backend: String,
    /// VXLAN network identifier.
    pub vni: Option<u32>,
    /// Our VTEP MAC (VXLAN).
    pub vtep_mac: Option<String>,
    /// WireGuard: our key and handshake counters.
    #[serde(default)]
    pub wireguard: Option<WireGuardStatus>,
    /// I/O backend in use (`uring` or `mmsg`).
    pub io_backend: String,
    /// Why io_uring was not used, when the fallback runs under `io = "auto"`.
    pub io_fallback_reason: Option<String>,
    /// Rootless: the overlay's namespace files, for `weft exec`, nsenter and podman.
    #[serde(default)]
    pub rootless: Option<RootlessStatus>,
    /// Offloads in use since start (`tun_tso`, `tun_uso`, `udp_gso`, `udp_gro`, `coalesce`).
    #[serde(default)]
    pub offloads: BTreeMap<String, bool>,
    /// What the offloads did (super-packets read, GSO sends, merged writes, fallbacks).
    #[serde(default)]
    pub offload_counters: BTreeMap<String, u64>,
    /// Worker threads.
    pub workers: usize,
    /// Cluster network.
    pub network: String,
    /// This node's subnet.
    pub subnet: String,
    /// The TUN's address.
    pub gateway: String,
    /// TUN/TAP name.
    pub tun: String,
    /// `tun` or `tap`.
    pub device: String,
    /// Overlay MTU.
    pub mtu: u16,
    /// Underlay address and port.
    pub public_ip: String,
    /// Underlay UDP port.
    pub port: u16,
    /// Underlay interface the MTU was computed from.
    pub underlay_interface: String,
    /// Its MTU.
    pub underlay_mtu: u32,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// The daemon's process id (unchanged by reloads).
    pub pid: u32,
    /// Configuration reloads applied (SIGHUP).
    pub reloads: u64,
    /// Reloads refused because the new configuration was invalid.
    pub reload_failures: u64,
    /// What the overlay does and does not protect against.
    pub security: String,
    /// `static` (peers from the config) or `lease` (subnet and peers from the store).
    pub mode: String,
    /// Lease mode: our lease.
    pub lease: Option<crate::daemon::lease::LeaseView>,
    /// Peers and their traffic.
    pub peers: Vec<PeerStatus>,
    /// Dropped packets by reason.
    pub drops: BTreeMap<String, u64>,
    /// ICMP errors written into the TUN, those suppressed by the rate limit, and neighbour
    /// requests answered over VXLAN.
    pub icmp: BTreeMap<String, u64>,
}

/// One peer.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct PeerStatus {
    /// Node name.
    pub name: String,
    /// IPv4 subnet.
    pub subnet: String,
    /// IPv6 subnet.
    pub ipv6_subnet: Option<String>,
    /// Underlay endpoint.
    pub endpoint: String,
    /// VTEP MAC (VXLAN).
    pub mac: Option<String>,
    /// Path MTU.
    pub mtu: u16,
    /// Packets received and delivered.
    pub rx_packets: u64,
    /// Bytes received and delivered.
    pub rx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// WireGuard: the session with it.
    #[serde(default)]
    pub wireguard: Option<PeerWireGuard>,
}

/// Formats a status as aligned text for a terminal.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "node      {}  ({} subnet {}, gateway {})", s.node_name, s.network, s.subnet, s.gateway);
    let _ = writeln!(
        o,
        "data      backend {} over {}:{} via {} (MTU {}), {} {} (MTU {})",
        s.backend, s.public_ip, s.port, s.underlay_interface, s.underlay_mtu, s.device, s.tun, s.mtu
    );
    if let (Some(vni), Some(mac)) = (s.vni, &s.vtep_mac) {
        let _ = writeln!(o, "vxlan     vni {vni}, vtep mac {mac}");
    }
    if let Some(w) = &s.wireguard {
        let _ = writeln!(
            o,
            "wireguard public key {}, {} handshakes ({} initiations sent, {} refused)",
            w.public_key, w.handshakes, w.initiations_sent, w.handshakes_refused
        );
    }
    let io_note = s.io_fallback_reason.as_deref().map(|r| format!(" (io_uring unavailable: {r})")).unwrap_or_default();
    let _ = writeln!(o, "io        {} x{} workers{}, up {}s", s.io_backend, s.workers, io_note, s.uptime_secs);
    let on: Vec<&str> = s.offloads.iter().filter(|(_, v)| **v).map(|(k, _)| k.as_str()).collect();
    let counts: Vec<String> =
        s.offload_counters.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        o,
        "offloads  {}{}",
        if on.is_empty() { "none".to_owned() } else { on.join(" ") },
        if counts.is_empty() { String::new() } else { format!(" ({})", counts.join(" ")) }
    );
    let _ = writeln!(o, "process   pid {}, {} reloads ({} refused)", s.pid, s.reloads, s.reload_failures);
    if let Some(r) = &s.rootless {
        let _ = writeln!(o, "rootless  userns {}, netns {} (weft exec -- CMD runs there)", r.userns, r.netns);
    }
    let _ = writeln!(o, "security  {}", s.security);
    match &s.lease {
        Some(l) => {
            let exp = l.expires_in_secs.map(|e| format!("expires in {e}s")).unwrap_or_else(|| "no expiry".into());
            let up = if l.store_up { "up" } else { "UNREACHABLE" };
            let _ = writeln!(
                o,
                "lease     {} {} ({exp}), {} store {up}, {} leases known, ready: {}",
                l.subnet, l.phase, l.store, l.known_leases, l.ready
            );
            if l.provisional {
                let _ = writeln!(o, "          provisional: running from the lease cache until the store confirms it");
            }
            if let Some(e) = &l.last_error {
                let _ = writeln!(o, "          last store error: {e}");
            }
            let refused: u64 = l.refused_total.values().sum();
            if refused > 0 || !l.refused_leases.is_empty() || l.unreadable_leases > 0 {
                let totals: Vec<String> =
                    l.refused_total.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(
                    o,
                    "          {} lease records refused now, {} unreadable; since start: {}",
                    l.refused_leases.len(),
                    l.unreadable_leases,
                    if totals.is_empty() { "none".to_owned() } else { totals.join(" ") }
                );
                for r in &l.refused_leases {
                    let _ = writeln!(o, "            {} from {}: {}", r.subnet, r.public_ip, r.reason);
                }
            }
            if l.table_refusals > 0 {
                let _ = writeln!(
                    o,
                    "          {} route tables refused (last good table kept): {}",
                    l.table_refusals,
                    l.last_table_error.as_deref().unwrap_or("")
                );
            }
        }
        None => {
            let _ = writeln!(o, "lease     none (static peers)");
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<16} {:<18} {:<22} {:>5} {:>12} {:>14} {:>12} {:>14}",
        "PEER", "SUBNET", "ENDPOINT", "MTU", "RX PKTS", "RX BYTES", "TX PKTS", "TX BYTES"
    );
    for p in &s.peers {
        let _ = writeln!(
            o,
            "{:<16} {:<18} {:<22} {:>5} {:>12} {:>14} {:>12} {:>14}",
            p.name, p.subnet, p.endpoint, p.mtu, p.rx_packets, p.rx_bytes, p.tx_packets, p.tx_bytes
        );
    }
    if s.peers.is_empty() {
        let _ = writeln!(o, "(no peers)");
    }
    if s.wireguard.is_some() {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<16} {:<10} {:>10} {:>14} {:>10} {:>12}",
            "PEER", "KEY", "HANDSHAKE", "AUTHENTICATED", "FAILED", "NO SESSION"
        );
        for p in &s.peers {
            let Some(w) = &p.wireguard else { continue };
            let age = w.handshake_age_secs.map_or_else(|| "never".to_owned(), |a| format!("{a}s ago"));
            let _ = writeln!(
                o,
                "{:<16} {:<10} {:>10} {:>14} {:>10} {:>12}",
                p.name, w.key_fingerprint, age, w.authenticated, w.failed, w.no_session
            );
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "{:<24} {:>12}", "DROP REASON", "PACKETS");
    for (k, v) in &s.drops {
        let _ = writeln!(o, "{k:<24} {v:>12}");
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "{:<24} {:>12}", "ICMP WRITTEN TO TUN", "PACKETS");
    for (k, v) in &s.icmp {
        let _ = writeln!(o, "{k:<24} {v:>12}");
    }
    o
}
