//! The local API: newline-delimited JSON over a unix socket. `weft status` asks for a
//! [`Status`]; the CNI plugin will ask for pod addresses over the same socket, so only the
//! daemon ever writes its state.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tracing::{debug, warn};
use weft_forwarder::driver::Backend;
use weft_forwarder::{DropReason, IcmpCounter, RouteTableHandle, WorkerStats};

use weft_ipam::{Attachment, FilePodStore, PodAllocator};

use super::lease::LeaseView;
use super::netlink::UnderlayLink;
use crate::config::Config;
use crate::status::{PeerStatus, Status};

/// A request line.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// The daemon's status.
    Status,
    /// Whether pod addresses can be handed out now.
    Ready,
    /// An address for (container, interface); the same one again if it already has one.
    Allocate(AttachmentRef),
    /// The address (container, interface) holds, if any.
    Get(AttachmentRef),
    /// Frees the address of (container, interface); freeing nothing is not an error.
    Release(AttachmentRef),
    /// Every allocation.
    List,
    /// Frees every allocation not in `valid` (older than the grace period).
    Gc {
        /// The attachments that are still alive.
        valid: Vec<AttachmentRef>,
    },
    /// The node leaves the cluster: the daemon releases its lease, removes its fail-closed
    /// route and exits (`weft leave`). A plain stop keeps both.
    Leave,
}

/// (container id, interface name), as the CNI runtime names an attachment.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AttachmentRef {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

impl AttachmentRef {
    fn parse(&self) -> Result<Attachment, ApiError> {
        Attachment::new(&self.container_id, &self.ifname).map_err(|e| ApiError::new("invalid", e.to_string()))
    }
}

/// A refusal: a stable `code` for programs and a `message` for people.
#[derive(Clone, Debug, Deserialize, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// `not_ready`, `invalid`, `exhausted`, `store` or `bad_request`.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    fn new(code: &str, message: impl Into<String>) -> Self {
        Self { code: code.into(), message: message.into() }
    }
}

/// An allocation as the API reports it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Allocation {
    /// Container id.
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
    /// Address with prefix length.
    pub address: String,
    /// Gateway.
    pub gateway: String,
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
    /// Rootless: the overlay's namespace files.
    pub rootless: Option<crate::status::RootlessStatus>,
    /// Offloads chosen at start, by name.
    pub offloads: Vec<(&'static str, bool)>,
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
    /// Lease mode: the lease as the lease task last saw it.
    pub lease: Option<Arc<Mutex<LeaseView>>>,
    /// Pod address allocation over our subnet.
    pub pods: Arc<PodAllocator<FilePodStore>>,
    /// Tells the signal loop that the node leaves ([`Request::Leave`]).
    pub leave: tokio::sync::mpsc::UnboundedSender<()>,
    /// `wireguard`: our public key and the control thread's counters.
    pub wireguard: Option<(weft_forwarder::wireguard::PublicKey, Arc<super::wireguard::Counters>)>,
}

impl ApiState {
    /// Sums the drop counters of every worker.
    pub fn drops(&self) -> BTreeMap<String, u64> {
        DropReason::ALL.iter().map(|r| (r.as_str().to_string(), self.stats.iter().map(|s| s.drops(*r)).sum())).collect()
    }

    /// Whether pod addresses may be handed out: static mode always; lease mode while the lease
    /// is held and not expired.
    pub fn ready(&self) -> Result<(), ApiError> {
        match &self.lease {
            None => Ok(()),
            Some(v) => match v.lock() {
                Ok(v) if v.ready => Ok(()),
                Ok(v) => Err(ApiError::new(
                    "not_ready",
                    format!("not ready: lease is {} ({})", v.phase, v.last_error.as_deref().unwrap_or("no error")),
                )),
                Err(_) => Err(ApiError::new("not_ready", "not ready: lease state unavailable")),
            },
        }
    }

