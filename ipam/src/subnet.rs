//! The leasable subnet range and flannel's free-subnet pick.
//!
//! flannel (`pkg/subnet/etcd/local_manager.go`, `allocateSubnet`) walks the subnets from
//! `SubnetMin` to `SubnetMax`, collects the first 100 that overlap no existing lease, and picks
//! one of those at random. Picking at random among several keeps two nodes that start together
//! from racing for the same subnet every time; stopping at 100 bounds the walk on large networks.
//! Randomness comes in as an argument, so the pick is tested without I/O.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::Rng;

/// How many free subnets the pick chooses among (flannel's bag size).
pub const FREE_CANDIDATES: usize = 100;

/// The subnets a node may lease: `SubnetMin..=SubnetMax` in steps of `/SubnetLen`, inside
/// `Network`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct SubnetRange {
    network: Ipv4Net,
    subnet_len: u8,
    min: u32,
    max: u32,
}

impl SubnetRange {
    /// A range as validated by [`crate::NetworkConfig`]; use
    /// [`crate::NetworkConfig::subnet_range`] rather than calling this with unchecked values.
    /// An unaligned or out-of-network bound only makes [`Self::contains`] stricter.
    pub fn new(network: Ipv4Net, subnet_len: u8, min: Ipv4Addr, max: Ipv4Addr) -> Self {
        Self { network, subnet_len: subnet_len.min(32), min: u32::from(min), max: u32::from(max) }
    }

    /// The cluster network.
    pub fn network(&self) -> Ipv4Net {
        self.network
    }

    /// The prefix length of every subnet in the range.
    pub fn subnet_len(&self) -> u8 {
        self.subnet_len
    }

    fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.subnet_len))
    }

    /// How many subnets the range holds.
    pub fn count(&self) -> u64 {
        if self.max < self.min { 0 } else { (u64::from(self.max) - u64::from(self.min)) / self.size() + 1 }
    }

    /// Whether `subnet` is one this config would lease: right length, aligned, inside
    /// `Network`, between `SubnetMin` and `SubnetMax` (flannel's `isSubnetConfigCompat`). A lease
    /// that fails this was made under another config and is not reused.
    pub fn contains(&self, subnet: Ipv4Net) -> bool {
        let a = u32::from(subnet.addr());
        subnet.prefix_len() == self.subnet_len
            && subnet.network() == subnet.addr()
            && self.network.contains(&subnet)
            && a >= self.min
            && a <= self.max
            && (u64::from(a) - u64::from(self.min)) % self.size() == 0
    }

    /// Every subnet of the range, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let size = self.size();
        let (min, max, len) = (u64::from(self.min), u64::from(self.max), self.subnet_len);
        (0..self.count()).filter_map(move |i| {
            let a = min + i * size;
            (a <= max).then(|| u32::try_from(a).ok()).flatten().and_then(|a| Ipv4Net::new(Ipv4Addr::from(a), len).ok())
        })
    }

    /// flannel's pick: a random one of the first [`FREE_CANDIDATES`] subnets that overlap none of
    /// `taken`. `None` when the range is full.
    pub fn pick_free(&self, taken: impl IntoIterator<Item = Ipv4Net>, rng: &mut impl Rng) -> Option<Ipv4Net> {
        let mut taken: Vec<(u32, u32)> =
            taken.into_iter().map(|n| (u32::from(n.network()), u32::from(n.broadcast()))).collect();
        taken.sort_unstable();
        // Merge overlapping intervals so "does this candidate overlap anything" is one search.
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(taken.len());
        for (lo, hi) in taken {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        let overlaps = |lo: u32, hi: u32| {
            // The first interval ending at or after `lo`; it overlaps if it starts by `hi`.
            let i = merged.partition_point(|&(_, end)| end < lo);
            merged.get(i).is_some_and(|&(start, _)| start <= hi)
        };
        let free: Vec<Ipv4Net> = self
            .iter()
            .filter(|n| !overlaps(u32::from(n.network()), u32::from(n.broadcast())))
            .take(FREE_CANDIDATES)
            .collect();
        if free.is_empty() {
            return None;
        }
        free.get(rng.random_range(0..free.len())).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetworkConfig;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn range(json: &str) -> SubnetRange {
        NetworkConfig::from_json(json).unwrap().subnet_range()
    }

    #[test]
    fn contains_table() {
        let r = range(r#"{"Network":"10.244.0.0/16"}"#);
        let cases = [
            ("10.244.1.0/24", true),
            ("10.244.255.0/24", true),
            ("10.244.0.0/24", false), // the first subnet is never leased
            ("10.244.1.0/25", false), // other SubnetLen
            ("10.245.1.0/24", false), // other network
            ("10.244.0.0/16", false),
        ];
        for (s, want) in cases {
            assert_eq!(r.contains(net(s)), want, "{s}");
        }
        assert_eq!(r.count(), 255);
        let r = range(r#"{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0"}"#);
        assert!(r.contains(net("10.10.0.0/20")));
        assert!(r.contains(net("10.99.0.0/20")));
        assert!(!r.contains(net("10.99.16.0/20")));
        assert!(!r.contains(net("10.9.240.0/20")));
    }

    #[test]
    fn iter_covers_the_range() {
        let r = range(r#"{"Network":"10.244.0.0/28"}"#);
        let all: Vec<_> = r.iter().collect();
        assert_eq!(all, vec![net("10.244.0.4/30"), net("10.244.0.8/30"), net("10.244.0.12/30")]);
        let top = range(r#"{"Network":"255.255.255.0/24","SubnetLen":26}"#);
        assert_eq!(top.iter().last(), Some(net("255.255.255.192/26")));
    }

    #[test]
    fn pick_is_among_the_first_100_free() {
        let r = range(r#"{"Network":"10.0.0.0/8"}"#);
        let taken: Vec<_> = r.iter().take(50).collect();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..500 {
            let pick = r.pick_free(taken.iter().copied(), &mut rng).unwrap();
            let idx = r.iter().position(|n| n == pick).unwrap();
            assert!((50..150).contains(&idx), "picked #{idx}");
        }
    }

    #[test]
    fn pick_skips_overlapping_leases_of_other_sizes() {
        let r = range(r#"{"Network":"10.244.0.0/28"}"#);
        let mut rng = StdRng::seed_from_u64(1);
        // A /29 reservation covers the last two /30s; only 10.244.0.4/30 is left.
        for _ in 0..50 {
            assert_eq!(r.pick_free([net("10.244.0.8/29")], &mut rng), Some(net("10.244.0.4/30")));
        }
        assert_eq!(r.pick_free([net("10.244.0.0/28")], &mut rng), None);
    }

    #[test]
    fn pick_reaches_every_free_subnet() {
        let r = range(r#"{"Network":"10.244.0.0/16"}"#);
        let mut rng = StdRng::seed_from_u64(3);
        let taken = [net("10.244.2.0/24"), net("10.244.3.0/24")];
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..5000 {
            seen.insert(r.pick_free(taken, &mut rng).unwrap());
        }
        assert_eq!(seen.len(), 100);
        assert!(!seen.contains(&net("10.244.2.0/24")));
    }
}
