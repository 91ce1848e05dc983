//! The WhatsApp session aggregate: a tenant's link to one WhatsApp account, and its state
//! machine.
//!
//! ```text
//!   create ──► pending_qr ──scan──► connected ◄──► disconnected
//!                 │                    │                │
//!                 └──► failed ◄────────┴────────────────┘   (qr_timeout, banned, replaced, …)
//!                      logged_out ◄── any                    (phone unlinked, logout)
//! ```
//! `failed` and `logged_out` end a connection; starting the session again leaves them. Every
//! transition carries its reason and yields its domain event; a transition to the state the
//! session is already in yields nothing (drivers repeat themselves after reconnects).

use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::DomainEvent;
use crate::events::RAW_MESSAGE;
use crate::media::{IncomingMedia, StoredMedia};
use crate::user::iso;

pub const SESSION_CREATED: &str = "session.created";
pub const SESSION_QR_UPDATED: &str = "session.qr.updated";
pub const SESSION_PAIR_CODE_ISSUED: &str = "session.pair_code.issued";
pub const SESSION_CONNECTED: &str = "session.status.connected";
pub const SESSION_DISCONNECTED: &str = "session.status.disconnected";
pub const SESSION_FAILED: &str = "session.status.failed";
pub const SESSION_LOGGED_OUT: &str = "session.logged_out";
pub const SESSION_DELETED: &str = "session.deleted";
pub const SESSION_MESSAGE_SENT: &str = "session.message.sent";
pub const SESSION_MESSAGE_FAILED: &str = "session.message.failed";
pub const SESSION_MESSAGE_RECEIVED: &str = "session.message.received";
pub const SESSION_MESSAGE_STATUS: &str = "session.message.status";
/// Changes to messages, by the predecessor's names and payloads (one change per event).
pub const SESSION_MESSAGES_EDIT: &str = "session.messages.edit";
pub const SESSION_MESSAGES_DELETE: &str = "session.messages.delete";
pub const SESSION_MESSAGES_REACTION: &str = "session.messages.reaction";
/// Someone in a chat came online or went offline, started or stopped typing or recording.
pub const SESSION_PRESENCE_UPDATE: &str = "session.presence.update";
/// Media of messages was stored (received media downloaded; the predecessor's event).
pub const SESSION_MESSAGES_MEDIA: &str = "session.messages.media";
/// A piece of a history sync was stored: a summary (counts, progress), not the messages.
pub const SESSION_HISTORY_SYNC: &str = "session.history.sync";
/// A chat changed: anna emits it when the tenant marks a chat read (its unread count is 0).
pub const SESSION_CHATS_UPDATE: &str = "session.chats.update";
/// A session command other than a send could not be carried out (a send has
/// `session.message.failed`).
pub const SESSION_COMMAND_FAILED: &str = "session.command.failed";

/// Longest reason kept (reasons given by tenants when stopping, or by WhatsApp).
pub const MAX_REASON_CHARS: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionStatus {
    PendingQr,
    Connected,
    Disconnected,
    LoggedOut,
    Failed,
}

impl SessionStatus {
    pub const ALL: [Self; 5] = [Self::PendingQr, Self::Connected, Self::Disconnected, Self::LoggedOut, Self::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PendingQr => "pending_qr",
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::LoggedOut => "logged_out",
            Self::Failed => "failed",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "pending_qr" => Self::PendingQr,
            "connected" => Self::Connected,
            "disconnected" => Self::Disconnected,
            "logged_out" => Self::LoggedOut,
            "failed" => Self::Failed,
            // The predecessor declared `expired` but never wrote it.
            "expired" => Self::Failed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub status: SessionStatus,
    /// The linked account's JID, once paired.
    pub phone: Option<String>,
    pub qr: Option<String>,
    pub qr_expires_at: Option<OffsetDateTime>,
    pub connected_at: Option<OffsetDateTime>,
    pub disconnected_at: Option<OffsetDateTime>,
    /// Why the session last left `connected` or `pending_qr`.
    pub disconnected_reason: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// A reason, cut to [`MAX_REASON_CHARS`] with control characters replaced, so it is safe to
/// store, log and show.
pub fn clean_reason(reason: &str) -> String {
    let cleaned: String = reason
        .trim()
        .chars()
        .filter(|c| !crate::user::is_default_ignorable(*c))
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON_CHARS)
        .collect();
    if cleaned.trim().is_empty() { "unknown".into() } else { cleaned }
}

impl Session {
    /// A new session, waiting for its first QR code.
    pub fn create(id: Uuid, tenant_id: Uuid, now: OffsetDateTime) -> (Self, DomainEvent) {
        let session = Self {
            id,
            tenant_id,
            status: SessionStatus::PendingQr,
            phone: None,
            qr: None,
            qr_expires_at: None,
            connected_at: None,
            disconnected_at: None,
            disconnected_reason: None,
            created_at: now,
            updated_at: now,
        };
        let event =
            session.event(SESSION_CREATED, now, json!({"status": session.status.as_str(), "createdAt": iso(now)}));
        (session, event)
    }

