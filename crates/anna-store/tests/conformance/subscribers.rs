//! The subscribers' side of the event log: applied ids, failed attempts, dead letters, statistics.

use super::*;

conformance!(
    record_event_applied_once_and_with_its_unit_of_work,
    event_failures_count_per_subscriber,
    purge_applied_events_deletes_only_old_ones,
    dead_letters_round_trip_and_delete,
    event_stats_count_with_their_unit_of_work,
    record_events_applied_in_one_statement,
    events_applied_answers_for_a_whole_set,
);

async fn record_event_applied_once_and_with_its_unit_of_work(store: Arc<dyn Store>) -> TestResult {
    let (event_id, other) = (Uuid::new_v4(), Uuid::new_v4());
    let t = now();
    assert!(!store.is_event_applied("mailer", event_id).await?);

    let mut uow = store.begin().await?;
    assert!(uow.record_event_applied("mailer", event_id, t).await?);
    assert!(!uow.record_event_applied("mailer", event_id, t).await?);
    uow.commit().await?;
    assert!(store.is_event_applied("mailer", event_id).await?);
    // Per subscriber and per event.
    assert!(!store.is_event_applied("webhooks", event_id).await?);
    assert!(!store.is_event_applied("mailer", other).await?);

    let mut uow = store.begin().await?;
    assert!(!uow.record_event_applied("mailer", event_id, t + Duration::seconds(1)).await?);
    assert!(uow.record_event_applied("webhooks", event_id, t).await?);
    uow.commit().await?;
    assert!(store.is_event_applied("webhooks", event_id).await?);

    // Rolled back with the effects it went with.
    let mut uow = store.begin().await?;
    assert!(uow.record_event_applied("mailer", other, t).await?);
    uow.insert_user(&bare_user("effect@example.com")).await?;
    drop(uow);
    assert!(!store.is_event_applied("mailer", other).await?);
    assert_eq!(store.find_user_by_email("effect@example.com").await?, None);
    let mut uow = store.begin().await?;
    assert!(uow.record_event_applied("mailer", other, t).await?);
    uow.commit().await?;
    assert!(store.is_event_applied("mailer", other).await?);
    Ok(())
}

async fn event_failures_count_per_subscriber(store: Arc<dyn Store>) -> TestResult {
    let (event_id, other) = (Uuid::new_v4(), Uuid::new_v4());
    let t = now();
    for expected in 1..=3 {
        assert_eq!(store.record_event_failure("mailer", event_id, &format!("error {expected}"), t).await?, expected);
    }
    assert_eq!(store.record_event_failure("webhooks", event_id, "down", t).await?, 1);
    assert_eq!(store.record_event_failure("mailer", other, "down", t).await?, 1);

    // A replay forgets every subscriber's attempts on that event, and only on that event.
    store.reset_event_attempts(event_id).await?;
    store.reset_event_attempts(Uuid::new_v4()).await?;
    assert_eq!(store.record_event_failure("mailer", event_id, "again", t).await?, 1);
    assert_eq!(store.record_event_failure("webhooks", event_id, "again", t).await?, 1);
    assert_eq!(store.record_event_failure("mailer", other, "again", t).await?, 2);
    Ok(())
}

async fn purge_applied_events_deletes_only_old_ones(store: Arc<dyn Store>) -> TestResult {
    let (old, recent, edge) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let t = now();
    let mut uow = store.begin().await?;
    uow.record_event_applied("mailer", old, t - Duration::days(8)).await?;
    uow.record_event_applied("webhooks", old, t - Duration::days(9)).await?;
    uow.record_event_applied("mailer", edge, t - Duration::days(7)).await?;
    uow.record_event_applied("mailer", recent, t).await?;
    uow.commit().await?;

    assert_eq!(store.purge_applied_events(t - Duration::days(7)).await?, 2);
    assert_eq!(store.purge_applied_events(t - Duration::days(7)).await?, 0);
    assert!(!store.is_event_applied("mailer", old).await?);
    assert!(!store.is_event_applied("webhooks", old).await?);
    assert!(store.is_event_applied("mailer", edge).await?);
    assert!(store.is_event_applied("mailer", recent).await?);
    Ok(())
}

fn dead_letter(name: &str, created_at: OffsetDateTime) -> DeadLetter {
    DeadLetter {
        id: Uuid::new_v4(),
        event: event(name, &Uuid::new_v4().to_string(), created_at - Duration::minutes(5)),
        error: format!("{name} failed: consumer error"),
        attempts: 5,
        created_at,
    }
}

