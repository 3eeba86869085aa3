//! Criterion micro-benchmarks of the forwarder's sans-IO core (no TUN, no socket, no syscall):
//!
//! - `encap_decap`: one packet's whole trip through the core per iteration: node A's
//!   `Forwarder::from_tun` encapsulates an inner IPv4/UDP packet, node B's
//!   `Forwarder::from_underlay` decapsulates the datagram, for flannel `udp`, VXLAN and
//!   WireGuard (sealed and opened with ChaCha20-Poly1305, the replay window checked), with
//!   inner packets of 64 and 1400 bytes;
//! - `super_packet`: a 64 KiB TCP super-packet's whole trip, as with offloads: A checks and
//!   encapsulates it once (`from_tun_segmented`) and cuts it into GSO trains
//!   (`Segmentation::write_segments`, every segment's checksum computed), B checks every
//!   segment (`from_underlay`) and merges them back into one super-packet (`gro::Coalesced`);
//! - `route_lookup`: `RouteTable::lookup` in tables of 10, 1 000 and 65 536 peers, hits spread
//!   over the table and a miss;
//! - `checksum`: `wire::checksum::sum` (the RFC 1071 running sum) over a 64 KiB super-packet
//!   and over a 1460-byte segment.
//!
//! Before the groups run, a counting global allocator checks that steady-state forwarding
//! allocates nothing; the binary exits 1 if it does.
//!
//! `cargo bench -p weft-bench --bench forwarder` (criterion's flags after `--`; set
//! `WEFT_BENCH_QUICK=1` for 1 s warm-up and 2 s measurement per benchmark).

// Benches are test code: the workspace denies unwrap/expect/panic in the product only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::OnceCell;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use ipnet::Ipv4Net;
use weft_forwarder::buf::{HEADROOM, PacketBuf, SLOT_LEN};
use weft_forwarder::forwarder::PacketCore;
use weft_forwarder::gro::Coalesced;
use weft_forwarder::gso::{F_NEEDS_CSUM, GSO_TCPV4, Segmentation, VnetHdr};
use weft_forwarder::testing::{A_ENDPOINT, Pair};
use weft_forwarder::wire::checksum::sum;
use weft_forwarder::{Encap, NextHop, PeerCounters, RouteTable, TunVerdict, UnderlayVerdict};

// ---------------------------------------------------------------------------------------
// Counting allocator (as in forwarder/tests/no_alloc.rs).

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(l) }
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

// ---------------------------------------------------------------------------------------
// The forwarding round.

/// Inner IP packet sizes (IP total length, bytes): a minimal packet and a full one that fits
/// both formats' path MTU (`Pair`: 1472 for udp, 1450 for VXLAN).
const SIZES: [usize; 2] = [64, 1400];

/// An IPv4/UDP packet of `total` bytes from a pod on node A (10.244.1.0/24) to one on node B
/// (10.244.2.0/24), as iperf3 -u sends it.
fn inner_udp(total: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(total);
    etherparse::PacketBuilder::ipv4([10, 244, 1, 1], [10, 244, 2, 1], 64)
        .udp(40_000, 5201)
        .write(&mut out, &vec![0x5a; total - 28])
        .unwrap();
    assert_eq!(out.len(), total);
    out
}

/// One round: copies `inner` into the slot (as the TUN read would), A encapsulates it, B
/// decapsulates the datagram. Returns the length of the inner packet B delivers, 0 if either
/// side did not pass it on. Allocates nothing.
#[inline]
fn round<E: Encap>(net: &mut Pair<E>, slot: &mut [u8], inner: &[u8], from_a: SocketAddr) -> usize {
    slot[HEADROOM..HEADROOM + inner.len()].copy_from_slice(inner);
    let Some(mut pkt) = PacketBuf::new(slot, HEADROOM, inner.len()) else {
        return 0;
    };
    let TunVerdict::Send { .. } = net.a.from_tun(&net.routes_a, &mut pkt, net.now) else {
        return 0;
    };
    match net.b.from_underlay(&net.routes_b, from_a, &mut pkt) {
        UnderlayVerdict::Deliver { .. } => pkt.len(),
        UnderlayVerdict::Reply { .. } | UnderlayVerdict::Drop(_) | UnderlayVerdict::Consumed => 0,
    }
}

