//! The cluster network config in flannel's net-conf JSON, with flannel's defaults and validation.
//!
//! Field names are flannel's exactly (`Network`, `SubnetLen`, `SubnetMin`, `SubnetMax`,
//! `Backend`, …; `pkg/subnet/config.go`), so one config serves weft and flannel nodes alike.
//! The defaults are flannel's `CheckNetworkConfig`: `SubnetLen` 24, or `Network`+2 when the
//! network is smaller than /22; `SubnetMin` the second subnet (the first is never leased);
//! `SubnetMax` the last one. Two deliberate differences, both louder rather than different:
//!
//! - A missing `Backend` means `{"Type":"udp"}`, which is what flannel's code does
//!   (`parseBackendType`) although its docs say vxlan; weft says so here instead of silently.
//! - Unknown fields are an error naming the field (flannel's Go decoder ignores them, and matches
//!   names case-insensitively), because a misspelt `Subnetlen` would otherwise give every node
//!   the wrong subnet size. Fields flannel knows but weft does not use (`EnableNFTables`,
//!   `Networks`, `IPv6Networks`) are accepted and written back unchanged.
//!
//! Three of flannel's vxlan `Backend` options change what a node does, so weft reads them
//! rather than carrying them along unread: `MTU` (the overlay MTU, honoured), `DirectRouting`
//! (peers on our L2 subnet are routed without encapsulation, honoured for vxlan) and `GBP`
//! (VXLAN Group Based Policy, which weft does not implement: `true` is refused). Accepting a
//! `GBP: true` silently would leave flannel peers expecting policy bits weft never sends.
//!
//! The fields are read one by one from a JSON object rather than through a derived
//! deserialiser so that every error names the field it is about.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};

use crate::subnet::SubnetRange;

/// flannel's default udp port (`backend/udp`).
pub const UDP_DEFAULT_PORT: u16 = 8285;
/// The Linux kernel's default VXLAN port, which flannel uses when `Port` is 0 or absent.
pub const VXLAN_DEFAULT_PORT: u16 = 8472;
/// WireGuard's port, and flannel's `wireguard` backend's `ListenPort` default.
pub const WIREGUARD_DEFAULT_PORT: u16 = 51820;
/// flannel's default VXLAN network identifier.
pub const VXLAN_DEFAULT_VNI: u32 = 1;

/// A validated cluster network config with flannel's defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkConfig {
    /// The whole cluster network (`Network`), e.g. `10.244.0.0/16`.
    pub network: Ipv4Net,
    /// Prefix length of each node's subnet (`SubnetLen`).
    pub subnet_len: u8,
    /// Lowest subnet address a node may lease (`SubnetMin`).
    pub subnet_min: Ipv4Addr,
    /// Highest subnet address a node may lease (`SubnetMax`).
    pub subnet_max: Ipv4Addr,
    /// The encapsulation every node of this network speaks (`Backend`).
    pub backend: BackendConfig,
    /// The IPv6 side when `EnableIPv6` is true. weft's overlay does not route IPv6 yet; the
    /// fields are validated as flannel does so that a dual-stack config is checked all the same.
    pub ipv6: Option<Ipv6Config>,
    /// Fields flannel defines that weft accepts but does not interpret (`EnableNFTables`,
    /// `Networks`, `IPv6Networks`, and the IPv6 fields while `EnableIPv6` is false), kept so that
    /// [`NetworkConfig::to_json`] writes them back.
    pub passthrough: Map<String, Value>,
}

/// The `Backend` object: which wire format the overlay uses.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendConfig {
    /// `Type`: `udp` or `vxlan`.
    pub kind: BackendKind,
    /// `Port` as written; `None` or `Some(0)` mean the backend's default (see [`Self::port`]).
    pub port: Option<u16>,
    /// `VNI` as written (vxlan only); `None` means 1.
    pub vni: Option<u32>,
    /// `DirectRouting` as written (vxlan only): peers whose PublicIP is directly reachable on
    /// our underlay subnet get a kernel route instead of encapsulation
    /// (flannel `pkg/backend/vxlan/vxlan_network.go`). `None` means false.
    pub direct_routing: Option<bool>,
    /// `GBP` as written; only `false` is accepted (weft does not implement VXLAN GBP).
    pub gbp: Option<bool>,
    /// `MTU` as written: the overlay MTU every node uses, capped by what its underlay carries.
    /// `None` (or 0 in the JSON, flannel's "automatic") means the underlay MTU minus the
    /// encapsulation overhead.
    pub mtu: Option<u16>,
    /// Other backend fields (`Learning`, …), kept verbatim.
    pub extra: Map<String, Value>,
}

/// The backends weft speaks.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum BackendKind {
    /// flannel's `udp`: the bare inner IPv4 packet in a UDP datagram.
    Udp,
    /// RFC 7348 VXLAN, interoperable with Linux vxlan and flannel's `vxlan`.
    Vxlan,
    /// WireGuard's wire format: authenticated and encrypted. Leases publish the node's
    /// `PublicKey` in BackendData, as flannel's `wireguard` backend does.
    WireGuard,
}

