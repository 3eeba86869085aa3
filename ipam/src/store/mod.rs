//! Where leases and pod addresses live: the store traits, their shared types and errors.
//!
//! [`LeaseStore`] is the durable home of subnet leases: [`FileStore`] on one machine (the
//! embedded default), [`EtcdStore`] across machines (feature `etcd`), [`MemStore`] in tests.
//! The trait uses `impl Future + Send` (native async, static dispatch) so the daemon can hold an
//! [`AnyStore`] and run its futures on a multi-threaded runtime. [`PodStore`] is synchronous and
//! local: pod addresses belong to one node, and only the daemon writes them (`weft-cni` asks
//! it over the API socket).
//! [`PendingReleases`] is the one exception's mailbox: releases the CNI plugin could not hand
//! to a daemon that was down, which the daemon carries out when it is back.

use std::fmt;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use futures::Stream;
use ipnet::Ipv4Net;

use crate::config::{ConfigError, NetworkConfig};
use crate::lease::SubnetLease;
use crate::pod::Attachment;
use crate::watch::LeaseEvent;

#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "etcd")]
mod etcd_auth;
#[cfg(feature = "etcd")]
mod etcd_pages;
mod file;
mod mem;
mod pending_file;
mod pod_file;

#[cfg(feature = "etcd")]
pub use etcd::{EtcdOptions, EtcdStore, MAX_DECODE_BYTES, MAX_RECORD_BYTES};
#[cfg(feature = "etcd")]
pub use etcd_auth::{EtcdCredentials, EtcdTls, EtcdTlsError, Password, TlsFile};
pub use file::{FileStore, FileStoreOptions};
pub use mem::MemStore;
pub use pending_file::{PendingRelease, PendingReleases, PendingScan, SkipReason, SkippedEntry};
pub use pod_file::FilePodStore;

/// A point in a store's history. Watching from a revision yields the changes after it.
/// etcd's revision for [`EtcdStore`]; a counter bumped on every write for [`FileStore`].
#[derive(Clone, Copy, Debug, Default, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct Revision(pub u64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Every lease in the store at one revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeaseSnapshot {
    /// The live leases (expired ones are never listed), ordered by subnet.
    pub leases: Vec<SubnetLease>,
    /// The store revision the list was read at: watch from here.
    pub revision: Revision,
    /// Records that exist but do not parse. They are not routed to, but their subnets count as
    /// taken: someone holds the key, and a create on it would fail anyway (flannel skips such
    /// records with a warning and then collides with them).
    pub unreadable: Vec<UnreadableLease>,
}

/// A lease record that could not be read.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct UnreadableLease {
    /// The full store key (etcd key or file path).
    pub key: String,
    /// The subnet, when at least the key parsed.
    pub subnet: Option<Ipv4Net>,
    /// What is wrong with it.
    pub reason: String,
}

impl LeaseSnapshot {
    /// The first lease whose `PublicIP` is `ip`: a node's own lease after a restart.
    pub fn find_by_public_ip(&self, ip: Ipv4Addr) -> Option<&SubnetLease> {
        self.leases.iter().find(|l| l.attrs.public_ip == ip)
    }

    /// The lease overlapping `subnet`, if any (flannel's `findLeaseBySubnet`, widened to
    /// overlap so that a reservation of another size also counts).
    pub fn holder_of(&self, subnet: Ipv4Net) -> Option<&SubnetLease> {
        self.leases.iter().find(|l| l.subnet.contains(&subnet.network()) || subnet.contains(&l.subnet.network()))
    }

    /// Every subnet somebody holds, readable or not.
    pub fn taken(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.leases.iter().map(|l| l.subnet).chain(self.unreadable.iter().filter_map(|u| u.subnet))
    }
}

