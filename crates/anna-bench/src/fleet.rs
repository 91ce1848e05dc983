//! The sessions fleet under repeated failures: `anna api`, `anna worker outbox`, `anna worker
//! events` and several `anna worker sessions` processes over Postgres + Redis, simulated
//! sessions spread over the workers; then, again and again, one worker is killed with SIGKILL
//! and started anew. Printed: the time until the killed worker's partitions are all held again
//! (failover), the time until each of its sessions is connected again, the reconnect
//! throughput, and the time the rejoining worker takes to get its share back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anna_store::{ConnectOptions, Store};
use serde_json::Value;

use crate::process::{Server, active_user};
use crate::stats::Summary;

#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    /// Sessions workers.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Simulated sessions to connect.
    #[arg(long, default_value_t = 600)]
    sessions: usize,
    /// Kills (each followed by a restart of the killed worker).
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// `SESSIONS_PARTITIONS`.
    #[arg(long, default_value_t = 64)]
    partitions: u32,
    /// `SESSIONS_FAILOVER_MS`.
    #[arg(long, default_value_t = 15_000)]
    failover_ms: u64,
    /// `SESSIONS_RESUME_STAGGER_MS`.
    #[arg(long, default_value_t = 100)]
    stagger_ms: u64,
    /// The `anna` binary (default: next to this one).
    #[arg(long)]
    anna: Option<PathBuf>,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// `session connected` lines after `since`: session id → (worker, wall-clock ms), first seen.
fn connected_since(workers: &BTreeMap<String, Server>, since: u64) -> HashMap<String, (String, u64)> {
    let mut seen = HashMap::new();
    for server in workers.values() {
        for line in server.lines() {
            if !line.contains("\"session connected\"") {
                continue;
            }
            let Ok(value) = serde_json::from_str::<Value>(&line) else { continue };
            let at = value["unix_ms"].as_u64().unwrap_or_default();
            if at < since {
                continue;
            }
            let session = value["session_id"].as_str().unwrap_or_default().to_owned();
            let worker = value["worker_id"].as_str().unwrap_or_default().to_owned();
            seen.entry(session).or_insert((worker, at));
        }
    }
    seen
}

/// Live holders: partition → worker.
async fn holders(store: &dyn Store, partitions: u32) -> anyhow::Result<HashMap<u32, String>> {
    let view = store.fleet_view().await?;
    Ok((0..partitions).filter_map(|p| Some((p, view.holder_of(p)?.worker_id.clone()?))).collect())
}

async fn balanced(store: &dyn Store, partitions: u32, workers: usize) -> anyhow::Result<bool> {
    let held = holders(store, partitions).await?;
    let mut per_worker: HashMap<&String, u32> = HashMap::new();
    for worker in held.values() {
        *per_worker.entry(worker).or_default() += 1;
    }
    // Nobody above the fair share, so nobody is still giving partitions away (64 over 3 workers
    // settles at 22, 22 and 20).
    let share = partitions.div_ceil(workers as u32);
    Ok(held.len() == partitions as usize && per_worker.len() == workers && per_worker.values().all(|n| *n <= share))
}

