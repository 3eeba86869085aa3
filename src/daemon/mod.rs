//! `weft run`: start-up, the signal loop and shutdown.
//!
//! Start-up order: validated config → healthz/metrics endpoints (when a port is set; they
//! answer "not ready" until the end) → (lease mode: store and lease cache; with a usable cache
//! its network config and subnet, else the store's network config, the fail-closed route, and
//! the lease) → then the stages of [`start`]: underlay (the fail-closed `unreachable` route for
//! the cluster network, underlay interface and MTU) → data plane (I/O backend probe, TUN
//! queues, UDP sockets, TUN address, link and routes) → masquerade rules (`ip_masq`) → control
//! plane (static peers, or `subnet.env`, the first route table from the store's list or the
//! cache, and the lease task; TAP's per-peer and DirectRouting's routes follow the table,
//! [`control::Peering`]) → workers → pending CNI releases drained → API socket.
//!
//! In static mode SIGHUP re-reads the peers and swaps the route table while traffic flows; in
//! lease mode peers follow the store. SIGTERM or SIGINT stop the workers and the lease task;
//! the TUN goes with the process, the lease and the fail-closed route stay, so that pod
//! traffic is never sent unencapsulated while weft restarts. Only a leave (`weft leave`, or
//! `release_on_exit`) releases the lease and removes the route (and the masquerade table). A
//! worker or task that ends on its own stops the daemon with an error (exit 1), for its
//! supervisor to restart it.

pub mod api;
pub mod control;
pub mod direct;
pub mod failpoint;
pub mod health;
pub mod http;
pub mod lease;
pub mod masq;
pub mod metrics;
pub mod mtu;
pub mod netlink;
pub mod peers;
pub mod pending;
pub mod rootless;
mod start;
pub mod takeover;
pub mod underlay;
pub mod wireguard;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use weft_forwarder::driver::DriverError;
use weft_forwarder::wire::ethernet::MacAddr;
use weft_forwarder::{
    Bridge, Encap, EncapKind, Forwarder, LocalNode, PacketCore, RouteError, UdpEncap, VxlanEncap, WorkerStats,
    wireguard::WireGuardEncap,
};

use crate::config::{Backend, Config, ConfigError, Device, Loaded, Peer, RawConfig};
use netlink::{Netlink, NetlinkError};

