//! The `weft` command: `weft run` starts the daemon, `weft status` asks it how it is doing,
//! `weft network init` and `weft leases` manage the lease store, `weft ipam` asks the daemon
//! for pod addresses.
//!
//! Exit codes (stable): 0 success, 1 runtime failure, 2 bad command line, 3 bad
//! configuration, 4 missing privilege or `/dev/net/tun`, 5 address in use, 6 io_uring
//! demanded but unavailable, 7 daemon not reachable, 8 the daemon refused (not ready, no free
//! address, invalid container id…).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};
use weft::config::{self, RawConfig, RawPeer, StoreSettings};
use weft::daemon::{self, ConfigSource, api};
use weft::status;
use weft_ipam::{LeaseStore, NetworkConfig, Password, StoreError};

#[derive(Debug, Parser)]
#[command(name = "weft", version, about = "Userspace overlay network for containers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node daemon in the foreground (SIGHUP reloads peers, SIGTERM stops).
    Run(Box<RunArgs>),
    /// Show a running daemon's peers, counters and drop reasons.
    Status(StatusArgs),
    /// Manage the cluster network config in the lease store.
    Network {
        #[command(subcommand)]
        command: NetworkCommand,
    },
    /// List the subnet leases in the store.
    Leases(LeasesArgs),
    /// Pod addresses from a running daemon (what the CNI plugin asks for).
    Ipam {
        #[command(subcommand)]
        command: IpamCommand,
    },
    /// Take this node out of the cluster: the running daemon releases its lease, removes its
    /// fail-closed route and exits. (A plain stop keeps both, so that pod traffic never leaves
    /// unencapsulated while weft restarts.)
    Leave(LeaveArgs),
    /// Run a command inside a rootless daemon's overlay (its user and network namespace), as
    /// `nsenter --user=… --net=…` would: `weft exec -- ping 10.244.2.1`.
    Exec(ExecArgs),
}

#[derive(Debug, Args)]
struct ExecArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct LeaveArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Seconds to wait for the daemon to finish leaving.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

#[derive(Debug, Subcommand)]
enum NetworkCommand {
    /// Write the network config (flannel's net-conf JSON) into the store.
    Init(NetworkInitArgs),
}

#[derive(Debug, Args)]
struct StoreArgs {
    /// file (embedded) or etcd [default: file].
    #[arg(long, env = "WEFT_STORE")]
    store: Option<String>,
    /// File store directory [default: /var/lib/weft/store].
    #[arg(long, env = "WEFT_STORE_DIR")]
    store_dir: Option<PathBuf>,
    /// etcd client URLs, comma-separated.
    #[arg(long, env = "WEFT_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Option<Vec<String>>,
    /// etcd key prefix [default: /coreos.com/network].
    #[arg(long, env = "WEFT_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    /// PEM CA bundle for etcd's server certificate [default with https://: the system trust store].
    #[arg(long, env = "WEFT_ETCD_CAFILE")]
    etcd_cafile: Option<PathBuf>,
    /// PEM client certificate, for an etcd with --client-cert-auth (needs --etcd-keyfile).
    #[arg(long, env = "WEFT_ETCD_CERTFILE")]
    etcd_certfile: Option<PathBuf>,
    /// PEM private key of --etcd-certfile.
    #[arg(long, env = "WEFT_ETCD_KEYFILE")]
    etcd_keyfile: Option<PathBuf>,
    /// etcd user, for an etcd with auth enabled (needs a password).
    #[arg(long, env = "WEFT_ETCD_USERNAME")]
    etcd_username: Option<String>,
    /// Password of --etcd-username; prefer the environment variable, which `ps` does not show.
    #[arg(long, env = "WEFT_ETCD_PASSWORD", hide_env_values = true, value_parser = password)]
    etcd_password: Option<Password>,
}

fn password(s: &str) -> Result<Password, std::convert::Infallible> {
    Ok(Password::new(s))
}

impl StoreArgs {
    fn raw(&self) -> RawConfig {
        RawConfig {
            store: self.store.clone(),
            store_dir: self.store_dir.clone(),
            etcd_endpoints: self.etcd_endpoints.clone(),
            etcd_prefix: self.etcd_prefix.clone(),
            etcd_cafile: self.etcd_cafile.clone(),
            etcd_certfile: self.etcd_certfile.clone(),
            etcd_keyfile: self.etcd_keyfile.clone(),
            etcd_username: self.etcd_username.clone(),
            etcd_password: self.etcd_password.clone(),
            ..RawConfig::default()
        }
    }
}

