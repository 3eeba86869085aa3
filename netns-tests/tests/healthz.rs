//! `/healthz`, `/readyz` and `/metrics` (flannel's `--healthz-ip`/`--healthz-port`) of a real
//! daemon, asked by a real HTTP client from inside the node's namespace.
//!
//! ```text
//! ┌─ n1 ──────────────────────────────┐ ┌─ n2 ─────────────────┐ ┌─ etcd ─────────────────┐
//! │ weft (lease mode, ip_masq)        │ │ weft (lease mode)    │ │ etcd 3.4, down when n1 │
//! │ 127.0.0.1:8081 /healthz /readyz   │ │                      │ │ starts, back once n1   │
//! │               /metrics            │ │                      │ │ has said "not ready"   │
//! │ eth0 198.18.0.1                   │ │ eth0 198.18.0.2      │ │ eth0 198.18.0.100      │
//! └────────────────┬──────────────────┘ └──────────┬───────────┘ └───────────┬────────────┘
//! ┌────────────────┴───────────────────────────────┴─────────────────────────┴────────────┐
//! │  u: bridge br0, underlay 198.18.0.0/24                                                 │
//! └────────────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Needs root and Debian's etcd-server.

// Setup and assertion helpers outside #[test] fns: a failing step must fail the test loudly.
#![allow(clippy::expect_used, clippy::panic)]

use std::time::Duration;

use weft_netns_tests::http::{get, metric, parse_metrics, wait_for};
use weft_netns_tests::{NetworkInit, StoreConfig, Topology, ping_all};

const BASE: &str = "http://127.0.0.1:8081";

#[test]
fn readyz_waits_for_the_lease_and_metrics_count_traffic() {
    let Some(topo) = Topology::for_test_with_etcd("readyz_waits_for_the_lease_and_metrics_count_traffic", "healthz", 2)
        .expect("topology")
    else {
        return;
    };
    // The network config is written, then etcd goes down: n1 starts, serves its endpoints
    // and waits for the store.
    let mut etcd = topo.start_etcd().expect("etcd");
    let store = StoreConfig::etcd(etcd.endpoints());
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    etcd.kill().expect("kill -9 etcd");
    let cfg1 = topo.lease_config(1, &store).ip_masq(true).healthz_port(8081);
    let mut n1 = topo.start_weft_unready(cfg1).expect("weft n1");
    let ns1 = topo.n(1).ns();

    let live = wait_for(ns1, &format!("{BASE}/healthz"), Duration::from_secs(10), |r| r.status == 200)
        .expect("/healthz while waiting for the store");
    assert_eq!(live.body, "ok: starting\n");
    let ready = get(ns1, &format!("{BASE}/readyz")).expect("/readyz");
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.body.contains("waiting for the lease store"), "{}", ready.body);
    assert_eq!(ready.body.lines().count(), 1, "one line: {:?}", ready.body);
    let m = get(ns1, &format!("{BASE}/metrics")).expect("/metrics");
    assert_eq!(m.status, 200);
    assert!(m.content_type.as_deref().is_some_and(|c| c.starts_with("text/plain; version=0.0.4")), "{m:?}");
    let parsed = parse_metrics(&m.body).expect("metrics parse");
    assert_eq!(metric(&parsed, "weft_ready", &[]), Some(0.0));
    assert_eq!(get(ns1, &format!("{BASE}/nowhere")).expect("404").status, 404);

    // The store comes back: n1 leases a subnet, writes subnet.env, installs its rules, is
    // ready.
    etcd.restart().expect("restarting etcd");
    let ready = wait_for(ns1, &format!("{BASE}/readyz"), Duration::from_secs(30), |r| r.status == 200)
        .expect("/readyz after the lease");
    assert_eq!(ready.body, "ok\n");
    n1.wait_ready().expect("n1's API socket");
    let env = String::from_utf8(n1.subnet_env().expect("subnet.env")).expect("utf-8");
    assert!(env.contains("FLANNEL_IPMASQ=true\n"), "{env}");
    let live = get(ns1, &format!("{BASE}/healthz")).expect("/healthz");
    assert_eq!((live.status, live.body.as_str()), (200, "ok\n"));

    // A peer, and traffic to it: its tx counter grows by what was sent.
    let n2 = topo.start_weft(topo.lease_config(2, &store)).expect("weft n2");
    let s2 = n2.leased_subnet().expect("n2's subnet");
    assert!(
        n1.wait_peer_subnet(&s2, true, Duration::from_secs(5), Duration::from_millis(100)).expect("status").is_some(),
        "n1 never saw n2"
    );
    let tx = |text: &str| {
        let m = parse_metrics(text).expect("metrics parse");
        metric(&m, "weft_peer_tx_packets_total", &[("subnet", s2.as_str())])
    };
    let before = tx(&get(ns1, &format!("{BASE}/metrics")).expect("/metrics").body).expect("n2 listed as a peer");
    ping_all(ns1, &n2.gateway().expect("n2's gateway").to_string(), 5).expect("n1 -> n2");
    let text = get(ns1, &format!("{BASE}/metrics")).expect("/metrics").body;
    let after = tx(&text).expect("n2 still listed");
    assert!(after >= before + 5.0, "tx packets to n2 went from {before} to {after} over 5 pings");

    let m = parse_metrics(&text).expect("metrics parse");
    assert_eq!(metric(&m, "weft_ready", &[]), Some(1.0));
    assert_eq!(metric(&m, "weft_lease_phase", &[("phase", "held")]), Some(1.0));
    assert_eq!(metric(&m, "weft_lease_phase", &[("phase", "acquiring")]), Some(0.0));
    assert_eq!(metric(&m, "weft_lease_store_up", &[]), Some(1.0));
    assert!(metric(&m, "weft_lease_expires_in_seconds", &[]).is_some_and(|s| s > 0.0));
    assert_eq!(metric(&m, "weft_masq_installed", &[]), Some(1.0));
    assert_eq!(metric(&m, "weft_drops_total", &[("reason", "wrong_vni")]), Some(0.0), "every reason, zeros too");
    assert!(metric(&m, "weft_batch_size", &[]).is_some_and(|n| n > 0.0), "no I/O batch counted:\n{text}");
    assert!(metric(&m, "weft_lease_refused_records_total", &[("reason", "duplicate_mac")]).is_some());
}
