//! Counters: why packets were dropped, which ICMP errors were written, and per-peer
//! traffic. Drops are data, in the kernel's style: every drop has a named reason and a
//! counter, and nothing is logged per packet.
//!
//! Each worker owns its [`WorkerStats`] (cache-padded, `Relaxed` increments) and its slot in
//! every peer's [`PeerCounters`], so no two cores write the same cache line; readers sum.

#![deny(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crossbeam_utils::CachePadded;

/// Why a packet was dropped. Names are the metric and `weft status` labels.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[repr(u8)]
pub enum DropReason {
    /// The datagram or packet is shorter than its headers, or was truncated on receive.
    Truncated,
    /// The inner packet is not a well-formed IPv4 or IPv6 packet.
    BadIpHeader,
    /// Underlay: the outer source is not a known peer's endpoint.
    UnknownSender,
    /// Underlay: the inner source is outside the sending peer's subnet.
    ForeignSource,
    /// A source or destination no overlay packet may carry: loopback, multicast,
    /// broadcast, unspecified, link-local (the kernel's own link chatter on the TUN).
    Martian,
    /// Underlay: the inner destination is outside this node's subnet (never re-encapsulated).
    NotLocalDestination,
    /// TTL or hop limit ran out (flannel decrements on both sides).
    TtlExpired,
    /// TUN: no peer holds the destination.
    NoRoute,
    /// TUN: the inner source is outside this node's subnet (a local pod spoofing).
    TxForeignSource,
    /// Larger than the path to the peer allows and not answerable with frag-needed.
    Oversize,
    /// No free buffer.
    PoolExhausted,
    /// VXLAN: the I flag is clear.
    BadVxlanFlags,
    /// VXLAN: a reserved bit is set (Linux drops these too).
    ReservedBitsSet,
    /// VXLAN: another VNI than ours.
    WrongVni,
    /// VXLAN: the inner destination MAC is not our VTEP's.
    WrongInnerMac,
    /// VXLAN: the inner source MAC is not the sending peer's VTEP MAC (or is ours: a loop).
    WrongSourceMac,
    /// VXLAN: an inner EtherType weft does not carry (VLAN tags included).
    BadEthertype,
    /// TAP: a frame to replicate to every peer over the flood rate limit.
    FloodLimited,
    /// The kernel refused a send or a TUN write.
    IoError,
    /// TUN: the virtio-net header contradicts the packet (offsets, lengths, GSO type).
    BadOffload,
    /// TUN: a super-packet's TCP header is malformed (data offset below 5, or past the
    /// packet), so it cannot be cut into segments.
    BadL4Header,
    /// The inner IPv4 header checksum is wrong. From the underlay, the kernel would drop the
    /// packet on the TUN write anyway, where weft's counters cannot see it; from the TUN, the
    /// peer would drop it. Checked, the drop has a name and costs a 20–60-byte sum.
    BadInnerChecksum,
    /// A datagram or packet with nothing in it (a zero-length UDP payload or TUN read):
    /// nothing to decapsulate or route.
    EmptyPayload,
    /// WireGuard, to a peer: no session with it yet (or it expired); a handshake is due.
    /// Never sent in the clear.
    NoSession,
    /// WireGuard, from a peer: the datagram failed authentication (unknown receiver index,
    /// a wrong key, a forgery, a tampered byte). Dropped, never answered.
    AuthFailed,
    /// WireGuard, from a peer: an authentic datagram whose counter was seen before, or is too
    /// old for the replay window.
    Replayed,
    /// WireGuard: a message type weft does not take (or reserved bytes set), or a handshake
    /// message while the handshake queue is full.
    BadMessage,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 27] = [
        Self::Truncated,
        Self::BadIpHeader,
        Self::UnknownSender,
        Self::ForeignSource,
        Self::Martian,
        Self::NotLocalDestination,
        Self::TtlExpired,
        Self::NoRoute,
        Self::TxForeignSource,
        Self::Oversize,
        Self::PoolExhausted,
        Self::BadVxlanFlags,
        Self::ReservedBitsSet,
        Self::WrongVni,
        Self::WrongInnerMac,
        Self::WrongSourceMac,
        Self::BadEthertype,
        Self::FloodLimited,
        Self::IoError,
        Self::BadOffload,
        Self::BadL4Header,
        Self::BadInnerChecksum,
        Self::EmptyPayload,
        Self::NoSession,
        Self::AuthFailed,
        Self::Replayed,
        Self::BadMessage,
    ];

    /// The label in metrics and `weft status`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::BadIpHeader => "bad_ip_header",
            Self::UnknownSender => "unknown_sender",
            Self::ForeignSource => "foreign_source",
            Self::Martian => "martian",
            Self::NotLocalDestination => "not_local_destination",
            Self::TtlExpired => "ttl_expired",
            Self::NoRoute => "no_route",
            Self::TxForeignSource => "tx_foreign_source",
            Self::Oversize => "oversize",
            Self::PoolExhausted => "pool_exhausted",
            Self::IoError => "io_error",
            Self::BadVxlanFlags => "bad_vxlan_flags",
            Self::ReservedBitsSet => "reserved_bits_set",
            Self::WrongVni => "wrong_vni",
            Self::WrongInnerMac => "wrong_inner_mac",
            Self::WrongSourceMac => "wrong_source_mac",
            Self::BadEthertype => "bad_ethertype",
            Self::FloodLimited => "flood_limited",
            Self::BadOffload => "bad_offload_header",
            Self::BadL4Header => "bad_l4_header",
            Self::BadInnerChecksum => "bad_inner_checksum",
            Self::EmptyPayload => "empty_payload",
            Self::NoSession => "no_session",
            Self::AuthFailed => "auth_failed",
            Self::Replayed => "replayed",
            Self::BadMessage => "bad_message",
        }
    }
}

