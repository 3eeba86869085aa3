//! The route table: longest-prefix match from an inner destination to the peer that holds
//! it, and the reverse map from an underlay source to the peer that may send from it.
//!
//! A [`RouteTable`] is an immutable snapshot, built off the hot path whenever peers change
//! and published through a [`RouteTableHandle`] (`arc_swap`). A worker loads the snapshot
//! once per batch and passes `&RouteTable` down, so the data path never takes a lock and the
//! core never sees a swap.

#![deny(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use rustc_hash::FxBuildHasher;

use crate::stats::PeerCounters;
use crate::wire::ethernet::MacAddr;

/// Index of a peer within one [`RouteTable`] snapshot (not stable across snapshots).
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct PeerId(u16);

impl PeerId {
    /// The index into [`RouteTable::peers`].
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// Where and how to send packets for one peer.
#[derive(Clone, Debug)]
pub struct NextHop {
    /// The peer's node name, for status and logs.
    pub name: Arc<str>,
    /// The peer's underlay address and port.
    pub endpoint: SocketAddr,
    /// The peer's IPv4 overlay subnet.
    pub subnet_v4: Option<Ipv4Net>,
    /// The peer's IPv6 overlay subnet.
    pub subnet_v6: Option<Ipv6Net>,
    /// The peer's VTEP MAC (VXLAN): inner frames go to it, and frames from the peer must
    /// come from it.
    pub mac: Option<MacAddr>,
    /// Largest inner packet the path to this peer carries, in bytes.
    pub mtu: u16,
    /// Traffic counters, carried across snapshots.
    pub counters: Arc<PeerCounters>,
    /// The `wireguard` backend's keys and counters for this peer, carried across snapshots
    /// (by public key); `None` for the cleartext formats.
    pub crypto: Option<Arc<crate::wireguard::PeerCrypto>>,
}

impl NextHop {
    /// Whether `ip` lies in one of the peer's subnets: the cryptokey-routing analogue of
    /// WireGuard, applied to the inner source of everything the peer sends us.
    pub fn owns(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.subnet_v4.is_some_and(|n| n.contains(&a)),
            IpAddr::V6(a) => self.subnet_v6.is_some_and(|n| n.contains(&a)),
        }
    }

    fn subnets(&self) -> impl Iterator<Item = IpNet> {
        self.subnet_v4.map(IpNet::V4).into_iter().chain(self.subnet_v6.map(IpNet::V6))
    }
}

/// Why a set of peers cannot form a route table.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum RouteError {
    /// Two peers claim overlapping subnets.
    #[error("peer {a}: subnet {subnet_a} overlaps subnet {subnet_b} of peer {b}")]
    Overlap {
        /// First peer.
        a: String,
        /// Its subnet.
        subnet_a: IpNet,
        /// Second peer.
        b: String,
        /// Its subnet.
        subnet_b: IpNet,
    },
    /// Two peers use the same underlay endpoint, so a sender could not be told apart.
    #[error("peers {a} and {b} share the endpoint {endpoint}")]
    DuplicateEndpoint {
        /// First peer.
        a: String,
        /// Second peer.
        b: String,
        /// The shared endpoint.
        endpoint: SocketAddr,
    },
    /// Two peers claim the same VTEP MAC.
    #[error("peers {a} and {b} share the VTEP MAC {mac}")]
    DuplicateMac {
        /// First peer.
        a: String,
        /// Second peer.
        b: String,
        /// The shared MAC.
        mac: MacAddr,
    },
    /// More peers than a [`PeerId`] can index.
    #[error("too many peers: at most {max}")]
    TooManyPeers {
        /// The limit.
        max: usize,
    },
}

/// The address ranges `[network, broadcast]` already claimed by earlier peers in one family
/// (IPv4 addresses widened to `u128`), keyed by first address, while a [`RouteTable`] is built.
///
/// Two CIDR blocks either nest or are disjoint, and they overlap exactly when their ranges
/// meet (that is `a.contains(b) || b.contains(a)` in `ipnet`, host bits and all). Every
/// claimed range was checked against the ones before it, so they are pairwise disjoint. A
/// new range `[first, last]` therefore meets a claimed one only if that one starts inside it
/// (a range lookup), or starts before `first` and reaches it; of the latter only the last
/// range starting before `first` can qualify, since any earlier one reaching `first` would
/// contain it. Both lookups are O(log n), where scanning every earlier peer was O(n).
#[derive(Default)]
struct Claimed(BTreeMap<u128, (u128, PeerId)>);

