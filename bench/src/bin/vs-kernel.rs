//! `vs-kernel`: weft's data plane side by side with the plain underlay, Linux's own vxlan
//! programmed as flannel programs it, and userspace WireGuard (`wireguard-go`), in one run on
//! one machine.
//!
//! Each setup gets a fresh two-host lab of network namespaces (nothing leaves them):
//!
//! ```text
//! ┌─ n1 ───────────────────────┐      ┌─ n2 ───────────────────────┐
//! │ iperf3 -c, ping, rr probe  │      │ iperf3 -s, rr echo         │
//! │ underlay | flannel.1 |     │      │ underlay | flannel.1 |     │
//! │ weft udp | weft vxlan |    │      │ weft udp | weft vxlan |    │
//! │ weft wireguard |           │      │ weft wireguard |           │
//! │ wireguard-go               │      │ wireguard-go               │
//! │ eth0 198.18.0.1/24         │      │ eth0 198.18.0.2/24         │
//! └─────────────┬──────────────┘      └──────────────┬─────────────┘
//! ┌─────────────┴────────────────────────────────────┴─────────────┐
//! │  u: bridge br0, veth MTU 1500, underlay 198.18.0.0/24           │
//! └─────────────────────────────────────────────────────────────────┘
//!   overlay 10.244.0.0/16: n1 owns 10.244.1.0/24, n2 10.244.2.0/24
//! ```
//!
//! Setups: `underlay` (198.18.0.1 → .2), `linux-vxlan` (vxlan id 1 dstport 8472 nolearning,
//! `flannel.1` with 10.244.i.0/32, onlink route, permanent neighbour and FDB entries, the
//! kernel's offloads left on: the baseline is Linux at its best, kernel to kernel), `weft-udp`
//! (static mesh), `weft-vxlan` (static VXLAN mesh), `weft-wireguard` (static mesh with
//! `backend = "wireguard"`, keys in the lab's scratch directory, measured once both daemons
//! show a session with their peer) and `wireguard-go` (Go's userspace
//! WireGuard, one daemon per node configured with `wg`, MTU 1420, addressed as `linux-vxlan`:
//! for machines without the kernel module, and the userspace data plane to compare weft with).
//!
//! For each, n1 → n2: iperf3 TCP 1 stream and 4 streams, iperf3 UDP with 64-byte payloads
//! (`-b 0`, packets per second received and loss), and round trips as p50/p99/p99.9 three
//! ways: ping 5 ms apart (iputils *spins* between probes that close, so one of the two CPUs
//! is busy polling), and a UDP request/response probe ([`weft_bench::rr`], a client asleep in
//! `recv` as real clients are) back to back and 5 ms apart.
//! For weft and wireguard-go, both daemons' utime+stime (`/proc/<pid>/stat`) over the 1-stream
//! run, per GB received; for weft, each daemon's non-zero drop counters, WireGuard counters and
//! warnings from its log at the end. Prints a table with ratios to Linux vxlan and writes JSON to
//! `bench/results/vs-kernel-<date>.json`. Needs root, iperf3, a built `weft`
//! (`cargo build --release --bins`), and `wireguard-go` and `wg` for that setup (Debian's
//! `wireguard-go` and `wireguard-tools`). Figures are reported, never asserted.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use weft_bench::{netns_thread, rr};
use weft_netns_tests::cmd;
use weft_netns_tests::traffic::IperfRun;
use weft_netns_tests::weft::{weft_bin, wireguard_keys};
use weft_netns_tests::wireguard_go::{WgGo, WgGoConfig, WgPeer, find_program};
use weft_netns_tests::{IperfServer, Netns, NodeConfig, Topology, WeftNode, iperf3_tcp_run, json_path, vtep_mac};

/// flannel's VTEP MTU: 1500 - 50.
const VXLAN_MTU: &str = "1450";

/// WireGuard's default MTU (`wg-quick`'s for a 1500-byte underlay): 1500 - 80.
const WG_MTU: u16 = 1420;

/// How long weft-wireguard's daemons get to complete their handshakes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many warning or error lines per weft log go into the JSON.
const LOG_LINES: usize = 20;

/// WireGuard's UDP port on both nodes.
const WG_PORT: u16 = 51820;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Io {
    /// io_uring.
    Uring,
    /// recvmmsg/sendmmsg.
    Mmsg,
}

