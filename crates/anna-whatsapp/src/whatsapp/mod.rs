//! The real WhatsApp driver, over whatsapp-rust 0.7.0.
//!
//! Each [`SessionDriver::connect`] builds a new whatsapp-rust `Bot` on a [`DbBackend`] for the
//! session (the library's `disconnect` is final, so a connection is never reused) and runs it
//! on its own task. The library reconnects by itself after network drops and after the
//! post-pairing restart; what ends a connection (logout, replacement, ban, outdated client,
//! QR exhaustion, `stop`) is reported as [`DriverEvent::Closed`], once.
//!
//! Only one connection per session may run anywhere at a time: two clients on the same keys
//! corrupt the Signal state and make the server replace one of them. The sessions worker's
//! lease guarantees it; this driver does not check.

mod convert;
mod events;
mod history;
mod media;
mod raw;
mod session;
mod store;

use std::sync::Arc;
use std::time::Duration;

use anna_store::DeviceKeyStore;
use async_trait::async_trait;
use tokio::sync::mpsc;
use whatsapp_rust::bot::{Bot, BotBuilderError, EventDelivery};
use whatsapp_rust::http::{HttpClient, HttpRequest, HttpResponse};
use whatsapp_rust::transport::{Transport, TransportEvent, TransportFactory};
use whatsapp_rust::wacore::store::DevicePropsOverride;
use whatsapp_rust::wacore::store::traits::Backend;
use whatsapp_rust::waproto::whatsapp::device_props::PlatformType;
use whatsapp_rust::{ClientError, SendError};

pub use convert::{build_text_message, from_wa_jid, render_qr, to_wa_jid};
pub use store::{DbBackend, device_from_creds, device_to_creds, key_types};

use crate::{DriverError, DriverEvent, LiveSession, SessionDriver, SessionKey};
use session::{Settings, Shared, WaLiveSession};

/// Re-exported so callers (and tests) can name the library's types without a direct
/// dependency, which would have to match its version and features exactly.
pub use whatsapp_rust as library;

const DRIVER_NAME: &str = "whatsapp";
/// The library's per-connection event mailbox; beyond it events are dropped (and counted in
/// the client's stats) rather than stalling the receive loop.
const EVENT_MAILBOX: usize = 1024;

/// Settings of the WhatsApp driver (the `SESSIONS_*` provider settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhatsAppConfig {
    /// The name the phone shows in its linked devices (`SESSIONS_BROWSER_NAME`).
    pub browser_name: String,
    /// Appear online while connected (`SESSIONS_MARK_ONLINE`). Off by default, so the phone
    /// keeps showing notifications.
    pub mark_online: bool,
    /// Also print each QR code to stderr as text blocks (`SESSIONS_PRINT_QR`).
    pub print_qr: bool,
    /// The longest validity advertised for a QR code (`SESSIONS_QR_TTL_MS`); the library's
    /// own, when shorter, wins (first code 60 s, later ones 20 s).
    pub qr_ttl: Duration,
    /// The WhatsApp Web version to announce. `None` lets every device fetch it from
    /// web.whatsapp.com when its cached one is older than a day, and a failed fetch fails that
    /// connect; a version refreshed centrally avoids both.
    pub app_version: Option<(u32, u32, u32)>,
    /// Import the history the phone sends after pairing (`SESSIONS_HISTORY_SYNC`). Off: the
    /// library acknowledges it without downloading it.
    pub history_sync: bool,
}

impl Default for WhatsAppConfig {
    fn default() -> Self {
        Self {
            browser_name: "Anna".into(),
            mark_online: false,
            print_qr: false,
            qr_ttl: Duration::from_millis(60_000),
            app_version: None,
            history_sync: true,
        }
    }
}

/// What the driver uses to reach WhatsApp; replaced in tests so nothing leaves the machine.
#[derive(Clone)]
pub struct Network {
    pub transport: Arc<dyn TransportFactory>,
    pub http: Arc<dyn HttpClient>,
}

