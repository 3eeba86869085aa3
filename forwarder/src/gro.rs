//! Coalescing, sans-IO: consecutive TCP segments of one flow, decapsulated from the
//! underlay and checked by the forwarder, merged back into one super-packet that the driver
//! writes to the TUN behind a virtio-net header — one write instead of dozens
//! (bench/README.md has the figures). Where the TUN takes USO (Linux ≥ 6.2), equal-sized UDP
//! datagrams of one flow are merged the same way (the kernel's UDP GRO rules: same
//! addresses and ports, same size but a shorter last one, at most 64), which is what makes
//! small-packet floods cheap.
//!
//! The merge rules follow the kernel's own TCP GRO (as wireguard-go's do): same addresses,
//! ports, ACK number, header length and byte-identical options, same TOS/TTL/DF (IPv6:
//! traffic class, flow label, hop limit); sequence numbers exactly contiguous; flags only
//! ACK or ACK|PSH, and nothing follows a PSH or a short segment; IPv4 without options or
//! fragments; at most 64 KiB. Every segment's TCP checksum is verified before it is merged,
//! because the merged packet is handed over with only a partial checksum, which the
//! receiving stack then trusts: a segment that fails is written on its own, unmodified, for
//! the kernel to reject. A segment whose checksum a kernel VTEP left partial
//! ([`crate::partial`]: it fails, and holds the pseudo-header sum) merges like a verified
//! one, and a lone one is handed over as partial (`NEEDS_CSUM`), as the sender's stack
//! would have handed it to a local socket.
//!
//! Arithmetic, under `clippy::arithmetic_side_effects`: lengths are bounded by 64 KiB and
//! saturate (a saturated length fails the limit test that follows); sequence numbers are
//! modulo 2^32 (RFC 9293 §3.4) and wrap.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use crate::gso::{F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, MAX_TRAIN_SEGMENTS, VNET_HDR_LEN, VnetHdr};
use crate::partial::{self, Partial};
use crate::wire::ip::IpFacts;
use crate::wire::ipv4::Ipv4Packet;
use crate::wire::ipv6::{self, Ipv6Packet};
use crate::wire::tcp::{self, TcpPacket};
use crate::wire::udp::{self, UdpPacket};
use crate::wire::{self, checksum};

/// Largest IPv4 total length / IPv6 payload length.
const MAX_IP_LEN: usize = 65_535;
/// Most packets one merge takes: a gathering write has one iovec per packet, and UDP
/// super-packets are capped at 64 datagrams like GSO sends.
pub const MAX_SEGMENTS: usize = MAX_TRAIN_SEGMENTS;

/// Whether the L4 checksum of `ip` (its header described by `f`) verifies. An IPv4 UDP
/// datagram may carry none (zero). A valid checksum sums, with the pseudo-header, to all
/// ones, so its complement is 0.
///
/// Only packets that are actually merged are verified: a packet written on its own keeps its
/// checksum, which the kernel checks, so verifying it here would be work done twice.
fn l4_checksum_ok(ip: &[u8], f: &IpFacts) -> bool {
    let Some(l4_bytes) = f.l4(ip) else { return false };
    if f.protocol == udp::PROTOCOL
        && !f.is_v6()
        && UdpPacket::new_checked_header(l4_bytes).is_ok_and(|u| u.checksum() == 0)
    {
        return true;
    }
    checksum::fold(checksum::sum(f.pseudo_sum(l4_bytes.len()), l4_bytes)) == 0
}

/// A UDP datagram eligible for merging (USO): a plain IP header, a length field that is
/// the whole L4 payload and a non-empty payload. The checksum is not verified here (see
/// [`l4_checksum_ok`]).
fn udp_datagram(ip: &[u8], f: &IpFacts) -> bool {
    f.is_plain(udp::PROTOCOL)
        && f.l4(ip).is_some_and(|l4| {
            UdpPacket::new_checked(l4).is_ok_and(|u| u.len() == l4.len() && u.len() > udp::HEADER_LEN)
        })
}

