//! `lease-scale`: how weft's lease control plane scales with the number of nodes.
//!
//! For each size N, in a fresh lab of network namespaces (nothing leaves them):
//!
//! ```text
//! ┌─ n1 ─────────────────────┐  ┌─ sim ────────────────────────┐  ┌─ etcd ──────────────────┐
//! │ weft run (lease mode,    │  │ this process, one thread      │  │ etcd 3.4, own data dir  │
//! │ store etcd): the one     │  │ (setns): N simulated nodes     │  │ /metrics read before    │
//! │ real daemon, polled with │  │ acquire leases through         │  │ and after               │
//! │ `weft status --json`     │  │ weft_ipam::EtcdStore           │  │                         │
//! │ eth0 198.18.0.1          │  │ eth0 198.18.0.200              │  │ eth0 198.18.0.100:2379  │
//! └────────────┬─────────────┘  └──────────────┬────────────────┘  └────────────┬────────────┘
//! ┌────────────┴───────────────────────────────┴────────────────────────────────┴────────────┐
//! │  u: bridge br0, underlay 198.18.0.0/24                                                    │
//! └───────────────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! 1. start etcd; `weft network init --store etcd --network 10.244.0.0/16 --subnet-len 28`
//!    (4095 leasable subnets, room for 2000 nodes inside the overlay range the tests may use);
//! 2. start the daemon and wait until it is ready (it holds its own lease, 0 peers);
//! 3. read etcd's `/metrics`; start the N simulated nodes (PublicIPs 198.19.x.y), at most
//!    `--concurrency` acquiring at once; poll the daemon's status every 100 ms until it lists N
//!    peers;
//! 4. read `/metrics` again: the `grpc_server_handled_total` delta over N is the etcd requests
//!    per node (the daemon's own requests for watching N leases included).
//!
//! Prints a table and writes JSON to `bench/results/lease-scale-<date>.json`. Needs root, etcd
//! (Debian etcd-server) and a built `weft` (`cargo build --release --bins`), unless
//! `--no-daemon`, which measures the store side alone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use ipnet::Ipv4Net;
use serde_json::{Value, json};
use weft_bench::netns_thread::{run_in, spawn_in};
use weft_bench::prom::{self, Sample};
use weft_bench::sim::{self, ClientMode, SimConfig, SimResult};
use weft_ipam::{EtcdOptions, NetworkConfig};
use weft_netns_tests::etcd::CLIENT_PORT;
use weft_netns_tests::lease::network_init;
use weft_netns_tests::weft::weft_bin;
use weft_netns_tests::{NetworkInit, StoreConfig, Topology, WeftNode};

/// How often the daemon's status is polled.
const STATUS_POLL: Duration = Duration::from_millis(100);

/// The etcd counter the request figure is based on.
const HANDLED: &str = "grpc_server_handled_total";

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Clients {
    /// One etcd client shared by every simulated node.
    Shared,
    /// One etcd client per simulated node, dropped after its lease.
    PerNode,
}

