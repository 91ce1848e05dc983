//! Configuration from environment variables (and `.env`), with the predecessor's names and
//! defaults, one module per area. A value that cannot be used stops startup with a message
//! naming the variable and what it expects. Secrets (the JWT secret, the database, Redis and
//! SMTP URLs, the Resend key) are held as `SecretString`: never printed, `Debug` included.

mod accounts;
mod email;
mod events;
mod http;
mod media;
mod messages;
mod sessions;
mod vars;
mod webhooks;

use anna_api::config::ApiConfig;
use anna_usecases::AccountsConfig;
use secrecy::{ExposeSecret, SecretString};

pub use email::{EmailConfig, EmailProvider};
pub use events::{EventsConfig, StreamBackend};
pub use http::ServerConfig;
pub use sessions::{SessionsProvider, SessionsSettings};
pub use vars::Vars;
pub use webhooks::WebhooksSettings;

pub const DEFAULT_DATABASE_URL: &str = "sqlite:./data/anna.db";
const MIN_PRODUCTION_SECRET_BYTES: usize = 32;
/// 32 random bytes in hex carry 256 bits; a secret under half of that is no random secret.
const MIN_PRODUCTION_SECRET_BITS: f64 = 128.0;
/// OWASP's Argon2id minimums: 19 MiB × 2 passes, or the same product with at least 7 MiB.
const MIN_ARGON2_MEMORY_KIB: u32 = 7_168;
const MIN_ARGON2_MEMORY_PASSES_KIB: u64 = 36_864;

/// Shannon entropy of the secret's characters times its length: an upper bound on what a
/// guesser faces, low for repeated or patterned text whatever its length.
fn estimated_entropy_bits(secret: &str) -> f64 {
    let mut counts = std::collections::HashMap::<char, usize>::new();
    for c in secret.chars() {
        *counts.entry(c).or_default() += 1;
    }
    let len = secret.chars().count() as f64;
    let per_char: f64 = counts.values().map(|&n| n as f64 / len).map(|p| -p * p.log2()).sum();
    per_char * len
}

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

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `sqlite:…` or `postgres://user:password@…`.
    pub url: SecretString,
    pub max_connections: u32,
    /// `DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS` (Postgres).
    pub idle_in_transaction_timeout: std::time::Duration,
}

impl DatabaseConfig {
    /// The URL without its password, for messages.
    pub fn redacted_url(&self) -> String {
        anna_store::redact_url(self.url.expose_secret())
    }
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub log_level: String,
    pub log_pretty: bool,
    pub service_name: String,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: where spans are exported (OTLP/HTTP); unset: not exported.
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub environment: Environment,
    /// `ANNA_ALLOW_WEAK_SETTINGS`: production accepts a weak Argon2 cost or disabled rate limits
    /// (with a warning at start) instead of refusing to start.
    pub allow_weak_settings: bool,
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub telemetry: TelemetryConfig,
    pub api: ApiConfig,
    pub accounts: AccountsConfig,
    pub email: EmailConfig,
    pub events: EventsConfig,
    pub sessions: SessionsSettings,
    /// Upkeep of the message history (`MESSAGES_*`).
    pub messages: anna_workers::history::HistoryUpkeepConfig,
    pub webhooks: WebhooksSettings,
    /// Where media objects are kept (`MEDIA_*`, `S3_*`).
    pub media: anna_media::StorageSettings,
}

