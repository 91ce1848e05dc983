//! Configuration from environment variables (and `.env`), with the seed's names and defaults.
//!
//! A value that cannot be used stops startup with a message naming the variable and what it
//! expects. Secret values are never echoed back.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use anna_api::config::{ApiConfig, RateLimitConfig};
use anna_domain::password::Argon2Cost;
use ipnet::IpNet;

pub const DEFAULT_JWT_SECRET: &str = "dev-secret-change-me";
pub const DEFAULT_DATABASE_URL: &str = "sqlite:./data/anna.db";
/// Browsers refuse cookies with a Max-Age above 400 days.
const MAX_COOKIE_AGE: Duration = Duration::from_secs(400 * 24 * 3600);
const MIN_PRODUCTION_SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid {var}={shown}: expected {expected}")]
    Invalid { var: &'static str, shown: String, expected: &'static str },
    #[error("refused in production (ANNA_ENV=production): {0}")]
    Production(String),
    #[error("{0}")]
    Inconsistent(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmailProvider {
    /// The development mailbox: e-mails are printed to stdout.
    Console,
    Smtp {
        url: String,
        from: String,
    },
    Resend {
        api_key: String,
        from: String,
        base_url: String,
    },
}

/// Where domain events flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamBackend {
    /// Streams stored in the SQLite database (embedded shape).
    Embedded,
    /// Redis Streams (`REDIS_URL`).
    Redis(String),
}

/// The event backbone's settings (`EVENTS_*`, `OUTBOX_*`), with the seed's names and defaults.
#[derive(Debug, Clone)]
pub struct EventsConfig {
    pub backend: StreamBackend,
    /// `OUTBOX_RELAYS`: relay loops per process (Postgres; SQLite runs one).
    pub relays: usize,
    /// `EVENTS_READERS`: consumer-group readers per process, each its own consumer name.
    pub readers: usize,
    pub relay: anna_streams::relay::RelayConfig,
    pub consumer: anna_streams::consumer::ConsumerConfig,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub environment: Environment,
    pub host: IpAddr,
    pub port: u16,
    pub database_url: String,
    pub database_max_connections: u32,
    pub log_level: String,
    pub log_pretty: bool,
    pub service_name: String,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: where spans are exported (OTLP/HTTP); unset: not exported.
    pub otlp_endpoint: Option<String>,
    /// When set, `/metrics` is served on this port only (and not on the API port).
    pub metrics_port: Option<u16>,
    pub email: EmailProvider,
    pub shutdown_timeout: Duration,
    pub api: ApiConfig,
    pub events: EventsConfig,
}

/// Reads variables through a lookup function, so tests need not touch the process env.
pub struct Vars<F: Fn(&str) -> Option<String>>(pub F);

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    /// The value, or `None` when unset or blank.
    fn get(&self, var: &str) -> Option<String> {
        (self.0)(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.get(var).unwrap_or_else(|| default.to_owned())
    }

    fn parse<T: FromStr>(&self, var: &'static str, default: T, expected: &'static str) -> Result<T, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|_| ConfigError::Invalid { var, shown: format!("{raw:?}"), expected }),
        }
    }

    fn positive<T: FromStr + PartialOrd + Default>(
        &self,
        var: &'static str,
        default: T,
        expected: &'static str,
    ) -> Result<T, ConfigError> {
        let value = self.parse(var, default, expected)?;
        if value <= T::default() {
            return Err(ConfigError::Invalid {
                var,
                shown: format!("{:?}", self.get(var).unwrap_or_default()),
                expected,
            });
        }
        Ok(value)
    }

    /// A positive duration in milliseconds, at most ten years (so timestamp arithmetic never
    /// overflows).
    fn millis(&self, var: &'static str, default_ms: u64) -> Result<Duration, ConfigError> {
        const MAX_MS: u64 = 10 * 365 * 24 * 3_600_000;
        let expected = "a positive number of milliseconds (at most ten years)";
        let ms = self.positive(var, default_ms, expected)?;
        if ms > MAX_MS {
            return Err(ConfigError::Invalid { var, shown: ms.to_string(), expected });
        }
        Ok(Duration::from_millis(ms))
    }

    fn boolean(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "true" | "1" | "yes" | "on") => Ok(true),
            Some(v) if matches!(v.as_str(), "false" | "0" | "no" | "off") => Ok(false),
            Some(v) => Err(ConfigError::Invalid { var, shown: format!("{v:?}"), expected: "true or false" }),
        }
    }

    /// A secret: presence checked, value never shown in errors.
    fn secret(&self, var: &str) -> Option<String> {
        self.get(var)
    }
}

