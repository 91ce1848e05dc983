//! Benchmarks of the real `anna serve` process, as an operator runs it: its resident memory
//! under a sustained login flood, and `GET /users/me` next to what Postgres itself serves.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

/// Argon2 memory of one hash at the default cost (19 MiB).
const ARGON2_DEFAULT_KIB: u64 = 19_456;

#[derive(Debug, clap::Args)]
pub struct LoginMemoryArgs {
    /// Seconds of load per phase.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Concurrent clients of each phase, in order; repeating phases shows whether memory grows
    /// from one run to the next.
    #[arg(long, value_delimiter = ',', default_value = "8,64,8,64")]
    phases: Vec<usize>,
    /// `AUTH_HASH_CONCURRENCY` of the server.
    #[arg(long, default_value_t = 2)]
    hash_concurrency: u64,
    /// The `anna` binary (default: next to this one; build it with `cargo build --release`).
    #[arg(long)]
    anna: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct UsersMeArgs {
    /// Seconds of each load.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent connections of both loads.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// anna's database pool (`DATABASE_MAX_CONNECTIONS`; the default is 10).
    #[arg(long, default_value_t = 10)]
    pool: usize,
    /// anna's `LOG_LEVEL` (the default, `info`, writes one line per request; the standard
    /// output goes to a pipe that is read and dropped).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// anna's `AUTH_USER_CACHE_TTL_MS` (1000 by default; 0: every request reads its user).
    #[arg(long, default_value_t = 1000)]
    user_cache_ttl_ms: u64,
    /// The `anna` binary (default: next to this one).
    #[arg(long)]
    anna: Option<PathBuf>,
}

/// A running `anna serve` with its stdout lines collected.
pub(crate) struct Server {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    pub(crate) base: String,
}

impl Server {
    pub(crate) fn start(anna: Option<PathBuf>, vars: &[(&str, String)]) -> anyhow::Result<Self> {
        Self::start_as(anna, "serve", vars)
    }

    /// Starts `anna <command>` (`serve`, or `api` for the HTTP API alone).
    pub(crate) fn start_as(anna: Option<PathBuf>, subcommand: &str, vars: &[(&str, String)]) -> anyhow::Result<Self> {
        Self::spawn(anna, &[subcommand], vars, true)
    }

    /// Starts `anna <args…>`; with `listens`, waits for the line saying where it listens.
    pub(crate) fn spawn(
        anna: Option<PathBuf>,
        args: &[&str],
        vars: &[(&str, String)],
        listens: bool,
    ) -> anyhow::Result<Self> {
        let subcommand = args.join(" ");
        let binary = match anna {
            Some(path) => path,
            None => std::env::current_exe()?.with_file_name("anna"),
        };
        anyhow::ensure!(
            binary.exists(),
            "{} not found: build it first (`cargo build --release -p anna`) or pass --anna",
            binary.display()
        );
        let mut command = Command::new(&binary);
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("RATE_LIMIT_ENABLED", "false")
            // The listening line, warnings, and nothing per request.
            .env("LOG_LEVEL", "warn,anna::app=info,anna_workers=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (name, value) in vars {
            command.env(name, value);
        }
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line.contains("\"listening\"")
                        && let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                        && let Some(addr) = value["addr"].as_str()
                    {
                        let _ = addr_tx.send(addr.to_owned());
                    }
                    // Request logs are counted out, not kept.
                    if !line.contains("request completed") {
                        lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    }
                }
            });
        }
        if !listens {
            return Ok(Self { child, lines, base: String::new() });
        }
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| anyhow::anyhow!("anna {subcommand} did not say where it listens"))?;
        Ok(Self { child, lines, base: format!("http://{addr}") })
    }

    /// The stdout lines collected so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn rss_kib(&self) -> u64 {
        status_kib(self.child.id(), "VmRSS:")
    }

    /// The most resident memory the process ever had (the kernel's high-water mark).
    pub(crate) fn peak_rss_kib(&self) -> u64 {
        status_kib(self.child.id(), "VmHWM:")
    }

    /// The verification code the console mailbox printed for `email`.
    pub(crate) async fn code_for(&self, email: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let found = self.lines.lock().unwrap_or_else(|e| e.into_inner()).iter().find_map(|line| {
                let rest = line.split(&format!("email={email} code=")).nth(1)?;
                Some(rest.chars().take_while(char::is_ascii_digit).collect::<String>())
            });
            if let Some(code) = found {
                return Ok(code);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("no verification code printed for {email}")
    }

    /// Registers and verifies a user; returns its access token.
    pub(crate) async fn active_user(
        &self,
        client: &reqwest::Client,
        email: &str,
        password: &str,
    ) -> anyhow::Result<String> {
        active_user(client, &self.base, self, email, password).await
    }
}

