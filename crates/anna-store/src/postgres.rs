//! The production backend: Postgres, with `timestamptz`, `uuid` and `jsonb` columns.
//!
//! Units of work run at READ COMMITTED; the `find_*` methods of a unit of work lock the rows
//! they return (`FOR UPDATE`), so two units of work changing the same aggregate take turns.
//!
//! The [`crate::EventLog`] half of the store is in `postgres_events.rs`.

use std::sync::{Arc, Mutex, PoisonError};

use anna_domain::{DomainEvent, RefreshToken, User, UserStatus};
use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
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

const SELECT_USER_BY_ID: &str = concat!("SELECT ", user_columns!(), " FROM users WHERE id = $1");
const SELECT_USER_BY_EMAIL: &str = concat!("SELECT ", user_columns!(), " FROM users WHERE email = $1");
const SELECT_REFRESH_TOKEN: &str =
    concat!("SELECT ", refresh_token_columns!(), " FROM refresh_tokens WHERE token_hash = $1");

const LOCK_USER_BY_ID: &str = concat!("SELECT ", user_columns!(), " FROM users WHERE id = $1 FOR UPDATE");
const LOCK_USER_BY_EMAIL: &str = concat!("SELECT ", user_columns!(), " FROM users WHERE email = $1 FOR UPDATE");
const LOCK_REFRESH_TOKEN: &str =
    concat!("SELECT ", refresh_token_columns!(), " FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE");

/// The channel `append_events` notifies and `wait_for_outbox` listens on.
pub(crate) const OUTBOX_CHANNEL: &str = "anna_outbox";

/// At most one NOTIFY per this interval per process. A notifying transaction takes a
/// cluster-wide lock while it commits, so notifying on every commit caps the commit rate (here:
/// ~6 500/s with, ~9 400/s without). A relay woken by one notification keeps claiming while it
/// finds rows, and lingers briefly after, so skipped notifications cost no latency under load.
const NOTIFY_MIN_GAP: std::time::Duration = std::time::Duration::from_millis(5);

/// When this process last queued a NOTIFY (microseconds since `notify_epoch()`).
fn notify_epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// The Postgres implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct PgStore {
    pub(crate) pool: PgPool,
    /// One connection, opened on the first `wait_for_outbox`, for the listener alone: a LISTEN
    /// connection is held for good, and taking it from `pool` would shrink the pool for queries.
    pub(crate) listener_pool: PgPool,
    /// Signalled by the listener task for each notification; `wait_for_outbox` waits on it.
    pub(crate) outbox_signal: Arc<Notify>,
    /// The task that owns the `PgListener`, started by the first `wait_for_outbox`.
    pub(crate) listener_task: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// When a unit of work of this store last queued a NOTIFY (see `NOTIFY_MIN_GAP`).
    last_notify_micros: Arc<std::sync::atomic::AtomicU64>,
}

