//! The daemon's configuration: a TOML file, overridden field by field by command-line
//! flags, then validated into a [`Config`] whose every field is known good. A bad value is
//! refused with a message naming the field and saying what would be accepted.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;
use weft_forwarder::driver::IoPreference;
use weft_forwarder::encap::{flannel_udp, vxlan};
use weft_forwarder::wire::ethernet::MacAddr;
use weft_forwarder::wire::vxlan::Vni;
use weft_ipam::{EtcdCredentials, EtcdTls, Password, TlsFile};

/// Default cluster network, as flannel's and kubeadm's examples use.
pub const DEFAULT_NETWORK: &str = "10.244.0.0/16";
/// Default TUN name.
pub const DEFAULT_TUN: &str = "weft0";
/// Default API socket.
pub const DEFAULT_API_SOCKET: &str = "/run/weft/weft.sock";
/// Default embedded store directory.
pub const DEFAULT_STORE_DIR: &str = "/var/lib/weft/store";
/// Default `subnet.env` path.
pub const DEFAULT_SUBNET_FILE: &str = "/run/weft/subnet.env";
/// flanneld's `subnet.env` path (its `--subnet-file` default), where flannel's CNI plugin and
/// tooling read it; the default with `flannel_paths`.
pub const FLANNEL_SUBNET_FILE: &str = "/run/flannel/subnet.env";
/// Default pod allocation directory.
pub const DEFAULT_POD_DIR: &str = "/var/lib/weft/pods";
/// Default directory of the lease cache (`<dir>/<node name>.json`).
pub const DEFAULT_LEASE_CACHE_DIR: &str = "/var/lib/weft/leases";
/// Where `backend = "wireguard"` keeps node private keys, one file per node name (0600 in a
/// 0700 directory).
pub const DEFAULT_KEY_DIR: &str = "/var/lib/weft/keys";
/// WireGuard's port, and flannel's `wireguard` backend's.
pub const WIREGUARD_DEFAULT_PORT: u16 = 51820;
/// Default etcd prefix: flannel's, so weft and flannel nodes can share a network.
pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";
/// Most workers a node may run.
pub const MAX_WORKERS: usize = 64;

/// A configuration that cannot be used; the message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line, column and key.
        message: String,
    },
    /// A required field is absent.
    #[error("{field}: required (set it in the config file or with --{flag})")]
    Missing {
        /// The field.
        field: &'static str,
        /// The flag that sets it.
        flag: &'static str,
    },
    /// A field has a value weft cannot use.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, with its index for list entries (`peers[1].subnet`).
        field: String,
        /// What is wrong and what would be right.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.into() }
}

/// The config file as written: every field optional, so flags can fill in.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This node's name, unique in the cluster.
    pub node_name: Option<String>,
    /// The underlay address the UDP socket binds to and peers send to. Without it, the first
    /// IPv4 address of `iface`, else of the interface of the IPv4 default route (flanneld's
    /// choice), found once at start.
    pub public_ip: Option<String>,
    /// The underlay interface, by name or by one of its addresses (flanneld's `--iface`).
    /// With `public_ip` too, `public_ip` must be one of its addresses.
    pub iface: Option<String>,
    /// Wire format: `udp` (flannel's udp backend, the default), `vxlan`, or `wireguard`
    /// (authenticated and encrypted).
    pub backend: Option<String>,
    /// `wireguard`: this node's private key file (base64, as `wg genkey` writes), created
    /// 0600 on first start. Default `/var/lib/weft/keys/<node_name>.key`.
    pub wireguard_key_file: Option<PathBuf>,
    /// The underlay UDP port (default 8285 for udp, 8472 for vxlan, 51820 for wireguard).
    pub port: Option<u16>,
    /// VXLAN network identifier (default 1, flannel's).
    pub vni: Option<u32>,
    /// Our VTEP MAC (default: derived from node_name, so stable across restarts).
    pub vtep_mac: Option<String>,
    /// Send outer UDP checksums (VXLAN; default false, as Linux vxlan on IPv4).
    pub udp_checksum: Option<bool>,
    /// The cluster network, IPv4 CIDR.
    pub network: Option<String>,
    /// This node's subnet inside `network`.
    pub subnet: Option<String>,
    /// Optional IPv6 cluster network.
    pub ipv6_network: Option<String>,
    /// This node's IPv6 subnet inside `ipv6_network`.
    pub ipv6_subnet: Option<String>,
    /// The TUN device name.
    pub tun_name: Option<String>,
    /// `tun` (IP packets, the default) or `tap` (Ethernet frames; needs vxlan).
    pub device: Option<String>,
    /// Overlay MTU; default computed from the underlay interface.
    pub mtu: Option<u16>,
    /// Worker threads, one TUN queue and socket each.
    pub workers: Option<usize>,
    /// `auto`, `uring` or `mmsg`.
    pub io: Option<String>,
    /// TUN offloads (TSO/USO, checksum) with UDP GSO sends; default on (TUN mode).
    pub offload: Option<bool>,
    /// UDP GRO receives and merging of segments into one TUN write; default on (needs
    /// `offload`).
    pub gro: Option<bool>,
    /// Unix socket for `weft status`.
    pub api_socket: Option<PathBuf>,
    /// Lease mode: `file` (embedded, the default) or `etcd`.
    pub store: Option<String>,
    /// Lease mode, file store: its directory.
    pub store_dir: Option<PathBuf>,
    /// Lease mode, etcd store: client URLs.
    pub etcd_endpoints: Option<Vec<String>>,
    /// Lease mode, etcd store: key prefix (flannel's `--etcd-prefix`).
    pub etcd_prefix: Option<String>,
    /// Lease mode, etcd store: PEM CAs for etcd's server certificate (flannel's
    /// `--etcd-cafile`); without it, `https://` endpoints are checked against the system trust
    /// store.
    pub etcd_cafile: Option<PathBuf>,
    /// Lease mode, etcd store: PEM client certificate for etcd's `--client-cert-auth`
    /// (flannel's `--etcd-certfile`).
    pub etcd_certfile: Option<PathBuf>,
    /// Lease mode, etcd store: PEM private key of `etcd_certfile` (flannel's `--etcd-keyfile`).
    pub etcd_keyfile: Option<PathBuf>,
    /// Lease mode, etcd store: etcd user, for an etcd with auth enabled (flannel's
    /// `--etcd-username`).
    pub etcd_username: Option<String>,
    /// Lease mode, etcd store: that user's password (flannel's `--etcd-password`; better given
    /// as `WEFT_ETCD_PASSWORD` than in a world-readable file or on the command line).
    pub etcd_password: Option<Password>,
    /// Lease mode: where `subnet.env` is written (flannel's format).
    pub subnet_file: Option<PathBuf>,
    /// Lease mode: use flannel's paths for what flannel's CNI plugin and tools read, so they
    /// work unchanged: `subnet_file` defaults to `/run/flannel/subnet.env`.
    pub flannel_paths: Option<bool>,
    /// Lease lifetime in seconds (flannel: 86400).
    pub lease_ttl_secs: Option<u64>,
    /// Lease mode: release the lease on a graceful stop.
    pub release_on_exit: Option<bool>,
    /// Lease mode: where the last known leases are kept, so a restart during a store outage
    /// brings the data plane up at once (default `/var/lib/weft/leases/<node_name>.json`).
    pub lease_cache: Option<PathBuf>,
    /// Pod address allocations (served to the CNI plugin over the API socket).
    pub pod_dir: Option<PathBuf>,
    /// GC spares allocations younger than this, so an ADD racing a GC keeps its address.
    pub pod_gc_grace_secs: Option<u64>,
    /// Where the CNI plugin records releases it could not hand over while the daemon was down;
    /// the plugin's `pendingReleaseDir` must name the same directory.
    pub pending_release_dir: Option<PathBuf>,
    /// Masquerade pod traffic that leaves the cluster network to the node's address (flannel's
    /// `--ip-masq`), with nftables rules in a table of weft's own; default off.
    pub ip_masq: Option<bool>,
    /// Address the `/healthz`, `/readyz` and `/metrics` endpoints listen on (flannel's
    /// `--healthz-ip`); default 127.0.0.1. Only used with `healthz_port`.
    pub healthz_ip: Option<String>,
    /// Port of those endpoints (flannel's `--healthz-port`); 0, the default, turns them off.
    pub healthz_port: Option<u16>,
    /// Static peers.
    #[serde(default)]
    pub peers: Vec<RawPeer>,
}

