//! Rootless mode: weft run by an unprivileged user (a system user each test creates with
//! `useradd` and removes) on two hosts, with a third host running weft as root in the same
//! cluster.
//!
//! ```text
//! ┌─ n1 (host netns) ───────────────┐ ┌─ n2 (host netns) ───────────────┐ ┌─ n3 ─────────────────┐
//! │ weft as a user: UDP 8285 here   │ │ weft as a user: UDP 8285 here   │ │ weft as root          │
//! │  └ own userns + netns:          │ │  └ own userns + netns:          │ │ weft0 10.244.3.1      │
//! │    weft0 10.244.1.1, lo         │ │    weft0 10.244.2.1, lo         │ │                       │
//! │    (ping, iperf3 via weft exec) │ │    (ping, iperf3 via weft exec) │ │                       │
//! │ eth0 198.18.0.1/24              │ │ eth0 198.18.0.2/24              │ │ eth0 198.18.0.3/24    │
//! └─────────────────────────────────┘ └─────────────────────────────────┘ └───────────────────────┘
//! ```
//!
//! `/dev/net/tun` must be open to every user, as Debian and Fedora ship it (mode 0666); a
//! machine that has it 0600 gets 0666 for the test's duration, restored afterwards.
//!
//! Needs root (to build the lab), useradd/userdel, setpriv, nsenter, unshare, iperf3, and
//! unprivileged user namespaces.

// Setup helpers outside #[test] fns: a failing step must fail the test loudly.
#![allow(clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use weft_netns_tests::cmd::poll_until;
use weft_netns_tests::traffic::parse_iperf3_json;
use weft_netns_tests::{
    IperfServer, LeaseSettings, NetworkInit, NodeConfig, StoreConfig, Topology, WeftNode, iperf3_tcp, json_path,
    ping_all, report,
};

/// An unprivileged system user (and its group) made for one test with `useradd`, removed
/// with `userdel` on drop: the daemons run as it.
struct TestUser {
    name: String,
    uid: u32,
}

impl TestUser {
    fn new(tag: &str) -> Self {
        let name = format!("weft-{tag}-{}", std::process::id());
        let run = |program: &str, args: &[&str]| {
            let out = std::process::Command::new(program).args(args).output().expect(program);
            assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        run("useradd", &["--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", &name]);
        // From here on, drop removes the user even if a check below fails.
        let mut user = Self { uid: 0, name };
        // The harness runs it with gid = uid (a gid needs no group entry to be used).
        user.uid = run("id", &["-u", &user.name]).parse().expect("uid");
        user
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // Its processes are gone with the namespaces; a failure here only leaves an account.
        let _ = std::process::Command::new("userdel").arg(&self.name).status();
    }
}

/// `/dev/net/tun` with mode `mode` while it lives (0666 is what distributions ship); the mode
/// it had is put back on drop.
struct TunMode(u32);

impl TunMode {
    fn set(mode: u32) -> Self {
        let old = std::fs::metadata("/dev/net/tun").expect("/dev/net/tun").permissions().mode();
        std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(0o20000 | mode))
            .expect("chmod /dev/net/tun");
        Self(old)
    }
}

impl Drop for TunMode {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(self.0));
    }
}

fn rootless(i: u8, user: &TestUser) -> NodeConfig {
    NodeConfig { run_as: Some(user.uid), ..NodeConfig::mesh(i, 3) }
}

/// Runs `program args` in `node`'s overlay, as its user; must succeed.
fn in_overlay(node: &WeftNode<'_>, timeout: Duration, program: &str, args: &[&str]) -> String {
    let all = node.overlay_args(program, args).expect("rootless node");
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = node.ns().exec_timeout(timeout, "setpriv", &refs).expect("weft exec");
    assert!(out.success(), "weft exec {program} {args:?} in {}: {out}", node.config().node_name);
    out.stdout
}