/// The IPv6 half of a dual-stack config (`IPv6Network`, `IPv6SubnetLen`, `IPv6SubnetMin/Max`).
#[derive(Clone, Debug, PartialEq)]
pub struct Ipv6Config {
    /// `IPv6Network`.
    pub network: Ipv6Net,
    /// `IPv6SubnetLen` (default 64, or `IPv6Network`+2 when the network is smaller than /62).
    pub subnet_len: u8,
    /// `IPv6SubnetMin` (default: the second subnet).
    pub subnet_min: Ipv6Addr,
    /// `IPv6SubnetMax` (default: the last subnet).
    pub subnet_max: Ipv6Addr,
}

/// Why a net-conf was rejected. Every message starts with the field it is about.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not a JSON object.
    #[error("network config is not a JSON object: {reason}")]
    NotJson {
        /// The parser's complaint.
        reason: String,
    },
    /// A field name flannel does not define (often a misspelling).
    #[error("{field}: unknown field{}", match hint { Some(h) => format!(" (did you mean {h}?)"), None => String::new() })]
    UnknownField {
        /// The field as written.
        field: String,
        /// The known field it matches case-insensitively, if any.
        hint: Option<&'static str>,
    },
    /// A required field is absent.
    #[error("{field}: missing (example: {example})")]
    Missing {
        /// The field.
        field: &'static str,
        /// What a valid value looks like.
        example: &'static str,
    },
    /// A field has the wrong JSON type.
    #[error("{field}: expected {expected}, found {found}")]
    WrongType {
        /// The field, e.g. `SubnetLen` or `Backend.Port`.
        field: String,
        /// The type wanted.
        expected: &'static str,
        /// The value found, as JSON.
        found: String,
    },
    /// A CIDR field did not parse.
    #[error("{field}: {value:?} is not an {family} CIDR (example: {example:?})")]
    NotACidr {
        /// The field.
        field: &'static str,
        /// The value as written.
        value: String,
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// A valid value.
        example: &'static str,
    },
    /// An address field did not parse.
    #[error("{field}: {value:?} is not an {family} address")]
    NotAnAddress {
        /// The field.
        field: &'static str,
        /// The value as written.
        value: String,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
    /// The network cannot hold the four subnets flannel requires.
    #[error("{field}: {network} is too small; the smallest useful network is /{max_prefix}")]
    NetworkTooSmall {
        /// `Network` or `IPv6Network`.
        field: &'static str,
        /// The network.
        network: String,
        /// The longest prefix allowed.
        max_prefix: u8,
    },
    /// SubnetLen leaves no room for subnets, or too little for pods.
    #[error("{field}: {len} must be between {min} and {max} for {network_field} {network}")]
    SubnetLenOutOfRange {
        /// `SubnetLen` or `IPv6SubnetLen`.
        field: &'static str,
        /// The value given.
        len: u64,
        /// Network prefix + 2 (at least four subnets, the first never leased).
        min: u8,
        /// 30 for IPv4 (a subnet needs a gateway and a pod), 126 for IPv6.
        max: u8,
        /// `Network` or `IPv6Network`.
        network_field: &'static str,
        /// The network.
        network: String,
    },
    /// SubnetMin or SubnetMax lies outside the network.
    #[error("{field}: {addr} is not inside {network_field} {network}")]
    OutsideNetwork {
        /// The field.
        field: &'static str,
        /// The address given.
        addr: String,
        /// `Network` or `IPv6Network`.
        network_field: &'static str,
        /// The network.
        network: String,
    },
    /// SubnetMin or SubnetMax is not the first address of a subnet.
    #[error("{field}: {addr} is not on a /{subnet_len} boundary")]
    NotAligned {
        /// The field.
        field: &'static str,
        /// The address given.
        addr: String,
        /// The subnet length it must align to.
        subnet_len: u8,
    },
    /// The range SubnetMin..=SubnetMax is empty.
    #[error("SubnetMin: {min} is above SubnetMax {max}")]
    EmptyRange {
        /// `SubnetMin`.
        min: Ipv4Addr,
        /// `SubnetMax`.
        max: Ipv4Addr,
    },
    /// weft needs the IPv4 side.
    #[error("EnableIPv4: false is not supported: weft's overlay needs an IPv4 Network")]
    Ipv4Disabled,
    /// A backend weft does not speak.
    #[error("Backend.Type: {value:?} is not supported by weft (supported: \"udp\", \"vxlan\")")]
    UnsupportedBackend {
        /// The type as written.
        value: String,
    },
    /// A VNI that does not fit VXLAN's 24 bits.
    #[error("Backend.VNI: {vni} does not fit in 24 bits (max 16777215)")]
    VniOutOfRange {
        /// The value given.
        vni: u64,
    },
    /// A port outside 0..=65535.
    #[error("Backend.Port: {port} is not a UDP port (0-65535)")]
    PortOutOfRange {
        /// The value given.
        port: u64,
    },
    /// An overlay MTU weft cannot use.
    #[error(
        "Backend.MTU: {mtu} must be between {MIN_OVERLAY_MTU} and 65535 (0 or absent: the underlay MTU minus the encapsulation overhead)"
    )]
    MtuOutOfRange {
        /// The value given.
        mtu: u64,
    },
    /// A flannel backend option weft does not implement, set to a value that would need it.
    #[error("{field}: {message}")]
    Unsupported {
        /// The field, e.g. `Backend.GBP`.
        field: &'static str,
        /// Why weft refuses it and what to do instead.
        message: &'static str,
    },
}

