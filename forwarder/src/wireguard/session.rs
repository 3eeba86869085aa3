//! Sessions: the keys a handshake made, shared by the control thread (which makes, rotates
//! and retires them) and every worker (which seals and opens with them), without a lock.
//!
//! A peer has up to three keypairs, as in WireGuard: `current` (we send with it), `previous`
//! (still accepted, for datagrams in flight across a rotation) and `next` (a responder's new
//! keypair, not sent with until the initiator's first data message confirms it). Workers
//! read them through [`ArcSwapOption`]; the control thread swaps them. Receivers find the
//! keypair by the index in the datagram, in a fixed table of [`SLOTS`] entries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

use super::handshake::Established;
use super::keys::PublicKey;
use super::replay::ReplayWindow;

/// Receive-index slots: the low bits of an index pick one (the rest is random, so an old
/// index cannot name a new keypair by chance).
pub const SLOTS: usize = 4096;
/// Bytes the AEAD tag adds to every data message.
pub const TAG_LEN: usize = 16;
/// After this many messages a keypair must not be used (WireGuard's REJECT_AFTER_MESSAGES).
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
/// After this many messages the initiator starts a new handshake (REKEY_AFTER_MESSAGES).
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;

/// Why a seal or an open failed.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum CryptoError {
    /// The keypair has sent all it may.
    Exhausted,
    /// The tag did not verify.
    Auth,
    /// Counter replayed or too old.
    Replayed,
}

/// One session's keys and counters.
pub struct Keypair {
    /// The index peers send to (ours).
    pub local_index: u32,
    /// The index we send to (theirs).
    pub remote_index: u32,
    /// Whose keys these are.
    pub peer: PublicKey,
    /// Whether we initiated the handshake.
    pub initiator: bool,
    /// When the handshake finished.
    pub created: Instant,
    send: LessSafeKey,
    recv: LessSafeKey,
    next_counter: AtomicU64,
    replay: ReplayWindow,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keypair")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("peer", &self.peer)
            .field("initiator", &self.initiator)
            .finish_non_exhaustive()
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn key(k: &[u8; 32]) -> LessSafeKey {
    // CHACHA20_POLY1305 takes exactly 32 bytes, which `k` is.
    match UnboundKey::new(&CHACHA20_POLY1305, k) {
        Ok(u) => LessSafeKey::new(u),
        Err(_) => unreachable!("a 32-byte ChaCha20-Poly1305 key"),
    }
}

impl Keypair {
    /// The keypair of a finished handshake.
    pub fn new(e: &Established, now: Instant) -> Self {
        Self {
            local_index: e.local_index,
            remote_index: e.remote_index,
            peer: e.peer,
            initiator: e.initiator,
            created: now,
            send: key(&e.send),
            recv: key(&e.recv),
            next_counter: AtomicU64::new(0),
            replay: ReplayWindow::new(),
        }
    }

    /// Takes `n` consecutive send counters (one atomic add for a whole train); the first.
    ///
    /// # Errors
    /// [`CryptoError::Exhausted`] when the keypair may send no more.
    #[inline]
    pub fn reserve(&self, n: u64) -> Result<u64, CryptoError> {
        let first = self.next_counter.fetch_add(n, Ordering::Relaxed);
        match first.checked_add(n) {
            Some(end) if end < REJECT_AFTER_MESSAGES => Ok(first),
            _ => Err(CryptoError::Exhausted),
        }
    }

    /// Messages sent so far (for the initiator's rekey after [`REKEY_AFTER_MESSAGES`]).
    pub fn sent(&self) -> u64 {
        self.next_counter.load(Ordering::Relaxed)
    }

