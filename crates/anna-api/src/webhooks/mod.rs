//! `/webhooks`: a tenant's webhook endpoints, their signing secrets, delivery logs and
//! replays. Another tenant's endpoint or delivery answers 404, exactly like a missing one.

use anna_domain::user::iso;
use anna_domain::webhook::WebhookEndpoint;
use anna_store::webhooks::{AttemptRecord, DeliveryRecord, DeliveryStatus};
use anna_usecases::EndpointRequest;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, AuthUser, parse_uuid};
use crate::idempotency;
use crate::sessions::OptionalJson;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_webhook, list_webhooks))
        .routes(routes!(get_webhook, update_webhook, delete_webhook))
        .routes(routes!(rotate_secret))
        .routes(routes!(list_deliveries))
        .routes(routes!(replay_deliveries))
        .routes(routes!(get_delivery))
        .routes(routes!(replay_delivery))
}

/// The circuit breaker of an endpoint.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitView {
    /// `closed` (deliveries go), `open` (they wait until `openUntil`), or `half_open` (the
    /// next attempt probes the receiver).
    pub state: &'static str,
    /// Consecutive failed attempts.
    pub failures: u32,
    pub open_until: Option<String>,
}

/// A webhook endpoint (never its secret, which is shown once).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    pub description: String,
    /// Event names, prefixes ending in `.*`, or `*`.
    pub events: Vec<String>,
    pub enabled: bool,
    /// Events of one session are delivered one after the other.
    pub ordered: bool,
    pub circuit: CircuitView,
    /// While set, the secret before the last rotation still signs (beside the new one).
    pub previous_secret_expires_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

fn view(endpoint: &WebhookEndpoint, threshold: u32) -> WebhookView {
    let now = OffsetDateTime::now_utc();
    let open_until = endpoint.circuit_open_until.filter(|until| *until > now);
    let state = if open_until.is_some() {
        "open"
    } else if threshold > 0 && endpoint.circuit_failures >= threshold {
        "half_open"
    } else {
        "closed"
    };
    WebhookView {
        id: endpoint.id.to_string(),
        url: endpoint.url.clone(),
        description: endpoint.description.clone(),
        events: endpoint.filter.patterns().to_vec(),
        enabled: endpoint.enabled,
        ordered: endpoint.ordered,
        circuit: CircuitView { state, failures: endpoint.circuit_failures, open_until: open_until.map(iso) },
        previous_secret_expires_at: endpoint.previous_secret_expires_at.filter(|at| *at > now).map(iso),
        created_at: iso(endpoint.created_at),
        updated_at: iso(endpoint.updated_at),
    }
}

fn endpoint_view(state: &AppState, endpoint: &WebhookEndpoint) -> WebhookView {
    view(endpoint, state.webhooks.config().circuit_threshold)
}

/// A new endpoint, with its secret.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedWebhook {
    #[serde(flatten)]
    pub webhook: WebhookView,
    /// `whsec_…`: verify deliveries with it. Shown only in this answer (a repeat of the request
    /// with the same Idempotency-Key gets `null`: rotate the secret if the answer was lost).
    pub secret: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotatedSecret {
    /// The new `whsec_…` secret, shown only in this answer.
    pub secret: Option<String>,
    /// Until then, deliveries carry a signature with the previous secret too.
    pub previous_secret_expires_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<WebhookView>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// `http` or `https`; no credentials in it.
    url: Option<String>,
    description: Option<String>,
    /// Event names (`session.message.received`), prefixes (`session.message.*`) or `*` (the
    /// default).
    events: Option<Vec<String>>,
    /// Default true.
    enabled: Option<bool>,
    /// Deliver the events of one session one after the other (default false).
    ordered: Option<bool>,
}

impl From<WebhookRequest> for EndpointRequest {
    fn from(body: WebhookRequest) -> Self {
        Self {
            url: body.url,
            description: body.description,
            events: body.events,
            enabled: body.enabled,
            ordered: body.ordered,
        }
    }
}

fn webhook_id(raw: &str) -> Result<Uuid, ApiError> {
    parse_uuid(raw, "webhook id")
}

fn delivery_id(raw: &str) -> Result<Uuid, ApiError> {
    parse_uuid(raw, "delivery id")
}