/// The smallest overlay MTU weft accepts (IPv4's minimum datagram size every host must take).
pub const MIN_OVERLAY_MTU: u16 = 576;

const KNOWN_FIELDS: [&str; 14] = [
    "Network",
    "SubnetLen",
    "SubnetMin",
    "SubnetMax",
    "EnableIPv4",
    "EnableIPv6",
    "IPv6Network",
    "IPv6SubnetLen",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "Backend",
    "EnableNFTables",
    "Networks",
    "IPv6Networks",
];
const IPV6_FIELDS: [&str; 4] = ["IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax"];
const PASSTHROUGH_FIELDS: [&str; 3] = ["EnableNFTables", "Networks", "IPv6Networks"];

impl NetworkConfig {
    /// A config for `network` with every other field at flannel's default and the given backend.
    ///
    /// # Errors
    /// As [`NetworkConfig::from_json`] for a network smaller than /28.
    pub fn with_defaults(network: Ipv4Net, backend: BackendKind) -> Result<Self, ConfigError> {
        let mut obj = Map::new();
        obj.insert("Network".into(), Value::String(network.to_string()));
        obj.insert("Backend".into(), serde_json::json!({ "Type": backend.as_str() }));
        Self::from_object(obj)
    }

    /// Parses and validates flannel's net-conf JSON, filling in flannel's defaults.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first offending field.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(obj)) => Self::from_object(obj),
            Ok(other) => Err(ConfigError::NotJson { reason: format!("found {}", json_kind(&other)) }),
            Err(e) => Err(ConfigError::NotJson { reason: e.to_string() }),
        }
    }

    fn from_object(mut obj: Map<String, Value>) -> Result<Self, ConfigError> {
        for field in obj.keys() {
            if !KNOWN_FIELDS.contains(&field.as_str()) {
                let hint = KNOWN_FIELDS.iter().copied().find(|k| k.eq_ignore_ascii_case(field));
                return Err(ConfigError::UnknownField { field: field.clone(), hint });
            }
        }
        let enable_ipv4 = take_bool(&mut obj, "EnableIPv4")?.unwrap_or(true);
        let enable_ipv6 = take_bool(&mut obj, "EnableIPv6")?.unwrap_or(false);
        if !enable_ipv4 {
            return Err(ConfigError::Ipv4Disabled);
        }
        let network = match take_str(&mut obj, "Network")? {
            Some(s) => parse_v4_cidr("Network", &s)?,
            None => return Err(ConfigError::Missing { field: "Network", example: "\"10.244.0.0/16\"" }),
        };
        let subnet_len = take_u64(&mut obj, "SubnetLen")?;
        let subnet_min = take_str(&mut obj, "SubnetMin")?.map(|s| parse_v4_addr("SubnetMin", &s)).transpose()?;
        let subnet_max = take_str(&mut obj, "SubnetMax")?.map(|s| parse_v4_addr("SubnetMax", &s)).transpose()?;
        let (subnet_len, subnet_min, subnet_max) = check_v4(network, subnet_len, subnet_min, subnet_max)?;

        let ipv6 = if enable_ipv6 { Some(Ipv6Config::from_object(&mut obj)?) } else { None };
        let backend = match obj.remove("Backend") {
            None | Some(Value::Null) => BackendConfig::udp(),
            Some(Value::Object(b)) => BackendConfig::from_object(b)?,
            Some(other) => return Err(wrong_type("Backend", "an object like {\"Type\":\"udp\"}", &other)),
        };
        let mut passthrough = Map::new();
        for field in PASSTHROUGH_FIELDS.iter().chain(IPV6_FIELDS.iter()) {
            if let Some(v) = obj.remove(*field) {
                passthrough.insert((*field).to_owned(), v);
            }
        }
        Ok(Self { network, subnet_len, subnet_min, subnet_max, backend, ipv6, passthrough })
    }

    /// The config as net-conf JSON, with the defaults written out explicitly. flannel computes
    /// the same defaults, so writing them changes nothing for a flannel reader.
    pub fn to_json(&self) -> String {
        let mut obj = Map::new();
        obj.insert("Network".into(), Value::String(self.network.to_string()));
        obj.insert("SubnetLen".into(), Value::from(self.subnet_len));
        obj.insert("SubnetMin".into(), Value::String(self.subnet_min.to_string()));
        obj.insert("SubnetMax".into(), Value::String(self.subnet_max.to_string()));
        if let Some(v6) = &self.ipv6 {
            obj.insert("EnableIPv6".into(), Value::Bool(true));
            obj.insert("IPv6Network".into(), Value::String(v6.network.to_string()));
            obj.insert("IPv6SubnetLen".into(), Value::from(v6.subnet_len));
            obj.insert("IPv6SubnetMin".into(), Value::String(v6.subnet_min.to_string()));
            obj.insert("IPv6SubnetMax".into(), Value::String(v6.subnet_max.to_string()));
        }
        for (k, v) in &self.passthrough {
            obj.insert(k.clone(), v.clone());
        }
        obj.insert("Backend".into(), Value::Object(self.backend.to_object()));
        Value::Object(obj).to_string()
    }

    /// The leasable range: subnets of `subnet_len` from `subnet_min` to `subnet_max`.
    pub fn subnet_range(&self) -> SubnetRange {
        SubnetRange::new(self.network, self.subnet_len, self.subnet_min, self.subnet_max)
    }
}

