//! The fallback worker, for hosts where io_uring is refused (Docker's and containerd's
//! default seccomp profiles, `kernel.io_uring_disabled`): epoll on the TUN queue and the
//! socket, `recvmmsg`/`sendmmsg` in batches of [`BATCH`], and TUN reads until `EAGAIN`.
//!
//! The worker only reads and receives; every packet then goes to the shared
//! [`Dispatch`], which asks for sends and TUN writes through [`MmsgIo`]: sends are staged
//! and leave in one `sendmmsg` per batch (a GSO train as one message with a `UDP_SEGMENT`
//! cmsg), TUN writes are `write`/`writev` at once. Without offloads the TUN costs one
//! `read` and one `write` per packet.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::cmsg::{CTRL_LEN, Ctrl};
use super::dispatch::{Datagram, Dispatch, Done, Io, Out, Received, Sender, Span};
use super::pool::BufPool;
use super::sockaddr;
use super::tun::TunQueue;
use crate::buf::{HEADROOM, SLOT_LEN};
use crate::forwarder::PacketCore;
use crate::route::RouteTableHandle;
use crate::stats::DropReason;

/// Packets per `recvmmsg` / `sendmmsg` and per TUN read burst.
pub const BATCH: usize = 64;
/// epoll wait, so the stop flag is noticed.
const TICK_MS: i32 = 100;
const TOKEN_TUN: u64 = 1;
const TOKEN_UDP: u64 = 2;

/// `BATCH` message headers with their iovecs, addresses and control buffers, for one
/// `recvmmsg` or `sendmmsg`. Boxed slices that never move: the kernel reads them through
/// the pointers in the headers.
struct Msgs {
    hdrs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_storage]>,
    ctrls: Box<[Ctrl]>,
    /// The pool slot each entry points into.
    slots: Box<[u16]>,
}

impl Msgs {
    fn new() -> Self {
        // SAFETY: all-zero is valid for these C structs.
        let (hdr, addr) =
            unsafe { (std::mem::zeroed::<libc::mmsghdr>(), std::mem::zeroed::<libc::sockaddr_storage>()) };
        Self {
            hdrs: vec![hdr; BATCH].into_boxed_slice(),
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH].into_boxed_slice(),
            addrs: vec![addr; BATCH].into_boxed_slice(),
            ctrls: (0..BATCH).map(|_| Ctrl::new()).collect(),
            slots: vec![0u16; BATCH].into_boxed_slice(),
        }
    }

    /// Points entry `i` at `span`, with `to` as the destination (send) or room for the
    /// source (receive), and no control message.
    fn stage(&mut self, pool: &BufPool, i: usize, span: Span, to: Option<SocketAddr>) {
        let (Some(h), Some(iov), Some(addr), Some(s)) =
            (self.hdrs.get_mut(i), self.iovs.get_mut(i), self.addrs.get_mut(i), self.slots.get_mut(i))
        else {
            return;
        };
        *s = span.slot;
        // SAFETY (pointer arithmetic): the span lies inside the slot.
        *iov = libc::iovec { iov_base: unsafe { pool.slot_ptr(span.slot).add(span.head) }.cast(), iov_len: span.len };
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
    }
}

/// The [`Io`] of this backend: sends staged for one `sendmmsg` per batch, TUN writes at
/// once; every request completes before the dispatch's next step.
struct MmsgIo {
    tx: Msgs,
    /// Entries staged in `tx`.
    staged: usize,
    /// The socket each staged entry leaves from.
    fds: Box<[RawFd]>,
    /// Each staged entry's GSO segment size (0: one datagram).
    segment: Box<[u16]>,
    /// Completed requests not yet handed back (room for two batches: allocated once).
    done: Vec<Done>,
    tun: TunQueue,
    udp: UdpSocket,
    /// The flow-hashed send sockets.
    send: Vec<UdpSocket>,
}

impl MmsgIo {
    fn fd_of(&self, from: Sender) -> RawFd {
        match from.0.checked_sub(1) {
            Some(k) => self.send.get(k as usize).map_or_else(|| self.udp.as_raw_fd(), AsRawFd::as_raw_fd),
            None => self.udp.as_raw_fd(),
        }
    }

