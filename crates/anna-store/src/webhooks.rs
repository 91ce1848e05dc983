//! Webhooks: tenants' endpoints, and deliveries (one per endpoint and event), which are both
//! the durable queue of the webhook dispatchers and the tenant's delivery log.
//!
//! A delivery is `pending` (due at `next_attempt_at`), `delivering` (claimed by a dispatcher
//! until `next_attempt_at`, its lease: a dispatcher that dies leaves it to be claimed again),
//! `succeeded` or `dead` (dead-lettered: out of attempts, past its deadline; a replay makes
//! it pending again).
//!
//! The claim costs what its window costs, not what the backlog costs: it reads the earliest
//! due deliveries, a window at a time, and judges each in Rust. A delivery that cannot go now
//! (its endpoint disabled or its circuit open, an earlier delivery of its aggregate unfinished
//! on an ordered endpoint, its endpoint at its concurrency limit in this process) is postponed
//! rather than stepped over, so the next claim's window moves on to other endpoints: a dead or
//! slow receiver never holds back the others.

use std::collections::HashMap;
use std::time::Duration;

use anna_domain::webhook::{EventFilter, WebhookEndpoint};
use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::StoreError;
use crate::sql::{Row, Sql, saturating_add};
use crate::store::{SqlStore, SqlUnitOfWork};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    Pending,
    Delivering,
    Succeeded,
    Dead,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivering => "delivering",
            Self::Succeeded => "succeeded",
            Self::Dead => "dead",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "pending" => Self::Pending,
            "delivering" => Self::Delivering,
            "succeeded" => Self::Succeeded,
            "dead" => Self::Dead,
            _ => return None,
        })
    }
}

/// A delivery as the log shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub tenant_id: Uuid,
    pub event_id: Uuid,
    pub event_name: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub next_attempt_at: OffsetDateTime,
    pub deadline_at: OffsetDateTime,
    pub occurred_at: OffsetDateTime,
    pub created_at: OffsetDateTime,
    pub completed_at: Option<OffsetDateTime>,
    pub last_status_code: Option<u16>,
    pub last_latency_ms: Option<u32>,
    pub last_error: Option<String>,
    pub last_response_body: Option<String>,
}

/// A delivery to create (by the fan-out of the event stream).
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub endpoint_id: Uuid,
    pub tenant_id: Uuid,
    pub event_id: Uuid,
    pub event_name: String,
    pub ordering_key: String,
    pub position: String,
    pub ordered: bool,
    pub body: String,
    pub occurred_at: OffsetDateTime,
    pub created_at: OffsetDateTime,
    pub deadline_at: OffsetDateTime,
}

/// One attempt, as the log shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub attempted_at: OffsetDateTime,
    pub status_code: Option<u16>,
    pub latency_ms: u32,
    pub error: Option<String>,
    pub response_body: Option<String>,
}

/// A delivery claimed for an attempt.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub event_id: Uuid,
    pub event_name: String,
    pub body: String,
    /// This attempt's number among all of the delivery's attempts.
    pub attempt: u32,
    /// This attempt's number since the delivery was created or last replayed.
    pub round_attempt: u32,
    pub deadline_at: OffsetDateTime,
    pub occurred_at: OffsetDateTime,
    pub ordered: bool,
    pub ordering_key: String,
    /// The one attempt that probes an endpoint whose circuit was open.
    pub probe: bool,
}

/// How a claim judges what it reads.
#[derive(Debug, Clone)]
pub struct ClaimRules {
    /// Deliveries claimed at most.
    pub batch: usize,
    /// Due deliveries read to find them.
    pub window: usize,
    /// How long a claim holds a delivery (longer than an attempt can take).
    pub lease: Duration,
    /// Attempts this process may have in flight per endpoint, and those it has now. An endpoint
    /// at its limit is left out of the window (its due deliveries wait, unwritten, and do not
    /// crowd out other endpoints'); one that reaches it during the claim is skipped.
    pub endpoint_concurrency: u32,
    pub in_flight: HashMap<Uuid, u32>,
    /// An endpoint's consecutive failures from which its circuit is open: after its open time,
    /// one delivery probes it.
    pub circuit_threshold: u32,
    /// When a delivery waiting for an earlier one of its aggregate, or for its disabled
    /// endpoint, is looked at again (a finished delivery calls the next one at once).
    pub recheck_delay: Duration,
}

/// The breaker's settings.
#[derive(Debug, Clone, Copy)]
pub struct CircuitRules {
    /// Consecutive failures that open the circuit.
    pub threshold: u32,
    /// How long it stays open the first time; doubled at each failed probe, up to `open_max`.
    pub open: Duration,
    pub open_max: Duration,
}

impl CircuitRules {
    /// How long the circuit stays open at its `opening`-th opening since the last success.
    pub fn open_for(&self, opening: u32) -> Duration {
        let doublings = opening.saturating_sub(1).min(20);
        self.open.saturating_mul(1 << doublings).min(self.open_max)
    }
}

/// What an attempt led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptNext {
    Succeeded,
    RetryAt(OffsetDateTime),
    Dead,
}

