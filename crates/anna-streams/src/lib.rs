//! anna's event streams: the [`Stream`] trait (append, consumer groups, group reads, ack, claim
//! of idle entries, pending inspection, tail reads), its Redis Streams and embedded (SQLite)
//! implementations, and — built on it — the outbox relay and the consumer runtime.
//!
//! Both implementations pass one conformance suite (`tests/conformance`).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

pub mod backoff;
pub mod consumer;
pub mod embedded;
pub mod envelope;
pub mod redis_stream;
pub mod relay;
pub mod trace;
mod trim_clock;

pub use embedded::EmbeddedStream;
pub use redis_stream::RedisStream;

/// The fields of one entry, as flat string pairs (what Redis stores).
pub type Fields = BTreeMap<String, String>;

/// One stream entry. Ids are opaque strings, increasing within a stream; `"0"` sorts before
/// every id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub fields: Fields,
}

/// An entry delivered to a consumer of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub entry: Entry,
    /// How many times the entry has been delivered in this group, this delivery included.
    pub delivery_count: u64,
}

/// What a group has been given but not acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingSummary {
    pub count: u64,
    pub oldest_id: Option<String>,
    /// Pending entries per consumer name.
    pub consumers: BTreeMap<String, u64>,
}

/// A consumer group's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    /// Delivered, not yet acknowledged.
    pub pending: u64,
    /// Entries in the stream not yet delivered to the group.
    pub lag: u64,
    pub last_delivered_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("embedded stream storage: {0}")]
    Sqlite(#[from] sqlx::Error),
    #[error("consumer group {group:?} does not exist on stream {stream:?}")]
    NoGroup { stream: String, group: String },
    #[error("stream reply could not be understood: {0}")]
    Protocol(String),
}

/// A batch append that stopped part-way: `appended` entries made it, then `error`.
#[derive(Debug, thiserror::Error)]
#[error("{error} (after {} entries of the batch were appended)", appended.len())]
pub struct BatchAppendError {
    pub appended: Vec<String>,
    pub error: StreamError,
}

#[async_trait]
pub trait Stream: Send + Sync + 'static {
    /// `"redis"` or `"embedded"`.
    fn backend(&self) -> &'static str;

    /// Round trip to the backing store.
    async fn ping(&self) -> Result<(), StreamError>;

    /// Appends an entry and returns its id. With `max_len`, older entries are trimmed towards
    /// about that length — but never an entry that some group has not yet read and
    /// acknowledged: a lagging group makes the stream longer instead (see [`Stream::groups`]).
    async fn append(&self, stream: &str, fields: &Fields, max_len: Option<u64>) -> Result<String, StreamError>;

    /// Appends entries in order (implementations may pipeline them). On failure, the entries
    /// before the failing one were appended; whether later ones were is unknown only to a
    /// pipelining implementation, which then reports none of them.
    async fn append_batch(
        &self,
        stream: &str,
        entries: &[Fields],
        max_len: Option<u64>,
    ) -> Result<Vec<String>, BatchAppendError> {
        let mut appended = Vec::with_capacity(entries.len());
        for fields in entries {
            match self.append(stream, fields, max_len).await {
                Ok(id) => appended.push(id),
                Err(error) => return Err(BatchAppendError { appended, error }),
            }
        }
        Ok(appended)
    }

    /// Creates a consumer group that starts at the beginning of the stream (so it sees the
    /// backlog), creating the stream if needed. Idempotent: an existing group is success.
    async fn create_group(&self, stream: &str, group: &str) -> Result<(), StreamError>;

    /// Up to `count` never-delivered entries for `consumer`, waiting up to `block` for the
    /// first one (`Duration::ZERO`: do not wait). Delivered entries become pending for the
    /// consumer until acknowledged.
    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>, StreamError>;

    /// Acknowledges entries; returns how many were pending.
    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64, StreamError>;

    /// Moves up to `count` entries pending for longer than `min_idle` (in any consumer) to
    /// `consumer`, incrementing their delivery counts, and returns them.
    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Delivery>, StreamError>;

    /// Resets the idle time of entries still pending for `consumer` (it keeps working on them,
    /// for example waiting to retry), so other consumers' claims leave them alone. Entries not
    /// pending for `consumer` are untouched; delivery counts do not change. Returns how many
    /// were touched.
    async fn touch(&self, stream: &str, group: &str, consumer: &str, ids: &[String]) -> Result<u64, StreamError>;

    /// Deletes entries from the stream (operator use: DLQ replay and purge). Returns how many
    /// existed.
    async fn delete(&self, stream: &str, ids: &[String]) -> Result<u64, StreamError>;

    async fn pending(&self, stream: &str, group: &str) -> Result<PendingSummary, StreamError>;

    /// Up to `count` entries with ids greater than `after` (`"0"`: from the start), waiting up
    /// to `block` for the first. No group: for fan-out readers such as WebSocket feeds.
    async fn read_after(
        &self,
        stream: &str,
        after: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, StreamError>;

    /// The id of the newest entry, if any (a tail reader starts after it).
    async fn last_id(&self, stream: &str) -> Result<Option<String>, StreamError>;

    async fn len(&self, stream: &str) -> Result<u64, StreamError>;

    /// Every group of the stream with its pending count and lag.
    async fn groups(&self, stream: &str) -> Result<Vec<GroupInfo>, StreamError>;
}
