//! Replays the fuzz seed corpus (tests/corpus/, see its README) through the fuzz bodies, so
//! every `cargo test` runs the properties they assert over real and crafted frames.

// Test helpers outside #[test] fns: an unreadable corpus must fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use weft_forwarder::fuzzing;
use weft_forwarder::{DropReason, TunVerdict, UnderlayVerdict};

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files
}

#[test]
fn vxlan_corpus_replays_and_linux_frames_are_accepted() {
    for (name, data) in corpus("vxlan") {
        let v = fuzzing::decap_vxlan(&data);
        match name.as_str() {
            "linux_icmp_echo_request.bin" | "linux_tcp_syn.bin" => {
                assert!(matches!(v, UnderlayVerdict::Deliver { .. }), "{name}: {v:?}")
            }
            "linux_arp_request.bin" => assert!(matches!(v, UnderlayVerdict::Reply { .. }), "{name}: {v:?}"),
            _ => {}
        }
        // Every prefix too: truncation anywhere must be handled.
        for cut in 0..data.len() {
            let _ = fuzzing::decap_vxlan(&data[..cut]);
        }
        // Inner frames as if read from a TUN.
        if data.len() > 22 {
            let _ = fuzzing::from_tun_vxlan(&data[22..]);
        }
    }
}

#[test]
fn udp_corpus_replays() {
    for (name, data) in corpus("udp") {
        let v = fuzzing::decap_udp(&data);
        if name == "echo_request.bin" {
            assert!(matches!(v, UnderlayVerdict::Deliver { .. }), "{name}: {v:?}");
        } else {
            assert!(matches!(v, UnderlayVerdict::Drop(_)), "{name}: {v:?}");
        }
        for cut in 0..data.len() {
            let _ = fuzzing::decap_udp(&data[..cut]);
        }
    }
}

#[test]
fn tun_corpus_replays() {
    // Packets as read from a TUN; `to_peer_subnet_broadcast.bin` is a fuzzer find: A used to
    // send a packet for B's subnet broadcast address, which B drops as a martian.
    for (_, data) in corpus("tun") {
        let _ = fuzzing::from_tun_vxlan(&data);
    }
}

#[test]
fn gso_corpus_replays_and_real_super_packets_are_cut() {
    for (name, data) in corpus("gso") {
        let v = fuzzing::from_tun_segmented(&data);
        if name.ends_with("_tso.bin") || name.ends_with("_uso.bin") || name == "tcp4_partial_csum.bin" {
            assert!(matches!(v, TunVerdict::Send { .. }), "{name}: {v:?}");
        }
        if name == "tcp4_data_offset_4.bin" {
            assert_eq!(v, TunVerdict::Drop(DropReason::BadL4Header), "{name}");
        }
        if name == "crash_tun_bad_header_checksum.bin" {
            assert_eq!(v, TunVerdict::Drop(DropReason::BadInnerChecksum), "{name}");
        }
        // Truncated anywhere: the lengths no longer match, refused without a panic.
        for cut in (0..data.len()).step_by(97) {
            let _ = fuzzing::from_tun_segmented(&data[..cut]);
        }
    }
}

#[test]
fn gro_corpus_replays_and_runs_merge() {
    for (name, data) in corpus("gro") {
        let merged = fuzzing::merge_underlay(&data);
        if name.ends_with("_run.bin") {
            assert!(merged >= 1, "{name}: nothing merged");
        }
        for cut in (0..data.len()).step_by(211) {
            let _ = fuzzing::merge_underlay(&data[..cut]);
        }
    }
}

#[test]
fn tap_corpus_replays_and_real_frames_are_delivered() {
    let mut all = corpus("tap");
    all.extend(corpus("vxlan"));
    for (name, data) in all {
        let v = fuzzing::decap_tap(&data);
        if name.starts_with("tap_") || name.starts_with("linux_") {
            assert!(matches!(v, UnderlayVerdict::Deliver { .. }), "{name}: {v:?}");
        }
        for cut in 0..data.len() {
            let _ = fuzzing::decap_tap(&data[..cut]);
        }
    }
}