impl Config {
    /// Reads the process environment (after loading `.env` if present).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&Vars::new(|name: &str| std::env::var(name).ok()))
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
        let server = http::server(vars)?;
        let events = events::read(vars)?;
        let webhooks = webhooks::read(vars, &events.consumer)?;
        let config = Self {
            environment,
            allow_weak_settings: vars.boolean("ANNA_ALLOW_WEAK_SETTINGS", false)?,
            api: http::api(vars, &server)?,
            server,
            database: database(vars)?,
            telemetry: TelemetryConfig {
                log_level: vars.string("LOG_LEVEL", "info"),
                log_pretty: vars.boolean("LOG_PRETTY", false)?,
                service_name: vars.string("OTEL_SERVICE_NAME", "anna"),
                otlp_endpoint: vars.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            },
            accounts: accounts::read(vars)?,
            email: email::read(vars)?,
            events,
            sessions: sessions::read(vars)?,
            messages: messages::read(vars)?,
            webhooks,
            media: media::read(vars)?,
        };
        let mut config = config;
        config.api.simulator = config.sessions.provider == SessionsProvider::Simulator;
        if config.environment == Environment::Production {
            config.check_production()?;
        }
        Ok(config)
    }

    /// Settings production refuses unless `ANNA_ALLOW_WEAK_SETTINGS=true`: an Argon2 cost
    /// below OWASP's minimum for Argon2id, and disabled rate limits.
    pub fn weak_settings(&self) -> Vec<String> {
        let mut weak = Vec::new();
        let cost = self.accounts.argon2;
        if cost.memory_kib < MIN_ARGON2_MEMORY_KIB
            || u64::from(cost.memory_kib) * u64::from(cost.iterations) < MIN_ARGON2_MEMORY_PASSES_KIB
        {
            weak.push(format!(
                "AUTH_ARGON2_MEMORY_KIB={} with AUTH_ARGON2_ITERATIONS={} is below OWASP's minimum for Argon2id \
                 (19456 KiB with 2 passes, or as much memory × passes with at least 7168 KiB)",
                cost.memory_kib, cost.iterations
            ));
        }
        if !self.api.rate_limit.enabled {
            weak.push("RATE_LIMIT_ENABLED=false leaves login and the e-mail routes open to brute force".into());
        }
        weak
    }

    /// Whether the access-token secret is the public development default.
    pub fn uses_development_jwt_secret(&self) -> bool {
        self.accounts.jwt_secret.expose_secret() == AccountsConfig::DEVELOPMENT_JWT_SECRET
    }

    fn check_production(&self) -> Result<(), ConfigError> {
        if self.uses_development_jwt_secret() {
            return Err(ConfigError::Production("AUTH_JWT_SECRET is unset or the development default".into()));
        }
        if self.accounts.jwt_secret.expose_secret().len() < MIN_PRODUCTION_SECRET_BYTES {
            return Err(ConfigError::Production(format!(
                "AUTH_JWT_SECRET must be at least {MIN_PRODUCTION_SECRET_BYTES} bytes"
            )));
        }
        if estimated_entropy_bits(self.accounts.jwt_secret.expose_secret()) < MIN_PRODUCTION_SECRET_BITS {
            return Err(ConfigError::Production(format!(
                "AUTH_JWT_SECRET looks guessable (under {MIN_PRODUCTION_SECRET_BITS} bits by its character \
                 frequencies): use a random one, such as `openssl rand -hex 32`"
            )));
        }
        if !self.allow_weak_settings
            && let Some(weakness) = self.weak_settings().into_iter().next()
        {
            return Err(ConfigError::Production(format!(
                "{weakness} (set ANNA_ALLOW_WEAK_SETTINGS=true to accept it anyway)"
            )));
        }
        if let EmailProvider::Resend { api_key, .. } = &self.email.provider
            && api_key.expose_secret().len() < 8
        {
            return Err(ConfigError::Production("RESEND_API_KEY looks truncated".into()));
        }
        if !self.api.cookie_secure {
            return Err(ConfigError::Production("AUTH_COOKIE_SECURE must be true".into()));
        }
        if matches!(self.email.provider, EmailProvider::Console) {
            return Err(ConfigError::Production(
                "the console e-mail sender prints codes to stdout: set EMAIL_PROVIDER=smtp (SMTP_URL) or resend (RESEND_API_KEY, RESEND_FROM)".into(),
            ));
        }
        Ok(())
    }
}

