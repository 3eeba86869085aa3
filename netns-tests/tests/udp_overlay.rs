//! weft's flannel-`udp` overlay between real namespaces, driven through the real `weft` binary
//! with real traffic (ping, iperf3, tcpdump, crafted datagrams).
//!
//! ```text
//! ┌─ n1 ───────────────┐ ┌─ n2 ───────────────┐ ┌─ n3 ───────────────┐ ┌─ atk ──────────────┐
//! │ weft run, udp 8285 │ │ weft run           │ │ weft run           │ │ weft-craft         │
//! │ weft0 10.244.1.1/24│ │ weft0 10.244.2.1/24│ │ weft0 10.244.3.1/24│ │ (drops test only)  │
//! │ eth0 198.18.0.1/24 │ │ eth0 198.18.0.2/24 │ │ eth0 198.18.0.3/24 │ │ eth0 198.18.0.9/24 │
//! └──────────┬─────────┘ └──────────┬─────────┘ └──────────┬─────────┘ └──────────┬─────────┘
//!            │ v1                   │ v2                   │ v3                   │ v9
//! ┌──────────┴──────────────────────┴──────────────────────┴──────────────────────┴─────────┐
//! │  u: bridge br0, underlay 198.18.0.0/24                                                  │
//! └─────────────────────────────────────────────────────────────────────────────────────────┘
//!    namespaces are wt<pid>-<test>-<node>; each weft routes 10.244.0.0/16 into its weft0
//!    n1 ⇄ n2 ⇄ n3: the inner IPv4 packet is the bare UDP payload (flannel udp), port 8285
//! ```
//!
//! Each test builds its own topology; namespaces and daemons are removed on drop, also when the
//! test fails (then the daemons' log tails are printed and the scratch dir is kept). Underlay
//! addresses are in 198.18.0.0/15, overlay addresses in 10.244.0.0/16. Needs root; run with
//! `--test-threads=1`. Set `WEFT_BIN` to test a particular binary and `WEFT_TEST_IO=uring|mmsg`
//! to pin the I/O backend.

use std::time::{Duration, Instant};

use weft_netns_tests::cmd::poll_until;
use weft_netns_tests::weft::TUN;
use weft_netns_tests::{
    Capture, IperfServer, NodeConfig, PeerConfig, Topology, iperf3_tcp, json_u64, peer_status, ping, ping_all,
    ping_all_with, ping_with, report,
};

const CRAFT: &str = env!("CARGO_BIN_EXE_weft-craft");

/// How long counters get to reach their expected value.
const COUNTER_WAIT: Duration = Duration::from_secs(5);

/// Gateway (TUN) address of numbered host `n<i>`.
fn gw(i: u8) -> String {
    format!("10.244.{i}.1")
}

#[test]
fn ping_every_pair() {
    let Some(topo) = Topology::for_test("ping_every_pair", "ping", 3).expect("topology") else {
        return;
    };
    let nodes = topo.start_mesh(3).expect("starting weft");
    for a in 1..=3u8 {
        for b in (1..=3u8).filter(|&b| b != a) {
            ping_all(topo.n(a.into()).ns(), &gw(b), 3).unwrap_or_else(|e| panic!("n{a} -> {}: {e:#}", gw(b)));
        }
    }
    // Each direction carried 3 requests and 3 replies per ordered pair.
    for node in &nodes {
        let status = node.status_json().unwrap();
        for peer in &node.config().peers {
            let p = peer_status(&status, &peer.name).unwrap_or_else(|| panic!("no peer {} in {status}", peer.name));
            for key in ["tx_packets", "rx_packets"] {
                let v = json_u64(p, key).unwrap();
                assert!(v >= 6, "{} peer {} {key} = {v}, want >= 6", node.config().node_name, peer.name);
            }
        }
    }
}

#[test]
fn iperf3_tcp_between_two_hosts() {
    let Some(topo) = Topology::for_test("iperf3_tcp_between_two_hosts", "iperf", 2).expect("topology") else {
        return;
    };
    let _nodes = topo.start_mesh(2).expect("starting weft");
    let _server = IperfServer::start(topo.n(1).ns(), &gw(1), &topo.dir().join("iperf3-n1.log")).expect("iperf3 server");
    let bps = iperf3_tcp(topo.n(2).ns(), &gw(1), 3).expect("iperf3 client");
    assert!(bps > 0.0, "iperf3 reported {bps} bit/s");
}

