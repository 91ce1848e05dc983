//! Conformance suite of the device-key storage: every case runs against whatsapp-rust's own
//! `InMemoryBackend` (the reference) and against `DbBackend` on SQLite and on Postgres, each on
//! a fresh migrated database. A backend is correct when it behaves like the reference.
//! Cases that only make sense for anna's store (wipe, isolation between sessions, documents of
//! another driver, `is_paired`) run on the two databases only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anna_store::{ConnectOptions, DeviceKeyStore, KeyChange, Store};
use anna_whatsapp::whatsapp::library::bytes::Bytes;
use anna_whatsapp::whatsapp::library::wacore::appstate::hash::HashState;
use anna_whatsapp::whatsapp::library::wacore::appstate::processor::AppStateMutationMAC;
use anna_whatsapp::whatsapp::library::wacore::store::device::DEVICE_PROPS;
use anna_whatsapp::whatsapp::library::wacore::store::traits::{
    AppStateSyncKey, Backend, DeviceInfo, DeviceListRecord, LidPnMappingEntry, MsgSecretEntry, PendingInboundKey,
    PendingInboundRow, TcTokenEntry,
};
use anna_whatsapp::whatsapp::library::wacore::store::{Device, InMemoryBackend};
use anna_whatsapp::whatsapp::{DbBackend, WhatsAppConfig, WhatsAppDriver, device_to_creds};
use anna_whatsapp::{SessionDriver, SessionKey};
use serde_json::json;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// harness

fn options() -> ConnectOptions {
    ConnectOptions { max_connections: 4, acquire_timeout: Duration::from_secs(30), ..ConnectOptions::default() }
}

async fn sqlite_store() -> Arc<dyn Store> {
    let url = anna_testkit::sqlite::fresh_database_url();
    let store = anna_store::connect(&url, &options()).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("migrate {url}: {e}"));
    store
}

async fn postgres_store() -> Arc<dyn Store> {
    let url = anna_testkit::pg::fresh_database_url().await;
    let store = anna_store::connect(&url, &options()).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("migrate {url}: {e}"));
    store
}

fn new_session() -> SessionKey {
    SessionKey { session_id: Uuid::new_v4(), tenant_id: Uuid::new_v4() }
}

fn db_backend(store: &Arc<dyn Store>, session: SessionKey) -> Arc<dyn Backend> {
    let keys: Arc<dyn DeviceKeyStore> = store.clone();
    Arc::new(DbBackend::new(keys, session))
}

/// One case of the shared suite: runs on a backend.
async fn on_in_memory(case: impl AsyncFnOnce(Arc<dyn Backend>)) {
    case(Arc::new(InMemoryBackend::new())).await;
}

async fn on_database(store: Arc<dyn Store>, case: impl AsyncFnOnce(Arc<dyn Backend>)) {
    case(db_backend(&store, new_session())).await;
    store.close().await;
}

/// One database-only case: gets the store itself.
async fn on_store(store: Arc<dyn Store>, case: impl AsyncFnOnce(Arc<dyn Store>)) {
    case(store.clone()).await;
    store.close().await;
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod in_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::on_in_memory(super::$case).await;
                }
            )*
        }

        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::on_database(crate::sqlite_store().await, super::$case).await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::on_database(crate::postgres_store().await, super::$case).await;
                }
            )*
        }
    };
}

macro_rules! database_only {
    ($($case:ident),* $(,)?) => {
        mod sqlite_only {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::on_store(crate::sqlite_store().await, super::$case).await;
                }
            )*
        }

        mod postgres_only {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::on_store(crate::postgres_store().await, super::$case).await;
                }
            )*
        }
    };
}

conformance!(
    identities,
    sessions,
    prekeys,
    signed_prekeys,
    sender_keys,
    app_state_keys,
    app_state_versions,
    mutation_macs,
    lid_mappings,
    sender_key_devices,
    base_keys,
    device_lists,
    group_metadata,
    tc_tokens,
    sent_messages,
    pending_inbound,
    msg_secrets,
    device_roundtrip,
);

database_only!(
    wipe_removes_everything,
    sessions_are_isolated,
    other_drivers_documents_are_ignored,
    is_paired_follows_the_device
);

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items
}

// ---------------------------------------------------------------------------------------------
// shared cases