/// A peer as written in the file or a `--peer` flag.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    /// Its node name.
    pub name: String,
    /// Its IPv4 subnet.
    pub subnet: String,
    /// Its IPv6 subnet.
    pub ipv6_subnet: Option<String>,
    /// `ip:port`, or `ip` for our own port.
    pub endpoint: String,
    /// Its VTEP MAC (required with `backend = "vxlan"`).
    pub mac: Option<String>,
    /// Its WireGuard public key (required with `backend = "wireguard"`).
    pub public_key: Option<String>,
    /// Largest inner packet the path to it carries.
    pub mtu: Option<u16>,
}

impl RawPeer {
    /// Parses the `--peer` flag form `name=n2,subnet=10.244.2.0/24,endpoint=198.18.0.2:8285[,mtu=1400][,ipv6_subnet=…]`.
    ///
    /// # Errors
    /// A message naming the unknown key or the missing one.
    pub fn from_flag(s: &str) -> Result<Self, String> {
        let mut p = RawPeer::default();
        for kv in s.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("{kv:?} is not key=value"))?;
            match k.trim() {
                "name" => p.name = v.trim().to_string(),
                "subnet" => p.subnet = v.trim().to_string(),
                "endpoint" => p.endpoint = v.trim().to_string(),
                "ipv6_subnet" => p.ipv6_subnet = Some(v.trim().to_string()),
                "mac" => p.mac = Some(v.trim().to_string()),
                "public_key" => p.public_key = Some(v.trim().to_string()),
                "mtu" => p.mtu = Some(v.trim().parse().map_err(|_| format!("mtu: {v:?} is not a number"))?),
                other => {
                    return Err(format!(
                        "unknown key {other:?} (expected name, subnet, endpoint, mac, public_key, mtu, ipv6_subnet)"
                    ));
                }
            }
        }
        for (k, v) in [("name", &p.name), ("subnet", &p.subnet), ("endpoint", &p.endpoint)] {
            if v.is_empty() {
                return Err(format!("{k}= is required"));
            }
        }
        Ok(p)
    }
}

impl RawConfig {
    /// Reads and parses a config file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    /// Fields set in `over` replace ours; peers given in `over` replace the whole list.
    pub fn merge(mut self, over: RawConfig) -> Self {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            node_name,
            public_ip,
            iface,
            backend,
            wireguard_key_file,
            port,
            vni,
            vtep_mac,
            udp_checksum,
            network,
            subnet,
            ipv6_network,
            ipv6_subnet,
            tun_name,
            device,
            mtu,
            workers,
            io,
            offload,
            gro,
            api_socket,
            store,
            store_dir,
            etcd_endpoints,
            etcd_prefix,
            etcd_cafile,
            etcd_certfile,
            etcd_keyfile,
            etcd_username,
            etcd_password,
            subnet_file,
            flannel_paths,
            lease_ttl_secs,
            release_on_exit,
            lease_cache,
            pod_dir,
            pod_gc_grace_secs,
            pending_release_dir,
            ip_masq,
            healthz_ip,
            healthz_port
        );
        if !over.peers.is_empty() {
            self.peers = over.peers;
        }
        self
    }
}

/// A validated peer.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Peer {
    /// Node name.
    pub name: String,
    /// IPv4 subnet.
    pub subnet: Ipv4Net,
    /// IPv6 subnet.
    pub subnet_v6: Option<Ipv6Net>,
    /// Underlay endpoint.
    pub endpoint: SocketAddr,
    /// VTEP MAC (VXLAN).
    pub mac: Option<MacAddr>,
    /// WireGuard public key (`wireguard`).
    pub public_key: Option<weft_forwarder::wireguard::PublicKey>,
    /// Path MTU override.
    pub mtu: Option<u16>,
}

/// The wire format between nodes.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Backend {
    /// flannel's `udp`: the bare inner packet as UDP payload.
    Udp,
    /// VXLAN (RFC 7348), interoperable with Linux's vxlan driver.
    Vxlan {
        /// The VNI.
        vni: Vni,
        /// Our VTEP MAC.
        vtep_mac: MacAddr,
        /// Whether to send outer UDP checksums.
        udp_checksum: bool,
    },
    /// WireGuard's wire format and handshake: every datagram authenticated and encrypted.
    WireGuard {
        /// Our private key's file.
        key_file: PathBuf,
    },
}

impl Backend {
    /// The name in configs and status.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Vxlan { .. } => "vxlan",
            Self::WireGuard { .. } => "wireguard",
        }
    }
}

/// The kernel device the daemon reads and writes.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Device {
    /// A TUN: IP packets; weft writes the Ethernet header for VXLAN itself.
    Tun,
    /// A TAP: Ethernet frames end to end (VXLAN only), with MAC learning and flooding.
    Tap,
}

/// A stable VTEP MAC for a node: locally administered, from an FNV-1a hash of its name,
/// so a restarted node keeps the MAC its peers' neighbour entries hold (flannel#1795).
pub fn derived_vtep_mac(node_name: &str) -> MacAddr {
    let h = node_name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    MacAddr::local_from_seed(h)
}

/// Where the lease store lives.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum StoreSettings {
    /// The embedded store: a directory (several daemons on one machine may share it).
    File {
        /// The directory.
        dir: PathBuf,
    },
    /// etcd v3 with flannel's key layout.
    Etcd {
        /// Client URLs, all `http://` or all `https://`.
        endpoints: Vec<String>,
        /// Key prefix.
        prefix: String,
        /// TLS files (checked readable and PEM); only with `https://` endpoints.
        tls: EtcdTls,
        /// The etcd user, if etcd has auth enabled.
        credentials: Option<EtcdCredentials>,
    },
}

impl StoreSettings {
    /// `file` or `etcd`, for status.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File { .. } => "file",
            Self::Etcd { .. } => "etcd",
        }
    }

    /// Validates the store fields of `raw` (used by `weft run`, `weft network init` and
    /// `weft leases` alike).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field.
    pub fn from_raw(raw: &RawConfig) -> Result<Self, ConfigError> {
        match raw.store.as_deref().unwrap_or("file") {
            "file" => {
                if let Some(field) = etcd_fields_set(raw).next() {
                    return Err(invalid(field, "set, but store is \"file\" (set store = \"etcd\")"));
                }
                Ok(Self::File { dir: raw.store_dir.clone().unwrap_or_else(|| DEFAULT_STORE_DIR.into()) })
            }
            "etcd" => {
                let endpoints = raw.etcd_endpoints.clone().unwrap_or_default();
                if endpoints.is_empty() {
                    return Err(ConfigError::Missing { field: "etcd_endpoints", flag: "etcd-endpoints" });
                }
                for (i, e) in endpoints.iter().enumerate() {
                    if !(e.starts_with("http://") || e.starts_with("https://")) {
                        return Err(invalid(
                            format!("etcd_endpoints[{i}]"),
                            format!("{e:?} is not a URL (example: \"http://127.0.0.1:2379\")"),
                        ));
                    }
                }
                let prefix = raw.etcd_prefix.clone().unwrap_or_else(|| DEFAULT_ETCD_PREFIX.into());
                if !prefix.starts_with('/') || prefix.ends_with('/') {
                    return Err(invalid("etcd_prefix", format!("{prefix:?} must start with '/' and not end with one")));
                }
                let tls = etcd_tls(raw, &endpoints)?;
                let credentials = etcd_credentials(raw)?;
                Ok(Self::Etcd { endpoints, prefix, tls, credentials })
            }
            other => Err(invalid("store", format!("{other:?} must be \"file\" or \"etcd\""))),
        }
    }
}

/// The etcd fields of `raw` that are set, by name.
fn etcd_fields_set(raw: &RawConfig) -> impl Iterator<Item = &'static str> {
    [
        ("etcd_endpoints", raw.etcd_endpoints.is_some()),
        ("etcd_prefix", raw.etcd_prefix.is_some()),
        ("etcd_cafile", raw.etcd_cafile.is_some()),
        ("etcd_certfile", raw.etcd_certfile.is_some()),
        ("etcd_keyfile", raw.etcd_keyfile.is_some()),
        ("etcd_username", raw.etcd_username.is_some()),
        ("etcd_password", raw.etcd_password.is_some()),
    ]
    .into_iter()
    .filter_map(|(field, set)| set.then_some(field))
}

fn tls_field(file: TlsFile) -> &'static str {
    match file {
        TlsFile::Ca => "etcd_cafile",
        TlsFile::Cert => "etcd_certfile",
        TlsFile::Key => "etcd_keyfile",
    }
}

