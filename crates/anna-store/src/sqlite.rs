//! The embedded backend: one SQLite file in WAL mode.
//!
//! Timestamps are INTEGER unix milliseconds, UUIDs hyphenated TEXT, JSON TEXT. Units of work
//! start with `BEGIN IMMEDIATE`: SQLite has a single writer, and taking the write lock up front
//! makes a second writer wait (busy timeout) instead of failing with `SQLITE_BUSY` when it
//! tries to upgrade a read transaction halfway through.
//!
//! The [`crate::EventLog`] half of the store is in `sqlite_events.rs`.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anna_domain::{DomainEvent, RefreshToken, User, UserStatus};
use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use time::OffsetDateTime;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::{Backend, ConnectOptions, OutboxRecord, Store, StoreError, UnitOfWork};

// Macros rather than consts so that `concat!` builds each query as one `&'static str`.
macro_rules! user_columns {
    () => {
        "id, name, email, status, password_hash, verification_token, verification_code, \
         verification_token_expires_at, verification_attempts, verified_at, password_reset_token, \
         password_reset_token_expires_at, password_reset_attempts, created_at, updated_at, last_login_at"
    };
}

macro_rules! refresh_token_columns {
    () => {
        "token_hash, user_id, family_id, created_at, expires_at, revoked_at, replaced_by_token_hash, user_agent, ip"
    };
}

const SELECT_USER_BY_ID: &str = concat!("SELECT ", user_columns!(), " FROM users WHERE id = ?");
const SELECT_USER_BY_EMAIL: &str = concat!("SELECT ", user_columns!(), " FROM users WHERE email = ?");
const SELECT_REFRESH_TOKEN: &str =
    concat!("SELECT ", refresh_token_columns!(), " FROM refresh_tokens WHERE token_hash = ?");

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
    /// Signalled when a unit of work that appended events commits. In-process only, which is
    /// enough: an embedded deployment runs its single relay in the process that writes.
    pub(crate) outbox_signal: Arc<Notify>,
}

impl SqliteStore {
    /// The connection pool, shared with the embedded event streams that live in the same file.
    pub fn pool(&self) -> SqlitePool {
        self.pool.clone()
    }

    /// Opens (creating when missing) the database file named by a `sqlite:` URL.
    pub async fn connect(url: &str, options: &ConnectOptions) -> Result<Self, StoreError> {
        let connect_options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        if !is_in_memory(url) {
            create_parent_dir(connect_options.get_filename())?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect_options)
            .await?;
        Ok(Self { pool, outbox_signal: Arc::new(Notify::new()) })
    }
}

fn is_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

fn create_parent_dir(file: &Path) -> Result<(), StoreError> {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => Ok(std::fs::create_dir_all(parent)?),
        _ => Ok(()),
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/sqlite").run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn begin(&self) -> Result<Box<dyn UnitOfWork>, StoreError> {
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(Box::new(SqliteUnitOfWork { tx, appended: false, outbox_signal: self.outbox_signal.clone() }))
    }

    async fn find_user_by_id(&self, id: Uuid) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(SELECT_USER_BY_ID).bind(id.to_string()).fetch_optional(&self.pool).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn find_user_by_email(&self, email: &str) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(SELECT_USER_BY_EMAIL).bind(email).fetch_optional(&self.pool).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn find_refresh_token(&self, token_hash: &str) -> Result<Option<RefreshToken>, StoreError> {
        let row = sqlx::query(SELECT_REFRESH_TOKEN).bind(token_hash).fetch_optional(&self.pool).await?;
        row.as_ref().map(refresh_token_from_row).transpose()
    }

    async fn purge_expired_refresh_tokens(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM refresh_tokens WHERE expires_at < ?")
            .bind(to_millis(now)?)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn outbox_events_for_aggregate(&self, aggregate_id: &str) -> Result<Vec<OutboxRecord>, StoreError> {
        // rowid, not created_at: see migrations/sqlite/0005_outbox.sql.
        let rows = sqlx::query(
            "SELECT id, event_id, aggregate_id, event_name, occurred_on, payload, status, attempts, last_error, \
             published_at, created_at, tenant_id, traceparent \
             FROM outbox_events WHERE aggregate_id = ? ORDER BY rowid",
        )
        .bind(aggregate_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_record_from_row).collect()
    }

    async fn close(&self) {
        self.pool.close().await;
        // A relay waiting for the outbox gets to see that the store is closed.
        self.outbox_signal.notify_waiters();
    }
}

