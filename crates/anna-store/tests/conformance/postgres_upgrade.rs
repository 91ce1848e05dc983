//! Upgrading, in place, a Postgres database created by the TypeScript predecessor.

use anna_store::SqlStore;
use sqlx::{Connection, PgConnection};

use super::*;

/// The predecessor's schema: its tracked migrations plus its untracked outbox.sql. Some
/// columns that now hold keyed hashes had narrower types there.
const PREDECESSOR_SCHEMA: &str = r#"
    CREATE TABLE schema_migrations (id text PRIMARY KEY, applied_at timestamptz DEFAULT now());
    INSERT INTO schema_migrations (id) VALUES
        ('0001__users.sql'), ('0002__refresh_tokens.sql'), ('0003__session_auth.sql'), ('0004__sessions.sql');

    CREATE TABLE users (
        id uuid PRIMARY KEY,
        name text NOT NULL,
        email text NOT NULL,
        status text NOT NULL,
        password_hash text NOT NULL,
        verification_token uuid,
        verification_code varchar(6),
        verification_token_expires_at timestamptz,
        verified_at timestamptz,
        password_reset_token uuid,
        password_reset_token_expires_at timestamptz,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        last_login_at timestamptz
    );
    CREATE UNIQUE INDEX users_email_idx ON users (email);
    CREATE INDEX users_status_idx ON users (status);

    CREATE TABLE refresh_tokens (
        token_hash text PRIMARY KEY,
        user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        created_at timestamptz NOT NULL DEFAULT now(),
        expires_at timestamptz NOT NULL,
        revoked_at timestamptz,
        replaced_by_token_hash text,
        user_agent text,
        ip text
    );
    CREATE INDEX refresh_tokens_user_id_idx ON refresh_tokens (user_id);
    CREATE INDEX refresh_tokens_expires_at_idx ON refresh_tokens (expires_at);
    CREATE INDEX refresh_tokens_revoked_at_idx ON refresh_tokens (revoked_at);

    CREATE TABLE session_auth_creds (
        session_id text PRIMARY KEY, tenant_id text, creds jsonb,
        created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now()
    );
    CREATE TABLE session_auth_keys (
        session_id text, tenant_id text, key_type text, key_id text, value jsonb,
        created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now(),
        PRIMARY KEY (session_id, key_type, key_id)
    );
    CREATE TABLE sessions (
        id uuid PRIMARY KEY, tenant_id uuid NOT NULL, status text NOT NULL, phone text, qr text,
        qr_expires_at timestamptz, connected_at timestamptz, disconnected_at timestamptz,
        disconnected_reason text, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL
    );

    CREATE TABLE IF NOT EXISTS outbox_events (
        id uuid PRIMARY KEY,
        event_id text NOT NULL,
        aggregate_id text NOT NULL,
        event_name text NOT NULL,
        occurred_on timestamptz NOT NULL,
        payload jsonb NOT NULL,
        status text NOT NULL DEFAULT 'pending',
        attempts int NOT NULL DEFAULT 0,
        last_error text,
        published_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS outbox_events_status_occurred_on_idx ON outbox_events (status, occurred_on);
    CREATE TABLE IF NOT EXISTS dead_letters (
        id uuid PRIMARY KEY, event_id text, aggregate_id text, event_name text, occurred_on timestamptz,
        payload jsonb, error text, attempts int, created_at timestamptz NOT NULL DEFAULT now()
    );

    INSERT INTO users (id, name, email, status, password_hash, verification_token, verification_code,
                       verification_token_expires_at, created_at, updated_at)
    VALUES ('6f1c1d52-3c0e-4c1a-9d7e-0d7f5c7e2a11', 'Legacy', 'legacy@example.com', 'pending_verification',
            '$argon2id$v=19$m=65536,t=2,p=1$c2FsdA$aGFzaA', '3d0c7a7e-2a34-4b7e-a0d6-5b1f3c2d1e0f', '123456',
            '2030-01-01T00:00:00.000Z', '2025-12-01T10:00:00.123Z', '2025-12-01T10:00:00.123Z');
    INSERT INTO refresh_tokens (token_hash, user_id, created_at, expires_at) VALUES
        ('legacy-token-1', '6f1c1d52-3c0e-4c1a-9d7e-0d7f5c7e2a11', '2025-12-01T10:00:00Z', '2030-01-01T00:00:00Z'),
        ('legacy-token-2', '6f1c1d52-3c0e-4c1a-9d7e-0d7f5c7e2a11', '2025-12-01T10:00:00Z', '2030-01-01T00:00:00Z');
    INSERT INTO outbox_events (id, event_id, aggregate_id, event_name, occurred_on, payload, status,
                               attempts, published_at, created_at, updated_at)
    VALUES
        ('0b7e5f3a-1d2c-4e5f-8a9b-0c1d2e3f4a5b', 'a8f0e8f2-7a52-4b5e-9d6c-1f2e3d4c5b6a',
         '6f1c1d52-3c0e-4c1a-9d7e-0d7f5c7e2a11', 'user.registered', '2025-12-01T10:00:00.123Z',
         '{"name": "Legacy", "email": "legacy@example.com"}', 'published', 1, '2025-12-01T10:00:01Z',
         '2025-12-01T10:00:00.200Z', '2025-12-01T10:00:01Z'),
        ('1c8f6a4b-2e3d-4f60-9bac-1d2e3f4a5b6c', 'b9a1f9a3-8b63-4c6f-8e7d-2a3b4c5d6e7f',
         '6f1c1d52-3c0e-4c1a-9d7e-0d7f5c7e2a11', 'user.verification.token_issued', '2025-12-01T10:00:00.123Z',
         '{"reason": "register"}', 'pending', 0, NULL,
         '2025-12-01T10:00:00.300Z', '2025-12-01T10:00:00.300Z'),
        -- An event id that is not a UUID: unreadable for anna.
        ('2d9a7b5c-3f4e-4a71-8cbd-2e3f4a5b6c7d', 'legacy-17', 'other-aggregate', 'user.registered',
         '2025-12-01T09:00:00Z', '{}', 'pending', 0, NULL, '2025-12-01T09:00:00Z', '2025-12-01T09:00:00Z');
    -- The predecessor allowed NULL everywhere in dead_letters.
    INSERT INTO dead_letters (id, created_at) VALUES ('3e0b8c6d-4a5f-4b82-9dce-3f4a5b6c7d8e', '2025-12-01T11:00:00Z');
    -- Typed with capitals and spaces; the second collides with the first once normalised.
    INSERT INTO users (id, name, email, status, password_hash, created_at, updated_at) VALUES
        ('7a2d2e63-4d1f-4d2b-8e8f-1e8a6d8f3b22', 'Mixed', ' Mixed@Example.COM', 'active',
         '$argon2id$v=19$m=65536,t=2,p=1$c2FsdA$aGFzaA', '2025-12-01T10:00:00Z', '2025-12-01T10:00:00Z'),
        ('8b3e3f74-5e20-4e3c-9f90-2f9b7e904c33', 'Twin', 'mixed@EXAMPLE.com', 'pending_verification',
         '$argon2id$v=19$m=65536,t=2,p=1$c2FsdA$aGFzaA', '2025-12-02T10:00:00Z', '2025-12-02T10:00:00Z');
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_a_predecessor_database_in_place() {
    let url = anna_testkit::pg::fresh_database_url().await;
    let mut conn = PgConnection::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
    sqlx::raw_sql(PREDECESSOR_SCHEMA).execute(&mut conn).await.unwrap_or_else(|e| panic!("predecessor schema: {e}"));
    let _ = conn.close().await;

    let store: Arc<dyn Store> =
        Arc::new(SqlStore::connect(&url, &test_options()).await.unwrap_or_else(|e| panic!("{e}")));
    store.migrate().await.unwrap_or_else(|e| panic!("first migrate: {e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("second migrate: {e}"));
    run(store, check_upgraded).await;
}

async fn check_upgraded(store: Arc<dyn Store>) -> TestResult {
    let legacy_id = Uuid::parse_str("6f1c1d52-3c0e-4c1a-9d7e-0d7f5c7e2a11").unwrap_or_else(|e| panic!("{e}"));
    let Some(mut legacy) = store.find_user_by_id(legacy_id).await? else { panic!("the legacy user is gone") };
    assert_eq!(legacy.email, "legacy@example.com");
    assert_eq!(legacy.verification_code.as_deref(), Some("123456"));
    assert_eq!((legacy.verification_attempts, legacy.password_reset_attempts), (0, 0));

    // E-mails are normalised; of two that collide, the active account keeps the address.
    let mixed = store.find_user_by_email("mixed@example.com").await?.map(|u| u.name);
    assert_eq!(mixed.as_deref(), Some("Mixed"));
    let twin_id = Uuid::parse_str("8b3e3f74-5e20-4e3c-9f90-2f9b7e904c33").unwrap_or_else(|e| panic!("{e}"));
    let twin = store.find_user_by_id(twin_id).await?.map(|u| u.email);
    assert_eq!(twin.as_deref(), Some("mixed@EXAMPLE.com"), "a collision is left for an operator");

    // Every old token got a family of its own.
    let (Some(one), Some(two)) =
        (store.find_refresh_token("legacy-token-1").await?, store.find_refresh_token("legacy-token-2").await?)
    else {
        panic!("the legacy tokens are gone")
    };
    assert!(!one.family_id.is_nil() && !two.family_id.is_nil());
    assert_ne!(one.family_id, two.family_id);

    let records = store.outbox_events_for_aggregate(&legacy_id.to_string()).await?;
    let names: Vec<&str> = records.iter().map(|r| r.event.event_name.as_str()).collect();
    assert_eq!(names, ["user.registered", "user.verification.token_issued"]);
    assert_eq!(records[0].status, "published");
    assert_eq!((records[0].event.tenant_id.as_ref(), records[0].event.traceparent.as_ref()), (None, None));

    // The new code writes keyed hashes where the old columns were narrower, rotates old
    // tokens, and appends after the old events.
    legacy.verification_code = Some("a-keyed-hash-much-longer-than-six-characters".into());
    legacy.password_reset_token = Some("another-keyed-hash".into());
    let replacement = token("legacy-token-1b", legacy_id, one.family_id, now() + Duration::days(30));
    let new_event = event("user.verified", &legacy_id.to_string(), now());
    let mut uow = store.begin().await?;
    uow.update_user(&legacy).await?;
    assert!(uow.rotate_refresh_token("legacy-token-1", &replacement, now()).await?);
    uow.append_events(std::slice::from_ref(&new_event)).await?;
    assert_conflict(uow.insert_user(&bare_user("legacy@example.com")).await, "users_email");
    drop(uow);

    let mut uow = store.begin().await?;
    uow.update_user(&legacy).await?;
    assert!(uow.rotate_refresh_token("legacy-token-1", &replacement, now()).await?);
    uow.append_events(std::slice::from_ref(&new_event)).await?;
    uow.insert_user(&full_user("new@example.com")).await?;
    uow.commit().await?;
    assert_eq!(store.find_user_by_id(legacy_id).await?, Some(legacy));
    let records = store.outbox_events_for_aggregate(&legacy_id.to_string()).await?;
    assert_eq!(records.last().map(|r| &r.event), Some(&new_event));

    // The predecessor's pending row became ready (available_at = its created_at) and goes
    // out before the new one; its published row is never claimed.
    // A dead letter of NULLs is still listed (and can be purged).
    let letters = store.list_dead_letters(10).await?;
    assert_eq!(letters.len(), 1);
    assert!(letters[0].event.event_id.is_nil() && letters[0].event.event_name.is_empty());

    // The unreadable row fails on its own instead of holding back the batch.
    let claimed = store.claim_outbox_batch(10, StdDuration::from_secs(30), now() + Duration::seconds(1)).await?;
    assert_eq!(super::names(&claimed), ["user.verification.token_issued", "user.verified"]);
    assert_eq!(store.outbox_status().await?.failed, 1);
    Ok(())
}
