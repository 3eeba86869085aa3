//! Crash-safe file writes and advisory locks, shared by the file stores and `subnet.env`.
//!
//! A state file is either its old bytes or its new bytes, never a mix, even after `kill -9` or a
//! power cut at any instant:
//!
//! 1. write the bytes to a temporary file in the same directory (`.name.tmp.<pid>.<n>`),
//! 2. `fsync` it, so the data is on disk before any name points at it,
//! 3. `rename` it over the target (atomic replace) or `link` it to the target (atomic
//!    create-if-absent: `link` fails with `EEXIST` instead of replacing),
//! 4. `fsync` the directory, so the new name itself survives a power cut.
//!
//! A crash between steps leaves at most a stray temporary file, which readers skip (names
//! starting with `.`) and [`sweep_temp_files`] removes under the store's exclusive lock.
//! Locks are `flock(2)` on a dedicated `lock` file, taken on a fresh descriptor per operation:
//! `flock` excludes per open file description, so sharing one descriptor between threads would
//! let them all in at once.
//!
//! **Who may open the lock.** `flock` needs only a descriptor, and a read-only one will do, so
//! anyone who can open the lock file can hold it forever and freeze every writer (pod ADD/DEL,
//! the lease loop). Hence:
//! - state directories are 0700 ([`private_dir`] creates them so and tightens looser ones), and
//!   one owned by another user is refused, since its owner could loosen it again;
//! - lock files are created 0600, opened without following symlinks, and refused when owned
//!   by another user;
//! - a lock file looser than 0600 (left by an older weft, under a then-0755 directory) is not
//!   merely chmod-ed: whoever opened it back then may still hold a descriptor, and with it the
//!   lock. It is replaced by a fresh 0600 file (rename over it), and a locker whose file was
//!   replaced while it waited notices (the path no longer names its inode) and locks the new
//!   one. Two new-version processes that meet the same loose file at the same instant could
//!   each replace it once; each checks just before renaming that the loose inode is still in
//!   place, which leaves a window of microseconds, once, at the upgrade.
//! - other state files are created 0600 ([`write_atomic`]); `subnet.env`, which the CNI
//!   plugins and kubelet read as flannel's, is 0644 ([`write_atomic_mode`]).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, Mode, OFlags, flock};
use tracing::warn;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Mode of a state directory: ours alone.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of a lock file and of the state files in private directories.
pub(crate) const FILE_MODE: u32 = 0o600;

/// A path plus the I/O error that happened on it.
#[derive(Debug)]
pub(crate) struct PathError {
    pub(crate) path: PathBuf,
    pub(crate) source: io::Error,
}

pub(crate) fn at(path: &Path) -> impl FnOnce(io::Error) -> PathError + '_ {
    move |source| PathError { path: path.to_path_buf(), source }
}

fn temp_path(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to a fresh temporary file beside `target` with exactly `mode` (whatever
/// the umask) and fsyncs it. On error the temporary file is removed again.
fn write_temp(target: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf, PathError> {
    let tmp = temp_path(target);
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(PathError { path: tmp, source: e })
        }
    }
}

/// fsyncs a directory so that renames, links and unlinks in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), PathError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))
}

/// Replaces `target` with `bytes` atomically and durably (temp + fsync + rename + fsync dir),
/// readable and writable by us only.
pub(crate) fn write_atomic(target: &Path, bytes: &[u8]) -> Result<(), PathError> {
    write_atomic_mode(target, bytes, FILE_MODE)
}

/// [`write_atomic`] with the file's permission bits: for files others must read.
pub(crate) fn write_atomic_mode(target: &Path, bytes: &[u8], mode: u32) -> Result<(), PathError> {
    let tmp = write_temp(target, bytes, mode)?;
    if let Err(e) = fs::rename(&tmp, target) {
        let _ = fs::remove_file(&tmp);
        return Err(PathError { path: target.to_path_buf(), source: e });
    }
    sync_dir(parent(target))
}

/// Creates `target` holding `bytes` only if it does not exist, atomically and durably: the file
/// appears complete or not at all (temp + fsync + link + unlink temp + fsync dir).
/// Returns `Ok(false)` when `target` already exists, leaving it untouched.
pub(crate) fn create_exclusive(target: &Path, bytes: &[u8]) -> Result<bool, PathError> {
    let tmp = write_temp(target, bytes, FILE_MODE)?;
    let linked = fs::hard_link(&tmp, target);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(parent(target))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(PathError { path: target.to_path_buf(), source: e }),
    }
}

/// Removes `target` durably; a missing file is not an error. Returns whether it existed.
pub(crate) fn remove(target: &Path) -> Result<bool, PathError> {
    match fs::remove_file(target) {
        Ok(()) => {
            sync_dir(parent(target))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(PathError { path: target.to_path_buf(), source: e }),
    }
}

/// Reads a whole file; `Ok(None)` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PathError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PathError { path: path.to_path_buf(), source: e }),
    }
}