fn from_a() -> SocketAddr {
    A_ENDPOINT.parse().unwrap()
}

/// A WireGuard pair with a session A → B (B's keypair confirmed by the first round).
fn wireguard_pair() -> Pair<weft_forwarder::wireguard::WireGuardEncap> {
    let (net, mut a, mut b) = Pair::wireguard();
    Pair::wg_handshake(&mut a, &mut b, 1, 2, 1);
    net
}

// ---------------------------------------------------------------------------------------
// The allocation check.

/// Steady-state rounds per (format, size) that must not allocate.
const NO_ALLOC_ROUNDS: usize = 10_000;

/// Runs [`NO_ALLOC_ROUNDS`] rounds after a warm-up; returns (allocations, rounds delivered).
fn count_allocs<E: Encap>(mut net: Pair<E>, inner: &[u8]) -> (u64, usize) {
    let from_a = from_a();
    let mut slot = vec![0u8; SLOT_LEN];
    for _ in 0..100 {
        black_box(round(&mut net, &mut slot, inner, from_a));
    }
    let before = ALLOCS.load(Ordering::Relaxed);
    let mut delivered = 0;
    for _ in 0..NO_ALLOC_ROUNDS {
        delivered += usize::from(black_box(round(&mut net, &mut slot, black_box(inner), from_a)) == inner.len());
    }
    (ALLOCS.load(Ordering::Relaxed) - before, delivered)
}

