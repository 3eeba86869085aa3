//! The io_uring worker: TUN reads, UDP receives, UDP sends and TUN writes are all SQEs on
//! one ring per worker, submitted in batches, over buffers registered once.
//!
//! 1. Keep one multishot read on the TUN queue (`READ_MULTISHOT`, Linux ≥ 6.7) and one
//!    multishot `RECVMSG` on the socket in flight, each drawing pool slots from its own
//!    provided-buffer ring, topped up once per loop. (Older kernels: a few `READ_FIXED`s
//!    and `RECVMSG`s in flight, each naming its own slot.)
//! 2. Enter the kernel once per loop: submit everything queued and wait for at least one
//!    completion (or a 100 ms tick to notice the stop flag).
//! 3. Load the route table once, read the clock once, then run every completion through the
//!    sans-IO core, queueing a `SENDMSG` or a TUN write for packets that go on.
//! 4. A send or write completion returns its slot to the pool; the next loop re-arms reads.
//!
//! With offloads (`reference/performance.md` §2–4) the same loop moves 64 KiB per request:
//! - TUN → wire: a read returns a virtio-net header and a TCP/UDP super-packet; the core
//!   checks and encapsulates it whole, then it is cut into trains of segments in fresh
//!   slots, each train one `SENDMSG` with a `UDP_SEGMENT` cmsg (one GSO send);
//! - wire → TUN: with `UDP_GRO` a receive returns a train; every segment is checked by the
//!   core on its own, then consecutive segments of one flow are merged
//!   ([`crate::gro::Coalesced`], [`Merger`]) into one super-packet written to the TUN with
//!   one `WRITEV`: the first segment's headers from a slot of their own, every payload from
//!   where it was received.
//!   Merging runs across all receive completions of one loop, so datagrams that arrive
//!   separately (a Linux vxlan peer) are merged too.
//!
//! If the kernel refuses a GSO send (`EIO`/`EINVAL`: an underlay without checksum offload)
//! the worker sends one segment per request from then on and clears the TUN's offload
//! mask; if it refuses a GSO write to the TUN (the 6.6.44 regression) it stops merging.
//!
//! Nothing allocates after start.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::Offloads;
use super::bufring::BufRing;
use super::cmsg::{CTRL_LEN, Ctrl, gro_size};
use super::pool::BufPool;
use super::scatter::{Merger, Ready, Scatter};
use super::sockaddr;
use super::tun::TunQueue;
use crate::buf::{HEADROOM, PacketBuf, SLOT_LEN};
use crate::forwarder::{PacketCore, TunVerdict, UnderlayVerdict};
use crate::gso::{self, MAX_TRAIN_BYTES, MAX_TRAIN_SEGMENTS, Segmentation, VNET_HDR_LEN, VnetHdr};
use crate::route::{RouteTable, RouteTableHandle};
use crate::stats::{DropReason, OffloadCounter};

/// Without multishot: reads kept in flight on the TUN queue. Few, because every armed read
/// wakes on every packet.
const TUN_READS: usize = 4;
/// Without multishot: receives kept in flight on the UDP socket.
const UDP_RECVS: usize = 4;
/// Slots lent to each provided-buffer ring.
const RING_LEND: usize = 64;
/// Descriptors per provided-buffer ring (a power of two above `RING_LEND`).
const RING_ENTRIES: u16 = 128;
/// Buffer group of the TUN's multishot read.
const BGID_TUN: u16 = 0;
/// Buffer group of the socket's multishot receive.
const BGID_UDP: u16 = 1;
/// Name space in a multishot receive's buffer (fits a `sockaddr_in6`).
const RECV_NAME_LEN: usize = std::mem::size_of::<libc::sockaddr_in6>();
/// Control space in a multishot receive's buffer (one `UDP_GRO` cmsg).
const RECV_CTRL_LEN: usize = 32;
/// `struct io_uring_recvmsg_out`, in front of name, control and payload.
const RECVMSG_OUT_LEN: usize = 16;
/// Bytes a multishot receive writes before the payload, which thus lands at `HEADROOM`.
const RECV_PREFIX: usize = RECVMSG_OUT_LEN + RECV_NAME_LEN + RECV_CTRL_LEN;
/// Submission queue entries; completions get 16× that.
const SQ_ENTRIES: u32 = 256;
/// `user_data` of the stop-time cancellation (decodes to no op, so it is never counted).
const CANCEL_ALL: u64 = u64::MAX;
/// How long a stopping worker waits for cancelled requests to complete.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long one wait may last before the stop flag is checked again.
const TICK_NS: u32 = 100_000_000;
/// Under load (the last loop reaped at least this many completions) a wait asks for this
/// many completions, so one `io_uring_enter` carries a batch instead of one packet...
const BATCH_WANT: usize = 8;
/// ...but never waits longer than this for them (bounds the latency it adds).
const BATCH_WAIT_NS: u32 = 40_000;
/// Where a TUN read lands (and a TUN write starts) when every packet carries a virtio-net
/// header: the header just in front of the packet's usual place.
const VNET_AT: usize = HEADROOM - VNET_HDR_LEN;
/// Registered-file index of the TUN queue (every SQE names its file by index, so the
/// kernel skips the per-request file lookup and reference count).
const TUN_FILE: u32 = 0;
/// Registered-file index of the socket on the overlay port; the flow-hashed send sockets
/// follow from index 2.
const UDP_FILE: u32 = 1;

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[repr(u8)]
enum Op {
    TunRead = 1,
    UdpRecv = 2,
    UdpSend = 3,
    TunWrite = 4,
    /// A send carrying several segments (`UDP_SEGMENT`).
    UdpSendTrain = 5,
    /// A TUN write of a merged super-packet.
    TunWriteMerged = 6,
    /// The TUN's multishot read; the slot comes with each completion.
    TunReadMulti = 7,
    /// The socket's multishot receive; the slot comes with each completion.
    UdpRecvMulti = 8,
}