/// Whether `name` is one of our temporary files.
pub(crate) fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp.")
}

/// Removes temporary files left in `dir` by writers that died mid-write. Call only while
/// holding the exclusive lock that every writer of `dir` holds while writing.
pub(crate) fn sweep_temp_files(dir: &Path) -> Result<usize, PathError> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(at(dir))? {
        let entry = entry.map_err(at(dir))?;
        if is_temp_name(&entry.file_name().to_string_lossy()) {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(PathError { path: entry.path(), source: e }),
            }
        }
    }
    Ok(removed)
}

/// An advisory lock held until dropped (closing the descriptor releases it, also on crash).
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub(crate) enum LockError {
    /// Opening the lock file or `flock` failed.
    Io(PathError),
    /// Another process held the lock for longer than the timeout.
    Timeout { path: PathBuf, waited: Duration },
}

fn denied(path: &Path, why: String) -> PathError {
    PathError { path: path.to_path_buf(), source: io::Error::new(io::ErrorKind::PermissionDenied, why) }
}

/// Refuses `meta` (of `path`) unless we own it: its owner could loosen its mode again.
fn check_owner(path: &Path, meta: &fs::Metadata) -> Result<(), PathError> {
    let ours = rustix::process::geteuid().as_raw();
    if meta.uid() == ours {
        Ok(())
    } else {
        Err(denied(path, format!("owned by uid {}, not by us (uid {ours}); chown it to us, or remove it", meta.uid())))
    }
}

/// Creates `dir` and its missing parents with mode 0700, or tightens an existing `dir` to 0700
/// (a directory from an older weft is 0755); refuses a `dir` that is not a directory or is
/// owned by another user. Only then is a lock file inside out of everyone else's reach.
pub(crate) fn private_dir(dir: &Path) -> Result<(), PathError> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir).map_err(at(dir))?;
    let meta = fs::metadata(dir).map_err(at(dir))?;
    if !meta.is_dir() {
        return Err(denied(dir, "not a directory".into()));
    }
    check_owner(dir, &meta)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(at(dir))?;
        warn!(path = %dir.display(), old_mode = format!("{mode:o}"), "state directory was open to other users; now 0700");
    }
    Ok(())
}

/// Opens (creating 0600) the lock file at `path` without following a symlink, refusing one
/// owned by another user, and replacing one looser than 0600 (see the module docs).
fn open_lock(path: &Path) -> Result<File, PathError> {
    for _ in 0..3 {
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::open(path, flags, Mode::from_raw_mode(FILE_MODE)).map_err(|e| {
            if e == rustix::io::Errno::LOOP {
                denied(path, "is a symbolic link; a lock file must be a plain file".into())
            } else {
                PathError { path: path.to_path_buf(), source: io::Error::from(e) }
            }
        })?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(at(path))?;
        if !meta.is_file() {
            return Err(denied(path, "not a regular file".into()));
        }
        check_owner(path, &meta)?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 == 0 {
            return Ok(file);
        }
        replace_lock_file(path, &meta)?;
        warn!(path = %path.display(), old_mode = format!("{mode:o}"),
            "lock file was open to other users (an older weft's); replaced it with a private one");
    }
    Err(denied(path, "kept being replaced by a lock file open to other users".into()))
}

/// Puts a fresh 0600 file at `path`, if `path` still names the loose inode `loose`.
fn replace_lock_file(path: &Path, loose: &fs::Metadata) -> Result<(), PathError> {
    let tmp = write_temp(path, b"", FILE_MODE)?;
    let still_loose = fs::symlink_metadata(path).is_ok_and(|m| m.dev() == loose.dev() && m.ino() == loose.ino());
    if !still_loose {
        // Someone replaced it first; use theirs.
        let _ = fs::remove_file(&tmp);
        return Ok(());
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(PathError { path: path.to_path_buf(), source: e });
    }
    sync_dir(parent(path))
}

/// Whether `path` still names the inode `file` is open on.
fn still_at(path: &Path, file: &File) -> Result<bool, PathError> {
    let ours = file.metadata().map_err(at(path))?;
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(m.dev() == ours.dev() && m.ino() == ours.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(PathError { path: path.to_path_buf(), source: e }),
    }
}

