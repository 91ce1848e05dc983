//! Webhook endpoints and deliveries: the claim's rules (order per aggregate, the circuit
//! breaker, per-endpoint concurrency, deadlines), recording attempts, replays and the log.

use std::collections::HashMap;

use anna_domain::secrets::Sealer;
use anna_domain::webhook::{EndpointChanges, EventFilter, NewEndpoint, WebhookEndpoint};
use anna_store::webhooks::{
    AttemptNext, AttemptResult, CircuitRules, ClaimRules, ClaimedDelivery, DeliveryStatus, NewDelivery,
};

use super::sessions::insert_user;
use super::*;

conformance!(
    endpoints_round_trip,
    deliveries_are_claimed_recorded_and_replayed,
    ordered_deliveries_wait_for_the_earlier_ones,
    an_open_circuit_holds_deliveries_until_one_probe_succeeds,
    busy_endpoints_and_deadlines,
);

fn ms(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_millisecond(t.millisecond()).unwrap_or(t)
}

fn settings(ordered: bool) -> NewEndpoint {
    NewEndpoint {
        url: "https://example.com/hook".into(),
        description: "crm".into(),
        filter: EventFilter::all(),
        enabled: true,
        ordered,
    }
}

async fn new_endpoint(store: &Arc<dyn Store>, tenant: Uuid, ordered: bool) -> Result<WebhookEndpoint, StoreError> {
    let sealer = Sealer::from_server_secret(b"test");
    let (mut endpoint, _, _) =
        WebhookEndpoint::create(tenant, settings(ordered), &sealer, now()).unwrap_or_else(|e| panic!("create: {e}"));
    endpoint.created_at = ms(endpoint.created_at);
    endpoint.updated_at = endpoint.created_at;
    let mut uow = store.begin().await?;
    uow.insert_webhook_endpoint(&endpoint).await?;
    uow.commit().await?;
    Ok(endpoint)
}

fn delivery(endpoint: &WebhookEndpoint, key: &str, position: u64, at: OffsetDateTime) -> NewDelivery {
    NewDelivery {
        endpoint_id: endpoint.id,
        tenant_id: endpoint.tenant_id,
        event_id: Uuid::new_v4(),
        event_name: "session.created".into(),
        ordering_key: key.into(),
        position: format!("{position:040}"),
        ordered: endpoint.ordered,
        body: format!("{{\"n\":{position}}}"),
        occurred_at: at,
        created_at: at,
        deadline_at: at + Duration::hours(1),
    }
}

async fn insert(store: &Arc<dyn Store>, deliveries: &[NewDelivery]) -> Result<u64, StoreError> {
    let mut uow = store.begin().await?;
    let inserted = uow.insert_webhook_deliveries(deliveries).await?;
    uow.commit().await?;
    Ok(inserted)
}

fn rules() -> ClaimRules {
    ClaimRules {
        batch: 10,
        window: 40,
        lease: StdDuration::from_secs(30),
        endpoint_concurrency: 10,
        in_flight: HashMap::new(),
        circuit_threshold: 2,
        recheck_delay: StdDuration::from_secs(60),
    }
}

const CIRCUIT: CircuitRules =
    CircuitRules { threshold: 2, open: StdDuration::from_secs(10), open_max: StdDuration::from_secs(60) };

fn result(claimed: &ClaimedDelivery, next: AttemptNext, at: OffsetDateTime) -> AttemptResult {
    AttemptResult {
        delivery_id: claimed.id,
        endpoint_id: claimed.endpoint_id,
        ordered: claimed.ordered,
        ordering_key: claimed.ordering_key.clone(),
        attempt: claimed.attempt,
        probe: claimed.probe,
        attempted_at: at,
        status_code: Some(if next == AttemptNext::Succeeded { 200 } else { 500 }),
        latency_ms: 3,
        error: (next != AttemptNext::Succeeded).then(|| "status 500".into()),
        response_body: Some("body".into()),
        next,
    }
}

