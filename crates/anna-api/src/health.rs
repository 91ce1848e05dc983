//! Liveness, readiness and the Prometheus endpoint.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(readyz))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub status: &'static str,
    pub database: &'static str,
    /// The event stream (Redis, or the embedded streams in the SQLite file).
    pub streams: &'static str,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The process can serve: its database and its event stream answer.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let (database, streams) = tokio::join!(state.store.ping(), state.stream.ping());
    if let Err(error) = &database {
        tracing::warn!(%error, "readiness check failed: database");
    }
    if let Err(error) = &streams {
        tracing::warn!(%error, "readiness check failed: event stream");
    }
    let word = |ok: bool| if ok { "ok" } else { "unreachable" };
    let ready = database.is_ok() && streams.is_ok();
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        database: word(database.is_ok()),
        streams: word(streams.is_ok()),
    };
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

/// Prometheus text exposition of this process's metrics.
pub async fn metrics(State(state): State<AppState>) -> Response {
    render_metrics(state.metrics.as_ref())
}

pub fn render_metrics(handle: Option<&metrics_exporter_prometheus::PrometheusHandle>) -> Response {
    match handle {
        Some(handle) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render()).into_response()
        }
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}