impl PgStore {
    pub async fn connect(url: &str, options: &ConnectOptions) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect(url)
            .await?;
        let listener_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.acquire_timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with((*pool.connect_options()).clone());
        Ok(Self {
            pool,
            listener_pool,
            outbox_signal: Arc::new(Notify::new()),
            listener_task: Arc::new(Mutex::new(None)),
            last_notify_micros: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres").run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn begin(&self) -> Result<Box<dyn UnitOfWork>, StoreError> {
        let tx = self.pool.begin().await?;
        Ok(Box::new(PgUnitOfWork { tx, notified: false, last_notify_micros: self.last_notify_micros.clone() }))
    }

    async fn find_user_by_id(&self, id: Uuid) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(SELECT_USER_BY_ID).bind(id).fetch_optional(&self.pool).await?;
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
        let done =
            sqlx::query("DELETE FROM refresh_tokens WHERE expires_at < $1").bind(now).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    async fn outbox_events_for_aggregate(&self, aggregate_id: &str) -> Result<Vec<OutboxRecord>, StoreError> {
        // seq breaks ties between events appended together: see migrations/postgres/0005_outbox.sql.
        let rows = sqlx::query(
            "SELECT id, event_id, aggregate_id, event_name, occurred_on, payload, status, attempts, last_error, \
             published_at, created_at, tenant_id, traceparent \
             FROM outbox_events WHERE aggregate_id = $1 ORDER BY created_at, seq",
        )
        .bind(aggregate_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_record_from_row).collect()
    }

    async fn close(&self) {
        // The listener task holds the listener pool's connection for good; the pool can only
        // finish closing once the task is gone.
        let task = self.listener_task.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(task) = task {
            task.abort();
        }
        self.listener_pool.close().await;
        self.pool.close().await;
        // A relay waiting for the outbox gets to see that the store is closed.
        self.outbox_signal.notify_waiters();
    }
}

/// Dropping it without `commit` rolls back (sqlx queues the ROLLBACK on the connection).
struct PgUnitOfWork {
    tx: Transaction<'static, Postgres>,
    /// Whether this transaction already queued its NOTIFY: one per transaction is enough.
    notified: bool,
    last_notify_micros: Arc<std::sync::atomic::AtomicU64>,
}

#[async_trait]
impl UnitOfWork for PgUnitOfWork {
    async fn find_user_by_id(&mut self, id: Uuid) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(LOCK_USER_BY_ID).bind(id).fetch_optional(&mut *self.tx).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn find_user_by_email(&mut self, email: &str) -> Result<Option<User>, StoreError> {
        let row = sqlx::query(LOCK_USER_BY_EMAIL).bind(email).fetch_optional(&mut *self.tx).await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn insert_user(&mut self, user: &User) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO users (id, name, email, status, password_hash, verification_token, verification_code, \
             verification_token_expires_at, verification_attempts, verified_at, password_reset_token, \
             password_reset_token_expires_at, password_reset_attempts, created_at, updated_at, last_login_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
        .bind(user.id)
        .bind(&user.name)
        .bind(&user.email)
        .bind(user.status.as_str())
        .bind(&user.password_hash)
        .bind(&user.verification_token)
        .bind(&user.verification_code)
        .bind(user.verification_token_expires_at)
        .bind(user.verification_attempts)
        .bind(user.verified_at)
        .bind(&user.password_reset_token)
        .bind(user.password_reset_token_expires_at)
        .bind(user.password_reset_attempts)
        .bind(user.created_at)
        .bind(user.updated_at)
        .bind(user.last_login_at)
        .execute(&mut *self.tx)
        .await
        .map_err(map_unique_violation)?;
        Ok(())
    }

    async fn update_user(&mut self, user: &User) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE users SET name = $1, email = $2, status = $3, password_hash = $4, verification_token = $5, \
             verification_code = $6, verification_token_expires_at = $7, verification_attempts = $8, \
             verified_at = $9, password_reset_token = $10, password_reset_token_expires_at = $11, \
             password_reset_attempts = $12, updated_at = $13, last_login_at = $14 WHERE id = $15",
        )
        .bind(&user.name)
        .bind(&user.email)
        .bind(user.status.as_str())
        .bind(&user.password_hash)
        .bind(&user.verification_token)
        .bind(&user.verification_code)
        .bind(user.verification_token_expires_at)
        .bind(user.verification_attempts)
        .bind(user.verified_at)
        .bind(&user.password_reset_token)
        .bind(user.password_reset_token_expires_at)
        .bind(user.password_reset_attempts)
        .bind(user.updated_at)
        .bind(user.last_login_at)
        .bind(user.id)
        .execute(&mut *self.tx)
        .await
        .map_err(map_unique_violation)?;
        Ok(())
    }

    async fn insert_refresh_token(&mut self, token: &RefreshToken) -> Result<(), StoreError> {
        insert_refresh_token(&mut self.tx, token).await
    }

    async fn find_refresh_token(&mut self, token_hash: &str) -> Result<Option<RefreshToken>, StoreError> {
        let row = sqlx::query(LOCK_REFRESH_TOKEN).bind(token_hash).fetch_optional(&mut *self.tx).await?;
        row.as_ref().map(refresh_token_from_row).transpose()
    }