async fn identities(b: Arc<dyn Backend>) {
    assert_eq!(b.load_identity("15551234567@s.whatsapp.net").await.unwrap(), None);
    assert!(!b.has_signal_state_for_user("15551234567").await.unwrap());

    b.put_identity("15551234567@s.whatsapp.net", [1; 32]).await.unwrap();
    assert_eq!(b.load_identity("15551234567@s.whatsapp.net").await.unwrap(), Some([1; 32]));
    b.put_identity("15551234567@s.whatsapp.net", [2; 32]).await.unwrap();
    assert_eq!(b.load_identity("15551234567@s.whatsapp.net").await.unwrap(), Some([2; 32]));

    b.put_identities_batch(&[
        (Arc::from("15550000001:3@s.whatsapp.net"), [3; 32]),
        (Arc::from("100000012345678@lid"), [4; 32]),
    ])
    .await
    .unwrap();
    assert_eq!(b.load_identity("15550000001:3@s.whatsapp.net").await.unwrap(), Some([3; 32]));
    assert_eq!(b.load_identity("100000012345678@lid").await.unwrap(), Some([4; 32]));

    // Matches on the whole user part, with or without a device.
    assert!(b.has_signal_state_for_user("15551234567").await.unwrap());
    assert!(b.has_signal_state_for_user("15550000001").await.unwrap());
    assert!(!b.has_signal_state_for_user("1555123456").await.unwrap());
    assert!(!b.has_signal_state_for_user("155500000012").await.unwrap());

    b.delete_identity("15551234567@s.whatsapp.net").await.unwrap();
    assert_eq!(b.load_identity("15551234567@s.whatsapp.net").await.unwrap(), None);
    assert!(!b.has_signal_state_for_user("15551234567").await.unwrap());
    b.delete_identity("15551234567@s.whatsapp.net").await.unwrap();
}

async fn sessions(b: Arc<dyn Backend>) {
    let address = "15551234567:1@s.whatsapp.net";
    assert_eq!(b.get_session(address).await.unwrap(), None);
    assert!(!b.has_session(address).await.unwrap());

    b.put_session(address, b"record-1").await.unwrap();
    assert_eq!(b.get_session(address).await.unwrap(), Some(Bytes::from_static(b"record-1")));
    assert!(b.has_session(address).await.unwrap());
    assert!(b.has_signal_state_for_user("15551234567").await.unwrap());

    b.put_sessions_batch(&[
        (Arc::from(address), Bytes::from_static(b"record-2")),
        (Arc::from("15557654321@s.whatsapp.net"), Bytes::from_static(&[0, 255, 7])),
    ])
    .await
    .unwrap();
    assert_eq!(b.get_session(address).await.unwrap(), Some(Bytes::from_static(b"record-2")));
    assert_eq!(b.get_session("15557654321@s.whatsapp.net").await.unwrap(), Some(Bytes::from_static(&[0, 255, 7])));
    assert!(b.has_signal_state_for_user("15557654321").await.unwrap());

    b.delete_session(address).await.unwrap();
    assert_eq!(b.get_session(address).await.unwrap(), None);
    assert!(!b.has_session(address).await.unwrap());
    assert!(!b.has_signal_state_for_user("15551234567").await.unwrap());
}

async fn prekeys(b: Arc<dyn Backend>) {
    assert_eq!(b.get_max_prekey_id().await.unwrap(), 0);
    assert_eq!(b.load_prekey(1).await.unwrap(), None);

    b.store_prekey(5, b"five", false).await.unwrap();
    assert_eq!(b.load_prekey(5).await.unwrap(), Some(Bytes::from_static(b"five")));

    let batch: Vec<(u32, Bytes)> = (40..=45).map(|id| (id, Bytes::from(format!("key-{id}")))).collect();
    b.store_prekeys_batch(&batch, false).await.unwrap();
    b.store_prekey(1000, b"thousand", true).await.unwrap();
    // Numeric maximum, not the lexicographic one ("45" > "1000").
    assert_eq!(b.get_max_prekey_id().await.unwrap(), 1000);

    let loaded = b.load_prekeys_batch(&[5, 41, 44, 99, 1000]).await.unwrap();
    let loaded: HashMap<u32, Bytes> = loaded.into_iter().collect();
    assert_eq!(loaded.len(), 4);
    assert_eq!(loaded[&41], Bytes::from("key-41"));
    assert_eq!(loaded[&1000], Bytes::from_static(b"thousand"));
    assert!(b.load_prekeys_batch(&[]).await.unwrap().is_empty());

    b.remove_prekey(41).await.unwrap();
    // Marking uploaded must not bring back a key consumed meanwhile.
    b.mark_prekeys_uploaded(&[40, 41, 42]).await.unwrap();
    assert_eq!(b.load_prekey(41).await.unwrap(), None);
    assert_eq!(b.load_prekey(40).await.unwrap(), Some(Bytes::from("key-40")));

    b.remove_prekey(1000).await.unwrap();
    assert_eq!(b.get_max_prekey_id().await.unwrap(), 45);
}

