//! The embedded lease store: a directory of atomically written files under an advisory lock.
//!
//! ```text
//! /var/lib/weft/store/      0700: nobody else can open the lock, so nobody else can hold it
//!   lock                    flock(2) target: exclusive for writes, shared for lists (0600)
//!   config                  the network config (flannel net-conf JSON)
//!   revision                a decimal counter, bumped after every lease write
//!   subnets/10.244.1.0-24   one lease record per subnet (flannel's key as the file name)
//! ```
//!
//! Several weft processes on one machine can share the directory (the local lab does): every
//! write holds the exclusive lock, so "create if absent" is a real test-and-set across
//! processes. Every file is replaced by temp + fsync + rename + fsync dir, so `kill -9` at any
//! instant leaves each record either old or new, never half-written (see `durable`).
//! Expiry is honoured on read: a record past its expiration is treated as absent, listed by
//! nobody and overwritten by the next create.
//!
//! Watching polls the `revision` file (every 100 ms by default, so a new node is seen well
//! within the 1 s goal) and re-lists only when it changed, when a known lease expires, or every
//! few seconds as a safety net for a writer killed between writing a record and bumping the
//! counter.
//!
//! The `blocking_*` methods do blocking file I/O (a few fsyncs; at most `lock_timeout` waiting
//! for the lock), with an explicit `now` for tests with a fake clock. The [`LeaseStore`] methods
//! run them on a thread of their own, so an async caller is never stalled by a slow disk or a
//! lock another process holds.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use futures::channel::mpsc;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{LeaseSnapshot, LeaseStore, Revision, StoreError, UnreadableLease, WatchBatch};
use crate::backoff::Backoff;
use crate::config::NetworkConfig;
use crate::durable::{self, FileLock};
use crate::lease::{LeaseAttrs, LeaseKey, SubnetLease};
use crate::watch::resync;

/// Tunables of a [`FileStore`].
#[derive(Clone, Debug)]
pub struct FileStoreOptions {
    /// How long an operation waits for another process's lock before failing as unavailable.
    pub lock_timeout: Duration,
    /// How often a watch checks the revision counter.
    pub poll_interval: Duration,
    /// How often a watch re-lists even though the counter did not move.
    pub full_resync_interval: Duration,
}

impl Default for FileStoreOptions {
    fn default() -> Self {
        Self {
            lock_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(100),
            full_resync_interval: Duration::from_secs(5),
        }
    }
}

/// The embedded lease store (see the module docs for the layout and guarantees).
#[derive(Clone, Debug)]
pub struct FileStore {
    dir: PathBuf,
    options: FileStoreOptions,
}

/// A lease file's contents. The attributes are flannel's lease JSON; the expiration is unix
/// milliseconds, `null` for a reservation.
#[derive(Deserialize, Serialize)]
struct Record {
    #[serde(rename = "ExpirationUnixMs")]
    expiration_unix_ms: Option<u64>,
    #[serde(rename = "Attrs")]
    attrs: LeaseAttrs,
    /// The store revision the record was created at (absent in records from before it was
    /// kept: they count as oldest).
    #[serde(rename = "CreatedRevision", default, skip_serializing_if = "Option::is_none")]
    created_revision: Option<u64>,
}

enum Stored {
    Absent,
    Live(SubnetLease),
    Unreadable(String),
}

impl FileStore {
    /// The default directory.
    pub const DEFAULT_DIR: &'static str = "/var/lib/weft/store";