#[derive(Debug, Args)]
struct NetworkInitArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Cluster network.
    #[arg(long, default_value = config::DEFAULT_NETWORK)]
    network: String,
    /// Prefix length of node subnets [default: flannel's, 24].
    #[arg(long)]
    subnet_len: Option<u8>,
    /// Wire format: udp, vxlan or wireguard.
    #[arg(long, default_value = "udp")]
    backend: String,
    /// VXLAN network identifier.
    #[arg(long)]
    vni: Option<u32>,
    /// Underlay UDP port [default: 8285 udp, 8472 vxlan].
    #[arg(long)]
    port: Option<u16>,
    /// Use this net-conf JSON file instead of the flags.
    #[arg(long, conflicts_with_all = ["subnet_len", "vni", "port"])]
    json: Option<PathBuf>,
    /// Replace an existing config.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct LeasesArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum IpamCommand {
    /// An address for a container's interface (the same one again if it has one).
    Allocate(IpamArgs),
    /// The address a container's interface holds.
    Get(IpamArgs),
    /// Free a container's interface's address.
    Release(IpamArgs),
    /// Every allocation.
    List(SocketArg),
    /// Free every allocation not in --valid.
    Gc(IpamGcArgs),
}

#[derive(Debug, Args)]
struct SocketArg {
    /// The daemon's API socket.
    #[arg(long, default_value_os_t = daemon::rootless::default_api_socket())]
    socket: PathBuf,
}

#[derive(Debug, Args)]
struct IpamArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// CNI_CONTAINERID.
    #[arg(long)]
    container_id: String,
    /// CNI_IFNAME.
    #[arg(long, default_value = "eth0")]
    ifname: String,
}

#[derive(Debug, Args)]
struct IpamGcArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Attachments still alive: CONTAINER/IFNAME, comma-separated (empty frees everything).
    #[arg(long, value_delimiter = ',', default_value = "")]
    valid: Vec<String>,
}

/// The rule for `weft run`'s environment variables, shown under `weft run --help`.
const RUN_ENV_HELP: &str = "\
Every flag can also be given as an environment variable: WEFT_ and the flag's long name in
capitals, '-' written '_' (--node-name: WEFT_NODE_NAME, --etcd-endpoints: WEFT_ETCD_ENDPOINTS),
as flanneld reads FLANNELD_*. A flag on the command line wins over its variable, and both win
over the config file. On/off flags take true/false, yes/no, on/off or 1/0; repeated --peer
values are separated by ';' in WEFT_PEER. RUST_LOG, when set, wins over --log-level.";

