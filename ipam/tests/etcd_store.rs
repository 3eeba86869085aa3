//! The etcd store against a real etcd (Debian's `etcd-server`), started by each test on
//! 127.0.0.1 with free ports and a temporary data dir, and killed when the test ends
//! (`support::Etcd`).
//!
//! Without an `etcd` binary the tests fail under `CI=true` and otherwise skip, saying so.

#![cfg(feature = "etcd")]
// Test harness code outside `#[test]` fns (process and etcd helpers): a failed setup should
// fail the test loudly, which is what these lints exist to prevent elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use ipnet::Ipv4Net;
use support::Etcd;
use support::pki::{Pair, Pki};
use weft_ipam::keeper::AcquireSource;
use weft_ipam::lease_loop::execute;
use weft_ipam::store::{EtcdOptions, EtcdStore};
use weft_ipam::{
    EtcdCredentials, EtcdTls, KeeperConfig, KeeperEvent, LeaseAction, LeaseAttrs, LeaseEvent, LeaseKeeper, LeaseStore,
    NetworkConfig, Password, Revision, StoreError, SubnetLease,
};

fn options(etcd: &Etcd) -> EtcdOptions {
    EtcdOptions { request_timeout: Duration::from_secs(2), ..EtcdOptions::new([etcd.endpoint()]) }
}

async fn store(etcd: &Etcd) -> EtcdStore {
    EtcdStore::connect(options(etcd)).await.unwrap()
}

/// A store with the config written, once etcd answers.
async fn ready_store(etcd: &Etcd) -> EtcdStore {
    ready(store(etcd).await).await
}

