//! `weft-cni` run by a person, with no CNI environment: it says what it is and which CNI
//! versions it speaks, on stderr, exit 0, at once (it must not wait for stdin), as the
//! reference plugins do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn no_cni_command_prints_the_versions_without_reading_stdin() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-cni"))
        .env_remove("CNI_COMMAND")
        // stdin stays open and empty: a plugin that read it would hang here.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weft-cni");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("weft-cni without CNI_COMMAND waited for stdin");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", String::from_utf8_lossy(&out.stdout));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].starts_with("CNI weft-cni plugin v"), "{stderr}");
    assert_eq!(lines[1], "CNI protocol versions supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0");
}
