//! Lease mode: daemons that lease their subnets from a shared store (a file store directory or
//! etcd) and learn their peers from it, and the CLI commands around it (`weft network init`,
//! `weft leases`, `weft ipam`).
//!
//! Everything is read through the CLI as loose JSON ([`serde_json::Value`]), like
//! [`crate::weft`] reads status, so the tests check the contract the daemon prints rather than
//! its internal types.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cmd::CmdOutput;
use crate::netns::Netns;
use crate::topology::Topology;
use crate::weft::{WeftNode, json_path, quote, weft_bin};

/// flannel's etcd prefix, weft's default.
pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";

/// Deadline of one `weft network init`, `weft leases` or `weft ipam` call.
const CLI_TIMEOUT: Duration = Duration::from_secs(15);

/// Where lease-mode daemons and the `weft network init` / `weft leases` commands find leases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded file store; several daemons on one machine share the directory.
    File {
        /// `store_dir`.
        dir: PathBuf,
    },
    /// etcd v3.
    Etcd {
        /// `etcd_endpoints`, `http://198.18.0.100:2379`.
        endpoints: Vec<String>,
        /// `etcd_prefix`; `None` is weft's default, [`DEFAULT_ETCD_PREFIX`].
        prefix: Option<String>,
    },
}

impl StoreConfig {
    /// A file store in `dir`.
    pub fn file(dir: impl Into<PathBuf>) -> Self {
        Self::File { dir: dir.into() }
    }

    /// An etcd store at `endpoints` with the default prefix.
    pub fn etcd(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self::Etcd { endpoints: endpoints.into_iter().map(Into::into).collect(), prefix: None }
    }

    /// `"file"` or `"etcd"`, as `store` is spelt in the config and in `weft status`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File { .. } => "file",
            Self::Etcd { .. } => "etcd",
        }
    }

    /// The store flags of `weft network init` and `weft leases`: `--store file --store-dir D`
    /// or `--store etcd --etcd-endpoints A,B [--etcd-prefix P]`.
    pub fn cli_args(&self) -> Vec<String> {
        let mut args = vec!["--store".to_owned(), self.kind().to_owned()];
        match self {
            Self::File { dir } => args.extend(["--store-dir".to_owned(), dir.display().to_string()]),
            Self::Etcd { endpoints, prefix } => {
                args.extend(["--etcd-endpoints".to_owned(), endpoints.join(",")]);
                if let Some(p) = prefix {
                    args.extend(["--etcd-prefix".to_owned(), p.clone()]);
                }
            }
        }
        args
    }

    /// The store keys of a `weft run` config.
    fn write_toml(&self, s: &mut String) {
        // Writing to a String cannot fail.
        let _ = writeln!(s, "store = {}", quote(self.kind()));
        match self {
            Self::File { dir } => {
                let _ = writeln!(s, "store_dir = {}", quote(&dir.display().to_string()));
            }
            Self::Etcd { endpoints, prefix } => {
                let list: Vec<String> = endpoints.iter().map(|e| quote(e)).collect();
                let _ = writeln!(s, "etcd_endpoints = [{}]", list.join(", "));
                if let Some(p) = prefix {
                    let _ = writeln!(s, "etcd_prefix = {}", quote(p));
                }
            }
        }
    }
}

/// The lease-mode part of a node's config: the store and the node's own state files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Where the leases live.
    pub store: StoreConfig,
    /// flannel's `subnet.env`, per node in tests.
    pub subnet_file: PathBuf,
    /// Pod IPAM state, per node in tests.
    pub pod_dir: PathBuf,
    /// The lease cache, per node in tests (the default under /var/lib/weft would be shared by
    /// every test's `n1`).
    pub lease_cache: PathBuf,
    /// `lease_ttl_secs`; `None` is weft's default (24 h).
    pub lease_ttl_secs: Option<u64>,
    /// `release_on_exit`: delete the lease on a graceful stop.
    pub release_on_exit: bool,
}

impl LeaseSettings {
    /// Settings for node `node` in a test's scratch `dir`: `subnet_file` `<dir>/<node>.subnet.env`,
    /// `pod_dir` `<dir>/<node>.pods`, `lease_cache` `<dir>/<node>.lease-cache.json` (none is
    /// created here; the daemon creates them), the default TTL, no release on exit.
    pub fn for_node(store: &StoreConfig, dir: &Path, node: &str) -> Self {
        Self {
            store: store.clone(),
            subnet_file: dir.join(format!("{node}.subnet.env")),
            pod_dir: dir.join(format!("{node}.pods")),
            lease_cache: dir.join(format!("{node}.lease-cache.json")),
            lease_ttl_secs: None,
            release_on_exit: false,
        }
    }

