//! Schema and connection.

use super::*;

conformance!(migrate_is_idempotent, ping_answers,);

async fn migrate_is_idempotent(store: Arc<dyn Store>) -> TestResult {
    // Already migrated once by the harness.
    store.migrate().await?;
    store.migrate().await?;
    let user = bare_user("after-migrations@example.com");
    save_user(&store, &user).await?;
    store.migrate().await?;
    assert_eq!(store.find_user_by_id(user.id).await?, Some(user));
    Ok(())
}

async fn ping_answers(store: Arc<dyn Store>) -> TestResult {
    store.ping().await?;
    store.ping().await
}
