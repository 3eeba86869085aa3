//! Carries out the address releases the CNI plugin recorded while this daemon could not be
//! reached ([`PendingReleases`]): once at start, before the API socket is served, then every
//! [`DRAIN_INTERVAL`]; and lets an ADD win over the record of the DEL before it.
//!
//! Why no address is leaked, and none is freed while in use:
//! 1. The plugin records a release only after the pod's host veth is gone, which took the
//!    container end with it (`cni::del`): no interface carries the address any more.
//! 2. A drain holds the directory's lock and, for each entry addressed to this daemon's API
//!    socket, frees what exactly that (container id, ifname) still holds, then removes the
//!    entry. An address the attachment no longer holds (freed by GC, by a DEL whose answer
//!    timed out, or handed to someone else since) is not touched; its entry just goes.
//! 3. Allocate (the plugin's ADD) first removes the attachment's entry under the same lock,
//!    then allocates. A runtime runs no two operations on one container at once (the CNI spec), so
//!    the DEL wrote its entry before the ADD that follows it began. Either a drain freed the
//!    address before that ADD allocated (which then gets a free address, maybe another), or the
//!    ADD removed the entry first and keeps the address the attachment still held: a
//!    container restarted under the same id never loses its new address to its old DEL.
//! 4. Files that are not entries (garbage, wrong names, unreadable) are skipped: warned about
//!    once per file while the daemon runs, counted in every [`DrainReport`], never acted on.
//!
//! Locks are always taken in one order, the pending directory's before the pod store's, and an
//! Allocate holds only one of them at a time, so the two never deadlock.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use weft_ipam::store::SkippedEntry;
use weft_ipam::{Attachment, PendingReleases, PodAddress, PodAllocator, PodError, PodStore, StoreError};

use super::api::ApiState;

/// How often the directory is drained while the daemon runs: entries also appear while it is
/// up (a DEL whose request timed out, or one that ran while the daemon was starting).
pub const DRAIN_INTERVAL: Duration = Duration::from_secs(30);

/// What one drain did.
#[derive(Debug, Default)]
pub struct DrainReport {
    /// Entries carried out: the attachment and the addresses freed for it.
    pub released: Vec<(Attachment, Vec<Ipv4Addr>)>,
    /// Entries removed without freeing anything: the attachment held no address any more.
    pub already_free: Vec<Attachment>,
    /// Entries addressed to another daemon's socket, left alone.
    pub other_daemon: usize,
    /// Entries kept for the next drain because freeing failed, with why.
    pub failed: Vec<(Attachment, String)>,
    /// Files that are not entries.
    pub skipped: Vec<SkippedEntry>,
    /// Temporary files of killed writers removed.
    pub swept: usize,
}

impl DrainReport {
    /// Whether the drain changed anything or found something to report.
    pub fn is_empty(&self) -> bool {
        self.released.is_empty()
            && self.already_free.is_empty()
            && self.failed.is_empty()
            && self.skipped.is_empty()
            && self.swept == 0
    }
}

/// One drain: frees what the entries addressed to `socket` ask for (steps 2 and 4). Without
/// the directory there is nothing to do, and nothing is created.
///
/// # Errors
/// The directory cannot be locked or listed; nothing was freed then. A failure to free one
/// entry is reported in [`DrainReport::failed`] and does not stop the others.
pub fn drain<S: PodStore>(
    spool: &PendingReleases,
    pods: &PodAllocator<S>,
    socket: &Path,
) -> Result<DrainReport, StoreError> {
    let report = spool.with_lock(|s| -> Result<DrainReport, StoreError> {
        let mut report = DrainReport { swept: s.sweep_temp_files()?, ..DrainReport::default() };
        let scan = s.scan()?;
        report.skipped = scan.skipped;
        for entry in scan.entries {
            if entry.socket.as_path() != socket {
                report.other_daemon += 1;
                continue;
            }
            let freed = match pods.release(&entry.attachment) {
                Ok(freed) => freed,
                Err(e) => {
                    report.failed.push((entry.attachment, e.to_string()));
                    continue;
                }
            };
            // Freed but still recorded is harmless: the next drain finds nothing held.
            if let Err(e) = s.remove(&entry.attachment) {
                report.failed.push((entry.attachment, e.to_string()));
            } else if freed.is_empty() {
                report.already_free.push(entry.attachment);
            } else {
                report.released.push((entry.attachment, freed));
            }
        }
        Ok(report)
    })?;
    Ok(report.unwrap_or_default())
}

