//! Running the real `weft` daemon in a host namespace: its config file, readiness, status,
//! reload and graceful stop.
//!
//! Status is read as a loose [`serde_json::Value`] through dotted paths (`drops.no_route`), so
//! the tests survive small changes in the shape of `weft status --json`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cmd::{self, Proc};
use crate::lease::LeaseSettings;
use crate::netns::Netns;
use crate::topology::{Host, Topology, underlay_ip};

/// weft's default UDP port (flannel's `udp` backend port).
pub const PORT: u16 = 8285;

/// VXLAN port weft and Linux use by default (flannel's).
pub const VXLAN_PORT: u16 = 8472;
/// The port of the `wireguard` tests (WireGuard's and weft's default).
pub const WIREGUARD_PORT: u16 = 51820;

/// The cluster network every test uses.
pub const NETWORK: &str = "10.244.0.0/16";

/// The TUN name every test uses.
pub const TUN: &str = "weft0";

/// How long `start` waits for `weft status` to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often readiness is polled.
const READY_POLL: Duration = Duration::from_millis(100);

/// How long `stop` waits for a graceful exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadline for one `weft status` call.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// How many log lines to print when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// Finds the `weft` binary: `$WEFT_BIN`, else `$CARGO_TARGET_DIR/{release,debug}/weft` if that
/// variable is set, else `<workspace>/target/release/weft`, else `<workspace>/target/debug/weft`.
///
/// # Errors
///
/// Fails with the places looked at, and the build command, if none exists.
pub fn weft_bin() -> Result<PathBuf> {
    if let Some(p) = bin_from_env("WEFT_BIN")? {
        return Ok(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("netns-tests has no parent directory")?;
    let mut targets = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        targets.push(workspace.join(t));
    }
    targets.push(workspace.join("target"));
    let candidates: Vec<PathBuf> =
        targets.iter().flat_map(|t| [t.join("release/weft"), t.join("debug/weft")]).collect();
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!("no weft binary (looked at $WEFT_BIN, {}); run `cargo build --release --bins` first", looked.join(", "))
}

/// The binary named by environment variable `var`, if set.
///
/// # Errors
///
/// Fails if the variable names something that is not a file.
pub fn bin_from_env(var: &str) -> Result<Option<PathBuf>> {
    let Some(p) = std::env::var_os(var) else { return Ok(None) };
    let p = PathBuf::from(p);
    if !p.is_file() {
        bail!("{var}={} is not a file", p.display());
    }
    Ok(Some(p))
}

/// One `[[peers]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// Peer node name.
    pub name: String,
    /// The peer's subnet, `10.244.<i>.0/24`.
    pub subnet: String,
    /// The peer's underlay `ip:port`.
    pub endpoint: String,
    /// Per-peer overlay MTU, if smaller than ours.
    pub mtu: Option<u32>,
    /// The peer's VTEP MAC (VXLAN).
    pub mac: Option<String>,
    /// The peer's WireGuard public key (`wireguard`).
    pub public_key: Option<String>,
}

impl PeerConfig {
    /// The peer entry for numbered host `n<i>`: subnet `10.244.<i>.0/24`, endpoint
    /// `198.18.0.<i>:8285`.
    pub fn for_host(i: u8) -> Self {
        Self {
            name: format!("n{i}"),
            subnet: format!("10.244.{i}.0/24"),
            endpoint: format!("{}:{PORT}", underlay_ip(i)),
            mtu: None,
            mac: None,
            public_key: None,
        }
    }

    /// The WireGuard peer entry for numbered host `n<i>` with key `key`: endpoint
    /// `198.18.0.<i>:51820`.
    pub fn wireguard_for_host(i: u8, key: &WgKey) -> Self {
        Self {
            endpoint: format!("{}:{WIREGUARD_PORT}", underlay_ip(i)),
            public_key: Some(key.public.clone()),
            ..Self::for_host(i)
        }
    }

    /// The VXLAN peer entry for numbered host `n<i>`: endpoint `198.18.0.<i>:8472`, VTEP MAC
    /// [`vtep_mac`]`(i)`.
    pub fn vxlan_for_host(i: u8) -> Self {
        Self { endpoint: format!("{}:{VXLAN_PORT}", underlay_ip(i)), mac: Some(vtep_mac(i)), ..Self::for_host(i) }
    }

    /// Sets the per-peer overlay MTU.
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }
}

