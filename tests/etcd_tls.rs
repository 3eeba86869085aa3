//! The real `weft` binary against a real etcd on loopback (no namespaces, no root): `weft
//! network init` and `weft leases` through TLS with a client certificate, and as an etcd user
//! whose password comes from `WEFT_ETCD_PASSWORD`. Certificates are generated in-process.
//!
//! Without an `etcd` binary the tests fail under `CI=true` and otherwise skip, saying so.

// Test helpers outside #[test] fns: a failure to run the binary should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../ipam/tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::Etcd;
use support::pki::Pki;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn weft(args: &[&str], password: Option<&str>) -> Out {
    let mut cmd = Command::new(WEFT);
    cmd.args(args).env_remove("WEFT_ETCD_PASSWORD");
    if let Some(p) = password {
        cmd.env("WEFT_ETCD_PASSWORD", p);
    }
    let out = cmd.output().expect("run weft");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `weft network init` until etcd answers (exit 1 means "store unavailable": etcd is
/// still starting).
fn network_init(store: &[&str], password: Option<&str>) {
    let args: Vec<&str> =
        ["network", "init", "--network", "10.244.0.0/16"].into_iter().chain(store.iter().copied()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = weft(&args, password);
        match out.code {
            Some(0) => return,
            Some(1) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => panic!("weft network init: {:?}: {}", out.code, out.stderr),
        }
    }
}

#[test]
fn network_init_and_leases_over_tls_with_a_client_certificate() {
    let pki = Pki::generate();
    let Some(etcd) = Etcd::start_with("https", pki.etcd_args()) else { return };
    let url = etcd.endpoint();
    let (ca, cert, key) =
        (pki.ca.to_str().unwrap(), pki.client.cert.to_str().unwrap(), pki.client.key.to_str().unwrap());
    let tls = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        &url,
        "--etcd-cafile",
        ca,
        "--etcd-certfile",
        cert,
        "--etcd-keyfile",
        key,
    ];
    network_init(&tls, None);
    let leases: Vec<&str> = ["leases", "--json"].into_iter().chain(tls).collect();
    let out = weft(&leases, None);
    assert_eq!((out.code, out.stdout.trim()), (Some(0), "[]"), "{}", out.stderr);
    // The config really is in etcd: a second init is refused because of it.
    let again: Vec<&str> = ["network", "init"].into_iter().chain(tls).collect();
    let out = weft(&again, None);
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert!(out.stderr.contains("already has a network config"), "{}", out.stderr);

    // No client certificate: etcd refuses; the message says so, and it fails fast.
    let t = Instant::now();
    let out = weft(&["leases", "--store", "etcd", "--etcd-endpoints", &url, "--etcd-cafile", ca], None);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("certificate") && out.stderr.contains("--etcd-certfile"), "{}", out.stderr);
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());

    // Configuration errors are refused before anything is sent, naming the field (exit 3).
    for (args, want) in [
        (vec!["--etcd-endpoints", url.as_str(), "--etcd-certfile", cert], "etcd_keyfile: "),
        (vec!["--etcd-endpoints", url.as_str(), "--etcd-cafile", "/nonexistent/ca.crt"], "etcd_cafile: /nonexistent"),
        (
            vec!["--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-cafile", ca],
            "etcd_cafile: set, but etcd_endpoints are plain http",
        ),
        (vec!["--etcd-endpoints", url.as_str(), "--etcd-username", "weft"], "etcd_password: required"),
    ] {
        let argv: Vec<&str> = ["leases", "--store", "etcd"].into_iter().chain(args.iter().copied()).collect();
        let out = weft(&argv, None);
        assert_eq!(out.code, Some(3), "{argv:?}: {}", out.stderr);
        assert!(out.stderr.contains(want), "{argv:?}: want {want:?} in {}", out.stderr);
    }
}

#[test]
fn leases_as_an_etcd_user_with_the_password_from_the_environment() {
    let Some(etcd) = Etcd::start() else { return };
    let url = etcd.endpoint();
    let plain = ["--store", "etcd", "--etcd-endpoints", url.as_str()];
    network_init(&plain, None);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([url.as_str()], None).await.unwrap();
        c.user_add("root", "root-secret", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.user_add("weft", "right-secret", None).await.unwrap();
        c.user_grant_role("weft", "root").await.unwrap();
        c.auth_enable().await.unwrap();
    });
    let as_weft: Vec<&str> = ["leases", "--json"].into_iter().chain(plain).chain(["--etcd-username", "weft"]).collect();
    let out = weft(&as_weft, Some("right-secret"));
    assert_eq!((out.code, out.stdout.trim()), (Some(0), "[]"), "{}", out.stderr);

    let out = weft(&as_weft, Some("wrong-secret"));
    assert_eq!(out.code, Some(3), "a refused password is a configuration error, not an outage: {}", out.stderr);
    assert!(out.stderr.contains("store refused our credentials") && out.stderr.contains("\"weft\""), "{}", out.stderr);
    assert!(!out.stderr.contains("wrong-secret"), "{}", out.stderr);

    let anonymous: Vec<&str> = ["leases"].into_iter().chain(plain).collect();
    let out = weft(&anonymous, None);
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert!(out.stderr.contains("set --etcd-username and --etcd-password"), "{}", out.stderr);
}