    /// Opens (creating if needed) the store in `dir` with default options.
    ///
    /// # Errors
    /// The directory cannot be created or locked.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::open_with(dir, FileStoreOptions::default())
    }

    /// Opens (creating if needed) the store in `dir`, and removes temporary files left by
    /// writers that died mid-write. `dir` and `dir/subnets` are made 0700 and the lock file
    /// 0600, so no other user can hold the lock (see `durable`).
    ///
    /// # Errors
    /// The directory cannot be created or locked, or it or the lock file belongs to another
    /// user.
    pub fn open_with(dir: impl Into<PathBuf>, options: FileStoreOptions) -> Result<Self, StoreError> {
        let store = Self { dir: dir.into(), options };
        let subnets = store.subnets_dir();
        durable::private_dir(&store.dir).map_err(StoreError::from_path)?;
        durable::private_dir(&subnets).map_err(StoreError::from_path)?;
        let _lock = store.lock(true)?;
        durable::sweep_temp_files(&store.dir).map_err(StoreError::from_path)?;
        durable::sweep_temp_files(&subnets).map_err(StoreError::from_path)?;
        Ok(store)
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn subnets_dir(&self) -> PathBuf {
        self.dir.join("subnets")
    }

    fn lease_path(&self, subnet: Ipv4Net) -> PathBuf {
        self.subnets_dir().join(LeaseKey(subnet).to_string())
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("config")
    }

    fn revision_path(&self) -> PathBuf {
        self.dir.join("revision")
    }

    fn lock(&self, exclusive: bool) -> Result<FileLock, StoreError> {
        durable::lock(&self.dir.join("lock"), exclusive, self.options.lock_timeout).map_err(StoreError::from_lock)
    }

    /// The current revision counter (0 before the first write).
    ///
    /// # Errors
    /// I/O errors, or a counter that does not parse.
    pub fn revision(&self) -> Result<Revision, StoreError> {
        let path = self.revision_path();
        let Some(bytes) = durable::read_optional(&path).map_err(StoreError::from_path)? else {
            return Ok(Revision(0));
        };
        let text = String::from_utf8_lossy(&bytes);
        text.trim().parse::<u64>().map(Revision).map_err(|_| StoreError::Corrupt {
            key: path.display().to_string(),
            reason: format!("{:?} is not a revision number", text.trim()),
        })
    }

    fn bump_revision(&self) -> Result<Revision, StoreError> {
        let next = Revision(self.revision()?.0.saturating_add(1));
        durable::write_atomic(&self.revision_path(), format!("{next}\n").as_bytes()).map_err(StoreError::from_path)?;
        Ok(next)
    }

    fn read_record(&self, subnet: Ipv4Net, now: SystemTime) -> Result<Stored, StoreError> {
        let path = self.lease_path(subnet);
        let Some(bytes) = durable::read_optional(&path).map_err(StoreError::from_path)? else {
            return Ok(Stored::Absent);
        };
        Ok(match serde_json::from_slice::<Record>(&bytes) {
            Ok(rec) => {
                let lease = SubnetLease {
                    subnet,
                    attrs: rec.attrs,
                    expiration: rec.expiration_unix_ms.map(from_unix_ms),
                    created: Revision(rec.created_revision.unwrap_or(0)),
                };
                if lease.is_expired(now) { Stored::Absent } else { Stored::Live(lease) }
            }
            Err(e) => Stored::Unreadable(e.to_string()),
        })
    }

    fn write_record(&self, lease: &SubnetLease) -> Result<(), StoreError> {
        let rec = Record {
            expiration_unix_ms: lease.expiration.map(to_unix_ms),
            attrs: lease.attrs.clone(),
            created_revision: (lease.created.0 > 0).then_some(lease.created.0),
        };
        let bytes = serde_json::to_vec(&rec).map_err(|e| StoreError::Corrupt {
            key: self.lease_path(lease.subnet).display().to_string(),
            reason: format!("cannot encode: {e}"),
        })?;
        durable::write_atomic(&self.lease_path(lease.subnet), &bytes).map_err(StoreError::from_path)
    }

    /// [`LeaseStore::get_config`], blocking.
    ///
    /// # Errors
    /// As the trait method.
    pub fn blocking_get_config(&self) -> Result<NetworkConfig, StoreError> {
        let path = self.config_path();
        let key = path.display().to_string();
        let bytes = durable::read_optional(&path).map_err(StoreError::from_path)?;
        let Some(bytes) = bytes else { return Err(StoreError::ConfigMissing { key }) };
        NetworkConfig::from_json(&String::from_utf8_lossy(&bytes))
            .map_err(|source| StoreError::InvalidConfig { key, source })
    }

    /// [`LeaseStore::put_config`], blocking.
    ///
    /// # Errors
    /// As the trait method.
    pub fn blocking_put_config(&self, config: &NetworkConfig) -> Result<(), StoreError> {
        let _lock = self.lock(true)?;
        durable::write_atomic(&self.config_path(), config.to_json().as_bytes()).map_err(StoreError::from_path)
    }

    /// [`LeaseStore::list`] at `now`, blocking.
    ///
    /// # Errors
    /// As the trait method.
    pub fn blocking_list(&self, now: SystemTime) -> Result<LeaseSnapshot, StoreError> {
        let _lock = self.lock(false)?;
        let revision = self.revision()?;
        let dir = self.subnets_dir();
        let mut snap = LeaseSnapshot { revision, ..LeaseSnapshot::default() };
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::Io { path: dir.clone(), source: e })? {
            let entry = entry.map_err(|e| StoreError::Io { path: dir.clone(), source: e })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let key = entry.path().display().to_string();
            let subnet = match name.parse::<LeaseKey>() {
                Ok(k) => k.subnet(),
                Err(e) => {
                    snap.unreadable.push(UnreadableLease { key, subnet: None, reason: e.to_string() });
                    continue;
                }
            };
            match self.read_record(subnet, now)? {
                Stored::Absent => {}
                Stored::Live(lease) => snap.leases.push(lease),
                Stored::Unreadable(reason) => {
                    snap.unreadable.push(UnreadableLease { key, subnet: Some(subnet), reason })
                }
            }
        }
        snap.leases.sort_by_key(|l| l.subnet);
        Ok(snap)
    }

    /// [`LeaseStore::create`] at `now`, blocking.
    ///
    /// # Errors
    /// As the trait method.
    pub fn blocking_create(
        &self,
        lease: &SubnetLease,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Option<SubnetLease>, StoreError> {
        let _lock = self.lock(true)?;
        durable::sweep_temp_files(&self.subnets_dir()).map_err(StoreError::from_path)?;
        match self.read_record(lease.subnet, now)? {
            Stored::Absent => {}
            // A record we cannot read is still somebody's: never overwrite it.
            Stored::Live(_) | Stored::Unreadable(_) => return Ok(None),
        }
        let revision = Revision(self.revision()?.0.saturating_add(1));
        let created = SubnetLease { expiration: Some(expiry(now, ttl)), created: revision, ..lease.clone() };
        self.write_record(&created)?;
        self.bump_revision()?;
        Ok(Some(created))
    }

    /// [`LeaseStore::renew`] at `now`, blocking.
    ///
    /// # Errors
    /// As the trait method; an unreadable record at our key is [`StoreError::Corrupt`].
    pub fn blocking_renew(
        &self,
        lease: &SubnetLease,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<SubnetLease, StoreError> {
        let _lock = self.lock(true)?;
        let current = match self.read_record(lease.subnet, now)? {
            Stored::Absent => return Err(StoreError::LeaseGone { subnet: lease.subnet }),
            Stored::Unreadable(reason) => {
                return Err(StoreError::Corrupt { key: self.lease_path(lease.subnet).display().to_string(), reason });
            }
            Stored::Live(current) => current,
        };
        if current.attrs.public_ip != lease.attrs.public_ip {
            return Err(StoreError::LeaseTaken { subnet: lease.subnet, holder: current.attrs.public_ip });
        }
        let renewed = SubnetLease {
            subnet: lease.subnet,
            attrs: lease.attrs.clone(),
            expiration: current.expiration.map(|_| expiry(now, ttl)),
            created: current.created,
        };
        self.write_record(&renewed)?;
        self.bump_revision()?;
        Ok(renewed)
    }

    /// [`LeaseStore::release`] at `now`, blocking.
    ///
    /// # Errors
    /// As the trait method.
    pub fn blocking_release(&self, lease: &SubnetLease, now: SystemTime) -> Result<bool, StoreError> {
        let _lock = self.lock(true)?;
        match self.read_record(lease.subnet, now)? {
            Stored::Live(current) if current.attrs.public_ip == lease.attrs.public_ip => {
                durable::remove(&self.lease_path(lease.subnet)).map_err(StoreError::from_path)?;
                self.bump_revision()?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// [`LeaseStore::delete`], blocking.
    ///
    /// # Errors
    /// As the trait method.
    pub fn blocking_delete(&self, subnet: Ipv4Net) -> Result<bool, StoreError> {
        let _lock = self.lock(true)?;
        let existed = durable::remove(&self.lease_path(subnet)).map_err(StoreError::from_path)?;
        if existed {
            self.bump_revision()?;
        }
        Ok(existed)
    }

    fn watch_thread(self, mut known: Vec<SubnetLease>, mut seen: Revision, tx: mpsc::UnboundedSender<WatchItem>) {
        let poll = self.options.poll_interval;
        let mut backoff = Backoff::new(poll.max(Duration::from_millis(10)), Duration::from_secs(5));
        let mut rng = rand::rng();
        let mut next_full = Instant::now() + self.options.full_resync_interval;
        let mut delay = poll;
        loop {
            std::thread::sleep(delay);
            if tx.is_closed() {
                return;
            }
            let now = SystemTime::now();
            let revision = match self.revision() {
                Ok(r) => r,
                Err(e) => {
                    delay = backoff.next_delay(&mut rng);
                    if tx.unbounded_send(Err(e)).is_err() {
                        return;
                    }
                    continue;
                }
            };
            let moved = revision != seen;
            let expiry_due = known.iter().any(|l| l.is_expired(now));
            let full_due = Instant::now() >= next_full;
            if !moved && !expiry_due && !full_due {
                delay = poll;
                continue;
            }
            let item = match self.blocking_list(now) {
                Ok(snap) => {
                    backoff.reset();
                    delay = poll;
                    next_full = Instant::now() + self.options.full_resync_interval;
                    let events = resync(&known, &snap.leases);
                    known = snap.leases;
                    seen = snap.revision;
                    if events.is_empty() {
                        continue;
                    }
                    // Changes that neither the counter nor an expiry explains: a writer died
                    // between its record and the counter. Flag it like a resync.
                    let resync = !moved && !expiry_due;
                    Ok(WatchBatch { events, revision: snap.revision, resync })
                }
                Err(e) => {
                    delay = backoff.next_delay(&mut rng);
                    Err(e)
                }
            };
            if tx.unbounded_send(item).is_err() {
                return;
            }
        }
    }
}

type WatchItem = Result<WatchBatch, StoreError>;

impl FileStore {
    /// Runs the blocking operation `op` on a thread of its own and awaits its answer, so that
    /// fsyncs and a lock held by another process (up to `lock_timeout`) never stall the
    /// caller's async runtime: the daemon's lease loop shares its thread with the API, the
    /// signal handling and the netlink connection. An operation is rare (start-up, renewals,
    /// resyncs), so a thread per call costs nothing that matters and needs no runtime.
    async fn off_thread<T: Send + 'static>(
        &self,
        op: impl FnOnce(&FileStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = futures::channel::oneshot::channel();
        let store = self.clone();
        std::thread::Builder::new()
            .name("weft-file-store".into())
            .spawn(move || {
                let _ = tx.send(op(&store));
            })
            .map_err(|e| StoreError::Io {
                path: self.dir.clone(),
                source: io::Error::new(e.kind(), format!("cannot start a store thread: {e}")),
            })?;
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable { reason: format!("{}: store thread died", self.dir.display()) })
        })
    }
}

impl LeaseStore for FileStore {
    async fn get_config(&self) -> Result<NetworkConfig, StoreError> {
        self.off_thread(FileStore::blocking_get_config).await
    }

    async fn put_config(&self, config: &NetworkConfig) -> Result<(), StoreError> {
        let config = config.clone();
        self.off_thread(move |s| s.blocking_put_config(&config)).await
    }

    async fn list(&self) -> Result<LeaseSnapshot, StoreError> {
        self.off_thread(|s| s.blocking_list(SystemTime::now())).await
    }

    async fn create(&self, lease: &SubnetLease, ttl: Duration) -> Result<Option<SubnetLease>, StoreError> {
        let lease = lease.clone();
        self.off_thread(move |s| s.blocking_create(&lease, ttl, SystemTime::now())).await
    }

    async fn renew(&self, lease: &SubnetLease, ttl: Duration) -> Result<SubnetLease, StoreError> {
        let lease = lease.clone();
        self.off_thread(move |s| s.blocking_renew(&lease, ttl, SystemTime::now())).await
    }

    async fn release(&self, lease: &SubnetLease) -> Result<bool, StoreError> {
        let lease = lease.clone();
        self.off_thread(move |s| s.blocking_release(&lease, SystemTime::now())).await
    }

    async fn delete(&self, subnet: Ipv4Net) -> Result<bool, StoreError> {
        self.off_thread(move |s| s.blocking_delete(subnet)).await
    }

    /// Polls from a thread of its own, which exits once the stream is dropped (at the next poll).
    fn watch(&self, from: &LeaseSnapshot) -> impl Stream<Item = Result<WatchBatch, StoreError>> + Send + 'static {
        let (tx, rx) = mpsc::unbounded();
        let store = self.clone();
        let (known, seen) = (from.leases.clone(), from.revision);
        let spawned = std::thread::Builder::new()
            .name("weft-file-watch".into())
            .spawn(move || store.watch_thread(known, seen, tx));
        if let Err(e) = spawned {
            // The sender went down with the closure; report through a fresh channel.
            let (tx, rx) = mpsc::unbounded();
            let _ = tx.unbounded_send(Err(StoreError::Io {
                path: self.dir.clone(),
                source: io::Error::new(e.kind(), format!("cannot start the watch thread: {e}")),
            }));
            return futures::future::Either::Left(rx);
        }
        futures::future::Either::Right(rx)
    }
}