async fn endpoints_round_trip(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "w1@example.com").await?;
    let other = insert_user(&store, "w2@example.com").await?;
    let first = new_endpoint(&store, tenant, false).await?;
    let second = new_endpoint(&store, tenant, true).await?;
    let foreign = new_endpoint(&store, other, false).await?;
    assert_eq!(store.find_webhook_endpoint(first.id).await?, Some(first.clone()));
    let listed: Vec<Uuid> = store.list_webhook_endpoints(tenant).await?.iter().map(|e| e.id).collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&first.id) && listed.contains(&second.id));
    assert_eq!(store.find_webhook_endpoints(&[first.id, foreign.id]).await?.len(), 2);

    let mut changed = first.clone();
    let at = ms(now() + Duration::seconds(1));
    changed.change(
        EndpointChanges {
            enabled: Some(false),
            filter: Some(EventFilter::from_stored(vec!["session.*".into()])),
            ..Default::default()
        },
        at,
    );
    changed.previous_secret_sealed = Some("old".into());
    changed.previous_secret_expires_at = Some(at + Duration::hours(1));
    let mut uow = store.begin().await?;
    assert_eq!(uow.count_webhook_endpoints(tenant).await?, 2);
    assert!(uow.find_webhook_endpoint(first.id).await?.is_some());
    uow.update_webhook_endpoint(&changed).await?;
    let enabled: Vec<Uuid> = uow.enabled_webhook_endpoints(&[tenant, other]).await?.iter().map(|e| e.id).collect();
    assert_eq!(enabled.len(), 2, "the disabled one is left out");
    assert!(!enabled.contains(&first.id));
    uow.commit().await?;
    assert_eq!(store.find_webhook_endpoint(first.id).await?, Some(changed));

    insert(&store, &[delivery(&second, "s", 1, now())]).await?;
    let claimed = store.claim_webhook_deliveries(&rules(), now()).await?;
    store.record_webhook_attempts(&[result(&claimed[0], AttemptNext::Succeeded, now())], CIRCUIT, now()).await?;
    let mut uow = store.begin().await?;
    assert!(uow.delete_webhook_endpoint(second.id).await?);
    assert!(!uow.delete_webhook_endpoint(second.id).await?);
    uow.commit().await?;
    assert_eq!(store.find_webhook_delivery(claimed[0].id).await?, None, "its deliveries go with it");
    assert!(store.list_webhook_attempts(claimed[0].id).await?.is_empty());
    Ok(())
}

