//! Webhooks: a tenant's endpoints, the events they subscribe to, and how deliveries are
//! signed.
//!
//! Signatures follow the Standard Webhooks 1.0 specification, so receivers verify them with
//! its reference libraries: `webhook-id` (the event id, the same on every retry),
//! `webhook-timestamp` (Unix seconds of the attempt) and `webhook-signature`
//! (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, several separated by spaces while
//! a rotated secret is still valid). Secrets are `whsec_<base64 of 32 random bytes>`, shown to
//! the tenant once; the database keeps them sealed (XChaCha20-Poly1305 under a key derived
//! from the server secret, bound to the endpoint id).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::{Value, json};
use sha2::Sha256;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::events::{DomainEvent, tenant_payload};
use crate::secrets::{SealError, Sealer};
use crate::session;
use crate::user::iso;
use crate::{InvalidArgument, net};

pub const WEBHOOK_CREATED: &str = "webhook.created";
pub const WEBHOOK_UPDATED: &str = "webhook.updated";
pub const WEBHOOK_SECRET_ROTATED: &str = "webhook.secret_rotated";
pub const WEBHOOK_DELETED: &str = "webhook.deleted";

/// Every event a webhook can receive: the events that belong to a tenant. Account events
/// (`user.*`) are not among them: they concern the operator's sign-up flow and carry e-mail
/// addresses and sealed one-time secrets.
pub const DELIVERABLE_EVENTS: &[&str] = &[
    session::SESSION_CREATED,
    session::SESSION_QR_UPDATED,
    session::SESSION_PAIR_CODE_ISSUED,
    session::SESSION_CONNECTED,
    session::SESSION_DISCONNECTED,
    session::SESSION_FAILED,
    session::SESSION_LOGGED_OUT,
    session::SESSION_DELETED,
    session::SESSION_MESSAGE_SENT,
    session::SESSION_MESSAGE_FAILED,
    session::SESSION_MESSAGE_RECEIVED,
    session::SESSION_MESSAGE_STATUS,
    session::SESSION_MESSAGES_EDIT,
    session::SESSION_MESSAGES_DELETE,
    session::SESSION_MESSAGES_REACTION,
    session::SESSION_MESSAGES_MEDIA,
    session::SESSION_PRESENCE_UPDATE,
    session::SESSION_CHATS_UPDATE,
    session::SESSION_HISTORY_SYNC,
    session::SESSION_COMMAND_FAILED,
    WEBHOOK_CREATED,
    WEBHOOK_UPDATED,
    WEBHOOK_SECRET_ROTATED,
    WEBHOOK_DELETED,
];

pub const MAX_URL_CHARS: usize = 2048;
pub const MAX_DESCRIPTION_CHARS: usize = 500;
pub const MAX_FILTERS: usize = 50;
const MAX_FILTER_CHARS: usize = 100;
const SECRET_PREFIX: &str = "whsec_";
const SECRET_BYTES: usize = 32;
/// The specification's bounds on a secret's size.
const SECRET_MIN_BYTES: usize = 24;
const SECRET_MAX_BYTES: usize = 64;

/// A webhook URL as a tenant may give it: `http` or `https`, a host, no credentials (receivers
/// authenticate deliveries by their signature), at most [`MAX_URL_CHARS`]. With
/// `allow_private` false, a host that is an IP literal of a non-public address, or a name of
/// this machine, is refused here; names are checked again on every delivery, after resolution.
pub fn parse_url(raw: &str, allow_private: bool) -> Result<url::Url, InvalidArgument> {
    let invalid = |why: &str| InvalidArgument(format!("url {why}"));
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(invalid("is required"));
    }
    if raw.chars().count() > MAX_URL_CHARS {
        return Err(invalid(&format!("is longer than {MAX_URL_CHARS} characters")));
    }
    if raw.chars().any(char::is_control) {
        return Err(invalid("must not contain control characters"));
    }
    let url = url::Url::parse(raw).map_err(|e| invalid(&format!("is not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("must use http or https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("must not contain credentials: verify the webhook-signature header instead"));
    }
    if url.fragment().is_some() {
        return Err(invalid("must not have a fragment"));
    }
    let host = url.host().ok_or_else(|| invalid("has no host"))?;
    if !allow_private {
        let refused = match host {
            url::Host::Ipv4(ip) => net::forbidden_reason(ip.into()),
            url::Host::Ipv6(ip) => net::forbidden_reason(ip.into()),
            url::Host::Domain(name) => net::is_local_name(name).then_some("a name of this machine"),
        };
        if let Some(reason) = refused {
            return Err(invalid(&format!("points to {reason}, which webhooks may not call")));
        }
    }
    Ok(url)
}

