//! `AUTH_*`: tokens, secrets e-mailed to users, password hashing.

use std::time::Duration;

use anna_domain::password::Argon2Cost;
use anna_usecases::AccountsConfig;
use secrecy::SecretString;

use super::{ConfigError, Vars};

/// Browsers refuse cookies with a Max-Age above 400 days.
const MAX_COOKIE_AGE: Duration = Duration::from_secs(400 * 24 * 3600);

pub(super) fn read<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<AccountsConfig, ConfigError> {
    let dev = AccountsConfig::development();
    let refresh_token_ttl = vars.millis("AUTH_REFRESH_TOKEN_TTL_MS", 2_592_000_000)?;
    if refresh_token_ttl > MAX_COOKIE_AGE {
        return Err(ConfigError::Invalid {
            var: "AUTH_REFRESH_TOKEN_TTL_MS",
            shown: format!("{}", refresh_token_ttl.as_millis()),
            expected: "at most 34560000000 (400 days, the longest cookie lifetime browsers accept)",
        });
    }
    Ok(AccountsConfig {
        jwt_secret: vars
            .secret("AUTH_JWT_SECRET")
            .unwrap_or_else(|| SecretString::from(AccountsConfig::DEVELOPMENT_JWT_SECRET)),
        access_token_ttl: vars.millis("AUTH_ACCESS_TOKEN_TTL_MS", 900_000)?,
        refresh_token_ttl,
        refresh_reuse_grace: vars.millis_or_zero("AUTH_REFRESH_REUSE_GRACE_MS", 0)?,
        verification_ttl: vars.millis("AUTH_VERIFICATION_TTL_MS", 3_600_000)?,
        password_reset_ttl: vars.millis("AUTH_PASSWORD_RESET_TTL_MS", 3_600_000)?,
        max_secret_attempts: vars.positive("AUTH_MAX_SECRET_ATTEMPTS", 5, "a positive whole number")?,
        user_cache_ttl: user_cache_ttl(vars)?,
        user_cache_max: vars.parse("AUTH_USER_CACHE_MAX", dev.user_cache_max, "a number of users (0: none kept)")?,
        argon2: Argon2Cost {
            memory_kib: vars.positive(
                "AUTH_ARGON2_MEMORY_KIB",
                dev.argon2.memory_kib,
                "a memory cost in KiB (8 or more)",
            )?,
            iterations: vars.positive(
                "AUTH_ARGON2_ITERATIONS",
                dev.argon2.iterations,
                "a positive number of passes",
            )?,
            parallelism: vars.positive(
                "AUTH_ARGON2_PARALLELISM",
                dev.argon2.parallelism,
                "a positive number of lanes",
            )?,
        },
        hashing_concurrency: vars.positive(
            "AUTH_HASH_CONCURRENCY",
            std::thread::available_parallelism().map_or(2, |n| n.get()),
            "a positive number of concurrent password hashes",
        )?,
    })
}

/// At most a minute: the TTL is how late another replica may still accept an access token
/// voided by a logout everywhere.
fn user_cache_ttl<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<Duration, ConfigError> {
    let ttl = vars.millis_or_zero("AUTH_USER_CACHE_TTL_MS", 1000)?;
    if ttl > Duration::from_secs(60) {
        return Err(ConfigError::Invalid {
            var: "AUTH_USER_CACHE_TTL_MS",
            shown: ttl.as_millis().to_string(),
            expected: "at most 60000 (a minute)",
        });
    }
    Ok(ttl)
}
