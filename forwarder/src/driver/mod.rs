//! The OS-facing half of the data plane, and the only module with syscalls or `unsafe`.
//!
//! Contract (mio style): a worker owns one TUN queue, one UDP socket and one buffer pool,
//! and runs on its own thread until its stop flag is set. It reads the route table through a
//! [`RouteTableHandle`] once per batch and hands every completed read to its dispatch
//! (`dispatch.rs`), which runs the sans-IO [`Forwarder`](crate::forwarder::Forwarder) and
//! makes every offload decision, then asks the backend for I/O through a small `Io` trait.
//! Every `unsafe` block says who owns the buffer it touches until the kernel is done with it.
//!
//! Two backends share the dispatch, the core and the pool: [`Backend::Uring`] (the default
//! where the kernel allows it) and [`Backend::Mmsg`] (epoll + recvmmsg/sendmmsg), chosen by
//! [`probe`] at start. They only arm reads, reap completions and submit requests.

pub mod pool;
pub mod sockaddr;
pub mod tun;
pub mod udp;

mod bufring;
mod cmsg;
mod dispatch;
#[cfg(test)]
mod memio;
mod mmsg;
mod scatter;
mod uring;

use std::io;
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::forwarder::PacketCore;
use crate::route::RouteTableHandle;

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
