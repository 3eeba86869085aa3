//! Gathering TUN writes: a merged super-packet's headers in one slot, its payloads where
//! they were received.
//!
//! Moving 64 KiB through weft costs four kernel copies (TUN read, UDP send, UDP receive,
//! TUN write) that no interface avoids. Merging received segments used to add a fifth:
//! every payload copied behind the first segment's headers. Now the headers go into a slot
//! of their own, and one `writev` gathers them with the payloads from the receive slots
//! (bench/README.md has the figures). Measured on the send side too, and dropped there:
//! a scatter-gather `sendmsg` of each payload from the read buffer made the kernel's copy
//! cost what weft's own copy had.
//!
//! A [`Scatter`] keeps, per header slot, the iovecs of that write and the slots it holds
//! ([`BufPool::hold`]); when the write completes, [`Scatter::release`] lets them go. A
//! [`Merger`] builds super-packets this way from the checked segments the core delivers,
//! following the rules of [`Coalesced`].

use super::pool::{BufPool, Span};
use crate::gro::{Coalesced, MAX_SEGMENTS};
use crate::stats::{DropReason, WorkerStats};
use crate::wire::ip::IpFacts;

/// Most iovecs in one list: the headers, then a payload per merged packet.
pub const MAX_IOVS: usize = 1 + MAX_SEGMENTS;
/// Most slots one list holds: a merge whose every segment came in its own receive.
const MAX_HELD: usize = MAX_SEGMENTS;

/// The iovecs of one gathering write, and the slots (other than its own) it holds.
struct List {
    iov: [libc::iovec; MAX_IOVS],
    n: usize,
    held: [u16; MAX_HELD],
    nheld: usize,
}

/// One iovec list per pool slot, for the write whose headers that slot holds. Allocated
/// once per worker: about 1 KiB per slot.
pub struct Scatter {
    lists: Box<[List]>,
}

// SAFETY: the iovecs point into the worker's pool, which moves with the worker; only the
// worker thread reads or writes them.
unsafe impl Send for Scatter {}

impl Scatter {
    /// Empty lists for a pool of `slots` slots.
    pub fn new(slots: usize) -> Self {
        let empty = || List {
            iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOVS],
            n: 0,
            held: [0; MAX_HELD],
            nheld: 0,
        };
        Self { lists: (0..slots).map(|_| empty()).collect() }
    }

    /// Appends `len` bytes at `off` of `slot` to the list of header slot `out`, holding
    /// `slot` (unless it is `out` or already held last) until [`release`](Self::release).
    /// `false` when the list is full: nothing was added.
    pub fn push(&mut self, pool: &mut BufPool, out: u16, slot: u16, off: usize, len: usize) -> bool {
        let Some(l) = self.lists.get_mut(usize::from(out)) else { return false };
        let hold = slot != out && (l.nheld == 0 || l.held[l.nheld - 1] != slot);
        if l.n == MAX_IOVS || (hold && l.nheld == MAX_HELD) || off + len > crate::buf::SLOT_LEN {
            return false;
        }
        // SAFETY (pointer arithmetic): off + len ≤ SLOT_LEN, inside the slot.
        l.iov[l.n] = libc::iovec { iov_base: unsafe { pool.slot_ptr(slot).add(off) }.cast(), iov_len: len };
        l.n += 1;
        if hold {
            pool.hold(slot);
            l.held[l.nheld] = slot;
            l.nheld += 1;
        }
        true
    }

    /// The iovecs of `out`'s list and their count, for `WRITEV`. The pointer stays valid
    /// (the lists never move) until the list is released.
    pub fn iovecs(&mut self, out: u16) -> (*mut libc::iovec, usize) {
        match self.lists.get_mut(usize::from(out)) {
            Some(l) => (l.iov.as_mut_ptr(), l.n),
            None => (std::ptr::null_mut(), 0),
        }
    }

    /// Empties `out`'s list and releases the slots it held: its write completed (or never
    /// went out).
    pub fn release(&mut self, pool: &mut BufPool, out: u16) {
        let Some(l) = self.lists.get_mut(usize::from(out)) else { return };
        for &s in &l.held[..l.nheld] {
            pool.release(s);
        }
        l.n = 0;
        l.nheld = 0;
    }
}

