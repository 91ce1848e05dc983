//! `anna`: a self-hostable, multi-tenant WhatsApp sessions platform.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use anna::commands::{self, WorkerKind};
use anna::config::Config;
use anna::operator;

/// Configuration comes from environment variables (and a `.env` file in the working
/// directory); see the README for the full table.
#[derive(Debug, Parser)]
#[command(name = "anna", version = anna::VERSION, about = "Self-hostable, multi-tenant WhatsApp sessions platform")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// API, workers and demo UI in one process (the default); migrates the database first.
    Serve,
    /// The HTTP API alone (production shape; run `anna migrate` first).
    Api,
    /// One worker process.
    Worker {
        #[arg(value_enum)]
        kind: WorkerKind,
    },
    /// Create or upgrade every table (SQLite or Postgres, from DATABASE_URL); idempotent.
    Migrate,
    /// A consistent copy of the embedded SQLite database, taken while anna runs (Postgres:
    /// use pg_dump, see docs/operations.md). Restore: stop anna, put the copy in the
    /// database's place, start anna.
    Backup {
        /// The file to write; it must not exist yet.
        file: std::path::PathBuf,
    },
    /// Inspect the transactional outbox.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Inspect and act on dead-lettered events (the DLQ stream and the `dead_letters` table).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Inspect the sessions fleet: workers, their partitions, sessions and lease ages.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Act on simulated sessions (`SESSIONS_PROVIDER=simulator`).
    Simulator {
        #[command(subcommand)]
        command: SimulatorCommand,
    },
}

#[derive(Debug, Subcommand)]
enum FleetCommand {
    /// Every sessions worker with the partitions it holds, its connected and active sessions
    /// and the age of its heartbeat and leases; then the partitions no live worker holds.
    Status,
}

#[derive(Debug, Subcommand)]
enum SimulatorCommand {
    /// Scan a session's QR code with the simulated phone.
    Scan {
        /// The session id.
        session_id: uuid::Uuid,
    },
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// Pending, processing and failed rows, the age of the oldest unpublished one, the drain
    /// rate and the time left at that rate.
    Status {
        /// Print a line every few seconds until the backlog is gone (or Ctrl-C).
        #[arg(long)]
        watch: bool,
        /// Seconds between lines with --watch.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
        every: u64,
    },
    /// Put every `failed` row back in line, attempts reset (once the cause is fixed).
    RetryFailed,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Every dead letter: id, event, attempts, failing subscriber, error.
    List,
    /// Re-append dead letters to the event stream (same event id) and remove them from the DLQ.
    Replay {
        /// A dead-letter id from `anna dlq list`.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete every dead letter.
    Purge,
}

impl Command {
    /// Suffix of the trace service name (`anna-api`, `anna-outbox`, …), as the predecessor had.
    fn process_name(&self) -> &'static str {
        match self {
            Self::Serve => "serve",
            Self::Api => "api",
            Self::Worker { kind: WorkerKind::Outbox } => "outbox",
            Self::Worker { kind: WorkerKind::Events } => "events",
            Self::Worker { kind: WorkerKind::Sessions } => "sessions",
            Self::Worker { kind: WorkerKind::Webhooks } => "webhooks",
            Self::Migrate => "migrate",
            Self::Backup { .. } => "operator",
            Self::Outbox { .. } | Self::Dlq { .. } | Self::Fleet { .. } | Self::Simulator { .. } => "operator",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A missing .env is normal; a malformed one is not.
    if let Err(error) = dotenvy::dotenv()
        && !error.not_found()
    {
        eprintln!("anna: cannot read .env: {error}");
        return ExitCode::from(2);
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("anna: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let command = cli.command.unwrap_or(Command::Serve);
    let telemetry = match anna::telemetry::init(&config, command.process_name()) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("anna: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("anna: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Serve => commands::serve(config).await,
            Command::Api => commands::api(config).await,
            Command::Worker { kind } => commands::worker(config, kind).await,
            Command::Migrate => commands::migrate(config).await,
            Command::Backup { file } => operator::backup(config, &file).await,
            Command::Outbox { command: OutboxCommand::Status { watch, every } } => {
                operator::outbox_status(config, watch, std::time::Duration::from_secs(every)).await
            }
            Command::Outbox { command: OutboxCommand::RetryFailed } => operator::outbox_retry_failed(config).await,
            Command::Dlq { command: DlqCommand::List } => operator::dlq_list(config).await,
            Command::Dlq { command: DlqCommand::Replay { id, all: _ } } => operator::dlq_replay(config, id).await,
            Command::Dlq { command: DlqCommand::Purge } => operator::dlq_purge(config).await,
            Command::Fleet { command: FleetCommand::Status } => operator::fleet_status(config).await,
            Command::Simulator { command: SimulatorCommand::Scan { session_id } } => {
                operator::simulator_scan(config, session_id).await
            }
        }
    });
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "anna failed");
            eprintln!("anna: {error:#}");
            ExitCode::FAILURE
        }
    }
}
