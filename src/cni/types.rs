//! The CNI wire types: spec versions, the network configuration a runtime passes on stdin, the
//! result printed on success and the error printed on failure, with each result converted to
//! exactly the version the runtime asked for (CNI SPEC.md, "Result Types" and "Error").
//!
//! What differs between the versions weft speaks, and how a result is written for each:
//!
//! | field                                                       | 0.3.0 0.3.1 0.4.0 | 1.0.0 | 1.1.0 |
//! |-------------------------------------------------------------|-------------------|-------|-------|
//! | `ips[].version` (`"4"`/`"6"`)                                | written           | –     | –     |
//! | `interfaces[].mtu`, `.socketPath`, `.pciID`                  | –                 | –     | kept  |
//! | `routes[].mtu`, `.advmss`, `.priority`, `.table`, `.scope`   | –                 | –     | kept  |
//!
//! CHECK exists from 0.4.0 on, GC and STATUS from 1.1.0 on.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A CNI spec version weft implements.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum CniVersion {
    /// 0.3.0: the first version with `interfaces` and `ips[].interface`.
    V0_3_0,
    /// 0.3.1: the same result format as 0.3.0 (flannel's manifests still say this).
    V0_3_1,
    /// 0.4.0: adds CHECK and `prevResult` on DEL.
    V0_4_0,
    /// 1.0.0: drops `ips[].version`.
    V1_0_0,
    /// 1.1.0: adds STATUS, GC, interface `mtu`/`socketPath`/`pciID` and route attributes.
    V1_1_0,
}

impl CniVersion {
    /// Every version weft answers in, oldest first.
    pub const ALL: [Self; 5] = [Self::V0_3_0, Self::V0_3_1, Self::V0_4_0, Self::V1_0_0, Self::V1_1_0];

    /// The newest version, which weft implements fully.
    pub const LATEST: Self = Self::V1_1_0;

    /// The version named by `s`, exactly as the spec spells it (`"1.0.0"`, not `"1.0"`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The spec's spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// Whether CHECK may be called with a configuration of this version (0.4.0 and later).
    pub fn allows_check(self) -> bool {
        self >= Self::V0_4_0
    }

    /// Whether GC and STATUS may be called with a configuration of this version (1.1.0).
    pub fn allows_gc_and_status(self) -> bool {
        self >= Self::V1_1_0
    }

    /// Whether results carry `ips[].version` (before 1.0.0).
    pub fn ips_carry_version(self) -> bool {
        self < Self::V1_0_0
    }

    /// Whether results may carry the 1.1.0 interface and route attributes.
    pub fn has_1_1_attributes(self) -> bool {
        self >= Self::V1_1_0
    }

    /// The supported versions as the spec lists them in VERSION's answer.
    pub fn supported() -> Vec<&'static str> {
        Self::ALL.iter().map(|v| v.as_str()).collect()
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CNI error as printed on stdout: `{"cniVersion","code","msg","details"}`, with a non-zero
/// exit. Codes below 100 are the spec's; 100 and up are weft's own (see the constants).
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[error("{msg} (code {code})")]
pub struct CniError {
    /// The error code.
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// Longer details, possibly empty.
    pub details: String,
}

impl CniError {
    /// The configuration's `cniVersion` is not one weft speaks, or the command needs a newer one.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A field weft does not support; the message carries the key and the value.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// A CNI environment variable is missing or invalid; the message names it.
    pub const INVALID_ENV: u32 = 4;
    /// stdin could not be read.
    pub const IO_FAILURE: u32 = 5;
    /// stdin (or `prevResult`) is not the JSON expected.
    pub const DECODE: u32 = 6;
    /// The network configuration is invalid; the message names the field.
    pub const INVALID_CONFIG: u32 = 7;
    /// `CNI_NETNS` cannot be opened or is not a network namespace (libcni's `ErrInvalidNetNS`).
    pub const INVALID_NETNS: u32 = 8;
    /// Transient: the weft daemon is not reachable or not ready yet; retry.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// A netlink request (links, addresses, routes) or a host setting failed.
    pub const NETLINK: u32 = 100;
    /// ADD: the interface to create already exists (in the container, or its host end).
    pub const INTERFACE_EXISTS: u32 = 101;
    /// ADD: the node's pod subnet has no free address.
    pub const ADDRESS_EXHAUSTED: u32 = 102;
    /// The weft daemon refused or failed the request for a reason other than readiness.
    pub const DAEMON: u32 = 103;
    /// CHECK: the live state differs from `prevResult` or from the daemon's reservation.
    pub const CHECK_FAILED: u32 = 104;