async fn signed_prekeys(b: Arc<dyn Backend>) {
    assert!(b.load_all_signed_prekeys().await.unwrap().is_empty());
    b.store_signed_prekey(1, b"one").await.unwrap();
    b.store_signed_prekey(12, b"twelve").await.unwrap();
    b.store_signed_prekey(1, b"one-again").await.unwrap();
    assert_eq!(b.load_signed_prekey(1).await.unwrap(), Some(b"one-again".to_vec()));
    assert_eq!(b.load_signed_prekey(2).await.unwrap(), None);
    assert_eq!(
        sorted(b.load_all_signed_prekeys().await.unwrap()),
        vec![(1, b"one-again".to_vec()), (12, b"twelve".to_vec())]
    );
    b.remove_signed_prekey(1).await.unwrap();
    assert_eq!(b.load_all_signed_prekeys().await.unwrap(), vec![(12, b"twelve".to_vec())]);
}

async fn sender_keys(b: Arc<dyn Backend>) {
    let name = "120363021033254949@g.us::15551234567::0";
    assert_eq!(b.get_sender_key(name).await.unwrap(), None);
    b.put_sender_key(name, b"sk-1").await.unwrap();
    assert_eq!(b.get_sender_key(name).await.unwrap(), Some(b"sk-1".to_vec()));
    b.put_sender_keys_batch(&[
        (Arc::from(name), Bytes::from_static(b"sk-2")),
        (Arc::from("other"), Bytes::from_static(b"sk-3")),
    ])
    .await
    .unwrap();
    assert_eq!(b.get_sender_key(name).await.unwrap(), Some(b"sk-2".to_vec()));
    assert_eq!(b.get_sender_key("other").await.unwrap(), Some(b"sk-3".to_vec()));
    b.delete_sender_key(name).await.unwrap();
    assert_eq!(b.get_sender_key(name).await.unwrap(), None);
}

async fn app_state_keys(b: Arc<dyn Backend>) {
    assert!(b.get_sync_key(&[1, 2, 3]).await.unwrap().is_none());
    assert_eq!(b.get_latest_sync_key_id().await.unwrap(), None);

    let key = |n: u8| AppStateSyncKey {
        key_data: vec![n; 32],
        fingerprint: vec![n, 0, n],
        timestamp: 1_700_000_000 + i64::from(n),
    };
    b.set_sync_key(&[0, 0, 0, 1], key(1)).await.unwrap();
    b.set_sync_key(&[0, 0, 0, 2], key(2)).await.unwrap();
    let loaded = b.get_sync_key(&[0, 0, 0, 1]).await.unwrap().unwrap();
    assert_eq!((loaded.key_data, loaded.fingerprint, loaded.timestamp), (vec![1; 32], vec![1, 0, 1], 1_700_000_001));
    assert_eq!(b.get_latest_sync_key_id().await.unwrap(), Some(vec![0, 0, 0, 2]));

    // "Latest" is the key stored last, not the largest id.
    b.set_sync_key(&[0, 0, 0, 1], key(3)).await.unwrap();
    assert_eq!(b.get_latest_sync_key_id().await.unwrap(), Some(vec![0, 0, 0, 1]));
    assert_eq!(b.get_sync_key(&[0, 0, 0, 1]).await.unwrap().unwrap().key_data, vec![3; 32]);
}