#[test]
fn wireguard_corpus_replays() {
    use weft_forwarder::fuzzing::WgOutcome;
    let (deliver, replayed) = (
        |u: &UnderlayVerdict| matches!(u, UnderlayVerdict::Deliver { .. }),
        UnderlayVerdict::Drop(DropReason::Replayed),
    );
    for (name, data) in corpus("wireguard") {
        let WgOutcome { tun, underlay } = fuzzing::decap_wireguard(&data);
        let sent = || assert!(matches!(tun, Some(TunVerdict::Send { .. })), "{name}: {tun:?}");
        let drop = |r| assert_eq!(underlay, [UnderlayVerdict::Drop(r)], "{name}");
        match name.as_str() {
            // Recorded under another handshake's keys: for B's index, but not authentic.
            "raw_sealed_icmp.bin" | "raw_keepalive.bin" => drop(DropReason::AuthFailed),
            "raw_initiation.bin" | "raw_response.bin" | "raw_cookie_reply.bin" => {
                assert_eq!(underlay, [UnderlayVerdict::Consumed], "{name}")
            }
            "raw_short_data.bin" => drop(DropReason::Truncated),
            "raw_counter_max.bin" => drop(DropReason::Replayed),
            "raw_bad_reserved.bin" => drop(DropReason::BadMessage),
            "raw_unknown_index.bin" => drop(DropReason::AuthFailed),
            n if n.starts_with("tun_flip_") => {
                sent();
                assert_eq!(underlay.len(), 3, "{name}: {underlay:?}");
                assert!(
                    !deliver(&underlay[0]) && deliver(&underlay[1]) && underlay[2] == replayed,
                    "{name}: {underlay:?}"
                );
            }
            n if n.starts_with("tun_reply_") => {
                assert_eq!(tun, Some(TunVerdict::Reply), "{name}");
                assert!(underlay.is_empty(), "{name}");
            }
            n if n.starts_with("tun_") => {
                sent();
                assert!(
                    underlay.len() == 2 && deliver(&underlay[0]) && underlay[1] == replayed,
                    "{name}: {underlay:?}"
                );
            }
            "plain_keepalive.bin" => assert_eq!(underlay, [UnderlayVerdict::Consumed, replayed], "{name}"),
            "plain_flip_tag.bin" => {
                assert!(underlay.len() == 3 && underlay[0] == UnderlayVerdict::Drop(DropReason::AuthFailed), "{name}");
                assert!(deliver(&underlay[1]) && underlay[2] == replayed, "{name}: {underlay:?}");
            }
            "plain_icmp_echo.bin" | "plain_ttl_1.bin" => {
                assert!(underlay.len() == 2 && deliver(&underlay[0]), "{name}: {underlay:?}")
            }
            "plain_foreign_source.bin" => {
                assert_eq!(underlay, [UnderlayVerdict::Drop(DropReason::ForeignSource), replayed], "{name}")
            }
            "plain_not_local.bin" => {
                assert_eq!(underlay, [UnderlayVerdict::Drop(DropReason::NotLocalDestination), replayed], "{name}")
            }
            "plain_garbage.bin" => {
                assert_eq!(underlay, [UnderlayVerdict::Drop(DropReason::BadIpHeader), replayed], "{name}")
            }
            _ => {}
        }
        // Every prefix too (every 7th of the long ones): truncation anywhere, in every mode.
        let step = if data.len() > 200 { 7 } else { 1 };
        for cut in (0..data.len()).step_by(step) {
            let _ = fuzzing::decap_wireguard(&data[..cut]);
        }
    }
}

