//! `anna-bench`: measures and prints figures. Run it in release mode:
//!
//! ```text
//! cargo run --release -p anna-bench -- auth
//! cargo run --release -p anna-bench -- events
//! cargo run --release -p anna-bench -- backlog
//! cargo run --release -p anna-bench -- fleet
//! cargo run --release -p anna-bench -- webhooks
//! ```
//!
//! The load generator runs in the same process as the server it measures (on a 2-core machine
//! they share the cores), so compare figures measured in one run, not across machines.

mod auth;
mod backlog;
mod events;
mod fleet;
mod history;
mod history_sync;
mod inbound;
mod process;
mod sessions;
mod stats;
mod webhooks;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "anna-bench", about = "Benchmarks for anna; prints figures")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// `GET /users/me` and `POST /auth/login` throughput and latency on SQLite and Postgres.
    Auth(auth::AuthArgs),
    /// Domain events end to end (commit → relay → stream → subscriber applied), both shapes.
    Events(events::EventsArgs),
    /// Backlogs after an outage: outbox rows drained by the relays, stream entries drained by
    /// the consumer group.
    Backlog(backlog::BacklogArgs),
    /// Resident memory of `anna serve` under a sustained login flood (needs the release
    /// `anna` binary next to this one).
    LoginMemory(process::LoginMemoryArgs),
    /// `GET /users/me` under wrk against `pgbench -S` on the same database (needs wrk and
    /// pgbench).
    UsersMe(process::UsersMeArgs),
    /// WhatsApp sessions on the simulator: RSS per connected session, send throughput under
    /// wrk, send → WebSocket latency (needs the release `anna` binary next to this one).
    Sessions(sessions::SessionsArgs),
    /// The sessions fleet under repeated SIGKILLs: failover time, reconnect times and
    /// throughput, rejoin time (needs the release `anna` binary next to this one).
    Fleet(fleet::FleetArgs),
    /// Webhook delivery to a fast local receiver: a backlog after an outage, throughput, and
    /// commit → receiver latency at a steady rate, both shapes.
    Webhooks(webhooks::WebhooksArgs),
    /// Message history at scale: storing a million messages, then pages of a chat (newest and
    /// deep) and the chat list, both shapes.
    History(history::HistoryArgs),
    /// A phone's history sync (100,000 messages by default) on the simulator, in a real
    /// `anna serve`: time, rows per second, peak RSS, both shapes.
    HistorySync(history_sync::HistorySyncArgs),
    /// Inbound messages end to end: simulated contacts' bursts until every message is in the
    /// history, both shapes.
    Inbound(inbound::InboundArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.bench {
            Bench::Auth(args) => auth::run(args).await,
            Bench::Events(args) => events::run(args).await,
            Bench::Backlog(args) => backlog::run(args).await,
            Bench::LoginMemory(args) => process::login_memory(args).await,
            Bench::UsersMe(args) => process::users_me(args).await,
            Bench::Sessions(args) => sessions::run(args).await,
            Bench::Fleet(args) => fleet::run(args).await,
            Bench::Webhooks(args) => webhooks::run(args).await,
            Bench::History(args) => history::run(args).await,
            Bench::HistorySync(args) => history_sync::run(args).await,
            Bench::Inbound(args) => inbound::run(args).await,
        }
    })
}
