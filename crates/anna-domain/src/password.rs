//! Password policy and Argon2id hashing.

use argon2::password_hash::phc::{Output, ParamsString, Salt};
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use rand::Rng;

use crate::InvalidArgument;

pub const MIN_PASSWORD_CHARS: usize = 8;
pub const MAX_PASSWORD_CHARS: usize = 128;

/// The password policy: 8 to 128 characters, and not the account's own e-mail.
pub fn check_policy(password: &str, email: &str) -> Result<(), InvalidArgument> {
    let chars = password.chars().count();
    if !(MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&chars) {
        return Err(InvalidArgument(format!(
            "password must be between {MIN_PASSWORD_CHARS} and {MAX_PASSWORD_CHARS} characters"
        )));
    }
    if password.trim().eq_ignore_ascii_case(email.trim()) {
        return Err(InvalidArgument("password must not be the e-mail address".into()));
    }
    Ok(())
}

/// Argon2id cost parameters used for new hashes. Existing hashes verify with the parameters
/// written in their own PHC string, whatever these are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Cost {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for Argon2Cost {
    /// OWASP's minimum for Argon2id (19 MiB, 2 passes, 1 lane): a few tens of milliseconds in a
    /// release build on one core of this project's 2-core reference machine.
    fn default() -> Self {
        Self { memory_kib: 19_456, iterations: 2, parallelism: 1 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("invalid Argon2 parameters: {0}")]
    Params(String),
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Argon2's working memory (`m` KiB), kept by a hashing thread from one hash to the next.
/// Allocating it afresh for every hash leaves the freed blocks in the allocator's per-thread
/// arenas of whichever threads ran hashes: under a login flood that is tens of MiB per thread,
/// kept for good. Reused, it is allocated once per hashing thread.
#[derive(Default)]
pub struct ArgonMemory(Vec<Block>);

impl ArgonMemory {
    /// The first `blocks` blocks, grown when a hash needs more (one made with a larger cost).
    fn blocks(&mut self, blocks: usize) -> &mut [Block] {
        if self.0.len() < blocks {
            self.0.resize(blocks, Block::default());
        }
        &mut self.0[..blocks]
    }

    /// Gives back what a hash with a larger cost (an old hash being verified) grew it to.
    fn keep_at_most(&mut self, blocks: usize) {
        if self.0.len() > blocks {
            self.0.truncate(blocks);
            self.0.shrink_to_fit();
        }
    }

    /// Bytes held.
    pub fn size(&self) -> usize {
        self.0.len() * Block::SIZE
    }
}

#[derive(Clone)]
pub struct PasswordHasher {
    argon: Argon2<'static>,
    params: Params,
    dummy_hash: String,
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHasher(..)")
    }
}

const SALT_BYTES: usize = 16;
const OUTPUT_BYTES: usize = 32;

