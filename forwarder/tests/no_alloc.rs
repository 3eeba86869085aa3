//! Steady-state forwarding allocates nothing: a counting global allocator watches the core
//! run packets both ways (encapsulation, decapsulation, ICMP replies) after warm-up.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::time::Instant;

use weft_forwarder::buf::{HEADROOM, PacketBuf, SLOT_LEN};
use weft_forwarder::testing::{A_ENDPOINT, Pair, icmp_echo};
use weft_forwarder::{TunVerdict, UnderlayVerdict};

struct Counting;

thread_local! {
    /// Allocations made by this thread: tests run in parallel, each counts its own.
    static ALLOCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn allocs() -> u64 {
    ALLOCS.with(std::cell::Cell::get)
}

fn count() {
    // try_with: the thread-local may already be gone while a thread exits.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: delegates to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn forwarding_allocates_nothing_per_packet() {
    let mut net = Pair::new();
    let from_a: SocketAddr = A_ENDPOINT.parse().unwrap();
    let good = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 1400);
    let unroutable = icmp_echo([10, 244, 1, 5], [10, 244, 77, 1], 64);
    let mut slot = vec![0u8; SLOT_LEN];
    let now = Instant::now();
    let before = allocs();
    let (mut delivered, mut replies) = (0u32, 0u32);
    for i in 0..20_000u32 {
        let bytes = if i % 10 == 0 { &unroutable } else { &good };
        slot[HEADROOM..HEADROOM + bytes.len()].copy_from_slice(bytes);
        let mut pkt = PacketBuf::new(&mut slot, HEADROOM, bytes.len()).unwrap();
        match net.a.from_tun(&net.routes_a, &mut pkt, now) {
            TunVerdict::Send { .. } => {
                if let UnderlayVerdict::Deliver { .. } = net.b.from_underlay(&net.routes_b, from_a, &mut pkt) {
                    delivered += 1;
                }
            }
            TunVerdict::Reply => replies += 1,
            TunVerdict::Flood => unreachable!("TUN mode never floods"),
            TunVerdict::Drop(_) => {}
        }
    }
    let allocs = allocs() - before;
    assert_eq!(delivered, 18_000);
    assert!(replies > 0, "the ICMP path was not exercised");
    assert_eq!(allocs, 0, "{allocs} allocations while forwarding 20 000 packets");
}

/// The offload path: a 64 KiB TCP super-packet checked and encapsulated whole, cut into
/// segments, each segment checked by the receiver and merged back into one super-packet.
#[test]
fn cutting_and_merging_super_packets_allocates_nothing() {
    use weft_forwarder::forwarder::PacketCore;
    use weft_forwarder::gro::Coalesced;
    use weft_forwarder::gso::{F_NEEDS_CSUM, GSO_TCPV4, Segmentation, VnetHdr};

    let mut net = Pair::vxlan();
    let from_a: SocketAddr = A_ENDPOINT.parse().unwrap();
    let mss = 1398usize;
    let data: Vec<u8> = (0..mss * 46).map(|i| i as u8).collect();
    let mut sp = Vec::new();
    etherparse::PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 9], 64)
        .tcp(40000, 5201, 7, 502)
        .ack(1)
        .write(&mut sp, &data)
        .unwrap();
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 40,
        gso_size: mss as u16,
        csum_start: 20,
        csum_offset: 16,
    };
    // Two train buffers stand for the receive slots a merge points into (a super-packet
    // makes two trains); `head` is the merge's header slot.
    let (mut slot, mut trains, mut head) =
        (vec![0u8; SLOT_LEN], [vec![0u8; SLOT_LEN], vec![0u8; SLOT_LEN]], [0u8; 256]);
    let now = Instant::now();
    let before = allocs();
    let mut merged_segments = 0;
    for _ in 0..200 {
        slot[HEADROOM..HEADROOM + sp.len()].copy_from_slice(&sp);
        let mut pkt = PacketBuf::new(&mut slot, HEADROOM, sp.len()).unwrap();
        let seg = Segmentation::parse(&hdr, pkt.as_slice()).unwrap();
        let TunVerdict::Send { .. } = net.a.from_tun_segmented(&net.routes_a, &mut pkt, &seg, now) else {
            panic!("super-packet not sent");
        };
        let prefix = pkt.len() - sp.len();
        let stride = prefix + seg.segment_len();
        let per_train = seg.segments_per_train(prefix);
        // The merge, and where its first packet lies (train buffer, offset, length).
        let mut merge: Option<(Coalesced, (usize, usize, usize))> = None;
        let mut merged_bytes = 0;
        let (mut first, mut t) = (0, 0);
        while first < seg.segments() {
            let range = first..(first + per_train).min(seg.segments());
            // On the wire the kernel copies headers and payloads together; here that copy
            // stands for it.
            let n = seg.write_segments(pkt.as_slice(), prefix, range.clone(), &mut trains[t]).unwrap();
            for k in 0..range.len() {
                let start = k * stride;
                let len = stride.min(n - start);
                let mut d = PacketBuf::new(&mut trains[t][..start + len], start, len).unwrap();
                let UnderlayVerdict::Deliver { ip: Some(f), .. } = net.b.from_underlay(&net.routes_b, from_a, &mut d)
                else {
                    panic!("segment dropped");
                };
                let (at, dl) = (d.head(), d.len());
                let ip = &trains[t][at..at + dl];
                let appended = merge.as_mut().is_some_and(|(m, (ft, fs, fl))| {
                    let first_pkt = &trains[*ft][*fs..*fs + *fl];
                    m.append(ip, &f, &mut head, first_pkt)
                });
                if !appended {
                    merge = Coalesced::start(ip, &f, &mut head, true).map(|m| (m, (t, at, dl)));
                    merged_bytes = 0;
                }
                merged_bytes += dl - merge.as_ref().map_or(0, |(m, _)| m.header_len());
            }
            first = range.end;
            t = 1 - t;
        }
        let (m, _) = merge.unwrap();
        assert!(m.finish(&mut head) + merged_bytes > 60_000);
        merged_segments += m.segments();
    }
    let allocs = allocs() - before;
    assert_eq!(merged_segments, 200 * 46, "every super-packet came back whole");
    assert_eq!(allocs, 0, "{allocs} allocations while cutting and merging 200 super-packets");
}

/// The encrypted path: every packet sealed (one AEAD call) and opened, its counter recorded
/// in the replay window, without an allocation once the session exists.
#[test]
fn sealing_and_opening_allocates_nothing_per_packet() {
    let (mut net, mut wa, mut wb) = Pair::wireguard();
    Pair::wg_handshake(&mut wa, &mut wb, 1, 2, 1);
    let from_a: SocketAddr = A_ENDPOINT.parse().unwrap();
    let good = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 1300);
    let mut slot = vec![0u8; SLOT_LEN];
    let now = Instant::now();
    let before = allocs();
    let mut delivered = 0u32;
    for _ in 0..20_000u32 {
        slot[HEADROOM..HEADROOM + good.len()].copy_from_slice(&good);
        let mut pkt = PacketBuf::new(&mut slot, HEADROOM, good.len()).unwrap();
        if let TunVerdict::Send { .. } = net.a.from_tun(&net.routes_a, &mut pkt, now) {
            if let UnderlayVerdict::Deliver { .. } = net.b.from_underlay(&net.routes_b, from_a, &mut pkt) {
                delivered += 1;
            }
        }
    }
    let allocs = allocs() - before;
    assert_eq!(delivered, 20_000);
    assert_eq!(allocs, 0, "{allocs} allocations while sealing and opening 20 000 packets");
}