    /// Sets `lease_ttl_secs`.
    pub fn ttl_secs(mut self, secs: u64) -> Self {
        self.lease_ttl_secs = Some(secs);
        self
    }

    /// Sets `release_on_exit = true`.
    pub fn release_on_exit(mut self) -> Self {
        self.release_on_exit = true;
        self
    }

    /// The lease-mode keys of a `weft run` config (no `subnet`, `network`, `port`).
    pub(crate) fn write_toml(&self, s: &mut String) {
        self.store.write_toml(s);
        // Writing to a String cannot fail.
        let _ = writeln!(s, "subnet_file = {}", quote(&self.subnet_file.display().to_string()));
        let _ = writeln!(s, "pod_dir = {}", quote(&self.pod_dir.display().to_string()));
        let _ = writeln!(s, "lease_cache = {}", quote(&self.lease_cache.display().to_string()));
        if let Some(ttl) = self.lease_ttl_secs {
            let _ = writeln!(s, "lease_ttl_secs = {ttl}");
        }
        if self.release_on_exit {
            let _ = writeln!(s, "release_on_exit = true");
        }
    }
}

/// The flags of `weft network init`; `None` leaves weft's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkInit {
    /// `--network`, default `10.244.0.0/16`.
    pub network: Option<String>,
    /// `--subnet-len`, default 24.
    pub subnet_len: Option<u8>,
    /// `--backend udp|vxlan`, default udp.
    pub backend: Option<String>,
    /// `--vni`.
    pub vni: Option<u32>,
    /// `--port`.
    pub port: Option<u16>,
    /// `--force`: overwrite an existing config.
    pub force: bool,
}

impl NetworkInit {
    /// `weft network init --backend udp` over weft's default network.
    pub fn udp() -> Self {
        Self { backend: Some("udp".into()), ..Self::default() }
    }

    /// `weft network init --backend vxlan` over weft's default network.
    pub fn vxlan() -> Self {
        Self { backend: Some("vxlan".into()), ..Self::default() }
    }

    /// Sets `--network` and `--subnet-len`.
    pub fn network(mut self, network: &str, subnet_len: u8) -> Self {
        self.network = Some(network.to_owned());
        self.subnet_len = Some(subnet_len);
        self
    }

    /// Sets `--force`.
    pub fn force(mut self) -> Self {
        self.force = true;
        self
    }

    /// The command line after `weft`, store flags included.
    pub fn cli_args(&self, store: &StoreConfig) -> Vec<String> {
        let mut args = vec!["network".to_owned(), "init".to_owned()];
        args.extend(store.cli_args());
        let mut opt = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                args.extend([flag.to_owned(), v]);
            }
        };
        opt("--network", self.network.clone());
        opt("--subnet-len", self.subnet_len.map(|v| v.to_string()));
        opt("--backend", self.backend.clone());
        opt("--vni", self.vni.map(|v| v.to_string()));
        opt("--port", self.port.map(|v| v.to_string()));
        if self.force {
            args.push("--force".to_owned());
        }
        args
    }
}

/// One entry of `weft leases --json`.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseRecord {
    /// `10.244.7.0/24`.
    pub subnet: String,
    /// The holder's underlay address.
    pub public_ip: String,
    /// `udp` or `vxlan`.
    pub backend_type: String,
    /// `{"VNI":1,"VtepMAC":"…"}` for vxlan; `Null` when absent.
    pub backend_data: Value,
    /// Seconds left; `None` for a reservation (no TTL).
    pub expires_in_secs: Option<u64>,
}

impl LeaseRecord {
    /// `backend_data.VtepMAC`, for vxlan leases.
    pub fn vtep_mac(&self) -> Option<&str> {
        self.backend_data.get("VtepMAC").and_then(Value::as_str)
    }
}