/// One batch of lease changes from a watch.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchBatch {
    /// The changes, in order. Never empty.
    pub events: Vec<LeaseEvent>,
    /// The store revision these changes bring the watcher to.
    pub revision: Revision,
    /// The watch had lost track (history compacted, or a poll found changes it could not
    /// attribute), re-listed, and these events are the diff against what it knew
    /// ([`crate::watch::resync`]). Worth a counter; nothing else to do.
    pub resync: bool,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer (etcd down or unreachable, request timed out, file lock held by
    /// a stuck process). Transient: retry with backoff and keep the last known state.
    #[error("store unavailable: {reason}")]
    Unavailable {
        /// What failed.
        reason: String,
    },
    /// A local file operation failed (disk full, permissions). Also retried, but an operator
    /// probably has to act.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The store refused who we are: a wrong etcd user or password, no user where etcd has
    /// auth enabled, or a user without permission on the prefix. Not transient: retrying with
    /// the same credentials does not help, an operator has to fix them (or the user's role).
    #[error("store refused our credentials: {reason}")]
    Denied {
        /// What etcd said, and as whom we asked.
        reason: String,
    },
    /// A record exists but does not parse.
    #[error("{key}: corrupt record: {reason}")]
    Corrupt {
        /// The store key or file.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No network config has been written yet.
    #[error("{key}: no network config (write one with `weft network init`)")]
    ConfigMissing {
        /// Where it was looked for.
        key: String,
    },
    /// The network config is present but invalid; `source` names the field.
    #[error("{key}: {source}")]
    InvalidConfig {
        /// Where it was read from.
        key: String,
        /// What is wrong, naming the field.
        #[source]
        source: ConfigError,
    },
    /// Our lease is not in the store any more (it expired, or someone deleted it). Re-create
    /// the same subnet with [`LeaseStore::create`]; never overwrite.
    #[error("lease {subnet} no longer exists (expired or deleted)")]
    LeaseGone {
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// The subnet is held by another node (flannel#1289): leave it alone.
    #[error("lease {subnet} is held by {holder}, not by us")]
    LeaseTaken {
        /// The subnet.
        subnet: Ipv4Net,
        /// The holder's `PublicIP`.
        holder: Ipv4Addr,
    },
}

impl StoreError {
    /// Whether retrying later may succeed without anyone acting (as opposed to a lost lease,
    /// a corrupt record or a bad config).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Io { .. })
    }

    pub(crate) fn from_path(e: crate::durable::PathError) -> Self {
        Self::Io { path: e.path, source: e.source }
    }

    pub(crate) fn from_lock(e: crate::durable::LockError) -> Self {
        match e {
            crate::durable::LockError::Io(e) => Self::from_path(e),
            crate::durable::LockError::Timeout { path, waited } => Self::Unavailable {
                reason: format!("{}: lock held by another process for {} ms", path.display(), waited.as_millis()),
            },
        }
    }
}

/// The durable home of subnet leases.
///
/// Every implementation gives the same guarantees, which the keeper relies on:
/// `create` never replaces a live record; `renew` and `release` only touch a record whose
/// `PublicIP` is the caller's; expired leases are never listed; `watch` never ends on its own,
/// recovers from outages and lost history by itself, and reports outages as `Err` items.
pub trait LeaseStore: Send + Sync {
    /// Reads the network config (`<prefix>/config` in etcd, `config` in a [`FileStore`]).
    ///
    /// # Errors
    /// [`StoreError::ConfigMissing`] or [`StoreError::InvalidConfig`] (naming the field): the
    /// daemon should refuse to start. Transient errors otherwise.
    fn get_config(&self) -> impl Future<Output = Result<NetworkConfig, StoreError>> + Send;

    /// Writes the network config (`weft network init`).
    ///
    /// # Errors
    /// Transient errors.
    fn put_config(&self, config: &NetworkConfig) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every live lease, and the revision to watch from.
    ///
    /// # Errors
    /// Transient errors. Unparseable records do not fail the list; see
    /// [`LeaseSnapshot::unreadable`].
    fn list(&self) -> impl Future<Output = Result<LeaseSnapshot, StoreError>> + Send;

    /// Creates `lease` with a TTL only if no live record holds `lease.subnet` (etcd: a Txn
    /// requiring `Version == 0`). Returns the lease as stored, with its expiration, or `None`
    /// when someone else holds the subnet: the race was lost cleanly and nothing was written.
    ///
    /// # Errors
    /// Transient errors.
    fn create(
        &self,
        lease: &SubnetLease,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<SubnetLease>, StoreError>> + Send;

    /// Extends our lease on `lease.subnet` by `ttl` and rewrites its attributes (a changed
    /// VtepMAC is published this way). A reservation (no TTL) stays a reservation.
    ///
    /// # Errors
    /// [`StoreError::LeaseGone`] when no live record exists (re-create it),
    /// [`StoreError::LeaseTaken`] when another `PublicIP` holds it (never overwrite), transient
    /// errors otherwise.
    fn renew(&self, lease: &SubnetLease, ttl: Duration)
    -> impl Future<Output = Result<SubnetLease, StoreError>> + Send;

    /// Deletes our lease (graceful leave, `weft run --release-on-exit`), but only if the record
    /// is still ours. Returns whether a record was deleted.
    ///
    /// # Errors
    /// Transient errors.
    fn release(&self, lease: &SubnetLease) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes whatever record holds `subnet` (an administrator's revoke). Returns whether a
    /// record was deleted.
    ///
    /// # Errors
    /// Transient errors.
    fn delete(&self, subnet: Ipv4Net) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Lease changes after `from` (usually the snapshot just [`list`](Self::list)ed and applied).
    /// The stream keeps its own copy of the lease set: after an outage it resumes from the last
    /// revision, after losing history it re-lists and yields the diff (`resync: true`), and
    /// while the store is down it yields `Err` items and retries with backoff. It ends only when
    /// dropped.
    fn watch(&self, from: &LeaseSnapshot) -> impl Stream<Item = Result<WatchBatch, StoreError>> + Send + 'static;
}

/// The daemon's store: one of the real implementations, chosen at startup.
#[derive(Clone, Debug)]
pub enum AnyStore {
    /// The embedded store (one machine).
    File(FileStore),
    /// etcd v3 (a real cluster).
    #[cfg(feature = "etcd")]
    Etcd(EtcdStore),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::File($s) => $e,
            #[cfg(feature = "etcd")]
            AnyStore::Etcd($s) => $e,
        }
    };
}

impl LeaseStore for AnyStore {
    async fn get_config(&self) -> Result<NetworkConfig, StoreError> {
        delegate!(self, s => s.get_config().await)
    }

    async fn put_config(&self, config: &NetworkConfig) -> Result<(), StoreError> {
        delegate!(self, s => s.put_config(config).await)
    }

    async fn list(&self) -> Result<LeaseSnapshot, StoreError> {
        delegate!(self, s => s.list().await)
    }

    async fn create(&self, lease: &SubnetLease, ttl: Duration) -> Result<Option<SubnetLease>, StoreError> {
        delegate!(self, s => s.create(lease, ttl).await)
    }

    async fn renew(&self, lease: &SubnetLease, ttl: Duration) -> Result<SubnetLease, StoreError> {
        delegate!(self, s => s.renew(lease, ttl).await)
    }

    async fn release(&self, lease: &SubnetLease) -> Result<bool, StoreError> {
        delegate!(self, s => s.release(lease).await)
    }

    async fn delete(&self, subnet: Ipv4Net) -> Result<bool, StoreError> {
        delegate!(self, s => s.delete(subnet).await)
    }

    fn watch(&self, from: &LeaseSnapshot) -> impl Stream<Item = Result<WatchBatch, StoreError>> + Send + 'static {
        #[cfg(feature = "etcd")]
        match self {
            AnyStore::File(s) => futures::future::Either::Left(s.watch(from)),
            AnyStore::Etcd(s) => futures::future::Either::Right(s.watch(from)),
        }
        #[cfg(not(feature = "etcd"))]
        match self {
            AnyStore::File(s) => s.watch(from),
        }
    }
}

