//! `subnet.env`, flannel's hand-off file, in flannel's exact format.
//!
//! ```text
//! FLANNEL_NETWORK=10.244.0.0/16
//! FLANNEL_SUBNET=10.244.1.1/24
//! FLANNEL_MTU=1472
//! FLANNEL_IPMASQ=false
//! ```
//!
//! `FLANNEL_SUBNET` is the first usable address over the subnet's prefix length, not the
//! subnet itself (flannel's `WriteSubnetFile` increments the IP). The IPv6 lines come between
//! `FLANNEL_SUBNET` and `FLANNEL_MTU` when present. With this file the flannel CNI plugin and
//! `docker --bip/--mtu` scripts work with weft unchanged, and it is weft's memory of its subnet
//! across restarts (the second step of the acquire order). It is written atomically and durably
//! (temp + fsync + rename + fsync dir) so a crash never leaves a half file that would make the
//! next start forget its subnet.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::durable;

/// flannel's default location, which the flannel CNI plugin reads.
pub const DEFAULT_PATH: &str = "/run/flannel/subnet.env";

/// `subnet.env` is world-readable, as flannel's is (`WriteSubnetFile` writes 0644): the CNI
/// plugins and kubelet read it.
pub const SUBNET_ENV_MODE: u32 = 0o644;

/// The contents of `subnet.env`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the cluster network.
    pub network: Ipv4Net,
    /// The node's subnet (`FLANNEL_SUBNET` is written as its first usable address).
    pub subnet: Ipv4Net,
    /// `FLANNEL_IPV6_NETWORK`, for dual-stack.
    pub ipv6_network: Option<Ipv6Net>,
    /// The node's IPv6 subnet (`FLANNEL_IPV6_SUBNET`, written as its first address + 1).
    pub ipv6_subnet: Option<Ipv6Net>,
    /// `FLANNEL_MTU`: the overlay MTU pods should use.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`: whether the daemon masquerades traffic leaving the network (the flannel
    /// CNI plugin then sets `ipMasq: false` on its bridge).
    pub ipmasq: bool,
}

/// Why `subnet.env` could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is not `KEY=VALUE`, or a value does not parse.
    #[error("subnet.env line {line}: {key}: {reason}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The key (or the whole line when there is no `=`).
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A required key is absent.
    #[error("subnet.env: {key} is missing")]
    Missing {
        /// The key.
        key: &'static str,
    },
}

