//! The sessions fleet: which partitions of the sessions this process serves.
//!
//! Every sessions worker announces itself with a heartbeat and holds time-limited leases on
//! partitions in the database (see `anna_store::fleet`). Each round (every
//! [`FleetConfig::renew_every`]) it renews its leases, counts the live workers and moves
//! toward its fair share, ⌈partitions ÷ workers⌉: it takes free or expired partitions when it
//! has fewer, and gives partitions up when it has more (a worker joined) — after stopping
//! their sessions cleanly. A worker that dies stops renewing; its leases expire after
//! [`FleetConfig::lease_ttl`] and the others take them over at their next round, so a
//! partition is served again within `SESSIONS_FAILOVER_MS`.
//!
//! Self-fencing: a lease this process could not renew in time is given up locally before it
//! can expire in the database — its sessions are closed and its writes refused (the lease's
//! fencing token goes with every write; see [`HeldLeases`]) — so a partition never runs on two
//! workers at once, even when this process is cut off from the database.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anna_domain::SessionStatus;
use anna_store::{Fence, FenceSource, Store, StoreError, WorkerInfo};
use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Settings of the fleet (`SESSIONS_*`).
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `SESSIONS_WORKER_ID`: unique among the live workers.
    pub worker_id: String,
    /// Shown by `anna fleet status`.
    pub host: String,
    /// `SESSIONS_PARTITIONS`.
    pub partitions: u32,
    /// `SESSIONS_FAILOVER_MS`: longest time a dead worker's partitions stay unserved.
    pub failover: Duration,
}

impl FleetConfig {
    /// How long a lease lasts unless renewed: two thirds of the failover time, so that the
    /// others notice the expiry at their next round and still take over within it.
    pub fn lease_ttl(&self) -> Duration {
        self.failover * 2 / 3
    }

    /// How often leases are renewed and the share is checked.
    pub fn renew_every(&self) -> Duration {
        self.lease_ttl() / 4
    }

    /// How long after the start of its last successful renewal a lease is given up locally:
    /// one round before it can expire in the database, which leaves two renewals to fail
    /// first and a whole round to close the sessions.
    pub fn fence_after(&self) -> Duration {
        self.lease_ttl() - self.renew_every()
    }
}

/// What the fleet asks of the sessions side when partitions come and go.
#[async_trait]
pub trait PartitionWork: Send + Sync {
    /// Starts serving `partitions`: first the commands a previous owner left pending, then new
    /// ones; their sessions are resumed, staggered.
    async fn start(&self, partitions: &[u32]);

    /// Stops serving `partitions`: commands in flight finish, then their connections close,
    /// leaving the sessions' status for the next owner to resume.
    async fn stop(&self, partitions: &[u32]);

    /// Stops at once, without waiting for anything the database must answer (self-fencing):
    /// connections close first, commands in flight are abandoned to the next owner.
    async fn abandon(&self, partitions: &[u32]);
}

#[derive(Debug, Clone, Copy)]
struct HeldLease {
    token: i64,
    /// Past this instant the lease is no longer used here, whatever the database says.
    fence_at: Instant,
}

/// The leases this process holds, as the sessions worker and the fenced store see them.
#[derive(Debug)]
pub struct HeldLeases {
    worker_id: Arc<str>,
    partitions: u32,
    partition_of: fn(u32, Uuid) -> u32,
    held: RwLock<HashMap<u32, HeldLease>>,
}