    async fn rotate_refresh_token(
        &mut self,
        old_hash: &str,
        replacement: &RefreshToken,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // A concurrent rotation blocks on the row lock of this UPDATE and, once we commit,
        // re-checks `revoked_at IS NULL` against the new row version: it updates nothing.
        let done = sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = $1, replaced_by_token_hash = $2 \
             WHERE token_hash = $3 AND revoked_at IS NULL",
        )
        .bind(now)
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
        let done =
            sqlx::query("UPDATE refresh_tokens SET revoked_at = $1 WHERE token_hash = $2 AND revoked_at IS NULL")
                .bind(now)
                .bind(token_hash)
                .execute(&mut *self.tx)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn revoke_refresh_token_family(&mut self, family_id: Uuid, now: OffsetDateTime) -> Result<u64, StoreError> {
        let done = sqlx::query("UPDATE refresh_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(family_id)
            .execute(&mut *self.tx)
            .await?;
        Ok(done.rows_affected())
    }

    async fn revoke_user_refresh_tokens(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<u64, StoreError> {
        let done = sqlx::query("UPDATE refresh_tokens SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(user_id)
            .execute(&mut *self.tx)
            .await?;
        Ok(done.rows_affected())
    }

    async fn append_events(&mut self, events: &[DomainEvent]) -> Result<(), StoreError> {
        // clock_timestamp(), not now(): now() is the start of the transaction, and a unit of
        // work that began first but waited on a row lock would then date its events before
        // those of the unit of work it waited for. available_at keeps its default, now(): the
        // earliest time the row could be called ready, so a relay whose clock trails the
        // database's a little still sees it at once.
        if events.is_empty() {
            return Ok(());
        }
        // One statement for all the events; ORDER BY the input position so seq follows the
        // order they were given in.
        let ids: Vec<Uuid> = events.iter().map(|_| Uuid::new_v4()).collect();
        let event_ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
        let aggregate_ids: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
        let names: Vec<&str> = events.iter().map(|e| e.event_name.as_str()).collect();
        let occurred: Vec<OffsetDateTime> = events.iter().map(|e| e.occurred_on).collect();
        let payloads: Vec<Json<&serde_json::Value>> = events.iter().map(|e| Json(&e.payload)).collect();
        let tenants: Vec<Option<&str>> = events.iter().map(|e| e.tenant_id.as_deref()).collect();
        let traceparents: Vec<Option<&str>> = events.iter().map(|e| e.traceparent.as_deref()).collect();
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
        .bind(&ids)
        .bind(&event_ids)
        .bind(&aggregate_ids)
        .bind(&names)
        .bind(&occurred)
        .bind(&payloads)
        .bind(&tenants)
        .bind(&traceparents)
        .execute(&mut *self.tx)
        .await?;
        // Postgres delivers the notification at commit, and not at all on rollback.
        if !self.notified {
            use std::sync::atomic::Ordering;
            let now = u64::try_from(notify_epoch().elapsed().as_micros()).unwrap_or(u64::MAX);
            let last = self.last_notify_micros.load(Ordering::Relaxed);
            let gap = u64::try_from(NOTIFY_MIN_GAP.as_micros()).unwrap_or(u64::MAX);
            // The first transaction after a quiet spell always notifies (last == 0 at start).
            if last == 0 || now.saturating_sub(last) >= gap {
                self.last_notify_micros.store(now.max(1), Ordering::Relaxed);
                sqlx::query("SELECT pg_notify($1, '')").bind(OUTBOX_CHANNEL).execute(&mut *self.tx).await?;
                self.notified = true;
            }
        }
        Ok(())
    }

    async fn record_event_applied(
        &mut self,
        subscriber: &str,
        event_id: Uuid,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO applied_events (subscriber, event_id, applied_at) VALUES ($1, $2, $3) \
             ON CONFLICT (subscriber, event_id) DO NOTHING",
        )
        .bind(subscriber)
        .bind(event_id)
        .bind(now)
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
        if event_ids.is_empty() {
            return Ok(Vec::new());
        }
        let recorded: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO applied_events (subscriber, event_id, applied_at) \
             SELECT $1, id, $3 FROM unnest($2::uuid[]) AS t(id) \
             ON CONFLICT (subscriber, event_id) DO NOTHING RETURNING event_id",
        )
        .bind(subscriber)
        .bind(event_ids)
        .bind(now)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(recorded)
    }

    async fn count_events(
        &mut self,
        event_name: &str,
        count: i64,
        last_occurred_on: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO event_stats (event_name, count, last_occurred_on) VALUES ($1, $2, $3) \
             ON CONFLICT (event_name) DO UPDATE SET count = event_stats.count + EXCLUDED.count, \
             last_occurred_on = GREATEST(event_stats.last_occurred_on, EXCLUDED.last_occurred_on)",
        )
        .bind(event_name)
        .bind(count)
        .bind(last_occurred_on)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}

async fn insert_refresh_token(tx: &mut Transaction<'static, Postgres>, token: &RefreshToken) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, user_id, family_id, created_at, expires_at, revoked_at, \
         replaced_by_token_hash, user_agent, ip) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&token.token_hash)
    .bind(token.user_id)
    .bind(token.family_id)
    .bind(token.created_at)
    .bind(token.expires_at)
    .bind(token.revoked_at)
    .bind(&token.replaced_by_token_hash)
    .bind(&token.user_agent)
    .bind(&token.ip)
    .execute(&mut **tx)
    .await
    .map_err(map_unique_violation)?;
    Ok(())
}

/// Constraint names come from the migrations (`users_email_idx`) or are Postgres' defaults
/// for primary keys (`<table>_pkey`), in fresh and in upgraded databases alike.
fn map_unique_violation(error: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &error
        && db.is_unique_violation()
    {
        match db.constraint() {
            Some("users_email_idx") => return StoreError::Conflict("users_email"),
            Some("users_pkey") => return StoreError::Conflict("users_id"),
            Some("refresh_tokens_pkey") => return StoreError::Conflict("refresh_tokens_token_hash"),
            _ => {}
        }
    }
    StoreError::Database(error)
}

fn user_from_row(row: &PgRow) -> Result<User, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(User {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        email: row.try_get("email")?,
        status: UserStatus::parse(&status).map_err(|e| StoreError::Corrupt(e.0))?,
        password_hash: row.try_get("password_hash")?,
        verification_token: row.try_get("verification_token")?,
        verification_code: row.try_get("verification_code")?,
        verification_token_expires_at: row.try_get("verification_token_expires_at")?,
        verification_attempts: row.try_get("verification_attempts")?,
        verified_at: row.try_get("verified_at")?,
        password_reset_token: row.try_get("password_reset_token")?,
        password_reset_token_expires_at: row.try_get("password_reset_token_expires_at")?,
        password_reset_attempts: row.try_get("password_reset_attempts")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        last_login_at: row.try_get("last_login_at")?,
    })
}

