//! `/metrics`: the Prometheus text format (0.0.4), encoded by `prometheus-client` from one
//! snapshot per scrape. Nothing here sits on the data path: the workers only bump their own
//! `Relaxed` counters ([`weft_forwarder::WorkerStats`], per-peer slots), and a scrape sums
//! them, as `weft status` does.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `weft_info` | gauge (1) | `node`, `backend`, `io_backend`, `device`, `mode`, `version` |
//! | `weft_ready` | gauge | (1 when `/readyz` answers 200) |
//! | `weft_peers` | gauge | |
//! | `weft_peer_rx_packets_total`, `weft_peer_rx_bytes_total`, `weft_peer_tx_packets_total`, `weft_peer_tx_bytes_total` | counter | `peer`, `subnet` |
//! | `weft_wireguard_peer_authenticated_total`, `weft_wireguard_peer_failed_total` | counter | `peer`, `subnet` (backend `wireguard`) |
//! | `weft_wireguard_peer_handshake_age_seconds` | gauge | `peer`, `subnet` (while a session is up) |
//! | `weft_drops_total` | counter | `reason` (every reason, zeros included) |
//! | `weft_icmp_total` | counter | `kind` (`net_unreachable`, `frag_needed`, `packet_too_big`, `rate_limited`, `neighbour_reply`) |
//! | `weft_offload_enabled` | gauge | `offload` |
//! | `weft_offload_events_total` | counter | `event` |
//! | `weft_batch_size` | histogram | (packets per I/O batch, all workers; buckets 1, 2, 4, … 256) |
//! | `weft_reloads_total`, `weft_reload_failures_total` | counter | |
//! | `weft_lease_phase` | gauge (state set) | `phase` (`acquiring`, `held`, `expired`, `lost`, `conflict`, `released`) |
//! | `weft_lease_expires_in_seconds`, `weft_lease_store_up`, `weft_lease_provisional`, `weft_lease_renew_failures`, `weft_lease_known` | gauge | |
//! | `weft_lease_resyncs_total` | counter | |
//! | `weft_lease_refused_records_total` | counter | `reason` (every reason) |
//! | `weft_lease_refused_records_now` | gauge | (refused right now) |
//! | `weft_masq_enabled`, `weft_masq_installed` | gauge | |
//! | `weft_masq_repairs_total`, `weft_masq_failures_total` | counter | |
//!
//! The lease metrics appear in lease mode only, the per-peer ones once the data plane is up.

use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use weft_forwarder::stats::{BATCH_BUCKETS, BatchSizes};

use super::health::Health;
use crate::status::Status;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The lease phases, in `weft status` spelling.
pub const LEASE_PHASES: [&str; 6] = ["acquiring", "held", "expired", "lost", "conflict", "released"];

/// The masquerade keeper's counters.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct MasqSnapshot {
    /// `ip_masq` is on.
    pub enabled: bool,
    /// The rules are in place as of the last check.
    pub installed: bool,
    /// Times they were put back.
    pub repairs: u64,
    /// Checks or repairs that failed.
    pub failures: u64,
}

/// Everything one scrape shows.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// `/readyz` would answer 200.
    pub ready: bool,
    /// The daemon's status, once the data plane is up.
    pub status: Option<Status>,
    /// Packets per I/O batch, summed over the workers.
    pub batches: BatchSizes,
    /// The masquerade keeper.
    pub masq: MasqSnapshot,
}

impl Snapshot {
    /// Reads everything from the running daemon.
    pub fn take(health: &Health) -> Self {
        let state = health.state();
        let mut batches = BatchSizes::default();
        for s in state.iter().flat_map(|s| s.stats.iter()) {
            batches.add(&s.batch_sizes());
        }
        let masq = health.masq().map_or_else(
            || MasqSnapshot { enabled: health.masq_wanted(), ..MasqSnapshot::default() },
            |m| MasqSnapshot {
                enabled: health.masq_wanted(),
                installed: m.installed.load(Ordering::Relaxed),
                repairs: m.repairs.load(Ordering::Relaxed),
                failures: m.failures.load(Ordering::Relaxed),
            },
        );
        Self { ready: health.readiness().is_ok(), status: state.map(|s| s.status()), batches, masq }
    }