/// How weft's lease control plane scales with the node count, against a real etcd and a real
/// daemon. Run as root.
#[derive(Debug, Parser)]
#[command(name = "lease-scale")]
struct Args {
    /// Cluster sizes to measure, one fresh lab each.
    #[arg(long, value_delimiter = ',', default_values_t = [100usize, 500, 1000, 2000])]
    nodes: Vec<usize>,
    /// CI smoke run: N = 50 only (overrides --nodes).
    #[arg(long)]
    quick: bool,
    /// Simulated nodes acquiring at the same time.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How the simulated nodes reach etcd.
    #[arg(long, value_enum, default_value = "shared")]
    clients: Clients,
    /// The cluster network written by `weft network init`.
    #[arg(long, default_value = "10.244.0.0/16")]
    network: Ipv4Net,
    /// SubnetLen of the network config.
    #[arg(long, default_value_t = 28)]
    subnet_len: u8,
    /// Measure the store side only: no weft daemon, the network config written through
    /// weft-ipam instead of `weft network init`.
    #[arg(long)]
    no_daemon: bool,
    /// Per size: give up waiting for the leases and the daemon after this long.
    #[arg(long, default_value_t = 1200)]
    timeout_secs: u64,
    /// Where to write the JSON (default `bench/results/lease-scale-<date>.json`).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One size's figures.
#[derive(Debug)]
struct Run {
    nodes: usize,
    sim: SimResult,
    /// When the daemon first listed N peers, from the start; `None` without a daemon or on
    /// timeout.
    converged: Option<Duration>,
    /// How the daemon's peer count grew.
    progress: Progress,
    handled_total: f64,
    handled_by_method: Vec<(String, f64)>,
    started_total: f64,
    etcd_cpu_secs: f64,
    etcd_db_bytes: f64,
    daemon_cpu_secs: Option<f64>,
    wall: Duration,
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lease-scale: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.nodes = vec![50];
    }
    if !weft_netns_tests::root::skip_unless_root("lease-scale")? {
        bail!("needs root (network namespaces, veths, TUN)");
    }
    if !args.no_daemon {
        weft_bin()?;
    }
    let mut runs = Vec::new();
    for &n in &args.nodes {
        eprintln!("==> N = {n}: fresh lab, etcd{}", if args.no_daemon { "" } else { ", weft daemon" });
        let run = run_size(n, &args).with_context(|| format!("N = {n}"))?;
        eprintln!("{}", table_row(&run));
        runs.push(run);
    }
    println!();
    println!("{}", table_header());
    for r in &runs {
        println!("{}", table_row(r));
    }
    let out = args.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(format!("lease-scale-{}.json", weft_bench::utc_date()))
    });
    let doc = report_json(&args, &runs);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&doc).context("rendering JSON")?;
    std::fs::write(&out, text + "\n").with_context(|| format!("writing {}", out.display()))?;
    println!("\nwritten to {}", out.display());
    Ok(())
}

fn run_size(n: usize, args: &Args) -> Result<Run> {
    let wall = Instant::now();
    let mut topo = Topology::new(&format!("ls{n}"), 1)?;
    topo.add_etcd_host()?;
    topo.add_host("sim", 200)?;
    let mut etcd = topo.start_etcd()?;
    let store = StoreConfig::etcd(etcd.endpoints());
    let sim_ns = topo.host("sim")?.ns().name().to_owned();
    let metrics_addr = SocketAddr::from((etcd.host().ip(), CLIENT_PORT));
    let prefix = EtcdOptions::DEFAULT_PREFIX.to_owned();

    if args.no_daemon {
        // What `weft network init --network N --subnet-len L --backend udp` writes.
        let text =
            json!({"Network": args.network.to_string(), "SubnetLen": args.subnet_len, "Backend": {"Type": "udp"}});
        let config = NetworkConfig::from_json(&text.to_string()).context("network config")?;
        let (endpoints, p) = (etcd.endpoints(), prefix.clone());
        run_in(&sim_ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
            rt.block_on(sim::put_config(&endpoints, &p, &config))
        })?;
    } else {
        let init = NetworkInit::udp().network(&args.network.to_string(), args.subnet_len);
        network_init(topo.n(1).ns(), &store, &init)?.ok()?;
    }
    let daemon = if args.no_daemon {
        None
    } else {
        let node = WeftNode::start(topo.n(1), topo.dir(), topo.lease_config(1, &store))?;
        let peers = peer_count(&node)?;
        if peers != 0 {
            bail!("the daemon lists {peers} peers before any simulated node started");
        }
        Some(node)
    };

    let before = run_in(&sim_ns, move || prom::fetch_metrics(metrics_addr))?;
    let daemon_cpu_before = daemon.as_ref().and_then(WeftNode::pid).map(cpu_secs).transpose()?;
    let config = SimConfig {
        endpoints: etcd.endpoints(),
        prefix,
        nodes: n,
        concurrency: args.concurrency,
        client_mode: match args.clients {
            Clients::Shared => ClientMode::Shared,
            Clients::PerNode => ClientMode::PerNode,
        },
        seed: 0x5eed_0000 + n as u64,
        timeout: Duration::from_secs(args.timeout_secs),
    };
    let (tx, rx) = mpsc::channel();
    let handle = spawn_in(&sim_ns, move || {
        sim::run_blocking(&config, |t| {
            // The receiver outlives the thread unless the bench is failing anyway.
            let _ = tx.send(t);
        })
    })?;
    let Ok(started) = rx.recv() else {
        // The simulation failed before starting; its error says why.
        return Err(handle
            .join()
            .map_err(|_| anyhow::anyhow!("simulation thread panicked"))?
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("simulation ended without starting")));
    };

    let (converged, progress) = match &daemon {
        Some(node) => wait_peers(node, n, started, Duration::from_secs(args.timeout_secs))?,
        None => (None, Vec::new()),
    };
    let sim = handle.join().map_err(|_| anyhow::anyhow!("simulation thread panicked"))??;
    let after = run_in(&sim_ns, move || prom::fetch_metrics(metrics_addr))?;
    let daemon_cpu = match (daemon.as_ref().and_then(WeftNode::pid), daemon_cpu_before) {
        (Some(pid), Some(b)) => Some(cpu_secs(pid)? - b),
        _ => None,
    };
    let (before, after) = (prom::parse(&before), prom::parse(&after));
    let delta = |name: &str| prom::sum(&after, name) - prom::sum(&before, name);
    let mut by_method: Vec<(String, f64)> =
        delta_by_method(&before, &after).into_iter().filter(|(_, v)| *v > 0.0).collect();
    by_method.sort_by(|a, b| b.1.total_cmp(&a.1));
    if converged.is_none() && daemon.is_some() {
        eprintln!("N = {n}: the daemon did not list {n} peers within {}s", args.timeout_secs);
    }
    drop(daemon);
    etcd.kill()?;
    Ok(Run {
        nodes: n,
        sim,
        converged,
        progress,
        handled_total: delta(HANDLED),
        handled_by_method: by_method,
        started_total: delta("grpc_server_started_total"),
        etcd_cpu_secs: delta("process_cpu_seconds_total"),
        etcd_db_bytes: prom::sum(&after, "etcd_mvcc_db_total_size_in_bytes"),
        daemon_cpu_secs: daemon_cpu,
        wall: wall.elapsed(),
    })
}

