//! Segmentation offload, sans-IO: the virtio-net header a TUN opened with `IFF_VNET_HDR`
//! puts in front of every packet, and the cut of a super-packet (up to 64 KiB, what the
//! kernel hands over with TSO/USO enabled) into segments with their headers fixed up, as
//! the kernel's own GSO does it:
//!
//! - IPv4: identification + i, total length, header checksum; IPv6: payload length;
//! - TCP: sequence number + i·MSS, FIN and PSH only on the last segment; UDP: length;
//! - a full L4 checksum per segment (the kernel left only the pseudo-header sum in the
//!   super-packet), because a kernel peer verifies it.
//!
//! Segments are written back to back at a fixed stride, each behind a copy of the
//! encapsulation header, so one UDP GSO send (`UDP_SEGMENT` = stride) carries the train.
//!
//! Arithmetic, under `clippy::arithmetic_side_effects`: lengths and offsets are bounded by
//! the 64 KiB packet, so they never overflow; they use `checked_*` where the check is the
//! validation itself and `saturating_*` elsewhere (a saturated offset fails the `get` that
//! follows, so even a broken invariant fails closed). Sequence numbers, IP identifications
//! and checksums are defined modulo 2^n by their RFCs, so they use `wrapping_*`.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::ops::Range;

use crate::stats::DropReason;
use crate::wire::ip::{IpFacts, IpPacket};
use crate::wire::ipv4::Ipv4Packet;
use crate::wire::ipv6::{self, Ipv6Packet};
use crate::wire::tcp::{self, TcpPacket};
use crate::wire::udp::{self, UdpPacket};
use crate::wire::{self, checksum};
// The virtio-net header lives with the other headers in `wire`; these paths stay for the
// drivers and tests that name them here.
pub use crate::wire::virtio_net::{F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VNET_HDR_LEN, VnetHdr};

/// Largest UDP payload one GSO send may carry (IPv4: 65 535 − 20 − 8).
pub const MAX_TRAIN_BYTES: usize = 65_507;
/// Most segments one GSO send may carry: 128 since Linux 6.9, 64 before; 64 works on both.
pub const MAX_TRAIN_SEGMENTS: usize = 64;

/// Why a packet from the TUN could not be segmented or completed.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum GsoError {
    /// The virtio-net header contradicts the packet (GSO type against IP version or
    /// protocol, `csum_start`, `csum_offset`, `gso_size` 0).
    Malformed,
    /// The super-packet's IP header is malformed: IHL below 5, a total length that is not
    /// the packet's, or a fragment (nothing the kernel's TSO/USO hands over).
    BadIpHeader,
    /// The super-packet's TCP header is malformed: a data offset below 5 (a header shorter
    /// than 20 bytes, whose flags and checksum the segments would be cut through) or one
    /// reaching past the packet.
    BadL4Header,
    /// A GSO type weft does not cut (ECN, unknown types).
    Unsupported,
    /// The output buffer cannot hold the segments.
    NoRoom,
}

impl GsoError {
    /// The drop reason a driver counts this under, so that a malformed super-packet is as
    /// visible in `weft status` as a malformed datagram.
    pub const fn reason(self) -> DropReason {
        match self {
            Self::BadIpHeader => DropReason::BadIpHeader,
            Self::BadL4Header => DropReason::BadL4Header,
            Self::Malformed | Self::Unsupported | Self::NoRoom => DropReason::BadOffload,
        }
    }
}

/// Checks a packet read from a TUN opened with `IFF_VNET_HDR` against its virtio-net header,
/// the one place both drivers do it: a super-packet (`gso_type` set) is checked for cutting
/// and its [`Segmentation`] returned; a single packet whose L4 checksum the kernel left
/// partial (`F_NEEDS_CSUM`) has it completed in place; anything else passes as it is.
///
/// # Errors
/// The [`GsoError`] naming what contradicts what; [`GsoError::reason`] is what to count.
pub fn check_read(hdr: &VnetHdr, ip: &mut [u8]) -> Result<Option<Segmentation>, GsoError> {
    if hdr.is_gso() {
        return Segmentation::parse(hdr, ip).map(Some);
    }
    if hdr.flags & F_NEEDS_CSUM != 0 {
        complete_checksum(ip, usize::from(hdr.csum_start), usize::from(hdr.csum_offset))?;
    }
    Ok(None)
}

