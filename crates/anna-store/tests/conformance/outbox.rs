//! The outbox: appends in units of work, the relay's claims, leases, marks and wake-ups.

use super::*;

conformance!(
    append_events_round_trips_in_order,
    claim_takes_ready_rows_oldest_first_under_a_lease,
    claim_respects_the_limit,
    one_batch_takes_an_aggregates_rows_in_order,
    a_live_lease_holds_back_later_rows_of_its_aggregate,
    a_retry_holds_back_later_rows_until_published,
    failed_rows_are_never_claimed_and_block_nothing,
    marks_record_the_outcome,
    purge_deletes_only_old_published_rows,
    outbox_status_counts_and_dates,
    published_since_counts_a_window,
    wait_for_outbox_wakes_on_commit_with_events,
    close_wakes_a_relay_waiting_for_the_outbox,
    failed_rows_can_be_requeued,
);

async fn append_events_round_trips_in_order(store: Arc<dyn Store>) -> TestResult {
    let aggregate = Uuid::new_v4().to_string();
    let t = now();
    // occurred_on deliberately out of order: the outbox keeps append order, not event time.
    let mut first = event("user.registered", &aggregate, t);
    first.payload = json!({
        "name": "Ann",
        "email": "ann@example.com",
        "nested": { "list": [1, 2.5, "three", null, true], "empty": {} },
        "unicode": "ñandú ✓",
    });
    first.tenant_id = Some("tenant-1".into());
    first.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    let second = event("user.verification.token_issued", &aggregate, t - Duration::seconds(10));
    let third = DomainEvent { payload: json!({}), ..event("user.verified", &aggregate, t + Duration::seconds(1)) };
    let later = event("user.password_reset.requested", &aggregate, t - Duration::days(1));
    let elsewhere = event("user.registered", "another-aggregate", t);

    let mut uow = store.begin().await?;
    uow.append_events(&[first.clone(), second.clone(), third.clone()]).await?;
    uow.append_events(&[]).await?;
    uow.append_events(std::slice::from_ref(&elsewhere)).await?;
    uow.commit().await?;
    let mut uow = store.begin().await?;
    uow.append_events(std::slice::from_ref(&later)).await?;
    uow.commit().await?;

    let before = OffsetDateTime::now_utc();
    let records = store.outbox_events_for_aggregate(&aggregate).await?;
    let events: Vec<&DomainEvent> = records.iter().map(|r| &r.event).collect();
    assert_eq!(events, vec![&first, &second, &third, &later]);
    for record in &records {
        assert_eq!(record.status, "pending");
        assert_eq!(record.attempts, 0);
        assert_eq!(record.last_error, None);
        assert_eq!(record.published_at, None);
        let age = before - record.created_at;
        assert!(age >= Duration::ZERO && age < Duration::minutes(1), "created_at {}", record.created_at);
    }
    let mut ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "each row has its own id");
    assert!(!ids.contains(&first.event_id), "the row id is not the event id");

    let others = store.outbox_events_for_aggregate("another-aggregate").await?;
    assert_eq!(others.iter().map(|r| &r.event).collect::<Vec<_>>(), vec![&elsewhere]);
    assert!(store.outbox_events_for_aggregate("nothing-here").await?.is_empty());
    Ok(())
}