impl SubnetEnv {
    /// The file's text in flannel's exact format and line order.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = writeln!(s, "FLANNEL_NETWORK={}", self.network);
        let _ = writeln!(s, "FLANNEL_SUBNET={}", first_host_v4(self.subnet));
        if let Some(n) = self.ipv6_network {
            let _ = writeln!(s, "FLANNEL_IPV6_NETWORK={n}");
        }
        if let Some(n) = self.ipv6_subnet {
            let _ = writeln!(s, "FLANNEL_IPV6_SUBNET={}", first_host_v6(n));
        }
        let _ = writeln!(s, "FLANNEL_MTU={}", self.mtu);
        let _ = writeln!(s, "FLANNEL_IPMASQ={}", self.ipmasq);
        s
    }

    /// Parses the file's text. Blank lines and `#` comments are skipped, surrounding whitespace
    /// is ignored, and unknown keys are tolerated (a newer flannel may add some).
    ///
    /// # Errors
    /// [`SubnetEnvError::BadLine`] naming the line and key, or [`SubnetEnvError::Missing`] for
    /// `FLANNEL_NETWORK`, `FLANNEL_SUBNET` or `FLANNEL_MTU`.
    pub fn parse(text: &str) -> Result<Self, SubnetEnvError> {
        let (mut network, mut subnet, mut v6n, mut v6s, mut mtu, mut ipmasq) = (None, None, None, None, None, false);
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |key: &str, reason: &str| SubnetEnvError::BadLine {
                line: i + 1,
                key: key.to_owned(),
                reason: reason.to_owned(),
            };
            let (key, value) = line.split_once('=').ok_or_else(|| bad(line, "not KEY=VALUE"))?;
            let (key, value) = (key.trim(), value.trim());
            match key {
                "FLANNEL_NETWORK" => {
                    network = Some(value.parse::<Ipv4Net>().map_err(|_| bad(key, "not an IPv4 CIDR"))?.trunc());
                }
                // flannel parses these with net.ParseCIDR, which masks the host bits.
                "FLANNEL_SUBNET" => {
                    subnet = Some(value.parse::<Ipv4Net>().map_err(|_| bad(key, "not an IPv4 CIDR"))?.trunc());
                }
                "FLANNEL_IPV6_NETWORK" => {
                    v6n = Some(value.parse::<Ipv6Net>().map_err(|_| bad(key, "not an IPv6 CIDR"))?.trunc());
                }
                "FLANNEL_IPV6_SUBNET" => {
                    v6s = Some(value.parse::<Ipv6Net>().map_err(|_| bad(key, "not an IPv6 CIDR"))?.trunc());
                }
                "FLANNEL_MTU" => mtu = Some(value.parse::<u32>().map_err(|_| bad(key, "not a number"))?),
                "FLANNEL_IPMASQ" => {
                    ipmasq = match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad(key, "not true or false")),
                    }
                }
                _ => {}
            }
        }
        Ok(Self {
            network: network.ok_or(SubnetEnvError::Missing { key: "FLANNEL_NETWORK" })?,
            subnet: subnet.ok_or(SubnetEnvError::Missing { key: "FLANNEL_SUBNET" })?,
            ipv6_network: v6n,
            ipv6_subnet: v6s,
            mtu: mtu.ok_or(SubnetEnvError::Missing { key: "FLANNEL_MTU" })?,
            ipmasq,
        })
    }

    /// Reads `path`; `Ok(None)` when the file does not exist (first start).
    ///
    /// # Errors
    /// I/O errors other than "not found", and parse errors.
    pub fn read(path: &Path) -> Result<Option<Self>, SubnetEnvError> {
        let bytes = durable::read_optional(path).map_err(io_err)?;
        let Some(bytes) = bytes else { return Ok(None) };
        let text = String::from_utf8_lossy(&bytes);
        Self::parse(&text).map(Some)
    }

    /// Only the previous subnet, for the acquire order: a missing or unreadable file means
    /// "no previous subnet" (flannel logs and carries on the same way).
    pub fn read_previous_subnet(path: &Path) -> Option<Ipv4Net> {
        Self::read(path).ok().flatten().map(|env| env.subnet)
    }

    /// Writes `path` atomically and durably, creating its directory if needed. The file is
    /// 0644 whatever the umask, and its directory keeps the usual 0755: the flannel CNI plugin
    /// and kubelet read it, as they read flannel's `/run/flannel/subnet.env`. Nothing is
    /// locked here, so nothing in that directory needs hiding.
    ///
    /// # Errors
    /// The I/O error, naming the path.
    pub fn write(&self, path: &Path) -> Result<(), SubnetEnvError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| SubnetEnvError::Io { path: dir.to_path_buf(), source: e })?;
        }
        durable::write_atomic_mode(path, self.to_text().as_bytes(), SUBNET_ENV_MODE).map_err(io_err)
    }
}

fn io_err(e: durable::PathError) -> SubnetEnvError {
    SubnetEnvError::Io { path: e.path, source: e.source }
}

fn first_host_v4(subnet: Ipv4Net) -> Ipv4Net {
    let addr = Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1));
    Ipv4Net::new(addr, subnet.prefix_len()).unwrap_or(subnet)
}

