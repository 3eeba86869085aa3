//! Fuzz bodies as plain functions: the cargo-fuzz targets in `forwarder/fuzz/` call them, and
//! `tests/corpus_replay.rs` replays the seed corpus through them in every `cargo test`.
//!
//! Each body asserts properties, not only "no panic" (security.md S2): whatever the bytes, a
//! delivered packet is a well-formed IP packet no longer than the datagram, from the sending
//! peer's subnet, to ours, and never to a martian address; a reply goes back to the sender.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;

use crate::buf::{HEADROOM, PacketBuf, SLOT_LEN};
use crate::encap::Encap;
use crate::forwarder::{TunVerdict, UnderlayVerdict};
use crate::testing::{A_ENDPOINT, B_ENDPOINT, Pair};
use crate::wire::ip::IpPacket;

fn check_underlay<E: Encap>(mut net: Pair<E>, data: &[u8]) -> UnderlayVerdict {
    let mut slot = vec![0u8; SLOT_LEN];
    let n = data.len().min(SLOT_LEN - HEADROOM);
    slot[HEADROOM..HEADROOM + n].copy_from_slice(&data[..n]);
    let mut pkt = PacketBuf::new(&mut slot, HEADROOM, n).unwrap();
    let from: SocketAddr = A_ENDPOINT.parse().unwrap();
    let v = net.b.from_underlay(&net.routes_b, from, &mut pkt);
    match v {
        UnderlayVerdict::Deliver { .. } => {
            assert!(pkt.len() <= n, "delivered more than was received");
            let ip = IpPacket::new_checked(pkt.as_slice()).expect("delivered packet is well-formed IP");
            assert_eq!(ip.total_len(), pkt.len(), "padding was trimmed");
            assert!(ip.header_checksum_ok(), "delivered an IPv4 header whose checksum fails");
            let peer = &net.routes_b.peers()[0];
            assert!(peer.owns(ip.src()), "delivered a packet from outside the peer's subnet");
            let local = crate::testing::local(2);
            assert!(local.owns(ip.dst()), "delivered a packet not for our subnet");
        }
        UnderlayVerdict::Reply { to } => assert_eq!(to, from, "replied to someone else"),
        UnderlayVerdict::Drop(_) => {}
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
    let mut slot = vec![0u8; SLOT_LEN];
    let n = data.len().min(SLOT_LEN - HEADROOM);
    slot[HEADROOM..HEADROOM + n].copy_from_slice(&data[..n]);
    let mut pkt = PacketBuf::new(&mut slot, HEADROOM, n).unwrap();
    let v = net.a.from_tun(&net.routes_a, &mut pkt, net.now);
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
    v
}
