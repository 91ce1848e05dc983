//! The sessions context: what tenants ask of their WhatsApp sessions (checked here, carried
//! out by the sessions worker as commands), and what the worker records of them.
//!
//! A tenant's request is validated and ownership-checked here (another tenant's session does
//! not exist for the caller), then enqueued as a command on the session's partition of the
//! command stream. Commands travel in the domain-event envelope (`eventId` = `commandId`,
//! `eventName` = command type, `aggregateId` = session id), so the consumer runtime gives them
//! retries with backoff, idle claims, a DLQ and once-only handling by `commandId`.

use std::sync::Arc;

use anna_domain::media::MediaKind;
use anna_domain::session::{HistoryPiece, SESSION_PAIR_CODE_ISSUED};
use anna_domain::{DomainEvent, Session, SessionRef, SessionStatus};
use anna_store::{ChatSummary, ContactSummary, HistoryCursor, Store, StoreError, StoredMessage};
use anna_streams::{Stream, envelope};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Failure, traced};

pub const COMMAND_START: &str = "session.start";
pub const COMMAND_STOP: &str = "session.stop";
pub const COMMAND_SEND: &str = "session.sendMessage";
pub const COMMAND_PAIR_CODE: &str = "session.pairCode";
pub const COMMAND_LOGOUT: &str = "session.logout";
pub const COMMAND_DELETE: &str = "session.delete";
pub const COMMAND_SIMULATE: &str = "session.simulate";
/// Commands on stored messages, by the predecessor's names.
pub const COMMAND_READ: &str = "session.readMessages";
pub const COMMAND_EDIT: &str = "session.editMessage";
pub const COMMAND_DELETE_MESSAGE: &str = "session.deleteMessage";
pub const COMMAND_REACT: &str = "session.reactMessage";

/// Every command the sessions worker handles.
pub const COMMANDS: [&str; 11] = [
    COMMAND_START,
    COMMAND_STOP,
    COMMAND_SEND,
    COMMAND_PAIR_CODE,
    COMMAND_LOGOUT,
    COMMAND_DELETE,
    COMMAND_SIMULATE,
    COMMAND_READ,
    COMMAND_EDIT,
    COMMAND_DELETE_MESSAGE,
    COMMAND_REACT,
];

/// The longest message retention a tenant may choose, in days (about ten years).
pub const MAX_RETENTION_DAYS: u32 = 3650;

/// A tenant's message retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// The tenant's own choice.
    pub days: Option<u32>,
    /// The operator's default (0: forever).
    pub default_days: u32,
}

impl Retention {
    /// What applies: the tenant's choice, else the default; `None`: messages are kept forever.
    pub fn effective_days(&self) -> Option<u32> {
        self.days.or(Some(self.default_days)).filter(|days| *days > 0)
    }
}

/// Most message ids one read command marks (WhatsApp takes up to 256 per receipt; anna sends
/// as many receipts as needed).
pub const MAX_READ_IDS: usize = 1000;

/// Settings of the sessions context (`SESSIONS_*`).
#[derive(Debug, Clone)]
pub struct SessionsConfig {
    /// `SESSIONS_COMMAND_STREAM`: partition `p` is the stream `<name>.<p>`.
    pub command_stream: String,
    /// `SESSIONS_PARTITIONS`: how many command streams sessions are spread over.
    pub partitions: u32,
    /// `SESSIONS_MAX_PER_TENANT`: 0 = no limit.
    pub max_per_tenant: u32,
    /// `SESSIONS_MAX_TEXT_CHARS`: longest message text (WhatsApp's own limit is 65,536).
    pub max_text_chars: usize,
    /// `MESSAGES_RETENTION_DAYS`: the message retention of tenants that chose none (0: forever).
    pub default_retention_days: u32,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            command_stream: "session-commands".into(),
            partitions: 64,
            max_per_tenant: 10,
            max_text_chars: 4096,
            default_retention_days: 0,
        }
    }
}

impl SessionsConfig {
    /// The partition of a session: stable for its whole life, whichever process asks.
    pub fn partition_of(&self, session_id: Uuid) -> u32 {
        partition_of(self.partitions, session_id)
    }

    pub fn stream_of_partition(&self, partition: u32) -> String {
        format!("{}.{partition}", self.command_stream)
    }

    pub fn stream_of(&self, session_id: Uuid) -> String {
        self.stream_of_partition(self.partition_of(session_id))
    }
}