/// A `weft run` config file; [`NodeConfig::to_toml`] renders it (the socket path is per test,
/// so it is supplied at render time).
///
/// With [`NodeConfig::lease`] set the daemon runs in **lease mode**: `port`, `network` and
/// `subnet` are not written (they come from the store's network config and the lease), and
/// `backend`, `vtep_mac` and `peers` are written only when a test sets them, for instance to
/// check that the daemon refuses them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// `node_name`, also the [`Host`] the node runs on.
    pub node_name: String,
    /// Underlay address the socket binds.
    pub public_ip: Ipv4Addr,
    /// Leave `public_ip` out of the file, for weft to find it (from `iface`, else from the
    /// default route); [`NodeConfig::public_ip`] is then only what the test expects.
    pub omit_public_ip: bool,
    /// `iface`: the underlay interface by name or address; `None` leaves it out.
    pub iface: Option<String>,
    /// UDP port.
    pub port: u16,
    /// Cluster network.
    pub network: String,
    /// This node's subnet.
    pub subnet: String,
    /// TUN interface name.
    pub tun_name: String,
    /// Overlay MTU; `None` lets weft compute it from the underlay interface.
    pub mtu: Option<u32>,
    /// Forwarding workers; `None` lets weft choose.
    pub workers: Option<u32>,
    /// `io` backend (`auto`, `uring`, `mmsg`); `None` lets weft choose.
    pub io: Option<String>,
    /// Wire format (`udp`, `vxlan`, `wireguard`); `None` is weft's default (udp).
    pub backend: Option<String>,
    /// Our VTEP MAC (VXLAN); `None` lets weft derive it.
    pub vtep_mac: Option<String>,
    /// `tun` or `tap`; `None` is weft's default (tun).
    pub device: Option<String>,
    /// `offload` (TUN TSO + UDP GSO); `None` is weft's default (on).
    pub offload: Option<bool>,
    /// `gro` (UDP GRO + merging for the TUN); `None` is weft's default (on).
    pub gro: Option<bool>,
    /// Static peers.
    pub peers: Vec<PeerConfig>,
    /// Lease mode: the store and per-node state files. `None` is static mode.
    pub lease: Option<LeaseSettings>,
    /// Extra environment for the daemon (`WEFT_FAILPOINT=worker-panic`, say).
    pub env: Vec<(String, String)>,
    /// `ip_masq`; `None` is weft's default (off).
    pub ip_masq: Option<bool>,
    /// `healthz_port`; `None` is weft's default (off).
    pub healthz_port: Option<u16>,
    /// `healthz_ip`; `None` is weft's default (127.0.0.1).
    pub healthz_ip: Option<String>,
    /// `wireguard_key_file`; `None` leaves weft's default.
    pub wireguard_key_file: Option<PathBuf>,
    /// Run the daemon as this unprivileged uid (and the same gid), rootless: its socket,
    /// `XDG_RUNTIME_DIR` and `HOME` go under a directory of its own ([`WeftNode::user_dir`]).
    pub run_as: Option<u32>,
}

impl NodeConfig {
    /// The config for numbered host `n<i>`: `198.18.0.<i>`, subnet `10.244.<i>.0/24`, one
    /// worker (the machines have 2 cores), no peers.
    ///
    /// `io` comes from `$WEFT_TEST_IO` when set, and `WEFT_TEST_OFFLOAD=off` turns offloads
    /// and GRO off, so the whole suite can be run once per I/O backend and offload mode.
    pub fn for_host(i: u8) -> Self {
        Self {
            node_name: format!("n{i}"),
            public_ip: underlay_ip(i),
            omit_public_ip: false,
            iface: None,
            port: PORT,
            network: NETWORK.to_owned(),
            subnet: format!("10.244.{i}.0/24"),
            tun_name: TUN.to_owned(),
            mtu: None,
            workers: Some(1),
            io: std::env::var("WEFT_TEST_IO").ok().filter(|s| !s.is_empty()),
            backend: None,
            vtep_mac: None,
            device: None,
            offload: std::env::var("WEFT_TEST_OFFLOAD").ok().filter(|v| v == "off").map(|_| false),
            gro: None,
            peers: Vec::new(),
            lease: None,
            env: Vec::new(),
            ip_masq: None,
            healthz_port: None,
            healthz_ip: None,
            wireguard_key_file: None,
            run_as: None,
        }
    }

