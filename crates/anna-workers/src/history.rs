//! Message history: every message a session sends or receives is stored (`session_messages`),
//! with its delivery status, and each chat keeps its latest message and unread count
//! (`session_chats`). A database subscriber: its writes commit with the applied-event record,
//! so each event is applied once, and a redelivered one changes nothing.

use anna_domain::session::{
    ChangeKind, MessageChange, MessageContext, SESSION_CHATS_UPDATE, SESSION_DELETED, SESSION_MESSAGE_RECEIVED,
    SESSION_MESSAGE_SENT, SESSION_MESSAGE_STATUS, SESSION_MESSAGES_DELETE, SESSION_MESSAGES_EDIT,
    SESSION_MESSAGES_MEDIA, SESSION_MESSAGES_REACTION,
};
use anna_media::{MediaStorage, ObjectKey};
use anna_store::{ChatTouch, ContactSighting, MessageMedia, StoredMessage, UnitOfWork};
use anna_streams::consumer::{Effect, HandlerError, ReceivedEvent, Subscriber};
use anna_whatsapp::Jid;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

pub struct MessageHistory;

fn text<'a>(payload: &'a Value, field: &str) -> Result<&'a str, HandlerError> {
    payload.get(field).and_then(Value::as_str).ok_or_else(|| HandlerError::new(format!("payload has no {field}")))
}

fn time_of(payload: &Value, field: &str) -> Result<OffsetDateTime, HandlerError> {
    OffsetDateTime::parse(text(payload, field)?, &Rfc3339)
        .map_err(|e| HandlerError::new(format!("payload {field}: {e}")))
}

fn ids(received: &ReceivedEvent) -> Result<(Uuid, Uuid), HandlerError> {
    let event = &received.event;
    let session = Uuid::parse_str(&event.aggregate_id).map_err(|e| HandlerError::new(format!("session id: {e}")))?;
    let tenant = event
        .tenant_id
        .as_deref()
        .and_then(|t| Uuid::parse_str(t).ok())
        .ok_or_else(|| HandlerError::new("the event has no tenant"))?;
    Ok((tenant, session))
}

