//! VXLAN: weft interoperating with Linux's own vxlan driver programmed the way flannel's
//! vxlan backend programs it, and weft with weft.
//!
//! ```text
//! ┌─ n1: weft ───────────────────────┐      ┌─ n2: Linux only (flannel-style) ───────────────┐
//! │ weft0 (TUN) 10.244.1.1/32        │      │ flannel.1: vxlan id 1 dstport 8472 nolearning  │
//! │ weft run backend=vxlan, VNI 1    │      │   10.244.2.0/32, MAC 02:77:00:00:00:02          │
//! │ VTEP MAC 02:77:00:00:00:01       │      │ 10.244.1.0/24 via 10.244.1.0 dev flannel.1      │
//! │ eth0 198.18.0.1/24  udp 8472 ◀───┼──────┼─▶ eth0 198.18.0.2/24 (neigh + fdb → n1)         │
//! └──────────────────────────────────┘      └────────────────────────────────────────────────┘
//!                         u: bridge br0, underlay 198.18.0.0/24
//! ```
//!
//! Needs root, iperf3, tcpdump, ethtool and tshark; namespaces and daemons are removed on drop.

// Setup helpers outside #[test] fns: a failing setup step must fail the test loudly.
#![allow(clippy::expect_used)]

use std::time::Duration;

use weft_netns_tests::weft::VXLAN_PORT;
use weft_netns_tests::{
    Capture, IperfServer, NodeConfig, PeerConfig, Topology, iperf3_tcp, json_path, ping_all, vtep_mac,
};

/// flannel's VTEP MTU: 1500 - 50.
const CSUM_MTU: &str = "1450";

