//! `/auth`: login, refresh-token rotation, logout, resend verification, password reset.
//! Each handler parses, applies the edge's limits, calls one `Accounts` use-case and maps its
//! answer; the rules live in `anna_usecases`.

pub mod cookies;

use anna_domain::Email;
use anna_usecases::{ClientMeta, LoginGrant};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum_extra::extract::CookieJar;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, AuthUser, ClientIp, user_agent};
use crate::rate_limit::Limited;
use crate::state::AppState;
use cookies::{cleared_refresh_cookie, refresh_cookie};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(logout_all))
        .routes(routes!(resend_verification))
        .routes(routes!(password_reset))
        .routes(routes!(password_reset_confirm))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenResponse {
    pub access_token: String,
    pub access_token_expires_in: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusResponse {
    pub status: &'static str,
}

const OK: StatusResponse = StatusResponse { status: "ok" };

fn parse_email(raw: &str) -> Result<Email, ApiError> {
    Email::parse(raw).map_err(|e| ApiError::bad_request("invalid_email", e.0))
}

pub(crate) fn meta(headers: &HeaderMap, client_ip: &ClientIp) -> ClientMeta {
    ClientMeta { user_agent: user_agent(headers), ip: client_ip.0.map(|ip| ip.to_string()) }
}

/// The token answer and the refresh cookie of a login, a verification or a rotation.
pub(crate) fn grant_cookie(state: &AppState, jar: CookieJar, grant: LoginGrant) -> (CookieJar, TokenResponse) {
    let cookie = refresh_cookie(
        &state.config.refresh_cookie_name,
        grant.refresh_token,
        grant.refresh_token_ttl,
        state.config.cookie_secure,
    );
    let body =
        TokenResponse { access_token: grant.access_token, access_token_expires_in: grant.access_token_expires_in };
    (jar.add(cookie), body)
}

fn presented_refresh_token(state: &AppState, jar: &CookieJar) -> Option<String> {
    jar.get(&state.config.refresh_cookie_name).map(|c| c.value().to_owned()).filter(|v| !v.is_empty())
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    #[schema(required, nullable = false)]
    email: Option<String>,
    #[schema(format = Password, required, nullable = false)]
    password: Option<String>,
}

/// Log in with e-mail and password. Unknown e-mail and wrong password answer the same 401.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginRequest,
    responses(
        (status = 200, body = TokenResponse, description = "the refresh cookie is set"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "correct password, account not active", body = ErrorBody),
        (status = 429, body = ErrorBody)))]
async fn login(
    State(state): State<AppState>,
    client_ip: ClientIp,
    headers: HeaderMap,
    jar: CookieJar,
    ApiJson(body): ApiJson<LoginRequest>,
) -> ApiResult<(CookieJar, Json<TokenResponse>)> {
    state.limiters.check_ip(Limited::Login, &client_ip.key()).await?;
    let (Some(email), Some(password)) = (body.email.filter(|e| !e.is_empty()), body.password.filter(|p| !p.is_empty()))
    else {
        return Err(ApiError::bad_request("missing_fields", "email and password are required"));
    };
    let email = parse_email(&email)?;
    state.limiters.check_account(Limited::Login, email.as_str()).await?;
    let grant = state.accounts.login(&email, password, &meta(&headers, &client_ip)).await?;
    let (jar, body) = grant_cookie(&state, jar, grant);
    Ok((jar, Json(body)))
}

/// Rotate the refresh token (cookie) and get a new access token.
#[utoipa::path(post, path = "/auth/refresh", tag = "auth",
    responses((status = 200, body = TokenResponse, description = "a new refresh cookie is set"), (status = 401, body = ErrorBody)))]
async fn refresh(
    State(state): State<AppState>,
    client_ip: ClientIp,
    headers: HeaderMap,
    jar: CookieJar,
) -> ApiResult<(CookieJar, Json<TokenResponse>)> {
    let Some(presented) = presented_refresh_token(&state, &jar) else {
        return Err(ApiError::unauthorized("missing_refresh_token", "refresh token is required"));
    };
    let grant = state.accounts.refresh(&presented, &meta(&headers, &client_ip)).await?;
    let (jar, body) = grant_cookie(&state, jar, grant);
    Ok((jar, Json(body)))
}

/// Revoke the current refresh token (if any) and clear the cookie.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", responses((status = 204, description = "cookie cleared")))]
async fn logout(State(state): State<AppState>, jar: CookieJar) -> ApiResult<(StatusCode, CookieJar)> {
    if let Some(presented) = presented_refresh_token(&state, &jar) {
        state.accounts.logout(&presented).await?;
    }
    let cleared = cleared_refresh_cookie(&state.config.refresh_cookie_name, state.config.cookie_secure);
    Ok((StatusCode::NO_CONTENT, jar.add(cleared)))
}

