//! Captures what tracing writes, so tests can assert that no secret reaches the logs.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

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
            let _ = tracing_subscriber::fmt()
                .json()
                .with_env_filter(tracing_subscriber::EnvFilter::new("debug,sqlx=warn,hyper=warn,h2=warn,reqwest=warn"))
                .with_writer(move || CaptureWriter(writer_logs.clone()))
                .try_init();
            logs
        })
        .clone()
}
