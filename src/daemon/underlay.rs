//! Which underlay address a node publishes when its config does not say: flanneld's rule.
//!
//! `public_ip` set: used as is (with `iface` too, it must be one of the interface's
//! addresses, because weft binds its socket to it). `iface` alone: the interface by name, or
//! the one holding that address; `public_ip` is then that address, or the interface's first
//! IPv4 address. Neither: the interface of the IPv4 default route and its first IPv4 address
//! (flannel `pkg/ip/iface.go` `GetDefaultGatewayInterface`, `GetInterfaceIP4Addr`: global
//! addresses before link-local ones).
//!
//! This runs once, at start, before the config is validated ([`pin_public_ip`]); the address
//! found is kept for every later reload, so a changed default route never moves a running
//! node. The lookup reads one snapshot of links, addresses and routes over netlink; the choice
//! itself ([`choose`]) is a pure function of that snapshot.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteType};
use tracing::info;

use super::netlink::{Netlink, NetlinkError};
use super::{ConfigSource, DaemonError};
use crate::config::ConfigError;

/// One interface and its addresses, in the kernel's order (primary addresses first).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Its addresses.
    pub addrs: Vec<IpAddr>,
}

/// What the choice needs to know about the host's network.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Snapshot {
    /// Every interface.
    pub links: Vec<Link>,
    /// The output interface of the IPv4 default route in the main table, if there is one.
    pub default_route_link: Option<u32>,
}

/// The address chosen, and how, for the log.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Chosen {
    /// The address to bind and publish.
    pub public_ip: IpAddr,
    /// The interface that holds it.
    pub link: String,
    /// `iface` or `default route`.
    pub from: &'static str,
}

fn invalid(field: &str, message: String) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message }
}

/// The address flanneld would pick on an interface: its first global IPv4 address, else its
/// first link-local one.
fn first_ipv4(link: &Link) -> Option<Ipv4Addr> {
    let v4 = || {
        link.addrs.iter().filter_map(|a| match a {
            IpAddr::V4(v) if !v.is_loopback() && !v.is_unspecified() && !v.is_multicast() => Some(*v),
            _ => None,
        })
    };
    v4().find(|a| !a.is_link_local()).or_else(|| v4().next())
}

/// Chooses the public address from the configured `public_ip` and `iface` (both as written)
/// and the host's network. `Ok(None)`: `public_ip` is set and nothing needs choosing.
///
/// # Errors
/// A [`ConfigError`] naming `iface` (unknown interface, no IPv4 address, `public_ip` not on
/// it) or `public_ip` (not set and no default route, or its interface has no IPv4 address).
pub fn choose(public_ip: Option<&str>, iface: Option<&str>, host: &Snapshot) -> Result<Option<Chosen>, ConfigError> {
    let Some(spec) = iface else {
        if public_ip.is_some() {
            return Ok(None);
        }
        let hint = "(set public_ip, or iface to name the underlay interface)";
        let Some(index) = host.default_route_link else {
            return Err(invalid(
                "public_ip",
                format!("not set, and this host has no IPv4 default route to find the underlay interface from {hint}"),
            ));
        };
        let Some(link) = host.links.iter().find(|l| l.index == index) else {
            return Err(invalid(
                "public_ip",
                format!("not set, and the default route's interface (index {index}) is gone {hint}"),
            ));
        };
        let Some(ip) = first_ipv4(link) else {
            return Err(invalid(
                "public_ip",
                format!("not set, and {} (the default route's interface) has no IPv4 address {hint}", link.name),
            ));
        };
        return Ok(Some(Chosen { public_ip: IpAddr::V4(ip), link: link.name.clone(), from: "default route" }));
    };
    let by_addr: Option<IpAddr> = spec.parse().ok();
    let link = match by_addr {
        Some(a) => host
            .links
            .iter()
            .find(|l| l.addrs.contains(&a))
            .ok_or_else(|| invalid("iface", format!("{a} is not an address of any interface on this host")))?,
        None => host.links.iter().find(|l| l.name == spec).ok_or_else(|| {
            let names: Vec<&str> = host.links.iter().map(|l| l.name.as_str()).collect();
            invalid("iface", format!("no interface {spec:?} on this host (there are: {})", names.join(", ")))
        })?,
    };
    if let Some(p) = public_ip {
        // A public_ip that does not parse is Config::validate's to report, naming public_ip.
        if let Ok(p) = p.parse::<IpAddr>() {
            if !link.addrs.contains(&p) {
                return Err(invalid(
                    "iface",
                    format!(
                        "{} does not hold public_ip {p} (weft binds its socket to public_ip, so it must be an address of iface)",
                        link.name
                    ),
                ));
            }
        }
        return Ok(None);
    }
    let ip = match by_addr {
        Some(a) => a,
        None => IpAddr::V4(first_ipv4(link).ok_or_else(|| {
            invalid("iface", format!("{} has no IPv4 address (set public_ip, or give iface as an address)", link.name))
        })?),
    };
    Ok(Some(Chosen { public_ip: ip, link: link.name.clone(), from: "iface" }))
}