/// Why the daemon could not start or had to stop. Each maps to a stable exit code.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The peers cannot form a route table.
    #[error("peers: {0}")]
    Peers(#[from] RouteError),
    /// The overlay MTU does not fit the underlay; the message starts with the field (`mtu` or
    /// `Backend.MTU`).
    #[error("{0}")]
    Mtu(String),
    /// `/dev/net/tun` is missing.
    #[error("cannot open /dev/net/tun: {0} (load the tun module, or pass the device into the container)")]
    NoTunDevice(io::Error),
    /// Not allowed to create the TUN or change links and routes.
    #[error("not permitted: {0} (weft run needs root or CAP_NET_ADMIN)")]
    NotPermitted(String),
    /// The underlay port is taken.
    #[error("address in use: {0} is already bound (another weft or flannel on this host? change port)")]
    AddressInUse(SocketAddr),
    /// The TUN could not be created for another reason.
    #[error("tun_name: cannot create TUN {name:?}: {source}")]
    Tun {
        /// The name.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// A socket could not be bound for another reason.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The I/O backend failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// Netlink failed.
    #[error(transparent)]
    Netlink(NetlinkError),
    /// The API socket could not be bound.
    #[error("api_socket: cannot listen on {path}: {source}")]
    Api {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A worker thread could not be started.
    #[error("cannot start worker thread: {0}")]
    Thread(io::Error),
    /// The lease store refused for good (no network config, an invalid one, …).
    #[error("lease store: {0}")]
    Store(#[from] weft_ipam::StoreError),
    /// `subnet.env` could not be written.
    #[error("subnet_file: cannot write {0}: {1}")]
    SubnetEnv(PathBuf, String),
    /// Pod allocations cannot be kept.
    #[error("pod_dir: {0}")]
    Pods(String),
    /// A stop signal arrived before start-up finished.
    #[error("stopped before start-up finished")]
    Stopped,
    /// A worker thread ended on its own or panicked: the data plane is (partly) gone.
    #[error("worker {worker} died: {why}")]
    WorkerDied {
        /// The worker's index.
        worker: usize,
        /// How it ended.
        why: String,
    },
    /// The healthz/metrics endpoints could not listen.
    #[error("healthz_ip/healthz_port: cannot listen on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The masquerade rules could not be installed.
    #[error("ip_masq: {0}")]
    Masq(#[from] masq::MasqError),
    /// A control-plane task ended on its own or panicked.
    #[error("{task} task died: {why}")]
    TaskDied {
        /// `lease`, `api`, `pending-release`, `http` or `masq`.
        task: &'static str,
        /// How it ended.
        why: String,
    },
    /// The store gave us another subnet than the one the data plane runs with (our lease
    /// expired and was taken during an outage, say): restart to re-address.
    #[error("lease moved from {old} to {new}: restarting to use the new subnet")]
    LeaseMoved {
        /// The subnet in use.
        old: ipnet::Ipv4Net,
        /// The one the store gave us.
        new: ipnet::Ipv4Net,
    },
    /// The store's network config is not the one the data plane came up with (from the lease
    /// cache): restart to apply it.
    #[error("network config changed in the store ({0}): restarting to apply it")]
    NetworkChanged(String),
}

impl From<rootless::RootlessError> for DaemonError {
    fn from(e: rootless::RootlessError) -> Self {
        Self::NotPermitted(e.to_string())
    }
}

impl From<control::ApplyError> for DaemonError {
    fn from(e: control::ApplyError) -> Self {
        match e {
            control::ApplyError::Table(e) => Self::Peers(e),
            control::ApplyError::TapRoutes(e) => e.into(),
        }
    }
}

impl From<NetlinkError> for DaemonError {
    fn from(e: NetlinkError) -> Self {
        if e.is_permission() { Self::NotPermitted(e.to_string()) } else { Self::Netlink(e) }
    }
}

impl DaemonError {
    /// The process exit code: stable, documented in the README.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Peers(_) | Self::Mtu(_) => 3,
            Self::Store(e) if !e.is_transient() => 3,
            Self::Stopped => 0,
            Self::Netlink(NetlinkError::AddressNotLocal(_)) => 3,
            Self::NoTunDevice(_) | Self::NotPermitted(_) => 4,
            Self::AddressInUse(_) => 5,
            Self::Http { source, .. } if source.kind() == io::ErrorKind::AddrInUse => 5,
            Self::Http { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => 4,
            Self::Masq(e) if e.is_permission() => 4,
            Self::Driver(DriverError::UringUnavailable(_)) => 6,
            _ => 1,
        }
    }
}

/// Where a reload reads its configuration from: the file again, with the same flags on top.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    /// The config file, if any.
    pub path: Option<PathBuf>,
    /// Flag overrides.
    pub flags: RawConfig,
    /// The public address found at start when neither file nor flags set one
    /// ([`underlay::pin_public_ip`]); kept, so a reload never moves the node.
    pub detected_public_ip: Option<IpAddr>,
    /// Rootless: where unset paths default to ([`rootless::Dirs`]).
    pub rootless_dirs: Option<rootless::Dirs>,
}

impl ConfigSource {
    /// The file with the flags on top, before validation.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn raw(&self) -> Result<RawConfig, ConfigError> {
        let file = match &self.path {
            Some(p) => RawConfig::from_file(p)?,
            None => RawConfig::default(),
        };
        let mut raw = file.merge(self.flags.clone());
        if raw.public_ip.is_none() {
            raw.public_ip = self.detected_public_ip.map(|ip| ip.to_string());
        }
        if let Some(dirs) = &self.rootless_dirs {
            dirs.fill(&mut raw);
        }
        Ok(raw)
    }

    /// Reads and validates the configuration.
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        Loaded::from_raw(self.raw()?)
    }
}