fn delta_by_method(before: &[Sample], after: &[Sample]) -> Vec<(String, f64)> {
    let b = prom::sum_by(before, HANDLED, "grpc_method");
    prom::sum_by(after, HANDLED, "grpc_method")
        .into_iter()
        .map(|(m, v)| {
            let d = v - b.get(&m).copied().unwrap_or(0.0);
            (m, d)
        })
        .collect()
}

fn peer_count(node: &WeftNode<'_>) -> Result<usize> {
    let status = node.status_json()?;
    Ok(status.get("peers").and_then(Value::as_array).map_or(0, Vec::len))
}

/// (seconds from the start, peers the daemon listed), at every poll where the count changed.
type Progress = Vec<(f64, usize)>;

/// Polls the daemon until it lists `n` peers; returns when (from `started`) and the progress.
fn wait_peers(
    node: &WeftNode<'_>,
    n: usize,
    started: Instant,
    timeout: Duration,
) -> Result<(Option<Duration>, Progress)> {
    let mut progress = Progress::new();
    loop {
        let peers = peer_count(node)?;
        let t = started.elapsed();
        if progress.last().is_none_or(|&(_, p)| p != peers) {
            progress.push((t.as_secs_f64(), peers));
        }
        if peers >= n {
            return Ok((Some(t), progress));
        }
        if t > timeout {
            return Ok((None, progress));
        }
        std::thread::sleep(STATUS_POLL);
    }
}

/// User + system CPU seconds of `pid`, from `/proc/<pid>/stat` (fields 14 and 15).
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces; the fields after it start at field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc/pid/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).context("malformed /proc/pid/stat");
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

/// `getconf CLK_TCK`, 100 if unknown.
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Percentile `p` (0..=100) of sorted `v`, nearest rank.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1).min(sorted.len() - 1)).copied().unwrap_or_default()
}

fn latencies(run: &Run) -> Vec<Duration> {
    let mut l: Vec<Duration> = run.sim.nodes.iter().map(|n| n.latency).collect();
    l.sort();
    l
}

fn per_node(run: &Run, f: impl Fn(&sim::NodeResult) -> u32) -> f64 {
    run.sim.nodes.iter().map(|n| f64::from(f(n))).sum::<f64>() / run.nodes.max(1) as f64
}

/// Up to five distinct first errors of the simulated nodes, for the JSON.
fn error_examples(run: &Run) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for e in run.sim.nodes.iter().filter_map(|n| n.first_error.clone()) {
        if seen.len() < 5 && !seen.contains(&e) {
            seen.push(e);
        }
    }
    seen
}

