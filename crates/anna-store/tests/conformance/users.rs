//! Users: reads, inserts, updates, row locks and rollbacks.

use super::*;

conformance!(
    user_round_trips_every_field,
    user_without_optional_fields_round_trips,
    duplicate_email_is_a_conflict,
    duplicate_id_is_a_conflict,
    update_user_persists_every_column,
    units_of_work_on_one_user_take_turns,
    dropped_unit_of_work_leaves_no_trace,
);

async fn user_round_trips_every_field(store: Arc<dyn Store>) -> TestResult {
    let user = full_user("ann@example.com");
    let mut uow = store.begin().await?;
    uow.insert_user(&user).await?;
    // A unit of work sees its own writes before commit.
    assert_eq!(uow.find_user_by_id(user.id).await?, Some(user.clone()));
    uow.commit().await?;

    assert_eq!(store.find_user_by_id(user.id).await?, Some(user.clone()));
    assert_eq!(store.find_user_by_email("ann@example.com").await?, Some(user.clone()));
    let mut uow = store.begin().await?;
    assert_eq!(uow.find_user_by_id(user.id).await?, Some(user.clone()));
    assert_eq!(uow.find_user_by_email("ann@example.com").await?, Some(user.clone()));
    drop(uow);

    assert_eq!(store.find_user_by_id(Uuid::new_v4()).await?, None);
    assert_eq!(store.find_user_by_email("nobody@example.com").await?, None);
    // Lookups are exact: the caller normalises e-mails.
    assert_eq!(store.find_user_by_email("ANN@example.com").await?, None);
    let mut uow = store.begin().await?;
    assert_eq!(uow.find_user_by_id(Uuid::new_v4()).await?, None);
    assert_eq!(uow.find_user_by_email("nobody@example.com").await?, None);
    Ok(())
}

async fn user_without_optional_fields_round_trips(store: Arc<dyn Store>) -> TestResult {
    let mut users = vec![bare_user("bo@example.com")];
    for (i, status) in
        [UserStatus::PendingVerification, UserStatus::Invited, UserStatus::Suspended, UserStatus::Deleted]
            .into_iter()
            .enumerate()
    {
        users.push(User { status, ..bare_user(&format!("status{i}@example.com")) });
    }
    for user in &users {
        save_user(&store, user).await?;
    }
    for user in users {
        assert_eq!(store.find_user_by_email(&user.email).await?, Some(user.clone()));
    }
    Ok(())
}

async fn duplicate_email_is_a_conflict(store: Arc<dyn Store>) -> TestResult {
    let first = full_user("dup@example.com");
    save_user(&store, &first).await?;

    let mut uow = store.begin().await?;
    assert_conflict(uow.insert_user(&bare_user("dup@example.com")).await, "users_email");
    drop(uow);

    // Changing another user's e-mail into a taken one conflicts the same way.
    let mut second = bare_user("other@example.com");
    save_user(&store, &second).await?;
    second.email = "dup@example.com".into();
    let mut uow = store.begin().await?;
    assert_conflict(uow.update_user(&second).await, "users_email");
    drop(uow);

    assert_eq!(store.find_user_by_email("dup@example.com").await?, Some(first));
    Ok(())
}

async fn duplicate_id_is_a_conflict(store: Arc<dyn Store>) -> TestResult {
    let first = full_user("first@example.com");
    save_user(&store, &first).await?;

    let mut uow = store.begin().await?;
    let same_id = User { id: first.id, ..bare_user("second@example.com") };
    assert_conflict(uow.insert_user(&same_id).await, "users_id");
    drop(uow);

    // Never an overwrite.
    assert_eq!(store.find_user_by_id(first.id).await?, Some(first));
    assert_eq!(store.find_user_by_email("second@example.com").await?, None);
    Ok(())
}

