//! `weft run`: start-up, the signal loop and shutdown.
//!
//! Start-up order: validated config → healthz/metrics endpoints (when a port is set; they
//! answer "not ready" until the end) → (lease mode: store and lease cache; with a usable cache
//! its network config and subnet, else the store's network config, the fail-closed route, and
//! the lease) → the fail-closed `unreachable` route for the cluster network → underlay
//! interface and MTU → I/O backend probe → TUN queues → UDP sockets → TUN address, link and
//! routes → masquerade rules (`ip_masq`) → (lease mode: `subnet.env`, the first route table
//! from the store's list or the cache, the lease task) → workers → pending CNI releases
//! drained → API socket.
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
pub mod takeover;
pub mod underlay;
pub mod wireguard;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use ipnet::IpNet;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{debug, error, info, info_span, warn};
use weft_forwarder::driver::udp::OuterChecksum;
use weft_forwarder::driver::{self, DriverError, Offloads, WorkerIo};
use weft_forwarder::wire::ethernet::MacAddr;
use weft_forwarder::{
    Bridge, Encap, EncapKind, Forwarder, LocalNode, PacketCore, RouteError, RouteTableHandle, UdpEncap, VxlanEncap,
    WorkerStats, wireguard::WireGuardEncap,
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
        Loaded::Static(c) => (c.healthz, c.ip_masq, false),
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
    match (start.cfg.backend.clone(), start.cfg.device) {
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

/// Which offloads the workers use, from what the TUN got, what the sockets accept and the
/// configuration.
fn choose_offloads(cfg: &Config, tun: driver::tun::TunOffloads, sockets: &[std::net::UdpSocket]) -> Offloads {
    let tso = tun.tso;
    let gso = tso && sockets.first().is_some_and(driver::udp::gso_supported);
    let gro = tso
        && cfg.gro
        && sockets.iter().all(|s| match driver::udp::enable_gro(s) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "UDP GRO unavailable; receiving one datagram at a time");
                false
            }
        });
    Offloads { tun_vnet: tso, gso, gro, coalesce: tso && cfg.gro, tun_uso: tun.uso && cfg.gro }
}