/// Removes `who`'s pending release if one is recorded for `socket`; returns whether there was
/// one (step 3).
///
/// # Errors
/// The directory cannot be locked, or the entry cannot be removed.
pub fn cancel(spool: &PendingReleases, who: &Attachment, socket: &Path) -> Result<bool, StoreError> {
    let removed = spool.with_lock(|s| match s.get(who)? {
        Some(entry) if entry.socket.as_path() == socket => s.remove(who),
        _ => Ok(false),
    })?;
    Ok(removed.unwrap_or(false))
}

/// Allocate as the API serves it: cancels `who`'s pending release, then allocates (step 3).
///
/// # Errors
/// [`PodError`]; if the pending release cannot be cancelled, nothing is allocated, because the
/// release could otherwise free the address later while the pod uses it.
pub fn allocate<S: PodStore>(
    spool: &PendingReleases,
    pods: &PodAllocator<S>,
    socket: &Path,
    who: &Attachment,
) -> Result<PodAddress, PodError> {
    if cancel(spool, who, socket)? {
        info!(attachment = %who, "pending release cancelled: the attachment was added again");
    }
    pods.allocate(who)
}

/// Drains once, then spawns the task that drains every [`DRAIN_INTERVAL`]; abort the handle to
/// stop it. Call before the API socket is bound, so that a daemon which answers has already
/// freed what was recorded while it was down.
pub async fn start(state: Arc<ApiState>) -> JoinHandle<()> {
    let mut warned = HashSet::new();
    drain_and_log(&state, &mut warned).await;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(DRAIN_INTERVAL).await;
            drain_and_log(&state, &mut warned).await;
        }
    })
}

/// One drain on a blocking thread (file I/O and locks), logged. `warned` holds the skipped
/// files already warned about, so a file left in the directory is not logged every 30 s.
async fn drain_and_log(state: &Arc<ApiState>, warned: &mut HashSet<PathBuf>) {
    let st = Arc::clone(state);
    let dir = state.cfg.node.pending_release_dir.clone();
    let result = tokio::task::spawn_blocking(move || {
        drain(&PendingReleases::new(&st.cfg.node.pending_release_dir), &st.pods, &st.cfg.node.api_socket)
    })
    .await;
    let report = match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            warn!(dir = %dir.display(), error = %e, "pending releases: drain failed, retrying later");
            return;
        }
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "pending releases: drain task failed, retrying later");
            return;
        }
    };
    log_report(&dir, &report, warned);
}