/// Runs the daemon until SIGTERM/SIGINT, a leave, or a failure it cannot run through.
/// `overlay` is the rootless overlay namespace ([`rootless`]), `None` as root.
///
/// # Errors
/// [`DaemonError`] when start-up fails, or a worker or task dies.
pub async fn run(source: ConfigSource, overlay: Option<rootless::Overlay>) -> Result<(), DaemonError> {
    let mut signals = Signals::new()?;
    let nl = match &overlay {
        Some(o) => Netlink::connect_rootless(o).await?,
        None => Netlink::connect()?,
    };
    let source = underlay::pin_public_ip(source, &nl).await?;
    let loaded = source.load()?;
    let (healthz, masq_wanted, lease_mode) = match &loaded {
        Loaded::Static(c) => (c.node.healthz, c.node.ip_masq, false),
        Loaded::Lease { raw, .. } => (crate::config::healthz_addr(raw)?, raw.ip_masq.unwrap_or(false), true),
    };
    if overlay.is_some() && masq_wanted {
        return Err(ConfigError::Invalid {
            field: "ip_masq".into(),
            message:
                "needs root: it programs the host's firewall (a rootless overlay has no other way out to masquerade)"
                    .into(),
        }
        .into());
    }
    // The endpoints come first, so that a node waiting for its store says so (503) rather
    // than refusing connections.
    let health = Arc::new(health::Health::new(lease_mode, masq_wanted));
    let http_task = match healthz {
        Some(addr) => {
            let listener = http::bind(addr).await.map_err(|source| DaemonError::Http { addr, source })?;
            info!(addr = %addr, "healthz and metrics endpoints listening (/healthz, /readyz, /metrics)");
            Some(tokio::spawn(http::serve(listener, Arc::clone(&health))))
        }
        None => None,
    };
    let (cfg, leased) = match loaded {
        Loaded::Static(cfg) => (*cfg, None),
        Loaded::Lease { raw, lease: settings } => {
            health.set_phase("waiting for the lease store (network config and lease)");
            let mut stop = Box::pin(signals.stopped());
            let prepared = lease::prepare(&raw, settings, &nl, &mut stop).await?;
            drop(stop);
            (prepared.cfg.clone(), Some(prepared))
        }
    };
    health.set_phase("starting the data plane");
    // The mode is chosen once here; everything below is monomorphised per core, so the data
    // path has no dynamic dispatch.
    if let (Some(_), Some(p)) = (&overlay, &leased) {
        if p.network.backend.direct_routing() {
            return Err(ConfigError::Invalid {
                field: "Backend.DirectRouting".into(),
                message: "needs root: it adds routes to the host's own table (run this node as root, or turn it off)"
                    .into(),
            }
            .into());
        }
    }
    let overlay = overlay.map(Arc::new);
    let start = Start { cfg, source, leased, nl, signals, health, http: http_task, overlay, wg: None };
    match (start.cfg.net.backend.clone(), start.cfg.node.device) {
        (Backend::Udp, Device::Tun) => {
            run_with(Wire::of::<UdpEncap>(None), start, |i, local, stats| Forwarder::new(UdpEncap, local, i, stats))
                .await
        }
        (Backend::Vxlan { vni, vtep_mac, .. }, Device::Tun) => {
            run_with(Wire::of::<VxlanEncap>(None), start, move |i, local, stats| {
                Forwarder::new(VxlanEncap::new(vni, vtep_mac), local, i, stats)
            })
            .await
        }
        (Backend::Vxlan { vni, vtep_mac, .. }, Device::Tap) => {
            run_with(Wire::of::<VxlanEncap>(Some(vtep_mac)), start, move |i, local, stats| {
                Bridge::new(vni, vtep_mac, local, i, stats)
            })
            .await
        }
        (Backend::WireGuard { key_file }, Device::Tun) => {
            let wg = wireguard::Setup::new(&key_file)
                .map_err(|e| ConfigError::Invalid { field: "wireguard_key_file".into(), message: e.to_string() })?;
            let (sessions, queue) = (Arc::clone(&wg.sessions), wg.queue.clone());
            let start = Start { wg: Some(wg), ..start };
            run_with(Wire::of::<WireGuardEncap>(None), start, move |i, local, stats| {
                Forwarder::new(WireGuardEncap::new(Arc::clone(&sessions), queue.clone()), local, i, stats)
            })
            .await
        }
        (Backend::Udp | Backend::WireGuard { .. }, Device::Tap) => Err(ConfigError::Invalid {
            field: "device".into(),
            message: "\"tap\" needs backend = \"vxlan\" (udp and wireguard carry IP packets only)".into(),
        }
        .into()),
    }
}