/// A merged super-packet ready for one gathering TUN write: header slot `out`, whose
/// [`Scatter`] list holds the virtio-net header and headers, then every payload.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    /// The header slot; the write's iovecs are its list.
    pub out: u16,
    /// Packets merged into it (1: written as it came).
    pub segments: usize,
    /// How many of them carried a kernel VTEP's partial checksum, handed over as partial.
    pub partials: usize,
}

/// The super-packet being merged.
#[derive(Clone, Copy, Debug)]
struct Pending {
    out: u16,
    c: Coalesced,
    /// The first packet as received (its checksum is verified when a second packet joins).
    first: Span,
}

/// Merges the checked packets a worker delivers into super-packets for the TUN, by
/// reference: see the module documentation.
#[derive(Debug, Default)]
pub struct Merger {
    pending: Option<Pending>,
}

impl Merger {
    /// Adds the checked IP packet at `span` to the super-packet being merged; when it
    /// cannot join, that one is finished and returned for writing, and a new one starts
    /// with the packet. UDP datagrams merge only with `uso`. The caller still holds the
    /// span's slot and releases it as usual: a merge takes holds of its own.
    pub fn add(
        &mut self,
        pool: &mut BufPool,
        sc: &mut Scatter,
        stats: &WorkerStats,
        span: Span,
        ip_facts: &IpFacts,
        uso: bool,
    ) -> Option<Ready> {
        let Span { slot, head, len } = span;
        // SAFETY: `slot` is held by the caller, the core bounded the packet within it.
        let ip = unsafe { view(pool, span) };
        if let Some(p) = &mut self.pending {
            // SAFETY: the merge holds the first packet's slot; nothing writes it meanwhile.
            let first = unsafe { view(pool, p.first) };
            // SAFETY: the header slot belongs to the merge, distinct from received slots.
            let out = unsafe { std::slice::from_raw_parts_mut(pool.slot_ptr(p.out), crate::buf::SLOT_LEN) };
            let hdrs = p.c.header_len();
            let mut c = p.c;
            if c.append(ip, ip_facts, out, first) {
                if sc.push(pool, p.out, slot, head + hdrs, len - hdrs) {
                    p.c = c;
                    return None;
                }
                // No room left in the list: the headers already say otherwise, so this one
                // cannot join after all. Cannot happen (one iovec per segment, 64 at most),
                // but never write a header that disagrees with the payloads.
                debug_assert!(false, "merge list full");
            }
        }
        let ready = self.finish(pool, sc);
        let Some(out) = pool.alloc() else {
            stats.count_drop(DropReason::PoolExhausted);
            return ready;
        };
        // SAFETY: `out` was just allocated: ours alone.
        let head_buf = unsafe { std::slice::from_raw_parts_mut(pool.slot_ptr(out), crate::buf::SLOT_LEN) };
        let started = Coalesced::start(ip, ip_facts, head_buf, uso);
        // The header iovec's length is set at finish; the first payload follows it.
        let listed = started.is_some_and(|c| {
            sc.push(pool, out, out, 0, 0) && sc.push(pool, out, slot, head + c.header_len(), len - c.header_len())
        });
        match started {
            Some(c) if listed => self.pending = Some(Pending { out, c, first: span }),
            _ => {
                stats.count_drop(DropReason::Oversize);
                sc.release(pool, out);
                pool.release(out);
            }
        }
        ready
    }

    /// Finishes the super-packet being merged, if any: headers written, the list complete.
    pub fn finish(&mut self, pool: &mut BufPool, sc: &mut Scatter) -> Option<Ready> {
        let p = self.pending.take()?;
        // SAFETY: the header slot belongs to the merge.
        let out = unsafe { std::slice::from_raw_parts_mut(pool.slot_ptr(p.out), crate::buf::SLOT_LEN) };
        let n = p.c.finish(out);
        if let Some(l) = sc.lists.get_mut(usize::from(p.out)) {
            l.iov[0].iov_len = n;
        }
        Some(Ready { out: p.out, segments: p.c.segments(), partials: p.c.partials() })
    }
}

