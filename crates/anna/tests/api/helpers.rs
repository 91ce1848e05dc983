//! `spawn_app()`: the real application on a random port, against a fresh SQLite file or a
//! fresh Postgres database, with a recording e-mail sender as the only test double.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anna::app::{self, Running};
use anna::config::{Config, Vars};
use anna_store::Store;
use anna_testkit::logs::CapturedLogs;
use anna_workers::email::{EmailMessage, MemoryMailbox, verification_code};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The test double for the e-mail provider, with a panicking wait.
pub struct Mailbox(pub Arc<MemoryMailbox>);

impl Mailbox {
    /// Waits for the `n`-th message (1-based) sent to `to`.
    pub async fn nth_to(&self, to: &str, n: usize) -> EmailMessage {
        self.0
            .wait_for(to, n, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("no e-mail #{n} to {to} within 10 s"))
    }

    pub fn all_to(&self, to: &str) -> Vec<EmailMessage> {
        self.0.all_to(to)
    }
}

pub fn code_of(message: &EmailMessage) -> String {
    verification_code(message).unwrap_or_else(|| panic!("not a verification e-mail: {message:?}")).to_owned()
}

/// The value of `name=` in the first link of the e-mail's text.
pub fn link_param(message: &EmailMessage, name: &str) -> String {
    let key = format!("{name}=");
    let start = message.text.find(&key).unwrap_or_else(|| panic!("no {name} in e-mail")) + key.len();
    message.text[start..].chars().take_while(|c| c.is_ascii_alphanumeric()).collect()
}

pub struct TestApp {
    pub base: String,
    pub metrics_addr: Option<SocketAddr>,
    pub mailbox: Mailbox,
    pub store: Arc<dyn Store>,
    pub stream: Arc<dyn anna_streams::Stream>,
    /// `SESSIONS_COMMAND_STREAM` of this app (partitions are `<name>.<n>`).
    pub command_stream: String,
    /// The settings the app runs with, as environment variables.
    pub env: HashMap<String, String>,
    pub logs: CapturedLogs,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    running: Option<Running>,
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, &[]).await
}

/// Starts the app with test settings overridden by `vars` (environment-variable names).
pub async fn spawn_app_with(backend: Backend, vars: &[(&str, &str)]) -> TestApp {
    spawn(backend, vars, false).await
}

/// Like `spawn_app_with`, but e-mail goes through the sender the configuration selects
/// (SMTP, Resend or console) instead of the in-memory mailbox.
pub async fn spawn_app_with_configured_email(backend: Backend, vars: &[(&str, &str)]) -> TestApp {
    spawn(backend, vars, true).await
}

/// Starts only `roles` in this process (the sessions fleet test runs its sessions workers as
/// separate processes, with the settings in [`TestApp::env`]).
pub async fn spawn_app_roles(backend: Backend, vars: &[(&str, &str)], roles: app::Roles) -> TestApp {
    spawn_roles(backend, vars, false, roles).await
}

async fn spawn(backend: Backend, vars: &[(&str, &str)], configured_email: bool) -> TestApp {
    spawn_roles(backend, vars, configured_email, app::Roles::ALL).await
}

