//! Fuzz bodies as plain functions: the cargo-fuzz targets in `forwarder/fuzz/` call them, and
//! `tests/corpus_replay.rs` replays the seed corpus through them in every `cargo test`.
//!
//! Each body asserts properties, not only "no panic" (security.md S2): whatever the bytes, a
//! delivered packet is a well-formed IP packet no longer than the datagram, from the sending
//! peer's subnet, to ours, and never to a martian address; a reply goes back to the sender.
//! The offload bodies add theirs: every segment cut from a super-packet is well-formed, fits
//! the path MTU, checksums verify and the peer accepts it; every merged super-packet is
//! valid IP behind a virtio-net header that our own segmentation accepts and cuts back into
//! the payloads that went in.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{IpAddr, SocketAddr};

use etherparse::{NetHeaders, PacketHeaders, TransportHeader};

use crate::buf::{HEADROOM, PacketBuf, SLOT_LEN};
use crate::encap::Encap;
use crate::forwarder::{PacketCore, TunVerdict, UnderlayVerdict};
use crate::gro::Coalesced;
use crate::gso::{
    self, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, MAX_TRAIN_BYTES, MAX_TRAIN_SEGMENTS, Segmentation,
    VNET_HDR_LEN, VnetHdr,
};
use crate::stats::DropReason;
use crate::testing::{A_ENDPOINT, A_MAC, B_ENDPOINT, B_MAC, Pair, TapPair};
use crate::wire::arp::ArpPacket;
use crate::wire::ethernet::{self, EthernetFrame};
use crate::wire::ip::IpPacket;
use crate::wire::vxlan;

/// Room a core may grow a packet by at its tail (a padded ARP reply, a neighbour
/// advertisement longer than the solicitation): far less than a pool slot, so each run
/// allocates about what it reads, which keeps the sanitised fuzzer fast.
const TAIL: usize = 256;

/// A buffer holding `data` (at most a slot's worth) at [`HEADROOM`], with [`TAIL`] bytes
/// behind it; and the length copied.
fn slot_with(data: &[u8]) -> (Vec<u8>, usize) {
    let n = data.len().min(SLOT_LEN - HEADROOM);
    let mut slot = vec![0u8; HEADROOM + n + TAIL];
    slot[HEADROOM..HEADROOM + n].copy_from_slice(&data[..n]);
    (slot, n)
}

fn check_underlay<E: Encap>(mut net: Pair<E>, data: &[u8]) -> UnderlayVerdict {
    let (mut slot, n) = slot_with(data);
    let mut pkt = PacketBuf::new(&mut slot, HEADROOM, n).unwrap();
    let from: SocketAddr = A_ENDPOINT.parse().unwrap();
    let v = net.b.from_underlay(&net.routes_b, from, &mut pkt);
    match v {
        UnderlayVerdict::Deliver { .. } => {
            assert!(pkt.len() <= n, "delivered more than was received");
            let ip = IpPacket::new_checked(pkt.as_slice()).expect("delivered packet is well-formed IP");
            assert_eq!(ip.total_len(), pkt.len(), "padding was trimmed");
            assert!(ip.header_checksum_ok(), "delivered an IPv4 header whose checksum fails");
            let peer = &net.routes_b.peers()[0];
            assert!(peer.owns(ip.src()), "delivered a packet from outside the peer's subnet");
            let local = crate::testing::local(2);
            assert!(local.owns(ip.dst()), "delivered a packet not for our subnet");
        }
        UnderlayVerdict::Reply { to } => assert_eq!(to, from, "replied to someone else"),
        UnderlayVerdict::Drop(r) => assert_eq!(net.b.stats().drops(r), 1, "dropped without counting {r:?}"),
        UnderlayVerdict::Consumed => {
            assert_eq!(E::KIND, crate::encap::EncapKind::WireGuard, "a cleartext format consumed a datagram")
        }
    }
    v
}

/// A flannel-udp datagram from a known peer.
pub fn decap_udp(data: &[u8]) -> UnderlayVerdict {
    check_underlay(Pair::new(), data)
}

/// A VXLAN datagram from a known peer.
pub fn decap_vxlan(data: &[u8]) -> UnderlayVerdict {
    check_underlay(Pair::vxlan(), data)
}

