//! Start-up in typed stages, each taking what the one before produced: the underlay the
//! overlay rides on ([`Underlay::discover`]), the data plane's TUN queues and sockets
//! ([`DataPlane::open`]), the control plane that fills the route table, from static peers
//! ([`ControlPlane::start_static`]) or from the lease store ([`ControlPlane::start_leased`]),
//! and the workers that forward ([`Workers::start`]). [`super::run`] strings them together and
//! owns what comes after (the API, the signal loop, shutdown).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, info_span, warn};
use weft_forwarder::driver::udp::OuterChecksum;
use weft_forwarder::driver::{self, DriverError, Offloads, WorkerIo};
use weft_forwarder::wireguard::PublicKey;
use weft_forwarder::{LocalNode, PacketCore, RouteTableHandle, WorkerStats};

use super::control::Peering;
use super::health::Health;
use super::netlink::{Netlink, UnderlayLink};
use super::{
    DaemonError, FLOW_SENDERS_PER_WORKER, LeaseJoin, Signals, Wire, WorkerEnd, failpoint, lease, masq, mtu,
    panic_message, rootless, takeover, wireguard, worker_stop_flag,
};
use crate::config::{Backend, Config};

/// Stage 1: the host interface the overlay rides on, and the overlay MTU it allows.
pub(super) struct Underlay {
    /// The interface that holds `public_ip`.
    pub link: UnderlayLink,
    /// The overlay MTU: the link's less the wire format's overhead, or the configured one.
    pub mtu: u16,
}

impl Underlay {
    /// Installs the fail-closed route first (from here on, pod traffic for the cluster network
    /// is encapsulated or refused, never sent out of the default route; lease mode installed
    /// it already, as soon as it knew the network), takes over from a flannel VTEP on our
    /// VNI and port (as root), then finds the underlay interface and the MTU.
    ///
    /// # Errors
    /// Netlink failures, or an MTU that does not fit the underlay ([`DaemonError::Mtu`]).
    pub async fn discover(cfg: &Config, nl: &Netlink, wire: Wire, rootless: bool) -> Result<Self, DaemonError> {
        for net in cfg.cluster_networks() {
            nl.add_fail_closed(net).await?;
        }
        if let (Backend::Vxlan { vni, .. }, false) = (&cfg.net.backend, rootless) {
            takeover::remove_flannel_vtep(nl, vni.get(), cfg.net.port).await?;
        }
        let link = nl.underlay_for(cfg.node.public_ip).await?;
        let mtu = mtu::overlay_mtu(cfg, &link, wire.kind)?;
        Ok(Self { link, mtu })
    }
}

/// Stage 2: the I/O backend, the TUN (or TAP) queues and the UDP sockets, one set per
/// worker, with the offloads they agreed on; the TUN addressed and routed.
pub(super) struct DataPlane {
    /// The I/O backend the workers run, and why it is not io_uring where it is not.
    pub probe: driver::ProbeResult,
    /// Per worker: its TUN queue, its socket, its flow senders. [`Workers::start`] takes them.
    pub io: Vec<WorkerIo>,
    /// What the TUN offers.
    pub tun_offloads: driver::tun::TunOffloads,
    /// What the workers use.
    pub offloads: Offloads,
    /// The TUN's interface index.
    pub tun_index: u32,
    /// Our subnets, as the forwarder checks them.
    pub local: LocalNode,
}

