//! `WEBHOOKS_*`: tenants' webhook endpoints and their delivery — the address policy, timeouts,
//! retries, the deadline, the circuit breaker and the dispatcher's concurrency.

use anna_store::webhooks::CircuitRules;
use anna_streams::backoff::Backoff;
use anna_streams::consumer::ConsumerConfig;
use anna_usecases::WebhooksConfig;
use anna_workers::webhooks::{DispatcherConfig, HttpSettings};

use super::{ConfigError, Vars};

#[derive(Debug, Clone)]
pub struct WebhooksSettings {
    pub webhooks: WebhooksConfig,
    pub dispatcher: DispatcherConfig,
    /// The fan-out's consumer of the domain-event stream: the events consumer's settings with
    /// a group and consumer name of its own.
    pub consumer: ConsumerConfig,
}

pub(super) fn read<F: Fn(&str) -> Option<String>>(
    vars: &Vars<F>,
    events: &ConsumerConfig,
) -> Result<WebhooksSettings, ConfigError> {
    let allow_private = vars.boolean("WEBHOOKS_ALLOW_PRIVATE", false)?;
    let deadline = vars.millis("WEBHOOKS_DEADLINE_MS", 24 * 3_600_000)?;
    let threshold: u32 =
        vars.parse("WEBHOOKS_CIRCUIT_FAILURES", 5, "a number of consecutive failures (0: never open)")?;
    let webhooks = WebhooksConfig {
        allow_private,
        max_per_tenant: vars.parse("WEBHOOKS_MAX_PER_TENANT", 20, "a number of endpoints (0: no limit)")?,
        secret_grace: vars.millis_or_zero("WEBHOOKS_SECRET_GRACE_MS", 24 * 3_600_000)?,
        deadline,
        circuit_threshold: threshold,
    };
    let dispatcher = DispatcherConfig {
        http: HttpSettings {
            allow_private,
            connect_timeout: vars.millis("WEBHOOKS_CONNECT_TIMEOUT_MS", 5000)?,
            timeout: vars.millis("WEBHOOKS_TIMEOUT_MS", 15_000)?,
            response_max_bytes: vars.parse("WEBHOOKS_RESPONSE_MAX_BYTES", 4096, "a number of bytes")?,
        },
        concurrency: vars.positive("WEBHOOKS_CONCURRENCY", 64, "a positive number of attempts")?,
        endpoint_concurrency: vars.positive("WEBHOOKS_ENDPOINT_CONCURRENCY", 8, "a positive number of attempts")?,
        batch_size: vars.positive("WEBHOOKS_BATCH_SIZE", 64, "a positive number of deliveries")?,
        poll: vars.millis("WEBHOOKS_POLL_MS", 500)?,
        backoff: Backoff {
            base: vars.millis("WEBHOOKS_RETRY_BASE_MS", 5000)?,
            max: vars.millis("WEBHOOKS_RETRY_MAX_MS", 3_600_000)?,
        },
        max_attempts: vars.parse("WEBHOOKS_MAX_ATTEMPTS", 25, "a number of attempts (0: until the deadline)")?,
        circuit: CircuitRules {
            threshold,
            open: vars.millis("WEBHOOKS_CIRCUIT_OPEN_MS", 30_000)?,
            open_max: vars.millis("WEBHOOKS_CIRCUIT_OPEN_MAX_MS", 600_000)?,
        },
        retention: vars.millis("WEBHOOKS_RETENTION_MS", 7 * 24 * 3_600_000)?,
    };
    let host = vars.string("HOSTNAME", "anna");
    let consumer = ConsumerConfig {
        group: vars.string("WEBHOOKS_GROUP", "webhooks-group"),
        consumer: vars.string("WEBHOOKS_CONSUMER", &format!("webhooks-{host}-{}", std::process::id())),
        ..events.clone()
    };
    Ok(WebhooksSettings { webhooks, dispatcher, consumer })
}