/// The partition of a session among `partitions`: stable for its whole life, whichever
/// process asks.
pub fn partition_of(partitions: u32, session_id: Uuid) -> u32 {
    // FNV-1a over the id's bytes: stable across processes and versions, unlike std's hasher.
    let mut hash: u32 = 0x811c_9dc5;
    for byte in session_id.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Absent, or another tenant's: the caller cannot tell the two apart.
    #[error("The session {0} does not exist")]
    NotFound(Uuid),
    #[error("a tenant may have at most {0} sessions")]
    TooMany(u32),
    #[error("The session {id} is not connected (status: {status})")]
    NotConnected { id: Uuid, status: &'static str },
    #[error("{0}")]
    Invalid(String),
    /// A chat route found no session for the caller (none named, or another tenant's).
    #[error("session not found")]
    NoSession,
    /// The message is not in the session's history of that chat.
    #[error("message not found")]
    MessageNotFound,
    /// The media to send is not the tenant's (or does not exist).
    #[error("media not found")]
    MediaNotFound,
    /// The message to forward is not in the session's history.
    #[error("forward message not found: {0}")]
    ForwardNotFound(String),
    /// The message cannot take this change (someone else's, deleted already…).
    #[error("{0}")]
    MessageConflict(String),
    /// Over the session's send rate; retry after this many seconds.
    #[error("too many messages: retry in {0} s")]
    RateLimited(u64),
    #[error(transparent)]
    Failed(#[from] Failure),
}

crate::store_failures!(SessionError);

impl From<anna_streams::StreamError> for SessionError {
    fn from(error: anna_streams::StreamError) -> Self {
        Self::Failed(Failure::Stream(error))
    }
}

/// Where a session runs: its partition and that partition's current lease, if a worker
/// holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub partition: u32,
    pub lease: Option<anna_store::Lease>,
}

/// A command accepted for the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    pub session_id: Uuid,
    pub command_id: Uuid,
}

/// The message a tenant asked to send, already validated: a text, or a file with an optional
/// caption (`text`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    /// A normalised JID.
    pub to: String,
    pub text: String,
    pub reply_to: Option<String>,
    /// The tenant's own id for the message, carried through to the events.
    pub client_message_id: Option<String>,
    pub media: Option<MediaToSend>,
    /// Forward this stored message of the session (its text, or its file and caption);
    /// `text` and `media` are then taken from it.
    pub forward: Option<String>,
}

/// A file to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaToSend {
    pub kind: MediaKind,
    pub source: MediaSource,
    /// Audio as a voice note.
    pub ptt: bool,
}

/// Where the file to send is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaSource {
    /// An object uploaded through `POST /media` (or any media object of the tenant's).
    Stored(Uuid),
    /// A URL the worker fetches (with the address policy of webhooks: no private addresses).
    Url(String),
}

pub struct Sessions {
    store: Arc<dyn Store>,
    stream: Arc<dyn Stream>,
    config: SessionsConfig,
}

impl Sessions {
    pub fn new(store: Arc<dyn Store>, stream: Arc<dyn Stream>, config: SessionsConfig) -> Self {
        Self { store, stream, config }
    }

    pub fn config(&self) -> &SessionsConfig {
        &self.config
    }

    /// The tenant's sessions, newest first.
    pub async fn list(&self, tenant_id: Uuid) -> Result<Vec<Session>, SessionError> {
        Ok(self.store.list_sessions(tenant_id).await?)
    }

    /// The session a chat route works on (the predecessor's rule): the requested one when it is
    /// the tenant's; without one, the tenant's first connected session, else its newest. `None`
    /// when there is no such session.
    pub async fn resolve_for_chats(
        &self,
        tenant_id: Uuid,
        requested: Option<Uuid>,
    ) -> Result<Option<Session>, SessionError> {
        if let Some(id) = requested {
            return Ok(self.store.find_session(id).await?.filter(|session| session.tenant_id == tenant_id));
        }
        // Newest first: the first connected one, else the newest.
        let sessions = self.store.list_sessions(tenant_id).await?;
        let at = sessions.iter().position(|session| session.status == SessionStatus::Connected).unwrap_or(0);
        Ok(sessions.into_iter().nth(at))
    }

    /// The chats of the session the caller names (or of the one the predecessor's rule picks).
    pub async fn chats(
        &self,
        tenant_id: Uuid,
        requested: Option<Uuid>,
    ) -> Result<Option<(Uuid, Vec<ChatSummary>)>, SessionError> {
        let Some(session) = self.resolve_for_chats(tenant_id, requested).await? else { return Ok(None) };
        let chats = self.store.list_chats(session.id).await?;
        let aliases = self.store.list_chat_aliases(session.id).await?;
        Ok(Some((session.id, merge_aliased_chats(chats, &aliases))))
    }

    /// A page of a chat's history, newest first, older than `before` when given.
    pub async fn chat_messages(
        &self,
        tenant_id: Uuid,
        requested: Option<Uuid>,
        chat_jid: &str,
        before: Option<&HistoryCursor>,
        limit: u32,
        include_raw: bool,
    ) -> Result<Option<(Uuid, Vec<StoredMessage>)>, SessionError> {
        let Some(session) = self.resolve_for_chats(tenant_id, requested).await? else { return Ok(None) };
        let addresses = self.store.chat_addresses(session.id, chat_jid).await?;
        if let [only] = addresses.as_slice() {
            return Ok(Some((
                session.id,
                self.store.list_messages(session.id, only, before, limit, include_raw).await?,
            )));
        }
        // A page of each address, merged: each holds the newest `limit` of its own older than
        // the cursor, so the merge holds the newest `limit` of the chat.
        let mut page = Vec::new();
        for address in &addresses {
            page.extend(self.store.list_messages(session.id, address, before, limit, include_raw).await?);
        }
        page.sort_by(|a, b| (b.timestamp, &b.message_id).cmp(&(a.timestamp, &a.message_id)));
        page.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(Some((session.id, page)))
    }

