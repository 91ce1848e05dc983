//! The sessions worker: owns the live WhatsApp connections of this process, carries out the
//! tenants' commands on them and records what the connections report.
//!
//! - Commands arrive through the consumer runtime (one consumer per command partition), which
//!   gives retries with backoff, idle claims, the DLQ and once-only handling by `commandId`.
//!   Every command is checked again here: the session must exist and belong to the command's
//!   tenant.
//! - Each live connection has a pump task that turns its [`DriverEvent`]s into use-case calls
//!   (and so into domain events through the outbox), and applies the reconnect policy when
//!   the connection closes: restart-required → at once; transient → exponential backoff with
//!   a cap and a maximum, then `failed`; logged out → keys wiped, `logged_out`; QR codes run
//!   out, replaced, banned, outdated → `failed` with the reason.
//! - The worker serves only the partitions of the sessions whose leases it holds (see
//!   [`crate::fleet`]): every connection it opens, and every write it makes (through a fenced
//!   store), is checked against them. When it acquires partitions, their sessions that were
//!   connected (or reconnecting) are resumed, staggered; pairings that were in progress are
//!   marked disconnected (`pairing_interrupted`): their QR codes belonged to a connection that
//!   no longer exists. A command for a session still waiting for its turn connects it at once.
//! - When it gives partitions up, or shuts down, their connections are closed without changing
//!   their sessions' status, so the next owner resumes them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::fleet::HeldLeases;
use anna_domain::events::RAW_MESSAGE;
use anna_domain::media::{IncomingMedia, MediaKind, StoredMedia};
use anna_domain::session::{ChangeKind, MessageChange, RawMessage};
use anna_domain::{DomainEvent, Session, SessionRef, SessionStatus};
use anna_streams::backoff::Backoff;
use anna_streams::consumer::{Effect, HandlerError, ReceivedEvent, Subscriber};
use anna_usecases::sessions::{
    COMMAND_DELETE, COMMAND_DELETE_MESSAGE, COMMAND_EDIT, COMMAND_LOGOUT, COMMAND_PAIR_CODE, COMMAND_REACT,
    COMMAND_READ, COMMAND_SEND, COMMAND_SIMULATE, COMMAND_START, COMMAND_STOP, COMMANDS,
};
use anna_usecases::{Media, SessionError, Sessions, Upload};
use anna_whatsapp::{
    CloseReason, DriverError, DriverEvent, Jid, LiveSession, MessageTarget, OutgoingMedia, OutgoingText, SentMessage,
    SessionDriver, SessionKey, Simulation,
};
use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Settings of the sessions worker (`SESSIONS_*`).
#[derive(Debug, Clone)]
pub struct SessionsWorkerConfig {
    /// `SESSIONS_RECONNECT_BACKOFF_MS` / `SESSIONS_RECONNECT_BACKOFF_MAX_MS`.
    pub reconnect_backoff: Backoff,
    /// `SESSIONS_RECONNECT_MAX_ATTEMPTS`: reconnects in a row before the session is `failed`.
    pub reconnect_max_attempts: u32,
    /// `SESSIONS_RESUME_STAGGER_MS`: pause between two sessions resumed at start.
    pub resume_stagger: Duration,
    /// `SESSIONS_QR_TTL_MS`: longest validity anna advertises for a QR code.
    pub qr_ttl: Duration,
    /// Events one connection may have waiting for the pump.
    pub event_buffer: usize,
    /// `SESSIONS_SEND_WAIT_MS`: how long a message for a session that is (re)connecting waits
    /// for the connection before it is recorded as failed.
    pub send_wait: Duration,
    /// `MEDIA_MAX_UPLOAD_BYTES`: the largest file sent (an upload, or a file at a URL).
    pub media_send_max_bytes: u64,
    /// `MEDIA_DOWNLOAD_MAX_BYTES`: received files larger than this are not downloaded.
    pub media_download_max_bytes: u64,
    /// `MEDIA_DOWNLOAD_CONCURRENCY`: received files downloaded at once by this process.
    pub media_download_concurrency: usize,
    /// `MEDIA_DOWNLOAD_TIMEOUT_MS`: longest download of one received file.
    pub media_download_timeout: Duration,
    /// `MEDIA_SEND_TIMEOUT_MS`: longest send of a file (its fetch, when by URL, and its upload
    /// to WhatsApp), so one slow file cannot hold its partition's commands for long.
    pub media_send_timeout: Duration,
    /// `MEDIA_SEND_CONCURRENCY`: files this process sends at once (each is held whole in memory).
    pub media_send_concurrency: usize,
    /// How files at URLs are fetched (`MEDIA_FETCH_*`).
    pub media_fetch: crate::media_fetch::FetchSettings,
    /// `MESSAGES_RAW_MAX_BYTES`: a message's raw form (WhatsApp's record of it, returned with
    /// `includeRaw=true`) is kept up to this size; 0 keeps none.
    pub raw_max_bytes: usize,
}

impl Default for SessionsWorkerConfig {
    fn default() -> Self {
        Self {
            reconnect_backoff: Backoff { base: Duration::from_secs(2), max: Duration::from_secs(300) },
            reconnect_max_attempts: 10,
            resume_stagger: Duration::from_millis(100),
            qr_ttl: Duration::from_secs(60),
            event_buffer: 256,
            send_wait: Duration::from_secs(15),
            media_send_max_bytes: 25 * 1024 * 1024,
            media_download_max_bytes: 100 * 1024 * 1024,
            media_download_concurrency: 4,
            media_download_timeout: Duration::from_secs(300),
            media_send_timeout: Duration::from_secs(120),
            media_send_concurrency: 4,
            media_fetch: crate::media_fetch::FetchSettings::default(),
            raw_max_bytes: 64 * 1024,
        }
    }
}

struct Live {
    connection: Arc<dyn LiveSession>,
    tenant_id: Uuid,
    /// Tells this connection's pump from a later one's.
    generation: u64,
    /// Whether WhatsApp has accepted the connection (set by the pump).
    connected: watch::Sender<bool>,
}

/// A live connection as a command sees it.
#[derive(Clone)]
struct Connection {
    session: Arc<dyn LiveSession>,
    connected: watch::Receiver<bool>,
}

pub struct SessionsWorker {
    sessions: Arc<Sessions>,
    /// Files: those sent (uploads, URLs), and those of received messages.
    media: Arc<Media>,
    /// Received files downloading at once.
    downloads: Arc<tokio::sync::Semaphore>,
    /// Files being sent at once.
    sends: Arc<tokio::sync::Semaphore>,
    /// Fetches files at URLs, under the address policy.
    fetcher: crate::media_fetch::Fetcher,
    /// The partitions this process serves.
    leases: Arc<HeldLeases>,
    driver: Arc<dyn SessionDriver>,
    config: SessionsWorkerConfig,
    live: Mutex<HashMap<Uuid, Live>>,
    /// Serialises opening connections (and the commands that close one), so a session never
    /// gets two; the map above is locked only briefly, never across the driver's I/O, so that
    /// commands, pumps and above all self-fencing never wait for a connect.
    connect_lock: Mutex<()>,
    /// Partitions whose connections are being closed: no connection of theirs may open.
    closing: std::sync::Mutex<std::collections::HashSet<u32>>,
    /// Failed reconnects in a row per session.
    reconnects: Mutex<HashMap<Uuid, u32>>,
    generations: AtomicU64,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Connections to open, asked for by pumps and reconnect timers and opened by [`Self::run`]
    /// (a pump never opens a connection itself, which would make its task contain itself).
    reconnect: mpsc::UnboundedSender<Reconnect>,
    reconnect_requests: Mutex<Option<mpsc::UnboundedReceiver<Reconnect>>>,
    /// Sessions to resume, one every `resume_stagger`, opened by [`Self::run`].
    resume: mpsc::UnboundedSender<SessionKey>,
    resume_requests: Mutex<Option<mpsc::UnboundedReceiver<SessionKey>>>,
    /// Message events on their way to the batch committer ([`commit_batches`]).
    batch: mpsc::Sender<Recorded>,
}

