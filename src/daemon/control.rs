//! Peers → data plane. This is the one place that maps the control plane's view of other
//! nodes (static peers from the config, or the leases [`super::peers`] accepted) onto the
//! forwarder's [`RouteTable`], carrying each peer's counters over when the table is rebuilt,
//! and onto the kernel routes that follow the peers (TAP mode's per-peer routes,
//! DirectRouting's host routes): [`Peering::apply`] is the one path by which a static
//! reload, the first table and every lease change reach them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};
use weft_forwarder::wireguard::{PeerCrypto, PublicKey};
use weft_forwarder::{NextHop, PeerCounters, RouteError, RouteTable, RouteTableHandle};

use super::direct::DirectRoutes;
use super::netlink::{Netlink, NetlinkError};
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

/// Why [`Peering::apply`] did not fully apply a peer set.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The table was refused (overlapping peers, a shared endpoint, too many peers): the
    /// running table and peers stay in force, and nothing else was touched.
    #[error(transparent)]
    Table(#[from] RouteError),
    /// The table is in force, but TAP mode's per-peer kernel routes could not be brought in
    /// line with it.
    #[error("per-peer routes: {0}")]
    TapRoutes(#[source] NetlinkError),
}

/// The peers in force and everything that follows them: the route table the workers read,
/// TAP mode's per-peer kernel routes, and DirectRouting's host routes.
#[derive(Debug)]
pub struct Peering {
    routes: RouteTableHandle,
    mtu: u16,
    workers: usize,
    source_port_matters: bool,
    in_force: Vec<Peer>,
    tap: Option<TapRoutes>,
    direct: Option<DirectRoutes>,
}

impl Peering {
    /// Starts with no peers and an empty table. `mtu` is our overlay MTU; `workers` the counter
    /// slots per peer; `source_port_matters` the wire format's
    /// [`Encap::SOURCE_PORT_MATTERS`](weft_forwarder::Encap::SOURCE_PORT_MATTERS); `tap` and
    /// `direct` the kernel routes that follow the peers, where the mode has them.
    pub fn new(
        mtu: u16,
        workers: usize,
        source_port_matters: bool,
        tap: Option<TapRoutes>,
        direct: Option<DirectRoutes>,
    ) -> Self {
        let routes = RouteTableHandle::new(RouteTable::empty(source_port_matters));
        Self { routes, mtu, workers, source_port_matters, in_force: Vec::new(), tap, direct }
    }

    /// The table the workers read (and status reports).
    pub fn routes(&self) -> &RouteTableHandle {
        &self.routes
    }

    /// The peers in the running table.
    pub fn in_force(&self) -> &[Peer] {
        &self.in_force
    }

    /// Builds the table for `peers` and swaps it in, then brings TAP's per-peer routes and
    /// the direct routes in line. A table that cannot be built (more peers than a
    /// [`weft_forwarder::PeerId`] indexes, overlapping static peers) never replaces a working
    /// one: the running table, peers and routes stay as they are.
    ///
    /// # Errors
    /// [`ApplyError::Table`] with nothing changed; [`ApplyError::TapRoutes`] with the table
    /// (and the direct routes) in force but TAP's kernel routes behind. Direct routes never
    /// fail: a peer whose route cannot be added stays encapsulated.
    pub async fn apply(&mut self, peers: Vec<Peer>) -> Result<(), ApplyError> {
        let old = self.routes.load_full();
        let table = build_table(&peers, self.mtu, self.workers, Some(&old), self.source_port_matters)?;
        self.routes.store(table);
        let before = std::mem::replace(&mut self.in_force, peers);
        let tap = match &self.tap {
            Some(t) => t.sync(&before, &self.in_force).await,
            None => Ok(()),
        };
        if let Some(d) = &mut self.direct {
            d.sync(&self.in_force).await;
        }
        tap.map_err(ApplyError::TapRoutes)
    }
}

/// TAP mode's kernel routes, one per peer: `<peer subnet> via <peer gateway> onlink` on the
/// TAP, so that the kernel resolves the peer's gateway on the TAP's L2 segment.
#[derive(Debug)]
pub struct TapRoutes {
    nl: Netlink,
    index: u32,
}

impl TapRoutes {
    /// The routes on the TAP with interface index `index`.
    pub fn new(nl: Netlink, index: u32) -> Self {
        Self { nl, index }
    }

    /// Makes the per-peer routes match `new`, removing those of peers in `old` that are gone.
    /// A route depends on the subnet alone, so only subnets that came or went cost a request.
    async fn sync(&self, old: &[Peer], new: &[Peer]) -> Result<(), NetlinkError> {
        let before: HashSet<Ipv4Net> = old.iter().map(|p| p.subnet).collect();
        let after: HashSet<Ipv4Net> = new.iter().map(|p| p.subnet).collect();
        for s in before.difference(&after) {
            self.nl.del_onlink_route(IpNet::V4(*s), gateway_of(*s).into(), self.index).await?;
        }
        for s in after.difference(&before) {
            self.nl.add_onlink_route(IpNet::V4(*s), gateway_of(*s).into(), self.index).await?;
        }
        Ok(())
    }
}

/// A node's gateway: the first usable address of its subnet, which its TUN or TAP holds.
fn gateway_of(subnet: Ipv4Net) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
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

    fn names(p: &Peering) -> Vec<String> {
        p.routes().load().peers().iter().map(|h| h.name.to_string()).collect()
    }

    #[tokio::test]
    async fn a_refused_table_keeps_the_running_one() {
        let mut p = Peering::new(1472, 1, true, None, None);
        assert!(names(&p).is_empty() && p.in_force().is_empty());
        p.apply(vec![peer("n2", 2)]).await.unwrap();
        let mut clash = peer("n9", 9);
        clash.endpoint = peer("n3", 3).endpoint;
        let e = p.apply(vec![peer("n3", 3), clash]).await.unwrap_err();
        assert!(matches!(e, ApplyError::Table(RouteError::DuplicateEndpoint { .. })), "{e}");
        assert_eq!(names(&p), ["n2"]);
        assert_eq!(p.in_force().len(), 1, "the running peers stay in force too");
        p.apply(vec![peer("n3", 3)]).await.unwrap();
        assert_eq!(names(&p), ["n3"]);
        assert_eq!(p.in_force()[0].name, "n3");
    }

    #[tokio::test]
    async fn more_peers_than_a_table_holds_keep_the_last_good_table() {
        let mut p = Peering::new(1472, 1, true, None, None);
        p.apply(vec![peer("n2", 2)]).await.unwrap();
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
        let e = p.apply(many).await.unwrap_err();
        assert!(matches!(e, ApplyError::Table(RouteError::TooManyPeers { .. })), "{e}");
        assert_eq!(names(&p), ["n2"], "the last good table stays");
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

    #[test]
    fn a_gateway_is_the_first_address() {
        assert_eq!(gateway_of("10.244.7.0/24".parse().unwrap()), std::net::Ipv4Addr::new(10, 244, 7, 1));
    }
}