#[test]
fn wg_handshake_corpus_replays() {
    use weft_forwarder::fuzzing::HsOutcome::{self, Auth, BadMac, Malformed, NoPending, Ok, Replayed, UnknownPeer};
    for (name, data) in corpus("wg_handshake") {
        let out = fuzzing::wireguard_handshake(&data);
        let want: Option<&[HsOutcome]> = match name.as_str() {
            // Real messages, but to another process's keys: refused for their mac1.
            "raw_initiation.bin" => Some(&[BadMac, Malformed]),
            "raw_response.bin" => Some(&[Malformed, BadMac]),
            "raw_response_then_real.bin" => Some(&[Malformed, BadMac, Ok]),
            "init_real.bin" | "init_mac2.bin" => Some(&[Ok]),
            "init_real_completes.bin" => Some(&[Ok, Replayed, Ok]),
            "init_type.bin" => Some(&[Malformed]),
            "init_static.bin" => Some(&[BadMac]),
            "init_static_fixed_mac1.bin"
            | "init_ephemeral_top_bit_fixed_mac1.bin"
            | "init_timestamp_fixed_mac1.bin" => Some(&[Auth]),
            "init_sender_fixed_mac1.bin" => Some(&[Ok]),
            "init_sender_fixed_mac1_completes.bin" => Some(&[Ok, Replayed, NoPending, Ok]),
            "init_unknown_peer.bin" => Some(&[UnknownPeer]),
            "resp_real.bin" | "resp_mac2.bin" | "resp_sender_fixed_mac1.bin" => Some(&[Ok]),
            "resp_ephemeral.bin" => Some(&[BadMac]),
            "resp_ephemeral_then_real.bin" => Some(&[BadMac, Ok]),
            "resp_ephemeral_fixed_mac1_then_real.bin" | "resp_tag_fixed_mac1_then_real.bin" => Some(&[Auth, NoPending]),
            "resp_receiver_fixed_mac1_then_real.bin" => Some(&[NoPending, Ok]),
            _ => None,
        };
        if let Some(want) = want {
            assert_eq!(out, want, "{name}");
        }
        // Truncated anywhere, the real messages (a mutation seed cut short is only fewer changes).
        if data[0] == 0 {
            for cut in 0..data.len() {
                let _ = fuzzing::wireguard_handshake(&data[..cut]);
            }
        }
    }
}

/// Writes the seeds of tests/corpus/{wireguard,wg_handshake}/ (see the README there), from a
/// real handshake between two fresh keys:
/// `WEFT_WRITE_SEEDS=1 cargo test -p weft-forwarder --test corpus_replay -- --ignored write_wireguard_seeds`.
#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_wireguard_seeds() {
    if std::env::var_os("WEFT_WRITE_SEEDS").is_none() {
        return;
    }
    seeds::write_wireguard(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus"));
}

/// Writes the synthesised seeds of tests/corpus/{gso,gro,tap}/ (see the README there):
/// `WEFT_WRITE_SEEDS=1 cargo test -p weft-forwarder --test corpus_replay -- --ignored write_seeds`.
#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_seeds() {
    if std::env::var_os("WEFT_WRITE_SEEDS").is_none() {
        return;
    }
    seeds::write(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus"));
}

mod seeds {
    use std::path::Path;

    use etherparse::PacketBuilder;
    use weft_forwarder::gso::{F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VnetHdr};
    use weft_forwarder::testing::{A_MAC, B_MAC, icmp_echo, icmp_echo_v6};
    use weft_forwarder::wire::checksum;

    const A4: [u8; 4] = [10, 244, 1, 5];
    const B4: [u8; 4] = [10, 244, 2, 9];
    const A6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
    const B6: [u8; 16] = [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];