    /// An error with a code and a message.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: String::new() }
    }

    /// Adds details.
    #[must_use]
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The JSON the spec wants on stdout, tagged with `version`.
    pub fn to_json(&self, version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let wire = Wire { cni_version: version, code: self.code, msg: &self.msg, details: &self.details };
        serde_json::to_string(&wire)
            .unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"internal error\"}}", self.code))
    }
}

/// Why stdin is not a usable network configuration.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum ConfError {
    /// stdin is not JSON at all.
    #[error("stdin: not a JSON network configuration: {0}")]
    NotJson(String),
    /// `cniVersion` is absent.
    #[error("cniVersion: missing from the network configuration")]
    NoVersion,
    /// `cniVersion` names a version weft does not speak.
    #[error("cniVersion: incompatible CNI version {0:?}")]
    Incompatible(String),
    /// The command needs a newer `cniVersion`.
    #[error("cniVersion: {version} does not allow {command} (needs {needs} or later)")]
    TooOldFor {
        /// The configuration's version.
        version: CniVersion,
        /// The command.
        command: &'static str,
        /// The first version that has it.
        needs: CniVersion,
    },
    /// A field has the wrong type or a required field is missing.
    #[error("network configuration: {0}")]
    Shape(String),
    /// A field's value is not acceptable.
    #[error("{field}: {value:?} {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A field weft does not support.
    #[error("{field}: {value} is not supported: {reason}")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// Its value, as JSON.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// `prevResult` does not parse as a CNI result.
    #[error("prevResult: not a CNI result: {0}")]
    PrevResult(String),
}

impl From<ConfError> for CniError {
    fn from(e: ConfError) -> Self {
        let code = match &e {
            ConfError::NotJson(_) | ConfError::PrevResult(_) => CniError::DECODE,
            ConfError::Incompatible(_) | ConfError::TooOldFor { .. } => CniError::INCOMPATIBLE_VERSION,
            ConfError::Unsupported { .. } => CniError::UNSUPPORTED_FIELD,
            ConfError::NoVersion | ConfError::Shape(_) | ConfError::Invalid { .. } => CniError::INVALID_CONFIG,
        };
        let details = match &e {
            ConfError::Incompatible(_) => format!("weft supports {}", CniVersion::supported().join(", ")),
            _ => String::new(),
        };
        CniError::new(code, e.to_string()).with_details(details)
    }
}

/// The daemon's API socket when the configuration names none.
pub const DEFAULT_SOCKET: &str = "/run/weft/weft.sock";