async fn deliveries_are_claimed_recorded_and_replayed(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "w3@example.com").await?;
    let endpoint = new_endpoint(&store, tenant, false).await?;
    let t = ms(now());
    // The breaker is another test's subject.
    let rules = || ClaimRules { circuit_threshold: 0, ..rules() };
    let all: Vec<NewDelivery> = (0..3).map(|n| delivery(&endpoint, &format!("k{n}"), n, t)).collect();
    assert_eq!(insert(&store, &all).await?, 3);
    assert_eq!(insert(&store, &all[..1]).await?, 0, "one delivery per endpoint and event");

    let claimed = store.claim_webhook_deliveries(&ClaimRules { batch: 2, ..rules() }, t).await?;
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|c| c.attempt == 1 && c.round_attempt == 1 && !c.probe));
    let rest = store.claim_webhook_deliveries(&rules(), t).await?;
    assert_eq!(rest.len(), 1, "claimed deliveries are not claimed again while their lease runs");
    assert!(store.claim_webhook_deliveries(&rules(), t).await?.is_empty());

    let retry_at = t + Duration::seconds(5);
    let recorded = store
        .record_webhook_attempts(
            &[
                result(&claimed[0], AttemptNext::Succeeded, t),
                result(&claimed[1], AttemptNext::RetryAt(retry_at), t),
                result(&rest[0], AttemptNext::Dead, t),
            ],
            CircuitRules { threshold: 0, ..CIRCUIT },
            t,
        )
        .await?;
    assert_eq!(recorded.recorded, 3);
    let done = store.find_webhook_delivery(claimed[0].id).await?.unwrap_or_else(|| panic!("gone"));
    assert_eq!((done.status, done.attempts, done.last_status_code), (DeliveryStatus::Succeeded, 1, Some(200)));
    assert_eq!(done.last_response_body.as_deref(), Some("body"));
    // A result whose claim is not current (already recorded) changes nothing.
    let stale = store.record_webhook_attempts(&[result(&claimed[0], AttemptNext::Dead, t)], CIRCUIT, t).await?;
    assert_eq!(stale.recorded, 0);
    assert_eq!(store.list_webhook_attempts(claimed[0].id).await?.len(), 1);

    assert!(store.claim_webhook_deliveries(&rules(), t).await?.is_empty(), "the retry is not due yet");
    let again = store.claim_webhook_deliveries(&rules(), retry_at).await?;
    assert_eq!(again.iter().map(|c| (c.id, c.attempt)).collect::<Vec<_>>(), vec![(claimed[1].id, 2)]);

    let counts = store.webhook_delivery_counts(retry_at).await?;
    assert_eq!((counts.pending, counts.delivering, counts.dead), (0, 1, 1));

    // Replays: only finished deliveries, with a fresh round of attempts.
    let mut uow = store.begin().await?;
    assert!(!uow.replay_webhook_delivery(again[0].id, t, t + Duration::hours(1)).await?, "still delivering");
    assert!(uow.replay_webhook_delivery(rest[0].id, t, t + Duration::hours(1)).await?);
    uow.commit().await?;
    let replayed = store.claim_webhook_deliveries(&rules(), retry_at).await?;
    assert_eq!(replayed.iter().map(|c| (c.attempt, c.round_attempt)).collect::<Vec<_>>(), vec![(2, 1)]);
    let mut uow = store.begin().await?;
    let bulk = uow
        .replay_webhook_deliveries(
            endpoint.id,
            DeliveryStatus::Succeeded,
            Some(t),
            retry_at,
            retry_at + Duration::hours(1),
        )
        .await?;
    uow.commit().await?;
    assert_eq!(bulk, 1);

    // The log: newest first, by status, a page at a time.
    let page = store.list_webhook_deliveries(endpoint.id, None, None, 2).await?;
    assert_eq!(page.len(), 2);
    let next = store.list_webhook_deliveries(endpoint.id, None, Some(page[1].id), 2).await?;
    assert_eq!(next.len(), 1);
    assert!(page[0].id > page[1].id && page[1].id > next[0].id);
    let pending = store.list_webhook_deliveries(endpoint.id, Some(DeliveryStatus::Pending), None, 10).await?;
    assert_eq!(pending.iter().map(|d| d.id).collect::<Vec<_>>(), vec![claimed[0].id]);

    // Retention: finished deliveries completed before the limit go, a batch at a time; the
    // unfinished stay.
    let mut uow = store.begin().await?;
    uow.replay_webhook_deliveries(endpoint.id, DeliveryStatus::Dead, None, t, t).await?;
    uow.commit().await?;
    let finished = store.claim_webhook_deliveries(&rules(), retry_at + Duration::hours(2)).await?;
    let results: Vec<AttemptResult> = finished.iter().map(|c| result(c, AttemptNext::Succeeded, t)).collect();
    store.record_webhook_attempts(&results, CIRCUIT, t).await?;
    let later = t + Duration::days(30);
    assert_eq!(store.purge_webhook_deliveries(t - Duration::seconds(1), 10).await?, 0, "not old enough");
    assert_eq!(store.purge_webhook_deliveries(later, 1).await?, 1);
    let purged = store.purge_webhook_deliveries(later, 10).await?;
    assert!(purged >= 1);
    assert!(store.list_webhook_deliveries(endpoint.id, Some(DeliveryStatus::Succeeded), None, 10).await?.is_empty());
    Ok(())
}

