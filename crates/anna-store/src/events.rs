//! The storage side of the event backbone: the transactional outbox (appended inside units of
//! work through [`EventWrites`], claimed and marked by the relay through [`EventLog`]),
//! subscriber bookkeeping (applied ids, failed attempts), the `dead_letters` fallback and the
//! event-statistics projection.

use std::collections::HashSet;
use std::time::Duration;

use anna_domain::DomainEvent;
use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::StoreError;
use crate::sql::{Pool, Row, Sql, saturating_add};
use crate::store::{SqlStore, SqlUnitOfWork};

/// An outbox row as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    pub id: Uuid,
    pub event: DomainEvent,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub published_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
}

/// Counts for `anna outbox status` and the outbox gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStatus {
    /// Waiting to be published (including rows waiting for a retry).
    pub pending: u64,
    /// Claimed by a relay and not yet marked.
    pub processing: u64,
    /// Gave up after the maximum attempts; needs an operator.
    pub failed: u64,
    /// `created_at` of the oldest pending or processing row.
    pub oldest_unpublished_at: Option<OffsetDateTime>,
}

impl OutboxStatus {
    /// Rows still to publish.
    pub fn backlog(&self) -> u64 {
        self.pending + self.processing
    }
}

/// How many events of one name the statistics projection has applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventStat {
    pub event_name: String,
    pub count: i64,
    pub last_occurred_on: OffsetDateTime,
}

/// An event that exhausted its attempts and could not be written to the DLQ stream.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: Uuid,
    pub event: DomainEvent,
    pub error: String,
    pub attempts: i32,
    pub created_at: OffsetDateTime,
}

/// The event backbone's reads and writes outside units of work.
#[async_trait]
pub trait EventLog: Send + Sync {
    /// Claims up to `limit` rows that are ready: `pending` with `available_at <= now`, or
    /// `processing` whose lease (`locked_until`) has expired (a crashed relay). Claimed rows
    /// become `processing` with `locked_until = now + lease` and `attempts + 1`. A row is never
    /// claimed while an earlier row (by insertion order) of the same aggregate is still pending
    /// or processing under a live lease, so each aggregate's events are published in commit
    /// order even with several relays. Returned oldest first. Postgres: `FOR UPDATE SKIP
    /// LOCKED`, with claims serialised by a transaction-scoped advisory lock.
    async fn claim_outbox_batch(
        &self,
        limit: u32,
        lease: Duration,
        now: OffsetDateTime,
    ) -> Result<Vec<OutboxRecord>, StoreError>;

    /// Marks claimed rows `published` (`published_at = now`, lease cleared).
    async fn mark_outbox_published(&self, ids: &[Uuid], now: OffsetDateTime) -> Result<(), StoreError>;

    /// Returns a claimed row to `pending` until `retry_at`, recording the error.
    async fn mark_outbox_retry(
        &self,
        id: Uuid,
        error: &str,
        retry_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Marks a claimed row terminally `failed`, recording the error.
    async fn mark_outbox_failed(&self, id: Uuid, error: &str, now: OffsetDateTime) -> Result<(), StoreError>;

    /// Puts every `failed` row back to `pending` with its attempts reset, ready at `now` (the
    /// operator fixed the cause). Returns how many.
    async fn requeue_failed_outbox(&self, now: OffsetDateTime) -> Result<u64, StoreError>;

    /// Deletes `published` rows published before `before`. Returns how many.
    async fn purge_published_outbox(&self, before: OffsetDateTime) -> Result<u64, StoreError>;

    async fn outbox_status(&self) -> Result<OutboxStatus, StoreError>;

    /// How many rows were published at or after `since` (and are not purged yet): the drain
    /// rate over a window, for operators watching a backlog shrink.
    async fn outbox_published_since(&self, since: OffsetDateTime) -> Result<u64, StoreError>;

    /// Outbox rows of one aggregate, oldest first.
    async fn outbox_events_for_aggregate(&self, aggregate_id: &str) -> Result<Vec<OutboxRecord>, StoreError>;

    /// Waits until a unit of work that appended events commits (anywhere: Postgres uses
    /// LISTEN/NOTIFY, SQLite an in-process signal), or `timeout` passes. Spurious wake-ups are
    /// allowed; the relay re-checks. Signals may be coalesced: on Postgres a process sends at
    /// most one NOTIFY per 5 ms, so after a wake-up the relay claims until it finds nothing and
    /// looks again shortly after.
    async fn wait_for_outbox(&self, timeout: Duration);

    /// Which of `event_ids` `subscriber` has applied (one query for the whole set).
    async fn events_applied(&self, subscriber: &str, event_ids: &[Uuid]) -> Result<HashSet<Uuid>, StoreError>;

    /// Whether `subscriber` has applied `event_id`.
    async fn is_event_applied(&self, subscriber: &str, event_id: Uuid) -> Result<bool, StoreError> {
        Ok(self.events_applied(subscriber, &[event_id]).await?.contains(&event_id))
    }

    /// Records one failed attempt of `subscriber` on `event_id`; returns the attempts so far.
    async fn record_event_failure(
        &self,
        subscriber: &str,
        event_id: Uuid,
        error: &str,
        now: OffsetDateTime,
    ) -> Result<u32, StoreError>;

    /// Forgets the failed attempts of every subscriber on `event_id` (before a DLQ replay).
    async fn reset_event_attempts(&self, event_id: Uuid) -> Result<(), StoreError>;

    /// Deletes applied-event records older than `before`, and failed-attempt counts not
    /// updated since. Returns how many applied-event records went.
    async fn purge_applied_events(&self, before: OffsetDateTime) -> Result<u64, StoreError>;

    async fn insert_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError>;

    /// Oldest first.
    async fn list_dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, StoreError>;

    /// Deletes the given dead letters, or all of them with `None`. Returns how many.
    async fn delete_dead_letters(&self, ids: Option<&[Uuid]>) -> Result<u64, StoreError>;

    /// The event statistics projection, by event name.
    async fn event_stats(&self) -> Result<Vec<EventStat>, StoreError>;
}

/// The event half of a unit of work: domain events appended with the aggregate's change, and
/// a subscriber's applied-event records written with the subscriber's own effects.
#[async_trait]
pub trait EventWrites: Send {
    /// Appends events to `outbox_events` (status `pending`), in order.
    async fn append_events(&mut self, events: &[DomainEvent]) -> Result<(), StoreError>;