/// ICMP errors weft wrote into its TUN, those the rate limit suppressed, and neighbour
/// requests (ARP, NDP) it answered toward a peer.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[repr(u8)]
pub enum IcmpCounter {
    /// Destination unreachable (net or host), v4 or v6.
    Unreachable,
    /// ICMPv4 fragmentation needed.
    FragNeeded,
    /// ICMPv6 packet too big.
    PacketTooBig,
    /// An error that was due but suppressed by the rate limit.
    RateLimited,
    /// An ARP request or neighbour solicitation answered over VXLAN.
    NeighbourReply,
}

impl IcmpCounter {
    /// Every counter, in order.
    pub const ALL: [IcmpCounter; 5] =
        [Self::Unreachable, Self::FragNeeded, Self::PacketTooBig, Self::RateLimited, Self::NeighbourReply];

    /// The label in metrics and `weft status`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unreachable => "net_unreachable",
            Self::FragNeeded => "frag_needed",
            Self::PacketTooBig => "packet_too_big",
            Self::RateLimited => "rate_limited",
            Self::NeighbourReply => "neighbour_reply",
        }
    }
}

/// What the offloads did: evidence in `weft status` that 64 KiB moves per request.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[repr(u8)]
pub enum OffloadCounter {
    /// TCP/UDP super-packets read from the TUN.
    SuperPacketsRead,
    /// UDP GSO sends (trains of two or more segments).
    GsoSends,
    /// Segments those sends carried.
    GsoSegments,
    /// Receives that returned a GRO train.
    GroTrains,
    /// Merged super-packets written to the TUN.
    MergedWrites,
    /// Segments those writes carried.
    MergedSegments,
    /// Times the kernel refused an offload and the worker switched it off.
    Fallbacks,
    /// Received packets whose TCP/UDP checksum a kernel VTEP left partial (the
    /// pseudo-header sum only), completed by weft or handed to the TUN as partial
    /// ([`crate::partial`]).
    CsumCompleted,
}

impl OffloadCounter {
    /// Every counter, in order.
    pub const ALL: [OffloadCounter; 8] = [
        Self::SuperPacketsRead,
        Self::GsoSends,
        Self::GsoSegments,
        Self::GroTrains,
        Self::MergedWrites,
        Self::MergedSegments,
        Self::Fallbacks,
        Self::CsumCompleted,
    ];

    /// The label in `weft status`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SuperPacketsRead => "super_packets_read",
            Self::GsoSends => "gso_sends",
            Self::GsoSegments => "gso_segments",
            Self::GroTrains => "gro_trains",
            Self::MergedWrites => "merged_writes",
            Self::MergedSegments => "merged_segments",
            Self::Fallbacks => "fallbacks",
            Self::CsumCompleted => "csum_completed",
        }
    }
}

