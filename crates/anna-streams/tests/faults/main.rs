//! Fault tests of the event backbone: crashes, restarts and broken dependencies between the
//! outbox, the relay, the stream and the consumer runtime. What they prove: at-least-once
//! delivery, effectively-once effects, no event lost.
//!
//! Every scenario runs against both shapes: Postgres + Redis and SQLite + embedded streams
//! (the Redis restart only against Redis). The witness of effects is an `Effect::Database`
//! subscriber that counts each event in the `event_stats` projection through the runtime's
//! unit of work, so the count commits together with the applied-event record: after each
//! scenario the projection must count exactly the produced events, and each of them must be
//! recorded as applied.
//!
//! Faults are injected with test doubles around the real stream ([`Faulty`]), subscribers that
//! fail or hang on demand ([`Witness`]), aborted tasks (a killed process), a restarted Redis and
//! a renamed table. Timeouts are short (leases and claim thresholds of 400 ms) and every wait
//! polls with a deadline.
//!
//! Scenarios: a relay killed between append and mark (1); a consumer killed inside a handler
//! (2) and between its commit and its ack; a Redis restart (3) and a stream outage while
//! producing; a poison event (4) and its DLQ replay (5); an unwritable DLQ stream, then an
//! unwritable `dead_letters` too (6); a relay whose stream is down (7); a graceful shutdown
//! with a handler in flight.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anna_domain::DomainEvent;
use anna_store::{ConnectOptions, SqlStore, Store, UnitOfWork};
use anna_streams::backoff::Backoff;
use anna_streams::consumer::{ConsumerConfig, Effect, EventConsumer, HandlerError, ReceivedEvent, Subscriber};
use anna_streams::relay::{OutboxRelay, RelayConfig};
use anna_streams::{
    BatchAppendError, Delivery, EmbeddedStream, Entry, Fields, GroupInfo, PendingSummary, RedisStream, Stream,
    StreamError, envelope,
};
use anna_testkit::redis::RedisServer;
use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Bound on anything a test waits for, so that a bug fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);
/// Relay lease and consumer claim threshold: how long a dead relay or consumer holds its work.
const LEASE: Duration = Duration::from_millis(400);
const CLAIM_IDLE: Duration = Duration::from_millis(400);
const TINY_BACKOFF: Backoff = Backoff { base: Duration::from_millis(20), max: Duration::from_millis(50) };
const INJECTED: &str = "injected failure";

macro_rules! both_shapes {
    ($($test:ident),+ $(,)?) => {
        mod postgres_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Shape::postgres_redis(&anna_testkit::redis::shared_url()).await).await;
                }
            )+
        }

        mod sqlite_embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Shape::sqlite_embedded().await).await;
                }
            )+
        }
    };
}

both_shapes!(
    relay_killed_between_append_and_mark,
    consumer_killed_mid_handler,
    a_successor_takes_over_pending_entries_at_once,
    consumer_killed_between_commit_and_ack,
    external_effects_of_a_batch_recorded_before_the_ack,
    poison_event_is_dead_lettered_after_max_attempts,
    dlq_replay_applies_once,
    dlq_stream_unwritable_falls_back_to_dead_letters,
    dead_letters_unwritable_too_keeps_the_entry_pending,
    relay_gives_up_on_a_dead_stream_and_others_keep_flowing,
    graceful_shutdown_finishes_in_flight_handlers,
    stream_outage_while_producing,
    slow_handlers_keep_their_entries,
    a_poisoned_subscriber_does_not_cost_the_others_their_effects,
);

mod postgres_redis_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_restart_mid_stream() {
        super::redis_restart_mid_stream().await;
    }
}

// ---- shapes ---------------------------------------------------------------------------------

