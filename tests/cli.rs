//! The `weft` command line without root: configuration errors are refused before anything is
//! touched, with the field named and a stable exit code.

// Test helpers outside #[test] fns: a failure to run the binary should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(WEFT).args(args).output().expect("run weft");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn config(name: &str, body: &str) -> String {
    let dir = std::env::temp_dir().join(format!("weft-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn bad_configs_exit_3_naming_the_field() {
    let cases = [
        ("missing.toml", "public_ip = \"198.18.0.1\"\nsubnet = \"10.244.1.0/24\"\n", "node_name: required"),
        ("cidr.toml", "node_name = \"n1\"\npublic_ip = \"198.18.0.1\"\nsubnet = \"10.244.1.0/33\"\n", "subnet:"),
        (
            "outside.toml",
            "node_name = \"n1\"\npublic_ip = \"198.18.0.1\"\nsubnet = \"10.244.1.0/24\"\n[[peers]]\nname = \"n2\"\nsubnet = \"10.99.0.0/24\"\nendpoint = \"198.18.0.2\"\n",
            "peers[0].subnet: 10.99.0.0/24 lies outside the cluster network 10.244.0.0/16",
        ),
        (
            "overlap.toml",
            "node_name = \"n1\"\npublic_ip = \"198.18.0.1\"\nsubnet = \"10.244.1.0/24\"\n[[peers]]\nname = \"n2\"\nsubnet = \"10.244.1.128/25\"\nendpoint = \"198.18.0.2\"\n",
            "peers[0].subnet: 10.244.1.128/25 overlaps this node's subnet",
        ),
        ("typo.toml", "node_name = \"n1\"\nsubnett = \"10.244.1.0/24\"\n", "unknown field `subnett`"),
    ];
    for (name, body, want) in cases {
        let (code, err) = run(&["run", "--config", &config(name, body)]);
        assert_eq!(code, Some(3), "{name}: {err}");
        assert!(err.contains(want), "{name}: want {want:?} in {err:?}");
    }
    let (code, err) = run(&["run", "--config", "/nonexistent/weft.toml"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("cannot read config file /nonexistent/weft.toml"), "{err}");
}

#[test]
fn bad_flags_exit_2_and_bad_peer_flag_names_the_key() {
    let (code, _) = run(&["run", "--no-such-flag"]);
    assert_eq!(code, Some(2));
    let (code, err) = run(&["run", "--peer", "name=n2,subnet=10.244.2.0/24"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("endpoint= is required"), "{err}");
}

#[test]
fn status_without_daemon_exits_7() {
    let (code, err) = run(&["status", "--socket", "/nonexistent/weft.sock"]);
    assert_eq!(code, Some(7));
    assert!(err.contains("cannot reach the weft daemon at /nonexistent/weft.sock"), "{err}");
}
