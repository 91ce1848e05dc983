//! Wiring: the only place that picks backends ([`open_backends`]) and the only place that
//! starts a process's work ([`start`]): the HTTP API, the outbox relay loops, the
//! domain-event consumers, the sessions worker, upkeep and the metrics endpoint, all under one
//! [`Supervisor`]. `anna serve`, `anna api`, `anna worker …` and the integration-test harness
//! all go through these two functions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anna_api::AppState;
use anna_api::rate_limit::SharedBudgets;
use anna_api::state::UseCases;
use anna_domain::secrets::Sealer;
use anna_media::MediaStorage;
use anna_store::{ConnectOptions, SqlStore, Store};
use anna_streams::consumer::{EventConsumer, Subscriber};
use anna_streams::relay::OutboxRelay;
use anna_streams::{EmbeddedStream, RedisStream, Stream};
use anna_usecases::{Accounts, Media, Sessions, Webhooks};
use anna_whatsapp::SessionDriver;
use anna_workers::email::{ConsoleEmailSender, EmailSender, ResendEmailSender, SmtpEmailSender};
use anna_workers::fleet::{Fleet, HeldLeases};
use anna_workers::history::MessageHistory;
use anna_workers::partitions::SessionPartitions;
use anna_workers::sessions::SessionsWorker;
use anna_workers::subscribers::{EventStatistics, SendPasswordResetEmail, SendVerificationEmail};
use anna_workers::webhooks::{WebhookDispatcher, WebhookFanout};
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, EmailProvider, SessionsProvider, StreamBackend};
use crate::supervisor::Supervisor;
use crate::telemetry;

/// Everything the configuration selects: the database, the event stream, the e-mail sender
/// (and, with the sessions work, the session driver).
#[derive(Clone)]
pub struct Backends {
    pub store: Arc<dyn Store>,
    pub stream: Arc<dyn Stream>,
    pub email: Arc<dyn EmailSender>,
    /// Where media objects are kept.
    pub media: Arc<MediaStorage>,
}

impl Backends {
    /// The same backends with another e-mail sender (the test harness's recording mailbox).
    pub fn with_email_sender(self, email: Arc<dyn EmailSender>) -> Self {
        Self { email, ..self }
    }

    pub async fn close(&self) {
        self.store.close().await;
    }
}

fn connect_options(config: &Config) -> ConnectOptions {
    ConnectOptions {
        max_connections: config.database.max_connections,
        idle_in_transaction_timeout: config.database.idle_in_transaction_timeout,
        ..ConnectOptions::default()
    }
}

pub(crate) async fn open_sql_store(config: &Config) -> anyhow::Result<SqlStore> {
    open_sql_store_with(config, connect_options(config)).await
}

async fn open_sql_store_with(config: &Config, options: ConnectOptions) -> anyhow::Result<SqlStore> {
    SqlStore::connect(config.database.url.expose_secret(), &options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open DATABASE_URL={}: {e}", config.database.redacted_url()))
}

/// The store alone, for commands that need no stream (`anna migrate`, `anna outbox …`).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(Arc::new(open_sql_store(config).await?))
}