/// Completes a partial L4 checksum in place: the field at `csum_start + csum_offset` holds
/// the pseudo-header sum; the result covers everything from `csum_start` to the end.
///
/// # Errors
/// [`GsoError::Malformed`] when the offsets fall outside the packet.
pub fn complete_checksum(pkt: &mut [u8], csum_start: usize, csum_offset: usize) -> Result<(), GsoError> {
    let field = csum_start.checked_add(csum_offset).ok_or(GsoError::Malformed)?;
    if wire::bytes::<2>(pkt, field).is_none() {
        return Err(GsoError::Malformed);
    }
    let c = checksum::checksum(pkt.get(csum_start..).ok_or(GsoError::Malformed)?);
    wire::set_be16(pkt, field, c).ok_or(GsoError::Malformed)
}

/// A super-packet read from the TUN, checked against its virtio-net header: where its
/// headers end and how it is cut.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Segmentation {
    /// The super-packet's IP header, parsed once here and used by the forwarder too.
    ip: IpFacts,
    tcp: bool,
    /// IP + L4 header length, copied in front of every segment.
    hdrs: usize,
    /// Payload bytes per segment.
    mss: usize,
    /// Payload bytes in the super-packet.
    payload: usize,
}

impl Segmentation {
    /// Checks the super-packet `ip` (IP header first, as read after the virtio-net header)
    /// against `hdr`. `hdr_len` is never trusted: header lengths are recomputed from the
    /// packet.
    ///
    /// # Errors
    /// [`GsoError::Malformed`] when the header and the packet disagree,
    /// [`GsoError::Unsupported`] for GSO types weft does not cut.
    pub fn parse(hdr: &VnetHdr, ip: &[u8]) -> Result<Self, GsoError> {
        let version = ip.first().map(|b| b >> 4);
        let tcp = match (hdr.gso_type, version) {
            (GSO_TCPV4, Some(4)) | (GSO_TCPV6, Some(6)) => true,
            (GSO_UDP_L4, Some(4 | 6)) => false,
            (GSO_TCPV4 | GSO_TCPV6, _) | (GSO_UDP_L4, _) => return Err(GsoError::Malformed),
            _ => return Err(GsoError::Unsupported),
        };
        // The kernel's TSO/USO hands over a whole packet (total length = what was read) that
        // is not a fragment; the version now matches the GSO type, so any refusal of the
        // IP view is the IP header's fault.
        let facts = IpPacket::new_checked(ip).map_err(|_| GsoError::BadIpHeader)?.facts();
        if facts.total_len != ip.len() || facts.fragment {
            return Err(GsoError::BadIpHeader);
        }
        let l4 = facts.header_len;
        let (want_proto, csum_offset) =
            if tcp { (tcp::PROTOCOL, tcp::CHECKSUM_OFFSET) } else { (udp::PROTOCOL, udp::CHECKSUM_OFFSET) };
        if facts.protocol != want_proto
            || usize::from(hdr.csum_start) != l4
            || usize::from(hdr.csum_offset) != csum_offset
        {
            return Err(GsoError::Malformed);
        }
        let l4_bytes = ip.get(l4..).ok_or(GsoError::BadIpHeader)?;
        let l4_len = if tcp {
            // The data offset comes from the packet: below 5 the "header" would end before the
            // flags and the checksum that every segment's header gets written into.
            TcpPacket::new_checked(l4_bytes).map_err(|_| GsoError::BadL4Header)?.header_len()
        } else {
            UdpPacket::new_checked_header(l4_bytes).map_err(|_| GsoError::BadIpHeader)?;
            udp::HEADER_LEN
        };
        let payload = l4_bytes.len().saturating_sub(l4_len);
        let mss = usize::from(hdr.gso_size);
        if mss == 0 {
            return Err(GsoError::Malformed);
        }
        Ok(Self { ip: facts, tcp, hdrs: l4.saturating_add(l4_len), mss, payload })
    }

    /// The super-packet's IP header, as [`parse`](Self::parse) read it.
    pub fn ip(&self) -> &IpFacts {
        &self.ip
    }

