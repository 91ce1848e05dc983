//! Per-client-IP and per-account limits on the routes that guess or send secrets.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

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

pub struct RateLimiters {
    enabled: bool,
    per_ip: DefaultKeyedRateLimiter<String>,
    per_account: DefaultKeyedRateLimiter<String>,
    emails_per_account: DefaultKeyedRateLimiter<String>,
    /// Messages per session: protects the tenant's number from WhatsApp's burst bans, so it
    /// applies even with `RATE_LIMIT_ENABLED=false`.
    sends: DefaultKeyedRateLimiter<uuid::Uuid>,
    clock: DefaultClock,
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
}

impl RateLimiters {
    pub fn new(config: RateLimitConfig) -> Self {
        Self {
            enabled: config.enabled,
            per_ip: RateLimiter::keyed(per_minute(config.per_ip_per_minute)),
            per_account: RateLimiter::keyed(per_minute(config.per_account_per_minute)),
            emails_per_account: RateLimiter::keyed(Quota::per_hour(
                NonZeroU32::new(config.emails_per_account_per_hour).unwrap_or(NonZeroU32::MIN),
            )),
            sends: RateLimiter::keyed(
                per_minute(config.send_per_minute)
                    .allow_burst(NonZeroU32::new(config.send_burst).unwrap_or(NonZeroU32::MIN)),
            ),
            clock: DefaultClock::default(),
        }
    }

    /// Spends one message of the session's send budget; `Err` holds the seconds to wait.
    pub fn check_send(&self, session_id: uuid::Uuid) -> Result<(), u64> {
        self.sends.check_key(&session_id).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            metrics::counter!("session_sends_rate_limited_total").increment(1);
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }

    /// Spends one request of the IP's budget for `route`.
    pub fn check_ip(&self, route: Limited, ip: &str) -> Result<(), ApiError> {
        self.check(&self.per_ip, format!("{}|{ip}", route.as_str()))
    }

    /// Spends one request of the account's budget for `route` (normalised e-mail or user id);
    /// routes that send e-mail also spend from the account's hourly e-mail budget.
    pub fn check_account(&self, route: Limited, account: &str) -> Result<(), ApiError> {
        self.check(&self.per_account, format!("{}|{account}", route.as_str()))?;
        if matches!(route, Limited::ResendVerification | Limited::PasswordReset) {
            self.check(&self.emails_per_account, account.to_owned())?;
        }
        Ok(())
    }

    fn check(&self, limiter: &DefaultKeyedRateLimiter<String>, key: String) -> Result<(), ApiError> {
        if !self.enabled {
            return Ok(());
        }
        limiter.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            metrics::counter!("auth_rate_limited_total").increment(1);
            ApiError::too_many_requests(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
        })
    }

    /// Forgets keys whose budget is full again, so memory stays bounded.
    pub fn retain_recent(&self) {
        self.per_ip.retain_recent();
        self.per_account.retain_recent();
        self.sends.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_then_429_with_retry_after() {
        let limiters = RateLimiters::new(RateLimitConfig {
            enabled: true,
            per_ip_per_minute: 2,
            per_account_per_minute: 1,
            emails_per_account_per_hour: 3,
            send_per_minute: 60,
            send_burst: 20,
        });
        assert!(limiters.check_ip(Limited::Login, "1.2.3.4").is_ok());
        assert!(limiters.check_ip(Limited::Login, "1.2.3.4").is_ok());
        let refused = limiters.check_ip(Limited::Login, "1.2.3.4").err().map(|e| e.retry_after_secs);
        assert!(matches!(refused, Some(Some(secs)) if (1..=30).contains(&secs)));
        // Other routes and other clients have their own budgets.
        assert!(limiters.check_ip(Limited::Verify, "1.2.3.4").is_ok());
        assert!(limiters.check_ip(Limited::Login, "5.6.7.8").is_ok());
        assert!(limiters.check_account(Limited::Login, "a@b.co").is_ok());
        assert!(limiters.check_account(Limited::Login, "a@b.co").is_err());
    }

    #[test]
    fn e_mail_routes_share_an_hourly_budget_per_account() {
        let limiters = RateLimiters::new(RateLimitConfig {
            enabled: true,
            per_ip_per_minute: 100,
            per_account_per_minute: 100,
            emails_per_account_per_hour: 2,
            send_per_minute: 60,
            send_burst: 20,
        });
        assert!(limiters.check_account(Limited::ResendVerification, "a@b.co").is_ok());
        assert!(limiters.check_account(Limited::PasswordReset, "a@b.co").is_ok());
        let refused = limiters.check_account(Limited::PasswordReset, "a@b.co").err().map(|e| e.retry_after_secs);
        assert!(matches!(refused, Some(Some(secs)) if secs > 60), "an hourly budget refills slowly");
        // Logins do not spend it; other accounts have their own.
        assert!(limiters.check_account(Limited::Login, "a@b.co").is_ok());
        assert!(limiters.check_account(Limited::ResendVerification, "c@d.co").is_ok());
    }

    #[test]
    fn disabled_never_limits() {
        let limiters = RateLimiters::new(RateLimitConfig {
            enabled: false,
            per_ip_per_minute: 1,
            per_account_per_minute: 1,
            emails_per_account_per_hour: 1,
            send_per_minute: 60,
            send_burst: 20,
        });
        for _ in 0..10 {
            assert!(limiters.check_ip(Limited::Login, "1.2.3.4").is_ok());
        }
    }
}