impl DataPlane {
    /// Probes the I/O backend, opens the TUN queues and binds the sockets, then gives the TUN
    /// its MTU, gateway addresses and the cluster-network routes.
    ///
    /// # Errors
    /// What stops the data plane from existing: no `/dev/net/tun`, no permission, the port
    /// taken, io_uring demanded but refused, netlink failures.
    pub async fn open(
        cfg: &Config,
        nl: &Netlink,
        wire: Wire,
        underlay: &Underlay,
        overlay: Option<&rootless::Overlay>,
    ) -> Result<Self, DaemonError> {
        let probe = probe(cfg, overlay.is_some())?;
        match &probe.fallback_reason {
            Some(reason) => warn!(backend = "mmsg", reason = %reason, "io_uring unavailable, falling back"),
            None => info!(backend = probe.backend.as_str(), "io backend chosen"),
        }
        let queues = open_tun(cfg, wire, overlay)?;
        let tun_offloads = queues.first().map(driver::TunQueue::offloads).unwrap_or_default();
        // A GSO send needs the outer checksum (SO_NO_CHECK + UDP_SEGMENT is EINVAL), so with
        // offloads VXLAN sends checksummed outer UDP, which every receiver accepts.
        let csum = match cfg.net.backend {
            Backend::Vxlan { udp_checksum: false, .. } if !tun_offloads.tso => OuterChecksum::Zero,
            _ => OuterChecksum::On,
        };
        let bind_addr = SocketAddr::new(cfg.node.public_ip, cfg.net.port);
        let sockets = driver::udp::bind(bind_addr, cfg.node.workers, csum).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => DaemonError::AddressInUse(bind_addr),
            io::ErrorKind::PermissionDenied => DaemonError::NotPermitted(format!("bind {bind_addr}: {e}")),
            _ => DaemonError::Bind { addr: bind_addr, source: e },
        })?;
        let senders = if wire.flow_source_port { FLOW_SENDERS_PER_WORKER } else { 0 };
        let mut send_sets = Vec::with_capacity(cfg.node.workers);
        for _ in 0..cfg.node.workers {
            send_sets.push(
                driver::udp::bind_senders(cfg.node.public_ip, senders, csum)
                    .map_err(|e| DaemonError::Bind { addr: SocketAddr::new(cfg.node.public_ip, 0), source: e })?,
            );
        }
        let offloads = choose_offloads(cfg, tun_offloads, &sockets);
        info!(
            tun_tso = offloads.tun_vnet,
            tun_uso = tun_offloads.uso,
            udp_gso = offloads.gso,
            udp_gro = offloads.gro,
            coalesce = offloads.coalesce,
            "offloads"
        );
        let io = queues
            .into_iter()
            .zip(sockets)
            .zip(send_sets)
            .map(|((tun, udp), send)| WorkerIo { tun, udp, send, offloads })
            .collect();

        let local = LocalNode { subnet_v4: Some(cfg.net.subnet), subnet_v6: cfg.net.subnet_v6 };
        let gateways: Vec<IpAddr> =
            local.gateway_v4().map(IpAddr::V4).into_iter().chain(local.gateway_v6().map(IpAddr::V6)).collect();
        let tun_index = nl.link_index(&cfg.node.tun_name).await?;
        nl.configure_tun(tun_index, &cfg.node.tun_name, underlay.mtu, wire.tap, &gateways).await?;
        if wire.tap.is_none() {
            for (net, gw) in cfg.cluster_networks().zip(gateways.iter()) {
                nl.add_device_route(net, tun_index, *gw).await?;
            }
        }
        info!(tun = %cfg.node.tun_name, mtu = underlay.mtu, gateway = ?gateways, underlay = %underlay.link.name,
            underlay_mtu = underlay.link.mtu, "tun configured");
        Ok(Self { probe, io, tun_offloads, offloads, tun_index, local })
    }

    /// The offloads in use, by the names `weft status` reports.
    pub fn offload_names(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("tun_tso", self.offloads.tun_vnet),
            ("tun_uso", self.tun_offloads.uso),
            ("udp_gso", self.offloads.gso),
            ("udp_gro", self.offloads.gro),
            ("coalesce", self.offloads.coalesce),
        ]
    }
}

