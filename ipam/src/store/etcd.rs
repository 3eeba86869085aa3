//! The etcd v3 lease store, with flannel's key layout so weft and flannel nodes share one etcd.
//!
//! ```text
//! <prefix>/config                   net-conf JSON          (prefix default /coreos.com/network)
//! <prefix>/subnets/10.244.1.0-24    lease JSON, attached to an etcd lease with the TTL
//! ```
//!
//! - **create** grants an etcd lease and puts the record in a Txn that only succeeds while the
//!   key's `Version` is 0 (flannel's `createSubnet`), so two nodes can never both win a subnet.
//! - **renew** re-puts the record with a freshly granted etcd lease (as flannel's `updateSubnet`
//!   does, which also republishes changed attributes), inside a Txn conditioned on the record's
//!   `ModRevision` after checking that its `PublicIP` is ours: an expired-and-retaken subnet is
//!   reported, never overwritten (flannel#1289). The old etcd lease is then revoked.
//! - A key without an etcd lease is a reservation and stays one.
//! - **list** reads the subnets prefix in pages pinned to one revision (`etcd_pages`), so
//!   that no gRPC message nears the client's decode limit however many leases there are.
//! - **watch** watches the subnets prefix from a revision with `prev_kv`, resumes from its last
//!   revision after a disconnect, and re-lists and diffs when that revision was compacted.
//!
//! Connecting is lazy: [`EtcdStore::connect`] succeeds while etcd is down (flannel#323), and
//! each call fails with [`StoreError::Unavailable`] within `request_timeout` until it is back.
//! That holds with TLS and with etcd users too: the first call authenticates (etcd-client's own
//! `with_user` would authenticate inside `connect`, which then fails while etcd is down), and
//! a refused password is [`StoreError::Denied`], which is not retried as if etcd were down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, KvClient, PutOptions, Txn, TxnOp,
    WatchClient, WatchOptions, WatchStream,
};
use futures::{Stream, StreamExt};
use ipnet::Ipv4Net;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tracing::{debug, warn};

use super::etcd_auth::{EtcdCredentials, EtcdTls, tls_hint};
use super::etcd_pages::{Next, PAGE_KEYS, PageFailure, PageGaveUp, Pager};
use super::{LeaseSnapshot, LeaseStore, Revision, StoreError, UnreadableLease, WatchBatch};
use crate::backoff::Backoff;
use crate::config::NetworkConfig;
use crate::lease::{LeaseAttrs, LeaseKey, SubnetLease};
use crate::watch::{LeaseEvent, resync};

/// `LeaseTimeToLive` requests one [`EtcdStore::list`] keeps in flight (see
/// `EtcdStore::expirations`): enough to hide the round trip, few enough that a bootstrap storm
/// of listing nodes does not flood etcd.
const TTL_CONCURRENCY: usize = 32;

/// Largest gRPC message taken from etcd: a list page or one watch response. tonic's default,
/// 4 MiB, is less than etcd sends legitimately: one record may be up to etcd's request limit
/// (`--max-request-bytes`, 1.5 MiB by default) and one watch response carries up to 1 000
/// revisions of events. 64 MiB is far above that and still bounds what one message can make us
/// allocate. A list page above it is asked again smaller (`etcd_pages`); a watch response above
/// it makes the watch re-list and resume after the list.
pub const MAX_DECODE_BYTES: usize = 64 << 20;

/// Largest value read as a lease record. flannel's lease JSON is about 150 bytes (with VXLAN
/// `BackendData`); a bigger value is a writer's mistake or mischief (whoever can write to
/// etcd), so it is reported unreadable instead of being kept in memory and routed to.
pub const MAX_RECORD_BYTES: usize = 64 << 10;

/// How to reach etcd and where the network lives in it.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`; all are used (balanced), so one down endpoint
    /// does not stop the node.
    pub endpoints: Vec<String>,
    /// Key prefix of the network (flannel's `--etcd-prefix`).
    pub prefix: String,
    /// Deadline of each request; past it the call fails as unavailable.
    pub request_timeout: Duration,
    /// Deadline of establishing a connection.
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive interval and timeout, so a silently dead connection (etcd stopped,
    /// network black-holed) is noticed even by an idle watch.
    pub keep_alive: (Duration, Duration),
    /// TLS files (flannel's `--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`). Used with
    /// `https://` endpoints; see [`EtcdTls`] for what is trusted when no CA is given.
    pub tls: EtcdTls,
    /// An etcd user (flannel's `--etcd-username`, `--etcd-password`), for an etcd with auth
    /// enabled.
    pub credentials: Option<EtcdCredentials>,
}

