//! The pod's veth pair over rtnetlink: its host-side name and alias, creation with the host end
//! placed straight into the host namespace, addresses, routes, and the read-back CHECK and GC
//! use. Each function works on whatever namespace its [`Handle`] was opened in.
//!
//! The host end's name is derived from the attachment (`weft` + 11 hex digits of an FNV-1a
//! hash of container id and interface name), so DEL finds it without any state on disk; its
//! alias (`weft-cni:<network>:<container id>:<ifname>:<unix seconds>`) says whose it is, for DEL
//! to make sure and for GC to find the veths of its network and their age.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use weft_ipam::{ContainerId, IfName};

use super::types::CniError;

/// First characters of every host-side veth weft creates.
pub const HOST_PREFIX: &str = "weft";

/// First field of the host veth's alias.
const ALIAS_TAG: &str = "weft-cni";

/// A netlink request that failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The kernel refused, or the socket failed.
    #[error("netlink: {what}: {source}")]
    Request {
        /// What was being done.
        what: String,
        /// The error.
        source: rtnetlink::Error,
    },
    /// An interface of that name is already there.
    #[error("interface {name} already exists {place}")]
    Exists {
        /// The name.
        name: String,
        /// Where (`in the container`, `on the host`).
        place: &'static str,
    },
}

impl From<LinkError> for CniError {
    fn from(e: LinkError) -> Self {
        let code = match e {
            LinkError::Exists { .. } => CniError::INTERFACE_EXISTS,
            LinkError::Request { .. } => CniError::NETLINK,
        };
        CniError::new(code, e.to_string())
    }
}

fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Request { what, source }
}

/// The errno of a kernel refusal, if that is what `e` is.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// The host end's name for an attachment: `weft` + 11 hex digits (15 bytes, Linux's limit).
///
/// FNV-1a (64 bit) is stable across Rust releases, unlike `DefaultHasher`, so a DEL run by a
/// newer plugin still finds a veth an older one made. 44 bits make a collision among a node's
/// pods vanishingly rare, and one would only make ADD fail ("already exists"), never touch
/// another pod: DEL checks the alias before deleting.
pub fn host_veth_name(container_id: &ContainerId, ifname: &IfName) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.as_str().bytes().chain([0]).chain(ifname.as_str().bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{HOST_PREFIX}{:011x}", h >> 20)
}

/// Who a host veth belongs to, as its alias records it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct VethOwner {
    /// The CNI network's name.
    pub network: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// When ADD created it, in seconds since the Unix epoch.
    pub created_secs: u64,
}

impl VethOwner {
    /// The alias text. None of the parts can contain `:` (network names, container ids and
    /// interface names are validated before this is written).
    pub fn to_alias(&self) -> String {
        format!("{ALIAS_TAG}:{}:{}:{}:{}", self.network, self.container_id, self.ifname, self.created_secs)
    }

    /// Reads an alias written by [`VethOwner::to_alias`]; anything else is `None`.
    pub fn from_alias(alias: &str) -> Option<Self> {
        let mut parts = alias.split(':');
        if parts.next()? != ALIAS_TAG {
            return None;
        }
        let owner = Self {
            network: parts.next()?.to_owned(),
            container_id: parts.next()?.to_owned(),
            ifname: parts.next()?.to_owned(),
            created_secs: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(owner)
    }
}

/// What CHECK, GC and ADD's result need to know about a link.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct LinkState {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: Option<String>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Administratively up.
    pub up: bool,
    /// A veth.
    pub is_veth: bool,
    /// For a veth, its peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// Its alias.
    pub alias: Option<String>,
}