impl BackendConfig {
    /// flannel's default backend when `Backend` is absent: `{"Type":"udp"}`.
    pub fn udp() -> Self {
        Self {
            kind: BackendKind::Udp,
            port: None,
            vni: None,
            direct_routing: None,
            gbp: None,
            mtu: None,
            extra: Map::new(),
        }
    }

    /// Whether peers on our underlay subnet are routed directly (`DirectRouting`).
    pub fn direct_routing(&self) -> bool {
        self.direct_routing.unwrap_or(false)
    }

    /// The UDP port the backend listens on: `Port` (`ListenPort` for wireguard, flannel's
    /// name), else 8285 for udp, 8472 for vxlan (flannel passes 0 to the kernel, which picks
    /// 8472) and 51820 for wireguard.
    pub fn port(&self) -> u16 {
        match (self.port, self.kind) {
            (Some(p), _) if p != 0 => p,
            (_, BackendKind::Udp) => UDP_DEFAULT_PORT,
            (_, BackendKind::Vxlan) => VXLAN_DEFAULT_PORT,
            (_, BackendKind::WireGuard) => WIREGUARD_DEFAULT_PORT,
        }
    }

    /// The VXLAN network identifier (`VNI`, default 1).
    pub fn vni(&self) -> u32 {
        self.vni.unwrap_or(VXLAN_DEFAULT_VNI)
    }

    fn from_object(mut obj: Map<String, Value>) -> Result<Self, ConfigError> {
        let kind = match obj.remove("Type") {
            None | Some(Value::Null) => BackendKind::Udp,
            Some(Value::String(s)) => BackendKind::parse(&s).ok_or(ConfigError::UnsupportedBackend { value: s })?,
            Some(other) => return Err(wrong_type("Backend.Type", "a string", &other)),
        };
        let port = match obj.remove("Port") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => {
                let p =
                    n.as_u64().ok_or_else(|| wrong_type("Backend.Port", "a port number", &Value::Number(n.clone())))?;
                Some(u16::try_from(p).map_err(|_| ConfigError::PortOutOfRange { port: p })?)
            }
            Some(other) => return Err(wrong_type("Backend.Port", "a port number", &other)),
        };
        let port = match (kind, obj.remove("ListenPort")) {
            (_, None | Some(Value::Null)) => port,
            (BackendKind::WireGuard, Some(Value::Number(n))) => {
                let p = n
                    .as_u64()
                    .ok_or_else(|| wrong_type("Backend.ListenPort", "a port number", &Value::Number(n.clone())))?;
                Some(u16::try_from(p).map_err(|_| ConfigError::PortOutOfRange { port: p })?)
            }
            (BackendKind::WireGuard, Some(other)) => {
                return Err(wrong_type("Backend.ListenPort", "a port number", &other));
            }
            (_, Some(_)) => {
                return Err(ConfigError::Unsupported {
                    field: "Backend.ListenPort",
                    message: "only applies to Type \"wireguard\" (use Port)",
                });
            }
        };
        if kind == BackendKind::WireGuard {
            for field in ["PSK", "ListenPortV6", "PersistentKeepaliveInterval", "Mode"] {
                if obj.get(field).is_some_and(|v| !v.is_null()) {
                    return Err(ConfigError::Unsupported {
                        field: match field {
                            "PSK" => "Backend.PSK",
                            "ListenPortV6" => "Backend.ListenPortV6",
                            "PersistentKeepaliveInterval" => "Backend.PersistentKeepaliveInterval",
                            _ => "Backend.Mode",
                        },
                        message: "is not supported by weft's wireguard backend (IPv4 underlay, no preshared key, \
                                  sessions kept up by weft itself); remove it",
                    });
                }
            }
        }
        let vni = match obj.remove("VNI") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => {
                let v = n.as_u64().ok_or_else(|| wrong_type("Backend.VNI", "an integer", &Value::Number(n.clone())))?;
                if v >= 1 << 24 {
                    return Err(ConfigError::VniOutOfRange { vni: v });
                }
                u32::try_from(v).ok()
            }
            Some(other) => return Err(wrong_type("Backend.VNI", "an integer", &other)),
        };
        let direct_routing =
            take_bool(&mut obj, "DirectRouting").map_err(|e| backend_field(e, "Backend.DirectRouting"))?;
        if direct_routing == Some(true) && kind == BackendKind::Udp {
            return Err(ConfigError::Unsupported {
                field: "Backend.DirectRouting",
                message: "true only applies to Type \"vxlan\": flannel's udp backend has no direct routing, \
                          so its nodes would keep encapsulating and answer over another path",
            });
        }
        let gbp = take_bool(&mut obj, "GBP").map_err(|e| backend_field(e, "Backend.GBP"))?;
        if gbp == Some(true) {
            return Err(ConfigError::Unsupported {
                field: "Backend.GBP",
                message: "true is not supported: weft does not implement the VXLAN Group Based Policy \
                          extension (remove GBP or set it to false)",
            });
        }
        let mtu = match take_u64(&mut obj, "MTU").map_err(|e| backend_field(e, "Backend.MTU"))? {
            None => None,
            Some(m) => match u16::try_from(m) {
                Ok(m) if m >= MIN_OVERLAY_MTU => Some(m),
                _ => return Err(ConfigError::MtuOutOfRange { mtu: m }),
            },
        };
        Ok(Self { kind, port, vni, direct_routing, gbp, mtu, extra: obj })
    }

    fn to_object(&self) -> Map<String, Value> {
        let mut obj = Map::new();
        obj.insert("Type".into(), Value::String(self.kind.as_str().into()));
        if let Some(p) = self.port {
            obj.insert("Port".into(), Value::from(p));
        }
        if let Some(v) = self.vni {
            obj.insert("VNI".into(), Value::from(v));
        }
        if let Some(d) = self.direct_routing {
            obj.insert("DirectRouting".into(), Value::Bool(d));
        }
        if let Some(g) = self.gbp {
            obj.insert("GBP".into(), Value::Bool(g));
        }
        if let Some(m) = self.mtu {
            obj.insert("MTU".into(), Value::from(m));
        }
        for (k, v) in &self.extra {
            obj.insert(k.clone(), v.clone());
        }
        obj
    }
}