/// Dropping it without `commit` rolls back (sqlx queues the ROLLBACK on the connection).
struct SqliteUnitOfWork {
    tx: Transaction<'static, Sqlite>,
    /// Whether the commit must wake the relay.
    appended: bool,
    outbox_signal: Arc<Notify>,
}

#[async_trait]
impl UnitOfWork for SqliteUnitOfWork {
    // No FOR UPDATE on SQLite: BEGIN IMMEDIATE already holds the database-wide write lock.
    async fn find_user_by_id(&mut self, id: Uuid) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(SELECT_USER_BY_ID).bind(id.to_string()).fetch_optional(&mut *self.tx).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn find_user_by_email(&mut self, email: &str) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(SELECT_USER_BY_EMAIL).bind(email).fetch_optional(&mut *self.tx).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn insert_user(&mut self, user: &User) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO users (id, name, email, status, password_hash, verification_token, verification_code, \
             verification_token_expires_at, verification_attempts, verified_at, password_reset_token, \
             password_reset_token_expires_at, password_reset_attempts, created_at, updated_at, last_login_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(user.id.to_string())
        .bind(&user.name)
        .bind(&user.email)
        .bind(user.status.as_str())
        .bind(&user.password_hash)
        .bind(&user.verification_token)
        .bind(&user.verification_code)
        .bind(opt_millis(user.verification_token_expires_at)?)
        .bind(user.verification_attempts)
        .bind(opt_millis(user.verified_at)?)
        .bind(&user.password_reset_token)
        .bind(opt_millis(user.password_reset_token_expires_at)?)
        .bind(user.password_reset_attempts)
        .bind(to_millis(user.created_at)?)
        .bind(to_millis(user.updated_at)?)
        .bind(opt_millis(user.last_login_at)?)
        .execute(&mut *self.tx)
        .await
        .map_err(map_unique_violation)?;
        Ok(())
    }

