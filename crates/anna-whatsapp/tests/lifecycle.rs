//! The real driver's lifecycle, offline: a transport that never connects and an HTTP client
//! that always fails stand in for WhatsApp, so nothing leaves the machine. Covers connect,
//! the silence of a connection that cannot reach WhatsApp, stop (prompt, `Closed{Stopped}`
//! exactly once, nothing after it), the operations that need a paired connection, and the QR
//! payload of a device read back from the database.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anna_store::{ConnectOptions, DeviceKeyStore, Store};
use anna_whatsapp::whatsapp::library::anyhow;
use anna_whatsapp::whatsapp::library::async_channel;
use anna_whatsapp::whatsapp::library::http::{HttpClient, HttpRequest, HttpResponse};
use anna_whatsapp::whatsapp::library::pair::make_qr_data;
use anna_whatsapp::whatsapp::library::store::Device as ClientDevice;
use anna_whatsapp::whatsapp::library::transport::{Transport, TransportEvent, TransportFactory};
use anna_whatsapp::whatsapp::library::wacore::store::InMemoryBackend;
use anna_whatsapp::whatsapp::library::wacore::store::traits::{Backend, DeviceStore};
use anna_whatsapp::whatsapp::{DbBackend, Network, WhatsAppConfig, WhatsAppDriver};
use anna_whatsapp::{CloseReason, DriverError, DriverEvent, Jid, OutgoingText, SessionDriver, SessionKey, Simulation};
use tokio::sync::mpsc;
use uuid::Uuid;

struct NeverConnects {
    attempts: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl TransportFactory for NeverConnects {
    async fn create_transport(
        &self,
    ) -> Result<(Arc<dyn Transport>, async_channel::Receiver<TransportEvent>), anyhow::Error> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        Err(anyhow::anyhow!("offline test: no network"))
    }
}

struct NoHttp;

#[async_trait::async_trait]
impl HttpClient for NoHttp {
    async fn execute(&self, request: HttpRequest) -> anyhow::Result<HttpResponse> {
        Err(anyhow::anyhow!("offline test: no HTTP to {}", request.url))
    }
}

async fn sqlite_store() -> Arc<dyn Store> {
    let url = anna_testkit::sqlite::fresh_database_url();
    let options = ConnectOptions { max_connections: 4, acquire_timeout: Duration::from_secs(30), ..Default::default() };
    let store = anna_store::connect(&url, &options).await.unwrap();
    store.migrate().await.unwrap();
    store
}

fn offline_driver(store: &Arc<dyn Store>, attempts: Arc<AtomicUsize>) -> WhatsAppDriver {
    let keys: Arc<dyn DeviceKeyStore> = store.clone();
    // A fixed version: without one the client would fetch it over HTTP before connecting.
    let config = WhatsAppConfig { app_version: Some((2, 3000, 1_000_000_000)), ..WhatsAppConfig::default() };
    WhatsAppDriver::new(keys, config)
        .with_network(Network { transport: Arc::new(NeverConnects { attempts }), http: Arc::new(NoHttp) })
}