/// An attempt's result, to record.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub delivery_id: Uuid,
    pub endpoint_id: Uuid,
    pub ordered: bool,
    pub ordering_key: String,
    /// The attempt number of the claim (`ClaimedDelivery::attempt`): a result whose claim was
    /// taken over meanwhile is not recorded.
    pub attempt: u32,
    /// Whether the attempt probed an endpoint whose circuit was open.
    pub probe: bool,
    pub attempted_at: OffsetDateTime,
    pub status_code: Option<u16>,
    pub latency_ms: u32,
    pub error: Option<String>,
    pub response_body: Option<String>,
    pub next: AttemptNext,
}

/// A batch's effect on one endpoint's breaker.
#[derive(Debug, Default)]
struct Circuit {
    endpoint_id: Uuid,
    reset: bool,
    failures: u32,
    probe_failed: bool,
}

/// What recording a batch of results did to the endpoints' circuits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Results recorded (the others' claims had been taken over).
    pub recorded: usize,
    /// Endpoints whose circuit opened, with how long.
    pub opened: Vec<(Uuid, Duration)>,
}

/// How many deliveries are in each state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    pub pending: u64,
    pub delivering: u64,
    pub dead: u64,
    /// When the earliest due delivery became due, if any is.
    pub oldest_due: Option<OffsetDateTime>,
}

#[async_trait]
pub trait WebhookStore: Send + Sync {
    /// The tenant's endpoints, oldest first.
    async fn list_webhook_endpoints(&self, tenant_id: Uuid) -> Result<Vec<WebhookEndpoint>, StoreError>;

    async fn find_webhook_endpoint(&self, id: Uuid) -> Result<Option<WebhookEndpoint>, StoreError>;

    async fn find_webhook_endpoints(&self, ids: &[Uuid]) -> Result<Vec<WebhookEndpoint>, StoreError>;

    /// An endpoint's deliveries, newest first, optionally of one status and older than
    /// `before` (the previous page's last id).
    async fn list_webhook_deliveries(
        &self,
        endpoint_id: Uuid,
        status: Option<DeliveryStatus>,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, StoreError>;

    async fn find_webhook_delivery(&self, id: Uuid) -> Result<Option<DeliveryRecord>, StoreError>;

    /// A delivery's attempts, first first.
    async fn list_webhook_attempts(&self, delivery_id: Uuid) -> Result<Vec<AttemptRecord>, StoreError>;

    /// Claims due deliveries for an attempt each (see the module's comment).
    async fn claim_webhook_deliveries(
        &self,
        rules: &ClaimRules,
        now: OffsetDateTime,
    ) -> Result<Vec<ClaimedDelivery>, StoreError>;

    /// Records attempts' results, their deliveries' new states and the endpoints' circuits, in
    /// one transaction.
    async fn record_webhook_attempts(
        &self,
        results: &[AttemptResult],
        circuit: CircuitRules,
        now: OffsetDateTime,
    ) -> Result<Recorded, StoreError>;

    async fn webhook_delivery_counts(&self, now: OffsetDateTime) -> Result<DeliveryCounts, StoreError>;

    /// Deletes up to `limit` succeeded or dead deliveries completed before `before`, with their
    /// attempts. Returns how many.
    async fn purge_webhook_deliveries(&self, before: OffsetDateTime, limit: u32) -> Result<u64, StoreError>;
}

/// The webhook half of a unit of work.
#[async_trait]
pub trait WebhookWrites: Send {
    async fn insert_webhook_endpoint(&mut self, endpoint: &WebhookEndpoint) -> Result<(), StoreError>;

    /// How many endpoints the tenant has, counted under a lock of the tenant's user row so
    /// concurrent creations cannot both pass a limit (Postgres: `FOR UPDATE` on `users`).
    async fn count_webhook_endpoints(&mut self, tenant_id: Uuid) -> Result<u64, StoreError>;

    /// Loads an endpoint for change (Postgres: `FOR UPDATE`).
    async fn find_webhook_endpoint(&mut self, id: Uuid) -> Result<Option<WebhookEndpoint>, StoreError>;

    /// Updates the settings and secrets (not the circuit, which the dispatchers own).
    async fn update_webhook_endpoint(&mut self, endpoint: &WebhookEndpoint) -> Result<(), StoreError>;

    /// Deletes the endpoint with its deliveries and their attempts.
    async fn delete_webhook_endpoint(&mut self, id: Uuid) -> Result<bool, StoreError>;

    /// The enabled endpoints of these tenants (the fan-out of one batch of events).
    async fn enabled_webhook_endpoints(&mut self, tenant_ids: &[Uuid]) -> Result<Vec<WebhookEndpoint>, StoreError>;

    /// Creates deliveries; one that exists for its endpoint and event already is kept as it is.
    async fn insert_webhook_deliveries(&mut self, deliveries: &[NewDelivery]) -> Result<u64, StoreError>;

