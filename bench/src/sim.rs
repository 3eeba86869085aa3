//! Simulated nodes: each acquires a subnet lease the way `weft run` does, with the real
//! [`LeaseKeeper`] (list, reuse by PublicIP, else a random one of the first 100 free subnets,
//! create-if-absent, re-list on a lost race) driven by [`lease_loop::execute`] against a real
//! [`EtcdStore`]. What is left out is everything after the lease: no TUN, no watch, no renewals
//! (the TTL is flannel's 24 h, so none falls due during a run).
//!
//! Simulated node `i` has PublicIP `198.19.<i / 250>.<i % 250 + 1>` (RFC 2544 space, never a
//! real host; nothing is ever sent there).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use futures::StreamExt as _;
use ipnet::Ipv4Net;
use weft_ipam::lease_loop;
use weft_ipam::{
    EtcdOptions, EtcdStore, KeeperConfig, KeeperEvent, LeaseAction, LeaseAttrs, LeaseKeeper, LeaseStore, NetworkConfig,
    SubnetRange,
};

/// How the simulated nodes reach etcd.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ClientMode {
    /// One [`EtcdStore`] (two HTTP/2 connections) multiplexes every simulated node. The bench
    /// then measures etcd and the lease algorithm, not the bench host's ability to open
    /// thousands of TCP + HTTP/2 connections on 2 cores. Request counts are the same either way.
    Shared,
    /// Each simulated node connects its own [`EtcdStore`] and drops it once it holds its lease:
    /// a boot storm's connection churn, paid inside each node's acquire latency.
    PerNode,
}

impl ClientMode {
    /// `shared` or `per-node`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::PerNode => "per-node",
        }
    }
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// Key prefix (flannel's by default).
    pub prefix: String,
    /// How many simulated nodes.
    pub nodes: usize,
    /// How many acquire at the same time (a bounded boot storm).
    pub concurrency: usize,
    /// Shared client or one per node.
    pub client_mode: ClientMode,
    /// Base of the per-node RNG seeds (subnet pick, retry jitter).
    pub seed: u64,
    /// Give up after this long.
    pub timeout: Duration,
}

/// One simulated node's acquisition.
#[derive(Clone, Debug)]
pub struct NodeResult {
    /// Its PublicIP.
    pub public_ip: Ipv4Addr,
    /// The subnet it got.
    pub subnet: Ipv4Net,
    /// From the start of its acquisition (connecting included in per-node mode) to holding it.
    pub latency: Duration,
    /// When it got the lease, from the start of the run.
    pub acquired_at: Duration,
    /// `list` calls it made (1 unless it lost a create race or the store failed).
    pub lists: u32,
    /// `create` calls it made (more than 1: lost races).
    pub creates: u32,
    /// Times its keeper backed off before retrying: after a store error, or after the fifth
    /// lost create race in a row.
    pub backoffs: u32,
    /// The first store error it saw, if any.
    pub first_error: Option<String>,
}

/// The whole run.
#[derive(Clone, Debug)]
pub struct SimResult {
    /// When the first node started acquiring (clients connected, config read).
    pub started: Instant,
    /// Every node, in completion order.
    pub nodes: Vec<NodeResult>,
}

impl SimResult {
    /// When the last node got its lease, from the start.
    pub fn last_acquired(&self) -> Duration {
        self.nodes.iter().map(|n| n.acquired_at).max().unwrap_or_default()
    }
}

/// Simulated node `i`'s PublicIP: `198.19.<i / 250>.<i % 250 + 1>`.
pub fn public_ip(i: usize) -> Ipv4Addr {
    let hi = u8::try_from(i / 250).unwrap_or(u8::MAX);
    let lo = u8::try_from(i % 250 + 1).unwrap_or(u8::MAX);
    Ipv4Addr::new(198, 19, hi, lo)
}

/// Writes `config` as the network config (what `weft network init` does), for runs without a
/// weft binary.
///
/// # Errors
///
/// Fails if etcd cannot be reached.
pub async fn put_config(endpoints: &[String], prefix: &str, config: &NetworkConfig) -> Result<()> {
    let store = connect(endpoints, prefix).await?;
    store.put_config(config).await.context("writing the network config")
}

async fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore> {
    let mut options = EtcdOptions::new(endpoints.iter().cloned());
    options.prefix = prefix.to_owned();
    EtcdStore::connect(options).await.context("connecting to etcd")
}

