//! Backlogs, as after an outage: an outbox full of pending rows drained by the relays, and a
//! stream full of unread entries drained by the consumer group.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anna_domain::DomainEvent;
use anna_store::Store;
use anna_streams::consumer::{ConsumerConfig, EventConsumer};
use anna_streams::relay::{OutboxRelay, RelayConfig};
use anna_streams::{Fields, envelope};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::events::{EVENT_NAME, Shape, Witness, open_shape};

#[derive(Debug, clap::Args)]
pub struct BacklogArgs {
    /// Backlog sizes (pending outbox rows), each run in each variant.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    rows: Vec<usize>,
    /// Aggregates the rows belong to: `distinct` (one row each) or a number (rows spread
    /// evenly, each aggregate's rows in order).
    #[arg(long, value_delimiter = ',', default_value = "distinct,100")]
    aggregates: Vec<String>,
    /// Relay loops side by side on Postgres (as `OUTBOX_RELAYS`; SQLite runs one).
    #[arg(long, default_value_t = 2)]
    relays: usize,
    /// Rows per relay claim (as `OUTBOX_BATCH_SIZE`).
    #[arg(long, default_value_t = 1000)]
    batch: u32,
    /// Entries in the consumer-group backlog.
    #[arg(long, default_value_t = 100_000)]
    entries: usize,
    /// Stream readers side by side (as `EVENTS_READERS`).
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Only these shapes (embedded, distributed).
    #[arg(long, value_delimiter = ',', default_value = "distributed,embedded")]
    shapes: Vec<String>,
}

pub async fn run(args: BacklogArgs) -> anyhow::Result<()> {
    println!("| shape | backlog | aggregates | drained in | events/s | order per aggregate |");
    println!("|---|---:|---|---:|---:|---|");
    for name in &args.shapes {
        for rows in &args.rows {
            for aggregates in &args.aggregates {
                let shape = open_shape(name).await?;
                let aggregates = match aggregates.as_str() {
                    "distinct" => *rows,
                    n => n.parse().map_err(|_| anyhow::anyhow!("--aggregates: {n:?} is not a number"))?,
                };
                let row = outbox_backlog(&shape, *rows, aggregates, &args).await?;
                println!("{row}");
                shape.store.close().await;
            }
        }
    }
    println!();
    println!("| shape | stream backlog | readers | drained in | events/s | applied exactly once |");
    println!("|---|---:|---:|---:|---:|---|");
    for name in &args.shapes {
        let shape = open_shape(name).await?;
        println!("{}", consumer_backlog(&shape, &args).await?);
        shape.store.close().await;
    }
    Ok(())
}

