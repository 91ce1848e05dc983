//! Settings the API needs. The binary builds them from the environment and validates them.

use std::time::Duration;

use anna_domain::password::Argon2Cost;
use ipnet::IpNet;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// HS256 key for access tokens (also the root of the secret-hashing key).
    pub jwt_secret: String,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    pub refresh_cookie_name: String,
    pub cookie_secure: bool,
    /// A refresh token presented again within this window after its rotation is refused with
    /// 401 but does not revoke its family (two tabs refreshing at once). Zero: every reuse
    /// revokes the family.
    pub refresh_reuse_grace: Duration,
    pub verification_ttl: Duration,
    pub password_reset_ttl: Duration,
    /// Wrong verification codes or reset tokens accepted before the secret is void.
    pub max_secret_attempts: u32,
    /// Base of the links in e-mails.
    pub app_base_url: String,
    pub argon2: Argon2Cost,
    /// Password hashes computed at once; more wait. Keeps login floods from starving the runtime.
    pub hashing_concurrency: usize,
    pub rate_limit: RateLimitConfig,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    pub max_body_bytes: usize,
    /// Resend-verification and password-reset answer no sooner than this, whether or not the
    /// e-mail exists, so their timing does not tell.
    pub uniform_response_time: Duration,
    /// How long an `Idempotency-Key` and its stored answer are kept.
    pub idempotency_key_ttl: Duration,
    /// Serve `/metrics` on the API port (when false it is served on its own port, or nowhere).
    pub metrics_on_api_port: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct RateLimitConfig {
    pub enabled: bool,
    /// Requests per minute to one limited route from one client IP.
    pub per_ip_per_minute: u32,
    /// Requests per minute to one limited route about one account (e-mail or user id).
    pub per_account_per_minute: u32,
    /// Requests per hour that send an e-mail (resend verification, password reset) about one
    /// account: keeps the routes from being used to flood someone's mailbox.
    pub emails_per_account_per_hour: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self { enabled: true, per_ip_per_minute: 20, per_account_per_minute: 5, emails_per_account_per_hour: 10 }
    }
}

impl ApiConfig {
    /// Development defaults, as the seed had them (the binary refuses the secret in production).
    pub fn development() -> Self {
        Self {
            jwt_secret: "dev-secret-change-me".into(),
            access_token_ttl: Duration::from_secs(900),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            refresh_cookie_name: "refresh_token".into(),
            cookie_secure: false,
            refresh_reuse_grace: Duration::ZERO,
            verification_ttl: Duration::from_secs(3600),
            password_reset_ttl: Duration::from_secs(3600),
            max_secret_attempts: 5,
            app_base_url: "http://localhost:3000".into(),
            argon2: Argon2Cost::default(),
            hashing_concurrency: 2,
            rate_limit: RateLimitConfig::default(),
            trusted_proxies: Vec::new(),
            max_body_bytes: 64 * 1024,
            uniform_response_time: Duration::from_millis(250),
            idempotency_key_ttl: Duration::from_secs(24 * 3600),
            metrics_on_api_port: true,
        }
    }
}
