//! [`Stream`] in the application's SQLite database, for single-binary deployments without Redis.
//! The tables (`stream_entries`, `stream_groups`, `stream_pending`) come from anna-store's
//! migration `0006_embedded_streams.sql`, which documents them.
//!
//! Semantics follow Redis Streams: ids `"<n>-0"` that only grow, consumer groups that start at
//! the beginning, a pending list per group with delivery counts and idle times, claims that
//! bump the count, and trimming that never drops what a group has not read and acknowledged.
//!
//! Waiting readers are woken in-process: one [`Notify`] per stream, fired after an append
//! commits. Handles built on pools of the same database file share these (a process-wide
//! registry keyed by the file), and so do clones. Appends by another process are only seen when
//! a waiting reader's block runs out (it checks once more then), so blocks stay short there.
//!
//! Multi-statement writes run in `BEGIN IMMEDIATE` transactions: SQLite has one writer, and
//! taking the write lock up front makes a second writer wait (busy timeout) instead of failing
//! when it upgrades a read transaction. Single-statement writes take the lock as they start.
//!
//! Trimming (`append` with `max_len`) runs after the append, at most once per
//! [`TRIM_EVERY_APPENDS`] appends or every [`TRIM_INTERVAL`] per stream, in the same way as the
//! Redis implementation; it trims exactly (no `~`) down to `max_len`, or less far when a group
//! still needs older entries.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use tokio::sync::Notify;

use crate::trim_clock::TrimClocks;
use crate::{BatchAppendError, Delivery, Entry, Fields, GroupInfo, PendingSummary, Stream, StreamError};

pub use crate::trim_clock::{TRIM_EVERY_APPENDS, TRIM_INTERVAL};
/// Stream names whose wakers are remembered before unused ones are dropped.
const MAX_TRACKED_STREAMS: usize = 1024;
const INSERT_ENTRY: &str = "INSERT INTO stream_entries (stream, fields) VALUES (?, ?) RETURNING id";
/// Ids per `IN (…)` list, well below SQLite's bound-parameter limit.
const IDS_PER_STATEMENT: usize = 500;

/// The embedded implementation of [`Stream`]. Cheap to clone; clones share their wakers.
#[derive(Clone)]
pub struct EmbeddedStream {
    pool: SqlitePool,
    shared: Arc<Shared>,
}

/// What every handle on one database file shares within a process.
#[derive(Default)]
struct Shared {
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    trim_clocks: TrimClocks,
}

impl std::fmt::Debug for EmbeddedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStream").field("database", &database_key(&self.pool)).finish()
    }
}

impl EmbeddedStream {
    /// Streams in `pool`'s database, which must have anna-store's SQLite migrations applied.
    pub fn new(pool: SqlitePool) -> Self {
        static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Weak<Shared>>>> = OnceLock::new();
        let key = database_key(&pool);
        let mut registry = lock(REGISTRY.get_or_init(Default::default));
        registry.retain(|_, shared| shared.strong_count() > 0);
        let shared = match registry.get(&key).and_then(Weak::upgrade) {
            Some(shared) => shared,
            None => {
                let shared = Arc::new(Shared::default());
                registry.insert(key, Arc::downgrade(&shared));
                shared
            }
        };
        Self { pool, shared }
    }

    fn waker(&self, stream: &str) -> Arc<Notify> {
        let mut wakers = lock(&self.shared.wakers);
        if let Some(notify) = wakers.get(stream) {
            return Arc::clone(notify);
        }
        if wakers.len() >= MAX_TRACKED_STREAMS {
            // Only the map holds those: nobody is waiting on them.
            wakers.retain(|_, notify| Arc::strong_count(notify) > 1);
        }
        let notify = Arc::new(Notify::new());
        wakers.insert(stream.to_owned(), Arc::clone(&notify));
        notify
    }

