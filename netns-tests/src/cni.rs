//! A container runtime in miniature, for testing `weft-cni` the way kubelet and containerd use
//! it: libcni's conflist handling, driving the real plugin binaries through the CNI protocol
//! (environment variables and stdin in, JSON on stdout), plus the weft daemon, pod namespaces
//! and leak checks those tests need.
//!
//! What [`CniRuntime`] does as libcni does:
//! - each plugin of the conflist gets its own object with the list's `cniVersion` and `name`
//!   injected, `capabilities` removed, and `runtimeConfig` holding the capability arguments the
//!   plugin declared;
//! - ADD runs the plugins in order, each one's result becoming the next one's `prevResult`,
//!   and caches the final result; DEL runs them in reverse with that result as `prevResult`
//!   (from 0.4.0 on); CHECK runs them in order with it;
//! - GC sends the valid attachments under both `cni.dev/valid-attachments` and
//!   `cni.dev/attachments` (libcni ≥ 1.2.3, cni#1101); GC and STATUS only from 1.1.0;
//! - a plugin `type` with a path separator is refused before anything runs (CVE-2021-20206);
//! - `CNI_ARGS` carries what kubelet sends (`IgnoreUnknown=1;K8S_POD_NAMESPACE=…`).
//!
//! Plugins run inside the host's namespace (`ip netns exec`) with a clean environment, under a
//! deadline. A failing plugin is a [`PluginFailed`] error, whose CNI code tests can read back.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cmd::{self, Proc};
use crate::netns::{self, Netns};
use crate::topology::{Host, Topology};
use crate::weft::{NodeConfig, weft_bin};

/// How long one plugin invocation may take.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
pub const DEBIAN_PLUGIN_DIR: &str = "/usr/lib/cni";

/// The `PATH` plugins run with (portmap needs `iptables`).
const PLUGIN_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long [`CniHost`] waits for the daemon to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines of daemon log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// Finds `weft-cni`: `$WEFT_CNI_BIN`, else next to the `weft` binary the other tests use (so
/// both come from the same build).
///
/// # Errors
///
/// Fails with the places looked at if there is none.
pub fn cni_bin() -> Result<PathBuf> {
    if let Some(p) = crate::weft::bin_from_env("WEFT_CNI_BIN")? {
        return Ok(p);
    }
    let weft = weft_bin()?;
    let p = weft.with_file_name("weft-cni");
    if !p.is_file() {
        bail!("no {} next to {}; run `cargo build --release --bins` first", p.display(), weft.display());
    }
    Ok(p)
}

/// The `weft-cni` conflist in `examples/`, which chains Debian's portmap and bandwidth.
pub fn example_conflist_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cni/10-weft.conflist")
}

/// Whether Debian's reference plugins (and iptables, which portmap runs) are installed.
pub fn debian_plugins_missing() -> Option<String> {
    let missing: Vec<String> = ["portmap", "bandwidth"]
        .iter()
        .map(|p| Path::new(DEBIAN_PLUGIN_DIR).join(p))
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .chain(
            ["/usr/sbin/iptables", "/sbin/iptables"]
                .iter()
                .all(|p| !Path::new(p).exists())
                .then(|| "iptables".to_owned()),
        )
        .collect();
    (!missing.is_empty())
        .then(|| format!("missing {} (apt-get install containernetworking-plugins iptables)", missing.join(", ")))
}