fn new_session() -> SessionKey {
    SessionKey { session_id: Uuid::new_v4(), tenant_id: Uuid::new_v4() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_whatsapp_stays_silent_and_stop_closes_once() {
    let store = sqlite_store().await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let driver = offline_driver(&store, attempts.clone());
    assert_eq!(driver.name(), "whatsapp");
    let session = new_session();
    let (events, mut received) = mpsc::channel(16);

    let live = driver.connect(session, events).await.unwrap();

    // Building the client created the (unpaired) device in the database.
    assert!(store.load_creds(session.session_id).await.unwrap().is_some());
    assert!(!driver.is_paired(session).await.unwrap());

    // Failing connects are retried by the library and raise no events.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(received.try_recv().is_err(), "no event expected while WhatsApp is unreachable");
    assert!(attempts.load(Ordering::SeqCst) >= 1, "the client tried to connect");

    let started = Instant::now();
    live.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5), "stop took {:?}", started.elapsed());

    let closed = tokio::time::timeout(Duration::from_secs(5), received.recv()).await.unwrap();
    assert_eq!(closed, Some(DriverEvent::Closed { reason: CloseReason::Stopped }));
    // Nothing follows `Closed`, and a second stop does not send another.
    live.stop().await;
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), received.recv()).await.unwrap(), None);

    // The client is finished: no more connect attempts.
    let after_stop = attempts.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(attempts.load(Ordering::SeqCst), after_stop);

    // The keys stay until the caller wipes them.
    assert!(store.load_creds(session.session_id).await.unwrap().is_some());
    driver.wipe(session).await.unwrap();
    assert!(store.load_creds(session.session_id).await.unwrap().is_none());
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaired_connection_refuses_what_needs_a_paired_one() {
    let store = sqlite_store().await;
    let driver = offline_driver(&store, Arc::new(AtomicUsize::new(0)));
    let (events, mut received) = mpsc::channel(16);
    let live = driver.connect(new_session(), events).await.unwrap();

    let message = OutgoingText {
        to: Jid::parse("+15551234567").unwrap(),
        text: "hello".into(),
        reply_to: None,
        forwarding_score: None,
    };
    assert!(matches!(live.send_text(&message).await, Err(DriverError::NotConnected)));
    let empty = OutgoingText { text: String::new(), ..message };
    assert!(matches!(live.send_text(&empty).await, Err(DriverError::Invalid(_))));
    assert!(matches!(live.pair_with_code("not a number").await, Err(DriverError::Invalid(_))));
    assert!(matches!(live.logout().await, Err(DriverError::NotConnected)));
    assert!(matches!(live.simulate(Simulation::Scan).await, Err(DriverError::Unsupported("whatsapp"))));

    live.stop().await;
    let closed = tokio::time::timeout(Duration::from_secs(5), received.recv()).await.unwrap();
    assert_eq!(closed, Some(DriverEvent::Closed { reason: CloseReason::Stopped }));
    assert!(matches!(
        live.send_text(&OutgoingText {
            to: Jid::parse("+15551234567").unwrap(),
            text: "late".into(),
            reply_to: None,
            forwarding_score: None
        })
        .await,
        Err(DriverError::NotConnected)
    ));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_ends_its_client() {
    let store = sqlite_store().await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let driver = offline_driver(&store, attempts.clone());
    let (events, _received) = mpsc::channel(16);
    let live = driver.connect(new_session(), events).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(live);
    // Give the background disconnect time to finish, then check nothing retries any more.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let settled = attempts.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(attempts.load(Ordering::SeqCst), settled);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qr_payload_of_a_stored_device_names_the_client_type() {
    let store = sqlite_store().await;
    let keys: Arc<dyn DeviceKeyStore> = store.clone();
    let backend = DbBackend::new(keys, new_session());
    backend.create().await.unwrap();
    let reference: Arc<dyn Backend> = Arc::new(InMemoryBackend::new());
    let device = ClientDevice { core: backend.load().await.unwrap().unwrap(), backend: reference.clone() };

    let payload = make_qr_data(&device, "2@FAKEREF");
    let fields: Vec<&str> = payload.split(',').collect();
    assert_eq!(fields.len(), 5, "{payload}");
    assert_eq!(fields[0], "2@FAKEREF");
    for key in &fields[1..4] {
        assert_eq!(key.len(), 44, "a base64 32-byte key: {key}");
    }
    // With device_props restored on load, the client type is the library default's, not the
    // one an empty DeviceProps would give.
    let fresh = make_qr_data(&ClientDevice::new(reference), "2@FAKEREF");
    assert_eq!(fields[4], fresh.rsplit(',').next().unwrap());
    assert!(!fields[4].is_empty());
    store.close().await;
}
