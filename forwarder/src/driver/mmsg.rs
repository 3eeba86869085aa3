//! The fallback worker, for hosts where io_uring is refused (Docker's and containerd's
//! default seccomp profiles, `kernel.io_uring_disabled`): epoll on the TUN queue and the
//! socket, `recvmmsg`/`sendmmsg` in batches of [`BATCH`], and TUN reads until `EAGAIN`.
//!
//! With offloads (as on io_uring) one TUN `read` returns a TCP super-packet, cut into GSO
//! trains that leave in the same `sendmmsg` (one message with a `UDP_SEGMENT` cmsg each);
//! `recvmmsg` asks for `UDP_GRO` trains, every datagram is checked on its own and merged
//! across the batch into few gathering TUN `writev`s ([`Merger`]). Without offloads the TUN
//! costs one `read` and one `write` per packet.

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::Offloads;
use super::cmsg::{CTRL_LEN, Ctrl};
use super::pool::BufPool;
use super::scatter::{Merger, Ready, Scatter};
use super::sockaddr;
use super::tun::TunQueue;
use crate::buf::{HEADROOM, PacketBuf, SLOT_LEN};
use crate::forwarder::{PacketCore, TunVerdict, UnderlayVerdict};
use crate::gso::{self, MAX_TRAIN_BYTES, MAX_TRAIN_SEGMENTS, Segmentation, VNET_HDR_LEN, VnetHdr};
use crate::route::{RouteTable, RouteTableHandle};
use crate::stats::{DropReason, OffloadCounter};

/// Packets per `recvmmsg` / `sendmmsg` and per TUN read burst.
pub const BATCH: usize = 64;
/// epoll wait, so the stop flag is noticed.
const TICK_MS: i32 = 100;
const TOKEN_TUN: u64 = 1;
const TOKEN_UDP: u64 = 2;
/// Where a TUN read lands when packets carry a virtio-net header: just in front of the
/// packet's usual place.
const VNET_AT: usize = HEADROOM - VNET_HDR_LEN;

/// A staged send that more equal-sized packets for the same peer and socket may join.
#[derive(Clone, Copy, Debug, Default)]
struct Gathered {
    /// The destination; `None`: not a gatherable entry.
    to: Option<std::net::SocketAddr>,
    /// Every packet's size but possibly the last's (the GSO segment size).
    seg: usize,
    count: usize,
    /// A shorter packet ends the train.
    open: bool,
}

/// The fallback worker. Field order is drop order.
pub(super) struct MmsgWorker<C: PacketCore> {
    epoll: RawFd,
    hdrs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_storage]>,
    /// Control messages per batch entry (`UDP_SEGMENT` out, `UDP_GRO` in).
    ctrls: Box<[Ctrl]>,
    /// Batch entry `i`'s GSO segment size when it is a train (0: one datagram). The
    /// `UDP_SEGMENT` cmsg is written from it just before the send.
    segment: Box<[u16]>,
    /// Batch entry `i` as a train of small packets gathered from single TUN reads.
    gathered: Box<[Gathered]>,
    slots: Box<[u16]>,
    senders: Box<[RawFd]>,
    send_fds: Box<[RawFd]>,
    pool: BufPool,
    tun: TunQueue,
    udp: UdpSocket,
    /// Keeps the send sockets open; their descriptors are in `send_fds`.
    _send: Vec<UdpSocket>,
    fwd: C,
    routes: RouteTableHandle,
    stop: Arc<AtomicBool>,
    offloads: Offloads,
    /// The super-packet being merged for the TUN.
    merger: Merger,
    /// Iovec lists of gathering sends and writes, per header slot.
    sc: Scatter,
}

