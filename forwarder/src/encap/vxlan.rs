//! VXLAN (RFC 7348) in TUN mode, byte-compatible with Linux's vxlan driver and flannel's
//! `vxlan` backend: an 8-byte header (I flag, 24-bit VNI, reserved zero) and an inner
//! Ethernet frame whose destination is the peer's VTEP MAC and whose source is ours.
//!
//! A TUN carries IP packets, so weft writes the Ethernet header itself on the way out and
//! strips it on the way in, after checking it: destination must be our VTEP MAC, source the
//! sending peer's (the analogue of Linux's permanent FDB entries, which are never migrated),
//! EtherType IPv4 or IPv6 (a VLAN tag is dropped, RFC 7348 §6.1). ARP requests and IPv6
//! neighbour solicitations for addresses in our subnet are answered, so a kernel VTEP without
//! permanent neighbour entries still resolves us.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::{Decapsulated, Encap, EncapKind};
use crate::buf::PacketBuf;
use crate::node::LocalNode;
use crate::route::NextHop;
use crate::stats::DropReason;
use crate::wire::arp::{self, ArpPacket};
use crate::wire::ethernet::{self, EthernetFrame, MacAddr};
use crate::wire::ndp;
use crate::wire::vxlan::{self, Vni, VxlanError, VxlanHeader};

/// flannel's and Linux's default VXLAN port (the kernel's pre-IANA default; IANA's is 4789).
pub const DEFAULT_PORT: u16 = 8472;

/// Shortest Ethernet frame on the wire without FCS; replies are padded to it.
const MIN_FRAME: usize = 60;

/// Checks a VXLAN header as Linux does (I flag, reserved bits zero) and that it carries `vni`.
///
/// # Errors
/// The drop reason naming the problem.
#[inline]
pub(crate) fn check_header(payload: &[u8], vni: Vni) -> Result<(), DropReason> {
    match VxlanHeader::new_checked(payload) {
        Ok(h) if h.vni() == vni => Ok(()),
        Ok(_) => Err(DropReason::WrongVni),
        Err(VxlanError::Truncated) => Err(DropReason::Truncated),
        Err(VxlanError::BadFlags) => Err(DropReason::BadVxlanFlags),
        Err(VxlanError::ReservedBits) => Err(DropReason::ReservedBitsSet),
    }
}

/// The VXLAN codec for one VNI and one local VTEP MAC.
#[derive(Clone, Copy, Debug)]
pub struct VxlanEncap {
    vni: Vni,
    local_mac: MacAddr,
}

impl VxlanEncap {
    /// A codec for `vni`, sending from `local_mac`.
    pub const fn new(vni: Vni, local_mac: MacAddr) -> Self {
        Self { vni, local_mac }
    }

    /// Our VTEP MAC.
    pub const fn local_mac(&self) -> MacAddr {
        self.local_mac
    }

    /// Prepends the VXLAN header to the Ethernet frame in `pkt`.
    fn push_vxlan(&self, pkt: &mut PacketBuf<'_>) -> Result<(), DropReason> {
        let h = pkt.prepend(vxlan::HEADER_LEN).ok_or(DropReason::Oversize)?;
        VxlanHeader::new_unchecked(h).emit(self.vni);
        Ok(())
    }

    /// Rewrites the Ethernet header of the frame in `pkt` to go back to whoever sent it.
    fn turn_around(&self, pkt: &mut PacketBuf<'_>, ethertype: u16, frame_len: usize) -> Result<(), DropReason> {
        let requester = EthernetFrame::new_checked(pkt.as_slice()).map_err(|_| DropReason::Truncated)?.src();
        if !pkt.set_len(frame_len.max(MIN_FRAME)) {
            return Err(DropReason::Oversize);
        }
        if let Some(pad) = pkt.as_mut_slice().get_mut(frame_len..) {
            pad.fill(0);
        }
        EthernetFrame::new_unchecked(pkt.as_mut_slice()).emit_header(requester, self.local_mac, ethertype);
        self.push_vxlan(pkt)
    }
}

impl Encap for VxlanEncap {
    const KIND: EncapKind = EncapKind::Vxlan;
    const HEADER_LEN: usize = vxlan::HEADER_LEN + ethernet::HEADER_LEN;
    const SOURCE_PORT_MATTERS: bool = false;
    const DECREMENTS_TTL: bool = false;
    const FLOW_SOURCE_PORT: bool = true;

