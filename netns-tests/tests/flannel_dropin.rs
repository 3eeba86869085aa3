//! weft as a drop-in flannel node: a cluster whose etcd holds flannel's own network config
//! and a node programmed as flanneld's vxlan backend programs it, with the kernel's
//! **default** offloads; weft joins on the other node with nothing changed elsewhere.
//!
//! ```text
//! ┌─ n1: weft ─────────────────────────┐   ┌─ n2: Linux, as flanneld leaves it ──────────────┐
//! │ weft run, store etcd (lease mode)  │   │ flannel.1 vxlan id 1 dstport 8472 nolearning    │
//! │ weft0 <leased subnet>.1            │   │   10.244.2.0/32, MAC 02:77:00:00:00:02,         │
//! │ its lease: VtepMAC, PublicIP ──────┼─┐ │   checksum offload ON (kernel default)          │
//! │ eth0 198.18.0.1/24 udp 8472        │ │ │ route/neigh/fdb for n1, from n1's lease         │
//! └────────────────────────────────────┘ │ │ eth0 198.18.0.2/24                              │
//!                                        │ └─────────────────────────────────────────────────┘
//!   etcd 198.18.0.100: /coreos.com/network/config   (put by the test, as flannel's docs say)
//!                      /coreos.com/network/subnets/10.244.2.0-24  (n2's lease, flanneld's JSON,
//!                      on an 86400 s etcd lease) and n1's, written by weft
//! ```
//!
//! The test plays flanneld on n2: it writes n2's lease as flanneld writes it and programs
//! n2's kernel from n1's lease as flanneld would on the watch event, no more. TCP must connect
//! both ways (flannel#1279: with the kernel's default offloads it never did), UDP too.
//!
//! Needs root, iperf3, ethtool, nstat and Debian's etcd-server and etcd-client.

// Setup helpers outside #[test] fns: a failing step must fail the test loudly.
#![allow(clippy::expect_used, clippy::panic)]

use std::time::Duration;

use weft_netns_tests::flannel::{self, KernelCsum};
use weft_netns_tests::{Etcd, StoreConfig, Topology, json_path, peer_by_subnet, ping_all, report, vtep_mac};

/// flannel's network config as its documentation writes it: vxlan with every default
/// (VNI 1, port 8472, SubnetLen 24).
const NET_CONF: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#;

