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

fn run_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out =
        Command::new(WEFT).args(args).envs(env.iter().copied()).env_remove("RUST_LOG").output().expect("run weft");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A failed start says so once: one line on stderr (through the log), the exit code unchanged.
#[test]
fn a_failed_start_prints_one_error_line() {
    let body = "public_ip = \"198.18.0.1\"\nsubnet = \"10.244.1.0/24\"\n";
    let (code, err) = run_env(&["run", "--config", &config("one-line.toml", body)], &[]);
    assert_eq!(code, Some(3), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err:?}");
    assert!(lines[0].contains("node_name: required") && lines[0].contains("ERROR"), "{err:?}");
    assert!(!err.contains('\u{1b}'), "colour codes on a pipe: {err:?}");
}

/// Every `weft run` flag can come from WEFT_<FLAG>, as flanneld's FLANNELD_<FLAG>; the command
/// line wins over the variable, the variable over the config file.
#[test]
fn weft_variables_set_the_flags() {
    let env = [
        ("WEFT_NODE_NAME", "n 1"),
        ("WEFT_PUBLIC_IP", "198.18.0.1"),
        ("WEFT_SUBNET", "10.244.1.0/24"),
        ("WEFT_LOG_FORMAT", "json"),
    ];
    let (code, err) = run_env(&["run"], &env);
    assert_eq!(code, Some(3), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err:?}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("one JSON log line");
    assert_eq!(v["fields"]["exit_code"], 3, "{v}");
    assert!(v["fields"]["error"].as_str().is_some_and(|e| e.starts_with("node_name: \"n 1\"")), "{v}");
    // The flag wins over the variable: a good name on the command line gets past node_name.
    let (code, err) = run_env(&["run", "--node-name", "n1", "--workers", "0"], &env);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("workers: 0 must be between"), "{err}");
    // The variable wins over the file.
    let file =
        config("env-over-file.toml", "node_name = \"n1\"\npublic_ip = \"198.18.0.1\"\nsubnet = \"10.244.1.0/24\"\n");
    let (code, err) = run_env(&["run", "--config", &file], &[("WEFT_TUN_NAME", "bad/name")]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("tun_name: \"bad/name\""), "{err}");
    // On/off flags take the usual spellings; a bad one is a command-line error naming the flag.
    let (code, err) = run_env(&["run"], &[("WEFT_RELEASE_ON_EXIT", "perhaps")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--release-on-exit"), "{err}");
}

#[test]
fn run_help_states_the_variable_rule() {
    let out = Command::new(WEFT).args(["run", "--help"]).output().expect("run weft");
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in ["[env: WEFT_NODE_NAME=]", "[env: WEFT_IFACE=]", "--flannel-paths", "--log-level", "WEFT_PEER"] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
}

/// A network config weft would have to ignore part of is refused before it reaches the store,
/// naming the Backend field.
#[test]
fn network_init_refuses_backend_options_weft_cannot_honour() {
    let store = std::env::temp_dir().join(format!("weft-cli-{}-store", std::process::id()));
    for (json, want) in [
        (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","GBP":true}}"#, "Backend.GBP: true is not supported"),
        (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","DirectRouting":true}}"#, "Backend.DirectRouting:"),
        (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":100}}"#, "Backend.MTU: 100 must be between"),
    ] {
        let file = config("net-conf.json", json);
        let (code, err) =
            run(&["network", "init", "--store", "file", "--store-dir", store.to_str().unwrap(), "--json", &file]);
        assert_eq!(code, Some(3), "{json}: {err}");
        assert!(err.contains(want), "{json}: want {want:?} in {err:?}");
    }
}
