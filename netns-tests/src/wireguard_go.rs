//! `wireguard-go` (Debian's userspace WireGuard) inside a namespace, configured with `wg` as
//! its users configure it: a peer to interoperate with, and a baseline to measure against.
//!
//! There is no kernel WireGuard module on the test machines, so `ip link add type wireguard`
//! fails and wireguard-go is the WireGuard there is. It keeps its control sockets in
//! `/var/run/wireguard`, which every namespace shares, so interface names must be unique per
//! run ([`WgGo::start`] takes the name).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cmd::{self, Proc};
use crate::netns::Netns;

/// Where wireguard-go puts its control sockets (`<ifname>.sock`), and where `wg` looks.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// How long a stopping wireguard-go gets before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(3);

/// One WireGuard peer as `wg set … peer` takes it.
#[derive(Clone, Debug)]
pub struct WgPeer {
    /// Its public key, base64.
    pub public_key: String,
    /// `ip:port`.
    pub endpoint: String,
    /// Comma-separated CIDRs.
    pub allowed_ips: String,
}

/// What one wireguard-go node runs with.
#[derive(Clone, Debug)]
pub struct WgGoConfig {
    /// Interface name (unique per run: see the module doc).
    pub ifname: String,
    /// The private key's file (base64, as `wg genkey` and weft write it; mode 0600).
    pub private_key: PathBuf,
    /// UDP port.
    pub listen_port: u16,
    /// The interface's address, CIDR.
    pub address: String,
    /// Routes to add through the interface (CIDRs), besides the address's own subnet.
    pub routes: Vec<String>,
    /// Interface MTU (`wg-quick`'s default on a 1500-byte underlay is 1420).
    pub mtu: u16,
    /// Its peers.
    pub peers: Vec<WgPeer>,
}

/// A running wireguard-go: stopped on drop (SIGTERM, then SIGKILL), its control socket removed.
#[derive(Debug)]
pub struct WgGo {
    proc: Proc,
    socket: PathBuf,
    ifname: String,
}

/// The path of `program` on `PATH`, or an error naming the Debian package that has it.
///
/// # Errors
///
/// Fails if it is not there.
pub fn find_program(program: &str, package: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found on PATH (Debian package {package})"))
}

impl WgGo {
    /// Starts wireguard-go in `ns` (log in `dir`) and configures it as `cfg` says, with `wg`
    /// and `ip`, as a user would.
    ///
    /// # Errors
    ///
    /// Fails if wireguard-go or wg is missing, the daemon exits or never creates its
    /// interface, or a configuration command fails.
    pub fn start(ns: &Netns, dir: &Path, cfg: &WgGoConfig) -> Result<Self> {
        let wireguard_go = find_program("wireguard-go", "wireguard-go")?;
        let wg = find_program("wg", "wireguard-tools")?;
        let name = cfg.ifname.as_str();
        let log = dir.join(format!("wireguard-go-{name}.log"));
        let mut c = ns.command(&wireguard_go, &[name]);
        // Stay in the foreground, so the pid is the daemon's and the Proc can stop it. (Some
        // releases refuse to run on Linux without the second variable; 0.0.20220316 does not.)
        c.env("WG_PROCESS_FOREGROUND", "1").env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
        let what = format!("[{}] wireguard-go {name}", ns.name());
        let mut node = Self {
            proc: Proc::spawn(c, &what, Some(&log))?,
            socket: Path::new(SOCKET_DIR).join(format!("{name}.sock")),
            ifname: name.to_owned(),
        };
        let up = cmd::poll_until(Duration::from_secs(10), || {
            if let Some(status) = node.proc.try_wait()? {
                bail!("{what} exited with {status}:\n{}", cmd::tail(&log, 20));
            }
            Ok((ns.has_link(name)? && node.socket.exists()).then_some(()))
        })?;
        if up.is_none() {
            bail!("{what}: no interface and control socket after 10 s");
        }
        let wg = wg.to_str().context("wg path is not UTF-8")?.to_owned();
        let key = cfg.private_key.to_str().context("key path is not UTF-8")?.to_owned();
        let port = cfg.listen_port.to_string();
        let mut args: Vec<&str> = vec!["set", name, "private-key", &key, "listen-port", &port];
        for p in &cfg.peers {
            args.extend(["peer", &p.public_key, "endpoint", &p.endpoint, "allowed-ips", &p.allowed_ips]);
        }
        ns.exec_ok(&wg, &args)?;
        let mtu = cfg.mtu.to_string();
        ns.exec_ok("ip", &["link", "set", name, "mtu", &mtu, "up"])?;
        ns.exec_ok("ip", &["addr", "add", &cfg.address, "dev", name])?;
        for r in &cfg.routes {
            ns.exec_ok("ip", &["route", "add", r, "dev", name])?;
        }
        node.ifname = name.to_owned();
        Ok(node)
    }

    /// The daemon's pid (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Its interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Stops the daemon, failing if it had died before.
    ///
    /// # Errors
    ///
    /// Fails if it exited on its own, or cannot be stopped.
    pub fn stop(mut self) -> Result<()> {
        if let Some(status) = self.proc.try_wait()? {
            bail!("{} exited during the run with {status}", self.proc.what());
        }
        self.proc.terminate(KILL_GRACE).map(|_| ())
    }
}

impl Drop for WgGo {
    fn drop(&mut self) {
        if let Err(e) = self.proc.terminate(KILL_GRACE) {
            eprintln!("stopping {}: {e:#}", self.proc.what());
        }
        // wireguard-go removes it on SIGTERM; not after SIGKILL.
        let _ = std::fs::remove_file(&self.socket);
    }
}