    /// Makes a finished delivery pending again, due now, with a new deadline and a fresh count
    /// of attempts. `false` when it is not finished (or does not exist).
    async fn replay_webhook_delivery(
        &mut self,
        id: Uuid,
        now: OffsetDateTime,
        deadline_at: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Replays every delivery of `endpoint_id` in `status` created at or after `since`.
    async fn replay_webhook_deliveries(
        &mut self,
        endpoint_id: Uuid,
        status: DeliveryStatus,
        since: Option<OffsetDateTime>,
        now: OffsetDateTime,
        deadline_at: OffsetDateTime,
    ) -> Result<u64, StoreError>;
}

/// The due deliveries a claim looks at, oldest due first, with what judging them needs; `$full`
/// leaves out the endpoints this process has no room for.
macro_rules! claim_window {
    ($full:literal) => {
        concat!(
            "SELECT d.id, d.endpoint_id, d.deadline_at, e.enabled, e.circuit_failures, e.circuit_open_until, \
             CASE WHEN d.ordered AND EXISTS (SELECT 1 FROM webhook_deliveries p \
                 WHERE p.endpoint_id = d.endpoint_id AND p.ordering_key = d.ordering_key \
                 AND p.status IN ('pending', 'delivering') AND p.position < d.position) THEN 1 ELSE 0 END AS blocked \
             FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id \
             WHERE d.status IN ('pending', 'delivering') AND d.next_attempt_at <= $1 AND ",
            $full,
            " ORDER BY d.next_attempt_at LIMIT $2"
        )
    };
}

macro_rules! select_endpoints {
    ($where:literal) => {
        concat!(
            "SELECT id, tenant_id, url, description, event_filter, enabled, ordered, secret_sealed, \
             previous_secret_sealed, previous_secret_expires_at, circuit_failures, circuit_open_until, created_at, \
             updated_at FROM webhook_endpoints WHERE ",
            $where
        )
    };
}

macro_rules! select_deliveries {
    ($where:literal) => {
        concat!(
            "SELECT id, endpoint_id, tenant_id, event_id, event_name, status, attempts, next_attempt_at, deadline_at, \
             occurred_at, created_at, completed_at, last_status_code, last_latency_ms, last_error, \
             last_response_body FROM webhook_deliveries WHERE ",
            $where
        )
    };
}

fn u32_of(row: &Row, column: &str) -> Result<u32, StoreError> {
    let value: i32 = row.get(column)?;
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {column} {value}")))
}

fn opt_u32_of(row: &Row, column: &str) -> Result<Option<u32>, StoreError> {
    let value: Option<i32> = row.get(column)?;
    value.map(|v| u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {column} {v}")))).transpose()
}

fn i32_of(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn endpoint_from_row(row: &Row) -> Result<WebhookEndpoint, StoreError> {
    let filter: Vec<String> = serde_json::from_value(row.json("event_filter")?)
        .map_err(|e| StoreError::Corrupt(format!("event_filter: {e}")))?;
    Ok(WebhookEndpoint {
        id: row.uuid("id")?,
        tenant_id: row.uuid("tenant_id")?,
        url: row.get("url")?,
        description: row.get("description")?,
        filter: EventFilter::from_stored(filter),
        enabled: row.get("enabled")?,
        ordered: row.get("ordered")?,
        secret_sealed: row.get("secret_sealed")?,
        previous_secret_sealed: row.get("previous_secret_sealed")?,
        previous_secret_expires_at: row.opt_time("previous_secret_expires_at")?,
        circuit_failures: u32_of(row, "circuit_failures")?,
        circuit_open_until: row.opt_time("circuit_open_until")?,
        created_at: row.time("created_at")?,
        updated_at: row.time("updated_at")?,
    })
}

fn delivery_from_row(row: &Row) -> Result<DeliveryRecord, StoreError> {
    let status: String = row.get("status")?;
    Ok(DeliveryRecord {
        id: row.uuid("id")?,
        endpoint_id: row.uuid("endpoint_id")?,
        tenant_id: row.uuid("tenant_id")?,
        event_id: row.uuid("event_id")?,
        event_name: row.get("event_name")?,
        status: DeliveryStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("delivery status {status}")))?,
        attempts: u32_of(row, "attempts")?,
        next_attempt_at: row.time("next_attempt_at")?,
        deadline_at: row.time("deadline_at")?,
        occurred_at: row.time("occurred_at")?,
        created_at: row.time("created_at")?,
        completed_at: row.opt_time("completed_at")?,
        last_status_code: opt_u32_of(row, "last_status_code")?.and_then(|c| u16::try_from(c).ok()),
        last_latency_ms: opt_u32_of(row, "last_latency_ms")?,
        last_error: row.get("last_error")?,
        last_response_body: row.get("last_response_body")?,
    })
}

fn filter_json(endpoint: &WebhookEndpoint) -> serde_json::Value {
    serde_json::Value::from(endpoint.filter.patterns().to_vec())
}

#[async_trait]
impl WebhookStore for SqlStore {
    async fn list_webhook_endpoints(&self, tenant_id: Uuid) -> Result<Vec<WebhookEndpoint>, StoreError> {
        let rows = self
            .pool
            .query(select_endpoints!("tenant_id = $1 ORDER BY created_at, id"))
            .bind_uuid(tenant_id)
            .fetch_all()
            .await?;
        rows.iter().map(endpoint_from_row).collect()
    }

