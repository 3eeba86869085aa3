//! Steady-state forwarding allocates nothing: a counting global allocator watches the core
//! run packets both ways (encapsulation, decapsulation, ICMP replies) after warm-up.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use weft_forwarder::buf::{HEADROOM, PacketBuf, SLOT_LEN};
use weft_forwarder::testing::{A_ENDPOINT, Pair, icmp_echo};
use weft_forwarder::{TunVerdict, UnderlayVerdict};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
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
    let before = ALLOCS.load(Ordering::Relaxed);
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
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert_eq!(delivered, 18_000);
    assert!(replies > 0, "the ICMP path was not exercised");
    assert_eq!(allocs, 0, "{allocs} allocations while forwarding 20 000 packets");
}
