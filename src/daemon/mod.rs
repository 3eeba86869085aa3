//! `weft run`: start-up, the signal loop and shutdown.
//!
//! Start-up order: validated config → (lease mode: store, network config, lease) → netlink
//! (underlay interface, MTU) → I/O backend probe → TUN queues → UDP sockets → TUN address,
//! link and routes → (lease mode: `subnet.env`, peers from the store) → route table →
//! workers → API socket. In static mode SIGHUP re-reads the peers and swaps the route table
//! while traffic flows; in lease mode peers follow the store. SIGTERM or SIGINT stop the
//! workers, remove the routes and the TUN, optionally release the lease, and log the counters.

pub mod api;
pub mod control;
pub mod lease;
pub mod netlink;
pub mod pending;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use ipnet::IpNet;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{error, info, info_span, warn};
use weft_forwarder::driver::udp::OuterChecksum;
use weft_forwarder::driver::{self, DriverError, Offloads, WorkerIo};
use weft_forwarder::wire::ethernet::MacAddr;
use weft_forwarder::{
    Bridge, Encap, EncapKind, Forwarder, LocalNode, PacketCore, RouteError, RouteTableHandle, UdpEncap, VxlanEncap,
    WorkerStats,
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
    /// The overlay MTU does not fit the underlay.
    #[error("mtu: {0}")]
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
            Self::Driver(DriverError::UringUnavailable(_)) => 6,
            _ => 1,
        }
    }
}

/// Where a reload reads its configuration from: the file again, with the same flags on top.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    /// The config file, if any.
    pub path: Option<PathBuf>,
    /// Flag overrides.
    pub flags: RawConfig,
}

impl ConfigSource {
    /// Reads and validates the configuration.
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        let file = match &self.path {
            Some(p) => RawConfig::from_file(p)?,
            None => RawConfig::default(),
        };
        Loaded::from_raw(file.merge(self.flags.clone()))
    }
}

