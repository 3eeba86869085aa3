//! The per-packet decisions, pure: what to do with a packet read from the TUN, and with a
//! datagram read from the underlay. The driver does the I/O the verdict asks for.
//!
//! From the TUN (encapsulation side), in order:
//! 1. parse the inner header (`empty_payload`, `bad_ip_header`, `bad_inner_checksum`: the
//!    peer would drop it) and trim trailing padding;
//! 2. the source must be in our subnet (`tx_foreign_source`: a local pod spoofing);
//! 3. look the destination up; a miss is `no_route` and gets ICMP destination-unreachable
//!    written back into the TUN, as flannel does;
//! 4. larger than the path to the peer: DF (or IPv6) gets ICMP frag-needed / packet-too-big,
//!    otherwise `oversize`;
//! 5. TTL (flannel udp decrements on both sides), then encapsulate and send.
//!
//! From the underlay (decapsulation side), cheapest check first, so garbage from strangers
//! costs one hash probe:
//! 1. the datagram must carry something (`empty_payload`), and its outer source must be a
//!    known peer's endpoint (`unknown_sender`);
//! 2. the format's header (`truncated`, format-specific reasons);
//! 3. the inner packet must parse, lengths consistent (`bad_ip_header`), and an IPv4
//!    header's checksum verify (`bad_inner_checksum`: the kernel would drop it on the TUN
//!    write, uncounted); the merge path gets only packets that passed all of this;
//! 4. the inner source must be in the *sending* peer's subnet (`foreign_source`);
//! 5. the inner destination must be in *our* subnet (`not_local_destination`), never a
//!    martian; nothing is ever re-encapsulated;
//! 6. TTL, then deliver to the TUN.
//!
//! Nothing here allocates, locks, logs or reads a clock; `now` comes in for the ICMP limiter.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::buf::PacketBuf;
use crate::encap::{Decapsulated, Encap};
use crate::gso::Segmentation;
use crate::node::LocalNode;
use crate::ratelimit::IcmpLimiter;
use crate::route::{PeerId, RouteTable};
use crate::stats::{DropReason, IcmpCounter, OffloadCounter, WorkerStats};
use crate::wire::WireError;
use crate::wire::icmp::{self, IcmpKind};
use crate::wire::ip::{IpFacts, IpPacket};

/// What to do with a packet read from the TUN.
#[must_use]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum TunVerdict {
    /// Send the packet as one UDP datagram to the peer's underlay endpoint.
    Send {
        /// The peer's endpoint.
        to: SocketAddr,
        /// The peer, for accounting.
        peer: PeerId,
        /// A hash of the inner flow, for formats whose outer source port follows it
        /// ([`Encap::FLOW_SOURCE_PORT`]); 0 otherwise.
        flow: u32,
    },
    /// An ICMP error was written into the buffer; write it back into the TUN.
    Reply,
    /// TAP mode: a broadcast, multicast or unknown-unicast frame, encapsulated; send a copy
    /// to every peer (head-end replication).
    Flood,
    /// Drop the packet (already counted).
    Drop(DropReason),
}

/// What to do with a datagram read from the underlay.
#[must_use]
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum UnderlayVerdict {
    /// The buffer now holds the inner packet; write it into the TUN.
    Deliver {
        /// The sending peer.
        from: PeerId,
        /// The inner IP header as the core checked it, so the driver's coalescing and
        /// checksum repair need not parse it again; `None` for an Ethernet frame (TAP).
        ip: Option<IpFacts>,
    },
    /// The buffer now holds the answer to a neighbour request; send it back to `to`.
    Reply {
        /// The peer that asked.
        to: SocketAddr,
    },
    /// Drop the datagram (already counted).
    Drop(DropReason),
    /// The format took the datagram itself (a WireGuard handshake message or keepalive):
    /// nothing to write or send; release the buffer.
    Consumed,
}

