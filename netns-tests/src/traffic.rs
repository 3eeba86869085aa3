//! Real traffic between namespaces: ping and iperf3, each with a hard deadline.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cmd::{self, CmdOutput, Proc};
use crate::netns::Netns;
use crate::report;

/// iperf3's default port.
pub const IPERF_PORT: u16 = 5201;

/// How long an iperf3 server gets to start listening.
const IPERF_LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// `ping -n -c <count> -i 0.2 -W 1 -w <count+2> <dst>` from `ns`.
///
/// Returns the output whatever the result, because some tests need a ping to fail. ping exits 0
/// when at least one reply arrived; use [`ping_all`] to require every reply.
///
/// # Errors
///
/// Fails only if ping cannot be started.
pub fn ping(ns: &Netns, dst: &str, count: u32) -> Result<CmdOutput> {
    ping_with(ns, &[], dst, count)
}

/// [`ping`] with extra arguments before the destination (`-M do -s 1300`, `-I <src>`).
///
/// # Errors
///
/// Fails only if ping cannot be started.
pub fn ping_with(ns: &Netns, extra: &[&str], dst: &str, count: u32) -> Result<CmdOutput> {
    let count_s = count.to_string();
    // -w bounds the whole run; -W bounds the wait for each reply.
    let deadline_s = (count + 2).to_string();
    let mut args = vec!["-n", "-c", &count_s, "-i", "0.2", "-W", "1", "-w", &deadline_s];
    args.extend_from_slice(extra);
    args.push(dst);
    ns.exec_timeout(Duration::from_secs(u64::from(count) + 5), "ping", &args)
}

/// Requires that every one of `count` pings from `ns` to `dst` was answered.
///
/// # Errors
///
/// Fails with ping's output if any was lost.
pub fn ping_all(ns: &Netns, dst: &str, count: u32) -> Result<CmdOutput> {
    ping_all_with(ns, &[], dst, count)
}

/// [`ping_all`] with extra arguments before the destination.
///
/// # Errors
///
/// Fails with ping's output if any was lost.
pub fn ping_all_with(ns: &Netns, extra: &[&str], dst: &str, count: u32) -> Result<CmdOutput> {
    let out = ping_with(ns, extra, dst, count)?.ok()?;
    let want = format!("{count} packets transmitted, {count} received");
    if !out.stdout.contains(&want) {
        bail!("expected \"{want}\"\n{out}");
    }
    Ok(out)
}

/// An `iperf3 -s -1 -B <addr>` server (one test, then it exits), stopped on drop.
#[derive(Debug)]
pub struct IperfServer {
    proc: Proc,
    addr: String,
}

impl IperfServer {
    /// Starts the server in `ns` bound to `addr`, logging to `log`, and waits until it listens.
    ///
    /// # Errors
    ///
    /// Fails if iperf3 cannot start or is not listening within 5 s.
    pub fn start(ns: &Netns, addr: &str, log: &Path) -> Result<Self> {
        let mut proc = ns.spawn("iperf3", &["-s", "-1", "-B", addr], log)?;
        let filter = format!("sport = :{IPERF_PORT}");
        let listening = cmd::poll_until(IPERF_LISTEN_TIMEOUT, || {
            if let Some(status) = proc.try_wait()? {
                bail!("iperf3 server exited with {status}:\n{}", cmd::tail(log, 20));
            }
            let out = ns.exec("ss", &["-Hltn", &filter])?;
            Ok(out.stdout.contains(addr).then_some(()))
        })?;
        if listening.is_none() {
            bail!("iperf3 server on {addr} not listening after {IPERF_LISTEN_TIMEOUT:?}:\n{}", cmd::tail(log, 20));
        }
        Ok(Self { proc, addr: addr.to_owned() })
    }

    /// The address the server is bound to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The server process.
    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// Runs `iperf3 -c <addr> -t <secs> -J --connect-timeout 3000` from `ns` and returns
/// `end.sum_received.bits_per_second`, also printed in Gbit/s (on stderr, not captured by the
/// test harness, so it shows in CI logs).
///
/// # Errors
///
/// Fails if iperf3 fails, reports an error, or prints no receive rate.
pub fn iperf3_tcp(ns: &Netns, addr: &str, secs: u32) -> Result<f64> {
    let t = secs.to_string();
    let out = ns.exec_timeout(
        Duration::from_secs(u64::from(secs) + 15),
        "iperf3",
        &["-c", addr, "-t", &t, "-J", "--connect-timeout", "3000"],
    )?;
    let json: Value = serde_json::from_str(&out.stdout).with_context(|| format!("iperf3 printed no JSON\n{out}"))?;
    if let Some(err) = json.get("error").and_then(Value::as_str) {
        bail!("iperf3 error: {err}\n{out}");
    }
    let out = out.ok()?;
    let bps = json
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .with_context(|| format!("no end.sum_received.bits_per_second\n{}", out.stdout))?;
    report(&format!("iperf3 TCP {secs} s [{}] -> {addr}: {:.2} Gbit/s", ns.name(), bps / 1e9));
    Ok(bps)
}

/// What one iperf3 TCP run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct IperfRun {
    /// `end.sum_received.bits_per_second`.
    pub bits_per_second: f64,
    /// `end.sum_received.bytes`.
    pub bytes: u64,
    /// `end.sum_sent.retransmits` (0 when iperf3 does not report it).
    pub retransmits: u64,
    /// Bytes of each reporting interval (1 s by default), in order: a 0 means the flow stalled
    /// for a whole interval.
    pub interval_bytes: Vec<u64>,
}

