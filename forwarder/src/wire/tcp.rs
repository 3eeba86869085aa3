//! TCP header view (RFC 9293 §3.1): what segmentation and coalescing read and rewrite —
//! ports, sequence and acknowledgment numbers, data offset, flags, window, checksum. weft
//! never terminates TCP, so options are bytes to copy and compare, not to interpret.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::WireError;

mod field {
    use core::ops::Range;
    pub const SRC_PORT: Range<usize> = 0..2;
    pub const DST_PORT: Range<usize> = 2..4;
    pub const SEQ: Range<usize> = 4..8;
    pub const ACK: Range<usize> = 8..12;
    pub const DATA_OFF: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: Range<usize> = 14..16;
    pub const CHECKSUM: Range<usize> = 16..18;
}

/// Length of a TCP header without options.
pub const HEADER_LEN: usize = 20;

/// IP protocol number of TCP.
pub const PROTOCOL: u8 = 6;

/// Offset of the checksum field in the header: a virtio-net header's `csum_offset` for TCP.
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;

/// Flag: no more data from the sender.
pub const FIN: u8 = 0x01;
/// Flag: synchronise sequence numbers.
pub const SYN: u8 = 0x02;
/// Flag: reset the connection.
pub const RST: u8 = 0x04;
/// Flag: push the data to the application.
pub const PSH: u8 = 0x08;
/// Flag: the acknowledgment number is significant.
pub const ACK: u8 = 0x10;
/// Flag: the urgent pointer is significant.
pub const URG: u8 = 0x20;
/// Flag: ECN echo (RFC 3168).
pub const ECE: u8 = 0x40;
/// Flag: congestion window reduced (RFC 3168).
pub const CWR: u8 = 0x80;

/// A view of a TCP segment whose header length has been checked against the buffer.
#[derive(Debug)]
pub struct TcpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

#[allow(clippy::indexing_slicing)] // in bounds: the 20 bytes and data offset `new_checked` verified (mod.rs contract).
impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// Wraps a buffer the caller has already sized (at least [`HEADER_LEN`] bytes, and at
    /// least the header length its data offset claims).
    #[inline]
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Checks that the buffer holds a fixed header and the whole header its data offset
    /// claims.
    ///
    /// # Errors
    /// [`WireError::Truncated`] when the buffer is shorter than 20 bytes or than the data
    /// offset says; [`WireError::Malformed`] for a data offset below 5 (a header that would
    /// end before its own flags and checksum).
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let len = usize::from(b[field::DATA_OFF] >> 4) * 4;
        if len < HEADER_LEN {
            return Err(WireError::Malformed);
        }
        if len > b.len() {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    /// The wrapped buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    #[inline]
    fn be16(&self, r: core::ops::Range<usize>) -> u16 {
        let b = &self.buffer.as_ref()[r];
        u16::from_be_bytes([b[0], b[1]])
    }

    #[inline]
    fn be32(&self, r: core::ops::Range<usize>) -> u32 {
        let b = &self.buffer.as_ref()[r];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
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

    /// Sequence number.
    #[inline]
    pub fn seq(&self) -> u32 {
        self.be32(field::SEQ)
    }

    /// Acknowledgment number.
    #[inline]
    pub fn ack(&self) -> u32 {
        self.be32(field::ACK)
    }

    /// Header length in bytes, options included (the data offset × 4).
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::DATA_OFF] >> 4) * 4
    }

    /// The flag byte: [`FIN`], [`SYN`], … [`CWR`].
    #[inline]
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// Receive window.
    #[inline]
    pub fn window(&self) -> u16 {
        self.be16(field::WINDOW)
    }

    /// The stored checksum.
    #[inline]
    pub fn checksum(&self) -> u16 {
        self.be16(field::CHECKSUM)
    }

    /// Everything after the header. Empty, never a panic, should a `new_unchecked` buffer
    /// be shorter than its data offset claims.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        b.get(self.header_len()..).unwrap_or_default()
    }
}

