//! The `weft` command: `weft run` starts the daemon, `weft status` asks it how it is doing.
//!
//! Exit codes (stable): 0 success, 1 runtime failure, 2 bad command line, 3 bad
//! configuration, 4 missing privilege or `/dev/net/tun`, 5 address in use, 6 io_uring
//! demanded but unavailable, 7 daemon not reachable.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use weft::config::{self, RawConfig, RawPeer};
use weft::daemon::{self, ConfigSource, api};
use weft::status;

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
}

#[derive(Debug, Args)]
struct RunArgs {
    /// TOML config file; flags override its fields.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// This node's name.
    #[arg(long)]
    node_name: Option<String>,
    /// Underlay address to bind and publish.
    #[arg(long)]
    public_ip: Option<String>,
    /// Wire format: udp or vxlan [default: udp].
    #[arg(long)]
    backend: Option<String>,
    /// Underlay UDP port [default: 8285 for udp, 8472 for vxlan].
    #[arg(long)]
    port: Option<u16>,
    /// VXLAN network identifier [default: 1].
    #[arg(long)]
    vni: Option<u32>,
    /// Our VTEP MAC [default: derived from the node name].
    #[arg(long)]
    vtep_mac: Option<String>,
    /// Send outer UDP checksums with VXLAN [default: false, as Linux vxlan].
    #[arg(long)]
    udp_checksum: Option<bool>,
    /// Cluster network [default: 10.244.0.0/16].
    #[arg(long)]
    network: Option<String>,
    /// This node's subnet.
    #[arg(long)]
    subnet: Option<String>,
    /// TUN device name [default: weft0].
    #[arg(long)]
    tun_name: Option<String>,
    /// tun (IP packets) or tap (Ethernet frames; vxlan only) [default: tun].
    #[arg(long)]
    device: Option<String>,
    /// Overlay MTU [default: underlay MTU minus encapsulation overhead].
    #[arg(long)]
    mtu: Option<u16>,
    /// Worker threads [default: one per core].
    #[arg(long)]
    workers: Option<usize>,
    /// I/O backend: auto, uring or mmsg [default: auto].
    #[arg(long)]
    io: Option<String>,
    /// API socket path [default: /run/weft/weft.sock].
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// A static peer: name=N,subnet=CIDR,endpoint=IP[:PORT][,mac=MAC][,mtu=M] (repeatable; replaces the file's list).
    #[arg(long = "peer", value_parser = RawPeer::from_flag)]
    peers: Vec<RawPeer>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The daemon's API socket.
    #[arg(long, default_value = config::DEFAULT_API_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" { b.json().init() } else { b.init() }
}

fn run(args: RunArgs) -> ExitCode {
    if !matches!(args.log_format.as_str(), "text" | "json") {
        eprintln!("error: --log-format: {:?} must be \"text\" or \"json\"", args.log_format);
        return ExitCode::from(2);
    }
    init_logging(&args.log_format);
    let flags = RawConfig {
        node_name: args.node_name,
        public_ip: args.public_ip,
        backend: args.backend,
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
        ..RawConfig::default()
    };
    let source = ConfigSource { path: args.config, flags };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(daemon::run(source)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "weft run failed");
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => run(*a),
        Command::Status(a) => status(a),
    }
}