/// A packet read from the TUN, through the VXLAN encapsulation side.
pub fn from_tun_vxlan(data: &[u8]) -> TunVerdict {
    let mut net = Pair::vxlan();
    let (mut slot, n) = slot_with(data);
    let mut pkt = PacketBuf::new(&mut slot, HEADROOM, n).unwrap();
    let v = net.a.from_tun(&net.routes_a, &mut pkt, net.now);
    check_tun_verdict(v, &pkt, &net);
    v
}

/// What [`from_tun_vxlan`] asserts about A's verdict on one packet.
fn check_tun_verdict<E: Encap>(v: TunVerdict, pkt: &PacketBuf<'_>, net: &Pair<E>) {
    if let TunVerdict::Drop(r) = v {
        assert_eq!(net.a.stats().drops(r), 1, "dropped without counting {r:?}");
    }
    match v {
        TunVerdict::Send { to, .. } => {
            assert_eq!(to, B_ENDPOINT.parse::<SocketAddr>().unwrap());
            // What A sends, B must accept as-is.
            let wire = pkt.as_slice().to_vec();
            assert!(matches!(decap_vxlan(&wire), UnderlayVerdict::Deliver { .. }), "B refuses what A sent");
        }
        TunVerdict::Reply => {
            let ip = IpPacket::new_checked(pkt.as_slice()).expect("ICMP reply is well-formed IP");
            assert!(pkt.len() <= crate::wire::icmp::V6_ERROR_MAX);
            assert!(!ip.dst().is_unspecified());
        }
        TunVerdict::Flood => panic!("TUN mode never floods"),
        TunVerdict::Drop(_) => {}
    }
}

/// A packet read from a TUN opened with `IFF_VNET_HDR`: the first [`VNET_HDR_LEN`] bytes are
/// the virtio-net header (host byte order), the rest the packet, a TSO/USO super-packet when
/// the header says so. Runs what a driver runs ([`gso::check_read`], then
/// `from_tun_segmented` and [`Segmentation::write_segments`] for every train, or `from_tun`),
/// and asserts: a refused packet is counted under an offload or header reason; every
/// segment of a sent super-packet is within the path MTU, carries the encapsulation header
/// in front, parses as IP with a correct IPv4 header checksum and a correct TCP/UDP
/// checksum, has consecutive sequence numbers (FIN/PSH on the last only), and the peer
/// delivers it; the payloads put back together are the super-packet's.
pub fn from_tun_segmented(data: &[u8]) -> TunVerdict {
    let Some(hdr) = VnetHdr::parse(data) else { return TunVerdict::Drop(DropReason::BadOffload) };
    let ip = &data[VNET_HDR_LEN..];
    let mut net = Pair::vxlan();
    let (mut slot, n) = slot_with(ip);
    let mut pkt = PacketBuf::new(&mut slot, HEADROOM, n).unwrap();
    let seg = match gso::check_read(&hdr, pkt.as_mut_slice()) {
        Ok(Some(seg)) => seg,
        Ok(None) => {
            let v = net.a.from_tun(&net.routes_a, &mut pkt, net.now);
            check_tun_verdict(v, &pkt, &net);
            return v;
        }
        Err(e) => {
            let r = e.reason();
            assert!(matches!(r, DropReason::BadOffload | DropReason::BadIpHeader | DropReason::BadL4Header), "{e:?}");
            return TunVerdict::Drop(r);
        }
    };
    let original = pkt.as_slice().to_vec();
    assert_eq!(seg.headers_len() + (original.len() - seg.headers_len()), original.len());
    assert!(seg.segments() >= 1);
    let v = net.a.from_tun_segmented(&net.routes_a, &mut pkt, &seg, net.now);
    let TunVerdict::Send { to, .. } = v else {
        check_tun_verdict(v, &pkt, &net);
        return v;
    };
    assert_eq!(to, B_ENDPOINT.parse::<SocketAddr>().unwrap());
    let prefix = pkt.len() - original.len();
    assert_eq!(prefix, crate::encap::VxlanEncap::HEADER_LEN, "the whole super-packet behind one header");
    let mtu = usize::from(net.routes_a.peers()[0].mtu);
    assert!(seg.segment_len() <= mtu, "sent a super-packet whose segments exceed the path MTU");
    let (stride, per_train) = (prefix + seg.segment_len(), seg.segments_per_train(prefix));
    let wire_prefix = pkt.as_slice()[..prefix].to_vec();
    let sent = pkt.as_slice().to_vec();
    let (h, payload) = original.split_at(seg.headers_len());
    let tcp = original[if original[0] >> 4 == 6 { 6 } else { 9 }] == 6;
    let mut rebuilt = Vec::with_capacity(payload.len());
    let mut out = vec![0u8; per_train * stride];
    let mut first = 0;
    while first < seg.segments() {
        let range = first..(first + per_train).min(seg.segments());
        let written = seg.write_segments(&sent, prefix, range.clone(), &mut out).expect("a parsed super-packet cuts");
        assert!(written <= MAX_TRAIN_BYTES && range.len() <= MAX_TRAIN_SEGMENTS, "train over the GSO limits");
        for (k, i) in range.clone().enumerate() {
            let start = k * stride;
            let end = if i + 1 == seg.segments() { written } else { start + stride };
            assert!(end <= written && end - start <= stride, "segment {i} longer than the stride");
            let datagram = &out[start..end];
            assert_eq!(&datagram[..prefix], &wire_prefix[..], "segment {i} behind the encapsulation header");
            let inner = &datagram[prefix..];
            assert!(inner.len() <= mtu, "segment {i}: {} bytes over the path MTU {mtu}", inner.len());
            let chunk = check_segment(inner, h, i, seg.segments(), hdr.gso_size, tcp);
            rebuilt.extend_from_slice(chunk);
            assert!(matches!(decap_vxlan(datagram), UnderlayVerdict::Deliver { .. }), "B refuses segment {i}");
        }
        first = range.end;
    }
    assert_eq!(rebuilt, payload, "the segments' payloads are the super-packet's");
    v
}

