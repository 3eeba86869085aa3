//! Opening the TUN device: one file descriptor per queue (`IFF_MULTI_QUEUE`), through
//! tun-rs. Addresses, MTU, link state and routes are the daemon's job, over netlink.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// One queue of a multi-queue TUN device. The device disappears when its last queue closes.
pub struct TunQueue {
    dev: tun_rs::SyncDevice,
}

/// The offloads a TUN was opened with (device-wide, the same on every queue).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct TunOffloads {
    /// `IFF_VNET_HDR` with `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`: every read and write
    /// carries a virtio-net header, reads may be TCP super-packets.
    pub tso: bool,
    /// `TUN_F_USO4 | TUN_F_USO6` as well (Linux ≥ 6.2): reads may be UDP super-packets.
    pub uso: bool,
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

    /// What this queue's device was opened with.
    pub fn offloads(&self) -> TunOffloads {
        TunOffloads { tso: self.dev.tcp_gso(), uso: self.dev.udp_gso() }
    }

    /// Clears the device's offload mask (`TUNSETOFFLOAD` 0): the kernel segments and
    /// checksums again before handing packets over. The virtio-net header stays, all zero.
    /// Used when UDP GSO turns out not to work on the underlay, so super-packets stop coming.
    ///
    /// # Errors
    /// The ioctl's error.
    pub fn clear_offloads(&self) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the descriptor is a live TUN.
        let rc = unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

/// Creates (or attaches to) the TUN `name` (a TAP when `tap`) with `queues` queues,
/// `IFF_NO_PI` and `IFF_MULTI_QUEUE`; with `offload` (TUN only) also `IFF_VNET_HDR` and
/// `TUNSETOFFLOAD` checksum + TSO4/6, and USO4/6 where the kernel has it (tun-rs probes it).
/// Without `offload` the device's offload mask is cleared, so a persistent device left
/// with offloads by an earlier process cannot hand us super-packets.
///
/// # Errors
/// `NotFound` when `/dev/net/tun` is missing, `PermissionDenied` without `CAP_NET_ADMIN`,
/// or another error from `TUNSETIFF` (for instance a non-TUN device of that name).
pub fn open(name: &str, queues: usize, tap: bool, offload: bool) -> io::Result<Vec<TunQueue>> {
    let layer = if tap { tun_rs::Layer::L2 } else { tun_rs::Layer::L3 };
    let first =
        tun_rs::DeviceBuilder::new().name(name).layer(layer).multi_queue(true).offload(offload && !tap).build_sync()?;
    let mut out = Vec::with_capacity(queues.max(1));
    for _ in 1..queues.max(1) {
        out.push(TunQueue { dev: first.try_clone()? });
    }
    out.insert(0, TunQueue { dev: first });
    Ok(out)
}
