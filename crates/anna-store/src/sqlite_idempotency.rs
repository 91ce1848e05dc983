//! `IdempotencyStore` on SQLite.

use async_trait::async_trait;
use sqlx::Row;
use time::OffsetDateTime;

use crate::sqlite::SqliteStore;
use crate::{IdempotencyClaim, IdempotencyStore, StoreError};

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn claim_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        request_hash: &str,
        now: OffsetDateTime,
    ) -> Result<IdempotencyClaim, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, request_hash, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (scope, key) DO NOTHING",
        )
        .bind(scope)
        .bind(key)
        .bind(request_hash)
        .bind(crate::sqlite::to_millis(now)?)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(IdempotencyClaim::Claimed);
        }
        let row = sqlx::query(
            "SELECT request_hash, response_status, response_body FROM idempotency_keys WHERE scope = ? AND key = ?",
        )
        .bind(scope)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        // Released between the two statements: the caller may simply try again.
        let Some(row) = row else { return Ok(IdempotencyClaim::InProgress { request_hash: request_hash.to_owned() }) };
        let stored_hash: String = row.try_get("request_hash")?;
        match (row.try_get::<Option<i32>, _>("response_status")?, row.try_get::<Option<String>, _>("response_body")?) {
            (Some(status), Some(body)) => Ok(IdempotencyClaim::Done {
                request_hash: stored_hash,
                status: u16::try_from(status).map_err(|_| StoreError::Corrupt(format!("response status {status}")))?,
                body,
            }),
            _ => Ok(IdempotencyClaim::InProgress { request_hash: stored_hash }),
        }
    }

    async fn complete_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        status: u16,
        body: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE idempotency_keys SET response_status = ?, response_body = ? WHERE scope = ? AND key = ?")
            .bind(i32::from(status))
            .bind(body)
            .bind(scope)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn release_idempotency_key(&self, scope: &str, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE scope = ? AND key = ? AND response_status IS NULL")
            .bind(scope)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn purge_idempotency_keys(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < ?")
            .bind(crate::sqlite::to_millis(before)?)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
