//! TAP mode: Ethernet frames end to end over VXLAN, with the same checks as TUN mode on
//! every frame, per-peer MAC learning with ageing, and head-end replication of broadcast,
//! multicast and unknown unicast to every peer, rate-limited.
//!
//! Each node's TAP carries its VTEP MAC and its gateway address; the kernel routes each peer
//! subnet via that peer's gateway (onlink), resolves it with ARP or NDP (flooded to the
//! peers), and the owner's kernel answers. The only L2 endpoint on each node is its TAP, so a
//! frame from a peer must come from that peer's VTEP MAC and go to ours or to a group
//! address. Pure: time comes in as `now`, the MAC table is a fixed array.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::buf::PacketBuf;
use crate::encap::vxlan::check_header;
use crate::forwarder::{PacketCore, TunVerdict, UnderlayVerdict, repair_counted, write_icmp_error};
use crate::node::LocalNode;
use crate::ratelimit::{IcmpLimiter, TokenBucket};
use crate::route::{NextHop, PeerId, RouteTable};
use crate::stats::{DropReason, WorkerStats};
use crate::wire::arp::ArpPacket;
use crate::wire::ethernet::{self, EthernetFrame, MacAddr};
use crate::wire::icmp::IcmpKind;
use crate::wire::ip::{IpFacts, IpPacket};
use crate::wire::ipv6;
use crate::wire::vxlan::{self, Vni, VxlanHeader};

/// Learned entries kept per worker; a power of two.
const MAC_TABLE_SLOTS: usize = 1024;
/// Mask of a slot index (the table is a ring: probing wraps past the last slot).
const SLOT_MASK: usize = MAC_TABLE_SLOTS - 1;
/// Slots probed from a MAC's home slot.
const PROBE: usize = 8;
/// How long a learned MAC stays without being seen again (Linux bridge's default).
pub const MAC_AGEING: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug)]
struct MacEntry {
    mac: MacAddr,
    from: SocketAddr,
    seen: Option<Instant>,
}

/// MAC → underlay endpoint, learned from frames that passed every check.
#[derive(Debug)]
pub struct MacTable {
    slots: Box<[MacEntry]>,
    ageing: Duration,
}

impl MacTable {
    /// An empty table whose entries expire after `ageing`.
    pub fn new(ageing: Duration) -> Self {
        let empty = MacEntry { mac: MacAddr::default(), from: SocketAddr::from(([0, 0, 0, 0], 0)), seen: None };
        Self { slots: vec![empty; MAC_TABLE_SLOTS].into_boxed_slice(), ageing }
    }

    fn home(mac: MacAddr) -> usize {
        let v = mac.0.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193));
        v as usize & SLOT_MASK
    }

    fn fresh(&self, e: &MacEntry, now: Instant) -> bool {
        e.seen.is_some_and(|t| now.saturating_duration_since(t) < self.ageing)
    }

    /// Where `mac` was last seen, if recently.
    pub fn lookup(&self, mac: MacAddr, now: Instant) -> Option<SocketAddr> {
        let home = Self::home(mac);
        (0..PROBE)
            .filter_map(|i| self.slots.get(home.wrapping_add(i) & SLOT_MASK))
            .find(|e| e.mac == mac && self.fresh(e, now))
            .map(|e| e.from)
    }

    /// Records that `mac` sent from `from`: refreshes its entry, or takes a free or stale
    /// slot, or evicts the least recently seen of the probed slots.
    pub fn learn(&mut self, mac: MacAddr, from: SocketAddr, now: Instant) {
        let home = Self::home(mac);
        let mut victim = home;
        let mut oldest: Option<Instant> = None;
        for i in 0..PROBE {
            let idx = home.wrapping_add(i) & SLOT_MASK;
            let Some(e) = self.slots.get(idx) else { continue };
            if e.mac == mac || !self.fresh(e, now) {
                victim = idx;
                break;
            }
            if oldest.is_none_or(|o| e.seen.is_some_and(|s| s < o)) {
                oldest = e.seen;
                victim = idx;
            }
        }
        if let Some(e) = self.slots.get_mut(victim) {
            *e = MacEntry { mac, from, seen: Some(now) };
        }
    }
}

