//! How a domain event travels in a stream entry: the predecessor's flat fields (`outboxId`,
//! `eventName`, `eventId`, `aggregateId`, `occurredOn`, `payload`) plus `tenantId` and the W3C
//! `traceparent` when they are set.

use anna_domain::DomainEvent;
use anna_domain::user::iso;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::Fields;

pub const OUTBOX_ID: &str = "outboxId";
pub const EVENT_NAME: &str = "eventName";
pub const EVENT_ID: &str = "eventId";
pub const AGGREGATE_ID: &str = "aggregateId";
pub const OCCURRED_ON: &str = "occurredOn";
pub const PAYLOAD: &str = "payload";
pub const TENANT_ID: &str = "tenantId";
pub const TRACEPARENT: &str = "traceparent";
/// Fields a dead-letter entry adds to the original ones.
pub const DLQ_ERROR: &str = "error";
pub const DLQ_ATTEMPTS: &str = "attempts";
pub const DLQ_SUBSCRIBER: &str = "subscriber";
pub const DLQ_FAILED_AT: &str = "failedAt";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("entry has no {0} field")]
    Missing(&'static str),
    #[error("entry field {field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// The fields of the stream entry that carries `event` (from outbox row `outbox_id`, if any).
pub fn to_fields(event: &DomainEvent, outbox_id: Option<Uuid>) -> Fields {
    let mut fields = Fields::new();
    if let Some(outbox_id) = outbox_id {
        fields.insert(OUTBOX_ID.into(), outbox_id.to_string());
    }
    fields.insert(EVENT_NAME.into(), event.event_name.clone());
    fields.insert(EVENT_ID.into(), event.event_id.to_string());
    fields.insert(AGGREGATE_ID.into(), event.aggregate_id.clone());
    fields.insert(OCCURRED_ON.into(), iso(event.occurred_on));
    fields.insert(PAYLOAD.into(), event.payload.to_string());
    if let Some(tenant_id) = &event.tenant_id {
        fields.insert(TENANT_ID.into(), tenant_id.clone());
    }
    if let Some(traceparent) = &event.traceparent {
        fields.insert(TRACEPARENT.into(), traceparent.clone());
    }
    fields
}

fn required<'a>(fields: &'a Fields, name: &'static str) -> Result<&'a str, EnvelopeError> {
    fields.get(name).map(String::as_str).filter(|v| !v.is_empty()).ok_or(EnvelopeError::Missing(name))
}

/// The event carried by a stream entry.
pub fn from_fields(fields: &Fields) -> Result<DomainEvent, EnvelopeError> {
    let event_id = required(fields, EVENT_ID)?;
    let event_id =
        Uuid::parse_str(event_id).map_err(|e| EnvelopeError::Invalid { field: EVENT_ID, reason: e.to_string() })?;
    let occurred_on = OffsetDateTime::parse(required(fields, OCCURRED_ON)?, &Rfc3339)
        .map_err(|e| EnvelopeError::Invalid { field: OCCURRED_ON, reason: e.to_string() })?;
    let payload = match fields.get(PAYLOAD) {
        None => serde_json::Value::Object(serde_json::Map::new()),
        Some(raw) => {
            serde_json::from_str(raw).map_err(|e| EnvelopeError::Invalid { field: PAYLOAD, reason: e.to_string() })?
        }
    };
    Ok(DomainEvent {
        event_id,
        event_name: required(fields, EVENT_NAME)?.to_owned(),
        aggregate_id: required(fields, AGGREGATE_ID)?.to_owned(),
        occurred_on,
        tenant_id: fields.get(TENANT_ID).cloned(),
        payload,
        traceparent: fields.get(TRACEPARENT).cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut event = DomainEvent::new(
            "user.registered",
            "agg",
            time::macros::datetime!(2026-01-03 04:05:06.789 UTC),
            serde_json::json!({"a": 1}),
        );
        event.tenant_id = Some("t".into());
        event.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let outbox = Uuid::new_v4();
        let fields = to_fields(&event, Some(outbox));
        assert_eq!(fields[OUTBOX_ID], outbox.to_string());
        assert_eq!(fields[OCCURRED_ON], "2026-01-03T04:05:06.789Z");
        assert_eq!(from_fields(&fields), Ok(event));
    }

    #[test]
    fn rejects_broken_entries() {
        let mut fields = Fields::new();
        assert_eq!(from_fields(&fields), Err(EnvelopeError::Missing(EVENT_ID)));
        fields.insert(EVENT_ID.into(), "nope".into());
        assert!(matches!(from_fields(&fields), Err(EnvelopeError::Invalid { field: EVENT_ID, .. })));
    }
}