    /// `n<i>` speaking WireGuard on port 51820 with the key `keys[i - 1]`, peered with every
    /// other host of `n1..=n<hosts>` by their keys.
    pub fn wireguard_mesh(i: u8, hosts: u8, keys: &[WgKey]) -> Self {
        let key = |j: u8| keys.get(usize::from(j).saturating_sub(1));
        let mut c = Self {
            port: WIREGUARD_PORT,
            backend: Some("wireguard".into()),
            wireguard_key_file: key(i).map(|k| k.file.clone()),
            ..Self::for_host(i)
        };
        c.peers = (1..=hosts)
            .filter(|&j| j != i)
            .filter_map(|j| key(j).map(|k| PeerConfig::wireguard_for_host(j, k)))
            .collect();
        c
    }

    /// The lease-mode config for numbered host `n<i>`: `198.18.0.<i>`, one worker, no subnet
    /// and no peers (both come from the store), store and state files from `lease`
    /// ([`LeaseSettings::for_node`] builds one in a test's scratch dir).
    pub fn leased(i: u8, lease: LeaseSettings) -> Self {
        Self { lease: Some(lease), ..Self::for_host(i) }
    }

    /// Adds `key=value` to the daemon's environment.
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets `ip_masq`.
    pub fn ip_masq(mut self, on: bool) -> Self {
        self.ip_masq = Some(on);
        self
    }

    /// Sets `healthz_port` (and so turns on `/healthz`, `/readyz` and `/metrics`).
    pub fn healthz_port(mut self, port: u16) -> Self {
        self.healthz_port = Some(port);
        self
    }

    /// Whether this config runs the daemon in lease mode.
    pub fn is_lease_mode(&self) -> bool {
        self.lease.is_some()
    }

    /// `n<i>` speaking VXLAN on port 8472 with VTEP MAC [`vtep_mac`]`(i)`, peered over VXLAN
    /// with every other host of `n1..=n<hosts>`.
    pub fn vxlan_mesh(i: u8, hosts: u8) -> Self {
        let mut c =
            Self { port: VXLAN_PORT, backend: Some("vxlan".into()), vtep_mac: Some(vtep_mac(i)), ..Self::for_host(i) };
        c.peers = (1..=hosts).filter(|&j| j != i).map(PeerConfig::vxlan_for_host).collect();
        c
    }

    /// The config for `n<i>` peered with every other host of `n1..=n<hosts>`.
    pub fn mesh(i: u8, hosts: u8) -> Self {
        let others: Vec<u8> = (1..=hosts).filter(|&j| j != i).collect();
        Self::for_host(i).with_peers(&others)
    }

    /// Adds numbered hosts as peers, with default settings.
    pub fn with_peers(mut self, hosts: &[u8]) -> Self {
        self.peers.extend(hosts.iter().map(|&i| PeerConfig::for_host(i)));
        self
    }

    /// Adds one peer entry.
    pub fn with_peer(mut self, peer: PeerConfig) -> Self {
        self.peers.push(peer);
        self
    }

    /// The gateway (TUN) address: the first usable address of `subnet`.
    ///
    /// # Errors
    ///
    /// Fails if `subnet` is not `a.b.c.d/len`, or in lease mode, where the subnet is known only
    /// from the running daemon ([`WeftNode::gateway`] asks it).
    pub fn gateway(&self) -> Result<Ipv4Addr> {
        if self.is_lease_mode() {
            bail!("{} is in lease mode: its gateway comes from the lease (ask the daemon)", self.node_name);
        }
        gateway_of(&self.subnet)
    }