async fn run_with<C: PacketCore + 'static>(
    wire: Wire,
    start: Start,
    make_core: impl Fn(usize, LocalNode, Arc<WorkerStats>) -> C,
) -> Result<(), DaemonError> {
    let Start { cfg, source, leased, nl, mut signals, health, http: mut http_task, overlay, wg } = start;
    let started = Instant::now();
    // Fail closed first: from here on, pod traffic for the cluster network is either
    // encapsulated or refused, never sent out of the default route (lease mode installed it
    // already, as soon as it knew the network).
    for net in cfg.cluster_networks() {
        nl.add_fail_closed(net).await?;
    }
    if let (Backend::Vxlan { vni, .. }, None) = (&cfg.backend, &overlay) {
        takeover::remove_flannel_vtep(&nl, vni.get(), cfg.port).await?;
    }
    let underlay = nl.underlay_for(cfg.public_ip).await?;
    let mtu = mtu::overlay_mtu(&cfg, &underlay, wire.kind)?;
    let probe = match &overlay {
        // io_uring's registered buffers count against an unprivileged user's RLIMIT_MEMLOCK.
        Some(_) => match rootless::memlock_allows(cfg.workers.saturating_mul(driver::POOL_BYTES)) {
            Ok(()) => driver::probe(cfg.io)?,
            Err(why) if cfg.io != driver::IoPreference::Uring => {
                driver::ProbeResult { backend: driver::Backend::Mmsg, fallback_reason: Some(why) }
            }
            Err(why) => return Err(DriverError::UringUnavailable(io::Error::other(why)).into()),
        },
        None => driver::probe(cfg.io)?,
    };
    match &probe.fallback_reason {
        Some(reason) => warn!(backend = "mmsg", reason = %reason, "io_uring unavailable, falling back"),
        None => info!(backend = probe.backend.as_str(), "io backend chosen"),
    }

    // Offloads need a TUN (the TAP path forwards frame by frame); both I/O backends use them.
    let want_offload = cfg.offload && wire.tap.is_none();
    let (name, workers, tap) = (cfg.tun_name.clone(), cfg.workers, wire.tap.is_some());
    let opened = match &overlay {
        // A TUN belongs to the namespace of the thread that opened /dev/net/tun.
        Some(o) => o.run(move || driver::tun::open(&name, workers, tap, want_offload))?,
        None => driver::tun::open(&name, workers, tap, want_offload),
    };
    let queues = opened.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => DaemonError::NoTunDevice(e),
        io::ErrorKind::PermissionDenied => DaemonError::NotPermitted(format!("create TUN {}: {e}", cfg.tun_name)),
        _ => DaemonError::Tun { name: cfg.tun_name.clone(), source: e },
    })?;
    let bind_addr = SocketAddr::new(cfg.public_ip, cfg.port);
    let tun_offloads = queues.first().map(driver::TunQueue::offloads).unwrap_or_default();
    // A GSO send needs the outer checksum (SO_NO_CHECK + UDP_SEGMENT is EINVAL), so with
    // offloads VXLAN sends checksummed outer UDP, which every receiver accepts.
    let csum = match cfg.backend {
        Backend::Vxlan { udp_checksum: false, .. } if !tun_offloads.tso => OuterChecksum::Zero,
        _ => OuterChecksum::On,
    };
    let sockets = driver::udp::bind(bind_addr, cfg.workers, csum).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => DaemonError::AddressInUse(bind_addr),
        io::ErrorKind::PermissionDenied => DaemonError::NotPermitted(format!("bind {bind_addr}: {e}")),
        _ => DaemonError::Bind { addr: bind_addr, source: e },
    })?;

    let senders = if wire.flow_source_port { FLOW_SENDERS_PER_WORKER } else { 0 };
    let mut send_sets = Vec::with_capacity(cfg.workers);
    for _ in 0..cfg.workers {
        send_sets.push(
            driver::udp::bind_senders(cfg.public_ip, senders, csum)
                .map_err(|e| DaemonError::Bind { addr: SocketAddr::new(cfg.public_ip, 0), source: e })?,
        );
    }
    let offloads = choose_offloads(&cfg, tun_offloads, &sockets);
    info!(
        tun_tso = offloads.tun_vnet,
        tun_uso = tun_offloads.uso,
        udp_gso = offloads.gso,
        udp_gro = offloads.gro,
        coalesce = offloads.coalesce,
        "offloads"
    );
    let local = LocalNode { subnet_v4: Some(cfg.subnet), subnet_v6: cfg.subnet_v6 };
    let gateways: Vec<IpAddr> =
        local.gateway_v4().map(IpAddr::V4).into_iter().chain(local.gateway_v6().map(IpAddr::V6)).collect();
    let tun_index = nl.link_index(&cfg.tun_name).await?;
    nl.configure_tun(tun_index, &cfg.tun_name, mtu, wire.tap, &gateways).await?;
    if wire.tap.is_none() {
        for (net, gw) in cfg.cluster_networks().zip(gateways.iter()) {
            nl.add_device_route(net, tun_index, *gw).await?;
        }
    }
    if wire.tap.is_some() {
        sync_tap_routes(&nl, tun_index, &[], &cfg.peers).await?;
    }
    info!(tun = %cfg.tun_name, mtu, gateway = ?gateways, underlay = %underlay.name, underlay_mtu = underlay.mtu, "tun configured");
    health.tun_up.store(true, Ordering::Relaxed);

    // Masquerade: our table replaced in one transaction; without ip_masq, one left by an
    // earlier run (a plain stop keeps it) is removed, so turning it off takes effect.
    let masq_table = masq::table_name(&cfg.tun_name);
    let masq_keeper = if cfg.ip_masq {
        let m = masq::Masq::install(masq_table.clone(), cfg.network, cfg.subnet).await?;
        health.set_masq(m.state());
        Some(m)
    } else {
        // Rootless has no table of its own in the host's firewall to clean.
        if overlay.is_none() {
            if let Err(e) = masq::remove(&masq_table).await {
                debug!(error = %e, "no masquerade table to remove");
            }
        }
        None
    };

    // Lease mode: subnet.env, and the leases the store (or the cache) holds, before anyone is
    // told we are up.
    let mut lease_parts = None;
    if let Some(prepared) = leased {
        let env = weft_ipam::SubnetEnv {
            network: cfg.network,
            subnet: cfg.subnet,
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: u32::from(mtu),
            ipmasq: cfg.ip_masq,
        };
        lease::write_subnet_env(&prepared.settings.subnet_file, &env)?;
        health.subnet_env.store(true, Ordering::Relaxed);
        let snapshot = match &prepared.start {
            lease::Start::Held { .. } => {
                let mut stop = Box::pin(signals.stopped());
                // Stopped before the store answered: the fail-closed route stays, as on any stop.
                let Some(snapshot) = lease::first_snapshot(&prepared.store, &mut stop).await else { return Ok(()) };
                Some(snapshot)
            }
            lease::Start::Cached { .. } => None,
        };
        lease_parts = Some((prepared, env, snapshot));
    }
    let pods = weft_ipam::FilePodStore::open(cfg.pod_dir.clone())
        .map_err(|e| DaemonError::Pods(format!("{}: {e}", cfg.pod_dir.display())))
        .and_then(|store| {
            weft_ipam::PodAllocator::new(store, cfg.subnet)
                .map(|a| a.with_gc_grace(cfg.pod_gc_grace))
                .map_err(|e| DaemonError::Pods(format!("{}: {e}", cfg.pod_dir.display())))
        })?;

    let table = control::build_table(&cfg.peers, mtu, cfg.workers, None, wire.source_port_matters)?;
    for p in table.peers() {
        info!(peer = %p.name, subnet = ?p.subnet_v4, endpoint = %p.endpoint, "peer added");
    }
    let routes = RouteTableHandle::new(table);
    let mut lease_task = None;
    let mut lease_view = None;
    let mut release_on_exit = false;
    if let Some((prepared, env, snapshot)) = lease_parts {
        release_on_exit = prepared.settings.release_on_exit;
        let public_ip = match cfg.public_ip {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
        };
        let provisional = matches!(prepared.start, lease::Start::Cached { .. });
        let view = Arc::new(std::sync::Mutex::new(lease::LeaseView::new(
            cfg.subnet,
            prepared.settings.store.kind(),
            provisional,
            prepared.cache_note.clone(),
        )));
        let on_peers: Option<lease::PeersChanged> = wire.tap.map(|_| {
            let nl = nl.clone();
            let f: lease::PeersChanged = Box::new(move |old: Vec<Peer>, new: Vec<Peer>| {
                let nl = nl.clone();
                Box::pin(async move {
                    if let Err(e) = sync_tap_routes(&nl, tun_index, &old, &new).await {
                        error!(error = %e, "could not update the per-peer routes");
                    }
                })
            });
            f
        });
        // Rootless refused DirectRouting above, and has no host routes of weft's to clean.
        let on_peers = if overlay.is_some() {
            on_peers
        } else {
            direct::hook(on_peers, &prepared.network, &nl, underlay.index).await
        };
        let ctx = lease::LeaseContext {
            routes: routes.clone(),
            mtu,
            workers: cfg.workers,
            source_port_matters: wire.source_port_matters,
            subnet_env: (prepared.settings.subnet_file.clone(), env),
            settings: prepared.settings.clone(),
            view: Arc::clone(&view),
            on_peers,
        };
        // The first table, before the workers start: from the store's list, or from the cache.
        let rules = lease::rules(&prepared.network, cfg.subnet, public_ip, wg.as_ref().map(|w| w.key.public_key()));
        let (keeper, lease, leases) = match prepared.start {
            lease::Start::Held { keeper, lease } => {
                (keeper, Some(lease), snapshot.as_ref().map(|s| s.leases.clone()).unwrap_or_default())
            }
            lease::Start::Cached { keeper, cache } => (keeper, None, cache.peers),
        };
        let (peers, in_force) = lease::first_table(rules, &leases, &ctx);
        if let (Some(s), Ok(mut v)) = (&snapshot, view.lock()) {
            v.unreadable_leases = s.unreadable.len();
        }
        if let Some(f) = &ctx.on_peers {
            f(Vec::new(), in_force.clone()).await;
        }
        let task = lease::LeaseTask {
            store: prepared.store,
            keeper,
            network: prepared.network,
            ours: cfg.subnet,
            peers,
            in_force,
            snapshot,
            lease,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        lease_task = Some((tx, futures::FutureExt::fuse(tokio::spawn(lease::run(task, ctx, rx)))));
        lease_view = Some(view);
    }
    // The first table is in force (lease mode started from its cache: not synced with the
    // store until the lease task confirms it, which readiness reads from the lease view).
    health.routes_synced.store(true, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let stats: Vec<Arc<WorkerStats>> = (0..cfg.workers).map(|_| Arc::new(WorkerStats::default())).collect();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, WorkerEnd)>();
    let mut threads = Vec::with_capacity(cfg.workers + 1);
    // WireGuard's control thread sends handshakes from our port, through a clone of the first
    // worker's socket; it reports its end as "worker <workers>", and its end stops the daemon
    // as a worker's would (no handshakes means no sessions).
    let wg_status = wg.as_ref().map(|w| (w.key.public_key(), Arc::clone(&w.counters)));
    if let Some(setup) = wg {
        let socket = sockets.first().map(std::net::UdpSocket::try_clone).transpose().map_err(DaemonError::Thread)?;
        let Some(socket) = socket else { return Err(DaemonError::NotPermitted("wireguard: no socket".into())) };
        let (routes, done, stop, id) = (routes.clone(), done_tx.clone(), Arc::clone(&stop), cfg.workers);
        let t = std::thread::Builder::new()
            .name("weft-wireguard".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| wireguard::run(setup, socket, routes, &stop));
                let end = match std::panic::catch_unwind(run) {
                    Ok(Ok(())) => WorkerEnd::Returned,
                    Ok(Err(e)) => WorkerEnd::Failed(DriverError::Loop(e)),
                    Err(p) => WorkerEnd::Panicked(panic_message(p.as_ref())),
                };
                let _ = done.send((id, end));
            })
            .map_err(DaemonError::Thread)?;
        threads.push(t);
    }
    for (i, ((tun, udp), send)) in queues.into_iter().zip(sockets).zip(send_sets).enumerate() {
        let fwd = make_core(i, local, Arc::clone(&stats[i]));
        let (routes, done, backend) = (routes.clone(), done_tx.clone(), probe.backend);
        let worker_stop = worker_stop_flag(i, &stop);
        let panic_after = i == 0 && failpoint::armed("worker-panic");
        let t = std::thread::Builder::new()
            .name(format!("weft-worker-{i}"))
            .spawn(move || {
                let span = info_span!("worker", id = i, io = backend.as_str());
                let _g = span.enter();
                let run = std::panic::AssertUnwindSafe(|| {
                    let r =
                        driver::run_worker(backend, WorkerIo { tun, udp, send, offloads }, fwd, routes, worker_stop);
                    if panic_after {
                        #[allow(clippy::panic)] // A test hook: proves a dead worker stops the daemon.
                        {
                            panic!("failpoint worker-panic");
                        }
                    }
                    r
                });
                let end = match std::panic::catch_unwind(run) {
                    Ok(Ok(())) => WorkerEnd::Returned,
                    Ok(Err(e)) => WorkerEnd::Failed(e),
                    Err(p) => WorkerEnd::Panicked(panic_message(p.as_ref())),
                };
                let _ = done.send((i, end));
            })
            .map_err(DaemonError::Thread)?;
        threads.push(t);
    }
    drop(done_tx);
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
        underlay,
        backend: probe.backend,
        fallback_reason: probe.fallback_reason,
        rootless: overlay.as_ref().map(|o| {
            let (userns, netns) = o.ns_paths();
            crate::status::RootlessStatus { userns: userns.display().to_string(), netns: netns.display().to_string() }
        }),
        offloads: vec![
            ("tun_tso", offloads.tun_vnet),
            ("tun_uso", tun_offloads.uso),
            ("udp_gso", offloads.gso),
            ("udp_gro", offloads.gro),
            ("coalesce", offloads.coalesce),
        ],
        routes: routes.clone(),
        stats,
        started,
        reloads: AtomicU64::new(0),
        reload_failures: AtomicU64::new(0),
        lease: lease_view,
        pods: Arc::new(pods),
        leave: leave_tx,
        wireguard: wg_status,
    });
    health.set_state(Arc::clone(&state));
    let mut masq_task = masq_keeper.map(|m| tokio::spawn(m.keep()));
    let mut pending_task = pending::start(Arc::clone(&state)).await;
    let listener =
        api::bind(&cfg.api_socket).map_err(|source| DaemonError::Api { path: cfg.api_socket.clone(), source })?;
    let mut api_task = tokio::spawn(api::serve(listener, Arc::clone(&state)));
    info!(node = %cfg.node_name, subnet = %cfg.subnet, public_ip = %cfg.public_ip, port = cfg.port, workers = cfg.workers,
        backend = wire.kind.as_str(), io = probe.backend.as_str(), api = %cfg.api_socket.display(), "weft ready");

    let mut ctl =
        Control { cfg: &cfg, source: &source, state: &state, mtu, wire, nl: &nl, tun_index, peers: cfg.peers.clone() };
    let (exit, mut outcome) = {
        let mut watched = Watched {
            done: &mut done_rx,
            lease: lease_task.as_mut().map(|(_, t)| t),
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

    stop.store(true, Ordering::Relaxed);
    api_task.abort();
    pending_task.abort();
    if let Some(t) = &masq_task {
        t.abort();
    }
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    if let Some((tx, task)) = lease_task {
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
        for net in cfg.cluster_networks() {
            if let Err(e) = nl.del_fail_closed(net).await {
                warn!(error = %e, "could not remove fail-closed route");
            }
        }
        if overlay.is_none() {
            direct::remove_all(&nl).await;
        }
        if cfg.ip_masq {
            match masq::remove(&masq_table).await {
                Ok(()) => info!(table = %format!("ip {masq_table}"), "masquerade table removed"),
                Err(e) => warn!(error = %e, "could not remove the masquerade table"),
            }
        }
    }
    if let Some(t) = &http_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&cfg.api_socket);
    let s = state.status();
    let dropped: Vec<String> = s.drops.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    let (rx, tx) = s.peers.iter().fold((0, 0), |(r, t), p| (r + p.rx_packets, t + p.tx_packets));
    if left {
        info!(rx_packets = rx, tx_packets = tx, drops = %dropped.join(","), "weft left the cluster; tun and routes removed");
    } else {
        info!(rx_packets = rx, tx_packets = tx, drops = %dropped.join(","), network = %cfg.network,
            "weft stopped; tun removed, fail-closed route kept until weft is back or `weft leave`");
    }
    outcome
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
    mtu: u16,
    wire: Wire,
    nl: &'a Netlink,
    tun_index: u32,
    /// The peers in force (TAP mode reconciles its routes against them on reload).
    peers: Vec<Peer>,
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

/// TAP mode: makes the kernel's per-peer routes (`<peer subnet> via <peer gateway> onlink`)
/// match `new`, removing those of peers in `old` that are gone.
///
/// A route depends on the subnet alone, so only subnets that came or went cost a request.
async fn sync_tap_routes(nl: &Netlink, index: u32, old: &[Peer], new: &[Peer]) -> Result<(), NetlinkError> {
    let before: std::collections::HashSet<ipnet::Ipv4Net> = old.iter().map(|p| p.subnet).collect();
    let after: std::collections::HashSet<ipnet::Ipv4Net> = new.iter().map(|p| p.subnet).collect();
    for s in before.difference(&after) {
        nl.del_onlink_route(IpNet::V4(*s), gateway_of(*s).into(), index).await?;
    }
    for s in after.difference(&before) {
        nl.add_onlink_route(IpNet::V4(*s), gateway_of(*s).into(), index).await?;
    }
    Ok(())
}

/// A node's gateway: the first usable address of its subnet, which its TUN or TAP holds.
fn gateway_of(subnet: ipnet::Ipv4Net) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
}