async fn claim_takes_ready_rows_oldest_first_under_a_lease(store: Arc<dyn Store>) -> TestResult {
    let (x, y, z) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let first = DomainEvent {
        tenant_id: Some("tenant-1".into()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        payload: json!({ "nested": { "list": [1, "two", null] }, "unicode": "ñandú ✓" }),
        ..event("e1", &x, now())
    };
    // occurred_on out of order: claims follow insertion order, not event time.
    let events = [first, event("e2", &y, now() - Duration::hours(1)), event("e3", &z, now())];
    append(&store, &events[..2]).await?;
    append(&store, &events[2..]).await?;

    let t = relay_now();
    let claimed = store.claim_outbox_batch(10, LEASE, t).await?;
    assert_eq!(claimed.iter().map(|r| &r.event).collect::<Vec<_>>(), events.iter().collect::<Vec<_>>());
    for record in &claimed {
        assert_eq!((record.status.as_str(), record.attempts), ("processing", 1), "{}", record.event.event_name);
        assert_eq!((record.last_error.as_ref(), record.published_at), (None, None));
    }
    assert_eq!(stored(&store, &x, "e1").await?.status, "processing");

    // Under the lease, nobody else gets them, however often it asks.
    assert!(store.claim_outbox_batch(10, LEASE, t).await?.is_empty());
    assert!(store.claim_outbox_batch(10, LEASE, t + Duration::seconds(29)).await?.is_empty());

    // The relay died: after the lease they come back, oldest first, with one more attempt.
    let later = after_lease(t);
    let again = store.claim_outbox_batch(10, LEASE, later).await?;
    assert_eq!(names(&again), ["e1", "e2", "e3"]);
    assert_eq!(ids(&again), ids(&claimed));
    assert!(again.iter().all(|r| r.status == "processing" && r.attempts == 2));
    // And the new lease counts from the new claim.
    assert!(store.claim_outbox_batch(10, LEASE, later + Duration::seconds(29)).await?.is_empty());
    Ok(())
}

async fn claim_respects_the_limit(store: Arc<dyn Store>) -> TestResult {
    let events: Vec<DomainEvent> =
        (0..5).map(|i| event(&format!("e{i}"), &Uuid::new_v4().to_string(), now())).collect();
    append(&store, &events).await?;
    let t = relay_now();
    assert!(store.claim_outbox_batch(0, LEASE, t).await?.is_empty());
    assert_eq!(names(&store.claim_outbox_batch(2, LEASE, t).await?), ["e0", "e1"]);
    assert_eq!(names(&store.claim_outbox_batch(2, LEASE, t).await?), ["e2", "e3"]);
    assert_eq!(names(&store.claim_outbox_batch(2, LEASE, t).await?), ["e4"]);
    assert!(store.claim_outbox_batch(2, LEASE, t).await?.is_empty());
    Ok(())
}

async fn one_batch_takes_an_aggregates_rows_in_order(store: Arc<dyn Store>) -> TestResult {
    let (a, _) = two_aggregates(&store).await?;
    // And a third row of A appended together with a fourth.
    append(&store, &[event("A3", &a, now()), event("A4", &a, now())]).await?;
    let claimed = store.claim_outbox_batch(10, LEASE, relay_now()).await?;
    assert_eq!(names(&claimed), ["A1", "A2", "B1", "A3", "A4"]);
    Ok(())
}

async fn a_live_lease_holds_back_later_rows_of_its_aggregate(store: Arc<dyn Store>) -> TestResult {
    let (a, _) = two_aggregates(&store).await?;
    let t = relay_now();
    // Relay 1 takes only A1.
    assert_eq!(names(&store.claim_outbox_batch(1, LEASE, t).await?), ["A1"]);
    // Relay 2 gets B1, not A2: A1 is under relay 1's lease.
    assert_eq!(names(&store.claim_outbox_batch(10, LEASE, t).await?), ["B1"]);
    assert!(store.claim_outbox_batch(10, LEASE, t + Duration::seconds(5)).await?.is_empty());
    assert_eq!(stored(&store, &a, "A2").await?.status, "pending");

    // Relay 1 died: once its lease is over, A1 and A2 go together, in order (B1's lease from
    // relay 2 is over too).
    let claimed = store.claim_outbox_batch(10, LEASE, after_lease(t)).await?;
    assert_eq!(names(&claimed), ["A1", "A2", "B1"]);
    assert_eq!(claimed.iter().map(|r| r.attempts).collect::<Vec<_>>(), [2, 1, 2]);
    Ok(())
}

async fn a_retry_holds_back_later_rows_until_published(store: Arc<dyn Store>) -> TestResult {
    let (a, b) = two_aggregates(&store).await?;
    let t = relay_now();
    let a1 = store.claim_outbox_batch(1, LEASE, t).await?;
    assert_eq!(names(&a1), ["A1"]);
    store.mark_outbox_retry(a1[0].id, "stream unavailable", t + Duration::minutes(1), t).await?;

    // A1 waits for its retry, so A2 waits too; B1 does not.
    let b1 = store.claim_outbox_batch(10, LEASE, t).await?;
    assert_eq!(names(&b1), ["B1"]);
    store.mark_outbox_published(&ids(&b1), t).await?;
    assert!(store.claim_outbox_batch(10, LEASE, t + Duration::seconds(59)).await?.is_empty());
    assert_eq!(stored(&store, &a, "A2").await?.status, "pending");

    // The retry is due: A1 first (alone here, by the limit).
    let due = t + Duration::minutes(1);
    let retried = store.claim_outbox_batch(1, LEASE, due).await?;
    assert_eq!(names(&retried), ["A1"]);
    assert_eq!(retried[0].attempts, 2);
    // Under its new lease it still holds A2 back; once published, it no longer does.
    assert!(store.claim_outbox_batch(10, LEASE, due).await?.is_empty());
    store.mark_outbox_published(&ids(&retried), due).await?;
    assert_eq!(names(&store.claim_outbox_batch(10, LEASE, due).await?), ["A2"]);
    assert_eq!(stored(&store, &b, "B1").await?.status, "published");
    Ok(())
}

async fn failed_rows_are_never_claimed_and_block_nothing(store: Arc<dyn Store>) -> TestResult {
    let (a, _) = two_aggregates(&store).await?;
    let t = relay_now();
    let a1 = store.claim_outbox_batch(1, LEASE, t).await?;
    store.mark_outbox_failed(a1[0].id, "payload rejected", t).await?;
    let failed = stored(&store, &a, "A1").await?;
    assert_eq!(
        (failed.status.as_str(), failed.attempts, failed.last_error.as_deref()),
        ("failed", 1, Some("payload rejected"))
    );

    assert_eq!(names(&store.claim_outbox_batch(10, LEASE, t).await?), ["A2", "B1"]);
    // Not after any lease, nor much later.
    assert_eq!(names(&store.claim_outbox_batch(10, LEASE, after_lease(t)).await?), ["A2", "B1"]);
    assert!(!claimable_ids(&store, t + Duration::days(30)).await?.contains(&a1[0].id));
    Ok(())
}

async fn marks_record_the_outcome(store: Arc<dyn Store>) -> TestResult {
    let aggregate = Uuid::new_v4().to_string();
    append(&store, &[event("ok", &aggregate, now())]).await?;
    append(&store, &[event("retried", &Uuid::new_v4().to_string(), now())]).await?;
    let t = relay_now();
    let claimed = store.claim_outbox_batch(10, LEASE, t).await?;
    let (ok, retried) = (claimed[0].clone(), claimed[1].clone());

    let published_at = t + Duration::milliseconds(250);
    store.mark_outbox_published(&[ok.id], published_at).await?;
    store.mark_outbox_published(&[], published_at).await?;
    let row = stored(&store, &aggregate, "ok").await?;
    assert_eq!(
        (row.status.as_str(), row.attempts, row.last_error.as_ref(), row.published_at),
        ("published", 1, None, Some(published_at))
    );
    // Published again (a relay whose lease ran out): the first publication stands, and a late
    // retry or failure does not take it back.
    store.mark_outbox_published(&[ok.id], published_at + Duration::seconds(5)).await?;
    store.mark_outbox_retry(ok.id, "late", t + Duration::minutes(1), t).await?;
    store.mark_outbox_failed(ok.id, "late", t).await?;
    assert_eq!(stored(&store, &aggregate, "ok").await?, row);

    let retry_at = t + Duration::minutes(2);
    store.mark_outbox_retry(retried.id, "timeout", retry_at, t).await?;
    let row = stored(&store, &retried.event.aggregate_id, "retried").await?;
    assert_eq!(
        (row.status.as_str(), row.attempts, row.last_error.as_deref(), row.published_at),
        ("pending", 1, Some("timeout"), None)
    );
    // Due exactly at retry_at, not a millisecond before.
    assert!(claimable_ids(&store, retry_at - Duration::milliseconds(1)).await?.is_empty());
    assert_eq!(claimable_ids(&store, retry_at).await?, [retried.id]);
    // A failure of the second attempt replaces the error.
    store.mark_outbox_failed(retried.id, "gave up", retry_at).await?;
    let row = stored(&store, &retried.event.aggregate_id, "retried").await?;
    assert_eq!((row.status.as_str(), row.attempts, row.last_error.as_deref()), ("failed", 2, Some("gave up")));
    // A row nobody claimed cannot be marked retry or failed.
    let pending = Uuid::new_v4().to_string();
    append(&store, &[event("pending", &pending, now())]).await?;
    let untouched = stored(&store, &pending, "pending").await?;
    store.mark_outbox_retry(untouched.id, "no", t, t).await?;
    store.mark_outbox_failed(untouched.id, "no", t).await?;
    assert_eq!(stored(&store, &pending, "pending").await?, untouched);
    Ok(())
}

async fn purge_deletes_only_old_published_rows(store: Arc<dyn Store>) -> TestResult {
    let aggregate = Uuid::new_v4().to_string();
    let labels = ["old", "recent", "failed", "processing", "pending"];
    append(&store, &labels.map(|label| event(label, &aggregate, now()))).await?;
    let t = relay_now();
    let claimed = store.claim_outbox_batch(4, LEASE, t).await?;
    store.mark_outbox_published(&[claimed[0].id], t - Duration::hours(2)).await?;
    store.mark_outbox_published(&[claimed[1].id], t).await?;
    store.mark_outbox_failed(claimed[2].id, "boom", t - Duration::days(3)).await?;

    assert_eq!(store.purge_published_outbox(t - Duration::hours(1)).await?, 1);
    assert_eq!(store.purge_published_outbox(t - Duration::hours(1)).await?, 0);
    let left = store.outbox_events_for_aggregate(&aggregate).await?;
    assert_eq!(names(&left), ["recent", "failed", "processing", "pending"]);
    // published_at exactly at the cut-off stays.
    assert_eq!(store.purge_published_outbox(t).await?, 0);
    assert_eq!(store.purge_published_outbox(t + Duration::milliseconds(1)).await?, 1);
    Ok(())
}

async fn outbox_status_counts_and_dates(store: Arc<dyn Store>) -> TestResult {
    assert_eq!(store.outbox_status().await?, OutboxStatus::default());
    let aggregates: Vec<String> = (0..6).map(|_| Uuid::new_v4().to_string()).collect();
    for aggregate in &aggregates {
        append(&store, &[event("e", aggregate, now())]).await?;
    }
    let oldest = store.outbox_events_for_aggregate(&aggregates[0]).await?[0].created_at;
    assert_eq!(
        store.outbox_status().await?,
        OutboxStatus { pending: 6, processing: 0, failed: 0, oldest_unpublished_at: Some(oldest) }
    );

    // 0 published, 1 failed, 2 waiting for a retry, 3 processing, 4 and 5 pending.
    let t = relay_now();
    let claimed = store.claim_outbox_batch(4, LEASE, t).await?;
    store.mark_outbox_published(&[claimed[0].id], t).await?;
    store.mark_outbox_failed(claimed[1].id, "boom", t).await?;
    store.mark_outbox_retry(claimed[2].id, "later", t + Duration::hours(1), t).await?;
    let second = store.outbox_events_for_aggregate(&aggregates[2]).await?[0].created_at;
    assert_eq!(
        store.outbox_status().await?,
        OutboxStatus { pending: 3, processing: 1, failed: 1, oldest_unpublished_at: Some(second) }
    );
    assert_eq!(store.outbox_status().await?.backlog(), 4);
    Ok(())
}

async fn published_since_counts_a_window(store: Arc<dyn Store>) -> TestResult {
    let aggregate = Uuid::new_v4().to_string();
    append(&store, &[event("e1", &aggregate, now()), event("e2", &aggregate, now()), event("e3", &aggregate, now())])
        .await?;
    let t = relay_now();
    let claimed = store.claim_outbox_batch(3, LEASE, t).await?;
    store.mark_outbox_published(&[claimed[0].id], t).await?;
    store.mark_outbox_published(&[claimed[1].id, claimed[2].id], t + Duration::seconds(30)).await?;
    assert_eq!(store.outbox_published_since(t - Duration::seconds(1)).await?, 3);
    assert_eq!(store.outbox_published_since(t + Duration::seconds(10)).await?, 2);
    assert_eq!(store.outbox_published_since(t + Duration::seconds(31)).await?, 0);
    Ok(())
}

async fn wait_for_outbox_wakes_on_commit_with_events(store: Arc<dyn Store>) -> TestResult {
    let timeout = StdDuration::from_millis(300);
    // Nothing happens: the full timeout, never an error.
    let started = std::time::Instant::now();
    store.wait_for_outbox(timeout).await;
    assert!(started.elapsed() >= timeout, "returned after {:?}", started.elapsed());

    // A commit without events and a rolled-back unit of work with events wake nobody.
    save_user(&store, &bare_user("quiet@example.com")).await?;
    let mut uow = store.begin().await?;
    uow.append_events(&[event("rolled.back", "nobody", now())]).await?;
    drop(uow);
    let started = std::time::Instant::now();
    store.wait_for_outbox(timeout).await;
    let elapsed = started.elapsed();
    assert!(elapsed >= timeout && elapsed < StdDuration::from_secs(5), "returned after {elapsed:?}");

    // Another task commits events while the relay waits.
    let waiter = tokio::spawn({
        let store = store.clone();
        async move {
            store.wait_for_outbox(StdDuration::from_secs(20)).await;
            std::time::Instant::now()
        }
    });
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    let writer = tokio::spawn({
        let store = store.clone();
        async move { append(&store, &[event("wake.up", "someone", now())]).await.map(|()| std::time::Instant::now()) }
    });
    let committed = writer.await.unwrap_or_else(|e| panic!("writer: {e}"))?;
    let woke = tokio::time::timeout(StdDuration::from_secs(5), waiter)
        .await
        .unwrap_or_else(|_| panic!("still waiting 5 s after the commit"))
        .unwrap_or_else(|e| panic!("waiter: {e}"));
    let delay = woke.saturating_duration_since(committed);
    assert!(delay < StdDuration::from_secs(1), "woke {delay:?} after the commit");

    // Many commits while the relay is busy elsewhere add up to one wake-up, not one each.
    for i in 0..50 {
        append(&store, &[event("burst", &format!("burst-{i}"), now())]).await?;
    }
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    let started = std::time::Instant::now();
    store.wait_for_outbox(StdDuration::from_secs(5)).await;
    assert!(started.elapsed() < StdDuration::from_secs(1), "returned after {:?}", started.elapsed());
    let started = std::time::Instant::now();
    store.wait_for_outbox(timeout).await;
    assert!(started.elapsed() >= timeout, "woken again after {:?}", started.elapsed());
    Ok(())
}

async fn close_wakes_a_relay_waiting_for_the_outbox(store: Arc<dyn Store>) -> TestResult {
    let waiter = tokio::spawn({
        let store = store.clone();
        async move { store.wait_for_outbox(StdDuration::from_secs(20)).await }
    });
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    tokio::time::timeout(StdDuration::from_secs(5), store.close())
        .await
        .unwrap_or_else(|_| panic!("close hangs while a relay waits"));
    tokio::time::timeout(StdDuration::from_secs(1), waiter)
        .await
        .unwrap_or_else(|_| panic!("the relay still waits after close"))
        .unwrap_or_else(|e| panic!("waiter: {e}"));
    Ok(())
}

async fn failed_rows_can_be_requeued(store: Arc<dyn Store>) -> TestResult {
    let t = relay_now();
    append(&store, &[event("a.failed", "agg-requeue", t), event("a.ok", "agg-other", t)]).await?;
    let claimed = store.claim_outbox_batch(10, LEASE, t).await?;
    assert_eq!(claimed.len(), 2);
    store.mark_outbox_failed(claimed[0].id, "boom", t).await?;
    store.mark_outbox_published(&[claimed[1].id], t).await?;
    assert_eq!(store.outbox_status().await?.failed, 1);
    let later = t + Duration::seconds(5);
    assert_eq!(store.requeue_failed_outbox(later).await?, 1);
    assert_eq!(store.requeue_failed_outbox(later).await?, 0);
    let status = store.outbox_status().await?;
    assert_eq!((status.failed, status.pending), (0, 1));
    let again = store.claim_outbox_batch(10, LEASE, later).await?;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, claimed[0].id);
    assert_eq!(again[0].attempts, 1, "attempts restart from zero (this claim is the first)");
    Ok(())
}
