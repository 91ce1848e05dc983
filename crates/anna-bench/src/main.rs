//! `anna-bench`: measures and prints figures. Run it in release mode:
//!
//! ```text
//! cargo run --release -p anna-bench -- auth
//! cargo run --release -p anna-bench -- events
//! ```
//!
//! The load generator runs in the same process as the server it measures (on a 2-core machine
//! they share the cores), so compare figures measured in one run, not across machines.

mod auth;
mod events;
mod stats;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.bench {
            Bench::Auth(args) => auth::run(args).await,
            Bench::Events(args) => events::run(args).await,
        }
    })
}