    async fn update_user(&mut self, user: &User) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE users SET name = ?, email = ?, status = ?, password_hash = ?, verification_token = ?, \
             verification_code = ?, verification_token_expires_at = ?, verification_attempts = ?, verified_at = ?, \
             password_reset_token = ?, password_reset_token_expires_at = ?, password_reset_attempts = ?, \
             updated_at = ?, last_login_at = ? WHERE id = ?",
        )
        .bind(&user.name)
        .bind(&user.email)
        .bind(user.status.as_str())
        .bind(&user.password_hash)
        .bind(&user.verification_token)
        .bind(&user.verification_code)
        .bind(opt_millis(user.verification_token_expires_at)?)
        .bind(user.verification_attempts)
        .bind(opt_millis(user.verified_at)?)
        .bind(&user.password_reset_token)
        .bind(opt_millis(user.password_reset_token_expires_at)?)
        .bind(user.password_reset_attempts)
        .bind(to_millis(user.updated_at)?)
        .bind(opt_millis(user.last_login_at)?)
        .bind(user.id.to_string())
        .execute(&mut *self.tx)
        .await
        .map_err(map_unique_violation)?;
        Ok(())
    }

    async fn insert_refresh_token(&mut self, token: &RefreshToken) -> Result<(), StoreError> {
        insert_refresh_token(&mut self.tx, token).await
    }

    async fn find_refresh_token(&mut self, token_hash: &str) -> Result<Option<RefreshToken>, StoreError> {
        let row = sqlx::query(SELECT_REFRESH_TOKEN).bind(token_hash).fetch_optional(&mut *self.tx).await?;
        row.as_ref().map(refresh_token_from_row).transpose()
    }

    async fn rotate_refresh_token(
        &mut self,
        old_hash: &str,
        replacement: &RefreshToken,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = ?, replaced_by_token_hash = ? \
             WHERE token_hash = ? AND revoked_at IS NULL",
        )
        .bind(to_millis(now)?)
        .bind(&replacement.token_hash)
        .bind(old_hash)
        .execute(&mut *self.tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        insert_refresh_token(&mut self.tx, replacement).await?;
        Ok(true)
    }

    async fn revoke_refresh_token(&mut self, token_hash: &str, now: OffsetDateTime) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE refresh_tokens SET revoked_at = ? WHERE token_hash = ? AND revoked_at IS NULL")
            .bind(to_millis(now)?)
            .bind(token_hash)
            .execute(&mut *self.tx)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn revoke_refresh_token_family(&mut self, family_id: Uuid, now: OffsetDateTime) -> Result<u64, StoreError> {
        let done = sqlx::query("UPDATE refresh_tokens SET revoked_at = ? WHERE family_id = ? AND revoked_at IS NULL")
            .bind(to_millis(now)?)
            .bind(family_id.to_string())
            .execute(&mut *self.tx)
            .await?;
        Ok(done.rows_affected())
    }

    async fn revoke_user_refresh_tokens(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<u64, StoreError> {
        let done = sqlx::query("UPDATE refresh_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL")
            .bind(to_millis(now)?)
            .bind(user_id.to_string())
            .execute(&mut *self.tx)
            .await?;
        Ok(done.rows_affected())
    }

    async fn append_events(&mut self, events: &[DomainEvent]) -> Result<(), StoreError> {
        let now = to_millis(OffsetDateTime::now_utc())?;
        for event in events {
            sqlx::query(
                "INSERT INTO outbox_events (id, event_id, aggregate_id, event_name, occurred_on, payload, status, \
                 attempts, created_at, updated_at, available_at, tenant_id, traceparent) \
                 VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?, ?)",
            )
            .bind(Uuid::new_v4().to_string())
            .bind(event.event_id.to_string())
            .bind(&event.aggregate_id)
            .bind(&event.event_name)
            .bind(to_millis(event.occurred_on)?)
            .bind(event.payload.to_string())
            .bind(now)
            .bind(now)
            .bind(now)
            .bind(&event.tenant_id)
            .bind(&event.traceparent)
            .execute(&mut *self.tx)
            .await?;
        }
        self.appended |= !events.is_empty();
        Ok(())
    }

    async fn record_event_applied(
        &mut self,
        subscriber: &str,
        event_id: Uuid,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO applied_events (subscriber, event_id, applied_at) VALUES (?, ?, ?) \
             ON CONFLICT (subscriber, event_id) DO NOTHING",
        )
        .bind(subscriber)
        .bind(event_id.to_string())
        .bind(to_millis(now)?)
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn record_events_applied(
        &mut self,
        subscriber: &str,
        event_ids: &[Uuid],
        now: OffsetDateTime,
    ) -> Result<Vec<Uuid>, StoreError> {
        let now = to_millis(now)?;
        let mut recorded = Vec::with_capacity(event_ids.len());
        // 3 parameters a row; well under SQLite's limit of 32766 per statement.
        for chunk in event_ids.chunks(1000) {
            let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO applied_events (subscriber, event_id, applied_at) ",
            );
            query.push_values(chunk, |mut row, id| {
                row.push_bind(subscriber).push_bind(id.to_string()).push_bind(now);
            });
            query.push(" ON CONFLICT (subscriber, event_id) DO NOTHING RETURNING event_id");
            let ids: Vec<String> = query.build_query_scalar().fetch_all(&mut *self.tx).await?;
            for id in ids {
                recorded.push(
                    Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(format!("applied event id {id:?}: {e}")))?,
                );
            }
        }
        Ok(recorded)
    }

    async fn count_events(
        &mut self,
        event_name: &str,
        count: i64,
        last_occurred_on: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO event_stats (event_name, count, last_occurred_on) VALUES (?, ?, ?) \
             ON CONFLICT (event_name) DO UPDATE SET count = event_stats.count + excluded.count, \
             last_occurred_on = MAX(event_stats.last_occurred_on, excluded.last_occurred_on)",
        )
        .bind(event_name)
        .bind(count)
        .bind(to_millis(last_occurred_on)?)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let Self { tx, appended, outbox_signal } = *self;
        tx.commit().await?;
        if appended {
            // notify_one keeps a permit when the relay is not waiting yet (busy publishing the
            // previous batch), so its next wait returns at once instead of missing this commit.
            outbox_signal.notify_one();
        }
        Ok(())
    }
}