#[inline]
fn user_data(op: Op, slot: u16) -> u64 {
    (u64::from(op as u8) << 32) | u64::from(slot)
}

#[inline]
fn decode(ud: u64) -> Option<(Op, u16)> {
    let slot = u16::try_from(ud & 0xffff_ffff).ok()?;
    let op = match ud >> 32 {
        1 => Op::TunRead,
        2 => Op::UdpRecv,
        3 => Op::UdpSend,
        4 => Op::TunWrite,
        5 => Op::UdpSendTrain,
        6 => Op::TunWriteMerged,
        7 => Op::TunReadMulti,
        8 => Op::UdpRecvMulti,
        _ => return None,
    };
    Some((op, slot))
}

/// The msghdr, iovec, address and control buffer one slot's `RECVMSG`/`SENDMSG` points at.
/// They live in a boxed slice that never moves or resizes, so the kernel's pointers stay
/// valid.
struct MsgSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
    ctrl: Ctrl,
}

impl MsgSlot {
    /// The segment size of a received GRO train, from its `UDP_GRO` cmsg.
    fn gro_size(&self) -> Option<usize> {
        self.ctrl.gro_size(self.hdr.msg_controllen)
    }

    /// Writes a `UDP_SEGMENT` cmsg of `size` and points the msghdr at it.
    fn set_segment_size(&mut self, size: u16) {
        self.hdr.msg_controllen = self.ctrl.set_segment_size(size);
        self.hdr.msg_control = self.ctrl.0.as_mut_ptr().cast();
    }

    /// Points the msghdr at the zeroed control buffer for a receive.
    fn arm_ctrl_for_recv(&mut self) {
        self.ctrl.clear();
        self.hdr.msg_control = self.ctrl.0.as_mut_ptr().cast();
        self.hdr.msg_controllen = CTRL_LEN;
    }
}

/// Builds a ring with the flags that make batched waits cheap, falling back to a plain ring
/// on kernels that lack them.
pub(super) fn new_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .setup_cqsize(entries * 16)
        .build(entries)
        .or_else(|_| IoUring::builder().setup_cqsize(entries * 16).build(entries))
}

/// Whether this kernel lets us create a ring and run every opcode the worker needs.
///
/// # Errors
/// The reason io_uring cannot be used: setup refused (seccomp, `kernel.io_uring_disabled`,
/// an old kernel) or an opcode missing.
pub(super) fn probe() -> io::Result<()> {
    let ring = IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (name, code) in [
        ("READ_FIXED", opcode::ReadFixed::CODE),
        ("WRITE_FIXED", opcode::WriteFixed::CODE),
        ("WRITEV", opcode::Writev::CODE),
        ("RECVMSG", opcode::RecvMsg::CODE),
        ("SENDMSG", opcode::SendMsg::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, format!("io_uring lacks {name}")));
        }
    }
    Ok(())
}

/// The submission side of the ring for one run, counting what is in flight.
struct Queue<'a> {
    submitter: io_uring::Submitter<'a>,
    sq: io_uring::SubmissionQueue<'a>,
    /// SQEs submitted whose CQE has not been reaped yet (all kinds).
    inflight: usize,
}

impl Queue<'_> {
    /// Pushes one SQE, submitting first if the queue is full.
    fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every SQE we build points into the pool or `msgs`, both of which
            // outlive the ring, and names a slot that stays owned by the kernel until its CQE.
            if unsafe { self.sq.push(e) }.is_ok() {
                self.inflight += 1;
                return Ok(());
            }
            self.sq.sync();
            self.submitter.submit()?;
            self.sq.sync();
        }
    }
}

/// The multishot requests and the buffer rings they draw from.
struct Multishot {
    tun: BufRing,
    udp: BufRing,
    /// The receive's template: name and control lengths only. Boxed: the kernel reads it
    /// for as long as the request lives.
    tmpl: Box<libc::msghdr>,
    tun_armed: bool,
    udp_armed: bool,
    /// Whether any completion arrived yet: an `EINVAL` before that means the kernel
    /// does not support the request, and the worker falls back to armed reads.
    proven: bool,
}

impl Multishot {
    /// Sets up both buffer rings if the kernel has multishot reads (Linux ≥ 6.7); `None`
    /// otherwise, and the worker keeps a few single reads armed instead.
    fn new(submitter: &io_uring::Submitter<'_>, offloads: &Offloads) -> Option<Self> {
        let mut probe = io_uring::Probe::new();
        submitter.register_probe(&mut probe).ok()?;
        if !probe.is_supported(opcode::ReadMulti::CODE) {
            return None;
        }
        let read_at = if offloads.tun_vnet { VNET_AT } else { HEADROOM };
        let tun = BufRing::new(submitter, RING_ENTRIES, BGID_TUN, read_at).ok()?;
        let udp = BufRing::new(submitter, RING_ENTRIES, BGID_UDP, HEADROOM - RECV_PREFIX).ok()?;
        // SAFETY: all-zero is a valid msghdr.
        let mut tmpl: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        tmpl.msg_namelen = RECV_NAME_LEN as libc::socklen_t;
        // Always reserve the control space, GRO or not: the payload's place depends on it.
        tmpl.msg_controllen = RECV_CTRL_LEN;
        Some(Self { tun, udp, tmpl, tun_armed: false, udp_armed: false, proven: false })
    }
}