    fn wake(&self, stream: &str) {
        // A reader registers its waker before it looks at the table, so one that missed this
        // entry is in the map by now.
        let notify = lock(&self.shared.wakers).get(stream).cloned();
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// Runs `attempt` until it finds something or `block` runs out, sleeping between attempts
    /// until an append to `stream` wakes it.
    async fn wait_for<T, F, Fut>(&self, stream: &str, block: Duration, mut attempt: F) -> Result<Vec<T>, StreamError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Vec<T>, StreamError>>,
    {
        if block.is_zero() {
            return attempt().await;
        }
        let deadline = tokio::time::Instant::now() + block;
        let notify = self.waker(stream);
        loop {
            // Created before the attempt, so an append committed after the attempt looked
            // still wakes it (notify_waiters reaches every Notified created before the call).
            let notified = notify.notified();
            let found = attempt().await?;
            if !found.is_empty() {
                return Ok(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                // One last look covers appends by other processes, which send no wake-up.
                return attempt().await;
            }
        }
    }

    async fn maybe_trim(&self, stream: &str, max_len: Option<u64>, appended: usize) {
        let Some(max_len) = max_len else {
            return;
        };
        if !self.shared.trim_clocks.due(stream, appended) {
            return;
        }
        // The entries are in: failing the append now would only make the caller add them again.
        if let Err(e) = self.trim(stream, max_len).await {
            tracing::warn!(stream, error = %e, "could not trim the stream; the next check retries");
        }
    }

    /// Deletes the oldest entries down to `max_len`, but none that a group has not yet been
    /// given (id > its last delivered id) or still has pending. Returns how many went.
    async fn trim(&self, stream: &str, max_len: u64) -> Result<u64, StreamError> {
        let Ok(max_len) = i64::try_from(max_len) else {
            return Ok(0);
        };
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let len: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM stream_entries WHERE stream = ?")
            .bind(stream)
            .fetch_one(&mut *tx)
            .await?;
        if len <= max_len {
            return Ok(0);
        }
        // The entry that is first once max_len are left.
        let cut: Option<i64> =
            sqlx::query_scalar("SELECT id FROM stream_entries WHERE stream = ? ORDER BY id LIMIT 1 OFFSET ?")
                .bind(stream)
                .bind(len - max_len)
                .fetch_optional(&mut *tx)
                .await?;
        let oldest_pending: Option<i64> =
            sqlx::query_scalar("SELECT MIN(entry_id) FROM stream_pending WHERE stream = ?")
                .bind(stream)
                .fetch_one(&mut *tx)
                .await?;
        let least_delivered: Option<i64> =
            sqlx::query_scalar("SELECT MIN(last_delivered_id) FROM stream_groups WHERE stream = ?")
                .bind(stream)
                .fetch_one(&mut *tx)
                .await?;
        // A stream nobody reads yet keeps everything: a group created later starts at the
        // beginning.
        let Some(least_delivered) = least_delivered else {
            return Ok(0);
        };
        let first_undelivered = Some(least_delivered.saturating_add(1));
        let Some(keep_from) = [cut, oldest_pending, first_undelivered].into_iter().flatten().min() else {
            return Ok(0);
        };
        let done = sqlx::query("DELETE FROM stream_entries WHERE stream = ? AND id < ?")
            .bind(stream)
            .bind(keep_from)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn group_position(
        &self,
        executor: impl sqlx::SqliteExecutor<'_>,
        stream: &str,
        group: &str,
    ) -> Result<i64, StreamError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT last_delivered_id FROM stream_groups WHERE stream = ? AND group_name = ?")
                .bind(stream)
                .bind(group)
                .fetch_optional(executor)
                .await?;
        position.ok_or_else(|| no_group(stream, group))
    }

    async fn try_read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Delivery>, StreamError> {
        // Looking first without the write lock keeps idle readers from queueing behind writers.
        let has_new: Option<i64> = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM stream_entries e WHERE e.stream = g.stream AND e.id > g.last_delivered_id) \
             FROM stream_groups g WHERE g.stream = ? AND g.group_name = ?",
        )
        .bind(stream)
        .bind(group)
        .fetch_optional(&self.pool)
        .await?;
        match has_new {
            None => return Err(no_group(stream, group)),
            Some(0) => return Ok(Vec::new()),
            Some(_) => {}
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let last_delivered = self.group_position(&mut *tx, stream, group).await?;
        let rows = sqlx::query("SELECT id, fields FROM stream_entries WHERE stream = ? AND id > ? ORDER BY id LIMIT ?")
            .bind(stream)
            .bind(last_delivered)
            .bind(sql_count(count))
            .fetch_all(&mut *tx)
            .await?;
        let entries = rows.iter().map(entry_from_row).collect::<Result<Vec<_>, _>>()?;
        let Some(newest) = entries.last().map(|(seq, _)| *seq) else {
            return Ok(Vec::new());
        };
        sqlx::query(
            "INSERT INTO stream_pending (stream, group_name, entry_id, consumer, delivery_count, delivered_at) \
             SELECT stream, ?, id, ?, 1, ? FROM stream_entries WHERE stream = ? AND id > ? AND id <= ?",
        )
        .bind(group)
        .bind(consumer)
        .bind(now_millis())
        .bind(stream)
        .bind(last_delivered)
        .bind(newest)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE stream_groups SET last_delivered_id = ? WHERE stream = ? AND group_name = ?")
            .bind(newest)
            .bind(stream)
            .bind(group)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(entries.into_iter().map(|(_, entry)| Delivery { entry, delivery_count: 1 }).collect())
    }

    async fn try_read_after(&self, stream: &str, after: i64, count: usize) -> Result<Vec<Entry>, StreamError> {
        let rows = sqlx::query("SELECT id, fields FROM stream_entries WHERE stream = ? AND id > ? ORDER BY id LIMIT ?")
            .bind(stream)
            .bind(after)
            .bind(sql_count(count))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|row| entry_from_row(row).map(|(_, entry)| entry)).collect()
    }
}