/// A raw connection to the test database, for what the store does not expose (attempt
/// counters) and for breaking it on purpose.
enum Db {
    Pg(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Db {
    /// `event_attempts.attempts` of one subscriber on one event (0 without a row).
    async fn event_attempts(&self, subscriber: &str, event_id: Uuid) -> i64 {
        match self {
            Db::Pg(pool) => sqlx::query_scalar(
                "SELECT COALESCE(SUM(attempts), 0)::bigint FROM event_attempts WHERE subscriber = $1 AND event_id = $2",
            )
            .bind(subscriber)
            .bind(event_id)
            .fetch_one(pool)
            .await
            .unwrap(),
            Db::Sqlite(pool) => sqlx::query_scalar(
                "SELECT COALESCE(SUM(attempts), 0) FROM event_attempts WHERE subscriber = ?1 AND event_id = ?2",
            )
            .bind(subscriber)
            .bind(event_id.to_string())
            .fetch_one(pool)
            .await
            .unwrap(),
        }
    }

    async fn execute(&self, sql: &'static str) {
        match self {
            Db::Pg(pool) => sqlx::query(sql).execute(pool).await.map(drop),
            Db::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    async fn count(&self, sql: &'static str) -> i64 {
        match self {
            Db::Pg(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            Db::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// One deployment shape on fresh storage, with stream names of its own.
struct Shape {
    label: &'static str,
    store: Arc<dyn Store>,
    /// The real stream; scenarios wrap it when they inject faults.
    stream: Arc<dyn Stream>,
    db: Db,
    stream_name: String,
    group: String,
    dlq: String,
}

impl Shape {
    async fn postgres_redis(redis_url: &str) -> Shape {
        let url = anna_testkit::pg::fresh_database_url().await;
        let store = anna_store::connect(&url, &ConnectOptions::default()).await.unwrap();
        store.migrate().await.unwrap();
        let stream: Arc<dyn Stream> = Arc::new(RedisStream::connect(redis_url).await.unwrap());
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await.unwrap();
        Shape::named("postgres+redis", store, stream, Db::Pg(pool))
    }

    async fn sqlite_embedded() -> Shape {
        let url = anna_testkit::sqlite::fresh_database_url();
        let sqlite = SqlStore::connect(&url, &ConnectOptions::default()).await.unwrap();
        sqlite.migrate().await.unwrap();
        let pool = sqlite.sqlite_pool().unwrap_or_else(|| panic!("a SQLite store"));
        let stream: Arc<dyn Stream> = Arc::new(EmbeddedStream::new(pool.clone()));
        Shape::named("sqlite+embedded", Arc::new(sqlite), stream, Db::Sqlite(pool))
    }

    fn named(label: &'static str, store: Arc<dyn Store>, stream: Arc<dyn Stream>, db: Db) -> Shape {
        // Unique names: the Redis server is shared by every test of the process.
        let suffix = Uuid::new_v4().simple();
        Shape {
            label,
            store,
            stream,
            db,
            stream_name: format!("faults-{suffix}"),
            group: format!("faults-group-{suffix}"),
            dlq: format!("faults-{suffix}-dlq"),
        }
    }

    fn relay_config(&self) -> RelayConfig {
        RelayConfig {
            stream: self.stream_name.clone(),
            batch_size: 100,
            idle_wait: Duration::from_millis(100),
            lease: LEASE,
            max_attempts: 10,
            backoff: TINY_BACKOFF,
            stream_max_len: None,
            ..RelayConfig::default()
        }
    }

    fn consumer_config(&self, consumer: &str) -> ConsumerConfig {
        ConsumerConfig {
            stream: self.stream_name.clone(),
            group: self.group.clone(),
            consumer: consumer.to_owned(),
            dlq_stream: self.dlq.clone(),
            max_attempts: 5,
            backoff: TINY_BACKOFF,
            claim_idle: CLAIM_IDLE,
            claim_interval: Duration::from_millis(100),
            batch_size: 50,
            block: Duration::from_millis(100),
            concurrency: 16,
            ..ConsumerConfig::default()
        }
    }

    fn start_relay(&self, stream: Arc<dyn Stream>, config: RelayConfig) -> Worker {
        let relay = OutboxRelay::new(self.store.clone(), stream, config);
        Worker::spawn(|token| async move { relay.run(token).await })
    }

    fn start_consumer(&self, stream: Arc<dyn Stream>, config: ConsumerConfig, witnesses: &[&Arc<Witness>]) -> Worker {
        let consumer = witnesses.iter().fold(EventConsumer::new(self.store.clone(), stream, config), |c, w| {
            c.subscribe(Arc::clone(w) as Arc<dyn Subscriber>)
        });
        let consumer = Arc::new(consumer);
        Worker::spawn(|token| async move { consumer.run(token).await })
    }

    /// Commits `n` units of work, each appending one event of its own aggregate.
    async fn produce(&self, event_name: &str, aggregate_prefix: &str, n: usize) -> Vec<DomainEvent> {
        let mut events = Vec::with_capacity(n);
        for i in 0..n {
            events.push(self.produce_batch(event_name, &format!("{aggregate_prefix}-{i}"), 1).await.remove(0));
        }
        events
    }

    /// Commits one unit of work appending `n` events, one per aggregate `<prefix>-<k>`.
    async fn produce_batch(&self, event_name: &str, aggregate_prefix: &str, n: usize) -> Vec<DomainEvent> {
        let events: Vec<DomainEvent> = (0..n)
            .map(|k| {
                let aggregate = if n == 1 { aggregate_prefix.to_owned() } else { format!("{aggregate_prefix}-{k}") };
                DomainEvent::new(event_name, aggregate, OffsetDateTime::now_utc(), serde_json::json!({ "k": k }))
            })
            .collect();
        let mut uow = self.store.begin().await.unwrap();
        uow.append_events(&events).await.unwrap();
        uow.commit().await.unwrap();
        events
    }

    async fn stream_len(&self, stream: &str) -> Result<u64, String> {
        self.stream.len(stream).await.map_err(|e| e.to_string())
    }

    async fn read_all(&self, stream: &str) -> Vec<Entry> {
        let mut all: Vec<Entry> = Vec::new();
        loop {
            let after = all.last().map_or_else(|| "0".to_owned(), |e| e.id.clone());
            let page = self.stream.read_after(stream, &after, 100, Duration::ZERO).await.unwrap();
            if page.is_empty() {
                return all;
            }
            all.extend(page);
        }
    }

    async fn group_info(&self) -> Result<GroupInfo, String> {
        let groups = self.stream.groups(&self.stream_name).await.map_err(|e| e.to_string())?;
        groups.into_iter().find(|g| g.name == self.group).ok_or_else(|| "no group yet".to_owned())
    }

    async fn pending(&self) -> PendingSummary {
        self.stream.pending(&self.stream_name, &self.group).await.unwrap()
    }

    /// Every entry of the main stream delivered to the group and acknowledged.
    async fn settled(&self) -> Result<(), String> {
        let group = self.group_info().await?;
        if group.pending == 0 && group.lag == 0 { Ok(()) } else { Err(format!("group not settled: {group:?}")) }
    }

    async fn not_applied(&self, witness: &Witness, events: &[DomainEvent]) -> Vec<Uuid> {
        let mut missing = Vec::new();
        for event in events {
            if !self.store.is_event_applied(witness.name, event.event_id).await.unwrap() {
                missing.push(event.event_id);
            }
        }
        missing
    }

    /// Waits until `witness` applied every event and the group has nothing left to do.
    /// Produces `n` events of `aggregate`, publishes them, lets a consumer "consumer-a" take
    /// every one and hang in `witness`'s handler, then kills it (its handlers' transactions
    /// roll back) and lets the witness answer again. Returns the events and the relay.
    async fn killed_holding_every_entry(
        &self,
        witness: &Arc<Witness>,
        event_name: &str,
        aggregate: &str,
        n: usize,
    ) -> (Vec<DomainEvent>, Worker) {
        witness.hang.store(true, Ordering::SeqCst);
        let events = self.produce(event_name, aggregate, n).await;
        let relay = self.start_relay(self.stream.clone(), self.relay_config());
        eventually("published", async || {
            let len = self.stream_len(&self.stream_name).await?;
            if len >= n as u64 { Ok(()) } else { Err(format!("stream length {len}")) }
        })
        .await;
        let a = self.start_consumer(self.stream.clone(), self.consumer_config("consumer-a"), &[witness]);
        eventually("consumer A holds every entry and hangs in a handler", async || {
            let pending = self.stream.pending(&self.stream_name, &self.group).await.map_err(|e| e.to_string())?;
            let held = pending.consumers.get("consumer-a").copied().unwrap_or(0);
            let hanging = witness.hanging.load(Ordering::SeqCst);
            if held == n as u64 && hanging >= 1 { Ok(()) } else { Err(format!("A holds {held}, {hanging} hanging")) }
        })
        .await;
        a.kill().await;
        witness.hang.store(false, Ordering::SeqCst);
        (events, relay)
    }

    async fn wait_applied(&self, witness: &Witness, events: &[DomainEvent]) {
        eventually(&format!("[{}] {} applies {} events", self.label, witness.name, events.len()), async || {
            let missing = self.not_applied(witness, events).await;
            if !missing.is_empty() {
                return Err(format!("{} not applied yet", missing.len()));
            }
            self.settled().await
        })
        .await;
    }

    async fn stat(&self, name: &str) -> i64 {
        let stats = self.store.event_stats().await.unwrap();
        stats.iter().find(|s| s.event_name == name).map_or(0, |s| s.count)
    }

    /// The guarantee: every event applied (none missing), each effect counted once (none
    /// applied twice).
    async fn assert_exactly_once(&self, witness: &Witness, events: &[DomainEvent]) {
        let missing = self.not_applied(witness, events).await;
        assert!(missing.is_empty(), "[{}] {} never applied: {missing:?}", self.label, witness.name);
        assert_eq!(
            self.stat(&witness.stat).await,
            i64::try_from(events.len()).unwrap(),
            "[{}] effects of {} counted in event_stats[{}]",
            self.label,
            witness.name,
            witness.stat
        );
    }
}

/// A relay or consumer task with its shutdown token.
struct Worker {
    token: CancellationToken,
    handle: JoinHandle<()>,
}

impl Worker {
    fn spawn<F, Fut>(run: F) -> Worker
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let token = CancellationToken::new();
        let handle = tokio::spawn(run(token.clone()));
        Worker { token, handle }
    }

    /// Graceful stop.
    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(PATIENCE, self.handle).await.expect("worker did not stop").unwrap();
    }

    /// A crash: the task is dropped wherever it is, as a killed process would stop.
    async fn kill(self) {
        self.handle.abort();
        let ended = self.handle.await;
        assert!(ended.is_err_and(|e| e.is_cancelled()), "the worker was not running any more");
    }
}

/// Polls `probe` until it succeeds; panics with its last complaint after [`PATIENCE`].
async fn eventually(what: &str, mut probe: impl AsyncFnMut() -> Result<(), String>) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match probe().await {
            Ok(()) => return,
            Err(state) if Instant::now() > deadline => panic!("{what}: not reached within {PATIENCE:?}: {state}"),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

fn field<'a>(entry: &'a Entry, name: &str) -> &'a str {
    entry.fields.get(name).map_or("", String::as_str)
}

// ---- test doubles ---------------------------------------------------------------------------

/// The witness subscriber: counts each event in `event_stats` (key `stat`) through the
/// runtime's unit of work, and records every invocation. Fails for one event id, hangs, or
/// takes its time, on demand.
struct Witness {
    name: &'static str,
    event_name: &'static str,
    stat: String,
    /// Delivery counts of every invocation, per event id.
    calls: Mutex<HashMap<Uuid, Vec<u64>>>,
    fail_for: Mutex<Option<Uuid>>,
    hang: AtomicBool,
    hanging: AtomicUsize,
    delay: Duration,
    /// An e-mail-like subscriber: external effect, nothing in the database.
    external: bool,
    /// Fails this many calls first (a flaky provider), then works.
    flaky: AtomicUsize,
    started: AtomicUsize,
    finished: AtomicUsize,
}

impl Witness {
    fn new(name: &'static str, event_name: &'static str) -> Witness {
        Witness {
            name,
            event_name,
            stat: event_name.to_owned(),
            calls: Mutex::default(),
            fail_for: Mutex::default(),
            hang: AtomicBool::new(false),
            hanging: AtomicUsize::new(0),
            delay: Duration::ZERO,
            external: false,
            flaky: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
        }
    }

    /// Counts under another `event_stats` key, so two witnesses of one event name do not mix.
    fn counting_as(mut self, stat: String) -> Witness {
        self.stat = stat;
        self
    }

    fn slow(mut self, delay: Duration) -> Witness {
        self.delay = delay;
        self
    }

    fn external(mut self) -> Witness {
        self.external = true;
        self
    }

    fn fail_for(&self, event_id: Option<Uuid>) {
        *self.fail_for.lock().unwrap() = event_id;
    }

    fn calls_for(&self, event_id: Uuid) -> Vec<u64> {
        self.calls.lock().unwrap().get(&event_id).cloned().unwrap_or_default()
    }
}

#[async_trait]
impl Subscriber for Witness {
    fn name(&self) -> &'static str {
        self.name
    }

    fn event_names(&self) -> Vec<&'static str> {
        vec![self.event_name]
    }

    fn effect(&self) -> Effect {
        if self.external { Effect::External } else { Effect::Database }
    }

    async fn handle(&self, received: &ReceivedEvent, uow: Option<&mut dyn UnitOfWork>) -> Result<(), HandlerError> {
        let event_id = received.event.event_id;
        self.calls.lock().unwrap().entry(event_id).or_default().push(received.delivery_count);
        self.started.fetch_add(1, Ordering::SeqCst);
        if self.hang.load(Ordering::SeqCst) {
            // Inside the runtime's open transaction: a crash now must roll everything back.
            self.hanging.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        let flaky = self.flaky.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        let fail = flaky || *self.fail_for.lock().unwrap() == Some(event_id);
        if fail {
            return Err(HandlerError::new(INJECTED));
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if !self.external {
            let uow = uow.ok_or_else(|| HandlerError::new("a database subscriber got no unit of work"))?;
            uow.count_event(&self.stat, received.event.occurred_on).await?;
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The real stream with switchable faults.
struct Faulty {
    inner: Arc<dyn Stream>,
    /// Every call that reads or writes the stream fails (a network cut or a crashed server).
    down: AtomicBool,
    /// `append_batch` appends, then never returns (the relay dies before marking).
    hang_after_batch: AtomicBool,
    /// `ack` never returns (the consumer dies between its commit and its ack).
    hang_acks: AtomicBool,
    /// `append_batch` fails without appending anything (the stream is down).
    batches_fail: AtomicBool,
    /// `append` to this stream fails (an unwritable DLQ).
    appends_fail_to: Mutex<Option<String>>,
    /// When each failed `append_batch` happened, with the outbox ids it carried.
    failed_batches: Mutex<Vec<(Instant, Vec<String>)>>,
    /// Errors the real stream returned, per method.
    errors: Mutex<HashMap<&'static str, usize>>,
}

impl Faulty {
    fn new(inner: Arc<dyn Stream>) -> Faulty {
        Faulty {
            inner,
            down: AtomicBool::new(false),
            hang_after_batch: AtomicBool::new(false),
            hang_acks: AtomicBool::new(false),
            batches_fail: AtomicBool::new(false),
            appends_fail_to: Mutex::default(),
            failed_batches: Mutex::default(),
            errors: Mutex::default(),
        }
    }

    fn up(&self) -> Result<(), StreamError> {
        if self.down.load(Ordering::SeqCst) { Err(injected_error()) } else { Ok(()) }
    }

    fn seen<T>(&self, method: &'static str, result: Result<T, StreamError>) -> Result<T, StreamError> {
        if result.is_err() {
            *self.errors.lock().unwrap().entry(method).or_default() += 1;
        }
        result
    }
}

fn injected_error() -> StreamError {
    StreamError::Protocol(INJECTED.to_owned())
}

#[async_trait]
impl Stream for Faulty {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn ping(&self) -> Result<(), StreamError> {
        self.inner.ping().await
    }

    async fn append(&self, stream: &str, fields: &Fields, max_len: Option<u64>) -> Result<String, StreamError> {
        self.up()?;
        let broken = self.appends_fail_to.lock().unwrap().as_deref() == Some(stream);
        if broken {
            return Err(injected_error());
        }
        self.seen("append", self.inner.append(stream, fields, max_len).await)
    }

    async fn append_batch(
        &self,
        stream: &str,
        entries: &[Fields],
        max_len: Option<u64>,
    ) -> Result<Vec<String>, BatchAppendError> {
        self.up().map_err(|error| BatchAppendError { appended: Vec::new(), error })?;
        if self.batches_fail.load(Ordering::SeqCst) {
            let outbox_ids = entries.iter().map(|f| f.get(envelope::OUTBOX_ID).cloned().unwrap_or_default()).collect();
            self.failed_batches.lock().unwrap().push((Instant::now(), outbox_ids));
            return Err(BatchAppendError { appended: Vec::new(), error: injected_error() });
        }
        let ids = self.inner.append_batch(stream, entries, max_len).await.inspect_err(|_| {
            *self.errors.lock().unwrap().entry("append_batch").or_default() += 1;
        })?;
        if self.hang_after_batch.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(ids)
    }

    async fn create_group(&self, stream: &str, group: &str) -> Result<(), StreamError> {
        self.up()?;
        self.inner.create_group(stream, group).await
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>, StreamError> {
        self.up()?;
        self.seen("read_group", self.inner.read_group(stream, group, consumer, count, block).await)
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64, StreamError> {
        self.up()?;
        if self.hang_acks.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.seen("ack", self.inner.ack(stream, group, ids).await)
    }

    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Delivery>, StreamError> {
        self.up()?;
        self.seen("claim_idle", self.inner.claim_idle(stream, group, consumer, min_idle, count).await)
    }

    async fn touch(&self, stream: &str, group: &str, consumer: &str, ids: &[String]) -> Result<u64, StreamError> {
        self.up()?;
        self.seen("touch", self.inner.touch(stream, group, consumer, ids).await)
    }

    async fn delete(&self, stream: &str, ids: &[String]) -> Result<u64, StreamError> {
        self.inner.delete(stream, ids).await
    }

    async fn pending(&self, stream: &str, group: &str) -> Result<PendingSummary, StreamError> {
        self.inner.pending(stream, group).await
    }

    async fn read_after(
        &self,
        stream: &str,
        after: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, StreamError> {
        self.inner.read_after(stream, after, count, block).await
    }

    async fn last_id(&self, stream: &str) -> Result<Option<String>, StreamError> {
        self.inner.last_id(stream).await
    }

    async fn len(&self, stream: &str) -> Result<u64, StreamError> {
        self.inner.len(stream).await
    }

    async fn groups(&self, stream: &str) -> Result<Vec<GroupInfo>, StreamError> {
        self.inner.groups(stream).await
    }
}

// ---- 1. relay killed between append and mark ------------------------------------------------

async fn relay_killed_between_append_and_mark(shape: Shape) {
    const EVENT: &str = "test.fault.1";
    const N: usize = 6;
    let witness = Arc::new(Witness::new("fault-1-witness", EVENT));
    let consumer = shape.start_consumer(shape.stream.clone(), shape.consumer_config("c1"), &[&witness]);
    let events = shape.produce(EVENT, "agg-1", N).await;

    // The first relay appends the whole batch, then dies before marking it published.
    let faulty = Arc::new(Faulty::new(shape.stream.clone()));
    faulty.hang_after_batch.store(true, Ordering::SeqCst);
    let doomed = shape.start_relay(faulty, shape.relay_config());
    eventually("the first relay appended the batch", async || {
        let len = shape.stream_len(&shape.stream_name).await?;
        if len >= N as u64 { Ok(()) } else { Err(format!("stream length {len}")) }
    })
    .await;
    doomed.kill().await;
    let status = shape.store.outbox_status().await.unwrap();
    assert_eq!(status.processing, N as u64, "[{}] rows stay processing under the dead relay's lease", shape.label);

    // A fresh relay takes the rows over once the lease runs out and publishes them again.
    let relay = shape.start_relay(shape.stream.clone(), shape.relay_config());
    eventually("the fresh relay re-published every row", async || {
        let status = shape.store.outbox_status().await.map_err(|e| e.to_string())?;
        let len = shape.stream_len(&shape.stream_name).await?;
        if status.pending + status.processing == 0 && len >= 2 * N as u64 {
            Ok(())
        } else {
            Err(format!("{status:?}, stream length {len}"))
        }
    })
    .await;
    shape.wait_applied(&witness, &events).await;

    let len = shape.stream_len(&shape.stream_name).await.unwrap();
    assert!(len > N as u64, "[{}] duplicates expected in the stream, length {len}", shape.label);
    shape.assert_exactly_once(&witness, &events).await;
    // The duplicates found their event applied and never reached the handler.
    for event in &events {
        assert_eq!(witness.calls_for(event.event_id).len(), 1, "[{}] handler runs for {}", shape.label, event.event_id);
    }
    relay.stop().await;
    consumer.stop().await;
}

// ---- 2. consumer killed mid-handler ---------------------------------------------------------

async fn consumer_killed_mid_handler(shape: Shape) {
    const EVENT: &str = "test.fault.2";
    // Fewer than the store's 10 connections: each hanging handler holds one.
    const N: usize = 6;
    let witness = Arc::new(Witness::new("fault-2-witness", EVENT));
    let (events, relay) = shape.killed_holding_every_entry(&witness, EVENT, "agg-2", N).await;
    // The killed handlers' transactions rolled back: nothing applied, nothing counted.
    assert_eq!(shape.not_applied(&witness, &events).await.len(), N, "[{}] applied by the dead consumer", shape.label);
    assert_eq!(shape.stat(EVENT).await, 0, "[{}] counted by the dead consumer", shape.label);

    let b = shape.start_consumer(shape.stream.clone(), shape.consumer_config("consumer-b"), &[&witness]);
    shape.wait_applied(&witness, &events).await;
    shape.assert_exactly_once(&witness, &events).await;
    for event in &events {
        let calls = witness.calls_for(event.event_id);
        let last = calls.last().copied().unwrap_or(0);
        assert!(last >= 2, "[{}] B applied {} without claiming it: deliveries {calls:?}", shape.label, event.event_id);
    }
    assert_eq!(shape.pending().await.count, 0);
    b.stop().await;
    relay.stop().await;
}

/// A consumer that knows it is the stream's only one (a sessions worker that acquired the
/// partition) takes over its dead predecessor's pending entries at once, not after the
/// idle-claim threshold, and applies each once.
async fn a_successor_takes_over_pending_entries_at_once(shape: Shape) {
    const EVENT: &str = "test.fault.takeover";
    const N: usize = 6;
    let witness = Arc::new(Witness::new("takeover-witness", EVENT));
    let (events, relay) = shape.killed_holding_every_entry(&witness, EVENT, "agg-takeover", N).await;
    // An idle claim would wait an hour: only the takeover at start can get them.
    let config = ConsumerConfig {
        claim_idle: Duration::from_secs(3600),
        claim_pending_at_start: true,
        ..shape.consumer_config("consumer-b")
    };
    let b = shape.start_consumer(shape.stream.clone(), config, &[&witness]);
    shape.wait_applied(&witness, &events).await;
    shape.assert_exactly_once(&witness, &events).await;
    assert_eq!(shape.pending().await.count, 0);
    b.stop().await;
    relay.stop().await;
}

/// Not in the list, but the other crash point of a consumer: the effects are committed, the
/// ack never happens. Another consumer claims the entries and must not apply them again.
async fn consumer_killed_between_commit_and_ack(shape: Shape) {
    const EVENT: &str = "test.fault.2b";
    const N: usize = 6;
    let witness = Arc::new(Witness::new("fault-2b-witness", EVENT));
    let events = shape.produce(EVENT, "agg-2b", N).await;
    let relay = shape.start_relay(shape.stream.clone(), shape.relay_config());
    // Published before A starts, so that A reads all of them at once (its ack never returns).
    eventually("published", async || {
        let len = shape.stream_len(&shape.stream_name).await?;
        if len >= N as u64 { Ok(()) } else { Err(format!("stream length {len}")) }
    })
    .await;
    let stream = Arc::new(Faulty::new(shape.stream.clone()));
    stream.hang_acks.store(true, Ordering::SeqCst);
    let a = shape.start_consumer(stream, shape.consumer_config("consumer-a"), &[&witness]);
    eventually("consumer A applied everything", async || {
        let missing = shape.not_applied(&witness, &events).await.len();
        if missing == 0 { Ok(()) } else { Err(format!("{missing} not applied")) }
    })
    .await;
    a.kill().await;
    let pending = shape.pending().await;
    assert_eq!(pending.count, N as u64, "[{}] A never acknowledged: {pending:?}", shape.label);

    let b = shape.start_consumer(shape.stream.clone(), shape.consumer_config("consumer-b"), &[&witness]);
    shape.wait_applied(&witness, &events).await;
    shape.assert_exactly_once(&witness, &events).await;
    for event in &events {
        let calls = witness.calls_for(event.event_id);
        assert_eq!(
            calls.len(),
            1,
            "[{}] handler re-run for {} after the claim: {calls:?}",
            shape.label,
            event.event_id
        );
    }
    b.stop().await;
    relay.stop().await;
}

/// The crash point for subscribers with external effects, whose records a batch writes together
/// at its end: they must be committed before the ack, so a consumer that dies after them is
/// not re-run elsewhere. The batch also carries a second copy of one entry (a relay that died
/// between append and mark publishes a row twice): applied once.
async fn external_effects_of_a_batch_recorded_before_the_ack(shape: Shape) {
    const EVENT: &str = "test.fault.2c";
    const N: usize = 6;
    let witness = Arc::new(Witness::new("fault-2c-witness", EVENT).external());
    let events = shape.produce(EVENT, "agg-2c", N).await;
    let relay = shape.start_relay(shape.stream.clone(), shape.relay_config());
    eventually("published", async || {
        let len = shape.stream_len(&shape.stream_name).await?;
        if len >= N as u64 { Ok(()) } else { Err(format!("stream length {len}")) }
    })
    .await;
    relay.stop().await;
    let first = shape.read_all(&shape.stream_name).await.remove(0);
    shape.stream.append(&shape.stream_name, &first.fields, None).await.unwrap();

    let stream = Arc::new(Faulty::new(shape.stream.clone()));
    stream.hang_acks.store(true, Ordering::SeqCst);
    let a = shape.start_consumer(stream, shape.consumer_config("consumer-a"), &[&witness]);
    eventually("consumer A applied and recorded everything", async || {
        let missing = shape.not_applied(&witness, &events).await.len();
        if missing == 0 { Ok(()) } else { Err(format!("{missing} not recorded")) }
    })
    .await;
    a.kill().await;
    let pending = shape.pending().await;
    assert_eq!(pending.count, N as u64 + 1, "[{}] A never acknowledged: {pending:?}", shape.label);

    let b = shape.start_consumer(shape.stream.clone(), shape.consumer_config("consumer-b"), &[&witness]);
    eventually("B settled every entry", async || shape.settled().await).await;
    for event in &events {
        let calls = witness.calls_for(event.event_id);
        assert_eq!(calls.len(), 1, "[{}] external effect repeated for {}: {calls:?}", shape.label, event.event_id);
    }
    b.stop().await;
}

// ---- 3. Redis restart mid-stream ------------------------------------------------------------

const OUTAGE_EVENT: &str = "test.fault.3";
const UNITS: usize = 60;
const PER_UNIT: usize = 4;

/// The relay's retry budget must outlast the outages below (at least 1.6 s of backoff before
/// a row fails for good), or rows would rightly end `failed`.
fn patient_relay_config(shape: &Shape) -> RelayConfig {
    RelayConfig {
        backoff: Backoff { base: Duration::from_millis(50), max: Duration::from_millis(500) },
        max_attempts: 10,
        ..shape.relay_config()
    }
}

/// Commits `UNITS` units of work of `PER_UNIT` events (several per unit, as requests do, each
/// of its own aggregate), 10 ms apart; what was committed lands in the returned list.
fn spawn_producer(shape: Arc<Shape>) -> (JoinHandle<()>, Arc<Mutex<Vec<DomainEvent>>>) {
    let produced = Arc::new(Mutex::new(Vec::<DomainEvent>::new()));
    let producer = tokio::spawn({
        let produced = produced.clone();
        async move {
            for unit in 0..UNITS {
                let events = shape.produce_batch(OUTAGE_EVENT, &format!("agg-3-{unit}"), PER_UNIT).await;
                produced.lock().unwrap().extend(events);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    (producer, produced)
}

async fn wait_until_flowing(witness: &Witness) {
    eventually("events flow before the fault", async || {
        let finished = witness.finished.load(Ordering::SeqCst);
        if finished >= 3 * PER_UNIT { Ok(()) } else { Err(format!("{finished} applied")) }
    })
    .await;
}

/// Everything the producer committed is applied exactly once, and no outbox row was given up
/// (a `failed` row is an event that never reaches anyone without an operator).
async fn assert_nothing_lost(
    shape: &Shape,
    witness: &Witness,
    producer: JoinHandle<()>,
    produced: &Mutex<Vec<DomainEvent>>,
) {
    tokio::time::timeout(PATIENCE, producer).await.expect("the producer got stuck").unwrap();
    let events = produced.lock().unwrap().clone();
    assert!(events.len() >= UNITS * PER_UNIT);
    eventually(&format!("[{}] every produced event applied after the fault", shape.label), async || {
        let status = shape.store.outbox_status().await.map_err(|e| e.to_string())?;
        if status.failed > 0 {
            let mut failed = Vec::new();
            for event in &events {
                for row in shape.store.outbox_events_for_aggregate(&event.aggregate_id).await.unwrap() {
                    if row.status == "failed" {
                        failed.push(format!("{} (attempts {}, {:?})", row.id, row.attempts, row.last_error));
                    }
                }
            }
            panic!(
                "[{}] {} outbox rows failed for good during a short outage, so their events are lost: {}",
                shape.label,
                status.failed,
                failed.join("; ")
            );
        }
        let missing = shape.not_applied(witness, &events).await;
        if !missing.is_empty() {
            return Err(format!("{} not applied, outbox {status:?}", missing.len()));
        }
        shape.settled().await
    })
    .await;
    shape.assert_exactly_once(witness, &events).await;
    let status = shape.store.outbox_status().await.unwrap();
    assert_eq!((status.pending, status.processing, status.failed), (0, 0, 0), "[{}] {status:?}", shape.label);
}

/// A real SIGKILL and restart of a persistent Redis while events are produced, relayed and
/// consumed; the same relay and consumer objects carry on.
async fn redis_restart_mid_stream() {
    let server = RedisServer::start(true);
    let shape = Arc::new(Shape::postgres_redis(&server.url()).await);
    let witness = Arc::new(Witness::new("fault-3-witness", OUTAGE_EVENT));
    // Pass-through wrappers, only to report what the restart cost each side.
    let relay_stream = Arc::new(Faulty::new(shape.stream.clone()));
    let consumer_stream = Arc::new(Faulty::new(shape.stream.clone()));
    let relay = shape.start_relay(relay_stream.clone(), patient_relay_config(&shape));
    let consumer = shape.start_consumer(consumer_stream.clone(), shape.consumer_config("c3"), &[&witness]);
    let (producer, produced) = spawn_producer(shape.clone());
    wait_until_flowing(&witness).await;

    let restarting = Instant::now();
    let server = tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.restart();
        server
    })
    .await
    .unwrap();
    let restart_took = restarting.elapsed();
    assert_nothing_lost(&shape, &witness, producer, &produced).await;
    eprintln!(
        "redis restart took {restart_took:?}; stream errors seen by the relay {:?}, by the consumer {:?}",
        relay_stream.errors.lock().unwrap(),
        consumer_stream.errors.lock().unwrap()
    );
    relay.stop().await;
    consumer.stop().await;
    // Stops the server only after the workers, which would otherwise log reconnect errors.
    tokio::task::spawn_blocking(move || drop(server)).await.unwrap();
}

/// The Redis client rides out a real restart (tens of ms) by reconnecting and retrying, so the
/// relay and consumer hardly see it. This one makes every stream call fail for 600 ms while
/// events are produced, on both shapes: well within the relay's retry budget, so nothing may
/// end up `failed` and everything must be applied exactly once.
async fn stream_outage_while_producing(shape: Shape) {
    let shape = Arc::new(shape);
    let witness = Arc::new(Witness::new("fault-3-witness", OUTAGE_EVENT));
    let stream = Arc::new(Faulty::new(shape.stream.clone()));
    let relay = shape.start_relay(stream.clone(), patient_relay_config(&shape));
    let consumer = shape.start_consumer(stream.clone(), shape.consumer_config("c3"), &[&witness]);
    let (producer, produced) = spawn_producer(shape.clone());
    wait_until_flowing(&witness).await;

    stream.down.store(true, Ordering::SeqCst);
    // A burst during the outage (one request writing many events), so that the relay meets
    // a batch of many rows, as it does after any outage with some traffic.
    let burst = shape.produce_batch(OUTAGE_EVENT, "burst", 16).await;
    produced.lock().unwrap().extend(burst);
    // The length of the outage, not an assertion.
    tokio::time::sleep(Duration::from_millis(600)).await;
    stream.down.store(false, Ordering::SeqCst);
    assert_nothing_lost(&shape, &witness, producer, &produced).await;
    relay.stop().await;
    consumer.stop().await;
}

// ---- 4. poison event ------------------------------------------------------------------------

const POISON_EVENT: &str = "test.fault.4";
const POISON_N: usize = 5;

/// A poisoned subscriber failing for one event, next to a bystander that applies everything.
struct Poison {
    poisoned: Arc<Witness>,
    bystander: Arc<Witness>,
    events: Vec<DomainEvent>,
    poison: DomainEvent,
    relay: Worker,
    consumer: Worker,
}

impl Poison {
    async fn start(shape: &Shape, prepare: impl FnOnce(&Faulty)) -> Poison {
        let poisoned = Arc::new(Witness::new("fault-4-poisoned", POISON_EVENT));
        let bystander =
            Arc::new(Witness::new("fault-4-bystander", POISON_EVENT).counting_as(format!("{POISON_EVENT}/bystander")));
        let events = shape.produce(POISON_EVENT, "agg-4", POISON_N).await;
        let poison = events[2].clone();
        poisoned.fail_for(Some(poison.event_id));
        let stream = Arc::new(Faulty::new(shape.stream.clone()));
        prepare(&stream);
        let relay = shape.start_relay(shape.stream.clone(), shape.relay_config());
        let config = ConsumerConfig { max_attempts: 3, ..shape.consumer_config("c4") };
        let consumer = shape.start_consumer(stream.clone(), config, &[&poisoned, &bystander]);
        Poison { poisoned, bystander, events, poison, relay, consumer }
    }

    fn others(&self) -> Vec<DomainEvent> {
        self.events.iter().filter(|e| e.event_id != self.poison.event_id).cloned().collect()
    }

    async fn stop(self) {
        self.consumer.stop().await;
        self.relay.stop().await;
    }
}

/// Runs the poison scenario up to the dead letter in the DLQ stream, checking it on the way.
async fn poison_until_dead_lettered(shape: &Shape) -> (Poison, Entry) {
    let p = Poison::start(shape, |_| {}).await;
    let others = p.others();
    eventually("the poison event is dead-lettered, the others applied", async || {
        let dlq = shape.stream_len(&shape.dlq).await?;
        let missing = shape.not_applied(&p.poisoned, &others).await.len();
        if dlq != 1 || missing > 0 {
            return Err(format!("DLQ length {dlq}, {missing} not applied"));
        }
        shape.settled().await
    })
    .await;

    let label = shape.label;
    let calls = p.poisoned.calls_for(p.poison.event_id);
    assert_eq!(calls.len(), 3, "[{label}] the poisoned handler runs max_attempts times: {calls:?}");
    let dlq = shape.read_all(&shape.dlq).await;
    assert_eq!(dlq.len(), 1, "[{label}] {dlq:?}");
    let letter = dlq[0].clone();
    assert_eq!(field(&letter, envelope::EVENT_ID), p.poison.event_id.to_string());
    assert_eq!(field(&letter, envelope::DLQ_ERROR), INJECTED);
    assert_eq!(field(&letter, envelope::DLQ_ATTEMPTS), "3");
    assert_eq!(field(&letter, envelope::DLQ_SUBSCRIBER), p.poisoned.name);
    assert_eq!(shape.pending().await.count, 0, "[{label}] the dead-lettered entry is acknowledged");
    assert_eq!(shape.db.event_attempts(p.poisoned.name, p.poison.event_id).await, 3, "[{label}] event_attempts");

    shape.assert_exactly_once(&p.poisoned, &others).await;
    assert!(!shape.store.is_event_applied(p.poisoned.name, p.poison.event_id).await.unwrap());
    // The bystander applied the poison event on the first delivery and was skipped on retries.
    shape.assert_exactly_once(&p.bystander, &p.events).await;
    assert_eq!(p.bystander.calls_for(p.poison.event_id).len(), 1, "[{label}] bystander runs");
    (p, letter)
}

async fn poison_event_is_dead_lettered_after_max_attempts(shape: Shape) {
    let (p, _) = poison_until_dead_lettered(&shape).await;
    p.stop().await;
}

// ---- 5. DLQ replay --------------------------------------------------------------------------

async fn dlq_replay_applies_once(shape: Shape) {
    let (p, letter) = poison_until_dead_lettered(&shape).await;
    p.poisoned.fail_for(None);

    // What `anna dlq replay` does (crates/anna/src/operator.rs), through the traits.
    let event_id = Uuid::parse_str(field(&letter, envelope::EVENT_ID)).unwrap();
    shape.store.reset_event_attempts(event_id).await.unwrap();
    let mut replay = letter.fields.clone();
    for dlq_only in [envelope::DLQ_ERROR, envelope::DLQ_ATTEMPTS, envelope::DLQ_SUBSCRIBER, envelope::DLQ_FAILED_AT] {
        replay.remove(dlq_only);
    }
    shape.stream.append(&shape.stream_name, &replay, None).await.unwrap();
    assert_eq!(shape.stream.delete(&shape.dlq, std::slice::from_ref(&letter.id)).await.unwrap(), 1);

    shape.wait_applied(&p.poisoned, &p.events).await;
    let label = shape.label;
    shape.assert_exactly_once(&p.poisoned, &p.events).await;
    assert_eq!(p.poisoned.calls_for(event_id).len(), 4, "[{label}] three failures, then one success");
    // The bystander had applied it before: the replay does not run it again.
    assert_eq!(p.bystander.calls_for(event_id).len(), 1, "[{label}] bystander re-run by the replay");
    shape.assert_exactly_once(&p.bystander, &p.events).await;
    assert_eq!(shape.db.event_attempts(p.poisoned.name, event_id).await, 0, "[{label}] attempts reset");
    assert_eq!(shape.stream_len(&shape.dlq).await.unwrap(), 0);
    p.stop().await;
}

// ---- 6. DLQ stream unwritable ---------------------------------------------------------------

async fn dlq_stream_unwritable_falls_back_to_dead_letters(shape: Shape) {
    let dlq = shape.dlq.clone();
    let p = Poison::start(&shape, |s| *s.appends_fail_to.lock().unwrap() = Some(dlq)).await;
    let others = p.others();
    eventually("the poison event lands in dead_letters", async || {
        let letters = shape.store.list_dead_letters(10).await.map_err(|e| e.to_string())?;
        let missing = shape.not_applied(&p.poisoned, &others).await.len();
        if letters.len() != 1 || missing > 0 {
            return Err(format!("{} dead letters, {missing} not applied", letters.len()));
        }
        shape.settled().await
    })
    .await;

    let label = shape.label;
    let letters = shape.store.list_dead_letters(10).await.unwrap();
    let letter = &letters[0];
    let kept = (&letter.event.event_id, &letter.event.event_name, &letter.event.aggregate_id, &letter.event.payload);
    let poison = (&p.poison.event_id, &p.poison.event_name, &p.poison.aggregate_id, &p.poison.payload);
    assert_eq!(kept, poison, "[{label}] the dead letter keeps the event");
    assert_eq!(letter.attempts, 3);
    assert!(letter.error.contains(INJECTED) && letter.error.contains(p.poisoned.name), "{}", letter.error);
    assert_eq!(shape.pending().await.count, 0, "[{label}] acknowledged after the fallback");
    assert_eq!(shape.stream_len(&shape.dlq).await.unwrap(), 0, "[{label}] nothing reached the DLQ stream");
    assert_eq!(p.poisoned.calls_for(p.poison.event_id).len(), 3);
    shape.assert_exactly_once(&p.poisoned, &others).await;
    shape.assert_exactly_once(&p.bystander, &p.events).await;
    p.stop().await;
}

/// Neither the DLQ stream nor `dead_letters` can be written (the table is renamed away, which
/// breaks only that write): the entry must stay pending and come back, never be dropped.
async fn dead_letters_unwritable_too_keeps_the_entry_pending(shape: Shape) {
    shape.db.execute("ALTER TABLE dead_letters RENAME TO dead_letters_offline").await;
    let dlq = shape.dlq.clone();
    let p = Poison::start(&shape, |s| *s.appends_fail_to.lock().unwrap() = Some(dlq)).await;
    let others = p.others();
    // A fourth run means the entry was claimed again after dead-lettering failed.
    eventually("the undead-letterable entry comes back", async || {
        let calls = p.poisoned.calls_for(p.poison.event_id).len();
        let missing = shape.not_applied(&p.poisoned, &others).await.len();
        if calls >= 4 && missing == 0 { Ok(()) } else { Err(format!("{calls} runs, {missing} not applied")) }
    })
    .await;
    let label = shape.label;
    let poison_entry = shape
        .read_all(&shape.stream_name)
        .await
        .into_iter()
        .find(|e| field(e, envelope::EVENT_ID) == p.poison.event_id.to_string())
        .unwrap();
    let pending = shape.pending().await;
    assert_eq!(pending.count, 1, "[{label}] {pending:?}");
    assert_eq!(pending.oldest_id.as_deref(), Some(poison_entry.id.as_str()), "[{label}] {pending:?}");
    assert_eq!(shape.db.count("SELECT COUNT(*) FROM dead_letters_offline").await, 0);
    assert_eq!(shape.stream_len(&shape.dlq).await.unwrap(), 0);

    shape.db.execute("ALTER TABLE dead_letters_offline RENAME TO dead_letters").await;
    eventually("dead-lettered once dead_letters is back", async || {
        let letters = shape.store.list_dead_letters(10).await.map_err(|e| e.to_string())?;
        if letters.len() != 1 {
            return Err(format!("{} dead letters", letters.len()));
        }
        shape.settled().await
    })
    .await;
    let letters = shape.store.list_dead_letters(10).await.unwrap();
    assert_eq!(letters[0].event.event_id, p.poison.event_id);
    assert!(letters[0].attempts >= 4, "[{label}] attempts {}", letters[0].attempts);
    shape.assert_exactly_once(&p.poisoned, &others).await;
    shape.assert_exactly_once(&p.bystander, &p.events).await;
    p.stop().await;
}

// ---- 7. relay with the stream down ----------------------------------------------------------

async fn relay_gives_up_on_a_dead_stream_and_others_keep_flowing(shape: Shape) {
    const DOOMED: &str = "test.fault.7.doomed";
    const GOOD: &str = "test.fault.7";
    const MAX_ATTEMPTS: u32 = 3;
    let backoff = Backoff { base: Duration::from_millis(50), max: Duration::from_millis(100) };
    let label = shape.label;
    let faulty = Arc::new(Faulty::new(shape.stream.clone()));
    faulty.batches_fail.store(true, Ordering::SeqCst);
    // Several aggregates, so the relay's batches hold several rows.
    let doomed = shape.produce(DOOMED, "doomed", 4).await;
    let config = RelayConfig { max_attempts: MAX_ATTEMPTS, backoff, ..shape.relay_config() };
    let relay = shape.start_relay(faulty.clone(), config);
    eventually("the relay gives up on every row", async || {
        let status = shape.store.outbox_status().await.map_err(|e| e.to_string())?;
        if status.failed == doomed.len() as u64 && status.pending + status.processing == 0 {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
    let mut rows = Vec::new();
    for event in &doomed {
        rows.extend(shape.store.outbox_events_for_aggregate(&event.aggregate_id).await.unwrap());
    }
    let failed_batches = faulty.failed_batches.lock().unwrap().clone();

    // The stream works again: later rows of other aggregates flow, the failed ones stay put.
    faulty.batches_fail.store(false, Ordering::SeqCst);
    let witness = Arc::new(Witness::new("fault-7-witness", GOOD));
    let consumer = shape.start_consumer(shape.stream.clone(), shape.consumer_config("c7"), &[&witness]);
    let good = shape.produce(GOOD, "good", 5).await;
    shape.wait_applied(&witness, &good).await;
    shape.assert_exactly_once(&witness, &good).await;
    let published: BTreeSet<String> =
        shape.read_all(&shape.stream_name).await.iter().map(|e| field(e, envelope::EVENT_ID).to_owned()).collect();
    for event in &doomed {
        assert!(!published.contains(&event.event_id.to_string()), "[{label}] a failed row was published");
    }
    let status = shape.store.outbox_status().await.unwrap();
    assert_eq!((status.failed, status.pending, status.processing), (doomed.len() as u64, 0, 0), "{status:?}");
    relay.stop().await;
    consumer.stop().await;

    // Each row got its attempts, with at least the base backoff between attempts: failing
    // for good must take (max_attempts - 1) waits, not a burst of passes in a few ms.
    let mut problems = Vec::new();
    for row in &rows {
        let tries: Vec<Instant> =
            failed_batches.iter().filter(|(_, ids)| ids.contains(&row.id.to_string())).map(|(at, _)| *at).collect();
        let span = match (tries.first(), tries.last()) {
            (Some(first), Some(last)) => *last - *first,
            _ => Duration::ZERO,
        };
        let minimum = backoff.base * (MAX_ATTEMPTS - 1) - Duration::from_millis(10);
        if row.status != "failed"
            || row.attempts != i32::try_from(MAX_ATTEMPTS).unwrap()
            || !row.last_error.as_deref().is_some_and(|e| e.contains(INJECTED))
            || span < minimum
        {
            problems.push(format!(
                "row {} ({}): status {}, attempts {}, last_error {:?}, in {} failed batches over {span:?} (expected \
                 {MAX_ATTEMPTS} attempts over at least {minimum:?})",
                row.id,
                row.event.aggregate_id,
                row.status,
                row.attempts,
                row.last_error,
                tries.len()
            ));
        }
    }
    assert!(problems.is_empty(), "[{label}] rows given up wrongly:\n{}", problems.join("\n"));
}

// ---- graceful shutdown ----------------------------------------------------------------------

async fn graceful_shutdown_finishes_in_flight_handlers(shape: Shape) {
    const EVENT: &str = "test.fault.shutdown";
    const N: usize = 3;
    let label = shape.label;
    let events = shape.produce(EVENT, "agg-s", N).await;
    let relay = shape.start_relay(shape.stream.clone(), shape.relay_config());
    eventually("published", async || {
        let status = shape.store.outbox_status().await.map_err(|e| e.to_string())?;
        if status.pending + status.processing == 0 { Ok(()) } else { Err(format!("{status:?}")) }
    })
    .await;
    relay.stop().await;

    // Published beforehand, so the consumer's first read takes all of them in flight.
    let witness = Arc::new(Witness::new("fault-s-witness", EVENT).slow(Duration::from_millis(500)));
    let consumer = shape.start_consumer(shape.stream.clone(), shape.consumer_config("cs"), &[&witness]);
    eventually("a handler is running", async || {
        let started = witness.started.load(Ordering::SeqCst);
        if started >= 1 { Ok(()) } else { Err("no handler started".to_owned()) }
    })
    .await;
    consumer.token.cancel();
    let finished_at_cancel = witness.finished.load(Ordering::SeqCst);
    tokio::time::timeout(PATIENCE, consumer.handle).await.expect("run did not return").unwrap();

    assert!(finished_at_cancel < N, "[{label}] nothing was in flight at the cancel");
    assert_eq!(witness.finished.load(Ordering::SeqCst), N, "[{label}] in-flight handlers finished before run returned");
    assert_eq!(shape.pending().await.count, 0, "[{label}] in-flight entries acknowledged before run returned");
    shape.assert_exactly_once(&witness, &events).await;
}

// ---- slow handlers ---------------------------------------------------------------------------

/// A handler slower than the claim threshold keeps its entries (they are touched while it
/// runs): another consumer never takes them over and runs the handler a second time. An
/// external subscriber (e-mail) is what a second run would hurt: a database subscriber's
/// second run would find the event already applied.
async fn slow_handlers_keep_their_entries(shape: Shape) {
    const EVENT: &str = "test.fault.slow";
    const N: usize = 2;
    let label = shape.label;
    let events = shape.produce(EVENT, "agg-slow", N).await;
    let relay = shape.start_relay(shape.stream.clone(), shape.relay_config());
    let witness = Arc::new(Witness::new("fault-slow-witness", EVENT).slow(CLAIM_IDLE * 3).external());
    let first = shape.start_consumer(shape.stream.clone(), shape.consumer_config("slow-a"), &[&witness]);
    eventually("a handler is running", async || {
        if witness.started.load(Ordering::SeqCst) >= 1 { Ok(()) } else { Err("no handler started".to_owned()) }
    })
    .await;
    let rival = shape.start_consumer(shape.stream.clone(), shape.consumer_config("slow-b"), &[&witness]);
    eventually("applied", async || {
        let finished = witness.finished.load(Ordering::SeqCst);
        if finished >= N { Ok(()) } else { Err(format!("{finished} finished")) }
    })
    .await;
    // Give the rival's claim loop time to act on anything it could take.
    tokio::time::sleep(CLAIM_IDLE * 2).await;
    assert_eq!(witness.started.load(Ordering::SeqCst), N, "[{label}] a slow handler ran twice");
    for event in &events {
        assert_eq!(witness.calls_for(event.event_id).len(), 1, "[{label}] {} handled more than once", event.event_id);
    }
    first.stop().await;
    rival.stop().await;
    relay.stop().await;
    for event in &events {
        assert!(shape.store.is_event_applied(witness.name, event.event_id).await.unwrap(), "[{label}] not recorded");
    }
}

/// One subscriber of an event is poisoned (always fails), another is flaky (fails twice, then
/// works): the flaky one still applies the event before the entry is dead-lettered for the
/// poisoned one — a subscriber running out of attempts does not cost the others their effects.
async fn a_poisoned_subscriber_does_not_cost_the_others_their_effects(shape: Shape) {
    const EVENT: &str = "test.fault.mixed";
    let label = shape.label;
    let events = shape.produce(EVENT, "agg-mixed", 1).await;
    let poisoned = Arc::new(Witness::new("fault-mixed-poisoned", EVENT).counting_as(format!("{EVENT}/poisoned")));
    poisoned.fail_for(Some(events[0].event_id));
    let flaky = Arc::new(Witness::new("fault-mixed-flaky", EVENT).external());
    flaky.flaky.store(2, Ordering::SeqCst);
    let relay = shape.start_relay(shape.stream.clone(), shape.relay_config());
    let config = ConsumerConfig { max_attempts: 3, ..shape.consumer_config("mixed") };
    let consumer = shape.start_consumer(shape.stream.clone(), config, &[&poisoned, &flaky]);
    eventually("dead-lettered after the flaky subscriber applied it", async || {
        let dlq = shape.stream_len(&shape.dlq).await?;
        let applied = shape.store.is_event_applied(flaky.name, events[0].event_id).await.map_err(|e| e.to_string())?;
        if dlq == 1 && applied { shape.settled().await } else { Err(format!("dlq {dlq}, flaky applied {applied}")) }
    })
    .await;
    assert_eq!(poisoned.calls_for(events[0].event_id).len(), 3, "[{label}] exactly max attempts for the poisoned one");
    assert_eq!(flaky.calls_for(events[0].event_id).len(), 3, "[{label}] two failures, then applied");
    consumer.stop().await;
    relay.stop().await;
}
