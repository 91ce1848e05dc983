//! Domain events: the envelope written to `outbox_events` and their names and payloads.
//!
//! Payloads carry no secret in clear: no verification code, link token or reset token.

use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::user::{IssuedPasswordReset, IssuedVerification, User, iso};

pub const USER_REGISTERED: &str = "user.registered";
pub const USER_VERIFICATION_TOKEN_ISSUED: &str = "user.verification.token_issued";
pub const USER_VERIFIED: &str = "user.verified";
pub const USER_PASSWORD_RESET_REQUESTED: &str = "user.password_reset.requested";
pub const USER_PASSWORD_RESET_COMPLETED: &str = "user.password_reset.completed";

/// Every event carries its id, name, aggregate, time, tenant where it has one, payload, and
/// the W3C `traceparent` of the request that caused it (set by the caller, if any).
#[derive(Debug, Clone, PartialEq)]
pub struct DomainEvent {
    pub event_id: Uuid,
    pub event_name: String,
    pub aggregate_id: String,
    pub occurred_on: OffsetDateTime,
    pub tenant_id: Option<String>,
    pub payload: Value,
    pub traceparent: Option<String>,
}

impl DomainEvent {
    pub fn new(event_name: &str, aggregate_id: impl Into<String>, occurred_on: OffsetDateTime, payload: Value) -> Self {
        Self {
            event_id: Uuid::new_v4(),
            event_name: event_name.to_owned(),
            aggregate_id: aggregate_id.into(),
            occurred_on,
            tenant_id: None,
            payload,
            traceparent: None,
        }
    }

    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }
}

pub(crate) fn user_registered(user: &User, now: OffsetDateTime) -> DomainEvent {
    let payload = json!({
        "name": user.name,
        "email": user.email,
        "status": user.status.as_str(),
        "verificationTokenExpiresAt": user.verification_token_expires_at.map(iso),
    });
    DomainEvent::new(USER_REGISTERED, user.id.to_string(), now, payload)
}

pub(crate) fn user_verification_token_issued(
    user: &User,
    issued: &IssuedVerification,
    reason: &str,
    now: OffsetDateTime,
) -> DomainEvent {
    let payload = json!({
        "email": user.email,
        "verificationTokenExpiresAt": iso(issued.expires_at),
        "reason": reason,
    });
    DomainEvent::new(USER_VERIFICATION_TOKEN_ISSUED, user.id.to_string(), now, payload)
}

pub(crate) fn user_verified(user: &User, now: OffsetDateTime) -> DomainEvent {
    let payload = json!({ "email": user.email, "verifiedAt": iso(now) });
    DomainEvent::new(USER_VERIFIED, user.id.to_string(), now, payload)
}

pub(crate) fn user_password_reset_requested(
    user: &User,
    issued: &IssuedPasswordReset,
    now: OffsetDateTime,
) -> DomainEvent {
    let payload = json!({ "email": user.email, "resetTokenExpiresAt": iso(issued.expires_at) });
    DomainEvent::new(USER_PASSWORD_RESET_REQUESTED, user.id.to_string(), now, payload)
}

pub(crate) fn user_password_reset_completed(user: &User, now: OffsetDateTime) -> DomainEvent {
    let payload = json!({ "email": user.email, "resetAt": iso(now) });
    DomainEvent::new(USER_PASSWORD_RESET_COMPLETED, user.id.to_string(), now, payload)
}