/// Host `i`'s lease, byte for byte as flanneld writes it, with VTEP MAC `mac`.
fn flanneld_lease(i: u8, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"198.18.0.{i}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

/// `etcdctl put key value` on an etcd lease of `ttl` seconds, as flanneld attaches its own.
fn put_with_ttl(etcd: &Etcd<'_>, key: &str, value: &str, ttl: u32) {
    let grant = etcd.etcdctl(&["lease", "grant", &ttl.to_string()]).expect("etcdctl lease grant");
    // "lease 694d7c1e0b9a1c0a granted with TTL(86400s)"
    let id = grant.stdout.split_whitespace().nth(1).unwrap_or_else(|| panic!("lease grant printed {grant}"));
    let put = etcd.etcdctl(&["put", &format!("--lease={id}"), key, value]).expect("etcdctl put");
    assert!(put.status.success(), "etcdctl put {key}: {put}");
}

#[test]
fn flannel_node_with_default_offloads_and_weft_node() {
    let Some(topo) =
        Topology::for_test_with_etcd("flannel_node_with_default_offloads_and_weft_node", "fdi", 2).expect("topology")
    else {
        return;
    };
    let etcd = topo.start_etcd().expect("etcd");
    let put = etcd.etcdctl(&["put", "/coreos.com/network/config", NET_CONF]).expect("etcdctl put config");
    assert!(put.status.success(), "{put}");

    // n2: flanneld's half. Its lease, then its VTEP, checksum offload left on.
    put_with_ttl(&etcd, "/coreos.com/network/subnets/10.244.2.0-24", &flanneld_lease(2, &vtep_mac(2)), 86_400);
    let k = topo.n(2).ns();
    flannel::create_vtep(k, &vtep_mac(2), "10.244.2.0", "198.18.0.2", KernelCsum::Default).expect("n2's VTEP");

    // n1: weft, pointed at the same etcd and nothing else.
    let store = StoreConfig::etcd(etcd.endpoints());
    let n1 = topo.start_weft(topo.lease_config(1, &store)).expect("starting weft on n1");
    let subnet = n1.leased_subnet().expect("n1's lease");
    let gw = n1.gateway().expect("n1's gateway").to_string();
    let status = n1.status_json().expect("status");
    assert_eq!(json_path(&status, "backend").and_then(|v| v.as_str()), Some("vxlan"), "{status}");
    let peer = n1.wait_peer_subnet("10.244.2.0/24", true, Duration::from_secs(5), Duration::from_millis(50));
    assert!(peer.expect("status").is_some(), "weft never took flanneld's lease: {status}");
    let status = n1.status_json().expect("status");
    let p = peer_by_subnet(&status, "10.244.2.0/24").expect("n2 listed");
    assert_eq!(p.get("endpoint").and_then(|v| v.as_str()), Some("198.18.0.2:8472"), "{p}");
    assert_eq!(p.get("mac").and_then(|v| v.as_str()).map(str::to_ascii_lowercase), Some(vtep_mac(2)), "{p}");

    // flanneld on n2 sees n1's lease appear and programs it: route, neighbour, FDB.
    let leases = topo.leases(&store).expect("weft leases");
    let ours = leases.iter().find(|l| l.subnet == subnet).unwrap_or_else(|| panic!("n1's lease in {leases:?}"));
    assert_eq!((ours.public_ip.as_str(), ours.backend_type.as_str()), ("198.18.0.1", "vxlan"), "{ours:?}");
    assert_eq!(ours.backend_data.get("VNI").and_then(|v| v.as_u64()), Some(1), "{ours:?}");
    let mac = ours.vtep_mac().expect("n1's lease carries its VtepMAC").to_owned();
    let n1_peer = flannel::Peer { subnet: &subnet, mac: &mac, public_ip: &ours.public_ip };
    flannel::add_peer(k, n1_peer, false).expect("programming n1 on n2");

    ping_all(topo.n(2).ns(), &gw, 3).expect("flannel node -> weft node");
    ping_all(topo.n(1).ns(), "10.244.2.0", 3).expect("weft node -> flannel node");
    let (k2w, w2k) = flannel::tcp_and_udp_both_ways((topo.n(1).ns(), &gw), (k, "10.244.2.0"), 3, topo.dir())
        .expect("TCP and UDP both ways");
    report(&format!(
        "drop-in, kernel default offloads: TCP flannel -> weft {:.2} Gbit/s, weft -> flannel {:.2} Gbit/s",
        k2w / 1e9,
        w2k / 1e9
    ));
    let status = n1.status_json().expect("status");
    let completed = json_path(&status, "offload_counters.csum_completed").and_then(|v| v.as_u64());
    assert!(completed.is_some_and(|c| c > 0), "no partial checksum from the flannel node: {status}");
    assert_eq!(flannel::csum_errors(topo.n(1).ns()).expect("nstat"), 0, "n1's kernel dropped bad checksums");
    let refused = json_path(&status, "lease.refused_leases").and_then(|v| v.as_array()).map(Vec::len);
    assert_eq!(refused, Some(0), "weft refused a lease flanneld wrote: {status}");
}

/// The migration: n1 ran flanneld, which left its VTEP (address, routes, neighbour and FDB
/// entries for n2) and its lease in etcd. weft starts on n1 with nothing cleaned up by hand:
/// it removes flanneld's VTEP (which held port 8472 and the route to n2), keeps the node's
/// subnet (its lease by PublicIP, as flannel's algorithm says) and publishes its own VTEP MAC;
/// flanneld on n2 reprograms n1 from the changed lease, as it does for any lease change.
#[test]
fn weft_replaces_flanneld_on_a_node() {
    let Some(topo) = Topology::for_test_with_etcd("weft_replaces_flanneld_on_a_node", "frp", 2).expect("topology")
    else {
        return;
    };
    let etcd = topo.start_etcd().expect("etcd");
    let put = etcd.etcdctl(&["put", "/coreos.com/network/config", NET_CONF]).expect("etcdctl put config");
    assert!(put.status.success(), "{put}");
    // Both nodes as flanneld set them up: leases, VTEPs, each other's entries.
    let old_mac = "02:66:00:00:00:01";
    put_with_ttl(&etcd, "/coreos.com/network/subnets/10.244.1.0-24", &flanneld_lease(1, old_mac), 86_400);
    put_with_ttl(&etcd, "/coreos.com/network/subnets/10.244.2.0-24", &flanneld_lease(2, &vtep_mac(2)), 86_400);
    let (w, k) = (topo.n(1).ns(), topo.n(2).ns());
    flannel::create_vtep(w, old_mac, "10.244.1.0", "198.18.0.1", KernelCsum::Default).expect("n1's old VTEP");
    flannel::create_vtep(k, &vtep_mac(2), "10.244.2.0", "198.18.0.2", KernelCsum::Default).expect("n2's VTEP");
    let n1_old = flannel::Peer { subnet: "10.244.1.0/24", mac: old_mac, public_ip: "198.18.0.1" };
    let n2 = flannel::Peer { subnet: "10.244.2.0/24", mac: &vtep_mac(2), public_ip: "198.18.0.2" };
    flannel::add_peer(w, n2, false).expect("n2 on n1");
    flannel::add_peer(k, n1_old, false).expect("n1 on n2");
    ping_all(w, "10.244.2.0", 2).expect("kernel flannel n1 -> n2, before");

    // flanneld stops on n1 (its device stays, as flanneld leaves it); weft starts.
    let store = StoreConfig::etcd(etcd.endpoints());
    let n1 = topo.start_weft(topo.lease_config(1, &store)).expect("starting weft on n1 over flanneld's leftovers");
    assert_eq!(n1.leased_subnet().expect("lease"), "10.244.1.0/24", "weft did not keep the node's subnet");
    let links = w.exec_ok("ip", &["-o", "link", "show"]).expect("ip link").stdout;
    assert!(!links.contains("flannel.1"), "flanneld's VTEP is still there:\n{links}");
    let routes = w.exec_ok("ip", &["route", "show", "10.244.2.0/24"]).expect("ip route").stdout;
    assert!(!routes.contains("flannel.1"), "a route still bypasses weft: {routes}");

    // flanneld on n2 sees n1's lease change (a new VtepMAC) and reprograms it.
    let leases = topo.leases(&store).expect("weft leases");
    let ours = leases.iter().find(|l| l.subnet == "10.244.1.0/24").expect("n1's lease");
    let mac = ours.vtep_mac().expect("VtepMAC").to_owned();
    assert_ne!(mac, old_mac, "weft publishes its own VTEP MAC");
    flannel::add_peer(k, flannel::Peer { mac: &mac, ..n1_old }, false).expect("n1 reprogrammed on n2");

    let gw = n1.gateway().expect("gateway").to_string();
    ping_all(k, &gw, 3).expect("flannel n2 -> weft n1");
    let (k2w, w2k) = flannel::tcp_and_udp_both_ways((w, &gw), (k, "10.244.2.0"), 2, topo.dir()).expect("traffic");
    report(&format!(
        "after the migration: TCP flannel -> weft {:.2} Gbit/s, weft -> flannel {:.2} Gbit/s",
        k2w / 1e9,
        w2k / 1e9
    ));
}