    async fn find_webhook_endpoint(&self, id: Uuid) -> Result<Option<WebhookEndpoint>, StoreError> {
        let row = self.pool.query(select_endpoints!("id = $1")).bind_uuid(id).fetch_optional().await?;
        row.as_ref().map(endpoint_from_row).transpose()
    }

    async fn find_webhook_endpoints(&self, ids: &[Uuid]) -> Result<Vec<WebhookEndpoint>, StoreError> {
        let rows = self
            .pool
            .query(Sql::PerBackend {
                sqlite: select_endpoints!("id IN (SELECT value FROM json_each($1))"),
                postgres: select_endpoints!("id = ANY($1)"),
            })
            .bind_uuid_set(ids)
            .fetch_all()
            .await?;
        rows.iter().map(endpoint_from_row).collect()
    }

    async fn list_webhook_deliveries(
        &self,
        endpoint_id: Uuid,
        status: Option<DeliveryStatus>,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let rows = self
            .pool
            .query(select_deliveries!(
                "endpoint_id = $1 AND ($2 IS NULL OR status = $2) AND ($3 IS NULL OR id < $3) \
                 ORDER BY id DESC LIMIT $4"
            ))
            .bind_uuid(endpoint_id)
            .bind(status.map(DeliveryStatus::as_str))
            .bind_opt_uuid(before)
            .bind(i64::from(limit))
            .fetch_all()
            .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn find_webhook_delivery(&self, id: Uuid) -> Result<Option<DeliveryRecord>, StoreError> {
        let row = self.pool.query(select_deliveries!("id = $1")).bind_uuid(id).fetch_optional().await?;
        row.as_ref().map(delivery_from_row).transpose()
    }

    async fn list_webhook_attempts(&self, delivery_id: Uuid) -> Result<Vec<AttemptRecord>, StoreError> {
        let rows = self
            .pool
            .query(
                "SELECT attempt, attempted_at, status_code, latency_ms, error, response_body \
                 FROM webhook_delivery_attempts WHERE delivery_id = $1 ORDER BY attempt",
            )
            .bind_uuid(delivery_id)
            .fetch_all()
            .await?;
        rows.iter()
            .map(|row| {
                Ok(AttemptRecord {
                    attempt: u32_of(row, "attempt")?,
                    attempted_at: row.time("attempted_at")?,
                    status_code: opt_u32_of(row, "status_code")?.and_then(|c| u16::try_from(c).ok()),
                    latency_ms: u32_of(row, "latency_ms")?,
                    error: row.get("error")?,
                    response_body: row.get("response_body")?,
                })
            })
            .collect()
    }

    async fn claim_webhook_deliveries(
        &self,
        rules: &ClaimRules,
        now: OffsetDateTime,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Claims take turns: a claim judges "is an earlier delivery of this aggregate
        // unfinished" from what it reads, which a concurrent claim could be changing. SQLite's
        // transaction holds the database's write lock already.
        tx.query(Sql::PerBackend { sqlite: "SELECT 1", postgres: "SELECT pg_advisory_xact_lock(7297366871935316033)" })
            .fetch_optional()
            .await?;
        let full: Vec<Uuid> = rules
            .in_flight
            .iter()
            .filter(|(_, n)| **n >= rules.endpoint_concurrency.max(1))
            .map(|(id, _)| *id)
            .collect();
        let rows = tx
            .query(Sql::PerBackend {
                sqlite: claim_window!("NOT d.endpoint_id IN (SELECT value FROM json_each($3))"),
                postgres: claim_window!("NOT d.endpoint_id = ANY($3)"),
            })
            .bind_time(now)
            .bind(i64::try_from(rules.window).unwrap_or(i64::MAX))
            .bind_uuid_set(&full)
            .fetch_all()
            .await?;
        let mut picked: Vec<Uuid> = Vec::new();
        let mut picked_per_endpoint: HashMap<Uuid, u32> = HashMap::new();
        let mut postponed: HashMap<OffsetDateTime, Vec<Uuid>> = HashMap::new();
        let mut expired: Vec<Uuid> = Vec::new();
        let mut probes: Vec<Uuid> = Vec::new();
        let lease_end = saturating_add(now, rules.lease);
        for row in &rows {
            if picked.len() >= rules.batch {
                break;
            }
            let id = row.uuid("id")?;
            let endpoint = row.uuid("endpoint_id")?;
            let open_until = row.opt_time("circuit_open_until")?;
            let failures = u32_of(row, "circuit_failures")?;
            let blocked: i32 = row.get("blocked")?;
            let later = |delay: Duration| saturating_add(now, delay);
            let busy = rules.in_flight.get(&endpoint).copied().unwrap_or(0)
                + picked_per_endpoint.get(&endpoint).copied().unwrap_or(0);
            let half_open = failures >= rules.circuit_threshold && rules.circuit_threshold > 0;
            if row.time("deadline_at")? <= now {
                expired.push(id);
            } else if !row.get::<bool>("enabled")? {
                postponed.entry(later(rules.recheck_delay)).or_default().push(id);
            } else if let Some(until) = open_until.filter(|until| *until > now) {
                postponed.entry(until).or_default().push(id);
            } else if blocked != 0 {
                postponed.entry(later(rules.recheck_delay)).or_default().push(id);
            } else if half_open && (probes.contains(&endpoint) || busy > 0) {
                // One probe at a time while the circuit is half open.
                postponed.entry(lease_end).or_default().push(id);
            } else if busy >= rules.endpoint_concurrency.max(1) {
                continue;
            } else {
                if half_open {
                    probes.push(endpoint);
                }
                picked.push(id);
                *picked_per_endpoint.entry(endpoint).or_default() += 1;
            }
        }
        // Every update below re-checks that the row is still due and unfinished: on Postgres a
        // dispatcher's record (which does not take the claim lock) may have finished it since
        // it was read. A claim whose lease ended (its dispatcher died) and that cannot go now
        // goes back to pending, so it does not stay at the head of every window.
        for (until, ids) in &postponed {
            tx.query(Sql::PerBackend {
                sqlite: "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $1 \
                         WHERE id IN (SELECT value FROM json_each($2)) AND status IN ('pending', 'delivering') \
                         AND next_attempt_at <= $3",
                postgres: "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $1 \
                           WHERE id = ANY($2) AND status IN ('pending', 'delivering') AND next_attempt_at <= $3",
            })
            .bind_time(*until)
            .bind_uuid_set(ids)
            .bind_time(now)
            .execute()
            .await?;
        }
        if !expired.is_empty() {
            tx.query(Sql::PerBackend {
                sqlite: "UPDATE webhook_deliveries SET status = 'dead', completed_at = $1, \
                         last_error = 'deadline passed before the delivery succeeded' \
                         WHERE id IN (SELECT value FROM json_each($2)) AND status IN ('pending', 'delivering') \
                         AND next_attempt_at <= $1",
                postgres: "UPDATE webhook_deliveries SET status = 'dead', completed_at = $1, \
                           last_error = 'deadline passed before the delivery succeeded' WHERE id = ANY($2) \
                           AND status IN ('pending', 'delivering') AND next_attempt_at <= $1",
            })
            .bind_time(now)
            .bind_uuid_set(&expired)
            .execute()
            .await?;
        }
        if !probes.is_empty() {
            tx.query(Sql::PerBackend {
                sqlite: "UPDATE webhook_endpoints SET circuit_open_until = $1 \
                         WHERE id IN (SELECT value FROM json_each($2))",
                postgres: "UPDATE webhook_endpoints SET circuit_open_until = $1 WHERE id = ANY($2)",
            })
            .bind_time(lease_end)
            .bind_uuid_set(&probes)
            .execute()
            .await?;
        }
        let mut claimed = Vec::with_capacity(picked.len());
        if !picked.is_empty() {
            let rows = tx
                .query(Sql::PerBackend {
                    sqlite: "UPDATE webhook_deliveries SET status = 'delivering', attempts = attempts + 1, \
                             round_attempts = round_attempts + 1, next_attempt_at = $1 \
                             WHERE id IN (SELECT value FROM json_each($2)) \
                             AND status IN ('pending', 'delivering') AND next_attempt_at <= $3 \
                             RETURNING id, endpoint_id, event_id, event_name, body, attempts, round_attempts, \
                             deadline_at, occurred_at, ordered, ordering_key",
                    postgres: "UPDATE webhook_deliveries SET status = 'delivering', attempts = attempts + 1, \
                               round_attempts = round_attempts + 1, next_attempt_at = $1 WHERE id = ANY($2) \
                               AND status IN ('pending', 'delivering') AND next_attempt_at <= $3 \
                               RETURNING id, endpoint_id, event_id, event_name, body, attempts, round_attempts, \
                               deadline_at, occurred_at, ordered, ordering_key",
                })
                .bind_time(lease_end)
                .bind_uuid_set(&picked)
                .bind_time(now)
                .fetch_all()
                .await?;
            for row in &rows {
                claimed.push(ClaimedDelivery {
                    id: row.uuid("id")?,
                    endpoint_id: row.uuid("endpoint_id")?,
                    event_id: row.uuid("event_id")?,
                    event_name: row.get("event_name")?,
                    body: row.get("body")?,
                    attempt: u32_of(row, "attempts")?,
                    round_attempt: u32_of(row, "round_attempts")?,
                    deadline_at: row.time("deadline_at")?,
                    occurred_at: row.time("occurred_at")?,
                    ordered: row.get("ordered")?,
                    ordering_key: row.get("ordering_key")?,
                    probe: false,
                });
            }
        }
        tx.commit().await?;
        for delivery in &mut claimed {
            delivery.probe = probes.contains(&delivery.endpoint_id);
        }
        // In the order they were due.
        claimed.sort_by_key(|c| picked.iter().position(|id| *id == c.id));
        Ok(claimed)
    }

    async fn record_webhook_attempts(
        &self,
        results: &[AttemptResult],
        circuit_rules: CircuitRules,
        now: OffsetDateTime,
    ) -> Result<Recorded, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut recorded = Recorded::default();
        // Per endpoint, in the order of the results: whether a success reset the breaker, the
        // failures after the last success, and whether a probe failed among them.
        let mut circuits: Vec<Circuit> = Vec::new();
        for result in results {
            let (status, next_at, completed_at) = match result.next {
                AttemptNext::Succeeded => ("succeeded", now, Some(result.attempted_at)),
                AttemptNext::RetryAt(at) => ("pending", at, None),
                AttemptNext::Dead => ("dead", now, Some(result.attempted_at)),
            };
            let changed = tx
                .query(
                    "UPDATE webhook_deliveries SET status = $3, next_attempt_at = $4, completed_at = $5, \
                     last_status_code = $6, last_latency_ms = $7, last_error = $8, last_response_body = $9 \
                     WHERE id = $1 AND status = 'delivering' AND attempts = $2",
                )
                .bind_uuid(result.delivery_id)
                .bind(i32_of(result.attempt))
                .bind(status)
                .bind_time(next_at)
                .bind_opt_time(completed_at)
                .bind(result.status_code.map(i32::from))
                .bind(i32_of(result.latency_ms))
                .bind(result.error.as_deref())
                .bind(result.response_body.as_deref())
                .execute()
                .await?;
            if changed == 0 {
                continue;
            }
            recorded.recorded += 1;
            tx.query(
                "INSERT INTO webhook_delivery_attempts \
                 (delivery_id, attempt, attempted_at, status_code, latency_ms, error, response_body) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (delivery_id, attempt) DO NOTHING",
            )
            .bind_uuid(result.delivery_id)
            .bind(i32_of(result.attempt))
            .bind_time(result.attempted_at)
            .bind(result.status_code.map(i32::from))
            .bind(i32_of(result.latency_ms))
            .bind(result.error.as_deref())
            .bind(result.response_body.as_deref())
            .execute()
            .await?;
            if result.ordered && matches!(result.next, AttemptNext::Succeeded | AttemptNext::Dead) {
                // The next delivery of the aggregate may go now rather than at its recheck.
                tx.query(
                    "UPDATE webhook_deliveries SET next_attempt_at = $3 WHERE id = (SELECT id FROM webhook_deliveries \
                     WHERE endpoint_id = $1 AND ordering_key = $2 AND status = 'pending' ORDER BY position LIMIT 1) \
                     AND next_attempt_at > $3",
                )
                .bind_uuid(result.endpoint_id)
                .bind(result.ordering_key.as_str())
                .bind_time(now)
                .execute()
                .await?;
            }
            let index = match circuits.iter().position(|c| c.endpoint_id == result.endpoint_id) {
                Some(index) => index,
                None => {
                    circuits.push(Circuit { endpoint_id: result.endpoint_id, ..Circuit::default() });
                    circuits.len() - 1
                }
            };
            let circuit = &mut circuits[index];
            if result.next == AttemptNext::Succeeded {
                *circuit = Circuit { endpoint_id: result.endpoint_id, reset: true, ..Circuit::default() };
            } else {
                circuit.failures += 1;
                circuit.probe_failed |= result.probe;
            }
        }
        for circuit in circuits {
            if circuit.reset {
                // A success after the circuit had opened: the deliveries that waited for it (until
                // the open time, or the probe's end) may go now.
                tx.query(
                    "UPDATE webhook_deliveries SET next_attempt_at = $2 \
                     WHERE endpoint_id = $1 AND status = 'pending' AND next_attempt_at > $2 \
                     AND EXISTS (SELECT 1 FROM webhook_endpoints WHERE id = $1 AND circuit_openings > 0)",
                )
                .bind_uuid(circuit.endpoint_id)
                .bind_time(now)
                .execute()
                .await?;
            }
            let row = tx
                .query(
                    "UPDATE webhook_endpoints SET \
                     circuit_failures = CASE WHEN $2 THEN 0 ELSE circuit_failures END + $3, \
                     circuit_openings = CASE WHEN $2 THEN 0 ELSE circuit_openings END, \
                     circuit_open_until = CASE WHEN $2 THEN NULL ELSE circuit_open_until END \
                     WHERE id = $1 RETURNING circuit_failures, circuit_openings, circuit_open_until",
                )
                .bind_uuid(circuit.endpoint_id)
                .bind(circuit.reset)
                .bind(i32_of(circuit.failures))
                .fetch_optional()
                .await?;
            let Some(row) = row else { continue };
            let failures = u32_of(&row, "circuit_failures")?;
            let openings = u32_of(&row, "circuit_openings")?;
            let open = row.opt_time("circuit_open_until")?.is_some_and(|until| until > now);
            // The circuit opens when failures reach the threshold while it is closed, and again
            // (for twice as long) when its probe fails; attempts that were in flight when it
            // opened do not extend it.
            let opens = circuit.failures > 0
                && circuit_rules.threshold > 0
                && failures >= circuit_rules.threshold
                && (circuit.probe_failed || !open);
            if !opens {
                continue;
            }
            let opening = openings + 1;
            let open_for = circuit_rules.open_for(opening);
            let until = saturating_add(now, open_for);
            tx.query("UPDATE webhook_endpoints SET circuit_open_until = $2, circuit_openings = $3 WHERE id = $1")
                .bind_uuid(circuit.endpoint_id)
                .bind_time(until)
                .bind(i32_of(opening))
                .execute()
                .await?;
            // Its pending deliveries wait for the circuit: claims need not step over them.
            tx.query(
                "UPDATE webhook_deliveries SET next_attempt_at = $2 \
                 WHERE endpoint_id = $1 AND status = 'pending' AND next_attempt_at < $2",
            )
            .bind_uuid(circuit.endpoint_id)
            .bind_time(until)
            .execute()
            .await?;
            recorded.opened.push((circuit.endpoint_id, open_for));
        }
        tx.commit().await?;
        Ok(recorded)
    }