    fn event(&self, name: &str, now: OffsetDateTime, payload: serde_json::Value) -> DomainEvent {
        self.reference().event(name, now, payload)
    }

    pub fn reference(&self) -> SessionRef {
        SessionRef { id: self.id, tenant_id: self.tenant_id }
    }

    /// Whether a driver connection should exist for this session.
    pub fn is_active(&self) -> bool {
        matches!(self.status, SessionStatus::PendingQr | SessionStatus::Connected | SessionStatus::Disconnected)
    }

    /// A new QR code to show. Refused (None) once connected: a late code of a finished pairing.
    pub fn show_qr(&mut self, qr: &str, expires_at: OffsetDateTime, now: OffsetDateTime) -> Option<DomainEvent> {
        if self.status == SessionStatus::Connected || self.qr.as_deref() == Some(qr) {
            return None;
        }
        self.status = SessionStatus::PendingQr;
        self.qr = Some(qr.to_owned());
        self.qr_expires_at = Some(expires_at);
        self.updated_at = now;
        Some(self.event(SESSION_QR_UPDATED, now, json!({"qr": qr, "expiresAt": iso(expires_at)})))
    }

    /// A phone-number pairing code was issued. The code itself is not an event payload
    /// worth keeping: it is shown to the caller once, and the event tells watchers.
    pub fn pair_code_issued(&mut self, expires_at: OffsetDateTime, now: OffsetDateTime) -> DomainEvent {
        self.updated_at = now;
        self.event(SESSION_PAIR_CODE_ISSUED, now, json!({"expiresAt": iso(expires_at)}))
    }

    pub fn connect(&mut self, phone: &str, now: OffsetDateTime) -> Option<DomainEvent> {
        if self.status == SessionStatus::Connected && self.phone.as_deref() == Some(phone) {
            return None;
        }
        self.status = SessionStatus::Connected;
        self.phone = Some(phone.to_owned());
        self.qr = None;
        self.qr_expires_at = None;
        self.connected_at = Some(now);
        self.disconnected_reason = None;
        self.updated_at = now;
        Some(self.event(SESSION_CONNECTED, now, json!({"phone": phone, "connectedAt": iso(now)})))
    }

    /// The connection dropped or was stopped; the session can resume.
    pub fn disconnect(&mut self, reason: &str, now: OffsetDateTime) -> Option<DomainEvent> {
        if !matches!(self.status, SessionStatus::Connected | SessionStatus::PendingQr) {
            return None;
        }
        let reason = self.leave(SessionStatus::Disconnected, reason, now);
        Some(self.event(SESSION_DISCONNECTED, now, json!({"reason": reason, "disconnectedAt": iso(now)})))
    }

    /// The session cannot go on without the tenant: QR codes ran out, the number is banned,
    /// another client took over, reconnecting gave up.
    pub fn fail(&mut self, reason: &str, now: OffsetDateTime) -> Option<DomainEvent> {
        if matches!(self.status, SessionStatus::Failed | SessionStatus::LoggedOut) {
            return None;
        }
        let reason = self.leave(SessionStatus::Failed, reason, now);
        Some(self.event(SESSION_FAILED, now, json!({"reason": reason, "failedAt": iso(now)})))
    }