#[test]
fn drops_non_peer_and_foreign_source() {
    let Some(mut topo) = Topology::for_test("drops_non_peer_and_foreign_source", "drops", 3).expect("topology") else {
        return;
    };
    topo.add_host("atk", 9).expect("attacker host");
    // Only n1 runs weft. n3 is a configured peer whose daemon is down, so its endpoint
    // 198.18.0.3:8285 is free to bind: datagrams from there are a real peer's, without spoofing.
    let n1 = topo.start_weft(NodeConfig::for_host(1).with_peers(&[2, 3])).expect("starting n1");
    let tun = Capture::start(n1.ns(), TUN, "ip", topo.dir(), "n1-weft0").expect("tcpdump weft0");
    // Nothing may go back toward the senders (no reflection, no amplification).
    let reflect = Capture::start(
        n1.ns(),
        "eth0",
        "ip and src host 198.18.0.1 and ( dst host 198.18.0.9 or dst host 198.18.0.3 )",
        topo.dir(),
        "n1-eth0",
    )
    .expect("tcpdump eth0");

    const N: u64 = 100;
    let n = N.to_string();
    let unknown0 = n1.counter("drops.unknown_sender").unwrap();
    let foreign0 = n1.counter("drops.foreign_source").unwrap();

    // 1. A non-peer (198.18.0.9) sends well-formed packets with plausible inner addresses.
    topo.host("atk")
        .unwrap()
        .ns()
        .exec_ok(
            CRAFT,
            &[
                "--bind",
                "198.18.0.9:0",
                "--to",
                "198.18.0.1:8285",
                "--src",
                "10.244.2.1",
                "--dst",
                "10.244.1.1",
                "--count",
                &n,
                "--gap-us",
                "200",
            ],
        )
        .expect("weft-craft from attacker");
    let unknown = n1.wait_counter("drops.unknown_sender", COUNTER_WAIT, |v| v >= unknown0 + N).unwrap();
    assert_eq!(unknown, unknown0 + N, "drops.unknown_sender");

    // 2. Peer n3 sends packets whose inner source is in n2's subnet (a peer impersonating a
    //    third node's pods).
    topo.n(3)
        .ns()
        .exec_ok(
            CRAFT,
            &[
                "--bind",
                "198.18.0.3:8285",
                "--to",
                "198.18.0.1:8285",
                "--src",
                "10.244.2.5",
                "--dst",
                "10.244.1.1",
                "--count",
                &n,
                "--gap-us",
                "200",
            ],
        )
        .expect("weft-craft from n3");
    let foreign = n1.wait_counter("drops.foreign_source", COUNTER_WAIT, |v| v >= foreign0 + N).unwrap();
    assert_eq!(foreign, foreign0 + N, "drops.foreign_source");

    // Exactly N each: nothing counted twice or late.
    std::thread::sleep(Duration::from_millis(300));
    let status = n1.status_json().unwrap();
    assert_eq!(json_u64(&status, "drops.unknown_sender").unwrap(), unknown0 + N);
    assert_eq!(json_u64(&status, "drops.foreign_source").unwrap(), foreign0 + N);

    let delivered = tun.stop().unwrap().frames.len();
    assert_eq!(delivered, 0, "{delivered} crafted packets reached weft0");
    let reflected = reflect.stop().unwrap().frames.len();
    assert_eq!(reflected, 0, "{reflected} packets went back toward the senders");
}

#[test]
fn df_ping_too_big_gets_frag_needed() {
    let Some(topo) = Topology::for_test("df_ping_too_big_gets_frag_needed", "df", 2).expect("topology") else {
        return;
    };
    let n1 =
        topo.start_weft(NodeConfig::for_host(1).with_peer(PeerConfig::for_host(2).mtu(1200))).expect("starting n1");
    let _n2 = topo.start_weft(NodeConfig::mesh(2, 2)).expect("starting n2");

    // 1300 + 28 = 1328 bytes: under the TUN MTU (1472), over the peer's 1200.
    let out = ping_with(n1.ns(), &["-M", "do", "-s", "1300"], &gw(2), 2).unwrap();
    assert!(!out.success(), "oversize DF ping got through:\n{out}");
    let text = out.combined();
    assert!(
        text.contains("Frag needed") || text.contains("message too long, mtu=1200"),
        "no frag-needed in ping output:\n{out}"
    );
    let frag = n1.wait_counter("icmp.frag_needed", COUNTER_WAIT, |v| v >= 1).unwrap();
    assert!(frag >= 1, "icmp.frag_needed = {frag}");

    ping_all_with(n1.ns(), &["-M", "do", "-s", "1100"], &gw(2), 2).expect("1128-byte DF ping under the peer MTU");
}

