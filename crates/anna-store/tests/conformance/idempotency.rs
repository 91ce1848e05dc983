//! Idempotency keys.

use super::*;

conformance!(idempotency_keys_claim_complete_release_purge,);

async fn idempotency_keys_claim_complete_release_purge(store: Arc<dyn Store>) -> TestResult {
    let t = now();
    let scope = "POST /users";
    assert_eq!(store.claim_idempotency_key(scope, "k1", "h1", t).await?, IdempotencyClaim::Claimed);
    assert_eq!(
        store.claim_idempotency_key(scope, "k1", "h1", t).await?,
        IdempotencyClaim::InProgress { request_hash: "h1".into() }
    );
    // Same key, other scope: independent.
    assert_eq!(store.claim_idempotency_key("POST /other", "k1", "h1", t).await?, IdempotencyClaim::Claimed);
    store.complete_idempotency_key(scope, "k1", 201, "{\"id\":\"x\"}").await?;
    assert_eq!(
        store.claim_idempotency_key(scope, "k1", "h2", t).await?,
        IdempotencyClaim::Done { request_hash: "h1".into(), status: 201, body: "{\"id\":\"x\"}".into() }
    );
    // A released claim can be taken again; a completed one is not released.
    assert_eq!(store.claim_idempotency_key(scope, "k2", "h", t).await?, IdempotencyClaim::Claimed);
    store.release_idempotency_key(scope, "k2").await?;
    assert_eq!(store.claim_idempotency_key(scope, "k2", "h", t).await?, IdempotencyClaim::Claimed);
    store.release_idempotency_key(scope, "k1").await?;
    assert!(matches!(store.claim_idempotency_key(scope, "k1", "h1", t).await?, IdempotencyClaim::Done { .. }));
    // Purge by age.
    assert_eq!(store.claim_idempotency_key(scope, "old", "h", t - Duration::days(2)).await?, IdempotencyClaim::Claimed);
    assert_eq!(store.purge_idempotency_keys(t - Duration::days(1)).await?, 1);
    assert_eq!(store.claim_idempotency_key(scope, "old", "h", t).await?, IdempotencyClaim::Claimed);
    Ok(())
}
