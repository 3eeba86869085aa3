//! Offloads between real namespaces: TUN TSO/USO, UDP GSO sends, UDP GRO receives and the
//! merging of segments into one TUN write, checked through `weft status` while iperf3 runs.
//!
//! ```text
//! ┌─ n1 ────────────────┐      ┌─ n2 ────────────────┐
//! │ iperf3 -s           │      │ iperf3 -c           │
//! │ weft0 10.244.1.1/24 │      │ weft0 10.244.2.1/24 │
//! │ eth0 198.18.0.1/24  │      │ eth0 198.18.0.2/24  │
//! └──────────┬──────────┘      └──────────┬──────────┘
//! ┌──────────┴────────────────────────────┴──────────┐
//! │  u: bridge br0, underlay 198.18.0.0/24, MTU 1500  │
//! └───────────────────────────────────────────────────┘
//! ```
//!
//! The counters are the evidence: without offloads every one stays zero; with them TCP
//! crosses as super-packets (n2 reads them from its TUN and sends trains) and arrives as
//! merged writes (n1 receives trains and writes fewer, larger packets into its TUN). A
//! node with offloads and one without must still talk: the wire format does not change.
//! Needs root; run with `--test-threads=1`.

// Setup and assertion helpers outside #[test] fns: a failing step must fail the test loudly,
// naming the counter and printing the status it read.
#![allow(clippy::expect_used, clippy::panic)]

use serde_json::Value;
use weft_netns_tests::{IperfServer, NodeConfig, Topology, iperf3_tcp, json_path, ping_all};

fn num(status: &Value, path: &str) -> u64 {
    json_path(status, path).and_then(Value::as_u64).unwrap_or_else(|| panic!("{path} missing in {status}"))
}

fn flag(status: &Value, path: &str) -> bool {
    json_path(status, path).and_then(Value::as_bool).unwrap_or_else(|| panic!("{path} missing in {status}"))
}

fn with_offloads(mut c: NodeConfig, on: bool) -> NodeConfig {
    (c.offload, c.gro) = (Some(on), Some(on));
    c
}

/// n2 → n1 TCP with both nodes configured by `cfg`; returns both statuses after the run.
fn run_tcp(topo: &Topology, cfg: impl Fn(u8) -> NodeConfig) -> (Value, Value) {
    let n1 = topo.start_weft(cfg(1)).expect("starting n1");
    let n2 = topo.start_weft(cfg(2)).expect("starting n2");
    ping_all(topo.n(2).ns(), "10.244.1.1", 3).expect("ping n2 -> n1");
    let _s = IperfServer::start(topo.n(1).ns(), "10.244.1.1", &topo.dir().join("iperf-n1.log")).expect("server");
    let bps = iperf3_tcp(topo.n(2).ns(), "10.244.1.1", 2).expect("iperf3 n2 -> n1");
    assert!(bps > 0.0);
    (n1.status_json().expect("status n1"), n2.status_json().expect("status n2"))
}

fn assert_clean(status: &Value) {
    assert_no_bad_drops(status);
    assert_eq!(num(status, "offload_counters.fallbacks"), 0, "{status}");
}

/// No packet dropped as malformed, refused by the kernel or for want of buffers.
fn assert_no_bad_drops(status: &Value) {
    for reason in [
        "bad_offload_header",
        "bad_l4_header",
        "bad_inner_checksum",
        "io_error",
        "pool_exhausted",
        "truncated",
        "bad_ip_header",
    ] {
        assert_eq!(num(status, &format!("drops.{reason}")), 0, "{reason}: {status}");
    }
}

#[test]
fn tcp_crosses_as_super_packets_on_both_backends() {
    for backend in ["udp", "vxlan"] {
        let Some(topo) =
            Topology::for_test("tcp_crosses_as_super_packets", if backend == "udp" { "gsou" } else { "gsov" }, 2)
                .expect("topology")
        else {
            return;
        };
        let (s1, s2) = run_tcp(&topo, |i| {
            let c = if backend == "udp" { NodeConfig::mesh(i, 2) } else { NodeConfig::vxlan_mesh(i, 2) };
            with_offloads(c, true)
        });
        for s in [&s1, &s2] {
            for f in ["tun_tso", "udp_gso", "udp_gro", "coalesce"] {
                assert!(flag(s, &format!("offloads.{f}")), "{backend}: {f} not in use: {s}");
            }
            assert_clean(s);
        }
        // The sender read super-packets and sent trains of several segments each.
        let (read, sends, segs) = (
            num(&s2, "offload_counters.super_packets_read"),
            num(&s2, "offload_counters.gso_sends"),
            num(&s2, "offload_counters.gso_segments"),
        );
        assert!(read > 0 && sends > 0 && segs >= 2 * sends, "{backend}: read {read}, sends {sends}, segments {segs}");
        // The receiver got trains and wrote merged super-packets.
        let (trains, writes, merged) = (
            num(&s1, "offload_counters.gro_trains"),
            num(&s1, "offload_counters.merged_writes"),
            num(&s1, "offload_counters.merged_segments"),
        );
        assert!(trains > 0 && writes > 0 && merged >= 2 * writes, "{backend}: trains {trains}, writes {writes}");
        println!(
            "{backend}: n2 read {read} super-packets, sent {sends} trains of {segs} segments; n1 got {trains} trains, wrote {writes} merged packets of {merged} segments"
        );
    }
}