impl BackendKind {
    /// The `Type` string, also what goes into a lease's `BackendType`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Vxlan => "vxlan",
            Self::WireGuard => "wireguard",
        }
    }

    /// Parses a `Type` string; `None` for backends weft does not speak.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "udp" => Some(Self::Udp),
            "vxlan" => Some(Self::Vxlan),
            "wireguard" => Some(Self::WireGuard),
            _ => None,
        }
    }
}

impl Ipv6Config {
    fn from_object(obj: &mut Map<String, Value>) -> Result<Self, ConfigError> {
        let network = match take_str(obj, "IPv6Network")? {
            Some(s) => parse_v6_cidr(&s)?,
            None => return Err(ConfigError::Missing { field: "IPv6Network", example: "\"fd00:10:244::/56\"" }),
        };
        let net_field = "IPv6Network";
        let prefix = network.prefix_len();
        let subnet_len = match take_u64(obj, "IPv6SubnetLen")? {
            Some(len) => {
                let min = prefix.saturating_add(2);
                if min > 126 {
                    return Err(ConfigError::NetworkTooSmall {
                        field: net_field,
                        network: network.to_string(),
                        max_prefix: 124,
                    });
                }
                if len > 126 || len < u64::from(min) {
                    return Err(ConfigError::SubnetLenOutOfRange {
                        field: "IPv6SubnetLen",
                        len,
                        min,
                        max: 126,
                        network_field: net_field,
                        network: network.to_string(),
                    });
                }
                len as u8
            }
            None if prefix > 124 => {
                return Err(ConfigError::NetworkTooSmall {
                    field: net_field,
                    network: network.to_string(),
                    max_prefix: 124,
                });
            }
            None if prefix <= 62 => 64,
            None => prefix + 2,
        };
        let size = 1u128 << (128 - u32::from(subnet_len));
        let first = u128::from(network.network());
        let last = u128::from(network.broadcast());
        let in_net = |a: u128| a >= first && a <= last;
        let aligned = |a: u128| a % size == 0;
        let mut pick = |field: &'static str, default: u128| -> Result<Ipv6Addr, ConfigError> {
            let addr = match take_str(obj, field)? {
                Some(s) => s.parse::<Ipv6Addr>().map_err(|_| ConfigError::NotAnAddress {
                    field,
                    value: s.clone(),
                    family: "IPv6",
                })?,
                None => return Ok(Ipv6Addr::from(default)),
            };
            if !in_net(u128::from(addr)) {
                return Err(ConfigError::OutsideNetwork {
                    field,
                    addr: addr.to_string(),
                    network_field: net_field,
                    network: network.to_string(),
                });
            }
            if !aligned(u128::from(addr)) {
                return Err(ConfigError::NotAligned { field, addr: addr.to_string(), subnet_len });
            }
            Ok(addr)
        };
        let subnet_min = pick("IPv6SubnetMin", first + size)?;
        let subnet_max = pick("IPv6SubnetMax", last - (size - 1))?;
        Ok(Self { network, subnet_len, subnet_min, subnet_max })
    }
}

