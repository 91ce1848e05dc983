//! Refresh-token families: issuing, rotation, revocation, purge.

use super::*;

conformance!(
    refresh_token_round_trips,
    duplicate_refresh_token_is_a_conflict,
    rotation_succeeds_once,
    concurrent_rotations_have_one_winner,
    revoke_keeps_replaced_by,
    revoke_family_counts_only_unrevoked,
    revoke_user_counts_only_unrevoked,
    purge_deletes_only_expired_tokens,
);

async fn refresh_token_round_trips(store: Arc<dyn Store>) -> TestResult {
    let user = bare_user("rt@example.com");
    save_user(&store, &user).await?;
    let full = RefreshToken {
        revoked_at: Some(now() - Duration::seconds(3)),
        replaced_by_token_hash: Some("next-hash".into()),
        ..token("full-hash", user.id, Uuid::new_v4(), now() + Duration::days(30))
    };
    let bare = RefreshToken {
        user_agent: None,
        ip: None,
        ..token("bare-hash", user.id, Uuid::new_v4(), now() + Duration::days(30))
    };

    let mut uow = store.begin().await?;
    uow.insert_refresh_token(&full).await?;
    uow.insert_refresh_token(&bare).await?;
    assert_eq!(uow.find_refresh_token("full-hash").await?, Some(full.clone()));
    uow.commit().await?;

    assert_eq!(store.find_refresh_token("full-hash").await?, Some(full.clone()));
    assert_eq!(store.find_refresh_token("bare-hash").await?, Some(bare.clone()));
    assert_eq!(store.find_refresh_token("missing").await?, None);
    let mut uow = store.begin().await?;
    assert_eq!(uow.find_refresh_token("full-hash").await?, Some(full));
    assert_eq!(uow.find_refresh_token("bare-hash").await?, Some(bare));
    assert_eq!(uow.find_refresh_token("missing").await?, None);
    Ok(())
}

async fn duplicate_refresh_token_is_a_conflict(store: Arc<dyn Store>) -> TestResult {
    let (user, original) = user_with_token(&store, "same-hash").await?;
    let mut uow = store.begin().await?;
    let again = token("same-hash", user.id, Uuid::new_v4(), now() + Duration::days(1));
    assert_conflict(uow.insert_refresh_token(&again).await, "refresh_tokens_token_hash");
    drop(uow);

    // A rotation into an existing hash conflicts too, and rolls back with its unit of work.
    let other = token("other-hash", user.id, original.family_id, now() + Duration::days(1));
    save_tokens(&store, std::slice::from_ref(&other)).await?;
    let mut uow = store.begin().await?;
    assert_conflict(uow.rotate_refresh_token("other-hash", &again, now()).await, "refresh_tokens_token_hash");
    drop(uow);

    assert_eq!(store.find_refresh_token("same-hash").await?, Some(original));
    assert_eq!(store.find_refresh_token("other-hash").await?, Some(other));
    Ok(())
}

async fn rotation_succeeds_once(store: Arc<dyn Store>) -> TestResult {
    let (user, old) = user_with_token(&store, "old").await?;
    let at = now();
    let new = token("new", user.id, old.family_id, at + Duration::days(30));

    let mut uow = store.begin().await?;
    assert!(uow.rotate_refresh_token("old", &new, at).await?);
    uow.commit().await?;

    let rotated = RefreshToken { revoked_at: Some(at), replaced_by_token_hash: Some("new".into()), ..old.clone() };
    assert_eq!(store.find_refresh_token("old").await?, Some(rotated.clone()));
    assert_eq!(store.find_refresh_token("new").await?, Some(new.clone()));

    // The same old token again: refused, nothing inserted, nothing changed.
    let second = token("second", user.id, old.family_id, at + Duration::days(30));
    let mut uow = store.begin().await?;
    assert!(!uow.rotate_refresh_token("old", &second, at + Duration::seconds(1)).await?);
    uow.commit().await?;
    assert_eq!(store.find_refresh_token("second").await?, None);
    assert_eq!(store.find_refresh_token("old").await?, Some(rotated));

    // An unknown token is refused the same way.
    let mut uow = store.begin().await?;
    assert!(!uow.rotate_refresh_token("unknown", &second, at).await?);
    uow.commit().await?;
    assert_eq!(store.find_refresh_token("second").await?, None);

    // The replacement rotates in turn.
    let third = token("third", user.id, old.family_id, at + Duration::days(30));
    let mut uow = store.begin().await?;
    assert!(uow.rotate_refresh_token("new", &third, at).await?);
    uow.commit().await?;
    assert_eq!(store.find_refresh_token("third").await?, Some(third));
    Ok(())
}

