//! What each subcommand does.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app::{self, Backends};
use crate::config::Config;

/// `anna serve`: API, outbox relay and event consumer in one process; migrates first.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    warn_about_development_defaults(&config);
    let shutdown = CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    let backends = app::open_backends(&config).await?;
    backends.store.migrate().await.context("migrating the database")?;
    tracing::info!(database = backends.store.backend().as_str(), streams = backends.stream.backend(), "backends ready");
    let sender = app::email_sender(&config)?;
    let running = app::start_api(&config, backends.store.clone(), shutdown.clone()).await?;
    let relay = app::start_relay(&config, &backends, shutdown.clone());
    let consumer = app::start_consumer(&config, &backends, sender, shutdown.clone());
    let served = running.task.await.context("API task panicked")?;
    // The API stopped because shutdown was requested (or it failed): stop the workers too.
    shutdown.cancel();
    let _ = relay.await;
    let _ = consumer.await;
    backends.store.close().await;
    tracing::info!("anna stopped");
    served
}

/// `anna api`: the HTTP API alone. The schema must already be migrated (`anna migrate`).
pub async fn api(config: Config) -> anyhow::Result<()> {
    warn_about_development_defaults(&config);
    let shutdown = CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    let store = app::open_store(&config).await?;
    store.ping().await.context("database unreachable")?;
    let running = app::start_api(&config, store.clone(), shutdown).await?;
    let served = running.task.await.context("API task panicked")?;
    store.close().await;
    tracing::info!("anna api stopped");
    served
}

/// Development defaults are refused in production; elsewhere they are at least loud.
fn warn_about_development_defaults(config: &Config) {
    if config.api.jwt_secret == crate::config::DEFAULT_JWT_SECRET {
        tracing::warn!(
            "AUTH_JWT_SECRET is the public development default: anyone can forge access tokens. \
             Set a random secret of 32 bytes or more (and ANNA_ENV=production outside development)"
        );
    }
}

/// `anna migrate`: creates or upgrades every table, idempotently.
pub async fn migrate(config: Config) -> anyhow::Result<()> {
    let store = app::open_store(&config).await?;
    store.migrate().await.context("migrating the database")?;
    tracing::info!(backend = store.backend().as_str(), "migrations applied");
    store.close().await;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerKind {
    /// Relays `outbox_events` rows to the event stream.
    Outbox,
    /// Runs domain-event subscribers (e-mail delivery).
    Events,
    /// Runs WhatsApp connections (not built yet: starts, checks the database, waits).
    Sessions,
}

impl WorkerKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Outbox => "outbox",
            Self::Events => "events",
            Self::Sessions => "sessions",
        }
    }
}

/// `anna worker <kind>`: one worker loop until SIGINT/SIGTERM; in-flight work finishes first.
pub async fn worker(config: Config, kind: WorkerKind) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    let backends = app::open_backends(&config).await?;
    backends.store.ping().await.context("database unreachable")?;
    backends.stream.ping().await.context("event stream unreachable")?;
    let metrics_server = match config.metrics_port {
        Some(port) => {
            let handle = crate::telemetry::metrics_handle()?;
            let listener = tokio::net::TcpListener::bind((config.host, port))
                .await
                .with_context(|| format!("cannot listen on {}:{port} (METRICS_PORT)", config.host))?;
            let router = app::metrics_router(handle);
            let token = shutdown.clone();
            Some(tokio::spawn(async move {
                axum::serve(listener, router).with_graceful_shutdown(token.cancelled_owned()).await
            }))
        }
        None => None,
    };
    tracing::info!(
        worker = kind.as_str(),
        database = backends.store.backend().as_str(),
        streams = backends.stream.backend(),
        "worker started"
    );
    match kind {
        WorkerKind::Outbox => {
            let _ = app::start_relay(&config, &backends, shutdown.clone()).await;
        }
        WorkerKind::Events => {
            let sender = app::email_sender(&config)?;
            let _ = app::start_consumer(&config, &backends, sender, shutdown.clone()).await;
        }
        WorkerKind::Sessions => wait_checking_database(&backends, &shutdown).await,
    }
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    backends.store.close().await;
    tracing::info!(worker = kind.as_str(), "worker stopped");
    Ok(())
}

async fn wait_checking_database(backends: &Backends, shutdown: &CancellationToken) {
    let mut health = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = health.tick() => {
                if let Err(error) = backends.store.ping().await {
                    tracing::warn!(%error, "database unreachable");
                }
            }
        }
    }
}
