//! IPv6 neighbour discovery (RFC 4861 §4.3, §4.4), the IPv6 counterpart of ARP: weft
//! answers neighbour solicitations for its own subnet that arrive over VXLAN.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::net::Ipv6Addr;

use super::checksum;
use super::ethernet::MacAddr;
use super::ipv6::{self, Ipv6Packet};

/// ICMPv6 type of a neighbour solicitation.
const TYPE_NS: u8 = 135;
/// ICMPv6 type of a neighbour advertisement.
const TYPE_NA: u8 = 136;
/// Length of an advertisement with a target link-layer address option, IPv6 header included.
pub const NA_LEN: usize = ipv6::HEADER_LEN + 32;

/// The parts of a neighbour solicitation weft needs to answer it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Solicitation {
    /// Who asks (never unspecified: duplicate-address probes are not answered).
    pub src: Ipv6Addr,
    /// The address asked about.
    pub target: Ipv6Addr,
}

/// Parses `packet` (an IPv6 packet) as a valid neighbour solicitation: hop limit 255,
/// ICMPv6 type 135 code 0, correct checksum, unicast target, specified source.
pub fn parse_solicitation(packet: &[u8]) -> Option<Solicitation> {
    let ip = Ipv6Packet::new_checked(packet).ok()?;
    if ip.next_header() != ipv6::NEXT_HEADER_ICMPV6 || ip.hop_limit() != 255 {
        return None;
    }
    let icmp = ip.payload();
    if icmp.len() < 24 || icmp.first() != Some(&TYPE_NS) || icmp.get(1) != Some(&0) {
        return None;
    }
    if icmpv6_checksum(ip.src(), ip.dst(), icmp) != 0 {
        return None;
    }
    let mut t = [0u8; 16];
    t.copy_from_slice(icmp.get(8..24)?);
    let target = Ipv6Addr::from(t);
    if target.is_multicast() || ip.src().is_unspecified() {
        return None;
    }
    Some(Solicitation { src: ip.src(), target })
}

/// Writes into `buf` (at least [`NA_LEN`] bytes) the solicited advertisement "`ns.target` is
/// at `our_mac`", from the target to the asker, with the router, solicited and override flags.
pub fn emit_advertisement(buf: &mut [u8], ns: Solicitation, our_mac: MacAddr) {
    let Some((ip, rest)) = buf.split_at_mut_checked(ipv6::HEADER_LEN) else { return };
    let Some(icmp) = rest.first_chunk_mut::<32>() else { return };
    Ipv6Packet::new_unchecked(ip).emit_header(ns.target, ns.src, ipv6::NEXT_HEADER_ICMPV6, 255, 32);
    icmp[0] = TYPE_NA;
    icmp[1] = 0;
    icmp[2..4].copy_from_slice(&[0, 0]);
    icmp[4..8].copy_from_slice(&[0xe0, 0, 0, 0]); // R | S | O
    icmp[8..24].copy_from_slice(&ns.target.octets());
    icmp[24] = 2; // target link-layer address option
    icmp[25] = 1; // length in units of 8 bytes
    icmp[26..32].copy_from_slice(&our_mac.0);
    let c = icmpv6_checksum(ns.target, ns.src, icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
}

/// The ICMPv6 checksum over the pseudo-header and `icmp` (0 when `icmp` carries a valid one).
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut acc = checksum::sum(0, &src.octets());
    acc = checksum::sum(acc, &dst.octets());
    acc = checksum::sum(acc, &(icmp.len() as u32).to_be_bytes());
    acc = checksum::sum(acc, &[0, 0, 0, ipv6::NEXT_HEADER_ICMPV6]);
    checksum::fold(checksum::sum(acc, icmp))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    /// A solicitation as Linux sends it: to the solicited-node multicast address, with a
    /// source link-layer address option.
    fn solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
        let t = target.octets();
        let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(t[13]), u16::from_be_bytes([t[14], t[15]]));
        let mut icmp = vec![TYPE_NS, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&t);
        icmp.extend_from_slice(&[1, 1, 2, 0, 0, 0, 0, 2]);
        let c = icmpv6_checksum(src, dst, &icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut p = vec![0u8; 40];
        Ipv6Packet::new_unchecked(&mut p[..]).emit_header(src, dst, 58, 255, icmp.len() as u16);
        p.extend_from_slice(&icmp);
        p
    }

    #[test]
    fn answers_a_valid_solicitation() {
        let (src, target) = ("fd00:2::1".parse().unwrap(), "fd00:1::".parse().unwrap());
        let ns = parse_solicitation(&solicitation(src, target)).unwrap();
        assert_eq!(ns, Solicitation { src, target });
        let mut out = [0u8; NA_LEN];
        let mac: MacAddr = "02:00:00:00:00:01".parse().unwrap();
        emit_advertisement(&mut out, ns, mac);
        let h = etherparse::PacketHeaders::from_ip_slice(&out).unwrap();
        let Some(etherparse::TransportHeader::Icmpv6(icmp)) = h.transport else { panic!("not icmpv6") };
        assert_eq!(icmp.icmp_type.type_u8(), TYPE_NA);
        assert_eq!(icmpv6_checksum(target, src, &out[40..]), 0);
        assert_eq!(&out[40 + 26..], &mac.0);
    }

    #[test]
    fn ignores_what_is_not_a_valid_solicitation() {
        let (src, target): (Ipv6Addr, Ipv6Addr) = ("fd00:2::1".parse().unwrap(), "fd00:1::".parse().unwrap());
        let mut bad_hop = solicitation(src, target);
        bad_hop[7] = 64;
        let mut bad_sum = solicitation(src, target);
        bad_sum[43] ^= 1;
        let dad = solicitation(Ipv6Addr::UNSPECIFIED, target);
        for (name, p) in [("hop limit", bad_hop), ("checksum", bad_sum), ("DAD probe", dad)] {
            assert!(parse_solicitation(&p).is_none(), "{name}");
        }
    }
}