/// Packets read from the TUN one by one (small ones, no super-packet) for the same peer
/// and socket, laid back to back in the first packet's slot behind it, so one GSO send
/// carries them all: a flood of small datagrams costs one send per batch, not per packet.
#[derive(Clone, Copy, Debug)]
struct Train {
    slot: u16,
    head: usize,
    len: usize,
    /// The size of every packet but possibly the last (the GSO segment size).
    seg: usize,
    count: usize,
    to: SocketAddr,
    /// Registered-file index of the socket.
    file: u32,
    /// A shorter packet ends the train.
    open: bool,
}

/// Everything of a worker but the ring.
struct State<C: PacketCore> {
    msgs: Box<[MsgSlot]>,
    pool: BufPool,
    tun: TunQueue,
    /// Owned so its registered descriptor stays open.
    _udp: UdpSocket,
    /// Owned so their registered descriptors stay open.
    _send: Vec<UdpSocket>,
    /// How many flow-hashed send sockets follow `UDP_FILE` in the registered files.
    senders: u32,
    fwd: C,
    offloads: Offloads,
    tun_reads: usize,
    udp_recvs: usize,
    /// The super-packet being merged for the TUN.
    merger: Merger,
    /// Iovec lists of gathering sends and writes, per header slot.
    sc: Scatter,
    /// Equal-sized packets for one peer and socket, gathered into one GSO send.
    train: Option<Train>,
    /// Multishot reads and receives, when the kernel has them.
    multi: Option<Multishot>,
}

/// One io_uring worker. Field order is drop order: the ring goes before the memory its
/// requests point into.
pub(super) struct UringWorker<C: PacketCore> {
    ring: IoUring,
    st: State<C>,
    routes: RouteTableHandle,
    stop: Arc<AtomicBool>,
}

impl<C: PacketCore> UringWorker<C> {
    /// Sets up the ring and registers the pool. Must run on the worker's own thread
    /// (`SINGLE_ISSUER`).
    pub(super) fn new(
        io: super::WorkerIo,
        fwd: C,
        routes: RouteTableHandle,
        stop: Arc<AtomicBool>,
        pool: BufPool,
    ) -> io::Result<Self> {
        io.set_nonblocking(false)?;
        let super::WorkerIo { tun, udp, send, offloads } = io;
        let ring = new_ring(SQ_ENTRIES)?;
        let iovecs = pool.iovecs();
        // SAFETY: the iovecs describe the pool's mapping, which outlives the ring (field
        // order); the kernel pins those pages until the ring is closed.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        let msgs = (0..pool.len())
            .map(|_| {
                // SAFETY: msghdr, iovec, sockaddr_storage and the byte array are plain C
                // data for which all-zero is valid.
                unsafe { std::mem::zeroed::<MsgSlot>() }
            })
            .collect();
        let mut files = vec![tun.fd(), udp.as_raw_fd()];
        files.extend(send.iter().map(AsRawFd::as_raw_fd));
        ring.submitter().register_files(&files)?;
        let senders = u32::try_from(send.len()).unwrap_or(0);
        let multi = Multishot::new(&ring.submitter(), &offloads);
        let pool_len = pool.len();
        let st = State {
            msgs,
            pool,
            tun,
            _udp: udp,
            _send: send,
            senders,
            fwd,
            offloads,
            tun_reads: 0,
            udp_recvs: 0,
            merger: Merger::default(),
            sc: Scatter::new(pool_len),
            train: None,
            multi,
        };
        Ok(Self { ring, st, routes, stop })
    }

