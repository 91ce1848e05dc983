//! The metric families each kind of process reports, registered at start with zero values: a
//! scrape shows the whole set before the first event, so dashboards and alert rules see 0
//! rather than nothing (a counter that first appears at 1 hides that first increase from
//! `rate()` and `increase()`).
//!
//! Families whose labels come from requests or event names (`http_*`, `events_*` per event) are
//! registered without labels; those with a fixed set of label values get each one.

use crate::app::Roles;

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Which processes report a family.
#[derive(Clone, Copy)]
enum Reporter {
    Api,
    Outbox,
    /// Every process that consumes a stream: events, sessions (their commands), webhooks.
    Consumer,
    Sessions,
    Webhooks,
}

use Kind::{Counter, Gauge, Histogram};
use Reporter::{Api, Consumer, Outbox, Sessions, Webhooks};

/// A label and every value it takes.
type FixedLabel = (&'static str, &'static [&'static str]);

/// Name, kind, reporter, and the label with its fixed values (if any).
const FAMILIES: &[(&str, Kind, Reporter, Option<FixedLabel>)] = &[
    ("http_connections_open", Gauge, Api, None),
    ("http_connections_refused_total", Counter, Api, None),
    ("auth_rate_limited_total", Counter, Api, None),
    ("auth_refresh_reuse_detected_total", Counter, Api, None),
    ("auth_user_cache_hits_total", Counter, Api, None),
    ("auth_user_cache_misses_total", Counter, Api, None),
    ("rate_limit_shared_failures_total", Counter, Api, None),
    ("session_commands_enqueued_total", Counter, Api, None),
    ("session_commands_refused_total", Counter, Api, None),
    ("session_sends_rate_limited_total", Counter, Api, None),
    ("ws_connections", Gauge, Api, None),
    ("ws_events_fanned_out_total", Counter, Api, None),
    ("ws_clients_dropped_total", Counter, Api, None),
    ("outbox_pending", Gauge, Outbox, None),
    ("outbox_processing", Gauge, Outbox, None),
    ("outbox_failed", Gauge, Outbox, None),
    ("outbox_oldest_unpublished_age_seconds", Gauge, Outbox, None),
    ("outbox_drain_rate_per_second", Gauge, Outbox, None),
    ("outbox_dispatch_total", Counter, Outbox, None),
    ("outbox_dispatch_failed_total", Counter, Outbox, None),
    ("outbox_dispatch_duration_ms", Histogram, Outbox, None),
    ("events_processed_total", Counter, Consumer, None),
    ("events_failed_total", Counter, Consumer, None),
    ("events_retried_total", Counter, Consumer, None),
    ("events_dead_lettered_total", Counter, Consumer, None),
    ("events_taken_over_total", Counter, Consumer, None),
    ("event_processing_duration_ms", Histogram, Consumer, None),
    ("event_end_to_end_latency_seconds", Histogram, Consumer, None),
    ("sessions_live", Gauge, Sessions, None),
    ("sessions_partitions_held", Gauge, Sessions, None),
    (
        "sessions",
        Gauge,
        Sessions,
        Some(("status", &["pending_qr", "connected", "disconnected", "logged_out", "failed"])),
    ),
    ("session_qr_codes_total", Counter, Sessions, None),
    ("session_connects_total", Counter, Sessions, None),
    ("session_disconnects_total", Counter, Sessions, None),
    ("session_closes_total", Counter, Sessions, None),
    ("session_reconnects_exhausted_total", Counter, Sessions, None),
    ("session_messages_total", Counter, Sessions, Some(("outcome", &["sent", "failed"]))),
    ("session_media_downloads_total", Counter, Sessions, Some(("outcome", &["stored", "failed"]))),
    ("session_message_changes_total", Counter, Sessions, Some(("outcome", &["done", "failed"]))),
    ("session_history_messages_total", Counter, Sessions, None),
    ("history_pending_changes_applied_total", Counter, Consumer, None),
    ("history_pending_changes_expired_total", Counter, Consumer, None),
    ("history_messages_purged_total", Counter, Consumer, None),
    ("media_objects_purged_total", Counter, Consumer, None),
    ("media_objects_purge_failures_total", Counter, Consumer, None),
    ("media_objects_swept_total", Counter, Consumer, None),
    ("session_event_batch_size", Histogram, Sessions, None),
    ("sessions_resumed_total", Counter, Sessions, None),
    ("sessions_partition_takeovers_total", Counter, Sessions, None),
    ("sessions_leases_lost_total", Counter, Sessions, None),
    ("sessions_lease_renewal_failures_total", Counter, Sessions, None),
    ("sessions_self_fenced_total", Counter, Sessions, None),
    ("sessions_failover_seconds", Histogram, Sessions, None),
    ("webhook_attempts_total", Counter, Webhooks, Some(("outcome", &["succeeded", "failed", "dead"]))),
    ("webhook_attempt_duration_seconds", Histogram, Webhooks, None),
    ("webhook_delivery_latency_seconds", Histogram, Webhooks, None),
    ("webhook_deliveries_dead_total", Counter, Webhooks, None),
    ("webhook_circuit_opened_total", Counter, Webhooks, None),
    ("webhook_deliveries", Gauge, Webhooks, Some(("status", &["pending", "delivering", "dead"]))),
    ("webhook_oldest_due_seconds", Gauge, Webhooks, None),
];

fn reports(roles: Roles, reporter: Reporter) -> bool {
    match reporter {
        Api => roles.api,
        Outbox => roles.outbox,
        Consumer => roles.events || roles.sessions || roles.webhooks,
        Sessions => roles.sessions,
        Webhooks => roles.webhooks,
    }
}

fn register(name: &'static str, kind: Kind, labels: &[(&'static str, &'static str)]) {
    let labels: Vec<metrics::Label> = labels.iter().map(|(k, v)| metrics::Label::new(*k, *v)).collect();
    match kind {
        Kind::Counter => metrics::counter!(name, labels).increment(0),
        // Registered, not set: a gauge another task already set keeps its value.
        Kind::Gauge => metrics::gauge!(name, labels).increment(0.0),
        Kind::Histogram => drop(metrics::histogram!(name, labels)),
    }
}

/// Registers the families of `roles` in the installed recorder.
pub fn register_for(roles: Roles) {
    for (name, kind, reporter, labels) in FAMILIES {
        if !reports(roles, *reporter) {
            continue;
        }
        match labels {
            None => register(name, *kind, &[]),
            Some((label, values)) => {
                for value in *values {
                    register(name, *kind, &[(label, value)]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The source of every crate of the workspace but this file.
    fn workspace_source() -> String {
        fn walk(dir: &std::path::Path, into: &mut String) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, into);
                } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("metric_families.rs") {
                    into.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
                }
            }
        }
        let mut source = String::new();
        let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for krate in std::fs::read_dir(&crates).into_iter().flatten().flatten() {
            walk(&krate.path().join("src"), &mut source);
        }
        source
    }

    /// Registering a family here does not make the code report it: each one must also be
    /// recorded somewhere, or the dashboard would show a zero forever.
    #[test]
    fn every_family_is_recorded_by_the_code() {
        let source = workspace_source();
        assert!(source.len() > 100_000, "the workspace source was not found");
        let unrecorded: Vec<&str> =
            FAMILIES.iter().map(|(name, ..)| *name).filter(|name| !source.contains(&format!("\"{name}\""))).collect();
        assert!(unrecorded.is_empty(), "registered but never recorded: {unrecorded:?}");
    }
}
