//! flannel's vxlan `DirectRouting` in lease mode: peers on our L2 subnet get a kernel route
//! `<subnet> via <PublicIP> dev eth0` and their pod traffic crosses the underlay
//! unencapsulated; a peer behind a router is still reached over VXLAN.
//!
//! ```text
//! ┌─ n1 ─────────────┐ ┌─ n2 ─────────────┐           ┌─ n3 ──────────────────────┐
//! │ pod a            │ │ pod b            │           │ pod c                     │
//! │ eth0 198.18.0.1  │ │ eth0 198.18.0.2  │           │ eth0 198.18.1.3/24        │
//! └────────┬─────────┘ └────────┬─────────┘           │ (public_ip from its       │
//!          │   a <-> b: plain IP │                     │  default route)           │
//! ┌────────┴─────────────────────┴────────── u: br0 ─┐ └────────────┬──────────────┘
//! │ underlay 198.18.0.0/24 (tcpdump here)           │              │ a <-> c: VXLAN
//! └──────────────────────┬──────────────────────────┘              │   (udp 8472)
//!              ┌─────────┴── r1 ───────────────────────────────────┴─┐
//!              │ eth0 198.18.0.254/24    ip_forward    eth1 198.18.1.254/24 │
//!              └────────────────────────────────────────────────────────────┘
//! ```
//!
//! Needs root; namespaces and daemons are removed on drop.

// Helpers outside #[test] fns fail the test loudly, as the tests themselves do.
#![allow(clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::{Value, json};
use weft_netns_tests::cmd::poll_until;
use weft_netns_tests::cni::{CniRuntime, Pod, plugin_dir, pod_ip};
use weft_netns_tests::lease::run_weft;
use weft_netns_tests::{Capture, IperfServer, Netns, NodeConfig, Topology, WeftNode, iperf3_tcp_run, ping_all, report};

const SETTLE: Duration = Duration::from_secs(15);

/// `ip route show proto 87` (weft's direct routes), one line each.
fn direct_routes(ns: &Netns) -> Vec<String> {
    let out = ns.exec_ok("ip", &["-4", "route", "show", "proto", "87"]).expect("ip route").stdout;
    out.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|l| !l.is_empty()).collect()
}

fn wait_routes(ns: &Netns, want: &[String]) -> Vec<String> {
    let mut last = Vec::new();
    let found = poll_until(SETTLE, || {
        last = direct_routes(ns);
        Ok((last == want).then_some(()))
    })
    .expect("poll");
    assert!(found.is_some(), "direct routes in {}: {last:?}, want {want:?}", ns.name());
    last
}

fn runtime(node: &WeftNode<'_>, topo: &Topology) -> CniRuntime {
    let conflist = json!({
        "cniVersion": "1.1.0",
        "name": "weft",
        "plugins": [{"type": "weft-cni", "socket": node.socket(), "pendingReleaseDir": topo.dir().join("pending")}],
    });
    CniRuntime::new(node.ns().name(), plugin_dir(topo.dir()).expect("plugin dir"), conflist).expect("runtime")
}

/// (protocol, source, destination, UDP destination port) of an IPv4 packet.
fn summary(p: &[u8]) -> Option<(u8, Ipv4Addr, Ipv4Addr, Option<u16>)> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let addr = |at: usize| Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]);
    let dport = (p[9] == 17).then(|| p.get(ihl + 2..ihl + 4).map(|b| u16::from_be_bytes([b[0], b[1]]))).flatten();
    Some((p[9], addr(12), addr(16), dport))
}

