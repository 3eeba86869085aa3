//! Coalescing, sans-IO: consecutive TCP segments of one flow, decapsulated from the
//! underlay and checked by the forwarder, merged back into one super-packet that the driver
//! writes to the TUN behind a virtio-net header — one write instead of dozens
//! (`reference/performance.md` §4). Where the TUN takes USO (Linux ≥ 6.2), equal-sized UDP
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
//! the kernel to reject.

#![deny(unsafe_code)]

use crate::gso::{
    F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, MAX_TRAIN_SEGMENTS, VNET_HDR_LEN, VnetHdr, pseudo_sum,
};
use crate::wire::checksum;

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// Largest IPv4 total length / IPv6 payload length.
const MAX_IP_LEN: usize = 65_535;
/// Most packets one merge takes: a gathering write has one iovec per packet, and UDP
/// super-packets are capped at 64 datagrams like GSO sends.
pub const MAX_SEGMENTS: usize = MAX_TRAIN_SEGMENTS;

/// An IPv4 header without options, or IPv6 without extension headers, carrying `proto`,
/// not a fragment: `Some((v6, l4))`.
fn plain_ip(ip: &[u8], proto: u8) -> Option<(bool, usize)> {
    match ip.first()? >> 4 {
        4 => {
            let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]);
            (ip[0] & 0x0f == 5 && *ip.get(9)? == proto && frag & 0x3fff == 0).then_some((false, 20))
        }
        6 => (*ip.get(6)? == proto).then_some((true, 40)),
        _ => None,
    }
}

/// Whether the L4 checksum of `ip` (protocol `proto`, L4 header at `l4`) verifies. An IPv4
/// UDP datagram may carry none (zero). A valid checksum sums, with the pseudo-header, to all
/// ones, so its complement is 0.
///
/// Only packets that are actually merged are verified: a packet written on its own keeps its
/// checksum, which the kernel checks, so verifying it here would be work done twice.
fn l4_checksum_ok(ip: &[u8], v6: bool, l4: usize, proto: u8) -> bool {
    let Some(l4_bytes) = ip.get(l4..) else { return false };
    if proto == 17 && !v6 && l4_bytes.get(6..8) == Some(&[0, 0]) {
        return true;
    }
    checksum::fold(checksum::sum(pseudo_sum(ip, v6, proto, l4_bytes.len()), l4_bytes)) == 0
}

/// A UDP datagram eligible for merging (USO): `Some((v6, l4))`. The checksum is not
/// verified here (see [`l4_checksum_ok`]).
fn udp_datagram(ip: &[u8]) -> Option<(bool, usize)> {
    let (v6, l4) = plain_ip(ip, 17)?;
    let ulen = usize::from(u16::from_be_bytes([*ip.get(l4 + 4)?, *ip.get(l4 + 5)?]));
    (ulen == ip.len() - l4 && ulen > 8).then_some((v6, l4))
}

/// What [`tcp_segment`] learns about a packet that may be merged.
#[derive(Clone, Copy, Debug)]
struct Segment {
    v6: bool,
    /// IP header length.
    l4: usize,
    /// IP + TCP header length.
    hdrs: usize,
    seq: u32,
    flags: u8,
}

/// A TCP segment eligible for merging, or `None`. The checksum is not verified here (see
/// [`l4_checksum_ok`]).
fn tcp_segment(ip: &[u8]) -> Option<Segment> {
    let (v6, l4) = plain_ip(ip, 6)?;
    let tcp_len = usize::from(ip.get(l4 + 12)? >> 4) * 4;
    let hdrs = l4 + tcp_len;
    let flags = *ip.get(l4 + 13)?;
    if tcp_len < 20 || hdrs >= ip.len() || flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    let seq = u32::from_be_bytes([ip[l4 + 4], ip[l4 + 5], ip[l4 + 6], ip[l4 + 7]]);
    Some(Segment { v6, l4, hdrs, seq, flags })
}

/// Whether the IP headers of `a` and `b` (same version) agree on everything that must not
/// change within one merged packet.
fn same_ip(a: &[u8], b: &[u8], v6: bool) -> bool {
    if v6 {
        // Version, traffic class, flow label; next header, hop limit; addresses.
        a.get(0..4) == b.get(0..4) && a.get(6..40) == b.get(6..40)
    } else {
        // Version/IHL, TOS; flags (DF) and TTL, protocol; addresses.
        a.get(0..2) == b.get(0..2)
            && a.get(6..7) == b.get(6..7)
            && a.get(8..10) == b.get(8..10)
            && a.get(12..20) == b.get(12..20)
    }
}

