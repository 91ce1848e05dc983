//! anna's application layer. Each use-case loads or locks its aggregate in a unit of work,
//! applies the domain rule, appends the resulting events (stamped with the current trace) and
//! commits. HTTP handlers, workers and CLI commands call the same use-cases; none of them
//! opens a unit of work itself.
//!
//! - [`Accounts`]: registration, e-mail verification, login, refresh-token rotation, logout,
//!   password reset (`users.rs`, `auth.rs`).
//! - [`Passwords`]: Argon2id hashing off the async runtime, with a bound on concurrent hashes.
//! - [`AccessTokens`]: signing and checking the short-lived JWT access tokens.
//!
//! Errors are typed per use-case; the HTTP edge maps them to statuses in one place.

/// A database error is a `Failed` use-case error: lets `?` work on store calls.
macro_rules! store_failures {
    ($($error:ty),*) => {$(
        impl From<anna_store::StoreError> for $error {
            fn from(error: anna_store::StoreError) -> Self {
                Self::Failed(error.into())
            }
        }
    )*};
}
pub(crate) use store_failures;

mod auth;
pub mod media;
mod passwords;
pub mod sessions;
mod tokens;
mod user_cache;
mod users;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use anna_domain::password::Argon2Cost;
use anna_domain::secrets::{Sealer, SecretHasher};
use anna_domain::user::SecretPolicy;
use anna_domain::{DomainEvent, User};
use anna_store::{Store, StoreError};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

pub use auth::{LoginError, PasswordResetError, RefreshError};
pub use media::{Media, MediaUseError, MediaView, Upload};
pub use passwords::{PasswordError, Passwords};
pub use sessions::{Enqueued, MediaSource, MediaToSend, SendRequest, SessionError, Sessions, SessionsConfig};
pub use tokens::{AccessClaims, AccessTokens, Authenticated, TokenError};

pub use users::{CurrentUserError, RegisterError, VerifyEmailError};
pub use webhooks::{EndpointRequest, WebhookError, Webhooks, WebhooksConfig};

/// Settings of the accounts context (`AUTH_*`).
#[derive(Debug, Clone)]
pub struct AccountsConfig {
    /// HS256 key of access tokens, and the root of the keys that hash verification codes and
    /// reset tokens and seal them into events.
    pub jwt_secret: SecretString,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    /// A refresh token presented again within this window after its rotation is refused but
    /// does not revoke its family (two tabs refreshing at once). Zero: every reuse revokes.
    pub refresh_reuse_grace: Duration,
    pub verification_ttl: Duration,
    pub password_reset_ttl: Duration,
    /// Wrong verification codes or reset tokens accepted before the secret is void.
    pub max_secret_attempts: u32,
    pub argon2: Argon2Cost,
    /// Password hashes computed at once; more wait. Keeps login floods from starving the
    /// runtime and bounds the memory Argon2 takes.
    pub hashing_concurrency: usize,
    /// How long a user loaded to authenticate a request serves later requests of this
    /// process (`AUTH_USER_CACHE_TTL_MS`; zero: every request asks the database), and how many
    /// users are kept (`AUTH_USER_CACHE_MAX`). See `user_cache.rs`.
    pub user_cache_ttl: Duration,
    pub user_cache_max: usize,
}

impl AccountsConfig {
    /// The development secret, as the predecessor had it (refused in production).
    pub const DEVELOPMENT_JWT_SECRET: &'static str = "dev-secret-change-me";

    /// Development defaults, as the predecessor had them.
    pub fn development() -> Self {
        Self {
            jwt_secret: SecretString::from(Self::DEVELOPMENT_JWT_SECRET),
            access_token_ttl: Duration::from_secs(900),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            refresh_reuse_grace: Duration::ZERO,
            verification_ttl: Duration::from_secs(3600),
            password_reset_ttl: Duration::from_secs(3600),
            max_secret_attempts: 5,
            argon2: Argon2Cost::default(),
            hashing_concurrency: 2,
            user_cache_ttl: Duration::from_secs(1),
            user_cache_max: 10_000,
        }
    }
}

/// What a client gets when it logs in, verifies its e-mail or rotates its refresh token.
pub struct LoginGrant {
    pub access_token: String,
    pub access_token_expires_in: u64,
    /// The refresh token itself (only its hash is stored); the HTTP edge puts it in a cookie.
    pub refresh_token: String,
    pub refresh_token_ttl: Duration,
}

impl std::fmt::Debug for LoginGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginGrant")
            .field("access_token_expires_in", &self.access_token_expires_in)
            .finish_non_exhaustive()
    }
}

