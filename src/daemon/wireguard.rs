//! The `wireguard` backend's control thread: the node key, handshakes and session timers.
//!
//! Workers seal and open with the keypairs this thread installs (`weft_forwarder::wireguard`)
//! and hand it every handshake message they receive, through a bounded queue. It answers
//! initiations, completes its own, and keeps a session up with every peer in the route table:
//! a first handshake as soon as a peer appears, a new one before the session ages out
//! (WireGuard's timers, below), keypairs retired at `REJECT_AFTER_TIME`. Nothing here runs per
//! data packet.
//!
//! Handshakes go to the peer's endpoint from the route table, never to the datagram's source,
//! so a spoofed initiation cannot make weft send anything to a third party.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant, SystemTime};

use weft_forwarder::RouteTableHandle;
use weft_forwarder::wireguard::handshake::tai64n;
use weft_forwarder::wireguard::{
    HandshakeDatagram, HandshakeError, Handshaker, Keypair, PeerCrypto, PrivateKey, PublicKey, SessionTable,
};

/// WireGuard's timers (whitepaper §6.1).
const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often timers are looked at.
const TICK: Duration = Duration::from_millis(250);
/// At most one initiation per peer address is answered in this time (WireGuard's 50 per
/// second): anyone who knows our public key can compute a valid mac1, so this bounds the
/// Diffie-Hellman work a flood of initiations can cost.
const INITIATION_INTERVAL: Duration = Duration::from_millis(20);
/// Handshake messages queued between the workers and this thread; more are dropped and
/// counted (`bad_message`), so a flood of initiations costs a bounded queue.
pub const QUEUE: usize = 256;

/// Why the node key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading, creating or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The file does not hold a key.
    #[error("{path}: {reason} (it must hold one base64 private key, as `wg genkey` writes)")]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Others may read the file.
    #[error("{path}: mode {mode:04o} lets other users read the private key; `chmod 600 {path}`")]
    Loose {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// Loads the node's private key from `path`, or creates one there (0600, in a 0700
/// directory) on first start, as flannel's wireguard backend keeps its `PrivateKeyFile`.
///
/// # Errors
/// [`KeyFileError`] naming the file and what to do.
pub fn load_or_create_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io_err = |source| KeyFileError::Io { path: path.into(), source };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path).map_err(io_err)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::Loose { path: path.into(), mode });
            }
            PrivateKey::parse(&text).map_err(|e| KeyFileError::Malformed { path: path.into(), reason: e.to_string() })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = PrivateKey::generate()
                .map_err(|e| KeyFileError::Malformed { path: path.into(), reason: format!("key generation: {e}") })?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io_err)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err)?;
            }
            // Written under a temporary name and renamed, so a crash never leaves half a key.
            let tmp = path.with_extension("key.tmp");
            let _ = std::fs::remove_file(&tmp);
            let mut f =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io_err)?;
            io::Write::write_all(&mut f, format!("{}\n", key.to_base64()).as_bytes()).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
            std::fs::rename(&tmp, path).map_err(io_err)?;
            tracing::info!(path = %path.display(), public_key = %key.public_key(), "wireguard: created the node key");
            Ok(key)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// What the workers and the control thread share, made before either starts.
pub struct Setup {
    /// The node key.
    pub key: PrivateKey,
    /// Keypairs by our index, for the workers' decryption.
    pub sessions: Arc<SessionTable>,
    /// Where workers queue handshake messages.
    pub queue: SyncSender<HandshakeDatagram>,
    rx: Receiver<HandshakeDatagram>,
    /// Control-plane counters, for status and metrics.
    pub counters: Arc<Counters>,
}

/// What the control thread counts.
#[derive(Debug, Default)]
pub struct Counters {
    /// Handshakes completed (either side).
    pub handshakes: AtomicU64,
    /// Initiations sent.
    pub initiations_sent: AtomicU64,
    /// Handshake messages refused (bad mac1, failed authentication, unknown key, replayed
    /// timestamp, no pending initiation, cookie replies).
    pub handshakes_refused: AtomicU64,
}

impl Setup {
    /// Loads (or creates) the key at `key_file` and makes the shared state.
    ///
    /// # Errors
    /// [`KeyFileError`].
    pub fn new(key_file: &Path) -> Result<Self, KeyFileError> {
        let key = load_or_create_key(key_file)?;
        let (queue, rx) = std::sync::mpsc::sync_channel(QUEUE);
        Ok(Self { key, sessions: Arc::new(SessionTable::new()), queue, rx, counters: Arc::default() })
    }
}

/// A keypair this thread installed, to retire it in time.
struct Live {
    kp: Arc<Keypair>,
    peer: Arc<PeerCrypto>,
}

/// Per peer: when we last sent an initiation.
#[derive(Default)]
struct Attempt {
    sent: Option<Instant>,
}

