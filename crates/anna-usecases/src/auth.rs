//! Authentication: login, refresh-token families (rotation, reuse detection), logout, and the
//! e-mailed secrets (resend verification, password reset).

use anna_domain::auth::RefreshTokenState;
use anna_domain::secrets;
use anna_domain::{DomainEvent, Email, InvalidArgument, RefreshToken, User, UserStatus, password};
use anna_store::UnitOfWork;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Accounts, ClientMeta, Failure, LoginGrant, time_duration, traced};

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Unknown e-mail or wrong password: deliberately one answer for both.
    #[error("Invalid credentials")]
    InvalidCredentials,
    /// The password was right, but the account cannot log in (not verified yet, say).
    #[error("User is not active")]
    NotActive,
    #[error(transparent)]
    Failed(#[from] Failure),
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// Unknown, expired, revoked or reused token, or an account that cannot log in.
    #[error("Invalid refresh token")]
    Invalid,
    #[error(transparent)]
    Failed(#[from] Failure),
}

#[derive(Debug, thiserror::Error)]
pub enum PasswordResetError {
    #[error("{0}")]
    InvalidPassword(InvalidArgument),
    /// Unknown e-mail, wrong, expired or used token: deliberately one answer for all.
    #[error("invalid password reset request")]
    Refused,
    #[error(transparent)]
    Failed(#[from] Failure),
}

crate::store_failures!(LoginError, RefreshError, PasswordResetError);

/// A refresh token as issued: the row to store and the secret for the client.
struct IssuedRefresh {
    row: RefreshToken,
    secret: String,
}

impl Accounts {
    /// Logs in with e-mail and password. Unknown e-mails cost the same time as wrong
    /// passwords. A hash made with an older cost is replaced while the password is at hand.
    pub async fn login(&self, email: &Email, password: String, meta: &ClientMeta) -> Result<LoginGrant, LoginError> {
        let found = self.store.find_user_by_email(email.as_str()).await?;
        let stored_hash = found.as_ref().map(|u| u.password_hash.clone());
        if !self.passwords.verify(password.clone(), stored_hash).await.map_err(Failure::from)? {
            return Err(LoginError::InvalidCredentials);
        }
        let Some(user) = found else { return Err(LoginError::InvalidCredentials) };
        if user.status != UserStatus::Active {
            return Err(LoginError::NotActive);
        }
        // So every stored hash ends up costing the same to check.
        let upgraded_hash = if self.passwords.needs_rehash(&user.password_hash) {
            Some(self.passwords.hash(password).await.map_err(Failure::from)?)
        } else {
            None
        };
        let now = OffsetDateTime::now_utc();
        let mut uow = self.store.begin().await?;
        let checked = user;
        let Some(mut user) = uow.find_user_by_id(checked.id).await? else { return Err(LoginError::InvalidCredentials) };
        // The password was checked against the row as read before the lock: if a password reset
        // or a logout-all committed since, that check no longer holds (and writing the upgraded
        // hash would put the old password back).
        if user.password_hash != checked.password_hash || user.token_generation != checked.token_generation {
            return Err(LoginError::InvalidCredentials);
        }
        if user.status != UserStatus::Active {
            return Err(LoginError::NotActive);
        }
        if let Some(hash) = upgraded_hash {
            user.password_hash = hash;
        }
        user.record_login(now);
        uow.update_user(&user).await?;
        let grant = self.start_family(uow.as_mut(), &user, now, meta).await?;
        let _forget = self.users.forget_on_drop(user.id);
        uow.commit().await?;
        tracing::info!(user_id = %user.id, "user logged in");
        Ok(grant)
    }

    /// Rotates a refresh token: the presented one is revoked and replaced in its family. A
    /// token presented again after its rotation (outside the grace window) revokes the whole
    /// family: someone else holds a copy.
    pub async fn refresh(&self, presented: &str, meta: &ClientMeta) -> Result<LoginGrant, RefreshError> {
        let presented_hash = secrets::sha256_hex(presented);
        let now = OffsetDateTime::now_utc();
        // Locks in the same order as every other path that changes a user's tokens (login,
        // verification, password reset): the user row first, then the token. Every token change
        // of one user therefore takes turns — no deadlock, and a family revocation sees every
        // token a concurrent rotation added.
        let Some(owner) = self.store.find_refresh_token(&presented_hash).await?.map(|t| t.user_id) else {
            return Err(RefreshError::Invalid);
        };
        let mut uow = self.store.begin().await?;
        let user = uow.find_user_by_id(owner).await?;
        let Some(current) = uow.find_refresh_token(&presented_hash).await? else { return Err(RefreshError::Invalid) };
        match current.state(now) {
            RefreshTokenState::Usable => {}
            RefreshTokenState::Reused => {
                let rotated_at = current.revoked_at.unwrap_or(now);
                if now - rotated_at >= time_duration(self.refresh_reuse_grace) {
                    let revoked = uow.revoke_refresh_token_family(current.family_id, now).await?;
                    uow.commit().await?;
                    metrics::counter!("auth_refresh_reuse_detected_total").increment(1);
                    tracing::warn!(user_id = %current.user_id, family_id = %current.family_id, revoked, "refresh token reuse detected: family revoked");
                }
                return Err(RefreshError::Invalid);
            }
            RefreshTokenState::Revoked | RefreshTokenState::Expired => return Err(RefreshError::Invalid),
        }
        let Some(user) = user.filter(|u| u.status == UserStatus::Active && u.id == current.user_id) else {
            uow.revoke_refresh_token(&presented_hash, now).await?;
            uow.commit().await?;
            return Err(RefreshError::Invalid);
        };
        let replacement = self.new_refresh_token(user.id, current.family_id, now, meta);
        if !uow.rotate_refresh_token(&presented_hash, &replacement.row, now).await? {
            return Err(RefreshError::Invalid);
        }
        uow.commit().await?;
        Ok(self.grant(&user, replacement.secret, now)?)
    }

    /// Revokes one refresh token, if it exists and is live.
    pub async fn logout(&self, presented: &str) -> Result<(), Failure> {
        let mut uow = self.store.begin().await?;
        uow.revoke_refresh_token(&secrets::sha256_hex(presented), OffsetDateTime::now_utc()).await?;
        uow.commit().await?;
        Ok(())
    }

    /// Revokes every refresh token of a user, and every access token issued until now.
    /// Returns how many refresh tokens were live.
    pub async fn logout_everywhere(&self, user_id: Uuid) -> Result<u64, Failure> {
        let now = OffsetDateTime::now_utc();
        let mut uow = self.store.begin().await?;
        // The user row first, as every path that changes a user's tokens locks it.
        if let Some(mut user) = uow.find_user_by_id(user_id).await? {
            user.revoke_access_tokens(now);
            uow.update_user(&user).await?;
        }
        let revoked = uow.revoke_user_refresh_tokens(user_id, now).await?;
        let _forget = self.users.forget_on_drop(user_id);
        uow.commit().await?;
        tracing::info!(%user_id, revoked, "logged out everywhere");
        Ok(revoked)
    }

    /// Issues new verification secrets when the account waits for verification (a subscriber
    /// e-mails them). Does nothing otherwise, and says nothing about which case it was.
    pub async fn resend_verification(&self, email: &Email) -> Result<(), Failure> {
        self.issue_secret_by_email(email, |accounts, user, now| {
            user.reissue_verification(now, &accounts.policy, &accounts.secrets, &accounts.sealer).map(|(_, e)| e)
        })
        .await
    }

    /// Issues a password-reset token when the account is active (a subscriber e-mails it).
    /// Does nothing otherwise, and says nothing about which case it was.
    pub async fn request_password_reset(&self, email: &Email) -> Result<(), Failure> {
        self.issue_secret_by_email(email, |accounts, user, now| {
            user.request_password_reset(now, &accounts.policy, &accounts.secrets, &accounts.sealer).map(|(_, e)| e)
        })
        .await
    }

    async fn issue_secret_by_email(
        &self,
        email: &Email,
        issue: impl FnOnce(&Self, &mut User, OffsetDateTime) -> Option<DomainEvent>,
    ) -> Result<(), Failure> {
        let now = OffsetDateTime::now_utc();
        let mut uow = self.store.begin().await?;
        if let Some(mut user) = uow.find_user_by_email(email.as_str()).await?
            && let Some(event) = issue(self, &mut user, now)
        {
            uow.update_user(&user).await?;
            uow.append_events(&traced([event])).await?;
            let _forget = self.users.forget_on_drop(user.id);
            uow.commit().await?;
        }
        Ok(())
    }

    /// Sets a new password with the token from the reset e-mail and revokes every refresh
    /// and access token of the user. The token is checked before the (slow) hashing, and again when the
    /// new hash is saved, so no write lock is held while hashing and a token cannot be used
    /// twice. Wrong tokens count as attempts.
    pub async fn confirm_password_reset(
        &self,
        email: &Email,
        token: &str,
        new_password: String,
    ) -> Result<(), PasswordResetError> {
        password::check_policy(&new_password, email.as_str()).map_err(PasswordResetError::InvalidPassword)?;
        // Checked first and rolled back: nothing changes unless the token was wrong.
        drop(self.lock_for_reset(email, token).await?);
        let new_hash = self.passwords.hash(new_password).await.map_err(Failure::from)?;
        let (mut uow, mut user) = self.lock_for_reset(email, token).await?;
        let now = OffsetDateTime::now_utc();
        let event = user.complete_password_reset(new_hash, now);
        uow.update_user(&user).await?;
        let revoked = uow.revoke_user_refresh_tokens(user.id, now).await?;
        uow.append_events(&traced([event])).await?;
        let _forget = self.users.forget_on_drop(user.id);
        uow.commit().await?;
        tracing::info!(user_id = %user.id, revoked, "password reset completed");
        Ok(())
    }

    /// Locks the user of `email` and checks the reset token. A wrong token counts as an
    /// attempt, committed at once, and refuses.
    async fn lock_for_reset(
        &self,
        email: &Email,
        token: &str,
    ) -> Result<(Box<dyn UnitOfWork>, User), PasswordResetError> {
        let now = OffsetDateTime::now_utc();
        let mut uow = self.store.begin().await?;
        let Some(mut user) = uow.find_user_by_email(email.as_str()).await? else {
            return Err(PasswordResetError::Refused);
        };
        if user.check_password_reset(token, now, &self.policy, &self.secrets).is_err() {
            uow.update_user(&user).await?;
            let _forget = self.users.forget_on_drop(user.id);
            uow.commit().await?;
            return Err(PasswordResetError::Refused);
        }
        Ok((uow, user))
    }

    fn new_refresh_token(
        &self,
        user_id: Uuid,
        family_id: Uuid,
        now: OffsetDateTime,
        meta: &ClientMeta,
    ) -> IssuedRefresh {
        let secret = secrets::random_token();
        let row = RefreshToken {
            token_hash: secrets::sha256_hex(&secret),
            user_id,
            family_id,
            created_at: now,
            expires_at: now + time_duration(self.refresh_token_ttl),
            revoked_at: None,
            replaced_by_token_hash: None,
            user_agent: meta.user_agent.clone(),
            ip: meta.ip.clone(),
        };
        IssuedRefresh { row, secret }
    }

    /// Starts a new refresh-token family for `user` inside `uow` and signs an access token.
    pub(crate) async fn start_family(
        &self,
        uow: &mut dyn UnitOfWork,
        user: &User,
        now: OffsetDateTime,
        meta: &ClientMeta,
    ) -> Result<LoginGrant, Failure> {
        let issued = self.new_refresh_token(user.id, Uuid::new_v4(), now, meta);
        uow.insert_refresh_token(&issued.row).await?;
        self.grant(user, issued.secret, now)
    }

    fn grant(&self, user: &User, refresh_token: String, now: OffsetDateTime) -> Result<LoginGrant, Failure> {
        Ok(LoginGrant {
            access_token: self.tokens.issue(user.id, &user.email, user.token_generation, now)?,
            access_token_expires_in: self.tokens.ttl_secs(),
            refresh_token,
            refresh_token_ttl: self.refresh_token_ttl,
        })
    }
}
