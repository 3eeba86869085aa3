//! `ip_masq` (flannel's `--ip-masq`): pod traffic that leaves the cluster network is
//! masqueraded to the node's address, pod-to-pod traffic keeps its pod addresses, and the
//! nftables table weft owns comes back after `nft flush ruleset`, stays over a plain stop,
//! goes on `weft leave` and on a start without `ip_masq`.
//!
//! ```text
//! ┌─ pod a1 ──────┐                                      ┌─ pod b1 ──────┐
//! │ eth0 10.244.1.x│                                     │ eth0 10.244.2.y│ (tcpdump: a1 → b1
//! └──────┬────────┘                                      └──────┬────────┘  keeps 10.244.1.x)
//! ┌─ n1 ─┴──────────────────────────┐        ┌─ n2 ──────────────┴─────────────┐
//! │ weft (ip_masq) weft0 10.244.1.1 │        │ weft (ip_masq) weft0 10.244.2.1 │
//! │ nft table ip weft-weft0         │        │                                 │
//! │ 198.18.1.0/24 via 198.18.0.50   │        │                                 │
//! │ eth0 198.18.0.1                 │        │ eth0 198.18.0.2                 │
//! └──────────────┬──────────────────┘        └───────────────┬─────────────────┘
//! ┌──────────────┴──────────────────────────────────────────┴─────────┬────────┐
//! │  u: bridge br0, underlay 198.18.0.0/24                            │        │
//! └───────────────────────────────────────────────────────────────────┘        │
//!                                       ┌─ inet ─────────────────────────────┴──┐
//!                                       │ eth0 198.18.0.50, lo 198.18.1.1/32    │
//!                                       │ ("the internet"; tcpdump sees n1's    │
//!                                       │  198.18.0.1, never 10.244.1.x)        │
//!                                       └───────────────────────────────────────┘
//! ```
//!
//! Needs root, tcpdump and nft (Debian's nftables, to look at and flush the ruleset the way
//! an admin would; weft itself speaks netlink).

// Setup and assertion helpers outside #[test] fns: a failing step must fail the test loudly.
#![allow(clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::time::Duration;

use weft_netns_tests::cni::{CniHost, CniRuntime, Pod, pod_ip};
use weft_netns_tests::http::{get, metric, parse_metrics, wait_for};
use weft_netns_tests::{Capture, Netns, NodeConfig, Topology, ping_all};

/// weft's table for the default TUN.
const TABLE: &str = "weft-weft0";

/// The "internet" address, outside the cluster network, routed via the inet host.
const OUTSIDE: &str = "198.18.1.1";

/// The inet host's underlay octet.
const INET_OCTET: u8 = 50;

fn has_table(ns: &Netns) -> bool {
    ns.exec("nft", &["list", "table", "ip", TABLE]).expect("nft").success()
}

/// (source, destination) of every ICMP echo request in a capture.
fn echo_requests(cap: Capture) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    let pcap = cap.stop().expect("capture");
    pcap.ip_packets()
        .expect("ip packets")
        .into_iter()
        .filter(|p| p.len() >= 21 && p[0] >> 4 == 4 && p[9] == 1 && p[20] == 8)
        .map(|p| (Ipv4Addr::new(p[12], p[13], p[14], p[15]), Ipv4Addr::new(p[16], p[17], p[18], p[19])))
        .collect()
}