    /// Forwards until the stop flag is set.
    ///
    /// # Errors
    /// A failure of `io_uring_enter` itself (not of individual packets, which are counted).
    pub(super) fn run(self) -> io::Result<()> {
        let Self { mut ring, mut st, routes, stop } = self;
        let tick = types::Timespec::new().nsec(TICK_NS);
        let args = types::SubmitArgs::new().timespec(&tick);
        let short = types::Timespec::new().nsec(BATCH_WAIT_NS);
        let batch_args = types::SubmitArgs::new().timespec(&short);
        let mut reaped = 0;
        let (submitter, sq, mut cq) = ring.split();
        let mut q = Queue { submitter, sq, inflight: 0 };
        let result = (|| {
            while !stop.load(Ordering::Relaxed) {
                // 1. Re-arm reads and receives from free slots.
                st.arm(&mut q)?;
                q.sq.sync();
                // 2. One enter: submit and wait, for one completion when idle (no added
                //    latency) or for a batch under load (fewer enters per packet).
                let (want, wait) = if reaped >= BATCH_WANT { (BATCH_WANT, &batch_args) } else { (1, &args) };
                match q.submitter.submit_with_args(want, wait) {
                    Ok(_) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
                    Err(e) => return Err(e),
                }
                // 3. One table load and one clock read for the whole batch.
                let table = routes.load();
                let now = Instant::now();
                cq.sync();
                reaped = 0;
                let mut packets = 0;
                for cqe in &mut cq {
                    reaped += 1;
                    let Some((op, slot)) = decode(cqe.user_data()) else { continue };
                    packets +=
                        usize::from(matches!(op, Op::TunRead | Op::TunReadMulti | Op::UdpRecv | Op::UdpRecvMulti));
                    let flags = cqe.flags();
                    // A multishot request stays in flight while its completions say MORE.
                    if !cqueue::more(flags) {
                        q.inflight -= 1;
                    }
                    st.complete(&mut q, op, slot, cqe.result(), flags, &table, now)?;
                }
                st.fwd.stats().record_batch(packets);
                // 4. What was merged in this batch goes to the TUN now, what was gathered
                //    for a peer to the socket.
                st.flush(&mut q)?;
                st.send_train(&mut q)?;
            }
            Ok(())
        })();
        // Cancel what is still in flight and reap it, so the kernel drops its references to
        // the socket and the TUN now, not when it tears the ring down in the background: a
        // daemon restarted right away would otherwise find its port still bound.
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(CANCEL_ALL);
        let counted = q.inflight;
        q.push(&cancel)?;
        q.inflight = counted;
        q.sq.sync();
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while q.inflight > 0 && Instant::now() < deadline {
            match q.submitter.submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            cq.sync();
            for cqe in &mut cq {
                if let Some((op, slot)) = decode(cqe.user_data()) {
                    if !cqueue::more(cqe.flags()) {
                        q.inflight -= 1;
                    }
                    match (op, cqueue::buffer_select(cqe.flags())) {
                        (Op::TunReadMulti | Op::UdpRecvMulti, Some(bid)) => st.pool.release(bid),
                        (Op::TunReadMulti | Op::UdpRecvMulti, None) => {}
                        _ => {
                            st.sc.release(&mut st.pool, slot);
                            st.pool.release(slot);
                        }
                    }
                }
            }
        }
        // Drop the ring's references to the TUN and the sockets now, not in the kernel's
        // deferred ring teardown, so a restarted daemon can bind the port at once.
        if let Err(e) = q.submitter.unregister_files() {
            tracing::warn!(error = %e, "unregistering the worker's files failed");
        }
        result
    }
}

impl<C: PacketCore> State<C> {
    /// The registered file to send a packet of inner flow `flow` from: one of the send
    /// sockets by hash, else the overlay-port socket.
    fn sender(&self, flow: u32) -> u32 {
        match self.senders {
            0 => UDP_FILE,
            n => UDP_FILE + 1 + flow % n,
        }
    }

    /// Keeps the multishot requests armed and their rings stocked, or, without multishot,
    /// `TUN_READS` reads and `UDP_RECVS` receives in flight.
    fn arm(&mut self, q: &mut Queue<'_>) -> io::Result<()> {
        if let Some(ms) = &mut self.multi {
            for ring in [&mut ms.tun, &mut ms.udp] {
                let before = ring.lent;
                while ring.lent < RING_LEND {
                    let Some(slot) = self.pool.alloc() else { break };
                    ring.lend(&self.pool, slot);
                }
                if ring.lent != before {
                    ring.publish();
                }
            }
            if !ms.tun_armed && ms.tun.lent > 0 {
                let e = opcode::ReadMulti::new(types::Fixed(TUN_FILE), 0, ms.tun.bgid)
                    .build()
                    .user_data(user_data(Op::TunReadMulti, 0));
                q.push(&e)?;
                ms.tun_armed = true;
            }
            if !ms.udp_armed && ms.udp.lent > 0 {
                let e = opcode::RecvMsgMulti::new(types::Fixed(UDP_FILE), &*ms.tmpl, ms.udp.bgid)
                    .build()
                    .user_data(user_data(Op::UdpRecvMulti, 0));
                q.push(&e)?;
                ms.udp_armed = true;
            }
            return Ok(());
        }
        let read_at = if self.offloads.tun_vnet { VNET_AT } else { HEADROOM };
        while self.tun_reads < TUN_READS {
            let Some(slot) = self.pool.alloc() else { break };
            let entry = opcode::ReadFixed::new(
                types::Fixed(TUN_FILE),
                // SAFETY (pointer arithmetic): read_at < SLOT_LEN, inside the slot.
                unsafe { self.pool.slot_ptr(slot).add(read_at) },
                (SLOT_LEN - read_at) as u32,
                slot,
            )
            .build()
            .user_data(user_data(Op::TunRead, slot));
            q.push(&entry)?;
            self.tun_reads += 1;
        }
        while self.udp_recvs < UDP_RECVS {
            let Some(slot) = self.pool.alloc() else { break };
            let m = arm_msg(&mut self.msgs, &self.pool, slot, HEADROOM, SLOT_LEN - HEADROOM, None);
            if self.offloads.gro {
                if let Some(ms) = self.msgs.get_mut(usize::from(slot)) {
                    ms.arm_ctrl_for_recv();
                }
            }
            let entry = opcode::RecvMsg::new(types::Fixed(UDP_FILE), m).build().user_data(user_data(Op::UdpRecv, slot));
            q.push(&entry)?;
            self.udp_recvs += 1;
        }
        Ok(())
    }