/// What start-up hands the data plane: the completed configuration and, in lease mode, how the
/// lease was obtained.
struct Start {
    cfg: Config,
    source: ConfigSource,
    leased: Option<lease::Prepared>,
    nl: Netlink,
    signals: Signals,
    /// Start-up progress, for `/healthz` and `/readyz`.
    health: Arc<health::Health>,
    /// The healthz/metrics server, if a port is set.
    http: Option<tokio::task::JoinHandle<()>>,
    /// Rootless: the overlay namespace the TUN is opened in.
    overlay: Option<Arc<rootless::Overlay>>,
    /// `wireguard`: the node key and the state its workers and control thread share.
    wg: Option<wireguard::Setup>,
}

/// The signals the daemon reacts to, registered once at start.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, DaemonError> {
        let sig = |k| signal(k).map_err(|e| DaemonError::NotPermitted(format!("signal handler: {e}")));
        Ok(Self {
            hup: sig(SignalKind::hangup())?,
            term: sig(SignalKind::terminate())?,
            int: sig(SignalKind::interrupt())?,
        })
    }

    /// Completes on SIGTERM or SIGINT.
    async fn stopped(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM: stopping"),
            _ = self.int.recv() => info!("SIGINT: stopping"),
        }
    }
}

/// What start-up needs to know about the chosen wire format and device.
#[derive(Clone, Copy, Debug)]
struct Wire {
    kind: EncapKind,
    source_port_matters: bool,
    flow_source_port: bool,
    /// TAP mode, with the MAC the TAP carries (our VTEP MAC).
    tap: Option<MacAddr>,
}

impl Wire {
    fn of<E: Encap>(tap: Option<MacAddr>) -> Self {
        Self { kind: E::KIND, source_port_matters: E::SOURCE_PORT_MATTERS, flow_source_port: E::FLOW_SOURCE_PORT, tap }
    }
}

/// Send sockets per worker for formats whose outer source port follows the inner flow.
const FLOW_SENDERS_PER_WORKER: usize = 8;

