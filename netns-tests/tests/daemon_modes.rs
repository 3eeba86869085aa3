//! weft's I/O backends, multi-queue workers, and how the daemon refuses to start.
//!
//! ```text
//! ┌─ n1 ───────────────┐ ┌─ n2 ───────────────┐
//! │ weft0 10.244.1.1   │ │ weft0 10.244.2.1   │
//! │ eth0 198.18.0.1/24 │ │ eth0 198.18.0.2/24 │
//! └──────────┬─────────┘ └──────────┬─────────┘
//! ┌──────────┴──────────────────────┴─────────┐
//! │  u: bridge br0, underlay 198.18.0.0/24    │
//! └───────────────────────────────────────────┘
//! ```
//!
//! Needs root; namespaces and daemons are removed on drop.

use std::time::Duration;

use weft_netns_tests::weft::weft_bin;
use weft_netns_tests::{IperfServer, NodeConfig, Topology, iperf3_tcp, json_path, ping_all};

fn gw(i: u8) -> String {
    format!("10.244.{i}.1")
}

/// The recvmmsg/sendmmsg + epoll backend forwards like io_uring does, and says it is running.
#[test]
fn mmsg_fallback_forwards() {
    let Some(topo) = Topology::for_test("mmsg_fallback_forwards", "mmsg", 2).expect("topology") else {
        return;
    };
    let cfg = |i| NodeConfig { io: Some("mmsg".into()), ..NodeConfig::mesh(i, 2) };
    let n1 = topo.start_weft(cfg(1)).expect("starting n1");
    let _n2 = topo.start_weft(cfg(2)).expect("starting n2");
    assert_eq!(json_path(&n1.status_json().unwrap(), "io_backend").and_then(|v| v.as_str()), Some("mmsg"));
    ping_all(topo.n(1).ns(), &gw(2), 3).expect("n1 -> n2 over mmsg");
    ping_all(topo.n(2).ns(), &gw(1), 3).expect("n2 -> n1 over mmsg");
    let _server = IperfServer::start(topo.n(1).ns(), &gw(1), &topo.dir().join("iperf3-n1.log")).expect("iperf3 server");
    let bps = iperf3_tcp(topo.n(2).ns(), &gw(1), 2).expect("iperf3 over mmsg");
    assert!(bps > 0.0);
}

/// Two workers: two TUN queues and two SO_REUSEPORT sockets, on both backends.
#[test]
fn two_workers_forward_on_both_backends() {
    let Some(topo) = Topology::for_test("two_workers_forward_on_both_backends", "mq", 2).expect("topology") else {
        return;
    };
    for io in ["uring", "mmsg"] {
        let cfg = |i| NodeConfig { io: Some(io.into()), workers: Some(2), ..NodeConfig::mesh(i, 2) };
        let mut n1 = topo.start_weft(cfg(1)).expect("starting n1");
        let mut n2 = topo.start_weft(cfg(2)).expect("starting n2");
        assert_eq!(json_path(&n1.status_json().unwrap(), "workers").and_then(|v| v.as_u64()), Some(2));
        ping_all(topo.n(1).ns(), &gw(2), 3).unwrap_or_else(|e| panic!("{io}: n1 -> n2: {e:#}"));
        let _server =
            IperfServer::start(topo.n(1).ns(), &gw(1), &topo.dir().join(format!("iperf3-{io}.log"))).expect("server");
        let bps = iperf3_tcp(topo.n(2).ns(), &gw(1), 2).expect("iperf3");
        assert!(bps > 0.0, "{io}");
        n1.stop().expect("stop n1");
        n2.stop().expect("stop n2");
    }
}

