//! Shared state of the API: store, configuration, hashers, e-mail, limiters.

use std::sync::Arc;

use anna_domain::password::{PasswordError, PasswordHasher};
use anna_domain::secrets::{Sealer, SecretHasher};
use anna_domain::user::SecretPolicy;
use anna_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::tokens::JwtKeys;
use crate::config::ApiConfig;
use crate::error::ApiError;
use crate::rate_limit::RateLimiters;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Arc<dyn Store>,
    pub config: ApiConfig,
    pub passwords: PasswordHasher,
    pub secrets: SecretHasher,
    pub secret_policy: SecretPolicy,
    pub jwt: JwtKeys,
    /// Seals one-time secrets into domain events for the e-mail subscribers.
    pub sealer: Sealer,
    pub limiters: RateLimiters,
    pub hashing_permits: Semaphore,
    /// Work that outlives a request; drained on shutdown.
    pub background: TaskTracker,
    /// Cancelled when the process shuts down.
    pub shutdown: CancellationToken,
    pub metrics: Option<PrometheusHandle>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Password(#[from] PasswordError),
}

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        config: ApiConfig,
        metrics: Option<PrometheusHandle>,
        shutdown: CancellationToken,
    ) -> Result<Self, StateError> {
        let passwords = PasswordHasher::new(config.argon2)?;
        let secrets = SecretHasher::from_server_secret(config.jwt_secret.as_bytes());
        let sealer = Sealer::from_server_secret(config.jwt_secret.as_bytes());
        let secret_policy = SecretPolicy {
            verification_ttl: time_duration(config.verification_ttl),
            password_reset_ttl: time_duration(config.password_reset_ttl),
            max_attempts: i32::try_from(config.max_secret_attempts).unwrap_or(i32::MAX),
        };
        let jwt = JwtKeys::new(config.jwt_secret.as_bytes(), config.access_token_ttl);
        let limiters = RateLimiters::new(config.rate_limit);
        let hashing_permits = Semaphore::new(config.hashing_concurrency.max(1));
        Ok(Self(Arc::new(Inner {
            store,
            config,
            passwords,
            secrets,
            secret_policy,
            jwt,
            sealer,
            limiters,
            hashing_permits,
            background: TaskTracker::new(),
            shutdown,
            metrics,
        })))
    }

    /// Hashes a password on the blocking pool, at most `hashing_concurrency` at a time.
    pub async fn hash_password(&self, password: String) -> Result<String, ApiError> {
        let _permit = self.hashing_permits.acquire().await.map_err(ApiError::internal)?;
        let hasher = self.passwords.clone();
        tokio::task::spawn_blocking(move || hasher.hash(&password))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)
    }

    /// Verifies a password (or, for `None`, burns the same time on a dummy hash).
    pub async fn verify_password(&self, password: String, stored: Option<String>) -> Result<bool, ApiError> {
        let _permit = self.hashing_permits.acquire().await.map_err(ApiError::internal)?;
        let hasher = self.passwords.clone();
        tokio::task::spawn_blocking(move || match stored {
            Some(stored) => hasher.verify(&password, &stored),
            None => {
                hasher.verify_dummy(&password);
                false
            }
        })
        .await
        .map_err(ApiError::internal)
    }
}

pub fn time_duration(d: std::time::Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}
