//! Per-client-IP and per-account limits on the routes that guess or send secrets, and the
//! send budget of each WhatsApp session.
//!
//! Every budget is a GCRA: `burst` requests at once, then one more every `interval`. With
//! `REDIS_URL` set the budgets live in Redis ([`SharedBudgets`]), so API replicas spend from
//! the same ones: N replicas allow the limit once, not N times. Without Redis, and while Redis
//! cannot be reached, each process keeps its own budgets in memory.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anna_domain::secrets::SecretHasher;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use crate::config::RateLimitConfig;
use crate::error::ApiError;

/// The limited routes; each has its own budget.
#[derive(Debug, Clone, Copy)]
pub enum Limited {
    Login,
    Verify,
    ResendVerification,
    PasswordReset,
    PasswordResetConfirm,
}

impl Limited {
    fn as_str(self) -> &'static str {
        match self {
            Self::Login => "login",
            Self::Verify => "verify",
            Self::ResendVerification => "resend",
            Self::PasswordReset => "reset",
            Self::PasswordResetConfirm => "reset-confirm",
        }
    }
}

/// One kind of budget, kept per key.
struct Budget {
    /// Names the budget's keys in Redis.
    name: &'static str,
    interval: Duration,
    burst: u32,
    local: DefaultKeyedRateLimiter<String>,
}

impl Budget {
    fn new(name: &'static str, interval: Duration, burst: u32) -> Self {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let interval = interval.max(Duration::from_micros(1));
        let quota = Quota::with_period(interval).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN));
        Self { name, interval, burst: burst.get(), local: RateLimiter::keyed(quota.allow_burst(burst)) }
    }

    /// `n` per minute, all of them at once if need be.
    fn per_minute(name: &'static str, n: u32) -> Self {
        Self::new(name, Duration::from_secs(60) / n.max(1), n)
    }
}

/// How long Redis may take to answer before the process falls back to its own budgets.
const SHARED_RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// After Redis failed, how long requests use this process's budgets without asking it: an
/// outage must not add the timeout above to every request.
const SHARED_RETRY_AFTER: Duration = Duration::from_secs(5);
const SHARED_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One warning per this interval while Redis fails, not one per request.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// GCRA on the server's own clock (so replicas whose clocks disagree still share one budget).
/// KEYS[1]: the key. ARGV[1]: the interval, ARGV[2]: the burst. The key holds the theoretical
/// arrival time in microseconds and expires when the budget is full again. Returns 0 when the
/// request may go, else the microseconds to wait. Microseconds since the epoch stay well under
/// 2^53, so Lua's doubles hold them exactly.
const GCRA_SCRIPT: &str = r"
-- Redis before 5 refuses writes after TIME unless effects are replicated (a no-op since 7).
redis.replicate_commands()
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next_tat = tat + interval
local allowed_at = next_tat - interval * tonumber(ARGV[2])
if allowed_at > now then return allowed_at - now end
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000))
return 0
";

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to REDIS_URL for the shared rate limits: {0}")]
pub struct SharedBudgetsError(#[from] redis::RedisError);

/// Budgets kept in Redis and shared by every process that uses the same server.
pub struct SharedBudgets {
    redis: ConnectionManager,
    script: Script,
    prefix: String,
    /// Keyed: a plain hash of an IPv4 address or a likely e-mail is easy to reverse.
    keys: SecretHasher,
}

impl SharedBudgets {
    /// Connects to a `redis://…` URL; fails when the server cannot be reached. Keys start
    /// with `prefix` (`RATE_LIMIT_KEY_PREFIX`) and end with a hash keyed by `server_secret`.
    pub async fn connect(url: &str, prefix: &str, server_secret: &[u8]) -> Result<Self, SharedBudgetsError> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(SHARED_RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(SHARED_CONNECT_TIMEOUT));
        let redis = Client::open(url)?.get_connection_manager_with_config(config).await?;
        Ok(Self {
            redis,
            script: Script::new(GCRA_SCRIPT),
            prefix: prefix.to_owned(),
            keys: SecretHasher::from_server_secret(server_secret),
        })
    }

    /// Spends one request of `key`'s budget: `Ok(Err(wait))` when none is left.
    async fn spend(&self, budget: &Budget, key: &str) -> Result<Result<(), Duration>, redis::RedisError> {
        // Hashed: the keys hold e-mail addresses and client IPs, which Redis need not see.
        let hashed = self.keys.hash("rate-limit", budget.name, key);
        let key = format!("{}:{}:{}", self.prefix, budget.name, hashed.get(..32).unwrap_or(&hashed));
        let interval = u64::try_from(budget.interval.as_micros()).unwrap_or(u64::MAX);
        let mut redis = self.redis.clone();
        let wait: u64 = self.script.key(key).arg(interval).arg(budget.burst).invoke_async(&mut redis).await?;
        Ok(if wait == 0 { Ok(()) } else { Err(Duration::from_micros(wait)) })
    }
}