async fn app_state_versions(b: Arc<dyn Backend>) {
    let absent = b.get_version("regular_high").await.unwrap();
    assert_eq!(absent.version, 0);
    assert_eq!(absent.hash, [0; 128]);
    assert!(absent.index_value_map.is_empty());

    let mut hash = [0u8; 128];
    hash.iter_mut().enumerate().for_each(|(i, byte)| *byte = u8::try_from(i).unwrap());
    let state = HashState {
        version: 42,
        hash,
        index_value_map: HashMap::from([("aW5kZXg=".to_owned(), vec![9; 32]), ("b3RoZXI=".to_owned(), vec![])]),
        mac_mismatch_fatal: true,
    };
    b.set_version("regular_high", state).await.unwrap();
    let loaded = b.get_version("regular_high").await.unwrap();
    assert_eq!(loaded.version, 42);
    assert_eq!(loaded.hash, hash);
    assert_eq!(loaded.index_value_map.len(), 2);
    assert_eq!(loaded.index_value_map["aW5kZXg="], vec![9; 32]);
    assert!(loaded.mac_mismatch_fatal);
    assert_eq!(b.get_version("critical_block").await.unwrap().version, 0);
}

async fn mutation_macs(b: Arc<dyn Backend>) {
    let mac = |index: u8, value: u8| AppStateMutationMAC { index_mac: vec![index; 32], value_mac: vec![value; 32] };
    b.put_mutation_macs("regular", 3, &[mac(1, 11), mac(2, 12), mac(3, 13)]).await.unwrap();
    b.put_mutation_macs("critical_block", 1, &[mac(1, 21)]).await.unwrap();

    assert_eq!(b.get_mutation_mac("regular", &[1; 32]).await.unwrap(), Some(vec![11; 32]));
    assert_eq!(b.get_mutation_mac("critical_block", &[1; 32]).await.unwrap(), Some(vec![21; 32]));
    assert_eq!(b.get_mutation_mac("regular", &[9; 32]).await.unwrap(), None);

    let many = b.get_mutation_macs("regular", &[[1; 32], [3; 32], [9; 32]]).await.unwrap();
    assert_eq!(many.len(), 2);
    assert_eq!(many[&[3; 32]], vec![13; 32]);

    b.put_mutation_macs("regular", 4, &[mac(1, 31)]).await.unwrap();
    assert_eq!(b.get_mutation_mac("regular", &[1; 32]).await.unwrap(), Some(vec![31; 32]));

    b.delete_mutation_macs("regular", &[vec![2; 32]]).await.unwrap();
    assert_eq!(b.get_mutation_mac("regular", &[2; 32]).await.unwrap(), None);

    b.clear_mutation_macs("regular").await.unwrap();
    assert!(b.get_mutation_macs("regular", &[[1; 32], [3; 32]]).await.unwrap().is_empty());
    // Only the named collection.
    assert_eq!(b.get_mutation_mac("critical_block", &[1; 32]).await.unwrap(), Some(vec![21; 32]));
}

fn mapping(lid: &str, phone: &str, updated_at: i64) -> LidPnMappingEntry {
    LidPnMappingEntry {
        lid: lid.into(),
        phone_number: phone.into(),
        created_at: 1_700_000_000,
        updated_at,
        learning_source: "usync".into(),
    }
}

async fn lid_mappings(b: Arc<dyn Backend>) {
    assert!(b.get_lid_mapping("100000000000001").await.unwrap().is_none());
    assert!(b.get_pn_mapping("15551234567").await.unwrap().is_none());
    assert!(b.get_all_lid_mappings().await.unwrap().is_empty());

    b.put_lid_mapping(&mapping("100000000000001", "15551234567", 10)).await.unwrap();
    let by_lid = b.get_lid_mapping("100000000000001").await.unwrap().unwrap();
    assert_eq!(
        (by_lid.phone_number.as_str(), by_lid.updated_at, by_lid.learning_source.as_str()),
        ("15551234567", 10, "usync")
    );
    assert_eq!(b.get_pn_mapping("15551234567").await.unwrap().unwrap().lid, "100000000000001");

    // The LID moves to a new number: the old number no longer resolves.
    b.put_lid_mapping(&mapping("100000000000001", "15559999999", 20)).await.unwrap();
    assert!(b.get_pn_mapping("15551234567").await.unwrap().is_none());
    assert_eq!(b.get_pn_mapping("15559999999").await.unwrap().unwrap().lid, "100000000000001");

    b.put_lid_mappings(&[mapping("100000000000002", "15550000002", 30), mapping("100000000000003", "15550000003", 30)])
        .await
        .unwrap();
    assert_eq!(b.get_pn_mapping("15550000003").await.unwrap().unwrap().lid, "100000000000003");
    let all = sorted(b.get_all_lid_mappings().await.unwrap().into_iter().map(|m| (m.lid, m.phone_number)).collect());
    assert_eq!(
        all,
        vec![
            ("100000000000001".to_owned(), "15559999999".to_owned()),
            ("100000000000002".to_owned(), "15550000002".to_owned()),
            ("100000000000003".to_owned(), "15550000003".to_owned()),
        ]
    );
}

