//! The consumer runtime: reads the event stream in a consumer group and runs the subscribers
//! registered for each event name.
//!
//! Guarantees: at-least-once delivery; effectively-once effects for database subscribers (the
//! applied event id is recorded in the same transaction as the effects); at-least-once for
//! subscribers with external effects (recorded after the effect, before the ack: in a batch,
//! the records of all its entries in one transaction at its end, so a durable database
//! flushes once per batch rather than once per entry).
//! Retries are per subscriber: one that already applied an event is never re-run for it.
//! After `max_attempts` failures of a subscriber the entry is written to the DLQ stream first
//! and acknowledged second; if the DLQ cannot be written it goes to `dead_letters`; if that
//! fails too it stays pending and is retried later. Nothing is dropped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anna_domain::DomainEvent;
use anna_store::{DeadLetter, Store, StoreError, UnitOfWork};
use async_trait::async_trait;
use futures::StreamExt;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::{Delivery, Fields, Stream, StreamError, envelope};

/// Where a subscriber's effects go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Effects in the database, made through the unit of work the runtime passes; applied at
    /// most once.
    Database,
    /// Effects outside the database (e-mail): may happen more than once if the process dies
    /// between the effect and its record.
    External,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

impl HandlerError {
    pub fn new(message: impl std::fmt::Display) -> Self {
        Self(message.to_string())
    }
}

impl From<StoreError> for HandlerError {
    fn from(error: StoreError) -> Self {
        Self(error.to_string())
    }
}

/// Why a batch transaction failed: the position of the event whose handler failed, if it was
/// a handler (and not the storage).
struct BatchFailure {
    culprit: Option<usize>,
    error: HandlerError,
}

/// An event as a subscriber sees it.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    pub event: DomainEvent,
    pub entry_id: String,
    pub delivery_count: u64,
}

#[async_trait]
pub trait Subscriber: Send + Sync + 'static {
    /// Stable name, recorded with every applied event id: renaming a subscriber makes it
    /// re-apply old events.
    fn name(&self) -> &'static str;

    fn event_names(&self) -> Vec<&'static str>;

    fn effect(&self) -> Effect;

    /// Applies the event. `uow` is `Some` for `Effect::Database` subscribers (committed by the
    /// runtime together with the applied-event record) and `None` for external ones.
    async fn handle(&self, event: &ReceivedEvent, uow: Option<&mut dyn UnitOfWork>) -> Result<(), HandlerError>;

    /// Called after a database subscriber's effects were committed (a batch, or one event): a
    /// subscriber that feeds in-process work wakes it here, when what it wrote is visible.
    fn committed(&self) {}

    /// Applies several events (in stream order) in one unit of work: database subscribers may
    /// override it to write once per batch. On failure, returns the position of the event
    /// that failed, when one did. The default handles them one by one.
    async fn handle_batch(
        &self,
        events: &[&ReceivedEvent],
        uow: &mut dyn UnitOfWork,
    ) -> Result<(), (Option<usize>, HandlerError)> {
        for (position, event) in events.iter().enumerate() {
            self.handle(event, Some(&mut *uow)).await.map_err(|error| (Some(position), error))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// `EVENTS_STREAM`.
    pub stream: String,
    /// `EVENTS_GROUP`.
    pub group: String,
    /// `EVENTS_CONSUMER`.
    pub consumer: String,
    /// `EVENTS_DLQ_STREAM`.
    pub dlq_stream: String,
    /// `EVENTS_MAX_ATTEMPTS`: failures of one subscriber before the entry is dead-lettered.
    pub max_attempts: u32,
    /// `EVENTS_BACKOFF_MS` / `EVENTS_BACKOFF_MAX_MS`.
    pub backoff: Backoff,
    /// `EVENTS_CLAIM_IDLE_MS`: entries pending this long in a consumer are taken over. Must
    /// exceed the slowest handler.
    pub claim_idle: Duration,
    /// `EVENTS_CLAIM_INTERVAL_MS`.
    pub claim_interval: Duration,
    /// `EVENTS_BATCH_SIZE`.
    pub batch_size: usize,
    /// `EVENTS_BLOCK_MS`.
    pub block: Duration,
    /// `EVENTS_CONCURRENCY`: entries handled at once (entries of one aggregate in one batch are
    /// handled in order).
    pub concurrency: usize,
    /// `EVENTS_PROCESSED_TTL_MS`: applied-event records older than this are purged.
    pub applied_retention: Duration,
    /// Before reading new entries, take over every entry pending in the group, whatever its
    /// idle time: for a consumer that knows it is the stream's only one (a sessions worker
    /// that just acquired the stream's partition), so its predecessor's unfinished entries
    /// are handled first, in order, rather than after the idle-claim threshold.
    pub claim_pending_at_start: bool,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            stream: "domain-events".into(),
            group: "domain-events-group".into(),
            consumer: format!("consumer-{}", std::process::id()),
            dlq_stream: "domain-events-dlq".into(),
            max_attempts: 5,
            backoff: Backoff { base: Duration::from_millis(1000), max: Duration::from_millis(30_000) },
            claim_idle: Duration::from_millis(5000),
            claim_interval: Duration::from_millis(2000),
            batch_size: 50,
            block: Duration::from_millis(5000),
            concurrency: 16,
            applied_retention: Duration::from_secs(7 * 24 * 3600),
            claim_pending_at_start: false,
        }
    }
}

