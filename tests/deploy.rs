//! The packaging in `deploy/` cannot be run here (no container engine, no Kubernetes), so
//! this checks what can be checked without them: every WEFT_* variable the files set is one
//! `weft run` reads, the unit restarts always and never leaves on stop, the probes point at
//! the health port the DaemonSet sets, and the image copies files that exist.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `WEFT_…` names in `text`.
fn weft_vars(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("WEFT_") {
        let start = i + at;
        let mut end = start + 5;
        while end < b.len() && (b[end].is_ascii_uppercase() || b[end].is_ascii_digit() || b[end] == b'_') {
            end += 1;
        }
        if end > start + 5 {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

fn run_help_vars() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_weft")).args(["run", "--help"]).output().expect("weft run --help");
    let help = String::from_utf8_lossy(&out.stdout);
    help.split("[env: ").skip(1).filter_map(|s| s.split('=').next()).map(str::to_owned).collect()
}

#[test]
fn deploy_files_set_only_variables_weft_run_reads() {
    let known = run_help_vars();
    assert!(known.contains("WEFT_NODE_NAME") && known.contains("WEFT_ETCD_ENDPOINTS"), "{known:?}");
    for file in [
        "deploy/daemonset.yaml",
        "deploy/weft.env",
        "deploy/weft.service",
        "deploy/weft-user.service",
        "deploy/README.md",
    ] {
        for var in weft_vars(&read(file)) {
            assert!(known.contains(&var), "{file} uses {var}, which `weft run --help` does not list");
        }
    }
}

#[test]
fn unit_restarts_always_and_leaves_only_on_weft_leave() {
    let unit = read("deploy/weft.service");
    let directives: Vec<&str> = unit.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    assert!(directives.contains(&"Restart=always"), "{unit}");
    assert!(directives.contains(&"ExecStart=/usr/local/bin/weft run"), "{unit}");
    assert!(!directives.iter().any(|d| d.starts_with("ExecStop")), "a stop must not be a leave: {unit}");
    assert!(unit.contains("weft leave"), "the decommission step is documented");
}

/// The rootless user unit: restarts always, never leaves on stop, and passes only flags
/// `weft run` has.
#[test]
fn user_unit_runs_rootless_with_flags_weft_run_has() {
    let unit = read("deploy/weft-user.service");
    let directives: Vec<&str> = unit.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    assert!(directives.contains(&"Restart=always"), "{unit}");
    assert!(!directives.iter().any(|d| d.starts_with("ExecStop")), "a stop must not be a leave: {unit}");
    let exec = directives.iter().find_map(|d| d.strip_prefix("ExecStart=")).expect("ExecStart");
    let out = Command::new(env!("CARGO_BIN_EXE_weft")).args(["run", "--help"]).output().expect("weft run --help");
    let help = String::from_utf8_lossy(&out.stdout);
    let flags: Vec<&str> = exec.split_whitespace().filter(|w| w.starts_with("--")).collect();
    assert!(flags.contains(&"--rootless"), "{exec}");
    for f in flags {
        assert!(help.contains(&format!("{f} ")) || help.contains(&format!("{f}[")), "weft run has no {f}: {exec}");
    }
}

#[test]
fn daemonset_probes_use_the_health_port_it_sets() {
    let ds = read("deploy/daemonset.yaml");
    let port = ds
        .split("name: WEFT_HEALTHZ_PORT")
        .nth(1)
        .and_then(|rest| rest.split("value: \"").nth(1))
        .and_then(|v| v.split('"').next())
        .expect("WEFT_HEALTHZ_PORT value");
    for path in ["/healthz", "/readyz"] {
        let probe = ds.split(&format!("path: {path}")).nth(1).expect(path);
        let probe_port = probe.lines().find_map(|l| l.trim().strip_prefix("port: ")).expect("probe port");
        assert_eq!(probe_port, port, "{path}");
    }
    for needle in [
        "hostNetwork: true",
        "/dev/net/tun",
        "path: /run/weft",
        "path: /var/lib/weft",
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "NET_ADMIN",
        "secretName: weft-etcd-tls",
        "seccompProfile",
    ] {
        assert!(ds.contains(needle), "daemonset.yaml lacks {needle}");
    }
}

#[test]
fn containerfile_copies_what_exists_and_builds_both_binaries() {
    let cf = read("deploy/Containerfile");
    assert!(cf.contains("cargo build --release --locked --bins"), "{cf}");
    for bin in ["weft", "weft-cni"] {
        assert!(cf.contains(&format!("target/release/{bin} /out/{bin}")), "{bin}");
    }
    for line in cf.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from=")) {
        let src = line.split_whitespace().nth(1).expect("COPY source");
        if src != "." {
            assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(src).exists(), "{line}: {src} does not exist");
        }
    }
    let ds = read("deploy/daemonset.yaml");
    assert!(
        ds.contains("/usr/local/share/weft/10-weft.conflist") && cf.contains("/usr/local/share/weft/10-weft.conflist")
    );
}
