//! weft's data plane.
//!
//! The crate has two halves. The **core** is sans-IO: typed packet views, the wire formats,
//! the route table and the per-packet decisions are pure functions over byte slices, tested
//! without a TUN, a socket or a clock. The **driver** (feature `io`, on by default) is the
//! only place with syscalls or `unsafe`: it opens the TUN and the UDP sockets, owns the
//! buffer pool, and runs one worker per queue on io_uring, or on recvmmsg/sendmmsg with
//! epoll where io_uring is unavailable.
//!
//! Layers, each importing only from those before it:
//! `wire` → `buf`, `stats`, `ratelimit`, `node`, `wireguard::{keys, replay, handshake, session}`
//! (a peer's WireGuard state, which its route carries) → `route` → `encap` and
//! `wireguard::WireGuardEncap` → `forwarder`, `bridge`,
//! `gso` (cutting TUN super-packets into GSO trains), `partial` (repairing kernel VTEPs'
//! partial checksums), `gro` (merging received segments for one
//! TUN write) → `driver`.
//! `cargo check -p weft-forwarder --no-default-features` proves the core touches no OS code.

#![warn(missing_docs)]

pub mod bridge;
pub mod buf;
pub mod encap;
pub mod forwarder;
pub mod gro;
pub mod gso;
pub mod node;
pub mod partial;
pub mod ratelimit;
pub mod route;
pub mod stats;
pub mod wire;
pub mod wireguard;

#[cfg(feature = "io")]
pub mod driver;

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

#[cfg(any(test, feature = "test-utils"))]
pub mod fuzzing;

pub use bridge::Bridge;
pub use buf::PacketBuf;
pub use encap::{Decapsulated, Encap, EncapKind, UdpEncap, VxlanEncap};
pub use forwarder::{Forwarder, PacketCore, TunVerdict, UnderlayVerdict};
pub use node::LocalNode;
pub use route::{NextHop, PeerId, RouteError, RouteTable, RouteTableHandle};
pub use stats::{DropReason, IcmpCounter, PeerCounters, PeerTotals, WorkerStats};