/// One pod address record.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct PodRecord {
    /// The address.
    pub ip: Ipv4Addr,
    /// Who holds it; `None` when the record is unreadable (empty, truncated by a foreign
    /// writer, garbage). Such a record still blocks its address until GC frees it.
    pub owner: Option<Attachment>,
    /// When it was claimed (the file's modification time for [`FilePodStore`]); GC spares
    /// records younger than its grace period.
    pub allocated_at: SystemTime,
}

/// Durable per-node pod address records, with the operations [`crate::PodAllocator`] needs.
///
/// The allocator runs each operation inside [`PodStore::with_lock`], so concurrent callers
/// (several daemons by mistake, a `weft ipam` admin command) never interleave; `claim` is
/// additionally create-if-absent, so even a writer that ignores the lock cannot take an address
/// twice.
pub trait PodStore {
    /// Runs `f` while holding the store's exclusive lock.
    ///
    /// # Errors
    /// `f`'s error, or the lock's (converted from [`StoreError`]).
    fn with_lock<T, E: From<StoreError>>(&self, f: impl FnOnce(&Self) -> Result<T, E>) -> Result<T, E>;

    /// Every record.
    ///
    /// # Errors
    /// I/O errors.
    fn records(&self) -> Result<Vec<PodRecord>, StoreError>;

    /// Records `ip` as held by `owner` if no record for `ip` exists. Returns `false` if one does.
    /// On error nothing is left behind.
    ///
    /// # Errors
    /// I/O errors (disk full included).
    fn claim(&self, ip: Ipv4Addr, owner: &Attachment) -> Result<bool, StoreError>;

    /// Removes the record for `ip`. Returns whether it existed.
    ///
    /// # Errors
    /// I/O errors.
    fn remove(&self, ip: Ipv4Addr) -> Result<bool, StoreError>;

    /// The last address handed out, where the next search starts (host-local's round robin,
    /// which avoids reusing a just-released address while peers may still cache it).
    ///
    /// # Errors
    /// I/O errors.
    fn last_reserved(&self) -> Result<Option<Ipv4Addr>, StoreError>;

    /// Records the last address handed out.
    ///
    /// # Errors
    /// I/O errors.
    fn set_last_reserved(&self, ip: Ipv4Addr) -> Result<(), StoreError>;
}
