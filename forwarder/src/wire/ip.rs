//! Family-independent access to an inner IP packet: what the forwarder needs to route and
//! check it, whichever version it is.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::net::IpAddr;

use super::WireError;
use super::ipv4::Ipv4Packet;
use super::ipv6::Ipv6Packet;

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
    fn dispatches_on_version() {
        assert_eq!(IpPacket::new_checked(&[][..]).err(), Some(WireError::Truncated));
        assert_eq!(IpPacket::new_checked(&[0x50u8; 40][..]).err(), Some(WireError::Malformed));
        assert!(matches!(IpPacket::new_checked(&[0x45u8; 10][..]), Err(WireError::Truncated)));
    }
}