    /// Encrypts `plain` in place with `counter` and writes the tag into `tag`.
    #[inline]
    pub fn seal(&self, counter: u64, plain: &mut [u8], tag: &mut [u8]) -> Result<(), CryptoError> {
        let t =
            self.send.seal_in_place_separate_tag(nonce(counter), Aad::empty(), plain).map_err(|_| CryptoError::Auth)?;
        let into = tag.get_mut(..TAG_LEN).ok_or(CryptoError::Auth)?;
        into.copy_from_slice(t.as_ref());
        Ok(())
    }

    /// Authenticates and decrypts `sealed` (ciphertext then tag) in place, and records its
    /// counter: the plaintext length. A replay is refused after authentication, so a forged
    /// counter cannot move the window.
    #[inline]
    pub fn open(&self, counter: u64, sealed: &mut [u8]) -> Result<usize, CryptoError> {
        if !self.replay.may_accept(counter) {
            return Err(CryptoError::Replayed);
        }
        let n = self.recv.open_in_place(nonce(counter), Aad::empty(), sealed).map_err(|_| CryptoError::Auth)?.len();
        if !self.replay.accept(counter) {
            return Err(CryptoError::Replayed);
        }
        Ok(n)
    }

    /// Whether anything authentic was received with this keypair (a responder's key
    /// confirmation).
    pub fn received_any(&self) -> bool {
        self.replay.top() > 0
    }
}

/// One peer's cryptographic state and counters, shared by its route-table entry (workers)
/// and the control thread. It outlives route-table rebuilds: the control thread keeps it by
/// public key.
#[derive(Debug)]
pub struct PeerCrypto {
    /// The peer's public key.
    pub public: PublicKey,
    /// The keypair we send with.
    pub current: ArcSwapOption<Keypair>,
    /// The keypair before `current`, still accepted.
    pub previous: ArcSwapOption<Keypair>,
    /// A responder's keypair awaiting the initiator's first data message.
    pub next: ArcSwapOption<Keypair>,
    /// Datagrams from this peer that authenticated.
    pub authenticated: AtomicU64,
    /// Datagrams from this peer's address that failed authentication or replayed.
    pub failed: AtomicU64,
    /// Packets for this peer dropped for want of a session.
    pub no_session: AtomicU64,
}

impl PeerCrypto {
    /// The state of a peer known by `public`, with no session yet.
    pub fn new(public: PublicKey) -> Self {
        Self {
            public,
            current: ArcSwapOption::empty(),
            previous: ArcSwapOption::empty(),
            next: ArcSwapOption::empty(),
            authenticated: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            no_session: AtomicU64::new(0),
        }
    }

    /// A datagram authenticated with `kp`: if `kp` is the responder's unconfirmed `next`, it
    /// is confirmed and becomes `current` (done once, by whichever worker gets there first).
    #[inline]
    pub fn confirm(&self, kp: &Arc<Keypair>) {
        let is_next = self.next.load().as_ref().is_some_and(|n| Arc::ptr_eq(n, kp));
        if is_next {
            let prev = self.next.compare_and_swap(&Some(Arc::clone(kp)), None);
            if prev.as_ref().is_some_and(|n| Arc::ptr_eq(n, kp)) {
                let old = self.current.swap(Some(Arc::clone(kp)));
                self.previous.store(old);
            }
        }
    }

    /// Installs the keypair of a handshake we finished: an initiator's at once, a
    /// responder's as `next`.
    pub fn install(&self, kp: Arc<Keypair>) {
        if kp.initiator {
            let old = self.current.swap(Some(kp));
            self.previous.store(old);
        } else {
            self.next.store(Some(kp));
        }
    }
}

/// Every live keypair by our index, for receivers.
pub struct SessionTable {
    slots: Box<[ArcSwapOption<Keypair>]>,
}

impl std::fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable").finish_non_exhaustive()
    }
}

impl Default for SessionTable {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionTable {
    /// An empty table.
    pub fn new() -> Self {
        Self { slots: (0..SLOTS).map(|_| ArcSwapOption::empty()).collect() }
    }