/// The TAP-mode core of one worker.
#[derive(Debug)]
pub struct Bridge {
    vni: Vni,
    local_mac: MacAddr,
    local: LocalNode,
    worker: usize,
    stats: Arc<WorkerStats>,
    macs: MacTable,
    flood_limit: TokenBucket,
    icmp_limit: IcmpLimiter,
}

/// Frames per second a worker replicates to all peers (broadcast, multicast, unknown
/// unicast), and the burst allowed.
pub const FLOOD_RATE: (u64, u64) = (1000, 200);

impl Bridge {
    /// A bridge for worker `worker` on `vni`, whose TAP carries `local_mac`.
    pub fn new(vni: Vni, local_mac: MacAddr, local: LocalNode, worker: usize, stats: Arc<WorkerStats>) -> Self {
        Self {
            vni,
            local_mac,
            local,
            worker,
            stats,
            macs: MacTable::new(MAC_AGEING),
            flood_limit: TokenBucket::new(FLOOD_RATE.0, FLOOD_RATE.1),
            icmp_limit: IcmpLimiter::default(),
        }
    }

    fn drop_tap(&self, r: DropReason) -> TunVerdict {
        self.stats.count_drop(r);
        TunVerdict::Drop(r)
    }

    fn drop_underlay(&self, r: DropReason) -> UnderlayVerdict {
        self.stats.count_drop(r);
        UnderlayVerdict::Drop(r)
    }

    fn push_vxlan(&self, pkt: &mut PacketBuf<'_>) -> Result<(), DropReason> {
        let h = pkt.prepend(vxlan::HEADER_LEN).ok_or(DropReason::Oversize)?;
        VxlanHeader::new_unchecked(h).emit(self.vni);
        Ok(())
    }

