//! Starting and rotating refresh-token families, and e-mail delivery after commit.

use std::time::Duration;

use anna_domain::secrets;
use anna_domain::{RefreshToken, User};
use anna_store::UnitOfWork;
use axum_extra::extract::cookie::Cookie;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::auth::tokens::refresh_cookie;
use crate::error::ApiError;
use crate::state::{AppState, time_duration};

/// Where a refresh token was issued from (kept on its row).
#[derive(Debug, Clone, Default)]
pub struct ClientMeta {
    pub user_agent: Option<String>,
    pub ip: Option<String>,
}

/// A freshly issued refresh token: the row to store and the cookie carrying the secret.
pub struct IssuedRefresh {
    pub row: RefreshToken,
    pub cookie: Cookie<'static>,
}

pub fn new_refresh_token(
    state: &AppState,
    user_id: Uuid,
    family_id: Uuid,
    now: OffsetDateTime,
    meta: &ClientMeta,
) -> IssuedRefresh {
    let token = secrets::random_token();
    let ttl: Duration = state.config.refresh_token_ttl;
    let row = RefreshToken {
        token_hash: secrets::sha256_hex(&token),
        user_id,
        family_id,
        created_at: now,
        expires_at: now + time_duration(ttl),
        revoked_at: None,
        replaced_by_token_hash: None,
        user_agent: meta.user_agent.clone(),
        ip: meta.ip.clone(),
    };
    let cookie = refresh_cookie(&state.config.refresh_cookie_name, token, ttl, state.config.cookie_secure);
    IssuedRefresh { row, cookie }
}

/// Starts a new token family for `user` inside `uow` and signs an access token.
pub async fn start_family(
    state: &AppState,
    uow: &mut dyn UnitOfWork,
    user: &User,
    now: OffsetDateTime,
    meta: &ClientMeta,
) -> Result<(String, Cookie<'static>), ApiError> {
    let issued = new_refresh_token(state, user.id, Uuid::new_v4(), now, meta);
    uow.insert_refresh_token(&issued.row).await?;
    let access = state.jwt.issue(user.id, &user.email, now).map_err(ApiError::internal)?;
    Ok((access, issued.cookie))
}
