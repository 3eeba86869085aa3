//! `weft-craft`: sends crafted flannel-`udp` datagrams (the UDP payload is a bare inner IPv4
//! packet) from inside a namespace, to test what weft's decapsulation drops and counts.
//!
//! ```text
//! ip netns exec wt<pid>-drops-atk weft-craft --bind 198.18.0.9:0 --to 198.18.0.1:8285 \
//!     --src 10.244.2.1 --dst 10.244.1.1 --count 100
//! ```

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use weft_netns_tests::craft;

/// Send crafted weft/flannel-udp datagrams: an ICMP echo request as the bare UDP payload, or
/// arbitrary bytes with --raw-hex.
#[derive(Debug, Parser)]
#[command(name = "weft-craft", version)]
struct Args {
    /// Local address to send from; port 0 picks one. Binding a peer's exact ip:port makes the
    /// datagram look like that peer's.
    #[arg(long, value_name = "IP:PORT")]
    bind: SocketAddrV4,

    /// weft node to send to.
    #[arg(long, value_name = "IP:PORT")]
    to: SocketAddrV4,

    /// Inner source address.
    #[arg(long, value_name = "IPV4", required_unless_present = "raw_hex")]
    src: Option<Ipv4Addr>,

    /// Inner destination address.
    #[arg(long, value_name = "IPV4", required_unless_present = "raw_hex")]
    dst: Option<Ipv4Addr>,

    /// Number of datagrams to send.
    #[arg(long, default_value_t = 1)]
    count: u64,

    /// Inner IPv4 TTL.
    #[arg(long, default_value_t = 64)]
    ttl: u8,

    /// Total inner packet length in bytes, IPv4 header included (28..=65507).
    #[arg(long, default_value_t = 64, value_parser = parse_len)]
    len: usize,

    /// Send these bytes as the UDP payload instead of an echo request (malformed packets).
    /// Accepts `4500001c`, `45 00 00 1c`, `45:00:00:1c` or `0x4500001c`.
    #[arg(long, value_name = "HEX", value_parser = parse_hex,
          conflicts_with_all = ["src", "dst"])]
    raw_hex: Option<Hex>,

    /// Microseconds to wait between datagrams, so a burst does not overrun the receiver's
    /// socket buffer when a test counts drops exactly.
    #[arg(long, value_name = "MICROS", default_value_t = 0)]
    gap_us: u64,
}

/// Payload bytes from `--raw-hex` (a newtype, because clap reads `Vec<u8>` as many values).
#[derive(Clone, Debug)]
struct Hex(Vec<u8>);

fn parse_len(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e} (expected a byte count)"))?;
    if (craft::MIN_LEN..=craft::MAX_LEN).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is outside {}..={}", craft::MIN_LEN, craft::MAX_LEN))
    }
}

fn parse_hex(s: &str) -> Result<Hex, String> {
    let bytes = craft::parse_hex(s).map_err(|e| format!("{e:#}"))?;
    if bytes.len() > craft::MAX_LEN {
        return Err(format!("{} bytes is more than a UDP payload can hold ({})", bytes.len(), craft::MAX_LEN));
    }
    Ok(Hex(bytes))
}

/// The payload of datagram number `i`.
fn payload(args: &Args, i: u64) -> Result<Vec<u8>> {
    if let Some(Hex(bytes)) = &args.raw_hex {
        return Ok(bytes.clone());
    }
    let src = args.src.context("--src is required without --raw-hex")?;
    let dst = args.dst.context("--dst is required without --raw-hex")?;
    // The sequence number wraps, as ping's does.
    craft::icmp_echo_request(src, dst, args.ttl, args.len, i as u16)
}

fn run(args: &Args) -> Result<()> {
    let sock = UdpSocket::bind(args.bind).with_context(|| format!("--bind {}", args.bind))?;
    let local = sock.local_addr().context("reading the bound address")?;
    let mut bytes = 0;
    for i in 0..args.count {
        let p = payload(args, i)?;
        sock.send_to(&p, args.to).with_context(|| format!("sending datagram {i} from {local} to --to {}", args.to))?;
        bytes = p.len();
        if args.gap_us > 0 {
            thread::sleep(Duration::from_micros(args.gap_us));
        }
    }
    eprintln!("weft-craft: sent {} datagram(s) of {bytes} bytes from {local} to {}", args.count, args.to);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-craft: {e:#}");
            ExitCode::FAILURE
        }
    }
}