/// An iperf3 server inside `node`'s overlay on `addr` (one test), listening.
fn overlay_iperf_server(node: &WeftNode<'_>, addr: &str, log: &std::path::Path) -> weft_netns_tests::Proc {
    let all = node.overlay_args("iperf3", &["-s", "-1", "-B", addr]).expect("rootless node");
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let proc = node.ns().spawn("setpriv", &refs, log).expect("iperf3 -s in the overlay");
    let listening = poll_until(Duration::from_secs(5), || {
        Ok(in_overlay(node, Duration::from_secs(5), "ss", &["-Hltn", "sport = :5201"]).contains(addr).then_some(()))
    });
    assert!(matches!(listening, Ok(Some(()))), "iperf3 in {}'s overlay is not listening", node.config().node_name);
    proc
}

/// `iperf3 -c addr` from `node`'s overlay, in bit/s.
fn overlay_iperf_client(node: &WeftNode<'_>, addr: &str, secs: u32) -> f64 {
    let t = secs.to_string();
    let out = in_overlay(node, Duration::from_secs(u64::from(secs) + 15), "iperf3", &["-c", addr, "-t", &t, "-J"]);
    let run = parse_iperf3_json(&out)
        .unwrap_or_else(|e| panic!("iperf3 from {}'s overlay: {e:#}\n{out}", node.config().node_name));
    report(&format!(
        "iperf3 TCP {secs} s [{} overlay] -> {addr}: {:.2} Gbit/s",
        node.config().node_name,
        run.bits_per_second / 1e9
    ));
    run.bits_per_second
}

#[test]
fn rootless_nodes_and_a_root_node_in_one_cluster() {
    let Some(topo) = Topology::for_test("rootless_nodes_and_a_root_node_in_one_cluster", "rls", 3).expect("topology")
    else {
        return;
    };
    let _tun = TunMode::set(0o666);
    let user = TestUser::new("rls");
    let n1 = topo.start_weft(rootless(1, &user)).expect("rootless weft on n1");
    let n2 = topo.start_weft(rootless(2, &user)).expect("rootless weft on n2");
    let n3 = topo.start_weft(NodeConfig::mesh(3, 3)).expect("root weft on n3");

    for n in [&n1, &n2] {
        let status = n.status_json().expect("status");
        let netns = json_path(&status, "rootless.netns").and_then(|v| v.as_str());
        assert!(netns.is_some_and(|p| p.ends_with("/ns/net")), "no overlay namespace in status: {status}");
        // The stable name under $XDG_RUNTIME_DIR/weft resolves to the same namespace.
        let link = n.user_dir().expect("user dir").join("run/weft/netns");
        let via_link = std::fs::read_link(std::fs::read_link(&link).expect("netns link")).ok();
        assert_eq!(via_link, netns.and_then(|p| std::fs::read_link(p).ok()), "{}", link.display());
        // The daemon runs as the test's user, and its TUN is not in the host's namespace.
        let pid = json_path(&status, "pid").and_then(|v| v.as_u64()).expect("pid");
        let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
        let uid_line = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default();
        let uid = user.uid.to_string();
        assert!(uid_line.split_whitespace().nth(1) == Some(uid.as_str()), "daemon not unprivileged: {uid_line}");
        assert!(!n.ns().has_link("weft0").expect("ip link"), "the TUN leaked into the host namespace");
        let addrs = in_overlay(n, Duration::from_secs(5), "ip", &["-br", "addr", "show", "weft0"]);
        let gw = n.gateway().expect("gateway").to_string();
        assert!(addrs.contains(&gw), "overlay TUN lacks {gw}: {addrs}");
        let io = json_path(&status, "io_backend").and_then(|v| v.as_str()).unwrap_or("?").to_owned();
        let why = json_path(&status, "io_fallback_reason").and_then(|v| v.as_str()).unwrap_or("").to_owned();
        report(&format!("{} rootless: io {io} {why}", n.config().node_name));
    }
    assert!(json_path(&n3.status_json().expect("status"), "rootless").is_some_and(serde_json::Value::is_null));

    // Overlay processes reach each other across hosts, and the root node's pods.
    in_overlay(&n1, Duration::from_secs(15), "ping", &["-c", "3", "-i", "0.2", "-W", "2", "10.244.2.1"]);
    in_overlay(&n2, Duration::from_secs(15), "ping", &["-c", "3", "-i", "0.2", "-W", "2", "10.244.3.1"]);
    ping_all(n3.ns(), "10.244.1.1", 3).expect("root node -> rootless overlay");

    let _s2 = overlay_iperf_server(&n2, "10.244.2.1", &topo.dir().join("iperf-n2.log"));
    let rootless_bps = overlay_iperf_client(&n1, "10.244.2.1", 3);
    let _s3 = IperfServer::start(n3.ns(), "10.244.3.1", &topo.dir().join("iperf-n3.log")).expect("iperf3 on n3");
    let to_root_bps = overlay_iperf_client(&n1, "10.244.3.1", 3);
    let _s1 = overlay_iperf_server(&n1, "10.244.1.1", &topo.dir().join("iperf-n1.log"));
    let from_root_bps = iperf3_tcp(n3.ns(), "10.244.1.1", 3).expect("iperf3 root -> rootless");
    assert!(rootless_bps > 0.0 && to_root_bps > 0.0 && from_root_bps > 0.0);
    report(&format!(
        "rootless: n1 -> n2 {:.2} Gbit/s, rootless -> root {:.2}, root -> rootless {:.2}",
        rootless_bps / 1e9,
        to_root_bps / 1e9,
        from_root_bps / 1e9
    ));
}