    /// Answers one request (pod requests do blocking file I/O: call from a blocking thread).
    pub fn handle(&self, req: Request) -> Result<serde_json::Value, ApiError> {
        let json = |v: Result<serde_json::Value, serde_json::Error>| {
            v.map_err(|e| ApiError::new("bad_request", e.to_string()))
        };
        let to_alloc = |who: &Attachment, p: &weft_ipam::PodAddress| Allocation {
            container_id: who.container_id.as_str().into(),
            ifname: who.if_name.as_str().into(),
            address: p.address.to_string(),
            gateway: p.gateway.to_string(),
        };
        let store_err = |e: weft_ipam::PodError| match e {
            weft_ipam::PodError::Exhausted { .. } => ApiError::new("exhausted", e.to_string()),
            other => ApiError::new("store", other.to_string()),
        };
        match req {
            Request::Status => json(serde_json::to_value(self.status())),
            Request::Ready => self.ready().map(|()| serde_json::json!({ "ready": true })),
            Request::Allocate(a) => {
                self.ready()?;
                let who = a.parse()?;
                // An ADD after a DEL that was recorded while we were down wins over that record.
                let spool = weft_ipam::PendingReleases::new(&self.cfg.node.pending_release_dir);
                let p =
                    super::pending::allocate(&spool, &self.pods, &self.cfg.node.api_socket, &who).map_err(store_err)?;
                json(serde_json::to_value(to_alloc(&who, &p)))
            }
            Request::Get(a) => {
                let who = a.parse()?;
                match self.pods.get(&who).map_err(store_err)? {
                    Some(p) => json(serde_json::to_value(to_alloc(&who, &p))),
                    None => Ok(serde_json::Value::Null),
                }
            }
            Request::Release(a) => {
                let who = a.parse()?;
                let freed = self.pods.release(&who).map_err(store_err)?;
                Ok(serde_json::json!({ "released": freed.iter().map(|ip| ip.to_string()).collect::<Vec<_>>() }))
            }
            Request::List => {
                let gw = self.pods.gateway();
                let prefix = self.pods.subnet().prefix_len();
                let list: Vec<Allocation> = self
                    .pods
                    .allocations()
                    .map_err(store_err)?
                    .into_iter()
                    .map(|r| Allocation {
                        container_id: r.owner.as_ref().map(|o| o.container_id.as_str().to_string()).unwrap_or_default(),
                        ifname: r.owner.as_ref().map(|o| o.if_name.as_str().to_string()).unwrap_or_default(),
                        address: format!("{}/{prefix}", r.ip),
                        gateway: gw.to_string(),
                    })
                    .collect();
                json(serde_json::to_value(list))
            }
            Request::Leave => {
                self.leave.send(()).map_err(|_| ApiError::new("store", "the daemon is already stopping"))?;
                Ok(serde_json::json!({ "leaving": true }))
            }
            Request::Gc { valid } => {
                let valid = valid.iter().map(AttachmentRef::parse).collect::<Result<Vec<_>, _>>()?;
                let freed = self.pods.gc(&valid, std::time::SystemTime::now()).map_err(store_err)?;
                Ok(serde_json::json!({ "freed": freed.iter().map(|r| r.ip.to_string()).collect::<Vec<_>>() }))
            }
        }
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
                    wireguard: h.crypto.as_ref().map(|c| crate::status::PeerWireGuard {
                        key_fingerprint: c.public.fingerprint(),
                        handshake_age_secs: c.current.load().as_ref().map(|k| k.created.elapsed().as_secs()),
                        authenticated: c.authenticated.load(Ordering::Relaxed),
                        failed: c.failed.load(Ordering::Relaxed),
                        no_session: c.no_session.load(Ordering::Relaxed),
                    }),
                }
            })
            .collect();
        let icmp = IcmpCounter::ALL
            .iter()
            .map(|c| (c.as_str().to_string(), self.stats.iter().map(|s| s.icmp_count(*c)).sum()))
            .collect();
        let gw = weft_forwarder::LocalNode { subnet_v4: Some(self.cfg.net.subnet), subnet_v6: None }.gateway_v4();
        Status {
            node_name: self.cfg.node.node_name.clone(),
            backend: self.cfg.net.backend.as_str().into(),
            vni: match self.cfg.net.backend {
                crate::config::Backend::Vxlan { vni, .. } => Some(vni.get()),
                crate::config::Backend::Udp | crate::config::Backend::WireGuard { .. } => None,
            },
            vtep_mac: match self.cfg.net.backend {
                crate::config::Backend::Vxlan { vtep_mac, .. } => Some(vtep_mac.to_string()),
                crate::config::Backend::Udp | crate::config::Backend::WireGuard { .. } => None,
            },
            io_backend: self.backend.as_str().into(),
            io_fallback_reason: self.fallback_reason.clone(),
            rootless: self.rootless.clone(),
            offloads: self.offloads.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            offload_counters: weft_forwarder::stats::OffloadCounter::ALL
                .iter()
                .map(|c| (c.as_str().to_owned(), self.stats.iter().map(|s| s.offload_count(*c)).sum()))
                .collect(),
            workers: self.cfg.node.workers,
            network: self.cfg.net.network.to_string(),
            subnet: self.cfg.net.subnet.to_string(),
            gateway: gw.map(|g| g.to_string()).unwrap_or_default(),
            tun: self.cfg.node.tun_name.clone(),
            device: match self.cfg.node.device {
                crate::config::Device::Tun => "tun".into(),
                crate::config::Device::Tap => "tap".into(),
            },
            mtu: self.mtu,
            public_ip: self.cfg.node.public_ip.to_string(),
            port: self.cfg.net.port,
            underlay_interface: self.underlay.name.clone(),
            underlay_mtu: self.underlay.mtu,
            uptime_secs: self.started.elapsed().as_secs(),
            pid: std::process::id(),
            reloads: self.reloads.load(Ordering::Relaxed),
            reload_failures: self.reload_failures.load(Ordering::Relaxed),
            security: match self.wireguard {
                Some(_) => "wireguard: every datagram between nodes is authenticated and encrypted (ChaCha20-Poly1305, Noise IK handshakes); pod traffic inside a node is not".into(),
                None => "cleartext: peers are checked by outer source address, which is not authenticated".into(),
            },
            wireguard: self.wireguard.as_ref().map(|(k, c)| crate::status::WireGuardStatus {
                public_key: k.to_string(),
                handshakes: c.handshakes.load(Ordering::Relaxed),
                initiations_sent: c.initiations_sent.load(Ordering::Relaxed),
                handshakes_refused: c.handshakes_refused.load(Ordering::Relaxed),
            }),
            mode: if self.lease.is_some() { "lease".into() } else { "static".into() },
            lease: self.lease.as_ref().and_then(|v| v.lock().ok().map(|v| v.clone())),
            peers,
            drops: self.drops(),
            icmp,
        }
    }
}