pub struct RateLimiters {
    enabled: bool,
    per_ip: Budget,
    per_account: Budget,
    emails_per_account: Budget,
    /// Messages per session: protects the tenant's number from WhatsApp's burst bans, so it
    /// applies even with `RATE_LIMIT_ENABLED=false`.
    sends: Budget,
    shared: Option<SharedBudgets>,
    /// Until when Redis is not asked (it failed recently).
    shared_paused_until: Mutex<Option<Instant>>,
    last_failure_logged: Mutex<Option<Instant>>,
    clock: DefaultClock,
}

impl RateLimiters {
    /// Budgets of this process alone.
    pub fn new(config: RateLimitConfig) -> Self {
        let emails = config.emails_per_account_per_hour.max(1);
        let sends = config.send_per_minute.max(1);
        Self {
            enabled: config.enabled,
            per_ip: Budget::per_minute("ip", config.per_ip_per_minute),
            per_account: Budget::per_minute("account", config.per_account_per_minute),
            emails_per_account: Budget::new("emails", Duration::from_secs(3600) / emails, emails),
            sends: Budget::new("sends", Duration::from_secs(60) / sends, config.send_burst),
            shared: None,
            shared_paused_until: Mutex::new(None),
            last_failure_logged: Mutex::new(None),
            clock: DefaultClock::default(),
        }
    }

    /// Budgets shared through Redis by every API process; this process's own budgets stand in
    /// while Redis cannot be reached.
    pub fn shared(config: RateLimitConfig, shared: SharedBudgets) -> Self {
        Self { shared: Some(shared), ..Self::new(config) }
    }

    /// Spends one message of the session's send budget; `Err` holds the seconds to wait.
    pub async fn check_send(&self, session_id: uuid::Uuid) -> Result<(), u64> {
        self.spend(&self.sends, session_id.to_string()).await.map_err(|wait| {
            metrics::counter!("session_sends_rate_limited_total").increment(1);
            whole_seconds(wait)
        })
    }

    /// Spends one request of the IP's budget for `route`.
    pub async fn check_ip(&self, route: Limited, ip: &str) -> Result<(), ApiError> {
        self.check(&self.per_ip, format!("{}|{ip}", route.as_str())).await
    }

    /// Spends one request of the account's budget for `route` (normalised e-mail or user id);
    /// routes that send e-mail also spend from the account's hourly e-mail budget.
    pub async fn check_account(&self, route: Limited, account: &str) -> Result<(), ApiError> {
        self.check(&self.per_account, format!("{}|{account}", route.as_str())).await?;
        if matches!(route, Limited::ResendVerification | Limited::PasswordReset) {
            self.check(&self.emails_per_account, account.to_owned()).await?;
        }
        Ok(())
    }

    async fn check(&self, budget: &Budget, key: String) -> Result<(), ApiError> {
        if !self.enabled {
            return Ok(());
        }
        self.spend(budget, key).await.map_err(|wait| {
            metrics::counter!("auth_rate_limited_total").increment(1);
            ApiError::too_many_requests(whole_seconds(wait))
        })
    }

    async fn spend(&self, budget: &Budget, key: String) -> Result<(), Duration> {
        if let Some(shared) = self.shared.as_ref().filter(|_| !self.shared_paused()) {
            match tokio::time::timeout(SHARED_RESPONSE_TIMEOUT, shared.spend(budget, &key)).await {
                Ok(Ok(outcome)) => return outcome,
                Ok(Err(error)) => self.shared_failed(&error.to_string()),
                Err(_) => self.shared_failed("no answer within 500 ms"),
            }
        }
        budget.local.check_key(&key).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    fn shared_paused(&self) -> bool {
        let paused = self.shared_paused_until.lock().unwrap_or_else(|e| e.into_inner());
        paused.is_some_and(|until| Instant::now() < until)
    }

    fn shared_failed(&self, error: &str) {
        metrics::counter!("rate_limit_shared_failures_total").increment(1);
        *self.shared_paused_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + SHARED_RETRY_AFTER);
        let mut last = self.last_failure_logged.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| at.elapsed() >= FAILURE_LOG_INTERVAL) {
            *last = Some(Instant::now());
            tracing::warn!(%error, "shared rate limits unavailable: this process limits on its own until Redis answers");
        }
    }

    /// Forgets keys whose budget is full again, so memory stays bounded (Redis expires its own).
    pub fn retain_recent(&self) {
        self.per_ip.local.retain_recent();
        self.per_account.local.retain_recent();
        self.emails_per_account.local.retain_recent();
        self.sends.local.retain_recent();
    }
}

fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// The same tests on every kind of budget store: this process's memory, and Redis.
#[cfg(test)]
mod tests {
    use super::*;

    fn config(per_ip: u32, per_account: u32, emails: u32) -> RateLimitConfig {
        RateLimitConfig {
            enabled: true,
            per_ip_per_minute: per_ip,
            per_account_per_minute: per_account,
            emails_per_account_per_hour: emails,
            send_per_minute: 60,
            send_burst: 3,
        }
    }

    async fn shared(config: RateLimitConfig) -> RateLimiters {
        let url = anna_testkit::redis::shared_url();
        let budgets =
            SharedBudgets::connect(&url, "anna-test:rate", b"test-secret").await.unwrap_or_else(|e| panic!("{e}"));
        RateLimiters::shared(config, budgets)
    }