#[derive(Debug, thiserror::Error)]
pub enum WhatsAppError {
    #[error("could not build the WhatsApp client: {0}")]
    Build(#[from] BotBuilderError),
    #[error("could not render the QR code: {0}")]
    Qr(String),
    #[error("pairing by phone number failed: {0}")]
    PairCode(String),
}

impl From<WhatsAppError> for DriverError {
    fn from(error: WhatsAppError) -> Self {
        DriverError::Failed(error.to_string())
    }
}

fn map_send_error(error: SendError) -> DriverError {
    match error {
        SendError::NotLoggedIn | SendError::Client(ClientError::NotConnected | ClientError::NotLoggedIn) => {
            DriverError::NotConnected
        }
        SendError::InvalidRequest(detail) => DriverError::Invalid(detail),
        other => DriverError::Failed(format!("send failed: {other}")),
    }
}

/// The real WhatsApp driver: whatsapp-rust with its keys in anna's database.
pub struct WhatsAppDriver {
    store: Arc<dyn DeviceKeyStore>,
    config: WhatsAppConfig,
    network: Option<Network>,
}

impl WhatsAppDriver {
    pub fn new(store: Arc<dyn DeviceKeyStore>, config: WhatsAppConfig) -> Self {
        Self { store, config, network: None }
    }

    /// Uses `network` instead of the WebSocket to WhatsApp and the HTTP client (tests).
    pub fn with_network(mut self, network: Network) -> Self {
        self.network = Some(network);
        self
    }

    pub fn config(&self) -> &WhatsAppConfig {
        &self.config
    }

    fn device_props(&self) -> DevicePropsOverride {
        DevicePropsOverride::new().with_os(self.config.browser_name.clone()).with_platform_type(PlatformType::CHROME)
    }
}

#[async_trait]
impl SessionDriver for WhatsAppDriver {
    fn name(&self) -> &'static str {
        DRIVER_NAME
    }

    async fn connect(
        &self,
        session: SessionKey,
        events: mpsc::Sender<DriverEvent>,
    ) -> Result<Arc<dyn LiveSession>, DriverError> {
        let backend: Arc<dyn Backend> = Arc::new(DbBackend::new(self.store.clone(), session));
        let settings = Settings {
            qr_ttl: self.config.qr_ttl,
            print_qr: self.config.print_qr,
            mark_online: self.config.mark_online,
        };
        let shared = Arc::new(Shared::new(session, settings, events));
        let handler = shared.clone();
        let mut builder = Bot::builder()
            .with_backend_arc(backend)
            .with_device_props(self.device_props())
            // Ordered, so a message's receipts never overtake it and `Closed` comes last.
            .with_event_delivery(EventDelivery::Ordered { capacity: EVENT_MAILBOX })
            .on_event(move |event, client| handler.clone().handle(event, client));
        if !self.config.history_sync {
            builder = builder.skip_history_sync();
        }
        if let Some(version) = self.config.app_version {
            builder = builder.with_version(version);
        }
        if let Some(network) = &self.network {
            builder = builder
                .with_transport_factory(SharedTransport(network.transport.clone()))
                .with_http_client(SharedHttp(network.http.clone()));
        }
        let bot = builder.build().await.map_err(WhatsAppError::Build)?;
        let client = bot.client();
        let runner = tokio::spawn(session::run(bot, shared.clone()));
        tracing::debug!(session_id = %session.session_id, "whatsapp connection started");
        Ok(Arc::new(WaLiveSession { client, shared, runner: std::sync::Mutex::new(Some(runner)) }))
    }

    async fn is_paired(&self, session: SessionKey) -> Result<bool, DriverError> {
        let creds = self.store.load_creds(session.session_id).await?;
        Ok(creds.as_ref().is_some_and(store::creds_are_paired))
    }

    async fn wipe(&self, session: SessionKey) -> Result<(), DriverError> {
        self.store.wipe_device(session.session_id).await?;
        Ok(())
    }
}

/// Lets a shared transport factory be handed to the builder, which takes one by value.
struct SharedTransport(Arc<dyn TransportFactory>);

#[async_trait]
impl TransportFactory for SharedTransport {
    async fn create_transport(
        &self,
    ) -> Result<
        (Arc<dyn Transport>, whatsapp_rust::async_channel::Receiver<TransportEvent>),
        whatsapp_rust::anyhow::Error,
    > {
        self.0.create_transport().await
    }
}

struct SharedHttp(Arc<dyn HttpClient>);

#[async_trait]
impl HttpClient for SharedHttp {
    async fn execute(&self, request: HttpRequest) -> whatsapp_rust::anyhow::Result<HttpResponse> {
        self.0.execute(request).await
    }
}