#[derive(Debug, Args)]
#[command(after_help = RUN_ENV_HELP)]
struct RunArgs {
    /// TOML config file; flags override its fields.
    #[arg(long, short = 'c', env = "WEFT_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name.
    #[arg(long, env = "WEFT_NODE_NAME")]
    node_name: Option<String>,
    /// Underlay address to bind and publish [default: the first IPv4 address of --iface, else
    /// of the interface of the IPv4 default route, as flanneld].
    #[arg(long, env = "WEFT_PUBLIC_IP")]
    public_ip: Option<String>,
    /// Underlay interface, by name or by one of its addresses (flanneld's --iface): public_ip
    /// defaults to its first IPv4 address [default: the interface of the IPv4 default route].
    #[arg(long, env = "WEFT_IFACE")]
    iface: Option<String>,
    /// Wire format: udp, vxlan or wireguard (authenticated, encrypted) [default: udp].
    #[arg(long, env = "WEFT_BACKEND")]
    backend: Option<String>,
    /// wireguard: this node's private key file, created 0600 on first start
    /// [default: /var/lib/weft/keys/<node-name>.key].
    #[arg(long, env = "WEFT_WIREGUARD_KEY_FILE")]
    wireguard_key_file: Option<std::path::PathBuf>,
    /// Underlay UDP port [default: 8285 for udp, 8472 for vxlan, 51820 for wireguard].
    #[arg(long, env = "WEFT_PORT")]
    port: Option<u16>,
    /// VXLAN network identifier [default: 1].
    #[arg(long, env = "WEFT_VNI")]
    vni: Option<u32>,
    /// Our VTEP MAC [default: derived from the node name].
    #[arg(long, env = "WEFT_VTEP_MAC")]
    vtep_mac: Option<String>,
    /// Send outer UDP checksums with VXLAN [default: false, as Linux vxlan].
    #[arg(long, env = "WEFT_UDP_CHECKSUM")]
    udp_checksum: Option<bool>,
    /// Cluster network [default: 10.244.0.0/16].
    #[arg(long, env = "WEFT_NETWORK")]
    network: Option<String>,
    /// This node's subnet.
    #[arg(long, env = "WEFT_SUBNET")]
    subnet: Option<String>,
    /// TUN device name [default: weft0].
    #[arg(long, env = "WEFT_TUN_NAME")]
    tun_name: Option<String>,
    /// tun (IP packets) or tap (Ethernet frames; vxlan only) [default: tun].
    #[arg(long, env = "WEFT_DEVICE")]
    device: Option<String>,
    /// Overlay MTU [default: the network config's Backend.MTU, else the underlay MTU minus the
    /// encapsulation overhead].
    #[arg(long, env = "WEFT_MTU")]
    mtu: Option<u16>,
    /// Worker threads [default: one per core].
    #[arg(long, env = "WEFT_WORKERS")]
    workers: Option<usize>,
    /// I/O backend: auto, uring or mmsg [default: auto].
    #[arg(long, env = "WEFT_IO")]
    io: Option<String>,
    /// API socket path [default: /run/weft/weft.sock].
    #[arg(long, env = "WEFT_API_SOCKET")]
    api_socket: Option<PathBuf>,
    /// A static peer: name=N,subnet=CIDR,endpoint=IP[:PORT][,mac=MAC][,mtu=M] (repeatable; replaces the file's list).
    #[arg(long = "peer", env = "WEFT_PEER", value_delimiter = ';', value_parser = RawPeer::from_flag)]
    peers: Vec<RawPeer>,
    /// Lease mode: where the store is.
    #[command(flatten)]
    store: StoreArgs,
    /// Where to write subnet.env [default: /run/weft/subnet.env, or /run/flannel/subnet.env
    /// with --flannel-paths].
    #[arg(long, env = "WEFT_SUBNET_FILE")]
    subnet_file: Option<PathBuf>,
    /// Use flannel's paths for what flannel's CNI plugin and tools read: subnet.env defaults to
    /// /run/flannel/subnet.env (lease mode).
    #[arg(long, env = "WEFT_FLANNEL_PATHS", value_parser = BoolishValueParser::new())]
    flannel_paths: bool,
    /// Lease lifetime in seconds [default: 86400].
    #[arg(long, env = "WEFT_LEASE_TTL_SECS")]
    lease_ttl_secs: Option<u64>,
    /// Release the lease on a graceful stop (and remove the fail-closed route): every stop is
    /// then a leave.
    #[arg(long, env = "WEFT_RELEASE_ON_EXIT", value_parser = BoolishValueParser::new())]
    release_on_exit: bool,
    /// Run without root: the TUN in a user and network namespace of weft's own, the UDP socket
    /// in the host's, state under $XDG_RUNTIME_DIR/weft and $XDG_DATA_HOME/weft. On by itself
    /// when weft runs as an ordinary user; `--rootless=false` turns that off.
    #[arg(
        long,
        env = "WEFT_ROOTLESS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    rootless: Option<bool>,
    /// Rootless: join this user namespace (a `…/ns/user` path: rootlesskit's, podman's)
    /// instead of creating one.
    #[arg(long, env = "WEFT_USERNS", requires = "netns")]
    userns: Option<PathBuf>,
    /// Rootless: put the TUN in this network namespace (a `…/ns/net` path owned by
    /// `--userns`) instead of a new one.
    #[arg(long, env = "WEFT_NETNS", requires = "userns")]
    netns: Option<PathBuf>,
    /// Lease cache: the last known leases, so a restart while the store is down comes up at
    /// once [default: /var/lib/weft/leases/<node name>.json].
    #[arg(long, env = "WEFT_LEASE_CACHE")]
    lease_cache: Option<PathBuf>,
    /// Pod allocation directory [default: /var/lib/weft/pods/<node name>].
    #[arg(long, env = "WEFT_POD_DIR")]
    pod_dir: Option<PathBuf>,
    /// GC spares pod allocations younger than this many seconds [default: 60].
    #[arg(long, env = "WEFT_POD_GC_GRACE_SECS")]
    pod_gc_grace_secs: Option<u64>,
    /// Where weft-cni records releases it could not hand over while the daemon was down; the
    /// daemon frees them at start and every 30 s [default: /var/lib/weft/pending-release].
    #[arg(long, env = "WEFT_PENDING_RELEASE_DIR")]
    pending_release_dir: Option<PathBuf>,
    /// Masquerade pod traffic leaving the cluster network to the node's address, as flannel's
    /// --ip-masq (nftables table `ip weft-<tun>`; `--ip-masq=false` turns it off).
    #[arg(
        long,
        env = "WEFT_IP_MASQ",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    ip_masq: Option<bool>,
    /// Address of /healthz, /readyz and /metrics [default: 127.0.0.1].
    #[arg(long, env = "WEFT_HEALTHZ_IP")]
    healthz_ip: Option<String>,
    /// Port of /healthz, /readyz and /metrics; 0 turns them off [default: 0].
    #[arg(long, env = "WEFT_HEALTHZ_PORT")]
    healthz_port: Option<u16>,
    /// Log format: text or json.
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Log level: error, warn, info, debug or trace (klog's -v=N also works: 0 info, 1-4
    /// debug, 5 and up trace). RUST_LOG, when set, wins: it can pick levels per module.
    #[arg(long, short = 'v', env = "WEFT_LOG_LEVEL", default_value = "info", value_parser = log_level)]
    log_level: tracing::Level,
}

/// A `--log-level`: a level name, or flanneld's (klog's) `-v=N` verbosity.
fn log_level(s: &str) -> Result<tracing::Level, String> {
    if let Ok(n) = s.parse::<u8>() {
        return Ok(match n {
            0 => tracing::Level::INFO,
            1..=4 => tracing::Level::DEBUG,
            _ => tracing::Level::TRACE,
        });
    }
    s.parse().map_err(|_| format!("{s:?} is not a log level (error, warn, info, debug, trace)"))
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The daemon's API socket.
    #[arg(long, default_value_os_t = daemon::rootless::default_api_socket())]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The log filter: `RUST_LOG` when it is set (and valid), else `level` for weft's own crates.
///
/// `RUST_LOG` wins because it is the finer tool (levels per module, `weft_ipam=trace`) and is
/// only ever set on purpose, while `--log-level` / `WEFT_LOG_LEVEL` sit in a unit file. At
/// debug and trace, other crates (tokio, h2, tonic) stay at info: their debug output is
/// per-frame noise that drowns weft's. Returns the filter and, for an unusable `RUST_LOG`,
/// why it was ignored.
fn log_filter(level: tracing::Level, rust_log: Option<&str>) -> (tracing_subscriber::EnvFilter, Option<String>) {
    use tracing_subscriber::EnvFilter;
    let ignored = match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        Some(directives) => match EnvFilter::try_new(directives) {
            Ok(f) => return (f, None),
            Err(e) => Some(format!("RUST_LOG={directives:?} ignored: {e}")),
        },
        None => None,
    };
    let l = level.as_str().to_ascii_lowercase();
    let directives =
        if level <= tracing::Level::INFO { l } else { format!("info,weft={l},weft_ipam={l},weft_forwarder={l}") };
    (EnvFilter::new(directives), ignored)
}

/// Logs go to stderr, with colours only on a terminal (and not with `NO_COLOR`), so that a
/// journal or a container log gets plain text.
fn init_logging(format: &str, level: tracing::Level) {
    use std::io::IsTerminal;
    let (filter, ignored) = log_filter(level, std::env::var("RUST_LOG").ok().as_deref());
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if format == "json" {
        b.json().init()
    } else {
        b.init()
    }
    if let Some(why) = ignored {
        tracing::warn!("{why}; using --log-level {}", level.as_str().to_ascii_lowercase());
    }
}

fn run(args: RunArgs) -> ExitCode {
    if !matches!(args.log_format.as_str(), "text" | "json") {
        eprintln!("error: --log-format: {:?} must be \"text\" or \"json\"", args.log_format);
        return ExitCode::from(2);
    }
    init_logging(&args.log_format, args.log_level);
    let flags = RawConfig {
        node_name: args.node_name,
        public_ip: args.public_ip,
        iface: args.iface,
        backend: args.backend,
        wireguard_key_file: args.wireguard_key_file,
        port: args.port,
        vni: args.vni,
        vtep_mac: args.vtep_mac,
        udp_checksum: args.udp_checksum,
        network: args.network,
        subnet: args.subnet,
        tun_name: args.tun_name,
        device: args.device,
        mtu: args.mtu,
        workers: args.workers,
        io: args.io,
        api_socket: args.api_socket,
        peers: args.peers,
        subnet_file: args.subnet_file,
        flannel_paths: args.flannel_paths.then_some(true),
        lease_ttl_secs: args.lease_ttl_secs,
        release_on_exit: args.release_on_exit.then_some(true),
        lease_cache: args.lease_cache,
        pod_dir: args.pod_dir,
        pod_gc_grace_secs: args.pod_gc_grace_secs,
        pending_release_dir: args.pending_release_dir,
        ip_masq: args.ip_masq,
        healthz_ip: args.healthz_ip,
        healthz_port: args.healthz_port,
        ..args.store.raw()
    };
    let rootless = args.rootless.unwrap_or_else(daemon::rootless::is_unprivileged);
    let (overlay, rootless_dirs) = if rootless {
        match enter_rootless(args.userns.as_deref(), args.netns.as_deref()) {
            Ok((o, d)) => (Some(o), Some(d)),
            Err((code, e)) => {
                tracing::error!(error = %e, exit_code = code, "weft run failed");
                return ExitCode::from(code);
            }
        }
    } else {
        (None, None)
    };
    let source = ConfigSource { path: args.config, flags, detected_public_ip: None, rootless_dirs };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, exit_code = 1, "weft run failed: cannot start runtime");
            return ExitCode::from(1);
        }
    };
    // One line for a failed start, through the log (so it is JSON with --log-format json and
    // lands in the journal with the rest), not a second copy on stderr.
    match rt.block_on(daemon::run(source, overlay)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.exit_code() == 0 => {
            tracing::info!(reason = %e, "weft stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = e.exit_code();
            tracing::error!(error = %e, exit_code = code, "weft run failed");
            ExitCode::from(code)
        }
    }
}

