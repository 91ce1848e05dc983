//! The simulator: an in-process fake WhatsApp network, selected explicitly with
//! `SESSIONS_PROVIDER=simulator` and labelled as such wherever it shows.
//!
//! It keeps WhatsApp's pairing timings (first QR code valid 60 s, then 20 s each, then
//! exhausted: the connection closes with `qr_timeout`), demands a restart after a successful
//! scan like the real server, and keeps its simulated device in the same device-key store as
//! the real client, so a paired simulated session resumes after a restart or on another worker
//! exactly like a real one. Every valid phone number is a simulated contact: it receives
//! messages, sends server, delivery and read receipts, comes online, types, replies and goes
//! offline again (presence). Disconnects, logouts and bans can be injected.
//!
//! On the first connection after pairing the simulated phone sends a history sync of
//! `history_messages` messages over `history_chats` chats (pieces of
//! [`crate::HISTORY_PIECE_MESSAGES`]), resent whole if the connection drops before it is done.
//!
//! A simulated contact also follows words in the text it receives, so edits, deletions and
//! reactions arriving from the other side can be tried: `#react` — it reacts 👍 to the message;
//! `#edit` — it edits its reply; `#delete` — it deletes its reply for everyone (both after
//! replying, so only with replies on); `#image`, `#video`, `#audio`, `#document`, `#sticker` —
//! its reply carries a small file of that kind; `#echo` (in the caption of a file sent to it) —
//! it sends the same file back; `#lid` — its reply comes addressed by its LID, with its phone
//! JID as the alternative address, as WhatsApp addresses more and more chats. Files travel through a simulated media server of the
//! connection (the last [`SIMULATED_FILES_KEPT`] files), from which `download_media` fetches them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anna_store::DeviceKeyStore;
use async_trait::async_trait;
use rand::Rng;
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::{Mutex, Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    ChangeKind, CloseReason, DriverError, DriverEvent, HISTORY_PIECE_MESSAGES, HistoryChat, HistoryContact,
    HistoryMessage, HistoryPiece, HistorySlot, IncomingMedia, IncomingMessage, Jid, LiveSession, MediaKind,
    MessageChange, MessageContext, MessageTarget, OutgoingMedia, OutgoingText, Presence, PresenceChange, RawMessage,
    ReceiptStatus, SentMessage, SessionDriver, SessionKey, Simulation, jid,
};

/// What a simulated contact does, besides replying, when the text it receives asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct ContactScript {
    react: bool,
    edit_reply: bool,
    delete_reply: bool,
    /// The reply carries a file of this kind.
    send_media: Option<MediaKind>,
    /// The reply carries the file received.
    echo: bool,
    /// The reply comes addressed by the contact's LID (with its phone JID as the alternative),
    /// as WhatsApp addresses more and more chats.
    by_lid: bool,
}

impl ContactScript {
    fn of(text: &str) -> Self {
        Self {
            react: text.contains("#react"),
            edit_reply: text.contains("#edit"),
            delete_reply: text.contains("#delete"),
            send_media: MediaKind::ALL.into_iter().find(|kind| text.contains(&format!("#{}", kind.as_str()))),
            echo: text.contains("#echo"),
            by_lid: text.contains("#lid"),
        }
    }
}

/// Files the simulated media server of a connection keeps (uploads and contacts' files).
pub const SIMULATED_FILES_KEPT: usize = 32;

/// A file on the simulated media server.
#[derive(Debug, Clone)]
struct SimulatedFile {
    path: String,
    kind: MediaKind,
    mime: String,
    file_name: Option<String>,
    bytes: bytes::Bytes,
}

impl SimulatedFile {
    /// What a message carrying it tells: the path to fetch it from, never the bytes.
    fn as_incoming(&self) -> IncomingMedia {
        IncomingMedia {
            kind: self.kind,
            mime: Some(self.mime.clone()),
            file_name: self.file_name.clone(),
            size: Some(self.bytes.len() as u64),
            width: matches!(self.kind, MediaKind::Image | MediaKind::Sticker).then_some(1),
            height: matches!(self.kind, MediaKind::Image | MediaKind::Sticker).then_some(1),
            duration: matches!(self.kind, MediaKind::Audio | MediaKind::Video).then_some(1),
            download: json!({"simulatedPath": self.path}),
        }
    }