impl Config {
    /// Reads the process environment (after loading `.env` if present).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&Vars(|name: &str| std::env::var(name).ok()))
    }

    pub fn from_vars<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<Self, ConfigError> {
        let environment = match vars.string("ANNA_ENV", "development").to_ascii_lowercase().as_str() {
            "development" | "dev" => Environment::Development,
            "production" | "prod" => Environment::Production,
            other => {
                return Err(ConfigError::Invalid {
                    var: "ANNA_ENV",
                    shown: format!("{other:?}"),
                    expected: "development or production",
                });
            }
        };
        let dev = ApiConfig::development();
        let jwt_secret = vars.secret("AUTH_JWT_SECRET").unwrap_or_else(|| DEFAULT_JWT_SECRET.to_owned());
        let refresh_token_ttl = vars.millis("AUTH_REFRESH_TOKEN_TTL_MS", 2_592_000_000)?;
        if refresh_token_ttl > MAX_COOKIE_AGE {
            return Err(ConfigError::Invalid {
                var: "AUTH_REFRESH_TOKEN_TTL_MS",
                shown: format!("{}", refresh_token_ttl.as_millis()),
                expected: "at most 34560000000 (400 days, the longest cookie lifetime browsers accept)",
            });
        }
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
        let api = ApiConfig {
            jwt_secret,
            access_token_ttl: vars.millis("AUTH_ACCESS_TOKEN_TTL_MS", 900_000)?,
            refresh_token_ttl,
            refresh_cookie_name: vars.string("AUTH_REFRESH_COOKIE_NAME", &dev.refresh_cookie_name),
            cookie_secure: vars.boolean("AUTH_COOKIE_SECURE", false)?,
            refresh_reuse_grace: Duration::from_millis(vars.parse(
                "AUTH_REFRESH_REUSE_GRACE_MS",
                0,
                "a number of milliseconds (0 or more)",
            )?),
            verification_ttl: vars.millis("AUTH_VERIFICATION_TTL_MS", 3_600_000)?,
            password_reset_ttl: vars.millis("AUTH_PASSWORD_RESET_TTL_MS", 3_600_000)?,
            max_secret_attempts: vars.positive("AUTH_MAX_SECRET_ATTEMPTS", 5, "a positive whole number")?,
            app_base_url: vars.string("APP_BASE_URL", "http://localhost:3000").trim_end_matches('/').to_owned(),
            argon2: Argon2Cost {
                memory_kib: vars.positive(
                    "AUTH_ARGON2_MEMORY_KIB",
                    dev.argon2.memory_kib,
                    "a memory cost in KiB (8 or more)",
                )?,
                iterations: vars.positive(
                    "AUTH_ARGON2_ITERATIONS",
                    dev.argon2.iterations,
                    "a positive number of passes",
                )?,
                parallelism: vars.positive(
                    "AUTH_ARGON2_PARALLELISM",
                    dev.argon2.parallelism,
                    "a positive number of lanes",
                )?,
            },
            hashing_concurrency: vars.positive(
                "AUTH_HASH_CONCURRENCY",
                std::thread::available_parallelism().map_or(2, |n| n.get()),
                "a positive number of concurrent password hashes",
            )?,
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
            },
            trusted_proxies,
            max_body_bytes: vars.positive("HTTP_MAX_BODY_BYTES", dev.max_body_bytes, "a positive number of bytes")?,
            idempotency_key_ttl: vars.millis("IDEMPOTENCY_KEY_TTL_MS", 86_400_000)?,
            uniform_response_time: Duration::from_millis(vars.parse(
                "AUTH_UNIFORM_RESPONSE_MS",
                250,
                "a number of milliseconds (0 or more)",
            )?),
            metrics_on_api_port: true,
        };
        let metrics_port = match vars.get("METRICS_PORT") {
            None => None,
            Some(_) => Some(vars.parse("METRICS_PORT", 0u16, "a port number (0-65535; 0 picks a free one)")?),
        };
        let email = email_provider(vars)?;
        let mut config = Self {
            environment,
            host: vars.parse("HOST", IpAddr::from([0, 0, 0, 0]), "an IP address to listen on, such as 0.0.0.0")?,
            port: vars.parse("PORT", 3000, "a port number (0-65535)")?,
            database_url: vars.string("DATABASE_URL", DEFAULT_DATABASE_URL),
            database_max_connections: vars.positive(
                "DATABASE_MAX_CONNECTIONS",
                10,
                "a positive number of connections",
            )?,
            log_level: vars.string("LOG_LEVEL", "info"),
            log_pretty: vars.boolean("LOG_PRETTY", false)?,
            service_name: vars.string("OTEL_SERVICE_NAME", "anna"),
            otlp_endpoint: vars.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            metrics_port,
            email,
            shutdown_timeout: vars.millis("SHUTDOWN_TIMEOUT_MS", 20_000)?,
            api,
            events: events_config(vars)?,
        };
        config.api.metrics_on_api_port = config.metrics_port.is_none();
        if !(config.database_url.starts_with("sqlite:")
            || config.database_url.starts_with("postgres://")
            || config.database_url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid {
                var: "DATABASE_URL",
                shown: format!("{:?}", anna_store::redact_url(&config.database_url)),
                expected: "sqlite:<path> or postgres://user:password@host:port/database",
            });
        }
        if config.environment == Environment::Production {
            config.check_production()?;
        }
        Ok(config)
    }

    fn check_production(&self) -> Result<(), ConfigError> {
        if self.api.jwt_secret == DEFAULT_JWT_SECRET {
            return Err(ConfigError::Production("AUTH_JWT_SECRET is unset or the development default".into()));
        }
        if self.api.jwt_secret.len() < MIN_PRODUCTION_SECRET_BYTES {
            return Err(ConfigError::Production(format!(
                "AUTH_JWT_SECRET must be at least {MIN_PRODUCTION_SECRET_BYTES} bytes"
            )));
        }
        if let EmailProvider::Resend { api_key, .. } = &self.email
            && api_key.len() < 8
        {
            return Err(ConfigError::Production("RESEND_API_KEY looks truncated".into()));
        }
        if !self.api.cookie_secure {
            return Err(ConfigError::Production("AUTH_COOKIE_SECURE must be true".into()));
        }
        if self.email == EmailProvider::Console {
            return Err(ConfigError::Production(
                "the console e-mail sender prints codes to stdout: set EMAIL_PROVIDER=smtp (SMTP_URL) or resend (RESEND_API_KEY, RESEND_FROM)".into(),
            ));
        }
        Ok(())
    }
}

