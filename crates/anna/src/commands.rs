//! What each subcommand does. Every long-running command opens the backends and starts its
//! roles through `app`, the one place that wires them.

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app::{self, Roles};
use crate::config::Config;

/// `anna serve`: API and every worker in one process; migrates first.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    run(config, Roles::ALL, "anna", true).await
}

/// `anna api`: the HTTP API alone. The schema must already be migrated (`anna migrate`).
pub async fn api(config: Config) -> anyhow::Result<()> {
    run(config, Roles::API, "anna api", false).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerKind {
    /// Relays `outbox_events` rows to the event stream.
    Outbox,
    /// Runs domain-event subscribers (e-mail delivery).
    Events,
    /// Runs WhatsApp connections and carries out session commands.
    Sessions,
    /// Fans tenant events out to webhook endpoints and delivers them.
    Webhooks,
}

/// `anna worker <kind>`: one kind of worker until SIGINT/SIGTERM; in-flight work finishes first.
pub async fn worker(config: Config, kind: WorkerKind) -> anyhow::Result<()> {
    let (roles, name) = match kind {
        WorkerKind::Outbox => (Roles::OUTBOX, "anna worker outbox"),
        WorkerKind::Events => (Roles::EVENTS, "anna worker events"),
        WorkerKind::Sessions => (Roles::SESSIONS, "anna worker sessions"),
        WorkerKind::Webhooks => (Roles::WEBHOOKS, "anna worker webhooks"),
    };
    run(config, roles, name, false).await
}

async fn run(config: Config, roles: Roles, name: &str, migrate: bool) -> anyhow::Result<()> {
    if roles.api {
        warn_about_development_defaults(&config);
    }
    let shutdown = CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    let backends = app::open_backends(&config).await?;
    if migrate {
        backends.store.migrate().await.context("migrating the database")?;
    } else {
        backends.store.ping().await.context("database unreachable")?;
    }
    backends.stream.ping().await.context("event stream unreachable")?;
    tracing::info!(
        process = name,
        database = backends.store.backend().as_str(),
        streams = backends.stream.backend(),
        "process started"
    );
    let outcome = match app::start(&config, &backends, roles, shutdown.clone()).await {
        Ok(running) => running.wait().await,
        Err(error) => {
            shutdown.cancel();
            Err(error)
        }
    };
    backends.close().await;
    tracing::info!(process = name, "process stopped");
    outcome
}

/// Development defaults are refused in production; elsewhere they are at least loud.
fn warn_about_development_defaults(config: &Config) {
    for weakness in config.weak_settings() {
        tracing::warn!(setting = %weakness, "weak setting in use");
    }
    if config.uses_development_jwt_secret() {
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