/// Start-up in its stages ([`start`]), then the API, the signal loop and shutdown.
async fn run_with<C: PacketCore + 'static>(
    wire: Wire,
    start: Start,
    make_core: impl Fn(usize, LocalNode, Arc<WorkerStats>) -> C,
) -> Result<(), DaemonError> {
    let Start { cfg, source, leased, nl, mut signals, health, http: mut http_task, overlay, wg } = start;
    let started = Instant::now();
    let rootless = overlay.is_some();
    let underlay = start::Underlay::discover(&cfg, &nl, wire, rootless).await?;
    let mtu = underlay.mtu;
    let mut plane = start::DataPlane::open(&cfg, &nl, wire, &underlay, overlay.as_deref()).await?;
    health.tun_up.store(true, Ordering::Relaxed);
    let masq_keeper = start::masquerade(&cfg, rootless, &health).await?;

    // The peers and what follows them: TAP's per-peer routes; in lease mode DirectRouting's
    // host routes (rootless refused DirectRouting at start, and has no host routes to clean).
    let tap = wire.tap.map(|_| control::TapRoutes::new(nl.clone(), plane.tun_index));
    let direct = match (&leased, rootless) {
        (Some(p), false) => direct::for_network(&p.network, &nl, underlay.link.index).await,
        _ => None,
    };
    let peering = control::Peering::new(mtu, cfg.node.workers, wire.source_port_matters, tap, direct);
    let control = match leased {
        None => start::ControlPlane::start_static(&cfg, peering).await?,
        Some(prepared) => {
            let key = wg.as_ref().map(|w| w.key.public_key());
            match start::ControlPlane::start_leased(prepared, &cfg, mtu, peering, &mut signals, key, &health).await? {
                Some(c) => c,
                // Stopped before the store answered: the fail-closed route stays, as on any stop.
                None => return Ok(()),
            }
        }
    };
    let pods = weft_ipam::FilePodStore::open(cfg.node.pod_dir.clone())
        .map_err(|e| DaemonError::Pods(format!("{}: {e}", cfg.node.pod_dir.display())))
        .and_then(|store| {
            weft_ipam::PodAllocator::new(store, cfg.net.subnet)
                .map(|a| a.with_gc_grace(cfg.node.pod_gc_grace))
                .map_err(|e| DaemonError::Pods(format!("{}: {e}", cfg.node.pod_dir.display())))
        })?;
    // The first table is in force (lease mode started from its cache: not synced with the
    // store until the lease task confirms it, which readiness reads from the lease view).
    health.routes_synced.store(true, Ordering::Relaxed);
    let wg_status = wg.as_ref().map(|w| (w.key.public_key(), Arc::clone(&w.counters)));
    let io = std::mem::take(&mut plane.io);
    let mut workers = start::Workers::start(io, plane.probe.backend, plane.local, &control.routes, wg, make_core)?;
    health.workers_running.store(true, Ordering::Relaxed);

    let (leave_tx, mut leave_rx) = mpsc::unbounded_channel::<()>();
    if let (Some(o), Some(dirs)) = (&overlay, &source.rootless_dirs) {
        if let Err(e) = o.link_into(&dirs.runtime) {
            warn!(dir = %dirs.runtime.display(), error = %e, "rootless: cannot link the namespace files");
        }
    }
    let state = Arc::new(api::ApiState {
        cfg: cfg.clone(),
        mtu,
        underlay: underlay.link,
        backend: plane.probe.backend,
        fallback_reason: plane.probe.fallback_reason.clone(),
        rootless: overlay.as_ref().map(|o| {
            let (userns, netns) = o.ns_paths();
            crate::status::RootlessStatus { userns: userns.display().to_string(), netns: netns.display().to_string() }
        }),
        offloads: plane.offload_names(),
        routes: control.routes.clone(),
        stats: workers.stats.clone(),
        started,
        reloads: AtomicU64::new(0),
        reload_failures: AtomicU64::new(0),
        lease: control.lease.as_ref().map(|l| Arc::clone(&l.view)),
        pods: Arc::new(pods),
        leave: leave_tx,
        wireguard: wg_status,
    });
    health.set_state(Arc::clone(&state));
    let mut masq_task = masq_keeper.map(|m| tokio::spawn(m.keep()));
    let mut pending_task = pending::start(Arc::clone(&state)).await;
    let listener = api::bind(&cfg.node.api_socket)
        .map_err(|source| DaemonError::Api { path: cfg.node.api_socket.clone(), source })?;
    let mut api_task = tokio::spawn(api::serve(listener, Arc::clone(&state)));
    info!(node = %cfg.node.node_name, subnet = %cfg.net.subnet, public_ip = %cfg.node.public_ip, port = cfg.net.port, workers = cfg.node.workers,
        backend = wire.kind.as_str(), io = plane.probe.backend.as_str(), api = %cfg.node.api_socket.display(), "weft ready");

    let start::ControlPlane { peering, lease: lease_run, .. } = control;
    let (lease_exit, mut lease_task, release_on_exit) = match lease_run {
        Some(l) => (Some(l.exit), Some(l.task), l.release_on_exit),
        None => (None, None, false),
    };
    let mut ctl = Control { cfg: &cfg, source: &source, state: &state, peering };
    let (exit, mut outcome) = {
        let mut watched = Watched {
            done: &mut workers.done,
            lease: lease_task.as_mut(),
            api: &mut api_task,
            pending: &mut pending_task,
            http: http_task.as_mut(),
            masq: masq_task.as_mut(),
            leave: &mut leave_rx,
        };
        signal_loop(&mut ctl, &mut signals, &mut watched).await
    };
    health.stopping(match (&outcome, exit) {
        (Err(e), _) => e.to_string(),
        (Ok(()), Exit::Leave) => "leaving the cluster".to_owned(),
        (Ok(()), Exit::Stop) => "stop requested".to_owned(),
    });

    api_task.abort();
    pending_task.abort();
    if let Some(t) = &masq_task {
        t.abort();
    }
    workers.stop().await;
    if let (Some(tx), Some(task)) = (lease_exit, lease_task) {
        let _ = tx.send(if exit == Exit::Leave { lease::Exit::Leave } else { lease::Exit::Stop });
        if !futures::future::FusedFuture::is_terminated(&task) {
            if let Ok(Err(e)) = task.await {
                if outcome.is_ok() {
                    outcome = Err(e);
                }
            }
        }
    }
    let left = exit == Exit::Leave || (release_on_exit && outcome.is_ok());
    // The TUN (and with it its address and device route) vanished with the last queue. The
    // fail-closed route stays unless the node leaves: a restart, a crash or a failed start must
    // not let pod traffic out of the default route unencapsulated.
    if left {
        leave_host(&cfg, &nl, rootless).await;
    }
    if let Some(t) = &http_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&cfg.node.api_socket);
    let s = state.status();
    let dropped: Vec<String> = s.drops.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    let (rx, tx) = s.peers.iter().fold((0, 0), |(r, t), p| (r + p.rx_packets, t + p.tx_packets));
    if left {
        info!(rx_packets = rx, tx_packets = tx, drops = %dropped.join(","), "weft left the cluster; tun and routes removed");
    } else {
        info!(rx_packets = rx, tx_packets = tx, drops = %dropped.join(","), network = %cfg.net.network,
            "weft stopped; tun removed, fail-closed route kept until weft is back or `weft leave`");
    }
    outcome
}

