//! Lease mode: daemons with no `subnet` and no `[[peers]]` lease their subnets from a shared
//! store (the embedded file store, or etcd) and learn their peers from it.
//!
//! ```text
//!                      file store: <scratch>/store  (one directory, every daemon opens it)
//!                      etcd store: http://198.18.0.100:2379, /coreos.com/network/...
//!
//! ┌─ n1 ─────────────────┐ ┌─ n2 ─────────────────┐ ┌─ n3 ─────────────────┐ ┌─ etcd ──────────────┐
//! │ weft0 10.244.a.1 (*) │ │ weft0 10.244.b.1 (*) │ │ weft0 10.244.c.1 (*) │ │ etcd 3.4            │
//! │ <scratch>/n1.sock    │ │ <scratch>/n2.sock    │ │ <scratch>/n3.sock    │ │ (etcd tests only)   │
//! │ n1.subnet.env n1.pods│ │ n2.subnet.env n2.pods│ │ n3.subnet.env n3.pods│ │                     │
//! │ eth0 198.18.0.1/24   │ │ eth0 198.18.0.2/24   │ │ eth0 198.18.0.3/24   │ │ eth0 198.18.0.100   │
//! └──────────┬───────────┘ └──────────┬───────────┘ └──────────┬───────────┘ └──────────┬──────────┘
//! ┌──────────┴────────────────────────┴────────────────────────┴────────────────────────┴──────────┐
//! │  u: bridge br0, underlay 198.18.0.0/24; overlay udp :8285 (vxlan :8472)                         │
//! └─────────────────────────────────────────────────────────────────────────────────────────────────┘
//!   (*) a, b, c: whatever /24 of 10.244.0.0/16 the lease gives; the tests read it from
//!       `weft status --json` (lease.subnet, gateway) and never assume it.
//! ```
//!
//! The "within 1 s" checks measure the daemon's contract (file store polled every 100 ms, etcd
//! watched) with `weft status` polled every 50 ms, and print the figure.
//!
//! Needs root, iperf3 and Debian's etcd-server; namespaces, daemons and etcd are removed on drop.

// Setup and assertion helpers outside #[test] fns: a failing step must fail the test loudly,
// naming the node and what it saw.
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use weft_netns_tests::lease::{expect_refusal, is_pod_address_of};
use weft_netns_tests::weft::weft_bin;
use weft_netns_tests::{
    IperfServer, LeaseSettings, NetworkInit, StoreConfig, Topology, WeftNode, gateway_of, iperf3_tcp_run, json_path,
    lease_status, peer_by_subnet, ping, ping_all, report, status_mode,
};

/// How long the contract gives a daemon to reflect a store change in its route table.
const CONVERGE: Duration = Duration::from_secs(1);

/// How often the tests poll `weft status` when timing convergence.
const POLL: Duration = Duration::from_millis(50);

/// Generous wait for things that are not timed (peers after start-up, recovery after an outage).
const SETTLE: Duration = Duration::from_secs(5);

fn start_all<'t>(topo: &'t Topology, store: &StoreConfig, hosts: &[u8]) -> Vec<WeftNode<'t>> {
    hosts
        .iter()
        .map(|&i| topo.start_weft(topo.lease_config(i, store)).unwrap_or_else(|e| panic!("starting n{i}: {e:#}")))
        .collect()
}

