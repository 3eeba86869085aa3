//! IPv4 header view (RFC 791), with the in-place TTL decrement flannel performs.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::net::Ipv4Addr;

use super::WireError;
use super::checksum;

mod field {
    use core::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const TOS: usize = 1;
    pub const LENGTH: Range<usize> = 2..4;
    pub const IDENT: Range<usize> = 4..6;
    pub const FLG_OFF: Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Range<usize> = 10..12;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
}

/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;

/// A view of an IPv4 packet whose header and total length have been checked.
#[derive(Debug)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

#[allow(clippy::indexing_slicing)] // in bounds: the IHL and total length `new_checked` verified (mod.rs contract).
impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wraps a buffer the caller has already sized (at least [`HEADER_LEN`] bytes).
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Checks version and header length against the buffer, not the total length: for a
    /// header being written ahead of its payload (segmentation and coalescing build their
    /// headers apart from the bytes they describe).
    ///
    /// # Errors
    /// [`WireError::Truncated`] when the buffer is shorter than the header,
    /// [`WireError::Malformed`] for a version other than 4 or a header below 20 bytes.
    pub fn new_checked_header(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        let ihl = match b.first() {
            Some(v) if v >> 4 != 4 || usize::from(v & 0x0f) * 4 < HEADER_LEN => return Err(WireError::Malformed),
            Some(v) => usize::from(v & 0x0f) * 4,
            None => return Err(WireError::Truncated),
        };
        if ihl > b.len() {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    /// Checks version, header length and total length against the buffer.
    ///
    /// # Errors
    /// [`WireError::Truncated`] when the buffer is shorter than the header or than the total
    /// length field; [`WireError::Malformed`] for a version other than 4, a header length
    /// below 20 bytes, or a total length shorter than the header.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let ver = b[field::VER_IHL] >> 4;
        let ihl = usize::from(b[field::VER_IHL] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([b[2], b[3]]));
        if ver != 4 || ihl < HEADER_LEN || total < ihl {
            return Err(WireError::Malformed);
        }
        if ihl > b.len() || total > b.len() {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    /// Header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    /// The total length field: header plus payload, in bytes.
    pub fn total_len(&self) -> usize {
        let b = self.buffer.as_ref();
        usize::from(u16::from_be_bytes([b[field::LENGTH.start], b[field::LENGTH.start + 1]]))
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// The payload's IP protocol number.
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[12], b[13], b[14], b[15])
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[16], b[17], b[18], b[19])
    }

    fn flags_offset(&self) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[field::FLG_OFF.start], b[field::FLG_OFF.start + 1]])
    }

    /// The don't-fragment flag: the sender asks for ICMP frag-needed rather than fragmentation.
    pub fn dont_frag(&self) -> bool {
        self.flags_offset() & 0x4000 != 0
    }

    /// Whether this is a fragment: more-fragments set or a non-zero offset.
    pub fn is_fragment(&self) -> bool {
        self.flags_offset() & 0x3fff != 0
    }

    /// The identification field (RFC 6864).
    pub fn ident(&self) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[field::IDENT.start], b[field::IDENT.start + 1]])
    }

    /// Fragment offset in bytes; non-zero for every fragment but the first.
    pub fn frag_offset(&self) -> usize {
        usize::from(self.flags_offset() & 0x1fff) * 8
    }

    /// The stored header checksum.
    pub fn header_checksum(&self) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[field::CHECKSUM.start], b[field::CHECKSUM.start + 1]])
    }

    /// Whether the header checksum is correct.
    pub fn verify_checksum(&self) -> bool {
        checksum::checksum(&self.buffer.as_ref()[..self.header_len()]) == 0
    }

    /// The payload, from the end of the header to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..self.total_len()]
    }
}

