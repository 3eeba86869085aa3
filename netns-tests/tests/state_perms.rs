//! Local users cannot freeze weft through its lock files, nor talk to its API socket.
//!
//! `flock` needs only a descriptor, a read-only one will do: whoever can open a store's lock
//! file can hold it forever and stop pod ADD/DEL and the lease loop. So weft keeps its state
//! directories 0700 and its lock files 0600, tightens what an older weft left (0755 / 0644),
//! and refuses files another user owns. Each test builds the store as root (the real `weft`
//! binary or `weft_ipam` directly) and then tries as `nobody` (uid/gid 65534, groups
//! dropped), inside a 0755 scratch directory that `nobody` can reach.
//!
//! No namespaces: the file system is the subject. Needs root (to be two users): without it the
//! tests fail under `CI=true` and otherwise skip, saying so.

// Test helpers outside #[test] fns: a failed setup step should fail the test loudly.
#![allow(clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use weft_netns_tests::skip_unless_root;
use weft_netns_tests::weft::weft_bin;

/// `nobody` / `nogroup` on Debian.
const NOBODY: u32 = 65534;

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).expect("stat").mode() & 0o7777
}

/// A scratch directory `nobody` can enter (tempfile makes them 0700).
fn scratch() -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("weft-perms-").tempdir().expect("scratch dir");
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).expect("chmod scratch");
    d
}

fn as_nobody(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    // std drops the supplementary groups (setgroups(0)) when it changes the uid as root.
    c.args(args).uid(NOBODY).gid(NOBODY).stdin(Stdio::null());
    c
}

/// Tries to open `path` for reading as `nobody`, which is all `flock` needs.
fn nobody_opens(path: &Path) -> Output {
    as_nobody("cat", &[path.to_str().expect("utf-8 path")]).output().expect("run cat as nobody")
}

