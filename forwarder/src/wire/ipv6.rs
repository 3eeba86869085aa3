//! IPv6 header view (RFC 8200): the fixed 40-byte header only; extension headers are
//! payload to weft, which never routes on them.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::net::Ipv6Addr;

use super::WireError;

mod field {
    use core::ops::Range;
    pub const VER_TC_FLOW: Range<usize> = 0..4;
    pub const PAYLOAD_LEN: Range<usize> = 4..6;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: Range<usize> = 8..24;
    pub const DST: Range<usize> = 24..40;
}

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;

/// Next-header value of ICMPv6.
pub const NEXT_HEADER_ICMPV6: u8 = 58;

/// The minimum link MTU every IPv6 path supports (RFC 8200 §5).
pub const MIN_MTU: usize = 1280;

/// A view of an IPv6 packet whose fixed header and payload length have been checked.
#[derive(Debug)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

#[allow(clippy::indexing_slicing)] // in bounds: the 40 bytes and payload length `new_checked` verified.
impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Wraps a buffer the caller has already sized (at least [`HEADER_LEN`] bytes).
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Checks the version and that the buffer holds the fixed header, not the payload: for
    /// a header being written ahead of its payload.
    ///
    /// # Errors
    /// [`WireError::Truncated`] below 40 bytes, [`WireError::Malformed`] when the version
    /// is not 6.
    pub fn new_checked_header(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        match b.first() {
            _ if b.len() < HEADER_LEN => Err(WireError::Truncated),
            Some(v) if v >> 4 == 6 => Ok(Self { buffer }),
            _ => Err(WireError::Malformed),
        }
    }

    /// Checks the version and that the payload length fits the buffer.
    ///
    /// # Errors
    /// [`WireError::Truncated`] when the buffer is shorter than 40 bytes plus the payload
    /// length; [`WireError::Malformed`] when the version is not 6.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(WireError::Malformed);
        }
        let payload = usize::from(u16::from_be_bytes([b[4], b[5]]));
        if HEADER_LEN + payload > b.len() {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    /// Fixed header plus payload length, in bytes.
    pub fn total_len(&self) -> usize {
        let b = self.buffer.as_ref();
        HEADER_LEN + usize::from(u16::from_be_bytes([b[field::PAYLOAD_LEN.start], b[field::PAYLOAD_LEN.start + 1]]))
    }

    /// The first header after the fixed header.
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NEXT_HEADER]
    }

    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    /// Source address.
    pub fn src(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::SRC]);
        Ipv6Addr::from(a)
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::DST]);
        Ipv6Addr::from(a)
    }

    /// The payload after the fixed header, up to the payload length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.total_len()]
    }
}

#[allow(clippy::indexing_slicing)] // a checked packet, or a buffer the caller sized to `HEADER_LEN`.
impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Decrements the hop limit (IPv6 has no header checksum). Returns the new value; 0
    /// means the packet must be dropped.
    pub fn decrement_hop_limit(&mut self) -> u8 {
        let b = self.buffer.as_mut();
        let h = b[field::HOP_LIMIT].saturating_sub(1);
        b[field::HOP_LIMIT] = h;
        h
    }

    /// Sets the payload length (everything after the fixed header).
    pub fn set_payload_len(&mut self, len: u16) {
        self.buffer.as_mut()[field::PAYLOAD_LEN].copy_from_slice(&len.to_be_bytes());
    }

    /// Writes a fixed header with traffic class and flow label zero.
    pub fn emit_header(&mut self, src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, hop_limit: u8, payload_len: u16) {
        let b = self.buffer.as_mut();
        b[field::VER_TC_FLOW].copy_from_slice(&[0x60, 0, 0, 0]);
        b[field::PAYLOAD_LEN].copy_from_slice(&payload_len.to_be_bytes());
        b[field::NEXT_HEADER] = next_header;
        b[field::HOP_LIMIT] = hop_limit;
        b[field::SRC].copy_from_slice(&src.octets());
        b[field::DST].copy_from_slice(&dst.octets());
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn packet(payload_len: u16, buf_len: usize) -> Vec<u8> {
        let mut b = vec![0u8; buf_len];
        Ipv6Packet::new_unchecked(&mut b[..]).emit_header(
            "fd00:1::1".parse().unwrap(),
            "fd00:2::1".parse().unwrap(),
            NEXT_HEADER_ICMPV6,
            64,
            payload_len,
        );
        b
    }

    #[test]
    fn parses_emitted_header() {
        let b = packet(8, 48);
        let p = Ipv6Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.total_len(), 48);
        assert_eq!(p.src(), "fd00:1::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst(), "fd00:2::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.next_header(), NEXT_HEADER_ICMPV6);
        let (eh, _) = etherparse::Ipv6Header::from_slice(&b).unwrap();
        assert_eq!(eh.payload_length, 8);
    }

    #[test]
    fn rejects_lying_payload_length_and_wrong_version() {
        assert_eq!(Ipv6Packet::new_checked(&packet(9, 48)[..]).err(), Some(WireError::Truncated));
        let mut b = packet(8, 48);
        b[0] = 0x45;
        assert_eq!(Ipv6Packet::new_checked(&b[..]).err(), Some(WireError::Malformed));
        assert_eq!(Ipv6Packet::new_checked(&b[..39]).err(), Some(WireError::Truncated));
    }

    #[test]
    fn hop_limit_decrements_to_zero() {
        let mut b = packet(0, 40);
        b[7] = 1;
        assert_eq!(Ipv6Packet::new_checked(&mut b[..]).unwrap().decrement_hop_limit(), 0);
    }
}