#[test]
fn direct_routing_skips_encapsulation_on_the_same_l2_subnet_only() {
    let Some(mut topo) = Topology::for_test("direct_routing_same_l2_only", "direct", 2).expect("topology") else {
        return;
    };
    topo.add_routed_host("n3", 1, 3).expect("n3 behind a router");
    let store = topo.file_store();
    let json = topo.dir().join("net-conf.json");
    std::fs::write(
        &json,
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true,"GBP":false,"MTU":1400}}"#,
    )
    .expect("net-conf");
    let mut init = vec!["network".to_owned(), "init".to_owned()];
    init.extend(store.cli_args());
    init.extend(["--json".to_owned(), json.display().to_string()]);
    let init: Vec<&str> = init.iter().map(String::as_str).collect();
    run_weft(topo.n(1).ns(), &init).expect("weft network init").ok().expect("network init");

    let mut n1 = topo.start_weft(topo.lease_config(1, &store)).expect("n1");
    assert_eq!(
        topo.n(1).ns().exec_ok("cat", &["/proc/sys/net/ipv4/ip_forward"]).expect("sysctl").stdout.trim(),
        "1",
        "DirectRouting: the daemon turns on forwarding for traffic to its pods"
    );
    let mut n2 = topo.start_weft(topo.lease_config(2, &store)).expect("n2");
    let n3_cfg =
        NodeConfig { omit_public_ip: true, public_ip: Ipv4Addr::new(198, 18, 1, 3), ..topo.lease_config(3, &store) };
    let n3 = topo.start_weft(n3_cfg).expect("n3");
    let (s1, s2, s3) =
        (n1.leased_subnet().expect("s1"), n2.leased_subnet().expect("s2"), n3.leased_subnet().expect("s3"));
    for (node, others) in [(&n1, [&s2, &s3]), (&n2, [&s1, &s3]), (&n3, [&s1, &s2])] {
        for s in others {
            assert!(
                node.wait_peer_subnet(s, true, SETTLE, Duration::from_millis(100)).expect("status").is_some(),
                "{s}"
            );
        }
    }
    let n3_status = n3.status_json().expect("status n3");
    assert_eq!(n3_status["public_ip"], "198.18.1.3", "n3's address from its default route: {n3_status}");
    assert_eq!(n1.status_json().expect("status")["mtu"], 1400, "Backend.MTU");

    // Only the peer on the same L2 subnet gets a direct route, on both sides.
    wait_routes(topo.n(1).ns(), &[format!("{s2} via 198.18.0.2 dev eth0")]);
    wait_routes(topo.n(2).ns(), &[format!("{s1} via 198.18.0.1 dev eth0")]);
    assert_eq!(direct_routes(topo.host("n3").expect("n3").ns()), Vec::<String>::new(), "n3 is behind a router");

    let (rt1, rt2, rt3) = (runtime(&n1, &topo), runtime(&n2, &topo), runtime(&n3, &topo));
    let (a, b, c) =
        (Pod::create(&topo, "a").expect("a"), Pod::create(&topo, "b").expect("b"), Pod::create(&topo, "c").expect("c"));
    let ip = |r: Value| pod_ip(&r).expect("pod ip");
    let ip_a = ip(rt1.add(&a.attachment("eth0")).expect("ADD a"));
    let ip_b = ip(rt2.add(&b.attachment("eth0")).expect("ADD b"));
    let ip_c = ip(rt3.add(&c.attachment("eth0")).expect("ADD c"));

    let cap = Capture::start(topo.underlay(), "br0", "icmp or udp port 8472", topo.dir(), "underlay").expect("tcpdump");
    ping_all(a.ns(), &ip_b, 3).expect("a -> b");
    ping_all(b.ns(), &ip_a, 3).expect("b -> a");
    ping_all(a.ns(), &ip_c, 3).expect("a -> c through the router");
    ping_all(c.ns(), &ip_a, 3).expect("c -> a through the router");
    let pcap = cap.stop().expect("pcap");
    let pkts: Vec<_> = pcap.ip_packets().expect("ip packets").into_iter().filter_map(summary).collect();
    let (pa, pb, pc): (Ipv4Addr, Ipv4Addr, Ipv4Addr) =
        (ip_a.parse().expect("a"), ip_b.parse().expect("b"), ip_c.parse().expect("c"));
    let (h1, h2, h3) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 1, 3));
    let plain = |x, y| pkts.iter().filter(|p| p.0 == 1 && p.1 == x && p.2 == y).count();
    let vxlan = |x, y| pkts.iter().filter(|p| p.3 == Some(8472) && p.1 == x && p.2 == y).count();
    report(&format!(
        "underlay: a->b plain {} b->a plain {} vxlan n1<->n2 {} | a->c plain {} vxlan n1->n3 {} n3->n1 {}",
        plain(pa, pb),
        plain(pb, pa),
        vxlan(h1, h2) + vxlan(h2, h1),
        plain(pa, pc),
        vxlan(h1, h3),
        vxlan(h3, h1)
    ));
    assert!(plain(pa, pb) >= 3 && plain(pb, pa) >= 3, "pod ICMP between a and b not seen unencapsulated: {pkts:?}");
    assert_eq!(vxlan(h1, h2) + vxlan(h2, h1), 0, "n1 and n2 encapsulated to each other: {pkts:?}");
    assert!(vxlan(h1, h3) >= 3 && vxlan(h3, h1) >= 3, "a <-> c should be VXLAN through the router: {pkts:?}");
    assert_eq!(plain(pa, pc) + plain(pc, pa), 0, "a <-> c leaked unencapsulated: {pkts:?}");

    // TCP between the direct peers' pods, with nothing encapsulated between their hosts.
    let cap = Capture::start(topo.underlay(), "br0", "udp port 8472 and host 198.18.0.2", topo.dir(), "tcp")
        .expect("tcpdump");
    let server = IperfServer::start(b.ns(), &ip_b, &topo.dir().join("iperf3-b.log")).expect("iperf3 server");
    let run = iperf3_tcp_run(a.ns(), &ip_b, 1, &[]).expect("iperf3 a -> b");
    drop(server);
    assert!(run.bytes > 0, "{run:?}");
    report(&format!("iperf3 TCP pod a -> pod b, direct: {:.2} Gbit/s", run.bits_per_second / 1e9));
    assert_eq!(cap.stop().expect("pcap").frames.len(), 0, "TCP between direct peers was encapsulated");

    // A stop keeps the direct routes (kernel forwarding needs no weft), a restart adopts them.
    n1.stop().expect("stop n1");
    assert_eq!(direct_routes(topo.n(1).ns()), [format!("{s2} via 198.18.0.2 dev eth0")], "a stop removed them");
    ping_all(a.ns(), &ip_b, 2).expect("a -> b while n1's weft is down");
    n1.restart().expect("restart n1");
    wait_routes(topo.n(1).ns(), &[format!("{s2} via 198.18.0.2 dev eth0")]);
    ping_all(a.ns(), &ip_b, 2).expect("a -> b after the restart");

    // The routes follow the leases: n2 leaves, n1 drops its route to n2, n2 removes its own.
    n2.leave().expect("n2 leaves");
    wait_routes(topo.n(1).ns(), &[]);
    assert_eq!(direct_routes(topo.n(2).ns()), Vec::<String>::new(), "a leave keeps weft's direct routes");
    ping_all(a.ns(), &ip_c, 2).expect("a -> c still over VXLAN");
}