#[allow(clippy::indexing_slicing)] // a checked packet, or a buffer the caller sized to `HEADER_LEN`.
impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Decrements the TTL and patches the header checksum incrementally (RFC 1624), as
    /// flannel's `proxy_amd64.c` does on both sides of its udp backend.
    ///
    /// Returns the new TTL; 0 means the packet must be dropped.
    pub fn decrement_ttl(&mut self) -> u8 {
        let ttl = self.ttl();
        let Some(new_ttl) = ttl.checked_sub(1) else { return 0 };
        let proto = self.protocol();
        let old_check = self.header_checksum();
        let b = self.buffer.as_mut();
        let old_word = u16::from_be_bytes([ttl, proto]);
        let new_word = u16::from_be_bytes([new_ttl, proto]);
        let new_check = checksum::update(old_check, old_word, new_word);
        b[field::TTL] = new_ttl;
        b[field::CHECKSUM].copy_from_slice(&new_check.to_be_bytes());
        new_ttl
    }

    /// Sets the total length field (the checksum is left to [`fill_checksum`](Self::fill_checksum)).
    pub fn set_total_len(&mut self, len: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&len.to_be_bytes());
    }

    /// Sets the identification field (the checksum is left to [`fill_checksum`](Self::fill_checksum)).
    pub fn set_ident(&mut self, ident: u16) {
        self.buffer.as_mut()[field::IDENT].copy_from_slice(&ident.to_be_bytes());
    }

    /// Recomputes the header checksum over the header, options included.
    pub fn fill_checksum(&mut self) {
        let len = self.header_len();
        let b = self.buffer.as_mut();
        b[field::CHECKSUM].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&b[..len]);
        b[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }

    /// Writes a 20-byte header without options and fills in its checksum.
    pub fn emit_header(&mut self, h: &Ipv4Header) {
        let b = self.buffer.as_mut();
        b[field::VER_IHL] = 0x45;
        b[field::TOS] = h.tos;
        b[field::LENGTH].copy_from_slice(&h.total_len.to_be_bytes());
        b[field::IDENT].copy_from_slice(&[0, 0]);
        b[field::FLG_OFF].copy_from_slice(&(if h.dont_frag { 0x4000u16 } else { 0 }).to_be_bytes());
        b[field::TTL] = h.ttl;
        b[field::PROTOCOL] = h.protocol;
        b[field::CHECKSUM].copy_from_slice(&[0, 0]);
        b[field::SRC].copy_from_slice(&h.src.octets());
        b[field::DST].copy_from_slice(&h.dst.octets());
        let c = checksum::checksum(&b[..HEADER_LEN]);
        b[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }
}

