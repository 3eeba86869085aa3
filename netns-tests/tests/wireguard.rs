//! `backend = "wireguard"`: an authenticated, encrypted mesh, and what it refuses.
//!
//! ```text
//!  n1 198.18.0.1 ─┐                       ┌─ atk 198.18.0.9 (spoofs 198.18.0.2:51820: the
//!  n2 198.18.0.2 ─┼── br0, 198.18.0.0/24 ─┤   address on its lo, weft-craft --bind)
//!  n3 198.18.0.3 ─┘                       └
//!  weft0 10.244.<i>.1/24 on each node, backend wireguard, port 51820, one worker
//! ```
//!
//! The last test puts Debian's wireguard-go (configured with `wg`) on the other side.
//!
//! Needs root, iperf3, tcpdump, wireguard-go and wg; namespaces and daemons are removed on
//! drop.

#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use weft_netns_tests::weft::{WIREGUARD_PORT, WgKey, json_u64, peer_status, wireguard_keys};
use weft_netns_tests::{Capture, IperfServer, NodeConfig, Topology, iperf3_tcp, json_path, ping_all};

const CRAFT: &str = env!("CARGO_BIN_EXE_weft-craft");

/// Waits until every node lists a session with each of its peers.
fn wait_for_sessions(nodes: &[weft_netns_tests::WeftNode<'_>]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = nodes.iter().all(|n| {
            let s = n.status_json().expect("status");
            s["peers"].as_array().is_some_and(|ps| {
                ps.iter().all(|p| json_path(p, "wireguard.handshake_age_secs").is_some_and(|v| v.is_u64()))
            })
        });
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "no sessions after 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `node` lists a session with `peer`.
fn wait_for_session(node: &weft_netns_tests::WeftNode<'_>, peer: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = node.status_json().expect("status");
        if peer_status(&s, peer).and_then(|p| json_path(p, "wireguard.handshake_age_secs")).is_some_and(|v| v.is_u64())
        {
            return;
        }
        assert!(Instant::now() < deadline, "no session with {peer} after 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The UDP payloads of the IPv4 frames in a capture.
fn udp_payloads(pcap: &weft_netns_tests::capture::Pcap) -> Vec<Vec<u8>> {
    pcap.ip_packets()
        .expect("ip packets")
        .into_iter()
        .filter_map(|ip| etherparse::SlicedPacket::from_ip(ip).ok())
        .filter_map(|p| match p.transport {
            Some(etherparse::TransportSlice::Udp(u)) => Some(u.payload().to_vec()),
            _ => None,
        })
        .collect()
}

fn mesh(topo: &Topology, hosts: u8) -> (Vec<WgKey>, Vec<weft_netns_tests::WeftNode<'_>>) {
    let keys = wireguard_keys(topo.dir(), hosts).expect("keys");
    let nodes = (1..=hosts)
        .map(|i| topo.start_weft(NodeConfig::wireguard_mesh(i, hosts, &keys)).expect("starting weft"))
        .collect();
    (keys, nodes)
}

/// Three encrypted nodes: every pair pings, TCP runs both ways with iperf3, nothing on the
/// underlay is anything but WireGuard messages, and status shows each session.
#[test]
fn three_encrypted_nodes_carry_ping_and_tcp() {
    let Some(topo) = Topology::for_test("three_encrypted_nodes_carry_ping_and_tcp", "wg3", 3).expect("topology") else {
        return;
    };
    let (_keys, nodes) = mesh(&topo, 3);
    wait_for_sessions(&nodes);
    let s = nodes[0].status_json().expect("status");
    assert_eq!(json_path(&s, "mtu").and_then(|v| v.as_u64()), Some(1440), "1500 - 60");
    assert_eq!(json_path(&s, "backend").and_then(|v| v.as_str()), Some("wireguard"));

    let cap = Capture::start(topo.n(2).ns(), "eth0", "udp", topo.dir(), "n2-underlay").expect("tcpdump");
    for (from, to) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)] {
        ping_all(topo.n(from).ns(), &format!("10.244.{to}.1"), 3).expect("ping across the encrypted mesh");
    }
    let server = IperfServer::start(topo.n(2).ns(), "10.244.2.1", &topo.dir().join("iperf-n2.log")).expect("iperf3 -s");
    let one_two = iperf3_tcp(topo.n(1).ns(), "10.244.2.1", 3).expect("iperf3 n1 -> n2");
    drop(server);
    let server = IperfServer::start(topo.n(1).ns(), "10.244.1.1", &topo.dir().join("iperf-n1.log")).expect("iperf3 -s");
    let three_one = iperf3_tcp(topo.n(3).ns(), "10.244.1.1", 3).expect("iperf3 n3 -> n1");
    drop(server);
    assert!(one_two > 0.0 && three_one > 0.0);

    // Everything n2 saw on the underlay is a WireGuard message (type 1, 2 or 4 with three
    // zero bytes); no inner IPv4 header travels in the clear.
    let pcap = cap.stop().expect("stop capture");
    let payloads = udp_payloads(&pcap);
    assert!(payloads.len() > 100, "captured {} datagrams", payloads.len());
    for p in &payloads {
        assert!(
            matches!(p.get(..4), Some([1 | 2 | 4, 0, 0, 0])),
            "not a WireGuard message: {:02x?}",
            &p[..p.len().min(8)]
        );
        // An inner IPv4 header in the clear would hold a pair of gateway addresses side by
        // side (source, destination); 8 bytes, so ciphertext matches by chance with odds of
        // about 2^-64 per position (4 bytes alone would match in a few GB of it).
        let pairs = [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)].map(|(a, b)| [10, 244, a, 1, 10, 244, b, 1]);
        assert!(!p.windows(8).any(|w| pairs.iter().any(|pair| w == pair)), "an inner IPv4 header in the clear");
    }
    for n in &nodes {
        let s = n.status_json().expect("status");
        for peer in s["peers"].as_array().expect("peers") {
            assert!(json_u64(peer, "wireguard.authenticated").expect("authenticated") > 0, "{peer}");
            assert_eq!(json_u64(peer, "wireguard.failed").expect("failed"), 0, "{peer}");
        }
        assert_eq!(json_u64(&s, "drops.auth_failed").expect("auth_failed"), 0);
        assert!(json_u64(&s, "wireguard.handshakes").expect("handshakes") >= 2);
    }
}

