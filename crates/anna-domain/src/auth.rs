//! Refresh-token families. Each login starts a family; every refresh rotates the token inside
//! it; presenting a token that was already rotated out revokes the whole family.

use time::OffsetDateTime;
use uuid::Uuid;

/// A stored refresh token. Only the SHA-256 of the token is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshToken {
    pub token_hash: String,
    pub user_id: Uuid,
    pub family_id: Uuid,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
    /// Set when the token was rotated out; a later use of it is a reuse.
    pub replaced_by_token_hash: Option<String>,
    pub user_agent: Option<String>,
    pub ip: Option<String>,
}

/// What presenting a refresh token means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshTokenState {
    Usable,
    Expired,
    /// Revoked by logout, logout-all, password reset or family revocation.
    Revoked,
    /// Rotated out earlier: someone holds an old copy. The family must be revoked.
    Reused,
}

impl RefreshToken {
    pub fn state(&self, now: OffsetDateTime) -> RefreshTokenState {
        match (self.revoked_at, &self.replaced_by_token_hash) {
            (Some(_), Some(_)) => RefreshTokenState::Reused,
            (Some(_), None) => RefreshTokenState::Revoked,
            (None, _) if self.expires_at <= now => RefreshTokenState::Expired,
            (None, _) => RefreshTokenState::Usable,
        }
    }
}