impl LinkState {
    fn from_message(m: &LinkMessage) -> Self {
        let mut s = Self { index: m.header.index, up: m.header.flags.contains(LinkFlags::Up), ..Self::default() };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => s.name.clone_from(n),
                LinkAttribute::Address(mac) => s.mac = Some(format_mac(mac)),
                LinkAttribute::Mtu(mtu) => s.mtu = Some(*mtu),
                LinkAttribute::Link(peer) => s.peer_index = Some(*peer),
                LinkAttribute::IfAlias(alias) => s.alias = Some(alias.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    s.is_veth |= infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                }
                _ => {}
            }
        }
        s
    }

    /// The owner its alias names, if it is one of ours.
    pub fn owner(&self) -> Option<VethOwner> {
        self.alias.as_deref().and_then(VethOwner::from_alias)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The link called `name`, if there is one.
///
/// # Errors
/// A request failure other than "no such device".
pub async fn link(h: &Handle, name: &str) -> Result<Option<LinkState>, LinkError> {
    match h.link().get().match_name(name).execute().try_next().await {
        Ok(m) => Ok(m.as_ref().map(LinkState::from_message)),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(req(format!("get link {name}"))(e)),
    }
}

/// Every link whose alias marks it as one of ours.
///
/// # Errors
/// A request failure.
pub async fn our_links(h: &Handle) -> Result<Vec<(LinkState, VethOwner)>, LinkError> {
    let mut links = h.link().get().execute();
    let mut out = Vec::new();
    while let Some(m) = links.try_next().await.map_err(req("list links"))? {
        let s = LinkState::from_message(&m);
        if let Some(owner) = s.owner() {
            out.push((s, owner));
        }
    }
    Ok(out)
}

/// Creates the pair from inside the container namespace: `ifname` here, its peer `host_name`
/// directly in `host_ns`, both with `mtu`. Creating it here makes "the interface already
/// exists" an atomic EEXIST instead of a check that could race.
///
/// # Errors
/// [`LinkError::Exists`] if either name is taken, else a request failure.
pub async fn create_pair(h: &Handle, ifname: &str, host_name: &str, mtu: u32, host_ns: &File) -> Result<(), LinkError> {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(host_name.to_owned())
        .mtu(mtu)
        .setns_by_fd(host_ns.as_raw_fd())
        .build();
    let msg = LinkVeth::new(ifname, host_name).mtu(mtu).set_info_data(InfoData::Veth(InfoVeth::Peer(peer))).build();
    match h.link().add(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::EEXIST) => {
            // Which of the two names? The container one is what the spec's error is about.
            let place = if link(h, ifname).await?.is_some() { "in the container" } else { "on the host" };
            let name = if place == "in the container" { ifname } else { host_name };
            Err(LinkError::Exists { name: name.to_owned(), place })
        }
        Err(e) => Err(req(format!("create veth {ifname} <-> {host_name}"))(e)),
    }
}

/// Sets the alias of link `index`.
///
/// # Errors
/// A request failure.
pub async fn set_alias(h: &Handle, index: u32, alias: &str) -> Result<(), LinkError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).alias(alias).build())
        .execute()
        .await
        .map_err(req(format!("set alias of link {index}")))
}

/// Brings link `index` up.
///
/// # Errors
/// A request failure.
pub async fn set_up(h: &Handle, index: u32) -> Result<(), LinkError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(req(format!("set link {index} up")))
}

/// Adds `addr` to link `index`.
///
/// # Errors
/// A request failure (an address already there is one).
pub async fn add_address(h: &Handle, index: u32, addr: Ipv4Net) -> Result<(), LinkError> {
    h.address()
        .add(index, addr.addr().into(), addr.prefix_len())
        .execute()
        .await
        .map_err(req(format!("add address {addr} to link {index}")))
}

/// The IPv4 addresses on link `index`.
///
/// # Errors
/// A request failure.
pub async fn addresses(h: &Handle, index: u32) -> Result<Vec<Ipv4Net>, LinkError> {
    let mut msgs = h.address().get().set_link_index_filter(index).execute();
    let mut out = Vec::new();
    while let Some(m) = msgs.try_next().await.map_err(req(format!("list addresses of link {index}")))? {
        if m.header.index != index {
            continue;
        }
        for a in &m.attributes {
            if let AddressAttribute::Address(std::net::IpAddr::V4(ip)) = a {
                if let Ok(net) = Ipv4Net::new(*ip, m.header.prefix_len) {
                    out.push(net);
                }
            }
        }
    }
    Ok(out)
}

