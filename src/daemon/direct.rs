//! flannel's vxlan `DirectRouting`: a peer whose PublicIP this host reaches without a gateway
//! (same L2 subnet on the underlay interface) gets a kernel route
//! `<peer subnet> via <peer PublicIP> dev <underlay>`, more specific than the cluster-network
//! route into the TUN, so the kernel sends that traffic unencapsulated and the peer's kernel
//! forwards it to its pods. Peers behind a router keep going through the TUN and are
//! encapsulated.
//!
//! 1. "Directly reachable" is flannel's test (`pkg/ip/route.go` `DirectRouting`): the kernel's
//!    own lookup for the PublicIP (`ip route get`) has no gateway, and here also leaves by our
//!    underlay interface (a `via PublicIP dev <underlay>` route would be wrong otherwise).
//! 2. After every change of the peer set ([`super::control::Peering::apply`]), the wanted
//!    routes are compared with the installed ones ([`plan`], pure) and only the difference is
//!    sent to the kernel.
//! 3. weft's routes carry their own routing protocol number ([`PROTOCOL`], `proto 87` in
//!    `ip route`), so a start adopts what an earlier run left (a crash, a restart) and removes
//!    what no lease backs any more, and a leave removes exactly weft's routes ([`remove_all`]).
//! 4. A plain stop or a restart keeps them: they need no weft process (kernel forwarding), so
//!    traffic to direct peers flows on while weft restarts, as with flannel's kernel routes.
//!    The cluster network's other peers are refused meanwhile by the fail-closed route.
//!
//! The receiving host must forward (`net.ipv4.ip_forward = 1`, as flannel expects): weft-cni
//! sets it on its first ADD, and the daemon sets it here too when DirectRouting is on, for pods
//! attached by another plugin (flannel's, reading weft's `subnet.env`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType};
use tracing::{info, warn};
use weft_ipam::NetworkConfig;

use super::netlink::{Netlink, NetlinkError};
use crate::config::Peer;

/// The routing protocol number on weft's direct routes (`ip route show proto 87`). Unassigned
/// in iproute2's `rt_protos` (the registered ones are 0–18, 42, 99, 186–192).
pub const PROTOCOL: u8 = 87;

/// A direct route: the peer's subnet via its PublicIP.
pub type Routes = BTreeMap<Ipv4Net, Ipv4Addr>;

/// What to change in the kernel to get from `installed` to `wanted`.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Plan {
    /// Routes to remove (gone, or now via another address).
    pub del: Vec<(Ipv4Net, Ipv4Addr)>,
    /// Routes to add (new, or now via another address).
    pub add: Vec<(Ipv4Net, Ipv4Addr)>,
}

/// The difference between the routes in the kernel and the wanted ones; unchanged routes are
/// not touched.
pub fn plan(installed: &Routes, wanted: &Routes) -> Plan {
    let mut p = Plan::default();
    for (net, via) in installed {
        if wanted.get(net) != Some(via) {
            p.del.push((*net, *via));
        }
    }
    for (net, via) in wanted {
        if installed.get(net) != Some(via) {
            p.add.push((*net, *via));
        }
    }
    p
}

/// Whether the kernel's answer to `ip route get <PublicIP>` means "directly connected on
/// `underlay`": no gateway, and out of that interface.
fn is_direct(answer: &RouteMessage, underlay: u32) -> bool {
    let gateway = answer.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Via(_)));
    let oif = answer.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None });
    answer.header.kind == RouteType::Unicast && !gateway && oif == Some(underlay)
}

fn route(net: Ipv4Net, via: Ipv4Addr, underlay: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(net.network(), net.prefix_len())
        .gateway(via)
        .output_interface(underlay)
        .protocol(RouteProtocol::Other(PROTOCOL))
        .build()
}

fn req(what: String) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |source| NetlinkError::Request { what, source }
}

/// weft's direct routes in the kernel, from any run: (subnet, via, interface).
async fn ours(nl: &Netlink) -> Result<Vec<(Ipv4Net, Ipv4Addr, u32)>, NetlinkError> {
    let all: Vec<RouteMessage> = nl
        .host_handle()
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(req("list routes".into()))?;
    Ok(all
        .iter()
        .filter(|r| r.header.protocol == RouteProtocol::Other(PROTOCOL))
        .filter_map(|r| {
            let mut dst = None;
            let mut via = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let net = Ipv4Net::new(dst?, r.header.destination_prefix_length).ok()?;
            Some((net, via?, oif?))
        })
        .collect())
}

/// Removes every direct route weft installed, from this run or an earlier one: on a leave, and
/// at a start without DirectRouting. Failures are logged; a route left behind only keeps
/// sending one peer subnet to its old host.
pub async fn remove_all(nl: &Netlink) {
    let routes = match ours(nl).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot list direct routes to remove them");
            return;
        }
    };
    for (net, via, oif) in routes {
        match nl.host_handle().route().del(route(net, via, oif)).execute().await {
            Ok(()) => info!(subnet = %net, via = %via, "direct route removed"),
            Err(e) => warn!(subnet = %net, via = %via, error = %e, "cannot remove direct route"),
        }
    }
}

/// The direct routes of this node, kept in step with the peer set.
#[derive(Debug)]
pub struct DirectRoutes {
    nl: Netlink,
    underlay: u32,
    installed: Routes,
}

