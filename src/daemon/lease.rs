//! Lease mode: the node leases its subnet from the store (flannel's algorithm, in
//! `weft_ipam::LeaseKeeper`) and learns its peers from everyone else's leases.
//!
//! 1. [`prepare`]: open the store, read the lease cache. With a usable cache the data plane
//!    comes up at once from it (our subnet, the network config, the peers' leases), before the
//!    store answers: a node restarted during a store outage keeps forwarding. Without one, wait
//!    for the network config, install the fail-closed route as soon as the network is known,
//!    and acquire the lease first, as flannel does.
//! 2. [`run`], once the data plane is up: confirm the cached state against the store (a changed
//!    network config or a moved subnet stops the daemon with an error so that it restarts
//!    cleanly), then keep renewing, follow the store's watch, rebuild the route table on every
//!    change and keep the cache current. The data plane never waits on the store: while it is
//!    unreachable, the last table stays in force and the keeper retries with backoff.
//!
//! Every lease record goes through [`super::peers::LeasePeers`] before it becomes a route.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use ipnet::{IpNet, Ipv4Net};
use tokio::sync::oneshot;
use tracing::{error, info, warn};
use weft_forwarder::wire::ethernet::MacAddr;
use weft_forwarder::wireguard::PublicKey;
use weft_ipam::{
    AnyStore, FileStore, KeeperConfig, KeeperEvent, KeeperPhase, LeaseAction, LeaseAttrs, LeaseCache, LeaseKeeper,
    LeaseSnapshot, LeaseStore, NetworkConfig, StoreError, SubnetEnv, SubnetLease, lease_loop,
};

use super::DaemonError;
use super::control::{ApplyError, Peering};
use super::netlink::Netlink;
use super::peers::{LeasePeers, PeerRules, RefusedLease};
use crate::config::{Config, ConfigError, LeaseSettings, RawConfig, StoreSettings};

/// Least time between two writes of the lease cache (a burst of store events is written once).
const CACHE_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Opens the store `s` names. An etcd store connects lazily: this succeeds while etcd is down.
///
/// # Errors
/// The file store's directory cannot be created or opened.
pub async fn open_store(s: &StoreSettings) -> Result<AnyStore, StoreError> {
    match s {
        StoreSettings::File { dir } => Ok(AnyStore::File(FileStore::open(dir.clone())?)),
        StoreSettings::Etcd { endpoints, prefix, tls, credentials } => {
            let mut o = weft_ipam::EtcdOptions::new(endpoints.clone());
            o.prefix.clone_from(prefix);
            o.tls = tls.clone();
            o.credentials.clone_from(credentials);
            Ok(AnyStore::Etcd(weft_ipam::EtcdStore::connect(o).await?))
        }
    }
}

/// Names the store a lease cache belongs to: a cache written against another store (another
/// directory, other endpoints or prefix) is never used.
pub fn store_identity(s: &StoreSettings) -> String {
    match s {
        StoreSettings::File { dir } => format!("file:{}", dir.display()),
        StoreSettings::Etcd { endpoints, prefix, .. } => format!("etcd:{}|{prefix}", endpoints.join(",")),
    }
}

/// A random seed from the OS (std's hasher keys are random per process).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    h.finish()
}

/// The attributes we publish: our PublicIP and flannel's `BackendData`: VNI and VtepMAC for
/// VXLAN, the `PublicKey` for WireGuard (as flannel's wireguard backend).
pub fn attrs(
    public_ip: Ipv4Addr,
    network: &NetworkConfig,
    vtep_mac: Option<MacAddr>,
    public_key: Option<PublicKey>,
) -> LeaseAttrs {
    let mut a = LeaseAttrs::new(public_ip, network.backend.kind.as_str());
    if let Some(mac) = vtep_mac {
        a.backend_data = serde_json::json!({ "VNI": network.backend.vni(), "VtepMAC": mac.to_string() });
    }
    if let Some(k) = public_key {
        a.backend_data = serde_json::json!({ "PublicKey": k.to_string() });
    }
    a
}