#[allow(clippy::indexing_slicing)] // a checked segment, or a buffer the caller sized to `HEADER_LEN`.
impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    /// Sets the sequence number.
    #[inline]
    pub fn set_seq(&mut self, seq: u32) {
        self.buffer.as_mut()[field::SEQ].copy_from_slice(&seq.to_be_bytes());
    }

    /// Sets the flag byte.
    #[inline]
    pub fn set_flags(&mut self, flags: u8) {
        self.buffer.as_mut()[field::FLAGS] = flags;
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

    /// A TCP segment behind a 20-byte IPv4 header, with a timestamp-sized option block.
    fn segment() -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 1], 64)
            .tcp(40000, 5201, 1_000_000, 64240)
            .ack(7)
            .psh()
            .options(&[etherparse::TcpOptionElement::Noop, etherparse::TcpOptionElement::Noop])
            .unwrap()
            .write(&mut out, b"hello")
            .unwrap();
        out
    }

    #[test]
    fn reads_what_etherparse_wrote() {
        let pkt = segment();
        let t = TcpPacket::new_checked(&pkt[20..]).unwrap();
        let Some(TransportHeader::Tcp(e)) = PacketHeaders::from_ip_slice(&pkt).unwrap().transport else {
            panic!("tcp")
        };
        assert_eq!((t.src_port(), t.dst_port()), (40000, 5201));
        assert_eq!((t.seq(), t.ack(), t.window()), (1_000_000, 7, 64240));
        assert_eq!(t.header_len(), e.header_len());
        assert_eq!(t.header_len(), 24);
        assert_eq!(t.flags(), ACK | PSH);
        assert_eq!(t.checksum(), e.checksum);
        assert_eq!(t.payload(), b"hello");
    }

    #[test]
    fn setters_write_their_field_only() {
        let pkt = segment();
        let mut b = pkt[20..].to_vec();
        let mut t = TcpPacket::new_checked(&mut b[..]).unwrap();
        t.set_seq(0xdead_beef);
        t.set_flags(FIN | ACK);
        t.set_checksum(0x1234);
        assert_eq!((t.seq(), t.flags(), t.checksum()), (0xdead_beef, FIN | ACK, 0x1234));
        let changed: Vec<usize> = (0..b.len()).filter(|&i| b[i] != pkt[20 + i]).collect();
        assert!(changed.iter().all(|i| matches!(i, 4..=7 | 13 | 16..=17)), "{changed:?}");
    }

    #[test]
    fn refuses_short_buffers_and_lying_data_offsets() {
        let pkt = segment();
        let tcp = &pkt[20..];
        assert_eq!(TcpPacket::new_checked(&tcp[..19]).err(), Some(WireError::Truncated));
        assert_eq!(TcpPacket::new_checked(&tcp[..23]).err(), Some(WireError::Truncated), "options cut");
        assert!(TcpPacket::new_checked(&tcp[..24]).is_ok_and(|t| t.payload().is_empty()));
        for doff in 0..5u8 {
            let mut b = tcp.to_vec();
            b[12] = doff << 4;
            assert_eq!(TcpPacket::new_checked(&b[..]).err(), Some(WireError::Malformed), "doff {doff}");
        }
        let mut b = tcp.to_vec();
        b[12] = 0xf0;
        assert_eq!(TcpPacket::new_checked(&b[..]).err(), Some(WireError::Truncated), "doff 15 past the end");
    }

    /// Every buffer of up to 64 bytes whose data-offset byte takes each of its 16 values
    /// (the only byte `new_checked` reads), and every other byte a fuzzed value: whatever
    /// `new_checked` accepts, no accessor panics.
    #[test]
    fn no_accessor_panics_after_new_checked() {
        let mut seed = 0x9e37_79b9u32;
        for len in 0..=64usize {
            for doff in 0..16u8 {
                let mut b: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        seed as u8
                    })
                    .collect();
                if let Some(x) = b.get_mut(12) {
                    *x = (doff << 4) | (*x & 0x0f);
                }
                let Ok(mut t) = TcpPacket::new_checked(&mut b[..]) else {
                    assert!(len < 20 || usize::from(doff) * 4 > len || doff < 5);
                    continue;
                };
                let _ = (t.src_port(), t.dst_port(), t.seq(), t.ack(), t.flags(), t.window(), t.checksum());
                assert!(t.header_len() >= HEADER_LEN && t.header_len() + t.payload().len() == len);
                t.set_seq(1);
                t.set_flags(SYN | CWR | ECE | URG | RST);
                t.set_checksum(2);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(b in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            if let Ok(t) = TcpPacket::new_checked(&b[..]) {
                let _ = (t.seq(), t.ack(), t.flags(), t.checksum(), t.payload());
                proptest::prop_assert!(t.header_len() <= b.len());
            }
        }
    }
}