    /// The session a chat command works on: the caller's, connected.
    async fn session_for_command(&self, tenant_id: Uuid, requested: Option<Uuid>) -> Result<Session, SessionError> {
        let session = self.resolve_for_chats(tenant_id, requested).await?.ok_or(SessionError::NoSession)?;
        if session.status != SessionStatus::Connected {
            return Err(SessionError::NotConnected { id: session.id, status: session.status.as_str() });
        }
        Ok(session)
    }

    /// The stored message a command acts on, in the session's history of `chat_jid`.
    async fn stored_message(
        &self,
        session_id: Uuid,
        chat_jid: &str,
        message_id: &str,
    ) -> Result<StoredMessage, SessionError> {
        let found = self.find_in_chat(session_id, chat_jid, &[message_id.to_owned()]).await?;
        found.into_iter().next().ok_or(SessionError::MessageNotFound)
    }

    /// Sends a text into a chat of the session the chat routes resolve.
    pub async fn send_to_chat<F>(
        &self,
        tenant_id: Uuid,
        requested: Option<Uuid>,
        request: SendRequest,
        admit: impl FnOnce(Uuid) -> F,
    ) -> Result<Enqueued, SessionError>
    where
        F: Future<Output = Result<(), u64>> + Send,
    {
        let session = self.resolve_for_chats(tenant_id, requested).await?.ok_or(SessionError::NoSession)?;
        // A chat known by its LID and its phone JID is sent to by phone (the predecessor's rule).
        let mut request = request;
        if let Some(first) = self.store.chat_addresses(session.id, &request.to).await?.into_iter().next() {
            request.to = first;
        }
        self.send(tenant_id, session.id, request, admit(session.id)).await
    }

    /// Marks messages of a chat read (read receipts to their senders); the chat's unread count
    /// drops to 0. Ids not in the chat's history are left out; none there is a 404.
    pub async fn mark_read(
        &self,
        tenant_id: Uuid,
        requested: Option<Uuid>,
        chat_jid: &str,
        message_ids: &[String],
    ) -> Result<Enqueued, SessionError> {
        if message_ids.is_empty() || message_ids.len() > MAX_READ_IDS {
            return Err(SessionError::Invalid(format!("messageIds must hold 1 to {MAX_READ_IDS} ids")));
        }
        let session = self.session_for_command(tenant_id, requested).await?;
        let mut found = self.find_in_chat(session.id, chat_jid, message_ids).await?;
        if found.is_empty() {
            return Err(SessionError::MessageNotFound);
        }
        // Receipts go to the address each message came from (a chat may have two).
        found.sort_by(|a, b| a.chat_jid.cmp(&b.chat_jid));
        let mut first = None;
        for group in found.chunk_by(|a, b| a.chat_jid == b.chat_jid) {
            let ids: Vec<&str> = group.iter().map(|message| message.message_id.as_str()).collect();
            let chat = group.first().map(|message| message.chat_jid.as_str()).unwrap_or(chat_jid);
            let enqueued =
                self.enqueue(tenant_id, session.id, COMMAND_READ, json!({"chat": chat, "messageIds": ids})).await?;
            first.get_or_insert(enqueued);
        }
        first.ok_or(SessionError::MessageNotFound)
    }

    /// Replaces the text of a message this account sent.
    pub async fn edit_message<F>(
        &self,
        tenant_id: Uuid,
        requested: Option<Uuid>,
        chat_jid: &str,
        message_id: &str,
        text: &str,
        admit: impl FnOnce(Uuid) -> F,
    ) -> Result<Enqueued, SessionError>
    where
        F: Future<Output = Result<(), u64>> + Send,
    {
        let session = self.session_for_command(tenant_id, requested).await?;
        let chars = text.chars().count();
        if chars == 0 || chars > self.config.max_text_chars {
            return Err(SessionError::Invalid(format!(
                "content must have 1 to {} characters (has {chars})",
                self.config.max_text_chars
            )));
        }
        let message = self.stored_message(session.id, chat_jid, message_id).await?;
        if !message.from_me {
            return Err(SessionError::MessageConflict("only messages sent by this account can be edited".into()));
        }
        if message.is_deleted() {
            return Err(SessionError::MessageConflict("the message was deleted".into()));
        }
        admit(session.id).await.map_err(SessionError::RateLimited)?;
        self.enqueue(
            tenant_id,
            session.id,
            COMMAND_EDIT,
            json!({"chat": message.chat_jid, "messageId": message_id, "content": text}),
        )
        .await
    }