async fn spawn_roles(backend: Backend, vars: &[(&str, &str)], configured_email: bool, roles: app::Roles) -> TestApp {
    let logs = anna_testkit::logs::capture();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let database_url = match backend {
        Backend::Sqlite => anna_testkit::sqlite::fresh_database_url(),
        Backend::Postgres => anna_testkit::pg::fresh_database_url().await,
    };
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let mut map: HashMap<String, String> = [
        ("HOST", "127.0.0.1"),
        ("PORT", "0"),
        ("AUTH_JWT_SECRET", "integration-test-secret-integration-test"),
        // Cheap hashes keep the suite fast; production cost is checked by the benchmark.
        ("AUTH_ARGON2_MEMORY_KIB", "1024"),
        ("AUTH_ARGON2_ITERATIONS", "1"),
        ("RATE_LIMIT_ENABLED", "false"),
        ("DATABASE_MAX_CONNECTIONS", "5"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    map.insert("DATABASE_URL".into(), database_url);
    // Each app gets its own streams, so apps sharing one Redis never see each other's events.
    map.insert("EVENTS_STREAM".into(), format!("domain-events-{suffix}"));
    map.insert("EVENTS_DLQ_STREAM".into(), format!("domain-events-dlq-{suffix}"));
    map.insert("EVENTS_BLOCK_MS".into(), "500".into());
    // And its own rate-limit budgets (tests that enable limits all come from 127.0.0.1).
    map.insert("RATE_LIMIT_KEY_PREFIX".into(), format!("anna-test:rate:{suffix}"));
    map.insert("SESSIONS_COMMAND_STREAM".into(), format!("session-commands-{suffix}"));
    map.insert("SESSIONS_COMMAND_DLQ_STREAM".into(), format!("session-commands-dlq-{suffix}"));
    map.insert("SESSIONS_COMMAND_BLOCK_MS".into(), "500".into());
    map.insert("SESSIONS_COMMAND_GROUP".into(), format!("session-commands-group-{suffix}"));
    // Sessions run on the simulator, with its timings shortened to keep tests fast.
    map.insert("SESSIONS_PROVIDER".into(), "simulator".into());
    map.insert("SESSIONS_SIMULATOR_FIRST_QR_MS".into(), "3000".into());
    map.insert("SESSIONS_SIMULATOR_NEXT_QR_MS".into(), "1000".into());
    map.insert("SESSIONS_SIMULATOR_REPLY_MS".into(), "300".into());
    map.insert("SESSIONS_RESUME_STAGGER_MS".into(), "0".into());
    if backend == Backend::Postgres {
        map.insert("REDIS_URL".into(), anna_testkit::redis::shared_url());
    }
    let media_dir = std::env::temp_dir().join(format!("anna-test-media-{suffix}"));
    map.insert("MEDIA_DIR".into(), media_dir.display().to_string());
    for (k, v) in vars {
        map.insert((*k).to_owned(), (*v).to_owned());
    }
    let env = map.clone();
    let config = Config::from_vars(&Vars::new(move |k: &str| map.get(k).cloned()))
        .unwrap_or_else(|e| panic!("test config: {e}"));
    let mailbox = Arc::new(MemoryMailbox::default());
    let mut backends = app::open_backends(&config).await.unwrap_or_else(|e| panic!("backends: {e:#}"));
    if !configured_email {
        backends = backends.with_email_sender(mailbox.clone());
    }
    backends.store.migrate().await.unwrap_or_else(|e| panic!("migrate: {e}"));
    let shutdown = CancellationToken::new();
    let running =
        app::start(&config, &backends, roles, shutdown.clone()).await.unwrap_or_else(|e| panic!("start: {e:#}"));
    let http = reqwest::Client::builder().cookie_store(false).build().unwrap_or_else(|e| panic!("{e}"));
    let addr = running.addr.unwrap_or_else(|| panic!("the API did not start"));
    TestApp {
        base: format!("http://{addr}"),
        metrics_addr: running.metrics_addr,
        mailbox: Mailbox(mailbox),
        store: backends.store.clone(),
        stream: backends.stream.clone(),
        command_stream: config.sessions.sessions.command_stream.clone(),
        env,
        logs,
        http,
        shutdown,
        running: Some(running),
    }
}

/// A response reduced to what tests look at.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    pub fn set_cookie(&self) -> String {
        self.headers.get("set-cookie").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    }
    /// `name=value` of the Set-Cookie header, ready for a `Cookie` request header.
    pub fn cookie_pair(&self) -> String {
        self.set_cookie().split(';').next().unwrap_or_default().to_owned()
    }
    pub fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or_default()
    }
    pub fn access_token(&self) -> String {
        self.body["accessToken"].as_str().unwrap_or_else(|| panic!("no accessToken in {:?}", self.body)).to_owned()
    }
}

pub struct Req<'a> {
    app: &'a TestApp,
    builder: reqwest::RequestBuilder,
}

