//! `/users`: registration, verification (with automatic login) and the current user. Each
//! handler parses, calls one `Accounts` use-case and maps its answer.

use anna_domain::{Email, UserName};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum_extra::extract::CookieJar;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{grant_cookie, meta};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiPath, AuthUser, ClientIp, parse_uuid};
use crate::idempotency;
use crate::rate_limit::Limited;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(register)).routes(routes!(verify)).routes(routes!(me))
}

/// Registration body. A client-supplied `id` is ignored: ids are always made by the server.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterRequest {
    #[schema(required, nullable = false)]
    name: Option<String>,
    #[schema(required, nullable = false)]
    email: Option<String>,
    #[schema(format = Password, required, nullable = false)]
    password: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegisterResponse {
    pub id: String,
}

fn present(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// Register a user; a verification code and link are e-mailed.
#[utoipa::path(post, path = "/users", tag = "users", request_body = RegisterRequest,
    responses(
        (status = 201, body = RegisterResponse),
        (status = 400, description = "missing or invalid field", body = ErrorBody),
        (status = 409, description = "e-mail already registered", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, description = "Idempotency-Key reused with another body", body = ErrorBody)),
    params(("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")))]
async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency::key(&headers)?;
    let fingerprint = serde_json::json!([body.name, body.email, body.password]).to_string();
    let answer = idempotency::once(&state, "POST /users", key, &fingerprint, || async {
        let (status, Json(created)) = register_user(&state, body).await?;
        Ok((status, serde_json::json!(created)))
    })
    .await;
    Ok(answer)
}

async fn register_user(state: &AppState, body: RegisterRequest) -> ApiResult<(StatusCode, Json<RegisterResponse>)> {
    let (Some(name), Some(email), Some(password)) = (present(body.name), present(body.email), present(body.password))
    else {
        return Err(ApiError::bad_request("missing_fields", "name, email and password are required"));
    };
    let name = UserName::parse(&name).map_err(|e| ApiError::bad_request("invalid_name", e.0))?;
    let email = Email::parse(&email).map_err(|e| ApiError::bad_request("invalid_email", e.0))?;
    let user_id = state.accounts.register(name, email, password).await?;
    Ok((StatusCode::CREATED, Json(RegisterResponse { id: user_id.to_string() })))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct VerifyRequest {
    /// The link token from the e-mail.
    token: Option<String>,
    /// The six-digit code from the e-mail.
    code: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifyResponse {
    pub status: &'static str,
    pub access_token: String,
    pub access_token_expires_in: u64,
}

/// Verify an e-mail address with the code or the link token, and log in.
#[utoipa::path(post, path = "/users/{id}/verify", tag = "users", request_body = VerifyRequest,
    params(("id" = String, Path, description = "user id")),
    responses(
        (status = 200, body = VerifyResponse, description = "verified; the refresh cookie is set"),
        (status = 400, description = "missing, wrong, expired or void code; bad id", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn verify(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    client_ip: ClientIp,
    headers: HeaderMap,
    jar: CookieJar,
    ApiJson(body): ApiJson<VerifyRequest>,
) -> ApiResult<(CookieJar, Json<VerifyResponse>)> {
    state.limiters.check_ip(Limited::Verify, &client_ip.key()).await?;
    let user_id = parse_uuid(&id, "user id")?;
    let Some(candidate) = body.token.filter(|t| !t.trim().is_empty()).or(body.code.filter(|c| !c.trim().is_empty()))
    else {
        return Err(ApiError::bad_request("missing_fields", "token or code is required"));
    };
    state.limiters.check_account(Limited::Verify, &user_id.to_string()).await?;
    let grant = state.accounts.verify_email(user_id, &candidate, &meta(&headers, &client_ip)).await?;
    let (jar, token) = grant_cookie(&state, jar, grant);
    Ok((
        jar,
        Json(VerifyResponse {
            status: "active",
            access_token: token.access_token,
            access_token_expires_in: token.access_token_expires_in,
        }),
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MeResponse {
    pub id: String,
    pub name: String,
    pub email: String,
    pub status: &'static str,
}

/// The authenticated user.
#[utoipa::path(get, path = "/users/me", tag = "users", security(("bearer" = [])),
    responses((status = 200, body = MeResponse), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn me(State(state): State<AppState>, AuthUser(caller): AuthUser) -> ApiResult<Json<MeResponse>> {
    let user = state.accounts.current_user(caller)?;
    Ok(Json(MeResponse { id: user.id.to_string(), name: user.name, email: user.email, status: user.status.as_str() }))
}
