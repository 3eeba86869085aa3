//! The CNI plugin, `weft-cni`: attaches pods to the weft overlay. It speaks CNI spec 1.1.0 and
//! 1.0.0 and answers 0.3.0, 0.3.1 and 0.4.0 configurations in their own result format.
//!
//! One invocation, checked in the order Go's `skel` uses:
//! 0. [`main`] only: no `CNI_COMMAND` at all (a person running the binary) prints the
//!    plugin's name and version and the protocol versions it speaks on stderr and exits 0,
//!    without reading stdin, as the reference plugins do (skel's `about`: `CNI bridge plugin
//!    v1.4.0` / `CNI protocol versions supported: …`). [`run`] itself keeps answering code 4,
//!    which is what a runtime that forgot the variable should see.
//! 1. `CNI_COMMAND` (code 4 if missing or unknown). VERSION is answered right away, whatever
//!    the other variables hold (libcni sends placeholders).
//! 2. The environment the command needs ([`args`], code 4).
//! 3. stdin (code 5), then the configuration ([`types::NetConf`]: 6 not JSON, 1 unsupported
//!    `cniVersion`, 7 invalid, 2 unsupported field).
//! 4. Whether the version has the command: CHECK from 0.4.0, GC and STATUS from 1.1.0 (1).
//! 5. The command: [`add`], [`del`], [`check`], [`gc`], [`status`].
//!
//! Success prints the result (ADD) or nothing; failure prints the spec's error JSON on stdout
//! and exits 1. Addresses come from the weft daemon over its API socket ([`ipam`]); the
//! container side is configured over netlink from a thread inside the container's namespace
//! ([`netns`], [`veth`]).

pub mod add;
pub mod args;
pub mod check;
pub mod del;
#[doc(hidden)]
pub mod fuzzing;
pub mod gc;
pub mod ipam;
pub mod netns;
pub mod status;
pub mod sysctl;
pub mod types;
pub mod veth;

use std::io::{self, Read, Write};
use std::time::SystemTime;

use args::{CniArgs, Command};
use types::{CniError, CniVersion, ConfError, NetConf};

/// What one invocation prints on stdout and exits with.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Outcome {
    /// The JSON to print (empty: print nothing).
    pub stdout: String,
    /// The process exit code: 0, or 1 with an error on stdout.
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: String) -> Self {
        Self { stdout, exit_code: 0 }
    }

    fn error(e: &CniError, version: &str) -> Self {
        Self { stdout: e.to_json(version), exit_code: 1 }
    }
}

/// The plugin's name and version and the protocol versions it speaks, in the reference
/// plugins' shape (containernetworking/plugins `pkg/utils/buildversion`), when `CNI_COMMAND`
/// is unset or empty; `None` when there is a command to run.
pub fn about_if_no_command(getenv: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    getenv("CNI_COMMAND").is_none_or(|c| c.is_empty()).then(|| {
        format!(
            "CNI weft-cni plugin v{}\nCNI protocol versions supported: {}",
            env!("CARGO_PKG_VERSION"),
            CniVersion::supported().join(", ")
        )
    })
}

/// The plugin's entry point: reads the process environment and stdin, runs, prints, and
/// returns the exit code.
pub fn main() -> i32 {
    if let Some(text) = about_if_no_command(&|k: &str| std::env::var(k).ok()) {
        // As skel: for a person at a terminal, so stderr, exit 0, and stdin is never read.
        let _ = writeln!(io::stderr().lock(), "{text}");
        return 0;
    }
    let mut input = Vec::new();
    let stdin = io::stdin().read_to_end(&mut input).map(|_| input);
    let getenv = |k: &str| std::env::var(k).ok();
    let out = run(&getenv, stdin, SystemTime::now());
    if !out.stdout.is_empty() {
        let mut stdout = io::stdout().lock();
        // Nothing can be reported if stdout itself is gone; the exit code still tells.
        let _ = writeln!(stdout, "{}", out.stdout);
        let _ = stdout.flush();
    }
    out.exit_code
}

