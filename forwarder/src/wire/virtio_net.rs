//! The virtio-net header (Linux `struct virtio_net_hdr`, `include/uapi/linux/virtio_net.h`)
//! that a TUN opened with `IFF_VNET_HDR` puts in front of every packet it reads and expects
//! in front of every packet it is written: whether the L4 checksum is partial, and how a
//! super-packet is to be cut. Host byte order, unlike every other header in [`crate::wire`],
//! because the kernel fills it in as a C struct.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

/// Length of the virtio-net header without the `num_buffers` field.
pub const VNET_HDR_LEN: usize = 10;

/// `flags`: the L4 checksum must be completed from `csum_start` / `csum_offset`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type`: not a super-packet.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation (USO), either IP version.
pub const GSO_UDP_L4: u8 = 5;

/// The virtio-net header, parsed: ten bytes read once into a value (it is smaller than a
/// view over it, and read field by field by every check of a super-packet).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM` and friends.
    pub flags: u8,
    /// `GSO_*`; the ECN bit (0x80) is refused, as weft leaves `TUN_F_TSO_ECN` off.
    pub gso_type: u8,
    /// L3 + L4 header length: a hint only, never trusted on read.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS).
    pub gso_size: u16,
    /// Where checksumming starts (the L4 header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start` (TCP 16, UDP 6).
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the first [`VNET_HDR_LEN`] bytes; `None` when `b` is shorter.
    #[inline]
    pub fn parse(b: &[u8]) -> Option<Self> {
        let &[flags, gso_type, h0, h1, g0, g1, s0, s1, o0, o1] = super::bytes::<VNET_HDR_LEN>(b, 0)?;
        Some(Self {
            flags,
            gso_type,
            hdr_len: u16::from_ne_bytes([h0, h1]),
            gso_size: u16::from_ne_bytes([g0, g1]),
            csum_start: u16::from_ne_bytes([s0, s1]),
            csum_offset: u16::from_ne_bytes([o0, o1]),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `b` (nothing if shorter).
    #[inline]
    pub fn emit(&self, b: &mut [u8]) {
        if let Some(b) = super::bytes_mut::<VNET_HDR_LEN>(b, 0) {
            let ([h0, h1], [g0, g1]) = (self.hdr_len.to_ne_bytes(), self.gso_size.to_ne_bytes());
            let ([s0, s1], [o0, o1]) = (self.csum_start.to_ne_bytes(), self.csum_offset.to_ne_bytes());
            *b = [self.flags, self.gso_type, h0, h1, g0, g1, s0, s1, o0, o1];
        }
    }

    /// Whether this header describes a super-packet to cut.
    #[inline]
    pub fn is_gso(&self) -> bool {
        self.gso_type != GSO_NONE
    }

    /// Whether the L4 checksum is partial, to be completed from `csum_start` /
    /// `csum_offset`.
    #[inline]
    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_in_host_byte_order() {
        let h = VnetHdr { flags: 1, gso_type: GSO_TCPV4, hdr_len: 52, gso_size: 1448, csum_start: 20, csum_offset: 16 };
        let mut b = [0u8; VNET_HDR_LEN + 2];
        h.emit(&mut b);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(b[4..6], 1448u16.to_ne_bytes());
        assert!(h.is_gso() && h.needs_csum());
        assert!(!VnetHdr::default().is_gso() && !VnetHdr::default().needs_csum());
        assert_eq!(VnetHdr::parse(&b[..VNET_HDR_LEN - 1]), None);
        let mut short = [0xaau8; VNET_HDR_LEN - 1];
        h.emit(&mut short);
        assert_eq!(short, [0xaa; VNET_HDR_LEN - 1], "a short buffer is left alone");
    }
}