/// A weft daemon for CNI tests: static mode, with its pod-address store (`pod_dir`) and its
/// pending-release directory (`pending_release_dir`, which [`CniRuntime::weft_only`] gives the
/// plugin too) in the test's scratch directory rather than /var/lib/weft, so every run starts
/// empty and a leak check can look at the files. Stopped on drop; its log tail is printed if
/// the test fails.
#[derive(Debug)]
pub struct CniHost<'t> {
    host: &'t Host,
    config: NodeConfig,
    bin: PathBuf,
    config_path: PathBuf,
    socket: PathBuf,
    pod_dir: PathBuf,
    pending_dir: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl<'t> CniHost<'t> {
    /// Starts `weft run` with `config` on the host of that name and waits until it answers.
    ///
    /// # Errors
    ///
    /// Fails if the host or the binary is missing, or the daemon does not come up.
    pub fn start(topo: &'t Topology, config: NodeConfig) -> Result<Self> {
        let host = topo.host(&config.node_name)?;
        let name = config.node_name.clone();
        let dir = topo.dir();
        let mut node = Self {
            host,
            config,
            bin: weft_bin()?,
            config_path: dir.join(format!("{name}.toml")),
            socket: dir.join(format!("{name}.sock")),
            pod_dir: dir.join(format!("{name}.pods")),
            pending_dir: dir.join(format!("{name}.pending")),
            log: dir.join(format!("{name}.log")),
            proc: None,
        };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> Result<()> {
        // Top-level keys may come anywhere before the first [[peers]] table.
        let toml = format!(
            "pod_dir = \"{}\"\npending_release_dir = \"{}\"\n{}",
            self.pod_dir.display(),
            self.pending_dir.display(),
            self.config.to_toml(&self.socket)
        );
        std::fs::write(&self.config_path, toml).with_context(|| format!("writing {}", self.config_path.display()))?;
        let config_arg = self.config_path.display().to_string();
        self.proc = Some(self.host.ns().spawn(&self.bin, &["run", "--config", &config_arg], &self.log)?);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(p) = self.proc.as_mut() {
                if let Some(status) = p.try_wait()? {
                    bail!("weft exited with {status} during start-up:\n{}", cmd::tail(&self.log, LOG_TAIL_LINES));
                }
            }
            if self.status_json().is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("weft did not answer within {READY_TIMEOUT:?}:\n{}", cmd::tail(&self.log, LOG_TAIL_LINES));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM and wait (up to 10 s) for the daemon to exit.
    ///
    /// # Errors
    ///
    /// Fails if it is not running or does not stop.
    pub fn stop(&mut self) -> Result<()> {
        let mut p = self.proc.take().context("weft is not running")?;
        let status = p.terminate(Duration::from_secs(10))?;
        if !status.success() {
            bail!("weft exited with {status}:\n{}", cmd::tail(&self.log, LOG_TAIL_LINES));
        }
        Ok(())
    }

    /// Starts the daemon again after [`CniHost::stop`], with the same config and store.
    ///
    /// # Errors
    ///
    /// As [`CniHost::start`].
    pub fn restart(&mut self) -> Result<()> {
        if self.proc.is_some() {
            bail!("weft is still running");
        }
        self.spawn()
    }

    /// The host namespace.
    pub fn ns(&self) -> &'t Netns {
        self.host.ns()
    }

    /// The host.
    pub fn host(&self) -> &'t Host {
        self.host
    }

    /// The daemon's API socket (the plugin's `socket`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's pod-address store.
    pub fn pod_dir(&self) -> &Path {
        &self.pod_dir
    }

    /// Where the plugin records releases while the daemon is down (the plugin's
    /// `pendingReleaseDir`).
    pub fn pending_dir(&self) -> &Path {
        &self.pending_dir
    }

    /// The names of the releases recorded in [`CniHost::pending_dir`], sorted.
    ///
    /// # Errors
    ///
    /// Fails if the directory exists but cannot be listed.
    pub fn pending_releases(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        if self.pending_dir.exists() {
            for e in std::fs::read_dir(&self.pending_dir)? {
                let name = e?.file_name().to_string_lossy().into_owned();
                if name != "lock" {
                    names.push(name);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// The node's config.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// `weft status --json`.
    ///
    /// # Errors
    ///
    /// Fails if the daemon does not answer.
    pub fn status_json(&self) -> Result<Value> {
        let socket = self.socket.display().to_string();
        let bin = self.bin.display().to_string();
        let out =
            self.ns().exec_timeout(Duration::from_secs(5), &bin, &["status", "--socket", &socket, "--json"])?.ok()?;
        serde_json::from_str(&out.stdout).context("weft status printed non-JSON")
    }

    /// Every allocation the daemon holds (`weft ipam list`).
    ///
    /// # Errors
    ///
    /// Fails if the daemon does not answer.
    pub fn allocations(&self) -> Result<Vec<Value>> {
        self.ipam(&["list"])?.as_array().cloned().context("weft ipam list did not print a list")
    }

    /// `weft ipam <args> --socket <socket>`, its JSON answer.
    ///
    /// # Errors
    ///
    /// Fails if the command fails.
    pub fn ipam(&self, args: &[&str]) -> Result<Value> {
        let socket = self.socket.display().to_string();
        let bin = self.bin.display().to_string();
        let mut full = vec!["ipam"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--socket", &socket]);
        let out = self.ns().exec_timeout(Duration::from_secs(5), &bin, &full)?.ok()?;
        serde_json::from_str(&out.stdout).with_context(|| format!("weft ipam printed non-JSON: {}", out.stdout))
    }

    /// The sum of `tx_packets` to every peer: what went into the overlay.
    ///
    /// # Errors
    ///
    /// Fails if status cannot be read.
    pub fn overlay_tx_packets(&self) -> Result<u64> {
        let s = self.status_json()?;
        let peers = s.get("peers").and_then(Value::as_array).context("status has no peers")?;
        Ok(peers.iter().filter_map(|p| p.get("tx_packets").and_then(Value::as_u64)).sum())
    }

    /// What CNI left on this host: weft veths, /32 pod routes, address records, allocations,
    /// pending releases.
    ///
    /// # Errors
    ///
    /// Fails if `ip` or the daemon cannot be asked.
    pub fn leftovers(&self) -> Result<Leftovers> {
        let links = self.ns().exec_ok("ip", &["-o", "link", "show"])?.stdout;
        let veths = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n))
            .filter(|n| n.len() == 15 && n.starts_with("weft"))
            .map(str::to_owned)
            .collect();
        let routes = self.ns().exec_ok("ip", &["-4", "route", "show"])?.stdout;
        let pod_routes = routes
            .lines()
            .filter(|l| l.starts_with("10.244.") && !l.split_whitespace().next().is_some_and(|d| d.contains('/')))
            .map(str::to_owned)
            .collect();
        let mut records = Vec::new();
        if self.pod_dir.exists() {
            for e in std::fs::read_dir(&self.pod_dir)? {
                let name = e?.file_name().to_string_lossy().into_owned();
                if name.parse::<std::net::Ipv4Addr>().is_ok() || name.contains(".tmp") {
                    records.push(name);
                }
            }
        }
        Ok(Leftovers {
            veths,
            pod_routes,
            records,
            allocations: self.allocations()?,
            pending: self.pending_releases()?,
        })
    }
}

impl Drop for CniHost<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- weft {} log tail ({}) ----\n{}",
                self.config.node_name,
                self.log.display(),
                cmd::tail(&self.log, LOG_TAIL_LINES)
            );
        }
        self.proc = None;
    }
}

