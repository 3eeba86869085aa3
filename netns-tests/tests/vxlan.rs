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
//! Needs root, iperf3, tcpdump, ethtool, nstat and tshark; namespaces and daemons are removed on drop.

// Setup helpers outside #[test] fns: a failing setup step must fail the test loudly.
#![allow(clippy::expect_used)]

use std::time::Duration;

use weft_netns_tests::flannel::{self, KernelCsum};
use weft_netns_tests::weft::VXLAN_PORT;
use weft_netns_tests::{
    Capture, IperfServer, NodeConfig, PeerConfig, Topology, iperf3_tcp, json_path, ping_all, vtep_mac,
};

/// Programs n2's kernel as a flannel vxlan node with n1 as its peer (`flannel`): the VTEP
/// with `csum`, and n1's route, FDB entry and (unless `resolve_by_arp`) neighbour entry.
fn kernel_flannel_node(topo: &Topology, resolve_by_arp: bool, csum: KernelCsum) {
    let ns = topo.n(2).ns();
    flannel::create_vtep(ns, &vtep_mac(2), "10.244.2.0", "198.18.0.2", csum).expect("programming the kernel VTEP");
    let n1 = flannel::Peer { subnet: "10.244.1.0/24", mac: &vtep_mac(1), public_ip: "198.18.0.1" };
    flannel::add_peer(ns, n1, resolve_by_arp).expect("adding n1 to the kernel VTEP");
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

/// TCP and UDP both ways between n1 (weft, 10.244.1.1) and n2 (kernel, 10.244.2.0).
fn tcp_and_udp_both_ways(topo: &Topology, secs: u32) -> (f64, f64) {
    let (weft, kernel) = ((topo.n(1).ns(), "10.244.1.1"), (topo.n(2).ns(), "10.244.2.0"));
    flannel::tcp_and_udp_both_ways(weft, kernel, secs, topo.dir()).expect("traffic both ways")
}

/// `TcpInCsumErrors` + `UdpInCsumErrors` of n1's kernel.
fn csum_errors(ns: &weft_netns_tests::Netns) -> u64 {
    flannel::csum_errors(ns).expect("nstat")
}

/// flannel#1279, the drop-in case: the kernel node as flanneld leaves it (checksum offload
/// on). Ping, TCP and UDP both ways; weft completes (or hands over as partial) every partial
/// checksum, counted, and n1's kernel rejects none.
#[test]
fn kernel_vxlan_interop_both_ways() {
    let Some(topo) = Topology::for_test("kernel_vxlan_interop_both_ways", "kvx", 2).expect("topology") else {
        return;
    };
    kernel_flannel_node(&topo, false, KernelCsum::Default);
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

    let (k2w, w2k) = tcp_and_udp_both_ways(&topo, 3);
    weft_netns_tests::report(&format!(
        "kernel VTEP with default offloads: TCP kernel -> weft {:.2} Gbit/s, weft -> kernel {:.2} Gbit/s",
        k2w / 1e9,
        w2k / 1e9
    ));
    let status = n1.status_json().unwrap();
    for reason in ["wrong_inner_mac", "wrong_source_mac", "wrong_vni", "bad_vxlan_flags", "reserved_bits_set"] {
        assert_eq!(json_path(&status, &format!("drops.{reason}")).and_then(|v| v.as_u64()), Some(0), "{reason}");
    }
    let completed = json_path(&status, "offload_counters.csum_completed").and_then(|v| v.as_u64());
    assert!(completed.is_some_and(|c| c > 0), "no partial checksum seen from a default kernel VTEP: {status}");
    assert_eq!(csum_errors(topo.n(1).ns()), 0, "n1's kernel dropped segments for bad checksums");
}

/// The same with weft's other data paths: without TUN offloads (no virtio-net header, so
/// weft completes the checksum itself) and on the recvmmsg backend, both with and without.
#[test]
fn kernel_vxlan_default_offloads_every_weft_data_path() {
    let Some(topo) =
        Topology::for_test("kernel_vxlan_default_offloads_every_weft_data_path", "kvxp", 2).expect("topology")
    else {
        return;
    };
    kernel_flannel_node(&topo, false, KernelCsum::Default);
    for (io, offload) in [("uring", false), ("mmsg", true), ("mmsg", false)] {
        let cfg = NodeConfig { io: Some(io.into()), offload: Some(offload), ..weft_node() };
        let n1 = topo.start_weft(cfg).unwrap_or_else(|e| panic!("starting weft io={io} offload={offload}: {e:#}"));
        ping_all(topo.n(2).ns(), "10.244.1.1", 2).expect("kernel -> weft");
        let (k2w, w2k) = tcp_and_udp_both_ways(&topo, 2);
        weft_netns_tests::report(&format!(
            "io={io} offload={offload}: TCP kernel -> weft {:.2} Gbit/s, weft -> kernel {:.2} Gbit/s",
            k2w / 1e9,
            w2k / 1e9
        ));
        let status = n1.status_json().unwrap();
        let completed = json_path(&status, "offload_counters.csum_completed").and_then(|v| v.as_u64());
        assert!(completed.is_some_and(|c| c > 0), "io={io} offload={offload}: none completed: {status}");
        assert_eq!(csum_errors(topo.n(1).ns()), 0, "io={io} offload={offload}: n1's kernel saw bad checksums");
        drop(n1);
    }
}

/// With the workaround users apply by hand the kernel computes every checksum: nothing for
/// weft to complete, and the same traffic flows.
#[test]
fn kernel_vxlan_interop_with_checksum_offload_off() {
    let Some(topo) = Topology::for_test("kernel_vxlan_interop_with_checksum_offload_off", "kvxo", 2).expect("topology")
    else {
        return;
    };
    kernel_flannel_node(&topo, false, KernelCsum::Off);
    let n1 = topo.start_weft(weft_node()).expect("starting weft on n1");
    tcp_and_udp_both_ways(&topo, 2);
    let status = n1.status_json().unwrap();
    assert_eq!(json_path(&status, "offload_counters.csum_completed").and_then(|v| v.as_u64()), Some(0), "{status}");
    assert_eq!(csum_errors(topo.n(1).ns()), 0);
}

#[test]
fn kernel_resolves_weft_by_arp() {
    let Some(topo) = Topology::for_test("kernel_resolves_weft_by_arp", "karp", 2).expect("topology") else {
        return;
    };
    kernel_flannel_node(&topo, true, KernelCsum::Default);
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
