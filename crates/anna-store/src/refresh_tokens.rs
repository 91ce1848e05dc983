//! Refresh-token families: reads and purges outside a transaction ([`RefreshTokenStore`]),
//! issuing, rotation and revocation inside a unit of work ([`RefreshTokenWrites`]).

use anna_domain::RefreshToken;
use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::StoreError;
use crate::sql::{Row, Sql};
use crate::store::{SqlStore, SqlUnitOfWork};

#[async_trait]
pub trait RefreshTokenStore: Send + Sync {
    async fn find_refresh_token(&self, token_hash: &str) -> Result<Option<RefreshToken>, StoreError>;

    /// Deletes refresh tokens that expired before `now`. Returns how many were deleted.
    async fn purge_expired_refresh_tokens(&self, now: OffsetDateTime) -> Result<u64, StoreError>;
}

/// The refresh-token half of a unit of work.
#[async_trait]
pub trait RefreshTokenWrites: Send {
    async fn insert_refresh_token(&mut self, token: &RefreshToken) -> Result<(), StoreError>;

    /// Loads a refresh token for change (Postgres: `FOR UPDATE`).
    async fn find_refresh_token(&mut self, token_hash: &str) -> Result<Option<RefreshToken>, StoreError>;

    /// Atomically revokes `old_hash` (only if it is not revoked yet), pointing it at the
    /// replacement, and inserts the replacement. Returns false, inserting nothing, when the old
    /// token was already revoked: of two concurrent rotations exactly one wins.
    async fn rotate_refresh_token(
        &mut self,
        old_hash: &str,
        replacement: &RefreshToken,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Revokes one token if it is not revoked yet (logout). Keeps `replaced_by_token_hash`.
    async fn revoke_refresh_token(&mut self, token_hash: &str, now: OffsetDateTime) -> Result<bool, StoreError>;

    /// Revokes every unrevoked token of a family. Returns how many.
    async fn revoke_refresh_token_family(&mut self, family_id: Uuid, now: OffsetDateTime) -> Result<u64, StoreError>;

    /// Revokes every unrevoked token of a user. Returns how many.
    async fn revoke_user_refresh_tokens(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<u64, StoreError>;
}

macro_rules! select_refresh_token {
    () => {
        "SELECT token_hash, user_id, family_id, created_at, expires_at, revoked_at, replaced_by_token_hash, \
         user_agent, ip FROM refresh_tokens WHERE token_hash = $1"
    };
}

const SELECT_REFRESH_TOKEN: &str = select_refresh_token!();
// Row locks on Postgres only: see users.rs.
const LOCK_REFRESH_TOKEN: Sql =
    Sql::PerBackend { sqlite: SELECT_REFRESH_TOKEN, postgres: concat!(select_refresh_token!(), " FOR UPDATE") };

#[async_trait]
impl RefreshTokenStore for SqlStore {
    async fn find_refresh_token(&self, token_hash: &str) -> Result<Option<RefreshToken>, StoreError> {
        let row = self.pool.query(SELECT_REFRESH_TOKEN).bind(token_hash).fetch_optional().await?;
        row.as_ref().map(refresh_token_from_row).transpose()
    }

    async fn purge_expired_refresh_tokens(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        self.pool.query("DELETE FROM refresh_tokens WHERE expires_at < $1").bind_time(now).execute().await
    }
}

#[async_trait]
impl RefreshTokenWrites for SqlUnitOfWork {
    async fn insert_refresh_token(&mut self, token: &RefreshToken) -> Result<(), StoreError> {
        self.tx
            .query(
                "INSERT INTO refresh_tokens (token_hash, user_id, family_id, created_at, expires_at, revoked_at, \
                 replaced_by_token_hash, user_agent, ip) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(token.token_hash.as_str())
            .bind_uuid(token.user_id)
            .bind_uuid(token.family_id)
            .bind_time(token.created_at)
            .bind_time(token.expires_at)
            .bind_opt_time(token.revoked_at)
            .bind(token.replaced_by_token_hash.as_deref())
            .bind(token.user_agent.as_deref())
            .bind(token.ip.as_deref())
            .execute()
            .await?;
        Ok(())
    }

    async fn find_refresh_token(&mut self, token_hash: &str) -> Result<Option<RefreshToken>, StoreError> {
        let row = self.tx.query(LOCK_REFRESH_TOKEN).bind(token_hash).fetch_optional().await?;
        row.as_ref().map(refresh_token_from_row).transpose()
    }

    async fn rotate_refresh_token(
        &mut self,
        old_hash: &str,
        replacement: &RefreshToken,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // On Postgres a concurrent rotation blocks on the row lock of this UPDATE and, once we
        // commit, re-checks `revoked_at IS NULL` against the new row version: it updates
        // nothing. On SQLite the write lock serialises the two whole units of work.
        let rotated = self
            .tx
            .query(
                "UPDATE refresh_tokens SET revoked_at = $1, replaced_by_token_hash = $2 \
                 WHERE token_hash = $3 AND revoked_at IS NULL",
            )
            .bind_time(now)
            .bind(replacement.token_hash.as_str())
            .bind(old_hash)
            .execute()
            .await?;
        if rotated == 0 {
            return Ok(false);
        }
        self.insert_refresh_token(replacement).await?;
        Ok(true)
    }

    async fn revoke_refresh_token(&mut self, token_hash: &str, now: OffsetDateTime) -> Result<bool, StoreError> {
        let revoked = self
            .tx
            .query("UPDATE refresh_tokens SET revoked_at = $1 WHERE token_hash = $2 AND revoked_at IS NULL")
            .bind_time(now)
            .bind(token_hash)
            .execute()
            .await?;
        Ok(revoked > 0)
    }

    async fn revoke_refresh_token_family(&mut self, family_id: Uuid, now: OffsetDateTime) -> Result<u64, StoreError> {
        self.tx
            .query("UPDATE refresh_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL")
            .bind_time(now)
            .bind_uuid(family_id)
            .execute()
            .await
    }

    async fn revoke_user_refresh_tokens(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<u64, StoreError> {
        self.tx
            .query("UPDATE refresh_tokens SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL")
            .bind_time(now)
            .bind_uuid(user_id)
            .execute()
            .await
    }
}

fn refresh_token_from_row(row: &Row) -> Result<RefreshToken, StoreError> {
    Ok(RefreshToken {
        token_hash: row.get("token_hash")?,
        user_id: row.uuid("user_id")?,
        family_id: row.uuid("family_id")?,
        created_at: row.time("created_at")?,
        expires_at: row.time("expires_at")?,
        revoked_at: row.opt_time("revoked_at")?,
        replaced_by_token_hash: row.get("replaced_by_token_hash")?,
        user_agent: row.get("user_agent")?,
        ip: row.get("ip")?,
    })
}
