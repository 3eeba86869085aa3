//! A real single-member etcd (Debian `etcd-server` 3.4) in its own host namespace on the
//! underlay bridge, for lease-mode tests: started, killed with SIGKILL and restarted on the same
//! data dir, paused with SIGSTOP and resumed, all through one RAII guard.
//!
//! ```text
//! ┌─ n1 ─────────────┐ ┌─ n2 ─────────────┐   ┌─ etcd ─────────────────────────────┐
//! │ eth0 198.18.0.1  │ │ eth0 198.18.0.2  │   │ eth0 198.18.0.100                   │
//! │ weft (store etcd)│ │ weft (store etcd)│   │ etcd :2379 client  :2380 peer       │
//! └────────┬─────────┘ └────────┬─────────┘   │ data dir <scratch>/etcd.data        │
//!          │                    │             └──────────────┬──────────────────────┘
//! ┌────────┴────────────────────┴────────────────────────────┴──────────────────────┐
//! │  u: bridge br0, underlay 198.18.0.0/24                                           │
//! └──────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! etcd listens only on 198.18.0.100 inside its namespace, so nothing outside the test's namespaces
//! can reach it. Readiness is `etcdctl endpoint health`, run inside the same namespace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, CmdOutput, Proc};
use crate::topology::{Host, Topology, underlay_ip};

/// Name of the etcd host in a [`Topology`].
pub const ETCD_HOST: &str = "etcd";

/// Last octet of etcd's underlay address: 198.18.0.100.
pub const ETCD_OCTET: u8 = 100;

/// etcd's client port.
pub const CLIENT_PORT: u16 = 2379;

/// etcd's peer port.
pub const PEER_PORT: u16 = 2380;

/// How long a (re)start may take until `endpoint health` succeeds.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(20);

/// Deadline of one `etcdctl` call (its own `--command-timeout` is shorter).
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a killed etcd may take to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// How many log lines to print when a test fails.
const LOG_TAIL_LINES: usize = 30;

/// etcd's client URL on the test underlay, `http://198.18.0.100:2379`.
pub fn client_url() -> String {
    format!("http://{}:{CLIENT_PORT}", underlay_ip(ETCD_OCTET))
}

/// A running (or deliberately killed or paused) etcd in `host`'s namespace.
///
/// Drop resumes it if paused, stops it (SIGTERM, then SIGKILL) and, if the test is panicking,
/// prints the tail of its log. The data dir stays in the scratch dir with the other logs.
#[derive(Debug)]
pub struct Etcd<'t> {
    host: &'t Host,
    data_dir: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
    paused: bool,
    starts: u32,
}

impl<'t> Etcd<'t> {
    /// Starts etcd in `host`'s namespace on `host.ip()`, data in `<dir>/etcd.data`, log in
    /// `<dir>/etcd.log`, and waits until `endpoint health` succeeds (up to 20 s).
    ///
    /// # Errors
    ///
    /// Fails if etcd is not installed, exits early or never becomes healthy; the error carries
    /// the tail of its log.
    pub fn start(host: &'t Host, dir: &Path) -> Result<Self> {
        let mut etcd = Self {
            host,
            data_dir: dir.join("etcd.data"),
            log: dir.join("etcd.log"),
            proc: None,
            paused: false,
            starts: 0,
        };
        etcd.spawn()?;
        Ok(etcd)
    }

    /// The client URL, `http://<host ip>:2379`.
    pub fn client_url(&self) -> String {
        format!("http://{}:{CLIENT_PORT}", self.host.ip())
    }