/// Binds the API socket, replacing a stale one, connectable by its owner (root) only.
///
/// Connecting needs write permission on the socket, so 0600 keeps everyone else out. Binding
/// then chmod-ing would leave a moment in which the socket has the umask's mode and anyone
/// may connect and keep the connection; so the socket is bound inside a fresh 0700 directory
/// (nobody else can even reach it there), made 0600, and only then renamed into place, which
/// also replaces a stale socket atomically. The directory of `path` keeps its mode: by default
/// it also holds `subnet.env`, which must stay readable (flannel's `/run/flannel` is 0755).
///
/// # Errors
/// The directory or socket cannot be created.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let private = dir.join(format!(".{name}.bind.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private); // left by a crashed start that had our pid
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("sock");
    let bound = UnixListener::bind(&staged).and_then(|l| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound
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
                    Ok(req) => {
                        let st = Arc::clone(&state);
                        match tokio::task::spawn_blocking(move || st.handle(req)).await {
                            Ok(Ok(v)) => serde_json::to_string(&serde_json::json!({ "ok": v })),
                            Ok(Err(e)) => serde_json::to_string(&serde_json::json!({ "error": e })),
                            Err(e) => serde_json::to_string(
                                &serde_json::json!({ "error": ApiError::new("store", e.to_string()) }),
                            ),
                        }
                    }
                    Err(e) => serde_json::to_string(
                        &serde_json::json!({ "error": ApiError::new("bad_request", format!("bad request: {e}")) }),
                    ),
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
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(ApiError),
    /// The daemon's answer did not parse.
    #[error("api socket {path}: unexpected answer: {message}")]
    Decode {
        /// The socket path.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Sends `req` to the daemon at `path` (blocking, 10 s timeout) and returns its answer.
///
/// # Errors
/// [`ClientError`]; a refusal by the daemon is [`ClientError::Refused`].
pub fn request(path: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let io = |source| ClientError::Io { path: path.into(), source };
    let decode = |message: String| ClientError::Decode { path: path.into(), message };
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|source| ClientError::Connect { path: path.into(), source })?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(10))).map_err(io)?;
    let line = serde_json::to_string(req).map_err(|e| decode(e.to_string()))?;
    s.write_all(format!("{line}\n").as_bytes()).map_err(io)?;
    let mut answer = String::new();
    if BufReader::new(s).read_line(&mut answer).map_err(io)? == 0 {
        // The daemon stopped (or crashed) with our request in flight: that is no answer, like
        // a timeout, not an answer that fails to parse. The request may or may not have run.
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed without an answer");
        return Err(io(eof));
    }
    let mut v: serde_json::Value =
        serde_json::from_str(&answer).map_err(|e| decode(format!("{e}: {}", answer.trim())))?;
    if let Some(e) = v.get_mut("error") {
        let e: ApiError = serde_json::from_value(e.take()).map_err(|e| decode(e.to_string()))?;
        return Err(ClientError::Refused(e));
    }
    v.get_mut("ok").map(serde_json::Value::take).ok_or_else(|| decode(format!("no answer in {}", answer.trim())))
}

/// Asks the daemon at `path` for its status.
///
/// # Errors
/// [`ClientError`].
pub fn query_status(path: &Path) -> Result<Status, ClientError> {
    let v = request(path, &Request::Status)?;
    serde_json::from_value(v).map_err(|e| ClientError::Decode { path: path.into(), message: e.to_string() })
}
