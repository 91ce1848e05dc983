//! The anna binary's library half: configuration, wiring, telemetry and the commands, so the
//! integration tests can start exactly what the binary starts.

pub mod app;
pub mod commands;
pub mod config;
pub mod metric_families;
pub mod operator;
pub mod server;
pub mod supervisor;
pub mod telemetry;

/// The git commit the binary was built from ("unknown" outside a checkout; see build.rs).
pub const GIT_COMMIT: &str = env!("ANNA_GIT_COMMIT");

/// What `anna --version` prints after the name.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("ANNA_GIT_COMMIT"), ")");