    /// A small file of `kind` whose first bytes are those of the real format.
    fn sample(kind: MediaKind) -> Self {
        let (mime, name, bytes): (&str, &str, &[u8]) = match kind {
            MediaKind::Image => ("image/png", "photo.png", SAMPLE_PNG),
            MediaKind::Sticker => ("image/webp", "sticker.webp", b"RIFF\x1a\0\0\0WEBPVP8L\x0d\0\0\0\x2f\0\0\0\x10\x07\x10\x11\x11\x88\x88\xfe\x07\0"),
            MediaKind::Video => ("video/mp4", "clip.mp4", b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom\0\0\0\x08free"),
            MediaKind::Audio => ("audio/ogg; codecs=opus", "voice.ogg", b"OggS\0\x02\0\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\0\0\0\0\x01\x13OpusHead\x01\x01\x38\x01\x80\xbb\0\0\0\0\0"),
            MediaKind::Document => ("application/pdf", "report.pdf", b"%PDF-1.4\n%simulated\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"),
        };
        Self {
            path: format!("/simulated/{}", message_id_like_whatsapp()),
            kind,
            mime: mime.to_owned(),
            file_name: (kind == MediaKind::Document).then(|| name.to_owned()),
            bytes: bytes::Bytes::from_static(bytes),
        }
    }
}

/// A 1×1 PNG.
const SAMPLE_PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89\0\0\0\rIDATx\x9cc\xf8\xff\xff?\0\x05\xfe\x02\xfe\xa7\x35\x81\x84\0\0\0\0IEND\xaeB`\x82";

/// The key of the simulated device in the credentials document.
const DEVICE: &str = "simulatedDevice";

#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// Validity of the first QR code (WhatsApp: 60 s).
    pub first_qr_ttl: Duration,
    /// Validity of each later code (WhatsApp: 20 s).
    pub next_qr_ttl: Duration,
    /// Codes shown before the pairing gives up (WhatsApp: about 6).
    pub qr_codes: u32,
    /// Time from opening a paired connection to `Connected`.
    pub connect_delay: Duration,
    pub server_ack_delay: Duration,
    pub delivered_delay: Duration,
    pub read_delay: Duration,
    /// Time until a contact replies; `None`: contacts never reply.
    pub reply_delay: Option<Duration>,
    /// Messages in the history sync sent after pairing.
    pub history_messages: u64,
    /// Chats they are spread over (at least one when there are messages).
    pub history_chats: u32,
    /// Messages of a simulated burst (`burst`), from ten contacts.
    pub burst_messages: u64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            first_qr_ttl: Duration::from_secs(60),
            next_qr_ttl: Duration::from_secs(20),
            qr_codes: 6,
            connect_delay: Duration::from_millis(300),
            server_ack_delay: Duration::from_millis(20),
            delivered_delay: Duration::from_millis(300),
            read_delay: Duration::from_millis(1200),
            reply_delay: Some(Duration::from_millis(1500)),
            history_messages: 60,
            history_chats: 4,
            burst_messages: 100,
        }
    }
}

/// The simulated network; one per process.
pub struct Simulator {
    store: Arc<dyn DeviceKeyStore>,
    config: SimulatorConfig,
}

impl Simulator {
    pub fn new(store: Arc<dyn DeviceKeyStore>, config: SimulatorConfig) -> Self {
        Self { store, config }
    }

    async fn paired_phone(&self, session: SessionKey) -> Result<Option<String>, DriverError> {
        let creds = self.store.load_creds(session.session_id).await?;
        Ok(creds.and_then(|creds| creds[DEVICE]["phone"].as_str().map(str::to_owned)))
    }
}

#[async_trait]
impl SessionDriver for Simulator {
    fn name(&self) -> &'static str {
        "simulator"
    }

    async fn connect(
        &self,
        session: SessionKey,
        events: mpsc::Sender<DriverEvent>,
    ) -> Result<Arc<dyn LiveSession>, DriverError> {
        let phone = self.paired_phone(session).await?;
        let live = Arc::new(Connection {
            session,
            store: self.store.clone(),
            config: self.config.clone(),
            events,
            cancel: CancellationToken::new(),
            closed: AtomicBool::new(false),
            scanned: Notify::new(),
            state: Mutex::new(ConnectionState { phone: phone.clone(), connected: false, pair_phone: None }),
            history_slots: Arc::new(tokio::sync::Semaphore::new(crate::HISTORY_PIECES_IN_FLIGHT)),
            files: Mutex::new(std::collections::VecDeque::new()),
        });
        let task = live.clone();
        match phone {
            Some(phone) => tokio::spawn(async move { task.resume(phone).await }),
            None => tokio::spawn(async move { task.pair().await }),
        };
        Ok(Arc::new(SimulatedConnection(live)))
    }

    async fn is_paired(&self, session: SessionKey) -> Result<bool, DriverError> {
        Ok(self.paired_phone(session).await?.is_some())
    }

    async fn wipe(&self, session: SessionKey) -> Result<(), DriverError> {
        Ok(self.store.wipe_device(session.session_id).await?)
    }
}

struct ConnectionState {
    phone: Option<String>,
    connected: bool,
    /// The number given for pairing by code, if any.
    pair_phone: Option<String>,
}

/// One simulated connection; its tasks share [`Connection`].
struct SimulatedConnection(Arc<Connection>);

struct Connection {
    session: SessionKey,
    store: Arc<dyn DeviceKeyStore>,
    config: SimulatorConfig,
    events: mpsc::Sender<DriverEvent>,
    cancel: CancellationToken,
    closed: AtomicBool,
    scanned: Notify,
    state: Mutex<ConnectionState>,
    /// History pieces on their way to the database.
    history_slots: Arc<tokio::sync::Semaphore>,
    /// The simulated media server: the last files uploaded or sent by contacts.
    files: Mutex<std::collections::VecDeque<SimulatedFile>>,
}

impl Connection {
    async fn emit(&self, event: DriverEvent) {
        if !self.closed.load(Ordering::Acquire) {
            // A worker that stopped listening has dropped the connection: nothing to tell.
            let _ = self.events.send(event).await;
        }
    }

    /// Ends the connection once; later events are dropped.
    async fn close(&self, reason: CloseReason) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.cancel.cancel();
        self.state.lock().await.connected = false;
        let _ = self.events.send(DriverEvent::Closed { reason }).await;
    }

    async fn resume(self: Arc<Self>, phone: String) {
        tokio::select! {
            () = self.cancel.cancelled() => return,
            () = tokio::time::sleep(self.config.connect_delay) => {}
        }
        self.state.lock().await.connected = true;
        self.emit(DriverEvent::Connected { phone }).await;
        if let Err(error) = self.send_history().await {
            tracing::warn!(session_id = %self.session.session_id, %error, "Simulated history sync failed");
        }
    }

    /// The history sync a phone sends its new companion: once, after pairing.
    async fn send_history(&self) -> Result<(), DriverError> {
        let Some(mut device) = self.store.load_creds(self.session.session_id).await? else { return Ok(()) };
        let Some(seed) = device[DEVICE]["historySeed"].as_u64() else { return Ok(()) };
        let total = self.config.history_messages;
        let chats = u64::from(self.config.history_chats.max(1));
        let listed = if total == 0 { 0 } else { chats.min(total) };
        let contact = |chat: u64| format!("1555020{chat:04}@{}", jid::USER_SERVER);
        let name = |chat: u64| format!("History contact {chat}");
        let now = OffsetDateTime::now_utc();
        let span = time::Duration::days(30);
        let mut piece = HistoryPiece {
            sync_type: "initial_bootstrap".into(),
            progress: Some(0),
            chats: (0..listed)
                .map(|chat| HistoryChat {
                    jid: contact(chat),
                    alt: None,
                    name: Some(name(chat)),
                    unread_count: Some((chat % 3) as u32),
                })
                .collect(),
            contacts: (0..listed)
                .map(|chat| HistoryContact { jid: contact(chat), push_name: Some(name(chat)), name: None })
                .collect(),
            messages: Vec::new(),
            reactions: Vec::new(),
        };
        for n in 0..total {
            let chat = contact(n % chats);
            let from_me = n % 3 == 0;
            let offset = i64::try_from(n).unwrap_or(i64::MAX).saturating_mul(span.whole_seconds())
                / i64::try_from(total).unwrap_or(1).max(1);
            piece.messages.push(HistoryMessage {
                message: IncomingMessage {
                    message_id: format!("3EB0{:016X}", seed.wrapping_add(n)),
                    chat: chat.clone(),
                    sender: chat,
                    push_name: (!from_me).then(|| name(n % chats)),
                    text: Some(format!("History message {n}")),
                    from_me,
                    timestamp: now - span + time::Duration::seconds(offset),
                    media: None,
                    chat_alt: None,
                    context: Default::default(),
                    raw: None,
                }
                .with_simulated_raw(),
                status: from_me.then(|| "read".to_owned()),
            });
            // Contacts reacted to some of the account's messages.
            if from_me && n % 9 == 0 {
                piece.reactions.push(MessageChange {
                    chat: contact(n % chats),
                    message_id: format!("3EB0{:016X}", seed.wrapping_add(n)),
                    actor: contact(n % chats),
                    from_me: false,
                    at: now - span + time::Duration::seconds(offset + 60),
                    kind: ChangeKind::Reaction { emoji: Some("❤️".into()) },
                });
            }
            if piece.messages.len() >= HISTORY_PIECE_MESSAGES {
                piece.progress = Some(u32::try_from((n + 1) * 100 / total).unwrap_or(100));
                if self.cancel.is_cancelled() {
                    return Ok(());
                }
                let Some(slot) = self.history_slot().await else { return Ok(()) };
                self.emit(DriverEvent::History(std::mem::take(&mut piece), slot)).await;
                piece.sync_type = "initial_bootstrap".into();
            }
        }
        // Handed over whole, or sent again on the next connection.
        if self.cancel.is_cancelled() || self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        if !piece.is_empty() {
            piece.progress = Some(100);
            let Some(slot) = self.history_slot().await else { return Ok(()) };
            self.emit(DriverEvent::History(piece, slot)).await;
        }
        if let Some(fields) = device[DEVICE].as_object_mut() {
            fields.remove("historySeed");
        }
        self.store.save_creds(self.session.session_id, self.session.tenant_id, &device).await?;
        Ok(())
    }

    async fn pair(self: Arc<Self>) {
        for shown in 0..self.config.qr_codes {
            let ttl = if shown == 0 { self.config.first_qr_ttl } else { self.config.next_qr_ttl };
            self.emit(DriverEvent::Qr { code: qr_payload(), ttl }).await;
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = self.scanned.notified() => return self.complete_pairing().await,
                () = tokio::time::sleep(ttl) => {}
            }
        }
        self.close(CloseReason::QrTimeout).await;
    }

    /// Like WhatsApp: the pairing succeeds, then the server closes the stream and demands a
    /// restart; the new connection logs in with the stored device.
    async fn complete_pairing(&self) {
        let phone = {
            let state = self.state.lock().await;
            state.pair_phone.clone().unwrap_or_else(simulated_phone_number)
        };
        let phone = format!("{phone}@{}", jid::USER_SERVER);
        // The seed of the message ids of its history sync (the same if it has to be resent),
        // removed once the history is sent.
        let seed = rand::rng().random::<u64>() >> 8;
        let device = json!({ DEVICE: {
            "phone": phone, "pairedAt": OffsetDateTime::now_utc().unix_timestamp(), "historySeed": seed,
        } });
        if let Err(error) = self.store.save_creds(self.session.session_id, self.session.tenant_id, &device).await {
            tracing::warn!(session_id = %self.session.session_id, %error, "Simulated pairing could not be stored");
            return self.close(CloseReason::Transient("device store unavailable".into())).await;
        }
        self.state.lock().await.phone = Some(phone.clone());
        self.emit(DriverEvent::Paired { phone }).await;
        self.close(CloseReason::RestartRequired).await;
    }

    /// Puts a file on the simulated media server.
    async fn keep_file(&self, file: SimulatedFile) -> IncomingMedia {
        let incoming = file.as_incoming();
        let mut files = self.files.lock().await;
        if files.len() >= SIMULATED_FILES_KEPT {
            files.pop_front();
        }
        files.push_back(file);
        incoming
    }

    async fn contact_answers(
        self: Arc<Self>,
        message_id: String,
        to: String,
        text: String,
        group: bool,
        received: Option<SimulatedFile>,
    ) {
        let config = self.config.clone();
        let script = ContactScript::of(&text);
        let mut elapsed = Duration::ZERO;
        let mut steps = vec![(config.server_ack_delay, Step::Receipt(ReceiptStatus::ServerAck))];
        if !group {
            steps.push((config.delivered_delay, Step::Receipt(ReceiptStatus::Delivered)));
            steps.push((config.read_delay, Step::Receipt(ReceiptStatus::Read)));
            if script.react {
                steps.push((config.read_delay, Step::React));
            }
            if let Some(reply) = config.reply_delay {
                // Online while reading (or just before replying, if that comes first), typing
                // just before the reply, offline after it.
                let typing = reply.saturating_sub(config.server_ack_delay);
                steps.push((config.read_delay.min(typing), Step::Presence(Presence::Available)));
                steps.push((typing, Step::Presence(Presence::Composing)));
                steps.push((reply, Step::Reply));
                steps.push((reply + config.server_ack_delay, Step::Presence(Presence::Unavailable)));
                // The contact changes its mind shortly after replying.
                let later = reply + config.delivered_delay;
                if script.edit_reply {
                    steps.push((later, Step::EditReply));
                }
                if script.delete_reply {
                    steps.push((later + config.server_ack_delay, Step::DeleteReply));
                }
            }
        }
        steps.sort_by_key(|(at, _)| *at);
        let contact = to.clone();
        let mut reply_id = None;
        for (at, step) in steps {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep(at.saturating_sub(elapsed)) => {}
            }
            elapsed = elapsed.max(at);
            let now = OffsetDateTime::now_utc();
            let change = |message_id: &str, kind| {
                DriverEvent::Changed(MessageChange {
                    chat: to.clone(),
                    message_id: message_id.to_owned(),
                    actor: contact.clone(),
                    from_me: false,
                    at: now,
                    kind,
                })
            };
            let event = match step {
                Step::Receipt(status) => {
                    DriverEvent::Receipt { message_id: message_id.clone(), chat: to.clone(), status, at: now }
                }
                Step::React => change(&message_id, ChangeKind::Reaction { emoji: Some("👍".into()) }),
                Step::Presence(presence) => DriverEvent::Presence(PresenceChange {
                    chat: to.clone(),
                    jid: contact.clone(),
                    presence,
                    last_seen: (presence == Presence::Unavailable).then_some(now),
                }),
                Step::Reply => {
                    let quoted: String = text.chars().take(200).collect();
                    let id = message_id_like_whatsapp();
                    reply_id = Some(id.clone());
                    let file = match (script.echo, &received, script.send_media) {
                        (true, Some(received), _) => Some(SimulatedFile {
                            path: format!("/simulated/{}", message_id_like_whatsapp()),
                            ..received.clone()
                        }),
                        (_, _, Some(kind)) => Some(SimulatedFile::sample(kind)),
                        _ => None,
                    };
                    let media = match file {
                        Some(file) => Some(self.keep_file(file).await),
                        None => None,
                    };
                    let (chat, chat_alt) =
                        if script.by_lid { (lid_of(&to), Some(to.clone())) } else { (to.clone(), None) };
                    DriverEvent::Message(Box::new(
                        IncomingMessage {
                            message_id: id,
                            chat: chat.clone(),
                            sender: chat,
                            push_name: Some(format!("Simulated contact {}", to.split('@').next().unwrap_or_default())),
                            text: Some(format!("Simulated reply to: {quoted}")),
                            from_me: false,
                            timestamp: now,
                            media,
                            chat_alt,
                            // The contact quotes the message it answers.
                            context: MessageContext { reply_to: Some(message_id.clone()), ..MessageContext::default() },
                            raw: None,
                        }
                        .with_simulated_raw(),
                    ))
                }
                Step::EditReply => {
                    let Some(reply) = reply_id.as_deref() else { continue };
                    change(reply, ChangeKind::Edited { text: Some("Simulated reply, edited".into()) })
                }
                Step::DeleteReply => {
                    let Some(reply) = reply_id.as_deref() else { continue };
                    change(reply, ChangeKind::Revoked)
                }
            };
            self.emit(event).await;
        }
    }

    /// Ten contacts send `burst_messages` messages as fast as the worker takes them.
    async fn burst(&self) {
        let seed = rand::rng().random::<u64>() >> 8;
        for n in 0..self.config.burst_messages {
            if self.cancel.is_cancelled() {
                return;
            }
            let contact = format!("1555030{:04}@{}", n % 10, jid::USER_SERVER);
            self.emit(DriverEvent::Message(Box::new(
                IncomingMessage {
                    message_id: format!("3EB0{:016X}", seed.wrapping_add(n)),
                    chat: contact.clone(),
                    sender: contact,
                    push_name: Some(format!("Burst contact {}", n % 10)),
                    text: Some(format!("Burst message {n}")),
                    from_me: false,
                    timestamp: OffsetDateTime::now_utc(),
                    media: None,
                    chat_alt: None,
                    context: Default::default(),
                    raw: None,
                }
                .with_simulated_raw(),
            )))
            .await;
        }
    }

    /// A place for one more history piece on its way to the database; `None` once closed.
    async fn history_slot(&self) -> Option<HistorySlot> {
        tokio::select! {
            () = self.cancel.cancelled() => None,
            permit = self.history_slots.clone().acquire_owned() => permit.ok().map(HistorySlot::new),
        }
    }

    /// Refuses an action on a connection that is not logged in.
    async fn ensure_connected(&self) -> Result<(), DriverError> {
        if !self.state.lock().await.connected || self.closed.load(Ordering::Acquire) {
            return Err(DriverError::NotConnected);
        }
        Ok(())
    }
}

/// One step of a simulated contact's answer to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Receipt(ReceiptStatus),
    Presence(Presence),
    React,
    Reply,
    EditReply,
    DeleteReply,
}

#[async_trait]
impl LiveSession for SimulatedConnection {
    async fn send_text(&self, message: &OutgoingText) -> Result<SentMessage, DriverError> {
        let connection = &self.0;
        connection.ensure_connected().await?;
        let message_id = message_id_like_whatsapp();
        let answering = connection.clone();
        let (id, to, text, group) =
            (message_id.clone(), message.to.to_string(), message.text.clone(), message.to.is_group());
        tokio::spawn(async move { answering.contact_answers(id, to, text, group, None).await });
        let context = MessageContext {
            reply_to: message.reply_to.clone(),
            forwarding_score: message.forwarding_score,
            ..MessageContext::default()
        };
        let raw = sent_raw(&message_id, &message.to, Some(&message.text), None, &context, false);
        Ok(SentMessage { message_id, raw: Some(raw) })
    }

    async fn send_media(&self, message: &OutgoingMedia) -> Result<SentMessage, DriverError> {
        let connection = &self.0;
        connection.ensure_connected().await?;
        if message.bytes.is_empty() {
            return Err(DriverError::Invalid("the file is empty".into()));
        }
        // The simulated upload: the file is on the media server, as WhatsApp's would be.
        let file = SimulatedFile {
            path: format!("/simulated/{}", message_id_like_whatsapp()),
            kind: message.kind,
            mime: message.mime.clone(),
            file_name: Some(message.file_name.clone()),
            bytes: message.bytes.clone(),
        };
        connection.keep_file(file.clone()).await;
        let message_id = message_id_like_whatsapp();
        let answering = connection.clone();
        let text = message.caption.clone().unwrap_or_else(|| format!("[{}]", message.kind.as_str()));
        let (id, to, group) = (message_id.clone(), message.to.to_string(), message.to.is_group());
        tokio::spawn(async move { answering.contact_answers(id, to, text, group, Some(file)).await });
        let described = IncomingMedia {
            kind: message.kind,
            mime: Some(message.mime.clone()),
            file_name: Some(message.file_name.clone()),
            size: Some(message.bytes.len() as u64),
            width: None,
            height: None,
            duration: None,
            download: serde_json::Value::Null,
        };
        let context = MessageContext {
            reply_to: message.reply_to.clone(),
            forwarding_score: message.forwarding_score,
            ..MessageContext::default()
        };
        let raw =
            sent_raw(&message_id, &message.to, message.caption.as_deref(), Some(&described), &context, message.ptt);
        Ok(SentMessage { message_id, raw: Some(raw) })
    }

    async fn download_media(
        &self,
        media: &IncomingMedia,
        limit: u64,
        mut into: std::fs::File,
    ) -> Result<u64, DriverError> {
        let path = media.download.get("simulatedPath").and_then(|p| p.as_str()).unwrap_or_default();
        let bytes = {
            let files = self.0.files.lock().await;
            let file = files
                .iter()
                .find(|file| file.path == path)
                .ok_or_else(|| DriverError::Failed(format!("the simulated media server has no file {path:?}")))?;
            file.bytes.clone()
        };
        if bytes.len() as u64 > limit {
            return Err(DriverError::Invalid(format!("the file is larger than {limit} bytes")));
        }
        tokio::task::spawn_blocking(move || std::io::Write::write_all(&mut into, &bytes).map(|()| bytes.len() as u64))
            .await
            .map_err(|e| DriverError::Failed(e.to_string()))?
            .map_err(|e| DriverError::Failed(format!("writing the file: {e}")))
    }

    async fn mark_read(&self, _chat: &Jid, _messages: &[MessageTarget]) -> Result<(), DriverError> {
        self.0.ensure_connected().await
    }

    async fn edit_text(&self, target: &MessageTarget, text: &str) -> Result<(), DriverError> {
        self.0.ensure_connected().await?;
        if !target.from_me {
            return Err(DriverError::Invalid("only messages sent by this account can be edited".into()));
        }
        if text.is_empty() {
            return Err(DriverError::Invalid("the text is empty".into()));
        }
        Ok(())
    }

    async fn revoke(&self, target: &MessageTarget) -> Result<(), DriverError> {
        self.0.ensure_connected().await?;
        // The simulated account is admin of every group, like the creator of a new one.
        if !target.from_me && !target.chat.is_group() {
            return Err(DriverError::Invalid("only messages sent by this account can be deleted for everyone".into()));
        }
        Ok(())
    }

    async fn react(&self, _target: &MessageTarget, _emoji: &str) -> Result<(), DriverError> {
        self.0.ensure_connected().await
    }

    async fn pair_with_code(&self, phone: &str) -> Result<String, DriverError> {
        let digits = jid::phone_digits(phone).map_err(|e| DriverError::Invalid(format!("phone {e}")))?;
        {
            let mut state = self.0.state.lock().await;
            if state.phone.is_some() {
                return Err(DriverError::Invalid("the session is already paired".into()));
            }
            state.pair_phone = Some(digits);
        }
        let code = pair_code();
        self.0.emit(DriverEvent::PairCode { code: code.clone(), ttl: Duration::from_secs(180) }).await;
        Ok(code)
    }

    async fn logout(&self) -> Result<(), DriverError> {
        self.0.close(CloseReason::LoggedOut("logged out".into())).await;
        Ok(())
    }

    async fn stop(&self) {
        self.0.close(CloseReason::Stopped).await;
    }

    async fn simulate(&self, simulation: Simulation) -> Result<(), DriverError> {
        let (paired, connected) = {
            let state = self.0.state.lock().await;
            (state.phone.is_some(), state.connected)
        };
        match simulation {
            Simulation::Scan if paired => Err(DriverError::Invalid("the session is already paired".into())),
            Simulation::Scan => {
                self.0.scanned.notify_one();
                Ok(())
            }
            Simulation::Disconnect if !connected => Err(DriverError::NotConnected),
            Simulation::Disconnect => {
                self.0.close(CloseReason::Transient("simulated network drop".into())).await;
                Ok(())
            }
            Simulation::Logout if !paired => Err(DriverError::Invalid("the session is not paired".into())),
            Simulation::Logout => {
                self.0.close(CloseReason::LoggedOut("unlinked on the simulated phone".into())).await;
                Ok(())
            }
            Simulation::Burst if !connected => Err(DriverError::NotConnected),
            Simulation::Burst => {
                let connection = self.0.clone();
                tokio::spawn(async move { connection.burst().await });
                Ok(())
            }
            Simulation::Ban if !paired => Err(DriverError::Invalid("the session is not paired".into())),
            Simulation::Ban => {
                self.0.close(CloseReason::Banned("simulated temporary ban".into())).await;
                Ok(())
            }
        }
    }
}

/// A QR payload shaped like WhatsApp's: `ref,noise public key,identity public key,adv secret`,
/// base64 parts, marked as simulated so nobody mistakes it for a real code.
fn qr_payload() -> String {
    let mut rng = rand::rng();
    let mut part = |len: usize| -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        (0..len).map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())])).collect()
    };
    format!("2@SIMULATED{},{}=,{}=,{}=", part(40), part(43), part(43), part(43))
}

/// 8 characters from the alphabet WhatsApp uses for linking codes (no 0/O, 1/I).
fn pair_code() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTVWXYZ123456789";
    let mut rng = rand::rng();
    (0..8).map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())])).collect()
}

/// The simulated LID of a contact's phone JID: a number of WhatsApp's LID length, derived from
/// the phone number so a contact keeps its LID.
pub fn lid_of(phone_jid: &str) -> String {
    let digits: u64 = phone_jid.split('@').next().and_then(|user| user.parse().ok()).unwrap_or_default();
    format!("{}@{}", 200_000_000_000_000 + digits % 100_000_000_000_000, jid::LID_SERVER)
}

/// A simulated message with the raw form a phone would record for it: a `WebMessageInfo` as
/// protobuf JSON, the shape the real driver stores.
trait WithSimulatedRaw {
    fn with_simulated_raw(self) -> Self;
}

impl WithSimulatedRaw for IncomingMessage {
    fn with_simulated_raw(mut self) -> Self {
        let group = self.chat.ends_with("@g.us");
        let participant = (group && !self.from_me).then_some(self.sender.as_str());
        let content = message_content(self.text.as_deref(), self.media.as_ref(), &self.context);
        let mut info = json!({
            "key": {"remoteJid": self.chat, "fromMe": self.from_me, "id": self.message_id},
            "messageTimestamp": self.timestamp.unix_timestamp(),
            "message": content,
        });
        if let Some(participant) = participant {
            info["key"]["participant"] = json!(participant);
        }
        if let Some(name) = &self.push_name {
            info["pushName"] = json!(name);
        }
        self.raw = Some(RawMessage::new(info));
        self
    }
}

/// The raw form of a message the simulated account sent (`ptt`: an audio file sent as a voice
/// note).
fn sent_raw(
    message_id: &str,
    to: &Jid,
    text: Option<&str>,
    media: Option<&IncomingMedia>,
    context: &MessageContext,
    ptt: bool,
) -> RawMessage {
    let mut content = message_content(text, media, context);
    if ptt && let Some(audio) = content.get_mut("audioMessage") {
        audio["ptt"] = json!(true);
    }
    RawMessage::new(json!({
        "key": {"remoteJid": to.to_string(), "fromMe": true, "id": message_id},
        "messageTimestamp": OffsetDateTime::now_utc().unix_timestamp(),
        "message": content,
    }))
}

/// A message's content as WhatsApp's protobuf JSON names it: a plain `conversation`, a text
/// with context (`extendedTextMessage`), or a media message with its caption.
fn message_content(text: Option<&str>, media: Option<&IncomingMedia>, context: &MessageContext) -> serde_json::Value {
    let mut info = serde_json::Map::new();
    if let Some(id) = &context.reply_to {
        info.insert("stanzaId".into(), json!(id));
    }
    if let Some(participant) = &context.reply_to_participant {
        info.insert("participant".into(), json!(participant));
    }
    if !context.mentions.is_empty() {
        info.insert("mentionedJid".into(), json!(context.mentions));
    }
    if let Some(score) = context.forwarding_score {
        info.insert("isForwarded".into(), json!(true));
        info.insert("forwardingScore".into(), json!(score));
    }
    let mut fields = serde_json::Map::new();
    let kind = match media {
        Some(media) => {
            let described = [
                ("mimetype", json!(media.mime)),
                ("fileName", json!(media.file_name)),
                ("fileLength", json!(media.size)),
                ("caption", json!(text)),
            ];
            fields.extend(described.into_iter().filter(|(_, value)| !value.is_null()).map(|(k, v)| (k.to_owned(), v)));
            media.kind.message_type()
        }
        None if info.is_empty() => return json!({"conversation": text.unwrap_or_default()}),
        None => {
            fields.insert("text".into(), json!(text.unwrap_or_default()));
            "extendedTextMessage"
        }
    };
    if !info.is_empty() {
        fields.insert("contextInfo".into(), serde_json::Value::Object(info));
    }
    json!({ kind: fields })
}

/// WhatsApp Web message ids: `3EB0` and 16 upper-case hex digits.
fn message_id_like_whatsapp() -> String {
    format!("3EB0{:016X}", rand::rng().random::<u64>())
}

/// A phone number for a session paired by QR (the simulated phone that scanned it). Uses the
/// fictional +1 555 01xx range when shown to people.
fn simulated_phone_number() -> String {
    format!("1555{:07}", rand::rng().random_range(0..10_000_000u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_look_like_whatsapp() {
        let qr = qr_payload();
        assert!(qr.starts_with("2@SIMULATED"));
        assert_eq!(qr.split(',').count(), 4);
        let code = pair_code();
        assert_eq!(code.len(), 8);
        assert!(!code.contains('0') && !code.contains('O') && !code.contains('I'));
        let id = message_id_like_whatsapp();
        assert_eq!(id.len(), 20);
        assert!(id.starts_with("3EB0"));
        assert!(jid::Jid::phone(&simulated_phone_number()).is_ok());
    }

    #[test]
    fn contacts_follow_the_words_of_the_text() {
        assert_eq!(ContactScript::of("hello"), ContactScript::default());
        let all = ContactScript::of("please #react, #edit and #delete");
        assert!(all.react && all.edit_reply && all.delete_reply);
        assert_eq!(ContactScript::of("a #document please").send_media, Some(MediaKind::Document));
        assert!(ContactScript::of("#echo").echo && ContactScript::of("#lid").by_lid);
        assert_eq!(lid_of("15550100123@s.whatsapp.net"), "200015550100123@lid");
        assert!(jid::Jid::parse(&lid_of("15550100123@s.whatsapp.net")).is_ok());
    }

    #[test]
    fn sample_files_are_what_they_say() {
        for kind in MediaKind::ALL {
            let file = SimulatedFile::sample(kind);
            let found = infer::get(&file.bytes).map(|t| t.mime_type());
            assert!(found.is_some(), "the {} sample is not recognised", kind.as_str());
        }
    }
}
