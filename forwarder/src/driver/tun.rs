//! Opening the TUN device: one file descriptor per queue (`IFF_MULTI_QUEUE`), through
//! tun-rs. Addresses, MTU, link state and routes are the daemon's job, over netlink.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// One queue of a multi-queue TUN device. The device disappears when its last queue closes.
pub struct TunQueue {
    dev: tun_rs::SyncDevice,
}

impl std::fmt::Debug for TunQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunQueue").field("fd", &self.dev.as_raw_fd()).finish()
    }
}

impl TunQueue {
    /// The queue's file descriptor.
    pub fn fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }

    /// Switches the descriptor between blocking and non-blocking mode.
    ///
    /// # Errors
    /// `fcntl` failure.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.dev.set_nonblocking(on)
    }
}

/// Creates (or attaches to) the TUN `name` (a TAP when `tap`) with `queues` queues,
/// `IFF_NO_PI` and `IFF_MULTI_QUEUE`, without offloads (the performance work adds
/// `IFF_VNET_HDR`).
///
/// # Errors
/// `NotFound` when `/dev/net/tun` is missing, `PermissionDenied` without `CAP_NET_ADMIN`,
/// or another error from `TUNSETIFF` (for instance a non-TUN device of that name).
pub fn open(name: &str, queues: usize, tap: bool) -> io::Result<Vec<TunQueue>> {
    let layer = if tap { tun_rs::Layer::L2 } else { tun_rs::Layer::L3 };
    let first = tun_rs::DeviceBuilder::new().name(name).layer(layer).multi_queue(true).build_sync()?;
    let mut out = Vec::with_capacity(queues.max(1));
    for _ in 1..queues.max(1) {
        out.push(TunQueue { dev: first.try_clone()? });
    }
    out.insert(0, TunQueue { dev: first });
    Ok(out)
}