/// Which of weft's offloads run (for before/after figures per technique).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Offload {
    /// TUN TSO + UDP GSO, UDP GRO + merging (weft's default).
    All,
    /// TUN TSO + UDP GSO only: no GRO receives, one TUN write per packet.
    Tx,
    /// None: one packet per read, send, receive and write.
    Off,
}

impl Offload {
    fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Tx => "tx",
            Self::Off => "off",
        }
    }
}

/// weft's data plane against the plain underlay and Linux's vxlan (flannel-style), side by side.
/// Run as root.
#[derive(Debug, Parser)]
#[command(name = "vs-kernel")]
struct Args {
    /// iperf3 duration of each run, in seconds.
    #[arg(long, default_value_t = 5)]
    secs: u32,
    /// CI smoke run: 1 s iperf3 runs and 200 pings (overrides --secs and --pings).
    #[arg(long)]
    quick: bool,
    /// Pings per setup (5 ms apart).
    #[arg(long, default_value_t = 2000)]
    pings: u32,
    /// weft's I/O backend; weft chooses when not given.
    #[arg(long, value_enum)]
    io: Option<Io>,
    /// weft's offloads.
    #[arg(long, value_enum, default_value_t = Offload::All)]
    offload: Offload,
    /// weft's workers per daemon (one TUN queue and socket each).
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Only these setups (comma-separated), for a quicker look; the default runs all six.
    #[arg(long, value_enum, value_delimiter = ',')]
    setups: Vec<Setup>,
    /// Only the round-trip figures (ping and UDP request/response), no iperf3 runs.
    #[arg(long)]
    latency_only: bool,
    /// Where to write the JSON (default `bench/results/vs-kernel-<date>.json`).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Setup {
    Underlay,
    LinuxVxlan,
    WeftUdp,
    WeftVxlan,
    WeftWireguard,
    WireguardGo,
}

impl Setup {
    const ALL: [Self; 6] =
        [Self::Underlay, Self::LinuxVxlan, Self::WeftUdp, Self::WeftVxlan, Self::WeftWireguard, Self::WireguardGo];

    fn name(self) -> &'static str {
        match self {
            Self::Underlay => "underlay",
            Self::LinuxVxlan => "linux-vxlan",
            Self::WeftUdp => "weft-udp",
            Self::WeftVxlan => "weft-vxlan",
            Self::WeftWireguard => "weft-wireguard",
            Self::WireguardGo => "wireguard-go",
        }
    }

    /// The userspace daemon whose CPU is measured, if any.
    fn daemon(self) -> Option<&'static str> {
        match self {
            Self::Underlay | Self::LinuxVxlan => None,
            Self::WeftUdp | Self::WeftVxlan | Self::WeftWireguard => Some("weft"),
            Self::WireguardGo => Some("wireguard-go"),
        }
    }

    /// Short namespace tag.
    fn tag(self) -> &'static str {
        match self {
            Self::Underlay => "vku",
            Self::LinuxVxlan => "vkl",
            Self::WeftUdp => "vkw",
            Self::WeftVxlan => "vkx",
            Self::WeftWireguard => "vke",
            Self::WireguardGo => "vkg",
        }
    }
}

/// Per-packet RTTs, in microseconds.
#[derive(Debug, Default)]
struct Rtt {
    sent: u64,
    received: u64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    /// Round trips per second (request/response back to back only).
    per_second: f64,
}

impl Rtt {
    fn from_hist(h: &Histogram<u64>, sent: u64) -> Self {
        Self {
            sent,
            received: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            per_second: 0.0,
        }
    }

    fn from_rr(r: &rr::RrResult) -> Self {
        Self { per_second: r.per_second, ..Self::from_hist(&r.hist, r.sent) }
    }
}

/// What iperf3 UDP with 64-byte payloads measured.
#[derive(Debug, Default)]
struct Udp64 {
    /// Datagrams received per second.
    pps: f64,
    lost_percent: f64,
}

/// Daemon CPU (weft's or wireguard-go's) over the 1-stream run.
#[derive(Debug, Default)]
struct Cpu {
    /// n1's daemon (the sender side), seconds.
    sender_s: f64,
    /// n2's daemon (the receiver side), seconds.
    receiver_s: f64,
    /// Both daemons, per GB (1e9 bytes) received by iperf3.
    s_per_gb: f64,
}

