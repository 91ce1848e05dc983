//! The sessions fleet with real `anna worker sessions` processes over Postgres + Redis and the
//! simulator: a worker killed with SIGKILL has its sessions taken over and reconnected by the
//! others, commands sent meanwhile are applied once each and in order, a session never runs on
//! two workers at once (checked from the workers' connection logs), a worker that joins gets
//! its share of partitions, and a worker cut off from its database stops its sessions before
//! its leases expire.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anna::app::Roles;
use serde_json::{Value, json};

use crate::binary::{Running, anna};
use crate::helpers::*;

const ROLES: Roles = Roles { api: true, outbox: true, events: true, sessions: false, webhooks: false };
const PARTITIONS: u32 = 24;
const FAILOVER_MS: u64 = 8000;
const STAGGER_MS: u64 = 10;

fn fleet_vars() -> Vec<(&'static str, String)> {
    vec![
        ("SESSIONS_PARTITIONS", PARTITIONS.to_string()),
        ("SESSIONS_FAILOVER_MS", FAILOVER_MS.to_string()),
        ("SESSIONS_RESUME_STAGGER_MS", STAGGER_MS.to_string()),
        ("SESSIONS_MAX_PER_TENANT", "0".into()),
        ("SESSIONS_SEND_PER_MINUTE", "100000".into()),
        ("SESSIONS_SEND_BURST", "100000".into()),
        ("SESSIONS_SIMULATOR_REPLY_MS", "0".into()),
        ("SESSIONS_SIMULATOR_FIRST_QR_MS", "120000".into()),
    ]
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// Starts `anna worker sessions` with the app's settings, under `worker_id`, its database
/// reached at `database_url` when given.
fn start_worker(app: &TestApp, worker_id: &str, database_url: Option<&str>) -> Running {
    let mut env: HashMap<String, String> = app.env.clone();
    env.insert("SESSIONS_WORKER_ID".into(), worker_id.into());
    env.insert("DATABASE_MAX_CONNECTIONS".into(), "8".into());
    if let Some(url) = database_url {
        env.insert("DATABASE_URL".into(), url.into());
    }
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Running::start(anna(&["worker", "sessions"], &pairs))
}

/// One line of a worker's connection log.
#[derive(Debug, Clone)]
struct Logged {
    what: String,
    session: String,
    worker: String,
    at: u64,
}

fn connection_log(workers: &mut BTreeMap<String, Running>) -> Vec<Logged> {
    let mut log = Vec::new();
    for running in workers.values_mut() {
        running.drain();
        for line in &running.seen {
            let Ok(value) = serde_json::from_str::<Value>(line) else { continue };
            let what = value["message"].as_str().or_else(|| value["fields"]["message"].as_str()).unwrap_or_default();
            if !matches!(what, "session connection opened" | "session connection closed" | "session connected") {
                continue;
            }
            log.push(Logged {
                what: what.to_owned(),
                session: value["session_id"].as_str().unwrap_or_default().to_owned(),
                worker: value["worker_id"].as_str().unwrap_or_default().to_owned(),
                at: value["unix_ms"].as_u64().unwrap_or_default(),
            });
        }
    }
    log.sort_by_key(|l| l.at);
    log
}

/// Checks that no session's connection was ever open on two workers at once. A killed
/// worker's connections end at its death (`killed`: worker and time).
fn assert_never_on_two_workers(log: &[Logged], killed: &[(String, u64)]) {
    // Per session: the worker whose connection is open, from when.
    let mut open: HashMap<&str, (&str, u64)> = HashMap::new();
    let dead_at: HashMap<&str, u64> = killed.iter().map(|(w, at)| (w.as_str(), *at)).collect();
    for line in log.iter().filter(|l| l.what != "session connected") {
        match line.what.as_str() {
            "session connection opened" => {
                if let Some((other, since)) = open.get(line.session.as_str())
                    && *other != line.worker
                {
                    let other_died = dead_at.get(other).is_some_and(|dead| *dead <= line.at);
                    assert!(
                        other_died,
                        "session {} opened on {} at {} while open on {} since {since}",
                        line.session, line.worker, line.at, other
                    );
                }
                open.insert(&line.session, (&line.worker, line.at));
            }
            _ => {
                if open.get(line.session.as_str()).is_some_and(|(w, _)| *w == line.worker) {
                    open.remove(line.session.as_str());
                }
            }
        }
    }
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, limit: Duration, mut done: F) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {limit:?} waiting until {what}");
}

