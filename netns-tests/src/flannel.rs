//! A Linux node programmed exactly as flanneld's vxlan backend programs it, for weft to
//! interoperate with: the `flannel.1` VTEP (VNI 1, port 8472, no learning), its /32 address,
//! and per peer the onlink route, the permanent neighbour entry and the FDB entry
//! (flannel's `pkg/backend/vxlan`). Nothing is configured that flanneld does not configure,
//! unless a test asks for the hand workaround users apply ([`KernelCsum::Off`]).

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

use crate::{IperfServer, Netns, iperf3_tcp, iperf3_udp};

/// flannel's VTEP MTU on a 1500-byte underlay: 1500 − 50.
pub const VTEP_MTU: &str = "1450";

/// How the kernel VTEP checksums what it sends.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum KernelCsum {
    /// As flanneld leaves it: checksum offload on (the kernel's default), so over veth the
    /// inner TCP/UDP checksums stay partial (flannel#1279) and weft must complete them.
    Default,
    /// The workaround users apply by hand (`ethtool -K flannel.1 tx-checksum-ip-generic off`;
    /// flannel PR #1282 was closed): the kernel computes every checksum itself.
    Off,
}

/// Creates `flannel.1` in `ns` with VTEP MAC `mac` and overlay address `addr` (flannel gives
/// the VTEP the network address of its subnet, as a /32), local address `local` on the
/// underlay, and checks that its checksum offload is as `csum` says.
///
/// # Errors
///
/// Fails if a command fails or the offload is not in the state asked for.
pub fn create_vtep(ns: &Netns, mac: &str, addr: &str, local: &str, csum: KernelCsum) -> Result<()> {
    let run = |args: &[&str]| ns.exec_ok(args[0], &args[1..]).map(drop);
    run(&[
        "ip",
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        local,
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    run(&["ip", "link", "set", "flannel.1", "address", mac, "mtu", VTEP_MTU, "up"])?;
    if csum == KernelCsum::Off {
        run(&["ethtool", "-K", "flannel.1", "tx-checksum-ip-generic", "off"])?;
    }
    let features = ns.exec_ok("ethtool", &["-k", "flannel.1"])?.stdout;
    let want = if csum == KernelCsum::Off { "off" } else { "on" };
    if !features.contains(&format!("tx-checksum-ip-generic: {want}")) {
        bail!("flannel.1 checksum offload is not {want}:\n{features}");
    }
    run(&["ip", "addr", "add", &format!("{addr}/32"), "dev", "flannel.1"])
}

/// A peer as flanneld learns it from the peer's lease.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    /// The lease's subnet, `10.244.1.0/24`.
    pub subnet: &'a str,
    /// `BackendData.VtepMAC`.
    pub mac: &'a str,
    /// `PublicIP`.
    pub public_ip: &'a str,
}

/// Adds `peer` to the VTEP in `ns` as flanneld does on a lease event, with its replace
/// semantics (a changed lease reprograms the same entries): `<subnet> via <subnet address>
/// dev flannel.1 onlink`, the FDB entry for its MAC, and unless `resolve_by_arp` the permanent
/// neighbour entry (with it, a broadcast FDB entry instead, so the kernel asks by ARP).
///
/// # Errors
///
/// Fails if the subnet is not `a.b.c.d/len` or a command fails.
pub fn add_peer(ns: &Netns, peer: Peer<'_>, resolve_by_arp: bool) -> Result<()> {
    let run = |args: &[&str]| ns.exec_ok(args[0], &args[1..]).map(drop);
    let (gw, _) = peer.subnet.split_once('/').with_context(|| format!("subnet {:?} has no /len", peer.subnet))?;
    run(&["ip", "route", "replace", peer.subnet, "via", gw, "dev", "flannel.1", "onlink"])?;
    run(&["bridge", "fdb", "replace", peer.mac, "dev", "flannel.1", "dst", peer.public_ip, "self", "permanent"])?;
    if resolve_by_arp {
        run(&["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "flannel.1", "dst", peer.public_ip, "self"])
    } else {
        run(&["ip", "neigh", "replace", gw, "lladdr", peer.mac, "dev", "flannel.1", "nud", "permanent"])
    }
}

/// The kernel's count in `ns` of TCP and UDP segments it dropped for a bad checksum
/// (`TcpInCsumErrors` + `UdpInCsumErrors`): what a partial checksum written to a TUN as
/// complete turns into.
///
/// # Errors
///
/// Fails if `nstat` fails.
pub fn csum_errors(ns: &Netns) -> Result<u64> {
    let out = ns.exec_ok("nstat", &["-asz", "TcpInCsumErrors", "UdpInCsumErrors"])?.stdout;
    Ok(out.lines().filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).sum())
}

/// TCP both ways, then UDP both ways at 100 Mbit/s (a rate a 2-core runner carries), between
/// the weft node `weft` and the kernel node `kernel` (namespace, overlay address), `secs`
/// per flow; iperf3 servers log into `dir`. Returns the TCP rates in bit/s, kernel → weft
/// first.
///
/// # Errors
///
/// Fails if a flow does not run, or fewer than 90 % of the UDP datagrams arrive (a partial
/// UDP checksum written as complete loses all of them, not a few).
pub fn tcp_and_udp_both_ways(
    weft: (&Netns, &str),
    kernel: (&Netns, &str),
    secs: u32,
    dir: &Path,
) -> Result<(f64, f64)> {
    let flows = [(kernel, weft, "kernel -> weft"), (weft, kernel, "weft -> kernel")];
    let mut tcp = [0.0; 2];
    for (rate, (from, to, what)) in tcp.iter_mut().zip(flows) {
        // The servers take one test each (`iperf3 -s -1`).
        let _server = IperfServer::start(to.0, to.1, &dir.join(format!("iperf-tcp-{}.log", to.1)))?;
        *rate = iperf3_tcp(from.0, to.1, secs).with_context(|| format!("iperf3 TCP {what}"))?;
        ensure!(*rate > 0.0, "TCP {what} carried nothing");
    }
    for (from, to, what) in flows {
        let _server = IperfServer::start(to.0, to.1, &dir.join(format!("iperf-udp-{}.log", to.1)))?;
        let u = iperf3_udp(from.0, to.1, secs, "100M", 1200).with_context(|| format!("iperf3 UDP {what}"))?;
        ensure!(u.received() * 10 >= u.packets * 9, "UDP {what}: {} of {} datagrams arrived", u.received(), u.packets);
    }
    Ok((tcp[0], tcp[1]))
}
