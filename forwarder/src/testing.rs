//! Test doubles: two forwarders wired back to back without a TUN or a socket
//! (wireguard-go's channel TUN and bind, quinn's `Pair`), and packet builders.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::bridge::Bridge;
use crate::buf::{HEADROOM, PacketBuf};
use crate::encap::{Encap, UdpEncap, VxlanEncap};
use crate::forwarder::{Forwarder, TunVerdict, UnderlayVerdict};
use crate::node::LocalNode;
use crate::route::{NextHop, RouteTable};
use crate::stats::{DropReason, PeerCounters, WorkerStats};
use crate::wire::ethernet::MacAddr;
use crate::wire::vxlan::Vni;

/// An IPv4 ICMP echo request with DF set and `payload` bytes of data.
pub fn icmp_echo(src: [u8; 4], dst: [u8; 4], payload: usize) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4(src, dst, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut out, &vec![0x5a; payload])
        .unwrap();
    out[6] |= 0x40; // DF, as Linux ping sets it by default
    let mut h = out[..20].to_vec();
    h[10] = 0;
    h[11] = 0;
    let c = crate::wire::checksum::checksum(&h);
    out[10..12].copy_from_slice(&c.to_be_bytes());
    out
}

/// An ICMPv6 echo request.
pub fn icmp_echo_v6(src: &str, dst: &str, payload: usize) -> Vec<u8> {
    let s: std::net::Ipv6Addr = src.parse().unwrap();
    let d: std::net::Ipv6Addr = dst.parse().unwrap();
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv6(s.octets(), d.octets(), 64)
        .icmpv6_echo_request(7, 1)
        .write(&mut out, &vec![0x5a; payload])
        .unwrap();
    out
}

/// Node A (10.244.1.0/24, fd00:1::/64, 198.18.0.1:8285, VTEP MAC [`A_MAC`]) and node B
/// (10.244.2.0/24, fd00:2::/64, 198.18.0.2:8285, [`B_MAC`]), each the other's only peer.
pub struct Pair<E: Encap = UdpEncap> {
    pub a: Forwarder<E>,
    pub b: Forwarder<E>,
    pub routes_a: RouteTable,
    pub routes_b: RouteTable,
    pub now: Instant,
}

pub const A_ENDPOINT: &str = "198.18.0.1:8285";
pub const B_ENDPOINT: &str = "198.18.0.2:8285";
pub const A_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
pub const B_MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);
/// VNI of [`Pair::vxlan`].
pub const VNI: u32 = 1;

/// Node `third`'s local view (10.244.`third`.0/24, fd00:`third`::/64).
pub fn local(third: u8) -> LocalNode {
    node(third)
}

fn node(third: u8) -> LocalNode {
    LocalNode {
        subnet_v4: Some(format!("10.244.{third}.0/24").parse().unwrap()),
        subnet_v6: Some(format!("fd00:{third}::/64").parse().unwrap()),
    }
}

fn hop(name: &str, third: u8, endpoint: &str, mtu: u16, mac: MacAddr) -> NextHop {
    let n = node(third);
    NextHop {
        name: name.into(),
        endpoint: endpoint.parse().unwrap(),
        subnet_v4: n.subnet_v4,
        subnet_v6: n.subnet_v6,
        mac: Some(mac),
        mtu,
        counters: Arc::new(PeerCounters::new(1)),
        crypto: None,
    }
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}

impl Pair<UdpEncap> {
    /// A flannel-udp pair.
    pub fn new() -> Self {
        Self::with_peer_mtu(1472)
    }

    /// A flannel-udp pair where A reaches B over a path of `mtu` bytes.
    pub fn with_peer_mtu(mtu: u16) -> Self {
        Pair::build(UdpEncap, UdpEncap, mtu)
    }
}

impl Pair<VxlanEncap> {
    /// A VXLAN pair on VNI [`VNI`].
    pub fn vxlan() -> Self {
        let vni = Vni::new(VNI).unwrap();
        Pair::build(VxlanEncap::new(vni, A_MAC), VxlanEncap::new(vni, B_MAC), 1450)
    }
}

/// What [`Pair::wireguard`] keeps besides the pair: each node's handshake queue (what the
/// control thread would read), its session table and its state for the other node.
pub struct WgSide {
    pub handshakes: std::sync::mpsc::Receiver<crate::wireguard::HandshakeDatagram>,
    pub sessions: Arc<crate::wireguard::SessionTable>,
    pub peer: Arc<crate::wireguard::PeerCrypto>,
    pub handshaker: crate::wireguard::Handshaker,
}

impl Pair<crate::wireguard::WireGuardEncap> {
    /// A WireGuard pair with fresh keys and no session yet (see [`Pair::wg_handshake`]).
    pub fn wireguard() -> (Self, WgSide, WgSide) {
        use crate::wireguard::{Handshaker, PeerCrypto, PrivateKey, SessionTable, WireGuardEncap};
        let (ka, kb) = (PrivateKey::generate().unwrap(), PrivateKey::generate().unwrap());
        let side = |own: &PrivateKey, other: &PrivateKey| {
            let (tx, rx) = std::sync::mpsc::sync_channel(16);
            let sessions = Arc::new(SessionTable::new());
            let w = WgSide {
                handshakes: rx,
                sessions: Arc::clone(&sessions),
                peer: Arc::new(PeerCrypto::new(other.public_key())),
                handshaker: Handshaker::new(own.clone(), [0; 32]),
            };
            (WireGuardEncap::new(sessions, tx), w)
        };
        let ((ea, wa), (eb, wb)) = (side(&ka, &kb), side(&kb, &ka));
        let mut pair = Pair::build(ea, eb, 1420);
        let with = |t: &RouteTable, c: &Arc<crate::wireguard::PeerCrypto>| {
            let mut h = t.peers()[0].clone();
            h.crypto = Some(Arc::clone(c));
            RouteTable::new(vec![h], false).unwrap()
        };
        pair.routes_a = with(&pair.routes_a, &wa.peer);
        pair.routes_b = with(&pair.routes_b, &wb.peer);
        (pair, wa, wb)
    }