/// `rows` pending rows over `aggregates` aggregates, committed before any relay runs; then the
/// relays drain them to a fresh stream, and the stream is read back to check each
/// aggregate's order.
async fn outbox_backlog(shape: &Shape, rows: usize, aggregates: usize, args: &BacklogArgs) -> anyhow::Result<String> {
    let run_id = Uuid::new_v4().simple().to_string();
    let stream_name = format!("bench-backlog-{run_id}");
    let aggregates = aggregates.max(1);
    // Row i belongs to aggregate i % aggregates and is its (i / aggregates)-th event.
    let mut batch = Vec::with_capacity(1000);
    for i in 0..rows {
        let payload = serde_json::json!({ "n": i / aggregates });
        let aggregate = format!("{run_id}-{}", i % aggregates);
        batch.push(DomainEvent::new(EVENT_NAME, aggregate, OffsetDateTime::now_utc(), payload));
        if batch.len() == 1000 || i + 1 == rows {
            let mut uow = shape.store.begin().await?;
            uow.append_events(&batch).await?;
            uow.commit().await?;
            batch.clear();
        }
    }
    let relays = if shape.store.backend() == anna_store::Backend::Sqlite { 1 } else { args.relays.max(1) };
    let config = RelayConfig {
        stream: stream_name.clone(),
        batch_size: args.batch,
        stream_max_len: None,
        ..RelayConfig::default()
    };
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let tasks: Vec<_> = (0..relays)
        .map(|_| {
            let relay = OutboxRelay::new(shape.store.clone(), shape.stream.clone(), config.clone());
            let token = shutdown.clone();
            tokio::spawn(async move { relay.run(token).await })
        })
        .collect();
    let drained = wait_drained(&shape.store, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed();
    shutdown.cancel();
    for task in tasks {
        let _ = task.await;
    }
    anyhow::ensure!(drained, "the backlog of {rows} rows did not drain within 600 s");
    let order = check_order(shape, &stream_name, rows).await?;
    let label =
        if aggregates == rows { "distinct".to_owned() } else { format!("{aggregates} × {}", rows / aggregates) };
    Ok(format!(
        "| {} | {rows} | {label} | {:.2} s | **{:.0}** | {order} |",
        shape.label,
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64()
    ))
}

async fn wait_drained(store: &Arc<dyn Store>, timeout: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let status = store.outbox_status().await?;
        if status.pending == 0 && status.processing == 0 {
            anyhow::ensure!(status.failed == 0, "{} rows failed", status.failed);
            return Ok(true);
        }
        // Counting a large backlog is itself work for the database: look rarely while it is
        // large, often near the end, where the count is cheap and the timing matters.
        let pause = match status.backlog() {
            n if n > 20_000 => 250,
            n if n > 2_000 => 25,
            _ => 2,
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    Ok(false)
}

/// Reads the whole stream back: every row once at least, and each aggregate's events in
/// order (a duplicate, allowed by at-least-once, must not go backwards past a later event).
async fn check_order(shape: &Shape, stream: &str, rows: usize) -> anyhow::Result<String> {
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut seen = 0usize;
    let mut after = "0".to_owned();
    loop {
        let entries = shape.stream.read_after(stream, &after, 5000, Duration::ZERO).await?;
        let Some(tail) = entries.last() else { break };
        after = tail.id.clone();
        for entry in &entries {
            let event = envelope::from_fields(&entry.fields)?;
            let n = event.payload["n"].as_u64().ok_or_else(|| anyhow::anyhow!("no n in {}", event.payload))?;
            let previous = last.insert(event.aggregate_id.clone(), n);
            anyhow::ensure!(
                previous.is_none_or(|p| n == p + 1 || n <= p),
                "{}: event {n} published after {previous:?}",
                event.aggregate_id
            );
            anyhow::ensure!(previous.is_some() || n == 0, "{}: event {n} published first", event.aggregate_id);
            seen += 1;
        }
    }
    anyhow::ensure!(seen >= rows, "{seen} entries in the stream for {rows} rows");
    Ok(format!("checked ({seen} entries)"))
}

/// `entries` entries appended straight to a fresh stream, then a consumer group with
/// `readers` readers and the witness subscriber (a database subscriber: applied-id records and
/// the projection in one transaction per batch) drains it.
async fn consumer_backlog(shape: &Shape, args: &BacklogArgs) -> anyhow::Result<String> {
    let run_id = Uuid::new_v4().simple().to_string();
    let stream = format!("bench-consumer-backlog-{run_id}");
    let mut batch: Vec<Fields> = Vec::with_capacity(500);
    for i in 0..args.entries {
        let event =
            DomainEvent::new(EVENT_NAME, Uuid::new_v4().to_string(), OffsetDateTime::now_utc(), serde_json::json!({}));
        batch.push(envelope::to_fields(&event, None));
        if batch.len() == 500 || i + 1 == args.entries {
            shape.stream.append_batch(&stream, &batch, None).await.map_err(|f| f.error)?;
            batch.clear();
        }
    }
    let witness = Witness::new();
    let shutdown = CancellationToken::new();
    let config = ConsumerConfig {
        stream: stream.clone(),
        group: format!("bench-group-{run_id}"),
        consumer: format!("bench-consumer-{run_id}"),
        dlq_stream: format!("bench-dlq-{run_id}"),
        batch_size: 500,
        block: Duration::from_millis(200),
        ..ConsumerConfig::default()
    };
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.readers.max(1))
        .map(|n| {
            let mut config = config.clone();
            config.consumer = format!("{}-{n}", config.consumer);
            let consumer = Arc::new(
                EventConsumer::new(shape.store.clone(), shape.stream.clone(), config).subscribe(witness.clone()),
            );
            let token = shutdown.clone();
            tokio::spawn(async move { consumer.run(token).await })
        })
        .collect();
    let drained = witness.wait_counted(args.entries, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    shutdown.cancel();
    for task in tasks {
        let _ = task.await;
    }
    anyhow::ensure!(drained, "the stream backlog did not drain within 600 s");
    let counted: i64 =
        shape.store.event_stats().await?.iter().filter(|s| s.event_name == EVENT_NAME).map(|s| s.count).sum();
    let exactly_once =
        if counted == i64::try_from(args.entries)? { "yes".to_owned() } else { format!("NO: {counted}") };
    Ok(format!(
        "| {} | {} | {} | {:.2} s | **{:.0}** | {exactly_once} |",
        shape.label,
        args.entries,
        args.readers,
        elapsed.as_secs_f64(),
        args.entries as f64 / elapsed.as_secs_f64()
    ))
}