#[async_trait::async_trait]
impl Subscriber for MessageHistory {
    fn name(&self) -> &'static str {
        "MessageHistoryProjection"
    }

    fn event_names(&self) -> Vec<&'static str> {
        vec![
            SESSION_MESSAGE_RECEIVED,
            SESSION_MESSAGE_SENT,
            SESSION_MESSAGE_STATUS,
            SESSION_MESSAGES_EDIT,
            SESSION_MESSAGES_DELETE,
            SESSION_MESSAGES_REACTION,
            SESSION_MESSAGES_MEDIA,
            SESSION_CHATS_UPDATE,
            SESSION_DELETED,
        ]
    }

    fn effect(&self) -> Effect {
        Effect::Database
    }

    /// A batch in one unit of work: messages are inserted in stream order, and each chat they
    /// (or reads) touch is moved once at the end, chats in a fixed order, so readers applying
    /// batches of the same sessions at once neither wait in a cycle nor write a hot chat row
    /// once per message.
    async fn handle_batch(
        &self,
        events: &[&ReceivedEvent],
        uow: &mut dyn UnitOfWork,
    ) -> Result<(), (Option<usize>, HandlerError)> {
        let mut touches: Vec<ChatTouch> = Vec::new();
        let mut inserted: Vec<(Uuid, String)> = Vec::new();
        let mut contacts: Vec<(Uuid, Uuid, ContactSighting)> = Vec::new();
        let mut aliases: Vec<(Uuid, Uuid, (String, String))> = Vec::new();
        for (position, received) in events.iter().enumerate() {
            let failed = |error: HandlerError| (Some(position), error);
            match received.event.event_name.as_str() {
                SESSION_MESSAGE_RECEIVED | SESSION_MESSAGE_SENT => {
                    let (message, unread, chat_name) = new_message(received).map_err(failed)?;
                    let media = sent_media(received).map_err(failed)?;
                    uow.link_message_media(&media).await.map_err(|e| failed(e.into()))?;
                    if let Some(alias) = chat_alias(received) {
                        aliases.push((message.tenant_id, message.session_id, alias));
                    }
                    if let Some(contact) = contact_seen(received) {
                        contacts.retain(|(_, session, known)| {
                            !(*session == message.session_id && known.jid == contact.jid)
                        });
                        contacts.push((message.tenant_id, message.session_id, contact));
                    }
                    if uow.insert_message(&message).await.map_err(|e| failed(e.into()))? {
                        inserted.push((message.session_id, message.message_id.clone()));
                        touch_of(&mut touches, message.tenant_id, message.session_id, &message.chat_jid).add(
                            &message,
                            unread,
                            chat_name.as_deref(),
                        );
                    }
                }
                SESSION_CHATS_UPDATE => {
                    let (tenant_id, session_id) = ids(received).map_err(failed)?;
                    let (chats, read_at) = chats_read(received).map_err(failed)?;
                    for chat in chats {
                        let touch = touch_of(&mut touches, tenant_id, session_id, chat);
                        match read_at {
                            Some(at) => touch.mark_read_on_phone(at),
                            None => touch.mark_read(),
                        }
                    }
                }
                _ => self.handle(received, Some(&mut *uow)).await.map_err(failed)?,
            }
        }
        // Aliases and contacts once per batch, sorted: readers never wait for each other in a
        // cycle, and a hot contact's rows are written once per batch. Aliases before the chats:
        // a read on the phone of the batch reaches the addresses it links.
        aliases.sort_by(|a, b| (a.1, &a.2).cmp(&(b.1, &b.2)));
        for chunk in aliases.chunk_by(|a, b| a.1 == b.1) {
            let Some((tenant_id, session_id, _)) = chunk.first() else { continue };
            let pairs: Vec<(String, String)> = chunk.iter().map(|(_, _, pair)| pair.clone()).collect();
            uow.link_chat_aliases(*tenant_id, *session_id, &pairs).await.map_err(|e| (None, e.into()))?;
        }
        uow.touch_chats(&mut touches).await.map_err(|e| (None, e.into()))?;
        contacts.sort_by(|a, b| (a.1, &a.2.jid).cmp(&(b.1, &b.2.jid)));
        for chunk in contacts.chunk_by(|a, b| a.1 == b.1) {
            let Some((tenant_id, session_id, _)) = chunk.first() else { continue };
            let mut seen: Vec<ContactSighting> = chunk.iter().map(|(_, _, contact)| contact.clone()).collect();
            uow.record_contacts(*tenant_id, *session_id, &mut seen).await.map_err(|e| (None, e.into()))?;
        }
        // Changes that overtook the new messages: one look per session of the batch.
        inserted.sort();
        for chunk in inserted.chunk_by(|a, b| a.0 == b.0) {
            let Some((session_id, _)) = chunk.first() else { continue };
            let ids: Vec<String> = chunk.iter().map(|(_, id)| id.clone()).collect();
            uow.apply_pending_changes(*session_id, &ids).await.map_err(|e| (None, e.into()))?;
        }
        Ok(())
    }

    async fn handle(&self, received: &ReceivedEvent, uow: Option<&mut dyn UnitOfWork>) -> Result<(), HandlerError> {
        let uow = uow.ok_or_else(|| HandlerError::new("database subscriber called without a unit of work"))?;
        let payload = &received.event.payload;
        match received.event.event_name.as_str() {
            SESSION_MESSAGE_RECEIVED | SESSION_MESSAGE_SENT => {
                let (message, unread, chat_name) = new_message(received)?;
                uow.link_message_media(&sent_media(received)?).await?;
                if let Some(alias) = chat_alias(received) {
                    uow.link_chat_aliases(message.tenant_id, message.session_id, &[alias]).await?;
                }
                if let Some(contact) = contact_seen(received) {
                    uow.record_contacts(message.tenant_id, message.session_id, &mut [contact]).await?;
                }
                uow.record_message(&message, unread, chat_name.as_deref()).await?;
            }
            SESSION_MESSAGES_MEDIA => {
                let (tenant_id, session_id) = ids(received)?;
                let items = payload.get("media").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                let media: Vec<MessageMedia> =
                    items.iter().map(|item| media_item(tenant_id, session_id, item)).collect::<Result<_, _>>()?;
                uow.link_message_media(&media).await?;
            }
            SESSION_MESSAGE_STATUS => {
                let (_, session_id) = ids(received)?;
                // A status of a message not stored (sent before history existed) is dropped.
                uow.record_message_status(
                    session_id,
                    text(payload, "messageId")?,
                    text(payload, "status")?,
                    time_of(payload, "at")?,
                )
                .await?;
            }
            name @ (SESSION_MESSAGES_EDIT | SESSION_MESSAGES_DELETE | SESSION_MESSAGES_REACTION) => {
                let (tenant_id, session_id) = ids(received)?;
                for change in changes(name, payload)? {
                    uow.record_message_change(tenant_id, session_id, &change).await?;
                }
            }
            SESSION_CHATS_UPDATE => {
                let (_, session_id) = ids(received)?;
                let (chats, read_at) = chats_read(received)?;
                for chat in chats {
                    match read_at {
                        Some(at) => uow.mark_chat_read_on_phone(session_id, chat, at).await?,
                        None => uow.mark_chat_read(session_id, chat).await?,
                    };
                }
            }
            SESSION_DELETED => {
                let (_, session_id) = ids(received)?;
                uow.delete_message_history(session_id).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// The batch's change to a chat, created on first use.
fn touch_of<'a>(touches: &'a mut Vec<ChatTouch>, tenant_id: Uuid, session_id: Uuid, chat: &str) -> &'a mut ChatTouch {
    let at = match touches.iter().position(|t| t.session_id == session_id && t.chat_jid == chat) {
        Some(at) => at,
        None => {
            touches.push(ChatTouch::new(tenant_id, session_id, chat));
            touches.len() - 1
        }
    };
    &mut touches[at]
}

/// The chats a `session.chats.update` says were read — through the API (`read`), or on the
/// phone (`phone`, with when: messages received later stay unread); only reads change the
/// history's chats.
fn chats_read(received: &ReceivedEvent) -> Result<(Vec<&str>, Option<OffsetDateTime>), HandlerError> {
    let payload = &received.event.payload;
    let read_at = match payload.get("source").and_then(Value::as_str) {
        Some("read") => None,
        Some("phone") => Some(match payload.get("readAt") {
            Some(_) => time_of(payload, "readAt")?,
            None => received.event.occurred_on,
        }),
        _ => return Ok((Vec::new(), None)),
    };
    let chats = payload
        .get("chats")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|chat| chat.get("unreadCount").and_then(Value::as_u64) == Some(0))
        .map(|chat| text(chat, "id"))
        .collect::<Result<_, _>>()?;
    Ok((chats, read_at))
}