/// What [`tcp_segment`] learns about a packet that may be merged.
#[derive(Clone, Copy, Debug)]
struct Segment {
    /// IP + TCP header length.
    hdrs: usize,
    seq: u32,
    flags: u8,
}

/// A TCP segment eligible for merging, or `None`. The checksum is not verified here (see
/// [`l4_checksum_ok`]).
fn tcp_segment(ip: &[u8], f: &IpFacts) -> Option<Segment> {
    if !f.is_plain(tcp::PROTOCOL) {
        return None;
    }
    let t = TcpPacket::new_checked(f.l4(ip)?).ok()?;
    // At least one payload byte: a bare ACK is never merged.
    if t.payload().is_empty() || t.flags() & !tcp::PSH != tcp::ACK {
        return None;
    }
    Some(Segment { hdrs: f.header_len.checked_add(t.header_len())?, seq: t.seq(), flags: t.flags() })
}

/// Whether the IP headers of `a` and `b` (same version) agree on everything that must not
/// change within one merged packet.
#[inline]
fn same_ip(a: &[u8], b: &[u8], v6: bool) -> bool {
    if v6 {
        // Version, traffic class, flow label; next header, hop limit; addresses.
        same::<4>(a, b, 0) && same::<34>(a, b, 6)
    } else {
        // Version/IHL, TOS; flags (DF) and TTL, protocol; addresses.
        same::<2>(a, b, 0) && same::<1>(a, b, 6) && same::<2>(a, b, 8) && same::<8>(a, b, 12)
    }
}

/// Whether `a` and `b` both hold `N` bytes at `at`, and the same ones: a fixed-size compare
/// (a few loads), and never "equal" because both were too short.
#[inline]
fn same<const N: usize>(a: &[u8], b: &[u8], at: usize) -> bool {
    matches!((wire::bytes::<N>(a, at), wire::bytes::<N>(b, at)), (Some(x), Some(y)) if x == y)
}

/// Whether the headers of `a` and `b` (same version, same header lengths: the TCP header
/// from `l4` to `s.hdrs`) agree on everything that must not change within one merged TCP
/// packet.
#[inline]
fn same_flow(a: &[u8], b: &[u8], l4: usize, s: &Segment, v6: bool) -> bool {
    let (Some(ta), Some(tb)) = (a.get(l4..s.hdrs), b.get(l4..s.hdrs)) else { return false };
    // Ports; ACK number; data offset; options.
    same_ip(a, b, v6) && same::<4>(ta, tb, 0) && same::<5>(ta, tb, 8) && ta.get(20..) == tb.get(20..)
}

/// A super-packet being merged **by reference**: the first packet's IP and L4 headers are
/// copied behind room for the virtio-net header into `head`, a small buffer the caller
/// owns; every payload (the first packet's and each appended one's, from
/// [`header_len`](Self::header_len) on) stays where it was received, and the caller writes
/// `head` and the payloads to the TUN with one gathering write. Nothing of the payload is
/// copied or summed here, except the checksums verified before a merge.
#[derive(Clone, Copy, Debug)]
pub struct Coalesced {
    /// The first packet's IP header, as the forwarder parsed it.
    ip: IpFacts,
    /// `Some` when the first packet is a mergeable TCP segment.
    tcp: Option<Segment>,
    /// Whether it is a mergeable UDP datagram (and the TUN takes USO).
    udp: bool,
    /// Header bytes copied into `head` (0 for a packet nothing can join: it is all payload).
    hdrs: usize,
    /// Payload bytes per segment (the first segment's).
    mss: usize,
    /// Bytes of the merged IP packet.
    len: usize,
    next_seq: u32,
    segments: usize,
    /// Whether another segment may still follow.
    open: bool,
    /// The first packet's checksum is partial (verified: it fails, and holds the
    /// pseudo-header sum).
    first_partial: Option<Partial>,
    /// Appended segments whose checksum was partial.
    partials: usize,
}