    /// The exposition.
    ///
    /// # Errors
    /// Only if formatting fails (it does not, into a `String`).
    pub fn render(self) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

type Fmt = Result<(), std::fmt::Error>;

fn family<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        let mut f = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => f.encode_counter::<NoLabelSet, u64, u64>(&v, None)?,
            _ => f.encode_gauge(&v)?,
        }
    }
    Ok(())
}

fn single(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, kind: MetricType, v: u64) -> Fmt {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => m.encode_counter::<NoLabelSet, u64, u64>(&v, None),
        _ => m.encode_gauge(&v),
    }
}

fn encode_status(s: &Status, enc: &mut DescriptorEncoder<'_>) -> Fmt {
    use MetricType::{Counter, Gauge};
    let info = [
        ("node", s.node_name.clone()),
        ("backend", s.backend.clone()),
        ("io_backend", s.io_backend.clone()),
        ("device", s.device.clone()),
        ("mode", s.mode.clone()),
        ("version", env!("CARGO_PKG_VERSION").to_owned()),
    ];
    family(enc, "weft_info", "The running daemon (always 1).", Gauge, [(info, 1)])?;
    single(enc, "weft_peers", "Peers in the route table.", Gauge, s.peers.len() as u64)?;
    let peer = |p: &crate::status::PeerStatus| [("peer", p.name.clone()), ("subnet", p.subnet.clone())];
    family(
        enc,
        "weft_peer_rx_packets",
        "Packets received from the peer and delivered.",
        Counter,
        s.peers.iter().map(|p| (peer(p), p.rx_packets)),
    )?;
    family(
        enc,
        "weft_peer_rx_bytes",
        "Inner bytes received from the peer and delivered.",
        Counter,
        s.peers.iter().map(|p| (peer(p), p.rx_bytes)),
    )?;
    family(
        enc,
        "weft_peer_tx_packets",
        "Packets sent to the peer.",
        Counter,
        s.peers.iter().map(|p| (peer(p), p.tx_packets)),
    )?;
    family(
        enc,
        "weft_peer_tx_bytes",
        "Inner bytes sent to the peer.",
        Counter,
        s.peers.iter().map(|p| (peer(p), p.tx_bytes)),
    )?;
    if s.wireguard.is_some() {
        let wg = |f: fn(&crate::status::PeerWireGuard) -> u64| {
            s.peers.iter().filter_map(move |p| p.wireguard.as_ref().map(|w| (peer(p), f(w))))
        };
        family(
            enc,
            "weft_wireguard_peer_authenticated",
            "Datagrams from the peer that authenticated.",
            Counter,
            wg(|w| w.authenticated),
        )?;
        family(
            enc,
            "weft_wireguard_peer_failed",
            "Datagrams from the peer's address that failed authentication or replayed.",
            Counter,
            wg(|w| w.failed),
        )?;
        family(
            enc,
            "weft_wireguard_peer_handshake_age_seconds",
            "Seconds since the handshake of the session in use (absent: no session).",
            Gauge,
            s.peers
                .iter()
                .filter_map(|p| p.wireguard.as_ref().and_then(|w| w.handshake_age_secs).map(|a| (peer(p), a))),
        )?;
    }
    family(
        enc,
        "weft_drops",
        "Packets dropped, by reason.",
        Counter,
        s.drops.iter().map(|(r, v)| ([("reason", r.as_str())], *v)),
    )?;
    family(
        enc,
        "weft_icmp",
        "ICMP errors written into the TUN, those suppressed by the rate limit, and neighbour requests answered.",
        Counter,
        s.icmp.iter().map(|(k, v)| ([("kind", k.as_str())], *v)),
    )?;
    family(
        enc,
        "weft_offload_enabled",
        "Offloads in use since start (1) or not (0).",
        Gauge,
        s.offloads.iter().map(|(k, v)| ([("offload", k.as_str())], u64::from(*v))),
    )?;
    family(
        enc,
        "weft_offload_events",
        "What the offloads did: super-packets read, GSO sends and segments, GRO trains, merged writes, fallbacks, partial checksums completed.",
        Counter,
        s.offload_counters.iter().map(|(k, v)| ([("event", k.as_str())], *v)),
    )?;
    single(enc, "weft_reloads", "Configuration reloads applied (SIGHUP).", Counter, s.reloads)?;
    single(enc, "weft_reload_failures", "Configuration reloads refused.", Counter, s.reload_failures)?;
    if let Some(l) = &s.lease {
        family(
            enc,
            "weft_lease_phase",
            "The lease's phase: 1 for the current one.",
            Gauge,
            LEASE_PHASES.iter().map(|p| ([("phase", *p)], u64::from(l.phase == *p))),
        )?;
        if let Some(e) = l.expires_in_secs {
            single(enc, "weft_lease_expires_in_seconds", "Seconds until the lease lapses unless renewed.", Gauge, e)?;
        }
        single(
            enc,
            "weft_lease_store_up",
            "Whether the last store operation succeeded.",
            Gauge,
            u64::from(l.store_up),
        )?;
        single(
            enc,
            "weft_lease_provisional",
            "Running from the lease cache, not yet confirmed by the store.",
            Gauge,
            u64::from(l.provisional),
        )?;
        single(enc, "weft_lease_renew_failures", "Store failures in a row.", Gauge, u64::from(l.renew_failures))?;
        single(enc, "weft_lease_known", "Leases known from the store, ours included.", Gauge, l.known_leases as u64)?;
        single(enc, "weft_lease_resyncs", "Times the lease watch lost track and re-listed.", Counter, l.resyncs)?;
        family(
            enc,
            "weft_lease_refused_records",
            "Lease records refused since start, by reason.",
            Counter,
            l.refused_total.iter().map(|(r, v)| ([("reason", r.as_str())], *v)),
        )?;
        single(
            enc,
            "weft_lease_refused_records_now",
            "Lease records refused right now.",
            Gauge,
            l.refused_leases.len() as u64,
        )?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Fmt {
        use MetricType::{Counter, Gauge};
        single(&mut enc, "weft_ready", "1 when /readyz answers 200.", Gauge, u64::from(self.ready))?;
        if let Some(s) = &self.status {
            encode_status(s, &mut enc)?;
        }
        {
            let mut m = enc.encode_descriptor(
                "weft_batch_size",
                "Packets each worker handled per I/O batch (TUN read burst or socket receive batch).",
                None,
                MetricType::Histogram,
            )?;
            let buckets: Vec<(f64, u64)> = self
                .batches
                .counts
                .iter()
                .enumerate()
                .map(|(i, c)| (BATCH_BUCKETS.get(i).map_or(f64::INFINITY, |b| *b as f64), *c))
                .collect();
            m.encode_histogram::<NoLabelSet>(self.batches.sum as f64, self.batches.count(), &buckets, None)?;
        }
        single(&mut enc, "weft_masq_enabled", "ip_masq is on.", Gauge, u64::from(self.masq.enabled))?;
        single(
            &mut enc,
            "weft_masq_installed",
            "The masquerade rules are in place (as of the last check).",
            Gauge,
            u64::from(self.masq.installed),
        )?;
        single(
            &mut enc,
            "weft_masq_repairs",
            "Times the masquerade table was found gone or changed and put back.",
            Counter,
            self.masq.repairs,
        )?;
        single(&mut enc, "weft_masq_failures", "Masquerade checks or repairs that failed.", Counter, self.masq.failures)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use prometheus_parse::{Scrape, Value};
    use weft_forwarder::stats::BatchHistogram;

    use super::*;
    use crate::daemon::lease::LeaseView;
    use crate::status::PeerStatus;

    fn status() -> Status {
        let mut lease = LeaseView::new("10.244.7.0/24".parse().unwrap(), "etcd", false, "none".into());
        lease.expires_in_secs = Some(86_000);
        lease.refused_total =
            [("outside_network", 2u64), ("duplicate_mac", 0)].into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        Status {
            node_name: "n1".into(),
            backend: "vxlan".into(),
            vni: Some(1),
            vtep_mac: None,
            wireguard: None,
            io_backend: "uring".into(),
            io_fallback_reason: None,
            rootless: None,
            offloads: [("udp_gso".to_owned(), true), ("udp_gro".to_owned(), false)].into_iter().collect(),
            offload_counters: [("gso_sends".to_owned(), 9)].into_iter().collect(),
            workers: 2,
            network: "10.244.0.0/16".into(),
            subnet: "10.244.7.0/24".into(),
            gateway: "10.244.7.1".into(),
            tun: "weft0".into(),
            device: "tun".into(),
            mtu: 1450,
            public_ip: "198.18.0.1".into(),
            port: 8472,
            underlay_interface: "eth0".into(),
            underlay_mtu: 1500,
            uptime_secs: 5,
            pid: 1,
            reloads: 3,
            reload_failures: 1,
            security: String::new(),
            mode: "lease".into(),
            lease: Some(lease),
            peers: vec![PeerStatus {
                name: "10.244.3.0-24".into(),
                subnet: "10.244.3.0/24".into(),
                ipv6_subnet: None,
                endpoint: "198.18.0.3:8472".into(),
                mac: None,
                mtu: 1450,
                rx_packets: 10,
                rx_bytes: 1000,
                tx_packets: 20,
                tx_bytes: 2000,
                wireguard: None,
            }],
            drops: weft_forwarder::DropReason::ALL.iter().map(|r| (r.as_str().to_owned(), 0)).collect(),
            icmp: weft_forwarder::IcmpCounter::ALL.iter().map(|c| (c.as_str().to_owned(), 1)).collect(),
        }
    }

    fn parse(text: &str) -> Scrape {
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
    }

    type Samples = Vec<(BTreeMap<String, String>, Value)>;

    /// name → [(labels, value)].
    fn by_name(s: &Scrape) -> HashMap<String, Samples> {
        let mut out: HashMap<String, Vec<_>> = HashMap::new();
        for x in &s.samples {
            let labels: BTreeMap<String, String> = x.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            out.entry(x.metric.clone()).or_default().push((labels, x.value.clone()));
        }
        out
    }

    fn value(v: &Value) -> f64 {
        match v {
            Value::Counter(f) | Value::Gauge(f) | Value::Untyped(f) => *f,
            other => panic!("not a number: {other:?}"),
        }
    }

    /// The exposition parses back with an independent parser, with every family, label and
    /// value where the snapshot put it.
    #[test]
    fn exposition_parses_back() {
        let h = BatchHistogram::default();
        for n in [1, 1, 3, 64, 300] {
            h.record(n);
        }
        let snap = Snapshot {
            ready: true,
            status: Some(status()),
            batches: h.snapshot(),
            masq: MasqSnapshot { enabled: true, installed: true, repairs: 2, failures: 0 },
        };
        let text = snap.render().unwrap();
        let scrape = parse(&text);
        let m = by_name(&scrape);
        let one = |name: &str| value(&m.get(name).unwrap_or_else(|| panic!("{name} missing in\n{text}"))[0].1);

        // Per-peer counters, labelled by peer and subnet.
        let tx = &m["weft_peer_tx_packets_total"];
        assert_eq!(tx.len(), 1);
        assert_eq!(tx[0].0.get("peer").map(String::as_str), Some("10.244.3.0-24"));
        assert_eq!(tx[0].0.get("subnet").map(String::as_str), Some("10.244.3.0/24"));
        assert_eq!(value(&tx[0].1), 20.0);
        assert_eq!(one("weft_peer_rx_bytes_total"), 1000.0);
        assert!(matches!(tx[0].1, Value::Counter(_)), "typed as a counter: {:?}", tx[0].1);

        // Every drop reason, zeros included.
        let drops = &m["weft_drops_total"];
        let reasons: Vec<&str> = drops.iter().filter_map(|(l, _)| l.get("reason").map(String::as_str)).collect();
        for r in weft_forwarder::DropReason::ALL {
            assert!(reasons.contains(&r.as_str()), "drop reason {} missing", r.as_str());
        }
        assert_eq!(drops.len(), weft_forwarder::DropReason::ALL.len());
        assert_eq!(m["weft_icmp_total"].len(), weft_forwarder::IcmpCounter::ALL.len());
        assert!(m["weft_offload_events_total"].iter().any(|(l, v)| l["event"] == "gso_sends" && value(v) == 9.0));
        assert!(m["weft_offload_enabled"].iter().any(|(l, v)| l["offload"] == "udp_gro" && value(v) == 0.0));

        // Lease state: a state set over every phase, the TTL, store_up, refusals by reason.
        let phases = &m["weft_lease_phase"];
        assert_eq!(phases.len(), LEASE_PHASES.len());
        for (l, v) in phases {
            assert_eq!(value(v), if l["phase"] == "held" { 1.0 } else { 0.0 }, "{l:?}");
        }
        assert_eq!(one("weft_lease_expires_in_seconds"), 86_000.0);
        assert_eq!(one("weft_lease_store_up"), 1.0);
        assert_eq!(one("weft_lease_provisional"), 0.0);
        let refused = &m["weft_lease_refused_records_total"];
        assert!(refused.iter().any(|(l, v)| l["reason"] == "outside_network" && value(v) == 2.0));
        assert!(refused.iter().any(|(l, v)| l["reason"] == "duplicate_mac" && value(v) == 0.0));

        assert_eq!(one("weft_reloads_total"), 3.0);
        assert_eq!(one("weft_reload_failures_total"), 1.0);
        assert_eq!(one("weft_ready"), 1.0);
        assert_eq!(one("weft_masq_repairs_total"), 2.0);
        assert_eq!(one("weft_masq_installed"), 1.0);
        let info = &m["weft_info"][0].0;
        assert_eq!((info["node"].as_str(), info["backend"].as_str()), ("n1", "vxlan"));

        // The batch histogram: cumulative power-of-two buckets, sum and count.
        let hist = &m["weft_batch_size"];
        let Value::Histogram(buckets) = &hist[0].1 else { panic!("not a histogram: {hist:?}") };
        let at = |le: f64| buckets.iter().find(|b| b.less_than == le).map(|b| b.count);
        assert_eq!(at(1.0), Some(2.0));
        assert_eq!(at(4.0), Some(3.0));
        assert_eq!(at(64.0), Some(4.0));
        assert_eq!(at(256.0), Some(4.0));
        assert_eq!(at(f64::INFINITY), Some(5.0));
        assert!(text.contains("weft_batch_size_sum 369.0\n"), "{text}");
        assert!(text.contains("weft_batch_size_count 5\n"), "{text}");
        assert!(text.starts_with("# HELP weft_ready"), "{text}");
    }

    /// Before the data plane is up only what is known is shown: not ready, no peers, no lease.
    #[test]
    fn exposition_before_start_up() {
        let text = Snapshot::default().render().unwrap();
        let m = by_name(&parse(&text));
        assert_eq!(value(&m["weft_ready"][0].1), 0.0);
        assert!(!m.contains_key("weft_peer_tx_packets_total"));
        assert!(!m.contains_key("weft_lease_phase"));
        assert!(m.contains_key("weft_batch_size"));
    }
}
