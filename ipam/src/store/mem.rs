//! An in-memory [`LeaseStore`] for tests (flannel's `mock_registry`): same guarantees as the
//! real stores, an injectable clock, and a switch that makes it "unreachable".
//!
//! Expiry is evaluated against the clock on every operation, and watchers learn about
//! expirations at the next operation or [`MemStore::tick`]. Every future completes immediately,
//! so tests can drive it with `futures::executor::block_on`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures::Stream;
use futures::channel::mpsc;
use ipnet::Ipv4Net;

use super::{LeaseSnapshot, LeaseStore, Revision, StoreError, WatchBatch};
use crate::config::NetworkConfig;
use crate::lease::SubnetLease;
use crate::watch::resync;

type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;
type WatchItem = Result<WatchBatch, StoreError>;

/// An in-memory lease store with an injected clock.
#[derive(Clone)]
pub struct MemStore {
    inner: Arc<Mutex<Inner>>,
    clock: Clock,
}

#[derive(Default)]
struct Inner {
    leases: BTreeMap<Ipv4Net, SubnetLease>,
    revision: u64,
    config: Option<NetworkConfig>,
    unavailable: bool,
    watchers: Vec<(mpsc::UnboundedSender<WatchItem>, Vec<SubnetLease>)>,
}

impl fmt::Debug for MemStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("MemStore").field("leases", &inner.leases.len()).field("revision", &inner.revision).finish()
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(SystemTime::now)
    }

    /// An empty store whose notion of "now" is `clock` (a test's fake clock).
    pub fn with_clock(clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Self { inner: Arc::new(Mutex::new(Inner::default())), clock: Arc::new(clock) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock only happens in a failing test; keep going with the data.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes every operation fail with [`StoreError::Unavailable`] (`false`) or work again
    /// (`true`), like etcd going away and coming back. Watchers are told what changed meanwhile
    /// when it comes back.
    pub fn set_available(&self, available: bool) {
        let mut inner = self.lock();
        inner.unavailable = !available;
        if available {
            self.settle(&mut inner);
        }
    }

    /// Applies expirations at the current clock and tells watchers.
    pub fn tick(&self) {
        let mut inner = self.lock();
        self.settle(&mut inner);
    }

    /// Every lease, live or expired-but-not-yet-collected, for assertions.
    pub fn dump(&self) -> Vec<SubnetLease> {
        self.lock().leases.values().cloned().collect()
    }

    /// Expires leases and brings watchers up to date (while available).
    fn settle(&self, inner: &mut Inner) {
        let now = (self.clock)();
        let before = inner.leases.len();
        inner.leases.retain(|_, l| !l.is_expired(now));
        if inner.leases.len() != before {
            inner.revision += 1;
        }
        if inner.unavailable {
            return;
        }
        let current: Vec<SubnetLease> = inner.leases.values().cloned().collect();
        let revision = Revision(inner.revision);
        inner.watchers.retain_mut(|(tx, known)| {
            let events = resync(known, &current);
            if events.is_empty() {
                return !tx.is_closed();
            }
            *known = current.clone();
            tx.unbounded_send(Ok(WatchBatch { events, revision, resync: false })).is_ok()
        });
    }

    fn op<T>(&self, f: impl FnOnce(&mut Inner, SystemTime) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut inner = self.lock();
        if inner.unavailable {
            return Err(StoreError::Unavailable { reason: "memory store switched off".into() });
        }
        self.settle(&mut inner);
        let result = f(&mut inner, (self.clock)());
        self.settle(&mut inner);
        result
    }
}

impl LeaseStore for MemStore {
    async fn get_config(&self) -> Result<NetworkConfig, StoreError> {
        self.op(|inner, _| inner.config.clone().ok_or(StoreError::ConfigMissing { key: "memory:config".into() }))
    }

    async fn put_config(&self, config: &NetworkConfig) -> Result<(), StoreError> {
        self.op(|inner, _| {
            inner.config = Some(config.clone());
            Ok(())
        })
    }

    async fn list(&self) -> Result<LeaseSnapshot, StoreError> {
        self.op(|inner, _| {
            Ok(LeaseSnapshot {
                leases: inner.leases.values().cloned().collect(),
                revision: Revision(inner.revision),
                unreadable: Vec::new(),
            })
        })
    }

    async fn create(&self, lease: &SubnetLease, ttl: Duration) -> Result<Option<SubnetLease>, StoreError> {
        self.op(|inner, now| {
            if inner.leases.contains_key(&lease.subnet) {
                return Ok(None);
            }
            inner.revision += 1;
            let created =
                SubnetLease { expiration: Some(now + ttl), created: Revision(inner.revision), ..lease.clone() };
            inner.leases.insert(lease.subnet, created.clone());
            Ok(Some(created))
        })
    }

    async fn renew(&self, lease: &SubnetLease, ttl: Duration) -> Result<SubnetLease, StoreError> {
        self.op(|inner, now| {
            let Some(current) = inner.leases.get_mut(&lease.subnet) else {
                return Err(StoreError::LeaseGone { subnet: lease.subnet });
            };
            if current.attrs.public_ip != lease.attrs.public_ip {
                return Err(StoreError::LeaseTaken { subnet: lease.subnet, holder: current.attrs.public_ip });
            }
            current.attrs = lease.attrs.clone();
            current.expiration = current.expiration.map(|_| now + ttl);
            let renewed = current.clone();
            inner.revision += 1;
            Ok(renewed)
        })
    }

    async fn release(&self, lease: &SubnetLease) -> Result<bool, StoreError> {
        self.op(|inner, _| match inner.leases.get(&lease.subnet) {
            Some(current) if current.attrs.public_ip == lease.attrs.public_ip => {
                inner.leases.remove(&lease.subnet);
                inner.revision += 1;
                Ok(true)
            }
            _ => Ok(false),
        })
    }

    async fn delete(&self, subnet: Ipv4Net) -> Result<bool, StoreError> {
        self.op(|inner, _| {
            let existed = inner.leases.remove(&subnet).is_some();
            if existed {
                inner.revision += 1;
            }
            Ok(existed)
        })
    }

    fn watch(&self, from: &LeaseSnapshot) -> impl Stream<Item = Result<WatchBatch, StoreError>> + Send + 'static {
        let (tx, rx) = mpsc::unbounded();
        let mut inner = self.lock();
        inner.watchers.push((tx, from.leases.clone()));
        self.settle(&mut inner);
        rx
    }
}
