//! The CNI environment: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS` and `CNI_PATH`, read through an injected `getenv` so tests need no process
//! environment, and validated per command as the CNI spec's (SPEC.md) table and libcni's `utils`
//! require, so that odd values cannot traverse paths in a store: the container id matches
//! `^[A-Za-z0-9][A-Za-z0-9_.\-]*$`, the interface name is 1–15 bytes, not `.`/`..`, without
//! `/`, `:` or whitespace, the netns is an absolute path. An empty variable counts as missing,
//! as in Go's skel.

use std::fmt;
use std::path::PathBuf;

use weft_ipam::{AttachmentError, ContainerId, IfName};

use super::types::CniError;

/// The operation the runtime asks for.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Command {
    /// Attach the container.
    Add,
    /// Detach it; idempotent.
    Del,
    /// Verify an attachment against `prevResult`.
    Check,
    /// Free what no valid attachment uses (1.1.0).
    Gc,
    /// Whether ADD can be served (1.1.0).
    Status,
    /// Which spec versions the plugin speaks.
    Version,
}

impl Command {
    /// The command named by `CNI_COMMAND`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            _ => return None,
        })
    }

    /// Its spelling in `CNI_COMMAND`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Gc => "GC",
            Self::Status => "STATUS",
            Self::Version => "VERSION",
        }
    }

    /// The variables the command cannot do without (CNI_PATH is tolerated missing: weft
    /// delegates to no other plugin).
    fn required(self) -> &'static [&'static str] {
        match self {
            Self::Add | Self::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Self::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Self::Gc | Self::Status | Self::Version => &[],
        }
    }

    /// Whether the command acts on one attachment (and so reads the per-attachment variables).
    fn per_attachment(self) -> bool {
        matches!(self, Self::Add | Self::Del | Self::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the environment is unusable. Every variant maps to CNI error code 4.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum ArgsError {
    /// `CNI_COMMAND` is not set.
    #[error("CNI_COMMAND: missing")]
    NoCommand,
    /// `CNI_COMMAND` is not a command.
    #[error("CNI_COMMAND: unknown command {0:?} (ADD, DEL, CHECK, GC, STATUS or VERSION)")]
    UnknownCommand(String),
    /// Variables the command requires are missing.
    #[error("required environment variables missing: {}", .0.join(", "))]
    Missing(Vec<&'static str>),
    /// `CNI_CONTAINERID` or `CNI_IFNAME` breaks the spec's rules.
    #[error(transparent)]
    Attachment(#[from] AttachmentError),
    /// `CNI_NETNS` is not an absolute path.
    #[error("CNI_NETNS: {0:?} is not an absolute path")]
    Netns(String),
    /// A `CNI_ARGS` entry is not `KEY=VALUE`.
    #[error("CNI_ARGS: {0:?} is not KEY=VALUE")]
    ArgsPair(String),
    /// A `CNI_ARGS` key weft does not know, without `IgnoreUnknown`.
    #[error("CNI_ARGS: unknown key {key:?} (value {value:?}); set IgnoreUnknown=1 to ignore it")]
    UnknownArg {
        /// The key.
        key: String,
        /// Its value.
        value: String,
    },
    /// `IgnoreUnknown` is not a boolean.
    #[error("CNI_ARGS: IgnoreUnknown={0:?} is not a boolean (1, true, 0, false)")]
    IgnoreUnknown(String),
}

impl From<ArgsError> for CniError {
    fn from(e: ArgsError) -> Self {
        CniError::new(CniError::INVALID_ENV, e.to_string())
    }
}

/// `CNI_ARGS` keys weft recognises: the ones kubelet and containerd send.
const KNOWN_ARGS: [&str; 5] =
    ["IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"];

/// The validated CNI environment of one invocation.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct CniArgs {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (ADD, DEL, CHECK).
    pub container_id: Option<ContainerId>,
    /// `CNI_NETNS` (ADD, CHECK; DEL when the runtime still has it).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (ADD, DEL, CHECK).
    pub ifname: Option<IfName>,
    /// `CNI_ARGS` as (key, value) pairs, in order.
    pub args: Vec<(String, String)>,
    /// `CNI_PATH`, split on `:`.
    pub path: Vec<PathBuf>,
}

impl CniArgs {
    /// Only `CNI_COMMAND`, for deciding early whether the rest matters (VERSION ignores it:
    /// libcni sends placeholders such as `CNI_NETNS=dummy`).
    ///
    /// # Errors
    /// [`ArgsError::NoCommand`], [`ArgsError::UnknownCommand`].
    pub fn command(getenv: &dyn Fn(&str) -> Option<String>) -> Result<Command, ArgsError> {
        let raw = getenv("CNI_COMMAND").filter(|s| !s.is_empty()).ok_or(ArgsError::NoCommand)?;
        Command::parse(&raw).ok_or(ArgsError::UnknownCommand(raw))
    }

    /// Reads and validates the environment for the command it names.
    ///
    /// # Errors
    /// [`ArgsError`], which names the variable.
    pub fn from_env(getenv: &dyn Fn(&str) -> Option<String>) -> Result<Self, ArgsError> {
        let command = Self::command(getenv)?;
        let get = |k: &str| getenv(k).filter(|s| !s.is_empty());
        let missing: Vec<&'static str> = command.required().iter().copied().filter(|k| get(k).is_none()).collect();
        if !missing.is_empty() {
            return Err(ArgsError::Missing(missing));
        }
        let path = get("CNI_PATH").map(|p| p.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect());
        let mut out = Self {
            command,
            container_id: None,
            netns: None,
            ifname: None,
            args: Vec::new(),
            path: path.unwrap_or_default(),
        };
        if !command.per_attachment() {
            return Ok(out);
        }
        out.container_id = get("CNI_CONTAINERID").map(|c| ContainerId::new(&c)).transpose()?;
        out.ifname = get("CNI_IFNAME").map(|i| IfName::new(&i)).transpose()?;
        out.netns = get("CNI_NETNS")
            .map(|n| {
                let p = PathBuf::from(&n);
                if p.is_absolute() { Ok(p) } else { Err(ArgsError::Netns(n)) }
            })
            .transpose()?;
        out.args = parse_cni_args(get("CNI_ARGS").as_deref().unwrap_or(""))?;
        Ok(out)
    }

    /// The value of a `CNI_ARGS` key, if given.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Container id and interface name; present after [`CniArgs::from_env`] for ADD, DEL and
    /// CHECK.
    ///
    /// # Errors
    /// Code 4 if either is missing.
    pub fn attachment(&self) -> Result<(&ContainerId, &IfName), CniError> {
        match (&self.container_id, &self.ifname) {
            (Some(c), Some(i)) => Ok((c, i)),
            _ => Err(ArgsError::Missing(vec!["CNI_CONTAINERID", "CNI_IFNAME"]).into()),
        }
    }

    /// The container's netns path; present after [`CniArgs::from_env`] for ADD and CHECK.
    ///
    /// # Errors
    /// Code 4 if missing.
    pub fn netns(&self) -> Result<&std::path::Path, CniError> {
        self.netns.as_deref().ok_or_else(|| ArgsError::Missing(vec!["CNI_NETNS"]).into())
    }
}

/// Parses `K=V;K=V` as Go's `types.LoadArgs` does: unknown keys are an error unless
/// `IgnoreUnknown` is true. Empty segments (a trailing `;`) are skipped.
fn parse_cni_args(raw: &str) -> Result<Vec<(String, String)>, ArgsError> {
    let mut pairs = Vec::new();
    for seg in raw.split(';').filter(|s| !s.is_empty()) {
        let Some((k, v)) = seg.split_once('=') else { return Err(ArgsError::ArgsPair(seg.to_owned())) };
        if k.is_empty() {
            return Err(ArgsError::ArgsPair(seg.to_owned()));
        }
        pairs.push((k.to_owned(), v.to_owned()));
    }
    let ignore_unknown = match pairs.iter().rev().find(|(k, _)| k == "IgnoreUnknown") {
        None => false,
        Some((_, v)) => match v.to_ascii_lowercase().as_str() {
            "1" | "true" => true,
            "0" | "false" => false,
            _ => return Err(ArgsError::IgnoreUnknown(v.clone())),
        },
    };
    if !ignore_unknown {
        if let Some((k, v)) = pairs.iter().find(|(k, _)| !KNOWN_ARGS.contains(&k.as_str())) {
            return Err(ArgsError::UnknownArg { key: k.clone(), value: v.clone() });
        }
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| m.get(k).cloned()
    }

    const ADD: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/pod1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
    ];

    fn with(
        base: &[(&'static str, &'static str)],
        k: &'static str,
        v: &'static str,
    ) -> Vec<(&'static str, &'static str)> {
        let mut out: Vec<_> = base.iter().copied().filter(|(key, _)| *key != k).collect();
        out.push((k, v));
        out
    }

    fn without(base: &[(&'static str, &'static str)], k: &str) -> Vec<(&'static str, &'static str)> {
        base.iter().copied().filter(|(key, _)| *key != k).collect()
    }

    #[test]
    fn add_reads_everything() {
        let a = CniArgs::from_env(&env(&ADD)).unwrap();
        assert_eq!(a.command, Command::Add);
        assert_eq!(a.container_id.as_ref().map(ContainerId::as_str), Some("abc123"));
        assert_eq!(a.ifname.as_ref().map(IfName::as_str), Some("eth0"));
        assert_eq!(a.netns, Some(PathBuf::from("/run/netns/pod1")));
        assert_eq!(a.path, [PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]);
        assert!(a.args.is_empty());
    }

    #[test]
    fn missing_variables_are_named() {
        let e = CniArgs::from_env(&env(&without(&without(&ADD, "CNI_NETNS"), "CNI_IFNAME"))).unwrap_err();
        assert_eq!(e, ArgsError::Missing(vec!["CNI_NETNS", "CNI_IFNAME"]));
        assert!(e.to_string().contains("CNI_NETNS, CNI_IFNAME"));
        assert_eq!(CniError::from(e).code, 4);
        // Empty is missing.
        let e = CniArgs::from_env(&env(&with(&ADD, "CNI_CONTAINERID", ""))).unwrap_err();
        assert_eq!(e, ArgsError::Missing(vec!["CNI_CONTAINERID"]));
        // DEL does without the netns; CNI_PATH is tolerated missing everywhere.
        let del = with(&without(&without(&ADD, "CNI_NETNS"), "CNI_PATH"), "CNI_COMMAND", "DEL");
        assert_eq!(CniArgs::from_env(&env(&del)).unwrap().netns, None);
        assert_eq!(CniArgs::from_env(&env(&[("CNI_COMMAND", "STATUS")])).unwrap().command, Command::Status);
        assert_eq!(CniArgs::from_env(&env(&[("CNI_COMMAND", "GC")])).unwrap().command, Command::Gc);
        assert_eq!(CniArgs::from_env(&env(&[])).unwrap_err(), ArgsError::NoCommand);
        assert!(matches!(CniArgs::from_env(&env(&[("CNI_COMMAND", "add")])), Err(ArgsError::UnknownCommand(_))));
    }

    #[test]
    fn version_ignores_placeholders() {
        let v = [
            ("CNI_COMMAND", "VERSION"),
            ("CNI_NETNS", "dummy"),
            ("CNI_IFNAME", "dummy"),
            ("CNI_PATH", "dummy"),
            ("CNI_CONTAINERID", "/../bad"),
        ];
        let a = CniArgs::from_env(&env(&v)).unwrap();
        assert_eq!(a.command, Command::Version);
        assert_eq!(a.netns, None);
    }

    #[test]
    fn container_id_ifname_and_netns_are_validated() {
        for bad in ["-abc", "a/b", "../x", "a b", "a;b", "_x", "ab:c"] {
            let e = CniArgs::from_env(&env(&with(&ADD, "CNI_CONTAINERID", bad))).unwrap_err();
            assert!(matches!(e, ArgsError::Attachment(AttachmentError::ContainerId { .. })), "{bad}: {e:?}");
            assert!(e.to_string().starts_with("CNI_CONTAINERID"), "{e}");
        }
        for ok in ["a", "A.b-c_d", "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"] {
            assert!(CniArgs::from_env(&env(&with(&ADD, "CNI_CONTAINERID", ok))).is_ok(), "{ok}");
        }
        for bad in [".", "..", "a/b", "eth:0", "eth 0", "a\tb", "sixteen-chars-xx"] {
            let e = CniArgs::from_env(&env(&with(&ADD, "CNI_IFNAME", bad))).unwrap_err();
            assert!(matches!(e, ArgsError::Attachment(AttachmentError::IfName { .. })), "{bad}: {e:?}");
        }
        assert!(CniArgs::from_env(&env(&with(&ADD, "CNI_IFNAME", "fifteen-chars-x"))).is_ok());
        let e = CniArgs::from_env(&env(&with(&ADD, "CNI_NETNS", "run/netns/x"))).unwrap_err();
        assert_eq!(e, ArgsError::Netns("run/netns/x".into()));
        assert_eq!(CniError::from(e).code, 4);
    }

    #[test]
    fn cni_args_follow_load_args() {
        let k8s = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u;FOO=bar";
        let a = CniArgs::from_env(&env(&with(&ADD, "CNI_ARGS", k8s))).unwrap();
        assert_eq!(a.arg("K8S_POD_NAME"), Some("web-0"));
        assert_eq!(a.arg("FOO"), Some("bar"));
        // Known keys need no IgnoreUnknown; unknown ones do, and the error names key and value.
        assert!(CniArgs::from_env(&env(&with(&ADD, "CNI_ARGS", "K8S_POD_NAME=x;"))).is_ok());
        let e = CniArgs::from_env(&env(&with(&ADD, "CNI_ARGS", "K8S_POD_NAME=x;IP=10.244.1.9"))).unwrap_err();
        assert_eq!(e, ArgsError::UnknownArg { key: "IP".into(), value: "10.244.1.9".into() });
        assert!(CniArgs::from_env(&env(&with(&ADD, "CNI_ARGS", "IgnoreUnknown=true;IP=1"))).is_ok());
        assert!(CniArgs::from_env(&env(&with(&ADD, "CNI_ARGS", "IgnoreUnknown=0;IP=1"))).is_err());
        assert!(matches!(
            CniArgs::from_env(&env(&with(&ADD, "CNI_ARGS", "IgnoreUnknown=maybe"))),
            Err(ArgsError::IgnoreUnknown(_))
        ));
        assert!(matches!(CniArgs::from_env(&env(&with(&ADD, "CNI_ARGS", "novalue"))), Err(ArgsError::ArgsPair(_))));
        assert!(matches!(CniArgs::from_env(&env(&with(&ADD, "CNI_ARGS", "=v"))), Err(ArgsError::ArgsPair(_))));
        // A value may contain '='.
        let a = CniArgs::from_env(&env(&with(&ADD, "CNI_ARGS", "IgnoreUnknown=1;X=a=b"))).unwrap();
        assert_eq!(a.arg("X"), Some("a=b"));
    }
}