fn refresh_token_from_row(row: &PgRow) -> Result<RefreshToken, StoreError> {
    Ok(RefreshToken {
        token_hash: row.try_get("token_hash")?,
        user_id: row.try_get("user_id")?,
        family_id: row.try_get("family_id")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        replaced_by_token_hash: row.try_get("replaced_by_token_hash")?,
        user_agent: row.try_get("user_agent")?,
        ip: row.try_get("ip")?,
    })
}

pub(crate) fn outbox_record_from_row(row: &PgRow) -> Result<OutboxRecord, StoreError> {
    // event_id is text (the predecessor's type); ours are always UUIDs.
    let event_id: String = row.try_get("event_id")?;
    let event_id =
        Uuid::parse_str(&event_id).map_err(|e| StoreError::Corrupt(format!("outbox event_id {event_id:?}: {e}")))?;
    let Json(payload) = row.try_get::<Json<serde_json::Value>, _>("payload")?;
    Ok(OutboxRecord {
        id: row.try_get("id")?,
        event: DomainEvent {
            event_id,
            event_name: row.try_get("event_name")?,
            aggregate_id: row.try_get("aggregate_id")?,
            occurred_on: row.try_get("occurred_on")?,
            tenant_id: row.try_get("tenant_id")?,
            payload,
            traceparent: row.try_get("traceparent")?,
        },
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        published_at: row.try_get("published_at")?,
        created_at: row.try_get("created_at")?,
    })
}