/// flannel's IPv4 checks and defaults (`CheckNetworkConfig`), plus min ≤ max.
fn check_v4(
    network: Ipv4Net,
    subnet_len: Option<u64>,
    subnet_min: Option<Ipv4Addr>,
    subnet_max: Option<Ipv4Addr>,
) -> Result<(u8, Ipv4Addr, Ipv4Addr), ConfigError> {
    let prefix = network.prefix_len();
    let too_small = || ConfigError::NetworkTooSmall { field: "Network", network: network.to_string(), max_prefix: 28 };
    let subnet_len = match subnet_len {
        Some(len) => {
            // At least four subnets (the first is never leased), and at least a /30 each: one
            // address for the gateway, one for a pod.
            let min = prefix + 2;
            if min > 30 {
                return Err(too_small());
            }
            if len > 30 || len < u64::from(min) {
                return Err(ConfigError::SubnetLenOutOfRange {
                    field: "SubnetLen",
                    len,
                    min,
                    max: 30,
                    network_field: "Network",
                    network: network.to_string(),
                });
            }
            len as u8
        }
        None if prefix > 28 => return Err(too_small()),
        None if prefix <= 22 => 24,
        None => prefix + 2,
    };
    let size = 1u32 << (32 - u32::from(subnet_len));
    let first = u32::from(network.network());
    let last = u32::from(network.broadcast());
    let check = |field: &'static str, given: Option<Ipv4Addr>, default: u32| -> Result<Ipv4Addr, ConfigError> {
        let Some(addr) = given else { return Ok(Ipv4Addr::from(default)) };
        let a = u32::from(addr);
        if a < first || a > last {
            return Err(ConfigError::OutsideNetwork {
                field,
                addr: addr.to_string(),
                network_field: "Network",
                network: network.to_string(),
            });
        }
        if a % size != 0 {
            return Err(ConfigError::NotAligned { field, addr: addr.to_string(), subnet_len });
        }
        Ok(addr)
    };
    // Skip the first subnet: a node holding x.y.0.0 would give its gateway the network address.
    let min = check("SubnetMin", subnet_min, first + size)?;
    let max = check("SubnetMax", subnet_max, last - (size - 1))?;
    if min > max {
        return Err(ConfigError::EmptyRange { min, max });
    }
    Ok((subnet_len, min, max))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(field: &str, expected: &'static str, found: &Value) -> ConfigError {
    ConfigError::WrongType { field: field.to_owned(), expected, found: found.to_string() }
}

/// Renames the field of a [`ConfigError::WrongType`] from `MTU` to `Backend.MTU`, say: the
/// `take_*` helpers know the key, not the object it sits in.
fn backend_field(e: ConfigError, field: &str) -> ConfigError {
    match e {
        ConfigError::WrongType { expected, found, .. } => {
            ConfigError::WrongType { field: field.to_owned(), expected, found }
        }
        other => other,
    }
}

fn take_bool(obj: &mut Map<String, Value>, field: &'static str) -> Result<Option<bool>, ConfigError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(other) => Err(wrong_type(field, "true or false", &other)),
    }
}

fn take_str(obj: &mut Map<String, Value>, field: &'static str) -> Result<Option<String>, ConfigError> {
    match obj.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(field, "a string", &other)),
    }
}

fn take_u64(obj: &mut Map<String, Value>, field: &'static str) -> Result<Option<u64>, ConfigError> {
    match obj.remove(field) {
        // flannel treats 0 as "not set" (Go's zero value).
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64() == Some(0) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
        Some(other) => Err(wrong_type(field, "a non-negative integer", &other)),
    }
}

fn parse_v4_cidr(field: &'static str, s: &str) -> Result<Ipv4Net, ConfigError> {
    // Like Go's net.ParseCIDR, host bits are cleared: "10.244.1.0/16" means 10.244.0.0/16.
    s.parse::<Ipv4Net>().map(|n| n.trunc()).map_err(|_| ConfigError::NotACidr {
        field,
        value: s.to_owned(),
        family: "IPv4",
        example: "10.244.0.0/16",
    })
}

fn parse_v6_cidr(s: &str) -> Result<Ipv6Net, ConfigError> {
    s.parse::<Ipv6Net>().map(|n| n.trunc()).map_err(|_| ConfigError::NotACidr {
        field: "IPv6Network",
        value: s.to_owned(),
        family: "IPv6",
        example: "fd00:10:244::/56",
    })
}

