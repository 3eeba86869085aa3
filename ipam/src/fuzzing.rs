//! Fuzz bodies for what comes from the store or from config (anyone who can write to the store
//! can write these):
//! plain functions that the cargo-fuzz targets in `ipam/fuzz/` call and that
//! `tests/corpus_replay.rs` replays over `tests/corpus/` in every `cargo test`.
//!
//! Each body asserts properties, not only "no panic": whatever parses round-trips
//! (`parse(emit(x)) == x`), the emitted text is stable (`emit(parse(emit(x))) == emit(x)`),
//! and an accepted value satisfies the invariants the rest of weft relies on. flannel fuzzes
//! the same inputs (`FuzzKvToIPLease`, `FuzzParseSubnetKey`, `FuzzParseConfig`).

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::str::FromStr;

use crate::config::NetworkConfig;
use crate::lease::{LeaseAttrs, LeaseKey};

/// A lease value as read from etcd or the file store: `LeaseAttrs::from_json`. Returns
/// whether it parsed.
pub fn lease_json(data: &[u8]) -> bool {
    let Ok(attrs) = LeaseAttrs::from_json(data) else { return false };
    let json = attrs.to_json();
    let again =
        LeaseAttrs::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{json}: emitted lease does not parse: {e}"));
    assert_eq!(again, attrs, "lease JSON does not round-trip: {json}");
    assert_eq!(again.to_json(), json, "lease JSON emission is not stable");
    true
}

/// A lease key (`10.244.1.0-24`, or flannel's dual-stack `…&fd00::-64`): `LeaseKey::from_str`.
/// An accepted key names a subnet (no host bits) and prints in flannel's canonical form,
/// which parses back to it. Returns whether it parsed.
pub fn subnet_key(data: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(data) else { return false };
    let Ok(key) = LeaseKey::from_str(s) else { return false };
    let net = key.subnet();
    assert_eq!(net, net.trunc(), "{s:?}: key with host bits accepted");
    let text = key.to_string();
    assert_eq!(text, format!("{}-{}", net.addr(), net.prefix_len()));
    assert_eq!(LeaseKey::from_str(&text), Ok(key), "{s:?}: key does not round-trip through {text:?}");
    assert!(s.starts_with(&text), "{s:?}: the IPv4 part of a key is its canonical form, {text:?}");
    true
}

/// flannel's net-conf JSON: `NetworkConfig::from_json`. An accepted config has flannel's
/// invariants (the network is a network, `SubnetLen` in network+2..=30, `SubnetMin` ≤
/// `SubnetMax`, both inside the network on a subnet boundary, a 24-bit VNI) and round-trips
/// through `to_json`. A refused one names a reason. Returns whether it parsed.
pub fn net_conf(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let cfg = match NetworkConfig::from_json(text) {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return false;
        }
    };
    let net = cfg.network;
    assert_eq!(net, net.trunc(), "Network with host bits kept");
    assert!(cfg.subnet_len >= net.prefix_len() + 2 && cfg.subnet_len <= 30, "SubnetLen {} for {net}", cfg.subnet_len);
    let size = 1u32 << (32 - u32::from(cfg.subnet_len));
    for (field, a) in [("SubnetMin", cfg.subnet_min), ("SubnetMax", cfg.subnet_max)] {
        assert!(net.contains(&a), "{field} {a} outside {net}");
        assert_eq!(u32::from(a) % size, 0, "{field} {a} not on a /{} boundary", cfg.subnet_len);
    }
    assert!(cfg.subnet_min <= cfg.subnet_max);
    assert!(cfg.backend.vni() < 1 << 24);
    let range = cfg.subnet_range();
    assert!(range.count() >= 1);
    assert!(range.iter().next().is_some_and(|s| range.contains(s)));
    if let Some(v6) = &cfg.ipv6 {
        assert_eq!(v6.network, v6.network.trunc());
        assert!(v6.subnet_len >= v6.network.prefix_len() + 2 && v6.subnet_len <= 126);
        assert!(v6.network.contains(&v6.subnet_min) && v6.network.contains(&v6.subnet_max));
    }
    let json = cfg.to_json();
    let again =
        NetworkConfig::from_json(&json).unwrap_or_else(|e| panic!("{json}: emitted config does not parse: {e}"));
    assert_eq!(again, cfg, "net-conf does not round-trip: {json}");
    assert_eq!(again.to_json(), json, "net-conf emission is not stable");
    true
}