fn database<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<DatabaseConfig, ConfigError> {
    let url = vars.secret("DATABASE_URL").unwrap_or_else(|| SecretString::from(DEFAULT_DATABASE_URL));
    let raw = url.expose_secret();
    if !(raw.starts_with("sqlite:") || raw.starts_with("postgres://") || raw.starts_with("postgresql://")) {
        return Err(ConfigError::Invalid {
            var: "DATABASE_URL",
            shown: format!("{:?}", anna_store::redact_url(raw)),
            expected: "sqlite:<path> or postgres://user:password@host:port/database",
        });
    }
    Ok(DatabaseConfig {
        url,
        max_connections: vars.positive("DATABASE_MAX_CONNECTIONS", 10, "a positive number of connections")?,
        idle_in_transaction_timeout: vars.millis("DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS", 15_000)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap};
    use std::time::Duration;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Config::from_vars(&Vars::new(move |k: &str| map.get(k).cloned()))
    }

    #[test]
    fn defaults_are_the_predecessors() {
        let c = config(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.server.port, 3000);
        assert_eq!(c.server.host.to_string(), "0.0.0.0");
        assert_eq!(c.database.url.expose_secret(), DEFAULT_DATABASE_URL);
        assert_eq!(c.accounts.access_token_ttl, Duration::from_secs(900));
        assert_eq!(c.accounts.refresh_token_ttl, Duration::from_secs(2_592_000));
        assert_eq!(c.api.refresh_cookie_name, "refresh_token");
        assert!(!c.api.cookie_secure);
        assert!(matches!(c.email.provider, EmailProvider::Console));
        assert!(c.api.metrics_on_api_port);
        assert!(c.uses_development_jwt_secret());
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
        let e = config(&[("AUTH_USER_CACHE_TTL_MS", "3600000")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("AUTH_USER_CACHE_TTL_MS") && e.contains("a minute"), "{e}");
        assert!(config(&[("AUTH_USER_CACHE_TTL_MS", "0")]).is_ok(), "0 turns the cache off");
        let e = config(&[("DATABASE_URL", "mysql://u:hunter2@h/d")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("DATABASE_URL") && !e.contains("hunter2"), "{e}");
        let e = config(&[("TRUSTED_PROXIES", "10.0.0.0/8, nope")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("TRUSTED_PROXIES"), "{e}");
    }

    #[test]
    fn production_refuses_weak_settings() {
        let strong = "4f0c2a9e81b7d35c6e2f90a1b8c7d4e3f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0".to_owned();
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
    fn production_refuses_guessable_secrets_weak_hashing_and_no_rate_limits() {
        let random = "4f0c2a9e81b7d35c6e2f90a1b8c7d4e3f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0";
        let base = [("ANNA_ENV", "production"), ("AUTH_COOKIE_SECURE", "true"), ("SMTP_URL", "smtp://localhost:25")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut pairs: Vec<(&str, &str)> = base.to_vec();
            pairs.extend_from_slice(extra);
            config(&pairs)
        };
        let refused = |extra: &[(&'static str, &'static str)], needle: &str| {
            let error = with(extra).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains(needle), "{extra:?}: {error}");
        };
        assert!(with(&[("AUTH_JWT_SECRET", random)]).is_ok());
        let repeated = "a".repeat(40).leak();
        refused(&[("AUTH_JWT_SECRET", repeated)], "guessable");
        refused(&[("AUTH_JWT_SECRET", "abcabcabcabcabcabcabcabcabcabcabcabc")], "guessable");
        refused(
            &[("AUTH_JWT_SECRET", random), ("AUTH_ARGON2_MEMORY_KIB", "8"), ("AUTH_ARGON2_ITERATIONS", "1")],
            "OWASP",
        );
        refused(
            &[("AUTH_JWT_SECRET", random), ("AUTH_ARGON2_MEMORY_KIB", "19456"), ("AUTH_ARGON2_ITERATIONS", "1")],
            "OWASP",
        );
        refused(&[("AUTH_JWT_SECRET", random), ("RATE_LIMIT_ENABLED", "false")], "RATE_LIMIT_ENABLED");
        assert!(
            with(&[("AUTH_JWT_SECRET", random), ("AUTH_ARGON2_MEMORY_KIB", "12288"), ("AUTH_ARGON2_ITERATIONS", "3")])
                .is_ok()
        );
        let overridden =
            with(&[("AUTH_JWT_SECRET", random), ("RATE_LIMIT_ENABLED", "false"), ("ANNA_ALLOW_WEAK_SETTINGS", "true")]);
        assert!(overridden.is_ok_and(|c| c.weak_settings().len() == 1), "accepted, and still reported");
        // The override never covers a guessable secret.
        refused(&[("AUTH_JWT_SECRET", repeated), ("ANNA_ALLOW_WEAK_SETTINGS", "true")], "guessable");
        // Development accepts all of it.
        assert!(config(&[("RATE_LIMIT_ENABLED", "false"), ("AUTH_ARGON2_MEMORY_KIB", "8")]).is_ok());
    }

    #[test]
    fn email_provider_selection() {
        assert!(matches!(
            config(&[("SMTP_URL", "smtp://h:25")]).map(|c| c.email.provider),
            Ok(EmailProvider::Smtp { .. })
        ));
        assert!(matches!(
            config(&[("RESEND_API_KEY", "re_test"), ("RESEND_FROM", "a@b.co")]).map(|c| c.email.provider),
            Ok(EmailProvider::Resend { .. })
        ));
        assert!(matches!(config(&[("EMAIL_PROVIDER", "resend")]), Err(ConfigError::Inconsistent(_))));
        assert!(matches!(config(&[("EMAIL_PROVIDER", "pigeon")]), Err(ConfigError::Invalid { .. })));
    }

    #[test]
    fn events_settings() {
        let c = config(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(c.events.backend, StreamBackend::Embedded));
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
        assert_eq!(c.server.metrics_port, Some(9100));
        assert!(!c.api.metrics_on_api_port);
    }

    #[test]
    fn secrets_never_print() {
        let c = config(&[
            ("AUTH_JWT_SECRET", "jwt-secret-value-jwt-secret-value"),
            ("DATABASE_URL", "postgres://anna:db-password-value@h/d"),
            ("REDIS_URL", "redis://:redis-password-value@127.0.0.1:6379"),
            ("SMTP_URL", "smtp://user:smtp-password-value@h:587"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let printed = format!("{c:?} {c:#?}");
        for secret in ["jwt-secret-value", "db-password-value", "redis-password-value", "smtp-password-value"] {
            assert!(!printed.contains(secret), "{secret} printed");
        }
        let c = config(&[("RESEND_API_KEY", "re_resend-key-value"), ("RESEND_FROM", "a@b.co")])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!format!("{c:?}").contains("resend-key-value"));
    }

    #[test]
    fn media_goes_to_a_directory_or_a_complete_bucket() {
        let local = config(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(&local.media.backend, anna_media::MediaBackend::Local { dir } if dir.ends_with("data/media")));
        let bucket = config(&[
            ("S3_BUCKET", "media"),
            ("S3_ACCESS_KEY", "key"),
            ("S3_SECRET_KEY", "s3-secret-value"),
            ("S3_ENDPOINT", "http://127.0.0.1:9000"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(&bucket.media.backend, anna_media::MediaBackend::S3(s3) if s3.bucket == "media" && s3.region == "us-east-1")
        );
        assert!(!format!("{bucket:?}").contains("s3-secret-value"), "the secret key printed");
        for incomplete in [
            &[("S3_BUCKET", "media")][..],
            &[("S3_BUCKET", "media"), ("S3_ACCESS_KEY", "key")][..],
            &[("S3_ENDPOINT", "http://127.0.0.1:9000")][..],
            &[("S3_BUCKET", "m"), ("S3_ACCESS_KEY", "k"), ("S3_SECRET_KEY", "s"), ("S3_ENDPOINT", "ftp://x")][..],
        ] {
            assert!(config(incomplete).is_err(), "{incomplete:?} was accepted");
        }
    }

    /// Every variable the code reads, in every branch: each e-mail provider, both stream
    /// backends, a separate metrics port, production.
    fn variables_read() -> BTreeSet<String> {
        let settings: &[&[(&str, &str)]] = &[
            &[],
            &[("SMTP_URL", "smtp://h:25")],
            &[("EMAIL_PROVIDER", "resend"), ("RESEND_API_KEY", "re_12345678"), ("RESEND_FROM", "a@b.co")],
            &[("DATABASE_URL", "postgres://u@h/d"), ("REDIS_URL", "redis://127.0.0.1:6379"), ("METRICS_PORT", "9100")],
            &[("S3_BUCKET", "media"), ("S3_ACCESS_KEY", "key"), ("S3_SECRET_KEY", "secret")],
            &[
                ("ANNA_ENV", "production"),
                ("AUTH_JWT_SECRET", "a-production-secret-of-enough-bytes"),
                ("AUTH_COOKIE_SECURE", "true"),
                ("SMTP_URL", "smtp://h:25"),
            ],
        ];
        let mut read = BTreeSet::new();
        for pairs in settings {
            let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
            let vars = Vars::new(move |k: &str| map.get(k).cloned());
            Config::from_vars(&vars).unwrap_or_else(|e| panic!("{pairs:?}: {e}"));
            read.extend(vars.names_read());
        }
        read
    }

    /// The variables named in the first column of docs/configuration.md's table.
    fn variables_documented() -> BTreeSet<String> {
        let readme = include_str!("../../../../docs/configuration.md");
        let table = readme
            .lines()
            .skip_while(|line| !line.starts_with("| Variable |"))
            .skip(2)
            .take_while(|line| line.starts_with('|'));
        let mut names = BTreeSet::new();
        for row in table {
            let first = row.split('|').nth(1).unwrap_or_default();
            for (i, part) in first.split('`').enumerate() {
                if i % 2 == 1 {
                    names.insert(part.to_owned());
                }
            }
        }
        names
    }

    #[test]
    fn the_configuration_doc_lists_exactly_the_variables_read() {
        let read = variables_read();
        let documented = variables_documented();
        let undocumented: Vec<_> = read.difference(&documented).collect();
        let unread: Vec<_> = documented.difference(&read).collect();
        assert!(undocumented.is_empty(), "read but not in docs/configuration.md: {undocumented:?}");
        assert!(unread.is_empty(), "in docs/configuration.md but never read: {unread:?}");
    }
}