pub async fn run(args: FleetArgs) -> anyhow::Result<()> {
    let database_url = anna_testkit::pg::fresh_database_url().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let vars: Vec<(&str, String)> = vec![
        ("DATABASE_URL", database_url.clone()),
        ("REDIS_URL", anna_testkit::redis::shared_url()),
        ("EVENTS_STREAM", format!("bench-events-{suffix}")),
        ("SESSIONS_COMMAND_STREAM", format!("bench-commands-{suffix}")),
        ("SESSIONS_PROVIDER", "simulator".into()),
        ("SESSIONS_PARTITIONS", args.partitions.to_string()),
        ("SESSIONS_FAILOVER_MS", args.failover_ms.to_string()),
        ("SESSIONS_RESUME_STAGGER_MS", args.stagger_ms.to_string()),
        ("SESSIONS_MAX_PER_TENANT", "0".into()),
        ("SESSIONS_SIMULATOR_REPLY_MS", "0".into()),
        ("SESSIONS_SIMULATOR_FIRST_QR_MS", "3600000".into()),
        ("DATABASE_MAX_CONNECTIONS", "10".into()),
    ];
    let store = anna_store::connect(&database_url, &ConnectOptions::default()).await?;
    store.migrate().await?;
    let api = Server::spawn(args.anna.clone(), &["api"], &vars, true)?;
    let _outbox = Server::spawn(args.anna.clone(), &["worker", "outbox"], &vars, false)?;
    let events = Server::spawn(args.anna.clone(), &["worker", "events"], &vars, false)?;
    let mut generation = 0;
    let mut start_worker = |slot: usize| -> anyhow::Result<(String, Server)> {
        generation += 1;
        let id = format!("w{slot}-{generation}");
        let mut worker_vars = vars.clone();
        worker_vars.push(("SESSIONS_WORKER_ID", id.clone()));
        Ok((id, Server::spawn(args.anna.clone(), &["worker", "sessions"], &worker_vars, false)?))
    };
    let mut workers: BTreeMap<String, Server> = BTreeMap::new();
    for slot in 0..args.workers {
        let (id, server) = start_worker(slot)?;
        workers.insert(id, server);
    }
    wait(Duration::from_secs(120), "the workers share the partitions", async || {
        balanced(&*store, args.partitions, args.workers).await
    })
    .await?;

    let client = reqwest::Client::new();
    let email = format!("fleet-{suffix}@example.com");
    let token = active_user(&client, &api.base, &events, &email, "correct horse battery").await?;
    let bearer = format!("Bearer {token}");
    let started = Instant::now();
    let ids = crate::sessions::create_sessions(&client, &api.base, &bearer, args.sessions).await?;
    let statuses = async || -> anyhow::Result<HashMap<String, Value>> {
        let list: Value =
            client.get(format!("{}/sessions", api.base)).header("authorization", &bearer).send().await?.json().await?;
        Ok(list["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s["id"].as_str().unwrap_or_default().to_owned(), s))
            .collect())
    };
    let mut scanned: HashSet<String> = HashSet::new();
    wait(Duration::from_secs(600), "every session is connected", async || {
        let now = statuses().await?;
        for id in &ids {
            if now.get(id).is_some_and(|s| s["qr"].is_string()) && scanned.insert(id.clone()) {
                client
                    .post(format!("{}/simulator/sessions/{id}/scan", api.base))
                    .header("authorization", &bearer)
                    .send()
                    .await?;
            }
        }
        Ok(ids.iter().all(|id| now.get(id).is_some_and(|s| s["status"] == "connected")))
    })
    .await?;
    let paired_in = started.elapsed();

    let mut failovers = Vec::new();
    let mut reconnects = Vec::new();
    let mut throughputs = Vec::new();
    let mut rejoins = Vec::new();
    for kill in 0..args.kills {
        let held = holders(&*store, args.partitions).await?;
        let victim = workers.keys().nth(kill % workers.len()).cloned().unwrap_or_default();
        let partitions: HashSet<u32> = held.iter().filter(|(_, w)| **w == victim).map(|(p, _)| *p).collect();
        let sessions: Vec<&String> = ids
            .iter()
            .filter(|id| {
                uuid::Uuid::parse_str(id)
                    .is_ok_and(|u| partitions.contains(&anna_usecases::sessions::partition_of(args.partitions, u)))
            })
            .collect();
        let killed_at = unix_ms();
        let kill_instant = Instant::now();
        if let Some(mut server) = workers.remove(&victim) {
            server.kill();
        }
        // Failover: every partition of the victim held by a survivor.
        wait(Duration::from_secs(120), "the partitions are taken over", async || {
            let held = holders(&*store, args.partitions).await?;
            Ok(partitions.iter().all(|p| held.get(p).is_some_and(|w| *w != victim)))
        })
        .await?;
        let failover = kill_instant.elapsed();
        let mut times: Vec<u64> = Vec::new();
        let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
        wait(Duration::from_secs(600), "the sessions reconnect", async || {
            let connected = connected_since(&workers, killed_at);
            times = sessions.iter().filter_map(|id| connected.get(*id).map(|(_, at)| at - killed_at)).collect();
            by_worker.clear();
            for (worker, _) in sessions.iter().filter_map(|id| connected.get(*id)) {
                *by_worker.entry(worker.clone()).or_default() += 1;
            }
            Ok(times.len() == sessions.len())
        })
        .await?;
        let taken: BTreeMap<String, usize> = {
            let held = holders(&*store, args.partitions).await?;
            let mut taken = BTreeMap::new();
            for partition in &partitions {
                if let Some(worker) = held.get(partition) {
                    *taken.entry(worker.clone()).or_default() += 1;
                }
            }
            taken
        };
        times.sort_unstable();
        let first = times.first().copied().unwrap_or_default();
        let last = times.last().copied().unwrap_or_default();
        let throughput = sessions.len() as f64 / ((last.saturating_sub(first)).max(1) as f64 / 1000.0);
        println!(
            "kill {}: {} of {} partitions, {} sessions; held again after {:.2} s; sessions connected {:.2}–{:.2} s after the kill ({throughput:.0}/s); partitions taken {taken:?}, sessions reconnected {by_worker:?}",
            kill + 1,
            partitions.len(),
            args.partitions,
            sessions.len(),
            failover.as_secs_f64(),
            first as f64 / 1000.0,
            last as f64 / 1000.0,
        );
        failovers.push(failover);
        reconnects.extend(times.iter().map(|ms| Duration::from_millis(*ms)));
        throughputs.push(throughput);

        // The killed worker comes back (a new process, a new id) and gets its share again:
        // the others stop those sessions, release the partitions, and it resumes them.
        let rejoined_at = unix_ms();
        let rejoin = Instant::now();
        let slot = kill % args.workers;
        let (newcomer, server) = start_worker(slot)?;
        workers.insert(newcomer.clone(), server);
        wait(Duration::from_secs(300), "the fleet is balanced again", async || {
            balanced(&*store, args.partitions, args.workers).await
        })
        .await?;
        let balanced_after = rejoin.elapsed();
        let held = holders(&*store, args.partitions).await?;
        let moved: Vec<&String> = ids
            .iter()
            .filter(|id| {
                uuid::Uuid::parse_str(id).is_ok_and(|u| {
                    held.get(&anna_usecases::sessions::partition_of(args.partitions, u)) == Some(&newcomer)
                })
            })
            .collect();
        wait(Duration::from_secs(600), "the moved sessions are connected on the new worker", async || {
            let connected = connected_since(&workers, rejoined_at);
            Ok(moved.iter().all(|id| connected.get(*id).is_some_and(|(w, _)| *w == newcomer)))
        })
        .await?;
        println!(
            "  restart: balanced after {:.2} s, its {} sessions connected on it after {:.2} s",
            balanced_after.as_secs_f64(),
            moved.len(),
            rejoin.elapsed().as_secs_f64()
        );
        rejoins.push(rejoin.elapsed());
    }

    let failover = Summary::from_latencies("failover", failovers, 0, Duration::ZERO);
    let reconnect = Summary::from_latencies("reconnect", reconnects, 0, Duration::ZERO);
    let rejoin = Summary::from_latencies("rejoin", rejoins, 0, Duration::ZERO);
    println!();
    println!(
        "## Sessions fleet: {} workers, {} sessions, {} partitions, SESSIONS_FAILOVER_MS={}, stagger {} ms, {} kills",
        args.workers, args.sessions, args.partitions, args.failover_ms, args.stagger_ms, args.kills
    );
    println!();
    println!("| measure | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    println!("| sessions created, paired, connected | {:.1} s | | |", paired_in.as_secs_f64());
    println!(
        "| failover: kill → every partition held again | {:.2} s | {:.2} s | {:.2} s |",
        failover.p50.as_secs_f64(),
        failover.p99.as_secs_f64(),
        failover.max.as_secs_f64()
    );
    println!(
        "| kill → a session of the killed worker connected again | {:.2} s | {:.2} s | {:.2} s |",
        reconnect.p50.as_secs_f64(),
        reconnect.p99.as_secs_f64(),
        reconnect.max.as_secs_f64()
    );
    println!(
        "| restart → balanced, the sessions handed to it connected on it | {:.2} s | {:.2} s | {:.2} s |",
        rejoin.p50.as_secs_f64(),
        rejoin.p99.as_secs_f64(),
        rejoin.max.as_secs_f64()
    );
    let mean_throughput = throughputs.iter().sum::<f64>() / throughputs.len().max(1) as f64;
    println!("| reconnect throughput after a kill (all survivors) | {mean_throughput:.0} sessions/s | | |");
    drop(workers);
    store.close().await;
    Ok(())
}

async fn wait<F: AsyncFnMut() -> anyhow::Result<bool>>(limit: Duration, what: &str, mut done: F) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if done().await? {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