#[test]
fn sighup_adds_peer_live() {
    let Some(topo) = Topology::for_test("sighup_adds_peer_live", "sighup", 3).expect("topology") else {
        return;
    };
    let mut n1 = topo.start_weft(NodeConfig::for_host(1).with_peers(&[2])).expect("starting n1");
    let n2 = topo.start_weft(NodeConfig::for_host(2).with_peers(&[1])).expect("starting n2");
    let n3 = topo.start_weft(NodeConfig::mesh(3, 3)).expect("starting n3");
    let pids = [n1.pid(), n2.pid(), n3.pid()];

    let out = ping(n1.ns(), &gw(3), 1).unwrap();
    assert!(!out.success(), "n1 reached n3 before it was a peer:\n{out}");

    let cfg = n1.config().clone().with_peers(&[3]);
    let hup = Instant::now();
    n1.reload_with(cfg).expect("SIGHUP n1");
    let reached = poll_until(Duration::from_secs(2), || Ok(ping(n1.ns(), &gw(3), 1)?.success().then_some(()))).unwrap();
    assert!(
        reached.is_some(),
        "n1 cannot reach n3 2 s after SIGHUP; n1 status: {}",
        n1.status_json().map(|s| s.to_string()).unwrap_or_default()
    );
    report(&format!("sighup_adds_peer_live: n1 -> n3 answered {:?} after SIGHUP", hup.elapsed()));
    assert!(peer_status(&n1.status_json().unwrap(), "n3").is_some());
    ping_all(n1.ns(), &gw(3), 3).expect("n1 -> n3 after reload");
    ping_all(n1.ns(), &gw(2), 3).expect("n1 -> n2 still works after reload");

    let mut nodes = [n1, n2, n3];
    for (node, pid) in nodes.iter_mut().zip(pids) {
        assert!(node.is_running(), "{} exited", node.config().node_name);
        assert_eq!(node.pid(), pid, "{} restarted", node.config().node_name);
    }
}

#[test]
fn unknown_destination_gets_net_unreachable() {
    let Some(topo) = Topology::for_test("unknown_destination_gets_net_unreachable", "unreach", 2).expect("topology")
    else {
        return;
    };
    let n1 = topo.start_weft(NodeConfig::mesh(1, 2)).expect("starting n1");

    let out = ping(n1.ns(), "10.244.77.1", 2).unwrap();
    assert!(!out.success(), "ping to a subnet nobody has succeeded:\n{out}");
    assert!(out.combined().contains("Destination Net Unreachable"), "no net-unreachable in ping output:\n{out}");
    let icmp = n1.wait_counter("icmp.net_unreachable", COUNTER_WAIT, |v| v >= 1).unwrap();
    assert!(icmp >= 1, "icmp.net_unreachable = {icmp}");
    let no_route = n1.counter("drops.no_route").unwrap();
    assert!(no_route >= 1, "drops.no_route = {no_route}");
}

#[test]
fn graceful_stop_keeps_only_the_fail_closed_route_and_leave_removes_it() {
    let Some(topo) = Topology::for_test("graceful_stop_keeps_only_the_fail_closed_route", "stop", 2).expect("topology")
    else {
        return;
    };
    let mut n1 = topo.start_weft(NodeConfig::mesh(1, 2)).expect("starting n1");
    let ns = n1.ns();
    let routes = || ns.exec_ok("ip", &["-4", "route", "show", "table", "all", "root", "10.244.0.0/16"]).unwrap().stdout;
    assert!(ns.has_link(TUN).unwrap(), "no {TUN} while running");
    assert!(!routes().trim().is_empty(), "no overlay route while running");

    let status = n1.stop().expect("graceful stop");
    assert!(status.success());
    assert!(!ns.has_link(TUN).unwrap(), "{TUN} left behind");
    // A stop is not a leave: only the fail-closed route stays, so that pod traffic for the
    // cluster network is refused, not sent out of the default route, until weft is back.
    let left = routes();
    let lines: Vec<&str> = left.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected only the fail-closed route:\n{left}");
    assert!(lines[0].starts_with("unreachable 10.244.0.0/16") && lines[0].contains("metric 4000000000"), "{left}");

    // `weft leave` takes the node out: nothing of weft's is left.
    let mut n1 = topo.start_weft(NodeConfig::mesh(1, 2)).expect("starting n1 again");
    n1.leave().expect("weft leave");
    let left = routes();
    assert!(left.trim().is_empty(), "routes left behind after leave:\n{left}");
}
