//! WhatsApp sessions and their device keys.

use anna_domain::{Session, SessionStatus};
use anna_store::KeyChange;

use super::*;

conformance!(
    sessions_insert_update_list_delete,
    session_ids_are_unique_and_counted_per_tenant,
    device_keys_round_trip_and_wipe,
);

pub(crate) async fn insert_user(store: &Arc<dyn Store>, email: &str) -> Result<Uuid, StoreError> {
    let user = bare_user(email);
    let mut uow = store.begin().await?;
    uow.insert_user(&user).await?;
    uow.commit().await?;
    Ok(user.id)
}

async fn sessions_insert_update_list_delete(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "s1@example.com").await?;
    let other = insert_user(&store, "s2@example.com").await?;
    let t = now();
    let (mut first, _) = Session::create(Uuid::new_v4(), tenant, t);
    let (second, _) = Session::create(Uuid::new_v4(), tenant, t + Duration::seconds(1));
    let (foreign, _) = Session::create(Uuid::new_v4(), other, t);
    let mut uow = store.begin().await?;
    for session in [&first, &second, &foreign] {
        uow.insert_session(session).await?;
    }
    uow.commit().await?;

    assert_eq!(store.find_session(first.id).await?, Some(first.clone()));
    let listed: Vec<Uuid> = store.list_sessions(tenant).await?.iter().map(|s| s.id).collect();
    assert_eq!(listed, vec![second.id, first.id], "newest first, only the tenant's");

    first.show_qr("2@qr", t + Duration::seconds(60), t + Duration::seconds(2));
    first.connect("4915123456789@s.whatsapp.net", t + Duration::seconds(3));
    let mut uow = store.begin().await?;
    let locked = uow.find_session(first.id).await?;
    assert_eq!(locked.map(|s| s.status), Some(SessionStatus::PendingQr));
    uow.update_session(&first).await?;
    uow.commit().await?;
    assert_eq!(store.find_session(first.id).await?, Some(first.clone()));

    let connected = store.list_sessions_with_status(&[SessionStatus::Connected, SessionStatus::Failed]).await?;
    assert_eq!(connected.iter().map(|s| s.id).collect::<Vec<_>>(), vec![first.id]);
    let mut counts = store.count_sessions_by_status().await?;
    counts.sort_by_key(|(status, _)| status.as_str());
    assert_eq!(counts, vec![(SessionStatus::Connected, 1), (SessionStatus::PendingQr, 2)], "across tenants");

    store.save_creds(first.id, tenant, &json!({"paired": true})).await?;
    let mut uow = store.begin().await?;
    assert!(uow.delete_session(first.id).await?);
    assert!(!uow.delete_session(first.id).await?);
    uow.commit().await?;
    assert_eq!(store.find_session(first.id).await?, None);
    assert_eq!(store.load_creds(first.id).await?, None, "deleting a session deletes its device");
    Ok(())
}

async fn session_ids_are_unique_and_counted_per_tenant(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "s3@example.com").await?;
    let (session, _) = Session::create(Uuid::new_v4(), tenant, now());
    let mut uow = store.begin().await?;
    assert_eq!(uow.count_tenant_sessions(tenant).await?, 0);
    uow.insert_session(&session).await?;
    assert_eq!(uow.count_tenant_sessions(tenant).await?, 1);
    uow.commit().await?;
    let mut uow = store.begin().await?;
    assert!(matches!(uow.insert_session(&session).await, Err(StoreError::Conflict("sessions_id"))));
    Ok(())
}

async fn device_keys_round_trip_and_wipe(store: Arc<dyn Store>) -> TestResult {
    let (session, tenant) = (Uuid::new_v4(), Uuid::new_v4());
    let other_session = Uuid::new_v4();
    assert_eq!(store.load_creds(session).await?, None);
    store.save_creds(session, tenant, &json!({"noise": "a2V5", "n": 1})).await?;
    store.save_creds(session, tenant, &json!({"noise": "a2V5", "n": 2})).await?;
    assert_eq!(store.load_creds(session).await?, Some(json!({"noise": "a2V5", "n": 2})));

    store
        .set_keys(
            session,
            tenant,
            &[
                KeyChange::put("prekey", "1", json!("AAE=")),
                KeyChange::put("prekey", "2", json!("AAI=")),
                KeyChange::put("prekey", "3", json!("AAM=")),
                KeyChange::put("identity", "1555@s.whatsapp.net.0", json!({"key": "x"})),
                KeyChange::put("prekey", "2", json!("BBI=")),
                KeyChange::delete("prekey", "3"),
            ],
        )
        .await?;
    store.set_keys(other_session, tenant, &[KeyChange::put("prekey", "1", json!("other"))]).await?;

    let ids = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let mut got = store.get_keys(session, "prekey", &ids(&["1", "2", "3", "9"])).await?;
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, vec![("1".into(), json!("AAE=")), ("2".into(), json!("BBI="))]);
    assert_eq!(store.get_keys(session, "prekey", &[]).await?, vec![]);
    assert_eq!(store.list_keys(session, "prekey").await?.len(), 2);
    assert_eq!(store.list_keys(session, "identity").await?.len(), 1);

    assert_eq!(store.delete_key_type(session, "prekey").await?, 2);
    assert_eq!(store.list_keys(session, "prekey").await?, vec![]);
    store.wipe_device(session).await?;
    assert_eq!(store.load_creds(session).await?, None);
    assert_eq!(store.list_keys(session, "identity").await?, vec![]);
    assert_eq!(store.list_keys(other_session, "prekey").await?.len(), 1, "other sessions keep theirs");
    Ok(())
}