/// One invocation with an injected environment, stdin and clock.
pub fn run(getenv: &dyn Fn(&str) -> Option<String>, stdin: io::Result<Vec<u8>>, now: SystemTime) -> Outcome {
    let hint = stdin.as_deref().ok().and_then(NetConf::version_hint).unwrap_or(CniVersion::LATEST);
    let command = match CniArgs::command(getenv) {
        Ok(c) => c,
        Err(e) => return Outcome::error(&e.into(), hint.as_str()),
    };
    if command == Command::Version {
        return Outcome::ok(version_info(stdin.as_deref().unwrap_or_default()));
    }
    let args = match CniArgs::from_env(getenv) {
        Ok(a) => a,
        Err(e) => return Outcome::error(&e.into(), hint.as_str()),
    };
    let stdin = match stdin {
        Ok(s) => s,
        Err(e) => {
            let e = CniError::new(CniError::IO_FAILURE, format!("stdin: cannot read the network configuration: {e}"));
            return Outcome::error(&e, hint.as_str());
        }
    };
    let (conf, version) = match NetConf::parse(&stdin) {
        Ok(c) => c,
        Err(e) => return Outcome::error(&e.into(), hint.as_str()),
    };
    match dispatch(&args, &conf, version, now) {
        Ok(out) => Outcome::ok(out),
        Err(e) => Outcome::error(&e, version.as_str()),
    }
}

/// Steps 4 and 5.
fn dispatch(args: &CniArgs, conf: &NetConf, version: CniVersion, now: SystemTime) -> Result<String, CniError> {
    let too_old = |needs| ConfError::TooOldFor { version, command: args.command.as_str(), needs };
    match args.command {
        Command::Add => add::run(args, conf, now).map(|r| r.to_json(version)),
        Command::Del => del::run(args, conf).map(|()| String::new()),
        Command::Check if !version.allows_check() => Err(too_old(CniVersion::V0_4_0).into()),
        Command::Check => check::run(args, conf).map(|()| String::new()),
        Command::Gc | Command::Status if !version.allows_gc_and_status() => Err(too_old(CniVersion::V1_1_0).into()),
        Command::Gc => gc::run(conf, now).map(|()| String::new()),
        Command::Status => status::run(conf).map(|()| String::new()),
        Command::Version => Ok(version_info(&[])),
    }
}