/// The control thread's state.
struct Control {
    hs: Handshaker,
    sessions: Arc<SessionTable>,
    routes: RouteTableHandle,
    socket: UdpSocket,
    live: HashMap<u32, Live>,
    attempts: HashMap<PublicKey, Attempt>,
    /// When an initiation from each address was last taken up.
    initiations: HashMap<SocketAddr, Instant>,
    counters: Arc<Counters>,
    /// Per-node jitter on retries, so two nodes do not keep initiating at the same instant.
    jitter: Duration,
}

/// Runs the control thread until `stop` is set. `socket` is a clone of one of the workers'
/// sockets on our port: handshakes leave from the port peers know.
pub fn run(setup: Setup, socket: UdpSocket, routes: RouteTableHandle, stop: &AtomicBool) -> io::Result<()> {
    let (mut c, rx) = Control::new(setup, socket, routes);
    let mut next_tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(TICK) {
            Ok(d) => c.on_message(&d, Instant::now()),
            Err(RecvTimeoutError::Timeout) => {}
            // Every worker is gone: the daemon is stopping (or stopped by their failure).
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        if now >= next_tick {
            c.timers(now);
            next_tick = now + TICK;
        }
    }
    Ok(())
}

impl Control {
    fn new(setup: Setup, socket: UdpSocket, routes: RouteTableHandle) -> (Self, Receiver<HandshakeDatagram>) {
        let Setup { key, sessions, rx, counters, queue } = setup;
        // Only the workers queue; with them all gone, the receiver says so.
        drop(queue);
        let jitter = Duration::from_millis(u64::from(rand::random::<u16>() % 500));
        let c = Control {
            hs: Handshaker::new(key, [0; 32]),
            sessions,
            routes,
            socket,
            live: HashMap::new(),
            attempts: HashMap::new(),
            initiations: HashMap::new(),
            counters,
            jitter,
        };
        (c, rx)
    }

    /// The peer with key `k` in the route table now, with its endpoint.
    fn peer(&self, k: &PublicKey) -> Option<(Arc<PeerCrypto>, SocketAddr)> {
        let t = self.routes.load();
        t.peers().iter().find_map(|h| h.crypto.as_ref().filter(|c| c.public == *k).map(|c| (Arc::clone(c), h.endpoint)))
    }

    /// A random index whose slot is free.
    fn fresh_index(&self) -> u32 {
        loop {
            let i: u32 = rand::random();
            if self.sessions.is_free(i) && !self.live.contains_key(&i) {
                return i;
            }
        }
    }

