//! `Idempotency-Key` bookkeeping: a request with a key is processed once; repeats get the
//! stored answer.

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::StoreError;
use crate::store::SqlStore;

/// What a stored `Idempotency-Key` says about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// First use: the caller processes the request, then completes (or releases) the key.
    Claimed,
    /// Another request with this key is being processed right now.
    InProgress { request_hash: String },
    /// Already answered: the stored response is replayed.
    Done { request_hash: String, status: u16, body: String },
}

#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Claims `key` in `scope` for a request whose body hashes to `request_hash`, or reports
    /// what an earlier request with the same key left.
    async fn claim_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        request_hash: &str,
        now: OffsetDateTime,
    ) -> Result<IdempotencyClaim, StoreError>;

    /// Stores the answer of a claimed key.
    async fn complete_idempotency_key(&self, scope: &str, key: &str, status: u16, body: &str)
    -> Result<(), StoreError>;

    /// Forgets a claimed key whose request failed without an answer worth replaying (a 5xx),
    /// so a retry runs again.
    async fn release_idempotency_key(&self, scope: &str, key: &str) -> Result<(), StoreError>;

    /// Deletes keys created before `before`. Returns how many.
    async fn purge_idempotency_keys(&self, before: OffsetDateTime) -> Result<u64, StoreError>;
}

#[async_trait]
impl IdempotencyStore for SqlStore {
    async fn claim_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        request_hash: &str,
        now: OffsetDateTime,
    ) -> Result<IdempotencyClaim, StoreError> {
        let inserted = self
            .pool
            .query(
                "INSERT INTO idempotency_keys (scope, key, request_hash, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (scope, key) DO NOTHING",
            )
            .bind(scope)
            .bind(key)
            .bind(request_hash)
            .bind_time(now)
            .execute()
            .await?;
        if inserted == 1 {
            return Ok(IdempotencyClaim::Claimed);
        }
        let row = self
            .pool
            .query(
                "SELECT request_hash, response_status, response_body FROM idempotency_keys \
                 WHERE scope = $1 AND key = $2",
            )
            .bind(scope)
            .bind(key)
            .fetch_optional()
            .await?;
        // Released between the two statements: the caller may simply try again.
        let Some(row) = row else { return Ok(IdempotencyClaim::InProgress { request_hash: request_hash.to_owned() }) };
        let stored_hash: String = row.get("request_hash")?;
        match (row.get::<Option<i32>>("response_status")?, row.get::<Option<String>>("response_body")?) {
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
        self.pool
            .query("UPDATE idempotency_keys SET response_status = $3, response_body = $4 WHERE scope = $1 AND key = $2")
            .bind(scope)
            .bind(key)
            .bind(i32::from(status))
            .bind(body)
            .execute()
            .await?;
        Ok(())
    }

    async fn release_idempotency_key(&self, scope: &str, key: &str) -> Result<(), StoreError> {
        self.pool
            .query("DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND response_status IS NULL")
            .bind(scope)
            .bind(key)
            .execute()
            .await?;
        Ok(())
    }

    async fn purge_idempotency_keys(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        self.pool.query("DELETE FROM idempotency_keys WHERE created_at < $1").bind_time(before).execute().await
    }
}
