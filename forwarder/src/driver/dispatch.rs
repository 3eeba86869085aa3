//! What a worker does with a packet once its read or receive completed, shared by both
//! backends: the offload decisions, the cut of super-packets into trains, the gathering of
//! small packets into one GSO send, the merge of received segments into one TUN write,
//! flooding, replies, and the fallbacks when the kernel refuses an offload at run time.
//!
//! The backends (`uring.rs`, `mmsg.rs`) only arm reads, reap completions and submit
//! requests. They hand every completed read to a [`Dispatch`], which calls the sans-IO core
//! and then asks for I/O through the small [`Io`] trait; when a request ends, the backend
//! hands its [`Done`] back to [`Dispatch::complete`]. So an offload fix is made once, and
//! the whole of it is unit-tested without root over the `MemIo` double (`memio.rs`), which
//! records requests and replays their completions with any result the test picks.
//!
//! Buffer ownership follows the pool's rule (`pool.rs`): a slot handed to an [`Io`] request
//! belongs to that request until its [`Done`] comes back; every other slot the dispatch is
//! given, it releases itself.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use super::Offloads;
use super::pool::BufPool;
pub(crate) use super::pool::Span;
use super::scatter::{Merger, Ready, Scatter};
use crate::buf::{HEADROOM, PacketBuf, SLOT_LEN};
use crate::forwarder::{PacketCore, TunVerdict, UnderlayVerdict};
use crate::gso::{self, MAX_TRAIN_BYTES, MAX_TRAIN_SEGMENTS, Segmentation, VNET_HDR_LEN, VnetHdr};
use crate::route::RouteTable;
use crate::stats::{DropReason, OffloadCounter};
use crate::wire::ip::IpFacts;

/// Where a TUN read lands when every packet carries a virtio-net header: the header just in
/// front of the packet's usual place, so the packet itself starts at `HEADROOM`.
pub(super) const VNET_AT: usize = HEADROOM - VNET_HDR_LEN;

/// What one UDP receive brought: `len` bytes from `from` at `HEADROOM` of `slot`, one
/// datagram, or a GRO train of `train`-byte datagrams (the last may be shorter).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Received {
    /// The slot the datagram (or train) landed in.
    pub slot: u16,
    /// The outer source address.
    pub from: SocketAddr,
    /// Bytes received.
    pub len: usize,
    /// The GRO segment size, when the kernel coalesced a train.
    pub train: Option<usize>,
}

/// The socket a datagram leaves from: 0 is the overlay port's, `k` ≥ 1 the `k`-th of the
/// flow-hashed send sockets, so the outer source port follows the inner flow as Linux
/// vxlan's does.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct Sender(pub u32);

impl Sender {
    /// The socket bound to the overlay port: replies and floods leave from it, as does
    /// everything when there are no flow sockets.
    pub const PORT: Self = Self(0);
}

/// The kind of an output request, as its completion reports it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Out {
    /// One datagram.
    Send,
    /// A GSO train of datagrams (`UDP_SEGMENT`).
    SendTrain,
    /// One packet written to the TUN.
    TunWrite,
    /// A merged super-packet written to the TUN (a gathering write).
    TunWriteMerged,
}

/// An output request ended: `res` is the byte count or a negative errno, as io_uring
/// reports it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct Done {
    /// What the request was.
    pub out: Out,
    /// The slot the request held (for a gathering write, its header slot).
    pub slot: u16,
    /// Bytes moved, or `-errno`.
    pub res: i32,
}

/// How a span leaves: to `to`, from socket `from`, as one datagram or, with `segment`, as a
/// GSO train of datagrams of that size (the last may be shorter).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct Datagram {
    /// The peer's endpoint.
    pub to: SocketAddr,
    /// The socket it leaves from.
    pub from: Sender,
    /// The GSO segment size of a train.
    pub segment: Option<u16>,
}

impl Datagram {
    /// One datagram to `to` from the overlay port: replies and flooded copies.
    pub const fn port(to: SocketAddr) -> Self {
        Self { to, from: Sender::PORT, segment: None }
    }
}

