//! Address releases the CNI plugin could not hand to the daemon, kept on disk until the daemon
//! frees them.
//!
//! CNI DEL must succeed while the weft daemon is down: it is best effort and must not fail for what
//! is missing (the CNI spec, SPEC.md "DEL"), and kubelet keeps a pod terminating until it succeeds.
//! The plugin then deletes the pod's veth itself, so no interface carries the address any more, and
//! records here that the attachment's address is to be freed; the daemon frees it when it is back.
//! This module is the record; the daemon's drain (`weft::daemon::pending`) acts on it.
//!
//! ```text
//! /var/lib/weft/pending-release/   0700, made by the first writer
//!   lock                           flock(2) target, held for every write, drain and cancel
//!   <container id>:<ifname>        0600: {"containerID":"…","ifname":"…","socket":"/run/weft/weft.sock"}
//! ```
//!
//! - The file name comes from the attachment. `:` is allowed in neither part, so the name is
//!   unambiguous and never `lock`. A container id too long for a file name (200 bytes, leaving
//!   room for the temporary file's name) is cut and followed by `~` (not allowed in container
//!   ids either) and a hash of the attachment.
//! - The content repeats the attachment. A file whose content does not parse, names an invalid
//!   attachment, or does not match its own name is not trusted: [`PendingReleases::scan`]
//!   reports it instead of acting on it, and nothing ever frees an address because of it.
//! - `socket` is the API socket the plugin tried. Several daemons on one host (one per node in a
//!   lab) may share the directory; each acts only on the entries addressed to its own socket.
//! - Entries are written the way every state file of this crate is (`durable`): whole or not at
//!   all, and on disk before the plugin reports success. The directory's lock is taken for every
//!   change, so the daemon can remove temporary files a killed writer left.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::durable;
use crate::pod::{Attachment, AttachmentError};

/// The lock file's name.
const LOCK: &str = "lock";

/// Longest entry name: Linux file systems take 255 bytes (`NAME_MAX`), and the temporary file
/// an entry is written through adds a `.` and `.tmp.<pid>.<counter>` (up to 34 bytes).
const NAME_MAX: usize = 200;

/// Largest file read as an entry: a real one is a few hundred bytes, and a huge file dropped
/// into the directory must not be read into memory.
const MAX_ENTRY_BYTES: u64 = 4096;

/// One address release waiting for the daemon.
#[derive(Clone, Debug, Eq, Ord, PartialEq, PartialOrd)]
pub struct PendingRelease {
    /// Whose address is to be freed.
    pub attachment: Attachment,
    /// The daemon's API socket as the plugin addressed it: only the daemon listening there
    /// holds the attachment's address, so only it acts on the entry.
    pub socket: PathBuf,
}

/// An entry as written on disk.
#[derive(Deserialize, Serialize)]
struct Wire {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
    socket: PathBuf,
}

/// Why a file in the directory was not taken as an entry.
#[derive(Debug, thiserror::Error)]
pub enum SkipReason {
    /// A directory, symlink, FIFO or socket: never opened (reading a FIFO would block).
    #[error("not a regular file")]
    NotAFile,
    /// The file name is not UTF-8, so no attachment has it.
    #[error("file name is not UTF-8")]
    NameNotUtf8,
    /// Larger than any entry can be.
    #[error("{0} bytes, larger than any entry ({MAX_ENTRY_BYTES})")]
    TooLarge(u64),
    /// Reading it failed.
    #[error("cannot read: {0}")]
    Unreadable(std::io::Error),
    /// The content is not an entry's JSON.
    #[error("not a pending release (want {{\"containerID\",\"ifname\",\"socket\"}}): {0}")]
    BadContent(String),
    /// The content names an attachment the CNI spec does not allow.
    #[error("{0}")]
    BadAttachment(AttachmentError),
    /// The content is some attachment's entry, but the file has another name.
    #[error("holds the entry for {attachment}, whose file is named {expected:?}")]
    Misnamed {
        /// The attachment in the content.
        attachment: Attachment,
        /// The name its entry has.
        expected: String,
    },
}

/// A file [`PendingReleases::scan`] did not take as an entry.
#[derive(Debug)]
pub struct SkippedEntry {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: SkipReason,
}

/// What [`PendingReleases::scan`] found.
#[derive(Debug, Default)]
pub struct PendingScan {
    /// The entries, ordered by attachment.
    pub entries: Vec<PendingRelease>,
    /// The files that are not entries, ordered by path.
    pub skipped: Vec<SkippedEntry>,
}