/// What a worker drives: the per-packet decisions of one mode (TUN: [`Forwarder`], TAP:
/// [`Bridge`](crate::bridge::Bridge)). The drivers are generic over it, so each mode is
/// monomorphised and the hot path has no dynamic dispatch.
// `from_*` names the packet's direction (design convention 1), not a conversion.
#[allow(clippy::wrong_self_convention)]
pub trait PacketCore: Send {
    /// A packet or frame read from the TUN/TAP.
    fn from_tun(&mut self, routes: &RouteTable, pkt: &mut PacketBuf<'_>, now: Instant) -> TunVerdict;
    /// A datagram read from the underlay.
    fn from_underlay(
        &mut self,
        routes: &RouteTable,
        src: SocketAddr,
        pkt: &mut PacketBuf<'_>,
        now: Instant,
    ) -> UnderlayVerdict;
    /// A super-packet read from a TUN with offloads, to be cut as `seg` says: the same
    /// checks as [`from_tun`](Self::from_tun), the path MTU checked against the largest
    /// segment. On `Send` the buffer holds the encapsulation header followed by the whole
    /// super-packet, and the driver cuts it with [`Segmentation::write_segments`]. Cores
    /// that never run with offloads (TAP) keep the default, which drops.
    fn from_tun_segmented(
        &mut self,
        routes: &RouteTable,
        pkt: &mut PacketBuf<'_>,
        seg: &Segmentation,
        now: Instant,
    ) -> TunVerdict {
        let _ = (routes, pkt, seg, now);
        self.stats().count_drop(DropReason::BadOffload);
        TunVerdict::Drop(DropReason::BadOffload)
    }
    /// The counters this core writes (the driver adds I/O failures).
    fn stats(&self) -> &Arc<WorkerStats>;

    /// Bytes of room the driver leaves behind every segment it cuts from a
    /// [`from_tun_segmented`](Self::from_tun_segmented) super-packet, for
    /// [`seal_train`](Self::seal_train) to fill (an authentication tag).
    fn segment_trailer(&self) -> usize {
        0
    }

    /// Finishes a train the driver cut from the last `Send` of `from_tun_segmented`: `train`
    /// holds its segments, `stride` bytes each. `false`: drop the train (counted here).
    fn seal_train(&mut self, train: &mut [u8], stride: usize) -> bool {
        let _ = (train, stride);
        true
    }

    /// Completes a partial TCP/UDP checksum (a kernel VTEP's, [`crate::partial`]) in a
    /// packet `from_underlay` delivered, counting it: what a driver does before writing to a
    /// TUN without a virtio-net header, which has no way to hand a packet over as partial.
    /// (With one, the merge path hands it over as partial instead, at no cost.)
    /// `ip` is what the verdict said of the delivered packet.
    fn complete_partial(&self, delivered: &mut [u8], ip: Option<&IpFacts>) -> bool {
        ip.is_some_and(|f| repair_counted(self.stats(), delivered, f))
    }
}

/// [`crate::partial::repair`] on the IP packet `ip` (its header `f`), counted as
/// `csum_completed` when it did repair: what every core's [`PacketCore::complete_partial`]
/// comes down to.
pub(crate) fn repair_counted(stats: &WorkerStats, ip: &mut [u8], f: &IpFacts) -> bool {
    let done = crate::partial::repair(ip, f);
    if done {
        stats.count_offload(OffloadCounter::CsumCompleted, 1);
    }
    done
}

impl<E: Encap + Send> PacketCore for Forwarder<E> {
    #[inline]
    fn from_tun(&mut self, routes: &RouteTable, pkt: &mut PacketBuf<'_>, now: Instant) -> TunVerdict {
        Forwarder::from_tun(self, routes, pkt, now)
    }

    #[inline]
    fn from_tun_segmented(
        &mut self,
        routes: &RouteTable,
        pkt: &mut PacketBuf<'_>,
        seg: &Segmentation,
        now: Instant,
    ) -> TunVerdict {
        self.encapsulate(routes, pkt, Some(seg), now)
    }

    #[inline]
    fn from_underlay(
        &mut self,
        routes: &RouteTable,
        src: SocketAddr,
        pkt: &mut PacketBuf<'_>,
        _now: Instant,
    ) -> UnderlayVerdict {
        Forwarder::from_underlay(self, routes, src, pkt)
    }

    fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    #[inline]
    fn segment_trailer(&self) -> usize {
        E::TRAILER_LEN
    }

    #[inline]
    fn seal_train(&mut self, train: &mut [u8], stride: usize) -> bool {
        match self.encap.seal_segments(train, stride) {
            Ok(()) => true,
            Err(reason) => {
                self.stats.count_drop(reason);
                false
            }
        }
    }
}

/// The data-plane core of one worker.
#[derive(Debug)]
pub struct Forwarder<E: Encap> {
    encap: E,
    local: LocalNode,
    worker: usize,
    stats: Arc<WorkerStats>,
    icmp_limit: IcmpLimiter,
}

impl<E: Encap> Forwarder<E> {
    /// A forwarder for worker number `worker`, counting into `stats`.
    pub fn new(encap: E, local: LocalNode, worker: usize, stats: Arc<WorkerStats>) -> Self {
        Self { encap, local, worker, stats, icmp_limit: IcmpLimiter::default() }
    }

    /// The counters this forwarder writes.
    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    #[inline]
    fn drop_tun(&self, reason: DropReason) -> TunVerdict {
        self.stats.count_drop(reason);
        TunVerdict::Drop(reason)
    }

    #[inline]
    fn drop_underlay(&self, reason: DropReason) -> UnderlayVerdict {
        self.stats.count_drop(reason);
        UnderlayVerdict::Drop(reason)
    }

    /// Decides the fate of a packet read from the TUN; see the module doc for the order.
    pub fn from_tun(&mut self, routes: &RouteTable, pkt: &mut PacketBuf<'_>, now: Instant) -> TunVerdict {
        self.encapsulate(routes, pkt, None, now)
    }

    /// [`from_tun`](Self::from_tun) for a packet or, with `seg`, a super-packet that the
    /// driver will cut into segments after encapsulation.
    fn encapsulate(
        &mut self,
        routes: &RouteTable,
        pkt: &mut PacketBuf<'_>,
        seg: Option<&Segmentation>,
        now: Instant,
    ) -> TunVerdict {
        if pkt.is_empty() {
            return self.drop_tun(DropReason::EmptyPayload);
        }
        // A super-packet's header was parsed by `Segmentation::parse`; a single packet's is
        // parsed here, once, and everything below reads the facts.
        let ip = match seg {
            Some(s) => *s.ip(),
            None => match IpPacket::new_checked(pkt.as_slice()) {
                // The peer drops a bad IPv4 header checksum: don't spend the underlay on it. A
                // super-packet's segments get headers of their own, so only single packets count.
                Ok(p) if !p.header_checksum_ok() => return self.drop_tun(DropReason::BadInnerChecksum),
                Ok(p) => p.facts(),
                Err(_) => return self.drop_tun(DropReason::BadIpHeader),
            },
        };
        let IpFacts { src, dst, total_len, dont_frag, .. } = ip;
        pkt.truncate(total_len);
        if is_link_local_chatter(src, dst) {
            return self.drop_tun(DropReason::Martian);
        }
        if !self.local.owns(src) {
            return self.drop_tun(DropReason::TxForeignSource);
        }
        let Some((peer, hop)) = routes.lookup(dst) else {
            let kind = if self.local.owns(dst) { IcmpKind::HostUnreachable } else { IcmpKind::NetUnreachable };
            return self.reply_or_drop(pkt, kind, DropReason::NoRoute, now);
        };
        // A peer's subnet broadcast address is a martian there (it drops it): don't send it.
        if let (IpAddr::V4(d), Some(n)) = (dst, hop.subnet_v4) {
            if n.prefix_len() < 31 && d == n.broadcast() {
                return self.drop_tun(DropReason::Martian);
            }
        }
        let largest = seg.map_or(pkt.len(), Segmentation::segment_len);
        if largest > usize::from(hop.mtu) {
            if dont_frag {
                return self.reply_or_drop(pkt, IcmpKind::TooBig { mtu: hop.mtu }, DropReason::Oversize, now);
            }
            return self.drop_tun(DropReason::Oversize);
        }
        if E::DECREMENTS_TTL && ip.decrement_ttl(pkt.as_mut_slice()) == 0 {
            return self.drop_tun(DropReason::TtlExpired);
        }
        let inner_len = pkt.len();
        let flow = if E::FLOW_SOURCE_PORT { flow_hash(&ip, pkt.as_slice()) } else { 0 };
        let encapsulated = match seg {
            Some(_) => self.encap.encap_segmented(pkt, hop),
            None => self.encap.encap(pkt, hop),
        };
        if let Err(reason) = encapsulated {
            return self.drop_tun(reason);
        }
        match seg {
            Some(s) => hop.counters.tx_many(self.worker, s.segments(), s.wire_bytes()),
            None => hop.counters.tx(self.worker, inner_len),
        }
        TunVerdict::Send { to: hop.endpoint, peer, flow }
    }