/// Opens the database, the event stream and the e-mail sender the configuration names.
pub async fn open_backends(config: &Config) -> anyhow::Result<Backends> {
    let sql = open_sql_store(config).await?;
    // The embedded streams live in the SQLite file itself.
    let embedded = sql.sqlite_pool().map(|pool| Arc::new(EmbeddedStream::new(pool)) as Arc<dyn Stream>);
    let store: Arc<dyn Store> = Arc::new(sql);
    let stream = match (&config.events.backend, embedded) {
        (StreamBackend::Redis(url), _) => {
            let redis = RedisStream::connect(url.expose_secret())
                .await
                .map_err(|e| anyhow::anyhow!("cannot connect to REDIS_URL: {e}"))?;
            Arc::new(redis) as Arc<dyn Stream>
        }
        (StreamBackend::Embedded, Some(embedded)) => embedded,
        (StreamBackend::Embedded, None) => anyhow::bail!(
            "REDIS_URL is required with a Postgres DATABASE_URL (embedded streams live in a SQLite database)"
        ),
    };
    let media = MediaStorage::open(&config.media, config.accounts.jwt_secret.expose_secret().as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot open the media store: {e}"))?;
    Ok(Backends { store, stream, email: email_sender(config)?, media: Arc::new(media) })
}

fn email_sender(config: &Config) -> anyhow::Result<Arc<dyn EmailSender>> {
    Ok(match &config.email.provider {
        EmailProvider::Console => Arc::new(ConsoleEmailSender::new()),
        EmailProvider::Smtp { url, from } => Arc::new(SmtpEmailSender::new(url.expose_secret(), from)?),
        EmailProvider::Resend { api_key, from, base_url } => {
            Arc::new(ResendEmailSender::new(api_key.expose_secret().to_owned(), from.clone(), base_url)?)
        }
    })
}

/// Every domain-event subscriber anna runs.
fn subscribers(config: &Config, sender: Arc<dyn EmailSender>) -> Vec<Arc<dyn Subscriber>> {
    let sealer = Sealer::from_server_secret(config.accounts.jwt_secret.expose_secret().as_bytes());
    let app_base_url = config.email.app_base_url.clone();
    vec![
        Arc::new(SendVerificationEmail {
            sender: sender.clone(),
            sealer: sealer.clone(),
            app_base_url: app_base_url.clone(),
        }),
        Arc::new(SendPasswordResetEmail { sender, sealer, app_base_url }),
        Arc::new(EventStatistics::all_events()),
        Arc::new(MessageHistory),
    ]
}

/// What one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles {
    pub api: bool,
    pub outbox: bool,
    pub events: bool,
    pub sessions: bool,
    pub webhooks: bool,
}

impl Roles {
    /// `anna serve`: everything.
    pub const ALL: Self = Self { api: true, outbox: true, events: true, sessions: true, webhooks: true };
    pub const NONE: Self = Self { api: false, outbox: false, events: false, sessions: false, webhooks: false };
    pub const API: Self = Self { api: true, ..Self::NONE };
    pub const OUTBOX: Self = Self { outbox: true, ..Self::NONE };
    pub const EVENTS: Self = Self { events: true, ..Self::NONE };
    pub const SESSIONS: Self = Self { sessions: true, ..Self::NONE };
    pub const WEBHOOKS: Self = Self { webhooks: true, ..Self::NONE };
}

/// A started process: where it listens, and its supervised tasks.
pub struct Running {
    /// The API's address, when this process serves it.
    pub addr: Option<SocketAddr>,
    /// The separate metrics port (`METRICS_PORT`), when configured.
    pub metrics_addr: Option<SocketAddr>,
    pub state: Option<AppState>,
    supervisor: Supervisor,
}

impl Running {
    /// Waits until every task has stopped (after `shutdown` is cancelled, or after a task
    /// failed, which cancels it). Returns the first failure.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.supervisor.wait().await
    }
}

