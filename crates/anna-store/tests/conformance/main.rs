//! The conformance suite of the store: every test body runs against both backends, each on a
//! fresh migrated database (`mod sqlite` and `mod postgres` in each concern's module, generated
//! by `conformance!`). A backend is correct when it passes all of them; behaviour that only one
//! backend has does not exist. One module per concern, as in the store itself.
//!
//! Timestamps in the test data are truncated to milliseconds, the precision SQLite keeps.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use anna_domain::{DomainEvent, RefreshToken, User, UserStatus};
use anna_store::prelude::*;
use anna_store::{Backend, ConnectOptions, DeadLetter, IdempotencyClaim, OutboxRecord, OutboxStatus, StoreError};
use serde_json::json;
use time::{Duration, OffsetDateTime};
use tokio::sync::Barrier;
use uuid::Uuid;

type TestResult = Result<(), StoreError>;

fn test_options() -> ConnectOptions {
    // Small pools: many tests run at once against one Postgres server.
    ConnectOptions { max_connections: 4, acquire_timeout: StdDuration::from_secs(30), ..ConnectOptions::default() }
}

async fn sqlite_store() -> Arc<dyn Store> {
    let url = anna_testkit::sqlite::fresh_database_url();
    // The folder does not exist yet: connecting must create it.
    let store = anna_store::connect(&url, &test_options()).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(store.backend(), Backend::Sqlite);
    store.migrate().await.unwrap_or_else(|e| panic!("migrate {url}: {e}"));
    store
}

async fn postgres_store() -> Arc<dyn Store> {
    let url = anna_testkit::pg::fresh_database_url().await;
    let store = anna_store::connect(&url, &test_options()).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(store.backend(), Backend::Postgres);
    store.migrate().await.unwrap_or_else(|e| panic!("migrate {url}: {e}"));
    store
}

/// Runs one test body on a store and closes the store, whatever the outcome.
async fn run(store: Arc<dyn Store>, body: impl AsyncFnOnce(Arc<dyn Store>) -> TestResult) {
    let result = body(store.clone()).await;
    store.close().await;
    if let Err(e) = result {
        panic!("{e} ({e:?})");
    }
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    crate::run(crate::sqlite_store().await, super::$test).await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    crate::run(crate::postgres_store().await, super::$test).await;
                }
            )*
        }
    };
}

mod aliases;
mod fleet;
mod idempotency;
mod media;
mod messages;
mod outbox;
mod postgres_relays;
mod postgres_upgrade;
mod refresh_tokens;
mod schema;
mod sessions;
mod store;
mod subscribers;
mod users;
mod webhooks;

// ---------------------------------------------------------------------------------------------
// Test data and helpers shared by the modules

fn truncate_ms(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_nanosecond(at.nanosecond() / 1_000_000 * 1_000_000).unwrap_or_else(|e| panic!("truncating {at}: {e}"))
}

fn now() -> OffsetDateTime {
    truncate_ms(OffsetDateTime::now_utc())
}

/// A user with every optional field set, each timestamp different.
fn full_user(email: &str) -> User {
    let t = now();
    User {
        id: Uuid::new_v4(),
        name: "Ann Example".into(),
        email: email.into(),
        status: UserStatus::PendingVerification,
        password_hash: "$argon2id$v=19$m=65536,t=2,p=1$c2FsdA$aGFzaA".into(),
        verification_token: Some("vt-hash".into()),
        verification_code: Some("vc-hash".into()),
        verification_token_expires_at: Some(t + Duration::hours(1)),
        verification_attempts: 2,
        verified_at: Some(t - Duration::minutes(3)),
        password_reset_token: Some("pr-hash".into()),
        password_reset_token_expires_at: Some(t + Duration::minutes(30)),
        password_reset_attempts: 1,
        created_at: t - Duration::days(2),
        updated_at: t - Duration::seconds(5),
        last_login_at: Some(t - Duration::milliseconds(1234)),
        token_generation: 2,
    }
}

