//! Users: reads outside a transaction ([`UserStore`]) and changes inside a unit of work
//! ([`UserWrites`]).

use anna_domain::{User, UserStatus};
use async_trait::async_trait;
use uuid::Uuid;

use crate::StoreError;
use crate::sql::{Query, Row, Sql};
use crate::store::{SqlStore, SqlUnitOfWork};

#[async_trait]
pub trait UserStore: Send + Sync {
    async fn find_user_by_id(&self, id: Uuid) -> Result<Option<User>, StoreError>;

    /// `email` must already be normalised (see `anna_domain::Email`).
    async fn find_user_by_email(&self, email: &str) -> Result<Option<User>, StoreError>;
}

/// The user half of a unit of work.
#[async_trait]
pub trait UserWrites: Send {
    /// Loads a user for change (Postgres: `FOR UPDATE`).
    async fn find_user_by_id(&mut self, id: Uuid) -> Result<Option<User>, StoreError>;

    /// Loads a user for change by normalised e-mail (Postgres: `FOR UPDATE`).
    async fn find_user_by_email(&mut self, email: &str) -> Result<Option<User>, StoreError>;

    /// Plain insert: an existing id or e-mail gives `Conflict("users_id")` or
    /// `Conflict("users_email")`, never an overwrite.
    async fn insert_user(&mut self, user: &User) -> Result<(), StoreError>;

    /// Updates every column but `id` and `created_at`.
    async fn update_user(&mut self, user: &User) -> Result<(), StoreError>;
}

// Macros rather than consts so that `concat!` builds each query as one `&'static str`.
macro_rules! select_user {
    ($where:literal) => {
        concat!(
            "SELECT id, name, email, status, password_hash, verification_token, verification_code, \
             verification_token_expires_at, verification_attempts, verified_at, password_reset_token, \
             password_reset_token_expires_at, password_reset_attempts, created_at, updated_at, last_login_at, \
             token_generation FROM users WHERE ",
            $where
        )
    };
}

const SELECT_USER_BY_ID: &str = select_user!("id = $1");
const SELECT_USER_BY_EMAIL: &str = select_user!("email = $1");

// SQLite has no row locks; a unit of work there already holds the database-wide write lock
// (BEGIN IMMEDIATE), so only Postgres needs FOR UPDATE.
const LOCK_USER_BY_ID: Sql =
    Sql::PerBackend { sqlite: SELECT_USER_BY_ID, postgres: concat!(select_user!("id = $1"), " FOR UPDATE") };
const LOCK_USER_BY_EMAIL: Sql =
    Sql::PerBackend { sqlite: SELECT_USER_BY_EMAIL, postgres: concat!(select_user!("email = $1"), " FOR UPDATE") };

#[async_trait]
impl UserStore for SqlStore {
    async fn find_user_by_id(&self, id: Uuid) -> Result<Option<User>, StoreError> {
        let row = self.pool.query(SELECT_USER_BY_ID).bind_uuid(id).fetch_optional().await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn find_user_by_email(&self, email: &str) -> Result<Option<User>, StoreError> {
        let row = self.pool.query(SELECT_USER_BY_EMAIL).bind(email).fetch_optional().await?;
        row.as_ref().map(user_from_row).transpose()
    }
}

#[async_trait]
impl UserWrites for SqlUnitOfWork {
    async fn find_user_by_id(&mut self, id: Uuid) -> Result<Option<User>, StoreError> {
        let row = self.tx.query(LOCK_USER_BY_ID).bind_uuid(id).fetch_optional().await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn find_user_by_email(&mut self, email: &str) -> Result<Option<User>, StoreError> {
        let row = self.tx.query(LOCK_USER_BY_EMAIL).bind(email).fetch_optional().await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn insert_user(&mut self, user: &User) -> Result<(), StoreError> {
        let query = self.tx.query(
            "INSERT INTO users (id, name, email, status, password_hash, verification_token, verification_code, \
             verification_token_expires_at, verification_attempts, verified_at, password_reset_token, \
             password_reset_token_expires_at, password_reset_attempts, updated_at, last_login_at, token_generation, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        );
        bind_user(query, user).bind_time(user.created_at).execute().await?;
        Ok(())
    }

    async fn update_user(&mut self, user: &User) -> Result<(), StoreError> {
        let query = self.tx.query(
            "UPDATE users SET name = $2, email = $3, status = $4, password_hash = $5, verification_token = $6, \
             verification_code = $7, verification_token_expires_at = $8, verification_attempts = $9, \
             verified_at = $10, password_reset_token = $11, password_reset_token_expires_at = $12, \
             password_reset_attempts = $13, updated_at = $14, last_login_at = $15, token_generation = $16 WHERE id = $1",
        );
        bind_user(query, user).execute().await?;
        Ok(())
    }
}

/// Binds $1 … $16: the id, then every column an update may change, in the order the INSERT
/// and the UPDATE above name them.
fn bind_user<'c>(query: Query<'c>, user: &User) -> Query<'c> {
    query
        .bind_uuid(user.id)
        .bind(user.name.as_str())
        .bind(user.email.as_str())
        .bind(user.status.as_str())
        .bind(user.password_hash.as_str())
        .bind(user.verification_token.as_deref())
        .bind(user.verification_code.as_deref())
        .bind_opt_time(user.verification_token_expires_at)
        .bind(user.verification_attempts)
        .bind_opt_time(user.verified_at)
        .bind(user.password_reset_token.as_deref())
        .bind_opt_time(user.password_reset_token_expires_at)
        .bind(user.password_reset_attempts)
        .bind_time(user.updated_at)
        .bind_opt_time(user.last_login_at)
        .bind(user.token_generation)
}

fn user_from_row(row: &Row) -> Result<User, StoreError> {
    let status: String = row.get("status")?;
    Ok(User {
        id: row.uuid("id")?,
        name: row.get("name")?,
        email: row.get("email")?,
        status: UserStatus::parse(&status).map_err(|e| StoreError::Corrupt(e.0))?,
        password_hash: row.get("password_hash")?,
        verification_token: row.get("verification_token")?,
        verification_code: row.get("verification_code")?,
        verification_token_expires_at: row.opt_time("verification_token_expires_at")?,
        verification_attempts: row.get("verification_attempts")?,
        verified_at: row.opt_time("verified_at")?,
        password_reset_token: row.get("password_reset_token")?,
        password_reset_token_expires_at: row.opt_time("password_reset_token_expires_at")?,
        password_reset_attempts: row.get("password_reset_attempts")?,
        created_at: row.time("created_at")?,
        updated_at: row.time("updated_at")?,
        last_login_at: row.opt_time("last_login_at")?,
        token_generation: row.get("token_generation")?,
    })
}
