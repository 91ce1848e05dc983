//! Test-only helpers. Nothing here is used by a production path.
//!
//! Every helper fails loudly when what it needs is missing: a test never skips because a
//! service is absent.

pub mod logs;
pub mod partition;
pub mod pg;
pub mod redis;
pub mod resend_fake;
pub mod s3;
pub mod smtp;
pub mod sqlite;
pub mod webhook_receiver;
