//! Netlink, through rtnetlink: find the underlay interface, configure the TUN (MTU,
//! gateway address, link up) and install the routes that send the cluster network into it.
//! No `ip` subprocess.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteMessage, RouteScope, RouteType};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use weft_forwarder::wire::ethernet::MacAddr;

/// Metric of the fail-closed `unreachable` route for the cluster network: far above the
/// TUN's route (metric 0), so it only matters while the TUN is gone, and then it keeps pod
/// traffic from leaking to the default gateway unencapsulated.
pub const FAIL_CLOSED_METRIC: u32 = 4_000_000_000;

/// A netlink request that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The request failed in the kernel or in transport.
    #[error("netlink: {what}: {source}")]
    Request {
        /// What was being done.
        what: String,
        /// The error.
        source: rtnetlink::Error,
    },
    /// The netlink socket could not be opened.
    #[error("netlink: cannot open socket: {0}")]
    Connect(std::io::Error),
    /// No interface holds the address.
    #[error("public_ip: {0} is not assigned to any interface on this host")]
    AddressNotLocal(IpAddr),
    /// The interface vanished.
    #[error("netlink: no interface {0}")]
    NoSuchLink(String),
}

impl NetlinkError {
    /// Whether the kernel refused for lack of privilege (EPERM/EACCES).
    pub fn is_permission(&self) -> bool {
        matches!(self, Self::Request { source: rtnetlink::Error::NetlinkError(m), .. }
            if m.code.is_some_and(|c| c.get() == -libc::EPERM || c.get() == -libc::EACCES))
    }
}

fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

/// Best effort: `net.ipv6.conf.<name>.disable_ipv6 = 1` (a read-only /proc/sys, as in some
/// sandboxes, only means the TUN sees a little link-local chatter, which is dropped).
fn disable_ipv6(name: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::debug!(path, error = %e, "could not disable ipv6 on the tun");
    }
}

/// The interface carrying the underlay address.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct UnderlayLink {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Its MTU.
    pub mtu: u32,
}

/// Netlink connections driven on the current tokio runtime: one to the network namespace the
/// TUN lives in (its address, MTU and routes, the fail-closed route) and one to the host's
/// (the underlay interface, direct routes, flanneld's leftovers). As root both are the same
/// connection; rootless, the TUN's namespace is the overlay's ([`super::rootless`]).
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
    host: Handle,
    /// Rootless: the overlay namespace, where the TUN's sysctls are written too.
    overlay: Option<super::rootless::Overlay>,
}

