//! `MESSAGES_*`: upkeep of the message history (changes that arrived before their message,
//! retention).

use anna_workers::history::HistoryUpkeepConfig;

use super::{ConfigError, Vars};

use anna_usecases::sessions::MAX_RETENTION_DAYS;

pub(super) fn read<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<HistoryUpkeepConfig, ConfigError> {
    let retention_days = vars.parse("MESSAGES_RETENTION_DAYS", 0u32, "a number of days (0: keep forever)")?;
    if retention_days > MAX_RETENTION_DAYS {
        return Err(ConfigError::Invalid {
            var: "MESSAGES_RETENTION_DAYS",
            shown: retention_days.to_string(),
            expected: "at most 3650 days (0: keep forever)",
        });
    }
    Ok(HistoryUpkeepConfig {
        interval: vars.millis("MESSAGES_UPKEEP_INTERVAL_MS", 5000)?,
        pending_ttl: vars.millis("MESSAGES_PENDING_TTL_MS", 604_800_000)?,
        retention_days,
        retention_interval: vars.millis("MESSAGES_RETENTION_INTERVAL_MS", 3_600_000)?,
        retention_batch: vars.positive("MESSAGES_RETENTION_BATCH", 1000, "a positive number of messages")?,
        media_sweep_interval: vars.millis("MEDIA_SWEEP_INTERVAL_MS", 86_400_000)?,
    })
}