async fn sender_key_devices(b: Arc<dyn Backend>) {
    let group = "120363021033254949@g.us";
    let other = "120363000000000001@g.us";
    assert!(b.get_sender_key_devices(group).await.unwrap().is_empty());

    b.set_sender_key_status(group, &[("15551111111:0@s.whatsapp.net", true), ("15552222222:3@s.whatsapp.net", false)])
        .await
        .unwrap();
    b.set_sender_key_status(other, &[("15551111111:0@s.whatsapp.net", true)]).await.unwrap();
    b.set_sender_key_status(group, &[("15552222222:3@s.whatsapp.net", true)]).await.unwrap();
    assert_eq!(
        sorted(b.get_sender_key_devices(group).await.unwrap()),
        vec![("15551111111:0@s.whatsapp.net".to_owned(), true), ("15552222222:3@s.whatsapp.net".to_owned(), true)]
    );

    // By device, across groups.
    b.delete_sender_key_device_rows(&["15551111111:0@s.whatsapp.net"]).await.unwrap();
    assert_eq!(b.get_sender_key_devices(group).await.unwrap(), vec![("15552222222:3@s.whatsapp.net".to_owned(), true)]);
    assert!(b.get_sender_key_devices(other).await.unwrap().is_empty());

    b.set_sender_key_status(other, &[("15553333333:0@s.whatsapp.net", false)]).await.unwrap();
    b.clear_sender_key_devices(group).await.unwrap();
    assert!(b.get_sender_key_devices(group).await.unwrap().is_empty());
    assert_eq!(b.get_sender_key_devices(other).await.unwrap().len(), 1);

    b.clear_all_sender_key_devices().await.unwrap();
    assert!(b.get_sender_key_devices(other).await.unwrap().is_empty());
}

async fn base_keys(b: Arc<dyn Backend>) {
    let address = "15551234567:1@s.whatsapp.net";
    assert!(!b.has_same_base_key(address, "3EB0A", b"base").await.unwrap());
    b.save_base_key(address, "3EB0A", b"base").await.unwrap();
    assert!(b.has_same_base_key(address, "3EB0A", b"base").await.unwrap());
    assert!(!b.has_same_base_key(address, "3EB0A", b"other").await.unwrap());
    assert!(!b.has_same_base_key(address, "3EB0B", b"base").await.unwrap());
    b.delete_base_key(address, "3EB0A").await.unwrap();
    assert!(!b.has_same_base_key(address, "3EB0A", b"base").await.unwrap());
}

fn device_list(user: &str, devices: &[u32]) -> DeviceListRecord {
    DeviceListRecord {
        user: user.into(),
        devices: devices.iter().map(|id| DeviceInfo::new(*id, Some(*id + 1)).with_hosting(*id == 99)).collect(),
        timestamp: 1_700_000_000,
        phash: Some("2:abc".into()),
        raw_id: Some(7),
    }
}

async fn device_lists(b: Arc<dyn Backend>) {
    assert!(b.get_devices("15551234567").await.unwrap().is_none());
    b.update_device_list(device_list("15551234567", &[0, 3])).await.unwrap();
    let loaded = b.get_devices("15551234567").await.unwrap().unwrap();
    assert_eq!(
        serde_json::to_value(&loaded).unwrap(),
        serde_json::to_value(device_list("15551234567", &[0, 3])).unwrap()
    );

    b.update_device_lists(vec![device_list("15551234567", &[0, 99]), device_list("100000000000001", &[0])])
        .await
        .unwrap();
    let loaded = b.get_devices("15551234567").await.unwrap().unwrap();
    assert_eq!(loaded.devices.len(), 2);
    assert!(loaded.devices[1].is_hosted);
    assert!(b.get_devices("100000000000001").await.unwrap().is_some());

    b.delete_devices("15551234567").await.unwrap();
    assert!(b.get_devices("15551234567").await.unwrap().is_none());
}