/// Parses the output of `weft leases --json`.
///
/// # Errors
///
/// Fails, showing the text, if it is not a JSON array of objects with `subnet` and `public_ip`.
pub fn parse_leases(text: &str) -> Result<Vec<LeaseRecord>> {
    let v: Value =
        serde_json::from_str(text).with_context(|| format!("`weft leases --json` printed non-JSON:\n{text}"))?;
    let arr = v.as_array().with_context(|| format!("`weft leases --json` is not an array: {v}"))?;
    arr.iter()
        .map(|e| {
            let s = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_owned);
            Ok(LeaseRecord {
                subnet: s("subnet").with_context(|| format!("lease without subnet: {e}"))?,
                public_ip: s("public_ip").with_context(|| format!("lease without public_ip: {e}"))?,
                backend_type: s("backend_type").unwrap_or_default(),
                backend_data: e.get("backend_data").cloned().unwrap_or(Value::Null),
                expires_in_secs: e.get("expires_in_secs").and_then(Value::as_u64),
            })
        })
        .collect()
}

/// The `lease` object of `weft status --json` in lease mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseStatus {
    /// The leased subnet.
    pub subnet: String,
    /// `held`, `acquiring`, `expired`, `lost`, `conflict`, `released`.
    pub phase: String,
    /// Seconds until the lease lapses unless renewed; `None` for a reservation.
    pub expires_in_secs: Option<u64>,
    /// `file` or `etcd`.
    pub store: String,
    /// Whether the last store operation succeeded.
    pub store_up: bool,
    /// Failed renewals in a row.
    pub renew_failures: u64,
}

/// Reads `status.mode` (`"lease"` or `"static"`).
pub fn status_mode(status: &Value) -> Option<&str> {
    json_path(status, "mode").and_then(Value::as_str)
}

/// Reads `status.lease`.
///
/// # Errors
///
/// Fails, showing the status, if there is no `lease` object with a `subnet` and a `phase`.
pub fn lease_status(status: &Value) -> Result<LeaseStatus> {
    let l = status.get("lease").filter(|l| l.is_object()).with_context(|| format!("status has no lease: {status}"))?;
    let s = |k: &str| l.get(k).and_then(Value::as_str).map(str::to_owned);
    Ok(LeaseStatus {
        subnet: s("subnet").with_context(|| format!("status.lease has no subnet: {l}"))?,
        phase: s("phase").with_context(|| format!("status.lease has no phase: {l}"))?,
        expires_in_secs: l.get("expires_in_secs").and_then(Value::as_u64),
        store: s("store").unwrap_or_default(),
        store_up: l.get("store_up").and_then(Value::as_bool).unwrap_or(false),
        renew_failures: l.get("renew_failures").and_then(Value::as_u64).unwrap_or(0),
    })
}

/// The `subnet` of every entry of `status.peers`, in the order listed.
pub fn peer_subnets(status: &Value) -> Vec<String> {
    status
        .get("peers")
        .and_then(Value::as_array)
        .map(|peers| peers.iter().filter_map(|p| p.get("subnet").and_then(Value::as_str).map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// The entry of `status.peers` whose `subnet` is `subnet` (lease-mode peers are named after
/// their subnet, `10.244.3.0-24`, so the subnet is the stable way to find one).
pub fn peer_by_subnet<'v>(status: &'v Value, subnet: &str) -> Option<&'v Value> {
    status.get("peers")?.as_array()?.iter().find(|p| p.get("subnet").and_then(Value::as_str) == Some(subnet))
}

/// Runs `weft <args>` in `ns` with a 15 s deadline; the output whatever the exit status.
///
/// # Errors
///
/// Fails if there is no weft binary or it cannot be started.
pub fn run_weft(ns: &Netns, args: &[&str]) -> Result<CmdOutput> {
    let bin = weft_bin()?;
    ns.exec_timeout(CLI_TIMEOUT, &bin.display().to_string(), args)
}

/// [`run_weft`] with owned arguments.
fn run_weft_owned(ns: &Netns, args: &[String]) -> Result<CmdOutput> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_weft(ns, &args)
}

/// `weft network init …` in `ns` against `store`; the output whatever the exit status (tests
/// of the refusals need it). Use [`CmdOutput::ok`] to require success.
///
/// # Errors
///
/// Fails only if weft cannot be started.
pub fn network_init(ns: &Netns, store: &StoreConfig, init: &NetworkInit) -> Result<CmdOutput> {
    run_weft_owned(ns, &init.cli_args(store))
}

