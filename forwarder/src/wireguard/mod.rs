//! The `wireguard` backend: WireGuard's wire format and handshake between weft nodes.
//!
//! Every datagram between nodes is a WireGuard message (whitepaper §5.4): handshake
//! initiations and responses, and data messages carrying one inner IP packet, sealed with
//! ChaCha20-Poly1305 under the session's key and a 64-bit counter. A datagram that fails
//! authentication is dropped and counted (`auth_failed`), a replay too (`replayed`); neither
//! is ever delivered or answered. A packet for a peer without a session is dropped
//! (`no_session`), never sent in the clear.
//!
//! The split, sans-IO as the rest of the core:
//! - [`handshake`]: the handshake messages (Noise IKpsk2 through `snow`, mac1, TAI64N);
//! - [`session`]: keypairs, the per-peer current/previous/next, and the receive-index table
//!   the workers read without locks;
//! - [`replay`]: the lock-free replay window;
//! - [`WireGuardEncap`]: the [`Encap`] the forwarder runs; it seals and opens in place, one
//!   AEAD call per segment, and hands handshake messages to the control thread through a
//!   bounded queue (no allocation: fixed-size messages).
//!
//! What runs the handshakes (timers, the socket) is the daemon's `wireguard` module.

#![deny(unsafe_code)]
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

pub mod handshake;
pub mod keys;
pub mod replay;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};

use crate::buf::PacketBuf;
use crate::encap::{Decapsulated, Encap, EncapKind};
use crate::route::NextHop;
use crate::stats::DropReason;

pub use handshake::{Established, HandshakeError, Handshaker};
pub use keys::{KeyError, PrivateKey, PublicKey};
pub use session::{Keypair, PeerCrypto, SessionTable, TAG_LEN};

/// Bytes of a data message's header: type (4), receiver index (4), counter (8).
pub const DATA_HEADER_LEN: usize = 16;
/// WireGuard's message types.
const INITIATION: u8 = 1;
const RESPONSE: u8 = 2;
const COOKIE_REPLY: u8 = 3;
const DATA: u8 = 4;

/// A handshake message a worker received, for the control thread: fixed size, so queueing
/// it allocates nothing.
#[derive(Clone, Copy, Debug)]
pub struct HandshakeDatagram {
    /// The sending peer's endpoint (where to answer).
    pub from: SocketAddr,
    /// Bytes used of `bytes`.
    pub len: u8,
    /// The message.
    pub bytes: [u8; handshake::INITIATION_LEN],
}

impl HandshakeDatagram {
    /// The message's bytes.
    pub fn message(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or_default()
    }
}

/// The WireGuard [`Encap`]: seals what goes to a peer with its current keypair, opens what
/// comes from one with the keypair its receiver index names.
#[derive(Debug)]
pub struct WireGuardEncap {
    sessions: Arc<SessionTable>,
    handshakes: SyncSender<HandshakeDatagram>,
    /// The keypair a super-packet's segments will be sealed with (set by `encap_segmented`,
    /// used by `seal_segments`).
    train: Option<Arc<Keypair>>,
}

impl WireGuardEncap {
    /// An encap that opens with `sessions` and queues handshake messages on `handshakes`.
    pub fn new(sessions: Arc<SessionTable>, handshakes: SyncSender<HandshakeDatagram>) -> Self {
        Self { sessions, handshakes, train: None }
    }

    /// The keypair to send to `hop` with, counting a miss.
    #[inline]
    fn sending(hop: &NextHop) -> Result<Arc<Keypair>, DropReason> {
        let crypto = hop.crypto.as_ref().ok_or(DropReason::NoSession)?;
        match crypto.current.load_full() {
            Some(kp) => Ok(kp),
            None => {
                crypto.no_session.fetch_add(1, Ordering::Relaxed);
                Err(DropReason::NoSession)
            }
        }
    }