async fn dead_letters_round_trip_and_delete(store: Arc<dyn Store>) -> TestResult {
    assert!(store.list_dead_letters(10).await?.is_empty());
    let t = now();
    let mut full = dead_letter("full", t - Duration::hours(2));
    full.event.tenant_id = Some("tenant-7".into());
    full.event.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    full.event.payload = json!({ "nested": { "list": [1, 2.5, "three", null, true] }, "unicode": "ñandú ✓" });
    let bare = DeadLetter { attempts: 1, ..dead_letter("bare", t - Duration::hours(1)) };
    let newest = dead_letter("newest", t);
    // Inserted out of order: listed oldest first.
    for letter in [&newest, &full, &bare] {
        store.insert_dead_letter(letter).await?;
    }
    assert_eq!(store.list_dead_letters(10).await?, [full.clone(), bare.clone(), newest.clone()]);
    assert_eq!(store.list_dead_letters(2).await?, [full.clone(), bare.clone()]);

    assert_eq!(store.delete_dead_letters(Some(&[])).await?, 0);
    assert_eq!(store.delete_dead_letters(Some(&[bare.id, Uuid::new_v4()])).await?, 1);
    assert_eq!(store.delete_dead_letters(Some(&[bare.id])).await?, 0);
    assert_eq!(store.list_dead_letters(10).await?, [full, newest]);
    assert_eq!(store.delete_dead_letters(None).await?, 2);
    assert!(store.list_dead_letters(10).await?.is_empty());
    assert_eq!(store.delete_dead_letters(None).await?, 0);
    Ok(())
}

async fn event_stats_count_with_their_unit_of_work(store: Arc<dyn Store>) -> TestResult {
    let t = now();
    assert!(store.event_stats().await?.is_empty());
    let mut uow = store.begin().await?;
    uow.count_event("user.registered", t - Duration::seconds(5)).await?;
    uow.count_event("user.registered", t).await?;
    uow.count_event("user.verified", t).await?;
    uow.commit().await?;
    // Rolled back with its unit of work.
    let mut uow = store.begin().await?;
    uow.count_event("user.registered", t).await?;
    drop(uow);
    // An older event does not move last_occurred_on back.
    let mut uow = store.begin().await?;
    uow.count_event("user.registered", t - Duration::hours(1)).await?;
    uow.commit().await?;
    let stats = store.event_stats().await?;
    let summary: Vec<(&str, i64, OffsetDateTime)> =
        stats.iter().map(|s| (s.event_name.as_str(), s.count, s.last_occurred_on)).collect();
    assert_eq!(summary, [("user.registered", 3, t), ("user.verified", 1, t)]);
    Ok(())
}

async fn record_events_applied_in_one_statement(store: Arc<dyn Store>) -> TestResult {
    let t = now();
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let mut uow = store.begin().await?;
    assert!(uow.record_event_applied("projector", a, t).await?);
    let mut fresh = uow.record_events_applied("projector", &[a, b, c, b], t).await?;
    fresh.sort();
    let mut expected = vec![b, c];
    expected.sort();
    assert_eq!(fresh, expected, "already applied and repeated ids are not returned");
    assert!(uow.record_events_applied("projector", &[], t).await?.is_empty());
    uow.count_events("user.registered", 5, t).await?;
    uow.commit().await?;
    for id in [a, b, c] {
        assert!(store.is_event_applied("projector", id).await?);
    }
    // Rolled back with its unit of work.
    let d = Uuid::new_v4();
    let mut uow = store.begin().await?;
    assert_eq!(uow.record_events_applied("projector", &[d], t).await?, vec![d]);
    drop(uow);
    assert!(!store.is_event_applied("projector", d).await?);
    assert_eq!(store.event_stats().await?[0].count, 5);
    Ok(())
}

async fn events_applied_answers_for_a_whole_set(store: Arc<dyn Store>) -> TestResult {
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    assert!(store.events_applied("mailer", &[]).await?.is_empty());
    assert!(store.events_applied("mailer", &ids).await?.is_empty());

    let mut uow = store.begin().await?;
    uow.record_events_applied("mailer", &ids[1..3], now()).await?;
    uow.record_event_applied("webhooks", ids[4], now()).await?;
    uow.commit().await?;

    let applied = store.events_applied("mailer", &ids).await?;
    assert_eq!(applied, ids[1..3].iter().copied().collect());
    // Per subscriber; an id asked for twice is answered once.
    assert_eq!(store.events_applied("webhooks", &ids).await?, [ids[4]].into_iter().collect());
    assert_eq!(store.events_applied("mailer", &[ids[2], ids[2], ids[0]]).await?, [ids[2]].into_iter().collect());
    Ok(())
}
