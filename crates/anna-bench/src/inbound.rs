//! Inbound messages end to end, on the simulator in a real `anna serve`: every session's
//! contacts send a burst at once; measured is the time until every message is in the history
//! (received by the sessions worker, recorded in the outbox, relayed to the stream, applied by
//! the history subscriber), as messages per second, and the process's peak memory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

use crate::process::{Server, mib};

#[derive(Debug, clap::Args)]
pub struct InboundArgs {
    /// Connected sessions.
    #[arg(long, default_value_t = 20)]
    sessions: usize,
    /// Messages each session receives.
    #[arg(long, default_value_t = 5000)]
    messages: u64,
    /// `embedded` and/or `distributed` (Postgres of `ANNA_TEST_DATABASE_URL` when set, else a
    /// throwaway cluster, + Redis).
    #[arg(long, value_delimiter = ',', default_value = "embedded,distributed")]
    shapes: Vec<String>,
    /// The `anna` binary (default: next to this one).
    #[arg(long)]
    anna: Option<PathBuf>,
    /// Print (to stderr) every 2 s where the messages are: the outbox backlog and what the
    /// history subscriber has applied.
    #[arg(long)]
    stages: bool,
    /// anna's `MESSAGES_RAW_MAX_BYTES` (0: no raw messages kept or carried in events).
    #[arg(long, default_value_t = 65536)]
    raw_max_bytes: u64,
}

pub async fn run(args: InboundArgs) -> anyhow::Result<()> {
    let total = args.messages * args.sessions as u64;
    println!(
        "## Inbound messages end to end: {} sessions × {} messages (simulator, `anna serve`)",
        args.sessions, args.messages
    );
    println!();
    println!("| shape | all {total} stored in | messages/s | RSS before | peak RSS (VmHWM) |");
    println!("|---|---:|---:|---:|---:|");
    for shape in &args.shapes {
        let (label, mut vars) = crate::process::serve_shape(shape).await?;
        vars.extend([
            ("SESSIONS_PROVIDER", "simulator".to_owned()),
            ("SESSIONS_MAX_PER_TENANT", "0".to_owned()),
            ("SESSIONS_SIMULATOR_REPLY_MS", "0".to_owned()),
            ("SESSIONS_SIMULATOR_FIRST_QR_MS", "3600000".to_owned()),
            ("SESSIONS_SIMULATOR_HISTORY_MESSAGES", "0".to_owned()),
            ("SESSIONS_SIMULATOR_BURST_MESSAGES", args.messages.to_string()),
            ("SESSIONS_RESUME_STAGGER_MS", "0".to_owned()),
            ("MESSAGES_RAW_MAX_BYTES", args.raw_max_bytes.to_string()),
        ]);
        let server = Server::start(args.anna.clone(), &vars)?;
        let (elapsed, before_kib) = burst(&server, args.sessions, total, args.stages).await?;
        println!(
            "| {label} | {:.1} s | {:.0} | {:.1} MiB | {:.1} MiB |",
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64().max(1e-9),
            mib(before_kib),
            mib(server.peak_rss_kib())
        );
    }
    Ok(())
}

async fn burst(server: &Server, sessions: usize, total: u64, stages: bool) -> anyhow::Result<(Duration, u64)> {
    let client = reqwest::Client::new();
    let base = server.base.clone();
    let email = format!("bench-{}@example.com", uuid::Uuid::new_v4().simple());
    let bearer = format!("Bearer {}", server.active_user(&client, &email, "correct horse battery").await?);
    let mut ids = Vec::new();
    for _ in 0..sessions {
        let started: Value =
            client.post(format!("{base}/sessions")).header("authorization", &bearer).send().await?.json().await?;
        ids.push(started["sessionId"].as_str().ok_or_else(|| anyhow::anyhow!("no session: {started}"))?.to_owned());
    }
    crate::sessions::wait_for(&client, &base, &bearer, sessions, |s| s["qr"].is_string()).await?;
    for id in &ids {
        client.post(format!("{base}/simulator/sessions/{id}/scan")).header("authorization", &bearer).send().await?;
    }
    crate::sessions::wait_for(&client, &base, &bearer, sessions, |s| s["status"] == "connected").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kib = server.rss_kib();
    let started = Instant::now();
    for id in &ids {
        client.post(format!("{base}/simulator/sessions/{id}/burst")).header("authorization", &bearer).send().await?;
    }
    let deadline = started + Duration::from_secs(1800);
    let mut last_stage = Instant::now();
    loop {
        if stages && last_stage.elapsed() >= Duration::from_secs(2) {
            last_stage = Instant::now();
            let metrics = client.get(format!("{base}/metrics")).send().await?.text().await?;
            let wanted = |line: &&str| {
                line.starts_with("outbox_pending")
                    || line.starts_with("outbox_dispatch_total")
                    || (line.starts_with("events_processed_total") && line.contains("session.message.received"))
                    || line.starts_with("session_event_batch_size_count")
                    || line.starts_with("session_event_batch_size_sum")
            };
            eprintln!(
                "[{:>5.1} s] {}",
                started.elapsed().as_secs_f64(),
                metrics.lines().filter(wanted).collect::<Vec<_>>().join(" | ")
            );
        }
        // Every inbound message counts once as unread in its chat.
        let unread: u64 = futures::stream::iter(ids.iter())
            .map(|id| {
                let (client, base, bearer) = (client.clone(), base.clone(), bearer.clone());
                async move {
                    let chats: Value = client
                        .get(format!("{base}/chats?sessionId={id}"))
                        .header("authorization", bearer)
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                    Some(chats["items"].as_array()?.iter().filter_map(|c| c["unreadCount"].as_u64()).sum::<u64>())
                }
            })
            .buffer_unordered(8)
            .filter_map(|n| async move { n })
            .fold(0, |sum, n| async move { sum + n })
            .await;
        if unread >= total {
            return Ok((started.elapsed(), before_kib));
        }
        anyhow::ensure!(Instant::now() < deadline, "only {unread} of {total} stored within 30 minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