impl DirectRoutes {
    /// Starts from the direct routes already in the kernel on `underlay` (an earlier run's),
    /// so that the first [`DirectRoutes::sync`] removes the stale ones; routes of ours on
    /// another interface (the underlay changed) are removed now.
    pub async fn adopt(nl: Netlink, underlay: u32) -> Self {
        let mut installed = Routes::new();
        match ours(&nl).await {
            Ok(routes) => {
                for (net, via, oif) in routes {
                    if oif == underlay {
                        installed.insert(net, via);
                    } else if let Err(e) = nl.host_handle().route().del(route(net, via, oif)).execute().await {
                        warn!(subnet = %net, via = %via, error = %e, "cannot remove direct route on an old interface");
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list earlier direct routes; starting from none"),
        }
        Self { nl, underlay, installed }
    }

    /// The routes in force.
    pub fn installed(&self) -> &Routes {
        &self.installed
    }

    /// Which peers get a direct route: those whose PublicIP the kernel reaches without a
    /// gateway out of the underlay interface. A lookup that fails counts as "not direct":
    /// encapsulating is always correct, a wrong direct route is not.
    async fn wanted(&self, peers: &[Peer]) -> Routes {
        let mut out = Routes::new();
        for p in peers {
            let IpAddr::V4(ip) = p.endpoint.ip() else { continue };
            let query = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(ip, 32).build();
            let answer = self.nl.host_handle().route().get(query).execute().try_next().await;
            match answer {
                Ok(Some(a)) if is_direct(&a, self.underlay) => {
                    out.insert(p.subnet, ip);
                }
                Ok(_) => {}
                Err(e) => warn!(peer = %p.name, public_ip = %ip, error = %e, "route lookup failed; encapsulating"),
            }
        }
        out
    }

    /// Makes the kernel's direct routes match `peers`. Never fails: a route that cannot be
    /// added leaves that peer encapsulated (the TUN route still covers it), and is retried at
    /// the next change.
    pub async fn sync(&mut self, peers: &[Peer]) {
        let wanted = self.wanted(peers).await;
        let p = plan(&self.installed, &wanted);
        for (net, via) in p.del {
            match self.nl.host_handle().route().del(route(net, via, self.underlay)).execute().await {
                Ok(()) => info!(subnet = %net, via = %via, "direct route removed"),
                // Gone already (someone removed it by hand): the goal is reached.
                Err(rtnetlink::Error::NetlinkError(m)) if m.code.is_some_and(|c| c.get() == -libc::ESRCH) => {}
                Err(e) => {
                    warn!(subnet = %net, via = %via, error = %e, "cannot remove direct route");
                    continue;
                }
            }
            self.installed.remove(&net);
        }
        for (net, via) in p.add {
            match self.nl.host_handle().route().add(route(net, via, self.underlay)).replace().execute().await {
                Ok(()) => {
                    self.installed.insert(net, via);
                    info!(subnet = %net, via = %via, "direct route added: same L2 subnet, no encapsulation");
                }
                Err(e) => warn!(subnet = %net, via = %via, error = %e, "cannot add direct route; encapsulating"),
            }
        }
    }
}

/// The direct routes for a node of `network`, when its config has `Backend.DirectRouting`
/// (IPv4 forwarding is turned on, for direct peers to reach this host's pods). Without it,
/// removes the direct routes an earlier run left and returns `None`.
pub async fn for_network(network: &NetworkConfig, nl: &Netlink, underlay: u32) -> Option<DirectRoutes> {
    if !network.backend.direct_routing() {
        remove_all(nl).await;
        return None;
    }
    if let Err(e) = crate::cni::sysctl::enable_ipv4_forwarding() {
        warn!(error = %e, "DirectRouting: cannot enable IPv4 forwarding; direct peers cannot reach this host's pods");
    }
    info!(underlay, "DirectRouting: peers on this L2 subnet are routed without encapsulation");
    Some(DirectRoutes::adopt(nl.clone(), underlay).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(list: &[(&str, &str)]) -> Routes {
        list.iter().map(|(n, v)| (n.parse().unwrap(), v.parse().unwrap())).collect()
    }

    #[test]
    fn plan_changes_only_the_difference() {
        let installed = routes(&[
            ("10.244.2.0/24", "198.18.0.2"),
            ("10.244.3.0/24", "198.18.0.3"),
            ("10.244.4.0/24", "198.18.0.4"),
        ]);
        let wanted = routes(&[
            ("10.244.2.0/24", "198.18.0.2"),
            ("10.244.3.0/24", "198.18.0.33"),
            ("10.244.5.0/24", "198.18.0.5"),
        ]);
        let p = plan(&installed, &wanted);
        let r = |n: &str, v: &str| (n.parse().unwrap(), v.parse().unwrap());
        assert_eq!(p.del, [r("10.244.3.0/24", "198.18.0.3"), r("10.244.4.0/24", "198.18.0.4")]);
        assert_eq!(p.add, [r("10.244.3.0/24", "198.18.0.33"), r("10.244.5.0/24", "198.18.0.5")]);
        assert_eq!(plan(&wanted, &wanted), Plan::default());
        assert_eq!(plan(&installed, &Routes::new()).del.len(), 3);
    }

    #[test]
    fn direct_means_no_gateway_and_our_interface() {
        let answer = |gw: Option<&str>, oif: u32, kind| {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::new(198, 18, 0, 2), 32)
                .output_interface(oif)
                .kind(kind);
            if let Some(g) = gw {
                b = b.gateway(g.parse().unwrap());
            }
            b.build()
        };
        assert!(is_direct(&answer(None, 2, RouteType::Unicast), 2));
        assert!(!is_direct(&answer(Some("198.18.0.254"), 2, RouteType::Unicast), 2), "behind a router");
        assert!(!is_direct(&answer(None, 3, RouteType::Unicast), 2), "another interface");
        assert!(!is_direct(&answer(None, 1, RouteType::Local), 1), "our own address");
    }
}
