//! `/auth`: login, refresh-token rotation, logout, resend verification, password reset.

pub mod session;
pub mod tokens;

use anna_domain::password;
use anna_domain::secrets;
use anna_domain::{Email, UserStatus, auth::RefreshTokenState};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum_extra::extract::CookieJar;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, AuthUser, ClientIp, user_agent};
use crate::rate_limit::Limited;
use crate::state::{AppState, time_duration};
use session::{ClientMeta, new_refresh_token, start_family};
use tokens::cleared_refresh_cookie;

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

fn invalid_credentials() -> ApiError {
    ApiError::unauthorized("invalid_credentials", "Invalid credentials")
}

fn invalid_refresh() -> ApiError {
    ApiError::unauthorized("invalid_refresh_token", "Invalid refresh token")
}

fn parse_email(raw: &str) -> Result<Email, ApiError> {
    Email::parse(raw).map_err(|e| ApiError::bad_request("invalid_email", e.0))
}

fn meta(headers: &HeaderMap, client_ip: &ClientIp) -> ClientMeta {
    ClientMeta { user_agent: user_agent(headers), ip: client_ip.0.map(|ip| ip.to_string()) }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    email: Option<String>,
    #[schema(format = Password)]
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
    state.limiters.check_ip(Limited::Login, &client_ip.key())?;
    let (Some(email), Some(password)) = (body.email.filter(|e| !e.is_empty()), body.password.filter(|p| !p.is_empty()))
    else {
        return Err(ApiError::bad_request("missing_fields", "email and password are required"));
    };
    let email = parse_email(&email)?;
    state.limiters.check_account(Limited::Login, email.as_str())?;
    let found = state.store.find_user_by_email(email.as_str()).await?;
    let stored_hash = found.as_ref().map(|u| u.password_hash.clone());
    if !state.verify_password(password.clone(), stored_hash).await? {
        return Err(invalid_credentials());
    }
    let Some(user) = found else { return Err(invalid_credentials()) };
    if user.status != UserStatus::Active {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "account_not_active", "User is not active"));
    }
    // Hashes made with an older cost (or by the predecessor) are replaced while the password
    // is at hand, so every stored hash ends up costing the same to check.
    let upgraded_hash = if state.passwords.needs_rehash(&user.password_hash) {
        Some(state.hash_password(password).await?)
    } else {
        None
    };
    let now = OffsetDateTime::now_utc();
    let mut uow = state.store.begin().await?;
    let Some(mut user) = uow.find_user_by_id(user.id).await? else { return Err(invalid_credentials()) };
    if let Some(hash) = upgraded_hash {
        user.password_hash = hash;
    }
    user.record_login(now);
    uow.update_user(&user).await?;
    let (access_token, cookie) = start_family(&state, uow.as_mut(), &user, now, &meta(&headers, &client_ip)).await?;
    uow.commit().await?;
    tracing::info!(user_id = %user.id, "user logged in");
    Ok((jar.add(cookie), Json(TokenResponse { access_token, access_token_expires_in: state.jwt.ttl_secs() })))
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
    let Some(presented) =
        jar.get(&state.config.refresh_cookie_name).map(|c| c.value().to_owned()).filter(|v| !v.is_empty())
    else {
        return Err(ApiError::unauthorized("missing_refresh_token", "refresh token is required"));
    };
    let presented_hash = secrets::sha256_hex(&presented);
    let now = OffsetDateTime::now_utc();
    // Locks in the same order as every other path that changes a user's tokens (login,
    // verification, password reset): the user row first, then the token. Every token change of
    // one user therefore takes turns — no deadlock, and a family revocation sees every token a
    // concurrent rotation added.
    let Some(owner) = state.store.find_refresh_token(&presented_hash).await?.map(|t| t.user_id) else {
        return Err(invalid_refresh());
    };
    let mut uow = state.store.begin().await?;
    let user = uow.find_user_by_id(owner).await?;
    let Some(current) = uow.find_refresh_token(&presented_hash).await? else { return Err(invalid_refresh()) };
    match current.state(now) {
        RefreshTokenState::Usable => {}
        RefreshTokenState::Reused => {
            let rotated_at = current.revoked_at.unwrap_or(now);
            if now - rotated_at >= time_duration(state.config.refresh_reuse_grace) {
                let revoked = uow.revoke_refresh_token_family(current.family_id, now).await?;
                uow.commit().await?;
                metrics::counter!("auth_refresh_reuse_detected_total").increment(1);
                tracing::warn!(user_id = %current.user_id, family_id = %current.family_id, revoked, "refresh token reuse detected: family revoked");
            }
            return Err(invalid_refresh());
        }
        RefreshTokenState::Revoked | RefreshTokenState::Expired => return Err(invalid_refresh()),
    }
    let Some(user) = user.filter(|u| u.status == UserStatus::Active && u.id == current.user_id) else {
        uow.revoke_refresh_token(&presented_hash, now).await?;
        uow.commit().await?;
        return Err(invalid_refresh());
    };
    let replacement = new_refresh_token(&state, user.id, current.family_id, now, &meta(&headers, &client_ip));
    if !uow.rotate_refresh_token(&presented_hash, &replacement.row, now).await? {
        return Err(invalid_refresh());
    }
    uow.commit().await?;
    let access_token = state.jwt.issue(user.id, &user.email, now).map_err(ApiError::internal)?;
    Ok((
        jar.add(replacement.cookie),
        Json(TokenResponse { access_token, access_token_expires_in: state.jwt.ttl_secs() }),
    ))
}

