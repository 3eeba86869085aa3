//! Crafted inner packets for `weft-craft`: flannel's `udp` backend format, where the UDP payload
//! is the bare inner IPv4 packet with no header of its own (flannel `backend/udp/proxy_amd64.c`).
//!
//! Checksums are computed by etherparse, so a packet that weft drops was dropped for the reason
//! under test and not for a bad checksum.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use etherparse::{IpHeaders, IpNumber, Ipv4Header, PacketBuilder};

/// Smallest inner packet: IPv4 header (20) + ICMP echo header (8).
pub const MIN_LEN: usize = 28;

/// Largest UDP payload over IPv4: 65535 - 20 (IP) - 8 (UDP).
pub const MAX_LEN: usize = 65_507;

/// ICMP echo identifier of crafted packets ("wf"), to tell them apart in captures.
pub const ECHO_ID: u16 = 0x7766;

/// An IPv4 ICMP echo request from `src` to `dst`, `total_len` bytes in all (IP header
/// included), with DF set, IP id and ICMP sequence `seq`, and ping's payload pattern.
///
/// # Errors
///
/// Fails if `total_len` is outside [`MIN_LEN`]..=[`MAX_LEN`].
pub fn icmp_echo_request(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, total_len: usize, seq: u16) -> Result<Vec<u8>> {
    if !(MIN_LEN..=MAX_LEN).contains(&total_len) {
        bail!("inner packet length {total_len} outside {MIN_LEN}..={MAX_LEN}");
    }
    let mut ip = Ipv4Header::new(0, ttl, IpNumber::ICMP, src.octets(), dst.octets()).context("building IPv4 header")?;
    ip.identification = seq;
    ip.dont_fragment = true;
    let payload: Vec<u8> = (0..total_len - MIN_LEN).map(|i| i as u8).collect();
    let builder = PacketBuilder::ip(IpHeaders::Ipv4(ip, Default::default())).icmpv4_echo_request(ECHO_ID, seq);
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, &payload).context("serializing ICMP echo request")?;
    Ok(out)
}

/// Decodes hex such as `4500001c`, `45 00 00 1c`, `45:00:00:1c` or `0x4500001c`.
///
/// # Errors
///
/// Fails on an odd number of digits or a non-hex character, naming its position.
pub fn parse_hex(s: &str) -> Result<Vec<u8>> {
    let s = s.trim();
    let s = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
    let digits: Vec<(usize, char)> = s.char_indices().filter(|(_, c)| !c.is_whitespace() && *c != ':').collect();
    if digits.len() % 2 != 0 {
        bail!("odd number of hex digits ({})", digits.len());
    }
    digits
        .chunks(2)
        .map(|pair| {
            let mut byte = 0u8;
            for &(at, c) in pair {
                let Some(d) = c.to_digit(16) else {
                    bail!("{c:?} at position {at} is not a hex digit");
                };
                byte = (byte << 4) | d as u8;
            }
            Ok(byte)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv4Type, NetSlice, SlicedPacket, TransportSlice};

    /// RFC 1071 one's-complement sum; a correct checksum makes the sum over the data 0xffff.
    fn ones_complement_sum(data: &[u8]) -> u16 {
        let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn echo_request_is_valid_ipv4_icmp() {
        let src = Ipv4Addr::new(10, 244, 2, 1);
        let dst = Ipv4Addr::new(10, 244, 1, 1);
        for len in [MIN_LEN, 64, 84, 1500] {
            let pkt = icmp_echo_request(src, dst, 64, len, 7).unwrap();
            assert_eq!(pkt.len(), len);
            let sliced = SlicedPacket::from_ip(&pkt).unwrap();
            let Some(NetSlice::Ipv4(ip)) = &sliced.net else {
                panic!("not IPv4");
            };
            let h = ip.header().to_header();
            assert_eq!(h.source, src.octets());
            assert_eq!(h.destination, dst.octets());
            assert_eq!(h.time_to_live, 64);
            assert_eq!(usize::from(h.total_len), len);
            assert!(h.dont_fragment);
            assert_eq!(h.header_checksum, h.calc_header_checksum());
            assert_eq!(ones_complement_sum(&pkt[..20]), 0xffff);
            let Some(TransportSlice::Icmpv4(icmp)) = &sliced.transport else {
                panic!("not ICMPv4");
            };
            match icmp.icmp_type() {
                Icmpv4Type::EchoRequest(e) => {
                    assert_eq!((e.id, e.seq), (ECHO_ID, 7));
                }
                t => panic!("unexpected ICMP type {t:?}"),
            }
            assert_eq!(ones_complement_sum(&pkt[20..]), 0xffff, "ICMP checksum");
        }
    }

    #[test]
    fn echo_request_rejects_bad_lengths() {
        let a = Ipv4Addr::LOCALHOST;
        assert!(icmp_echo_request(a, a, 64, MIN_LEN - 1, 0).is_err());
        assert!(icmp_echo_request(a, a, 64, MAX_LEN + 1, 0).is_err());
    }

    #[test]
    fn hex_forms() {
        let want = vec![0x45, 0x00, 0x00, 0x1c];
        for s in ["4500001c", "45 00 00 1c", "45:00:00:1C", "0x4500001c", " 4500001c\n"] {
            assert_eq!(parse_hex(s).unwrap(), want, "{s:?}");
        }
        assert!(parse_hex("450").is_err());
        assert!(parse_hex("45zz").is_err());
        assert_eq!(parse_hex("").unwrap(), Vec::<u8>::new());
    }
}
