//! ADD: attaches a container to the overlay.
//!
//! 1. Check the rest of the configuration (`prevResult` 6, `pendingReleaseDir` 7), open
//!    `CNI_NETNS` (code 8 if it is missing, not a network namespace, or the host's own)
//!    and make sure `CNI_IFNAME` is not there yet (101), before anything is allocated.
//! 2. Ask the daemon for the overlay MTU, whether it already holds an address for this
//!    attachment, and an address (11 while it is unreachable or not ready, 102 when full).
//!    The daemon first drops a release an earlier DEL of this attachment recorded while it was
//!    down, so that record can never free the address this ADD gets (`daemon::pending`).
//! 3. In the container (on a thread of its own): the veth pair, its host end created straight
//!    into the host namespace; `CNI_IFNAME` up with `<pod>/32` and `default via <gateway>
//!    onlink`.
//! 4. On the host: alias, rp_filter and IPv6 off on the host end, the gateway /32 on it, link
//!    up, the /32 route to the pod, IPv4 forwarding on.
//! 5. The result, appended to `prevResult` if there is one.
//!
//! Anything failing after step 2 is undone: the host end is deleted (which deletes the
//! container end with it) and the address released if this ADD allocated it (if the daemon
//! already held one, the attachment may be live and the address is kept).
//!
//! ## Address and route layout
//!
//! ```text
//!  pod netns                         host netns
//!  eth0 10.244.1.5/32 ◀── veth ──▶ weft<hash> 10.244.1.1/32 (the node gateway, also on weft0)
//!  default via 10.244.1.1 onlink     10.244.1.5/32 dev weft<hash> scope link src 10.244.1.1
//!                                    10.244.0.0/16 dev weft0 (the daemon's) ─▶ other nodes
//! ```
//!
//! - The pod's address is a /32 (Calico's layout), not the node's /24. Every packet the pod
//!   sends, also to a pod on the same node, goes to its gateway, the host, which routes it: to
//!   a pod on this node through that pod's /32 route, straight to its veth and never through
//!   the TUN (a /32 beats the daemon's /16 into weft0); to another node's pod into weft0; to
//!   the node itself locally. With a /24 the pods would ARP for each other and the host would
//!   have to proxy-ARP for every neighbour.
//! - The gateway is the node's own (its subnet's first address, the TUN's), and the host end
//!   carries it as a /32 too, as the CNI ptp plugin does: the host answers the pod's ARP for it
//!   on that very interface, which also works under `arp_ignore=1` (kube-proxy's strict ARP),
//!   where proxy ARP cannot help for an address local to the host.
//! - Both ends get the overlay MTU, so a pod never sends a packet the tunnel cannot carry.
//! - The result reports the /32, because that is what the container holds and what CHECK can
//!   verify.

use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::{IpNet, Ipv4Net};

use super::args::CniArgs;
use super::ipam::{Ipam, PodAddr};
use super::netns::{self, Netlink, NetnsFile};
use super::sysctl;
use super::types::{CniError, CniResult, Dns, Interface, IpConfig, NetConf, Route};
use super::veth::{self, LinkState, VethOwner};

/// What the container side reports back.
struct ContainerSide {
    link: LinkState,
}

/// Runs ADD and returns the result to print.
///
/// # Errors
/// A [`CniError`] with the spec's code; nothing is left behind that this ADD created.
pub fn run(args: &CniArgs, conf: &NetConf, now: SystemTime) -> Result<CniResult, CniError> {
    let (cid, ifname) = args.attachment()?;
    let prev = conf.prev_result()?;
    // Not used here, but a bad value must stop the pod now, not its DEL with the daemon down.
    super::del::pending_releases(conf)?;
    let ns = NetnsFile::open(args.netns()?)?;
    let exists = netns::run_in(&ns, |nl, _| Ok(nl.block_on(veth::link(nl.handle(), ifname.as_str()))?))?;
    if exists.is_some() {
        return Err(CniError::new(
            CniError::INTERFACE_EXISTS,
            format!("interface {} already exists in {}", ifname.as_str(), ns.path().display()),
        ));
    }
    let host = Netlink::here()?;
    let host_name = veth::host_veth_name(cid, ifname);
    if host.block_on(veth::link(host.handle(), &host_name))?.is_some() {
        return Err(CniError::new(
            CniError::INTERFACE_EXISTS,
            format!(
                "host interface {host_name} for {}/{} already exists (ADD again without DEL?)",
                cid.as_str(),
                ifname.as_str()
            ),
        ));
    }

    let ipam = Ipam::new(conf.socket());
    let overlay = ipam.overlay()?;
    let held_before = ipam.get(cid, ifname)?.is_some();
    let pod = ipam.allocate(cid, ifname)?;

    let owner = VethOwner {
        network: conf.name.clone(),
        container_id: cid.as_str().to_owned(),
        ifname: ifname.as_str().to_owned(),
        created_secs: now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    };
    match attach(&ns, &host, &host_name, ifname.as_str(), pod, overlay.mtu, &owner) {
        Ok((container, host_link)) => {
            let ours = result(&ns, &host_link, &container.link, pod, overlay.mtu, conf.dns.clone());
            Ok(match prev {
                Some(mut p) => {
                    p.append(ours);
                    p
                }
                None => ours,
            })
        }
        Err(e) => {
            let mut undo_errors = Vec::new();
            // EEXIST from creating the pair means nothing was created; a veth of that name is
            // then someone else's (the name was free a moment ago).
            if e.code != CniError::INTERFACE_EXISTS {
                let gone = host.block_on(async {
                    match veth::link(host.handle(), &host_name).await? {
                        Some(l) => veth::delete(host.handle(), l.index, &host_name).await,
                        None => Ok(()),
                    }
                });
                if let Err(u) = gone {
                    undo_errors.push(u.to_string());
                }
            }
            if !held_before {
                if let Err(u) = ipam.release(cid, ifname) {
                    undo_errors.push(u.msg);
                }
            }
            if undo_errors.is_empty() {
                return Err(e);
            }
            let undo = format!("undo incomplete: {}", undo_errors.join("; "));
            let details = if e.details.is_empty() { undo } else { format!("{}; {undo}", e.details) };
            Err(e.with_details(details))
        }
    }
}