    fn data(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i * 7 + seed) % 251) as u8).collect()
    }

    /// A TCP segment or super-packet: seq, payload, PSH/FIN.
    fn tcp(v6: bool, seq: u32, payload: &[u8], psh: bool, fin: bool) -> Vec<u8> {
        let b = if v6 { PacketBuilder::ipv6(A6, B6, 64) } else { PacketBuilder::ipv4(A4, B4, 64) };
        let mut b = b.tcp(40_000, 5201, seq, 64_240).ack(77);
        if psh {
            b = b.psh();
        }
        if fin {
            b = b.fin();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn udp(v6: bool, payload: &[u8]) -> Vec<u8> {
        let b = if v6 { PacketBuilder::ipv6(A6, B6, 64) } else { PacketBuilder::ipv4(A4, B4, 64) };
        let mut out = Vec::new();
        b.udp(4433, 443).write(&mut out, payload).unwrap();
        out
    }

    /// What a TUN with TSO/USO hands over: the L4 checksum field holds only the pseudo-header
    /// sum (uncomplemented), the virtio-net header in front in host byte order.
    fn read(hdr: VnetHdr, mut pkt: Vec<u8>) -> Vec<u8> {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            let v6 = pkt[0] >> 4 == 6;
            let l4 = usize::from(hdr.csum_start);
            let l4_len = (pkt.len() - l4) as u32;
            let addrs = if v6 { &pkt[8..40] } else { &pkt[12..20] };
            let mut acc = checksum::sum(0, addrs);
            acc = if v6 {
                checksum::sum(acc, &l4_len.to_be_bytes())
            } else {
                checksum::sum(acc, &(l4_len as u16).to_be_bytes())
            };
            acc = checksum::sum(acc, &[0, pkt[if v6 { 6 } else { 9 }]]);
            let partial = !checksum::fold(acc);
            let at = l4 + usize::from(hdr.csum_offset);
            pkt[at..at + 2].copy_from_slice(&partial.to_be_bytes());
        }
        let mut out = vec![0u8; 10];
        hdr.emit(&mut out);
        out.extend_from_slice(&pkt);
        out
    }

    fn gso(gso_type: u8, v6: bool, tcp: bool, mss: u16) -> VnetHdr {
        let l4 = if v6 { 40 } else { 20 };
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: l4 + if tcp { 20 } else { 8 },
            gso_size: mss,
            csum_start: l4,
            csum_offset: if tcp { 16 } else { 6 },
        }
    }

    /// A merge input: options byte, then (length, flags, packet) records.
    fn records(uso: bool, pkts: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = vec![u8::from(uso)];
        for (flags, p) in pkts {
            out.extend_from_slice(&(p.len() as u16).to_be_bytes());
            out.push(*flags);
            out.extend_from_slice(p);
        }
        out
    }

    /// A VXLAN (VNI 1) frame from A's VTEP MAC.
    fn vxlan(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut w = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        w.extend_from_slice(&dst);
        w.extend_from_slice(&A_MAC.0);
        w.extend_from_slice(&ethertype.to_be_bytes());
        w.extend_from_slice(payload);
        w
    }

    fn neighbour_solicitation() -> Vec<u8> {
        let (src, target): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
            ("fd00:1::1".parse().unwrap(), "fd00:2::".parse().unwrap());
        let dst: std::net::Ipv6Addr = "ff02::1:ff00:0".parse().unwrap();
        let mut icmp = vec![135u8, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&target.octets());
        icmp.extend_from_slice(&[1, 1]);
        icmp.extend_from_slice(&A_MAC.0);
        let h = etherparse::Icmpv6Header::with_checksum(
            etherparse::Icmpv6Type::Unknown { type_u8: 135, code_u8: 0, bytes5to8: [0; 4] },
            src.octets(),
            dst.octets(),
            &icmp[8..],
        )
        .unwrap();
        icmp[2..4].copy_from_slice(&h.checksum.to_be_bytes());
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        ip.extend_from_slice(&[58, 255]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.extend_from_slice(&icmp);
        ip
    }

    fn arp_request() -> Vec<u8> {
        let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
        p.extend_from_slice(&A_MAC.0);
        p.extend_from_slice(&[10, 244, 1, 0, 0, 0, 0, 0, 0, 0, 10, 244, 2, 0]);
        p
    }

    pub(super) fn write_wireguard(dir: &Path) {
        use std::time::Duration;

        use weft_forwarder::fuzzing::{WG_A_INDEX, WG_B_INDEX};
        use weft_forwarder::testing::Pair;
        use weft_forwarder::wireguard::handshake::tai64n;
        let put = |sub: &str, name: &str, mode: u8, bytes: &[u8]| {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            std::fs::write(dir.join(sub).join(name), [&[mode][..], bytes].concat()).unwrap();
        };
        // Real messages of a real handshake, recorded (the keys die with this process).
        let (mut net, mut wa, mut wb) = Pair::wireguard();
        let init =
            wa.handshaker.initiate(&wb.handshaker.public_key(), WG_A_INDEX, tai64n(Duration::from_secs(7))).unwrap();
        let pa = wa.handshaker.public_key();
        let (resp, _) = wb.handshaker.on_initiation(&init, WG_B_INDEX, |k| *k == pa).unwrap();
        Pair::wg_handshake(&mut wa, &mut wb, WG_A_INDEX, WG_B_INDEX, 8);
        let ping = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 56);
        let sealed = net.a_encap(&ping).unwrap();
        let kp = wa.peer.current.load_full().unwrap();
        let counter = kp.reserve(1).unwrap();
        let mut keepalive = vec![4, 0, 0, 0];
        keepalive.extend_from_slice(&WG_B_INDEX.to_le_bytes());
        keepalive.extend_from_slice(&counter.to_le_bytes());
        let mut tag = [0u8; 16];
        kp.seal(counter, &mut [], &mut tag).unwrap();
        keepalive.extend_from_slice(&tag);

        // wireguard/: inputs of fuzzing::decap_wireguard (first byte: mode).
        let w = "wireguard";
        put(w, "raw_sealed_icmp.bin", 0, &sealed);
        put(w, "raw_keepalive.bin", 0, &keepalive);
        put(w, "raw_initiation.bin", 0, &init);
        put(w, "raw_response.bin", 0, &resp);
        let mut cookie = vec![3, 0, 0, 0];
        cookie.extend_from_slice(&data(60, 3));
        put(w, "raw_cookie_reply.bin", 0, &cookie);
        put(w, "raw_short_data.bin", 0, &sealed[..24]);
        let mut max = sealed.clone();
        max[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        put(w, "raw_counter_max.bin", 0, &max);
        let mut reserved = sealed.clone();
        reserved[2] = 1;
        put(w, "raw_bad_reserved.bin", 0, &reserved);
        let mut stranger = sealed.clone();
        stranger[4] ^= 0x40;
        put(w, "raw_unknown_index.bin", 0, &stranger);
        // Mode 1: [pos_lo, pos_hi, mask] then a packet read from A's TUN.
        let tun = |flip: (u16, u8), inner: &[u8]| {
            let mut v = flip.0.to_le_bytes().to_vec();
            v.push(flip.1);
            v.extend_from_slice(inner);
            v
        };
        put(w, "tun_icmp_echo.bin", 1, &tun((0, 0), &ping));
        put(w, "tun_icmp6_echo.bin", 1, &tun((0, 0), &icmp_echo_v6("fd00:1::1", "fd00:2::1", 56)));
        put(w, "tun_tcp_syn.bin", 1, &tun((0, 0), &tcp(false, 1, &[], false, false)));
        put(w, "tun_udp6.bin", 1, &tun((0, 0), &udp(true, &data(300, 1))));
        put(w, "tun_mtu_1420.bin", 1, &tun((0, 0), &icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 1420 - 28)));
        let len = (ping.len() + 32) as u16;
        put(w, "tun_flip_tag.bin", 1, &tun((len - 1, 0x01), &ping));
        put(w, "tun_flip_counter.bin", 1, &tun((9, 0x80), &ping));
        put(w, "tun_flip_receiver.bin", 1, &tun((4, 0x02), &ping));
        put(w, "tun_flip_ciphertext.bin", 1, &tun((40, 0xff), &ping));
        // 116 bytes inside: a 148-byte datagram, which a changed type byte makes an initiation.
        put(w, "tun_flip_to_initiation.bin", 1, &tun((0, 0x05), &icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 88)));
        put(w, "tun_reply_df_too_big.bin", 1, &tun((0, 0), &icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 1500)));
        put(w, "tun_reply_no_route.bin", 1, &tun((0, 0), &icmp_echo([10, 244, 1, 1], [10, 244, 3, 1], 56)));
        // Mode 2: the same header, then bytes A seals as they are.
        put(w, "plain_icmp_echo.bin", 2, &tun((0, 0), &ping));
        put(w, "plain_keepalive.bin", 2, &tun((0, 0), &[]));
        put(w, "plain_foreign_source.bin", 2, &tun((0, 0), &icmp_echo([10, 244, 3, 1], [10, 244, 2, 1], 56)));
        put(w, "plain_not_local.bin", 2, &tun((0, 0), &icmp_echo([10, 244, 1, 1], [10, 244, 3, 1], 56)));
        let mut ttl1 = ping.clone();
        ttl1[8] = 1;
        ttl1[10..12].copy_from_slice(&[0, 0]);
        let c = weft_forwarder::wire::checksum::checksum(&ttl1[..20]);
        ttl1[10..12].copy_from_slice(&c.to_be_bytes());
        put(w, "plain_ttl_1.bin", 2, &tun((0, 0), &ttl1));
        put(w, "plain_garbage.bin", 2, &tun((0, 0), &data(100, 5)));
        put(w, "plain_flip_tag.bin", 2, &tun((0xffff, 0x10), &ping));

        // wg_handshake/: inputs of fuzzing::wireguard_handshake. First byte: mode + 3 × flags
        // (1: recompute mac1, 2: then A takes B's real response, 4: B knows no peer).
        let h = "wg_handshake";
        put(h, "raw_initiation.bin", 0, &init);
        put(h, "raw_response.bin", 0, &resp);
        put(h, "raw_response_then_real.bin", 6, &resp);
        // Mode 1: (position, xor) pairs on A's real initiation.
        put(h, "init_real.bin", 1, &[]);
        put(h, "init_real_completes.bin", 1 + 6, &[]);
        put(h, "init_mac2.bin", 1, &[140, 0xaa, 147, 1]);
        put(h, "init_type.bin", 1, &[0, 3]);
        put(h, "init_static.bin", 1, &[50, 1]);
        put(h, "init_static_fixed_mac1.bin", 1 + 3, &[50, 1]);
        put(h, "init_ephemeral_top_bit_fixed_mac1.bin", 1 + 3, &[39, 0x80]);
        put(h, "init_timestamp_fixed_mac1.bin", 1 + 3, &[100, 0x01]);
        put(h, "init_sender_fixed_mac1.bin", 1 + 3, &[4, 1]);
        put(h, "init_sender_fixed_mac1_completes.bin", 1 + 9, &[4, 1]);
        put(h, "init_unknown_peer.bin", 1 + 12, &[]);
        // Mode 2: the same on B's real response.
        put(h, "resp_real.bin", 2, &[]);
        put(h, "resp_mac2.bin", 2, &[80, 1, 91, 0x80]);
        put(h, "resp_ephemeral.bin", 2, &[20, 1]);
        put(h, "resp_ephemeral_then_real.bin", 2 + 6, &[20, 1]);
        put(h, "resp_ephemeral_fixed_mac1_then_real.bin", 2 + 9, &[20, 1]);
        put(h, "resp_tag_fixed_mac1_then_real.bin", 2 + 9, &[50, 1]);
        put(h, "resp_receiver_fixed_mac1_then_real.bin", 2 + 9, &[8, 1]);
        put(h, "resp_sender_fixed_mac1.bin", 2 + 3, &[4, 1]);
    }

    pub(super) fn write(dir: &Path) {
        let put = |sub: &str, name: &str, bytes: Vec<u8>| {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            std::fs::write(dir.join(sub).join(name), bytes).unwrap();
        };
        // gso: TUN reads with a virtio-net header.
        put(
            "gso",
            "tcp4_3x1400_tso.bin",
            read(gso(GSO_TCPV4, false, true, 1400), tcp(false, 1000, &data(4100, 1), true, false)),
        );
        put(
            "gso",
            "tcp4_fin_tso.bin",
            read(gso(GSO_TCPV4, false, true, 1000), tcp(false, u32::MAX - 500, &data(2500, 2), true, true)),
        );
        put(
            "gso",
            "tcp6_3x1380_tso.bin",
            read(gso(GSO_TCPV6, true, true, 1380), tcp(true, 7, &data(4000, 3), false, false)),
        );
        put("gso", "udp4_4x1200_uso.bin", read(gso(GSO_UDP_L4, false, false, 1200), udp(false, &data(4500, 4))));
        put("gso", "udp6_3x1200_uso.bin", read(gso(GSO_UDP_L4, true, false, 1200), udp(true, &data(3600, 5))));
        let partial = VnetHdr { gso_type: GSO_NONE, gso_size: 0, ..gso(GSO_NONE, false, true, 0) };
        put("gso", "tcp4_partial_csum.bin", read(partial, tcp(false, 5, &data(500, 6), true, false)));
        let mut plain = vec![0u8; 10];
        plain.extend_from_slice(&icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 56));
        put("gso", "plain_icmp.bin", plain);
        let mut plain6 = vec![0u8; 10];
        plain6.extend_from_slice(&icmp_echo_v6("fd00:1::1", "fd00:2::1", 56));
        put("gso", "plain_icmp6.bin", plain6);
        // The largest super-packets a TUN hands over: 46 × 1400 (64 440 bytes of IPv4), 64 × 1000 USO.
        put(
            "gso",
            "tcp4_46x1400_64k_tso.bin",
            read(gso(GSO_TCPV4, false, true, 1400), tcp(false, 9, &data(46 * 1400, 8), true, false)),
        );
        put(
            "gso",
            "udp6_64x1000_64k_uso.bin",
            read(gso(GSO_UDP_L4, true, false, 1000), udp(true, &data(64 * 1000 - 8, 9))),
        );
        // The crash this hardening fixed: a TCP data offset of 4 in a TSO super-packet.
        let mut doff = read(gso(GSO_TCPV4, false, true, 1400), tcp(false, 1000, &data(4100, 7), true, false));
        doff[10 + 20 + 12] = 0x40;
        put("gso", "tcp4_data_offset_4.bin", doff);

        // gro: runs of datagrams from A as B receives them.
        let run = |v6: bool, mss: usize, n: u32| -> Vec<(u8, Vec<u8>)> {
            let mut v: Vec<_> =
                (0..n).map(|i| (0, tcp(v6, 100 + i * mss as u32, &data(mss, i as usize), false, false))).collect();
            v.push((0, tcp(v6, 100 + n * mss as u32, &data(mss / 3, 99), true, false)));
            v
        };
        put("gro", "tcp4_run.bin", records(false, &run(false, 1000, 5)));
        put("gro", "tcp6_run.bin", records(false, &run(true, 1200, 4)));
        let dgrams = |v6: bool| -> Vec<(u8, Vec<u8>)> {
            let mut v: Vec<_> = (0..4).map(|i| (0, udp(v6, &data(500, i)))).collect();
            v.push((0, udp(v6, &data(120, 9))));
            v
        };
        put("gro", "udp4_uso_run.bin", records(true, &dgrams(false)));
        put("gro", "udp6_uso_run.bin", records(true, &dgrams(true)));
        // At the limits: 47 full segments pass 64 KiB (two merges), 70 small datagrams pass 64.
        put("gro", "tcp4_47x1400_64k_run.bin", records(false, &run(false, 1400, 47)));
        let small: Vec<_> = (0..70).map(|i| (0, udp(false, &data(16, i)))).collect();
        put("gro", "udp4_70_small_uso_run.bin", records(true, &small));
        let mut bad = tcp(false, 1100, &data(1000, 2), false, false);
        bad[60] ^= 0xff;
        let mixed = vec![
            (0, tcp(false, 100, &data(1000, 1), false, false)),
            (0, bad.clone()),
            (3, bad),
            (0, tcp(false, 5000, &data(1000, 3), false, false)),
            (0, udp(false, &data(300, 4))),
            (0, udp(false, &data(300, 5))),
            (3, tcp(true, 100, &data(700, 6), false, false)),
        ];
        put("gro", "mixed_gaps_and_checksums.bin", records(true, &mixed));
        // A kernel VTEP with checksum offload (flannel#1279): every checksum partial (flag bit
        // 2), or every other one, in TCP and USO runs.
        let partial = |mut v: Vec<(u8, Vec<u8>)>, every: usize| -> Vec<(u8, Vec<u8>)> {
            v.iter_mut().step_by(every).for_each(|(f, _)| *f |= 4);
            v
        };
        put("gro", "tcp4_partial_run.bin", records(false, &partial(run(false, 1000, 5), 1)));
        put("gro", "tcp6_half_partial_run.bin", records(false, &partial(run(true, 1200, 4), 2)));
        put("gro", "udp4_uso_partial_run.bin", records(true, &partial(dgrams(false), 1)));

        // tap: VXLAN frames from A in TAP mode.
        put("tap", "tap_ipv4_unicast.bin", vxlan(B_MAC.0, 0x0800, &icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 56)));
        put("tap", "tap_ipv6_unicast.bin", vxlan(B_MAC.0, 0x86dd, &icmp_echo_v6("fd00:1::1", "fd00:2::1", 56)));
        put("tap", "tap_arp_request.bin", vxlan([0xff; 6], 0x0806, &arp_request()));
        put(
            "tap",
            "tap_neighbour_solicitation.bin",
            vxlan([0x33, 0x33, 0xff, 0, 0, 0], 0x86dd, &neighbour_solicitation()),
        );
    }
}