/// Our WireGuard public key when the network's backend is `wireguard`: the node key is loaded
/// (or created) here, before the lease that publishes it.
///
/// # Errors
/// The key file cannot be used.
pub fn wireguard_public_key(raw: &RawConfig, n: &NetworkConfig) -> Result<Option<PublicKey>, DaemonError> {
    if n.backend.kind != weft_ipam::BackendKind::WireGuard {
        return Ok(None);
    }
    let path = crate::config::wireguard_key_file(
        raw.wireguard_key_file.as_deref(),
        raw.node_name.as_deref().unwrap_or("node"),
    );
    let key = super::wireguard::load_or_create_key(&path)
        .map_err(|e| ConfigError::Invalid { field: "wireguard_key_file".into(), message: e.to_string() })?;
    Ok(Some(key.public_key()))
}

/// How lease mode starts its data plane.
pub enum Start {
    /// The lease is held already (no usable cache: acquired before the data plane came up).
    Held {
        /// The keeper, holding our lease.
        keeper: LeaseKeeper,
        /// Our lease.
        lease: SubnetLease,
    },
    /// From the lease cache; [`run`] acquires the lease and confirms it.
    Cached {
        /// The keeper, not yet holding anything.
        keeper: LeaseKeeper,
        /// What the cache held.
        cache: LeaseCache,
    },
}

/// Lease mode, ready for the data plane: the completed configuration and how it was obtained.
pub struct Prepared {
    /// The configuration, completed with the network config and our subnet.
    pub cfg: Config,
    /// The network config the data plane runs with.
    pub network: NetworkConfig,
    /// The store.
    pub store: AnyStore,
    /// The lease settings.
    pub settings: LeaseSettings,
    /// Held, or from the cache.
    pub start: Start,
    /// What happened to the cache, for `weft status` (`loaded`, `none`, or why it was ignored).
    pub cache_note: String,
}

fn lease_public_ip(raw: &RawConfig) -> Result<Ipv4Addr, DaemonError> {
    match raw.public_ip.as_deref().map(str::parse::<std::net::IpAddr>) {
        Some(Ok(std::net::IpAddr::V4(ip))) => Ok(ip),
        _ => Err(ConfigError::Invalid {
            field: "public_ip".into(),
            message: "lease mode needs an IPv4 public_ip (flannel's lease record holds one)".into(),
        }
        .into()),
    }
}

fn vtep_mac(raw: &RawConfig, n: &NetworkConfig) -> Option<MacAddr> {
    match n.backend.kind {
        weft_ipam::BackendKind::Vxlan => Some(match raw.vtep_mac.as_deref().map(str::parse::<MacAddr>) {
            Some(Ok(m)) => m,
            _ => crate::config::derived_vtep_mac(raw.node_name.as_deref().unwrap_or_default()),
        }),
        _ => None,
    }
}

fn resolve(raw: &RawConfig, n: &NetworkConfig, subnet: Ipv4Net) -> Result<Config, ConfigError> {
    crate::config::resolve_leased(raw, n, subnet)
}

fn keeper_for(
    settings: &LeaseSettings,
    raw: &RawConfig,
    public_ip: Ipv4Addr,
    n: &NetworkConfig,
    previous: Option<Ipv4Net>,
) -> Result<LeaseKeeper, DaemonError> {
    let mut kc =
        KeeperConfig::new(n.subnet_range(), attrs(public_ip, n, vtep_mac(raw, n), wireguard_public_key(raw, n)?));
    kc.previous_subnet = previous.or_else(|| SubnetEnv::read_previous_subnet(&settings.subnet_file));
    kc.ttl = settings.ttl;
    kc.renew_margin = KeeperConfig::DEFAULT_RENEW_MARGIN.min(settings.ttl / 2);
    kc.seed = random_seed();
    Ok(LeaseKeeper::new(kc))
}

