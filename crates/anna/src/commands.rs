//! What each subcommand does.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app;
use crate::config::Config;

/// `anna serve`: API and workers in one process; migrates the database first.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    let store = app::open_store(&config).await?;
    store.migrate().await.context("migrating the database")?;
    tracing::info!(backend = store.backend().as_str(), "database ready");
    let email = app::email_sender(&config)?;
    let running = app::start_api(&config, store.clone(), email, shutdown.clone()).await?;
    let served = running.task.await.context("API task panicked")?;
    store.close().await;
    tracing::info!("anna stopped");
    served
}

/// `anna api`: the HTTP API alone. The schema must already be migrated (`anna migrate`).
pub async fn api(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    let store = app::open_store(&config).await?;
    store.ping().await.context("database unreachable")?;
    let email = app::email_sender(&config)?;
    let running = app::start_api(&config, store.clone(), email, shutdown).await?;
    let served = running.task.await.context("API task panicked")?;
    store.close().await;
    tracing::info!("anna api stopped");
    served
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
    /// Runs domain-event subscribers.
    Events,
    /// Runs WhatsApp connections.
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

/// `anna worker <kind>`: connects to the database, keeps checking that it answers, and stops
/// cleanly on SIGINT/SIGTERM. The loops themselves arrive with the events and sessions work.
pub async fn worker(config: Config, kind: WorkerKind) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    let store = app::open_store(&config).await?;
    store.ping().await.context("database unreachable")?;
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
    tracing::info!(worker = kind.as_str(), backend = store.backend().as_str(), "worker started");
    let mut health = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = health.tick() => {
                if let Err(error) = store.ping().await {
                    tracing::warn!(worker = kind.as_str(), %error, "database unreachable");
                }
            }
        }
    }
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    store.close().await;
    tracing::info!(worker = kind.as_str(), "worker stopped");
    Ok(())
}
