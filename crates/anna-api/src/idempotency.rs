//! `Idempotency-Key` on POSTs that create something: the first request with a key is
//! processed, repeats get the stored answer (status and JSON body, with
//! `Idempotent-Replayed: true`), a repeat with a different body is refused with 422, and one
//! arriving while the first is still running gets 409. Server errors are not stored, so a
//! retry runs again. Keys live `IDEMPOTENCY_KEY_TTL_MS` (24 h by default).

use anna_store::IdempotencyClaim;
use axum::Json;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use time::OffsetDateTime;

use crate::error::ApiError;
use crate::state::AppState;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
pub const MAX_KEY_LEN: usize = 255;

/// The key sent with the request, if any; a malformed one is a 400.
pub fn key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(raw) = headers.get(HEADER) else { return Ok(None) };
    match raw.to_str() {
        Ok(key) if !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(key.to_owned()))
        }
        _ => Err(ApiError::bad_request(
            "invalid_idempotency_key",
            format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
        )),
    }
}

/// A JSON answer, as stored and replayed.
pub type Answer = (StatusCode, serde_json::Value);

fn error_answer(error: &ApiError) -> Answer {
    (error.status, serde_json::json!({ "message": error.message, "code": error.code }))
}

/// Runs `work` once per (`scope`, key). `fingerprint` identifies the request's content; it is
/// stored keyed-hashed, so it may contain secrets such as a password.
pub async fn once<Fut>(
    state: &AppState,
    scope: &str,
    key: Option<String>,
    fingerprint: &str,
    work: impl FnOnce() -> Fut,
) -> Response
where
    Fut: std::future::Future<Output = Result<Answer, ApiError>>,
{
    once_redacted(state, scope, key, fingerprint, work, |_| {}).await
}

/// [`once`] for an answer that carries a secret shown only once (a webhook's signing secret):
/// `redact` removes it from the stored copy, so a repeat gets the answer without it and the
/// database never holds it in clear.
pub async fn once_redacted<Fut>(
    state: &AppState,
    scope: &str,
    key: Option<String>,
    fingerprint: &str,
    work: impl FnOnce() -> Fut,
    redact: impl FnOnce(&mut serde_json::Value),
) -> Response
where
    Fut: std::future::Future<Output = Result<Answer, ApiError>>,
{
    let Some(key) = key else {
        return match work().await {
            Ok((status, body)) => (status, Json(body)).into_response(),
            Err(error) => error.into_response(),
        };
    };
    let request_hash = state.accounts.keyed_hash("idempotency-key", &format!("{scope} {key}"), fingerprint);
    let claim = match state.store.claim_idempotency_key(scope, &key, &request_hash, OffsetDateTime::now_utc()).await {
        Ok(claim) => claim,
        Err(error) => return ApiError::from(error).into_response(),
    };
    match claim {
        IdempotencyClaim::Done { request_hash: stored, status, body } => {
            if !anna_domain::secrets::hashes_equal(&stored, &request_hash) {
                return reused_with_other_request();
            }
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            let body: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
            let mut response = (status, Json(body)).into_response();
            response.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
            response
        }
        IdempotencyClaim::InProgress { request_hash: stored } => {
            if !anna_domain::secrets::hashes_equal(&stored, &request_hash) {
                return reused_with_other_request();
            }
            ApiError::conflict(
                "idempotency_in_progress",
                "a request with this Idempotency-Key is still being processed",
            )
            .into_response()
        }
        IdempotencyClaim::Claimed => {
            let outcome = work().await;
            let (status, mut body) = match &outcome {
                Ok(answer) => answer.clone(),
                Err(error) => error_answer(error),
            };
            redact(&mut body);
            let stored = if status.is_server_error() {
                state.store.release_idempotency_key(scope, &key).await
            } else {
                state.store.complete_idempotency_key(scope, &key, status.as_u16(), &body.to_string()).await
            };
            if let Err(error) = stored {
                tracing::warn!(%error, "could not store the Idempotency-Key answer");
            }
            match outcome {
                Ok((status, body)) => (status, Json(body)).into_response(),
                Err(error) => error.into_response(),
            }
        }
    }
}

fn reused_with_other_request() -> Response {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        "this Idempotency-Key was already used with a different request",
    )
    .into_response()
}