/// Reads the lease cache and decides whether it may bring the data plane up.
fn usable_cache(settings: &LeaseSettings, public_ip: Ipv4Addr) -> (Option<LeaseCache>, String) {
    let path = &settings.lease_cache;
    match LeaseCache::read(path) {
        Ok(None) => (None, "none".into()),
        Ok(Some(c)) if c.store != store_identity(&settings.store) => {
            let note = format!("ignored: written for store {:?}", c.store);
            warn!(path = %path.display(), store = %c.store, "lease cache belongs to another store; ignored");
            (None, note)
        }
        Ok(Some(c)) if c.lease.attrs.public_ip != public_ip => {
            let note = format!("ignored: written for public_ip {}", c.lease.attrs.public_ip);
            warn!(path = %path.display(), public_ip = %c.lease.attrs.public_ip, "lease cache belongs to another address; ignored");
            (None, note)
        }
        Ok(Some(c)) => (Some(c), "loaded".into()),
        Err(e) => {
            warn!(error = %e, "lease cache unusable; waiting for the store");
            (None, format!("ignored: {e}"))
        }
    }
}

/// Opens the store and either takes the data plane's settings from the lease cache, or waits
/// for the store, installs the fail-closed route for the network and acquires a lease.
///
/// # Errors
/// A configuration error, [`DaemonError::Store`] when the network config is missing or
/// invalid (not worth retrying), [`DaemonError::Stopped`] when `stop` fires first.
pub async fn prepare(
    raw: &RawConfig,
    settings: LeaseSettings,
    nl: &Netlink,
    stop: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> Result<Prepared, DaemonError> {
    let public_ip = lease_public_ip(raw)?;
    let store = open_store(&settings.store).await?;
    let (cache, cache_note) = usable_cache(&settings, public_ip);
    if let Some(cache) = cache {
        let cfg = resolve(raw, &cache.network, cache.lease.subnet)?;
        nl.add_fail_closed(IpNet::V4(cache.network.network)).await?;
        info!(subnet = %cache.lease.subnet, network = %cache.network.network, peers = cache.peers.len(),
            path = %settings.lease_cache.display(), "lease cache loaded; data plane comes up before the store answers");
        let keeper = keeper_for(&settings, raw, public_ip, &cache.network, Some(cache.lease.subnet))?;
        let network = cache.network.clone();
        return Ok(Prepared { cfg, network, store, settings, start: Start::Cached { keeper, cache }, cache_note });
    }
    let network = network_config(&store, stop).await?;
    // The network is known: from here on, pod traffic for it never leaves unencapsulated.
    nl.add_fail_closed(IpNet::V4(network.network)).await?;
    let mut keeper = keeper_for(&settings, raw, public_ip, &network, None)?;
    let lease = acquire(&mut keeper, &store, settings.ttl, stop).await?;
    let cfg = resolve(raw, &network, lease.subnet)?;
    Ok(Prepared { cfg, network, store, settings, start: Start::Held { keeper, lease }, cache_note })
}

/// Reads the network config, retrying while the store is unreachable.
async fn network_config(
    store: &AnyStore,
    stop: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> Result<NetworkConfig, DaemonError> {
    let mut warned = false;
    loop {
        match store.get_config().await {
            Ok(n) => return Ok(n),
            Err(e) if e.is_transient() => {
                if !warned {
                    warn!(error = %e, "store unreachable; waiting for the network config");
                    warned = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = &mut *stop => return Err(DaemonError::Stopped),
                }
            }
            Err(e) => return Err(DaemonError::Store(e)),
        }
    }
}

/// Runs the keeper until it holds a lease.
///
/// # Errors
/// [`DaemonError::Stopped`] when `stop` fires first.
async fn acquire(
    keeper: &mut LeaseKeeper,
    store: &AnyStore,
    ttl: Duration,
    stop: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> Result<SubnetLease, DaemonError> {
    let mut warned = false;
    loop {
        let now = SystemTime::now();
        match keeper.poll(now) {
            LeaseAction::WaitUntil(t) => {
                let wait = t.duration_since(now).unwrap_or_default().min(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut *stop => return Err(DaemonError::Stopped),
                }
            }
            action => tokio::select! {
                _ = lease_loop::execute(keeper, store, action, SystemTime::now) => {}
                _ = &mut *stop => return Err(DaemonError::Stopped),
            },
        }
        while let Some(ev) = keeper.poll_event() {
            match ev {
                KeeperEvent::Acquired { lease, source } => {
                    info!(subnet = %lease.subnet, public_ip = %lease.attrs.public_ip, source = ?source,
                        ttl_secs = ttl.as_secs(), "lease acquired");
                    return Ok(lease);
                }
                other => log_event(&other),
            }
        }
        if let Some(err) = keeper.status(SystemTime::now()).last_error {
            if !warned {
                warn!(error = %err, "lease store unreachable; retrying with backoff");
                warned = true;
            }
        }
    }
}

fn log_event(ev: &KeeperEvent) {
    match ev {
        KeeperEvent::Acquired { lease, .. } => info!(subnet = %lease.subnet, "lease renewed or re-created"),
        KeeperEvent::Lost { subnet } => warn!(subnet = %subnet, "our lease vanished from the store; re-creating it"),
        KeeperEvent::Conflict { subnet, holder } => error!(subnet = %subnet, holder = ?holder,
            "another node holds our subnet; not ready (existing pods keep working): an operator must decide"),
        KeeperEvent::PreviousSubnetTaken { subnet, holder } => {
            warn!(subnet = %subnet, holder = ?holder, "subnet from subnet.env is taken; picking another")
        }
        KeeperEvent::Expired { subnet } => warn!(subnet = %subnet, "lease expired without renewal (store unreachable)"),
        KeeperEvent::NoFreeSubnet => error!("no free subnet left in the network; retrying"),
    }
}

/// The lease side as `weft status` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LeaseView {
    /// Our subnet.
    pub subnet: String,
    /// `acquiring`, `held`, `expired`, `lost`, `conflict` or `released`.
    pub phase: String,
    /// Seconds until our lease expires without renewal.
    pub expires_in_secs: Option<u64>,
    /// `file` or `etcd`.
    pub store: String,
    /// Whether the last store operation succeeded.
    pub store_up: bool,
    /// Store failures in a row.
    pub renew_failures: u32,
    /// The last store error.
    pub last_error: Option<String>,
    /// Whether pod addresses may be handed out (lease held and not expired).
    pub ready: bool,
    /// Leases currently known from the store (ours included).
    pub known_leases: usize,
    /// Times the watch lost track and re-listed.
    pub resyncs: u64,
    /// The data plane runs from the lease cache and the store has not confirmed it yet.
    #[serde(default)]
    pub provisional: bool,
    /// What happened to the lease cache at start: `loaded`, `none`, or why it was ignored.
    #[serde(default)]
    pub cache: String,
    /// Lease records refused right now, with why (see [`super::peers`]).
    #[serde(default)]
    pub refused_leases: Vec<RefusedLease>,
    /// Lease records refused since start, by reason.
    #[serde(default)]
    pub refused_total: std::collections::BTreeMap<String, u64>,
    /// Records in the store that do not parse, at the last list.
    #[serde(default)]
    pub unreadable_leases: usize,
    /// Route tables refused (too many peers, say): the last good table stayed in force.
    #[serde(default)]
    pub table_refusals: u64,
    /// Why the last route table was refused.
    #[serde(default)]
    pub last_table_error: Option<String>,
}

impl LeaseView {
    /// The view before the lease task has run.
    pub fn new(subnet: Ipv4Net, store: &str, provisional: bool, cache: String) -> Self {
        Self {
            subnet: subnet.to_string(),
            phase: if provisional { "acquiring" } else { "held" }.into(),
            expires_in_secs: None,
            store: store.into(),
            store_up: !provisional,
            renew_failures: 0,
            last_error: None,
            ready: !provisional,
            known_leases: 0,
            resyncs: 0,
            provisional,
            cache,
            refused_leases: Vec::new(),
            refused_total: std::collections::BTreeMap::new(),
            unreadable_leases: 0,
            table_refusals: 0,
            last_table_error: None,
        }
    }

    fn update(&mut self, keeper: &LeaseKeeper, now: SystemTime) {
        let st = keeper.status(now);
        self.phase = match st.phase {
            KeeperPhase::Acquiring => "acquiring",
            KeeperPhase::Held => "held",
            KeeperPhase::Expired => "expired",
            KeeperPhase::Lost => "lost",
            KeeperPhase::Conflict => "conflict",
            KeeperPhase::Released => "released",
        }
        .into();
        self.expires_in_secs = st.expiration.map(|t| t.duration_since(now).map_or(0, |d| d.as_secs()));
        self.store_up = st.failures == 0 && !matches!(st.phase, KeeperPhase::Acquiring);
        self.renew_failures = st.failures;
        self.last_error = st.last_error;
        self.ready = st.ready && !self.provisional;
    }

    fn peers(&mut self, peers: &LeasePeers) {
        self.known_leases = peers.len();
        self.refused_leases = peers.refused();
        self.refused_total = peers.refused_total();
    }
}

/// Everything the lease task needs from the daemon, besides its [`LeaseTask`].
pub struct LeaseContext {
    /// Where `subnet.env` is written, and its contents.
    pub subnet_env: (PathBuf, SubnetEnv),
    /// The lease settings (cache path, release on exit).
    pub settings: LeaseSettings,
    /// Shared status.
    pub view: Arc<Mutex<LeaseView>>,
}

/// The rules lease records are held to, from the network config and our own lease.
pub fn rules(network: &NetworkConfig, ours: Ipv4Net, public_ip: Ipv4Addr, public_key: Option<PublicKey>) -> PeerRules {
    let vxlan = matches!(network.backend.kind, weft_ipam::BackendKind::Vxlan);
    PeerRules {
        network: network.network,
        subnet_len: network.subnet_len,
        ours,
        public_ip,
        backend: network.backend.kind.as_str().into(),
        vni: vxlan.then(|| network.backend.vni()),
        port: network.backend.port(),
        public_key,
    }
}

/// Applies the accepted peers ([`Peering::apply`]): a refused table keeps the running one,
/// and says so in status; per-peer routes that could not follow are logged.
async fn apply(peers: &LeasePeers, peering: &mut Peering, view: &Mutex<LeaseView>) {
    let wanted = peers.peers();
    let n = wanted.len();
    match peering.apply(wanted).await {
        Ok(()) => {}
        Err(ApplyError::Table(e)) => {
            error!(error = %e, peers = n, "route table refused; the last good table stays in force");
            if let Ok(mut v) = view.lock() {
                v.table_refusals += 1;
                v.last_table_error = Some(e.to_string());
            }
        }
        Err(ApplyError::TapRoutes(e)) => error!(error = %e, "could not update the per-peer routes"),
    }
}

/// Builds the first route table from `leases` before the workers start; returns the peer set
/// the lease task continues from.
pub async fn first_table(
    rules: PeerRules,
    leases: &[SubnetLease],
    peering: &mut Peering,
    ctx: &LeaseContext,
) -> LeasePeers {
    let mut peers = LeasePeers::new(rules);
    peers.replace_all(leases);
    apply(&peers, peering, &ctx.view).await;
    if let Ok(mut v) = ctx.view.lock() {
        v.peers(&peers);
    }
    peers
}

/// Lists the store until it answers (the watch starts from that snapshot).
pub async fn first_snapshot(
    store: &AnyStore,
    stop: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> Option<LeaseSnapshot> {
    loop {
        match store.list().await {
            Ok(s) => return Some(s),
            Err(e) => {
                warn!(error = %e, "cannot list leases yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = &mut *stop => return None,
                }
            }
        }
    }
}

/// How the daemon asks the lease task to stop.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Exit {
    /// A restart, a crash-safe stop: keep the lease (it is ours on the way back) and the cache.
    Stop,
    /// The node leaves the cluster: release the lease and forget the cache.
    Leave,
}

/// Why the network config in the store does not match what the data plane runs with.
fn network_mismatch(running: &NetworkConfig, store: &NetworkConfig) -> Option<String> {
    let pairs = [
        ("Network", running.network.to_string(), store.network.to_string()),
        ("SubnetLen", running.subnet_len.to_string(), store.subnet_len.to_string()),
        ("Backend.Type", running.backend.kind.as_str().to_owned(), store.backend.kind.as_str().to_owned()),
        ("Backend.Port", running.backend.port().to_string(), store.backend.port().to_string()),
        ("Backend.VNI", running.backend.vni().to_string(), store.backend.vni().to_string()),
        ("Backend.MTU", format!("{:?}", running.backend.mtu), format!("{:?}", store.backend.mtu)),
        (
            "Backend.DirectRouting",
            running.backend.direct_routing().to_string(),
            store.backend.direct_routing().to_string(),
        ),
    ];
    pairs.into_iter().find(|(_, a, b)| a != b).map(|(f, a, b)| format!("{f} {a} -> {b}"))
}

/// The lease task's state after start-up.
pub struct LeaseTask {
    /// The store.
    pub store: AnyStore,
    /// The keeper (holding our lease, or about to acquire it for a cached start).
    pub keeper: LeaseKeeper,
    /// The network config the data plane runs with.
    pub network: NetworkConfig,
    /// Our subnet.
    pub ours: Ipv4Net,
    /// The records known and what each is to us.
    pub peers: LeasePeers,
    /// The peers in force, the route table and the kernel routes that follow them.
    pub peering: Peering,
    /// The snapshot the watch starts from; `None` for a cached start (listed once confirmed).
    pub snapshot: Option<LeaseSnapshot>,
    /// Our lease, once held.
    pub lease: Option<SubnetLease>,
}

impl LeaseTask {
    fn cache(&self, settings: &LeaseSettings) -> Option<LeaseCache> {
        let lease = self.lease.clone()?;
        let peers = self.peers.leases().filter(|l| l.subnet != self.ours).cloned().collect();
        Some(LeaseCache { store: store_identity(&settings.store), network: self.network.clone(), lease, peers })
    }
}

/// Writes the cache off the runtime thread (a fsync, and up to megabytes of JSON).
async fn write_cache(cache: Option<LeaseCache>, path: &Path) {
    let Some(cache) = cache else { return };
    let path = path.to_path_buf();
    let r = tokio::task::spawn_blocking(move || cache.write(&path)).await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "cannot write the lease cache"),
        Err(e) => warn!(error = %e, "lease cache writer failed"),
    }
}

