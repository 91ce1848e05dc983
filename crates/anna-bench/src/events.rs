//! End-to-end event throughput and latency: commit (outbox) → relay → stream → consumer →
//! subscriber applied, in both shapes, with the raw stream-append and database-commit rates
//! measured in the same run as reference limits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anna_domain::DomainEvent;
use anna_store::{ConnectOptions, SqlStore, Store, UnitOfWork};
use anna_streams::backoff::Backoff;
use anna_streams::consumer::{ConsumerConfig, Effect, EventConsumer, HandlerError, ReceivedEvent, Subscriber};
use anna_streams::relay::{OutboxRelay, RelayConfig};
use anna_streams::{EmbeddedStream, Fields, RedisStream, Stream};
use futures::stream::{self, StreamExt};
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::stats::Summary;

pub(crate) const EVENT_NAME: &str = "bench.event";

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Events pushed end to end in the throughput run, per shape.
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Concurrent producers committing events.
    #[arg(long, default_value_t = 16)]
    producers: usize,
    /// Events per producer transaction in the throughput run.
    #[arg(long, default_value_t = 10)]
    events_per_commit: usize,
    /// Rate of the latency run (events per second, one event per transaction).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Duration of the latency run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Relay loops side by side in the distributed shape (as `OUTBOX_RELAYS`).
    #[arg(long, default_value_t = 2)]
    relays: usize,
    /// Stream readers side by side in the distributed shape (as `EVENTS_READERS`).
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Only these shapes (embedded, distributed).
    #[arg(long, value_delimiter = ',', default_value = "distributed,embedded")]
    shapes: Vec<String>,
}

/// The witness subscriber: counts each event in the same transaction as its applied record,
/// and notes when it was applied.
pub(crate) struct Witness {
    applied_total: std::sync::atomic::AtomicUsize,
    committed_at: Mutex<HashMap<Uuid, Instant>>,
    latencies: Mutex<Vec<Duration>>,
    applied: Notify,
}

#[async_trait::async_trait]
impl Subscriber for Witness {
    fn name(&self) -> &'static str {
        "BenchWitness"
    }
    fn event_names(&self) -> Vec<&'static str> {
        vec![EVENT_NAME]
    }
    fn effect(&self) -> Effect {
        Effect::Database
    }
    async fn handle(&self, event: &ReceivedEvent, uow: Option<&mut dyn UnitOfWork>) -> Result<(), HandlerError> {
        let uow = uow.ok_or_else(|| HandlerError::new("no unit of work"))?;
        self.handle_batch(&[event], uow).await.map_err(|(_, e)| e)
    }

    async fn handle_batch(
        &self,
        events: &[&ReceivedEvent],
        uow: &mut dyn UnitOfWork,
    ) -> Result<(), (Option<usize>, HandlerError)> {
        let Some(last) = events.iter().map(|e| e.event.occurred_on).max() else { return Ok(()) };
        let count = i64::try_from(events.len()).unwrap_or(i64::MAX);
        uow.count_events(EVENT_NAME, count, last).await.map_err(|e| (None, HandlerError::from(e)))?;
        {
            let mut committed = self.committed_at.lock().unwrap_or_else(|e| e.into_inner());
            let mut latencies = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
            for event in events {
                if let Some(at) = committed.remove(&event.event.event_id) {
                    latencies.push(at.elapsed());
                }
            }
        }
        self.applied_total.fetch_add(events.len(), std::sync::atomic::Ordering::Relaxed);
        self.applied.notify_waiters();
        Ok(())
    }
}

