//! Packet capture with tcpdump, for "must be delivered" and "must not be delivered" checks
//! (a dropped class must never show up in `tcpdump -i weft0`).
//!
//! tcpdump writes pcap to its stdout, which we redirect to a file we opened: that sidesteps
//! tcpdump dropping privileges before opening its output file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cmd::{self, Proc};
use crate::netns::Netns;

/// How long tcpdump gets to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long tcpdump gets to flush and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// pcap link types (<https://www.tcpdump.org/linktypes.html>) this harness understands.
const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW: u32 = 101;
const DLT_RAW_12: u32 = 12;
const DLT_RAW_14: u32 = 14;
const LINKTYPE_LINUX_SLL: u32 = 113;
const LINKTYPE_LINUX_SLL2: u32 = 276;

/// A running `tcpdump -i <iface> --immediate-mode -U -w - <filter>` in a namespace.
#[derive(Debug)]
pub struct Capture {
    proc: Proc,
    pcap: PathBuf,
    log: PathBuf,
}

impl Capture {
    /// Starts tcpdump on `iface` in `ns` with a BPF `filter` (may be empty), writing
    /// `<dir>/<tag>.pcap`, and waits until it is listening.
    ///
    /// # Errors
    ///
    /// Fails if tcpdump cannot start or does not report listening within 5 s.
    pub fn start(ns: &Netns, iface: &str, filter: &str, dir: &Path, tag: &str) -> Result<Self> {
        let pcap = dir.join(format!("{tag}.pcap"));
        let log = dir.join(format!("{tag}.tcpdump.log"));
        let out = File::create(&pcap).with_context(|| format!("creating {}", pcap.display()))?;
        let err = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        // Immediate mode: otherwise packets wait in the kernel ring for up to a second and are
        // lost when tcpdump is stopped.
        let mut args = vec!["-i", iface, "-n", "--immediate-mode", "-U", "-w", "-"];
        args.extend(filter.split_whitespace());
        let mut cmd = ns.command("tcpdump", &args);
        cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err));
        let what = format!("[{}] tcpdump -i {iface} {filter}", ns.name());
        let mut proc = Proc::spawn(cmd, &what, None)?;
        let listening = cmd::poll_until(LISTEN_TIMEOUT, || {
            if let Some(status) = proc.try_wait()? {
                bail!("{what} exited with {status}:\n{}", cmd::tail(&log, 20));
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text.contains("listening on").then_some(()))
        })?;
        if listening.is_none() {
            bail!("{what} not listening after {LISTEN_TIMEOUT:?}:\n{}", cmd::tail(&log, 20));
        }
        Ok(Self { proc, pcap, log })
    }

    /// Stops tcpdump (SIGINT makes it flush and exit) and returns the captured packets.
    ///
    /// # Errors
    ///
    /// Fails if tcpdump does not exit or its pcap output does not parse.
    pub fn stop(mut self) -> Result<Pcap> {
        self.proc.signal("INT")?;
        if self.proc.wait_timeout(STOP_TIMEOUT)?.is_none() {
            bail!("{} did not exit after SIGINT", self.proc.what());
        }
        let bytes = std::fs::read(&self.pcap).with_context(|| format!("reading {}", self.pcap.display()))?;
        Pcap::parse(&bytes)
            .with_context(|| format!("parsing {}; tcpdump said:\n{}", self.pcap.display(), cmd::tail(&self.log, 20)))
    }
}

/// The packets of a classic pcap file.
#[derive(Clone, Debug)]
pub struct Pcap {
    /// The file's link type.
    pub linktype: u32,
    /// Captured frames, as on the wire for `linktype`.
    pub frames: Vec<Vec<u8>>,
}

impl Pcap {
    /// Parses a classic pcap file (either byte order, microsecond or nanosecond stamps).
    ///
    /// # Errors
    ///
    /// Fails on a bad magic number or a truncated record.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let magic = read_u32(bytes, 0, false).context("pcap file shorter than its header")?;
        let swapped = match magic {
            0xa1b2_c3d4 | 0xa1b2_3c4d => false,
            0xd4c3_b2a1 | 0x4d3c_b2a1 => true,
            m => bail!("not a pcap file (magic {m:#010x})"),
        };
        let linktype = read_u32(bytes, 20, swapped).context("pcap header truncated")?;
        let mut frames = Vec::new();
        let mut at = 24;
        while at < bytes.len() {
            let incl = read_u32(bytes, at + 8, swapped).context("pcap record header truncated")?;
            let start = at + 16;
            let end = start + usize::try_from(incl)?;
            let frame = bytes.get(start..end).with_context(|| format!("pcap record at {at} truncated"))?;
            frames.push(frame.to_vec());
            at = end;
        }
        Ok(Self { linktype, frames })
    }

    /// The IPv4/IPv6 packets inside the frames, link-layer header removed.
    ///
    /// # Errors
    ///
    /// Fails on an unknown link type.
    pub fn ip_packets(&self) -> Result<Vec<&[u8]>> {
        let skip = match self.linktype {
            // No VLAN tags on our veths.
            LINKTYPE_ETHERNET => 14,
            LINKTYPE_RAW | DLT_RAW_12 | DLT_RAW_14 => 0,
            LINKTYPE_LINUX_SLL => 16,
            LINKTYPE_LINUX_SLL2 => 20,
            t => bail!("unsupported pcap link type {t}"),
        };
        Ok(self.frames.iter().map(|f| f.get(skip..).unwrap_or_default()).collect())
    }
}

fn read_u32(b: &[u8], at: usize, swapped: bool) -> Option<u32> {
    let raw: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(if swapped { u32::from_be_bytes(raw) } else { u32::from_le_bytes(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian pcap header (link type RAW) with two records, built by hand.
    fn two_packet_pcap() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(0xa1b2_c3d4_u32.to_le_bytes());
        b.extend(2u16.to_le_bytes());
        b.extend(4u16.to_le_bytes());
        b.extend([0u8; 8]);
        b.extend(65535u32.to_le_bytes());
        b.extend(LINKTYPE_RAW.to_le_bytes());
        for payload in [&[0x45u8, 1, 2][..], &[0x45, 9][..]] {
            b.extend([0u8; 8]);
            b.extend(u32::try_from(payload.len()).unwrap().to_le_bytes());
            b.extend(u32::try_from(payload.len()).unwrap().to_le_bytes());
            b.extend(payload);
        }
        b
    }

    #[test]
    fn parses_records() {
        let p = Pcap::parse(&two_packet_pcap()).unwrap();
        assert_eq!(p.linktype, LINKTYPE_RAW);
        assert_eq!(p.ip_packets().unwrap(), vec![&[0x45, 1, 2][..], &[0x45, 9][..]]);
    }

    #[test]
    fn rejects_truncation_and_bad_magic() {
        let mut b = two_packet_pcap();
        b.pop();
        assert!(Pcap::parse(&b).is_err());
        assert!(Pcap::parse(&[0u8; 24]).is_err());
        assert!(Pcap::parse(&[]).is_err());
    }
}
