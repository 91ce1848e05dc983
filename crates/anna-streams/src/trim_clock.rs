//! When a backend checks whether a stream needs trimming: trimming on every append would cost
//! a round trip (Redis) or a write (SQLite) per event, so checks are spaced per stream.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Trim checks per stream: after this many appends…
pub const TRIM_EVERY_APPENDS: u32 = 500;
/// …or when this much time has passed since the last check, whichever comes first.
pub const TRIM_INTERVAL: Duration = Duration::from_millis(250);
/// Stream names remembered before the map is reset (a reset only makes the next appends of
/// each stream check at once).
const MAX_TRACKED_STREAMS: usize = 10_000;

struct Clock {
    appends: u32,
    checked_at: Instant,
}

/// Per-stream trim clocks of one process.
#[derive(Default)]
pub(crate) struct TrimClocks(Mutex<HashMap<String, Clock>>);

impl TrimClocks {
    /// Whether `appended` more entries to `stream` call for a trim check now.
    pub(crate) fn due(&self, stream: &str, appended: usize) -> bool {
        let mut clocks = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if let Some(clock) = clocks.get_mut(stream) {
            clock.appends = clock.appends.saturating_add(u32::try_from(appended).unwrap_or(u32::MAX));
            if clock.appends < TRIM_EVERY_APPENDS && now.duration_since(clock.checked_at) < TRIM_INTERVAL {
                return false;
            }
            clock.appends = 0;
            clock.checked_at = now;
            return true;
        }
        if clocks.len() >= MAX_TRACKED_STREAMS {
            clocks.clear();
        }
        clocks.insert(stream.to_owned(), Clock { appends: 0, checked_at: now });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_append_checks_then_every_batch_of_appends() {
        let clocks = TrimClocks::default();
        assert!(clocks.due("s", 1));
        assert!(!clocks.due("s", 10));
        assert!(clocks.due("s", TRIM_EVERY_APPENDS as usize));
        assert!(clocks.due("other", 1), "per stream");
    }
}
