//! Waking the outbox relay when a unit of work that appended events commits.
//!
//! This genuinely differs between the backends, so it is written twice:
//! - SQLite (the embedded shape) is one process: an in-process [`Notify`] signalled after
//!   commit is enough.
//! - Postgres may have relays in other processes: the appending transaction queues a
//!   `NOTIFY anna_outbox`, which Postgres delivers at commit (and not at all on rollback), and
//!   each process runs one listener task that turns notifications into permits of its own
//!   [`Notify`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::sql::Tx;
use crate::{ConnectOptions, StoreError};

/// The channel appends notify and relays listen on.
const OUTBOX_CHANNEL: &str = "anna_outbox";

/// At most one NOTIFY per this interval per process. A notifying transaction takes a
/// cluster-wide lock while it commits, so notifying on every commit caps the commit rate (here:
/// ~6 500/s with, ~9 400/s without). A relay woken by one notification keeps claiming while it
/// finds rows, and lingers briefly after, so skipped notifications cost no latency under load.
const NOTIFY_MIN_GAP: Duration = Duration::from_millis(5);

const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub(crate) enum OutboxWake {
    InProcess(Arc<Notify>),
    Postgres(Arc<PgWake>),
}

#[derive(Debug)]
pub(crate) struct PgWake {
    /// One connection, opened on the first wait, for the listener alone: a LISTEN connection
    /// is held for good, and taking it from the query pool would shrink that pool.
    listener_pool: PgPool,
    /// Signalled by the listener task for each notification.
    signal: Notify,
    /// The task that owns the `PgListener`, started by the first wait.
    listener_task: Mutex<Option<JoinHandle<()>>>,
    /// When a unit of work of this store last queued a NOTIFY (microseconds since `epoch()`).
    last_notify_micros: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl OutboxWake {
    pub(crate) fn in_process() -> Self {
        Self::InProcess(Arc::new(Notify::new()))
    }

    pub(crate) fn postgres(pool: &PgPool, options: &ConnectOptions) -> Self {
        let listener_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.acquire_timeout)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with((*pool.connect_options()).clone());
        Self::Postgres(Arc::new(PgWake {
            listener_pool,
            signal: Notify::new(),
            listener_task: Mutex::new(None),
            last_notify_micros: AtomicU64::new(0),
        }))
    }

    /// Called inside a transaction that appended events. On Postgres it queues the NOTIFY
    /// (at most one per transaction, coalesced per process: see `NOTIFY_MIN_GAP`).
    pub(crate) async fn appended(&self, tx: &mut Tx, queued: &mut bool) -> Result<(), StoreError> {
        let Self::Postgres(wake) = self else { return Ok(()) };
        if *queued {
            return Ok(());
        }
        let now = u64::try_from(epoch().elapsed().as_micros()).unwrap_or(u64::MAX);
        let last = wake.last_notify_micros.load(Ordering::Relaxed);
        let gap = u64::try_from(NOTIFY_MIN_GAP.as_micros()).unwrap_or(u64::MAX);
        // The first transaction after a quiet spell always notifies (last == 0 at start).
        if last == 0 || now.saturating_sub(last) >= gap {
            wake.last_notify_micros.store(now.max(1), Ordering::Relaxed);
            tx.query("SELECT pg_notify($1, '')").bind(OUTBOX_CHANNEL).execute().await?;
            *queued = true;
        }
        Ok(())
    }

    /// Called after a transaction that appended events committed.
    pub(crate) fn committed(&self) {
        if let Self::InProcess(signal) = self {
            // notify_one keeps a permit when the relay is not waiting yet (busy publishing the
            // previous batch), so its next wait returns at once instead of missing this commit.
            signal.notify_one();
        }
    }

    pub(crate) async fn wait(&self, timeout: Duration) {
        let signal = match self {
            Self::InProcess(signal) => signal.as_ref(),
            Self::Postgres(wake) => {
                wake.ensure_listener();
                &wake.signal
            }
        };
        // Elapsed is the ordinary outcome when nothing was appended, and the only one while
        // the Postgres listener cannot connect: the relay then polls at the pace of its timeout.
        let _ = tokio::time::timeout(timeout, signal.notified()).await;
    }

    /// Stops the Postgres listener (it holds its pool's connection for good, so that pool can
    /// only close once the task is gone).
    pub(crate) async fn close(&self) {
        if let Self::Postgres(wake) = self {
            let task = wake.listener_task.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(task) = task {
                task.abort();
            }
            wake.listener_pool.close().await;
        }
    }

    /// Wakes every waiting relay (the store is closing).
    pub(crate) fn wake_all(&self) {
        match self {
            Self::InProcess(signal) => signal.notify_waiters(),
            Self::Postgres(wake) => wake.signal.notify_waiters(),
        }
    }
}

impl PgWake {
    /// Starts the listener task unless it runs (it ends when its runtime does, so a store used
    /// from a new runtime gets a new one).
    fn ensure_listener(self: &Arc<Self>) {
        if self.listener_pool.is_closed() {
            return;
        }
        let mut task = self.listener_task.lock().unwrap_or_else(PoisonError::into_inner);
        if task.as_ref().is_none_or(JoinHandle::is_finished) {
            *task = Some(tokio::spawn(listen(self.clone())));
        }
    }
}

/// Owns the `PgListener` for as long as the store is open, turning notifications into permits
/// of `signal` and re-creating the listener after errors.
///
/// A task rather than a listener read only while the relay waits: Postgres cannot move its
/// NOTIFY queue past a listener whose socket nobody reads, so a relay busy for a long time
/// would make the queue grow by one entry per committed unit of work, and then wake up once
/// for each of them. Read continuously, every notification costs one `notify_one`, and any
/// number of them between two waits add up to a single wake-up.
async fn listen(wake: Arc<PgWake>) {
    let mut backoff = LISTEN_BACKOFF_MIN;
    let mut first = true;
    loop {
        let error = match PgListener::connect_with(&wake.listener_pool).await {
            Ok(mut listener) => match listener.listen(OUTBOX_CHANNEL).await {
                Ok(()) => {
                    // After an outage, events committed while nobody listened need a look.
                    if !first {
                        wake.signal.notify_one();
                    }
                    first = false;
                    backoff = LISTEN_BACKOFF_MIN;
                    relay_notifications(&mut listener, &wake.signal).await
                }
                Err(error) => error,
            },
            Err(error) => error,
        };
        if wake.listener_pool.is_closed() {
            return;
        }
        tracing::warn!(%error, retry_in = ?backoff, "outbox listener failed; relays poll until it is back");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
    }
}

/// Returns only with the error that ended the listener.
async fn relay_notifications(listener: &mut PgListener, signal: &Notify) -> sqlx::Error {
    loop {
        match listener.try_recv().await {
            // Ok(None): the connection dropped and sqlx re-established it. Whatever was
            // notified in between is lost, so wake the relay to look for itself.
            Ok(_) => signal.notify_one(),
            Err(error) => return error,
        }
    }
}
