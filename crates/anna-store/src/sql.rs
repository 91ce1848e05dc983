//! The one place that knows how the two databases differ in how values are written and read.
//!
//! Every query of the store is written once, as SQL that both SQLite and Postgres accept with
//! `$1 … $n` placeholders (sqlx's SQLite driver binds `$N` by number, as Postgres does). What
//! differs between them is the encoding of three kinds of values, and this module alone deals
//! with it:
//!
//! | value     | SQLite              | Postgres      |
//! |-----------|---------------------|---------------|
//! | timestamp | INTEGER unix millis | `timestamptz` |
//! | UUID      | hyphenated TEXT     | `uuid`        |
//! | JSON      | TEXT                | `jsonb`       |
//! | id set    | JSON array (TEXT)   | `uuid[]`      |
//!
//! [`Query`] binds and [`Row`] reads those through `bind_time`, `uuid`, `json`…, so row
//! mapping is written once too. Where the SQL itself must differ (the outbox claim, ordering
//! by SQLite's rowid, set membership, Postgres-only row locks), a query is given as
//! [`Sql::PerBackend`] and the reason is written next to it.

use sqlx::postgres::{PgArguments, PgConnection, PgPool, PgRow};
use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqlitePool, SqliteRow};
use sqlx::types::Json;
use sqlx::{Decode, Encode, Postgres, Row as _, Sqlite, Transaction, Type};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Backend, StoreError};

/// A query's text: the same for both backends, or one text each where they must differ.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Sql {
    Same(&'static str),
    PerBackend { sqlite: &'static str, postgres: &'static str },
}

impl Sql {
    fn for_sqlite(self) -> &'static str {
        match self {
            Self::Same(sql) | Self::PerBackend { sqlite: sql, .. } => sql,
        }
    }

    fn for_postgres(self) -> &'static str {
        match self {
            Self::Same(sql) | Self::PerBackend { postgres: sql, .. } => sql,
        }
    }
}

impl From<&'static str> for Sql {
    fn from(sql: &'static str) -> Self {
        Self::Same(sql)
    }
}

/// A connection pool of either backend.
#[derive(Debug, Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Pool {
    pub(crate) fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
        }
    }

    /// A query run on a connection of the pool, outside any transaction.
    pub(crate) fn query(&self, sql: impl Into<Sql>) -> Query<'_> {
        let sql = sql.into();
        let inner = match self {
            Self::Sqlite(pool) => Inner::SqlitePool(pool, sqlx::query(sql.for_sqlite())),
            Self::Postgres(pool) => Inner::PgPool(pool, sqlx::query(sql.for_postgres())),
        };
        Query { inner, error: None }
    }

    /// Starts a transaction. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`):
    /// SQLite has a single writer, and taking the lock up front makes a second writer wait
    /// (busy timeout) instead of failing with `SQLITE_BUSY` when it tries to upgrade a read
    /// transaction halfway through.
    pub(crate) async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(match self {
            Self::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
            Self::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }

    pub(crate) async fn close(&self) {
        match self {
            Self::Sqlite(pool) => pool.close().await,
            Self::Postgres(pool) => pool.close().await,
        }
    }
}

/// An open transaction. Dropping it without `commit` rolls back (sqlx queues the ROLLBACK).
pub(crate) enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

impl Tx {
    pub(crate) fn query(&mut self, sql: impl Into<Sql>) -> Query<'_> {
        let sql = sql.into();
        let inner = match self {
            Self::Sqlite(tx) => Inner::SqliteConn(tx, sqlx::query(sql.for_sqlite())),
            Self::Postgres(tx) => Inner::PgConn(tx, sqlx::query(sql.for_postgres())),
        };
        Query { inner, error: None }
    }

    pub(crate) async fn commit(self) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(tx) => tx.commit().await?,
            Self::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }
}

type SqliteQuery = sqlx::query::Query<'static, Sqlite, SqliteArguments>;
type PgQuery = sqlx::query::Query<'static, Postgres, PgArguments>;

