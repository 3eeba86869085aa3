//! A UDP request/response latency probe, like netperf's `UDP_RR`: a client sends a 64-byte
//! request and blocks until the echo comes back, and every round trip goes into an
//! hdrhistogram.
//!
//! Why not only `ping`: iputils ping **spins** between probes sent less than one clock tick
//! apart (`sched_yield` plus non-blocking receives; measured here at 1.94 CPU-seconds over
//! 2 s with `-i 0.005`). On a 2-vCPU machine that takes a whole CPU away from what is being
//! measured. A userspace forwarder needs CPUs for its workers, the kernel's vxlan runs in
//! the sender's softirq, so the spinning probe costs the two very differently. This probe
//! only sleeps in `recv` (or between spaced probes in `sleep`), as a real client does.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;

/// The probe's UDP port on the server.
pub const PORT: u16 = 7999;
/// Request and response size, bytes of UDP payload.
const PAYLOAD: usize = 64;
/// A probe not answered within this is counted lost.
const TIMEOUT: Duration = Duration::from_secs(1);

/// How probes follow each other.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Pace {
    /// The next request as soon as the response arrives (netperf `UDP_RR`): the path is
    /// never idle.
    BackToBack,
    /// A sleep of this long between a response and the next request: every probe finds the
    /// path idle (and a virtual CPU possibly halted).
    Spaced(Duration),
}

/// Round-trip times in microseconds, and what was lost.
#[derive(Debug)]
pub struct RrResult {
    /// RTTs, µs.
    pub hist: Histogram<u64>,
    /// Requests sent.
    pub sent: u64,
    /// Transactions per second (responses over the run's wall time).
    pub per_second: f64,
}

/// Echoes every datagram on `PORT` back to its sender until `stop` is set. Run it on a
/// thread inside the server's namespace ([`crate::netns_thread::spawn_in`]).
///
/// # Errors
/// The socket cannot be bound or fails.
pub fn serve(stop: &Arc<AtomicBool>) -> Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", PORT)).with_context(|| format!("binding UDP port {PORT}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(100))).context("setting a read timeout")?;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                // A lost reply is the client's to count.
                let _ = sock.send_to(&buf[..n], from);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("receiving a probe"),
        }
    }
    Ok(())
}

/// Sends requests to `dst` (port [`PORT`]) for `run`, paced by `pace`, and records each
/// round trip. Run it on a thread inside the client's namespace.
///
/// # Errors
/// The socket fails, or not a single response came back.
pub fn probe(dst: SocketAddr, pace: Pace, run: Duration) -> Result<RrResult> {
    let sock = UdpSocket::bind(("0.0.0.0", 0)).context("binding the probe socket")?;
    sock.connect(dst).with_context(|| format!("connecting to {dst}"))?;
    sock.set_read_timeout(Some(TIMEOUT)).context("setting a read timeout")?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    let mut req = [0u8; PAYLOAD];
    let mut resp = [0u8; 2048];
    let (start, mut sent) = (Instant::now(), 0u64);
    while start.elapsed() < run {
        sent += 1;
        req[..8].copy_from_slice(&sent.to_be_bytes());
        let t0 = Instant::now();
        sock.send(&req).context("sending a probe")?;
        // Skip late answers to earlier (timed-out) probes.
        loop {
            match sock.recv(&mut resp) {
                Ok(n) if n >= 8 && resp[..8] == req[..8] => {
                    let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
                    hist.record(us).context("recording an RTT")?;
                    break;
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                // ICMP port unreachable before the server is up, and the like: lost.
                Err(_) => break,
            }
        }
        if let Pace::Spaced(gap) = pace {
            std::thread::sleep(gap);
        }
    }
    if hist.is_empty() {
        bail!("no probe to {dst} was answered");
    }
    let per_second = hist.len() as f64 / start.elapsed().as_secs_f64();
    Ok(RrResult { hist, sent, per_second })
}