/// A second daemon on a taken underlay port exits 5 and says so; the first keeps running.
#[test]
fn port_in_use_exits_5() {
    let Some(topo) = Topology::for_test("port_in_use_exits_5", "inuse", 2).expect("topology") else {
        return;
    };
    let mut n1 = topo.start_weft(NodeConfig::mesh(1, 2)).expect("starting n1");
    let bin = weft_bin().expect("weft binary");
    let sock = topo.dir().join("second.sock");
    let out = topo
        .n(1)
        .ns()
        .exec_timeout(
            Duration::from_secs(10),
            bin.to_str().expect("utf-8 path"),
            &[
                "run",
                "--node-name",
                "second",
                "--public-ip",
                "198.18.0.1",
                "--subnet",
                "10.244.9.0/24",
                "--tun-name",
                "weft9",
                "--api-socket",
                sock.to_str().expect("utf-8 path"),
            ],
        )
        .expect("second weft");
    assert_eq!(out.status.code(), Some(5), "{out}");
    assert!(out.stderr.contains("address in use: 198.18.0.1:8285"), "{out}");
    assert!(!topo.n(1).ns().has_link("weft9").unwrap(), "the refused daemon left its TUN behind");
    assert!(n1.is_running());
    ping_all(topo.n(1).ns(), "198.18.0.2", 1).expect("underlay still fine");
}

/// Without CAP_NET_ADMIN, and rootless mode turned off, the daemon exits 4 with a message
/// saying what it needs.
#[test]
fn unprivileged_exits_4() {
    let Some(topo) = Topology::for_test("unprivileged_exits_4", "noroot", 1).expect("topology") else {
        return;
    };
    let bin = weft_bin().expect("weft binary");
    let bin = bin.to_str().expect("utf-8 path");
    let out = topo
        .n(1)
        .ns()
        .exec_timeout(
            Duration::from_secs(10),
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                bin,
                "run",
                "--rootless=false",
                "--node-name",
                "n1",
                "--public-ip",
                "198.18.0.1",
                "--subnet",
                "10.244.1.0/24",
                "--api-socket",
                "/tmp/weft-unprivileged-test.sock",
            ],
        )
        .expect("setpriv weft");
    assert_eq!(out.status.code(), Some(4), "{out}");
    assert!(out.stderr.contains("needs root or CAP_NET_ADMIN"), "{out}");
    assert!(!topo.n(1).ns().has_link("weft0").unwrap());
}

/// A TUN deleted under a running daemon stops it with an error (exit 1) instead of a worker
/// spinning on failed reads; the fail-closed route keeps the cluster network unreachable.
#[test]
fn tun_deleted_under_daemon_exits_1() {
    let Some(topo) = Topology::for_test("tun_deleted_under_daemon_exits_1", "tundel", 2).expect("topology") else {
        return;
    };
    for io in ["uring", "mmsg"] {
        let mut n1 = topo.start_weft(NodeConfig { io: Some(io.into()), ..NodeConfig::mesh(1, 2) }).expect("n1");
        topo.n(1).ns().exec_ok("ip", &["link", "del", "weft0"]).expect("ip link del");
        let status =
            n1.wait_exit(Duration::from_secs(5)).expect("wait").unwrap_or_else(|| panic!("{io}: still running"));
        assert_eq!(status.code(), Some(1), "{io}: {}", n1.log_tail(20));
        assert!(n1.log_tail(20).contains("worker failed"), "{io}: {}", n1.log_tail(20));
    }
}

/// A daemon restarted right after a graceful stop binds its port again: the io_uring worker
/// cancels and reaps its in-flight requests before exiting, so the kernel has dropped its
/// references to the socket (ring teardown would otherwise release them in the background).
#[test]
fn immediate_restart_rebinds_the_port() {
    let Some(topo) = Topology::for_test("immediate_restart_rebinds_the_port", "rebind", 2).expect("topology") else {
        return;
    };
    for io in ["uring", "mmsg"] {
        for round in 0..5 {
            let cfg = NodeConfig { io: Some(io.into()), ..NodeConfig::mesh(1, 2) };
            let mut n1 = topo.start_weft(cfg).unwrap_or_else(|e| panic!("{io} round {round}: {e:#}"));
            n1.stop().unwrap_or_else(|e| panic!("{io} round {round}: {e:#}"));
        }
    }
}
