//! whatsapp-rust's storage traits over anna's generic device-key store.
//!
//! Every piece of state the library persists becomes one typed key of the session
//! (`session_auth_keys`), except the device itself, which is the session's credentials document
//! (`session_auth_creds`). Binary material is stored as base64 strings; structured records as
//! JSON objects. Composite keys join their parts with `|`, which no JID, message id or
//! collection name contains.
//!
//! The key/value trait offers point reads and writes, a scan of one key type and a
//! transactional batch. What it lacks, and how this file copes:
//! - prefix and range queries (a group's sender-key devices, a collection's MACs, the largest
//!   pre-key id, expiry sweeps) scan the key type and filter here. These run at connect, on
//!   keepalive sweeps or on rare protocol events, and the scanned sets are small per session;
//! - compare-and-set (tc-token merges, message-secret merges, the atomic take of a sent
//!   message, the LID→PN reverse index) is done as read-then-write under an in-process lock.
//!   That is atomic because only one live client per session exists at a time (the sessions
//!   worker holds a lease), and all its writes go through this one backend instance.

use std::collections::HashMap;
use std::sync::Arc;

use anna_store::{DeviceKeyStore, KeyChange};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::client_profile::ClientProfile;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::device::DEVICE_PROPS;
use whatsapp_rust::wacore::store::error::{Result, StoreError as WaStoreError};
use whatsapp_rust::wacore::store::traits::{
    AppStateSyncKey, AppSyncStore, DeviceListRecord, DeviceStore, LidPnMappingEntry, MsgSecretEntry, MsgSecretStore,
    PendingInboundKey, PendingInboundRow, ProtocolStore, SignalStore, TcTokenEntry, merge_msg_secret_expiry,
    merge_msg_secret_message_ts,
};

use crate::SessionKey;

/// Key types in `session_auth_keys`. Public so operators and tests can name them.
pub mod key_types {
    pub const IDENTITY: &str = "identity";
    pub const SESSION: &str = "session";
    pub const PREKEY: &str = "prekey";
    pub const SIGNED_PREKEY: &str = "signed_prekey";
    pub const SENDER_KEY: &str = "sender_key";
    pub const APP_STATE_KEY: &str = "app_state_key";
    /// One row, `latest`: the id of the app-state key stored last.
    pub const APP_STATE_KEY_LATEST: &str = "app_state_key_latest";
    pub const APP_STATE_VERSION: &str = "app_state_version";
    pub const APP_STATE_MUTATION_MAC: &str = "app_state_mutation_mac";
    pub const SENDER_KEY_DEVICE: &str = "sender_key_device";
    pub const LID_MAPPING: &str = "lid_mapping";
    /// Reverse index of `lid_mapping`: phone number → LID.
    pub const PN_MAPPING: &str = "pn_mapping";
    pub const BASE_KEY: &str = "base_key";
    pub const DEVICE_LIST: &str = "device_list";
    pub const GROUP_METADATA: &str = "group_metadata";
    pub const TC_TOKEN: &str = "tc_token";
    pub const SENT_MESSAGE: &str = "sent_message";
    pub const PENDING_INBOUND: &str = "pending_inbound";
    pub const MSG_SECRET: &str = "msg_secret";
}

use key_types as kt;

/// Marks a credentials document as a whatsapp-rust device, so a document written by another
/// driver (the simulator keeps its device in the same table) is never read as one.
const DRIVER_TAG: &str = "whatsapp-rust";
const LATEST_ID: &str = "latest";

/// whatsapp-rust's `Backend` for one session, on top of [`DeviceKeyStore`].
pub struct DbBackend {
    store: Arc<dyn DeviceKeyStore>,
    session: SessionKey,
    /// Serialises the read-modify-write paths (see the module comment).
    rmw: Mutex<()>,
}

impl DbBackend {
    pub fn new(store: Arc<dyn DeviceKeyStore>, session: SessionKey) -> Self {
        Self { store, session, rmw: Mutex::new(()) }
    }

    pub fn session(&self) -> SessionKey {
        self.session
    }

    /// Deletes the device and every key of the session. Only safe once no client runs on this
    /// session: a live client's write-behind flush would recreate rows.
    pub async fn wipe(&self) -> Result<()> {
        self.store.wipe_device(self.session.session_id).await.map_err(db)
    }

    async fn get(&self, key_type: &str, key_id: &str) -> Result<Option<Value>> {
        let mut found =
            self.store.get_keys(self.session.session_id, key_type, &[key_id.to_owned()]).await.map_err(db)?;
        Ok(found.pop().map(|(_, value)| value))
    }

    async fn get_many(&self, key_type: &str, key_ids: &[String]) -> Result<HashMap<String, Value>> {
        if key_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let found = self.store.get_keys(self.session.session_id, key_type, key_ids).await.map_err(db)?;
        Ok(found.into_iter().collect())
    }

    async fn list(&self, key_type: &str) -> Result<Vec<(String, Value)>> {
        self.store.list_keys(self.session.session_id, key_type).await.map_err(db)
    }

    async fn apply(&self, changes: &[KeyChange]) -> Result<()> {
        self.store.set_keys(self.session.session_id, self.session.tenant_id, changes).await.map_err(db)
    }