/// Partitions held per live worker.
async fn holdings(app: &TestApp) -> BTreeMap<String, Vec<u32>> {
    let view = app.store.fleet_view().await.unwrap_or_else(|e| panic!("{e}"));
    let mut held: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for p in 0..PARTITIONS {
        if let Some(worker) = view.holder_of(p).and_then(|l| l.worker_id.clone()) {
            held.entry(worker).or_default().push(p);
        }
    }
    held
}

async fn tenant(app: &TestApp) -> String {
    let (_, verified) = app.active_user(&unique_email(), "correct horse battery").await;
    verified.access_token()
}

async fn statuses(app: &TestApp, token: &str) -> HashMap<String, Value> {
    let reply = app.get("/sessions").bearer(token).send().await;
    let list = reply.body["sessions"].as_array().cloned().unwrap_or_default();
    list.into_iter().map(|s| (s["id"].as_str().unwrap_or_default().to_owned(), s)).collect()
}

/// Creates `count` sessions and pairs each with the simulated phone; waits until all are
/// connected.
async fn connected_sessions(app: &TestApp, token: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let started = app.post("/sessions").bearer(token).json(json!({})).send().await;
        assert_eq!(started.status, 202, "{started:?}");
        ids.push(started.body["sessionId"].as_str().unwrap_or_default().to_owned());
    }
    let mut scanned: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let now = statuses(app, token).await;
        for id in &ids {
            let session = now.get(id);
            let status = session.and_then(|s| s["status"].as_str()).unwrap_or_default();
            if status == "pending_qr" && now[id]["qr"].is_string() && !scanned.contains(id) {
                let scan = app.post(&format!("/simulator/sessions/{id}/scan")).bearer(token).send().await;
                assert_eq!(scan.status, 202, "{scan:?}");
                scanned.insert(id.clone());
            }
        }
        if ids.iter().all(|id| now.get(id).is_some_and(|s| s["status"] == "connected")) {
            return ids;
        }
        if Instant::now() > deadline {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for id in &ids {
                let s = now.get(id);
                let key = format!(
                    "{} {}",
                    s.and_then(|s| s["status"].as_str()).unwrap_or("missing"),
                    s.and_then(|s| s["reason"].as_str()).unwrap_or("")
                );
                *counts.entry(key).or_default() += 1;
            }
            panic!("sessions not all connected after 180 s: {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn worker_of(app: &TestApp, token: &str, id: &str) -> Option<String> {
    let reply = app.get(&format!("/sessions/{id}")).bearer(token).send().await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body["worker"]["id"].as_str().map(str::to_owned)
}

/// Sends `count` messages to each session, one after the other; returns their command ids in
/// sending order.
async fn send_messages(app: &TestApp, token: &str, sessions: &[String], count: usize) -> Vec<(String, Vec<String>)> {
    let mut sent = Vec::new();
    for id in sessions {
        let mut commands = Vec::new();
        for n in 0..count {
            let reply = app
                .post(&format!("/sessions/{id}/messages"))
                .bearer(token)
                .json(json!({"to": "4915100000001", "content": format!("message {n}")}))
                .send()
                .await;
            assert_eq!(reply.status, 202, "{reply:?}");
            commands.push(reply.body["commandId"].as_str().unwrap_or_default().to_owned());
        }
        sent.push((id.clone(), commands));
    }
    sent
}

/// Waits until every command has its outcome, then checks: one outcome per command, every one
/// `session.message.sent`, in the order the commands were sent.
async fn assert_applied_once_in_order(app: &TestApp, sent: &[(String, Vec<String>)]) {
    for (session, commands) in sent {
        let mut outcomes = Vec::new();
        wait_until(&format!("the messages of {session} are sent"), Duration::from_secs(60), async || {
            let records = app.store.outbox_events_for_aggregate(session).await.unwrap_or_else(|e| panic!("{e}"));
            outcomes = records
                .into_iter()
                .filter(|r| {
                    r.event.event_name.starts_with("session.message.sent")
                        || r.event.event_name == "session.message.failed"
                })
                .map(|r| {
                    (r.event.event_name.clone(), r.event.payload["commandId"].as_str().unwrap_or_default().to_owned())
                })
                .filter(|(_, command)| commands.contains(command))
                .collect();
            outcomes.len() >= commands.len()
        })
        .await;
        let order: Vec<&String> = outcomes.iter().map(|(_, c)| c).collect();
        assert_eq!(order, commands.iter().collect::<Vec<_>>(), "{session}: once each, in order: {outcomes:?}");
        assert!(outcomes.iter().all(|(name, _)| name == "session.message.sent"), "{session}: {outcomes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_is_replaced_and_a_new_one_gets_its_share() {
    let vars = fleet_vars();
    let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_roles(Backend::Postgres, &pairs, ROLES).await;
    let mut workers: BTreeMap<String, Running> = BTreeMap::new();
    for id in ["w1", "w2", "w3"] {
        workers.insert(id.into(), start_worker(&app, id, None));
    }
    wait_until("three workers hold a third of the partitions each", Duration::from_secs(60), async || {
        let held = holdings(&app).await;
        held.len() == 3 && held.values().all(|p| p.len() == (PARTITIONS / 3) as usize)
    })
    .await;

    let token = tenant(&app).await;
    let ids = connected_sessions(&app, &token, 300).await;
    let mut placement: HashMap<String, String> = HashMap::new();
    for id in &ids {
        placement.insert(id.clone(), worker_of(&app, &token, id).await.unwrap_or_else(|| panic!("{id}: no worker")));
    }
    let victims: Vec<String> = ids.iter().filter(|id| placement[*id] == "w1").cloned().collect();
    let others: Vec<String> = ids.iter().filter(|id| placement[*id] != "w1").take(5).cloned().collect();
    assert!(victims.len() > 50, "w1 holds {} of 300 sessions", victims.len());

    // SIGKILL while commands for its sessions are arriving: some are in flight in the killed
    // worker (delivered, not acknowledged), the rest wait in the streams of partitions nobody
    // serves. No lease is released, no connection closed cleanly.
    let killed_at = std::cell::Cell::new(0);
    let w1 = workers.get_mut("w1").map(|w| &mut w.child);
    let kill = async {
        tokio::time::sleep(Duration::from_millis(40)).await;
        killed_at.set(unix_ms());
        if let Some(child) = w1 {
            child.kill().unwrap_or_else(|e| panic!("kill: {e}"));
            let _ = child.wait();
        }
    };
    let (during, ()) = tokio::join!(send_messages(&app, &token, &victims[..30], 3), kill);
    let killed_at = killed_at.get();
    let unaffected = send_messages(&app, &token, &others, 3).await;
    let took_over = |workers: &mut BTreeMap<String, Running>| {
        workers
            .values_mut()
            .map(|w| {
                w.drain();
                w.seen.iter().filter(|l| l.contains("took over pending entries")).count()
            })
            .sum::<usize>()
    };

    let victim_set: HashSet<&String> = victims.iter().collect();
    let mut reconnected: HashMap<String, u64> = HashMap::new();
    wait_until("every session of the killed worker is connected again", Duration::from_secs(60), async || {
        for line in connection_log(&mut workers) {
            if line.what == "session connected" && line.at > killed_at && victim_set.contains(&line.session) {
                assert_ne!(line.worker, "w1");
                reconnected.entry(line.session.clone()).or_insert(line.at);
            }
        }
        reconnected.len() == victims.len()
    })
    .await;
    let slowest = reconnected.values().max().copied().unwrap_or_default() - killed_at;
    let fastest = reconnected.values().min().copied().unwrap_or_default() - killed_at;
    println!(
        "failover: {} sessions of the killed worker reconnected {fastest}–{slowest} ms after the kill \
         (SESSIONS_FAILOVER_MS={FAILOVER_MS}, stagger {STAGGER_MS} ms)",
        victims.len()
    );
    // The partitions are taken over within the failover time; their sessions then reconnect
    // one every STAGGER_MS per survivor (and a simulated connect takes 300 ms).
    let budget = FAILOVER_MS + STAGGER_MS * victims.len() as u64 + 2000;
    assert!(slowest <= budget, "reconnected after {slowest} ms (budget {budget} ms)");
    let held = holdings(&app).await;
    assert!(!held.contains_key("w1"), "{held:?}");
    assert_eq!(held.values().map(Vec::len).sum::<usize>(), PARTITIONS as usize, "{held:?}");
    for id in &victims {
        assert_ne!(worker_of(&app, &token, id).await.as_deref(), Some("w1"));
    }
    assert_applied_once_in_order(&app, &during).await;
    assert_applied_once_in_order(&app, &unaffected).await;
    println!("partitions whose pending commands were taken over: {}", took_over(&mut workers));

    // A fourth worker joins: it gets its share, handed over by the others after they stop
    // those sessions; none is lost or doubled.
    let joined_at = unix_ms();
    workers.insert("w4".into(), start_worker(&app, "w4", None));
    wait_until("the new worker holds its share", Duration::from_secs(60), async || {
        let held = holdings(&app).await;
        held.get("w4").map(Vec::len) == Some((PARTITIONS / 3) as usize)
            && held.values().all(|p| p.len() == (PARTITIONS / 3) as usize)
    })
    .await;
    let mut moved: Vec<String> = Vec::new();
    for id in &ids {
        if worker_of(&app, &token, id).await.as_deref() == Some("w4") {
            moved.push(id.clone());
        }
    }
    assert!(!moved.is_empty());
    let moved_set: HashSet<&String> = moved.iter().collect();
    wait_until("the moved sessions are connected on the new worker", Duration::from_secs(60), async || {
        let log = connection_log(&mut workers);
        let on_w4: HashSet<&String> = log
            .iter()
            .filter(|l| l.what == "session connected" && l.worker == "w4" && l.at > joined_at)
            .map(|l| &l.session)
            .collect();
        moved_set.iter().all(|id| on_w4.contains(*id))
    })
    .await;
    let after_join = send_messages(&app, &token, &moved[..moved.len().min(10)], 2).await;
    assert_applied_once_in_order(&app, &after_join).await;

    let now = statuses(&app, &token).await;
    assert!(ids.iter().all(|id| now[id]["status"] == "connected"), "a session was lost");
    let log = connection_log(&mut workers);
    assert_never_on_two_workers(&log, &[("w1".into(), killed_at)]);
    // Every session's connection is open on exactly one live worker.
    let mut open_on: HashMap<&str, HashSet<&str>> = HashMap::new();
    for line in log.iter().filter(|l| l.worker != "w1") {
        match line.what.as_str() {
            "session connection opened" => {
                open_on.entry(&line.session).or_default().insert(&line.worker);
            }
            "session connection closed" => {
                open_on.entry(&line.session).or_default().remove(line.worker.as_str());
            }
            _ => {}
        }
    }
    for id in &ids {
        let on = open_on.get(id.as_str()).map(HashSet::len).unwrap_or_default();
        assert_eq!(on, 1, "{id} is open on {on} workers");
    }

    // The operator's view.
    let pairs: Vec<(&str, &str)> = app.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let status = anna(&["fleet", "status"], &pairs).output().unwrap_or_else(|e| panic!("fleet status: {e}"));
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{printed}");
    assert!(printed.contains("sessions workers: 3 live"), "{printed}");
    for worker in ["w2", "w3", "w4"] {
        let line = printed.lines().find(|l| l.starts_with(worker)).unwrap_or_else(|| panic!("{worker}: {printed}"));
        let held: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(held.get(4).copied(), Some("8"), "{line}");
    }
    assert!(printed.contains("every partition is held"), "{printed}");

    // Graceful stops give every lease back.
    for (id, running) in workers.iter_mut().filter(|(id, _)| *id != "w1") {
        assert!(running.terminate().success(), "{id} did not stop cleanly");
    }
    assert!(holdings(&app).await.is_empty(), "leases left after graceful stops");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_cut_off_from_its_database_stops_its_sessions_before_its_leases_expire() {
    let mut vars = fleet_vars();
    // The phones' histories are still being stored when the cable is cut: the worker leaves
    // transactions open, holding locks, that Postgres must end for the rescue to take over.
    vars.push(("SESSIONS_SIMULATOR_HISTORY_MESSAGES", "3000".into()));
    vars.push(("DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS", "5000".into()));
    let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_roles(Backend::Postgres, &pairs, ROLES).await;
    // The worker reaches Postgres through a proxy the test can cut.
    let url = app.env["DATABASE_URL"].clone();
    let authority = url.split('@').nth(1).and_then(|rest| rest.split('/').next()).unwrap_or_default().to_owned();
    let upstream: std::net::SocketAddr = authority.parse().unwrap_or_else(|e| panic!("{authority}: {e}"));
    let proxy = anna_testkit::partition::Proxy::start(upstream).await;
    let proxied = url.replace(&authority, &proxy.addr().to_string());
    let mut workers: BTreeMap<String, Running> = BTreeMap::new();
    workers.insert("cut".into(), start_worker(&app, "cut", Some(&proxied)));
    wait_until("the worker holds every partition", Duration::from_secs(60), async || {
        holdings(&app).await.get("cut").map(Vec::len) == Some(PARTITIONS as usize)
    })
    .await;
    let token = tenant(&app).await;
    let ids = connected_sessions(&app, &token, 12).await;

    proxy.cut();
    let cut_at = unix_ms();
    // The latest expiry among its leases, on the database's clock (this machine's clock).
    let view = app.store.fleet_view().await.unwrap_or_else(|e| panic!("{e}"));
    let expires_at = view.leases.iter().map(|l| l.expires_at_ms).max().unwrap_or_default() as u64;
    let earliest_expiry = view.leases.iter().map(|l| l.expires_at_ms).min().unwrap_or_default() as u64;
    let mut closed: HashMap<String, u64> = HashMap::new();
    wait_until("the cut-off worker closes every session", Duration::from_secs(30), async || {
        for line in connection_log(&mut workers) {
            if line.what == "session connection closed" && line.at >= cut_at {
                closed.entry(line.session.clone()).or_insert(line.at);
            }
        }
        ids.iter().all(|id| closed.contains_key(id))
    })
    .await;
    let last_close = closed.values().max().copied().unwrap_or_default();
    println!(
        "self-fencing: {} sessions closed {}–{} ms after the cut; leases expire {}–{} ms after it",
        ids.len(),
        closed.values().min().copied().unwrap_or_default() - cut_at,
        last_close - cut_at,
        earliest_expiry.saturating_sub(cut_at),
        expires_at.saturating_sub(cut_at)
    );
    assert!(last_close < earliest_expiry, "closed at {last_close}, a lease expired at {earliest_expiry}");

    // Once the leases expire, another worker takes the sessions over.
    workers.insert("rescue".into(), start_worker(&app, "rescue", None));
    wait_until("the other worker reconnects the sessions", Duration::from_secs(60), async || {
        let log = connection_log(&mut workers);
        let on_rescue: HashSet<&String> =
            log.iter().filter(|l| l.what == "session connected" && l.worker == "rescue").map(|l| &l.session).collect();
        ids.iter().all(|id| on_rescue.contains(id))
    })
    .await;
    assert_never_on_two_workers(&connection_log(&mut workers), &[]);
    for running in workers.values_mut() {
        let _ = running.child.kill();
        let _ = running.child.wait();
    }
    app.stop().await;
}