impl PasswordHasher {
    pub fn new(cost: Argon2Cost) -> Result<Self, PasswordError> {
        let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, Some(OUTPUT_BYTES))
            .map_err(|e| PasswordError::Params(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let mut hasher = Self { argon, params, dummy_hash: String::new() };
        hasher.dummy_hash = hasher.hash(&crate::secrets::random_token())?;
        Ok(hasher)
    }

    /// Bytes of working memory one hash with the configured cost takes.
    pub fn memory_bytes(&self) -> usize {
        self.params.block_count() * Block::SIZE
    }

    /// A PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) with a fresh random salt.
    pub fn hash(&self, password: &str) -> Result<String, PasswordError> {
        self.hash_in(password, &mut ArgonMemory::default())
    }

    /// `hash`, working in `memory`.
    pub fn hash_in(&self, password: &str, memory: &mut ArgonMemory) -> Result<String, PasswordError> {
        let mut salt = [0u8; SALT_BYTES];
        rand::rng().fill(&mut salt);
        let mut out = [0u8; OUTPUT_BYTES];
        self.argon
            .hash_password_into_with_memory(
                password.as_bytes(),
                &salt,
                &mut out,
                memory.blocks(self.params.block_count()),
            )
            .map_err(|e| PasswordError::Hash(e.to_string()))?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&self.params).map_err(|e| PasswordError::Hash(e.to_string()))?,
            salt: Some(Salt::new(&salt).map_err(|e| PasswordError::Hash(e.to_string()))?),
            hash: Some(Output::new(&out).map_err(|e| PasswordError::Hash(e.to_string()))?),
        };
        Ok(phc.to_string())
    }

    /// Verifies against a stored PHC string, using the parameters recorded in it. A malformed
    /// stored hash never verifies.
    pub fn verify(&self, password: &str, stored_phc: &str) -> bool {
        self.verify_in(password, stored_phc, &mut ArgonMemory::default())
    }

    /// `verify`, working in `memory`.
    pub fn verify_in(&self, password: &str, stored_phc: &str, memory: &mut ArgonMemory) -> bool {
        let Ok(parsed) = PasswordHash::new(stored_phc) else { return false };
        let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else { return false };
        let Ok(algorithm) = Algorithm::new(parsed.algorithm.as_str()) else { return false };
        let Ok(version) = parsed.version.map_or(Ok(Version::default()), Version::try_from) else { return false };
        let Ok(params) = Params::try_from(&parsed) else { return false };
        let blocks = params.block_count();
        let argon = Argon2::new(algorithm, version, params);
        let mut out = vec![0u8; expected.len()];
        let hashed =
            argon.hash_password_into_with_memory(password.as_bytes(), salt.as_ref(), &mut out, memory.blocks(blocks));
        // Memory stays at what the configured cost needs, so threads × that cost bounds it.
        memory.keep_at_most(self.params.block_count());
        if hashed.is_err() {
            return false;
        }
        // Output's equality is constant-time.
        Output::new(&out).is_ok_and(|computed| &computed == expected)
    }

    /// Whether a stored hash was made with other parameters than new hashes get (an older cost,
    /// or the predecessor's): it should be replaced at the next successful login.
    pub fn needs_rehash(&self, stored_phc: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(stored_phc) else { return true };
        let expected = [("m", self.params.m_cost()), ("t", self.params.t_cost()), ("p", self.params.p_cost())];
        parsed.algorithm.as_str() != "argon2id"
            || parsed.version != Some(0x13)
            || expected.iter().any(|(name, value)| parsed.params.get_decimal(*name) != Some(*value))
    }

    /// Spends the same work as a real verification, for unknown accounts, so response time
    /// does not tell whether an e-mail is registered.
    pub fn verify_dummy(&self, password: &str) {
        let _ = self.verify(password, &self.dummy_hash);
    }

    /// `verify_dummy`, working in `memory`.
    pub fn verify_dummy_in(&self, password: &str, memory: &mut ArgonMemory) {
        let _ = self.verify_in(password, &self.dummy_hash, memory);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> PasswordHasher {
        PasswordHasher::new(Argon2Cost { memory_kib: 1024, iterations: 1, parallelism: 1 })
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn hash_then_verify() {
        let h = cheap();
        let phc = h.hash("correct horse").unwrap_or_else(|e| panic!("{e}"));
        assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"));
        assert!(h.verify("correct horse", &phc));
        assert!(!h.verify("wrong horse", &phc));
        assert!(!h.verify("correct horse", "not a phc string"));
    }

    #[test]
    fn verifies_hashes_made_with_other_parameters() {
        // The predecessor stored hashes with m=65536,t=2,p=1; they must keep verifying.
        let predecessor = PasswordHasher::new(Argon2Cost { memory_kib: 65_536, iterations: 2, parallelism: 1 })
            .unwrap_or_else(|e| panic!("{e}"));
        let phc = predecessor.hash("predecessor password").unwrap_or_else(|e| panic!("{e}"));
        assert!(phc.contains("m=65536,t=2,p=1"));
        assert!(cheap().verify("predecessor password", &phc));
    }

    #[test]
    fn outdated_hashes_need_a_rehash() {
        let h = cheap();
        let current = h.hash("pw-pw-pw-pw").unwrap_or_else(|e| panic!("{e}"));
        assert!(!h.needs_rehash(&current));
        let predecessor = PasswordHasher::new(Argon2Cost { memory_kib: 2048, iterations: 1, parallelism: 1 })
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(h.needs_rehash(&predecessor.hash("pw-pw-pw-pw").unwrap_or_else(|e| panic!("{e}"))));
        assert!(h.needs_rehash("garbage"));
    }

    #[test]
    fn hashes_made_in_reused_memory_verify_anywhere() {
        let h = cheap();
        let mut memory = ArgonMemory::default();
        let first = h.hash_in("correct horse", &mut memory).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(memory.size(), h.memory_bytes());
        let second = h.hash_in("battery staple", &mut memory).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(first, second);
        assert!(h.verify("correct horse", &first) && h.verify_in("battery staple", &second, &mut memory));
        assert!(!h.verify_in("correct horse", &second, &mut memory));
        // A hash with a larger cost grows the memory for its time only.
        let bigger = PasswordHasher::new(Argon2Cost { memory_kib: 4096, iterations: 1, parallelism: 1 })
            .unwrap_or_else(|e| panic!("{e}"));
        let phc = bigger.hash("pw-pw-pw-pw").unwrap_or_else(|e| panic!("{e}"));
        assert!(h.verify_in("pw-pw-pw-pw", &phc, &mut memory));
        assert_eq!(memory.size(), h.memory_bytes(), "given back after the larger hash");
        // The standard encoding: another Argon2 implementation reads what we write.
        let parsed = PasswordHash::new(&first).unwrap_or_else(|e| panic!("{e}"));
        use argon2::PasswordVerifier;
        assert!(Argon2::default().verify_password(b"correct horse", &parsed).is_ok());
    }

    #[test]
    fn policy() {
        assert!(check_policy("short", "a@b.co").is_err());
        assert!(check_policy(&"x".repeat(129), "a@b.co").is_err());
        assert!(check_policy("a@b.co.uk", "a@b.co.uk").is_err());
        assert!(check_policy("long enough", "a@b.co").is_ok());
        assert!(check_policy(&"é".repeat(8), "a@b.co").is_ok());
    }
}
