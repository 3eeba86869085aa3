//! Family-independent access to an inner IP packet: what the forwarder needs to route and
//! check it, whichever version it is.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::net::IpAddr;

use super::ipv4::Ipv4Packet;
use super::ipv6::{self, Ipv6Packet};
use super::{WireError, checksum};

/// An inner packet after its header has been checked.
#[derive(Debug)]
pub enum IpPacket<T: AsRef<[u8]>> {
    /// IPv4.
    V4(Ipv4Packet<T>),
    /// IPv6.
    V6(Ipv6Packet<T>),
}

impl<T: AsRef<[u8]>> IpPacket<T> {
    /// Dispatches on the version nibble and checks the header of that version.
    ///
    /// # Errors
    /// [`WireError::Truncated`] for an empty or short buffer, [`WireError::Malformed`] for
    /// a version other than 4 or 6 or a header that fails its own checks.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        match buffer.as_ref().first().map(|b| b >> 4) {
            Some(4) => Ipv4Packet::new_checked(buffer).map(Self::V4),
            Some(6) => Ipv6Packet::new_checked(buffer).map(Self::V6),
            Some(_) => Err(WireError::Malformed),
            None => Err(WireError::Truncated),
        }
    }

    /// Source address.
    pub fn src(&self) -> IpAddr {
        match self {
            Self::V4(p) => p.src().into(),
            Self::V6(p) => p.src().into(),
        }
    }

    /// Destination address.
    pub fn dst(&self) -> IpAddr {
        match self {
            Self::V4(p) => p.dst().into(),
            Self::V6(p) => p.dst().into(),
        }
    }

    /// The length the header declares; bytes past it are padding to be trimmed.
    pub fn total_len(&self) -> usize {
        match self {
            Self::V4(p) => p.total_len(),
            Self::V6(p) => p.total_len(),
        }
    }

    /// Whether the header checksum verifies: IPv4's covers its 20–60 header bytes; IPv6 has
    /// none, so it always does.
    pub fn header_checksum_ok(&self) -> bool {
        match self {
            Self::V4(p) => p.verify_checksum(),
            Self::V6(_) => true,
        }
    }

    /// Whether a router may not fragment this packet: IPv4 with DF set, or any IPv6 packet
    /// (RFC 8200 §5: only the source fragments).
    pub fn dont_frag(&self) -> bool {
        match self {
            Self::V4(p) => p.dont_frag(),
            Self::V6(_) => true,
        }
    }

    /// Everything the data path needs of this header, read once, so that routing, TTL,
    /// flow hashing, segmentation and coalescing never parse it again.
    pub fn facts(&self) -> IpFacts {
        match self {
            Self::V4(p) => IpFacts {
                src: p.src().into(),
                dst: p.dst().into(),
                protocol: p.protocol(),
                header_len: p.header_len(),
                total_len: p.total_len(),
                dont_frag: p.dont_frag(),
                fragment: p.is_fragment(),
            },
            Self::V6(p) => IpFacts {
                src: p.src().into(),
                dst: p.dst().into(),
                protocol: p.next_header(),
                header_len: ipv6::HEADER_LEN,
                total_len: p.total_len(),
                dont_frag: true,
                fragment: false,
            },
        }
    }
}

/// The header of one checked IP packet, parsed once ([`IpPacket::facts`]) and handed along
/// with it: the forwarder's checks, the TTL decrement, the flow hash, segmentation
/// ([`crate::gso`]) and coalescing ([`crate::gro`]) all read these instead of the bytes.
///
/// Offsets are from the start of the IP packet; they were checked against the buffer it
/// was parsed from, and every use of them here goes through `get`, so facts paired with
/// the wrong bytes fail closed (`None`, 0) rather than panic.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct IpFacts {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IPv4 protocol, or the IPv6 next header (extension headers are not walked).
    pub protocol: u8,
    /// Where the L4 header starts: the IPv4 header with its options, or 40.
    pub header_len: usize,
    /// The length the header declares; bytes past it are padding.
    pub total_len: usize,
    /// A router may not fragment it (IPv4 DF, every IPv6 packet).
    pub dont_frag: bool,
    /// An IPv4 fragment (more-fragments set or a non-zero offset): its L4 header is absent
    /// or cannot be checked alone.
    pub fragment: bool,
}

impl IpFacts {
    /// Whether the packet is IPv6.
    #[inline]
    pub fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// An IPv4 header without options or an IPv6 one (no extension walked), carrying
    /// `protocol`, not a fragment: the packets segmentation offload and GRO handle.
    #[inline]
    pub fn is_plain(&self, protocol: u8) -> bool {
        self.protocol == protocol && !self.fragment && (self.is_v6() || self.header_len == super::ipv4::HEADER_LEN)
    }