/// A failure the daemon cannot run through: it exits non-zero so that its supervisor restarts
/// it (the fail-closed route stays in place meanwhile).
fn fatal(task: &LeaseTask, ctx: &LeaseContext, e: DaemonError) -> Result<(), DaemonError> {
    // The next start must not come up from a cache the store has contradicted.
    if let Err(err) = LeaseCache::remove(&ctx.settings.lease_cache) {
        warn!(error = %err, "cannot remove the lease cache");
    }
    error!(error = %e, subnet = %task.ours, "lease mode cannot go on; exiting so that weft restarts");
    Err(e)
}

/// For a cached start: reads the network config and acquires the lease, and checks both
/// against what the data plane runs with. `Ok(false)`: stopped first.
async fn confirm(
    task: &mut LeaseTask,
    ctx: &LeaseContext,
    stop: &mut oneshot::Receiver<Exit>,
    exit: &mut Exit,
) -> Result<bool, DaemonError> {
    let mut stopped = Box::pin(async {
        *exit = stop.await.unwrap_or(Exit::Stop);
    });
    let network = match network_config(&task.store, &mut stopped).await {
        Ok(n) => n,
        Err(DaemonError::Stopped) => return Ok(false),
        Err(e) => return Err(e),
    };
    if let Some(diff) = network_mismatch(&task.network, &network) {
        return Err(DaemonError::NetworkChanged(diff));
    }
    let lease = match acquire(&mut task.keeper, &task.store, ctx.settings.ttl, &mut stopped).await {
        Ok(l) => l,
        Err(DaemonError::Stopped) => return Ok(false),
        Err(e) => return Err(e),
    };
    if lease.subnet != task.ours {
        return Err(DaemonError::LeaseMoved { old: task.ours, new: lease.subnet });
    }
    let Some(snapshot) = first_snapshot(&task.store, &mut stopped).await else { return Ok(false) };
    drop(stopped);
    task.lease = Some(lease);
    info!(subnet = %task.ours, leases = snapshot.leases.len(), "lease confirmed by the store; leaving provisional mode");
    if let Err(e) = write_subnet_env(&ctx.subnet_env.0, &ctx.subnet_env.1) {
        error!(error = %e, "cannot rewrite subnet.env");
    }
    if task.peers.replace_all(&snapshot.leases) {
        apply(&task.peers, &mut task.peering, &ctx.view).await;
    }
    if let Ok(mut v) = ctx.view.lock() {
        v.provisional = false;
        v.unreadable_leases = snapshot.unreadable.len();
        v.peers(&task.peers);
        v.update(&task.keeper, SystemTime::now());
    }
    task.snapshot = Some(snapshot);
    Ok(true)
}

