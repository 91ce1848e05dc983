//! W3C trace context across the outbox and the streams: the request's `traceparent` is stored
//! with each outbox row and carried in each stream entry, so relay and consumer spans continue
//! the trace that caused the event.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";

/// The `traceparent` of the current span, when it belongs to a sampled or recorded trace
/// (that is, when the OpenTelemetry layer is installed).
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&Span::current())
}

pub fn traceparent_of(span: &Span) -> Option<String> {
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the remote span described by `traceparent` (ignored when absent or
/// malformed).
pub fn set_parent(span: &Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent.filter(|t| !t.is_empty()) else { return };
    let carrier: HashMap<String, String> = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(context);
}