/// Checks one segment `inner` (segment `i` of `count`) against the super-packet's headers
/// `h`; returns its payload.
fn check_segment<'a>(inner: &'a [u8], h: &[u8], i: usize, count: usize, mss: u16, tcp: bool) -> &'a [u8] {
    let p = PacketHeaders::from_ip_slice(inner).expect("segment parses as IP");
    let payload = p.payload.slice();
    let last = i + 1 == count;
    let want_len = if last { payload.len() } else { usize::from(mss) };
    assert_eq!(payload.len(), want_len, "segment {i} payload length");
    match (&p.net, &p.transport) {
        (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Tcp(t))) => {
            assert_eq!(usize::from(ip.total_len), inner.len());
            check_tcp_segment(t, h, i, mss, last);
        }
        (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Tcp(t))) => {
            assert_eq!(usize::from(ip.payload_length) + 40, inner.len());
            check_tcp_segment(t, h, i, mss, last);
        }
        (Some(NetHeaders::Ipv4(_, _) | NetHeaders::Ipv6(_, _)), Some(TransportHeader::Udp(u))) => {
            assert_eq!(usize::from(u.length), payload.len() + 8);
        }
        other => panic!("segment {i} is not TCP/UDP over IP: {other:?}"),
    }
    assert_eq!(matches!(p.transport, Some(TransportHeader::Tcp(_))), tcp);
    assert!(raw::ipv4_header_ok(inner), "segment {i}: IPv4 header checksum does not verify");
    assert!(raw::l4_checksum_ok(inner), "segment {i}: L4 checksum does not verify");
    payload
}

/// TCP header of segment `i`: the super-packet's sequence number plus `i` MSS (modulo
/// 2^32), FIN and PSH only where the super-packet had them and only on the last segment.
fn check_tcp_segment(t: &etherparse::TcpHeader, h: &[u8], i: usize, mss: u16, last: bool) {
    let (orig, _) =
        etherparse::TcpHeader::from_slice(&h[if h[0] >> 4 == 6 { 40 } else { usize::from(h[0] & 0xf) * 4 }..])
            .expect("the super-packet's TCP header parses");
    let want = orig.sequence_number.wrapping_add((i as u32).wrapping_mul(u32::from(mss)));
    assert_eq!(t.sequence_number, want, "segment {i} sequence number");
    assert_eq!((t.fin, t.psh), (last && orig.fin, last && orig.psh), "segment {i} FIN/PSH");
    assert_eq!(
        (t.syn, t.rst, t.ack, t.acknowledgment_number),
        (orig.syn, orig.rst, orig.ack, orig.acknowledgment_number)
    );
}