/// Registers a user through the API at `base` and verifies it with the code `mailer` (the
/// process running the e-mail subscriber, console mailbox) printed; returns its access token.
pub(crate) async fn active_user(
    client: &reqwest::Client,
    base: &str,
    mailer: &Server,
    email: &str,
    password: &str,
) -> anyhow::Result<String> {
    let registered: serde_json::Value = client
        .post(format!("{base}/users"))
        .json(&json!({"name": "Bench", "email": email, "password": password}))
        .send()
        .await?
        .json()
        .await?;
    let id = registered["id"].as_str().ok_or_else(|| anyhow::anyhow!("registration failed: {registered}"))?;
    let code = mailer.code_for(email).await?;
    let verified: serde_json::Value =
        client.post(format!("{base}/users/{id}/verify")).json(&json!({"code": code})).send().await?.json().await?;
    verified["accessToken"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("verification failed: {verified}"))
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|value| value.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The database and stream of an `anna serve` in a benchmark shape: its label and variables.
/// `embedded`: a fresh SQLite file with embedded streams; `distributed`: Postgres (the database
/// of `ANNA_TEST_DATABASE_URL` when set, else a throwaway cluster) and Redis.
pub(crate) async fn serve_shape(shape: &str) -> anyhow::Result<(&'static str, Vec<(&'static str, String)>)> {
    Ok(match shape {
        "embedded" => ("SQLite + embedded streams", vec![("DATABASE_URL", anna_testkit::sqlite::fresh_database_url())]),
        "distributed" => {
            let durable = std::env::var("ANNA_TEST_DATABASE_URL").is_ok();
            (
                if durable { "Postgres (durable) + Redis" } else { "Postgres (throwaway) + Redis" },
                vec![
                    ("DATABASE_URL", anna_testkit::pg::fresh_database_url().await),
                    ("REDIS_URL", anna_testkit::redis::shared_url()),
                ],
            )
        }
        other => anyhow::bail!("unknown shape {other} (embedded, distributed)"),
    })
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub async fn login_memory(args: LoginMemoryArgs) -> anyhow::Result<()> {
    let database_url = anna_testkit::sqlite::fresh_database_url();
    let server = Server::start(
        args.anna.clone(),
        &[("DATABASE_URL", database_url), ("AUTH_HASH_CONCURRENCY", args.hash_concurrency.to_string())],
    )?;
    // Idle: started, migrated, nothing hashed yet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = server.rss_kib();
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let email = format!("bench-{}@example.com", uuid::Uuid::new_v4().simple());
    let password = "correct horse battery";
    server.active_user(&client, &email, password).await?;
    let bound = idle + args.hash_concurrency * ARGON2_DEFAULT_KIB + 32 * 1024;
    println!(
        "anna serve (SQLite), AUTH_HASH_CONCURRENCY={}, Argon2 m=19 MiB: idle RSS {:.1} MiB, bound {:.1} MiB \
         (idle + {} × 19 MiB + 32 MiB)",
        args.hash_concurrency,
        mib(idle),
        mib(bound),
        args.hash_concurrency
    );
    println!(
        "| phase | clients | seconds | logins | logins/s | errors | peak RSS MiB | RSS after MiB | within bound |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (n, clients) in args.phases.iter().enumerate() {
        let peak = Arc::new(AtomicU64::new(0));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (peak, sampling, pid) = (peak.clone(), sampling.clone(), server.child.id());
            std::thread::spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    peak.fetch_max(status_kib(pid, "VmRSS:"), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let (logins, errors) = login_load(&client, &server.base, &email, password, *clients, args.seconds).await;
        sampling.store(false, Ordering::Relaxed);
        let _ = sampler.join();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let peak = peak.load(Ordering::Relaxed);
        println!(
            "| {} | {clients} | {} | {logins} | {:.0} | {errors} | **{:.1}** | {:.1} | {} |",
            n + 1,
            args.seconds,
            logins as f64 / args.seconds as f64,
            mib(peak),
            mib(server.rss_kib()),
            if peak <= bound { "yes" } else { "NO" }
        );
    }
    Ok(())
}

async fn login_load(
    client: &reqwest::Client,
    base: &str,
    email: &str,
    password: &str,
    clients: usize,
    seconds: u64,
) -> (u64, u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, ok, failed) = (client.clone(), ok.clone(), failed.clone());
            let url = format!("{base}/auth/login");
            let body = json!({"email": email, "password": password});
            tokio::spawn(async move {
                while tokio::time::Instant::now() < deadline {
                    match client.post(&url).json(&body).send().await {
                        Ok(response) if response.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

/// `GET /users/me` under `wrk`, then `pgbench -S` (one primary-key SELECT per transaction) on
/// the same database with the same number of connections, in the same run.
pub async fn users_me(args: UsersMeArgs) -> anyhow::Result<()> {
    for tool in ["wrk", "pgbench"] {
        anyhow::ensure!(
            Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok(),
            "{tool} is needed (Debian: apt-get install wrk postgresql-client)"
        );
    }
    let database_url = anna_testkit::pg::fresh_database_url().await;
    let server = Server::start(
        args.anna.clone(),
        &[
            ("DATABASE_URL", database_url.clone()),
            ("REDIS_URL", anna_testkit::redis::shared_url()),
            ("DATABASE_MAX_CONNECTIONS", args.pool.to_string()),
            // The line saying where it listens is needed whatever the level.
            ("LOG_LEVEL", format!("{},anna::app=info", args.log_level)),
            ("AUTH_USER_CACHE_TTL_MS", args.user_cache_ttl_ms.to_string()),
        ],
    )?;
    let client = reqwest::Client::new();
    let email = format!("bench-{}@example.com", uuid::Uuid::new_v4().simple());
    let token = server.active_user(&client, &email, "correct horse battery").await?;
    let duration = format!("{}s", args.seconds);
    let connections = args.connections.to_string();
    let wrk = Command::new("wrk")
        .args(["-t", "2", "-c", &connections, "-d", &duration, "--latency"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{}/users/me", server.base))
        .output()?;
    let wrk_out = String::from_utf8_lossy(&wrk.stdout).to_string();
    let anna_rps = wrk_out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("cannot read wrk's output:\n{wrk_out}"))?;
    let non_2xx = wrk_out.lines().find(|l| l.contains("Non-2xx")).unwrap_or("no non-2xx answers").trim().to_owned();
    drop(server);

    let init = Command::new("pgbench").args(["-i", "-s", "1", "-q", &database_url]).output()?;
    anyhow::ensure!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    let bench = Command::new("pgbench")
        .args(["-S", "-n", "-j", "2", "-c", &connections, "-T", &args.seconds.to_string(), &database_url])
        .output()?;
    let bench_out = String::from_utf8_lossy(&bench.stdout).to_string();
    let pg_tps = bench_out
        .lines()
        .find(|l| l.starts_with("tps"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("cannot read pgbench's output:\n{bench_out}"))?;
    println!(
        "| load ({} connections, {} s; `AUTH_USER_CACHE_TTL_MS={}`) | per second |",
        args.connections, args.seconds, args.user_cache_ttl_ms
    );
    println!("|---|---:|");
    println!("| anna `GET /users/me` (wrk; {non_2xx}) | {anna_rps:.0} |");
    println!("| Postgres `pgbench -S` on the same database | {pg_tps:.0} |");
    println!("| **ratio** | **{:.2}** |", anna_rps / pg_tps);
    let latency: Vec<&str> = wrk_out.lines().filter(|l| l.trim_start().starts_with(['5', '7', '9'])).collect();
    println!("wrk latency distribution: {}", latency.join(" ").split_whitespace().collect::<Vec<_>>().join(" "));
    Ok(())
}
