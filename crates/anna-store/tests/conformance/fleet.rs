//! The sessions fleet: partition leases, the worker registry and fenced writes.

use std::sync::Mutex;

use anna_domain::Session;
use anna_store::{Fence, FenceSource, KeyChange, WorkerInfo};

use super::sessions::insert_user;
use super::*;

conformance!(
    leases_are_acquired_once_renewed_and_released,
    expired_leases_are_taken_over_under_a_higher_token,
    workers_acquiring_at_once_get_different_partitions,
    workers_announce_themselves_and_expire,
    fenced_writes_need_the_current_lease,
);

const LONG: i64 = 60_000;

async fn leases_are_acquired_once_renewed_and_released(store: Arc<dyn Store>) -> TestResult {
    store.ensure_partitions(4).await?;
    store.ensure_partitions(4).await?;
    let first = store.acquire_leases("w1", 4, 3, LONG).await?;
    assert_eq!(first.iter().map(|a| (a.partition, a.token)).collect::<Vec<_>>(), vec![(0, 1), (1, 1), (2, 1)]);
    assert!(first.iter().all(|a| a.previous_worker.is_none()));
    let second = store.acquire_leases("w2", 4, 3, LONG).await?;
    assert_eq!(second.iter().map(|a| a.partition).collect::<Vec<_>>(), vec![3], "only the free one");
    assert!(store.acquire_leases("w3", 4, 3, LONG).await?.is_empty());

    let renewed = store.renew_leases("w1", LONG).await?;
    assert_eq!(renewed.iter().map(|l| l.partition).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(store.lease_holder(1).await?.and_then(|l| l.worker_id).as_deref(), Some("w1"));

    assert!(!store.release_lease("w1", 0, 7).await?, "a stale token releases nothing");
    assert!(!store.release_lease("w2", 0, 1).await?, "nor another worker");
    assert!(store.release_lease("w1", 0, 1).await?);
    assert_eq!(store.lease_holder(0).await?, None);
    let again = store.acquire_leases("w2", 4, 1, LONG).await?;
    assert_eq!((again[0].partition, again[0].token, again[0].previous_worker.clone()), (0, 2, None));
    assert_eq!(store.renew_leases("w1", LONG).await?.len(), 2, "the released one is no longer w1's");

    // Partitions beyond the count a worker runs with are not its to take.
    store.ensure_partitions(6).await?;
    let narrow = store.acquire_leases("w3", 4, 5, LONG).await?;
    assert!(narrow.is_empty(), "{narrow:?}");
    let view = store.fleet_view().await?;
    assert_eq!(view.leases.len(), 6);
    assert_eq!(view.holder_of(3).and_then(|l| l.worker_id.as_deref()), Some("w2"));
    assert_eq!(view.holder_of(5), None);
    Ok(())
}

async fn expired_leases_are_taken_over_under_a_higher_token(store: Arc<dyn Store>) -> TestResult {
    store.ensure_partitions(2).await?;
    let held = store.acquire_leases("w1", 2, 2, 100).await?;
    assert_eq!(held.len(), 2);
    tokio::time::sleep(StdDuration::from_millis(250)).await;
    assert!(store.renew_leases("w1", LONG).await?.is_empty(), "an expired lease cannot be renewed");
    assert_eq!(store.lease_holder(0).await?, None);
    let taken = store.acquire_leases("w2", 2, 2, LONG).await?;
    assert_eq!(taken.len(), 2);
    for lease in &taken {
        assert_eq!(lease.token, 2);
        assert_eq!(lease.previous_worker.as_deref(), Some("w1"));
        assert!(lease.at_ms - lease.previous_expired_at_ms >= 100, "{lease:?}");
    }
    assert!(!store.release_lease("w1", 0, 1).await?, "the old owner cannot free what it lost");
    Ok(())
}

async fn workers_acquiring_at_once_get_different_partitions(store: Arc<dyn Store>) -> TestResult {
    store.ensure_partitions(16).await?;
    let (a, b) = tokio::join!(store.acquire_leases("wa", 16, 10, LONG), store.acquire_leases("wb", 16, 10, LONG));
    let (a, b) = (a?, b?);
    assert_eq!(a.len() + b.len(), 16, "{a:?} {b:?}");
    assert!(a.iter().all(|x| b.iter().all(|y| x.partition != y.partition)));
    Ok(())
}

async fn workers_announce_themselves_and_expire(store: Arc<dyn Store>) -> TestResult {
    let info = |id: &str| WorkerInfo { worker_id: id.into(), host: "box".into(), pid: 42, partitions: 64 };
    store.heartbeat(&info("w1"), LONG).await?;
    store.heartbeat(&info("w2"), 50).await?;
    store.heartbeat(&info("w1"), LONG).await?;
    tokio::time::sleep(StdDuration::from_millis(150)).await;
    let view = store.fleet_view().await?;
    assert_eq!(view.workers.len(), 2);
    let live: Vec<&str> = view.live_workers().map(|w| w.info.worker_id.as_str()).collect();
    assert_eq!(live, vec!["w1"]);
    assert_eq!(view.workers[0].info, info("w1"));
    store.remove_worker("w1").await?;
    store.remove_worker("w2").await?;
    assert!(store.fleet_view().await?.workers.is_empty());
    Ok(())
}

/// The fence a test hands to a fenced store: whatever it was last set to.
#[derive(Debug, Default)]
struct SetFence(Mutex<Option<Fence>>);

impl FenceSource for SetFence {
    fn fence_of(&self, _session_id: Uuid) -> Result<Fence, StoreError> {
        let fence = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        fence.ok_or_else(|| StoreError::Fenced("not held here".into()))
    }
}

async fn fenced_writes_need_the_current_lease(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "fleet@example.com").await?;
    let (mut session, created) = Session::create(Uuid::new_v4(), tenant, now());
    let mut uow = store.begin().await?;
    uow.insert_session(&session).await?;
    uow.append_events(&[created]).await?;
    uow.commit().await?;

    store.ensure_partitions(1).await?;
    let held = store.acquire_leases("w1", 1, 1, 400).await?;
    let fences = Arc::new(SetFence::default());
    let fenced = store.fenced(fences.clone());

    // Without a fence of its own, the worker writes nothing.
    let mut uow = fenced.begin().await?;
    let refused = uow.update_session(&session).await;
    assert!(matches!(refused, Err(StoreError::Fenced(_))), "{refused:?}");
    drop(uow);

    *fences.0.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(Fence { partition: 0, worker_id: "w1".into(), token: held[0].token });
    let connected = session.connect("4915123456789@s.whatsapp.net", now()).unwrap_or_else(|| panic!("no event"));
    let mut uow = fenced.begin().await?;
    uow.update_session(&session).await?;
    uow.append_events(&[connected]).await?;
    uow.commit().await?;
    fenced.save_creds(session.id, tenant, &json!({"paired": true})).await?;
    fenced.set_keys(session.id, tenant, &[KeyChange::put("pre-key", "1", json!("k"))]).await?;

    // The lease expires and another worker takes the partition: the first one's writes,
    // still carrying its old token, are refused — state, events and device keys alike.
    tokio::time::sleep(StdDuration::from_millis(600)).await;
    let taken = store.acquire_leases("w2", 1, 1, LONG).await?;
    assert_eq!(taken[0].token, held[0].token + 1);
    let disconnected = session.disconnect("connection_lost", now()).unwrap_or_else(|| panic!("no event"));
    let mut uow = fenced.begin().await?;
    assert!(matches!(uow.update_session(&session).await, Err(StoreError::Fenced(_))));
    drop(uow);
    let mut uow = fenced.begin().await?;
    assert!(matches!(uow.append_events(&[disconnected]).await, Err(StoreError::Fenced(_))));
    drop(uow);
    let mut uow = fenced.begin().await?;
    assert!(matches!(uow.delete_session(session.id).await, Err(StoreError::Fenced(_))));
    drop(uow);
    assert!(matches!(fenced.save_creds(session.id, tenant, &json!({})).await, Err(StoreError::Fenced(_))));
    let change = [KeyChange::delete("pre-key", "1")];
    assert!(matches!(fenced.set_keys(session.id, tenant, &change).await, Err(StoreError::Fenced(_))));
    assert!(matches!(fenced.delete_key_type(session.id, "pre-key").await, Err(StoreError::Fenced(_))));
    assert!(matches!(fenced.wipe_device(session.id).await, Err(StoreError::Fenced(_))));
    assert_eq!(store.load_creds(session.id).await?, Some(json!({"paired": true})), "nothing was changed");
    assert_eq!(store.get_keys(session.id, "pre-key", &["1".into()]).await?.len(), 1);

    // Unfenced writes (the API's) are not concerned; the new owner's fence works.
    *fences.0.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(Fence { partition: 0, worker_id: "w2".into(), token: taken[0].token });
    fenced.wipe_device(session.id).await?;
    assert_eq!(store.load_creds(session.id).await?, None);
    Ok(())
}
