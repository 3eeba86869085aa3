//! WireGuard's handshake, sans-IO: messages in and out as byte arrays, keys out.
//!
//! WireGuard's handshake is the Noise protocol `Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s` with
//! WireGuard's identifier as the prologue (whitepaper §5.4), wrapped in its own framing
//! (type, sender and receiver indices) and MACs. [`snow`] runs the Noise part; this module
//! adds the framing, `mac1` (keyed BLAKE2s over the message, which the responder checks
//! before spending a Diffie-Hellman on it), the TAI64N timestamp that stops a replayed
//! initiation, and the split into the two transport keys. No cryptography is written here.
//!
//! Not implemented: cookie replies under load (`mac2` is sent as zeros and not required;
//! a received cookie reply is dropped), and per-peer preshared keys (one for the whole
//! network, or none: zeros, as WireGuard without a PSK).

use std::collections::HashMap;

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput as _, Mac as _};
use blake2::{Blake2s256, Blake2sMac, Digest as _};
use snow::params::NoiseParams;

use super::keys::{PrivateKey, PublicKey};

/// WireGuard's Noise prologue (its `IDENTIFIER`).
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
const LABEL_MAC1: &[u8] = b"mac1----";

/// Bytes of a handshake initiation (message type 1).
pub const INITIATION_LEN: usize = 148;
/// Bytes of a handshake response (message type 2).
pub const RESPONSE_LEN: usize = 92;
/// Bytes of a cookie reply (message type 3).
pub const COOKIE_REPLY_LEN: usize = 64;
/// The Noise part of an initiation: ephemeral (32), static (32 + 16), timestamp (12 + 16).
const NOISE_INIT_LEN: usize = 108;
/// The Noise part of a response: ephemeral (32), empty payload's tag (16).
const NOISE_RESP_LEN: usize = 48;

/// The Noise protocol, parsed once.
pub fn params() -> NoiseParams {
    // A constant that snow's own test suite parses; a failure here would be a snow bug.
    match "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s".parse() {
        Ok(p) => p,
        Err(_) => unreachable!("snow knows Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"),
    }
}

/// X25519(`private`, base point): the public key.
pub(super) fn public_of(private: &[u8; 32]) -> [u8; 32] {
    use snow::resolvers::{CryptoResolver as _, DefaultResolver};
    let mut out = [0u8; 32];
    if let Some(mut dh) = DefaultResolver.resolve_dh(&snow::params::DHChoice::Curve25519) {
        dh.set(private);
        out.copy_from_slice(dh.pubkey().get(..32).unwrap_or(&[0; 32]));
    }
    out
}

/// Why a handshake message was refused. Each is counted by the caller; none is answered.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Wrong length or type for the message.
    #[error("malformed handshake message")]
    Malformed,
    /// `mac1` does not match: not meant for us, or tampered with.
    #[error("bad mac1")]
    BadMac,
    /// The Noise message did not decrypt: a wrong key, or a forgery.
    #[error("handshake failed to authenticate")]
    Auth,
    /// The initiator's static key is not one of our peers'.
    #[error("initiation from an unknown public key")]
    UnknownPeer,
    /// The initiation's timestamp is not newer than the last one from that peer: a replay.
    #[error("replayed initiation (timestamp not newer)")]
    Replayed,
    /// A response for no initiation of ours (or one already answered).
    #[error("response to no pending initiation")]
    NoPending,
    /// snow refused to build a state (a bad key length): not reachable from the network.
    #[error("noise state: {0}")]
    Noise(snow::Error),
}

/// A finished handshake: the keys of one new session with `peer`.
#[derive(Clone, Debug)]
pub struct Established {
    /// The peer's public key.
    pub peer: PublicKey,
    /// Our index: peers put it in every data message they send us.
    pub local_index: u32,
    /// The peer's index: we put it in every data message we send.
    pub remote_index: u32,
    /// Our sending key.
    pub send: [u8; 32],
    /// Our receiving key.
    pub recv: [u8; 32],
    /// Whether we initiated (the initiator may send at once; the responder waits for the
    /// first data message, WireGuard's key confirmation).
    pub initiator: bool,
}

struct Pending {
    peer: PublicKey,
    state: snow::HandshakeState,
}