async fn update_user_persists_every_column(store: Arc<dyn Store>) -> TestResult {
    let original = full_user("before@example.com");
    save_user(&store, &original).await?;
    let later = now() + Duration::minutes(7);

    // Every field changes, null ones become set and set ones become null.
    let changed = User {
        id: original.id,
        name: "Renamed".into(),
        email: "after@example.com".into(),
        status: UserStatus::Active,
        password_hash: "new-phc".into(),
        verification_token: None,
        verification_code: None,
        verification_token_expires_at: None,
        verification_attempts: 4,
        verified_at: None,
        password_reset_token: Some("other-pr-hash".into()),
        password_reset_token_expires_at: Some(later + Duration::hours(1)),
        password_reset_attempts: 3,
        created_at: later - Duration::days(100),
        updated_at: later,
        last_login_at: None,
        token_generation: 7,
    };
    let mut uow = store.begin().await?;
    assert_eq!(uow.find_user_by_id(original.id).await?, Some(original.clone()));
    uow.update_user(&changed).await?;
    uow.commit().await?;

    // created_at is the one column an update never touches.
    let expected = User { created_at: original.created_at, ..changed.clone() };
    assert_eq!(store.find_user_by_id(original.id).await?, Some(expected.clone()));
    assert_eq!(store.find_user_by_email("after@example.com").await?, Some(expected.clone()));
    assert_eq!(store.find_user_by_email("before@example.com").await?, None);

    // And back: set fields from null.
    let again = User {
        verification_token: Some("vt2".into()),
        verification_code: Some("vc2".into()),
        verification_token_expires_at: Some(later + Duration::hours(2)),
        verified_at: Some(later),
        password_reset_token: None,
        password_reset_token_expires_at: None,
        last_login_at: Some(later),
        ..expected
    };
    let mut uow = store.begin().await?;
    uow.update_user(&again).await?;
    uow.commit().await?;
    assert_eq!(store.find_user_by_id(original.id).await?, Some(again));
    Ok(())
}

/// Read-modify-write through the `find_*` of two concurrent units of work loses no update:
/// the second one waits for the first (Postgres: row lock; SQLite: BEGIN IMMEDIATE).
async fn units_of_work_on_one_user_take_turns(store: Arc<dyn Store>) -> TestResult {
    let user = bare_user("turns@example.com");
    save_user(&store, &user).await?;
    let barrier = Arc::new(Barrier::new(2));
    let mut tasks = Vec::new();
    for by_email in [false, true] {
        let (store, barrier, user) = (store.clone(), barrier.clone(), user.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut uow = store.begin().await?;
            let found = if by_email {
                uow.find_user_by_email(&user.email).await?
            } else {
                uow.find_user_by_id(user.id).await?
            };
            let Some(mut found) = found else { panic!("user {} vanished", user.id) };
            // Give the other unit of work every chance to read the same value.
            tokio::time::sleep(StdDuration::from_millis(150)).await;
            found.verification_attempts += 1;
            uow.update_user(&found).await?;
            uow.commit().await
        }));
    }
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("task: {e}"))?;
    }
    let Some(found) = store.find_user_by_id(user.id).await? else { panic!("user {} vanished", user.id) };
    assert_eq!(found.verification_attempts, 2);
    Ok(())
}

async fn dropped_unit_of_work_leaves_no_trace(store: Arc<dyn Store>) -> TestResult {
    let user = full_user("ghost@example.com");
    let aggregate = user.id.to_string();
    let mut uow = store.begin().await?;
    uow.insert_user(&user).await?;
    uow.append_events(&[event("user.registered", &aggregate, now())]).await?;
    uow.insert_refresh_token(&token("ghost-token", user.id, Uuid::new_v4(), now() + Duration::days(1))).await?;
    drop(uow);

    assert_eq!(store.find_user_by_id(user.id).await?, None);
    assert_eq!(store.find_user_by_email(&user.email).await?, None);
    assert_eq!(store.find_refresh_token("ghost-token").await?, None);
    assert!(store.outbox_events_for_aggregate(&aggregate).await?.is_empty());

    // The rolled-back unit of work holds no lock: the same writes go through afterwards.
    let mut uow = store.begin().await?;
    uow.insert_user(&user).await?;
    uow.append_events(&[event("user.registered", &aggregate, now())]).await?;
    uow.commit().await?;
    assert_eq!(store.find_user_by_id(user.id).await?, Some(user));
    assert_eq!(store.outbox_events_for_aggregate(&aggregate).await?.len(), 1);
    Ok(())
}