    fn refused(&self, what: &str, e: &HandshakeError, from: SocketAddr) {
        self.counters.handshakes_refused.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%from, error = %e, "wireguard: {what} refused");
    }

    fn on_message(&mut self, d: &HandshakeDatagram, now: Instant) {
        let msg = d.message();
        match msg.first() {
            Some(1) => {
                let last = self.initiations.insert(d.from, now);
                if last.is_some_and(|t| now.saturating_duration_since(t) < INITIATION_INTERVAL) {
                    return self.refused("initiation (rate limit)", &HandshakeError::Replayed, d.from);
                }
                let index = self.fresh_index();
                let routes = self.routes.load();
                let known = |k: &PublicKey| {
                    routes
                        .peers()
                        .iter()
                        .any(|h| h.crypto.as_ref().is_some_and(|c| c.public == *k) && h.endpoint.ip() == d.from.ip())
                };
                match self.hs.on_initiation(msg, index, known) {
                    Ok((resp, est)) => {
                        let Some((peer, endpoint)) = self.peer(&est.peer) else { return };
                        let kp = Arc::new(Keypair::new(&est, now));
                        self.install(&peer, kp);
                        self.send(&resp, endpoint);
                        self.counters.handshakes.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = %est.peer.fingerprint(), "wireguard: answered an initiation");
                    }
                    Err(e) => self.refused("initiation", &e, d.from),
                }
            }
            Some(2) => match self.hs.on_response(msg) {
                Ok(est) => {
                    let Some((peer, endpoint)) = self.peer(&est.peer) else { return };
                    let kp = Arc::new(Keypair::new(&est, now));
                    self.install(&peer, Arc::clone(&kp));
                    // Confirms the session to the responder, which sends nothing before.
                    self.keepalive(&kp, endpoint);
                    self.counters.handshakes.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %est.peer.fingerprint(), "wireguard: handshake complete");
                }
                Err(e) => self.refused("response", &e, d.from),
            },
            // Cookie replies (a peer under load) are not implemented: counted, ignored.
            _ => self.refused("message", &HandshakeError::Malformed, d.from),
        }
    }

    fn install(&mut self, peer: &Arc<PeerCrypto>, kp: Arc<Keypair>) {
        self.sessions.insert(&kp);
        self.live.insert(kp.local_index, Live { kp: Arc::clone(&kp), peer: Arc::clone(peer) });
        peer.install(kp);
    }

    fn send(&self, msg: &[u8], to: SocketAddr) {
        if let Err(e) = self.socket.send_to(msg, to) {
            tracing::debug!(%to, error = %e, "wireguard: handshake send failed");
        }
    }

    /// An empty data message: authenticates, carries nothing.
    fn keepalive(&self, kp: &Keypair, to: SocketAddr) {
        if let Some(msg) = weft_forwarder::wireguard::keepalive(kp) {
            self.send(&msg, to);
        }
    }

    /// Whether the session with `peer` needs a new handshake now.
    fn due(peer: &PeerCrypto, now: Instant) -> bool {
        let cur = peer.current.load();
        match cur.as_ref() {
            // A responder's fresh keypair awaits the initiator's first data message: no
            // handshake of ours crosses it.
            None => peer.next.load().as_ref().is_none_or(|n| now.saturating_duration_since(n.created) >= REKEY_TIMEOUT),
            Some(kp) => {
                let age = now.saturating_duration_since(kp.created);
                (kp.initiator && age >= REKEY_AFTER_TIME)
                    || age >= REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
                    || kp.sent() >= weft_forwarder::wireguard::session::REKEY_AFTER_MESSAGES
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        // Retire keypairs at REJECT_AFTER_TIME, and those of peers that left.
        let table = self.routes.load_full();
        let present: std::collections::HashSet<PublicKey> =
            table.peers().iter().filter_map(|h| h.crypto.as_ref().map(|c| c.public)).collect();
        let expired: Vec<u32> = self
            .live
            .iter()
            .filter(|(_, l)| {
                now.saturating_duration_since(l.kp.created) >= REJECT_AFTER_TIME || !present.contains(&l.kp.peer)
            })
            .map(|(i, _)| *i)
            .collect();
        for i in expired {
            if let Some(l) = self.live.remove(&i) {
                self.sessions.remove(i);
                for slot in [&l.peer.current, &l.peer.previous, &l.peer.next] {
                    if slot.load().as_ref().is_some_and(|k| Arc::ptr_eq(k, &l.kp)) {
                        slot.store(None);
                    }
                }
            }
        }
        self.attempts.retain(|k, _| present.contains(k));
        self.initiations.retain(|_, t| now.saturating_duration_since(*t) < Duration::from_secs(1));
        self.hs.retain_peers(|k| present.contains(k));
        // Handshake with every peer whose session is missing or ageing, retrying every
        // REKEY_TIMEOUT (plus this node's jitter).
        for hop in table.peers() {
            let Some(peer) = &hop.crypto else { continue };
            if !Self::due(peer, now) {
                continue;
            }
            let a = self.attempts.entry(peer.public).or_default();
            if a.sent.is_some_and(|t| now.saturating_duration_since(t) < REKEY_TIMEOUT + self.jitter) {
                continue;
            }
            a.sent = Some(now);
            let index = self.fresh_index();
            let stamp = tai64n(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
            match self.hs.initiate(&peer.public, index, stamp) {
                Ok(msg) => {
                    self.send(&msg, hop.endpoint);
                    self.counters.initiations_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(peer = %hop.name, error = %e, "wireguard: cannot initiate"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use weft_forwarder::{NextHop, PeerCounters, RouteTable};

    /// One node's control thread, driven by hand over a real loopback socket.
    struct Node {
        c: Control,
        socket: UdpSocket,
        peer: Arc<PeerCrypto>,
    }

    fn nodes(dir: &Path) -> (Node, Node) {
        let (sa, sb) = (Setup::new(&dir.join("a.key")).unwrap(), Setup::new(&dir.join("b.key")).unwrap());
        let (ua, ub) = (UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap());
        let node = |setup: Setup, own: UdpSocket, other: &UdpSocket, key: PublicKey, third: u8| {
            let peer = Arc::new(PeerCrypto::new(key));
            let hop = NextHop {
                name: "peer".into(),
                endpoint: other.local_addr().unwrap(),
                subnet_v4: Some(format!("10.244.{third}.0/24").parse().unwrap()),
                subnet_v6: None,
                mac: None,
                mtu: 1420,
                counters: Arc::new(PeerCounters::new(1)),
                crypto: Some(Arc::clone(&peer)),
            };
            let routes = RouteTableHandle::new(RouteTable::new(vec![hop], false).unwrap());
            own.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let (c, _rx) = Control::new(setup, own.try_clone().unwrap(), routes);
            Node { c, socket: own, peer }
        };
        let (ka, kb) = (sa.key.public_key(), sb.key.public_key());
        (node(sa, ua.try_clone().unwrap(), &ub, kb, 2), node(sb, ub, &ua, ka, 1))
    }

    /// Reads one datagram at `n`'s socket: a handshake message is handed to its control
    /// thread; returns the message type.
    fn deliver(n: &mut Node, now: Instant) -> u8 {
        let mut buf = [0u8; 2048];
        let (len, from) = n.socket.recv_from(&mut buf).unwrap();
        let mut d = HandshakeDatagram { from, len: len as u8, bytes: [0; 148] };
        if buf[0] != 4 {
            d.bytes[..len].copy_from_slice(&buf[..len]);
            n.c.on_message(&d, now);
        }
        buf[0]
    }

    fn nothing_sent_to(n: &Node) -> bool {
        n.socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 2048];
        let none = n.socket.recv_from(&mut buf).is_err();
        n.socket.set_nonblocking(false).unwrap();
        none
    }

    /// A first handshake at once, a keepalive to confirm it, a rekey by the initiator at
    /// REKEY_AFTER_TIME, and the old keypair retired at REJECT_AFTER_TIME.
    #[test]
    fn sessions_come_up_rekey_and_retire_on_wireguards_timers() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, mut b) = nodes(dir.path());
        let t0 = Instant::now();
        a.c.timers(t0);
        assert_eq!(deliver(&mut b, t0), 1, "an initiation");
        assert_eq!(deliver(&mut a, t0), 2, "the response");
        assert_eq!(deliver(&mut b, t0), 4, "a keepalive confirms the session");
        let first = a.peer.current.load_full().expect("a has a session");
        assert!(first.initiator && b.peer.next.load().is_some() && b.peer.current.load().is_none());
        assert!(a.c.sessions.get(first.local_index).is_some());
        // b awaits confirmation: it does not cross a's handshake with one of its own.
        b.c.timers(t0 + Duration::from_secs(1));
        assert!(nothing_sent_to(&a));
        // Nothing is due before REKEY_AFTER_TIME.
        a.c.timers(t0 + Duration::from_secs(60));
        assert!(nothing_sent_to(&b));
        let t1 = t0 + Duration::from_secs(121);
        a.c.timers(t1);
        assert_eq!(deliver(&mut b, t1), 1, "the initiator rekeys");
        assert_eq!(deliver(&mut a, t1), 2);
        let second = a.peer.current.load_full().unwrap();
        assert_ne!(second.local_index, first.local_index);
        assert!(a.peer.previous.load().as_ref().is_some_and(|p| Arc::ptr_eq(p, &first)), "still accepted");
        assert_eq!(a.c.counters.handshakes.load(Ordering::Relaxed), 2);
        // REJECT_AFTER_TIME after the first handshake, its keypair is gone everywhere.
        a.c.timers(t0 + Duration::from_secs(181));
        assert!(a.c.sessions.get(first.local_index).is_none());
        assert!(a.peer.previous.load().is_none());
        assert!(a.peer.current.load().as_ref().is_some_and(|c| Arc::ptr_eq(c, &second)));
    }

    /// A second initiation from one address within INITIATION_INTERVAL is not taken up.
    #[test]
    fn initiations_are_rate_limited_per_address() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, mut b) = nodes(dir.path());
        let t0 = Instant::now();
        a.c.timers(t0);
        assert_eq!(deliver(&mut b, t0), 1);
        assert_eq!(deliver(&mut a, t0), 2);
        let _keepalive = deliver(&mut b, t0);
        a.c.attempts.clear();
        a.c.timers(t0 + Duration::from_secs(121));
        assert_eq!(deliver(&mut b, t0 + Duration::from_millis(5)), 1, "too soon after the first");
        assert!(nothing_sent_to(&a), "not answered");
        assert_eq!(b.c.counters.handshakes_refused.load(Ordering::Relaxed), 1);
    }

    /// Initiations from a key the route table does not hold are refused, counted and unanswered.
    #[test]
    fn an_unknown_key_is_refused_and_not_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (a, mut b) = nodes(dir.path());
        let stranger = PrivateKey::generate().unwrap();
        let mut hs = Handshaker::new(stranger, [0; 32]);
        let msg = hs.initiate(&b.c.hs.public_key(), 9, tai64n(Duration::from_secs(1))).unwrap();
        a.socket.send_to(&msg, b.socket.local_addr().unwrap()).unwrap();
        assert_eq!(deliver(&mut b, Instant::now()), 1);
        assert_eq!(b.c.counters.handshakes_refused.load(Ordering::Relaxed), 1);
        assert!(nothing_sent_to(&a));
    }

    #[test]
    fn the_key_is_created_once_0600_and_loose_or_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/n1.key");
        let k1 = load_or_create_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        assert_eq!(load_or_create_key(&path).unwrap().public_key(), k1.public_key(), "kept across restarts");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_key(&path).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::write(&path, "not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_or_create_key(&path).unwrap_err().to_string();
        assert!(e.contains("wg genkey"), "{e}");
    }
}
