//! The fallback worker, for hosts where io_uring is refused (Docker's and containerd's
//! default seccomp profiles, `kernel.io_uring_disabled`): epoll on the TUN queue and the
//! socket, `recvmmsg`/`sendmmsg` in batches of [`BATCH`], and TUN reads until `EAGAIN`.
//!
//! The TUN side still costs one `read` and one `write` per packet: a TUN has no batched
//! interface until its offloads (virtio-net header) are on.

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::pool::BufPool;
use super::sockaddr;
use super::tun::TunQueue;
use crate::buf::{HEADROOM, PacketBuf, SLOT_LEN};
use crate::forwarder::{PacketCore, TunVerdict, UnderlayVerdict};
use crate::route::RouteTableHandle;
use crate::stats::DropReason;

/// Packets per `recvmmsg` / `sendmmsg` and per TUN read burst.
pub const BATCH: usize = 64;
/// epoll wait, so the stop flag is noticed.
const TICK_MS: i32 = 100;
const TOKEN_TUN: u64 = 1;
const TOKEN_UDP: u64 = 2;

/// The fallback worker. Field order is drop order.
pub(super) struct MmsgWorker<C: PacketCore> {
    epoll: RawFd,
    hdrs: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_storage]>,
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
        let super::WorkerIo { tun, udp, send, .. } = io;
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
        Ok(Self {
            epoll,
            hdrs: vec![zeroed_hdr; BATCH].into_boxed_slice(),
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH].into_boxed_slice(),
            // SAFETY: all-zero is a valid sockaddr_storage.
            addrs: vec![unsafe { std::mem::zeroed::<libc::sockaddr_storage>() }; BATCH].into_boxed_slice(),
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
        while staged < BATCH {
            let Some(slot) = self.pool.alloc() else {
                self.fwd.stats().count_drop(DropReason::PoolExhausted);
                break;
            };
            // SAFETY: the slot is ours; read writes at most SLOT_LEN - HEADROOM bytes into it.
            let n = unsafe { libc::read(tun_fd, self.pool.slot_ptr(slot).add(HEADROOM).cast(), SLOT_LEN - HEADROOM) };
            let Ok(n) = usize::try_from(n) else {
                let e = io::Error::last_os_error();
                self.pool.release(slot);
                if e.raw_os_error().is_some_and(super::is_transient) {
                    break; // EAGAIN: drained
                }
                self.send_staged(staged);
                return Err(e);
            };
            // SAFETY: the slot is ours.
            let buf = unsafe { self.pool.slot_mut(slot) };
            let Some(mut pkt) = PacketBuf::new(buf, HEADROOM, n) else {
                self.pool.release(slot);
                continue;
            };
            match self.fwd.from_tun(&routes, &mut pkt, now) {
                TunVerdict::Send { to, flow, .. } => {
                    let (head, len) = (pkt.head(), pkt.len());
                    self.stage(staged, slot, head, len, Some(to));
                    let fd = self.sender(flow);
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
        self.send_staged(staged);
        Ok(())
    }

    /// The socket a packet of inner flow `flow` leaves from.
    fn sender(&self, flow: u32) -> RawFd {
        super::pick_sender(self.udp.as_raw_fd(), &self.send_fds, flow)
    }

    /// Sends the first `staged` batch entries, one `sendmmsg` per run of entries that leave
    /// from the same socket, and frees their slots.
    fn send_staged(&mut self, staged: usize) {
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
                    let e = io::Error::last_os_error();
                    let reason = if e.raw_os_error() == Some(libc::EMSGSIZE) {
                        DropReason::Oversize
                    } else {
                        DropReason::IoError
                    };
                    self.fwd.stats().count_drop(reason);
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
        let routes = self.routes.load();
        let now = Instant::now();
        for i in 0..armed {
            let Some(&slot) = self.slots.get(i) else { continue };
            if i < got {
                self.deliver(&routes, i, slot, now);
            }
            self.pool.release(slot);
        }
    }

    fn deliver(&mut self, routes: &crate::route::RouteTable, i: usize, slot: u16, now: Instant) {
        let (Some(h), Some(a)) = (self.hdrs.get(i), self.addrs.get(i)) else { return };
        let n = h.msg_len as usize;
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            self.fwd.stats().count_drop(DropReason::Truncated);
            return;
        }
        let Some(from) = sockaddr::read(a) else { return };
        // SAFETY: the receive completed, the slot is ours.
        let buf = unsafe { self.pool.slot_mut(slot) };
        let Some(mut pkt) = PacketBuf::new(buf, HEADROOM, n) else { return };
        match self.fwd.from_underlay(routes, from, &mut pkt, now) {
            UnderlayVerdict::Deliver { .. } => {
                let (head, len) = (pkt.head(), pkt.len());
                self.write_tun(slot, head, len);
            }
            UnderlayVerdict::Reply { to } => {
                let (head, len) = (pkt.head(), pkt.len());
                self.send_one(slot, head, len, to);
            }
            UnderlayVerdict::Drop(_) => {}
        }
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

    fn write_tun(&mut self, slot: u16, head: usize, len: usize) {
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
    }
}