fn events_config<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<EventsConfig, ConfigError> {
    use anna_streams::backoff::Backoff;
    use anna_streams::consumer::ConsumerConfig;
    use anna_streams::relay::RelayConfig;

    let backend = match vars.secret("REDIS_URL") {
        None => StreamBackend::Embedded,
        Some(url)
            if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://") =>
        {
            StreamBackend::Redis(url)
        }
        Some(_) => {
            return Err(ConfigError::Invalid {
                var: "REDIS_URL",
                shown: "(hidden)".into(),
                expected: "redis://[user:password@]host:port[/db] or rediss://…",
            });
        }
    };
    let stream = vars.string("EVENTS_STREAM", "domain-events");
    let max_len = vars.parse("EVENTS_STREAM_MAX_LEN", 100_000u64, "a number of entries (0: no cap)")?;
    let stream_max_len = (max_len > 0).then_some(max_len);
    let relay = RelayConfig {
        stream: stream.clone(),
        batch_size: vars.positive("OUTBOX_BATCH_SIZE", 100, "a positive number of rows")?,
        idle_wait: vars.millis("OUTBOX_INTERVAL_MS", 1000)?,
        lease: vars.millis("OUTBOX_LEASE_MS", 30_000)?,
        max_attempts: vars.positive("OUTBOX_MAX_ATTEMPTS", 20, "a positive number of attempts")?,
        backoff: Backoff {
            base: vars.millis("OUTBOX_BACKOFF_MS", 1000)?,
            max: vars.millis("OUTBOX_BACKOFF_MAX_MS", 60_000)?,
        },
        stream_max_len,
        retention: vars.millis("OUTBOX_RETENTION_MS", 7 * 24 * 3_600_000)?,
    };
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "anna".into());
    let consumer = ConsumerConfig {
        stream,
        group: vars.string("EVENTS_GROUP", "domain-events-group"),
        consumer: vars.string("EVENTS_CONSUMER", &format!("consumer-{host}-{}", std::process::id())),
        dlq_stream: vars.string("EVENTS_DLQ_STREAM", "domain-events-dlq"),
        max_attempts: vars.positive("EVENTS_MAX_ATTEMPTS", 5, "a positive number of attempts")?,
        backoff: Backoff {
            base: vars.millis("EVENTS_BACKOFF_MS", 1000)?,
            max: vars.millis("EVENTS_BACKOFF_MAX_MS", 30_000)?,
        },
        claim_idle: vars.millis("EVENTS_CLAIM_IDLE_MS", 5000)?,
        claim_interval: vars.millis("EVENTS_CLAIM_INTERVAL_MS", 2000)?,
        batch_size: vars.positive("EVENTS_BATCH_SIZE", 50, "a positive number of entries")?,
        block: vars.millis("EVENTS_BLOCK_MS", 5000)?,
        concurrency: vars.positive("EVENTS_CONCURRENCY", 16, "a positive number of entries handled at once")?,
        applied_retention: vars.millis("EVENTS_PROCESSED_TTL_MS", 604_800_000)?,
    };
    Ok(EventsConfig {
        backend,
        relays: vars.positive("OUTBOX_RELAYS", 2, "a positive number of relay loops")?,
        readers: vars.positive("EVENTS_READERS", 4, "a positive number of stream readers")?,
        relay,
        consumer,
    })
}