async fn ordered_deliveries_wait_for_the_earlier_ones(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "w4@example.com").await?;
    let endpoint = new_endpoint(&store, tenant, true).await?;
    let t = ms(now());
    // Two aggregates, three events each, inserted out of order.
    let mut all = Vec::new();
    for (key, positions) in [("a", [3, 1, 2]), ("b", [6, 4, 5])] {
        for position in positions {
            all.push(delivery(&endpoint, key, position, t));
        }
    }
    insert(&store, &all).await?;
    let first = store.claim_webhook_deliveries(&rules(), t).await?;
    let mut heads: Vec<String> = first.iter().map(|c| c.body.clone()).collect();
    heads.sort();
    assert_eq!(heads, vec!["{\"n\":1}", "{\"n\":4}"], "only the earliest of each aggregate");
    // The head of "a" fails: "a" waits for its retry; "b" goes on.
    let a = first.iter().find(|c| c.ordering_key == "a").cloned().unwrap_or_else(|| panic!("a"));
    let b = first.iter().find(|c| c.ordering_key == "b").cloned().unwrap_or_else(|| panic!("b"));
    let retry_at = t + Duration::seconds(2);
    store
        .record_webhook_attempts(
            &[result(&a, AttemptNext::RetryAt(retry_at), t), result(&b, AttemptNext::Succeeded, t)],
            CircuitRules { threshold: 0, ..CIRCUIT },
            t,
        )
        .await?;
    let next = store.claim_webhook_deliveries(&rules(), t).await?;
    assert_eq!(next.iter().map(|c| c.body.as_str()).collect::<Vec<_>>(), vec!["{\"n\":5}"]);
    let retried = store.claim_webhook_deliveries(&rules(), retry_at).await?;
    assert_eq!(retried.iter().map(|c| c.body.as_str()).collect::<Vec<_>>(), vec!["{\"n\":1}"]);
    // A dead-lettered head releases the next one, at once.
    store.record_webhook_attempts(&[result(&retried[0], AttemptNext::Dead, retry_at)], CIRCUIT, retry_at).await?;
    let after = store.claim_webhook_deliveries(&rules(), retry_at).await?;
    assert_eq!(after.iter().map(|c| c.body.as_str()).collect::<Vec<_>>(), vec!["{\"n\":2}"]);
    Ok(())
}

async fn an_open_circuit_holds_deliveries_until_one_probe_succeeds(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "w5@example.com").await?;
    let failing = new_endpoint(&store, tenant, false).await?;
    let healthy = new_endpoint(&store, tenant, false).await?;
    let t = ms(now());
    let mut all: Vec<NewDelivery> = (0..5).map(|n| delivery(&failing, "f", n, t)).collect();
    // Due a second later: the first claim sees only the failing endpoint's.
    all.push(delivery(&healthy, "h", 9, t + Duration::seconds(1)));
    insert(&store, &all).await?;
    let claimed = store.claim_webhook_deliveries(&ClaimRules { batch: 2, ..rules() }, t).await?;
    assert!(claimed.iter().all(|c| c.endpoint_id == failing.id));
    let failed: Vec<AttemptResult> =
        claimed.iter().map(|c| result(c, AttemptNext::RetryAt(t + Duration::seconds(1)), t)).collect();
    let recorded = store.record_webhook_attempts(&failed, CIRCUIT, t).await?;
    assert_eq!(recorded.opened, vec![(failing.id, StdDuration::from_secs(10))]);
    let open = store.find_webhook_endpoint(failing.id).await?.unwrap_or_else(|| panic!("endpoint"));
    assert_eq!((open.circuit_failures, open.circuit_open_until), (2, Some(t + Duration::seconds(10))));

    // While open: only the healthy endpoint's delivery goes.
    let later = t + Duration::seconds(5);
    let during = store.claim_webhook_deliveries(&rules(), later).await?;
    assert_eq!(during.iter().map(|c| c.endpoint_id).collect::<Vec<_>>(), vec![healthy.id]);

    // After it: one probe. It fails: open again, twice as long.
    let reopened_at = t + Duration::seconds(11);
    let probe = store.claim_webhook_deliveries(&rules(), reopened_at).await?;
    assert_eq!(probe.len(), 1);
    assert!(probe[0].probe);
    let again = store
        .record_webhook_attempts(
            &[result(&probe[0], AttemptNext::RetryAt(reopened_at), reopened_at)],
            CIRCUIT,
            reopened_at,
        )
        .await?;
    assert_eq!(again.opened, vec![(failing.id, StdDuration::from_secs(20))]);
    assert!(store.claim_webhook_deliveries(&rules(), reopened_at + Duration::seconds(19)).await?.is_empty());

    // The next probe succeeds: closed, and the waiting deliveries go at once.
    let healed_at = reopened_at + Duration::seconds(21);
    let probe = store.claim_webhook_deliveries(&rules(), healed_at).await?;
    assert_eq!(probe.len(), 1);
    store.record_webhook_attempts(&[result(&probe[0], AttemptNext::Succeeded, healed_at)], CIRCUIT, healed_at).await?;
    let closed = store.find_webhook_endpoint(failing.id).await?.unwrap_or_else(|| panic!("endpoint"));
    assert_eq!((closed.circuit_failures, closed.circuit_open_until), (0, None));
    let rest = store.claim_webhook_deliveries(&rules(), healed_at).await?;
    assert_eq!(rest.len(), 4, "every delivery of the endpoint but the probe");
    Ok(())
}

