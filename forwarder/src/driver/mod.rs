//! The OS-facing half of the data plane, and the only module with syscalls or `unsafe`.
//!
//! Contract (mio style): a worker owns one TUN queue, one UDP socket and one buffer pool,
//! and runs on its own thread until its stop flag is set. It reads the route table through a
//! [`RouteTableHandle`] once per batch and hands every packet to the sans-IO
//! [`Forwarder`](crate::forwarder::Forwarder), then performs the I/O the verdict asks for.
//! Every `unsafe` block says who owns the buffer it touches until the kernel is done with it.
//!
//! Two backends share the core and the pool and nothing else: [`Backend::Uring`] (the
//! default where the kernel allows it) and [`Backend::Mmsg`] (epoll + recvmmsg/sendmmsg),
//! chosen by [`probe`] at start.

pub mod pool;
pub mod sockaddr;
pub mod tun;
pub mod udp;

mod bufring;
mod cmsg;
mod mmsg;
mod scatter;
mod uring;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::buf::PacketBuf;
use crate::forwarder::{PacketCore, UnderlayVerdict};
use crate::route::{RouteTable, RouteTableHandle};
use crate::stats::{DropReason, OffloadCounter, WorkerStats};

pub use pool::BufPool;
pub use tun::TunQueue;

/// Pool slots per worker: in-flight reads and receives plus room for sends and writes.
pub const POOL_SLOTS: usize = 512;
/// Bytes of one worker's pool, all registered with io_uring (which an unprivileged user's
/// `RLIMIT_MEMLOCK` must cover).
pub const POOL_BYTES: usize = POOL_SLOTS * crate::buf::SLOT_LEN;

/// Which I/O backend a worker runs.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Backend {
    /// io_uring with registered buffers and batched submission.
    Uring,
    /// epoll with recvmmsg/sendmmsg.
    Mmsg,
}

impl Backend {
    /// The name in logs and status.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Uring => "uring",
            Self::Mmsg => "mmsg",
        }
    }
}

/// What the operator asked for.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum IoPreference {
    /// io_uring if the kernel allows it, else the fallback.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// The fallback, always.
    Mmsg,
}

/// The outcome of [`probe`].
#[derive(Debug)]
pub struct ProbeResult {
    /// The backend to run.
    pub backend: Backend,
    /// Why io_uring was not chosen under `Auto`, for the log and status.
    pub fallback_reason: Option<String>,
}

/// Why the driver could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// `io = "uring"` was asked for and the kernel refused it.
    #[error(
        "io_uring is unavailable: {0} (seccomp profiles of Docker and containerd block it; set io = \"auto\" or \"mmsg\")"
    )]
    UringUnavailable(io::Error),
    /// Setting up a worker's ring, pool or descriptors failed.
    #[error("worker setup failed: {0}")]
    Setup(io::Error),
    /// The event loop itself failed.
    #[error("worker loop failed: {0}")]
    Loop(io::Error),
}

/// Chooses the backend: tries to create a ring and checks every opcode the worker uses.
///
/// # Errors
/// [`DriverError::UringUnavailable`] when `pref` is `Uring` and the probe fails.
pub fn probe(pref: IoPreference) -> Result<ProbeResult, DriverError> {
    match pref {
        IoPreference::Mmsg => Ok(ProbeResult { backend: Backend::Mmsg, fallback_reason: None }),
        IoPreference::Uring => uring::probe()
            .map(|()| ProbeResult { backend: Backend::Uring, fallback_reason: None })
            .map_err(DriverError::UringUnavailable),
        IoPreference::Auto => Ok(match uring::probe() {
            Ok(()) => ProbeResult { backend: Backend::Uring, fallback_reason: None },
            Err(e) => ProbeResult { backend: Backend::Mmsg, fallback_reason: Some(e.to_string()) },
        }),
    }
}

/// The send socket for a packet of inner flow `flow`: one of `send` by hash, else `udp`.
#[inline]
pub(crate) fn pick_sender(udp: RawFd, send: &[RawFd], flow: u32) -> RawFd {
    match send.len() {
        0 => udp,
        n => send.get(flow as usize % n).copied().unwrap_or(udp),
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
        let (start, len) = (crate::buf::HEADROOM + off, size.min(n - off));
        (start, len, if train.is_some() { start + len } else { crate::buf::SLOT_LEN })
    })
}