    /// Renders the TOML file, with `api_socket` set to `socket`.
    pub fn to_toml(&self, socket: &Path) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "node_name = {}", quote(&self.node_name));
        if !self.omit_public_ip {
            let _ = writeln!(s, "public_ip = {}", quote(&self.public_ip.to_string()));
        }
        if let Some(i) = &self.iface {
            let _ = writeln!(s, "iface = {}", quote(i));
        }
        if let Some(lease) = &self.lease {
            lease.write_toml(&mut s);
        } else {
            let _ = writeln!(s, "port = {}", self.port);
            let _ = writeln!(s, "network = {}", quote(&self.network));
            let _ = writeln!(s, "subnet = {}", quote(&self.subnet));
        }
        self.write_common_toml(&mut s, socket);
        s
    }

    /// Everything after the mode-specific keys: interface, workers, backend, socket, peers.
    fn write_common_toml(&self, s: &mut String, socket: &Path) {
        let _ = writeln!(s, "tun_name = {}", quote(&self.tun_name));
        if let Some(mtu) = self.mtu {
            let _ = writeln!(s, "mtu = {mtu}");
        }
        if let Some(w) = self.workers {
            let _ = writeln!(s, "workers = {w}");
        }
        if let Some(io) = &self.io {
            let _ = writeln!(s, "io = {}", quote(io));
        }
        if let Some(b) = &self.backend {
            let _ = writeln!(s, "backend = {}", quote(b));
        }
        if let Some(m) = &self.vtep_mac {
            let _ = writeln!(s, "vtep_mac = {}", quote(m));
        }
        if let Some(k) = &self.wireguard_key_file {
            let _ = writeln!(s, "wireguard_key_file = {}", quote(&k.display().to_string()));
        }
        if let Some(d) = &self.device {
            let _ = writeln!(s, "device = {}", quote(d));
        }
        if let Some(o) = self.offload {
            let _ = writeln!(s, "offload = {o}");
        }
        if let Some(g) = self.gro {
            let _ = writeln!(s, "gro = {g}");
        }
        let _ = writeln!(s, "api_socket = {}", quote(&socket.display().to_string()));
        if let Some(m) = self.ip_masq {
            let _ = writeln!(s, "ip_masq = {m}");
        }
        if let Some(p) = self.healthz_port {
            let _ = writeln!(s, "healthz_port = {p}");
        }
        if let Some(ip) = &self.healthz_ip {
            let _ = writeln!(s, "healthz_ip = {}", quote(ip));
        }
        for p in &self.peers {
            let _ = writeln!(s, "\n[[peers]]");
            let _ = writeln!(s, "name = {}", quote(&p.name));
            let _ = writeln!(s, "subnet = {}", quote(&p.subnet));
            let _ = writeln!(s, "endpoint = {}", quote(&p.endpoint));
            if let Some(mtu) = p.mtu {
                let _ = writeln!(s, "mtu = {mtu}");
            }
            if let Some(m) = &p.mac {
                let _ = writeln!(s, "mac = {}", quote(m));
            }
            if let Some(k) = &p.public_key {
                let _ = writeln!(s, "public_key = {}", quote(k));
            }
        }
    }
}

/// The first usable address of an IPv4 CIDR (`10.244.7.0/24` → `10.244.7.1`): weft's gateway.
///
/// # Errors
///
/// Fails if `subnet` is not `a.b.c.d/len`.
pub fn gateway_of(subnet: &str) -> Result<Ipv4Addr> {
    let (addr, _) = subnet.split_once('/').with_context(|| format!("subnet {subnet:?} has no prefix length"))?;
    let base: Ipv4Addr = addr.parse().with_context(|| format!("subnet {subnet:?} is not IPv4"))?;
    Ok(Ipv4Addr::from(u32::from(base).wrapping_add(1)))
}

/// A node key for the `wireguard` tests: its file (0600, as weft wants it) and public key.
#[derive(Clone, Debug)]
pub struct WgKey {
    /// The private key's file.
    pub file: PathBuf,
    /// The public key, base64.
    pub public: String,
}