/// Upper bounds of the batch-size histogram's buckets (packets per batch): powers of two up
/// to 256; a last bucket takes everything larger (`+Inf`).
pub const BATCH_BUCKETS: [u64; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// How many packets a worker handled per I/O batch: fixed power-of-two buckets, one `Relaxed`
/// increment per batch (plus one for the sum), no allocation. Each worker owns its own, like
/// every other counter here; readers sum [`BatchSizes`].
#[derive(Debug, Default)]
pub struct BatchHistogram {
    /// `counts[i]`: batches of `BATCH_BUCKETS[i - 1] + 1 ..= BATCH_BUCKETS[i]` packets (the
    /// first: exactly one); the last: more than 256.
    counts: [AtomicU64; BATCH_BUCKETS.len() + 1],
    /// Packets in all batches.
    sum: AtomicU64,
}

impl BatchHistogram {
    /// Records one batch of `packets` packets; an empty batch (a wake-up with nothing to do)
    /// is not a batch.
    #[inline]
    pub fn record(&self, packets: usize) {
        if packets == 0 {
            return;
        }
        // ceil(log2(packets)): 1 -> 0, 2 -> 1, 3..=4 -> 2, ..., 129..=256 -> 8, more -> 9.
        let i = ((usize::BITS - (packets - 1).leading_zeros()) as usize).min(BATCH_BUCKETS.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Relaxed);
        }
        self.sum.fetch_add(packets as u64, Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> BatchSizes {
        let mut counts = [0; BATCH_BUCKETS.len() + 1];
        for (c, a) in counts.iter_mut().zip(&self.counts) {
            *c = a.load(Relaxed);
        }
        BatchSizes { counts, sum: self.sum.load(Relaxed) }
    }
}

/// A read of one or more [`BatchHistogram`]s.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct BatchSizes {
    /// Batches per bucket (not cumulative), in [`BATCH_BUCKETS`] order, then `+Inf`.
    pub counts: [u64; BATCH_BUCKETS.len() + 1],
    /// Packets in all batches.
    pub sum: u64,
}

impl BatchSizes {
    /// Batches recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds another worker's read to this one.
    pub fn add(&mut self, other: &BatchSizes) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }

    /// Cumulative counts per upper bound, as Prometheus buckets are (`None`: `+Inf`).
    pub fn cumulative(&self) -> [(Option<u64>, u64); BATCH_BUCKETS.len() + 1] {
        let mut out = [(None, 0); BATCH_BUCKETS.len() + 1];
        let mut running = 0;
        for (i, (o, c)) in out.iter_mut().zip(self.counts).enumerate() {
            running += c;
            *o = (BATCH_BUCKETS.get(i).copied(), running);
        }
        out
    }
}

/// One worker's counters.
#[derive(Debug, Default)]
pub struct WorkerStats {
    drops: CachePadded<[AtomicU64; DropReason::ALL.len()]>,
    icmp: [AtomicU64; IcmpCounter::ALL.len()],
    offload: [AtomicU64; OffloadCounter::ALL.len()],
    batches: BatchHistogram,
}

impl WorkerStats {
    /// Counts one drop.
    #[inline]
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Relaxed);
    }

    /// Counts `n` drops at once (a failed batch).
    #[inline]
    pub fn count_drops(&self, reason: DropReason, n: u64) {
        self.drops[reason as usize].fetch_add(n, Relaxed);
    }

    /// Counts one ICMP event.
    #[inline]
    pub fn count_icmp(&self, c: IcmpCounter) {
        self.icmp[c as usize].fetch_add(1, Relaxed);
    }

    /// Adds `n` to an offload counter.
    #[inline]
    pub fn count_offload(&self, c: OffloadCounter, n: u64) {
        self.offload[c as usize].fetch_add(n, Relaxed);
    }

    /// Counts one GSO send carrying `segments` datagrams.
    #[inline]
    pub fn count_train(&self, segments: usize) {
        self.count_offload(OffloadCounter::GsoSends, 1);
        self.count_offload(OffloadCounter::GsoSegments, segments as u64);
    }

    /// Counts one TUN write of a super-packet merged from `segments` packets.
    #[inline]
    pub fn count_merged(&self, segments: usize) {
        self.count_offload(OffloadCounter::MergedWrites, 1);
        self.count_offload(OffloadCounter::MergedSegments, segments as u64);
    }

    /// Records one I/O batch of `packets` packets (once per batch, in the drivers).
    #[inline]
    pub fn record_batch(&self, packets: usize) {
        self.batches.record(packets);
    }

    /// The batch-size histogram so far.
    pub fn batch_sizes(&self) -> BatchSizes {
        self.batches.snapshot()
    }

    /// Current value of an offload counter.
    pub fn offload_count(&self, c: OffloadCounter) -> u64 {
        self.offload[c as usize].load(Relaxed)
    }

    /// Current value of a drop counter.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Relaxed)
    }

    /// Current value of an ICMP counter.
    pub fn icmp_count(&self, c: IcmpCounter) -> u64 {
        self.icmp[c as usize].load(Relaxed)
    }
}