    /// How many segments the super-packet makes (at least one).
    pub fn segments(&self) -> usize {
        // `mss` ≥ 1 since `parse`; the `max` keeps even a default-built value from dividing by 0.
        self.payload.div_ceil(self.mss.max(1)).max(1)
    }

    /// Length of the largest segment (headers + MSS), the size checked against the path MTU.
    pub fn segment_len(&self) -> usize {
        self.hdrs.saturating_add(self.mss.min(self.payload.max(1)))
    }

    /// IP + L4 header bytes, repeated in every segment.
    pub fn headers_len(&self) -> usize {
        self.hdrs
    }

    /// Bytes the segments add up to (each carries its own headers).
    pub fn wire_bytes(&self) -> usize {
        self.payload.saturating_add(self.segments().saturating_mul(self.hdrs))
    }

    /// How many segments of `prefix + segment_len()` bytes fit one GSO send.
    pub fn segments_per_train(&self, prefix: usize) -> usize {
        let stride = prefix.saturating_add(self.hdrs).saturating_add(self.mss);
        MAX_TRAIN_BYTES.checked_div(stride).unwrap_or(1).clamp(1, MAX_TRAIN_SEGMENTS)
    }

    /// Where segment `i`'s payload lies in `pkt` (the super-packet behind `prefix` bytes of
    /// encapsulation header).
    fn chunk(&self, prefix: usize, i: usize) -> Range<usize> {
        let base = prefix.saturating_add(self.hdrs);
        let from = i.saturating_mul(self.mss).min(self.payload);
        let to = i.saturating_add(1).saturating_mul(self.mss).min(self.payload);
        base.saturating_add(from)..base.saturating_add(to)
    }

    /// Writes segments `range` of `pkt` back to back into `out`. `pkt` is the super-packet
    /// behind `prefix` bytes of encapsulation header, which is copied in front of every
    /// segment; the stride is `prefix + segment_len()`, only the last segment of the
    /// super-packet may be shorter. Returns the bytes written.
    ///
    /// The payload is copied rather than sent scatter-gather from where it was read: tried,
    /// the kernel's copy out of the colder read buffer then cost what the copy here saved.
    ///
    /// # Errors
    /// [`GsoError::NoRoom`] when `out` is too small, [`GsoError::Malformed`] when `range`
    /// is outside the packet.
    pub fn write_segments(
        &self,
        pkt: &[u8],
        prefix: usize,
        range: Range<usize>,
        out: &mut [u8],
    ) -> Result<usize, GsoError> {
        self.write_segments_with_room(pkt, prefix, 0, range, out)
    }

    /// [`write_segments`](Self::write_segments), leaving `room` bytes (not written) behind
    /// every segment, for a trailer the format seals into it (WireGuard's tag). The stride is
    /// then `prefix + segment_len() + room`.
    ///
    /// # Errors
    /// As [`write_segments`](Self::write_segments).
    pub fn write_segments_with_room(
        &self,
        pkt: &[u8],
        prefix: usize,
        room: usize,
        range: Range<usize>,
        out: &mut [u8],
    ) -> Result<usize, GsoError> {
        let h = prefix.saturating_add(self.hdrs);
        let mut rest = out;
        let mut written = 0usize;
        for i in self.checked(pkt, prefix, &range)? {
            let chunk = pkt.get(self.chunk(prefix, i)).ok_or(GsoError::Malformed)?;
            let seg_len = h.saturating_add(chunk.len());
            let (seg, tail) =
                std::mem::take(&mut rest).split_at_mut_checked(seg_len.saturating_add(room)).ok_or(GsoError::NoRoom)?;
            let (seg, _room) = seg.split_at_mut_checked(seg_len).ok_or(GsoError::NoRoom)?;
            let (head, body) = seg.split_at_mut_checked(h).ok_or(GsoError::NoRoom)?;
            self.write_header(pkt, prefix, i, head).ok_or(GsoError::Malformed)?;
            // `body` is `seg_len - h` = `chunk.len()` bytes: the copy cannot mismatch.
            body.copy_from_slice(chunk);
            written = written.saturating_add(seg_len).saturating_add(room);
            rest = tail;
        }
        Ok(written)
    }