/// A leave: removes what outlives the process on a plain stop (the fail-closed routes, the
/// direct routes, the masquerade table).
async fn leave_host(cfg: &Config, nl: &Netlink, rootless: bool) {
    for net in cfg.cluster_networks() {
        if let Err(e) = nl.del_fail_closed(net).await {
            warn!(error = %e, "could not remove fail-closed route");
        }
    }
    if !rootless {
        direct::remove_all(nl).await;
    }
    if cfg.node.ip_masq {
        let table = masq::table_name(&cfg.node.tun_name);
        match masq::remove(&table).await {
            Ok(()) => info!(table = %format!("ip {table}"), "masquerade table removed"),
            Err(e) => warn!(error = %e, "could not remove the masquerade table"),
        }
    }
}

/// How a worker thread ended.
#[derive(Debug)]
enum WorkerEnd {
    /// Its loop returned without error; only right after a stop request.
    Returned,
    /// Its loop failed.
    Failed(DriverError),
    /// It panicked.
    Panicked(String),
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The stop flag worker `i` watches: the daemon's, except under the `worker-exit` and
/// `worker-panic` failpoints, where worker 0 gets one of its own that trips after a second.
fn worker_stop_flag(i: usize, daemon: &Arc<AtomicBool>) -> Arc<AtomicBool> {
    if i != 0 || !(failpoint::armed("worker-exit") || failpoint::armed("worker-panic")) {
        return Arc::clone(daemon);
    }
    let own = Arc::new(AtomicBool::new(false));
    let trip = Arc::clone(&own);
    let spawned = std::thread::Builder::new().name("weft-failpoint".into()).spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(2));
        trip.store(true, Ordering::Relaxed);
    });
    if spawned.is_err() {
        return Arc::clone(daemon);
    }
    own
}

