//! Password policy and Argon2id hashing.

use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher as _, PasswordVerifier, Version};

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

#[derive(Clone)]
pub struct PasswordHasher {
    argon: Argon2<'static>,
    dummy_hash: String,
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHasher(..)")
    }
}

impl PasswordHasher {
    pub fn new(cost: Argon2Cost) -> Result<Self, PasswordError> {
        let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None)
            .map_err(|e| PasswordError::Params(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let dummy_hash = argon
            .hash_password(crate::secrets::random_token().as_bytes())
            .map_err(|e| PasswordError::Hash(e.to_string()))?
            .to_string();
        Ok(Self { argon, dummy_hash })
    }

    /// A PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) with a fresh random salt.
    pub fn hash(&self, password: &str) -> Result<String, PasswordError> {
        self.argon
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| PasswordError::Hash(e.to_string()))
    }

    /// Verifies against a stored PHC string, using the parameters recorded in it. A malformed
    /// stored hash never verifies.
    pub fn verify(&self, password: &str, stored_phc: &str) -> bool {
        match PasswordHash::new(stored_phc) {
            Ok(parsed) => self.argon.verify_password(password.as_bytes(), &parsed).is_ok(),
            Err(_) => false,
        }
    }

    /// Whether a stored hash was made with other parameters than new hashes get (an older cost,
    /// or the predecessor's): it should be replaced at the next successful login.
    pub fn needs_rehash(&self, stored_phc: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(stored_phc) else { return true };
        let params = self.argon.params();
        let expected = [("m", params.m_cost()), ("t", params.t_cost()), ("p", params.p_cost())];
        parsed.algorithm.as_str() != "argon2id"
            || parsed.version != Some(0x13)
            || expected.iter().any(|(name, value)| parsed.params.get_decimal(*name) != Some(*value))
    }

    /// Spends the same work as a real verification, for unknown accounts, so response time
    /// does not tell whether an e-mail is registered.
    pub fn verify_dummy(&self, password: &str) {
        let _ = self.verify(password, &self.dummy_hash);
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
    fn policy() {
        assert!(check_policy("short", "a@b.co").is_err());
        assert!(check_policy(&"x".repeat(129), "a@b.co").is_err());
        assert!(check_policy("a@b.co.uk", "a@b.co.uk").is_err());
        assert!(check_policy("long enough", "a@b.co").is_ok());
        assert!(check_policy(&"é".repeat(8), "a@b.co").is_ok());
    }
}
