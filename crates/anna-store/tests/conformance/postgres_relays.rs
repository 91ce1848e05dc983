//! Postgres only: several relays on one database (SQLite has one relay per database), and the
//! LISTEN connection behind wait_for_outbox.

use std::collections::HashSet;
use std::sync::Mutex;

use anna_store::SqlStore;
use sqlx::Connection;

use super::*;

const AGGREGATES: u64 = 8;
const EVENTS_PER_AGGREGATE: u64 = 40;
const APPENDERS: u64 = 4;
const CLAIMERS: usize = 20;

/// What the claimers saw, checked under one lock.
#[derive(Default)]
struct Ledger {
    claimed: HashSet<Uuid>,
    /// (aggregate, n) of every event whose publication was recorded, before it is marked.
    published: HashSet<(String, u64)>,
}

fn position(record: &OutboxRecord) -> (String, u64) {
    let n = record.event.payload["n"].as_u64().unwrap_or_else(|| panic!("no n in {:?}", record.event.payload));
    (record.event.aggregate_id.clone(), n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_relays_claim_each_row_once_and_in_aggregate_order() {
    let url = anna_testkit::pg::fresh_database_url().await;
    let relays: Vec<Arc<dyn Store>> = vec![
        Arc::new(SqlStore::connect(&url, &test_options()).await.unwrap_or_else(|e| panic!("{e}"))),
        Arc::new(SqlStore::connect(&url, &test_options()).await.unwrap_or_else(|e| panic!("{e}"))),
    ];
    relays[0].migrate().await.unwrap_or_else(|e| panic!("migrate: {e}"));
    let outcome = tokio::time::timeout(StdDuration::from_secs(120), race(&relays)).await;
    for relay in &relays {
        relay.close().await;
    }
    match outcome {
        Err(_) => panic!("the relays did not publish everything within 2 minutes"),
        Ok(Err(e)) => panic!("{e} ({e:?})"),
        Ok(Ok(())) => {}
    }
}

async fn race(relays: &[Arc<dyn Store>]) -> TestResult {
    let total = usize::try_from(AGGREGATES * EVENTS_PER_AGGREGATE).unwrap_or(usize::MAX);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut tasks = Vec::new();

    // Each appender owns some aggregates and appends their events in order, one or two per
    // unit of work, while the claimers run.
    for appender in 0..APPENDERS {
        let store = relays[0].clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while n < EVENTS_PER_AGGREGATE {
                for aggregate in (appender..AGGREGATES).step_by(usize::try_from(APPENDERS).unwrap_or(1)) {
                    let aggregate = format!("aggregate-{aggregate}");
                    let events: Vec<DomainEvent> = (n..(n + 2).min(EVENTS_PER_AGGREGATE))
                        .map(|i| DomainEvent::new("counted", aggregate.as_str(), now(), json!({ "n": i })))
                        .collect();
                    append(&store, &events).await?;
                }
                n += 2;
            }
            Ok::<_, StoreError>(())
        }));
    }

    for claimer in 0..CLAIMERS {
        let (store, ledger) = (relays[claimer % relays.len()].clone(), ledger.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let batch = store.claim_outbox_batch(5, StdDuration::from_secs(60), OffsetDateTime::now_utc()).await?;
                if batch.is_empty() {
                    if ledger.lock().unwrap_or_else(|e| panic!("{e}")).published.len() == total {
                        return Ok(());
                    }
                    tokio::time::sleep(StdDuration::from_millis(2)).await;
                    continue;
                }
                check(&ledger, &batch);
                // Publishing takes a while, so that other claims overlap this lease.
                let pause = u64::from(Uuid::new_v4().as_bytes()[0] % 4);
                tokio::time::sleep(StdDuration::from_millis(pause)).await;
                ledger.lock().unwrap_or_else(|e| panic!("{e}")).published.extend(batch.iter().map(position));
                store.mark_outbox_published(&ids(&batch), OffsetDateTime::now_utc()).await?;
            }
        }));
    }

    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("task: {e}"))?;
    }
    let status = relays[1].outbox_status().await?;
    assert_eq!(status, OutboxStatus::default());
    assert_eq!(ledger.lock().unwrap_or_else(|e| panic!("{e}")).claimed.len(), total);
    Ok(())
}