    /// Deletes a message for everyone: one of this account's, or another member's in a group
    /// (WhatsApp then checks that the account is an admin).
    pub async fn delete_message<F>(
        &self,
        tenant_id: Uuid,
        requested: Option<Uuid>,
        chat_jid: &str,
        message_id: &str,
        admit: impl FnOnce(Uuid) -> F,
    ) -> Result<Enqueued, SessionError>
    where
        F: Future<Output = Result<(), u64>> + Send,
    {
        let session = self.session_for_command(tenant_id, requested).await?;
        let message = self.stored_message(session.id, chat_jid, message_id).await?;
        if !message.from_me && !message.chat_jid.ends_with("@g.us") {
            return Err(SessionError::MessageConflict(
                "only messages sent by this account can be deleted for everyone".into(),
            ));
        }
        if message.is_deleted() {
            return Err(SessionError::MessageConflict("the message is deleted already".into()));
        }
        admit(session.id).await.map_err(SessionError::RateLimited)?;
        self.enqueue(
            tenant_id,
            session.id,
            COMMAND_DELETE_MESSAGE,
            json!({"chat": message.chat_jid, "messageId": message_id}),
        )
        .await
    }

    /// Reacts to a message; `None` removes this account's reaction.
    pub async fn react<F>(
        &self,
        tenant_id: Uuid,
        requested: Option<Uuid>,
        chat_jid: &str,
        message_id: &str,
        emoji: Option<&str>,
        admit: impl FnOnce(Uuid) -> F,
    ) -> Result<Enqueued, SessionError>
    where
        F: Future<Output = Result<(), u64>> + Send,
    {
        let session = self.session_for_command(tenant_id, requested).await?;
        let message = self.stored_message(session.id, chat_jid, message_id).await?;
        if message.is_deleted() {
            return Err(SessionError::MessageConflict("the message was deleted".into()));
        }
        admit(session.id).await.map_err(SessionError::RateLimited)?;
        self.enqueue(
            tenant_id,
            session.id,
            COMMAND_REACT,
            json!({"chat": message.chat_jid, "messageId": message_id, "emoji": emoji}),
        )
        .await
    }

    /// The contacts of the session the caller names (or of the one the predecessor's rule picks).
    pub async fn contacts(
        &self,
        tenant_id: Uuid,
        requested: Option<Uuid>,
    ) -> Result<Option<(Uuid, Vec<ContactSummary>)>, SessionError> {
        let Some(session) = self.resolve_for_chats(tenant_id, requested).await? else { return Ok(None) };
        Ok(Some((session.id, self.store.list_contacts(session.id).await?)))
    }

    /// Stores a piece of a history sync with its summary event (`session.history.sync`) in
    /// one unit of work. Returns how many messages were new (0 for a session deleted meanwhile).
    pub async fn record_history(&self, id: Uuid, tenant_id: Uuid, piece: &HistoryPiece) -> Result<u64, SessionError> {
        let session = SessionRef { id, tenant_id };
        let mut uow = self.store.begin().await?;
        // A session deleted meanwhile gets nothing, not even the event.
        let Some(inserted) = uow.record_history(tenant_id, id, piece).await? else { return Ok(0) };
        uow.append_events(&traced([session.history_synced(piece, OffsetDateTime::now_utc())])).await?;
        uow.commit().await?;
        Ok(inserted)
    }

    /// The tenant's message retention: its own choice, if any, and the operator's default.
    pub async fn retention(&self, tenant_id: Uuid) -> Result<Retention, SessionError> {
        Ok(Retention {
            days: self.store.message_retention(tenant_id).await?,
            default_days: self.config.default_retention_days,
        })
    }

    /// Sets the tenant's message retention (1 to [`MAX_RETENTION_DAYS`] days), or with `None`
    /// goes back to the operator's default. Messages older are purged within the hour.
    pub async fn set_retention(&self, tenant_id: Uuid, days: Option<u32>) -> Result<Retention, SessionError> {
        if let Some(days) = days
            && !(1..=MAX_RETENTION_DAYS).contains(&days)
        {
            return Err(SessionError::Invalid(format!(
                "messageRetentionDays must be 1 to {MAX_RETENTION_DAYS}, or null for the default"
            )));
        }
        let mut uow = self.store.begin().await?;
        uow.set_message_retention(tenant_id, days).await?;
        uow.commit().await?;
        self.retention(tenant_id).await
    }

    /// The contacts of the session with these JIDs or LIDs (mention names).
    pub async fn contacts_named(&self, session_id: Uuid, jids: &[String]) -> Result<Vec<ContactSummary>, SessionError> {
        Ok(self.store.find_contacts(session_id, jids).await?)
    }

    /// The stored messages of a chat among `message_ids`, for the worker to address them.
    pub async fn stored_messages(
        &self,
        session_id: Uuid,
        chat_jid: &str,
        message_ids: &[String],
    ) -> Result<Vec<StoredMessage>, SessionError> {
        self.find_in_chat(session_id, chat_jid, message_ids).await
    }

