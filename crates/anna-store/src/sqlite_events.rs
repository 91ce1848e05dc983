//! [`EventLog`] on SQLite: the outbox relay's claims and marks, subscriber bookkeeping and
//! dead letters.
//!
//! One relay per database. Every write here is a single autocommit statement, which takes the
//! write lock before it reads anything (so the busy timeout applies, as with BEGIN IMMEDIATE).
//! Sets of ids travel as one JSON array read back with `json_each`: one statement per batch,
//! whatever its size.

use std::time::Duration;

use anna_domain::DomainEvent;
use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::sqlite::{SqliteStore, from_millis, get_time, get_uuid, outbox_record_from_row, to_millis};
use crate::{DeadLetter, EventLog, EventStat, OutboxRecord, OutboxStatus, StoreError};

/// ?1 = now, ?2 = end of the lease, ?3 = limit. Same rule as the Postgres claim (see
/// `postgres_events.rs`), with rowid as the insertion order. SQLite runs correlated
/// subqueries once per candidate, each an index range over the rows that really block.
const CLAIM: &str = "\
UPDATE outbox_events
SET status = 'processing', locked_until = ?2, attempts = attempts + 1, updated_at = ?1
WHERE rowid IN (
    SELECT o.rowid FROM outbox_events o
    WHERE o.status IN ('pending', 'processing')
      AND ((o.status = 'pending' AND o.available_at <= ?1)
           OR (o.status = 'processing' AND (o.locked_until IS NULL OR o.locked_until < ?1)))
      AND NOT EXISTS (
          SELECT 1 FROM outbox_events e
          WHERE e.status = 'pending' AND e.aggregate_id = o.aggregate_id AND e.available_at > ?1
            AND e.rowid < o.rowid)
      AND NOT EXISTS (
          SELECT 1 FROM outbox_events e
          WHERE e.status = 'processing' AND e.aggregate_id = o.aggregate_id AND e.locked_until >= ?1
            AND e.rowid < o.rowid)
    ORDER BY o.rowid
    LIMIT ?3
)
RETURNING rowid AS seq, id, event_id, aggregate_id, event_name, occurred_on, payload, status, attempts, last_error,
    published_at, created_at, tenant_id, traceparent";

