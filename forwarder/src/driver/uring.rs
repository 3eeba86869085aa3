//! The io_uring worker: TUN reads, UDP receives, UDP sends and TUN writes are all SQEs on
//! one ring per worker, submitted in batches, over buffers registered once.
//!
//! 1. Keep one multishot read on the TUN queue (`READ_MULTISHOT`, Linux ≥ 6.7) and one
//!    multishot `RECVMSG` on the socket in flight, each drawing pool slots from its own
//!    provided-buffer ring, topped up once per loop. (Older kernels: a few `READ_FIXED`s
//!    and `RECVMSG`s in flight, each naming its own slot.)
//! 2. Enter the kernel once per loop: submit everything queued and wait for at least one
//!    completion (or a 100 ms tick to notice the stop flag).
//! 3. Load the route table once, read the clock once, then hand every completion to the
//!    shared dispatch (`dispatch.rs`), which runs the sans-IO core and asks, through
//!    `UringIo`, for a `SENDMSG` or a TUN write for packets that go on.
//! 4. A send or write completion goes back to the dispatch, which returns its slot to the
//!    pool (or switches off an offload the kernel refused); the next loop re-arms reads.
//!
//! With offloads (TUN TSO/USO, UDP GSO/GRO) the same loop moves 64 KiB per request: a TUN
//! read returns a super-packet that leaves as trains of `UDP_SEGMENT` sends, and a `UDP_GRO`
//! receive returns a train whose checked segments are merged into one `WRITEV`; the
//! dispatch decides all of it, identically for both backends.
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
use super::dispatch::{Datagram, Dispatch, Done, Io, Out, Received, Span, VNET_AT};
use super::pool::BufPool;
use super::sockaddr;
use super::tun::TunQueue;
use crate::buf::{HEADROOM, SLOT_LEN};
use crate::forwarder::PacketCore;
use crate::route::{RouteTable, RouteTableHandle};
use crate::stats::DropReason;

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

/// One reaped completion: the request it ends, its slot, and the kernel's result and flags.
#[derive(Clone, Copy, Debug)]
struct Completion {
    op: Op,
    slot: u16,
    res: i32,
    flags: u32,
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

/// The descriptors and message headers requests point at.
struct Ports {
    /// Per slot: the msghdr its `RECVMSG`/`SENDMSG` points at.
    msgs: Box<[MsgSlot]>,
    tun: TunQueue,
    /// Owned so its registered descriptor stays open.
    _udp: UdpSocket,
    /// Owned so their registered descriptors stay open.
    _send: Vec<UdpSocket>,
    /// How many flow-hashed send sockets follow `UDP_FILE` in the registered files.
    senders: u32,
}

/// The [`Io`] of this backend for one step of the loop: requests become SQEs, submitted
/// with the loop's next enter; their completions come back as CQEs.
struct UringIo<'a, 'r> {
    q: &'a mut Queue<'r>,
    ports: &'a mut Ports,
}

impl Io for UringIo<'_, '_> {
    fn flow_sockets(&self) -> u32 {
        self.ports.senders
    }

    fn send(&mut self, pool: &BufPool, span: Span, d: Datagram) -> io::Result<()> {
        let Datagram { to, from, segment } = d;
        let msgs = &mut self.ports.msgs;
        let m = arm_msg(msgs, pool, span, Some(to));
        let op = match (segment, msgs.get_mut(usize::from(span.slot))) {
            (Some(size), Some(ms)) => {
                ms.set_segment_size(size);
                Op::UdpSendTrain
            }
            _ => Op::UdpSend,
        };
        let file = UDP_FILE + from.0.min(self.ports.senders);
        self.q.push(&opcode::SendMsg::new(types::Fixed(file), m).build().user_data(user_data(op, span.slot)))
    }

    fn write_tun(&mut self, pool: &BufPool, span: Span) -> io::Result<()> {
        // SAFETY (pointer arithmetic): the span lies inside registered buffer `span.slot`.
        let ptr = unsafe { pool.slot_ptr(span.slot).add(span.head) };
        let e = opcode::WriteFixed::new(types::Fixed(TUN_FILE), ptr, span.len as u32, span.slot)
            .build()
            .user_data(user_data(Op::TunWrite, span.slot));
        self.q.push(&e)
    }

    fn write_tun_gather(&mut self, out: u16, iov: *mut libc::iovec, n: usize, merged: bool) -> io::Result<()> {
        let op = if merged { Op::TunWriteMerged } else { Op::TunWrite };
        self.q.push(&opcode::Writev::new(types::Fixed(TUN_FILE), iov, n as u32).build().user_data(user_data(op, out)))
    }

    fn clear_tun_offloads(&mut self) -> io::Result<()> {
        self.ports.tun.clear_offloads()
    }

    fn submit(&mut self) -> io::Result<()> {
        // The loop's next enter submits.
        Ok(())
    }

