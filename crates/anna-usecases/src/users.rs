//! Users: registration, e-mail verification (which logs in), the current user.

use anna_domain::password;
use anna_domain::user::VerifyError;
use anna_domain::{Email, InvalidArgument, User, UserName};
use anna_store::StoreError;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Accounts, Caller, ClientMeta, Failure, LoginGrant, traced};

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("{0}")]
    InvalidPassword(InvalidArgument),
    #[error("a user with this e-mail already exists")]
    EmailTaken,
    #[error(transparent)]
    Failed(#[from] Failure),
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyEmailError {
    #[error("The user {0} does not exist")]
    UserNotFound(Uuid),
    #[error(transparent)]
    Refused(VerifyError),
    #[error(transparent)]
    Failed(#[from] Failure),
}

#[derive(Debug, thiserror::Error)]
pub enum CurrentUserError {
    #[error("The user {0} does not exist")]
    NotFound(Uuid),
    #[error(transparent)]
    Failed(#[from] Failure),
}

crate::store_failures!(RegisterError, VerifyEmailError);

impl Accounts {
    /// Registers a user in `pending_verification`; the verification code and link go out by
    /// e-mail (a subscriber of `user.registered`). Returns the new user's id.
    pub async fn register(&self, name: UserName, email: Email, password: String) -> Result<Uuid, RegisterError> {
        password::check_policy(&password, email.as_str()).map_err(RegisterError::InvalidPassword)?;
        // Checked before hashing so duplicates cost no CPU; the insert below still decides races.
        if self.store.find_user_by_email(email.as_str()).await?.is_some() {
            return Err(RegisterError::EmailTaken);
        }
        let password_hash = self.passwords.hash(password).await.map_err(Failure::from)?;
        let now = OffsetDateTime::now_utc();
        let (user, _issued, events) =
            User::register(name, email, password_hash, now, &self.policy, &self.secrets, &self.sealer);
        let mut uow = self.store.begin().await?;
        match uow.insert_user(&user).await {
            Err(StoreError::Conflict(_)) => return Err(RegisterError::EmailTaken),
            other => other?,
        }
        uow.append_events(&traced(events)).await?;
        uow.commit().await?;
        tracing::info!(user_id = %user.id, "user registered");
        Ok(user.id)
    }

    /// Verifies the e-mail address with the link token or the six-digit code, and logs in.
    /// Wrong attempts are counted even though the call fails.
    pub async fn verify_email(
        &self,
        user_id: Uuid,
        candidate: &str,
        meta: &ClientMeta,
    ) -> Result<LoginGrant, VerifyEmailError> {
        let now = OffsetDateTime::now_utc();
        let mut uow = self.store.begin().await?;
        let mut user = uow.find_user_by_id(user_id).await?.ok_or(VerifyEmailError::UserNotFound(user_id))?;
        match user.verify(candidate, now, &self.policy, &self.secrets) {
            Ok(event) => {
                uow.update_user(&user).await?;
                uow.append_events(&traced([event])).await?;
                let grant = self.start_family(uow.as_mut(), &user, now, meta).await?;
                let _forget = self.users.forget_on_drop(user_id);
                uow.commit().await?;
                tracing::info!(%user_id, "user verified");
                Ok(grant)
            }
            Err(refused) => {
                if matches!(refused, VerifyError::Mismatch(_) | VerifyError::AttemptsExhausted(_)) {
                    // The attempt counter must stick even though the request fails.
                    uow.update_user(&user).await?;
                    let _forget = self.users.forget_on_drop(user_id);
                    uow.commit().await?;
                }
                Err(VerifyEmailError::Refused(refused))
            }
        }
    }

    /// The caller's user, as loaded when the access token was checked (no second query).
    pub fn current_user(&self, caller: Caller) -> Result<User, CurrentUserError> {
        caller.user.ok_or(CurrentUserError::NotFound(caller.user_id))
    }
}