    /// The device was unlinked (by the tenant, the phone or WhatsApp): its keys are void.
    pub fn log_out(&mut self, reason: &str, now: OffsetDateTime) -> Option<DomainEvent> {
        if self.status == SessionStatus::LoggedOut {
            return None;
        }
        let reason = self.leave(SessionStatus::LoggedOut, reason, now);
        Some(self.event(SESSION_LOGGED_OUT, now, json!({"reason": reason, "loggedOutAt": iso(now)})))
    }

    /// Leaves `connected` / `pending_qr` for `status`: no QR any more, the reason kept.
    /// Returns the cleaned reason.
    fn leave(&mut self, status: SessionStatus, reason: &str, now: OffsetDateTime) -> String {
        let reason = clean_reason(reason);
        self.status = status;
        self.qr = None;
        self.qr_expires_at = None;
        self.disconnected_at = Some(now);
        self.disconnected_reason = Some(reason.clone());
        self.updated_at = now;
        reason
    }

    pub fn delete(&self, now: OffsetDateTime) -> DomainEvent {
        self.event(SESSION_DELETED, now, json!({"deletedAt": iso(now)}))
    }
}

/// What events about a session need of it: its id and tenant. Message events are recorded
/// with this alone, without loading the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRef {
    pub id: Uuid,
    pub tenant_id: Uuid,
}

impl SessionRef {
    fn event(self, name: &str, now: OffsetDateTime, mut payload: serde_json::Value) -> DomainEvent {
        if let Some(fields) = payload.as_object_mut() {
            fields.insert("tenantId".into(), json!(self.tenant_id.to_string()));
        }
        let mut event = DomainEvent::new(name, self.id.to_string(), now, payload);
        event.tenant_id = Some(self.tenant_id.to_string());
        event
    }

    pub fn message_sent(self, command_id: Uuid, message_id: &str, to: &str, now: OffsetDateTime) -> DomainEvent {
        self.event(
            SESSION_MESSAGE_SENT,
            now,
            json!({"commandId": command_id.to_string(), "messageId": message_id, "to": to, "sentAt": iso(now)}),
        )
    }

    pub fn message_failed(self, command_id: Uuid, to: &str, reason: &str, now: OffsetDateTime) -> DomainEvent {
        self.event(
            SESSION_MESSAGE_FAILED,
            now,
            json!({"commandId": command_id.to_string(), "to": to, "reason": clean_reason(reason), "failedAt": iso(now)}),
        )
    }

    pub fn message_received(self, message: &ReceivedMessage, now: OffsetDateTime) -> DomainEvent {
        self.event(
            SESSION_MESSAGE_RECEIVED,
            now,
            json!({
                "messageId": message.message_id,
                "chat": message.chat,
                "from": message.sender,
                "pushName": message.push_name,
                "text": message.text,
                "fromMe": message.from_me,
                "timestamp": iso(message.timestamp),
                "type": message.media.as_ref().map_or("text", |media| media.kind.message_type()),
                "chatAlt": message.chat_alt,
                "replyTo": message.context.to_json().0,
                "mentions": message.context.to_json().1,
                "forward": message.context.forward_json(),
                "media": message.media.as_ref().map(IncomingMedia::summary),
                RAW_MESSAGE: message.raw.as_ref().map(RawMessage::as_json),
            }),
        )
    }

    /// Someone's presence in a chat changed (the predecessor's batch shape, one update).
    pub fn presence_updated(self, change: &PresenceChange, now: OffsetDateTime) -> DomainEvent {
        self.event(
            SESSION_PRESENCE_UPDATE,
            now,
            json!({"chatJid": change.chat, "updatesCount": 1, "updates": [{
                "jid": change.jid, "presence": change.presence.as_str(), "lastSeen": change.last_seen.map(iso),
            }]}),
        )
    }

    /// Media of messages was stored (`source`: `download` for received media).
    pub fn messages_media(self, media: &[StoredMedia], source: &str, now: OffsetDateTime) -> DomainEvent {
        let items: Vec<Value> = media.iter().map(StoredMedia::to_json).collect();
        self.event(SESSION_MESSAGES_MEDIA, now, json!({"mediaCount": items.len(), "media": items, "source": source}))
    }