/// The TLS files, read and checked now so that a typo stops the start naming the field.
///
/// Endpoints are all `http://` or all `https://` (etcd-client applies one TLS setting to all).
/// TLS files with `http://` endpoints are an error, not a warning: they would be ignored and
/// the leases sent in clear while the operator believes them protected. `https://` without
/// `etcd_cafile` is fine: etcd's certificate is checked against the system trust store, as
/// flanneld does.
fn etcd_tls(raw: &RawConfig, endpoints: &[String]) -> Result<EtcdTls, ConfigError> {
    let https = endpoints.first().is_some_and(|e| e.starts_with("https://"));
    if let Some((i, e)) = endpoints.iter().enumerate().find(|(_, e)| e.starts_with("https://") != https) {
        return Err(invalid(
            format!("etcd_endpoints[{i}]"),
            format!("{e:?} mixes http:// and https:// endpoints; use one scheme for all"),
        ));
    }
    let tls = EtcdTls {
        ca_file: raw.etcd_cafile.clone(),
        cert_file: raw.etcd_certfile.clone(),
        key_file: raw.etcd_keyfile.clone(),
    };
    if !https && tls.is_set() {
        let field = [("etcd_cafile", &tls.ca_file), ("etcd_certfile", &tls.cert_file), ("etcd_keyfile", &tls.key_file)]
            .into_iter()
            .find_map(|(f, v)| v.as_ref().map(|_| f))
            .unwrap_or("etcd_cafile");
        return Err(invalid(
            field,
            format!(
                "set, but etcd_endpoints are plain http ({:?}); use https:// endpoints \
                 (with http the TLS files would be ignored and the leases sent in clear)",
                endpoints.first().map_or("", String::as_str)
            ),
        ));
    }
    tls.check().map_err(|e| invalid(tls_field(e.file()), e.to_string()))?;
    Ok(tls)
}

/// The etcd user: a name and a password, or neither.
fn etcd_credentials(raw: &RawConfig) -> Result<Option<EtcdCredentials>, ConfigError> {
    match (&raw.etcd_username, &raw.etcd_password) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(invalid(
            "etcd_password",
            "required with etcd_username (set it with --etcd-password or the WEFT_ETCD_PASSWORD environment variable)",
        )),
        (None, Some(_)) => Err(ConfigError::Missing { field: "etcd_username", flag: "etcd-username" }),
        (Some(name), Some(_)) if name.is_empty() || name.chars().any(char::is_whitespace) => {
            Err(invalid("etcd_username", format!("{name:?} is not an etcd user name")))
        }
        (Some(name), Some(password)) => {
            Ok(Some(EtcdCredentials { username: name.clone(), password: password.clone() }))
        }
    }
}

/// Lease mode: the node leases its subnet from a store and learns its peers there.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct LeaseSettings {
    /// The store.
    pub store: StoreSettings,
    /// `subnet.env` path.
    pub subnet_file: PathBuf,
    /// Lease lifetime.
    pub ttl: std::time::Duration,
    /// Release the lease on a graceful stop.
    pub release_on_exit: bool,
    /// The lease cache file.
    pub lease_cache: PathBuf,
}

/// A loaded configuration: complete (static peers), or waiting for its network settings and
/// subnet from the lease store.
#[derive(Clone, Debug)]
// One value per start or reload; boxing the lease settings would only churn the daemon's code.
#[allow(clippy::large_enum_variant)]
pub enum Loaded {
    /// `subnet` and `[[peers]]` are in the configuration.
    Static(Box<Config>),
    /// No `subnet`: lease it. [`resolve_leased`] completes the configuration.
    Lease {
        /// The configuration as written.
        raw: Box<RawConfig>,
        /// The lease settings.
        lease: LeaseSettings,
    },
}

/// Fields that come from the store's network config in lease mode and must not be set.
const LEASE_MODE_FORBIDDEN: [&str; 5] = ["network", "backend", "port", "vni", "peers"];

impl Loaded {
    /// Sorts a raw configuration into static or lease mode and validates it.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        if raw.subnet.is_some() {
            let set = [
                ("store", raw.store.is_some()),
                ("store_dir", raw.store_dir.is_some()),
                ("subnet_file", raw.subnet_file.is_some()),
                ("flannel_paths", raw.flannel_paths.is_some()),
                ("release_on_exit", raw.release_on_exit.is_some()),
                ("lease_cache", raw.lease_cache.is_some()),
            ];
            let first = set.into_iter().filter_map(|(f, s)| s.then_some(f)).chain(etcd_fields_set(&raw)).next();
            if let Some(field) = first {
                return Err(invalid(field, "only applies in lease mode (remove `subnet` and `peers` to lease)"));
            }
            return Config::validate(raw).map(|c| Loaded::Static(Box::new(c)));
        }
        let set = [
            raw.network.is_some(),
            raw.backend.is_some(),
            raw.port.is_some(),
            raw.vni.is_some(),
            !raw.peers.is_empty(),
        ];
        if let Some((field, _)) = LEASE_MODE_FORBIDDEN.iter().zip(set).find(|(_, s)| *s) {
            return Err(invalid(
                *field,
                "comes from the store's network config in lease mode (change it with `weft network init --force`), or set `subnet` for static peers",
            ));
        }
        let store = StoreSettings::from_raw(&raw)?;
        let ttl_secs = raw.lease_ttl_secs.unwrap_or(86_400);
        if !(10..=30 * 86_400).contains(&ttl_secs) {
            return Err(invalid("lease_ttl_secs", format!("{ttl_secs} must be between 10 and 2592000")));
        }
        let lease = LeaseSettings {
            store,
            subnet_file: raw.subnet_file.clone().unwrap_or_else(|| {
                if raw.flannel_paths.unwrap_or(false) { FLANNEL_SUBNET_FILE } else { DEFAULT_SUBNET_FILE }.into()
            }),
            ttl: std::time::Duration::from_secs(ttl_secs),
            release_on_exit: raw.release_on_exit.unwrap_or(false),
            lease_cache: raw.lease_cache.clone().unwrap_or_else(|| {
                Path::new(DEFAULT_LEASE_CACHE_DIR).join(format!("{}.json", raw.node_name.as_deref().unwrap_or("node")))
            }),
        };
        // Validate what can be validated now, with a stand-in subnet and the format whose
        // options are a superset (vtep_mac, device = "tap"); the real values are leased.
        let probe = RawConfig {
            subnet: Some("10.244.1.0/24".into()),
            backend: Some("vxlan".into()),
            wireguard_key_file: None,
            ..raw.clone()
        };
        Config::validate(probe)?;
        Ok(Loaded::Lease { raw: Box::new(raw), lease })
    }
}

/// Completes a lease-mode configuration with the store's network config and our leased
/// subnet (no static peers: they come from the store). The network's `Backend.MTU` is the
/// overlay MTU unless this node sets its own `mtu` (a node with a smaller underlay may).
///
/// # Errors
/// A [`ConfigError`] if the combination is invalid (e.g. a vtep_mac with a udp network, or
/// `Backend.DirectRouting` with `device = "tap"`).
pub fn resolve_leased(raw: &RawConfig, net: &weft_ipam::NetworkConfig, subnet: Ipv4Net) -> Result<Config, ConfigError> {
    let node = NodeSettings::validate(raw)?;
    let net = NetworkParams::leased(raw, &node, net, subnet)?;
    Ok(Config { node, net, peers: PeerSource::Leases })
}

/// A validated configuration, in the three parts that come from different places and change
/// for different reasons.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Config {
    /// This node: who it is and how it runs. Always from its own file and flags.
    pub node: NodeSettings,
    /// The overlay this node is part of and its place in it. Static mode: the file; lease
    /// mode: the store's network config and the leased subnet ([`resolve_leased`]).
    pub net: NetworkParams,
    /// Where the other nodes come from.
    pub peers: PeerSource,
}

/// The settings of this node alone, whatever network it joins.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct NodeSettings {
    /// This node's name.
    pub node_name: String,
    /// Underlay address.
    pub public_ip: IpAddr,
    /// The underlay interface as configured (a name or an address), if any.
    pub iface: Option<String>,
    /// TUN/TAP name.
    pub tun_name: String,
    /// TUN or TAP.
    pub device: Device,
    /// Worker count.
    pub workers: usize,
    /// I/O backend preference.
    pub io: IoPreference,
    /// Whether to use TUN offloads and UDP GSO (TUN mode, either I/O backend).
    pub offload: bool,
    /// Whether to use UDP GRO and merge segments for the TUN (needs `offload`).
    pub gro: bool,
    /// API socket path.
    pub api_socket: PathBuf,
    /// Pod allocation directory.
    pub pod_dir: PathBuf,
    /// Pod GC grace period.
    pub pod_gc_grace: std::time::Duration,
    /// Pending-release directory, drained at start and every 30 s (`daemon::pending`).
    pub pending_release_dir: PathBuf,
    /// Masquerade pod traffic leaving the cluster network (`daemon::masq`).
    pub ip_masq: bool,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; `None`: off.
    pub healthz: Option<SocketAddr>,
}