    /// Records the end of a request whose syscall returned `rc` (errno read at once).
    fn completed(&mut self, out: Out, slot: u16, rc: isize) {
        let res = match i32::try_from(rc) {
            Ok(n) if n >= 0 => n,
            Ok(_) => -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO),
            Err(_) => i32::MAX,
        };
        self.done.push(Done { out, slot, res });
    }

    /// Sends the staged entries, one `sendmmsg` per run of entries that leave from the same
    /// socket; each becomes a completion.
    fn flush(&mut self) {
        let staged = std::mem::take(&mut self.staged);
        for i in 0..staged {
            let (Some(&size), Some(h), Some(c)) =
                (self.segment.get(i), self.tx.hdrs.get_mut(i), self.tx.ctrls.get_mut(i))
            else {
                continue;
            };
            if size > 0 {
                h.msg_hdr.msg_controllen = c.set_segment_size(size);
                h.msg_hdr.msg_control = c.0.as_mut_ptr().cast();
            }
        }
        let mut sent = 0;
        while sent < staged {
            let fd = self.fds.get(sent).copied().unwrap_or_else(|| self.udp.as_raw_fd());
            let run = self.fds.get(sent..staged).map_or(1, |s| s.iter().take_while(|f| **f == fd).count()).max(1);
            // SAFETY: tx.hdrs[sent..sent + run] were staged and point at slots their sends hold.
            let rc = unsafe { libc::sendmmsg(fd, self.tx.hdrs.as_mut_ptr().add(sent), run as libc::c_uint, 0) };
            // On failure the first unsent datagram failed (EMSGSIZE, ENOBUFS, …): it
            // completes with the error, and the rest are tried again.
            let (k, failed) = match usize::try_from(rc) {
                Ok(k) if k > 0 => (k, None),
                _ => (1, Some(-io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))),
            };
            for i in sent..(sent + k).min(staged) {
                let out = if self.segment.get(i).is_some_and(|s| *s > 0) { Out::SendTrain } else { Out::Send };
                let slot = self.tx.slots.get(i).copied().unwrap_or(0);
                let len = self.tx.iovs.get(i).map_or(0, |v| v.iov_len);
                let res = failed.unwrap_or_else(|| i32::try_from(len).unwrap_or(i32::MAX));
                self.done.push(Done { out, slot, res });
            }
            sent += k;
        }
    }
}

impl Io for MmsgIo {
    fn flow_sockets(&self) -> u32 {
        u32::try_from(self.send.len()).unwrap_or(0)
    }

    fn send(&mut self, pool: &BufPool, span: Span, d: Datagram) -> io::Result<()> {
        let Datagram { to, from, segment } = d;
        if self.staged == BATCH {
            self.flush();
        }
        let i = self.staged;
        self.tx.stage(pool, i, span, Some(to));
        let fd = self.fd_of(from);
        if let (Some(f), Some(g)) = (self.fds.get_mut(i), self.segment.get_mut(i)) {
            *f = fd;
            *g = segment.unwrap_or(0);
        }
        self.staged += 1;
        Ok(())
    }

    fn write_tun(&mut self, pool: &BufPool, span: Span) -> io::Result<()> {
        // SAFETY: writes span.len bytes from inside the slot, which this request holds.
        let rc = unsafe { libc::write(self.tun.fd(), pool.slot_ptr(span.slot).add(span.head).cast(), span.len) };
        self.completed(Out::TunWrite, span.slot, rc);
        Ok(())
    }

    fn write_tun_gather(&mut self, out: u16, iov: *mut libc::iovec, n: usize, merged: bool) -> io::Result<()> {
        // SAFETY: the list points into slots the merge holds; n ≤ MAX_IOVS entries.
        let rc = unsafe { libc::writev(self.tun.fd(), iov, n as libc::c_int) };
        self.completed(if merged { Out::TunWriteMerged } else { Out::TunWrite }, out, rc);
        Ok(())
    }

    fn clear_tun_offloads(&mut self) -> io::Result<()> {
        self.tun.clear_offloads()
    }

    fn submit(&mut self) -> io::Result<()> {
        self.flush();
        Ok(())
    }

    fn take_done(&mut self) -> Option<Done> {
        self.done.pop()
    }
}