    /// `session.messages.edit`, `.delete` or `.reaction`, in the predecessor's batch shape with
    /// one change; `command_id` when a tenant's command made it.
    pub fn message_changed(self, change: &MessageChange, command_id: Option<Uuid>) -> DomainEvent {
        let at = iso(change.at);
        let (name, mut payload) = match &change.kind {
            ChangeKind::Edited { text } => (
                SESSION_MESSAGES_EDIT,
                json!({"editsCount": 1, "edits": [{
                    "messageId": change.message_id, "remoteJid": change.chat, "participant": change.actor,
                    "fromMe": change.from_me, "type": "text", "text": text, "editedAt": at,
                }]}),
            ),
            ChangeKind::Revoked => (
                SESSION_MESSAGES_DELETE,
                json!({"scope": "message", "chatJid": change.chat, "deletesCount": 1, "deletes": [{
                    "messageId": change.message_id, "remoteJid": change.chat, "participant": change.actor,
                    "fromMe": change.from_me, "deletedAt": at,
                }]}),
            ),
            ChangeKind::Reaction { emoji } => (
                SESSION_MESSAGES_REACTION,
                json!({"reactionsCount": 1, "source": if command_id.is_some() { "command" } else { "event" },
                    "reactions": [{
                    "messageId": change.message_id, "chatJid": change.chat, "actorJid": change.actor,
                    "fromMe": change.from_me, "emoji": emoji, "reactedAt": at, "removed": emoji.is_none(),
                }]}),
            ),
        };
        if let Some(command_id) = command_id {
            payload["commandId"] = json!(command_id.to_string());
        }
        self.event(name, change.at, payload)
    }

    /// A piece of a history sync was stored: its counts and the sync's progress. Tenants hear
    /// that history arrives, not the messages themselves (they are in `GET /chats`).
    pub fn history_synced(self, piece: &HistoryPiece, now: OffsetDateTime) -> DomainEvent {
        self.event(
            SESSION_HISTORY_SYNC,
            now,
            json!({
                "syncType": piece.sync_type, "progress": piece.progress, "chatsCount": piece.chats.len(),
                "contactsCount": piece.contacts.len(), "messagesCount": piece.messages.len(),
                "reactionsCount": piece.reactions.len(),
                "messagesTruncated": false,
            }),
        )
    }

    /// The tenant marked messages of a chat read: the chat has nothing unread any more.
    pub fn chat_read(self, command_id: Uuid, chat: &str, message_ids: &[String], now: OffsetDateTime) -> DomainEvent {
        self.event(
            SESSION_CHATS_UPDATE,
            now,
            json!({
                "source": "read", "commandId": command_id.to_string(), "messageIds": message_ids,
                "chats": [{"id": chat, "unreadCount": 0}],
            }),
        )
    }

    /// The account's phone marked a chat read: it has nothing unread any more.
    pub fn chat_read_on_phone(self, chat: &str, at: OffsetDateTime) -> DomainEvent {
        self.event(
            SESSION_CHATS_UPDATE,
            at,
            json!({"source": "phone", "readAt": iso(at), "chats": [{"id": chat, "unreadCount": 0}]}),
        )
    }

    /// A command (read, edit, delete, react) that could not be carried out, and why.
    pub fn command_failed(self, command_id: Uuid, command: &str, reason: &str, now: OffsetDateTime) -> DomainEvent {
        self.event(
            SESSION_COMMAND_FAILED,
            now,
            json!({"commandId": command_id.to_string(), "command": command, "reason": clean_reason(reason),
                "failedAt": iso(now)}),
        )
    }

    pub fn message_status(self, message_id: &str, chat: &str, status: &str, at: OffsetDateTime) -> DomainEvent {
        self.event(
            SESSION_MESSAGE_STATUS,
            at,
            json!({"messageId": message_id, "chat": chat, "status": status, "at": iso(at)}),
        )
    }
}

/// What someone is doing, as WhatsApp tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Available,
    Unavailable,
    Composing,
    Recording,
    Paused,
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Unavailable => "unavailable",
            Self::Composing => "composing",
            Self::Recording => "recording",
            Self::Paused => "paused",
        }
    }
}

/// A presence in a chat: a contact online or not (`chat` is the contact), or typing,
/// recording or pausing in a chat (in a group, `jid` is the member).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    pub chat: String,
    pub jid: String,
    pub presence: Presence,
    /// When last seen online, when the contact shares it.
    pub last_seen: Option<OffsetDateTime>,
}