/// Runs the simulation on a new multi-threaded tokio runtime (2 workers), calling `on_start`
/// with the start instant once the clients are connected and the network config is read.
///
/// # Errors
///
/// Fails if etcd is unreachable, the config is missing, the range is full, or the run exceeds
/// its timeout.
pub fn run_blocking(config: &SimConfig, on_start: impl FnOnce(Instant)) -> Result<SimResult> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(run(config, on_start))
}

/// The simulation itself; see [`run_blocking`].
///
/// # Errors
///
/// As [`run_blocking`].
pub async fn run(config: &SimConfig, on_start: impl FnOnce(Instant)) -> Result<SimResult> {
    let shared = connect(&config.endpoints, &config.prefix).await?;
    let network = shared.get_config().await.context("reading the network config")?;
    let range = network.subnet_range();
    if range.count() < config.nodes as u64 + 1 {
        bail!(
            "{} holds {} subnets, too few for {} simulated nodes and the daemon",
            network.network,
            range.count(),
            config.nodes
        );
    }
    let started = Instant::now();
    on_start(started);
    let deadline = started + config.timeout;
    let shared = &shared;
    let results: Vec<Result<NodeResult>> = futures::stream::iter(0..config.nodes)
        .map(|i| async move {
            let t0 = Instant::now();
            let seed = config.seed.wrapping_add(i as u64);
            let mut r = match config.client_mode {
                ClientMode::Shared => acquire(shared, range, public_ip(i), seed, deadline).await,
                ClientMode::PerNode => {
                    let own = connect(&config.endpoints, &config.prefix).await?;
                    acquire(&own, range, public_ip(i), seed, deadline).await
                }
            }?;
            r.latency = t0.elapsed();
            r.acquired_at = started.elapsed();
            Ok(r)
        })
        .buffer_unordered(config.concurrency.max(1))
        .collect()
        .await;
    let nodes = results.into_iter().collect::<Result<Vec<_>>>()?;
    Ok(SimResult { started, nodes })
}

/// One node's acquisition: the daemon's lease loop until the keeper reports `Acquired`.
async fn acquire(
    store: &EtcdStore,
    range: SubnetRange,
    ip: Ipv4Addr,
    seed: u64,
    deadline: Instant,
) -> Result<NodeResult> {
    let mut config = KeeperConfig::new(range, LeaseAttrs::new(ip, "udp"));
    config.seed = seed;
    let mut keeper = LeaseKeeper::new(config);
    let (mut lists, mut creates, mut backoffs, mut failures) = (0u32, 0u32, 0u32, 0u32);
    let mut first_error = None;
    loop {
        if Instant::now() > deadline {
            bail!("{ip}: no lease before the deadline ({:?})", keeper.status(SystemTime::now()));
        }
        let action = keeper.poll(SystemTime::now());
        match &action {
            LeaseAction::WaitUntil(t) => {
                tokio::time::sleep(t.duration_since(SystemTime::now()).unwrap_or_default()).await;
                continue;
            }
            LeaseAction::List => lists += 1,
            LeaseAction::Create(_) => creates += 1,
            LeaseAction::Renew(_) | LeaseAction::Release(_) => {}
        }
        lease_loop::execute(&mut keeper, store, action, SystemTime::now).await;
        let status = keeper.status(SystemTime::now());
        if status.failures > failures {
            backoffs += 1;
            first_error = first_error.or(status.last_error);
        }
        failures = status.failures;
        while let Some(event) = keeper.poll_event() {
            match event {
                KeeperEvent::Acquired { lease, .. } => {
                    return Ok(NodeResult {
                        public_ip: ip,
                        subnet: lease.subnet,
                        latency: Duration::ZERO,
                        acquired_at: Duration::ZERO,
                        lists,
                        creates,
                        backoffs,
                        first_error,
                    });
                }
                KeeperEvent::NoFreeSubnet => bail!("{ip}: no free subnet"),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ips_are_distinct_and_in_benchmark_space() {
        let ips: std::collections::BTreeSet<Ipv4Addr> = (0..5000).map(public_ip).collect();
        assert_eq!(ips.len(), 5000);
        for ip in ips {
            let [a, b, _, d] = ip.octets();
            assert_eq!((a, b), (198, 19));
            assert!((1..=250).contains(&d));
        }
    }
}
