//! anna's HTTP API: routers by context, extractors, the single error-to-HTTP mapping and the
//! OpenAPI document.

pub mod auth;
pub mod chats;
pub mod config;
pub mod demo;
pub mod error;
pub mod extract;
pub mod health;
pub mod idempotency;
pub mod media;
pub mod rate_limit;
pub mod realtime;
pub mod sessions;
pub mod settings;
pub mod state;
pub mod telemetry;
mod upload_body;
pub mod users;
pub mod webhooks;

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
        (name = "sessions", description = "WhatsApp sessions: start, pair, send, stop, log out, delete"),
        (name = "chats", description = "Message history: chats with their last message and unread count, messages by page"),
        (name = "media", description = "Uploads to send, and downloads of every media object through short-lived signed URLs"),
        (name = "webhooks", description = "Webhook endpoints, signed deliveries, delivery logs and replays"),
        (name = "realtime", description = "Tickets for the session-event WebSocket /ws/sessions"),
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
    let mut document = api_routes().split_for_parts().1;
    document_edge_errors(&mut document);
    document
}

fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(users::router())
        .merge(auth::router())
        .merge(sessions::router())
        .merge(chats::router())
        .merge(media::router())
        .merge(settings::router())
        .merge(webhooks::router())
        .merge(realtime::router())
        .merge(health::router())
}

/// Adds the answers the edge gives on any route, so the document lists every status a route
/// can answer: with a JSON body, 400 (malformed or incomplete), 413, 415 and 422 (a field of
/// the wrong type); behind a bearer token, 401 (and 400 for several `Authorization` headers);
/// everywhere, 500 and 503.
fn document_edge_errors(document: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
            .build()
    };
    for item in document.paths.paths.values_mut() {
        let operations = [&mut item.get, &mut item.post, &mut item.put, &mut item.patch, &mut item.delete];
        for operation in operations.into_iter().flatten() {
            let mut add = |status: &str, description: &str| {
                operation.responses.responses.entry(status.to_owned()).or_insert_with(|| error(description).into());
            };
            if operation.request_body.is_some() {
                add("400", "malformed JSON, missing or invalid field");
                add("413", "body larger than HTTP_MAX_BODY_BYTES");
                add("415", "the body is not application/json");
                add("422", "a field of the wrong type");
            }
            if operation.security.as_ref().is_some_and(|s| !s.is_empty()) {
                add("400", "more than one Authorization header");
                add("401", "missing, invalid or expired access token");
            }
            add("500", "a fault of the server (logged with the request id)");
            add("503", "the database or the event stream is unavailable; retry later");
        }
    }
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let mut routes = api_routes();
    if state.config.simulator {
        routes = routes.merge(sessions::simulator_router());
    }
    let (routes, mut openapi) = routes.split_for_parts();
    document_edge_errors(&mut openapi);
    let mut app = routes.merge(SwaggerUi::new("/docs").url("/openapi.json", openapi)).merge(demo::router());
    if state.config.metrics_on_api_port {
        app = app.route("/metrics", get(health::metrics));
    }
    let max_body = state.config.max_body_bytes as u64;
    let max_upload = state.config.media_max_upload_bytes.saturating_add(media::MULTIPART_OVERHEAD);
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn(telemetry::track_http_metrics))
        .layer(DefaultBodyLimit::max(usize::try_from(max_body).unwrap_or(usize::MAX)))
        .layer(middleware::from_fn(move |request, next| refuse_announced_oversize(max_body, max_upload, request, next)))
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
/// read (a body without a length, or lying about it, is cut by `DefaultBodyLimit` as it is
/// read, or by the upload's own count of its file). An upload's body is cut at the upload
/// limit here, and what its handler left unread is read after the answer (`upload_body`).
async fn refuse_announced_oversize(
    max_body: u64,
    max_upload: u64,
    request: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let upload = media::is_upload(request.method(), request.uri().path());
    let max_body = if upload { max_upload } else { max_body };
    let announced = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|length| length > max_body) {
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "request body is too large")
            .into_response();
    }
    if !upload {
        return next.run(request).await;
    }
    // The upload route lifts the API's body limit for its own: a body of any framing (chunked,
    // or parts that never end) is cut at it while it is read. What the handler leaves unread
    // is read after its answer (see `upload_body`).
    let (parts, body) = request.into_parts();
    let (shared, rest) = upload_body::share(http_body_util::Limited::new(body, max_body as usize));
    let response = next.run(axum::extract::Request::from_parts(parts, axum::body::Body::new(shared))).await;
    // After a 413 (the file counted over the limit) and after a success (the last bytes of the
    // framing); other refusals come before the body is read and do not wait for it.
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE || response.status().is_success() {
        rest.drain().await;
    }
    response
}

/// A known path with another method: the JSON error shape too.
async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
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
    let path = request.uri().path();
    let docs = path.starts_with("/docs");
    let page = path == "/" || path.starts_with("/demo");
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    let csp = if docs {
        DOCS_CSP
    } else if page {
        demo::CSP
    } else {
        API_CSP
    };
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(csp));
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