/// A change to a message already sent or received — an edit, a deletion for everyone, a
/// reaction — made by the other side, by the account's phone, or by a tenant's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageChange {
    pub chat: String,
    /// The message changed (or reacted to).
    pub message_id: String,
    /// Who made the change.
    pub actor: String,
    /// Made by this account.
    pub from_me: bool,
    pub at: OffsetDateTime,
    pub kind: ChangeKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// The message's new text.
    Edited { text: Option<String> },
    /// Deleted for everyone.
    Revoked,
    /// A reaction; `None` removes the actor's reaction.
    Reaction { emoji: Option<String> },
}

/// A piece of a history sync: what the phone sends a newly linked device about its chats,
/// cut by the driver into pieces of bounded size, each stored in one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryPiece {
    /// WhatsApp's kind of sync (`initial_bootstrap`, `recent`, `full`, `push_name`, …).
    pub sync_type: String,
    /// How far the whole sync is, in percent, when the phone says.
    pub progress: Option<u32>,
    pub chats: Vec<HistoryChat>,
    pub messages: Vec<HistoryMessage>,
    pub contacts: Vec<HistoryContact>,
    /// Reactions to the history's messages (each actor's latest).
    pub reactions: Vec<MessageChange>,
}

impl HistoryPiece {
    pub fn is_empty(&self) -> bool {
        self.chats.is_empty() && self.messages.is_empty() && self.contacts.is_empty() && self.reactions.is_empty()
    }
}

/// A chat as the phone knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryChat {
    pub jid: String,
    /// The chat's other address (phone JID or LID), when the phone tells it.
    pub alt: Option<String>,
    pub name: Option<String>,
    /// Unread messages on the phone.
    pub unread_count: Option<u32>,
}

/// A message of the history, with how far it got when it is the account's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryMessage {
    pub message: ReceivedMessage,
    /// `sent`, `server_ack`, `delivered`, `read`, `played` (own messages).
    pub status: Option<String>,
}

/// A contact's name as the account's phone knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryContact {
    pub jid: String,
    /// The name the contact gave themselves.
    pub push_name: Option<String>,
    /// The name in the phone's address book.
    pub name: Option<String>,
}

/// An incoming message (or one sent from the phone), as drivers report it and the domain
/// records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    pub message_id: String,
    pub chat: String,
    pub sender: String,
    pub push_name: Option<String>,
    pub text: Option<String>,
    pub from_me: bool,
    pub timestamp: OffsetDateTime,
    /// The file it carries (its `text` is then the caption).
    pub media: Option<IncomingMedia>,
    /// The chat's other address, when WhatsApp tells it: the phone JID of a chat addressed by
    /// its LID, or the LID of one addressed by phone (one-to-one chats).
    pub chat_alt: Option<String>,
    /// What it answers and whom it mentions.
    pub context: MessageContext,
    /// WhatsApp's own record of it, when the driver has one.
    pub raw: Option<RawMessage>,
}

/// A message as WhatsApp records it (`WebMessageInfo`), as JSON: kept with the message and
/// returned only on request. Its `Debug` shows its size only: a message's content stays out of
/// logs.
#[derive(Clone, PartialEq, Eq)]
pub struct RawMessage(Value);

impl RawMessage {
    pub fn new(json: Value) -> Self {
        Self(json)
    }

    pub fn as_json(&self) -> &Value {
        &self.0
    }

    pub fn into_json(self) -> Value {
        self.0
    }

    /// Its size as stored, in bytes (counted as it is written out, without keeping the text).
    pub fn stored_len(&self) -> usize {
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0 += bytes.len();
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = Count(0);
        // Writing a `Value` to memory cannot fail.
        let _ = serde_json::to_writer(&mut count, &self.0);
        count.0
    }
}

impl std::fmt::Debug for RawMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawMessage({} bytes)", self.stored_len())
    }
}