/// The I/O a [`Dispatch`] asks of its backend. Requests may complete at once (recvmmsg's
/// backend, which hands back [`Done`]s through [`take_done`](Self::take_done)) or later
/// (io_uring's, whose loop feeds completions to [`Dispatch::complete`]).
pub(crate) trait Io {
    /// How many flow-hashed send sockets there are besides the overlay port's.
    fn flow_sockets(&self) -> u32;
    /// Queues `span` as the datagram (or GSO train) `d` says. The request holds the slot.
    ///
    /// # Errors
    /// The backend cannot queue at all (the ring is gone): the worker stops.
    fn send(&mut self, pool: &BufPool, span: Span, d: Datagram) -> io::Result<()>;
    /// Queues a TUN write of `span` (its virtio-net header, if the TUN wants one, included).
    ///
    /// # Errors
    /// As for [`send`](Self::send).
    fn write_tun(&mut self, pool: &BufPool, span: Span) -> io::Result<()>;
    /// Queues one gathering TUN write of the `n` iovecs at `iov`, the list of header slot
    /// `out` (valid until the request's [`Done`] is completed); `merged`: it carries more
    /// than one packet.
    ///
    /// # Errors
    /// As for [`send`](Self::send).
    fn write_tun_gather(&mut self, out: u16, iov: *mut libc::iovec, n: usize, merged: bool) -> io::Result<()>;
    /// Clears the TUN's offload mask, so the kernel stops handing over super-packets.
    ///
    /// # Errors
    /// The `TUNSETOFFLOAD` ioctl failed.
    fn clear_tun_offloads(&mut self) -> io::Result<()>;
    /// Pushes out whatever is queued but not yet handed to the kernel (end of a batch).
    ///
    /// # Errors
    /// As for [`send`](Self::send).
    fn submit(&mut self) -> io::Result<()>;
    /// A request that completed synchronously, for the dispatch to finish.
    fn take_done(&mut self) -> Option<Done>;
}

/// Packets read from the TUN one by one (small ones, no super-packet) for the same peer and
/// socket, laid back to back in the first packet's slot behind it, so one GSO send carries
/// them all: a flood of small datagrams costs one send per batch, not per packet.
#[derive(Clone, Copy, Debug)]
struct Train {
    span: Span,
    /// The size of every packet but possibly the last (the GSO segment size).
    seg: usize,
    count: usize,
    to: SocketAddr,
    from: Sender,
    /// A shorter packet ends the train.
    open: bool,
}

/// The post-verdict half of one worker: its pool, its core, and the offload state both
/// backends share. See the module documentation.
pub(crate) struct Dispatch<C: PacketCore> {
    /// The worker's buffers; the backend draws read slots from here too.
    pub pool: BufPool,
    /// The sans-IO core.
    pub fwd: C,
    /// The offloads in use; switched off here when the kernel refuses one.
    pub offloads: Offloads,
    /// The super-packet being merged for the TUN.
    merger: Merger,
    /// Iovec lists of gathering writes, per header slot.
    sc: Scatter,
    /// Small packets gathered for one GSO send.
    train: Option<Train>,
}

impl<C: PacketCore> Dispatch<C> {
    /// A dispatch over `pool` for core `fwd`.
    pub fn new(pool: BufPool, fwd: C, offloads: Offloads) -> Self {
        let sc = Scatter::new(pool.len());
        Self { pool, fwd, offloads, merger: Merger::default(), sc, train: None }
    }

    /// Where in a slot a TUN read must land.
    pub fn tun_read_at(&self) -> usize {
        if self.offloads.tun_vnet { VNET_AT } else { HEADROOM }
    }

    /// A TUN read of `n` bytes into `slot` (at [`tun_read_at`](Self::tun_read_at))
    /// completed: a packet, or with a virtio-net header in front a packet with a partial
    /// checksum or a super-packet. Takes `slot`.
    ///
    /// # Errors
    /// The backend failed to queue a request.
    pub fn on_tun_read(
        &mut self,
        io: &mut impl Io,
        slot: u16,
        n: usize,
        routes: &RouteTable,
        now: Instant,
    ) -> io::Result<()> {
        let vnet = self.offloads.tun_vnet;
        // SAFETY: the read completed, so the slot is ours.
        let buf = unsafe { self.pool.slot_mut(slot) };
        let hdr = if vnet { buf.get(VNET_AT..).and_then(VnetHdr::parse) } else { None };
        let len = if vnet { n.checked_sub(VNET_HDR_LEN) } else { Some(n) };
        let (true, Some(mut pkt)) = (vnet == hdr.is_some(), len.and_then(|len| PacketBuf::new(buf, HEADROOM, len)))
        else {
            self.fwd.stats().count_drop(DropReason::BadOffload);
            self.pool.release(slot);
            return Ok(());
        };
        let seg = match hdr.map(|h| gso::check_read(&h, pkt.as_mut_slice())) {
            Some(Ok(seg)) => seg,
            Some(Err(e)) => {
                self.fwd.stats().count_drop(e.reason());
                self.pool.release(slot);
                return Ok(());
            }
            None => None,
        };
        let Some(seg) = seg else {
            let verdict = self.fwd.from_tun(routes, &mut pkt, now);
            let span = Span::new(slot, pkt.head(), pkt.len());
            return self.on_tun_verdict(io, span, verdict, routes);
        };
        self.fwd.stats().count_offload(OffloadCounter::SuperPacketsRead, 1);
        let before = pkt.len();
        let verdict = self.fwd.from_tun_segmented(routes, &mut pkt, &seg, now);
        let span = Span::new(slot, pkt.head(), pkt.len());
        match verdict {
            TunVerdict::Send { to, flow, .. } => {
                // Whatever was gathered before goes first, in order.
                self.send_train(io)?;
                self.send_segmented(io, span, span.len - before, &seg, to, flow)
            }
            other => self.on_tun_verdict(io, span, other, routes),
        }
    }