/// A relay whose lease ran out puts its row back for a retry while another relay claims. The
/// late relay's UPDATE (the statement `mark_outbox_retry` runs) holds the row's lock while the
/// claim looks: the later row of the same aggregate must not be claimed ahead of it. (With
/// `FOR UPDATE SKIP LOCKED` the claim skipped the locked row, judged the later one unblocked
/// from its snapshot, and claimed it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_marked_during_a_claim_holds_back_the_aggregate() {
    let url = anna_testkit::pg::fresh_database_url().await;
    let store: Arc<dyn Store> =
        Arc::new(SqlStore::connect(&url, &test_options()).await.unwrap_or_else(|e| panic!("{e}")));
    store.migrate().await.unwrap_or_else(|e| panic!("migrate: {e}"));
    run(store, async move |store: Arc<dyn Store>| -> TestResult {
        let aggregate = format!("A-{}", Uuid::new_v4());
        append(&store, &[event("A1", &aggregate, now()), event("A2", &aggregate, now())]).await?;
        let claimed_at = relay_now();
        let first = store.claim_outbox_batch(1, LEASE, claimed_at).await?;
        assert_eq!(names(&first), ["A1"]);
        let late = after_lease(claimed_at);

        let mut late_relay = sqlx::PgConnection::connect(&url).await?;
        let mut mark = late_relay.begin().await?;
        sqlx::query(
            "UPDATE outbox_events SET status = 'pending', available_at = $2, last_error = 'stream down', \
             locked_until = NULL, updated_at = $3 WHERE id = $1 AND status = 'processing'",
        )
        .bind(first[0].id)
        .bind(late + Duration::minutes(5))
        .bind(late)
        .execute(&mut *mark)
        .await?;
        let claimer = {
            let store = store.clone();
            tokio::spawn(async move { store.claim_outbox_batch(100, LEASE, late).await })
        };
        tokio::time::sleep(StdDuration::from_millis(300)).await;
        mark.commit().await?;
        let claimed = claimer.await.unwrap_or_else(|e| panic!("claim task: {e}"))?;
        let _ = late_relay.close().await;
        // Either nothing (A1 waits for its retry, A2 behind it) or both, A1 first: never A2
        // ahead of A1.
        let claimed = names(&claimed);
        assert!(claimed.is_empty() || claimed == ["A1", "A2"], "claimed {claimed:?} while A1 was being marked");
        if claimed.is_empty() {
            let due = late + Duration::minutes(6);
            assert_eq!(names(&store.claim_outbox_batch(100, LEASE, due).await?), ["A1", "A2"]);
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_outbox_survives_a_lost_listener() {
    let url = anna_testkit::pg::fresh_database_url().await;
    let store: Arc<dyn Store> =
        Arc::new(SqlStore::connect(&url, &test_options()).await.unwrap_or_else(|e| panic!("{e}")));
    store.migrate().await.unwrap_or_else(|e| panic!("migrate: {e}"));
    run(store, async move |store: Arc<dyn Store>| -> TestResult {
        // Starts the listener.
        store.wait_for_outbox(StdDuration::from_millis(300)).await;
        // Kill the listener's connection and refuse new ones for a while, so that
        // reconnecting fails a few times before it works.
        let options: sqlx::postgres::PgConnectOptions = url.parse()?;
        let database = options.get_database().unwrap_or_else(|| panic!("no database in {url}")).to_owned();
        // From another database: a database cannot refuse connections to itself.
        let mut admin = sqlx::PgConnection::connect_with(&options.database("postgres")).await?;
        let allow = |yes: bool| sqlx::AssertSqlSafe(format!("ALTER DATABASE {database} ALLOW_CONNECTIONS {yes}"));
        sqlx::query(allow(false)).execute(&mut admin).await?;
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND query LIKE 'LISTEN %'",
        )
        .bind(&database)
        .fetch_all(&mut admin)
        .await?;
        assert_eq!(killed, [true], "exactly one listener connection");
        tokio::time::sleep(StdDuration::from_millis(400)).await;
        sqlx::query(allow(true)).execute(&mut admin).await?;
        let _ = admin.close().await;
        // A wake-up to look after the outage is allowed, and then it listens again.
        tokio::time::sleep(StdDuration::from_millis(1500)).await;
        store.wait_for_outbox(StdDuration::from_millis(300)).await;

        let waiter = tokio::spawn({
            let store = store.clone();
            async move {
                store.wait_for_outbox(StdDuration::from_secs(20)).await;
                std::time::Instant::now()
            }
        });
        tokio::time::sleep(StdDuration::from_millis(300)).await;
        append(&store, &[event("after.outage", "someone", now())]).await?;
        let committed = std::time::Instant::now();
        let woke = tokio::time::timeout(StdDuration::from_secs(5), waiter)
            .await
            .unwrap_or_else(|_| panic!("the listener did not come back"))
            .unwrap_or_else(|e| panic!("waiter: {e}"));
        assert!(woke.saturating_duration_since(committed) < StdDuration::from_secs(1));
        Ok(())
    })
    .await;
}

/// No row twice; every earlier event of a claimed row's aggregate is either published
/// already or ahead of it in the same batch.
fn check(ledger: &Mutex<Ledger>, batch: &[OutboxRecord]) {
    let mut ledger = ledger.lock().unwrap_or_else(|e| panic!("{e}"));
    for (i, record) in batch.iter().enumerate() {
        assert!(ledger.claimed.insert(record.id), "row {} claimed twice", record.id);
        assert_eq!(record.attempts, 1);
        let (aggregate, n) = position(record);
        for earlier in 0..n {
            let key = (aggregate.clone(), earlier);
            let ahead = batch[..i].iter().any(|r| position(r) == key);
            assert!(
                ahead || ledger.published.contains(&key),
                "{aggregate} #{n} claimed while #{earlier} was neither published nor ahead in its batch"
            );
        }
    }
}