impl EtcdOptions {
    /// flannel's default prefix.
    pub const DEFAULT_PREFIX: &'static str = "/coreos.com/network";

    /// Defaults for `endpoints`: flannel's prefix, 5 s requests, 3 s connects, 5 s / 3 s
    /// keep-alive.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            keep_alive: (Duration::from_secs(5), Duration::from_secs(3)),
            tls: EtcdTls::default(),
            credentials: None,
        }
    }
}

/// The etcd v3 lease store (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Clients>,
    prefix: Arc<str>,
}

/// etcd-client's `Client` is several kilobytes; keep it behind one pointer.
struct Clients {
    /// For unary calls, with a request timeout.
    client: Client,
    /// For watches: no request timeout (it would cut long-lived streams); keep-alive only.
    watch_client: Client,
    /// `client`'s KV with [`MAX_DECODE_BYTES`], for list pages.
    kv: KvClient,
    /// `watch_client`'s watch with [`MAX_DECODE_BYTES`].
    watch: WatchClient,
    /// The etcd user to authenticate as, if any.
    credentials: Option<EtcdCredentials>,
    /// Whether both clients hold a token for `credentials` (or etcd has auth disabled).
    authenticated: AtomicBool,
    /// Serializes authenticating, so a burst of first calls authenticates once.
    auth_lock: tokio::sync::Mutex<()>,
    /// Deadline of the authenticate calls (the watch client has no request timeout).
    request_timeout: Duration,
    /// The TLS files when the endpoints are `https://`, for error hints.
    tls: Option<EtcdTls>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// An etcd-client error as one line: the gRPC message and each distinct cause below it (TLS
/// alerts and certificate errors are causes; etcd-client's own `Display` shows them as `Debug`
/// of the first one only).
fn describe(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let (mut parts, mut source) = match e {
        etcd_client::Error::GRpcStatus(s) => {
            let first =
                if s.message().is_empty() { format!("grpc status {:?}", s.code()) } else { s.message().to_owned() };
            (vec![first], s.source())
        }
        etcd_client::Error::TransportError(t) => (vec![t.to_string()], t.source()),
        other => (vec![other.to_string()], None),
    };
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// Whether etcd refused who we are (etcd's `rpctypes`: `ErrGRPCUserEmpty`,
/// `ErrGRPCAuthFailed`, `ErrGRPCPermissionDenied`, `ErrGRPCInvalidAuthToken`).
fn is_denied(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(s) = e else { return false };
    match s.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => true,
        tonic::Code::InvalidArgument => {
            let m = s.message();
            m.contains("authentication failed") || m.contains("user name is empty")
        }
        _ => false,
    }
}

/// `ErrGRPCAuthNotEnabled`: we have credentials, etcd has no users.
fn is_auth_not_enabled(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("authentication is not enabled"))
}

/// The failures paging handles itself (see `etcd_pages`).
fn page_failure(e: &etcd_client::Error) -> Option<PageFailure> {
    let etcd_client::Error::GRpcStatus(s) = e else { return None };
    if s.message().contains("decoded message length too large") {
        Some(PageFailure::TooLarge)
    } else if s.message().contains("required revision has been compacted") {
        Some(PageFailure::Compacted)
    } else {
        None
    }
}

/// etcd's own ceiling on a lease TTL (`MaxLeaseTTL`, 9 000 000 000 s, about 285 years).
const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;

/// When a lease with `ttl_secs` (as etcd reports it, untrusted) left at `now` expires. The TTL
/// is clamped to etcd's ceiling so that no value on the wire can overflow the clock.
fn expires_at(now: SystemTime, ttl_secs: u64) -> SystemTime {
    let ttl = Duration::from_secs(ttl_secs.min(MAX_LEASE_TTL_SECS));
    now.checked_add(ttl).unwrap_or(now)
}

/// etcd's revision numbers are `i64`; negative ones never occur and read as 0.
fn rev(r: i64) -> Revision {
    Revision(u64::try_from(r).unwrap_or(0))
}

fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX)
}

