//! The sessions fleet: leases on the partitions of the sessions, the registry of live sessions
//! workers, and the fence that keeps a stale owner's writes out.
//!
//! Every time here is read off the database's own clock (milliseconds since the epoch), never
//! a worker's: two workers whose machine clocks disagree still agree on when a lease expires.
//!
//! - A lease is free when `expires_at_ms` is in the past. Acquiring one raises its `token` by
//!   one (tokens are never reset); renewing keeps it; releasing expires it at once.
//! - A [`FenceSource`] (the worker's view of the leases it holds) makes a store *fenced*
//!   ([`crate::Store::fenced`]): each write of a session's state, events or device keys first
//!   checks, in the same transaction, that the lease of the session's partition is still held
//!   under the token the worker knows and has not expired. On Postgres the check takes a share
//!   lock of the lease row, so a takeover waits for the write's commit, and a write after the
//!   takeover is refused: at no moment can two workers both write a session.

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use crate::StoreError;
use crate::sql::{Row, Sql, Tx};
use crate::store::SqlStore;

/// The database's clock in milliseconds since the epoch.
macro_rules! now_ms {
    (sqlite) => {
        "CAST(unixepoch('subsec') * 1000 AS INTEGER)"
    };
    (postgres) => {
        "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
    };
}

/// What a write about a session must carry: the lease of its partition as its worker holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub partition: u32,
    pub worker_id: Arc<str>,
    pub token: i64,
}

/// Where a fenced store learns the fence of a session.
pub trait FenceSource: Send + Sync + std::fmt::Debug {
    /// The fence of `session_id`'s partition, or [`StoreError::Fenced`] when this process
    /// does not hold it (or no longer may act on it).
    fn fence_of(&self, session_id: Uuid) -> Result<Fence, StoreError>;
}

/// One partition's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub partition: u32,
    pub worker_id: Option<String>,
    pub token: i64,
    pub acquired_at_ms: i64,
    pub renewed_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A lease just acquired, with who held it before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub partition: u32,
    pub token: i64,
    /// The worker whose lease expired (a takeover), `None` if it was free or released.
    pub previous_worker: Option<String>,
    /// When the previous lease expired (or was released), on the database's clock.
    pub previous_expired_at_ms: i64,
    /// The acquisition's time on the database's clock.
    pub at_ms: i64,
}

/// A sessions worker as it announced itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub host: String,
    pub pid: u32,
    pub partitions: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    pub info: WorkerInfo,
    pub started_at_ms: i64,
    pub heartbeat_at_ms: i64,
    pub expires_at_ms: i64,
}

/// The leases and the worker registry, with the database's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetView {
    pub now_ms: i64,
    pub workers: Vec<WorkerRecord>,
    pub leases: Vec<Lease>,
}

impl FleetView {
    /// Workers whose heartbeat has not expired.
    pub fn live_workers(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.workers.iter().filter(|w| w.expires_at_ms > self.now_ms)
    }

    /// The holder of `partition`, when its lease is current.
    pub fn holder_of(&self, partition: u32) -> Option<&Lease> {
        self.leases.iter().find(|l| l.partition == partition && l.worker_id.is_some() && l.expires_at_ms > self.now_ms)
    }
}

#[async_trait]
pub trait FleetStore: Send + Sync {
    /// Creates the lease rows of partitions `0..partitions` that do not exist yet (free).
    async fn ensure_partitions(&self, partitions: u32) -> Result<(), StoreError>;

    /// Announces `worker` (or renews its announcement) for `ttl_ms`.
    async fn heartbeat(&self, worker: &WorkerInfo, ttl_ms: i64) -> Result<(), StoreError>;

    /// Forgets `worker_id` (graceful stop).
    async fn remove_worker(&self, worker_id: &str) -> Result<(), StoreError>;

    /// Takes up to `count` free partitions below `partitions` for `ttl_ms`, lowest first. Two
    /// workers asking at once get different partitions.
    async fn acquire_leases(
        &self,
        worker_id: &str,
        partitions: u32,
        count: u32,
        ttl_ms: i64,
    ) -> Result<Vec<Acquired>, StoreError>;

    /// Extends every lease of `worker_id` that has not expired. Returns the renewed ones; a
    /// held lease missing from the answer is lost.
    async fn renew_leases(&self, worker_id: &str, ttl_ms: i64) -> Result<Vec<Lease>, StoreError>;