/// Writes fresh node keys for `n1..=n<hosts>` into `dir` (`n<i>.key`).
///
/// # Errors
///
/// Fails if a file cannot be written or the random source fails.
pub fn wireguard_keys(dir: &Path, hosts: u8) -> Result<Vec<WgKey>> {
    use std::os::unix::fs::OpenOptionsExt;
    (1..=hosts)
        .map(|i| {
            let k = weft_forwarder::wireguard::PrivateKey::generate().map_err(|e| anyhow::anyhow!("key: {e}"))?;
            let file = dir.join(format!("n{i}.key"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .with_context(|| format!("creating {}", file.display()))?;
            std::io::Write::write_all(&mut f, k.to_base64().as_bytes())?;
            Ok(WgKey { file, public: k.public_key().to_string() })
        })
        .collect()
}

/// The VTEP MAC the tests give numbered host `n<i>`.
pub fn vtep_mac(i: u8) -> String {
    format!("02:77:00:00:00:{i:02x}")
}

/// A TOML basic string (the values here never need more than `"` and `\` escaped).
pub(crate) fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A `weft run` daemon inside a host's namespace.
///
/// Drop stops it (SIGTERM, then SIGKILL) and, if the test is panicking, prints the tail of its
/// log so the failure explains itself.
#[derive(Debug)]
pub struct WeftNode<'t> {
    host: &'t Host,
    config: NodeConfig,
    bin: PathBuf,
    config_path: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl<'t> WeftNode<'t> {
    /// Writes `config` into `dir`, starts `weft run` in `host`'s namespace and waits until
    /// `weft status` answers (polling every 100 ms for up to 10 s).
    ///
    /// # Errors
    ///
    /// Fails if there is no weft binary, the daemon exits early or never answers; the error
    /// carries the tail of its log.
    pub fn start(host: &'t Host, dir: &Path, config: NodeConfig) -> Result<Self> {
        let mut node = Self::start_unready(host, dir, config)?;
        let name = node.config.node_name.clone();
        node.wait_ready().with_context(|| format!("weft {name} did not become ready"))?;
        Ok(node)
    }

    /// Writes `config` into `dir` and starts `weft run` in `host`'s namespace without waiting
    /// for `weft status` to answer: a lease-mode node whose store is down answers nothing on
    /// its API socket until it holds a lease (its `/healthz` and `/readyz` do answer).
    ///
    /// # Errors
    ///
    /// Fails if there is no weft binary or it cannot be started.
    pub fn start_unready(host: &'t Host, dir: &Path, config: NodeConfig) -> Result<Self> {
        let mut bin = weft_bin()?;
        let name = config.node_name.clone();
        let mut socket = dir.join(format!("{name}.sock"));
        if let Some(uid) = config.run_as {
            // Everything the user writes lives in a directory it owns, with its own copy of
            // the binary (the checkout may not be readable to it).
            let home = Self::user_dir_of(dir, &name);
            for d in [home.join("run"), home.join("home")] {
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            }
            let copy = home.join("weft");
            std::fs::copy(&bin, &copy).with_context(|| format!("copying {} to {}", bin.display(), copy.display()))?;
            for p in [home.clone(), home.join("run"), home.join("home"), copy.clone()] {
                std::os::unix::fs::chown(&p, Some(uid), Some(uid)).with_context(|| format!("chown {}", p.display()))?;
            }
            bin = copy;
            socket = home.join("run").join("weft.sock");
        }
        let mut node = Self {
            host,
            config,
            bin,
            config_path: dir.join(format!("{name}.toml")),
            socket,
            log: dir.join(format!("{name}.log")),
            proc: None,
        };
        node.spawn_process()?;
        Ok(node)
    }

    /// The directory a rootless node `name` started in `dir` owns (see
    /// [`WeftNode::user_dir`]), known before it starts, for paths in its config.
    pub fn user_dir_of(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}-user"))
    }

    /// A rootless node's own directory: `run/` (its `XDG_RUNTIME_DIR`, with the API socket),
    /// `home/` (its `HOME`, with the state), its copy of `weft`.
    pub fn user_dir(&self) -> Option<PathBuf> {
        self.config
            .run_as
            .map(|_| Self::user_dir_of(self.config_path.parent().unwrap_or(Path::new("/")), &self.config.node_name))
    }

    /// `setpriv` arguments that run `program args` inside this rootless node's overlay, as
    /// its user (`setpriv … weft exec --socket … -- program args`): run them with
    /// `ns().exec_timeout("setpriv", …)` or `ns().spawn("setpriv", …)`.
    ///
    /// # Errors
    ///
    /// Fails if the node is not rootless.
    pub fn overlay_args(&self, program: &str, args: &[&str]) -> Result<Vec<String>> {
        let Some(uid) = self.config.run_as else {
            bail!("{} is not a rootless node", self.config.node_name);
        };
        let uid = uid.to_string();
        let mut all: Vec<String> = ["--reuid", &uid, "--regid", &uid, "--clear-groups"].map(str::to_owned).to_vec();
        all.extend([
            self.bin.display().to_string(),
            "exec".into(),
            "--socket".into(),
            self.socket.display().to_string(),
        ]);
        all.push("--".into());
        all.push(program.to_owned());
        all.extend(args.iter().map(|a| (*a).to_owned()));
        Ok(all)
    }

    /// Writes the config, starts `weft run` and waits until it is ready.
    fn spawn(&mut self) -> Result<()> {
        let name = self.config.node_name.clone();
        self.spawn_process()?;
        self.wait_ready().with_context(|| format!("weft {name} did not become ready"))
    }

    /// Writes the config and starts `weft run`.
    fn spawn_process(&mut self) -> Result<()> {
        self.write_config()?;
        let config_arg = self.config_path.display().to_string();
        let args = ["run", "--config", config_arg.as_str()];
        let mut cmd = match (self.config.run_as, self.user_dir()) {
            (Some(uid), Some(home)) => {
                let (uid, bin) = (uid.to_string(), self.bin.display().to_string());
                let all = ["--reuid", &uid, "--regid", &uid, "--clear-groups", &bin, "run", "--config", &config_arg];
                let mut c = self.host.ns().command("setpriv", &all);
                c.env("XDG_RUNTIME_DIR", home.join("run")).env("HOME", home.join("home"));
                c
            }
            _ => self.host.ns().command(&self.bin, &args),
        };
        cmd.envs(self.config.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let what = format!("[{}] {} {}", self.host.ns().name(), self.bin.display(), args.join(" "));
        self.proc = Some(Proc::spawn(cmd, &what, Some(&self.log))?);
        Ok(())
    }

    /// Starts the daemon again, with the same config, socket and log (appended), after
    /// [`WeftNode::stop`] or an exit; waits until `weft status` answers.
    ///
    /// # Errors
    ///
    /// Fails if the daemon is still running, or as [`WeftNode::start`].
    pub fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("weft {} is still running; stop it before restarting", self.config.node_name);
        }
        self.proc = None;
        self.spawn()
    }

    /// SIGKILL, no cleanup by the daemon (its TUN goes with the process, its state files and
    /// lease stay); waits until it is reaped.
    ///
    /// # Errors
    ///
    /// Fails if the daemon is not running or does not die within 10 s.
    pub fn kill(&mut self) -> Result<()> {
        let name = self.config.node_name.clone();
        let proc = self.proc_mut()?;
        proc.signal("KILL")?;
        if proc.wait_timeout(STOP_TIMEOUT)?.is_none() {
            bail!("weft {name} still running {STOP_TIMEOUT:?} after SIGKILL");
        }
        self.proc = None;
        Ok(())
    }

    /// Polls `weft status` until it answers (every 100 ms, up to 10 s), failing fast if the
    /// daemon exits.
    ///
    /// # Errors
    ///
    /// Fails if the daemon exits or does not answer in time; the error carries its log tail.
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.proc_mut()?.try_wait()? {
                bail!("weft exited with {status} during startup; log tail:\n{}", self.log_tail(LOG_TAIL_LINES));
            }
            match self.status_json() {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(READY_POLL);
        }
        bail!(
            "no answer from `weft status` within {READY_TIMEOUT:?}; last error: {last}\nlog tail:\n{}",
            self.log_tail(LOG_TAIL_LINES)
        )
    }

    fn write_config(&self) -> Result<()> {
        std::fs::write(&self.config_path, self.config.to_toml(&self.socket))
            .with_context(|| format!("writing {}", self.config_path.display()))
    }

    fn proc_mut(&mut self) -> Result<&mut Proc> {
        self.proc.as_mut().with_context(|| format!("weft {} is not running", self.config.node_name))
    }

    /// `weft status --json`, parsed.
    ///
    /// # Errors
    ///
    /// Fails if the command fails (daemon unreachable) or prints something that is not JSON.
    pub fn status_json(&self) -> Result<Value> {
        let socket = self.socket.display().to_string();
        let bin = self.bin.display().to_string();
        let out =
            self.host.ns().exec_timeout(STATUS_TIMEOUT, &bin, &["status", "--socket", &socket, "--json"])?.ok()?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("`weft status --json` printed non-JSON:\n{}", out.stdout))
    }

    /// `weft status` (table form) as printed, for humans.
    ///
    /// # Errors
    ///
    /// Fails if the command fails.
    pub fn status_text(&self) -> Result<String> {
        let socket = self.socket.display().to_string();
        let bin = self.bin.display().to_string();
        Ok(self.host.ns().exec_timeout(STATUS_TIMEOUT, &bin, &["status", "--socket", &socket])?.ok()?.stdout)
    }

    /// The number at dotted `path` in the status (`drops.unknown_sender`).
    ///
    /// # Errors
    ///
    /// Fails if status cannot be read or `path` is not an unsigned integer.
    pub fn counter(&self, path: &str) -> Result<u64> {
        json_u64(&self.status_json()?, path)
    }

    /// Polls the counter at `path` until `pred` holds (every 50 ms, up to `timeout`); returns
    /// the last value read either way, so the caller can assert on it with a good message.
    ///
    /// # Errors
    ///
    /// Fails if status cannot be read or `path` is missing.
    pub fn wait_counter(&self, path: &str, timeout: Duration, pred: impl Fn(u64) -> bool) -> Result<u64> {
        let mut last = self.counter(path)?;
        let found = cmd::poll_until(timeout, || {
            last = self.counter(path)?;
            Ok(pred(last).then_some(last))
        })?;
        Ok(found.unwrap_or(last))
    }

    /// Sends SIGHUP: weft re-reads its config file and swaps the peer table.
    ///
    /// # Errors
    ///
    /// Fails if the daemon is not running.
    pub fn reload(&mut self) -> Result<()> {
        self.proc_mut()?.signal("HUP")
    }

    /// Rewrites the config file with `config` and sends SIGHUP.
    ///
    /// # Errors
    ///
    /// Fails if the file cannot be written or the daemon is not running.
    pub fn reload_with(&mut self, config: NodeConfig) -> Result<()> {
        self.config = config;
        self.write_config()?;
        self.reload()
    }

    /// SIGTERM, wait up to 10 s, and check the graceful-exit contract: exit status 0 and the
    /// TUN gone from the namespace.
    ///
    /// # Errors
    ///
    /// Fails if the daemon is not running, does not exit in time, exits non-zero, or leaves
    /// its TUN behind.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let name = self.config.node_name.clone();
        let proc = self.proc_mut()?;
        proc.signal("TERM")?;
        let Some(status) = proc.wait_timeout(STOP_TIMEOUT)? else {
            bail!("weft {name} still running {STOP_TIMEOUT:?} after SIGTERM");
        };
        self.proc = None;
        if !status.success() {
            bail!("weft {name} exited with {status} after SIGTERM; log tail:\n{}", self.log_tail(LOG_TAIL_LINES));
        }
        if self.host.ns().has_link(&self.config.tun_name)? {
            bail!("weft {name} exited 0 but left {} in {}", self.config.tun_name, self.host.ns().name());
        }
        Ok(status)
    }

    /// `weft leave`: the node leaves the cluster (lease released, fail-closed route removed)
    /// and the daemon exits; waits for it and requires exit status 0 and the TUN gone.
    ///
    /// # Errors
    ///
    /// Fails if the command fails, or the daemon does not exit 0 within 10 s.
    pub fn leave(&mut self) -> Result<ExitStatus> {
        let name = self.config.node_name.clone();
        let socket = self.socket.display().to_string();
        let bin = self.bin.display().to_string();
        self.host.ns().exec_timeout(STOP_TIMEOUT, &bin, &["leave", "--socket", &socket])?.ok()?;
        let proc = self.proc_mut()?;
        let Some(status) = proc.wait_timeout(STOP_TIMEOUT)? else {
            bail!("weft {name} still running {STOP_TIMEOUT:?} after `weft leave`");
        };
        self.proc = None;
        if !status.success() {
            bail!("weft {name} exited with {status} after `weft leave`; log tail:\n{}", self.log_tail(LOG_TAIL_LINES));
        }
        if self.host.ns().has_link(&self.config.tun_name)? {
            bail!("weft {name} left but {} is still in {}", self.config.tun_name, self.host.ns().name());
        }
        Ok(status)
    }

    /// Waits up to `timeout` for the daemon to exit by itself; `None` if it is still running.
    ///
    /// # Errors
    ///
    /// Fails if the daemon was already stopped through this guard.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let status = self.proc_mut()?.wait_timeout(timeout)?;
        if status.is_some() {
            self.proc = None;
        }
        Ok(status)
    }

    /// The daemon's pid, while it runs under this guard.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Whether the daemon is still running (not exited, not stopped).
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// The config the daemon was last started or reloaded with.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The host the daemon runs on.
    pub fn host(&self) -> &'t Host {
        self.host
    }

    /// The daemon's namespace.
    pub fn ns(&self) -> &'t Netns {
        self.host.ns()
    }

    /// The gateway (TUN) address: from the config in static mode, from the daemon's status
    /// (`gateway`, filled from the lease) in lease mode.
    ///
    /// # Errors
    ///
    /// Fails if the configured subnet does not parse, or in lease mode if status cannot be read
    /// or has no IPv4 `gateway`.
    pub fn gateway(&self) -> Result<Ipv4Addr> {
        if !self.config.is_lease_mode() {
            return self.config.gateway();
        }
        let status = self.status_json()?;
        let gw = json_path(&status, "gateway")
            .and_then(Value::as_str)
            .with_context(|| format!("status of {} has no gateway: {status}", self.config.node_name))?;
        gw.parse().with_context(|| format!("status of {}: gateway {gw:?} is not IPv4", self.config.node_name))
    }

    /// The daemon's subnet: the config's in static mode, the status's `subnet` in lease mode.
    ///
    /// # Errors
    ///
    /// In lease mode, fails if status cannot be read or has no `subnet`.
    pub fn subnet(&self) -> Result<String> {
        if !self.config.is_lease_mode() {
            return Ok(self.config.subnet.clone());
        }
        let status = self.status_json()?;
        json_path(&status, "subnet")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("status of {} has no subnet: {status}", self.config.node_name))
    }

    /// The API socket the daemon listens on (`weft status --socket`, `weft ipam --socket`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The `weft` binary this node runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Path of the daemon's combined stdout/stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        cmd::tail(&self.log, lines)
    }
}

