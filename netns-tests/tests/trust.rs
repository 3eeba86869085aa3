//! Trust and fail-closed guarantees (issue 12): a restart during an etcd outage lets no pod
//! packet out unencapsulated and brings the data plane back from the lease cache before etcd
//! answers; a bogus lease record is refused and counted, never routed to; a dead worker or task
//! stops the daemon instead of leaving it "ready" with nothing behind it.
//!
//! ```text
//! ┌─ n1 ────────────────────┐ ┌─ n2 ──────────────┐ ┌─ etcd ──────────┐ ┌─ gw ───────────────┐ ┌─ evil ──────────┐
//! │ weft0 10.244.a.1        │ │ weft0 10.244.b.1  │ │ etcd 3.4        │ │ 198.18.0.254       │ │ 198.18.0.66     │
//! │ default via 198.18.0.254│ │                   │ │ 198.18.0.100    │ │ (a real next hop:  │ │ (named by bogus │
//! │ eth0 198.18.0.1/24      │ │ eth0 198.18.0.2   │ │                 │ │ leaks would reach  │ │ lease records)  │
//! └───────────┬─────────────┘ └─────────┬─────────┘ └────────┬────────┘ │ the wire)          │ └────────┬────────┘
//!             │                         │                    │          └─────────┬──────────┘          │
//! ┌───────────┴─────────────────────────┴────────────────────┴────────────────────┴─────────────────────┴────────┐
//! │  u: bridge br0, underlay 198.18.0.0/24; overlay udp :8285                                                        │
//! └──────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! A "leak" is a packet on n1's eth0 whose (outer) destination is in the cluster network
//! 10.244.0.0/16: encapsulated packets go to 198.18.0.x. n1 has a default route through a host
//! that answers ARP, so a leaked packet would really be sent, and the capture would see it.
//!
//! Needs root, tcpdump, iperf3 and Debian's etcd-server and etcd-client; everything is removed
//! on drop.

// Setup and assertion helpers outside #[test] fns: a failing step must fail the test loudly.
#![allow(clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::Value;
use weft_netns_tests::lease::lease_status;
use weft_netns_tests::{
    Capture, NetworkInit, NodeConfig, StoreConfig, Topology, WeftNode, json_path, ping, ping_all, report,
};

/// How long a node gets to reflect a store change.
const SETTLE: Duration = Duration::from_secs(10);

/// Polls `f` every 100 ms until it returns `Some`, for up to `timeout`.
fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn status(n: &WeftNode<'_>) -> Value {
    n.status_json().expect("weft status")
}

fn peer_subnets(n: &WeftNode<'_>) -> Vec<String> {
    weft_netns_tests::lease::peer_subnets(&status(n))
}

/// The fail-closed route for the cluster network in `n`'s namespace, if present.
fn fail_closed_route(topo: &Topology, host: usize) -> Option<String> {
    let out = topo
        .n(host)
        .ns()
        .exec_ok("ip", &["-4", "route", "show", "table", "all", "type", "unreachable", "root", "10.244.0.0/16"])
        .expect("ip route")
        .stdout;
    out.lines().find(|l| l.contains("10.244.0.0/16") && l.contains("metric 4000000000")).map(str::to_owned)
}

/// A host at `198.18.0.254` that answers ARP, and n1's default route through it: what a real
/// node has, and what would carry leaked pod traffic away.
fn add_default_gateway(topo: &mut Topology) {
    topo.add_host("gw", 254).expect("gateway host");
    topo.n(1).ns().exec_ok("ip", &["route", "add", "default", "via", "198.18.0.254", "dev", "eth0"]).expect("route");
}