    /// Keys no other test (or earlier run against the same Redis) has spent from.
    fn fresh(what: &str) -> String {
        format!("{what}-{}", uuid::Uuid::new_v4())
    }

    async fn budget_then_429_with_retry_after(limiters: RateLimiters) {
        let (ip, other_ip, account) = (fresh("ip"), fresh("ip"), fresh("account"));
        assert!(limiters.check_ip(Limited::Login, &ip).await.is_ok());
        assert!(limiters.check_ip(Limited::Login, &ip).await.is_ok());
        let refused = limiters.check_ip(Limited::Login, &ip).await.err().map(|e| e.retry_after_secs);
        assert!(matches!(refused, Some(Some(secs)) if (1..=30).contains(&secs)), "{refused:?}");
        // Other routes and other clients have their own budgets.
        assert!(limiters.check_ip(Limited::Verify, &ip).await.is_ok());
        assert!(limiters.check_ip(Limited::Login, &other_ip).await.is_ok());
        assert!(limiters.check_account(Limited::Login, &account).await.is_ok());
        assert!(limiters.check_account(Limited::Login, &account).await.is_err());
    }

    async fn e_mail_routes_share_an_hourly_budget_per_account(limiters: RateLimiters) {
        let (account, other) = (fresh("a"), fresh("c"));
        assert!(limiters.check_account(Limited::ResendVerification, &account).await.is_ok());
        assert!(limiters.check_account(Limited::PasswordReset, &account).await.is_ok());
        let refused = limiters.check_account(Limited::PasswordReset, &account).await.err().map(|e| e.retry_after_secs);
        assert!(matches!(refused, Some(Some(secs)) if secs > 60), "an hourly budget refills slowly: {refused:?}");
        // Logins do not spend it; other accounts have their own.
        assert!(limiters.check_account(Limited::Login, &account).await.is_ok());
        assert!(limiters.check_account(Limited::ResendVerification, &other).await.is_ok());
    }

    async fn sends_have_a_burst_then_a_rate(limiters: RateLimiters) {
        let session = uuid::Uuid::new_v4();
        for _ in 0..3 {
            assert_eq!(limiters.check_send(session).await, Ok(()));
        }
        assert_eq!(limiters.check_send(session).await, Err(1), "one more per second at 60 per minute");
        assert_eq!(limiters.check_send(uuid::Uuid::new_v4()).await, Ok(()));
    }

    async fn disabled_never_limits_but_sends_still_are(limiters: RateLimiters) {
        let ip = fresh("ip");
        for _ in 0..10 {
            assert!(limiters.check_ip(Limited::Login, &ip).await.is_ok());
        }
        let session = uuid::Uuid::new_v4();
        for _ in 0..3 {
            assert!(limiters.check_send(session).await.is_ok());
        }
        assert!(limiters.check_send(session).await.is_err());
    }

    macro_rules! on_every_store {
        ($($test:ident => $config:expr),* $(,)?) => {
            mod local {
                use super::*;
                $(#[tokio::test]
                async fn $test() {
                    super::$test(RateLimiters::new($config)).await;
                })*
            }
            mod redis {
                use super::*;
                $(#[tokio::test]
                async fn $test() {
                    super::$test(shared($config).await).await;
                })*
            }
        };
    }

    on_every_store!(
        budget_then_429_with_retry_after => config(2, 1, 3),
        e_mail_routes_share_an_hourly_budget_per_account => config(100, 100, 2),
        sends_have_a_burst_then_a_rate => config(100, 100, 2),
        disabled_never_limits_but_sends_still_are => RateLimitConfig { enabled: false, ..config(1, 1, 1) },
    );

    #[tokio::test]
    async fn replicas_spend_from_one_budget() {
        let replicas = [shared(config(5, 100, 10)).await, shared(config(5, 100, 10)).await];
        let ip = fresh("ip");
        let mut allowed = 0;
        for round in 0..12 {
            if replicas[round % 2].check_ip(Limited::Login, &ip).await.is_ok() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 5, "two replicas allow the limit once, not twice");
    }

    #[tokio::test]
    async fn without_redis_each_process_limits_on_its_own() {
        let server = anna_testkit::redis::RedisServer::start(false);
        let budgets = SharedBudgets::connect(&server.url(), "anna-test:rate", b"test-secret")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let limiters = RateLimiters::shared(config(3, 100, 10), budgets);
        let ip = fresh("ip");
        assert!(limiters.check_ip(Limited::Login, &ip).await.is_ok());
        let port = server.port();
        drop(server);
        // Bounded: another test's server could take the port once it is free.
        for _ in 0..250 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Redis is gone: the local budget (untouched so far) takes over, and still limits,
        // without waiting for Redis on every request.
        for _ in 0..3 {
            assert!(limiters.check_ip(Limited::Login, &ip).await.is_ok());
            assert!(limiters.shared_paused(), "after a failure Redis is left alone for a while");
        }
        assert!(limiters.check_ip(Limited::Login, &ip).await.is_err());
    }
}
