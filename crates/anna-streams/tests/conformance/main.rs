//! The conformance suite of the [`Stream`] trait: every test body runs against Redis
//! ([`RedisStream`] on the test process's shared server) and against SQLite
//! ([`EmbeddedStream`] on a fresh database file).
//!
//! Modelled on Watermill's universal Pub/Sub suite (`pubsub/tests/test_pubsub.go`): round trip,
//! concurrent consumers, consumer groups, new groups seeing old entries, resend on error, claim
//! of a dead consumer's entries, continue after errors, order with one consumer, plus what our
//! trait adds (blocking reads, pending summaries, tail reads, trimming under lag). Redis alone:
//! a server restart loses nothing and clients recover by themselves.
//!
//! Every test uses its own stream names, so they share servers freely.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anna_store::Store;
use anna_streams::{Delivery, EmbeddedStream, Entry, Fields, RedisStream, Stream, StreamError};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// Longer than both implementations' trim throttle, so the next append runs a trim check.
const TRIM_SETTLE: Duration = Duration::from_millis(350);
/// Bound on anything a test waits for, so that a bug fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(20);

// ---- backends -------------------------------------------------------------------------------

async fn redis_stream() -> Arc<dyn Stream> {
    Arc::new(RedisStream::connect(&anna_testkit::redis::shared_url()).await.unwrap())
}

async fn embedded_stream() -> Arc<dyn Stream> {
    Arc::new(EmbeddedStream::new(embedded_pool(&anna_testkit::sqlite::fresh_database_url()).await))
}

/// The application's migrations on a fresh file, then a pool of our own on it (the store does
/// not hand out its pool), with the same settings as the store's.
async fn embedded_pool(url: &str) -> SqlitePool {
    let store = anna_store::SqlStore::connect(url, &Default::default()).await.unwrap();
    store.migrate().await.unwrap();
    store.close().await;
    open_pool(url).await
}

async fn open_pool(url: &str) -> SqlitePool {
    let options = SqliteConnectOptions::from_str(url)
        .unwrap()
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5));
    SqlitePoolOptions::new().max_connections(8).connect_with(options).await.unwrap()
}

macro_rules! conformance {
    ($make:ident: $($test:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::$make().await).await;
            }
        )+
    };
}

macro_rules! all_conformance_tests {
    ($make:ident) => {
        conformance!($make:
            publish_subscribe_round_trip,
            append_batch_keeps_order_and_fields,
            concurrent_consumers_share_a_group,
            every_group_gets_everything,
            new_group_sees_the_backlog,
            resend_on_error,
            dead_consumer_entries_are_claimed_after_the_idle_time_only,
            continue_after_errors,
            single_consumer_gets_entries_in_order,
            blocking_read_returns_when_an_entry_arrives,
            blocked_readers_do_not_stall_other_commands,
            concurrent_appends_are_all_kept,
            ack_counts_what_was_pending,
            pending_summary_per_consumer,
            missing_group_is_an_error,
            tail_reading_after_an_id,
            trimming_keeps_what_a_lagging_group_needs,
            touch_keeps_own_entries_from_being_claimed,
            a_stream_nobody_reads_is_never_trimmed,
            delete_removes_entries,
        );
    };
}

mod redis {
    use super::*;
    use anna_testkit::redis::RedisServer;

    all_conformance_tests!(redis_stream);

    /// Entries deleted while pending are dropped from the pending list by the next claim
    /// instead of clogging it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claim_drops_entries_deleted_while_pending() {
        let url = anna_testkit::redis::shared_url();
        let s: Arc<dyn Stream> = Arc::new(RedisStream::connect(&url).await.unwrap());
        let stream = name("deleted");
        s.create_group(&stream, "g").await.unwrap();
        let ids = append_numbered(&s, &stream, 0..3).await;
        assert_eq!(s.read_group(&stream, "g", "c", 10, Duration::ZERO).await.unwrap().len(), 3);
        let mut raw = ::redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
        let _: u64 = ::redis::cmd("XDEL").arg(&stream).arg(&ids[1]).query_async(&mut raw).await.unwrap();