impl HeldLeases {
    pub fn new(worker_id: &str, partitions: u32, partition_of: fn(u32, Uuid) -> u32) -> Arc<Self> {
        Arc::new(Self { worker_id: worker_id.into(), partitions, partition_of, held: RwLock::new(HashMap::new()) })
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// `SESSIONS_PARTITIONS`.
    pub fn partition_count(&self) -> u32 {
        self.partitions
    }

    pub fn partition_of(&self, session_id: Uuid) -> u32 {
        (self.partition_of)(self.partitions, session_id)
    }

    /// Whether this process may act on `session_id` now.
    pub fn holds(&self, session_id: Uuid) -> bool {
        self.fence_of(session_id).is_ok()
    }

    /// The partitions held now, in order.
    pub fn partitions(&self) -> Vec<u32> {
        let held = self.read();
        let mut partitions: Vec<u32> = held.keys().copied().collect();
        partitions.sort_unstable();
        partitions
    }

    /// Holds `partition` under `token` until `fence_at` (the fleet's acquisitions; tests).
    pub(crate) fn hold(&self, partition: u32, token: i64, fence_at: Instant) {
        self.write().insert(partition, HeldLease { token, fence_at });
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u32, HeldLease>> {
        self.held.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u32, HeldLease>> {
        self.held.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl FenceSource for HeldLeases {
    fn fence_of(&self, session_id: Uuid) -> Result<Fence, StoreError> {
        let partition = self.partition_of(session_id);
        match self.read().get(&partition) {
            Some(lease) if Instant::now() < lease.fence_at => {
                Ok(Fence { partition, worker_id: self.worker_id.clone(), token: lease.token })
            }
            Some(_) => Err(StoreError::Fenced(format!("the lease of partition {partition} could not be renewed"))),
            None => Err(StoreError::Fenced(format!("partition {partition} is not held by this worker"))),
        }
    }
}

/// Partition work, carried out in order by one task beside the renewal loop: starting or
/// stopping sessions can take seconds, and renewals must not wait for it.
enum Op {
    Start(Vec<u32>),
    /// Stop, then release (partition, token).
    Give(Vec<(u32, i64)>),
}

/// One sessions worker's membership in the fleet.
pub struct Fleet {
    store: Arc<dyn Store>,
    work: Arc<dyn PartitionWork>,
    leases: Arc<HeldLeases>,
    config: FleetConfig,
    info: WorkerInfo,
    /// Partitions being given away: still held (and renewed) until their sessions stopped.
    leaving: Arc<std::sync::Mutex<BTreeSet<u32>>>,
}

impl Fleet {
    pub fn new(
        store: Arc<dyn Store>,
        work: Arc<dyn PartitionWork>,
        leases: Arc<HeldLeases>,
        config: FleetConfig,
    ) -> Self {
        let info = WorkerInfo {
            worker_id: config.worker_id.clone(),
            host: config.host.clone(),
            pid: std::process::id(),
            partitions: config.partitions,
        };
        Self { store, work, leases, config, info, leaving: Arc::default() }
    }

    fn leaving(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.leaving.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.config.lease_ttl().as_millis()).unwrap_or(i64::MAX)
    }

    /// Takes part in the fleet until `shutdown`; then stops every partition held and gives
    /// the leases up, so the others take them over at once rather than after an expiry.
    pub async fn run(&self, shutdown: CancellationToken) {
        tracing::info!(
            worker_id = %self.config.worker_id,
            partitions = self.config.partitions,
            lease_ttl_ms = self.config.lease_ttl().as_millis() as u64,
            "sessions worker joins the fleet"
        );
        let every = self.config.renew_every();
        let (ops, queue) = mpsc::unbounded_channel();
        let worker = tokio::spawn(carry_out(
            queue,
            self.work.clone(),
            self.store.clone(),
            self.leases.clone(),
            self.leaving.clone(),
        ));
        let mut next_round = Instant::now();
        loop {
            let fence_at = self.earliest_fence();
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(next_round) => {
                    next_round = Instant::now() + every;
                    self.round(&ops, &shutdown).await;
                }
                () = sleep_until_opt(fence_at) => self.fence_expired().await,
            }
        }
        // Work already asked for is finished (a start is stopped again just below).
        drop(ops);
        let _ = worker.await;
        self.leave().await;
    }

    /// Sessions by status across the fleet (every worker reports the same figures: take
    /// the max in queries). Statuses with no session read 0, not stale figures.
    async fn report_session_counts(&self) {
        match self.store.count_sessions_by_status().await {
            Ok(counts) => {
                for status in SessionStatus::ALL {
                    // Summed: the predecessor's `expired` rows count as `failed`.
                    let n: u64 = counts.iter().filter(|(s, _)| *s == status).map(|(_, n)| n).sum();
                    metrics::gauge!("sessions", "status" => status.as_str()).set(n as f64);
                }
            }
            Err(error) => tracing::debug!(%error, "cannot count sessions by status"),
        }
    }

    fn earliest_fence(&self) -> Option<Instant> {
        self.leases.read().values().map(|l| l.fence_at).min()
    }

    /// One round: heartbeat, renewal, then the share. Bounded by one renewal period, so a
    /// database that hangs delays neither the next round nor self-fencing.
    async fn round(&self, ops: &mpsc::UnboundedSender<Op>, shutdown: &CancellationToken) {
        let started = Instant::now();
        let renewed = tokio::select! {
            () = shutdown.cancelled() => return,
            // Polled side by side with the fence deadline: a hung renewal must not keep a
            // lease in use past it.
            renewed = tokio::time::timeout(self.config.renew_every(), self.renew()) => renewed,
            () = sleep_until_opt(self.earliest_fence()) => {
                self.fence_expired().await;
                return;
            }
        };
        let renewed = match renewed {
            Ok(Ok(renewed)) => renewed,
            Ok(Err(error)) => {
                metrics::counter!("sessions_lease_renewal_failures_total").increment(1);
                tracing::warn!(%error, "sessions leases could not be renewed");
                return;
            }
            Err(_) => {
                metrics::counter!("sessions_lease_renewal_failures_total").increment(1);
                tracing::warn!(
                    timeout_ms = self.config.renew_every().as_millis() as u64,
                    "sessions lease renewal timed out"
                );
                return;
            }
        };
        let fence_at = started + self.config.fence_after();
        let (lost, stray) = {
            let mut held = self.leases.write();
            let lost: Vec<u32> = held.keys().filter(|p| !renewed.iter().any(|(r, _)| r == *p)).copied().collect();
            for partition in &lost {
                held.remove(partition);
            }
            let mut stray = Vec::new();
            for (partition, token) in &renewed {
                match held.get_mut(partition) {
                    Some(lease) if lease.token == *token => lease.fence_at = fence_at,
                    // Renewed in the database but given up here (self-fenced meanwhile).
                    _ => stray.push((*partition, *token)),
                }
            }
            (lost, stray)
        };
        // The rest talks to the database too: like the renewal, it must not hold a lease in
        // use past its fence deadline if the database stops answering.
        let rest = async {
            if !lost.is_empty() {
                metrics::counter!("sessions_leases_lost_total").increment(lost.len() as u64);
                tracing::warn!(?lost, "sessions leases lost: their sessions stop here");
                self.work.abandon(&lost).await;
            }
            for (partition, token) in stray {
                self.release(partition, token).await;
            }
            if let Err(error) = self.rebalance(started, ops).await {
                tracing::warn!(%error, "sessions partitions could not be balanced");
            }
        };
        tokio::select! {
            () = rest => {}
            () = sleep_until_opt(self.earliest_fence()) => self.fence_expired().await,
        }
        // Only a metric: bounded, and never in the way of the fence deadline.
        let report =
            tokio::time::timeout(self.config.renew_every().min(Duration::from_secs(2)), self.report_session_counts());
        tokio::select! {
            _ = report => {}
            () = sleep_until_opt(self.earliest_fence()) => self.fence_expired().await,
        }
        metrics::gauge!("sessions_partitions_held").set(self.leases.read().len() as f64);
    }

    /// Heartbeat and renewal; returns the renewed (partition, token) pairs.
    async fn renew(&self) -> Result<Vec<(u32, i64)>, StoreError> {
        self.store.heartbeat(&self.info, self.ttl_ms()).await?;
        let renewed = self.store.renew_leases(&self.config.worker_id, self.ttl_ms()).await?;
        Ok(renewed.into_iter().map(|l| (l.partition, l.token)).collect())
    }

    /// Moves toward the fair share.
    async fn rebalance(&self, started: Instant, ops: &mpsc::UnboundedSender<Op>) -> Result<(), StoreError> {
        let view = self.store.fleet_view().await?;
        let mut live: BTreeSet<&str> = BTreeSet::new();
        for worker in view.live_workers() {
            if worker.info.partitions != self.config.partitions {
                tracing::error!(
                    other = %worker.info.worker_id,
                    theirs = worker.info.partitions,
                    ours = self.config.partitions,
                    "sessions workers disagree on SESSIONS_PARTITIONS: every worker must use the same value"
                );
            }
            live.insert(&worker.info.worker_id);
        }
        live.insert(&self.config.worker_id);
        let share = self.config.partitions.div_ceil(live.len() as u32);
        let leaving = self.leaving().clone();
        // Partitions on their way out no longer count as held.
        let held: Vec<u32> = self.leases.partitions().into_iter().filter(|p| !leaving.contains(p)).collect();
        let count = held.len() as u32;
        if count > share {
            // The highest ones: a worker keeps the same partitions across rebalances.
            let give: Vec<u32> = held.iter().rev().take((count - share) as usize).copied().collect();
            tracing::info!(?give, share, workers = live.len(), "giving sessions partitions to other workers");
            let tokens: Vec<(u32, i64)> = {
                let held = self.leases.read();
                give.iter().filter_map(|p| held.get(p).map(|l| (*p, l.token))).collect()
            };
            self.leaving().extend(give.iter().copied());
            let _ = ops.send(Op::Give(tokens));
        } else if count < share && leaving.is_empty() {
            let acquired = self
                .store
                .acquire_leases(&self.config.worker_id, self.config.partitions, share - count, self.ttl_ms())
                .await?;
            if acquired.is_empty() {
                return Ok(());
            }
            let fence_at = started + self.config.fence_after();
            for lease in &acquired {
                self.leases.hold(lease.partition, lease.token, fence_at);
            }
            for lease in &acquired {
                if let Some(previous) = &lease.previous_worker {
                    // A takeover: the previous owner's lease expired. The time the partition
                    // went unserved is measured from its last renewal (a lease's expiry
                    // minus its ttl) to now, on the database's clock.
                    let unserved_ms = lease.at_ms - (lease.previous_expired_at_ms - self.ttl_ms());
                    metrics::counter!("sessions_partition_takeovers_total").increment(1);
                    metrics::histogram!("sessions_failover_seconds").record(unserved_ms.max(0) as f64 / 1000.0);
                    tracing::info!(partition = lease.partition, %previous, unserved_ms, "sessions partition taken over");
                }
            }
            let partitions: Vec<u32> = acquired.iter().map(|l| l.partition).collect();
            tracing::info!(?partitions, share, workers = live.len(), "sessions partitions acquired");
            let _ = ops.send(Op::Start(partitions));
        }
        Ok(())
    }

    /// Gives up, locally, every lease past its fence deadline.
    async fn fence_expired(&self) {
        let now = Instant::now();
        let expired: Vec<u32> = {
            let mut held = self.leases.write();
            let expired: Vec<u32> = held.iter().filter(|(_, l)| l.fence_at <= now).map(|(p, _)| *p).collect();
            for partition in &expired {
                held.remove(partition);
            }
            expired
        };
        if expired.is_empty() {
            return;
        }
        metrics::counter!("sessions_self_fenced_total").increment(expired.len() as u64);
        tracing::error!(
            partitions = ?expired,
            "sessions leases could not be renewed in time: their sessions stop here before the leases expire"
        );
        self.work.abandon(&expired).await;
        metrics::gauge!("sessions_partitions_held").set(self.leases.read().len() as f64);
    }

    async fn release(&self, partition: u32, token: i64) {
        release(&*self.store, &self.config.worker_id, partition, token).await;
    }

    /// Graceful exit: stop everything, give every lease up, leave the registry.
    async fn leave(&self) {
        let held = self.leases.partitions();
        self.work.stop(&held).await;
        let tokens: Vec<(u32, i64)> = {
            let mut leases = self.leases.write();
            held.iter().filter_map(|p| leases.remove(p).map(|l| (*p, l.token))).collect()
        };
        for (partition, token) in tokens {
            self.release(partition, token).await;
        }
        if let Err(error) = self.store.remove_worker(&self.config.worker_id).await {
            tracing::warn!(%error, "sessions worker could not leave the registry; its entry will expire");
        }
        metrics::gauge!("sessions_partitions_held").set(0.0);
        tracing::info!(worker_id = %self.config.worker_id, released = held.len(), "sessions worker left the fleet");
    }

    /// Creates the lease rows, retrying until the database answers or `shutdown`.
    pub async fn prepare(&self, shutdown: &CancellationToken) -> bool {
        loop {
            match self.store.ensure_partitions(self.config.partitions).await {
                Ok(()) => return true,
                Err(error) => {
                    tracing::error!(%error, "sessions partitions could not be prepared");
                    tokio::select! {
                        () = shutdown.cancelled() => return false,
                        () = tokio::time::sleep(self.config.renew_every()) => {}
                    }
                }
            }
        }
    }
}

async fn release(store: &dyn Store, worker_id: &str, partition: u32, token: i64) {
    if let Err(error) = store.release_lease(worker_id, partition, token).await {
        tracing::warn!(partition, %error, "sessions lease could not be released; it will expire");
    }
}

/// Carries out partition work in order until the fleet loop ends.
async fn carry_out(
    mut queue: mpsc::UnboundedReceiver<Op>,
    work: Arc<dyn PartitionWork>,
    store: Arc<dyn Store>,
    leases: Arc<HeldLeases>,
    leaving: Arc<std::sync::Mutex<BTreeSet<u32>>>,
) {
    while let Some(op) = queue.recv().await {
        match op {
            Op::Start(partitions) => {
                // Some may have been lost or fenced meanwhile: only what is still held starts.
                let held = leases.partitions();
                let partitions: Vec<u32> = partitions.into_iter().filter(|p| held.contains(p)).collect();
                if !partitions.is_empty() {
                    work.start(&partitions).await;
                }
            }
            Op::Give(tokens) => {
                let partitions: Vec<u32> = tokens.iter().map(|(p, _)| *p).collect();
                work.stop(&partitions).await;
                for (partition, token) in tokens {
                    let still_ours = {
                        let mut held = leases.write();
                        let ours = held.get(&partition).is_some_and(|l| l.token == token);
                        if ours {
                            held.remove(&partition);
                        }
                        ours
                    };
                    if still_ours {
                        release(&*store, leases.worker_id(), partition, token).await;
                    }
                }
                let mut leaving = leaving.lock().unwrap_or_else(|e| e.into_inner());
                for partition in &partitions {
                    leaving.remove(partition);
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_follow_the_failover_time() {
        let config =
            FleetConfig { worker_id: "w".into(), host: "h".into(), partitions: 64, failover: Duration::from_secs(15) };
        assert_eq!(config.lease_ttl(), Duration::from_secs(10));
        assert_eq!(config.renew_every(), Duration::from_millis(2500));
        assert_eq!(config.fence_after(), Duration::from_millis(7500));
        // An expiry is noticed at the others' next round: still within the failover time.
        assert!(config.lease_ttl() + config.renew_every() < config.failover);
    }

    #[tokio::test]
    async fn a_lease_past_its_fence_deadline_is_no_longer_used() {
        let leases = HeldLeases::new("w1", 4, |partitions, id| (id.as_u128() % u128::from(partitions)) as u32);
        let id = Uuid::from_u128(6);
        assert!(matches!(leases.fence_of(id), Err(StoreError::Fenced(_))));
        leases.write().insert(2, HeldLease { token: 7, fence_at: Instant::now() + Duration::from_secs(60) });
        let fence = leases.fence_of(id).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((fence.partition, fence.token, &*fence.worker_id), (2, 7, "w1"));
        assert!(!leases.holds(Uuid::from_u128(5)));
        leases.write().insert(2, HeldLease { token: 7, fence_at: Instant::now() });
        assert!(!leases.holds(id));
    }
}
