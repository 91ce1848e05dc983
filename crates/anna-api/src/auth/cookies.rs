//! The refresh-token cookie.

use std::time::Duration;

use axum_extra::extract::cookie::{Cookie, SameSite};

/// The refresh cookie as the predecessor set it: `HttpOnly; Path=/; SameSite=Strict; Max-Age`,
/// `Secure` when configured.
pub fn refresh_cookie(name: &str, value: String, max_age: Duration, secure: bool) -> Cookie<'static> {
    Cookie::build((name.to_owned(), value))
        .http_only(true)
        .path("/")
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(time::Duration::seconds(i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX)))
        .build()
}

pub fn cleared_refresh_cookie(name: &str, secure: bool) -> Cookie<'static> {
    refresh_cookie(name, String::new(), Duration::ZERO, secure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_attributes() {
        let c = refresh_cookie("refresh_token", "abc".into(), Duration::from_secs(2_592_000), false).to_string();
        assert!(c.starts_with("refresh_token=abc"));
        for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=2592000"] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!c.contains("Secure"));
        assert!(refresh_cookie("r", "x".into(), Duration::from_secs(1), true).to_string().contains("Secure"));
        assert!(cleared_refresh_cookie("r", false).to_string().contains("Max-Age=0"));
    }
}
