//! anna's storage: one trait per concern (users, refresh-token families, the event log and
//! outbox, idempotency keys), a unit of work that writes an aggregate and its domain events in
//! ONE transaction, and one implementation, [`SqlStore`], that runs on SQLite (the embedded
//! shape) or Postgres (production). Each query is written once; `sql.rs` is the only place
//! that knows how the two databases encode values. Both backends pass the conformance suite
//! in `tests/conformance`.
//!
//! Choosing a backend happens once, in [`connect`]; nothing above this crate knows which one
//! it runs on.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub mod aliases;
pub mod backup;
pub mod device_keys;
pub mod events;
pub mod fleet;
pub mod idempotency;
pub mod media;
pub mod messages;
mod outbox_wake;
pub mod refresh_tokens;
pub mod sessions;
mod sql;
mod store;
mod tcp_nodelay;
pub mod users;
pub mod webhooks;

pub use aliases::{ChatAliasStore, ChatAliasWrites};
pub use backup::{BackupError, BackupReport};
pub use device_keys::{DeviceKeyStore, KeyChange};
pub use events::{DeadLetter, EventLog, EventStat, EventWrites, OutboxRecord, OutboxStatus};
pub use fleet::{Acquired, Fence, FenceSource, FleetStore, FleetView, Lease, WorkerInfo, WorkerRecord};
pub use idempotency::{IdempotencyClaim, IdempotencyStore};
pub use media::{MediaObject, MediaStore, MediaWrites, MessageMedia};
pub use messages::{
    ChatSummary, ChatTouch, ContactSighting, ContactSummary, HistoryCursor, MessageStore, MessageWrites,
    ReactionSummary, StoredMessage,
};
pub use refresh_tokens::{RefreshTokenStore, RefreshTokenWrites};
pub use sessions::{SessionStore, SessionWrites};
pub use store::SqlStore;
pub use users::{UserStore, UserWrites};
pub use webhooks::{WebhookStore, WebhookWrites};

/// Every store trait, for `use anna_store::prelude::*`.
pub mod prelude {
    pub use crate::{
        ChatAliasStore, ChatAliasWrites, DeviceKeyStore, EventLog, EventWrites, FleetStore, IdempotencyStore,
        MediaStore, MediaWrites, MessageStore, MessageWrites, RefreshTokenStore, RefreshTokenWrites, SessionStore,
        SessionWrites, Store, UnitOfWork, UserStore, UserWrites, WebhookStore, WebhookWrites,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was broken; the string names the rule (for example `users_email`).
    #[error("conflict on {0}")]
    Conflict(&'static str),
    #[error("unsupported database URL {0:?}: expected sqlite:… or postgres://…")]
    UnsupportedUrl(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("could not prepare the database location: {0}")]
    Io(#[from] std::io::Error),
    /// A fenced write about a session whose partition this worker no longer holds: a stale
    /// owner's write, refused.
    #[error("fenced: {0}")]
    Fenced(String),
}

impl StoreError {
    /// Pool exhaustion, a closed pool or a lost connection: overload or an outage, not a bug.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Database(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Connection settings shared by both backends.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// Postgres ends a session left idle this long inside a transaction, releasing its locks
    /// (`idle_in_transaction_session_timeout`): a process cut off from the database mid
    /// transaction would otherwise hold them until the server notices the dead connection,
    /// which TCP may take hours to tell. anna's transactions never wait idle.
    pub idle_in_transaction_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: Duration::from_secs(15),
        }
    }
}

/// Opens the store named by `url`: `sqlite:path/to/file.db` (the file and its folder are
/// created when missing) or `postgres://…`. Does not migrate.
pub async fn connect(url: &str, options: &ConnectOptions) -> Result<Arc<dyn Store>, StoreError> {
    Ok(Arc::new(SqlStore::connect(url, options).await?))
}

/// The URL without its password, for error messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}://{}:***@{}", &url[..scheme_end], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[async_trait]
pub trait Store:
    UserStore
    + RefreshTokenStore
    + EventLog
    + IdempotencyStore
    + DeviceKeyStore
    + SessionStore
    + FleetStore
    + WebhookStore
    + MessageStore
    + MediaStore
    + ChatAliasStore
    + Send
    + Sync
    + 'static
{
    fn backend(&self) -> Backend;

    /// Creates or upgrades every table; idempotent and tracked.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Cheap round trip, for readiness checks.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Starts a unit of work. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`),
    /// on Postgres row locks are taken by the `find_*` methods of the unit of work.
    async fn begin(&self) -> Result<Box<dyn UnitOfWork>, StoreError>;

    async fn close(&self);

    /// The same database, with every write of a session's state, events or device keys
    /// checked against `fences` in its own transaction (see [`fleet`]). The sessions worker
    /// writes through such a store.
    fn fenced(&self, fences: Arc<dyn FenceSource>) -> Arc<dyn Store>;
}

/// One transaction over every concern: an aggregate's change and its domain events commit
/// together or not at all. Dropping it without `commit` rolls everything back.
#[async_trait]
pub trait UnitOfWork:
    UserWrites
    + RefreshTokenWrites
    + SessionWrites
    + EventWrites
    + WebhookWrites
    + MessageWrites
    + MediaWrites
    + ChatAliasWrites
    + Send
{
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("postgres://anna:secret@db:5432/anna"), "postgres://anna:***@db:5432/anna");
        assert_eq!(redact_url("sqlite:data/anna.db"), "sqlite:data/anna.db");
    }
}