/// The events an endpoint subscribes to: exact names, prefixes ending in `.*`
/// (`session.message.*`), or `*` for all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFilter(Vec<String>);

impl EventFilter {
    pub fn all() -> Self {
        Self(vec!["*".into()])
    }

    pub fn parse(patterns: &[String]) -> Result<Self, InvalidArgument> {
        if patterns.is_empty() {
            return Err(InvalidArgument("events must name at least one event, prefix or \"*\"".into()));
        }
        if patterns.len() > MAX_FILTERS {
            return Err(InvalidArgument(format!("events lists more than {MAX_FILTERS} entries")));
        }
        let mut parsed: Vec<String> = Vec::with_capacity(patterns.len());
        for pattern in patterns {
            let pattern = pattern.trim();
            let well_formed = !pattern.is_empty()
                && pattern.len() <= MAX_FILTER_CHARS
                && pattern.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._*".contains(c))
                && (pattern == "*"
                    || !pattern.contains('*')
                    || (pattern.ends_with(".*") && pattern.matches('*').count() == 1));
            if !well_formed {
                return Err(InvalidArgument(format!(
                    "events entry {pattern:?} is not an event name, a prefix ending in \".*\" or \"*\""
                )));
            }
            if !pattern.contains('*') && !DELIVERABLE_EVENTS.contains(&pattern) {
                return Err(InvalidArgument(format!("events entry {pattern:?} is not an event webhooks deliver")));
            }
            if !parsed.iter().any(|p| p == pattern) {
                parsed.push(pattern.to_owned());
            }
        }
        Ok(Self(parsed))
    }

    /// A filter read back from the database (validated when it was stored).
    pub fn from_stored(patterns: Vec<String>) -> Self {
        Self(patterns)
    }

    pub fn patterns(&self) -> &[String] {
        &self.0
    }

    pub fn matches(&self, event_name: &str) -> bool {
        self.0.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => event_name.starts_with(prefix),
            None => pattern == event_name,
        })
    }
}

/// An endpoint's signing secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(..)")
    }
}