/// An attacker on the underlay sends datagrams from n2's exact address and port: a forged
/// data message, and a real one of n2's captured and sent again. Both are dropped and counted
/// (`auth_failed`, `replayed`); neither reaches n1's TUN, and n1 answers neither.
#[test]
fn spoofed_and_replayed_datagrams_are_dropped_and_counted() {
    let Some(mut topo) =
        Topology::for_test("spoofed_and_replayed_datagrams_are_dropped_and_counted", "wgs", 2).expect("topology")
    else {
        return;
    };
    topo.add_host("atk", 9).expect("attacker host");
    let (_keys, nodes) = mesh(&topo, 2);
    wait_for_sessions(&nodes);

    // A real data message from n2, captured on n1's side.
    let cap =
        Capture::start(topo.n(1).ns(), "eth0", "udp and src host 198.18.0.2", topo.dir(), "n1-in").expect("tcpdump");
    ping_all(topo.n(2).ns(), "10.244.1.1", 3).expect("ping n2 -> n1");
    let pcap = cap.stop().expect("stop capture");
    let data = udp_payloads(&pcap).into_iter().find(|p| p.first() == Some(&4) && p.len() > 32).expect("a data message");

    let atk = topo.host("atk").expect("atk");
    // n2's address on the attacker's loopback, so it can bind 198.18.0.2:51820; it never
    // answers ARP for it (arp_ignore) nor uses it in its own requests (arp_announce), so n1
    // keeps reaching the real n2.
    for (k, v) in [("net.ipv4.conf.all.arp_ignore", "1"), ("net.ipv4.conf.all.arp_announce", "2")] {
        atk.ns().exec_ok("sysctl", &["-qw", &format!("{k}={v}")]).expect("sysctl");
    }
    atk.ns().exec_ok("ip", &["addr", "add", "198.18.0.2/32", "dev", "lo"]).expect("n2's address on atk's lo");
    let spoof = |payload: &[u8]| {
        let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
        let to = format!("198.18.0.1:{WIREGUARD_PORT}");
        let from = format!("198.18.0.2:{WIREGUARD_PORT}");
        atk.ns().exec_ok(CRAFT, &["--bind", &from, "--to", &to, "--raw-hex", &hex]).expect("weft-craft");
    };
    let before = nodes[0].status_json().expect("status");
    let peer_before = peer_status(&before, "n2").expect("n2 in status").clone();
    let out = topo.n(1).ns().exec_ok("ip", &["-s", "-j", "link", "show", "weft0"]).expect("ip -s link");
    let tun_tx_before = tun_tx_packets(&out.stdout);

    let capn1 =
        Capture::start(topo.n(1).ns(), "eth0", "udp and src host 198.18.0.1", topo.dir(), "n1-out").expect("tcpdump");
    // Forged: the real header (receiver index, a fresh counter), garbage after it.
    let mut forged = data.clone();
    forged[8..16].copy_from_slice(&u64::MAX.wrapping_sub(5).to_le_bytes());
    for b in &mut forged[16..] {
        *b ^= 0x5a;
    }
    spoof(&forged);
    // Replayed: the captured message, byte for byte.
    spoof(&data);
    std::thread::sleep(Duration::from_millis(300));

    let after = nodes[0].status_json().expect("status");
    let peer_after = peer_status(&after, "n2").expect("n2 in status");
    let delta = |path: &str, a: &serde_json::Value, b: &serde_json::Value| {
        json_u64(b, path).expect("counter") - json_u64(a, path).expect("counter")
    };
    assert_eq!(delta("drops.auth_failed", &before, &after), 1, "the forgery");
    assert_eq!(delta("drops.replayed", &before, &after), 1, "the replay");
    assert_eq!(delta("wireguard.failed", &peer_before, peer_after), 2);
    assert_eq!(delta("wireguard.authenticated", &peer_before, peer_after), 0, "nothing authentic came in");
    assert_eq!(delta("rx_packets", &peer_before, peer_after), 0, "nothing was delivered");
    let out = topo.n(1).ns().exec_ok("ip", &["-s", "-j", "link", "show", "weft0"]).expect("ip -s link");
    assert_eq!(tun_tx_packets(&out.stdout), tun_tx_before, "nothing reached n1's TUN");
    let answered = capn1.stop().expect("stop capture").frames.len();
    assert_eq!(answered, 0, "n1 answered a spoofed datagram ({answered} sent)");
}