/// What needs root is refused by name, not half done: masquerade programs the host's firewall.
#[test]
fn rootless_refuses_ip_masq() {
    let Some(topo) = Topology::for_test("rootless_refuses_ip_masq", "rlm", 1).expect("topology") else {
        return;
    };
    let _tun = TunMode::set(0o666);
    let user = TestUser::new("rlm");
    let Err(err) = topo.start_weft(rootless(1, &user).ip_masq(true)) else {
        panic!("a rootless node with ip_masq must not start");
    };
    let text = format!("{err:#}");
    assert!(text.contains("ip_masq") && text.contains("needs root"), "{text}");
}

/// Without access to `/dev/net/tun` a rootless start fails at once, exit 4, naming the device.
#[test]
fn rootless_without_tun_access_exits_4() {
    let Some(topo) = Topology::for_test("rootless_without_tun_access_exits_4", "rlt", 1).expect("topology") else {
        return;
    };
    let _tun = TunMode::set(0o600);
    let user = TestUser::new("rlt");
    let Err(err) = topo.start_weft(rootless(1, &user)) else {
        panic!("a rootless node without /dev/net/tun must not start");
    };
    let text = format!("{err:#}");
    assert!(text.contains("exit status: 4") && text.contains("/dev/net/tun is not open to this user"), "{text}");
}