impl Claimed {
    /// The earliest peer (lowest id) whose range meets `[first, last]`.
    fn first_overlap(&self, first: u128, last: u128) -> Option<PeerId> {
        let reaching = self.0.range(..first).next_back().filter(|(_, (end, _))| *end >= first);
        // On success both lookups are empty; only the error path walks more than one entry.
        reaching.into_iter().chain(self.0.range(first..=last)).map(|(_, (_, id))| *id).min_by_key(|id| id.0)
    }

    fn insert(&mut self, first: u128, last: u128, id: PeerId) {
        self.0.insert(first, (last, id));
    }
}

/// An immutable routing snapshot.
pub struct RouteTable {
    v4: PrefixMap<Ipv4Net, PeerId>,
    v6: PrefixMap<Ipv6Net, PeerId>,
    peers: Vec<NextHop>,
    by_source: HashMap<SocketAddr, PeerId, FxBuildHasher>,
    by_mac: HashMap<MacAddr, PeerId, FxBuildHasher>,
    source_port_matters: bool,
}

impl fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable").field("peers", &self.peers).finish_non_exhaustive()
    }
}

impl RouteTable {
    /// Builds a snapshot from `peers`.
    ///
    /// `source_port_matters` says whether a peer is identified by its endpoint's address
    /// *and* port (flannel `udp`: the peer sends from its bound port) or by address alone
    /// (VXLAN: the source port is a flow hash).
    ///
    /// Peers are checked in order and the first one that fails names the error; an overlap
    /// names that peer first and the earliest peer it overlaps second. Building takes
    /// O(n log n): the daemon rebuilds the table on every lease change, and a table may hold
    /// 65 536 peers.
    ///
    /// # Errors
    /// [`RouteError`] when subnets overlap, endpoints repeat, or there are too many peers.
    pub fn new(peers: Vec<NextHop>, source_port_matters: bool) -> Result<Self, RouteError> {
        let mut t = Self {
            v4: PrefixMap::new(),
            v6: PrefixMap::new(),
            peers: Vec::with_capacity(peers.len()),
            by_source: HashMap::with_capacity_and_hasher(peers.len(), FxBuildHasher),
            by_mac: HashMap::with_capacity_and_hasher(peers.len(), FxBuildHasher),
            source_port_matters,
        };
        let mut claimed_v4 = Claimed::default();
        let mut claimed_v6 = Claimed::default();
        for hop in peers {
            let id = u16::try_from(t.peers.len())
                .map(PeerId)
                .map_err(|_| RouteError::TooManyPeers { max: usize::from(u16::MAX) + 1 })?;
            for net in hop.subnets() {
                let (claimed, first, last) = match net {
                    IpNet::V4(n) => {
                        (&mut claimed_v4, u128::from(u32::from(n.network())), u128::from(u32::from(n.broadcast())))
                    }
                    IpNet::V6(n) => (&mut claimed_v6, u128::from(n.network()), u128::from(n.broadcast())),
                };
                if let Some(prev) = claimed.first_overlap(first, last) {
                    let other = t.peers.get(prev.index());
                    return Err(RouteError::Overlap {
                        a: hop.name.to_string(),
                        subnet_a: net,
                        b: other.map(|p| p.name.to_string()).unwrap_or_default(),
                        subnet_b: other
                            .and_then(|p| p.subnets().find(|o| o.contains(&net) || net.contains(o)))
                            .unwrap_or(net),
                    });
                }
                claimed.insert(first, last, id);
                match net {
                    IpNet::V4(n) => t.v4.insert(n, id),
                    IpNet::V6(n) => t.v6.insert(n, id),
                };
            }
            let key = t.source_key(hop.endpoint);
            if let Some(prev) = t.by_source.insert(key, id) {
                let a = t.peers.get(prev.index()).map(|p| p.name.to_string()).unwrap_or_default();
                return Err(RouteError::DuplicateEndpoint { a, b: hop.name.to_string(), endpoint: hop.endpoint });
            }
            if let Some(mac) = hop.mac {
                if let Some(prev) = t.by_mac.insert(mac, id) {
                    let a = t.peers.get(prev.index()).map(|p| p.name.to_string()).unwrap_or_default();
                    return Err(RouteError::DuplicateMac { a, b: hop.name.to_string(), mac });
                }
            }
            t.peers.push(hop);
        }
        Ok(t)
    }

