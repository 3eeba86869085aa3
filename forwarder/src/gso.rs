//! Segmentation offload, sans-IO: the virtio-net header a TUN opened with `IFF_VNET_HDR`
//! puts in front of every packet, and the split of a TCP super-packet (up to 64 KiB, what
//! the kernel hands over with TSO enabled) into MSS-sized segments with their headers fixed
//! up, as `reference/performance.md` §2–3 describes:
//!
//! - IPv4: identification + i, total length, header checksum; IPv6: payload length;
//! - TCP: sequence number + i·MSS; FIN and PSH only on the last segment; a full checksum
//!   per segment (the kernel left only the pseudo-header sum in the super-packet).
//!
//! This is the groundwork of the performance issue; the drivers do not enable
//! `IFF_VNET_HDR` yet.

#![deny(unsafe_code)]

use crate::wire::checksum;

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

/// The virtio-net header (Linux `struct virtio_net_hdr`, host byte order).
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
    /// Parses the first [`VNET_HDR_LEN`] bytes.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `b`.
    pub fn emit(&self, b: &mut [u8]) {
        if let Some(b) = b.get_mut(..VNET_HDR_LEN) {
            b[0] = self.flags;
            b[1] = self.gso_type;
            b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
            b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
            b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
            b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        }
    }
}

/// Why a packet from the TUN could not be segmented or completed.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum GsoError {
    /// Header fields contradict the packet (lengths, offsets, version).
    Malformed,
    /// A GSO type weft does not split (UDP L4, ECN).
    Unsupported,
    /// The output buffer cannot hold the segments.
    NoRoom,
}

