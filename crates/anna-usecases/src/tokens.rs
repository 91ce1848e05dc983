//! Access tokens: HS256 JWTs with the predecessor's claims, short-lived, checked on every
//! authenticated request.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

pub const ACCESS_TOKEN_USE: &str = "access";

/// How far in the future a token's `iat` may lie (clocks of API replicas differ a little).
const MAX_CLOCK_SKEW_SECS: i64 = 60;

/// The predecessor's claims (`sub`, `email`, `tokenUse`, `iat`, `exp`), and the generation of
/// the user's tokens at issue (`tokenGeneration`; absent from tokens issued before it existed).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessClaims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub token_use: String,
    pub iat: i64,
    pub exp: i64,
    #[serde(default)]
    pub token_generation: i64,
}

pub struct AccessTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("access token could not be signed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// An authenticated caller, from a valid access token.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user_id: Uuid,
    pub email: Option<String>,
    /// When the token expires (Unix seconds): long-lived connections end then.
    pub expires_at: i64,
    /// The generation of the user's tokens when it was issued; see `User::token_generation`.
    pub token_generation: i64,
}

impl AccessTokens {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self { encoding: EncodingKey::from_secret(secret), decoding: DecodingKey::from_secret(secret), validation, ttl }
    }

    pub fn ttl_secs(&self) -> u64 {
        self.ttl.as_secs()
    }

    pub fn issue(
        &self,
        user_id: Uuid,
        email: &str,
        token_generation: i64,
        now: OffsetDateTime,
    ) -> Result<String, TokenError> {
        let iat = now.unix_timestamp();
        let claims = AccessClaims {
            sub: user_id.to_string(),
            email: Some(email.to_owned()),
            token_use: ACCESS_TOKEN_USE.into(),
            iat,
            exp: iat.saturating_add(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX)),
            token_generation,
        };
        Ok(encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?)
    }

    /// `None` for a bad signature, another algorithm, an expired token, a token that is not an
    /// access token, or a subject that is not a user id.
    pub fn verify(&self, token: &str) -> Option<Authenticated> {
        let data = decode::<AccessClaims>(token, &self.decoding, &self.validation).ok()?;
        if data.claims.token_use != ACCESS_TOKEN_USE {
            return None;
        }
        // Issued in the future (beyond the clock skew between API replicas): not ours.
        if data.claims.iat > OffsetDateTime::now_utc().unix_timestamp().saturating_add(MAX_CLOCK_SKEW_SECS) {
            return None;
        }
        let user_id = Uuid::parse_str(&data.claims.sub).ok()?;
        Some(Authenticated {
            user_id,
            email: data.claims.email,
            expires_at: data.claims.exp,
            token_generation: data.claims.token_generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_verify() {
        let keys = AccessTokens::new(b"k", Duration::from_secs(900));
        let id = Uuid::new_v4();
        let token = keys.issue(id, "a@b.co", 0, OffsetDateTime::now_utc()).unwrap_or_else(|e| panic!("{e}"));
        let auth = keys.verify(&token).unwrap_or_else(|| panic!("valid token refused"));
        assert_eq!(auth.user_id, id);
        assert!(AccessTokens::new(b"other", Duration::from_secs(900)).verify(&token).is_none());
        let expired = keys
            .issue(id, "a@b.co", 0, OffsetDateTime::now_utc() - time::Duration::hours(1))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(keys.verify(&expired).is_none());
    }

    #[test]
    fn tokens_carry_their_generation() {
        let keys = AccessTokens::new(b"k", Duration::from_secs(900));
        let id = Uuid::new_v4();
        let token = keys.issue(id, "a@b.co", 3, OffsetDateTime::now_utc()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keys.verify(&token).map(|a| a.token_generation), Some(3));
        // Tokens issued before the claim existed count as generation 0.
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let older = serde_json::json!({"sub": id.to_string(), "tokenUse": "access", "iat": now, "exp": now + 60});
        let older = encode(&Header::new(Algorithm::HS256), &older, &EncodingKey::from_secret(b"k"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keys.verify(&older).map(|a| a.token_generation), Some(0));
    }

    #[test]
    fn refuses_tokens_issued_in_the_future() {
        let keys = AccessTokens::new(b"k", Duration::from_secs(900));
        let id = Uuid::new_v4();
        let soon = keys.issue(id, "a@b.co", 0, OffsetDateTime::now_utc() + time::Duration::seconds(30));
        assert!(soon.ok().and_then(|t| keys.verify(&t)).is_some(), "within the clock skew");
        let later = keys.issue(id, "a@b.co", 0, OffsetDateTime::now_utc() + time::Duration::hours(1));
        assert!(later.ok().and_then(|t| keys.verify(&t)).is_none(), "an hour ahead");
    }

    #[test]
    fn refuses_non_access_tokens() {
        let keys = AccessTokens::new(b"k", Duration::from_secs(900));
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = AccessClaims {
            sub: Uuid::new_v4().to_string(),
            email: None,
            token_use: "refresh".into(),
            iat: now,
            exp: now + 60,
            token_generation: 0,
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"k"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(keys.verify(&token).is_none());
    }
}
