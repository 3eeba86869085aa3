//! Taking over a node that ran flanneld's vxlan backend.
//!
//! flanneld leaves its VTEP `flannel.<VNI>` behind when it stops (so that a restart keeps the
//! data plane). On a node moving to weft that device is in the way twice: its kernel socket
//! holds the VXLAN port, so weft's bind would fail, and its per-peer routes (`<subnet> via
//! <subnet>.0 dev flannel.1 onlink`) are more specific than weft's route for the cluster
//! network, so they would keep carrying pod traffic past weft. weft therefore removes a vxlan
//! device named `flannel.<VNI>` for our VNI and port before it binds (its address and routes
//! go with it), and logs that it did. Nothing else of flanneld's is touched.

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use tracing::warn;

use super::netlink::{Netlink, NetlinkError};

/// The Linux vxlan driver's port when `dstport` is not given (0 in the netlink attribute).
const LINUX_DEFAULT_PORT: u16 = 8472;

/// What a vxlan link says about itself: (VNI, destination port), from its link info.
fn vxlan_id_and_port(link: &LinkMessage) -> Option<(u32, u16)> {
    let infos = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    })?;
    if !infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan))) {
        return None;
    }
    let data = infos.iter().find_map(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
        _ => None,
    })?;
    let id = data.iter().find_map(|d| match d {
        InfoVxlan::Id(id) => Some(*id),
        _ => None,
    })?;
    let port = data
        .iter()
        .find_map(|d| match d {
            InfoVxlan::Port(p) => Some(*p),
            _ => None,
        })
        .filter(|&p| p != 0)
        .unwrap_or(LINUX_DEFAULT_PORT);
    Some((id, port))
}

/// Removes flanneld's VTEP `flannel.<vni>` if it is a vxlan device on VNI `vni` and UDP port
/// `port`; returns its name when it did. A device of that name that is something else is
/// left alone (the bind then reports the port in use, if it is).
///
/// # Errors
/// A netlink request that fails (listing, or the delete).
pub async fn remove_flannel_vtep(nl: &Netlink, vni: u32, port: u16) -> Result<Option<String>, NetlinkError> {
    let name = format!("flannel.{vni}");
    let found = nl.host_handle().link().get().match_name(name.clone()).execute().try_next().await;
    let link = match found {
        Ok(Some(link)) => link,
        Ok(None) => return Ok(None),
        // ENODEV: no such device, the usual case.
        Err(rtnetlink::Error::NetlinkError(m)) if m.code.is_some_and(|c| c.get() == -libc::ENODEV) => return Ok(None),
        Err(source) => return Err(NetlinkError::Request { what: format!("get link {name}"), source }),
    };
    if vxlan_id_and_port(&link) != Some((vni, port)) {
        return Ok(None);
    }
    nl.host_handle()
        .link()
        .del(link.header.index)
        .execute()
        .await
        .map_err(|source| NetlinkError::Request { what: format!("delete {name}"), source })?;
    warn!(
        device = %name,
        port,
        "removed flanneld's VTEP: it held the VXLAN port and routes for the cluster network (stop flanneld before weft)"
    );
    Ok(Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(infos: Vec<LinkInfo>) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::LinkInfo(infos));
        m
    }

    #[test]
    fn reads_vni_and_port_of_vxlan_links_only() {
        let vx = |data| link(vec![LinkInfo::Kind(InfoKind::Vxlan), LinkInfo::Data(InfoData::Vxlan(data))]);
        assert_eq!(vxlan_id_and_port(&vx(vec![InfoVxlan::Id(1), InfoVxlan::Port(8472)])), Some((1, 8472)));
        // dstport 0: the driver's default.
        assert_eq!(vxlan_id_and_port(&vx(vec![InfoVxlan::Id(1), InfoVxlan::Port(0)])), Some((1, 8472)));
        assert_eq!(vxlan_id_and_port(&vx(vec![InfoVxlan::Id(4096), InfoVxlan::Port(4789)])), Some((4096, 4789)));
        assert_eq!(vxlan_id_and_port(&vx(vec![InfoVxlan::Port(8472)])), None, "no VNI");
        assert_eq!(vxlan_id_and_port(&link(vec![LinkInfo::Kind(InfoKind::Dummy)])), None);
        assert_eq!(vxlan_id_and_port(&LinkMessage::default()), None);
    }
}
