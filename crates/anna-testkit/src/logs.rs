//! Captures what tracing writes, so tests can assert that no secret reaches the logs.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Everything written through the capturing subscriber since the process started.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    pub fn contents(&self) -> String {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

pub struct CaptureWriter(CapturedLogs);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut inner) = (self.0).0.lock() {
            inner.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once per process) a global JSON subscriber at `debug` level that writes into a
/// shared buffer, and returns that buffer.
pub fn capture() -> CapturedLogs {
    static CAPTURED: OnceLock<CapturedLogs> = OnceLock::new();
    CAPTURED
        .get_or_init(|| {
            let logs = CapturedLogs::default();
            let writer_logs = logs.clone();
            // Spans get W3C trace ids as in production (nothing is exported), so tests can follow
            // a trace through the outbox and the streams.
            static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();
            let provider = PROVIDER.get_or_init(|| opentelemetry_sdk::trace::SdkTracerProvider::builder().build());
            let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("anna-tests"));
            let fmt = tracing_subscriber::fmt::layer().json().with_writer(move || CaptureWriter(writer_logs.clone()));
            let filter = tracing_subscriber::EnvFilter::new("debug,sqlx=warn,hyper=warn,h2=warn,reqwest=warn");
            let _ = tracing_subscriber::registry().with(fmt).with(otel).with(filter).try_init();
            logs
        })
        .clone()
}