    /// Handles one completion.
    #[allow(clippy::too_many_arguments)]
    fn complete(
        &mut self,
        q: &mut Queue<'_>,
        op: Op,
        slot: u16,
        res: i32,
        flags: u32,
        routes: &RouteTable,
        now: Instant,
    ) -> io::Result<()> {
        match op {
            Op::TunReadMulti | Op::UdpRecvMulti => {
                let Some(slot) = self.multishot_completed(op, res, flags)? else { return Ok(()) };
                let n = usize::try_from(res).unwrap_or(0);
                if op == Op::UdpRecvMulti {
                    return self.on_multishot_recv(q, slot, n, routes, now);
                }
                self.on_tun_read(q, slot, n, routes, now)
            }
            Op::TunRead => {
                self.tun_reads -= 1;
                let Ok(n) = usize::try_from(res) else {
                    self.pool.release(slot);
                    if super::is_transient(-res) {
                        return Ok(());
                    }
                    // The TUN is gone (deleted under us): stop rather than spin.
                    return Err(io::Error::from_raw_os_error(-res));
                };
                self.on_tun_read(q, slot, n, routes, now)
            }
            Op::UdpRecv => {
                self.udp_recvs -= 1;
                self.on_udp_recv(q, slot, res, routes, now)
            }
            Op::UdpSend | Op::TunWrite | Op::UdpSendTrain | Op::TunWriteMerged => {
                if res < 0 {
                    self.on_send_error(op, -res);
                }
                self.sc.release(&mut self.pool, slot);
                self.pool.release(slot);
                Ok(())
            }
        }
    }

    /// Bookkeeping of a multishot completion: notes when the request ended, takes back
    /// the slot it filled. `Some(slot)` when there is a packet to handle.
    ///
    /// # Errors
    /// The TUN is gone (the daemon stops rather than spin).
    fn multishot_completed(&mut self, op: Op, res: i32, flags: u32) -> io::Result<Option<u16>> {
        let Some(ms) = &mut self.multi else { return Ok(None) };
        let tun = op == Op::TunReadMulti;
        if !cqueue::more(flags) {
            // Ended (ring ran dry: ENOBUFS, or an error): re-armed next loop.
            if tun { ms.tun_armed = false } else { ms.udp_armed = false }
        }
        let bid = cqueue::buffer_select(flags);
        if bid.is_some() {
            let ring = if tun { &mut ms.tun } else { &mut ms.udp };
            ring.lent = ring.lent.saturating_sub(1);
        }
        if res >= 0 {
            ms.proven = true;
            return Ok(bid.or_else(|| {
                self.fwd.stats().count_drop(DropReason::IoError);
                None
            }));
        }
        if let Some(bid) = bid {
            self.pool.release(bid);
        }
        if res == -libc::EINVAL && !ms.proven {
            // The kernel does not take this request: fall back to armed single reads.
            tracing::warn!("multishot reads refused by the kernel; arming single reads instead");
            self.multi = None;
            return Ok(None);
        }
        if super::is_transient(-res) {
            return Ok(None);
        }
        if tun {
            // The TUN is gone (deleted under us): stop rather than spin.
            return Err(io::Error::from_raw_os_error(-res));
        }
        self.fwd.stats().count_drop(DropReason::IoError);
        Ok(None)
    }

    /// A multishot receive filled `n` bytes of `slot`: the `io_uring_recvmsg_out` header,
    /// the sender's address, control messages, then the datagram at `HEADROOM`.
    fn on_multishot_recv(
        &mut self,
        q: &mut Queue<'_>,
        slot: u16,
        n: usize,
        routes: &RouteTable,
        now: Instant,
    ) -> io::Result<()> {
        let Some(ms) = &self.multi else {
            self.pool.release(slot);
            return Ok(());
        };
        let at = ms.udp.offset();
        // SAFETY: the kernel filled the slot and handed it back with this completion.
        let buf = unsafe { self.pool.slot_mut(slot) };
        let base = buf.as_ptr() as usize;
        let parsed = buf.get(at..at + n).and_then(|b| types::RecvMsgOut::parse(b, &ms.tmpl).ok()).map(|out| {
            (
                sockaddr::from_bytes(out.name_data()),
                gro_size(out.control_data()),
                out.payload_data().len(),
                // Where the datagram landed: must be HEADROOM, which the layout guarantees.
                out.payload_data().as_ptr() as usize - base == HEADROOM && !out.is_payload_truncated(),
            )
        });
        match parsed {
            Some((Some(from), train, len, true)) => self.on_datagrams(q, slot, from, len, train, routes, now),
            _ => {
                self.fwd.stats().count_drop(DropReason::Truncated);
                self.pool.release(slot);
                Ok(())
            }
        }
    }

    /// A failed send or write: counted, and an offload the kernel refuses is switched off.
    fn on_send_error(&mut self, op: Op, errno: i32) {
        let reason = if errno == libc::EMSGSIZE { DropReason::Oversize } else { DropReason::IoError };
        self.fwd.stats().count_drop(reason);
        match op {
            Op::UdpSendTrain => super::train_refused(&mut self.offloads, &self.tun, self.fwd.stats(), errno),
            Op::TunWriteMerged => super::merged_write_refused(&mut self.offloads, self.fwd.stats(), errno),
            _ => {}
        }
    }