#[async_trait]
impl Stream for EmbeddedStream {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn ping(&self) -> Result<(), StreamError> {
        sqlx::query("SELECT 1 FROM stream_groups LIMIT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn append(&self, stream: &str, fields: &Fields, max_len: Option<u64>) -> Result<String, StreamError> {
        let json = encode_fields(fields)?;
        let seq: i64 = sqlx::query_scalar(INSERT_ENTRY).bind(stream).bind(json).fetch_one(&self.pool).await?;
        self.wake(stream);
        self.maybe_trim(stream, max_len, 1).await;
        Ok(format_id(seq))
    }

    /// One transaction: all entries or none, and one commit instead of one per entry.
    async fn append_batch(
        &self,
        stream: &str,
        entries: &[Fields],
        max_len: Option<u64>,
    ) -> Result<Vec<String>, BatchAppendError> {
        let failed = |error: StreamError| BatchAppendError { appended: Vec::new(), error };
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let encoded = entries.iter().map(encode_fields).collect::<Result<Vec<_>, _>>().map_err(failed)?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(|e| failed(e.into()))?;
        let mut ids = Vec::with_capacity(encoded.len());
        for json in encoded {
            let seq: i64 = sqlx::query_scalar(INSERT_ENTRY)
                .bind(stream)
                .bind(json)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| failed(e.into()))?;
            ids.push(format_id(seq));
        }
        tx.commit().await.map_err(|e| failed(e.into()))?;
        self.wake(stream);
        self.maybe_trim(stream, max_len, ids.len()).await;
        Ok(ids)
    }

