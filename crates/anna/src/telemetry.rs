//! Logs (JSON by default, pretty with LOG_PRETTY=true) and the process-wide metrics recorder.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid LOG_LEVEL={0:?}: expected a level (error, warn, info, debug, trace) or tracing directives")]
    LogLevel(String),
    #[error("invalid OTEL_EXPORTER_OTLP_ENDPOINT: {0}")]
    Otlp(String),
    #[error("metrics recorder could not be installed: {0}")]
    Metrics(String),
}

/// Keeps the trace pipeline and the log writer alive; `shutdown` flushes spans still buffered,
/// and dropping it writes out the log lines still queued.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    _logs: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl TelemetryGuard {
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("anna: flushing traces failed: {error}");
        }
    }
}

/// The OTLP/HTTP traces URL: the predecessor gave the full `/v1/traces` URL in
/// `OTEL_EXPORTER_OTLP_ENDPOINT`, the OpenTelemetry convention gives the base; both work.
pub fn otlp_traces_url(endpoint: &str) -> String {
    let endpoint = endpoint.trim_end_matches('/');
    if endpoint.ends_with("/v1/traces") { endpoint.to_owned() } else { format!("{endpoint}/v1/traces") }
}

/// Installs the global subscriber: logs to stdout (JSON lines, or pretty) and OpenTelemetry
/// spans. Spans always get W3C trace ids (they travel through the outbox and the streams);
/// they are exported over OTLP/HTTP only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init(config: &Config, process: &str) -> Result<TelemetryGuard, TelemetryError> {
    let filter =
        EnvFilter::try_new(format!("{},sqlx=warn,hyper=warn,h2=warn,tower_http=info", config.telemetry.log_level))
            .map_err(|_| TelemetryError::LogLevel(config.telemetry.log_level.clone()))?;
    let mut provider = SdkTracerProvider::builder().with_resource(
        Resource::builder().with_service_name(format!("{}-{process}", config.telemetry.service_name)).build(),
    );
    if let Some(endpoint) = &config.telemetry.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(otlp_traces_url(endpoint))
            .build()
            .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("anna"));
    // Log lines are written by a thread of their own, in batches: a line per request written
    // straight to stdout from the request's task cost a quarter of the throughput of a
    // one-query request. Nothing is dropped (lossy off): a stdout that cannot keep up slows the
    // writers down rather than losing lines.
    let (writer, logs) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("anna-logs")
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout()));
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = if config.telemetry.log_pretty {
        Box::new(
            tracing_subscriber::fmt::layer().pretty().with_ansi(std::io::stdout().is_terminal()).with_writer(writer),
        )
    } else {
        Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .flatten_event(true)
                .with_writer(writer),
        )
    };
    // `try_init` fails only when a subscriber is already installed (tests): keep the first one.
    let installed = tracing_subscriber::registry().with(fmt).with(otel).with(filter).try_init().is_ok();
    Ok(TelemetryGuard { provider, _logs: installed.then_some(logs) })
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
                // The predecessor's buckets.
                .set_buckets_for_metric(
                    Matcher::Full("event_processing_duration_ms".into()),
                    &[25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0],
                )
                .map_err(|e| e.to_string())?
                .set_buckets_for_metric(
                    Matcher::Full("outbox_dispatch_duration_ms".into()),
                    &[10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
                )
                .map_err(|e| e.to_string())?
                .set_buckets_for_metric(
                    Matcher::Full("event_end_to_end_latency_seconds".into()),
                    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
                )
                .map_err(|e| e.to_string())?
                // Without buckets the exporter renders a summary, which the dashboard's
                // histogram_quantile cannot read (and replicas cannot be summed).
                .set_buckets_for_metric(
                    Matcher::Full("webhook_attempt_duration_seconds".into()),
                    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
                )
                .map_err(|e| e.to_string())?
                .set_buckets_for_metric(
                    Matcher::Full("webhook_delivery_latency_seconds".into()),
                    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0],
                )
                .map_err(|e| e.to_string())?
                .set_buckets_for_metric(
                    Matcher::Full("sessions_failover_seconds".into()),
                    &[0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0],
                )
                .map_err(|e| e.to_string())?
                .set_buckets_for_metric(
                    Matcher::Full("session_event_batch_size".into()),
                    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0],
                )
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| e.to_string())?;
            // So dashboards can tell which build each process runs.
            metrics::gauge!("anna_build_info", "version" => env!("CARGO_PKG_VERSION"), "commit" => crate::GIT_COMMIT)
                .set(1.0);
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