fn bare_user(email: &str) -> User {
    let t = now();
    User {
        id: Uuid::new_v4(),
        name: "Bo".into(),
        email: email.into(),
        status: UserStatus::Active,
        password_hash: "phc".into(),
        verification_token: None,
        verification_code: None,
        verification_token_expires_at: None,
        verification_attempts: 0,
        verified_at: None,
        password_reset_token: None,
        password_reset_token_expires_at: None,
        password_reset_attempts: 0,
        created_at: t,
        updated_at: t,
        last_login_at: None,
        token_generation: 0,
    }
}

fn token(hash: &str, user_id: Uuid, family_id: Uuid, expires_at: OffsetDateTime) -> RefreshToken {
    RefreshToken {
        token_hash: hash.into(),
        user_id,
        family_id,
        created_at: now() - Duration::minutes(1),
        expires_at,
        revoked_at: None,
        replaced_by_token_hash: None,
        user_agent: Some("Mozilla/5.0 (conformance)".into()),
        ip: Some("203.0.113.7".into()),
    }
}

fn event(name: &str, aggregate_id: &str, occurred_on: OffsetDateTime) -> DomainEvent {
    DomainEvent::new(name, aggregate_id, occurred_on, json!({ "name": name }))
}

async fn save_user(store: &Arc<dyn Store>, user: &User) -> TestResult {
    let mut uow = store.begin().await?;
    uow.insert_user(user).await?;
    uow.commit().await
}

async fn save_tokens(store: &Arc<dyn Store>, tokens: &[RefreshToken]) -> TestResult {
    let mut uow = store.begin().await?;
    for token in tokens {
        uow.insert_refresh_token(token).await?;
    }
    uow.commit().await
}

/// A saved user with one usable refresh token.
async fn user_with_token(store: &Arc<dyn Store>, hash: &str) -> Result<(User, RefreshToken), StoreError> {
    let user = bare_user("tokens@example.com");
    save_user(store, &user).await?;
    let token = token(hash, user.id, Uuid::new_v4(), now() + Duration::days(30));
    save_tokens(store, std::slice::from_ref(&token)).await?;
    Ok((user, token))
}

fn assert_conflict<T: std::fmt::Debug>(result: Result<T, StoreError>, rule: &str) {
    match result {
        Err(StoreError::Conflict(got)) if got == rule => {}
        other => panic!("expected Conflict({rule:?}), got {other:?}"),
    }
}

const LEASE: StdDuration = StdDuration::from_secs(30);

/// The relay's clock when it claims: a second after the appends, because Postgres dates rows
/// to the microsecond while the test clock is cut to milliseconds.
fn relay_now() -> OffsetDateTime {
    now() + Duration::seconds(1)
}

/// Past the lease of a claim made at `at`.
fn after_lease(at: OffsetDateTime) -> OffsetDateTime {
    at + Duration::seconds(31)
}

async fn append(store: &Arc<dyn Store>, events: &[DomainEvent]) -> TestResult {
    let mut uow = store.begin().await?;
    uow.append_events(events).await?;
    uow.commit().await
}

fn names(records: &[OutboxRecord]) -> Vec<&str> {
    records.iter().map(|r| r.event.event_name.as_str()).collect()
}

fn ids(records: &[OutboxRecord]) -> Vec<Uuid> {
    records.iter().map(|r| r.id).collect()
}

/// The stored row of the (only) event called `name` in `aggregate`.
async fn stored(store: &Arc<dyn Store>, aggregate: &str, name: &str) -> Result<OutboxRecord, StoreError> {
    let records = store.outbox_events_for_aggregate(aggregate).await?;
    let found = records.into_iter().find(|r| r.event.event_name == name);
    Ok(found.unwrap_or_else(|| panic!("no {name} in {aggregate}")))
}

async fn claimable_ids(store: &Arc<dyn Store>, at: OffsetDateTime) -> Result<Vec<Uuid>, StoreError> {
    Ok(ids(&store.claim_outbox_batch(100, LEASE, at).await?))
}

/// A1 and A2 of aggregate A, then B1 of aggregate B, in three units of work.
async fn two_aggregates(store: &Arc<dyn Store>) -> Result<(String, String), StoreError> {
    let (a, b) = (format!("A-{}", Uuid::new_v4()), format!("B-{}", Uuid::new_v4()));
    append(store, &[event("A1", &a, now())]).await?;
    append(store, &[event("A2", &a, now())]).await?;
    append(store, &[event("B1", &b, now())]).await?;
    Ok((a, b))
}