fn without_secret(body: &mut serde_json::Value) {
    if let Some(fields) = body.as_object_mut()
        && fields.contains_key("secret")
    {
        fields.insert("secret".into(), serde_json::Value::Null);
    }
}

/// Create an endpoint. The answer carries its signing secret, shown this once.
#[utoipa::path(post, path = "/webhooks", tag = "webhooks", request_body = WebhookRequest, security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer, without the secret")),
    responses((status = 201, body = CreatedWebhook),
        (status = 422, description = "invalid URL (or one pointing to a private address), events or description", body = ErrorBody),
        (status = 409, description = "the tenant has WEBHOOKS_MAX_PER_TENANT endpoints", body = ErrorBody)))]
async fn create_webhook(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    headers: HeaderMap,
    ApiJson(body): ApiJson<WebhookRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency::key(&headers)?;
    let scope = format!("POST /webhooks {}", caller.user_id);
    let fingerprint = json!([body.url, body.description, body.events, body.enabled, body.ordered]).to_string();
    Ok(idempotency::once_redacted(
        &state,
        &scope,
        key,
        &fingerprint,
        || async {
            let (endpoint, secret) = state.webhooks.create(caller.user_id, body.into()).await?;
            let created = CreatedWebhook { webhook: endpoint_view(&state, &endpoint), secret: Some(secret) };
            Ok((StatusCode::CREATED, json!(created)))
        },
        without_secret,
    )
    .await)
}

/// The caller's endpoints, oldest first.
#[utoipa::path(get, path = "/webhooks", tag = "webhooks", security(("bearer" = [])),
    responses((status = 200, body = WebhookList)))]
async fn list_webhooks(State(state): State<AppState>, AuthUser(caller): AuthUser) -> Result<Response, ApiError> {
    let endpoints = state.webhooks.list(caller.user_id).await?;
    let webhooks = endpoints.iter().map(|e| endpoint_view(&state, e)).collect();
    Ok(axum::Json(WebhookList { webhooks }).into_response())
}

#[utoipa::path(get, path = "/webhooks/{id}", tag = "webhooks", security(("bearer" = [])),
    params(("id" = String, Path, description = "webhook id")),
    responses((status = 200, body = WebhookView), (status = 404, body = ErrorBody)))]
async fn get_webhook(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let endpoint = state.webhooks.get(caller.user_id, webhook_id(&id)?).await?;
    Ok(axum::Json(endpoint_view(&state, &endpoint)).into_response())
}

