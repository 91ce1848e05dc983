//! Webhook delivery: tenant events committed to the outbox → relay → stream → the webhook
//! fan-out (its own consumer group) → delivery rows → the dispatcher → a fast local receiver,
//! in both shapes. Three runs per shape:
//!
//! - a backlog: events committed and published while no webhooks worker runs (an outage),
//!   then the worker starts: fan-out and delivery rate until the receiver has them all;
//! - throughput: producers commit as fast as they can while everything runs;
//! - latency at a steady rate (commit → the receiver has the request), for `--seconds`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anna_domain::DomainEvent;
use anna_domain::webhook::{EventFilter, NewEndpoint, WebhookEndpoint};
use anna_store::Store;
use anna_streams::consumer::{ConsumerConfig, EventConsumer};
use anna_streams::relay::OutboxRelay;
use anna_testkit::webhook_receiver::WebhookReceiver;
use anna_workers::webhooks::{DispatcherConfig, HttpSettings, WebhookDispatcher, WebhookFanout};
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::events::{open_shape, relay_config};
use crate::stats::Summary;

const SECRET: &[u8] = b"bench-server-secret-bench-server-secret";

#[derive(Debug, clap::Args)]
pub struct WebhooksArgs {
    /// Events (one delivery each) in the backlog and throughput runs, per shape.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Sessions the events belong to (the ordering keys).
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Concurrent producers in the throughput run.
    #[arg(long, default_value_t = 8)]
    producers: usize,
    /// Rate of the latency run (events per second, one per transaction).
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Duration of the latency run, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Deliver the events of each session in order (the endpoint's `ordered` option).
    #[arg(long)]
    ordered: bool,
    /// Endpoints of the tenant, each receiving every event (deliveries = events × endpoints).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    endpoints: u64,
    /// Only these shapes (embedded, distributed).
    #[arg(long, value_delimiter = ',', default_value = "distributed,embedded")]
    shapes: Vec<String>,
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

/// Commit times of the events, by id, in unix milliseconds.
#[derive(Default)]
struct Commits(Mutex<HashMap<String, i64>>);

impl Commits {
    fn note(&self, events: &[DomainEvent], at: i64) {
        let mut commits = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for event in events {
            commits.insert(event.event_id.to_string(), at);
        }
    }

    /// Commit → arrival latencies of the received bodies.
    fn latencies(&self, received: &[(i64, Vec<u8>)]) -> Vec<Duration> {
        let commits = self.0.lock().unwrap_or_else(|e| e.into_inner());
        received
            .iter()
            .filter_map(|(arrived, body)| {
                let body: serde_json::Value = serde_json::from_slice(body).ok()?;
                let committed = commits.get(body["eventId"].as_str()?)?;
                Some(Duration::from_millis(u64::try_from(arrived - committed).unwrap_or(0)))
            })
            .collect()
    }
}

fn events(tenant: Uuid, sessions: &[Uuid], count: usize) -> Vec<DomainEvent> {
    (0..count)
        .map(|n| {
            let session = sessions[n % sessions.len()];
            let mut event = DomainEvent::new(
                anna_domain::session::SESSION_MESSAGE_RECEIVED,
                session.to_string(),
                OffsetDateTime::now_utc(),
                serde_json::json!({"tenantId": tenant.to_string(), "messageId": format!("m{n}"), "from": "15550100123@s.whatsapp.net", "text": "hello"}),
            );
            event.tenant_id = Some(tenant.to_string());
            event
        })
        .collect()
}

async fn commit(store: &Arc<dyn Store>, commits: &Commits, events: &[DomainEvent]) -> anyhow::Result<()> {
    let mut uow = store.begin().await?;
    uow.append_events(events).await?;
    commits.note(events, unix_ms());
    uow.commit().await?;
    Ok(())
}

struct Pipeline {
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Pipeline {
    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn relay(store: &Arc<dyn Store>, stream: &Arc<dyn anna_streams::Stream>, name: &str) -> Pipeline {
    let shutdown = CancellationToken::new();
    let relay = OutboxRelay::new(store.clone(), stream.clone(), relay_config(name));
    let token = shutdown.clone();
    Pipeline { shutdown, tasks: vec![tokio::spawn(async move { relay.run(token).await })] }
}

/// The webhooks worker as `anna worker webhooks` runs it, with the default settings (but for
/// loopback receivers being allowed).
fn webhooks_worker(
    store: &Arc<dyn Store>,
    stream: &Arc<dyn anna_streams::Stream>,
    name: &str,
) -> anyhow::Result<Pipeline> {
    let shutdown = CancellationToken::new();
    let wake = Arc::new(Notify::new());
    let fanout = Arc::new(WebhookFanout { deadline: Duration::from_secs(24 * 3600), wake: wake.clone() });
    let consumer = Arc::new(
        EventConsumer::new(
            store.clone(),
            stream.clone(),
            ConsumerConfig {
                stream: name.to_owned(),
                group: "webhooks-group".into(),
                consumer: "bench-webhooks".into(),
                dlq_stream: format!("{name}-dlq"),
                block: Duration::from_millis(500),
                ..ConsumerConfig::default()
            },
        )
        .subscribe(fanout),
    );
    let config = DispatcherConfig {
        http: HttpSettings { allow_private: true, ..HttpSettings::default() },
        ..DispatcherConfig::default()
    };
    let dispatcher = WebhookDispatcher::new(store.clone(), SECRET, config, wake)?;
    let mut tasks = Vec::new();
    let token = shutdown.clone();
    tasks.push(tokio::spawn(async move { consumer.run(token).await }));
    let token = shutdown.clone();
    tasks.push(tokio::spawn(async move { dispatcher.run(token).await }));
    Ok(Pipeline { shutdown, tasks })
}

async fn wait_received(receiver: &WebhookReceiver, total: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while receiver.count() < total {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

pub async fn run(args: WebhooksArgs) -> anyhow::Result<()> {
    println!("{}", Summary::header());
    for name in &args.shapes {
        let shape = open_shape(name).await?;
        let store = shape.store.clone();
        let stream = shape.stream.clone();
        let label = shape.label;
        let stream_name = format!("bench-webhooks-{}", Uuid::new_v4().simple());
        let tenant = Uuid::new_v4();
        let sessions: Vec<Uuid> = (0..args.sessions.max(1)).map(|_| Uuid::new_v4()).collect();
        let receiver = WebhookReceiver::start_counting().await;
        let sealer = anna_domain::webhook::secret_sealer(SECRET);
        let mut uow = store.begin().await?;
        for n in 0..args.endpoints {
            let settings = NewEndpoint {
                url: receiver.url(&format!("/hook/{n}")),
                description: "bench".into(),
                filter: EventFilter::all(),
                enabled: true,
                ordered: args.ordered,
            };
            let (endpoint, _, _) = WebhookEndpoint::create(tenant, settings, &sealer, OffsetDateTime::now_utc())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            uow.insert_webhook_endpoint(&endpoint).await?;
        }
        uow.commit().await?;
        let fan_out = usize::try_from(args.endpoints).unwrap_or(1);
        let commits = Commits::default();
        let order = match (args.ordered, args.endpoints) {
            (false, 1) => String::new(),
            (ordered, n) => format!(
                "{}{}",
                if ordered { ", ordered" } else { "" },
                if n > 1 { format!(", {n} endpoints") } else { String::new() }
            ),
        };

        // 1. A backlog after an outage of the webhooks worker: every event already in the stream.
        let relay_pipeline = relay(&store, &stream, &stream_name);
        for chunk in events(tenant, &sessions, args.events).chunks(500) {
            commit(&store, &commits, chunk).await?;
        }
        while stream.len(&stream_name).await.map_err(|e| anyhow::anyhow!("{e}"))? < args.events as u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = Instant::now();
        let worker = webhooks_worker(&store, &stream, &stream_name)?;
        let complete = wait_received(&receiver, args.events * fan_out, Duration::from_secs(600)).await;
        let elapsed = started.elapsed();
        let delivered = receiver.count();
        println!(
            "{}",
            Summary::from_latencies(
                format!("{label} backlog {}{order}", args.events),
                vec![Duration::ZERO; delivered.min(args.events * fan_out)],
                usize::from(!complete),
                elapsed
            )
            .row()
        );

        // 2. Throughput: producers commit 10 events per transaction as fast as they can.
        let before = receiver.count();
        let started = Instant::now();
        let per_producer = args.events / args.producers.max(1);
        let mut producers = Vec::new();
        let commits = Arc::new(commits);
        for _ in 0..args.producers.max(1) {
            let (store, commits, sessions) = (store.clone(), commits.clone(), sessions.clone());
            producers.push(tokio::spawn(async move {
                for chunk in events(tenant, &sessions, per_producer).chunks(10) {
                    commit(&store, &commits, chunk).await?;
                }
                anyhow::Ok(())
            }));
        }
        for producer in producers {
            producer.await??;
        }
        let total = per_producer * args.producers.max(1);
        let complete = wait_received(&receiver, before + total * fan_out, Duration::from_secs(600)).await;
        let elapsed = started.elapsed();
        let received = receiver.counted();
        let latencies = commits.latencies(&received[before.min(received.len())..]);
        println!(
            "{}",
            Summary::from_latencies(format!("{label} e2e max{order}"), latencies, usize::from(!complete), elapsed)
                .row()
        );

        // 3. Latency at a steady rate.
        let before = receiver.count();
        let started = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let total = (args.rate * args.seconds) as usize;
        let mut sent = 0;
        let mut in_flight = Vec::new();
        while sent < total {
            ticker.tick().await;
            let (store, commits) = (store.clone(), commits.clone());
            let event = events(tenant, &sessions[sent % sessions.len()..=sent % sessions.len()], 1);
            in_flight.push(tokio::spawn(async move { commit(&store, &commits, &event).await }));
            sent += 1;
        }
        for task in in_flight {
            task.await??;
        }
        let complete = wait_received(&receiver, before + total * fan_out, Duration::from_secs(120)).await;
        let elapsed = started.elapsed();
        let received = receiver.counted();
        let latencies = commits.latencies(&received[before.min(received.len())..]);
        println!(
            "{}",
            Summary::from_latencies(
                format!("{label} latency @{}/s{order}", args.rate),
                latencies,
                usize::from(!complete),
                elapsed
            )
            .row()
        );
        worker.stop().await;
        relay_pipeline.stop().await;
        store.close().await;
    }
    Ok(())
}