/// The I/O backend: rootless, io_uring's registered buffers count against the user's
/// `RLIMIT_MEMLOCK`, so a limit too small for them falls back to epoll/recvmmsg unless
/// io_uring was demanded.
fn probe(cfg: &Config, rootless: bool) -> Result<driver::ProbeResult, DaemonError> {
    if !rootless {
        return Ok(driver::probe(cfg.node.io)?);
    }
    match rootless::memlock_allows(cfg.node.workers.saturating_mul(driver::POOL_BYTES)) {
        Ok(()) => Ok(driver::probe(cfg.node.io)?),
        Err(why) if cfg.node.io != driver::IoPreference::Uring => {
            Ok(driver::ProbeResult { backend: driver::Backend::Mmsg, fallback_reason: Some(why) })
        }
        Err(why) => Err(DriverError::UringUnavailable(io::Error::other(why)).into()),
    }
}

/// Opens the TUN (or TAP) with one queue per worker, offloads asked for where the device
/// takes them (a TUN: the TAP path forwards frame by frame).
fn open_tun(
    cfg: &Config,
    wire: Wire,
    overlay: Option<&rootless::Overlay>,
) -> Result<Vec<driver::TunQueue>, DaemonError> {
    let want_offload = cfg.node.offload && wire.tap.is_none();
    let (name, workers, tap) = (cfg.node.tun_name.clone(), cfg.node.workers, wire.tap.is_some());
    let opened = match overlay {
        // A TUN belongs to the namespace of the thread that opened /dev/net/tun.
        Some(o) => o.run(move || driver::tun::open(&name, workers, tap, want_offload))?,
        None => driver::tun::open(&name, workers, tap, want_offload),
    };
    opened.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => DaemonError::NoTunDevice(e),
        io::ErrorKind::PermissionDenied => DaemonError::NotPermitted(format!("create TUN {}: {e}", cfg.node.tun_name)),
        _ => DaemonError::Tun { name: cfg.node.tun_name.clone(), source: e },
    })
}

/// Which offloads the workers use, from what the TUN got, what the sockets accept and the
/// configuration.
fn choose_offloads(cfg: &Config, tun: driver::tun::TunOffloads, sockets: &[std::net::UdpSocket]) -> Offloads {
    let tso = tun.tso;
    let gso = tso && sockets.first().is_some_and(driver::udp::gso_supported);
    let gro = tso
        && cfg.node.gro
        && sockets.iter().all(|s| match driver::udp::enable_gro(s) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "UDP GRO unavailable; receiving one datagram at a time");
                false
            }
        });
    Offloads { tun_vnet: tso, gso, gro, coalesce: tso && cfg.node.gro, tun_uso: tun.uso && cfg.node.gro }
}

/// Masquerade: our table replaced in one transaction; without `ip_masq`, one left by an
/// earlier run (a plain stop keeps it) is removed, so turning it off takes effect. Rootless
/// has no table of its own in the host's firewall to clean.
///
/// # Errors
/// [`DaemonError::Masq`] when the rules cannot be installed.
pub(super) async fn masquerade(
    cfg: &Config,
    rootless: bool,
    health: &Health,
) -> Result<Option<masq::Masq>, DaemonError> {
    let table = masq::table_name(&cfg.node.tun_name);
    if cfg.node.ip_masq {
        let m = masq::Masq::install(table, cfg.net.network, cfg.net.subnet).await?;
        health.set_masq(m.state());
        return Ok(Some(m));
    }
    if !rootless {
        if let Err(e) = masq::remove(&table).await {
            debug!(error = %e, "no masquerade table to remove");
        }
    }
    Ok(None)
}

/// Stage 3: what keeps the route table filled.
pub(super) struct ControlPlane {
    /// The table the workers read.
    pub routes: RouteTableHandle,
    /// Static mode: the peers SIGHUP re-applies. `None` in lease mode, where the lease task
    /// owns them and peers follow the store.
    pub peering: Option<Peering>,
    /// Lease mode: the lease task.
    pub lease: Option<LeaseRun>,
}

