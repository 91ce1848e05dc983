//! Webhooks end to end: endpoints over REST, deliveries of tenant events to local receivers
//! that answer, fail, hang, close the connection, answer slowly and recover; signatures checked
//! by the Standard Webhooks reference library (Python); retries, dead letters, replays, the
//! circuit breaker, ordered delivery and the delivery log.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use anna_testkit::webhook_receiver::{Behaviour, Received, WebhookReceiver};
use serde_json::{Value, json};

use crate::helpers::*;
use crate::on_both_backends;

/// Fast retries and timeouts; receivers live on loopback.
const VARS: &[(&str, &str)] = &[
    ("WEBHOOKS_ALLOW_PRIVATE", "true"),
    ("WEBHOOKS_POLL_MS", "100"),
    ("WEBHOOKS_RETRY_BASE_MS", "100"),
    ("WEBHOOKS_RETRY_MAX_MS", "300"),
    ("WEBHOOKS_TIMEOUT_MS", "1000"),
    ("WEBHOOKS_CONNECT_TIMEOUT_MS", "500"),
];

fn vars(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    VARS.iter().chain(extra).copied().collect()
}

async fn tenant(app: &TestApp) -> String {
    let (_, verified) = app.active_user(&unique_email(), "correct horse battery").await;
    verified.access_token()
}

/// Creates an endpoint; returns (id, secret).
async fn endpoint(app: &TestApp, token: &str, body: Value) -> (String, String) {
    let reply = app.post("/webhooks").bearer(token).json(body).send().await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let id = reply.body["id"].as_str().unwrap_or_default().to_owned();
    let secret = reply.body["secret"].as_str().unwrap_or_default().to_owned();
    (id, secret)
}

/// Starts a session: `session.created`, then the simulator's `session.qr.updated`.
async fn start_session(app: &TestApp, token: &str) -> String {
    let started = app.post("/sessions").bearer(token).send().await;
    assert_eq!(started.status, 202, "{started:?}");
    started.body["sessionId"].as_str().unwrap_or_default().to_owned()
}

fn of_type(kind: &'static str) -> impl Fn(&Received) -> bool {
    move |r| r.json()["type"] == kind
}

/// Verifies every request with the Standard Webhooks reference library for Python, with the
/// secret given; panics with the library's answer otherwise. Not a Rust reimplementation: the
/// point is that receivers in other languages accept anna's signatures.
fn verify_with_reference_library(secret: &str, requests: &[Received]) {
    let items: Vec<Value> = requests
        .iter()
        .map(|r| {
            json!({
                "body": String::from_utf8_lossy(&r.body),
                "headers": {
                    "webhook-id": r.header("webhook-id"),
                    "webhook-timestamp": r.header("webhook-timestamp"),
                    "webhook-signature": r.header("webhook-signature"),
                },
            })
        })
        .collect();
    let script = "import json, sys\n\
                  from standardwebhooks.webhooks import Webhook\n\
                  hook = Webhook(sys.argv[1])\n\
                  items = json.load(sys.stdin)\n\
                  for item in items:\n\
                  \x20   hook.verify(item['body'], item['headers'])\n\
                  print('verified', len(items))\n";
    let mut child = Command::new("python3")
        .args(["-c", script, secret])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 is needed to verify signatures: {e}"));
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(json!(items).to_string().as_bytes()).expect("write to python");
    }
    let output = child.wait_with_output().expect("python output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains(&format!("verified {}", requests.len())),
        "the Standard Webhooks library refused a delivery (install it with `pip install standardwebhooks==1.1.0`, \
         as scripts/test does):\n{stdout}\n{stderr}"
    );
}

async fn delivery_log(app: &TestApp, token: &str, id: &str, query: &str) -> Value {
    let reply = app.get(&format!("/webhooks/{id}/deliveries{query}")).bearer(token).send().await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body
}