/// Lease mode rootless, against etcd: two unprivileged nodes lease their subnets and find each
/// other exactly as root nodes do.
#[test]
fn rootless_nodes_lease_from_etcd() {
    let Some(topo) = Topology::for_test_with_etcd("rootless_nodes_lease_from_etcd", "rle", 2).expect("topology") else {
        return;
    };
    let _tun = TunMode::set(0o666);
    let etcd = topo.start_etcd().expect("etcd");
    let store = StoreConfig::etcd(etcd.endpoints());
    topo.network_init(&store, &NetworkInit::udp()).expect("weft network init");
    let user = TestUser::new("rle");
    let nodes: Vec<WeftNode<'_>> = [1u8, 2]
        .iter()
        .map(|&i| {
            let home = WeftNode::user_dir_of(topo.dir(), &format!("n{i}"));
            let lease = LeaseSettings {
                subnet_file: home.join("run/subnet.env"),
                pod_dir: home.join("home/pods"),
                lease_cache: home.join("home/lease-cache.json"),
                ..LeaseSettings::for_node(&store, topo.dir(), &format!("n{i}"))
            };
            let cfg = NodeConfig { run_as: Some(user.uid), ..NodeConfig::leased(i, lease) };
            topo.start_weft(cfg).unwrap_or_else(|e| panic!("rootless lease-mode n{i}: {e:#}"))
        })
        .collect();
    let subnets: Vec<String> = nodes.iter().map(|n| n.leased_subnet().expect("lease")).collect();
    assert_ne!(subnets[0], subnets[1]);
    for (i, n) in nodes.iter().enumerate() {
        let other = &subnets[1 - i];
        let seen = n.wait_peer_subnet(other, true, Duration::from_secs(5), Duration::from_millis(50)).expect("status");
        assert!(seen.is_some(), "n{} never listed {other}", i + 1);
    }
    let gw2 = nodes[1].gateway().expect("gateway").to_string();
    in_overlay(&nodes[0], Duration::from_secs(15), "ping", &["-c", "3", "-i", "0.2", "-W", "2", &gw2]);
    let env =
        std::fs::read_to_string(WeftNode::user_dir_of(topo.dir(), "n1").join("run/subnet.env")).expect("subnet.env");
    assert!(env.contains(&format!("FLANNEL_SUBNET={}", gateway_with_len(&nodes[0]))), "{env}");
}

/// `10.244.x.1/24` for a node's leased subnet, as subnet.env writes it.
fn gateway_with_len(n: &WeftNode<'_>) -> String {
    let subnet = n.leased_subnet().expect("lease");
    let len = subnet.split_once('/').map_or("24", |(_, l)| l).to_owned();
    format!("{}/{len}", n.gateway().expect("gateway"))
}

/// `--userns`/`--netns`: weft joins namespaces another tool made (as rootlesskit or podman
/// would hold them; here `unshare -Urn` run by the same user) and puts its TUN there.
#[test]
fn rootless_joins_given_namespaces() {
    let Some(topo) = Topology::for_test("rootless_joins_given_namespaces", "rlj", 1).expect("topology") else {
        return;
    };
    let _tun = TunMode::set(0o666);
    let user = TestUser::new("rlj");
    let uid = user.uid.to_string();
    let holder_args = ["--reuid", &uid, "--regid", &uid, "--clear-groups", "unshare", "-Urn", "sleep", "600"];
    let holder = topo.n(1).ns().spawn("setpriv", &holder_args, &topo.dir().join("holder.log")).expect("holder");
    let pid = holder.pid();
    let (userns, netns) = (format!("/proc/{pid}/ns/user"), format!("/proc/{pid}/ns/net"));
    let ready = poll_until(Duration::from_secs(5), || {
        let ours = std::fs::read_link("/proc/self/ns/user")?;
        Ok((std::fs::read_link(&userns)? != ours).then_some(()))
    });
    assert!(matches!(ready, Ok(Some(()))), "the holder never entered its own user namespace");
    let cfg = rootless(1, &user).with_env("WEFT_USERNS", &userns).with_env("WEFT_NETNS", &netns);
    let n1 = topo.start_weft(cfg).expect("rootless weft joining the holder's namespaces");
    let status = n1.status_json().expect("status");
    let reported = json_path(&status, "rootless.netns").and_then(|v| v.as_str()).expect("rootless.netns").to_owned();
    assert_eq!(
        std::fs::read_link(&reported).ok(),
        std::fs::read_link(&netns).ok(),
        "weft's overlay is not the holder's namespace"
    );
    let pid_arg = pid.to_string();
    let out = topo
        .n(1)
        .ns()
        .exec_ok("nsenter", &["--target", &pid_arg, "--user", "--net", "ip", "-br", "addr", "show", "weft0"])
        .expect("nsenter into the holder");
    assert!(out.stdout.contains("10.244.1.1"), "no weft TUN in the holder's namespace: {out}");
    drop(n1);
    drop(holder);
}