/// `s` once etcd answers it, with the config written.
async fn ready(s: EtcdStore) -> EtcdStore {
    let config = NetworkConfig::from_json(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = s.put_config(&config).await {
        assert!(Instant::now() < deadline, "etcd never answered: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s
}

fn keeper(range: weft_ipam::SubnetRange, host: u8, ttl: Duration) -> LeaseKeeper {
    LeaseKeeper::new(KeeperConfig {
        ttl,
        renew_margin: ttl / 3,
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_secs(1),
        seed: u64::from(host),
        ..KeeperConfig::new(range, LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, host), "udp"))
    })
}

/// Runs the keeper's loop until `done` holds, sleeping as it asks (at most 200 ms at a time).
async fn run_until(k: &mut LeaseKeeper, s: &EtcdStore, limit: Duration, done: impl Fn(&LeaseKeeper) -> bool) {
    let deadline = Instant::now() + limit;
    while !done(k) {
        assert!(Instant::now() < deadline, "gave up: {:?}", k.status(SystemTime::now()));
        match k.poll(SystemTime::now()) {
            LeaseAction::WaitUntil(t) => {
                let nap = t.duration_since(SystemTime::now()).unwrap_or_default().min(Duration::from_millis(200));
                tokio::time::sleep(nap).await;
            }
            action => execute(k, s, action, SystemTime::now).await,
        }
    }
}

async fn acquire(k: &mut LeaseKeeper, s: &EtcdStore) -> SubnetLease {
    run_until(k, s, Duration::from_secs(60), |k| k.is_ready(SystemTime::now())).await;
    k.lease().unwrap().clone()
}

fn sources(k: &mut LeaseKeeper) -> Vec<AcquireSource> {
    std::iter::from_fn(|| k.poll_event())
        .filter_map(|e| match e {
            KeeperEvent::Acquired { source, .. } => Some(source),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_acquisitions_get_fifty_distinct_subnets() {
    let Some(etcd) = Etcd::start() else { return };
    let range = ready_store(&etcd).await.get_config().await.unwrap().subnet_range();
    let started = Instant::now();
    let tasks: Vec<_> = (1..=50u8)
        .map(|host| {
            let opts = options(&etcd);
            tokio::spawn(async move {
                // Each node its own client, as separate machines would have.
                let s = EtcdStore::connect(opts).await.unwrap();
                let mut k = keeper(range, host, Duration::from_secs(60));
                acquire(&mut k, &s).await.subnet
            })
        })
        .collect();
    let mut subnets = BTreeSet::new();
    for t in tasks {
        let subnet = t.await.unwrap();
        assert!(subnets.insert(subnet), "{subnet} acquired twice");
    }
    let snap = store(&etcd).await.list().await.unwrap();
    assert_eq!(snap.leases.len(), 50);
    assert_eq!(snap.leases.iter().map(|l| l.subnet).collect::<BTreeSet<_>>(), subnets);
    eprintln!("etcd: 50 concurrent nodes acquired 50 distinct subnets in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_its_subnet_and_uses_flannels_layout() {
    let Some(etcd) = Etcd::start() else { return };
    let s = ready_store(&etcd).await;
    let range = s.get_config().await.unwrap().subnet_range();
    let mut first = keeper(range, 7, Duration::from_secs(600));
    let lease = acquire(&mut first, &s).await;
    assert_eq!(sources(&mut first), vec![AcquireSource::NewSubnet]);

    // What flannel (or etcdctl) sees.
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    let key = format!("/coreos.com/network/subnets/{}-{}", lease.subnet.addr(), lease.subnet.prefix_len());
    let got = raw.get(key.as_str(), None).await.unwrap();
    let kv = &got.kvs()[0];
    assert_eq!(kv.value_str().unwrap(), r#"{"PublicIP":"198.18.0.7","PublicIPv6":null,"BackendType":"udp"}"#);
    let ttl = raw.lease_time_to_live(kv.lease(), None).await.unwrap().ttl();
    assert!((590..=600).contains(&ttl), "bound to an etcd lease with the TTL, got {ttl}");

    // The process restarts: a new keeper, a new connection, the same public IP.
    drop(first);
    let s2 = store(&etcd).await;
    let mut second = keeper(range, 7, Duration::from_secs(600));
    let again = acquire(&mut second, &s2).await;
    assert_eq!(again.subnet, lease.subnet);
    assert_eq!(sources(&mut second), vec![AcquireSource::OwnLease]);
    assert_eq!(s2.list().await.unwrap().leases.len(), 1, "no second lease");
}

/// `LeaseTimeToLive` requests etcd has answered so far, from its `/metrics` (served on the
/// client port).
fn ttl_requests(etcd: &Etcd) -> u64 {
    use std::io::{Read, Write};
    let mut conn = TcpStream::connect(("127.0.0.1", etcd.client_port)).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{") && l.contains(r#"grpc_method="LeaseTimeToLive""#))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// A list of more records than it asks TTLs at once: keys with their own etcd lease, two keys
/// sharing one, a reservation without one, unreadable records. Each etcd lease is asked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_reads_each_etcd_lease_once_and_keeps_every_kind_of_record() {
    let Some(etcd) = Etcd::start() else { return };
    let s = ready_store(&etcd).await;
    let subnet = |third: u8| Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), 24).unwrap();
    let attrs = |third: u8| LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, third), "udp");
    let own: Vec<u8> = (100..180).collect();
    for &third in &own {
        let lease = SubnetLease { subnet: subnet(third), attrs: attrs(third), expiration: None, created: Revision(0) };
        s.create(&lease, Duration::from_secs(600)).await.unwrap().unwrap();
    }
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    let key = |third: u8| format!("/coreos.com/network/subnets/10.244.{third}.0-24");
    let shared = raw.lease_grant(300, None).await.unwrap().id();
    for third in [1, 2] {
        let opts = etcd_client::PutOptions::new().with_lease(shared);
        raw.put(key(third), attrs(third).to_json(), Some(opts)).await.unwrap();
    }
    raw.put(key(3), attrs(3).to_json(), None).await.unwrap(); // a reservation
    raw.put(key(4), "{", None).await.unwrap();
    let junk = "/coreos.com/network/subnets/junk";
    raw.put(junk, attrs(5).to_json(), Some(etcd_client::PutOptions::new().with_lease(shared))).await.unwrap();

    let before = ttl_requests(&etcd);
    let now = SystemTime::now();
    let snap = s.list().await.unwrap();
    assert_eq!(ttl_requests(&etcd) - before, own.len() as u64 + 1, "one LeaseTimeToLive per etcd lease");

    let listed: Vec<Ipv4Net> = snap.leases.iter().map(|l| l.subnet).collect();
    let expected: Vec<Ipv4Net> = [1, 2, 3].into_iter().chain(own.iter().copied()).map(subnet).collect();
    assert_eq!(listed, expected, "every readable record, sorted by subnet");
    let secs_left = |l: &SubnetLease| l.expiration.map(|e| e.duration_since(now).unwrap().as_secs());
    for l in &snap.leases {
        let third = l.subnet.addr().octets()[2];
        assert_eq!(l.attrs, attrs(third));
        match third {
            1 | 2 => assert!(matches!(secs_left(l), Some(290..=300)), "{l:?}"),
            3 => assert_eq!(l.expiration, None, "a reservation has no expiry"),
            _ => assert!(matches!(secs_left(l), Some(590..=600)), "{l:?}"),
        }
    }
    let mut unreadable: Vec<_> = snap.unreadable.iter().map(|u| (u.key.as_str(), u.subnet)).collect();
    unreadable.sort_unstable();
    assert_eq!(unreadable, [(key(4).as_str(), Some(subnet(4))), (junk, None)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_reaches_a_watcher_within_one_second() {
    let Some(etcd) = Etcd::start() else { return };
    let s = ready_store(&etcd).await;
    let range = s.get_config().await.unwrap().subnet_range();
    let snap = s.list().await.unwrap();
    let mut watch = Box::pin(s.watch(&snap));
    let mut worst = Duration::ZERO;
    for host in 1..=5u8 {
        let mut k = keeper(range, host, Duration::from_secs(60));
        let lease = acquire(&mut k, &store(&etcd).await).await;
        let t = Instant::now();
        let batch = tokio::time::timeout(Duration::from_secs(1), watch.next())
            .await
            .unwrap_or_else(|_| panic!("node {host} not seen within 1 s"))
            .unwrap()
            .unwrap();
        worst = worst.max(t.elapsed());
        assert!(!batch.resync);
        assert!(
            matches!(&batch.events[..], [LeaseEvent::Added(l)] if l.subnet == lease.subnet && l.attrs == lease.attrs)
        );
    }
    eprintln!("etcd watch latency after create returned: worst {worst:?} over 5 nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_resyncs_with_a_diff_not_a_wipe() {
    let Some(etcd) = Etcd::start() else { return };
    let s = ready_store(&etcd).await;
    let mk = |third: u8| SubnetLease {
        subnet: Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), 24).unwrap(),
        attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, third), "udp"),
        expiration: None,
        created: Revision(0),
    };
    for third in 1..=3 {
        s.create(&mk(third), Duration::from_secs(600)).await.unwrap().unwrap();
    }
    let old = s.list().await.unwrap();
    // While "our watcher was away": one node leaves, one joins, then history is compacted.
    assert!(s.delete(mk(2).subnet).await.unwrap());
    let joined = s.create(&mk(4), Duration::from_secs(600)).await.unwrap().unwrap();
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    let rev = raw.get("x", None).await.unwrap().header().unwrap().revision();
    raw.compact(rev, None).await.unwrap();

    let mut watch = Box::pin(s.watch(&old));
    let batch = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap().unwrap();
    assert!(batch.resync);
    assert_eq!(batch.events.len(), 2, "{:?}", batch.events);
    assert!(batch.events.contains(&LeaseEvent::Removed(mk(2).subnet)));
    assert!(batch.events.iter().any(|e| matches!(e, LeaseEvent::Added(l) if l.subnet == joined.subnet)));
    // And it keeps watching from the new revision.
    s.create(&mk(5), Duration::from_secs(600)).await.unwrap().unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(2), watch.next()).await.unwrap().unwrap().unwrap();
    assert!(!batch.resync);
    assert!(matches!(&batch.events[..], [LeaseEvent::Added(l)] if l.subnet == mk(5).subnet));
}

/// flannel#1289 against real etcd: our lease expires while we are away, another node creates
/// the subnet; renewing reports who holds it and re-creating fails cleanly. Nothing is
/// overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_retaken_subnet_is_never_overwritten() {
    let Some(etcd) = Etcd::start() else { return };
    let s = ready_store(&etcd).await;
    let snap = s.list().await.unwrap();
    let mut watch = Box::pin(s.watch(&snap));
    let subnet: Ipv4Net = "10.244.9.0/24".parse().unwrap();
    let a = SubnetLease {
        subnet,
        attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, 1), "udp"),
        expiration: None,
        created: Revision(0),
    };
    let b = SubnetLease { attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, 2), "udp"), ..a.clone() };
    s.create(&a, Duration::from_secs(3)).await.unwrap().unwrap();
    assert!(matches!(&watch.next().await.unwrap().unwrap().events[..], [LeaseEvent::Added(_)]));
    // The etcd lease runs out; etcd deletes the key and the watch says so.
    let gone = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(gone.events, vec![LeaseEvent::Removed(subnet)]);
    assert!(matches!(s.renew(&a, Duration::from_secs(60)).await, Err(StoreError::LeaseGone { .. })));
    // B takes it; A's renewal and re-creation must leave B's record alone.
    s.create(&b, Duration::from_secs(60)).await.unwrap().unwrap();
    assert!(matches!(
        s.renew(&a, Duration::from_secs(60)).await,
        Err(StoreError::LeaseTaken { holder, .. }) if holder == Ipv4Addr::new(198, 18, 0, 2)
    ));
    assert_eq!(s.create(&a, Duration::from_secs(60)).await.unwrap(), None);
    assert!(!s.release(&a).await.unwrap());
    let holder = s.list().await.unwrap().leases.into_iter().find(|l| l.subnet == subnet).unwrap();
    assert_eq!(holder.attrs, b.attrs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_revision_is_etcds_and_survives_renewal() {
    let Some(etcd) = Etcd::start() else { return };
    let s = ready_store(&etcd).await;
    let mk = |third: u8| SubnetLease {
        subnet: Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), 24).unwrap(),
        attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, third), "udp"),
        expiration: None,
        created: Revision(0),
    };
    let a = s.create(&mk(1), Duration::from_secs(60)).await.unwrap().unwrap();
    let b = s.create(&mk(2), Duration::from_secs(60)).await.unwrap().unwrap();
    assert!(a.created > Revision(0) && b.created > a.created, "{:?} {:?}", a.created, b.created);
    let renewed = s.renew(&a, Duration::from_secs(60)).await.unwrap();
    assert_eq!(renewed.created, a.created, "a renewal is not a new record");
    let listed = s.list().await.unwrap().leases;
    assert_eq!(listed.iter().map(|l| l.created).collect::<Vec<_>>(), [a.created, b.created]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_missing_invalid_and_written() {
    let Some(etcd) = Etcd::start() else { return };
    let s = store(&etcd).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let missing = loop {
        match s.get_config().await {
            Err(StoreError::Unavailable { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    assert!(
        matches!(missing, Err(StoreError::ConfigMissing { ref key }) if key == "/coreos.com/network/config"),
        "{missing:?}"
    );
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    raw.put("/coreos.com/network/config", r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#, None).await.unwrap();
    let err = s.get_config().await.unwrap_err().to_string();
    assert_eq!(err, "/coreos.com/network/config: SubnetLen: 31 must be between 18 and 30 for Network 10.244.0.0/16");
    // A flannel-written config is read as is.
    raw.put("/coreos.com/network/config", r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#, None)
        .await
        .unwrap();
    assert_eq!(s.get_config().await.unwrap().backend.vni(), 1);
}

/// etcd killed for a few seconds: calls fail as "unavailable" (quickly, not hanging), the
/// watch reports errors and no spurious deletes, and everything recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_then_back_recovers_by_itself() {
    let Some(mut etcd) = Etcd::start() else { return };
    let s = ready_store(&etcd).await;
    let range = s.get_config().await.unwrap().subnet_range();
    let mut k = keeper(range, 1, Duration::from_secs(30));
    let lease = acquire(&mut k, &s).await;
    let snap = s.list().await.unwrap();
    let mut watch = Box::pin(s.watch(&snap));

    etcd.kill();
    let t = Instant::now();
    let err = s.list().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "failing took {:?}", t.elapsed());
    let item = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap();
    assert!(matches!(item, Err(StoreError::Unavailable { .. })), "{item:?}");
    // The keeper's renewal fails and it backs off; it stays ready on its own lease meanwhile.
    k.set_attrs(k.attrs().clone()); // force a renewal now
    run_until(&mut k, &s, Duration::from_secs(10), |k| k.status(SystemTime::now()).failures >= 2).await;
    assert!(k.is_ready(SystemTime::now()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    etcd.restart();
    // The keeper renews by itself, keeping its subnet.
    run_until(&mut k, &s, Duration::from_secs(30), |k| k.status(SystemTime::now()).failures == 0).await;
    assert_eq!(k.lease().unwrap().subnet, lease.subnet);
    assert!(k.is_ready(SystemTime::now()));
    // The watch resumes: a node that joins now is seen, and nothing was removed meanwhile.
    let mut other = keeper(range, 2, Duration::from_secs(30));
    let joined = acquire(&mut other, &s).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "the watch did not resume");
        match tokio::time::timeout(Duration::from_secs(20), watch.next()).await.unwrap().unwrap() {
            Err(_) => continue,
            Ok(batch) => {
                assert!(
                    !batch.events.iter().any(|e| matches!(e, LeaseEvent::Removed(_))),
                    "spurious delete: {:?}",
                    batch.events
                );
                if batch.events.iter().any(|e| matches!(e, LeaseEvent::Added(l) if l.subnet == joined.subnet)) {
                    break;
                }
            }
        }
    }
}

/// Options for the TLS etcd: trust `ca`, present `client` (if any).
fn tls_options(etcd: &Etcd, ca: &std::path::Path, client: Option<&Pair>) -> EtcdOptions {
    EtcdOptions {
        request_timeout: Duration::from_secs(2),
        tls: EtcdTls {
            ca_file: Some(ca.to_path_buf()),
            cert_file: client.map(|p| p.cert.clone()),
            key_file: client.map(|p| p.key.clone()),
        },
        ..EtcdOptions::new([etcd.endpoint()])
    }
}

/// etcd with `--client-cert-auth`: our CA's client certificate gets in, and the store works
/// over TLS end to end (create, list, watch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_lists_creates_and_watches() {
    let pki = Pki::generate();
    let Some(etcd) = Etcd::start_with("https", pki.etcd_args()) else { return };
    let s = ready(EtcdStore::connect(tls_options(&etcd, &pki.ca, Some(&pki.client))).await.unwrap()).await;
    let snap = s.list().await.unwrap();
    let mut watch = Box::pin(s.watch(&snap));
    let lease = SubnetLease {
        subnet: "10.244.3.0/24".parse().unwrap(),
        attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, 3), "udp"),
        expiration: None,
        created: Revision(0),
    };
    s.create(&lease, Duration::from_secs(60)).await.unwrap().unwrap();
    let listed = s.list().await.unwrap().leases;
    assert_eq!(listed.iter().map(|l| l.subnet).collect::<Vec<_>>(), [lease.subnet]);
    let batch = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap().unwrap();
    assert!(matches!(&batch.events[..], [LeaseEvent::Added(l)] if l.subnet == lease.subnet));
}

/// Without a client certificate, with one from another CA, or trusting the wrong CA for the
/// server: every call fails fast as unavailable, and the message says it is about a
/// certificate (etcd's TLS 1.3 alert often arrives after the connection is gone, hence the
/// store's hint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_the_right_certificates_fails_fast_saying_so() {
    let pki = Pki::generate();
    let Some(etcd) = Etcd::start_with("https", pki.etcd_args()) else { return };
    ready(EtcdStore::connect(tls_options(&etcd, &pki.ca, Some(&pki.client))).await.unwrap()).await;
    let cases = [
        ("no client certificate", tls_options(&etcd, &pki.ca, None), "--etcd-certfile"),
        ("client certificate from another CA", tls_options(&etcd, &pki.ca, Some(&pki.other_client)), "intruder.crt"),
        (
            "server certificate from an untrusted CA",
            tls_options(&etcd, &pki.other_ca, Some(&pki.client)),
            "other-ca.crt",
        ),
    ];
    for (case, options, names) in cases {
        let s = EtcdStore::connect(options).await.unwrap();
        for _ in 0..5 {
            let t = Instant::now();
            let err = s.list().await.unwrap_err();
            assert!(t.elapsed() < Duration::from_secs(3), "{case}: failing took {:?}", t.elapsed());
            let StoreError::Unavailable { reason } = &err else { panic!("{case}: {err:?}") };
            assert!(reason.to_lowercase().contains("certificate"), "{case}: {reason}");
            assert!(reason.contains(names), "{case}: {reason} should name {names}");
            eprintln!("{case}: {err}");
        }
        assert!(matches!(s.get_config().await, Err(StoreError::Unavailable { .. })), "{case}");
    }
}

/// etcd with auth enabled (set up through the API, no etcdctl): the right password works, a
/// wrong one or none is refused as `Denied` (not retried as if etcd were down), naming the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_auth_right_password_works_wrong_one_is_denied() {
    let Some(etcd) = Etcd::start() else { return };
    ready_store(&etcd).await;
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    raw.user_add("root", "root-secret", None).await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    raw.user_add("weft", "right-secret", None).await.unwrap();
    raw.user_grant_role("weft", "root").await.unwrap();
    raw.auth_enable().await.unwrap();
    let as_user = |password: Option<&str>| EtcdOptions {
        credentials: password.map(|p| EtcdCredentials { username: "weft".into(), password: Password::new(p) }),
        ..options(&etcd)
    };

    let s = EtcdStore::connect(as_user(Some("right-secret"))).await.unwrap();
    assert_eq!(s.get_config().await.unwrap().network.to_string(), "10.244.0.0/16");
    let snap = s.list().await.unwrap();
    let mut watch = Box::pin(s.watch(&snap));
    let lease = SubnetLease {
        subnet: "10.244.4.0/24".parse().unwrap(),
        attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, 4), "udp"),
        expiration: None,
        created: Revision(0),
    };
    s.create(&lease, Duration::from_secs(60)).await.unwrap().unwrap();
    assert_eq!(s.list().await.unwrap().leases.len(), 1);
    s.renew(&lease, Duration::from_secs(60)).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap().unwrap();
    assert!(matches!(&batch.events[..], [LeaseEvent::Added(l)] if l.subnet == lease.subnet));

    let wrong = EtcdStore::connect(as_user(Some("wrong-secret"))).await.unwrap();
    let err = wrong.list().await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("authentication failed") && msg.contains("\"weft\""), "{msg}");
    assert!(!msg.contains("wrong-secret"), "the password is never shown: {msg}");
    assert!(matches!(wrong.get_config().await, Err(StoreError::Denied { .. })));

    let anonymous = EtcdStore::connect(options(&etcd)).await.unwrap();
    let err = anonymous.get_config().await.unwrap_err();
    assert!(matches!(err, StoreError::Denied { .. }) && err.to_string().contains("--etcd-username"), "{err}");
}