/// Revoke every refresh token of the caller and clear the cookie.
#[utoipa::path(post, path = "/auth/logout-all", tag = "auth", security(("bearer" = [])),
    responses((status = 204, description = "all refresh tokens revoked"), (status = 401, body = ErrorBody)))]
async fn logout_all(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    jar: CookieJar,
) -> ApiResult<(StatusCode, CookieJar)> {
    state.accounts.logout_everywhere(caller.user_id).await?;
    let cleared = cleared_refresh_cookie(&state.config.refresh_cookie_name, state.config.cookie_secure);
    Ok((StatusCode::NO_CONTENT, jar.add(cleared)))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct EmailRequest {
    #[schema(required, nullable = false)]
    email: Option<String>,
}

fn required_email(body: EmailRequest) -> Result<Email, ApiError> {
    let Some(email) = body.email.filter(|e| !e.is_empty()) else {
        return Err(ApiError::bad_request("missing_fields", "email is required"));
    };
    parse_email(&email)
}

/// Send a new verification code. Answers the same whatever the e-mail's existence or status.
#[utoipa::path(post, path = "/auth/resend-verification", tag = "auth", request_body = EmailRequest,
    responses((status = 200, body = StatusResponse), (status = 400, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn resend_verification(
    State(state): State<AppState>,
    client_ip: ClientIp,
    ApiJson(body): ApiJson<EmailRequest>,
) -> ApiResult<Json<StatusResponse>> {
    let started = tokio::time::Instant::now();
    let email = limited_email(&state, &client_ip, body, Limited::ResendVerification).await?;
    state.accounts.resend_verification(&email).await?;
    tokio::time::sleep_until(started + state.config.uniform_response_time).await;
    Ok(Json(OK))
}

/// Request a password-reset e-mail. Answers the same whatever the e-mail's existence or status.
#[utoipa::path(post, path = "/auth/password-reset", tag = "auth", request_body = EmailRequest,
    responses((status = 200, body = StatusResponse), (status = 400, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn password_reset(
    State(state): State<AppState>,
    client_ip: ClientIp,
    ApiJson(body): ApiJson<EmailRequest>,
) -> ApiResult<Json<StatusResponse>> {
    // The same answer after the same time whatever happened, so neither tells whether the
    // account exists.
    let started = tokio::time::Instant::now();
    let email = limited_email(&state, &client_ip, body, Limited::PasswordReset).await?;
    state.accounts.request_password_reset(&email).await?;
    tokio::time::sleep_until(started + state.config.uniform_response_time).await;
    Ok(Json(OK))
}

/// The limits and the parsing both e-mail-sending routes share.
async fn limited_email(
    state: &AppState,
    client_ip: &ClientIp,
    body: EmailRequest,
    route: Limited,
) -> Result<Email, ApiError> {
    state.limiters.check_ip(route, &client_ip.key()).await?;
    let email = required_email(body)?;
    state.limiters.check_account(route, email.as_str()).await?;
    Ok(email)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResetConfirmRequest {
    #[schema(required, nullable = false)]
    email: Option<String>,
    #[schema(required, nullable = false)]
    token: Option<String>,
    #[schema(format = Password, required, nullable = false)]
    new_password: Option<String>,
}

/// Set a new password with the token from the reset e-mail. Every refresh token of the user is
/// revoked.
#[utoipa::path(post, path = "/auth/password-reset/confirm", tag = "auth", request_body = ResetConfirmRequest,
    responses((status = 200, body = StatusResponse), (status = 400, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn password_reset_confirm(
    State(state): State<AppState>,
    client_ip: ClientIp,
    ApiJson(body): ApiJson<ResetConfirmRequest>,
) -> ApiResult<Json<StatusResponse>> {
    state.limiters.check_ip(Limited::PasswordResetConfirm, &client_ip.key()).await?;
    let (Some(email), Some(token), Some(new_password)) = (
        body.email.filter(|v| !v.is_empty()),
        body.token.filter(|v| !v.is_empty()),
        body.new_password.filter(|v| !v.is_empty()),
    ) else {
        return Err(ApiError::bad_request("missing_fields", "email, token and newPassword are required"));
    };
    let email = parse_email(&email)?;
    state.limiters.check_account(Limited::PasswordResetConfirm, email.as_str()).await?;
    state.accounts.confirm_password_reset(&email, &token, new_password).await?;
    Ok(Json(OK))
}