/// The query and where it runs, paired so that a query can only run on its own backend.
enum Inner<'c> {
    SqlitePool(&'c SqlitePool, SqliteQuery),
    SqliteConn(&'c mut SqliteConnection, SqliteQuery),
    PgPool(&'c PgPool, PgQuery),
    PgConn(&'c mut PgConnection, PgQuery),
}

/// A value both drivers decode the same way.
pub(crate) trait PortableDecode:
    for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

impl<T> PortableDecode for T where
    T: for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

/// A query being built. Encoding errors (a timestamp SQLite's integers cannot hold) are kept
/// and returned when the query runs, so binds chain.
pub(crate) struct Query<'c> {
    inner: Inner<'c>,
    error: Option<StoreError>,
}

impl<'c> Query<'c> {
    /// A value both drivers encode the same way (text, integers, booleans, and `Option`s of
    /// them).
    pub(crate) fn bind<'t, T>(self, value: T) -> Self
    where
        T: Encode<'t, Sqlite> + Type<Sqlite> + Encode<'t, Postgres> + Type<Postgres>,
    {
        self.bind_each(value, |q, v| q.bind(v), |q, v| q.bind(v))
    }

    fn bind_each<T>(
        self,
        value: T,
        sqlite: impl FnOnce(SqliteQuery, T) -> SqliteQuery,
        postgres: impl FnOnce(PgQuery, T) -> PgQuery,
    ) -> Self {
        let inner = match self.inner {
            Inner::SqlitePool(pool, q) => Inner::SqlitePool(pool, sqlite(q, value)),
            Inner::SqliteConn(conn, q) => Inner::SqliteConn(conn, sqlite(q, value)),
            Inner::PgPool(pool, q) => Inner::PgPool(pool, postgres(q, value)),
            Inner::PgConn(conn, q) => Inner::PgConn(conn, postgres(q, value)),
        };
        Self { inner, error: self.error }
    }

    fn is_sqlite(&self) -> bool {
        matches!(self.inner, Inner::SqlitePool(..) | Inner::SqliteConn(..))
    }

    pub(crate) fn bind_time(self, at: OffsetDateTime) -> Self {
        self.bind_opt_time(Some(at))
    }

    pub(crate) fn bind_opt_time(mut self, at: Option<OffsetDateTime>) -> Self {
        if self.is_sqlite() {
            match at.map(to_millis).transpose() {
                Ok(millis) => self.bind(millis),
                Err(error) => {
                    self.error.get_or_insert(error);
                    self.bind(None::<i64>)
                }
            }
        } else {
            self.bind(at)
        }
    }

    /// A UUID for a `uuid` column (TEXT on SQLite).
    pub(crate) fn bind_uuid(self, id: Uuid) -> Self {
        self.bind_each(id, |q, id| q.bind(id.to_string()), |q, id| q.bind(id))
    }

    /// An optional UUID for a `uuid` column (TEXT on SQLite).
    pub(crate) fn bind_opt_uuid(self, id: Option<Uuid>) -> Self {
        self.bind_each(id, |q, id| q.bind(id.map(|id| id.to_string())), |q, id| q.bind(id))
    }

    /// A set of UUIDs: a `uuid[]` on Postgres (`= ANY($n)`, `unnest($n)`), a JSON array on
    /// SQLite (`json_each($n)`).
    pub(crate) fn bind_uuid_set(self, ids: &[Uuid]) -> Self {
        self.bind_each(
            ids,
            |q, ids| q.bind(serde_json::Value::from(ids.iter().map(Uuid::to_string).collect::<Vec<_>>()).to_string()),
            |q, ids| q.bind(ids.to_vec()),
        )
    }

    /// A set of strings: a `text[]` on Postgres, a JSON array on SQLite (`json_each($n)`).
    pub(crate) fn bind_text_set(self, values: &[String]) -> Self {
        self.bind_each(
            values,
            |q, values| q.bind(serde_json::Value::from(values.to_vec()).to_string()),
            |q, values| q.bind(values.to_vec()),
        )
    }

    pub(crate) fn bind_json(self, value: &serde_json::Value) -> Self {
        self.bind_each(value, |q, v| q.bind(v.to_string()), |q, v| q.bind(Json(v)))
    }

    /// JSON or NULL (not JSON's `null`).
    pub(crate) fn bind_opt_json(self, value: Option<&serde_json::Value>) -> Self {
        self.bind_each(value, |q, v| q.bind(v.map(ToString::to_string)), |q, v| q.bind(v.map(Json)))
    }

    /// Runs the query; returns the number of rows it changed.
    pub(crate) async fn execute(self) -> Result<u64, StoreError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let affected = match self.inner {
            Inner::SqlitePool(pool, q) => q.execute(pool).await.map(|done| done.rows_affected()),
            Inner::SqliteConn(conn, q) => q.execute(conn).await.map(|done| done.rows_affected()),
            Inner::PgPool(pool, q) => q.execute(pool).await.map(|done| done.rows_affected()),
            Inner::PgConn(conn, q) => q.execute(conn).await.map(|done| done.rows_affected()),
        };
        affected.map_err(classify)
    }

    pub(crate) async fn fetch_optional(self) -> Result<Option<Row>, StoreError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let row = match self.inner {
            Inner::SqlitePool(pool, q) => q.fetch_optional(pool).await.map(|r| r.map(Row::Sqlite)),
            Inner::SqliteConn(conn, q) => q.fetch_optional(conn).await.map(|r| r.map(Row::Sqlite)),
            Inner::PgPool(pool, q) => q.fetch_optional(pool).await.map(|r| r.map(Row::Postgres)),
            Inner::PgConn(conn, q) => q.fetch_optional(conn).await.map(|r| r.map(Row::Postgres)),
        };
        row.map_err(classify)
    }

    pub(crate) async fn fetch_one(self) -> Result<Row, StoreError> {
        self.fetch_optional().await?.ok_or(StoreError::Database(sqlx::Error::RowNotFound))
    }

    pub(crate) async fn fetch_all(self) -> Result<Vec<Row>, StoreError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let rows = match self.inner {
            Inner::SqlitePool(pool, q) => q.fetch_all(pool).await.map(|r| r.into_iter().map(Row::Sqlite).collect()),
            Inner::SqliteConn(conn, q) => q.fetch_all(conn).await.map(|r| r.into_iter().map(Row::Sqlite).collect()),
            Inner::PgPool(pool, q) => q.fetch_all(pool).await.map(|r| r.into_iter().map(Row::Postgres).collect()),
            Inner::PgConn(conn, q) => q.fetch_all(conn).await.map(|r| r.into_iter().map(Row::Postgres).collect()),
        };
        rows.map_err(classify)
    }
}