/// The contact a received one-to-one message shows: its address (the phone JID when known),
/// its LID, and the name it gave itself.
fn contact_seen(received: &ReceivedEvent) -> Option<ContactSighting> {
    let payload = &received.event.payload;
    if received.event.event_name != SESSION_MESSAGE_RECEIVED
        || payload.get("fromMe").and_then(Value::as_bool) == Some(true)
    {
        return None;
    }
    let chat = payload.get("chat").and_then(Value::as_str).filter(|chat| !chat.ends_with("@g.us"))?;
    let notify = payload.get("pushName").and_then(Value::as_str).filter(|name| !name.trim().is_empty())?;
    let alt = payload.get("chatAlt").and_then(Value::as_str).filter(|alt| !alt.is_empty());
    let addresses = [Some(chat), alt];
    let jid = anna_store::aliases::preferred(addresses.iter().flatten().copied())?;
    let lid = addresses.iter().flatten().find(|address| address.ends_with("@lid")).map(|lid| (*lid).to_owned());
    Some(ContactSighting { jid: jid.to_owned(), lid, name: None, notify: Some(notify.to_owned()) })
}

/// What a message's event says it answers (`replyTo`) and whom it mentions (`mentions`).
fn message_context(payload: &Value) -> MessageContext {
    let reply = payload.get("replyTo");
    let field = |name: &str| reply.and_then(|r| r.get(name)).and_then(Value::as_str).map(str::to_owned);
    MessageContext {
        reply_to: field("messageId"),
        reply_to_participant: field("participant"),
        mentions: payload
            .get("mentions")
            .and_then(Value::as_array)
            .map(|jids| jids.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default(),
        forwarding_score: payload
            .get("forward")
            .and_then(|forward| forward.get("forwardingScore"))
            .and_then(Value::as_u64)
            .and_then(|score| u32::try_from(score).ok()),
    }
}

/// The chat's two addresses, when a received message names its other one (`chatAlt`).
fn chat_alias(received: &ReceivedEvent) -> Option<(String, String)> {
    let payload = &received.event.payload;
    let chat = payload.get("chat").and_then(Value::as_str)?;
    let alt = payload.get("chatAlt").and_then(Value::as_str).filter(|alt| !alt.is_empty() && *alt != chat)?;
    Some((chat.to_owned(), alt.to_owned()))
}

/// The media a `session.message.sent` carried (none for received messages: their files are
/// downloaded later and arrive as `session.messages.media`).
fn sent_media(received: &ReceivedEvent) -> Result<Vec<MessageMedia>, HandlerError> {
    let payload = &received.event.payload;
    match payload.get("media").filter(|media| received.event.event_name == SESSION_MESSAGE_SENT && media.is_object()) {
        Some(item) => {
            let (tenant_id, session_id) = ids(received)?;
            Ok(vec![media_item(tenant_id, session_id, item)?])
        }
        None => Ok(Vec::new()),
    }
}

/// One item of the predecessor's media list (`session.messages.media`, a sent message's media).
fn media_item(tenant_id: Uuid, session_id: Uuid, item: &Value) -> Result<MessageMedia, HandlerError> {
    let number = |name: &str| item.get(name).and_then(Value::as_u64);
    let small = |name: &str| number(name).and_then(|n| u32::try_from(n).ok());
    let optional = |name: &str| item.get(name).and_then(Value::as_str).map(str::to_owned);
    let media_id = text(item, "mediaId")?;
    Ok(MessageMedia {
        tenant_id,
        session_id,
        chat_jid: text(item, "chatJid")?.to_owned(),
        message_id: text(item, "messageId")?.to_owned(),
        media_id: Some(Uuid::parse_str(media_id).map_err(|e| HandlerError::new(format!("mediaId: {e}")))?),
        kind: text(item, "kind")?.to_owned(),
        mime: optional("mime"),
        size: number("size"),
        file_name: optional("fileName"),
        url: format!("/media/{media_id}"),
        sha256: optional("sha256"),
        width: small("width"),
        height: small("height"),
        duration: small("duration"),
        object_key: None,
    })
}

/// The message a `session.message.received` or `.sent` records, whether it counts as unread,
/// and the name it gives its chat.
fn new_message(received: &ReceivedEvent) -> Result<(StoredMessage, bool, Option<String>), HandlerError> {
    let (tenant_id, session_id) = ids(received)?;
    let payload = &received.event.payload;
    if received.event.event_name == SESSION_MESSAGE_SENT {
        let sent_at = time_of(payload, "sentAt")?;
        // Events written before the chat was part of them name only the recipient (as the
        // worker normalised it).
        let chat = payload.get("chat").and_then(Value::as_str).map_or_else(|| text(payload, "to"), Ok)?;
        let chat = Jid::parse(chat).map_or_else(|_| chat.to_owned(), |jid| jid.to_string());
        let message = StoredMessage {
            tenant_id,
            session_id,
            chat_jid: chat,
            message_id: text(payload, "messageId")?.to_owned(),
            from_me: true,
            sender_jid: None,
            timestamp: sent_at,
            kind: payload.get("type").and_then(Value::as_str).unwrap_or("text").to_owned(),
            text: payload.get("text").and_then(Value::as_str).map(str::to_owned),
            status: Some("sent".into()),
            status_at: Some(sent_at),
            edited_at: None,
            deleted_at: None,
            context: message_context(payload),
            raw: raw_of(payload),
        };
        return Ok((message, false, None));
    }
    let from_me = payload.get("fromMe").and_then(Value::as_bool).unwrap_or(false);
    let message = StoredMessage {
        tenant_id,
        session_id,
        chat_jid: text(payload, "chat")?.to_owned(),
        message_id: text(payload, "messageId")?.to_owned(),
        from_me,
        sender_jid: payload.get("from").and_then(Value::as_str).map(str::to_owned),
        timestamp: time_of(payload, "timestamp")?,
        kind: payload.get("type").and_then(Value::as_str).unwrap_or("text").to_owned(),
        text: payload.get("text").and_then(Value::as_str).map(str::to_owned),
        status: None,
        status_at: None,
        edited_at: None,
        deleted_at: None,
        context: message_context(payload),
        raw: raw_of(payload),
    };
    // A message of one's own (sent from the phone) is not unread; the contact's name names a
    // one-to-one chat (in a group it is the sender's, not the group's).
    let name = payload.get("pushName").and_then(Value::as_str).filter(|name| !name.trim().is_empty());
    let chat_name = name.filter(|_| !from_me && !message.chat_jid.ends_with("@g.us")).map(str::to_owned);
    Ok((message, !from_me, chat_name))
}

/// The raw message a message event carries for the history, if any.
fn raw_of(payload: &Value) -> Option<Value> {
    payload.get(anna_domain::events::RAW_MESSAGE).filter(|raw| raw.is_object()).cloned()
}

/// Upkeep of the message history (`MESSAGES_*`): changes kept for messages that arrived late,
/// and retention.
#[derive(Debug, Clone)]
pub struct HistoryUpkeepConfig {
    /// `MESSAGES_UPKEEP_INTERVAL_MS`: how often kept changes are looked at.
    pub interval: std::time::Duration,
    /// `MESSAGES_PENDING_TTL_MS`: how long a change waits for a message that never comes.
    pub pending_ttl: std::time::Duration,
    /// `MESSAGES_RETENTION_DAYS`: the retention of tenants that set none (0: forever).
    pub retention_days: u32,
    /// `MESSAGES_RETENTION_INTERVAL_MS`: how often expired messages are purged.
    pub retention_interval: std::time::Duration,
    /// `MESSAGES_RETENTION_BATCH`: messages deleted per transaction.
    pub retention_batch: u32,
    /// `MEDIA_SWEEP_INTERVAL_MS`: how often the media store is swept for objects whose row was
    /// never written.
    pub media_sweep_interval: std::time::Duration,
}

impl Default for HistoryUpkeepConfig {
    fn default() -> Self {
        Self {
            interval: std::time::Duration::from_secs(5),
            pending_ttl: std::time::Duration::from_secs(7 * 24 * 3600),
            retention_days: 0,
            retention_interval: std::time::Duration::from_secs(3600),
            retention_batch: 1000,
            media_sweep_interval: std::time::Duration::from_secs(86_400),
        }
    }
}

/// Runs the history upkeep until `shutdown`: applies changes whose message has come since
/// (events are applied by several readers at once, and history syncs are stored apart),
/// forgets those that waited too long, and purges messages past their tenant's retention, a
/// batch per transaction. Several processes may run it: each step is idempotent.
pub async fn run_upkeep(
    store: std::sync::Arc<dyn anna_store::Store>,
    media: std::sync::Arc<MediaStorage>,
    config: HistoryUpkeepConfig,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut last_purge: Option<tokio::time::Instant> = None;
    let mut last_sweep: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(config.interval) => {}
        }
        if let Err(error) = settle_pending(&store, &config).await {
            tracing::warn!(%error, "kept message changes could not be settled");
        }
        if last_purge.is_none_or(|at| at.elapsed() >= config.retention_interval) {
            last_purge = Some(tokio::time::Instant::now());
            if let Err(error) = purge_expired(&store, &media, &config, &shutdown).await {
                tracing::warn!(%error, "expired messages could not be purged");
            }
            if let Err(error) = purge_orphaned_media(&store, &media, &config, &shutdown).await {
                tracing::warn!(%error, "media of deleted sessions could not be purged");
            }
        }
        if last_sweep.is_none_or(|at| at.elapsed() >= config.media_sweep_interval) {
            last_sweep = Some(tokio::time::Instant::now());
            match sweep_unrecorded_media(&store, &media).await {
                Ok(swept) => metrics::counter!("media_objects_swept_total").increment(swept),
                Err(error) => tracing::warn!(%error, "the media store could not be swept"),
            }
        }
    }
}