/// Takes `flock(path, exclusive or shared)`, polling with a non-blocking attempt so that a
/// stuck holder (a stopped process) turns into a timeout instead of blocking forever. The lock
/// file is opened as [`open_lock`] says; if it is replaced while we wait or just after we got
/// it, the new one is locked instead.
pub(crate) fn lock(path: &Path, exclusive: bool, timeout: Duration) -> Result<FileLock, LockError> {
    let op = if exclusive { FlockOperation::NonBlockingLockExclusive } else { FlockOperation::NonBlockingLockShared };
    let start = Instant::now();
    let mut pause = Duration::from_micros(200);
    'open: loop {
        let file = open_lock(path).map_err(LockError::Io)?;
        loop {
            match flock(&file, op) {
                Ok(()) if still_at(path, &file).map_err(LockError::Io)? => return Ok(FileLock { _file: file }),
                Ok(()) => continue 'open,
                Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {
                    let waited = start.elapsed();
                    if waited >= timeout {
                        return Err(LockError::Timeout { path: path.to_path_buf(), waited });
                    }
                    if !still_at(path, &file).map_err(LockError::Io)? {
                        continue 'open;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(LockError::Io(PathError { path: path.to_path_buf(), source: io::Error::from(e) }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_and_exclusive_create() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert!(!create_exclusive(&p, b"three").unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let q = dir.path().join("g");
        assert!(create_exclusive(&q, b"new").unwrap());
        assert_eq!(fs::read(&q).unwrap(), b"new");
        // No temporary file is left behind on the success or the EEXIST path.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(remove(&q).unwrap());
        assert!(!remove(&q).unwrap());
    }

    #[test]
    fn atomic_write_with_a_private_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        write_atomic_mode(&p, b"x", 0o600).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&p).unwrap(), b"x");
    }

    #[test]
    fn sweep_removes_only_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".f.tmp.1.2"), b"half").unwrap();
        fs::write(dir.path().join("f"), b"whole").unwrap();
        assert_eq!(sweep_temp_files(dir.path()).unwrap(), 1);
        assert!(dir.path().join("f").exists());
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn files_are_private_unless_asked_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let (p, q, r) = (dir.path().join("f"), dir.path().join("g"), dir.path().join("subnet.env"));
        write_atomic(&p, b"x").unwrap();
        assert!(create_exclusive(&q, b"y").unwrap());
        write_atomic_mode(&r, b"z", 0o644).unwrap();
        assert_eq!((mode(&p), mode(&q), mode(&r)), (0o600, 0o600, 0o644));
    }

    #[test]
    fn private_dir_creates_0700_and_tightens_an_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        private_dir(&nested).unwrap();
        assert_eq!((mode(&dir.path().join("a")), mode(&nested)), (0o700, 0o700));
        let old = dir.path().join("old");
        fs::create_dir(&old).unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&old).unwrap();
        assert_eq!(mode(&old), 0o700);
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let err = private_dir(&file).unwrap_err();
        assert_eq!(err.path, file);
    }

    #[test]
    fn lock_file_is_0600_and_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        drop(lock(&p, true, Duration::from_secs(1)).unwrap());
        assert_eq!(mode(&p), 0o600);
        let target = dir.path().join("elsewhere");
        fs::write(&target, b"").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let Err(LockError::Io(e)) = lock(&link, true, Duration::from_secs(1)) else { panic!("a symlink was followed") };
        assert_eq!(e.path, link);
        assert!(e.source.to_string().contains("symbolic link"), "{}", e.source);
        assert_eq!(mode(&target), 0o644, "nothing was done to the link's target");
    }

    /// An older weft's 0644 lock file, and someone who opened it back then and holds a lock on
    /// it forever (the denial of service): the lock file is replaced, so the holder's lock no
    /// longer matters.
    #[test]
    fn a_loose_lock_file_held_by_someone_is_replaced() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        fs::write(&p, b"").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let squatter = File::open(&p).unwrap();
        flock(&squatter, FlockOperation::NonBlockingLockShared).unwrap();
        let old_ino = squatter.metadata().unwrap().ino();
        let held = lock(&p, true, Duration::from_millis(500)).unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_ne!(fs::metadata(&p).unwrap().ino(), old_ino, "a fresh inode, not a chmod");
        drop(held);
        // And it stays put from then on.
        let ino = fs::metadata(&p).unwrap().ino();
        drop(lock(&p, false, Duration::from_millis(100)).unwrap());
        assert_eq!(fs::metadata(&p).unwrap().ino(), ino);
    }

    /// A locker waiting on a lock file that gets replaced takes the new file's lock instead of
    /// waiting on the orphan.
    #[test]
    fn a_waiter_follows_a_replaced_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let held = lock(&p, true, Duration::from_secs(1)).unwrap();
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || lock(&p, true, Duration::from_secs(5)).map(drop))
        };
        std::thread::sleep(Duration::from_millis(50));
        let fresh = dir.path().join("fresh");
        fs::write(&fresh, b"").unwrap();
        fs::set_permissions(&fresh, fs::Permissions::from_mode(0o600)).unwrap();
        fs::rename(&fresh, &p).unwrap();
        let t = Instant::now();
        waiter.join().unwrap().unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "the waiter kept waiting on the old file");
        drop(held);
    }

    #[test]
    fn exclusive_lock_excludes_and_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let held = lock(&p, true, Duration::from_secs(1)).unwrap();
        assert!(matches!(lock(&p, false, Duration::from_millis(30)), Err(LockError::Timeout { .. })));
        drop(held);
        let _a = lock(&p, false, Duration::from_millis(30)).unwrap();
        let _b = lock(&p, false, Duration::from_millis(30)).unwrap();
    }
}