/// The network configuration for one plugin invocation, as the runtime writes it on stdin.
/// Unknown keys are accepted and ignored (the spec lets a plugin reject them, but runtimes add
/// their own). It serialises back to the JSON it was read from, less unknown keys and absent
/// fields, so an accepted configuration round-trips (the `cni_stdin` fuzz property).
#[derive(Clone, Debug, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The version the runtime chose; the result is written in it.
    pub cni_version: String,
    /// The network's name.
    pub name: String,
    /// The plugin type (the binary's name in `CNI_PATH`).
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// weft's own field: the daemon's API socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// weft's own field: where DEL records a release the daemon cannot be reached for, so the
    /// daemon frees the address when it is back (the daemon's `pending_release_dir`).
    #[serde(default)]
    pub pending_release_dir: Option<PathBuf>,
    /// DNS settings copied into the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// The previous plugin's result (chained ADD; CHECK and DEL get the final result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    /// Capability arguments from the runtime; weft declares none and ignores them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_config: Option<Value>,
    /// The conflist's `args`; ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// An IPAM section: not supported, weft's daemon allocates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<Value>,
    /// GC: the attachments still alive (the current name).
    #[serde(default, rename = "cni.dev/valid-attachments", skip_serializing_if = "Option::is_none")]
    pub valid_attachments: Option<Vec<GcAttachment>>,
    /// GC: the attachments still alive (the spec-v1.1.0 tag's name; libcni sends both).
    #[serde(default, rename = "cni.dev/attachments", skip_serializing_if = "Option::is_none")]
    pub attachments: Option<Vec<GcAttachment>>,
}

/// One entry of GC's valid-attachment lists.
#[derive(Clone, Debug, Deserialize, Eq, Hash, Ord, PartialEq, PartialOrd, Serialize)]
pub struct GcAttachment {
    /// `CNI_CONTAINERID` of the attachment.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME` of the attachment.
    pub ifname: String,
}

/// `name` of a network: starts with a letter or digit, then letters, digits, `_`, `.`, `-`
/// (libcni `ValidateNetworkName`).
fn valid_network_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl NetConf {
    /// The `cniVersion` of `stdin`, if it is JSON carrying one that weft speaks; for tagging
    /// errors that happen before (or while) the configuration is parsed.
    pub fn version_hint(stdin: &[u8]) -> Option<CniVersion> {
        let v: Value = serde_json::from_slice(stdin).ok()?;
        CniVersion::parse(v.get("cniVersion")?.as_str()?)
    }

    /// Parses and validates stdin: JSON first (code 6), then `cniVersion` (1), then the shape
    /// and the fields (7, or 2 for an `ipam` section).
    ///
    /// # Errors
    /// [`ConfError`] naming the field.
    pub fn parse(stdin: &[u8]) -> Result<(Self, CniVersion), ConfError> {
        let raw: Value = serde_json::from_slice(stdin).map_err(|e| ConfError::NotJson(e.to_string()))?;
        let version = match raw.get("cniVersion") {
            None | Some(Value::Null) => return Err(ConfError::NoVersion),
            Some(Value::String(s)) => CniVersion::parse(s).ok_or_else(|| ConfError::Incompatible(s.clone()))?,
            Some(other) => return Err(ConfError::Incompatible(other.to_string())),
        };
        let conf: Self = serde_json::from_value(raw).map_err(|e| ConfError::Shape(e.to_string()))?;
        conf.validate()?;
        Ok((conf, version))
    }

    fn validate(&self) -> Result<(), ConfError> {
        if !valid_network_name(&self.name) {
            return Err(ConfError::Invalid {
                field: "name",
                value: self.name.clone(),
                reason: "must start with a letter or digit and contain only letters, digits, '_', '.' and '-'",
            });
        }
        // CVE-2021-20206: the runtime executes `type` from CNI_PATH; a path in it is an attack.
        if self.plugin_type.is_empty()
            || self.plugin_type.contains(['/', '\\', '\0'])
            || self.plugin_type == "."
            || self.plugin_type == ".."
        {
            return Err(ConfError::Invalid {
                field: "type",
                value: self.plugin_type.clone(),
                reason: "must be a plain binary name without path separators",
            });
        }
        if let Some(s) = &self.socket {
            if !s.is_absolute() {
                return Err(ConfError::Invalid {
                    field: "socket",
                    value: s.display().to_string(),
                    reason: "must be an absolute path to the weft daemon's API socket",
                });
            }
        }
        if let Some(ipam) = &self.ipam {
            return Err(ConfError::Unsupported {
                field: "ipam",
                value: ipam.to_string(),
                reason: "weft allocates pod addresses through its daemon; remove the ipam section",
            });
        }
        Ok(())
    }

    /// The daemon socket: `socket`, else [`DEFAULT_SOCKET`].
    pub fn socket(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    /// The pending-release directory: `pendingReleaseDir`, else the daemon's default
    /// ([`weft_ipam::PendingReleases::DEFAULT_DIR`]), so both sides agree unless told otherwise.
    pub fn pending_release_dir(&self) -> PathBuf {
        self.pending_release_dir.clone().unwrap_or_else(|| PathBuf::from(weft_ipam::PendingReleases::DEFAULT_DIR))
    }

    /// The previous result, parsed, if there is one (an empty object counts as none: DEL may
    /// get `"prevResult": {}`).
    ///
    /// # Errors
    /// [`ConfError::PrevResult`].
    pub fn prev_result(&self) -> Result<Option<CniResult>, ConfError> {
        match &self.prev_result {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) if m.is_empty() => Ok(None),
            Some(v) => CniResult::from_value(v).map(Some),
        }
    }

    /// GC: the union of `cni.dev/valid-attachments` and `cni.dev/attachments`, or `None` if the
    /// runtime sent neither (GC then refuses rather than freeing everything).
    pub fn gc_valid(&self) -> Option<BTreeSet<GcAttachment>> {
        if self.valid_attachments.is_none() && self.attachments.is_none() {
            return None;
        }
        Some(self.valid_attachments.iter().chain(self.attachments.iter()).flatten().cloned().collect())
    }
}