/// Where a request came from, kept on the refresh token it creates.
#[derive(Debug, Clone, Default)]
pub struct ClientMeta {
    pub user_agent: Option<String>,
    pub ip: Option<String>,
}

/// A fault no caller can correct: the database, the hashing pool, token signing.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Stream(#[from] anna_streams::StreamError),
}

/// The caller of an authenticated request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: Uuid,
    /// When the access token expires (Unix seconds): long-lived connections end then.
    pub expires_at: i64,
    /// `None` when no such user exists (a signed token for a user that is gone).
    pub user: Option<User>,
}

/// Users and authentication: the use-cases of the accounts context.
pub struct Accounts {
    store: Arc<dyn Store>,
    passwords: Passwords,
    tokens: AccessTokens,
    secrets: SecretHasher,
    sealer: Sealer,
    policy: SecretPolicy,
    refresh_token_ttl: Duration,
    refresh_reuse_grace: Duration,
    users: user_cache::UserCache,
}

impl Accounts {
    pub fn new(store: Arc<dyn Store>, config: &AccountsConfig) -> Result<Self, PasswordError> {
        let secret = config.jwt_secret.expose_secret().as_bytes();
        Ok(Self {
            store,
            passwords: Passwords::new(config.argon2, config.hashing_concurrency)?,
            tokens: AccessTokens::new(secret, config.access_token_ttl),
            secrets: SecretHasher::from_server_secret(secret),
            sealer: Sealer::from_server_secret(secret),
            policy: SecretPolicy {
                verification_ttl: time_duration(config.verification_ttl),
                password_reset_ttl: time_duration(config.password_reset_ttl),
                max_attempts: i32::try_from(config.max_secret_attempts).unwrap_or(i32::MAX),
            },
            refresh_token_ttl: config.refresh_token_ttl,
            refresh_reuse_grace: config.refresh_reuse_grace,
            users: user_cache::UserCache::new(config.user_cache_ttl, config.user_cache_max),
        })
    }

    /// Checks an access token: `None` when it is not a valid, unexpired access token, or when
    /// its user no longer accepts it (not active, or logged out everywhere or reset the
    /// password since it was issued). The user is loaded for the check and handed over.
    pub async fn authenticate(&self, access_token: &str) -> Result<Option<Caller>, Failure> {
        let Some(token) = self.tokens.verify(access_token) else { return Ok(None) };
        // A user loaded recently accepts the token without a round trip; one that would refuse
        // it (or none) is read again: it may have logged in anew in another process since.
        if let Some(user) = self.users.get(token.user_id)
            && user.accepts_access_token(token.token_generation)
        {
            metrics::counter!("auth_user_cache_hits_total").increment(1);
            return Ok(Some(Caller { user_id: token.user_id, expires_at: token.expires_at, user: Some(user) }));
        }
        metrics::counter!("auth_user_cache_misses_total").increment(1);
        let ticket = self.users.ticket(token.user_id);
        let user = self.store.find_user_by_id(token.user_id).await?;
        if let Some(user) = &user {
            self.users.put(user, ticket);
        }
        if let Some(user) = &user
            && !user.accepts_access_token(token.token_generation)
        {
            return Ok(None);
        }
        Ok(Some(Caller { user_id: token.user_id, expires_at: token.expires_at, user }))
    }

    /// Whether credentials issued under `generation` still hold for the user (long-lived
    /// connections and WebSocket tickets ask; see [`Accounts::authenticate`]).
    pub async fn accepts_token_generation(&self, user_id: Uuid, generation: i64) -> Result<bool, Failure> {
        let user = self.store.find_user_by_id(user_id).await?;
        Ok(user.is_none_or(|user| user.accepts_access_token(generation)))
    }

    /// A keyed hash for `purpose`, for callers that must store a fingerprint of something
    /// secret (the `Idempotency-Key` request fingerprint, which may contain a password).
    pub fn keyed_hash(&self, purpose: &str, owner: &str, value: &str) -> String {
        self.secrets.hash(purpose, owner, value)
    }

    /// Deletes refresh tokens that expired before `now`. Returns how many.
    pub async fn purge_expired_refresh_tokens(&self, now: time::OffsetDateTime) -> Result<u64, Failure> {
        Ok(self.store.purge_expired_refresh_tokens(now).await?)
    }
}

/// Stamps events with the current trace, so the relay and the consumers continue it.
pub fn traced(events: impl IntoIterator<Item = DomainEvent>) -> Vec<DomainEvent> {
    let traceparent = anna_streams::trace::current_traceparent();
    events.into_iter().map(|event| event.with_traceparent(traceparent.clone())).collect()
}

pub fn time_duration(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}