impl EtcdStore {
    /// Sets up the clients. Does not wait for etcd: the first calls fail as unavailable until it
    /// answers.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] for an empty or malformed endpoint list.
    ///
    /// With `https://` endpoints, the TLS files are read here ([`StoreError::Io`] naming the
    /// file when one is unusable); TLS files with `http://` endpoints are refused by
    /// etcd-client as unavailable (weft's config validation refuses them first, by name).
    pub async fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        let mut base = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(options.keep_alive.0, options.keep_alive.1)
            .with_keep_alive_while_idle(true)
            // etcd's simple tokens expire (5 min idle by default): authenticate again.
            .with_auto_token_refresh(true);
        let https = options.endpoints.iter().any(|e| e.starts_with("https://"));
        if https || options.tls.is_set() {
            let tls = options.tls.client_config(options.connect_timeout).map_err(|e| StoreError::Io {
                path: e.path().to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })?;
            base = base.with_tls(tls);
        }
        if options.credentials.is_some() && options.endpoints.iter().any(|e| !e.starts_with("https://")) {
            warn!("etcd password over plain http: anyone on the path can read it; use https:// endpoints");
        }
        let connect = |o: ConnectOptions| async {
            Client::connect(&options.endpoints, Some(o))
                .await
                .map_err(|e| StoreError::Unavailable { reason: format!("etcd connect: {}", describe(&e)) })
        };
        let client = connect(base.clone().with_timeout(options.request_timeout)).await?;
        let watch_client = connect(base).await?;
        let kv = client.kv_client().max_decoding_message_size(MAX_DECODE_BYTES);
        let watch = watch_client.watch_client().max_decoding_message_size(MAX_DECODE_BYTES);
        let prefix = options.prefix.trim_end_matches('/').into();
        let inner = Clients {
            client,
            watch_client,
            kv,
            watch,
            credentials: options.credentials,
            authenticated: AtomicBool::new(false),
            auth_lock: tokio::sync::Mutex::new(()),
            request_timeout: options.request_timeout,
            tls: https.then_some(options.tls),
        };
        Ok(Self { inner: Arc::new(inner), prefix })
    }

    /// Turns a failed call into a [`StoreError`]: [`StoreError::Denied`] when etcd refused who
    /// we are, [`StoreError::Unavailable`] otherwise, with a hint when it looks like etcd hung
    /// up on our TLS certificate.
    fn error(&self, op: &str, e: &etcd_client::Error) -> StoreError {
        let description = describe(e);
        if is_denied(e) {
            // The token may have been revoked or the password changed: authenticate again next
            // time.
            self.inner.authenticated.store(false, Ordering::Release);
            let hint = match &self.inner.credentials {
                Some(c) => format!(" (as etcd user {:?})", c.username),
                None => " (etcd has auth enabled: set --etcd-username and --etcd-password)".to_owned(),
            };
            return StoreError::Denied { reason: format!("etcd {op}: {description}{hint}") };
        }
        let hint = self.inner.tls.as_ref().and_then(|tls| tls_hint(&description, tls));
        let reason = match hint {
            Some(h) => format!("etcd {op}: {description} ({h})"),
            None => format!("etcd {op}: {description}"),
        };
        StoreError::Unavailable { reason }
    }

    /// Authenticates both clients as [`EtcdOptions::credentials`] unless done already.
    async fn authenticate(&self) -> Result<(), StoreError> {
        let Some(creds) = &self.inner.credentials else { return Ok(()) };
        if self.inner.authenticated.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_at_a_time = self.inner.auth_lock.lock().await;
        if self.inner.authenticated.load(Ordering::Acquire) {
            return Ok(());
        }
        for client in [&self.inner.client, &self.inner.watch_client] {
            let mut c = client.clone();
            let user = Some((creds.username.clone(), creds.password.expose().to_owned()));
            match tokio::time::timeout(self.inner.request_timeout, c.update_user(user)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if is_auth_not_enabled(&e) => {
                    warn!(user = %creds.username, "etcd has authentication disabled; talking to it without a user");
                    break;
                }
                Ok(Err(e)) if is_denied(&e) => {
                    return Err(StoreError::Denied {
                        reason: format!("etcd authenticate as user {:?}: {}", creds.username, describe(&e)),
                    });
                }
                Ok(Err(e)) => return Err(self.error("authenticate", &e)),
                Err(_) => {
                    return Err(StoreError::Unavailable {
                        reason: format!("etcd authenticate: no answer within {:?}", self.inner.request_timeout),
                    });
                }
            }
        }
        self.inner.authenticated.store(true, Ordering::Release);
        Ok(())
    }

    /// The unary client, authenticated.
    async fn client(&self) -> Result<Client, StoreError> {
        self.authenticate().await?;
        Ok(self.inner.client.clone())
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn lease_key(&self, subnet: Ipv4Net) -> String {
        format!("{}/subnets/{}", self.prefix, LeaseKey(subnet))
    }

    /// Parses a subnets-prefix record: `Ok((subnet, attrs))` or what to report as unreadable.
    fn parse_kv(&self, kv: &KeyValue) -> Result<(Ipv4Net, LeaseAttrs), UnreadableLease> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let name = key.strip_prefix(&self.subnets_prefix()).unwrap_or(&key);
        let subnet = match name.parse::<LeaseKey>() {
            Ok(k) => k.subnet(),
            Err(e) => return Err(UnreadableLease { key, subnet: None, reason: e.to_string() }),
        };
        if kv.value().len() > MAX_RECORD_BYTES {
            let reason = format!("{} bytes, more than the {MAX_RECORD_BYTES} a lease record may be", kv.value().len());
            return Err(UnreadableLease { key, subnet: Some(subnet), reason });
        }
        LeaseAttrs::from_json(kv.value()).map(|attrs| (subnet, attrs)).map_err(|e| UnreadableLease {
            key,
            subnet: Some(subnet),
            reason: e.to_string(),
        })
    }

    /// When the etcd lease `id` expires, seen from `now`; `Ok(None)` for a reservation (id 0),
    /// `Err(None)` when the lease is already gone.
    async fn expiration(&self, id: i64, now: SystemTime) -> Result<Option<SystemTime>, Option<StoreError>> {
        if id == 0 {
            return Ok(None);
        }
        let mut c = self.client().await.map_err(Some)?;
        let resp = c.lease_time_to_live(id, None).await.map_err(|e| Some(self.error("lease ttl", &e)))?;
        match u64::try_from(resp.ttl()) {
            Ok(secs) if secs > 0 => Ok(Some(expires_at(now, secs))),
            _ => Err(None),
        }
    }

    /// [`Self::expiration`] of each distinct etcd lease in `ids`, for [`LeaseStore::list`].
    ///
    /// A list reads one TTL per etcd lease (`LeaseTimeToLive`; etcd has no batch form), i.e.
    /// one per node. In sequence that made a list cost N round trips, and a cluster whose N
    /// nodes each list (bootstrap, resync) N². So the requests go out concurrently, at most
    /// [`TTL_CONCURRENCY`] at a time on the client's multiplexed connection, and each lease is
    /// asked once however many keys share it (id 0, a reservation, costs no request).
    ///
    /// A lease that is already gone (`Err(None)`) is left out of the map. The first error in
    /// `ids` order (`Err(Some(e))`) is returned, as a sequential loop would; the requests still
    /// in flight are then dropped.
    async fn expirations(
        &self,
        ids: impl IntoIterator<Item = i64>,
        now: SystemTime,
    ) -> Result<HashMap<i64, Option<SystemTime>>, StoreError> {
        let mut seen = HashSet::new();
        let distinct: Vec<i64> = ids.into_iter().filter(|&id| seen.insert(id)).collect();
        let mut answers = futures::stream::iter(distinct)
            .map(|id| async move { (id, self.expiration(id, now).await) })
            .buffered(TTL_CONCURRENCY);
        let mut live = HashMap::with_capacity(seen.len());
        while let Some((id, answer)) = answers.next().await {
            match answer {
                Ok(expiration) => {
                    live.insert(id, expiration);
                }
                Err(None) => {}
                Err(Some(e)) => return Err(e),
            }
        }
        Ok(live)
    }

    async fn kv_to_lease(&self, kv: &KeyValue, now: SystemTime) -> Result<Option<SubnetLease>, StoreError> {
        let (subnet, attrs) = match self.parse_kv(kv) {
            Ok(x) => x,
            Err(_) => return Ok(None),
        };
        match self.expiration(kv.lease(), now).await {
            Ok(expiration) => Ok(Some(SubnetLease { subnet, attrs, expiration, created: rev(kv.create_revision()) })),
            Err(None) => Ok(None),
            Err(Some(e)) => Err(e),
        }
    }

    async fn revoke_quietly(&self, id: i64) {
        if id != 0 {
            let mut c = self.inner.client.clone();
            if let Err(e) = c.lease_revoke(id).await {
                debug!(lease_id = id, error = %e, "revoking an unused etcd lease failed; it will expire");
            }
        }
    }

    async fn get_one(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut c = self.client().await?;
        let mut resp = c.get(key, None).await.map_err(|e| self.error("get", &e))?;
        Ok(resp.take_kvs().into_iter().next())
    }
}

