//! Password hashing off the async runtime. Argon2id takes tens of milliseconds and its memory
//! cost per hash, so hashes run on the blocking pool, at most `concurrency` at a time.

use std::sync::Arc;

use anna_domain::password::{Argon2Cost, PasswordHasher};
use tokio::sync::Semaphore;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error(transparent)]
    Hash(#[from] anna_domain::password::PasswordError),
    #[error("the password hashing pool is gone: {0}")]
    Pool(String),
}

#[derive(Clone)]
pub struct Passwords {
    hasher: PasswordHasher,
    permits: Arc<Semaphore>,
}

impl Passwords {
    pub fn new(cost: Argon2Cost, concurrency: usize) -> Result<Self, PasswordError> {
        Ok(Self { hasher: PasswordHasher::new(cost)?, permits: Arc::new(Semaphore::new(concurrency.max(1))) })
    }

    /// Hashes a new password with the configured cost.
    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        let _permit = self.permits.acquire().await.map_err(|e| PasswordError::Pool(e.to_string()))?;
        let hasher = self.hasher.clone();
        Ok(tokio::task::spawn_blocking(move || hasher.hash(&password))
            .await
            .map_err(|e| PasswordError::Pool(e.to_string()))??)
    }

    /// Checks a password against a stored hash; with `None`, burns the same time on a dummy
    /// hash and answers false, so an unknown account takes as long as a wrong password.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, PasswordError> {
        let _permit = self.permits.acquire().await.map_err(|e| PasswordError::Pool(e.to_string()))?;
        let hasher = self.hasher.clone();
        tokio::task::spawn_blocking(move || match stored {
            Some(stored) => hasher.verify(&password, &stored),
            None => {
                hasher.verify_dummy(&password);
                false
            }
        })
        .await
        .map_err(|e| PasswordError::Pool(e.to_string()))
    }

    /// Whether a stored hash was made with another cost than the configured one.
    pub fn needs_rehash(&self, stored: &str) -> bool {
        self.hasher.needs_rehash(stored)
    }
}