/// The lowest-metric IPv4 default route of the main table that sends packets somewhere (not
/// `unreachable` or `blackhole`); its interface, or its first next hop's.
fn default_route_link(routes: &[RouteMessage]) -> Option<u32> {
    let table = |r: &RouteMessage| {
        r.attributes.iter().find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
    };
    routes
        .iter()
        .filter(|r| r.header.destination_prefix_length == 0 && r.header.kind == RouteType::Unicast)
        .filter(|r| table(r).unwrap_or(u32::from(r.header.table)) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .filter_map(|r| {
            let metric =
                r.attributes.iter().find_map(|a| if let RouteAttribute::Priority(p) = a { Some(*p) } else { None });
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
                _ => None,
            })?;
            Some((metric.unwrap_or(0), oif))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, oif)| oif)
}

fn req(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |source| NetlinkError::Request { what: what.into(), source }
}

/// Reads links, addresses and IPv4 routes.
///
/// # Errors
/// A netlink request failure.
pub async fn snapshot(nl: &Netlink) -> Result<Snapshot, NetlinkError> {
    let h = nl.host_handle();
    let mut links: Vec<Link> = Vec::new();
    let mut stream = h.link().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(req("list links"))? {
        let name =
            msg.attributes.iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None });
        links.push(Link { index: msg.header.index, name: name.unwrap_or_default(), addrs: Vec::new() });
    }
    let mut stream = h.address().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(req("list addresses"))? {
        // IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on point-to-point links.
        let local =
            msg.attributes.iter().find_map(|a| if let AddressAttribute::Local(x) = a { Some(*x) } else { None });
        let addr =
            msg.attributes.iter().find_map(|a| if let AddressAttribute::Address(x) = a { Some(*x) } else { None });
        if let (Some(ip), Some(link)) = (local.or(addr), links.iter_mut().find(|l| l.index == msg.header.index)) {
            link.addrs.push(ip);
        }
    }
    let routes: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(req("list routes"))?;
    Ok(Snapshot { links, default_route_link: default_route_link(&routes) })
}