    /// Messages of a chat under any of its addresses (phone JID and LID).
    async fn find_in_chat(
        &self,
        session_id: Uuid,
        chat_jid: &str,
        message_ids: &[String],
    ) -> Result<Vec<StoredMessage>, SessionError> {
        let mut found = Vec::new();
        for address in self.store.chat_addresses(session_id, chat_jid).await? {
            found.extend(self.store.find_messages(session_id, &address, message_ids).await?);
        }
        Ok(found)
    }

    /// The reactions shown with a page of history.
    pub async fn reactions_of(
        &self,
        session_id: Uuid,
        messages: &[StoredMessage],
    ) -> Result<Vec<anna_store::ReactionSummary>, SessionError> {
        let ids: Vec<String> = messages.iter().map(|message| message.message_id.clone()).collect();
        Ok(self.store.list_reactions(session_id, &ids).await?)
    }

    /// Which sessions worker holds the session's partition now, if any.
    pub async fn placement(&self, id: Uuid) -> Result<Placement, SessionError> {
        let partition = self.config.partition_of(id);
        let lease = self.store.lease_holder(partition).await?;
        Ok(Placement { partition, lease })
    }

    /// One of the tenant's sessions.
    pub async fn get(&self, tenant_id: Uuid, id: Uuid) -> Result<Session, SessionError> {
        match self.store.find_session(id).await? {
            Some(session) if session.tenant_id == tenant_id => Ok(session),
            _ => Err(SessionError::NotFound(id)),
        }
    }

    /// Starts a session: creates it (with `id` when given and unused), or starts the caller's
    /// existing session again.
    pub async fn start(&self, tenant_id: Uuid, id: Option<Uuid>) -> Result<Enqueued, SessionError> {
        let id = id.unwrap_or_else(Uuid::new_v4);
        let now = OffsetDateTime::now_utc();
        let mut uow = self.store.begin().await?;
        match uow.find_session(id).await? {
            Some(existing) if existing.tenant_id != tenant_id => return Err(SessionError::NotFound(id)),
            Some(_) => drop(uow),
            None => {
                let limit = self.config.max_per_tenant;
                if limit > 0 && uow.count_tenant_sessions(tenant_id).await? >= u64::from(limit) {
                    return Err(SessionError::TooMany(limit));
                }
                let (session, created) = Session::create(id, tenant_id, now);
                uow.insert_session(&session).await?;
                uow.append_events(&traced([created])).await?;
                match uow.commit().await {
                    // Created at the same moment by a concurrent request of the same tenant
                    // (or another's: then ownership is checked below).
                    Err(StoreError::Conflict(_)) => {
                        self.get(tenant_id, id).await?;
                    }
                    other => other?,
                }
            }
        }
        self.enqueue(tenant_id, id, COMMAND_START, json!({})).await
    }

    pub async fn stop(&self, tenant_id: Uuid, id: Uuid, reason: Option<String>) -> Result<Enqueued, SessionError> {
        self.get(tenant_id, id).await?;
        let fields = match reason {
            Some(reason) => json!({"reason": anna_domain::session::clean_reason(&reason)}),
            None => json!({}),
        };
        self.enqueue(tenant_id, id, COMMAND_STOP, fields).await
    }