/// 20 000 leases (each on its own etcd lease, as 20 000 nodes would be) plus three records of
/// about 1 MiB: far more than one 4 MiB gRPC message, which is what a single Range returned
/// (and still returns, shown first). The paged list returns every lease, and the huge records
/// as unreadable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_twenty_thousand_leases_and_huge_records() {
    const N: u32 = 20_000;
    let Some(etcd) = Etcd::start() else { return };
    let s = ready_store(&etcd).await;
    let raw = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
    let subnet = |i: u32| Ipv4Net::new(Ipv4Addr::new(10, (i / 256) as u8, (i % 256) as u8, 0), 24).unwrap();
    let key = |net: Ipv4Net| format!("/coreos.com/network/subnets/{}-{}", net.addr(), net.prefix_len());
    let attrs = |i: u32| LeaseAttrs::new(Ipv4Addr::from(0xc612_0000 + i), "udp");

    let t = Instant::now();
    let grants: Vec<i64> = futures::stream::iter(0..N)
        .map(|_| {
            let mut c = raw.clone();
            async move { c.lease_grant(600, None).await.unwrap().id() }
        })
        .buffered(64)
        .collect()
        .await;
    let ids: Vec<u32> = (0..N).collect();
    futures::stream::iter(ids.chunks(128)) // etcd's --max-txn-ops default
        .map(|chunk| {
            let mut c = raw.clone();
            let ops: Vec<etcd_client::TxnOp> = chunk
                .iter()
                .map(|&i| {
                    let opts = etcd_client::PutOptions::new().with_lease(grants[i as usize]);
                    etcd_client::TxnOp::put(key(subnet(i)), attrs(i).to_json(), Some(opts))
                })
                .collect();
            async move { c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap() }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    let huge: Vec<Ipv4Net> = (0..3).map(|i| Ipv4Net::new(Ipv4Addr::new(10, 250, i, 0), 24).unwrap()).collect();
    let mut c = raw.clone();
    let big_backend =
        LeaseAttrs { backend_data: serde_json::json!({ "Padding": "x".repeat(1_000_000) }), ..attrs(N + 1) };
    c.put(key(huge[0]), big_backend.to_json(), None).await.unwrap();
    c.put(key(huge[1]), vec![b'{'; 1_000_000], None).await.unwrap();
    c.put(key(huge[2]), vec![0xff; 1_000_000], None).await.unwrap();
    eprintln!("wrote {N} leases and 3 x 1 MB records in {:?}", t.elapsed());

    // What list did before: one Range, over the client's 4 MiB default.
    let err = c.get("/coreos.com/network/subnets/", Some(etcd_client::GetOptions::new().with_prefix())).await;
    let err = err.map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("decoded message length too large"), "{err}");

    let t = Instant::now();
    let snap = s.list().await.unwrap();
    eprintln!("listed {} leases ({} unreadable) in {:?}", snap.leases.len(), snap.unreadable.len(), t.elapsed());
    assert_eq!(snap.leases.len(), N as usize);
    assert!(snap.leases.iter().all(|l| l.expiration.is_some() && l.created > Revision(0)));
    assert_eq!(snap.leases.iter().map(|l| l.subnet).collect::<Vec<_>>(), (0..N).map(subnet).collect::<Vec<_>>());
    let mut unreadable: Vec<Option<Ipv4Net>> = snap.unreadable.iter().map(|u| u.subnet).collect();
    unreadable.sort_unstable();
    assert_eq!(unreadable, huge.iter().copied().map(Some).collect::<Vec<_>>());
    assert!(snap.unreadable.iter().all(|u| u.reason.contains("bytes, more than")), "{:?}", snap.unreadable[0].reason);

    // The snapshot's revision is the one the pages were read at: a watch from it sees only what
    // comes after.
    let mut watch = Box::pin(s.watch(&snap));
    c.delete(key(subnet(7)), None).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(batch.events, vec![LeaseEvent::Removed(subnet(7))]);
}
