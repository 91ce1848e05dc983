//! WhatsApp sessions end to end on the simulator: the predecessor's client flow over REST and
//! the WebSocket, pairing by scan, messages with receipts and replies, cross-tenant isolation,
//! QR images, validation and limits, and resuming after a restart of the sessions worker.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn socket(app: &TestApp, query: &str) -> Socket {
    let url = format!("{}/ws/sessions?{query}", app.base.replace("http://", "ws://"));
    let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap_or_else(|e| panic!("ws: {e}"));
    socket
}

/// The next frame whose `type` is `kind` (frames of other types are skipped).
async fn frame(socket: &mut Socket, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let next = tokio::time::timeout_at(deadline, socket.next()).await;
        let Ok(Some(Ok(message))) = next else { panic!("no {kind} frame: {next:?}") };
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            if value["type"] == kind {
                return value;
            }
        }
    }
}

pub(crate) async fn tenant(app: &TestApp) -> String {
    let (_, verified) = app.active_user(&unique_email(), "correct horse battery").await;
    verified.access_token()
}

pub(crate) async fn session_status(app: &TestApp, token: &str, id: &str, status: &str) -> Value {
    for _ in 0..200 {
        let reply = app.get(&format!("/sessions/{id}")).bearer(token).send().await;
        if reply.body["status"] == status {
            return reply.body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("session {id} never reached {status}");
}

async fn predecessor_client_flow(backend: Backend) {
    let app = spawn_app(backend).await;
    let token = tenant(&app).await;
    let other = tenant(&app).await;

    // The predecessor's demo page: WebSocket with ?accessToken=, then POST /sessions with a
    // JSON content type and no body.
    let mut ws = socket(&app, &format!("accessToken={token}")).await;
    let snapshot = frame(&mut ws, "session.snapshot").await;
    assert_eq!(snapshot["payload"]["sessions"], json!([]));
    let mut other_ws = socket(&app, &format!("accessToken={other}")).await;
    frame(&mut other_ws, "session.snapshot").await;

    let started = app.post("/sessions").bearer(&token).raw("application/json", "").send().await;
    assert_eq!(started.status, 202, "{started:?}");
    let id = started.body["sessionId"].as_str().unwrap_or_default().to_owned();
    assert!(started.body["commandId"].is_string());

    let qr = frame(&mut ws, "session.qr.updated").await;
    assert_eq!(qr["sessionId"], id.as_str());
    assert!(qr["eventId"].is_string() && qr["occurredOn"].is_string());
    assert!(qr["payload"]["qr"].as_str().unwrap_or_default().starts_with("2@"));
    assert!(qr["payload"]["expiresAt"].is_string());
    assert!(qr["payload"]["tenantId"].is_string());

    let shown = session_status(&app, &token, &id, "pending_qr").await;
    assert_eq!(shown["qr"], qr["payload"]["qr"]);
    // The one sessions worker of this process holds every partition, this session's too.
    assert!(shown["partition"].is_u64(), "{shown}");
    assert!(shown["worker"]["id"].as_str().is_some_and(|w| !w.is_empty()), "{shown}");
    assert!(shown["worker"]["leaseToken"].as_i64().is_some_and(|t| t >= 1), "{shown}");
    let json_qr = app.get(&format!("/sessions/{id}/qr")).bearer(&token).send().await;
    assert_eq!(json_qr.body["qr"], qr["payload"]["qr"]);
    let svg = app
        .http
        .get(format!("{}/sessions/{id}/qr", app.base))
        .bearer_auth(&token)
        .header("accept", "image/svg+xml")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");
    let png = app
        .http
        .get(format!("{}/sessions/{id}/qr.png", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(png.headers()["content-type"], "image/png");

    // Another tenant: every access is a 404, over REST and the simulator route alike.
    for path in [format!("/sessions/{id}"), format!("/sessions/{id}/qr")] {
        assert_eq!(app.get(&path).bearer(&other).send().await.status, 404, "{path}");
    }
    let hijack = app.post("/sessions").bearer(&other).json(json!({"sessionId": id})).send().await;
    assert_eq!(hijack.status, 404);
    assert_eq!(app.post(&format!("/simulator/sessions/{id}/scan")).bearer(&other).send().await.status, 404);
    let not_connected = app
        .post(&format!("/sessions/{id}/messages"))
        .bearer(&token)
        .json(json!({"to": "+1 555 0100 123", "content": "hi"}))
        .send()
        .await;
    assert_eq!(not_connected.status, 409, "{not_connected:?}");
    assert!(not_connected.message().contains("pending_qr"));

    // Scan: pairing completes through the restart the server demands.
    assert_eq!(app.post(&format!("/simulator/sessions/{id}/scan")).bearer(&token).send().await.status, 202);
    let connected = frame(&mut ws, "session.status.connected").await;
    assert!(connected["payload"]["phone"].as_str().unwrap_or_default().ends_with("@s.whatsapp.net"));

    // Send: accepted, sent, acknowledged, delivered, read, and the contact replies.
    let bad = app
        .post(&format!("/sessions/{id}/messages"))
        .bearer(&token)
        .json(json!({"to": "0151 nope", "content": "hi"}))
        .send()
        .await;
    assert_eq!(bad.status, 400);
    let nul = app
        .post(&format!("/sessions/{id}/messages"))
        .bearer(&token)
        .json(json!({"to": "+15550100123", "content": "a\u{0}b"}))
        .send()
        .await;
    assert_eq!((nul.status, nul.body["code"].as_str()), (400, Some("invalid_content")));
    let missing =
        app.post(&format!("/sessions/{id}/messages")).bearer(&token).json(json!({"to": "+15550100123"})).send().await;
    assert_eq!((missing.status, missing.message()), (400, "to and content are required"));
    let sent = app
        .post(&format!("/sessions/{id}/messages"))
        .bearer(&token)
        .header("idempotency-key", "send-1")
        .json(json!({"to": "+1 555 0100 123", "content": "hello there"}))
        .send()
        .await;
    assert_eq!(sent.status, 202, "{sent:?}");
    let again = app
        .post(&format!("/sessions/{id}/messages"))
        .bearer(&token)
        .header("idempotency-key", "send-1")
        .json(json!({"to": "+1 555 0100 123", "content": "hello there"}))
        .send()
        .await;
    assert_eq!(again.body["commandId"], sent.body["commandId"], "a retried send enqueues nothing new");
    let message_sent = frame(&mut ws, "session.message.sent").await;
    assert_eq!(message_sent["payload"]["to"], "15550100123@s.whatsapp.net");
    assert_eq!(message_sent["payload"]["commandId"], sent.body["commandId"]);
    let (mut statuses, mut reply) = (Vec::new(), None);
    while statuses.len() < 3 || reply.is_none() {
        let next = tokio::time::timeout(Duration::from_secs(20), ws.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = next else { panic!("frames stopped: {next:?}") };
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        match value["type"].as_str() {
            Some("session.message.status") => statuses.push(value["payload"]["status"].clone()),
            Some("session.message.received") => reply = Some(value),
            _ => {}
        }
    }
    assert_eq!(statuses, vec![json!("server_ack"), json!("delivered"), json!("read")]);
    let reply = reply.unwrap_or_default();
    assert!(reply["payload"]["text"].as_str().unwrap_or_default().contains("hello there"));
    assert!(reply["payload"].get("raw").is_none(), "the raw message is read through the history: {reply}");
    assert!(message_sent["payload"].get("raw").is_none(), "{message_sent}");

    // Stop, then delete.
    let stopped =
        app.post(&format!("/sessions/{id}/stop")).bearer(&token).json(json!({"reason": "manual_stop"})).send().await;
    assert_eq!(stopped.status, 202);
    let disconnected = frame(&mut ws, "session.status.disconnected").await;
    assert_eq!(disconnected["payload"]["reason"], "manual_stop");
    let deleted = app
        .http
        .delete(format!("{}/sessions/{id}", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(deleted.status(), 202);
    frame(&mut ws, "session.deleted").await;
    assert_eq!(app.get(&format!("/sessions/{id}")).bearer(&token).send().await.status, 404);

    // The other tenant's socket saw nothing of it.
    let leaked = tokio::time::timeout(Duration::from_millis(300), other_ws.next()).await;
    assert!(leaked.is_err(), "another tenant's socket got {leaked:?}");
    let _ = ws.close(None).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predecessor_client_flow_on_sqlite() {
    predecessor_client_flow(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predecessor_client_flow_on_postgres_and_redis() {
    predecessor_client_flow(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qr_codes_run_out_and_the_session_starts_again() {
    let app = spawn_app_with(
        Backend::Sqlite,
        &[
            ("SESSIONS_SIMULATOR_FIRST_QR_MS", "200"),
            ("SESSIONS_SIMULATOR_NEXT_QR_MS", "100"),
            ("SESSIONS_SIMULATOR_QR_CODES", "2"),
        ],
    )
    .await;
    let token = tenant(&app).await;
    let ticket = app.post("/ws/ticket").bearer(&token).send().await;
    let ticket = ticket.body["ticket"].as_str().unwrap_or_default().to_owned();
    let mut ws = socket(&app, &format!("ticket={ticket}")).await;
    frame(&mut ws, "session.snapshot").await;
    // A ticket is single-use.
    let reused = tokio_tungstenite::connect_async(format!(
        "{}/ws/sessions?ticket={ticket}",
        app.base.replace("http://", "ws://")
    ))
    .await;
    assert!(reused.is_err(), "a used ticket opened a socket");

    let started = app.post("/sessions").bearer(&token).json(json!({})).send().await;
    let id = started.body["sessionId"].as_str().unwrap_or_default().to_owned();
    let failed = frame(&mut ws, "session.status.failed").await;
    assert_eq!(failed["payload"]["reason"], "qr_timeout");
    assert_eq!(session_status(&app, &token, &id, "failed").await["reason"], "qr_timeout");

    let again = app.post("/sessions").bearer(&token).json(json!({"sessionId": id})).send().await;
    assert_eq!(again.status, 202);
    frame(&mut ws, "session.qr.updated").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_everywhere_closes_open_sockets_and_voids_tickets() {
    let app = spawn_app_with(Backend::Sqlite, &[("WS_REVOCATION_CHECK_MS", "200")]).await;
    let token = tenant(&app).await;
    let ticket = app.post("/ws/ticket").bearer(&token).send().await;
    let ticket = ticket.body["ticket"].as_str().unwrap_or_default().to_owned();
    let mut ws = socket(&app, &format!("accessToken={token}")).await;
    frame(&mut ws, "session.snapshot").await;
    assert_eq!(app.post("/auth/logout-all").bearer(&token).send().await.status, 204);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let close = loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => {}
            other => panic!("the socket did not close: {other:?}"),
        }
    };
    let close = close.unwrap_or_else(|| panic!("a close frame without a code"));
    assert_eq!((u16::from(close.code), close.reason.as_str()), (4001, "access revoked"));
    let refused = tokio_tungstenite::connect_async(format!(
        "{}/ws/sessions?ticket={ticket}",
        app.base.replace("http://", "ws://")
    ))
    .await;
    assert!(refused.is_err(), "a ticket issued before the logout-all opened a socket");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_validation() {
    let app = spawn_app_with(Backend::Sqlite, &[("SESSIONS_MAX_PER_TENANT", "1")]).await;
    let token = tenant(&app).await;
    assert_eq!(app.post("/sessions").bearer(&token).send().await.status, 202);
    let second = app.post("/sessions").bearer(&token).send().await;
    assert_eq!(second.status, 409, "{second:?}");
    assert_eq!(second.body["code"], "too_many_sessions");
    let bad_id = app.post("/sessions").bearer(&token).json(json!({"sessionId": "nope"})).send().await;
    assert_eq!(bad_id.status, 400);
    assert_eq!(app.post("/sessions").send().await.status, 401);
    assert_eq!(app.get("/sessions/not-a-uuid").bearer(&token).send().await.status, 400);
    let odd = app
        .http
        .put(format!("{}/sessions", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(odd.status(), 405);
    let nul_reason = app
        .post(&format!("/sessions/{}/stop", uuid::Uuid::new_v4()))
        .bearer(&token)
        .json(json!({"reason": "a\u{0}b"}))
        .send()
        .await;
    assert_eq!(nul_reason.status, 404, "no such session, whatever the body");
    let listed = app.get("/sessions").bearer(&token).send().await;
    assert_eq!(listed.body["sessions"].as_array().map(Vec::len), Some(1));
    // The simulator's routes exist only with the simulator.
    let real = spawn_app_with(Backend::Sqlite, &[("SESSIONS_PROVIDER", "whatsapp")]).await;
    let token = tenant(&real).await;
    let id = uuid::Uuid::new_v4();
    assert_eq!(real.post(&format!("/simulator/sessions/{id}/scan")).bearer(&token).send().await.status, 404);
    real.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_sessions_resume_after_a_restart() {
    let url = anna_testkit::sqlite::fresh_database_url();
    let app = spawn_app_with(Backend::Sqlite, &[("DATABASE_URL", url.as_str())]).await;
    let token = tenant(&app).await;
    let started = app.post("/sessions").bearer(&token).send().await;
    let id = started.body["sessionId"].as_str().unwrap_or_default().to_owned();
    session_status(&app, &token, &id, "pending_qr").await;
    for _ in 0..100 {
        if app.get(&format!("/sessions/{id}")).bearer(&token).send().await.body["qr"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.post(&format!("/simulator/sessions/{id}/scan")).bearer(&token).send().await.status, 202);
    let phone = session_status(&app, &token, &id, "connected").await["phone"].clone();
    app.stop().await;

    // A new process on the same database: the session comes back from its stored device.
    let app = spawn_app_with(Backend::Sqlite, &[("DATABASE_URL", url.as_str())]).await;
    let sent = app
        .post(&format!("/sessions/{id}/messages"))
        .bearer(&token)
        .json(json!({"to": "+15550100123", "content": "after restart"}))
        .send()
        .await;
    assert_eq!(sent.status, 202, "{sent:?}");
    assert_eq!(session_status(&app, &token, &id, "connected").await["phone"], phone);
    app.stop().await;
}

/// Connects a new session of the tenant through the simulator; returns its id.
pub(crate) async fn connected_session(app: &TestApp, token: &str) -> String {
    let started = app.post("/sessions").bearer(token).send().await;
    let id = started.body["sessionId"].as_str().unwrap_or_default().to_owned();
    for _ in 0..200 {
        if app.get(&format!("/sessions/{id}")).bearer(token).send().await.body["qr"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.post(&format!("/simulator/sessions/{id}/scan")).bearer(token).send().await.status, 202);
    session_status(app, token, &id, "connected").await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_is_applied_once() {
    let app = spawn_app(Backend::Postgres).await;
    let token = tenant(&app).await;
    let id = connected_session(&app, &token).await;
    let mut ws = socket(&app, &format!("accessToken={token}")).await;
    frame(&mut ws, "session.snapshot").await;
    let sent = app
        .post(&format!("/sessions/{id}/messages"))
        .bearer(&token)
        .json(json!({"to": "+15550100123", "content": "once"}))
        .send()
        .await;
    let command = sent.body["commandId"].as_str().unwrap_or_default().to_owned();
    assert_eq!(frame(&mut ws, "session.message.sent").await["payload"]["commandId"], command.as_str());

    // The same entry appended again, as a producer retrying after a lost answer would.
    let config = anna_usecases::SessionsConfig { command_stream: app.command_stream.clone(), ..Default::default() };
    let partition = config.stream_of(uuid::Uuid::parse_str(&id).unwrap_or_default());
    let entries = app.stream.read_after(&partition, "0", 1000, Duration::ZERO).await.unwrap_or_default();
    let original =
        entries.iter().find(|e| e.fields.get("commandId") == Some(&command)).unwrap_or_else(|| panic!("no entry"));
    app.stream.append(&partition, &original.fields, None).await.unwrap_or_else(|e| panic!("{e}"));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout_at(deadline, ws.next()).await {
        let value: Value = serde_json::from_str(&text).unwrap_or_default();
        assert!(
            !(value["type"] == "session.message.sent" && value["payload"]["commandId"] == command.as_str()),
            "the duplicate was sent again"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_reconnects_and_a_ban_fails_the_session() {
    let app = spawn_app_with(Backend::Sqlite, &[("SESSIONS_RECONNECT_BACKOFF_MS", "100")]).await;
    let token = tenant(&app).await;
    let id = connected_session(&app, &token).await;
    let mut ws = socket(&app, &format!("accessToken={token}")).await;
    frame(&mut ws, "session.snapshot").await;

    assert_eq!(app.post(&format!("/simulator/sessions/{id}/disconnect")).bearer(&token).send().await.status, 202);
    let dropped = frame(&mut ws, "session.status.disconnected").await;
    assert!(dropped["payload"]["reason"].as_str().unwrap_or_default().starts_with("connection_lost"));
    frame(&mut ws, "session.status.connected").await;

    assert_eq!(app.post(&format!("/simulator/sessions/{id}/ban")).bearer(&token).send().await.status, 202);
    let failed = frame(&mut ws, "session.status.failed").await;
    assert!(failed["payload"]["reason"].as_str().unwrap_or_default().starts_with("banned"));

    // Logging out wipes the device: starting again shows a new QR code instead of reconnecting.
    assert_eq!(app.post(&format!("/sessions/{id}/logout")).bearer(&token).send().await.status, 202);
    frame(&mut ws, "session.logged_out").await;
    assert_eq!(app.post("/sessions").bearer(&token).json(json!({"sessionId": id})).send().await.status, 202);
    frame(&mut ws, "session.qr.updated").await;
    app.stop().await;
}