impl Coalesced {
    /// Starts a super-packet with the IP packet `ip` (which passed every check of the
    /// forwarder, its header `f`): copies its headers into `head` behind room for the
    /// virtio-net header. UDP datagrams are merged only when `uso` (the TUN takes UDP
    /// super-packets). `None` when `head` cannot hold the headers.
    pub fn start(ip: &[u8], f: &IpFacts, head: &mut [u8], uso: bool) -> Option<Self> {
        let tcp = tcp_segment(ip, f);
        let udp = tcp.is_none() && uso && udp_datagram(ip, f);
        let hdrs = match tcp {
            Some(s) => s.hdrs,
            None if udp => f.header_len.checked_add(udp::HEADER_LEN)?,
            None => 0,
        };
        let (h, payload) = ip.split_at_checked(hdrs)?;
        head.get_mut(VNET_HDR_LEN..)?.get_mut(..hdrs)?.copy_from_slice(h);
        let mss = payload.len();
        let open = tcp.is_some_and(|s| s.flags & tcp::PSH == 0) || udp;
        let next_seq = tcp.map_or(0, |s| s.seq.wrapping_add(mss as u32));
        let first_partial = partial::verified(ip, f);
        Some(Self {
            ip: *f,
            tcp,
            udp,
            hdrs,
            mss,
            len: ip.len(),
            next_seq,
            segments: 1,
            open,
            first_partial,
            partials: 0,
        })
    }

