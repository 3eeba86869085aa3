//! flannel's `udp` backend format: the UDP payload is the bare inner IP packet, no header.
//!
//! flannel's proxy (`pkg/backend/udp/proxy_amd64.c`) sends from and to port 8285 and
//! decrements the TTL on both send and receive, patching the checksum (RFC 1624); weft does
//! the same, so traceroute across a mixed weft/flannel cluster counts the same hops. flannel
//! carries only IPv4; weft also carries IPv6 inner packets in this format between weft nodes.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::{Decapsulated, Encap, EncapKind};
use crate::buf::PacketBuf;
use crate::route::NextHop;
use crate::stats::DropReason;

/// The flannel `udp` codec. Stateless.
#[derive(Clone, Copy, Debug, Default)]
pub struct UdpEncap;

/// flannel's default port for the udp backend.
pub const DEFAULT_PORT: u16 = 8285;

impl Encap for UdpEncap {
    const KIND: EncapKind = EncapKind::FlannelUdp;
    const HEADER_LEN: usize = 0;
    const SOURCE_PORT_MATTERS: bool = true;
    const DECREMENTS_TTL: bool = true;
    const FLOW_SOURCE_PORT: bool = false;

    #[inline]
    fn encap(&self, _pkt: &mut PacketBuf<'_>, _hop: &NextHop) -> Result<(), DropReason> {
        Ok(())
    }

    #[inline]
    fn decap(&self, pkt: &mut PacketBuf<'_>, _peer: &NextHop) -> Result<Decapsulated, DropReason> {
        // flannel drops anything shorter than an IPv4 header before looking at it.
        if pkt.len() < 20 {
            return Err(DropReason::Truncated);
        }
        Ok(Decapsulated::Ip)
    }
}