/// Change an endpoint: any of url, description, events, enabled, ordered. Enabling it again
/// closes its circuit.
#[utoipa::path(patch, path = "/webhooks/{id}", tag = "webhooks", request_body = WebhookRequest, security(("bearer" = [])),
    params(("id" = String, Path, description = "webhook id")),
    responses((status = 200, body = WebhookView), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn update_webhook(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<WebhookRequest>,
) -> Result<Response, ApiError> {
    let endpoint = state.webhooks.update(caller.user_id, webhook_id(&id)?, body.into()).await?;
    Ok(axum::Json(endpoint_view(&state, &endpoint)).into_response())
}

/// Delete an endpoint with its deliveries and their log.
#[utoipa::path(delete, path = "/webhooks/{id}", tag = "webhooks", security(("bearer" = [])),
    params(("id" = String, Path, description = "webhook id")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn delete_webhook(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    state.webhooks.delete(caller.user_id, webhook_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Rotate the signing secret: the new one is shown once; the previous one keeps signing
/// beside it for WEBHOOKS_SECRET_GRACE_MS (both signatures in `webhook-signature`).
#[utoipa::path(post, path = "/webhooks/{id}/secret/rotate", tag = "webhooks", security(("bearer" = [])),
    params(("id" = String, Path, description = "webhook id"),
        ("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer, without the secret")),
    responses((status = 200, body = RotatedSecret), (status = 404, body = ErrorBody)))]
async fn rotate_secret(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = webhook_id(&id)?;
    let key = idempotency::key(&headers)?;
    let scope = format!("POST /webhooks/{id}/secret/rotate {}", caller.user_id);
    Ok(idempotency::once_redacted(
        &state,
        &scope,
        key,
        "",
        || async {
            let (endpoint, secret) = state.webhooks.rotate_secret(caller.user_id, id).await?;
            let rotated = RotatedSecret {
                secret: Some(secret),
                previous_secret_expires_at: endpoint.previous_secret_expires_at.map(iso),
            };
            Ok((StatusCode::OK, json!(rotated)))
        },
        without_secret,
    )
    .await)
}

/// The last attempt of a delivery.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptView {
    pub attempt: u32,
    pub attempted_at: Option<String>,
    /// The receiver's status code, when it answered.
    pub status_code: Option<u16>,
    pub latency_ms: Option<u32>,
    /// Why the attempt failed (timeout, connection refused, redirect, refused address…).
    pub error: Option<String>,
    /// The start of the receiver's answer (WEBHOOKS_RESPONSE_MAX_BYTES).
    pub response_body: Option<String>,
}

impl From<&AttemptRecord> for AttemptView {
    fn from(a: &AttemptRecord) -> Self {
        Self {
            attempt: a.attempt,
            attempted_at: Some(iso(a.attempted_at)),
            status_code: a.status_code,
            latency_ms: Some(a.latency_ms),
            error: a.error.clone(),
            response_body: a.response_body.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryView {
    pub id: String,
    /// The `webhook-id` header: the event's id, the same on every attempt and replay.
    pub event_id: String,
    pub event_name: String,
    /// `pending`, `delivering`, `succeeded` or `dead`.
    pub status: &'static str,
    pub attempts: u32,
    /// When the next attempt is due (pending), or when the current one's claim ends.
    pub next_attempt_at: Option<String>,
    /// Not delivered by then, it is dead-lettered.
    pub deadline_at: String,
    pub occurred_at: String,
    pub created_at: String,
    pub completed_at: Option<String>,
    pub last_attempt: Option<AttemptView>,
}

impl From<&DeliveryRecord> for DeliveryView {
    fn from(d: &DeliveryRecord) -> Self {
        let last_attempt = (d.attempts > 0).then(|| AttemptView {
            attempt: d.attempts,
            attempted_at: None,
            status_code: d.last_status_code,
            latency_ms: d.last_latency_ms,
            error: d.last_error.clone(),
            response_body: d.last_response_body.clone(),
        });
        let unfinished = matches!(d.status, DeliveryStatus::Pending | DeliveryStatus::Delivering);
        Self {
            id: d.id.to_string(),
            event_id: d.event_id.to_string(),
            event_name: d.event_name.clone(),
            status: d.status.as_str(),
            attempts: d.attempts,
            next_attempt_at: unfinished.then(|| iso(d.next_attempt_at)),
            deadline_at: iso(d.deadline_at),
            occurred_at: iso(d.occurred_at),
            created_at: iso(d.created_at),
            completed_at: d.completed_at.map(iso),
            last_attempt,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPage {
    pub deliveries: Vec<DeliveryView>,
    /// Pass as `cursor` for the next (older) page; `null` on the last one.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryDetail {
    #[serde(flatten)]
    pub delivery: DeliveryView,
    /// Every attempt, first first.
    pub attempts_log: Vec<AttemptView>,
}

#[derive(Debug, Deserialize)]
struct DeliveryQuery {
    status: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

fn parse_status(raw: &str) -> Result<DeliveryStatus, ApiError> {
    DeliveryStatus::parse(raw)
        .ok_or_else(|| ApiError::bad_request("invalid_status", "status must be pending, delivering, succeeded or dead"))
}

/// An endpoint's deliveries, newest first, `limit` (1–100, default 50) at a time.
#[utoipa::path(get, path = "/webhooks/{id}/deliveries", tag = "webhooks", security(("bearer" = [])),
    params(("id" = String, Path, description = "webhook id"),
        ("status" = Option<String>, Query, description = "pending, delivering, succeeded or dead"),
        ("cursor" = Option<String>, Query, description = "nextCursor of the previous page"),
        ("limit" = Option<u32>, Query, description = "1 to 100, default 50")),
    responses((status = 200, body = DeliveryPage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn list_deliveries(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
    query: Result<Query<DeliveryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::bad_request("invalid_query", "the query string is not valid"))?;
    let id = webhook_id(&id)?;
    let status = query.status.as_deref().map(parse_status).transpose()?;
    let cursor = query.cursor.as_deref().map(|c| parse_uuid(c, "cursor")).transpose()?;
    let limit = match query.limit.as_deref() {
        None => 50,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=100).contains(l))
            .ok_or_else(|| ApiError::bad_request("invalid_limit", "limit must be a number from 1 to 100"))?,
    };
    let page = state.webhooks.deliveries(caller.user_id, id, status, cursor, limit).await?;
    Ok(axum::Json(DeliveryPage {
        deliveries: page.deliveries.iter().map(DeliveryView::from).collect(),
        next_cursor: page.next_cursor.map(|c| c.to_string()),
    })
    .into_response())
}

/// One delivery with every attempt.
#[utoipa::path(get, path = "/webhooks/{id}/deliveries/{deliveryId}", tag = "webhooks", security(("bearer" = [])),
    params(("id" = String, Path, description = "webhook id"), ("deliveryId" = String, Path, description = "delivery id")),
    responses((status = 200, body = DeliveryDetail), (status = 404, body = ErrorBody)))]
async fn get_delivery(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath((id, delivery)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let (record, attempts) = state.webhooks.delivery(caller.user_id, webhook_id(&id)?, delivery_id(&delivery)?).await?;
    Ok(axum::Json(DeliveryDetail {
        delivery: DeliveryView::from(&record),
        attempts_log: attempts.iter().map(AttemptView::from).collect(),
    })
    .into_response())
}

/// Send a succeeded or dead delivery again (same `webhook-id`), now.
#[utoipa::path(post, path = "/webhooks/{id}/deliveries/{deliveryId}/replay", tag = "webhooks", security(("bearer" = [])),
    params(("id" = String, Path, description = "webhook id"), ("deliveryId" = String, Path, description = "delivery id"),
        ("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")),
    responses((status = 202, body = DeliveryView), (status = 404, body = ErrorBody),
        (status = 409, description = "the delivery is still pending or being delivered", body = ErrorBody)))]
async fn replay_delivery(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath((id, delivery)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (id, delivery) = (webhook_id(&id)?, delivery_id(&delivery)?);
    let key = idempotency::key(&headers)?;
    let scope = format!("POST /webhooks/{id}/deliveries/{delivery}/replay {}", caller.user_id);
    Ok(idempotency::once(&state, &scope, key, "", || async {
        let record = state.webhooks.replay(caller.user_id, id, delivery).await?;
        Ok((StatusCode::ACCEPTED, json!(DeliveryView::from(&record))))
    })
    .await)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Which deliveries: `dead` (the default) or `succeeded`.
    status: Option<String>,
    /// Only deliveries created at or after this RFC 3339 time.
    since: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    pub replayed: u64,
}

/// Replay every dead (or succeeded) delivery of an endpoint, optionally since a time.
#[utoipa::path(post, path = "/webhooks/{id}/deliveries/replay", tag = "webhooks",
    request_body(content = ReplayRequest, description = "optional"), security(("bearer" = [])),
    params(("id" = String, Path, description = "webhook id"),
        ("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")),
    responses((status = 202, body = Replayed), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn replay_deliveries(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    OptionalJson(body): OptionalJson<ReplayRequest>,
) -> Result<Response, ApiError> {
    let id = webhook_id(&id)?;
    let status = body.status.as_deref().map(parse_status).transpose()?;
    if status.is_some_and(|s| !matches!(s, DeliveryStatus::Dead | DeliveryStatus::Succeeded)) {
        return Err(ApiError::bad_request("invalid_status", "status must be dead or succeeded"));
    }
    let since = body
        .since
        .as_deref()
        .map(|raw| {
            OffsetDateTime::parse(raw, &Rfc3339)
                .map_err(|_| ApiError::bad_request("invalid_since", "since must be an RFC 3339 time"))
        })
        .transpose()?;
    let key = idempotency::key(&headers)?;
    let scope = format!("POST /webhooks/{id}/deliveries/replay {}", caller.user_id);
    let fingerprint = json!([body.status, body.since]).to_string();
    Ok(idempotency::once(&state, &scope, key, &fingerprint, || async {
        let replayed = state.webhooks.replay_all(caller.user_id, id, status, since).await?;
        Ok((StatusCode::ACCEPTED, json!(Replayed { replayed })))
    })
    .await)
}