    /// Writes a data message's header (type 4, three zero bytes, receiver, counter).
    fn write_header(head: &mut [u8], receiver: u32, counter: u64) {
        let (r, c) = (receiver.to_le_bytes(), counter.to_le_bytes());
        let h = [DATA, 0, 0, 0, r[0], r[1], r[2], r[3], c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
        if let Some(into) = head.first_chunk_mut::<DATA_HEADER_LEN>() {
            *into = h;
        }
    }

    /// Seals one data message in place: `msg` is the header's room, the plaintext, then
    /// [`TAG_LEN`] bytes of room for the tag.
    #[inline]
    fn seal_one(kp: &Keypair, counter: u64, msg: &mut [u8]) -> Result<(), DropReason> {
        let (head, rest) = msg.split_at_mut_checked(DATA_HEADER_LEN).ok_or(DropReason::Truncated)?;
        let plain_len = rest.len().checked_sub(TAG_LEN).ok_or(DropReason::Truncated)?;
        let (plain, tag) = rest.split_at_mut_checked(plain_len).ok_or(DropReason::Truncated)?;
        Self::write_header(head, kp.remote_index, counter);
        kp.seal(counter, plain, tag).map_err(|_| DropReason::NoSession)
    }

    /// Hands a handshake message to the control thread; a full queue drops it, counted.
    fn queue_handshake(&self, pkt: &PacketBuf<'_>, from: SocketAddr) -> Result<Decapsulated, DropReason> {
        let msg = pkt.as_slice();
        let mut d = HandshakeDatagram { from, len: 0, bytes: [0; handshake::INITIATION_LEN] };
        let into = d.bytes.get_mut(..msg.len()).ok_or(DropReason::BadMessage)?;
        into.copy_from_slice(msg);
        d.len = u8::try_from(msg.len()).map_err(|_| DropReason::BadMessage)?;
        match self.handshakes.try_send(d) {
            Ok(()) => Ok(Decapsulated::Consumed),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(DropReason::BadMessage),
        }
    }
}

/// A keepalive for `kp`'s peer: an empty data message, sealed with the next counter. The
/// initiator sends one after its handshake, so the responder can confirm the session. `None`
/// when the keypair may send no more.
pub fn keepalive(kp: &Keypair) -> Option<[u8; DATA_HEADER_LEN + TAG_LEN]> {
    let mut msg = [0u8; DATA_HEADER_LEN + TAG_LEN];
    let counter = kp.reserve(1).ok()?;
    WireGuardEncap::seal_one(kp, counter, &mut msg).ok()?;
    Some(msg)
}

impl Encap for WireGuardEncap {
    const KIND: EncapKind = EncapKind::WireGuard;
    const HEADER_LEN: usize = DATA_HEADER_LEN;
    const TRAILER_LEN: usize = TAG_LEN;
    // Peers are known by address; the key, not the port, proves who sent a datagram.
    const SOURCE_PORT_MATTERS: bool = false;
    const DECREMENTS_TTL: bool = false;
    // Everything leaves from the listen port: WireGuard peers roam to the source of the last
    // authentic datagram, so a reply to an ephemeral sender port would be lost (found against
    // wireguard-go). Receivers spread peers, not flows, over their workers.
    const FLOW_SOURCE_PORT: bool = false;

    fn encap(&self, pkt: &mut PacketBuf<'_>, hop: &NextHop) -> Result<(), DropReason> {
        let kp = Self::sending(hop)?;
        let counter = kp.reserve(1).map_err(|_| DropReason::NoSession)?;
        let len = pkt.len();
        pkt.prepend(DATA_HEADER_LEN).ok_or(DropReason::Truncated)?;
        let total = len.checked_add(DATA_HEADER_LEN + TAG_LEN).ok_or(DropReason::Oversize)?;
        if !pkt.set_len(total) {
            return Err(DropReason::Oversize);
        }
        Self::seal_one(&kp, counter, pkt.as_mut_slice())
    }

    fn encap_segmented(&mut self, pkt: &mut PacketBuf<'_>, hop: &NextHop) -> Result<(), DropReason> {
        let kp = Self::sending(hop)?;
        pkt.prepend(DATA_HEADER_LEN).ok_or(DropReason::Truncated)?;
        Self::write_header(pkt.as_mut_slice(), kp.remote_index, 0);
        self.train = Some(kp);
        Ok(())
    }

    fn seal_segments(&mut self, train: &mut [u8], stride: usize) -> Result<(), DropReason> {
        let kp = self.train.as_ref().ok_or(DropReason::NoSession)?;
        let n = train.len().div_ceil(stride.max(1));
        let mut counter = kp.reserve(n as u64).map_err(|_| DropReason::NoSession)?;
        for msg in train.chunks_mut(stride.max(1)) {
            Self::seal_one(kp, counter, msg)?;
            counter = counter.wrapping_add(1);
        }
        Ok(())
    }

