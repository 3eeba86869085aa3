//! Pod address records on disk, in CNI host-local's layout.
//!
//! ```text
//! /var/lib/weft/pods/<node>/   0700: nobody else can open the lock, so nobody else can hold it
//!   lock                 flock(2) target held for each whole allocator operation (0600)
//!   10.244.1.7           "<container id>\r\n<ifname>" (host-local's format)
//!   last_reserved_ip.0   the round-robin cursor
//! ```
//!
//! Unlike host-local, a record is claimed complete or not at all: the content is written to a
//! temporary file, fsynced, then hard-linked to the address's name, which fails if the name
//! exists (create-if-absent even against a writer that ignores the lock). host-local creates the
//! file with `O_EXCL` first and writes after, so a crash in between leaves an empty record.
//! Keep the directory per node: in a shared lab directory two nodes' subnets differ, but their
//! cursors would not.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{PodRecord, PodStore, StoreError};
use crate::durable;
use crate::pod::{Attachment, ContainerId, IfName};

const CURSOR: &str = "last_reserved_ip.0";

/// Pod address records in a directory (see the module docs).
#[derive(Clone, Debug)]
pub struct FilePodStore {
    dir: PathBuf,
    lock_timeout: Duration,
}

impl FilePodStore {
    /// The default directory.
    pub const DEFAULT_DIR: &'static str = "/var/lib/weft/pods";

    /// Opens (creating if needed) the store in `dir` and removes temporary files left by a
    /// writer that died mid-claim. `dir` is made 0700 and the lock file 0600, so no other user
    /// can hold the lock and freeze ADD/DEL (see `durable`).
    ///
    /// # Errors
    /// The directory cannot be created or locked, or it or the lock file belongs to another
    /// user.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let store = Self { dir: dir.into(), lock_timeout: Duration::from_secs(10) };
        durable::private_dir(&store.dir).map_err(StoreError::from_path)?;
        store.with_lock(|s| durable::sweep_temp_files(&s.dir).map(|_| ()).map_err(StoreError::from_path))?;
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, ip: Ipv4Addr) -> PathBuf {
        self.dir.join(ip.to_string())
    }
}

/// Parses host-local's record: container id, CRLF (or LF), interface name; whitespace around
/// is ignored ("ignores whitespace in disk files" is one of host-local's tests).
fn parse_owner(bytes: &[u8]) -> Option<Attachment> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.trim().lines().map(str::trim);
    let container_id = ContainerId::new(lines.next()?).ok()?;
    let if_name = IfName::new(lines.next()?).ok()?;
    lines.next().is_none().then_some(Attachment { container_id, if_name })
}

impl PodStore for FilePodStore {
    fn with_lock<T, E: From<StoreError>>(&self, f: impl FnOnce(&Self) -> Result<T, E>) -> Result<T, E> {
        let _lock = durable::lock(&self.dir.join("lock"), true, self.lock_timeout).map_err(StoreError::from_lock)?;
        f(self)
    }

    fn records(&self) -> Result<Vec<PodRecord>, StoreError> {
        let io = |e| StoreError::Io { path: self.dir.clone(), source: e };
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let Ok(ip) = entry.file_name().to_string_lossy().parse::<Ipv4Addr>() else { continue };
            let path = entry.path();
            // Vanished between read_dir and read: another writer ignoring the lock; skip it.
            let Some(bytes) = durable::read_optional(&path).map_err(StoreError::from_path)? else { continue };
            let allocated_at = entry.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            out.push(PodRecord { ip, owner: parse_owner(&bytes), allocated_at });
        }
        out.sort_by_key(|r| r.ip);
        Ok(out)
    }

    fn claim(&self, ip: Ipv4Addr, owner: &Attachment) -> Result<bool, StoreError> {
        let content = format!("{}\r\n{}", owner.container_id.as_str(), owner.if_name.as_str());
        durable::create_exclusive(&self.path(ip), content.as_bytes()).map_err(StoreError::from_path)
    }

    fn remove(&self, ip: Ipv4Addr) -> Result<bool, StoreError> {
        durable::remove(&self.path(ip)).map_err(StoreError::from_path)
    }

    fn last_reserved(&self) -> Result<Option<Ipv4Addr>, StoreError> {
        let bytes = durable::read_optional(&self.dir.join(CURSOR)).map_err(StoreError::from_path)?;
        // A cursor that does not parse only costs the round robin its position.
        Ok(bytes.and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok()))
    }

    fn set_last_reserved(&self, ip: Ipv4Addr) -> Result<(), StoreError> {
        durable::write_atomic(&self.dir.join(CURSOR), ip.to_string().as_bytes()).map_err(StoreError::from_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_local_format_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let s = FilePodStore::open(dir.path()).unwrap();
        let who = Attachment::new("abc123", "eth0").unwrap();
        let ip: Ipv4Addr = "10.244.1.2".parse().unwrap();
        assert!(s.claim(ip, &who).unwrap());
        assert!(!s.claim(ip, &Attachment::new("other", "eth0").unwrap()).unwrap());
        assert_eq!(fs::read(dir.path().join("10.244.1.2")).unwrap(), b"abc123\r\neth0");
        s.set_last_reserved(ip).unwrap();
        assert_eq!(fs::read(dir.path().join("last_reserved_ip.0")).unwrap(), b"10.244.1.2");
        assert_eq!(s.last_reserved().unwrap(), Some(ip));
        let recs = s.records().unwrap();
        assert_eq!(recs.len(), 1, "lock and cursor files are not records");
        assert_eq!(recs[0].owner, Some(who));
    }

    #[test]
    fn directory_and_lock_are_private_also_after_an_upgrade() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
        let dir = tempfile::tempdir().unwrap();
        let pods = dir.path().join("pods/n1");
        let s = FilePodStore::open(&pods).unwrap();
        assert!(s.claim("10.244.1.2".parse().unwrap(), &Attachment::new("abc", "eth0").unwrap()).unwrap());
        assert_eq!((mode(&pods), mode(&pods.join("lock")), mode(&pods.join("10.244.1.2"))), (0o700, 0o600, 0o600));
        // What an older weft left: 0755 and 0644.
        fs::set_permissions(&pods, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(pods.join("lock"), fs::Permissions::from_mode(0o644)).unwrap();
        let s = FilePodStore::open(&pods).unwrap();
        assert_eq!((mode(&pods), mode(&pods.join("lock"))), (0o700, 0o600));
        assert_eq!(s.records().unwrap().len(), 1);
    }

    #[test]
    fn unreadable_records_have_no_owner() {
        let dir = tempfile::tempdir().unwrap();
        let s = FilePodStore::open(dir.path()).unwrap();
        for (name, body) in [("10.244.1.2", &b""[..]), ("10.244.1.3", b"onlyid"), ("10.244.1.4", b"  id\n eth1 \n")] {
            fs::write(dir.path().join(name), body).unwrap();
        }
        let owners: Vec<_> = s.records().unwrap().into_iter().map(|r| r.owner).collect();
        assert_eq!(owners, vec![None, None, Some(Attachment::new("id", "eth1").unwrap())]);
    }
}