    async fn create_group(&self, stream: &str, group: &str) -> Result<(), StreamError> {
        sqlx::query(
            "INSERT INTO stream_groups (stream, group_name, last_delivered_id) VALUES (?, ?, 0) \
             ON CONFLICT (stream, group_name) DO NOTHING",
        )
        .bind(stream)
        .bind(group)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>, StreamError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        self.wait_for(stream, block, || self.try_read_group(stream, group, consumer, count)).await
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64, StreamError> {
        let seqs = entry_seqs(ids)?;
        let mut acked = 0;
        for chunk in seqs.chunks(IDS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("DELETE FROM stream_pending WHERE stream = ");
            query.push_bind(stream).push(" AND group_name = ").push_bind(group).push(" AND entry_id IN (");
            push_id_list(&mut query, chunk);
            query.push(")");
            acked += query.build().execute(&self.pool).await?.rows_affected();
        }
        Ok(acked)
    }

    async fn touch(&self, stream: &str, group: &str, consumer: &str, ids: &[String]) -> Result<u64, StreamError> {
        let seqs = entry_seqs(ids)?;
        let now = now_millis();
        let mut touched = 0;
        for chunk in seqs.chunks(IDS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("UPDATE stream_pending SET delivered_at = ");
            query
                .push_bind(now)
                .push(" WHERE stream = ")
                .push_bind(stream)
                .push(" AND group_name = ")
                .push_bind(group)
                .push(" AND consumer = ")
                .push_bind(consumer)
                .push(" AND entry_id IN (");
            push_id_list(&mut query, chunk);
            query.push(")");
            touched += query.build().execute(&self.pool).await?.rows_affected();
        }
        Ok(touched)
    }

    async fn delete(&self, stream: &str, ids: &[String]) -> Result<u64, StreamError> {
        let seqs = entry_seqs(ids)?;
        let mut deleted = 0;
        for chunk in seqs.chunks(IDS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("DELETE FROM stream_entries WHERE stream = ");
            query.push_bind(stream).push(" AND id IN (");
            push_id_list(&mut query, chunk);
            query.push(")");
            deleted += query.build().execute(&self.pool).await?.rows_affected();
        }
        Ok(deleted)
    }

    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Delivery>, StreamError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let now = now_millis();
        let idle_since = now.saturating_sub(i64::try_from(min_idle.as_millis()).unwrap_or(i64::MAX));
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        self.group_position(&mut *tx, stream, group).await?;
        let rows = sqlx::query(
            "SELECT p.entry_id, p.delivery_count, e.fields FROM stream_pending p \
             LEFT JOIN stream_entries e ON e.stream = p.stream AND e.id = p.entry_id \
             WHERE p.stream = ? AND p.group_name = ? AND p.delivered_at <= ? ORDER BY p.entry_id LIMIT ?",
        )
        .bind(stream)
        .bind(group)
        .bind(idle_since)
        .bind(sql_count(count))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut claimed = Vec::with_capacity(rows.len());
        let mut gone = Vec::new();
        for row in &rows {
            let seq: i64 = row.try_get(0)?;
            let delivery_count: i64 = row.try_get(1)?;
            match row.try_get::<Option<String>, _>(2)? {
                Some(json) => claimed.push(Delivery {
                    entry: Entry { id: format_id(seq), fields: decode_fields(&json)? },
                    delivery_count: u64::try_from(delivery_count).unwrap_or(0).saturating_add(1),
                }),
                None => gone.push(seq),
            }
        }
        // The same rows as selected above: the write lock has been held since.
        sqlx::query(
            "UPDATE stream_pending SET consumer = ?, delivery_count = delivery_count + 1, delivered_at = ? \
             WHERE stream = ? AND group_name = ? AND entry_id IN ( \
                 SELECT entry_id FROM stream_pending WHERE stream = ? AND group_name = ? AND delivered_at <= ? \
                 ORDER BY entry_id LIMIT ?)",
        )
        .bind(consumer)
        .bind(now)
        .bind(stream)
        .bind(group)
        .bind(stream)
        .bind(group)
        .bind(idle_since)
        .bind(sql_count(count))
        .execute(&mut *tx)
        .await?;
        // Trimming here never removes pending entries, but someone may have deleted rows by
        // hand: like Redis 7, drop those from the pending list instead of claiming nothing.
        if !gone.is_empty() {
            for chunk in gone.chunks(IDS_PER_STATEMENT) {
                let mut query = QueryBuilder::<Sqlite>::new("DELETE FROM stream_pending WHERE stream = ");
                query.push_bind(stream).push(" AND group_name = ").push_bind(group).push(" AND entry_id IN (");
                push_id_list(&mut query, chunk);
                query.push(")");
                query.build().execute(&mut *tx).await?;
            }
            tracing::warn!(
                stream,
                group,
                deleted = gone.len(),
                "pending entries were deleted from the stream before being acknowledged; they are lost to this group"
            );
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn pending(&self, stream: &str, group: &str) -> Result<PendingSummary, StreamError> {
        self.group_position(&self.pool, stream, group).await?;
        let rows = sqlx::query(
            "SELECT consumer, COUNT(*), MIN(entry_id) FROM stream_pending \
             WHERE stream = ? AND group_name = ? GROUP BY consumer",
        )
        .bind(stream)
        .bind(group)
        .fetch_all(&self.pool)
        .await?;
        let mut summary = PendingSummary::default();
        let mut oldest: Option<i64> = None;
        for row in &rows {
            let consumer: String = row.try_get(0)?;
            let count = u64::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0);
            let first: i64 = row.try_get(2)?;
            oldest = Some(oldest.map_or(first, |o| o.min(first)));
            summary.count += count;
            summary.consumers.insert(consumer, count);
        }
        summary.oldest_id = oldest.map(format_id);
        Ok(summary)
    }

    async fn read_after(
        &self,
        stream: &str,
        after: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, StreamError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        // "<n>-<m>" with m > 0 lies between "<n>-0" and "<n+1>-0".
        let (after, _) = parse_id(after)?;
        self.wait_for(stream, block, || self.try_read_after(stream, after, count)).await
    }

    async fn last_id(&self, stream: &str) -> Result<Option<String>, StreamError> {
        let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM stream_entries WHERE stream = ?")
            .bind(stream)
            .fetch_one(&self.pool)
            .await?;
        Ok(newest.map(format_id))
    }

    async fn len(&self, stream: &str) -> Result<u64, StreamError> {
        let len: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM stream_entries WHERE stream = ?")
            .bind(stream)
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(len).unwrap_or(0))
    }

