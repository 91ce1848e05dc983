//! `SESSIONS_*`: WhatsApp sessions — the driver, the command streams, per-tenant limits, the
//! reconnect policy and the simulator's timings.

use anna_streams::backoff::Backoff;
use anna_streams::consumer::ConsumerConfig;
use anna_usecases::SessionsConfig;
use anna_whatsapp::simulator::SimulatorConfig;
use anna_whatsapp::whatsapp::WhatsAppConfig;
use anna_workers::fleet::FleetConfig;
use anna_workers::sessions::SessionsWorkerConfig;

use super::{ConfigError, Vars};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionsProvider {
    /// The real WhatsApp client.
    WhatsApp,
    /// The in-process fake network (`SESSIONS_PROVIDER=simulator`).
    Simulator,
}

#[derive(Debug, Clone)]
pub struct SessionsSettings {
    pub provider: SessionsProvider,
    pub sessions: SessionsConfig,
    pub worker: SessionsWorkerConfig,
    /// The consumer of the command streams; `stream` is set per partition.
    pub consumer: ConsumerConfig,
    pub whatsapp: WhatsAppConfig,
    pub simulator: SimulatorConfig,
    pub fleet: FleetConfig,
}

pub(super) fn read<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<SessionsSettings, ConfigError> {
    let provider = match vars.string("SESSIONS_PROVIDER", "whatsapp").to_ascii_lowercase().as_str() {
        "whatsapp" | "baileys" => SessionsProvider::WhatsApp,
        "simulator" => SessionsProvider::Simulator,
        other => {
            return Err(ConfigError::Invalid {
                var: "SESSIONS_PROVIDER",
                shown: format!("{other:?}"),
                expected: "whatsapp or simulator",
            });
        }
    };
    let qr_ttl = vars.millis("SESSIONS_QR_TTL_MS", 60_000)?;
    let sessions = SessionsConfig {
        command_stream: vars.string("SESSIONS_COMMAND_STREAM", "session-commands"),
        partitions: vars.positive("SESSIONS_PARTITIONS", 64, "a positive number of partitions")?,
        max_per_tenant: vars.parse("SESSIONS_MAX_PER_TENANT", 10, "a number of sessions (0: no limit)")?,
        max_text_chars: vars.positive("SESSIONS_MAX_TEXT_CHARS", 4096, "a positive number of characters")?,
        // Set from `MESSAGES_RETENTION_DAYS` where the use-cases are built.
        default_retention_days: 0,
    };
    let worker = SessionsWorkerConfig {
        reconnect_backoff: Backoff {
            base: vars.millis("SESSIONS_RECONNECT_BACKOFF_MS", 2000)?,
            max: vars.millis("SESSIONS_RECONNECT_BACKOFF_MAX_MS", 300_000)?,
        },
        reconnect_max_attempts: vars.positive("SESSIONS_RECONNECT_MAX_ATTEMPTS", 10, "a positive number")?,
        resume_stagger: vars.millis_or_zero("SESSIONS_RESUME_STAGGER_MS", 100)?,
        qr_ttl,
        event_buffer: 256,
        send_wait: vars.millis("SESSIONS_SEND_WAIT_MS", 15_000)?,
        media_send_max_bytes: vars.positive(
            "MEDIA_MAX_UPLOAD_BYTES",
            super::media::DEFAULT_MAX_UPLOAD_BYTES,
            "a positive number of bytes",
        )?,
        media_download_max_bytes: vars.positive(
            "MEDIA_DOWNLOAD_MAX_BYTES",
            100 * 1024 * 1024,
            "a positive number of bytes",
        )?,
        media_download_concurrency: vars.positive("MEDIA_DOWNLOAD_CONCURRENCY", 4, "a positive number of downloads")?,
        media_download_timeout: vars.millis("MEDIA_DOWNLOAD_TIMEOUT_MS", 300_000)?,
        media_send_timeout: vars.millis("MEDIA_SEND_TIMEOUT_MS", 120_000)?,
        media_send_concurrency: vars.positive("MEDIA_SEND_CONCURRENCY", 4, "a positive number of files")?,
        media_fetch: anna_workers::media_fetch::FetchSettings {
            allow_private: vars.boolean("MEDIA_FETCH_ALLOW_PRIVATE", false)?,
            connect_timeout: std::time::Duration::from_secs(5),
            timeout: vars.millis("MEDIA_FETCH_TIMEOUT_MS", 30_000)?,
        },
        raw_max_bytes: vars.parse(
            "MESSAGES_RAW_MAX_BYTES",
            64 * 1024,
            "a number of bytes (0: keep no raw messages)",
        )?,
    };
    let host = vars.string("HOSTNAME", "anna");
    let failover = vars.millis("SESSIONS_FAILOVER_MS", 15_000)?;
    if failover < std::time::Duration::from_millis(300) {
        return Err(ConfigError::Invalid {
            var: "SESSIONS_FAILOVER_MS",
            shown: failover.as_millis().to_string(),
            expected: "at least 300 milliseconds",
        });
    }
    let fleet = FleetConfig {
        worker_id: vars.string("SESSIONS_WORKER_ID", &format!("{host}-{}-{:04x}", std::process::id(), rand_suffix())),
        host: host.clone(),
        partitions: sessions.partitions,
        failover,
    };
    let consumer = ConsumerConfig {
        stream: sessions.command_stream.clone(),
        group: vars.string("SESSIONS_COMMAND_GROUP", "session-commands-group"),
        consumer: vars.string("SESSIONS_COMMAND_CONSUMER", &format!("sessions-{host}-{}", std::process::id())),
        dlq_stream: vars.string("SESSIONS_COMMAND_DLQ_STREAM", "session-commands-dlq"),
        max_attempts: vars.positive("SESSIONS_COMMAND_MAX_ATTEMPTS", 5, "a positive number of attempts")?,
        backoff: Backoff {
            base: vars.millis("SESSIONS_COMMAND_BACKOFF_MS", 1000)?,
            max: vars.millis("SESSIONS_COMMAND_BACKOFF_MAX_MS", 30_000)?,
        },
        claim_idle: vars.millis("SESSIONS_COMMAND_CLAIM_IDLE_MS", 30_000)?,
        claim_interval: vars.millis("SESSIONS_COMMAND_CLAIM_INTERVAL_MS", 5000)?,
        batch_size: vars.positive("SESSIONS_COMMAND_BATCH_SIZE", 25, "a positive number of entries")?,
        block: vars.millis("SESSIONS_COMMAND_BLOCK_MS", 5000)?,
        concurrency: vars.positive("SESSIONS_COMMAND_CONCURRENCY", 16, "a positive number")?,
        applied_retention: vars.millis("SESSIONS_COMMAND_PROCESSED_TTL_MS", 604_800_000)?,
        // A partition's consumer starts when its lease is acquired: nobody else reads it.
        claim_pending_at_start: true,
    };
    let whatsapp = WhatsAppConfig {
        browser_name: vars.string("SESSIONS_BROWSER_NAME", "Anna"),
        mark_online: vars.boolean("SESSIONS_MARK_ONLINE", false)?,
        history_sync: vars.boolean("SESSIONS_HISTORY_SYNC", true)?,
        print_qr: vars.boolean("SESSIONS_PRINT_QR", false)?,
        qr_ttl,
        ..WhatsAppConfig::default()
    };
    let reply = vars.millis_or_zero("SESSIONS_SIMULATOR_REPLY_MS", 1500)?;
    let simulator = SimulatorConfig {
        first_qr_ttl: vars.millis("SESSIONS_SIMULATOR_FIRST_QR_MS", 60_000)?,
        next_qr_ttl: vars.millis("SESSIONS_SIMULATOR_NEXT_QR_MS", 20_000)?,
        qr_codes: vars.positive("SESSIONS_SIMULATOR_QR_CODES", 6, "a positive number of codes")?,
        reply_delay: (!reply.is_zero()).then_some(reply),
        history_messages: vars.parse("SESSIONS_SIMULATOR_HISTORY_MESSAGES", 60u64, "a number of messages (0: none)")?,
        history_chats: vars.positive("SESSIONS_SIMULATOR_HISTORY_CHATS", 4, "a positive number of chats")?,
        burst_messages: vars.parse("SESSIONS_SIMULATOR_BURST_MESSAGES", 100u64, "a number of messages")?,
        ..SimulatorConfig::default()
    };
    Ok(SessionsSettings { provider, sessions, worker, consumer, whatsapp, simulator, fleet })
}

/// Tells apart two workers that a restart gave the same process id.
fn rand_suffix() -> u16 {
    let bytes = uuid::Uuid::new_v4();
    u16::from_le_bytes([bytes.as_bytes()[0], bytes.as_bytes()[1]])
}