    /// A TUN read of `n` bytes into `slot` completed (single or multishot).
    fn on_tun_read(
        &mut self,
        q: &mut Queue<'_>,
        slot: u16,
        n: usize,
        routes: &RouteTable,
        now: Instant,
    ) -> io::Result<()> {
        if self.offloads.tun_vnet {
            return self.on_tun_read_vnet(q, slot, n, routes, now);
        }
        // SAFETY: the read completed, so the slot is ours again.
        let buf = unsafe { self.pool.slot_mut(slot) };
        let Some(mut pkt) = PacketBuf::new(buf, HEADROOM, n) else {
            self.pool.release(slot);
            return Ok(());
        };
        let verdict = self.fwd.from_tun(routes, &mut pkt, now);
        let (head, len) = (pkt.head(), pkt.len());
        self.on_tun_verdict(q, slot, verdict, head, len, routes)
    }

    /// A TUN read with a virtio-net header in front: completes a partial checksum or hands
    /// a super-packet to the core whole.
    fn on_tun_read_vnet(
        &mut self,
        q: &mut Queue<'_>,
        slot: u16,
        n: usize,
        routes: &RouteTable,
        now: Instant,
    ) -> io::Result<()> {
        // SAFETY: the read completed, so the slot is ours again.
        let buf = unsafe { self.pool.slot_mut(slot) };
        let (Some(hdr), Some(len)) = (buf.get(VNET_AT..).and_then(VnetHdr::parse), n.checked_sub(VNET_HDR_LEN)) else {
            self.fwd.stats().count_drop(DropReason::BadOffload);
            self.pool.release(slot);
            return Ok(());
        };
        let Some(mut pkt) = PacketBuf::new(buf, HEADROOM, len) else {
            self.pool.release(slot);
            return Ok(());
        };
        let seg = match gso::check_read(&hdr, pkt.as_mut_slice()) {
            Ok(Some(seg)) => seg,
            Ok(None) => {
                let verdict = self.fwd.from_tun(routes, &mut pkt, now);
                let (head, len) = (pkt.head(), pkt.len());
                return self.on_tun_verdict(q, slot, verdict, head, len, routes);
            }
            Err(e) => {
                self.fwd.stats().count_drop(e.reason());
                self.pool.release(slot);
                return Ok(());
            }
        };
        self.fwd.stats().count_offload(OffloadCounter::SuperPacketsRead, 1);
        let before = pkt.len();
        let verdict = self.fwd.from_tun_segmented(routes, &mut pkt, &seg, now);
        let (head, len) = (pkt.head(), pkt.len());
        match verdict {
            TunVerdict::Send { to, flow, .. } => {
                self.send_train(q)?;
                self.send_segmented(q, slot, head, len, len - before, &seg, to, flow)
            }
            other => self.on_tun_verdict(q, slot, other, head, len, routes),
        }
    }