    async fn put(&self, key_type: &str, key_id: &str, value: Value) -> Result<()> {
        self.apply(&[KeyChange::put(key_type, key_id, value)]).await
    }

    async fn delete(&self, key_type: &str, key_id: &str) -> Result<()> {
        self.apply(&[KeyChange::delete(key_type, key_id)]).await
    }

    async fn get_bytes(&self, key_type: &str, key_id: &str) -> Result<Option<Vec<u8>>> {
        self.get(key_type, key_id).await?.map(|value| decode_bytes(&value)).transpose()
    }

    async fn get_record<T: for<'de> Deserialize<'de>>(&self, key_type: &str, key_id: &str) -> Result<Option<T>> {
        self.get(key_type, key_id).await?.map(from_json).transpose()
    }
}

// ---------------------------------------------------------------------------------------------
// encoding

fn db(error: anna_store::StoreError) -> WaStoreError {
    WaStoreError::Database(Box::new(error))
}

fn serialization(error: impl std::error::Error + Send + Sync + 'static) -> WaStoreError {
    WaStoreError::Serialization(Box::new(error))
}

fn b64(bytes: &[u8]) -> Value {
    Value::String(B64.encode(bytes))
}

fn decode_b64(text: &str) -> Result<Vec<u8>> {
    B64.decode(text).map_err(serialization)
}

fn decode_bytes(value: &Value) -> Result<Vec<u8>> {
    match value {
        Value::String(text) => decode_b64(text),
        other => Err(WaStoreError::Validation(format!("expected a base64 string, found {}", json_kind(other)))),
    }
}

fn decode_array<const N: usize>(value: &Value) -> Result<[u8; N]> {
    let bytes = decode_bytes(value)?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| WaStoreError::Validation(format!("expected {N} bytes, found {len}")))
}

fn to_json<T: Serialize>(value: &T) -> Result<Value> {
    serde_json::to_value(value).map_err(serialization)
}

