//! anna's workers: the domain-event subscribers (e-mail delivery) and the e-mail senders they
//! use. The loops themselves (outbox relay, consumer runtime) live in `anna-streams`; the
//! binary wires them.

pub mod email;
pub mod fleet;
pub mod history;
pub mod media_fetch;
pub mod partitions;
pub mod sessions;
pub mod subscribers;
pub mod webhooks;
