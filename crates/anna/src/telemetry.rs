//! Logs (JSON by default, pretty with LOG_PRETTY=true) and the process-wide metrics recorder.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid LOG_LEVEL={0:?}: expected a level (error, warn, info, debug, trace) or tracing directives")]
    LogLevel(String),
    #[error("metrics recorder could not be installed: {0}")]
    Metrics(String),
}

/// Installs the global log subscriber. Logs go to stdout, one JSON object a line (or pretty).
pub fn init_logs(config: &Config) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_new(format!("{},sqlx=warn,hyper=warn,h2=warn,tower_http=info", config.log_level))
        .map_err(|_| TelemetryError::LogLevel(config.log_level.clone()))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    // `try_init` fails only when a subscriber is already installed (tests): keep the first one.
    if config.log_pretty {
        let _ = builder.pretty().with_ansi(std::io::stdout().is_terminal()).try_init();
    } else {
        let _ = builder.json().with_current_span(true).with_span_list(false).flatten_event(true).try_init();
    }
    Ok(())
}

/// The process-wide Prometheus recorder (installed on first call) and its upkeep task.
pub fn metrics_handle() -> Result<PrometheusHandle, TelemetryError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("http_request_duration_seconds".into()),
                    anna_api::telemetry::HTTP_LATENCY_BUCKETS,
                )
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| e.to_string())?;
            let upkeep = handle.clone();
            // Without upkeep, histogram buffers grow without bound.
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .map_err(|e| e.to_string())?;
            Ok(handle)
        })
        .clone()
        .map_err(TelemetryError::Metrics)
}