    /// Sends a text through a connected session. `admit` spends one message of the session's
    /// send budget (`Err`: seconds to wait); it is asked only once the session is known to be
    /// the caller's and connected, so probing ids learns nothing from it.
    pub async fn send(
        &self,
        tenant_id: Uuid,
        id: Uuid,
        mut request: SendRequest,
        admit: impl Future<Output = Result<(), u64>> + Send,
    ) -> Result<Enqueued, SessionError> {
        let session = self.get(tenant_id, id).await?;
        if session.status != SessionStatus::Connected {
            return Err(SessionError::NotConnected { id, status: session.status.as_str() });
        }
        let mut forwarding_score = None;
        if let Some(source_id) = request.forward.clone() {
            let source = self
                .store
                .find_message_in_session(id, &source_id)
                .await?
                .filter(|message| !message.is_deleted())
                .ok_or_else(|| SessionError::ForwardNotFound(source_id.clone()))?;
            let file = self.store.list_message_media(id, std::slice::from_ref(&source_id)).await?.into_iter().next();
            // A voice note goes on as one: WhatsApp's record of the message says so (also when
            // it is wrapped: disappearing, view once).
            let voice_note = source
                .raw
                .as_ref()
                .and_then(|raw| audio_message(&raw["message"]))
                .is_some_and(|audio| audio["ptt"] == json!(true));
            request.media = file.and_then(|file| {
                let kind = MediaKind::parse(&file.kind)?;
                Some(MediaToSend { kind, source: MediaSource::Stored(file.media_id?), ptt: voice_note })
            });
            request.text = source.text.clone().unwrap_or_default();
            if request.media.is_none() && MediaKind::from_message_type(&source.kind).is_some() {
                return Err(SessionError::MessageConflict(format!(
                    "the file of message {source_id} is not (or no longer) stored: it cannot be forwarded"
                )));
            }
            if request.media.is_none() && request.text.is_empty() {
                return Err(SessionError::Invalid(format!("message {source_id} has nothing anna can forward")));
            }
            forwarding_score = Some(source.context.forwarding_score.unwrap_or(0).saturating_add(1));
        }
        let chars = request.text.chars().count();
        let least = if request.media.is_some() { 0 } else { 1 };
        if chars < least || chars > self.config.max_text_chars {
            return Err(SessionError::Invalid(format!(
                "{} must have {least} to {} characters (has {chars})",
                if request.media.is_some() { "caption" } else { "content" },
                self.config.max_text_chars
            )));
        }
        // A download URL of one of the tenant's own objects sends that object.
        if let Some(media) = request.media.as_mut()
            && let MediaSource::Url(url) = &media.source
            && let Some(id) = crate::media::own_media_id(url)
            && self.store.find_media_object(id).await?.is_some_and(|object| object.tenant_id == tenant_id)
        {
            media.source = MediaSource::Stored(id);
        }
        if let Some(MediaToSend { kind, source: MediaSource::Stored(media_id), .. }) = &request.media {
            let object = self.store.find_media_object(*media_id).await?.filter(|object| object.tenant_id == tenant_id);
            let object = object.ok_or(SessionError::MediaNotFound)?;
            if !anna_media::sendable_as(*kind, &object.mime) {
                return Err(SessionError::Invalid(format!(
                    "media {media_id} is {}, which cannot be sent as {}",
                    object.mime,
                    kind.as_str()
                )));
            }
        }
        admit.await.map_err(SessionError::RateLimited)?;
        let mut fields = json!({"to": request.to, "content": request.text});
        if let Some(score) = forwarding_score {
            fields["forwardingScore"] = json!(score);
        }
        if let Some(media) = &request.media {
            fields["media"] = match &media.source {
                MediaSource::Stored(id) => json!({"kind": media.kind.as_str(), "mediaId": id.to_string()}),
                MediaSource::Url(url) => json!({"kind": media.kind.as_str(), "url": url}),
            };
            fields["ptt"] = json!(media.ptt);
        }
        if let Some(reply_to) = request.reply_to {
            fields["replyToMessageId"] = json!(reply_to);
        }
        if let Some(message_id) = request.client_message_id {
            fields["messageId"] = json!(message_id);
        }
        self.enqueue(tenant_id, id, COMMAND_SEND, fields).await
    }

    /// Asks for a pairing code for `phone` (digits, international format). The code arrives
    /// as the event `session.pair_code.issued`.
    pub async fn request_pair_code(&self, tenant_id: Uuid, id: Uuid, phone: &str) -> Result<Enqueued, SessionError> {
        let session = self.get(tenant_id, id).await?;
        if session.status == SessionStatus::Connected {
            return Err(SessionError::Invalid("the session is already paired and connected".into()));
        }
        self.enqueue(tenant_id, id, COMMAND_PAIR_CODE, json!({"phone": phone})).await
    }

    /// Unlinks the device; the session stays, `logged_out`, and can pair again.
    pub async fn logout(&self, tenant_id: Uuid, id: Uuid) -> Result<Enqueued, SessionError> {
        self.get(tenant_id, id).await?;
        self.enqueue(tenant_id, id, COMMAND_LOGOUT, json!({})).await
    }

    /// Logs out, stops and deletes the session with its keys.
    pub async fn delete(&self, tenant_id: Uuid, id: Uuid) -> Result<Enqueued, SessionError> {
        self.get(tenant_id, id).await?;
        self.enqueue(tenant_id, id, COMMAND_DELETE, json!({})).await
    }

    /// A simulated happening (scan, disconnect, logout, ban) for the simulator.
    pub async fn simulate(&self, tenant_id: Uuid, id: Uuid, action: &str) -> Result<Enqueued, SessionError> {
        self.get(tenant_id, id).await?;
        self.enqueue(tenant_id, id, COMMAND_SIMULATE, json!({"action": action})).await
    }

    /// Enqueues a simulated happening for a session by id alone (the operator's command line).
    pub async fn simulate_as_operator(&self, id: Uuid, action: &str) -> Result<Enqueued, SessionError> {
        let session = self.store.find_session(id).await?.ok_or(SessionError::NotFound(id))?;
        self.enqueue(session.tenant_id, id, COMMAND_SIMULATE, json!({"action": action})).await
    }

    async fn enqueue(&self, tenant_id: Uuid, id: Uuid, kind: &str, fields: Value) -> Result<Enqueued, SessionError> {
        let command_id = Uuid::new_v4();
        let mut payload = json!({
            "type": kind,
            "commandId": command_id.to_string(),
            "sessionId": id.to_string(),
            "tenantId": tenant_id.to_string(),
        });
        if let (Some(payload), Value::Object(fields)) = (payload.as_object_mut(), fields) {
            payload.extend(fields);
        }
        let mut command = DomainEvent::new(kind, id.to_string(), OffsetDateTime::now_utc(), payload);
        command.event_id = command_id;
        command.tenant_id = Some(tenant_id.to_string());
        let command = traced([command]).remove(0);
        let mut fields = envelope::to_fields(&command, None);
        // The predecessor's command entries carried these two as fields of their own.
        fields.insert("commandId".into(), command_id.to_string());
        fields.insert("type".into(), kind.to_owned());
        self.stream.append(&self.config.stream_of(id), &fields, None).await?;
        metrics::counter!("session_commands_enqueued_total", "type" => kind.to_owned()).increment(1);
        Ok(Enqueued { session_id: id, command_id })
    }