/// Asserts that `nobody` cannot open `path`: EACCES, "Permission denied".
fn assert_nobody_cannot_open(path: &Path) {
    let out = nobody_opens(path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Permission denied"), "nobody opened {}: {err}", path.display());
}

/// `weft <args>` as root, with a deadline well above weft's 10 s lock timeout.
fn weft(args: &[&str]) -> Output {
    let bin = weft_bin().expect("weft binary");
    Command::new("timeout").arg("30").arg(bin).args(args).stdin(Stdio::null()).output().expect("run weft")
}

fn network_init(store: &Path) -> Output {
    weft(&["network", "init", "--store", "file", "--store-dir", store.to_str().expect("utf-8 path")])
}

/// `nobody` holding a shared `flock` on `lock` (the denial of service), until dropped.
struct Squatter(Child);

impl Squatter {
    fn hold(lock: &Path) -> Self {
        let path = lock.to_str().expect("utf-8 path");
        // --no-fork: the process we spawn is the one holding the lock, so killing it frees it.
        // It waits (up to 5 s) rather than --nonblock: the probe below takes the lock
        // exclusively for an instant, and a non-blocking squatter that tries then gives up.
        let child = as_nobody("flock", &["--shared", "--timeout", "5", "--no-fork", path, "sleep", "120"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flock as nobody");
        let mut s = Self(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Held once root cannot take it exclusively without waiting.
        loop {
            if let Ok(Some(status)) = s.0.try_wait() {
                panic!("nobody could not lock {path}: {status}");
            }
            let probe = Command::new("flock").args(["--exclusive", "--nonblock", path, "true"]).status();
            if probe.is_ok_and(|st| !st.success()) {
                return s;
            }
            assert!(Instant::now() < deadline, "nobody's lock on {path} never showed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What an older weft left: 0755 directories and a 0644 lock file.
fn old_layout(dirs: &[PathBuf], lock: &Path) {
    for d in dirs {
        fs::create_dir_all(d).expect("mkdir");
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod dir");
    }
    fs::write(lock, b"").expect("write lock");
    fs::set_permissions(lock, fs::Permissions::from_mode(0o644)).expect("chmod lock");
}

#[test]
fn a_new_file_store_lock_cannot_be_opened_by_another_user() {
    if !skip_unless_root("a_new_file_store_lock_cannot_be_opened_by_another_user").expect("root check") {
        return;
    }
    let dir = scratch();
    // The control: nobody can read a plain 0644 file here, so the refusals below are weft's.
    let control = dir.path().join("readable");
    fs::write(&control, b"x").expect("write control");
    fs::set_permissions(&control, fs::Permissions::from_mode(0o644)).expect("chmod control");
    assert!(nobody_opens(&control).status.success(), "the test cannot act as nobody");

    let store = dir.path().join("store");
    let out = network_init(&store);
    assert!(out.status.success(), "weft network init: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!((mode(&store), mode(&store.join("subnets")), mode(&store.join("lock"))), (0o700, 0o700, 0o600));
    assert_nobody_cannot_open(&store.join("lock"));
}

/// The upgrade: an older weft's 0644 lock under 0755 directories, and nobody already holding
/// it. weft neither waits for nobody (10 s, then "lock held by another process") nor leaves
/// the file open to them: it replaces the lock file, and the directories become 0700.
#[test]
fn an_old_lock_held_by_another_user_is_replaced_not_waited_on() {
    if !skip_unless_root("an_old_lock_held_by_another_user_is_replaced_not_waited_on").expect("root check") {
        return;
    }
    let dir = scratch();
    let store = dir.path().join("store");
    let lock = store.join("lock");
    old_layout(&[store.clone(), store.join("subnets")], &lock);
    let squatter = Squatter::hold(&lock);
    let old_ino = fs::metadata(&lock).expect("stat lock").ino();

    let t = Instant::now();
    let out = network_init(&store);
    let took = t.elapsed();
    assert!(out.status.success(), "weft network init after {took:?}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(took < Duration::from_secs(5), "weft waited {took:?} for nobody's lock");
    assert_eq!((mode(&store), mode(&store.join("subnets")), mode(&lock)), (0o700, 0o700, 0o600));
    assert_ne!(fs::metadata(&lock).expect("stat lock").ino(), old_ino, "replaced, not chmod-ed");
    assert_nobody_cannot_open(&lock);
    // And the store keeps working while nobody still holds the orphaned file.
    let out = weft(&["leases", "--store", "file", "--store-dir", store.to_str().expect("utf-8")]);
    assert!(out.status.success(), "weft leases: {}", String::from_utf8_lossy(&out.stderr));
    drop(squatter);
}

/// A lock file or a store directory that another user owns is refused by name: its owner
/// could loosen it again whenever they liked.
#[test]
fn a_lock_or_store_owned_by_another_user_is_refused() {
    if !skip_unless_root("a_lock_or_store_owned_by_another_user_is_refused").expect("root check") {
        return;
    }
    let dir = scratch();
    let store = dir.path().join("store");
    assert!(network_init(&store).status.success());
    let store_arg = store.to_str().expect("utf-8");
    let leases = ["leases", "--store", "file", "--store-dir", store_arg];

    std::os::unix::fs::chown(store.join("lock"), Some(NOBODY), Some(NOBODY)).expect("chown lock");
    let out = weft(&leases);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let want = format!("{}: owned by uid {NOBODY}, not by us (uid 0)", store.join("lock").display());
    assert!(err.contains(&want), "want {want:?} in {err}");

    std::os::unix::fs::chown(store.join("lock"), Some(0), Some(0)).expect("chown lock back");
    std::os::unix::fs::chown(&store, Some(NOBODY), Some(NOBODY)).expect("chown store");
    let out = weft(&leases);
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("{store_arg}: owned by uid {NOBODY}, not by us (uid 0)");
    assert!(!out.status.success() && err.contains(&want), "want {want:?} in {err}");
}

/// The pod store (one per node, behind pod ADD/DEL): new and upgraded alike.
#[test]
fn the_pod_store_lock_cannot_be_opened_or_held_by_another_user() {
    if !skip_unless_root("the_pod_store_lock_cannot_be_opened_or_held_by_another_user").expect("root check") {
        return;
    }
    let dir = scratch();
    let pods = dir.path().join("pods/n1");
    let store = weft_ipam::FilePodStore::open(&pods).expect("open pod store");
    let who = weft_ipam::Attachment::new("c1", "eth0").expect("attachment");
    assert!(weft_ipam::PodStore::claim(&store, "10.244.1.2".parse().expect("ip"), &who).expect("claim"));
    assert_eq!((mode(&pods), mode(&pods.join("lock"))), (0o700, 0o600));
    assert_nobody_cannot_open(&pods.join("lock"));

    // (A separate tree: the new store made pods/ 0700, which would stop nobody on its own.)
    let old = dir.path().join("old-pods/n2");
    old_layout(&[dir.path().join("old-pods"), old.clone()], &old.join("lock"));
    let squatter = Squatter::hold(&old.join("lock"));
    let t = Instant::now();
    let store = weft_ipam::FilePodStore::open(&old).expect("open the old pod store");
    weft_ipam::PodStore::with_lock(&store, |_| Ok::<_, weft_ipam::StoreError>(())).expect("lock it");
    assert!(t.elapsed() < Duration::from_secs(5), "waited {:?} for nobody's lock", t.elapsed());
    assert_eq!((mode(&old), mode(&old.join("lock"))), (0o700, 0o600));
    assert_nobody_cannot_open(&old.join("lock"));
    drop(squatter);
}

/// The API socket (allocate/release addresses for any pod) is 0600: nobody cannot connect.
/// The control: a 0666 socket next to it is reachable by the same nobody.
#[test]
fn the_api_socket_refuses_other_users() {
    if !skip_unless_root("the_api_socket_refuses_other_users").expect("root check") {
        return;
    }
    let dir = scratch();
    let path = dir.path().join("run/weft.sock");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let _listener = rt.block_on(async { weft::daemon::api::bind(&path) }).expect("bind the api socket");
    assert_eq!(mode(&path), 0o600);
    let names: Vec<_> =
        fs::read_dir(path.parent().expect("parent")).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, ["weft.sock"], "nothing left from binding");
    fs::set_permissions(path.parent().expect("parent"), fs::Permissions::from_mode(0o755)).expect("chmod run dir");

    let bin = weft_bin().expect("weft binary");
    let status = |socket: &Path| {
        as_nobody(
            "timeout",
            &["3", bin.to_str().expect("utf-8"), "status", "--socket", socket.to_str().expect("utf-8")],
        )
        .output()
        .expect("weft status as nobody")
    };
    let out = status(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(7) && err.contains("Permission denied"), "{:?}: {err}", out.status);

    let open = dir.path().join("open.sock");
    let _control = std::os::unix::net::UnixListener::bind(&open).expect("bind control socket");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o666)).expect("chmod control socket");
    let out = status(&open);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "the test cannot act as nobody");
}
