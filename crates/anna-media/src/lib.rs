//! Media objects: files tenants upload to send, and the media of the messages their sessions
//! receive. Stored privately (the local filesystem in the embedded shape, an S3-compatible
//! bucket in production) under per-tenant keys, handed out only through short-lived signed
//! URLs, and checked for what they really are before anything is stored.

mod keys;
mod kind;
mod staging;
mod storage;

pub use keys::{ObjectKey, display_file_name};
pub use kind::{MediaKind, SNIFF_BYTES, extension_for, inspect, sendable_as};
pub use staging::{StagedFile, Staging};
pub use storage::{MediaBackend, MediaStorage, S3Settings, SignedUrl, StorageSettings};

/// What can go wrong with media.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The bytes are not what the kind says.
    #[error("the file is not a valid {kind}: expected {expected}, found {found}")]
    WrongContent { kind: &'static str, expected: &'static str, found: String },
    /// Larger than the limit of where it is going.
    #[error("the file is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    /// No such object in the store.
    #[error("the media object does not exist")]
    NotFound,
    /// The settings cannot work (a bucket without credentials, a directory that cannot be made).
    #[error("media storage settings: {0}")]
    Settings(String),
    /// The store failed (unreachable bucket, full disk, refused credentials).
    #[error("media storage: {0}")]
    Storage(String),
}

impl From<object_store::Error> for MediaError {
    fn from(error: object_store::Error) -> Self {
        match error {
            object_store::Error::NotFound { .. } => Self::NotFound,
            other => Self::Storage(other.to_string()),
        }
    }
}
