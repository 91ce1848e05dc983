//! The schema contract: table, column and index names are shared with the TypeScript
//! predecessor and between the backends.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{Connection, PgConnection, Row, SqliteConnection};

use super::*;

type Tables = BTreeMap<String, BTreeSet<String>>;

const CONTRACT: &[(&str, &[&str])] = &[
    (
        "users",
        &[
            "id",
            "name",
            "email",
            "status",
            "password_hash",
            "verification_token",
            "verification_code",
            "verification_token_expires_at",
            "verification_attempts",
            "verified_at",
            "password_reset_token",
            "password_reset_token_expires_at",
            "password_reset_attempts",
            "created_at",
            "updated_at",
            "last_login_at",
            "token_generation",
        ],
    ),
    (
        "refresh_tokens",
        &[
            "token_hash",
            "user_id",
            "family_id",
            "created_at",
            "expires_at",
            "revoked_at",
            "replaced_by_token_hash",
            "user_agent",
            "ip",
        ],
    ),
    ("session_auth_creds", &["session_id", "tenant_id", "creds", "created_at", "updated_at"]),
    (
        "session_messages",
        &[
            "id",
            "tenant_id",
            "session_id",
            "chat_jid",
            "message_id",
            "from_me",
            "sender_jid",
            "timestamp",
            "type",
            "text",
            "raw",
            "status",
            "status_at",
            "is_edited",
            "edited_at",
            "is_deleted",
            "deleted_at",
            "created_at",
            "updated_at",
            "reply_to_message_id",
            "reply_to_participant",
            "mentions",
            "forwarding_score",
        ],
    ),
    (
        "session_chats",
        &[
            "id",
            "tenant_id",
            "session_id",
            "chat_jid",
            "chat_name",
            "last_message_id",
            "last_message_ts",
            "last_message_text",
            "last_message_type",
            "unread_count",
            "created_at",
            "updated_at",
        ],
    ),
    (
        "session_message_reactions",
        &[
            "id",
            "tenant_id",
            "session_id",
            "chat_jid",
            "message_id",
            "actor_jid",
            "from_me",
            "emoji",
            "reacted_at",
            "is_removed",
            "created_at",
            "updated_at",
        ],
    ),
    ("tenant_settings", &["tenant_id", "message_retention_days", "created_at", "updated_at"]),
    (
        "session_message_pending",
        &["session_id", "message_id", "kind", "value", "at", "created_at", "chat_jid", "actor_jid", "from_me"],
    ),
    (
        "session_chat_aliases",
        &["id", "tenant_id", "session_id", "chat_key", "alias", "alias_type", "created_at", "updated_at"],
    ),
    (
        "media_objects",
        &[
            "id",
            "tenant_id",
            "session_id",
            "object_key",
            "kind",
            "mime",
            "size",
            "file_name",
            "sha256",
            "source",
            "created_at",
        ],
    ),
    (
        "session_message_media",
        &[
            "id",
            "tenant_id",
            "session_id",
            "chat_jid",
            "message_id",
            "kind",
            "mime",
            "size",
            "file_name",
            "url",
            "sha256",
            "width",
            "height",
            "duration",
            "created_at",
            "updated_at",
            "media_id",
        ],
    ),
    (
        "session_contacts",
        &[
            "id",
            "tenant_id",
            "session_id",
            "contact_jid",
            "contact_lid",
            "phone_number",
            "name",
            "notify",
            "verified_name",
            "img_url",
            "status",
            "created_at",
            "updated_at",
        ],
    ),
    ("session_auth_keys", &["session_id", "tenant_id", "key_type", "key_id", "value", "created_at", "updated_at"]),
    (
        "session_partition_leases",
        &["partition", "worker_id", "token", "acquired_at_ms", "renewed_at_ms", "expires_at_ms"],
    ),
    (
        "session_workers",
        &["worker_id", "host", "pid", "partitions", "started_at_ms", "heartbeat_at_ms", "expires_at_ms"],
    ),
    (
        "sessions",
        &[
            "id",
            "tenant_id",
            "status",
            "phone",
            "qr",
            "qr_expires_at",
            "connected_at",
            "disconnected_at",
            "disconnected_reason",
            "created_at",
            "updated_at",
        ],
    ),
    (
        "outbox_events",
        &[
            "id",
            "event_id",
            "aggregate_id",
            "event_name",
            "occurred_on",
            "payload",
            "status",
            "attempts",
            "last_error",
            "published_at",
            "created_at",
            "updated_at",
            "tenant_id",
            "traceparent",
            "available_at",
            "locked_until",
        ],
    ),
    (
        "dead_letters",
        &[
            "id",
            "event_id",
            "aggregate_id",
            "event_name",
            "occurred_on",
            "payload",
            "error",
            "attempts",
            "created_at",
            "tenant_id",
            "traceparent",
        ],
    ),
    ("applied_events", &["subscriber", "event_id", "applied_at"]),
    ("event_attempts", &["subscriber", "event_id", "attempts", "last_error", "updated_at"]),
    ("event_stats", &["event_name", "count", "last_occurred_on"]),
    ("idempotency_keys", &["scope", "key", "request_hash", "response_status", "response_body", "created_at"]),
    (
        "webhook_endpoints",
        &[
            "id",
            "tenant_id",
            "url",
            "description",
            "event_filter",
            "enabled",
            "ordered",
            "secret_sealed",
            "previous_secret_sealed",
            "previous_secret_expires_at",
            "circuit_failures",
            "circuit_openings",
            "circuit_open_until",
            "created_at",
            "updated_at",
        ],
    ),
    (
        "webhook_deliveries",
        &[
            "id",
            "endpoint_id",
            "tenant_id",
            "event_id",
            "event_name",
            "ordering_key",
            "position",
            "ordered",
            "body",
            "status",
            "attempts",
            "round_attempts",
            "next_attempt_at",
            "deadline_at",
            "occurred_at",
            "created_at",
            "completed_at",
            "last_status_code",
            "last_latency_ms",
            "last_error",
            "last_response_body",
        ],
    ),
    (
        "webhook_delivery_attempts",
        &["delivery_id", "attempt", "attempted_at", "status_code", "latency_ms", "error", "response_body"],
    ),
];