/// The pending-release directory (see the module docs).
#[derive(Clone, Debug)]
pub struct PendingReleases {
    dir: PathBuf,
    lock_timeout: Duration,
}

impl PendingReleases {
    /// The default directory, for the plugin and the daemon alike: persistent (`/var/lib`, not
    /// `/run`), because a release recorded just before a reboot must still happen after it.
    pub const DEFAULT_DIR: &'static str = "/var/lib/weft/pending-release";

    /// The directory `dir`; nothing is read or created until it is used.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), lock_timeout: Duration::from_secs(10) }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file name of `who`'s entry: `<container id>:<ifname>`, or with a cut id and a hash
    /// when that is longer than a file name may be.
    pub fn file_name(who: &Attachment) -> String {
        let (cid, ifname) = (who.container_id.as_str(), who.if_name.as_str());
        if cid.len() + 1 + ifname.len() <= NAME_MAX {
            return format!("{cid}:{ifname}");
        }
        // FNV-1a (64 bit), stable across Rust releases, so every plugin and daemon version
        // derives the same name.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in cid.bytes().chain([0]).chain(ifname.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // `~`, 16 hex digits and `:` come after the cut id. Container ids are ASCII, so every
        // byte index is a character boundary.
        let keep = NAME_MAX - 18 - ifname.len();
        let cut = cid.get(..keep).unwrap_or(cid);
        format!("{cut}~{h:016x}:{ifname}")
    }

    /// The path of `who`'s entry.
    pub fn path(&self, who: &Attachment) -> PathBuf {
        self.dir.join(Self::file_name(who))
    }

    /// Records `entry`, replacing an earlier one for the same attachment (a repeated DEL), and
    /// creates the directory (0700) if needed. The entry (0600) is on disk when this returns.
    ///
    /// # Errors
    /// The directory cannot be created or locked, or the entry cannot be written; nothing is
    /// recorded then.
    pub fn record(&self, entry: &PendingRelease) -> Result<(), StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| StoreError::Io { path: self.dir.clone(), source })?;
        let path = self.path(&entry.attachment);
        let wire = Wire {
            container_id: entry.attachment.container_id.as_str().to_owned(),
            ifname: entry.attachment.if_name.as_str().to_owned(),
            socket: entry.socket.clone(),
        };
        let body = serde_json::to_vec(&wire).map_err(|e| StoreError::Io {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("socket: {e}")),
        })?;
        let _lock = durable::lock(&self.dir.join(LOCK), true, self.lock_timeout).map_err(StoreError::from_lock)?;
        durable::write_atomic_mode(&path, &body, 0o600).map_err(StoreError::from_path)
    }

    /// Runs `f` holding the directory's lock, which [`Self::scan`], [`Self::get`],
    /// [`Self::remove`] and [`Self::sweep_temp_files`] need. Without the directory nothing is
    /// pending: `f` is not run, nothing is created, and the answer is `None`.
    ///
    /// # Errors
    /// The directory cannot be looked at or locked (a stuck holder times out after 10 s), or
    /// `f`'s error.
    pub fn with_lock<T, E: From<StoreError>>(&self, f: impl FnOnce(&Self) -> Result<T, E>) -> Result<Option<T>, E> {
        match fs::metadata(&self.dir) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path: self.dir.clone(), source }.into()),
        }
        let _lock = durable::lock(&self.dir.join(LOCK), true, self.lock_timeout).map_err(StoreError::from_lock)?;
        f(self).map(Some)
    }

    /// Every entry, and every file that is not one (with the reason). Temporary files and the
    /// lock are neither. Call under [`Self::with_lock`].
    ///
    /// # Errors
    /// The directory cannot be listed. A file that cannot be read is skipped, not an error.
    pub fn scan(&self) -> Result<PendingScan, StoreError> {
        let io = |source| StoreError::Io { path: self.dir.clone(), source };
        let mut scan = PendingScan::default();
        for dirent in fs::read_dir(&self.dir).map_err(io)? {
            let dirent = dirent.map_err(io)?;
            let path = dirent.path();
            let Some(name) = dirent.file_name().to_str().map(str::to_owned) else {
                scan.skipped.push(SkippedEntry { path, reason: SkipReason::NameNotUtf8 });
                continue;
            };
            if name == LOCK || durable::is_temp_name(&name) {
                continue;
            }
            match read_entry(&path, &name) {
                Ok(entry) => scan.entries.push(entry),
                Err(reason) => scan.skipped.push(SkippedEntry { path, reason }),
            }
        }
        scan.entries.sort();
        scan.skipped.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(scan)
    }

    /// `who`'s entry, if there is a trustworthy one (a file [`Self::scan`] would skip is none).
    /// Call under [`Self::with_lock`].
    ///
    /// # Errors
    /// Only when the directory itself cannot be looked at.
    pub fn get(&self, who: &Attachment) -> Result<Option<PendingRelease>, StoreError> {
        let path = self.path(who);
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(read_entry(&path, &Self::file_name(who)).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Removes `who`'s entry; returns whether there was one. Call under [`Self::with_lock`].
    ///
    /// # Errors
    /// The file cannot be removed.
    pub fn remove(&self, who: &Attachment) -> Result<bool, StoreError> {
        durable::remove(&self.path(who)).map_err(StoreError::from_path)
    }

    /// Removes temporary files left by writers killed mid-write; returns how many. Call under
    /// [`Self::with_lock`] (every writer holds the lock while its temporary file exists).
    ///
    /// # Errors
    /// The directory cannot be listed or a file cannot be removed.
    pub fn sweep_temp_files(&self) -> Result<usize, StoreError> {
        durable::sweep_temp_files(&self.dir).map_err(StoreError::from_path)
    }
}

/// Reads the file `name` at `path` as an entry, trusting nothing: only a regular file of a
/// sane size is opened, and its content must be the entry of the attachment its name says.
fn read_entry(path: &Path, name: &str) -> Result<PendingRelease, SkipReason> {
    let meta = fs::symlink_metadata(path).map_err(SkipReason::Unreadable)?;
    if !meta.file_type().is_file() {
        return Err(SkipReason::NotAFile);
    }
    if meta.len() > MAX_ENTRY_BYTES {
        return Err(SkipReason::TooLarge(meta.len()));
    }
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_ENTRY_BYTES + 1).read_to_end(&mut bytes))
        .map_err(SkipReason::Unreadable)?;
    if bytes.len() as u64 > MAX_ENTRY_BYTES {
        return Err(SkipReason::TooLarge(bytes.len() as u64));
    }
    parse_entry(&bytes, name)
}