impl LeaseStore for EtcdStore {
    async fn get_config(&self) -> Result<NetworkConfig, StoreError> {
        let key = self.config_key();
        let Some(kv) = self.get_one(&key).await? else { return Err(StoreError::ConfigMissing { key }) };
        NetworkConfig::from_json(&String::from_utf8_lossy(kv.value()))
            .map_err(|source| StoreError::InvalidConfig { key, source })
    }

    async fn put_config(&self, config: &NetworkConfig) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        c.put(self.config_key(), config.to_json(), None).await.map_err(|e| self.error("put config", &e))?;
        Ok(())
    }

    async fn list(&self) -> Result<LeaseSnapshot, StoreError> {
        self.authenticate().await?;
        let prefix = self.subnets_prefix();
        let mut pager = Pager::new(prefix.as_bytes(), PAGE_KEYS);
        let mut snap = LeaseSnapshot::default();
        let mut records = Vec::new();
        loop {
            let req = pager.request();
            let mut opts = GetOptions::new().with_range(req.end).with_limit(req.limit);
            if req.revision > 0 {
                opts = opts.with_revision(req.revision);
            }
            let mut kv = self.inner.kv.clone();
            let next = match kv.get(req.from, Some(opts)).await {
                Ok(mut resp) => {
                    let revision = resp.header().map_or(0, |h| h.revision());
                    let more = resp.more();
                    // Parse page by page and drop the raw values: only small records outlive
                    // their page.
                    let kvs = resp.take_kvs();
                    for kv in &kvs {
                        match self.parse_kv(kv) {
                            Ok((subnet, attrs)) => records.push((subnet, attrs, kv.lease(), rev(kv.create_revision()))),
                            Err(unreadable) => snap.unreadable.push(unreadable),
                        }
                    }
                    pager.on_page(kvs.last().map(KeyValue::key), more, revision)
                }
                Err(e) => match page_failure(&e) {
                    Some(failure) => {
                        debug!(?failure, limit = req.limit, revision = req.revision, "list page failed; paging again");
                        pager.on_failure(failure).map_err(|g| match g {
                            PageGaveUp::RecordTooLarge { from } => StoreError::Corrupt {
                                key: prefix.clone(),
                                reason: format!(
                                    "the first record from {:?} on is larger than {MAX_DECODE_BYTES} bytes; cannot list",
                                    String::from_utf8_lossy(&from).trim_end_matches('\0')
                                ),
                            },
                            PageGaveUp::KeptCompacting => StoreError::Unavailable {
                                reason: format!("etcd list: {prefix}: history compacted during every attempt"),
                            },
                        })?
                    }
                    None => return Err(self.error("list", &e)),
                },
            };
            match next {
                Next::Done => break,
                Next::Restart => {
                    records.clear();
                    snap.unreadable.clear();
                }
                Next::Fetch => {}
            }
        }
        snap.revision = rev(pager.revision());
        for unreadable in &snap.unreadable {
            warn!(key = %unreadable.key, reason = %unreadable.reason, "ignoring unreadable lease record");
        }
        let now = SystemTime::now();
        let live = self.expirations(records.iter().map(|&(_, _, id, _)| id), now).await?;
        for (subnet, attrs, id, created) in records {
            // Not in `live`: expiring right now, etcd deletes the key momentarily.
            if let Some(&expiration) = live.get(&id) {
                snap.leases.push(SubnetLease { subnet, attrs, expiration, created });
            }
        }
        snap.leases.sort_by_key(|l| l.subnet);
        Ok(snap)
    }

    async fn create(&self, lease: &SubnetLease, ttl: Duration) -> Result<Option<SubnetLease>, StoreError> {
        let key = self.lease_key(lease.subnet);
        let now = SystemTime::now();
        let mut c = self.client().await?;
        let granted = c.lease_grant(ttl_secs(ttl), None).await.map_err(|e| self.error("lease grant", &e))?;
        let txn = Txn::new().when([Compare::version(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key,
            lease.attrs.to_json(),
            Some(PutOptions::new().with_lease(granted.id())),
        )]);
        match c.txn(txn).await {
            Ok(resp) if resp.succeeded() => Ok(Some(SubnetLease {
                expiration: Some(expires_at(now, u64::try_from(granted.ttl()).unwrap_or(0))),
                created: resp.header().map_or(Revision(0), |h| rev(h.revision())),
                ..lease.clone()
            })),
            Ok(_) => {
                self.revoke_quietly(granted.id()).await;
                Ok(None)
            }
            Err(e) => {
                // If the Txn did commit and only the answer was lost, the record is ours and
                // bound to this lease: keep it; the keeper finds it by PublicIP on the re-list.
                Err(self.error("create", &e))
            }
        }
    }

    async fn renew(&self, lease: &SubnetLease, ttl: Duration) -> Result<SubnetLease, StoreError> {
        let key = self.lease_key(lease.subnet);
        // A concurrent writer can move the record between the read and the Txn; look again.
        for _ in 0..3 {
            let Some(kv) = self.get_one(&key).await? else {
                return Err(StoreError::LeaseGone { subnet: lease.subnet });
            };
            let current = LeaseAttrs::from_json(kv.value())
                .map_err(|e| StoreError::Corrupt { key: key.clone(), reason: e.to_string() })?;
            if current.public_ip != lease.attrs.public_ip {
                return Err(StoreError::LeaseTaken { subnet: lease.subnet, holder: current.public_ip });
            }
            let now = SystemTime::now();
            let mut c = self.client().await?;
            let (new_id, expiration) = if kv.lease() == 0 {
                (0, None)
            } else {
                let granted = c.lease_grant(ttl_secs(ttl), None).await.map_err(|e| self.error("lease grant", &e))?;
                let secs = u64::try_from(granted.ttl()).unwrap_or(0);
                (granted.id(), Some(expires_at(now, secs)))
            };
            let put_opts = (new_id != 0).then(|| PutOptions::new().with_lease(new_id));
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision())])
                .and_then([TxnOp::put(key.clone(), lease.attrs.to_json(), put_opts)]);
            match c.txn(txn).await {
                Ok(resp) if resp.succeeded() => {
                    self.revoke_quietly(kv.lease()).await;
                    return Ok(SubnetLease {
                        subnet: lease.subnet,
                        attrs: lease.attrs.clone(),
                        expiration,
                        created: rev(kv.create_revision()),
                    });
                }
                Ok(_) => self.revoke_quietly(new_id).await,
                Err(e) => return Err(self.error("renew", &e)),
            }
        }
        Err(StoreError::Unavailable { reason: format!("{key}: record kept changing during renewal") })
    }

    async fn release(&self, lease: &SubnetLease) -> Result<bool, StoreError> {
        let key = self.lease_key(lease.subnet);
        let Some(kv) = self.get_one(&key).await? else { return Ok(false) };
        let ours = LeaseAttrs::from_json(kv.value()).is_ok_and(|a| a.public_ip == lease.attrs.public_ip);
        if !ours {
            return Ok(false);
        }
        let mut c = self.client().await?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision())])
            .and_then([TxnOp::delete(key, None)]);
        let resp = c.txn(txn).await.map_err(|e| self.error("release", &e))?;
        if resp.succeeded() {
            self.revoke_quietly(kv.lease()).await;
        }
        Ok(resp.succeeded())
    }

    async fn delete(&self, subnet: Ipv4Net) -> Result<bool, StoreError> {
        let mut c = self.client().await?;
        let resp = c.delete(self.lease_key(subnet), None).await.map_err(|e| self.error("delete", &e))?;
        Ok(resp.deleted() > 0)
    }

    fn watch(&self, from: &LeaseSnapshot) -> impl Stream<Item = Result<WatchBatch, StoreError>> + Send + 'static {
        let state = Watch {
            store: self.clone(),
            known: from.leases.iter().map(|l| (l.subnet, l.clone())).collect(),
            revision: i64::try_from(from.revision.0).unwrap_or(i64::MAX),
            stream: None,
            relist: false,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            rng: StdRng::seed_from_u64(rand::random()),
            pause: None,
        };
        futures::stream::unfold(state, |mut st| async move {
            let item = st.next_batch().await;
            Some((item, st))
        })
    }
}