    /// The L4 bytes of `ip` (the packet these facts were read from): header to total length.
    #[inline]
    pub fn l4<'a>(&self, ip: &'a [u8]) -> Option<&'a [u8]> {
        ip.get(self.header_len..self.total_len)
    }

    /// The one's-complement sum (unfolded) of the pseudo-header of an `l4_len`-byte L4
    /// segment of this packet's protocol (RFC 9293 §3.1, RFC 8200 §8.1), computed from the
    /// addresses: the same for every segment cut from, or merged into, one packet.
    #[inline]
    pub fn pseudo_sum(&self, l4_len: usize) -> u32 {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => checksum::pseudo_header_v4(s, d, self.protocol, l4_len as u16),
            (IpAddr::V6(s), IpAddr::V6(d)) => checksum::pseudo_header_v6(s, d, self.protocol, l4_len as u32),
            // `facts` never mixes families; a mixed pair sums nothing and fails any check.
            _ => 0,
        }
    }

    /// Decrements the TTL (patching the IPv4 checksum) or the hop limit of `ip`, the packet
    /// these facts were read from; returns the new value, 0 when the packet must be dropped
    /// (also when `ip` is shorter than the header these facts describe).
    #[inline]
    pub fn decrement_ttl(&self, ip: &mut [u8]) -> u8 {
        if ip.len() < self.header_len {
            return 0;
        }
        // In bounds: `header_len` is at least the fixed header of either version.
        if self.is_v6() {
            Ipv6Packet::new_unchecked(ip).decrement_hop_limit()
        } else {
            Ipv4Packet::new_unchecked(ip).decrement_ttl()
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IpPacket<T> {
    /// Decrements TTL or hop limit (patching the IPv4 checksum); returns the new value.
    pub fn decrement_ttl(&mut self) -> u8 {
        match self {
            Self::V4(p) => p.decrement_ttl(),
            Self::V6(p) => p.decrement_hop_limit(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_read_once_and_match_the_views() {
        let mut v4 = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 1], 9)
            .udp(1, 2)
            .write(&mut v4, &[0; 12])
            .unwrap();
        v4.extend_from_slice(&[0xee; 3]); // padding is not the packet's
        let f = IpPacket::new_checked(&v4[..]).unwrap().facts();
        assert_eq!((f.is_v6(), f.protocol, f.header_len, f.total_len), (false, 17, 20, 40));
        assert!(f.is_plain(17) && !f.is_plain(6) && !f.fragment);
        assert_eq!(f.l4(&v4).map(<[u8]>::len), Some(20));
        assert_eq!(f.decrement_ttl(&mut v4), 8);
        assert!(IpPacket::new_checked(&v4[..]).unwrap().header_checksum_ok());
        assert_eq!(f.decrement_ttl(&mut v4[..19]), 0, "short bytes fail closed");
        v4[6] = 0x20; // more fragments
        assert!(IpPacket::new_checked(&v4[..]).unwrap().facts().fragment);

        let mut v6 = Vec::new();
        etherparse::PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 1).tcp(1, 2, 3, 4).write(&mut v6, &[1; 5]).unwrap();
        let f = IpPacket::new_checked(&v6[..]).unwrap().facts();
        assert_eq!((f.is_v6(), f.protocol, f.header_len, f.total_len, f.dont_frag), (true, 6, 40, 65, true));
        assert_eq!(f.decrement_ttl(&mut v6), 0, "hop limit 1 expires");
    }

    #[test]
    fn pseudo_sum_matches_a_byte_wise_pseudo_header() {
        let mut v4 = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 1], 64)
            .tcp(1, 2, 3, 4)
            .write(&mut v4, &[7; 33])
            .unwrap();
        let f = IpPacket::new_checked(&v4[..]).unwrap().facts();
        let mut ph = v4[12..20].to_vec();
        ph.extend_from_slice(&[0, 6, 0, 53]);
        assert_eq!(checksum::fold(f.pseudo_sum(53)), checksum::checksum(&ph));
        // The L4 checksum etherparse wrote verifies against it.
        assert_eq!(checksum::fold(checksum::sum(f.pseudo_sum(53), f.l4(&v4).unwrap())), 0);
    }

    #[test]
    fn dispatches_on_version() {
        assert_eq!(IpPacket::new_checked(&[][..]).err(), Some(WireError::Truncated));
        assert_eq!(IpPacket::new_checked(&[0x50u8; 40][..]).err(), Some(WireError::Malformed));
        assert!(matches!(IpPacket::new_checked(&[0x45u8; 10][..]), Err(WireError::Truncated)));
    }
}