/// How handling one delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every subscriber applied it (now or before); acknowledged.
    Done,
    /// No subscriber for it; acknowledged.
    Ignored,
    /// A subscriber failed and will be retried after `retry_in`; left pending.
    Retry {
        retry_in: Duration,
        /// Subscribers already out of attempts (name, last error, attempts): not run again.
        exhausted: Vec<(&'static str, String, u32)>,
    },
    /// Written to the DLQ stream (or `dead_letters`), then acknowledged.
    DeadLettered,
    /// Could not be settled (storage or stream down); left pending for a later claim.
    Stuck,
}

pub struct EventConsumer {
    store: Arc<dyn Store>,
    stream: Arc<dyn Stream>,
    config: ConsumerConfig,
    subscribers: HashMap<&'static str, Vec<Arc<dyn Subscriber>>>,
}

impl EventConsumer {
    pub fn new(store: Arc<dyn Store>, stream: Arc<dyn Stream>, config: ConsumerConfig) -> Self {
        Self { store, stream, config, subscribers: HashMap::new() }
    }

    pub fn subscribe(mut self, subscriber: Arc<dyn Subscriber>) -> Self {
        for name in subscriber.event_names() {
            self.subscribers.entry(name).or_default().push(subscriber.clone());
        }
        self
    }

    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// Consumes until `shutdown`: in-flight handlers finish and are acknowledged before it
    /// returns; entries waiting for a retry stay pending for the next start or another
    /// consumer.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let config = &self.config;
        loop {
            match self.stream.create_group(&config.stream, &config.group).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::error!(%error, "Event consumer group setup failed");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(config.backoff.base) => {}
                    }
                }
            }
        }
        tracing::info!(stream = %config.stream, group = %config.group, consumer = %config.consumer, "Event consumer started");
        // Purging an hour of applied-event records can take a while: beside the read loop,
        // not in it.
        tokio::join!(self.clone().consume_until(&shutdown), self.purge_until(&shutdown));
        tracing::info!("Event consumer stopped");
    }

    async fn consume_until(self: Arc<Self>, shutdown: &CancellationToken) {
        let config = &self.config;
        let retries = TaskTracker::new();
        if config.claim_pending_at_start {
            self.clone().take_over_pending(&retries, shutdown).await;
        }
        let mut last_claim = Instant::now() - config.claim_interval;
        let mut last_gauges = Instant::now() - Duration::from_secs(10);
        while !shutdown.is_cancelled() {
            if last_gauges.elapsed() >= Duration::from_secs(5) {
                self.update_gauges().await;
                last_gauges = Instant::now();
            }
            if last_claim.elapsed() >= config.claim_interval {
                last_claim = Instant::now();
                match self
                    .stream
                    .claim_idle(&config.stream, &config.group, &config.consumer, config.claim_idle, config.batch_size)
                    .await
                {
                    Ok(claimed) if !claimed.is_empty() => {
                        tracing::info!(count = claimed.len(), "claimed idle entries");
                        let ids = claimed.iter().map(|d| d.entry.id.clone()).collect();
                        self.keeping(ids, self.clone().handle_batch(claimed, &retries, shutdown)).await;
                        continue;
                    }
                    Ok(_) => {}
                    Err(error) => {
                        self.pause_after(error, shutdown).await;
                        continue;
                    }
                }
            }
            let block = config.block.min(config.claim_interval);
            let read = tokio::select! {
                () = shutdown.cancelled() => break,
                read = self.stream.read_group(&config.stream, &config.group, &config.consumer, config.batch_size, block) => read,
            };
            match read {
                Ok(deliveries) => {
                    let ids = deliveries.iter().map(|d| d.entry.id.clone()).collect();
                    self.keeping(ids, self.clone().handle_batch(deliveries, &retries, shutdown)).await;
                }
                Err(error) => self.pause_after(error, shutdown).await,
            }
        }
        // Retries waiting for their delay return at once on shutdown; one that is handling an
        // entry finishes first.
        retries.close();
        retries.wait().await;
    }

    /// Claims and handles every entry pending in the group, page by page. An entry claimed
    /// again (one waiting here for its retry) is not handled a second time.
    async fn take_over_pending(self: Arc<Self>, retries: &TaskTracker, shutdown: &CancellationToken) {
        let config = &self.config;
        let mut seen: HashSet<String> = HashSet::new();
        while !shutdown.is_cancelled() {
            let count = config.batch_size + seen.len();
            let claimed = match self
                .stream
                .claim_idle(&config.stream, &config.group, &config.consumer, Duration::ZERO, count)
                .await
            {
                Ok(claimed) => claimed,
                Err(error) => {
                    self.pause_after(error, shutdown).await;
                    continue;
                }
            };
            let fresh: Vec<Delivery> = claimed.into_iter().filter(|d| seen.insert(d.entry.id.clone())).collect();
            if fresh.is_empty() {
                return;
            }
            tracing::info!(count = fresh.len(), stream = %config.stream, "took over pending entries");
            metrics::counter!("events_taken_over_total", "stream" => config.stream.clone())
                .increment(fresh.len() as u64);
            let ids = fresh.iter().map(|d| d.entry.id.clone()).collect();
            self.keeping(ids, self.clone().handle_batch(fresh, retries, shutdown)).await;
        }
    }

    /// Purges old applied-event records every hour until `shutdown`.
    async fn purge_until(&self, shutdown: &CancellationToken) {
        while !shutdown.is_cancelled() {
            self.purge_applied().await;
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(3600)) => {}
            }
        }
    }

    /// Runs `work` while keeping `ids` pending for this consumer (touching them well within
    /// the claim threshold), so a slow handler — an e-mail provider taking seconds — is never
    /// mistaken for a dead consumer and run a second time elsewhere.
    async fn keeping<T>(&self, ids: Vec<String>, work: impl std::future::Future<Output = T>) -> T {
        let every = (self.config.claim_idle / 3).max(Duration::from_millis(20));
        // Polled side by side with the work (not in a select arm's body): on SQLite a touch
        // waits for the write lock the work's own transaction may hold.
        let heartbeat = async {
            let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                beat.tick().await;
                if let Err(error) =
                    self.stream.touch(&self.config.stream, &self.config.group, &self.config.consumer, &ids).await
                {
                    tracing::warn!(%error, "could not keep in-flight entries");
                }
            }
        };
        let mut work = std::pin::pin!(work);
        let mut heartbeat = std::pin::pin!(heartbeat);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                () = &mut heartbeat => {}
            }
        }
    }

    async fn pause_after(&self, error: StreamError, shutdown: &CancellationToken) {
        // A group that vanished (stream deleted or evicted, Redis restarted without
        // persistence) is created again rather than failing forever.
        if matches!(error, StreamError::NoGroup { .. }) {
            match self.stream.create_group(&self.config.stream, &self.config.group).await {
                Ok(()) => {
                    tracing::warn!(stream = %self.config.stream, group = %self.config.group, "consumer group was missing: created again");
                    return;
                }
                Err(create_error) => tracing::error!(%create_error, "re-creating the consumer group failed"),
            }
        }
        tracing::error!(%error, "Event consumer loop failed");
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(self.config.backoff.base) => {}
        }
    }

    /// Handles a batch, in four phases. Fast path: each database subscriber applies all its
    /// events of the batch in ONE transaction (in stream order, so per aggregate in order), and
    /// everything settled that way is acknowledged in one call. Events with external
    /// subscribers, events of a failed batch and undecodable entries go one by one (`handle`),
    /// aggregates concurrently; the event whose handler broke a batch counts one failed attempt
    /// and is retried after the backoff (or dead-lettered), like any failure.
    async fn handle_batch(
        self: Arc<Self>,
        deliveries: Vec<Delivery>,
        retries: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        if deliveries.is_empty() {
            return;
        }
        let received = decode(&deliveries);
        let mut plan = self.apply_database_batches(&received).await;
        self.ack_settled(&deliveries, &received, &mut plan).await;
        let culprits = std::mem::take(&mut plan.culprits);
        let culprit_indices: HashSet<usize> = culprits.iter().map(|c| c.index).collect();
        self.clone().count_culprit_failures(&deliveries, &received, culprits, retries, shutdown).await;
        let rest: Vec<usize> = plan.one_by_one.into_iter().filter(|i| !culprit_indices.contains(i)).collect();
        self.handle_one_by_one(&deliveries, rest, retries, shutdown).await;
    }

    /// Phase 1: every database subscriber applies its events of the batch in one transaction.
    /// Returns which entries must go one by one (undecodable, or in a failed batch) and the
    /// events whose handler broke a batch.
    async fn apply_database_batches(&self, received: &[Option<ReceivedEvent>]) -> BatchPlan {
        let mut plan = BatchPlan {
            one_by_one: received.iter().enumerate().filter(|(_, r)| r.is_none()).map(|(i, _)| i).collect(),
            culprits: Vec::new(),
        };
        let mut database_subscribers: Vec<&Arc<dyn Subscriber>> = Vec::new();
        for subscriber in self.subscribers.values().flatten() {
            if subscriber.effect() == Effect::Database
                && !database_subscribers.iter().any(|s| s.name() == subscriber.name())
            {
                database_subscribers.push(subscriber);
            }
        }
        for subscriber in database_subscribers {
            let names = subscriber.event_names();
            let indices: Vec<usize> = received
                .iter()
                .enumerate()
                .filter(|(i, r)| {
                    !plan.one_by_one.contains(i)
                        && r.as_ref().is_some_and(|r| names.contains(&r.event.event_name.as_str()))
                })
                .map(|(i, _)| i)
                .collect();
            if indices.is_empty() {
                continue;
            }
            let events: Vec<&ReceivedEvent> = indices.iter().filter_map(|i| received[*i].as_ref()).collect();
            if let Err(failure) = self.apply_batch(subscriber.as_ref(), &events).await {
                tracing::debug!(subscriber = subscriber.name(), error = %failure.error, "batch failed; its entries go one by one");
                for (position, index) in indices.iter().enumerate() {
                    if failure.culprit == Some(position) {
                        plan.culprits.push(Culprit {
                            index: *index,
                            subscriber: subscriber.name(),
                            error: failure.error.0.clone(),
                        });
                    }
                    plan.one_by_one.insert(*index);
                }
            }
        }
        plan
    }

    /// Phase 2: acknowledges, in one call, the entries the fast path settled (decoded, no
    /// failure, no external subscriber); entries with an external subscriber join the
    /// one-by-one path.
    async fn ack_settled(&self, deliveries: &[Delivery], received: &[Option<ReceivedEvent>], plan: &mut BatchPlan) {
        let mut settled = Vec::new();
        for (i, r) in received.iter().enumerate() {
            let Some(r) = r else { continue };
            if plan.one_by_one.contains(&i) {
                continue;
            }
            let external = self
                .subscribers
                .get(r.event.event_name.as_str())
                .is_some_and(|subs| subs.iter().any(|s| s.effect() == Effect::External));
            if external {
                plan.one_by_one.insert(i);
            } else {
                settled.push(i);
            }
        }
        if settled.is_empty() {
            return;
        }
        let ids: Vec<String> = settled.iter().map(|i| deliveries[*i].entry.id.clone()).collect();
        let wanted = settled
            .iter()
            .filter_map(|i| received[*i].as_ref())
            .filter(|r| self.subscribers.contains_key(r.event.event_name.as_str()))
            .map(|r| (r.event.event_name.clone(), r.event.occurred_on));
        self.ack_measured(&ids, wanted).await;
    }

    /// Acknowledges settled entries in one call, then records the end-to-end latency of the
    /// events a subscriber wanted (`(event name, occurred on)`).
    async fn ack_measured(&self, ids: &[String], wanted: impl Iterator<Item = (String, OffsetDateTime)>) {
        match self.stream.ack(&self.config.stream, &self.config.group, ids).await {
            Ok(_) => {
                let now = OffsetDateTime::now_utc();
                for (name, occurred_on) in wanted {
                    let latency = (now - occurred_on).as_seconds_f64().max(0.0);
                    metrics::histogram!("event_end_to_end_latency_seconds", "event_name" => name).record(latency);
                }
            }
            // Left pending: they will be claimed and found already applied.
            Err(error) => tracing::warn!(%error, count = ids.len(), "ack failed"),
        }
    }

    /// Phase 3: each event whose handler broke a batch counts one failed attempt, then waits
    /// for its backoff like any failure (or, out of attempts, goes on to the other subscribers
    /// and then the DLQ).
    async fn count_culprit_failures(
        self: Arc<Self>,
        deliveries: &[Delivery],
        received: &[Option<ReceivedEvent>],
        culprits: Vec<Culprit>,
        retries: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        for Culprit { index, subscriber, error } in culprits {
            let delivery = &deliveries[index];
            let Some(event) = received[index].as_ref() else { continue };
            metrics::counter!("events_failed_total", "event_name" => event.event.event_name.clone(), "subscriber" => subscriber).increment(1);
            tracing::warn!(subscriber, %error, "Event processing failed");
            match self
                .store
                .record_event_failure(subscriber, event.event.event_id, &error, OffsetDateTime::now_utc())
                .await
            {
                // The other subscribers still get the event, then it is dead-lettered.
                Ok(attempts) if attempts >= self.config.max_attempts => {
                    if let Outcome::Retry { retry_in, exhausted } =
                        self.handle_with(delivery, vec![(subscriber, error.clone(), attempts)], None).await
                    {
                        self.clone().schedule_retry(delivery.clone(), retry_in, exhausted, retries, shutdown.clone());
                    }
                }
                Ok(attempts) => {
                    self.clone().schedule_retry(
                        delivery.clone(),
                        self.config.backoff.delay(attempts),
                        Vec::new(),
                        retries,
                        shutdown.clone(),
                    );
                }
                // Stays pending: claimed again later.
                Err(store_error) => tracing::error!(%store_error, "recording a failed attempt failed"),
            }
        }
    }

    /// Phase 4: the rest one by one: one aggregate in order, aggregates concurrently.
    async fn handle_one_by_one(
        self: &Arc<Self>,
        deliveries: &[Delivery],
        mut rest: Vec<usize>,
        retries: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        rest.sort_unstable();
        let mut by_aggregate: HashMap<String, Vec<usize>> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        for i in rest {
            let key = deliveries[i].entry.fields.get(envelope::AGGREGATE_ID).cloned().unwrap_or_default();
            if !by_aggregate.contains_key(&key) {
                order.push(key.clone());
            }
            by_aggregate.entry(key).or_default().push(i);
        }
        let groups: Vec<Vec<usize>> = order.iter().filter_map(|k| by_aggregate.remove(k)).collect();
        let deferred = match self.applied_before(deliveries, &groups).await {
            Ok(known) => Deferred { known: std::sync::Mutex::new(known), ..Deferred::default() },
            Err(error) => {
                // Left pending: claimed again once the store answers.
                tracing::error!(%error, "could not check which events were applied");
                return;
            }
        };
        let deferred = &deferred;
        futures::stream::iter(groups)
            .for_each_concurrent(self.config.concurrency.max(1), |indices| {
                let this = self.clone();
                async move {
                    for i in indices {
                        let delivery = &deliveries[i];
                        if let Outcome::Retry { retry_in, exhausted } =
                            this.handle_with(delivery, Vec::new(), Some(deferred)).await
                        {
                            this.clone().schedule_retry(
                                delivery.clone(),
                                retry_in,
                                exhausted,
                                retries,
                                shutdown.clone(),
                            );
                        }
                    }
                }
            })
            .await;
        self.settle_deferred(deferred).await;
    }

    /// Which (external subscriber, event) pairs of these entries were applied before: one
    /// query per subscriber for the whole batch.
    async fn applied_before(
        &self,
        deliveries: &[Delivery],
        groups: &[Vec<usize>],
    ) -> Result<HashSet<(&'static str, Uuid)>, StoreError> {
        let mut asked: HashMap<&'static str, Vec<Uuid>> = HashMap::new();
        for i in groups.iter().flatten() {
            let fields = &deliveries[*i].entry.fields;
            let (Some(name), Some(id)) = (
                fields.get(envelope::EVENT_NAME),
                fields.get(envelope::EVENT_ID).and_then(|id| Uuid::parse_str(id).ok()),
            ) else {
                continue;
            };
            for subscriber in self.subscribers.get(name.as_str()).into_iter().flatten() {
                if subscriber.effect() == Effect::External {
                    asked.entry(subscriber.name()).or_default().push(id);
                }
            }
        }
        let mut known = HashSet::new();
        for (subscriber, ids) in asked {
            known.extend(self.store.events_applied(subscriber, &ids).await?.into_iter().map(|id| (subscriber, id)));
        }
        Ok(known)
    }

    /// Ends a batch's one-by-one path: records every external effect it made in one
    /// transaction, then acknowledges the entries settled in one call. If the record fails
    /// they stay pending and are claimed again later (their external effects may repeat, as
    /// the at-least-once contract of [`Effect::External`] allows).
    async fn settle_deferred(&self, deferred: &Deferred) {
        let applied = std::mem::take(&mut *lock(&deferred.applied));
        let settled = std::mem::take(&mut *lock(&deferred.settled));
        if settled.is_empty() {
            return;
        }
        if let Err(error) = self.record_applied(&applied).await {
            tracing::error!(%error, count = settled.len(), "recording applied events failed; entries stay pending");
            return;
        }
        let ids: Vec<String> = settled.iter().map(|(id, _)| id.clone()).collect();
        self.ack_measured(&ids, settled.into_iter().filter_map(|(_, event)| event)).await;
    }

    /// Applies `events` with a database subscriber in one transaction; events it already
    /// applied (or that repeat in the batch) are skipped. All or nothing; a failure names the
    /// event whose handler failed, when it was a handler.
    async fn apply_batch(&self, subscriber: &dyn Subscriber, events: &[&ReceivedEvent]) -> Result<(), BatchFailure> {
        let name = subscriber.name();
        let started = Instant::now();
        let unattributed = |error: StoreError| BatchFailure { culprit: None, error: HandlerError::from(error) };
        let mut uow = self.store.begin().await.map_err(unattributed)?;
        let ids: Vec<Uuid> = events.iter().map(|e| e.event.event_id).collect();
        let mut fresh: HashSet<Uuid> = uow
            .record_events_applied(name, &ids, OffsetDateTime::now_utc())
            .await
            .map_err(unattributed)?
            .into_iter()
            .collect();
        // Positions in `events` of the events to apply now, first occurrence only.
        let positions: Vec<usize> =
            events.iter().enumerate().filter(|(_, e)| fresh.remove(&e.event.event_id)).map(|(i, _)| i).collect();
        let todo: Vec<&ReceivedEvent> = positions.iter().map(|i| events[*i]).collect();
        if !todo.is_empty() {
            subscriber.handle_batch(&todo, uow.as_mut()).await.map_err(|(position, error)| BatchFailure {
                culprit: position.and_then(|p| positions.get(p).copied()),
                error,
            })?;
        }
        uow.commit().await.map_err(unattributed)?;
        if !todo.is_empty() {
            subscriber.committed();
        }
        let per_event_ms = started.elapsed().as_secs_f64() * 1000.0 / todo.len().max(1) as f64;
        for event in todo {
            let event_name = event.event.event_name.clone();
            metrics::counter!("events_processed_total", "event_name" => event_name.clone(), "subscriber" => name)
                .increment(1);
            metrics::histogram!("event_processing_duration_ms", "event_name" => event_name, "subscriber" => name)
                .record(per_event_ms);
        }
        Ok(())
    }

    /// Re-handles `delivery` after `delay`, again and again until it is settled. The entry
    /// stays pending meanwhile and is touched well within the claim threshold, so other
    /// consumers leave it alone; if this process stops, another consumer claims it.
    fn schedule_retry(
        self: Arc<Self>,
        delivery: Delivery,
        delay: Duration,
        exhausted: Vec<(&'static str, String, u32)>,
        retries: &TaskTracker,
        shutdown: CancellationToken,
    ) {
        retries.spawn(async move {
            let mut exhausted = exhausted;
            let touch_every = (self.config.claim_idle / 3).max(Duration::from_millis(20));
            let ids = [delivery.entry.id.clone()];
            let mut delay = delay;
            loop {
                let due = tokio::time::Instant::now() + delay;
                loop {
                    let now = tokio::time::Instant::now();
                    if now >= due {
                        break;
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep((due - now).min(touch_every)) => {}
                    }
                    match self.stream.touch(&self.config.stream, &self.config.group, &self.config.consumer, &ids).await {
                        // No longer pending for this consumer: another one claimed it (this
                        // process looked dead) or it was settled; it is not ours to retry.
                        Ok(0) => {
                            tracing::warn!(entry_id = %delivery.entry.id, "retrying entry was taken over; giving it up");
                            return;
                        }
                        Ok(_) => {}
                        Err(error) => {
                            tracing::warn!(entry_id = %delivery.entry.id, %error, "could not keep a retrying entry");
                        }
                    }
                }
                let event_name = delivery.entry.fields.get(envelope::EVENT_NAME).cloned().unwrap_or_default();
                metrics::counter!("events_retried_total", "event_name" => event_name).increment(1);
                match self.keeping(ids.to_vec(), self.handle_with(&delivery, exhausted.clone(), None)).await {
                    Outcome::Retry { retry_in, exhausted: still } => {
                        delay = retry_in;
                        exhausted = still;
                    }
                    _ => return,
                }
            }
        });
    }

    /// Handles one delivery and settles it (ack, DLQ) when it can.
    pub async fn handle(&self, delivery: &Delivery) -> Outcome {
        self.handle_with(delivery, Vec::new(), None).await
    }

    /// `handle`, for an entry some subscribers of which already ran out of attempts
    /// (`exhausted`: name, last error, attempts): they are not run again, the others are, and
    /// the entry is dead-lettered with all of them once nobody is left to retry.
    ///
    /// With `deferred` (a batch's one-by-one path), an entry every subscriber applied is not
    /// recorded and acknowledged here but handed to `deferred` for the batch's end; the
    /// outcome is then `Done` or `Ignored` before the ack. An entry that must wait for a retry
    /// records its external effects at once, so the retry does not repeat them.
    async fn handle_with(
        &self,
        delivery: &Delivery,
        exhausted: Vec<(&'static str, String, u32)>,
        deferred: Option<&Deferred>,
    ) -> Outcome {
        let fields = &delivery.entry.fields;
        let event = match envelope::from_fields(fields) {
            Ok(event) => event,
            Err(error) => {
                let name = fields.get(envelope::EVENT_NAME).cloned().unwrap_or_default();
                tracing::error!(entry_id = %delivery.entry.id, %error, "Event payload invalid");
                metrics::counter!("events_failed_total", "event_name" => name.clone(), "subscriber" => "").increment(1);
                return self.dead_letter(delivery, None, &error.to_string(), self.config.max_attempts).await;
            }
        };
        let Some(subscribers) = self.subscribers.get(event.event_name.as_str()) else {
            if let Some(deferred) = deferred {
                deferred.settle(&delivery.entry.id, None, Vec::new());
                return Outcome::Ignored;
            }
            return self.ack(delivery, Outcome::Ignored).await;
        };
        let received = ReceivedEvent {
            event: event.clone(),
            entry_id: delivery.entry.id.clone(),
            delivery_count: delivery.delivery_count,
        };
        let span = tracing::info_span!("event.process", event.name = %event.event_name, event.id = %event.event_id);
        crate::trace::set_parent(&span, event.traceparent.as_deref());
        async move {
            let mut retry_in: Option<Duration> = None;
            // Subscribers out of attempts. The others still run (one poisoned subscriber must
            // not cost the rest their effects); the entry is dead-lettered once none of them
            // is left to retry.
            let mut exhausted = exhausted;
            // External effects made now and not recorded yet (only with `deferred`).
            let mut unrecorded: Vec<(&'static str, Uuid)> = Vec::new();
            let given_up: Vec<&'static str> = exhausted.iter().map(|(name, _, _)| *name).collect();
            for subscriber in subscribers.iter().filter(|s| !given_up.contains(&s.name())) {
                match self.apply(subscriber.as_ref(), &received, deferred).await {
                    Ok(Applied::Unrecorded) => unrecorded.push((subscriber.name(), event.event_id)),
                    Ok(Applied::Recorded) => {}
                    Err(error) => {
                        let name = subscriber.name();
                        metrics::counter!("events_failed_total", "event_name" => event.event_name.clone(), "subscriber" => name).increment(1);
                        tracing::warn!(subscriber = name, %error, "Event processing failed");
                        let attempts = match self.store.record_event_failure(name, event.event_id, &error.0, OffsetDateTime::now_utc()).await {
                            Ok(attempts) => attempts,
                            Err(store_error) => {
                                tracing::error!(%store_error, "recording a failed attempt failed");
                                return Outcome::Stuck;
                            }
                        };
                        if attempts >= self.config.max_attempts {
                            exhausted.push((name, error.0, attempts));
                        } else {
                            let delay = self.config.backoff.delay(attempts);
                            retry_in = Some(retry_in.map_or(delay, |d| d.min(delay)));
                        }
                    }
                }
            }
            if let Some(deferred) = deferred {
                if retry_in.is_none() && exhausted.is_empty() {
                    deferred.settle(&delivery.entry.id, Some(&event), unrecorded);
                    return Outcome::Done;
                }
                if let Err(error) = self.record_applied(&unrecorded).await {
                    tracing::error!(%error, "recording applied events failed; entry stays pending");
                    return Outcome::Stuck;
                }
            }
            if let Some(retry_in) = retry_in {
                return Outcome::Retry { retry_in, exhausted };
            }
            if !exhausted.is_empty() {
                let names: Vec<&str> = exhausted.iter().map(|(name, _, _)| *name).collect();
                let errors: Vec<String> = exhausted.iter().map(|(name, error, _)| format!("{name}: {error}")).collect();
                let attempts = exhausted.iter().map(|(_, _, a)| *a).max().unwrap_or(self.config.max_attempts);
                let error = if errors.len() == 1 { exhausted[0].1.clone() } else { errors.join("; ") };
                return self.dead_letter(delivery, Some(&names.join(",")), &error, attempts).await;
            }
            let latency = (OffsetDateTime::now_utc() - event.occurred_on).as_seconds_f64().max(0.0);
            metrics::histogram!("event_end_to_end_latency_seconds", "event_name" => event.event_name.clone()).record(latency);
            self.ack(delivery, Outcome::Done).await
        }
        .instrument(span)
        .await
    }

    /// Runs one subscriber unless it already applied the event. With `deferred`, an external
    /// effect is left for the caller to record (`Applied::Unrecorded`).
    async fn apply(
        &self,
        subscriber: &dyn Subscriber,
        received: &ReceivedEvent,
        deferred: Option<&Deferred>,
    ) -> Result<Applied, HandlerError> {
        let name = subscriber.name();
        let event_id = received.event.event_id;
        let started = Instant::now();
        let (applied, outcome) = match (subscriber.effect(), deferred) {
            (Effect::Database, _) => {
                let mut uow = self.store.begin().await?;
                if !uow.record_event_applied(name, event_id, OffsetDateTime::now_utc()).await? {
                    return Ok(Applied::Recorded);
                }
                subscriber.handle(received, Some(uow.as_mut())).await?;
                uow.commit().await?;
                subscriber.committed();
                (true, Applied::Recorded)
            }
            (Effect::External, Some(deferred)) => {
                if deferred.knows(name, event_id) {
                    return Ok(Applied::Recorded);
                }
                subscriber.handle(received, None).await?;
                (true, Applied::Unrecorded)
            }
            (Effect::External, None) => {
                if self.store.is_event_applied(name, event_id).await? {
                    return Ok(Applied::Recorded);
                }
                subscriber.handle(received, None).await?;
                let mut uow = self.store.begin().await?;
                let first = uow.record_event_applied(name, event_id, OffsetDateTime::now_utc()).await?;
                uow.commit().await?;
                (first, Applied::Recorded)
            }
        };
        if applied {
            let event_name = received.event.event_name.clone();
            metrics::counter!("events_processed_total", "event_name" => event_name.clone(), "subscriber" => name)
                .increment(1);
            metrics::histogram!("event_processing_duration_ms", "event_name" => event_name, "subscriber" => name)
                .record(started.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(outcome)
    }

    /// Records external effects in one transaction.
    async fn record_applied(&self, applied: &[(&'static str, Uuid)]) -> Result<(), StoreError> {
        if applied.is_empty() {
            return Ok(());
        }
        let mut by_subscriber: HashMap<&'static str, Vec<Uuid>> = HashMap::new();
        for (subscriber, id) in applied {
            by_subscriber.entry(subscriber).or_default().push(*id);
        }
        let mut uow = self.store.begin().await?;
        let now = OffsetDateTime::now_utc();
        for (subscriber, ids) in &by_subscriber {
            uow.record_events_applied(subscriber, ids, now).await?;
        }
        uow.commit().await
    }

    async fn ack(&self, delivery: &Delivery, outcome: Outcome) -> Outcome {
        match self.stream.ack(&self.config.stream, &self.config.group, std::slice::from_ref(&delivery.entry.id)).await {
            Ok(_) => outcome,
            Err(error) => {
                // Left pending: it will be claimed and found already applied.
                tracing::warn!(entry_id = %delivery.entry.id, %error, "ack failed");
                Outcome::Stuck
            }
        }
    }

    /// DLQ stream first, `dead_letters` second, ack last; anything failing leaves the entry
    /// pending.
    async fn dead_letter(&self, delivery: &Delivery, subscriber: Option<&str>, error: &str, attempts: u32) -> Outcome {
        let name = delivery.entry.fields.get(envelope::EVENT_NAME).cloned().unwrap_or_default();
        let mut fields: Fields = delivery.entry.fields.clone();
        fields.insert(envelope::DLQ_ERROR.into(), error.to_owned());
        fields.insert(envelope::DLQ_ATTEMPTS.into(), attempts.to_string());
        fields.insert(envelope::DLQ_SUBSCRIBER.into(), subscriber.unwrap_or_default().to_owned());
        fields.insert(envelope::DLQ_FAILED_AT.into(), anna_domain::user::iso(OffsetDateTime::now_utc()));
        let written = match self.stream.append(&self.config.dlq_stream, &fields, None).await {
            Ok(_) => true,
            Err(stream_error) => {
                tracing::error!(%stream_error, "DLQ stream write failed; using dead_letters");
                let letter = DeadLetter {
                    id: Uuid::new_v4(),
                    event: envelope::from_fields(&delivery.entry.fields)
                        .unwrap_or_else(|_| raw_event(&delivery.entry.fields)),
                    error: format!("{}{error}", subscriber.map(|s| format!("{s}: ")).unwrap_or_default()),
                    attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
                    created_at: OffsetDateTime::now_utc(),
                };
                match self.store.insert_dead_letter(&letter).await {
                    Ok(()) => true,
                    Err(store_error) => {
                        tracing::error!(%store_error, "dead_letters write failed; entry stays pending");
                        false
                    }
                }
            }
        };
        if !written {
            return Outcome::Stuck;
        }
        metrics::counter!("events_dead_lettered_total", "event_name" => name, "subscriber" => subscriber.unwrap_or_default().to_owned()).increment(1);
        tracing::error!(entry_id = %delivery.entry.id, subscriber = subscriber.unwrap_or_default(), attempts, "event dead-lettered");
        self.ack(delivery, Outcome::DeadLettered).await
    }

    async fn update_gauges(&self) {
        if let Ok(groups) = self.stream.groups(&self.config.stream).await {
            for group in groups {
                metrics::gauge!("stream_group_lag", "stream" => self.config.stream.clone(), "group" => group.name.clone()).set(group.lag as f64);
                metrics::gauge!("stream_group_pending", "stream" => self.config.stream.clone(), "group" => group.name)
                    .set(group.pending as f64);
            }
        }
        if let Ok(len) = self.stream.len(&self.config.stream).await {
            metrics::gauge!("stream_length", "stream" => self.config.stream.clone()).set(len as f64);
        }
        if let Ok(len) = self.stream.len(&self.config.dlq_stream).await {
            metrics::gauge!("stream_length", "stream" => self.config.dlq_stream.clone()).set(len as f64);
        }
    }

    async fn purge_applied(&self) {
        let before = OffsetDateTime::now_utc().saturating_sub(crate::backoff::to_time(self.config.applied_retention));
        if let Err(error) = self.store.purge_applied_events(before).await {
            tracing::warn!(%error, "purging applied-event records failed");
        }
    }
}

/// How [`EventConsumer::apply`] left an effect.
enum Applied {
    /// Recorded (or applied before): nothing left to do.
    Recorded,
    /// Made, but its record is the caller's to write.
    Unrecorded,
}

/// Which entries of a batch the fast path could not settle.
struct BatchPlan {
    /// Positions of entries for the one-by-one path.
    one_by_one: HashSet<usize>,
    culprits: Vec<Culprit>,
}

/// External effects made by the one-by-one path of a batch, recorded and acknowledged
/// together when the batch ends (see [`EventConsumer::settle_deferred`]).
#[derive(Default)]
struct Deferred {
    /// (subscriber, event) pairs applied before the batch, or during it.
    known: std::sync::Mutex<HashSet<(&'static str, Uuid)>>,
    /// Applied during the batch, not recorded yet.
    applied: std::sync::Mutex<Vec<(&'static str, Uuid)>>,
    /// Entries to acknowledge once `applied` is recorded.
    settled: std::sync::Mutex<Vec<SettledEntry>>,
}

/// An entry of a batch waiting for its ack: its id, and the name and time of the event it
/// carries when a subscriber wanted it (for the end-to-end latency).
type SettledEntry = (String, Option<(String, OffsetDateTime)>);

impl Deferred {
    fn knows(&self, subscriber: &'static str, event_id: Uuid) -> bool {
        lock(&self.known).contains(&(subscriber, event_id))
    }

    /// Entry `entry_id` is settled once `applied` (its external effects) is recorded.
    fn settle(&self, entry_id: &str, event: Option<&DomainEvent>, applied: Vec<(&'static str, Uuid)>) {
        lock(&self.known).extend(applied.iter().copied());
        lock(&self.applied).extend(applied);
        lock(&self.settled).push((entry_id.to_owned(), event.map(|e| (e.event_name.clone(), e.occurred_on))));
    }
}

/// A poisoned lock only means a handler panicked while holding it; the data is still whole.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An event whose handler broke its subscriber's batch.
struct Culprit {
    index: usize,
    subscriber: &'static str,
    error: String,
}

/// The entries' events; `None` for an entry that does not decode (it goes one by one, to
/// be dead-lettered).
fn decode(deliveries: &[Delivery]) -> Vec<Option<ReceivedEvent>> {
    deliveries
        .iter()
        .map(|d| {
            envelope::from_fields(&d.entry.fields).ok().map(|event| ReceivedEvent {
                event,
                entry_id: d.entry.id.clone(),
                delivery_count: d.delivery_count,
            })
        })
        .collect()
}

/// A best-effort event for an entry whose envelope is broken, so it can still be kept.
fn raw_event(fields: &Fields) -> DomainEvent {
    DomainEvent {
        event_id: fields.get(envelope::EVENT_ID).and_then(|v| Uuid::parse_str(v).ok()).unwrap_or_else(Uuid::nil),
        event_name: fields.get(envelope::EVENT_NAME).cloned().unwrap_or_default(),
        aggregate_id: fields.get(envelope::AGGREGATE_ID).cloned().unwrap_or_default(),
        occurred_on: OffsetDateTime::now_utc(),
        tenant_id: fields.get(envelope::TENANT_ID).cloned(),
        payload: serde_json::json!({ "payload": fields.get(envelope::PAYLOAD) }),
        traceparent: fields.get(envelope::TRACEPARENT).cloned(),
    }
}