impl Witness {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            applied_total: std::sync::atomic::AtomicUsize::new(0),
            committed_at: Mutex::new(HashMap::new()),
            latencies: Mutex::new(Vec::new()),
            applied: Notify::new(),
        })
    }
    /// Waits until `total` events were applied (in committed batches or not yet: the
    /// projection is the final judge).
    pub(crate) async fn wait_counted(&self, total: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.applied.notified();
            if self.applied_total.load(std::sync::atomic::Ordering::Relaxed) >= total {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.applied_total.load(std::sync::atomic::Ordering::Relaxed) >= total;
            }
        }
    }

    fn take_latencies(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.latencies.lock().unwrap_or_else(|e| e.into_inner()))
    }
    fn applied_count(&self) -> usize {
        self.latencies.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

pub(crate) struct Shape {
    pub(crate) label: &'static str,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) stream: Arc<dyn Stream>,
    /// The database, for an `anna` process to share.
    pub(crate) database_url: String,
}

/// The relay the benchmarks run: claims of 1,000, the stream capped at a million entries.
pub(crate) fn relay_config(stream: &str) -> RelayConfig {
    RelayConfig {
        stream: stream.to_owned(),
        batch_size: 1000,
        idle_wait: Duration::from_millis(500),
        lease: Duration::from_secs(30),
        max_attempts: 10,
        backoff: Backoff { base: Duration::from_millis(100), max: Duration::from_secs(5) },
        stream_max_len: Some(1_000_000),
        retention: Duration::from_secs(3600),
    }
}

pub(crate) async fn open_shape(name: &str) -> anyhow::Result<Shape> {
    let options = ConnectOptions { max_connections: 32, ..ConnectOptions::default() };
    match name {
        "embedded" => {
            let database_url = anna_testkit::sqlite::fresh_database_url();
            let sqlite = SqlStore::connect(&database_url, &options).await?;
            sqlite.migrate().await?;
            let pool = sqlite.sqlite_pool().ok_or_else(|| anyhow::anyhow!("not a SQLite store"))?;
            let stream: Arc<dyn Stream> = Arc::new(EmbeddedStream::new(pool));
            Ok(Shape { label: "embedded (SQLite)", store: Arc::new(sqlite), stream, database_url })
        }
        "distributed" => {
            let database_url = anna_testkit::pg::fresh_database_url().await;
            let store = anna_store::connect(&database_url, &options).await?;
            store.migrate().await?;
            let stream: Arc<dyn Stream> = Arc::new(RedisStream::connect(&anna_testkit::redis::shared_url()).await?);
            Ok(Shape { label: "distributed (Postgres+Redis)", store, stream, database_url })
        }
        other => anyhow::bail!("unknown shape {other:?}: expected embedded or distributed"),
    }
}

async fn commit_events(store: &Arc<dyn Store>, witness: &Witness, count: usize) -> anyhow::Result<()> {
    let events: Vec<DomainEvent> = (0..count)
        .map(|_| {
            DomainEvent::new(EVENT_NAME, Uuid::new_v4().to_string(), OffsetDateTime::now_utc(), serde_json::json!({}))
        })
        .collect();
    let mut uow = store.begin().await?;
    uow.append_events(&events).await?;
    // Noted just before the commit, or a fast consumer could apply an event before its commit
    // time is known: latencies include the commit itself.
    let now = Instant::now();
    {
        let mut committed = witness.committed_at.lock().unwrap_or_else(|e| e.into_inner());
        for event in &events {
            committed.insert(event.event_id, now);
        }
    }
    uow.commit().await?;
    Ok(())
}

async fn wait_applied(witness: &Witness, total: usize, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = witness.applied.notified();
        if witness.applied_count() >= total {
            return true;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return witness.applied_count() >= total;
        }
    }
}

pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    println!("{}", Summary::header());
    for name in &args.shapes {
        let shape = open_shape(name).await?;
        for summary in bench_shape(&shape, &args).await? {
            println!("{}", summary.row());
        }
        shape.store.close().await;
    }
    Ok(())
}

