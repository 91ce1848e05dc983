//! Domain events: the envelope written to `outbox_events` and their names and payloads.
//!
//! Payloads carry no secret in clear: no verification code, link token or reset token.

use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::secrets::Sealer;
use crate::user::{IssuedPasswordReset, IssuedVerification, User, iso};

/// Payload field holding the sealed one-time secrets (see [`Sealer`]).
pub const SEALED_SECRETS: &str = "sealedSecrets";
/// Payload field of message events holding the raw message for the message history. Tenants
/// read it through the history routes (`includeRaw=true`), not in their events.
pub const RAW_MESSAGE: &str = "raw";

/// An event's payload as tenants see it (WebSocket frames, webhook deliveries): without the
/// fields kept for anna's own subscribers.
pub fn tenant_payload(payload: &Value) -> Value {
    match payload {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .filter(|(name, _)| name.as_str() != SEALED_SECRETS && name.as_str() != RAW_MESSAGE)
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The secrets sealed into `user.verification.token_issued`.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct VerificationSecrets {
    pub code: String,
    pub token: String,
}

/// The secret sealed into `user.password_reset.requested`.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ResetSecrets {
    pub token: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenSecretsError {
    #[error("event has no sealed secrets")]
    Missing,
    #[error(transparent)]
    Seal(#[from] crate::secrets::SealError),
    #[error("sealed secrets are not the expected JSON")]
    Shape,
}

/// Seals `secrets` for the event of `aggregate_id`. `None` only if encryption itself failed,
/// which the subscriber then reports (the user can ask for a new code).
fn seal_json<T: serde::Serialize>(sealer: &Sealer, secrets: &T, aggregate_id: &str) -> Option<String> {
    let plaintext = serde_json::to_vec(secrets).ok()?;
    sealer.seal(&plaintext, aggregate_id).ok()
}

/// Opens the sealed secrets of an event.
pub fn open_secrets<T: serde::de::DeserializeOwned>(
    event: &DomainEvent,
    sealer: &Sealer,
) -> Result<T, OpenSecretsError> {
    let sealed = event.payload.get(SEALED_SECRETS).and_then(Value::as_str).ok_or(OpenSecretsError::Missing)?;
    let plaintext = sealer.open(sealed, &event.aggregate_id)?;
    serde_json::from_slice(&plaintext).map_err(|_| OpenSecretsError::Shape)
}

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
    sealer: &Sealer,
) -> DomainEvent {
    let secrets = VerificationSecrets { code: issued.code.clone(), token: issued.token.clone() };
    let payload = json!({
        "email": user.email,
        "verificationTokenExpiresAt": iso(issued.expires_at),
        "reason": reason,
        SEALED_SECRETS: seal_json(sealer, &secrets, &user.id.to_string()),
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
    sealer: &Sealer,
) -> DomainEvent {
    let secrets = ResetSecrets { token: issued.token.clone() };
    let payload = json!({
        "email": user.email,
        "resetTokenExpiresAt": iso(issued.expires_at),
        SEALED_SECRETS: seal_json(sealer, &secrets, &user.id.to_string()),
    });
    DomainEvent::new(USER_PASSWORD_RESET_REQUESTED, user.id.to_string(), now, payload)
}

pub(crate) fn user_password_reset_completed(user: &User, now: OffsetDateTime) -> DomainEvent {
    let payload = json!({ "email": user.email, "resetAt": iso(now) });
    DomainEvent::new(USER_PASSWORD_RESET_COMPLETED, user.id.to_string(), now, payload)
}