    /// Decides the fate of a datagram read from the underlay; see the module doc.
    pub fn from_underlay(&mut self, routes: &RouteTable, src: SocketAddr, pkt: &mut PacketBuf<'_>) -> UnderlayVerdict {
        if pkt.is_empty() {
            return self.drop_underlay(DropReason::EmptyPayload);
        }
        let Some((peer, hop)) = routes.peer_by_source(src) else {
            return self.drop_underlay(DropReason::UnknownSender);
        };
        match self.encap.decap(pkt, hop) {
            Ok(Decapsulated::Ip) => {}
            Ok(Decapsulated::Consumed) => return UnderlayVerdict::Consumed,
            Ok(Decapsulated::NeighbourRequest) => {
                return match self.encap.answer(pkt, hop, &self.local) {
                    Ok(()) => {
                        self.stats.count_icmp(IcmpCounter::NeighbourReply);
                        UnderlayVerdict::Reply { to: hop.endpoint }
                    }
                    Err(reason) => self.drop_underlay(reason),
                };
            }
            Err(reason) => return self.drop_underlay(reason),
        }
        let ip = match IpPacket::new_checked(pkt.as_slice()) {
            Ok(p) if !p.header_checksum_ok() => return self.drop_underlay(DropReason::BadInnerChecksum),
            Ok(p) => p.facts(),
            Err(WireError::Truncated) => return self.drop_underlay(DropReason::Truncated),
            Err(WireError::Malformed) => return self.drop_underlay(DropReason::BadIpHeader),
        };
        pkt.truncate(ip.total_len);
        if !hop.owns(ip.src) {
            return self.drop_underlay(DropReason::ForeignSource);
        }
        if self.local.is_martian_dst(ip.dst) {
            return self.drop_underlay(DropReason::Martian);
        }
        if !self.local.owns(ip.dst) {
            return self.drop_underlay(DropReason::NotLocalDestination);
        }
        if E::DECREMENTS_TTL && ip.decrement_ttl(pkt.as_mut_slice()) == 0 {
            return self.drop_underlay(DropReason::TtlExpired);
        }
        hop.counters.rx(self.worker, pkt.len());
        UnderlayVerdict::Deliver { from: peer, ip: Some(ip) }
    }