/// Rootless start, before any thread exists: the user namespace, then the overlay network
/// namespace. Exit 3 for missing directories (configuration), 4 for what the kernel refuses.
fn enter_rootless(
    userns: Option<&std::path::Path>,
    netns: Option<&std::path::Path>,
) -> Result<(daemon::rootless::Overlay, daemon::rootless::Dirs), (u8, String)> {
    use daemon::rootless;
    let dirs = rootless::Dirs::from_env().map_err(|e| (3, e.to_string()))?;
    rootless::check_tun_access().map_err(|e| (4, e.to_string()))?;
    rootless::enter_user_namespace(userns).map_err(|e| (4, e.to_string()))?;
    let overlay = rootless::Overlay::create(netns).map_err(|e| (4, e.to_string()))?;
    let (userns, netns) = overlay.ns_paths();
    tracing::info!(userns = %userns.display(), netns = %netns.display(), state = %dirs.runtime.display(), "rootless: own user and network namespace");
    Ok((overlay, dirs))
}

fn status(args: StatusArgs) -> ExitCode {
    match api::query_status(&args.socket) {
        Ok(s) if args.json => match serde_json::to_string_pretty(&s) {
            Ok(j) => {
                println!("{j}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        Ok(s) => {
            print!("{}", status::render(&s));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(7)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
        eprintln!("error: cannot start runtime: {e}");
        ExitCode::from(1)
    })
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(code)
}

fn store_exit_code(e: &StoreError) -> u8 {
    if e.is_transient() { 1 } else { 3 }
}

fn network_init(a: NetworkInitArgs) -> ExitCode {
    let settings = match StoreSettings::from_raw(&a.store.raw()) {
        Ok(s) => s,
        Err(e) => return fail(3, e),
    };
    let text = match &a.json {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) => return fail(3, format!("--json: cannot read {}: {e}", p.display())),
        },
        None => {
            let mut backend = serde_json::json!({ "Type": a.backend });
            if let Some(v) = a.vni {
                backend["VNI"] = v.into();
            }
            if let Some(p) = a.port {
                backend["Port"] = p.into();
            }
            let mut net = serde_json::json!({ "Network": a.network, "Backend": backend });
            if let Some(l) = a.subnet_len {
                net["SubnetLen"] = l.into();
            }
            net.to_string()
        }
    };
    let net = match NetworkConfig::from_json(&text) {
        Ok(n) => n,
        Err(e) => return fail(3, e),
    };
    let Ok(rt) = runtime() else { return ExitCode::from(1) };
    rt.block_on(async {
        let store = match daemon::lease::open_store(&settings).await {
            Ok(s) => s,
            Err(e) => return fail(store_exit_code(&e), e),
        };
        if !a.force {
            match store.get_config().await {
                Ok(existing) => {
                    return fail(
                        3,
                        format!(
                            "the store already has a network config (use --force to replace it): {}",
                            existing.to_json()
                        ),
                    );
                }
                Err(StoreError::ConfigMissing { .. }) => {}
                Err(e) if e.is_transient() => return fail(1, e),
                Err(_) => {}
            }
        }
        match store.put_config(&net).await {
            Ok(()) => {
                println!("{}", net.to_json());
                ExitCode::SUCCESS
            }
            Err(e) => fail(store_exit_code(&e), e),
        }
    })
}

