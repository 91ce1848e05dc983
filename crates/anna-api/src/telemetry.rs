//! Request ids, request logs and HTTP metrics.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::request_id::RequestId;
use tracing::Span;

/// Labels from closed sets only, so a client cannot grow the metrics: the method if it is a
/// standard one (else `other`), the route template (never the raw path; `unmatched` when no
/// route matched), the status code.
pub async fn track_http_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method.to_owned()), ("route", route), ("status", status)];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
    response
}

/// The span of one request: method, path (never the query string, which may carry secrets)
/// and the request id that is also returned in `x-request-id`.
pub fn request_span(request: &axum::http::Request<axum::body::Body>) -> Span {
    let request_id =
        request.extensions().get::<RequestId>().and_then(|id| id.header_value().to_str().ok()).unwrap_or("-");
    // The method and path are the client's text: cut, so a 60 KB method does not become a 60 KB
    // log line.
    use anna_domain::user::excerpt;
    let span = tracing::info_span!(
        "request",
        method = %excerpt(request.method().as_str()),
        path = %excerpt(request.uri().path()),
        request_id = %excerpt(request_id),
    );
    // Continue the caller's trace when it sent one.
    let traceparent = request.headers().get("traceparent").and_then(|v| v.to_str().ok());
    anna_streams::trace::set_parent(&span, traceparent);
    span
}

/// Stamps events with the current trace, so the relay and the consumers continue it.
pub fn traced(events: impl IntoIterator<Item = anna_domain::DomainEvent>) -> Vec<anna_domain::DomainEvent> {
    let traceparent = anna_streams::trace::current_traceparent();
    events.into_iter().map(|event| event.with_traceparent(traceparent.clone())).collect()
}

pub fn log_response<B>(response: &axum::http::Response<B>, latency: Duration, _span: &Span) {
    tracing::info!(
        status = response.status().as_u16(),
        latency_ms = latency.as_secs_f64() * 1000.0,
        "request completed"
    );
}

/// The method as a metric label: one of the standard methods, or `other`.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Histogram buckets for HTTP latency, in seconds.
pub const HTTP_LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