    /// Cuts the encapsulated super-packet at `head..head + len` of `slot` (`prefix` bytes of
    /// encapsulation header, then the IP packet) into trains in fresh slots and queues one
    /// send per train; releases `slot`.
    #[allow(clippy::too_many_arguments)]
    fn send_segmented(
        &mut self,
        q: &mut Queue<'_>,
        slot: u16,
        head: usize,
        len: usize,
        prefix: usize,
        seg: &Segmentation,
        to: SocketAddr,
        flow: u32,
    ) -> io::Result<()> {
        let file = self.sender(flow);
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
            // SAFETY: `slot` completed its read and `out` was just allocated: both are ours.
            let Some((src, dst)) = (unsafe { self.pool.pair_mut(slot, out) }) else {
                self.pool.release(out);
                break;
            };
            let cut = src
                .get(head..head + len)
                .map(|pkt| seg.write_segments_with_room(pkt, prefix, room, range.clone(), dst));
            let Some(Ok(bytes)) = cut else {
                self.fwd.stats().count_drop(DropReason::BadOffload);
                self.pool.release(out);
                break;
            };
            if !dst.get_mut(..bytes).is_some_and(|train| self.fwd.seal_train(train, stride)) {
                self.pool.release(out);
                break;
            }
            let segment = (range.len() > 1).then_some(stride as u16);
            self.send(q, out, 0, bytes, to, file, segment)?;
        }
        self.pool.release(slot);
        Ok(())
    }

    /// Performs what the core decided for a packet at `head..head + len` of `slot`.
    fn on_tun_verdict(
        &mut self,
        q: &mut Queue<'_>,
        slot: u16,
        verdict: TunVerdict,
        head: usize,
        len: usize,
        routes: &RouteTable,
    ) -> io::Result<()> {
        match verdict {
            TunVerdict::Send { to, flow, .. } => {
                let file = self.sender(flow);
                if self.offloads.gso {
                    return self.gather(q, slot, head, len, to, file);
                }
                self.send(q, slot, head, len, to, file, None)
            }
            TunVerdict::Reply => self.write_tun(q, slot, head, len),
            TunVerdict::Flood => {
                let mut peers = routes.peers().iter();
                let Some(first) = peers.next() else {
                    self.pool.release(slot);
                    return Ok(());
                };
                // Copies for all peers but the first, which gets the original.
                for p in peers {
                    let Some(copy) = self.pool.clone_slot(slot, head, len) else {
                        self.fwd.stats().count_drop(DropReason::PoolExhausted);
                        break;
                    };
                    self.send(q, copy, head, len, p.endpoint, UDP_FILE, None)?;
                }
                self.send(q, slot, head, len, first.endpoint, UDP_FILE, None)
            }
            TunVerdict::Drop(_) => {
                self.pool.release(slot);
                Ok(())
            }
        }
    }

    /// Writes the single packet at `head..head + len` of `slot` to the TUN, behind an
    /// all-zero virtio-net header when the TUN expects one (there is always room: the
    /// packet starts at least `HEADROOM` − 48 bytes in).
    fn write_tun(&mut self, q: &mut Queue<'_>, slot: u16, head: usize, len: usize) -> io::Result<()> {
        let (mut head, mut len) = (head, len);
        if self.offloads.tun_vnet {
            // SAFETY: the slot is ours (its read or receive completed, nothing in flight).
            let buf = unsafe { self.pool.slot_mut(slot) };
            let Some(h) = head.checked_sub(VNET_HDR_LEN).and_then(|at| buf.get_mut(at..head)) else {
                self.pool.release(slot);
                return Ok(());
            };
            VnetHdr::default().emit(h);
            (head, len) = (head - VNET_HDR_LEN, len + VNET_HDR_LEN);
        }
        q.push(&tun_write(&self.pool, slot, head, len, Op::TunWrite))
    }

    /// A receive completed: checks every datagram of it (one, or a GRO train) and delivers,
    /// answers or drops each; releases `slot` unless it was sent on.
    fn on_udp_recv(
        &mut self,
        q: &mut Queue<'_>,
        slot: u16,
        res: i32,
        routes: &RouteTable,
        now: Instant,
    ) -> io::Result<()> {
        let msg = self.msgs.get(usize::from(slot));
        let from = msg.and_then(|m| sockaddr::read(&m.addr));
        let train = if self.offloads.gro { msg.and_then(MsgSlot::gro_size) } else { None };
        let (Ok(n), Some(from)) = (usize::try_from(res), from) else {
            // A source address that does not read as IPv4/IPv6 is no known peer's.
            self.fwd.stats().count_drop(if res < 0 { DropReason::IoError } else { DropReason::UnknownSender });
            self.pool.release(slot);
            return Ok(());
        };
        self.on_datagrams(q, slot, from, n, train, routes, now)
    }

    /// `n` bytes from `from` at `HEADROOM` of `slot`: one datagram, or a GRO train of
    /// `train`-byte datagrams. Checks each, then delivers, answers or drops it; releases
    /// `slot` unless it was sent on.
    #[allow(clippy::too_many_arguments)]
    fn on_datagrams(
        &mut self,
        q: &mut Queue<'_>,
        slot: u16,
        from: SocketAddr,
        n: usize,
        train: Option<usize>,
        routes: &RouteTable,
        now: Instant,
    ) -> io::Result<()> {
        if !self.offloads.tun_vnet {
            // One datagram, decapsulated and written in place.
            // SAFETY: the receive completed, so the slot is ours again.
            let buf = unsafe { self.pool.slot_mut(slot) };
            let Some(mut pkt) = PacketBuf::new(buf, HEADROOM, n) else {
                self.fwd.stats().count_drop(DropReason::Truncated);
                self.pool.release(slot);
                return Ok(());
            };
            let verdict = self.fwd.from_underlay(routes, from, &mut pkt, now);
            if let UnderlayVerdict::Deliver { .. } = verdict {
                // No virtio-net header to say "partial": complete it here.
                self.fwd.complete_partial(pkt.as_mut_slice());
            }
            let (head, len) = (pkt.head(), pkt.len());
            return match verdict {
                UnderlayVerdict::Deliver { .. } => self.write_tun(q, slot, head, len),
                UnderlayVerdict::Reply { to } => self.send(q, slot, head, len, to, UDP_FILE, None),
                UnderlayVerdict::Drop(_) | UnderlayVerdict::Consumed => {
                    self.pool.release(slot);
                    Ok(())
                }
            };
        }
        // Each datagram is checked within its own bytes (`check_datagram`); what passes
        // joins the merge by reference.
        if train.is_some() {
            self.fwd.stats().count_offload(OffloadCounter::GroTrains, 1);
        }
        for d in super::datagrams(n, train) {
            // SAFETY: the receive completed, so the slot is ours again.
            let checked = unsafe { super::check_datagram(&mut self.pool, &mut self.fwd, routes, from, slot, d, now) };
            let Some((verdict, head, len)) = checked else { break };
            match verdict {
                UnderlayVerdict::Deliver { .. } => self.merge(q, slot, head, len)?,
                UnderlayVerdict::Reply { to } => {
                    let Some(copy) = self.pool.clone_slot(slot, head, len) else {
                        self.fwd.stats().count_drop(DropReason::PoolExhausted);
                        continue;
                    };
                    self.send(q, copy, head, len, to, UDP_FILE, None)?;
                }
                UnderlayVerdict::Drop(_) | UnderlayVerdict::Consumed => {}
            }
        }
        self.pool.release(slot);
        Ok(())
    }

    /// Adds the checked inner packet at `head..head + len` of `slot` to the super-packet
    /// being merged, or writes that one out and starts another.
    fn merge(&mut self, q: &mut Queue<'_>, slot: u16, head: usize, len: usize) -> io::Result<()> {
        let uso = self.offloads.tun_uso && self.offloads.coalesce;
        if let Some(r) = self.merger.add(&mut self.pool, &mut self.sc, self.fwd.stats(), slot, head, len, uso) {
            self.write_merged(q, r)?;
        }
        if !self.offloads.coalesce {
            self.flush(q)?;
        }
        Ok(())
    }

    /// Adds the encapsulated packet at `head..head + len` of `slot` to the train for `to` on
    /// `fd`, or sends that train and starts another with it.
    fn gather(
        &mut self,
        q: &mut Queue<'_>,
        slot: u16,
        head: usize,
        len: usize,
        to: SocketAddr,
        file: u32,
    ) -> io::Result<()> {
        if let Some(t) = &mut self.train {
            let fits = t.open
                && t.to == to
                && t.file == file
                && len <= t.seg
                && t.len + len <= MAX_TRAIN_BYTES
                && t.count < MAX_TRAIN_SEGMENTS;
            if fits {
                let at = t.head + t.len;
                // SAFETY: both slots are ours (read completed, nothing in flight on them).
                if let Some((src, dst)) = unsafe { self.pool.pair_mut(slot, t.slot) } {
                    if let (Some(from), Some(into)) = (src.get(head..head + len), dst.get_mut(at..at + len)) {
                        into.copy_from_slice(from);
                        t.len += len;
                        t.count += 1;
                        t.open = len == t.seg;
                        self.pool.release(slot);
                        return Ok(());
                    }
                }
            }
        }
        self.send_train(q)?;
        self.train = Some(Train { slot, head, len, seg: len, count: 1, to, file, open: true });
        Ok(())
    }

    /// Sends the gathered train, if any: one datagram, or one GSO send.
    fn send_train(&mut self, q: &mut Queue<'_>) -> io::Result<()> {
        let Some(t) = self.train.take() else { return Ok(()) };
        let segment = (t.count > 1).then_some(t.seg as u16);
        self.send(q, t.slot, t.head, t.len, t.to, t.file, segment)
    }

    /// Queues a `SENDMSG` of `head..head + len` of `slot` to `to` from registered socket
    /// `file`: one datagram, or with `segment` a GSO train of datagrams of that size (the
    /// last may be shorter).
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        q: &mut Queue<'_>,
        slot: u16,
        head: usize,
        len: usize,
        to: SocketAddr,
        file: u32,
        segment: Option<u16>,
    ) -> io::Result<()> {
        let m = arm_msg(&mut self.msgs, &self.pool, slot, head, len, Some(to));
        let op = match (segment, self.msgs.get_mut(usize::from(slot))) {
            (Some(size), Some(ms)) => {
                ms.set_segment_size(size);
                self.fwd.stats().count_train(len.div_ceil(usize::from(size).max(1)));
                Op::UdpSendTrain
            }
            _ => Op::UdpSend,
        };
        q.push(&opcode::SendMsg::new(types::Fixed(file), m).build().user_data(user_data(op, slot)))
    }

    /// Writes the super-packet being merged, if any, to the TUN.
    fn flush(&mut self, q: &mut Queue<'_>) -> io::Result<()> {
        match self.merger.finish(&mut self.pool, &mut self.sc) {
            Some(r) => self.write_merged(q, r),
            None => Ok(()),
        }
    }

    /// Queues the gathering TUN write of a finished merge.
    fn write_merged(&mut self, q: &mut Queue<'_>, r: Ready) -> io::Result<()> {
        if r.partials > 0 {
            self.fwd.stats().count_offload(OffloadCounter::CsumCompleted, r.partials as u64);
        }
        let op = if r.segments > 1 {
            self.fwd.stats().count_merged(r.segments);
            Op::TunWriteMerged
        } else {
            Op::TunWrite
        };
        let (iov, n) = self.sc.iovecs(r.out);
        q.push(&opcode::Writev::new(types::Fixed(TUN_FILE), iov, n as u32).build().user_data(user_data(op, r.out)))
    }
}