    /// Runs a handshake A → B as the control threads would, and installs both keypairs;
    /// B's waits for A's first data message to confirm it.
    pub fn wg_handshake(a: &mut WgSide, b: &mut WgSide, ia: u32, ib: u32, stamp: u64) {
        use crate::wireguard::{Keypair, handshake::tai64n};
        let now = Instant::now();
        let init = a
            .handshaker
            .initiate(&b.handshaker.public_key(), ia, tai64n(std::time::Duration::from_secs(stamp)))
            .unwrap();
        let pa = a.handshaker.public_key();
        let (resp, eb) = b.handshaker.on_initiation(&init, ib, |k| *k == pa).unwrap();
        let ea = a.handshaker.on_response(&resp).unwrap();
        let (ka, kb) = (Arc::new(Keypair::new(&ea, now)), Arc::new(Keypair::new(&eb, now)));
        a.sessions.insert(&ka);
        b.sessions.insert(&kb);
        a.peer.install(ka);
        b.peer.install(kb);
    }
}

impl<E: Encap> Pair<E> {
    fn build(a: E, b: E, mtu: u16) -> Self {
        Self {
            a: Forwarder::new(a, node(1), 0, Arc::new(WorkerStats::default())),
            b: Forwarder::new(b, node(2), 0, Arc::new(WorkerStats::default())),
            routes_a: RouteTable::new(vec![hop("b", 2, B_ENDPOINT, mtu, B_MAC)], E::SOURCE_PORT_MATTERS).unwrap(),
            routes_b: RouteTable::new(vec![hop("a", 1, A_ENDPOINT, 1472, A_MAC)], E::SOURCE_PORT_MATTERS).unwrap(),
            now: Instant::now(),
        }
    }

    /// A slot holding `payload` at the standard headroom: (bytes, head, len).
    pub fn slot(&self, payload: &[u8]) -> (Vec<u8>, usize, usize) {
        let mut v = vec![0u8; HEADROOM + payload.len() + 64];
        v[HEADROOM..HEADROOM + payload.len()].copy_from_slice(payload);
        (v, HEADROOM, payload.len())
    }

    /// Sends `inner` from A's TUN; returns what B writes into its TUN, if anything.
    pub fn a_to_b(&mut self, inner: &[u8]) -> Option<Vec<u8>> {
        let wire = self.a_encap(inner)?;
        self.b_receives(&wire)
    }

    /// Runs `inner` through A's TUN side; returns the UDP payload A sends to B.
    pub fn a_encap(&mut self, inner: &[u8]) -> Option<Vec<u8>> {
        let (mut slot, head, len) = self.slot(inner);
        let mut pkt = PacketBuf::new(&mut slot, head, len).unwrap();
        let TunVerdict::Send { to, .. } = self.a.from_tun(&self.routes_a, &mut pkt, self.now) else {
            return None;
        };
        assert_eq!(to, B_ENDPOINT.parse::<SocketAddr>().unwrap());
        Some(pkt.as_slice().to_vec())
    }

    /// B receives `wire` from A's endpoint; returns what B writes into its TUN, if anything.
    pub fn b_receives(&mut self, wire: &[u8]) -> Option<Vec<u8>> {
        let (mut slot, head, len) = self.slot(wire);
        let mut pkt = PacketBuf::new(&mut slot, head, len).unwrap();
        match self.b.from_underlay(&self.routes_b, A_ENDPOINT.parse().unwrap(), &mut pkt) {
            UnderlayVerdict::Deliver { .. } => Some(pkt.as_slice().to_vec()),
            UnderlayVerdict::Drop(_) | UnderlayVerdict::Reply { .. } | UnderlayVerdict::Consumed => None,
        }
    }

    /// Drops counted by both nodes together.
    pub fn drops_total(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.a.stats().drops(*r) + self.b.stats().drops(*r)).sum()
    }
}

/// Nodes A and B as in [`Pair::vxlan`], in TAP mode: each a [`Bridge`] whose TAP carries its
/// VTEP MAC, each the other's only peer (path MTU 1450).
pub struct TapPair {
    pub a: Bridge,
    pub b: Bridge,
    pub routes_a: RouteTable,
    pub routes_b: RouteTable,
    pub now: Instant,
}

impl TapPair {
    /// A TAP-mode pair on VNI [`VNI`].
    pub fn new() -> Self {
        let vni = Vni::new(VNI).unwrap();
        Self {
            a: Bridge::new(vni, A_MAC, node(1), 0, Arc::new(WorkerStats::default())),
            b: Bridge::new(vni, B_MAC, node(2), 0, Arc::new(WorkerStats::default())),
            routes_a: RouteTable::new(vec![hop("b", 2, B_ENDPOINT, 1450, B_MAC)], false).unwrap(),
            routes_b: RouteTable::new(vec![hop("a", 1, A_ENDPOINT, 1450, A_MAC)], false).unwrap(),
            now: Instant::now(),
        }
    }
}

impl Default for TapPair {
    fn default() -> Self {
        Self::new()
    }
}
