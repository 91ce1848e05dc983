//! Settings of the HTTP edge. The binary builds them from the environment and validates them;
//! the accounts' own settings (token lifetimes, Argon2 cost…) are `anna_usecases::AccountsConfig`.

use std::time::Duration;

use ipnet::IpNet;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub refresh_cookie_name: String,
    /// Adds `Secure` to the refresh cookie.
    pub cookie_secure: bool,
    pub rate_limit: RateLimitConfig,
    /// Names the rate-limit keys in Redis, so deployments sharing a server keep apart.
    pub rate_limit_key_prefix: String,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    pub max_body_bytes: usize,
    /// `MEDIA_MAX_UPLOAD_BYTES`: the largest file `POST /media` takes (its body may be larger
    /// by the multipart framing).
    pub media_max_upload_bytes: u64,
    /// `MEDIA_UPLOAD_CONCURRENCY`: uploads one API process receives at once (each is staged to
    /// a temporary file); more are answered 503 with `Retry-After`.
    pub media_upload_concurrency: usize,
    /// Resend-verification and password-reset answer no sooner than this, whether or not the
    /// e-mail exists, so their timing does not tell.
    pub uniform_response_time: Duration,
    /// How long an `Idempotency-Key` and its stored answer are kept.
    pub idempotency_key_ttl: Duration,
    /// Serve `/metrics` on the API port (when false it is served on its own port, or nowhere).
    pub metrics_on_api_port: bool,
    pub realtime: RealtimeConfig,
    /// Mount the simulator's routes (`SESSIONS_PROVIDER=simulator`).
    pub simulator: bool,
}

/// `WS_*`: the realtime feed.
#[derive(Debug, Clone)]
pub struct RealtimeConfig {
    /// `WS_ALLOWED_ORIGINS`: browser origins allowed to open `/ws/sessions` besides the API's
    /// own host. `*` allows any.
    pub allowed_origins: Vec<String>,
    /// `WS_TICKET_TTL_MS`: validity of a `POST /ws/ticket` ticket.
    pub ticket_ttl: Duration,
    /// `WS_REPLAY_EVENTS`: recent events kept for `?since=` replays.
    pub replay_events: usize,
    /// `WS_CLIENT_BUFFER`: events a socket may fall behind before it is dropped as too slow.
    pub client_buffer: usize,
    /// `EVENTS_STREAM`: the stream the feed tails.
    pub stream: String,
    /// `WS_REVOCATION_CHECK_MS`: how often an open socket checks that its user has not logged
    /// out everywhere or reset the password since it opened (it closes with 4001 then).
    pub revocation_check: Duration,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            ticket_ttl: Duration::from_secs(30),
            replay_events: 1000,
            client_buffer: 256,
            stream: "domain-events".into(),
            revocation_check: Duration::from_secs(30),
        }
    }
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
    /// Messages one session may send per minute (`SESSIONS_SEND_PER_MINUTE`), after a burst of
    /// `send_burst` (`SESSIONS_SEND_BURST`).
    pub send_per_minute: u32,
    pub send_burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            per_ip_per_minute: 20,
            per_account_per_minute: 5,
            emails_per_account_per_hour: 10,
            send_per_minute: 60,
            send_burst: 20,
        }
    }
}

impl ApiConfig {
    /// Development defaults, as the predecessor had them.
    pub fn development() -> Self {
        Self {
            refresh_cookie_name: "refresh_token".into(),
            cookie_secure: false,
            rate_limit: RateLimitConfig::default(),
            rate_limit_key_prefix: "anna:rate".into(),
            trusted_proxies: Vec::new(),
            max_body_bytes: 64 * 1024,
            media_max_upload_bytes: 25 * 1024 * 1024,
            media_upload_concurrency: 16,
            uniform_response_time: Duration::from_millis(250),
            idempotency_key_ttl: Duration::from_secs(24 * 3600),
            metrics_on_api_port: true,
            realtime: RealtimeConfig::default(),
            simulator: false,
        }
    }
}