/// Packets the kernel sent out of (received by the host from) weft0: what weft wrote to it.
fn tun_tx_packets(ip_json: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(ip_json).expect("ip -j");
    json_path(&v, "0.stats64.tx.packets").and_then(serde_json::Value::as_u64).expect("tx packets")
}

/// n3 runs with another key than the one n1 and n2 know it by: its handshakes are refused,
/// n1's to it cannot be answered, and no packet gets through in either direction, while
/// n1 and n2 are unaffected.
#[test]
fn a_node_with_a_wrong_key_never_gets_through() {
    let Some(topo) = Topology::for_test("a_node_with_a_wrong_key_never_gets_through", "wgk", 3).expect("topology")
    else {
        return;
    };
    let keys = wireguard_keys(topo.dir(), 3).expect("keys");
    let imposter_dir = topo.dir().join("imposter");
    std::fs::create_dir_all(&imposter_dir).expect("mkdir");
    let imposter = wireguard_keys(&imposter_dir, 3).expect("keys");
    let n1 = topo.start_weft(NodeConfig::wireguard_mesh(1, 3, &keys)).expect("n1");
    let _n2 = topo.start_weft(NodeConfig::wireguard_mesh(2, 3, &keys)).expect("n2");
    // n3 knows n1 and n2 by their real keys but holds a key nobody knows it by.
    let mut c3 = NodeConfig::wireguard_mesh(3, 3, &keys);
    c3.wireguard_key_file = Some(imposter[2].file.clone());
    let n3 = topo.start_weft(c3).expect("n3");
    wait_for_session(&n1, "n2");
    // Long enough for several rounds of refused handshakes (retries every 5 s).
    std::thread::sleep(Duration::from_secs(2));
    ping_all(topo.n(1).ns(), "10.244.2.1", 2).expect("n1 and n2 are unaffected");
    assert!(ping_all(topo.n(3).ns(), "10.244.1.1", 2).is_err(), "the imposter got through to n1");
    assert!(ping_all(topo.n(1).ns(), "10.244.3.1", 2).is_err(), "n1 reached the imposter");
    let s1 = n1.status_json().expect("status");
    assert!(json_u64(&s1, "wireguard.handshakes_refused").expect("refused") > 0, "n3's initiations are refused");
    let p3 = peer_status(&s1, "n3").expect("n3 in status");
    assert!(json_path(p3, "wireguard.handshake_age_secs").is_some_and(serde_json::Value::is_null), "{p3}");
    assert_eq!(json_u64(p3, "rx_packets").expect("rx"), 0);
    assert!(
        json_u64(&s1, "drops.no_session").expect("no_session") > 0,
        "n1's pings to n3 were dropped, not sent in the clear"
    );
    let s3 = n3.status_json().expect("status");
    assert!(json_u64(&s3, "wireguard.handshakes_refused").expect("refused") > 0, "n1's initiations fail n3's mac1");
}