/// The bytes of `span`, read-only, for as long as its slot is held.
///
/// # Safety
/// The caller must hold the span's slot (nothing in flight writes it) for the returned
/// lifetime, and the span must lie within the slot.
unsafe fn view<'a>(pool: &BufPool, span: Span) -> &'a [u8] {
    let n = span.len.min(crate::buf::SLOT_LEN.saturating_sub(span.head));
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts(pool.slot_ptr(span.slot).add(span.head), n) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn seg(seq: u32, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 1], 64)
            .tcp(40000, 5201, seq, 502)
            .ack(7)
            .write(&mut out, &vec![seq as u8; len])
            .unwrap();
        out
    }

    /// Puts `pkts` back to back in a fresh slot at offset 100 (a received train).
    fn receive(pool: &mut BufPool, pkts: &[Vec<u8>]) -> (u16, Vec<(usize, usize)>) {
        let slot = pool.alloc().unwrap();
        // SAFETY: just allocated.
        let buf = unsafe { pool.slot_mut(slot) };
        let mut at = 100;
        let mut where_ = Vec::new();
        for p in pkts {
            buf[at..at + p.len()].copy_from_slice(p);
            where_.push((at, p.len()));
            at += p.len();
        }
        (slot, where_)
    }

    fn facts(ip: &[u8]) -> IpFacts {
        crate::wire::ip::IpPacket::new_checked(ip).unwrap().facts()
    }

    fn gathered(pool: &BufPool, sc: &mut Scatter, out: u16) -> Vec<u8> {
        let (iov, n) = sc.iovecs(out);
        // SAFETY: the list points into live, held slots.
        let iov = unsafe { std::slice::from_raw_parts(iov, n) };
        let _ = pool;
        // SAFETY: as above.
        iov.iter()
            .flat_map(|v| unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) }.to_vec())
            .collect()
    }

    #[test]
    fn merges_across_receives_by_reference_and_frees_every_slot() {
        let mut pool = BufPool::new(8).unwrap();
        let mut sc = Scatter::new(8);
        let stats = WorkerStats::default();
        let mut m = Merger::default();
        let a = [seg(1000, 1000), seg(2000, 1000)];
        let b = [seg(3000, 1000), seg(9999, 1000)];
        let (sa, wa) = receive(&mut pool, &a);
        let (sb, wb) = receive(&mut pool, &b);
        assert!(m.add(&mut pool, &mut sc, &stats, Span::new(sa, wa[0].0, wa[0].1), &facts(&a[0]), true).is_none());
        assert!(m.add(&mut pool, &mut sc, &stats, Span::new(sa, wa[1].0, wa[1].1), &facts(&a[1]), true).is_none());
        pool.release(sa); // the receive is done with its slot; the merge still holds it
        assert!(m.add(&mut pool, &mut sc, &stats, Span::new(sb, wb[0].0, wb[0].1), &facts(&b[0]), true).is_none());
        // A gap in the sequence: the first three go out as one write, the fourth starts anew.
        let first = m.add(&mut pool, &mut sc, &stats, Span::new(sb, wb[1].0, wb[1].1), &facts(&b[1]), true).unwrap();
        pool.release(sb);
        assert_eq!(first.segments, 3);
        let bytes = gathered(&pool, &mut sc, first.out);
        assert_eq!(bytes.len(), 10 + 40 + 3000);
        assert_eq!(&bytes[10 + 40..10 + 40 + 1000], &[1000u32 as u8; 1000][..]);
        assert_eq!(&bytes[10 + 40 + 2000..], &[3000u32 as u8; 1000][..]);
        let second = m.finish(&mut pool, &mut sc).unwrap();
        assert_eq!(second.segments, 1);
        assert_eq!(&gathered(&pool, &mut sc, second.out)[10..], &b[1][..], "a lone packet is written as it came");
        for r in [first, second] {
            sc.release(&mut pool, r.out);
            pool.release(r.out);
        }
        assert_eq!(pool.available(), 8, "every slot is free again");
        assert!(m.finish(&mut pool, &mut sc).is_none());
    }
}