    #[inline]
    fn encap(&self, pkt: &mut PacketBuf<'_>, hop: &NextHop) -> Result<(), DropReason> {
        let ethertype = match pkt.as_slice().first().map(|b| b >> 4) {
            Some(4) => ethernet::ETHERTYPE_IPV4,
            Some(6) => ethernet::ETHERTYPE_IPV6,
            _ => return Err(DropReason::BadIpHeader),
        };
        let dst = hop.mac.ok_or(DropReason::NoRoute)?;
        let h = pkt.prepend(Self::HEADER_LEN).ok_or(DropReason::Oversize)?;
        let (vx, eth) = h.split_at_mut(vxlan::HEADER_LEN);
        VxlanHeader::new_unchecked(vx).emit(self.vni);
        EthernetFrame::new_unchecked(eth).emit_header(dst, self.local_mac, ethertype);
        Ok(())
    }

    #[inline]
    fn decap(&self, pkt: &mut PacketBuf<'_>, peer: &NextHop) -> Result<Decapsulated, DropReason> {
        check_header(pkt.as_slice(), self.vni)?;
        pkt.strip(vxlan::HEADER_LEN);
        let frame = EthernetFrame::new_checked(pkt.as_slice()).map_err(|_| DropReason::Truncated)?;
        let (dst, src, ethertype) = (frame.dst(), frame.src(), frame.ethertype());
        let src_ok = match peer.mac {
            Some(m) => src == m,
            None => src.is_valid_source(),
        };
        if !src_ok || src == self.local_mac {
            return Err(DropReason::WrongSourceMac);
        }
        match ethertype {
            ethernet::ETHERTYPE_IPV4 | ethernet::ETHERTYPE_IPV6 if dst == self.local_mac => {
                pkt.strip(ethernet::HEADER_LEN);
                Ok(Decapsulated::Ip)
            }
            // Neighbour solicitations go to a solicited-node multicast MAC.
            ethernet::ETHERTYPE_IPV6 if dst.is_multicast() => match ndp::parse_solicitation(frame.payload()) {
                Some(_) => Ok(Decapsulated::NeighbourRequest),
                None => Err(DropReason::WrongInnerMac),
            },
            ethernet::ETHERTYPE_IPV4 | ethernet::ETHERTYPE_IPV6 => Err(DropReason::WrongInnerMac),
            ethernet::ETHERTYPE_ARP if dst == self.local_mac || dst.is_broadcast() => {
                Ok(Decapsulated::NeighbourRequest)
            }
            ethernet::ETHERTYPE_ARP => Err(DropReason::WrongInnerMac),
            _ => Err(DropReason::BadEthertype),
        }
    }