/// An event for the batch committer, the command it settles (if any), and who waits for it.
struct Recorded {
    event: DomainEvent,
    settles: Option<Uuid>,
    done: oneshot::Sender<Result<(), Arc<SessionError>>>,
}

/// A connection to open again; `after` is why the last attempt failed, if one did.
struct Reconnect {
    key: SessionKey,
    after: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("recording events failed: {0}")]
    Batch(String),
    #[error("recording events failed: {0}")]
    Recording(Arc<SessionError>),
    #[error("the session {0} belongs to a partition this worker does not hold")]
    NotHeld(Uuid),
    #[error("media: {0}")]
    Media(String),
}

impl WorkerError {
    /// This worker no longer holds the session: retrying cannot help.
    fn is_fenced(&self) -> bool {
        matches!(
            self,
            Self::NotHeld(_)
                | Self::Session(SessionError::Failed(anna_usecases::Failure::Store(anna_store::StoreError::Fenced(_))))
                | Self::Driver(DriverError::Store(anna_store::StoreError::Fenced(_)))
        ) || matches!(self, Self::Recording(error) if matches!(
            &**error,
            SessionError::Failed(anna_usecases::Failure::Store(anna_store::StoreError::Fenced(_)))
        ))
    }
}

/// Events waiting for the batch committer; senders wait when it is full.
const BATCH_QUEUE: usize = 4096;
/// Most events in one commit. Small enough that a commit stays short under load: with up to
/// 512 events per commit the batches grew to 200+ on a durable Postgres at 500 messages/s and
/// send → WebSocket p99 ranged over 0.4–1.6 s; with 40, 64–218 ms in the same session.
const MAX_BATCH: usize = 40;

/// Commits the message events of every session in batches: each commit takes whatever queued
/// up while the previous one ran (group commit), so a durable database's per-commit flush is
/// paid once per batch, not once per receipt.
async fn commit_batches(sessions: Arc<Sessions>, mut queue: mpsc::Receiver<Recorded>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut events = Vec::with_capacity(batch.len());
        let mut settled = Vec::new();
        let mut settled_by_item = Vec::with_capacity(batch.len());
        let mut waiting = Vec::with_capacity(batch.len());
        for recorded in batch.drain(..) {
            events.push(recorded.event);
            settled.extend(recorded.settles);
            settled_by_item.push(recorded.settles);
            waiting.push(recorded.done);
        }
        let result = sessions.append_events(&events, SUBSCRIBER, &settled).await.map_err(Arc::new);
        metrics::histogram!("session_event_batch_size").record(events.len() as f64);
        if result.is_err() && events.len() > 1 {
            // One session's failure (its partition just given up: a fenced write) must not
            // fail the others: each is committed on its own instead.
            for ((event, done), settles) in events.into_iter().zip(waiting).zip(settles_of(&settled_by_item)) {
                let result = sessions.append_events(&[event], SUBSCRIBER, &settles).await.map_err(Arc::new);
                let _ = done.send(result);
            }
            continue;
        }
        for done in waiting {
            let _ = done.send(result.clone());
        }
    }
}

/// The settled command of each item, as a list of zero or one.
fn settles_of(settled_by_item: &[Option<Uuid>]) -> impl Iterator<Item = Vec<Uuid>> + '_ {
    settled_by_item.iter().map(|settles| settles.iter().copied().collect())
}

/// The name the command subscriber records applied commands under.
const SUBSCRIBER: &str = "sessions-worker";

impl SessionsWorker {
    /// `sessions` must write through a store fenced by `leases`.
    pub fn new(
        sessions: Arc<Sessions>,
        media: Arc<Media>,
        leases: Arc<HeldLeases>,
        driver: Arc<dyn SessionDriver>,
        config: SessionsWorkerConfig,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, WorkerError> {
        let fetcher = crate::media_fetch::Fetcher::new(config.media_fetch.clone())
            .map_err(|e| WorkerError::Media(format!("the media fetch client: {e}")))?;
        let (reconnect, reconnect_requests) = mpsc::unbounded_channel();
        let (resume, resume_requests) = mpsc::unbounded_channel();
        let (batch, batches) = mpsc::channel(BATCH_QUEUE);
        tokio::spawn(commit_batches(sessions.clone(), batches));
        Ok(Arc::new(Self {
            downloads: Arc::new(tokio::sync::Semaphore::new(config.media_download_concurrency.max(1))),
            sends: Arc::new(tokio::sync::Semaphore::new(config.media_send_concurrency.max(1))),
            media,
            fetcher,
            batch,
            reconnect,
            reconnect_requests: Mutex::new(Some(reconnect_requests)),
            resume,
            resume_requests: Mutex::new(Some(resume_requests)),
            sessions,
            leases,
            driver,
            config,
            live: Mutex::new(HashMap::new()),
            connect_lock: Mutex::new(()),
            closing: std::sync::Mutex::default(),
            reconnects: Mutex::new(HashMap::new()),
            generations: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            shutdown,
        }))
    }

    pub fn driver_name(&self) -> &'static str {
        self.driver.name()
    }

    /// How many connections this process holds.
    pub async fn live_count(&self) -> usize {
        self.live.lock().await.len()
    }

    /// Records an event that changes nothing of its session (a message, a receipt) once it is
    /// committed, together with the events of other sessions waiting at the same time.
    async fn record(&self, event: DomainEvent) -> Result<(), WorkerError> {
        self.record_settling(event, None).await
    }