/// Each node's leased subnet, in node order.
fn subnets(nodes: &[WeftNode<'_>]) -> Vec<String> {
    nodes.iter().map(|n| n.leased_subnet().expect("leased subnet")).collect()
}

/// Waits (untimed) until every node lists every other node's subnet as a peer.
fn wait_full_mesh(nodes: &[WeftNode<'_>]) {
    let subnets = subnets(nodes);
    for (i, n) in nodes.iter().enumerate() {
        for (j, s) in subnets.iter().enumerate() {
            if i != j {
                let seen = n.wait_peer_subnet(s, true, SETTLE, POLL).expect("status");
                assert!(
                    seen.is_some(),
                    "{} never listed {s} as a peer; peers: {:?}",
                    n.config().node_name,
                    n.peer_subnets()
                );
            }
        }
    }
}

/// Pings every node's gateway from every other node's namespace.
fn ping_every_pair(nodes: &[WeftNode<'_>]) {
    let gws: Vec<String> = nodes.iter().map(|n| n.gateway().expect("gateway").to_string()).collect();
    for (i, a) in nodes.iter().enumerate() {
        for (j, gw) in gws.iter().enumerate() {
            if i != j {
                ping_all(a.ns(), gw, 2).unwrap_or_else(|e| {
                    panic!("{} -> {} ({gw}): {e:#}", a.config().node_name, nodes[j].config().node_name)
                });
            }
        }
    }
}

/// Checks the lease part of a node's status: lease mode, held, the store kind, top-level
/// `subnet` and `gateway` filled from the lease.
fn assert_lease_status(node: &WeftNode<'_>, store: &StoreConfig) -> String {
    let status = node.status_json().expect("status");
    let name = &node.config().node_name;
    assert_eq!(status_mode(&status), Some("lease"), "{name}: {status}");
    let lease = lease_status(&status).expect("status.lease");
    assert_eq!(lease.phase, "held", "{name}: {status}");
    assert_eq!(lease.store, store.kind(), "{name}: {status}");
    assert!(lease.store_up, "{name}: {status}");
    assert_eq!(json_path(&status, "subnet").and_then(|v| v.as_str()), Some(lease.subnet.as_str()), "{name}");
    let gw = gateway_of(&lease.subnet).expect("subnet parses").to_string();
    assert_eq!(json_path(&status, "gateway").and_then(|v| v.as_str()), Some(gw.as_str()), "{name}");
    lease.subnet
}

/// Times how long after `t0` each of `watchers` lists `subnet` as a peer (`present`) or stops
/// listing it (`!present`), polling each in its own thread; `None` if not within 5 s.
fn time_convergence(watchers: &[&WeftNode<'_>], subnet: &str, present: bool, t0: Instant) -> Vec<Option<Duration>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = watchers
            .iter()
            .map(|n| s.spawn(move || n.wait_peer_subnet(subnet, present, SETTLE, POLL).expect("status")))
            .collect();
        handles.into_iter().map(|h| h.join().expect("poller thread").map(|t| t.duration_since(t0))).collect()
    })
}

/// Waits until the node's lease is `held` with the store up again (after an outage: the retry
/// backoff is capped at 30 s, plus jitter).
fn wait_lease_held(node: &WeftNode<'_>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let l = node.lease_status().expect("status");
        if l.phase == "held" && l.store_up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} not back to held + store_up after {timeout:?}: {l:?}",
            node.config().node_name
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_converged(what: &str, watchers: &[&WeftNode<'_>], times: &[Option<Duration>]) {
    for (n, t) in watchers.iter().zip(times) {
        let name = &n.config().node_name;
        match t {
            Some(t) => {
                report(&format!("{what}: {name} after {} ms", t.as_millis()));
                assert!(*t <= CONVERGE, "{what}: {name} took {t:?} (contract: {CONVERGE:?})");
            }
            None => panic!("{what}: {name} not within {SETTLE:?}; peers: {:?}", n.peer_subnets()),
        }
    }
}

#[test]
fn file_store_three_nodes_lease_and_ping() {
    let Some(topo) = Topology::for_test("file_store_three_nodes_lease_and_ping", "lfile", 3).expect("topology") else {
        return;
    };
    let store = topo.file_store();
    let printed = topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let printed = printed.to_string();
    assert!(printed.contains("10.244.0.0/16") && printed.contains("udp"), "network init printed {printed}");
    assert!(topo.leases(&store).expect("weft leases").is_empty(), "leases before any node started");

    let nodes = start_all(&topo, &store, &[1, 2, 3]);
    let subnets: Vec<String> = nodes.iter().map(|n| assert_lease_status(n, &store)).collect();
    let distinct: BTreeSet<&String> = subnets.iter().collect();
    assert_eq!(distinct.len(), 3, "subnets {subnets:?}");
    for s in &subnets {
        assert!(s.starts_with("10.244.") && s.ends_with("/24"), "{s} is not a /24 of 10.244.0.0/16");
        assert_ne!(s, "10.244.0.0/24", "flannel never leases the network's first subnet");
    }

    // The store holds exactly our three leases, each under its node's public IP.
    let leases = topo.leases(&store).expect("weft leases");
    let by_ip: BTreeMap<&str, &str> = leases.iter().map(|l| (l.public_ip.as_str(), l.subnet.as_str())).collect();
    assert_eq!(leases.len(), 3, "{leases:?}");
    for (i, s) in subnets.iter().enumerate() {
        assert_eq!(by_ip.get(format!("198.18.0.{}", i + 1).as_str()), Some(&s.as_str()), "{leases:?}");
    }
    for l in &leases {
        assert_eq!(l.backend_type, "udp", "{l:?}");
        assert!(l.expires_in_secs.is_some_and(|s| s > 0), "{l:?}");
    }

    // Every node's peers are the other two, at their public IPs on flannel's udp port.
    wait_full_mesh(&nodes);
    for (i, n) in nodes.iter().enumerate() {
        let status = n.status_json().expect("status");
        let peers = status.get("peers").and_then(|p| p.as_array()).map_or(0, Vec::len);
        assert_eq!(peers, 2, "{}: {status}", n.config().node_name);
        for (j, s) in subnets.iter().enumerate().filter(|&(j, _)| j != i) {
            let p = peer_by_subnet(&status, s).expect("peer listed");
            let endpoint = format!("198.18.0.{}:8285", j + 1);
            assert_eq!(p.get("endpoint").and_then(|v| v.as_str()), Some(endpoint.as_str()), "{p}");
            assert_eq!(p.get("name").and_then(|v| v.as_str()), Some(s.replace('/', "-").as_str()), "{p}");
        }
    }

    // flannel's subnet.env, for the flannel CNI plugin.
    for (n, s) in nodes.iter().zip(&subnets) {
        let env = String::from_utf8(n.subnet_env().expect("subnet.env")).expect("utf-8");
        let gw = gateway_of(s).expect("subnet parses");
        assert!(env.contains("FLANNEL_NETWORK=10.244.0.0/16\n"), "{env}");
        assert!(env.contains(&format!("FLANNEL_SUBNET={gw}/24\n")), "{env}");
    }

    ping_every_pair(&nodes);
}

#[test]
fn new_node_reachable_within_1s() {
    let Some(topo) = Topology::for_test("new_node_reachable_within_1s", "lnew", 3).expect("topology") else {
        return;
    };
    let store = topo.file_store();
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let nodes = start_all(&topo, &store, &[1, 2]);
    wait_full_mesh(&nodes);

    let n3 = topo.start_weft(topo.lease_config(3, &store)).expect("starting n3");
    // start_weft returns as soon as n3's status answers: the clock starts there.
    let t0 = Instant::now();
    let s3 = n3.leased_subnet().expect("n3 subnet");
    let watchers: Vec<&WeftNode<'_>> = nodes.iter().collect();
    let times = time_convergence(&watchers, &s3, true, t0);
    assert_converged(&format!("new node n3 ({s3}) listed"), &watchers, &times);

    let gw3 = n3.gateway().expect("n3 gateway").to_string();
    for n in &nodes {
        ping_all(n.ns(), &gw3, 2).unwrap_or_else(|e| panic!("{} -> n3: {e:#}", n.config().node_name));
        ping_all(n3.ns(), &n.gateway().expect("gateway").to_string(), 2)
            .unwrap_or_else(|e| panic!("n3 -> {}: {e:#}", n.config().node_name));
    }
}

#[test]
fn restart_keeps_subnet() {
    let Some(topo) = Topology::for_test("restart_keeps_subnet", "lrst", 2).expect("topology") else {
        return;
    };
    let store = topo.file_store();
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let mut nodes = start_all(&topo, &store, &[1, 2]);
    wait_full_mesh(&nodes);
    let s1 = nodes[0].leased_subnet().expect("n1 subnet");
    let env1 = nodes[0].subnet_env().expect("n1 subnet.env");

    nodes[0].stop().expect("graceful stop of n1");
    // No release on exit: the lease stays in the store for the restart to find.
    let leases = topo.leases(&store).expect("weft leases");
    assert!(leases.iter().any(|l| l.subnet == s1 && l.public_ip == "198.18.0.1"), "{leases:?}");

    nodes[0].restart().expect("restarting n1");
    assert_eq!(nodes[0].leased_subnet().expect("n1 subnet"), s1, "n1 came back with another subnet");
    assert_eq!(nodes[0].subnet_env().expect("n1 subnet.env"), env1, "subnet.env changed across the restart");
    let leases = topo.leases(&store).expect("weft leases");
    assert_eq!(leases.iter().filter(|l| l.public_ip == "198.18.0.1").count(), 1, "{leases:?}");
    wait_full_mesh(&nodes);
    ping_every_pair(&nodes);
}

#[test]
fn release_on_exit_frees_the_lease() {
    let Some(topo) = Topology::for_test("release_on_exit_frees_the_lease", "lrel", 2).expect("topology") else {
        return;
    };
    let store = topo.file_store();
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let releasing = topo.lease_config(1, &store);
    let releasing =
        weft_netns_tests::NodeConfig { lease: releasing.lease.map(LeaseSettings::release_on_exit), ..releasing };
    let mut n1 = topo.start_weft(releasing).expect("starting n1");
    let n2 = topo.start_weft(topo.lease_config(2, &store)).expect("starting n2");
    let s1 = n1.leased_subnet().expect("n1 subnet");
    assert!(n2.wait_peer_subnet(&s1, true, SETTLE, POLL).expect("status").is_some(), "n2 never saw n1");

    n1.stop().expect("graceful stop of n1");
    let t0 = Instant::now();
    let leases = topo.leases(&store).expect("weft leases");
    assert!(!leases.iter().any(|l| l.subnet == s1 || l.public_ip == "198.18.0.1"), "lease kept: {leases:?}");
    let times = time_convergence(&[&n2], &s1, false, t0);
    assert_converged(&format!("released lease {s1} dropped"), &[&n2], &times);
}

#[test]
fn vxlan_through_leases() {
    let Some(topo) = Topology::for_test("vxlan_through_leases", "lvx", 2).expect("topology") else {
        return;
    };
    let store = topo.file_store();
    topo.network_init(&store, &NetworkInit::vxlan()).expect("weft network init --backend vxlan");
    let nodes = start_all(&topo, &store, &[1, 2]);
    wait_full_mesh(&nodes);
    let subnets = subnets(&nodes);
    let leases = topo.leases(&store).expect("weft leases");
    for (i, n) in nodes.iter().enumerate() {
        let status = n.status_json().expect("status");
        assert_eq!(json_path(&status, "backend").and_then(|v| v.as_str()), Some("vxlan"), "{status}");
        let mac = json_path(&status, "vtep_mac").and_then(|v| v.as_str()).expect("status.vtep_mac").to_owned();
        // Our lease publishes our VTEP MAC...
        let ours = leases.iter().find(|l| l.subnet == subnets[i]).expect("our lease listed");
        assert_eq!(ours.backend_type, "vxlan", "{ours:?}");
        assert_eq!(ours.vtep_mac().map(str::to_ascii_lowercase), Some(mac.to_ascii_lowercase()), "{ours:?}");
        // ...and the other node took it from there, with the VXLAN port.
        let other = &nodes[1 - i];
        let seen = other.status_json().expect("status");
        let p = peer_by_subnet(&seen, &subnets[i]).expect("peer listed");
        let mac_seen = p.get("mac").and_then(|v| v.as_str()).map(str::to_ascii_lowercase);
        assert_eq!(mac_seen, Some(mac.to_ascii_lowercase()), "{p}");
        let endpoint = format!("198.18.0.{}:8472", i + 1);
        assert_eq!(p.get("endpoint").and_then(|v| v.as_str()), Some(endpoint.as_str()), "{p}");
    }
    ping_every_pair(&nodes);
}

/// etcd dies (kill -9) for 30 s under a running TCP flow; the data plane must not notice, and
/// the daemons must pick up again without a restart.
#[test]
fn etcd_outage_keeps_traffic_and_recovers() {
    const TTL_SECS: u64 = 30;
    const OUTAGE: Duration = Duration::from_secs(30);
    const IPERF_SECS: u32 = 45;
    let Some(topo) =
        Topology::for_test_with_etcd("etcd_outage_keeps_traffic_and_recovers", "letcd", 2).expect("topology")
    else {
        return;
    };
    let mut etcd = topo.start_etcd().expect("etcd");
    let store = StoreConfig::etcd(etcd.endpoints());
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let cfg = |i: u8| topo.lease_config(i, &store).with_lease(|l| l.ttl_secs(TTL_SECS));
    let nodes: Vec<WeftNode<'_>> = [1, 2].map(|i| topo.start_weft(cfg(i)).expect("weft")).into();
    wait_full_mesh(&nodes);
    let subnets = subnets(&nodes);
    let pids: Vec<Option<u32>> = nodes.iter().map(WeftNode::pid).collect();
    let status_pids: Vec<Option<u64>> =
        nodes.iter().map(|n| json_path(&n.status_json().expect("status"), "pid").and_then(|v| v.as_u64())).collect();
    let (gw1, gw2) = (nodes[0].gateway().expect("gw").to_string(), nodes[1].gateway().expect("gw").to_string());

    let _server = IperfServer::start(nodes[0].ns(), &gw1, &topo.dir().join("iperf3-n1.log")).expect("iperf3 server");
    let mut samples = Vec::new();
    let mut down_store_up = Vec::new();
    let run = std::thread::scope(|s| {
        // Paced so that the pings, etcd's restart and the daemons' control planes get CPU on a
        // 2-core machine: the point is a flow that never stops, not its rate.
        let flow = s.spawn(|| iperf3_tcp_run(nodes[1].ns(), &gw1, IPERF_SECS, &["-b", "500M"]));
        std::thread::sleep(Duration::from_secs(3));
        let mut sample = |label: &str| {
            let a = ping(nodes[0].ns(), &gw2, 3).expect("ping");
            let b = ping(nodes[1].ns(), &gw1, 3).expect("ping");
            samples.push((label.to_owned(), a.success(), b.success()));
        };
        sample("before the outage");
        etcd.kill().expect("kill -9 etcd");
        let killed = Instant::now();
        for k in 1..=5u32 {
            let at = Duration::from_secs(u64::from(k) * 5);
            std::thread::sleep(at.saturating_sub(killed.elapsed()));
            sample(&format!("{} s into the outage", at.as_secs()));
            // The daemons answer status throughout.
            down_store_up = nodes.iter().map(|n| n.lease_status().expect("status during outage").store_up).collect();
        }
        std::thread::sleep(OUTAGE.saturating_sub(killed.elapsed()));
        etcd.restart().expect("restarting etcd");
        report(&format!("etcd down for {:.1} s", killed.elapsed().as_secs_f64()));
        sample("after etcd returned");
        flow.join().expect("iperf3 thread")
    });

    let run = run.expect("iperf3 across the outage");
    report(&format!(
        "iperf3 n2 -> n1 across the etcd outage: {:.2} Gbit/s, {} bytes, {} retransmits, slowest 1 s: {} bytes",
        run.bits_per_second / 1e9,
        run.bytes,
        run.retransmits,
        run.min_interval_bytes()
    ));
    assert!(run.bytes > 0);
    assert!(run.min_interval_bytes() > 0, "the flow stalled for a whole second: {:?}", run.interval_bytes);
    for (label, a, b) in &samples {
        assert!(*a && *b, "ping {label}: n1 -> n2 {a}, n2 -> n1 {b} (samples {samples:?})");
    }
    assert_eq!(down_store_up, [false, false], "status.lease.store_up 25 s into the outage");

    // Back to normal without a restart: held, store up, the same subnets in the store.
    for n in &nodes {
        wait_lease_held(n, Duration::from_secs(45));
    }
    let leases = topo
        .wait_leases(&store, Duration::from_secs(10), |l| subnets.iter().all(|s| l.iter().any(|x| &x.subnet == s)))
        .expect("weft leases");
    for (i, s) in subnets.iter().enumerate() {
        let ip = format!("198.18.0.{}", i + 1);
        assert!(leases.iter().any(|l| &l.subnet == s && l.public_ip == ip), "{s} of {ip} lost: {leases:?}");
    }
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n.pid(), pids[i], "daemon restarted");
        let pid = json_path(&n.status_json().expect("status"), "pid").and_then(|v| v.as_u64());
        assert_eq!(pid, status_pids[i], "daemon restarted");
        assert_eq!(n.leased_subnet().expect("subnet"), subnets[i]);
    }
    wait_full_mesh(&nodes);
    ping_every_pair(&nodes);
}

#[test]
fn etcd_new_node_and_restart() {
    let Some(topo) = Topology::for_test_with_etcd("etcd_new_node_and_restart", "letcn", 3).expect("topology") else {
        return;
    };
    let etcd = topo.start_etcd().expect("etcd");
    let store = StoreConfig::etcd(etcd.endpoints());
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let nodes = start_all(&topo, &store, &[1, 2]);
    wait_full_mesh(&nodes);
    for n in &nodes {
        assert_lease_status(n, &store);
    }

    let mut n3 = topo.start_weft(topo.lease_config(3, &store)).expect("starting n3");
    let t0 = Instant::now();
    let s3 = n3.leased_subnet().expect("n3 subnet");
    let watchers: Vec<&WeftNode<'_>> = nodes.iter().collect();
    let times = time_convergence(&watchers, &s3, true, t0);
    assert_converged(&format!("etcd: new node n3 ({s3}) listed"), &watchers, &times);
    ping_all(nodes[0].ns(), &n3.gateway().expect("gw").to_string(), 2).expect("n1 -> n3");

    let env3 = n3.subnet_env().expect("n3 subnet.env");
    n3.stop().expect("graceful stop of n3");
    n3.restart().expect("restarting n3");
    assert_eq!(n3.leased_subnet().expect("n3 subnet"), s3, "n3 came back with another subnet");
    assert_eq!(n3.subnet_env().expect("n3 subnet.env"), env3, "subnet.env changed across the restart");
    let leases = topo.leases(&store).expect("weft leases");
    assert_eq!(leases.len(), 3, "{leases:?}");
    assert_eq!(leases.iter().filter(|l| l.public_ip == "198.18.0.3").count(), 1, "{leases:?}");
    ping_all(n3.ns(), &nodes[1].gateway().expect("gw").to_string(), 2).expect("n3 -> n2 after restart");
}

/// A node whose lease lapsed (etcd dead for longer than the TTL) refuses new pod addresses with
/// "not ready", keeps forwarding, and is ready again once etcd is back.
#[test]
fn ipam_not_ready_while_lease_expired() {
    const TTL_SECS: u64 = 10;
    let Some(topo) = Topology::for_test_with_etcd("ipam_not_ready_while_lease_expired", "lnrdy", 2).expect("topology")
    else {
        return;
    };
    let mut etcd = topo.start_etcd().expect("etcd");
    let store = StoreConfig::etcd(etcd.endpoints());
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let cfg = |i: u8| topo.lease_config(i, &store).with_lease(|l| l.ttl_secs(TTL_SECS));
    let nodes: Vec<WeftNode<'_>> = [1, 2].map(|i| topo.start_weft(cfg(i)).expect("weft")).into();
    wait_full_mesh(&nodes);
    let before = nodes[0].ipam_allocate("weft-test-before", "eth0").expect("allocate while held");

    etcd.kill().expect("kill -9 etcd");
    let deadline = Instant::now() + Duration::from_secs(3 * TTL_SECS);
    let phase = loop {
        let l = nodes[0].lease_status().expect("status");
        if l.phase == "expired" || Instant::now() > deadline {
            break l.phase;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(phase, "expired", "n1's lease phase {}s after etcd died", 3 * TTL_SECS);
    let out = nodes[0].ipam("allocate", &["--container-id", "weft-test-after", "--ifname", "eth0"]).expect("ipam");
    assert!(!out.success() && out.combined().contains("not ready"), "allocate with an expired lease:\n{out}");
    ping_every_pair(&nodes);

    etcd.restart().expect("restarting etcd");
    wait_lease_held(&nodes[0], Duration::from_secs(45));
    let after = nodes[0].ipam_allocate("weft-test-after", "eth0").expect("allocate after recovery");
    assert_ne!(after.address, before.address);
    assert_eq!(nodes[0].ipam_allocate("weft-test-before", "eth0").expect("repeat"), before);
}

#[test]
fn pod_ipam_over_the_api() {
    const PODS: usize = 20;
    let Some(topo) = Topology::for_test("pod_ipam_over_the_api", "lipam", 1).expect("topology") else {
        return;
    };
    let store = topo.file_store();
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let n1 = topo.start_weft(topo.lease_config(1, &store)).expect("starting n1");
    let subnet = n1.leased_subnet().expect("subnet");
    let gw = gateway_of(&subnet).expect("subnet parses").to_string();
    let prefix = subnet.split_once('/').map(|(_, p)| p.to_owned()).expect("prefix");
    let id = |i: usize| format!("weft-test-pod-{i:02}");

    // 20 ADDs at once, as a kubelet starting a deployment would send them.
    let node = &n1;
    let addrs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PODS).map(|i| s.spawn(move || (i, node.ipam_allocate(&id(i), "eth0")))).collect();
        handles.into_iter().map(|h| h.join().expect("allocate thread")).collect()
    });
    let mut seen = BTreeMap::new();
    for (i, a) in addrs {
        let a = a.unwrap_or_else(|e| panic!("allocate {}: {e:#}", id(i)));
        assert!(is_pod_address_of(a.ip(), &subnet).expect("parse"), "{} got {a:?} in {subnet}", id(i));
        assert!(a.address.ends_with(&format!("/{prefix}")), "{a:?}");
        assert_eq!(a.gateway, gw, "{a:?}");
        if let Some(other) = seen.insert(a.ip().to_owned(), i) {
            panic!("{} and {} both got {}", id(other), id(i), a.ip());
        }
    }
    assert_eq!(seen.len(), PODS);

    // ADD again for the same (container, ifname): the same address.
    let first = n1.ipam_allocate(&id(0), "eth0").expect("repeat allocate");
    assert_eq!(seen.get(first.ip()), Some(&0), "repeat allocate gave {first:?}");

    let list = n1.ipam_list().expect("ipam list");
    assert_eq!(list.len(), PODS, "{list:?}");
    for e in &list {
        let ip = e.address.split_once('/').map_or(e.address.as_str(), |(ip, _)| ip);
        let i = seen.get(ip).unwrap_or_else(|| panic!("listed {e:?} was never handed out"));
        assert_eq!((e.container_id.as_str(), e.ifname.as_str()), (id(*i).as_str(), "eth0"), "{e:?}");
    }

    // DEL, and DEL again (CNI: DEL must be idempotent).
    n1.ipam_release(&id(0), "eth0").expect("release");
    n1.ipam_release(&id(0), "eth0").expect("second release of the same pod");
    let list = n1.ipam_list().expect("ipam list");
    assert_eq!(list.len(), PODS - 1, "{list:?}");
    assert!(!list.iter().any(|e| e.container_id == id(0)), "{list:?}");

    // GC with the attachments still valid frees everything else, but only records older than
    // the grace period (an ADD racing the runtime's list must not lose its address): right
    // after allocating, nothing goes.
    let keep: Vec<(String, &str)> = (1..=4).map(|i| (id(i), "eth0")).collect();
    let keep_refs: Vec<(&str, &str)> = keep.iter().map(|(c, i)| (c.as_str(), *i)).collect();
    n1.ipam_gc(&keep_refs).expect("ipam gc");
    assert_eq!(n1.ipam_list().expect("ipam list").len(), PODS - 1, "gc freed records younger than its grace");
    let aged = n1.age_pod_records(Duration::from_secs(120)).expect("aging pod records");
    assert_eq!(aged, PODS - 1);
    n1.ipam_gc(&keep_refs).expect("ipam gc");
    let list = n1.ipam_list().expect("ipam list");
    let left: BTreeSet<&str> = list.iter().map(|e| e.container_id.as_str()).collect();
    let want: BTreeSet<&str> = keep.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(left, want, "after gc: {list:?}");
    // A kept pod still has its address.
    let again = n1.ipam_allocate(&id(1), "eth0").expect("allocate kept pod");
    assert_eq!(seen.get(again.ip()), Some(&1), "{again:?}");
}