/// The fallback worker. Field order is drop order.
pub(super) struct MmsgWorker<C: PacketCore> {
    epoll: RawFd,
    /// Receive headers, one `recvmmsg` at a time.
    rx: Msgs,
    io: MmsgIo,
    d: Dispatch<C>,
    routes: RouteTableHandle,
    stop: Arc<AtomicBool>,
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
        let io = MmsgIo {
            tx: Msgs::new(),
            staged: 0,
            fds: vec![0 as RawFd; BATCH].into_boxed_slice(),
            segment: vec![0; BATCH].into_boxed_slice(),
            done: Vec::with_capacity(2 * BATCH),
            tun,
            udp,
            send,
        };
        Ok(Self { epoll, rx: Msgs::new(), io, d: Dispatch::new(pool, fwd, offloads), routes, stop })
    }

    /// Forwards until the stop flag is set.
    ///
    /// # Errors
    /// A failure of `epoll_wait` itself, or a TUN that is gone.
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
                    TOKEN_UDP => self.drain_udp()?,
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Reads up to [`BATCH`] packets from the TUN, each handed to the dispatch, then sends
    /// what they produced.
    ///
    /// # Errors
    /// A TUN read error that is not transient: the device is gone.
    fn drain_tun(&mut self) -> io::Result<()> {
        let routes = self.routes.load();
        let now = Instant::now();
        let tun_fd = self.io.tun.fd();
        let at = self.d.tun_read_at();
        let mut read = 0;
        let mut gone = None;
        while read < BATCH {
            let Some(slot) = self.d.pool.alloc() else {
                self.d.fwd.stats().count_drop(DropReason::PoolExhausted);
                break;
            };
            // SAFETY: the slot is ours; read writes at most SLOT_LEN - at bytes into it.
            let n = unsafe { libc::read(tun_fd, self.d.pool.slot_ptr(slot).add(at).cast(), SLOT_LEN - at) };
            let Ok(n) = usize::try_from(n) else {
                let e = io::Error::last_os_error();
                self.d.pool.release(slot);
                if !e.raw_os_error().is_some_and(super::is_transient) {
                    gone = Some(e);
                }
                break; // EAGAIN: drained
            };
            read += 1;
            self.d.on_tun_read(&mut self.io, slot, n, &routes, now)?;
        }
        self.d.fwd.stats().record_batch(read);
        self.d.end_batch(&mut self.io)?;
        gone.map_or(Ok(()), Err)
    }

    /// Receives up to [`BATCH`] datagrams with one `recvmmsg` and hands each to the
    /// dispatch.
    fn drain_udp(&mut self) -> io::Result<()> {
        let gro = self.d.offloads.gro;
        let mut armed = 0;
        while armed < BATCH {
            let Some(slot) = self.d.pool.alloc() else { break };
            self.rx.stage(&self.d.pool, armed, Span::new(slot, HEADROOM, SLOT_LEN - HEADROOM), None);
            if gro {
                if let (Some(h), Some(c)) = (self.rx.hdrs.get_mut(armed), self.rx.ctrls.get_mut(armed)) {
                    c.clear();
                    h.msg_hdr.msg_control = c.0.as_mut_ptr().cast();
                    h.msg_hdr.msg_controllen = CTRL_LEN;
                }
            }
            armed += 1;
        }
        if armed == 0 {
            self.d.fwd.stats().count_drop(DropReason::PoolExhausted);
            return Ok(());
        }
        // SAFETY: rx.hdrs[..armed] point at owned slots and at `rx.addrs`; no timeout pointer.
        let rc = unsafe {
            libc::recvmmsg(
                self.io.udp.as_raw_fd(),
                self.rx.hdrs.as_mut_ptr(),
                armed as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let got = usize::try_from(rc).unwrap_or(0);
        self.d.fwd.stats().record_batch(got);
        let routes = self.routes.load();
        let now = Instant::now();
        for i in 0..armed {
            let (Some(&slot), Some(h), Some(a), Some(c)) =
                (self.rx.slots.get(i), self.rx.hdrs.get(i), self.rx.addrs.get(i), self.rx.ctrls.get(i))
            else {
                continue;
            };
            if i >= got {
                self.d.pool.release(slot);
                continue;
            }
            let from = sockaddr::read(a);
            if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || from.is_none() {
                // A source address that does not read as IPv4/IPv6 is no known peer's.
                let why = if from.is_none() { DropReason::UnknownSender } else { DropReason::Truncated };
                self.d.fwd.stats().count_drop(why);
                self.d.pool.release(slot);
                continue;
            }
            let Some(from) = from else { continue };
            let train = if gro { c.gro_size(h.msg_hdr.msg_controllen) } else { None };
            let n = h.msg_len as usize;
            self.d.on_datagrams(&mut self.io, Received { slot, from, len: n, train }, &routes, now)?;
        }
        self.d.end_batch(&mut self.io)
    }
}