/// Whether the headers of `a` and `b` (same version, same header length) agree on
/// everything that must not change within one merged TCP packet.
fn same_flow(a: &[u8], b: &[u8], s: &Segment) -> bool {
    let l4 = s.l4;
    // Ports; ACK number; data offset; options.
    same_ip(a, b, s.v6)
        && a.get(l4..l4 + 4) == b.get(l4..l4 + 4)
        && a.get(l4 + 8..l4 + 13) == b.get(l4 + 8..l4 + 13)
        && a.get(l4 + 20..s.hdrs) == b.get(l4 + 20..s.hdrs)
}

/// A super-packet being merged **by reference**: the first packet's IP and L4 headers are
/// copied behind room for the virtio-net header into `head`, a small buffer the caller
/// owns; every payload (the first packet's and each appended one's, from
/// [`header_len`](Self::header_len) on) stays where it was received, and the caller writes
/// `head` and the payloads to the TUN with one gathering write. Nothing of the payload is
/// copied or summed here, except the checksums verified before a merge.
#[derive(Clone, Copy, Debug)]
pub struct Coalesced {
    /// `Some` when the first packet is a mergeable TCP segment.
    tcp: Option<Segment>,
    /// `Some((v6, l4))` when it is a mergeable UDP datagram (and the TUN takes USO).
    udp: Option<(bool, usize)>,
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
}

impl Coalesced {
    /// Starts a super-packet with the IP packet `ip` (which passed every check of the
    /// forwarder): copies its headers into `head` behind room for the virtio-net header.
    /// UDP datagrams are merged only when `uso` (the TUN takes UDP super-packets). `None`
    /// when `head` cannot hold the headers.
    pub fn start(ip: &[u8], head: &mut [u8], uso: bool) -> Option<Self> {
        let tcp = tcp_segment(ip);
        let udp = if tcp.is_none() && uso { udp_datagram(ip) } else { None };
        let hdrs = match (tcp, udp) {
            (Some(s), _) => s.hdrs,
            (None, Some((_, l4))) => l4 + 8,
            (None, None) => 0,
        };
        head.get_mut(VNET_HDR_LEN..VNET_HDR_LEN + hdrs)?.copy_from_slice(ip.get(..hdrs)?);
        let mss = ip.len() - hdrs;
        let open = tcp.is_some_and(|s| s.flags & TCP_PSH == 0) || udp.is_some();
        let next_seq = tcp.map_or(0, |s| s.seq.wrapping_add(mss as u32));
        Some(Self { tcp, udp, hdrs, mss, len: ip.len(), next_seq, segments: 1, open })
    }

    /// Bytes at the front of every merged packet that are headers (kept in `head`, the first
    /// packet's copy standing for all): each packet's payload, `ip[header_len()..]`, is what
    /// the caller writes behind `head`.
    pub fn header_len(&self) -> usize {
        self.hdrs
    }

    /// Appends `ip` if the merge rules allow; `false` leaves the merge untouched (the
    /// caller finishes it and starts another with `ip`). `first` is the first packet, as
    /// received, whose checksum is verified when the first packet joins it.
    pub fn append(&mut self, ip: &[u8], head: &mut [u8], first: &[u8]) -> bool {
        if !self.open || self.segments >= MAX_SEGMENTS {
            return false;
        }
        if let Some((v6, l4)) = self.udp {
            return self.append_udp(ip, head, first, v6, l4);
        }
        let Some(first_seg) = self.tcp else { return false };
        let Some(s) = tcp_segment(ip) else { return false };
        let payload = ip.len() - s.hdrs;
        let limit = if first_seg.v6 { MAX_IP_LEN + 40 } else { MAX_IP_LEN };
        let Some(hdr) = head.get(VNET_HDR_LEN..VNET_HDR_LEN + first_seg.hdrs) else { return false };
        if s.v6 != first_seg.v6
            || s.hdrs != first_seg.hdrs
            || s.seq != self.next_seq
            || payload > self.mss
            || self.len + payload > limit
            || !same_flow(hdr, ip, &first_seg)
            || !self.checksums_ok(ip, first, first_seg.v6, first_seg.l4, 6)
        {
            return false;
        }
        self.len += payload;
        self.next_seq = self.next_seq.wrapping_add(payload as u32);
        self.segments += 1;
        if s.flags & TCP_PSH != 0 {
            if let Some(f) = head.get_mut(VNET_HDR_LEN + first_seg.l4 + 13) {
                *f |= TCP_PSH;
            }
            self.open = false;
        }
        if payload < self.mss {
            self.open = false;
        }
        true
    }