/// Polls the delivery log until one delivery of `event_name` has `status`; returns it.
async fn delivery_with_status(app: &TestApp, token: &str, id: &str, event_name: &str, status: &str) -> Value {
    for _ in 0..300 {
        let log = delivery_log(app, token, id, "").await;
        let found = log["deliveries"]
            .as_array()
            .and_then(|all| all.iter().find(|d| d["eventName"] == event_name && d["status"] == status).cloned());
        if let Some(delivery) = found {
            return delivery;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {status} delivery of {event_name}: {}", delivery_log(app, token, id, "").await);
}

async fn signed_deliveries_verified_by_the_reference_library(backend: Backend) {
    let app = spawn_app_with(backend, &vars(&[])).await;
    let receiver = WebhookReceiver::start().await;
    let token = tenant(&app).await;
    let other = tenant(&app).await;
    let (id, secret) = endpoint(&app, &token, json!({"url": receiver.url("/hooks"), "events": ["session.*"]})).await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    // Another tenant's endpoint hears nothing of this tenant's sessions.
    let other_receiver = WebhookReceiver::start().await;
    endpoint(&app, &other, json!({"url": other_receiver.url("/")})).await;

    let session = start_session(&app, &token).await;
    let created = receiver.wait_for(1, Duration::from_secs(20), of_type("session.created")).await;
    let first = &created[0];
    assert_eq!(first.path, "/hooks");
    assert_eq!(first.header("content-type"), "application/json");
    let body = first.json();
    assert_eq!(body["sessionId"], session.as_str());
    assert_eq!(body["eventId"], first.header("webhook-id"));
    assert!(body["timestamp"].is_string() && body["data"]["tenantId"].is_string(), "{body}");
    assert!(first.header("webhook-signature").starts_with("v1,"));
    receiver.wait_for(1, Duration::from_secs(20), of_type("session.qr.updated")).await;
    verify_with_reference_library(&secret, &receiver.received());

    // The log shows the delivery, succeeded at the first attempt with the receiver's answer.
    let delivered = delivery_with_status(&app, &token, &id, "session.created", "succeeded").await;
    assert_eq!(delivered["eventId"], first.header("webhook-id"));
    assert_eq!(delivered["attempts"], 1);
    assert_eq!(delivered["lastAttempt"]["statusCode"], 200);
    assert_eq!(delivered["lastAttempt"]["responseBody"], "ok");

    // Rotation: the next deliveries carry both signatures, each verifiable on its own.
    let rotated = app.post(&format!("/webhooks/{id}/secret/rotate")).bearer(&token).send().await;
    assert_eq!(rotated.status, 200, "{rotated:?}");
    let new_secret = rotated.body["secret"].as_str().unwrap_or_default().to_owned();
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);
    assert!(rotated.body["previousSecretExpiresAt"].is_string());
    let before = receiver.count();
    start_session(&app, &token).await;
    let after: Vec<Received> =
        receiver.wait_for(before + 1, Duration::from_secs(20), |_| true).await.into_iter().skip(before).collect();
    assert_eq!(after[0].header("webhook-signature").split(' ').count(), 2, "{:?}", after[0].headers);
    verify_with_reference_library(&new_secret, &after);
    verify_with_reference_library(&secret, &after);

    // The other tenant hears of its own endpoint only.
    let heard: Vec<Value> = other_receiver.received().iter().map(Received::json).collect();
    assert!(heard.iter().all(|event| event["type"] == "webhook.created"), "{heard:?}");
    app.stop().await;
}

async fn endpoints_over_rest(backend: Backend) {
    let app = spawn_app_with(backend, &vars(&[("WEBHOOKS_MAX_PER_TENANT", "2")])).await;
    let token = tenant(&app).await;
    let other = tenant(&app).await;
    let idempotent = app
        .post("/webhooks")
        .bearer(&token)
        .header("Idempotency-Key", "create-1")
        .json(json!({"url": "https://example.com/a", "events": ["session.message.*"], "description": "CRM"}))
        .send()
        .await;
    assert_eq!(idempotent.status, 201, "{idempotent:?}");
    let id = idempotent.body["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(idempotent.body["events"], json!(["session.message.*"]));
    assert_eq!(idempotent.body["enabled"], true);
    assert_eq!(idempotent.body["ordered"], false);
    assert_eq!(idempotent.body["circuit"]["state"], "closed");
    // A repeat gets the first answer, but never the secret again.
    let repeat = app
        .post("/webhooks")
        .bearer(&token)
        .header("Idempotency-Key", "create-1")
        .json(json!({"url": "https://example.com/a", "events": ["session.message.*"], "description": "CRM"}))
        .send()
        .await;
    assert_eq!(repeat.status, 201);
    assert_eq!(repeat.body["id"], id.as_str());
    assert_eq!(repeat.body["secret"], Value::Null);
    assert!(!repeat.text.contains("whsec_"));

    let listed = app.get("/webhooks").bearer(&token).send().await;
    assert_eq!(listed.body["webhooks"].as_array().map(Vec::len), Some(1));
    assert!(!listed.text.contains("whsec_") && !listed.text.contains("secret\""), "{}", listed.text);
    let patched = app
        .patch(&format!("/webhooks/{id}"))
        .bearer(&token)
        .json(json!({"enabled": false, "ordered": true, "events": ["*"]}))
        .send()
        .await;
    assert_eq!(patched.status, 200, "{patched:?}");
    assert_eq!((patched.body["enabled"].clone(), patched.body["ordered"].clone()), (json!(false), json!(true)));

    // Another tenant: 404 everywhere.
    for reply in [
        app.get(&format!("/webhooks/{id}")).bearer(&other).send().await,
        app.patch(&format!("/webhooks/{id}")).bearer(&other).json(json!({"enabled": true})).send().await,
        app.delete(&format!("/webhooks/{id}")).bearer(&other).send().await,
        app.get(&format!("/webhooks/{id}/deliveries")).bearer(&other).send().await,
        app.post(&format!("/webhooks/{id}/secret/rotate")).bearer(&other).send().await,
        app.post(&format!("/webhooks/{id}/deliveries/replay")).bearer(&other).send().await,
    ] {
        assert_eq!(reply.status, 404, "{reply:?}");
        assert_eq!(reply.body["code"], "webhook_not_found");
    }
    assert_eq!(app.get("/webhooks").bearer(&other).send().await.body["webhooks"], json!([]));

    // Bad input: a clear 4xx each.
    for (body, status, needle) in [
        (json!({"url": "ftp://example.com"}), 422, "http or https"),
        (json!({"url": "https://user:pw@example.com/"}), 422, "credentials"),
        (json!({"events": ["*"]}), 422, "url is required"),
        (json!({"url": "https://example.com", "events": []}), 422, "at least one"),
        (json!({"url": "https://example.com", "events": ["session.nope"]}), 422, "not an event webhooks deliver"),
        (json!({"url": "https://example.com", "events": ["user.registered"]}), 422, "not an event webhooks deliver"),
        (json!({"url": "https://example.com", "colour": "red"}), 422, "unknown field"),
        (json!({"url": "https://example.com", "description": "x".repeat(501)}), 422, "longer than 500"),
    ] {
        let reply = app.post("/webhooks").bearer(&token).json(body.clone()).send().await;
        assert_eq!(reply.status, status, "{body}: {reply:?}");
        assert!(reply.body["message"].as_str().unwrap_or_default().contains(needle), "{body}: {reply:?}");
    }
    let not_json = app.post("/webhooks").bearer(&token).raw("text/plain", "url=x").send().await;
    assert_eq!(not_json.status, 415);
    assert_eq!(app.get("/webhooks/not-a-uuid").bearer(&token).send().await.status, 400);
    let bad_limit = app.get(&format!("/webhooks/{id}/deliveries?limit=1000")).bearer(&token).send().await;
    assert_eq!(bad_limit.status, 400, "{bad_limit:?}");
    let bad_status = app.get(&format!("/webhooks/{id}/deliveries?status=lost")).bearer(&token).send().await;
    assert_eq!(bad_status.status, 400);
    assert_eq!(app.get("/webhooks").send().await.status, 401);

    // The per-tenant limit.
    endpoint(&app, &token, json!({"url": "https://example.com/b"})).await;
    let third = app.post("/webhooks").bearer(&token).json(json!({"url": "https://example.com/c"})).send().await;
    assert_eq!(third.status, 409, "{third:?}");

    assert_eq!(app.delete(&format!("/webhooks/{id}")).bearer(&token).send().await.status, 204);
    assert_eq!(app.get(&format!("/webhooks/{id}")).bearer(&token).send().await.status, 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_unless_allowed() {
    let app = spawn_app(Backend::Sqlite).await;
    let token = tenant(&app).await;
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.7/",
        "http://192.168.1.10/",
        "http://localhost:3000/",
        "http://[::ffff:127.0.0.1]/",
    ] {
        let reply = app.post("/webhooks").bearer(&token).json(json!({"url": url})).send().await;
        assert_eq!(reply.status, 422, "{url}: {reply:?}");
        assert!(reply.body["message"].as_str().unwrap_or_default().contains("may not call"), "{url}: {reply:?}");
    }
    app.stop().await;
}

async fn failures_are_retried_dead_lettered_and_replayed(backend: Backend) {
    let app =
        spawn_app_with(backend, &vars(&[("WEBHOOKS_MAX_ATTEMPTS", "3"), ("WEBHOOKS_CIRCUIT_FAILURES", "0")])).await;
    let receiver = WebhookReceiver::start().await;
    receiver.set(Behaviour::Answer { status: 500, body: "database down".into() });
    let token = tenant(&app).await;
    let (id, _) = endpoint(&app, &token, json!({"url": receiver.url("/"), "events": ["session.created"]})).await;
    start_session(&app, &token).await;
    let dead = delivery_with_status(&app, &token, &id, "session.created", "dead").await;
    assert_eq!(dead["attempts"], 3);
    assert_eq!(dead["lastAttempt"]["statusCode"], 500);
    assert_eq!(dead["lastAttempt"]["responseBody"], "database down");
    let attempts = receiver.received();
    assert_eq!(attempts.len(), 3);
    // Every attempt carries the same webhook-id: the receiver's idempotency key.
    assert!(attempts.iter().all(|r| r.header("webhook-id") == attempts[0].header("webhook-id")));
    // Backoff: the attempts are spread out (100 ms base, doubling).
    assert!(attempts[2].at.duration_since(attempts[0].at) >= Duration::from_millis(150));
    let delivery = dead["id"].as_str().unwrap_or_default();
    let detail = app.get(&format!("/webhooks/{id}/deliveries/{delivery}")).bearer(&token).send().await;
    assert_eq!(detail.body["attemptsLog"].as_array().map(Vec::len), Some(3), "{detail:?}");
    assert_eq!(delivery_log(&app, &token, &id, "?status=dead").await["deliveries"].as_array().map(Vec::len), Some(1));

    // The receiver recovers; a replay delivers the same event.
    receiver.set(Behaviour::ok());
    let replay = app.post(&format!("/webhooks/{id}/deliveries/{delivery}/replay")).bearer(&token).send().await;
    assert_eq!(replay.status, 202, "{replay:?}");
    let replayed = receiver.wait_for(1, Duration::from_secs(20), |r| r.answered_with == Behaviour::ok()).await;
    assert_eq!(replayed[0].header("webhook-id"), attempts[0].header("webhook-id"));
    let done = delivery_with_status(&app, &token, &id, "session.created", "succeeded").await;
    assert_eq!(done["attempts"], 4);
    // Replaying a delivery that is not finished is refused; an unknown one is a 404.
    let unknown =
        app.post(&format!("/webhooks/{id}/deliveries/{}/replay", uuid::Uuid::now_v7())).bearer(&token).send().await;
    assert_eq!(unknown.status, 404, "{unknown:?}");

    // Bulk replay of the dead ones.
    receiver.set(Behaviour::status(503));
    start_session(&app, &token).await;
    start_session(&app, &token).await;
    let mut dead = 0;
    for _ in 0..300 {
        dead = delivery_log(&app, &token, &id, "?status=dead").await["deliveries"].as_array().map_or(0, Vec::len);
        if dead == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead, 2, "{}", delivery_log(&app, &token, &id, "").await);
    receiver.set(Behaviour::ok());
    let bulk = app.post(&format!("/webhooks/{id}/deliveries/replay")).bearer(&token).json(json!({})).send().await;
    assert_eq!(bulk.status, 202, "{bulk:?}");
    assert_eq!(bulk.body["replayed"], 2);
    receiver.wait_for(3, Duration::from_secs(20), |r| r.answered_with == Behaviour::ok()).await;
    for _ in 0..300 {
        let succeeded = delivery_log(&app, &token, &id, "?status=succeeded").await;
        if succeeded["deliveries"].as_array().map(Vec::len) == Some(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = delivery_log(&app, &token, &id, "?status=succeeded&limit=2").await;
    assert_eq!(page["deliveries"].as_array().map(Vec::len), Some(2));
    let cursor = page["nextCursor"].as_str().unwrap_or_default().to_owned();
    let next = delivery_log(&app, &token, &id, &format!("?status=succeeded&limit=2&cursor={cursor}")).await;
    assert_eq!(next["deliveries"].as_array().map(Vec::len), Some(1), "{next}");
    assert_eq!(next["nextCursor"], Value::Null);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_receiver_opens_its_circuit_without_holding_up_the_others() {
    let app = spawn_app_with(
        Backend::Postgres,
        &vars(&[
            ("WEBHOOKS_CIRCUIT_FAILURES", "3"),
            ("WEBHOOKS_CIRCUIT_OPEN_MS", "1500"),
            ("WEBHOOKS_TIMEOUT_MS", "800"),
            ("WEBHOOKS_ENDPOINT_CONCURRENCY", "2"),
        ]),
    )
    .await;
    let hanging = WebhookReceiver::start().await;
    hanging.set(Behaviour::Hang);
    let healthy = WebhookReceiver::start().await;
    let token = tenant(&app).await;
    let (dead_id, _) = endpoint(&app, &token, json!({"url": hanging.url("/"), "events": ["session.created"]})).await;
    endpoint(&app, &token, json!({"url": healthy.url("/"), "events": ["session.created"]})).await;
    for _ in 0..8 {
        start_session(&app, &token).await;
    }
    // The healthy receiver gets everything while the other one hangs.
    healthy.wait_for(8, Duration::from_secs(10), |_| true).await;
    let mut circuit = Value::Null;
    for _ in 0..200 {
        circuit = app.get(&format!("/webhooks/{dead_id}")).bearer(&token).send().await.body["circuit"].clone();
        if circuit["state"] == "open" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(circuit["state"], "open", "{circuit}");
    let timed_out = delivery_log(&app, &token, &dead_id, "").await;
    assert!(timed_out.to_string().contains("timed out"), "{timed_out}");
    // While open, nothing is sent to it.
    let seen = hanging.count();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(hanging.count(), seen);

    // It closes the connection instead, then recovers: a probe goes, succeeds, the rest follow.
    hanging.queue(vec![Behaviour::Close]);
    hanging.set(Behaviour::ok());
    hanging.wait_for(8, Duration::from_secs(30), |r| r.answered_with == Behaviour::ok()).await;
    // The receiver has answered; each success is recorded just after, so wait for the log to show all 8.
    let mut all = Value::Null;
    for _ in 0..200 {
        all = delivery_log(&app, &token, &dead_id, "?status=succeeded").await;
        if all["deliveries"].as_array().map(Vec::len) == Some(8) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = app.get(&format!("/webhooks/{dead_id}")).bearer(&token).send().await.body;
    assert_eq!(body["circuit"]["state"], "closed", "{body}");
    assert_eq!(all["deliveries"].as_array().map(Vec::len), Some(8), "{all}");
    let closed = hanging.received().iter().any(|r| r.answered_with == Behaviour::Close);
    assert!(closed);
    // The attempts log of each delivery tells what went wrong: timeouts, the closed connection.
    let mut errors = Vec::new();
    for delivery in all["deliveries"].as_array().cloned().unwrap_or_default() {
        let path = format!("/webhooks/{dead_id}/deliveries/{}", delivery["id"].as_str().unwrap_or_default());
        let detail = app.get(&path).bearer(&token).send().await.body;
        for attempt in detail["attemptsLog"].as_array().cloned().unwrap_or_default() {
            errors.extend(attempt["error"].as_str().map(str::to_owned));
        }
    }
    assert!(errors.iter().any(|e| e.contains("timed out")), "{errors:?}");
    assert!(errors.iter().any(|e| !e.contains("timed out")), "the closed connection is not in the log: {errors:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_redirecting_receivers() {
    let settings =
        vars(&[("WEBHOOKS_MAX_ATTEMPTS", "1"), ("WEBHOOKS_TIMEOUT_MS", "600"), ("WEBHOOKS_RESPONSE_MAX_BYTES", "16")]);
    let app = spawn_app_with(Backend::Sqlite, &settings).await;
    let receiver = WebhookReceiver::start().await;
    let token = tenant(&app).await;
    let (id, _) = endpoint(&app, &token, json!({"url": receiver.url("/"), "events": ["session.created"]})).await;
    // A long answer is read up to WEBHOOKS_RESPONSE_MAX_BYTES, and the log keeps that much.
    receiver.queue(vec![Behaviour::Answer { status: 200, body: "y".repeat(100_000) }]);
    start_session(&app, &token).await;
    let long = delivery_with_status(&app, &token, &id, "session.created", "succeeded").await;
    assert_eq!(long["lastAttempt"]["responseBody"], "y".repeat(16));
    // Slow but within the timeout: delivered.
    receiver.queue(vec![Behaviour::Slow { delay: Duration::from_millis(300), status: 204 }]);
    start_session(&app, &token).await;
    let mut slow = Value::Null;
    for _ in 0..200 {
        let log = delivery_log(&app, &token, &id, "?status=succeeded").await;
        let found = log["deliveries"]
            .as_array()
            .and_then(|all| all.iter().find(|d| d["lastAttempt"]["statusCode"] == 204).cloned());
        if let Some(found) = found {
            slow = found;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(slow["lastAttempt"]["latencyMs"].as_u64().unwrap_or_default() >= 300, "{slow}");
    // A redirect is not followed (it could lead into the private network): a failure.
    receiver.queue(vec![Behaviour::Redirect("http://169.254.169.254/latest".into())]);
    start_session(&app, &token).await;
    let redirected = delivery_with_status(&app, &token, &id, "session.created", "dead").await;
    assert!(redirected["lastAttempt"]["error"].as_str().unwrap_or_default().contains("redirects are not followed"));
    assert_eq!(receiver.count(), 3, "the redirect was followed: {:?}", receiver.received());
    // Slower than the timeout: a failure that says so.
    receiver.queue(vec![Behaviour::Slow { delay: Duration::from_millis(1500), status: 200 }]);
    start_session(&app, &token).await;
    for _ in 0..100 {
        let log = delivery_log(&app, &token, &id, "?status=dead").await;
        if log["deliveries"].as_array().map(Vec::len) == Some(2) {
            assert!(log.to_string().contains("timed out"), "{log}");
            app.stop().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the slow delivery was not dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_endpoint_delivers_each_session_in_order() {
    let app = spawn_app_with(Backend::Postgres, &vars(&[("WEBHOOKS_CIRCUIT_FAILURES", "0")])).await;
    let receiver = WebhookReceiver::start().await;
    // The first two attempts fail: later events of the session must wait for them.
    receiver.queue(vec![Behaviour::status(500), Behaviour::status(500)]);
    let token = tenant(&app).await;
    endpoint(&app, &token, json!({"url": receiver.url("/"), "ordered": true, "events": ["session.*"]})).await;
    let sessions = [start_session(&app, &token).await, start_session(&app, &token).await];
    // Each session yields session.created then at least two QR codes (3 s, then 1 s apart).
    tokio::time::sleep(Duration::from_secs(5)).await;
    for session in &sessions {
        let stopped = app.post(&format!("/sessions/{session}/stop")).bearer(&token).send().await;
        assert_eq!(stopped.status, 202);
    }
    receiver
        .wait_for(6, Duration::from_secs(30), |r| r.answered_with == Behaviour::ok() && r.json()["type"] != "")
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The order to keep is the order of the domain-event stream (commit order), which is not
    // always the order of the events' timestamps.
    let stream = &app.env["EVENTS_STREAM"];
    let entries = app.stream.read_after(stream, "0", 10_000, Duration::ZERO).await.expect("read the stream");
    let place: HashMap<String, usize> = entries
        .iter()
        .enumerate()
        .filter_map(|(n, entry)| entry.fields.get("eventId").map(|id| (id.clone(), n)))
        .collect();
    let mut per_session: HashMap<String, Vec<(usize, String)>> = HashMap::new();
    for request in receiver.received().iter().filter(|r| r.answered_with == Behaviour::ok()) {
        let body = request.json();
        let event_id = body["eventId"].as_str().unwrap_or_default();
        per_session.entry(body["sessionId"].as_str().unwrap_or_default().to_owned()).or_default().push((
            place.get(event_id).copied().unwrap_or_else(|| panic!("{event_id} is not in the stream")),
            body["type"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    for session in &sessions {
        let delivered = per_session.get(session).cloned().unwrap_or_default();
        assert!(delivered.len() >= 3, "{session}: {delivered:?}");
        assert_eq!(delivered[0].1, "session.created", "{delivered:?}");
        let mut sorted = delivered.clone();
        sorted.sort();
        assert_eq!(delivered, sorted, "{session} delivered out of stream order");
    }
    app.stop().await;
}

on_both_backends!(
    signed_deliveries_verified_by_the_reference_library,
    endpoints_over_rest,
    failures_are_retried_dead_lettered_and_replayed
);

/// `anna worker webhooks` killed with SIGKILL while a delivery waits for its retry, and while
/// new events arrive: a new worker delivers everything, the retried delivery with the same
/// `webhook-id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_webhooks_worker_loses_nothing() {
    use crate::binary::{Running, anna};
    let roles = anna::app::Roles { api: true, outbox: true, events: true, ..anna::app::Roles::NONE };
    let extra = [("WEBHOOKS_RETRY_BASE_MS", "1500"), ("WEBHOOKS_RETRY_MAX_MS", "1500")];
    let settings: Vec<(&str, &str)> =
        VARS.iter().copied().filter(|(k, _)| !k.starts_with("WEBHOOKS_RETRY")).chain(extra).collect();
    let app = spawn_app_roles(Backend::Postgres, &settings, roles).await;
    let receiver = WebhookReceiver::start().await;
    receiver.queue(vec![Behaviour::status(500)]);
    let token = tenant(&app).await;
    let (id, _) = endpoint(&app, &token, json!({"url": receiver.url("/"), "events": ["session.created"]})).await;
    let start_worker = || {
        let pairs: Vec<(&str, &str)> = app.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut worker = Running::start(anna(&["worker", "webhooks"], &pairs));
        worker.wait_for("process started");
        worker
    };
    let mut worker = start_worker();
    start_session(&app, &token).await;
    let first = receiver.wait_for(1, Duration::from_secs(20), |_| true).await;
    let webhook_id = first[0].header("webhook-id").to_owned();
    // Killed while the delivery waits for its retry (1.5 s), and more events come meanwhile.
    worker.child.kill().expect("SIGKILL");
    let _ = worker.child.wait();
    for _ in 0..3 {
        start_session(&app, &token).await;
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(receiver.count(), 1, "nothing is delivered while no worker runs");
    let mut successor = start_worker();
    let delivered = receiver.wait_for(4, Duration::from_secs(30), |r| r.answered_with == Behaviour::ok()).await;
    assert!(delivered.iter().any(|r| r.header("webhook-id") == webhook_id), "the retry lost its webhook-id");
    let mut ids: Vec<&str> = delivered.iter().map(|r| r.header("webhook-id")).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4, "every event delivered: {ids:?}");
    // Each success is recorded just after the receiver answered: wait for the log to show all.
    let mut log = Value::Null;
    for _ in 0..200 {
        log = delivery_log(&app, &token, &id, "?status=succeeded").await;
        if log["deliveries"].as_array().map(Vec::len) == Some(4) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(log["deliveries"].as_array().map(Vec::len), Some(4), "{log}");
    assert!(successor.terminate().success());
    app.stop().await;
}