impl<'a> Req<'a> {
    pub fn bearer(mut self, token: &str) -> Self {
        self.builder = self.builder.bearer_auth(token);
        self
    }
    pub fn cookie(mut self, pair: &str) -> Self {
        self.builder = self.builder.header("cookie", pair);
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.builder = self.builder.header(name, value);
        self
    }
    pub fn json(mut self, body: Value) -> Self {
        self.builder = self.builder.json(&body);
        self
    }
    pub fn raw(mut self, content_type: &str, body: impl Into<reqwest::Body>) -> Self {
        self.builder = self.builder.header("content-type", content_type).body(body);
        self
    }
    pub async fn send(self) -> Reply {
        let _ = self.app;
        let response = self.builder.send().await.unwrap_or_else(|e| panic!("request failed: {e}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply { status, headers, body, text }
    }
}

impl TestApp {
    pub fn get(&self, path: &str) -> Req<'_> {
        Req { app: self, builder: self.http.get(format!("{}{path}", self.base)) }
    }
    pub fn post(&self, path: &str) -> Req<'_> {
        Req { app: self, builder: self.http.post(format!("{}{path}", self.base)) }
    }
    pub fn patch(&self, path: &str) -> Req<'_> {
        Req { app: self, builder: self.http.patch(format!("{}{path}", self.base)) }
    }
    pub fn delete(&self, path: &str) -> Req<'_> {
        Req { app: self, builder: self.http.delete(format!("{}{path}", self.base)) }
    }
    pub fn put(&self, path: &str) -> Req<'_> {
        Req { app: self, builder: self.http.put(format!("{}{path}", self.base)) }
    }

    /// Writes `request` as it is over a new connection and returns what the server answered
    /// before closing it (within 5 s). For requests an HTTP client would not send, or whose
    /// answer comes before the body they announce (a client still sending could see a reset).
    pub async fn raw_answer(&self, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.base.trim_start_matches("http://").to_owned();
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap_or_else(|e| panic!("{e}"));
        socket.write_all(request.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    pub async fn register(&self, email: &str, password: &str) -> String {
        let reply =
            self.post("/users").json(json!({"name": "Test User", "email": email, "password": password})).send().await;
        assert_eq!(reply.status, 201, "{reply:?}");
        reply.body["id"].as_str().unwrap_or_default().to_owned()
    }

    /// Registers and verifies; returns (user id, verify reply with tokens and cookie).
    pub async fn active_user(&self, email: &str, password: &str) -> (String, Reply) {
        let id = self.register(email, password).await;
        let code = code_of(&self.mailbox.nth_to(email, 1).await);
        let reply = self.post(&format!("/users/{id}/verify")).json(json!({"code": code})).send().await;
        assert_eq!(reply.status, 200, "{reply:?}");
        (id, reply)
    }

    pub async fn login(&self, email: &str, password: &str) -> Reply {
        self.post("/auth/login").json(json!({"email": email, "password": password})).send().await
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            let stopped = tokio::time::timeout(Duration::from_secs(10), running.wait()).await;
            let stopped = stopped.unwrap_or_else(|_| panic!("the app did not stop within 10 s"));
            stopped.unwrap_or_else(|e| panic!("a task of the app failed: {e:#}"));
        }
        self.store.close().await;
    }
}

pub fn unique_email() -> String {
    format!("user-{}@example.com", uuid::Uuid::new_v4().simple())
}

/// Instantiates each scenario once per backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::helpers::Backend::Sqlite).await }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::helpers::Backend::Postgres).await }
            )*
        }
    };
}

impl TestApp {
    /// The payloads of `name` events of the session (in the order they happened), once `done`
    /// holds for them; those of the last look when it never does.
    pub async fn events_until(&self, session: &str, name: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let mut payloads = Vec::new();
        for _ in 0..200 {
            let mut events = self.store.outbox_events_for_aggregate(session).await.unwrap_or_default();
            events.retain(|record| record.event.event_name == name);
            events.sort_by_key(|record| record.event.occurred_on);
            payloads = events.into_iter().map(|record| record.event.payload).collect();
            if done(&payloads) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        payloads
    }
}