/// Steps 3 and 4. Returns the container end and the host end as they are now.
fn attach(
    ns: &NetnsFile,
    host: &Netlink,
    host_name: &str,
    ifname: &str,
    pod: PodAddr,
    mtu: u32,
    owner: &VethOwner,
) -> Result<(ContainerSide, LinkState), CniError> {
    let pod_ip = Ipv4Net::new(pod.address.addr(), 32).map_err(|e| CniError::new(CniError::DAEMON, e.to_string()))?;
    let gw = pod.gateway;
    let container = netns::run_in(ns, |nl, host_ns| {
        let h = nl.handle();
        let link = nl.block_on(async {
            veth::create_pair(h, ifname, host_name, mtu, host_ns).await?;
            let link = veth::link(h, ifname).await?.ok_or_else(|| missing(ifname, "in the container"))?;
            veth::set_up(h, link.index).await?;
            veth::add_address(h, link.index, pod_ip).await?;
            veth::add_default_route(h, link.index, gw).await?;
            Ok::<_, CniError>(link)
        })?;
        Ok(ContainerSide { link })
    })?;

    let h = host.handle();
    let gw_net = Ipv4Net::new(gw, 32).map_err(|e| CniError::new(CniError::DAEMON, e.to_string()))?;
    let host_link = host.block_on(async {
        let link = veth::link(h, host_name).await?.ok_or_else(|| missing(host_name, "on the host"))?;
        veth::set_alias(h, link.index, &owner.to_alias()).await?;
        sysctl::harden_host_veth(host_name).map_err(|e| CniError::new(CniError::NETLINK, e.to_string()))?;
        veth::add_address(h, link.index, gw_net).await?;
        veth::set_up(h, link.index).await?;
        veth::add_host_route(h, link.index, pod_ip.addr(), gw).await?;
        // Read back for the MAC (the kernel chose it).
        let link = veth::link(h, host_name).await?.ok_or_else(|| missing(host_name, "on the host"))?;
        Ok::<_, CniError>(link)
    })?;
    sysctl::enable_ipv4_forwarding().map_err(|e| CniError::new(CniError::NETLINK, e.to_string()))?;
    Ok((container, host_link))
}

fn missing(name: &str, place: &str) -> CniError {
    CniError::new(CniError::NETLINK, format!("interface {name} vanished {place} right after it was created"))
}

/// Step 5: the host end, then the container end (index 1), its /32 and the default route.
fn result(
    ns: &NetnsFile,
    host: &LinkState,
    container: &LinkState,
    pod: PodAddr,
    mtu: u32,
    dns: Option<Dns>,
) -> CniResult {
    let gw = std::net::IpAddr::V4(pod.gateway);
    let pod_ip = Ipv4Net::new(pod.address.addr(), 32).unwrap_or(pod.address);
    CniResult {
        interfaces: vec![
            Interface { name: host.name.clone(), mac: host.mac.clone(), mtu: Some(mtu), ..Interface::default() },
            Interface {
                name: container.name.clone(),
                mac: container.mac.clone(),
                mtu: Some(mtu),
                sandbox: Some(ns.path().display().to_string()),
                ..Interface::default()
            },
        ],
        ips: vec![IpConfig { version: None, interface: Some(1), address: IpNet::V4(pod_ip), gateway: Some(gw) }],
        routes: vec![Route {
            dst: IpNet::V4(Ipv4Net::default()),
            gw: Some(gw),
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }],
        dns: dns.unwrap_or_default(),
    }
}