    /// The peer a unicast destination MAC belongs to: a configured VTEP MAC, else learned.
    fn peer_for<'r>(&self, routes: &'r RouteTable, dst: MacAddr, now: Instant) -> Option<(PeerId, &'r NextHop)> {
        if let Some(found) = routes.peer_by_mac(dst) {
            return Some(found);
        }
        let from = self.macs.lookup(dst, now)?;
        routes.peer_by_source(from)
    }

    /// A frame the kernel wrote into the TAP.
    pub fn from_tap(&mut self, routes: &RouteTable, pkt: &mut PacketBuf<'_>, now: Instant) -> TunVerdict {
        if pkt.is_empty() {
            return self.drop_tap(DropReason::EmptyPayload);
        }
        let Ok(frame) = EthernetFrame::new_checked(pkt.as_slice()) else { return self.drop_tap(DropReason::Truncated) };
        let (dst, src, ethertype) = (frame.dst(), frame.src(), frame.ethertype());
        if src != self.local_mac {
            return self.drop_tap(DropReason::TxForeignSource);
        }
        // The inner destination IP (unicast IP frames only), for the per-peer checks.
        let mut ip_dst = None;
        let mut dont_frag = false;
        match ethertype {
            ethernet::ETHERTYPE_IPV4 | ethernet::ETHERTYPE_IPV6 => {
                let (isrc, idst, total, df, ndp) = match IpPacket::new_checked(frame.payload()) {
                    // The peer drops a bad IPv4 header checksum: don't send it.
                    Ok(ip) if !ip.header_checksum_ok() => return self.drop_tap(DropReason::BadInnerChecksum),
                    Ok(ip) => (ip.src(), ip.dst(), ip.total_len(), ip.dont_frag(), is_ndp(&ip)),
                    Err(_) => return self.drop_tap(DropReason::BadIpHeader),
                };
                pkt.truncate(total.saturating_add(ethernet::HEADER_LEN));
                let link_local = matches!(isrc, IpAddr::V6(a) if a.is_unicast_link_local());
                if ndp && (link_local || self.local.owns(isrc)) {
                    // Neighbour discovery for a peer's gateway: flooded or sent below.
                } else if link_local || idst.is_multicast() || matches!(idst, IpAddr::V4(a) if a.is_broadcast()) {
                    return self.drop_tap(DropReason::Martian);
                } else if !self.local.owns(isrc) {
                    return self.drop_tap(DropReason::TxForeignSource);
                } else {
                    ip_dst = Some(idst);
                    dont_frag = df;
                }
            }
            ethernet::ETHERTYPE_ARP => match ArpPacket::new_checked(frame.payload()) {
                Ok(a) if self.local.owns(a.sender_ip().into()) => {}
                Ok(_) => return self.drop_tap(DropReason::TxForeignSource),
                Err(_) => return self.drop_tap(DropReason::BadEthertype),
            },
            _ => return self.drop_tap(DropReason::BadEthertype),
        }
        let hop = if dst.is_multicast() { None } else { self.peer_for(routes, dst, now) };
        let Some((peer, hop)) = hop else {
            if ip_dst.is_some_and(|d| self.local.owns(d)) {
                return self.drop_tap(DropReason::NoRoute);
            }
            if !self.flood_limit.take(now) {
                return self.drop_tap(DropReason::FloodLimited);
            }
            let len = pkt.len();
            if let Err(r) = self.push_vxlan(pkt) {
                return self.drop_tap(r);
            }
            for p in routes.peers() {
                p.counters.tx(self.worker, len);
            }
            return TunVerdict::Flood;
        };
        if let Some(d) = ip_dst {
            if !hop.owns(d) {
                return self.drop_tap(DropReason::NoRoute);
            }
            if pkt.len().saturating_sub(ethernet::HEADER_LEN) > usize::from(hop.mtu) {
                return self.too_big(pkt, hop, dont_frag, dst, now);
            }
        }
        let len = pkt.len();
        let flow = flow_hash_l2(pkt.as_slice());
        if let Err(r) = self.push_vxlan(pkt) {
            return self.drop_tap(r);
        }
        hop.counters.tx(self.worker, len);
        TunVerdict::Send { to: hop.endpoint, peer, flow }
    }

    /// A unicast IP frame larger than the path to `hop`: frag-needed or packet-too-big back
    /// into the TAP, from the MAC the kernel was sending to, when DF allows.
    fn too_big(
        &mut self,
        pkt: &mut PacketBuf<'_>,
        hop: &NextHop,
        df: bool,
        peer_mac: MacAddr,
        now: Instant,
    ) -> TunVerdict {
        self.stats.count_drop(DropReason::Oversize);
        if !df || !pkt.strip(ethernet::HEADER_LEN) {
            return TunVerdict::Drop(DropReason::Oversize);
        }
        let kind = IcmpKind::TooBig { mtu: hop.mtu };
        if !write_icmp_error(pkt, kind, &self.local, &mut self.icmp_limit, &self.stats, now) {
            return TunVerdict::Drop(DropReason::Oversize);
        }
        let ethertype = match pkt.as_slice().first().map(|b| b >> 4) {
            Some(6) => ethernet::ETHERTYPE_IPV6,
            _ => ethernet::ETHERTYPE_IPV4,
        };
        match pkt.prepend(ethernet::HEADER_LEN) {
            Some(h) => {
                EthernetFrame::new_unchecked(h).emit_header(self.local_mac, peer_mac, ethertype);
                TunVerdict::Reply
            }
            None => TunVerdict::Drop(DropReason::Oversize),
        }
    }

    /// A VXLAN datagram from the underlay.
    pub fn from_underlay(
        &mut self,
        routes: &RouteTable,
        src: SocketAddr,
        pkt: &mut PacketBuf<'_>,
        now: Instant,
    ) -> UnderlayVerdict {
        if pkt.is_empty() {
            return self.drop_underlay(DropReason::EmptyPayload);
        }
        let Some((peer, hop)) = routes.peer_by_source(src) else {
            return self.drop_underlay(DropReason::UnknownSender);
        };
        if let Err(r) = check_header(pkt.as_slice(), self.vni) {
            return self.drop_underlay(r);
        }
        pkt.strip(vxlan::HEADER_LEN);
        let Ok(frame) = EthernetFrame::new_checked(pkt.as_slice()) else {
            return self.drop_underlay(DropReason::Truncated);
        };
        let (dst, fsrc, ethertype) = (frame.dst(), frame.src(), frame.ethertype());
        let src_ok = match hop.mac {
            Some(m) => fsrc == m,
            None => fsrc.is_valid_source(),
        };
        if !src_ok || fsrc == self.local_mac {
            return self.drop_underlay(DropReason::WrongSourceMac);
        }
        if dst != self.local_mac && !dst.is_multicast() {
            return self.drop_underlay(DropReason::WrongInnerMac);
        }
        match ethertype {
            ethernet::ETHERTYPE_IPV4 | ethernet::ETHERTYPE_IPV6 => {
                let (isrc, idst, total, ndp) = match IpPacket::new_checked(frame.payload()) {
                    Ok(ip) if !ip.header_checksum_ok() => return self.drop_underlay(DropReason::BadInnerChecksum),
                    Ok(ip) => (ip.src(), ip.dst(), ip.total_len(), is_ndp(&ip)),
                    Err(_) => return self.drop_underlay(DropReason::BadIpHeader),
                };
                pkt.truncate(total.saturating_add(ethernet::HEADER_LEN));
                let link_local = matches!(isrc, IpAddr::V6(a) if a.is_unicast_link_local());
                if ndp && (link_local || hop.owns(isrc)) {
                    // Neighbour solicitation or advertisement: the kernel answers or learns.
                } else if !hop.owns(isrc) {
                    return self.drop_underlay(DropReason::ForeignSource);
                } else if dst.is_multicast() || self.local.is_martian_dst(idst) {
                    return self.drop_underlay(DropReason::Martian);
                } else if !self.local.owns(idst) {
                    return self.drop_underlay(DropReason::NotLocalDestination);
                }
            }
            ethernet::ETHERTYPE_ARP => match ArpPacket::new_checked(frame.payload()) {
                Ok(a) if !hop.owns(a.sender_ip().into()) => return self.drop_underlay(DropReason::ForeignSource),
                Ok(a) if !self.local.owns(a.target_ip().into()) => {
                    return self.drop_underlay(DropReason::NotLocalDestination);
                }
                Ok(_) => {}
                Err(_) => return self.drop_underlay(DropReason::BadEthertype),
            },
            _ => return self.drop_underlay(DropReason::BadEthertype),
        }
        self.macs.learn(fsrc, src, now);
        hop.counters.rx(self.worker, pkt.len());
        UnderlayVerdict::Deliver { from: peer, ip: None }
    }
}