/// A run of datagrams received from peer A, merged for the TUN as a driver merges them.
/// Input: one options byte (bit 0: the TUN takes USO, so UDP merges too), then records of a
/// big-endian u16 length, a flags byte (bit 0: recompute the IPv4 header checksum, bit 1:
/// recompute the TCP/UDP checksum, so mutations still reach the merge rules, bit 2: then
/// leave it partial, as a kernel VTEP with checksum offload does) and that many
/// bytes of inner IP packet. Each packet goes to B inside a VXLAN frame (`from_underlay`, all
/// of its checks); what B delivers is merged ([`Coalesced`]). For every finished merge the
/// bytes a driver would write (virtio-net header, headers, payloads) are checked: a lone
/// packet goes out unchanged behind an all-zero header (a `NEEDS_CSUM` one pointing at its
/// field when its checksum is partial); a super-packet has a virtio-net
/// header consistent with it (GSO type, `csum_start`/`csum_offset`, `hdr_len`, `gso_size`),
/// valid IP lengths within 64 KiB, at most 64 segments, a correct IPv4 header checksum and,
/// once the partial checksum is completed as the kernel would, a correct L4 checksum; and
/// [`Segmentation`] accepts it and cuts it back into exactly the payloads merged.
/// Returns how many merged writes had two segments or more.
pub fn merge_underlay(data: &[u8]) -> usize {
    let Some((&opts, mut rest)) = data.split_first() else { return 0 };
    let uso = opts & 1 != 0;
    let mut net = Pair::vxlan();
    let from: SocketAddr = A_ENDPOINT.parse().unwrap();
    let mut delivered: Vec<Vec<u8>> = Vec::new();
    while let [hi, lo, flags, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (ip, next) = tail.split_at(len);
        rest = next;
        let mut ip = ip.to_vec();
        fix_checksums(&mut ip, *flags);
        let mut wire = vec![0u8; vxlan::HEADER_LEN + ethernet::HEADER_LEN];
        vxlan::VxlanHeader::new_unchecked(&mut wire[..8]).emit(vxlan::Vni::new(crate::testing::VNI).unwrap());
        let ethertype = if ip.first().is_some_and(|b| b >> 4 == 6) { 0x86dd } else { 0x0800 };
        EthernetFrame::new_unchecked(&mut wire[8..]).emit_header(B_MAC, A_MAC, ethertype);
        wire.extend_from_slice(&ip);
        let mut slot = vec![0u8; HEADROOM + wire.len()];
        slot[HEADROOM..].copy_from_slice(&wire);
        let mut pkt = PacketBuf::new(&mut slot, HEADROOM, wire.len()).unwrap();
        if let UnderlayVerdict::Deliver { .. } = net.b.from_underlay(&net.routes_b, from, &mut pkt) {
            delivered.push(pkt.as_slice().to_vec());
        }
    }
    let mut head = vec![0u8; 256];
    let mut merged = 0;
    let mut current: Option<(Coalesced, Vec<usize>)> = None;
    for (idx, ip) in delivered.iter().enumerate() {
        if let Some((c, members)) = &mut current {
            if c.append(ip, &mut head, &delivered[members[0]]) {
                members.push(idx);
                continue;
            }
        }
        if let Some((c, members)) = current.take() {
            merged += usize::from(check_merged(&c, &mut head, &members, &delivered, uso));
        }
        let c = Coalesced::start(ip, &mut head, uso).expect("256 bytes hold any packet's headers");
        current = Some((c, vec![idx]));
    }
    if let Some((c, members)) = current.take() {
        merged += usize::from(check_merged(&c, &mut head, &members, &delivered, uso));
    }
    merged
}