/// The container's default route: `0.0.0.0/0 via gw dev index onlink`. On-link, because the
/// pod's own address is a /32: no connected route covers the gateway.
///
/// # Errors
/// A request failure (an existing default route is one: weft must be the pod's primary
/// network).
pub async fn add_default_route(h: &Handle, index: u32, gw: Ipv4Addr) -> Result<(), LinkError> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(gw)
        .output_interface(index)
        .onlink()
        .build();
    h.route().add(msg).execute().await.map_err(req(format!("add default route via {gw} onlink")))
}

/// The host's route to the pod: `ip/32 dev index scope link src src`. Not a replace: a route
/// to the same /32 through another veth would mean the address is in use twice, and that must
/// fail loudly.
///
/// # Errors
/// A request failure.
pub async fn add_host_route(h: &Handle, index: u32, ip: Ipv4Addr, src: Ipv4Addr) -> Result<(), LinkError> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .pref_source(src)
        .build();
    h.route().add(msg).execute().await.map_err(req(format!("add route {ip}/32 dev {index}")))
}

/// One IPv4 route, as CHECK compares it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct RouteState {
    /// Destination.
    pub dst: Ipv4Net,
    /// Gateway.
    pub gw: Option<Ipv4Addr>,
    /// Output interface.
    pub oif: Option<u32>,
    /// Table.
    pub table: u32,
}

impl RouteState {
    fn from_message(m: &RouteMessage) -> Option<Self> {
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let mut gw = None;
        let mut oif = None;
        let mut table = u32::from(m.header.table);
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        let dst = Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?;
        Some(Self { dst, gw, oif, table })
    }
}

/// Every IPv4 route, of every table.
///
/// # Errors
/// A request failure.
pub async fn routes(h: &Handle) -> Result<Vec<RouteState>, LinkError> {
    let mut msgs = h.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    let mut out = Vec::new();
    while let Some(m) = msgs.try_next().await.map_err(req("list routes"))? {
        out.extend(RouteState::from_message(&m));
    }
    Ok(out)
}

/// The main routing table's id.
pub const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// Deletes link `index`; a link already gone is fine. Deleting either end of a veth deletes
/// both, wherever the other end is.
///
/// # Errors
/// A request failure other than "no such device".
pub async fn delete(h: &Handle, index: u32, name: &str) -> Result<(), LinkError> {
    match h.link().del(index).execute().await {
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
        r => r.map_err(req(format!("delete link {name}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(cid: &str, ifname: &str) -> String {
        host_veth_name(&ContainerId::new(cid).unwrap(), &IfName::new(ifname).unwrap())
    }

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let a = names("0123456789abcdef", "eth0");
        assert_eq!(a.len(), 15, "{a}");
        assert!(a.starts_with(HOST_PREFIX) && a[4..].bytes().all(|b| b.is_ascii_hexdigit()), "{a}");
        assert_eq!(a, names("0123456789abcdef", "eth0"));
        // Pinned: a later release must name the same attachment's veth the same way.
        assert_eq!(names("abc", "eth0"), "weft540c4ae81be");
        assert_ne!(a, names("0123456789abcdef", "eth1"));
        assert_ne!(names("ab", "ceth0"), names("abc", "eth0"));
        let all: std::collections::HashSet<String> = (0..2000).map(|i| names(&format!("pod{i}"), "eth0")).collect();
        assert_eq!(all.len(), 2000);
    }

    #[test]
    fn alias_round_trip() {
        let o = VethOwner {
            network: "weft.net-1".into(),
            container_id: "abc".into(),
            ifname: "eth0".into(),
            created_secs: 17,
        };
        assert_eq!(o.to_alias(), "weft-cni:weft.net-1:abc:eth0:17");
        assert_eq!(VethOwner::from_alias(&o.to_alias()), Some(o));
        for bad in ["", "weft-cni:a:b:c", "weft-cni:a:b:c:x", "other:a:b:c:1", "weft-cni:a:b:c:1:extra"] {
            assert_eq!(VethOwner::from_alias(bad), None, "{bad}");
        }
    }

    #[test]
    fn macs_are_lower_case_colon_separated() {
        assert_eq!(format_mac(&[0x0a, 0x58, 0xff, 0, 1, 0xab]), "0a:58:ff:00:01:ab");
    }
}