    /// Counts `reason` and, where RFC 1812 and the rate limit allow, turns the packet into
    /// the ICMP error `kind` addressed back to its sender.
    fn reply_or_drop(
        &mut self,
        pkt: &mut PacketBuf<'_>,
        kind: IcmpKind,
        reason: DropReason,
        now: Instant,
    ) -> TunVerdict {
        self.stats.count_drop(reason);
        if write_icmp_error(pkt, kind, &self.local, &mut self.icmp_limit, &self.stats, now) {
            TunVerdict::Reply
        } else {
            TunVerdict::Drop(reason)
        }
    }
}

/// Turns the IP packet in `pkt` into the ICMP error `kind` back to its sender, where RFC 1812
/// and the rate limit allow; counts what it writes. `false` leaves the packet to be dropped.
pub(crate) fn write_icmp_error(
    pkt: &mut PacketBuf<'_>,
    kind: IcmpKind,
    local: &LocalNode,
    limit: &mut IcmpLimiter,
    stats: &WorkerStats,
    now: Instant,
) -> bool {
    let Ok(ip) = IpPacket::new_checked(pkt.as_slice()) else { return false };
    let (to, from) = (ip.src(), ip.dst());
    let allowed = match &ip {
        IpPacket::V4(p) => icmp::may_answer_v4(p),
        IpPacket::V6(p) => icmp::may_answer_v6(p),
    };
    if !allowed {
        return false;
    }
    if !limit.allow(to, now) {
        stats.count_icmp(IcmpCounter::RateLimited);
        return false;
    }
    let written = match (to, from) {
        (IpAddr::V4(to), IpAddr::V4(from)) => {
            let Some(gw) = local.gateway_v4() else { return false };
            // Linux ignores an error whose source is its own destination address, so a
            // packet the host sent from the gateway is answered from where it was going.
            let src = if to == gw { from } else { gw };
            let quote = pkt.len().min(icmp::V4_ERROR_MAX - icmp::V4_ERROR_OVERHEAD);
            pkt.truncate(quote);
            pkt.prepend(icmp::V4_ERROR_OVERHEAD).is_some() && {
                icmp::emit_v4_error(pkt.as_mut_slice(), src, to, kind);
                true
            }
        }
        (IpAddr::V6(to), IpAddr::V6(from)) => {
            let Some(gw) = local.gateway_v6() else { return false };
            let src = if to == gw { from } else { gw };
            let quote = pkt.len().min(icmp::V6_ERROR_MAX - icmp::V6_ERROR_OVERHEAD);
            pkt.truncate(quote);
            pkt.prepend(icmp::V6_ERROR_OVERHEAD).is_some() && {
                icmp::emit_v6_error(pkt.as_mut_slice(), src, to, kind);
                true
            }
        }
        _ => false,
    };
    if written {
        stats.count_icmp(match (kind, to) {
            (IcmpKind::TooBig { .. }, IpAddr::V4(_)) => IcmpCounter::FragNeeded,
            (IcmpKind::TooBig { .. }, IpAddr::V6(_)) => IcmpCounter::PacketTooBig,
            _ => IcmpCounter::Unreachable,
        });
    }
    written
}

/// A cheap hash of the inner flow (addresses, protocol, ports of an unfragmented TCP/UDP
/// packet `p`, whose header `f` describes), so one flow keeps one outer source port and
/// different flows spread.
#[inline]
pub(crate) fn flow_hash(f: &IpFacts, p: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut mix = |b: &[u8]| b.iter().for_each(|b| h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193));
    for a in [f.src, f.dst] {
        match a {
            IpAddr::V4(a) => mix(&a.octets()),
            IpAddr::V6(a) => mix(&a.octets()),
        }
    }
    mix(&[f.protocol]);
    if matches!(f.protocol, 6 | 17) && !f.fragment {
        mix(crate::wire::bytes::<4>(p, f.header_len).map_or(&[][..], |a| a.as_slice()));
    }
    h
}