/// Packet and byte counts of one peer, one direction pair.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct PeerTotals {
    /// Packets received from the peer and delivered.
    pub rx_packets: u64,
    /// Inner bytes received from the peer and delivered.
    pub rx_bytes: u64,
    /// Packets sent to the peer.
    pub tx_packets: u64,
    /// Inner bytes sent to the peer.
    pub tx_bytes: u64,
}

#[derive(Debug, Default)]
struct PeerSlot {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
}

/// A peer's counters with one cache-padded slot per worker. They outlive route-table
/// swaps: the control plane hands the same `Arc<PeerCounters>` to the rebuilt table.
#[derive(Debug)]
pub struct PeerCounters {
    slots: Box<[CachePadded<PeerSlot>]>,
}

impl PeerCounters {
    /// Counters for `workers` workers (at least one slot).
    pub fn new(workers: usize) -> Self {
        Self { slots: (0..workers.max(1)).map(|_| CachePadded::new(PeerSlot::default())).collect() }
    }

    #[inline]
    fn slot(&self, worker: usize) -> Option<&PeerSlot> {
        self.slots.get(worker % self.slots.len().max(1)).map(|s| &**s)
    }

    /// Counts a packet delivered from this peer.
    #[inline]
    pub fn rx(&self, worker: usize, bytes: usize) {
        if let Some(s) = self.slot(worker) {
            s.rx_packets.fetch_add(1, Relaxed);
            s.rx_bytes.fetch_add(bytes as u64, Relaxed);
        }
    }

    /// Counts a packet sent to this peer.
    #[inline]
    pub fn tx(&self, worker: usize, bytes: usize) {
        self.tx_many(worker, 1, bytes);
    }

    /// Counts `packets` packets of `bytes` bytes in all sent to this peer (a super-packet
    /// cut into segments).
    #[inline]
    pub fn tx_many(&self, worker: usize, packets: usize, bytes: usize) {
        if let Some(s) = self.slot(worker) {
            s.tx_packets.fetch_add(packets as u64, Relaxed);
            s.tx_bytes.fetch_add(bytes as u64, Relaxed);
        }
    }

    /// The sum over all workers.
    pub fn totals(&self) -> PeerTotals {
        self.slots.iter().fold(PeerTotals::default(), |t, s| PeerTotals {
            rx_packets: t.rx_packets + s.rx_packets.load(Relaxed),
            rx_bytes: t.rx_bytes + s.rx_bytes.load(Relaxed),
            tx_packets: t.tx_packets + s.tx_packets.load(Relaxed),
            tx_bytes: t.tx_bytes + s.tx_bytes.load(Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_in_order_with_unique_names() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::ALL.len());
        for (i, c) in IcmpCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn batch_sizes_land_in_power_of_two_buckets() {
        let h = BatchHistogram::default();
        for n in [0, 1, 2, 3, 4, 5, 64, 65, 256, 257, 10_000] {
            h.record(n);
        }
        let s = h.snapshot();
        // le:      1  2  4  8 16 32 64 128 256 +Inf
        assert_eq!(s.counts, [1, 1, 2, 1, 0, 0, 1, 1, 1, 2]);
        assert_eq!(s.count(), 10, "an empty batch is not recorded");
        assert_eq!(s.sum, 1 + 2 + 3 + 4 + 5 + 64 + 65 + 256 + 257 + 10_000);
        let cum = s.cumulative();
        assert_eq!(cum[0], (Some(1), 1));
        assert_eq!(cum[3], (Some(8), 5));
        assert_eq!(cum[9], (None, 10));
        let mut total = BatchSizes::default();
        total.add(&s);
        total.add(&s);
        assert_eq!((total.count(), total.sum), (20, 2 * s.sum));
        let w = WorkerStats::default();
        w.record_batch(3);
        assert_eq!(w.batch_sizes().counts[2], 1);
    }

    #[test]
    fn peer_counters_sum_over_workers() {
        let c = PeerCounters::new(2);
        c.tx(0, 100);
        c.tx(1, 50);
        c.rx(7, 10); // out-of-range worker wraps instead of panicking
        assert_eq!(c.totals(), PeerTotals { rx_packets: 1, rx_bytes: 10, tx_packets: 2, tx_bytes: 150 });
    }
}