/// The fields weft sets when it writes an IPv4 header of its own (ICMP errors).
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Header {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Payload protocol.
    pub protocol: u8,
    /// Time to live.
    pub ttl: u8,
    /// Type of service byte.
    pub tos: u8,
    /// Header plus payload, in bytes.
    pub total_len: u16,
    /// Set the don't-fragment flag.
    pub dont_frag: bool,
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    /// An ICMP echo request 10.244.1.1 → 10.244.2.1 with DF and TTL 64, laid out as Linux
    /// `ping` sends it (id and sequence zeroed); checksums computed independently.
    const ECHO: [u8; 28] = [
        0x45, 0x00, 0x00, 0x1c, 0x5c, 0x1d, 0x40, 0x00, 0x40, 0x01, 0xc5, 0xda, 0x0a, 0xf4, 0x01, 0x01, 0x0a, 0xf4,
        0x02, 0x01, 0x08, 0x00, 0xf7, 0xff, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn parses_fields() {
        let p = Ipv4Packet::new_checked(&ECHO[..]).unwrap();
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 28);
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), PROTO_ICMP);
        assert_eq!(p.src(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(p.dst(), Ipv4Addr::new(10, 244, 2, 1));
        assert!(p.dont_frag());
        assert_eq!(p.frag_offset(), 0);
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn rejects_bad_headers() {
        type Case = (&'static str, fn(&mut Vec<u8>), WireError);
        let cases: &[Case] = &[
            ("short", |b| b.truncate(19), WireError::Truncated),
            ("version 6", |b| b[0] = 0x65, WireError::Malformed),
            ("ihl 4", |b| b[0] = 0x44, WireError::Malformed),
            ("ihl beyond buffer", |b| b[0] = 0x4f, WireError::Malformed),
            ("total below ihl", |b| b[2..4].copy_from_slice(&19u16.to_be_bytes()), WireError::Malformed),
            ("total beyond buffer", |b| b[2..4].copy_from_slice(&29u16.to_be_bytes()), WireError::Truncated),
        ];
        for (name, mutate, want) in cases {
            let mut b = ECHO.to_vec();
            mutate(&mut b);
            assert_eq!(Ipv4Packet::new_checked(&b[..]).err(), Some(*want), "{name}");
        }
    }

    #[test]
    fn ihl_with_options_beyond_total_is_malformed_not_panic() {
        let mut b = ECHO.to_vec();
        b[0] = 0x47; // 28-byte header == total length: legal, empty payload
        let p = Ipv4Packet::new_checked(&b[..]).unwrap();
        assert!(p.payload().is_empty());
    }

    #[test]
    fn a_header_alone_is_checked_and_its_setters_keep_it_valid() {
        let mut h = ECHO[..20].to_vec();
        assert!(Ipv4Packet::new_checked(&h[..]).is_err(), "the total length reaches past a bare header");
        let mut p = Ipv4Packet::new_checked_header(&mut h[..]).unwrap();
        assert!(!p.is_fragment());
        p.set_total_len(1500);
        p.set_ident(p.ident().wrapping_add(1));
        p.fill_checksum();
        assert_eq!((p.total_len(), p.ident()), (1500, 0x5c1e));
        assert!(p.verify_checksum());
        assert_eq!(Ipv4Packet::new_checked_header(&ECHO[..19]).err(), Some(WireError::Truncated));
        assert_eq!(Ipv4Packet::new_checked_header(&[][..]).err(), Some(WireError::Truncated));
        let mut b = ECHO.to_vec();
        b[0] = 0x44;
        assert_eq!(Ipv4Packet::new_checked_header(&b[..]).err(), Some(WireError::Malformed));
        b[0] = 0x46;
        assert_eq!(Ipv4Packet::new_checked_header(&b[..20]).err(), Some(WireError::Truncated), "options cut");
        b[6] = 0x20;
        assert!(Ipv4Packet::new_checked_header(&b[..]).unwrap().is_fragment());
    }

    #[test]
    fn decrement_ttl_keeps_checksum_valid() {
        let mut b = ECHO;
        let mut p = Ipv4Packet::new_checked(&mut b[..]).unwrap();
        for expect in (0..64).rev() {
            assert_eq!(p.decrement_ttl(), expect);
            assert!(p.verify_checksum(), "ttl {expect}");
        }
        assert_eq!(p.decrement_ttl(), 0);
    }

    #[test]
    fn emitted_header_parses_with_etherparse() {
        let mut b = [0u8; 28];
        let h = Ipv4Header {
            src: Ipv4Addr::new(10, 244, 1, 1),
            dst: Ipv4Addr::new(10, 244, 1, 7),
            protocol: PROTO_ICMP,
            ttl: 64,
            tos: 0xc0,
            total_len: 28,
            dont_frag: false,
        };
        Ipv4Packet::new_unchecked(&mut b[..]).emit_header(&h);
        let (parsed, _) = etherparse::Ipv4Header::from_slice(&b).unwrap();
        assert_eq!(parsed.source, [10, 244, 1, 1]);
        assert_eq!(parsed.header_checksum, parsed.calc_header_checksum());
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(b in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            if let Ok(p) = Ipv4Packet::new_checked(&b[..]) {
                let _ = (p.src(), p.dst(), p.ttl(), p.payload(), p.verify_checksum(), p.frag_offset());
                proptest::prop_assert!(p.total_len() <= b.len());
            }
        }
    }
}