/// `weft leases --json` in `ns` against `store`, parsed.
///
/// # Errors
///
/// Fails if the command fails or prints something else than the lease array.
pub fn leases(ns: &Netns, store: &StoreConfig) -> Result<Vec<LeaseRecord>> {
    let mut args = vec!["leases".to_owned()];
    args.extend(store.cli_args());
    args.push("--json".to_owned());
    parse_leases(&run_weft_owned(ns, &args)?.ok()?.stdout)
}

/// A pod's address from `weft ipam allocate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAddr {
    /// `10.244.7.2/24`.
    pub address: String,
    /// `10.244.7.1`.
    pub gateway: String,
}

impl PodAddr {
    /// The address without its prefix length.
    pub fn ip(&self) -> &str {
        self.address.split_once('/').map_or(self.address.as_str(), |(ip, _)| ip)
    }
}

/// One entry of `weft ipam list`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodEntry {
    /// The container id.
    pub container_id: String,
    /// The interface name in the container.
    pub ifname: String,
    /// Its address, as listed (`10.244.7.2` or `10.244.7.2/24`).
    pub address: String,
}

/// Parses `weft ipam allocate`'s answer.
///
/// # Errors
///
/// Fails, showing the text, if it is not an object with `address` and `gateway`.
pub fn parse_pod_addr(text: &str) -> Result<PodAddr> {
    let v: Value =
        serde_json::from_str(text).with_context(|| format!("`weft ipam allocate` printed non-JSON:\n{text}"))?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned).with_context(|| format!("no {k} in {v}"));
    Ok(PodAddr { address: s("address")?, gateway: s("gateway")? })
}

/// Parses `weft ipam list`'s answer.
///
/// # Errors
///
/// Fails, showing the text, if it is not an array of `{container_id, ifname, address}`.
pub fn parse_pod_list(text: &str) -> Result<Vec<PodEntry>> {
    let v: Value = serde_json::from_str(text).with_context(|| format!("`weft ipam list` printed non-JSON:\n{text}"))?;
    let arr = v.as_array().with_context(|| format!("`weft ipam list` is not an array: {v}"))?;
    arr.iter()
        .map(|e| {
            let s =
                |k: &str| e.get(k).and_then(Value::as_str).map(str::to_owned).with_context(|| format!("no {k} in {e}"));
            Ok(PodEntry { container_id: s("container_id")?, ifname: s("ifname")?, address: s("address")? })
        })
        .collect()
}

