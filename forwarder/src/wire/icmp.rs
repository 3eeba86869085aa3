//! ICMP errors weft writes back into the TUN: destination unreachable for a packet no peer
//! can take, and fragmentation-needed (ICMPv4) or packet-too-big (ICMPv6) for a packet larger
//! than the path to its peer, so path-MTU discovery works end to end.
//!
//! The error is built in place: the caller leaves [`V4_ERROR_OVERHEAD`] or
//! [`V6_ERROR_OVERHEAD`] bytes of headroom in front of the offending packet, which becomes
//! the quoted part. The rules of RFC 1812 §4.3.2.7 and RFC 4443 §2.4(e) decide whether an
//! error may be sent at all ([`may_answer_v4`], [`may_answer_v6`]), as flannel's
//! `proxy_amd64.c` applies them.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::net::{Ipv4Addr, Ipv6Addr};

use super::checksum;
use super::ipv4::{self, Ipv4Header, Ipv4Packet};
use super::ipv6::{self, Ipv6Packet};

/// IPv4 header plus ICMP header in front of the quote.
pub const V4_ERROR_OVERHEAD: usize = ipv4::HEADER_LEN + 8;
/// IPv6 header plus ICMPv6 header in front of the quote.
pub const V6_ERROR_OVERHEAD: usize = ipv6::HEADER_LEN + 8;
/// RFC 1812 §4.3.2.3: an ICMPv4 error should not exceed 576 bytes.
pub const V4_ERROR_MAX: usize = 576;
/// RFC 4443 §2.4(c): an ICMPv6 error must not exceed the minimum IPv6 MTU.
pub const V6_ERROR_MAX: usize = ipv6::MIN_MTU;
/// TTL / hop limit of the errors weft writes.
const ERROR_TTL: u8 = 64;

/// Which error to write.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum IcmpKind {
    /// No route: ICMPv4 type 3 code 0 (net unreachable) / ICMPv6 type 1 code 0.
    NetUnreachable,
    /// The address is in our own subnet but nothing holds it: ICMPv4 type 3 code 1 /
    /// ICMPv6 type 1 code 3.
    HostUnreachable,
    /// Too big for the path: ICMPv4 type 3 code 4 with the next-hop MTU (RFC 1191), or
    /// ICMPv6 type 2 (RFC 4443 §3.2).
    TooBig {
        /// The MTU the sender must fit.
        mtu: u16,
    },
}

/// Whether an ICMP error about this IPv4 packet is allowed: not about an ICMP error, not
/// about a non-first fragment, not to or from a multicast, broadcast, unspecified or
/// loopback address (RFC 1812 §4.3.2.7).
pub fn may_answer_v4<T: AsRef<[u8]>>(pkt: &Ipv4Packet<T>) -> bool {
    let (src, dst) = (pkt.src(), pkt.dst());
    if pkt.frag_offset() != 0 || bad_v4_peer(src) || dst.is_multicast() || dst.is_broadcast() {
        return false;
    }
    if pkt.protocol() == ipv4::PROTO_ICMP {
        // Types 3, 4, 5, 11, 12 are errors; an empty ICMP payload is not worth answering.
        return matches!(pkt.payload().first(), Some(t) if !matches!(t, 3 | 4 | 5 | 11 | 12));
    }
    true
}

fn bad_v4_peer(a: Ipv4Addr) -> bool {
    a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback()
}

/// Whether an ICMPv6 error about this packet is allowed: not about an ICMPv6 error (types
/// below 128), not to a multicast destination, not from an unspecified or multicast source.
pub fn may_answer_v6<T: AsRef<[u8]>>(pkt: &Ipv6Packet<T>) -> bool {
    let (src, dst) = (pkt.src(), pkt.dst());
    if src.is_unspecified() || src.is_multicast() || src.is_loopback() || dst.is_multicast() {
        return false;
    }
    if pkt.next_header() == ipv6::NEXT_HEADER_ICMPV6 {
        return matches!(pkt.payload().first(), Some(t) if *t >= 128);
    }
    true
}