impl IperfRun {
    /// The smallest interval, in bytes (0 if there were none).
    pub fn min_interval_bytes(&self) -> u64 {
        self.interval_bytes.iter().copied().min().unwrap_or(0)
    }
}

/// `iperf3 -c <addr> -t <secs> -J --connect-timeout 3000 <extra>` from `ns` (`extra` such as
/// `["-b", "500M"]`), with the totals and the per-interval bytes.
///
/// # Errors
///
/// Fails if iperf3 fails, reports an error, or prints no receive figures.
pub fn iperf3_tcp_run(ns: &Netns, addr: &str, secs: u32, extra: &[&str]) -> Result<IperfRun> {
    let t = secs.to_string();
    let mut args = vec!["-c", addr, "-t", &t, "-J", "--connect-timeout", "3000"];
    args.extend_from_slice(extra);
    let out = ns.exec_timeout(Duration::from_secs(u64::from(secs) + 15), "iperf3", &args)?;
    parse_iperf3_json(&out.stdout).with_context(|| format!("{out}"))
}

/// What one iperf3 UDP run measured, as the receiver saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct UdpRun {
    /// `end.sum_received.bits_per_second`.
    pub bits_per_second: f64,
    /// Datagrams sent (`end.sum_received.packets`: iperf3 counts by sequence number).
    pub packets: u64,
    /// Datagrams that never arrived.
    pub lost_packets: u64,
}

impl UdpRun {
    /// Datagrams that arrived.
    pub fn received(&self) -> u64 {
        self.packets.saturating_sub(self.lost_packets)
    }
}

/// `iperf3 -c <addr> -u -b <bitrate> -l <len> -t <secs> -J` from `ns`: a UDP flow at a fixed
/// rate, with the receiver's count of what arrived. Printed like [`iperf3_tcp`].
///
/// # Errors
///
/// Fails if iperf3 fails, reports an error, or prints no receive figures.
pub fn iperf3_udp(ns: &Netns, addr: &str, secs: u32, bitrate: &str, len: u16) -> Result<UdpRun> {
    let (t, l) = (secs.to_string(), len.to_string());
    let args = ["-c", addr, "-u", "-b", bitrate, "-l", &l, "-t", &t, "-J", "--connect-timeout", "3000"];
    let out = ns.exec_timeout(Duration::from_secs(u64::from(secs) + 15), "iperf3", &args)?;
    let json: Value = serde_json::from_str(&out.stdout).with_context(|| format!("iperf3 printed no JSON\n{out}"))?;
    if let Some(err) = json.get("error").and_then(Value::as_str) {
        bail!("iperf3 error: {err}\n{out}");
    }
    let r = json.pointer("/end/sum_received").with_context(|| format!("no end.sum_received\n{out}"))?;
    let field = |k: &str| r.get(k).and_then(Value::as_u64).with_context(|| format!("no end.sum_received.{k}"));
    let run = UdpRun {
        bits_per_second: r.get("bits_per_second").and_then(Value::as_f64).context("no bits_per_second")?,
        packets: field("packets")?,
        lost_packets: field("lost_packets")?,
    };
    report(&format!(
        "iperf3 UDP {secs} s at {bitrate} [{}] -> {addr}: {:.2} Gbit/s, {} of {} datagrams arrived",
        ns.name(),
        run.bits_per_second / 1e9,
        run.received(),
        run.packets
    ));
    Ok(run)
}

/// Reads [`IperfRun`] out of `iperf3 -J` output.
///
/// # Errors
///
/// Fails if the text is not JSON, carries an `error`, or lacks the receive totals.
pub fn parse_iperf3_json(text: &str) -> Result<IperfRun> {
    let json: Value = serde_json::from_str(text).context("iperf3 printed no JSON")?;
    if let Some(err) = json.get("error").and_then(Value::as_str) {
        bail!("iperf3 error: {err}");
    }
    let received = json.pointer("/end/sum_received").context("no end.sum_received")?;
    let interval_bytes = json
        .get("intervals")
        .and_then(Value::as_array)
        .map(|iv| iv.iter().filter_map(|i| i.pointer("/sum/bytes").and_then(Value::as_u64)).collect())
        .unwrap_or_default();
    Ok(IperfRun {
        bits_per_second: received.get("bits_per_second").and_then(Value::as_f64).context("no bits_per_second")?,
        bytes: received.get("bytes").and_then(Value::as_u64).context("no bytes")?,
        retransmits: json.pointer("/end/sum_sent/retransmits").and_then(Value::as_u64).unwrap_or(0),
        interval_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf3_totals_and_intervals() {
        let text = r#"{"intervals":[{"sum":{"bytes":100}},{"sum":{"bytes":0}},{"sum":{"bytes":50}}],
            "end":{"sum_sent":{"retransmits":3},"sum_received":{"bytes":150,"bits_per_second":400.0}}}"#;
        let run = parse_iperf3_json(text).unwrap();
        assert_eq!(run.bytes, 150);
        assert_eq!(run.retransmits, 3);
        assert_eq!(run.interval_bytes, [100, 0, 50]);
        assert_eq!(run.min_interval_bytes(), 0);
        assert!(parse_iperf3_json(r#"{"error":"unable to connect"}"#).is_err());
    }
}