/// Starts what `roles` asks for, until `shutdown` is cancelled. Listening sockets are bound
/// before this returns, so a port in use is an error here.
pub async fn start(
    config: &Config,
    backends: &Backends,
    roles: Roles,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let metrics = telemetry::metrics_handle()?;
    crate::metric_families::register_for(roles);
    let mut supervisor = Supervisor::new(shutdown.clone());
    let (mut addr, mut metrics_addr, mut api_state) = (None, None, None);
    if let Some(port) = config.server.metrics_port {
        let listener = bind(config, port, "METRICS_PORT").await?;
        metrics_addr = Some(listener.local_addr()?);
        tracing::info!(addr = %listener.local_addr()?, "metrics listening");
        let router = metrics_router(metrics.clone());
        let (token, limits, drain) = (shutdown.clone(), config.server.limits, config.server.shutdown_timeout);
        supervisor.spawn("metrics endpoint", async move {
            Ok(crate::server::serve(listener, router, limits, token, drain).await?)
        });
    }
    if roles.api {
        let accounts = Arc::new(Accounts::new(backends.store.clone(), &config.accounts)?);
        // API replicas of the production shape share their rate limits through Redis.
        let shared_budgets = match &config.events.backend {
            StreamBackend::Redis(url) => {
                let secret = config.accounts.jwt_secret.expose_secret().as_bytes();
                Some(SharedBudgets::connect(url.expose_secret(), &config.api.rate_limit_key_prefix, secret).await?)
            }
            StreamBackend::Embedded => None,
        };
        let state = AppState::new(
            backends.store.clone(),
            backends.stream.clone(),
            UseCases {
                accounts,
                sessions: sessions_usecases(config, backends),
                webhooks: webhooks_usecases(config, backends),
                media: media_usecases(config, backends),
            },
            config.api.clone(),
            shared_budgets,
            Some(metrics),
            shutdown.clone(),
        );
        let listener = bind(config, config.server.port, "HOST, PORT").await?;
        let bound = listener.local_addr()?;
        supervisor.spawn("upkeep", {
            let state = state.clone();
            async move {
                anna_api::run_maintenance(state, Duration::from_secs(60)).await;
                Ok(())
            }
        });
        supervisor.spawn("realtime feed", {
            let (realtime, stream, token) = (state.realtime.clone(), backends.stream.clone(), shutdown.clone());
            async move {
                realtime.run_feed(stream, token).await;
                Ok(())
            }
        });
        let open_files = crate::server::raise_open_file_limit();
        crate::server::check_connection_limit(config.server.limits.max_connections, open_files);
        supervisor.spawn(
            "HTTP API",
            serve_api(listener, state.clone(), shutdown.clone(), config.server.limits, config.server.shutdown_timeout),
        );
        tracing::info!(addr = %bound, ?metrics_addr, "listening");
        addr = Some(bound);
        api_state = Some(state);
    }
    if roles.outbox {
        start_relays(config, backends, &shutdown, &mut supervisor);
    }
    if roles.events {
        start_consumers(config, backends, &shutdown, &mut supervisor);
        supervisor.spawn("message history upkeep", {
            let (store, upkeep, token) = (backends.store.clone(), config.messages.clone(), shutdown.clone());
            let media = backends.media.clone();
            async move {
                anna_workers::history::run_upkeep(store, media, upkeep, token).await;
                Ok(())
            }
        });
    }
    if roles.webhooks {
        start_webhooks(config, backends, &shutdown, &mut supervisor)?;
    }
    if roles.sessions {
        // Lease renewals get connections of their own: a worker busy with its sessions must
        // never miss a renewal waiting for the pool, or it would fence itself.
        let options = ConnectOptions { max_connections: 2, ..connect_options(config) };
        let leases_store: Arc<dyn Store> = Arc::new(open_sql_store_with(config, options).await?);
        start_sessions_worker(config, backends, leases_store, &shutdown, &mut supervisor)?;
    }
    Ok(Running { addr, metrics_addr, state: api_state, supervisor })
}

async fn bind(config: &Config, port: u16, names: &str) -> anyhow::Result<TcpListener> {
    let host = config.server.host;
    TcpListener::bind((host, port)).await.map_err(|e| anyhow::anyhow!("cannot listen on {host}:{port} ({names}): {e}"))
}

/// Serves until `shutdown`; then stops accepting, finishes in-flight requests (at most
/// `SHUTDOWN_TIMEOUT_MS`) and drains background work (as long again at most).
async fn serve_api(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
    limits: crate::server::ConnectionLimits,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let background = state.background.clone();
    let app = anna_api::router(state);
    let served = crate::server::serve(listener, app, limits, shutdown, drain_timeout).await;
    tracing::info!("HTTP server stopped accepting; draining background work");
    background.close();
    if tokio::time::timeout(drain_timeout, background.wait()).await.is_err() {
        tracing::warn!(timeout_ms = drain_timeout.as_millis() as u64, "background work did not finish in time");
    }
    Ok(served?)
}