    /// Records that `subscriber` applied `event_id`, in this transaction (so with the
    /// subscriber's own effects). Returns false, changing nothing, if it already was.
    async fn record_event_applied(
        &mut self,
        subscriber: &str,
        event_id: Uuid,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Records that `subscriber` applied each of `event_ids` (one statement), in this
    /// transaction. Returns the ids recorded now — those not applied before; an id given twice
    /// is returned once.
    async fn record_events_applied(
        &mut self,
        subscriber: &str,
        event_ids: &[Uuid],
        now: OffsetDateTime,
    ) -> Result<Vec<Uuid>, StoreError>;

    /// Counts `count` applied events of one name in the statistics projection (`event_stats`).
    async fn count_events(
        &mut self,
        event_name: &str,
        count: i64,
        last_occurred_on: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Counts one applied event in the statistics projection.
    async fn count_event(&mut self, event_name: &str, occurred_on: OffsetDateTime) -> Result<(), StoreError> {
        self.count_events(event_name, 1, occurred_on).await
    }
}

/// Key of the transaction-scoped advisory lock that serialises Postgres claims ("annaoutb" in
/// ASCII). Without it, two relays could each judge from their own snapshot that the other's
/// rows do not hold back theirs, and claim two events of one aggregate at once. SQLite needs
/// none: its unit of work holds the database-wide write lock.
const CLAIM_LOCK_KEY: i64 = 0x616e_6e61_6f75_7462;

/// Rows read per look at the head of the outbox while claiming.
const CLAIM_WINDOW_MIN: u32 = 256;

/// The next `$2` rows still to publish after insertion position `$1`, oldest first, with what
/// the claim rule needs. The same on both backends but for the insertion counter (`seq`;
/// SQLite's rowid) and how the index is reached: Postgres has one partial index in `seq` order
/// over both statuses; SQLite's partial index is on `(status)` (it cannot index the rowid,
/// which ends every index), so it reads each status in rowid order and merges the two. Each
/// costs what the window costs, never what the backlog costs.
const CLAIM_WINDOW: Sql = Sql::PerBackend {
    sqlite: "\
SELECT * FROM (
    SELECT rowid AS seq, id, aggregate_id, status, available_at, locked_until FROM outbox_events
    WHERE status IN ('pending', 'processing') AND status = 'pending' AND rowid > $1 ORDER BY rowid LIMIT $2)
UNION ALL
SELECT * FROM (
    SELECT rowid AS seq, id, aggregate_id, status, available_at, locked_until FROM outbox_events
    WHERE status IN ('pending', 'processing') AND status = 'processing' AND rowid > $1 ORDER BY rowid LIMIT $2)
ORDER BY seq LIMIT $2",
    postgres: "\
SELECT seq, id, aggregate_id, status, available_at, locked_until FROM outbox_events
WHERE status IN ('pending', 'processing') AND seq > $1 ORDER BY seq LIMIT $2",
};

/// Every row still to publish of the picked aggregates, up to the last picked row, but those
/// under another relay's live lease, locked (Postgres: `FOR UPDATE`; SQLite: the unit of work
/// holds the write lock). $1 = the aggregates, $2 = the last picked position, $3 = now. Read
/// again, in one statement, because on Postgres each window had its own snapshot: a row
/// committed late (its position taken before a window passed it, its commit after) is seen
/// here and holds back the rest of its aggregate. Rows under a live lease are left alone (and
/// unlocked, so their relay's marks never wait for a claim): one before a picked row would
/// already have held it back in the window, and no new lease can appear meanwhile, since
/// claims take turns.
const CLAIM_RECHECK: Sql = Sql::PerBackend {
    sqlite: "SELECT rowid AS seq, id, aggregate_id, status, available_at, locked_until FROM outbox_events \
             WHERE aggregate_id IN (SELECT value FROM json_each($1)) AND status IN ('pending', 'processing') \
             AND rowid <= $2 AND (status = 'pending' OR locked_until IS NULL OR locked_until < $3) ORDER BY rowid",
    postgres: "SELECT seq, id, aggregate_id, status, available_at, locked_until FROM outbox_events \
               WHERE aggregate_id = ANY($1) AND status IN ('pending', 'processing') AND seq <= $2 \
               AND (status = 'pending' OR locked_until IS NULL OR locked_until < $3) \
               ORDER BY seq FOR UPDATE",
};

/// Claims the final set. $1 = now, $2 = end of the lease, $3 = the ids.
const CLAIM_TAKE: Sql = Sql::PerBackend {
    sqlite: "UPDATE outbox_events \
             SET status = 'processing', locked_until = $2, attempts = attempts + 1, updated_at = $1 \
             WHERE id IN (SELECT value FROM json_each($3)) \
             RETURNING rowid AS seq, id, event_id, aggregate_id, event_name, occurred_on, payload, status, attempts, \
             last_error, published_at, created_at, tenant_id, traceparent",
    postgres: "UPDATE outbox_events \
               SET status = 'processing', locked_until = $2, attempts = attempts + 1, updated_at = $1 \
               WHERE id = ANY($3) \
               RETURNING seq, id, event_id, aggregate_id, event_name, occurred_on, payload, status, attempts, \
               last_error, published_at, created_at, tenant_id, traceparent",
};

/// What the claim rule looks at.
struct Head {
    seq: i64,
    id: Uuid,
    aggregate_id: String,
    state: HeadState,
}

enum HeadState {
    /// Pending and due, or processing under an expired lease (a processing row without a
    /// lease, left by the predecessor, counts as expired).
    Ready,
    /// Pending for a retry, or processing under a live lease: holds back its aggregate.
    Waiting,
    /// Published or failed since it was first read: neither claimed nor holding anything back.
    Gone,
}

impl Head {
    fn from_row(row: &Row, now: OffsetDateTime) -> Result<Self, StoreError> {
        let status: String = row.get("status")?;
        let due = |ready: bool| if ready { HeadState::Ready } else { HeadState::Waiting };
        let state = match status.as_str() {
            "pending" => due(row.time("available_at")? <= now),
            "processing" => due(row.opt_time("locked_until")?.is_none_or(|until| until < now)),
            _ => HeadState::Gone,
        };
        Ok(Self { seq: row.get("seq")?, id: row.uuid("id")?, aggregate_id: row.get("aggregate_id")?, state })
    }
}

/// The claim rule over rows in insertion order: a ready row is claimed unless an earlier row of
/// its aggregate is still to publish and not ready (pending for a retry, or under a live
/// lease). Ready earlier rows never hold it back: they come first and are picked first.
/// Published and failed rows hold nothing back.
#[derive(Default)]
struct ClaimRule {
    /// Aggregates with a row that is waiting: nothing later of theirs may go.
    blocked: HashSet<String>,
    picked: Vec<Uuid>,
    /// The aggregates of the picked rows.
    aggregates: HashSet<String>,
    /// Position of the last picked row.
    last_pick: i64,
}

impl ClaimRule {
    /// Judges the next row; returns whether `limit` rows are picked.
    fn judge(&mut self, head: Head, limit: usize) -> bool {
        if self.blocked.contains(&head.aggregate_id) {
            return false;
        }
        match head.state {
            HeadState::Ready => {
                self.picked.push(head.id);
                self.last_pick = head.seq;
                self.aggregates.insert(head.aggregate_id);
            }
            HeadState::Waiting => {
                self.blocked.insert(head.aggregate_id);
            }
            HeadState::Gone => {}
        }
        self.picked.len() >= limit
    }
}

const OUTBOX_COLUMNS_BY_AGGREGATE: Sql = Sql::PerBackend {
    // Insertion order: rowid on SQLite; on Postgres created_at, then seq to break ties between
    // events appended together (see each backend's 0005_outbox.sql).
    sqlite: "SELECT id, event_id, aggregate_id, event_name, occurred_on, payload, status, attempts, last_error, \
             published_at, created_at, tenant_id, traceparent \
             FROM outbox_events WHERE aggregate_id = $1 ORDER BY rowid",
    postgres: "SELECT id, event_id, aggregate_id, event_name, occurred_on, payload, status, attempts, last_error, \
               published_at, created_at, tenant_id, traceparent \
               FROM outbox_events WHERE aggregate_id = $1 ORDER BY created_at, seq",
};

#[async_trait]
impl EventLog for SqlStore {
    async fn claim_outbox_batch(
        &self,
        limit: u32,
        lease: Duration,
        now: OffsetDateTime,
    ) -> Result<Vec<OutboxRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let lease_end = saturating_add(now, lease);
        let mut tx = self.pool.begin().await?;
        if let Pool::Postgres(_) = self.pool {
            // Claims take turns, each statement seeing what the previous claimer committed. A
            // claim lost in a crash only returns its rows to the next claim (published twice at
            // worst, which consumers absorb), so it need not wait for the WAL to reach the disk.
            // One round trip: the lock, then for this transaction only no wait for the WAL
            // flush and a bound on row-lock waits (a relay stalled between marking a row and
            // committing must not hold every claim back: past it, the claim fails and the relay
            // tries again).
            tx.query(
                "SELECT pg_advisory_xact_lock($1), set_config('synchronous_commit', 'off', true), \
                 set_config('lock_timeout', '5s', true)",
            )
            .bind(CLAIM_LOCK_KEY)
            .execute()
            .await?;
        }
        let limit_rows = usize::try_from(limit).unwrap_or(usize::MAX);
        let window = limit.max(CLAIM_WINDOW_MIN).saturating_mul(4);
        // Look at the head of the outbox window by window until `limit` rows are picked or
        // nothing is left: rows under other relays' leases and aggregates waiting for a retry
        // are stepped over; every row that could hold back a picked one was seen before it.
        let mut rule = ClaimRule::default();
        let mut after = 0i64;
        let mut windows = 0u32;
        'windows: loop {
            windows += 1;
            let rows = tx.query(CLAIM_WINDOW).bind(after).bind(i64::from(window)).fetch_all().await?;
            for row in &rows {
                let head = Head::from_row(row, now)?;
                after = head.seq;
                if rule.judge(head, limit_rows) {
                    break 'windows;
                }
            }
            if rows.len() < usize::try_from(window).unwrap_or(usize::MAX) {
                break;
            }
        }
        if rule.picked.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let after_last_pick = rule.last_pick;
        // Judged again once locked, over every row still to publish of the picked aggregates:
        // a picked row may have gone back to pending for a retry (marked by a relay whose lease
        // ran out) since its window was read, and a row committed late may stand before it.
        // SQLite needs no second look: the windows were read under the database-wide write
        // lock, so nothing committed or changed in between. Postgres needs one only when the
        // claim read several windows, each with its own snapshot.
        let picked: HashSet<Uuid> = rule.picked.iter().copied().collect();
        let aggregates: Vec<String> = rule.aggregates.into_iter().collect();
        let (rows, mut claim) = match self.pool {
            // One window is one snapshot, in which a row committed late is invisible only if
            // every later row of its aggregate is too (they commit after it). A row being
            // marked right now by a relay whose lease ran out is waited for by the UPDATE below,
            // which claims it whatever the mark did: the aggregate still goes out in order.
            Pool::Postgres(_) if windows == 1 => (Vec::new(), rule.picked.clone()),
            Pool::Sqlite(_) => (Vec::new(), rule.picked.clone()),
            Pool::Postgres(_) => {
                let rows = tx
                    .query(CLAIM_RECHECK)
                    .bind_text_set(&aggregates)
                    .bind(after_last_pick)
                    .bind_time(now)
                    .fetch_all()
                    .await?;
                (rows, Vec::with_capacity(picked.len()))
            }
        };
        let mut blocked = HashSet::new();
        for row in &rows {
            let head = Head::from_row(row, now)?;
            if blocked.contains(&head.aggregate_id) {
                continue;
            }
            match head.state {
                HeadState::Ready if picked.contains(&head.id) => claim.push(head.id),
                // Not picked (seen late) or no longer ready: the rest of its aggregate waits.
                _ => {
                    blocked.insert(head.aggregate_id);
                }
            }
        }
        let rows = if claim.is_empty() {
            Vec::new()
        } else {
            tx.query(CLAIM_TAKE).bind_time(now).bind_time(lease_end).bind_uuid_set(&claim).fetch_all().await?
        };
        tx.commit().await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            match outbox_record_from_row(row) {
                Ok(record) => claimed.push((row.get::<i64>("seq")?, record)),
                // One unreadable row (a predecessor's non-UUID event id, say) must not hold
                // back the batch forever: it fails on its own, visibly.
                Err(error) => {
                    let id = row.uuid("id")?;
                    tracing::error!(outbox_id = %id, %error, "outbox row cannot be read; marked failed");
                    self.mark_outbox_failed(id, &format!("stored row cannot be read: {error}"), now).await?;
                }
            }
        }
        // UPDATE … RETURNING comes back in no promised order.
        claimed.sort_unstable_by_key(|(seq, _)| *seq);
        Ok(claimed.into_iter().map(|(_, record)| record).collect())
    }

    async fn mark_outbox_published(&self, ids: &[Uuid], now: OffsetDateTime) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        // Whatever the row's state, the relay did publish it. Already published rows keep
        // their first published_at. Set membership is the one difference: arrays on Postgres,
        // a JSON array on SQLite (one statement per batch, whatever its size, on both).
        const MARK: Sql = Sql::PerBackend {
            sqlite: "UPDATE outbox_events SET status = 'published', published_at = $2, locked_until = NULL, \
                     updated_at = $2 WHERE id IN (SELECT value FROM json_each($1)) AND status <> 'published'",
            postgres: "UPDATE outbox_events SET status = 'published', published_at = $2, locked_until = NULL, \
                       updated_at = $2 WHERE id = ANY($1) AND status <> 'published'",
        };
        match self.pool {
            // One autocommit statement: nothing to set for it.
            Pool::Sqlite(_) => {
                self.pool.query(MARK).bind_uuid_set(ids).bind_time(now).execute().await?;
                Ok(())
            }
            Pool::Postgres(_) => {
                // A mark lost in a crash makes the rows go out once more (consumers absorb
                // duplicates): the relay need not wait for the WAL to reach the disk.
                let mut tx = self.pool.begin().await?;
                tx.query("SELECT set_config('synchronous_commit', 'off', true)").execute().await?;
                tx.query(MARK).bind_uuid_set(ids).bind_time(now).execute().await?;
                tx.commit().await
            }
        }
    }

    async fn mark_outbox_retry(
        &self,
        id: Uuid,
        error: &str,
        retry_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        // Only a claim in flight goes back: a relay whose lease ran out must not send a row
        // that another relay has published since back to pending.
        self.pool
            .query(
                "UPDATE outbox_events SET status = 'pending', available_at = $3, last_error = $2, \
                 locked_until = NULL, updated_at = $4 WHERE id = $1 AND status = 'processing'",
            )
            .bind_uuid(id)
            .bind(error)
            .bind_time(retry_at)
            .bind_time(now)
            .execute()
            .await?;
        Ok(())
    }

    async fn mark_outbox_failed(&self, id: Uuid, error: &str, now: OffsetDateTime) -> Result<(), StoreError> {
        // See mark_outbox_retry for why only processing rows.
        self.pool
            .query(
                "UPDATE outbox_events SET status = 'failed', last_error = $2, locked_until = NULL, updated_at = $3 \
                 WHERE id = $1 AND status = 'processing'",
            )
            .bind_uuid(id)
            .bind(error)
            .bind_time(now)
            .execute()
            .await?;
        Ok(())
    }

    async fn requeue_failed_outbox(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        self.pool
            .query(
                "UPDATE outbox_events SET status = 'pending', attempts = 0, available_at = $1, locked_until = NULL, \
                 updated_at = $1 WHERE status = 'failed'",
            )
            .bind_time(now)
            .execute()
            .await
    }

    async fn purge_published_outbox(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        self.pool
            .query("DELETE FROM outbox_events WHERE status = 'published' AND published_at < $1")
            .bind_time(before)
            .execute()
            .await
    }

    async fn outbox_status(&self) -> Result<OutboxStatus, StoreError> {
        let row = self
            .pool
            .query(
                "SELECT COALESCE(SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END), 0) AS pending, \
                 COALESCE(SUM(CASE WHEN status = 'processing' THEN 1 ELSE 0 END), 0) AS processing, \
                 COALESCE(SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END), 0) AS failed, \
                 MIN(CASE WHEN status IN ('pending', 'processing') THEN created_at END) AS oldest \
                 FROM outbox_events WHERE status IN ('pending', 'processing', 'failed')",
            )
            .fetch_one()
            .await?;
        Ok(OutboxStatus {
            pending: row.count("pending")?,
            processing: row.count("processing")?,
            failed: row.count("failed")?,
            oldest_unpublished_at: row.opt_time("oldest")?,
        })
    }

    async fn outbox_published_since(&self, since: OffsetDateTime) -> Result<u64, StoreError> {
        let row = self
            .pool
            .query("SELECT count(*) AS published FROM outbox_events WHERE status = 'published' AND published_at >= $1")
            .bind_time(since)
            .fetch_one()
            .await?;
        row.count("published")
    }

    async fn outbox_events_for_aggregate(&self, aggregate_id: &str) -> Result<Vec<OutboxRecord>, StoreError> {
        let rows = self.pool.query(OUTBOX_COLUMNS_BY_AGGREGATE).bind(aggregate_id).fetch_all().await?;
        rows.iter().map(outbox_record_from_row).collect()
    }

    async fn wait_for_outbox(&self, timeout: Duration) {
        self.wake.wait(timeout).await;
    }

    async fn events_applied(&self, subscriber: &str, event_ids: &[Uuid]) -> Result<HashSet<Uuid>, StoreError> {
        if event_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let rows = self
            .pool
            .query(Sql::PerBackend {
                sqlite: "SELECT event_id FROM applied_events \
                         WHERE subscriber = $1 AND event_id IN (SELECT value FROM json_each($2))",
                postgres: "SELECT event_id FROM applied_events WHERE subscriber = $1 AND event_id = ANY($2::uuid[])",
            })
            .bind(subscriber)
            .bind_uuid_set(event_ids)
            .fetch_all()
            .await?;
        rows.iter().map(|row| row.uuid("event_id")).collect()
    }

    async fn record_event_failure(
        &self,
        subscriber: &str,
        event_id: Uuid,
        error: &str,
        now: OffsetDateTime,
    ) -> Result<u32, StoreError> {
        let row = self
            .pool
            .query(
                "INSERT INTO event_attempts (subscriber, event_id, attempts, last_error, updated_at) \
                 VALUES ($1, $2, 1, $3, $4) \
                 ON CONFLICT (subscriber, event_id) DO UPDATE SET attempts = event_attempts.attempts + 1, \
                 last_error = excluded.last_error, updated_at = excluded.updated_at \
                 RETURNING attempts",
            )
            .bind(subscriber)
            .bind_uuid(event_id)
            .bind(error)
            .bind_time(now)
            .fetch_one()
            .await?;
        let attempts: i32 = row.get("attempts")?;
        u32::try_from(attempts).map_err(|_| StoreError::Corrupt(format!("event_attempts.attempts {attempts}")))
    }

    async fn reset_event_attempts(&self, event_id: Uuid) -> Result<(), StoreError> {
        self.pool.query("DELETE FROM event_attempts WHERE event_id = $1").bind_uuid(event_id).execute().await?;
        Ok(())
    }

    async fn purge_applied_events(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let purged =
            self.pool.query("DELETE FROM applied_events WHERE applied_at < $1").bind_time(before).execute().await?;
        self.pool.query("DELETE FROM event_attempts WHERE updated_at < $1").bind_time(before).execute().await?;
        Ok(purged)
    }

    async fn insert_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let event = &letter.event;
        self.pool
            .query(
                "INSERT INTO dead_letters (id, event_id, aggregate_id, event_name, occurred_on, payload, error, \
                 attempts, created_at, tenant_id, traceparent) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind_uuid(letter.id)
            .bind(event.event_id.to_string())
            .bind(event.aggregate_id.as_str())
            .bind(event.event_name.as_str())
            .bind_time(event.occurred_on)
            .bind_json(&event.payload)
            .bind(letter.error.as_str())
            .bind(letter.attempts)
            .bind_time(letter.created_at)
            .bind(event.tenant_id.as_deref())
            .bind(event.traceparent.as_deref())
            .execute()
            .await?;
        Ok(())
    }

    async fn list_dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, StoreError> {
        // Ties between letters written in the same instant: SQLite's rowid is insertion order;
        // Postgres has no such column here, so the id makes the order at least stable.
        let rows = self
            .pool
            .query(Sql::PerBackend {
                sqlite: "SELECT id, event_id, aggregate_id, event_name, occurred_on, payload, error, attempts, \
                         created_at, tenant_id, traceparent FROM dead_letters ORDER BY created_at, rowid LIMIT $1",
                postgres: "SELECT id, event_id, aggregate_id, event_name, occurred_on, payload, error, attempts, \
                           created_at, tenant_id, traceparent FROM dead_letters ORDER BY created_at, id LIMIT $1",
            })
            .bind(i64::from(limit))
            .fetch_all()
            .await?;
        rows.iter().map(dead_letter_from_row).collect()
    }

    async fn delete_dead_letters(&self, ids: Option<&[Uuid]>) -> Result<u64, StoreError> {
        match ids {
            None => self.pool.query("DELETE FROM dead_letters").execute().await,
            Some([]) => Ok(0),
            // Set membership differs: see mark_outbox_published.
            Some(ids) => {
                self.pool
                    .query(Sql::PerBackend {
                        sqlite: "DELETE FROM dead_letters WHERE id IN (SELECT value FROM json_each($1))",
                        postgres: "DELETE FROM dead_letters WHERE id = ANY($1)",
                    })
                    .bind_uuid_set(ids)
                    .execute()
                    .await
            }
        }
    }

    async fn event_stats(&self) -> Result<Vec<EventStat>, StoreError> {
        let rows = self
            .pool
            .query("SELECT event_name, count, last_occurred_on FROM event_stats ORDER BY event_name")
            .fetch_all()
            .await?;
        rows.iter()
            .map(|row| {
                Ok(EventStat {
                    event_name: row.get("event_name")?,
                    count: row.get("count")?,
                    last_occurred_on: row.time("last_occurred_on")?,
                })
            })
            .collect()
    }
}

