//! flanneld's node conventions: the public address found from `iface` or the default route,
//! and the network config's `Backend.MTU`, honoured or refused by name.
//!
//! ```text
//! ┌─ n1 ──────────────────────────────────┐ ┌─ n2 ───────────────┐
//! │ weft0 10.244.x.1                      │ │ weft0 10.244.y.1   │
//! │ eth0 198.18.0.1/24 (+ 198.18.0.77/24) │ │ eth0 198.18.0.2/24 │
//! │ default via 198.18.0.254; d0 (veth,   │ └──────────┬─────────┘
//! │ no IPv4)                              │            │
//! └──────────────────┬────────────────────┘            │
//! ┌──────────────────┴─────────────────────────────────┴──┐
//! │  u: bridge br0, underlay 198.18.0.0/24                 │
//! └────────────────────────────────────────────────────────┘
//! ```
//!
//! Needs root; namespaces and daemons are removed on drop.

// Helpers outside #[test] fns fail the test loudly, as the tests themselves do.
#![allow(clippy::expect_used, clippy::panic)]

use serde_json::Value;
use weft_netns_tests::lease::{expect_refusal, run_weft};
use weft_netns_tests::weft::weft_bin;
use weft_netns_tests::{NodeConfig, Topology, json_path};

fn public_ip(node: &weft_netns_tests::WeftNode<'_>) -> (String, String) {
    let s = node.status_json().expect("status");
    let get = |k: &str| json_path(&s, k).and_then(Value::as_str).unwrap_or_default().to_owned();
    (get("public_ip"), get("underlay_interface"))
}

/// Without `public_ip`, weft takes the first IPv4 address of `iface` (a name or an address),
/// else of the default route's interface, as flanneld; every way it cannot is refused with
/// exit 3, naming the field.
#[test]
fn public_ip_comes_from_iface_or_the_default_route() {
    let Some(topo) =
        Topology::for_test("public_ip_comes_from_iface_or_the_default_route", "pubip", 1).expect("topology")
    else {
        return;
    };
    let ns = topo.n(1).ns();
    ns.exec_ok("ip", &["route", "add", "default", "via", "198.18.0.254", "dev", "eth0"]).expect("default route");
    ns.exec_ok("ip", &["addr", "add", "198.18.0.77/24", "dev", "eth0"]).expect("second address");
    // An interface without IPv4 (a veth pair: this kernel may lack the dummy driver).
    ns.exec_ok("ip", &["link", "add", "d0", "type", "veth", "peer", "name", "d1"]).expect("veth d0");
    ns.exec_ok("ip", &["link", "set", "d0", "up"]).expect("d0 up");

    let auto = |iface: Option<&str>| NodeConfig {
        omit_public_ip: true,
        iface: iface.map(str::to_owned),
        ..NodeConfig::for_host(1)
    };
    for (iface, want) in [(None, "198.18.0.1"), (Some("eth0"), "198.18.0.1"), (Some("198.18.0.77"), "198.18.0.77")] {
        let mut n1 = topo.start_weft(auto(iface)).unwrap_or_else(|e| panic!("iface {iface:?}: {e:#}"));
        assert_eq!(public_ip(&n1), (want.to_owned(), "eth0".to_owned()), "iface {iface:?}");
        assert!(n1.log_tail(40).contains("public ip chosen"), "{}", n1.log_tail(40));
        n1.stop().expect("stop");
    }
    // public_ip with iface: it must be one of the interface's addresses.
    let mut n1 = topo.start_weft(NodeConfig { iface: Some("eth0".into()), ..NodeConfig::for_host(1) }).expect("both");
    assert_eq!(public_ip(&n1).0, "198.18.0.1");
    n1.stop().expect("stop");

    let bin = weft_bin().expect("weft binary");
    let sock = topo.dir().join("refused.sock");
    let refused = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "run",
            "--node-name",
            "n1",
            "--subnet",
            "10.244.1.0/24",
            "--api-socket",
            sock.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        let mut cmd = ns.command(&bin, &args);
        cmd.envs(env.iter().copied());
        let out = cmd.output().expect("weft run");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for (extra, env, want) in [
        (&["--iface", "nosuch"][..], &[][..], "iface: no interface \"nosuch\" on this host"),
        (&[], &[("WEFT_IFACE", "nosuch")][..], "iface: no interface \"nosuch\" on this host"),
        (&["--iface", "d0"], &[], "iface: d0 has no IPv4 address"),
        (&["--iface", "198.18.0.99"], &[], "iface: 198.18.0.99 is not an address of any interface"),
        (&["--iface", "d0", "--public-ip", "198.18.0.1"], &[], "iface: d0 does not hold public_ip 198.18.0.1"),
    ] {
        let (code, err) = refused(extra, env);
        assert_eq!(code, Some(3), "{extra:?} {env:?}: {err}");
        assert!(err.contains(want), "{extra:?} {env:?}: want {want:?} in {err}");
        assert_eq!(err.lines().filter(|l| l.contains("ERROR")).count(), 1, "one error line: {err}");
        assert!(!ns.has_link("weft0").expect("ip link"), "a refused start left its TUN");
    }
    ns.exec_ok("ip", &["route", "del", "default"]).expect("drop the default route");
    let (code, err) = refused(&[], &[]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("public_ip: not set, and this host has no IPv4 default route"), "{err}");
}

/// The network config's `Backend.MTU` is the overlay MTU (status, TUN and subnet.env); one the
/// underlay cannot carry stops the start with exit 3 naming `Backend.MTU`.
#[test]
fn backend_mtu_is_honoured_or_refused_by_name() {
    let Some(topo) = Topology::for_test("backend_mtu_is_honoured_or_refused_by_name", "bmtu", 1).expect("topology")
    else {
        return;
    };
    let store = topo.file_store();
    let init = |mtu: u32| {
        let json = topo.dir().join(format!("net-{mtu}.json"));
        std::fs::write(&json, format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"vxlan","MTU":{mtu}}}}}"#))
            .expect("write net-conf");
        let mut args = vec!["network".to_owned(), "init".to_owned(), "--force".to_owned()];
        args.extend(store.cli_args());
        args.extend(["--json".to_owned(), json.display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_weft(topo.n(1).ns(), &args).expect("weft network init").ok().expect("network init");
    };
    init(1400);
    let mut n1 = topo.start_weft(topo.lease_config(1, &store)).expect("n1");
    let s = n1.status_json().expect("status");
    assert_eq!(json_path(&s, "mtu").and_then(Value::as_u64), Some(1400), "{s}");
    let tun = topo.n(1).ns().exec_ok("cat", &["/sys/class/net/weft0/mtu"]).expect("tun mtu").stdout;
    assert_eq!(tun.trim(), "1400");
    let env = String::from_utf8(n1.subnet_env().expect("subnet.env")).expect("utf-8");
    assert!(env.contains("FLANNEL_MTU=1400"), "{env}");
    // A leave forgets the lease cache, which holds the old network config.
    n1.leave().expect("leave");

    init(9000);
    let cfg = topo.dir().join("n1-9000.toml");
    let sock = topo.dir().join("n1-9000.sock");
    let node = topo.lease_config(1, &store);
    std::fs::write(&cfg, node.to_toml(&sock)).expect("config");
    let out = run_weft(topo.n(1).ns(), &["run", "--config", cfg.to_str().expect("utf-8")]).expect("weft run");
    expect_refusal(&out, 3, &["Backend.MTU: 9000 exceeds what eth0 (MTU 1500) carries", "at most 1450"])
        .expect("Backend.MTU above the underlay");
    assert!(!topo.n(1).ns().has_link("weft0").expect("ip link"));
}
