//! WhatsApp sessions: reads outside a transaction ([`SessionStore`]) and changes inside a unit
//! of work ([`SessionWrites`]).

use anna_domain::{Session, SessionStatus};
use async_trait::async_trait;
use uuid::Uuid;

use crate::StoreError;
use crate::sql::{Query, Row, Sql};
use crate::store::{SqlStore, SqlUnitOfWork};

#[async_trait]
pub trait SessionStore: Send + Sync {
    async fn find_session(&self, id: Uuid) -> Result<Option<Session>, StoreError>;

    /// The tenant's sessions, newest first.
    async fn list_sessions(&self, tenant_id: Uuid) -> Result<Vec<Session>, StoreError>;

    /// Sessions in one of `statuses`, oldest first (resuming after a restart).
    async fn list_sessions_with_status(&self, statuses: &[SessionStatus]) -> Result<Vec<Session>, StoreError>;

    /// How many sessions there are in each status; statuses with none are left out.
    async fn count_sessions_by_status(&self) -> Result<Vec<(SessionStatus, u64)>, StoreError>;
}

/// The session half of a unit of work.
#[async_trait]
pub trait SessionWrites: Send {
    /// Loads a session for change (Postgres: `FOR NO KEY UPDATE`: changes of one session wait
    /// for each other, but not for rows that merely reference it, such as a history piece a
    /// cut-off worker left hanging in an open transaction).
    async fn find_session(&mut self, id: Uuid) -> Result<Option<Session>, StoreError>;

    /// How many sessions the tenant has, counted under a lock of the tenant's user row so
    /// concurrent creations cannot both pass a limit (Postgres: `FOR UPDATE` on `users`).
    async fn count_tenant_sessions(&mut self, tenant_id: Uuid) -> Result<u64, StoreError>;

    /// Plain insert: an existing id gives `Conflict("sessions_id")`.
    async fn insert_session(&mut self, session: &Session) -> Result<(), StoreError>;

    /// Updates every column but `id`, `tenant_id` and `created_at`.
    async fn update_session(&mut self, session: &Session) -> Result<(), StoreError>;

    /// Deletes the session with its device keys. Returns whether it existed.
    async fn delete_session(&mut self, id: Uuid) -> Result<bool, StoreError>;
}

macro_rules! select_session {
    ($where:literal) => {
        concat!(
            "SELECT id, tenant_id, status, phone, qr, qr_expires_at, connected_at, disconnected_at, \
             disconnected_reason, created_at, updated_at FROM sessions WHERE ",
            $where
        )
    };
}

const SELECT_SESSION: &str = select_session!("id = $1");
// Row locks on Postgres only: see users.rs. `NO KEY`: a session's id never changes, and rows
// referencing it (messages, chats, contacts) hold key-share locks that `FOR UPDATE` would wait for.
const LOCK_SESSION: Sql =
    Sql::PerBackend { sqlite: SELECT_SESSION, postgres: concat!(select_session!("id = $1"), " FOR NO KEY UPDATE") };