/// Programs n2's kernel as a flannel vxlan node with n1 as its peer: device, address, the
/// onlink route, and (unless `resolve_by_arp`) the permanent neighbour entry; the FDB entry
/// for n1's MAC always (flannel's three entries per peer, `reference/flannel.md`).
fn kernel_flannel_node(topo: &Topology, resolve_by_arp: bool) {
    let ns = topo.n(2).ns();
    let a_mac = vtep_mac(1);
    let run = |args: &[&str]| ns.exec_ok(args[0], &args[1..]).expect("programming the kernel VTEP");
    run(&["ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "8472", "nolearning"]);
    run(&["ip", "link", "set", "flannel.1", "address", &vtep_mac(2), "mtu", CSUM_MTU, "up"]);
    // flannel turns checksum offload off on its VTEP (flannel#1279, PR #1282): otherwise the
    // kernel leaves inner TCP checksums partial (CHECKSUM_PARTIAL) over veth, which only a
    // peer in the same kernel can complete.
    run(&["ethtool", "-K", "flannel.1", "tx-checksum-ip-generic", "off"]);
    run(&["ip", "addr", "add", "10.244.2.0/32", "dev", "flannel.1"]);
    run(&["ip", "route", "add", "10.244.1.0/24", "via", "10.244.1.0", "dev", "flannel.1", "onlink"]);
    run(&["bridge", "fdb", "add", &a_mac, "dev", "flannel.1", "dst", "198.18.0.1", "self", "permanent"]);
    if resolve_by_arp {
        // Broadcasts (the ARP request) go to n1 too.
        run(&["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "flannel.1", "dst", "198.18.0.1", "self"]);
    } else {
        run(&["ip", "neigh", "add", "10.244.1.0", "lladdr", &a_mac, "dev", "flannel.1", "nud", "permanent"]);
    }
}

/// n1 runs weft over VXLAN toward n2 (n2's kernel VTEP MAC, port 8472).
fn weft_node() -> NodeConfig {
    NodeConfig {
        port: VXLAN_PORT,
        backend: Some("vxlan".into()),
        vtep_mac: Some(vtep_mac(1)),
        ..NodeConfig::for_host(1)
    }
    .with_peer(PeerConfig::vxlan_for_host(2))
}

#[test]
fn kernel_vxlan_interop_both_ways() {
    let Some(topo) = Topology::for_test("kernel_vxlan_interop_both_ways", "kvx", 2).expect("topology") else {
        return;
    };
    kernel_flannel_node(&topo, false);
    let n1 = topo.start_weft(weft_node()).expect("starting weft on n1");
    assert_eq!(json_path(&n1.status_json().unwrap(), "mtu").and_then(|v| v.as_u64()), Some(1450), "1500 - 50");

    let cap = Capture::start(topo.n(2).ns(), "eth0", "udp port 8472", topo.dir(), "n2-underlay").expect("tcpdump");
    ping_all(topo.n(1).ns(), "10.244.2.0", 3).expect("weft -> kernel");
    ping_all(topo.n(2).ns(), "10.244.1.1", 3).expect("kernel -> weft");
    let frames = cap.stop().expect("stop capture").frames.len();
    assert!(frames >= 12, "captured {frames} VXLAN packets");

    // tshark decodes every packet as well-formed VXLAN with VNI 1 carrying ICMP.
    let pcap = topo.dir().join("n2-underlay.pcap");
    let pcap = pcap.to_str().expect("utf-8 path");
    let fields = topo
        .n(2)
        .ns()
        .exec_ok(
            "tshark",
            &[
                "-r",
                pcap,
                "-d",
                "udp.port==8472,vxlan",
                "-T",
                "fields",
                "-e",
                "vxlan.vni",
                "-e",
                "icmp.type",
                "-e",
                "ip.src",
                "-e",
                "udp.srcport",
            ],
        )
        .expect("tshark fields");
    let lines: Vec<&str> = fields.stdout.lines().collect();
    assert_eq!(lines.len(), frames, "{}", fields.stdout);
    for l in &lines {
        let f: Vec<&str> = l.split('\t').collect();
        assert_eq!(f.first(), Some(&"1"), "VNI in {l:?}");
        assert!(matches!(f.get(1), Some(&("0" | "8"))), "inner ICMP echo in {l:?}");
        // Like Linux vxlan, weft sends from an ephemeral port chosen by inner-flow hash.
        if f.get(2).is_some_and(|ip| ip.starts_with("198.18.0.1")) {
            let port: u16 = f.get(3).and_then(|p| p.parse().ok()).unwrap_or(0);
            assert!((32768..61000).contains(&port), "weft's outer source port {port} in {l:?}");
        }
    }
    let verbose =
        topo.n(2).ns().exec_ok("tshark", &["-r", pcap, "-d", "udp.port==8472,vxlan", "-V"]).expect("tshark -V");
    assert!(!verbose.stdout.contains("Malformed"), "tshark reports malformed packets:\n{}", verbose.stdout);
    assert!(verbose.stdout.contains("VXLAN Network Identifier (VNI): 1"));

    let _s1 = IperfServer::start(topo.n(1).ns(), "10.244.1.1", &topo.dir().join("iperf-n1.log")).expect("server n1");
    let k2w = iperf3_tcp(topo.n(2).ns(), "10.244.1.1", 3).expect("iperf3 kernel -> weft");
    let _s2 = IperfServer::start(topo.n(2).ns(), "10.244.2.0", &topo.dir().join("iperf-n2.log")).expect("server n2");
    let w2k = iperf3_tcp(topo.n(1).ns(), "10.244.2.0", 3).expect("iperf3 weft -> kernel");
    assert!(k2w > 0.0 && w2k > 0.0);
    let status = n1.status_json().unwrap();
    for reason in ["wrong_inner_mac", "wrong_source_mac", "wrong_vni", "bad_vxlan_flags", "reserved_bits_set"] {
        assert_eq!(json_path(&status, &format!("drops.{reason}")).and_then(|v| v.as_u64()), Some(0), "{reason}");
    }
}

#[test]
fn kernel_resolves_weft_by_arp() {
    let Some(topo) = Topology::for_test("kernel_resolves_weft_by_arp", "karp", 2).expect("topology") else {
        return;
    };
    kernel_flannel_node(&topo, true);
    let n1 = topo.start_weft(weft_node()).expect("starting weft on n1");
    ping_all(topo.n(2).ns(), "10.244.1.1", 3).expect("kernel -> weft after ARP");
    let neigh = topo.n(2).ns().exec_ok("ip", &["neigh", "show", "10.244.1.0", "dev", "flannel.1"]).unwrap().stdout;
    assert!(neigh.contains(&vtep_mac(1)), "kernel did not learn weft's VTEP MAC: {neigh:?}");
    let replies = n1.wait_counter("icmp.neighbour_reply", Duration::from_secs(3), |v| v >= 1).unwrap();
    assert!(replies >= 1);
}

#[test]
fn weft_vxlan_mesh_of_three() {
    let Some(topo) = Topology::for_test("weft_vxlan_mesh_of_three", "wvx", 3).expect("topology") else {
        return;
    };
    let nodes: Vec<_> = (1..=3).map(|i| topo.start_weft(NodeConfig::vxlan_mesh(i, 3)).expect("weft")).collect();
    for a in 1..=3u8 {
        for b in (1..=3u8).filter(|&b| b != a) {
            ping_all(topo.n(a.into()).ns(), &format!("10.244.{b}.1"), 2)
                .unwrap_or_else(|e| panic!("n{a}->n{b}: {e:#}"));
        }
    }
    let _s = IperfServer::start(topo.n(1).ns(), "10.244.1.1", &topo.dir().join("iperf.log")).expect("server");
    let bps = iperf3_tcp(topo.n(2).ns(), "10.244.1.1", 3).expect("iperf3 weft -> weft vxlan");
    assert!(bps > 0.0);
    drop(nodes);
}

/// TAP mode across three hosts: Ethernet end to end, ARP for each peer's gateway flooded to
/// all peers and answered by the owner's kernel, then unicast by learned/configured MAC.
#[test]
fn weft_vxlan_tap_mesh_of_three() {
    let Some(topo) = Topology::for_test("weft_vxlan_tap_mesh_of_three", "wtap", 3).expect("topology") else {
        return;
    };
    let cfg = |i| NodeConfig { device: Some("tap".into()), ..NodeConfig::vxlan_mesh(i, 3) };
    let nodes: Vec<_> = (1..=3).map(|i| topo.start_weft(cfg(i)).expect("weft")).collect();
    for a in 1..=3u8 {
        for b in (1..=3u8).filter(|&b| b != a) {
            ping_all(topo.n(a.into()).ns(), &format!("10.244.{b}.1"), 2)
                .unwrap_or_else(|e| panic!("n{a}->n{b}: {e:#}"));
        }
    }
    // The kernel resolved each peer gateway to that peer's VTEP MAC, over the overlay.
    let neigh = topo.n(1).ns().exec_ok("ip", &["neigh", "show", "dev", "weft0"]).unwrap().stdout;
    assert!(neigh.contains(&vtep_mac(2)) && neigh.contains(&vtep_mac(3)), "n1 neighbours: {neigh}");
    let status = nodes[0].status_json().unwrap();
    assert_eq!(json_path(&status, "device").and_then(|v| v.as_str()), Some("tap"));
    let _s = IperfServer::start(topo.n(1).ns(), "10.244.1.1", &topo.dir().join("iperf.log")).expect("server");
    let bps = iperf3_tcp(topo.n(2).ns(), "10.244.1.1", 3).expect("iperf3 over TAP mode");
    assert!(bps > 0.0);
}