fn contract() -> Tables {
    CONTRACT
        .iter()
        .map(|(table, columns)| (table.to_string(), columns.iter().map(|c| c.to_string()).collect()))
        .collect()
}

fn collect(pairs: Vec<(String, String)>) -> Tables {
    let mut tables = Tables::new();
    for (table, column) in pairs {
        tables.entry(table).or_default().insert(column);
    }
    tables
}

const SHARED_INDEXES: &[&str] = &[
    "users_email_idx",
    "users_status_idx",
    "refresh_tokens_user_id_idx",
    "refresh_tokens_family_id_idx",
    "refresh_tokens_expires_at_idx",
    "refresh_tokens_revoked_at_idx",
    "session_auth_creds_tenant_id_idx",
    "session_auth_keys_session_id_idx",
    "session_auth_keys_tenant_id_idx",
    "sessions_tenant_id_idx",
    "sessions_status_idx",
    "session_messages_tenant_id_idx",
    "session_messages_message_idx",
    "session_messages_chat_idx",
    "session_chats_tenant_id_idx",
    "session_chats_chat_idx",
    "session_message_reactions_actor_idx",
    "session_message_reactions_tenant_id_idx",
    "session_contacts_contact_idx",
    "session_message_pending_created_idx",
    "session_messages_session_time_idx",
    "session_contacts_tenant_id_idx",
    "session_chat_aliases_alias_idx",
    "session_chat_aliases_key_idx",
    "media_objects_object_key_idx",
    "media_objects_tenant_id_idx",
    "media_objects_session_time_idx",
    "session_message_media_message_idx",
    "session_message_media_tenant_id_idx",
    "session_message_media_media_id_idx",
    "outbox_events_status_occurred_on_idx",
    "outbox_events_aggregate_id_idx",
    "outbox_events_claim_idx",
    "outbox_events_published_at_idx",
    "outbox_events_unpublished_aggregate_idx",
    "dead_letters_event_id_idx",
    "applied_events_applied_at_idx",
    "idempotency_keys_created_at_idx",
    "webhook_endpoints_tenant_idx",
    "webhook_deliveries_completed_idx",
    "webhook_deliveries_due_idx",
    "webhook_deliveries_event_idx",
    "webhook_deliveries_log_idx",
    "webhook_deliveries_order_idx",
];

#[tokio::test]
async fn sqlite_tables_match_the_contract() {
    let url = anna_testkit::sqlite::fresh_database_url();
    let store = anna_store::connect(&url, &test_options()).await.unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    store.close().await;

    let mut conn = SqliteConnection::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
    // Only the shared tables: SQLite also holds the embedded streams (migration 0006), which
    // exist on no other backend and are not part of this contract.
    let contract = contract();
    let rows = sqlx::query(
        "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p \
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite%' AND m.name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let pairs = rows
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
        .filter(|(table, _)| contract.contains_key(table))
        .collect();
    assert_eq!(collect(pairs), contract);

    let rows = sqlx::query(
        "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_autoindex%'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let indexes: BTreeSet<String> =
        rows.iter().filter(|r| contract.contains_key(&r.get::<String, _>(1))).map(|r| r.get::<String, _>(0)).collect();
    assert_eq!(indexes, SHARED_INDEXES.iter().map(|i| i.to_string()).collect());
}

#[tokio::test]
async fn postgres_tables_match_the_contract() {
    let url = anna_testkit::pg::fresh_database_url().await;
    let store = anna_store::connect(&url, &test_options()).await.unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    store.close().await;

    let mut conn = PgConnection::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
    let rows = sqlx::query(
        "SELECT table_name::text, column_name::text FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let pairs = rows.iter().map(|r| (r.get::<String, _>(0), r.get::<String, _>(1))).collect();
    let mut expected = contract();
    // The tie-breaker for outbox order; SQLite uses its rowid instead.
    if let Some(outbox) = expected.get_mut("outbox_events") {
        outbox.insert("seq".into());
    }
    assert_eq!(collect(pairs), expected);

    let indexes: BTreeSet<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public' AND indexname NOT LIKE '%_pkey'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .into_iter()
    .collect();
    assert_eq!(indexes, SHARED_INDEXES.iter().map(|i| i.to_string()).collect());
    let _ = conn.close().await;
}