    /// The L4 checksum of a segment: pseudo-header, its header (checksum field zeroed), its
    /// payload. L4 headers have even length, so the payload's sum chains on.
    fn l4_checksum(&self, l4_hdr: &[u8], l4_len: usize, payload: &[u8]) -> u16 {
        checksum::fold(checksum::sum(checksum::sum(self.ip.pseudo_sum(l4_len), l4_hdr), payload))
    }

    /// `range` after checking it, and `pkt`, against what [`parse`](Self::parse) saw.
    fn checked(&self, pkt: &[u8], prefix: usize, range: &Range<usize>) -> Result<Range<usize>, GsoError> {
        let ip_len = pkt.len().checked_sub(prefix).ok_or(GsoError::Malformed)?;
        if ip_len != self.hdrs.saturating_add(self.payload) || range.end > self.segments() || range.start >= range.end {
            return Err(GsoError::Malformed);
        }
        Ok(range.clone())
    }

    /// Writes segment `i`'s header (`prefix` + IP + L4) into `out`, which is exactly
    /// `prefix + headers_len()` bytes, checksummed together with its payload. `None` when
    /// `pkt` or `out` is not what [`parse`](Self::parse) and the caller promised.
    fn write_header(&self, pkt: &[u8], prefix: usize, i: usize, out: &mut [u8]) -> Option<()> {
        let chunk = pkt.get(self.chunk(prefix, i))?;
        let src = pkt.get(..prefix.checked_add(self.hdrs)?)?;
        (src.len() == out.len()).then_some(())?;
        out.copy_from_slice(src);
        let (ip_hdr, l4_hdr) = out.get_mut(prefix..)?.split_at_mut_checked(self.ip.header_len)?;
        let ip_len = self.hdrs.checked_add(chunk.len())?;
        let l4_len = ip_len.checked_sub(self.ip.header_len)?;
        if self.ip.is_v6() {
            let payload_len = u16::try_from(ip_len.checked_sub(ipv6::HEADER_LEN)?).ok()?;
            Ipv6Packet::new_checked_header(ip_hdr).ok()?.set_payload_len(payload_len);
        } else {
            let mut h = Ipv4Packet::new_checked_header(ip_hdr).ok()?;
            // The identification counts up per segment, modulo 2^16 (RFC 6864).
            let id = h.ident().wrapping_add(i as u16);
            h.set_total_len(u16::try_from(ip_len).ok()?);
            h.set_ident(id);
            h.fill_checksum();
        }
        if self.tcp {
            let mut t = TcpPacket::new_checked(&mut *l4_hdr).ok()?;
            // Sequence numbers are modulo 2^32 (RFC 9293 §3.4).
            t.set_seq(t.seq().wrapping_add(i.wrapping_mul(self.mss) as u32));
            // FIN and PSH belong to the last segment only.
            if i.checked_add(1)? != self.segments() {
                t.set_flags(t.flags() & !(tcp::FIN | tcp::PSH));
            }
            t.set_checksum(0);
            let c = self.l4_checksum(l4_hdr, l4_len, chunk);
            TcpPacket::new_unchecked(l4_hdr).set_checksum(c);
        } else {
            let mut u = UdpPacket::new_checked_header(&mut *l4_hdr).ok()?;
            u.set_len(u16::try_from(l4_len).ok()?);
            u.set_checksum(0);
            let c = match self.l4_checksum(l4_hdr, l4_len, chunk) {
                0 => 0xffff, // RFC 768: a computed zero is sent as all ones.
                c => c,
            };
            UdpPacket::new_unchecked(l4_hdr).set_checksum(c);
        }
        Some(())
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, PacketHeaders, TransportHeader};

    fn super_packet(v6: bool, payload: usize, fin: bool) -> Vec<u8> {
        let b = if v6 {
            PacketBuilder::ipv6(
                [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
                [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                64,
            )
        } else {
            PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 1], 64)
        };
        let mut b = b.tcp(40000, 5201, 1_000_000, 64240).ack(7).psh();
        if fin {
            b = b.fin();
        }
        let data: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        b.write(&mut out, &data).unwrap();
        out
    }