/// The state of one watch stream.
struct Watch {
    store: EtcdStore,
    known: BTreeMap<Ipv4Net, SubnetLease>,
    /// Last revision applied; the watch resumes after it.
    revision: i64,
    stream: Option<WatchStream>,
    /// History was compacted past `revision`: re-list and diff before watching again.
    relist: bool,
    backoff: Backoff,
    rng: StdRng,
    /// Wait this long before the next attempt (set after a failure).
    pause: Option<Duration>,
}

impl Watch {
    fn fail(&mut self, e: StoreError) -> Result<WatchBatch, StoreError> {
        self.stream = None;
        self.pause = Some(self.backoff.next_delay(&mut self.rng));
        Err(e)
    }

    async fn next_batch(&mut self) -> Result<WatchBatch, StoreError> {
        loop {
            if let Some(pause) = self.pause.take() {
                tokio::time::sleep(pause).await;
            }
            if self.relist {
                let snap = match self.store.list().await {
                    Ok(s) => s,
                    Err(e) => return self.fail(e),
                };
                self.relist = false;
                let old: Vec<SubnetLease> = self.known.values().cloned().collect();
                let events = resync(&old, &snap.leases);
                self.known = snap.leases.into_iter().map(|l| (l.subnet, l)).collect();
                self.revision = i64::try_from(snap.revision.0).unwrap_or(i64::MAX);
                if !events.is_empty() {
                    return Ok(WatchBatch { events, revision: snap.revision, resync: true });
                }
            }
            if self.stream.is_none() {
                if let Err(e) = self.store.authenticate().await {
                    return self.fail(e);
                }
                let opts = WatchOptions::new().with_prefix().with_start_revision(self.revision + 1).with_prev_key();
                let mut c = self.store.inner.watch.clone();
                match c.watch(self.store.subnets_prefix(), Some(opts)).await {
                    Ok(s) => self.stream = Some(s),
                    Err(e) => return self.fail(self.store.error("watch", &e)),
                }
            }
            let Some(stream) = self.stream.as_mut() else { continue };
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return self.fail(StoreError::Unavailable { reason: "etcd watch: stream closed".into() });
                }
                Err(e) if page_failure(&e) == Some(PageFailure::TooLarge) => {
                    // One response above MAX_DECODE_BYTES: resuming would fail on it again.
                    // Re-list instead (paged, so it fits) and watch on from the list.
                    warn!(from_revision = self.revision + 1, error = %describe(&e),
                        "lease watch response too large; re-listing and diffing");
                    self.stream = None;
                    self.relist = true;
                    continue;
                }
                Err(e) => return self.fail(self.store.error("watch", &e)),
            };
            if resp.compact_revision() > 0 || resp.canceled() {
                warn!(
                    from_revision = self.revision + 1,
                    compacted = resp.compact_revision(),
                    reason = resp.cancel_reason(),
                    "lease watch lost its history; re-listing and diffing"
                );
                self.stream = None;
                self.relist = true;
                continue;
            }
            self.backoff.reset();
            let now = SystemTime::now();
            let mut events = Vec::new();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                self.revision = self.revision.max(kv.mod_revision());
                let subnet = match self.store.parse_kv(kv) {
                    Ok((subnet, _)) => subnet,
                    Err(UnreadableLease { subnet: Some(subnet), key, reason }) => {
                        // Unreadable now: whatever it was, we cannot route to it.
                        warn!(key = %key, reason = %reason, "lease record became unreadable");
                        if self.known.remove(&subnet).is_some() {
                            events.push(LeaseEvent::Removed(subnet));
                        }
                        continue;
                    }
                    Err(_) => continue,
                };
                match ev.event_type() {
                    EventType::Delete => {
                        if self.known.remove(&subnet).is_some() {
                            events.push(LeaseEvent::Removed(subnet));
                        }
                    }
                    EventType::Put => {
                        let lease = match self.store.kv_to_lease(kv, now).await {
                            Ok(Some(lease)) => lease,
                            Ok(None) => continue, // its etcd lease is already gone; a Delete follows
                            Err(e) => {
                                // Could not learn its TTL: re-list once the store answers.
                                self.relist = true;
                                return self.fail(e);
                            }
                        };
                        let changed = self.known.get(&subnet).is_none_or(|k| k.attrs != lease.attrs);
                        self.known.insert(subnet, lease.clone());
                        if changed {
                            events.push(LeaseEvent::Added(lease));
                        }
                    }
                }
            }
            if !events.is_empty() {
                let revision = Revision(u64::try_from(self.revision).unwrap_or(0));
                return Ok(WatchBatch { events, revision, resync: false });
            }
        }
    }
}