    /// The copied headers in `head`, where [`start`](Self::start) put them.
    fn headers<'h>(&self, head: &'h [u8]) -> Option<&'h [u8]> {
        head.get(VNET_HDR_LEN..)?.get(..self.hdrs)
    }

    /// Bytes at the front of every merged packet that are headers (kept in `head`, the first
    /// packet's copy standing for all): each packet's payload, `ip[header_len()..]`, is what
    /// the caller writes behind `head`.
    pub fn header_len(&self) -> usize {
        self.hdrs
    }

    /// The largest merged IP packet: 64 KiB of IP payload.
    fn limit(&self) -> usize {
        if self.ip.is_v6() { MAX_IP_LEN + ipv6::HEADER_LEN } else { MAX_IP_LEN }
    }

    /// Appends `ip` (its header `f`) if the merge rules allow; `false` leaves the merge
    /// untouched (the caller finishes it and starts another with `ip`). `first` is the
    /// first packet, as received, whose checksum is verified when the first packet joins it.
    pub fn append(&mut self, ip: &[u8], f: &IpFacts, head: &mut [u8], first: &[u8]) -> bool {
        if !self.open || self.segments >= MAX_SEGMENTS || f.is_v6() != self.ip.is_v6() {
            return false;
        }
        if self.udp {
            return self.append_udp(ip, f, head, first);
        }
        let Some(first_seg) = self.tcp else { return false };
        let Some(s) = tcp_segment(ip, f) else { return false };
        // `tcp_segment` guarantees `hdrs < ip.len()`.
        let payload = ip.len().saturating_sub(s.hdrs);
        let Some(hdr) = self.headers(head) else { return false };
        if s.hdrs != first_seg.hdrs
            || s.seq != self.next_seq
            || payload > self.mss
            || self.len.saturating_add(payload) > self.limit()
            || !same_flow(hdr, ip, self.ip.header_len, &first_seg, f.is_v6())
            || !self.checksums_ok(ip, f, first)
        {
            return false;
        }
        self.len = self.len.saturating_add(payload);
        self.next_seq = self.next_seq.wrapping_add(payload as u32);
        self.segments = self.segments.saturating_add(1);
        if s.flags & tcp::PSH != 0 {
            let tcp_hdr = head.get_mut(VNET_HDR_LEN..).and_then(|h| h.get_mut(self.ip.header_len..first_seg.hdrs));
            if let Some(mut t) = tcp_hdr.and_then(|t| TcpPacket::new_checked(t).ok()) {
                t.set_flags(t.flags() | tcp::PSH);
            }
            self.open = false;
        }
        if payload < self.mss {
            self.open = false;
        }
        true
    }

    fn append_udp(&mut self, ip: &[u8], f: &IpFacts, head: &[u8], first: &[u8]) -> bool {
        if !udp_datagram(ip, f) {
            return false;
        }
        let l4 = self.ip.header_len;
        // `udp_datagram` guarantees more than a UDP header after the IP header.
        let payload = ip.len().saturating_sub(f.header_len).saturating_sub(udp::HEADER_LEN);
        let Some(hdr) = self.headers(head) else { return false };
        if f.header_len != l4
            || payload > self.mss
            || self.len.saturating_add(payload) > self.limit()
            || !same_ip(hdr, ip, f.is_v6())
            || !same::<4>(hdr, ip, l4)
            || !self.checksums_ok(ip, f, first)
        {
            return false;
        }
        self.len = self.len.saturating_add(payload);
        self.segments = self.segments.saturating_add(1);
        if payload < self.mss {
            self.open = false;
        }
        true
    }

    /// Verifies `ip`'s checksum and, before the first merge, that of the `first` packet
    /// (known from [`start`](Self::start) when it is partial). A first packet that fails
    /// closes the super-packet: it goes out alone. A partial checksum passes, counted.
    fn checksums_ok(&mut self, ip: &[u8], f: &IpFacts, first: &[u8]) -> bool {
        if self.segments == 1
            && (first.len() != self.len || (self.first_partial.is_none() && !l4_checksum_ok(first, &self.ip)))
        {
            self.open = false;
            return false;
        }
        if l4_checksum_ok(ip, f) {
            return true;
        }
        // It failed: partial if the field holds the pseudo-header sum.
        let partial = partial::find(ip, f).is_some();
        self.partials = self.partials.saturating_add(usize::from(partial));
        partial
    }

    /// How many segments were merged.
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// How many of them carried a partial checksum from the sender ([`crate::partial`]),
    /// which the write hands over as partial.
    pub fn partials(&self) -> usize {
        self.partials.saturating_add(usize::from(self.first_partial.is_some()))
    }

    /// Writes the virtio-net header and the merged packet's lengths and checksums into
    /// `head`; returns how many bytes of `head` go in front of the payloads. A single packet
    /// goes out as it came: an all-zero header, or a `NEEDS_CSUM` one when its checksum is
    /// partial. 0 (write nothing) only if `head` is not the buffer [`start`](Self::start)
    /// filled.
    pub fn finish(&self, head: &mut [u8]) -> usize {
        let n = VNET_HDR_LEN.saturating_add(self.hdrs);
        let (gso_type, csum_offset) = match self.tcp {
            // One packet goes out as it came.
            _ if self.segments < 2 || (self.tcp.is_none() && !self.udp) => {
                self.first_partial.map_or_else(VnetHdr::default, |p| p.vnet_hdr()).emit(head);
                return n;
            }
            Some(_) => (if self.ip.is_v6() { GSO_TCPV6 } else { GSO_TCPV4 }, tcp::CHECKSUM_OFFSET),
            None => (GSO_UDP_L4, udp::CHECKSUM_OFFSET),
        };
        let l4 = self.ip.header_len;
        if self.fix_headers(head).is_none() {
            return 0;
        }
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: self.hdrs as u16,
            gso_size: self.mss as u16,
            csum_start: l4 as u16,
            csum_offset: csum_offset as u16,
        }
        .emit(head);
        n
    }

    /// Sets the merged packet's IP lengths (and IPv4 header checksum), the UDP length, and
    /// the L4 checksum field to the pseudo-header sum, uncomplemented (`NEEDS_CSUM`).
    fn fix_headers(&self, head: &mut [u8]) -> Option<()> {
        let l4 = self.ip.header_len;
        let ip = head.get_mut(VNET_HDR_LEN..)?.get_mut(..self.hdrs)?;
        let (ip_hdr, l4_hdr) = ip.split_at_mut_checked(l4)?;
        if self.ip.is_v6() {
            let payload_len = u16::try_from(self.len.checked_sub(ipv6::HEADER_LEN)?).ok()?;
            Ipv6Packet::new_checked_header(ip_hdr).ok()?.set_payload_len(payload_len);
        } else {
            let mut h = Ipv4Packet::new_checked_header(ip_hdr).ok()?;
            h.set_total_len(u16::try_from(self.len).ok()?);
            h.fill_checksum();
        }
        let l4_len = self.len.checked_sub(l4)?;
        let partial = !checksum::fold(self.ip.pseudo_sum(l4_len));
        if self.tcp.is_some() {
            TcpPacket::new_checked(l4_hdr).ok()?.set_checksum(partial);
        } else {
            let mut u = UdpPacket::new_checked_header(l4_hdr).ok()?;
            u.set_len(u16::try_from(l4_len).ok()?);
            u.set_checksum(partial);
        }
        Some(())
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, PacketHeaders, TransportHeader};

    fn seg(v6: bool, seq: u32, len: usize, psh: bool) -> Vec<u8> {
        let b = if v6 {
            PacketBuilder::ipv6([0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5], [0xfd; 16], 64)
        } else {
            PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 1], 64)
        };
        let mut b = b.tcp(40000, 5201, seq, 502).ack(7);
        if psh {
            b = b.psh();
        }
        let data: Vec<u8> = (0..len).map(|i| (seq as usize + i) as u8).collect();
        let mut out = Vec::new();
        b.write(&mut out, &data).unwrap();
        out
    }

    /// What a driver does with a [`Coalesced`]: keeps the header buffer, the first packet
    /// and the payload pieces, and gathers them for the write.
    struct Merge {
        head: Vec<u8>,
        c: Coalesced,
        first: Vec<u8>,
        pieces: Vec<u8>,
    }

    /// The facts the forwarder hands along with a delivered packet.
    fn facts(ip: &[u8]) -> Option<IpFacts> {
        crate::wire::ip::IpPacket::new_checked(ip).ok().map(|p| p.facts())
    }

    impl Merge {
        fn start(ip: &[u8], uso: bool) -> Option<Self> {
            Self::start_in(ip, uso, 200)
        }

        fn start_in(ip: &[u8], uso: bool, room: usize) -> Option<Self> {
            let mut head = vec![0u8; room];
            let c = Coalesced::start(ip, &facts(ip)?, &mut head, uso)?;
            let pieces = ip[c.header_len()..].to_vec();
            Some(Self { head, c, first: ip.to_vec(), pieces })
        }

        fn append(&mut self, ip: &[u8]) -> bool {
            let before = self.head.clone();
            // What the forwarder would have dropped never reaches a merge.
            let Some(f) = facts(ip) else { return false };
            if !self.c.append(ip, &f, &mut self.head, &self.first) {
                assert_eq!(self.head, before, "a refused packet leaves the headers alone");
                return false;
            }
            self.pieces.extend_from_slice(&ip[self.c.header_len()..]);
            true
        }

        fn segments(&self) -> usize {
            self.c.segments()
        }

        /// The bytes written to the TUN: virtio-net header, headers, payloads.
        fn finish(&mut self) -> Vec<u8> {
            let n = self.c.finish(&mut self.head);
            [&self.head[..n], &self.pieces[..]].concat()
        }
    }

    /// Completes the partial checksum as the kernel would and parses the result.
    fn complete(mut out: Vec<u8>) -> (VnetHdr, Vec<u8>) {
        let h = VnetHdr::parse(&out).unwrap();
        let ip = &mut out[VNET_HDR_LEN..];
        if h.flags & F_NEEDS_CSUM != 0 {
            crate::gso::complete_checksum(ip, h.csum_start.into(), h.csum_offset.into()).unwrap();
        }
        (h, ip.to_vec())
    }

    #[test]
    fn merges_a_contiguous_run_into_one_valid_super_packet() {
        for v6 in [false, true] {
            let mut c = Merge::start(&seg(v6, 1000, 1400, false), true).unwrap();
            for i in 1..40 {
                assert!(c.append(&seg(v6, 1000 + 1400 * i, 1400, false)), "v6={v6} seg {i}");
            }
            assert!(c.append(&seg(v6, 1000 + 1400 * 40, 700, true)), "short PSH tail");
            assert!(!c.append(&seg(v6, 1000 + 1400 * 40 + 700, 1400, false)), "closed after PSH");
            assert_eq!(c.segments(), 41);
            let (h, ip) = complete(c.finish());
            assert_eq!((h.gso_type, h.gso_size, h.flags), (if v6 { GSO_TCPV6 } else { GSO_TCPV4 }, 1400, 1));
            let p = PacketHeaders::from_ip_slice(&ip).unwrap();
            let Some(TransportHeader::Tcp(t)) = p.transport.clone() else { panic!("tcp") };
            assert_eq!(p.payload.slice().len(), 40 * 1400 + 700);
            assert!(t.psh && t.ack && t.sequence_number == 1000);
            let want = match &p.net {
                Some(etherparse::NetHeaders::Ipv4(ip4, _)) => {
                    assert_eq!(ip4.header_checksum, ip4.calc_header_checksum());
                    t.calc_checksum_ipv4(ip4, p.payload.slice()).unwrap()
                }
                Some(etherparse::NetHeaders::Ipv6(ip6, _)) => t.calc_checksum_ipv6(ip6, p.payload.slice()).unwrap(),
                _ => panic!("ip"),
            };
            assert_eq!(t.checksum, want);
            let expect: Vec<u8> = (0..40 * 1400 + 700).map(|i| (1000 + i) as u8).collect();
            assert_eq!(p.payload.slice(), &expect[..]);
        }
    }

    #[test]
    fn refuses_what_the_kernel_would_not_merge() {
        let first = seg(false, 1000, 1400, false);
        let gap = seg(false, 5000, 1400, false);
        let mut bad_csum = seg(false, 2400, 1400, false);
        bad_csum[100] ^= 0xff;
        let mut other_ttl = seg(false, 2400, 1400, false);
        other_ttl[8] = 63;
        let mut syn = seg(false, 2400, 1400, false);
        syn[33] |= 0x02;
        let longer = seg(false, 2400, 1500, false);
        let v6 = seg(true, 2400, 1400, false);
        for (name, p) in
            [("gap", gap), ("bad checksum", bad_csum), ("ttl", other_ttl), ("syn", syn), ("longer", longer), ("v6", v6)]
        {
            let mut c = Merge::start(&first, true).unwrap();
            assert!(!c.append(&p), "{name}");
            // The lone packet goes out unmodified with an all-zero header.
            let out = c.finish();
            assert_eq!(VnetHdr::parse(&out), Some(VnetHdr::default()), "{name}");
            assert_eq!(&out[VNET_HDR_LEN..], &first[..], "{name}");
        }
        // A first packet with a bad checksum is never merged into: it goes out alone, as read.
        let mut bad_first = first.clone();
        bad_first[100] ^= 0xff;
        let mut c = Merge::start(&bad_first, true).unwrap();
        assert!(!c.append(&seg(false, 2400, 1400, false)), "bad first packet");
        assert_eq!(&c.finish()[VNET_HDR_LEN..], &bad_first[..]);
        // Without USO, a UDP datagram starts a packet nothing joins.
        let udp = {
            let mut v = Vec::new();
            PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 1], 64).udp(1, 2).write(&mut v, &[0; 100]).unwrap();
            v
        };
        let mut c = Merge::start(&udp, false).unwrap();
        assert!(!c.append(&udp));
        assert!(Merge::start_in(&first, true, VNET_HDR_LEN + 39).is_none(), "no room for the headers");
    }

    fn udp(v6: bool, sport: u16, len: usize, fill: u8) -> Vec<u8> {
        let b = if v6 {
            PacketBuilder::ipv6([0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5], [0xfd; 16], 64)
        } else {
            PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 1], 64)
        };
        let mut v = Vec::new();
        b.udp(sport, 5201).write(&mut v, &vec![fill; len]).unwrap();
        v
    }

    #[test]
    fn merges_equal_udp_datagrams_into_one_uso_packet() {
        for v6 in [false, true] {
            let mut c = Merge::start(&udp(v6, 4000, 64, 0), true).unwrap();
            for i in 1..10u8 {
                assert!(c.append(&udp(v6, 4000, 64, i)), "v6={v6} datagram {i}");
            }
            assert!(!c.append(&udp(v6, 4001, 64, 0)), "another flow");
            assert!(!c.append(&udp(v6, 4000, 65, 0)), "larger");
            assert!(c.append(&udp(v6, 4000, 30, 10)), "a shorter last one");
            assert!(!c.append(&udp(v6, 4000, 64, 11)), "nothing after the short one");
            let (h, ip) = complete(c.finish());
            assert_eq!((h.gso_type, h.gso_size, h.csum_offset), (GSO_UDP_L4, 64, 6));
            let p = PacketHeaders::from_ip_slice(&ip).unwrap();
            let Some(TransportHeader::Udp(u)) = p.transport.clone() else { panic!("udp") };
            assert_eq!(usize::from(u.length), 8 + 10 * 64 + 30);
            let want = match &p.net {
                Some(etherparse::NetHeaders::Ipv4(ip4, _)) => u.calc_checksum_ipv4(ip4, p.payload.slice()).unwrap(),
                Some(etherparse::NetHeaders::Ipv6(ip6, _)) => u.calc_checksum_ipv6(ip6, p.payload.slice()).unwrap(),
                _ => panic!("ip"),
            };
            assert_eq!(u.checksum, want);
            let mut expect: Vec<u8> = (0..10u8).flat_map(|i| vec![i; 64]).collect();
            expect.extend(vec![10u8; 30]);
            assert_eq!(p.payload.slice(), &expect[..]);
        }
        // At most 64 datagrams, and a bad checksum never joins.
        let mut c = Merge::start(&udp(false, 1, 10, 0), true).unwrap();
        let mut bad = udp(false, 1, 10, 0);
        bad[30] ^= 1;
        assert!(!c.append(&bad));
        while c.append(&udp(false, 1, 10, 0)) {}
        assert_eq!(c.segments(), 64);
    }

    #[test]
    fn stops_at_64_kib() {
        let mut c = Merge::start(&seg(false, 0, 1400, false), true).unwrap();
        let mut i = 1;
        while c.append(&seg(false, 1400 * i, 1400, false)) {
            i += 1;
        }
        assert_eq!(c.segments(), 46, "46 × 1400 + 40 ≤ 65 535 < 47 × 1400 + 40");
        assert!(c.finish().len() <= VNET_HDR_LEN + 65_535);
        // Small segments stop at 64 (one iovec each in the gathering write).
        let mut c = Merge::start(&seg(false, 0, 100, false), true).unwrap();
        let mut i = 1;
        while c.append(&seg(false, 100 * i, 100, false)) {
            i += 1;
        }
        assert_eq!(c.segments(), MAX_SEGMENTS);
    }

    /// What a kernel VTEP with checksum offload sends over veth: the L4 field holds the
    /// pseudo-header sum only.
    fn make_partial(ip: &mut [u8]) {
        let v6 = ip[0] >> 4 == 6;
        let (l4, proto) = if v6 { (40, ip[6]) } else { (20, ip[9]) };
        let at = l4 + if proto == 6 { 16 } else { 6 };
        let p = !checksum::fold(facts(ip).unwrap().pseudo_sum(ip.len() - l4));
        ip[at..at + 2].copy_from_slice(&p.to_be_bytes());
    }

    /// flannel#1279: a kernel VTEP's partial checksums merge like verified ones, mixed with
    /// complete ones, and the kernel's completion of the merged packet is right.
    #[test]
    fn partial_checksums_merge_and_are_counted() {
        for v6 in [false, true] {
            let mut first = seg(v6, 1000, 1400, false);
            make_partial(&mut first);
            let mut c = Merge::start(&first, true).unwrap();
            for i in 1..10 {
                let mut s = seg(v6, 1000 + 1400 * i, 1400, false);
                if i % 3 != 0 {
                    make_partial(&mut s);
                }
                assert!(c.append(&s), "v6={v6} seg {i}");
            }
            assert_eq!((c.segments(), c.c.partials()), (10, 7));
            let (h, ip) = complete(c.finish());
            assert_eq!(h.flags, F_NEEDS_CSUM);
            let p = PacketHeaders::from_ip_slice(&ip).unwrap();
            let Some(TransportHeader::Tcp(t)) = p.transport.clone() else { panic!("tcp") };
            let want = match &p.net {
                Some(etherparse::NetHeaders::Ipv4(ip4, _)) => t.calc_checksum_ipv4(ip4, p.payload.slice()).unwrap(),
                Some(etherparse::NetHeaders::Ipv6(ip6, _)) => t.calc_checksum_ipv6(ip6, p.payload.slice()).unwrap(),
                _ => panic!("ip"),
            };
            assert_eq!(t.checksum, want, "v6={v6}");
        }
        // UDP (USO) too.
        let mut first = udp(false, 4000, 64, 0);
        make_partial(&mut first);
        let mut c = Merge::start(&first, true).unwrap();
        let mut second = udp(false, 4000, 64, 1);
        make_partial(&mut second);
        assert!(c.append(&second));
        assert_eq!(c.c.partials(), 2);
        let (_, ip) = complete(c.finish());
        let p = PacketHeaders::from_ip_slice(&ip).unwrap();
        let Some(TransportHeader::Udp(u)) = p.transport.clone() else { panic!("udp") };
        let Some(etherparse::NetHeaders::Ipv4(ip4, _)) = &p.net else { panic!("ipv4") };
        assert_eq!(u.checksum, u.calc_checksum_ipv4(ip4, p.payload.slice()).unwrap());
    }

    /// A lone partial packet (a bare ACK, a PSH segment, UDP without USO) is handed over as
    /// partial, unchanged: `NEEDS_CSUM` pointing at its field, as the sender's stack would.
    #[test]
    fn a_lone_partial_packet_is_handed_over_as_partial() {
        let mut ack = Vec::new();
        PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 1], 64).tcp(1, 2, 3, 4).ack(5).write(&mut ack, &[]).unwrap();
        let mut dgram = udp(true, 1, 300, 9);
        for (name, p, uso, start, offset) in [("ack", &mut ack, true, 20, 16), ("udp", &mut dgram, false, 40, 6)] {
            make_partial(p);
            let mut c = Merge::start(p, uso).unwrap();
            assert_eq!(c.c.partials(), 1, "{name}");
            let out = c.finish();
            let h = VnetHdr::parse(&out).unwrap();
            assert_eq!((h.flags, h.gso_type, h.csum_start, h.csum_offset), (F_NEEDS_CSUM, 0, start, offset), "{name}");
            assert_eq!(&out[VNET_HDR_LEN..], &p[..], "{name}: the packet itself unchanged");
            let (_, done) = complete(out);
            assert!(crate::fuzzing::raw::l4_checksum_ok(&done), "{name}");
        }
        // A complete checksum, or a bad one that is not the pseudo-header sum, is not partial.
        let good = seg(false, 1, 100, true);
        let mut bad = good.clone();
        bad[36] ^= 0x10;
        for p in [&good, &bad] {
            let mut c = Merge::start(p, true).unwrap();
            assert_eq!(c.c.partials(), 0);
            assert_eq!(VnetHdr::parse(&c.finish()), Some(VnetHdr::default()));
        }
    }
}