/// Why the signal loop returned.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Exit {
    /// A stop signal, or a failure: keep the fail-closed route and the lease.
    Stop,
    /// `weft leave`: release the lease and remove the fail-closed route.
    Leave,
}

/// What the signal loop and reloads act on.
struct Control<'a> {
    cfg: &'a Config,
    source: &'a ConfigSource,
    state: &'a api::ApiState,
    /// Static mode: the peers in force, which a reload replaces. `None` in lease mode.
    peering: Option<control::Peering>,
}

/// The lease task, fused so that it can be awaited once more after the signal loop saw it end.
type LeaseJoin = futures::future::Fuse<tokio::task::JoinHandle<Result<(), DaemonError>>>;

/// Everything whose end stops the daemon.
struct Watched<'a> {
    done: &'a mut mpsc::UnboundedReceiver<(usize, WorkerEnd)>,
    lease: Option<&'a mut LeaseJoin>,
    api: &'a mut tokio::task::JoinHandle<()>,
    pending: &'a mut tokio::task::JoinHandle<()>,
    /// The healthz/metrics server, when a port is set.
    http: Option<&'a mut tokio::task::JoinHandle<()>>,
    /// The masquerade keeper, with `ip_masq`.
    masq: Option<&'a mut tokio::task::JoinHandle<()>>,
    leave: &'a mut mpsc::UnboundedReceiver<()>,
}

/// The end of an optional task; never, when there is none.
async fn optional_end(h: &mut Option<&mut tokio::task::JoinHandle<()>>) -> Result<(), tokio::task::JoinError> {
    match h {
        Some(h) => (&mut **h).await,
        None => futures::future::pending().await,
    }
}

/// Waits for signals, a leave request, and the end of any worker or task; returns when the
/// daemon should stop. Any worker or task that ends on its own is a failure: the daemon exits
/// non-zero so that its supervisor restarts it, instead of staying "ready" with nothing behind.
async fn signal_loop(
    ctl: &mut Control<'_>,
    signals: &mut Signals,
    w: &mut Watched<'_>,
) -> (Exit, Result<(), DaemonError>) {
    let Signals { hup, term, int } = signals;
    let Watched { done, lease, api, pending, http, masq, leave } = w;
    let lease_alive = lease.is_some();
    let (http_alive, masq_alive) = (http.is_some(), masq.is_some());
    let mut lease_end = std::pin::pin!(async {
        match lease {
            Some(h) => (&mut **h).await,
            None => futures::future::pending().await,
        }
    });
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let counter = if reload(ctl).await { &ctl.state.reloads } else { &ctl.state.reload_failures };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            _ = term.recv() => { info!("SIGTERM: stopping"); return (Exit::Stop, Ok(())) }
            _ = int.recv() => { info!("SIGINT: stopping"); return (Exit::Stop, Ok(())) }
            Some(()) = leave.recv() => { info!("leave requested: releasing the lease and removing the routes"); return (Exit::Leave, Ok(())) }
            end = done.recv() => {
                let e = match end {
                    Some((i, WorkerEnd::Failed(e))) => { error!(worker = i, error = %e, "worker failed; stopping"); e.into() }
                    Some((i, WorkerEnd::Panicked(m))) => {
                        error!(worker = i, panic = %m, "worker panicked; stopping");
                        DaemonError::WorkerDied { worker: i, why: format!("panicked: {m}") }
                    }
                    Some((i, WorkerEnd::Returned)) => {
                        error!(worker = i, "worker ended without being asked to; stopping");
                        DaemonError::WorkerDied { worker: i, why: "its loop ended".into() }
                    }
                    None => DaemonError::WorkerDied { worker: 0, why: "every worker is gone".into() },
                };
                return (Exit::Stop, Err(e));
            }
            r = &mut lease_end, if lease_alive => {
                let e = match r {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => DaemonError::TaskDied { task: "lease", why: "it ended".into() },
                    Err(j) => DaemonError::TaskDied { task: "lease", why: join_why(j) },
                };
                error!(error = %e, "lease task ended; stopping");
                return (Exit::Stop, Err(e));
            }
            r = &mut **api => {
                let why = match r { Ok(()) => "it ended".into(), Err(j) => join_why(j) };
                error!(why = %why, "api task ended; stopping");
                return (Exit::Stop, Err(DaemonError::TaskDied { task: "api", why }));
            }
            r = &mut **pending => {
                let why = match r { Ok(()) => "it ended".into(), Err(j) => join_why(j) };
                error!(why = %why, "pending-release task ended; stopping");
                return (Exit::Stop, Err(DaemonError::TaskDied { task: "pending-release", why }));
            }
            r = optional_end(http), if http_alive => {
                let why = match r { Ok(()) => "it ended".into(), Err(j) => join_why(j) };
                error!(why = %why, "healthz/metrics task ended; stopping");
                return (Exit::Stop, Err(DaemonError::TaskDied { task: "http", why }));
            }
            r = optional_end(masq), if masq_alive => {
                let why = match r { Ok(()) => "it ended".into(), Err(j) => join_why(j) };
                error!(why = %why, "masquerade task ended; stopping");
                return (Exit::Stop, Err(DaemonError::TaskDied { task: "masq", why }));
            }
        }
    }
}

