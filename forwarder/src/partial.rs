//! Partial L4 checksums from a kernel VTEP, recognised and repaired, sans-IO.
//!
//! A Linux sender whose device offers checksum offload (veth does, and so does a vxlan device
//! on top of it by default) leaves a TCP or UDP checksum *partial* (`CHECKSUM_PARTIAL`): the
//! field holds only the pseudo-header sum, uncomplemented, and the NIC is to finish it. Over
//! veth no NIC ever does, and kernel vxlan encapsulates the packet as it is; a peer in the
//! same kernel completes or trusts it, but a userspace VTEP that writes it to its TUN as
//! complete has the kernel drop it as a bad checksum. That is why TCP to flannel's default
//! vxlan setup in kind, docker-in-docker and netns labs never connects (flannel#1279).
//!
//! weft does what a NIC would. [`find`] recognises the field: it must equal the pseudo-header
//! sum, which a header-only comparison decides (a few additions, no pass over the payload).
//! Then, on a TUN with a virtio-net header the packet is handed over as partial
//! (`VIRTIO_NET_HDR_F_NEEDS_CSUM`, [`Partial::vnet_hdr`]) as a local kernel sender would have
//! handed it, at no cost; without one, [`complete`] computes the checksum (one pass).
//!
//! A complete checksum equals the pseudo-header sum for about one packet in 65 536. Such a
//! packet reads the same both ways: completing it recomputes the value it already holds, and
//! `NEEDS_CSUM` asks the kernel to finish a sum whose seed is exactly that value. Nothing is
//! changed or trusted that would not have been, and the counter counts only real repairs
//! (see [`complete`]'s result).

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use crate::gso::{F_NEEDS_CSUM, VnetHdr};
use crate::wire::ip::IpFacts;
use crate::wire::{self, checksum, tcp, udp};

/// Where a partial checksum lives in an IP packet.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Partial {
    /// Where checksumming starts: the L4 header.
    start: usize,
    /// Offset of the field from `start` (TCP 16, UDP 6).
    offset: usize,
    /// Where the IP packet ends (Ethernet padding may follow it).
    end: usize,
    /// The pseudo-header sum (unfolded), which [`verified`] adds the L4 bytes to.
    pseudo: u32,
}

impl Partial {
    /// Where checksumming starts (the L4 header's offset in the IP packet).
    pub fn start(&self) -> usize {
        self.start
    }

    /// Offset of the checksum field from [`start`](Self::start).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The virtio-net header that hands this packet to the TUN as partial, for the kernel to
    /// treat as a local sender's (no segmentation).
    pub fn vnet_hdr(&self) -> VnetHdr {
        let end = self.start.saturating_add(self.offset).saturating_add(2);
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: 0,
            hdr_len: u16::try_from(end).unwrap_or(u16::MAX),
            gso_size: 0,
            csum_start: u16::try_from(self.start).unwrap_or(u16::MAX),
            csum_offset: self.offset as u16,
        }
    }
}

/// `Some` when `ip` (one whole IPv4 or IPv6 packet, already checked by the forwarder, which
/// read its header into `f`; possibly followed by padding) is TCP or UDP, not a fragment, and
/// its checksum field holds exactly the pseudo-header sum: a partial checksum (see the module
/// doc). IPv6 extension headers are not walked (a kernel VTEP leaves those packets' checksums
/// complete in practice, and they then go as they are). An IPv4 UDP field of 0 means "no
/// checksum" and is left alone.
#[must_use]
pub fn find(ip: &[u8], f: &IpFacts) -> Option<Partial> {
    if f.fragment {
        return None;
    }
    let (offset, min_len) = match f.protocol {
        tcp::PROTOCOL => (tcp::CHECKSUM_OFFSET, tcp::HEADER_LEN),
        udp::PROTOCOL => (udp::CHECKSUM_OFFSET, udp::HEADER_LEN),
        _ => return None,
    };
    let l4 = f.l4(ip)?;
    let field = wire::be16(l4, offset)?;
    if l4.len() < min_len || (f.protocol == udp::PROTOCOL && !f.is_v6() && field == 0) {
        return None;
    }
    // The partial field is the folded pseudo-header sum, not complemented (`fold` complements).
    let pseudo = f.pseudo_sum(l4.len());
    (field == !checksum::fold(pseudo)).then_some(Partial { start: f.header_len, offset, end: f.total_len, pseudo })
}

