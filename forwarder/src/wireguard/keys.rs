//! Curve25519 keys as WireGuard writes them: 32 bytes, base64 in configs and leases.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Why a key string was refused.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum KeyError {
    /// Not base64, or not 32 bytes once decoded.
    #[error("not a WireGuard key (44 characters of base64 for 32 bytes)")]
    Malformed,
    /// The all-zero key, which no real key pair has.
    #[error("the all-zero key")]
    Zero,
}

/// A node's public key: what peers publish in their lease (`PublicKey`) and list in static
/// configs.
#[derive(Clone, Copy, Eq, Hash, PartialEq, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

/// A node's private key. Never printed: its `Debug` says only that it is one.
#[derive(Clone)]
pub struct PrivateKey(pub [u8; 32]);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

fn decode(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(s.trim()).map_err(|_| KeyError::Malformed)?;
    let key: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Malformed)?;
    if key == [0; 32] {
        return Err(KeyError::Zero);
    }
    Ok(key)
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode(s).map(Self)
    }
}

impl PublicKey {
    /// The first 8 characters of the base64 form, as `wg show` users recognise a peer.
    pub fn fingerprint(&self) -> String {
        let mut s = STANDARD.encode(self.0);
        s.truncate(8);
        s
    }
}

impl PrivateKey {
    /// A fresh key pair from the operating system's random source.
    ///
    /// # Errors
    /// The random source failed.
    pub fn generate() -> Result<Self, snow::Error> {
        let kp = snow::Builder::new(super::handshake::params()).generate_keypair()?;
        let mut key = [0u8; 32];
        key.copy_from_slice(kp.private.get(..32).unwrap_or(&[0; 32]));
        Ok(Self(key))
    }

    /// Parses the base64 form (`wg genkey`'s output, or weft's key file).
    ///
    /// # Errors
    /// [`KeyError`] naming what is wrong.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        decode(s).map(Self)
    }

    /// The base64 form, for the key file.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The public key of this private key (X25519 with the base point, clamped as RFC 7748).
    pub fn public_key(&self) -> PublicKey {
        PublicKey(super::handshake::public_of(&self.0))
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_bad_ones_are_named() {
        let k = PrivateKey::generate().unwrap();
        let back = PrivateKey::parse(&k.to_base64()).unwrap();
        assert_eq!(back.public_key(), k.public_key());
        let p: PublicKey = k.public_key().to_string().parse().unwrap();
        assert_eq!(p, k.public_key());
        assert_eq!(p.fingerprint().len(), 8);
        assert_eq!("abc".parse::<PublicKey>(), Err(KeyError::Malformed));
        assert_eq!(STANDARD.encode([0u8; 32]).parse::<PublicKey>(), Err(KeyError::Zero));
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }

    /// RFC 7748 §6.1's test vector, and `wg pubkey` agrees with it.
    #[test]
    fn public_key_matches_rfc_7748() {
        let sk = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let pk = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(PrivateKey(sk).public_key().0, pk);
    }

    fn hex(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