    #[inline]
    fn slot(&self, index: u32) -> Option<&ArcSwapOption<Keypair>> {
        self.slots.get(index as usize % SLOTS)
    }

    /// The keypair datagrams to `index` are sealed with, if it is live.
    #[inline]
    pub fn get(&self, index: u32) -> Option<Arc<Keypair>> {
        self.slot(index)?.load_full().filter(|k| k.local_index == index)
    }

    /// Whether the slot of `index` is free (the control thread picks indices with it).
    pub fn is_free(&self, index: u32) -> bool {
        self.slot(index).is_some_and(|s| s.load().is_none())
    }

    /// Registers `kp` under its local index (the caller picked a free one).
    pub fn insert(&self, kp: &Arc<Keypair>) {
        if let Some(s) = self.slot(kp.local_index) {
            s.store(Some(Arc::clone(kp)));
        }
    }

    /// Forgets the keypair under `index`, if it is still that one.
    pub fn remove(&self, index: u32) {
        if let Some(s) = self.slot(index) {
            if s.load().as_ref().is_some_and(|k| k.local_index == index) {
                s.store(None);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects, clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wireguard::keys::PrivateKey;

    fn established(initiator: bool) -> (Established, Established) {
        let p = PrivateKey::generate().unwrap().public_key();
        let q = PrivateKey::generate().unwrap().public_key();
        let a = Established { peer: p, local_index: 1, remote_index: 2, send: [1; 32], recv: [2; 32], initiator };
        let b = Established {
            peer: q,
            local_index: 2,
            remote_index: 1,
            send: [2; 32],
            recv: [1; 32],
            initiator: !initiator,
        };
        (a, b)
    }

    #[test]
    fn sealed_opens_once_on_the_other_side_and_tampering_fails() {
        let now = Instant::now();
        let (a, b) = established(true);
        let (a, b) = (Keypair::new(&a, now), Keypair::new(&b, now));
        let mut buf = *b"hello, pod network!.............";
        let mut tag = [0u8; 16];
        let c = a.reserve(1).unwrap();
        a.seal(c, &mut buf, &mut tag).unwrap();
        assert_ne!(&buf[..5], b"hello");
        let mut sealed = [&buf[..], &tag[..]].concat();
        let mut again = sealed.clone();
        let mut tampered = sealed.clone();
        assert_eq!(b.open(c, &mut sealed), Ok(32));
        assert_eq!(&sealed[..5], b"hello");
        assert_eq!(b.open(c, &mut again), Err(CryptoError::Replayed), "a replay");
        tampered[3] ^= 1;
        assert_eq!(b.open(c + 1, &mut tampered), Err(CryptoError::Auth));
        assert_eq!(a.reserve(10).unwrap(), 1);
        assert_eq!(a.sent(), 11);
    }

    #[test]
    fn a_responders_keypair_waits_for_confirmation() {
        let now = Instant::now();
        let (_, b) = established(true);
        let kp = Arc::new(Keypair::new(&b, now));
        let peer = PeerCrypto::new(kp.peer);
        peer.install(Arc::clone(&kp));
        assert!(peer.current.load().is_none(), "not sent with before confirmation");
        peer.confirm(&kp);
        assert!(peer.current.load().as_ref().is_some_and(|c| Arc::ptr_eq(c, &kp)));
        assert!(peer.next.load().is_none());
    }

    #[test]
    fn the_table_finds_only_live_indices() {
        let t = SessionTable::new();
        let (a, _) = established(true);
        let kp = Arc::new(Keypair::new(&a, Instant::now()));
        assert!(t.is_free(1));
        t.insert(&kp);
        assert!(t.get(1).is_some());
        assert!(t.get(1 + SLOTS as u32).is_none(), "same slot, another index");
        t.remove(1 + SLOTS as u32);
        assert!(t.get(1).is_some());
        t.remove(1);
        assert!(t.get(1).is_none());
    }
}
