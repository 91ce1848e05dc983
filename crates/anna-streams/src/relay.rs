//! The outbox relay: publishes `outbox_events` rows to the event stream, in commit order per
//! aggregate. A crash between append and mark gives a duplicate entry, never a lost one
//! (consumers are idempotent by event id).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anna_store::{OutboxRecord, Store, StoreError};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::{Fields, Stream, envelope};

/// How long an idle relay waits before looking again right after it published something.
const LINGER: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// `EVENTS_STREAM`.
    pub stream: String,
    /// `OUTBOX_BATCH_SIZE`.
    pub batch_size: u32,
    /// `OUTBOX_INTERVAL_MS`: the longest wait when there is nothing to publish (commits wake
    /// the relay earlier).
    pub idle_wait: Duration,
    /// `OUTBOX_LEASE_MS`: how long a claim is held before another relay may take the rows.
    pub lease: Duration,
    /// `OUTBOX_MAX_ATTEMPTS`: publish attempts before a row is marked `failed`.
    pub max_attempts: u32,
    /// `OUTBOX_BACKOFF_MS` / `OUTBOX_BACKOFF_MAX_MS`.
    pub backoff: Backoff,
    /// `EVENTS_STREAM_MAX_LEN`: approximate cap of the stream (unread entries are never
    /// trimmed).
    pub stream_max_len: Option<u64>,
    /// `OUTBOX_RETENTION_MS`: published rows older than this are purged.
    pub retention: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            stream: "domain-events".into(),
            batch_size: 100,
            idle_wait: Duration::from_millis(1000),
            lease: Duration::from_secs(30),
            max_attempts: 20,
            backoff: Backoff { base: Duration::from_millis(1000), max: Duration::from_secs(60) },
            stream_max_len: Some(100_000),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct OutboxRelay {
    store: Arc<dyn Store>,
    stream: Arc<dyn Stream>,
    config: RelayConfig,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayPass {
    pub claimed: usize,
    pub published: usize,
    pub retried: usize,
    pub failed: usize,
}

impl OutboxRelay {
    pub fn new(store: Arc<dyn Store>, stream: Arc<dyn Stream>, config: RelayConfig) -> Self {
        Self { store, stream, config }
    }

    /// Relays until `shutdown`; finishes the batch in hand before returning. The gauges and
    /// the purge run beside the relay loop, never in it: counting a busy outbox or deleting a
    /// minute of published rows takes long enough to hold every event back meanwhile.
    pub async fn run(&self, shutdown: CancellationToken) {
        tracing::info!(stream = %self.config.stream, backend = self.stream.backend(), "outbox relay started");
        tokio::join!(self.relay_until(&shutdown), self.upkeep_until(&shutdown));
        tracing::info!("outbox relay stopped");
    }

    async fn relay_until(&self, shutdown: &CancellationToken) {
        let mut busy = false;
        while !shutdown.is_cancelled() {
            match self.relay_once().await {
                Ok(pass) if pass.claimed > 0 => {
                    busy = true;
                    continue;
                }
                Ok(_) => {
                    // Right after traffic, look again soon: a commit that landed just after
                    // the last claim may not have signalled (stores may coalesce signals).
                    let wait = if busy { self.config.idle_wait.min(LINGER) } else { self.config.idle_wait };
                    busy = false;
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = self.store.wait_for_outbox(wait) => {}
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "outbox relay pass failed");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(self.config.idle_wait) => {}
                    }
                }
            }
        }
    }

    /// Gauges every 5 s, purge every minute, until `shutdown`.
    async fn upkeep_until(&self, shutdown: &CancellationToken) {
        let purge_every = Duration::from_secs(60);
        let mut last_purge = Instant::now() - purge_every;
        while !shutdown.is_cancelled() {
            self.update_gauges().await;
            if last_purge.elapsed() >= purge_every {
                self.purge().await;
                last_purge = Instant::now();
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Claims one batch and publishes it.
    pub async fn relay_once(&self) -> Result<RelayPass, RelayError> {
        let now = OffsetDateTime::now_utc();
        let rows = self.store.claim_outbox_batch(self.config.batch_size, self.config.lease, now).await?;
        let mut pass = RelayPass { claimed: rows.len(), ..RelayPass::default() };
        if rows.is_empty() {
            return Ok(pass);
        }
        let started = Instant::now();
        let entries: Vec<Fields> = rows.iter().map(|row| envelope::to_fields(&row.event, Some(row.id))).collect();
        // One span per row, children of the request that wrote it, open while the batch goes out.
        let _spans: Vec<tracing::Span> = rows
            .iter()
            .map(|row| {
                let span = tracing::info_span!("outbox.publish", event.name = %row.event.event_name, event.id = %row.event.event_id);
                crate::trace::set_parent(&span, row.event.traceparent.as_deref());
                span
            })
            .collect();
        let appended = match self.stream.append_batch(&self.config.stream, &entries, self.config.stream_max_len).await {
            Ok(ids) => ids.len().min(rows.len()),
            Err(failure) => {
                let done = failure.appended.len().min(rows.len());
                let error = failure.error.to_string();
                // Every row not appended was tried and failed: each waits for its own backoff
                // and counts towards its own maximum (their aggregates' order is kept by the
                // claim rule).
                for row in rows.iter().skip(done) {
                    self.schedule_retry(row, &error, &mut pass).await?;
                }
                tracing::warn!(unpublished = rows.len() - done, retried = pass.retried, failed = pass.failed, %error, "Outbox publish failed");
                done
            }
        };
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        let published = &rows[..appended];
        let ids: Vec<uuid::Uuid> = published.iter().map(|r| r.id).collect();
        self.store.mark_outbox_published(&ids, OffsetDateTime::now_utc()).await?;
        pass.published = ids.len();
        for row in published {
            metrics::counter!("outbox_dispatch_total", "event_name" => row.event.event_name.clone()).increment(1);
            metrics::histogram!("outbox_dispatch_duration_ms", "event_name" => row.event.event_name.clone())
                .record(elapsed_ms);
        }
        Ok(pass)
    }

    async fn schedule_retry(&self, row: &OutboxRecord, error: &str, pass: &mut RelayPass) -> Result<(), RelayError> {
        let now = OffsetDateTime::now_utc();
        metrics::counter!("outbox_dispatch_failed_total", "event_name" => row.event.event_name.clone()).increment(1);
        let attempts = u32::try_from(row.attempts).unwrap_or(0);
        if attempts >= self.config.max_attempts {
            tracing::error!(outbox_id = %row.id, event_name = %row.event.event_name, attempts, error, "outbox row failed for good");
            self.store.mark_outbox_failed(row.id, error, now).await?;
            pass.failed += 1;
        } else {
            let delay = self.config.backoff.delay(attempts);
            tracing::debug!(outbox_id = %row.id, event_name = %row.event.event_name, attempts, retry_in_ms = delay.as_millis() as u64, error, "outbox row will be retried");
            self.store
                .mark_outbox_retry(row.id, error, now.saturating_add(crate::backoff::to_time(delay)), now)
                .await?;
            pass.retried += 1;
        }
        Ok(())
    }

    async fn purge(&self) {
        let before = OffsetDateTime::now_utc().saturating_sub(crate::backoff::to_time(self.config.retention));
        match self.store.purge_published_outbox(before).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "published outbox rows purged"),
            Err(error) => tracing::warn!(%error, "purging published outbox rows failed"),
        }
    }

    async fn update_gauges(&self) {
        match self.store.outbox_status().await {
            Ok(status) => {
                metrics::gauge!("outbox_pending").set(status.pending as f64);
                metrics::gauge!("outbox_processing").set(status.processing as f64);
                metrics::gauge!("outbox_failed").set(status.failed as f64);
                let age = status
                    .oldest_unpublished_at
                    .map_or(0.0, |at| (OffsetDateTime::now_utc() - at).as_seconds_f64().max(0.0));
                metrics::gauge!("outbox_oldest_unpublished_age_seconds").set(age);
            }
            Err(error) => tracing::warn!(%error, "reading the outbox status failed"),
        }
        let since = OffsetDateTime::now_utc() - time::Duration::minutes(1);
        match self.store.outbox_published_since(since).await {
            Ok(published) => metrics::gauge!("outbox_drain_rate_per_second").set(published as f64 / 60.0),
            Err(error) => tracing::warn!(%error, "reading the outbox drain rate failed"),
        }
    }
}