    fn take_done(&mut self) -> Option<Done> {
        None
    }
}

/// Everything of a worker but the ring.
struct State<C: PacketCore> {
    d: Dispatch<C>,
    ports: Ports,
    tun_reads: usize,
    udp_recvs: usize,
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
        let ports = Ports { msgs, tun, _udp: udp, _send: send, senders };
        let st = State { d: Dispatch::new(pool, fwd, offloads), ports, tun_reads: 0, udp_recvs: 0, multi };
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
                    st.complete(&mut q, Completion { op, slot, res: cqe.result(), flags }, &table, now)?;
                }
                st.d.fwd.stats().record_batch(packets);
                // 4. What was merged in this batch goes to the TUN now, what was gathered
                //    for a peer to the socket.
                st.d.end_batch(&mut UringIo { q: &mut q, ports: &mut st.ports })?;
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
                        (Op::TunReadMulti | Op::UdpRecvMulti, Some(bid)) => st.d.pool.release(bid),
                        (Op::TunReadMulti | Op::UdpRecvMulti, None) => {}
                        _ => st.d.release_request(slot),
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

/// What a multishot completion means, decided from its result alone so that every branch
/// (the fallback above all) is unit-tested without a ring.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum MultishotEvent {
    /// A packet in the slot the completion names.
    Packet(u16),
    /// A packet but no slot named: counted as an I/O error.
    NoBuffer,
    /// `EINVAL` before any completion: the kernel does not take the request; arm single
    /// reads instead.
    Unsupported,
    /// A transient error (`ENOBUFS` when the ring ran dry, …): re-armed next loop.
    Transient,
    /// The TUN is gone (`errno`): stop rather than spin.
    TunGone(i32),
    /// A receive failed otherwise: counted.
    Failed,
}

impl MultishotEvent {
    /// Classifies a completion of the TUN's (`tun`) or the socket's multishot request with
    /// result `res` and buffer `bid`, given whether any completion arrived before (`proven`).
    fn of(tun: bool, res: i32, bid: Option<u16>, proven: bool) -> Self {
        match (res >= 0, bid) {
            (true, Some(bid)) => Self::Packet(bid),
            (true, None) => Self::NoBuffer,
            _ if res == -libc::EINVAL && !proven => Self::Unsupported,
            _ if super::is_transient(-res) => Self::Transient,
            _ if tun => Self::TunGone(-res),
            _ => Self::Failed,
        }
    }
}

