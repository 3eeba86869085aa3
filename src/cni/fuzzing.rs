//! The `cni_stdin` fuzz body (no input may crash the plugin; malformed input gets a CNI error with
//! a stable code): a plain function that the cargo-fuzz target in `fuzz/` calls and that
//! `tests/cni_corpus_replay.rs` replays over `tests/corpus/cni_stdin/` in every `cargo test`.
//!
//! Input: the network configuration as the runtime writes it on stdin, optionally followed by
//! a NUL byte and the environment, one `KEY=VALUE` per line. Properties, not only "no panic":
//! an accepted configuration satisfies the checks that keep it safe to act on (network name,
//! a plugin type without path separators, an absolute socket, no `ipam` section) and
//! round-trips; every refusal is a CNI error with the code its kind has, printed as the
//! spec's error JSON; an accepted environment satisfies the attachment rules (container id,
//! interface name, absolute netns, known `CNI_ARGS`) and round-trips; and a whole invocation
//! that stops before reaching the daemon answers exactly that error (or VERSION's answer).

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use serde_json::Value;

use super::args::{CniArgs, Command};
use super::types::{CniError, CniResult, CniVersion, ConfError, NetConf};

/// What [`cni_stdin`] saw: the configuration's fate and, with an environment, its fate.
#[derive(Debug, Eq, PartialEq)]
pub struct Seen {
    /// `Ok` with the version, or the CNI error code of the refusal.
    pub conf: Result<CniVersion, u32>,
    /// With an environment: `Ok` with the command, or the CNI error code (4).
    pub env: Option<Result<Command, u32>>,
}

/// See the module documentation.
pub fn cni_stdin(data: &[u8]) -> Seen {
    let (stdin, env) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let hint = NetConf::version_hint(stdin);
    let conf = match NetConf::parse(stdin) {
        Ok((conf, version)) => {
            check_accepted(stdin, &conf, version, hint);
            Ok(version)
        }
        Err(e) => {
            let want = match &e {
                ConfError::NotJson(_) | ConfError::PrevResult(_) => CniError::DECODE,
                ConfError::Incompatible(_) | ConfError::TooOldFor { .. } => CniError::INCOMPATIBLE_VERSION,
                ConfError::Unsupported { .. } => CniError::UNSUPPORTED_FIELD,
                ConfError::NoVersion | ConfError::Shape(_) | ConfError::Invalid { .. } => CniError::INVALID_CONFIG,
            };
            let ce = CniError::from(e);
            assert_eq!(ce.code, want, "{ce:?}");
            check_error_json(&ce, hint.unwrap_or(CniVersion::LATEST));
            Err(ce.code)
        }
    };
    let env = env.map(|env| check_env(stdin, env, &conf, hint));
    Seen { conf, env }
}

/// An accepted configuration: safe to act on, consistent, round-trips.
fn check_accepted(stdin: &[u8], conf: &NetConf, version: CniVersion, hint: Option<CniVersion>) {
    assert_eq!(hint, Some(version), "version_hint disagrees with parse");
    assert_eq!(conf.cni_version, version.as_str());
    let name = conf.name.as_bytes();
    assert!(name.first().is_some_and(u8::is_ascii_alphanumeric), "network name {:?}", conf.name);
    assert!(name.iter().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(b)), "network name {:?}", conf.name);
    let t = &conf.plugin_type;
    assert!(!t.is_empty() && !t.contains(['/', '\\', '\0']) && t != "." && t != "..", "plugin type {t:?}");
    assert!(conf.socket.as_deref().is_none_or(Path::is_absolute), "relative socket {:?}", conf.socket);
    assert!(conf.socket().is_absolute());
    assert!(conf.ipam.is_none(), "an ipam section was accepted");
    let json = serde_json::to_vec(conf).unwrap();
    let (again, v) = NetConf::parse(&json).unwrap_or_else(|e| {
        panic!(
            "{}: emitted configuration refused: {e} (from {})",
            String::from_utf8_lossy(&json),
            String::from_utf8_lossy(stdin)
        )
    });
    assert_eq!((&again, v), (conf, version), "configuration does not round-trip");
    match conf.prev_result() {
        Ok(Some(r)) => {
            for v in CniVersion::ALL {
                let out = r.to_json(v);
                let parsed: Value = serde_json::from_str(&out).unwrap();
                assert_eq!(parsed["cniVersion"], v.as_str());
                let back = CniResult::from_value(&parsed).unwrap_or_else(|e| panic!("{out}: {e}"));
                assert_eq!(back, r.for_version(v), "result does not round-trip as {v}: {out}");
                assert_eq!(back.for_version(v), back, "for_version is not idempotent");
            }
        }
        Ok(None) => {}
        Err(e) => assert_eq!(CniError::from(e).code, CniError::DECODE),
    }
    let _ = conf.gc_valid();
}