/// A result row of either backend.
pub(crate) enum Row {
    Sqlite(SqliteRow),
    Postgres(PgRow),
}

impl Row {
    pub(crate) fn get<T: PortableDecode>(&self, column: &str) -> Result<T, StoreError> {
        Ok(match self {
            Self::Sqlite(row) => row.try_get(column)?,
            Self::Postgres(row) => row.try_get(column)?,
        })
    }

    pub(crate) fn time(&self, column: &str) -> Result<OffsetDateTime, StoreError> {
        self.opt_time(column)?.ok_or_else(|| StoreError::Corrupt(format!("{column} is NULL")))
    }

    pub(crate) fn opt_time(&self, column: &str) -> Result<Option<OffsetDateTime>, StoreError> {
        match self {
            Self::Sqlite(row) => row.try_get::<Option<i64>, _>(column)?.map(from_millis).transpose(),
            Self::Postgres(row) => Ok(row.try_get(column)?),
        }
    }

    /// A `uuid` column (TEXT on SQLite).
    pub(crate) fn uuid(&self, column: &str) -> Result<Uuid, StoreError> {
        match self {
            Self::Sqlite(_) => self.uuid_in_text(column),
            Self::Postgres(row) => Ok(row.try_get(column)?),
        }
    }

    /// A TEXT column holding a UUID on both backends (the predecessor's `event_id` columns).
    pub(crate) fn uuid_in_text(&self, column: &str) -> Result<Uuid, StoreError> {
        let raw: String = self.get(column)?;
        Uuid::parse_str(&raw).map_err(|e| StoreError::Corrupt(format!("{column} {raw:?}: {e}")))
    }

    pub(crate) fn json(&self, column: &str) -> Result<serde_json::Value, StoreError> {
        self.opt_json(column)?.ok_or_else(|| StoreError::Corrupt(format!("{column} is NULL")))
    }

    pub(crate) fn opt_json(&self, column: &str) -> Result<Option<serde_json::Value>, StoreError> {
        match self {
            Self::Sqlite(row) => row
                .try_get::<Option<String>, _>(column)?
                .map(|text| {
                    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{column} is not JSON: {e}")))
                })
                .transpose(),
            Self::Postgres(row) => Ok(row.try_get::<Option<Json<serde_json::Value>>, _>(column)?.map(|Json(v)| v)),
        }
    }

    /// A `count(*)` or `SUM` (BIGINT on both).
    pub(crate) fn count(&self, column: &str) -> Result<u64, StoreError> {
        let value: i64 = self.get(column)?;
        u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative count {value} for {column}")))
    }
}

/// Unique rules the store reports as [`StoreError::Conflict`]: the name callers see, the
/// Postgres constraint (from the migrations, or Postgres' default `<table>_pkey`), and the
/// columns as SQLite's message names them (SQLite names no constraint in its errors).
const UNIQUE_RULES: &[(&str, &str, &str)] = &[
    ("users_email", "users_email_idx", "users.email"),
    ("users_id", "users_pkey", "users.id"),
    ("refresh_tokens_token_hash", "refresh_tokens_pkey", "refresh_tokens.token_hash"),
    ("sessions_id", "sessions_pkey", "sessions.id"),
];

fn classify(error: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &error
        && db.is_unique_violation()
    {
        let message = db.message();
        for (name, constraint, sqlite_columns) in UNIQUE_RULES {
            if db.constraint() == Some(*constraint) || message.contains(sqlite_columns) {
                return StoreError::Conflict(name);
            }
        }
    }
    StoreError::Database(error)
}

pub(crate) fn to_millis(at: OffsetDateTime) -> Result<i64, StoreError> {
    let millis = at.unix_timestamp_nanos().div_euclid(1_000_000);
    i64::try_from(millis).map_err(|_| StoreError::Corrupt(format!("timestamp {at} out of range")))
}

pub(crate) fn from_millis(millis: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {millis}: {e}")))
}

/// `now + duration`, saturating far in the future rather than failing on an absurd duration.
pub(crate) fn saturating_add(now: OffsetDateTime, duration: std::time::Duration) -> OffsetDateTime {
    time::Duration::try_from(duration)
        .ok()
        .and_then(|d| now.checked_add(d))
        .unwrap_or(time::macros::datetime!(9999-12-31 0:00 UTC))
}
