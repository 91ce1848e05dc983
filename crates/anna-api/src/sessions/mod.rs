//! `/sessions`: a tenant's WhatsApp sessions. Every handler checks that the session belongs to
//! the caller (another tenant's session answers 404, exactly like a missing one), validates,
//! and enqueues a command for the sessions worker through the `Sessions` use-cases; the answer
//! is 202 with the command's id. What the worker then does arrives as events (WebSocket
//! `/ws/sessions`, and the session's state in `GET /sessions/{id}`).

pub mod qr;

use std::time::Duration;

use anna_domain::Session;
use anna_domain::user::iso;
use anna_usecases::{SendRequest, SessionError};
use anna_whatsapp::Jid;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, AuthUser, parse_uuid};
use crate::idempotency;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(start_session, list_sessions))
        .routes(routes!(get_session, delete_session))
        .routes(routes!(qr::session_qr))
        .route("/sessions/{id}/{file}", axum::routing::get(qr::session_qr_image))
        .routes(routes!(stop_session))
        .routes(routes!(send_message))
        .routes(routes!(pair_code))
        .routes(routes!(logout_session))
}

/// The simulator's own routes, mounted only when `SESSIONS_PROVIDER=simulator`.
pub fn simulator_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(simulate))
}

/// A session as its tenant sees it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub id: String,
    /// `pending_qr`, `connected`, `disconnected`, `logged_out` or `failed`.
    pub status: &'static str,
    /// The linked account's JID, once paired.
    pub phone: Option<String>,
    /// Why the session last left `connected` or `pending_qr`.
    pub reason: Option<String>,
    /// The QR code to scan, while pairing.
    pub qr: Option<String>,
    pub qr_expires_at: Option<String>,
    pub connected_at: Option<String>,
    pub disconnected_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Session> for SessionView {
    fn from(s: &Session) -> Self {
        Self {
            id: s.id.to_string(),
            status: s.status.as_str(),
            phone: s.phone.clone(),
            reason: s.disconnected_reason.clone(),
            qr: s.qr.clone(),
            qr_expires_at: s.qr_expires_at.map(iso),
            connected_at: s.connected_at.map(iso),
            disconnected_at: s.disconnected_at.map(iso),
            created_at: iso(s.created_at),
            updated_at: iso(s.updated_at),
        }
    }
}

/// The sessions worker serving a session.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerView {
    /// `SESSIONS_WORKER_ID` of the worker holding the session's partition.
    pub id: String,
    /// The lease's fencing token: it grows each time the partition changes hands.
    pub lease_token: i64,
    pub held_since: String,
    pub lease_expires_at: String,
}

/// One session, with where it runs.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionDetail {
    #[serde(flatten)]
    pub session: SessionView,
    /// The partition of the sessions this one belongs to (a stable hash of its id).
    pub partition: u32,
    /// The worker that holds the partition now; `null` while none does (a failover under way,
    /// or no sessions worker running).
    pub worker: Option<WorkerView>,
}

fn iso_millis(millis: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    iso(at)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartedResponse {
    pub session_id: String,
    pub command_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandResponse {
    pub command_id: String,
}

/// A JSON body that may be absent: an empty body (with or without a JSON content type) is the
/// default value, as the predecessor's clients send `POST /sessions` with none.
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let has_body = req.headers().get(header::CONTENT_LENGTH).is_none_or(|length| length != "0");
        if !has_body {
            return Ok(Self(T::default()));
        }
        let json_type =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
                v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(status, "payload_too_large", "request body is too large")
            } else {
                ApiError::new(status, "unreadable_body", rejection.body_text())
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        if !json_type {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected a JSON body with Content-Type: application/json",
            ));
        }
        serde_json::from_slice(&bytes).map(Self).map_err(|e| {
            let status = if e.is_data() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::BAD_REQUEST };
            ApiError::new(status, if e.is_data() { "invalid_body" } else { "malformed_json" }, e.to_string())
        })
    }
}

