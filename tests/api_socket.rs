//! The API socket as `weft::daemon::api::bind` leaves it: 0600 from the moment its name
//! exists (bound in a private directory, then renamed into place), a stale socket replaced,
//! nothing else left behind. The "other users cannot connect" half needs root and lives in
//! `netns-tests/tests/state_perms.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;

#[test]
fn bound_0600_replacing_a_stale_socket_leaving_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/weft.sock");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    let first = weft::daemon::api::bind(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
    let ino = std::fs::metadata(&path).unwrap().ino();
    drop(first); // a crashed daemon leaves its socket file behind
    let _second = weft::daemon::api::bind(&path).unwrap();
    assert_ne!(std::fs::metadata(&path).unwrap().ino(), ino, "the stale socket was replaced");
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
    let names: Vec<_> = std::fs::read_dir(dir.path().join("run")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["weft.sock"]);
    std::os::unix::net::UnixStream::connect(&path).expect("the owner can connect");
}
