//! Operator commands: `anna outbox status`, `anna dlq list|replay|purge`, `anna fleet status`
//! and `anna backup`. They print to stdout (a report, not logs) and never print payloads, which
//! may hold sealed secrets.

use std::sync::Arc;
use std::time::Duration;

use anna_store::Store;
use anyhow::Context;
use time::OffsetDateTime;
use uuid::Uuid;

use anna_streams::{Entry, Fields, envelope};

use crate::app::{self, Backends};
use crate::config::Config;

/// `anna backup <file>`: a consistent copy of the embedded SQLite database, while it is in use.
pub async fn backup(config: Config, file: &std::path::Path) -> anyhow::Result<()> {
    use secrecy::ExposeSecret;
    let report = anna_store::backup::backup_sqlite(config.database.url.expose_secret(), file).await?;
    println!(
        "backed up the database to {} ({} bytes in {:.1} s); integrity checked",
        report.path.display(),
        report.bytes,
        report.took.as_secs_f64()
    );
    Ok(())
}

/// `anna outbox status`: the backlog, the rate it drains at (rows published in the last
/// minute) and the time left at that rate. With `watch`, a line every `every` until the backlog
/// is gone or the command is interrupted: recovery progress after an outage.
pub async fn outbox_status(config: Config, watch: bool, every: Duration) -> anyhow::Result<()> {
    let store = app::open_store(&config).await?;
    let outcome = if watch { watch_outbox(&store, every).await } else { print_outbox_status(&store).await };
    store.close().await;
    outcome
}

async fn print_outbox_status(store: &Arc<dyn Store>) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let status = store.outbox_status().await.context("reading the outbox")?;
    let last_minute =
        store.outbox_published_since(now - time::Duration::minutes(1)).await.context("reading the outbox")?;
    let rate = last_minute as f64 / 60.0;
    let age = status
        .oldest_unpublished_at
        .map(|at| format!("{:.1} s", (now - at).as_seconds_f64().max(0.0)))
        .unwrap_or_else(|| "-".into());
    println!("pending     {}", status.pending);
    println!("processing  {}", status.processing);
    println!("failed      {}", status.failed);
    println!("backlog     {}", status.backlog());
    println!("oldest unpublished age  {age}");
    println!("drain rate  {rate:.0}/s (published in the last minute: {last_minute})");
    println!("time left   {}", time_left(status.backlog(), rate));
    Ok(())
}

async fn watch_outbox(store: &Arc<dyn Store>, every: Duration) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    app::cancel_on_signal(shutdown.clone());
    let mut since = OffsetDateTime::now_utc();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    println!(
        "{:<10} {:>10} {:>10} {:>8} {:>12} {:>10}",
        "time", "backlog", "drain/s", "failed", "oldest age", "time left"
    );
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let now = OffsetDateTime::now_utc();
        let status = store.outbox_status().await.context("reading the outbox")?;
        let published = store.outbox_published_since(since).await.context("reading the outbox")?;
        let rate = published as f64 / (now - since).as_seconds_f64().max(0.001);
        since = now;
        let age = status
            .oldest_unpublished_at
            .map(|at| format!("{:.1} s", (now - at).as_seconds_f64().max(0.0)))
            .unwrap_or_else(|| "-".into());
        let clock = format!("{:02}:{:02}:{:02}", now.hour(), now.minute(), now.second());
        println!(
            "{clock:<10} {:>10} {rate:>10.0} {:>8} {age:>12} {:>10}",
            status.backlog(),
            status.failed,
            time_left(status.backlog(), rate)
        );
        if status.backlog() == 0 {
            println!("drained");
            return Ok(());
        }
    }
}

fn time_left(backlog: u64, rate: f64) -> String {
    match backlog {
        0 => "0 s".into(),
        _ if rate < 0.5 => "- (not draining)".into(),
        _ => format!("{:.0} s", backlog as f64 / rate),
    }
}

/// `anna outbox retry-failed`: puts every `failed` outbox row back in line (after the cause —
/// a stream outage longer than the retry budget — is fixed).
pub async fn outbox_retry_failed(config: Config) -> anyhow::Result<()> {
    let store = app::open_store(&config).await?;
    let requeued = store.requeue_failed_outbox(OffsetDateTime::now_utc()).await.context("requeueing failed rows")?;
    println!("{requeued} failed outbox row(s) requeued");
    store.close().await;
    Ok(())
}

/// A dead letter wherever it is kept.
struct Letter {
    /// The DLQ stream entry id, or the `dead_letters` row id.
    id: String,
    source: &'static str,
    event_name: String,
    event_id: String,
    subscriber: String,
    attempts: String,
    failed_at: String,
    error: String,
    /// The fields to append to the main stream on replay.
    replay_fields: Fields,
}