/// n1 is stopped (SIGTERM, then kill -9) and restarted while etcd is dead, with a ping to n2's
/// pods running all along. Not one packet for the cluster network leaves n1 unencapsulated;
/// the restarted daemon comes up from its lease cache at once (provisional, with n2 as a peer)
/// and forwards before etcd is back; once etcd returns it confirms the lease and leaves
/// provisional mode, on the same subnet.
#[test]
fn restart_during_etcd_outage_fails_closed_and_comes_up_from_the_cache() {
    let Some(mut topo) =
        Topology::for_test_with_etcd("restart_during_etcd_outage_fails_closed", "trrst", 2).expect("topology")
    else {
        return;
    };
    add_default_gateway(&mut topo);
    let mut etcd = topo.start_etcd().expect("etcd");
    let store = StoreConfig::etcd(etcd.endpoints());
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let mut n1 = topo.start_weft(topo.lease_config(1, &store)).expect("n1");
    let n2 = topo.start_weft(topo.lease_config(2, &store)).expect("n2");
    let (s1, s2) = (n1.leased_subnet().expect("n1 subnet"), n2.leased_subnet().expect("n2 subnet"));
    assert!(wait_for(SETTLE, || peer_subnets(&n1).contains(&s2).then_some(())).is_some(), "n1 never saw n2");
    let gw2 = n2.gateway().expect("n2 gateway").to_string();
    let cache = n1.config().lease.as_ref().expect("lease mode").lease_cache.clone();
    assert!(wait_for(SETTLE, || cache.exists().then_some(())).is_some(), "no lease cache at {}", cache.display());
    ping_all(n1.ns(), &gw2, 2).expect("n1 -> n2 before the outage");

    let leak = Capture::start(n1.ns(), "eth0", "ip and dst net 10.244.0.0/16", topo.dir(), "n1-leak").expect("tcpdump");
    // Pod-bound traffic all along: 20 per second for the whole test.
    let mut pinger = n1
        .ns()
        .spawn("ping", &["-n", "-i", "0.05", "-w", "60", &gw2], &topo.dir().join("n1-ping.log"))
        .expect("background ping");
    etcd.kill().expect("kill -9 etcd");
    report("etcd killed");

    for (how, crash) in [("SIGTERM", false), ("kill -9", true)] {
        if crash {
            n1.kill().expect("kill -9 n1");
        } else {
            n1.stop().expect("graceful stop of n1");
        }
        // Between the two daemons: no TUN (after kill -9 the kernel may take a moment to tear
        // down the io_uring ring holding its last reference), only the fail-closed route.
        let gone = wait_for(Duration::from_secs(5), || (!n1.ns().has_link("weft0").expect("ip link")).then_some(()));
        assert!(gone.is_some(), "{how}: weft0 survived the daemon");
        let route = fail_closed_route(&topo, 1);
        assert!(route.is_some(), "{how}: no fail-closed route while n1 is down");
        std::thread::sleep(Duration::from_secs(2));

        let t0 = Instant::now();
        n1.restart().unwrap_or_else(|e| panic!("{how}: n1 did not come back while etcd is down: {e:#}"));
        let st = status(&n1);
        let lease = st.get("lease").expect("status.lease");
        assert_eq!(lease.get("provisional").and_then(Value::as_bool), Some(true), "{how}: {lease}");
        assert_eq!(lease.get("cache").and_then(Value::as_str), Some("loaded"), "{how}: {lease}");
        assert_eq!(lease.get("ready").and_then(Value::as_bool), Some(false), "{how}: pods wait for the store: {lease}");
        assert_eq!(json_path(&st, "subnet").and_then(Value::as_str), Some(s1.as_str()), "{how}: {st}");
        assert!(peer_subnets(&n1).contains(&s2), "{how}: n2 not routed from the cache: {st}");
        ping_all(n1.ns(), &gw2, 3).unwrap_or_else(|e| panic!("{how}: n1 -> n2 with etcd down: {e:#}"));
        report(&format!(
            "{how}: n1 back from its lease cache in {:.2} s, forwarding with etcd down",
            t0.elapsed().as_secs_f64()
        ));
    }

    etcd.restart().expect("restarting etcd");
    let confirmed = wait_for(Duration::from_secs(45), || {
        let l = lease_status(&status(&n1)).ok()?;
        let provisional = status(&n1).get("lease")?.get("provisional")?.as_bool()?;
        (l.phase == "held" && !provisional).then_some(l)
    });
    let confirmed = confirmed.unwrap_or_else(|| panic!("n1 never confirmed its lease: {}", status(&n1)));
    assert_eq!(confirmed.subnet, s1, "n1 moved subnet");
    ping_all(n1.ns(), &gw2, 2).expect("n1 -> n2 after etcd returned");

    pinger.signal("INT").expect("stop ping");
    let _ = pinger.wait_timeout(Duration::from_secs(5));
    let leaked = leak.stop().expect("stop capture").frames.len();
    let ping_log = std::fs::read_to_string(topo.dir().join("n1-ping.log")).unwrap_or_default();
    let summary = ping_log.lines().find(|l| l.contains("packets transmitted")).unwrap_or("").to_owned();
    report(&format!("background ping across two restarts: {summary}; unencapsulated packets on eth0: {leaked}"));
    assert!(summary.contains("received"), "the background ping did not run: {ping_log}");
    assert_eq!(leaked, 0, "pod traffic left n1 unencapsulated (see n1-leak.pcap)");
}

