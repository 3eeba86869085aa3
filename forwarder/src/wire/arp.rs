//! ARP for IPv4 over Ethernet (RFC 826): weft answers requests for its own subnet that
//! arrive over VXLAN, so a kernel VTEP without permanent neighbour entries still finds it.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::net::Ipv4Addr;

use super::WireError;
use super::ethernet::MacAddr;

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;
/// ARP operation: request.
pub const OP_REQUEST: u16 = 1;
/// ARP operation: reply.
pub const OP_REPLY: u16 = 2;

/// A checked Ethernet/IPv4 ARP packet.
#[derive(Debug)]
pub struct ArpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

#[allow(clippy::indexing_slicing)] // in bounds: the 28 bytes `new_checked` verified (mod.rs contract).
impl<T: AsRef<[u8]>> ArpPacket<T> {
    /// Checks the length and that hardware and protocol are Ethernet and IPv4.
    ///
    /// # Errors
    /// [`WireError::Truncated`] below 28 bytes, [`WireError::Malformed`] for another
    /// hardware or protocol type.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < PACKET_LEN {
            return Err(WireError::Truncated);
        }
        if b[0..6] != [0, 1, 0x08, 0x00, 6, 4] {
            return Err(WireError::Malformed);
        }
        Ok(Self { buffer })
    }

    /// The operation (request 1, reply 2).
    pub fn op(&self) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[6], b[7]])
    }

    /// Sender hardware address.
    pub fn sender_mac(&self) -> MacAddr {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.buffer.as_ref()[8..14]);
        MacAddr(m)
    }

    /// Sender protocol address.
    pub fn sender_ip(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[14], b[15], b[16], b[17])
    }

    /// Target protocol address.
    pub fn target_ip(&self) -> Ipv4Addr {
        let b = self.buffer.as_ref();
        Ipv4Addr::new(b[24], b[25], b[26], b[27])
    }
}

#[allow(clippy::indexing_slicing)] // rewrites a checked packet in place.
impl<T: AsRef<[u8]> + AsMut<[u8]>> ArpPacket<T> {
    /// Turns this request into the reply "`target_ip` is at `our_mac`", in place.
    pub fn make_reply(&mut self, our_mac: MacAddr) {
        let (smac, sip, tip) = (self.sender_mac(), self.sender_ip(), self.target_ip());
        let b = self.buffer.as_mut();
        b[6..8].copy_from_slice(&OP_REPLY.to_be_bytes());
        b[8..14].copy_from_slice(&our_mac.0);
        b[14..18].copy_from_slice(&tip.octets());
        b[18..24].copy_from_slice(&smac.0);
        b[24..28].copy_from_slice(&sip.octets());
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    /// `arping`-style request: who has 10.244.1.0? tell 10.244.2.0 (02:00:00:00:00:02).
    const REQUEST: [u8; 28] =
        [0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 2, 10, 244, 2, 0, 0, 0, 0, 0, 0, 0, 10, 244, 1, 0];

    #[test]
    fn reply_swaps_and_fills_in_our_mac() {
        let mut b = REQUEST;
        let mut p = ArpPacket::new_checked(&mut b[..]).unwrap();
        assert_eq!((p.op(), p.target_ip()), (OP_REQUEST, Ipv4Addr::new(10, 244, 1, 0)));
        let ours: MacAddr = "02:00:00:00:00:01".parse().unwrap();
        p.make_reply(ours);
        let parsed = etherparse::ArpPacketSlice::from_slice(&b).unwrap();
        assert_eq!(parsed.operation(), etherparse::ArpOperation::REPLY);
        assert_eq!(parsed.sender_hw_addr(), &ours.0);
        assert_eq!(parsed.sender_protocol_addr(), &[10, 244, 1, 0]);
        assert_eq!(parsed.target_hw_addr(), &[2, 0, 0, 0, 0, 2]);
        assert_eq!(parsed.target_protocol_addr(), &[10, 244, 2, 0]);
    }

    #[test]
    fn refuses_other_hardware_and_short() {
        let mut b = REQUEST;
        b[1] = 6; // IEEE 802 hardware type
        assert_eq!(ArpPacket::new_checked(&b[..]).err(), Some(WireError::Malformed));
        assert_eq!(ArpPacket::new_checked(&REQUEST[..27]).err(), Some(WireError::Truncated));
    }
}