/// Whether `ip` is an ICMPv6 neighbour solicitation or advertisement (hop limit 255, as RFC
/// 4861 requires). Router advertisements and redirects are not: they stay dropped, so no
/// peer can forge them across the overlay (CVE-2020-10749).
fn is_ndp<T: AsRef<[u8]>>(ip: &IpPacket<T>) -> bool {
    match ip {
        IpPacket::V6(p) => {
            p.next_header() == ipv6::NEXT_HEADER_ICMPV6
                && p.hop_limit() == 255
                && matches!(p.payload().first(), Some(135 | 136))
        }
        IpPacket::V4(_) => false,
    }
}

/// The flow hash of the IP packet inside an Ethernet frame (0 for non-IP frames).
fn flow_hash_l2(frame: &[u8]) -> u32 {
    let Some(ip) = frame.get(ethernet::HEADER_LEN..) else { return 0 };
    IpPacket::new_checked(ip).map_or(0, |p| crate::forwarder::flow_hash(&p.facts(), ip))
}

impl PacketCore for Bridge {
    fn from_tun(&mut self, routes: &RouteTable, pkt: &mut PacketBuf<'_>, now: Instant) -> TunVerdict {
        self.from_tap(routes, pkt, now)
    }

    fn from_underlay(
        &mut self,
        routes: &RouteTable,
        src: SocketAddr,
        pkt: &mut PacketBuf<'_>,
        now: Instant,
    ) -> UnderlayVerdict {
        Bridge::from_underlay(self, routes, src, pkt, now)
    }

    fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    /// The IP packet of a delivered frame (no VLAN tags: the bridge forwards none), parsed
    /// here: TAP runs without offloads, so this is the only place that wants its header.
    fn complete_partial(&self, delivered: &mut [u8], _ip: Option<&IpFacts>) -> bool {
        let is_ip = EthernetFrame::new_checked(&*delivered)
            .is_ok_and(|f| matches!(f.ethertype(), ethernet::ETHERTYPE_IPV4 | ethernet::ETHERTYPE_IPV6));
        let Some(ip) = delivered.get_mut(ethernet::HEADER_LEN..).filter(|_| is_ip) else { return false };
        let Ok(facts) = IpPacket::new_checked(&*ip).map(|p| p.facts()) else { return false };
        repair_counted(&self.stats, ip, &facts)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use crate::stats::PeerCounters;
    use crate::testing::{A_ENDPOINT, A_MAC, B_ENDPOINT, B_MAC, icmp_echo, local};

    const VNI: u32 = 1;

    fn hop(name: &str, third: u8, endpoint: &str, mac: MacAddr, mtu: u16) -> NextHop {
        NextHop {
            name: name.into(),
            endpoint: endpoint.parse().unwrap(),
            subnet_v4: local(third).subnet_v4,
            subnet_v6: local(third).subnet_v6,
            mac: Some(mac),
            mtu,
            counters: Arc::new(PeerCounters::new(1)),
            crypto: None,
        }
    }

    struct TapPair {
        a: Bridge,
        b: Bridge,
        ra: RouteTable,
        rb: RouteTable,
        now: Instant,
    }

    fn pair(mtu: u16) -> TapPair {
        let vni = Vni::new(VNI).unwrap();
        TapPair {
            a: Bridge::new(vni, A_MAC, local(1), 0, Arc::new(WorkerStats::default())),
            b: Bridge::new(vni, B_MAC, local(2), 0, Arc::new(WorkerStats::default())),
            ra: RouteTable::new(vec![hop("b", 2, B_ENDPOINT, B_MAC, mtu)], false).unwrap(),
            rb: RouteTable::new(vec![hop("a", 1, A_ENDPOINT, A_MAC, 1450)], false).unwrap(),
            now: Instant::now(),
        }
    }

    fn frame(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        EthernetFrame::new_unchecked(&mut f[..]).emit_header(dst, src, ethertype);
        f.extend_from_slice(payload);
        f
    }

    fn arp(op: u16, smac: MacAddr, sip: [u8; 4], tip: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0, 1, 8, 0, 6, 4];
        p.extend_from_slice(&op.to_be_bytes());
        p.extend_from_slice(&smac.0);
        p.extend_from_slice(&sip);
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(&tip);
        p
    }