#[derive(Debug, Default)]
struct Measured {
    tcp1: Option<IperfRun>,
    tcp4: Option<IperfRun>,
    udp64: Option<Udp64>,
    /// ping, 5 ms apart (iputils spins between such probes: one CPU busy).
    rtt: Option<Rtt>,
    /// UDP request/response, back to back.
    rr: Option<Rtt>,
    /// UDP request/response, 5 ms apart, the client asleep in between.
    rr_spaced: Option<Rtt>,
    cpu: Option<Cpu>,
    /// weft only: per daemon, what its status and log said at the end.
    weft: Vec<Value>,
    errors: Vec<String>,
    wall: Duration,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vs-kernel: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let weft = weft_bin()?;
    eprintln!("weft binary: {}", weft.display());
    let (secs, pings) = if args.quick { (1, 200) } else { (args.secs.max(1), args.pings.max(10)) };
    let start = Instant::now();
    let mut results = Vec::new();
    let setups = if args.setups.is_empty() { Setup::ALL.to_vec() } else { args.setups.clone() };
    for setup in setups {
        eprintln!("==> {}: fresh lab", setup.name());
        let t = Instant::now();
        let mut m = Measured::default();
        if let Err(e) = measure(setup, args, secs, pings, &mut m) {
            eprintln!("  {} failed: {e:#}", setup.name());
            m.errors.push(format!("{e:#}"));
        }
        m.wall = t.elapsed();
        results.push((setup, m));
    }
    println!();
    print_table(&results);
    println!("\ntotal {:.1} s", start.elapsed().as_secs_f64());
    let out = args.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("results").join(format!("vs-kernel-{}.json", weft_bench::utc_date()))
    });
    let doc = report_json(args, secs, pings, &results, start.elapsed());
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&doc).context("rendering JSON")?;
    std::fs::write(&out, text + "\n").with_context(|| format!("writing {}", out.display()))?;
    println!("written to {}", out.display());
    // Slowness is only reported; a setup that could not be measured fails the run (and CI).
    let failed = results.iter().filter(|(_, m)| !m.errors.is_empty()).count();
    if failed > 0 {
        bail!("{failed} setup(s) had errors (see above and the JSON)");
    }
    Ok(())
}

