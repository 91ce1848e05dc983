//! WhatsApp sessions on the simulator, in a real `anna serve`: resident memory per connected
//! session, `POST /sessions/{id}/messages` throughput under wrk, and the time from a send to
//! the tenant's WebSocket seeing `session.message.sent` at a fixed rate.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::process::{Server, mib};
use crate::stats::Summary;

#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    /// Simulated sessions to create and connect.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Seconds of the wrk send load.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Sends per second of the send → WebSocket latency run.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 20)]
    latency_seconds: u64,
    /// anna's database pool (`DATABASE_MAX_CONNECTIONS`).
    #[arg(long, default_value_t = 10)]
    pool: u32,
    /// After the latency run, print (to stderr) anna's own figures of its stages: command
    /// latency to the worker, event batch sizes, outbox dispatch times.
    #[arg(long)]
    server_metrics: bool,
    /// Run on SQLite with embedded streams instead of Postgres + Redis.
    #[arg(long)]
    sqlite: bool,
    /// The `anna` binary (default: next to this one).
    #[arg(long)]
    anna: Option<PathBuf>,
}

pub async fn run(args: SessionsArgs) -> anyhow::Result<()> {
    let mut vars = vec![
        ("SESSIONS_PROVIDER", "simulator".to_owned()),
        ("SESSIONS_MAX_PER_TENANT", "0".to_owned()),
        ("SESSIONS_SEND_PER_MINUTE", "100000000".to_owned()),
        ("SESSIONS_SEND_BURST", "100000000".to_owned()),
        ("SESSIONS_SIMULATOR_REPLY_MS", "0".to_owned()),
        ("SESSIONS_SIMULATOR_FIRST_QR_MS", "3600000".to_owned()),
        ("SESSIONS_RESUME_STAGGER_MS", "0".to_owned()),
        ("WS_CLIENT_BUFFER", "65536".to_owned()),
        ("DATABASE_MAX_CONNECTIONS", args.pool.to_string()),
    ];
    let shape = if args.sqlite {
        vars.push(("DATABASE_URL", anna_testkit::sqlite::fresh_database_url()));
        "SQLite + embedded streams"
    } else {
        vars.push(("DATABASE_URL", anna_testkit::pg::fresh_database_url().await));
        vars.push(("REDIS_URL", anna_testkit::redis::shared_url()));
        "Postgres + Redis"
    };
    let server = Server::start(args.anna.clone(), &vars)?;
    let base = server.base.clone();
    let client = reqwest::Client::new();
    let email = format!("bench-{}@example.com", uuid::Uuid::new_v4().simple());
    let token = server.active_user(&client, &email, "correct horse battery").await?;
    let bearer = format!("Bearer {token}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_kib = server.rss_kib();

    // Create and connect the sessions, 16 requests at a time.
    let started = Instant::now();
    let ids = create_sessions(&client, &base, &bearer, args.sessions).await?;
    wait_for(&client, &base, &bearer, args.sessions, |s| s["qr"].is_string()).await?;
    futures::stream::iter(ids.iter())
        .map(|id| {
            let (client, base, bearer) = (client.clone(), base.clone(), bearer.clone());
            async move {
                client.post(format!("{base}/simulator/sessions/{id}/scan")).header("authorization", bearer).send().await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    wait_for(&client, &base, &bearer, args.sessions, |s| s["status"] == "connected").await?;
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let connected_kib = server.rss_kib();

    println!("## Sessions on the simulator ({shape}), {} sessions", args.sessions);
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| created, paired and connected in | {:.1} s |", connect_time.as_secs_f64());
    println!("| RSS idle (one tenant, no session) | {:.1} MiB |", mib(idle_kib));
    println!("| RSS with every session connected | {:.1} MiB |", mib(connected_kib));
    println!(
        "| **RSS per connected session** | **{:.1} KiB** |",
        connected_kib.saturating_sub(idle_kib) as f64 / args.sessions.max(1) as f64
    );

    let latency = send_to_websocket(&client, &base, &token, &ids, args.rate, args.latency_seconds).await?;
    if args.server_metrics {
        let metrics = client.get(format!("{base}/metrics")).send().await?.text().await?;
        let stage_metrics =
            ["event_end_to_end_latency_seconds", "session_event_batch_size", "outbox_dispatch_duration_ms"];
        for line in metrics.lines().filter(|l| stage_metrics.iter().any(|m| l.contains(m))) {
            eprintln!("{line}");
        }
    }
    println!(
        "| send → WebSocket `session.message.sent` at {} msg/s for {} s: p50 / p99 / p99.9 / max | {:.1} / {:.1} / {:.1} / {:.1} ms ({} of {} seen) |",
        args.rate,
        args.latency_seconds,
        ms(latency.p50),
        ms(latency.p99),
        ms(latency.p999),
        ms(latency.max),
        latency.requests,
        latency.requests + latency.errors,
    );

    match wrk_sends(&base, &token, &ids, args.seconds, args.connections, "anna serve, the worker sending meanwhile") {
        Ok(line) => println!("{line}"),
        Err(error) => println!("| wrk send load | not run: {error} |"),
    }
    println!("| RSS after the send loads | {:.1} MiB |", mib(server.rss_kib()));
    drop(server);

    // The production shape's API process alone: what it accepts when the sessions workers run
    // elsewhere (the commands queue up in the stream; the sessions stay `connected` in the
    // database since the process above was killed, not stopped).
    let api = Server::start_as(args.anna.clone(), "api", &vars)?;
    match wrk_sends(&api.base, &token, &ids, args.seconds, args.connections, "`anna api` alone") {
        Ok(line) => println!("{line}"),
        Err(error) => println!("| wrk send load, API alone | not run: {error} |"),
    }
    Ok(())
}

/// Creates `count` sessions through the API at `base`, 16 requests at a time; returns their ids.
pub(crate) async fn create_sessions(
    client: &reqwest::Client,
    base: &str,
    bearer: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    futures::stream::iter(0..count)
        .map(|_| async move {
            let reply: Value =
                client.post(format!("{base}/sessions")).header("authorization", bearer).send().await?.json().await?;
            reply["sessionId"].as_str().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("start: {reply}"))
        })
        .buffer_unordered(16)
        .collect::<Vec<anyhow::Result<String>>>()
        .await
        .into_iter()
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until `expected` of the tenant's sessions satisfy `done` (polled every 500 ms, for at
/// most 10 minutes).
pub(crate) async fn wait_for(
    client: &reqwest::Client,
    base: &str,
    bearer: &str,
    expected: usize,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let list: Value =
            client.get(format!("{base}/sessions")).header("authorization", bearer).send().await?.json().await?;
        let ready = list["sessions"].as_array().map_or(0, |s| s.iter().filter(|s| done(s)).count());
        if ready >= expected {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {ready} of {expected} sessions got there in 10 minutes");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sends at `rate` per second (open loop) across the sessions and times each send from its
/// request to the `session.message.sent` frame on the tenant's WebSocket.
async fn send_to_websocket(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    ids: &[String],
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Summary> {
    let url = format!("{}/ws/sessions?accessToken={token}", base.replace("http://", "ws://"));
    let (socket, _) = tokio_tungstenite::connect_async(url).await?;
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut socket = socket;
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Text(text) = message
                    && text.contains("\"session.message.sent\"")
                    && let Ok(frame) = serde_json::from_str::<Value>(&text)
                    && let Some(command) = frame["payload"]["commandId"].as_str()
                {
                    seen.lock().unwrap_or_else(|e| e.into_inner()).insert(command.to_owned(), Instant::now());
                }
            }
        })
    };
    let sent: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let total = rate * seconds;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    for n in 0..total {
        ticker.tick().await;
        let (client, sent) = (client.clone(), sent.clone());
        let url = format!("{base}/sessions/{}/messages", ids[n as usize % ids.len()]);
        let bearer = format!("Bearer {token}");
        requests.spawn(async move {
            let at = Instant::now();
            let reply = client
                .post(url)
                .header("authorization", bearer)
                .json(&json!({"to": "+1 555 0100 123", "content": format!("bench {n}")}))
                .send()
                .await;
            if let Ok(reply) = reply
                && let Ok(body) = reply.json::<Value>().await
                && let Some(command) = body["commandId"].as_str()
            {
                sent.lock().unwrap_or_else(|e| e.into_inner()).push((command.to_owned(), at));
            }
        });
    }
    while requests.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    reader.abort();
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let sent = sent.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let latencies: Vec<Duration> =
        sent.iter().filter_map(|(command, at)| seen.get(command).map(|frame| frame.duration_since(*at))).collect();
    let missing = total as usize - latencies.len();
    Ok(Summary::from_latencies("send → websocket", latencies, missing, elapsed))
}

/// `POST /sessions/{id}/messages` under wrk, spread over every session.
fn wrk_sends(
    base: &str,
    token: &str,
    ids: &[String],
    seconds: u64,
    connections: usize,
    shape: &str,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        Command::new("wrk").arg("--version").output().is_ok(),
        "wrk is needed (Debian: apt-get install wrk)"
    );
    let list = ids.iter().map(|id| format!("\"{id}\"")).collect::<Vec<_>>().join(",");
    let script = format!(
        "local ids = {{{list}}}\n\
         local n = 0\n\
         wrk.method = \"POST\"\n\
         wrk.headers[\"Content-Type\"] = \"application/json\"\n\
         wrk.headers[\"Authorization\"] = \"Bearer {token}\"\n\
         wrk.body = '{{\"to\":\"+15550100123\",\"content\":\"load\"}}'\n\
         request = function()\n  n = n + 1\n  return wrk.format(nil, \"/sessions/\" .. ids[(n % #ids) + 1] .. \"/messages\")\nend\n"
    );
    let path = std::env::temp_dir().join(format!("anna-bench-sends-{}.lua", std::process::id()));
    std::fs::write(&path, script)?;
    let output = Command::new("wrk")
        .args(["-t", "2", "-c", &connections.to_string(), "-d", &format!("{seconds}s"), "--latency", "-s"])
        .arg(&path)
        .arg(base)
        .output()?;
    let _ = std::fs::remove_file(&path);
    let out = String::from_utf8_lossy(&output.stdout).to_string();
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .map(str::trim)
        .ok_or_else(|| anyhow::anyhow!("cannot read wrk's output:\n{out}"))?;
    let pick = |p: &str| {
        out.lines().find_map(|l| l.trim_start().strip_prefix(p).map(|v| v.trim().to_owned())).unwrap_or_default()
    };
    let non_2xx = out.lines().find(|l| l.contains("Non-2xx")).unwrap_or("no non-2xx answers").trim().to_owned();
    Ok(format!(
        "| `POST /sessions/{{id}}/messages` under wrk, {shape} ({connections} connections, {seconds} s; {non_2xx}) | {rps} req/s, p50 {}, p99 {} |",
        pick("50%"),
        pick("99%")
    ))
}