    /// Cuts the encapsulated super-packet at `span` (`prefix` bytes of encapsulation header,
    /// then the IP packet) into trains in fresh slots, each sealed by the core and sent as
    /// one GSO send (one datagram each without GSO); releases `span`'s slot.
    fn send_segmented(
        &mut self,
        io: &mut impl Io,
        span: Span,
        prefix: usize,
        seg: &Segmentation,
        to: SocketAddr,
        flow: u32,
    ) -> io::Result<()> {
        let from = self.sender(io, flow);
        let room = self.fwd.segment_trailer();
        let per_train = if self.offloads.gso { seg.segments_per_train(prefix + room) } else { 1 };
        let stride = prefix + seg.segment_len() + room;
        let total = seg.segments();
        let mut first = 0;
        while first < total {
            let range = first..(first + per_train).min(total);
            first = range.end;
            let Some(out) = self.pool.alloc() else {
                self.fwd.stats().count_drop(DropReason::PoolExhausted);
                break;
            };
            // SAFETY: `span`'s read completed and `out` was just allocated: both are ours.
            let cut = unsafe { self.pool.pair_mut(span.slot, out) }.and_then(|(src, dst)| {
                let bytes = seg.write_segments_with_room(src.get(span.range())?, prefix, room, range.clone(), dst);
                Some(bytes.map(|b| (b, dst)))
            });
            let Some(Ok((bytes, dst))) = cut else {
                self.fwd.stats().count_drop(DropReason::BadOffload);
                self.pool.release(out);
                break;
            };
            if !dst.get_mut(..bytes).is_some_and(|train| self.fwd.seal_train(train, stride)) {
                self.pool.release(out);
                break;
            }
            let segment = (range.len() > 1).then_some(stride as u16);
            self.send(io, Span::new(out, 0, bytes), Datagram { to, from, segment })?;
        }
        self.pool.release(span.slot);
        Ok(())
    }

    /// Performs what the core decided for the packet at `span`; takes its slot.
    fn on_tun_verdict(
        &mut self,
        io: &mut impl Io,
        span: Span,
        verdict: TunVerdict,
        routes: &RouteTable,
    ) -> io::Result<()> {
        match verdict {
            TunVerdict::Send { to, flow, .. } => {
                let from = self.sender(io, flow);
                if self.offloads.gso {
                    return self.gather(io, span, to, from);
                }
                self.send(io, span, Datagram { to, from, segment: None })
            }
            TunVerdict::Reply => self.write_tun(io, span),
            TunVerdict::Flood => {
                let mut peers = routes.peers().iter();
                let Some(first) = peers.next() else {
                    self.pool.release(span.slot);
                    return Ok(());
                };
                // Copies for all peers but the first, which gets the original.
                for p in peers {
                    let Some(copy) = self.pool.clone_slot(span.slot, span.head, span.len) else {
                        self.fwd.stats().count_drop(DropReason::PoolExhausted);
                        break;
                    };
                    self.send(io, Span { slot: copy, ..span }, Datagram::port(p.endpoint))?;
                }
                self.send(io, span, Datagram::port(first.endpoint))
            }
            TunVerdict::Drop(_) => {
                self.pool.release(span.slot);
                Ok(())
            }
        }
    }