    fn decap(&self, pkt: &mut PacketBuf<'_>, peer: &NextHop) -> Result<Decapsulated, DropReason> {
        let Some(crypto) = peer.crypto.as_ref() else { return Err(DropReason::AuthFailed) };
        let b = pkt.as_slice();
        let kind = match b.get(..4) {
            Some(&[t, 0, 0, 0]) => t,
            _ => return Err(DropReason::BadMessage),
        };
        match (kind, b.len()) {
            (DATA, n) if n >= DATA_HEADER_LEN + TAG_LEN => {}
            (DATA, _) => return Err(DropReason::Truncated),
            (INITIATION, handshake::INITIATION_LEN)
            | (RESPONSE, handshake::RESPONSE_LEN)
            | (COOKIE_REPLY, handshake::COOKIE_REPLY_LEN) => return self.queue_handshake(pkt, peer.endpoint),
            _ => return Err(DropReason::BadMessage),
        }
        let receiver = crate::wire::bytes::<4>(b, 4).map(|r| u32::from_le_bytes(*r)).unwrap_or(0);
        let counter = crate::wire::bytes::<8>(b, 8).map(|c| u64::from_le_bytes(*c)).unwrap_or(u64::MAX);
        let fail = |reason| {
            crypto.failed.fetch_add(1, Ordering::Relaxed);
            Err(reason)
        };
        let Some(kp) = self.sessions.get(receiver) else { return fail(DropReason::AuthFailed) };
        if kp.peer != crypto.public {
            return fail(DropReason::AuthFailed);
        }
        let sealed = pkt.as_mut_slice().get_mut(DATA_HEADER_LEN..).unwrap_or_default();
        let plain = match kp.open(counter, sealed) {
            Ok(n) => n,
            Err(session::CryptoError::Replayed) => return fail(DropReason::Replayed),
            Err(_) => return fail(DropReason::AuthFailed),
        };
        crypto.authenticated.fetch_add(1, Ordering::Relaxed);
        crypto.confirm(&kp);
        if !pkt.strip(DATA_HEADER_LEN) {
            return Err(DropReason::Truncated);
        }
        pkt.truncate(plain);
        if plain == 0 {
            // A keepalive: authentic, and nothing to deliver.
            return Ok(Decapsulated::Consumed);
        }
        Ok(Decapsulated::Ip)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects, clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::forwarder::{PacketCore, TunVerdict, UnderlayVerdict};
    use crate::testing::{A_ENDPOINT, Pair, icmp_echo};

    #[test]
    fn without_a_session_nothing_leaves_and_it_is_counted() {
        let (mut net, wa, _) = Pair::wireguard();
        assert!(net.a_encap(&icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 56)).is_none());
        assert_eq!(net.a.stats().drops(DropReason::NoSession), 1);
        assert_eq!(wa.peer.no_session.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn sealed_packets_are_delivered_once_and_forgeries_never() {
        let (mut net, mut wa, mut wb) = Pair::wireguard();
        Pair::wg_handshake(&mut wa, &mut wb, 11, 22, 1);
        let ping = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 56);
        let wire = net.a_encap(&ping).unwrap();
        assert_eq!(wire.len(), ping.len() + DATA_HEADER_LEN + TAG_LEN);
        assert_eq!(&wire[..8], &[4, 0, 0, 0, 22, 0, 0, 0], "type 4 to B's index");
        assert!(!wire.windows(8).any(|w| w == &ping[20..28]), "the payload is not in the clear");
        // B's keypair is `next` until this first data message confirms it.
        assert!(wb.peer.current.load().is_none());
        assert_eq!(net.b_receives(&wire).as_deref(), Some(&ping[..]));
        assert!(wb.peer.current.load().is_some(), "confirmed");
        // The same datagram again: authentic, but a replay.
        assert!(net.b_receives(&wire).is_none());
        assert_eq!(net.b.stats().drops(DropReason::Replayed), 1);
        // Any flipped bit, header counter included, fails authentication.
        for at in [9, 20, wire.len() - 1] {
            let mut bad = wire.clone();
            bad[at] ^= 1;
            assert!(net.b_receives(&bad).is_none());
        }
        assert_eq!(net.b.stats().drops(DropReason::AuthFailed), 3);
        // A datagram naming no session of B's.
        let mut stranger = wire.clone();
        stranger[4] = 99;
        assert!(net.b_receives(&stranger).is_none());
        assert_eq!(net.b.stats().drops(DropReason::AuthFailed), 4);
        assert_eq!(wb.peer.failed.load(Ordering::Relaxed), 5);
        assert_eq!(wb.peer.authenticated.load(Ordering::Relaxed), 1);
        // And B answers in kind, with its now confirmed keypair.
        let pong = icmp_echo([10, 244, 2, 1], [10, 244, 1, 1], 56);
        let (mut slot, head, len) = net.slot(&pong);
        let mut pkt = PacketBuf::new(&mut slot, head, len).unwrap();
        assert!(matches!(net.b.from_tun(&net.routes_b, &mut pkt, net.now), TunVerdict::Send { .. }));
        let back = pkt.as_slice().to_vec();
        let (mut slot, head, len) = net.slot(&back);
        let mut pkt = PacketBuf::new(&mut slot, head, len).unwrap();
        let from = crate::testing::B_ENDPOINT.parse().unwrap();
        assert!(matches!(net.a.from_underlay(&net.routes_a, from, &mut pkt), UnderlayVerdict::Deliver { .. }));
        assert_eq!(pkt.as_slice(), &pong[..]);
    }

    #[test]
    fn handshake_messages_are_queued_and_keepalives_consumed() {
        let (mut net, mut wa, mut wb) = Pair::wireguard();
        let init = wa.handshaker.initiate(&wb.handshaker.public_key(), 5, [0; 12]).unwrap();
        let (mut slot, head, len) = net.slot(&init);
        let mut pkt = PacketBuf::new(&mut slot, head, len).unwrap();
        let from = A_ENDPOINT.parse().unwrap();
        assert_eq!(net.b.from_underlay(&net.routes_b, from, &mut pkt), UnderlayVerdict::Consumed);
        let queued = wb.handshakes.try_recv().unwrap();
        assert_eq!((queued.message(), queued.from), (&init[..], from));
        // A bad type, or a handshake of the wrong length, is a bad message.
        for bad in [&[9u8, 0, 0, 0, 1, 2][..], &init[..100]] {
            assert!(net.b_receives(bad).is_none());
        }
        assert_eq!(net.b.stats().drops(DropReason::BadMessage), 2);
        // An empty data message is a keepalive: authentic, consumed, and it confirms.
        Pair::wg_handshake(&mut wa, &mut wb, 1, 2, 2);
        let kp = wa.peer.current.load_full().unwrap();
        let msg = keepalive(&kp).unwrap();
        let (mut slot, head, len) = net.slot(&msg);
        let mut pkt = PacketBuf::new(&mut slot, head, len).unwrap();
        assert_eq!(net.b.from_underlay(&net.routes_b, from, &mut pkt), UnderlayVerdict::Consumed);
        assert!(wb.peer.current.load().is_some());
    }

    /// A TCP super-packet cut into a train: every segment sealed with its own counter, each
    /// one opening on the other side to the segment the cleartext formats would send.
    #[test]
    fn a_segmented_train_is_sealed_segment_by_segment() {
        let (mut net, mut wa, mut wb) = Pair::wireguard();
        Pair::wg_handshake(&mut wa, &mut wb, 1, 2, 3);
        let mss = 1000;
        let data: Vec<u8> = (0..3 * mss + 10).map(|i| (i % 251) as u8).collect();
        let mut sp = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 244, 1, 1], [10, 244, 2, 1], 64)
            .tcp(40000, 5201, 1, 64240)
            .ack(7)
            .write(&mut sp, &data)
            .unwrap();
        let hdr = crate::gso::VnetHdr {
            flags: crate::gso::F_NEEDS_CSUM,
            gso_type: crate::gso::GSO_TCPV4,
            hdr_len: 40,
            gso_size: mss as u16,
            csum_start: 20,
            csum_offset: 16,
        };
        let (mut slot, head, len) = net.slot(&sp);
        slot.resize(crate::buf::SLOT_LEN, 0);
        let mut pkt = PacketBuf::new(&mut slot, head, len).unwrap();
        let seg = crate::gso::check_read(&hdr, pkt.as_mut_slice()).unwrap().unwrap();
        let TunVerdict::Send { .. } = net.a.from_tun_segmented(&net.routes_a, &mut pkt, &seg, net.now) else {
            panic!("not sent")
        };
        let (h, l) = (pkt.head(), pkt.len());
        let room = net.a.segment_trailer();
        let stride = DATA_HEADER_LEN + seg.segment_len() + room;
        let mut out = vec![0u8; 65536];
        let bytes =
            seg.write_segments_with_room(&slot[h..h + l], DATA_HEADER_LEN, room, 0..seg.segments(), &mut out).unwrap();
        assert!(net.a.seal_train(&mut out[..bytes], stride));
        let mut delivered = 0;
        for (i, d) in out[..bytes].chunks(stride).enumerate() {
            assert_eq!(u64::from_le_bytes(d[8..16].try_into().unwrap()), i as u64, "counter per segment");
            let inner = net.b_receives(d).unwrap();
            assert_eq!(inner.len(), d.len() - DATA_HEADER_LEN - TAG_LEN);
            delivered += 1;
        }
        assert_eq!(delivered, 4);
        assert_eq!(net.drops_total(), 0);
    }
}