/// SIGHUP: re-reads the configuration and swaps in a new route table. Anything wrong is
/// logged and the running table is kept; fields that need a restart are named and ignored.
/// Returns whether the new peers were applied.
async fn reload(ctl: &mut Control<'_>) -> bool {
    let (cfg, routes) = (ctl.cfg, &ctl.state.routes);
    let new = match ctl.source.load() {
        Ok(Loaded::Static(c)) if ctl.state.lease.is_none() => *c,
        Ok(Loaded::Lease { .. }) if ctl.state.lease.is_some() => {
            info!("reload: lease mode, peers follow the store; nothing to reload");
            return true;
        }
        Ok(_) => {
            error!("reload refused: switching between static and lease mode needs a restart");
            return false;
        }
        Err(e) => {
            error!(error = %e, "reload refused, keeping the running configuration");
            return false;
        }
    };
    let ignored = cfg.restart_only_changes(&new);
    if !ignored.is_empty() {
        warn!(fields = ?ignored, "reload: these fields need a restart and keep their running values");
    }
    if let Err(e) = control::apply_peers(routes, &new.peers, ctl.mtu, cfg.workers, ctl.wire.source_port_matters) {
        error!(error = %e, "reload refused, keeping the running peers");
        return false;
    }
    let before: std::collections::HashSet<&str> = ctl.peers.iter().map(|p| p.name.as_str()).collect();
    let after: std::collections::HashSet<&str> = new.peers.iter().map(|p| p.name.as_str()).collect();
    for p in new.peers.iter().filter(|p| !before.contains(p.name.as_str())) {
        info!(peer = %p.name, subnet = %p.subnet, endpoint = %p.endpoint, "peer added");
    }
    for p in ctl.peers.iter().filter(|o| !after.contains(o.name.as_str())) {
        info!(peer = %p.name, "peer removed");
    }
    if ctl.wire.tap.is_some() {
        if let Err(e) = sync_tap_routes(ctl.nl, ctl.tun_index, &ctl.peers, &new.peers).await {
            error!(error = %e, "reload: could not update the per-peer routes");
        }
    }
    info!(peers = new.peers.len(), "reloaded");
    ctl.peers = new.peers;
    true
}