/// One node's side of every handshake: its static key, the initiations it sent and awaits
/// answers to, and the newest initiation timestamp each peer sent it.
pub struct Handshaker {
    local: PrivateKey,
    local_pub: PublicKey,
    psk: [u8; 32],
    pending: HashMap<u32, Pending>,
    newest: HashMap<PublicKey, [u8; 12]>,
}

impl std::fmt::Debug for Handshaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshaker").field("local", &self.local_pub).field("pending", &self.pending.len()).finish()
    }
}

/// `HASH(LABEL_MAC1 || public)`: the key of `mac1` for messages to `public`.
fn mac1_key(public: &PublicKey) -> [u8; 32] {
    let mut h = Blake2s256::new();
    blake2::Digest::update(&mut h, LABEL_MAC1);
    blake2::Digest::update(&mut h, public.0);
    h.finalize().into()
}

/// Keyed BLAKE2s-128 of `msg`.
fn mac(key: &[u8; 32], msg: &[u8]) -> [u8; 16] {
    let Ok(mut m) = <Blake2sMac<U16> as blake2::digest::KeyInit>::new_from_slice(key) else { return [0; 16] };
    blake2::digest::Mac::update(&mut m, msg);
    m.finalize_fixed().into()
}

/// Checks the `mac1` at `msg[len - 32..len - 16]` against `key`, in constant time (the
/// `Mac::verify` of the digest crate).
fn mac1_ok(key: &[u8; 32], msg: &[u8]) -> bool {
    let Some(at) = msg.len().checked_sub(32) else { return false };
    let (Some(body), Some(tag)) = (msg.get(..at), msg.get(at..at.saturating_add(16))) else { return false };
    let Ok(mut m) = <Blake2sMac<U16> as blake2::digest::KeyInit>::new_from_slice(key) else { return false };
    blake2::digest::Mac::update(&mut m, body);
    m.verify_slice(tag).is_ok()
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.checked_add(4)?)?.try_into().ok().map(u32::from_le_bytes)
}

/// TAI64N of a time since the Unix epoch: what an initiation carries.
pub fn tai64n(since_epoch: std::time::Duration) -> [u8; 12] {
    let mut t = [0u8; 12];
    let secs = 0x4000_0000_0000_000au64.wrapping_add(since_epoch.as_secs());
    t[..8].copy_from_slice(&secs.to_be_bytes());
    t[8..].copy_from_slice(&since_epoch.subsec_nanos().to_be_bytes());
    t
}

impl Handshaker {
    /// A handshaker for the node with key `local`; `psk` is the network's preshared key (zeros
    /// for none, as WireGuard).
    pub fn new(local: PrivateKey, psk: [u8; 32]) -> Self {
        let local_pub = local.public_key();
        Self { local, local_pub, psk, pending: HashMap::new(), newest: HashMap::new() }
    }

    /// Our public key.
    pub fn public_key(&self) -> PublicKey {
        self.local_pub
    }

