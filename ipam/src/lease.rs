//! Subnet lease records in flannel's exact shape: the key `10.244.1.0-24` and the value
//! `{"PublicIP":…,"PublicIPv6":null,"BackendType":…,"BackendData":{…}}`.
//!
//! The JSON mirrors flannel's `lease.LeaseAttrs` (`pkg/lease/lease.go`) field for field, including
//! Go's `omitempty` rules: `PublicIPv6` is always written (`null` when absent) while
//! `BackendType`, `BackendData` and `BackendV6Data` are left out when empty. A flannel node reads
//! what we write and we read what it writes, which is what lets the two share an etcd.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::SystemTime;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::store::Revision;

/// One node's claim on one subnet of the cluster network.
#[derive(Clone, Debug, PartialEq)]
pub struct SubnetLease {
    /// The leased subnet, e.g. `10.244.1.0/24` (always the network address, host bits zero).
    pub subnet: Ipv4Net,
    /// What the holder publishes about itself: where to send packets for this subnet.
    pub attrs: LeaseAttrs,
    /// When the lease lapses unless renewed. `None` is flannel's "reservation": a record with no
    /// TTL, made by an administrator, that never expires and is never handed to anyone else.
    pub expiration: Option<SystemTime>,
    /// The store revision at which this record was created (etcd's `create_revision`; the file
    /// store's counter at create). Two records that conflict (overlapping subnets, one
    /// endpoint) are resolved in favour of the older one, so a record written later can never
    /// displace a peer already in use. `Revision(0)` when the store does not know (file
    /// records written before weft recorded it): such records count as oldest.
    pub created: Revision,
}

impl SubnetLease {
    /// Whether this lease has lapsed at `now`. Reservations never lapse.
    ///
    /// A lease whose expiration equals `now` counts as expired, the same boundary the stores use.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expiration.is_some_and(|exp| exp <= now)
    }

    /// The store key of this lease (`10.244.1.0-24`).
    pub fn key(&self) -> LeaseKey {
        LeaseKey(self.subnet)
    }
}

/// The value of a lease record: flannel's `LeaseAttrs`, byte-compatible JSON.
#[derive(Clone, Debug, Deserialize, PartialEq, Serialize)]
pub struct LeaseAttrs {
    /// The holder's underlay address: peers send encapsulated packets here. It is also the node's
    /// identity when it restarts (flannel reuses "the lease whose PublicIP is ours").
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    /// The holder's IPv6 underlay address, for dual-stack flannel nodes. Always serialised,
    /// as `null` when absent (flannel's field has no `omitempty`).
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    /// `"udp"` or `"vxlan"` (flannel also writes `"host-gw"`, `"wireguard"`, …).
    #[serde(rename = "BackendType", default, skip_serializing_if = "String::is_empty")]
    pub backend_type: String,
    /// Backend-specific data, e.g. `{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}` for vxlan.
    /// `Null` means absent and is not serialised (Go's `omitempty` on a `json.RawMessage`).
    #[serde(rename = "BackendData", default, skip_serializing_if = "serde_json::Value::is_null")]
    pub backend_data: serde_json::Value,
    /// The IPv6 counterpart of `backend_data`; kept so a flannel dual-stack record survives a
    /// round trip through weft unchanged.
    #[serde(rename = "BackendV6Data", default, skip_serializing_if = "serde_json::Value::is_null")]
    pub backend_v6_data: serde_json::Value,
}

impl LeaseAttrs {
    /// Attributes with only the public address and backend type set.
    pub fn new(public_ip: Ipv4Addr, backend_type: impl Into<String>) -> Self {
        Self {
            public_ip,
            public_ipv6: None,
            backend_type: backend_type.into(),
            backend_data: serde_json::Value::Null,
            backend_v6_data: serde_json::Value::Null,
        }
    }

    /// Parses a lease value as stored in etcd.
    ///
    /// # Errors
    /// The JSON error when the bytes are not flannel's lease JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The lease value as flannel writes it (compact JSON, flannel's field order).
    pub fn to_json(&self) -> String {
        // Serialising a struct of strings, addresses and `Value`s cannot fail; fall back to an
        // object that at least names the holder rather than panicking.
        serde_json::to_string(self).unwrap_or_else(|_| format!("{{\"PublicIP\":\"{}\"}}", self.public_ip))
    }
}

