//! The io_uring worker: TUN reads, UDP receives, UDP sends and TUN writes are all SQEs on
//! one ring per worker, submitted in batches, over buffers registered once.
//!
//! 1. Keep `TUN_READS` `READ_FIXED`s on the TUN queue and `UDP_RECVS` `RECVMSG`s on the
//!    socket in flight, each naming its own pool slot.
//! 2. Enter the kernel once per loop: submit everything queued and wait for at least one
//!    completion (or a 100 ms tick to notice the stop flag).
//! 3. Load the route table once, read the clock once, then run every completion through the
//!    sans-IO core, queueing a `SENDMSG` or a `WRITE_FIXED` for packets that go on.
//! 4. A send or write completion returns its slot to the pool; the next loop re-arms reads.
//!
//! Under load one `io_uring_enter` carries dozens of packets each way, so the cost is far
//! below one syscall per packet, and nothing allocates after start.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use io_uring::{IoUring, opcode, squeue, types};

use super::pool::BufPool;
use super::sockaddr;
use super::tun::TunQueue;
use crate::buf::{HEADROOM, PacketBuf, SLOT_LEN};
use crate::forwarder::{PacketCore, TunVerdict, UnderlayVerdict};
use crate::route::RouteTableHandle;
use crate::stats::DropReason;

/// Reads kept in flight on the TUN queue.
const TUN_READS: usize = 64;
/// Receives kept in flight on the UDP socket.
const UDP_RECVS: usize = 64;
/// Submission queue entries; completions get 16× that.
const SQ_ENTRIES: u32 = 256;
/// `user_data` of the stop-time cancellation (decodes to no op, so it is never counted).
const CANCEL_ALL: u64 = u64::MAX;
/// How long a stopping worker waits for cancelled requests to complete.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long one wait may last before the stop flag is checked again.
const TICK_NS: u32 = 100_000_000;

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[repr(u8)]
enum Op {
    TunRead = 1,
    UdpRecv = 2,
    UdpSend = 3,
    TunWrite = 4,
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
        _ => return None,
    };
    Some((op, slot))
}

/// The msghdr, iovec and address one slot's `RECVMSG`/`SENDMSG` points at. They live in a
/// boxed slice that never moves or resizes, so the kernel's pointers stay valid.
struct MsgSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
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
        ("RECVMSG", opcode::RecvMsg::CODE),
        ("SENDMSG", opcode::SendMsg::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, format!("io_uring lacks {name}")));
        }
    }
    Ok(())
}

