//! Peers → route table. This is the one place that maps the control plane's view of other
//! nodes (static peers today, subnet leases later) onto the forwarder's [`RouteTable`], and
//! carries each peer's counters over when the table is rebuilt.

use std::collections::HashMap;
use std::sync::Arc;

use weft_forwarder::{NextHop, PeerCounters, RouteError, RouteTable};

use crate::config::Peer;

/// Builds a table for `peers`, reusing the counters of peers already in `old` (by name).
///
/// `mtu` is our overlay MTU; a peer's own `mtu` can only lower it for that peer.
///
/// # Errors
/// [`RouteError`] when peers overlap or share an endpoint.
/// `source_port_matters` is the wire format's [`Encap::SOURCE_PORT_MATTERS`](weft_forwarder::Encap::SOURCE_PORT_MATTERS).
pub fn build_table(
    peers: &[Peer],
    mtu: u16,
    workers: usize,
    old: Option<&RouteTable>,
    source_port_matters: bool,
) -> Result<RouteTable, RouteError> {
    let previous: HashMap<&str, &Arc<PeerCounters>> =
        old.map(|t| t.peers().iter().map(|h| (&*h.name, &h.counters)).collect()).unwrap_or_default();
    let hops = peers
        .iter()
        .map(|p| NextHop {
            name: p.name.as_str().into(),
            endpoint: p.endpoint,
            subnet_v4: Some(p.subnet),
            subnet_v6: p.subnet_v6,
            mac: p.mac,
            mtu: p.mtu.map_or(mtu, |m| m.min(mtu)),
            counters: previous
                .get(p.name.as_str())
                .map_or_else(|| Arc::new(PeerCounters::new(workers)), |c| Arc::clone(c)),
        })
        .collect();
    RouteTable::new(hops, source_port_matters)
}

/// Like [`build_table`], for peers read from a shared store: a peer that conflicts with one
/// already accepted (overlapping subnet, same endpoint or MAC: a stale or bogus record) is
/// left out with a warning instead of failing the whole table. Returns the table and the
/// peers it holds.
pub fn build_table_lenient(
    peers: &[Peer],
    mtu: u16,
    workers: usize,
    old: Option<&RouteTable>,
    source_port_matters: bool,
) -> (RouteTable, Vec<Peer>) {
    // One pass in address order: a subnet overlaps an earlier one iff it starts before the
    // furthest end seen so far.
    let mut sorted: Vec<&Peer> = peers.iter().collect();
    sorted.sort_by_key(|p| (u32::from(p.subnet.network()), p.subnet.prefix_len()));
    let mut kept: Vec<Peer> = Vec::with_capacity(peers.len());
    let mut furthest: Option<u32> = None;
    let mut endpoints = std::collections::HashSet::new();
    let mut macs = std::collections::HashSet::new();
    for p in sorted {
        let start = u32::from(p.subnet.network());
        let endpoint = if source_port_matters { p.endpoint } else { std::net::SocketAddr::new(p.endpoint.ip(), 0) };
        let why = if furthest.is_some_and(|end| start <= end) {
            Some("overlaps another peer's subnet")
        } else if endpoints.contains(&endpoint) {
            Some("shares its endpoint with another peer")
        } else if p.mac.is_some_and(|m| macs.contains(&m)) {
            Some("shares its VTEP MAC with another peer")
        } else {
            None
        };
        if let Some(why) = why {
            tracing::warn!(peer = %p.name, endpoint = %p.endpoint, "conflicting peer record left out: {why}");
            continue;
        }
        endpoints.insert(endpoint);
        if let Some(m) = p.mac {
            macs.insert(m);
        }
        furthest = Some(furthest.map_or(u32::from(p.subnet.broadcast()), |f| f.max(u32::from(p.subnet.broadcast()))));
        kept.push(p.clone());
    }
    match build_table(&kept, mtu, workers, old, source_port_matters) {
        Ok(t) => (t, kept),
        // Unreachable after the checks above; stay safe rather than panic.
        Err(e) => {
            tracing::error!(error = %e, "route table rejected filtered peers");
            (RouteTable::empty(source_port_matters), Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, third: u8) -> Peer {
        Peer {
            name: name.into(),
            subnet: format!("10.244.{third}.0/24").parse().unwrap(),
            subnet_v6: None,
            endpoint: format!("198.18.0.{third}:8285").parse().unwrap(),
            mac: None,
            mtu: if third == 3 { Some(9000) } else { None },
        }
    }

    #[test]
    fn lenient_build_leaves_out_conflicting_records() {
        let mut stale = peer("n2-stale", 9);
        stale.endpoint = peer("n2", 2).endpoint;
        let (t, kept) = build_table_lenient(&[peer("n2", 2), stale, peer("n3", 3)], 1472, 1, None, true);
        assert_eq!(kept.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["n2", "n3"]);
        assert_eq!(t.peers().len(), 2);
    }

    #[test]
    fn counters_survive_a_rebuild_and_peer_mtu_is_capped() {
        let t1 = build_table(&[peer("n2", 2)], 1472, 2, None, true).unwrap();
        t1.peers()[0].counters.tx(0, 100);
        let t2 = build_table(&[peer("n2", 2), peer("n3", 3)], 1472, 2, Some(&t1), true).unwrap();
        assert_eq!(t2.peers()[0].counters.totals().tx_bytes, 100);
        assert_eq!(t2.peers()[1].counters.totals().tx_bytes, 0);
        assert_eq!(t2.peers()[1].mtu, 1472);
    }
}