async fn group_metadata(b: Arc<dyn Backend>) {
    let group = "120363021033254949@g.us";
    assert_eq!(b.get_group_metadata(group).await.unwrap(), None);
    b.put_group_metadata(group, &[1, 2, 3]).await.unwrap();
    assert_eq!(b.get_group_metadata(group).await.unwrap(), Some(vec![1, 2, 3]));
    b.delete_group_metadata(group).await.unwrap();
    assert_eq!(b.get_group_metadata(group).await.unwrap(), None);
}

async fn tc_tokens(b: Arc<dyn Backend>) {
    let jid = "100000000000001@lid";
    assert!(b.get_tc_token(jid).await.unwrap().is_none());

    // A sender timestamp on a missing row makes a byte-less placeholder.
    b.touch_tc_token_sender_timestamp(jid, 100).await.unwrap();
    let entry = b.get_tc_token(jid).await.unwrap().unwrap();
    assert!(entry.token.is_empty());
    assert_eq!(entry.sender_timestamp, Some(100));

    // A received token fills it and keeps the sender timestamp.
    b.store_received_tc_token(jid, b"token-1", 200).await.unwrap();
    let entry = b.get_tc_token(jid).await.unwrap().unwrap();
    assert_eq!(
        (entry.token.as_slice(), entry.token_timestamp, entry.sender_timestamp),
        (&b"token-1"[..], 200, Some(100))
    );

    // An older token does not replace a newer one; the sender timestamp only moves forward.
    b.store_received_tc_token(jid, b"stale", 150).await.unwrap();
    b.touch_tc_token_sender_timestamp(jid, 50).await.unwrap();
    let entry = b.get_tc_token(jid).await.unwrap().unwrap();
    assert_eq!((entry.token.as_slice(), entry.sender_timestamp), (&b"token-1"[..], Some(100)));
    b.touch_tc_token_sender_timestamp(jid, 300).await.unwrap();
    assert_eq!(b.get_tc_token(jid).await.unwrap().unwrap().sender_timestamp, Some(300));

    b.put_tc_token(
        "15551234567@s.whatsapp.net",
        &TcTokenEntry { token: vec![7], token_timestamp: 10, sender_timestamp: None },
    )
    .await
    .unwrap();
    assert_eq!(
        sorted(b.get_all_tc_token_jids().await.unwrap()),
        vec!["100000000000001@lid".to_owned(), "15551234567@s.whatsapp.net".to_owned()]
    );

    // Only rows with neither a live token nor a live sender bucket go.
    assert_eq!(b.delete_expired_tc_tokens(100, 200).await.unwrap(), 1);
    assert!(b.get_tc_token("15551234567@s.whatsapp.net").await.unwrap().is_none());
    assert!(b.get_tc_token(jid).await.unwrap().is_some());

    b.delete_tc_token(jid).await.unwrap();
    assert!(b.get_tc_token(jid).await.unwrap().is_none());
}

async fn sent_messages(b: Arc<dyn Backend>) {
    let chat = "15551234567@s.whatsapp.net";
    assert_eq!(b.take_sent_message(chat, "3EB0A").await.unwrap(), None);
    b.store_sent_message(chat, "3EB0A", b"payload-a").await.unwrap();
    b.store_sent_message(chat, "3EB0B", b"payload-b").await.unwrap();

    // Taking consumes.
    assert_eq!(b.take_sent_message(chat, "3EB0A").await.unwrap(), Some(b"payload-a".to_vec()));
    assert_eq!(b.take_sent_message(chat, "3EB0A").await.unwrap(), None);

    assert_eq!(b.delete_expired_sent_messages(now() - 3600).await.unwrap(), 0);
    assert_eq!(b.delete_expired_sent_messages(now() + 10).await.unwrap(), 1);
    assert_eq!(b.take_sent_message(chat, "3EB0B").await.unwrap(), None);
}