/// DNS settings (`dns` in the configuration and in the result); empty parts are omitted.
#[derive(Clone, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
pub struct Dns {
    /// Name servers, by address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// The local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// An interface in a result.
#[derive(Clone, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Its MTU (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for a container interface; absent for a host interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// vhost-user socket path (1.1.0); weft never sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    /// PCI id (1.1.0); weft never sets it.
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

impl Interface {
    /// Whether this is an interface inside a container (it has a non-empty `sandbox`).
    pub fn in_sandbox(&self) -> bool {
        self.sandbox.as_deref().is_some_and(|s| !s.is_empty())
    }
}

/// An address in a result.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct IpConfig {
    /// Before 1.0.0: `"4"` or `"6"`. Read and ignored; written from the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Index into `interfaces` of the interface holding the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// The address with its prefix length.
    pub address: IpNet,
    /// The default gateway for this address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

/// A route in a result.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Next hop; absent means "the default gateway".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Route MTU (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Advertised MSS (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// Metric (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Routing table (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Scope (1.1.0): 0 global, 253 link, 254 host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

/// A result, independent of the version; [`CniResult::to_json`] writes it for one.
#[derive(Clone, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
pub struct CniResult {
    /// Interfaces created or changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// Routes added in the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS settings.
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// Reads a result of any supported version (`ips[].version` is accepted and ignored; a
    /// `cniVersion` inside is ignored too: the runtime already converted it to the
    /// configuration's version).
    ///
    /// # Errors
    /// [`ConfError::PrevResult`].
    pub fn from_value(v: &Value) -> Result<Self, ConfError> {
        let r: Self = serde_json::from_value(v.clone()).map_err(|e| ConfError::PrevResult(e.to_string()))?;
        if let Some(bad) = r.ips.iter().find(|ip| ip.interface.is_some_and(|i| i >= r.interfaces.len())) {
            return Err(ConfError::PrevResult(format!(
                "ips entry {} points at interface {:?}, but there are {} interfaces",
                bad.address,
                bad.interface,
                r.interfaces.len()
            )));
        }
        Ok(r)
    }