    // ---- What the sessions worker records --------------------------------------------------

    /// Applies `change` to the session in one unit of work with its event. `Ok(None)`: the
    /// session is gone (deleted meanwhile) or nothing changed.
    async fn record(
        &self,
        id: Uuid,
        change: impl FnOnce(&mut Session, OffsetDateTime) -> Option<DomainEvent> + Send,
    ) -> Result<Option<Session>, SessionError> {
        let now = OffsetDateTime::now_utc();
        let mut uow = self.store.begin().await?;
        let Some(mut session) = uow.find_session(id).await? else { return Ok(None) };
        let Some(event) = change(&mut session, now) else { return Ok(None) };
        uow.update_session(&session).await?;
        uow.append_events(&traced([event])).await?;
        uow.commit().await?;
        Ok(Some(session))
    }

    /// Appends events that change nothing of their sessions (messages, receipts), already
    /// stamped with their traces, in one unit of work: the sessions worker gathers the events
    /// of many sessions into one commit. `applied` are the commands these events settle,
    /// recorded as applied by `subscriber` in the same commit, so a command whose outcome is
    /// recorded is never carried out again, even if the worker dies before acknowledging it.
    pub async fn append_events(
        &self,
        events: &[DomainEvent],
        subscriber: &str,
        applied: &[Uuid],
    ) -> Result<(), SessionError> {
        if events.is_empty() && applied.is_empty() {
            return Ok(());
        }
        let mut uow = self.store.begin().await?;
        uow.append_events(events).await?;
        if !applied.is_empty() {
            uow.record_events_applied(subscriber, applied, OffsetDateTime::now_utc()).await?;
        }
        uow.commit().await?;
        Ok(())
    }

    pub async fn record_qr(&self, id: Uuid, qr: &str, expires_at: OffsetDateTime) -> Result<(), SessionError> {
        self.record(id, |s, now| s.show_qr(qr, expires_at, now)).await.map(drop)
    }

    pub async fn record_pair_code(&self, id: Uuid, code: &str, expires_at: OffsetDateTime) -> Result<(), SessionError> {
        self.record(id, |s, now| {
            let mut event = s.pair_code_issued(expires_at, now);
            // Shown to the tenant's watchers like a QR code: it is just as short-lived.
            event.payload["code"] = json!(code);
            debug_assert_eq!(event.event_name, SESSION_PAIR_CODE_ISSUED);
            Some(event)
        })
        .await
        .map(drop)
    }

    pub async fn record_connected(&self, id: Uuid, phone: &str) -> Result<(), SessionError> {
        self.record(id, |s, now| s.connect(phone, now)).await.map(drop)
    }

    pub async fn record_disconnected(&self, id: Uuid, reason: &str) -> Result<(), SessionError> {
        self.record(id, |s, now| s.disconnect(reason, now)).await.map(drop)
    }

    pub async fn record_failed(&self, id: Uuid, reason: &str) -> Result<(), SessionError> {
        self.record(id, |s, now| s.fail(reason, now)).await.map(drop)
    }

    pub async fn record_logged_out(&self, id: Uuid, reason: &str) -> Result<(), SessionError> {
        self.record(id, |s, now| s.log_out(reason, now)).await.map(drop)
    }

    /// Deletes the session, its device keys and emits `session.deleted`, in one unit of work.
    pub async fn record_deleted(&self, id: Uuid) -> Result<(), SessionError> {
        let now = OffsetDateTime::now_utc();
        let mut uow = self.store.begin().await?;
        let Some(session) = uow.find_session(id).await? else { return Ok(()) };
        uow.delete_session(id).await?;
        uow.append_events(&traced([session.delete(now)])).await?;
        uow.commit().await?;
        Ok(())
    }

    /// Sessions the worker should bring back after a restart.
    pub async fn sessions_to_resume(&self) -> Result<Vec<Session>, SessionError> {
        Ok(self
            .store
            .list_sessions_with_status(&[
                SessionStatus::Connected,
                SessionStatus::Disconnected,
                SessionStatus::PendingQr,
            ])
            .await?)
    }

    pub async fn find(&self, id: Uuid) -> Result<Option<Session>, SessionError> {
        Ok(self.store.find_session(id).await?)
    }
}