fn first_host_v6(subnet: Ipv6Net) -> Ipv6Net {
    let addr = Ipv6Addr::from(u128::from(subnet.network()).wrapping_add(1));
    Ipv6Net::new(addr, subnet.prefix_len()).unwrap_or(subnet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env() -> SubnetEnv {
        SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 1472,
            ipmasq: false,
        }
    }

    #[test]
    fn exact_flannel_bytes() {
        assert_eq!(
            env().to_text(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        );
        let dual = SubnetEnv {
            ipv6_network: Some("fd00:10:244::/56".parse().unwrap()),
            ipv6_subnet: Some("fd00:10:244:1::/64".parse().unwrap()),
            ipmasq: true,
            ..env()
        };
        assert_eq!(
            dual.to_text(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\n\
             FLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn parses_what_flannel_writes() {
        let text =
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        let e = SubnetEnv::parse(text).unwrap();
        assert_eq!(e.subnet, "10.244.7.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!((e.mtu, e.ipmasq), (1450, true));
        // Whitespace, comments and unknown keys are tolerated.
        let loose = "# written by hand\n  FLANNEL_NETWORK = 10.244.0.0/16 \n\nFLANNEL_SUBNET=10.244.7.1/24\r\nFLANNEL_MTU=1450\nFUTURE=1\n";
        assert_eq!(SubnetEnv::parse(loose).unwrap().subnet, e.subnet);
    }

    #[test]
    fn errors_name_line_and_key() {
        let cases = [
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=banana\n",
                "subnet.env line 2: FLANNEL_SUBNET: not an IPv4 CIDR",
            ),
            ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1472\n", "subnet.env: FLANNEL_SUBNET is missing"),
            ("garbage\n", "subnet.env line 1: garbage: not KEY=VALUE"),
            ("FLANNEL_IPMASQ=yes\n", "subnet.env line 1: FLANNEL_IPMASQ: not true or false"),
        ];
        for (text, want) in cases {
            assert_eq!(SubnetEnv::parse(text).unwrap_err().to_string(), want);
        }
    }

    #[test]
    fn write_read_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        assert!(SubnetEnv::read(&path).unwrap().is_none());
        assert_eq!(SubnetEnv::read_previous_subnet(&path), None);
        env().write(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), Some(env()));
        // Readable by the CNI plugins and kubelet, as flannel's.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o644);
        assert_eq!(SubnetEnv::read_previous_subnet(&path), Some(env().subnet));
        std::fs::write(&path, "FLANNEL_SUBNET=junk\n").unwrap();
        assert_eq!(SubnetEnv::read_previous_subnet(&path), None);
    }

    proptest! {
        #[test]
        fn parse_emit_round_trip(net in any::<u32>(), plen in 8u8..=28, extra in 2u8..=4, idx in any::<u32>(),
                                 mtu in 68u32..65536, ipmasq in any::<bool>(),
                                 v6 in proptest::option::of((any::<u128>(), 16u8..=60))) {
            let network = Ipv4Net::new(Ipv4Addr::from(net), plen).unwrap().trunc();
            let slen = (plen + extra).min(30);
            let span = 1u32 << (slen - plen);
            let sub_addr = u32::from(network.network()) + (idx % span) * (1u32 << (32 - slen));
            let subnet = Ipv4Net::new(Ipv4Addr::from(sub_addr), slen).unwrap();
            let (ipv6_network, ipv6_subnet) = match v6 {
                Some((a, l)) => {
                    let n = Ipv6Net::new(Ipv6Addr::from(a), l).unwrap().trunc();
                    (Some(n), Some(Ipv6Net::new(n.network(), 64).unwrap()))
                }
                None => (None, None),
            };
            let e = SubnetEnv { network, subnet, ipv6_network, ipv6_subnet, mtu, ipmasq };
            prop_assert_eq!(SubnetEnv::parse(&e.to_text()).unwrap(), e);
        }

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,120}") {
            let _ = SubnetEnv::parse(&s);
        }
    }
}
