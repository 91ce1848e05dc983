//! Domain-event subscribers.
//!
//! E-mail subscribers have an external effect: they are at-least-once (a crash between sending
//! and recording the event as applied sends the e-mail again on redelivery). The one-time
//! secrets an e-mail carries travel sealed in the event (`anna_domain::secrets::Sealer`); the
//! subscriber opens them with the key derived from `AUTH_JWT_SECRET`.

use std::sync::Arc;

use anna_domain::events::{
    self, ResetSecrets, USER_PASSWORD_RESET_REQUESTED, USER_VERIFICATION_TOKEN_ISSUED, VerificationSecrets,
};
use anna_domain::secrets::Sealer;
use anna_domain::user::{IssuedPasswordReset, IssuedVerification};
use anna_store::UnitOfWork;
use anna_streams::consumer::{Effect, HandlerError, ReceivedEvent, Subscriber};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::email::{EmailSender, templates};

fn payload_str<'a>(event: &'a ReceivedEvent, field: &str) -> Result<&'a str, HandlerError> {
    event
        .event
        .payload
        .get(field)
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| HandlerError::new(format!("payload has no {field}")))
}

fn payload_time(event: &ReceivedEvent, field: &str) -> Result<OffsetDateTime, HandlerError> {
    OffsetDateTime::parse(payload_str(event, field)?, &Rfc3339)
        .map_err(|e| HandlerError::new(format!("payload {field}: {e}")))
}

/// `user.verification.token_issued` → the verification e-mail (code and link).
pub struct SendVerificationEmail {
    pub sender: Arc<dyn EmailSender>,
    pub sealer: Sealer,
    pub app_base_url: String,
}

#[async_trait::async_trait]
impl Subscriber for SendVerificationEmail {
    fn name(&self) -> &'static str {
        "SendUserVerificationEmailOnUserVerificationTokenIssued"
    }

    fn event_names(&self) -> Vec<&'static str> {
        vec![USER_VERIFICATION_TOKEN_ISSUED]
    }

    fn effect(&self) -> Effect {
        Effect::External
    }

    async fn handle(&self, received: &ReceivedEvent, _uow: Option<&mut dyn UnitOfWork>) -> Result<(), HandlerError> {
        let secrets: VerificationSecrets = events::open_secrets(&received.event, &self.sealer)
            .map_err(|e| HandlerError::new(format!("verification secrets: {e}")))?;
        let user_id = Uuid::parse_str(&received.event.aggregate_id)
            .map_err(|e| HandlerError::new(format!("aggregate id: {e}")))?;
        let email = payload_str(received, "email")?;
        let reason = payload_str(received, "reason").unwrap_or("register");
        let issued = IssuedVerification {
            token: secrets.token,
            code: secrets.code,
            expires_at: payload_time(received, "verificationTokenExpiresAt")?,
        };
        let message = templates::verification_email(&self.app_base_url, user_id, email, &issued, reason);
        self.sender.send(&message).await.map_err(HandlerError::new)?;
        tracing::info!(%user_id, provider = self.sender.kind(), reason, "verification e-mail sent");
        Ok(())
    }
}

/// `user.password_reset.requested` → the reset e-mail (link).
pub struct SendPasswordResetEmail {
    pub sender: Arc<dyn EmailSender>,
    pub sealer: Sealer,
    pub app_base_url: String,
}

#[async_trait::async_trait]
impl Subscriber for SendPasswordResetEmail {
    fn name(&self) -> &'static str {
        "SendUserPasswordResetEmailOnUserPasswordResetRequested"
    }

    fn event_names(&self) -> Vec<&'static str> {
        vec![USER_PASSWORD_RESET_REQUESTED]
    }

    fn effect(&self) -> Effect {
        Effect::External
    }

    async fn handle(&self, received: &ReceivedEvent, _uow: Option<&mut dyn UnitOfWork>) -> Result<(), HandlerError> {
        let secrets: ResetSecrets = events::open_secrets(&received.event, &self.sealer)
            .map_err(|e| HandlerError::new(format!("reset secrets: {e}")))?;
        let email = payload_str(received, "email")?;
        let issued =
            IssuedPasswordReset { token: secrets.token, expires_at: payload_time(received, "resetTokenExpiresAt")? };
        let message = templates::password_reset_email(&self.app_base_url, email, &issued);
        self.sender.send(&message).await.map_err(HandlerError::new)?;
        tracing::info!(user_id = %received.event.aggregate_id, provider = self.sender.kind(), "password-reset e-mail sent");
        Ok(())
    }
}

/// Every domain event → `event_stats` (count and latest occurrence per event name). A database
/// subscriber: its count and its applied-event record commit together, so each event counts
/// exactly once however often it is delivered.
pub struct EventStatistics {
    pub event_names: Vec<&'static str>,
}

impl EventStatistics {
    /// Counts every event anna emits today.
    pub fn all_events() -> Self {
        Self {
            event_names: vec![
                events::USER_REGISTERED,
                USER_VERIFICATION_TOKEN_ISSUED,
                events::USER_VERIFIED,
                USER_PASSWORD_RESET_REQUESTED,
                events::USER_PASSWORD_RESET_COMPLETED,
            ],
        }
    }
}

#[async_trait::async_trait]
impl Subscriber for EventStatistics {
    fn name(&self) -> &'static str {
        "EventStatisticsProjection"
    }

    fn event_names(&self) -> Vec<&'static str> {
        self.event_names.clone()
    }

    fn effect(&self) -> Effect {
        Effect::Database
    }

    async fn handle(&self, received: &ReceivedEvent, uow: Option<&mut dyn UnitOfWork>) -> Result<(), HandlerError> {
        let uow = uow.ok_or_else(|| HandlerError::new("database subscriber called without a unit of work"))?;
        uow.count_event(&received.event.event_name, received.event.occurred_on).await?;
        Ok(())
    }

    /// One write per event name per batch.
    async fn handle_batch(
        &self,
        events: &[&ReceivedEvent],
        uow: &mut dyn UnitOfWork,
    ) -> Result<(), (Option<usize>, HandlerError)> {
        let mut per_name: Vec<(&str, i64, time::OffsetDateTime)> = Vec::new();
        for event in events {
            let (name, at) = (event.event.event_name.as_str(), event.event.occurred_on);
            match per_name.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, count, last)) => {
                    *count += 1;
                    *last = (*last).max(at);
                }
                None => per_name.push((name, 1, at)),
            }
        }
        for (name, count, last) in per_name {
            uow.count_events(name, count, last).await.map_err(|e| (None, HandlerError::from(e)))?;
        }
        Ok(())
    }
}
