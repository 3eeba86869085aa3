//! Fuzz bodies as plain functions: the cargo-fuzz targets in `forwarder/fuzz/` call them, and
//! `tests/corpus_replay.rs` replays the seed corpus through them in every `cargo test`.
//!
//! Each body asserts properties, not only "no panic": whatever the bytes, a
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
        UnderlayVerdict::Deliver { ip: facts, .. } => {
            assert!(pkt.len() <= n, "delivered more than was received");
            let ip = IpPacket::new_checked(pkt.as_slice()).expect("delivered packet is well-formed IP");
            assert_eq!(facts, Some(ip.facts()), "the facts handed along are the delivered packet's");
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
    let mut facts = Vec::new();
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
        if let UnderlayVerdict::Deliver { ip: Some(f), .. } = net.b.from_underlay(&net.routes_b, from, &mut pkt) {
            delivered.push(pkt.as_slice().to_vec());
            facts.push(f);
        }
    }
    let mut head = vec![0u8; 256];
    let mut merged = 0;
    let mut current: Option<(Coalesced, Vec<usize>)> = None;
    for (idx, (ip, f)) in delivered.iter().zip(&facts).enumerate() {
        if let Some((c, members)) = &mut current {
            if c.append(ip, f, &mut head, &delivered[members[0]]) {
                members.push(idx);
                continue;
            }
        }
        if let Some((c, members)) = current.take() {
            merged += usize::from(check_merged(&c, &mut head, &members, &delivered, uso));
        }
        let c = Coalesced::start(ip, f, &mut head, uso).expect("256 bytes hold any packet's headers");
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
        let f = IpPacket::new_checked(&first[..]).expect("delivered IP").facts();
        let want = crate::partial::verified(first, &f).map_or_else(VnetHdr::default, |p| p.vnet_hdr());
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

pub use wg::{
    HS_A_INDEX, HS_B_INDEX, HsOutcome, WG_A_INDEX, WG_B_INDEX, WgOutcome, decap_wireguard, wireguard_handshake,
};

/// The `wireguard` backend's targets: [`decap_wireguard`] (data messages between two nodes
/// with a session) and [`wireguard_handshake`] (the handshake messages).
///
/// The cryptography they check against is written here again, straight from the whitepaper
/// (§5.4) with `ring` and `blake2` and none of `crate::wireguard`'s code: a data message is
/// type 4, three zero bytes, the receiver's index and a 64-bit counter (little-endian), then
/// ChaCha20-Poly1305 of the inner packet under the sender's key, nonce = 4 zero bytes and
/// the counter, no associated data; `mac1` is keyed BLAKE2s-128 over the message before it,
/// keyed with `BLAKE2s("mac1----" || receiver's public key)`.
///
/// For the data target one real handshake per thread makes the keys (a new pair of nodes
/// and a handshake cost about 30 X25519 operations, ~1 ms, which would cap a run at a
/// thousand inputs a second); every input then gets fresh keypairs, forwarders, counters and
/// queues built from them, so it runs from the same state whatever ran before. The handshake
/// target keeps A's pending initiation (and B's real answer to it) across inputs and makes a
/// new one only once an input has used it up; flag 2 checks within one input that it
/// survived what that input did.
mod wg {
    use std::cell::RefCell;
    use std::net::SocketAddr;
    use std::ops::Range;
    use std::sync::Arc;
    use std::sync::mpsc::{Receiver, sync_channel};
    use std::time::{Duration, Instant};

    use blake2::digest::consts::U16;
    use blake2::digest::{FixedOutput as _, KeyInit as _};
    use blake2::{Blake2s256, Blake2sMac};
    use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

    use super::slot_with;
    use crate::buf::{HEADROOM, PacketBuf, SLOT_LEN};
    use crate::forwarder::{Forwarder, TunVerdict, UnderlayVerdict};
    use crate::route::RouteTable;
    use crate::stats::{DropReason, WorkerStats};
    use crate::testing::{A_ENDPOINT, B_ENDPOINT, Pair, WgSide, local};
    use crate::wire::ip::IpPacket;
    use crate::wireguard::handshake::{COOKIE_REPLY_LEN, INITIATION_LEN, RESPONSE_LEN, tai64n};
    use crate::wireguard::replay::WINDOW;
    use crate::wireguard::{
        DATA_HEADER_LEN, Established, HandshakeDatagram, HandshakeError, Handshaker, Keypair, PeerCrypto, PrivateKey,
        PublicKey, SessionTable, TAG_LEN, WireGuardEncap,
    };

    /// A's receive index in [`decap_wireguard`]'s session (what B's data messages carry).
    pub const WG_A_INDEX: u32 = 0x0a0a_0a01;
    /// B's receive index in [`decap_wireguard`]'s session: the receiver of A's data messages.
    pub const WG_B_INDEX: u32 = 0x0b0b_0b02;
    /// The initiator's index in [`wireguard_handshake`].
    pub const HS_A_INDEX: u32 = 0x1111_0001;
    /// The responder's index in [`wireguard_handshake`].
    pub const HS_B_INDEX: u32 = 0x2222_0002;

    /// The whitepaper's constructions, independent of `crate::wireguard`.
    mod reference {
        use super::*;

        fn nonce(counter: u64) -> Nonce {
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&counter.to_le_bytes());
            Nonce::assume_unique_for_key(n)
        }

        fn key(k: &[u8; 32]) -> LessSafeKey {
            LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, k).unwrap())
        }

        /// A data message to `receiver` carrying `plain`.
        pub(super) fn seal(k: &[u8; 32], receiver: u32, counter: u64, plain: &[u8]) -> Vec<u8> {
            let mut out = vec![4, 0, 0, 0];
            out.extend_from_slice(&receiver.to_le_bytes());
            out.extend_from_slice(&counter.to_le_bytes());
            let mut body = plain.to_vec();
            let tag = key(k).seal_in_place_separate_tag(nonce(counter), Aad::empty(), &mut body).unwrap();
            out.extend_from_slice(&body);
            out.extend_from_slice(tag.as_ref());
            out
        }

        /// The plaintext of a data message's `sealed` part (ciphertext and tag), if it is
        /// authentic under `k` and `counter`.
        pub(super) fn open(k: &[u8; 32], counter: u64, sealed: &[u8]) -> Option<Vec<u8>> {
            let mut b = sealed.to_vec();
            key(k).open_in_place(nonce(counter), Aad::empty(), &mut b).ok().map(|p| p.to_vec())
        }

        /// `mac1` of a handshake message for `to`, over `body` (the message before the MAC).
        pub(super) fn mac1(to: &PublicKey, body: &[u8]) -> [u8; 16] {
            let mut h = <Blake2s256 as blake2::Digest>::new();
            blake2::Digest::update(&mut h, b"mac1----");
            blake2::Digest::update(&mut h, to.0);
            let k: [u8; 32] = blake2::Digest::finalize(h).into();
            let mut m = <Blake2sMac<U16>>::new_from_slice(&k).unwrap();
            blake2::digest::Mac::update(&mut m, body);
            m.finalize_fixed().into()
        }
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// A handshake `a` → `b` as [`Pair::wg_handshake`] runs it, giving both sides' keys
    /// instead of installing them.
    fn handshake(a: &mut WgSide, b: &mut WgSide, ia: u32, ib: u32) -> (Established, Established) {
        let init = a.handshaker.initiate(&b.handshaker.public_key(), ia, tai64n(Duration::from_secs(1))).unwrap();
        let pa = a.handshaker.public_key();
        let (resp, eb) = b.handshaker.on_initiation(&init, ib, |k| *k == pa).unwrap();
        let ea = a.handshaker.on_response(&resp).unwrap();
        assert_eq!((ea.send, ea.recv), (eb.recv, eb.send), "both sides derive the same keys");
        assert_eq!((ea.local_index, ea.remote_index, eb.local_index, eb.remote_index), (ia, ib, ib, ia));
        (ea, eb)
    }

    /// What the data target keeps per thread: the two nodes' routes, session tables and peer
    /// state (from [`Pair::wireguard`]) and the keys of one real handshake between them.
    struct WgNet {
        routes_a: RouteTable,
        routes_b: RouteTable,
        sessions_a: Arc<SessionTable>,
        sessions_b: Arc<SessionTable>,
        /// A's state for B, B's for A.
        peer_a: Arc<PeerCrypto>,
        peer_b: Arc<PeerCrypto>,
        ea: Established,
        eb: Established,
        now: Instant,
    }

    impl WgNet {
        fn new() -> Self {
            let (net, mut wa, mut wb) = Pair::wireguard();
            let (ea, eb) = handshake(&mut wa, &mut wb, WG_A_INDEX, WG_B_INDEX);
            Self {
                routes_a: net.routes_a,
                routes_b: net.routes_b,
                sessions_a: wa.sessions,
                sessions_b: wb.sessions,
                peer_a: wa.peer,
                peer_b: wb.peer,
                ea,
                eb,
                now: net.now,
            }
        }
    }

    thread_local! {
        static WG_NET: WgNet = WgNet::new();
        static HS: RefCell<Hs> = RefCell::new(Hs::new());
    }

    /// What [`decap_wireguard`] saw: A's verdict on the inner packet (mode 1), and B's on
    /// every datagram it received, in order.
    #[derive(Clone, Debug, Default, Eq, PartialEq)]
    pub struct WgOutcome {
        pub tun: Option<TunVerdict>,
        pub underlay: Vec<UnderlayVerdict>,
    }

    /// What B must do with a datagram from A's endpoint, decided from the bytes alone (and
    /// the counters accepted so far).
    #[derive(Debug)]
    enum Expect {
        /// Refused before or by authentication.
        Drop(DropReason),
        /// A handshake message of its exact length: queued for the control thread.
        Handshake,
        /// An authentic data message that opens to `plain`.
        Authentic { counter: u64, plain: Vec<u8> },
    }

    /// One input's run: fresh forwarders, counters, queues and keypairs on [`WgNet`]'s keys,
    /// installed as [`Pair::wg_handshake`] installs them (A's at once, B's as `next`).
    struct WgRun<'n> {
        n: &'n WgNet,
        a: Forwarder<WireGuardEncap>,
        b: Forwarder<WireGuardEncap>,
        queue_b: Receiver<HandshakeDatagram>,
        _queue_a: Receiver<HandshakeDatagram>,
        ka: Arc<Keypair>,
        kb: Arc<Keypair>,
        accepted: Vec<u64>,
        out: WgOutcome,
    }

    fn drops<E: crate::encap::Encap>(f: &Forwarder<E>) -> Vec<u64> {
        DropReason::ALL.iter().map(|r| f.stats().drops(*r)).collect()
    }

    /// The drop counters that moved between `before` and `after`, and by how much.
    fn moved(before: &[u64], after: &[u64]) -> Vec<(DropReason, u64)> {
        DropReason::ALL
            .iter()
            .zip(before.iter().zip(after))
            .filter(|(_, (b, a))| a != b)
            .map(|(r, (b, a))| (*r, a - b))
            .collect()
    }

    impl<'n> WgRun<'n> {
        fn start(n: &'n WgNet) -> Self {
            for p in [&n.peer_a, &n.peer_b] {
                p.current.store(None);
                p.previous.store(None);
                p.next.store(None);
                for c in [&p.authenticated, &p.failed, &p.no_session] {
                    c.store(0, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let (ka, kb) = (Arc::new(Keypair::new(&n.ea, n.now)), Arc::new(Keypair::new(&n.eb, n.now)));
            n.sessions_a.insert(&ka);
            n.sessions_b.insert(&kb);
            n.peer_a.install(Arc::clone(&ka));
            n.peer_b.install(Arc::clone(&kb));
            let (tx_a, queue_a) = sync_channel(16);
            let (tx_b, queue_b) = sync_channel(16);
            let fwd = |s: &Arc<SessionTable>, tx, third| {
                Forwarder::new(
                    WireGuardEncap::new(Arc::clone(s), tx),
                    local(third),
                    0,
                    Arc::new(WorkerStats::default()),
                )
            };
            Self {
                a: fwd(&n.sessions_a, tx_a, 1),
                b: fwd(&n.sessions_b, tx_b, 2),
                n,
                queue_b,
                _queue_a: queue_a,
                ka,
                kb,
                accepted: Vec::new(),
                out: WgOutcome::default(),
            }
        }

        /// The model of B's receive path (whitepaper §5.4.6 and the replay window of
        /// `crate::wireguard::replay`), with the reference cipher.
        fn expect(&self, b: &[u8]) -> Expect {
            if b.is_empty() {
                return Expect::Drop(DropReason::EmptyPayload);
            }
            let t = match b.get(..4) {
                Some(&[t, 0, 0, 0]) => t,
                _ => return Expect::Drop(DropReason::BadMessage),
            };
            match (t, b.len()) {
                (4, n) if n >= DATA_HEADER_LEN + TAG_LEN => {}
                (4, _) => return Expect::Drop(DropReason::Truncated),
                (1, INITIATION_LEN) | (2, RESPONSE_LEN) | (3, COOKIE_REPLY_LEN) => return Expect::Handshake,
                _ => return Expect::Drop(DropReason::BadMessage),
            }
            if le32(b, 4) != WG_B_INDEX {
                return Expect::Drop(DropReason::AuthFailed);
            }
            let counter = u64::from_le_bytes(b[8..16].try_into().unwrap());
            let top = self.accepted.iter().max().map_or(0, |c| c + 1);
            if counter == u64::MAX || counter.saturating_add(WINDOW as u64) < top {
                return Expect::Drop(DropReason::Replayed);
            }
            let Some(plain) = reference::open(&self.n.eb.recv, counter, &b[DATA_HEADER_LEN..]) else {
                return Expect::Drop(DropReason::AuthFailed);
            };
            let w = WINDOW as u64;
            if self.accepted.iter().any(|&c| c % w == counter % w && c >= counter) {
                return Expect::Drop(DropReason::Replayed);
            }
            Expect::Authentic { counter, plain }
        }

        /// B receives `datagram` from A's endpoint; asserts the verdict, the counters and the
        /// handshake queue against [`Self::expect`]. Returns the verdict and what the buffer
        /// held after it.
        fn b_receive(&mut self, datagram: &[u8]) -> (UnderlayVerdict, Vec<u8>) {
            let (mut slot, n) = slot_with(datagram);
            let datagram = &datagram[..n];
            let expect = self.expect(datagram);
            let peer = &self.n.peer_b;
            let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            let (before, auth0, fail0) = (drops(&self.b), load(&peer.authenticated), load(&peer.failed));
            let from: SocketAddr = A_ENDPOINT.parse().unwrap();
            let mut pkt = PacketBuf::new(&mut slot, HEADROOM, n).unwrap();
            let v = self.b.from_underlay(&self.n.routes_b, from, &mut pkt);
            let delivered = pkt.as_slice().to_vec();
            self.out.underlay.push(v);
            let changed = moved(&before, &drops(&self.b));
            let (auth, failed) = (load(&peer.authenticated) - auth0, load(&peer.failed) - fail0);
            let queued = self.queue_b.try_recv().ok();
            match expect {
                Expect::Drop(r) => {
                    assert_eq!(v, UnderlayVerdict::Drop(r), "B's verdict on {datagram:02x?}");
                    assert_eq!(changed, [(r, 1)], "dropped {r:?}: counted once, under its reason");
                    let refused = matches!(r, DropReason::AuthFailed | DropReason::Replayed);
                    assert_eq!((auth, failed), (0, u64::from(refused)), "peer counters for {r:?}");
                    assert!(queued.is_none(), "a dropped datagram was queued");
                }
                Expect::Handshake => {
                    assert_eq!(v, UnderlayVerdict::Consumed, "a handshake message of its length is queued");
                    assert!(changed.is_empty() && (auth, failed) == (0, 0));
                    let q = queued.expect("the consumed handshake message is on the queue");
                    assert_eq!((q.message(), q.from), (datagram, from), "queued as received, with its sender");
                }
                Expect::Authentic { counter, plain } => {
                    self.accepted.push(counter);
                    assert_eq!((auth, failed), (1, 0), "an authentic datagram counted as one ({v:?})");
                    assert!(queued.is_none(), "an authentic data message was queued");
                    let current = peer.current.load_full();
                    assert!(
                        current.is_some_and(|c| Arc::ptr_eq(&c, &self.kb)),
                        "A's first datagram confirms B's keypair"
                    );
                    assert!(peer.next.load().is_none());
                    if plain.is_empty() {
                        assert_eq!(v, UnderlayVerdict::Consumed, "a keepalive is consumed");
                        assert!(changed.is_empty());
                    } else {
                        self.check_inner(v, &delivered, &plain, &changed);
                    }
                }
            }
            (v, delivered)
        }

        /// B's verdict on an authentic datagram that opened to `plain`: the cleartext
        /// formats' inner checks, and the same verdict as flannel-udp on the same packet
        /// (except that WireGuard leaves the TTL alone).
        fn check_inner(&self, v: UnderlayVerdict, delivered: &[u8], plain: &[u8], changed: &[(DropReason, u64)]) {
            match v {
                UnderlayVerdict::Deliver { .. } => {
                    assert!(changed.is_empty(), "delivered and counted a drop {changed:?}");
                    assert!(delivered.len() <= plain.len(), "delivered more than was sealed");
                    assert_eq!(delivered, &plain[..delivered.len()], "delivered bytes are the plaintext");
                    let ip = IpPacket::new_checked(delivered).expect("delivered packet is well-formed IP");
                    assert_eq!(ip.total_len(), delivered.len(), "padding was trimmed");
                    assert!(ip.header_checksum_ok(), "delivered an IPv4 header whose checksum fails");
                    assert!(self.n.routes_b.peers()[0].owns(ip.src()), "delivered a packet from outside A's subnet");
                    let local = local(2);
                    assert!(local.owns(ip.dst()), "delivered a packet not for our subnet");
                    assert!(!local.is_martian_dst(ip.dst()), "delivered to a martian");
                }
                UnderlayVerdict::Drop(r) => {
                    assert!(
                        matches!(
                            r,
                            DropReason::Truncated
                                | DropReason::BadIpHeader
                                | DropReason::BadInnerChecksum
                                | DropReason::ForeignSource
                                | DropReason::Martian
                                | DropReason::NotLocalDestination
                        ),
                        "an authentic datagram dropped for {r:?}"
                    );
                    assert_eq!(changed, [(r, 1)], "dropped {r:?}: counted once");
                }
                other => panic!("an authentic data message gave {other:?}"),
            }
            if plain.len() >= 20 {
                let mut udp = Pair::new();
                let (mut slot, n) = slot_with(plain);
                let mut pkt = PacketBuf::new(&mut slot, HEADROOM, n).unwrap();
                let vu = udp.b.from_underlay(&udp.routes_b, A_ENDPOINT.parse().unwrap(), &mut pkt);
                match (v, vu) {
                    (UnderlayVerdict::Deliver { .. }, UnderlayVerdict::Deliver { .. }) => {
                        assert_eq!(pkt.len(), delivered.len(), "flannel-udp delivers as much")
                    }
                    (UnderlayVerdict::Deliver { .. }, UnderlayVerdict::Drop(DropReason::TtlExpired)) => {}
                    (UnderlayVerdict::Drop(r), UnderlayVerdict::Drop(ru)) => assert_eq!(r, ru, "flannel-udp's reason"),
                    (v, vu) => panic!("WireGuard {v:?}, flannel-udp {vu:?} on the same inner packet"),
                }
            }
        }

        /// A sealed `wire` (counter as sealed) reaches B: first with one byte of it XORed
        /// with `flip`'s mask if there is one (never delivered), then as sealed (authentic;
        /// delivered as `must_deliver` if given), then again (a replay).
        fn exchange(&mut self, wire: &[u8], flip: Option<(usize, u8)>, must_deliver: Option<&[u8]>) {
            if let Some((at, mask)) = flip {
                let mut bad = wire.to_vec();
                let at = at % bad.len();
                bad[at] ^= mask;
                let (v, _) = self.b_receive(&bad);
                let as_handshake = matches!(bad[..4], [1..=3, 0, 0, 0]);
                assert!(
                    matches!(
                        v,
                        UnderlayVerdict::Drop(
                            DropReason::AuthFailed
                                | DropReason::Replayed
                                | DropReason::BadMessage
                                | DropReason::Truncated
                        )
                    ) || (v == UnderlayVerdict::Consumed && as_handshake),
                    "a datagram tampered at byte {at}: {v:?}"
                );
            }
            let accepted = self.accepted.len();
            let (v, delivered) = self.b_receive(wire);
            assert_eq!(self.accepted.len(), accepted + 1, "what A sealed is authentic to B ({v:?})");
            if let Some(inner) = must_deliver {
                assert!(matches!(v, UnderlayVerdict::Deliver { .. }), "B refuses what A sent: {v:?}");
                assert_eq!(delivered, inner, "B delivers what A read from its TUN");
            }
            let (again, _) = self.b_receive(wire);
            assert_eq!(again, UnderlayVerdict::Drop(DropReason::Replayed), "the same datagram twice");
        }

        /// Mode 1: `inner` read from A's TUN.
        fn through_tun(&mut self, inner: &[u8], flip: Option<(usize, u8)>) {
            let (mut slot, n) = slot_with(inner);
            let inner = &inner[..n];
            let before = drops(&self.a);
            let mut pkt = PacketBuf::new(&mut slot, HEADROOM, n).unwrap();
            let v = self.a.from_tun(&self.n.routes_a, &mut pkt, self.n.now);
            self.out.tun = Some(v);
            let changed = moved(&before, &drops(&self.a));
            match v {
                TunVerdict::Drop(r) => {
                    assert_eq!(changed, [(r, 1)], "dropped {r:?}: counted once");
                    assert!(
                        matches!(
                            r,
                            DropReason::EmptyPayload
                                | DropReason::BadIpHeader
                                | DropReason::BadInnerChecksum
                                | DropReason::Martian
                                | DropReason::TxForeignSource
                                | DropReason::NoRoute
                                | DropReason::Oversize
                        ),
                        "A dropped a packet for {r:?} with a session up"
                    );
                }
                TunVerdict::Reply => {
                    assert!(
                        matches!(changed[..], [(DropReason::NoRoute | DropReason::Oversize, 1)]),
                        "an ICMP error for a counted drop: {changed:?}"
                    );
                    let ip = IpPacket::new_checked(pkt.as_slice()).expect("ICMP reply is well-formed IP");
                    assert!(pkt.len() <= crate::wire::icmp::V6_ERROR_MAX);
                    let orig = IpPacket::new_checked(inner).unwrap();
                    assert_eq!(ip.dst(), orig.src(), "the ICMP error goes back to the sender");
                }
                TunVerdict::Flood => panic!("TUN mode never floods"),
                TunVerdict::Send { to, .. } => {
                    assert!(changed.is_empty(), "sent and counted a drop {changed:?}");
                    assert_eq!(to, B_ENDPOINT.parse::<SocketAddr>().unwrap());
                    let wire = pkt.as_slice().to_vec();
                    let trimmed = &inner[..IpPacket::new_checked(inner).unwrap().total_len()];
                    assert_eq!(
                        wire,
                        reference::seal(&self.n.ea.send, WG_B_INDEX, 0, trimmed),
                        "A's datagram is the whitepaper's data message"
                    );
                    assert_eq!(self.ka.sent(), 1);
                    self.exchange(&wire, flip, Some(trimmed));
                }
            }
        }

        /// Mode 2: A seals `plain` itself, whatever it is (a peer that authenticates but
        /// sends garbage).
        fn sealed(&mut self, plain: &[u8], flip: Option<(usize, u8)>) {
            let plain = &plain[..plain.len().min(SLOT_LEN - HEADROOM - DATA_HEADER_LEN - TAG_LEN)];
            let counter = self.ka.reserve(1).unwrap();
            let mut body = plain.to_vec();
            let mut tag = [0u8; TAG_LEN];
            self.ka.seal(counter, &mut body, &mut tag).unwrap();
            let mut wire = vec![4, 0, 0, 0];
            wire.extend_from_slice(&WG_B_INDEX.to_le_bytes());
            wire.extend_from_slice(&counter.to_le_bytes());
            wire.extend_from_slice(&body);
            wire.extend_from_slice(&tag);
            assert_eq!(wire, reference::seal(&self.n.ea.send, WG_B_INDEX, counter, plain), "Keypair::seal");
            self.exchange(&wire, flip, None);
        }
    }

    /// A WireGuard data path between A and B with a session (keys from a real handshake).
    /// The first byte picks the mode (modulo 3):
    /// - 0: the rest is a datagram from A's endpoint to B;
    /// - 1: `[pos_lo, pos_hi, mask]`, then a packet A reads from its TUN and sends;
    /// - 2: the same, then bytes A seals as a data message as they are (authentic garbage).
    ///
    /// In modes 1 and 2, a nonzero `mask` first delivers the sealed datagram with the byte
    /// at `pos` (modulo its length) XORed with it.
    ///
    /// Every datagram B receives is checked against a model of the receive path built on the
    /// reference cipher: an empty one, a bad type or reserved byte, a short data message, an
    /// unknown receiver index, a counter outside the replay window or seen, or a tag that
    /// does not verify is dropped under exactly that reason, counted once (and as a failure
    /// of the peer when authentication or the window refused it); a handshake message of its
    /// exact length (148/92/64) is consumed and queued as received; only an authentic data
    /// message is counted authentic, confirms B's keypair, and is consumed (a keepalive),
    /// delivered (the plaintext, trimmed: well-formed IP from A's subnet to ours, not a
    /// martian) or dropped for an inner reason, as flannel-udp would. So random bytes are
    /// never delivered unless they are what A's key seals. What A sends is the reference
    /// data message; B delivers it exactly once as A read it, whatever tampered copy came
    /// first, and refuses it as a replay after.
    pub fn decap_wireguard(data: &[u8]) -> WgOutcome {
        WG_NET.with(|n| {
            let mut run = WgRun::start(n);
            let Some((&mode, rest)) = data.split_first() else {
                let _ = run.b_receive(&[]);
                return run.out;
            };
            let (flip, payload) = match rest {
                [lo, hi, mask, p @ ..] => {
                    ((*mask != 0).then(|| (usize::from(u16::from_le_bytes([*lo, *hi])), *mask)), p)
                }
                _ => (None, &[][..]),
            };
            match mode % 3 {
                0 => {
                    let _ = run.b_receive(rest);
                }
                1 => run.through_tun(payload, flip),
                _ => run.sealed(payload, flip),
            }
            run.out
        })
    }

    /// The result of one handshake call in [`wireguard_handshake`].
    #[derive(Clone, Copy, Debug, Eq, PartialEq)]
    pub enum HsOutcome {
        Ok,
        Malformed,
        BadMac,
        Auth,
        UnknownPeer,
        Replayed,
        NoPending,
        Noise,
    }

    fn outcome<T>(r: &Result<T, HandshakeError>) -> HsOutcome {
        match r {
            Ok(_) => HsOutcome::Ok,
            Err(HandshakeError::Malformed) => HsOutcome::Malformed,
            Err(HandshakeError::BadMac) => HsOutcome::BadMac,
            Err(HandshakeError::Auth) => HsOutcome::Auth,
            Err(HandshakeError::UnknownPeer) => HsOutcome::UnknownPeer,
            Err(HandshakeError::Replayed) => HsOutcome::Replayed,
            Err(HandshakeError::NoPending) => HsOutcome::NoPending,
            Err(HandshakeError::Noise(_)) => HsOutcome::Noise,
        }
    }

    /// A's initiation to B, B's response to it and B's keys: A's initiation under
    /// [`HS_A_INDEX`] is pending while these are armed.
    #[derive(Clone)]
    struct Armed {
        init: [u8; INITIATION_LEN],
        resp: [u8; RESPONSE_LEN],
        eb: Established,
    }

    /// The handshake target's state per thread: initiator A, responder B (fresh keys).
    struct Hs {
        a: Handshaker,
        b: Handshaker,
        pa: PublicKey,
        pb: PublicKey,
        armed: Option<Armed>,
        stamp: u64,
    }

    impl Hs {
        fn new() -> Self {
            let (ka, kb) = (PrivateKey::generate().unwrap(), PrivateKey::generate().unwrap());
            let (a, b) = (Handshaker::new(ka, [0; 32]), Handshaker::new(kb, [0; 32]));
            let (pa, pb) = (a.public_key(), b.public_key());
            Self { a, b, pa, pb, armed: None, stamp: 0 }
        }

        /// A pending initiation of A's and B's real answer to it.
        fn arm(&mut self) -> Armed {
            if let Some(a) = &self.armed {
                return a.clone();
            }
            self.stamp += 1;
            let init = self.a.initiate(&self.pb, HS_A_INDEX, tai64n(Duration::from_secs(self.stamp))).unwrap();
            assert_eq!((&init[..4], le32(&init, 4)), (&[1, 0, 0, 0][..], HS_A_INDEX), "initiation header");
            assert_eq!(init[116..132], reference::mac1(&self.pb, &init[..116]), "initiation mac1");
            assert_eq!(init[132..], [0; 16], "mac2 is sent as zeros");
            self.b.retain_peers(|_| false);
            let pa = self.pa;
            let (resp, eb) = self.b.on_initiation(&init, HS_B_INDEX, |k| *k == pa).unwrap();
            self.check_response(&resp, &eb, HS_A_INDEX);
            let armed = Armed { init, resp, eb };
            self.armed = Some(armed.clone());
            armed
        }

        /// A response B sent to an initiation from `to` and B's keys from it.
        fn check_response(&self, resp: &[u8; RESPONSE_LEN], eb: &Established, to: u32) {
            assert_eq!(
                (&resp[..4], le32(resp, 4), le32(resp, 8)),
                (&[2, 0, 0, 0][..], HS_B_INDEX, to),
                "response header"
            );
            assert_eq!(resp[60..76], reference::mac1(&self.pa, &resp[..60]), "response mac1");
            assert_eq!(resp[76..], [0; 16], "mac2 is sent as zeros");
            assert_eq!((eb.peer, eb.local_index, eb.remote_index, eb.initiator), (self.pa, HS_B_INDEX, to, false));
        }

        /// A's keys from a response to its pending initiation, B's being `eb`, with B's
        /// sender index `remote`.
        fn check_initiator(&self, ea: &Established, eb: &Established, remote: u32) {
            assert_eq!((ea.peer, ea.local_index, ea.remote_index, ea.initiator), (self.pb, HS_A_INDEX, remote, true));
            assert_eq!((ea.send, ea.recv), (eb.recv, eb.send), "both sides derive the same keys");
            assert_ne!(ea.send, ea.recv);
        }

        /// A takes B's real response: its initiation must still be pending (`true`) or gone.
        fn finish(&mut self, armed: &Armed, pending: bool, out: &mut Vec<HsOutcome>) {
            let r = self.a.on_response(&armed.resp);
            out.push(outcome(&r));
            match r {
                Ok(ea) => {
                    assert!(pending, "a response completed an initiation already answered");
                    self.check_initiator(&ea, &armed.eb, HS_B_INDEX);
                }
                Err(e) => {
                    assert!(!pending, "the pending initiation was lost: {e:?}");
                    assert!(matches!(e, HandshakeError::NoPending), "{e:?}");
                }
            }
            self.armed = None;
        }
    }

    /// Applies `(position, xor)` pairs to `msg`.
    fn mutate(msg: &mut [u8], pairs: &[u8]) {
        for p in pairs.chunks_exact(2) {
            let at = usize::from(p[0]) % msg.len();
            msg[at] ^= p[1];
        }
    }

    /// WireGuard's handshake messages, arbitrary or tampered, against the handshaker of
    /// responder B and of initiator A, which has an initiation to B pending. The first byte
    /// `m` picks a mode (`m % 3`) and flags (`m / 3`: bit 0 recomputes `mac1` after the
    /// changes, so that they reach the Noise layer, as anyone knowing the receiver's public
    /// key can; bit 1 then hands A B's real response; bit 2 makes B know no peer):
    /// - 0: the rest is given to B as an initiation and to A as a response. Unless it is the
    ///   real message (as random bytes cannot be), it is refused as malformed (length, type
    ///   or reserved bytes) or for its `mac1`, and the pending initiation survives it;
    /// - 1: the rest is `(position, xor)` pairs applied to A's real initiation. Unchanged
    ///   (or changed only in `mac2`, which is not checked) it completes, and B answers with a
    ///   response A accepts and the same keys; changed in the header it is malformed, elsewhere
    ///   a bad `mac1`; with `mac1` recomputed, a changed sender index completes towards that
    ///   index and any change in the Noise part fails to authenticate; it completes once;
    /// - 2: the same on B's real response to A: unchanged (or in `mac2`) A completes with B's
    ///   keys; a bad header or `mac1` is refused and the initiation stays pending; with `mac1`
    ///   recomputed, another receiver index matches nothing pending, another sender index
    ///   completes towards it, and a change in the Noise part fails and ends the initiation.
    pub fn wireguard_handshake(data: &[u8]) -> Vec<HsOutcome> {
        HS.with(|hs| {
            let mut hs = hs.borrow_mut();
            let (mode, flags, rest) = data.split_first().map_or((0, 0, &[][..]), |(m, r)| (m % 3, m / 3, r));
            let (fix, check, unknown) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
            let armed = hs.arm();
            let (pa, pb) = (hs.pa, hs.pb);
            let known = move |k: &PublicKey| !unknown && *k == pa;
            let mut out = Vec::new();
            match mode {
                0 => {
                    let msg = rest;
                    hs.b.retain_peers(|_| false);
                    let r = hs.b.on_initiation(msg, HS_B_INDEX, known);
                    let want = if msg.len() != INITIATION_LEN || msg[..4] != [1, 0, 0, 0] {
                        HsOutcome::Malformed
                    } else if msg[..132] != armed.init[..132] {
                        HsOutcome::BadMac
                    } else if unknown {
                        HsOutcome::UnknownPeer
                    } else {
                        HsOutcome::Ok
                    };
                    assert_eq!(outcome(&r), want, "initiation {msg:02x?}");
                    out.push(want);
                    let r = hs.a.on_response(msg);
                    let want = if msg.len() != RESPONSE_LEN || msg[..4] != [2, 0, 0, 0] {
                        HsOutcome::Malformed
                    } else if msg[..76] != armed.resp[..76] {
                        HsOutcome::BadMac
                    } else {
                        HsOutcome::Ok
                    };
                    assert_eq!(outcome(&r), want, "response {msg:02x?}");
                    out.push(want);
                    if let Ok(ea) = r {
                        hs.check_initiator(&ea, &armed.eb, HS_B_INDEX);
                        hs.armed = None;
                    } else if check {
                        hs.finish(&armed, true, &mut out);
                    }
                }
                1 => {
                    let mut msg = armed.init;
                    mutate(&mut msg, rest);
                    if fix {
                        let m = reference::mac1(&pb, &msg[..116]);
                        msg[116..132].copy_from_slice(&m);
                    }
                    let changed = |r: Range<usize>| r.into_iter().any(|i| msg[i] != armed.init[i]);
                    let want = if !changed(0..132) {
                        HsOutcome::Ok
                    } else if changed(0..4) {
                        HsOutcome::Malformed
                    } else if !fix {
                        HsOutcome::BadMac
                    } else if changed(8..116) {
                        HsOutcome::Auth
                    } else {
                        HsOutcome::Ok
                    };
                    let want = if want == HsOutcome::Ok && unknown { HsOutcome::UnknownPeer } else { want };
                    hs.b.retain_peers(|_| false);
                    let r = hs.b.on_initiation(&msg, HS_B_INDEX, known);
                    assert_eq!(outcome(&r), want, "initiation changed to {msg:02x?}");
                    out.push(want);
                    if let Ok((resp, eb)) = r {
                        let sender = le32(&msg, 4);
                        hs.check_response(&resp, &eb, sender);
                        if check {
                            let again = hs.b.on_initiation(&msg, HS_B_INDEX, known);
                            assert!(matches!(again, Err(HandshakeError::Replayed)), "completed twice: {again:?}");
                            out.push(HsOutcome::Replayed);
                            let r = hs.a.on_response(&resp);
                            out.push(outcome(&r));
                            if sender == HS_A_INDEX {
                                // Another response than the one armed, to the same initiation.
                                let ea = r.expect("A completes with B's fresh response");
                                hs.check_initiator(&ea, &eb, HS_B_INDEX);
                                hs.armed = None;
                            } else {
                                assert!(matches!(r, Err(HandshakeError::NoPending)), "{r:?}");
                                hs.finish(&armed, true, &mut out);
                            }
                        }
                    }
                }
                _ => {
                    let mut msg = armed.resp;
                    mutate(&mut msg, rest);
                    if fix {
                        let m = reference::mac1(&pa, &msg[..60]);
                        msg[60..76].copy_from_slice(&m);
                    }
                    let changed = |r: Range<usize>| r.into_iter().any(|i| msg[i] != armed.resp[i]);
                    let want = if !changed(0..76) {
                        HsOutcome::Ok
                    } else if changed(0..4) {
                        HsOutcome::Malformed
                    } else if !fix {
                        HsOutcome::BadMac
                    } else if changed(8..12) {
                        HsOutcome::NoPending
                    } else if changed(12..60) {
                        HsOutcome::Auth
                    } else {
                        HsOutcome::Ok
                    };
                    let r = hs.a.on_response(&msg);
                    assert_eq!(outcome(&r), want, "response changed to {msg:02x?}");
                    out.push(want);
                    if let Ok(ea) = &r {
                        hs.check_initiator(ea, &armed.eb, le32(&msg, 4));
                    }
                    let pending = !matches!(want, HsOutcome::Ok | HsOutcome::Auth);
                    if check {
                        hs.finish(&armed, pending, &mut out);
                    } else if !pending {
                        hs.armed = None;
                    }
                }
            }
            out
        })
    }
}