fn table_header() -> String {
    format!(
        "{:>6} {:>10} {:>11} {:>8} {:>9} {:>9} {:>13} {:>10} {:>12} {:>11} {:>11} {:>8}",
        "nodes",
        "acquire s",
        "converge s",
        "lag ms",
        "p50 ms",
        "p99 ms",
        "etcd RPC/node",
        "lists/node",
        "creates/node",
        "etcd cpu s",
        "weft cpu s",
        "wall s"
    )
}

fn table_row(r: &Run) -> String {
    let lat = latencies(r);
    let last = r.sim.last_acquired();
    let opt = |v: Option<f64>, prec: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"));
    format!(
        "{:>6} {:>10.2} {:>11} {:>8} {:>9.1} {:>9.1} {:>13.1} {:>10.2} {:>12.2} {:>11.1} {:>11} {:>8.1}",
        r.nodes,
        last.as_secs_f64(),
        opt(r.converged.map(|c| c.as_secs_f64()), 2),
        opt(r.converged.map(|c| (c.as_secs_f64() - last.as_secs_f64()) * 1e3), 0),
        percentile(&lat, 50.0).as_secs_f64() * 1e3,
        percentile(&lat, 99.0).as_secs_f64() * 1e3,
        r.handled_total / r.nodes.max(1) as f64,
        per_node(r, |n| n.lists),
        per_node(r, |n| n.creates),
        r.etcd_cpu_secs,
        opt(r.daemon_cpu_secs, 1),
        r.wall.as_secs_f64(),
    )
}

fn report_json(args: &Args, runs: &[Run]) -> Value {
    let cmd: Vec<String> = std::env::args().collect();
    let etcd_version = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    json!({
        "bench": "lease-scale",
        "date": weft_bench::utc_date(),
        "command": cmd.join(" "),
        "host": {"cpus": cpus, "kernel": kernel, "etcd": etcd_version},
        "settings": {
            "network": args.network.to_string(),
            "subnet_len": args.subnet_len,
            "concurrency": args.concurrency,
            "clients": match args.clients { Clients::Shared => "shared", Clients::PerNode => "per-node" },
            "daemon": !args.no_daemon,
            "weft_bin": weft_bin().map(|p| p.display().to_string()).ok(),
            "status_poll_ms": STATUS_POLL.as_millis() as u64,
        },
        "runs": runs.iter().map(|r| {
            let lat = latencies(r);
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let last = r.sim.last_acquired();
            json!({
                "nodes": r.nodes,
                "acquire_all_secs": last.as_secs_f64(),
                "daemon_lists_all_secs": r.converged.map(|c| c.as_secs_f64()),
                "daemon_lag_after_last_acquire_ms": r.converged.map(|c| (c.as_secs_f64() - last.as_secs_f64()) * 1e3),
                "acquire_latency_ms": {
                    "p50": ms(percentile(&lat, 50.0)),
                    "p90": ms(percentile(&lat, 90.0)),
                    "p99": ms(percentile(&lat, 99.0)),
                    "max": ms(percentile(&lat, 100.0)),
                },
                "lists_per_node": per_node(r, |n| n.lists),
                "creates_per_node": per_node(r, |n| n.creates),
                "keeper_backoffs": r.sim.nodes.iter().map(|n| u64::from(n.backoffs)).sum::<u64>(),
                "store_error_examples": error_examples(r),
                "etcd_grpc_handled_total": r.handled_total,
                "etcd_grpc_handled_per_node": r.handled_total / r.nodes.max(1) as f64,
                "etcd_grpc_started_total": r.started_total,
                "etcd_grpc_handled_by_method": r.handled_by_method.iter().map(|(m, v)| (m.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "etcd_cpu_secs": r.etcd_cpu_secs,
                "etcd_db_bytes": r.etcd_db_bytes,
                "daemon_cpu_secs": r.daemon_cpu_secs,
                "daemon_peers_progress": r.progress,
                "wall_secs": r.wall.as_secs_f64(),
            })
        }).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn args_parse() {
        let a = Args::parse_from(["lease-scale", "--nodes", "100,500", "--clients", "per-node"]);
        assert_eq!(a.nodes, [100, 500]);
        assert!(matches!(a.clients, Clients::PerNode));
        let d = Args::parse_from(["lease-scale"]);
        assert_eq!(d.nodes, [100, 500, 1000, 2000]);
        assert_eq!(d.subnet_len, 28);
    }
}