    /// This result as `version` carries it: fields the version lacks are dropped, and before
    /// 1.0.0 every `ips` entry gets its `version`.
    pub fn for_version(&self, version: CniVersion) -> Self {
        let mut r = self.clone();
        for ip in &mut r.ips {
            ip.version =
                version.ips_carry_version().then(|| if ip.address.addr().is_ipv4() { "4" } else { "6" }.into());
        }
        if !version.has_1_1_attributes() {
            for i in &mut r.interfaces {
                i.mtu = None;
                i.socket_path = None;
                i.pci_id = None;
            }
            for route in &mut r.routes {
                route.mtu = None;
                route.advmss = None;
                route.priority = None;
                route.table = None;
                route.scope = None;
            }
        }
        r
    }

    /// The JSON printed on stdout: this result in `version`, tagged with it.
    pub fn to_json(&self, version: CniVersion) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Tagged<'a> {
            cni_version: &'a str,
            #[serde(flatten)]
            result: &'a CniResult,
        }
        let r = self.for_version(version);
        serde_json::to_string(&Tagged { cni_version: version.as_str(), result: &r })
            .unwrap_or_else(|_| format!("{{\"cniVersion\":\"{version}\"}}"))
    }

    /// Appends `ours` to this (previous) result, shifting its interface indices; the DNS
    /// settings of `ours` win where they are set.
    pub fn append(&mut self, ours: Self) {
        let offset = self.interfaces.len();
        self.interfaces.extend(ours.interfaces);
        self.ips.extend(ours.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        self.routes.extend(ours.routes);
        if ours.dns != Dns::default() {
            self.dns = ours.dns;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "weft0123456789a".into(),
                    mac: Some("aa:bb:cc:00:00:01".into()),
                    mtu: Some(1472),
                    ..Interface::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("aa:bb:cc:00:00:02".into()),
                    mtu: Some(1472),
                    sandbox: Some("/run/netns/pod".into()),
                    ..Interface::default()
                },
            ],
            ips: vec![IpConfig {
                version: None,
                interface: Some(1),
                address: "10.244.1.5/32".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.244.1.1".parse().unwrap()),
                mtu: None,
                advmss: None,
                priority: None,
                table: None,
                scope: Some(0),
            }],
            dns: Dns { nameservers: vec!["10.96.0.10".into()], ..Dns::default() },
        }
    }

    #[test]
    fn versions_parse_exactly() {
        for v in CniVersion::ALL {
            assert_eq!(CniVersion::parse(v.as_str()), Some(v));
        }
        for bad in ["1.0", "0.2.0", "0.1.0", "1.2.0", "", "v1.0.0"] {
            assert_eq!(CniVersion::parse(bad), None, "{bad}");
        }
        assert_eq!(CniVersion::supported(), ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
        assert!(!CniVersion::V0_3_1.allows_check() && CniVersion::V0_4_0.allows_check());
        assert!(!CniVersion::V1_0_0.allows_gc_and_status() && CniVersion::V1_1_0.allows_gc_and_status());
    }

    #[test]
    fn result_in_each_version() {
        let r = sample();
        for v in CniVersion::ALL {
            let json: Value = serde_json::from_str(&r.to_json(v)).unwrap();
            assert_eq!(json["cniVersion"], v.as_str());
            let ip = &json["ips"][0];
            assert_eq!(ip["address"], "10.244.1.5/32");
            assert_eq!(ip["gateway"], "10.244.1.1");
            assert_eq!(ip["interface"], 1);
            assert_eq!(json["interfaces"][1]["sandbox"], "/run/netns/pod");
            assert_eq!(json["interfaces"][1]["mac"], "aa:bb:cc:00:00:02");
            assert!(json["interfaces"][0].get("sandbox").is_none());
            assert_eq!(json["dns"]["nameservers"][0], "10.96.0.10");
            if v < CniVersion::V1_0_0 {
                assert_eq!(ip["version"], "4", "{v}");
            } else {
                assert!(ip.get("version").is_none(), "{v}");
            }
            if v == CniVersion::V1_1_0 {
                assert_eq!(json["interfaces"][1]["mtu"], 1472);
                assert_eq!(json["routes"][0]["scope"], 0);
            } else {
                assert!(json["interfaces"][1].get("mtu").is_none(), "{v}");
                assert!(json["routes"][0].get("scope").is_none(), "{v}");
            }
            // What we print parses back to the same result (modulo the version's fields).
            let back = CniResult::from_value(&json).unwrap();
            assert_eq!(back.for_version(v), r.for_version(v));
        }
    }

    #[test]
    fn reads_go_plugin_results() {
        // A 0.4.0 result as Go's types/040 writes it (bridge plugin), and a 1.0.0 one with an
        // ifb interface appended by the bandwidth plugin.
        let r040 = serde_json::json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "cni0", "mac": "0a:58:0a:f4:01:01"},
                           {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/var/run/netns/x"}],
            "ips": [{"version": "4", "interface": 1, "address": "10.244.1.5/24", "gateway": "10.244.1.1"}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        });
        let r = CniResult::from_value(&r040).unwrap();
        assert_eq!(r.ips[0].interface, Some(1));
        assert_eq!(r.routes[0].gw, None);
        let r100 = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "weftabc"}, {"name": "eth0", "sandbox": "/run/netns/x"}, {"name": "bwp1234", "mac": "x"}],
            "ips": [{"interface": 1, "address": "10.244.1.5/32", "gateway": "10.244.1.1"}],
            "dns": {"nameservers": ["1.1.1.1"], "domain": "cluster.local", "search": ["a"], "options": ["ndots:5"]}
        });
        let r = CniResult::from_value(&r100).unwrap();
        assert_eq!(r.interfaces.len(), 3);
        assert_eq!(r.dns.domain.as_deref(), Some("cluster.local"));
        let bad = serde_json::json!({"interfaces": [], "ips": [{"interface": 3, "address": "10.0.0.1/32"}]});
        assert!(matches!(CniResult::from_value(&bad), Err(ConfError::PrevResult(_))));
        assert!(CniResult::from_value(&serde_json::json!({"ips": [{"address": "nope"}]})).is_err());
    }

    #[test]
    fn append_shifts_interface_indices() {
        let mut prev = CniResult {
            interfaces: vec![Interface { name: "dummy".into(), ..Interface::default() }],
            ips: vec![IpConfig {
                version: None,
                interface: Some(0),
                address: "192.0.2.1/24".parse().unwrap(),
                gateway: None,
            }],
            ..CniResult::default()
        };
        prev.append(sample());
        assert_eq!(prev.interfaces.len(), 3);
        assert_eq!(prev.ips[0].interface, Some(0));
        assert_eq!(prev.ips[1].interface, Some(2));
        assert_eq!(prev.interfaces[2].name, "eth0");
        assert_eq!(prev.dns.nameservers, ["10.96.0.10"]);
    }

    fn conf(json: Value) -> Result<(NetConf, CniVersion), ConfError> {
        NetConf::parse(json.to_string().as_bytes())
    }

    #[test]
    fn parses_a_runtime_config() {
        let (c, v) = conf(serde_json::json!({
            "cniVersion": "1.1.0", "name": "weft-net", "type": "weft-cni",
            "socket": "/run/weft/n1.sock",
            "dns": {"nameservers": ["10.96.0.10"]},
            "runtimeConfig": {"portMappings": []},
            "args": {"cni": {"labels": []}},
            "someoneElsesKey": true,
            "prevResult": {"cniVersion": "1.1.0"}
        }))
        .unwrap();
        assert_eq!(v, CniVersion::V1_1_0);
        assert_eq!(c.socket(), PathBuf::from("/run/weft/n1.sock"));
        assert_eq!(c.dns.unwrap().nameservers, ["10.96.0.10"]);
        let (c, _) = conf(serde_json::json!({"cniVersion": "0.3.1", "name": "n", "type": "weft-cni"})).unwrap();
        assert_eq!(c.socket(), PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.prev_result().unwrap(), None);
    }

    #[test]
    fn config_errors_have_the_spec_codes() {
        let code = |j: Value| CniError::from(conf(j).unwrap_err()).code;
        let base = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
            let mut m = serde_json::json!({"cniVersion": "1.0.0", "name": "net", "type": "weft-cni"});
            if let Some(o) = m.as_object_mut() {
                f(o);
            }
            m
        };
        assert_eq!(CniError::from(NetConf::parse(b"{not json").unwrap_err()).code, 6);
        assert_eq!(CniError::from(NetConf::parse(b"").unwrap_err()).code, 6);
        assert_eq!(code(base(&|m| drop(m.remove("cniVersion")))), 7);
        assert_eq!(code(base(&|m| drop(m.insert("cniVersion".into(), "0.2.0".into())))), 1);
        assert_eq!(code(base(&|m| drop(m.insert("cniVersion".into(), 1.into())))), 1);
        assert_eq!(code(base(&|m| drop(m.remove("name")))), 7);
        assert_eq!(code(base(&|m| drop(m.insert("name".into(), "-bad".into())))), 7);
        assert_eq!(code(base(&|m| drop(m.insert("name".into(), "a/b".into())))), 7);
        assert_eq!(code(base(&|m| drop(m.insert("type".into(), "../../bin/sh".into())))), 7);
        assert_eq!(code(base(&|m| drop(m.insert("type".into(), "".into())))), 7);
        assert_eq!(code(base(&|m| drop(m.insert("socket".into(), "weft.sock".into())))), 7);
        assert_eq!(code(base(&|m| drop(m.insert("socket".into(), 5.into())))), 7);
        assert_eq!(code(base(&|m| drop(m.insert("ipam".into(), serde_json::json!({"type": "host-local"}))))), 2);
        let e = CniError::from(
            conf(base(&|m| drop(m.insert("ipam".into(), serde_json::json!({"type": "x"}))))).unwrap_err(),
        );
        assert!(e.msg.contains("ipam") && e.msg.contains("\"x\""), "{e}");
        let e = CniError::from(conf(base(&|m| drop(m.insert("cniVersion".into(), "9.9.9".into())))).unwrap_err());
        assert!(e.msg.contains("9.9.9") && e.details.contains("1.1.0"), "{e:?}");
        let bad_prev = conf(base(&|m| drop(m.insert("prevResult".into(), serde_json::json!({"ips": 5}))))).unwrap();
        assert_eq!(CniError::from(bad_prev.0.prev_result().unwrap_err()).code, 6);
    }

    #[test]
    fn gc_lists_are_merged_and_absence_is_not_empty() {
        let (c, _) = conf(serde_json::json!({"cniVersion": "1.1.0", "name": "n", "type": "weft-cni"})).unwrap();
        assert_eq!(c.gc_valid(), None);
        let (c, _) = conf(serde_json::json!({"cniVersion": "1.1.0", "name": "n", "type": "weft-cni",
            "cni.dev/valid-attachments": []}))
        .unwrap();
        assert_eq!(c.gc_valid().map(|s| s.len()), Some(0));
        let (c, _) = conf(serde_json::json!({"cniVersion": "1.1.0", "name": "n", "type": "weft-cni",
            "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}],
            "cni.dev/attachments": [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "eth0"}]}))
        .unwrap();
        let valid = c.gc_valid().unwrap();
        assert_eq!(valid.len(), 2);
        assert!(valid.contains(&GcAttachment { container_id: "b".into(), ifname: "eth0".into() }));
    }

    #[test]
    fn error_json_shape() {
        let e = CniError::new(CniError::TRY_AGAIN_LATER, "daemon not ready").with_details("lease is pending");
        let v: Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion": "1.1.0", "code": 11, "msg": "daemon not ready", "details": "lease is pending"})
        );
        let v: Value = serde_json::from_str(&CniError::new(4, "x").to_json("0.3.1")).unwrap();
        assert!(v.get("details").is_none());
    }
}