const DLQ_ONLY_FIELDS: [&str; 4] =
    [envelope::DLQ_ERROR, envelope::DLQ_ATTEMPTS, envelope::DLQ_SUBSCRIBER, envelope::DLQ_FAILED_AT];

async fn all_letters(config: &Config, backends: &Backends) -> anyhow::Result<Vec<Letter>> {
    let dlq = &config.events.consumer.dlq_stream;
    let mut letters = Vec::new();
    let mut after = "0".to_owned();
    loop {
        let entries: Vec<Entry> = backends
            .stream
            .read_after(dlq, &after, 500, std::time::Duration::ZERO)
            .await
            .context("reading the DLQ stream")?;
        let Some(last) = entries.last() else { break };
        after = last.id.clone();
        for entry in entries {
            let get = |k: &str| entry.fields.get(k).cloned().unwrap_or_default();
            let mut replay_fields = entry.fields.clone();
            for field in DLQ_ONLY_FIELDS {
                replay_fields.remove(field);
            }
            letters.push(Letter {
                source: "stream",
                event_name: get(envelope::EVENT_NAME),
                event_id: get(envelope::EVENT_ID),
                subscriber: get(envelope::DLQ_SUBSCRIBER),
                attempts: get(envelope::DLQ_ATTEMPTS),
                failed_at: get(envelope::DLQ_FAILED_AT),
                error: get(envelope::DLQ_ERROR),
                id: entry.id,
                replay_fields,
            });
        }
    }
    for row in backends.store.list_dead_letters(u32::MAX).await.context("reading dead_letters")? {
        letters.push(Letter {
            id: row.id.to_string(),
            source: "table",
            event_name: row.event.event_name.clone(),
            event_id: row.event.event_id.to_string(),
            subscriber: String::new(),
            attempts: row.attempts.to_string(),
            failed_at: anna_domain::user::iso(row.created_at),
            error: row.error.clone(),
            replay_fields: envelope::to_fields(&row.event, None),
        });
    }
    Ok(letters)
}

/// `anna dlq list`.
pub async fn dlq_list(config: Config) -> anyhow::Result<()> {
    let backends = app::open_backends(&config).await?;
    let letters = all_letters(&config, &backends).await?;
    println!(
        "{:<24} {:<6} {:<34} {:<36} {:<8} {:<24} {:<40} error",
        "id", "source", "event", "event id", "attempts", "failed at", "subscriber"
    );
    for l in &letters {
        let error: String = l.error.chars().take(120).collect();
        println!(
            "{:<24} {:<6} {:<34} {:<36} {:<8} {:<24} {:<40} {error}",
            l.id, l.source, l.event_name, l.event_id, l.attempts, l.failed_at, l.subscriber
        );
    }
    println!("{} dead letter(s)", letters.len());
    backends.store.close().await;
    Ok(())
}

/// `anna dlq replay <id>|--all`: re-appends to the main stream with the same event id (so
/// subscribers that already applied it skip it), clears the failed attempts, then removes the
/// dead letter.
pub async fn dlq_replay(config: Config, id: Option<String>) -> anyhow::Result<()> {
    let backends = app::open_backends(&config).await?;
    let letters = all_letters(&config, &backends).await?;
    let selected: Vec<&Letter> = match &id {
        Some(id) => letters.iter().filter(|l| &l.id == id).collect(),
        None => letters.iter().collect(),
    };
    if let Some(id) = &id
        && selected.is_empty()
    {
        backends.store.close().await;
        anyhow::bail!("no dead letter with id {id} (see `anna dlq list`)");
    }
    for letter in &selected {
        if let Ok(event_id) = Uuid::parse_str(&letter.event_id) {
            backends.store.reset_event_attempts(event_id).await.context("clearing failed attempts")?;
        }
        let new_id = backends
            .stream
            .append(&config.events.consumer.stream, &letter.replay_fields, config.events.relay.stream_max_len)
            .await
            .context("appending to the event stream")?;
        match letter.source {
            "stream" => {
                backends
                    .stream
                    .delete(&config.events.consumer.dlq_stream, std::slice::from_ref(&letter.id))
                    .await
                    .context("removing the DLQ entry")?;
            }
            _ => {
                let row = Uuid::parse_str(&letter.id).context("dead letter id")?;
                backends.store.delete_dead_letters(Some(&[row])).await.context("removing the dead letter")?;
            }
        }
        println!("replayed {} ({} {}) as {new_id}", letter.id, letter.event_name, letter.event_id);
    }
    println!("{} dead letter(s) replayed", selected.len());
    backends.store.close().await;
    Ok(())
}