#[test]
fn without_offloads_every_counter_stays_zero() {
    let Some(topo) = Topology::for_test("without_offloads", "nogso", 2).expect("topology") else {
        return;
    };
    let (s1, s2) = run_tcp(&topo, |i| with_offloads(NodeConfig::mesh(i, 2), false));
    for s in [&s1, &s2] {
        for f in ["tun_tso", "udp_gso", "udp_gro", "coalesce"] {
            assert!(!flag(s, &format!("offloads.{f}")), "{f} in use: {s}");
        }
        for c in ["super_packets_read", "gso_sends", "gro_trains", "merged_writes"] {
            assert_eq!(num(s, &format!("offload_counters.{c}")), 0, "{c}: {s}");
        }
        assert_clean(s);
    }
}

#[test]
fn offload_and_plain_nodes_interoperate() {
    let Some(topo) = Topology::for_test("offload_and_plain_interoperate", "mixgso", 2).expect("topology") else {
        return;
    };
    // n1 plain, n2 with offloads, over VXLAN: trains from n2 arrive at n1 as separate
    // datagrams, and n1's single packets are merged by n2.
    let n1 = topo.start_weft(with_offloads(NodeConfig::vxlan_mesh(1, 2), false)).expect("starting n1");
    let n2 = topo.start_weft(with_offloads(NodeConfig::vxlan_mesh(2, 2), true)).expect("starting n2");
    let _s1 = IperfServer::start(topo.n(1).ns(), "10.244.1.1", &topo.dir().join("iperf-n1.log")).expect("server n1");
    let _s2 = IperfServer::start(topo.n(2).ns(), "10.244.2.1", &topo.dir().join("iperf-n2.log")).expect("server n2");
    let to_plain = iperf3_tcp(topo.n(2).ns(), "10.244.1.1", 2).expect("iperf3 n2 -> n1");
    let to_offload = iperf3_tcp(topo.n(1).ns(), "10.244.2.1", 2).expect("iperf3 n1 -> n2");
    assert!(to_plain > 0.0 && to_offload > 0.0);
    let (s1, s2) = (n1.status_json().expect("status n1"), n2.status_json().expect("status n2"));
    assert_clean(&s1);
    assert_clean(&s2);
    assert!(num(&s2, "offload_counters.gso_sends") > 0, "n2 sent no trains: {s2}");
    assert!(num(&s2, "offload_counters.merged_writes") > 0, "n2 merged nothing from n1: {s2}");
    println!("n2 -> n1 (plain) {:.2} Gbit/s, n1 -> n2 (offloads) {:.2} Gbit/s", to_plain / 1e9, to_offload / 1e9);
}

#[test]
fn small_udp_datagrams_travel_in_trains_and_merge() {
    let Some(topo) = Topology::for_test("small_udp_trains", "gsosm", 2).expect("topology") else {
        return;
    };
    let n1 = topo.start_weft(with_offloads(NodeConfig::vxlan_mesh(1, 2), true)).expect("starting n1");
    let n2 = topo.start_weft(with_offloads(NodeConfig::vxlan_mesh(2, 2), true)).expect("starting n2");
    ping_all(topo.n(2).ns(), "10.244.1.1", 3).expect("ping n2 -> n1");
    let _s = IperfServer::start(topo.n(1).ns(), "10.244.1.1", &topo.dir().join("iperf-n1.log")).expect("server");
    // An unthrottled flood of 64-byte datagrams: n2 reads them one by one from its TUN.
    topo.n(2)
        .ns()
        .exec_timeout(
            std::time::Duration::from_secs(20),
            "iperf3",
            &["-c", "10.244.1.1", "-u", "-l", "64", "-b", "0", "-t", "2", "--connect-timeout", "3000"],
        )
        .expect("iperf3 -u");
    let (s1, s2) = (n1.status_json().expect("status n1"), n2.status_json().expect("status n2"));
    assert_clean(&s1);
    assert_clean(&s2);
    let (sends, segs) = (num(&s2, "offload_counters.gso_sends"), num(&s2, "offload_counters.gso_segments"));
    assert!(sends > 0 && segs >= 2 * sends, "n2 gathered no trains of datagrams: {s2}");
    let uso = flag(&s1, "offloads.tun_uso");
    let (writes, merged) = (num(&s1, "offload_counters.merged_writes"), num(&s1, "offload_counters.merged_segments"));
    if uso {
        assert!(writes > 0 && merged >= 2 * writes, "n1 merged no datagrams although its TUN takes USO: {s1}");
    }
    println!("n2 sent {sends} trains of {segs} datagrams; n1 (USO {uso}) wrote {writes} merged packets of {merged}");
}