/// The overlay: the cluster network, this node's subnet in it, and the wire format.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct NetworkParams {
    /// Wire format.
    pub backend: Backend,
    /// Underlay port.
    pub port: u16,
    /// Cluster network.
    pub network: Ipv4Net,
    /// Our subnet.
    pub subnet: Ipv4Net,
    /// IPv6 cluster network.
    pub network_v6: Option<Ipv6Net>,
    /// Our IPv6 subnet.
    pub subnet_v6: Option<Ipv6Net>,
    /// Explicit overlay MTU.
    pub mtu: Option<u16>,
    /// Where `mtu` came from, for messages: `mtu` (this node) or `Backend.MTU` (the network
    /// config).
    pub mtu_field: &'static str,
}

/// Where the peers come from.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum PeerSource {
    /// `[[peers]]` in the file, validated against this node and its network; a SIGHUP
    /// re-reads them.
    Static(Vec<Peer>),
    /// The lease store: peers follow its leases (`daemon::lease`).
    Leases,
}

impl PeerSource {
    /// The static peers; none for [`PeerSource::Leases`] (those live in the lease task).
    pub fn configured(&self) -> &[Peer] {
        match self {
            Self::Static(p) => p,
            Self::Leases => &[],
        }
    }
}

/// Default `healthz_ip`: the endpoints are local unless asked otherwise.
pub const DEFAULT_HEALTHZ_IP: &str = "127.0.0.1";

/// The address of the health and metrics endpoints from `healthz_ip` and `healthz_port`;
/// `None` when `healthz_port` is unset or 0 (off, flannel's default). The address is checked
/// even then, so that a typo shows before someone turns the port on.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `healthz_ip`.
pub fn healthz_addr(raw: &RawConfig) -> Result<Option<SocketAddr>, ConfigError> {
    let ip_s = raw.healthz_ip.as_deref().unwrap_or(DEFAULT_HEALTHZ_IP);
    let ip: IpAddr = ip_s.parse().map_err(|_| {
        invalid("healthz_ip", format!("{ip_s:?} is not an IP address (example: \"0.0.0.0\" for every interface)"))
    })?;
    if ip.is_multicast() {
        return Err(invalid("healthz_ip", format!("{ip} is a multicast address")));
    }
    Ok(raw.healthz_port.filter(|p| *p != 0).map(|port| SocketAddr::new(ip, port)))
}

fn parse_v4(field: &str, s: &str) -> Result<Ipv4Net, ConfigError> {
    let net: Ipv4Net =
        s.parse().map_err(|_| invalid(field, format!("{s:?} is not an IPv4 CIDR (example: \"10.244.0.0/16\")")))?;
    if net.trunc() != net {
        return Err(invalid(field, format!("{s:?} has host bits set (did you mean \"{}\"?)", net.trunc())));
    }
    Ok(net)
}

fn parse_v6(field: &str, s: &str) -> Result<Ipv6Net, ConfigError> {
    let net: Ipv6Net =
        s.parse().map_err(|_| invalid(field, format!("{s:?} is not an IPv6 CIDR (example: \"fd00:10:244::/56\")")))?;
    if net.trunc() != net {
        return Err(invalid(field, format!("{s:?} has host bits set (did you mean \"{}\"?)", net.trunc())));
    }
    Ok(net)
}

fn parse_mac(field: &str, s: &str) -> Result<MacAddr, ConfigError> {
    let m: MacAddr =
        s.parse().map_err(|e: weft_forwarder::wire::ethernet::MacParseError| invalid(field, e.to_string()))?;
    if !m.is_valid_source() {
        return Err(invalid(field, format!("{m} is not a unicast MAC address")));
    }
    Ok(m)
}

/// Whether `s` can name a Linux interface: 1-15 bytes, no '/', ':' or white space, not `.`/`..`.
fn is_ifname(s: &str) -> bool {
    !(s.is_empty()
        || s.len() > 15
        || s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
        || s == "."
        || s == "..")
}

/// The node key's file: `wireguard_key_file`, else `<DEFAULT_KEY_DIR>/<node_name>.key`.
pub fn wireguard_key_file(set: Option<&Path>, node_name: &str) -> PathBuf {
    set.map_or_else(|| Path::new(DEFAULT_KEY_DIR).join(format!("{node_name}.key")), Path::to_path_buf)
}

/// A node name: what flannel and Kubernetes accept, letters, digits, `.`, `_`, `-`.
fn check_name(field: &str, s: &str) -> Result<(), ConfigError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(field, format!("{s:?} must be 1-63 letters, digits, '.', '_' or '-', starting alphanumeric")))
    }
}

impl Config {
    /// Validates a raw configuration: this node's settings, then its network, then its
    /// static peers against both.
    ///
    /// # Errors
    /// The first [`ConfigError`] found, naming its field.
    pub fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let node = NodeSettings::validate(&raw)?;
        let net = NetworkParams::validate(&raw, &node)?;
        let peers = static_peers(raw.peers, &node, &net)?;
        Ok(Self { node, net, peers: PeerSource::Static(peers) })
    }

    /// The networks routed into the TUN.
    pub fn cluster_networks(&self) -> impl Iterator<Item = IpNet> {
        std::iter::once(IpNet::V4(self.net.network)).chain(self.net.network_v6.map(IpNet::V6))
    }

    /// Fields whose change needs a restart, named, when comparing with a reloaded config.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        macro_rules! cmp {
            ($($part:ident . $f:ident),*) => {
                $( if self.$part.$f != new.$part.$f { out.push(stringify!($f)); } )*
            };
        }
        cmp!(
            node.node_name,
            node.public_ip,
            node.iface,
            net.backend,
            net.port,
            net.network,
            net.subnet,
            net.network_v6,
            net.subnet_v6,
            node.tun_name,
            node.device,
            net.mtu,
            node.workers,
            node.io,
            node.offload,
            node.gro,
            node.api_socket,
            node.pod_dir,
            node.pod_gc_grace,
            node.pending_release_dir,
            node.ip_masq,
            node.healthz
        );
        out
    }
}

impl NodeSettings {
    /// Validates this node's own settings.
    ///
    /// # Errors
    /// The first [`ConfigError`] found, naming its field.
    pub fn validate(raw: &RawConfig) -> Result<Self, ConfigError> {
        let healthz = healthz_addr(raw)?;
        let node_name = raw.node_name.clone().ok_or(ConfigError::Missing { field: "node_name", flag: "node-name" })?;
        check_name("node_name", &node_name)?;
        let ip_s = raw.public_ip.as_deref().ok_or(ConfigError::Missing { field: "public_ip", flag: "public-ip" })?;
        let public_ip: IpAddr =
            ip_s.parse().map_err(|_| invalid("public_ip", format!("{ip_s:?} is not an IP address")))?;
        if public_ip.is_unspecified() || public_ip.is_multicast() {
            return Err(invalid("public_ip", format!("{public_ip} is not a unicast address peers can send to")));
        }
        if let Some(i) = raw.iface.as_deref() {
            if i.parse::<IpAddr>().is_err() && !is_ifname(i) {
                return Err(invalid(
                    "iface",
                    format!(
                        "{i:?} is neither an IP address nor an interface name (example: \"eth0\" or \"198.18.0.1\")"
                    ),
                ));
            }
        }
        let tun_name = raw.tun_name.clone().unwrap_or_else(|| DEFAULT_TUN.to_string());
        if !is_ifname(&tun_name) {
            return Err(invalid(
                "tun_name",
                format!("{tun_name:?} is not a Linux interface name (1-15 characters, no '/', ':' or spaces)"),
            ));
        }
        let device = match raw.device.as_deref().unwrap_or("tun") {
            "tun" => Device::Tun,
            "tap" => Device::Tap,
            other => return Err(invalid("device", format!("{other:?} must be \"tun\" or \"tap\""))),
        };
        let workers = raw.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if workers == 0 || workers > MAX_WORKERS {
            return Err(invalid("workers", format!("{workers} must be between 1 and {MAX_WORKERS}")));
        }
        let io = match raw.io.as_deref().unwrap_or("auto") {
            "auto" => IoPreference::Auto,
            "uring" => IoPreference::Uring,
            "mmsg" => IoPreference::Mmsg,
            other => return Err(invalid("io", format!("{other:?} must be \"auto\", \"uring\" or \"mmsg\""))),
        };
        let api_socket = raw.api_socket.clone().unwrap_or_else(|| DEFAULT_API_SOCKET.into());
        // One directory per node by default, so several daemons on one host never share one.
        let pod_dir = raw.pod_dir.clone().unwrap_or_else(|| Path::new(DEFAULT_POD_DIR).join(&node_name));
        let pod_gc_grace = std::time::Duration::from_secs(raw.pod_gc_grace_secs.unwrap_or(60));
        // One directory for all daemons on a host by default, unlike pod_dir: the plugin cannot
        // know the node's name, and each entry names the socket of the daemon it is for.
        let pending_release_dir =
            raw.pending_release_dir.clone().unwrap_or_else(|| weft_ipam::PendingReleases::DEFAULT_DIR.into());
        Ok(Self {
            node_name,
            public_ip,
            iface: raw.iface.clone(),
            tun_name,
            device,
            workers,
            io,
            offload: raw.offload.unwrap_or(true),
            gro: raw.gro.unwrap_or(true),
            api_socket,
            pod_dir,
            pod_gc_grace,
            pending_release_dir,
            ip_masq: raw.ip_masq.unwrap_or(false),
            healthz,
        })
    }
}

