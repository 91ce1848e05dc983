//! anna's domain: pure types and rules. No I/O and no async runtime here.
//!
//! Bounded contexts show up as modules: `user` (accounts and their verification / reset
//! secrets), `auth` (refresh-token families), `events` (the domain-event envelope and names),
//! plus `secrets` and `password`, the primitives both contexts share.

pub mod auth;
pub mod events;
pub mod media;
pub mod net;
pub mod password;
pub mod secrets;
pub mod session;
pub mod user;
pub mod webhook;

pub use auth::RefreshToken;
pub use events::DomainEvent;
pub use session::{Session, SessionRef, SessionStatus};
pub use user::{Email, User, UserName, UserStatus};

/// A value that breaks a domain rule. The message is safe to show to the client: it never
/// contains a password or a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidArgument(pub String);