#[test]
fn pods_reach_the_outside_masqueraded_and_pods_unmasqueraded() {
    let Some(mut topo) =
        Topology::for_test("pods_reach_the_outside_masqueraded_and_pods_unmasqueraded", "masq", 2).expect("topology")
    else {
        return;
    };
    topo.add_host("inet", INET_OCTET).expect("inet host");
    let inet = topo.host("inet").expect("inet").ns();
    inet.exec_ok("ip", &["addr", "add", &format!("{OUTSIDE}/32"), "dev", "lo"]).expect("outside address");
    for i in [1, 2] {
        topo.n(i)
            .ns()
            .exec_ok("ip", &["route", "add", "198.18.1.0/24", "via", &format!("198.18.0.{INET_OCTET}")])
            .expect("route to the outside");
    }

    let n1 = CniHost::start(&topo, NodeConfig::mesh(1, 2).ip_masq(true).healthz_port(8081)).expect("weft n1");
    let n2 = CniHost::start(&topo, NodeConfig::mesh(2, 2).ip_masq(true)).expect("weft n2");
    assert!(has_table(n1.ns()), "n1 has no table ip {TABLE}");
    let rules = n1.ns().exec_ok("nft", &["list", "table", "ip", TABLE]).expect("nft").stdout;
    assert!(rules.contains("masquerade") && rules.contains("10.244.1.0/24"), "{rules}");

    let rt1 = CniRuntime::weft_only(&n1, topo.dir(), "1.1.0").expect("runtime n1");
    let rt2 = CniRuntime::weft_only(&n2, topo.dir(), "1.1.0").expect("runtime n2");
    let a1 = Pod::create(&topo, "a1").expect("pod a1");
    let b1 = Pod::create(&topo, "b1").expect("pod b1");
    let ip_a1 = pod_ip(&rt1.add(&a1.attachment("eth0")).expect("ADD a1")).expect("a1 address");
    let ip_b1 = pod_ip(&rt2.add(&b1.attachment("eth0")).expect("ADD b1")).expect("b1 address");
    let a1_addr: Ipv4Addr = ip_a1.parse().expect("a1 address is IPv4");

    // Pod → outside: the far side sees n1's underlay address, and the replies find their way
    // back (they would not to a pod address the outside has no route for).
    let cap = Capture::start(inet, "eth0", "icmp", topo.dir(), "inet").expect("tcpdump on inet");
    ping_all(a1.ns(), OUTSIDE, 3).expect("a1 -> the outside, masqueraded");
    let seen = echo_requests(cap);
    assert!(!seen.is_empty(), "inet saw no echo request");
    for (src, dst) in &seen {
        assert_eq!((src.to_string().as_str(), dst.to_string().as_str()), ("198.18.0.1", OUTSIDE), "{seen:?}");
    }

    // Pod → pod on another node: the pod's own address arrives.
    let cap = Capture::start(b1.ns(), "eth0", "icmp", topo.dir(), "b1").expect("tcpdump in b1");
    ping_all(a1.ns(), &ip_b1, 3).expect("a1 -> b1 through the overlay");
    let seen = echo_requests(cap);
    assert!(!seen.is_empty(), "b1 saw no echo request");
    assert!(seen.iter().all(|(src, _)| *src == a1_addr), "a1's address rewritten on the way to b1: {seen:?}");
    // The node itself to a remote pod keeps its gateway address (inside our subnet).
    ping_all(n1.ns(), &ip_b1, 2).expect("n1 -> b1");

    // An admin flushes the ruleset: weft puts its table back within its resync period and
    // counts the repair.
    n1.ns().exec_ok("nft", &["flush", "ruleset"]).expect("nft flush ruleset");
    assert!(!has_table(n1.ns()));
    let url = "http://127.0.0.1:8081/metrics";
    let repaired = wait_for(n1.ns(), url, Duration::from_secs(15), |r| {
        parse_metrics(&r.body).ok().and_then(|m| metric(&m, "weft_masq_repairs_total", &[])).is_some_and(|v| v >= 1.0)
    })
    .expect("the table was not put back");
    let m = parse_metrics(&repaired.body).expect("metrics");
    assert_eq!(metric(&m, "weft_masq_installed", &[]), Some(1.0));
    assert!(has_table(n1.ns()), "metrics say repaired, but there is no table");
    ping_all(a1.ns(), OUTSIDE, 2).expect("a1 -> the outside after the repair");
    let ready = get(n1.ns(), "http://127.0.0.1:8081/readyz").expect("readyz");
    assert_eq!(ready.status, 200, "{}", ready.body);
}

#[test]
fn table_kept_on_stop_removed_on_leave_and_without_ip_masq() {
    let Some(topo) =
        Topology::for_test("table_kept_on_stop_removed_on_leave_and_without_ip_masq", "masqlife", 1).expect("topology")
    else {
        return;
    };
    let ns = topo.n(1).ns();
    let on = NodeConfig::for_host(1).ip_masq(true);
    let mut n1 = topo.start_weft(on.clone()).expect("weft with ip_masq");
    assert!(has_table(ns), "no table after a start with ip_masq");

    // A plain stop keeps it: pods must not reach the outside with their own addresses while
    // weft restarts.
    n1.stop().expect("stop");
    assert!(has_table(ns), "a plain stop removed the table");

    // A start without ip_masq removes what an earlier run left.
    let mut n1 = topo.start_weft(NodeConfig::for_host(1)).expect("weft without ip_masq");
    assert!(!has_table(ns), "ip_masq off, but the table of an earlier run is still there");
    n1.stop().expect("stop");

    // `weft leave` removes it.
    let mut n1 = topo.start_weft(on).expect("weft with ip_masq again");
    assert!(has_table(ns));
    n1.leave().expect("weft leave");
    assert!(!has_table(ns), "the table outlived weft leave");
}