/// `weft run` with `config` written as-is; the daemon is expected to refuse, so a 10 s deadline
/// bounds the case where it does not.
fn run_once(topo: &Topology, name: &str, toml: &str) -> weft_netns_tests::CmdOutput {
    let path = topo.dir().join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("writing config");
    let bin = weft_bin().expect("weft binary");
    topo.n(1)
        .ns()
        .exec_timeout(
            Duration::from_secs(10),
            bin.to_str().expect("utf-8"),
            &["run", "--config", path.to_str().expect("utf-8")],
        )
        .expect("weft run")
}

#[test]
fn lease_mode_refuses_static_fields_and_missing_config() {
    let Some(topo) =
        Topology::for_test("lease_mode_refuses_static_fields_and_missing_config", "lref", 1).expect("topology")
    else {
        return;
    };
    let store = topo.file_store();
    let base = topo.lease_config(1, &store).to_toml(&topo.dir().join("refused.sock"));

    // No network config yet.
    let out = run_once(&topo, "noconfig", &base);
    expect_refusal(&out, 3, &["weft network init"]).expect("lease mode without a network config");

    let printed = topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    // A second init without --force is refused and changes nothing; with --force it overwrites.
    let out = weft_netns_tests::lease::network_init(topo.n(1).ns(), &store, &NetworkInit::vxlan()).expect("init");
    expect_refusal(&out, 3, &[]).expect("second network init without --force");
    topo.network_init(&store, &NetworkInit::udp().force()).expect("network init --force");
    assert!(printed.to_string().contains("udp"));

    for (field, line) in [
        ("network", "network = \"10.244.0.0/16\"\n"),
        ("backend", "backend = \"udp\"\n"),
        ("port", "port = 8285\n"),
        ("vni", "vni = 1\n"),
        ("peers", "\n[[peers]]\nname = \"n2\"\nsubnet = \"10.244.2.0/24\"\nendpoint = \"198.18.0.2:8285\"\n"),
    ] {
        let out = run_once(&topo, field, &format!("{base}{line}"));
        expect_refusal(&out, 3, &[field]).unwrap_or_else(|e| panic!("lease mode with {field}: {e:#}"));
        assert!(!topo.n(1).ns().has_link("weft0").expect("ip link"), "refused daemon left weft0 ({field})");
    }
    assert!(topo.leases(&store).expect("weft leases").is_empty(), "a refused daemon took a lease");
}
