//! The HTTP edge: listen address, cookies, limits, proxies, shutdown.

use std::net::IpAddr;
use std::time::Duration;

use anna_api::config::{ApiConfig, RateLimitConfig};
use ipnet::IpNet;

use super::{ConfigError, Vars};

/// Where the process listens and how long it drains.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: IpAddr,
    pub port: u16,
    /// When set, `/metrics` is served on this port only (and not on the API port).
    pub metrics_port: Option<u16>,
    /// How long shutdown waits for in-flight work.
    pub shutdown_timeout: Duration,
    /// `HTTP_HEADER_READ_TIMEOUT_MS`, `HTTP_BODY_READ_TIMEOUT_MS`, `HTTP_MAX_CONNECTIONS`.
    pub limits: crate::server::ConnectionLimits,
}

pub(super) fn server<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<ServerConfig, ConfigError> {
    let metrics_port = match vars.get("METRICS_PORT") {
        None => None,
        Some(_) => Some(vars.parse("METRICS_PORT", 0u16, "a port number (0-65535; 0 picks a free one)")?),
    };
    Ok(ServerConfig {
        host: vars.parse("HOST", IpAddr::from([0, 0, 0, 0]), "an IP address to listen on, such as 0.0.0.0")?,
        port: vars.parse("PORT", 3000, "a port number (0-65535)")?,
        metrics_port,
        shutdown_timeout: vars.millis("SHUTDOWN_TIMEOUT_MS", 20_000)?,
        limits: crate::server::ConnectionLimits {
            header_read_timeout: vars.millis("HTTP_HEADER_READ_TIMEOUT_MS", 10_000)?,
            body_read_timeout: vars.millis("HTTP_BODY_READ_TIMEOUT_MS", 30_000)?,
            upload_read_timeout: vars.millis("MEDIA_UPLOAD_TIMEOUT_MS", 300_000)?,
            max_connections: vars.positive("HTTP_MAX_CONNECTIONS", 4096, "a positive number of connections")?,
        },
    })
}

pub(super) fn api<F: Fn(&str) -> Option<String>>(
    vars: &Vars<F>,
    server: &ServerConfig,
) -> Result<ApiConfig, ConfigError> {
    let dev = ApiConfig::development();
    let trusted_proxies = match vars.get("TRUSTED_PROXIES") {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<IpNet>().or_else(|_| s.parse::<IpAddr>().map(IpNet::from)))
            .collect::<Result<_, _>>()
            .map_err(|_| ConfigError::Invalid {
                var: "TRUSTED_PROXIES",
                shown: format!("{list:?}"),
                expected: "a comma-separated list of IP addresses or CIDR ranges",
            })?,
    };
    Ok(ApiConfig {
        refresh_cookie_name: vars.string("AUTH_REFRESH_COOKIE_NAME", &dev.refresh_cookie_name),
        cookie_secure: vars.boolean("AUTH_COOKIE_SECURE", false)?,
        rate_limit: RateLimitConfig {
            enabled: vars.boolean("RATE_LIMIT_ENABLED", true)?,
            per_ip_per_minute: vars.positive(
                "RATE_LIMIT_PER_IP_PER_MINUTE",
                20,
                "a positive number of requests per minute",
            )?,
            per_account_per_minute: vars.positive(
                "RATE_LIMIT_PER_ACCOUNT_PER_MINUTE",
                5,
                "a positive number of requests per minute",
            )?,
            emails_per_account_per_hour: vars.positive(
                "RATE_LIMIT_EMAILS_PER_ACCOUNT_PER_HOUR",
                10,
                "a positive number of e-mails per hour",
            )?,
            send_per_minute: vars.positive("SESSIONS_SEND_PER_MINUTE", 60, "a positive number of messages")?,
            send_burst: vars.positive("SESSIONS_SEND_BURST", 20, "a positive number of messages")?,
        },
        rate_limit_key_prefix: vars.string("RATE_LIMIT_KEY_PREFIX", &dev.rate_limit_key_prefix),
        trusted_proxies,
        max_body_bytes: vars.positive("HTTP_MAX_BODY_BYTES", dev.max_body_bytes, "a positive number of bytes")?,
        media_max_upload_bytes: vars.positive(
            "MEDIA_MAX_UPLOAD_BYTES",
            super::media::DEFAULT_MAX_UPLOAD_BYTES,
            "a positive number of bytes",
        )?,
        media_upload_concurrency: vars.positive(
            "MEDIA_UPLOAD_CONCURRENCY",
            dev.media_upload_concurrency,
            "a positive number of uploads",
        )?,
        uniform_response_time: vars.millis_or_zero("AUTH_UNIFORM_RESPONSE_MS", 250)?,
        idempotency_key_ttl: vars.millis("IDEMPOTENCY_KEY_TTL_MS", 86_400_000)?,
        metrics_on_api_port: server.metrics_port.is_none(),
        realtime: anna_api::config::RealtimeConfig {
            allowed_origins: vars
                .string("WS_ALLOWED_ORIGINS", "")
                .split(',')
                .map(|origin| origin.trim().trim_end_matches('/').to_owned())
                .filter(|origin| !origin.is_empty())
                .collect(),
            ticket_ttl: vars.millis("WS_TICKET_TTL_MS", 30_000)?,
            replay_events: vars.parse("WS_REPLAY_EVENTS", 1000, "a number of events")?,
            client_buffer: vars.positive("WS_CLIENT_BUFFER", 256, "a positive number of events")?,
            stream: vars.string("EVENTS_STREAM", "domain-events"),
            revocation_check: vars.millis("WS_REVOCATION_CHECK_MS", 30_000)?,
        },
        // Set from SESSIONS_PROVIDER once the sessions settings are read.
        simulator: false,
    })
}