/// Keeps the lease, the route table and the lease cache current until `stop` says so; then
/// releases the lease if the node leaves (or `release_on_exit` is set). Outages of the store
/// are retried, never fatal.
///
/// # Errors
/// What the daemon cannot run through: the store's network config differs from the cached one
/// the data plane came up with, or our lease moved to another subnet. The daemon then exits so
/// that its supervisor restarts it with the store's view.
pub async fn run(mut task: LeaseTask, ctx: LeaseContext, mut stop: oneshot::Receiver<Exit>) -> Result<(), DaemonError> {
    if super::failpoint::armed("lease-panic") {
        tokio::time::sleep(Duration::from_secs(2)).await;
        #[allow(clippy::panic)] // A test hook: proves a dead lease task stops the daemon.
        {
            panic!("failpoint lease-panic");
        }
    }
    let mut exit = Exit::Stop;
    if task.snapshot.is_none() {
        match confirm(&mut task, &ctx, &mut stop, &mut exit).await {
            Ok(true) => {}
            Ok(false) => return finish(task, &ctx, exit).await,
            Err(e) => return fatal(&task, &ctx, e),
        }
    }
    let Some(snapshot) = task.snapshot.take() else { return Ok(()) };
    let mut watch = Box::pin(task.store.watch(&snapshot));
    drop(snapshot);
    let mut watch_down = false;
    let mut cache_due: Option<Instant> = Some(Instant::now());
    let mut last_cache_write: Option<Instant> = None;
    if let Ok(mut v) = ctx.view.lock() {
        v.peers(&task.peers);
        v.update(&task.keeper, SystemTime::now());
    }
    loop {
        let now = SystemTime::now();
        let cache_sleep = cache_due.map(|t| {
            let earliest = last_cache_write.map_or(t, |w| t.max(w + CACHE_WRITE_INTERVAL));
            earliest.saturating_duration_since(Instant::now())
        });
        match task.keeper.poll(now) {
            LeaseAction::WaitUntil(t) => {
                let wait = t.duration_since(now).unwrap_or_default();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = tokio::time::sleep(cache_sleep.unwrap_or(Duration::MAX)), if cache_sleep.is_some() => {
                        cache_due = None;
                        last_cache_write = Some(Instant::now());
                        write_cache(task.cache(&ctx.settings), &ctx.settings.lease_cache).await;
                    }
                    item = watch.next() => match item {
                        Some(Ok(batch)) => {
                            if watch_down {
                                info!("lease watch recovered");
                                watch_down = false;
                            }
                            for e in &batch.events {
                                task.keeper.on_lease_event(e, SystemTime::now());
                            }
                            if task.peers.apply(&batch.events) {
                                apply(&task.peers, &mut task.peering, &ctx.view).await;
                            }
                            cache_due.get_or_insert_with(Instant::now);
                            if let Ok(mut v) = ctx.view.lock() {
                                v.peers(&task.peers);
                                v.resyncs += u64::from(batch.resync);
                            }
                        }
                        Some(Err(e)) => {
                            if !watch_down {
                                warn!(error = %e, "lease watch interrupted; keeping the last route table");
                                watch_down = true;
                            }
                        }
                        None => {
                            error!("lease watch ended; keeping the last route table");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                r = &mut stop => { exit = r.unwrap_or(Exit::Stop); break }
                            }
                        }
                    },
                    r = &mut stop => { exit = r.unwrap_or(Exit::Stop); break }
                }
            }
            action => tokio::select! {
                _ = lease_loop::execute(&mut task.keeper, &task.store, action, SystemTime::now) => {}
                r = &mut stop => { exit = r.unwrap_or(Exit::Stop); break }
            },
        }
        while let Some(ev) = task.keeper.poll_event() {
            if let KeeperEvent::Acquired { lease, .. } = &ev {
                if lease.subnet != task.ours {
                    let e = DaemonError::LeaseMoved { old: task.ours, new: lease.subnet };
                    return fatal(&task, &ctx, e);
                }
                task.lease = Some(lease.clone());
                cache_due.get_or_insert_with(Instant::now);
                if let Err(e) = ctx.subnet_env.1.write(&ctx.subnet_env.0) {
                    error!(path = %ctx.subnet_env.0.display(), error = %e, "cannot rewrite subnet.env");
                }
            }
            log_event(&ev);
        }
        if let Ok(mut v) = ctx.view.lock() {
            v.update(&task.keeper, SystemTime::now());
        }
    }
    finish(task, &ctx, exit).await
}

