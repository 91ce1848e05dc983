//! WhatsApp session drivers.
//!
//! A [`SessionDriver`] opens live connections ([`LiveSession`]) for sessions; each connection
//! reports what happens to it as [`DriverEvent`]s on a channel the sessions worker reads. Two
//! drivers exist:
//! - the real client, over whatsapp-rust (`whatsapp` module), which keeps its device keys in
//!   anna's database through [`anna_store::DeviceKeyStore`];
//! - the [`simulator`], an in-process fake WhatsApp network with the real pairing timings,
//!   selected explicitly (`SESSIONS_PROVIDER=simulator`), which keeps its simulated device in
//!   the same store, so simulated sessions resume after a restart like real ones.
//!
//! Both are driven identically by the worker: connect, then react to events; a connection
//! that reports [`DriverEvent::Closed`] is finished and a new one must be opened to resume.

pub mod jid;
pub mod simulator;
pub mod whatsapp;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use uuid::Uuid;

pub use jid::{Jid, JidError};

/// Most messages in one [`DriverEvent::History`] piece: a phone's history (100,000 messages
/// and more) reaches the database a piece at a time, in bounded memory.
pub const HISTORY_PIECE_MESSAGES: usize = 500;

/// History pieces of one connection on their way to the database at once: the phone's
/// history is produced no faster than it is stored.
pub const HISTORY_PIECES_IN_FLIGHT: usize = 2;

/// A history piece's place among the [`HISTORY_PIECES_IN_FLIGHT`] of its connection, given
/// back when the event carrying it is dropped (the worker has stored the piece).
#[derive(Debug, Clone, Default)]
pub struct HistorySlot {
    _held: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

impl HistorySlot {
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        Self { _held: Some(Arc::new(permit)) }
    }
}

/// Slots carry no data: two events with the same piece are equal.
impl PartialEq for HistorySlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for HistorySlot {}

/// Which session a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub session_id: Uuid,
    pub tenant_id: Uuid,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("the session is not connected")]
    NotConnected,
    #[error("not supported by the {0} driver")]
    Unsupported(&'static str),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("device key store: {0}")]
    Store(#[from] anna_store::StoreError),
    #[error("{0}")]
    Failed(String),
}

/// A text message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingText {
    pub to: Jid,
    pub text: String,
    /// WhatsApp id of the message this one answers, in the same chat.
    pub reply_to: Option<String>,
    /// A forward: how many times the content was forwarded, this time included.
    pub forwarding_score: Option<u32>,
}

/// A file to send. The bytes are whole: WhatsApp encrypts a file with a key of its own before
/// uploading it, and the largest file anna sends is bounded (`MEDIA_MAX_UPLOAD_BYTES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMedia {
    pub to: Jid,
    pub kind: MediaKind,
    pub bytes: bytes::Bytes,
    /// Its content type, found from the content.
    pub mime: String,
    /// Shown for documents.
    pub file_name: String,
    pub caption: Option<String>,
    /// An audio file sent as a voice note.
    pub ptt: bool,
    pub reply_to: Option<String>,
    /// A forward: how many times the file was forwarded, this time included.
    pub forwarding_score: Option<u32>,
}

/// A stored message a command acts on (read, edit, delete, react): what WhatsApp needs to
/// address it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageTarget {
    pub chat: Jid,
    pub message_id: String,
    /// Sent by this account.
    pub from_me: bool,
    /// Who sent it, when it came from someone else (needed in groups).
    pub sender: Option<Jid>,
}

/// A change to a message: the domain's own type, like [`IncomingMessage`].
pub use anna_domain::media::{IncomingMedia, MediaKind};
pub use anna_domain::session::{ChangeKind, HistoryChat, HistoryContact, HistoryMessage, HistoryPiece, MessageChange};
pub use anna_domain::session::{MessageContext, Presence, PresenceChange, RawMessage};