/// One `etcdctl put` of a record for the whole cluster network with an attacker's PublicIP
/// (and two more bogus ones) is refused, counted and listed in `weft status`; traffic keeps
/// going to the real peer and nothing at all is sent to the attacker.
#[test]
fn bogus_lease_records_are_refused_and_counted() {
    let Some(mut topo) = Topology::for_test_with_etcd("bogus_lease_records_are_refused", "trbog", 2).expect("topology")
    else {
        return;
    };
    topo.add_host("evil", 66).expect("attacker host");
    let etcd = topo.start_etcd().expect("etcd");
    let store = StoreConfig::etcd(etcd.endpoints());
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let n1 = topo.start_weft(topo.lease_config(1, &store)).expect("n1");
    let n2 = topo.start_weft(topo.lease_config(2, &store)).expect("n2");
    let s2 = n2.leased_subnet().expect("n2 subnet");
    assert!(wait_for(SETTLE, || peer_subnets(&n1).contains(&s2).then_some(())).is_some(), "n1 never saw n2");
    let evil = topo.host("evil").expect("evil");
    let to_evil = Capture::start(evil.ns(), "eth0", "udp", topo.dir(), "evil").expect("tcpdump on the attacker");

    let put = |key: &str, value: &str| {
        let out = etcd.etcdctl(&["put", &format!("/coreos.com/network/subnets/{key}"), value]).expect("etcdctl");
        assert!(out.status.success(), "etcdctl put {key}: {out}");
    };
    put("10.244.0.0-16", r#"{"PublicIP":"198.18.0.66","BackendType":"udp"}"#);
    put("10.244.250.0-24", r#"{"PublicIP":"0.0.0.0","BackendType":"udp"}"#);
    // A later record with n2's PublicIP: n2's own, older record keeps the endpoint.
    put("10.244.251.0-24", r#"{"PublicIP":"198.18.0.2","BackendType":"udp"}"#);

    let refused = wait_for(SETTLE, || {
        let l = status(&n1).get("lease")?.clone();
        let list = l.get("refused_leases")?.as_array()?.clone();
        (list.len() >= 3).then_some((l, list))
    });
    let (lease, list) = refused.unwrap_or_else(|| panic!("n1 did not refuse the bogus records: {}", status(&n1)));
    let reason = |subnet: &str| {
        list.iter()
            .find(|r| r.get("subnet").and_then(Value::as_str) == Some(subnet))
            .and_then(|r| r.get("reason").and_then(Value::as_str))
            .map(str::to_owned)
    };
    assert_eq!(reason("10.244.0.0/16").as_deref(), Some("wrong_subnet_len"), "{lease}");
    assert_eq!(reason("10.244.250.0/24").as_deref(), Some("bad_public_ip"), "{lease}");
    assert_eq!(reason("10.244.251.0/24").as_deref(), Some("duplicate_endpoint"), "{lease}");
    let total = |k: &str| json_path(&lease, &format!("refused_total.{k}")).and_then(Value::as_u64).unwrap_or(0);
    assert!(
        total("wrong_subnet_len") >= 1 && total("bad_public_ip") >= 1 && total("duplicate_endpoint") >= 1,
        "{lease}"
    );
    assert_eq!(peer_subnets(&n1), std::slice::from_ref(&s2), "only the real peer is routed");
    let text = n1.status_text().expect("weft status");
    assert!(text.contains("10.244.0.0/16 from 198.18.0.66: wrong_subnet_len"), "{text}");

    // Traffic goes where it should, and nowhere near the attacker.
    ping_all(n1.ns(), &n2.gateway().expect("gw").to_string(), 3).expect("n1 -> n2 with bogus records around");
    let miss = ping(n1.ns(), "10.244.199.1", 2).expect("ping an unleased subnet");
    assert!(!miss.success(), "an unleased subnet answered: {miss}");
    let sent = to_evil.stop().expect("stop capture").frames.len();
    report(&format!("bogus records refused: {:?}; datagrams to the attacker: {sent}", lease.get("refused_total")));
    assert_eq!(sent, 0, "weft sent traffic to the attacker's address (see evil.pcap)");

    // The wide record goes away: nothing changes for the real peer, and the count stays.
    let out = etcd.etcdctl(&["del", "/coreos.com/network/subnets/10.244.0.0-16"]).expect("etcdctl del");
    assert!(out.status.success(), "{out}");
    let gone = wait_for(SETTLE, || {
        let l = status(&n1).get("lease")?.clone();
        (l.get("refused_leases")?.as_array()?.len() == 2).then_some(l)
    });
    let l = gone.unwrap_or_else(|| panic!("the deleted record is still listed: {}", status(&n1)));
    assert!(json_path(&l, "refused_total.wrong_subnet_len").and_then(Value::as_u64) >= Some(1), "{l}");
    assert_eq!(peer_subnets(&n1), [s2]);
}

/// A worker that panics or returns, and a lease task that panics, each stop the daemon with
/// exit 1 within seconds, naming what died; the fail-closed route stays behind.
#[test]
fn a_dead_worker_or_task_stops_the_daemon() {
    let Some(topo) = Topology::for_test("a_dead_worker_or_task_stops_the_daemon", "trdead", 2).expect("topology")
    else {
        return;
    };
    let store = topo.file_store();
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let cases = [
        ("worker-panic", NodeConfig::mesh(1, 2), "worker panicked"),
        ("worker-exit", NodeConfig::mesh(1, 2), "worker ended without being asked"),
        ("lease-panic", topo.lease_config(1, &store), "lease task ended"),
    ];
    for (failpoint, cfg, logged) in cases {
        let mut n1 = topo.start_weft(cfg.with_env("WEFT_FAILPOINT", failpoint)).expect("n1");
        let t0 = Instant::now();
        let status = n1
            .wait_exit(Duration::from_secs(15))
            .expect("wait")
            .unwrap_or_else(|| panic!("{failpoint}: the daemon kept running with a dead part"));
        report(&format!("{failpoint}: daemon exited with {status} {:.1} s after start-up", t0.elapsed().as_secs_f64()));
        assert_eq!(status.code(), Some(1), "{failpoint}: {}", n1.log_tail(20));
        assert!(n1.log_tail(40).contains(logged), "{failpoint}: {}", n1.log_tail(40));
        assert!(!n1.ns().has_link("weft0").expect("ip link"), "{failpoint}: weft0 left behind");
        assert!(fail_closed_route(&topo, 1).is_some(), "{failpoint}: the fail-closed route went with the daemon");
    }
}

/// `weft leave` in lease mode: the lease is released (the other node drops the route), the
/// lease cache is forgotten and the fail-closed route removed; a plain stop keeps all three.
#[test]
fn leave_releases_the_lease_and_removes_the_fail_closed_route() {
    let Some(topo) = Topology::for_test("leave_releases_the_lease", "trleave", 2).expect("topology") else {
        return;
    };
    let store = topo.file_store();
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let mut n1 = topo.start_weft(topo.lease_config(1, &store)).expect("n1");
    let n2 = topo.start_weft(topo.lease_config(2, &store)).expect("n2");
    let s1 = n1.leased_subnet().expect("n1 subnet");
    assert!(wait_for(SETTLE, || peer_subnets(&n2).contains(&s1).then_some(())).is_some(), "n2 never saw n1");
    let cache = n1.config().lease.as_ref().expect("lease mode").lease_cache.clone();

    n1.stop().expect("graceful stop");
    assert!(fail_closed_route(&topo, 1).is_some(), "a stop removed the fail-closed route");
    assert!(cache.exists(), "a stop removed the lease cache");
    assert!(topo.leases(&store).expect("weft leases").iter().any(|l| l.subnet == s1), "a stop released the lease");

    n1.restart().expect("restart");
    n1.leave().expect("weft leave");
    assert!(fail_closed_route(&topo, 1).is_none(), "weft leave kept the fail-closed route");
    assert!(!cache.exists(), "weft leave kept the lease cache");
    assert!(!topo.leases(&store).expect("weft leases").iter().any(|l| l.subnet == s1), "weft leave kept the lease");
    assert!(wait_for(SETTLE, || (!peer_subnets(&n2).contains(&s1)).then_some(())).is_some(), "n2 still routes to n1");
}