impl NetworkParams {
    /// Validates the network as the file (static mode) sets it.
    ///
    /// # Errors
    /// The first [`ConfigError`] found, naming its field.
    pub fn validate(raw: &RawConfig, node: &NodeSettings) -> Result<Self, ConfigError> {
        let backend = backend(raw.backend.as_deref().unwrap_or("udp"), raw.vni, raw, &node.node_name)?;
        if raw.wireguard_key_file.is_some() && !matches!(backend, Backend::WireGuard { .. }) {
            return Err(invalid("wireguard_key_file", "only applies to backend = \"wireguard\""));
        }
        let default_port = match backend {
            Backend::Udp => flannel_udp::DEFAULT_PORT,
            Backend::Vxlan { .. } => vxlan::DEFAULT_PORT,
            Backend::WireGuard { .. } => WIREGUARD_DEFAULT_PORT,
        };
        let network = parse_v4("network", raw.network.as_deref().unwrap_or(DEFAULT_NETWORK))?;
        let subnet_s = raw.subnet.as_deref().ok_or(ConfigError::Missing { field: "subnet", flag: "subnet" })?;
        let subnet = parse_v4("subnet", subnet_s)?;
        Self::checked(backend, raw.port.unwrap_or(default_port), network, subnet, raw, node)
    }

    /// The network from the store's network config `net` (already validated by the store
    /// layer) and our leased `subnet`, taken as typed values; this node's file adds only what
    /// is its own (VTEP MAC, UDP checksums, IPv6, MTU). The network's `Backend.MTU` is the
    /// overlay MTU unless this node sets its own `mtu` (a node with a smaller underlay may).
    ///
    /// # Errors
    /// A [`ConfigError`] if the combination is invalid (e.g. a vtep_mac with a udp network,
    /// or `Backend.DirectRouting` with `device = "tap"`).
    pub fn leased(
        raw: &RawConfig,
        node: &NodeSettings,
        net: &weft_ipam::NetworkConfig,
        subnet: Ipv4Net,
    ) -> Result<Self, ConfigError> {
        let b = &net.backend;
        let vxlan = matches!(b.kind, weft_ipam::BackendKind::Vxlan);
        // A wireguard_key_file set for a network that turns out not to be wireguard is not
        // an error here (rootless sets one by default): it is unused.
        let backend = backend(b.kind.as_str(), vxlan.then(|| b.vni()), raw, &node.node_name)?;
        let mut params = Self::checked(backend, b.port(), net.network, subnet, raw, node)?;
        if b.direct_routing() && node.device == Device::Tap {
            // A TAP routes every peer subnet onlink through itself; a direct route for the same
            // prefix would replace it, and which one wins would depend on the order of events.
            return Err(invalid(
                "Backend.DirectRouting",
                "true does not work with device = \"tap\" on this node (use device = \"tun\")",
            ));
        }
        if let (None, Some(m)) = (params.mtu, b.mtu) {
            params.mtu = Some(m);
            params.mtu_field = "Backend.MTU";
        }
        Ok(params)
    }

    /// The checks both sources share, and this node's own IPv6 and MTU settings.
    fn checked(
        backend: Backend,
        port: u16,
        network: Ipv4Net,
        subnet: Ipv4Net,
        raw: &RawConfig,
        node: &NodeSettings,
    ) -> Result<Self, ConfigError> {
        if port == 0 {
            return Err(invalid("port", "0 is not a port peers can send to"));
        }
        if network.prefix_len() > 28 {
            return Err(invalid("network", format!("{network} is too small to hold node subnets (at most /28)")));
        }
        if !network.contains(&subnet) || subnet.prefix_len() <= network.prefix_len() {
            return Err(invalid(
                "subnet",
                format!("{subnet} must lie inside network {network} and be smaller than it"),
            ));
        }
        if subnet.prefix_len() > 30 {
            return Err(invalid("subnet", format!("{subnet} leaves no room for a gateway and pods (at most /30)")));
        }
        let network_v6 = raw.ipv6_network.as_deref().map(|s| parse_v6("ipv6_network", s)).transpose()?;
        let subnet_v6 = match (network_v6, raw.ipv6_subnet.as_deref()) {
            (None, None) => None,
            (Some(_), None) => return Err(ConfigError::Missing { field: "ipv6_subnet", flag: "ipv6-subnet" }),
            (None, Some(_)) => return Err(ConfigError::Missing { field: "ipv6_network", flag: "ipv6-network" }),
            (Some(n), Some(s)) => {
                let sub = parse_v6("ipv6_subnet", s)?;
                if !n.contains(&sub) || sub.prefix_len() <= n.prefix_len() || sub.prefix_len() > 126 {
                    return Err(invalid(
                        "ipv6_subnet",
                        format!("{sub} must lie inside ipv6_network {n}, smaller than it, at most /126"),
                    ));
                }
                Some(sub)
            }
        };
        if node.device == Device::Tap && !matches!(backend, Backend::Vxlan { .. }) {
            return Err(invalid(
                "device",
                "\"tap\" needs backend = \"vxlan\" (udp and wireguard carry IP packets only)",
            ));
        }
        let min_mtu: u16 = if subnet_v6.is_some() { 1280 } else { 576 };
        if let Some(m) = raw.mtu {
            if m < min_mtu {
                return Err(invalid("mtu", format!("{m} is below the minimum of {min_mtu} bytes")));
            }
        }
        Ok(Self { backend, port, network, subnet, network_v6, subnet_v6, mtu: raw.mtu, mtu_field: "mtu" })
    }
}