/// A message written to the connection: its WhatsApp id, and its raw form when the driver has
/// one (stored with the message, see [`RawMessage`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    pub message_id: String,
    pub raw: Option<RawMessage>,
}

/// How far a sent message got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptStatus {
    /// The server accepted it.
    ServerAck,
    Delivered,
    Read,
}

impl ReceiptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServerAck => "server_ack",
            Self::Delivered => "delivered",
            Self::Read => "read",
        }
    }
}

/// Why a connection dropped or ended. The worker's reconnect policy is decided by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The server demands a reconnect (after pairing): reconnect at once.
    RestartRequired,
    /// Network trouble, server recycling, a connect that failed: reconnect with backoff.
    Transient(String),
    /// Every QR code expired unscanned.
    QrTimeout,
    /// The phone unlinked the device or the server logged it out: keys are void.
    LoggedOut(String),
    /// Another connection with the same device keys took over.
    Replaced,
    /// The number is banned (temporarily or not).
    Banned(String),
    /// The client is too old for the server.
    ClientOutdated,
    /// `stop()` was called.
    Stopped,
}

impl CloseReason {
    /// The reason without its detail: a metric label from a fixed set.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RestartRequired => "restart_required",
            Self::Transient(_) => "connection_lost",
            Self::QrTimeout => "qr_timeout",
            Self::LoggedOut(_) => "logged_out",
            Self::Replaced => "replaced",
            Self::Banned(_) => "banned",
            Self::ClientOutdated => "client_outdated",
            Self::Stopped => "stopped",
        }
    }

    /// The reason as the tenant sees it in events and in `GET /sessions/{id}`.
    pub fn label(&self) -> String {
        match self {
            Self::RestartRequired => "restart_required".into(),
            Self::Transient(detail) => {
                if detail.is_empty() {
                    "connection_lost".into()
                } else {
                    format!("connection_lost: {detail}")
                }
            }
            Self::QrTimeout => "qr_timeout".into(),
            Self::LoggedOut(detail) => {
                if detail.is_empty() {
                    "logged_out".into()
                } else {
                    format!("logged_out: {detail}")
                }
            }
            Self::Replaced => "replaced".into(),
            Self::Banned(detail) => {
                if detail.is_empty() {
                    "banned".into()
                } else {
                    format!("banned: {detail}")
                }
            }
            Self::ClientOutdated => "client_outdated".into(),
            Self::Stopped => "stopped".into(),
        }
    }
}

/// An incoming message: the domain's own type, so the worker records it as it is.
pub use anna_domain::session::ReceivedMessage as IncomingMessage;

/// What a live connection reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverEvent {
    /// A QR code to show; valid for `ttl`.
    Qr { code: String, ttl: Duration },
    /// A phone-number pairing code to type on the phone; valid for `ttl`.
    PairCode { code: String, ttl: Duration },
    /// The phone accepted the pairing; `phone` is the account's JID.
    Paired { phone: String },
    /// Logged in and ready to send.
    Connected { phone: String },
    /// The connection dropped; the driver does NOT reconnect by itself (`will_retry` false)
    /// unless it says so.
    Disconnected { reason: CloseReason, will_retry: bool },
    /// A message arrived (or was sent from the phone).
    Message(Box<IncomingMessage>),
    /// A piece of the history the phone sends after pairing (bounded in size: a large history
    /// comes as many pieces).
    History(HistoryPiece, HistorySlot),
    /// A message was edited, deleted for everyone or reacted to.
    Changed(MessageChange),
    /// Someone came online or went offline, or typed, recorded or paused in a chat.
    Presence(PresenceChange),
    /// The account's phone (or another of its devices) marked a chat read.
    ChatRead { chat: String, at: OffsetDateTime },
    /// A sent message progressed.
    Receipt { message_id: String, chat: String, status: ReceiptStatus, at: OffsetDateTime },
    /// The server refused a message that `send_text` had reported written.
    SendRejected { message_id: String, error: String },
    /// The connection is finished (after `stop`, a logout, a ban, QR exhaustion or a
    /// replacement); a new `connect` is needed to resume.
    Closed { reason: CloseReason },
}