    /// `rx` was received: one datagram, or a GRO train. Checks each datagram within its own
    /// bytes, then delivers, answers or drops it; takes the slot.
    ///
    /// # Errors
    /// The backend failed to queue a request.
    pub fn on_datagrams(
        &mut self,
        io: &mut impl Io,
        rx: Received,
        routes: &RouteTable,
        now: Instant,
    ) -> io::Result<()> {
        let Received { slot, from, len: n, train } = rx;
        if !self.offloads.tun_vnet {
            // One datagram, decapsulated and written (or answered) in place.
            // SAFETY: the receive completed, so the slot is ours.
            let buf = unsafe { self.pool.slot_mut(slot) };
            let Some(mut pkt) = PacketBuf::new(buf, HEADROOM, n) else {
                self.fwd.stats().count_drop(DropReason::Truncated);
                self.pool.release(slot);
                return Ok(());
            };
            let verdict = self.fwd.from_underlay(routes, from, &mut pkt, now);
            if let UnderlayVerdict::Deliver { ip, .. } = verdict {
                // No virtio-net header to say "partial": complete it here.
                self.fwd.complete_partial(pkt.as_mut_slice(), ip.as_ref());
            }
            let span = Span::new(slot, pkt.head(), pkt.len());
            return match verdict {
                UnderlayVerdict::Deliver { .. } => self.write_tun(io, span),
                UnderlayVerdict::Reply { to } => self.send(io, span, Datagram::port(to)),
                UnderlayVerdict::Drop(_) | UnderlayVerdict::Consumed => {
                    self.pool.release(slot);
                    Ok(())
                }
            };
        }
        if train.is_some() {
            self.fwd.stats().count_offload(OffloadCounter::GroTrains, 1);
        }
        for d in datagrams(n, train) {
            let Some((verdict, span)) = self.check_datagram(routes, from, slot, d, now) else { break };
            match verdict {
                UnderlayVerdict::Deliver { ip: Some(ip), .. } => self.merge(io, span, &ip)?,
                // Only a TAP's core delivers frames, and a TAP never runs with a virtio-net
                // header (`tun::open`), so this does not happen: were it to, a frame is not
                // merged as if it were IP, it is dropped and counted.
                UnderlayVerdict::Deliver { ip: None, .. } => self.fwd.stats().count_drop(DropReason::BadOffload),
                UnderlayVerdict::Reply { to } => {
                    let Some(copy) = self.pool.clone_slot(slot, span.head, span.len) else {
                        self.fwd.stats().count_drop(DropReason::PoolExhausted);
                        continue;
                    };
                    self.send(io, Span { slot: copy, ..span }, Datagram::port(to))?;
                }
                UnderlayVerdict::Drop(_) | UnderlayVerdict::Consumed => {}
            }
        }
        self.pool.release(slot);
        Ok(())
    }

    /// Runs datagram `d` (`(start, len, end)` from [`datagrams`]) of the receive in `slot`
    /// through the core, confined to its own bytes: nothing a peer sends can reach into the
    /// next datagram, nor a reply written in place into the one before, which a pending
    /// merge may still point at. Returns the verdict and where the packet now lies; `None`,
    /// counted as truncated, when the datagram does not fit the slot.
    fn check_datagram(
        &mut self,
        routes: &RouteTable,
        from: SocketAddr,
        slot: u16,
        (start, len, end): (usize, usize, usize),
        now: Instant,
    ) -> Option<(UnderlayVerdict, Span)> {
        // SAFETY: the caller was handed the slot by a completed receive.
        let buf = unsafe { self.pool.slot_mut(slot) };
        let Some(mut pkt) = buf.get_mut(start..end).and_then(|b| PacketBuf::new(b, 0, len)) else {
            self.fwd.stats().count_drop(DropReason::Truncated);
            return None;
        };
        let verdict = self.fwd.from_underlay(routes, from, &mut pkt, now);
        Some((verdict, Span::new(slot, start + pkt.head(), pkt.len())))
    }

    /// Adds the checked inner packet at `span` to the super-packet being merged, or writes
    /// that one out and starts another. The caller keeps `span`'s slot: a merge takes holds
    /// of its own.
    fn merge(&mut self, io: &mut impl Io, span: Span, ip: &IpFacts) -> io::Result<()> {
        let uso = self.offloads.tun_uso && self.offloads.coalesce;
        let stats = self.fwd.stats();
        if let Some(r) = self.merger.add(&mut self.pool, &mut self.sc, stats, span, ip, uso) {
            self.write_merged(io, r)?;
        }
        if !self.offloads.coalesce {
            self.flush(io)?;
        }
        Ok(())
    }

    /// Writes the super-packet being merged, if any, to the TUN.
    fn flush(&mut self, io: &mut impl Io) -> io::Result<()> {
        match self.merger.finish(&mut self.pool, &mut self.sc) {
            Some(r) => self.write_merged(io, r),
            None => Ok(()),
        }
    }

    /// Queues the gathering TUN write of a finished merge.
    fn write_merged(&mut self, io: &mut impl Io, r: Ready) -> io::Result<()> {
        if r.partials > 0 {
            self.fwd.stats().count_offload(OffloadCounter::CsumCompleted, r.partials as u64);
        }
        if r.segments > 1 {
            self.fwd.stats().count_merged(r.segments);
        }
        let (iov, n) = self.sc.iovecs(r.out);
        io.write_tun_gather(r.out, iov, n, r.segments > 1)?;
        self.reap(io);
        Ok(())
    }

    /// Writes the single packet at `span` to the TUN, behind an all-zero virtio-net header
    /// when the TUN expects one (there is always room: a packet starts at least
    /// `HEADROOM` − 48 bytes in); takes the slot.
    fn write_tun(&mut self, io: &mut impl Io, span: Span) -> io::Result<()> {
        let mut span = span;
        if self.offloads.tun_vnet {
            // SAFETY: the slot is ours (its read or receive completed, nothing in flight).
            let buf = unsafe { self.pool.slot_mut(span.slot) };
            let Some(h) = span.head.checked_sub(VNET_HDR_LEN).and_then(|at| buf.get_mut(at..span.head)) else {
                self.pool.release(span.slot);
                return Ok(());
            };
            VnetHdr::default().emit(h);
            span = Span::new(span.slot, span.head - VNET_HDR_LEN, span.len + VNET_HDR_LEN);
        }
        io.write_tun(&self.pool, span)?;
        self.reap(io);
        Ok(())
    }