impl SigningSecret {
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; SECRET_BYTES];
        rand::rng().fill(bytes.as_mut_slice());
        Self(bytes)
    }

    /// `whsec_…` as the tenant sees it.
    pub fn parse(text: &str) -> Result<Self, InvalidArgument> {
        let invalid = || InvalidArgument(format!("a secret is {SECRET_PREFIX} followed by base64"));
        let encoded = text.strip_prefix(SECRET_PREFIX).ok_or_else(invalid)?;
        let bytes = STANDARD.decode(encoded).map_err(|_| invalid())?;
        if !(SECRET_MIN_BYTES..=SECRET_MAX_BYTES).contains(&bytes.len()) {
            return Err(InvalidArgument(format!(
                "a secret holds {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} bytes, this one {}",
                bytes.len()
            )));
        }
        Ok(Self(bytes))
    }

    /// The `whsec_…` text: shown to the tenant once, never logged.
    pub fn reveal(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.0))
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub fn sign(&self, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
        mac.update(webhook_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    fn seal(&self, sealer: &Sealer, endpoint_id: Uuid) -> Result<String, SealError> {
        sealer.seal(&self.0, &seal_context(endpoint_id))
    }

    fn open(sealed: &str, sealer: &Sealer, endpoint_id: Uuid) -> Result<Self, SealError> {
        sealer.open(sealed, &seal_context(endpoint_id)).map(Self)
    }
}

fn seal_context(endpoint_id: Uuid) -> String {
    format!("webhook:{endpoint_id}")
}

/// The sealer of webhook secrets: its own key, derived from the server secret.
pub fn secret_sealer(server_secret: &[u8]) -> Sealer {
    Sealer::with_label(server_secret, b"anna/webhook-secrets/v1")
}

/// The `webhook-signature` header: one signature per valid secret, separated by spaces.
pub fn signature_header(secrets: &[SigningSecret], webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets.iter().map(|s| s.sign(webhook_id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

/// A tenant's webhook endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookEndpoint {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub url: String,
    pub description: String,
    pub filter: EventFilter,
    pub enabled: bool,
    /// Events of one aggregate (a session) are delivered one after the other: the next waits
    /// until the previous one succeeded or was dead-lettered.
    pub ordered: bool,
    pub secret_sealed: String,
    /// The secret before the last rotation, still signing until `previous_secret_expires_at`.
    pub previous_secret_sealed: Option<String>,
    pub previous_secret_expires_at: Option<OffsetDateTime>,
    /// Consecutive failed attempts (the circuit breaker's count); zero after a success.
    pub circuit_failures: u32,
    /// While in the future, no delivery is attempted (the circuit is open).
    pub circuit_open_until: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// What a tenant may change of an endpoint; `None` keeps the value.
#[derive(Debug, Clone, Default)]
pub struct EndpointChanges {
    pub url: Option<String>,
    pub description: Option<String>,
    pub filter: Option<EventFilter>,
    pub enabled: Option<bool>,
    pub ordered: Option<bool>,
}

/// A new endpoint's settings, validated by the caller.
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    pub url: String,
    pub description: String,
    pub filter: EventFilter,
    pub enabled: bool,
    pub ordered: bool,
}

pub fn check_description(description: &str) -> Result<(), InvalidArgument> {
    if description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(InvalidArgument(format!("description is longer than {MAX_DESCRIPTION_CHARS} characters")));
    }
    if description.chars().any(|c| c.is_control() && c != '\n') {
        return Err(InvalidArgument("description must not contain control characters".into()));
    }
    Ok(())
}

impl WebhookEndpoint {
    /// A new endpoint with a fresh secret (returned once, for the tenant to see).
    pub fn create(
        tenant_id: Uuid,
        settings: NewEndpoint,
        sealer: &Sealer,
        now: OffsetDateTime,
    ) -> Result<(Self, SigningSecret, DomainEvent), SealError> {
        let id = Uuid::now_v7();
        let secret = SigningSecret::generate();
        let endpoint = Self {
            id,
            tenant_id,
            url: settings.url,
            description: settings.description,
            filter: settings.filter,
            enabled: settings.enabled,
            ordered: settings.ordered,
            secret_sealed: secret.seal(sealer, id)?,
            previous_secret_sealed: None,
            previous_secret_expires_at: None,
            circuit_failures: 0,
            circuit_open_until: None,
            created_at: now,
            updated_at: now,
        };
        let event = endpoint.event(WEBHOOK_CREATED, now);
        Ok((endpoint, secret, event))
    }

    fn event(&self, name: &str, now: OffsetDateTime) -> DomainEvent {
        // No URL (it may carry a receiver's token in its query) and no secret.
        let payload = json!({
            "webhookId": self.id.to_string(),
            "tenantId": self.tenant_id.to_string(),
            "events": self.filter.patterns(),
            "enabled": self.enabled,
            "ordered": self.ordered,
            "at": iso(now),
        });
        let mut event = DomainEvent::new(name, self.id.to_string(), now, payload);
        event.tenant_id = Some(self.tenant_id.to_string());
        event
    }

    /// Applies `changes`; `None` when nothing changed.
    pub fn change(&mut self, changes: EndpointChanges, now: OffsetDateTime) -> Option<DomainEvent> {
        let before = self.clone();
        if let Some(url) = changes.url {
            self.url = url;
        }
        if let Some(description) = changes.description {
            self.description = description;
        }
        if let Some(filter) = changes.filter {
            self.filter = filter;
        }
        if let Some(enabled) = changes.enabled {
            self.enabled = enabled;
            if enabled && !before.enabled {
                // Enabling again starts with a closed circuit: the tenant says it is fixed.
                self.circuit_failures = 0;
                self.circuit_open_until = None;
            }
        }
        if let Some(ordered) = changes.ordered {
            self.ordered = ordered;
        }
        if *self == before {
            return None;
        }
        self.updated_at = now;
        Some(self.event(WEBHOOK_UPDATED, now))
    }

    /// A new secret; the current one keeps signing (beside it) for `grace`.
    pub fn rotate_secret(
        &mut self,
        sealer: &Sealer,
        grace: std::time::Duration,
        now: OffsetDateTime,
    ) -> Result<(SigningSecret, DomainEvent), SealError> {
        let secret = SigningSecret::generate();
        let grace = time::Duration::try_from(grace).unwrap_or(time::Duration::ZERO);
        self.previous_secret_sealed = Some(std::mem::replace(&mut self.secret_sealed, secret.seal(sealer, self.id)?));
        self.previous_secret_expires_at =
            Some(now.checked_add(grace).unwrap_or(time::macros::datetime!(9999-12-31 0:00 UTC)));
        self.updated_at = now;
        Ok((secret, self.event(WEBHOOK_SECRET_ROTATED, now)))
    }

    pub fn delete(&self, now: OffsetDateTime) -> DomainEvent {
        self.event(WEBHOOK_DELETED, now)
    }

    /// The secrets that sign a delivery at `now`: the current one, and the previous one while
    /// its grace period lasts.
    pub fn signing_secrets(&self, sealer: &Sealer, now: OffsetDateTime) -> Result<Vec<SigningSecret>, SealError> {
        let mut secrets = vec![SigningSecret::open(&self.secret_sealed, sealer, self.id)?];
        if let (Some(previous), Some(until)) = (&self.previous_secret_sealed, self.previous_secret_expires_at)
            && until > now
        {
            secrets.push(SigningSecret::open(previous, sealer, self.id)?);
        }
        Ok(secrets)
    }

    /// Whether this endpoint wants `event` (enabled, subscribed to its name, and the event is
    /// not older than the endpoint).
    pub fn wants(&self, event: &DomainEvent) -> bool {
        // Events carry milliseconds: compared at that precision, an event of the millisecond the
        // endpoint was created in is delivered rather than lost.
        let created_ms = self.created_at.replace_nanosecond(u32::from(self.created_at.millisecond()) * 1_000_000);
        self.enabled
            && event.tenant_id.as_deref() == Some(self.tenant_id.to_string().as_str())
            && self.filter.matches(&event.event_name)
            && created_ms.is_ok_and(|created| event.occurred_on >= created)
    }
}

/// The body of a delivery, fixed when the delivery is created so that every attempt sends the
/// same bytes: `{type, timestamp, eventId, aggregateId, tenantId, data}` (and `sessionId` for
/// session events), the shape the Standard Webhooks specification recommends.
pub fn delivery_body(event: &DomainEvent) -> String {
    let data = tenant_payload(&event.payload);
    let mut body = json!({
        "type": event.event_name,
        "timestamp": iso(event.occurred_on),
        "eventId": event.event_id.to_string(),
        "aggregateId": event.aggregate_id,
        "tenantId": event.tenant_id,
        "data": data,
    });
    if event.event_name.starts_with("session.")
        && let Value::Object(fields) = &mut body
    {
        fields.insert("sessionId".into(), json!(event.aggregate_id));
    }
    body.to_string()
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;
    use crate::events::SEALED_SECRETS;

    #[test]
    fn signs_like_the_specification() {
        // The example of the Standard Webhooks test suite.
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_round_trip_and_stay_sealed() {
        let secret = SigningSecret::generate();
        let text = secret.reveal();
        assert!(text.starts_with("whsec_"));
        assert_eq!(SigningSecret::parse(&text).expect("parse"), secret);
        assert!(SigningSecret::parse("whsec_c2hvcnQ=").is_err());
        assert!(SigningSecret::parse("nope").is_err());
        let sealer = secret_sealer(b"server");
        let tenant = Uuid::new_v4();
        let settings = endpoint_settings();
        let now = OffsetDateTime::now_utc();
        let (mut endpoint, first, created) = WebhookEndpoint::create(tenant, settings, &sealer, now).expect("create");
        assert!(!endpoint.secret_sealed.contains(&first.reveal()));
        assert!(!created.payload.to_string().contains("whsec_"));
        assert_eq!(endpoint.signing_secrets(&sealer, now).expect("open"), vec![first.clone()]);
        let (second, _) = endpoint.rotate_secret(&sealer, std::time::Duration::from_secs(60), now).expect("rotate");
        assert_eq!(endpoint.signing_secrets(&sealer, now).expect("open"), vec![second.clone(), first]);
        let later = now + time::Duration::seconds(61);
        assert_eq!(endpoint.signing_secrets(&sealer, later).expect("open"), vec![second]);
        // Another server secret cannot open them.
        assert!(endpoint.signing_secrets(&secret_sealer(b"other"), now).is_err());
    }

    fn endpoint_settings() -> NewEndpoint {
        NewEndpoint {
            url: "https://example.com/hook".into(),
            description: String::new(),
            filter: EventFilter::all(),
            enabled: true,
            ordered: false,
        }
    }

    #[test]
    fn endpoints_want_events_from_the_millisecond_they_were_created_in() {
        let tenant = Uuid::new_v4();
        let settings = endpoint_settings();
        let created = time::macros::datetime!(2026-12-06 21:17:55.051_906 UTC);
        let (endpoint, _, _) =
            WebhookEndpoint::create(tenant, settings, &secret_sealer(b"server"), created).expect("create");
        let event_at = |at| {
            let mut event = DomainEvent::new(session::SESSION_CREATED, "s1", at, json!({}));
            event.tenant_id = Some(tenant.to_string());
            event
        };
        assert!(endpoint.wants(&event_at(time::macros::datetime!(2026-12-06 21:17:55.051 UTC))));
        assert!(!endpoint.wants(&event_at(time::macros::datetime!(2026-12-06 21:17:55.050 UTC))));
    }

    #[test]
    fn filters() {
        let filter = EventFilter::parse(&["session.message.*".into(), "session.status.connected".into()]).expect("ok");
        assert!(filter.matches("session.message.received"));
        assert!(filter.matches("session.status.connected"));
        assert!(!filter.matches("session.status.failed"));
        assert!(EventFilter::parse(&["*".into()]).expect("all").matches("webhook.created"));
        for bad in ["", "session.*.sent", "Session.created", "session.nope", "session*", "user.registered"] {
            assert!(EventFilter::parse(&[bad.into()]).is_err(), "{bad:?}");
        }
        assert!(EventFilter::parse(&[]).is_err());
    }

    #[test]
    fn urls() {
        assert!(parse_url("https://example.com/hooks?x=1", false).is_ok());
        for (bad, why) in [
            ("", "required"),
            ("ftp://example.com", "http or https"),
            ("https://user:pw@example.com", "credentials"),
            ("http://127.0.0.1:8080/", "loopback"),
            ("http://[::1]/", "loopback"),
            ("http://169.254.169.254/latest/meta-data", "link-local"),
            ("http://10.0.0.5/", "private"),
            ("http://localhost:3000/", "this machine"),
            ("not a url", "valid URL"),
        ] {
            let error = parse_url(bad, false).expect_err(bad).0;
            assert!(error.contains(why), "{bad}: {error}");
        }
        assert!(parse_url("http://127.0.0.1:8080/", true).is_ok());
    }

    #[test]
    fn bodies_carry_no_sealed_secrets() {
        let mut event = DomainEvent::new(
            session::SESSION_CONNECTED,
            "s1",
            OffsetDateTime::UNIX_EPOCH,
            json!({"phone": "1", SEALED_SECRETS: "x", crate::events::RAW_MESSAGE: {"key": {"id": "3EB0"}}}),
        );
        event.tenant_id = Some("t1".into());
        let body: Value = serde_json::from_str(&delivery_body(&event)).expect("json");
        assert_eq!(body["type"], session::SESSION_CONNECTED);
        assert_eq!(body["sessionId"], "s1");
        assert_eq!(body["data"]["phone"], "1");
        assert!(body["data"].get(SEALED_SECRETS).is_none());
        assert!(body["data"].get(crate::events::RAW_MESSAGE).is_none(), "the raw message is read through the API");
    }
}