/// weft and WireGuard itself on the wire: n1 runs weft (`backend = "wireguard"`), n2 runs
/// Debian's wireguard-go configured with `wg` as its users do, each knowing the other by its
/// public key. Handshakes both ways (weft initiates at once; wireguard-go when it has a packet
/// and no session), ping and TCP both ways.
#[test]
fn weft_interoperates_with_wireguard_go() {
    use weft_netns_tests::wireguard_go::{WgGo, WgGoConfig, WgPeer};
    let Some(topo) = Topology::for_test("weft_interoperates_with_wireguard_go", "wgo", 2).expect("topology") else {
        return;
    };
    let keys = wireguard_keys(topo.dir(), 2).expect("keys");
    let n1 = topo.start_weft(NodeConfig::wireguard_mesh(1, 2, &keys)).expect("weft on n1");
    let go = WgGo::start(
        topo.n(2).ns(),
        topo.dir(),
        &WgGoConfig {
            ifname: format!("wgt{}", std::process::id()),
            private_key: keys[1].file.clone(),
            listen_port: WIREGUARD_PORT,
            address: "10.244.2.1/24".into(),
            routes: vec!["10.244.1.0/24".into()],
            mtu: 1420,
            peers: vec![WgPeer {
                public_key: keys[0].public.clone(),
                endpoint: format!("198.18.0.1:{WIREGUARD_PORT}"),
                allowed_ips: "10.244.1.0/24".into(),
            }],
        },
    )
    .expect("wireguard-go on n2");
    wait_for_session(&n1, "n2");
    ping_all(topo.n(1).ns(), "10.244.2.1", 3).expect("weft -> wireguard-go");
    ping_all(topo.n(2).ns(), "10.244.1.1", 3).expect("wireguard-go -> weft");
    let server = IperfServer::start(topo.n(2).ns(), "10.244.2.1", &topo.dir().join("iperf-n2.log")).expect("iperf3 -s");
    let to_go = iperf3_tcp(topo.n(1).ns(), "10.244.2.1", 2).expect("iperf3 weft -> wireguard-go");
    drop(server);
    let server = IperfServer::start(topo.n(1).ns(), "10.244.1.1", &topo.dir().join("iperf-n1.log")).expect("iperf3 -s");
    let to_weft = iperf3_tcp(topo.n(2).ns(), "10.244.1.1", 2).expect("iperf3 wireguard-go -> weft");
    drop(server);
    weft_netns_tests::report(&format!("weft <-> wireguard-go: {:.2} / {:.2} Gbit/s", to_go / 1e9, to_weft / 1e9));
    let s = n1.status_json().expect("status");
    let p = peer_status(&s, "n2").expect("n2");
    assert!(json_u64(p, "wireguard.authenticated").expect("authenticated") > 0);
    assert_eq!(json_u64(p, "wireguard.failed").expect("failed"), 0, "{p}");
    assert_eq!(json_u64(&s, "wireguard.handshakes_refused").expect("refused"), 0, "{s}");
    // wireguard-go saw a handshake with weft, and traffic both ways.
    let wg = weft_netns_tests::wireguard_go::find_program("wg", "wireguard-tools").expect("wg");
    let out = topo.n(2).ns().exec_ok(wg.to_str().expect("utf-8"), &["show", go.ifname(), "dump"]).expect("wg show");
    let peer_line = out.stdout.lines().nth(1).expect("a peer line");
    let fields: Vec<&str> = peer_line.split('\t').collect();
    assert_eq!(fields.first().copied(), Some(keys[0].public.as_str()), "{peer_line}");
    let handshake: u64 = fields.get(4).and_then(|f| f.parse().ok()).expect("latest handshake");
    let (rx, tx): (u64, u64) = (fields[5].parse().expect("rx"), fields[6].parse().expect("tx"));
    assert!(handshake > 0 && rx > 1_000_000 && tx > 1_000_000, "{peer_line}");
    go.stop().expect("wireguard-go ran throughout");
}

