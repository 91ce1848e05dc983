//! Device keys of WhatsApp sessions: one credentials document per session
//! (`session_auth_creds`) and any number of typed keys (`session_auth_keys`: Signal sessions,
//! pre-keys, sender keys, app-state keys, …). The session drivers (the whatsapp-rust adapter
//! and the simulator) keep their whole pairing state here, so any worker can resume any
//! session from the database alone.
//!
//! Values are JSON documents (jsonb on Postgres, TEXT on SQLite); binary material is encoded
//! by the caller (base64 strings).

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::StoreError;
use crate::sql::Sql;
use crate::store::SqlStore;

/// One key to write (`Some`) or delete (`None`).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyChange {
    pub key_type: String,
    pub key_id: String,
    pub value: Option<serde_json::Value>,
}

impl KeyChange {
    pub fn put(key_type: impl Into<String>, key_id: impl Into<String>, value: serde_json::Value) -> Self {
        Self { key_type: key_type.into(), key_id: key_id.into(), value: Some(value) }
    }

    pub fn delete(key_type: impl Into<String>, key_id: impl Into<String>) -> Self {
        Self { key_type: key_type.into(), key_id: key_id.into(), value: None }
    }
}

#[async_trait]
pub trait DeviceKeyStore: Send + Sync {
    async fn load_creds(&self, session_id: Uuid) -> Result<Option<serde_json::Value>, StoreError>;

    /// Creates or replaces the session's credentials document.
    async fn save_creds(&self, session_id: Uuid, tenant_id: Uuid, creds: &serde_json::Value) -> Result<(), StoreError>;

    /// The keys of `key_type` among `key_ids` that exist, as (id, value).
    async fn get_keys(
        &self,
        session_id: Uuid,
        key_type: &str,
        key_ids: &[String],
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError>;

    /// Every key of `key_type`, ordered by id.
    async fn list_keys(&self, session_id: Uuid, key_type: &str)
    -> Result<Vec<(String, serde_json::Value)>, StoreError>;

    /// Applies every change in one transaction, in order.
    async fn set_keys(&self, session_id: Uuid, tenant_id: Uuid, changes: &[KeyChange]) -> Result<(), StoreError>;

    /// Deletes every key of `key_type`. Returns how many.
    async fn delete_key_type(&self, session_id: Uuid, key_type: &str) -> Result<u64, StoreError>;

    /// Deletes the credentials and every key of the session (logout, re-pairing, deletion).
    async fn wipe_device(&self, session_id: Uuid) -> Result<(), StoreError>;
}

const UPSERT_KEY: Sql = Sql::Same(
    "INSERT INTO session_auth_keys (session_id, tenant_id, key_type, key_id, value, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (session_id, key_type, key_id) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
);

#[async_trait]
impl DeviceKeyStore for SqlStore {
    async fn load_creds(&self, session_id: Uuid) -> Result<Option<serde_json::Value>, StoreError> {
        let row = self
            .pool
            .query("SELECT creds FROM session_auth_creds WHERE session_id = $1")
            .bind(session_id.to_string())
            .fetch_optional()
            .await?;
        Ok(row.map(|row| row.opt_json("creds")).transpose()?.flatten())
    }

    async fn save_creds(&self, session_id: Uuid, tenant_id: Uuid, creds: &serde_json::Value) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        self.check_fence(&mut tx, session_id).await?;
        tx.query(
            "INSERT INTO session_auth_creds (session_id, tenant_id, creds, updated_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (session_id) DO UPDATE SET creds = excluded.creds, updated_at = excluded.updated_at",
        )
        .bind(session_id.to_string())
        .bind(tenant_id.to_string())
        .bind_json(creds)
        .bind_time(OffsetDateTime::now_utc())
        .execute()
        .await?;
        tx.commit().await
    }

    async fn get_keys(
        &self,
        session_id: Uuid,
        key_type: &str,
        key_ids: &[String],
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        if key_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .pool
            .query(Sql::PerBackend {
                sqlite: "SELECT key_id, value FROM session_auth_keys WHERE session_id = $1 AND key_type = $2 \
                         AND key_id IN (SELECT value FROM json_each($3)) AND value IS NOT NULL",
                postgres: "SELECT key_id, value FROM session_auth_keys WHERE session_id = $1 AND key_type = $2 \
                           AND key_id = ANY($3) AND value IS NOT NULL",
            })
            .bind(session_id.to_string())
            .bind(key_type)
            .bind_text_set(key_ids)
            .fetch_all()
            .await?;
        rows.iter().map(|row| Ok((row.get("key_id")?, row.json("value")?))).collect()
    }

    async fn list_keys(
        &self,
        session_id: Uuid,
        key_type: &str,
    ) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        let rows = self
            .pool
            .query(
                "SELECT key_id, value FROM session_auth_keys WHERE session_id = $1 AND key_type = $2 \
                 AND value IS NOT NULL ORDER BY key_id",
            )
            .bind(session_id.to_string())
            .bind(key_type)
            .fetch_all()
            .await?;
        rows.iter().map(|row| Ok((row.get("key_id")?, row.json("value")?))).collect()
    }

    async fn set_keys(&self, session_id: Uuid, tenant_id: Uuid, changes: &[KeyChange]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let session = session_id.to_string();
        let tenant = tenant_id.to_string();
        let now = OffsetDateTime::now_utc();
        let mut tx = self.pool.begin().await?;
        self.check_fence(&mut tx, session_id).await?;
        for change in changes {
            match &change.value {
                Some(value) => {
                    tx.query(UPSERT_KEY)
                        .bind(session.as_str())
                        .bind(tenant.as_str())
                        .bind(change.key_type.as_str())
                        .bind(change.key_id.as_str())
                        .bind_json(value)
                        .bind_time(now)
                        .execute()
                        .await?;
                }
                None => {
                    tx.query("DELETE FROM session_auth_keys WHERE session_id = $1 AND key_type = $2 AND key_id = $3")
                        .bind(session.as_str())
                        .bind(change.key_type.as_str())
                        .bind(change.key_id.as_str())
                        .execute()
                        .await?;
                }
            }
        }
        tx.commit().await
    }

    async fn delete_key_type(&self, session_id: Uuid, key_type: &str) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        self.check_fence(&mut tx, session_id).await?;
        let deleted = tx
            .query("DELETE FROM session_auth_keys WHERE session_id = $1 AND key_type = $2")
            .bind(session_id.to_string())
            .bind(key_type)
            .execute()
            .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn wipe_device(&self, session_id: Uuid) -> Result<(), StoreError> {
        let session = session_id.to_string();
        let mut tx = self.pool.begin().await?;
        self.check_fence(&mut tx, session_id).await?;
        tx.query("DELETE FROM session_auth_keys WHERE session_id = $1").bind(session.as_str()).execute().await?;
        tx.query("DELETE FROM session_auth_creds WHERE session_id = $1").bind(session.as_str()).execute().await?;
        tx.commit().await
    }
}