fn leases(a: LeasesArgs) -> ExitCode {
    let settings = match StoreSettings::from_raw(&a.store.raw()) {
        Ok(s) => s,
        Err(e) => return fail(3, e),
    };
    let Ok(rt) = runtime() else { return ExitCode::from(1) };
    rt.block_on(async {
        let store = match daemon::lease::open_store(&settings).await {
            Ok(s) => s,
            Err(e) => return fail(store_exit_code(&e), e),
        };
        let snap = match store.list().await {
            Ok(s) => s,
            Err(e) => return fail(store_exit_code(&e), e),
        };
        let now = std::time::SystemTime::now();
        let rows: Vec<serde_json::Value> = snap
            .leases
            .iter()
            .map(|l| {
                serde_json::json!({
                    "subnet": l.subnet.to_string(),
                    "public_ip": l.attrs.public_ip.to_string(),
                    "backend_type": l.attrs.backend_type,
                    "backend_data": l.attrs.backend_data,
                    "expires_in_secs": l.expiration.map(|t| t.duration_since(now).map_or(0, |d| d.as_secs())),
                })
            })
            .collect();
        if a.json {
            println!("{}", serde_json::Value::Array(rows));
        } else {
            println!("{:<20} {:<16} {:<8} {:>12}  BACKEND DATA", "SUBNET", "PUBLIC IP", "BACKEND", "EXPIRES IN");
            for r in &rows {
                let exp = r["expires_in_secs"].as_u64().map_or_else(|| "never".to_string(), |s| format!("{s}s"));
                println!(
                    "{:<20} {:<16} {:<8} {:>12}  {}",
                    r["subnet"].as_str().unwrap_or_default(),
                    r["public_ip"].as_str().unwrap_or_default(),
                    r["backend_type"].as_str().unwrap_or_default(),
                    exp,
                    r["backend_data"]
                );
            }
            for u in &snap.unreadable {
                println!("unreadable record {u:?}");
            }
        }
        ExitCode::SUCCESS
    })
}

