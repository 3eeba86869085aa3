//! Counters from a Prometheus text exposition (etcd's `/metrics`), and a tiny HTTP/1.0 GET to
//! fetch it, so the bench needs no HTTP client crate.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// One parsed sample line: `name{label="value",…} 12`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels, in order.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if present.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Parses every sample line of `text`; comments and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (head, rest) = match line.find('{') {
        Some(_) => {
            let close = line.rfind('}')?;
            (line.get(..=close)?, line.get(close + 1..)?)
        }
        None => line.split_at(line.find(' ')?),
    };
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((name, labels)) => (name, parse_labels(labels.strip_suffix('}')?)?),
        None => (head, Vec::new()),
    };
    Some(Sample { name: name.to_owned(), labels, value })
}

/// `a="x",b="y"` (etcd's label values contain no escaped quotes or commas).
fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((k.trim().to_owned(), v.trim().strip_prefix('"')?.strip_suffix('"')?.to_owned()))
        })
        .collect()
}

/// The sum of every sample of metric `name`.
pub fn sum(samples: &[Sample], name: &str) -> f64 {
    samples.iter().filter(|s| s.name == name).map(|s| s.value).sum()
}

/// The sum of metric `name` grouped by the value of label `by` (missing label: `""`).
pub fn sum_by(samples: &[Sample], name: &str, by: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        *out.entry(s.label(by).unwrap_or_default().to_owned()).or_insert(0.0) += s.value;
    }
    out
}

/// `GET /metrics` from `addr` with HTTP/1.0 (the server closes the connection after the body).
///
/// # Errors
///
/// Fails on connection or read errors, or a status other than 200.
pub fn fetch_metrics(addr: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr} for /metrics"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).context("setting a read timeout")?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").context("sending the request")?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).context("reading /metrics")?;
    let text = String::from_utf8_lossy(&body);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("no HTTP header end in the answer") };
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        bail!("GET /metrics: {status}");
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP grpc_server_handled_total Total number of RPCs completed on the server.
# TYPE grpc_server_handled_total counter
grpc_server_handled_total{grpc_code="OK",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 120
grpc_server_handled_total{grpc_code="OK",grpc_method="Txn",grpc_service="etcdserverpb.KV",grpc_type="unary"} 7
grpc_server_handled_total{grpc_code="Unavailable",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 3
grpc_server_started_total{grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 123
etcd_server_has_leader 1
process_cpu_seconds_total 1.5e+01
"#;

    #[test]
    fn sums_and_groups() {
        let s = parse(TEXT);
        assert_eq!(s.len(), 6);
        assert_eq!(sum(&s, "grpc_server_handled_total"), 130.0);
        let by = sum_by(&s, "grpc_server_handled_total", "grpc_method");
        assert_eq!(by.get("Range"), Some(&123.0));
        assert_eq!(by.get("Txn"), Some(&7.0));
        assert_eq!(sum(&s, "process_cpu_seconds_total"), 15.0);
        assert_eq!(sum(&s, "etcd_server_has_leader"), 1.0);
    }
}