/// Points slot `slot`'s msghdr at `len` bytes from `head` in its buffer and, for a send,
/// at the destination address; returns the msghdr for the SQE.
fn arm_msg(
    msgs: &mut [MsgSlot],
    pool: &BufPool,
    slot: u16,
    head: usize,
    len: usize,
    to: Option<SocketAddr>,
) -> *mut libc::msghdr {
    let Some(m) = msgs.get_mut(usize::from(slot)) else { return std::ptr::null_mut() };
    // SAFETY (pointer arithmetic): head + len ≤ SLOT_LEN, inside the slot.
    m.iov = libc::iovec { iov_base: unsafe { pool.slot_ptr(slot).add(head) }.cast(), iov_len: len };
    let namelen = match to {
        Some(a) => sockaddr::write(a, &mut m.addr),
        None => std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
    };
    m.hdr.msg_name = (&mut m.addr as *mut libc::sockaddr_storage).cast();
    m.hdr.msg_namelen = namelen;
    m.hdr.msg_iov = &mut m.iov;
    m.hdr.msg_iovlen = 1;
    m.hdr.msg_control = std::ptr::null_mut();
    m.hdr.msg_controllen = 0;
    m.hdr.msg_flags = 0;
    &mut m.hdr
}

fn tun_write(pool: &BufPool, slot: u16, head: usize, len: usize, op: Op) -> squeue::Entry {
    // SAFETY (pointer arithmetic): head + len ≤ SLOT_LEN, inside registered buffer `slot`.
    let ptr = unsafe { pool.slot_ptr(slot).add(head) };
    opcode::WriteFixed::new(types::Fixed(TUN_FILE), ptr, len as u32, slot).build().user_data(user_data(op, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for op in [Op::TunRead, Op::UdpRecv, Op::UdpSend, Op::TunWrite, Op::UdpSendTrain, Op::TunWriteMerged] {
            assert_eq!(decode(user_data(op, 511)), Some((op, 511)));
        }
        assert_eq!(decode(0), None);
        assert_eq!(decode(9 << 32), None);
    }
}