/// Builds the lab for `setup`, measures into `m` (what succeeded stays, on error too); the lab
/// and daemons are removed when this returns.
fn measure(setup: Setup, args: &Args, secs: u32, pings: u32, m: &mut Measured) -> Result<()> {
    let topo = Topology::new(setup.tag(), 2)?;
    let (n1, n2) = (topo.n(1).ns(), topo.n(2).ns());
    let mut daemons: Vec<WeftNode<'_>> = Vec::new();
    // Declared after the topology, so dropped (killed) before its namespaces go, on error too.
    let mut wireguard: Vec<WgGo> = Vec::new();
    let dst = match setup {
        Setup::Underlay => topo.n(2).ip().to_string(),
        Setup::LinuxVxlan => {
            flannel_vtep(n1, 1, 2)?;
            flannel_vtep(n2, 2, 1)?;
            "10.244.2.0".to_owned()
        }
        Setup::WeftUdp | Setup::WeftVxlan | Setup::WeftWireguard => {
            let keys = if setup == Setup::WeftWireguard { wireguard_keys(topo.dir(), 2)? } else { Vec::new() };
            for i in 1..=2 {
                let mut c = match setup {
                    Setup::WeftUdp => NodeConfig::mesh(i, 2),
                    Setup::WeftVxlan => NodeConfig::vxlan_mesh(i, 2),
                    _ => NodeConfig::wireguard_mesh(i, 2, &keys),
                };
                if let Some(io) = args.io {
                    c.io = Some(
                        match io {
                            Io::Uring => "uring",
                            Io::Mmsg => "mmsg",
                        }
                        .to_owned(),
                    );
                }
                c.workers = Some(args.workers);
                (c.offload, c.gro) = match args.offload {
                    Offload::All => (Some(true), Some(true)),
                    Offload::Tx => (Some(true), Some(false)),
                    Offload::Off => (Some(false), Some(false)),
                };
                daemons.push(topo.start_weft(c).with_context(|| format!("starting weft on n{i}"))?);
            }
            if setup == Setup::WeftWireguard {
                let t = Instant::now();
                wait_for_sessions(&daemons)?;
                eprintln!("  sessions up after {:.2} s", t.elapsed().as_secs_f64());
            }
            NodeConfig::mesh(2, 2).gateway()?.to_string()
        }
        Setup::WireguardGo => {
            wireguard = wireguard_go(&topo)?;
            "10.244.2.0".to_owned()
        }
    };
    // Warm up: the first packets may resolve neighbours.
    let _ = n1.exec_timeout(Duration::from_secs(5), "ping", &["-n", "-c", "3", "-i", "0.2", "-W", "1", &dst]);

    if !args.latency_only {
        let pids: Vec<u32> = daemons.iter().filter_map(WeftNode::pid).chain(wireguard.iter().map(WgGo::pid)).collect();
        throughput(&topo, &pids, &dst, secs, m)?;
    }
    let rtt = ping_rtts(n1, &dst, pings)?;
    eprintln!(
        "  rtt p50/p99/p99.9: {}/{}/{} us ({} of {})",
        rtt.p50_us, rtt.p99_us, rtt.p999_us, rtt.received, rtt.sent
    );
    m.rtt = Some(rtt);
    match request_response(n1, n2, &dst, secs, pings) {
        Ok((rr, spaced)) => {
            eprintln!(
                "  udp rr p50/p99/p99.9: {}/{}/{} us back to back ({:.0}/s), {}/{}/{} us 5 ms apart",
                rr.p50_us, rr.p99_us, rr.p999_us, rr.per_second, spaced.p50_us, spaced.p99_us, spaced.p999_us
            );
            (m.rr, m.rr_spaced) = (Some(rr), Some(spaced));
        }
        Err(e) => m.errors.push(format!("udp rr: {e:#}")),
    }
    for d in &daemons {
        match weft_report(d) {
            Ok(v) => m.weft.push(v),
            Err(e) => m.errors.push(format!("weft status: {e:#}")),
        }
    }
    for mut d in daemons {
        d.stop().context("stopping weft")?;
    }
    for w in wireguard {
        w.stop()?;
    }
    Ok(())
}

/// Whether every entry of `peers[]` in `status` has a session (`wireguard.handshake_age_secs`
/// is a number).
fn has_sessions(status: &Value) -> bool {
    status["peers"].as_array().is_some_and(|ps| {
        !ps.is_empty() && ps.iter().all(|p| json_path(p, "wireguard.handshake_age_secs").is_some_and(Value::is_u64))
    })
}