/// What CNI left behind on a host ([`CniHost::leftovers`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Leftovers {
    /// Host-side weft veths (`weft` + 11 hex digits).
    pub veths: Vec<String>,
    /// Host routes into the cluster network without a prefix length (the /32s to pods).
    pub pod_routes: Vec<String>,
    /// Files in the daemon's pod store named after an address, or temporary ones.
    pub records: Vec<String>,
    /// The daemon's allocations.
    pub allocations: Vec<Value>,
    /// Releases recorded for the daemon and not carried out yet.
    pub pending: Vec<String>,
}

impl Leftovers {
    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.veths.is_empty()
            && self.pod_routes.is_empty()
            && self.records.is_empty()
            && self.allocations.is_empty()
            && self.pending.is_empty()
    }
}

/// A pod's network namespace, removed on drop (and with it the container end of its veth).
#[derive(Debug)]
pub struct Pod {
    ns: Netns,
    id: String,
}

impl Pod {
    /// Creates namespace `wt<pid>-<test>-<name>`; the container id is the namespace name.
    ///
    /// # Errors
    ///
    /// Fails if the namespace cannot be created.
    pub fn create(topo: &Topology, name: &str) -> Result<Self> {
        let ns_name = netns::ns_name(topo.test(), name);
        Ok(Self { ns: Netns::create(&ns_name)?, id: ns_name })
    }

    /// The namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// `CNI_NETNS`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(self.ns.name())
    }

    /// `CNI_CONTAINERID`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The attachment of this pod's `ifname`, with kubelet's `CNI_ARGS`.
    pub fn attachment(&self, ifname: &str) -> Attachment {
        Attachment {
            container_id: self.id.clone(),
            ifname: ifname.to_owned(),
            netns: Some(self.netns_path()),
            cni_args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                self.ns.name(),
                self.id
            ),
            capability_args: json!({}),
        }
    }

    /// The IPv4 addresses (with prefix length) on `ifname` in the pod.
    ///
    /// # Errors
    ///
    /// Fails if `ip` fails.
    pub fn addresses(&self, ifname: &str) -> Result<Vec<String>> {
        let out = self.ns.exec_ok("ip", &["-4", "-o", "addr", "show", "dev", ifname])?.stdout;
        Ok(out.lines().filter_map(|l| l.split_whitespace().nth(3)).map(str::to_owned).collect())
    }
}