fn email_provider<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<EmailProvider, ConfigError> {
    let smtp_url = vars.secret("SMTP_URL");
    let resend_key = vars.secret("RESEND_API_KEY");
    let default = if smtp_url.is_some() {
        "smtp"
    } else if resend_key.is_some() {
        "resend"
    } else {
        "console"
    };
    match vars.string("EMAIL_PROVIDER", default).to_ascii_lowercase().as_str() {
        "console" => Ok(EmailProvider::Console),
        "smtp" => {
            let url = smtp_url.ok_or_else(|| {
                ConfigError::Inconsistent("EMAIL_PROVIDER=smtp needs SMTP_URL (smtp://user:password@host:port)".into())
            })?;
            Ok(EmailProvider::Smtp { url, from: vars.string("SMTP_FROM", "anna <no-reply@localhost>") })
        }
        "resend" => {
            let api_key = resend_key
                .ok_or_else(|| ConfigError::Inconsistent("EMAIL_PROVIDER=resend needs RESEND_API_KEY".into()))?;
            let from = vars
                .get("RESEND_FROM")
                .ok_or_else(|| ConfigError::Inconsistent("EMAIL_PROVIDER=resend needs RESEND_FROM".into()))?;
            Ok(EmailProvider::Resend {
                api_key,
                from,
                base_url: vars.string("RESEND_BASE_URL", "https://api.resend.com"),
            })
        }
        other => Err(ConfigError::Invalid {
            var: "EMAIL_PROVIDER",
            shown: format!("{other:?}"),
            expected: "console, smtp or resend",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Config::from_vars(&Vars(move |k: &str| map.get(k).cloned()))
    }

    #[test]
    fn defaults_are_the_seeds() {
        let c = config(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.port, 3000);
        assert_eq!(c.host.to_string(), "0.0.0.0");
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        assert_eq!(c.api.access_token_ttl, Duration::from_secs(900));
        assert_eq!(c.api.refresh_token_ttl, Duration::from_secs(2_592_000));
        assert_eq!(c.api.refresh_cookie_name, "refresh_token");
        assert!(!c.api.cookie_secure);
        assert_eq!(c.email, EmailProvider::Console);
        assert!(c.api.metrics_on_api_port);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = config(&[("PORT", "abc")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("PORT") && e.contains("port number"), "{e}");
        let e = config(&[("AUTH_ACCESS_TOKEN_TTL_MS", "-5")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("AUTH_ACCESS_TOKEN_TTL_MS"), "{e}");
        let e = config(&[("LOG_PRETTY", "maybe")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("LOG_PRETTY") && e.contains("true or false"), "{e}");
        let e =
            config(&[("AUTH_REFRESH_TOKEN_TTL_MS", "99999999999")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("400 days"), "{e}");
        let e = config(&[("DATABASE_URL", "mysql://u:hunter2@h/d")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("DATABASE_URL") && !e.contains("hunter2"), "{e}");
        let e = config(&[("TRUSTED_PROXIES", "10.0.0.0/8, nope")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("TRUSTED_PROXIES"), "{e}");
    }

    #[test]
    fn production_refuses_weak_settings() {
        let strong = "x".repeat(40);
        let base = [("ANNA_ENV", "production"), ("AUTH_COOKIE_SECURE", "true"), ("SMTP_URL", "smtp://localhost:25")];
        let with = |extra: &[(&'static str, &'static str)], secret: Option<&str>| {
            let mut pairs: Vec<(&str, &str)> = base.to_vec();
            pairs.extend_from_slice(extra);
            if let Some(s) = secret {
                pairs.push(("AUTH_JWT_SECRET", s));
            }
            config(&pairs)
        };
        assert!(matches!(with(&[], None), Err(ConfigError::Production(_))));
        assert!(matches!(with(&[], Some("short-secret")), Err(ConfigError::Production(_))));
        assert!(matches!(with(&[("AUTH_COOKIE_SECURE", "false")], Some(&strong)), Err(ConfigError::Production(_))));
        assert!(matches!(with(&[("EMAIL_PROVIDER", "console")], Some(&strong)), Err(ConfigError::Production(_))));
        assert!(with(&[], Some(&strong)).is_ok());
    }

    #[test]
    fn email_provider_selection() {
        assert!(matches!(config(&[("SMTP_URL", "smtp://h:25")]).map(|c| c.email), Ok(EmailProvider::Smtp { .. })));
        assert!(matches!(
            config(&[("RESEND_API_KEY", "re_test"), ("RESEND_FROM", "a@b.co")]).map(|c| c.email),
            Ok(EmailProvider::Resend { .. })
        ));
        assert!(matches!(config(&[("EMAIL_PROVIDER", "resend")]), Err(ConfigError::Inconsistent(_))));
        assert!(matches!(config(&[("EMAIL_PROVIDER", "pigeon")]), Err(ConfigError::Invalid { .. })));
    }

    #[test]
    fn events_settings() {
        let c = config(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.events.backend, StreamBackend::Embedded);
        assert_eq!(c.events.consumer.group, "domain-events-group");
        assert_eq!(c.events.consumer.dlq_stream, "domain-events-dlq");
        assert_eq!(c.events.consumer.max_attempts, 5);
        assert_eq!(c.events.consumer.claim_idle, Duration::from_millis(5000));
        assert_eq!(c.events.relay.batch_size, 100);
        assert_eq!((c.events.relays, c.events.readers), (2, 4));
        assert!(c.events.consumer.consumer.starts_with("consumer-"));
        let c = config(&[("DATABASE_URL", "postgres://u@h/d"), ("REDIS_URL", "redis://127.0.0.1:6379")]);
        assert!(c.is_ok());
        let e = config(&[("REDIS_URL", "http://x")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("REDIS_URL") && !e.contains("http://x"), "{e}");
        let e = config(&[("EVENTS_MAX_ATTEMPTS", "0")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("EVENTS_MAX_ATTEMPTS"), "{e}");
    }

    #[test]
    fn metrics_port_moves_metrics_off_the_api_port() {
        let c = config(&[("METRICS_PORT", "9100")]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.metrics_port, Some(9100));
        assert!(!c.api.metrics_on_api_port);
    }
}