    /// Records several events of one session, in order, in as few commits as the committer
    /// makes of them; those that fail are retried on their own a few times, then logged as lost.
    async fn record_group(&self, key: SessionKey, group: Vec<DomainEvent>) {
        let mut waiting = Vec::with_capacity(group.len());
        for event in group {
            let (done, committed) = oneshot::channel();
            let traced = anna_usecases::traced([event.clone()]).remove(0);
            if self.batch.send(Recorded { event: traced, settles: None, done }).await.is_err() {
                tracing::error!(session_id = %key.session_id, "the batch committer stopped: session event lost");
                return;
            }
            waiting.push((event, committed));
        }
        for (event, committed) in waiting {
            let failed = match committed.await {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => WorkerError::Recording(error),
                Err(_) => WorkerError::Batch("the batch committer stopped".into()),
            };
            if failed.is_fenced() {
                tracing::debug!(session_id = %key.session_id, error = %failed, "Session event of a partition given up");
                continue;
            }
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                tracing::warn!(session_id = %key.session_id, error = %failed, attempt, "Recording a session event failed");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                match self.record(event.clone()).await {
                    Ok(()) => break,
                    Err(error) if error.is_fenced() => break,
                    Err(error) if attempt >= 5 || self.shutdown.is_cancelled() => {
                        tracing::error!(session_id = %key.session_id, %error, "Session event lost");
                        break;
                    }
                    Err(_) => {}
                }
            }
        }
    }

    /// [`Self::record`], recording `command` as applied in the same commit.
    async fn record_settling(&self, event: DomainEvent, command: Option<Uuid>) -> Result<(), WorkerError> {
        let (done, committed) = oneshot::channel();
        let event = anna_usecases::traced([event]).remove(0);
        let recorded = Recorded { event, settles: command, done };
        self.batch.send(recorded).await.map_err(|_| WorkerError::Batch("the batch committer stopped".into()))?;
        committed
            .await
            .map_err(|_| WorkerError::Batch("the batch committer stopped".into()))?
            .map_err(WorkerError::Recording)
    }

    /// Opens the connections asked for by reconnect policies, and the sessions to resume one
    /// every `SESSIONS_RESUME_STAGGER_MS`, until shutdown.
    pub async fn run(self: Arc<Self>) {
        tokio::join!(self.clone().reconnect_loop(), self.resume_loop());
    }

    async fn reconnect_loop(self: Arc<Self>) {
        let Some(mut requests) = self.reconnect_requests.lock().await.take() else { return };
        loop {
            let request = tokio::select! {
                () = self.shutdown.cancelled() => break,
                request = requests.recv() => request,
            };
            let Some(Reconnect { key, after }) = request else { break };
            if !self.leases.holds(key.session_id) {
                continue;
            }
            if let Err(error) = self.connect(key).await {
                if error.is_fenced() {
                    continue;
                }
                tracing::warn!(session_id = %key.session_id, %error, retry_of = after.as_deref().unwrap_or(""), "Session connect failed");
                self.schedule_reconnect(key, error.to_string()).await;
            }
        }
    }

    /// Opens the connections of resumed sessions, staggered: hundreds of sessions taken over
    /// at once must not reconnect in the same second (WhatsApp flags that).
    async fn resume_loop(self: Arc<Self>) {
        let Some(mut requests) = self.resume_requests.lock().await.take() else { return };
        // One start every `resume_stagger`, however long each connect call takes (a ticker,
        // not a sleep after each).
        let mut ticks = tokio::time::interval(self.config.resume_stagger.max(Duration::from_millis(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let key = tokio::select! {
                () = self.shutdown.cancelled() => break,
                key = requests.recv() => key,
            };
            let Some(key) = key else { break };
            // Given up meanwhile, or already connected by a command that could not wait.
            if !self.leases.holds(key.session_id) || self.live.lock().await.contains_key(&key.session_id) {
                continue;
            }
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            match self.connect(key).await {
                Ok(()) => metrics::counter!("sessions_resumed_total").increment(1),
                Err(error) if error.is_fenced() => continue,
                Err(error) => {
                    tracing::warn!(session_id = %key.session_id, %error, "Session could not be resumed");
                    self.schedule_reconnect(key, error.to_string()).await;
                }
            }
        }
    }

    /// Whether this worker holds `partition` now.
    pub fn holds_partition(&self, partition: u32) -> bool {
        self.leases.partitions().contains(&partition)
    }

    /// Queues the sessions of `partitions` that were connected (or reconnecting) for resuming,
    /// and marks their interrupted pairings. Returns how many were queued.
    pub async fn resume_partitions(self: &Arc<Self>, partitions: &[u32]) -> Result<usize, WorkerError> {
        {
            let mut closing = self.closing_partitions();
            for partition in partitions {
                closing.remove(partition);
            }
        }
        let mut queued = 0;
        for session in self.sessions.sessions_to_resume().await? {
            if !partitions.contains(&self.leases.partition_of(session.id)) {
                continue;
            }
            let key = SessionKey { session_id: session.id, tenant_id: session.tenant_id };
            let reconnecting = session.status == SessionStatus::Disconnected
                && session.disconnected_reason.as_deref().is_some_and(is_transient_reason);
            match session.status {
                SessionStatus::Connected => {}
                SessionStatus::Disconnected if reconnecting => {}
                SessionStatus::PendingQr if self.live.lock().await.contains_key(&session.id) => continue,
                SessionStatus::PendingQr => {
                    self.sessions.record_disconnected(session.id, "pairing_interrupted").await?;
                    continue;
                }
                _ => continue,
            }
            if self.resume.send(key).is_ok() {
                queued += 1;
            }
        }
        Ok(queued)
    }

    /// Closes the connections of `partitions` (every one when `None`), leaving their
    /// sessions' status for the next owner to resume.
    pub async fn close_partitions(&self, partitions: Option<&[u32]>) {
        {
            let mut closing = self.closing_partitions();
            match partitions {
                Some(partitions) => closing.extend(partitions.iter().copied()),
                None => closing.extend(0..self.leases.partition_count()),
            }
        }
        let closing: Vec<(Uuid, Live)> = {
            let mut live = self.live.lock().await;
            let ids: Vec<Uuid> = live
                .keys()
                .filter(|id| partitions.is_none_or(|ps| ps.contains(&self.leases.partition_of(**id))))
                .copied()
                .collect();
            let closing = ids.into_iter().filter_map(|id| live.remove(&id).map(|l| (id, l))).collect();
            metrics::gauge!("sessions_live").set(live.len() as f64);
            closing
        };
        {
            let mut reconnects = self.reconnects.lock().await;
            for (id, _) in &closing {
                reconnects.remove(id);
            }
        }
        futures::future::join_all(closing.iter().map(|(_, live)| live.connection.stop())).await;
        for (id, _) in &closing {
            self.log_connection(*id, "closed");
        }
        if !closing.is_empty() {
            tracing::info!(closed = closing.len(), ?partitions, "session connections closed");
        }
    }

    /// Closes every connection, leaving the sessions' status for the next start to resume.
    pub async fn close_all(&self) {
        self.close_partitions(None).await;
        self.tasks.close();
        // Pumps end when their connection's channel closes.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await;
        metrics::gauge!("sessions_live").set(0.0);
    }

    fn closing_partitions(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u32>> {
        self.closing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a connection of `session_id` may open here now.
    fn may_open(&self, session_id: Uuid) -> bool {
        self.leases.holds(session_id) && !self.closing_partitions().contains(&self.leases.partition_of(session_id))
    }

    /// Opens a connection unless one is live, if this worker holds the session.
    async fn connect(self: &Arc<Self>, key: SessionKey) -> Result<(), WorkerError> {
        let _one_at_a_time = self.connect_lock.lock().await;
        if self.live.lock().await.contains_key(&key.session_id) {
            return Ok(());
        }
        if !self.may_open(key.session_id) {
            return Err(WorkerError::NotHeld(key.session_id));
        }
        let (events, receiver) = mpsc::channel(self.config.event_buffer);
        let connection = self.driver.connect(key, events).await?;
        let mut live = self.live.lock().await;
        // The partition may have been given up while the driver read the device keys.
        if !self.may_open(key.session_id) {
            drop(live);
            connection.stop().await;
            return Err(WorkerError::NotHeld(key.session_id));
        }
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let (connected, _) = watch::channel(false);
        live.insert(key.session_id, Live { connection, tenant_id: key.tenant_id, generation, connected });
        self.log_connection(key.session_id, "opened");
        metrics::gauge!("sessions_live").set(live.len() as f64);
        drop(live);
        let worker = self.clone();
        self.tasks.spawn(async move { worker.pump(key, generation, receiver).await });
        Ok(())
    }

    /// Removes the connection if it is still the one of `generation`.
    async fn forget(&self, session_id: Uuid, generation: u64) -> bool {
        let mut live = self.live.lock().await;
        let current = live.get(&session_id).is_some_and(|l| l.generation == generation);
        if current {
            live.remove(&session_id);
            metrics::gauge!("sessions_live").set(live.len() as f64);
            self.log_connection(session_id, "closed");
        }
        current
    }

    /// The connection log: which worker had which session's connection open, and when (wall
    /// clock, comparable across the workers of one machine). With the leases' history it
    /// shows that no session ever ran on two workers at once.
    fn log_connection(&self, session_id: Uuid, what: &'static str) {
        tracing::info!(
            %session_id,
            worker_id = self.leases.worker_id(),
            partition = self.leases.partition_of(session_id),
            unix_ms = unix_ms(),
            "session connection {what}"
        );
    }

    async fn connection(&self, session_id: Uuid) -> Option<Arc<dyn LiveSession>> {
        self.live.lock().await.get(&session_id).map(|l| l.connection.clone())
    }

    /// The live connection of `session_id` if it was opened for `tenant_id`'s session.
    async fn connection_of(&self, session_id: Uuid, tenant_id: Uuid) -> Option<Connection> {
        let live = self.live.lock().await;
        live.get(&session_id)
            .filter(|l| l.tenant_id == tenant_id)
            .map(|l| Connection { session: l.connection.clone(), connected: l.connected.subscribe() })
    }

    /// Sets whether the connection of `generation` is accepted by WhatsApp.
    async fn mark_connected(&self, session_id: Uuid, generation: u64, connected: bool) {
        if let Some(live) = self.live.lock().await.get(&session_id).filter(|l| l.generation == generation) {
            live.connected.send_replace(connected);
        }
    }

    async fn pump(self: Arc<Self>, key: SessionKey, generation: u64, mut events: mpsc::Receiver<DriverEvent>) {
        let mut next = None;
        loop {
            let event = match next.take() {
                Some(event) => event,
                None => match events.recv().await {
                    Some(event) => keep_raw_within(event, self.config.raw_max_bytes),
                    None => break,
                },
            };
            // Messages, receipts and changes waiting already go to the committer together: a
            // burst (offline messages after a reconnect) is not recorded one commit at a time.
            if let Some(first) = plain_event(key, &event) {
                self.download_media_of(key, &event);
                let mut group = vec![first];
                while group.len() < MAX_BATCH {
                    let Ok(more) = events.try_recv() else { break };
                    let more = keep_raw_within(more, self.config.raw_max_bytes);
                    match plain_event(key, &more) {
                        Some(recorded) => {
                            self.download_media_of(key, &more);
                            group.push(recorded);
                        }
                        None => {
                            next = Some(more);
                            break;
                        }
                    }
                }
                self.record_group(key, group).await;
                continue;
            }
            let closed = matches!(event, DriverEvent::Closed { .. });
            // A failed record is retried a few times: losing a status change would leave the
            // tenant with a wrong picture.
            let mut attempt = 0u32;
            loop {
                match self.on_event(key, generation, &event).await {
                    Ok(()) => break,
                    Err(error) if error.is_fenced() => {
                        tracing::debug!(session_id = %key.session_id, %error, "Session event of a partition given up");
                        break;
                    }
                    Err(error) if attempt < 5 && !self.shutdown.is_cancelled() => {
                        attempt += 1;
                        tracing::warn!(session_id = %key.session_id, %error, attempt, "Recording a session event failed");
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    }
                    Err(error) => {
                        tracing::error!(session_id = %key.session_id, %error, "Session event lost");
                        break;
                    }
                }
            }
            if closed {
                break;
            }
        }
    }

    async fn on_event(
        self: &Arc<Self>,
        key: SessionKey,
        generation: u64,
        event: &DriverEvent,
    ) -> Result<(), WorkerError> {
        let id = key.session_id;
        let now = OffsetDateTime::now_utc();
        match event {
            DriverEvent::Qr { code, ttl } => {
                let ttl = (*ttl).min(self.config.qr_ttl);
                self.sessions.record_qr(id, code, now + time_duration(ttl)).await?;
                metrics::counter!("session_qr_codes_total").increment(1);
            }
            DriverEvent::PairCode { code, ttl } => {
                self.sessions.record_pair_code(id, code, now + time_duration(*ttl)).await?;
            }
            DriverEvent::Paired { phone } => {
                tracing::info!(session_id = %id, phone_suffix = %phone_suffix(phone), "Session paired");
            }
            DriverEvent::Connected { phone } => {
                self.reconnects.lock().await.remove(&id);
                self.sessions.record_connected(id, phone).await?;
                metrics::counter!("session_connects_total").increment(1);
                self.mark_connected(id, generation, true).await;
                tracing::info!(session_id = %id, worker_id = self.leases.worker_id(), unix_ms = unix_ms(), "session connected");
            }
            DriverEvent::Disconnected { reason, .. } => {
                metrics::counter!("session_disconnects_total", "reason" => reason.kind()).increment(1);
                self.mark_connected(id, generation, false).await;
                self.sessions.record_disconnected(id, &reason.label()).await?;
            }
            DriverEvent::Message(_)
            | DriverEvent::Changed(_)
            | DriverEvent::Presence(_)
            | DriverEvent::ChatRead { .. }
            | DriverEvent::Receipt { .. }
            | DriverEvent::SendRejected { .. } => {
                if let Some(recorded) = plain_event(key, event) {
                    self.record(recorded).await?;
                }
            }
            // The piece's slot is given back when this event is dropped, once it is stored.
            DriverEvent::History(piece, _slot) => {
                let started = std::time::Instant::now();
                let stored = self.sessions.record_history(key.session_id, key.tenant_id, piece).await?;
                metrics::counter!("session_history_messages_total").increment(stored);
                tracing::debug!(session_id = %key.session_id, messages = piece.messages.len(), new = stored,
                    chats = piece.chats.len(), ms = started.elapsed().as_millis() as u64, "history piece stored");
            }
            DriverEvent::Closed { reason } => {
                if !self.forget(id, generation).await {
                    return Ok(());
                }
                metrics::counter!("session_closes_total", "reason" => reason.kind()).increment(1);
                self.after_close(key, reason).await?;
            }
        }
        Ok(())
    }

    /// The reconnect policy.
    async fn after_close(self: &Arc<Self>, key: SessionKey, reason: &CloseReason) -> Result<(), WorkerError> {
        let id = key.session_id;
        match reason {
            CloseReason::Stopped => {}
            CloseReason::RestartRequired => {
                let _ = self.reconnect.send(Reconnect { key, after: None });
            }
            CloseReason::Transient(detail) => {
                self.sessions.record_disconnected(id, &reason.label()).await?;
                self.schedule_reconnect(key, detail.clone()).await;
            }
            CloseReason::LoggedOut(_) => {
                self.driver.wipe(key).await?;
                self.sessions.record_logged_out(id, &reason.label()).await?;
            }
            CloseReason::QrTimeout | CloseReason::Replaced | CloseReason::Banned(_) | CloseReason::ClientOutdated => {
                self.sessions.record_failed(id, &reason.label()).await?;
            }
        }
        Ok(())
    }

    async fn schedule_reconnect(&self, key: SessionKey, why: String) {
        let attempt = {
            let mut reconnects = self.reconnects.lock().await;
            let attempt = reconnects.entry(key.session_id).or_insert(0);
            *attempt += 1;
            *attempt
        };
        if attempt > self.config.reconnect_max_attempts {
            self.reconnects.lock().await.remove(&key.session_id);
            let reason = format!("reconnect_failed: {why}");
            metrics::counter!("session_reconnects_exhausted_total").increment(1);
            if let Err(error) = self.sessions.record_failed(key.session_id, &reason).await {
                tracing::error!(session_id = %key.session_id, %error, "Session failure could not be recorded");
            }
            return;
        }
        let delay = self.config.reconnect_backoff.delay(attempt);
        tracing::info!(session_id = %key.session_id, attempt, delay_ms = delay.as_millis() as u64, "Session reconnects");
        let (sessions, shutdown, reconnect) = (self.sessions.clone(), self.shutdown.clone(), self.reconnect.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            // Stopped, deleted or logged out meanwhile: nothing to resume.
            match sessions.find(key.session_id).await {
                Ok(Some(session)) if session.status == SessionStatus::Disconnected => {}
                Ok(_) => return,
                Err(error) => tracing::warn!(session_id = %key.session_id, %error, "Session state unreadable"),
            }
            let _ = reconnect.send(Reconnect { key, after: Some(why) });
        });
    }

    /// Carries out one command. Errors are retried by the consumer runtime.
    async fn handle_command(self: &Arc<Self>, command: &ReceivedEvent) -> Result<(), HandlerError> {
        let event = &command.event;
        let payload = &event.payload;
        let Ok(id) = Uuid::parse_str(&event.aggregate_id) else {
            tracing::warn!(command = %event.event_name, "Session command without a valid session id dropped");
            return Ok(());
        };
        let tenant = event.tenant_id.as_deref().and_then(|t| Uuid::parse_str(t).ok());
        // The hot path: a send through a live connection of the command's tenant needs no read.
        // The connection was opened for that tenant's session, and a deletion closes it before
        // any later command of the session (one partition, in order) is handled.
        if event.event_name == COMMAND_SEND
            && let Some(tenant_id) = tenant
            && let Some(connection) = self.connection_of(id, tenant_id).await
        {
            return self.send(SessionKey { session_id: id, tenant_id }, event, Ok(connection)).await;
        }
        if !self.leases.holds(id) {
            // Given up while this command was on its way: it stays pending for the next owner.
            return Err(HandlerError::new(WorkerError::NotHeld(id)));
        }
        let session = self.sessions.find(id).await.map_err(HandlerError::new)?;
        let session = match (session, tenant) {
            (Some(session), Some(tenant)) if session.tenant_id == tenant => session,
            (None, _) if event.event_name == COMMAND_DELETE => return Ok(()),
            _ => {
                // Forged, stale (deleted session) or misrouted: never act on another tenant's session.
                tracing::warn!(session_id = %id, command = %event.event_name, "Session command refused: no such session for its tenant");
                metrics::counter!("session_commands_refused_total").increment(1);
                return Ok(());
            }
        };
        let key = SessionKey { session_id: id, tenant_id: session.tenant_id };
        match event.event_name.as_str() {
            COMMAND_START => {
                self.reconnects.lock().await.remove(&id);
                self.connect(key).await.map_err(HandlerError::new)?;
            }
            COMMAND_STOP => {
                let reason = payload["reason"].as_str().unwrap_or("stopped");
                let _no_connect_meanwhile = self.connect_lock.lock().await;
                if let Some(live) = self.live.lock().await.remove(&id) {
                    live.connection.stop().await;
                    self.log_connection(id, "closed");
                }
                self.sessions.record_disconnected(id, reason).await.map_err(HandlerError::new)?;
            }
            COMMAND_SEND => {
                let connection = self.connection_for_command(key, &session).await?;
                self.send(key, event, connection).await?;
            }
            COMMAND_PAIR_CODE => {
                let phone = payload["phone"].as_str().unwrap_or_default();
                self.connect(key).await.map_err(HandlerError::new)?;
                if let Some(connection) = self.connection(id).await
                    && let Err(error) = connection.pair_with_code(phone).await
                {
                    tracing::warn!(session_id = %id, %error, "Pairing code refused");
                }
            }
            COMMAND_LOGOUT => {
                let _no_connect_meanwhile = self.connect_lock.lock().await;
                if let Some(live) = self.live.lock().await.remove(&id) {
                    self.log_connection(id, "closed");
                    if let Err(error) = live.connection.logout().await {
                        tracing::warn!(session_id = %id, %error, "Logout could not reach WhatsApp; keys are wiped anyway");
                    }
                }
                self.driver.wipe(key).await.map_err(HandlerError::new)?;
                self.sessions.record_logged_out(id, "logged out by the tenant").await.map_err(HandlerError::new)?;
            }
            COMMAND_DELETE => {
                let _no_connect_meanwhile = self.connect_lock.lock().await;
                if let Some(live) = self.live.lock().await.remove(&id) {
                    self.log_connection(id, "closed");
                    if let Err(error) = live.connection.logout().await {
                        tracing::warn!(session_id = %id, %error, "Logout could not reach WhatsApp; keys are wiped anyway");
                    }
                }
                self.sessions.record_deleted(id).await.map_err(HandlerError::new)?;
            }
            COMMAND_READ | COMMAND_EDIT | COMMAND_DELETE_MESSAGE | COMMAND_REACT => {
                self.change_messages(key, &session, event).await?;
            }
            COMMAND_SIMULATE => {
                let simulation = payload["action"].as_str().and_then(Simulation::parse);
                match (simulation, self.connection(id).await) {
                    (Some(simulation), Some(connection)) => {
                        if let Err(error) = connection.simulate(simulation).await {
                            tracing::warn!(session_id = %id, %error, action = simulation.as_str(), "Simulation refused");
                        }
                    }
                    (None, _) => tracing::warn!(session_id = %id, "Unknown simulation dropped"),
                    (Some(_), None) => {
                        tracing::warn!(session_id = %id, "Simulation for a session without a connection dropped")
                    }
                }
            }
            other => return Err(HandlerError::new(format!("Unknown session command: {other}"))),
        }
        Ok(())
    }
}

impl SessionsWorker {
    /// Sends a text message through `connection` (or records why it could not go: the
    /// session's status when it has no connection) and records `session.message.sent` or
    /// `session.message.failed`. Never retried: a send that might have gone out must not go
    /// twice.
    async fn send(
        &self,
        key: SessionKey,
        command: &DomainEvent,
        connection: Result<Connection, SessionStatus>,
    ) -> Result<(), HandlerError> {
        let payload = &command.payload;
        let to = payload["to"].as_str().unwrap_or_default();
        let outcome = match Jid::parse(to) {
            Err(error) => Err(format!("invalid recipient: {error}")),
            Ok(jid) => match self.ready(connection).await {
                Ok(live) => match payload.get("media").filter(|media| media.is_object()) {
                    None => {
                        let message = OutgoingText {
                            to: jid,
                            text: payload["content"].as_str().unwrap_or_default().to_owned(),
                            reply_to: payload["replyToMessageId"].as_str().map(str::to_owned),
                            forwarding_score: forwarding_score(payload),
                        };
                        live.send_text(&message).await.map(|sent| (sent, None)).map_err(|e| e.to_string())
                    }
                    Some(media) => {
                        let timeout = self.config.media_send_timeout;
                        let sending = async {
                            let _turn = self.sends.clone().acquire_owned().await.map_err(|e| e.to_string())?;
                            self.send_media(key, live.as_ref(), jid, payload, media).await
                        };
                        tokio::time::timeout(timeout, sending).await.unwrap_or_else(|_| {
                            Err(format!(
                                "the file was not sent within MEDIA_SEND_TIMEOUT_MS ({} ms)",
                                timeout.as_millis()
                            ))
                        })
                    }
                },
                Err(why) => Err(why),
            },
        };
        let now = OffsetDateTime::now_utc();
        metrics::counter!("session_messages_total", "outcome" => if outcome.is_ok() { "sent" } else { "failed" })
            .increment(1);
        let event = match outcome {
            Ok((SentMessage { message_id, raw }, media)) => {
                let mut event = reference(key).message_sent(command.event_id, &message_id, to, now);
                if let Some(raw) = raw_within(raw, self.config.raw_max_bytes) {
                    event.payload[RAW_MESSAGE] = raw.into_json();
                }
                if let Some(client_id) = payload["messageId"].as_str() {
                    event.payload["clientMessageId"] = client_id.into();
                }
                // For the message history: the chat (the recipient as a JID) and what was sent.
                let chat = Jid::parse(to).map_or_else(|_| to.to_owned(), |jid| jid.to_string());
                event.payload["chat"] = chat.clone().into();
                event.payload["text"] = payload["content"].clone();
                if let Some(score) = forwarding_score(payload) {
                    event.payload["forward"] = serde_json::json!({"isForwarded": true, "forwardingScore": score});
                }
                if let Some(reply_to) = payload["replyToMessageId"].as_str() {
                    event.payload["replyTo"] = serde_json::json!({"messageId": reply_to, "participant": null});
                }
                if let Some(mut media) = media {
                    media.message_id = message_id.clone();
                    media.chat = chat;
                    event.payload["type"] = media.kind.message_type().into();
                    event.payload["media"] = media.to_json();
                }
                event
            }
            Err(reason) => reference(key).message_failed(command.event_id, to, &reason, now),
        };
        self.settle(key, event, command.event_id).await
    }

    /// Sends the file a send command names (an upload, or a file at a URL, fetched and kept
    /// first); returns the message id and what was sent.
    async fn send_media(
        &self,
        key: SessionKey,
        live: &dyn LiveSession,
        to: Jid,
        payload: &serde_json::Value,
        media: &serde_json::Value,
    ) -> Result<(SentMessage, Option<StoredMedia>), String> {
        let kind = media["kind"].as_str().and_then(MediaKind::parse).ok_or("invalid media: no kind")?;
        let limit = self.config.media_send_max_bytes;
        let (object, bytes) = match (media["mediaId"].as_str(), media["url"].as_str()) {
            (Some(id), _) => {
                let id = Uuid::parse_str(id).map_err(|_| "invalid media id".to_owned())?;
                self.media.load_for_send(key.tenant_id, id, kind, limit).await.map_err(|e| e.to_string())?
            }
            (None, Some(url)) => {
                let fetched = self.fetcher.fetch(url, limit).await.map_err(|e| e.to_string())?;
                let upload = Upload {
                    kind,
                    file: fetched.file,
                    file_name: media["fileName"].as_str().map(str::to_owned).or(fetched.file_name),
                    declared_mime: fetched.declared_mime,
                };
                let session = SessionRef { id: key.session_id, tenant_id: key.tenant_id };
                self.media.store_fetched(session, upload).await.map_err(|e| e.to_string())?
            }
            (None, None) => return Err("invalid media: neither mediaId nor url".into()),
        };
        let caption = payload["content"].as_str().filter(|text| !text.is_empty()).map(str::to_owned);
        let outgoing = OutgoingMedia {
            to,
            kind,
            bytes,
            mime: object.mime.clone(),
            file_name: object.file_name.clone(),
            caption,
            ptt: payload["ptt"].as_bool().unwrap_or(false) && kind == MediaKind::Audio,
            reply_to: payload["replyToMessageId"].as_str().map(str::to_owned),
            forwarding_score: forwarding_score(payload),
        };
        let sent_message = live.send_media(&outgoing).await.map_err(|e| e.to_string())?;
        let sent = StoredMedia {
            media_id: object.id,
            message_id: sent_message.message_id.clone(),
            chat: String::new(),
            kind,
            mime: object.mime,
            size: object.size,
            file_name: object.file_name,
            sha256: object.sha256,
            width: None,
            height: None,
            duration: None,
        };
        Ok((sent_message, Some(sent)))
    }

    /// Downloads the file of a received message in the background (at most
    /// `MEDIA_DOWNLOAD_CONCURRENCY` at once), stores it and records `session.messages.media`.
    /// A file that cannot be fetched is logged and counted; its message stays, without media.
    fn download_media_of(self: &Arc<Self>, key: SessionKey, event: &DriverEvent) {
        let DriverEvent::Message(message) = event else { return };
        let Some(media) = message.media.clone() else { return };
        let (worker, message_id, chat) = (self.clone(), message.message_id.clone(), message.chat.clone());
        self.tasks.spawn(async move {
            let outcome = worker.download(key, &message_id, &chat, &media).await;
            let label = if outcome.is_ok() { "stored" } else { "failed" };
            metrics::counter!("session_media_downloads_total", "outcome" => label).increment(1);
            if let Err(error) = outcome {
                tracing::warn!(session_id = %key.session_id, %message_id, kind = media.kind.as_str(), %error,
                    "the file of a received message was not stored");
            }
        });
    }

    async fn download(
        &self,
        key: SessionKey,
        message_id: &str,
        chat: &str,
        media: &IncomingMedia,
    ) -> Result<(), String> {
        let limit = self.config.media_download_max_bytes;
        if media.size.is_some_and(|size| size > limit) {
            return Err(format!("larger than MEDIA_DOWNLOAD_MAX_BYTES ({limit})"));
        }
        let session = SessionRef { id: key.session_id, tenant_id: key.tenant_id };
        // A message reported again (a reconnect, a redelivery) already has its file.
        if self.media.has_media(session, message_id).await.map_err(|e| e.to_string())? {
            return Ok(());
        }
        let _turn = tokio::select! {
            () = self.shutdown.cancelled() => return Err("shutting down".into()),
            permit = self.downloads.clone().acquire_owned() => permit.map_err(|e| e.to_string())?,
        };
        let live = self.connection(key.session_id).await.ok_or("the connection closed")?;
        let (file, path) = tempfile::NamedTempFile::new().map_err(|e| format!("temporary file: {e}"))?.into_parts();
        let timeout = self.config.media_download_timeout;
        match tokio::time::timeout(timeout, live.download_media(media, limit, file)).await {
            Ok(downloaded) => downloaded.map_err(|e| e.to_string())?,
            Err(_) => return Err(format!("no file within MEDIA_DOWNLOAD_TIMEOUT_MS ({} ms)", timeout.as_millis())),
        };
        let staged = anna_media::StagedFile::from_written(path).await.map_err(|e| e.to_string())?;
        self.media.store_received(session, message_id, chat, media, staged).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The session's connection for a command that goes to WhatsApp, or its status when it has
    /// none. A session taken over a moment ago and still waiting for its turn to resume is
    /// connected now: a command does not wait for the stagger.
    async fn connection_for_command(
        self: &Arc<Self>,
        key: SessionKey,
        session: &Session,
    ) -> Result<Result<Connection, SessionStatus>, HandlerError> {
        let should_be_live = session.status == SessionStatus::Connected
            || (session.status == SessionStatus::Disconnected
                && session.disconnected_reason.as_deref().is_some_and(is_transient_reason));
        if should_be_live && self.connection_of(key.session_id, key.tenant_id).await.is_none() {
            self.connect(key).await.map_err(HandlerError::new)?;
        }
        Ok(self.connection_of(key.session_id, key.tenant_id).await.ok_or(session.status))
    }

    /// The live connection once WhatsApp accepts it (a session reconnecting is waited for up to
    /// `SESSIONS_SEND_WAIT_MS`), or why there is none.
    async fn ready(&self, connection: Result<Connection, SessionStatus>) -> Result<Arc<dyn LiveSession>, String> {
        let mut connection =
            connection.map_err(|status| format!("the session is not connected (status: {})", status.as_str()))?;
        let wait = self.config.send_wait;
        let connected = tokio::time::timeout(wait, connection.connected.wait_for(|connected| *connected))
            .await
            .is_ok_and(|connected| connected.is_ok());
        if connected {
            Ok(connection.session)
        } else {
            Err(format!("the session did not connect within {} ms", wait.as_millis()))
        }
    }

    /// Records a command's outcome together with the command as applied: a redelivery (this
    /// worker died before the ack, or lost the partition) finds it settled and does nothing
    /// twice. What the command did may be out already, so the record is retried here a few
    /// times rather than the whole command by the consumer (which would do it again).
    async fn settle(&self, key: SessionKey, event: DomainEvent, command_id: Uuid) -> Result<(), HandlerError> {
        let mut attempt = 0u32;
        loop {
            match self.record_settling(event.clone(), Some(command_id)).await {
                Ok(()) => return Ok(()),
                Err(error) if attempt < 5 && !error.is_fenced() && !self.shutdown.is_cancelled() => {
                    attempt += 1;
                    tracing::warn!(session_id = %key.session_id, %error, attempt, "Recording a command's outcome failed");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(error) => return Err(HandlerError::new(error)),
            }
        }
    }

    /// Reads, edits, deletes or reacts to stored messages, then records what was done
    /// (`session.chats.update`, `session.messages.edit|delete|reaction`) or why not
    /// (`session.command.failed`). Never retried once WhatsApp may have been told.
    async fn change_messages(
        self: &Arc<Self>,
        key: SessionKey,
        session: &Session,
        command: &DomainEvent,
    ) -> Result<(), HandlerError> {
        let payload = &command.payload;
        let name = command.event_name.as_str();
        let chat_text = payload["chat"].as_str().unwrap_or_default();
        let ids: Vec<String> = match name {
            COMMAND_READ => payload["messageIds"]
                .as_array()
                .map(|ids| ids.iter().filter_map(|id| id.as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
            _ => payload["messageId"].as_str().map(str::to_owned).into_iter().collect(),
        };
        // Nothing is sent yet: a store failure here is retried by the consumer.
        let stored = self.sessions.stored_messages(key.session_id, chat_text, &ids).await.map_err(HandlerError::new)?;
        let now = OffsetDateTime::now_utc();
        let outcome = match Jid::parse(chat_text) {
            Err(error) => Err(format!("invalid chat: {error}")),
            Ok(_) if stored.is_empty() => Err(format!("message not found: {}", ids.join(", "))),
            Ok(chat) => {
                let targets: Vec<MessageTarget> = stored
                    .iter()
                    .map(|message| MessageTarget {
                        chat: chat.clone(),
                        message_id: message.message_id.clone(),
                        from_me: message.from_me,
                        sender: message.sender_jid.as_deref().and_then(|sender| Jid::parse(sender).ok()),
                    })
                    .collect();
                let connection = self.connection_for_command(key, session).await?;
                match self.ready(connection).await {
                    Err(why) => Err(why),
                    Ok(live) => self.carry_out(key, session, command, &live, &chat, &targets, now).await,
                }
            }
        };
        let succeeded = outcome.is_ok();
        metrics::counter!("session_message_changes_total", "outcome" => if succeeded { "done" } else { "failed" })
            .increment(1);
        let event =
            outcome.unwrap_or_else(|reason| reference(key).command_failed(command.event_id, name, &reason, now));
        self.settle(key, event, command.event_id).await
    }

    /// The driver's part of [`Self::change_messages`], and the event that records it.
    #[allow(clippy::too_many_arguments)]
    async fn carry_out(
        &self,
        key: SessionKey,
        session: &Session,
        command: &DomainEvent,
        live: &Arc<dyn LiveSession>,
        chat: &Jid,
        targets: &[MessageTarget],
        now: OffsetDateTime,
    ) -> Result<DomainEvent, String> {
        let payload = &command.payload;
        let failed = |error: DriverError| error.to_string();
        let Some(target) = targets.first() else { return Err("no message to act on".into()) };
        let own = session.phone.as_deref().and_then(|phone| Jid::parse(phone).ok()).map(|jid| jid.to_string());
        // In whole seconds, as WhatsApp stamps the changes made on the phone: a later change
        // there must not look older than this one.
        let at = now.replace_nanosecond(0).unwrap_or(now);
        let change = |kind| MessageChange {
            chat: chat.to_string(),
            message_id: target.message_id.clone(),
            actor: own.clone().unwrap_or_default(),
            from_me: true,
            at,
            kind,
        };
        let kind = match command.event_name.as_str() {
            COMMAND_READ => {
                live.mark_read(chat, targets).await.map_err(failed)?;
                let ids: Vec<String> = targets.iter().map(|target| target.message_id.clone()).collect();
                return Ok(reference(key).chat_read(command.event_id, &chat.to_string(), &ids, now));
            }
            COMMAND_EDIT => {
                let text = payload["content"].as_str().unwrap_or_default();
                live.edit_text(target, text).await.map_err(failed)?;
                ChangeKind::Edited { text: Some(text.to_owned()) }
            }
            COMMAND_DELETE_MESSAGE => {
                live.revoke(target).await.map_err(failed)?;
                ChangeKind::Revoked
            }
            _ => {
                let emoji = payload["emoji"].as_str().filter(|emoji| !emoji.is_empty());
                live.react(target, emoji.unwrap_or_default()).await.map_err(failed)?;
                ChangeKind::Reaction { emoji: emoji.map(str::to_owned) }
            }
        };
        Ok(reference(key).message_changed(&change(kind), Some(command.event_id)))
    }
}

/// The subscriber the consumer runtime runs for the command streams.
pub struct SessionCommands(pub Arc<SessionsWorker>);

#[async_trait]
impl Subscriber for SessionCommands {
    fn name(&self) -> &'static str {
        "sessions-worker"
    }

    fn event_names(&self) -> Vec<&'static str> {
        COMMANDS.to_vec()
    }

    fn effect(&self) -> Effect {
        Effect::External
    }

    async fn handle(
        &self,
        event: &ReceivedEvent,
        _uow: Option<&mut dyn anna_store::UnitOfWork>,
    ) -> Result<(), HandlerError> {
        self.0.handle_command(event).await
    }
}

/// Drops the raw form of the event's messages larger than `max_bytes` (all of them when 0):
/// the message itself is kept, its `raw` is not.
fn keep_raw_within(mut event: DriverEvent, max_bytes: usize) -> DriverEvent {
    match &mut event {
        DriverEvent::Message(message) => message.raw = raw_within(message.raw.take(), max_bytes),
        DriverEvent::History(piece, _) => {
            for history in &mut piece.messages {
                history.message.raw = raw_within(history.message.raw.take(), max_bytes);
            }
        }
        _ => {}
    }
    event
}

/// `raw` if it is at most `max_bytes` long (and `max_bytes` is not 0).
fn raw_within(raw: Option<RawMessage>, max_bytes: usize) -> Option<RawMessage> {
    raw.filter(|raw| max_bytes > 0 && raw.stored_len() <= max_bytes)
}

/// The forwarding score a send command carries, when it is a forward.
fn forwarding_score(payload: &serde_json::Value) -> Option<u32> {
    payload["forwardingScore"].as_u64().and_then(|score| u32::try_from(score).ok())
}

/// The event recording a driver event that changes nothing of its session (a message, a
/// receipt, a change to a message); `None` for the others.
fn plain_event(key: SessionKey, event: &DriverEvent) -> Option<DomainEvent> {
    let now = OffsetDateTime::now_utc();
    Some(match event {
        DriverEvent::Message(message) => reference(key).message_received(message, now),
        DriverEvent::Changed(change) => reference(key).message_changed(change, None),
        DriverEvent::Presence(change) => reference(key).presence_updated(change, now),
        DriverEvent::ChatRead { chat, at } => reference(key).chat_read_on_phone(chat, *at),
        DriverEvent::Receipt { message_id, chat, status, at } => {
            reference(key).message_status(message_id, chat, status.as_str(), *at)
        }
        DriverEvent::SendRejected { message_id, error } => {
            reference(key).message_status(message_id, "", &format!("rejected: {error}"), now)
        }
        _ => return None,
    })
}

fn reference(key: SessionKey) -> SessionRef {
    SessionRef { id: key.session_id, tenant_id: key.tenant_id }
}

fn is_transient_reason(reason: &str) -> bool {
    reason.starts_with("connection_lost") || reason == "restart_required"
}

/// Wall-clock milliseconds, for log lines compared across the processes of one machine.
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

fn time_duration(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// The last digits of a number, enough to tell sessions apart in logs without logging numbers.
fn phone_suffix(phone: &str) -> String {
    let user = phone.split('@').next().unwrap_or_default();
    let digits: Vec<char> = user.chars().collect();
    let tail: String = digits[digits.len().saturating_sub(3)..].iter().collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    /// Media kept in a directory of its own.
    fn test_media(
        store: &Arc<dyn anna_store::Store>,
        sessions: &Arc<Sessions>,
    ) -> Result<Arc<Media>, Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("anna-test-media-{}", Uuid::new_v4()));
        let settings = anna_media::StorageSettings {
            backend: anna_media::MediaBackend::Local { dir },
            url_ttl: Duration::from_secs(60),
            base_url: String::new(),
        };
        let storage = Arc::new(anna_media::MediaStorage::open(&settings, b"test-secret")?);
        Ok(Arc::new(Media::new(store.clone(), storage, sessions.clone())))
    }

    use anna_domain::Session;
    use anna_store::{ConnectOptions, SqlStore, Store};
    use anna_usecases::SessionsConfig;

    use super::*;

    fn partition_of(partitions: u32, id: Uuid) -> u32 {
        anna_usecases::sessions::partition_of(partitions, id)
    }

    /// Two sessions in different partitions; this worker holds only the first one's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fenced_event_does_not_fail_the_other_events_of_its_batch() -> Result<(), Box<dyn std::error::Error>> {
        let sql = SqlStore::connect(&anna_testkit::sqlite::fresh_database_url(), &ConnectOptions::default()).await?;
        sql.migrate().await?;
        let pool = sql.sqlite_pool().ok_or("not SQLite")?;
        let store: Arc<dyn Store> = Arc::new(sql);
        let config = SessionsConfig { partitions: 2, ..SessionsConfig::default() };
        let tenant = Uuid::new_v4();
        let (mut held_id, mut other_id) = (Uuid::new_v4(), Uuid::new_v4());
        while partition_of(2, held_id) == partition_of(2, other_id) {
            (held_id, other_id) = (Uuid::new_v4(), Uuid::new_v4());
        }
        let mut uow = store.begin().await?;
        for id in [held_id, other_id] {
            uow.insert_session(&Session::create(id, tenant, OffsetDateTime::now_utc()).0).await?;
        }
        uow.commit().await?;
        store.ensure_partitions(2).await?;
        let acquired = store.acquire_leases("w1", 2, 2, 60_000).await?;
        let leases = HeldLeases::new("w1", 2, partition_of);
        let held = acquired.iter().find(|a| a.partition == partition_of(2, held_id)).ok_or("no lease")?;
        leases.hold(held.partition, held.token, tokio::time::Instant::now() + Duration::from_secs(60));

        let fenced = store.fenced(leases.clone());
        let stream: Arc<dyn anna_streams::Stream> = Arc::new(anna_streams::EmbeddedStream::new(pool));
        let sessions = Arc::new(Sessions::new(fenced.clone(), stream, config));
        let media = test_media(&fenced, &sessions)?;
        let driver = Arc::new(anna_whatsapp::simulator::Simulator::new(fenced, Default::default()));
        let worker =
            SessionsWorker::new(sessions, media, leases, driver, Default::default(), CancellationToken::new())?;
        let now = OffsetDateTime::now_utc();
        let event = |id| SessionRef { id, tenant_id: tenant }.message_status("m1", "c@s.whatsapp.net", "read", now);
        let (held, other) = tokio::join!(worker.record(event(held_id)), worker.record(event(other_id)));
        assert!(held.is_ok(), "{held:?}");
        assert!(other.as_ref().is_err_and(WorkerError::is_fenced), "{other:?}");
        let recorded = store.outbox_events_for_aggregate(&held_id.to_string()).await?;
        assert!(recorded.iter().any(|r| r.event.event_name == "session.message.status"));
        assert!(store.outbox_events_for_aggregate(&other_id.to_string()).await?.is_empty());
        Ok(())
    }

    /// A command on messages that cannot be carried out is settled with
    /// `session.command.failed` and why, never retried.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn message_commands_that_cannot_be_done_record_why() -> Result<(), Box<dyn std::error::Error>> {
        use anna_store::StoredMessage;
        use anna_streams::consumer::ReceivedEvent;

        let sql = SqlStore::connect(&anna_testkit::sqlite::fresh_database_url(), &ConnectOptions::default()).await?;
        sql.migrate().await?;
        let pool = sql.sqlite_pool().ok_or("not SQLite")?;
        let store: Arc<dyn Store> = Arc::new(sql);
        let (tenant, id) = (Uuid::new_v4(), Uuid::new_v4());
        let now = OffsetDateTime::now_utc();
        let mut uow = store.begin().await?;
        uow.insert_session(&Session::create(id, tenant, now).0).await?;
        let stored = StoredMessage {
            tenant_id: tenant,
            session_id: id,
            chat_jid: "15550100123@s.whatsapp.net".into(),
            message_id: "3EB0MINE".into(),
            from_me: true,
            sender_jid: None,
            timestamp: now,
            kind: "text".into(),
            text: Some("hi".into()),
            status: None,
            status_at: None,
            edited_at: None,
            deleted_at: None,
            context: Default::default(),
            raw: None,
        };
        uow.record_message(&stored, false, None).await?;
        uow.commit().await?;
        store.ensure_partitions(1).await?;
        let acquired = store.acquire_leases("w1", 1, 1, 60_000).await?;
        let leases = HeldLeases::new("w1", 1, partition_of);
        let lease = acquired.first().ok_or("no lease")?;
        leases.hold(lease.partition, lease.token, tokio::time::Instant::now() + Duration::from_secs(60));
        let fenced = store.fenced(leases.clone());
        let stream: Arc<dyn anna_streams::Stream> = Arc::new(anna_streams::EmbeddedStream::new(pool));
        let config = SessionsConfig { partitions: 1, ..SessionsConfig::default() };
        let sessions = Arc::new(Sessions::new(fenced.clone(), stream, config));
        let media = test_media(&fenced, &sessions)?;
        let driver = Arc::new(anna_whatsapp::simulator::Simulator::new(fenced, Default::default()));
        let worker =
            SessionsWorker::new(sessions, media, leases, driver, Default::default(), CancellationToken::new())?;

        let command = |message_id: &str| {
            let command_id = Uuid::new_v4();
            let payload =
                serde_json::json!({"chat": "15550100123@s.whatsapp.net", "messageId": message_id, "content": "new"});
            let mut event = DomainEvent::new(COMMAND_EDIT, id.to_string(), now, payload);
            event.event_id = command_id;
            event.tenant_id = Some(tenant.to_string());
            ReceivedEvent { event, entry_id: "1-0".into(), delivery_count: 1 }
        };
        // Not stored; stored but the session has no connection.
        for (message_id, why) in
            [("3EB0NONE", "message not found: 3EB0NONE"), ("3EB0MINE", "the session is not connected")]
        {
            let received = command(message_id);
            worker.handle_command(&received).await.map_err(|e| format!("{e:?}"))?;
            let failed = store
                .outbox_events_for_aggregate(&id.to_string())
                .await?
                .into_iter()
                .find(|r| r.event.payload["commandId"] == received.event.event_id.to_string())
                .ok_or("no event for the command")?;
            assert_eq!(failed.event.event_name, "session.command.failed");
            assert_eq!(failed.event.payload["command"], COMMAND_EDIT);
            let reason = failed.event.payload["reason"].as_str().unwrap_or_default();
            assert!(reason.starts_with(why), "{reason}");
        }
        Ok(())
    }
}