    async fn webhook_delivery_counts(&self, now: OffsetDateTime) -> Result<DeliveryCounts, StoreError> {
        let rows = self
            .pool
            .query("SELECT status, count(*) AS n FROM webhook_deliveries WHERE status <> 'succeeded' GROUP BY status")
            .fetch_all()
            .await?;
        let mut counts = DeliveryCounts::default();
        for row in &rows {
            let status: String = row.get("status")?;
            let n = row.count("n")?;
            match DeliveryStatus::parse(&status) {
                Some(DeliveryStatus::Pending) => counts.pending = n,
                Some(DeliveryStatus::Delivering) => counts.delivering = n,
                Some(DeliveryStatus::Dead) => counts.dead = n,
                _ => {}
            }
        }
        let oldest = self
            .pool
            .query(
                "SELECT next_attempt_at FROM webhook_deliveries WHERE status IN ('pending', 'delivering') \
                 AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT 1",
            )
            .bind_time(now)
            .fetch_optional()
            .await?;
        counts.oldest_due = oldest.map(|row| row.time("next_attempt_at")).transpose()?;
        Ok(counts)
    }

    async fn purge_webhook_deliveries(&self, before: OffsetDateTime, limit: u32) -> Result<u64, StoreError> {
        self.purge_webhook_batch(before, limit).await
    }
}

impl SqlStore {
    async fn purge_webhook_batch(&self, before: OffsetDateTime, limit: u32) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = tx
            .query(
                "SELECT id FROM webhook_deliveries WHERE status IN ('succeeded', 'dead') AND completed_at < $1 \
                 LIMIT $2",
            )
            .bind_time(before)
            .bind(i64::from(limit))
            .fetch_all()
            .await?;
        let ids: Vec<Uuid> = rows.iter().map(|row| row.uuid("id")).collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(0);
        }
        tx.query(Sql::PerBackend {
            sqlite: "DELETE FROM webhook_delivery_attempts WHERE delivery_id IN (SELECT value FROM json_each($1))",
            postgres: "DELETE FROM webhook_delivery_attempts WHERE delivery_id = ANY($1)",
        })
        .bind_uuid_set(&ids)
        .execute()
        .await?;
        let deleted = tx
            .query(Sql::PerBackend {
                sqlite: "DELETE FROM webhook_deliveries WHERE id IN (SELECT value FROM json_each($1))",
                postgres: "DELETE FROM webhook_deliveries WHERE id = ANY($1)",
            })
            .bind_uuid_set(&ids)
            .execute()
            .await?;
        tx.commit().await?;
        Ok(deleted)
    }
}

