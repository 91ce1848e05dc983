//! anna's storage: one trait per concern, a unit of work that writes an aggregate and its
//! domain events in ONE transaction, and two implementations (SQLite for the embedded shape,
//! Postgres for production) that both pass the conformance suite in `tests/conformance`.
//!
//! Choosing a backend happens once, in [`connect`]; nothing above this crate knows which one
//! it runs on.

use std::sync::Arc;
use std::time::Duration;

use anna_domain::{DomainEvent, RefreshToken, User};
use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

mod postgres;
mod postgres_events;
mod postgres_idempotency;
mod sqlite;
mod sqlite_events;
mod sqlite_idempotency;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was broken; the string names the rule (for example `users_email`).
    #[error("conflict on {0}")]
    Conflict(&'static str),
    #[error("unsupported database URL {0:?}: expected sqlite:… or postgres://…")]
    UnsupportedUrl(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("could not prepare the database location: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// Pool exhaustion, a closed pool or a lost connection: overload or an outage, not a bug.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Database(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Connection settings shared by both backends.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self { max_connections: 10, acquire_timeout: Duration::from_secs(5) }
    }
}

/// Opens the store named by `url`: `sqlite:path/to/file.db` (the file and its folder are
/// created when missing) or `postgres://…`. Does not migrate.
pub async fn connect(url: &str, options: &ConnectOptions) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url, options).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url, options).await?))
    } else {
        Err(StoreError::UnsupportedUrl(redact_url(url)))
    }
}

/// The URL without its password, for error messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}://{}:***@{}", &url[..scheme_end], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// An outbox row as stored (read side; the relay arrives with the events issue).
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

/// How many events of one name the statistics projection has applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventStat {
    pub event_name: String,
    pub count: i64,
    pub last_occurred_on: OffsetDateTime,
}

/// What a stored `Idempotency-Key` says about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// First use: the caller processes the request, then completes (or releases) the key.
    Claimed,
    /// Another request with this key is being processed right now.
    InProgress { request_hash: String },
    /// Already answered: the stored response is replayed.
    Done { request_hash: String, status: u16, body: String },
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

/// The storage side of the event backbone: the outbox relay's claims and marks, subscriber
/// bookkeeping (attempts) and the `dead_letters` fallback.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
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

    /// Waits until a unit of work that appended events commits (anywhere: Postgres uses
    /// LISTEN/NOTIFY, SQLite an in-process signal), or `timeout` passes. Spurious wake-ups are
    /// allowed; the relay re-checks. Signals may be coalesced: on Postgres a process sends at
    /// most one NOTIFY per 5 ms, so after a wake-up the relay claims until it finds nothing and
    /// looks again shortly after.
    async fn wait_for_outbox(&self, timeout: Duration);

    /// Whether `subscriber` has applied `event_id`.
    async fn is_event_applied(&self, subscriber: &str, event_id: Uuid) -> Result<bool, StoreError>;

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

/// `Idempotency-Key` bookkeeping: a request with a key is processed once; repeats get the
/// stored answer.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` in `scope` for a request whose body hashes to `request_hash`, or reports
    /// what an earlier request with the same key left.
    async fn claim_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        request_hash: &str,
        now: OffsetDateTime,
    ) -> Result<IdempotencyClaim, StoreError>;

    /// Stores the answer of a claimed key.
    async fn complete_idempotency_key(&self, scope: &str, key: &str, status: u16, body: &str)
    -> Result<(), StoreError>;

    /// Forgets a claimed key whose request failed without an answer worth replaying (a 5xx),
    /// so a retry runs again.
    async fn release_idempotency_key(&self, scope: &str, key: &str) -> Result<(), StoreError>;

    /// Deletes keys created before `before`. Returns how many.
    async fn purge_idempotency_keys(&self, before: OffsetDateTime) -> Result<u64, StoreError>;
}

#[async_trait]
pub trait Store: EventLog + IdempotencyStore + Send + Sync + 'static {
    fn backend(&self) -> Backend;

    /// Creates or upgrades every table; idempotent and tracked.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Cheap round trip, for readiness checks.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Starts a unit of work. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`),
    /// on Postgres row locks are taken by the `find_*` methods of the unit of work.
    async fn begin(&self) -> Result<Box<dyn UnitOfWork>, StoreError>;

    async fn find_user_by_id(&self, id: Uuid) -> Result<Option<User>, StoreError>;

    /// `email` must already be normalised (see `anna_domain::Email`).
    async fn find_user_by_email(&self, email: &str) -> Result<Option<User>, StoreError>;

    async fn find_refresh_token(&self, token_hash: &str) -> Result<Option<RefreshToken>, StoreError>;

    /// Deletes refresh tokens that expired before `now`. Returns how many were deleted.
    async fn purge_expired_refresh_tokens(&self, now: OffsetDateTime) -> Result<u64, StoreError>;

    /// Outbox rows of one aggregate, oldest first.
    async fn outbox_events_for_aggregate(&self, aggregate_id: &str) -> Result<Vec<OutboxRecord>, StoreError>;

    async fn close(&self);
}

/// One transaction. Dropping it without `commit` rolls everything back.
#[async_trait]
pub trait UnitOfWork: Send {
    /// Loads a user for change (Postgres: `FOR UPDATE`).
    async fn find_user_by_id(&mut self, id: Uuid) -> Result<Option<User>, StoreError>;

    /// Loads a user for change by normalised e-mail (Postgres: `FOR UPDATE`).
    async fn find_user_by_email(&mut self, email: &str) -> Result<Option<User>, StoreError>;

    /// Plain insert: an existing id or e-mail gives `Conflict("users_id")` or
    /// `Conflict("users_email")`, never an overwrite.
    async fn insert_user(&mut self, user: &User) -> Result<(), StoreError>;

    /// Updates every column but `id` and `created_at`.
    async fn update_user(&mut self, user: &User) -> Result<(), StoreError>;

    async fn insert_refresh_token(&mut self, token: &RefreshToken) -> Result<(), StoreError>;

    /// Loads a refresh token for change (Postgres: `FOR UPDATE`).
    async fn find_refresh_token(&mut self, token_hash: &str) -> Result<Option<RefreshToken>, StoreError>;

    /// Atomically revokes `old_hash` (only if it is not revoked yet), pointing it at the
    /// replacement, and inserts the replacement. Returns false, inserting nothing, when the old
    /// token was already revoked: of two concurrent rotations exactly one wins.
    async fn rotate_refresh_token(
        &mut self,
        old_hash: &str,
        replacement: &RefreshToken,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Revokes one token if it is not revoked yet (logout). Keeps `replaced_by_token_hash`.
    async fn revoke_refresh_token(&mut self, token_hash: &str, now: OffsetDateTime) -> Result<bool, StoreError>;

    /// Revokes every unrevoked token of a family. Returns how many.
    async fn revoke_refresh_token_family(&mut self, family_id: Uuid, now: OffsetDateTime) -> Result<u64, StoreError>;

    /// Revokes every unrevoked token of a user. Returns how many.
    async fn revoke_user_refresh_tokens(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<u64, StoreError>;

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

    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("postgres://anna:secret@db:5432/anna"), "postgres://anna:***@db:5432/anna");
        assert_eq!(redact_url("sqlite:data/anna.db"), "sqlite:data/anna.db");
    }
}
