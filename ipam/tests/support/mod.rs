//! A real etcd (Debian's `etcd-server`) for tests: started on 127.0.0.1 with free ports and a
//! temporary data dir, killed (SIGKILL) and reaped on drop.
//!
//! Shared by `ipam/tests/etcd_store.rs` and the root crate's `tests/etcd_tls.rs` (through
//! `#[path]`), so it uses nothing from weft itself. Without an `etcd` binary, [`Etcd::start`]
//! fails under `CI=true` and otherwise returns `None` after printing why.

// Test harness code: a failed setup should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

pub mod pki;

use std::ffi::OsString;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd process; killed (SIGKILL) and reaped on drop, data dir removed with the guard.
pub struct Etcd {
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    data: tempfile::TempDir,
    /// `http` or `https`.
    scheme: &'static str,
    /// Extra command-line arguments (TLS files, limits).
    extra: Vec<OsString>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether `etcd` can run here; prints why not, or panics under `CI=true`.
pub fn etcd_installed() -> bool {
    if Command::new("etcd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
        return true;
    }
    let why = "etcd not found (Debian: apt-get install etcd-server)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}; CI must run the etcd tests");
    }
    eprintln!("SKIPPED: {why}");
    false
}

impl Etcd {
    /// Starts a plain-http etcd, or returns `None` (after saying why) when it is not installed
    /// and this is not CI.
    pub fn start() -> Option<Self> {
        Self::start_with("http", Vec::new())
    }

    /// Starts etcd with `extra` arguments, serving clients over `scheme` (`http` or `https`).
    pub fn start_with(scheme: &'static str, extra: Vec<OsString>) -> Option<Self> {
        if !etcd_installed() {
            return None;
        }
        let mut etcd = Self {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            data: tempfile::tempdir().unwrap(),
            scheme,
            extra,
        };
        etcd.spawn();
        Some(etcd)
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new("etcd")
            .args(["--name", "weft-test", "--data-dir"])
            .arg(self.data.path().join("data"))
            .args(["--listen-client-urls", &self.endpoint(), "--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("weft-test={peer}"), "--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not listen; see {}", self.log_path().display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// etcd's log (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.data.path().join("etcd.log")
    }

    /// Kills etcd (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts on the same ports and data dir (what a crashed etcd does under systemd).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