/// One io_uring worker. Field order is drop order: the ring goes before the memory its
/// requests point into.
pub(super) struct UringWorker<C: PacketCore> {
    ring: IoUring,
    msgs: Box<[MsgSlot]>,
    pool: BufPool,
    tun: TunQueue,
    udp: UdpSocket,
    send: Vec<UdpSocket>,
    fwd: C,
    routes: RouteTableHandle,
    stop: Arc<AtomicBool>,
    tun_reads: usize,
    udp_recvs: usize,
    /// SQEs submitted whose CQE has not been reaped yet (all kinds).
    inflight: usize,
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
        let super::WorkerIo { tun, udp, send } = io;
        let ring = new_ring(SQ_ENTRIES)?;
        let iovecs = pool.iovecs();
        // SAFETY: the iovecs describe the pool's mapping, which outlives the ring (field
        // order); the kernel pins those pages until the ring is closed.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        let msgs = (0..pool.len())
            .map(|_| {
                // SAFETY: msghdr, iovec and sockaddr_storage are plain C structs for which
                // all-zero is valid.
                unsafe { std::mem::zeroed::<MsgSlot>() }
            })
            .collect();
        Ok(Self { ring, msgs, pool, tun, udp, send, fwd, routes, stop, tun_reads: 0, udp_recvs: 0, inflight: 0 })
    }

    /// Forwards until the stop flag is set.
    ///
    /// # Errors
    /// A failure of `io_uring_enter` itself (not of individual packets, which are counted).
    pub(super) fn run(mut self) -> io::Result<()> {
        let (tun_fd, udp_fd) = (self.tun.fd(), self.udp.as_raw_fd());
        let send_fds: Vec<RawFd> = self.send.iter().map(AsRawFd::as_raw_fd).collect();
        let tick = types::Timespec::new().nsec(TICK_NS);
        let args = types::SubmitArgs::new().timespec(&tick);
        let (submitter, mut sq, mut cq) = self.ring.split();
        while !self.stop.load(Ordering::Relaxed) {
            // 1. Re-arm reads and receives from free slots.
            while self.tun_reads < TUN_READS {
                let Some(slot) = self.pool.alloc() else { break };
                let entry = opcode::ReadFixed::new(
                    types::Fd(tun_fd),
                    // SAFETY (pointer arithmetic): HEADROOM < SLOT_LEN, inside the slot.
                    unsafe { self.pool.slot_ptr(slot).add(HEADROOM) },
                    (SLOT_LEN - HEADROOM) as u32,
                    slot,
                )
                .build()
                .user_data(user_data(Op::TunRead, slot));
                push(&submitter, &mut sq, &entry, &mut self.inflight)?;
                self.tun_reads += 1;
            }
            while self.udp_recvs < UDP_RECVS {
                let Some(slot) = self.pool.alloc() else { break };
                let m = arm_msg(&mut self.msgs, &self.pool, slot, HEADROOM, SLOT_LEN - HEADROOM, None);
                let entry = opcode::RecvMsg::new(types::Fd(udp_fd), m).build().user_data(user_data(Op::UdpRecv, slot));
                push(&submitter, &mut sq, &entry, &mut self.inflight)?;
                self.udp_recvs += 1;
            }
            sq.sync();
            // 2. One enter: submit and wait.
            match submitter.submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            // 3. One table load and one clock read for the whole batch.
            let routes = self.routes.load();
            let now = Instant::now();
            cq.sync();
            for cqe in &mut cq {
                let Some((op, slot)) = decode(cqe.user_data()) else { continue };
                self.inflight -= 1;
                let res = cqe.result();
                match op {
                    Op::TunRead => {
                        self.tun_reads -= 1;
                        let Ok(n) = usize::try_from(res) else {
                            self.pool.release(slot);
                            if super::is_transient(-res) {
                                continue;
                            }
                            // The TUN is gone (deleted under us): stop rather than spin.
                            return Err(io::Error::from_raw_os_error(-res));
                        };
                        // SAFETY: the read completed, so the slot is ours again.
                        let buf = unsafe { self.pool.slot_mut(slot) };
                        let Some(mut pkt) = PacketBuf::new(buf, HEADROOM, n) else {
                            self.pool.release(slot);
                            continue;
                        };
                        match self.fwd.from_tun(&routes, &mut pkt, now) {
                            TunVerdict::Send { to, flow, .. } => {
                                let (head, len) = (pkt.head(), pkt.len());
                                let m = arm_msg(&mut self.msgs, &self.pool, slot, head, len, Some(to));
                                let fd = super::pick_sender(udp_fd, &send_fds, flow);
                                let e = send_msg(fd, m, slot);
                                push(&submitter, &mut sq, &e, &mut self.inflight)?;
                            }
                            TunVerdict::Reply => {
                                let (head, len) = (pkt.head(), pkt.len());
                                push(
                                    &submitter,
                                    &mut sq,
                                    &tun_write(&self.pool, tun_fd, slot, head, len),
                                    &mut self.inflight,
                                )?;
                            }
                            TunVerdict::Flood => {
                                let (head, len) = (pkt.head(), pkt.len());
                                let mut peers = routes.peers().iter();
                                let Some(first) = peers.next() else {
                                    self.pool.release(slot);
                                    continue;
                                };
                                // Copies for all peers but the first, which gets the original.
                                for p in peers {
                                    let Some(copy) = self.pool.clone_slot(slot, head, len) else {
                                        self.fwd.stats().count_drop(DropReason::PoolExhausted);
                                        break;
                                    };
                                    let m = arm_msg(&mut self.msgs, &self.pool, copy, head, len, Some(p.endpoint));
                                    let e = send_msg(udp_fd, m, copy);
                                    push(&submitter, &mut sq, &e, &mut self.inflight)?;
                                }
                                let m = arm_msg(&mut self.msgs, &self.pool, slot, head, len, Some(first.endpoint));
                                let e = send_msg(udp_fd, m, slot);
                                push(&submitter, &mut sq, &e, &mut self.inflight)?;
                            }
                            TunVerdict::Drop(_) => self.pool.release(slot),
                        }
                    }
                    Op::UdpRecv => {
                        self.udp_recvs -= 1;
                        let from = self.msgs.get(usize::from(slot)).and_then(|m| sockaddr::read(&m.addr));
                        let (Ok(n), Some(from)) = (usize::try_from(res), from) else {
                            if res < 0 {
                                self.fwd.stats().count_drop(DropReason::IoError);
                            }
                            self.pool.release(slot);
                            continue;
                        };
                        // SAFETY: the receive completed, so the slot is ours again.
                        let buf = unsafe { self.pool.slot_mut(slot) };
                        let Some(mut pkt) = PacketBuf::new(buf, HEADROOM, n) else {
                            self.fwd.stats().count_drop(DropReason::Truncated);
                            self.pool.release(slot);
                            continue;
                        };
                        match self.fwd.from_underlay(&routes, from, &mut pkt, now) {
                            UnderlayVerdict::Deliver { .. } => {
                                let (head, len) = (pkt.head(), pkt.len());
                                push(
                                    &submitter,
                                    &mut sq,
                                    &tun_write(&self.pool, tun_fd, slot, head, len),
                                    &mut self.inflight,
                                )?;
                            }
                            UnderlayVerdict::Reply { to } => {
                                let (head, len) = (pkt.head(), pkt.len());
                                let m = arm_msg(&mut self.msgs, &self.pool, slot, head, len, Some(to));
                                let e = send_msg(udp_fd, m, slot);
                                push(&submitter, &mut sq, &e, &mut self.inflight)?;
                            }
                            UnderlayVerdict::Drop(_) => self.pool.release(slot),
                        }
                    }
                    Op::UdpSend | Op::TunWrite => {
                        if res < 0 {
                            let reason =
                                if res == -libc::EMSGSIZE { DropReason::Oversize } else { DropReason::IoError };
                            self.fwd.stats().count_drop(reason);
                        }
                        self.pool.release(slot);
                    }
                }
            }
        }
        // Cancel what is still in flight and reap it, so the kernel drops its references to
        // the socket and the TUN now, not when it tears the ring down in the background: a
        // daemon restarted right away would otherwise find its port still bound.
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(CANCEL_ALL);
        let mut not_counted = 0;
        push(&submitter, &mut sq, &cancel, &mut not_counted)?;
        sq.sync();
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.inflight > 0 && Instant::now() < deadline {
            match submitter.submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            cq.sync();
            for cqe in &mut cq {
                if let Some((_, slot)) = decode(cqe.user_data()) {
                    self.inflight -= 1;
                    self.pool.release(slot);
                }
            }
        }
        Ok(())
    }
}

