//! One integration-test binary: the real application over real sockets, against SQLite and
//! against Postgres.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod binary;
mod browser;
mod chats;
mod deploy;
mod edge;
mod email;
mod fleet;
mod helpers;
mod media;
mod ops;
mod sessions;
mod users;
mod webhooks;
