//! Lease mode: the node leases its subnet from the store (flannel's algorithm, in
//! `weft_ipam::LeaseKeeper`) and learns its peers from everyone else's leases.
//!
//! 1. [`open_store`]; read the network config (`weft network init` wrote it).
//! 2. [`acquire`]: run the keeper until it holds a lease, retrying while the store is down;
//!    a stop signal ends the wait.
//! 3. After the data plane is up, [`run`] keeps renewing, follows the store's watch and swaps
//!    the route table on every change. The data plane never waits on the store: while it is
//!    unreachable, the last table stays in force and the keeper retries with backoff.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use ipnet::Ipv4Net;
use tokio::sync::oneshot;
use tracing::{error, info, warn};
use weft_forwarder::RouteTableHandle;
use weft_forwarder::wire::ethernet::MacAddr;
use weft_ipam::{
    AnyStore, FileStore, KeeperConfig, KeeperEvent, KeeperPhase, LeaseAction, LeaseAttrs, LeaseKeeper, LeaseSnapshot,
    LeaseStore, NetworkConfig, StoreError, SubnetEnv, SubnetLease, lease_loop, watch,
};

use super::{DaemonError, control};
use crate::config::{LeaseSettings, Peer, StoreSettings};

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

/// What the lease side hands the rest of the daemon once a lease is held.
pub struct Leased {
    /// The store.
    pub store: AnyStore,
    /// The keeper, holding our lease.
    pub keeper: LeaseKeeper,
    /// The network config read from the store.
    pub network: NetworkConfig,
    /// Our lease.
    pub lease: SubnetLease,
}

/// A random seed from the OS (std's hasher keys are random per process).
fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    h.finish()
}

/// The attributes we publish: our PublicIP and, for VXLAN, flannel's `BackendData`.
pub fn attrs(public_ip: Ipv4Addr, network: &NetworkConfig, vtep_mac: Option<MacAddr>) -> LeaseAttrs {
    let mut a = LeaseAttrs::new(public_ip, network.backend.kind.as_str());
    if let Some(mac) = vtep_mac {
        a.backend_data = serde_json::json!({ "VNI": network.backend.vni(), "VtepMAC": mac.to_string() });
    }
    a
}

