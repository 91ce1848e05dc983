//! Wiring: builds the store, the event stream, the e-mail sender, the HTTP application and the
//! event workers from the configuration, and runs them until shutdown. The only place that
//! picks backends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anna_api::AppState;
use anna_domain::secrets::Sealer;
use anna_store::{ConnectOptions, SqlStore, Store};
use anna_streams::consumer::{EventConsumer, Subscriber};
use anna_streams::relay::OutboxRelay;
use anna_streams::{EmbeddedStream, RedisStream, Stream};
use anna_workers::email::{ConsoleEmailSender, EmailSender, ResendEmailSender, SmtpEmailSender};
use anna_workers::subscribers::{EventStatistics, SendPasswordResetEmail, SendVerificationEmail};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, EmailProvider, StreamBackend};
use crate::telemetry;

fn connect_options(config: &Config) -> ConnectOptions {
    ConnectOptions { max_connections: config.database_max_connections, ..ConnectOptions::default() }
}

fn database_error(config: &Config, error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot open DATABASE_URL={}: {error}", anna_store::redact_url(&config.database_url))
}

/// The store alone (for `anna migrate`).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    anna_store::connect(&config.database_url, &connect_options(config)).await.map_err(|e| database_error(config, e))
}

/// The database and the event stream the configuration names.
#[derive(Clone)]
pub struct Backends {
    pub store: Arc<dyn Store>,
    pub stream: Arc<dyn Stream>,
}

pub async fn open_backends(config: &Config) -> anyhow::Result<Backends> {
    let options = connect_options(config);
    let sql = SqlStore::connect(&config.database_url, &options).await.map_err(|e| database_error(config, e))?;
    // The embedded streams live in the SQLite file itself.
    let embedded = sql.sqlite_pool().map(|pool| Arc::new(EmbeddedStream::new(pool)) as Arc<dyn Stream>);
    let store: Arc<dyn Store> = Arc::new(sql);
    let stream = match (&config.events.backend, embedded) {
        (StreamBackend::Redis(url), _) => {
            let redis =
                RedisStream::connect(url).await.map_err(|e| anyhow::anyhow!("cannot connect to REDIS_URL: {e}"))?;
            Arc::new(redis) as Arc<dyn Stream>
        }
        (StreamBackend::Embedded, Some(embedded)) => embedded,
        (StreamBackend::Embedded, None) => anyhow::bail!(
            "REDIS_URL is required with a Postgres DATABASE_URL (embedded streams live in a SQLite database)"
        ),
    };
    Ok(Backends { store, stream })
}

pub fn email_sender(config: &Config) -> anyhow::Result<Arc<dyn EmailSender>> {
    Ok(match &config.email {
        EmailProvider::Console => Arc::new(ConsoleEmailSender::new()),
        EmailProvider::Smtp { url, from } => Arc::new(SmtpEmailSender::new(url, from)?),
        EmailProvider::Resend { api_key, from, base_url } => {
            Arc::new(ResendEmailSender::new(api_key.clone(), from.clone(), base_url)?)
        }
    })
}

/// Every domain-event subscriber anna runs.
pub fn subscribers(config: &Config, sender: Arc<dyn EmailSender>) -> Vec<Arc<dyn Subscriber>> {
    let sealer = Sealer::from_server_secret(config.api.jwt_secret.as_bytes());
    vec![
        Arc::new(SendVerificationEmail {
            sender: sender.clone(),
            sealer: sealer.clone(),
            app_base_url: config.api.app_base_url.clone(),
        }),
        Arc::new(SendPasswordResetEmail { sender, sealer, app_base_url: config.api.app_base_url.clone() }),
        Arc::new(EventStatistics::all_events()),
    ]
}

/// Waits for every task.
fn join_all(tasks: Vec<JoinHandle<()>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        for task in tasks {
            let _ = task.await;
        }
    })
}

/// The outbox relay loops (`OUTBOX_RELAYS` on Postgres, one on SQLite), until `shutdown`.
pub fn start_relay(config: &Config, backends: &Backends, shutdown: CancellationToken) -> JoinHandle<()> {
    // SQLite serialises writers: a second relay would only wait for the first.
    let loops = if backends.store.backend() == anna_store::Backend::Sqlite { 1 } else { config.events.relays };
    let tasks = (0..loops)
        .map(|_| {
            let relay = OutboxRelay::new(backends.store.clone(), backends.stream.clone(), config.events.relay.clone());
            let token = shutdown.clone();
            tokio::spawn(async move { relay.run(token).await })
        })
        .collect();
    join_all(tasks)
}

/// The domain-event consumer with every subscriber (`EVENTS_READERS` readers, each its own
/// consumer name), until `shutdown`.
pub fn start_consumer(
    config: &Config,
    backends: &Backends,
    sender: Arc<dyn EmailSender>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let subscribers = subscribers(config, sender);
    let readers = config.events.readers.max(1);
    let tasks = (0..readers)
        .map(|n| {
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
            tokio::spawn(async move { consumer.run(token).await })
        })
        .collect();
    join_all(tasks)
}

/// A running API: its address, and a handle that ends when it has shut down.
pub struct RunningApi {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub state: AppState,
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Binds the API (and the metrics port, if configured) and serves until `shutdown` is
/// cancelled; then stops accepting, finishes in-flight requests, drains background work.
pub async fn start_api(
    config: &Config,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningApi> {
    let metrics = telemetry::metrics_handle()?;
    let state = AppState::new(store, config.api.clone(), Some(metrics.clone()), shutdown.clone())?;
    let listener = TcpListener::bind((config.host, config.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{} (HOST, PORT): {e}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    let metrics_listener = match config.metrics_port {
        Some(port) => Some(
            TcpListener::bind((config.host, port))
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}:{port} (METRICS_PORT): {e}", config.host))?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let app = anna_api::router(state.clone());
    let maintenance = tokio::spawn(anna_api::run_maintenance(state.clone(), Duration::from_secs(60)));
    let drain_timeout = config.shutdown_timeout;
    let background = state.background.clone();
    let task = tokio::spawn(async move {
        let metrics_server = metrics_listener.map(|listener| {
            let router = metrics_router(metrics);
            let token = shutdown.clone();
            tokio::spawn(
                async move { axum::serve(listener, router).with_graceful_shutdown(token.cancelled_owned()).await },
            )
        });
        let serve = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let served = serve.await;
        tracing::info!("HTTP server stopped accepting; draining background work");
        background.close();
        if tokio::time::timeout(drain_timeout, background.wait()).await.is_err() {
            tracing::warn!(timeout_ms = drain_timeout.as_millis() as u64, "background work did not finish in time");
        }
        maintenance.abort();
        if let Some(server) = metrics_server {
            let _ = server.await;
        }
        served.map_err(anyhow::Error::from)
    });
    tracing::info!(%addr, metrics_addr = ?metrics_addr, "listening");
    Ok(RunningApi { addr, metrics_addr, state, task })
}

pub fn metrics_router(handle: metrics_exporter_prometheus::PrometheusHandle) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(anna_api::health::render_metrics(Some(&handle)))),
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
