//! Tests of the harness itself, without weft: namespaces, the underlay bridge, cleanup, the
//! stale sweep, and `weft-craft`'s datagrams as they appear on the wire.
//!
//! ```text
//! ┌─ n1 ────────────┐ ┌─ n2 ────────────┐ ┌─ n3 ────────────┐ ┌─ atk ───────────┐
//! │ eth0 198.18.0.1 │ │ eth0 198.18.0.2 │ │ eth0 198.18.0.3 │ │ eth0 198.18.0.9 │
//! └────────┬────────┘ └────────┬────────┘ └────────┬────────┘ └────────┬────────┘
//!          │ v1                │ v2                │ v3                │ v9
//! ┌────────┴───────────────────┴───────────────────┴───────────────────┴────────┐
//! │  u: bridge br0, 198.18.0.0/24                                               │
//! └─────────────────────────────────────────────────────────────────────────────┘
//!    namespaces are wt<pid>-<test>-<node>; atk only in the craft test
//! ```

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use etherparse::{Icmpv4Type, NetSlice, SlicedPacket, TransportSlice};
use weft_netns_tests::{Capture, IperfServer, Netns, Topology, iperf3_tcp, netns, ping_all, skip_unless_root};

const CRAFT: &str = env!("CARGO_BIN_EXE_weft-craft");

/// Interface names in the root namespace, from `ip -o link` output.
fn link_names(ip_o_link: &[u8]) -> BTreeSet<String> {
    String::from_utf8_lossy(ip_o_link)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .collect()
}