/// Runs datagram `d` (`(start, len, end)` from [`datagrams`]) of the receive in `slot`
/// through the core, confined to its own bytes: nothing a peer sends can reach into the
/// next datagram, nor a reply written in place into the one before, which a pending merge
/// may still point at. Returns the verdict and where the packet now lies in the slot;
/// `None`, counted as truncated, when the datagram does not fit the slot.
///
/// # Safety
/// The caller must own `slot`: its receive completed and nothing in flight names it.
pub(crate) unsafe fn check_datagram<C: PacketCore>(
    pool: &mut BufPool,
    fwd: &mut C,
    routes: &RouteTable,
    from: SocketAddr,
    slot: u16,
    (start, len, end): (usize, usize, usize),
    now: Instant,
) -> Option<(UnderlayVerdict, usize, usize)> {
    // SAFETY: the caller owns the slot.
    let buf = unsafe { pool.slot_mut(slot) };
    let Some(mut pkt) = buf.get_mut(start..end).and_then(|b| PacketBuf::new(b, 0, len)) else {
        fwd.stats().count_drop(DropReason::Truncated);
        return None;
    };
    let verdict = fwd.from_underlay(routes, from, &mut pkt, now);
    Some((verdict, start + pkt.head(), pkt.len()))
}

/// The kernel refused a send carrying a GSO train with `errno`. `EIO` (the underlay cannot
/// checksum) or `EINVAL` (no GSO here) mean it refuses every train: switch GSO off for this
/// worker and clear the TUN's offload mask, so super-packets stop coming. Other errors lose
/// one datagram, already counted by the caller.
pub(crate) fn train_refused(offloads: &mut Offloads, tun: &TunQueue, stats: &WorkerStats, errno: i32) {
    if offloads.gso && matches!(errno, libc::EIO | libc::EINVAL) {
        offloads.gso = false;
        stats.count_offload(OffloadCounter::Fallbacks, 1);
        let cleared = tun.clear_offloads();
        tracing::warn!(
            errno,
            ?cleared,
            "the underlay refused a UDP GSO send; sending one segment per datagram and clearing the TUN's offloads"
        );
    }
}

/// The TUN refused a merged (GSO) write with `errno`: `EINVAL` means this kernel takes none
/// (the 6.6.44 regression), so stop merging.
pub(crate) fn merged_write_refused(offloads: &mut Offloads, stats: &WorkerStats, errno: i32) {
    if offloads.coalesce && errno == libc::EINVAL {
        offloads.coalesce = false;
        stats.count_offload(OffloadCounter::Fallbacks, 1);
        tracing::warn!("the TUN refused a coalesced (GSO) write; writing one packet per write");
    }
}

/// Whether an errno from a read or receive means "try again" rather than "the device or
/// socket is gone".
pub(crate) fn is_transient(errno: i32) -> bool {
    matches!(errno, libc::EAGAIN | libc::EINTR | libc::ENOBUFS | libc::ENOMEM | libc::ECANCELED)
}

/// The offloads a worker uses: decided at start from what the kernel offers and the
/// configuration; a worker switches GSO or merging off by itself if the kernel refuses
/// them at run time. Both backends use them.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Offloads {
    /// The TUN carries a virtio-net header (`IFF_VNET_HDR`) and hands over TCP (and UDP,
    /// where the kernel has USO) super-packets with partial checksums.
    pub tun_vnet: bool,
    /// Trains of segments go out as one UDP GSO send (`UDP_SEGMENT`).
    pub gso: bool,
    /// The UDP socket receives trains (`UDP_GRO`). Needs `tun_vnet`: a train's datagrams
    /// reach the TUN through the merge path, which writes a virtio-net header.
    pub gro: bool,
    /// Consecutive TCP segments of one flow are merged into one TUN write. Needs `tun_vnet`.
    pub coalesce: bool,
    /// The TUN takes UDP super-packets (USO): equal-sized datagrams of one flow are merged
    /// too. Needs `coalesce`.
    pub tun_uso: bool,
}