/// The outbox relay loops (`OUTBOX_RELAYS` on Postgres, one on SQLite).
fn start_relays(config: &Config, backends: &Backends, shutdown: &CancellationToken, supervisor: &mut Supervisor) {
    // SQLite serialises writers: a second relay would only wait for the first.
    let loops = if backends.store.backend() == anna_store::Backend::Sqlite { 1 } else { config.events.relays };
    for n in 0..loops {
        let relay = OutboxRelay::new(backends.store.clone(), backends.stream.clone(), config.events.relay.clone());
        let token = shutdown.clone();
        supervisor.spawn(format!("outbox relay {n}"), async move {
            relay.run(token).await;
            Ok(())
        });
    }
}

/// The domain-event consumer with every subscriber: `EVENTS_READERS` readers, each its own
/// consumer name.
fn start_consumers(config: &Config, backends: &Backends, shutdown: &CancellationToken, supervisor: &mut Supervisor) {
    let subscribers = subscribers(config, backends.email.clone());
    for n in 0..config.events.readers.max(1) {
        let mut consumer_config = config.events.consumer.clone();
        if n > 0 {
            consumer_config.consumer = format!("{}-{n}", consumer_config.consumer);
        }
        let consumer = subscribers.iter().cloned().fold(
            EventConsumer::new(backends.store.clone(), backends.stream.clone(), consumer_config),
            EventConsumer::subscribe,
        );
        let consumer = Arc::new(consumer);
        let token = shutdown.clone();
        supervisor.spawn(format!("event consumer {n}"), async move {
            consumer.run(token).await;
            Ok(())
        });
    }
}

pub fn webhooks_usecases(config: &Config, backends: &Backends) -> Arc<Webhooks> {
    let secret = config.accounts.jwt_secret.expose_secret().as_bytes();
    Arc::new(Webhooks::new(backends.store.clone(), secret, config.webhooks.webhooks.clone()))
}

/// Webhook delivery: the fan-out of tenant events into delivery rows (a consumer group of its
/// own on the domain-event stream) and the dispatcher, which the fan-out wakes when it
/// committed new deliveries.
fn start_webhooks(
    config: &Config,
    backends: &Backends,
    shutdown: &CancellationToken,
    supervisor: &mut Supervisor,
) -> anyhow::Result<()> {
    let settings = &config.webhooks;
    let wake = Arc::new(tokio::sync::Notify::new());
    let fanout = Arc::new(WebhookFanout { deadline: settings.webhooks.deadline, wake: wake.clone() });
    let consumer = Arc::new(
        EventConsumer::new(backends.store.clone(), backends.stream.clone(), settings.consumer.clone())
            .subscribe(fanout),
    );
    let token = shutdown.clone();
    supervisor.spawn("webhook fan-out", async move {
        consumer.run(token).await;
        Ok(())
    });
    let secret = config.accounts.jwt_secret.expose_secret().as_bytes();
    let dispatcher = WebhookDispatcher::new(backends.store.clone(), secret, settings.dispatcher.clone(), wake)
        .map_err(|e| anyhow::anyhow!("cannot build the webhook HTTP client: {e}"))?;
    let token = shutdown.clone();
    supervisor.spawn("webhook dispatcher", async move {
        dispatcher.run(token).await;
        Ok(())
    });
    Ok(())
}

pub fn sessions_usecases(config: &Config, backends: &Backends) -> Arc<Sessions> {
    let settings = anna_usecases::SessionsConfig {
        default_retention_days: config.messages.retention_days,
        ..config.sessions.sessions.clone()
    };
    Arc::new(Sessions::new(backends.store.clone(), backends.stream.clone(), settings))
}