    fn append_udp(&mut self, ip: &[u8], head: &[u8], first: &[u8], v6: bool, l4: usize) -> bool {
        let Some((v6b, l4b)) = udp_datagram(ip) else { return false };
        let payload = ip.len() - l4b - 8;
        let limit = if v6 { MAX_IP_LEN + 40 } else { MAX_IP_LEN };
        let Some(hdr) = head.get(VNET_HDR_LEN..VNET_HDR_LEN + l4 + 8) else { return false };
        if v6b != v6
            || l4b != l4
            || payload > self.mss
            || self.len + payload > limit
            || !same_ip(hdr, ip, v6)
            || hdr.get(l4..l4 + 4) != ip.get(l4..l4 + 4)
            || !self.checksums_ok(ip, first, v6, l4, 17)
        {
            return false;
        }
        self.len += payload;
        self.segments += 1;
        if payload < self.mss {
            self.open = false;
        }
        true
    }

    /// Verifies `ip`'s checksum and, before the first merge, that of the `first` packet.
    /// A first packet that fails closes the super-packet: it goes out alone.
    fn checksums_ok(&mut self, ip: &[u8], first: &[u8], v6: bool, l4: usize, proto: u8) -> bool {
        if self.segments == 1 && (first.len() != self.len || !l4_checksum_ok(first, v6, l4, proto)) {
            self.open = false;
            return false;
        }
        l4_checksum_ok(ip, v6, l4, proto)
    }

    /// How many segments were merged.
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// Writes the virtio-net header and the merged packet's lengths and checksums into
    /// `head`; returns how many bytes of `head` go in front of the payloads. A single packet
    /// keeps its complete checksum and gets an all-zero header.
    pub fn finish(&self, head: &mut [u8]) -> usize {
        let n = VNET_HDR_LEN + self.hdrs;
        if let (Some((v6, l4)), true) = (self.udp, self.segments > 1) {
            return self.finish_udp(head, v6, l4);
        }
        let (Some(s), true) = (self.tcp, self.segments > 1) else {
            VnetHdr::default().emit(head);
            return n;
        };
        let Some(ip) = head.get_mut(VNET_HDR_LEN..n) else { return 0 };
        fix_ip_lengths(ip, s.v6, self.len);
        // NEEDS_CSUM: the field holds the pseudo-header sum, uncomplemented.
        let partial = !checksum::fold(pseudo_sum(ip, s.v6, 6, self.len - s.l4));
        ip[s.l4 + 16..s.l4 + 18].copy_from_slice(&partial.to_be_bytes());
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if s.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: s.hdrs as u16,
            gso_size: self.mss as u16,
            csum_start: s.l4 as u16,
            csum_offset: 16,
        }
        .emit(head);
        n
    }

    fn finish_udp(&self, head: &mut [u8], v6: bool, l4: usize) -> usize {
        let n = VNET_HDR_LEN + self.hdrs;
        let Some(ip) = head.get_mut(VNET_HDR_LEN..n) else { return 0 };
        fix_ip_lengths(ip, v6, self.len);
        let ulen = self.len - l4;
        ip[l4 + 4..l4 + 6].copy_from_slice(&(ulen as u16).to_be_bytes());
        let partial = !checksum::fold(pseudo_sum(ip, v6, 17, ulen));
        ip[l4 + 6..l4 + 8].copy_from_slice(&partial.to_be_bytes());
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: (l4 + 8) as u16,
            gso_size: self.mss as u16,
            csum_start: l4 as u16,
            csum_offset: 6,
        }
        .emit(head);
        n
    }
}

/// Sets the IPv4 total length and header checksum, or the IPv6 payload length, for an IP
/// packet of `len` bytes.
fn fix_ip_lengths(ip: &mut [u8], v6: bool, len: usize) {
    if v6 {
        ip[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    } else {
        ip[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&ip[..20]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
}

#[cfg(test)]
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

    impl Merge {
        fn start(ip: &[u8], uso: bool) -> Option<Self> {
            Self::start_in(ip, uso, 200)
        }

        fn start_in(ip: &[u8], uso: bool, room: usize) -> Option<Self> {
            let mut head = vec![0u8; room];
            let c = Coalesced::start(ip, &mut head, uso)?;
            let pieces = ip[c.header_len()..].to_vec();
            Some(Self { head, c, first: ip.to_vec(), pieces })
        }

        fn append(&mut self, ip: &[u8]) -> bool {
            let before = self.head.clone();
            if !self.c.append(ip, &mut self.head, &self.first) {
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
}