/// The running lease task and what the daemon keeps of it.
pub(super) struct LeaseRun {
    /// Tells the task how the daemon ends (stop, or leave).
    pub exit: oneshot::Sender<lease::Exit>,
    /// The task itself.
    pub task: LeaseJoin,
    /// What `weft status` shows of the lease.
    pub view: Arc<Mutex<lease::LeaseView>>,
    /// `release_on_exit`: a clean stop releases the lease like a leave.
    pub release_on_exit: bool,
}

impl ControlPlane {
    /// Static mode: the configured peers, in force before the workers start.
    ///
    /// # Errors
    /// [`DaemonError::Peers`] when they cannot form a table; netlink failures of TAP mode's
    /// per-peer routes.
    pub async fn start_static(cfg: &Config, mut peering: Peering) -> Result<Self, DaemonError> {
        peering.apply(cfg.peers.configured().to_vec()).await?;
        for p in peering.routes().load().peers() {
            info!(peer = %p.name, subnet = ?p.subnet_v4, endpoint = %p.endpoint, "peer added");
        }
        Ok(Self { routes: peering.routes().clone(), peering: Some(peering), lease: None })
    }

    /// Lease mode: writes `subnet.env`, builds the first table from the store's list (or,
    /// started from the lease cache, from the cache) and starts the lease task, which keeps
    /// the lease, the table and the cache current from then on. `Ok(None)`: a stop signal
    /// came before the store answered.
    ///
    /// # Errors
    /// [`DaemonError::SubnetEnv`] when `subnet.env` cannot be written.
    pub async fn start_leased(
        prepared: lease::Prepared,
        cfg: &Config,
        mtu: u16,
        mut peering: Peering,
        signals: &mut Signals,
        public_key: Option<PublicKey>,
        health: &Health,
    ) -> Result<Option<Self>, DaemonError> {
        let env = weft_ipam::SubnetEnv {
            network: cfg.net.network,
            subnet: cfg.net.subnet,
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: u32::from(mtu),
            ipmasq: cfg.node.ip_masq,
        };
        lease::write_subnet_env(&prepared.settings.subnet_file, &env)?;
        health.subnet_env.store(true, Ordering::Relaxed);
        let snapshot = match &prepared.start {
            lease::Start::Held { .. } => {
                let mut stop = Box::pin(signals.stopped());
                // Stopped before the store answered: the fail-closed route stays, as on any stop.
                let Some(snapshot) = lease::first_snapshot(&prepared.store, &mut stop).await else { return Ok(None) };
                Some(snapshot)
            }
            lease::Start::Cached { .. } => None,
        };
        let public_ip = match cfg.node.public_ip {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
        };
        let provisional = matches!(prepared.start, lease::Start::Cached { .. });
        let view = Arc::new(Mutex::new(lease::LeaseView::new(
            cfg.net.subnet,
            prepared.settings.store.kind(),
            provisional,
            prepared.cache_note.clone(),
        )));
        let release_on_exit = prepared.settings.release_on_exit;
        let ctx = lease::LeaseContext {
            subnet_env: (prepared.settings.subnet_file.clone(), env),
            settings: prepared.settings.clone(),
            view: Arc::clone(&view),
        };
        // The first table, before the workers start: from the store's list, or from the cache.
        let rules = lease::rules(&prepared.network, cfg.net.subnet, public_ip, public_key);
        let (keeper, lease, leases) = match prepared.start {
            lease::Start::Held { keeper, lease } => {
                (keeper, Some(lease), snapshot.as_ref().map(|s| s.leases.clone()).unwrap_or_default())
            }
            lease::Start::Cached { keeper, cache } => (keeper, None, cache.peers),
        };
        let peers = lease::first_table(rules, &leases, &mut peering, &ctx).await;
        if let (Some(s), Ok(mut v)) = (&snapshot, view.lock()) {
            v.unreadable_leases = s.unreadable.len();
        }
        let routes = peering.routes().clone();
        let task = lease::LeaseTask {
            store: prepared.store,
            keeper,
            network: prepared.network,
            ours: cfg.net.subnet,
            peers,
            peering,
            snapshot,
            lease,
        };
        let (exit, rx) = oneshot::channel();
        let task = futures::FutureExt::fuse(tokio::spawn(lease::run(task, ctx, rx)));
        Ok(Some(Self { routes, peering: None, lease: Some(LeaseRun { exit, task, view, release_on_exit }) }))
    }
}