#[async_trait]
impl EventLog for SqliteStore {
    async fn claim_outbox_batch(
        &self,
        limit: u32,
        lease: Duration,
        now: OffsetDateTime,
    ) -> Result<Vec<OutboxRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(CLAIM)
            .bind(to_millis(now)?)
            .bind(lease_end_millis(now, lease)?)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            match outbox_record_from_row(row) {
                Ok(record) => claimed.push((row.try_get::<i64, _>("seq")?, record)),
                // One unreadable row must not hold back the batch forever: it fails on its
                // own, visibly.
                Err(error) => {
                    let id = get_uuid(row, "id")?;
                    tracing::error!(outbox_id = %id, %error, "outbox row cannot be read; marked failed");
                    self.mark_outbox_failed(id, &format!("stored row cannot be read: {error}"), now).await?;
                }
            }
        }
        // RETURNING comes back in no promised order.
        claimed.sort_unstable_by_key(|(seq, _)| *seq);
        Ok(claimed.into_iter().map(|(_, record)| record).collect())
    }

    async fn mark_outbox_published(&self, ids: &[Uuid], now: OffsetDateTime) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        // Whatever the row's state, the relay did publish it. Already published rows keep
        // their first published_at.
        sqlx::query(
            "UPDATE outbox_events SET status = 'published', published_at = ?2, locked_until = NULL, updated_at = ?2 \
             WHERE id IN (SELECT value FROM json_each(?1)) AND status <> 'published'",
        )
        .bind(json_ids(ids))
        .bind(to_millis(now)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn mark_outbox_retry(
        &self,
        id: Uuid,
        error: &str,
        retry_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        // Only a claim in flight goes back: a relay whose lease ran out must not send a row
        // that was published since back to pending.
        sqlx::query(
            "UPDATE outbox_events SET status = 'pending', available_at = ?3, last_error = ?2, locked_until = NULL, \
             updated_at = ?4 WHERE id = ?1 AND status = 'processing'",
        )
        .bind(id.to_string())
        .bind(error)
        .bind(to_millis(retry_at)?)
        .bind(to_millis(now)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn mark_outbox_failed(&self, id: Uuid, error: &str, now: OffsetDateTime) -> Result<(), StoreError> {
        // See mark_outbox_retry for why only processing rows.
        sqlx::query(
            "UPDATE outbox_events SET status = 'failed', last_error = ?2, locked_until = NULL, updated_at = ?3 \
             WHERE id = ?1 AND status = 'processing'",
        )
        .bind(id.to_string())
        .bind(error)
        .bind(to_millis(now)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn requeue_failed_outbox(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        let now = to_millis(now)?;
        let done = sqlx::query(
            "UPDATE outbox_events SET status = 'pending', attempts = 0, available_at = ?, locked_until = NULL, \
             updated_at = ? WHERE status = 'failed'",
        )
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn purge_published_outbox(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM outbox_events WHERE status = 'published' AND published_at < ?")
            .bind(to_millis(before)?)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn outbox_status(&self) -> Result<OutboxStatus, StoreError> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(status = 'pending'), 0) AS pending, \
             COALESCE(SUM(status = 'processing'), 0) AS processing, \
             COALESCE(SUM(status = 'failed'), 0) AS failed, \
             MIN(CASE WHEN status IN ('pending', 'processing') THEN created_at END) AS oldest \
             FROM outbox_events WHERE status IN ('pending', 'processing', 'failed')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(OutboxStatus {
            pending: count(&row, "pending")?,
            processing: count(&row, "processing")?,
            failed: count(&row, "failed")?,
            oldest_unpublished_at: row.try_get::<Option<i64>, _>("oldest")?.map(from_millis).transpose()?,
        })
    }

    async fn wait_for_outbox(&self, timeout: Duration) {
        // Elapsed is the ordinary outcome: nothing was appended in the meantime.
        let _ = tokio::time::timeout(timeout, self.outbox_signal.notified()).await;
    }

    async fn is_event_applied(&self, subscriber: &str, event_id: Uuid) -> Result<bool, StoreError> {
        let applied: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM applied_events WHERE subscriber = ? AND event_id = ?)")
                .bind(subscriber)
                .bind(event_id.to_string())
                .fetch_one(&self.pool)
                .await?;
        Ok(applied)
    }

    async fn record_event_failure(
        &self,
        subscriber: &str,
        event_id: Uuid,
        error: &str,
        now: OffsetDateTime,
    ) -> Result<u32, StoreError> {
        let attempts: i64 = sqlx::query_scalar(
            "INSERT INTO event_attempts (subscriber, event_id, attempts, last_error, updated_at) \
             VALUES (?1, ?2, 1, ?3, ?4) \
             ON CONFLICT (subscriber, event_id) DO UPDATE SET attempts = attempts + 1, \
             last_error = excluded.last_error, updated_at = excluded.updated_at \
             RETURNING attempts",
        )
        .bind(subscriber)
        .bind(event_id.to_string())
        .bind(error)
        .bind(to_millis(now)?)
        .fetch_one(&self.pool)
        .await?;
        u32::try_from(attempts).map_err(|_| StoreError::Corrupt(format!("event_attempts.attempts {attempts}")))
    }

    async fn reset_event_attempts(&self, event_id: Uuid) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM event_attempts WHERE event_id = ?")
            .bind(event_id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn purge_applied_events(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM applied_events WHERE applied_at < ?")
            .bind(to_millis(before)?)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM event_attempts WHERE updated_at < ?")
            .bind(to_millis(before)?)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn insert_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let event = &letter.event;
        sqlx::query(
            "INSERT INTO dead_letters (id, event_id, aggregate_id, event_name, occurred_on, payload, error, attempts, \
             created_at, tenant_id, traceparent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(letter.id.to_string())
        .bind(event.event_id.to_string())
        .bind(&event.aggregate_id)
        .bind(&event.event_name)
        .bind(to_millis(event.occurred_on)?)
        .bind(event.payload.to_string())
        .bind(&letter.error)
        .bind(letter.attempts)
        .bind(to_millis(letter.created_at)?)
        .bind(&event.tenant_id)
        .bind(&event.traceparent)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, StoreError> {
        // rowid breaks ties between letters written in the same millisecond.
        let rows = sqlx::query(
            "SELECT id, event_id, aggregate_id, event_name, occurred_on, payload, error, attempts, created_at, \
             tenant_id, traceparent FROM dead_letters ORDER BY created_at, rowid LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(dead_letter_from_row).collect()
    }

    async fn delete_dead_letters(&self, ids: Option<&[Uuid]>) -> Result<u64, StoreError> {
        let done = match ids {
            None => sqlx::query("DELETE FROM dead_letters").execute(&self.pool).await?,
            Some([]) => return Ok(0),
            Some(ids) => {
                sqlx::query("DELETE FROM dead_letters WHERE id IN (SELECT value FROM json_each(?))")
                    .bind(json_ids(ids))
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected())
    }

    async fn event_stats(&self) -> Result<Vec<EventStat>, StoreError> {
        let rows = sqlx::query("SELECT event_name, count, last_occurred_on FROM event_stats ORDER BY event_name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(EventStat {
                    event_name: row.try_get("event_name")?,
                    count: row.try_get("count")?,
                    last_occurred_on: from_millis(row.try_get("last_occurred_on")?)?,
                })
            })
            .collect()
    }
}

/// `now + lease` in unix milliseconds, saturating far in the future rather than failing on an
/// absurd lease.
fn lease_end_millis(now: OffsetDateTime, lease: Duration) -> Result<i64, StoreError> {
    let end = time::Duration::try_from(lease)
        .ok()
        .and_then(|lease| now.checked_add(lease))
        .unwrap_or(time::macros::datetime!(9999-12-31 0:00 UTC));
    to_millis(end)
}

/// Ids as a JSON array of hyphenated strings, the form they are stored in.
fn json_ids(ids: &[Uuid]) -> String {
    serde_json::Value::from(ids.iter().map(Uuid::to_string).collect::<Vec<_>>()).to_string()
}

fn count(row: &SqliteRow, column: &str) -> Result<u64, StoreError> {
    let value: i64 = row.try_get(column)?;
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative count {value} for {column}")))
}

fn dead_letter_from_row(row: &SqliteRow) -> Result<DeadLetter, StoreError> {
    let payload: String = row.try_get("payload")?;
    let payload = serde_json::from_str(&payload)
        .map_err(|e| StoreError::Corrupt(format!("dead letter payload is not JSON: {e}")))?;
    Ok(DeadLetter {
        id: get_uuid(row, "id")?,
        event: DomainEvent {
            event_id: get_uuid(row, "event_id")?,
            event_name: row.try_get("event_name")?,
            aggregate_id: row.try_get("aggregate_id")?,
            occurred_on: get_time(row, "occurred_on")?,
            tenant_id: row.try_get("tenant_id")?,
            payload,
            traceparent: row.try_get("traceparent")?,
        },
        error: row.try_get("error")?,
        attempts: row.try_get("attempts")?,
        created_at: get_time(row, "created_at")?,
    })
}