/// VERSION's answer: the input's `cniVersion` echoed (the spec says so; the latest when there
/// is none) and every version weft speaks.
fn version_info(stdin: &[u8]) -> String {
    let asked = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(|s| s.as_str()).map(str::to_owned))
        .filter(|s| !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
    let v = serde_json::json!({
        "cniVersion": asked.as_deref().unwrap_or(CniVersion::LATEST.as_str()),
        "supportedVersions": CniVersion::supported(),
    });
    v.to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::Value;

    use super::*;

    fn invoke(env: &[(&str, &str)], stdin: &str) -> (Value, i32) {
        let m: HashMap<String, String> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let getenv = move |k: &str| m.get(k).cloned();
        let out = run(&getenv, Ok(stdin.as_bytes().to_vec()), SystemTime::UNIX_EPOCH);
        let json = if out.stdout.is_empty() { Value::Null } else { serde_json::from_str(&out.stdout).unwrap() };
        (json, out.exit_code)
    }

    const CONF: &str =
        r#"{"cniVersion":"1.1.0","name":"weft","type":"weft-cni","socket":"/nonexistent/weft-cni-unit.sock"}"#;

    #[test]
    fn version_answers_with_placeholders_and_echoes_the_input() {
        let env = [("CNI_COMMAND", "VERSION"), ("CNI_NETNS", "dummy"), ("CNI_IFNAME", "dummy"), ("CNI_PATH", "dummy")];
        let (v, code) = invoke(&env, r#"{"cniVersion":"1.0.0"}"#);
        assert_eq!(code, 0);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["supportedVersions"], serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
        let (v, code) = invoke(&env, "");
        assert_eq!((v["cniVersion"].as_str(), code), (Some("1.1.0"), 0));
    }

    /// `/usr/lib/cni/bridge` with no environment prints "CNI bridge plugin version unknown" and
    /// "CNI protocol versions supported: 0.1.0, …": the same two lines, for weft's versions.
    #[test]
    fn no_command_is_answered_with_the_plugin_and_its_versions() {
        let text = about_if_no_command(&|_: &str| None).expect("about without CNI_COMMAND");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0], format!("CNI weft-cni plugin v{}", env!("CARGO_PKG_VERSION")));
        assert_eq!(lines[1], "CNI protocol versions supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0");
        assert!(about_if_no_command(&|_: &str| Some(String::new())).is_some(), "empty is unset, as skel");
        assert!(about_if_no_command(&|_: &str| Some("ADD".into())).is_none());
    }

    #[test]
    fn env_errors_are_code_4_tagged_with_the_config_version() {
        let (v, code) = invoke(&[], CONF);
        assert_eq!((v["code"].as_u64(), code), (Some(4), 1));
        assert!(v["msg"].as_str().unwrap().contains("CNI_COMMAND"));
        let (v, _) = invoke(&[("CNI_COMMAND", "ADD")], r#"{"cniVersion":"0.4.0","name":"n","type":"t"}"#);
        assert_eq!(v["code"], 4);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert!(v["msg"].as_str().unwrap().contains("CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME"), "{v}");
        let bad_id = [("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "../../etc"), ("CNI_IFNAME", "eth0")];
        assert_eq!(invoke(&bad_id, CONF).0["code"], 4);
    }

    #[test]
    fn config_errors_come_before_the_command() {
        let env = [("CNI_COMMAND", "STATUS")];
        assert_eq!(invoke(&env, "nope").0["code"], 6);
        assert_eq!(invoke(&env, r#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#).0["code"], 1);
        assert_eq!(invoke(&env, r#"{"cniVersion":"1.1.0","type":"t"}"#).0["code"], 7);
    }

    #[test]
    fn commands_need_their_versions() {
        let check =
            [("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "c"), ("CNI_NETNS", "/run/netns/x"), ("CNI_IFNAME", "eth0")];
        let (v, _) = invoke(&check, r#"{"cniVersion":"0.3.1","name":"n","type":"weft-cni"}"#);
        assert_eq!(v["code"], 1);
        assert!(v["msg"].as_str().unwrap().contains("CHECK"), "{v}");
        for cmd in ["GC", "STATUS"] {
            let (v, _) = invoke(&[("CNI_COMMAND", cmd)], r#"{"cniVersion":"1.0.0","name":"n","type":"weft-cni"}"#);
            assert_eq!(v["code"], 1, "{cmd}: {v}");
        }
    }

    #[test]
    fn status_without_a_daemon_is_50() {
        let (v, code) = invoke(&[("CNI_COMMAND", "STATUS")], CONF);
        assert_eq!((v["code"].as_u64(), code), (Some(50), 1), "{v}");
        assert!(v["msg"].as_str().unwrap().contains("weft-cni-unit.sock"), "{v}");
    }

    #[test]
    fn gc_without_a_list_refuses() {
        let (v, _) = invoke(&[("CNI_COMMAND", "GC")], CONF);
        assert_eq!(v["code"], 7, "{v}");
        assert!(v["msg"].as_str().unwrap().contains("cni.dev/valid-attachments"));
    }

    #[test]
    fn check_without_prev_result_is_an_invalid_config() {
        let check =
            [("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "c"), ("CNI_NETNS", "/run/netns/x"), ("CNI_IFNAME", "eth0")];
        assert_eq!(invoke(&check, CONF).0["code"], 7);
    }

    #[test]
    fn add_with_a_missing_netns_is_8() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/nonexistent/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        let (v, _) = invoke(&add, CONF);
        assert_eq!(v["code"], 8, "{v}");
    }
}