impl<C: PacketCore> Drop for MmsgWorker<C> {
    fn drop(&mut self) {
        // SAFETY: closes the epoll descriptor this worker created and owns.
        unsafe { libc::close(self.epoll) };
    }
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

impl<C: PacketCore> MmsgWorker<C> {
    pub(super) fn new(
        io: super::WorkerIo,
        fwd: C,
        routes: RouteTableHandle,
        stop: Arc<AtomicBool>,
        pool: BufPool,
    ) -> io::Result<Self> {
        io.set_nonblocking(true)?;
        let super::WorkerIo { tun, udp, send, offloads } = io;
        // SAFETY: plain syscall; the result is checked.
        let epoll = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        for (fd, token) in [(tun.fd(), TOKEN_TUN), (udp.as_raw_fd(), TOKEN_UDP)] {
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
            // SAFETY: valid epoll and target descriptors, event struct on the stack.
            if let Err(e) = cvt(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) }) {
                // SAFETY: closing the descriptor created above.
                unsafe { libc::close(epoll) };
                return Err(e);
            }
        }
        // SAFETY: all-zero is valid for these C structs.
        let zeroed_hdr = unsafe { std::mem::zeroed::<libc::mmsghdr>() };
        let pool_len = pool.len();
        Ok(Self {
            epoll,
            hdrs: vec![zeroed_hdr; BATCH].into_boxed_slice(),
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH].into_boxed_slice(),
            // SAFETY: all-zero is a valid sockaddr_storage.
            addrs: vec![unsafe { std::mem::zeroed::<libc::sockaddr_storage>() }; BATCH].into_boxed_slice(),
            ctrls: (0..BATCH).map(|_| Ctrl::new()).collect(),
            segment: vec![0; BATCH].into_boxed_slice(),
            gathered: vec![Gathered::default(); BATCH].into_boxed_slice(),
            slots: vec![0u16; BATCH].into_boxed_slice(),
            senders: vec![0 as RawFd; BATCH].into_boxed_slice(),
            send_fds: send.iter().map(AsRawFd::as_raw_fd).collect(),
            pool,
            tun,
            udp,
            _send: send,
            fwd,
            routes,
            stop,
            offloads,
            merger: Merger::default(),
            sc: Scatter::new(pool_len),
        })
    }

    /// Forwards until the stop flag is set.
    ///
    /// # Errors
    /// A failure of `epoll_wait` itself.
    pub(super) fn run(mut self) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
        while !self.stop.load(Ordering::Relaxed) {
            // SAFETY: the events array outlives the call and its length is passed.
            let n = unsafe { libc::epoll_wait(self.epoll, events.as_mut_ptr(), 2, TICK_MS) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter().take(usize::try_from(n).unwrap_or(0)) {
                match ev.u64 {
                    TOKEN_TUN => self.drain_tun()?,
                    TOKEN_UDP => self.drain_udp(),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Reads up to [`BATCH`] packets from the TUN, then sends every one bound for a peer with
    /// a single `sendmmsg`.
    ///
    /// # Errors
    /// A TUN read error that is not transient: the device is gone.
    fn drain_tun(&mut self) -> io::Result<()> {
        let routes = self.routes.load();
        let now = Instant::now();
        let tun_fd = self.tun.fd();
        let mut staged = 0;
        let mut read = 0;
        while staged < BATCH {
            let Some(slot) = self.pool.alloc() else {
                self.fwd.stats().count_drop(DropReason::PoolExhausted);
                break;
            };
            let at = if self.offloads.tun_vnet { VNET_AT } else { HEADROOM };
            // SAFETY: the slot is ours; read writes at most SLOT_LEN - at bytes into it.
            let n = unsafe { libc::read(tun_fd, self.pool.slot_ptr(slot).add(at).cast(), SLOT_LEN - at) };
            let Ok(n) = usize::try_from(n) else {
                let e = io::Error::last_os_error();
                self.pool.release(slot);
                if e.raw_os_error().is_some_and(super::is_transient) {
                    break; // EAGAIN: drained
                }
                self.send_staged(staged);
                return Err(e);
            };
            read += 1;
            // SAFETY: the slot is ours.
            let buf = unsafe { self.pool.slot_mut(slot) };
            let hdr = if self.offloads.tun_vnet { buf.get(VNET_AT..).and_then(VnetHdr::parse) } else { None };
            let len = if self.offloads.tun_vnet { n.checked_sub(VNET_HDR_LEN) } else { Some(n) };
            let Some(mut pkt) = len.and_then(|len| PacketBuf::new(buf, HEADROOM, len)) else {
                self.fwd.stats().count_drop(DropReason::BadOffload);
                self.pool.release(slot);
                continue;
            };
            let seg = match hdr.map(|h| gso::check_read(&h, pkt.as_mut_slice())) {
                Some(Ok(seg)) => seg,
                Some(Err(e)) => {
                    self.fwd.stats().count_drop(e.reason());
                    self.pool.release(slot);
                    continue;
                }
                None => None,
            };
            if let Some(seg) = seg {
                self.fwd.stats().count_offload(OffloadCounter::SuperPacketsRead, 1);
                let before = pkt.len();
                let verdict = self.fwd.from_tun_segmented(&routes, &mut pkt, &seg, now);
                let (head, len) = (pkt.head(), pkt.len());
                match verdict {
                    TunVerdict::Send { to, flow, .. } => {
                        staged = self.stage_trains(staged, slot, head, len, len - before, &seg, to, flow);
                    }
                    TunVerdict::Reply => self.write_tun(slot, head, len),
                    TunVerdict::Flood | TunVerdict::Drop(_) => {}
                }
                self.pool.release(slot);
                continue;
            }
            match self.fwd.from_tun(&routes, &mut pkt, now) {
                TunVerdict::Send { to, flow, .. } => {
                    let (head, len) = (pkt.head(), pkt.len());
                    let fd = self.sender(flow);
                    if self.offloads.gso && staged > 0 && self.gather(staged - 1, slot, head, len, to, fd) {
                        self.pool.release(slot);
                        continue;
                    }
                    self.stage(staged, slot, head, len, Some(to));
                    if let Some(g) = self.gathered.get_mut(staged) {
                        *g = Gathered { to: Some(to), seg: len, count: 1, open: true };
                    }
                    if let Some(s) = self.senders.get_mut(staged) {
                        *s = fd;
                    }
                    staged += 1;
                }
                TunVerdict::Reply => {
                    let (head, len) = (pkt.head(), pkt.len());
                    self.write_tun(slot, head, len);
                    self.pool.release(slot);
                }
                TunVerdict::Flood => {
                    let (head, len) = (pkt.head(), pkt.len());
                    let udp_fd = self.udp.as_raw_fd();
                    for p in routes.peers() {
                        if staged == BATCH {
                            self.send_staged(staged);
                            staged = 0;
                        }
                        let Some(copy) = self.pool.clone_slot(slot, head, len) else {
                            self.fwd.stats().count_drop(DropReason::PoolExhausted);
                            break;
                        };
                        self.stage(staged, copy, head, len, Some(p.endpoint));
                        if let Some(s) = self.senders.get_mut(staged) {
                            *s = udp_fd;
                        }
                        staged += 1;
                    }
                    self.pool.release(slot);
                }
                TunVerdict::Drop(_) => self.pool.release(slot),
            }
        }
        self.fwd.stats().record_batch(read);
        self.send_staged(staged);
        Ok(())
    }

    /// Cuts the encapsulated super-packet at `head..head + len` of `slot` into trains in
    /// fresh slots, staged from entry `staged` on (sending the batch when it fills); returns
    /// the new number of staged entries. The caller releases `slot`.
    #[allow(clippy::too_many_arguments)]
    fn stage_trains(
        &mut self,
        mut staged: usize,
        slot: u16,
        head: usize,
        len: usize,
        prefix: usize,
        seg: &Segmentation,
        to: std::net::SocketAddr,
        flow: u32,
    ) -> usize {
        let fd = self.sender(flow);
        let room = self.fwd.segment_trailer();
        let per_train = if self.offloads.gso { seg.segments_per_train(prefix + room) } else { 1 };
        let stride = prefix + seg.segment_len() + room;
        let mut first = 0;
        while first < seg.segments() {
            let range = first..(first + per_train).min(seg.segments());
            first = range.end;
            if staged == BATCH {
                self.send_staged(staged);
                staged = 0;
            }
            let Some(out) = self.pool.alloc() else {
                self.fwd.stats().count_drop(DropReason::PoolExhausted);
                break;
            };
            // SAFETY: `slot` holds the read packet and `out` was just allocated: both ours.
            let cut = unsafe { self.pool.pair_mut(slot, out) }.and_then(|(src, dst)| {
                let bytes = seg.write_segments_with_room(src.get(head..head + len)?, prefix, room, range.clone(), dst);
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
            self.stage(staged, out, 0, bytes, Some(to));
            if let Some(s) = self.senders.get_mut(staged) {
                *s = fd;
            }
            if let (true, Some(g)) = (range.len() > 1, self.segment.get_mut(staged)) {
                *g = stride as u16;
            }
            staged += 1;
        }
        staged
    }

    /// Appends the encapsulated packet at `head..head + len` of `slot` to staged entry `i` if
    /// that entry is a train of equal-sized packets for `to` on `fd` with room left: small
    /// packets then leave as one GSO send. `false` leaves everything unchanged.
    fn gather(&mut self, i: usize, slot: u16, head: usize, len: usize, to: std::net::SocketAddr, fd: RawFd) -> bool {
        let (Some(g), Some(&sender), Some(iov), Some(&into)) =
            (self.gathered.get(i), self.senders.get(i), self.iovs.get(i), self.slots.get(i))
        else {
            return false;
        };
        let fits = g.open
            && g.to == Some(to)
            && sender == fd
            && len <= g.seg
            && iov.iov_len + len <= MAX_TRAIN_BYTES
            && g.count < MAX_TRAIN_SEGMENTS;
        if !fits {
            return false;
        }
        let at = iov.iov_base as usize - self.pool.slot_ptr(into) as usize + iov.iov_len;
        // SAFETY: both slots are ours (read completed; staged, not yet sent).
        let copied = unsafe { self.pool.pair_mut(slot, into) }.is_some_and(|(src, dst)| {
            match (src.get(head..head + len), dst.get_mut(at..at + len)) {
                (Some(from), Some(to)) => {
                    to.copy_from_slice(from);
                    true
                }
                _ => false,
            }
        });
        if !copied {
            return false;
        }
        let seg = g.seg;
        let count = g.count + 1;
        if let (Some(g), Some(iov)) = (self.gathered.get_mut(i), self.iovs.get_mut(i)) {
            g.count = count;
            g.open = len == seg;
            iov.iov_len += len;
        }
        if let Some(g) = self.segment.get_mut(i) {
            *g = seg as u16;
        }
        true
    }

    /// The socket a packet of inner flow `flow` leaves from.
    fn sender(&self, flow: u32) -> RawFd {
        super::pick_sender(self.udp.as_raw_fd(), &self.send_fds, flow)
    }

    /// Sends the first `staged` batch entries, one `sendmmsg` per run of entries that leave
    /// from the same socket, and frees their slots.
    fn send_staged(&mut self, staged: usize) {
        // Trains carry their segment size in a UDP_SEGMENT cmsg.
        for i in 0..staged {
            let (Some(&size), Some(h), Some(c)) = (self.segment.get(i), self.hdrs.get_mut(i), self.ctrls.get_mut(i))
            else {
                continue;
            };
            if size > 0 {
                h.msg_hdr.msg_controllen = c.set_segment_size(size);
                h.msg_hdr.msg_control = c.0.as_mut_ptr().cast();
                let len = self.iovs.get(i).map_or(0, |v| v.iov_len);
                self.fwd.stats().count_train(len.div_ceil(usize::from(size)));
            }
        }
        let mut sent = 0;
        while sent < staged {
            let fd = self.senders.get(sent).copied().unwrap_or_else(|| self.udp.as_raw_fd());
            let run = self.senders.get(sent..staged).map_or(1, |s| s.iter().take_while(|f| **f == fd).count()).max(1);
            // SAFETY: hdrs[sent..sent + run] were staged above and point at owned slots.
            let rc = unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr().add(sent), run as libc::c_uint, 0) };
            match usize::try_from(rc) {
                Ok(k) if k > 0 => sent += k,
                _ => {
                    // The first unsent datagram failed (EMSGSIZE, ENOBUFS, …): count it, go on.
                    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                    let reason = if errno == libc::EMSGSIZE { DropReason::Oversize } else { DropReason::IoError };
                    self.fwd.stats().count_drop(reason);
                    if self.segment.get(sent).is_some_and(|s| *s > 0) {
                        super::train_refused(&mut self.offloads, &self.tun, self.fwd.stats(), errno);
                    }
                    sent += 1;
                }
            }
        }
        for i in 0..staged {
            if let Some(&slot) = self.slots.get(i) {
                self.pool.release(slot);
            }
        }
    }

    /// Receives up to [`BATCH`] datagrams with one `recvmmsg` and writes the accepted ones
    /// into the TUN.
    fn drain_udp(&mut self) {
        let mut armed = 0;
        while armed < BATCH {
            let Some(slot) = self.pool.alloc() else { break };
            self.stage(armed, slot, HEADROOM, SLOT_LEN - HEADROOM, None);
            if self.offloads.gro {
                if let (Some(h), Some(c)) = (self.hdrs.get_mut(armed), self.ctrls.get_mut(armed)) {
                    c.clear();
                    h.msg_hdr.msg_control = c.0.as_mut_ptr().cast();
                    h.msg_hdr.msg_controllen = CTRL_LEN;
                }
            }
            armed += 1;
        }
        if armed == 0 {
            self.fwd.stats().count_drop(DropReason::PoolExhausted);
            return;
        }
        // SAFETY: hdrs[..armed] point at owned slots and at `addrs`; no timeout pointer.
        let rc = unsafe {
            libc::recvmmsg(
                self.udp.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                armed as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let got = usize::try_from(rc).unwrap_or(0);
        self.fwd.stats().record_batch(got);
        let routes = self.routes.load();
        let now = Instant::now();
        for i in 0..armed {
            let Some(&slot) = self.slots.get(i) else { continue };
            if i < got {
                self.deliver(&routes, i, slot, now);
            }
            self.pool.release(slot);
        }
        self.flush();
    }

    fn deliver(&mut self, routes: &crate::route::RouteTable, i: usize, slot: u16, now: Instant) {
        let (Some(h), Some(a)) = (self.hdrs.get(i), self.addrs.get(i)) else { return };
        let n = h.msg_len as usize;
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            self.fwd.stats().count_drop(DropReason::Truncated);
            return;
        }
        let Some(from) = sockaddr::read(a) else {
            // A source address that does not read as IPv4/IPv6 is no known peer's.
            self.fwd.stats().count_drop(DropReason::UnknownSender);
            return;
        };
        if self.offloads.tun_vnet {
            let train = if self.offloads.gro {
                self.ctrls.get(i).and_then(|c| c.gro_size(h.msg_hdr.msg_controllen))
            } else {
                None
            };
            self.deliver_merged(routes, slot, from, n, train, now);
            return;
        }
        // SAFETY: the receive completed, the slot is ours.
        let buf = unsafe { self.pool.slot_mut(slot) };
        let Some(mut pkt) = PacketBuf::new(buf, HEADROOM, n) else { return };
        match self.fwd.from_underlay(routes, from, &mut pkt, now) {
            UnderlayVerdict::Deliver { .. } => {
                // No virtio-net header to say "partial": complete it here.
                self.fwd.complete_partial(pkt.as_mut_slice());
                let (head, len) = (pkt.head(), pkt.len());
                self.write_tun(slot, head, len);
            }
            UnderlayVerdict::Reply { to } => {
                let (head, len) = (pkt.head(), pkt.len());
                self.send_one(slot, head, len, to);
            }
            UnderlayVerdict::Drop(_) | UnderlayVerdict::Consumed => {}
        }
    }

    /// `n` bytes from `from` at `HEADROOM` of `slot`: one datagram or a GRO train of
    /// `train`-byte datagrams, each checked within its own bounds and merged for the TUN.
    fn deliver_merged(
        &mut self,
        routes: &RouteTable,
        slot: u16,
        from: std::net::SocketAddr,
        n: usize,
        train: Option<usize>,
        now: Instant,
    ) {
        if train.is_some() {
            self.fwd.stats().count_offload(OffloadCounter::GroTrains, 1);
        }
        for d in super::datagrams(n, train) {
            // SAFETY: the receive completed, the slot is ours.
            let checked = unsafe { super::check_datagram(&mut self.pool, &mut self.fwd, routes, from, slot, d, now) };
            let Some((verdict, head, len)) = checked else { break };
            match verdict {
                UnderlayVerdict::Deliver { .. } => self.merge(slot, head, len),
                UnderlayVerdict::Reply { to } => self.send_one(slot, head, len, to),
                UnderlayVerdict::Drop(_) | UnderlayVerdict::Consumed => {}
            }
        }
    }

    /// Adds the checked packet at `head..head + len` of `slot` to the super-packet being
    /// merged, or writes that one and starts another.
    fn merge(&mut self, slot: u16, head: usize, len: usize) {
        let uso = self.offloads.tun_uso && self.offloads.coalesce;
        if let Some(r) = self.merger.add(&mut self.pool, &mut self.sc, self.fwd.stats(), slot, head, len, uso) {
            self.write_merged(r);
        }
        if !self.offloads.coalesce {
            self.flush();
        }
    }

    /// Writes the super-packet being merged, if any, to the TUN.
    fn flush(&mut self) {
        if let Some(r) = self.merger.finish(&mut self.pool, &mut self.sc) {
            self.write_merged(r);
        }
    }

    /// Writes a finished merge to the TUN with one gathering write, then lets go of the
    /// slots it held.
    fn write_merged(&mut self, r: Ready) {
        if r.partials > 0 {
            self.fwd.stats().count_offload(OffloadCounter::CsumCompleted, r.partials as u64);
        }
        let (iov, n) = self.sc.iovecs(r.out);
        // SAFETY: the list points into slots the merge holds; n ≤ MAX_IOVS entries.
        let rc = unsafe { libc::writev(self.tun.fd(), iov, n as libc::c_int) };
        if rc < 0 {
            self.fwd.stats().count_drop(DropReason::IoError);
            if r.segments > 1 {
                let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                super::merged_write_refused(&mut self.offloads, self.fwd.stats(), errno);
            }
        } else if r.segments > 1 {
            self.fwd.stats().count_merged(r.segments);
        }
        self.sc.release(&mut self.pool, r.out);
        self.pool.release(r.out);
    }

    /// One datagram from the overlay port (neighbour replies; rare, so no batching).
    fn send_one(&mut self, slot: u16, head: usize, len: usize, to: std::net::SocketAddr) {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut addr = unsafe { std::mem::zeroed::<libc::sockaddr_storage>() };
        let alen = sockaddr::write(to, &mut addr);
        // SAFETY: sends len bytes from inside the owned slot to a valid address.
        let rc = unsafe {
            libc::sendto(
                self.udp.as_raw_fd(),
                self.pool.slot_ptr(slot).add(head).cast(),
                len,
                0,
                (&addr as *const libc::sockaddr_storage).cast(),
                alen,
            )
        };
        if rc < 0 {
            self.fwd.stats().count_drop(DropReason::IoError);
        }
    }

    /// Writes one packet to the TUN, behind an all-zero virtio-net header when the TUN
    /// expects one (a packet always starts at least `HEADROOM` − 48 bytes in).
    fn write_tun(&mut self, slot: u16, head: usize, len: usize) {
        let (mut head, mut len) = (head, len);
        if self.offloads.tun_vnet {
            // SAFETY: the slot is ours.
            let buf = unsafe { self.pool.slot_mut(slot) };
            let Some(h) = head.checked_sub(VNET_HDR_LEN).and_then(|at| buf.get_mut(at..head)) else { return };
            VnetHdr::default().emit(h);
            (head, len) = (head - VNET_HDR_LEN, len + VNET_HDR_LEN);
        }
        // SAFETY: writes len bytes from inside the owned slot.
        let rc = unsafe { libc::write(self.tun.fd(), self.pool.slot_ptr(slot).add(head).cast(), len) };
        if rc < 0 {
            self.fwd.stats().count_drop(DropReason::IoError);
        }
    }

    /// Points batch entry `i` at `len` bytes from `head` of `slot`, with `to` as the
    /// destination (send) or room for the source (receive).
    fn stage(&mut self, i: usize, slot: u16, head: usize, len: usize, to: Option<std::net::SocketAddr>) {
        let (Some(h), Some(iov), Some(addr), Some(s)) =
            (self.hdrs.get_mut(i), self.iovs.get_mut(i), self.addrs.get_mut(i), self.slots.get_mut(i))
        else {
            return;
        };
        *s = slot;
        // SAFETY (pointer arithmetic): head + len ≤ SLOT_LEN.
        *iov = libc::iovec { iov_base: unsafe { self.pool.slot_ptr(slot).add(head) }.cast(), iov_len: len };
        let namelen = match to {
            Some(a) => sockaddr::write(a, addr),
            None => std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        };
        h.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
        h.msg_hdr.msg_namelen = namelen;
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_control = std::ptr::null_mut();
        h.msg_hdr.msg_controllen = 0;
        h.msg_hdr.msg_flags = 0;
        h.msg_len = 0;
        if let Some(g) = self.segment.get_mut(i) {
            *g = 0;
        }
        if let Some(g) = self.gathered.get_mut(i) {
            *g = Gathered::default();
        }
    }
}