/// Completes a partial L4 checksum in place: the field at `csum_start + csum_offset` holds
/// the pseudo-header sum; the result covers everything from `csum_start` to the end.
///
/// # Errors
/// [`GsoError::Malformed`] when the offsets fall outside the packet.
pub fn complete_checksum(pkt: &mut [u8], csum_start: usize, csum_offset: usize) -> Result<(), GsoError> {
    let field = csum_start.checked_add(csum_offset).ok_or(GsoError::Malformed)?;
    if field + 2 > pkt.len() {
        return Err(GsoError::Malformed);
    }
    let c = checksum::checksum(pkt.get(csum_start..).ok_or(GsoError::Malformed)?);
    pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Splits the TCP super-packet `pkt` (IP header first, as read after the virtio-net header)
/// into segments of at most `hdr.gso_size` payload bytes. Segment `i` is written to
/// `out[i * stride + headroom ..]`, so the caller can prepend its encapsulation header in the
/// `headroom` bytes before each. Returns `(segments, last_segment_len)`; every segment but the
/// last is `headers + gso_size` bytes long.
///
/// # Errors
/// [`GsoError`] naming what is wrong; nothing useful is left in `out` then.
pub fn split_tcp(
    hdr: &VnetHdr,
    pkt: &[u8],
    out: &mut [u8],
    stride: usize,
    headroom: usize,
) -> Result<(usize, usize), GsoError> {
    let v6 = match (hdr.gso_type, pkt.first().map(|b| b >> 4)) {
        (GSO_TCPV4, Some(4)) => false,
        (GSO_TCPV6, Some(6)) => true,
        (GSO_TCPV4 | GSO_TCPV6, _) => return Err(GsoError::Malformed),
        _ => return Err(GsoError::Unsupported),
    };
    let ip_len = if v6 { 40 } else { usize::from(pkt[0] & 0x0f) * 4 };
    // Never trust hdr_len: recompute from csum_start and the TCP data offset.
    let l4 = usize::from(hdr.csum_start);
    if l4 != ip_len || hdr.csum_offset != 16 || l4 + 20 > pkt.len() {
        return Err(GsoError::Malformed);
    }
    let tcp_len = usize::from(pkt[l4 + 12] >> 4) * 4;
    let hdrs = l4 + tcp_len;
    let mss = usize::from(hdr.gso_size);
    if tcp_len < 20 || hdrs > pkt.len() || mss == 0 {
        return Err(GsoError::Malformed);
    }
    let payload = &pkt[hdrs..];
    let n = payload.len().div_ceil(mss).max(1);
    if stride < headroom + hdrs + mss || out.len() < (n - 1) * stride + headroom + hdrs + payload.len().min(mss) {
        return Err(GsoError::NoRoom);
    }
    let seq0 = u32::from_be_bytes([pkt[l4 + 4], pkt[l4 + 5], pkt[l4 + 6], pkt[l4 + 7]]);
    let id0 = if v6 { 0 } else { u16::from_be_bytes([pkt[4], pkt[5]]) };
    let flags = pkt[l4 + 13];
    let mut last_len = 0;
    // An empty payload still makes one (header-only) segment; nothing here allocates.
    for i in 0..n {
        let chunk = payload.get(i * mss..((i + 1) * mss).min(payload.len())).unwrap_or_default();
        let base = i * stride + headroom;
        let seg_len = hdrs + chunk.len();
        let seg = out.get_mut(base..base + seg_len).ok_or(GsoError::NoRoom)?;
        seg[..hdrs].copy_from_slice(&pkt[..hdrs]);
        seg[hdrs..].copy_from_slice(chunk);
        let last = i + 1 == n;
        if v6 {
            let plen = u16::try_from(seg_len - 40).map_err(|_| GsoError::Malformed)?;
            seg[4..6].copy_from_slice(&plen.to_be_bytes());
        } else {
            let tot = u16::try_from(seg_len).map_err(|_| GsoError::Malformed)?;
            seg[2..4].copy_from_slice(&tot.to_be_bytes());
            seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            seg[10..12].copy_from_slice(&[0, 0]);
            let c = checksum::checksum(&seg[..ip_len]);
            seg[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        // FIN and PSH belong to the last segment only.
        seg[l4 + 13] = if last { flags } else { flags & !0x09 };
        // Full TCP checksum: pseudo-header + TCP header + data.
        seg[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let l4_len = seg_len - l4;
        let mut acc = if v6 {
            let a = checksum::sum(0, &seg[8..40]);
            checksum::sum(a, &(l4_len as u32).to_be_bytes())
        } else {
            let a = checksum::sum(0, &seg[12..20]);
            checksum::sum(a, &(l4_len as u16).to_be_bytes())
        };
        acc = checksum::sum(acc, &[0, 6]);
        acc = checksum::sum(acc, &seg[l4..]);
        let c = checksum::fold(acc);
        seg[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        last_len = seg_len;
    }
    Ok((n, last_len))
}

#[cfg(test)]
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

    #[test]
    fn splits_v4_and_v6_with_valid_headers_and_checksums() {
        for v6 in [false, true] {
            let pkt = super_packet(v6, 3500, true);
            let l4 = if v6 { 40 } else { 20 };
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                hdr_len: 0xffff, // lies: must not be trusted
                gso_size: 1448,
                csum_start: l4,
                csum_offset: 16,
            };
            let (stride, headroom) = (2048, 50);
            let mut out = vec![0u8; 4 * stride];
            let (n, last) = split_tcp(&hdr, &pkt, &mut out, stride, headroom).unwrap();
            assert_eq!(n, 3);
            let mut data = Vec::new();
            for i in 0..n {
                let len = if i + 1 == n { last } else { usize::from(l4) + 20 + 1448 };
                let seg = &out[i * stride + headroom..i * stride + headroom + len];
                let h = PacketHeaders::from_ip_slice(seg).unwrap();
                let Some(TransportHeader::Tcp(tcp)) = h.transport.clone() else { panic!("not tcp") };
                assert_eq!(tcp.sequence_number, 1_000_000 + (i * 1448) as u32, "v6={v6} seg {i}");
                assert_eq!((tcp.fin, tcp.psh), (i + 1 == n, i + 1 == n), "v6={v6} seg {i}");
                let want = match &h.net {
                    Some(etherparse::NetHeaders::Ipv4(ip, _)) => {
                        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
                        let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
                        assert_eq!(ip.identification, id0.wrapping_add(i as u16), "seg {i}");
                        tcp.calc_checksum_ipv4(ip, h.payload.slice()).unwrap()
                    }
                    Some(etherparse::NetHeaders::Ipv6(ip, _)) => tcp.calc_checksum_ipv6(ip, h.payload.slice()).unwrap(),
                    _ => panic!("no ip"),
                };
                assert_eq!(tcp.checksum, want, "v6={v6} seg {i}");
                data.extend_from_slice(h.payload.slice());
            }
            assert_eq!(data, pkt[usize::from(l4) + 20..], "payload reassembles");
        }
    }

    #[test]
    fn refuses_lies_and_small_buffers() {
        let pkt = super_packet(false, 3000, false);
        let good =
            VnetHdr { flags: 1, gso_type: GSO_TCPV4, hdr_len: 40, gso_size: 1000, csum_start: 20, csum_offset: 16 };
        let mut out = vec![0u8; 8192];
        let cases = [
            ("udp gso", VnetHdr { gso_type: 5, ..good }, GsoError::Unsupported),
            ("v6 type on v4", VnetHdr { gso_type: GSO_TCPV6, ..good }, GsoError::Malformed),
            ("csum_start off", VnetHdr { csum_start: 24, ..good }, GsoError::Malformed),
            ("csum_offset off", VnetHdr { csum_offset: 6, ..good }, GsoError::Malformed),
            ("mss 0", VnetHdr { gso_size: 0, ..good }, GsoError::Malformed),
        ];
        for (name, h, want) in cases {
            assert_eq!(split_tcp(&h, &pkt, &mut out, 2048, 0).err(), Some(want), "{name}");
        }
        assert_eq!(split_tcp(&good, &pkt, &mut out[..3000], 2048, 0).err(), Some(GsoError::NoRoom));
        assert_eq!(split_tcp(&good, &pkt[..30], &mut out, 2048, 0).err(), Some(GsoError::Malformed));
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
