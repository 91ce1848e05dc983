//! anna's HTTP API: routers by context, extractors, the single error-to-HTTP mapping and the
//! OpenAPI document.

pub mod auth;
pub mod config;
pub mod error;
pub mod extract;
pub mod health;
pub mod idempotency;
pub mod rate_limit;
pub mod state;
pub mod telemetry;
pub mod users;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::get;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

pub use config::ApiConfig;
pub use error::ApiError;
pub use state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "anna", description = "Multi-tenant WhatsApp sessions platform: users, authentication, sessions."),
    modifiers(&BearerAuth),
    tags(
        (name = "users", description = "Registration, verification, current user"),
        (name = "auth", description = "Login, refresh tokens, logout, password reset"),
        (name = "operations", description = "Health and readiness"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// The OpenAPI 3.1 document, generated from the handlers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().split_for_parts().1
}

fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi()).merge(users::router()).merge(auth::router()).merge(health::router())
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let (routes, openapi) = api_routes().split_for_parts();
    let mut app = routes.merge(SwaggerUi::new("/docs").url("/openapi.json", openapi));
    if state.config.metrics_on_api_port {
        app = app.route("/metrics", get(health::metrics));
    }
    let max_body = state.config.max_body_bytes;
    app.fallback(not_found)
        .route_layer(middleware::from_fn(telemetry::track_http_metrics))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(move |request, next| refuse_announced_oversize(max_body, request, next)))
        .layer(middleware::from_fn(security_headers))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(telemetry::request_span)
                        .on_request(())
                        .on_response(telemetry::log_response),
                )
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(CatchPanicLayer::custom(|_| {
                    IntoResponse::into_response(ApiError::internal("handler panicked"))
                })),
        )
        .with_state(state)
}

/// No route matched: counted under one label whatever the path (the metrics middleware only
/// wraps matched routes, where it can name the route template).
async fn not_found(method: axum::http::Method) -> ApiError {
    let labels = [("method", telemetry::method_label(&method)), ("route", "unmatched"), ("status", "404")];
    metrics::counter!("http_requests_total", &labels).increment(1);
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "route not found")
}

/// A body whose announced length is over the limit is refused at once, before any of it is
/// read (a body without a length, or lying about it, is cut by `DefaultBodyLimit` as it is read).
async fn refuse_announced_oversize(
    max_body: usize,
    request: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let announced = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|length| length > max_body as u64) {
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "request body is too large")
            .into_response();
    }
    next.run(request).await
}

/// The docs page loads its own scripts and styles (Swagger UI sets inline styles and uses
/// data: images); nothing else is allowed, and no page may frame it.
const DOCS_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";
/// Everything else is JSON: it loads nothing and is framed by nothing.
const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// Headers on every answer: no MIME sniffing, no framing, no referrer, a CSP; and no caching
/// by anyone of answers that are not the static docs assets (tokens, user data).
async fn security_headers(request: axum::extract::Request, next: middleware::Next) -> axum::response::Response {
    use axum::http::{HeaderValue, header};
    let docs = request.uri().path().starts_with("/docs");
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(if docs { DOCS_CSP } else { API_CSP }));
    if !docs && !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Runs periodic upkeep until `shutdown`: prunes rate-limiter keys, expired refresh tokens and
/// old idempotency keys.
pub async fn run_maintenance(state: AppState, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        state.limiters.retain_recent();
        let now = time::OffsetDateTime::now_utc();
        match state.accounts.purge_expired_refresh_tokens(now).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "expired refresh tokens purged"),
            Err(error) => tracing::warn!(%error, "purging expired refresh tokens failed"),
        }
        let keys_before = now.saturating_sub(anna_usecases::time_duration(state.config.idempotency_key_ttl));
        if let Err(error) = state.store.purge_idempotency_keys(keys_before).await {
            tracing::warn!(%error, "purging idempotency keys failed");
        }
    }
}
