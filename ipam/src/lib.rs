//! weft's control-plane state: which node holds which subnet, and which pod holds which address.
//!
//! Nodes lease subnets of one cluster network from a shared store exactly as flannel does (same
//! net-conf JSON, same etcd keys and lease JSON, same acquire order, same `subnet.env`), so weft
//! nodes and flannel nodes can share one etcd. The crate is layered so that the decisions can be
//! tested without I/O (sans-IO: time, randomness and I/O come in as arguments):
//!
//! 1. [`config`], [`lease`], [`subnet`]: plain data and arithmetic (net-conf, lease records, the
//!    free-subnet pick).
//! 2. [`keeper`]: the sans-IO lease state machine (acquire, renew, re-acquire, never overwrite);
//!    time and randomness come in as arguments.
//! 3. [`watch`]: lease events and the re-list-and-diff used after a watch loses history.
//! 4. [`store`]: where leases live. [`store::FileStore`] (embedded default, one machine),
//!    [`store::EtcdStore`] (feature `etcd`, across machines), [`store::MemStore`] (tests), all
//!    behind [`store::LeaseStore`]; plus [`store::FilePodStore`] behind [`store::PodStore`], and
//!    [`store::PendingReleases`], the releases the CNI plugin leaves for a daemon that was down.
//! 5. [`lease_loop`]: the thin async step that runs one keeper action against a store.
//! 6. [`pod`]: per-node pod address allocation over the leased subnet, [`subnet_env`]: the
//!    `subnet.env` hand-off file, and [`lease_cache`]: the last known lease set, so a node
//!    restarting while its store is down comes up at once.
//!
//! The crate never touches the data plane: it depends on neither `weft-forwarder`
//! (`tools/check-layering.sh` checks that), netlink nor TUN. The daemon maps leases to routes.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backoff;
pub mod config;
mod durable;
#[doc(hidden)]
pub mod fuzzing;
pub mod keeper;
pub mod lease;
pub mod lease_cache;
pub mod lease_loop;
pub mod pod;
pub mod store;
pub mod subnet;
pub mod subnet_env;
pub mod watch;

pub use backoff::Backoff;
pub use config::{BackendConfig, BackendKind, ConfigError, NetworkConfig};
pub use keeper::{AcquireSource, KeeperConfig, KeeperEvent, KeeperPhase, KeeperStatus, LeaseAction, LeaseKeeper};
pub use lease::{LeaseAttrs, LeaseKey, LeaseKeyError, SubnetLease};
pub use lease_cache::{LeaseCache, LeaseCacheError};
pub use pod::{Attachment, AttachmentError, ContainerId, IfName, PodAddress, PodAllocator, PodError};
pub use store::{
    AnyStore, FilePodStore, FileStore, LeaseSnapshot, LeaseStore, MemStore, PendingRelease, PendingReleases, PodRecord,
    PodStore, Revision, StoreError, WatchBatch,
};
#[cfg(feature = "etcd")]
pub use store::{EtcdCredentials, EtcdOptions, EtcdStore, EtcdTls, EtcdTlsError, Password, TlsFile};
pub use subnet::SubnetRange;
pub use subnet_env::{SubnetEnv, SubnetEnvError};
pub use watch::LeaseEvent;