    async fn groups(&self, stream: &str) -> Result<Vec<GroupInfo>, StreamError> {
        let rows = sqlx::query(
            "SELECT g.group_name, g.last_delivered_id, \
                 (SELECT COUNT(*) FROM stream_pending p WHERE p.stream = g.stream AND p.group_name = g.group_name), \
                 (SELECT COUNT(*) FROM stream_entries e WHERE e.stream = g.stream AND e.id > g.last_delivered_id) \
             FROM stream_groups g WHERE g.stream = ? ORDER BY g.group_name",
        )
        .bind(stream)
        .fetch_all(&self.pool)
        .await?;
        let mut groups = Vec::with_capacity(rows.len());
        for row in &rows {
            groups.push(GroupInfo {
                name: row.try_get(0)?,
                last_delivered_id: format_id(row.try_get(1)?),
                pending: u64::try_from(row.try_get::<i64, _>(2)?).unwrap_or(0),
                lag: u64::try_from(row.try_get::<i64, _>(3)?).unwrap_or(0),
            });
        }
        // Byte order, like Redis (SQLite's ORDER BY on TEXT is byte order too; this pins it).
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(groups)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Identifies the database file, so that handles on separate pools of one file share wakers.
fn database_key(pool: &SqlitePool) -> PathBuf {
    let options = pool.connect_options();
    let file = options.get_filename();
    std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf())
}

fn no_group(stream: &str, group: &str) -> StreamError {
    StreamError::NoGroup { stream: stream.to_owned(), group: group.to_owned() }
}

fn format_id(seq: i64) -> String {
    format!("{seq}-0")
}

/// `"<n>"` or `"<n>-<m>"`, as Redis accepts them.
/// The sequence numbers of well-formed entry ids (every id here ends in `-0`), sorted, unique.
fn entry_seqs(ids: &[String]) -> Result<Vec<i64>, StreamError> {
    let mut seqs = Vec::with_capacity(ids.len());
    for id in ids {
        let (seq, sub) = parse_id(id)?;
        if sub == 0 {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    seqs.dedup();
    Ok(seqs)
}

fn parse_id(id: &str) -> Result<(i64, i64), StreamError> {
    let invalid = || StreamError::Protocol(format!("invalid stream id {id:?}"));
    let (seq, sub) = id.split_once('-').unwrap_or((id, "0"));
    let seq: u64 = seq.parse().map_err(|_| invalid())?;
    let sub: u64 = sub.parse().map_err(|_| invalid())?;
    // Ids beyond i64 exist in Redis but never here: they sort after everything stored.
    let seq = i64::try_from(seq).unwrap_or(i64::MAX);
    Ok((seq, i64::from(sub != 0)))
}

fn sql_count(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
}

fn encode_fields(fields: &Fields) -> Result<String, StreamError> {
    if fields.is_empty() {
        // Redis refuses entries without fields; the two backends must agree.
        return Err(StreamError::Protocol("a stream entry needs at least one field".to_owned()));
    }
    serde_json::to_string(fields).map_err(|e| StreamError::Protocol(format!("cannot encode an entry's fields: {e}")))
}

fn decode_fields(json: &str) -> Result<Fields, StreamError> {
    serde_json::from_str::<BTreeMap<String, String>>(json)
        .map_err(|e| StreamError::Protocol(format!("a stored entry's fields are not a JSON object of strings: {e}")))
}

fn entry_from_row(row: &SqliteRow) -> Result<(i64, Entry), StreamError> {
    let seq: i64 = row.try_get(0)?;
    let json: String = row.try_get(1)?;
    Ok((seq, Entry { id: format_id(seq), fields: decode_fields(&json)? }))
}

fn push_id_list(query: &mut QueryBuilder<Sqlite>, ids: &[i64]) {
    let mut list = query.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
}