    fn answer(&self, pkt: &mut PacketBuf<'_>, peer: &NextHop, local: &LocalNode) -> Result<(), DropReason> {
        let ethertype = EthernetFrame::new_checked(pkt.as_slice()).map_err(|_| DropReason::Truncated)?.ethertype();
        let body = pkt.as_mut_slice().get_mut(ethernet::HEADER_LEN..).ok_or(DropReason::Truncated)?;
        match ethertype {
            ethernet::ETHERTYPE_ARP => {
                let mut a = ArpPacket::new_checked(body).map_err(|_| DropReason::BadEthertype)?;
                if a.op() != arp::OP_REQUEST {
                    return Err(DropReason::BadEthertype);
                }
                if !peer.owns(a.sender_ip().into()) {
                    return Err(DropReason::ForeignSource);
                }
                if !local.owns(a.target_ip().into()) {
                    return Err(DropReason::NotLocalDestination);
                }
                a.make_reply(self.local_mac);
                self.turn_around(pkt, ethernet::ETHERTYPE_ARP, ethernet::HEADER_LEN + arp::PACKET_LEN)
            }
            ethernet::ETHERTYPE_IPV6 => {
                let ns = ndp::parse_solicitation(body).ok_or(DropReason::BadIpHeader)?;
                if !peer.owns(ns.src.into()) && !ns.src.is_unicast_link_local() {
                    return Err(DropReason::ForeignSource);
                }
                if !local.owns(ns.target.into()) {
                    return Err(DropReason::NotLocalDestination);
                }
                let out = pkt.as_mut_slice().get_mut(ethernet::HEADER_LEN..).ok_or(DropReason::Truncated)?;
                if out.len() < ndp::NA_LEN {
                    // The solicitation is shorter than our answer: grow into the slot first.
                    if !pkt.set_len(ethernet::HEADER_LEN + ndp::NA_LEN) {
                        return Err(DropReason::Oversize);
                    }
                }
                let out = pkt.as_mut_slice().get_mut(ethernet::HEADER_LEN..).ok_or(DropReason::Truncated)?;
                ndp::emit_advertisement(out, ns, self.local_mac);
                self.turn_around(pkt, ethernet::ETHERTYPE_IPV6, ethernet::HEADER_LEN + ndp::NA_LEN)
            }
            _ => Err(DropReason::BadEthertype),
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use crate::forwarder::UnderlayVerdict;
    use crate::testing::{A_ENDPOINT, A_MAC, B_MAC, Pair, icmp_echo, icmp_echo_v6};
    use crate::wire::ipv4::Ipv4Packet;

    #[test]
    fn ping_between_two_vxlan_nodes_keeps_ttl() {
        let mut net = Pair::vxlan();
        let inner = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 56);
        let wire = net.a_encap(&inner).unwrap();
        assert_eq!(wire[..8], [0x08, 0, 0, 0, 0, 0, 1, 0], "VXLAN header, VNI 1");
        assert_eq!(wire[8..14], B_MAC.0, "inner destination: the peer's VTEP MAC");
        assert_eq!(wire[14..20], A_MAC.0, "inner source: ours");
        assert_eq!(wire[20..22], [0x08, 0x00]);
        assert_eq!(&wire[22..], &inner[..], "the inner packet is untouched (the kernel forwards it)");
        assert_eq!(net.b_receives(&wire).unwrap(), inner);
        assert!(net.a_to_b(&icmp_echo_v6("fd00:1::1", "fd00:2::1", 8)).is_some());
    }

    /// Every way a frame from a known peer can be wrong, each with its own counter.
    #[test]
    fn decap_drops_each_malformed_frame_by_reason() {
        let good = Pair::vxlan().a_encap(&icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 8)).unwrap();
        type Mutation = fn(&mut Vec<u8>);
        let cases: [(&str, Mutation, DropReason); 10] = [
            ("I flag clear", |w| w[0] = 0, DropReason::BadVxlanFlags),
            ("reserved flag bit", |w| w[0] = 0x0c, DropReason::ReservedBitsSet),
            ("reserved byte", |w| w[7] = 1, DropReason::ReservedBitsSet),
            ("other VNI", |w| w[6] = 2, DropReason::WrongVni),
            ("truncated header", |w| w.truncate(7), DropReason::Truncated),
            ("truncated frame", |w| w.truncate(20), DropReason::Truncated),
            ("not our MAC", |w| w[13] = 9, DropReason::WrongInnerMac),
            ("not the peer's MAC", |w| w[19] = 9, DropReason::WrongSourceMac),
            ("our own MAC as source", |w| w[14..20].copy_from_slice(&B_MAC.0), DropReason::WrongSourceMac),
            ("VLAN tag", |w| w[20..22].copy_from_slice(&[0x81, 0x00]), DropReason::BadEthertype),
        ];
        for (name, mutate, reason) in cases {
            let mut net = Pair::vxlan();
            let mut w = good.clone();
            mutate(&mut w);
            assert!(net.b_receives(&w).is_none(), "{name}");
            assert_eq!(net.b.stats().drops(reason), 1, "{name}");
        }
        let mut net = Pair::vxlan();
        let spoofed = net.a_encap(&icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 8)).unwrap();
        let mut spoofed_inner = spoofed.clone();
        spoofed_inner[22 + 12..22 + 16].copy_from_slice(&[10, 244, 3, 1]);
        // A consistent spoof: the header checksum fixed up too, or it is dropped earlier.
        spoofed_inner[22 + 10..22 + 12].copy_from_slice(&[0, 0]);
        let c = crate::wire::checksum::checksum(&spoofed_inner[22..42]);
        spoofed_inner[22 + 10..22 + 12].copy_from_slice(&c.to_be_bytes());
        assert!(net.b_receives(&spoofed_inner).is_none());
        assert_eq!(net.b.stats().drops(DropReason::ForeignSource), 1);
    }

    fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut w = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        w.extend_from_slice(&[0xff; 6]);
        w.extend_from_slice(&A_MAC.0);
        w.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        w.extend_from_slice(&A_MAC.0);
        w.extend_from_slice(&[10, 244, 1, 0, 0, 0, 0, 0, 0, 0]);
        w.extend_from_slice(&target);
        w
    }

    fn b_answers(net: &mut Pair<VxlanEncap>, wire: &[u8]) -> Result<Vec<u8>, DropReason> {
        let (mut slot, head, len) = net.slot(wire);
        let mut pkt = PacketBuf::new(&mut slot, head, len).unwrap();
        match net.b.from_underlay(&net.routes_b, A_ENDPOINT.parse().unwrap(), &mut pkt) {
            UnderlayVerdict::Reply { to } => {
                assert_eq!(to, A_ENDPOINT.parse().unwrap());
                Ok(pkt.as_slice().to_vec())
            }
            UnderlayVerdict::Drop(r) => Err(r),
            UnderlayVerdict::Deliver { .. } | UnderlayVerdict::Consumed => {
                panic!("a neighbour request was not answered")
            }
        }
    }

    #[test]
    fn answers_arp_for_our_subnet_only() {
        let mut net = Pair::vxlan();
        let reply = b_answers(&mut net, &arp_request([10, 244, 2, 0])).unwrap();
        assert_eq!(reply[..8], [0x08, 0, 0, 0, 0, 0, 1, 0]);
        let eth = etherparse::Ethernet2Slice::from_slice_without_fcs(&reply[8..]).unwrap();
        assert_eq!((eth.destination(), eth.source()), (A_MAC.0, B_MAC.0));
        assert_eq!(reply.len(), 8 + MIN_FRAME, "padded to a minimum Ethernet frame");
        let arp = etherparse::ArpPacketSlice::from_slice(eth.payload_slice()).unwrap();
        assert_eq!(arp.operation(), etherparse::ArpOperation::REPLY);
        assert_eq!((arp.sender_hw_addr(), arp.sender_protocol_addr()), (&B_MAC.0[..], &[10, 244, 2, 0][..]));
        assert_eq!(net.b.stats().icmp_count(crate::stats::IcmpCounter::NeighbourReply), 1);
        assert_eq!(b_answers(&mut net, &arp_request([10, 244, 9, 9])), Err(DropReason::NotLocalDestination));
    }

    #[test]
    fn answers_neighbour_solicitation_with_advertisement() {
        let (src, target): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
            ("fd00:1::1".parse().unwrap(), "fd00:2::".parse().unwrap());
        // Build the solicitation as an ICMPv6 packet to the solicited-node group.
        let mut icmp = vec![135u8, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&target.octets());
        let dst: std::net::Ipv6Addr = "ff02::1:ff00:0".parse().unwrap();
        let h = etherparse::Icmpv6Header::with_checksum(
            etherparse::Icmpv6Type::Unknown { type_u8: 135, code_u8: 0, bytes5to8: [0; 4] },
            src.octets(),
            dst.octets(),
            &icmp[8..],
        )
        .unwrap();
        icmp[2..4].copy_from_slice(&h.checksum.to_be_bytes());
        let mut ip = vec![0u8; 40];
        crate::wire::ipv6::Ipv6Packet::new_unchecked(&mut ip[..]).emit_header(src, dst, 58, 255, icmp.len() as u16);
        ip.extend_from_slice(&icmp);
        let mut w = vec![0x08, 0, 0, 0, 0, 0, 1, 0, 0x33, 0x33, 0xff, 0, 0, 0];
        w.extend_from_slice(&A_MAC.0);
        w.extend_from_slice(&[0x86, 0xdd]);
        w.extend_from_slice(&ip);
        let mut net = Pair::vxlan();
        let reply = b_answers(&mut net, &w).unwrap();
        let na = etherparse::PacketHeaders::from_ethernet_slice(&reply[8..]).unwrap();
        let Some(etherparse::TransportHeader::Icmpv6(icmp)) = na.transport else { panic!("not icmpv6") };
        assert_eq!(icmp.icmp_type.type_u8(), 136);
    }

    #[test]
    fn ipv4_view_still_checks_inner_after_decap() {
        let mut net = Pair::vxlan();
        let inner = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 8);
        let out = net.a_to_b(&inner).unwrap();
        assert_eq!(Ipv4Packet::new_checked(&out[..]).unwrap().ttl(), 64);
    }
}