    /// Runs `bytes` through `f` in a fresh slot; returns the verdict and the buffer after it.
    fn run<V>(bytes: &[u8], f: impl FnOnce(&mut PacketBuf<'_>) -> V) -> (V, Vec<u8>) {
        let mut slot = vec![0u8; crate::buf::HEADROOM + bytes.len() + 2048];
        slot[crate::buf::HEADROOM..crate::buf::HEADROOM + bytes.len()].copy_from_slice(bytes);
        let mut pkt = PacketBuf::new(&mut slot, crate::buf::HEADROOM, bytes.len()).unwrap();
        let v = f(&mut pkt);
        let out = pkt.as_slice().to_vec();
        (v, out)
    }

    /// A kernel VTEP's partial TCP checksum inside a frame (padded to Ethernet's minimum) is
    /// completed for the TAP, which takes no virtio-net header, and counted; ARP is left alone.
    #[test]
    fn a_partial_checksum_in_a_frame_is_completed() {
        use crate::stats::OffloadCounter;
        let t = pair(1450);
        let mut ip = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 244, 1, 1], [10, 244, 2, 1], 64)
            .tcp(1, 2, 3, 4)
            .ack(5)
            .write(&mut ip, &[])
            .unwrap();
        let good = frame(B_MAC, A_MAC, ethernet::ETHERTYPE_IPV4, &ip);
        crate::fuzzing::raw::make_l4_checksum_partial(&mut ip);
        let mut f = frame(B_MAC, A_MAC, ethernet::ETHERTYPE_IPV4, &ip);
        f.extend_from_slice(&[0; 6]); // padding to 60 bytes
        assert!(t.b.complete_partial(&mut f, None));
        assert_eq!(&f[..good.len()], &good[..]);
        assert!(!t.b.complete_partial(&mut f, None), "complete now");
        let mut a = frame(MacAddr::BROADCAST, A_MAC, ethernet::ETHERTYPE_ARP, &arp(1, A_MAC, [0; 4], [0; 4]));
        assert!(!t.b.complete_partial(&mut a, None));
        assert_eq!(t.b.stats().offload_count(OffloadCounter::CsumCompleted), 1);
    }

    #[test]
    fn arp_floods_then_unicast_goes_by_mac() {
        let mut t = pair(1450);
        let req =
            frame(MacAddr::BROADCAST, A_MAC, ethernet::ETHERTYPE_ARP, &arp(1, A_MAC, [10, 244, 1, 1], [10, 244, 2, 1]));
        let (v, wire) = run(&req, |p| t.a.from_tap(&t.ra, p, t.now));
        assert_eq!(v, TunVerdict::Flood);
        let (v, delivered) = run(&wire, |p| t.b.from_underlay(&t.rb, A_ENDPOINT.parse().unwrap(), p, t.now));
        assert!(matches!(v, UnderlayVerdict::Deliver { .. }), "{v:?}");
        assert_eq!(delivered, req);
        // B's kernel answers with a unicast to A's MAC: sent to A, delivered there.
        let reply = frame(A_MAC, B_MAC, ethernet::ETHERTYPE_ARP, &arp(2, B_MAC, [10, 244, 2, 1], [10, 244, 1, 1]));
        let (v, wire) = run(&reply, |p| t.b.from_tap(&t.rb, p, t.now));
        assert!(matches!(v, TunVerdict::Send { .. }), "{v:?}");
        let (v, _) = run(&wire, |p| t.a.from_underlay(&t.ra, B_ENDPOINT.parse().unwrap(), p, t.now));
        assert!(matches!(v, UnderlayVerdict::Deliver { .. }), "{v:?}");
        // Then IP unicast to B's MAC is sent to B, which delivers it unchanged.
        let ip = frame(B_MAC, A_MAC, ethernet::ETHERTYPE_IPV4, &icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 56));
        let (v, wire) = run(&ip, |p| t.a.from_tap(&t.ra, p, t.now));
        let TunVerdict::Send { to, .. } = v else { panic!("{v:?}") };
        assert_eq!(to, B_ENDPOINT.parse().unwrap());
        assert_eq!(wire[..8], [0x08, 0, 0, 0, 0, 0, 1, 0]);
        let (v, out) = run(&wire, |p| t.b.from_underlay(&t.rb, A_ENDPOINT.parse().unwrap(), p, t.now));
        assert!(matches!(v, UnderlayVerdict::Deliver { .. }));
        assert_eq!(out, ip);
    }

    #[test]
    fn unknown_unicast_floods_within_the_rate_limit() {
        let mut t = pair(1450);
        let stranger = MacAddr([2, 9, 9, 9, 9, 9]);
        let ip = frame(stranger, A_MAC, ethernet::ETHERTYPE_IPV4, &icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 8));
        let verdicts: Vec<_> = (0..FLOOD_RATE.1 + 10).map(|_| run(&ip, |p| t.a.from_tap(&t.ra, p, t.now)).0).collect();
        assert_eq!(verdicts.iter().filter(|v| **v == TunVerdict::Flood).count() as u64, FLOOD_RATE.1);
        assert_eq!(t.a.stats.drops(DropReason::FloodLimited), 10);
    }

    #[test]
    fn oversize_df_frame_gets_frag_needed_back_into_the_tap() {
        let mut t = pair(1200);
        let ip = frame(B_MAC, A_MAC, ethernet::ETHERTYPE_IPV4, &icmp_echo([10, 244, 1, 5], [10, 244, 2, 1], 1300));
        let (v, out) = run(&ip, |p| t.a.from_tap(&t.ra, p, t.now));
        assert_eq!(v, TunVerdict::Reply);
        let eth = EthernetFrame::new_checked(&out[..]).unwrap();
        assert_eq!((eth.dst(), eth.src()), (A_MAC, B_MAC));
        let h = etherparse::PacketHeaders::from_ethernet_slice(&out).unwrap();
        let Some(etherparse::TransportHeader::Icmpv4(icmp)) = h.transport else { panic!("not icmp") };
        assert_eq!(
            icmp.icmp_type,
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1200 }
            )
        );
    }

    #[test]
    fn decap_checks_every_frame() {
        let good_ip = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 8);
        let mut ra_dummy = pair(1450);
        let wire = |f: Vec<u8>| {
            let mut w = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
            w.extend_from_slice(&f);
            w
        };
        let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
            (
                "wrong source MAC",
                wire(frame(B_MAC, MacAddr([2, 1, 1, 1, 1, 1]), 0x0800, &good_ip)),
                DropReason::WrongSourceMac,
            ),
            (
                "unicast not to us",
                wire(frame(MacAddr([2, 1, 1, 1, 1, 1]), A_MAC, 0x0800, &good_ip)),
                DropReason::WrongInnerMac,
            ),
            (
                "third node's source",
                wire(frame(B_MAC, A_MAC, 0x0800, &icmp_echo([10, 244, 3, 1], [10, 244, 2, 1], 8))),
                DropReason::ForeignSource,
            ),
            (
                "ARP from a third node's address",
                wire(frame(MacAddr::BROADCAST, A_MAC, 0x0806, &arp(1, A_MAC, [10, 244, 3, 1], [10, 244, 2, 1]))),
                DropReason::ForeignSource,
            ),
            ("VLAN", wire(frame(B_MAC, A_MAC, 0x8100, &good_ip)), DropReason::BadEthertype),
            ("empty datagram", vec![], DropReason::EmptyPayload),
            (
                "bad inner header checksum",
                wire(frame(B_MAC, A_MAC, 0x0800, &{
                    let mut p = good_ip.clone();
                    p[11] ^= 0x80;
                    p
                })),
                DropReason::BadInnerChecksum,
            ),
            (
                "I flag clear",
                {
                    let mut w = wire(frame(B_MAC, A_MAC, 0x0800, &good_ip));
                    w[0] = 0;
                    w
                },
                DropReason::BadVxlanFlags,
            ),
        ];
        for (name, w, reason) in cases {
            let mut t = pair(1450);
            let (v, _) = run(&w, |p| t.b.from_underlay(&t.rb, A_ENDPOINT.parse().unwrap(), p, t.now));
            assert_eq!(v, UnderlayVerdict::Drop(reason), "{name}");
        }
        let (v, _) = run(&wire(frame(B_MAC, A_MAC, 0x0800, &good_ip)), |p| {
            ra_dummy.b.from_underlay(&ra_dummy.rb, "198.18.0.9:4000".parse().unwrap(), p, ra_dummy.now)
        });
        assert_eq!(v, UnderlayVerdict::Drop(DropReason::UnknownSender));
        let mut bad = frame(B_MAC, A_MAC, 0x0800, &good_ip);
        bad[14 + 1] = 0x10; // TOS changed, checksum not
        let (v, _) = run(&bad, |p| ra_dummy.a.from_tap(&ra_dummy.ra, p, ra_dummy.now));
        assert_eq!(v, TunVerdict::Drop(DropReason::BadInnerChecksum));
        let (v, _) = run(&[], |p| ra_dummy.a.from_tap(&ra_dummy.ra, p, ra_dummy.now));
        assert_eq!(v, TunVerdict::Drop(DropReason::EmptyPayload));
        assert_eq!(ra_dummy.a.stats.drops(DropReason::EmptyPayload), 1);
    }

    #[test]
    fn mac_table_learns_ages_and_evicts() {
        let t0 = Instant::now();
        let mut m = MacTable::new(Duration::from_secs(300));
        let ep: SocketAddr = "198.18.0.2:0".parse().unwrap();
        let mac = MacAddr([2, 0, 0, 0, 1, 1]);
        assert_eq!(m.lookup(mac, t0), None);
        m.learn(mac, ep, t0);
        assert_eq!(m.lookup(mac, t0 + Duration::from_secs(299)), Some(ep));
        assert_eq!(m.lookup(mac, t0 + Duration::from_secs(300)), None, "aged out");
        // Thousands of MACs never grow the table or panic; the latest ones are found.
        for i in 0..5000u32 {
            let b = i.to_be_bytes();
            m.learn(MacAddr([2, 0, b[0], b[1], b[2], b[3]]), ep, t0 + Duration::from_millis(u64::from(i)));
        }
        let last = 4999u32.to_be_bytes();
        assert_eq!(
            m.lookup(MacAddr([2, 0, last[0], last[1], last[2], last[3]]), t0 + Duration::from_secs(5)),
            Some(ep)
        );
    }
}