/// Recomputes the checksums of `ip` that `flags` asks for (see [`merge_underlay`]).
fn fix_checksums(ip: &mut [u8], flags: u8) {
    let v4 = ip.first().is_some_and(|b| b >> 4 == 4);
    let ihl = ip.first().map_or(0, |b| usize::from(b & 0xf) * 4);
    if flags & 1 != 0 && v4 && ihl >= 20 && ip.len() >= ihl {
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = !raw::rfc1071(&ip[..ihl]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    if flags & 2 != 0 {
        raw::fix_l4_checksum(ip);
    }
    if flags & 4 != 0 {
        raw::make_l4_checksum_partial(ip);
    }
}

/// The properties of one finished merge (see [`merge_underlay`]); `true` for a super-packet.
fn check_merged(c: &Coalesced, head: &mut [u8], members: &[usize], delivered: &[Vec<u8>], uso: bool) -> bool {
    assert_eq!(c.segments(), members.len());
    assert!(members.len() <= crate::gro::MAX_SEGMENTS, "more segments than one gathering write takes");
    let n = c.finish(head);
    assert!(n >= VNET_HDR_LEN, "finish wrote no virtio-net header");
    let hl = c.header_len();
    let mut bytes = head[..n].to_vec();
    for &m in members {
        bytes.extend_from_slice(&delivered[m][hl..]);
    }
    let vh = VnetHdr::parse(&bytes).unwrap();
    let first = &delivered[members[0]];
    if members.len() == 1 {
        let want = crate::partial::verified(first).map_or_else(VnetHdr::default, |p| p.vnet_hdr());
        assert_eq!(vh, want, "a lone packet: an all-zero header, or NEEDS_CSUM when partial");
        assert_eq!(&bytes[VNET_HDR_LEN..], &first[..], "a lone packet goes out unchanged");
        if vh.flags & F_NEEDS_CSUM != 0 {
            let mut done = first.clone();
            gso::complete_checksum(&mut done, usize::from(vh.csum_start), usize::from(vh.csum_offset)).unwrap();
            assert!(raw::l4_checksum_ok(&done), "a lone partial packet, completed, verifies");
        }
        return false;
    }
    let mut ip = bytes[VNET_HDR_LEN..].to_vec();
    let v6 = ip[0] >> 4 == 6;
    let l4 = if v6 { 40 } else { 20 };
    let tcp = ip[if v6 { 6 } else { 9 }] == 6;
    assert!(tcp || uso, "UDP merged without USO");
    let want_type = match (tcp, v6) {
        (true, false) => GSO_TCPV4,
        (true, true) => GSO_TCPV6,
        (false, _) => GSO_UDP_L4,
    };
    assert_eq!((vh.flags, vh.gso_type), (F_NEEDS_CSUM, want_type), "{vh:?}");
    assert_eq!((usize::from(vh.csum_start), vh.csum_offset), (l4, if tcp { 16 } else { 6 }), "{vh:?}");
    assert_eq!(usize::from(vh.hdr_len), hl);
    let mss = first.len() - hl;
    assert_eq!(usize::from(vh.gso_size), mss);
    for (k, &m) in members.iter().enumerate() {
        let p = delivered[m].len() - hl;
        assert!(p <= mss && (p == mss || k + 1 == members.len()), "only the last segment may be short");
    }
    if v6 {
        assert_eq!(usize::from(u16::from_be_bytes([ip[4], ip[5]])) + 40, ip.len(), "IPv6 payload length");
    } else {
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len(), "IPv4 total length");
    }
    assert!(ip.len() <= 65_535 + if v6 { 40 } else { 0 });
    gso::complete_checksum(&mut ip, usize::from(vh.csum_start), usize::from(vh.csum_offset)).unwrap();
    let p = PacketHeaders::from_ip_slice(&ip).expect("merged packet parses as IP");
    let payload = p.payload.slice();
    assert!(
        matches!(p.transport, Some(TransportHeader::Tcp(_) | TransportHeader::Udp(_))),
        "merged packet is not TCP/UDP: {:?}",
        p.transport
    );
    assert!(raw::ipv4_header_ok(&ip), "merged IPv4 header checksum does not verify");
    assert!(raw::l4_checksum_ok(&ip), "merged packet's L4 checksum does not verify");
    let expect: Vec<u8> = members.iter().flat_map(|&m| delivered[m][hl..].to_vec()).collect();
    assert_eq!(payload, &expect[..], "the merged payload is the members' payloads in order");
    // Our own segmentation takes what we merged and cuts it back into the same payloads.
    let seg = Segmentation::parse(&vh, &ip).expect("gso accepts what gro merged");
    assert_eq!(seg.segments(), members.len());
    let mut out = vec![0u8; seg.wire_bytes()];
    let written = seg.write_segments(&ip, 0, 0..seg.segments(), &mut out).unwrap();
    let stride = seg.segment_len();
    for (k, &m) in members.iter().enumerate() {
        let end = if k + 1 == members.len() { written } else { (k + 1) * stride };
        let cut = PacketHeaders::from_ip_slice(&out[k * stride..end]).unwrap();
        assert_eq!(cut.payload.slice(), &delivered[m][hl..], "re-cut segment {k}");
        if let (Some(TransportHeader::Tcp(a)), Some(TransportHeader::Tcp(b))) =
            (&cut.transport, &PacketHeaders::from_ip_slice(&delivered[m]).unwrap().transport)
        {
            assert_eq!(a.sequence_number, b.sequence_number, "re-cut segment {k} sequence number");
        }
    }
    true
}

/// A VXLAN datagram from peer A in TAP mode ([`crate::bridge::Bridge`]): whatever the bytes,
/// a delivered frame is a well-formed Ethernet frame no longer than the datagram, from A's
/// VTEP MAC to ours (or a group address), IPv4, IPv6 or ARP; its IP packet is well-formed
/// with padding trimmed and a correct IPv4 header checksum, from A's subnet to ours and
/// never to a martian (neighbour discovery aside, which may come from a link-local source
/// to a group); its ARP claims a sender in A's subnet and a target in ours. TAP mode never
/// answers a datagram itself.
pub fn decap_tap(data: &[u8]) -> UnderlayVerdict {
    let mut net = TapPair::new();
    let (mut slot, n) = slot_with(data);
    let mut pkt = PacketBuf::new(&mut slot, HEADROOM, n).unwrap();
    let from: SocketAddr = A_ENDPOINT.parse().unwrap();
    let v = net.b.from_underlay(&net.routes_b, from, &mut pkt, net.now);
    let peer = &net.routes_b.peers()[0];
    let local = crate::testing::local(2);
    match v {
        UnderlayVerdict::Deliver { .. } => {
            assert!(pkt.len() + vxlan::HEADER_LEN <= n, "delivered more than was received");
            let frame = EthernetFrame::new_checked(pkt.as_slice()).expect("delivered frame is Ethernet");
            assert_eq!(frame.src(), A_MAC, "delivered a frame not from the peer's VTEP MAC");
            assert!(frame.dst() == B_MAC || frame.dst().is_multicast(), "delivered a frame for another MAC");
            match frame.ethertype() {
                ethernet::ETHERTYPE_IPV4 | ethernet::ETHERTYPE_IPV6 => {
                    let ip = IpPacket::new_checked(frame.payload()).expect("delivered packet is well-formed IP");
                    assert_eq!(ip.total_len(), frame.payload().len(), "padding was trimmed");
                    assert!(ip.header_checksum_ok(), "delivered an IPv4 header whose checksum fails");
                    let ndp = matches!(&ip, IpPacket::V6(p) if p.next_header() == 58 && p.hop_limit() == 255
                        && matches!(p.payload().first(), Some(135 | 136)));
                    let link_local = matches!(ip.src(), IpAddr::V6(a) if a.is_unicast_link_local());
                    if ndp {
                        assert!(link_local || peer.owns(ip.src()), "neighbour discovery from a foreign source");
                    } else {
                        assert!(peer.owns(ip.src()), "delivered a packet from outside the peer's subnet");
                        assert!(local.owns(ip.dst()), "delivered a packet not for our subnet");
                        assert!(!frame.dst().is_multicast(), "delivered unicast IP to a group MAC");
                        assert!(!ip.dst().is_multicast() && !ip.dst().is_loopback(), "delivered to a martian");
                    }
                }
                ethernet::ETHERTYPE_ARP => {
                    let a = ArpPacket::new_checked(frame.payload()).expect("delivered ARP parses");
                    assert!(peer.owns(a.sender_ip().into()), "ARP from a foreign sender");
                    assert!(local.owns(a.target_ip().into()), "ARP for someone else");
                }
                other => panic!("delivered EtherType {other:#06x}"),
            }
        }
        UnderlayVerdict::Reply { .. } => panic!("TAP mode answered a datagram itself"),
        UnderlayVerdict::Consumed => panic!("TAP mode consumed a datagram"),
        UnderlayVerdict::Drop(r) => assert!(net.b.stats().drops(r) == 1, "dropped without counting {r:?}"),
    }
    v
}

/// Checksums recomputed the plain RFC 1071 way over the raw bytes, independent of
/// `wire::checksum` and of etherparse (whose `calc_checksum_*` rebuild the header from its
/// parsed fields and so drop reserved bits, which weft carries through unchanged).
pub(crate) mod raw {
    /// The folded one's-complement sum of `bytes` (not complemented).
    pub(crate) fn rfc1071(bytes: &[u8]) -> u16 {
        let mut acc: u64 = 0;
        for pair in bytes.chunks(2) {
            acc += u64::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    /// (L4 offset, protocol) of a packet without IPv6 extension headers.
    fn l4(ip: &[u8]) -> Option<(usize, u8)> {
        match ip.first()? >> 4 {
            4 => Some((usize::from(ip[0] & 0xf) * 4, *ip.get(9)?)),
            6 => Some((40, *ip.get(6)?)),
            _ => None,
        }
    }

    /// The pseudo-header (RFC 793 / RFC 8200 §8.1) of `ip`'s L4 bytes.
    fn pseudo(ip: &[u8]) -> Option<Vec<u8>> {
        let (at, proto) = l4(ip)?;
        let l4_len = ip.len().checked_sub(at)?;
        let v6 = ip[0] >> 4 == 6;
        let mut v = if v6 { ip.get(8..40)?.to_vec() } else { ip.get(12..20)?.to_vec() };
        if v6 {
            v.extend_from_slice(&(l4_len as u32).to_be_bytes());
            v.extend_from_slice(&[0, 0, 0, proto]);
        } else {
            v.extend_from_slice(&[0, proto]);
            v.extend_from_slice(&(l4_len as u16).to_be_bytes());
        }
        Some(v)
    }

    /// Pseudo-header followed by the L4 bytes of `ip`.
    fn pseudo_and_l4(ip: &[u8]) -> Option<Vec<u8>> {
        let mut v = pseudo(ip)?;
        v.extend_from_slice(ip.get(l4(ip)?.0..)?);
        Some(v)
    }

    /// Where the TCP/UDP checksum field of `ip` is, if it has one in its bytes, and the protocol.
    fn l4_field(ip: &[u8]) -> Option<(usize, u8)> {
        let (at, proto) = l4(ip)?;
        let field = match proto {
            6 => at + 16,
            17 => at + 6,
            _ => return None,
        };
        (ip.len() >= field + 2).then_some((field, proto))
    }

    /// Whether an IPv4 header's checksum verifies (IPv6 has none).
    pub(crate) fn ipv4_header_ok(ip: &[u8]) -> bool {
        match ip.first().map(|b| b >> 4) {
            Some(4) => ip.get(..usize::from(ip[0] & 0xf) * 4).is_some_and(|h| rfc1071(h) == 0xffff),
            _ => true,
        }
    }

    /// Whether the TCP/UDP checksum of `ip` verifies (an IPv4 UDP checksum of 0 means none).
    pub(crate) fn l4_checksum_ok(ip: &[u8]) -> bool {
        let Some((at, proto)) = l4(ip) else { return false };
        if proto == 17 && ip[0] >> 4 == 4 && ip.get(at + 6..at + 8) == Some(&[0, 0]) {
            return true;
        }
        pseudo_and_l4(ip).is_some_and(|v| rfc1071(&v) == 0xffff)
    }

    /// Leaves the TCP/UDP checksum of `ip` as a kernel VTEP with checksum offload does: the
    /// pseudo-header sum (of the L4 bytes present), not complemented.
    pub(crate) fn make_l4_checksum_partial(ip: &mut [u8]) {
        let (Some((field, _)), Some(p)) = (l4_field(ip), pseudo(ip)) else { return };
        ip[field..field + 2].copy_from_slice(&rfc1071(&p).to_be_bytes());
    }

    /// Rewrites the TCP/UDP checksum of `ip` to the correct one, if it has a place for it.
    pub(crate) fn fix_l4_checksum(ip: &mut [u8]) {
        let Some((field, proto)) = l4_field(ip) else { return };
        ip[field..field + 2].copy_from_slice(&[0, 0]);
        let Some(v) = pseudo_and_l4(ip) else { return };
        let mut c = !rfc1071(&v);
        if proto == 17 && c == 0 {
            c = 0xffff;
        }
        ip[field..field + 2].copy_from_slice(&c.to_be_bytes());
    }
}