impl From<SessionError> for ApiError {
    fn from(error: SessionError) -> Self {
        let message = error.to_string();
        match error {
            SessionError::NotFound(_) => ApiError::not_found("session_not_found", message),
            SessionError::TooMany(_) => ApiError::conflict("too_many_sessions", message),
            SessionError::NotConnected { .. } => ApiError::conflict("session_not_connected", message),
            SessionError::Invalid(_) => ApiError::bad_request("invalid_request", message),
            SessionError::NoSession => ApiError::not_found("session_not_found", message),
            SessionError::MessageNotFound => ApiError::not_found("message_not_found", message),
            SessionError::MediaNotFound => ApiError::not_found("media_not_found", message),
            SessionError::ForwardNotFound(_) => ApiError::not_found("message_not_found", message),
            SessionError::MessageConflict(_) => ApiError::conflict("message_conflict", message),
            SessionError::RateLimited(retry_after) => ApiError::too_many_requests(retry_after),
            SessionError::Failed(failure) => failure.into(),
        }
    }
}

fn accepted(body: impl Serialize) -> Result<idempotency::Answer, ApiError> {
    Ok((StatusCode::ACCEPTED, json!(body)))
}

fn command(enqueued: anna_usecases::Enqueued) -> Result<idempotency::Answer, ApiError> {
    accepted(CommandResponse { command_id: enqueued.command_id.to_string() })
}

fn session_id(raw: &str) -> Result<Uuid, ApiError> {
    parse_uuid(raw, "session id")
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartRequest {
    /// Start this session again, or create it with this id when unused.
    session_id: Option<String>,
}

/// Start a session: creates one (202 with its id) or starts the caller's session again.
#[utoipa::path(post, path = "/sessions", tag = "sessions", request_body(content = StartRequest, description = "optional"),
    security(("bearer" = [])),
    responses((status = 202, body = StartedResponse),
        (status = 404, description = "the id belongs to another tenant", body = ErrorBody),
        (status = 409, description = "the tenant has SESSIONS_MAX_PER_TENANT sessions", body = ErrorBody)),
    params(("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")))]
async fn start_session(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    headers: HeaderMap,
    OptionalJson(body): OptionalJson<StartRequest>,
) -> Result<Response, ApiError> {
    let id = body.session_id.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(session_id).transpose()?;
    let key = idempotency::key(&headers)?;
    let scope = format!("POST /sessions {}", caller.user_id);
    let fingerprint = json!([id]).to_string();
    Ok(idempotency::once(&state, &scope, key, &fingerprint, || async {
        let started = state.sessions.start(caller.user_id, id).await?;
        accepted(StartedResponse {
            session_id: started.session_id.to_string(),
            command_id: started.command_id.to_string(),
        })
    })
    .await)
}

/// The caller's sessions, newest first.
#[utoipa::path(get, path = "/sessions", tag = "sessions", security(("bearer" = [])),
    responses((status = 200, body = SessionList)))]
async fn list_sessions(State(state): State<AppState>, AuthUser(caller): AuthUser) -> Result<Response, ApiError> {
    let sessions = state.sessions.list(caller.user_id).await?;
    Ok(axum::Json(SessionList { sessions: sessions.iter().map(SessionView::from).collect() }).into_response())
}

/// One session: status, phone, reason, timestamps, the current QR code while pairing, and the
/// sessions worker it runs on.
#[utoipa::path(get, path = "/sessions/{id}", tag = "sessions", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = SessionDetail), (status = 404, body = ErrorBody)))]
async fn get_session(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let session = state.sessions.get(caller.user_id, session_id(&id)?).await?;
    let placement = state.sessions.placement(session.id).await?;
    let worker = placement.lease.and_then(|lease| {
        Some(WorkerView {
            id: lease.worker_id?,
            lease_token: lease.token,
            held_since: iso_millis(lease.acquired_at_ms),
            lease_expires_at: iso_millis(lease.expires_at_ms),
        })
    });
    let detail = SessionDetail { session: SessionView::from(&session), partition: placement.partition, worker };
    Ok(axum::Json(detail).into_response())
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StopRequest {
    reason: Option<String>,
}

/// Stop a session: its connection closes, the device stays linked (start it again to resume).
#[utoipa::path(post, path = "/sessions/{id}/stop", tag = "sessions", request_body(content = StopRequest, description = "optional"),
    security(("bearer" = [])), params(("id" = String, Path, description = "session id"),
        ("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")),
    responses((status = 202, body = CommandResponse), (status = 404, body = ErrorBody)))]