/// One attachment as the runtime describes it to plugins.
#[derive(Clone, Debug, PartialEq)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_NETNS`; `None` for a DEL after the namespace is gone and forgotten.
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS`.
    pub cni_args: String,
    /// Capability arguments (`{"portMappings": […], "bandwidth": {…}}`), passed as
    /// `runtimeConfig` to plugins that declare the capability.
    pub capability_args: Value,
}

/// One plugin run: how it exited and what it printed.
#[derive(Clone, Debug)]
pub struct PluginRun {
    /// What ran, for messages.
    pub what: String,
    /// The exit code (`None` if killed by a signal).
    pub exit_code: Option<i32>,
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
}

impl PluginRun {
    /// stdout as JSON, if it is.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(self.stdout.trim()).ok()
    }

    /// The CNI error code printed, if the run failed with a well-formed CNI error.
    pub fn error_code(&self) -> Option<u64> {
        self.json().and_then(|v| v.get("code").and_then(Value::as_u64))
    }

    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

impl fmt::Display for PluginRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what, self.exit_code, self.stdout, self.stderr
        )
    }
}

/// A plugin failed; the error tests can `downcast_ref` to read the CNI code.
#[derive(Debug)]
pub struct PluginFailed(pub PluginRun);

impl fmt::Display for PluginFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "plugin failed: {}", self.0)
    }
}

impl std::error::Error for PluginFailed {}

/// The CNI error code carried by `e`, if a plugin failure caused it.
pub fn error_code(e: &anyhow::Error) -> Option<u64> {
    e.downcast_ref::<PluginFailed>().and_then(|f| f.0.error_code())
}

/// Runs `plugin` in the namespace named `host` with exactly `env` (plus `PATH`) and `stdin`, under
/// [`PLUGIN_TIMEOUT`].
///
/// # Errors
///
/// Fails only if it cannot be started; a non-zero exit is in the [`PluginRun`].
pub fn exec_plugin(host: &str, plugin: &Path, env: &[(&str, String)], stdin: &str) -> Result<PluginRun> {
    let secs = format!("{:.0}", PLUGIN_TIMEOUT.as_secs_f64());
    let mut c = Command::new("timeout");
    c.args(["-k", "2", &secs, "ip", "netns", "exec", host])
        .arg(plugin)
        .env_clear()
        .env("PATH", PLUGIN_PATH_ENV)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = env.iter().find(|(k, _)| *k == "CNI_COMMAND").map_or("?", |(_, v)| v.as_str());
    let what = format!("[{host}] CNI_COMMAND={command} {}", plugin.display());
    let mut child = c.spawn().with_context(|| format!("starting {what}"))?;
    if let Some(mut input) = child.stdin.take() {
        // A plugin that exits without reading stdin closes the pipe; its output tells why.
        let _ = input.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().with_context(|| format!("waiting for {what}"))?;
    Ok(PluginRun {
        what,
        exit_code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A runtime holding one network (a conflist), running its plugins in one host namespace.
#[derive(Debug)]
pub struct CniRuntime {
    host: String,
    cni_path: Vec<PathBuf>,
    conflist: Value,
    results: Mutex<HashMap<(String, String), Value>>,
}

impl CniRuntime {
    /// A runtime for `conflist` whose plugins are looked up in `cni_path`, run in the
    /// namespace named `host`.
    ///
    /// # Errors
    ///
    /// Fails if the conflist lacks `cniVersion`, `name` or `plugins`, or a `type` is a path
    /// (libcni refuses those: CVE-2021-20206).
    pub fn new(host: &str, cni_path: Vec<PathBuf>, conflist: Value) -> Result<Self> {
        for key in ["cniVersion", "name"] {
            conflist.get(key).and_then(Value::as_str).with_context(|| format!("conflist has no {key}"))?;
        }
        let plugins = conflist.get("plugins").and_then(Value::as_array).context("conflist has no plugins")?;
        for p in plugins {
            let t = p.get("type").and_then(Value::as_str).context("plugin without type")?;
            if t.contains('/') || t.is_empty() {
                bail!("plugin type {t:?} is a path");
            }
        }
        Ok(Self { host: host.to_owned(), cni_path, conflist, results: Mutex::new(HashMap::new()) })
    }

    /// A runtime for a single-plugin `weft-cni` network speaking `version`, whose plugin dir is
    /// a scratch directory holding a link to the built plugin.
    ///
    /// # Errors
    ///
    /// Fails if the plugin is not built or the link cannot be made.
    pub fn weft_only(host: &CniHost<'_>, dir: &Path, version: &str) -> Result<Self> {
        let conflist = json!({
            "cniVersion": version,
            "name": "weft",
            "plugins": [{"type": "weft-cni", "socket": host.socket(), "pendingReleaseDir": host.pending_dir()}],
        });
        Self::new(host.ns().name(), plugin_dir(dir)?, conflist)
    }

    /// The list's `cniVersion`.
    pub fn version(&self) -> &str {
        self.conflist.get("cniVersion").and_then(Value::as_str).unwrap_or_default()
    }

    /// The list's `name`.
    pub fn name(&self) -> &str {
        self.conflist.get("name").and_then(Value::as_str).unwrap_or_default()
    }

    fn plugins(&self) -> &[Value] {
        self.conflist.get("plugins").and_then(Value::as_array).map_or(&[], Vec::as_slice)
    }

    fn at_least(&self, version: &str) -> bool {
        let parse = |v: &str| v.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
        parse(self.version()) >= parse(version)
    }

    /// Finds a plugin binary by type in the CNI path.
    fn find(&self, plugin_type: &str) -> Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.is_file())
            .with_context(|| format!("no plugin {plugin_type:?} in {:?}", self.cni_path))
    }

    /// The stdin for plugin `i`: its object with `cniVersion` and `name` injected,
    /// `capabilities` replaced by `runtimeConfig`, and `prevResult` if given.
    pub fn plugin_config(&self, i: usize, att: Option<&Attachment>, prev: Option<&Value>) -> Result<Value> {
        let mut conf = self.plugins().get(i).cloned().with_context(|| format!("no plugin {i}"))?;
        let obj = conf.as_object_mut().context("plugin entry is not an object")?;
        obj.insert("cniVersion".into(), self.version().into());
        obj.insert("name".into(), self.name().into());
        let caps = obj.remove("capabilities");
        if let (Some(Value::Object(caps)), Some(att)) = (caps, att) {
            let mut rc = serde_json::Map::new();
            for (k, on) in caps {
                if on == Value::Bool(true) {
                    if let Some(v) = att.capability_args.get(&k) {
                        rc.insert(k, v.clone());
                    }
                }
            }
            if !rc.is_empty() {
                obj.insert("runtimeConfig".into(), Value::Object(rc));
            }
        }
        if let Some(prev) = prev {
            obj.insert("prevResult".into(), prev.clone());
        }
        Ok(conf)
    }

    fn env(&self, command: &str, att: Option<&Attachment>) -> Vec<(&'static str, String)> {
        let path = self.cni_path.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
        let mut env = vec![("CNI_COMMAND", command.to_owned()), ("CNI_PATH", path)];
        if let Some(a) = att {
            env.push(("CNI_CONTAINERID", a.container_id.clone()));
            env.push(("CNI_IFNAME", a.ifname.clone()));
            env.push(("CNI_ARGS", a.cni_args.clone()));
            if let Some(ns) = &a.netns {
                env.push(("CNI_NETNS", ns.display().to_string()));
            }
        }
        env
    }

    /// Runs plugin `i` once, exactly as given: for tests that need the raw outcome.
    ///
    /// # Errors
    ///
    /// Fails only if the plugin cannot be found or started.
    pub fn invoke(&self, i: usize, command: &str, att: Option<&Attachment>, prev: Option<&Value>) -> Result<PluginRun> {
        let conf = self.plugin_config(i, att, prev)?;
        self.invoke_raw(i, &self.env(command, att), &conf.to_string())
    }

    /// Runs plugin `i` with exactly `env` and `stdin`.
    ///
    /// # Errors
    ///
    /// Fails only if the plugin cannot be found or started.
    pub fn invoke_raw(&self, i: usize, env: &[(&str, String)], stdin: &str) -> Result<PluginRun> {
        let t = self.plugins().get(i).and_then(|p| p.get("type")).and_then(Value::as_str).context("no such plugin")?;
        exec_plugin(&self.host, &self.find(t)?, env, stdin)
    }

    fn run_ok(&self, i: usize, command: &str, att: Option<&Attachment>, prev: Option<&Value>) -> Result<PluginRun> {
        let run = self.invoke(i, command, att, prev)?;
        if !run.success() {
            return Err(PluginFailed(run).into());
        }
        Ok(run)
    }

    fn key(att: &Attachment) -> (String, String) {
        (att.container_id.clone(), att.ifname.clone())
    }

    /// ADD through the whole list; returns (and caches) the final result.
    ///
    /// # Errors
    ///
    /// [`PluginFailed`] from the first plugin that fails (the caller, as a runtime must, calls
    /// DEL afterwards), or a plugin that prints no JSON.
    pub fn add(&self, att: &Attachment) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for i in 0..self.plugins().len() {
            let run = self.run_ok(i, "ADD", Some(att), prev.as_ref())?;
            let result = run.json().with_context(|| format!("ADD printed no JSON result: {run}"))?;
            prev = Some(result);
        }
        let result = prev.context("the conflist has no plugins")?;
        self.results
            .lock()
            .map_err(|_| anyhow::anyhow!("result cache poisoned"))?
            .insert(Self::key(att), result.clone());
        Ok(result)
    }

    /// The cached result of the attachment's last ADD.
    pub fn cached(&self, att: &Attachment) -> Option<Value> {
        self.results.lock().ok().and_then(|m| m.get(&Self::key(att)).cloned())
    }

    /// DEL through the list in reverse, with the cached result as `prevResult` (0.4.0 on);
    /// forgets the result when every plugin succeeded.
    ///
    /// # Errors
    ///
    /// [`PluginFailed`] from the first plugin that fails.
    pub fn del(&self, att: &Attachment) -> Result<()> {
        let prev = if self.at_least("0.4.0") { self.cached(att) } else { None };
        for i in (0..self.plugins().len()).rev() {
            self.run_ok(i, "DEL", Some(att), prev.as_ref())?;
        }
        if let Ok(mut m) = self.results.lock() {
            m.remove(&Self::key(att));
        }
        Ok(())
    }

    /// CHECK through the list with the cached result.
    ///
    /// # Errors
    ///
    /// Fails if there is no cached result, or with [`PluginFailed`].
    pub fn check(&self, att: &Attachment) -> Result<()> {
        let prev = self.cached(att).context("CHECK: no cached result for this attachment")?;
        self.check_with(att, &prev)
    }

    /// CHECK through the list with `prev` as the result to verify.
    ///
    /// # Errors
    ///
    /// [`PluginFailed`].
    pub fn check_with(&self, att: &Attachment, prev: &Value) -> Result<()> {
        for i in 0..self.plugins().len() {
            self.run_ok(i, "CHECK", Some(att), Some(prev))?;
        }
        Ok(())
    }

    /// GC with `valid` (container id, ifname) attachments, under both keys.
    ///
    /// # Errors
    ///
    /// [`PluginFailed`], or a list older than 1.1.0.
    pub fn gc(&self, valid: &[(&str, &str)]) -> Result<()> {
        let list: Vec<Value> = valid.iter().map(|(c, i)| json!({"containerID": c, "ifname": i})).collect();
        self.gc_with(&list, &list)
    }

    /// GC with separate lists under `cni.dev/valid-attachments` and `cni.dev/attachments`.
    ///
    /// # Errors
    ///
    /// [`PluginFailed`], or a list older than 1.1.0.
    pub fn gc_with(&self, valid_attachments: &[Value], attachments: &[Value]) -> Result<()> {
        if !self.at_least("1.1.0") {
            bail!("GC needs cniVersion 1.1.0, the list is {}", self.version());
        }
        for i in 0..self.plugins().len() {
            let mut conf = self.plugin_config(i, None, None)?;
            if let Some(o) = conf.as_object_mut() {
                o.insert("cni.dev/valid-attachments".into(), Value::Array(valid_attachments.to_vec()));
                o.insert("cni.dev/attachments".into(), Value::Array(attachments.to_vec()));
            }
            let run = self.invoke_raw(i, &self.env("GC", None), &conf.to_string())?;
            if !run.success() {
                return Err(PluginFailed(run).into());
            }
        }
        Ok(())
    }

    /// STATUS of every plugin.
    ///
    /// # Errors
    ///
    /// [`PluginFailed`], or a list older than 1.1.0.
    pub fn status(&self) -> Result<()> {
        if !self.at_least("1.1.0") {
            bail!("STATUS needs cniVersion 1.1.0, the list is {}", self.version());
        }
        for i in 0..self.plugins().len() {
            self.run_ok(i, "STATUS", None, None)?;
        }
        Ok(())
    }

    /// VERSION of plugin `i`, with libcni's placeholder environment.
    ///
    /// # Errors
    ///
    /// [`PluginFailed`], or an answer that is not JSON.
    pub fn version_info(&self, i: usize) -> Result<Value> {
        let env = [
            ("CNI_COMMAND", "VERSION".to_owned()),
            ("CNI_NETNS", "dummy".to_owned()),
            ("CNI_IFNAME", "dummy".to_owned()),
            ("CNI_PATH", "dummy".to_owned()),
        ];
        let run = self.invoke_raw(i, &env, &json!({"cniVersion": self.version()}).to_string())?;
        if !run.success() {
            return Err(PluginFailed(run).into());
        }
        run.json().with_context(|| format!("VERSION printed no JSON: {run}"))
    }
}

/// A plugin directory in `dir` holding a link to the built `weft-cni`, followed by Debian's
/// plugin directory: the `CNI_PATH` the tests use.
///
/// # Errors
///
/// Fails if the plugin is not built or the link cannot be made.
pub fn plugin_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let bin = dir.join("cni-bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let link = bin.join("weft-cni");
    if !link.exists() {
        std::os::unix::fs::symlink(cni_bin()?, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(vec![bin, PathBuf::from(DEBIAN_PLUGIN_DIR)])
}

/// The container interface's address (`ips[]` entry pointing at a sandboxed interface) in a
/// result, without its prefix length.
pub fn pod_ip(result: &Value) -> Option<String> {
    let ifaces = result.get("interfaces")?.as_array()?;
    result.get("ips")?.as_array()?.iter().find_map(|ip| {
        let i = usize::try_from(ip.get("interface")?.as_u64()?).ok()?;
        ifaces.get(i)?.get("sandbox")?.as_str().filter(|s| !s.is_empty())?;
        Some(ip.get("address")?.as_str()?.split('/').next()?.to_owned())
    })
}

/// The host-side interface (no sandbox) named in a result whose name starts with `weft`.
pub fn host_veth(result: &Value) -> Option<String> {
    result.get("interfaces")?.as_array()?.iter().find_map(|i| {
        let name = i.get("name")?.as_str()?;
        (i.get("sandbox").is_none_or(|s| s.as_str() == Some("")) && name.starts_with("weft")).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_yield_pod_ip_and_host_veth() {
        let r = json!({
            "interfaces": [{"name": "weftabcdef01234"}, {"name": "eth0", "sandbox": "/run/netns/x"}, {"name": "bwp1"}],
            "ips": [{"interface": 1, "address": "10.244.1.5/32", "gateway": "10.244.1.1"}],
        });
        assert_eq!(pod_ip(&r).as_deref(), Some("10.244.1.5"));
        assert_eq!(host_veth(&r).as_deref(), Some("weftabcdef01234"));
        assert_eq!(pod_ip(&json!({"ips": []})), None);
    }

    #[test]
    fn plugin_configs_are_built_like_libcni() {
        let rt = CniRuntime::new(
            "unused",
            vec![],
            json!({"cniVersion": "1.0.0", "name": "net", "plugins": [
                {"type": "weft-cni", "socket": "/s"},
                {"type": "portmap", "capabilities": {"portMappings": true, "other": false}, "snat": true},
            ]}),
        )
        .unwrap();
        let att = Attachment {
            container_id: "c".into(),
            ifname: "eth0".into(),
            netns: None,
            cni_args: String::new(),
            capability_args: json!({"portMappings": [{"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}], "other": 1}),
        };
        let prev = json!({"cniVersion": "1.0.0"});
        let c = rt.plugin_config(1, Some(&att), Some(&prev)).unwrap();
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["name"], "net");
        assert!(c.get("capabilities").is_none());
        assert_eq!(c["runtimeConfig"]["portMappings"][0]["hostPort"], 80);
        assert!(c["runtimeConfig"].get("other").is_none());
        assert_eq!(c["prevResult"], prev);
        let c = rt.plugin_config(0, Some(&att), None).unwrap();
        assert!(c.get("runtimeConfig").is_none() && c.get("prevResult").is_none());
        assert!(
            CniRuntime::new(
                "unused",
                vec![],
                json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../x"}]})
            )
            .is_err()
        );
    }
}
