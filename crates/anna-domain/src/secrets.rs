//! Random secrets and how they are stored: nothing that must be compared is kept in clear.

use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// 256 random bits from the operating system's CSPRNG, hex-encoded (64 characters).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes);
    hex::encode(bytes)
}

/// A zero-padded six-digit code drawn uniformly from the CSPRNG.
pub fn random_code() -> String {
    format!("{:06}", rand::rng().random_range(0..1_000_000u32))
}

/// SHA-256 of the token text, lower-case hex. Used for refresh tokens (high entropy, and the
/// predecessor's `refresh_tokens.token_hash` already holds exactly this).
pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Constant-time comparison of two stored hashes.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Keyed hashing for short or user-bound secrets (verification codes and links, reset
/// tokens). A six-digit code hashed with plain SHA-256 would fall to a million guesses offline
/// if the database leaked; keyed with a server secret it does not.
#[derive(Clone)]
pub struct SecretHasher {
    key: Vec<u8>,
}

impl std::fmt::Debug for SecretHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHasher(..)")
    }
}

impl SecretHasher {
    /// Derives the hashing key from a server secret, so the key itself is never the secret
    /// used to sign access tokens.
    pub fn from_server_secret(server_secret: &[u8]) -> Self {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(server_secret).unwrap_or_else(|_| unreachable_hmac());
        mac.update(b"anna/secret-hashing/v1");
        Self { key: mac.finalize().into_bytes().to_vec() }
    }

    /// HMAC-SHA256 over the purpose, the owner and the secret, hex-encoded. The purpose and the
    /// owner are bound in so a hash can never be replayed for another user or another flow.
    pub fn hash(&self, purpose: &str, owner: &str, secret: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable_hmac());
        for part in [purpose, owner, secret] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        hex::encode(mac.finalize().into_bytes())
    }

    /// Hashes `candidate` and compares it with `stored` in constant time.
    pub fn matches(&self, purpose: &str, owner: &str, candidate: &str, stored: &str) -> bool {
        hashes_equal(&self.hash(purpose, owner, candidate), stored)
    }
}

/// HMAC accepts keys of any length, so key setup cannot fail.
fn unreachable_hmac() -> Hmac<Sha256> {
    unreachable!("HMAC-SHA256 accepts keys of any length")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_256_bit_hex_and_distinct() {
        let a = random_token();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, random_token());
    }

    #[test]
    fn codes_are_six_digits() {
        for _ in 0..1000 {
            let code = random_code();
            assert_eq!(code.len(), 6);
            assert!(code.chars().all(|c| c.is_ascii_digit()));
        }
    }

    #[test]
    fn keyed_hash_binds_purpose_owner_and_key() {
        let h = SecretHasher::from_server_secret(b"one");
        let stored = h.hash("verify-code", "u1", "123456");
        assert!(h.matches("verify-code", "u1", "123456", &stored));
        assert!(!h.matches("verify-code", "u2", "123456", &stored));
        assert!(!h.matches("reset", "u1", "123456", &stored));
        assert!(!h.matches("verify-code", "u1", "123457", &stored));
        let other = SecretHasher::from_server_secret(b"two");
        assert!(!other.matches("verify-code", "u1", "123456", &stored));
    }

    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}

/// Authenticated encryption of one-time secrets that must travel inside domain events (the
/// verification code and link, the reset link) to the subscriber that e-mails them. Events
/// are stored in the outbox and copied to streams and DLQs: they carry only this ciphertext.
#[derive(Clone)]
pub struct Sealer {
    cipher: chacha20poly1305::XChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealed value is not valid hex or too short")]
    Malformed,
    #[error("sealed value does not authenticate: wrong key or tampered")]
    Unauthentic,
    #[error("sealing failed")]
    Seal,
}

const NONCE_BYTES: usize = 24;

impl Sealer {
    /// Derives the key from a server secret (with its own label, so it differs from every
    /// other key derived from the same secret).
    pub fn from_server_secret(server_secret: &[u8]) -> Self {
        Self::with_label(server_secret, b"anna/event-secrets/v1")
    }

    /// A sealer whose key is derived from `server_secret` under `label`: sealers with
    /// different labels cannot open each other's values.
    pub fn with_label(server_secret: &[u8], label: &[u8]) -> Self {
        use chacha20poly1305::KeyInit;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(server_secret).unwrap_or_else(|_| unreachable_hmac());
        mac.update(label);
        let key = mac.finalize().into_bytes();
        Self { cipher: chacha20poly1305::XChaCha20Poly1305::new(&key) }
    }

    /// `hex(nonce || ciphertext)`; `context` (the event's aggregate) is authenticated too, so
    /// a sealed value cannot be moved to another event.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Result<String, SealError> {
        use chacha20poly1305::aead::{Aead, Payload};
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(chacha20poly1305::XNonce::from_slice(&nonce), Payload { msg: plaintext, aad: context.as_bytes() })
            .map_err(|_| SealError::Seal)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ciphertext);
        Ok(hex::encode(out))
    }

    pub fn open(&self, sealed: &str, context: &str) -> Result<Vec<u8>, SealError> {
        use chacha20poly1305::aead::{Aead, Payload};
        let bytes = hex::decode(sealed).map_err(|_| SealError::Malformed)?;
        if bytes.len() <= NONCE_BYTES {
            return Err(SealError::Malformed);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_BYTES);
        self.cipher
            .decrypt(chacha20poly1305::XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: context.as_bytes() })
            .map_err(|_| SealError::Unauthentic)
    }
}

#[cfg(test)]
mod sealer_tests {
    use super::*;

    #[test]
    fn seal_then_open() {
        let sealer = Sealer::from_server_secret(b"k");
        let sealed = sealer.seal(b"123456", "user-1").unwrap_or_else(|e| panic!("{e}"));
        assert!(!sealed.contains("123456"));
        assert_eq!(sealer.open(&sealed, "user-1"), Ok(b"123456".to_vec()));
        assert_eq!(sealer.open(&sealed, "user-2"), Err(SealError::Unauthentic));
        assert_eq!(Sealer::from_server_secret(b"other").open(&sealed, "user-1"), Err(SealError::Unauthentic));
        assert_eq!(sealer.open("zz", "user-1"), Err(SealError::Malformed));
        assert_ne!(sealer.seal(b"123456", "user-1").ok(), Some(sealed), "fresh nonce each time");
    }
}
