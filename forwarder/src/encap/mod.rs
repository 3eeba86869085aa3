//! Wire formats between peers. One file per format, each pure: no I/O, no allocation, no
//! clock. The forwarder is generic over [`Encap`], so the hot path has no dynamic dispatch
//! and no per-packet `match` on the format; the daemon picks the format once at start.

#![deny(unsafe_code)]

pub mod flannel_udp;

use crate::buf::PacketBuf;
use crate::route::NextHop;
use crate::stats::DropReason;

pub use flannel_udp::UdpEncap;

/// The wire formats weft speaks.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum EncapKind {
    /// flannel's `udp` backend: the UDP payload is the bare inner IP packet.
    FlannelUdp,
}

impl EncapKind {
    /// Bytes the whole encapsulation adds in front of an inner packet on an IPv4 (or IPv6)
    /// underlay: outer IP + UDP + the format's own header. The overlay MTU is the underlay
    /// interface's MTU minus this.
    pub const fn overhead(self, underlay_v6: bool) -> usize {
        let outer = if underlay_v6 { 40 + 8 } else { 20 + 8 };
        match self {
            Self::FlannelUdp => outer + UdpEncap::HEADER_LEN,
        }
    }

    /// The name used in configs and status.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FlannelUdp => "udp",
        }
    }
}

/// One overlay wire format.
pub trait Encap {
    /// Which format this is.
    const KIND: EncapKind;
    /// Bytes the format writes in front of the inner packet (the socket adds outer IP+UDP).
    const HEADER_LEN: usize;
    /// Whether a peer is identified by its source port as well as its address.
    const SOURCE_PORT_MATTERS: bool;
    /// Whether the format decrements the inner TTL on both sides, as flannel's udp proxy does.
    const DECREMENTS_TTL: bool;

    /// Turns an inner packet into the UDP payload for `hop`, in place.
    ///
    /// # Errors
    /// The [`DropReason`] when the packet cannot be encapsulated.
    fn encap(&self, pkt: &mut PacketBuf<'_>, hop: &NextHop) -> Result<(), DropReason>;

    /// Validates the format's header of a UDP payload and strips it, leaving the inner packet.
    ///
    /// # Errors
    /// The [`DropReason`] naming what is wrong with the header.
    fn decap(&self, pkt: &mut PacketBuf<'_>) -> Result<(), DropReason>;
}