/// The chats of a session with the rows of one chat's addresses merged (the predecessor's
/// rule): named by its key (the phone JID of a chat also known by LID), the first name found
/// (the named address's first), the latest last message, the unread counts summed; latest
/// first.
pub fn merge_aliased_chats(chats: Vec<ChatSummary>, aliases: &[(String, String)]) -> Vec<ChatSummary> {
    let keys: std::collections::HashMap<&str, &str> =
        aliases.iter().map(|(alias, key)| (alias.as_str(), key.as_str())).collect();
    let mut groups: std::collections::HashMap<String, Vec<ChatSummary>> = std::collections::HashMap::new();
    for chat in chats {
        let key = keys.get(chat.chat_jid.as_str()).map_or_else(|| chat.chat_jid.clone(), |key| (*key).to_owned());
        groups.entry(key).or_default().push(chat);
    }
    let mut merged: Vec<ChatSummary> = groups
        .into_iter()
        .filter_map(|(key, mut members)| {
            members.sort_by_key(|chat| chat.chat_jid != key);
            let name = members.iter().find_map(|chat| chat.chat_name.clone());
            let unread = members.iter().map(|chat| chat.unread_count).sum();
            let latest = members
                .iter()
                .max_by(|a, b| (a.last_message_ts, &a.last_message_id).cmp(&(b.last_message_ts, &b.last_message_id)))?
                .clone();
            Some(ChatSummary { chat_jid: key, chat_name: name, unread_count: unread, ..latest })
        })
        .collect();
    merged.sort_by(|a, b| match (a.last_message_ts, b.last_message_ts) {
        (Some(a_ts), Some(b_ts)) => b_ts.cmp(&a_ts).then_with(|| a.chat_jid.cmp(&b.chat_jid)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.chat_jid.cmp(&b.chat_jid),
    });
    merged
}

/// The `audioMessage` of a raw message's content, unwrapping the containers WhatsApp puts
/// around content (`ephemeralMessage`, `viewOnceMessage`, … each holding a `message`).
fn audio_message(content: &serde_json::Value) -> Option<&serde_json::Value> {
    let mut content = content;
    for _ in 0..4 {
        if let Some(audio) = content.get("audioMessage") {
            return Some(audio);
        }
        let fields = content.as_object()?;
        content = fields.values().find_map(|wrapper| wrapper.get("message"))?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voice_notes_are_found_in_their_wrappers() {
        let plain = json!({"audioMessage": {"ptt": true}});
        let disappearing = json!({"ephemeralMessage": {"message": {"audioMessage": {"ptt": true}}}});
        let view_once = json!({"viewOnceMessageV2": {"message": {"audioMessage": {"seconds": 3}}}});
        assert_eq!(audio_message(&plain), Some(&json!({"ptt": true})));
        assert_eq!(audio_message(&disappearing), Some(&json!({"ptt": true})));
        assert_eq!(audio_message(&view_once), Some(&json!({"seconds": 3})));
        assert_eq!(audio_message(&json!({"conversation": "hi"})), None);
        assert_eq!(audio_message(&serde_json::Value::Null), None);
    }

    #[test]
    fn a_chats_addresses_are_listed_as_one_chat() {
        let at = |seconds| Some(OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(seconds));
        let chat = |jid: &str, name: Option<&str>, last: Option<OffsetDateTime>, unread| ChatSummary {
            chat_jid: jid.into(),
            chat_name: name.map(str::to_owned),
            last_message_id: last.map(|_| format!("m-{jid}")),
            last_message_ts: last,
            last_message_text: last.map(|_| format!("text of {jid}")),
            last_message_type: Some("text".into()),
            unread_count: unread,
        };
        let (phone, lid) = ("1555@s.whatsapp.net", "2001555@lid");
        let chats = vec![
            chat(phone, None, at(10), 1),
            chat("other@s.whatsapp.net", Some("Other"), at(15), 0),
            chat(lid, Some("Ann"), at(20), 2),
            chat("quiet@g.us", None, None, 0),
        ];
        let aliases = vec![(phone.to_owned(), phone.to_owned()), (lid.to_owned(), phone.to_owned())];
        let merged = merge_aliased_chats(chats, &aliases);
        let jids: Vec<&str> = merged.iter().map(|c| c.chat_jid.as_str()).collect();
        assert_eq!(jids, [phone, "other@s.whatsapp.net", "quiet@g.us"], "latest first, nulls last");
        let ann = &merged[0];
        assert_eq!((ann.chat_name.as_deref(), ann.unread_count), (Some("Ann"), 3));
        assert_eq!(ann.last_message_text.as_deref(), Some("text of 2001555@lid"), "the latest of the two");
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        let config = SessionsConfig { partitions: 4, ..SessionsConfig::default() };
        let id = Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0);
        assert_eq!(config.partition_of(id), config.partition_of(id));
        let mut seen = [0u32; 4];
        for n in 0..4000u128 {
            seen[config.partition_of(Uuid::from_u128(n * 7919)) as usize] += 1;
        }
        assert!(seen.iter().all(|count| *count > 700), "{seen:?}");
        assert_eq!(config.stream_of_partition(2), "session-commands.2");
        let single = SessionsConfig { partitions: 1, ..SessionsConfig::default() };
        assert_eq!(single.stream_of(id), "session-commands.0");
    }
}
