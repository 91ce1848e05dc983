//! The real `anna` binary: help, configuration errors, `serve` with the console mailbox,
//! graceful shutdown on SIGTERM, `migrate`, and the workers.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_anna");

pub(crate) fn anna(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    // Cheap hashes: this is about the process, not the cost.
    cmd.env("AUTH_ARGON2_MEMORY_KIB", "1024").env("AUTH_ARGON2_ITERATIONS", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.current_dir(std::env::temp_dir());
    cmd
}

/// A running binary whose stdout lines are collected in the background.
pub(crate) struct Running {
    pub(crate) child: Child,
    lines: mpsc::Receiver<String>,
    pub(crate) seen: Vec<String>,
}

impl Running {
    pub(crate) fn start(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    /// Waits for a stdout line containing `needle`.
    pub(crate) fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        panic!("no line with {needle:?}; saw:\n{}", self.seen.join("\n"));
    }

    /// Collects the lines printed so far.
    pub(crate) fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// The API's address, from its `listening` log line.
    pub(crate) fn listening_addr(&mut self) -> String {
        self.addr_from("\"listening\"")
    }

    /// The `addr` of the next JSON log line containing `needle`.
    pub(crate) fn addr_from(&mut self, needle: &str) -> String {
        let line = self.wait_for(needle);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        value["addr"].as_str().unwrap_or_else(|| panic!("no addr in {line}")).to_owned()
    }

    pub(crate) fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.try_recv() {
                    self.seen.push(line);
                }
                return status;
            }
            assert!(Instant::now() < deadline, "did not exit within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A fresh Postgres database, migrated by the binary.
pub(crate) async fn migrated_postgres() -> String {
    let url = anna_testkit::pg::fresh_database_url().await;
    let out = anna(&["migrate"], &[("DATABASE_URL", &url)]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    url
}

/// A test that fails (panics) must not leave its processes running: they would keep working
/// against the test's database and streams long after it.
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn help_for_every_command() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["api", "--help"],
        vec!["migrate", "--help"],
        vec!["worker", "--help"],
        vec!["worker", "outbox", "--help"],
    ] {
        let out = anna(&args, &[]).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(!out.stdout.is_empty());
    }
}

#[test]
fn version_names_the_release_and_the_commit() {
    let out = anna(&["--version"], &[]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(&format!("anna {} (commit ", env!("CARGO_PKG_VERSION"))), "{text}");
    let head = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output();
    // Built with ANNA_GIT_COMMIT set, the binary names that commit instead.
    if let Some(head) = head.ok().filter(|o| o.status.success() && option_env!("ANNA_GIT_COMMIT").is_none()) {
        let head = String::from_utf8_lossy(&head.stdout);
        assert!(text.contains(&format!("(commit {})", head.trim())), "{text} is not built from {head}");
    }
}

#[test]
fn bad_configuration_stops_startup_naming_the_variable() {
    let out = anna(&["serve"], &[("PORT", "eighty")]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PORT") && stderr.contains("port number"), "{stderr}");

    let out = anna(&["serve"], &[("ANNA_ENV", "production")]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AUTH_JWT_SECRET"));

    let guessable = "s".repeat(40);
    let out = anna(
        &["serve"],
        &[("ANNA_ENV", "production"), ("AUTH_JWT_SECRET", &guessable), ("SMTP_URL", "smtp://localhost:25")],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("guessable") && !stderr.contains(&guessable), "{stderr}");

    let secret = "7d1e9b2c4a6f80e35b9c1d7a2e4f6081c3b5d7e9f1a3c5e7092b4d6f8a1c3e5b".to_owned();
    let out = anna(
        &["serve"],
        &[
            ("ANNA_ENV", "production"),
            ("AUTH_JWT_SECRET", &secret),
            ("SMTP_URL", "smtp://localhost:25"),
            // The tests' cheap Argon2 cost would be refused first.
            ("ANNA_ALLOW_WEAK_SETTINGS", "true"),
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AUTH_COOKIE_SECURE"), "{stderr}");
    assert!(!stderr.contains(&secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_embedded_prints_codes_and_shuts_down_gracefully() {
    let dir = std::env::temp_dir().join(format!("anna-bin-{}", uuid::Uuid::new_v4().simple()));
    let db = format!("sqlite:{}/nested/anna.db", dir.display());
    let mut app = Running::start(anna(&["serve"], &[("HOST", "127.0.0.1"), ("PORT", "0"), ("DATABASE_URL", &db)]));
    let addr = app.listening_addr();
    let base = format!("http://{addr}");
    assert!(dir.join("nested/anna.db").exists(), "the database file and its folder are created");

    let email = format!("bin-{}@example.com", uuid::Uuid::new_v4().simple());
    let client = reqwest::Client::new();
    let reply = client
        .post(format!("{base}/users"))
        .json(&json!({"name": "Bin", "email": email, "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 201);
    let id = reply.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    // The console mailbox prints the predecessor's line; the code is the last field before `reason`.
    let line = app.wait_for("[UserVerificationCode]");
    assert!(line.starts_with(&format!("[UserVerificationCode] email={email} code=")), "{line}");
    let code: String = line.split("code=").nth(1).unwrap().chars().take(6).collect();
    let verified = client.post(format!("{base}/users/{id}/verify")).json(&json!({"code": code})).send().await.unwrap();
    assert_eq!(verified.status(), 200);

    // A request in flight when SIGTERM arrives still completes.
    let slow = tokio::spawn({
        let client = client.clone();
        let base = base.clone();
        let email = email.clone();
        async move {
            client
                .post(format!("{base}/auth/login"))
                .json(&json!({"email": email, "password": "correct horse battery"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let status = app.terminate();
    assert!(status.success(), "exit status {status:?}; output:\n{}", app.seen.join("\n"));
    assert_eq!(slow.await.unwrap().ok(), Some(200));
    assert!(app.seen.iter().any(|l| l.contains("SIGTERM received")));
    // Every log line is JSON (the console mailbox lines aside).
    for line in app.seen.iter().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_on_postgres_and_workers_start_and_stop() {
    let url = anna_testkit::pg::fresh_database_url().await;
    for _ in 0..2 {
        let out = anna(&["migrate"], &[("DATABASE_URL", &url)]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("migrations applied"));
    }
    let out = anna(&["worker", "outbox"], &[("DATABASE_URL", &url)]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("REDIS_URL is required"),
        "a Postgres worker without Redis says why"
    );
    for kind in ["outbox", "events", "sessions"] {
        let redis = anna_testkit::redis::shared_url();
        let mut worker = Running::start(anna(
            &["worker", kind],
            &[("DATABASE_URL", &url), ("REDIS_URL", &redis), ("HOST", "127.0.0.1")],
        ));
        worker.wait_for("process started");
        let status = worker.terminate();
        assert!(status.success(), "worker {kind}: {status:?}");
        assert!(worker.seen.iter().any(|l| l.contains("process stopped")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_process_against_postgres() {
    let url = migrated_postgres().await;
    // The API tails the event stream too (realtime feeds), so it needs Redis with Postgres.
    let out = anna(&["api"], &[("DATABASE_URL", &url), ("HOST", "127.0.0.1"), ("PORT", "0")]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("REDIS_URL is required"), "an API without Redis says why");
    let redis = anna_testkit::redis::shared_url();
    let mut api = Running::start(anna(
        &["api"],
        &[("DATABASE_URL", &url), ("REDIS_URL", &redis), ("HOST", "127.0.0.1"), ("PORT", "0"), ("LOG_PRETTY", "true")],
    ));
    let line = api.wait_for("listening");
    let addr: String = line
        .split("addr: ")
        .nth(1)
        .map(|s| s.chars().take_while(|c| !c.is_whitespace() && *c != ',').collect())
        .unwrap_or_default();
    let addr = if addr.is_empty() { panic!("no address in pretty log line: {line}") } else { addr };
    let ready = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    assert!(api.terminate().success());
}

/// Registers users on `base` until `stop`; returns each e-mail with the time its 201 arrived.
async fn register_until(base: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Vec<(Instant, String)> {
    let client = reqwest::Client::new();
    let mut registered = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let email = format!("load-{}@example.com", uuid::Uuid::new_v4().simple());
        let reply = client
            .post(format!("{base}/users"))
            .json(&json!({"name": "Load", "email": email, "password": "correct horse battery"}))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 201);
        registered.push((Instant::now(), email));
    }
    registered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_write_load_restores_into_a_working_instance() {
    let dir = std::env::temp_dir().join(format!("anna-backup-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = format!("sqlite:{}/anna.db", dir.display());
    let copy = dir.join("copy.db");
    let copy_arg = copy.display().to_string();
    let env = [("HOST", "127.0.0.1"), ("PORT", "0"), ("RATE_LIMIT_ENABLED", "false"), ("DATABASE_URL", db.as_str())];
    let mut app = Running::start(anna(&["serve"], &env));
    let base = format!("http://{}", app.listening_addr());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3).map(|_| tokio::spawn(register_until(base.clone(), stop.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let started = Instant::now();
    let out = anna(&["backup", &copy_arg], &[("DATABASE_URL", &db)]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("backed up the database"));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&copy).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the copy holds password hashes: owner only");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut registered = Vec::new();
    for writer in writers {
        registered.extend(writer.await.unwrap());
    }
    let before: Vec<&String> = registered.iter().filter(|(at, _)| *at < started).map(|(_, e)| e).collect();
    assert!(before.len() >= 10 && before.len() < registered.len(), "{} of {}", before.len(), registered.len());
    // A backup never overwrites; Postgres is refused with the way to back it up.
    let again = anna(&["backup", &copy_arg], &[("DATABASE_URL", &db)]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let pg = anna(&["backup", &format!("{copy_arg}.pg")], &[("DATABASE_URL", "postgres://u@127.0.0.1:1/db")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&pg.stderr).contains("pg_dump"), "{}", String::from_utf8_lossy(&pg.stderr));
    assert!(app.terminate().success());

    // Restored: a new instance on the copy has every user registered before the backup began.
    let restored_db = format!("sqlite:{copy_arg}");
    let restored_env = [("HOST", "127.0.0.1"), ("PORT", "0"), ("DATABASE_URL", restored_db.as_str())];
    let mut restored = Running::start(anna(&["serve"], &restored_env));
    let base = format!("http://{}", restored.listening_addr());
    let client = reqwest::Client::new();
    assert_eq!(client.get(format!("{base}/readyz")).send().await.unwrap().status(), 200);
    for email in before {
        let reply = client
            .post(format!("{base}/users"))
            .json(&json!({"name": "Again", "email": email, "password": "correct horse battery"}))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 409, "{email} was registered before the backup but is not in it");
    }
    let fresh = format!("after-{}@example.com", uuid::Uuid::new_v4().simple());
    let reply = client
        .post(format!("{base}/users"))
        .json(&json!({"name": "New", "email": fresh, "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 201);
    assert!(restored.terminate().success());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_replicas_share_their_rate_limits_through_redis() {
    let url = migrated_postgres().await;
    let redis = anna_testkit::redis::RedisServer::start(false);
    let redis_url = redis.url();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("HOST", "127.0.0.1"),
        ("PORT", "0"),
        ("RATE_LIMIT_PER_IP_PER_MINUTE", "4"),
    ];
    let mut replicas = [Running::start(anna(&["api"], &env)), Running::start(anna(&["api"], &env))];
    let addrs: Vec<String> = replicas.iter_mut().map(Running::listening_addr).collect();
    let http = reqwest::Client::new();
    let mut answers = Vec::new();
    for round in 0..10 {
        let reply = http
            .post(format!("http://{}/auth/login", addrs[round % 2]))
            .json(&json!({"email": "nobody@example.com", "password": "not the password"}))
            .send()
            .await
            .unwrap();
        answers.push(reply.status().as_u16());
    }
    // One budget of 4 for both: the fifth login is refused, whichever replica gets it.
    assert_eq!(answers, [401, 401, 401, 401, 429, 429, 429, 429, 429, 429], "{answers:?}");
    for replica in &mut replicas {
        assert!(replica.terminate().success());
    }
}

/// A stand-in OpenTelemetry collector: counts OTLP/HTTP trace exports.
async fn start_otlp_sink() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let received = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let counter = counter.clone();
            async move {
                let protobuf =
                    headers.get("content-type").and_then(|v| v.to_str().ok()) == Some("application/x-protobuf");
                if protobuf && !body.is_empty() {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_are_exported_over_otlp_and_flushed_on_shutdown() {
    let (endpoint, received) = start_otlp_sink().await;
    let dir = std::env::temp_dir().join(format!("anna-otlp-{}", uuid::Uuid::new_v4().simple()));
    let db = format!("sqlite:{}/anna.db", dir.display());
    let mut app = Running::start(anna(
        &["serve"],
        &[("HOST", "127.0.0.1"), ("PORT", "0"), ("DATABASE_URL", &db), ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
    ));
    let addr = app.listening_addr();
    let reply = reqwest::Client::new()
        .post(format!("http://{addr}/users"))
        .json(&json!({"name": "O", "email": "otlp@example.com", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 201);
    app.wait_for("[UserVerificationCode]");
    let status = app.terminate();
    assert!(status.success());
    assert!(received.load(std::sync::atomic::Ordering::SeqCst) >= 1, "no OTLP export reached the collector");
    let _ = std::fs::remove_dir_all(dir);
}

fn env_of(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn run_anna(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = anna(args, env).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), format!("{stdout}{stderr}"))
}

/// A verification e-mail the provider refuses is dead-lettered after EVENTS_MAX_ATTEMPTS;
/// `anna dlq list` shows it, `anna dlq replay` delivers it once through a running consumer,
/// `anna outbox status` reports, `anna dlq purge` empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_replayed_and_purged() {
    use anna_testkit::resend_fake::FakeResend;
    let dir = std::env::temp_dir().join(format!("anna-dlq-{}", uuid::Uuid::new_v4().simple()));
    let db = format!("sqlite:{}/anna.db", dir.display());
    let refusing = FakeResend::start_failing(422, "domain not verified").await;
    let refusing_url = refusing.base_url();
    let common = [
        ("HOST", "127.0.0.1"),
        ("PORT", "0"),
        ("DATABASE_URL", db.as_str()),
        ("EMAIL_PROVIDER", "resend"),
        ("RESEND_API_KEY", "re_test_key_for_the_fake"),
        ("RESEND_FROM", "anna <no-reply@anna.test>"),
        ("EVENTS_MAX_ATTEMPTS", "2"),
        ("EVENTS_BACKOFF_MS", "20"),
        ("EVENTS_BACKOFF_MAX_MS", "50"),
        ("EVENTS_BLOCK_MS", "200"),
    ];
    let with = |extra: &[(&'static str, &str)]| -> Vec<(String, String)> {
        common.iter().chain(extra.iter()).map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    };

    let first = with(&[("RESEND_BASE_URL", refusing_url.as_str())]);
    let mut app = Running::start(anna(&["serve"], &env_of(&first)));
    let addr = app.listening_addr();
    let reply = reqwest::Client::new()
        .post(format!("http://{addr}/users"))
        .json(&json!({"name": "D", "email": "dlq@example.com", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 201);
    app.wait_for("event dead-lettered");
    assert_eq!(refusing.requests().await.len(), 2, "exactly EVENTS_MAX_ATTEMPTS attempts");
    assert!(app.terminate().success());

    let (ok, listing) = run_anna(&["dlq", "list"], &env_of(&first));
    assert!(ok, "{listing}");
    assert!(listing.contains("user.verification.token_issued"), "{listing}");
    assert!(listing.contains("SendUserVerificationEmailOnUserVerificationTokenIssued"), "{listing}");
    assert!(listing.contains("1 dead letter(s)"), "{listing}");
    let (ok, status) = run_anna(&["outbox", "status"], &env_of(&first));
    assert!(ok && status.contains("pending     0") && status.contains("failed      0"), "{status}");
    assert!(status.contains("backlog     0") && status.contains("time left   0 s"), "{status}");
    let published: u64 = status
        .split("published in the last minute: ")
        .nth(1)
        .and_then(|rest| rest.split(')').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no drain rate in {status}"));
    assert!(published >= 2, "the registration's events were published within the minute: {status}");
    let (ok, watched) = run_anna(&["outbox", "status", "--watch", "--every", "1"], &env_of(&first));
    assert!(ok && watched.contains("backlog") && watched.contains("drained"), "{watched}");
    let (ok, requeued) = run_anna(&["outbox", "retry-failed"], &env_of(&first));
    assert!(ok && requeued.contains("0 failed outbox row(s) requeued"), "{requeued}");
    let (ok, missing) = run_anna(&["dlq", "replay", "no-such-id"], &env_of(&first));
    assert!(!ok && missing.contains("no dead letter with id no-such-id"), "{missing}");

    // The provider works again: replaying delivers the e-mail exactly once.
    let accepting = FakeResend::start().await;
    let accepting_url = accepting.base_url();
    let second = with(&[("RESEND_BASE_URL", accepting_url.as_str())]);
    let mut app = Running::start(anna(&["serve"], &env_of(&second)));
    app.listening_addr();
    let (ok, replayed) = run_anna(&["dlq", "replay", "--all"], &env_of(&second));
    assert!(ok && replayed.contains("1 dead letter(s) replayed"), "{replayed}");
    let delivered = accepting.wait_for_requests(1, Duration::from_secs(20)).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].body["to"], json!(["dlq@example.com"]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(accepting.requests().await.len(), 1, "delivered once");
    assert!(app.terminate().success());

    let (ok, listing) = run_anna(&["dlq", "list"], &env_of(&second));
    assert!(ok && listing.contains("0 dead letter(s)"), "{listing}");
    let (ok, purged) = run_anna(&["dlq", "purge"], &env_of(&second));
    assert!(ok && purged.contains("purged 0 DLQ stream entr"), "{purged}");
    let _ = std::fs::remove_dir_all(dir);
}