/// Stage 4: the forwarding threads, one per TUN queue, and WireGuard's control thread.
pub(super) struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Each thread's end, as `(worker, how)`; WireGuard's control thread reports as worker
    /// number `workers`.
    pub done: mpsc::UnboundedReceiver<(usize, WorkerEnd)>,
    stop: Arc<AtomicBool>,
    /// Each worker's counters.
    pub stats: Vec<Arc<WorkerStats>>,
}

impl Workers {
    /// Starts a worker per entry of `io`, each driving the core `make_core` builds for it
    /// over `routes` with `backend`, and WireGuard's control thread when `wg` is set (it sends
    /// handshakes from our port, through a clone of the first worker's socket; its end stops
    /// the daemon as a worker's would: no handshakes means no sessions).
    ///
    /// # Errors
    /// [`DaemonError::Thread`] when a thread or a socket clone cannot be made.
    pub fn start<C: PacketCore + 'static>(
        io: Vec<WorkerIo>,
        backend: driver::Backend,
        local: LocalNode,
        routes: &RouteTableHandle,
        wg: Option<wireguard::Setup>,
        make_core: impl Fn(usize, LocalNode, Arc<WorkerStats>) -> C,
    ) -> Result<Self, DaemonError> {
        let workers = io.len();
        let stop = Arc::new(AtomicBool::new(false));
        let stats: Vec<Arc<WorkerStats>> = (0..workers).map(|_| Arc::new(WorkerStats::default())).collect();
        let (done_tx, done) = mpsc::unbounded_channel::<(usize, WorkerEnd)>();
        let mut threads = Vec::with_capacity(workers + 1);
        if let Some(setup) = wg {
            let socket = io.first().map(|w| w.udp.try_clone()).transpose().map_err(DaemonError::Thread)?;
            let Some(socket) = socket else { return Err(DaemonError::NotPermitted("wireguard: no socket".into())) };
            let (routes, done, stop) = (routes.clone(), done_tx.clone(), Arc::clone(&stop));
            let t = std::thread::Builder::new()
                .name("weft-wireguard".into())
                .spawn(move || {
                    let run = std::panic::AssertUnwindSafe(|| wireguard::run(setup, socket, routes, &stop));
                    let end = match std::panic::catch_unwind(run) {
                        Ok(Ok(())) => WorkerEnd::Returned,
                        Ok(Err(e)) => WorkerEnd::Failed(DriverError::Loop(e)),
                        Err(p) => WorkerEnd::Panicked(panic_message(p.as_ref())),
                    };
                    let _ = done.send((workers, end));
                })
                .map_err(DaemonError::Thread)?;
            threads.push(t);
        }
        for (i, wio) in io.into_iter().enumerate() {
            let fwd = make_core(i, local, Arc::clone(&stats[i]));
            let (routes, done) = (routes.clone(), done_tx.clone());
            let worker_stop = worker_stop_flag(i, &stop);
            let panic_after = i == 0 && failpoint::armed("worker-panic");
            let t = std::thread::Builder::new()
                .name(format!("weft-worker-{i}"))
                .spawn(move || {
                    let span = info_span!("worker", id = i, io = backend.as_str());
                    let _g = span.enter();
                    let run = std::panic::AssertUnwindSafe(|| {
                        let r = driver::run_worker(backend, wio, fwd, routes, worker_stop);
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
        Ok(Self { threads, done, stop, stats })
    }

    /// Asks every thread to stop and waits for them.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}