/// Reads the network config and runs the keeper until it holds a lease.
///
/// # Errors
/// [`DaemonError::Store`] when the network config is missing or invalid (not worth retrying),
/// [`DaemonError::Stopped`] when `stop` fires first.
pub async fn acquire(
    store: AnyStore,
    settings: &LeaseSettings,
    public_ip: Ipv4Addr,
    vtep_mac: impl Fn(&NetworkConfig) -> Option<MacAddr>,
    stop: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> Result<Leased, DaemonError> {
    let mut warned = false;
    let network = loop {
        match store.get_config().await {
            Ok(n) => break n,
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
    };
    let mut kc = KeeperConfig::new(network.subnet_range(), attrs(public_ip, &network, vtep_mac(&network)));
    kc.previous_subnet = SubnetEnv::read_previous_subnet(&settings.subnet_file);
    kc.ttl = settings.ttl;
    kc.renew_margin = KeeperConfig::DEFAULT_RENEW_MARGIN.min(settings.ttl / 2);
    kc.seed = random_seed();
    let mut keeper = LeaseKeeper::new(kc);
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
                _ = lease_loop::execute(&mut keeper, &store, action, SystemTime::now) => {}
                _ = &mut *stop => return Err(DaemonError::Stopped),
            },
        }
        while let Some(ev) = keeper.poll_event() {
            match ev {
                KeeperEvent::Acquired { lease, source } => {
                    info!(subnet = %lease.subnet, public_ip = %lease.attrs.public_ip, source = ?source,
                        ttl_secs = settings.ttl.as_secs(), "lease acquired");
                    return Ok(Leased { store, keeper, network, lease });
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
}

impl LeaseView {
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
        self.store_up = st.failures == 0;
        self.renew_failures = st.failures;
        self.last_error = st.last_error;
        self.ready = st.ready;
    }
}

/// Called with (old, new) peers after each change: TAP mode reconciles its per-peer routes.
pub type PeersChanged = Box<dyn Fn(Vec<Peer>, Vec<Peer>) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// Everything the lease task needs from the daemon.
pub struct LeaseContext {
    /// The route table to keep up to date.
    pub routes: RouteTableHandle,
    /// Our overlay MTU.
    pub mtu: u16,
    /// Workers (counter slots per peer).
    pub workers: usize,
    /// The wire format's peer identity rule.
    pub source_port_matters: bool,
    /// Port peers listen on.
    pub port: u16,
    /// Our public IP.
    pub public_ip: Ipv4Addr,
    /// Backend type name and, for VXLAN, our VNI.
    pub backend: (String, Option<u32>),
    /// Where `subnet.env` is written, and its contents.
    pub subnet_env: (std::path::PathBuf, SubnetEnv),
    /// Release the lease on the way out.
    pub release_on_exit: bool,
    /// Shared status.
    pub view: Arc<Mutex<LeaseView>>,
    /// TAP mode: called with (old, new) peers to reconcile per-peer kernel routes.
    pub on_peers: Option<PeersChanged>,
}

/// The peers a set of leases describes: everyone but us, with our backend, reachable at their
/// PublicIP and the network's port, VXLAN peers with the VtepMAC they published.
pub fn peers_from_leases(known: &BTreeMap<Ipv4Net, SubnetLease>, ours: Ipv4Net, ctx: &LeaseContext) -> Vec<Peer> {
    let (kind, vni) = (&ctx.backend.0, ctx.backend.1);
    known
        .values()
        .filter(|l| l.subnet != ours && l.attrs.public_ip != ctx.public_ip)
        .filter_map(|l| {
            let name = l.key().to_string();
            if l.attrs.backend_type != *kind {
                warn!(peer = %name, theirs = %l.attrs.backend_type, ours = %kind, "peer speaks another backend; ignored");
                return None;
            }
            let mac = match vni {
                None => None,
                Some(ours_vni) => {
                    let data = &l.attrs.backend_data;
                    let theirs_vni = data.get("VNI").and_then(serde_json::Value::as_u64);
                    let mac = data.get("VtepMAC").and_then(serde_json::Value::as_str).and_then(|m| m.parse().ok());
                    if theirs_vni.is_some_and(|v| v != u64::from(ours_vni)) || mac.is_none() {
                        warn!(peer = %name, data = %data, "vxlan peer without a usable VNI/VtepMAC; ignored");
                        return None;
                    }
                    mac
                }
            };
            Some(Peer {
                name,
                subnet: l.subnet,
                subnet_v6: None,
                endpoint: SocketAddr::new(IpAddr::V4(l.attrs.public_ip), ctx.port),
                mac,
                mtu: None,
            })
        })
        .collect()
}

/// Swaps in the table for `known` (used once before the workers start).
pub fn peers_now(known: &BTreeMap<Ipv4Net, SubnetLease>, ours: Ipv4Net, ctx: &LeaseContext) -> Vec<Peer> {
    apply(known, ours, ctx)
}

/// Swaps in the table for `known`; returns the peers now in force.
fn apply(known: &BTreeMap<Ipv4Net, SubnetLease>, ours: Ipv4Net, ctx: &LeaseContext) -> Vec<Peer> {
    let peers = peers_from_leases(known, ours, ctx);
    let old = ctx.routes.load_full();
    let (table, kept) = control::build_table_lenient(&peers, ctx.mtu, ctx.workers, Some(&old), ctx.source_port_matters);
    for p in table.peers().iter().filter(|p| !old.peers().iter().any(|o| o.name == p.name)) {
        info!(peer = %p.name, endpoint = %p.endpoint, "peer added");
    }
    for p in old.peers().iter().filter(|o| !table.peers().iter().any(|p| p.name == o.name)) {
        info!(peer = %p.name, "peer removed");
    }
    ctx.routes.store(table);
    kept
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

/// Keeps the lease and the route table current until `stop` fires; then releases the lease if
/// asked to. Never returns early because of the store: outages are retried.
pub async fn run(mut leased: Leased, snapshot: LeaseSnapshot, ctx: LeaseContext, mut stop: oneshot::Receiver<()>) {
    let ours = leased.lease.subnet;
    let mut known: BTreeMap<Ipv4Net, SubnetLease> = snapshot.leases.iter().map(|l| (l.subnet, l.clone())).collect();
    let mut peers = apply(&known, ours, &ctx);
    if let Some(f) = &ctx.on_peers {
        f(Vec::new(), peers.clone()).await;
    }
    let mut watch = Box::pin(leased.store.watch(&snapshot));
    let mut watch_down = false;
    if let Ok(mut v) = ctx.view.lock() {
        v.known_leases = known.len();
        v.update(&leased.keeper, SystemTime::now());
    }
    loop {
        let now = SystemTime::now();
        match leased.keeper.poll(now) {
            LeaseAction::WaitUntil(t) => {
                let wait = t.duration_since(now).unwrap_or_default();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    item = watch.next() => match item {
                        Some(Ok(batch)) => {
                            if watch_down {
                                info!("lease watch recovered");
                                watch_down = false;
                            }
                            for e in &batch.events {
                                leased.keeper.on_lease_event(e, SystemTime::now());
                            }
                            watch::apply(&mut known, &batch.events);
                            let new = apply(&known, ours, &ctx);
                            if let Some(f) = &ctx.on_peers {
                                f(peers.clone(), new.clone()).await;
                            }
                            peers = new;
                            if let Ok(mut v) = ctx.view.lock() {
                                v.known_leases = known.len();
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
                                _ = &mut stop => break,
                            }
                        }
                    },
                    _ = &mut stop => break,
                }
            }
            action => tokio::select! {
                _ = lease_loop::execute(&mut leased.keeper, &leased.store, action, SystemTime::now) => {}
                _ = &mut stop => break,
            },
        }
        while let Some(ev) = leased.keeper.poll_event() {
            if let KeeperEvent::Acquired { lease, .. } = &ev {
                if lease.subnet != ours {
                    error!(old = %ours, new = %lease.subnet, "lease moved to another subnet; restart weft to use it");
                }
                if let Err(e) = ctx.subnet_env.1.write(&ctx.subnet_env.0) {
                    error!(path = %ctx.subnet_env.0.display(), error = %e, "cannot rewrite subnet.env");
                }
            }
            log_event(&ev);
        }
        if let Ok(mut v) = ctx.view.lock() {
            v.update(&leased.keeper, SystemTime::now());
        }
    }
    if ctx.release_on_exit {
        if let Some(l) = leased.keeper.release() {
            match leased.store.release(&l).await {
                Ok(_) => info!(subnet = %l.subnet, "lease released"),
                Err(e) => warn!(subnet = %l.subnet, error = %e, "could not release the lease; it will expire"),
            }
        }
    }
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
    use weft_ipam::Revision;

    fn lease(subnet: &str, ip: [u8; 4], backend: &str, data: serde_json::Value) -> SubnetLease {
        let mut attrs = LeaseAttrs::new(Ipv4Addr::from(ip), backend);
        attrs.backend_data = data;
        SubnetLease { subnet: subnet.parse().unwrap(), attrs, expiration: None, created: Revision(0) }
    }

    fn ctx(backend: &str, vni: Option<u32>) -> LeaseContext {
        LeaseContext {
            routes: RouteTableHandle::new(weft_forwarder::RouteTable::empty(false)),
            mtu: 1450,
            workers: 1,
            source_port_matters: false,
            port: 8472,
            public_ip: Ipv4Addr::new(198, 18, 0, 1),
            backend: (backend.into(), vni),
            subnet_env: (
                "/nonexistent".into(),
                SubnetEnv {
                    network: "10.244.0.0/16".parse().unwrap(),
                    subnet: "10.244.1.0/24".parse().unwrap(),
                    ipv6_network: None,
                    ipv6_subnet: None,
                    mtu: 1450,
                    ipmasq: false,
                },
            ),
            release_on_exit: false,
            view: Arc::new(Mutex::new(LeaseView {
                subnet: String::new(),
                phase: String::new(),
                expires_in_secs: None,
                store: "file".into(),
                store_up: true,
                renew_failures: 0,
                last_error: None,
                ready: true,
                known_leases: 0,
                resyncs: 0,
            })),
            on_peers: None,
        }
    }

    #[test]
    fn leases_map_to_peers_and_bad_records_are_left_out() {
        let vx = |mac: &str| serde_json::json!({"VNI": 1, "VtepMAC": mac});
        let known: BTreeMap<Ipv4Net, SubnetLease> = [
            lease("10.244.1.0/24", [198, 18, 0, 1], "vxlan", vx("02:00:00:00:00:01")), // ours
            lease("10.244.2.0/24", [198, 18, 0, 2], "vxlan", vx("02:00:00:00:00:02")),
            lease("10.244.3.0/24", [198, 18, 0, 3], "udp", serde_json::Value::Null), // other backend
            lease("10.244.4.0/24", [198, 18, 0, 4], "vxlan", serde_json::json!({"VNI": 1})), // no MAC
            lease("10.244.5.0/24", [198, 18, 0, 5], "vxlan", vx("02:00:00:00:00:05")),
            lease(
                "10.244.6.0/24",
                [198, 18, 0, 6],
                "vxlan",
                serde_json::json!({"VNI": 2, "VtepMAC": "02:00:00:00:00:06"}),
            ),
        ]
        .into_iter()
        .map(|l| (l.subnet, l))
        .collect();
        let c = ctx("vxlan", Some(1));
        let peers = peers_from_leases(&known, "10.244.1.0/24".parse().unwrap(), &c);
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["10.244.2.0-24", "10.244.5.0-24"]);
        assert_eq!(peers[0].endpoint, "198.18.0.2:8472".parse().unwrap());
        assert_eq!(peers[0].mac, Some("02:00:00:00:00:02".parse().unwrap()));
        let kept = peers_now(&known, "10.244.1.0/24".parse().unwrap(), &c);
        assert_eq!(kept.len(), 2);
        assert_eq!(c.routes.load().peers().len(), 2);
    }
}