/// Runs the daemon until SIGTERM/SIGINT or a worker failure.
///
/// # Errors
/// [`DaemonError`] when start-up fails or a worker dies.
pub async fn run(source: ConfigSource) -> Result<(), DaemonError> {
    let mut signals = Signals::new()?;
    let (cfg, leased) = match source.load()? {
        Loaded::Static(cfg) => (*cfg, None),
        Loaded::Lease { raw, lease: settings } => {
            let public_ip = match raw.public_ip.as_deref().map(str::parse::<std::net::IpAddr>) {
                Some(Ok(std::net::IpAddr::V4(ip))) => ip,
                _ => {
                    return Err(ConfigError::Invalid {
                        field: "public_ip".into(),
                        message: "lease mode needs an IPv4 public_ip (flannel's lease record holds one)".into(),
                    }
                    .into());
                }
            };
            let store = lease::open_store(&settings.store).await?;
            let vtep = |n: &weft_ipam::NetworkConfig| match n.backend.kind {
                weft_ipam::BackendKind::Vxlan => Some(match raw.vtep_mac.as_deref().map(str::parse::<MacAddr>) {
                    Some(Ok(m)) => m,
                    _ => crate::config::derived_vtep_mac(raw.node_name.as_deref().unwrap_or_default()),
                }),
                _ => None,
            };
            let mut stop = Box::pin(signals.stopped());
            let leased = lease::acquire(store, &settings, public_ip, vtep, &mut stop).await?;
            drop(stop);
            let n = &leased.network;
            let vni = matches!(n.backend.kind, weft_ipam::BackendKind::Vxlan).then(|| n.backend.vni());
            let cfg = crate::config::resolve_leased(
                &raw,
                n.network,
                n.backend.kind.as_str(),
                n.backend.port(),
                vni,
                leased.lease.subnet,
            )?;
            (cfg, Some((leased, settings)))
        }
    };
    // The mode is chosen once here; everything below is monomorphised per core, so the data
    // path has no dynamic dispatch.
    match (cfg.backend, cfg.device) {
        (Backend::Udp, Device::Tun) => {
            run_with(Wire::of::<UdpEncap>(None), cfg, source, leased, signals, |i, local, stats| {
                Forwarder::new(UdpEncap, local, i, stats)
            })
            .await
        }
        (Backend::Vxlan { vni, vtep_mac, .. }, Device::Tun) => {
            run_with(Wire::of::<VxlanEncap>(None), cfg, source, leased, signals, move |i, local, stats| {
                Forwarder::new(VxlanEncap::new(vni, vtep_mac), local, i, stats)
            })
            .await
        }
        (Backend::Vxlan { vni, vtep_mac, .. }, Device::Tap) => {
            run_with(Wire::of::<VxlanEncap>(Some(vtep_mac)), cfg, source, leased, signals, move |i, local, stats| {
                Bridge::new(vni, vtep_mac, local, i, stats)
            })
            .await
        }
        (Backend::Udp, Device::Tap) => Err(ConfigError::Invalid {
            field: "device".into(),
            message: "\"tap\" needs backend = \"vxlan\" (udp carries IP packets only)".into(),
        }
        .into()),
    }
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
    cfg: Config,
    source: ConfigSource,
    leased: Option<(lease::Leased, crate::config::LeaseSettings)>,
    mut signals: Signals,
    make_core: impl Fn(usize, LocalNode, Arc<WorkerStats>) -> C,
) -> Result<(), DaemonError> {
    let started = Instant::now();
    let nl = Netlink::connect()?;
    let underlay = nl.underlay_for(cfg.public_ip).await?;
    let max_mtu = underlay.mtu.saturating_sub(wire.kind.overhead(cfg.public_ip.is_ipv6()) as u32);
    let max_mtu = u16::try_from(max_mtu).unwrap_or(u16::MAX);
    let mtu = match cfg.mtu {
        Some(m) if m > max_mtu => {
            return Err(DaemonError::Mtu(format!(
                "{m} exceeds what {} (MTU {}) carries after {} bytes of {} encapsulation: at most {max_mtu}",
                underlay.name,
                underlay.mtu,
                wire.kind.overhead(cfg.public_ip.is_ipv6()),
                wire.kind.as_str()
            )));
        }
        Some(m) => m,
        None => max_mtu,
    };
    if mtu < 576 || (cfg.subnet_v6.is_some() && mtu < 1280) {
        return Err(DaemonError::Mtu(format!(
            "underlay {} has MTU {}, leaving only {mtu} for the overlay",
            underlay.name, underlay.mtu
        )));
    }
    let probe = driver::probe(cfg.io)?;
    match &probe.fallback_reason {
        Some(reason) => warn!(backend = "mmsg", reason = %reason, "io_uring unavailable, falling back"),
        None => info!(backend = probe.backend.as_str(), "io backend chosen"),
    }

    // Offloads need a TUN (the TAP path forwards frame by frame); both I/O backends use them.
    let want_offload = cfg.offload && wire.tap.is_none();
    let queues =
        driver::tun::open(&cfg.tun_name, cfg.workers, wire.tap.is_some(), want_offload).map_err(|e| {
            match e.kind() {
                io::ErrorKind::NotFound => DaemonError::NoTunDevice(e),
                io::ErrorKind::PermissionDenied => {
                    DaemonError::NotPermitted(format!("create TUN {}: {e}", cfg.tun_name))
                }
                _ => DaemonError::Tun { name: cfg.tun_name.clone(), source: e },
            }
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
    for (net, gw) in cfg.cluster_networks().zip(gateways.iter()) {
        if wire.tap.is_none() {
            nl.add_device_route(net, tun_index, *gw).await?;
        }
        nl.add_fail_closed(net).await?;
    }
    if wire.tap.is_some() {
        sync_tap_routes(&nl, tun_index, &[], &cfg.peers).await?;
    }
    info!(tun = %cfg.tun_name, mtu, gateway = ?gateways, underlay = %underlay.name, underlay_mtu = underlay.mtu, "tun configured");

    // Lease mode: subnet.env, and the leases the store holds, before anyone is told we are up.
    let mut lease_parts = None;
    if let Some((leased, settings)) = leased {
        let env = weft_ipam::SubnetEnv {
            network: cfg.network,
            subnet: cfg.subnet,
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: u32::from(mtu),
            ipmasq: false,
        };
        lease::write_subnet_env(&settings.subnet_file, &env)?;
        let snapshot = {
            let mut stop = Box::pin(signals.stopped());
            lease::first_snapshot(&leased.store, &mut stop).await
        };
        let Some(snapshot) = snapshot else {
            for net in cfg.cluster_networks() {
                let _ = nl.del_fail_closed(net).await;
            }
            return Ok(());
        };
        lease_parts = Some((leased, settings, snapshot, env));
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
    if let Some((leased, settings, snapshot, env)) = lease_parts {
        let view = Arc::new(std::sync::Mutex::new(lease::LeaseView {
            subnet: cfg.subnet.to_string(),
            phase: "held".into(),
            expires_in_secs: None,
            store: settings.store.kind().into(),
            store_up: true,
            renew_failures: 0,
            last_error: None,
            ready: true,
            known_leases: snapshot.leases.len(),
            resyncs: 0,
        }));
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
        let ctx = lease::LeaseContext {
            routes: routes.clone(),
            mtu,
            workers: cfg.workers,
            source_port_matters: wire.source_port_matters,
            port: cfg.port,
            public_ip: match cfg.public_ip {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
            },
            backend: (
                cfg.backend.as_str().to_string(),
                match cfg.backend {
                    Backend::Vxlan { vni, .. } => Some(vni.get()),
                    Backend::Udp => None,
                },
            ),
            subnet_env: (settings.subnet_file.clone(), env),
            release_on_exit: settings.release_on_exit,
            view: Arc::clone(&view),
            on_peers,
        };
        // The first table from the snapshot, before the workers start.
        let known = snapshot.leases.iter().map(|l| (l.subnet, l.clone())).collect();
        let _ = lease::peers_now(&known, cfg.subnet, &ctx);
        let (tx, rx) = tokio::sync::oneshot::channel();
        lease_task = Some((tx, tokio::spawn(lease::run(leased, snapshot, ctx, rx))));
        lease_view = Some(view);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stats: Vec<Arc<WorkerStats>> = (0..cfg.workers).map(|_| Arc::new(WorkerStats::default())).collect();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, Result<(), DriverError>)>();
    let mut threads = Vec::with_capacity(cfg.workers);
    for (i, ((tun, udp), send)) in queues.into_iter().zip(sockets).zip(send_sets).enumerate() {
        let fwd = make_core(i, local, Arc::clone(&stats[i]));
        let (routes, stop, done, backend) = (routes.clone(), Arc::clone(&stop), done_tx.clone(), probe.backend);
        let t = std::thread::Builder::new()
            .name(format!("weft-worker-{i}"))
            .spawn(move || {
                let span = info_span!("worker", id = i, io = backend.as_str());
                let _g = span.enter();
                let r = driver::run_worker(backend, WorkerIo { tun, udp, send, offloads }, fwd, routes, stop);
                let _ = done.send((i, r));
            })
            .map_err(DaemonError::Thread)?;
        threads.push(t);
    }
    drop(done_tx);

    let state = Arc::new(api::ApiState {
        cfg: cfg.clone(),
        mtu,
        underlay,
        backend: probe.backend,
        fallback_reason: probe.fallback_reason,
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
    });
    let pending_task = pending::start(Arc::clone(&state)).await;
    let listener =
        api::bind(&cfg.api_socket).map_err(|source| DaemonError::Api { path: cfg.api_socket.clone(), source })?;
    let api_task = tokio::spawn(api::serve(listener, Arc::clone(&state)));
    info!(node = %cfg.node_name, subnet = %cfg.subnet, public_ip = %cfg.public_ip, port = cfg.port, workers = cfg.workers,
        backend = wire.kind.as_str(), io = probe.backend.as_str(), api = %cfg.api_socket.display(), "weft ready");

    let mut ctl =
        Control { cfg: &cfg, source: &source, state: &state, mtu, wire, nl: &nl, tun_index, peers: cfg.peers.clone() };
    let outcome = signal_loop(&mut ctl, &mut signals, &mut done_rx).await;

    stop.store(true, Ordering::Relaxed);
    api_task.abort();
    pending_task.abort();
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    if let Some((tx, task)) = lease_task {
        let _ = tx.send(());
        let _ = task.await;
    }
    // The TUN (and with it its address and device route) vanished with the last queue.
    for net in cfg.cluster_networks() {
        if let Err(e) = nl.del_fail_closed(net).await {
            warn!(error = %e, "could not remove fail-closed route");
        }
    }
    let _ = std::fs::remove_file(&cfg.api_socket);
    let s = state.status();
    let dropped: Vec<String> = s.drops.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    let (rx, tx) = s.peers.iter().fold((0, 0), |(r, t), p| (r + p.rx_packets, t + p.tx_packets));
    info!(rx_packets = rx, tx_packets = tx, drops = %dropped.join(","), "weft stopped; tun and routes removed");
    outcome
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

/// Waits for signals and worker exits; returns when the daemon should stop.
async fn signal_loop(
    ctl: &mut Control<'_>,
    signals: &mut Signals,
    done: &mut mpsc::UnboundedReceiver<(usize, Result<(), DriverError>)>,
) -> Result<(), DaemonError> {
    let Signals { hup, term, int } = signals;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let counter = if reload(ctl).await { &ctl.state.reloads } else { &ctl.state.reload_failures };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            _ = term.recv() => { info!("SIGTERM: stopping"); return Ok(()) }
            _ = int.recv() => { info!("SIGINT: stopping"); return Ok(()) }
            Some((i, r)) = done.recv() => {
                return match r {
                    Ok(()) => Ok(()),
                    Err(e) => { error!(worker = i, error = %e, "worker failed; stopping"); Err(e.into()) }
                };
            }
        }
    }
}

/// TAP mode: makes the kernel's per-peer routes (`<peer subnet> via <peer gateway> onlink`)
/// match `new`, removing those of peers in `old` that are gone.
async fn sync_tap_routes(nl: &Netlink, index: u32, old: &[Peer], new: &[Peer]) -> Result<(), NetlinkError> {
    for p in old.iter().filter(|o| !new.iter().any(|n| n.subnet == o.subnet)) {
        nl.del_onlink_route(IpNet::V4(p.subnet), gateway_of(p.subnet).into(), index).await?;
    }
    for p in new {
        nl.add_onlink_route(IpNet::V4(p.subnet), gateway_of(p.subnet).into(), index).await?;
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
    let old = routes.load_full();
    let table = match control::build_table(&new.peers, ctl.mtu, cfg.workers, Some(&old), ctl.wire.source_port_matters) {
        Ok(t) => t,
        Err(e) => {
            error!(error = %e, "reload refused, keeping the running peers");
            return false;
        }
    };
    for p in table.peers().iter().filter(|p| !old.peers().iter().any(|o| o.name == p.name)) {
        info!(peer = %p.name, subnet = ?p.subnet_v4, endpoint = %p.endpoint, "peer added");
    }
    for p in old.peers().iter().filter(|o| !table.peers().iter().any(|p| p.name == o.name)) {
        info!(peer = %p.name, "peer removed");
    }
    routes.store(table);
    if ctl.wire.tap.is_some() {
        if let Err(e) = sync_tap_routes(ctl.nl, ctl.tun_index, &ctl.peers, &new.peers).await {
            error!(error = %e, "reload: could not update the per-peer routes");
        }
    }
    info!(peers = new.peers.len(), "reloaded");
    ctl.peers = new.peers;
    true
}