/// Pushes one SQE, submitting first if the queue is full, and counts it in `inflight`.
fn push(
    submitter: &io_uring::Submitter<'_>,
    sq: &mut io_uring::SubmissionQueue<'_>,
    e: &squeue::Entry,
    inflight: &mut usize,
) -> io::Result<()> {
    loop {
        // SAFETY: every SQE we build points into the pool or `msgs`, both of which outlive
        // the ring, and names a slot that stays owned by the kernel until its CQE.
        if unsafe { sq.push(e) }.is_ok() {
            *inflight += 1;
            return Ok(());
        }
        sq.sync();
        submitter.submit()?;
        sq.sync();
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

/// A `SENDMSG` of slot `slot`'s armed msghdr `m` on socket `fd`.
fn send_msg(fd: RawFd, m: *mut libc::msghdr, slot: u16) -> squeue::Entry {
    opcode::SendMsg::new(types::Fd(fd), m).build().user_data(user_data(Op::UdpSend, slot))
}

fn tun_write(pool: &BufPool, fd: RawFd, slot: u16, head: usize, len: usize) -> squeue::Entry {
    // SAFETY (pointer arithmetic): head + len ≤ SLOT_LEN, inside registered buffer `slot`.
    let ptr = unsafe { pool.slot_ptr(slot).add(head) };
    opcode::WriteFixed::new(types::Fd(fd), ptr, len as u32, slot).build().user_data(user_data(Op::TunWrite, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for op in [Op::TunRead, Op::UdpRecv, Op::UdpSend, Op::TunWrite] {
            assert_eq!(decode(user_data(op, 511)), Some((op, 511)));
        }
        assert_eq!(decode(0), None);
        assert_eq!(decode(9 << 32), None);
    }
}
