//! Latency percentiles and a printable summary.

use std::time::Duration;

pub struct Summary {
    pub label: String,
    pub requests: usize,
    pub errors: usize,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
}

impl Summary {
    pub fn from_latencies(
        label: impl Into<String>,
        mut latencies: Vec<Duration>,
        errors: usize,
        elapsed: Duration,
    ) -> Self {
        latencies.sort_unstable();
        let at = |q: f64| -> Duration {
            if latencies.is_empty() {
                return Duration::ZERO;
            }
            let index = ((latencies.len() as f64 - 1.0) * q).round() as usize;
            latencies[index.min(latencies.len() - 1)]
        };
        Self {
            label: label.into(),
            requests: latencies.len(),
            errors,
            elapsed,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: latencies.last().copied().unwrap_or_default(),
        }
    }

    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    pub fn header() -> String {
        format!(
            "{:<34} {:>8} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "benchmark", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        )
    }

    pub fn row(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "{:<34} {:>8} {:>7} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            self.label,
            self.requests,
            self.errors,
            self.per_second(),
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        )
    }
}
