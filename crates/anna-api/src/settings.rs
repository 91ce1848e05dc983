//! `/settings/retention`: how long the tenant's message history is kept. Without a choice of
//! its own the operator's default applies (`MESSAGES_RETENTION_DAYS`; 0: forever). Messages
//! older are purged by the events workers, in batches, within `MESSAGES_RETENTION_INTERVAL_MS`.

use anna_usecases::sessions::Retention;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, AuthUser};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_retention, set_retention))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionView {
    /// The tenant's own choice, in days; null: the default applies.
    pub message_retention_days: Option<u32>,
    /// The operator's default, in days (0: forever).
    pub default_days: u32,
    /// What applies; null: messages are kept forever.
    pub effective_days: Option<u32>,
}

impl From<Retention> for RetentionView {
    fn from(retention: Retention) -> Self {
        Self {
            message_retention_days: retention.days,
            default_days: retention.default_days,
            effective_days: retention.effective_days(),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionRequest {
    /// 1 to 3650 days; null goes back to the default.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = u32, required)]
    message_retention_days: Option<Option<u32>>,
}

/// A field that is present, even as null: `Some(None)`; absent: `None` (with `default`).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Option<u32>>, D::Error> {
    Option::<u32>::deserialize(deserializer).map(Some)
}

/// The tenant's message retention.
#[utoipa::path(get, path = "/settings/retention", tag = "chats", security(("bearer" = [])),
    responses((status = 200, body = RetentionView), (status = 401, body = ErrorBody)))]
async fn get_retention(State(state): State<AppState>, AuthUser(caller): AuthUser) -> Result<Response, ApiError> {
    let retention = state.sessions.retention(caller.user_id).await?;
    Ok(axum::Json(RetentionView::from(retention)).into_response())
}

/// Sets how many days the tenant's messages are kept (`null`: the operator's default).
#[utoipa::path(put, path = "/settings/retention", tag = "chats", request_body = RetentionRequest,
    security(("bearer" = [])),
    responses((status = 200, body = RetentionView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn set_retention(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiJson(body): ApiJson<RetentionRequest>,
) -> Result<Response, ApiError> {
    let Some(days) = body.message_retention_days else {
        return Err(ApiError::bad_request(
            "missing_fields",
            "messageRetentionDays is required (null goes back to the default)",
        ));
    };
    let retention = state.sessions.set_retention(caller.user_id, days).await?;
    Ok(axum::Json(RetentionView::from(retention)).into_response())
}
