//! Wire formats between peers. One file per format, each pure: no I/O, no allocation, no
//! clock. The forwarder is generic over [`Encap`], so the hot path has no dynamic dispatch
//! and no per-packet `match` on the format; the daemon picks the format once at start.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

pub mod flannel_udp;
pub mod vxlan;

use crate::buf::PacketBuf;
use crate::node::LocalNode;
use crate::route::NextHop;
use crate::stats::DropReason;

pub use flannel_udp::UdpEncap;
pub use vxlan::VxlanEncap;

/// The wire formats weft speaks.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum EncapKind {
    /// flannel's `udp` backend: the UDP payload is the bare inner IP packet.
    FlannelUdp,
    /// VXLAN (RFC 7348) as Linux and flannel's `vxlan` backend speak it.
    Vxlan,
    /// WireGuard's data messages and handshake ([`crate::wireguard`]): authenticated and
    /// encrypted.
    WireGuard,
}

impl EncapKind {
    /// Bytes the whole encapsulation adds in front of an inner packet on an IPv4 (or IPv6)
    /// underlay: outer IP + UDP + the format's own header. The overlay MTU is the underlay
    /// interface's MTU minus this.
    pub const fn overhead(self, underlay_v6: bool) -> usize {
        // Outer IPv4 20 or IPv6 40, UDP 8: constants, so the table is computed at compile time.
        match (self, underlay_v6) {
            (Self::FlannelUdp, false) => 20 + 8 + UdpEncap::HEADER_LEN,
            (Self::FlannelUdp, true) => 40 + 8 + UdpEncap::HEADER_LEN,
            (Self::Vxlan, false) => 20 + 8 + VxlanEncap::HEADER_LEN,
            (Self::Vxlan, true) => 40 + 8 + VxlanEncap::HEADER_LEN,
            // Header and tag: WireGuard's 60 / 80 bytes (wg-quick's 1420 on a 1500 link is the v6 figure).
            (Self::WireGuard, false) => 20 + 8 + 16 + 16,
            (Self::WireGuard, true) => 40 + 8 + 16 + 16,
        }
    }

    /// The name used in configs and status.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FlannelUdp => "udp",
            Self::Vxlan => "vxlan",
            Self::WireGuard => "wireguard",
        }
    }
}

/// What a successful decapsulation left in the buffer.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Decapsulated {
    /// The inner IP packet, to be checked and delivered.
    Ip,
    /// A neighbour request (ARP, IPv6 neighbour solicitation) the format answers itself,
    /// through [`Encap::answer`].
    NeighbourRequest,
    /// Taken by the format itself (a WireGuard handshake message queued for the control
    /// thread, or a keepalive): nothing to deliver or answer.
    Consumed,
}

/// One overlay wire format.
pub trait Encap {
    /// Which format this is.
    const KIND: EncapKind;
    /// Bytes the format writes in front of the inner packet (the socket adds outer IP+UDP).
    const HEADER_LEN: usize;
    /// Bytes the format appends behind it (an authentication tag).
    const TRAILER_LEN: usize = 0;
    /// Whether a peer is identified by its source port as well as its address.
    const SOURCE_PORT_MATTERS: bool;
    /// Whether the format decrements the inner TTL on both sides, as flannel's udp proxy does.
    const DECREMENTS_TTL: bool;
    /// Whether the outer source port follows a hash of the inner flow, as Linux vxlan's
    /// does, so ECMP and `SO_REUSEPORT` spread flows.
    const FLOW_SOURCE_PORT: bool;

    /// Turns an inner packet into the UDP payload for `hop`, in place.
    ///
    /// # Errors
    /// The [`DropReason`] when the packet cannot be encapsulated.
    fn encap(&self, pkt: &mut PacketBuf<'_>, hop: &NextHop) -> Result<(), DropReason>;

    /// Prepares a super-packet for `hop` that the driver will cut into segments: writes the
    /// header that every segment repeats. The default is [`encap`](Self::encap), right for
    /// formats whose header does not depend on the segment.
    ///
    /// # Errors
    /// The [`DropReason`] when the packet cannot be encapsulated.
    fn encap_segmented(&mut self, pkt: &mut PacketBuf<'_>, hop: &NextHop) -> Result<(), DropReason> {
        self.encap(pkt, hop)
    }

    /// Finishes the segments the driver cut from the last `encap_segmented` super-packet:
    /// `train` holds them back to back, `stride` bytes each (the last may be shorter), each
    /// with [`TRAILER_LEN`](Self::TRAILER_LEN) bytes of room at its end. Formats without a
    /// per-segment part have nothing to do.
    ///
    /// # Errors
    /// The [`DropReason`] when the train cannot be sent (it is dropped whole).
    fn seal_segments(&mut self, train: &mut [u8], stride: usize) -> Result<(), DropReason> {
        let _ = (train, stride);
        Ok(())
    }

    /// Validates the format's headers of a UDP payload from `peer` and strips them.
    ///
    /// # Errors
    /// The [`DropReason`] naming what is wrong with the header.
    fn decap(&self, pkt: &mut PacketBuf<'_>, peer: &NextHop) -> Result<Decapsulated, DropReason>;

    /// Turns the neighbour request left by [`Encap::decap`] into the reply to send back to
    /// `peer`, if it asks about an address in `local`'s subnets.
    ///
    /// # Errors
    /// The [`DropReason`] when the request is not ours to answer. Formats without neighbour
    /// discovery never produce a request, so the default refuses.
    fn answer(&self, _pkt: &mut PacketBuf<'_>, _peer: &NextHop, _local: &LocalNode) -> Result<(), DropReason> {
        Err(DropReason::BadEthertype)
    }
}