async fn stop_session(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    OptionalJson(body): OptionalJson<StopRequest>,
) -> Result<Response, ApiError> {
    let id = session_id(&id)?;
    let key = idempotency::key(&headers)?;
    let scope = format!("POST /sessions/{id}/stop {}", caller.user_id);
    Ok(idempotency::once(&state, &scope, key, &json!([body.reason]).to_string(), || async {
        command(state.sessions.stop(caller.user_id, id, body.reason).await?)
    })
    .await)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendMessageRequest {
    /// A phone number in international format (`+49 151 2345 6789`) or a WhatsApp JID.
    #[schema(required, nullable = false)]
    to: Option<String>,
    /// The text; with `media`, its caption (unless `caption` is given).
    content: Option<String>,
    /// A file's caption.
    caption: Option<String>,
    /// Send audio as a voice note.
    ptt: Option<bool>,
    /// The file to send: `{kind, id}` (an upload's id) or `{kind, url}`.
    #[schema(value_type = Option<Object>)]
    media: Option<serde_json::Value>,
    /// Your own id for the message, carried into its events.
    message_id: Option<String>,
    /// The WhatsApp id of the message this one replies to.
    reply_to_message_id: Option<String>,
}

/// Send a text message, or a file (`media`). 409 when the session is not connected; 429 over the
/// session's send rate.
#[utoipa::path(post, path = "/sessions/{id}/messages", tag = "sessions", request_body = SendMessageRequest,
    security(("bearer" = [])), params(("id" = String, Path, description = "session id"),
        ("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")),
    responses((status = 202, body = CommandResponse), (status = 404, body = ErrorBody),
        (status = 409, description = "the session is not connected", body = ErrorBody),
        (status = 429, description = "over SESSIONS_SEND_PER_MINUTE for this session", body = ErrorBody)))]
async fn send_message(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SendMessageRequest>,
) -> Result<Response, ApiError> {
    let id = session_id(&id)?;
    let media = match body.media.as_ref().filter(|media| !media.is_null()) {
        Some(media) => Some(crate::chats::media_to_send(media, body.ptt.unwrap_or(false))?),
        None => None,
    };
    let content = match &media {
        Some(_) => Some(body.caption.or(body.content).unwrap_or_default()),
        None => body.content.filter(|v| !v.is_empty()),
    };
    let (Some(to), Some(content)) = (body.to.filter(|v| !v.trim().is_empty()), content) else {
        return Err(ApiError::bad_request("missing_fields", "to and content are required"));
    };
    let to = Jid::parse(&to).map_err(|e| ApiError::bad_request("invalid_recipient", format!("to {e}")))?;
    // Line breaks and tabs are text; other control characters (NUL…) are not.
    if content.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) {
        return Err(ApiError::bad_request("invalid_content", "content must not contain control characters"));
    }
    let short = |value: Option<String>, what: &str| -> Result<Option<String>, ApiError> {
        match value {
            Some(v) if v.len() > 128 || v.chars().any(char::is_control) => Err(ApiError::bad_request(
                "invalid_message_id",
                format!("{what} must be at most 128 characters without control characters"),
            )),
            other => Ok(other.filter(|v| !v.is_empty())),
        }
    };
    let request = SendRequest {
        to: to.to_string(),
        text: content,
        reply_to: short(body.reply_to_message_id, "replyToMessageId")?,
        client_message_id: short(body.message_id, "messageId")?,
        media,
        forward: None,
    };
    let key = idempotency::key(&headers)?;
    let scope = format!("POST /sessions/{id}/messages {}", caller.user_id);
    let fingerprint =
        json!([request.to, request.text, request.reply_to, request.client_message_id, format!("{:?}", request.media)])
            .to_string();
    Ok(idempotency::once(&state, &scope, key, &fingerprint, || async {
        command(state.sessions.send(caller.user_id, id, request, state.limiters.check_send(id)).await?)
    })
    .await)
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PairCodeRequest {
    /// The phone number to link, in international format.
    #[schema(required, nullable = false)]
    phone: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PairCodeResponse {
    /// 8 characters to type in WhatsApp → Linked devices → Link with phone number.
    pub code: String,
    pub expires_at: String,
    pub command_id: String,
}

/// How long `POST /sessions/{id}/pair-code` waits for the worker's code before answering 202.
const PAIR_CODE_WAIT: Duration = Duration::from_secs(15);

/// Pair by phone number: returns the 8-character code (200), or 202 when the worker has not
/// produced it in time (it then arrives as the event `session.pair_code.issued`).
#[utoipa::path(post, path = "/sessions/{id}/pair-code", tag = "sessions", request_body = PairCodeRequest,
    security(("bearer" = [])), params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = PairCodeResponse), (status = 202, body = CommandResponse),
        (status = 404, body = ErrorBody)))]