/// Parses an entry's content and checks it against its file name.
fn parse_entry(bytes: &[u8], name: &str) -> Result<PendingRelease, SkipReason> {
    let wire: Wire = serde_json::from_slice(bytes).map_err(|e| SkipReason::BadContent(e.to_string()))?;
    let attachment = Attachment::new(&wire.container_id, &wire.ifname).map_err(SkipReason::BadAttachment)?;
    let expected = PendingReleases::file_name(&attachment);
    if expected != name {
        return Err(SkipReason::Misnamed { attachment, expected });
    }
    Ok(PendingRelease { attachment, socket: wire.socket })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn att(cid: &str, ifname: &str) -> Attachment {
        Attachment::new(cid, ifname).unwrap()
    }

    fn entry(cid: &str, ifname: &str) -> PendingRelease {
        PendingRelease { attachment: att(cid, ifname), socket: "/run/weft/weft.sock".into() }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn record_writes_a_private_json_entry_named_after_the_attachment() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = PendingReleases::new(tmp.path().join("pending-release"));
        spool.record(&entry("abc123", "eth0")).unwrap();
        let file = spool.dir().join("abc123:eth0");
        assert_eq!(
            fs::read_to_string(&file).unwrap(),
            r#"{"containerID":"abc123","ifname":"eth0","socket":"/run/weft/weft.sock"}"#
        );
        assert_eq!((mode(spool.dir()), mode(&file)), (0o700, 0o600));
        // A repeated DEL records the same entry again: still one.
        spool.record(&entry("abc123", "eth0")).unwrap();
        spool.record(&entry("abc123", "net1")).unwrap();
        let scan = spool.with_lock(|s| s.scan()).unwrap().unwrap();
        assert_eq!(scan.entries, vec![entry("abc123", "eth0"), entry("abc123", "net1")]);
        assert!(scan.skipped.is_empty(), "{:?}", scan.skipped);
        let got = spool.with_lock(|s| s.get(&att("abc123", "eth0"))).unwrap().unwrap();
        assert_eq!(got, Some(entry("abc123", "eth0")));
        assert_eq!(spool.with_lock(|s| s.remove(&att("abc123", "eth0"))).unwrap(), Some(true));
        assert_eq!(spool.with_lock(|s| s.remove(&att("abc123", "eth0"))).unwrap(), Some(false));
        assert_eq!(spool.with_lock(|s| s.get(&att("abc123", "eth0"))).unwrap(), Some(None));
    }

    #[test]
    fn without_the_directory_nothing_is_pending_and_nothing_is_created() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = PendingReleases::new(tmp.path().join("absent"));
        assert!(spool.with_lock(|s| s.scan()).unwrap().is_none());
        assert!(!spool.dir().exists());
    }

    #[test]
    fn container_ids_too_long_for_a_file_name_get_a_hashed_name() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = PendingReleases::new(tmp.path());
        let long_a = "a".repeat(300);
        let long_b = format!("{long_a}b");
        for cid in [&long_a, &long_b] {
            let name = PendingReleases::file_name(&att(cid, "eth0"));
            assert!(name.len() <= NAME_MAX && name.ends_with(":eth0") && name.contains('~'), "{name}");
            spool.record(&entry(cid, "eth0")).unwrap();
        }
        assert_ne!(
            PendingReleases::file_name(&att(&long_a, "eth0")),
            PendingReleases::file_name(&att(&long_b, "eth0"))
        );
        let scan = spool.with_lock(|s| s.scan()).unwrap().unwrap();
        assert_eq!(scan.entries.len(), 2, "{:?}", scan.skipped);
        // The longest plain name still fits as it is.
        let fits = "c".repeat(NAME_MAX - 5);
        assert_eq!(PendingReleases::file_name(&att(&fits, "eth0")), format!("{fits}:eth0"));
    }

    #[test]
    fn files_that_are_not_entries_are_skipped_with_a_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = PendingReleases::new(tmp.path());
        spool.record(&entry("good", "eth0")).unwrap();
        let d = spool.dir();
        fs::write(d.join("garbage"), b"\x00\xffnot json").unwrap();
        fs::write(d.join("empty:eth0"), b"").unwrap();
        fs::write(d.join("other:eth0"), fs::read(d.join("good:eth0")).unwrap()).unwrap();
        fs::write(d.join("bad:eth0"), br#"{"containerID":"../etc","ifname":"eth0","socket":"/s"}"#).unwrap();
        fs::write(d.join("big:eth0"), vec![b' '; 10_000]).unwrap();
        fs::create_dir(d.join("dir:eth0")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("link:eth0")).unwrap();
        let non_utf8 = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff:eth0");
        fs::write(d.join(non_utf8), b"{}").unwrap();
        fs::write(d.join(".good:eth0.tmp.1.2"), b"half").unwrap();

        let scan = spool.with_lock(|s| s.scan()).unwrap().unwrap();
        assert_eq!(scan.entries, vec![entry("good", "eth0")]);
        let reasons: Vec<(String, String)> = scan
            .skipped
            .iter()
            .map(|s| (s.path.file_name().unwrap().to_string_lossy().into_owned(), s.reason.to_string()))
            .collect();
        let names: Vec<&str> = reasons.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["bad:eth0", "big:eth0", "dir:eth0", "empty:eth0", "garbage", "link:eth0", "other:eth0", "\u{fffd}:eth0"],
            "{reasons:#?}"
        );
        let reason = |n: &str| reasons.iter().find(|(name, _)| name == n).map(|(_, r)| r.clone()).unwrap();
        assert!(reason("bad:eth0").starts_with("CNI_CONTAINERID"), "{}", reason("bad:eth0"));
        assert!(reason("big:eth0").contains("larger than any entry"));
        assert_eq!(reason("dir:eth0"), "not a regular file");
        assert_eq!(reason("link:eth0"), "not a regular file");
        assert!(reason("garbage").starts_with("not a pending release"));
        assert_eq!(reason("other:eth0"), "holds the entry for good/eth0, whose file is named \"good:eth0\"");
        // An untrusted file is no entry for get either, so nothing acts on it.
        assert_eq!(spool.with_lock(|s| s.get(&att("other", "eth0"))).unwrap(), Some(None));
        // Temporary files are not reported; the sweep removes them.
        assert_eq!(spool.with_lock(|s| s.sweep_temp_files()).unwrap(), Some(1));
        assert!(d.join("good:eth0").exists());
    }
}