async fn pending_inbound(b: Arc<dyn Backend>) {
    let (chat, sender) = ("120363021033254949@g.us", "15551234567@s.whatsapp.net");
    assert_eq!(b.get_pending_inbound(chat, sender, "m1").await.unwrap(), None);
    b.store_pending_inbound(chat, sender, "m1", b"one").await.unwrap();
    assert_eq!(b.get_pending_inbound(chat, sender, "m1").await.unwrap(), Some(b"one".to_vec()));
    // Keyed by all three parts.
    assert_eq!(b.get_pending_inbound(chat, "15550000000@s.whatsapp.net", "m1").await.unwrap(), None);

    b.store_pending_inbound_batch(&[
        PendingInboundRow { chat, sender, id: "m2", message: b"two" },
        PendingInboundRow { chat, sender, id: "m3", message: b"three" },
    ])
    .await
    .unwrap();
    assert_eq!(b.get_pending_inbound(chat, sender, "m3").await.unwrap(), Some(b"three".to_vec()));

    b.delete_pending_inbound(chat, sender, "m1").await.unwrap();
    b.delete_pending_inbound_batch(&[PendingInboundKey { chat, sender, id: "m2" }]).await.unwrap();
    assert_eq!(b.get_pending_inbound(chat, sender, "m1").await.unwrap(), None);
    assert_eq!(b.get_pending_inbound(chat, sender, "m2").await.unwrap(), None);

    assert_eq!(b.delete_expired_pending_inbound(now() - 3600).await.unwrap(), 0);
    assert_eq!(b.delete_expired_pending_inbound(now() + 10).await.unwrap(), 1);
    assert_eq!(b.get_pending_inbound(chat, sender, "m3").await.unwrap(), None);
}

fn secret(chat: &str, sender: &str, id: &str, byte: u8, expires_at: i64, message_ts: i64) -> MsgSecretEntry {
    MsgSecretEntry {
        chat: Arc::from(chat),
        sender: Arc::from(sender),
        msg_id: Arc::from(id),
        secret: [byte; 32],
        expires_at,
        message_ts,
    }
}

async fn msg_secrets(b: Arc<dyn Backend>) {
    let (chat, me) = ("15551234567@s.whatsapp.net", "15550000000@s.whatsapp.net");
    assert_eq!(b.get_msg_secret(chat, me, "m1").await.unwrap(), None);

    b.put_msg_secret(chat, me, "forever", &[9; 32]).await.unwrap();
    assert_eq!(
        b.put_msg_secrets(vec![secret(chat, me, "m1", 1, 100, 5), secret(chat, chat, "m1", 2, 120, 6)]).await.unwrap(),
        2
    );
    assert_eq!(b.get_msg_secret_with_ts(chat, me, "m1").await.unwrap(), Some((vec![1; 32], 5)));
    assert_eq!(b.get_msg_secret(chat, chat, "m1").await.unwrap(), Some(vec![2; 32]));

    // A later write merges: the newer secret, the later deadline, a known message time kept.
    b.put_msg_secrets(vec![secret(chat, me, "m1", 3, 200, 0)]).await.unwrap();
    assert_eq!(b.get_msg_secret_with_ts(chat, me, "m1").await.unwrap(), Some((vec![3; 32], 5)));

    // Deadlines at or before the cutoff go; 0 means never.
    assert_eq!(b.delete_expired_msg_secrets(150).await.unwrap(), 1);
    assert_eq!(b.get_msg_secret(chat, chat, "m1").await.unwrap(), None);
    assert!(b.get_msg_secret(chat, me, "m1").await.unwrap().is_some());
    assert_eq!(b.delete_expired_msg_secrets(200).await.unwrap(), 1);
    assert_eq!(b.get_msg_secret(chat, me, "forever").await.unwrap(), Some(vec![9; 32]));
}

async fn device_roundtrip(b: Arc<dyn Backend>) {
    assert!(!b.exists().await.unwrap());
    assert!(b.load().await.unwrap().is_none());

    b.create().await.unwrap();
    assert!(b.exists().await.unwrap());
    let created = b.load().await.unwrap().unwrap();
    // Creating again keeps the device.
    b.create().await.unwrap();
    let again = b.load().await.unwrap().unwrap();
    assert_eq!(serde_json::to_value(&again).unwrap(), serde_json::to_value(&created).unwrap());

    let mut device = created;
    device.pn = Some("15551234567:7@s.whatsapp.net".parse().unwrap());
    device.lid = Some("100000000000001:7@lid".parse().unwrap());
    device.push_name = "Anna Test".into();
    device.next_pre_key_id = 813;
    device.login_counter = 4;
    device.edge_routing_info = Some(vec![8, 1, 8]);
    b.save(&device).await.unwrap();

    let loaded = b.load().await.unwrap().unwrap();
    assert_eq!(serde_json::to_value(&loaded).unwrap(), serde_json::to_value(&device).unwrap());
    assert_eq!(loaded.registration_id, device.registration_id);
    assert_eq!(loaded.adv_secret_key, device.adv_secret_key);
    // Skipped by serde: must come back as the library default, not empty.
    assert_eq!(loaded.device_props.os, DEVICE_PROPS.os);
    assert_eq!(loaded.device_props.platform_type, DEVICE_PROPS.platform_type);
    assert!(loaded.device_props.os.is_some());
}

