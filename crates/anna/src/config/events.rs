//! `REDIS_URL`, `EVENTS_*`, `OUTBOX_*`: the event backbone, with the predecessor's names and
//! defaults.

use secrecy::{ExposeSecret, SecretString};

use super::{ConfigError, Vars};

/// Where domain events flow.
#[derive(Debug, Clone)]
pub enum StreamBackend {
    /// Streams stored in the SQLite database (embedded shape).
    Embedded,
    /// Redis Streams (`REDIS_URL`, which may carry a password).
    Redis(SecretString),
}

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

pub(super) fn read<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<EventsConfig, ConfigError> {
    use anna_streams::backoff::Backoff;
    use anna_streams::consumer::ConsumerConfig;
    use anna_streams::relay::RelayConfig;

    let backend = match vars.secret("REDIS_URL") {
        None => StreamBackend::Embedded,
        Some(url) if ["redis://", "rediss://", "redis+unix://"].iter().any(|s| url.expose_secret().starts_with(s)) => {
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
    let host = vars.string("HOSTNAME", "anna");
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
        claim_pending_at_start: false,
    };
    Ok(EventsConfig {
        backend,
        relays: vars.positive("OUTBOX_RELAYS", 2, "a positive number of relay loops")?,
        readers: vars.positive("EVENTS_READERS", 4, "a positive number of stream readers")?,
        relay,
        consumer,
    })
}