    /// Gives a lease up at once, if `worker_id` still holds it under `token`.
    async fn release_lease(&self, worker_id: &str, partition: u32, token: i64) -> Result<bool, StoreError>;

    /// Workers and leases as they are now.
    async fn fleet_view(&self) -> Result<FleetView, StoreError>;

    /// The current holder of `partition`, if its lease has not expired.
    async fn lease_holder(&self, partition: u32) -> Result<Option<Lease>, StoreError>;
}

fn lease_from_row(row: &Row) -> Result<Lease, StoreError> {
    Ok(Lease {
        partition: partition_of_row(row)?,
        worker_id: row.get("worker_id")?,
        token: row.get("token")?,
        acquired_at_ms: row.get("acquired_at_ms")?,
        renewed_at_ms: row.get("renewed_at_ms")?,
        expires_at_ms: row.get("expires_at_ms")?,
    })
}

fn partition_of_row(row: &Row) -> Result<u32, StoreError> {
    let partition: i32 = row.get("partition")?;
    u32::try_from(partition).map_err(|_| StoreError::Corrupt(format!("negative partition {partition}")))
}

fn to_i32(value: u32, what: &str) -> Result<i32, StoreError> {
    i32::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} {value} is out of range")))
}

#[async_trait]
impl FleetStore for SqlStore {
    async fn ensure_partitions(&self, partitions: u32) -> Result<(), StoreError> {
        self.pool
            .query(Sql::PerBackend {
                sqlite: "WITH RECURSIVE p(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM p WHERE n + 1 < $1) \
                         INSERT INTO session_partition_leases (partition) SELECT n FROM p WHERE true \
                         ON CONFLICT (partition) DO NOTHING",
                postgres: "INSERT INTO session_partition_leases (partition) SELECT generate_series(0, $1 - 1) \
                           ON CONFLICT (partition) DO NOTHING",
            })
            .bind(to_i32(partitions, "partition count")?)
            .execute()
            .await?;
        Ok(())
    }

    async fn heartbeat(&self, worker: &WorkerInfo, ttl_ms: i64) -> Result<(), StoreError> {
        self.pool
            .query(Sql::PerBackend {
                sqlite: concat!(
                    "INSERT INTO session_workers (worker_id, host, pid, partitions, started_at_ms, heartbeat_at_ms, \
                     expires_at_ms) VALUES ($1, $2, $3, $4, ",
                    now_ms!(sqlite),
                    ", ",
                    now_ms!(sqlite),
                    ", ",
                    now_ms!(sqlite),
                    " + $5) ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at_ms = excluded.heartbeat_at_ms, \
                     expires_at_ms = excluded.expires_at_ms, partitions = excluded.partitions"
                ),
                postgres: concat!(
                    "INSERT INTO session_workers (worker_id, host, pid, partitions, started_at_ms, heartbeat_at_ms, \
                     expires_at_ms) SELECT $1, $2, $3, $4, t.now, t.now, t.now + $5 FROM (SELECT ",
                    now_ms!(postgres),
                    " AS now) t ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at_ms = excluded.heartbeat_at_ms, \
                     expires_at_ms = excluded.expires_at_ms, partitions = excluded.partitions"
                ),
            })
            .bind(worker.worker_id.as_str())
            .bind(worker.host.as_str())
            .bind(i32::try_from(worker.pid).unwrap_or(i32::MAX))
            .bind(to_i32(worker.partitions, "partition count")?)
            .bind(ttl_ms)
            .execute()
            .await?;
        Ok(())
    }

    async fn remove_worker(&self, worker_id: &str) -> Result<(), StoreError> {
        self.pool.query("DELETE FROM session_workers WHERE worker_id = $1").bind(worker_id).execute().await?;
        Ok(())
    }