/// An underlay whose MTU shrinks under a running daemon: the kernel refuses every GSO train
/// whose segments no longer fit with `EMSGSIZE` (Linux 6.18; older kernels said `EINVAL`,
/// which weft takes as "no GSO here" and falls back from). Either way nothing crashes: the
/// refused trains are counted as `oversize` drops, what fits the smaller MTU still crosses,
/// and once the MTU is back TCP flows again. weft does not resize the overlay at run time
/// (as flannel, it derives the MTU at start), so a shrunk underlay needs a restart.
#[test]
fn trains_refused_by_a_shrunk_underlay_are_counted_and_traffic_resumes() {
    let Some(topo) = Topology::for_test("gso_mtu_shrink", "gsomtu", 2).expect("topology") else {
        return;
    };
    let n1 = topo.start_weft(with_offloads(NodeConfig::mesh(1, 2), true)).expect("starting n1");
    let n2 = topo.start_weft(with_offloads(NodeConfig::mesh(2, 2), true)).expect("starting n2");
    ping_all(topo.n(2).ns(), "10.244.1.1", 3).expect("ping n2 -> n1");
    // One iperf3 server per run (each serves one client).
    let server = |run: &str| {
        IperfServer::start(topo.n(1).ns(), "10.244.1.1", &topo.dir().join(format!("iperf-n1-{run}.log")))
            .expect("server")
    };
    let s = server("before");
    iperf3_tcp(topo.n(2).ns(), "10.244.1.1", 1).expect("iperf3 n2 -> n1 before");
    drop(s);
    let before = n2.status_json().expect("status n2");
    assert!(num(&before, "offload_counters.gso_sends") > 0, "no trains before the MTU change: {before}");

    // n2's underlay shrinks below weft's 1500-byte datagrams.
    let link = |mtu: &str| {
        topo.n(2).ns().exec("ip", &["link", "set", "eth0", "mtu", mtu]).expect("ip link set mtu").ok().expect("mtu");
    };
    link("1400");
    // TCP stalls now (its full-sized segments no longer fit): its outcome is ignored.
    let s = server("during");
    let _ = topo.n(2).ns().exec_timeout(
        std::time::Duration::from_secs(10),
        "iperf3",
        &["-c", "10.244.1.1", "-t", "1", "--connect-timeout", "2000"],
    );
    drop(s);
    let during = n2.status_json().expect("status n2");
    let refused = num(&during, "drops.oversize") + num(&during, "offload_counters.fallbacks");
    assert!(refused > 0, "the refused trains must be counted: {during}");
    // Small packets still cross.
    let ping = topo.n(2).ns().exec("ping", &["-n", "-c", "3", "-i", "0.2", "-W", "1", "-s", "500", "10.244.1.1"]);
    assert!(ping.expect("ping").ok().is_ok(), "500-byte pings must cross over the shrunk underlay");

    // The MTU is back: TCP flows again.
    link("1500");
    let _s = server("after");
    let bps = iperf3_tcp(topo.n(2).ns(), "10.244.1.1", 1).expect("iperf3 n2 -> n1 after");
    assert!(bps > 0.0);
    let after = n2.status_json().expect("status n2");
    for s in [&after, &n1.status_json().expect("status n1")] {
        assert_no_bad_drops(s);
    }
    println!(
        "{} trains refused over MTU 1400 (oversize {}, fallbacks {}); {:.2} Gbit/s once it was back",
        refused,
        num(&during, "drops.oversize"),
        num(&during, "offload_counters.fallbacks"),
        bps / 1e9
    );
}