fn log_report(dir: &Path, report: &DrainReport, warned: &mut HashSet<PathBuf>) {
    for (who, freed) in &report.released {
        info!(attachment = %who, addresses = ?freed, "pending release carried out");
    }
    for who in &report.already_free {
        debug!(attachment = %who, "pending release: the attachment held no address any more");
    }
    for (who, error) in &report.failed {
        warn!(attachment = %who, error = %error, "pending release failed, kept for the next drain");
    }
    warned.retain(|p| report.skipped.iter().any(|s| &s.path == p));
    for s in &report.skipped {
        if warned.insert(s.path.clone()) {
            warn!(file = %s.path.display(), reason = %s.reason, "pending releases: not an entry, skipped");
        }
    }
    if !report.is_empty() {
        info!(
            dir = %dir.display(),
            released = report.released.len(),
            already_free = report.already_free.len(),
            failed = report.failed.len(),
            skipped = report.skipped.len(),
            other_daemon = report.other_daemon,
            swept = report.swept,
            "pending releases drained"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use weft_ipam::{FilePodStore, PendingRelease, PodRecord};

    use super::*;

    const SOCKET: &str = "/run/weft/weft.sock";

    struct Node {
        _tmp: tempfile::TempDir,
        spool: PendingReleases,
        pods: PodAllocator<FilePodStore>,
    }

    fn node() -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let spool = PendingReleases::new(tmp.path().join("pending-release"));
        let store = FilePodStore::open(tmp.path().join("pods")).unwrap();
        let pods = PodAllocator::new(store, "10.244.1.0/24".parse().unwrap()).unwrap();
        Node { _tmp: tmp, spool, pods }
    }

    fn att(cid: &str, ifname: &str) -> Attachment {
        Attachment::new(cid, ifname).unwrap()
    }

    /// What the plugin's DEL records while the daemon at `socket` is unreachable.
    fn del_offline(n: &Node, who: &Attachment, socket: &str) {
        n.spool.record(&PendingRelease { attachment: who.clone(), socket: socket.into() }).unwrap();
    }

    fn held(n: &Node) -> Vec<String> {
        n.pods.allocations().unwrap().iter().filter_map(|r| r.owner.as_ref().map(ToString::to_string)).collect()
    }

    fn entries(n: &Node) -> usize {
        n.spool.with_lock(|s| s.scan()).unwrap().map_or(0, |scan| scan.entries.len())
    }

    #[test]
    fn a_recorded_release_frees_exactly_that_attachments_address() {
        let n = node();
        let a = n.pods.allocate(&att("c1", "eth0")).unwrap().address.addr();
        n.pods.allocate(&att("c1", "net1")).unwrap();
        n.pods.allocate(&att("c2", "eth0")).unwrap();
        del_offline(&n, &att("c1", "eth0"), SOCKET);

        let r = drain(&n.spool, &n.pods, Path::new(SOCKET)).unwrap();
        assert_eq!(r.released, vec![(att("c1", "eth0"), vec![a])]);
        assert!(r.failed.is_empty() && r.skipped.is_empty() && r.already_free.is_empty());
        assert_eq!(held(&n), ["c1/net1", "c2/eth0"]);
        assert_eq!(entries(&n), 0, "a carried-out entry is removed");
        assert!(drain(&n.spool, &n.pods, Path::new(SOCKET)).unwrap().is_empty(), "nothing left to do");
    }

    #[test]
    fn an_add_after_the_del_cancels_its_pending_release() {
        let n = node();
        let who = att("c1", "eth0");
        let a = n.pods.allocate(&who).unwrap();
        del_offline(&n, &who, SOCKET);
        // The container is restarted under the same id before any drain ran: its ADD keeps the
        // address the attachment still holds, and the old DEL's record is void.
        assert_eq!(allocate(&n.spool, &n.pods, Path::new(SOCKET), &who).unwrap(), a);
        assert_eq!(entries(&n), 0);
        let r = drain(&n.spool, &n.pods, Path::new(SOCKET)).unwrap();
        assert!(r.released.is_empty(), "freed an address a later ADD holds: {r:?}");
        assert_eq!(n.pods.get(&who).unwrap(), Some(a));
        // The other order: the drain ran first, so the ADD gets a free address.
        del_offline(&n, &who, SOCKET);
        assert_eq!(drain(&n.spool, &n.pods, Path::new(SOCKET)).unwrap().released.len(), 1);
        assert!(n.pods.get(&who).unwrap().is_none());
        assert!(allocate(&n.spool, &n.pods, Path::new(SOCKET), &who).is_ok());
    }

    #[test]
    fn entries_for_another_daemon_are_left_alone() {
        let n = node();
        let who = att("c1", "eth0");
        n.pods.allocate(&who).unwrap();
        del_offline(&n, &who, "/run/weft/other.sock");
        let r = drain(&n.spool, &n.pods, Path::new(SOCKET)).unwrap();
        assert_eq!((r.other_daemon, r.released.len()), (1, 0));
        assert!(!cancel(&n.spool, &who, Path::new(SOCKET)).unwrap());
        assert_eq!(held(&n), ["c1/eth0"]);
        assert_eq!(entries(&n), 1);
    }

    #[test]
    fn an_entry_whose_address_is_gone_is_removed_without_freeing_anything() {
        let n = node();
        // The DEL's request reached the daemon and freed the address, but the answer timed
        // out; the address went to another pod since.
        let who = att("c1", "eth0");
        n.pods.allocate(&who).unwrap();
        n.pods.release(&who).unwrap();
        n.pods.allocate(&att("c2", "eth0")).unwrap();
        del_offline(&n, &who, SOCKET);
        let r = drain(&n.spool, &n.pods, Path::new(SOCKET)).unwrap();
        assert_eq!((r.already_free, r.released.len()), (vec![who], 0));
        assert_eq!(held(&n), ["c2/eth0"]);
        assert_eq!(entries(&n), 0);
    }

    #[test]
    fn untrusted_files_are_skipped_and_counted_and_the_rest_still_drained() {
        let n = node();
        let who = att("c1", "eth0");
        n.pods.allocate(&who).unwrap();
        n.pods.allocate(&att("c2", "eth0")).unwrap();
        del_offline(&n, &who, SOCKET);
        let d = n.spool.dir();
        fs::write(d.join("garbage"), b"{{{").unwrap();
        // A copy of a real entry under another attachment's name must not free c1 again, nor c2.
        fs::write(d.join("c2:eth0"), fs::read(n.spool.path(&who)).unwrap()).unwrap();
        fs::create_dir(d.join("c3:eth0")).unwrap();
        fs::write(d.join(".c4:eth0.tmp.1.1"), b"half").unwrap();

        let r = drain(&n.spool, &n.pods, Path::new(SOCKET)).unwrap();
        assert_eq!(r.released.len(), 1);
        assert_eq!(r.skipped.len(), 3, "{:?}", r.skipped);
        assert_eq!(r.swept, 1);
        assert_eq!(held(&n), ["c2/eth0"]);
        // Logged once per file, not on every drain.
        let mut warned = HashSet::new();
        log_report(d, &r, &mut warned);
        assert_eq!(warned.len(), 3);
        let again = drain(&n.spool, &n.pods, Path::new(SOCKET)).unwrap();
        assert_eq!(again.skipped.len(), 3);
    }

    #[test]
    fn without_the_directory_there_is_nothing_to_do() {
        let n = node();
        n.pods.allocate(&att("c1", "eth0")).unwrap();
        assert!(drain(&n.spool, &n.pods, Path::new(SOCKET)).unwrap().is_empty());
        assert!(allocate(&n.spool, &n.pods, Path::new(SOCKET), &att("c2", "eth0")).is_ok());
        assert!(!n.spool.dir().exists());
    }

    /// A pod store whose `remove` fails, for the "kept for the next drain" path.
    struct FailingRemove(FilePodStore);

    impl PodStore for FailingRemove {
        fn with_lock<T, E: From<StoreError>>(&self, f: impl FnOnce(&Self) -> Result<T, E>) -> Result<T, E> {
            self.0.with_lock(|_| f(self))
        }
        fn records(&self) -> Result<Vec<PodRecord>, StoreError> {
            self.0.records()
        }
        fn claim(&self, ip: Ipv4Addr, owner: &Attachment) -> Result<bool, StoreError> {
            self.0.claim(ip, owner)
        }
        fn remove(&self, ip: Ipv4Addr) -> Result<bool, StoreError> {
            Err(StoreError::Io { path: ip.to_string().into(), source: std::io::Error::other("read-only file system") })
        }
        fn last_reserved(&self) -> Result<Option<Ipv4Addr>, StoreError> {
            self.0.last_reserved()
        }
        fn set_last_reserved(&self, ip: Ipv4Addr) -> Result<(), StoreError> {
            self.0.set_last_reserved(ip)
        }
    }

    #[test]
    fn a_release_that_fails_is_kept_for_the_next_drain() {
        let n = node();
        let who = att("c1", "eth0");
        n.pods.allocate(&who).unwrap();
        del_offline(&n, &who, SOCKET);
        let failing = PodAllocator::new(FailingRemove(n.pods.store().clone()), n.pods.subnet()).unwrap();
        let r = drain(&n.spool, &failing, Path::new(SOCKET)).unwrap();
        assert_eq!(r.failed.len(), 1);
        assert!(r.failed[0].1.contains("read-only file system"), "{r:?}");
        assert_eq!(entries(&n), 1);
        assert_eq!(drain(&n.spool, &n.pods, Path::new(SOCKET)).unwrap().released.len(), 1);
        assert_eq!(entries(&n), 0);
    }
}