/// Everything one worker owns.
#[derive(Debug)]
pub struct WorkerIo {
    /// Its TUN (or TAP) queue.
    pub tun: TunQueue,
    /// Its UDP socket (one of the `SO_REUSEPORT` group on the overlay port).
    pub udp: UdpSocket,
    /// Sockets on ephemeral ports to send from, picked by inner-flow hash, so the outer
    /// source port follows the flow as Linux vxlan's does. Empty: send from `udp`.
    pub send: Vec<UdpSocket>,
    /// The offloads to use (both backends run them).
    pub offloads: Offloads,
}

impl WorkerIo {
    /// Puts every descriptor in blocking (io_uring, which polls for us) or non-blocking
    /// (epoll) mode.
    ///
    /// # Errors
    /// `fcntl` failure.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.tun.set_nonblocking(on)?;
        self.udp.set_nonblocking(on)?;
        self.send.iter().try_for_each(|s| s.set_nonblocking(on))
    }
}

/// Runs one worker on the calling thread until `stop` is set.
///
/// # Errors
/// [`DriverError`] if setup fails or the event loop dies.
pub fn run_worker<C: PacketCore>(
    backend: Backend,
    io: WorkerIo,
    fwd: C,
    routes: RouteTableHandle,
    stop: Arc<AtomicBool>,
) -> Result<(), DriverError> {
    let pool = BufPool::new(POOL_SLOTS).map_err(DriverError::Setup)?;
    match backend {
        Backend::Uring => uring::UringWorker::new(io, fwd, routes, stop, pool)
            .map_err(DriverError::Setup)?
            .run()
            .map_err(DriverError::Loop),
        Backend::Mmsg => mmsg::MmsgWorker::new(io, fwd, routes, stop, pool)
            .map_err(DriverError::Setup)?
            .run()
            .map_err(DriverError::Loop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::{HEADROOM, SLOT_LEN};

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

    /// The merge path sees only what `check_datagram` delivered: a GRO train whose middle
    /// datagram carries a bad inner IPv4 header checksum has that one dropped and counted,
    /// its neighbours delivered.
    #[test]
    fn a_train_datagram_with_a_bad_inner_checksum_never_reaches_the_merge() {
        use crate::testing::{A_ENDPOINT, Pair, icmp_echo};
        let mut net = Pair::vxlan();
        let wire = net.a_encap(&icmp_echo([10, 244, 1, 1], [10, 244, 2, 1], 100)).unwrap();
        let mut bad = wire.clone();
        bad[22 + 10] ^= 0x40;
        let mut pool = BufPool::new(1).unwrap();
        let slot = pool.alloc().unwrap();
        // SAFETY: just allocated, nothing in flight.
        let buf = unsafe { pool.slot_mut(slot) };
        for (i, d) in [&wire, &bad, &wire].into_iter().enumerate() {
            let at = HEADROOM + i * wire.len();
            buf[at..at + d.len()].copy_from_slice(d);
        }
        let from = A_ENDPOINT.parse().unwrap();
        let verdicts: Vec<_> = datagrams(3 * wire.len(), Some(wire.len()))
            // SAFETY: the slot is ours.
            .map(|d| unsafe { check_datagram(&mut pool, &mut net.b, &net.routes_b, from, slot, d, net.now) })
            .map(|c| c.map(|(v, _, _)| v))
            .collect();
        assert!(matches!(verdicts[0], Some(UnderlayVerdict::Deliver { .. })));
        assert_eq!(verdicts[1], Some(UnderlayVerdict::Drop(DropReason::BadInnerChecksum)));
        assert!(matches!(verdicts[2], Some(UnderlayVerdict::Deliver { .. })));
        assert_eq!(net.b.stats().drops(DropReason::BadInnerChecksum), 1);
        // An empty receive reaches the core too, and is counted there.
        let empty: Vec<_> = datagrams(0, None)
            // SAFETY: the slot is ours.
            .map(|d| unsafe { check_datagram(&mut pool, &mut net.b, &net.routes_b, from, slot, d, net.now) })
            .collect();
        assert_eq!(empty, [Some((UnderlayVerdict::Drop(DropReason::EmptyPayload), HEADROOM, 0))]);
        assert_eq!(net.b.stats().drops(DropReason::EmptyPayload), 1);
    }
}