async fn insert_refresh_token(tx: &mut Transaction<'static, Sqlite>, token: &RefreshToken) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, user_id, family_id, created_at, expires_at, revoked_at, \
         replaced_by_token_hash, user_agent, ip) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&token.token_hash)
    .bind(token.user_id.to_string())
    .bind(token.family_id.to_string())
    .bind(to_millis(token.created_at)?)
    .bind(to_millis(token.expires_at)?)
    .bind(opt_millis(token.revoked_at)?)
    .bind(&token.replaced_by_token_hash)
    .bind(&token.user_agent)
    .bind(&token.ip)
    .execute(&mut **tx)
    .await
    .map_err(map_unique_violation)?;
    Ok(())
}

/// SQLite names no constraint in its errors, only the columns: `UNIQUE constraint failed:
/// users.email`.
fn map_unique_violation(error: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &error
        && db.is_unique_violation()
    {
        let message = db.message();
        if message.contains("users.email") {
            return StoreError::Conflict("users_email");
        }
        if message.contains("users.id") {
            return StoreError::Conflict("users_id");
        }
        if message.contains("refresh_tokens.token_hash") {
            return StoreError::Conflict("refresh_tokens_token_hash");
        }
    }
    StoreError::Database(error)
}

pub(crate) fn to_millis(at: OffsetDateTime) -> Result<i64, StoreError> {
    let millis = at.unix_timestamp_nanos().div_euclid(1_000_000);
    i64::try_from(millis).map_err(|_| StoreError::Corrupt(format!("timestamp {at} out of range")))
}

pub(crate) fn opt_millis(at: Option<OffsetDateTime>) -> Result<Option<i64>, StoreError> {
    at.map(to_millis).transpose()
}

pub(crate) fn from_millis(millis: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {millis}: {e}")))
}

pub(crate) fn get_time(row: &SqliteRow, column: &str) -> Result<OffsetDateTime, StoreError> {
    from_millis(row.try_get(column)?)
}

pub(crate) fn get_opt_time(row: &SqliteRow, column: &str) -> Result<Option<OffsetDateTime>, StoreError> {
    row.try_get::<Option<i64>, _>(column)?.map(from_millis).transpose()
}

pub(crate) fn get_uuid(row: &SqliteRow, column: &str) -> Result<Uuid, StoreError> {
    let raw: String = row.try_get(column)?;
    Uuid::parse_str(&raw).map_err(|e| StoreError::Corrupt(format!("{column} {raw:?}: {e}")))
}

fn user_from_row(row: &SqliteRow) -> Result<User, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(User {
        id: get_uuid(row, "id")?,
        name: row.try_get("name")?,
        email: row.try_get("email")?,
        status: UserStatus::parse(&status).map_err(|e| StoreError::Corrupt(e.0))?,
        password_hash: row.try_get("password_hash")?,
        verification_token: row.try_get("verification_token")?,
        verification_code: row.try_get("verification_code")?,
        verification_token_expires_at: get_opt_time(row, "verification_token_expires_at")?,
        verification_attempts: row.try_get("verification_attempts")?,
        verified_at: get_opt_time(row, "verified_at")?,
        password_reset_token: row.try_get("password_reset_token")?,
        password_reset_token_expires_at: get_opt_time(row, "password_reset_token_expires_at")?,
        password_reset_attempts: row.try_get("password_reset_attempts")?,
        created_at: get_time(row, "created_at")?,
        updated_at: get_time(row, "updated_at")?,
        last_login_at: get_opt_time(row, "last_login_at")?,
    })
}

fn refresh_token_from_row(row: &SqliteRow) -> Result<RefreshToken, StoreError> {
    Ok(RefreshToken {
        token_hash: row.try_get("token_hash")?,
        user_id: get_uuid(row, "user_id")?,
        family_id: get_uuid(row, "family_id")?,
        created_at: get_time(row, "created_at")?,
        expires_at: get_time(row, "expires_at")?,
        revoked_at: get_opt_time(row, "revoked_at")?,
        replaced_by_token_hash: row.try_get("replaced_by_token_hash")?,
        user_agent: row.try_get("user_agent")?,
        ip: row.try_get("ip")?,
    })
}

pub(crate) fn outbox_record_from_row(row: &SqliteRow) -> Result<OutboxRecord, StoreError> {
    let payload: String = row.try_get("payload")?;
    let payload =
        serde_json::from_str(&payload).map_err(|e| StoreError::Corrupt(format!("outbox payload is not JSON: {e}")))?;
    Ok(OutboxRecord {
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
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        published_at: get_opt_time(row, "published_at")?,
        created_at: get_time(row, "created_at")?,
    })
}