/// Traffic the kernel sends on every link by itself (IPv6 router solicitations and MLD from
/// a link-local address, multicast): never for a peer, and not a spoofing pod either.
fn is_link_local_chatter(src: IpAddr, dst: IpAddr) -> bool {
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => d.is_multicast() || s.is_unspecified() || s.is_unicast_link_local(),
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            d.is_multicast() || d.is_broadcast() || s.is_unspecified() || s.is_link_local()
        }
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use crate::encap::UdpEncap;
    use crate::testing::{Pair, icmp_echo, icmp_echo_v6};
    use crate::wire::ipv4::Ipv4Packet;
    use std::net::Ipv4Addr;

    #[test]
    fn ping_between_two_nodes() {
        let mut net = Pair::new();
        let out = net.a_to_b(&icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 56));
        let delivered = out.expect("delivered");
        let p = Ipv4Packet::new_checked(&delivered[..]).unwrap();
        assert_eq!(p.ttl(), 62, "flannel udp decrements on both sides");
        assert!(p.verify_checksum());
        assert_eq!(net.drops_total(), 0);
        let t = net.routes_a.peers()[0].counters.totals();
        assert_eq!((t.tx_packets, t.tx_bytes), (1, 84));
    }

    #[test]
    fn ipv6_ping_between_two_nodes() {
        let mut net = Pair::new();
        let out = net.a_to_b(&icmp_echo_v6("fd00:1::1", "fd00:2::1", 56));
        assert!(out.is_some());
    }

    #[test]
    fn unknown_destination_gets_net_unreachable_from_gateway() {
        let mut net = Pair::new();
        let mut slot = net.slot(&icmp_echo([10, 244, 1, 5], [10, 244, 77, 1], 56));
        let mut pkt = PacketBuf::new(&mut slot.0, slot.1, slot.2).unwrap();
        assert_eq!(net.a.from_tun(&net.routes_a, &mut pkt, net.now), TunVerdict::Reply);
        let ip = Ipv4Packet::new_checked(pkt.as_slice()).unwrap();
        assert_eq!(ip.src(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(ip.dst(), Ipv4Addr::new(10, 244, 1, 5));
        assert_eq!(ip.payload()[..2], [3, 0]);
        assert_eq!(net.a.stats().drops(DropReason::NoRoute), 1);
        assert_eq!(net.a.stats().icmp_count(IcmpCounter::Unreachable), 1);
    }

    #[test]
    fn oversize_df_gets_frag_needed_with_peer_mtu_and_non_df_is_dropped() {
        let mut net = Pair::with_peer_mtu(1200);
        let mut big = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 1300);
        let mut slot = net.slot(&big);
        let mut pkt = PacketBuf::new(&mut slot.0, slot.1, slot.2).unwrap();
        assert_eq!(net.a.from_tun(&net.routes_a, &mut pkt, net.now), TunVerdict::Reply);
        let ip = Ipv4Packet::new_checked(pkt.as_slice()).unwrap();
        // From the host's own gateway address, so answered from the destination instead.
        assert_eq!(ip.src(), Ipv4Addr::new(10, 244, 2, 1));
        assert_eq!(ip.payload()[..2], [3, 4]);
        assert_eq!(ip.payload()[6..8], 1200u16.to_be_bytes());
        assert_eq!(net.a.stats().icmp_count(IcmpCounter::FragNeeded), 1);

        big[6] &= !0x40; // clear DF
        let c = crate::wire::checksum::checksum(&{
            let mut h = big[..20].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        big[10..12].copy_from_slice(&c.to_be_bytes());
        let mut slot = net.slot(&big);
        let mut pkt = PacketBuf::new(&mut slot.0, slot.1, slot.2).unwrap();
        assert_eq!(net.a.from_tun(&net.routes_a, &mut pkt, net.now), TunVerdict::Drop(DropReason::Oversize));
    }

    #[test]
    fn ipv6_oversize_gets_packet_too_big() {
        let mut net = Pair::with_peer_mtu(1280);
        let mut slot = net.slot(&icmp_echo_v6("fd00:1::5", "fd00:2::1", 1400));
        let mut pkt = PacketBuf::new(&mut slot.0, slot.1, slot.2).unwrap();
        assert_eq!(net.a.from_tun(&net.routes_a, &mut pkt, net.now), TunVerdict::Reply);
        assert_eq!(pkt.len(), icmp::V6_ERROR_MAX);
        assert_eq!(net.a.stats().icmp_count(IcmpCounter::PacketTooBig), 1);
    }

    #[test]
    fn spoofed_local_source_is_not_sent() {
        let mut net = Pair::new();
        let mut slot = net.slot(&icmp_echo([10, 244, 3, 5], [10, 244, 2, 1], 56));
        let mut pkt = PacketBuf::new(&mut slot.0, slot.1, slot.2).unwrap();
        assert_eq!(net.a.from_tun(&net.routes_a, &mut pkt, net.now), TunVerdict::Drop(DropReason::TxForeignSource));
    }

    #[test]
    fn link_local_chatter_is_martian_not_spoofing() {
        let mut net = Pair::new();
        let mut slot = net.slot(&icmp_echo_v6("fe80::1", "ff02::2", 8));
        let mut pkt = PacketBuf::new(&mut slot.0, slot.1, slot.2).unwrap();
        assert_eq!(net.a.from_tun(&net.routes_a, &mut pkt, net.now), TunVerdict::Drop(DropReason::Martian));
    }

    #[test]
    fn ttl_one_expires_on_send() {
        let mut net = Pair::new();
        let mut p = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 8);
        p[8] = 1;
        let c = crate::wire::checksum::checksum(&{
            let mut h = p[..20].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let mut slot = net.slot(&p);
        let mut pkt = PacketBuf::new(&mut slot.0, slot.1, slot.2).unwrap();
        assert_eq!(net.a.from_tun(&net.routes_a, &mut pkt, net.now), TunVerdict::Drop(DropReason::TtlExpired));
    }

    /// Every decapsulation check, table-driven: (case, outer source, inner packet, reason).
    #[test]
    fn decap_checks_drop_and_count_each_reason() {
        let peer = "198.18.0.1:8285";
        let cases: Vec<(&str, &str, Vec<u8>, DropReason)> = vec![
            ("stranger", "198.18.0.9:8285", icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 8), DropReason::UnknownSender),
            (
                "peer, wrong port",
                "198.18.0.1:9999",
                icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 8),
                DropReason::UnknownSender,
            ),
            ("short", peer, vec![0x45; 12], DropReason::Truncated),
            ("empty", peer, vec![], DropReason::EmptyPayload),
            ("empty, from a stranger", "198.18.0.9:8285", vec![], DropReason::EmptyPayload),
            ("not ip", peer, vec![0x00; 40], DropReason::BadIpHeader),
            (
                "bad inner header checksum",
                peer,
                {
                    let mut p = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 8);
                    p[10] ^= 0x01;
                    p
                },
                DropReason::BadInnerChecksum,
            ),
            (
                "inner checksum wrong over the options",
                peer,
                {
                    // IHL 6: the checksum covers the 4 option bytes too.
                    let mut p = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 8);
                    p.splice(20..20, [1, 1, 1, 0]);
                    p[0] = 0x46;
                    let len = p.len() as u16;
                    p[2..4].copy_from_slice(&len.to_be_bytes());
                    p[10..12].copy_from_slice(&[0, 0]);
                    let c = crate::wire::checksum::checksum(&p[..24]);
                    p[10..12].copy_from_slice(&c.to_be_bytes());
                    p[22] = 2; // an option byte changed after the checksum
                    p
                },
                DropReason::BadInnerChecksum,
            ),
            (
                "length lies",
                peer,
                {
                    let mut p = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 8);
                    p[3] += 1;
                    p
                },
                DropReason::Truncated,
            ),
            ("third node's source", peer, icmp_echo([10, 244, 3, 1], [10, 244, 2, 1], 8), DropReason::ForeignSource),
            ("our own source", peer, icmp_echo([10, 244, 2, 7], [10, 244, 2, 1], 8), DropReason::ForeignSource),
            (
                "loop to a third node",
                peer,
                icmp_echo([10, 244, 1, 1], [10, 244, 3, 1], 8),
                DropReason::NotLocalDestination,
            ),
            ("to loopback", peer, icmp_echo([10, 244, 1, 1], [127, 0, 0, 1], 8), DropReason::Martian),
            ("to subnet broadcast", peer, icmp_echo([10, 244, 1, 1], [10, 244, 2, 255], 8), DropReason::Martian),
            ("to multicast", peer, icmp_echo([10, 244, 1, 1], [224, 0, 0, 1], 8), DropReason::Martian),
        ];
        for (name, src, payload, reason) in cases {
            let mut net = Pair::new();
            let mut slot = net.slot(&payload);
            let mut pkt = PacketBuf::new(&mut slot.0, slot.1, slot.2).unwrap();
            let v = net.b.from_underlay(&net.routes_b, src.parse().unwrap(), &mut pkt);
            assert_eq!(v, UnderlayVerdict::Drop(reason), "{name}");
            assert_eq!(net.b.stats().drops(reason), 1, "{name}");
        }
    }

    /// A fuzzer find: A sent a packet whose IPv4 header checksum was wrong, which B then
    /// dropped as `bad_inner_checksum`. A drops it first, counted, and sends nothing.
    #[test]
    fn bad_header_checksum_from_the_tun_is_not_sent() {
        let mut net = Pair::new();
        let mut p = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 56);
        p[1] = 0x10; // TOS changed, checksum not
        let mut slot = net.slot(&p);
        let mut pkt = PacketBuf::new(&mut slot.0, slot.1, slot.2).unwrap();
        let v = net.a.from_tun(&net.routes_a, &mut pkt, net.now);
        assert_eq!(v, TunVerdict::Drop(DropReason::BadInnerChecksum));
        assert_eq!(net.a.stats().drops(DropReason::BadInnerChecksum), 1);
    }

    /// flannel#1279: a kernel VTEP with checksum offload sends TCP with a partial checksum.
    /// It passes every check (they read headers only), and the driver's completion before a
    /// plain TUN write makes it what the sender's stack meant, counted.
    #[test]
    fn a_partial_checksum_is_delivered_and_completed() {
        use crate::stats::OffloadCounter;
        let mut net = Pair::vxlan();
        let mut good = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 244, 1, 1], [10, 244, 2, 1], 64)
            .tcp(40000, 5201, 1, 4096)
            .ack(1)
            .write(&mut good, &[0x5a; 1000])
            .unwrap();
        let mut partial = good.clone();
        crate::fuzzing::raw::make_l4_checksum_partial(&mut partial);
        assert!(!crate::fuzzing::raw::l4_checksum_ok(&partial));
        let wire = net.a_encap(&partial).unwrap();
        let mut delivered = net.b_receives(&wire).unwrap();
        let f = IpPacket::new_checked(&delivered[..]).unwrap().facts();
        assert!(!PacketCore::complete_partial(&net.b, &mut delivered, None), "no facts, no repair");
        assert!(PacketCore::complete_partial(&net.b, &mut delivered, Some(&f)));
        assert_eq!(delivered, good);
        assert!(!PacketCore::complete_partial(&net.b, &mut delivered, Some(&f)), "a complete checksum is left alone");
        assert_eq!(net.b.stats().offload_count(OffloadCounter::CsumCompleted), 1);
        assert_eq!(net.drops_total(), 0);
    }

    #[test]
    fn empty_tun_read_is_counted() {
        let mut net = Pair::new();
        let mut slot = net.slot(&[]);
        let mut pkt = PacketBuf::new(&mut slot.0, slot.1, slot.2).unwrap();
        assert_eq!(net.a.from_tun(&net.routes_a, &mut pkt, net.now), TunVerdict::Drop(DropReason::EmptyPayload));
        assert_eq!(net.a.stats().drops(DropReason::EmptyPayload), 1);
    }

    #[test]
    fn trailing_padding_is_trimmed() {
        let mut net = Pair::new();
        let mut p = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 8);
        let len = p.len();
        p.extend_from_slice(&[0xee; 10]);
        let mut slot = net.slot(&p);
        let mut pkt = PacketBuf::new(&mut slot.0, slot.1, slot.2).unwrap();
        let v = net.b.from_underlay(&net.routes_b, "198.18.0.1:8285".parse().unwrap(), &mut pkt);
        assert!(matches!(v, UnderlayVerdict::Deliver { .. }));
        assert_eq!(pkt.len(), len);
    }

    #[test]
    fn forwarder_is_generic_over_the_format() {
        fn assert_encap<E: Encap>() {}
        assert_encap::<UdpEncap>();
    }
}