/// Exits 1 if steady-state forwarding allocates, or fails to deliver.
fn check_no_alloc() {
    let mut failed = false;
    for size in SIZES {
        let inner = inner_udp(size);
        for (name, (allocs, delivered)) in [
            ("udp", count_allocs(Pair::new(), &inner)),
            ("vxlan", count_allocs(Pair::vxlan(), &inner)),
            ("wireguard", count_allocs(wireguard_pair(), &inner)),
        ] {
            println!(
                "no-alloc check: {name}/{size}: {allocs} allocations in {NO_ALLOC_ROUNDS} from_tun+from_underlay \
                 rounds ({delivered} delivered)"
            );
            if allocs != 0 {
                eprintln!("FAIL: the forwarder allocated {allocs} times in {NO_ALLOC_ROUNDS} steady-state rounds");
                failed = true;
            }
            if delivered != NO_ALLOC_ROUNDS {
                eprintln!("FAIL: only {delivered} of {NO_ALLOC_ROUNDS} packets were delivered; the bench is broken");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------
// encap_decap

fn bench_format<E: Encap>(c: &mut Criterion, name: &str, mut net: Pair<E>) {
    let mut g = c.benchmark_group("encap_decap");
    let from_a = from_a();
    let mut slot = vec![0u8; SLOT_LEN];
    for size in SIZES {
        let inner = inner_udp(size);
        assert_eq!(round(&mut net, &mut slot, &inner, from_a), size, "{name}/{size}: B did not deliver");
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new(name, size), &inner, |b, inner| {
            b.iter(|| round(&mut net, &mut slot, black_box(inner), from_a));
        });
    }
    g.finish();
}

fn encap_decap(c: &mut Criterion) {
    bench_format(c, "udp", Pair::new());
    bench_format(c, "vxlan", Pair::vxlan());
    bench_format(c, "wireguard", wireguard_pair());
}

// ---------------------------------------------------------------------------------------
// super_packet

/// A TCP super-packet as a TUN with TSO hands it over: 46 segments of `MSS` bytes.
const MSS: usize = 1398;

/// Buffers for one super-packet round: the read slot, one train, the merged packet.
struct SuperBufs {
    read: Vec<u8>,
    /// The two receive slots the trains land in (a merge points into both).
    trains: [Vec<u8>; 2],
    /// The merge's header slot.
    head: Vec<u8>,
}

/// One round; returns the merged super-packet's length (0 if anything was dropped).
fn super_round<E: Encap + Send>(
    net: &mut Pair<E>,
    bufs: &mut SuperBufs,
    sp: &[u8],
    hdr: &VnetHdr,
    from_a: SocketAddr,
) -> usize {
    bufs.read[HEADROOM..HEADROOM + sp.len()].copy_from_slice(sp);
    let Some(mut pkt) = PacketBuf::new(&mut bufs.read, HEADROOM, sp.len()) else { return 0 };
    let Ok(seg) = Segmentation::parse(hdr, pkt.as_slice()) else { return 0 };
    let TunVerdict::Send { .. } = net.a.from_tun_segmented(&net.routes_a, &mut pkt, &seg, net.now) else {
        return 0;
    };
    let prefix = pkt.len() - sp.len();
    let (stride, per_train) = (prefix + seg.segment_len(), seg.segments_per_train(prefix));
    let mut merge: Option<(Coalesced, (usize, usize, usize))> = None;
    let mut merged = 0;
    let (mut first, mut t) = (0, 0);
    while first < seg.segments() {
        let range = first..(first + per_train).min(seg.segments());
        // The driver writes headers only and the kernel copies the payloads onto the wire;
        // `write_segments` does both, standing in for that copy.
        let Ok(n) = seg.write_segments(pkt.as_slice(), prefix, range.clone(), &mut bufs.trains[t]) else { return 0 };
        for k in 0..range.len() {
            let start = k * stride;
            let len = stride.min(n - start);
            let Some(mut d) = PacketBuf::new(&mut bufs.trains[t][..start + len], start, len) else { return 0 };
            let UnderlayVerdict::Deliver { ip: Some(f), .. } = net.b.from_underlay(&net.routes_b, from_a, &mut d)
            else {
                return 0;
            };
            let (at, dl) = (d.head(), d.len());
            let ip = &bufs.trains[t][at..at + dl];
            let appended = merge.as_mut().is_some_and(|(m, (ft, fs, fl))| {
                let first_pkt = &bufs.trains[*ft][*fs..*fs + *fl];
                m.append(ip, &f, &mut bufs.head, first_pkt)
            });
            if !appended {
                merge = Coalesced::start(ip, &f, &mut bufs.head, true).map(|m| (m, (t, at, dl)));
                merged = 0;
            }
            merged += dl - merge.as_ref().map_or(0, |(m, _)| m.header_len());
        }
        first = range.end;
        t = 1 - t;
    }
    merge.map_or(0, |(m, _)| m.finish(&mut bufs.head) + merged)
}

fn super_packet(c: &mut Criterion) {
    let mut sp = Vec::new();
    etherparse::PacketBuilder::ipv4([10, 244, 1, 1], [10, 244, 2, 1], 64)
        .tcp(40_000, 5201, 1, 64_240)
        .ack(1)
        .write(&mut sp, &vec![0x5a; MSS * 46])
        .unwrap();
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 40,
        gso_size: MSS as u16,
        csum_start: 20,
        csum_offset: 16,
    };
    let mut g = c.benchmark_group("super_packet");
    g.throughput(Throughput::Bytes(sp.len() as u64));
    let from_a = from_a();
    let mut bufs =
        SuperBufs { read: vec![0; SLOT_LEN], trains: [vec![0; SLOT_LEN], vec![0; SLOT_LEN]], head: vec![0; 256] };
    let mut net = Pair::vxlan();
    assert!(super_round(&mut net, &mut bufs, &sp, &hdr, from_a) > sp.len(), "vxlan super-packet did not survive");
    g.bench_function(BenchmarkId::new("vxlan", sp.len()), |b| {
        b.iter(|| super_round(&mut net, &mut bufs, black_box(&sp), &hdr, from_a));
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------
// route_lookup

/// Table sizes. 65 536 is the most a `RouteTable` holds (`PeerId` is a u16: 100 000 peers
/// fail with `RouteError::TooManyPeers`); as /24s it fills all of 10.0.0.0/8.
const TABLE_SIZES: [u32; 3] = [10, 1_000, 65_536];

/// Destinations looked up in turn by the `hit` benchmark (a power of two).
const HIT_DSTS: usize = 1024;

/// `n` peers; peer `i` holds 10.(i/256).(i%256).0/24 behind 198.18.0.0 + i, port 8285.
fn table(n: u32) -> RouteTable {
    let peers = (0..n)
        .map(|i| NextHop {
            name: format!("node-{i}").into(),
            endpoint: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i)), 8285),
            subnet_v4: Some(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (i << 8)), 24).unwrap()),
            subnet_v6: None,
            mac: None,
            mtu: 1472,
            counters: Arc::new(PeerCounters::new(1)),
            crypto: None,
        })
        .collect();
    RouteTable::new(peers, true).unwrap()
}