#[async_trait]
impl EventWrites for SqlUnitOfWork {
    async fn append_events(&mut self, events: &[DomainEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        if self.fences.is_some() {
            // A session's events are its state too: a stale owner must not add to them.
            let sessions: Vec<Uuid> = events
                .iter()
                .filter(|e| e.event_name.starts_with("session."))
                .filter_map(|e| Uuid::parse_str(&e.aggregate_id).ok())
                .collect();
            self.check_fences(&sessions).await?;
        }
        match &self.tx {
            crate::sql::Tx::Sqlite(_) => append_events_sqlite(self, events).await?,
            crate::sql::Tx::Postgres(_) => append_events_postgres(self, events).await?,
        }
        self.wake.appended(&mut self.tx, &mut self.wake_queued).await?;
        self.appended = true;
        Ok(())
    }

    async fn record_event_applied(
        &mut self,
        subscriber: &str,
        event_id: Uuid,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let recorded = self
            .tx
            .query(
                "INSERT INTO applied_events (subscriber, event_id, applied_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (subscriber, event_id) DO NOTHING",
            )
            .bind(subscriber)
            .bind_uuid(event_id)
            .bind_time(now)
            .execute()
            .await?;
        Ok(recorded > 0)
    }

    async fn record_events_applied(
        &mut self,
        subscriber: &str,
        event_ids: &[Uuid],
        now: OffsetDateTime,
    ) -> Result<Vec<Uuid>, StoreError> {
        if event_ids.is_empty() {
            return Ok(Vec::new());
        }
        // One statement for the whole set; how a set is unpacked differs (see
        // mark_outbox_published). `WHERE true` keeps SQLite from reading ON CONFLICT as part
        // of a join.
        let rows = self
            .tx
            .query(Sql::PerBackend {
                sqlite: "INSERT INTO applied_events (subscriber, event_id, applied_at) \
                         SELECT $1, value, $3 FROM json_each($2) WHERE true \
                         ON CONFLICT (subscriber, event_id) DO NOTHING RETURNING event_id",
                postgres: "INSERT INTO applied_events (subscriber, event_id, applied_at) \
                           SELECT $1, id, $3 FROM unnest($2::uuid[]) AS t(id) \
                           ON CONFLICT (subscriber, event_id) DO NOTHING RETURNING event_id",
            })
            .bind(subscriber)
            .bind_uuid_set(event_ids)
            .bind_time(now)
            .fetch_all()
            .await?;
        rows.iter().map(|row| row.uuid("event_id")).collect()
    }

    async fn count_events(
        &mut self,
        event_name: &str,
        count: i64,
        last_occurred_on: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.tx
            .query(
                "INSERT INTO event_stats (event_name, count, last_occurred_on) VALUES ($1, $2, $3) \
                 ON CONFLICT (event_name) DO UPDATE SET count = event_stats.count + excluded.count, \
                 last_occurred_on = CASE WHEN excluded.last_occurred_on > event_stats.last_occurred_on \
                 THEN excluded.last_occurred_on ELSE event_stats.last_occurred_on END",
            )
            .bind(event_name)
            .bind(count)
            .bind_time(last_occurred_on)
            .execute()
            .await?;
        Ok(())
    }
}

/// SQLite: one INSERT per event, dated by the application clock. Writers are serialised by
/// the unit of work's write lock, so rowid order is commit order (see 0005_outbox.sql).
async fn append_events_sqlite(uow: &mut SqlUnitOfWork, events: &[DomainEvent]) -> Result<(), StoreError> {
    let now = OffsetDateTime::now_utc();
    for event in events {
        uow.tx
            .query(
                "INSERT INTO outbox_events (id, event_id, aggregate_id, event_name, occurred_on, payload, status, \
                 attempts, created_at, updated_at, available_at, tenant_id, traceparent) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7, $7, $8, $9)",
            )
            .bind_uuid(Uuid::new_v4())
            .bind(event.event_id.to_string())
            .bind(event.aggregate_id.as_str())
            .bind(event.event_name.as_str())
            .bind_time(event.occurred_on)
            .bind_json(&event.payload)
            .bind_time(now)
            .bind(event.tenant_id.as_deref())
            .bind(event.traceparent.as_deref())
            .execute()
            .await?;
    }
    Ok(())
}

/// Postgres: one statement for all the events (arrays, which SQLite lacks), dated by the
/// database's `clock_timestamp()`, not now(): now() is the start of the transaction, and a
/// unit of work that began first but waited on a row lock would then date its events before
/// those of the unit of work it waited for. available_at keeps its default, now(): the earliest
/// time the row could be called ready, so a relay whose clock trails the database's a little
/// still sees it at once. ORDER BY the input position makes seq follow the given order.
async fn append_events_postgres(uow: &mut SqlUnitOfWork, events: &[DomainEvent]) -> Result<(), StoreError> {
    use sqlx::types::Json;
    let ids: Vec<Uuid> = events.iter().map(|_| Uuid::new_v4()).collect();
    let event_ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
    let aggregate_ids: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
    let names: Vec<&str> = events.iter().map(|e| e.event_name.as_str()).collect();
    let occurred: Vec<OffsetDateTime> = events.iter().map(|e| e.occurred_on).collect();
    let payloads: Vec<Json<&serde_json::Value>> = events.iter().map(|e| Json(&e.payload)).collect();
    let tenants: Vec<Option<&str>> = events.iter().map(|e| e.tenant_id.as_deref()).collect();
    let traceparents: Vec<Option<&str>> = events.iter().map(|e| e.traceparent.as_deref()).collect();
    let crate::sql::Tx::Postgres(tx) = &mut uow.tx else {
        return Err(StoreError::Corrupt("a Postgres append on another backend".into()));
    };
    sqlx::query(
        "INSERT INTO outbox_events (id, event_id, aggregate_id, event_name, occurred_on, payload, status, \
         attempts, created_at, updated_at, tenant_id, traceparent) \
         SELECT id, event_id, aggregate_id, event_name, occurred_on, payload, 'pending', 0, \
                clock_timestamp(), clock_timestamp(), tenant_id, traceparent \
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::jsonb[], \
                     $7::text[], $8::text[]) WITH ORDINALITY \
              AS t(id, event_id, aggregate_id, event_name, occurred_on, payload, tenant_id, traceparent, n) \
         ORDER BY n",
    )
    .bind(ids)
    .bind(event_ids)
    .bind(aggregate_ids)
    .bind(names)
    .bind(occurred)
    .bind(payloads)
    .bind(tenants)
    .bind(traceparents)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn outbox_record_from_row(row: &Row) -> Result<OutboxRecord, StoreError> {
    Ok(OutboxRecord {
        id: row.uuid("id")?,
        event: DomainEvent {
            // event_id is text on both (the predecessor's type); ours are always UUIDs.
            event_id: row.uuid_in_text("event_id")?,
            event_name: row.get("event_name")?,
            aggregate_id: row.get("aggregate_id")?,
            occurred_on: row.time("occurred_on")?,
            tenant_id: row.get("tenant_id")?,
            payload: row.json("payload")?,
            traceparent: row.get("traceparent")?,
        },
        status: row.get("status")?,
        attempts: row.get("attempts")?,
        last_error: row.get("last_error")?,
        published_at: row.opt_time("published_at")?,
        created_at: row.time("created_at")?,
    })
}

fn dead_letter_from_row(row: &Row) -> Result<DeadLetter, StoreError> {
    // The predecessor's table allowed NULL in every column; such rows are still listed (and
    // can be purged) instead of making every DLQ command fail.
    let created_at = row.time("created_at")?;
    let event_id: Option<String> = row.get("event_id")?;
    Ok(DeadLetter {
        id: row.uuid("id")?,
        event: DomainEvent {
            event_id: event_id.and_then(|id| Uuid::parse_str(&id).ok()).unwrap_or_else(Uuid::nil),
            event_name: row.get::<Option<String>>("event_name")?.unwrap_or_default(),
            aggregate_id: row.get::<Option<String>>("aggregate_id")?.unwrap_or_default(),
            occurred_on: row.opt_time("occurred_on")?.unwrap_or(created_at),
            tenant_id: row.get("tenant_id")?,
            payload: row.opt_json("payload")?.unwrap_or_else(|| serde_json::json!({})),
            traceparent: row.get("traceparent")?,
        },
        error: row.get::<Option<String>>("error")?.unwrap_or_default(),
        attempts: row.get::<Option<i32>>("attempts")?.unwrap_or_default(),
        created_at,
    })
}
