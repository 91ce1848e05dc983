//! [`SqlStore`]: the one implementation of every store trait, over a SQLite file (the embedded
//! shape, WAL mode) or a Postgres database (production), and its unit of work.
//!
//! On Postgres units of work run at READ COMMITTED; the `find_*` methods of a unit of work lock
//! the rows they return (`FOR UPDATE`), so two units of work changing the same aggregate take
//! turns. On SQLite a unit of work holds the database-wide write lock from its first statement.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use uuid::Uuid;

use crate::fleet::FenceSource;
use crate::outbox_wake::OutboxWake;
use crate::sql::{Pool, Tx};
use crate::{Backend, ConnectOptions, Store, StoreError, UnitOfWork};

const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled Postgres connection idle this long is checked before it is used again.
const PG_CHECK_IDLE_AFTER: Duration = Duration::from_secs(10);

/// The SQL implementation of [`Store`], for both backends.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pub(crate) pool: Pool,
    pub(crate) wake: OutboxWake,
    /// Set on a fenced store ([`Store::fenced`]).
    pub(crate) fences: Option<Arc<dyn FenceSource>>,
}

impl SqlStore {
    /// Opens the database named by `url`: `sqlite:path/to/file.db` (the file and its folder
    /// are created when missing) or `postgres://…`. Does not migrate.
    pub async fn connect(url: &str, options: &ConnectOptions) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            Self::connect_sqlite(url, options).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::connect_postgres(url, options).await
        } else {
            Err(StoreError::UnsupportedUrl(crate::redact_url(url)))
        }
    }

    async fn connect_sqlite(url: &str, options: &ConnectOptions) -> Result<Self, StoreError> {
        let connect_options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .foreign_keys(true);
        if !(url.contains(":memory:") || url.contains("mode=memory")) {
            create_parent_dir(connect_options.get_filename())?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect_options)
            .await?;
        Ok(Self { pool: Pool::Sqlite(pool), wake: OutboxWake::in_process(), fences: None })
    }

    async fn connect_postgres(url: &str, options: &ConnectOptions) -> Result<Self, StoreError> {
        // JIT compilation pays off for long analytical queries only; anna runs short OLTP
        // statements. Worse, the planner's cost estimate of the outbox claim grows with the
        // number of pending rows, so past ~10,000 of them Postgres JIT-compiled every claim
        // (about 150 ms each at 100,000 pending rows, against 1.5 ms without), and a backlog
        // drained the slower the larger it was.
        let idle_ms = options.idle_in_transaction_timeout.as_millis().max(1).to_string();
        let connect_options = PgConnectOptions::from_str(url)?
            .options([("jit", "off"), ("idle_in_transaction_session_timeout", idle_ms.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            // sqlx pings every connection it hands out by default: one more round trip per
            // query, which halved the throughput of one-query requests. Only a connection idle
            // long enough to have been dropped by a restart or a proxy is checked; a connection
            // that breaks in between fails its query, which the caller sees as unavailable.
            .test_before_acquire(false)
            .after_connect(|conn, _meta| Box::pin(crate::tcp_nodelay::set_on(conn)))
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PG_CHECK_IDLE_AFTER {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(connect_options)
            .await?;
        let wake = OutboxWake::postgres(&pool, options);
        Ok(Self { pool: Pool::Postgres(pool), wake, fences: None })
    }

    /// The SQLite pool, for the embedded event streams that live in the same file; `None` on
    /// Postgres.
    pub fn sqlite_pool(&self) -> Option<SqlitePool> {
        match &self.pool {
            Pool::Sqlite(pool) => Some(pool.clone()),
            Pool::Postgres(_) => None,
        }
    }
}

fn create_parent_dir(file: &Path) -> Result<(), StoreError> {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => Ok(std::fs::create_dir_all(parent)?),
        _ => Ok(()),
    }
}

#[async_trait]
impl Store for SqlStore {
    fn backend(&self) -> Backend {
        self.pool.backend()
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        match &self.pool {
            Pool::Sqlite(pool) => sqlx::migrate!("./migrations/sqlite").run(pool).await?,
            Pool::Postgres(pool) => sqlx::migrate!("./migrations/postgres").run(pool).await?,
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.pool.query("SELECT 1").execute().await?;
        Ok(())
    }

    async fn begin(&self) -> Result<Box<dyn UnitOfWork>, StoreError> {
        let tx = self.pool.begin().await?;
        Ok(Box::new(SqlUnitOfWork {
            tx,
            wake: self.wake.clone(),
            appended: false,
            wake_queued: false,
            fences: self.fences.clone(),
            fenced: Vec::new(),
        }))
    }

    async fn close(&self) {
        self.wake.close().await;
        self.pool.close().await;
        // A relay waiting for the outbox gets to see that the store is closed.
        self.wake.wake_all();
    }

    fn fenced(&self, fences: Arc<dyn FenceSource>) -> Arc<dyn Store> {
        Arc::new(Self { fences: Some(fences), ..self.clone() })
    }
}

impl SqlStore {
    /// Checks the fence of `session_id` inside `tx`, when this store is fenced.
    pub(crate) async fn check_fence(&self, tx: &mut Tx, session_id: Uuid) -> Result<(), StoreError> {
        match &self.fences {
            Some(fences) => crate::fleet::hold_fences(tx, &[fences.fence_of(session_id)?]).await,
            None => Ok(()),
        }
    }
}

/// One transaction. Dropping it without `commit` rolls back.
pub(crate) struct SqlUnitOfWork {
    pub(crate) tx: Tx,
    pub(crate) wake: OutboxWake,
    /// Whether events were appended, so that the commit must wake the relay.
    pub(crate) appended: bool,
    /// Whether this transaction already queued its Postgres NOTIFY: one is enough.
    pub(crate) wake_queued: bool,
    /// Set when the store is fenced: writes about a session check its partition's lease.
    pub(crate) fences: Option<Arc<dyn FenceSource>>,
    /// Partitions whose fence this transaction holds already (and, on Postgres, has locked).
    pub(crate) fenced: Vec<u32>,
}

impl SqlUnitOfWork {
    /// Checks, once per partition and transaction, that this worker still holds the lease of
    /// `session_id`'s partition, when the store is fenced.
    pub(crate) async fn check_fence(&mut self, session_id: Uuid) -> Result<(), StoreError> {
        self.check_fences(&[session_id]).await
    }

    /// Locks the tenant's user row until the transaction ends, so that counts checked against a
    /// per-tenant limit cannot be passed by two transactions at once. SQLite: the unit of work
    /// already holds the database-wide write lock.
    pub(crate) async fn lock_tenant(&mut self, tenant_id: Uuid) -> Result<(), StoreError> {
        self.tx
            .query(crate::sql::Sql::PerBackend {
                sqlite: "SELECT 1 AS locked WHERE $1 IS NOT NULL",
                postgres: "SELECT 1 AS locked FROM users WHERE id = $1 FOR UPDATE",
            })
            .bind_uuid(tenant_id)
            .fetch_optional()
            .await?;
        Ok(())
    }

    /// [`Self::check_fence`] for several sessions, their partitions checked in one statement.
    pub(crate) async fn check_fences(&mut self, session_ids: &[Uuid]) -> Result<(), StoreError> {
        let Some(fences) = &self.fences else { return Ok(()) };
        let mut wanted: Vec<crate::fleet::Fence> = Vec::new();
        for id in session_ids {
            let fence = fences.fence_of(*id)?;
            if !self.fenced.contains(&fence.partition) && !wanted.iter().any(|f| f.partition == fence.partition) {
                wanted.push(fence);
            }
        }
        crate::fleet::hold_fences(&mut self.tx, &wanted).await?;
        self.fenced.extend(wanted.iter().map(|f| f.partition));
        Ok(())
    }
}

#[async_trait]
impl UnitOfWork for SqlUnitOfWork {
    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let Self { tx, wake, appended, .. } = *self;
        tx.commit().await?;
        if appended {
            wake.committed();
        }
        Ok(())
    }
}
