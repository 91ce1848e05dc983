//! Webhook delivery, in two parts that run in `anna worker webhooks` (and `anna serve`):
//!
//! - [`WebhookFanout`], a database subscriber of the domain-event stream in a consumer group
//!   of its own: for each tenant event, one delivery row per enabled endpoint of the tenant
//!   that subscribes to it, written with the applied-event record (each event fans out once,
//!   however often it is delivered). Rows are durable: a restart of any process loses nothing.
//! - [`WebhookDispatcher`]: claims due deliveries (`anna_store::webhooks`), posts them signed
//!   per the Standard Webhooks specification, and records each attempt. A failure is retried
//!   with exponential backoff and jitter until the delivery's attempts or deadline run out,
//!   then it is dead (replayable). Consecutive failures of an endpoint open its circuit: its
//!   deliveries wait, then one probe goes; other endpoints are not held up. A dispatcher that
//!   dies leaves its claims to expire and be claimed again; the repeat carries the same
//!   `webhook-id`, the receiver's idempotency key.

pub mod http;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anna_domain::webhook::{self, DELIVERABLE_EVENTS, WebhookEndpoint};
use anna_store::webhooks::{AttemptNext, AttemptResult, CircuitRules, ClaimRules, ClaimedDelivery, NewDelivery};
use anna_store::{Store, UnitOfWork};
use anna_streams::backoff::Backoff;
use anna_streams::consumer::{Effect, HandlerError, ReceivedEvent, Subscriber};
use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

pub use http::{HttpSettings, WebhookClient};

/// The stream position of an event as text that sorts like the position (Redis and embedded
/// entry ids are `<milliseconds or sequence>-<n>`): digits only, fixed width, so any collation
/// orders them alike.
pub fn position_of(entry_id: &str, occurred_on: OffsetDateTime) -> String {
    let mut parts = entry_id.splitn(2, '-').map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => format!("{major:020}{minor:020}"),
        (Some(Ok(major)), None) => format!("{major:020}{:020}", 0),
        _ => {
            let millis = u64::try_from(occurred_on.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            format!("{millis:020}{:020}", 0)
        }
    }
}

/// Domain events → delivery rows.
pub struct WebhookFanout {
    /// `WEBHOOKS_DEADLINE_MS`.
    pub deadline: Duration,
    /// Woken after a batch's deliveries are committed: the dispatcher of this process claims
    /// them at once.
    pub wake: Arc<Notify>,
}