    /// An empty table: every destination misses, every sender is unknown.
    pub fn empty(source_port_matters: bool) -> Self {
        Self {
            v4: PrefixMap::new(),
            v6: PrefixMap::new(),
            peers: Vec::new(),
            by_source: HashMap::with_hasher(FxBuildHasher),
            by_mac: HashMap::with_hasher(FxBuildHasher),
            source_port_matters,
        }
    }

    fn source_key(&self, mut a: SocketAddr) -> SocketAddr {
        if !self.source_port_matters {
            a.set_port(0);
        }
        a
    }

    /// The peer whose subnet holds `dst` (longest prefix).
    #[inline]
    pub fn lookup(&self, dst: IpAddr) -> Option<(PeerId, &NextHop)> {
        let id = match dst {
            IpAddr::V4(a) => *self.v4.get_lpm(&Ipv4Net::from(a)).map(|(_, id)| id)?,
            IpAddr::V6(a) => *self.v6.get_lpm(&Ipv6Net::from(a)).map(|(_, id)| id)?,
        };
        self.peers.get(id.index()).map(|h| (id, h))
    }

    /// The peer allowed to send from underlay address `src`; endpoints are never learned
    /// from data packets.
    #[inline]
    pub fn peer_by_source(&self, src: SocketAddr) -> Option<(PeerId, &NextHop)> {
        let id = *self.by_source.get(&self.source_key(src))?;
        self.peers.get(id.index()).map(|h| (id, h))
    }

    /// The peer whose VTEP MAC is `mac` (TAP mode forwards by MAC).
    #[inline]
    pub fn peer_by_mac(&self, mac: MacAddr) -> Option<(PeerId, &NextHop)> {
        let id = *self.by_mac.get(&mac)?;
        self.peers.get(id.index()).map(|h| (id, h))
    }

    /// The peer with this id.
    pub fn peer(&self, id: PeerId) -> Option<&NextHop> {
        self.peers.get(id.index())
    }

    /// All peers, in insertion order.
    pub fn peers(&self) -> &[NextHop] {
        &self.peers
    }
}

/// The shared, atomically swapped pointer to the current [`RouteTable`].
#[derive(Clone, Debug)]
pub struct RouteTableHandle(Arc<ArcSwap<RouteTable>>);

