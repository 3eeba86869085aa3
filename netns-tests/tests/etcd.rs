//! The [`Etcd`] guard the lease-mode tests rely on: a real etcd in its own namespace on the
//! underlay bridge, reachable from the hosts, surviving kill -9 with its data, and going silent
//! under SIGSTOP. No weft here: if these fail, the lease tests' failures mean nothing.
//!
//! ```text
//! ┌─ n1 ──────────────┐            ┌─ etcd ─────────────────────────────┐
//! │ eth0 198.18.0.1   │            │ eth0 198.18.0.100                  │
//! │ etcdctl ──────────┼── :2379 ──▶│ etcd, data <scratch>/etcd.data     │
//! └─────────┬─────────┘            └─────────────────┬──────────────────┘
//! ┌─────────┴────────────────────────────────────────┴──────────────────┐
//! │  u: bridge br0, underlay 198.18.0.0/24                              │
//! └─────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Needs root and Debian's etcd-server (etcd, etcdctl); namespaces and processes are removed on
//! drop.

// The helper below is outside #[test] fns: a failing etcdctl start must fail the test loudly.
#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use weft_netns_tests::etcd::{CLIENT_PORT, client_url};
use weft_netns_tests::{Topology, report};

/// `etcdctl` run from host n1, across the bridge, not from etcd's own namespace.
fn etcdctl_from_n1(topo: &Topology, args: &[&str]) -> weft_netns_tests::CmdOutput {
    let endpoints = format!("--endpoints={}", client_url());
    let mut full = vec!["ETCDCTL_API=3", "etcdctl", &endpoints, "--command-timeout=2s"];
    full.extend_from_slice(args);
    topo.n(1).ns().exec_timeout(Duration::from_secs(10), "env", &full).expect("starting etcdctl")
}

#[test]
fn etcd_guard_serves_the_bridge_and_survives_kill_9() {
    let Some(topo) =
        Topology::for_test_with_etcd("etcd_guard_serves_the_bridge_and_survives_kill_9", "etcdk", 1).unwrap()
    else {
        return;
    };
    let t0 = Instant::now();
    let mut etcd = topo.start_etcd().unwrap();
    report(&format!("etcd healthy {:.2} s after spawn", t0.elapsed().as_secs_f64()));
    assert_eq!(etcd.client_url(), format!("http://198.18.0.100:{CLIENT_PORT}"));
    assert_eq!(etcd.client_url(), client_url());

    // Reachable from another host over the bridge; listening nowhere but 198.18.0.100.
    etcdctl_from_n1(&topo, &["put", "/weft-test/k", "v1"]).ok().unwrap();
    let got = etcdctl_from_n1(&topo, &["get", "/weft-test/k", "--print-value-only"]).ok().unwrap();
    assert_eq!(got.stdout.trim(), "v1");
    let listening = topo.host("etcd").unwrap().ns().exec_ok("ss", &["-Hltn"]).unwrap().stdout;
    for line in listening.lines() {
        assert!(line.contains("198.18.0.100:"), "etcd listens beyond its underlay address: {line}");
    }

    // kill -9: unreachable, then back on the same data dir with the data.
    let old_pid = etcd.pid();
    etcd.kill().unwrap();
    assert!(!etcd.is_healthy().unwrap());
    assert!(!etcdctl_from_n1(&topo, &["get", "/weft-test/k"]).success(), "etcd answered while killed");
    let t1 = Instant::now();
    etcd.restart().unwrap();
    report(&format!("etcd healthy again {:.2} s after restart", t1.elapsed().as_secs_f64()));
    assert_ne!(etcd.pid(), old_pid);
    assert_eq!(etcd.starts(), 2);
    let got = etcdctl_from_n1(&topo, &["get", "/weft-test/k", "--print-value-only"]).ok().unwrap();
    assert_eq!(got.stdout.trim(), "v1", "data lost across kill -9 and restart");
    assert!(etcd.data_dir().join("member").is_dir());
}

/// etcd refreshes lease TTLs when it becomes leader after a restart (`lessor.Promote`), so a
/// lease with 30 s to live outlives a 12 s outage plus the time it had already run. The etcd
/// outage test of the daemon relies on this.
#[test]
fn etcd_guard_lease_outlives_kill_9() {
    let Some(topo) = Topology::for_test_with_etcd("etcd_guard_lease_outlives_kill_9", "etcdl", 1).unwrap() else {
        return;
    };
    let mut etcd = topo.start_etcd().unwrap();
    let grant = etcd.etcdctl(&["lease", "grant", "15"]).unwrap().ok().unwrap();
    // "lease 694d7b3c1f2a0b0c granted with TTL(15s)"
    let id = grant.stdout.split_whitespace().nth(1).unwrap().to_owned();
    etcd.etcdctl(&["put", "--lease", &id, "/weft-test/leased", "x"]).unwrap().ok().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    etcd.kill().unwrap();
    std::thread::sleep(Duration::from_secs(12));
    etcd.restart().unwrap();
    let got = etcd.etcdctl(&["get", "/weft-test/leased", "--print-value-only"]).unwrap().ok().unwrap();
    assert_eq!(got.stdout.trim(), "x", "the leased key expired across the outage");
    let ttl = etcd.etcdctl(&["lease", "timetolive", &id]).unwrap().ok().unwrap();
    report(&format!("after 5 s up, 12 s down, restart: {}", ttl.stdout.trim()));
}

#[test]
fn etcd_guard_pause_silences_and_resume_restores() {
    let Some(topo) = Topology::for_test_with_etcd("etcd_guard_pause_silences_and_resume_restores", "etcdp", 1).unwrap()
    else {
        return;
    };
    let mut etcd = topo.start_etcd().unwrap();
    etcd.pause().unwrap();
    assert!(etcd.is_paused());
    let t = Instant::now();
    let out = etcdctl_from_n1(&topo, &["get", "/weft-test/k"]);
    assert!(!out.success(), "a SIGSTOPped etcd answered: {out}");
    assert!(t.elapsed() >= Duration::from_secs(1), "a stopped etcd should time out, not refuse: {out}");
    etcd.resume().unwrap();
    etcd.wait_healthy(Duration::from_secs(10)).unwrap();
    etcdctl_from_n1(&topo, &["put", "/weft-test/k", "after"]).ok().unwrap();
    // Dropped while paused: the guard must still stop it promptly.
    etcd.pause().unwrap();
    let pid = etcd.pid().unwrap();
    let t = Instant::now();
    drop(etcd);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "etcd survived its guard");
    assert!(t.elapsed() < Duration::from_secs(3), "stopping a paused etcd took {:?}", t.elapsed());
}