/// `now + ttl` at the millisecond precision records keep, rounded down (never later than the
/// record says).
fn expiry(now: SystemTime, ttl: Duration) -> SystemTime {
    from_unix_ms(to_unix_ms(now.checked_add(ttl).unwrap_or(now)))
}

fn to_unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const TTL: Duration = Duration::from_secs(10);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn lease(third: u8, host: u8) -> SubnetLease {
        SubnetLease {
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), 24).unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, host), "udp"),
            expiration: None,
            created: Revision(0),
        }
    }

    /// The lock-file denial of service (anyone who can open the lock can hold it) is closed
    /// for new stores and for an older weft's 0755/0644 layout alike.
    #[test]
    fn store_directories_and_lock_are_private_also_after_an_upgrade() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let s = FileStore::open(&root).unwrap();
        s.blocking_create(&lease(1, 1), TTL, t(0)).unwrap().unwrap();
        assert_eq!((mode(&root), mode(&root.join("subnets")), mode(&root.join("lock"))), (0o700, 0o700, 0o600));
        assert_eq!(mode(&root.join("subnets/10.244.1.0-24")), 0o600);
        for (p, m) in [(root.clone(), 0o755), (root.join("subnets"), 0o755), (root.join("lock"), 0o644)] {
            fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        }
        let s = FileStore::open(&root).unwrap();
        assert_eq!((mode(&root), mode(&root.join("subnets")), mode(&root.join("lock"))), (0o700, 0o700, 0o600));
        assert_eq!(s.blocking_list(t(1)).unwrap().leases.len(), 1);
    }

    #[test]
    fn create_is_if_absent_and_expiry_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        assert_eq!(s.revision().unwrap(), Revision(0));
        let a = s.blocking_create(&lease(1, 1), TTL, t(0)).unwrap().unwrap();
        assert_eq!(a.expiration, Some(t(10)));
        assert_eq!(s.blocking_create(&lease(1, 2), TTL, t(5)).unwrap(), None, "live lease must not be replaced");
        let snap = s.blocking_list(t(5)).unwrap();
        assert_eq!(snap.leases, vec![a.clone()]);
        assert_eq!(snap.revision, Revision(1));
        assert!(s.blocking_list(t(10)).unwrap().leases.is_empty(), "expired at its expiration");
        let b = s.blocking_create(&lease(1, 2), TTL, t(10)).unwrap().unwrap();
        assert_eq!(b.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 2));
    }

    #[test]
    fn a_held_lock_does_not_stall_the_async_caller() {
        use futures::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let opts = FileStoreOptions { lock_timeout: Duration::from_secs(3), ..FileStoreOptions::default() };
        let s = FileStore::open_with(dir.path(), opts).unwrap();
        // Another process (here: another descriptor) holds the store's lock.
        let held = durable::lock(&dir.path().join("lock"), true, Duration::from_secs(1)).unwrap();
        let t = Instant::now();
        let mut list = Box::pin(s.list());
        assert!(list.as_mut().now_or_never().is_none(), "the lock wait must not run on the caller's thread");
        assert!(t.elapsed() < Duration::from_secs(1), "polling took {:?}", t.elapsed());
        drop(held);
        assert!(futures::executor::block_on(list).unwrap().leases.is_empty());
    }

    #[test]
    fn creation_revision_is_recorded_and_kept_by_renewals() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        let a = s.blocking_create(&lease(1, 1), TTL, t(0)).unwrap().unwrap();
        let b = s.blocking_create(&lease(2, 2), TTL, t(0)).unwrap().unwrap();
        assert_eq!((a.created, b.created), (Revision(1), Revision(2)));
        let renewed = s.blocking_renew(&lease(1, 1), TTL, t(5)).unwrap();
        assert_eq!(renewed.created, Revision(1), "a renewal is not a new record");
        let listed = s.blocking_list(t(5)).unwrap().leases;
        assert_eq!(listed.iter().map(|l| l.created).collect::<Vec<_>>(), [Revision(1), Revision(2)]);
        // A record from before the field existed reads as the oldest.
        fs::write(
            dir.path().join("subnets/10.244.9.0-24"),
            br#"{"ExpirationUnixMs":null,"Attrs":{"PublicIP":"198.18.0.9"}}"#,
        )
        .unwrap();
        let old = s.blocking_list(t(5)).unwrap().leases.into_iter().find(|l| l.subnet == lease(9, 9).subnet).unwrap();
        assert_eq!(old.created, Revision(0));
    }

    #[test]
    fn renew_release_only_touch_our_own_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        s.blocking_create(&lease(1, 1), TTL, t(0)).unwrap().unwrap();
        let renewed = s.blocking_renew(&lease(1, 1), TTL, t(8)).unwrap();
        assert_eq!(renewed.expiration, Some(t(18)));
        assert!(matches!(
            s.blocking_renew(&lease(1, 2), TTL, t(9)),
            Err(StoreError::LeaseTaken { holder, .. }) if holder == Ipv4Addr::new(198, 18, 0, 1)
        ));
        assert!(matches!(s.blocking_renew(&lease(2, 1), TTL, t(9)), Err(StoreError::LeaseGone { .. })));
        assert!(matches!(s.blocking_renew(&lease(1, 1), TTL, t(18)), Err(StoreError::LeaseGone { .. })));
        assert!(!s.blocking_release(&lease(1, 2), t(9)).unwrap());
        assert!(s.blocking_release(&lease(1, 1), t(9)).unwrap());
        assert!(s.blocking_list(t(9)).unwrap().leases.is_empty());
    }

    #[test]
    fn reservations_never_expire_and_stay_reservations() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        s.write_record(&lease(3, 3)).unwrap();
        assert_eq!(s.blocking_list(t(1_000_000)).unwrap().leases.len(), 1);
        assert_eq!(s.blocking_create(&lease(3, 4), TTL, t(0)).unwrap(), None);
        assert_eq!(s.blocking_renew(&lease(3, 3), TTL, t(0)).unwrap().expiration, None);
    }

    #[test]
    fn unreadable_records_are_reported_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        fs::write(dir.path().join("subnets/10.244.4.0-24"), b"{\"Attrs\":").unwrap();
        fs::write(dir.path().join("subnets/not-a-key"), b"{}").unwrap();
        fs::write(dir.path().join("subnets/.10.244.5.0-24.tmp.1.1"), b"half").unwrap();
        let snap = s.blocking_list(t(0)).unwrap();
        assert!(snap.leases.is_empty());
        assert_eq!(snap.unreadable.len(), 2);
        assert!(snap.taken().any(|n| n == lease(4, 1).subnet));
        assert_eq!(s.blocking_create(&lease(4, 1), TTL, t(0)).unwrap(), None);
    }

    #[test]
    fn config_missing_invalid_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        let err = s.blocking_get_config().unwrap_err();
        assert!(matches!(err, StoreError::ConfigMissing { .. }), "{err}");
        fs::write(dir.path().join("config"), r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#).unwrap();
        let err = s.blocking_get_config().unwrap_err().to_string();
        assert!(err.ends_with("SubnetLen: 31 must be between 18 and 30 for Network 10.244.0.0/16"), "{err}");
        let cfg = NetworkConfig::from_json(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        s.blocking_put_config(&cfg).unwrap();
        assert_eq!(s.blocking_get_config().unwrap(), cfg);
    }

    #[test]
    fn watch_sees_create_change_expiry_and_delete() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let opts = FileStoreOptions { poll_interval: Duration::from_millis(10), ..FileStoreOptions::default() };
        let s = FileStore::open_with(dir.path(), opts).unwrap();
        let snap = s.blocking_list(SystemTime::now()).unwrap();
        let mut w = s.watch(&snap);
        fn next(w: &mut (impl futures::Stream<Item = Result<WatchBatch, StoreError>> + Unpin)) -> WatchBatch {
            futures::executor::block_on(StreamExt::next(w)).unwrap().unwrap()
        }
        let created = s.blocking_create(&lease(1, 1), Duration::from_millis(600), SystemTime::now()).unwrap().unwrap();
        let b = next(&mut w);
        assert_eq!(b.events, vec![crate::LeaseEvent::Added(created.clone())]);
        assert!(!b.resync);
        // A renewal with the same attributes is not an event; an expiry is.
        s.blocking_renew(&lease(1, 1), Duration::from_millis(300), SystemTime::now()).unwrap();
        let b = next(&mut w);
        assert_eq!(b.events, vec![crate::LeaseEvent::Removed(created.subnet)]);
        s.blocking_create(&lease(2, 2), TTL, SystemTime::now()).unwrap().unwrap();
        assert!(matches!(&next(&mut w).events[..], [crate::LeaseEvent::Added(l)] if l.subnet == lease(2, 2).subnet));
        s.blocking_delete(lease(2, 2).subnet).unwrap();
        assert_eq!(next(&mut w).events, vec![crate::LeaseEvent::Removed(lease(2, 2).subnet)]);
    }
}