async fn busy_endpoints_and_deadlines(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "w6@example.com").await?;
    let busy = new_endpoint(&store, tenant, false).await?;
    let other = new_endpoint(&store, tenant, false).await?;
    let t = ms(now());
    let mut all: Vec<NewDelivery> = (0..4).map(|n| delivery(&busy, "b", n, t)).collect();
    let mut late = delivery(&other, "o", 9, t);
    late.deadline_at = t + Duration::seconds(1);
    all.push(late.clone());
    insert(&store, &all).await?;
    // This process has 3 attempts in flight to `busy`, at most 4 allowed: one more goes; the
    // other's delivery, past its deadline, is dead-lettered without an attempt.
    let rules = ClaimRules { endpoint_concurrency: 4, in_flight: HashMap::from([(busy.id, 3)]), ..rules() };
    let claimed = store.claim_webhook_deliveries(&rules, t + Duration::seconds(2)).await?;
    assert_eq!(claimed.iter().map(|c| c.endpoint_id).collect::<Vec<_>>(), vec![busy.id]);
    let dead = store.list_webhook_deliveries(other.id, Some(DeliveryStatus::Dead), None, 10).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 0);
    assert!(dead[0].last_error.as_deref().is_some_and(|e| e.contains("deadline")));
    // The busy endpoint's others were skipped, not postponed: due as before once there is room.
    let soon = store
        .claim_webhook_deliveries(&ClaimRules { in_flight: HashMap::new(), ..rules.clone() }, t + Duration::seconds(2))
        .await?;
    assert_eq!(soon.len(), 3);
    // An endpoint at its limit does not crowd others out of the window: its due deliveries,
    // oldest first, are left out of it.
    let crowd: Vec<NewDelivery> = (10..20).map(|n| delivery(&busy, "b", n, t)).collect();
    insert(&store, &crowd).await?;
    let waiting = delivery(&other, "o", 20, t + Duration::milliseconds(1));
    insert(&store, std::slice::from_ref(&waiting)).await?;
    let narrow = ClaimRules { window: 2, batch: 2, in_flight: HashMap::from([(busy.id, 4)]), ..rules };
    let claimed = store.claim_webhook_deliveries(&narrow, t + Duration::seconds(2)).await?;
    assert_eq!(claimed.iter().map(|c| c.event_id).collect::<Vec<_>>(), vec![waiting.event_id]);
    Ok(())
}