#[async_trait]
impl SessionStore for SqlStore {
    async fn find_session(&self, id: Uuid) -> Result<Option<Session>, StoreError> {
        let row = self.pool.query(SELECT_SESSION).bind_uuid(id).fetch_optional().await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn list_sessions(&self, tenant_id: Uuid) -> Result<Vec<Session>, StoreError> {
        let rows = self
            .pool
            .query(select_session!("tenant_id = $1 ORDER BY created_at DESC, id"))
            .bind_uuid(tenant_id)
            .fetch_all()
            .await?;
        rows.iter().map(session_from_row).collect()
    }

    async fn list_sessions_with_status(&self, statuses: &[SessionStatus]) -> Result<Vec<Session>, StoreError> {
        let statuses: Vec<String> = statuses.iter().map(|s| s.as_str().to_owned()).collect();
        let rows = self
            .pool
            .query(Sql::PerBackend {
                sqlite: select_session!("status IN (SELECT value FROM json_each($1)) ORDER BY updated_at, id"),
                postgres: select_session!("status = ANY($1) ORDER BY updated_at, id"),
            })
            .bind_text_set(&statuses)
            .fetch_all()
            .await?;
        rows.iter().map(session_from_row).collect()
    }

    async fn count_sessions_by_status(&self) -> Result<Vec<(SessionStatus, u64)>, StoreError> {
        let rows = self.pool.query("SELECT status, count(*) AS n FROM sessions GROUP BY status").fetch_all().await?;
        rows.iter()
            .map(|row| {
                let status: String = row.get("status")?;
                let n: i64 = row.get("n")?;
                let status = SessionStatus::parse(&status)
                    .ok_or_else(|| StoreError::Corrupt(format!("unknown session status {status:?}")))?;
                Ok((status, u64::try_from(n).unwrap_or_default()))
            })
            .collect()
    }
}

#[async_trait]
impl SessionWrites for SqlUnitOfWork {
    async fn find_session(&mut self, id: Uuid) -> Result<Option<Session>, StoreError> {
        let row = self.tx.query(LOCK_SESSION).bind_uuid(id).fetch_optional().await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn count_tenant_sessions(&mut self, tenant_id: Uuid) -> Result<u64, StoreError> {
        self.lock_tenant(tenant_id).await?;
        let row = self
            .tx
            .query("SELECT count(*) AS sessions FROM sessions WHERE tenant_id = $1")
            .bind_uuid(tenant_id)
            .fetch_one()
            .await?;
        row.count("sessions")
    }

    async fn insert_session(&mut self, session: &Session) -> Result<(), StoreError> {
        self.check_fence(session.id).await?;
        let query = self.tx.query(
            "INSERT INTO sessions (id, status, phone, qr, qr_expires_at, connected_at, disconnected_at, \
             disconnected_reason, updated_at, tenant_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        );
        bind_session(query, session).bind_uuid(session.tenant_id).bind_time(session.created_at).execute().await?;
        Ok(())
    }

    async fn update_session(&mut self, session: &Session) -> Result<(), StoreError> {
        self.check_fence(session.id).await?;
        let query = self.tx.query(
            "UPDATE sessions SET status = $2, phone = $3, qr = $4, qr_expires_at = $5, connected_at = $6, \
             disconnected_at = $7, disconnected_reason = $8, updated_at = $9 WHERE id = $1",
        );
        bind_session(query, session).execute().await?;
        Ok(())
    }

    async fn delete_session(&mut self, id: Uuid) -> Result<bool, StoreError> {
        self.check_fence(id).await?;
        let text_id = id.to_string();
        self.tx.query("DELETE FROM session_auth_keys WHERE session_id = $1").bind(text_id.as_str()).execute().await?;
        self.tx.query("DELETE FROM session_auth_creds WHERE session_id = $1").bind(text_id.as_str()).execute().await?;
        Ok(self.tx.query("DELETE FROM sessions WHERE id = $1").bind_uuid(id).execute().await? == 1)
    }
}

/// Binds $1 … $9: the id, then every column an update may change.
fn bind_session<'c>(query: Query<'c>, session: &Session) -> Query<'c> {
    query
        .bind_uuid(session.id)
        .bind(session.status.as_str())
        .bind(session.phone.as_deref())
        .bind(session.qr.as_deref())
        .bind_opt_time(session.qr_expires_at)
        .bind_opt_time(session.connected_at)
        .bind_opt_time(session.disconnected_at)
        .bind(session.disconnected_reason.as_deref())
        .bind_time(session.updated_at)
}

fn session_from_row(row: &Row) -> Result<Session, StoreError> {
    let status: String = row.get("status")?;
    Ok(Session {
        id: row.uuid("id")?,
        tenant_id: row.uuid("tenant_id")?,
        status: SessionStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("session status {status:?}")))?,
        phone: row.get("phone")?,
        qr: row.get("qr")?,
        qr_expires_at: row.opt_time("qr_expires_at")?,
        connected_at: row.opt_time("connected_at")?,
        disconnected_at: row.opt_time("disconnected_at")?,
        disconnected_reason: row.get("disconnected_reason")?,
        created_at: row.time("created_at")?,
        updated_at: row.time("updated_at")?,
    })
}
