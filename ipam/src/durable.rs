//! Crash-safe file writes and advisory locks, shared by the file stores and `subnet.env`.
//!
//! A state file is either its old bytes or its new bytes, never a mix, even after `kill -9` or a
//! power cut at any instant (security.md §3 "crash mid-write"):
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

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

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

/// The mode `open(2)` is given for state files unless a caller asks for another; the umask
/// applies, as it does for `File::create`.
const DEFAULT_MODE: u32 = 0o666;

/// Writes `bytes` to a fresh temporary file beside `target`, created with `mode` (before the
/// umask), and fsyncs it. On error the temporary file is removed again.
fn write_temp(target: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf, PathError> {
    let tmp = temp_path(target);
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
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

/// Replaces `target` with `bytes` atomically and durably (temp + fsync + rename + fsync dir).
pub(crate) fn write_atomic(target: &Path, bytes: &[u8]) -> Result<(), PathError> {
    write_atomic_mode(target, bytes, DEFAULT_MODE)
}

/// [`write_atomic`] for a file created with `mode` (e.g. `0o600` for one only root may read):
/// the mode is set when the temporary file is created, so the bytes are never readable by
/// anyone else, not even between the write and a `chmod`.
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
    let tmp = write_temp(target, bytes, DEFAULT_MODE)?;
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

/// Takes `flock(path, exclusive or shared)`, polling with a non-blocking attempt so that a
/// stuck holder (a stopped process) turns into a timeout instead of blocking forever.
pub(crate) fn lock(path: &Path, exclusive: bool, timeout: Duration) -> Result<FileLock, LockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| LockError::Io(PathError { path: path.to_path_buf(), source: e }))?;
    let op = if exclusive { FlockOperation::NonBlockingLockExclusive } else { FlockOperation::NonBlockingLockShared };
    let start = Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        match flock(&file, op) {
            Ok(()) => return Ok(FileLock { _file: file }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {
                let waited = start.elapsed();
                if waited >= timeout {
                    return Err(LockError::Timeout { path: path.to_path_buf(), waited });
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