    /// Adds the encapsulated packet at `span` to the train for `to` from `from`, or sends
    /// that train and starts another with it; takes the slot.
    fn gather(&mut self, io: &mut impl Io, span: Span, to: SocketAddr, from: Sender) -> io::Result<()> {
        if let Some(t) = &mut self.train {
            let fits = t.open
                && t.to == to
                && t.from == from
                && span.len <= t.seg
                && t.span.len + span.len <= MAX_TRAIN_BYTES
                && t.count < MAX_TRAIN_SEGMENTS;
            if fits {
                let at = t.span.head + t.span.len;
                // SAFETY: both slots are ours (read completed, nothing in flight on them).
                if let Some((src, dst)) = unsafe { self.pool.pair_mut(span.slot, t.span.slot) } {
                    if let (Some(bytes), Some(into)) = (src.get(span.range()), dst.get_mut(at..at + span.len)) {
                        into.copy_from_slice(bytes);
                        t.span.len += span.len;
                        t.count += 1;
                        t.open = span.len == t.seg;
                        self.pool.release(span.slot);
                        return Ok(());
                    }
                }
            }
        }
        self.send_train(io)?;
        self.train = Some(Train { span, seg: span.len, count: 1, to, from, open: true });
        Ok(())
    }

    /// Sends the gathered train, if any: one datagram, or one GSO send.
    fn send_train(&mut self, io: &mut impl Io) -> io::Result<()> {
        let Some(t) = self.train.take() else { return Ok(()) };
        let segment = (t.count > 1).then_some(t.seg as u16);
        self.send(io, t.span, Datagram { to: t.to, from: t.from, segment })
    }

    /// Queues a send of `span` as `d` says, counting trains.
    fn send(&mut self, io: &mut impl Io, span: Span, d: Datagram) -> io::Result<()> {
        if let Some(size) = d.segment {
            self.fwd.stats().count_train(span.len.div_ceil(usize::from(size).max(1)));
        }
        io.send(&self.pool, span, d)?;
        self.reap(io);
        Ok(())
    }

    /// The socket a packet of inner flow `flow` leaves from: one of the flow sockets by
    /// hash, else the overlay port's.
    fn sender(&self, io: &impl Io, flow: u32) -> Sender {
        match io.flow_sockets() {
            0 => Sender::PORT,
            n => Sender(1 + flow % n),
        }
    }

    /// The end of a batch: what was merged goes to the TUN, what was gathered to the
    /// socket, and the backend submits what it queued.
    ///
    /// # Errors
    /// The backend failed to queue or submit.
    pub fn end_batch(&mut self, io: &mut impl Io) -> io::Result<()> {
        self.flush(io)?;
        self.send_train(io)?;
        io.submit()?;
        self.reap(io);
        Ok(())
    }

    /// Finishes every request the backend completed synchronously.
    fn reap(&mut self, io: &mut impl Io) {
        while let Some(d) = io.take_done() {
            self.complete(io, d);
        }
    }

    /// An output request ended: its slots go back to the pool; a failure is counted, and an
    /// offload the kernel refuses is switched off for good.
    pub fn complete(&mut self, io: &mut impl Io, done: Done) {
        if done.res < 0 {
            let errno = -done.res;
            let reason = if errno == libc::EMSGSIZE { DropReason::Oversize } else { DropReason::IoError };
            self.fwd.stats().count_drop(reason);
            match done.out {
                Out::SendTrain => self.train_refused(io, errno),
                Out::TunWriteMerged => self.merged_write_refused(errno),
                Out::Send | Out::TunWrite => {}
            }
        }
        self.release_request(done.slot);
    }

    /// Lets go of a request's slot and of whatever its gathering list held (a cancelled
    /// request at stop, or one that completed).
    pub fn release_request(&mut self, slot: u16) {
        self.sc.release(&mut self.pool, slot);
        self.pool.release(slot);
    }

    /// The kernel refused a send carrying a GSO train with `errno`. `EIO` (the underlay
    /// cannot checksum) or `EINVAL` (no GSO here) mean it refuses every train: switch GSO
    /// off for this worker and clear the TUN's offload mask, so super-packets stop coming.
    /// Other errors lose one train, already counted.
    fn train_refused(&mut self, io: &mut impl Io, errno: i32) {
        if self.offloads.gso && matches!(errno, libc::EIO | libc::EINVAL) {
            self.offloads.gso = false;
            self.fwd.stats().count_offload(OffloadCounter::Fallbacks, 1);
            let cleared = io.clear_tun_offloads();
            tracing::warn!(
                errno,
                ?cleared,
                "the underlay refused a UDP GSO send; sending one segment per datagram and clearing the TUN's offloads"
            );
        }
    }