/// The way out: on a leave (or with `release_on_exit`) release the lease and remove the
/// cache; on a plain stop write the cache one last time, for the restart.
async fn finish(mut task: LeaseTask, ctx: &LeaseContext, exit: Exit) -> Result<(), DaemonError> {
    if exit == Exit::Leave || ctx.settings.release_on_exit {
        if let Some(l) = task.keeper.release() {
            match task.store.release(&l).await {
                Ok(_) => info!(subnet = %l.subnet, "lease released"),
                Err(e) => warn!(subnet = %l.subnet, error = %e, "could not release the lease; it will expire"),
            }
        }
        if let Err(e) = LeaseCache::remove(&ctx.settings.lease_cache) {
            warn!(error = %e, "cannot remove the lease cache");
        }
    } else {
        write_cache(task.cache(&ctx.settings), &ctx.settings.lease_cache).await;
    }
    Ok(())
}

/// Writes `subnet.env`, creating its directory.
///
/// # Errors
/// The file cannot be written.
pub fn write_subnet_env(path: &Path, env: &SubnetEnv) -> Result<(), DaemonError> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| DaemonError::SubnetEnv(path.into(), e.to_string()))?;
    }
    env.write(path).map_err(|e| DaemonError::SubnetEnv(path.into(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_mismatch_names_the_field() {
        let a = NetworkConfig::from_json(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(network_mismatch(&a, &a.clone()), None);
        let b = NetworkConfig::from_json(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":2}}"#).unwrap();
        assert_eq!(network_mismatch(&a, &b).as_deref(), Some("Backend.VNI 1 -> 2"));
        let c = NetworkConfig::from_json(r#"{"Network":"10.245.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert!(network_mismatch(&a, &c).is_some_and(|d| d.starts_with("Network")));
    }

    #[test]
    fn store_identity_tells_stores_apart() {
        let f = |d: &str| StoreSettings::File { dir: d.into() };
        assert_ne!(store_identity(&f("/a")), store_identity(&f("/b")));
        let e = |p: &str| StoreSettings::Etcd {
            endpoints: vec!["http://198.18.0.100:2379".into()],
            prefix: p.into(),
            tls: weft_ipam::EtcdTls::default(),
            credentials: None,
        };
        assert_ne!(store_identity(&e("/coreos.com/network")), store_identity(&e("/other")));
    }
}
