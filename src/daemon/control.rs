//! Peers → route table. This is the one place that maps the control plane's view of other
//! nodes (static peers from the config, or the leases [`super::peers`] accepted) onto the
//! forwarder's [`RouteTable`], and carries each peer's counters over when the table is rebuilt.

use std::collections::HashMap;
use std::sync::Arc;

use weft_forwarder::wireguard::{PeerCrypto, PublicKey};
use weft_forwarder::{NextHop, PeerCounters, RouteError, RouteTable, RouteTableHandle};

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
    // A peer's sessions follow its key, not its name: a new key is a new peer to handshake with.
    let sessions: HashMap<PublicKey, &Arc<PeerCrypto>> = old
        .map(|t| t.peers().iter().filter_map(|h| h.crypto.as_ref().map(|c| (c.public, c))).collect())
        .unwrap_or_default();
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
            crypto: p
                .public_key
                .map(|k| sessions.get(&k).map_or_else(|| Arc::new(PeerCrypto::new(k)), |c| Arc::clone(c))),
        })
        .collect();
    RouteTable::new(hops, source_port_matters)
}

/// Builds the table for `peers` and swaps it in. On error the running table stays in force:
/// a table that cannot be built (more peers than a [`weft_forwarder::PeerId`] indexes,
/// overlapping static peers) never replaces a working one with an empty one.
///
/// The one path by which both a static reload and a lease change reach the data plane.
///
/// # Errors
/// [`RouteError`], with the running table untouched.
pub fn apply_peers(
    routes: &RouteTableHandle,
    peers: &[Peer],
    mtu: u16,
    workers: usize,
    source_port_matters: bool,
) -> Result<(), RouteError> {
    let old = routes.load_full();
    let table = build_table(peers, mtu, workers, Some(&old), source_port_matters)?;
    routes.store(table);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::Ipv4Net;

    fn peer(name: &str, third: u8) -> Peer {
        Peer {
            name: name.into(),
            subnet: format!("10.244.{third}.0/24").parse().unwrap(),
            subnet_v6: None,
            endpoint: format!("198.18.0.{third}:8285").parse().unwrap(),
            mac: None,
            public_key: None,
            mtu: if third == 3 { Some(9000) } else { None },
        }
    }

    #[test]
    fn a_refused_table_keeps_the_running_one() {
        let routes = RouteTableHandle::new(build_table(&[peer("n2", 2)], 1472, 1, None, true).unwrap());
        let mut clash = peer("n9", 9);
        clash.endpoint = peer("n3", 3).endpoint;
        assert!(apply_peers(&routes, &[peer("n3", 3), clash], 1472, 1, true).is_err());
        assert_eq!(routes.load().peers().iter().map(|p| &*p.name).collect::<Vec<_>>(), ["n2"]);
        apply_peers(&routes, &[peer("n3", 3)], 1472, 1, true).unwrap();
        assert_eq!(routes.load().peers().iter().map(|p| &*p.name).collect::<Vec<_>>(), ["n3"]);
    }

    #[test]
    fn more_peers_than_a_table_holds_keep_the_last_good_table() {
        let routes = RouteTableHandle::new(build_table(&[peer("n2", 2)], 1472, 1, None, true).unwrap());
        let many: Vec<Peer> = (0..65_537u32)
            .map(|i| Peer {
                name: format!("p{i}"),
                subnet: Ipv4Net::new(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap(),
                subnet_v6: None,
                endpoint: std::net::SocketAddr::new(std::net::Ipv4Addr::from(0xc612_0000 + i).into(), 8285),
                mac: None,
                public_key: None,
                mtu: None,
            })
            .collect();
        let e = apply_peers(&routes, &many, 1472, 1, true).unwrap_err();
        assert!(matches!(e, RouteError::TooManyPeers { .. }), "{e}");
        assert_eq!(routes.load().peers().len(), 1, "the last good table stays");
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