async fn bench_shape(shape: &Shape, args: &EventsArgs) -> anyhow::Result<Vec<Summary>> {
    let suffix = Uuid::new_v4().simple().to_string();
    let stream_name = format!("bench-events-{suffix}");
    let mut rows = Vec::new();

    // Reference 1: the database alone, committing outbox rows (no relay running).
    let witness = Witness::new();
    let reference = producer_load(shape, &witness, args.events / 5, args.producers, 1).await?;
    rows.push(Summary::from_latencies(format!("{} db commit, 1 event/tx", shape.label), reference.0, 0, reference.1));
    // Reference 2: the stream alone, appending pipelined batches.
    let started = Instant::now();
    let fields: Vec<Fields> = (0..500).map(|i| Fields::from([("n".to_owned(), i.to_string())])).collect();
    let mut appended = 0;
    while appended < args.events {
        shape
            .stream
            .append_batch(&format!("bench-raw-{suffix}"), &fields, None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        appended += fields.len();
    }
    rows.push(Summary::from_latencies(
        format!("{} stream append x500", shape.label),
        vec![Duration::ZERO; appended],
        0,
        started.elapsed(),
    ));

    // Clean slate: the reference rows must not be relayed into the end-to-end runs.
    let _ = shape.store.purge_published_outbox(OffsetDateTime::now_utc()).await;
    let leftover =
        shape.store.claim_outbox_batch(u32::MAX, Duration::from_secs(3600), OffsetDateTime::now_utc()).await?;
    let ids: Vec<Uuid> = leftover.iter().map(|r| r.id).collect();
    shape.store.mark_outbox_published(&ids, OffsetDateTime::now_utc()).await?;

    let witness = Witness::new();
    let shutdown = CancellationToken::new();
    let embedded = shape.label.starts_with("embedded");
    let relays = if embedded { 1 } else { args.relays.max(1) };
    let readers = if embedded { 1 } else { args.readers.max(1) };
    let mut tasks = Vec::new();
    for n in 0..relays.max(readers) {
        let relay = OutboxRelay::new(shape.store.clone(), shape.stream.clone(), relay_config(&stream_name));
        let consumer = Arc::new(
            EventConsumer::new(
                shape.store.clone(),
                shape.stream.clone(),
                ConsumerConfig {
                    stream: stream_name.clone(),
                    group: "bench".into(),
                    consumer: format!("bench-{suffix}-{n}"),
                    dlq_stream: format!("{stream_name}-dlq"),
                    batch_size: 500,
                    block: Duration::from_millis(500),
                    concurrency: 64,
                    ..ConsumerConfig::default()
                },
            )
            .subscribe(witness.clone()),
        );
        if n < relays {
            let token = shutdown.clone();
            tasks.push(tokio::spawn(async move { relay.run(token).await }));
        }
        if n < readers {
            let token = shutdown.clone();
            tasks.push(tokio::spawn(async move { consumer.run(token).await }));
        }
    }

    // Throughput: producers commit as fast as they can.
    let started = Instant::now();
    producer_load(shape, &witness, args.events, args.producers, args.events_per_commit).await?;
    let complete = wait_applied(&witness, args.events, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    let latencies = witness.take_latencies();
    let missing = args.events.saturating_sub(latencies.len());
    rows.push(Summary::from_latencies(
        format!("{} e2e max, {}/tx", shape.label, args.events_per_commit),
        latencies,
        missing + usize::from(!complete),
        elapsed,
    ));

    // Latency at a fixed rate, one event per transaction.
    let total = usize::try_from(args.rate * args.seconds).unwrap_or(usize::MAX);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.rate.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut in_flight = Vec::new();
    for _ in 0..total {
        ticker.tick().await;
        let store = shape.store.clone();
        let witness = witness.clone();
        in_flight.push(tokio::spawn(async move { commit_events(&store, &witness, 1).await }));
    }
    for task in in_flight {
        task.await??;
    }
    let complete = wait_applied(&witness, total, Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    let latencies = witness.take_latencies();
    let missing = total.saturating_sub(latencies.len());
    rows.push(Summary::from_latencies(
        format!("{} e2e at {}/s", shape.label, args.rate),
        latencies,
        missing + usize::from(!complete),
        elapsed,
    ));

    shutdown.cancel();
    for task in tasks {
        let _ = task.await;
    }
    let counted: i64 =
        shape.store.event_stats().await?.iter().filter(|s| s.event_name == EVENT_NAME).map(|s| s.count).sum();
    let expected = args.events + total;
    anyhow::ensure!(
        counted == i64::try_from(expected).unwrap_or(i64::MAX),
        "applied {counted} events, expected {expected}"
    );
    Ok(rows)
}

/// Commits `total` events from `producers` tasks, `per_commit` per transaction; returns the
/// per-transaction commit latencies and the elapsed time.
async fn producer_load(
    shape: &Shape,
    witness: &Arc<Witness>,
    total: usize,
    producers: usize,
    per_commit: usize,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let per_commit = per_commit.max(1);
    let commits = total.div_ceil(per_commit);
    let started = Instant::now();
    let results: Vec<anyhow::Result<Duration>> = stream::iter(0..commits)
        .map(|_| {
            let store = shape.store.clone();
            let witness = witness.clone();
            async move {
                let sent = Instant::now();
                commit_events(&store, &witness, per_commit).await?;
                Ok(sent.elapsed())
            }
        })
        .buffer_unordered(producers.max(1))
        .collect()
        .await;
    let elapsed = started.elapsed();
    let latencies = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok((latencies, elapsed))
}