    /// The client URLs, for `etcd_endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.client_url()]
    }

    /// The etcd command line (etcd 3.4 flags).
    fn args(&self) -> Vec<String> {
        let ip = self.host.ip();
        let client = format!("http://{ip}:{CLIENT_PORT}");
        let peer = format!("http://{ip}:{PEER_PORT}");
        [
            "--name",
            "weft-test",
            "--data-dir",
            &self.data_dir.display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("weft-test={peer}"),
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "weft-test",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect()
    }

    /// Starts the process (on the existing data dir, if any) and waits until healthy.
    fn spawn(&mut self) -> Result<()> {
        let args = self.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut command: Command = self.host.ns().command("etcd", &args);
        if std::env::consts::ARCH == "aarch64" {
            // etcd 3.4 refuses to start on arm64 unless told the platform is acceptable.
            command.env("ETCD_UNSUPPORTED_ARCH", "arm64");
        }
        let what = format!("[{}] etcd", self.host.ns().name());
        self.proc = Some(Proc::spawn(command, &what, Some(&self.log))?);
        self.paused = false;
        self.starts += 1;
        self.wait_healthy(HEALTHY_TIMEOUT).context("etcd did not become healthy")
    }

    /// Polls `endpoint health` until it succeeds, failing fast if etcd exits.
    ///
    /// # Errors
    ///
    /// Fails if etcd exits or is not healthy within `timeout`; the error carries its log tail.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let proc = self.proc.as_mut().context("etcd is not running")?;
            if let Some(status) = proc.try_wait()? {
                self.proc = None;
                bail!("etcd exited with {status}; log tail:\n{}", self.log_tail(LOG_TAIL_LINES));
            }
            let out = self.etcdctl_with_timeout("1s", &["endpoint", "health"])?;
            if out.success() {
                return Ok(());
            }
            last = out.combined();
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("etcd not healthy after {timeout:?}; last answer: {last}\nlog tail:\n{}", self.log_tail(LOG_TAIL_LINES))
    }

    /// Whether `endpoint health` succeeds right now (1 s deadline).
    ///
    /// # Errors
    ///
    /// Fails only if etcdctl cannot be started.
    pub fn is_healthy(&self) -> Result<bool> {
        Ok(self.etcdctl_with_timeout("1s", &["endpoint", "health"])?.success())
    }

    /// `ETCDCTL_API=3 etcdctl --endpoints <url> <args>` inside etcd's namespace, with a 3 s
    /// `--command-timeout`; the output whatever the exit status.
    ///
    /// # Errors
    ///
    /// Fails only if etcdctl cannot be started.
    pub fn etcdctl(&self, args: &[&str]) -> Result<CmdOutput> {
        self.etcdctl_with_timeout("3s", args)
    }

    fn etcdctl_with_timeout(&self, command_timeout: &str, args: &[&str]) -> Result<CmdOutput> {
        let endpoints = format!("--endpoints={}", self.client_url());
        let timeout = format!("--command-timeout={command_timeout}");
        let mut full = vec!["ETCDCTL_API=3", "etcdctl", &endpoints, &timeout];
        full.extend_from_slice(args);
        self.host.ns().exec_timeout(ETCDCTL_TIMEOUT, "env", &full)
    }

    /// SIGKILL and reap: etcd gets no chance to flush or say goodbye. Resumes it first if it
    /// was paused, so the kill is delivered at once.
    ///
    /// # Errors
    ///
    /// Fails if etcd is not running or is not reaped within 10 s.
    pub fn kill(&mut self) -> Result<()> {
        let proc = self.proc.as_mut().context("etcd is not running")?;
        proc.signal("KILL")?;
        if proc.wait_timeout(KILL_TIMEOUT)?.is_none() {
            bail!("etcd still running {KILL_TIMEOUT:?} after SIGKILL");
        }
        self.proc = None;
        self.paused = false;
        Ok(())
    }

    /// Starts etcd again on the same data dir and address, and waits until healthy.
    ///
    /// # Errors
    ///
    /// Fails if it is still running, or as [`Etcd::start`].
    pub fn restart(&mut self) -> Result<()> {
        if self.proc.as_mut().is_some_and(Proc::is_running) {
            bail!("etcd is still running; kill it before restarting");
        }
        self.proc = None;
        self.spawn()
    }

    /// SIGSTOP: etcd keeps its sockets open but answers nothing (a hung store, as opposed to a
    /// dead one).
    ///
    /// # Errors
    ///
    /// Fails if etcd is not running.
    pub fn pause(&mut self) -> Result<()> {
        self.proc.as_mut().context("etcd is not running")?.signal("STOP")?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT after [`Etcd::pause`].
    ///
    /// # Errors
    ///
    /// Fails if etcd is not running.
    pub fn resume(&mut self) -> Result<()> {
        self.proc.as_mut().context("etcd is not running")?.signal("CONT")?;
        self.paused = false;
        Ok(())
    }

    /// Whether etcd is paused by [`Etcd::pause`].
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// etcd's pid, while it runs under this guard.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// How many times the process was started (1 after [`Etcd::start`]).
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The data directory, kept across restarts.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The host etcd runs on.
    pub fn host(&self) -> &'t Host {
        self.host
    }

    /// The last `lines` lines of etcd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        cmd::tail(&self.log, lines)
    }
}

impl Drop for Etcd<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- etcd log tail ({}) ----\n{}", self.log.display(), self.log_tail(LOG_TAIL_LINES));
        }
        if let (true, Some(proc)) = (self.paused, self.proc.as_mut()) {
            // A stopped process would sit out SIGTERM's grace period; let it handle it.
            let _ = proc.signal("CONT");
        }
        // Dropping the Proc sends SIGTERM, then SIGKILL.
        self.proc = None;
    }
}

impl Topology {
    /// Adds the etcd host `etcd` at 198.18.0.100 (call before starting it with
    /// [`Topology::start_etcd`]).
    ///
    /// # Errors
    ///
    /// As [`Topology::add_host`].
    pub fn add_etcd_host(&mut self) -> Result<()> {
        self.add_host(ETCD_HOST, ETCD_OCTET).map(|_| ())
    }

    /// Starts etcd on the host added by [`Topology::add_etcd_host`], data and log in the
    /// scratch dir.
    ///
    /// # Errors
    ///
    /// Fails if there is no etcd host, or as [`Etcd::start`].
    pub fn start_etcd(&self) -> Result<Etcd<'_>> {
        Etcd::start(self.host(ETCD_HOST)?, self.dir())
    }

    /// [`Topology::for_test`] plus the etcd host (not started).
    ///
    /// # Errors
    ///
    /// As [`Topology::for_test`] and [`Topology::add_etcd_host`].
    pub fn for_test_with_etcd(test: &str, tag: &str, hosts: u8) -> Result<Option<Self>> {
        let Some(mut topo) = Self::for_test(test, tag, hosts)? else {
            return Ok(None);
        };
        topo.add_etcd_host()?;
        Ok(Some(topo))
    }
}