impl WebhookFanout {
    async fn fan_out(&self, events: &[&ReceivedEvent], uow: &mut dyn UnitOfWork) -> Result<(), HandlerError> {
        let mut tenants: Vec<Uuid> =
            events.iter().filter_map(|e| e.event.tenant_id.as_deref().and_then(|t| Uuid::parse_str(t).ok())).collect();
        tenants.sort_unstable();
        tenants.dedup();
        if tenants.is_empty() {
            return Ok(());
        }
        let endpoints = uow.enabled_webhook_endpoints(&tenants).await?;
        if endpoints.is_empty() {
            return Ok(());
        }
        let now = OffsetDateTime::now_utc();
        let deadline_at = now.checked_add(anna_streams::backoff::to_time(self.deadline)).unwrap_or(now);
        let mut deliveries = Vec::new();
        for received in events {
            let event = &received.event;
            let mut body = None;
            for endpoint in endpoints.iter().filter(|endpoint| endpoint.wants(event)) {
                let body = body.get_or_insert_with(|| webhook::delivery_body(event)).clone();
                deliveries.push(NewDelivery {
                    endpoint_id: endpoint.id,
                    tenant_id: endpoint.tenant_id,
                    event_id: event.event_id,
                    event_name: event.event_name.clone(),
                    ordering_key: event.aggregate_id.clone(),
                    position: position_of(&received.entry_id, event.occurred_on),
                    ordered: endpoint.ordered,
                    body,
                    occurred_at: event.occurred_on,
                    created_at: now,
                    deadline_at,
                });
            }
        }
        if !deliveries.is_empty() {
            uow.insert_webhook_deliveries(&deliveries).await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Subscriber for WebhookFanout {
    fn name(&self) -> &'static str {
        "WebhookDeliveriesOnTenantEvents"
    }

    fn event_names(&self) -> Vec<&'static str> {
        DELIVERABLE_EVENTS.to_vec()
    }

    fn effect(&self) -> Effect {
        Effect::Database
    }

    async fn handle(&self, event: &ReceivedEvent, uow: Option<&mut dyn UnitOfWork>) -> Result<(), HandlerError> {
        let uow = uow.ok_or_else(|| HandlerError::new("the webhook fan-out needs a unit of work"))?;
        self.fan_out(&[event], uow).await
    }

    async fn handle_batch(
        &self,
        events: &[&ReceivedEvent],
        uow: &mut dyn UnitOfWork,
    ) -> Result<(), (Option<usize>, HandlerError)> {
        self.fan_out(events, uow).await.map_err(|error| (None, error))
    }

    fn committed(&self) {
        self.wake.notify_one();
    }
}

/// The dispatcher's settings (`WEBHOOKS_*`).
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    pub http: HttpSettings,
    /// `WEBHOOKS_CONCURRENCY`: attempts in flight in this process.
    pub concurrency: usize,
    /// `WEBHOOKS_ENDPOINT_CONCURRENCY`: attempts in flight per endpoint in this process.
    pub endpoint_concurrency: u32,
    /// `WEBHOOKS_BATCH_SIZE`: deliveries claimed at once.
    pub batch_size: usize,
    /// `WEBHOOKS_POLL_MS`: how often an idle dispatcher looks for due retries and for
    /// deliveries fanned out by other processes.
    pub poll: Duration,
    /// `WEBHOOKS_RETRY_BASE_MS` / `WEBHOOKS_RETRY_MAX_MS`.
    pub backoff: Backoff,
    /// `WEBHOOKS_MAX_ATTEMPTS`: attempts before a delivery is dead (0: only the deadline).
    pub max_attempts: u32,
    /// `WEBHOOKS_CIRCUIT_FAILURES` / `WEBHOOKS_CIRCUIT_OPEN_MS` / `WEBHOOKS_CIRCUIT_OPEN_MAX_MS`.
    pub circuit: CircuitRules,
    /// `WEBHOOKS_RETENTION_MS`: succeeded and dead deliveries are kept this long.
    pub retention: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            http: HttpSettings::default(),
            concurrency: 64,
            endpoint_concurrency: 8,
            batch_size: 64,
            poll: Duration::from_millis(500),
            backoff: Backoff { base: Duration::from_secs(5), max: Duration::from_secs(3600) },
            max_attempts: 25,
            circuit: CircuitRules { threshold: 5, open: Duration::from_secs(30), open_max: Duration::from_secs(600) },
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Results waiting to be recorded, at most this many per transaction.
const RECORD_BATCH: usize = 256;
/// Finished deliveries deleted per transaction, and per upkeep round at most ten times that.
const PURGE_BATCH: u32 = 1000;

/// Claims deliveries, attempts them, records the attempts.
pub struct WebhookDispatcher {
    store: Arc<dyn Store>,
    client: WebhookClient,
    sealer: anna_domain::secrets::Sealer,
    config: DispatcherConfig,
    wake: Arc<Notify>,
    /// Attempts in flight per endpoint, and a signal when one ends.
    in_flight: Mutex<HashMap<Uuid, u32>>,
    slot_freed: Notify,
}

impl WebhookDispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        server_secret: &[u8],
        config: DispatcherConfig,
        wake: Arc<Notify>,
    ) -> Result<Arc<Self>, reqwest::Error> {
        Ok(Arc::new(Self {
            store,
            client: WebhookClient::new(config.http.clone())?,
            sealer: webhook::secret_sealer(server_secret),
            config,
            wake,
            in_flight: Mutex::new(HashMap::new()),
            slot_freed: Notify::new(),
        }))
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, u32>> {
        self.in_flight.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn claim_rules(&self, batch: usize) -> ClaimRules {
        ClaimRules {
            batch,
            window: (batch * 4).max(64),
            // An attempt ends within the HTTP timeout; the lease covers it with room to record.
            lease: self.config.http.timeout + Duration::from_secs(30),
            endpoint_concurrency: self.config.endpoint_concurrency,
            in_flight: self.in_flight().clone(),
            circuit_threshold: self.config.circuit.threshold,
            recheck_delay: Duration::from_secs(60),
        }
    }

    /// Runs until `shutdown`; attempts in flight then finish and are recorded.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (results, received) = mpsc::unbounded_channel();
        let recorder = tokio::spawn(self.clone().record_until_closed(received));
        let attempts = TaskTracker::new();
        // Its own task: counting and purging scan the table, and must not hold up claims.
        let housekeeping = tokio::spawn(self.clone().keep_house(shutdown.clone()));
        while !shutdown.is_cancelled() {
            let busy: u32 = self.in_flight().values().sum();
            let room = self.config.concurrency.saturating_sub(busy as usize).min(self.config.batch_size);
            if room == 0 {
                tokio::select! {
                    _ = self.slot_freed.notified() => {}
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(self.config.poll) => {}
                }
                continue;
            }
            let claimed =
                match self.store.claim_webhook_deliveries(&self.claim_rules(room), OffsetDateTime::now_utc()).await {
                    Ok(claimed) => claimed,
                    Err(error) => {
                        tracing::warn!(%error, "cannot claim webhook deliveries; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = tokio::time::sleep(self.config.poll) => {}
                        }
                        continue;
                    }
                };
            if claimed.is_empty() {
                // Nothing due, or every due delivery waits for its endpoint's room: a finished
                // attempt frees room, so it wakes this loop as well as new deliveries do.
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = self.slot_freed.notified(), if busy > 0 => {}
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(self.config.poll) => {}
                }
                continue;
            }
            let endpoints = self.endpoints_of(&claimed).await;
            for delivery in claimed {
                let endpoint = endpoints.get(&delivery.endpoint_id).cloned();
                *self.in_flight().entry(delivery.endpoint_id).or_default() += 1;
                let (dispatcher, results) = (self.clone(), results.clone());
                attempts.spawn(async move {
                    let endpoint_id = delivery.endpoint_id;
                    if let Some(result) = dispatcher.attempt(delivery, endpoint).await {
                        let _ = results.send(result);
                    }
                    dispatcher.release(endpoint_id);
                });
            }
        }
        attempts.close();
        attempts.wait().await;
        drop(results);
        let _ = recorder.await;
        let _ = housekeeping.await;
    }

    /// The gauges every 10 s, the retention purge every minute, until `shutdown`.
    async fn keep_house(self: Arc<Self>, shutdown: CancellationToken) {
        let mut purge_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
            self.update_gauges().await;
            if purge_at.elapsed() >= Duration::from_secs(60) {
                self.purge_expired().await;
                purge_at = tokio::time::Instant::now();
            }
        }
    }

    fn release(&self, endpoint_id: Uuid) {
        let mut in_flight = self.in_flight();
        if let Some(count) = in_flight.get_mut(&endpoint_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                in_flight.remove(&endpoint_id);
            }
        }
        drop(in_flight);
        self.slot_freed.notify_one();
    }

    async fn endpoints_of(&self, claimed: &[ClaimedDelivery]) -> HashMap<Uuid, Arc<WebhookEndpoint>> {
        let mut ids: Vec<Uuid> = claimed.iter().map(|d| d.endpoint_id).collect();
        ids.sort_unstable();
        ids.dedup();
        match self.store.find_webhook_endpoints(&ids).await {
            Ok(endpoints) => endpoints.into_iter().map(|e| (e.id, Arc::new(e))).collect(),
            Err(error) => {
                // The attempts fail and are retried; the deliveries are not lost.
                tracing::warn!(%error, "cannot load webhook endpoints");
                HashMap::new()
            }
        }
    }

    /// One attempt of `delivery`; `None` when its endpoint is gone (deleted with its
    /// deliveries).
    async fn attempt(
        &self,
        delivery: ClaimedDelivery,
        endpoint: Option<Arc<WebhookEndpoint>>,
    ) -> Option<AttemptResult> {
        let attempted_at = OffsetDateTime::now_utc();
        let Some(endpoint) = endpoint else {
            // Deleted with its deliveries, or the database did not answer: then the claim's
            // lease ends and the delivery is attempted again, without counting this against the
            // receiver.
            if !matches!(self.store.find_webhook_endpoint(delivery.endpoint_id).await, Ok(None)) {
                tracing::warn!(delivery_id = %delivery.id, "webhook endpoint could not be loaded; the delivery waits for its lease");
            }
            return None;
        };
        let response = self.post(&delivery, &endpoint, attempted_at).await;
        let next = if response.succeeded() {
            AttemptNext::Succeeded
        } else if self.config.max_attempts > 0 && delivery.round_attempt >= self.config.max_attempts {
            AttemptNext::Dead
        } else {
            let retry_at =
                attempted_at + anna_streams::backoff::to_time(self.config.backoff.delay(delivery.round_attempt));
            if retry_at >= delivery.deadline_at { AttemptNext::Dead } else { AttemptNext::RetryAt(retry_at) }
        };
        let outcome = match next {
            AttemptNext::Succeeded => "succeeded",
            AttemptNext::RetryAt(_) => "failed",
            AttemptNext::Dead => "dead",
        };
        metrics::counter!("webhook_attempts_total", "outcome" => outcome).increment(1);
        metrics::histogram!("webhook_attempt_duration_seconds").record(response.latency.as_secs_f64());
        if next == AttemptNext::Succeeded {
            let since_event = (OffsetDateTime::now_utc() - delivery.occurred_at).as_seconds_f64().max(0.0);
            metrics::histogram!("webhook_delivery_latency_seconds").record(since_event);
        }
        if next == AttemptNext::Dead {
            metrics::counter!("webhook_deliveries_dead_total").increment(1);
            tracing::warn!(delivery_id = %delivery.id, endpoint_id = %delivery.endpoint_id, attempts = delivery.attempt,
                error = response.error.as_deref().unwrap_or(""), status = response.status, "webhook delivery dead-lettered");
        }
        Some(AttemptResult {
            delivery_id: delivery.id,
            endpoint_id: delivery.endpoint_id,
            ordered: delivery.ordered,
            ordering_key: delivery.ordering_key,
            attempt: delivery.attempt,
            probe: delivery.probe,
            attempted_at,
            status_code: response.status,
            latency_ms: u32::try_from(response.latency.as_millis()).unwrap_or(u32::MAX),
            error: response.error,
            response_body: response.body,
            next,
        })
    }

    async fn post(
        &self,
        delivery: &ClaimedDelivery,
        endpoint: &WebhookEndpoint,
        now: OffsetDateTime,
    ) -> http::Response {
        let refused =
            |error: String| http::Response { status: None, latency: Duration::ZERO, error: Some(error), body: None };
        let secrets = match endpoint.signing_secrets(&self.sealer, now) {
            Ok(secrets) => secrets,
            Err(error) => {
                return refused(format!("the signing secret cannot be opened ({error}): was AUTH_JWT_SECRET changed?"));
            }
        };
        let webhook_id = delivery.event_id.to_string();
        let timestamp = now.unix_timestamp();
        let signature = webhook::signature_header(&secrets, &webhook_id, timestamp, delivery.body.as_bytes());
        let request = http::Request {
            url: &endpoint.url,
            headers: vec![
                ("webhook-id", webhook_id),
                ("webhook-timestamp", timestamp.to_string()),
                ("webhook-signature", signature),
            ],
            body: delivery.body.clone(),
        };
        self.client.post(request).await
    }

    /// Records results as they come, many per transaction; retries while the database is
    /// unavailable (a result whose claim expired meanwhile is then dropped by the store, and
    /// its delivery attempted again).
    async fn record_until_closed(self: Arc<Self>, mut received: mpsc::UnboundedReceiver<AttemptResult>) {
        let mut pending: Vec<AttemptResult> = Vec::new();
        loop {
            if pending.is_empty() {
                match received.recv().await {
                    Some(result) => pending.push(result),
                    None => return,
                }
            }
            while pending.len() < RECORD_BATCH {
                match received.try_recv() {
                    Ok(result) => pending.push(result),
                    Err(_) => break,
                }
            }
            match self.record(&pending).await {
                Ok(()) => pending.clear(),
                Err(error) if error.is_unavailable() => {
                    tracing::warn!(%error, results = pending.len(), "cannot record webhook attempts; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => {
                    // Not an outage: one result may be unstorable. Record them one by one and
                    // drop those that fail (their deliveries are attempted again after their
                    // lease), so one bad result never stops the others.
                    tracing::warn!(%error, results = pending.len(), "recording webhook attempts failed; one by one");
                    for result in std::mem::take(&mut pending) {
                        if let Err(error) = self.record(std::slice::from_ref(&result)).await {
                            tracing::error!(%error, delivery_id = %result.delivery_id, "webhook attempt not recorded");
                        }
                    }
                }
            }
        }
    }

    async fn record(&self, results: &[AttemptResult]) -> Result<(), anna_store::StoreError> {
        let recorded =
            self.store.record_webhook_attempts(results, self.config.circuit, OffsetDateTime::now_utc()).await?;
        for (endpoint_id, open_for) in &recorded.opened {
            metrics::counter!("webhook_circuit_opened_total").increment(1);
            tracing::warn!(%endpoint_id, open_ms = open_for.as_millis() as u64,
                "webhook endpoint keeps failing: its circuit is open, deliveries wait");
        }
        // A finished ordered delivery may have released the next one.
        self.wake.notify_one();
        Ok(())
    }

    /// Deletes finished deliveries older than `WEBHOOKS_RETENTION_MS`, a bounded amount per round.
    async fn purge_expired(&self) {
        let before = OffsetDateTime::now_utc() - anna_streams::backoff::to_time(self.config.retention);
        for _ in 0..10 {
            match self.store.purge_webhook_deliveries(before, PURGE_BATCH).await {
                Ok(deleted) if deleted < u64::from(PURGE_BATCH) => return,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot purge old webhook deliveries");
                    return;
                }
            }
        }
    }

    async fn update_gauges(&self) {
        match self.store.webhook_delivery_counts(OffsetDateTime::now_utc()).await {
            Ok(counts) => {
                metrics::gauge!("webhook_deliveries", "status" => "pending").set(counts.pending as f64);
                metrics::gauge!("webhook_deliveries", "status" => "delivering").set(counts.delivering as f64);
                metrics::gauge!("webhook_deliveries", "status" => "dead").set(counts.dead as f64);
                let oldest = counts
                    .oldest_due
                    .map(|due| (OffsetDateTime::now_utc() - due).as_seconds_f64().max(0.0))
                    .unwrap_or(0.0);
                metrics::gauge!("webhook_oldest_due_seconds").set(oldest);
            }
            Err(error) => tracing::debug!(%error, "cannot count webhook deliveries"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn positions_sort_like_stream_ids() {
        let at = OffsetDateTime::UNIX_EPOCH;
        let ids = ["9-0", "10-0", "1700000000000-5", "1700000000000-12", "1700000000001-0"];
        let positions: Vec<String> = ids.iter().map(|id| position_of(id, at)).collect();
        let mut sorted = positions.clone();
        sorted.sort();
        assert_eq!(positions, sorted);
        assert!(positions.iter().all(|p| p.len() == 40 && p.chars().all(|c| c.is_ascii_digit())));
    }
}