/// Finds the public address once, if the config leaves it to weft, and keeps it in `source`
/// for this start and every reload. Also checks that a `public_ip` given with `iface` is one
/// of its addresses.
///
/// # Errors
/// [`DaemonError::Config`] naming the field (the config cannot be read, or no address can be
/// chosen); a netlink failure.
pub async fn pin_public_ip(mut source: ConfigSource, nl: &Netlink) -> Result<ConfigSource, DaemonError> {
    let raw = source.raw()?;
    if raw.public_ip.is_some() && raw.iface.is_none() {
        return Ok(source);
    }
    let host = snapshot(nl).await?;
    if let Some(c) = choose(raw.public_ip.as_deref(), raw.iface.as_deref(), &host)? {
        info!(public_ip = %c.public_ip, interface = %c.link, from = c.from, "public ip chosen");
        source.detected_public_ip = Some(c.public_ip);
    }
    Ok(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Snapshot {
        let link = |index, name: &str, addrs: &[&str]| Link {
            index,
            name: name.into(),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        };
        Snapshot {
            links: vec![
                link(1, "lo", &["127.0.0.1", "::1"]),
                link(2, "eth0", &["fe80::1", "169.254.3.3", "198.18.0.1", "198.18.0.77"]),
                link(3, "eth1", &["198.19.0.5"]),
                link(4, "v6only", &["fd00::5"]),
            ],
            default_route_link: Some(2),
        }
    }

    fn pick(public_ip: Option<&str>, iface: Option<&str>, h: &Snapshot) -> Result<Option<(String, String)>, String> {
        choose(public_ip, iface, h).map(|c| c.map(|c| (c.public_ip.to_string(), c.link))).map_err(|e| e.to_string())
    }

    #[test]
    fn flannels_choice() {
        let h = host();
        let some = |ip: &str, link: &str| Ok(Some((ip.to_owned(), link.to_owned())));
        // Neither: the default route's interface, its first global IPv4 address.
        assert_eq!(pick(None, None, &h), some("198.18.0.1", "eth0"));
        assert_eq!(pick(None, Some("eth1"), &h), some("198.19.0.5", "eth1"));
        // iface as an address: that address, on its interface.
        assert_eq!(pick(None, Some("198.18.0.77"), &h), some("198.18.0.77", "eth0"));
        // public_ip alone needs nothing; with iface it must be on it.
        assert_eq!(pick(Some("198.18.0.1"), None, &h), Ok(None));
        assert_eq!(pick(Some("198.18.0.77"), Some("eth0"), &h), Ok(None));
        // Only a link-local address: flannel takes it.
        let mut ll = h.clone();
        ll.links[1].addrs = vec!["169.254.3.3".parse().unwrap()];
        assert_eq!(pick(None, Some("eth0"), &ll), some("169.254.3.3", "eth0"));
    }

    #[test]
    fn errors_name_the_field() {
        let h = host();
        let err = |p, i, h: &Snapshot| pick(p, i, h).unwrap_err();
        assert!(
            err(None, Some("eth9"), &h).starts_with("iface: no interface \"eth9\" on this host (there are: lo, eth0")
        );
        assert_eq!(
            err(None, Some("198.18.0.9"), &h),
            "iface: 198.18.0.9 is not an address of any interface on this host"
        );
        assert!(err(None, Some("v6only"), &h).starts_with("iface: v6only has no IPv4 address"));
        assert!(
            err(Some("198.19.0.5"), Some("eth0"), &h).starts_with("iface: eth0 does not hold public_ip 198.19.0.5")
        );
        let no_route = Snapshot { default_route_link: None, ..h.clone() };
        assert!(err(None, None, &no_route).starts_with("public_ip: not set, and this host has no IPv4 default route"));
        let v6_default = Snapshot { default_route_link: Some(4), ..h };
        assert!(
            err(None, None, &v6_default)
                .starts_with("public_ip: not set, and v6only (the default route's interface) has no IPv4 address")
        );
    }

    #[test]
    fn default_route_is_the_lowest_metric_unicast_one_of_the_main_table() {
        let route = |len: u8, kind, table: u8, oif: u32, metric: Option<u32>| {
            let mut m = RouteMessageBuilder::<Ipv4Addr>::new().kind(kind).output_interface(oif).build();
            m.header.destination_prefix_length = len;
            m.header.table = table;
            if let Some(p) = metric {
                m.attributes.push(RouteAttribute::Priority(p));
            }
            m
        };
        let main = RouteHeader::RT_TABLE_MAIN;
        let routes = [
            route(24, RouteType::Unicast, main, 9, None),
            route(0, RouteType::Unreachable, main, 8, None),
            route(0, RouteType::Unicast, 100, 7, None),
            route(0, RouteType::Unicast, main, 3, Some(600)),
            route(0, RouteType::Unicast, main, 2, Some(100)),
        ];
        assert_eq!(default_route_link(&routes), Some(2));
        assert_eq!(default_route_link(&routes[..3]), None);
    }
}