    /// The TUN refused a merged (GSO) write with `errno`: `EINVAL` means this kernel takes
    /// none (the 6.6.44 regression), so stop merging.
    fn merged_write_refused(&mut self, errno: i32) {
        if self.offloads.coalesce && errno == libc::EINVAL {
            self.offloads.coalesce = false;
            self.fwd.stats().count_offload(OffloadCounter::Fallbacks, 1);
            tracing::warn!("the TUN refused a coalesced (GSO) write; writing one packet per write");
        }
    }
}

/// The datagrams of a receive of `n` bytes at `HEADROOM`: one, or a GRO train of
/// `train`-byte datagrams. Yields `(start, len, end)` per datagram: where it starts in the
/// slot, its length, and how far it may grow. A lone datagram may grow to the slot's end (a
/// padded ARP reply); a train's datagram ends where the next begins, so a check or a reply
/// written in place can never reach into it. An empty receive (a zero-length datagram) is
/// one empty datagram, so the core counts it (`empty_payload`) instead of it vanishing.
pub(crate) fn datagrams(n: usize, train: Option<usize>) -> impl Iterator<Item = (usize, usize, usize)> {
    let size = train.unwrap_or(n).max(1);
    (0..n.max(1)).step_by(size).map(move |off| {
        let (start, len) = (HEADROOM + off, size.min(n - off));
        (start, len, if train.is_some() { start + len } else { SLOT_LEN })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::memio::MemIo;
    use crate::encap::Encap;
    use crate::forwarder::Forwarder;
    use crate::gso::{F_NEEDS_CSUM, GSO_TCPV4};
    use crate::testing::{A_ENDPOINT, B_ENDPOINT, Pair, icmp_echo};
    use etherparse::PacketBuilder;

    const ALL_OFFLOADS: Offloads = Offloads { tun_vnet: true, gso: true, gro: true, coalesce: true, tun_uso: true };

    fn dispatch<E: Encap + Send>(core: Forwarder<E>, offloads: Offloads) -> Dispatch<Forwarder<E>> {
        Dispatch::new(BufPool::new(64).unwrap(), core, offloads)
    }

    /// Hands `bytes` to the dispatch as one TUN read.
    fn read<C: PacketCore>(d: &mut Dispatch<C>, io: &mut MemIo, bytes: &[u8], routes: &RouteTable) {
        let slot = d.pool.alloc().unwrap();
        let at = d.tun_read_at();
        // SAFETY: just allocated.
        let buf = unsafe { d.pool.slot_mut(slot) };
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        d.on_tun_read(io, slot, bytes.len(), routes, Instant::now()).unwrap();
    }

    /// Hands `datagrams` to the dispatch as one receive from A: a GRO train when more than one.
    fn receive<C: PacketCore>(d: &mut Dispatch<C>, io: &mut MemIo, datagrams: &[Vec<u8>], routes: &RouteTable) {
        let slot = d.pool.alloc().unwrap();
        // SAFETY: just allocated.
        let buf = unsafe { d.pool.slot_mut(slot) };
        let mut at = HEADROOM;
        for g in datagrams {
            buf[at..at + g.len()].copy_from_slice(g);
            at += g.len();
        }
        let train = (datagrams.len() > 1).then(|| datagrams[0].len());
        let from = A_ENDPOINT.parse().unwrap();
        d.on_datagrams(io, Received { slot, from, len: at - HEADROOM, train }, routes, Instant::now()).unwrap();
    }

    /// Ends the batch, completes every request, and checks that no slot leaked.
    fn settle<C: PacketCore>(d: &mut Dispatch<C>, io: &mut MemIo) {
        d.end_batch(io).unwrap();
        for done in io.replay() {
            d.complete(io, done);
        }
        assert_eq!(d.pool.available(), d.pool.len(), "every slot is back in the pool");
    }

    fn with_vnet(hdr: VnetHdr, pkt: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; VNET_HDR_LEN];
        hdr.emit(&mut v);
        v.extend_from_slice(pkt);
        v
    }

    fn tcp(seq: u32, payload: usize) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 244, 1, 5], [10, 244, 2, 1], 64)
            .tcp(40000, 5201, seq, 64240)
            .ack(7)
            .write(&mut out, &vec![(seq % 251) as u8; payload])
            .unwrap();
        out
    }

    const TSO: VnetHdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 40,
        gso_size: 1400,
        csum_start: 20,
        csum_offset: 16,
    };

    #[test]
    fn small_packets_for_one_peer_leave_as_one_gso_send_in_either_completion_mode() {
        for sync in [false, true] {
            let Pair { a, routes_a, .. } = Pair::new();
            let mut d = dispatch(a, Offloads { gso: true, ..Offloads::default() });
            let mut io = MemIo { sync, flow_sockets: 2, ..MemIo::new() };
            let pkt = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 100);
            let short = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 60);
            for p in [&pkt, &pkt, &short, &pkt] {
                read(&mut d, &mut io, p, &routes_a);
            }
            settle(&mut d, &mut io);
            let wire = Pair::new().a_encap(&pkt).unwrap();
            let wire_short = Pair::new().a_encap(&short).unwrap();
            let sends = io.sends();
            // A shorter packet ends a train: three in the first, the next starts anew.
            assert_eq!(sends.len(), 2, "sync={sync}");
            assert_eq!(sends[0].0, Some(wire.len() as u16));
            assert_eq!(sends[0].1, [&wire[..], &wire, &wire_short].concat());
            assert_eq!(sends[1], (None, &wire[..]));
            assert!(matches!(io.requests[0], crate::driver::memio::Request::Send { from: Sender(1 | 2), .. }));
            assert_eq!(d.fwd.stats().offload_count(OffloadCounter::GsoSends), 1);
        }
        // Without GSO every packet is its own datagram.
        let Pair { a, routes_a, .. } = Pair::new();
        let mut d = dispatch(a, Offloads::default());
        let mut io = MemIo::new();
        for _ in 0..3 {
            read(&mut d, &mut io, &icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 100), &routes_a);
        }
        settle(&mut d, &mut io);
        assert_eq!(io.sends().iter().map(|s| s.0).collect::<Vec<_>>(), [None, None, None]);
    }

    #[test]
    fn a_super_packet_is_cut_into_trains_and_a_refused_train_switches_gso_off() {
        let Pair { a, routes_a, .. } = Pair::new();
        let mut d = dispatch(a, ALL_OFFLOADS);
        let mut io = MemIo::new();
        let sp = with_vnet(TSO, &tcp(1_000, 3500));
        read(&mut d, &mut io, &sp, &routes_a);
        settle(&mut d, &mut io);
        // flannel udp has no header of its own: a stride is one 1400-byte segment + 40.
        assert_eq!(io.sends().len(), 1);
        assert_eq!(io.sends()[0].0, Some(1440));
        assert_eq!(io.sends()[0].1.len(), 2 * 1440 + 40 + 700);
        assert_eq!(d.fwd.stats().offload_count(OffloadCounter::SuperPacketsRead), 1);

        // The underlay cannot checksum: the kernel refuses the train with EIO.
        io.refuse = vec![(Out::SendTrain, libc::EIO)];
        read(&mut d, &mut io, &sp, &routes_a);
        settle(&mut d, &mut io);
        assert!(!d.offloads.gso, "GSO is off for good");
        assert_eq!(io.offloads_cleared, 1, "and the TUN is asked for no more super-packets");
        assert_eq!(d.fwd.stats().offload_count(OffloadCounter::Fallbacks), 1);
        assert_eq!(d.fwd.stats().drops(DropReason::IoError), 1);
        // A super-packet already on its way is still cut, one segment per datagram.
        io.refuse.clear();
        io.requests.clear();
        read(&mut d, &mut io, &sp, &routes_a);
        settle(&mut d, &mut io);
        let sizes: Vec<_> = io.sends().iter().map(|(seg, b)| (*seg, b.len())).collect();
        assert_eq!(sizes, [(None, 1440), (None, 1440), (None, 740)]);
        // Any other error loses the one train and changes nothing.
        let Pair { a, routes_a, .. } = Pair::new();
        let mut d = dispatch(a, ALL_OFFLOADS);
        let mut io = MemIo { refuse: vec![(Out::SendTrain, libc::ENOBUFS)], ..MemIo::new() };
        read(&mut d, &mut io, &sp, &routes_a);
        settle(&mut d, &mut io);
        assert!(d.offloads.gso);
        assert_eq!(io.offloads_cleared, 0);
    }

    #[test]
    fn a_bad_virtio_net_header_is_dropped_and_counted() {
        let Pair { a, routes_a, .. } = Pair::new();
        let mut d = dispatch(a, ALL_OFFLOADS);
        let mut io = MemIo::new();
        read(&mut d, &mut io, &[0u8; 5], &routes_a); // shorter than the header
        let lie = VnetHdr { gso_size: 0, ..TSO };
        read(&mut d, &mut io, &with_vnet(lie, &tcp(1, 3000)), &routes_a);
        settle(&mut d, &mut io);
        assert_eq!(d.fwd.stats().drops(DropReason::BadOffload), 2);
        assert!(io.requests.is_empty());
    }

    #[test]
    fn a_gro_train_is_merged_into_one_write_and_a_refused_merge_switches_merging_off() {
        let mut sender = Pair::new();
        let wire: Vec<Vec<u8>> = (0..3).map(|i| sender.a_encap(&tcp(1000 + i * 1000, 1000)).unwrap()).collect();
        let Pair { b, routes_b, .. } = Pair::new();
        let mut d = dispatch(b, ALL_OFFLOADS);
        let mut io = MemIo::new();
        receive(&mut d, &mut io, &wire, &routes_b);
        settle(&mut d, &mut io);
        let writes = io.writes();
        assert_eq!(writes.len(), 1);
        assert!(writes[0].0, "merged");
        assert_eq!(writes[0].1.len(), VNET_HDR_LEN + 40 + 3000);
        assert_eq!(d.fwd.stats().offload_count(OffloadCounter::GroTrains), 1);
        assert_eq!(d.fwd.stats().offload_count(OffloadCounter::MergedSegments), 3);

        // The 6.6.44 regression: the TUN takes no GSO write.
        io.refuse = vec![(Out::TunWriteMerged, libc::EINVAL)];
        receive(&mut d, &mut io, &wire, &routes_b);
        settle(&mut d, &mut io);
        assert!(!d.offloads.coalesce);
        assert_eq!(d.fwd.stats().offload_count(OffloadCounter::Fallbacks), 1);
        io.refuse.clear();
        io.requests.clear();
        receive(&mut d, &mut io, &wire, &routes_b);
        settle(&mut d, &mut io);
        let writes = io.writes();
        assert_eq!(writes.iter().map(|w| (w.0, w.1.len())).collect::<Vec<_>>(), [(false, 10 + 1040); 3]);
        let expect = Pair::new().a_to_b(&tcp(2000, 1000)).unwrap();
        assert!(writes[1].1[VNET_HDR_LEN..] == expect[..], "each written as the core delivered it");
    }

    /// The merge path sees only what the core delivered: a GRO train whose middle datagram
    /// carries a bad inner IPv4 header checksum has that one dropped and counted, its
    /// neighbours delivered; an empty receive reaches the core too, and is counted there.
    #[test]
    fn a_train_datagram_with_a_bad_inner_checksum_never_reaches_the_merge() {
        let mut net = Pair::vxlan();
        let good = net.a_encap(&icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 100)).unwrap();
        let mut bad = good.clone();
        bad[22 + 10] ^= 0x40;
        let Pair { b, routes_b, .. } = net;
        let mut d = dispatch(b, ALL_OFFLOADS);
        let mut io = MemIo { sync: true, ..MemIo::new() };
        receive(&mut d, &mut io, &[good.clone(), bad, good], &routes_b);
        settle(&mut d, &mut io);
        assert_eq!(io.writes().len(), 2);
        assert_eq!(d.fwd.stats().drops(DropReason::BadInnerChecksum), 1);
        receive(&mut d, &mut io, &[Vec::new()], &routes_b);
        settle(&mut d, &mut io);
        assert_eq!(d.fwd.stats().drops(DropReason::EmptyPayload), 1);
    }

    #[test]
    fn without_a_virtio_net_header_a_delivery_is_written_in_place() {
        let mut net = Pair::new();
        let inner = icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 100);
        let wire = net.a_encap(&inner).unwrap();
        let expect = net.b_receives(&wire).unwrap();
        let Pair { b, routes_b, .. } = Pair::new();
        let mut d = dispatch(b, Offloads::default());
        let mut io = MemIo::new();
        receive(&mut d, &mut io, &[wire], &routes_b);
        settle(&mut d, &mut io);
        assert_eq!(io.writes(), [(false, &expect[..])]);
        // A datagram from nobody we know goes nowhere.
        let from: SocketAddr = B_ENDPOINT.parse().unwrap();
        let slot = d.pool.alloc().unwrap();
        d.on_datagrams(&mut io, Received { slot, from, len: 100, train: None }, &routes_b, Instant::now()).unwrap();
        settle(&mut d, &mut io);
        assert_eq!(io.writes().len(), 1);
    }

    #[test]
    fn datagrams_split_a_train_and_bound_each_one() {
        let h = HEADROOM;
        assert_eq!(datagrams(100, None).collect::<Vec<_>>(), [(h, 100, SLOT_LEN)]);
        assert_eq!(
            datagrams(2500, Some(1000)).collect::<Vec<_>>(),
            [(h, 1000, h + 1000), (h + 1000, 1000, h + 2000), (h + 2000, 500, h + 2500)]
        );
        // A zero-length datagram is still one datagram, for the core to count.
        assert_eq!(datagrams(0, None).collect::<Vec<_>>(), [(h, 0, SLOT_LEN)]);
        assert_eq!(datagrams(0, Some(1000)).collect::<Vec<_>>(), [(h, 0, h)]);
        assert_eq!(datagrams(3, Some(0)).count(), 3, "a zero segment size cannot loop forever");
    }
}