fn from_json<T: for<'de> Deserialize<'de>>(value: Value) -> Result<T> {
    serde_json::from_value(value).map_err(serialization)
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Zero-padded so that the store's ordering by key id is numeric order.
fn prekey_id(id: u32) -> String {
    format!("{id:010}")
}

fn parse_prekey_id(key_id: &str) -> Result<u32> {
    key_id.parse().map_err(|_| WaStoreError::Validation(format!("invalid pre-key id {key_id:?}")))
}

fn join2(a: &str, b: &str) -> String {
    format!("{a}|{b}")
}

fn join3(a: &str, b: &str, c: &str) -> String {
    format!("{a}|{b}|{c}")
}

fn hex_key(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `AppStateSyncKey` with its byte fields as base64 (serde would write arrays of numbers).
#[derive(Serialize, Deserialize)]
struct StoredSyncKey {
    key_data: String,
    fingerprint: String,
    timestamp: i64,
}

/// `HashState` with its byte fields as base64: the index map of a busy collection holds
/// thousands of MACs, which serde would write as arrays of numbers.
#[derive(Serialize, Deserialize)]
struct StoredHashState {
    version: u64,
    hash: String,
    index_value_map: HashMap<String, String>,
    #[serde(default)]
    mac_mismatch_fatal: bool,
}

impl StoredHashState {
    fn from_state(state: &HashState) -> Self {
        Self {
            version: state.version,
            hash: B64.encode(state.hash),
            index_value_map: state.index_value_map.iter().map(|(k, v)| (k.clone(), B64.encode(v))).collect(),
            mac_mismatch_fatal: state.mac_mismatch_fatal,
        }
    }

    fn into_state(self) -> Result<HashState> {
        let hash = decode_b64(&self.hash)?;
        let len = hash.len();
        let hash: [u8; 128] =
            hash.try_into().map_err(|_| WaStoreError::Validation(format!("app-state hash has {len} bytes")))?;
        let mut index_value_map = HashMap::with_capacity(self.index_value_map.len());
        for (k, v) in self.index_value_map {
            index_value_map.insert(k, decode_b64(&v)?);
        }
        Ok(HashState { version: self.version, hash, index_value_map, mac_mismatch_fatal: self.mac_mismatch_fatal })
    }
}

#[derive(Serialize, Deserialize)]
struct StoredTcToken {
    token: String,
    token_timestamp: i64,
    sender_timestamp: Option<i64>,
}

impl StoredTcToken {
    fn from_entry(entry: &TcTokenEntry) -> Self {
        Self {
            token: B64.encode(&entry.token),
            token_timestamp: entry.token_timestamp,
            sender_timestamp: entry.sender_timestamp,
        }
    }

    fn into_entry(self) -> Result<TcTokenEntry> {
        Ok(TcTokenEntry {
            token: decode_b64(&self.token)?,
            token_timestamp: self.token_timestamp,
            sender_timestamp: self.sender_timestamp,
        })
    }
}

/// A payload with the time it was written (unix seconds), for the expiry sweeps.
#[derive(Serialize, Deserialize)]
struct Timestamped {
    data: String,
    at: i64,
}

#[derive(Serialize, Deserialize)]
struct StoredMsgSecret {
    secret: String,
    expires_at: i64,
    message_ts: i64,
}

#[derive(Serialize, Deserialize)]
struct StoredMutationMac {
    value_mac: String,
    version: u64,
}

/// The credentials document: the device under a tag naming the driver that wrote it.
#[derive(Serialize, Deserialize)]
struct StoredDevice {
    driver: String,
    device: Value,
}

/// Whether a credentials document holds a paired whatsapp-rust device (one with an account
/// JID), without decoding the keys.
pub(crate) fn creds_are_paired(creds: &Value) -> bool {
    is_ours(creds) && creds.get("device").and_then(|device| device.get("pn")).is_some_and(|pn| !pn.is_null())
}

fn is_ours(creds: &Value) -> bool {
    creds.get("driver").and_then(Value::as_str) == Some(DRIVER_TAG)
}

/// Encodes a device as anna's credentials document.
pub fn device_to_creds(device: &Device) -> Result<Value> {
    to_json(&StoredDevice { driver: DRIVER_TAG.to_owned(), device: to_json(device)? })
}

/// Decodes a credentials document; `None` when it was written by another driver.
pub fn device_from_creds(creds: Value) -> Result<Option<Device>> {
    if !is_ours(&creds) {
        return Ok(None);
    }
    let stored: StoredDevice = from_json(creds)?;
    let mut device: Device = from_json(stored.device)?;
    // These fields are `#[serde(skip)]`: deserialising leaves an empty DeviceProps (no OS, no
    // platform) instead of the library default, which would change the pairing payload and
    // the QR's client type. The builder's device-props override is applied on top later.
    device.device_props = Arc::new(DEVICE_PROPS.clone());
    device.client_profile = ClientProfile::web();
    Ok(Some(device))
}

// ---------------------------------------------------------------------------------------------
// SignalStore

#[async_trait::async_trait]
impl SignalStore for DbBackend {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> Result<()> {
        self.put(kt::IDENTITY, address, b64(&key)).await
    }

    async fn put_identities_batch(&self, identities: &[(Arc<str>, [u8; 32])]) -> Result<()> {
        let changes: Vec<KeyChange> =
            identities.iter().map(|(address, key)| KeyChange::put(kt::IDENTITY, &**address, b64(key))).collect();
        self.apply(&changes).await
    }

    async fn load_identity(&self, address: &str) -> Result<Option<[u8; 32]>> {
        self.get(kt::IDENTITY, address).await?.map(|value| decode_array::<32>(&value)).transpose()
    }

    async fn delete_identity(&self, address: &str) -> Result<()> {
        self.delete(kt::IDENTITY, address).await
    }

    async fn get_session(&self, address: &str) -> Result<Option<Bytes>> {
        Ok(self.get_bytes(kt::SESSION, address).await?.map(Bytes::from))
    }

    async fn put_session(&self, address: &str, session: &[u8]) -> Result<()> {
        self.put(kt::SESSION, address, b64(session)).await
    }

    async fn put_sessions_batch(&self, sessions: &[(Arc<str>, Bytes)]) -> Result<()> {
        let changes: Vec<KeyChange> =
            sessions.iter().map(|(address, record)| KeyChange::put(kt::SESSION, &**address, b64(record))).collect();
        self.apply(&changes).await
    }

    async fn delete_session(&self, address: &str) -> Result<()> {
        self.delete(kt::SESSION, address).await
    }

    async fn has_session(&self, address: &str) -> Result<bool> {
        Ok(self.get(kt::SESSION, address).await?.is_some())
    }

    async fn has_signal_state_for_user(&self, user: &str) -> Result<bool> {
        // A prefix query the key/value trait cannot express: scan identities first (32-byte
        // values), then sessions. Called only on a signal-cache miss for a user.
        fn matches(address: &str, user: &str) -> bool {
            address.strip_prefix(user).is_some_and(|rest| rest.starts_with('@') || rest.starts_with(':'))
        }
        for key_type in [kt::IDENTITY, kt::SESSION] {
            if self.list(key_type).await?.iter().any(|(address, _)| matches(address, user)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn store_prekey(&self, id: u32, record: &[u8], _uploaded: bool) -> Result<()> {
        // The uploaded flag is not kept: no trait method reads it back, and keeping it would
        // need an update-only write (see `mark_prekeys_uploaded`).
        self.put(kt::PREKEY, &prekey_id(id), b64(record)).await
    }

    async fn store_prekeys_batch(&self, keys: &[(u32, Bytes)], _uploaded: bool) -> Result<()> {
        let changes: Vec<KeyChange> =
            keys.iter().map(|(id, record)| KeyChange::put(kt::PREKEY, prekey_id(*id), b64(record))).collect();
        self.apply(&changes).await
    }

    async fn load_prekey(&self, id: u32) -> Result<Option<Bytes>> {
        Ok(self.get_bytes(kt::PREKEY, &prekey_id(id)).await?.map(Bytes::from))
    }

    async fn load_prekeys_batch(&self, ids: &[u32]) -> Result<Vec<(u32, Bytes)>> {
        let key_ids: Vec<String> = ids.iter().map(|id| prekey_id(*id)).collect();
        let found = self.get_many(kt::PREKEY, &key_ids).await?;
        let mut result = Vec::with_capacity(found.len());
        for (id, key_id) in ids.iter().zip(&key_ids) {
            if let Some(value) = found.get(key_id) {
                result.push((*id, Bytes::from(decode_bytes(value)?)));
            }
        }
        Ok(result)
    }

    async fn mark_prekeys_uploaded(&self, _ids: &[u32]) -> Result<()> {
        // Nothing stores the flag (see `store_prekey`). What the contract demands is that a
        // key consumed meanwhile is not resurrected, which writing nothing guarantees.
        Ok(())
    }

    async fn remove_prekey(&self, id: u32) -> Result<()> {
        self.delete(kt::PREKEY, &prekey_id(id)).await
    }

    async fn get_max_prekey_id(&self) -> Result<u32> {
        // No aggregate in the key/value trait: the ids are zero-padded, so the scan's last row
        // is the largest. Only used when the device's pre-key counter is uninitialised.
        match self.list(kt::PREKEY).await?.last() {
            Some((key_id, _)) => parse_prekey_id(key_id),
            None => Ok(0),
        }
    }

    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> Result<()> {
        self.put(kt::SIGNED_PREKEY, &prekey_id(id), b64(record)).await
    }

    async fn load_signed_prekey(&self, id: u32) -> Result<Option<Vec<u8>>> {
        self.get_bytes(kt::SIGNED_PREKEY, &prekey_id(id)).await
    }

    async fn load_all_signed_prekeys(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        self.list(kt::SIGNED_PREKEY)
            .await?
            .into_iter()
            .map(|(key_id, value)| Ok((parse_prekey_id(&key_id)?, decode_bytes(&value)?)))
            .collect()
    }

    async fn remove_signed_prekey(&self, id: u32) -> Result<()> {
        self.delete(kt::SIGNED_PREKEY, &prekey_id(id)).await
    }

    async fn put_sender_key(&self, address: &str, record: &[u8]) -> Result<()> {
        self.put(kt::SENDER_KEY, address, b64(record)).await
    }

    async fn put_sender_keys_batch(&self, sender_keys: &[(Arc<str>, Bytes)]) -> Result<()> {
        let changes: Vec<KeyChange> = sender_keys
            .iter()
            .map(|(address, record)| KeyChange::put(kt::SENDER_KEY, &**address, b64(record)))
            .collect();
        self.apply(&changes).await
    }

    async fn get_sender_key(&self, address: &str) -> Result<Option<Vec<u8>>> {
        self.get_bytes(kt::SENDER_KEY, address).await
    }

    async fn delete_sender_key(&self, address: &str) -> Result<()> {
        self.delete(kt::SENDER_KEY, address).await
    }
}

// ---------------------------------------------------------------------------------------------
// AppSyncStore

#[async_trait::async_trait]
impl AppSyncStore for DbBackend {
    async fn get_sync_key(&self, key_id: &[u8]) -> Result<Option<AppStateSyncKey>> {
        let Some(stored) = self.get_record::<StoredSyncKey>(kt::APP_STATE_KEY, &hex_key(key_id)).await? else {
            return Ok(None);
        };
        Ok(Some(AppStateSyncKey {
            key_data: decode_b64(&stored.key_data)?,
            fingerprint: decode_b64(&stored.fingerprint)?,
            timestamp: stored.timestamp,
        }))
    }

    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> Result<()> {
        let stored = StoredSyncKey {
            key_data: B64.encode(&key.key_data),
            fingerprint: B64.encode(&key.fingerprint),
            timestamp: key.timestamp,
        };
        let id = hex_key(key_id);
        // "Most recently stored" is not an order the key/value store keeps, so a pointer row
        // is written in the same transaction.
        self.apply(&[
            KeyChange::put(kt::APP_STATE_KEY, id.clone(), to_json(&stored)?),
            KeyChange::put(kt::APP_STATE_KEY_LATEST, LATEST_ID, Value::String(id)),
        ])
        .await
    }

    async fn get_version(&self, name: &str) -> Result<HashState> {
        match self.get_record::<StoredHashState>(kt::APP_STATE_VERSION, name).await? {
            Some(stored) => stored.into_state(),
            None => Ok(HashState::default()),
        }
    }

    async fn set_version(&self, name: &str, state: HashState) -> Result<()> {
        self.put(kt::APP_STATE_VERSION, name, to_json(&StoredHashState::from_state(&state))?).await
    }

    async fn put_mutation_macs(&self, name: &str, version: u64, mutations: &[AppStateMutationMAC]) -> Result<()> {
        let mut changes = Vec::with_capacity(mutations.len());
        for mutation in mutations {
            let stored = StoredMutationMac { value_mac: B64.encode(&mutation.value_mac), version };
            changes.push(KeyChange::put(
                kt::APP_STATE_MUTATION_MAC,
                join2(name, &hex_key(&mutation.index_mac)),
                to_json(&stored)?,
            ));
        }
        self.apply(&changes).await
    }

    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> Result<Option<Vec<u8>>> {
        let key_id = join2(name, &hex_key(index_mac));
        let Some(stored) = self.get_record::<StoredMutationMac>(kt::APP_STATE_MUTATION_MAC, &key_id).await? else {
            return Ok(None);
        };
        Ok(Some(decode_b64(&stored.value_mac)?))
    }

    async fn get_mutation_macs(&self, name: &str, index_macs: &[[u8; 32]]) -> Result<HashMap<[u8; 32], Vec<u8>>> {
        let key_ids: Vec<String> = index_macs.iter().map(|mac| join2(name, &hex_key(mac))).collect();
        let mut found = self.get_many(kt::APP_STATE_MUTATION_MAC, &key_ids).await?;
        let mut result = HashMap::with_capacity(found.len());
        for (mac, key_id) in index_macs.iter().zip(&key_ids) {
            if let Some(value) = found.remove(key_id) {
                let stored: StoredMutationMac = from_json(value)?;
                result.insert(*mac, decode_b64(&stored.value_mac)?);
            }
        }
        Ok(result)
    }

    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> Result<()> {
        let changes: Vec<KeyChange> = index_macs
            .iter()
            .map(|mac| KeyChange::delete(kt::APP_STATE_MUTATION_MAC, join2(name, &hex_key(mac))))
            .collect();
        self.apply(&changes).await
    }

    async fn clear_mutation_macs(&self, name: &str) -> Result<()> {
        // Prefix delete: scan and delete the collection's rows in one transaction. Runs only
        // on a snapshot re-sync of that collection.
        let prefix = join2(name, "");
        let changes: Vec<KeyChange> = self
            .list(kt::APP_STATE_MUTATION_MAC)
            .await?
            .into_iter()
            .filter(|(key_id, _)| key_id.starts_with(&prefix))
            .map(|(key_id, _)| KeyChange::delete(kt::APP_STATE_MUTATION_MAC, key_id))
            .collect();
        self.apply(&changes).await
    }

    async fn get_latest_sync_key_id(&self) -> Result<Option<Vec<u8>>> {
        let Some(value) = self.get(kt::APP_STATE_KEY_LATEST, LATEST_ID).await? else {
            return Ok(None);
        };
        let Some(id) = value.as_str() else {
            return Err(WaStoreError::Validation("latest app-state key id is not a string".into()));
        };
        hex::decode(id).map(Some).map_err(serialization)
    }
}

// ---------------------------------------------------------------------------------------------
// ProtocolStore

#[async_trait::async_trait]
impl ProtocolStore for DbBackend {
    async fn get_sender_key_devices(&self, group_jid: &str) -> Result<Vec<(String, bool)>> {
        // Prefix query over the group's rows: scan the key type and filter.
        let prefix = join2(group_jid, "");
        self.list(kt::SENDER_KEY_DEVICE)
            .await?
            .into_iter()
            .filter_map(|(key_id, value)| key_id.strip_prefix(&prefix).map(|device| (device.to_owned(), value)))
            .map(|(device, value)| match value {
                Value::Bool(has_key) => Ok((device, has_key)),
                other => Err(WaStoreError::Validation(format!("sender-key status is {}", json_kind(&other)))),
            })
            .collect()
    }

    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> Result<()> {
        let changes: Vec<KeyChange> = entries
            .iter()
            .map(|(device, has_key)| KeyChange::put(kt::SENDER_KEY_DEVICE, join2(group_jid, device), json!(has_key)))
            .collect();
        self.apply(&changes).await
    }

    async fn clear_sender_key_devices(&self, group_jid: &str) -> Result<()> {
        let prefix = join2(group_jid, "");
        let changes: Vec<KeyChange> = self
            .list(kt::SENDER_KEY_DEVICE)
            .await?
            .into_iter()
            .filter(|(key_id, _)| key_id.starts_with(&prefix))
            .map(|(key_id, _)| KeyChange::delete(kt::SENDER_KEY_DEVICE, key_id))
            .collect();
        self.apply(&changes).await
    }

    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> Result<()> {
        if device_jids.is_empty() {
            return Ok(());
        }
        // Keyed by group first, so deleting a device across groups scans the key type.
        let changes: Vec<KeyChange> = self
            .list(kt::SENDER_KEY_DEVICE)
            .await?
            .into_iter()
            .filter(|(key_id, _)| key_id.split_once('|').is_some_and(|(_, device)| device_jids.contains(&device)))
            .map(|(key_id, _)| KeyChange::delete(kt::SENDER_KEY_DEVICE, key_id))
            .collect();
        self.apply(&changes).await
    }

    async fn clear_all_sender_key_devices(&self) -> Result<()> {
        self.store.delete_key_type(self.session.session_id, kt::SENDER_KEY_DEVICE).await.map_err(db)?;
        Ok(())
    }

    async fn get_lid_mapping(&self, lid: &str) -> Result<Option<LidPnMappingEntry>> {
        self.get_record(kt::LID_MAPPING, lid).await
    }

    async fn get_pn_mapping(&self, phone: &str) -> Result<Option<LidPnMappingEntry>> {
        let Some(lid) = self.get(kt::PN_MAPPING, phone).await? else {
            return Ok(None);
        };
        let Some(lid) = lid.as_str() else {
            return Err(WaStoreError::Validation("phone-number mapping is not a string".into()));
        };
        // A stale pointer (its LID now maps to another number) counts as absent.
        Ok(self.get_lid_mapping(lid).await?.filter(|entry| entry.phone_number == phone))
    }

    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> Result<()> {
        self.put_lid_mappings(std::slice::from_ref(entry)).await
    }

    async fn put_lid_mappings(&self, entries: &[LidPnMappingEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let _guard = self.rmw.lock().await;
        // The reverse index needs the current state of both sides: the mapping each LID had
        // (to drop its old number's pointer) and the LID each number points to (newest
        // `updated_at` wins).
        let lids: Vec<String> = entries.iter().map(|entry| entry.lid.clone()).collect();
        let mut mappings: HashMap<String, LidPnMappingEntry> = HashMap::new();
        for (lid, value) in self.get_many(kt::LID_MAPPING, &lids).await? {
            mappings.insert(lid, from_json(value)?);
        }
        let mut phones: Vec<String> = entries.iter().map(|entry| entry.phone_number.clone()).collect();
        phones.extend(mappings.values().map(|old| old.phone_number.clone()));
        phones.sort();
        phones.dedup();
        let mut pointers: HashMap<String, String> = HashMap::new();
        for (phone, value) in self.get_many(kt::PN_MAPPING, &phones).await? {
            if let Value::String(lid) = value {
                pointers.insert(phone, lid);
            }
        }
        let pointed: Vec<String> = pointers.values().filter(|lid| !mappings.contains_key(*lid)).cloned().collect();
        for (lid, value) in self.get_many(kt::LID_MAPPING, &pointed).await? {
            mappings.insert(lid, from_json(value)?);
        }

        let mut changes = Vec::new();
        for entry in entries {
            if let Some(old) = mappings.get(&entry.lid)
                && old.phone_number != entry.phone_number
                && pointers.get(&old.phone_number) == Some(&entry.lid)
            {
                pointers.remove(&old.phone_number);
                changes.push(KeyChange::delete(kt::PN_MAPPING, old.phone_number.clone()));
            }
            let keep_other = pointers.get(&entry.phone_number).is_some_and(|current| {
                current != &entry.lid
                    && mappings.get(current).is_some_and(|other| {
                        other.phone_number == entry.phone_number && other.updated_at > entry.updated_at
                    })
            });
            if !keep_other {
                pointers.insert(entry.phone_number.clone(), entry.lid.clone());
                changes.push(KeyChange::put(kt::PN_MAPPING, entry.phone_number.clone(), json!(entry.lid)));
            }
            mappings.insert(entry.lid.clone(), entry.clone());
            changes.push(KeyChange::put(kt::LID_MAPPING, entry.lid.clone(), to_json(entry)?));
        }
        self.apply(&changes).await
    }

    async fn get_all_lid_mappings(&self) -> Result<Vec<LidPnMappingEntry>> {
        self.list(kt::LID_MAPPING).await?.into_iter().map(|(_, value)| from_json(value)).collect()
    }

    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> Result<()> {
        self.put(kt::BASE_KEY, &join2(address, message_id), b64(base_key)).await
    }

    async fn has_same_base_key(&self, address: &str, message_id: &str, current_base_key: &[u8]) -> Result<bool> {
        Ok(self
            .get_bytes(kt::BASE_KEY, &join2(address, message_id))
            .await?
            .is_some_and(|stored| stored == current_base_key))
    }

    async fn delete_base_key(&self, address: &str, message_id: &str) -> Result<()> {
        self.delete(kt::BASE_KEY, &join2(address, message_id)).await
    }

    async fn update_device_list(&self, record: DeviceListRecord) -> Result<()> {
        self.put(kt::DEVICE_LIST, &record.user, to_json(&record)?).await
    }

    async fn update_device_lists(&self, records: Vec<DeviceListRecord>) -> Result<()> {
        let mut changes = Vec::with_capacity(records.len());
        for record in &records {
            changes.push(KeyChange::put(kt::DEVICE_LIST, record.user.clone(), to_json(record)?));
        }
        self.apply(&changes).await
    }

    async fn get_devices(&self, user: &str) -> Result<Option<DeviceListRecord>> {
        self.get_record(kt::DEVICE_LIST, user).await
    }

    async fn delete_devices(&self, user: &str) -> Result<()> {
        self.delete(kt::DEVICE_LIST, user).await
    }

    async fn get_group_metadata(&self, group_jid: &str) -> Result<Option<Vec<u8>>> {
        self.get_bytes(kt::GROUP_METADATA, group_jid).await
    }

    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> Result<()> {
        self.put(kt::GROUP_METADATA, group_jid, b64(blob)).await
    }

    async fn delete_group_metadata(&self, group_jid: &str) -> Result<()> {
        self.delete(kt::GROUP_METADATA, group_jid).await
    }

    async fn get_tc_token(&self, jid: &str) -> Result<Option<TcTokenEntry>> {
        self.get_record::<StoredTcToken>(kt::TC_TOKEN, jid).await?.map(StoredTcToken::into_entry).transpose()
    }

    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> Result<()> {
        let _guard = self.rmw.lock().await;
        self.put(kt::TC_TOKEN, jid, to_json(&StoredTcToken::from_entry(entry))?).await
    }

    async fn delete_tc_token(&self, jid: &str) -> Result<()> {
        let _guard = self.rmw.lock().await;
        self.delete(kt::TC_TOKEN, jid).await
    }

    async fn get_all_tc_token_jids(&self) -> Result<Vec<String>> {
        Ok(self.list(kt::TC_TOKEN).await?.into_iter().map(|(jid, _)| jid).collect())
    }

    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> Result<u32> {
        let _guard = self.rmw.lock().await;
        // The two cutoffs apply to fields inside the value: decode and decide here.
        let mut changes = Vec::new();
        for (jid, value) in self.list(kt::TC_TOKEN).await? {
            let entry = from_json::<StoredTcToken>(value)?.into_entry()?;
            let token_live = !entry.token.is_empty() && entry.token_timestamp >= token_cutoff;
            let sender_live = entry.sender_timestamp.is_some_and(|ts| ts >= sender_cutoff);
            if !token_live && !sender_live {
                changes.push(KeyChange::delete(kt::TC_TOKEN, jid));
            }
        }
        self.apply(&changes).await?;
        Ok(u32::try_from(changes.len()).unwrap_or(u32::MAX))
    }

    async fn touch_tc_token_sender_timestamp(&self, jid: &str, sender_timestamp: i64) -> Result<()> {
        let _guard = self.rmw.lock().await;
        let entry = match self.get_tc_token(jid).await? {
            Some(existing) => TcTokenEntry {
                sender_timestamp: Some(
                    existing.sender_timestamp.map_or(sender_timestamp, |ts| ts.max(sender_timestamp)),
                ),
                ..existing
            },
            None => TcTokenEntry {
                token: Vec::new(),
                token_timestamp: sender_timestamp,
                sender_timestamp: Some(sender_timestamp),
            },
        };
        self.put(kt::TC_TOKEN, jid, to_json(&StoredTcToken::from_entry(&entry))?).await
    }

    async fn store_received_tc_token(&self, jid: &str, token: &[u8], token_timestamp: i64) -> Result<()> {
        let _guard = self.rmw.lock().await;
        let existing = self.get_tc_token(jid).await?;
        if let Some(existing) = &existing
            && !existing.token.is_empty()
            && token_timestamp < existing.token_timestamp
        {
            return Ok(());
        }
        let entry = TcTokenEntry {
            token: token.to_vec(),
            token_timestamp,
            sender_timestamp: existing.and_then(|existing| existing.sender_timestamp),
        };
        self.put(kt::TC_TOKEN, jid, to_json(&StoredTcToken::from_entry(&entry))?).await
    }

    async fn store_sent_message(&self, chat_jid: &str, message_id: &str, payload: &[u8]) -> Result<()> {
        let stored = Timestamped { data: B64.encode(payload), at: now_secs() };
        self.put(kt::SENT_MESSAGE, &join2(chat_jid, message_id), to_json(&stored)?).await
    }

    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> Result<Option<Vec<u8>>> {
        let _guard = self.rmw.lock().await;
        let key_id = join2(chat_jid, message_id);
        let Some(stored) = self.get_record::<Timestamped>(kt::SENT_MESSAGE, &key_id).await? else {
            return Ok(None);
        };
        self.delete(kt::SENT_MESSAGE, &key_id).await?;
        Ok(Some(decode_b64(&stored.data)?))
    }

    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.delete_older(kt::SENT_MESSAGE, cutoff_timestamp).await
    }

    async fn store_pending_inbound(&self, chat: &str, sender: &str, id: &str, message: &[u8]) -> Result<()> {
        let stored = Timestamped { data: B64.encode(message), at: now_secs() };
        self.put(kt::PENDING_INBOUND, &join3(chat, sender, id), to_json(&stored)?).await
    }

    async fn get_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> Result<Option<Vec<u8>>> {
        match self.get_record::<Timestamped>(kt::PENDING_INBOUND, &join3(chat, sender, id)).await? {
            Some(stored) => Ok(Some(decode_b64(&stored.data)?)),
            None => Ok(None),
        }
    }

    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> Result<()> {
        self.delete(kt::PENDING_INBOUND, &join3(chat, sender, id)).await
    }

    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.delete_older(kt::PENDING_INBOUND, cutoff_timestamp).await
    }

    async fn store_pending_inbound_batch(&self, rows: &[PendingInboundRow<'_>]) -> Result<()> {
        let at = now_secs();
        let mut changes = Vec::with_capacity(rows.len());
        for row in rows {
            let stored = Timestamped { data: B64.encode(row.message), at };
            changes.push(KeyChange::put(kt::PENDING_INBOUND, join3(row.chat, row.sender, row.id), to_json(&stored)?));
        }
        self.apply(&changes).await
    }

    async fn delete_pending_inbound_batch(&self, keys: &[PendingInboundKey<'_>]) -> Result<()> {
        let changes: Vec<KeyChange> = keys
            .iter()
            .map(|key| KeyChange::delete(kt::PENDING_INBOUND, join3(key.chat, key.sender, key.id)))
            .collect();
        self.apply(&changes).await
    }
}

impl DbBackend {
    /// Time sweep over a key type whose values are [`Timestamped`]: the write time lives in
    /// the value, so the sweep scans the type (it runs from the keepalive task, rarely).
    async fn delete_older(&self, key_type: &str, cutoff: i64) -> Result<u32> {
        let mut changes = Vec::new();
        for (key_id, value) in self.list(key_type).await? {
            let stored: Timestamped = from_json(value)?;
            if stored.at < cutoff {
                changes.push(KeyChange::delete(key_type, key_id));
            }
        }
        self.apply(&changes).await?;
        Ok(u32::try_from(changes.len()).unwrap_or(u32::MAX))
    }
}

// ---------------------------------------------------------------------------------------------
// MsgSecretStore

#[async_trait::async_trait]
impl MsgSecretStore for DbBackend {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> Result<usize> {
        let stored_count = entries.len();
        if entries.is_empty() {
            return Ok(0);
        }
        let _guard = self.rmw.lock().await;
        let key_ids: Vec<String> =
            entries.iter().map(|entry| join3(&entry.chat, &entry.sender, &entry.msg_id)).collect();
        let mut current: HashMap<String, StoredMsgSecret> = HashMap::new();
        for (key_id, value) in self.get_many(kt::MSG_SECRET, &key_ids).await? {
            current.insert(key_id, from_json(value)?);
        }
        // Merged in order, so a key repeated within the batch merges with its earlier copy.
        let mut order = Vec::new();
        for (entry, key_id) in entries.iter().zip(key_ids) {
            let merged = match current.remove(&key_id) {
                Some(old) => StoredMsgSecret {
                    secret: B64.encode(entry.secret),
                    expires_at: merge_msg_secret_expiry(old.expires_at, entry.expires_at),
                    message_ts: merge_msg_secret_message_ts(old.message_ts, entry.message_ts),
                },
                None => StoredMsgSecret {
                    secret: B64.encode(entry.secret),
                    expires_at: entry.expires_at,
                    message_ts: entry.message_ts,
                },
            };
            if !order.contains(&key_id) {
                order.push(key_id.clone());
            }
            current.insert(key_id, merged);
        }
        let mut changes = Vec::with_capacity(order.len());
        for key_id in order {
            if let Some(merged) = current.get(&key_id) {
                changes.push(KeyChange::put(kt::MSG_SECRET, key_id, to_json(merged)?));
            }
        }
        self.apply(&changes).await?;
        Ok(stored_count)
    }

    async fn get_msg_secret(&self, chat: &str, sender: &str, msg_id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.get_msg_secret_with_ts(chat, sender, msg_id).await?.map(|(secret, _)| secret))
    }

    async fn get_msg_secret_with_ts(&self, chat: &str, sender: &str, msg_id: &str) -> Result<Option<(Vec<u8>, i64)>> {
        match self.get_record::<StoredMsgSecret>(kt::MSG_SECRET, &join3(chat, sender, msg_id)).await? {
            Some(stored) => Ok(Some((decode_b64(&stored.secret)?, stored.message_ts))),
            None => Ok(None),
        }
    }

    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> Result<u32> {
        let _guard = self.rmw.lock().await;
        // The deadline lives in the value: scan and decide here (keepalive sweep).
        let mut changes = Vec::new();
        for (key_id, value) in self.list(kt::MSG_SECRET).await? {
            let stored: StoredMsgSecret = from_json(value)?;
            if stored.expires_at != 0 && stored.expires_at <= cutoff_timestamp {
                changes.push(KeyChange::delete(kt::MSG_SECRET, key_id));
            }
        }
        self.apply(&changes).await?;
        Ok(u32::try_from(changes.len()).unwrap_or(u32::MAX))
    }
}

// ---------------------------------------------------------------------------------------------
// DeviceStore

#[async_trait::async_trait]
impl DeviceStore for DbBackend {
    async fn save(&self, device: &Device) -> Result<()> {
        let creds = device_to_creds(device)?;
        self.store.save_creds(self.session.session_id, self.session.tenant_id, &creds).await.map_err(db)
    }

    async fn load(&self) -> Result<Option<Device>> {
        match self.store.load_creds(self.session.session_id).await.map_err(db)? {
            Some(creds) => device_from_creds(creds),
            None => Ok(None),
        }
    }

    async fn exists(&self) -> Result<bool> {
        let Some(creds) = self.store.load_creds(self.session.session_id).await.map_err(db)? else {
            return Ok(false);
        };
        Ok(is_ours(&creds))
    }

    async fn create(&self) -> Result<i32> {
        // A document from another driver is replaced: the session now runs on this one.
        if !self.exists().await? {
            self.save(&Device::new()).await?;
        }
        // The number is informational for the library; this backend is bound to one session.
        Ok(1)
    }

    async fn resource_report(&self) -> whatsapp_rust::wacore::stats::StorageResourceReport {
        // The keys live in the database, not in this process.
        whatsapp_rust::wacore::stats::StorageResourceReport { memory_bytes: Some(0), ..Default::default() }
    }
}
