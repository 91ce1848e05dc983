//! The single mapping from every error to an HTTP response: `{"message": "...", "code": "..."}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use anna_domain::user::VerifyError;
use anna_store::StoreError;
use anna_usecases::{
    CurrentUserError, Failure, LoginError, PasswordResetError, RefreshError, RegisterError, VerifyEmailError,
    WebhookError,
};

/// The error body of every route: a human message (predecessor-compatible) and a stable code.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub message: String,
    pub code: &'static str,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after_secs: None }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn too_many_requests(retry_after_secs: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message: format!("too many requests: retry in {retry_after_secs} s"),
            retry_after_secs: Some(retry_after_secs),
        }
    }

    /// A real fault. The cause is logged here, once; the client gets a generic message.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal Server Error")
    }

    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "dependency unavailable");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "service temporarily unavailable")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { message: self.message, code: self.code })).into_response();
        if let Some(secs) = self.retry_after_secs
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(_) => Self::conflict("conflict", "resource already exists"),
            unavailable if unavailable.is_unavailable() => Self::unavailable(unavailable),
            other => Self::internal(other),
        }
    }
}

impl From<Failure> for ApiError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Store(error) => error.into(),
            Failure::Stream(error) => Self::unavailable(error),
            other => Self::internal(other),
        }
    }
}

impl From<RegisterError> for ApiError {
    fn from(error: RegisterError) -> Self {
        match error {
            RegisterError::InvalidPassword(e) => Self::bad_request("invalid_password", e.0),
            RegisterError::EmailTaken => Self::conflict("email_taken", "a user with this e-mail already exists"),
            RegisterError::Failed(failure) => failure.into(),
        }
    }
}

impl From<VerifyEmailError> for ApiError {
    fn from(error: VerifyEmailError) -> Self {
        match error {
            VerifyEmailError::UserNotFound(id) => {
                Self::not_found("user_not_found", format!("The user {id} does not exist"))
            }
            VerifyEmailError::Refused(refused) => {
                let message = refused.to_string();
                match refused {
                    VerifyError::AlreadyVerified(_) => Self::conflict("already_verified", message),
                    VerifyError::NotVerifiable(_) => Self::conflict("not_verifiable", message),
                    VerifyError::Mismatch(_) => Self::bad_request("verification_mismatch", message),
                    VerifyError::Expired { .. } => Self::bad_request("verification_expired", message),
                    VerifyError::AttemptsExhausted(_) => Self::bad_request("verification_void", message),
                }
            }
            VerifyEmailError::Failed(failure) => failure.into(),
        }
    }
}

impl From<CurrentUserError> for ApiError {
    fn from(error: CurrentUserError) -> Self {
        match error {
            CurrentUserError::NotFound(id) => {
                Self::not_found("user_not_found", format!("The user {id} does not exist"))
            }
            CurrentUserError::Failed(failure) => failure.into(),
        }
    }
}

impl From<LoginError> for ApiError {
    fn from(error: LoginError) -> Self {
        match error {
            LoginError::InvalidCredentials => Self::unauthorized("invalid_credentials", "Invalid credentials"),
            LoginError::NotActive => Self::new(StatusCode::FORBIDDEN, "account_not_active", "User is not active"),
            LoginError::Failed(failure) => failure.into(),
        }
    }
}

impl From<RefreshError> for ApiError {
    fn from(error: RefreshError) -> Self {
        match error {
            RefreshError::Invalid => Self::unauthorized("invalid_refresh_token", "Invalid refresh token"),
            RefreshError::Failed(failure) => failure.into(),
        }
    }
}

impl From<PasswordResetError> for ApiError {
    fn from(error: PasswordResetError) -> Self {
        match error {
            PasswordResetError::InvalidPassword(e) => Self::bad_request("invalid_password", e.0),
            PasswordResetError::Refused => Self::bad_request("invalid_reset", "invalid password reset request"),
            PasswordResetError::Failed(failure) => failure.into(),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

impl From<WebhookError> for ApiError {
    fn from(error: WebhookError) -> Self {
        let message = error.to_string();
        match error {
            WebhookError::NotFound(_) => Self::not_found("webhook_not_found", message),
            WebhookError::DeliveryNotFound(_) => Self::not_found("delivery_not_found", message),
            WebhookError::Invalid(_) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_webhook", message),
            WebhookError::TooMany(_) => Self::conflict("too_many_webhooks", message),
            WebhookError::NotFinished(..) => Self::conflict("delivery_not_finished", message),
            WebhookError::Secret(_) => Self::internal(message),
            WebhookError::Failed(failure) => failure.into(),
        }
    }
}
