//! A phone's history sync on the simulator, in a real `anna serve`: after the scan, the
//! simulated phone sends `--messages` messages over `--chats` chats; measured are the time
//! until every message is stored, the rows stored per second, and the process's resident
//! memory before, at its peak and after (the history must not sit in memory whole).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::{Server, mib};

#[derive(Debug, clap::Args)]
pub struct HistorySyncArgs {
    /// Messages in the phone's history.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Chats they are spread over.
    #[arg(long, default_value_t = 200)]
    chats: u32,
    /// `embedded` (SQLite file, embedded streams) and/or `distributed` (Postgres + Redis; the
    /// database of `ANNA_TEST_DATABASE_URL` when set, else a throwaway cluster).
    #[arg(long, value_delimiter = ',', default_value = "embedded,distributed")]
    shapes: Vec<String>,
    /// The `anna` binary (default: next to this one).
    #[arg(long)]
    anna: Option<PathBuf>,
}

pub async fn run(args: HistorySyncArgs) -> anyhow::Result<()> {
    println!("## History sync of {} messages over {} chats (simulator, `anna serve`)", args.messages, args.chats);
    println!();
    println!("| shape | stored in | rows/s | RSS before scan | peak RSS (VmHWM) | RSS after |");
    println!("|---|---:|---:|---:|---:|---:|");
    for shape in &args.shapes {
        let (label, mut vars) = crate::process::serve_shape(shape).await?;
        vars.extend([
            ("SESSIONS_PROVIDER", "simulator".to_owned()),
            ("SESSIONS_SIMULATOR_REPLY_MS", "0".to_owned()),
            ("SESSIONS_SIMULATOR_FIRST_QR_MS", "3600000".to_owned()),
            ("SESSIONS_SIMULATOR_HISTORY_MESSAGES", args.messages.to_string()),
            ("SESSIONS_SIMULATOR_HISTORY_CHATS", args.chats.to_string()),
        ]);
        let server = Server::start(args.anna.clone(), &vars)?;
        let row = sync_once(&server, args.messages).await?;
        println!(
            "| {label} | {:.1} s | {:.0} | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            row.elapsed.as_secs_f64(),
            args.messages as f64 / row.elapsed.as_secs_f64().max(1e-9),
            mib(row.before_kib),
            mib(row.peak_kib),
            mib(row.after_kib)
        );
    }
    Ok(())
}

struct Measured {
    elapsed: Duration,
    before_kib: u64,
    peak_kib: u64,
    after_kib: u64,
}

async fn sync_once(server: &Server, messages: u64) -> anyhow::Result<Measured> {
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let email = format!("bench-{}@example.com", uuid::Uuid::new_v4().simple());
    let bearer = format!("Bearer {}", server.active_user(&client, &email, "correct horse battery").await?);
    let started: Value =
        client.post(format!("{base}/sessions")).header("authorization", &bearer).send().await?.json().await?;
    let id = started["sessionId"].as_str().ok_or_else(|| anyhow::anyhow!("no session: {started}"))?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let session: Value =
            client.get(format!("{base}/sessions/{id}")).header("authorization", &bearer).send().await?.json().await?;
        if session["qr"].is_string() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no QR code for {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kib = server.rss_kib();
    client.post(format!("{base}/simulator/sessions/{id}/scan")).header("authorization", &bearer).send().await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(1800);
    loop {
        if stored(&client, &base).await? >= messages {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the history was not stored within 30 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(Measured { elapsed, before_kib, peak_kib: server.peak_rss_kib(), after_kib: server.rss_kib() })
}

/// History messages stored so far, by anna's own counter.
async fn stored(client: &reqwest::Client, base: &str) -> anyhow::Result<u64> {
    let metrics = client.get(format!("{base}/metrics")).send().await?.text().await?;
    Ok(metrics
        .lines()
        .filter(|line| line.starts_with("session_history_messages_total"))
        .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}
