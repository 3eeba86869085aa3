//! A real HTTP client for weft's `/healthz`, `/readyz` and `/metrics`, from inside a host's
//! namespace: the request is made by a thread that joined the namespace (`setns`), so
//! `127.0.0.1` is that namespace's loopback, where a kubelet probe on the node would knock.
//! `ureq`, blocking, with a 5 s deadline per request; `/metrics` is parsed with
//! `prometheus-parse`, which knows nothing of weft.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};

use crate::netns::Netns;

/// Deadline of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// `Content-Type`, if sent.
    pub content_type: Option<String>,
    /// The body.
    pub body: String,
}

/// `GET url` from inside `ns`.
///
/// # Errors
///
/// Fails if the namespace cannot be joined or nothing answers (connection refused, timeout);
/// any status code is an answer.
pub fn get(ns: &Netns, url: &str) -> Result<Reply> {
    let path = Path::new("/run/netns").join(ns.name());
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Reply> {
            let f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            // Only this thread moves into the namespace.
            setns(&f, CloneFlags::CLONE_NEWNET).with_context(|| format!("joining {}", ns.name()))?;
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(REQUEST_TIMEOUT))
                .build()
                .into();
            let mut res = agent.get(url).call().with_context(|| format!("[{}] GET {url}", ns.name()))?;
            let status = res.status().as_u16();
            let content_type = res.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body = res.body_mut().read_to_string().with_context(|| format!("[{}] GET {url}: body", ns.name()))?;
            Ok(Reply { status, content_type, body })
        })
        .join()
        .map_err(|_| anyhow!("the HTTP client thread panicked"))?
    })
}

/// Polls `GET url` every 200 ms until `pred` holds for an answer; returns that answer, or
/// fails after `timeout` with the last answer or error.
///
/// # Errors
///
/// Fails when `pred` never held.
pub fn wait_for(ns: &Netns, url: &str, timeout: Duration, pred: impl Fn(&Reply) -> bool) -> Result<Reply> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = get(ns, url);
        if let Ok(r) = &last {
            if pred(r) {
                return Ok(r.clone());
            }
        }
        if Instant::now() >= deadline {
            match last {
                Ok(r) => bail!("GET {url}: still {} after {timeout:?}: {}", r.status, r.body.trim()),
                Err(e) => bail!("GET {url}: no answer after {timeout:?}: {e:#}"),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One sample of a Prometheus exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value (a histogram's `_count` for histograms).
    pub value: f64,
}

/// Parses a Prometheus text exposition: metric name (as exposed, `_total` included) → samples.
///
/// # Errors
///
/// Fails if the text does not parse.
pub fn parse_metrics(text: &str) -> Result<BTreeMap<String, Vec<Sample>>> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .with_context(|| format!("/metrics does not parse:\n{text}"))?;
    let mut out: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for s in scrape.samples {
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(b) => b.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => continue,
        };
        let labels = s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        out.entry(s.metric).or_default().push(Sample { labels, value });
    }
    Ok(out)
}

/// The value of `name` whose labels include every `(key, value)` of `labels`.
pub fn metric(m: &BTreeMap<String, Vec<Sample>>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    m.get(name)?
        .iter()
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_exposition() {
        let text = "# HELP weft_peer_tx_packets_total Packets sent.\n# TYPE weft_peer_tx_packets_total counter\n\
                    weft_peer_tx_packets_total{peer=\"n2\",subnet=\"10.244.2.0/24\"} 7\n\
                    # HELP weft_ready Ready.\n# TYPE weft_ready gauge\nweft_ready 1\n";
        let m = parse_metrics(text).unwrap();
        assert_eq!(metric(&m, "weft_peer_tx_packets_total", &[("subnet", "10.244.2.0/24")]), Some(7.0));
        assert_eq!(metric(&m, "weft_peer_tx_packets_total", &[("subnet", "10.244.3.0/24")]), None);
        assert_eq!(metric(&m, "weft_ready", &[]), Some(1.0));
    }
}