impl Drop for WeftNode<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- weft {} log tail ({}) ----\n{}",
                self.config.node_name,
                self.log.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        // Dropping the Proc sends SIGTERM, then SIGKILL.
        self.proc = None;
    }
}

impl Topology {
    /// Starts weft on the host named `config.node_name` with this topology's scratch dir.
    ///
    /// # Errors
    ///
    /// As [`WeftNode::start`], or if there is no such host.
    pub fn start_weft(&self, config: NodeConfig) -> Result<WeftNode<'_>> {
        let host = self.host(&config.node_name)?;
        WeftNode::start(host, self.dir(), config)
    }

    /// [`WeftNode::start_unready`] on the host named `config.node_name`.
    ///
    /// # Errors
    ///
    /// As [`WeftNode::start_unready`], or if there is no such host.
    pub fn start_weft_unready(&self, config: NodeConfig) -> Result<WeftNode<'_>> {
        let host = self.host(&config.node_name)?;
        WeftNode::start_unready(host, self.dir(), config)
    }

    /// Starts weft on `n1..=n<hosts>` with a full static peer mesh ([`NodeConfig::mesh`]).
    ///
    /// # Errors
    ///
    /// As [`WeftNode::start`]; daemons already started are stopped again.
    pub fn start_mesh(&self, hosts: u8) -> Result<Vec<WeftNode<'_>>> {
        (1..=hosts).map(|i| self.start_weft(NodeConfig::mesh(i, hosts))).collect()
    }
}