pub fn media_usecases(config: &Config, backends: &Backends) -> Arc<Media> {
    Arc::new(Media::new(backends.store.clone(), backends.media.clone(), sessions_usecases(config, backends)))
}

/// The session driver `SESSIONS_PROVIDER` names, keeping device keys in `store`.
fn session_driver(config: &Config, store: Arc<dyn Store>) -> Arc<dyn SessionDriver> {
    let store: Arc<dyn anna_store::DeviceKeyStore> = store;
    match config.sessions.provider {
        SessionsProvider::WhatsApp => {
            Arc::new(anna_whatsapp::whatsapp::WhatsAppDriver::new(store, config.sessions.whatsapp.clone()))
        }
        SessionsProvider::Simulator => {
            tracing::warn!(
                "SESSIONS_PROVIDER=simulator: sessions run on a simulated WhatsApp network, not the real one"
            );
            Arc::new(anna_whatsapp::simulator::Simulator::new(store, config.sessions.simulator.clone()))
        }
    }
}

/// The sessions worker as a member of the fleet: it holds leases on partitions of the
/// sessions, consumes only their command streams, and writes session state and device keys
/// through a store fenced by those leases.
fn start_sessions_worker(
    config: &Config,
    backends: &Backends,
    leases_store: Arc<dyn Store>,
    shutdown: &CancellationToken,
    supervisor: &mut Supervisor,
) -> anyhow::Result<()> {
    let settings = &config.sessions;
    let leases =
        HeldLeases::new(&settings.fleet.worker_id, settings.sessions.partitions, anna_usecases::sessions::partition_of);
    let fenced = backends.store.fenced(leases.clone());
    let worker_token = CancellationToken::new();
    let sessions = Arc::new(Sessions::new(fenced.clone(), backends.stream.clone(), settings.sessions.clone()));
    let media = Arc::new(Media::new(fenced.clone(), backends.media.clone(), sessions.clone()));
    let worker = SessionsWorker::new(
        sessions,
        media,
        leases.clone(),
        session_driver(config, fenced),
        settings.worker.clone(),
        worker_token.clone(),
    )?;
    let partitions = Arc::new(SessionPartitions::new(
        worker.clone(),
        backends.store.clone(),
        backends.stream.clone(),
        settings.consumer.clone(),
        settings.sessions.clone(),
    ));
    let fleet = Fleet::new(leases_store.clone(), partitions, leases, settings.fleet.clone());
    let shutdown = shutdown.clone();
    supervisor.spawn("sessions worker", async move {
        tracing::info!(driver = worker.driver_name(), "sessions worker started");
        let runner = tokio::spawn(worker.clone().run());
        // On shutdown the fleet stops its partitions (commands in flight finish, connections
        // close with their status kept for the next owner) and gives the leases up.
        if fleet.prepare(&shutdown).await {
            fleet.run(shutdown.clone()).await;
        }
        worker_token.cancel();
        worker.close_all().await;
        let _ = runner.await;
        leases_store.close().await;
        tracing::info!("sessions worker stopped");
        Ok(())
    });
    Ok(())
}

/// The `METRICS_PORT` listener: `/metrics`, and `/healthz` so a supervisor can check a worker
/// process, which serves nothing else.
pub fn metrics_router(handle: metrics_exporter_prometheus::PrometheusHandle) -> axum::Router {
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || std::future::ready(anna_api::health::render_metrics(Some(&handle)))),
        )
        .route(
            "/healthz",
            axum::routing::get(|| {
                std::future::ready(([(axum::http::header::CONTENT_TYPE, "application/json")], r#"{"status":"ok"}"#))
            }),
        )
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => tracing::info!("SIGINT received: shutting down"),
                _ = term.recv() => tracing::info!("SIGTERM received: shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        token.cancel();
    });
}
