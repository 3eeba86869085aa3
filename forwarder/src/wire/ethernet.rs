//! Ethernet II frame view (IEEE 802.3 §3.1.1) and `MacAddr`: VXLAN carries whole frames.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fmt;
use std::str::FromStr;

use super::WireError;

mod field {
    use core::ops::Range;
    pub const DST: Range<usize> = 0..6;
    pub const SRC: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
}

/// Length of an Ethernet II header (no VLAN tag).
pub const HEADER_LEN: usize = 14;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1Q VLAN tag (RFC 7348 §6.1: such inner frames SHOULD be discarded).
pub const ETHERTYPE_VLAN: u16 = 0x8100;

/// A 48-bit MAC address.
#[derive(Clone, Copy, Debug, Default, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Whether the group bit is set (multicast or broadcast).
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Whether this is the all-ones broadcast address.
    pub fn is_broadcast(self) -> bool {
        self == Self::BROADCAST
    }

    /// A unicast address that is not all zeros: the only kind a frame's source may carry.
    pub fn is_valid_source(self) -> bool {
        !self.is_multicast() && self.0 != [0; 6]
    }

    /// A locally administered unicast address derived from `seed`, for VTEP MACs that must
    /// be stable across restarts (flannel#1795: a MAC that changes on restart blackholes the
    /// node behind its peers' permanent neighbour entries).
    pub fn local_from_seed(seed: u64) -> Self {
        let b = seed.to_be_bytes();
        MacAddr([(b[2] & 0xfe) | 0x02, b[3], b[4], b[5], b[6], b[7]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

/// A MAC address that did not parse.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[error("{0:?} is not a MAC address (example: \"02:42:0a:f4:01:00\")")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(|| MacParseError(s.into()))?;
            *b = u8::from_str_radix(p, 16).map_err(|_| MacParseError(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.into()));
        }
        Ok(MacAddr(out))
    }
}

/// A view of an Ethernet II frame with at least a full header.
#[derive(Debug)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

#[allow(clippy::indexing_slicing)] // in bounds: the 14 bytes `new_checked` verified (mod.rs contract).
impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Wraps a buffer the caller has already sized (at least [`HEADER_LEN`] bytes).
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Checks that the header fits.
    ///
    /// # Errors
    /// [`WireError::Truncated`] below 14 bytes.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    /// Destination address.
    pub fn dst(&self) -> MacAddr {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.buffer.as_ref()[field::DST]);
        MacAddr(m)
    }

    /// Source address.
    pub fn src(&self) -> MacAddr {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.buffer.as_ref()[field::SRC]);
        MacAddr(m)
    }

    /// EtherType.
    pub fn ethertype(&self) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[field::ETHERTYPE.start], b[field::ETHERTYPE.start + 1]])
    }

    /// The frame's payload.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

#[allow(clippy::indexing_slicing)] // emission into a buffer the caller sized to `HEADER_LEN`.
impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    /// Writes the header.
    pub fn emit_header(&mut self, dst: MacAddr, src: MacAddr, ethertype: u16) {
        let b = self.buffer.as_mut();
        b[field::DST].copy_from_slice(&dst.0);
        b[field::SRC].copy_from_slice(&src.0);
        b[field::ETHERTYPE].copy_from_slice(&ethertype.to_be_bytes());
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_prints_and_classifies() {
        let m: MacAddr = "02:42:0A:f4:01:00".parse().unwrap();
        assert_eq!(m.to_string(), "02:42:0a:f4:01:00");
        assert!(m.is_valid_source());
        assert!(MacAddr::BROADCAST.is_multicast() && MacAddr::BROADCAST.is_broadcast());
        assert!(!MacAddr([0; 6]).is_valid_source());
        for bad in ["02:42:0a:f4:01", "02:42:0a:f4:01:00:11", "zz:42:0a:f4:01:00", "2:42:0a:f4:01:00", ""] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn derived_macs_are_local_unicast_and_stable() {
        for seed in [0, 1, u64::MAX, 0x0123_4567_89ab_cdef] {
            let m = MacAddr::local_from_seed(seed);
            assert_eq!(m.0[0] & 0x03, 0x02, "{m}");
            assert_eq!(m, MacAddr::local_from_seed(seed));
        }
    }

    #[test]
    fn header_round_trip() {
        let mut b = [0u8; 20];
        let (d, s): (MacAddr, MacAddr) = ("02:00:00:00:00:02".parse().unwrap(), "02:00:00:00:00:01".parse().unwrap());
        EthernetFrame::new_unchecked(&mut b[..]).emit_header(d, s, ETHERTYPE_IPV4);
        let f = EthernetFrame::new_checked(&b[..]).unwrap();
        assert_eq!((f.dst(), f.src(), f.ethertype(), f.payload().len()), (d, s, ETHERTYPE_IPV4, 6));
        assert_eq!(EthernetFrame::new_checked(&b[..13]).err(), Some(WireError::Truncated));
    }
}
