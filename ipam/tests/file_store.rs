//! The embedded store across real processes: concurrent acquisition from 50 processes, and
//! `kill -9` in the middle of lease and pod writes.
//!
//! The child processes are this test executable itself, started with `WEFT_IPAM_CHILD=<role>`
//! and the filter `child_entry`, so no helper binary is needed. Each child runs one role and
//! exits (or is killed).

// Test harness code outside `#[test]` fns (process and etcd helpers): a failed setup should
// fail the test loudly, which is what these lints exist to prevent elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use futures::executor::block_on;
use ipnet::Ipv4Net;
use rand::{Rng, SeedableRng};
use weft_ipam::lease_loop::execute;
use weft_ipam::store::{FilePodStore, FileStore, FileStoreOptions};
use weft_ipam::{
    Attachment, KeeperConfig, LeaseAction, LeaseAttrs, LeaseEvent, LeaseKeeper, LeaseStore, NetworkConfig,
    PodAllocator, Revision, SubnetLease,
};

/// The heavy tests (50 processes, kill loops) and the latency test must not share the two
/// cores, or the latency measurement measures the scheduler.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

const NETWORK: &str = r#"{"Network":"10.244.0.0/16"}"#;

fn spawn_child(role: &str, envs: &[(&str, String)]) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env("WEFT_IPAM_CHILD", role)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} not set"))
}

/// Not a test on its own: the entry point of the child processes.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var("WEFT_IPAM_CHILD") else { return };
    match role.as_str() {
        "acquire" => child_acquire(),
        "churn-leases" => child_churn_leases(),
        "churn-pods" => child_churn_pods(),
        other => panic!("unknown child role {other}"),
    }
}

fn public_ip(host: u16) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, (host >> 8) as u8, host as u8)
}

/// Acquires one lease with a real keeper on a FileStore and writes the subnet to WEFT_OUT.
fn child_acquire() {
    let store = FileStore::open(env("WEFT_STORE")).unwrap();
    let host: u16 = env("WEFT_HOST").parse().unwrap();
    let range = block_on(store.get_config()).unwrap().subnet_range();
    let config = KeeperConfig {
        seed: u64::from(host) ^ u64::from(std::process::id()),
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(500),
        ..KeeperConfig::new(range, LeaseAttrs::new(public_ip(host), "udp"))
    };
    let mut keeper = LeaseKeeper::new(config);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !keeper.is_ready(SystemTime::now()) {
        assert!(Instant::now() < deadline, "child {host} did not acquire: {:?}", keeper.status(SystemTime::now()));
        match keeper.poll(SystemTime::now()) {
            LeaseAction::WaitUntil(t) => std::thread::sleep(
                t.duration_since(SystemTime::now()).unwrap_or_default().min(Duration::from_millis(200)),
            ),
            action => block_on(execute(&mut keeper, &store, action, SystemTime::now)),
        }
    }
    let subnet = keeper.lease().unwrap().subnet;
    std::fs::write(env("WEFT_OUT"), subnet.to_string()).unwrap();
}

/// Writes leases as fast as it can until killed.
fn child_churn_leases() {
    let store = FileStore::open(env("WEFT_STORE")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(std::process::id()));
    loop {
        let subnet = Ipv4Net::new(Ipv4Addr::new(10, 244, rng.random_range(1..20), 0), 24).unwrap();
        let mut attrs = LeaseAttrs::new(public_ip(rng.random_range(1..5)), "vxlan");
        attrs.backend_data =
            serde_json::json!({"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44", "Pad": "x".repeat(rng.random_range(0..4000))});
        let lease = SubnetLease { subnet, attrs, expiration: None, created: Revision(0) };
        let now = SystemTime::now();
        let _ = match rng.random_range(0..4) {
            0 => store.blocking_create(&lease, Duration::from_secs(3600), now).map(|_| ()),
            1 => store.blocking_renew(&lease, Duration::from_secs(3600), now).map(|_| ()),
            2 => store.blocking_release(&lease, now).map(|_| ()),
            _ => store.blocking_delete(subnet).map(|_| ()),
        };
    }
}

/// Allocates and releases pod addresses as fast as it can until killed.
fn child_churn_pods() {
    let store = FilePodStore::open(env("WEFT_PODS")).unwrap();
    let alloc = PodAllocator::new(store, "10.244.1.0/24".parse().unwrap()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(std::process::id()));
    let me = std::process::id();
    loop {
        let who = Attachment::new(&format!("c{me}-{}", rng.random_range(0..30)), "eth0").unwrap();
        if rng.random_bool(0.6) {
            let _ = alloc.allocate(&who);
        } else {
            let _ = alloc.release(&who);
        }
    }
}

fn new_store(dir: &Path) -> FileStore {
    let store = FileStore::open(dir).unwrap();
    block_on(store.put_config(&NetworkConfig::from_json(NETWORK).unwrap())).unwrap();
    store
}