async fn concurrent_rotations_have_one_winner(store: Arc<dyn Store>) -> TestResult {
    let (user, old) = user_with_token(&store, "contested").await?;
    let barrier = Arc::new(Barrier::new(2));
    let mut tasks = Vec::new();
    for name in ["replacement-a", "replacement-b"] {
        let (store, barrier) = (store.clone(), barrier.clone());
        let replacement = token(name, user.id, old.family_id, now() + Duration::days(30));
        tasks.push(tokio::spawn(async move {
            // Both start together; on SQLite one of them then waits in BEGIN IMMEDIATE.
            barrier.wait().await;
            let mut uow = store.begin().await?;
            let won = uow.rotate_refresh_token("contested", &replacement, now()).await?;
            uow.commit().await?;
            Ok::<_, StoreError>((name, won))
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (name, won) = task.await.unwrap_or_else(|e| panic!("task: {e}"))?;
        if won {
            winners.push(name);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let winner = winners[0];
    let loser = if winner == "replacement-a" { "replacement-b" } else { "replacement-a" };
    let Some(contested) = store.find_refresh_token("contested").await? else { panic!("contested token vanished") };
    assert_eq!(contested.replaced_by_token_hash.as_deref(), Some(winner));
    assert!(contested.revoked_at.is_some());
    assert!(store.find_refresh_token(winner).await?.is_some());
    assert_eq!(store.find_refresh_token(loser).await?, None);
    Ok(())
}

async fn revoke_keeps_replaced_by(store: Arc<dyn Store>) -> TestResult {
    let (user, old) = user_with_token(&store, "r-old").await?;
    let rotated_at = now() - Duration::seconds(30);
    let new = token("r-new", user.id, old.family_id, now() + Duration::days(30));
    let mut uow = store.begin().await?;
    assert!(uow.rotate_refresh_token("r-old", &new, rotated_at).await?);
    uow.commit().await?;

    let at = now();
    let mut uow = store.begin().await?;
    // Already revoked by the rotation: untouched, so reuse of it stays detectable.
    assert!(!uow.revoke_refresh_token("r-old", at).await?);
    assert!(uow.revoke_refresh_token("r-new", at).await?);
    assert!(!uow.revoke_refresh_token("r-new", at + Duration::seconds(1)).await?);
    assert!(!uow.revoke_refresh_token("missing", at).await?);
    uow.commit().await?;

    let Some(old_now) = store.find_refresh_token("r-old").await? else { panic!("r-old vanished") };
    assert_eq!(old_now.revoked_at, Some(rotated_at));
    assert_eq!(old_now.replaced_by_token_hash.as_deref(), Some("r-new"));
    let revoked = RefreshToken { revoked_at: Some(at), ..new };
    assert_eq!(store.find_refresh_token("r-new").await?, Some(revoked));
    Ok(())
}

async fn revoke_family_counts_only_unrevoked(store: Arc<dyn Store>) -> TestResult {
    let user = bare_user("family@example.com");
    save_user(&store, &user).await?;
    let (family, other_family) = (Uuid::new_v4(), Uuid::new_v4());
    let earlier = now() - Duration::hours(1);
    let expires = now() + Duration::days(1);
    let already = RefreshToken { revoked_at: Some(earlier), ..token("f-revoked", user.id, family, expires) };
    save_tokens(
        &store,
        &[
            token("f-1", user.id, family, expires),
            token("f-2", user.id, family, expires),
            already.clone(),
            token("g-1", user.id, other_family, expires),
        ],
    )
    .await?;

    let at = now();
    let mut uow = store.begin().await?;
    assert_eq!(uow.revoke_refresh_token_family(family, at).await?, 2);
    assert_eq!(uow.revoke_refresh_token_family(family, at).await?, 0);
    assert_eq!(uow.revoke_refresh_token_family(Uuid::new_v4(), at).await?, 0);
    uow.commit().await?;

    for hash in ["f-1", "f-2"] {
        let revoked_at = store.find_refresh_token(hash).await?.and_then(|t| t.revoked_at);
        assert_eq!(revoked_at, Some(at), "{hash}");
    }
    assert_eq!(store.find_refresh_token("f-revoked").await?, Some(already));
    let untouched = store.find_refresh_token("g-1").await?.and_then(|t| t.revoked_at);
    assert_eq!(untouched, None);
    Ok(())
}

async fn revoke_user_counts_only_unrevoked(store: Arc<dyn Store>) -> TestResult {
    let (ann, bo) = (bare_user("ann@example.com"), bare_user("bo@example.com"));
    save_user(&store, &ann).await?;
    save_user(&store, &bo).await?;
    let expires = now() + Duration::days(1);
    let earlier = now() - Duration::hours(1);
    let already = RefreshToken { revoked_at: Some(earlier), ..token("a-revoked", ann.id, Uuid::new_v4(), expires) };
    save_tokens(
        &store,
        &[
            token("a-1", ann.id, Uuid::new_v4(), expires),
            token("a-2", ann.id, Uuid::new_v4(), expires),
            token("a-3", ann.id, Uuid::new_v4(), expires),
            already.clone(),
            token("b-1", bo.id, Uuid::new_v4(), expires),
        ],
    )
    .await?;

    let at = now();
    let mut uow = store.begin().await?;
    assert_eq!(uow.revoke_user_refresh_tokens(ann.id, at).await?, 3);
    assert_eq!(uow.revoke_user_refresh_tokens(ann.id, at).await?, 0);
    assert_eq!(uow.revoke_user_refresh_tokens(Uuid::new_v4(), at).await?, 0);
    uow.commit().await?;

    for hash in ["a-1", "a-2", "a-3"] {
        let revoked_at = store.find_refresh_token(hash).await?.and_then(|t| t.revoked_at);
        assert_eq!(revoked_at, Some(at), "{hash}");
    }
    assert_eq!(store.find_refresh_token("a-revoked").await?, Some(already));
    assert_eq!(store.find_refresh_token("b-1").await?.and_then(|t| t.revoked_at), None);
    Ok(())
}

async fn purge_deletes_only_expired_tokens(store: Arc<dyn Store>) -> TestResult {
    let user = bare_user("purge@example.com");
    save_user(&store, &user).await?;
    let at = now();
    let family = Uuid::new_v4();
    save_tokens(
        &store,
        &[
            token("expired-long-ago", user.id, family, at - Duration::days(3)),
            token("expired-just-now", user.id, family, at - Duration::milliseconds(1)),
            RefreshToken { revoked_at: Some(at), ..token("expired-revoked", user.id, family, at - Duration::hours(1)) },
            token("expires-exactly-now", user.id, family, at),
            token("valid", user.id, family, at + Duration::days(1)),
        ],
    )
    .await?;

    assert_eq!(store.purge_expired_refresh_tokens(at).await?, 3);
    assert_eq!(store.purge_expired_refresh_tokens(at).await?, 0);
    for gone in ["expired-long-ago", "expired-just-now", "expired-revoked"] {
        assert_eq!(store.find_refresh_token(gone).await?, None, "{gone}");
    }
    for kept in ["expires-exactly-now", "valid"] {
        assert!(store.find_refresh_token(kept).await?.is_some(), "{kept}");
    }
    Ok(())
}