fn ipam(c: IpamCommand) -> ExitCode {
    let att = |a: &IpamArgs| api::AttachmentRef { container_id: a.container_id.clone(), ifname: a.ifname.clone() };
    let (socket, req) = match &c {
        IpamCommand::Allocate(a) => (&a.socket.socket, api::Request::Allocate(att(a))),
        IpamCommand::Get(a) => (&a.socket.socket, api::Request::Get(att(a))),
        IpamCommand::Release(a) => (&a.socket.socket, api::Request::Release(att(a))),
        IpamCommand::List(s) => (&s.socket, api::Request::List),
        IpamCommand::Gc(g) => {
            let mut valid = Vec::new();
            for v in g.valid.iter().filter(|v| !v.is_empty()) {
                let Some((c, i)) = v.split_once('/') else {
                    return fail(2, format!("--valid: {v:?} is not CONTAINER/IFNAME"));
                };
                valid.push(api::AttachmentRef { container_id: c.into(), ifname: i.into() });
            }
            (&g.socket.socket, api::Request::Gc { valid })
        }
    };
    match api::request(socket, &req) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(api::ClientError::Refused(e)) => fail(8, format!("{} ({})", e.message, e.code)),
        Err(e) => fail(7, e),
    }
}

fn leave(a: LeaveArgs) -> ExitCode {
    let path = &a.socket.socket;
    match api::request(path, &api::Request::Leave) {
        Ok(_) => {}
        Err(api::ClientError::Refused(e)) => return fail(8, format!("{} ({})", e.message, e.code)),
        Err(e) => return fail(7, e),
    }
    // The daemon removes its socket last, once the lease is released and the routes are gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(a.timeout_secs);
    while path.exists() {
        if std::time::Instant::now() >= deadline {
            return fail(1, format!("the daemon did not finish leaving within {} s", a.timeout_secs));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!("left the cluster");
    ExitCode::SUCCESS
}

fn exec(a: ExecArgs) -> ExitCode {
    let ns = match api::query_status(&a.socket.socket) {
        Ok(s) => match s.rootless {
            Some(r) => r,
            None => {
                return fail(
                    3,
                    "the daemon runs as root: its pods are in the host's namespaces (use ip netns exec or nsenter)",
                );
            }
        },
        Err(e) => return fail(7, e),
    };
    let (Some(program), args) = (a.command.first(), a.command.get(1..).unwrap_or_default()) else {
        return fail(2, "no command given");
    };
    if let Err(e) = daemon::rootless::join(&ns.userns, &ns.netns) {
        return fail(4, e);
    }
    use std::os::unix::process::CommandExt as _;
    let err = std::process::Command::new(program).args(args).exec();
    fail(if err.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 }, format!("{program}: {err}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => run(*a),
        Command::Status(a) => status(a),
        Command::Network { command: NetworkCommand::Init(a) } => network_init(a),
        Command::Leases(a) => leases(a),
        Command::Ipam { command } => ipam(command),
        Command::Leave(a) => leave(a),
        Command::Exec(a) => exec(a),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// flanneld's convention, FLANNELD_<FLAG>: every `weft run` flag has its variable, named
    /// by one rule, so a DaemonSet can set any of them without a command line.
    #[test]
    fn every_run_flag_has_its_weft_variable() {
        let cli = Cli::command();
        let run = cli.find_subcommand("run").expect("run subcommand");
        let mut checked = 0;
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let want = format!("WEFT_{}", long.to_ascii_uppercase().replace('-', "_"));
            let got = arg.get_env().and_then(|e| e.to_str());
            assert_eq!(got, Some(want.as_str()), "--{long}");
            checked += 1;
        }
        assert!(checked >= 30, "only {checked} flags seen");
    }

    #[test]
    fn env_rule_is_in_the_help() {
        let help = Cli::command().find_subcommand_mut("run").expect("run").render_long_help().to_string();
        assert!(help.contains("WEFT_NODE_NAME") && help.contains("WEFT_ and the flag's long name"), "{help}");
    }

    #[test]
    fn log_levels_by_name_and_by_klog_number() {
        assert_eq!(log_level("debug"), Ok(tracing::Level::DEBUG));
        assert_eq!(log_level("WARN"), Ok(tracing::Level::WARN));
        assert_eq!(log_level("0"), Ok(tracing::Level::INFO));
        assert_eq!(log_level("2"), Ok(tracing::Level::DEBUG));
        assert_eq!(log_level("9"), Ok(tracing::Level::TRACE));
        assert!(log_level("loud").unwrap_err().contains("error, warn, info, debug, trace"));
        let parsed = Cli::try_parse_from(["weft", "run", "-v=2"]).expect("-v=2 parses");
        let Command::Run(a) = parsed.command else { panic!("not run") };
        assert_eq!(a.log_level, tracing::Level::DEBUG);
    }

    #[test]
    fn rust_log_wins_over_the_level_unless_unusable() {
        let show = |level, rust_log| {
            let (f, why) = log_filter(level, rust_log);
            (f.to_string(), why.is_some())
        };
        assert_eq!(show(tracing::Level::WARN, None), ("warn".to_owned(), false));
        assert_eq!(show(tracing::Level::INFO, Some("  ")), ("info".to_owned(), false));
        let (f, ignored) = show(tracing::Level::DEBUG, None);
        assert!(f.contains("weft=debug") && f.contains("weft_ipam=debug") && !ignored, "{f}");
        assert_eq!(show(tracing::Level::ERROR, Some("weft_ipam=trace")), ("weft_ipam=trace".to_owned(), false));
        let (f, ignored) = show(tracing::Level::INFO, Some("weft=[[["));
        assert_eq!((f.as_str(), ignored), ("info", true));
    }
}