/// Waits (up to [`HANDSHAKE_TIMEOUT`]) until both weft-wireguard daemons show a session with
/// every peer; fails with their peers' status and log tails otherwise.
fn wait_for_sessions(daemons: &[WeftNode<'_>]) -> Result<()> {
    let up = cmd::poll_until(HANDSHAKE_TIMEOUT, || {
        for d in daemons {
            if !has_sessions(&d.status_json()?) {
                std::thread::sleep(Duration::from_millis(80));
                return Ok(None);
            }
        }
        Ok(Some(()))
    })?;
    if up.is_none() {
        let mut why = String::new();
        for d in daemons {
            let peers = d.status_json().map_or_else(|e| format!("{e:#}"), |s| s["peers"].to_string());
            why.push_str(&format!("\n{}: peers {peers}\n{}", d.config().node_name, d.log_tail(20)));
        }
        bail!("no WireGuard sessions after {} s:{why}", HANDSHAKE_TIMEOUT.as_secs());
    }
    Ok(())
}

/// What a weft daemon's status says at the end of a run (non-zero drops, the WireGuard
/// counters, its own and per peer) and the warning and error lines of its log.
fn weft_report(d: &WeftNode<'_>) -> Result<Value> {
    let s = d.status_json()?;
    let node = d.config().node_name.clone();
    let drops: serde_json::Map<String, Value> = s["drops"]
        .as_object()
        .map(|m| {
            m.iter().filter(|(_, v)| v.as_u64().is_some_and(|n| n > 0)).map(|(k, v)| (k.clone(), v.clone())).collect()
        })
        .unwrap_or_default();
    let peers: Vec<Value> = s["peers"]
        .as_array()
        .map(|ps| ps.iter().map(|p| json!({"name": p["name"], "wireguard": p["wireguard"]})).collect())
        .unwrap_or_default();
    let log = std::fs::read_to_string(d.log_path()).unwrap_or_default();
    let warnings: Vec<&str> =
        log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(LOG_LINES).collect();
    if !drops.is_empty() {
        eprintln!("  {node} drops: {}", Value::Object(drops.clone()));
    }
    for w in &warnings {
        eprintln!("  {node} log: {w}");
    }
    Ok(json!({"node": node, "io_backend": s["io_backend"], "drops_nonzero": drops, "wireguard": s["wireguard"],
              "peers": peers, "log_warnings": warnings}))
}

/// A WireGuard private key (`wg genkey`) written to `path` (mode 0600), and its public key.
fn wg_keypair(wg: &Path, path: &Path) -> Result<String> {
    let out = Command::new(wg).arg("genkey").output().context("running wg genkey")?;
    if !out.status.success() {
        bail!("wg genkey failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let private = out.stdout;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(&private))
        .with_context(|| format!("writing {}", path.display()))?;
    let mut child = Command::new(wg)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running wg pubkey")?;
    child.stdin.take().context("wg pubkey's stdin")?.write_all(&private).context("feeding wg pubkey")?;
    let out = child.wait_with_output().context("waiting for wg pubkey")?;
    if !out.status.success() {
        bail!("wg pubkey failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Starts wireguard-go on n1 and n2 and configures them as each other's only peer: node `i`
/// has `10.244.i.0/32` (as `linux-vxlan`) and a route to the peer's `/24` through the tunnel,
/// which is also the peer's allowed IPs. Keys (`wg genkey`) live in the lab's scratch
/// directory.
fn wireguard_go(topo: &Topology) -> Result<Vec<WgGo>> {
    let wg = find_program("wg", "wireguard-tools")?;
    // Interface names carry the pid: the control sockets' directory is shared by all
    // namespaces (and by a concurrent run).
    let ifname = |i: u8| format!("wg{}-{i}", std::process::id());
    let mut public = Vec::new();
    for i in 1..=2u8 {
        public.push(wg_keypair(&wg, &topo.dir().join(format!("wg-n{i}.key")))?);
    }
    let mut nodes = Vec::new();
    for i in 1..=2u8 {
        let peer = 3 - i;
        let allowed = format!("10.244.{peer}.0/24");
        let cfg = WgGoConfig {
            ifname: ifname(i),
            private_key: topo.dir().join(format!("wg-n{i}.key")),
            listen_port: WG_PORT,
            address: format!("10.244.{i}.0/32"),
            routes: vec![allowed.clone()],
            mtu: WG_MTU,
            peers: vec![WgPeer {
                public_key: public[usize::from(peer) - 1].clone(),
                endpoint: format!("198.18.0.{peer}:{WG_PORT}"),
                allowed_ips: allowed,
            }],
        };
        nodes.push(WgGo::start(topo.n(usize::from(i)).ns(), topo.dir(), &cfg)?);
    }
    Ok(nodes)
}

/// Programs `ns` as flannel's vxlan backend programs node `me` with one peer `peer`.
fn flannel_vtep(ns: &Netns, me: u8, peer: u8) -> Result<()> {
    let peer_mac = vtep_mac(peer);
    let peer_gw = format!("10.244.{peer}.0");
    let peer_ip = format!("198.18.0.{peer}");
    let run = |args: &[&str]| ns.exec_ok(args[0], &args[1..]).map(|_| ());
    run(&["ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "8472", "nolearning"])?;
    run(&["ip", "link", "set", "flannel.1", "address", &vtep_mac(me), "mtu", VXLAN_MTU, "up"])?;
    // Offloads stay on: between two kernels a partial inner checksum is fine, and turning it
    // off (as flannel must, for peers outside the kernel) also turns TSO off, which would make
    // the baseline several times slower than Linux really is.
    run(&["ip", "addr", "add", &format!("10.244.{me}.0/32"), "dev", "flannel.1"])?;
    run(&["ip", "route", "add", &format!("10.244.{peer}.0/24"), "via", &peer_gw, "dev", "flannel.1", "onlink"])?;
    run(&["ip", "neigh", "add", &peer_gw, "lladdr", &peer_mac, "dev", "flannel.1", "nud", "permanent"])?;
    run(&["bridge", "fdb", "add", &peer_mac, "dev", "flannel.1", "dst", &peer_ip, "self", "permanent"])
}

/// One iperf3 run n1 → n2 against a fresh one-shot server on n2.
fn iperf(topo: &Topology, dst: &str, secs: u32, extra: &[&str], tag: &str) -> Result<IperfRun> {
    let _server = IperfServer::start(topo.n(2).ns(), dst, &topo.dir().join(format!("iperf-{tag}.log")))?;
    iperf3_tcp_run(topo.n(1).ns(), dst, secs, extra).with_context(|| format!("iperf3 {tag}"))
}

/// iperf3 UDP, 64-byte payloads, unlimited rate.
fn udp64(topo: &Topology, dst: &str, secs: u32) -> Result<Udp64> {
    let _server = IperfServer::start(topo.n(2).ns(), dst, &topo.dir().join("iperf-udp64.log"))?;
    let t = secs.to_string();
    let out = topo.n(1).ns().exec_timeout(
        Duration::from_secs(u64::from(secs) + 15),
        "iperf3",
        &["-c", dst, "-t", &t, "-J", "--connect-timeout", "3000", "-u", "-l", "64", "-b", "0"],
    )?;
    let json: Value = serde_json::from_str(&out.stdout).with_context(|| format!("iperf3 printed no JSON\n{out}"))?;
    if let Some(err) = json.get("error").and_then(Value::as_str) {
        bail!("iperf3 error: {err}");
    }
    // Newer iperf3 has the receiver's view in sum_received; older ones only in sum.
    let sum = json.pointer("/end/sum_received").or_else(|| json.pointer("/end/sum")).context("no end.sum")?;
    let f = |k: &str| sum.get(k).and_then(Value::as_f64).with_context(|| format!("no {k} in {sum}"));
    let packets = f("packets")?;
    let seconds = f("seconds")?;
    let lost = sum.get("lost_packets").and_then(Value::as_f64).unwrap_or(0.0);
    let lost_percent = sum.get("lost_percent").and_then(Value::as_f64).unwrap_or(0.0);
    let received = (packets - lost).max(0.0);
    Ok(Udp64 { pps: if seconds > 0.0 { received / seconds } else { 0.0 }, lost_percent })
}

/// `count` pings 5 ms apart; per-packet RTTs from ping's reply lines.
fn ping_rtts(ns: &Netns, dst: &str, count: u32) -> Result<Rtt> {
    let c = count.to_string();
    let deadline = Duration::from_secs(u64::from(count) / 100 + 15);
    let out = ns.exec_timeout(deadline, "ping", &["-n", "-c", &c, "-i", "0.005", "-W", "1", dst])?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    for line in out.stdout.lines() {
        let Some(t) = line.split("time=").nth(1) else { continue };
        let Some(ms) = t.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        // ping prints milliseconds with 3 decimals: whole microseconds.
        h.record(((ms * 1000.0).round() as u64).max(1)).context("recording an RTT")?;
    }
    if h.is_empty() {
        bail!("no ping replies from {dst}\n{out}");
    }
    Ok(Rtt::from_hist(&h, u64::from(count)))
}

/// iperf3 TCP 1 and 4 streams and UDP 64 B from n1 to `dst`, with the CPU of the daemons
/// `pids` (n1's, n2's; none for kernel setups) over the 1-stream run.
fn throughput(topo: &Topology, pids: &[u32], dst: &str, secs: u32, m: &mut Measured) -> Result<()> {
    let before = pids.iter().map(|&p| cpu_seconds(p)).collect::<Result<Vec<_>>>()?;
    let tcp1 = iperf(topo, dst, secs, &[], "tcp1")?;
    let after = pids.iter().map(|&p| cpu_seconds(p)).collect::<Result<Vec<_>>>()?;
    if pids.len() == 2 {
        let d: Vec<f64> = before.iter().zip(&after).map(|(b, a)| a - b).collect();
        let (sender_s, receiver_s) = (d[0], d[1]);
        let gb = tcp1.bytes as f64 / 1e9;
        m.cpu = Some(Cpu { sender_s, receiver_s, s_per_gb: if gb > 0.0 { (sender_s + receiver_s) / gb } else { 0.0 } });
    }
    eprintln!("  tcp 1 stream: {:.2} Gbit/s", tcp1.bits_per_second / 1e9);
    m.tcp1 = Some(tcp1);
    let tcp4 = iperf(topo, dst, secs, &["-P", "4"], "tcp4")?;
    eprintln!("  tcp 4 streams: {:.2} Gbit/s", tcp4.bits_per_second / 1e9);
    m.tcp4 = Some(tcp4);
    match udp64(topo, dst, secs) {
        Ok(u) => {
            eprintln!("  udp 64 B: {:.0} pps received, {:.1}% lost", u.pps, u.lost_percent);
            m.udp64 = Some(u);
        }
        Err(e) => m.errors.push(format!("udp64: {e:#}")),
    }
    Ok(())
}

/// UDP request/response round trips from n1 to an echo server in n2: back to back for `secs`,
/// then `count` probes 5 ms apart (the client sleeping in between, unlike ping).
fn request_response(n1: &Netns, n2: &Netns, dst: &str, secs: u32, count: u32) -> Result<(Rtt, Rtt)> {
    let ip: std::net::IpAddr = dst.parse().with_context(|| format!("probe address {dst}"))?;
    let to = std::net::SocketAddr::new(ip, rr::PORT);
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let server = netns_thread::spawn_in(n2.name(), move || rr::serve(&s))?;
    std::thread::sleep(Duration::from_millis(100));
    let run = Duration::from_secs(u64::from(secs));
    let spaced_run = Duration::from_millis(u64::from(count) * 5);
    let probes = netns_thread::run_in(n1.name(), || {
        Ok((
            rr::probe(to, rr::Pace::BackToBack, run)?,
            rr::probe(to, rr::Pace::Spaced(Duration::from_millis(5)), spaced_run)?,
        ))
    });
    stop.store(true, Ordering::Relaxed);
    let served = server.join().map_err(|_| anyhow::anyhow!("the echo server panicked"))?;
    let (b2b, spaced) = probes?;
    served?;
    Ok((Rtt::from_rr(&b2b), Rtt::from_rr(&spaced)))
}

/// utime + stime of process `pid` (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading stat of {pid}"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let ticks = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).context("no utime/stime in /proc stat");
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Ok((ticks(14)? + ticks(15)?) as f64 / hz as f64)
}

fn linux(results: &[(Setup, Measured)]) -> Option<&Measured> {
    results.iter().find(|(s, _)| *s == Setup::LinuxVxlan).map(|(_, m)| m)
}

/// One table row: a figure per setup, with its ratio to Linux vxlan.
fn row(results: &[(Setup, Measured)], label: &str, prec: usize, get: impl Fn(&Measured) -> Option<f64>) -> String {
    let base = linux(results).and_then(&get);
    let mut s = format!("| {label} |");
    for (_, m) in results {
        match get(m) {
            Some(v) => {
                let ratio = base.filter(|b| *b > 0.0).map_or(String::new(), |b| format!(" ({:.2}×)", v / b));
                s.push_str(&format!(" {v:.prec$}{ratio} |"));
            }
            None => s.push_str(" — |"),
        }
    }
    s
}

fn print_table(results: &[(Setup, Measured)]) {
    let names: Vec<&str> = results.iter().map(|(s, _)| s.name()).collect();
    println!("| n1 → n2 | {} |", names.join(" | "));
    println!("|---|{}", "---:|".repeat(names.len()));
    let gbps = |r: &Option<IperfRun>| r.as_ref().map(|r| r.bits_per_second / 1e9);
    println!("{}", row(results, "TCP 1 stream Gbit/s", 2, |m| gbps(&m.tcp1)));
    println!("{}", row(results, "TCP 4 streams Gbit/s", 2, |m| gbps(&m.tcp4)));
    println!("{}", row(results, "UDP 64 B kpps received", 0, |m| m.udp64.as_ref().map(|u| u.pps / 1e3)));
    println!("{}", row(results, "UDP 64 B loss %", 1, |m| m.udp64.as_ref().map(|u| u.lost_percent)));
    println!("{}", row(results, "RTT p50 µs", 0, |m| m.rtt.as_ref().map(|r| r.p50_us as f64)));
    println!("{}", row(results, "RTT p99 µs", 0, |m| m.rtt.as_ref().map(|r| r.p99_us as f64)));
    println!("{}", row(results, "RTT p99.9 µs", 0, |m| m.rtt.as_ref().map(|r| r.p999_us as f64)));
    println!("{}", row(results, "UDP RR p50 µs", 0, |m| m.rr.as_ref().map(|r| r.p50_us as f64)));
    println!("{}", row(results, "UDP RR p99 µs", 0, |m| m.rr.as_ref().map(|r| r.p99_us as f64)));
    println!("{}", row(results, "UDP RR p99.9 µs", 0, |m| m.rr.as_ref().map(|r| r.p999_us as f64)));
    println!("{}", row(results, "UDP RR transactions/s", 0, |m| m.rr.as_ref().map(|r| r.per_second)));
    println!("{}", row(results, "UDP RR 5 ms apart p50 µs", 0, |m| m.rr_spaced.as_ref().map(|r| r.p50_us as f64)));
    println!("{}", row(results, "UDP RR 5 ms apart p99 µs", 0, |m| m.rr_spaced.as_ref().map(|r| r.p99_us as f64)));
    println!("{}", row(results, "daemon CPU s/GB (both daemons)", 2, |m| m.cpu.as_ref().map(|c| c.s_per_gb)));
    for (s, m) in results {
        for e in &m.errors {
            println!("{}: error: {}", s.name(), e.lines().next().unwrap_or(""));
        }
    }
}

fn rtt_json(r: &Rtt) -> Value {
    json!({"sent": r.sent, "received": r.received, "p50": r.p50_us, "p99": r.p99_us, "p99_9": r.p999_us, "max": r.max_us})
}

fn iperf_json(r: &Option<IperfRun>) -> Value {
    r.as_ref().map_or(Value::Null, |r| {
        json!({"gbit_per_s": r.bits_per_second / 1e9, "bytes": r.bytes, "retransmits": r.retransmits,
               "interval_bytes": r.interval_bytes})
    })
}

fn report_json(args: &Args, secs: u32, pings: u32, results: &[(Setup, Measured)], total: Duration) -> Value {
    let cmd: Vec<String> = std::env::args().collect();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let version = |program: &str| {
        Command::new(program)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned))
            .unwrap_or_default()
    };
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let setups: Vec<Value> = results
        .iter()
        .map(|(s, m)| {
            json!({
                "setup": s.name(),
                "tcp_1_stream": iperf_json(&m.tcp1),
                "tcp_4_streams": iperf_json(&m.tcp4),
                "udp_64b": m.udp64.as_ref().map(|u| json!({"pps_received": u.pps, "lost_percent": u.lost_percent})),
                "rtt_us": m.rtt.as_ref().map(rtt_json),
                "udp_rr_us": m.rr.as_ref().map(|r| json!({"back_to_back": rtt_json(r), "per_second": r.per_second})),
                "udp_rr_5ms_apart_us": m.rr_spaced.as_ref().map(rtt_json),
                "daemon_cpu_tcp_1_stream": m.cpu.as_ref().map(|c| json!({"daemon": s.daemon(), "sender_s": c.sender_s,
                    "receiver_s": c.receiver_s, "s_per_gb_received": c.s_per_gb})),
                "weft_status_at_end": if m.weft.is_empty() { Value::Null } else { Value::Array(m.weft.clone()) },
                "errors": m.errors,
                "wall_s": m.wall.as_secs_f64(),
            })
        })
        .collect();
    json!({
        "bench": "vs-kernel",
        "date": weft_bench::utc_date(),
        "command": cmd.join(" "),
        "host": {"cpus": cpus, "kernel": kernel, "iperf3": version("iperf3"), "wireguard_go": version("wireguard-go")},
        "settings": {"secs": secs, "pings": pings, "ping_interval_ms": 5, "quick": args.quick,
            "io": args.io.map(|i| match i { Io::Uring => "uring", Io::Mmsg => "mmsg" }),
            "offload": args.offload.name(),
            "workers": args.workers,
            "weft_bin": weft_bin().map(|p| p.display().to_string()).ok()},
        "setups": setups,
        "total_s": total.as_secs_f64(),
    })
}