/// What a message refers to: the message it replies to (quotes) and the people it mentions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageContext {
    /// The id of the message it replies to.
    pub reply_to: Option<String>,
    /// Who sent the message it replies to (in groups).
    pub reply_to_participant: Option<String>,
    /// The JIDs it mentions (`@name` in groups).
    pub mentions: Vec<String>,
    /// How many times it was forwarded on its way (`None`: not a forward).
    pub forwarding_score: Option<u32>,
}

impl MessageContext {
    /// `replyTo` (`{messageId, participant}` or null) and `mentions` of an event.
    pub fn to_json(&self) -> (Value, Value) {
        let reply = self
            .reply_to
            .as_ref()
            .map_or(Value::Null, |id| json!({"messageId": id, "participant": self.reply_to_participant}));
        (reply, json!(self.mentions))
    }

    /// `forward` of an event and a page: `{isForwarded, forwardingScore}` or null.
    pub fn forward_json(&self) -> Value {
        self.forwarding_score.map_or(Value::Null, |score| json!({"isForwarded": true, "forwardingScore": score}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_message_is_measured_as_stored_and_not_shown() {
        let raw = RawMessage::new(json!({"key": {"id": "3EB0"}, "message": {"conversation": "secret text"}}));
        assert_eq!(raw.stored_len(), raw.as_json().to_string().len());
        assert!(!format!("{raw:?}").contains("secret"));
    }

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_790_000_000 + seconds).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    #[test]
    fn pairing_reaches_connected_and_every_step_is_an_event() {
        let tenant = Uuid::new_v4();
        let (mut session, created) = Session::create(Uuid::new_v4(), tenant, at(0));
        assert_eq!(created.event_name, SESSION_CREATED);
        assert_eq!(created.payload["tenantId"], tenant.to_string());
        assert_eq!(created.tenant_id.as_deref(), Some(tenant.to_string().as_str()));

        let qr = session.show_qr("2@abc", at(60), at(0)).map(|e| e.event_name);
        assert_eq!(qr.as_deref(), Some(SESSION_QR_UPDATED));
        assert_eq!(session.show_qr("2@abc", at(60), at(1)), None, "the same code twice is one event");

        let connected = session.connect("4915123456789@s.whatsapp.net", at(5));
        assert_eq!(connected.map(|e| e.payload["phone"].clone()), Some(json!("4915123456789@s.whatsapp.net")));
        assert_eq!(session.status, SessionStatus::Connected);
        assert_eq!(session.qr, None);
        assert_eq!(session.show_qr("2@late", at(80), at(6)), None, "late codes are ignored once connected");
        assert_eq!(session.connect("4915123456789@s.whatsapp.net", at(7)), None);
    }

    #[test]
    fn drops_failures_and_logouts_keep_their_reason() {
        let (mut session, _) = Session::create(Uuid::new_v4(), Uuid::new_v4(), at(0));
        // A pairing interrupted before the scan is a disconnect too (the predecessor threw).
        let dropped = session.disconnect("stopped", at(1));
        assert_eq!(dropped.map(|e| e.payload["reason"].clone()), Some(json!("stopped")));
        assert_eq!(session.disconnect("again", at(2)), None);

        session.connect("1555000111@s.whatsapp.net", at(3));
        let failed = session.fail("banned:\u{7} 101", at(4));
        assert_eq!(failed.map(|e| e.payload["reason"].clone()), Some(json!("banned:  101")));
        assert_eq!(session.status, SessionStatus::Failed);
        assert!(!session.is_active());

        let logged_out = session.log_out("", at(5));
        assert_eq!(logged_out.map(|e| e.payload["reason"].clone()), Some(json!("unknown")));
        assert_eq!(session.log_out("again", at(6)), None);
        assert_eq!(session.disconnected_reason.as_deref(), Some("unknown"));
    }

    #[test]
    fn reasons_are_cut_and_statuses_round_trip() {
        assert_eq!(clean_reason(&"x".repeat(500)).chars().count(), MAX_REASON_CHARS);
        for status in [
            SessionStatus::PendingQr,
            SessionStatus::Connected,
            SessionStatus::Disconnected,
            SessionStatus::LoggedOut,
            SessionStatus::Failed,
        ] {
            assert_eq!(SessionStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(SessionStatus::parse("expired"), Some(SessionStatus::Failed));
        assert_eq!(SessionStatus::parse("nope"), None);
    }
}