/// [`HIT_DSTS`] hosts in peers picked pseudo-randomly (xorshift) over the whole table.
fn hit_dsts(n: u32) -> Vec<IpAddr> {
    let mut x: u32 = 0x9e37_79b9;
    (0..HIT_DSTS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let peer = x % n;
            let host = 1 + (x >> 24) % 254;
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (peer << 8) | host))
        })
        .collect()
}

/// A table of `n` peers and the destinations that hit it, checked; prints how long the table
/// took to build (not a criterion figure: `RouteTable::new` checks each peer's subnets against
/// every peer before it, so this grows with n²).
fn fixture(n: u32, miss: IpAddr) -> (RouteTable, Vec<IpAddr>) {
    let started = Instant::now();
    let t = table(n);
    println!("route_lookup: RouteTable::new with {n} peers took {:.3} s", started.elapsed().as_secs_f64());
    let dsts = hit_dsts(n);
    assert!(dsts.iter().all(|d| t.lookup(*d).is_some_and(|(_, hop)| hop.owns(*d))));
    assert!(t.lookup(miss).is_none());
    // Untimed warm-up: criterion's own ends after the first call when that call built the table.
    for _ in 0..1000 {
        for d in &dsts {
            black_box(t.lookup(*d));
        }
    }
    (t, dsts)
}

fn route_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    g.throughput(Throughput::Elements(1));
    // Outside 10.0.0.0/8 (TEST-NET-1), so it misses at every table size.
    let miss = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    for n in TABLE_SIZES {
        // Built on first use, so runs filtered to other benchmarks (`-- encap_decap`, `--list`)
        // don't pay for building tables they never use.
        let cell = OnceCell::new();
        let fixture = || cell.get_or_init(|| fixture(n, miss));
        g.bench_function(BenchmarkId::new("hit", n), |b| {
            let (t, dsts) = fixture();
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (HIT_DSTS - 1);
                t.lookup(black_box(dsts[i])).map(|(id, _)| id)
            });
        });
        g.bench_function(BenchmarkId::new("miss", n), |b| {
            let (t, _) = fixture();
            b.iter(|| t.lookup(black_box(miss)).map(|(id, _)| id));
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------
// checksum

/// Buffer lengths summed: a 64 KiB super-packet and one full-MSS TCP segment's payload.
const CSUM_LENS: [usize; 2] = [65_536, 1460];

fn checksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    for len in CSUM_LENS {
        // Pseudo-random bytes, so no lane's sum is special.
        let data: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("sum", len), &data, |b, data| {
            b.iter(|| sum(black_box(0), black_box(data)));
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------

/// Criterion's defaults, or short runs when `WEFT_BENCH_QUICK` is set; command-line flags
/// (`--warm-up-time`, `--measurement-time`, ...) override either.
fn config() -> Criterion {
    let c = Criterion::default();
    if std::env::var_os("WEFT_BENCH_QUICK").is_some() {
        c.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2))
    } else {
        c
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = encap_decap, super_packet, route_lookup, checksum
}

// criterion_main!, with the allocation check first.
fn main() {
    check_no_alloc();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