/// Writes an ICMPv4 error into `buf`: bytes `V4_ERROR_OVERHEAD..` already hold the quote.
///
/// `buf` must be at least `V4_ERROR_OVERHEAD` and at most [`V4_ERROR_MAX`] bytes; the caller
/// sizes it, so a shorter buffer is a bug and writes nothing.
pub fn emit_v4_error(buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, kind: IcmpKind) {
    let Ok(total) = u16::try_from(buf.len()) else { return };
    if buf.len() < V4_ERROR_OVERHEAD {
        return;
    }
    let Some((ip, icmp)) = buf.split_at_mut_checked(ipv4::HEADER_LEN) else { return };
    let Some(hdr) = icmp.first_chunk_mut::<8>() else { return };
    Ipv4Packet::new_unchecked(ip).emit_header(&Ipv4Header {
        src,
        dst,
        protocol: ipv4::PROTO_ICMP,
        ttl: ERROR_TTL,
        // Internetwork control, as Linux marks its own ICMP errors.
        tos: 0xc0,
        total_len: total,
        dont_frag: false,
    });
    let (code, mtu) = match kind {
        IcmpKind::NetUnreachable => (0, 0),
        IcmpKind::HostUnreachable => (1, 0),
        IcmpKind::TooBig { mtu } => (4, mtu),
    };
    let [m0, m1] = mtu.to_be_bytes();
    *hdr = [3, code, 0, 0, 0, 0, m0, m1];
    let c = checksum::checksum(icmp);
    let _ = super::set_be16(icmp, 2, c);
}

