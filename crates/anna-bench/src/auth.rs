//! `GET /users/me` and `POST /auth/login` on both backends, with the production Argon2 cost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anna::app;
use anna::config::{Config, Vars};
use anna_domain::password::{Argon2Cost, PasswordHasher};
use anna_workers::email::{MemoryMailbox, verification_code};
use futures::stream::{self, StreamExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::stats::Summary;

#[derive(Debug, clap::Args)]
pub struct AuthArgs {
    /// Requests to `GET /users/me` per backend.
    #[arg(long, default_value_t = 20_000)]
    me_requests: usize,
    /// Concurrent clients for `GET /users/me`.
    #[arg(long, default_value_t = 32)]
    me_concurrency: usize,
    /// Requests to `POST /auth/login` per backend.
    #[arg(long, default_value_t = 400)]
    login_requests: usize,
    /// Concurrent clients for `POST /auth/login`.
    #[arg(long, default_value_t = 8)]
    login_concurrency: usize,
    /// Only these backends (sqlite, postgres).
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    backends: Vec<String>,
}

pub async fn run(args: AuthArgs) -> anyhow::Result<()> {
    let cost = Argon2Cost::default();
    let hasher = PasswordHasher::new(cost)?;
    let started = Instant::now();
    let rounds = 20;
    for _ in 0..rounds {
        let phc = hasher.hash("correct horse battery")?;
        anyhow::ensure!(hasher.verify("correct horse battery", &phc), "argon2 round trip failed");
    }
    let per_hash = started.elapsed() / (rounds * 2);
    println!(
        "argon2id m={} KiB t={} p={}: {:.1} ms per hash or verify (one core)",
        cost.memory_kib,
        cost.iterations,
        cost.parallelism,
        per_hash.as_secs_f64() * 1000.0
    );
    println!();
    println!("{}", Summary::header());
    for backend in &args.backends {
        let url = match backend.as_str() {
            "sqlite" => anna_testkit::sqlite::fresh_database_url(),
            "postgres" => anna_testkit::pg::fresh_database_url().await,
            other => anyhow::bail!("unknown backend {other:?}: expected sqlite or postgres"),
        };
        for summary in bench_backend(backend, &url, &args).await? {
            println!("{}", summary.row());
        }
    }
    Ok(())
}

async fn bench_backend(label: &str, database_url: &str, args: &AuthArgs) -> anyhow::Result<Vec<Summary>> {
    let vars: HashMap<&str, String> = [
        ("HOST", "127.0.0.1".to_owned()),
        ("PORT", "0".to_owned()),
        ("DATABASE_URL", database_url.to_owned()),
        ("RATE_LIMIT_ENABLED", "false".to_owned()),
        ("AUTH_JWT_SECRET", "benchmark-secret-benchmark-secret-benchmark".to_owned()),
        ("DATABASE_MAX_CONNECTIONS", "16".to_owned()),
        ("LOG_LEVEL", "warn".to_owned()),
    ]
    .into_iter()
    .collect();
    let mut vars = vars;
    if database_url.starts_with("postgres") {
        vars.insert("REDIS_URL", anna_testkit::redis::shared_url());
    }
    let config = Config::from_vars(&Vars::new(|k: &str| vars.get(k).cloned()))?;
    let mailbox = Arc::new(MemoryMailbox::default());
    let backends = app::open_backends(&config).await?.with_email_sender(mailbox.clone());
    backends.store.migrate().await?;
    let shutdown = CancellationToken::new();
    let running = app::start(&config, &backends, app::Roles::ALL, shutdown.clone()).await?;
    let addr = running.addr.ok_or_else(|| anyhow::anyhow!("the API did not start"))?;
    let base = format!("http://{addr}");
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;

    let email = format!("bench-{}@example.com", uuid::Uuid::new_v4().simple());
    let password = "correct horse battery";
    let registered: serde_json::Value = client
        .post(format!("{base}/users"))
        .json(&json!({"name": "Bench", "email": email, "password": password}))
        .send()
        .await?
        .json()
        .await?;
    let id = registered["id"].as_str().unwrap_or_default().to_owned();
    let mail = mailbox
        .wait_for(&email, 1, Duration::from_secs(10))
        .await
        .ok_or_else(|| anyhow::anyhow!("no verification e-mail"))?;
    let code = verification_code(&mail).unwrap_or_default().to_owned();
    let verified: serde_json::Value =
        client.post(format!("{base}/users/{id}/verify")).json(&json!({"code": code})).send().await?.json().await?;
    let token = verified["accessToken"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(!token.is_empty(), "verification failed: {verified}");

    let me = load(&format!("{label} GET /users/me"), args.me_requests, args.me_concurrency, |_| {
        client.get(format!("{base}/users/me")).bearer_auth(&token).send()
    })
    .await;
    let login = load(&format!("{label} POST /auth/login"), args.login_requests, args.login_concurrency, |_| {
        client.post(format!("{base}/auth/login")).json(&json!({"email": email, "password": password})).send()
    })
    .await;
    shutdown.cancel();
    running.wait().await?;
    backends.close().await;
    Ok(vec![me, login])
}

/// Sends `total` requests with `concurrency` in flight; a non-2xx answer counts as an error.
async fn load<F, Fut>(label: &str, total: usize, concurrency: usize, request: F) -> Summary
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>>,
{
    let started = Instant::now();
    let results: Vec<(Duration, bool)> = stream::iter(0..total)
        .map(|i| {
            let sent = Instant::now();
            let fut = request(i);
            async move {
                let ok = match fut.await {
                    Ok(response) => {
                        let success = response.status().is_success();
                        let _ = response.bytes().await;
                        success
                    }
                    Err(_) => false,
                };
                (sent.elapsed(), ok)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let errors = results.iter().filter(|(_, ok)| !ok).count();
    let latencies = results.into_iter().filter(|(_, ok)| *ok).map(|(d, _)| d).collect();
    Summary::from_latencies(label, latencies, errors, elapsed)
}