/// Simulated happenings, for the simulator only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simulation {
    /// The QR code was scanned on a phone.
    Scan,
    /// The network dropped.
    Disconnect,
    /// The phone unlinked this device.
    Logout,
    /// The number was banned.
    Ban,
    /// Contacts send a burst of messages at once (load for benchmarks and tests).
    Burst,
}

impl Simulation {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "scan" => Some(Self::Scan),
            "disconnect" => Some(Self::Disconnect),
            "logout" => Some(Self::Logout),
            "ban" => Some(Self::Ban),
            "burst" => Some(Self::Burst),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scan => "scan",
            Self::Disconnect => "disconnect",
            Self::Logout => "logout",
            Self::Ban => "ban",
            Self::Burst => "burst",
        }
    }
}

/// One live connection of one session.
#[async_trait]
pub trait LiveSession: Send + Sync {
    /// Sends a text. `Ok` means written to the connection, not accepted: acceptance arrives as
    /// a `Receipt` (or a `SendRejected`).
    async fn send_text(&self, message: &OutgoingText) -> Result<SentMessage, DriverError>;

    /// Uploads a file to WhatsApp and sends it, like `send_text`.
    async fn send_media(&self, message: &OutgoingMedia) -> Result<SentMessage, DriverError>;

    /// Fetches the file of a received message into `into` (a new, empty file), never writing
    /// more than `limit` bytes: a larger file fails. Returns its size.
    async fn download_media(&self, media: &IncomingMedia, limit: u64, into: std::fs::File) -> Result<u64, DriverError>;

    /// Starts pairing by phone number (digits, international format); the code arrives as
    /// [`DriverEvent::PairCode`] and is also returned.
    async fn pair_with_code(&self, phone: &str) -> Result<String, DriverError>;

    /// Sends read receipts for messages of one chat.
    async fn mark_read(&self, chat: &Jid, messages: &[MessageTarget]) -> Result<(), DriverError>;

    /// Replaces the text of a message this account sent.
    async fn edit_text(&self, target: &MessageTarget, text: &str) -> Result<(), DriverError>;

    /// Deletes a message for everyone: one of this account's, or, as a group admin, another
    /// member's.
    async fn revoke(&self, target: &MessageTarget) -> Result<(), DriverError>;

    /// Reacts to a message with `emoji`; an empty one removes this account's reaction.
    async fn react(&self, target: &MessageTarget, emoji: &str) -> Result<(), DriverError>;

    /// Unlinks the device from the phone, then closes. The caller wipes the stored keys.
    async fn logout(&self) -> Result<(), DriverError>;

    /// Closes the connection, keeping the device linked (worker shutdown, stop). Final.
    async fn stop(&self);

    /// Applies a simulated happening (simulator only).
    async fn simulate(&self, simulation: Simulation) -> Result<(), DriverError>;
}

/// Opens connections.
#[async_trait]
pub trait SessionDriver: Send + Sync + 'static {
    /// `whatsapp` or `simulator`.
    fn name(&self) -> &'static str;

    /// Opens a connection for `session`, resuming from its stored device keys when it is
    /// paired and starting a QR pairing when it is not. Events go to `events` until
    /// [`DriverEvent::Closed`].
    async fn connect(
        &self,
        session: SessionKey,
        events: mpsc::Sender<DriverEvent>,
    ) -> Result<Arc<dyn LiveSession>, DriverError>;

    /// Whether the session has a paired device stored.
    async fn is_paired(&self, session: SessionKey) -> Result<bool, DriverError>;

    /// Deletes the session's device keys.
    async fn wipe(&self, session: SessionKey) -> Result<(), DriverError>;
}