fn join_why(j: tokio::task::JoinError) -> String {
    match j.try_into_panic() {
        Ok(p) => format!("panicked: {}", panic_message(p.as_ref())),
        Err(j) => j.to_string(),
    }
}

/// SIGHUP: re-reads the configuration and swaps in a new route table. Anything wrong is
/// logged and the running table is kept; fields that need a restart are named and ignored.
/// Returns whether the new peers were applied.
async fn reload(ctl: &mut Control<'_>) -> bool {
    let cfg = ctl.cfg;
    let new = match (ctl.source.load(), &mut ctl.peering) {
        (Ok(Loaded::Static(c)), Some(peering)) => (*c, peering),
        (Ok(Loaded::Lease { .. }), None) => {
            info!("reload: lease mode, peers follow the store; nothing to reload");
            return true;
        }
        (Ok(_), _) => {
            error!("reload refused: switching between static and lease mode needs a restart");
            return false;
        }
        (Err(e), _) => {
            error!(error = %e, "reload refused, keeping the running configuration");
            return false;
        }
    };
    let (new, peering) = new;
    let ignored = cfg.restart_only_changes(&new);
    if !ignored.is_empty() {
        warn!(fields = ?ignored, "reload: these fields need a restart and keep their running values");
    }
    let old: Vec<Peer> = peering.in_force().to_vec();
    let count = new.peers.configured().len();
    let tap_routes = match peering.apply(new.peers.configured().to_vec()).await {
        Err(control::ApplyError::Table(e)) => {
            error!(error = %e, "reload refused, keeping the running peers");
            return false;
        }
        other => other,
    };
    let (old, new) = (&old, peering.in_force());
    let before: std::collections::HashSet<&str> = old.iter().map(|p| p.name.as_str()).collect();
    let after: std::collections::HashSet<&str> = new.iter().map(|p| p.name.as_str()).collect();
    for p in new.iter().filter(|p| !before.contains(p.name.as_str())) {
        info!(peer = %p.name, subnet = %p.subnet, endpoint = %p.endpoint, "peer added");
    }
    for p in old.iter().filter(|o| !after.contains(o.name.as_str())) {
        info!(peer = %p.name, "peer removed");
    }
    if let Err(e) = tap_routes {
        error!(error = %e, "reload: could not update the per-peer routes");
    }
    info!(peers = count, "reloaded");
    true
}