/// Revoke the current refresh token (if any) and clear the cookie.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", responses((status = 204, description = "cookie cleared")))]
async fn logout(State(state): State<AppState>, jar: CookieJar) -> ApiResult<(StatusCode, CookieJar)> {
    if let Some(presented) =
        jar.get(&state.config.refresh_cookie_name).map(|c| c.value().to_owned()).filter(|v| !v.is_empty())
    {
        let mut uow = state.store.begin().await?;
        uow.revoke_refresh_token(&secrets::sha256_hex(&presented), OffsetDateTime::now_utc()).await?;
        uow.commit().await?;
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
    let mut uow = state.store.begin().await?;
    let revoked = uow.revoke_user_refresh_tokens(caller.user_id, OffsetDateTime::now_utc()).await?;
    uow.commit().await?;
    tracing::info!(user_id = %caller.user_id, revoked, "logged out everywhere");
    let cleared = cleared_refresh_cookie(&state.config.refresh_cookie_name, state.config.cookie_secure);
    Ok((StatusCode::NO_CONTENT, jar.add(cleared)))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct EmailRequest {
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
    issue_secret_by_email(&state, &client_ip, body, Limited::ResendVerification, |user, now, state| {
        user.reissue_verification(now, &state.secret_policy, &state.secrets, &state.sealer).map(|(_, event)| event)
    })
    .await
}

/// Request a password-reset e-mail. Answers the same whatever the e-mail's existence or status.
#[utoipa::path(post, path = "/auth/password-reset", tag = "auth", request_body = EmailRequest,
    responses((status = 200, body = StatusResponse), (status = 400, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn password_reset(
    State(state): State<AppState>,
    client_ip: ClientIp,
    ApiJson(body): ApiJson<EmailRequest>,
) -> ApiResult<Json<StatusResponse>> {
    issue_secret_by_email(&state, &client_ip, body, Limited::PasswordReset, |user, now, state| {
        user.request_password_reset(now, &state.secret_policy, &state.secrets, &state.sealer).map(|(_, event)| event)
    })
    .await
}

/// The shape both e-mail-sending routes share: limits, then — when the account exists and
/// `issue` applies to it — the new secret and its event in one unit of work (a subscriber
/// e-mails it), then the same answer after the same time whatever happened.
async fn issue_secret_by_email(
    state: &AppState,
    client_ip: &ClientIp,
    body: EmailRequest,
    route: Limited,
    issue: impl FnOnce(&mut anna_domain::User, OffsetDateTime, &AppState) -> Option<anna_domain::DomainEvent>,
) -> ApiResult<Json<StatusResponse>> {
    let started = tokio::time::Instant::now();
    state.limiters.check_ip(route, &client_ip.key())?;
    let email = required_email(body)?;
    state.limiters.check_account(route, email.as_str())?;
    let now = OffsetDateTime::now_utc();
    let mut uow = state.store.begin().await?;
    if let Some(mut user) = uow.find_user_by_email(email.as_str()).await?
        && let Some(event) = issue(&mut user, now, state)
    {
        uow.update_user(&user).await?;
        uow.append_events(&crate::telemetry::traced([event])).await?;
        uow.commit().await?;
    }
    tokio::time::sleep_until(started + state.config.uniform_response_time).await;
    Ok(Json(OK))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResetConfirmRequest {
    email: Option<String>,
    token: Option<String>,
    #[schema(format = Password)]
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
    state.limiters.check_ip(Limited::PasswordResetConfirm, &client_ip.key())?;
    let (Some(email), Some(token), Some(new_password)) = (
        body.email.filter(|v| !v.is_empty()),
        body.token.filter(|v| !v.is_empty()),
        body.new_password.filter(|v| !v.is_empty()),
    ) else {
        return Err(ApiError::bad_request("missing_fields", "email, token and newPassword are required"));
    };
    let email = parse_email(&email)?;
    state.limiters.check_account(Limited::PasswordResetConfirm, email.as_str())?;
    password::check_policy(&new_password, email.as_str())
        .map_err(|e| ApiError::bad_request("invalid_password", e.0))?;
    let refused = || ApiError::bad_request("invalid_reset", "invalid password reset request");
    let now = OffsetDateTime::now_utc();

    // The token is checked before the (slow) hashing, and again when the new hash is saved,
    // so no write lock is held while hashing and a token cannot be used twice.
    {
        let mut uow = state.store.begin().await?;
        let Some(mut user) = uow.find_user_by_email(email.as_str()).await? else { return Err(refused()) };
        if user.check_password_reset(&token, now, &state.secret_policy, &state.secrets).is_err() {
            uow.update_user(&user).await?;
            uow.commit().await?;
            return Err(refused());
        }
    }
    let new_hash = state.hash_password(new_password).await?;
    let now = OffsetDateTime::now_utc();
    let mut uow = state.store.begin().await?;
    let Some(mut user) = uow.find_user_by_email(email.as_str()).await? else { return Err(refused()) };
    if user.check_password_reset(&token, now, &state.secret_policy, &state.secrets).is_err() {
        uow.update_user(&user).await?;
        uow.commit().await?;
        return Err(refused());
    }
    let event = user.complete_password_reset(new_hash, now);
    uow.update_user(&user).await?;
    let revoked = uow.revoke_user_refresh_tokens(user.id, now).await?;
    uow.append_events(&crate::telemetry::traced([event])).await?;
    uow.commit().await?;
    tracing::info!(user_id = %user.id, revoked, "password reset completed");
    Ok(Json(OK))
}