    fn builder(&self) -> snow::Builder<'_> {
        snow::Builder::new(params())
    }

    /// An initiation to `peer`, sent from `local_index`, stamped `now` (TAI64N). Replaces any
    /// initiation to that peer still pending under the same index.
    ///
    /// # Errors
    /// [`HandshakeError::Noise`] (not reachable with well-formed keys).
    pub fn initiate(
        &mut self,
        peer: &PublicKey,
        local_index: u32,
        now: [u8; 12],
    ) -> Result<[u8; INITIATION_LEN], HandshakeError> {
        let mut state = self
            .builder()
            .local_private_key(&self.local.0)
            .and_then(|b| b.remote_public_key(&peer.0))
            .and_then(|b| b.prologue(IDENTIFIER))
            .and_then(|b| b.psk(2, &self.psk))
            .and_then(snow::Builder::build_initiator)
            .map_err(HandshakeError::Noise)?;
        let mut msg = [0u8; INITIATION_LEN];
        msg[0] = 1;
        msg[4..8].copy_from_slice(&local_index.to_le_bytes());
        let n = state.write_message(&now, &mut msg[8..8 + NOISE_INIT_LEN]).map_err(HandshakeError::Noise)?;
        if n != NOISE_INIT_LEN {
            return Err(HandshakeError::Malformed);
        }
        let m1 = mac(&mac1_key(peer), &msg[..116]);
        msg[116..132].copy_from_slice(&m1);
        self.pending.retain(|_, p| p.peer != *peer);
        self.pending.insert(local_index, Pending { peer: *peer, state });
        Ok(msg)
    }

    /// Answers an initiation from a peer `known` accepts, giving it `local_index`.
    ///
    /// # Errors
    /// [`HandshakeError`] naming why it was refused; the caller counts it and sends nothing.
    pub fn on_initiation(
        &mut self,
        msg: &[u8],
        local_index: u32,
        known: impl Fn(&PublicKey) -> bool,
    ) -> Result<([u8; RESPONSE_LEN], Established), HandshakeError> {
        if msg.len() != INITIATION_LEN || msg.get(..4) != Some(&[1, 0, 0, 0][..]) {
            return Err(HandshakeError::Malformed);
        }
        if !mac1_ok(&mac1_key(&self.local_pub), msg) {
            return Err(HandshakeError::BadMac);
        }
        let remote_index = le32(msg, 4).ok_or(HandshakeError::Malformed)?;
        let mut state = self
            .builder()
            .local_private_key(&self.local.0)
            .and_then(|b| b.prologue(IDENTIFIER))
            .and_then(|b| b.psk(2, &self.psk))
            .and_then(snow::Builder::build_responder)
            .map_err(HandshakeError::Noise)?;
        let mut stamp = [0u8; 12];
        let noise = msg.get(8..8 + NOISE_INIT_LEN).ok_or(HandshakeError::Malformed)?;
        let n = state.read_message(noise, &mut stamp).map_err(|_| HandshakeError::Auth)?;
        let peer = state
            .get_remote_static()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .map(PublicKey)
            .ok_or(HandshakeError::Auth)?;
        if n != 12 {
            return Err(HandshakeError::Malformed);
        }
        if !known(&peer) {
            return Err(HandshakeError::UnknownPeer);
        }
        // TAI64N compares as big-endian bytes.
        if self.newest.get(&peer).is_some_and(|last| stamp <= *last) {
            return Err(HandshakeError::Replayed);
        }
        let mut out = [0u8; RESPONSE_LEN];
        out[0] = 2;
        out[4..8].copy_from_slice(&local_index.to_le_bytes());
        out[8..12].copy_from_slice(&remote_index.to_le_bytes());
        let n = state.write_message(&[], &mut out[12..12 + NOISE_RESP_LEN]).map_err(HandshakeError::Noise)?;
        if n != NOISE_RESP_LEN {
            return Err(HandshakeError::Malformed);
        }
        let m1 = mac(&mac1_key(&peer), &out[..60]);
        out[60..76].copy_from_slice(&m1);
        let (i2r, r2i) = state.dangerously_get_raw_split();
        self.newest.insert(peer, stamp);
        Ok((out, Established { peer, local_index, remote_index, send: r2i, recv: i2r, initiator: false }))
    }

    /// Completes our initiation that `msg` answers.
    ///
    /// # Errors
    /// [`HandshakeError`] naming why it was refused; the caller counts it and sends nothing.
    pub fn on_response(&mut self, msg: &[u8]) -> Result<Established, HandshakeError> {
        if msg.len() != RESPONSE_LEN || msg.get(..4) != Some(&[2, 0, 0, 0][..]) {
            return Err(HandshakeError::Malformed);
        }
        if !mac1_ok(&mac1_key(&self.local_pub), msg) {
            return Err(HandshakeError::BadMac);
        }
        let remote_index = le32(msg, 4).ok_or(HandshakeError::Malformed)?;
        let local_index = le32(msg, 8).ok_or(HandshakeError::Malformed)?;
        let noise = msg.get(12..12 + NOISE_RESP_LEN).ok_or(HandshakeError::Malformed)?;
        // snow's read advances the Noise state even when it fails, so a refused response
        // (after a valid mac1, which anyone who knows our public key can compute) ends this
        // initiation; the next try (REKEY_TIMEOUT) starts a fresh one. Someone who can read
        // our initiations can delay a handshake this way, as one who can drop them can.
        let p = self.pending.remove(&local_index).ok_or(HandshakeError::NoPending)?;
        let (peer, mut state) = (p.peer, p.state);
        let mut none = [0u8; 0];
        state.read_message(noise, &mut none).map_err(|_| HandshakeError::Auth)?;
        let (i2r, r2i) = state.dangerously_get_raw_split();
        Ok(Established { peer, local_index, remote_index, send: i2r, recv: r2i, initiator: true })
    }

    /// Forgets pending initiations to peers `keep` no longer accepts.
    pub fn retain_peers(&mut self, keep: impl Fn(&PublicKey) -> bool) {
        self.pending.retain(|_, p| keep(&p.peer));
        self.newest.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects, clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pair() -> (Handshaker, Handshaker) {
        (
            Handshaker::new(PrivateKey::generate().unwrap(), [0; 32]),
            Handshaker::new(PrivateKey::generate().unwrap(), [0; 32]),
        )
    }

    #[test]
    fn a_handshake_gives_both_sides_matching_keys() {
        let (mut a, mut b) = pair();
        let (pa, pb) = (a.public_key(), b.public_key());
        let init = a.initiate(&pb, 7, tai64n(Duration::from_secs(100))).unwrap();
        let (resp, eb) = b.on_initiation(&init, 9, |k| *k == pa).unwrap();
        let ea = a.on_response(&resp).unwrap();
        assert_eq!((ea.peer, eb.peer), (pb, pa));
        assert_eq!((ea.local_index, ea.remote_index, eb.local_index, eb.remote_index), (7, 9, 9, 7));
        assert_eq!((ea.send, ea.recv), (eb.recv, eb.send));
        assert_ne!(ea.send, ea.recv);
        assert!(ea.initiator && !eb.initiator);
        assert!(matches!(a.on_response(&resp), Err(HandshakeError::NoPending)), "answered once");
    }

    #[test]
    fn replayed_tampered_and_unknown_initiations_are_refused() {
        let (mut a, mut b) = pair();
        let (pa, pb) = (a.public_key(), b.public_key());
        let init = a.initiate(&pb, 1, tai64n(Duration::from_secs(100))).unwrap();
        assert!(b.on_initiation(&init, 2, |k| *k == pa).is_ok());
        assert!(matches!(b.on_initiation(&init, 3, |k| *k == pa), Err(HandshakeError::Replayed)));
        let newer = a.initiate(&pb, 4, tai64n(Duration::from_secs(101))).unwrap();
        let mut bad = newer;
        bad[40] ^= 1;
        assert!(matches!(b.on_initiation(&bad, 5, |k| *k == pa), Err(HandshakeError::BadMac)));
        assert!(matches!(b.on_initiation(&newer, 5, |_| false), Err(HandshakeError::UnknownPeer)));
        assert!(b.on_initiation(&newer, 5, |k| *k == pa).is_ok());
        // Sent to another node's key: mac1 is keyed by the responder's public key.
        let (_, mut c) = pair();
        let to_b = a.initiate(&pb, 6, tai64n(Duration::from_secs(102))).unwrap();
        assert!(matches!(c.on_initiation(&to_b, 1, |_| true), Err(HandshakeError::BadMac)));
        assert!(matches!(b.on_initiation(&to_b[..100], 1, |_| true), Err(HandshakeError::Malformed)));
    }

    /// A node that has the peer's public key but the wrong private key (or a peer that
    /// expects another key) never completes.
    #[test]
    fn a_wrong_key_never_completes() {
        let (mut a, mut b) = pair();
        let pa = a.public_key();
        let imposter = PrivateKey::generate().unwrap().public_key();
        // a believes b's key is `imposter`: mac1 is keyed wrong and the Noise message too.
        let init = a.initiate(&imposter, 1, tai64n(Duration::from_secs(5))).unwrap();
        assert!(b.on_initiation(&init, 2, |k| *k == pa).is_err());
    }

    #[test]
    fn tai64n_orders_as_bytes() {
        let a = tai64n(Duration::new(10, 999_999_999));
        let b = tai64n(Duration::new(11, 0));
        assert!(a < b);
        assert_eq!(&a[..8], &(0x4000_0000_0000_000au64 + 10).to_be_bytes());
    }
}