    async fn acquire_leases(
        &self,
        worker_id: &str,
        partitions: u32,
        count: u32,
        ttl_ms: i64,
    ) -> Result<Vec<Acquired>, StoreError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        // One transaction: the candidates are read (and on Postgres locked, skipping rows
        // another worker is taking at this moment) with the previous holder and expiry, so a
        // takeover knows whose lease it ended and how long the partition went unowned.
        let mut tx = self.pool.begin().await?;
        let candidates = tx
            .query(Sql::PerBackend {
                // SQLite: the transaction holds the only write lock already.
                sqlite: concat!(
                    "SELECT l.partition AS partition, l.worker_id AS worker_id, l.expires_at_ms AS expires_at_ms, \
                     t.now AS now FROM session_partition_leases l, (SELECT ",
                    now_ms!(sqlite),
                    " AS now) t WHERE l.partition < $1 AND l.expires_at_ms <= t.now ORDER BY l.partition LIMIT $2"
                ),
                postgres: concat!(
                    "SELECT l.partition AS partition, l.worker_id AS worker_id, l.expires_at_ms AS expires_at_ms, \
                     t.now AS now FROM session_partition_leases l, (SELECT ",
                    now_ms!(postgres),
                    " AS now) t WHERE l.partition < $1 AND l.expires_at_ms <= t.now ORDER BY l.partition LIMIT $2 \
                     FOR UPDATE OF l SKIP LOCKED"
                ),
            })
            .bind(to_i32(partitions, "partition count")?)
            .bind(i64::from(count))
            .fetch_all()
            .await?;
        let mut acquired = Vec::with_capacity(candidates.len());
        for candidate in &candidates {
            let partition = partition_of_row(candidate)?;
            let now: i64 = candidate.get("now")?;
            let row = tx
                .query(
                    "UPDATE session_partition_leases SET worker_id = $2, token = token + 1, acquired_at_ms = $3, \
                     renewed_at_ms = $3, expires_at_ms = $3 + $4 WHERE partition = $1 RETURNING token",
                )
                .bind(to_i32(partition, "partition")?)
                .bind(worker_id)
                .bind(now)
                .bind(ttl_ms)
                .fetch_one()
                .await?;
            acquired.push(Acquired {
                partition,
                token: row.get("token")?,
                previous_worker: candidate.get("worker_id")?,
                previous_expired_at_ms: candidate.get("expires_at_ms")?,
                at_ms: now,
            });
        }
        tx.commit().await?;
        Ok(acquired)
    }

    async fn renew_leases(&self, worker_id: &str, ttl_ms: i64) -> Result<Vec<Lease>, StoreError> {
        let rows = self
            .pool
            .query(Sql::PerBackend {
                sqlite: concat!(
                    "UPDATE session_partition_leases SET renewed_at_ms = ",
                    now_ms!(sqlite),
                    ", expires_at_ms = ",
                    now_ms!(sqlite),
                    " + $2 WHERE worker_id = $1 AND expires_at_ms > ",
                    now_ms!(sqlite),
                    " RETURNING partition, worker_id, token, acquired_at_ms, renewed_at_ms, expires_at_ms"
                ),
                postgres: concat!(
                    "UPDATE session_partition_leases l SET renewed_at_ms = t.now, expires_at_ms = t.now + $2 \
                     FROM (SELECT ",
                    now_ms!(postgres),
                    " AS now) t WHERE l.worker_id = $1 AND l.expires_at_ms > t.now \
                     RETURNING l.partition, l.worker_id, l.token, l.acquired_at_ms, l.renewed_at_ms, l.expires_at_ms"
                ),
            })
            .bind(worker_id)
            .bind(ttl_ms)
            .fetch_all()
            .await?;
        rows.iter().map(lease_from_row).collect()
    }

    async fn release_lease(&self, worker_id: &str, partition: u32, token: i64) -> Result<bool, StoreError> {
        // The holder stays recorded for `anna fleet status`; the expiry in the past frees it.
        let released = self
            .pool
            .query(Sql::PerBackend {
                sqlite: concat!(
                    "UPDATE session_partition_leases SET worker_id = NULL, expires_at_ms = ",
                    now_ms!(sqlite),
                    " WHERE partition = $1 AND worker_id = $2 AND token = $3"
                ),
                postgres: concat!(
                    "UPDATE session_partition_leases SET worker_id = NULL, expires_at_ms = ",
                    now_ms!(postgres),
                    " WHERE partition = $1 AND worker_id = $2 AND token = $3"
                ),
            })
            .bind(to_i32(partition, "partition")?)
            .bind(worker_id)
            .bind(token)
            .execute()
            .await?;
        Ok(released == 1)
    }

    async fn fleet_view(&self) -> Result<FleetView, StoreError> {
        let now = self
            .pool
            .query(Sql::PerBackend {
                sqlite: concat!("SELECT ", now_ms!(sqlite), " AS now"),
                postgres: concat!("SELECT ", now_ms!(postgres), " AS now"),
            })
            .fetch_one()
            .await?;
        let now_ms: i64 = now.get("now")?;
        let workers = self
            .pool
            .query(
                "SELECT worker_id, host, pid, partitions, started_at_ms, heartbeat_at_ms, expires_at_ms \
                 FROM session_workers ORDER BY started_at_ms, worker_id",
            )
            .fetch_all()
            .await?
            .iter()
            .map(|row| {
                let pid: i32 = row.get("pid")?;
                let partitions: i32 = row.get("partitions")?;
                Ok(WorkerRecord {
                    info: WorkerInfo {
                        worker_id: row.get("worker_id")?,
                        host: row.get("host")?,
                        pid: u32::try_from(pid).unwrap_or_default(),
                        partitions: u32::try_from(partitions).unwrap_or_default(),
                    },
                    started_at_ms: row.get("started_at_ms")?,
                    heartbeat_at_ms: row.get("heartbeat_at_ms")?,
                    expires_at_ms: row.get("expires_at_ms")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let leases = self
            .pool
            .query(
                "SELECT partition, worker_id, token, acquired_at_ms, renewed_at_ms, expires_at_ms \
                 FROM session_partition_leases ORDER BY partition",
            )
            .fetch_all()
            .await?
            .iter()
            .map(lease_from_row)
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(FleetView { now_ms, workers, leases })
    }

    async fn lease_holder(&self, partition: u32) -> Result<Option<Lease>, StoreError> {
        let row = self
            .pool
            .query(Sql::PerBackend {
                sqlite: concat!(
                    "SELECT partition, worker_id, token, acquired_at_ms, renewed_at_ms, expires_at_ms \
                     FROM session_partition_leases WHERE partition = $1 AND worker_id IS NOT NULL \
                     AND expires_at_ms > ",
                    now_ms!(sqlite)
                ),
                postgres: concat!(
                    "SELECT partition, worker_id, token, acquired_at_ms, renewed_at_ms, expires_at_ms \
                     FROM session_partition_leases WHERE partition = $1 AND worker_id IS NOT NULL \
                     AND expires_at_ms > ",
                    now_ms!(postgres)
                ),
            })
            .bind(to_i32(partition, "partition")?)
            .fetch_optional()
            .await?;
        row.as_ref().map(lease_from_row).transpose()
    }
}

/// Checks, inside `tx`, that every one of `fences` (one worker's) is still the current,
/// unexpired lease of its partition — in one statement, however many partitions a batch of
/// writes touches (Postgres: and keeps them so until `tx` ends, by share locks of their rows).
pub(crate) async fn hold_fences(tx: &mut Tx, fences: &[Fence]) -> Result<(), StoreError> {
    let Some(first) = fences.first() else { return Ok(()) };
    let partitions: Vec<String> = fences.iter().map(|f| f.partition.to_string()).collect();
    let rows = tx
        .query(Sql::PerBackend {
            sqlite: concat!(
                "SELECT partition, token FROM session_partition_leases WHERE worker_id = $1 \
                 AND CAST(partition AS TEXT) IN (SELECT value FROM json_each($2)) AND expires_at_ms > ",
                now_ms!(sqlite)
            ),
            postgres: concat!(
                "SELECT partition, token FROM session_partition_leases WHERE worker_id = $1 \
                 AND partition::text = ANY($2) AND expires_at_ms > ",
                now_ms!(postgres),
                " FOR SHARE"
            ),
        })
        .bind(&*first.worker_id)
        .bind_text_set(&partitions)
        .fetch_all()
        .await?;
    let mut held = Vec::with_capacity(rows.len());
    for row in &rows {
        held.push((partition_of_row(row)?, row.get::<i64>("token")?));
    }
    match fences.iter().find(|f| !held.contains(&(f.partition, f.token))) {
        None => Ok(()),
        Some(fence) => Err(StoreError::Fenced(format!(
            "partition {} is no longer held by worker {} under token {}",
            fence.partition, fence.worker_id, fence.token
        ))),
    }
}