/// Whether `pid` has exited. An orphan killed at teardown is reparented to pid 1, which may
/// not reap it, so a zombie counts as gone.
fn gone_or_zombie(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

#[test]
fn underlay_pings_every_pair_and_cleans_up() {
    if !skip_unless_root("underlay_pings_every_pair_and_cleans_up").unwrap() {
        return;
    }
    let root_links = || link_names(&Command::new("ip").args(["-o", "link"]).output().unwrap().stdout);
    let before = root_links();
    let topo = Topology::new("underlay", 3).unwrap();
    assert_eq!(root_links(), before, "a link landed in the root namespace");
    let names: Vec<String> =
        topo.hosts().iter().map(|h| h.ns().name().to_owned()).chain([topo.underlay().name().to_owned()]).collect();
    for a in topo.hosts() {
        for b in topo.hosts() {
            if a.name() != b.name() {
                ping_all(a.ns(), &b.ip().to_string(), 2).unwrap();
            }
        }
    }
    let dir = topo.dir().to_owned();
    drop(topo);
    let left = netns::list().unwrap();
    for n in &names {
        assert!(!left.contains(n), "{n} survived drop: {left:?}");
    }
    assert!(!dir.exists(), "{} survived drop", dir.display());
}

#[test]
fn iperf3_helpers_measure_the_underlay() {
    if !skip_unless_root("iperf3_helpers_measure_the_underlay").unwrap() {
        return;
    }
    let topo = Topology::new("iperf_u", 2).unwrap();
    let server = topo.n(1).ip().to_string();
    let _srv = IperfServer::start(topo.n(1).ns(), &server, &topo.dir().join("iperf3.log")).unwrap();
    let bps = iperf3_tcp(topo.n(2).ns(), &server, 1).unwrap();
    assert!(bps > 0.0, "{bps} bit/s");
}

#[test]
fn netns_drop_kills_detached_processes() {
    if !skip_unless_root("netns_drop_kills_detached_processes").unwrap() {
        return;
    }
    netns::sweep_stale().unwrap();
    let ns = Netns::create(&netns::ns_name("detached", "x")).unwrap();
    // A grandchild we hold no handle to, like a daemon that forked.
    ns.exec_ok("sh", &["-c", "sleep 60 >/dev/null 2>&1 &"]).unwrap();
    let pids = ns.pids().unwrap();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let name = ns.name().to_owned();
    drop(ns);
    assert!(gone_or_zombie(pids[0]), "pid {} survived drop", pids[0]);
    assert!(!netns::list().unwrap().contains(&name));
}

#[test]
fn stale_namespaces_of_dead_runs_are_swept() {
    if !skip_unless_root("stale_namespaces_of_dead_runs_are_swept").unwrap() {
        return;
    }
    // A pid that has just exited stands for a test run that was SIGKILLed.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let name = format!("wt{dead}-stale-x");
    assert!(Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
    let mut sleeper = Command::new("ip").args(["netns", "exec", &name, "sleep", "60"]).spawn().unwrap();
    netns::sweep_stale().unwrap();
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "sleeper was not killed");
    assert!(!netns::list().unwrap().contains(&name), "{name} was not swept");
}

#[test]
fn craft_datagrams_arrive_intact() {
    if !skip_unless_root("craft_datagrams_arrive_intact").unwrap() {
        return;
    }
    let mut topo = Topology::new("craft", 1).unwrap();
    topo.add_host("atk", 9).unwrap();
    let n1 = topo.n(1);
    let atk = topo.host("atk").unwrap();
    let cap = Capture::start(n1.ns(), "eth0", "udp dst port 8285", topo.dir(), "n1-eth0").unwrap();
    atk.ns()
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
                "5",
                "--len",
                "100",
                "--ttl",
                "7",
            ],
        )
        .unwrap();
    atk.ns()
        .exec_ok(CRAFT, &["--bind", "198.18.0.9:4242", "--to", "198.18.0.1:8285", "--raw-hex", "45 00 00 1c ff"])
        .unwrap();
    // Let the last datagrams cross the bridge before stopping the capture.
    std::thread::sleep(Duration::from_millis(200));
    let pcap = cap.stop().unwrap();
    let packets = pcap.ip_packets().unwrap();
    assert_eq!(packets.len(), 6, "captured {} packets", packets.len());

    for (seq, outer) in packets[..5].iter().enumerate() {
        let outer = SlicedPacket::from_ip(outer).unwrap();
        let Some(TransportSlice::Udp(udp)) = &outer.transport else {
            panic!("outer is not UDP");
        };
        assert_eq!(udp.destination_port(), 8285);
        let inner = SlicedPacket::from_ip(udp.payload()).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &inner.net else {
            panic!("inner is not IPv4");
        };
        let h = ip.header().to_header();
        assert_eq!(h.source, [10, 244, 2, 1]);
        assert_eq!(h.destination, [10, 244, 1, 1]);
        assert_eq!(h.time_to_live, 7);
        assert_eq!(h.total_len, 100);
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        let Some(TransportSlice::Icmpv4(icmp)) = &inner.transport else {
            panic!("inner is not ICMPv4");
        };
        let Icmpv4Type::EchoRequest(echo) = icmp.icmp_type() else {
            panic!("not an echo request");
        };
        assert_eq!(usize::from(echo.seq), seq);
        let expected = icmp.header().icmp_type.calc_checksum(icmp.payload());
        assert_eq!(icmp.checksum(), expected, "ICMP checksum");
    }

    let raw = SlicedPacket::from_ip(packets[5]).unwrap();
    let Some(TransportSlice::Udp(udp)) = &raw.transport else {
        panic!("outer is not UDP");
    };
    assert_eq!(udp.source_port(), 4242);
    assert_eq!(udp.payload(), &[0x45, 0x00, 0x00, 0x1c, 0xff]);
}

#[test]
fn craft_rejects_bad_flags_by_name() {
    for (args, flag) in [
        (&["--to", "198.18.0.1:8285", "--src", "10.244.2.1", "--dst", "10.244.1.1"][..], "--bind"),
        (&["--bind", "198.18.0.9", "--to", "198.18.0.1:8285", "--raw-hex", "00"][..], "--bind"),
        (
            &[
                "--bind",
                "198.18.0.9:0",
                "--to",
                "198.18.0.1:8285",
                "--src",
                "10.244.2.1",
                "--dst",
                "10.244.1.1",
                "--ttl",
                "300",
            ][..],
            "--ttl",
        ),
        (
            &[
                "--bind",
                "198.18.0.9:0",
                "--to",
                "198.18.0.1:8285",
                "--src",
                "10.244.2.1",
                "--dst",
                "10.244.1.1",
                "--len",
                "12",
            ][..],
            "--len",
        ),
        (&["--bind", "198.18.0.9:0", "--to", "198.18.0.1:8285", "--raw-hex", "4g"][..], "--raw-hex"),
        (&["--bind", "198.18.0.9:0", "--to", "198.18.0.1:8285", "--src", "10.244.2"][..], "--src"),
    ] {
        let out = Command::new(CRAFT).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(flag), "{args:?}: error does not name {flag}:\n{stderr}");
    }
}
