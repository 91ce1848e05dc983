//! The anna binary's library half: configuration, wiring, telemetry and the commands, so the
//! integration tests can start exactly what the binary starts.

pub mod app;
pub mod commands;
pub mod config;
pub mod operator;
pub mod server;
pub mod supervisor;
pub mod telemetry;