/// The store key of a lease: flannel's `MakeSubnetKey`, `10.244.1.0-24`.
///
/// flannel's dual-stack records use `10.244.1.0-24&fd00::-64`; parsing accepts that form and keeps
/// the IPv4 part, since weft's overlay is IPv4 (see [`LeaseKey::from_str`]).
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct LeaseKey(pub Ipv4Net);

/// Why a lease key did not parse.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum LeaseKeyError {
    /// The key is not `<ipv4>-<prefix>` (optionally followed by `&<ipv6>-<prefix>`).
    #[error("lease key {key:?} is not of the form \"10.244.1.0-24\"")]
    Malformed {
        /// The key as found.
        key: String,
    },
    /// The address has bits set beyond the prefix, so it names no subnet.
    #[error("lease key {key:?} has host bits set (expected {canonical})")]
    HostBitsSet {
        /// The key as found.
        key: String,
        /// The subnet it would name with the host bits cleared.
        canonical: Ipv4Net,
    },
}

impl LeaseKey {
    /// The subnet this key names.
    pub fn subnet(self) -> Ipv4Net {
        self.0
    }
}

impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0.addr(), self.0.prefix_len())
    }
}

impl FromStr for LeaseKey {
    type Err = LeaseKeyError;

    /// Parses `10.244.1.0-24` or flannel's dual-stack `10.244.1.0-24&fd00::-64` (IPv4 part kept;
    /// the IPv6 part must still be well formed, so garbage after `&` is rejected).
    fn from_str(key: &str) -> Result<Self, Self::Err> {
        let malformed = || LeaseKeyError::Malformed { key: key.to_owned() };
        let (v4, v6) = match key.split_once('&') {
            Some((v4, v6)) => (v4, Some(v6)),
            None => (key, None),
        };
        if let Some(v6) = v6 {
            let (addr, len) = v6.rsplit_once('-').ok_or_else(malformed)?;
            let addr: Ipv6Addr = addr.parse().map_err(|_| malformed())?;
            let len: u8 = parse_prefix_len(len).ok_or_else(malformed)?;
            ipnet::Ipv6Net::new(addr, len).map_err(|_| malformed())?;
        }
        let (addr, len) = v4.split_once('-').ok_or_else(malformed)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| malformed())?;
        let len = parse_prefix_len(len).ok_or_else(malformed)?;
        let net = Ipv4Net::new(addr, len).map_err(|_| malformed())?;
        if net.network() != addr {
            return Err(LeaseKeyError::HostBitsSet { key: key.to_owned(), canonical: net.trunc() });
        }
        Ok(Self(net))
    }
}