fn parse_v4_addr(field: &'static str, s: &str) -> Result<Ipv4Addr, ConfigError> {
    s.parse().map_err(|_| ConfigError::NotAnAddress { field, value: s.to_owned(), family: "IPv4" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_follow_flannel() {
        // (json, subnet_len, min, max)
        let cases = [
            (r#"{"Network":"10.244.0.0/16"}"#, 24, "10.244.1.0", "10.244.255.0"),
            (r#"{"Network":"10.0.0.0/8"}"#, 24, "10.0.1.0", "10.255.255.0"),
            (r#"{"Network":"10.244.0.0/22"}"#, 24, "10.244.1.0", "10.244.3.0"),
            (r#"{"Network":"10.244.0.0/23"}"#, 25, "10.244.0.128", "10.244.1.128"),
            (r#"{"Network":"10.244.0.0/28"}"#, 30, "10.244.0.4", "10.244.0.12"),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":0}"#, 24, "10.244.1.0", "10.244.255.0"),
            (
                r#"{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0","Backend":{"Type":"udp","Port":7890}}"#,
                20,
                "10.10.0.0",
                "10.99.0.0",
            ),
        ];
        for (json, len, min, max) in cases {
            let c = NetworkConfig::from_json(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!((c.subnet_len, c.subnet_min, c.subnet_max), (len, ip(min), ip(max)), "{json}");
        }
    }

    #[test]
    fn backend_defaults_are_explicit() {
        let c = NetworkConfig::from_json(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(c.backend.kind, BackendKind::Udp);
        assert_eq!(c.backend.port(), 8285);
        let c = NetworkConfig::from_json(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!((c.backend.kind, c.backend.port(), c.backend.vni()), (BackendKind::Vxlan, 8472, 1));
        let c = NetworkConfig::from_json(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":42,"Port":4789,"DirectRouting":true}}"#,
        )
        .unwrap();
        assert_eq!((c.backend.port(), c.backend.vni()), (4789, 42));
        assert!(c.backend.direct_routing());
        assert!(c.backend.extra.is_empty(), "DirectRouting is read, not carried: {:?}", c.backend.extra);
    }

    /// flannel's `wireguard` backend: `ListenPort` (default 51820) is read; the options weft
    /// does not implement (a preshared key, IPv6, keepalives, modes) are refused by name.
    #[test]
    fn wireguard_backend_reads_listen_port_and_refuses_what_it_lacks() {
        let c = NetworkConfig::from_json(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#).unwrap();
        assert_eq!((c.backend.kind, c.backend.port()), (BackendKind::WireGuard, 51820));
        let c = NetworkConfig::from_json(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","ListenPort":51000}}"#,
        )
        .unwrap();
        assert_eq!(c.backend.port(), 51000);
        for (backend, field) in [
            (r#"{"Type":"wireguard","PSK":"x"}"#, "Backend.PSK"),
            (r#"{"Type":"wireguard","Mode":"ipv6"}"#, "Backend.Mode"),
            (r#"{"Type":"wireguard","PersistentKeepaliveInterval":25}"#, "Backend.PersistentKeepaliveInterval"),
            (r#"{"Type":"vxlan","ListenPort":1}"#, "Backend.ListenPort"),
        ] {
            let json = format!(r#"{{"Network":"10.244.0.0/16","Backend":{backend}}}"#);
            let err = NetworkConfig::from_json(&json).unwrap_err().to_string();
            assert!(err.starts_with(field), "{backend}: {err}");
        }
    }

    /// flannel's vxlan options that change what a node does are read, checked and written
    /// back: MTU honoured (0 = automatic, as flannel), DirectRouting for vxlan, GBP false only.
    #[test]
    fn mtu_direct_routing_and_gbp_are_read() {
        let c = NetworkConfig::from_json(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true,"GBP":false,"MTU":1400,"Learning":false}}"#,
        )
        .unwrap();
        assert_eq!((c.backend.direct_routing(), c.backend.gbp, c.backend.mtu), (true, Some(false), Some(1400)));
        assert_eq!(c.backend.extra.keys().collect::<Vec<_>>(), ["Learning"]);
        assert_eq!(NetworkConfig::from_json(&c.to_json()).unwrap(), c);
        let auto = NetworkConfig::from_json(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","MTU":0}}"#).unwrap();
        assert_eq!((auto.backend.mtu, auto.backend.direct_routing()), (None, false));
        let off = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","DirectRouting":false}}"#;
        assert!(!NetworkConfig::from_json(off).unwrap().backend.direct_routing());
    }

    #[test]
    fn errors_name_the_field() {
        // (json, expected message)
        let cases = [
            (r#"{}"#, "Network: missing (example: \"10.244.0.0/16\")"),
            (r#"{"Network":"10.244.0.0"}"#, "Network: \"10.244.0.0\" is not an IPv4 CIDR (example: \"10.244.0.0/16\")"),
            (
                r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#,
                "SubnetLen: 31 must be between 18 and 30 for Network 10.244.0.0/16",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetLen":17}"#,
                "SubnetLen: 17 must be between 18 and 30 for Network 10.244.0.0/16",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetLen":"24"}"#,
                "SubnetLen: expected a non-negative integer, found \"24\"",
            ),
            (
                r#"{"Network":"10.244.0.0/29"}"#,
                "Network: 10.244.0.0/29 is too small; the smallest useful network is /28",
            ),
            (
                r#"{"Network":"10.244.0.0/29","SubnetLen":30}"#,
                "Network: 10.244.0.0/29 is too small; the smallest useful network is /28",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0"}"#,
                "SubnetMin: 10.245.0.0 is not inside Network 10.244.0.0/16",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.3.5"}"#,
                "SubnetMax: 10.244.3.5 is not on a /24 boundary",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.3.0"}"#,
                "SubnetMin: 10.244.9.0 is above SubnetMax 10.244.3.0",
            ),
            (r#"{"Network":"10.244.0.0/16","SubnetMin":"ten"}"#, "SubnetMin: \"ten\" is not an IPv4 address"),
            (r#"{"Network":"10.244.0.0/16","Subnetlen":24}"#, "Subnetlen: unknown field (did you mean SubnetLen?)"),
            (r#"{"Network":"10.244.0.0/16","Colour":"red"}"#, "Colour: unknown field"),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv4":false}"#,
                "EnableIPv4: false is not supported: weft's overlay needs an IPv4 Network",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
                "Backend.Type: \"host-gw\" is not supported by weft (supported: \"udp\", \"vxlan\")",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#,
                "Backend.VNI: 16777216 does not fit in 24 bits (max 16777215)",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Port":70000}}"#,
                "Backend.Port: 70000 is not a UDP port (0-65535)",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","GBP":true}}"#,
                "Backend.GBP: true is not supported: weft does not implement the VXLAN Group Based Policy \
                 extension (remove GBP or set it to false)",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","GBP":"yes"}}"#,
                "Backend.GBP: expected true or false, found \"yes\"",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","DirectRouting":true}}"#,
                "Backend.DirectRouting: true only applies to Type \"vxlan\": flannel's udp backend has no \
                 direct routing, so its nodes would keep encapsulating and answer over another path",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":1}}"#,
                "Backend.DirectRouting: expected true or false, found 1",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":500}}"#,
                "Backend.MTU: 500 must be between 576 and 65535 (0 or absent: the underlay MTU minus the \
                 encapsulation overhead)",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":70000}}"#,
                "Backend.MTU: 70000 must be between 576 and 65535 (0 or absent: the underlay MTU minus the \
                 encapsulation overhead)",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":"1400"}}"#,
                "Backend.MTU: expected a non-negative integer, found \"1400\"",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":"udp"}"#,
                "Backend: expected an object like {\"Type\":\"udp\"}, found \"udp\"",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true}"#,
                "IPv6Network: missing (example: \"fd00:10:244::/56\")",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetLen":127}"#,
                "IPv6SubnetLen: 127 must be between 50 and 126 for IPv6Network fd00::/48",
            ),
            (r#"[1]"#, "network config is not a JSON object: found an array"),
        ];
        for (json, want) in cases {
            let err = NetworkConfig::from_json(json).expect_err(json);
            assert_eq!(err.to_string(), want, "{json}");
        }
    }

    #[test]
    fn ipv6_defaults() {
        let c = NetworkConfig::from_json(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        let v6 = c.ipv6.unwrap();
        assert_eq!(v6.subnet_len, 64);
        assert_eq!(v6.subnet_min, "fd00:10:244:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v6.subnet_max, "fd00:10:244:ff::".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn passthrough_fields_survive() {
        let json = r#"{"Network":"10.244.0.0/16","EnableNFTables":false,"IPv6Network":"fd00::/48","Backend":{"Type":"vxlan","GBP":false}}"#;
        let c = NetworkConfig::from_json(json).unwrap();
        assert!(c.ipv6.is_none());
        let again = NetworkConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(again, c);
        assert_eq!(again.passthrough["EnableNFTables"], false);
        assert_eq!(again.passthrough["IPv6Network"], "fd00::/48");
    }

    proptest! {
        #[test]
        fn parse_emit_round_trip(base in any::<u32>(), prefix in 8u8..=28, extra in 2u8..=8,
                                 vxlan in any::<bool>(), vni in proptest::option::of(0u32..1 << 24),
                                 port in proptest::option::of(any::<u16>())) {
            let network = Ipv4Net::new(Ipv4Addr::from(base), prefix).unwrap().trunc();
            let len = (prefix + extra).min(30);
            let json = serde_json::json!({
                "Network": network.to_string(),
                "SubnetLen": len,
                "Backend": {"Type": if vxlan { "vxlan" } else { "udp" }, "VNI": vni, "Port": port},
            }).to_string();
            let c = NetworkConfig::from_json(&json).unwrap();
            prop_assert_eq!(NetworkConfig::from_json(&c.to_json()).unwrap(), c);
        }

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,80}") {
            let _ = NetworkConfig::from_json(&s);
        }
    }
}