impl WeftNode<'_> {
    /// `status.lease` of a lease-mode daemon.
    ///
    /// # Errors
    ///
    /// Fails if status cannot be read or has no lease.
    pub fn lease_status(&self) -> Result<LeaseStatus> {
        lease_status(&self.status_json()?)
    }

    /// The subnet this daemon leased (`status.lease.subnet`).
    ///
    /// # Errors
    ///
    /// As [`WeftNode::lease_status`].
    pub fn leased_subnet(&self) -> Result<String> {
        Ok(self.lease_status()?.subnet)
    }

    /// The subnets of the daemon's current peers.
    ///
    /// # Errors
    ///
    /// Fails if status cannot be read.
    pub fn peer_subnets(&self) -> Result<Vec<String>> {
        Ok(peer_subnets(&self.status_json()?))
    }

    /// Polls status every `every` until `subnet` is among the peers (`present`) or no longer is
    /// (`!present`); returns the instant it was first seen so, or `None` after `timeout`.
    ///
    /// # Errors
    ///
    /// Fails if status cannot be read.
    pub fn wait_peer_subnet(
        &self,
        subnet: &str,
        present: bool,
        timeout: Duration,
        every: Duration,
    ) -> Result<Option<Instant>> {
        let deadline = Instant::now() + timeout;
        loop {
            let listed = self.peer_subnets()?.iter().any(|s| s == subnet);
            let now = Instant::now();
            if listed == present {
                return Ok(Some(now));
            }
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(every);
        }
    }

    /// The bytes of the node's `subnet_file`.
    ///
    /// # Errors
    ///
    /// Fails if the node is not in lease mode or the file cannot be read.
    pub fn subnet_env(&self) -> Result<Vec<u8>> {
        let lease = self.config().lease.as_ref().with_context(|| format!("{} is not in lease mode", self.name()))?;
        std::fs::read(&lease.subnet_file).with_context(|| format!("reading {}", lease.subnet_file.display()))
    }

    /// Runs `weft ipam <sub> --socket <ours> <args>` in the node's namespace; the output
    /// whatever the exit status.
    ///
    /// # Errors
    ///
    /// Fails only if weft cannot be started.
    pub fn ipam(&self, sub: &str, args: &[&str]) -> Result<CmdOutput> {
        let socket = self.socket().display().to_string();
        let mut full = vec!["ipam", sub, "--socket", &socket];
        full.extend_from_slice(args);
        run_weft(self.ns(), &full)
    }

    /// `weft ipam allocate --container-id <id> --ifname <ifname>`, parsed.
    ///
    /// # Errors
    ///
    /// Fails if the command fails or prints something unexpected.
    pub fn ipam_allocate(&self, container_id: &str, ifname: &str) -> Result<PodAddr> {
        parse_pod_addr(&self.ipam("allocate", &["--container-id", container_id, "--ifname", ifname])?.ok()?.stdout)
    }

    /// `weft ipam release --container-id <id> --ifname <ifname>`.
    ///
    /// # Errors
    ///
    /// Fails if the command fails.
    pub fn ipam_release(&self, container_id: &str, ifname: &str) -> Result<()> {
        self.ipam("release", &["--container-id", container_id, "--ifname", ifname])?.ok().map(|_| ())
    }

    /// `weft ipam list`, parsed and sorted.
    ///
    /// # Errors
    ///
    /// Fails if the command fails or prints something unexpected.
    pub fn ipam_list(&self) -> Result<Vec<PodEntry>> {
        let mut list = parse_pod_list(&self.ipam("list", &[])?.ok()?.stdout)?;
        list.sort();
        Ok(list)
    }

    /// `weft ipam gc --valid C1/eth0,C2/eth0`.
    ///
    /// # Errors
    ///
    /// Fails if the command fails.
    pub fn ipam_gc(&self, valid: &[(&str, &str)]) -> Result<CmdOutput> {
        let list: Vec<String> = valid.iter().map(|(c, i)| format!("{c}/{i}")).collect();
        self.ipam("gc", &["--valid", &list.join(",")])?.ok()
    }

    /// Makes every pod address record in the node's `pod_dir` look `age` old, so that GC's
    /// grace period (60 s: an ADD racing the runtime's list must not lose its address) has
    /// passed without waiting for it. The file store dates a record by its file's mtime
    /// (host-local's layout: one file per address, named after it).
    ///
    /// # Errors
    ///
    /// Fails if the node is not in lease mode or a record cannot be re-dated.
    pub fn age_pod_records(&self, age: Duration) -> Result<usize> {
        let lease = self.config().lease.as_ref().with_context(|| format!("{} is not in lease mode", self.name()))?;
        let then = std::time::SystemTime::now().checked_sub(age).context("age before the epoch")?;
        let mut n = 0;
        let dir = std::fs::read_dir(&lease.pod_dir).with_context(|| format!("reading {}", lease.pod_dir.display()))?;
        for entry in dir {
            let path = entry.with_context(|| format!("reading {}", lease.pod_dir.display()))?.path();
            let is_record =
                path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.parse::<std::net::Ipv4Addr>().is_ok());
            if is_record {
                let f = std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                f.set_modified(then).with_context(|| format!("re-dating {}", path.display()))?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn name(&self) -> &str {
        &self.config().node_name
    }
}

impl crate::weft::NodeConfig {
    /// Changes the lease settings with `f` (`|l| l.ttl_secs(20)`); a static-mode config is
    /// returned unchanged.
    pub fn with_lease(mut self, f: impl FnOnce(LeaseSettings) -> LeaseSettings) -> Self {
        self.lease = self.lease.map(f);
        self
    }
}

impl Topology {
    /// A file store in this test's scratch dir, `<dir>/store`, shared by its daemons.
    pub fn file_store(&self) -> StoreConfig {
        StoreConfig::file(self.dir().join("store"))
    }

    /// The lease-mode config for `n<i>` against `store`, state files in the scratch dir.
    pub fn lease_config(&self, i: u8, store: &StoreConfig) -> crate::weft::NodeConfig {
        crate::weft::NodeConfig::leased(i, LeaseSettings::for_node(store, self.dir(), &format!("n{i}")))
    }

    /// The namespace the topology's CLI commands run in: the first host's.
    fn cli_ns(&self) -> Result<&Netns> {
        self.hosts().first().map(crate::topology::Host::ns).context("topology has no host to run weft in")
    }

    /// `weft network init` against `store`, required to succeed; returns the config it printed
    /// (parsed when it is JSON, else as a string).
    ///
    /// # Errors
    ///
    /// Fails with weft's output if it exits non-zero.
    pub fn network_init(&self, store: &StoreConfig, init: &NetworkInit) -> Result<Value> {
        let out = network_init(self.cli_ns()?, store, init)?.ok()?;
        Ok(serde_json::from_str(&out.stdout).unwrap_or(Value::String(out.stdout)))
    }

    /// `weft leases --json` against `store`.
    ///
    /// # Errors
    ///
    /// As [`leases`].
    pub fn leases(&self, store: &StoreConfig) -> Result<Vec<LeaseRecord>> {
        leases(self.cli_ns()?, store)
    }

    /// Polls `weft leases --json` every 100 ms until `pred` holds; returns the last list read
    /// either way, so the caller can assert on it with a good message.
    ///
    /// # Errors
    ///
    /// Fails if the command fails on the first read; later failures (store restarting) are
    /// retried until `timeout`.
    pub fn wait_leases(
        &self,
        store: &StoreConfig,
        timeout: Duration,
        pred: impl Fn(&[LeaseRecord]) -> bool,
    ) -> Result<Vec<LeaseRecord>> {
        let mut last = self.leases(store);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if last.as_ref().is_ok_and(|l| pred(l)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            last = self.leases(store);
        }
        last
    }
}

/// Requires that `out` failed with exit code `code` and that its output mentions every one of
/// `needles`.
///
/// # Errors
///
/// Fails with the whole output otherwise.
pub fn expect_refusal(out: &CmdOutput, code: i32, needles: &[&str]) -> Result<()> {
    if out.status.code() != Some(code) {
        bail!("expected exit {code}\n{out}");
    }
    let all = out.combined();
    for n in needles {
        if !all.contains(n) {
            bail!("expected the output to mention {n:?}\n{out}");
        }
    }
    Ok(())
}

/// Whether an address (`10.244.7.5`, no prefix) is a usable pod address of `subnet`
/// (`10.244.7.0/24`): inside it, not the network address, not the gateway (first usable), not
/// the broadcast.
///
/// # Errors
///
/// Fails if either does not parse.
pub fn is_pod_address_of(ip: &str, subnet: &str) -> Result<bool> {
    let (base, len) = subnet.split_once('/').with_context(|| format!("{subnet:?} has no prefix length"))?;
    let base: std::net::Ipv4Addr = base.parse().with_context(|| format!("{subnet:?} is not IPv4"))?;
    let len: u32 = len.parse().with_context(|| format!("{subnet:?} has a bad prefix length"))?;
    if len > 30 {
        bail!("{subnet} leaves no room for pods");
    }
    let ip: std::net::Ipv4Addr = ip.parse().with_context(|| format!("{ip:?} is not IPv4"))?;
    let mask = u32::MAX << (32 - len);
    let (net, a) = (u32::from(base) & mask, u32::from(ip));
    let broadcast = net | !mask;
    Ok(a & mask == net && a != net && a != net + 1 && a != broadcast)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weft::NodeConfig;

    #[test]
    fn lease_mode_toml_has_no_static_keys() {
        let store = StoreConfig::file("/tmp/wt1-x/store");
        let lease = LeaseSettings::for_node(&store, Path::new("/tmp/wt1-x"), "n1").ttl_secs(20).release_on_exit();
        let cfg = NodeConfig { io: Some("mmsg".into()), ..NodeConfig::leased(1, lease) };
        let toml = cfg.to_toml(Path::new("/tmp/wt1-x/n1.sock"));
        let expected = r#"node_name = "n1"
public_ip = "198.18.0.1"
store = "file"
store_dir = "/tmp/wt1-x/store"
subnet_file = "/tmp/wt1-x/n1.subnet.env"
pod_dir = "/tmp/wt1-x/n1.pods"
lease_cache = "/tmp/wt1-x/n1.lease-cache.json"
lease_ttl_secs = 20
release_on_exit = true
tun_name = "weft0"
workers = 1
io = "mmsg"
api_socket = "/tmp/wt1-x/n1.sock"
"#;
        assert_eq!(toml, expected);
        assert!(cfg.gateway().is_err(), "lease mode has no configured gateway");
    }

    #[test]
    fn etcd_store_toml_and_flags() {
        let store = StoreConfig::Etcd {
            endpoints: vec!["http://198.18.0.100:2379".into(), "http://198.18.0.101:2379".into()],
            prefix: Some("/weft/test".into()),
        };
        let mut s = String::new();
        store.write_toml(&mut s);
        assert_eq!(
            s,
            "store = \"etcd\"\netcd_endpoints = [\"http://198.18.0.100:2379\", \"http://198.18.0.101:2379\"]\n\
             etcd_prefix = \"/weft/test\"\n"
        );
        assert_eq!(
            NetworkInit::vxlan().force().cli_args(&store),
            [
                "network",
                "init",
                "--store",
                "etcd",
                "--etcd-endpoints",
                "http://198.18.0.100:2379,http://198.18.0.101:2379",
                "--etcd-prefix",
                "/weft/test",
                "--backend",
                "vxlan",
                "--force"
            ]
        );
        assert_eq!(
            NetworkInit::udp().network("10.0.0.0/8", 24).cli_args(&StoreConfig::file("/s")),
            [
                "network",
                "init",
                "--store",
                "file",
                "--store-dir",
                "/s",
                "--network",
                "10.0.0.0/8",
                "--subnet-len",
                "24"
            ]
            .into_iter()
            .chain(["--backend", "udp"])
            .collect::<Vec<_>>()
        );
    }

    #[test]
    fn parses_leases_output() {
        let text = r#"[
          {"subnet":"10.244.7.0/24","public_ip":"198.18.0.1","backend_type":"vxlan",
           "backend_data":{"VNI":1,"VtepMAC":"02:77:00:00:00:01"},"expires_in_secs":86399},
          {"subnet":"10.244.9.0/24","public_ip":"198.18.0.2","backend_type":"udp","backend_data":null,
           "expires_in_secs":null}
        ]"#;
        let l = parse_leases(text).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].vtep_mac(), Some("02:77:00:00:00:01"));
        assert_eq!(l[0].expires_in_secs, Some(86399));
        assert_eq!(l[1].expires_in_secs, None);
        assert_eq!(l[1].vtep_mac(), None);
        assert!(parse_leases("{}").is_err());
        assert!(parse_leases(r#"[{"public_ip":"198.18.0.1"}]"#).is_err());
    }

    #[test]
    fn parses_lease_status_and_peers() {
        let status = serde_json::json!({
            "mode": "lease",
            "subnet": "10.244.7.0/24",
            "lease": {"subnet":"10.244.7.0/24","phase":"held","expires_in_secs":86390,"store":"file",
                      "store_up":true,"renew_failures":0},
            "peers": [{"name":"10.244.3.0-24","subnet":"10.244.3.0/24","endpoint":"198.18.0.2:8285"}],
        });
        assert_eq!(status_mode(&status), Some("lease"));
        let l = lease_status(&status).unwrap();
        assert_eq!((l.subnet.as_str(), l.phase.as_str(), l.store_up), ("10.244.7.0/24", "held", true));
        assert_eq!(peer_subnets(&status), ["10.244.3.0/24"]);
        assert!(peer_by_subnet(&status, "10.244.3.0/24").is_some());
        assert!(lease_status(&serde_json::json!({"mode": "static"})).is_err());
    }

    #[test]
    fn parses_ipam_output() {
        let a = parse_pod_addr(r#"{"address":"10.244.7.2/24","gateway":"10.244.7.1"}"#).unwrap();
        assert_eq!(a.ip(), "10.244.7.2");
        let l = parse_pod_list(r#"[{"container_id":"c1","ifname":"eth0","address":"10.244.7.2/24"}]"#).unwrap();
        assert_eq!(l[0].container_id, "c1");
        assert!(parse_pod_addr(r#"{"address":"10.244.7.2/24"}"#).is_err());
    }

    #[test]
    fn pod_address_rules() {
        let ok = |ip| is_pod_address_of(ip, "10.244.7.0/24").unwrap();
        assert!(ok("10.244.7.2") && ok("10.244.7.254"));
        assert!(!ok("10.244.7.0") && !ok("10.244.7.1") && !ok("10.244.7.255") && !ok("10.244.8.2"));
    }
}