/// The wire format `kind` with its options: `vni` (the file's, or the store's for a leased
/// vxlan network) and this node's `vtep_mac`, `udp_checksum` and `wireguard_key_file`.
fn backend(kind: &str, vni: Option<u32>, raw: &RawConfig, node_name: &str) -> Result<Backend, ConfigError> {
    let only_vxlan = |fields: &[(&'static str, bool)]| match fields.iter().find(|(_, set)| *set) {
        Some((field, _)) => Err(invalid(*field, "only applies to backend = \"vxlan\"")),
        None => Ok(()),
    };
    match kind {
        "udp" => {
            only_vxlan(&[("vni", vni.is_some()), ("vtep_mac", raw.vtep_mac.is_some())])?;
            Ok(Backend::Udp)
        }
        "vxlan" => {
            let v = vni.unwrap_or(1);
            let vni = Vni::new(v).ok_or_else(|| invalid("vni", format!("{v} does not fit 24 bits (0..=16777215)")))?;
            let vtep_mac = match raw.vtep_mac.as_deref() {
                Some(m) => parse_mac("vtep_mac", m)?,
                None => derived_vtep_mac(node_name),
            };
            Ok(Backend::Vxlan { vni, vtep_mac, udp_checksum: raw.udp_checksum.unwrap_or(false) })
        }
        "wireguard" => {
            only_vxlan(&[
                ("vni", vni.is_some()),
                ("vtep_mac", raw.vtep_mac.is_some()),
                ("udp_checksum", raw.udp_checksum.is_some()),
            ])?;
            Ok(Backend::WireGuard { key_file: wireguard_key_file(raw.wireguard_key_file.as_deref(), node_name) })
        }
        other => Err(invalid("backend", format!("{other:?} must be \"udp\", \"vxlan\" or \"wireguard\""))),
    }
}

/// The file's `[[peers]]`, each checked against this node and its network.
fn static_peers(raw: Vec<RawPeer>, node: &NodeSettings, net: &NetworkParams) -> Result<Vec<Peer>, ConfigError> {
    let (network, subnet, network_v6, subnet_v6) = (net.network, net.subnet, net.network_v6, net.subnet_v6);
    let (node_name, public_ip, port, backend) = (&node.node_name, node.public_ip, net.port, &net.backend);
    let own = SocketAddr::new(public_ip, port);
    let mut names = HashSet::new();
    let mut peers = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let f = |name: &str| format!("peers[{i}].{name}");
        check_name(&f("name"), &p.name)?;
        if p.name == *node_name || !names.insert(p.name.clone()) {
            return Err(invalid(f("name"), format!("{:?} is this node or another peer already", p.name)));
        }
        let psub = parse_v4(&f("subnet"), &p.subnet)?;
        if !network.contains(&psub) {
            return Err(invalid(f("subnet"), format!("{psub} lies outside the cluster network {network}")));
        }
        if psub.contains(&subnet) || subnet.contains(&psub) {
            return Err(invalid(f("subnet"), format!("{psub} overlaps this node's subnet {subnet}")));
        }
        let psub6 = match (&p.ipv6_subnet, network_v6) {
            (None, _) => None,
            (Some(_), None) => return Err(invalid(f("ipv6_subnet"), "set, but this node has no ipv6_network")),
            (Some(s), Some(n6)) => {
                let s6 = parse_v6(&f("ipv6_subnet"), s)?;
                if !n6.contains(&s6) {
                    return Err(invalid(f("ipv6_subnet"), format!("{s6} lies outside ipv6_network {n6}")));
                }
                if subnet_v6.is_some_and(|o| o.contains(&s6) || s6.contains(&o)) {
                    return Err(invalid(f("ipv6_subnet"), format!("{s6} overlaps this node's IPv6 subnet")));
                }
                Some(s6)
            }
        };
        let endpoint = match p.endpoint.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => match p.endpoint.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, port),
                Err(_) => {
                    return Err(invalid(
                        f("endpoint"),
                        format!("{:?} is not ip:port or ip (example: \"198.18.0.2:8285\")", p.endpoint),
                    ));
                }
            },
        };
        if endpoint.is_ipv4() != public_ip.is_ipv4() {
            return Err(invalid(
                f("endpoint"),
                format!("{endpoint} is not in the same address family as public_ip {public_ip}"),
            ));
        }
        if endpoint == own || endpoint.port() == 0 || endpoint.ip().is_unspecified() {
            return Err(invalid(
                f("endpoint"),
                format!("{endpoint} is this node's own address or not a usable endpoint"),
            ));
        }
        if let Some(m) = p.mtu {
            if m < 576 {
                return Err(invalid(f("mtu"), format!("{m} is below the minimum of 576 bytes")));
            }
        }
        let mac = p.mac.as_deref().map(|m| parse_mac(&f("mac"), m)).transpose()?;
        let public_key = match (backend, p.public_key.as_deref()) {
            (Backend::WireGuard { .. }, None) => {
                return Err(invalid(f("public_key"), "required with backend = \"wireguard\" (the peer's `wg pubkey`)"));
            }
            (Backend::WireGuard { .. }, Some(k)) => {
                Some(k.parse().map_err(|e| invalid(f("public_key"), format!("{k:?}: {e}")))?)
            }
            (_, Some(_)) => return Err(invalid(f("public_key"), "only applies to backend = \"wireguard\"")),
            (_, None) => None,
        };
        if let Backend::Vxlan { vtep_mac, .. } = *backend {
            match mac {
                None => return Err(invalid(f("mac"), "required with backend = \"vxlan\" (the peer's VTEP MAC)")),
                Some(m) if m == vtep_mac => {
                    return Err(invalid(f("mac"), format!("{m} is this node's own VTEP MAC")));
                }
                Some(_) => {}
            }
        }
        peers.push(Peer { name: p.name, subnet: psub, subnet_v6: psub6, endpoint, mac, public_key, mtu: p.mtu });
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node_name = "n1"
public_ip = "198.18.0.1"
subnet = "10.244.1.0/24"
workers = 1
[[peers]]
name = "n2"
subnet = "10.244.2.0/24"
endpoint = "198.18.0.2:8285"
[[peers]]
name = "n3"
subnet = "10.244.3.0/24"
endpoint = "198.18.0.3"
mtu = 1200
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::validate(
            toml::from_str(s).map_err(|e| ConfigError::Parse { path: "t".into(), message: e.to_string() })?,
        )
    }

    #[test]
    fn good_config_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.net.port, 8285);
        assert_eq!(c.net.network.to_string(), "10.244.0.0/16");
        assert_eq!(c.node.tun_name, "weft0");
        assert_eq!(c.peers.configured()[1].endpoint, "198.18.0.3:8285".parse().unwrap());
        assert_eq!(c.peers.configured()[1].mtu, Some(1200));
    }

    /// Each bad value is refused with a message naming its field.
    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("subnet = \"10.244.1.0/24\"", "subnet = \"10.244.1.7/24\"", "subnet: \"10.244.1.7/24\" has host bits set"),
            (
                "subnet = \"10.244.1.0/24\"",
                "subnet = \"10.245.1.0/24\"",
                "subnet: 10.245.1.0/24 must lie inside network",
            ),
            ("subnet = \"10.244.1.0/24\"", "subnet = \"banana\"", "subnet: \"banana\" is not an IPv4 CIDR"),
            ("node_name = \"n1\"", "node_name = \"n 1\"", "node_name:"),
            ("public_ip = \"198.18.0.1\"", "public_ip = \"0.0.0.0\"", "public_ip:"),
            ("workers = 1", "workers = 0", "workers: 0 must be between"),
            ("workers = 1", "workers = 1\nio = \"fast\"", "io: \"fast\""),
            ("workers = 1", "workers = 1\ntun_name = \"a-very-long-tun-name\"", "tun_name:"),
            ("endpoint = \"198.18.0.3\"", "endpoint = \"nowhere\"", "peers[1].endpoint:"),
            (
                "subnet = \"10.244.3.0/24\"",
                "subnet = \"10.244.1.0/25\"",
                "peers[1].subnet: 10.244.1.0/25 overlaps this node's subnet",
            ),
            ("subnet = \"10.244.3.0/24\"", "subnet = \"10.9.3.0/24\"", "peers[1].subnet: 10.9.3.0/24 lies outside"),
            ("name = \"n3\"", "name = \"n2\"", "peers[1].name:"),
            ("mtu = 1200", "mtu = 100", "peers[1].mtu: 100"),
            ("workers = 1", "workers = 1\nbogus = 3", "unknown field `bogus`"),
        ];
        for (from, to, want) in cases {
            let text = GOOD.replacen(from, to, 1);
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{to}: got {err:?}, want {want:?}");
        }
        let err = parse(&GOOD.replace("subnet = \"10.244.1.0/24\"\n", "")).unwrap_err().to_string();
        assert!(err.starts_with("subnet: required"), "{err}");
    }

    #[test]
    fn flags_override_file_and_peer_flag_parses() {
        let file: RawConfig = toml::from_str(GOOD).unwrap();
        let flags = RawConfig {
            port: Some(9000),
            peers: vec![RawPeer::from_flag("name=n9,subnet=10.244.9.0/24,endpoint=198.18.0.9:9000,mtu=1300").unwrap()],
            ..RawConfig::default()
        };
        let c = Config::validate(file.merge(flags)).unwrap();
        assert_eq!(c.net.port, 9000);
        assert_eq!(c.peers.configured().len(), 1);
        assert_eq!(c.peers.configured()[0].mtu, Some(1300));
        assert!(RawPeer::from_flag("name=x,subnet=10.244.9.0/24").unwrap_err().contains("endpoint"));
        assert!(RawPeer::from_flag("name=x,color=red").unwrap_err().contains("color"));
    }

    #[test]
    fn vxlan_defaults_and_checks() {
        let text = GOOD
            .replace("workers = 1", "workers = 1\nbackend = \"vxlan\"")
            .replace("endpoint = \"198.18.0.2:8285\"", "endpoint = \"198.18.0.2:8472\"\nmac = \"02:00:00:00:00:02\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("peers[1].mac: required with backend = \"vxlan\""), "{err}");
        let text = text.replace("mtu = 1200", "mtu = 1200\nmac = \"02:00:00:00:00:03\"");
        let c = parse(&text).unwrap();
        assert_eq!(c.net.port, 8472);
        let Backend::Vxlan { vni, vtep_mac, udp_checksum } = c.net.backend else { panic!("not vxlan") };
        assert_eq!((vni.get(), udp_checksum), (1, false));
        assert_eq!(vtep_mac, derived_vtep_mac("n1"));
        assert_ne!(derived_vtep_mac("n1"), derived_vtep_mac("n2"));
        for (from, to, want) in [
            ("workers = 1", "workers = 1\nvni = 16777216", "vni: 16777216 does not fit 24 bits"),
            (
                "workers = 1",
                "workers = 1\nvtep_mac = \"01:00:5e:00:00:01\"",
                "vtep_mac: 01:00:5e:00:00:01 is not a unicast",
            ),
            (
                "mac = \"02:00:00:00:00:03\"",
                "mac = \"02:00:00:00:03\"",
                "peers[1].mac: \"02:00:00:00:03\" is not a MAC",
            ),
            ("backend = \"vxlan\"", "backend = \"geneve\"", "backend: \"geneve\""),
        ] {
            let err = parse(&text.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(err.contains(want), "{to}: {err}");
        }
        let err = parse(&GOOD.replace("workers = 1", "workers = 1\nvni = 5")).unwrap_err().to_string();
        assert!(err.contains("vni: only applies to backend = \"vxlan\""), "{err}");
    }

    #[test]
    fn wireguard_needs_peer_keys_and_refuses_vxlan_options() {
        const K2: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        const K3: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
        let text = GOOD.replace("workers = 1", "workers = 1\nbackend = \"wireguard\"").replace(
            "endpoint = \"198.18.0.2:8285\"",
            &format!("endpoint = \"198.18.0.2:51820\"\npublic_key = \"{K2}\""),
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("peers[1].public_key: required with backend = \"wireguard\""), "{err}");
        let text = text.replace("mtu = 1200", &format!("mtu = 1200\npublic_key = \"{K3}\""));
        let c = parse(&text).unwrap();
        assert_eq!(c.net.port, 51820);
        assert_eq!(c.peers.configured()[0].public_key.map(|k| k.to_string()).as_deref(), Some(K2));
        assert_eq!(c.peers.configured()[1].endpoint.port(), 51820, "a bare address takes our port");
        let Backend::WireGuard { key_file } = &c.net.backend else { panic!("not wireguard") };
        assert_eq!(key_file, &PathBuf::from("/var/lib/weft/keys/n1.key"));
        for (from, to, want) in [
            (K3, "not-a-key", "peers[1].public_key: \"not-a-key\": not a WireGuard key"),
            ("workers = 1", "workers = 1\nvni = 2", "vni: only applies to backend = \"vxlan\""),
            ("workers = 1", "workers = 1\ndevice = \"tap\"", "device: \"tap\" needs backend = \"vxlan\""),
        ] {
            let err = parse(&text.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(err.contains(want), "{to}: {err}");
        }
        let err = parse(&GOOD.replace("mtu = 1200", &format!("mtu = 1200\npublic_key = \"{K3}\""))).unwrap_err();
        assert!(err.to_string().contains("peers[1].public_key: only applies to backend = \"wireguard\""), "{err}");
        let err = parse(&GOOD.replace("workers = 1", "workers = 1\nwireguard_key_file = \"/k\"")).unwrap_err();
        assert!(err.to_string().contains("wireguard_key_file: only applies"), "{err}");
    }

    #[test]
    fn no_subnet_means_lease_mode_and_its_fields_are_checked() {
        let lease = |extra: &str| {
            let text = format!("node_name = \"n1\"\npublic_ip = \"198.18.0.1\"\n{extra}");
            Loaded::from_raw(toml::from_str(&text).unwrap())
        };
        let Ok(Loaded::Lease { lease: l, .. }) = lease("store_dir = \"/tmp/s\"\nlease_ttl_secs = 30\ndevice = \"tap\"")
        else {
            panic!("not lease mode")
        };
        assert_eq!(l.store, StoreSettings::File { dir: "/tmp/s".into() });
        assert_eq!(l.ttl.as_secs(), 30);
        for (extra, want) in [
            ("network = \"10.244.0.0/16\"", "network: comes from the store"),
            ("backend = \"vxlan\"", "backend: comes from the store"),
            (
                "[[peers]]\nname = \"n2\"\nsubnet = \"10.244.2.0/24\"\nendpoint = \"198.18.0.2\"",
                "peers: comes from the store",
            ),
            ("store = \"etcd\"", "etcd_endpoints: required"),
            (
                "store = \"etcd\"\netcd_endpoints = [\"127.0.0.1:2379\"]",
                "etcd_endpoints[0]: \"127.0.0.1:2379\" is not a URL",
            ),
            ("store = \"consul\"", "store: \"consul\""),
            ("lease_ttl_secs = 5", "lease_ttl_secs: 5 must be between"),
        ] {
            let err = lease(extra).unwrap_err().to_string();
            assert!(err.starts_with(want), "{extra}: {err}");
        }
        let err = Loaded::from_raw(toml::from_str(&format!("store_dir = \"/tmp/s\"\n{GOOD}")).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("store_dir: only applies in lease mode"), "{err}");
        let net =
            weft_ipam::NetworkConfig::from_json(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let c = resolve_leased(
            &toml::from_str("node_name = \"n1\"\npublic_ip = \"198.18.0.1\"").unwrap(),
            &net,
            "10.244.9.0/24".parse().unwrap(),
        )
        .unwrap();
        assert_eq!((c.net.subnet.to_string(), c.net.port), ("10.244.9.0/24".to_string(), 8472));
        assert!(matches!(c.net.backend, Backend::Vxlan { .. }));
        assert_eq!((c.net.mtu, c.net.mtu_field), (None, "mtu"));
    }

    /// flannel's etcd TLS and user options: each bad combination or unusable file is refused
    /// naming its field; the password never shows in `Debug`.
    #[test]
    fn etcd_tls_and_user_fields_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().self_signed(&key).unwrap();
        let (ca, crt, pem_key, junk) =
            (dir.path().join("ca.crt"), dir.path().join("c.crt"), dir.path().join("c.key"), dir.path().join("junk"));
        std::fs::write(&ca, cert.pem()).unwrap();
        std::fs::write(&crt, cert.pem()).unwrap();
        std::fs::write(&pem_key, key.serialize_pem()).unwrap();
        std::fs::write(&junk, "not pem").unwrap();
        let (ca, crt, pem_key, junk) = (ca.display(), crt.display(), pem_key.display(), junk.display());
        let store = |extra: &str| {
            let text = format!("store = \"etcd\"\n{extra}");
            StoreSettings::from_raw(&toml::from_str::<RawConfig>(&text).unwrap())
        };
        let https = "etcd_endpoints = [\"https://10.0.0.1:2379\", \"https://10.0.0.2:2379\"]\n";
        let good = store(&format!(
            "{https}etcd_cafile = \"{ca}\"\netcd_certfile = \"{crt}\"\netcd_keyfile = \"{pem_key}\"\n\
             etcd_username = \"weft\"\netcd_password = \"s3cret\""
        ))
        .unwrap();
        let StoreSettings::Etcd { tls, credentials: Some(user), .. } = &good else { panic!("{good:?}") };
        assert_eq!(tls.cert_file.as_deref(), Some(Path::new(&crt.to_string())));
        assert_eq!((user.username.as_str(), user.password.expose()), ("weft", "s3cret"));
        assert!(!format!("{good:?}").contains("s3cret"), "the password stays out of Debug output");
        // https without a CA: etcd's certificate is checked against the system trust store.
        assert!(matches!(store(https), Ok(StoreSettings::Etcd { tls, .. }) if !tls.is_set()));

        for (extra, want) in [
            (format!("{https}etcd_certfile = \"{crt}\""), format!("etcd_keyfile: {crt}: the client key is missing")),
            (
                format!("{https}etcd_keyfile = \"{pem_key}\""),
                "etcd_certfile: ".to_owned() + &format!("{pem_key}: the client certificate is missing"),
            ),
            (
                format!("{https}etcd_cafile = \"/nonexistent/ca.crt\""),
                "etcd_cafile: /nonexistent/ca.crt: cannot read the CA certificate".into(),
            ),
            (format!("{https}etcd_cafile = \"{junk}\""), format!("etcd_cafile: {junk}: not a PEM CA certificate")),
            (
                format!("{https}etcd_certfile = \"{crt}\"\netcd_keyfile = \"{crt}\""),
                format!("etcd_keyfile: {crt}: not a PEM client key"),
            ),
            (
                format!("etcd_endpoints = [\"http://10.0.0.1:2379\"]\netcd_cafile = \"{ca}\""),
                "etcd_cafile: set, but etcd_endpoints are plain http (\"http://10.0.0.1:2379\"); use https://".into(),
            ),
            (
                "etcd_endpoints = [\"https://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]".into(),
                "etcd_endpoints[1]: \"http://10.0.0.2:2379\" mixes http:// and https://".into(),
            ),
            (format!("{https}etcd_username = \"weft\""), "etcd_password: required with etcd_username".into()),
            (format!("{https}etcd_password = \"x\""), "etcd_username: required".into()),
            (format!("{https}etcd_username = \"\"\netcd_password = \"x\""), "etcd_username: \"\" is not".into()),
        ] {
            let err = store(&extra).unwrap_err().to_string();
            assert!(err.starts_with(&want), "{extra}: got {err:?}, want {want:?}");
        }
        let file_store = toml::from_str::<RawConfig>(&format!("etcd_cafile = \"{ca}\"")).unwrap();
        let err = StoreSettings::from_raw(&file_store).unwrap_err().to_string();
        assert!(err.starts_with("etcd_cafile: set, but store is \"file\""), "{err}");
    }

    #[test]
    fn ip_masq_and_healthz_fields() {
        let c = parse(GOOD).unwrap();
        assert!(!c.node.ip_masq, "ip_masq is off by default");
        assert_eq!(c.node.healthz, None, "the endpoints are off by default");
        let c = parse(&GOOD.replace("workers = 1", "workers = 1\nip_masq = true\nhealthz_port = 8081")).unwrap();
        assert!(c.node.ip_masq);
        assert_eq!(c.node.healthz, Some("127.0.0.1:8081".parse().unwrap()), "127.0.0.1 when only a port is set");
        let c =
            parse(&GOOD.replace("workers = 1", "workers = 1\nhealthz_ip = \"0.0.0.0\"\nhealthz_port = 8081")).unwrap();
        assert_eq!(c.node.healthz, Some("0.0.0.0:8081".parse().unwrap()));
        let c =
            parse(&GOOD.replace("workers = 1", "workers = 1\nhealthz_ip = \"198.18.0.1\"\nhealthz_port = 0")).unwrap();
        assert_eq!(c.node.healthz, None, "port 0 is off, as flannel's --healthz-port 0");
        for (extra, want) in [
            ("healthz_ip = \"localhost\"\nhealthz_port = 8081", "healthz_ip: \"localhost\" is not an IP address"),
            ("healthz_ip = \"224.0.0.1\"", "healthz_ip: 224.0.0.1 is a multicast address"),
        ] {
            let err = parse(&GOOD.replace("workers = 1", &format!("workers = 1\n{extra}"))).unwrap_err().to_string();
            assert!(err.starts_with(want), "{extra}: {err}");
        }
        // Lease mode checks them too, before the store is asked for anything.
        let raw: RawConfig =
            toml::from_str("node_name = \"n1\"\npublic_ip = \"198.18.0.1\"\nhealthz_ip = \"x\"").unwrap();
        let err = Loaded::from_raw(raw).unwrap_err().to_string();
        assert!(err.starts_with("healthz_ip:"), "{err}");
    }

    #[test]
    fn restart_only_fields_are_named() {
        let a = parse(GOOD).unwrap();
        let mut b = a.clone();
        if let PeerSource::Static(p) = &mut b.peers {
            p.pop();
        }
        assert!(a.restart_only_changes(&b).is_empty());
        b.net.port = 1;
        assert_eq!(a.restart_only_changes(&b), vec!["port"]);
    }

    /// The network config's Backend.MTU is the overlay MTU unless the node sets its own;
    /// DirectRouting cannot share a node with a TAP.
    #[test]
    fn leased_backend_mtu_and_direct_routing() {
        let raw = |extra: &str| {
            toml::from_str::<RawConfig>(&format!("node_name = \"n1\"\npublic_ip = \"198.18.0.1\"\n{extra}")).unwrap()
        };
        let net = |backend: &str| {
            weft_ipam::NetworkConfig::from_json(&format!(r#"{{"Network":"10.244.0.0/16","Backend":{backend}}}"#))
                .unwrap()
        };
        let sub = "10.244.9.0/24".parse().unwrap();
        let c = resolve_leased(&raw(""), &net(r#"{"Type":"vxlan","MTU":1400}"#), sub).unwrap();
        assert_eq!((c.net.mtu, c.net.mtu_field), (Some(1400), "Backend.MTU"));
        let c = resolve_leased(&raw("mtu = 1300"), &net(r#"{"Type":"vxlan","MTU":1400}"#), sub).unwrap();
        assert_eq!((c.net.mtu, c.net.mtu_field), (Some(1300), "mtu"));
        let err = resolve_leased(&raw("device = \"tap\""), &net(r#"{"Type":"vxlan","DirectRouting":true}"#), sub)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("Backend.DirectRouting: true does not work with device = \"tap\""), "{err}");
        assert!(resolve_leased(&raw("device = \"tap\""), &net(r#"{"Type":"vxlan"}"#), sub).is_ok());
    }

    /// A leased config is the static one's node settings with the store's typed network: the
    /// node part is the same whichever source the network came from, the peers follow the
    /// store, and this node's options are still checked against the leased backend.
    #[test]
    fn leased_network_comes_typed_from_the_store() {
        let text = "node_name = \"n1\"\npublic_ip = \"198.18.0.1\"\nworkers = 1\nvtep_mac = \"02:00:00:00:00:07\"";
        let raw: RawConfig = toml::from_str(text).unwrap();
        let store = weft_ipam::NetworkConfig::from_json(
            r#"{"Network":"10.250.0.0/16","Backend":{"Type":"vxlan","VNI":42,"Port":4790}}"#,
        )
        .unwrap();
        let c = resolve_leased(&raw, &store, "10.250.3.0/24".parse().unwrap()).unwrap();
        let static_raw =
            RawConfig { subnet: Some("10.244.1.0/24".into()), backend: Some("vxlan".into()), ..raw.clone() };
        assert_eq!(c.node, Config::validate(static_raw).unwrap().node);
        assert_eq!(c.peers, PeerSource::Leases);
        assert!(c.peers.configured().is_empty());
        assert_eq!(
            (c.net.network.to_string(), c.net.subnet.to_string(), c.net.port),
            ("10.250.0.0/16".into(), "10.250.3.0/24".into(), 4790)
        );
        let Backend::Vxlan { vni, vtep_mac, .. } = c.net.backend else { panic!("vxlan") };
        assert_eq!((vni.get(), vtep_mac.to_string()), (42, "02:00:00:00:00:07".to_string()));
        let udp =
            weft_ipam::NetworkConfig::from_json(r#"{"Network":"10.250.0.0/16","Backend":{"Type":"udp"}}"#).unwrap();
        let err = resolve_leased(&raw, &udp, "10.250.3.0/24".parse().unwrap()).unwrap_err().to_string();
        assert!(err.starts_with("vtep_mac: only applies to backend = \"vxlan\""), "{err}");
    }

    /// `flannel_paths` moves subnet.env to where flannel's CNI plugin reads it; an explicit
    /// `subnet_file` still wins, and static mode (no subnet.env) refuses it.
    #[test]
    fn flannel_paths_default_the_subnet_file() {
        let lease = |extra: &str| {
            let text = format!("node_name = \"n1\"\npublic_ip = \"198.18.0.1\"\n{extra}");
            match Loaded::from_raw(toml::from_str(&text).unwrap()) {
                Ok(Loaded::Lease { lease, .. }) => Ok(lease.subnet_file),
                Ok(Loaded::Static(_)) => panic!("static"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(lease(""), Ok(PathBuf::from(DEFAULT_SUBNET_FILE)));
        assert_eq!(lease("flannel_paths = true"), Ok(PathBuf::from("/run/flannel/subnet.env")));
        assert_eq!(lease("flannel_paths = false"), Ok(PathBuf::from(DEFAULT_SUBNET_FILE)));
        assert_eq!(lease("flannel_paths = true\nsubnet_file = \"/x/s.env\""), Ok(PathBuf::from("/x/s.env")));
        let err = Loaded::from_raw(toml::from_str(&format!("flannel_paths = true\n{GOOD}")).unwrap()).unwrap_err();
        assert!(err.to_string().starts_with("flannel_paths: only applies in lease mode"), "{err}");
    }

    #[test]
    fn iface_is_a_name_or_an_address() {
        for ok in ["iface = \"eth0\"", "iface = \"198.18.0.1\"", "iface = \"enp0s31f6.100\""] {
            let c = parse(&GOOD.replace("workers = 1", &format!("workers = 1\n{ok}"))).unwrap();
            assert!(c.node.iface.is_some(), "{ok}");
        }
        for bad in ["iface = \"\"", "iface = \"eth/0\"", "iface = \"a-very-long-interface\""] {
            let err = parse(&GOOD.replace("workers = 1", &format!("workers = 1\n{bad}"))).unwrap_err().to_string();
            assert!(
                err.starts_with("iface: ") && err.contains("neither an IP address nor an interface name"),
                "{bad}: {err}"
            );
        }
    }
}