/// The spec's error JSON: `cniVersion`, `code`, `msg`, and `details` only when there are some.
fn check_error_json(e: &CniError, version: CniVersion) {
    assert!(!e.msg.is_empty(), "an error without a message: {e:?}");
    let v: Value = serde_json::from_str(&e.to_json(version.as_str())).unwrap();
    assert_eq!(v["cniVersion"], version.as_str());
    assert_eq!(v["code"], e.code);
    assert_eq!(v["msg"], e.msg.as_str());
    assert_eq!(v.get("details").and_then(Value::as_str), (!e.details.is_empty()).then_some(e.details.as_str()));
}

/// The environment lines, later keys winning, as `getenv` sees them.
fn environment(env: &[u8]) -> HashMap<String, String> {
    env.split(|&b| b == b'\n')
        .filter_map(|line| {
            let i = line.iter().position(|&b| b == b'=')?;
            Some((
                String::from_utf8_lossy(&line[..i]).into_owned(),
                String::from_utf8_lossy(&line[i + 1..]).into_owned(),
            ))
        })
        .collect()
}

/// The environment's properties, and the whole invocation where it stops before the daemon.
fn check_env(
    stdin: &[u8],
    env: &[u8],
    conf: &Result<CniVersion, u32>,
    hint: Option<CniVersion>,
) -> Result<Command, u32> {
    let map = environment(env);
    let getenv = |k: &str| map.get(k).cloned();
    let parsed = CniArgs::from_env(&getenv);
    let seen = match &parsed {
        Ok(args) => {
            check_args(args);
            Ok(args.command)
        }
        Err(e) => {
            let ce = CniError::from(e.clone());
            assert_eq!(ce.code, CniError::INVALID_ENV, "{ce:?}");
            check_error_json(&ce, hint.unwrap_or(CniVersion::LATEST));
            Err(ce.code)
        }
    };
    // `run` returns before dispatching (and so before any socket or netns) when the command is
    // VERSION, or the environment or the configuration is refused: run it whole then.
    let command = CniArgs::command(&getenv);
    let stops_early = matches!(command, Ok(Command::Version) | Err(_)) || parsed.is_err() || conf.is_err();
    if stops_early {
        let out = super::run(&getenv, Ok(stdin.to_vec()), SystemTime::UNIX_EPOCH);
        let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{}: {e}", out.stdout));
        if command == Ok(Command::Version) {
            assert_eq!(out.exit_code, 0, "{}", out.stdout);
            assert!(v["supportedVersions"].as_array().is_some_and(|a| a.len() == CniVersion::ALL.len()));
        } else {
            assert_eq!(out.exit_code, 1, "{}", out.stdout);
            let want = match (&command, &parsed, conf) {
                (Err(_), ..) | (_, Err(_), _) => CniError::INVALID_ENV,
                (_, _, Err(code)) => u64::from(*code).try_into().unwrap(),
                _ => unreachable!(),
            };
            assert_eq!(v["code"], want, "{}", out.stdout);
        }
    }
    seen
}

/// An accepted environment: the attachment rules hold (libcni's
/// `ValidateContainerID`/`ValidateInterfaceName`), and it round-trips.
fn check_args(args: &CniArgs) {
    if let Some(c) = &args.container_id {
        let b = c.as_str().as_bytes();
        assert!(b.first().is_some_and(u8::is_ascii_alphanumeric), "container id {c:?}");
        assert!(b.iter().all(|x| x.is_ascii_alphanumeric() || b"_.-".contains(x)), "container id {c:?}");
    }
    if let Some(i) = &args.ifname {
        let s = i.as_str();
        assert!(!s.is_empty() && s.len() <= 15 && s != "." && s != "..", "interface name {s:?}");
        assert!(!s.contains(['/', ':']) && !s.chars().any(char::is_whitespace), "interface name {s:?}");
    }
    assert!(args.netns.as_deref().is_none_or(Path::is_absolute));
    let mut env = HashMap::new();
    env.insert("CNI_COMMAND".to_owned(), args.command.as_str().to_owned());
    if let Some(c) = &args.container_id {
        env.insert("CNI_CONTAINERID".to_owned(), c.as_str().to_owned());
    }
    if let Some(i) = &args.ifname {
        env.insert("CNI_IFNAME".to_owned(), i.as_str().to_owned());
    }
    if let Some(n) = &args.netns {
        env.insert("CNI_NETNS".to_owned(), n.to_str().unwrap().to_owned());
    }
    let kv: Vec<String> = args.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.insert("CNI_ARGS".to_owned(), kv.join(";"));
    let path: Vec<&str> = args.path.iter().map(|p| p.to_str().unwrap()).collect();
    env.insert("CNI_PATH".to_owned(), path.join(":"));
    let again = CniArgs::from_env(&|k: &str| env.get(k).cloned()).unwrap_or_else(|e| panic!("{env:?}: {e}"));
    assert_eq!(&again, args, "environment does not round-trip");
}