impl<C: PacketCore> State<C> {
    /// Keeps the multishot requests armed and their rings stocked, or, without multishot,
    /// `TUN_READS` reads and `UDP_RECVS` receives in flight.
    fn arm(&mut self, q: &mut Queue<'_>) -> io::Result<()> {
        let read_at = self.d.tun_read_at();
        let pool = &mut self.d.pool;
        if let Some(ms) = &mut self.multi {
            for ring in [&mut ms.tun, &mut ms.udp] {
                let before = ring.lent;
                while ring.lent < RING_LEND {
                    let Some(slot) = pool.alloc() else { break };
                    ring.lend(pool, slot);
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
        while self.tun_reads < TUN_READS {
            let Some(slot) = pool.alloc() else { break };
            let entry = opcode::ReadFixed::new(
                types::Fixed(TUN_FILE),
                // SAFETY (pointer arithmetic): read_at < SLOT_LEN, inside the slot.
                unsafe { pool.slot_ptr(slot).add(read_at) },
                (SLOT_LEN - read_at) as u32,
                slot,
            )
            .build()
            .user_data(user_data(Op::TunRead, slot));
            q.push(&entry)?;
            self.tun_reads += 1;
        }
        while self.udp_recvs < UDP_RECVS {
            let Some(slot) = pool.alloc() else { break };
            let msgs = &mut self.ports.msgs;
            let m = arm_msg(msgs, pool, Span::new(slot, HEADROOM, SLOT_LEN - HEADROOM), None);
            if self.d.offloads.gro {
                if let Some(ms) = msgs.get_mut(usize::from(slot)) {
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
    fn complete(&mut self, q: &mut Queue<'_>, c: Completion, routes: &RouteTable, now: Instant) -> io::Result<()> {
        let Completion { op, slot, res, flags } = c;
        let out = match op {
            Op::TunReadMulti | Op::UdpRecvMulti => {
                let Some(slot) = self.multishot_completed(op, res, flags)? else { return Ok(()) };
                let n = usize::try_from(res).unwrap_or(0);
                if op == Op::UdpRecvMulti {
                    return self.on_multishot_recv(q, slot, n, routes, now);
                }
                let mut io = UringIo { q, ports: &mut self.ports };
                return self.d.on_tun_read(&mut io, slot, n, routes, now);
            }
            Op::TunRead => {
                self.tun_reads -= 1;
                let Ok(n) = usize::try_from(res) else {
                    self.d.pool.release(slot);
                    if super::is_transient(-res) {
                        return Ok(());
                    }
                    // The TUN is gone (deleted under us): stop rather than spin.
                    return Err(io::Error::from_raw_os_error(-res));
                };
                let mut io = UringIo { q, ports: &mut self.ports };
                return self.d.on_tun_read(&mut io, slot, n, routes, now);
            }
            Op::UdpRecv => {
                self.udp_recvs -= 1;
                return self.on_udp_recv(q, slot, res, routes, now);
            }
            Op::UdpSend => Out::Send,
            Op::UdpSendTrain => Out::SendTrain,
            Op::TunWrite => Out::TunWrite,
            Op::TunWriteMerged => Out::TunWriteMerged,
        };
        self.d.complete(&mut UringIo { q, ports: &mut self.ports }, Done { out, slot, res });
        Ok(())
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
        let event = MultishotEvent::of(tun, res, bid, ms.proven);
        if res >= 0 {
            ms.proven = true;
        } else if let Some(bid) = bid {
            self.d.pool.release(bid);
        }
        match event {
            MultishotEvent::Packet(bid) => return Ok(Some(bid)),
            MultishotEvent::Unsupported => {
                tracing::warn!("multishot reads refused by the kernel; arming single reads instead");
                self.multi = None;
            }
            MultishotEvent::NoBuffer | MultishotEvent::Failed => self.d.fwd.stats().count_drop(DropReason::IoError),
            MultishotEvent::Transient => {}
            MultishotEvent::TunGone(errno) => return Err(io::Error::from_raw_os_error(errno)),
        }
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
            self.d.pool.release(slot);
            return Ok(());
        };
        let at = ms.udp.offset();
        // SAFETY: the kernel filled the slot and handed it back with this completion.
        let buf = unsafe { self.d.pool.slot_mut(slot) };
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
            Some((Some(from), train, len, true)) => {
                let train = if self.d.offloads.gro { train } else { None };
                let mut io = UringIo { q, ports: &mut self.ports };
                self.d.on_datagrams(&mut io, Received { slot, from, len, train }, routes, now)
            }
            _ => {
                self.d.fwd.stats().count_drop(DropReason::Truncated);
                self.d.pool.release(slot);
                Ok(())
            }
        }
    }

    /// A single receive completed into `slot`.
    fn on_udp_recv(
        &mut self,
        q: &mut Queue<'_>,
        slot: u16,
        res: i32,
        routes: &RouteTable,
        now: Instant,
    ) -> io::Result<()> {
        let msg = self.ports.msgs.get(usize::from(slot));
        let from = msg.and_then(|m| sockaddr::read(&m.addr));
        let train = if self.d.offloads.gro { msg.and_then(MsgSlot::gro_size) } else { None };
        let (Ok(n), Some(from)) = (usize::try_from(res), from) else {
            // A source address that does not read as IPv4/IPv6 is no known peer's.
            self.d.fwd.stats().count_drop(if res < 0 { DropReason::IoError } else { DropReason::UnknownSender });
            self.d.pool.release(slot);
            return Ok(());
        };
        let mut io = UringIo { q, ports: &mut self.ports };
        self.d.on_datagrams(&mut io, Received { slot, from, len: n, train }, routes, now)
    }
}

/// Points `span.slot`'s msghdr at `span` and, for a send, at the destination address;
/// returns the msghdr for the SQE.
fn arm_msg(msgs: &mut [MsgSlot], pool: &BufPool, span: Span, to: Option<SocketAddr>) -> *mut libc::msghdr {
    let Some(m) = msgs.get_mut(usize::from(span.slot)) else { return std::ptr::null_mut() };
    // SAFETY (pointer arithmetic): the span lies inside the slot.
    m.iov = libc::iovec { iov_base: unsafe { pool.slot_ptr(span.slot).add(span.head) }.cast(), iov_len: span.len };
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

    /// Every branch of a multishot completion, the fallback to single reads above all: only
    /// an `EINVAL` before anything arrived means the kernel lacks the request.
    #[test]
    fn multishot_completions_are_classified_by_result_alone() {
        use MultishotEvent as E;
        assert_eq!(E::of(true, 1500, Some(7), false), E::Packet(7));
        assert_eq!(E::of(false, 0, Some(7), true), E::Packet(7), "an empty datagram is a packet");
        assert_eq!(E::of(false, 1500, None, true), E::NoBuffer);
        assert_eq!(E::of(true, -libc::EINVAL, None, false), E::Unsupported);
        assert_eq!(E::of(false, -libc::EINVAL, None, false), E::Unsupported);
        assert_eq!(E::of(false, -libc::EINVAL, None, true), E::Failed, "after a completion EINVAL is an error");
        assert_eq!(E::of(true, -libc::EINVAL, None, true), E::TunGone(libc::EINVAL));
        assert_eq!(E::of(true, -libc::ENOBUFS, None, true), E::Transient, "the ring ran dry");
        assert_eq!(E::of(false, -libc::ECANCELED, None, true), E::Transient);
        assert_eq!(E::of(true, -libc::EBADFD, None, true), E::TunGone(libc::EBADFD));
        assert_eq!(E::of(false, -libc::ECONNREFUSED, Some(3), true), E::Failed);
    }
}