/// The value at dotted `path` (`drops.no_route`, `peers.0.tx_packets`) in `v`.
pub fn json_path<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(v, |v, key| match v {
        Value::Array(a) => a.get(key.parse::<usize>().ok()?),
        _ => v.get(key),
    })
}

/// The unsigned integer at dotted `path` in `v`.
///
/// # Errors
///
/// Fails, showing the JSON, if `path` is missing or not an unsigned integer.
pub fn json_u64(v: &Value, path: &str) -> Result<u64> {
    json_path(v, path).and_then(Value::as_u64).with_context(|| format!("status has no unsigned integer at {path}: {v}"))
}

/// The entry of `status.peers` whose `name` is `peer`.
pub fn peer_status<'v>(status: &'v Value, peer: &str) -> Option<&'v Value> {
    status.get("peers")?.as_array()?.iter().find(|p| p.get("name").and_then(Value::as_str) == Some(peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_has_every_key_and_peer() {
        let cfg = NodeConfig { io: Some("mmsg".into()), ..NodeConfig::for_host(1) }
            .with_peers(&[2])
            .with_peer(PeerConfig::for_host(3).mtu(1200));
        let toml = cfg.to_toml(Path::new("/tmp/wt1-x/n1.sock"));
        let expected = r#"node_name = "n1"
public_ip = "198.18.0.1"
port = 8285
network = "10.244.0.0/16"
subnet = "10.244.1.0/24"
tun_name = "weft0"
workers = 1
io = "mmsg"
api_socket = "/tmp/wt1-x/n1.sock"

[[peers]]
name = "n2"
subnet = "10.244.2.0/24"
endpoint = "198.18.0.2:8285"

[[peers]]
name = "n3"
subnet = "10.244.3.0/24"
endpoint = "198.18.0.3:8285"
mtu = 1200
"#;
        assert_eq!(toml, expected);
    }

    #[test]
    fn gateway_is_first_usable() {
        assert_eq!(NodeConfig::for_host(7).gateway().unwrap(), Ipv4Addr::new(10, 244, 7, 1));
    }

    #[test]
    fn json_paths() {
        let v: Value = serde_json::json!({
            "drops": {"no_route": 3},
            "peers": [{"name": "n2", "tx_packets": 5}],
        });
        assert_eq!(json_u64(&v, "drops.no_route").unwrap(), 3);
        assert_eq!(json_u64(&v, "peers.0.tx_packets").unwrap(), 5);
        assert!(json_u64(&v, "drops.martian").is_err());
        assert_eq!(peer_status(&v, "n2").and_then(|p| json_u64(p, "tx_packets").ok()), Some(5));
        assert!(peer_status(&v, "n9").is_none());
    }
}
