//! UDP header view (RFC 768): ports, length, checksum, as segmentation and coalescing read
//! and rewrite them for the inner packets (the underlay's own UDP is the socket's business).

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::WireError;

mod field {
    use core::ops::Range;
    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const LENGTH: Range<usize> = 4..6;
    pub const CHECKSUM: Range<usize> = 6..8;
}

/// Length of a UDP header.
pub const HEADER_LEN: usize = 8;

/// IP protocol number of UDP.
pub const PROTOCOL: u8 = 17;

/// Offset of the checksum field in the header: a virtio-net header's `csum_offset` for UDP.
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;

/// A view of a UDP datagram whose header (and, from [`new_checked`](Self::new_checked), length
/// field) has been checked against the buffer.
#[derive(Debug)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

#[allow(clippy::indexing_slicing)] // in bounds: the 8 header bytes both checked constructors verified (mod.rs contract).
impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Wraps a buffer the caller has already sized (at least [`HEADER_LEN`] bytes).
    #[inline]
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Checks that the buffer holds a header and that the length field covers the header
    /// and no more than the buffer: a single datagram. Bytes past the length are padding.
    ///
    /// # Errors
    /// [`WireError::Truncated`] when the buffer is shorter than 8 bytes or than the length
    /// field; [`WireError::Malformed`] for a length field below 8.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let p = Self::new_checked_header(buffer)?;
        if p.len() < HEADER_LEN {
            return Err(WireError::Malformed);
        }
        if p.len() > p.buffer.as_ref().len() {
            return Err(WireError::Truncated);
        }
        Ok(p)
    }

    /// Checks only that the buffer holds the 8-byte header, not the length field: for a UDP
    /// super-packet from the TUN (USO), whose length field the kernel's GSO rewrites per
    /// segment and never checks, and for a header copied away from its payload, which is
    /// rewritten before it goes out. Every accessor is as safe as after
    /// [`new_checked`](Self::new_checked); [`payload`](Self::payload) is then bounded by the
    /// buffer.
    ///
    /// # Errors
    /// [`WireError::Truncated`] when the buffer is shorter than 8 bytes.
    #[inline]
    pub fn new_checked_header(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    #[inline]
    fn be16(&self, r: core::ops::Range<usize>) -> u16 {
        let b = &self.buffer.as_ref()[r];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// Source port.
    #[inline]
    pub fn src_port(&self) -> u16 {
        self.be16(field::SRC_PORT)
    }

    /// Destination port.
    #[inline]
    pub fn dst_port(&self) -> u16 {
        self.be16(field::DST_PORT)
    }

    /// The length field: header plus payload, in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        usize::from(self.be16(field::LENGTH))
    }

    /// Whether the length field says there is no payload (or is below the header's own 8
    /// bytes).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() <= HEADER_LEN
    }

    /// The stored checksum; 0 over IPv4 means the sender computed none.
    #[inline]
    pub fn checksum(&self) -> u16 {
        self.be16(field::CHECKSUM)
    }

    /// The payload up to the length field, clamped to the buffer (see
    /// [`new_checked_header`](Self::new_checked_header)).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        &b[HEADER_LEN..self.len().clamp(HEADER_LEN, b.len())]
    }
}

#[allow(clippy::indexing_slicing)] // a checked datagram, or a buffer the caller sized to `HEADER_LEN`.
impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Sets the length field.
    #[inline]
    pub fn set_len(&mut self, len: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&len.to_be_bytes());
    }

    /// Sets the checksum field.
    #[inline]
    pub fn set_checksum(&mut self, checksum: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&checksum.to_be_bytes());
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, PacketHeaders, TransportHeader};

    fn datagram(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 1], 64).udp(4433, 443).write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn reads_what_etherparse_wrote() {
        let pkt = datagram(b"quic");
        let u = UdpPacket::new_checked(&pkt[20..]).unwrap();
        let Some(TransportHeader::Udp(e)) = PacketHeaders::from_ip_slice(&pkt).unwrap().transport else {
            panic!("udp")
        };
        assert_eq!((u.src_port(), u.dst_port(), u.len()), (4433, 443, 12));
        assert_eq!(u.checksum(), e.checksum);
        assert_eq!(u.payload(), b"quic");
        assert!(!u.is_empty());
    }

    #[test]
    fn length_field_is_checked_only_by_new_checked() {
        let pkt = datagram(b"0123456789");
        let udp = &pkt[20..];
        assert_eq!(UdpPacket::new_checked(&udp[..7]).err(), Some(WireError::Truncated));
        assert_eq!(UdpPacket::new_checked_header(&udp[..7]).err(), Some(WireError::Truncated));
        assert_eq!(UdpPacket::new_checked(&udp[..17]).err(), Some(WireError::Truncated), "length past the end");
        let mut padded = udp.to_vec();
        padded.extend_from_slice(&[0xee; 4]);
        assert_eq!(UdpPacket::new_checked(&padded[..]).unwrap().payload(), b"0123456789", "padding is not payload");
        let mut b = udp.to_vec();
        b[4..6].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(UdpPacket::new_checked(&b[..]).err(), Some(WireError::Malformed));
        let h = UdpPacket::new_checked_header(&b[..]).unwrap();
        assert!(h.payload().is_empty() && h.is_empty(), "a length below 8 gives no payload, no panic");
        // A header copied away from its payload (what coalescing rewrites).
        let mut hdr = udp[..8].to_vec();
        let mut h = UdpPacket::new_checked_header(&mut hdr[..]).unwrap();
        assert!(h.payload().is_empty());
        h.set_len(1208);
        h.set_checksum(0xabcd);
        assert_eq!((h.len(), h.checksum()), (1208, 0xabcd));
        assert_eq!(&hdr[..4], &udp[..4], "ports untouched");
    }

    /// Every buffer of up to 40 bytes, with the length field swept over 0..48 and the other
    /// bytes fuzzed: whatever either checked constructor accepts, no accessor panics.
    #[test]
    fn no_accessor_panics_after_new_checked() {
        let mut seed = 0x2545_f491u32;
        for len in 0..=40usize {
            for field in 0..48u16 {
                let mut b: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        seed as u8
                    })
                    .collect();
                if let Some(f) = b.get_mut(4..6) {
                    f.copy_from_slice(&field.to_be_bytes());
                }
                if let Ok(u) = UdpPacket::new_checked(&b[..]) {
                    assert!(u.payload().len() + HEADER_LEN == usize::from(field));
                }
                let Ok(mut u) = UdpPacket::new_checked_header(&mut b[..]) else {
                    assert!(len < HEADER_LEN);
                    continue;
                };
                let _ = (u.src_port(), u.dst_port(), u.len(), u.is_empty(), u.checksum(), u.payload());
                u.set_len(0xffff);
                assert_eq!(u.payload().len(), len - HEADER_LEN);
                u.set_checksum(0);
            }
        }
    }
}