#[async_trait]
impl WebhookWrites for SqlUnitOfWork {
    async fn insert_webhook_endpoint(&mut self, endpoint: &WebhookEndpoint) -> Result<(), StoreError> {
        self.tx
            .query(
                "INSERT INTO webhook_endpoints (id, tenant_id, url, description, event_filter, enabled, ordered, \
                 secret_sealed, previous_secret_sealed, previous_secret_expires_at, circuit_failures, \
                 circuit_open_until, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            )
            .bind_uuid(endpoint.id)
            .bind_uuid(endpoint.tenant_id)
            .bind(endpoint.url.as_str())
            .bind(endpoint.description.as_str())
            .bind_json(&filter_json(endpoint))
            .bind(endpoint.enabled)
            .bind(endpoint.ordered)
            .bind(endpoint.secret_sealed.as_str())
            .bind(endpoint.previous_secret_sealed.as_deref())
            .bind_opt_time(endpoint.previous_secret_expires_at)
            .bind(i32_of(endpoint.circuit_failures))
            .bind_opt_time(endpoint.circuit_open_until)
            .bind_time(endpoint.created_at)
            .bind_time(endpoint.updated_at)
            .execute()
            .await?;
        Ok(())
    }

    async fn count_webhook_endpoints(&mut self, tenant_id: Uuid) -> Result<u64, StoreError> {
        self.lock_tenant(tenant_id).await?;
        let row = self
            .tx
            .query("SELECT count(*) AS endpoints FROM webhook_endpoints WHERE tenant_id = $1")
            .bind_uuid(tenant_id)
            .fetch_one()
            .await?;
        row.count("endpoints")
    }

    async fn find_webhook_endpoint(&mut self, id: Uuid) -> Result<Option<WebhookEndpoint>, StoreError> {
        // Row locks on Postgres only: SQLite's unit of work holds the write lock.
        let row = self
            .tx
            .query(Sql::PerBackend {
                sqlite: select_endpoints!("id = $1"),
                postgres: concat!(select_endpoints!("id = $1"), " FOR UPDATE"),
            })
            .bind_uuid(id)
            .fetch_optional()
            .await?;
        row.as_ref().map(endpoint_from_row).transpose()
    }

    async fn update_webhook_endpoint(&mut self, endpoint: &WebhookEndpoint) -> Result<(), StoreError> {
        self.tx
            .query(
                "UPDATE webhook_endpoints SET url = $2, description = $3, event_filter = $4, enabled = $5, \
                 ordered = $6, secret_sealed = $7, previous_secret_sealed = $8, previous_secret_expires_at = $9, \
                 updated_at = $10, circuit_failures = CASE WHEN $11 THEN 0 ELSE circuit_failures END, \
                 circuit_openings = CASE WHEN $11 THEN 0 ELSE circuit_openings END, \
                 circuit_open_until = CASE WHEN $11 THEN NULL ELSE circuit_open_until END WHERE id = $1",
            )
            .bind_uuid(endpoint.id)
            .bind(endpoint.url.as_str())
            .bind(endpoint.description.as_str())
            .bind_json(&filter_json(endpoint))
            .bind(endpoint.enabled)
            .bind(endpoint.ordered)
            .bind(endpoint.secret_sealed.as_str())
            .bind(endpoint.previous_secret_sealed.as_deref())
            .bind_opt_time(endpoint.previous_secret_expires_at)
            .bind_time(endpoint.updated_at)
            .bind(endpoint.circuit_failures == 0 && endpoint.circuit_open_until.is_none())
            .execute()
            .await?;
        Ok(())
    }

    async fn delete_webhook_endpoint(&mut self, id: Uuid) -> Result<bool, StoreError> {
        // Explicitly rather than by cascade: SQLite enforces foreign keys per connection.
        self.tx
            .query(
                "DELETE FROM webhook_delivery_attempts WHERE delivery_id IN \
                 (SELECT id FROM webhook_deliveries WHERE endpoint_id = $1)",
            )
            .bind_uuid(id)
            .execute()
            .await?;
        self.tx.query("DELETE FROM webhook_deliveries WHERE endpoint_id = $1").bind_uuid(id).execute().await?;
        Ok(self.tx.query("DELETE FROM webhook_endpoints WHERE id = $1").bind_uuid(id).execute().await? > 0)
    }

    async fn enabled_webhook_endpoints(&mut self, tenant_ids: &[Uuid]) -> Result<Vec<WebhookEndpoint>, StoreError> {
        if tenant_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .tx
            .query(Sql::PerBackend {
                sqlite: select_endpoints!("enabled AND tenant_id IN (SELECT value FROM json_each($1))"),
                postgres: select_endpoints!("enabled AND tenant_id = ANY($1)"),
            })
            .bind_uuid_set(tenant_ids)
            .fetch_all()
            .await?;
        rows.iter().map(endpoint_from_row).collect()
    }

    async fn insert_webhook_deliveries(&mut self, deliveries: &[NewDelivery]) -> Result<u64, StoreError> {
        let mut inserted = 0;
        for delivery in deliveries {
            inserted += self
                .tx
                .query(
                    "INSERT INTO webhook_deliveries (id, endpoint_id, tenant_id, event_id, event_name, ordering_key, \
                     position, ordered, body, status, next_attempt_at, deadline_at, occurred_at, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', $10, $11, $12, $10) \
                     ON CONFLICT (endpoint_id, event_id) DO NOTHING",
                )
                .bind_uuid(Uuid::now_v7())
                .bind_uuid(delivery.endpoint_id)
                .bind_uuid(delivery.tenant_id)
                .bind_uuid(delivery.event_id)
                .bind(delivery.event_name.as_str())
                .bind(delivery.ordering_key.as_str())
                .bind(delivery.position.as_str())
                .bind(delivery.ordered)
                .bind(delivery.body.as_str())
                .bind_time(delivery.created_at)
                .bind_time(delivery.deadline_at)
                .bind_time(delivery.occurred_at)
                .execute()
                .await?;
        }
        Ok(inserted)
    }

    async fn replay_webhook_delivery(
        &mut self,
        id: Uuid,
        now: OffsetDateTime,
        deadline_at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let changed = self
            .tx
            .query(
                "UPDATE webhook_deliveries SET status = 'pending', round_attempts = 0, next_attempt_at = $2, \
                 deadline_at = $3, completed_at = NULL WHERE id = $1 AND status IN ('succeeded', 'dead')",
            )
            .bind_uuid(id)
            .bind_time(now)
            .bind_time(deadline_at)
            .execute()
            .await?;
        Ok(changed > 0)
    }

    async fn replay_webhook_deliveries(
        &mut self,
        endpoint_id: Uuid,
        status: DeliveryStatus,
        since: Option<OffsetDateTime>,
        now: OffsetDateTime,
        deadline_at: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        self.tx
            .query(
                "UPDATE webhook_deliveries SET status = 'pending', round_attempts = 0, next_attempt_at = $3, \
                 deadline_at = $4, completed_at = NULL \
                 WHERE endpoint_id = $1 AND status = $2 AND ($5 IS NULL OR created_at >= $5)",
            )
            .bind_uuid(endpoint_id)
            .bind(status.as_str())
            .bind_time(now)
            .bind_time(deadline_at)
            .bind_opt_time(since)
            .execute()
            .await
    }
}