/// `anna dlq purge`: deletes every dead letter (DLQ stream entries and `dead_letters` rows).
pub async fn dlq_purge(config: Config) -> anyhow::Result<()> {
    let backends = app::open_backends(&config).await?;
    let letters = all_letters(&config, &backends).await?;
    let stream_ids: Vec<String> = letters.iter().filter(|l| l.source == "stream").map(|l| l.id.clone()).collect();
    let removed_entries = if stream_ids.is_empty() {
        0
    } else {
        backends
            .stream
            .delete(&config.events.consumer.dlq_stream, &stream_ids)
            .await
            .context("purging the DLQ stream")?
    };
    let removed_rows = backends.store.delete_dead_letters(None).await.context("purging dead_letters")?;
    println!("purged {removed_entries} DLQ stream entr(ies) and {removed_rows} dead_letters row(s)");
    backends.store.close().await;
    Ok(())
}

/// `anna simulator scan <sessionId>`: the simulated phone scans the session's QR code (the
/// command reaches whichever sessions worker holds the session).
pub async fn simulator_scan(config: Config, session_id: uuid::Uuid) -> anyhow::Result<()> {
    if config.sessions.provider != crate::config::SessionsProvider::Simulator {
        anyhow::bail!("SESSIONS_PROVIDER is not simulator: there is no simulated phone to scan with");
    }
    let backends = app::open_backends(&config).await?;
    let sessions = app::sessions_usecases(&config, &backends);
    let enqueued = sessions.simulate_as_operator(session_id, "scan").await;
    backends.store.close().await;
    let enqueued = enqueued.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("scan requested for session {session_id} (command {})", enqueued.command_id);
    Ok(())
}

/// `anna fleet status`: the sessions workers (live or not yet expired), the partitions each
/// holds, their sessions and the age of their leases, then the partitions nobody holds.
pub async fn fleet_status(config: Config) -> anyhow::Result<()> {
    use anna_domain::SessionStatus;
    use std::collections::BTreeMap;

    let store = app::open_store(&config).await?;
    let view = store.fleet_view().await.context("reading the fleet")?;
    let partitions = config.sessions.sessions.partitions;
    let active = store
        .list_sessions_with_status(&[SessionStatus::Connected, SessionStatus::Disconnected, SessionStatus::PendingQr])
        .await
        .context("reading the sessions")?;
    // Per partition: (connected, active).
    let mut per_partition: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    for session in &active {
        let counts = per_partition.entry(config.sessions.sessions.partition_of(session.id)).or_default();
        counts.1 += 1;
        if session.status == SessionStatus::Connected {
            counts.0 += 1;
        }
    }
    let age = |at_ms: i64| format!("{:.1}s", (view.now_ms - at_ms).max(0) as f64 / 1000.0);
    let live = view.live_workers().count();
    println!("sessions workers: {live} live, {} registered; {partitions} partitions", view.workers.len());
    println!(
        "{:<36} {:<20} {:>8} {:>10} {:>6} {:>10} {:>8} {:>10}  partitions",
        "worker", "host", "pid", "heartbeat", "held", "connected", "active", "renewed"
    );
    for worker in &view.workers {
        let id = &worker.info.worker_id;
        let held: Vec<&anna_store::Lease> = view
            .leases
            .iter()
            .filter(|l| l.worker_id.as_deref() == Some(id.as_str()) && l.expires_at_ms > view.now_ms)
            .collect();
        let (connected, sessions) = held
            .iter()
            .filter_map(|l| per_partition.get(&l.partition))
            .fold((0, 0), |(c, a), (pc, pa)| (c + pc, a + pa));
        let oldest_renewal = held.iter().map(|l| l.renewed_at_ms).min().map(age).unwrap_or_else(|| "-".into());
        let status = if worker.expires_at_ms > view.now_ms { "" } else { " (expired)" };
        let list: Vec<String> = held.iter().map(|l| l.partition.to_string()).collect();
        println!(
            "{:<36} {:<20} {:>8} {:>10} {:>6} {:>10} {:>8} {:>10}  {}{status}",
            id,
            worker.info.host,
            worker.info.pid,
            age(worker.heartbeat_at_ms),
            held.len(),
            connected,
            sessions,
            oldest_renewal,
            list.join(",")
        );
    }
    let unheld: Vec<String> = (0..partitions).filter(|p| view.holder_of(*p).is_none()).map(|p| p.to_string()).collect();
    let waiting: usize = (0..partitions)
        .filter(|p| view.holder_of(*p).is_none())
        .filter_map(|p| per_partition.get(&p))
        .map(|(_, active)| active)
        .sum();
    if unheld.is_empty() {
        println!("every partition is held");
    } else {
        println!("partitions held by no live worker: {} ({waiting} active session(s) wait)", unheld.join(","));
    }
    store.close().await;
    Ok(())
}