        let claimed = s.claim_idle(&stream, "g", "other", Duration::ZERO, 10).await.unwrap();
        assert_eq!(ids_of(&claimed), [ids[0].clone(), ids[2].clone()]);
        assert!(claimed.iter().all(|d| d.delivery_count == 2));
        let pending = s.pending(&stream, "g").await.unwrap();
        assert_eq!((pending.count, pending.consumers.get("other")), (2, Some(&2)));
    }

    /// Redis reports no lag after an XDEL in the undelivered range; it is counted instead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lag_is_counted_when_redis_cannot_tell() {
        let url = anna_testkit::redis::shared_url();
        let s: Arc<dyn Stream> = Arc::new(RedisStream::connect(&url).await.unwrap());
        let stream = name("lag");
        let ids = append_numbered(&s, &stream, 0..5).await;
        s.create_group(&stream, "g").await.unwrap();
        s.read_group(&stream, "g", "c", 1, Duration::ZERO).await.unwrap();
        let mut raw = ::redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
        let deleted: u64 = ::redis::cmd("XDEL").arg(&stream).arg(&ids[2]).query_async(&mut raw).await.unwrap();
        assert_eq!(deleted, 1);
        let info: ::redis::Value =
            ::redis::cmd("XINFO").arg("GROUPS").arg(&stream).query_async(&mut raw).await.unwrap();
        let ::redis::Value::Array(groups) = &info else { panic!("{info:?}") };
        let ::redis::Value::Array(pairs) = &groups[0] else { panic!("{info:?}") };
        let lag = pairs.chunks(2).find(|pair| pair[0] == ::redis::Value::BulkString(b"lag".to_vec()));
        assert_eq!(lag.map(|pair| &pair[1]), Some(&::redis::Value::Nil), "Redis now reports a lag: {info:?}");

        let groups = s.groups(&stream).await.unwrap();
        assert_eq!((groups[0].lag, groups[0].pending), (3, 1));
        assert_eq!(groups[0].last_delivered_id, ids[0]);
    }

    /// Watermill's TestReconnect: a persistent server (fsync on every write) is killed with
    /// SIGKILL mid-stream while a writer and a reader keep going. Nothing Redis acknowledged is
    /// lost, and the same client objects carry on once the server is back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_loses_nothing_and_clients_recover() {
        let mut server = RedisServer::start(true);
        let s: Arc<dyn Stream> = Arc::new(RedisStream::connect(&server.url()).await.unwrap());
        let stream = name("restart");
        s.create_group(&stream, "g").await.unwrap();

        // Before the crash: 50 entries, 20 delivered, 10 of those acknowledged.
        let before = append_numbered(&s, &stream, 0..50).await;
        let delivered = s.read_group(&stream, "g", "early", 20, Duration::ZERO).await.unwrap();
        assert_eq!(ids_of(&delivered), before[..20]);
        assert_eq!(s.ack(&stream, "g", &before[..10]).await.unwrap(), 10);

        let written = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (writer_errors, reader_errors) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let writer = tokio::spawn({
            let (s, stream, written, errors) = (s.clone(), stream.clone(), written.clone(), writer_errors.clone());
            async move {
                for n in 50..250 {
                    loop {
                        match s.append(&stream, &numbered(n), None).await {
                            Ok(id) => break written.lock().unwrap().push(id),
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            }
        });
        let reader = tokio::spawn({
            let (s, stream, seen, stop, errors) =
                (s.clone(), stream.clone(), seen.clone(), stop.clone(), reader_errors.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    match s.read_group(&stream, "g", "reader", 50, Duration::from_millis(200)).await {
                        Ok(batch) => {
                            let ids = ids_of(&batch);
                            // An ack lost in the crash only leaves the entry pending; claimed below.
                            let _ = s.ack(&stream, "g", &ids).await;
                            seen.lock().unwrap().extend(ids);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
        });

        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut server = tokio::task::spawn_blocking(move || {
            server.restart();
            server
        })
        .await
        .unwrap();
        tokio::time::timeout(PATIENCE, writer).await.unwrap().unwrap();
        let written = written.lock().unwrap().clone();
        assert_eq!(written.len(), 200);
        // Delivered to the group means the reader got it, or the reply died with the server
        // (then it is pending, and the sweep below claims it).
        let deadline = Instant::now() + PATIENCE;
        loop {
            let groups = s.groups(&stream).await.unwrap();
            if groups[0].lag == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the reader never caught up: {groups:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::Relaxed);
        tokio::time::timeout(PATIENCE, reader).await.unwrap().unwrap();

        // Everything acknowledged survived: the stream holds every entry (a write retried after
        // the connection died may add a duplicate, never lose one), and the entries delivered
        // but not acknowledged before the crash are still pending, now delivered twice.
        let all = read_all(&s, &stream).await;
        let stored: BTreeSet<&String> = all.iter().map(|e| &e.id).collect();
        assert!(before.iter().chain(&written).all(|id| stored.contains(id)));
        let leftovers = s.claim_idle(&stream, "g", "sweeper", Duration::ZERO, 1000).await.unwrap();
        let leftover_ids: BTreeSet<String> = ids_of(&leftovers).into_iter().collect();
        assert!(before[10..20].iter().all(|id| leftover_ids.contains(id)), "{leftover_ids:?}");
        assert!(leftovers.iter().all(|d| d.delivery_count >= 2), "{leftovers:?}");
        assert!(!leftover_ids.contains(&before[0]), "an acknowledged entry came back");
        let seen = seen.lock().unwrap().clone();
        let missing: Vec<&String> = written
            .iter()
            .chain(&before[20..])
            .filter(|id| !seen.contains(*id) && !leftover_ids.contains(*id))
            .collect();
        assert!(missing.is_empty(), "never delivered: {missing:?}");
        s.ack(&stream, "g", &ids_of(&leftovers)).await.unwrap();

        // A quiet restart: the very next call of each kind succeeds, on the same objects.
        server.restart();
        let id = s.append(&stream, &numbered(999), None).await.expect("append right after a restart");
        let next = s.read_group(&stream, "g", "reader", 10, Duration::from_millis(500)).await.expect("blocking read");
        assert_eq!(ids_of(&next), std::slice::from_ref(&id));
        s.ack(&stream, "g", &[id]).await.unwrap();
        server.restart();
        let next = s.read_group(&stream, "g", "reader", 10, Duration::from_millis(200)).await.expect("blocking read");
        assert!(next.is_empty());
        s.ping().await.unwrap();
        eprintln!(
            "restart: {} writer errors, {} reader errors while the server was down",
            writer_errors.load(Ordering::Relaxed),
            reader_errors.load(Ordering::Relaxed)
        );
    }
}

mod embedded {
    use super::*;

    all_conformance_tests!(embedded_stream);

    /// Rows deleted behind the stream's back while pending leave the pending list at the next
    /// claim, as in Redis.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claim_drops_entries_deleted_while_pending() {
        let pool = embedded_pool(&anna_testkit::sqlite::fresh_database_url()).await;
        let s: Arc<dyn Stream> = Arc::new(EmbeddedStream::new(pool.clone()));
        let stream = name("deleted");
        s.create_group(&stream, "g").await.unwrap();
        let ids = append_numbered(&s, &stream, 0..3).await;
        assert_eq!(s.read_group(&stream, "g", "c", 10, Duration::ZERO).await.unwrap().len(), 3);
        let seq: i64 = ids[1].trim_end_matches("-0").parse().unwrap();
        sqlx::query("DELETE FROM stream_entries WHERE id = ?").bind(seq).execute(&pool).await.unwrap();

        let claimed = s.claim_idle(&stream, "g", "other", Duration::ZERO, 10).await.unwrap();
        assert_eq!(ids_of(&claimed), [ids[0].clone(), ids[2].clone()]);
        assert!(claimed.iter().all(|d| d.delivery_count == 2));
        let pending = s.pending(&stream, "g").await.unwrap();
        assert_eq!((pending.count, pending.consumers.get("other")), (2, Some(&2)));
    }

    /// Handles on the same database wake each other's blocked readers: clones, a second
    /// `EmbeddedStream::new` on the same pool, and one on a second pool of the same file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handles_on_one_database_wake_each_other() {
        let url = anna_testkit::sqlite::fresh_database_url();
        let pool = embedded_pool(&url).await;
        let first = EmbeddedStream::new(pool.clone());
        let writers: Vec<Arc<dyn Stream>> = vec![
            Arc::new(first.clone()),
            Arc::new(EmbeddedStream::new(pool.clone())),
            Arc::new(EmbeddedStream::new(open_pool(&url).await)),
        ];
        let reader: Arc<dyn Stream> = Arc::new(first);
        for (i, writer) in writers.into_iter().enumerate() {
            let stream = name("wake");
            reader.create_group(&stream, "g").await.unwrap();
            let blocked = tokio::spawn({
                let (reader, stream) = (reader.clone(), stream.clone());
                async move {
                    let started = Instant::now();
                    let got = reader.read_group(&stream, "g", "c", 10, Duration::from_secs(10)).await.unwrap();
                    (got, started.elapsed())
                }
            });
            tokio::time::sleep(Duration::from_millis(150)).await;
            writer.append(&stream, &numbered(i), None).await.unwrap();
            let (got, waited) = blocked.await.unwrap();
            assert_eq!(got.len(), 1, "writer {i}");
            assert!(waited < Duration::from_secs(2), "writer {i}: woken after {waited:?}");
        }
    }
}

// ---- helpers --------------------------------------------------------------------------------

fn name(what: &str) -> String {
    format!("conformance-{what}-{}", uuid::Uuid::new_v4().simple())
}

fn fields(pairs: &[(&str, &str)]) -> Fields {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn numbered(n: usize) -> Fields {
    fields(&[("n", &n.to_string())])
}

fn number(entry: &Entry) -> usize {
    entry.fields["n"].parse().unwrap()
}

async fn append_numbered(s: &Arc<dyn Stream>, stream: &str, range: std::ops::Range<usize>) -> Vec<String> {
    let mut ids = Vec::with_capacity(range.len());
    for n in range {
        ids.push(s.append(stream, &numbered(n), None).await.unwrap());
    }
    ids
}

fn ids_of(deliveries: &[Delivery]) -> Vec<String> {
    deliveries.iter().map(|d| d.entry.id.clone()).collect()
}

/// Ids are opaque to the trait, but both backends use `<a>-<b>` integers: order them as such.
fn id_key(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap_or((id, "0"));
    (a.parse().unwrap(), b.parse().unwrap())
}

async fn read_all(s: &Arc<dyn Stream>, stream: &str) -> Vec<Entry> {
    let mut all: Vec<Entry> = Vec::new();
    loop {
        let after = all.last().map_or_else(|| "0".to_owned(), |e| e.id.clone());
        let page = s.read_after(stream, &after, 100, Duration::ZERO).await.unwrap();
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

async fn read_group_all(s: &Arc<dyn Stream>, stream: &str, group: &str, consumer: &str) -> Vec<Delivery> {
    let mut all = Vec::new();
    loop {
        let batch = s.read_group(stream, group, consumer, 100, Duration::ZERO).await.unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

fn group<'a>(groups: &'a [anna_streams::GroupInfo], name: &str) -> &'a anna_streams::GroupInfo {
    groups.iter().find(|g| g.name == name).unwrap_or_else(|| panic!("no group {name} in {groups:?}"))
}

// ---- test bodies ----------------------------------------------------------------------------

async fn publish_subscribe_round_trip(s: Arc<dyn Stream>) {
    s.ping().await.unwrap();
    let stream = name("round-trip");
    s.create_group(&stream, "g").await.unwrap();
    let sent = fields(&[
        ("event_id", &uuid::Uuid::new_v4().to_string()),
        ("payload", r#"{"text":"héllo 👋 \"quoted\"\nnext line"}"#),
        ("empty", ""),
        ("spaces", "  a  b  "),
    ]);
    let id = s.append(&stream, &sent, None).await.unwrap();

    let got = s.read_group(&stream, "g", "c1", 10, Duration::ZERO).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].entry.id, id);
    assert_eq!(got[0].entry.fields, sent);
    assert_eq!(got[0].delivery_count, 1);
    assert!(s.read_group(&stream, "g", "c1", 10, Duration::ZERO).await.unwrap().is_empty());

    assert_eq!(s.ack(&stream, "g", std::slice::from_ref(&id)).await.unwrap(), 1);
    assert_eq!(s.ack(&stream, "g", std::slice::from_ref(&id)).await.unwrap(), 0);
    assert_eq!(s.pending(&stream, "g").await.unwrap().count, 0);

    // Creating the group again changes nothing: it does not start over.
    s.create_group(&stream, "g").await.unwrap();
    assert!(s.read_group(&stream, "g", "c1", 10, Duration::ZERO).await.unwrap().is_empty());
    assert_eq!(s.read_after(&stream, "0", 10, Duration::ZERO).await.unwrap(), [Entry { id, fields: sent }]);

    // Redis has no entries without fields; neither has the embedded backend.
    assert!(s.append(&stream, &Fields::new(), None).await.is_err());
    assert_eq!(s.len(&stream).await.unwrap(), 1);
}

async fn append_batch_keeps_order_and_fields(s: Arc<dyn Stream>) {
    const TOTAL: usize = 1500;
    let stream = name("batch");
    s.create_group(&stream, "g").await.unwrap();
    assert!(s.append_batch(&stream, &[], None).await.unwrap().is_empty());

    let entries: Vec<Fields> =
        (0..TOTAL).map(|n| fields(&[("n", &n.to_string()), ("payload", &"é".repeat(n % 40))])).collect();
    let ids = s.append_batch(&stream, &entries, None).await.unwrap();
    assert_eq!(ids.len(), TOTAL);
    assert!(ids.windows(2).all(|w| id_key(&w[0]) < id_key(&w[1])), "ids must increase");
    let got = read_group_all(&s, &stream, "g", "c").await;
    assert_eq!(ids_of(&got), ids);
    assert!(got.iter().zip(&entries).all(|(d, sent)| &d.entry.fields == sent));
    assert_eq!(s.ack(&stream, "g", &ids).await.unwrap(), TOTAL as u64);

    // A bad entry fails the batch, which reports exactly what it did append.
    let len = s.len(&stream).await.unwrap();
    let error = s.append_batch(&stream, &[numbered(0), Fields::new(), numbered(2)], None).await.unwrap_err();
    assert!(error.appended.len() <= 1);
    assert_eq!(s.len(&stream).await.unwrap(), len + error.appended.len() as u64);

    // Batches trim like single appends once everything is acknowledged.
    let rest = read_group_all(&s, &stream, "g", "c").await;
    s.ack(&stream, "g", &ids_of(&rest)).await.unwrap();
    tokio::time::sleep(TRIM_SETTLE).await;
    let last = s.append_batch(&stream, &entries[..10], Some(100)).await.unwrap();
    let len = s.len(&stream).await.unwrap();
    if s.backend() == "embedded" {
        assert_eq!(len, 100);
    } else {
        assert!((100..=200).contains(&len), "len {len}");
    }
    assert_eq!(s.last_id(&stream).await.unwrap().as_ref(), last.last());
}

/// Watermill's TestConcurrentSubscribe: consumers of one group, running while producers
/// append, each get distinct entries and together all of them.
async fn concurrent_consumers_share_a_group(s: Arc<dyn Stream>) {
    const PRODUCERS: usize = 4;
    const PER_PRODUCER: usize = 50;
    const TOTAL: usize = PRODUCERS * PER_PRODUCER;
    let stream = name("concurrent");
    s.create_group(&stream, "g").await.unwrap();
    let received = Arc::new(AtomicUsize::new(0));

    let consumers: Vec<_> = (0..4)
        .map(|c| {
            let (s, stream, received) = (s.clone(), stream.clone(), received.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                let deadline = Instant::now() + PATIENCE;
                while received.load(Ordering::SeqCst) < TOTAL && Instant::now() < deadline {
                    let consumer = format!("c{c}");
                    let batch = s.read_group(&stream, "g", &consumer, 7, Duration::from_millis(100)).await.unwrap();
                    let ids = ids_of(&batch);
                    assert_eq!(s.ack(&stream, "g", &ids).await.unwrap(), ids.len() as u64);
                    received.fetch_add(ids.len(), Ordering::SeqCst);
                    mine.extend(ids);
                }
                mine
            })
        })
        .collect();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (s, stream) = (s.clone(), stream.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..PER_PRODUCER {
                    ids.push(s.append(&stream, &numbered(p * PER_PRODUCER + i), None).await.unwrap());
                }
                ids
            })
        })
        .collect();

    let mut appended = BTreeSet::new();
    for producer in producers {
        appended.extend(producer.await.unwrap());
    }
    let mut received_ids = Vec::new();
    for consumer in consumers {
        received_ids.extend(consumer.await.unwrap());
    }
    let distinct: BTreeSet<String> = received_ids.iter().cloned().collect();
    assert_eq!(received_ids.len(), TOTAL, "an entry went to two consumers, or some never arrived");
    assert_eq!(distinct, appended);
    assert_eq!(s.pending(&stream, "g").await.unwrap().count, 0);
}

/// Watermill's TestConsumerGroups: every group gets every entry, independently.
async fn every_group_gets_everything(s: Arc<dyn Stream>) {
    let stream = name("groups");
    s.create_group(&stream, "one").await.unwrap();
    s.create_group(&stream, "two").await.unwrap();
    let ids = append_numbered(&s, &stream, 0..50).await;

    let one = read_group_all(&s, &stream, "one", "a").await;
    assert_eq!(ids_of(&one), ids);
    assert_eq!(s.ack(&stream, "one", &ids).await.unwrap(), 50);

    let two = read_group_all(&s, &stream, "two", "a").await;
    assert_eq!(ids_of(&two), ids);
    assert!(two.iter().all(|d| d.delivery_count == 1));
    // Acknowledging in one group leaves the other's pending list alone.
    assert_eq!(s.pending(&stream, "one").await.unwrap().count, 0);
    assert_eq!(s.pending(&stream, "two").await.unwrap().count, 50);
}

/// Watermill's TestNewSubscriberReceivesOldMessages: groups start at the beginning.
async fn new_group_sees_the_backlog(s: Arc<dyn Stream>) {
    let stream = name("backlog");
    let ids = append_numbered(&s, &stream, 0..20).await;
    s.create_group(&stream, "late").await.unwrap();
    let more = append_numbered(&s, &stream, 20..25).await;
    let got = read_group_all(&s, &stream, "late", "c").await;
    assert_eq!(ids_of(&got), [ids, more].concat());
    assert_eq!(got.iter().map(|d| number(&d.entry)).collect::<Vec<_>>(), (0..25).collect::<Vec<_>>());
}

/// Watermill's TestResendOnError / TestNoAck: an entry that is not acknowledged comes back
/// through a claim, counted as a second delivery.
async fn resend_on_error(s: Arc<dyn Stream>) {
    let stream = name("resend");
    s.create_group(&stream, "g").await.unwrap();
    let sent = fields(&[("kind", "will-fail-once")]);
    let id = s.append(&stream, &sent, None).await.unwrap();

    let first = s.read_group(&stream, "g", "c", 10, Duration::ZERO).await.unwrap();
    assert_eq!((first.len(), first[0].delivery_count), (1, 1));
    // The handler failed: no ack.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let again = s.claim_idle(&stream, "g", "c", Duration::from_millis(100), 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].entry, Entry { id: id.clone(), fields: sent });
    assert_eq!(again[0].delivery_count, 2);
    assert!(s.read_group(&stream, "g", "c", 10, Duration::ZERO).await.unwrap().is_empty(), "not new any more");

    assert_eq!(s.ack(&stream, "g", &[id]).await.unwrap(), 1);
    assert!(s.claim_idle(&stream, "g", "c", Duration::ZERO, 10).await.unwrap().is_empty());
}

/// Watermill's TestClaimIdle / the anchors' "no ack, consumer dies": another consumer takes
/// the entries over once they have been idle long enough, and not a moment before.
async fn dead_consumer_entries_are_claimed_after_the_idle_time_only(s: Arc<dyn Stream>) {
    const IDLE: Duration = Duration::from_millis(600);
    let stream = name("dead-consumer");
    s.create_group(&stream, "g").await.unwrap();
    let ids = append_numbered(&s, &stream, 0..10).await;
    let taken = s.read_group(&stream, "g", "doomed", 10, Duration::ZERO).await.unwrap();
    assert_eq!(ids_of(&taken), ids);
    // "doomed" dies here.

    assert!(s.claim_idle(&stream, "g", "rescuer", IDLE, 100).await.unwrap().is_empty(), "claimed too early");
    let pending = s.pending(&stream, "g").await.unwrap();
    assert_eq!(pending.consumers, BTreeMap::from([("doomed".to_owned(), 10)]));

    tokio::time::sleep(IDLE + Duration::from_millis(150)).await;
    let mut claimed = s.claim_idle(&stream, "g", "rescuer", IDLE, 4).await.unwrap();
    assert_eq!(claimed.len(), 4, "count limits a claim");
    claimed.extend(s.claim_idle(&stream, "g", "rescuer", IDLE, 100).await.unwrap());
    assert_eq!(ids_of(&claimed), ids);
    assert!(claimed.iter().all(|d| d.delivery_count == 2), "{claimed:?}");
    assert!(claimed.iter().enumerate().all(|(n, d)| number(&d.entry) == n));

    // A claim restarts the idle clock: a second rescuer right away gets nothing.
    assert!(s.claim_idle(&stream, "g", "second-rescuer", IDLE, 100).await.unwrap().is_empty());
    let pending = s.pending(&stream, "g").await.unwrap();
    assert_eq!(pending.consumers, BTreeMap::from([("rescuer".to_owned(), 10)]));
    assert_eq!(s.ack(&stream, "g", &ids).await.unwrap(), 10);
}

/// Watermill's TestContinueAfterErrors: entries whose handler keeps failing are retried
/// (through claims) while the others flow; in the end everything is acknowledged once.
async fn continue_after_errors(s: Arc<dyn Stream>) {
    const FAILURES: u64 = 2;
    let stream = name("errors");
    s.create_group(&stream, "g").await.unwrap();
    let ids = append_numbered(&s, &stream, 0..10).await;
    let mut done: BTreeMap<usize, u64> = BTreeMap::new();
    for _ in 0..20 {
        if done.len() == ids.len() {
            break;
        }
        let mut batch = s.claim_idle(&stream, "g", "c", Duration::ZERO, 100).await.unwrap();
        batch.extend(s.read_group(&stream, "g", "c", 3, Duration::ZERO).await.unwrap());
        for delivery in batch {
            let n = number(&delivery.entry);
            let fails = n.is_multiple_of(2) && delivery.delivery_count <= FAILURES;
            if !fails {
                assert_eq!(s.ack(&stream, "g", std::slice::from_ref(&delivery.entry.id)).await.unwrap(), 1);
                assert!(done.insert(n, delivery.delivery_count).is_none(), "entry {n} handled twice");
            }
        }
    }
    let expected: BTreeMap<usize, u64> =
        (0..10usize).map(|n| (n, if n.is_multiple_of(2) { FAILURES + 1 } else { 1 })).collect();
    assert_eq!(done, expected);
    assert_eq!(s.pending(&stream, "g").await.unwrap().count, 0);
}

/// Watermill's TestPublishSubscribeInOrder: with one consumer, entries come in append order.
async fn single_consumer_gets_entries_in_order(s: Arc<dyn Stream>) {
    const TOTAL: usize = 1000;
    let stream = name("order");
    s.create_group(&stream, "g").await.unwrap();
    let ids = append_numbered(&s, &stream, 0..TOTAL).await;
    assert!(ids.windows(2).all(|w| id_key(&w[0]) < id_key(&w[1])), "ids must increase");

    let first = s.read_group(&stream, "g", "c", 3, Duration::ZERO).await.unwrap();
    assert_eq!(ids_of(&first), ids[..3]);
    let mut got = first;
    loop {
        let batch = s.read_group(&stream, "g", "c", 64, Duration::ZERO).await.unwrap();
        if batch.is_empty() {
            break;
        }
        assert!(batch.len() <= 64);
        got.extend(batch);
    }
    assert_eq!(got.iter().map(|d| number(&d.entry)).collect::<Vec<_>>(), (0..TOTAL).collect::<Vec<_>>());
    assert_eq!(ids_of(&got), ids);
    let tail = read_all(&s, &stream).await;
    assert_eq!(tail.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids);
}

async fn blocking_read_returns_when_an_entry_arrives(s: Arc<dyn Stream>) {
    let stream = name("block");
    s.create_group(&stream, "g").await.unwrap();

    let started = Instant::now();
    assert!(s.read_group(&stream, "g", "c", 10, Duration::ZERO).await.unwrap().is_empty());
    assert!(started.elapsed() < Duration::from_millis(500), "ZERO must not wait");

    let started = Instant::now();
    assert!(s.read_group(&stream, "g", "c", 10, Duration::from_millis(300)).await.unwrap().is_empty());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "waited {waited:?}");

    let blocked = tokio::spawn({
        let (s, stream) = (s.clone(), stream.clone());
        async move {
            let started = Instant::now();
            let got = s.read_group(&stream, "g", "c", 10, Duration::from_secs(10)).await.unwrap();
            (got, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = s.append(&stream, &numbered(1), None).await.unwrap();
    let (got, waited) = blocked.await.unwrap();
    assert_eq!(ids_of(&got), [id]);
    assert!(waited < Duration::from_secs(3), "woken after {waited:?}");
}

/// Blocking reads must not hold up anything else (Redis: they run on dedicated connections).
async fn blocked_readers_do_not_stall_other_commands(s: Arc<dyn Stream>) {
    let stream = name("stall");
    let groups = ["a", "b", "c", "d"];
    for group in groups {
        s.create_group(&stream, group).await.unwrap();
    }
    let readers: Vec<_> = groups
        .into_iter()
        .map(|group| {
            let (s, stream) = (s.clone(), stream.clone());
            tokio::spawn(async move { s.read_group(&stream, group, "c", 10, Duration::from_secs(5)).await.unwrap() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let other = name("other");
    s.create_group(&other, "g").await.unwrap();
    s.append(&other, &numbered(0), None).await.unwrap();
    assert_eq!(s.read_group(&other, "g", "c", 10, Duration::ZERO).await.unwrap().len(), 1);
    assert_eq!(s.len(&stream).await.unwrap(), 0);
    let id = s.append(&stream, &numbered(1), None).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "commands took {:?}", started.elapsed());

    for reader in readers {
        let got = tokio::time::timeout(Duration::from_secs(3), reader).await.unwrap().unwrap();
        assert_eq!(ids_of(&got), std::slice::from_ref(&id));
    }
}

async fn concurrent_appends_are_all_kept(s: Arc<dyn Stream>) {
    let stream = name("appends");
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let (s, stream) = (s.clone(), stream.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..100 {
                    ids.push(s.append(&stream, &numbered(t * 100 + i), None).await.unwrap());
                }
                ids
            })
        })
        .collect();
    let mut appended = BTreeSet::new();
    for task in tasks {
        let ids = task.await.unwrap();
        assert!(ids.windows(2).all(|w| id_key(&w[0]) < id_key(&w[1])), "one writer's ids must increase");
        appended.extend(ids);
    }
    assert_eq!(appended.len(), 400);
    assert_eq!(s.len(&stream).await.unwrap(), 400);
    let all = read_all(&s, &stream).await;
    assert!(all.windows(2).all(|w| id_key(&w[0].id) < id_key(&w[1].id)));
    assert_eq!(all.iter().map(|e| e.id.clone()).collect::<BTreeSet<_>>(), appended);
    assert_eq!(s.last_id(&stream).await.unwrap().as_ref(), all.last().map(|e| &e.id));
}

async fn ack_counts_what_was_pending(s: Arc<dyn Stream>) {
    let stream = name("ack");
    s.create_group(&stream, "g").await.unwrap();
    let ids = append_numbered(&s, &stream, 0..5).await;
    assert_eq!(s.read_group(&stream, "g", "c", 4, Duration::ZERO).await.unwrap().len(), 4);

    assert_eq!(s.ack(&stream, "g", &[]).await.unwrap(), 0);
    // A duplicate counts once; a never-delivered entry does not count.
    let mixed = [ids[0].clone(), ids[1].clone(), ids[1].clone(), ids[4].clone()];
    assert_eq!(s.ack(&stream, "g", &mixed).await.unwrap(), 2);
    assert_eq!(s.ack(&stream, "g", &ids[..4]).await.unwrap(), 2);
    assert_eq!(s.pending(&stream, "g").await.unwrap().count, 0);
    // Acknowledging in a group that does not exist acknowledges nothing.
    assert_eq!(s.ack(&stream, "nobody", &ids).await.unwrap(), 0);
}

async fn pending_summary_per_consumer(s: Arc<dyn Stream>) {
    let stream = name("pending");
    s.create_group(&stream, "g").await.unwrap();
    assert_eq!(s.pending(&stream, "g").await.unwrap(), Default::default());

    let ids = append_numbered(&s, &stream, 0..6).await;
    s.read_group(&stream, "g", "a", 3, Duration::ZERO).await.unwrap();
    s.read_group(&stream, "g", "b", 2, Duration::ZERO).await.unwrap();
    let pending = s.pending(&stream, "g").await.unwrap();
    assert_eq!(pending.count, 5);
    assert_eq!(pending.oldest_id.as_ref(), Some(&ids[0]));
    assert_eq!(pending.consumers, BTreeMap::from([("a".to_owned(), 3), ("b".to_owned(), 2)]));

    s.ack(&stream, "g", &ids[..1]).await.unwrap();
    let pending = s.pending(&stream, "g").await.unwrap();
    assert_eq!((pending.count, pending.oldest_id.as_ref()), (4, Some(&ids[1])));

    s.ack(&stream, "g", &ids[1..3]).await.unwrap();
    let pending = s.pending(&stream, "g").await.unwrap();
    assert_eq!(
        pending.consumers,
        BTreeMap::from([("b".to_owned(), 2)]),
        "a consumer without pending entries is not listed"
    );
    assert_eq!(pending.oldest_id.as_ref(), Some(&ids[3]));

    let groups = s.groups(&stream).await.unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!((groups[0].pending, groups[0].lag, groups[0].last_delivered_id.as_str()), (2, 1, ids[4].as_str()));
}

async fn missing_group_is_an_error(s: Arc<dyn Stream>) {
    let stream = name("missing");
    s.append(&stream, &numbered(0), None).await.unwrap();
    let no_group = |result: Result<Vec<Delivery>, StreamError>| matches!(result, Err(StreamError::NoGroup { ref group, .. }) if group == "ghost");
    assert!(no_group(s.read_group(&stream, "ghost", "c", 10, Duration::ZERO).await));
    assert!(no_group(s.read_group(&stream, "ghost", "c", 10, Duration::from_millis(100)).await));
    assert!(no_group(s.claim_idle(&stream, "ghost", "c", Duration::ZERO, 10).await));
    assert!(matches!(s.pending(&stream, "ghost").await, Err(StreamError::NoGroup { .. })));
    // A stream that does not exist at all: no group either.
    let nowhere = name("nowhere");
    assert!(matches!(s.pending(&nowhere, "ghost").await, Err(StreamError::NoGroup { .. })));
    assert!(s.groups(&nowhere).await.unwrap().is_empty());
    assert_eq!(s.len(&nowhere).await.unwrap(), 0);
    assert_eq!(s.last_id(&nowhere).await.unwrap(), None);

    // Creating the group makes the stream if needed, and an empty one reads as empty.
    s.create_group(&nowhere, "g").await.unwrap();
    assert!(s.read_group(&nowhere, "g", "c", 10, Duration::ZERO).await.unwrap().is_empty());
    assert_eq!(s.groups(&nowhere).await.unwrap().len(), 1);
}

/// Fan-out readers without a group (WebSocket feeds): start after the newest id, then follow.
async fn tail_reading_after_an_id(s: Arc<dyn Stream>) {
    let stream = name("tail");
    assert_eq!(s.last_id(&stream).await.unwrap(), None);
    assert!(s.read_after(&stream, "0", 10, Duration::ZERO).await.unwrap().is_empty());

    let ids = append_numbered(&s, &stream, 0..5).await;
    assert_eq!(s.last_id(&stream).await.unwrap().as_ref(), Some(&ids[4]));
    assert_eq!(s.len(&stream).await.unwrap(), 5);
    let all = s.read_after(&stream, "0", 10, Duration::ZERO).await.unwrap();
    assert_eq!(all.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids);
    let after = s.read_after(&stream, &ids[2], 10, Duration::ZERO).await.unwrap();
    assert_eq!(after.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids[3..]);
    let one = s.read_after(&stream, &ids[2], 1, Duration::ZERO).await.unwrap();
    assert_eq!(one.iter().map(number).collect::<Vec<_>>(), [3]);

    let started = Instant::now();
    assert!(s.read_after(&stream, &ids[4], 10, Duration::from_millis(300)).await.unwrap().is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250));

    let tail = s.last_id(&stream).await.unwrap().unwrap();
    let follower = tokio::spawn({
        let (s, stream) = (s.clone(), stream.clone());
        async move {
            let started = Instant::now();
            let got = s.read_after(&stream, &tail, 10, Duration::from_secs(10)).await.unwrap();
            (got, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let id = s.append(&stream, &numbered(5), None).await.unwrap();
    let (got, waited) = follower.await.unwrap();
    assert_eq!(got.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), [id]);
    assert!(waited < Duration::from_secs(3), "woken after {waited:?}");
}

/// `max_len` never drops what a group still needs (unread or unacknowledged): a lagging group
/// makes the stream longer, and `groups()` shows the lag; once everyone has acknowledged, the
/// stream shrinks towards `max_len`.
async fn trimming_keeps_what_a_lagging_group_needs(s: Arc<dyn Stream>) {
    const MAX_LEN: u64 = 50;
    let stream = name("trim");
    let limit = Some(MAX_LEN);
    s.create_group(&stream, "fast").await.unwrap();
    s.create_group(&stream, "slow").await.unwrap();
    let mut ids = Vec::new();
    for n in 0..300 {
        ids.push(s.append(&stream, &numbered(n), limit).await.unwrap());
    }
    assert_eq!(s.len(&stream).await.unwrap(), 300, "nobody has read anything yet");
    let groups = s.groups(&stream).await.unwrap();
    assert_eq!((group(&groups, "fast").lag, group(&groups, "fast").pending), (300, 0));
    assert_eq!((group(&groups, "slow").lag, group(&groups, "slow").pending), (300, 0));
    assert_eq!(group(&groups, "slow").last_delivered_id, "0-0");

    // "fast" reads and acknowledges everything; "slow" still has read nothing.
    let fast = read_group_all(&s, &stream, "fast", "f").await;
    assert_eq!(s.ack(&stream, "fast", &ids_of(&fast)).await.unwrap(), 300);
    tokio::time::sleep(TRIM_SETTLE).await;
    ids.push(s.append(&stream, &numbered(300), limit).await.unwrap());
    assert_eq!(s.len(&stream).await.unwrap(), 301, "entries unread by a group were trimmed");
    let groups = s.groups(&stream).await.unwrap();
    assert_eq!((group(&groups, "fast").lag, group(&groups, "fast").pending), (1, 0));
    assert_eq!(group(&groups, "fast").last_delivered_id, ids[299]);
    assert_eq!((group(&groups, "slow").lag, group(&groups, "slow").pending), (301, 0));

    // "slow" reads 200 and acknowledges the first 100: those may go, its pending ones not.
    let mut slow = Vec::new();
    while slow.len() < 200 {
        let want = (200 - slow.len()).min(100);
        slow.extend(s.read_group(&stream, "slow", "s", want, Duration::ZERO).await.unwrap());
    }
    assert_eq!(ids_of(&slow), ids[..200]);
    s.ack(&stream, "slow", &ids[..100]).await.unwrap();
    tokio::time::sleep(TRIM_SETTLE).await;
    ids.push(s.append(&stream, &numbered(301), limit).await.unwrap());
    let len = s.len(&stream).await.unwrap();
    let kept = read_all(&s, &stream).await;
    assert_eq!(kept.len() as u64, len);
    assert!(ids[100..].iter().all(|id| kept.iter().any(|e| &e.id == id)), "a pending or unread entry was trimmed");
    if s.backend() == "embedded" {
        assert_eq!(len, 202, "trims exactly up to the oldest pending entry");
    } else {
        // MINID ~ removes whole radix-tree nodes (up to 100 entries) only.
        assert!((202..302).contains(&len), "len {len}");
    }
    let groups = s.groups(&stream).await.unwrap();
    assert_eq!((group(&groups, "slow").lag, group(&groups, "slow").pending), (102, 100));
    assert_eq!(group(&groups, "slow").last_delivered_id, ids[199]);
    assert_eq!((group(&groups, "fast").lag, group(&groups, "fast").pending), (2, 0));

    // Everyone catches up and acknowledges: the stream shrinks towards max_len.
    let rest_fast = read_group_all(&s, &stream, "fast", "f").await;
    s.ack(&stream, "fast", &ids_of(&rest_fast)).await.unwrap();
    let rest_slow = read_group_all(&s, &stream, "slow", "s").await;
    assert_eq!(ids_of(&rest_slow), ids[200..]);
    s.ack(&stream, "slow", &ids[100..]).await.unwrap();
    tokio::time::sleep(TRIM_SETTLE).await;
    let newest = s.append(&stream, &numbered(302), limit).await.unwrap();
    let len = s.len(&stream).await.unwrap();
    if s.backend() == "embedded" {
        assert_eq!(len, MAX_LEN);
    } else {
        assert!((MAX_LEN..=MAX_LEN + 100).contains(&len), "len {len}");
    }
    let kept = read_all(&s, &stream).await;
    assert_eq!(kept.last().map(|e| &e.id), Some(&newest), "the newest entries stay");
    assert_eq!(kept.len() as u64, len);
    let groups = s.groups(&stream).await.unwrap();
    for name in ["fast", "slow"] {
        assert_eq!((group(&groups, name).lag, group(&groups, name).pending), (1, 0), "{name}");
    }
}

/// A consumer that keeps working on its entries (waiting to retry) touches them, so other
/// consumers do not claim them; it cannot touch another consumer's entries.
async fn touch_keeps_own_entries_from_being_claimed(s: Arc<dyn Stream>) {
    const IDLE: Duration = Duration::from_millis(400);
    let stream = name("touch");
    s.create_group(&stream, "g").await.unwrap();
    let ids = append_numbered(&s, &stream, 0..4).await;
    let mine = s.read_group(&stream, "g", "worker", 2, Duration::ZERO).await.unwrap();
    let theirs = s.read_group(&stream, "g", "other", 2, Duration::ZERO).await.unwrap();
    tokio::time::sleep(IDLE + Duration::from_millis(100)).await;
    // Touching all four ids only touches the two pending for "worker".
    assert_eq!(s.touch(&stream, "g", "worker", &ids).await.unwrap(), 2);
    let claimed = s.claim_idle(&stream, "g", "rescuer", IDLE, 10).await.unwrap();
    assert_eq!(ids_of(&claimed), ids_of(&theirs), "only the untouched entries are idle");
    let pending = s.pending(&stream, "g").await.unwrap();
    assert_eq!(pending.consumers, BTreeMap::from([("rescuer".to_owned(), 2), ("worker".to_owned(), 2)]));
    // Touching does not count as a delivery.
    tokio::time::sleep(IDLE + Duration::from_millis(100)).await;
    let reclaimed = s.claim_idle(&stream, "g", "rescuer", IDLE, 10).await.unwrap();
    let counts: Vec<u64> =
        reclaimed.iter().filter(|d| ids_of(&mine).contains(&d.entry.id)).map(|d| d.delivery_count).collect();
    assert_eq!(counts, [2, 2]);
    assert_eq!(s.touch(&stream, "g", "worker", &[]).await.unwrap(), 0);
}

async fn delete_removes_entries(s: Arc<dyn Stream>) {
    let stream = name("delete");
    let ids = append_numbered(&s, &stream, 0..5).await;
    assert_eq!(s.delete(&stream, &ids[1..3]).await.unwrap(), 2);
    assert_eq!(s.delete(&stream, &ids[1..3]).await.unwrap(), 0, "already gone");
    let left: Vec<String> = read_all(&s, &stream).await.into_iter().map(|e| e.id).collect();
    assert_eq!(left, [ids[0].clone(), ids[3].clone(), ids[4].clone()]);
    assert_eq!(s.len(&stream).await.unwrap(), 3);
    assert_eq!(s.delete(&stream, &[]).await.unwrap(), 0);
}

/// Entries appended before any group exists are kept whatever the cap: the group created later
/// starts at the beginning and must see them.
async fn a_stream_nobody_reads_is_never_trimmed(s: Arc<dyn Stream>) {
    let stream = name("ungrouped");
    for chunk in 0..6 {
        let fields: Vec<Fields> = (chunk * 100..chunk * 100 + 100).map(numbered).collect();
        s.append_batch(&stream, &fields, Some(50)).await.unwrap();
        // Let the time-based trim check come due between batches.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    s.append(&stream, &numbered(600), Some(50)).await.unwrap();
    assert_eq!(s.len(&stream).await.unwrap(), 601);
    s.create_group(&stream, "late").await.unwrap();
    let all = read_group_all(&s, &stream, "late", "c").await;
    assert_eq!(all.len(), 601);
}