async fn pair_code(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<PairCodeRequest>,
) -> Result<Response, ApiError> {
    let id = session_id(&id)?;
    let phone = body
        .phone
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("missing_fields", "phone is required"))?;
    let digits = anna_whatsapp::jid::phone_digits(&phone)
        .map_err(|e| ApiError::bad_request("invalid_phone", format!("phone {e}")))?;
    // Listen before asking, so the answer cannot slip past.
    let mut events = state.realtime.subscribe();
    let enqueued = state.sessions.request_pair_code(caller.user_id, id, &digits).await?;
    let deadline = tokio::time::Instant::now() + PAIR_CODE_WAIT;
    loop {
        let event = tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            event = events.recv() => event,
        };
        match event {
            Ok(event) if event.session_id == id && event.name == anna_domain::session::SESSION_PAIR_CODE_ISSUED => {
                let payload = &event.payload;
                return Ok(axum::Json(PairCodeResponse {
                    code: payload["code"].as_str().unwrap_or_default().to_owned(),
                    expires_at: payload["expiresAt"].as_str().unwrap_or_default().to_owned(),
                    command_id: enqueued.command_id.to_string(),
                })
                .into_response());
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    Ok((StatusCode::ACCEPTED, axum::Json(CommandResponse { command_id: enqueued.command_id.to_string() }))
        .into_response())
}

/// Log out: unlinks the device from the phone and wipes its keys; the session stays
/// (`logged_out`) and can pair again.
#[utoipa::path(post, path = "/sessions/{id}/logout", tag = "sessions", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id"),
        ("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")),
    responses((status = 202, body = CommandResponse), (status = 404, body = ErrorBody)))]
async fn logout_session(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = session_id(&id)?;
    let key = idempotency::key(&headers)?;
    let scope = format!("POST /sessions/{id}/logout {}", caller.user_id);
    Ok(idempotency::once(&state, &scope, key, "", || async {
        command(state.sessions.logout(caller.user_id, id).await?)
    })
    .await)
}

/// Delete: logs out, stops, and removes the session with its keys (event `session.deleted`).
#[utoipa::path(delete, path = "/sessions/{id}", tag = "sessions", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id")),
    responses((status = 202, body = CommandResponse), (status = 404, body = ErrorBody)))]
async fn delete_session(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let enqueued = state.sessions.delete(caller.user_id, session_id(&id)?).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(CommandResponse { command_id: enqueued.command_id.to_string() }))
        .into_response())
}

/// Simulator only: `scan` the QR code, inject a `disconnect`, `logout` or `ban`, or have
/// contacts send a `burst` of messages.
#[utoipa::path(post, path = "/simulator/sessions/{id}/{action}", tag = "simulator", security(("bearer" = [])),
    params(("id" = String, Path, description = "session id"),
        ("action" = String, Path, description = "scan, disconnect, logout, ban or burst")),
    responses((status = 202, body = CommandResponse), (status = 404, body = ErrorBody)))]
async fn simulate(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath((id, action)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let id = session_id(&id)?;
    let Some(simulation) = anna_whatsapp::Simulation::parse(&action) else {
        return Err(ApiError::not_found("not_found", "route not found"));
    };
    let enqueued = state.sessions.simulate(caller.user_id, id, simulation.as_str()).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(CommandResponse { command_id: enqueued.command_id.to_string() }))
        .into_response())
}
