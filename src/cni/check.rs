//! CHECK: verifies an attachment against `prevResult` (the chain's final result, so later
//! plugins' additions, such as the bandwidth plugin's ifb interface, are tolerated) and against
//! things outside it: the daemon still holds the reservation, the host end is the container
//! end's peer and routes to the pod.
//!
//! Checked, each failure code 104 with what differs:
//! 1. `prevResult` names `CNI_IFNAME` in a sandbox, with at least one address on it.
//! 2. The daemon holds an address for the attachment, and it is one of those addresses.
//! 3. In the container: the interface exists, is a veth and up, has the MAC and MTU the result
//!    says, every address of the result, and every IPv4 route of the result.
//! 4. On the host: the host end exists, is up and is the container end's peer, and the /32
//!    route to each pod address goes through it.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

use super::args::CniArgs;
use super::ipam::Ipam;
use super::netns::{self, Netlink, NetnsFile};
use super::types::{CniError, IpConfig, NetConf};
use super::veth::{self, LinkState, MAIN_TABLE, RouteState};

fn fail(msg: String) -> CniError {
    CniError::new(CniError::CHECK_FAILED, msg)
}

/// Runs CHECK.
///
/// # Errors
/// 7 without `prevResult`, 104 when anything differs, 11 with the daemon unreachable, 8 when
/// the netns cannot be entered.
pub fn run(args: &CniArgs, conf: &NetConf) -> Result<(), CniError> {
    let (cid, ifname) = args.attachment()?;
    let prev = conf.prev_result()?.ok_or_else(|| {
        CniError::new(CniError::INVALID_CONFIG, "prevResult: CHECK needs the result of ADD, and none was given")
    })?;
    let (idx, iface) = prev
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, i)| i.name == ifname.as_str() && i.in_sandbox())
        .ok_or_else(|| fail(format!("prevResult lists no interface {} in a sandbox", ifname.as_str())))?;
    let ips: Vec<&IpConfig> = prev.ips.iter().filter(|ip| ip.interface == Some(idx)).collect();
    let v4: Vec<Ipv4Net> = ips
        .iter()
        .filter_map(|ip| match ip.address {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        })
        .collect();
    if v4.is_empty() {
        return Err(fail(format!("prevResult has no IPv4 address on {}", ifname.as_str())));
    }

    let held = Ipam::new(conf.socket())
        .get(cid, ifname)?
        .ok_or_else(|| fail(format!("the weft daemon holds no address for {}/{}", cid.as_str(), ifname.as_str())))?;
    if !v4.iter().any(|n| n.addr() == held.address.addr()) {
        return Err(fail(format!(
            "the weft daemon holds {} for {}/{}, but prevResult says {}",
            held.address.addr(),
            cid.as_str(),
            ifname.as_str(),
            v4.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        )));
    }

    let ns = NetnsFile::open(args.netns()?)?;
    let (link, addrs, routes) = netns::run_in(&ns, |nl, _| {
        let h = nl.handle();
        nl.block_on(async {
            let Some(link) = veth::link(h, ifname.as_str()).await? else {
                return Err(fail(format!("interface {} is missing from {}", ifname.as_str(), ns.path().display())));
            };
            let addrs = veth::addresses(h, link.index).await?;
            let routes = veth::routes(h).await?;
            Ok((link, addrs, routes))
        })
    })?;
    check_container(&link, iface, &v4, &addrs)?;
    for r in &prev.routes {
        let (IpNet::V4(dst), gw) = (r.dst, r.gw) else { continue };
        let table = r.table.unwrap_or(MAIN_TABLE);
        let found = routes.iter().any(|have| {
            have.dst == dst.trunc()
                && have.table == table
                && match gw {
                    Some(IpAddr::V4(g)) => have.gw == Some(g),
                    _ => true,
                }
        });
        if !found {
            let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
            return Err(fail(format!("route {dst}{via} (table {table}) is missing from the container")));
        }
    }

    let host = Netlink::here()?;
    let host_name = veth::host_veth_name(cid, ifname);
    let (host_link, host_routes) = host.block_on(async {
        let l = veth::link(host.handle(), &host_name).await?;
        let r = veth::routes(host.handle()).await?;
        Ok::<_, CniError>((l, r))
    })?;
    let host_link = host_link.ok_or_else(|| fail(format!("host interface {host_name} is missing")))?;
    check_host(&host_link, &link, &v4, &host_routes)
}