/// A decimal prefix length without sign, leading `+` or leading zeros beyond "0" itself.
fn parse_prefix_len(s: &str) -> Option<u8> {
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_parse_table() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let ok = [
            ("10.244.1.0-24", net("10.244.1.0/24")),
            ("10.244.1.0-24&fd00::-64", net("10.244.1.0/24")),
            ("10.0.0.0-8", net("10.0.0.0/8")),
            ("10.244.1.4-30", net("10.244.1.4/30")),
        ];
        for (key, want) in ok {
            assert_eq!(key.parse::<LeaseKey>().map(LeaseKey::subnet), Ok(want), "{key}");
        }
        let bad = [
            "",
            "10.244.1.0",
            "10.244.1.0/24",
            "10.244.1.0-33",
            "10.244.1.0--24",
            "10.244.1.0-+24",
            "10.244.1.0-024",
            "10.244.1.0-24&",
            "10.244.1.0-24&garbage",
            "10.244.1.0-24&fd00::-129",
            "300.1.1.0-24",
            " 10.244.1.0-24",
        ];
        for key in bad {
            assert!(
                matches!(key.parse::<LeaseKey>(), Err(LeaseKeyError::Malformed { .. })),
                "{key:?} should be rejected"
            );
        }
        assert!(matches!("10.244.1.1-24".parse::<LeaseKey>(), Err(LeaseKeyError::HostBitsSet { .. })));
    }

    #[test]
    fn key_display_is_flannels() {
        assert_eq!(LeaseKey("10.244.1.0/24".parse().unwrap()).to_string(), "10.244.1.0-24");
    }

    #[test]
    fn attrs_json_matches_flannel_bytes() {
        // From the reference: the value flannel's etcd registry writes for a vxlan node.
        let flannel = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        let attrs = LeaseAttrs::from_json(flannel.as_bytes()).unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(attrs.backend_type, "vxlan");
        assert_eq!(attrs.backend_data["VtepMAC"], "c6:d2:32:6f:8f:44");
        assert_eq!(attrs.to_json(), flannel);
    }

    #[test]
    fn attrs_json_omits_empty_backend_fields() {
        let attrs = LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, 1), "udp");
        assert_eq!(attrs.to_json(), r#"{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"udp"}"#);
        // flannel's udp backend leaves BackendType out entirely when empty; we read that too.
        let bare = LeaseAttrs::from_json(br#"{"PublicIP":"198.18.0.1"}"#).unwrap();
        assert_eq!(bare.backend_type, "");
        assert_eq!(bare.public_ipv6, None);
    }

    #[test]
    fn attrs_json_tolerates_unknown_fields_and_dual_stack() {
        let v = br#"{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"vxlan","BackendData":{"VNI":1},"BackendV6Data":{"VNI":1},"Future":1}"#;
        let attrs = LeaseAttrs::from_json(v).unwrap();
        assert_eq!(attrs.public_ipv6, Some("fd00::1".parse().unwrap()));
        assert_eq!(attrs.backend_v6_data["VNI"], 1);
    }

    /// Found by the lease_json fuzzer: serde_json's default float parser may be one ULP off,
    /// so a float in BackendData changed on every read-write through weft. The workspace
    /// enables `float_roundtrip`; flannel's Go side keeps BackendData as raw bytes.
    #[test]
    fn backend_data_floats_survive_a_round_trip() {
        let v = br#"{"PublicIP":"10.0.0.1","BackendData":{"X":409555555555555.555555555555555555555555555,"Y":1e-7}}"#;
        let attrs = LeaseAttrs::from_json(v).unwrap();
        assert_eq!(LeaseAttrs::from_json(attrs.to_json().as_bytes()).unwrap(), attrs);
    }

    #[test]
    fn attrs_json_rejects_garbage() {
        for bad in [&b""[..], b"{}", b"[]", br#"{"PublicIP":"not-an-ip"}"#, br#"{"PublicIP":"fd00::1"}"#] {
            assert!(LeaseAttrs::from_json(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn expiry_boundary() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(100);
        let mut lease = SubnetLease {
            subnet: "10.244.1.0/24".parse().unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::LOCALHOST, "udp"),
            expiration: Some(t),
            created: Revision(0),
        };
        assert!(!lease.is_expired(t - std::time::Duration::from_millis(1)));
        assert!(lease.is_expired(t));
        lease.expiration = None;
        assert!(!lease.is_expired(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(u32::MAX.into())));
    }

    fn arb_subnet() -> impl Strategy<Value = Ipv4Net> {
        (any::<u32>(), 0u8..=32).prop_map(|(a, l)| Ipv4Net::new(Ipv4Addr::from(a), l).unwrap().trunc())
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::Value::Null),
            (0u32..1 << 24, "[0-9a-f]{2}(:[0-9a-f]{2}){5}")
                .prop_map(|(vni, mac)| serde_json::json!({"VNI": vni, "VtepMAC": mac})),
            Just(serde_json::json!({})),
        ]
    }

    proptest! {
        #[test]
        fn key_round_trip(subnet in arb_subnet()) {
            let key = LeaseKey(subnet).to_string();
            prop_assert_eq!(key.parse::<LeaseKey>(), Ok(LeaseKey(subnet)));
        }

        #[test]
        fn key_parse_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<LeaseKey>();
        }

        #[test]
        fn attrs_round_trip(ip in any::<u32>(), v6 in proptest::option::of(any::<u128>()),
                            bt in "(udp|vxlan|host-gw|)", data in arb_json(), data6 in arb_json()) {
            let attrs = LeaseAttrs {
                public_ip: Ipv4Addr::from(ip),
                public_ipv6: v6.map(Ipv6Addr::from),
                backend_type: bt,
                backend_data: data,
                backend_v6_data: data6,
            };
            prop_assert_eq!(LeaseAttrs::from_json(attrs.to_json().as_bytes()).unwrap(), attrs);
        }
    }
}