/// Lease mode on the file store, `weft network init --backend wireguard`: each node creates
/// its key on first start, publishes the public key in its lease (flannel's
/// `BackendData.PublicKey`), takes its peers' keys from theirs, and they talk encrypted.
#[test]
fn leased_nodes_publish_their_keys_and_talk_encrypted() {
    use weft_netns_tests::NetworkInit;
    let Some(topo) =
        Topology::for_test("leased_nodes_publish_their_keys_and_talk_encrypted", "wgl", 2).expect("topology")
    else {
        return;
    };
    let store = topo.file_store();
    let init = NetworkInit { backend: Some("wireguard".into()), ..NetworkInit::default() };
    topo.network_init(&store, &init).expect("weft network init --backend wireguard");
    let nodes: Vec<_> = (1..=2u8)
        .map(|i| {
            let mut c = topo.lease_config(i, &store);
            // Not yet there: weft creates it.
            c.wireguard_key_file = Some(topo.dir().join(format!("keys/n{i}.key")));
            topo.start_weft(c).expect("starting a leased node")
        })
        .collect();
    let subnets: Vec<String> = nodes.iter().map(|n| n.leased_subnet().expect("subnet")).collect();
    for (i, n) in nodes.iter().enumerate() {
        let other = &subnets[1 - i];
        let seen =
            n.wait_peer_subnet(other, true, Duration::from_secs(10), Duration::from_millis(100)).expect("status");
        assert!(seen.is_some(), "n{} never listed {other}", i + 1);
    }
    let leases = topo.leases(&store).expect("weft leases");
    for (i, n) in nodes.iter().enumerate() {
        let s = n.status_json().expect("status");
        let key = json_path(&s, "wireguard.public_key").and_then(|v| v.as_str()).expect("our key").to_owned();
        let ours = leases.iter().find(|l| l.subnet == subnets[i]).expect("our lease");
        assert_eq!(ours.backend_type, "wireguard");
        assert_eq!(ours.backend_data.get("PublicKey").and_then(|v| v.as_str()), Some(key.as_str()), "{ours:?}");
        let file = topo.dir().join(format!("keys/n{}.key", i + 1));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).expect("key file").permissions());
        assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        // The other node knows us by that key.
        let other = nodes[1 - i].status_json().expect("status");
        let p = weft_netns_tests::peer_by_subnet(&other, &subnets[i]).expect("listed");
        assert_eq!(json_path(p, "wireguard.key_fingerprint").and_then(|v| v.as_str()), Some(&key[..8]), "{p}");
    }
    wait_for_session(&nodes[0], &peer_name(&nodes[0], &subnets[1]));
    for (i, n) in nodes.iter().enumerate() {
        let gw = nodes[1 - i].gateway().expect("gateway").to_string();
        ping_all(n.ns(), &gw, 3).expect("ping across leased wireguard nodes");
    }
}

/// The name `node` lists the peer holding `subnet` under.
fn peer_name(node: &weft_netns_tests::WeftNode<'_>, subnet: &str) -> String {
    let s = node.status_json().expect("status");
    let p = weft_netns_tests::peer_by_subnet(&s, subnet).expect("listed");
    p["name"].as_str().expect("name").to_owned()
}
