//! The demo UI, embedded in the binary: `/demo/sessions` (and `/`, which links to it). A
//! static page with plain JavaScript that uses the public API like any client: sign up,
//! verify, log in, create a session, scan its QR code, watch it live, send messages, stop,
//! log out, delete. The access token stays in memory; server text is only ever inserted as
//! text, never as HTML.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::state::AppState;

/// Scripts and styles from the page's own origin only; QR images arrive as `blob:` URLs; the
/// WebSocket is same-origin.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; \
    connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("index.html");
const SESSIONS_HTML: &str = include_str!("sessions.html");
const SESSIONS_JS: &str = include_str!("sessions.js");
const SESSIONS_CSS: &str = include_str!("sessions.css");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/demo/sessions", get(|| async { asset("text/html; charset=utf-8", SESSIONS_HTML) }))
        .route("/demo/sessions.js", get(|| async { asset("text/javascript; charset=utf-8", SESSIONS_JS) }))
        .route("/demo/sessions.css", get(|| async { asset("text/css; charset=utf-8", SESSIONS_CSS) }))
        .route("/demo/config.json", get(config))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// What the page needs to know of the server: whether the simulator is selected.
async fn config(State(state): State<AppState>) -> Response {
    axum::Json(serde_json::json!({ "simulator": state.config.simulator })).into_response()
}