impl RouteTableHandle {
    /// A handle publishing `table`.
    pub fn new(table: RouteTable) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(table)))
    }

    /// The current snapshot; workers call this once per batch.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.0.load()
    }

    /// The current snapshot as an owned `Arc`, for readers that keep it (status).
    pub fn load_full(&self) -> Arc<RouteTable> {
        self.0.load_full()
    }

    /// Publishes a new snapshot; batches in flight finish on the old one.
    pub fn store(&self, table: RouteTable) {
        self.0.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hop(name: &str, subnet: &str, endpoint: &str) -> NextHop {
        NextHop {
            name: name.into(),
            endpoint: endpoint.parse().unwrap(),
            subnet_v4: Some(subnet.parse().unwrap()),
            subnet_v6: None,
            mac: None,
            mtu: 1472,
            counters: Arc::new(PeerCounters::new(1)),
            crypto: None,
        }
    }

    #[test]
    fn longest_prefix_wins_and_sources_map_back() {
        let t = RouteTable::new(
            vec![hop("n2", "10.244.2.0/24", "198.18.0.2:8285"), hop("n3", "10.244.3.0/24", "198.18.0.3:8285")],
            true,
        )
        .unwrap();
        assert_eq!(&*t.lookup("10.244.3.9".parse().unwrap()).unwrap().1.name, "n3");
        assert!(t.lookup("10.244.4.1".parse().unwrap()).is_none());
        assert!(t.lookup("fd00::1".parse().unwrap()).is_none());
        assert_eq!(&*t.peer_by_source("198.18.0.2:8285".parse().unwrap()).unwrap().1.name, "n2");
        assert!(t.peer_by_source("198.18.0.2:9999".parse().unwrap()).is_none());
    }

    #[test]
    fn vxlan_style_ignores_source_port() {
        let t = RouteTable::new(vec![hop("n2", "10.244.2.0/24", "198.18.0.2:8472")], false).unwrap();
        assert!(t.peer_by_source("198.18.0.2:40001".parse().unwrap()).is_some());
        assert!(t.peer_by_source("198.18.0.9:8472".parse().unwrap()).is_none());
    }

    #[test]
    fn rejects_overlaps_and_duplicate_endpoints() {
        let err = RouteTable::new(
            vec![hop("n2", "10.244.2.0/24", "198.18.0.2:8285"), hop("n3", "10.244.0.0/16", "198.18.0.3:8285")],
            true,
        )
        .unwrap_err();
        assert!(matches!(err, RouteError::Overlap { .. }), "{err}");
        let err = RouteTable::new(
            vec![hop("n2", "10.244.2.0/24", "198.18.0.2:8285"), hop("n3", "10.244.3.0/24", "198.18.0.2:8285")],
            true,
        )
        .unwrap_err();
        assert!(matches!(err, RouteError::DuplicateEndpoint { .. }), "{err}");
    }

    proptest! {
        /// Differential test against a naive scan, as WireGuard's allowedips selftest does.
        #[test]
        fn lpm_matches_naive_scan(
            subnets in proptest::collection::btree_set((0u8..=255, 16u8..=28), 1..40),
            probes in proptest::collection::vec(proptest::num::u32::ANY, 200),
        ) {
            let mut hops = Vec::new();
            for (i, (third, len)) in subnets.iter().enumerate() {
                let net = Ipv4Net::new([10, 244, *third, 0].into(), *len).unwrap().trunc();
                if hops.iter().any(|h: &NextHop| h.subnet_v4.is_some_and(|o| o.contains(&net) || net.contains(&o))) {
                    continue;
                }
                let mut h = hop(&format!("p{i}"), &net.to_string(), &format!("198.18.1.{}:8285", i + 1));
                h.subnet_v4 = Some(net);
                hops.push(h);
            }
            let t = RouteTable::new(hops.clone(), true).unwrap();
            for p in probes {
                let a = std::net::Ipv4Addr::from(0x0af4_0000 | (p & 0xffff));
                let naive = hops.iter().filter(|h| h.owns(a.into())).max_by_key(|h| h.subnet_v4.map(|n| n.prefix_len()));
                prop_assert_eq!(t.lookup(a.into()).map(|(_, h)| h.name.clone()), naive.map(|h| h.name.clone()));
            }
        }
    }

    /// The validation `RouteTable::new` did before it was made O(n log n): every subnet is
    /// checked against every earlier peer. The reference for the differential test below.
    fn naive_validate(peers: &[NextHop], source_port_matters: bool) -> Result<(), RouteError> {
        let mut seen: Vec<&NextHop> = Vec::new();
        let mut by_source: HashMap<SocketAddr, usize> = HashMap::new();
        let mut by_mac: HashMap<MacAddr, usize> = HashMap::new();
        for hop in peers {
            if seen.len() > usize::from(u16::MAX) {
                return Err(RouteError::TooManyPeers { max: usize::from(u16::MAX) + 1 });
            }
            for net in hop.subnets() {
                if let Some(other) = seen.iter().find(|p| p.subnets().any(|o| o.contains(&net) || net.contains(&o))) {
                    return Err(RouteError::Overlap {
                        a: hop.name.to_string(),
                        subnet_a: net,
                        b: other.name.to_string(),
                        subnet_b: other.subnets().find(|o| o.contains(&net) || net.contains(o)).unwrap_or(net),
                    });
                }
            }
            let mut key = hop.endpoint;
            if !source_port_matters {
                key.set_port(0);
            }
            if let Some(prev) = by_source.insert(key, seen.len()) {
                let a = seen[prev].name.to_string();
                return Err(RouteError::DuplicateEndpoint { a, b: hop.name.to_string(), endpoint: hop.endpoint });
            }
            if let Some(mac) = hop.mac {
                if let Some(prev) = by_mac.insert(mac, seen.len()) {
                    let a = seen[prev].name.to_string();
                    return Err(RouteError::DuplicateMac { a, b: hop.name.to_string(), mac });
                }
            }
            seen.push(hop);
        }
        Ok(())
    }

    /// A generated peer: IPv4 `(address, prefix length)` under 10.244.0.0, IPv6 the same under
    /// fd00::, `(endpoint host, high port)`, and the last MAC byte.
    type HopSpec = (Option<(u32, u8)>, Option<(u128, u8)>, (u8, bool), Option<u8>);

    /// A peer drawn from small address spaces, so that overlaps (nested, equal, and with host
    /// bits set), shared endpoints and shared MACs all turn up often.
    /// The third choice packs small blocks together, so that a block often ends on exactly
    /// the address where a later one starts.
    fn arb_hop() -> impl Strategy<Value = HopSpec> {
        let v4 = prop_oneof![(0u32..0x4000, 20u8..=32), (0u32..0x4000, 0u8..=32), (0u32..32, 26u8..=32)];
        let v6 = prop_oneof![
            (proptest::num::u16::ANY.prop_map(|a| u128::from(a) << 64), 48u8..=80),
            (proptest::num::u16::ANY.prop_map(|a| u128::from(a) << 64), 0u8..=128),
            (0u128..32, 122u8..=128),
        ];
        let v4 = proptest::option::weighted(0.85, v4);
        let v6 = proptest::option::weighted(0.6, v6);
        (v4, v6, (0u8..24, proptest::bool::ANY), proptest::option::of(0u8..24))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// `RouteTable::new` accepts exactly the peer sets the naive O(n²) scan accepts, and
        /// rejects the others with the same error naming the same peers and subnets.
        #[test]
        fn validation_matches_naive_scan(
            specs in proptest::collection::vec(arb_hop(), 0..24),
            source_port_matters in proptest::bool::ANY,
        ) {
            let hops: Vec<NextHop> = specs
                .iter()
                .enumerate()
                .map(|(i, (v4, v6, (host, high_port), mac))| NextHop {
                    name: format!("p{i}").into(),
                    endpoint: SocketAddr::from(([198, 18, 0, *host], if *high_port { 8286 } else { 8285 })),
                    subnet_v4: v4.map(|(a, len)| Ipv4Net::new((0x0af4_0000 | a).into(), len).unwrap()),
                    subnet_v6: v6.map(|(a, len)| Ipv6Net::new(((0xfd00_u128 << 112) | a).into(), len).unwrap()),
                    mac: mac.map(|m| MacAddr([0x02, 0, 0, 0, 0, m])),
                    mtu: 1472,
                    counters: Arc::new(PeerCounters::new(1)),
                    crypto: None,
                })
                .collect();
            let got = RouteTable::new(hops.clone(), source_port_matters).map(|_| ());
            prop_assert_eq!(got, naive_validate(&hops, source_port_matters));
        }
    }

    fn slash24(i: u32) -> NextHop {
        let net = Ipv4Net::new((0x0a00_0000 | (i << 8)).into(), 24).unwrap();
        NextHop {
            name: format!("n{i}").into(),
            endpoint: SocketAddr::from((std::net::Ipv4Addr::from(0xac10_0000 | i), 8285)),
            subnet_v4: Some(net),
            subnet_v6: None,
            mac: None,
            mtu: 1472,
            counters: Arc::new(PeerCounters::new(1)),
            crypto: None,
        }
    }

    /// 65 536 peers, /24s filling 10.0.0.0/8: the most a table holds. Used to take ~25 s
    /// when every peer was checked against every earlier one.
    #[test]
    fn builds_largest_table() {
        let hops: Vec<NextHop> = (0..1 << 16).map(slash24).collect();
        let started = std::time::Instant::now();
        let t = RouteTable::new(hops.clone(), true).unwrap();
        println!("RouteTable::new with {} peers took {:.3} s", hops.len(), started.elapsed().as_secs_f64());
        assert_eq!(t.peers().len(), 1 << 16);
        assert_eq!(&*t.lookup("10.255.255.1".parse().unwrap()).unwrap().1.name, "n65535");
        assert_eq!(&*t.lookup("10.1.2.3".parse().unwrap()).unwrap().1.name, "n258");
        assert_eq!(&*t.peer_by_source("172.16.1.2:8285".parse().unwrap()).unwrap().1.name, "n258");

        // One more peer is one too many, even though it also overlaps: that check comes first.
        let mut more = hops;
        more.push(hop("extra", "10.0.0.0/8", "198.18.0.1:8285"));
        assert_eq!(RouteTable::new(more, true).unwrap_err(), RouteError::TooManyPeers { max: 1 << 16 });
    }
}