/// [`find`], confirmed by the full sum: `Some` only when the checksum does not verify, so the
/// field really is partial. Costs a pass over the L4 bytes only for packets [`find`] picks.
#[must_use]
pub fn verified(ip: &[u8], f: &IpFacts) -> Option<Partial> {
    let p = find(ip, f)?;
    (checksum::fold(checksum::sum(p.pseudo, ip.get(p.start..p.end)?)) != 0).then_some(p)
}

/// Completes the partial checksum `p` of `ip` in place, as a NIC would: one pass over the L4
/// bytes. Returns whether the field changed, which is whether it really was partial.
pub fn complete(ip: &mut [u8], p: Partial) -> bool {
    let Some(ip) = ip.get_mut(..p.end) else { return false };
    let Some(at) = p.start.checked_add(p.offset) else { return false };
    let Some(before) = wire::be16(ip, at) else { return false };
    if crate::gso::complete_checksum(ip, p.start, p.offset).is_err() {
        return false;
    }
    // 0 and 0xffff are the same one's-complement sum; a UDP field of 0 would say "none".
    if wire::be16(ip, at) == Some(0) {
        let _ = wire::set_be16(ip, at, 0xffff);
    }
    wire::be16(ip, at) != Some(before)
}

/// [`find`] then [`complete`]: `true` when `ip` held a partial checksum, now completed.
pub fn repair(ip: &mut [u8], f: &IpFacts) -> bool {
    find(ip, f).is_some_and(|p| complete(ip, p))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use crate::fuzzing::raw;
    use crate::wire::ip::IpPacket;
    use etherparse::PacketBuilder;

    const TCP: u8 = tcp::PROTOCOL;
    const UDP: u8 = udp::PROTOCOL;

    /// The facts the forwarder would hand over with `ip`.
    fn facts(ip: &[u8]) -> IpFacts {
        IpPacket::new_checked(ip).unwrap().facts()
    }

    fn find(ip: &[u8]) -> Option<Partial> {
        IpPacket::new_checked(ip).ok().and_then(|p| super::find(ip, &p.facts()))
    }

    fn verified(ip: &[u8]) -> Option<Partial> {
        super::verified(ip, &facts(ip))
    }

    fn repair(ip: &mut [u8]) -> bool {
        let f = facts(ip);
        super::repair(ip, &f)
    }

    fn tcp4(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 244, 2, 0], [10, 244, 1, 1], 64)
            .tcp(40000, 5201, 1, 4096)
            .ack(7)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    /// What a Linux sender with checksum offload leaves: the field holds the pseudo-header
    /// sum of the packet's own addresses and L4 length.
    fn make_partial(ip: &mut [u8], start: usize, offset: usize, proto: u8, v6: bool) {
        let l4_len = ip.len() - start;
        let f = facts(ip);
        assert_eq!((f.protocol, f.is_v6(), f.header_len), (proto, v6, start));
        let p = !checksum::fold(f.pseudo_sum(l4_len));
        ip[start + offset..start + offset + 2].copy_from_slice(&p.to_be_bytes());
    }

    #[test]
    fn a_partial_tcp_checksum_is_found_and_completed() {
        let good = tcp4(&[0xab; 1000]);
        assert!(raw::l4_checksum_ok(&good));
        assert_eq!(find(&good), None, "a complete checksum is not partial");
        let mut p = good.clone();
        make_partial(&mut p, 20, 16, TCP, false);
        assert!(!raw::l4_checksum_ok(&p), "the kernel would drop this");
        let found = find(&p).unwrap();
        assert_eq!((found.start(), found.offset()), (20, 16));
        assert_eq!(verified(&p), Some(found));
        assert!(complete(&mut p, found));
        assert_eq!(verified(&p), None, "complete now");
        assert_eq!(p, good, "completed exactly as the sender's stack would have");
        assert!(!repair(&mut p), "nothing left to repair");
        // Ethernet padding after the packet is not summed.
        make_partial(&mut p, 20, 16, TCP, false);
        p.extend_from_slice(&[0xee; 6]);
        assert!(repair(&mut p));
        assert_eq!(&p[..good.len()], &good[..]);
    }

    #[test]
    fn partial_udp_and_ipv6_too() {
        let mut v4 = Vec::new();
        PacketBuilder::ipv4([10, 244, 2, 0], [10, 244, 1, 1], 64).udp(5000, 5201).write(&mut v4, &[7; 300]).unwrap();
        let mut v6 = Vec::new();
        PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).tcp(1, 2, 3, 4).write(&mut v6, &[9; 500]).unwrap();
        for (good, start, offset, proto, is_v6) in [(v4, 20, 6, UDP, false), (v6, 40, 16, TCP, true)] {
            let mut p = good.clone();
            make_partial(&mut p, start, offset, proto, is_v6);
            assert!(repair(&mut p), "proto {proto} v6 {is_v6}");
            assert_eq!(p, good);
        }
    }

    #[test]
    fn ipv4_options_move_the_l4_header() {
        let mut good = tcp4(&[1; 64]);
        // Insert 4 bytes of options (NOPs + EOL) and fix the header.
        good.splice(20..20, [1, 1, 1, 0]);
        good[0] = 0x46;
        let total = good.len() as u16;
        good[2..4].copy_from_slice(&total.to_be_bytes());
        good[10..12].copy_from_slice(&[0, 0]);
        let c = !raw::rfc1071(&good[..24]);
        good[10..12].copy_from_slice(&c.to_be_bytes());
        raw::fix_l4_checksum(&mut good);
        let mut p = good.clone();
        make_partial(&mut p, 24, 16, TCP, false);
        assert_eq!(find(&p).map(|f| f.start()), Some(24));
        assert!(repair(&mut p));
        assert_eq!(p, good);
    }

    #[test]
    fn not_partial_when_it_cannot_be() {
        let mut p = tcp4(&[2; 100]);
        make_partial(&mut p, 20, 16, TCP, false);
        // A fragment: its checksum cannot be checked alone.
        let mut frag = p.clone();
        frag[6] = 0x20; // MF
        assert_eq!(find(&frag), None);
        // ICMP, truncated headers, and the IPv4 UDP "no checksum" zero.
        let mut icmp = p.clone();
        icmp[9] = 1;
        assert_eq!(find(&icmp), None);
        assert_eq!(find(&p[..30]), None);
        assert_eq!(find(&[]), None);
        let mut udp = Vec::new();
        PacketBuilder::ipv4([10, 244, 2, 0], [10, 244, 1, 1], 64).udp(1, 2).write(&mut udp, &[0; 8]).unwrap();
        udp[26..28].copy_from_slice(&[0, 0]);
        assert_eq!(find(&udp), None);
    }

    #[test]
    fn the_vnet_header_points_at_the_field() {
        let mut p = tcp4(&[3; 200]);
        make_partial(&mut p, 20, 16, TCP, false);
        let h = find(&p).unwrap().vnet_hdr();
        assert_eq!((h.flags, h.gso_type, h.csum_start, h.csum_offset, h.hdr_len), (F_NEEDS_CSUM, 0, 20, 16, 38));
        // The kernel, finishing it, gets the sender's checksum.
        crate::gso::complete_checksum(&mut p, h.csum_start.into(), h.csum_offset.into()).unwrap();
        assert!(raw::l4_checksum_ok(&p));
    }
}