// ---------------------------------------------------------------------------------------------
// database-only cases

async fn populate(b: &Arc<dyn Backend>) {
    b.create().await.unwrap();
    b.put_identity("15551234567@s.whatsapp.net", [1; 32]).await.unwrap();
    b.put_session("15551234567:1@s.whatsapp.net", b"session").await.unwrap();
    b.store_prekey(1, b"prekey", false).await.unwrap();
    b.set_sync_key(&[1], AppStateSyncKey { key_data: vec![1], fingerprint: vec![], timestamp: 1 }).await.unwrap();
    b.put_lid_mapping(&mapping("100000000000001", "15551234567", 1)).await.unwrap();
}

async fn wipe_removes_everything(store: Arc<dyn Store>) {
    let session = new_session();
    let keys: Arc<dyn DeviceKeyStore> = store.clone();
    let db = DbBackend::new(keys, session);
    let b = db_backend(&store, session);
    populate(&b).await;
    assert!(b.exists().await.unwrap());

    db.wipe().await.unwrap();
    assert!(!b.exists().await.unwrap());
    assert!(b.load().await.unwrap().is_none());
    assert_eq!(b.load_identity("15551234567@s.whatsapp.net").await.unwrap(), None);
    assert_eq!(b.get_session("15551234567:1@s.whatsapp.net").await.unwrap(), None);
    assert_eq!(b.load_prekey(1).await.unwrap(), None);
    assert_eq!(b.get_latest_sync_key_id().await.unwrap(), None);
    assert!(b.get_all_lid_mappings().await.unwrap().is_empty());
    assert!(b.get_pn_mapping("15551234567").await.unwrap().is_none());
}

async fn sessions_are_isolated(store: Arc<dyn Store>) {
    let first = db_backend(&store, new_session());
    let second = db_backend(&store, new_session());
    populate(&first).await;
    assert!(!second.exists().await.unwrap());
    assert_eq!(second.load_identity("15551234567@s.whatsapp.net").await.unwrap(), None);
    assert_eq!(second.get_max_prekey_id().await.unwrap(), 0);
    assert!(second.get_all_lid_mappings().await.unwrap().is_empty());
    second.create().await.unwrap();
    let (a, b) = (first.load().await.unwrap().unwrap(), second.load().await.unwrap().unwrap());
    assert_ne!(a.registration_id, b.registration_id);
}

async fn other_drivers_documents_are_ignored(store: Arc<dyn Store>) {
    let session = new_session();
    let simulated = json!({"driver": "simulator", "phone": "15551234567"});
    store.save_creds(session.session_id, session.tenant_id, &simulated).await.unwrap();
    let b = db_backend(&store, session);
    assert!(!b.exists().await.unwrap());
    assert!(b.load().await.unwrap().is_none());
    // Connecting with this driver replaces it with a fresh device.
    b.create().await.unwrap();
    assert!(b.exists().await.unwrap());
    assert!(b.load().await.unwrap().is_some());
}

async fn is_paired_follows_the_device(store: Arc<dyn Store>) {
    let session = new_session();
    let keys: Arc<dyn DeviceKeyStore> = store.clone();
    let driver = WhatsAppDriver::new(keys, WhatsAppConfig::default());
    assert!(!driver.is_paired(session).await.unwrap());

    let mut device = Device::new();
    store.save_creds(session.session_id, session.tenant_id, &device_to_creds(&device).unwrap()).await.unwrap();
    assert!(!driver.is_paired(session).await.unwrap(), "a device without an account is not paired");

    device.pn = Some("15551234567:7@s.whatsapp.net".parse().unwrap());
    store.save_creds(session.session_id, session.tenant_id, &device_to_creds(&device).unwrap()).await.unwrap();
    store
        .set_keys(session.session_id, session.tenant_id, &[KeyChange::put("session", "x", json!("AA=="))])
        .await
        .unwrap();
    assert!(driver.is_paired(session).await.unwrap());

    driver.wipe(session).await.unwrap();
    assert!(!driver.is_paired(session).await.unwrap());
    assert!(store.list_keys(session.session_id, "session").await.unwrap().is_empty());
}