impl Netlink {
    /// Opens the socket and spawns its connection task.
    ///
    /// # Errors
    /// [`NetlinkError::Connect`].
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { host: handle.clone(), handle, overlay: None })
    }

    /// Rootless: the TUN's connection is opened on the thread inside the overlay namespace
    /// (a netlink socket belongs to the namespace it was created in), the host's here; the
    /// overlay's loopback is brought up.
    ///
    /// # Errors
    /// [`NetlinkError::Connect`], or the loopback request failing.
    pub async fn connect_rootless(overlay: &super::rootless::Overlay) -> Result<Self, NetlinkError> {
        let (conn, host, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        // Registered with this runtime's reactor, created in the overlay's namespace.
        let rt = tokio::runtime::Handle::current();
        let opened = overlay
            .run(move || {
                let _entered = rt.enter();
                rtnetlink::new_connection()
            })
            .map_err(|e| NetlinkError::Connect(std::io::Error::other(e.to_string())))?;
        let (conn, handle, _) = opened.map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        // Loopback is index 1 in every new namespace.
        handle.link().set(LinkUnspec::new_with_index(1).up().build()).execute().await.map_err(req("set lo up"))?;
        Ok(Self { handle, host, overlay: Some(overlay.clone()) })
    }

    /// The rtnetlink handle to the host's namespace, for the modules that work on the
    /// underlay (`underlay`, `direct`, `takeover`).
    pub(crate) fn host_handle(&self) -> &Handle {
        &self.host
    }

    /// Finds the interface that holds `ip` and its MTU.
    ///
    /// # Errors
    /// [`NetlinkError::AddressNotLocal`] when no interface has it.
    pub async fn underlay_for(&self, ip: IpAddr) -> Result<UnderlayLink, NetlinkError> {
        let mut addrs = self.host.address().get().execute();
        let mut index = None;
        while let Some(msg) = addrs.try_next().await.map_err(req("list addresses"))? {
            let holds = msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(x) | AddressAttribute::Local(x) if *x == ip));
            if holds {
                index = Some(msg.header.index);
                break;
            }
        }
        let index = index.ok_or(NetlinkError::AddressNotLocal(ip))?;
        let link = self
            .host
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(req(format!("get link {index}")))?
            .ok_or_else(|| NetlinkError::NoSuchLink(index.to_string()))?;
        let mut out = UnderlayLink { index, name: String::new(), mtu: 1500 };
        for a in link.attributes {
            match a {
                LinkAttribute::IfName(n) => out.name = n,
                LinkAttribute::Mtu(m) => out.mtu = m,
                _ => {}
            }
        }
        Ok(out)
    }

    /// The index of interface `name`.
    ///
    /// # Errors
    /// [`NetlinkError::NoSuchLink`] or a request failure.
    pub async fn link_index(&self, name: &str) -> Result<u32, NetlinkError> {
        self.handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await
            .map_err(req(format!("get link {name}")))?
            .map(|l| l.header.index)
            .ok_or_else(|| NetlinkError::NoSuchLink(name.to_string()))
    }

    /// Sets the TUN's (or TAP's) MTU and, for a TAP, its MAC; gives it `addrs` (host
    /// routes, /32 or /128) and brings it up.
    /// Without an IPv6 address, IPv6 is switched off on the TUN first, so the kernel does not
    /// send router solicitations and MLD reports into it.
    ///
    /// # Errors
    /// The first request that fails.
    pub async fn configure_tun(
        &self,
        index: u32,
        name: &str,
        mtu: u16,
        mac: Option<MacAddr>,
        addrs: &[IpAddr],
    ) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(u32::from(mtu)).build())
            .execute()
            .await
            .map_err(req(format!("set mtu {mtu}")))?;
        if let Some(mac) = mac {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).address(mac.0.to_vec()).build())
                .execute()
                .await
                .map_err(req(format!("set mac {mac}")))?;
        }
        if !addrs.iter().any(IpAddr::is_ipv6) {
            // /proc/sys/net is the namespace of whoever opens it.
            match &self.overlay {
                Some(o) => {
                    let name = name.to_owned();
                    let _ = o.run(move || disable_ipv6(&name));
                }
                None => disable_ipv6(name),
            }
        }
        for a in addrs {
            let len = if a.is_ipv4() { 32 } else { 128 };
            self.handle
                .address()
                .add(index, *a, len)
                .replace()
                .execute()
                .await
                .map_err(req(format!("add address {a}/{len}")))?;
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(req("set link up"))
    }

    /// Routes `net` into interface `index`, preferring `src` as the source address.
    ///
    /// # Errors
    /// A request failure.
    pub async fn add_device_route(&self, net: IpNet, index: u32, src: IpAddr) -> Result<(), NetlinkError> {
        let msg = match (net, src) {
            (IpNet::V4(n), IpAddr::V4(s)) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(index)
                .pref_source(s)
                .scope(RouteScope::Link)
                .build(),
            (IpNet::V6(n), IpAddr::V6(s)) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(index)
                .pref_source(s)
                .build(),
            _ => return Ok(()),
        };
        self.handle.route().add(msg).replace().execute().await.map_err(req(format!("add route {net}")))
    }

    fn onlink(net: IpNet, via: IpAddr, index: u32) -> Option<RouteMessage> {
        Some(match (net, via) {
            (IpNet::V4(n), IpAddr::V4(v)) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .gateway(v)
                .output_interface(index)
                .onlink()
                .build(),
            (IpNet::V6(n), IpAddr::V6(v)) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .gateway(v)
                .output_interface(index)
                .onlink()
                .build(),
            _ => return None,
        })
    }

    /// TAP mode: routes `net` via `via` on interface `index` as on-link, as flannel's vxlan
    /// backend routes each peer subnet via the peer's VTEP address.
    ///
    /// # Errors
    /// A request failure.
    pub async fn add_onlink_route(&self, net: IpNet, via: IpAddr, index: u32) -> Result<(), NetlinkError> {
        let Some(msg) = Self::onlink(net, via, index) else { return Ok(()) };
        self.handle.route().add(msg).replace().execute().await.map_err(req(format!("add route {net} via {via} onlink")))
    }

    /// Removes a route added by [`Netlink::add_onlink_route`]; absent is fine.
    ///
    /// # Errors
    /// A request failure other than "no such route".
    pub async fn del_onlink_route(&self, net: IpNet, via: IpAddr, index: u32) -> Result<(), NetlinkError> {
        let Some(msg) = Self::onlink(net, via, index) else { return Ok(()) };
        match self.handle.route().del(msg).execute().await {
            Err(rtnetlink::Error::NetlinkError(m)) if m.code.is_some_and(|c| c.get() == -libc::ESRCH) => Ok(()),
            r => r.map_err(req(format!("delete route {net} via {via}"))),
        }
    }

    fn unreachable(net: IpNet) -> RouteMessage {
        match net {
            IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .kind(RouteType::Unreachable)
                .priority(FAIL_CLOSED_METRIC)
                .build(),
            IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .kind(RouteType::Unreachable)
                .priority(FAIL_CLOSED_METRIC)
                .build(),
        }
    }

    /// Installs (or keeps) the fail-closed `unreachable` route for `net`.
    ///
    /// # Errors
    /// A request failure.
    pub async fn add_fail_closed(&self, net: IpNet) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(Self::unreachable(net))
            .replace()
            .execute()
            .await
            .map_err(req(format!("add unreachable {net} metric {FAIL_CLOSED_METRIC}")))
    }

    /// Removes the fail-closed route for `net`; absent is fine.
    ///
    /// # Errors
    /// A request failure other than "no such route".
    pub async fn del_fail_closed(&self, net: IpNet) -> Result<(), NetlinkError> {
        match self.handle.route().del(Self::unreachable(net)).execute().await {
            Err(rtnetlink::Error::NetlinkError(m)) if m.code.is_some_and(|c| c.get() == -libc::ESRCH) => Ok(()),
            r => r.map_err(req(format!("delete unreachable {net}"))),
        }
    }
}