    fn udp_super_packet(v6: bool, payload: usize) -> Vec<u8> {
        let b = if v6 {
            PacketBuilder::ipv6([0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5], [0xfd; 16], 64)
        } else {
            PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 1], 64)
        };
        let data: Vec<u8> = (0..payload).map(|i| (i % 253) as u8).collect();
        let mut out = Vec::new();
        b.udp(4433, 443).write(&mut out, &data).unwrap();
        out
    }

    /// Cuts `pkt` behind a 22-byte prefix into trains and checks every segment.
    fn cut_and_check(hdr: &VnetHdr, pkt: &[u8], tcp: bool) -> usize {
        let prefix = [0xeeu8; 22];
        let mut framed = prefix.to_vec();
        framed.extend_from_slice(pkt);
        let seg = Segmentation::parse(hdr, pkt).unwrap();
        let per_train = seg.segments_per_train(prefix.len());
        let stride = prefix.len() + seg.segment_len();
        let mut data = Vec::new();
        let mut first = 0;
        while first < seg.segments() {
            let range = first..(first + per_train).min(seg.segments());
            let mut out = vec![0u8; 70_000];
            let n = seg.write_segments(&framed, prefix.len(), range.clone(), &mut out).unwrap();
            assert!(n <= MAX_TRAIN_BYTES && range.len() <= MAX_TRAIN_SEGMENTS);
            for (k, i) in range.clone().enumerate() {
                let start = k * stride;
                let end = if i + 1 == seg.segments() { n } else { start + stride };
                assert_eq!(&out[start..start + 22], &prefix, "prefix of segment {i}");
                let h = PacketHeaders::from_ip_slice(&out[start + 22..end]).unwrap();
                let (l4_ok, payload) = match (&h.net, h.transport.clone()) {
                    (Some(etherparse::NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Tcp(t))) => {
                        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
                        let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
                        assert_eq!(ip.identification, id0.wrapping_add(i as u16), "seg {i}");
                        assert_eq!(t.sequence_number, 1_000_000 + (i * usize::from(hdr.gso_size)) as u32);
                        let (last, fin) = (i + 1 == seg.segments(), pkt[33] & 1 == 1);
                        assert_eq!((t.fin, t.psh), (last && fin, last), "seg {i}");
                        (t.checksum == t.calc_checksum_ipv4(ip, h.payload.slice()).unwrap(), h.payload.slice())
                    }
                    (Some(etherparse::NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Tcp(t))) => {
                        (t.checksum == t.calc_checksum_ipv6(ip, h.payload.slice()).unwrap(), h.payload.slice())
                    }
                    (Some(etherparse::NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Udp(u))) => {
                        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
                        (u.checksum == u.calc_checksum_ipv4(ip, h.payload.slice()).unwrap(), h.payload.slice())
                    }
                    (Some(etherparse::NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Udp(u))) => {
                        (u.checksum == u.calc_checksum_ipv6(ip, h.payload.slice()).unwrap(), h.payload.slice())
                    }
                    other => panic!("unexpected segment {other:?}"),
                };
                assert!(l4_ok, "l4 checksum of segment {i} (tcp={tcp})");
                data.extend_from_slice(payload);
            }
            first = range.end;
        }
        assert_eq!(data, pkt[seg.headers_len()..], "payload reassembles");
        seg.segments()
    }

    #[test]
    fn cuts_tcp_and_udp_super_packets_into_valid_trains() {
        for v6 in [false, true] {
            let l4 = if v6 { 40 } else { 20 };
            let tcp = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                hdr_len: 0xffff, // lies: must not be trusted
                gso_size: 1448,
                csum_start: l4,
                csum_offset: 16,
            };
            assert_eq!(cut_and_check(&tcp, &super_packet(v6, 3500, true), true), 3);
            // A full 64 KiB super-packet needs two trains (65 507-byte limit).
            let big = super_packet(v6, 65_535 - 20 - usize::from(l4), false);
            assert_eq!(cut_and_check(&tcp, &big, true), (65_535 - 20 - usize::from(l4)).div_ceil(1448));
            // Tiny MSS: many trains, none above 64 segments.
            assert_eq!(cut_and_check(&VnetHdr { gso_size: 100, ..tcp }, &super_packet(v6, 9000, false), true), 90);
            let udp = VnetHdr { gso_type: GSO_UDP_L4, csum_offset: 6, gso_size: 1200, ..tcp };
            assert_eq!(cut_and_check(&udp, &udp_super_packet(v6, 5000), false), 5);
        }
    }

    #[test]
    fn refuses_lies_and_small_buffers() {
        let pkt = super_packet(false, 3000, false);
        let good =
            VnetHdr { flags: 1, gso_type: GSO_TCPV4, hdr_len: 40, gso_size: 1000, csum_start: 20, csum_offset: 16 };
        let cases = [
            ("ecn gso", VnetHdr { gso_type: 0x81, ..good }, GsoError::Unsupported),
            ("udp type on tcp", VnetHdr { gso_type: GSO_UDP_L4, csum_offset: 6, ..good }, GsoError::Malformed),
            ("v6 type on v4", VnetHdr { gso_type: GSO_TCPV6, ..good }, GsoError::Malformed),
            ("csum_start off", VnetHdr { csum_start: 24, ..good }, GsoError::Malformed),
            ("csum_offset off", VnetHdr { csum_offset: 6, ..good }, GsoError::Malformed),
            ("mss 0", VnetHdr { gso_size: 0, ..good }, GsoError::Malformed),
        ];
        for (name, h, want) in cases {
            assert_eq!(Segmentation::parse(&h, &pkt).err(), Some(want), "{name}");
        }
        assert_eq!(Segmentation::parse(&good, &pkt[..30]).err(), Some(GsoError::BadIpHeader), "truncated");
        let seg = Segmentation::parse(&good, &pkt).unwrap();
        let mut out = vec![0u8; 2000];
        assert_eq!(seg.write_segments(&pkt, 0, 0..3, &mut out).err(), Some(GsoError::NoRoom));
        assert_eq!(seg.write_segments(&pkt, 0, 2..9, &mut out).err(), Some(GsoError::Malformed));
        assert_eq!(seg.write_segments(&pkt, 0, 3..3, &mut out).err(), Some(GsoError::Malformed));
    }

    /// A TCP data offset below 5 claims a header shorter than 20 bytes: the segments' flags
    /// and checksum would be written past the header copy. It used to be accepted (offsets
    /// 2 to 4 passed the old `l4_len < 8` test) and `write_segments` then panicked.
    #[test]
    fn refuses_tcp_data_offset_below_five() {
        let good =
            VnetHdr { flags: 1, gso_type: GSO_TCPV4, hdr_len: 40, gso_size: 1000, csum_start: 20, csum_offset: 16 };
        for v6 in [false, true] {
            let l4 = if v6 { 40 } else { 20 };
            let hdr = VnetHdr { gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 }, csum_start: l4, ..good };
            for doff in 0..5u8 {
                let mut pkt = super_packet(v6, 3000, false);
                let at = usize::from(l4) + 12;
                pkt[at] = (doff << 4) | (pkt[at] & 0x0f);
                let mut out = vec![0u8; 70_000];
                match Segmentation::parse(&hdr, &pkt) {
                    Err(e) => assert_eq!((e, e.reason()), (GsoError::BadL4Header, DropReason::BadL4Header)),
                    Ok(seg) => {
                        let cut = seg.write_segments(&pkt, 0, 0..seg.segments(), &mut out);
                        panic!("v6={v6} data offset {doff} accepted (cut: {cut:?})");
                    }
                }
            }
            // A data offset reaching past the packet is refused the same way.
            let mut pkt = super_packet(v6, 0, false);
            pkt[usize::from(l4) + 12] = 0xf0;
            assert_eq!(Segmentation::parse(&hdr, &pkt).err(), Some(GsoError::BadL4Header), "v6={v6}");
        }
    }

    /// Every other length or offset taken from the packet or the virtio-net header, each
    /// refused with the error (and so the drop reason) naming it.
    #[test]
    fn refuses_every_length_and_offset_that_lies() {
        let pkt = super_packet(false, 3000, false);
        let good =
            VnetHdr { flags: 1, gso_type: GSO_TCPV4, hdr_len: 40, gso_size: 1000, csum_start: 20, csum_offset: 16 };
        type Case = (&'static str, fn(&mut Vec<u8>), GsoError);
        let cases: &[Case] = &[
            ("ihl 4", |p| p[0] = 0x44, GsoError::BadIpHeader),
            ("ihl 0", |p| p[0] = 0x40, GsoError::BadIpHeader),
            ("ihl against csum_start", |p| p[0] = 0x4f, GsoError::Malformed),
            ("total length short", |p| p[3] = p[3].wrapping_sub(1), GsoError::BadIpHeader),
            ("total length long", |p| p.truncate(p.len() - 1), GsoError::BadIpHeader),
            ("more fragments", |p| p[6] |= 0x20, GsoError::BadIpHeader),
            ("fragment offset", |p| p[7] = 1, GsoError::BadIpHeader),
            ("not tcp", |p| p[9] = 17, GsoError::Malformed),
            ("empty", Vec::clear, GsoError::Malformed),
        ];
        for (name, mutate, want) in cases {
            let mut p = pkt.clone();
            mutate(&mut p);
            assert_eq!(Segmentation::parse(&good, &p).err(), Some(*want), "{name}");
        }
        // An IHL past the end of a (short) packet.
        let mut p = super_packet(false, 0, false);
        p[0] = 0x4f;
        assert_eq!(Segmentation::parse(&VnetHdr { csum_start: 60, ..good }, &p).err(), Some(GsoError::BadIpHeader));
        // IPv6: the payload length must be the packet's; a UDP header must fit.
        let v6 = VnetHdr { gso_type: GSO_UDP_L4, csum_start: 40, csum_offset: 6, ..good };
        let mut p = udp_super_packet(true, 3000);
        p[5] ^= 1;
        assert_eq!(Segmentation::parse(&v6, &p).err(), Some(GsoError::BadIpHeader));
        let mut p = udp_super_packet(true, 0);
        p.truncate(44);
        p[4..6].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(Segmentation::parse(&v6, &p).err(), Some(GsoError::BadIpHeader), "udp header cut short");
        assert_eq!(GsoError::Malformed.reason(), DropReason::BadOffload);
    }

    /// The drivers' one entry point: super-packets are parsed, partial checksums completed
    /// with offsets checked against the packet, everything else passed through.
    #[test]
    fn check_read_dispatches_on_the_header() {
        let mut pkt = super_packet(false, 3000, false);
        let gso =
            VnetHdr { flags: 1, gso_type: GSO_TCPV4, hdr_len: 0, gso_size: 1000, csum_start: 20, csum_offset: 16 };
        assert_eq!(check_read(&gso, &mut pkt).map(|s| s.map(|s| s.segments())), Ok(Some(3)));
        let plain = VnetHdr::default();
        assert_eq!(check_read(&plain, &mut pkt), Ok(None));
        let len = u16::try_from(pkt.len()).unwrap();
        for (csum_start, csum_offset) in [(len, 0), (len - 1, 0), (20, len), (u16::MAX, u16::MAX)] {
            let partial = VnetHdr { flags: F_NEEDS_CSUM, csum_start, csum_offset, ..plain };
            assert_eq!(check_read(&partial, &mut pkt), Err(GsoError::Malformed), "{csum_start}+{csum_offset}");
        }
        let partial = VnetHdr { flags: F_NEEDS_CSUM, csum_start: 20, csum_offset: 16, ..plain };
        assert_eq!(check_read(&partial, &mut pkt), Ok(None));
    }

    #[test]
    fn vnet_header_round_trips_and_completes_partial_checksums() {
        let h = VnetHdr { flags: 1, gso_type: 1, hdr_len: 52, gso_size: 1448, csum_start: 20, csum_offset: 16 };
        let mut b = [0u8; VNET_HDR_LEN];
        h.emit(&mut b);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
        // A small packet with only the pseudo-header sum in its checksum field is completed.
        let mut pkt = super_packet(false, 100, false);
        let full = pkt.clone();
        let (ip, _) = etherparse::Ipv4Header::from_slice(&pkt).unwrap();
        let l4_len = (pkt.len() - 20) as u16;
        let pseudo = checksum::sum(checksum::sum(checksum::sum(0, &ip.source), &ip.destination), &[0, 6]);
        let partial = !checksum::fold(checksum::sum(pseudo, &l4_len.to_be_bytes()));
        pkt[36..38].copy_from_slice(&partial.to_be_bytes());
        complete_checksum(&mut pkt, 20, 16).unwrap();
        assert_eq!(pkt, full);
        assert_eq!(complete_checksum(&mut pkt, 200, 16), Err(GsoError::Malformed));
    }
}