/// Step 3 without the routes.
fn check_container(
    link: &LinkState,
    iface: &super::types::Interface,
    v4: &[Ipv4Net],
    addrs: &[Ipv4Net],
) -> Result<(), CniError> {
    let name = &link.name;
    if !link.is_veth {
        return Err(fail(format!("{name} in the container is not a veth")));
    }
    if !link.up {
        return Err(fail(format!("{name} in the container is down")));
    }
    if let Some(want) = &iface.mac {
        if !link.mac.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(want)) {
            return Err(fail(format!(
                "{name} has MAC {}, prevResult says {want}",
                link.mac.as_deref().unwrap_or("none")
            )));
        }
    }
    if let Some(want) = iface.mtu {
        if link.mtu != Some(want) {
            return Err(fail(format!("{name} has MTU {:?}, prevResult says {want}", link.mtu)));
        }
    }
    for want in v4 {
        if !addrs.contains(want) {
            return Err(fail(format!("{name} lacks address {want}")));
        }
    }
    Ok(())
}

/// Step 4.
fn check_host(host: &LinkState, container: &LinkState, v4: &[Ipv4Net], routes: &[RouteState]) -> Result<(), CniError> {
    let name = &host.name;
    if !host.up {
        return Err(fail(format!("host interface {name} is down")));
    }
    if container.peer_index != Some(host.index) {
        return Err(fail(format!("host interface {name} is not the peer of {} in the container", container.name)));
    }
    for ip in v4 {
        let dst = Ipv4Net::new(ip.addr(), 32).unwrap_or(*ip);
        if !routes.iter().any(|r| r.dst == dst && r.oif == Some(host.index) && r.table == MAIN_TABLE) {
            return Err(fail(format!("the host has no route {dst} dev {name}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::types::Interface;

    fn link(name: &str) -> LinkState {
        LinkState {
            index: 2,
            name: name.into(),
            mac: Some("0a:00:00:00:00:01".into()),
            mtu: Some(1472),
            up: true,
            is_veth: true,
            peer_index: Some(9),
            alias: None,
        }
    }

    #[test]
    fn container_differences_are_named() {
        let iface = Interface {
            name: "eth0".into(),
            mac: Some("0A:00:00:00:00:01".into()),
            mtu: Some(1472),
            ..Interface::default()
        };
        let addr: Ipv4Net = "10.244.1.5/32".parse().unwrap();
        assert!(check_container(&link("eth0"), &iface, &[addr], &[addr]).is_ok());
        let e = check_container(&link("eth0"), &iface, &[addr], &[]).unwrap_err();
        assert!(e.msg.contains("lacks address 10.244.1.5/32") && e.code == CniError::CHECK_FAILED, "{e}");
        let down = LinkState { up: false, ..link("eth0") };
        assert!(check_container(&down, &iface, &[addr], &[addr]).unwrap_err().msg.contains("down"));
        let other_mac = LinkState { mac: Some("0a:00:00:00:00:02".into()), ..link("eth0") };
        assert!(check_container(&other_mac, &iface, &[addr], &[addr]).unwrap_err().msg.contains("MAC"));
        let other_mtu = LinkState { mtu: Some(1500), ..link("eth0") };
        assert!(check_container(&other_mtu, &iface, &[addr], &[addr]).unwrap_err().msg.contains("MTU"));
    }

    #[test]
    fn host_must_be_the_peer_and_route_to_the_pod() {
        let host = LinkState { index: 9, ..link("weftabc") };
        let addr: Ipv4Net = "10.244.1.5/32".parse().unwrap();
        let route = RouteState { dst: addr, gw: None, oif: Some(9), table: MAIN_TABLE };
        assert!(check_host(&host, &link("eth0"), &[addr], std::slice::from_ref(&route)).is_ok());
        assert!(check_host(&host, &link("eth0"), &[addr], &[]).unwrap_err().msg.contains("no route"));
        let not_peer = LinkState { peer_index: Some(3), ..link("eth0") };
        assert!(check_host(&host, &not_peer, &[addr], &[route]).unwrap_err().msg.contains("not the peer"));
    }
}