async fn settle_pending(
    store: &std::sync::Arc<dyn anna_store::Store>,
    config: &HistoryUpkeepConfig,
) -> Result<(), anna_store::StoreError> {
    let expired_before =
        OffsetDateTime::now_utc() - time::Duration::try_from(config.pending_ttl).unwrap_or(time::Duration::MAX);
    let mut uow = store.begin().await?;
    let (applied, forgotten) = uow.settle_pending_changes(500, expired_before).await?;
    uow.commit().await?;
    metrics::counter!("history_pending_changes_applied_total").increment(applied);
    metrics::counter!("history_pending_changes_expired_total").increment(forgotten);
    Ok(())
}

async fn purge_expired(
    store: &std::sync::Arc<dyn anna_store::Store>,
    media: &MediaStorage,
    config: &HistoryUpkeepConfig,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<(), UpkeepError> {
    let now = OffsetDateTime::now_utc();
    for (session_id, days) in store.sessions_with_retention(config.retention_days).await? {
        let before = now - time::Duration::days(i64::from(days));
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let expired = store.media_older_than(session_id, before, config.retention_batch).await?;
            let purged = remove_media(store, media, &expired).await?;
            metrics::counter!("media_objects_purged_total").increment(purged);
            // A full batch of which nothing went (the store refuses): the rest waits for the
            // next round, and the messages are purged meanwhile.
            if expired.len() < config.retention_batch.max(1) as usize || purged == 0 {
                break;
            }
        }
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let purged = store.purge_messages(session_id, before, config.retention_batch).await?;
            metrics::counter!("history_messages_purged_total").increment(purged);
            if purged < u64::from(config.retention_batch.max(1)) {
                break;
            }
            // Room for the writers between two batches.
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}

/// How old an object without a row must be before the sweep removes it: an object is written
/// a moment before its row.
const SWEEP_GRACE: time::Duration = time::Duration::hours(1);
/// Objects the sweep looks at per round.
const SWEEP_SCAN: usize = 100_000;

/// Removes objects whose row was never written (a process that died between the two), an
/// hour after they were written. Returns how many went.
async fn sweep_unrecorded_media(
    store: &std::sync::Arc<dyn anna_store::Store>,
    media: &MediaStorage,
) -> Result<u64, UpkeepError> {
    let candidates = media
        .objects_written_before(OffsetDateTime::now_utc() - SWEEP_GRACE, SWEEP_SCAN)
        .await
        .map_err(|e| UpkeepError::Media(e.to_string()))?;
    let mut swept = 0;
    for chunk in candidates.chunks(500) {
        let ids: Vec<Uuid> = chunk.iter().map(|(_, id)| *id).collect();
        let recorded = store.existing_media_ids(&ids).await?;
        for (key, id) in chunk.iter().filter(|(_, id)| !recorded.contains(id)) {
            match media.delete(key).await {
                Ok(()) => swept += 1,
                Err(error) => tracing::warn!(media_id = %id, %error, "an unrecorded media object could not be removed"),
            }
        }
    }
    Ok(swept)
}

/// Objects of sessions deleted since the last round: removed from the store, then forgotten.
async fn purge_orphaned_media(
    store: &std::sync::Arc<dyn anna_store::Store>,
    media: &MediaStorage,
    config: &HistoryUpkeepConfig,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<(), UpkeepError> {
    while !shutdown.is_cancelled() {
        let orphans = store.orphaned_media(config.retention_batch).await?;
        let purged = remove_media(store, media, &orphans).await?;
        metrics::counter!("media_objects_purged_total").increment(purged);
        if orphans.len() < config.retention_batch.max(1) as usize || purged == 0 {
            break;
        }
    }
    Ok(())
}

/// Removes objects from the media store, then their rows (a row is never left naming a
/// removed object). An object whose removal fails keeps its row, is logged and counted, and is
/// tried again next round; the others go on. Returns how many went.
async fn remove_media(
    store: &std::sync::Arc<dyn anna_store::Store>,
    media: &MediaStorage,
    objects: &[anna_store::MediaObject],
) -> Result<u64, UpkeepError> {
    let mut removed = Vec::with_capacity(objects.len());
    for object in objects {
        match ObjectKey::stored(&object.object_key) {
            Some(key) => {
                if let Err(error) = media.delete(&key).await {
                    tracing::warn!(media_id = %object.id, %error, "a media object could not be removed; tried again later");
                    metrics::counter!("media_objects_purge_failures_total").increment(1);
                    continue;
                }
            }
            None => tracing::warn!(media_id = %object.id, "a media row names no object of anna's; the row is dropped"),
        }
        removed.push(object.id);
    }
    let mut uow = store.begin().await?;
    let deleted = uow.delete_media_objects(&removed).await?;
    uow.commit().await?;
    Ok(deleted)
}

#[derive(Debug, thiserror::Error)]
enum UpkeepError {
    #[error(transparent)]
    Store(#[from] anna_store::StoreError),
    #[error("media store: {0}")]
    Media(String),
}

/// The changes of a `session.messages.edit|delete|reaction` event (the predecessor's batch
/// shape: `edits`, `deletes`, `reactions`).
fn changes(name: &str, payload: &Value) -> Result<Vec<MessageChange>, HandlerError> {
    let (list, at_field) = match name {
        SESSION_MESSAGES_EDIT => ("edits", "editedAt"),
        SESSION_MESSAGES_DELETE => ("deletes", "deletedAt"),
        _ => ("reactions", "reactedAt"),
    };
    let items = payload
        .get(list)
        .and_then(Value::as_array)
        .ok_or_else(|| HandlerError::new(format!("payload has no {list}")))?;
    items
        .iter()
        .map(|item| {
            let optional = |field: &str| item.get(field).and_then(Value::as_str).map(str::to_owned);
            let kind = match name {
                SESSION_MESSAGES_EDIT => ChangeKind::Edited { text: optional("text") },
                SESSION_MESSAGES_DELETE => ChangeKind::Revoked,
                _ => ChangeKind::Reaction { emoji: optional("emoji").filter(|emoji| !emoji.is_empty()) },
            };
            let chat = optional("remoteJid")
                .or_else(|| optional("chatJid"))
                .ok_or_else(|| HandlerError::new("a change without its chat"))?;
            Ok(MessageChange {
                chat,
                message_id: text(item, "messageId")?.to_owned(),
                actor: optional("participant").or_else(|| optional("actorJid")).unwrap_or_default(),
                from_me: item.get("fromMe").and_then(Value::as_bool).unwrap_or(false),
                at: time_of(item, at_field)?,
                kind,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use anna_domain::{DomainEvent, SessionRef};
    use time::OffsetDateTime;
    use uuid::Uuid;

    use super::*;

    #[test]
    fn chats_read_through_the_api_or_on_the_phone_are_read() {
        let at = OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let read = |source: &str| {
            let payload =
                serde_json::json!({"source": source, "chats": [{"id": "1@s.whatsapp.net", "unreadCount": 0}]});
            let event = DomainEvent::new(SESSION_CHATS_UPDATE, Uuid::new_v4().to_string(), at, payload);
            ReceivedEvent { event, entry_id: "1-0".into(), delivery_count: 1 }
        };
        assert_eq!(chats_read(&read("read")).ok(), Some((vec!["1@s.whatsapp.net"], None)));
        assert_eq!(
            chats_read(&read("phone")).ok(),
            Some((vec!["1@s.whatsapp.net"], Some(at))),
            "read when it happened"
        );
        assert_eq!(chats_read(&read("event")).ok(), Some((Vec::new(), None)));
        let session = SessionRef { id: Uuid::new_v4(), tenant_id: Uuid::new_v4() };
        let on_phone = session.chat_read_on_phone("1@s.whatsapp.net", at);
        let received = ReceivedEvent { event: on_phone, entry_id: "1-0".into(), delivery_count: 1 };
        assert_eq!(chats_read(&received).ok(), Some((vec!["1@s.whatsapp.net"], Some(at))));
    }

    /// Applies `events` as one batch of the subscriber, in one unit of work.
    async fn apply_batch(
        store: &Arc<dyn anna_store::Store>,
        events: impl IntoIterator<Item = DomainEvent>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        use anna_streams::consumer::Subscriber;
        let delivered: Vec<ReceivedEvent> = events
            .into_iter()
            .enumerate()
            .map(|(n, event)| ReceivedEvent { event, entry_id: format!("{n}-0"), delivery_count: 1 })
            .collect();
        let batch: Vec<&ReceivedEvent> = delivered.iter().collect();
        let mut uow = store.begin().await?;
        MessageHistory.handle_batch(&batch, uow.as_mut()).await.map_err(|(_, e)| format!("{e}"))?;
        uow.commit().await?;
        Ok(())
    }

    /// In a batch, a read resets what came before it; messages after it count; each chat is
    /// moved once.
    #[tokio::test]
    async fn a_batch_counts_unread_messages_around_a_read() -> Result<(), Box<dyn std::error::Error>> {
        use anna_domain::session::ReceivedMessage;
        use anna_store::{ConnectOptions, SqlStore, Store};

        let sql = SqlStore::connect(&anna_testkit::sqlite::fresh_database_url(), &ConnectOptions::default()).await?;
        sql.migrate().await?;
        let store: Arc<dyn Store> = Arc::new(sql);
        let (tenant, id) = (Uuid::new_v4(), Uuid::new_v4());
        let now = OffsetDateTime::now_utc();
        let mut uow = store.begin().await?;
        uow.insert_session(&anna_domain::Session::create(id, tenant, now).0).await?;
        uow.commit().await?;
        let session = SessionRef { id, tenant_id: tenant };
        let (a, b) = ("491111@s.whatsapp.net", "492222@s.whatsapp.net");
        let received = |message_id: &str, chat: &str, seconds: i64| {
            let message = ReceivedMessage {
                message_id: message_id.into(),
                chat: chat.into(),
                sender: chat.into(),
                push_name: Some("Ann".into()),
                text: Some(message_id.into()),
                from_me: false,
                timestamp: now + time::Duration::seconds(seconds),
                media: None,
                chat_alt: None,
                context: Default::default(),
                raw: None,
            };
            session.message_received(&message, now)
        };
        let events = [
            received("m1", a, 1),
            received("m2", a, 2),
            received("b1", b, 3),
            session.chat_read(Uuid::new_v4(), a, &["m2".into()], now),
            received("m3", a, 4),
            received("m3", a, 4),
        ];
        apply_batch(&store, events).await?;
        let chats = store.list_chats(id).await?;
        let summary: Vec<(&str, Option<&str>, u64, Option<&str>)> = chats
            .iter()
            .map(|c| (c.chat_jid.as_str(), c.last_message_id.as_deref(), c.unread_count, c.chat_name.as_deref()))
            .collect();
        assert_eq!(summary, vec![(a, Some("m3"), 1, Some("Ann")), (b, Some("b1"), 1, Some("Ann"))]);

        // A read on the phone at 5 s reaches anna after a message of 6 s: that one stays unread.
        // One at 10 s leaves nothing unread.
        let events = [
            received("b2", b, 6),
            session.chat_read_on_phone(b, now + time::Duration::seconds(5)),
            session.chat_read_on_phone(a, now + time::Duration::seconds(10)),
        ];
        apply_batch(&store, events).await?;
        let unread: Vec<(String, u64)> =
            store.list_chats(id).await?.into_iter().map(|c| (c.chat_jid, c.unread_count)).collect();
        assert_eq!(unread, vec![(b.to_owned(), 1), (a.to_owned(), 0)]);

        // A contact writes from its LID (telling its phone JID), and the phone reads the chat,
        // named by the phone JID, later, in the same batch: nothing stays unread, whichever
        // address sorts first.
        let (lid, phone) = ("200015550100123@lid", "15550100123@s.whatsapp.net");
        let from_lid = ReceivedMessage {
            message_id: "l1".into(),
            chat: lid.into(),
            sender: lid.into(),
            push_name: Some("Lia".into()),
            text: Some("hi".into()),
            from_me: false,
            timestamp: now + time::Duration::seconds(1),
            media: None,
            chat_alt: Some(phone.into()),
            context: Default::default(),
            raw: None,
        };
        let events = [
            session.message_received(&from_lid, now),
            session.chat_read_on_phone(phone, now + time::Duration::seconds(5)),
        ];
        apply_batch(&store, events).await?;
        let chats = store.list_chats(id).await?;
        let lid_chat = chats.iter().find(|c| c.chat_jid == lid).map(|c| c.unread_count);
        assert_eq!(lid_chat, Some(0), "{chats:?}");
        Ok(())
    }

    /// What the sessions worker writes is what this subscriber reads, for every kind of change.
    #[test]
    fn changes_round_trip_through_their_events() {
        let session = SessionRef { id: Uuid::new_v4(), tenant_id: Uuid::new_v4() };
        let at = OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let kinds = [
            ChangeKind::Edited { text: Some("new text".into()) },
            ChangeKind::Revoked,
            ChangeKind::Reaction { emoji: Some("👍".into()) },
            ChangeKind::Reaction { emoji: None },
        ];
        for kind in kinds {
            let change = MessageChange {
                chat: "491111@s.whatsapp.net".into(),
                message_id: "3EB0AA".into(),
                actor: "491111@s.whatsapp.net".into(),
                from_me: true,
                at,
                kind,
            };
            let event = session.message_changed(&change, Some(Uuid::new_v4()));
            assert_eq!(changes(&event.event_name, &event.payload).ok(), Some(vec![change]));
        }
    }
}
