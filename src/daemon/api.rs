//! The local API: newline-delimited JSON over a unix socket. `weft status` asks for a
//! [`Status`]; the CNI plugin will ask for pod addresses over the same socket, so only the
//! daemon ever writes its state.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tracing::{debug, warn};
use weft_forwarder::driver::Backend;
use weft_forwarder::{DropReason, IcmpCounter, RouteTableHandle, WorkerStats};

use super::netlink::UnderlayLink;
use crate::config::Config;
use crate::status::{PeerStatus, Status};

/// A request line.
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// The daemon's status.
    Status,
}

/// Largest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// What the API serves from: shared, read-only or atomically swapped state.
#[derive(Debug)]
pub struct ApiState {
    /// The configuration the daemon started with.
    pub cfg: Config,
    /// The overlay MTU in use.
    pub mtu: u16,
    /// The underlay interface.
    pub underlay: UnderlayLink,
    /// I/O backend in use.
    pub backend: Backend,
    /// Why io_uring is not in use, if it is not.
    pub fallback_reason: Option<String>,
    /// The live route table.
    pub routes: RouteTableHandle,
    /// Every worker's counters.
    pub stats: Vec<Arc<WorkerStats>>,
    /// Start time.
    pub started: Instant,
    /// Reloads applied.
    pub reloads: AtomicU64,
    /// Reloads refused.
    pub reload_failures: AtomicU64,
}

impl ApiState {
    /// Sums the drop counters of every worker.
    pub fn drops(&self) -> BTreeMap<String, u64> {
        DropReason::ALL.iter().map(|r| (r.as_str().to_string(), self.stats.iter().map(|s| s.drops(*r)).sum())).collect()
    }

    /// A status snapshot.
    pub fn status(&self) -> Status {
        let routes = self.routes.load_full();
        let peers = routes
            .peers()
            .iter()
            .map(|h| {
                let t = h.counters.totals();
                PeerStatus {
                    name: h.name.to_string(),
                    subnet: h.subnet_v4.map(|n| n.to_string()).unwrap_or_default(),
                    ipv6_subnet: h.subnet_v6.map(|n| n.to_string()),
                    endpoint: h.endpoint.to_string(),
                    mac: h.mac.map(|m| m.to_string()),
                    mtu: h.mtu,
                    rx_packets: t.rx_packets,
                    rx_bytes: t.rx_bytes,
                    tx_packets: t.tx_packets,
                    tx_bytes: t.tx_bytes,
                }
            })
            .collect();
        let icmp = IcmpCounter::ALL
            .iter()
            .map(|c| (c.as_str().to_string(), self.stats.iter().map(|s| s.icmp_count(*c)).sum()))
            .collect();
        let gw = weft_forwarder::LocalNode { subnet_v4: Some(self.cfg.subnet), subnet_v6: None }.gateway_v4();
        Status {
            node_name: self.cfg.node_name.clone(),
            backend: self.cfg.backend.as_str().into(),
            vni: match self.cfg.backend {
                crate::config::Backend::Vxlan { vni, .. } => Some(vni.get()),
                crate::config::Backend::Udp => None,
            },
            vtep_mac: match self.cfg.backend {
                crate::config::Backend::Vxlan { vtep_mac, .. } => Some(vtep_mac.to_string()),
                crate::config::Backend::Udp => None,
            },
            io_backend: self.backend.as_str().into(),
            io_fallback_reason: self.fallback_reason.clone(),
            workers: self.cfg.workers,
            network: self.cfg.network.to_string(),
            subnet: self.cfg.subnet.to_string(),
            gateway: gw.map(|g| g.to_string()).unwrap_or_default(),
            tun: self.cfg.tun_name.clone(),
            device: match self.cfg.device {
                crate::config::Device::Tun => "tun".into(),
                crate::config::Device::Tap => "tap".into(),
            },
            mtu: self.mtu,
            public_ip: self.cfg.public_ip.to_string(),
            port: self.cfg.port,
            underlay_interface: self.underlay.name.clone(),
            underlay_mtu: self.underlay.mtu,
            uptime_secs: self.started.elapsed().as_secs(),
            pid: std::process::id(),
            reloads: self.reloads.load(Ordering::Relaxed),
            reload_failures: self.reload_failures.load(Ordering::Relaxed),
            security: "cleartext: peers are checked by outer source address, which is not authenticated".into(),
            peers,
            drops: self.drops(),
            icmp,
        }
    }
}

/// Binds the API socket, replacing a stale one, readable and writable by root only.
///
/// # Errors
/// The directory or socket cannot be created.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves requests until the task is dropped.
pub async fn serve(listener: UnixListener, state: Arc<ApiState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "api accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST));
            let reply = match reader.read_line(&mut line).await {
                Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
                    Ok(Request::Status) => serde_json::to_string(&state.status()),
                    Err(e) => serde_json::to_string(&serde_json::json!({ "error": format!("bad request: {e}") })),
                },
                Err(e) => {
                    debug!(error = %e, "api read failed");
                    return;
                }
            };
            if let Ok(mut body) = reply {
                body.push('\n');
                let _ = w.write_all(body.as_bytes()).await;
            }
        });
    }
}

/// Why the CLI could not get an answer from the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("cannot reach the weft daemon at {path}: {source} (is `weft run` running, and is --socket right?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The exchange failed half way.
    #[error("api socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The daemon's answer did not parse.
    #[error("api socket {path}: unexpected answer: {message}")]
    Decode {
        /// The socket path.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Asks the daemon at `path` for its status (blocking, 5 s timeout).
///
/// # Errors
/// [`ClientError`].
pub fn query_status(path: &Path) -> Result<Status, ClientError> {
    let io = |source| ClientError::Io { path: path.into(), source };
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|source| ClientError::Connect { path: path.into(), source })?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(5))).map_err(io)?;
    let req = serde_json::to_string(&Request::Status)
        .map_err(|e| ClientError::Decode { path: path.into(), message: e.to_string() })?;
    s.write_all(format!("{req}\n").as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(io)?;
    serde_json::from_str(&line)
        .map_err(|e| ClientError::Decode { path: path.into(), message: format!("{e}: {}", line.trim()) })
}