#[test]
fn fifty_processes_acquire_fifty_distinct_subnets() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let started = Instant::now();
    let children: Vec<(PathBuf, Child)> = (1..=50u16)
        .map(|host| {
            let out = dir.path().join(format!("out-{host}"));
            let child = spawn_child(
                "acquire",
                &[
                    ("WEFT_STORE", dir.path().display().to_string()),
                    ("WEFT_HOST", host.to_string()),
                    ("WEFT_OUT", out.display().to_string()),
                ],
            );
            (out, child)
        })
        .collect();
    let mut subnets = BTreeSet::new();
    for (out, mut child) in children {
        assert!(child.wait().unwrap().success());
        let subnet: Ipv4Net = std::fs::read_to_string(&out).unwrap().parse().unwrap();
        assert!(subnets.insert(subnet), "{subnet} acquired twice");
    }
    let snap = block_on(store.list()).unwrap();
    assert_eq!(snap.leases.len(), 50);
    assert!(snap.unreadable.is_empty());
    let in_store: BTreeSet<Ipv4Net> = snap.leases.iter().map(|l| l.subnet).collect();
    assert_eq!(in_store, subnets);
    let ips: BTreeSet<Ipv4Addr> = snap.leases.iter().map(|l| l.attrs.public_ip).collect();
    assert_eq!(ips.len(), 50, "one lease per node");
    eprintln!("50 processes acquired 50 distinct subnets in {:?}", started.elapsed());
}

/// Every file in the directory that is not a temporary file must parse.
fn assert_lease_dir_whole(dir: &Path) {
    for entry in std::fs::read_dir(dir.join("subnets")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let bytes = std::fs::read(entry.path()).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{name}: half-written record ({e}): {:?}", String::from_utf8_lossy(&bytes)));
        assert!(value["Attrs"]["PublicIP"].is_string(), "{name}: {value}");
    }
}

/// Temporary files in `dir`: writes that a kill interrupted.
fn temp_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .count()
}

#[test]
fn kill_9_during_lease_writes_leaves_a_readable_store() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    new_store(dir.path());
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut revisions = Vec::new();
    let mut interrupted = 0;
    for _ in 0..20 {
        let mut kids: Vec<Child> =
            (0..2).map(|_| spawn_child("churn-leases", &[("WEFT_STORE", dir.path().display().to_string())])).collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(30..250)));
        for kid in &mut kids {
            kid.kill().unwrap(); // SIGKILL
            kid.wait().unwrap();
        }
        assert_lease_dir_whole(dir.path());
        interrupted += temp_files(&dir.path().join("subnets")) + temp_files(dir.path());
        // Reopening sweeps the temporary files of the killed writers; everything parses.
        let store = FileStore::open(dir.path()).unwrap();
        let snap = block_on(store.list()).unwrap();
        assert!(snap.unreadable.is_empty(), "{:?}", snap.unreadable);
        assert!(block_on(store.get_config()).is_ok());
        revisions.push(snap.revision.0);
        assert_eq!(temp_files(&dir.path().join("subnets")), 0, "temporary files survived open");
    }
    eprintln!("lease store: 20 kill -9 rounds, {interrupted} writes caught mid-way, store readable after each");
    assert!(revisions.windows(2).all(|w| w[0] <= w[1]), "revision went backwards: {revisions:?}");
    assert!(revisions.last().copied().unwrap_or(0) > 20, "the children did write: {revisions:?}");
}

#[test]
fn kill_9_during_pod_writes_leaves_a_readable_store() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut interrupted = 0;
    for _ in 0..20 {
        let mut kids: Vec<Child> =
            (0..2).map(|_| spawn_child("churn-pods", &[("WEFT_PODS", dir.path().display().to_string())])).collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(30..250)));
        for kid in &mut kids {
            kid.kill().unwrap();
            kid.wait().unwrap();
        }
        interrupted += temp_files(dir.path());
        let alloc =
            PodAllocator::new(FilePodStore::open(dir.path()).unwrap(), "10.244.1.0/24".parse().unwrap()).unwrap();
        let records = alloc.allocations().unwrap();
        for r in &records {
            assert!(r.owner.is_some(), "{}: half-written pod record", r.ip);
        }
        let owners: BTreeSet<_> = records.iter().filter_map(|r| r.owner.clone()).collect();
        assert_eq!(owners.len(), records.len(), "an attachment holds two addresses");
        // The store still works after the crash.
        let who = Attachment::new("after-crash", "eth0").unwrap();
        let got = alloc.allocate(&who);
        assert!(got.is_ok() || matches!(got, Err(weft_ipam::PodError::Exhausted { .. })), "{got:?}");
        alloc.release(&who).unwrap();
        assert_eq!(temp_files(dir.path()), 0, "temporary files survived open");
    }
    eprintln!("pod store: 20 kill -9 rounds, {interrupted} writes caught mid-way, store readable after each");
}

#[test]
fn a_new_lease_reaches_a_watcher_within_one_second() {
    let _heavy = heavy();
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path());
    let snap = block_on(store.list()).unwrap();
    let mut watch = store.watch(&snap);
    // Another process's handle on the same directory.
    let other = FileStore::open_with(dir.path(), FileStoreOptions::default()).unwrap();
    let mut worst = Duration::ZERO;
    for third in 1..=5u8 {
        let lease = SubnetLease {
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), 24).unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, third), "udp"),
            expiration: None,
            created: Revision(0),
        };
        let created = block_on(other.create(&lease, Duration::from_secs(60))).unwrap().unwrap();
        let t = Instant::now();
        let batch = block_on(watch.next()).unwrap().unwrap();
        let seen = t.elapsed();
        worst = worst.max(seen);
        assert_eq!(batch.events, vec![LeaseEvent::Added(created)]);
        assert!(seen < Duration::from_secs(1), "seen after {seen:?}");
    }
    eprintln!("file store watch latency: worst {worst:?} over 5 creates (poll interval 100 ms)");
}