/// Writes an ICMPv6 error into `buf`: bytes `V6_ERROR_OVERHEAD..` already hold the quote.
///
/// `buf` must be at least `V6_ERROR_OVERHEAD` and at most [`V6_ERROR_MAX`] bytes.
pub fn emit_v6_error(buf: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr, kind: IcmpKind) {
    if buf.len() < V6_ERROR_OVERHEAD || buf.len() > V6_ERROR_MAX {
        return;
    }
    let Some((ip, icmp)) = buf.split_at_mut_checked(ipv6::HEADER_LEN) else { return };
    let icmp_len = icmp.len();
    let Ok(payload_len) = u16::try_from(icmp_len) else { return };
    let Some(hdr) = icmp.first_chunk_mut::<8>() else { return };
    Ipv6Packet::new_unchecked(ip).emit_header(src, dst, ipv6::NEXT_HEADER_ICMPV6, ERROR_TTL, payload_len);
    let (ty, code, word) = match kind {
        IcmpKind::NetUnreachable => (1, 0, 0u32),
        IcmpKind::HostUnreachable => (1, 3, 0),
        IcmpKind::TooBig { mtu } => (2, 0, u32::from(mtu)),
    };
    let [w0, w1, w2, w3] = word.to_be_bytes();
    *hdr = [ty, code, 0, 0, w0, w1, w2, w3];
    // RFC 4443 §2.3: the checksum covers the pseudo-header (RFC 8200 §8.1).
    let mut acc = checksum::sum(0, &src.octets());
    acc = checksum::sum(acc, &dst.octets());
    acc = checksum::sum(acc, &(icmp_len as u32).to_be_bytes());
    acc = checksum::sum(acc, &[0, 0, 0, ipv6::NEXT_HEADER_ICMPV6]);
    acc = checksum::sum(acc, icmp);
    let c = checksum::fold(acc);
    let _ = super::set_be16(icmp, 2, c);
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use etherparse::{Icmpv4Type, Icmpv6Type, IpNumber, PacketHeaders, TransportHeader};

    fn echo_v4(src: [u8; 4], dst: [u8; 4], payload: usize) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4(src, dst, 64).icmpv4_echo_request(1, 1);
        let mut out = Vec::new();
        b.write(&mut out, &vec![0xaa; payload]).unwrap();
        out
    }

    fn wrap_v4(orig: &[u8], kind: IcmpKind) -> Vec<u8> {
        let quote = orig.len().min(V4_ERROR_MAX - V4_ERROR_OVERHEAD);
        let mut buf = vec![0u8; V4_ERROR_OVERHEAD];
        buf.extend_from_slice(&orig[..quote]);
        emit_v4_error(&mut buf, Ipv4Addr::new(10, 244, 1, 1), Ipv4Addr::new(10, 244, 1, 5), kind);
        buf
    }

    #[test]
    fn frag_needed_parses_and_checksums() {
        let orig = echo_v4([10, 244, 1, 5], [10, 244, 2, 1], 1400);
        let err = wrap_v4(&orig, IcmpKind::TooBig { mtu: 1200 });
        assert_eq!(err.len(), V4_ERROR_MAX);
        let h = PacketHeaders::from_ip_slice(&err).unwrap();
        let Some(TransportHeader::Icmpv4(icmp)) = h.transport else { panic!("not icmp") };
        assert_eq!(
            icmp.icmp_type,
            Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1200
            })
        );
        assert_eq!(icmp.checksum, icmp.icmp_type.calc_checksum(h.payload.slice()));
        let ip = Ipv4Packet::new_checked(&err[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.dst(), Ipv4Addr::new(10, 244, 1, 5));
    }

    #[test]
    fn net_unreachable_quotes_whole_small_packet() {
        let orig = echo_v4([10, 244, 1, 5], [10, 244, 77, 1], 20);
        let err = wrap_v4(&orig, IcmpKind::NetUnreachable);
        assert_eq!(&err[V4_ERROR_OVERHEAD..], &orig[..]);
        let h = PacketHeaders::from_ip_slice(&err).unwrap();
        let Some(TransportHeader::Icmpv4(icmp)) = h.transport else { panic!("not icmp") };
        assert_eq!(
            icmp.icmp_type,
            Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Network)
        );
    }

    #[test]
    fn rfc1812_forbids_answers() {
        let cases: &[(&str, Vec<u8>, bool)] = &[
            ("echo", echo_v4([10, 244, 1, 5], [10, 244, 2, 1], 8), true),
            ("to broadcast", echo_v4([10, 244, 1, 5], [255, 255, 255, 255], 8), false),
            ("to multicast", echo_v4([10, 244, 1, 5], [224, 0, 0, 1], 8), false),
            ("from unspecified", echo_v4([0, 0, 0, 0], [10, 244, 2, 1], 8), false),
            (
                "about an icmp error",
                wrap_v4(&echo_v4([10, 244, 2, 1], [10, 244, 1, 5], 8), IcmpKind::NetUnreachable),
                false,
            ),
        ];
        for (name, pkt, want) in cases {
            let p = Ipv4Packet::new_checked(&pkt[..]).unwrap();
            assert_eq!(may_answer_v4(&p), *want, "{name}");
        }
        let mut frag = echo_v4([10, 244, 1, 5], [10, 244, 2, 1], 8);
        frag[6..8].copy_from_slice(&0x0001u16.to_be_bytes()); // offset 8 bytes
        assert!(!may_answer_v4(&Ipv4Packet::new_checked(&frag[..]).unwrap()));
    }

    #[test]
    fn packet_too_big_v6_parses_and_checksums() {
        let src: Ipv6Addr = "fd00:1::5".parse().unwrap();
        let dst: Ipv6Addr = "fd00:2::1".parse().unwrap();
        let b = etherparse::PacketBuilder::ipv6(src.octets(), dst.octets(), 64).icmpv6_echo_request(1, 1);
        let mut orig = Vec::new();
        b.write(&mut orig, &[0u8; 1400]).unwrap();
        assert!(may_answer_v6(&Ipv6Packet::new_checked(&orig[..]).unwrap()));
        let quote = orig.len().min(V6_ERROR_MAX - V6_ERROR_OVERHEAD);
        let mut buf = vec![0u8; V6_ERROR_OVERHEAD];
        buf.extend_from_slice(&orig[..quote]);
        emit_v6_error(&mut buf, "fd00:1::1".parse().unwrap(), src, IcmpKind::TooBig { mtu: 1280 });
        assert_eq!(buf.len(), V6_ERROR_MAX);
        let h = PacketHeaders::from_ip_slice(&buf).unwrap();
        let Some(TransportHeader::Icmpv6(icmp)) = h.transport else { panic!("not icmpv6") };
        assert_eq!(icmp.icmp_type, Icmpv6Type::PacketTooBig { mtu: 1280 });
        let net = h.net.unwrap();
        let etherparse::NetHeaders::Ipv6(ip6, _) = net else { panic!("not v6") };
        assert_eq!(ip6.next_header, IpNumber::IPV6_ICMP);
        let want = icmp.icmp_type.calc_checksum(ip6.source, ip6.destination, h.payload.slice()).unwrap();
        assert_eq!(icmp.checksum, want);
        // An ICMPv6 error about that error must not be sent.
        assert!(!may_answer_v6(&Ipv6Packet::new_checked(&buf[..]).unwrap()));
    }
}
