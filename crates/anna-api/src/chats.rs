//! `/chats`: the message history of a tenant's session — its chats with their last message and
//! unread count, and each chat's messages, newest first, a page at a time. The session is the
//! one `sessionId` names (when it is the caller's) or, without it, the caller's first connected
//! session, else the newest (the predecessor's rule); with none, the lists are empty
//! (`sessionId: null`).
//!
//! Commands on a chat — send, mark read, edit, delete for everyone, react — go to the same
//! session; with none they answer 404 `session not found`, and a message id not in the
//! session's history of the chat is 404 `message not found`. They are answered 202 with the
//! `commandId`; the outcome arrives as events.

use anna_domain::media::MediaKind;
use anna_domain::user::iso;
use anna_media::SignedUrl;
use anna_store::{ChatSummary, ContactSummary, HistoryCursor, MessageMedia, ReactionSummary, StoredMessage};
use anna_usecases::{MediaSource, MediaToSend, SendRequest};
use anna_whatsapp::Jid;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, AuthUser, parse_uuid};
use crate::idempotency;
use crate::sessions::OptionalJson;
use crate::state::AppState;

/// Messages per page: the predecessor's default and bounds.
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 200;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_chats))
        .routes(routes!(list_messages, send_to_chat))
        .routes(routes!(mark_read))
        .routes(routes!(edit_message, delete_message))
        .routes(routes!(react))
        .routes(routes!(list_contacts))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContactView {
    pub contact_jid: String,
    pub contact_lid: Option<String>,
    pub phone_number: Option<String>,
    pub name: Option<String>,
    pub notify: Option<String>,
    pub verified_name: Option<String>,
    pub img_url: Option<String>,
    pub status: Option<String>,
}

impl From<&ContactSummary> for ContactView {
    fn from(contact: &ContactSummary) -> Self {
        Self {
            contact_jid: contact.contact_jid.clone(),
            contact_lid: contact.contact_lid.clone(),
            phone_number: contact.phone_number.clone(),
            name: contact.name.clone(),
            notify: contact.notify.clone(),
            verified_name: contact.verified_name.clone(),
            img_url: contact.img_url.clone(),
            status: contact.status.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContactList {
    pub session_id: Option<String>,
    pub items: Vec<ContactView>,
}

/// The session's contacts (from the phone's history sync), by name.
#[utoipa::path(get, path = "/contacts", tag = "chats", security(("bearer" = [])),
    params(("sessionId" = Option<String>, Query, description = "the session; default: the first connected one, else the newest")),
    responses((status = 200, body = ContactList), (status = 400, body = ErrorBody)))]
async fn list_contacts(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    query: Result<Query<ChatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::bad_request("invalid_query", "the query string is not valid"))?;
    let requested = session_param(query.session_id.as_deref())?;
    let list = match state.sessions.contacts(caller.user_id, requested).await? {
        Some((session_id, contacts)) => ContactList {
            session_id: Some(session_id.to_string()),
            items: contacts.iter().map(ContactView::from).collect(),
        },
        None => ContactList { session_id: None, items: Vec::new() },
    };
    Ok(axum::Json(list).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChatsQuery {
    session_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessagesQuery {
    session_id: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    include_raw: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatView {
    pub chat_jid: String,
    pub chat_name: Option<String>,
    pub last_message_id: Option<String>,
    pub last_message_ts: Option<String>,
    pub last_message_text: Option<String>,
    pub last_message_type: Option<String>,
    pub unread_count: u64,
}

impl From<&ChatSummary> for ChatView {
    fn from(chat: &ChatSummary) -> Self {
        Self {
            chat_jid: chat.chat_jid.clone(),
            chat_name: chat.chat_name.clone(),
            last_message_id: chat.last_message_id.clone(),
            last_message_ts: chat.last_message_ts.map(iso),
            last_message_text: chat.last_message_text.clone(),
            last_message_type: chat.last_message_type.clone(),
            unread_count: chat.unread_count,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatList {
    pub session_id: Option<String>,
    pub items: Vec<ChatView>,
}

/// A message as the predecessor's clients read it. A message deleted for everyone stays,
/// flagged. `media` (a file sent or received) carries a signed download URL valid until
/// `urlExpiresAt`. `replyTo` names the message it answers (with its type and text when that one
/// is in the history); `mentions` the JIDs it mentions; `forward` whether it is a forward.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageView {
    pub id: String,
    pub from_me: bool,
    pub sender_jid: Option<String>,
    pub timestamp: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub status: Option<String>,
    pub status_at: Option<String>,
    pub is_edited: bool,
    pub edited_at: Option<String>,
    pub is_deleted: bool,
    pub deleted_at: Option<String>,
    pub reactions: Vec<ReactionView>,
    #[schema(value_type = Option<Object>)]
    pub media: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub reply_to: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub forward: Option<Value>,
    #[schema(value_type = Vec<Object>)]
    pub mentions: Vec<Value>,
    /// WhatsApp's record of the message (a `WebMessageInfo` as protobuf JSON, without what
    /// opens its file on WhatsApp's servers), only with `includeRaw=true`; null when none was
    /// kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub raw: Option<Option<Value>>,
    #[serde(skip)]
    context: anna_domain::session::MessageContext,
}

/// One emoji on a message: how many reacted with it, and who.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReactionView {
    pub message_id: String,
    pub emoji: String,
    pub count: usize,
    pub actors: Vec<String>,
}

impl From<&ReactionSummary> for ReactionView {
    fn from(reaction: &ReactionSummary) -> Self {
        Self {
            message_id: reaction.message_id.clone(),
            emoji: reaction.emoji.clone(),
            count: reaction.actors.len(),
            actors: reaction.actors.clone(),
        }
    }
}

impl MessageView {
    fn new(
        message: &StoredMessage,
        reactions: &[ReactionSummary],
        media: &[(MessageMedia, Option<SignedUrl>)],
    ) -> Self {
        let mut view = Self::from(message);
        view.reactions =
            reactions.iter().filter(|r| r.message_id == message.message_id).map(ReactionView::from).collect();
        view.forward = Some(message.context.forward_json()).filter(|forward| !forward.is_null());
        view.media = media.iter().find(|(item, _)| item.message_id == message.message_id).map(|(item, url)| {
            json!({
                "mediaId": item.media_id.map(|id| id.to_string()),
                "kind": item.kind, "mime": item.mime, "size": item.size, "fileName": item.file_name,
                "url": url.as_ref().map_or(item.url.as_str(), |url| url.url.as_str()),
                "urlExpiresAt": url.as_ref().map(|url| iso(url.expires_at)),
                "width": item.width, "height": item.height, "duration": item.duration, "sha256": item.sha256,
            })
        });
        view
    }
}

impl MessageView {
    /// `replyTo` (with the quoted message's type and text when it is in the history) and
    /// `mentions` (with the contact's name: address book, push name or verified name).
    fn quoting(mut self, quoted: &[StoredMessage], contacts: &[ContactSummary]) -> Self {
        self.mentions = self
            .context
            .mentions
            .iter()
            .map(|jid| {
                let contact = contacts.iter().find(|c| &c.contact_jid == jid || c.contact_lid.as_ref() == Some(jid));
                let name = contact.and_then(|c| c.name.clone().or(c.notify.clone()).or(c.verified_name.clone()));
                json!({"jid": jid, "name": name})
            })
            .collect();
        self.reply_to = self.context.reply_to.as_ref().map(|id| {
            let original = quoted.iter().find(|message| &message.message_id == id);
            json!({
                "messageId": id,
                "participant": self.context.reply_to_participant.clone()
                    .or_else(|| original.and_then(|m| m.sender_jid.clone())),
                "type": original.map(|m| m.kind.clone()),
                "text": original.and_then(|m| m.text.clone()),
            })
        });
        self
    }
}

impl From<&StoredMessage> for MessageView {
    fn from(message: &StoredMessage) -> Self {
        Self {
            id: message.message_id.clone(),
            from_me: message.from_me,
            sender_jid: message.sender_jid.clone(),
            timestamp: iso(message.timestamp),
            kind: message.kind.clone(),
            text: message.text.clone(),
            status: message.status.clone(),
            status_at: message.status_at.map(iso),
            is_edited: message.is_edited(),
            edited_at: message.edited_at.map(iso),
            is_deleted: message.is_deleted(),
            deleted_at: message.deleted_at.map(iso),
            reactions: Vec::new(),
            media: None,
            reply_to: None,
            forward: None,
            mentions: Vec::new(),
            raw: None,
            context: message.context.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagePage {
    pub session_id: Option<String>,
    pub items: Vec<MessageView>,
    /// Give it as `cursor` for the next, older page; null on the last page.
    pub next_cursor: Option<String>,
}

fn session_param(raw: Option<&str>) -> Result<Option<Uuid>, ApiError> {
    raw.filter(|s| !s.is_empty()).map(|s| parse_uuid(s, "sessionId")).transpose()
}

/// Longest chat identifier accepted (JIDs are far shorter).
const MAX_JID_CHARS: usize = 256;

/// The chat as given, or — for a phone number or a JID written otherwise — its JID. Empty,
/// overlong or control characters (a NUL would reach the database) are refused.
fn chat_jid(raw: &str) -> Result<String, ApiError> {
    if raw.is_empty() || raw.chars().count() > MAX_JID_CHARS || raw.chars().any(char::is_control) {
        return Err(ApiError::bad_request("invalid_jid", "jid must be a chat JID or a phone number"));
    }
    Ok(Jid::parse(raw).map_or_else(|_| raw.to_owned(), |jid| jid.to_string()))
}

/// `{"ts": "<ISO>", "id": "<messageId>"}` in base64 (URL-safe; the standard alphabet is read
/// too, as the predecessor wrote it).
fn encode_cursor(message: &StoredMessage) -> String {
    // Full precision: a cursor rounded down would step over messages of the same millisecond.
    let ts = message.timestamp.format(&Rfc3339).unwrap_or_else(|_| iso(message.timestamp));
    URL_SAFE_NO_PAD.encode(json!({"ts": ts, "id": message.message_id}).to_string())
}

fn decode_cursor(raw: &str) -> Result<HistoryCursor, ApiError> {
    let invalid = || ApiError::bad_request("invalid_cursor", "cursor must be the nextCursor of a previous page");
    let bytes =
        URL_SAFE_NO_PAD.decode(raw.trim_end_matches('=')).or_else(|_| STANDARD.decode(raw)).map_err(|_| invalid())?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    let timestamp = value["ts"].as_str().and_then(|ts| OffsetDateTime::parse(ts, &Rfc3339).ok()).ok_or_else(invalid)?;
    let message_id = value["id"]
        .as_str()
        .filter(|id| !id.is_empty() && id.len() <= MAX_JID_CHARS && !id.chars().any(char::is_control))
        .ok_or_else(invalid)?
        .to_owned();
    Ok(HistoryCursor { timestamp, message_id })
}

/// The session's chats, latest message first, each with its unread count.
#[utoipa::path(get, path = "/chats", tag = "chats", security(("bearer" = [])),
    params(("sessionId" = Option<String>, Query, description = "the session; default: the first connected one, else the newest")),
    responses((status = 200, body = ChatList), (status = 400, body = ErrorBody)))]
async fn list_chats(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    query: Result<Query<ChatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::bad_request("invalid_query", "the query string is not valid"))?;
    let requested = session_param(query.session_id.as_deref())?;
    let list = match state.sessions.chats(caller.user_id, requested).await? {
        Some((session_id, chats)) => {
            ChatList { session_id: Some(session_id.to_string()), items: chats.iter().map(ChatView::from).collect() }
        }
        None => ChatList { session_id: None, items: Vec::new() },
    };
    Ok(axum::Json(list).into_response())
}

/// A chat's messages, newest first (`limit` 1–200, default 50); `cursor` continues with older
/// ones. Pages are stable while new messages arrive.
#[utoipa::path(get, path = "/chats/{jid}/messages", tag = "chats", security(("bearer" = [])),
    params(("jid" = String, Path, description = "the chat's JID (or a phone number)"),
        ("sessionId" = Option<String>, Query, description = "the session; default: the first connected one, else the newest"),
        ("limit" = Option<u32>, Query, description = "1 to 200, default 50"),
        ("cursor" = Option<String>, Query, description = "nextCursor of the previous page"),
        ("includeRaw" = Option<bool>, Query, description = "true: each message with `raw`, WhatsApp's record of it")),
    responses((status = 200, body = MessagePage), (status = 400, body = ErrorBody)))]
async fn list_messages(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(jid): ApiPath<String>,
    query: Result<Query<MessagesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::bad_request("invalid_query", "the query string is not valid"))?;
    let requested = session_param(query.session_id.as_deref())?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_PAGE,
        // Out of range is brought into it, as the predecessor did; not a number is refused.
        Some(raw) => raw
            .parse::<i64>()
            .map(|limit| u32::try_from(limit.clamp(1, i64::from(MAX_PAGE))).unwrap_or(DEFAULT_PAGE))
            .map_err(|_| ApiError::bad_request("invalid_limit", "limit must be a number (1 to 200)"))?,
    };
    let cursor = query.cursor.as_deref().filter(|c| !c.is_empty()).map(decode_cursor).transpose()?;
    let include_raw = match query.include_raw.as_deref() {
        None | Some("" | "false" | "0") => false,
        Some("true" | "1") => true,
        Some(_) => return Err(ApiError::bad_request("invalid_include_raw", "includeRaw must be true or false")),
    };
    let chat = chat_jid(&jid)?;
    let page = match state
        .sessions
        .chat_messages(caller.user_id, requested, &chat, cursor.as_ref(), limit, include_raw)
        .await?
    {
        Some((session_id, messages)) => {
            let full = messages.len() == usize::try_from(limit).unwrap_or(usize::MAX);
            let reactions = state.sessions.reactions_of(session_id, &messages).await?;
            let ids: Vec<String> = messages.iter().map(|message| message.message_id.clone()).collect();
            let media = state.media.of_messages(session_id, &ids).await?;
            let mut quoted_ids: Vec<String> =
                messages.iter().filter_map(|message| message.context.reply_to.clone()).collect();
            quoted_ids.sort();
            quoted_ids.dedup();
            let quoted = state.sessions.stored_messages(session_id, &chat, &quoted_ids).await?;
            let mut mentioned: Vec<String> =
                messages.iter().flat_map(|message| message.context.mentions.iter().cloned()).collect();
            mentioned.sort();
            mentioned.dedup();
            let named = state.sessions.contacts_named(session_id, &mentioned).await?;
            MessagePage {
                session_id: Some(session_id.to_string()),
                next_cursor: messages.last().filter(|_| full).map(encode_cursor),
                items: messages
                    .iter()
                    .map(|message| {
                        let mut view = MessageView::new(message, &reactions, &media).quoting(&quoted, &named);
                        view.raw = include_raw.then(|| message.raw.clone());
                        view
                    })
                    .collect(),
            }
        }
        None => MessagePage { session_id: None, items: Vec::new(), next_cursor: None },
    };
    Ok(axum::Json(page).into_response())
}

/// A chat command accepted: its id, and the session it went to.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatCommandResponse {
    pub command_id: String,
    pub session_id: String,
}

fn chat_command(enqueued: anna_usecases::Enqueued) -> Result<idempotency::Answer, ApiError> {
    let body = ChatCommandResponse {
        command_id: enqueued.command_id.to_string(),
        session_id: enqueued.session_id.to_string(),
    };
    Ok((StatusCode::ACCEPTED, json!(body)))
}

/// Longest media URL accepted.
const MAX_MEDIA_URL_CHARS: usize = 2048;

/// The `media` of a send request (the predecessor's `{kind, url, mime?, fileName?}`, or anna's
/// `{kind, id}` naming an upload). A URL of one of anna's own objects (a download URL of an
/// upload, as `POST /media` answered it) sends that object; any other URL is fetched by the
/// worker under the address policy of webhooks. Anything else is the predecessor's 400.
pub(crate) fn media_to_send(media: &Value, ptt: bool) -> Result<MediaToSend, ApiError> {
    let invalid = || ApiError::bad_request("invalid_media", "invalid media payload");
    let kind = media.get("kind").and_then(Value::as_str).and_then(MediaKind::parse).ok_or_else(invalid)?;
    let id = media.get("id").and_then(Value::as_str).filter(|id| !id.is_empty());
    let url = media.get("url").and_then(Value::as_str).map(str::trim).filter(|url| !url.is_empty());
    let source = match (id, url) {
        (Some(id), None) => MediaSource::Stored(Uuid::parse_str(id).map_err(|_| invalid())?),
        (None, Some(url)) => {
            let parsed = url::Url::parse(url).ok().filter(|_| url.chars().count() <= MAX_MEDIA_URL_CHARS);
            // A relative URL can only be one of anna's own (`/media/{id}/content?…`).
            let own = url.starts_with('/').then(|| anna_usecases::media::own_media_id(url)).flatten();
            match (parsed, own) {
                (_, Some(id)) => MediaSource::Stored(id),
                (Some(parsed), None) if matches!(parsed.scheme(), "http" | "https") => {
                    MediaSource::Url(parsed.to_string())
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_media",
                        format!("media url must be an http(s) URL of at most {MAX_MEDIA_URL_CHARS} characters"),
                    ));
                }
            }
        }
        _ => return Err(invalid()),
    };
    Ok(MediaToSend { kind, source, ptt: ptt && kind == MediaKind::Audio })
}

/// A message id from a path or body: WhatsApp ids are short; control characters (a NUL would
/// reach the database) are refused.
fn message_id(raw: &str, what: &str) -> Result<String, ApiError> {
    if raw.is_empty() || raw.chars().count() > MAX_JID_CHARS || raw.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_message_id",
            format!("{what} must be 1 to {MAX_JID_CHARS} characters without control characters"),
        ));
    }
    Ok(raw.to_owned())
}

/// Text as the tenant wrote it: line breaks and tabs are text, other control characters are not.
fn text_content(content: &str) -> Result<(), ApiError> {
    if content.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) {
        return Err(ApiError::bad_request("invalid_content", "content must not contain control characters"));
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatSendRequest {
    /// The text to send.
    content: Option<String>,
    /// A media message's caption.
    caption: Option<String>,
    /// Send audio as a voice note.
    ptt: Option<bool>,
    /// The file to send: `{kind, id}` (an upload's id) or `{kind, url}` (a URL the worker
    /// fetches; no private addresses); `kind` is image, video, audio, document or sticker.
    #[schema(value_type = Option<Object>)]
    media: Option<Value>,
    /// Your own id for the message, carried into its events.
    message_id: Option<String>,
    session_id: Option<String>,
    /// The WhatsApp id of the message this one replies to.
    reply_to_message_id: Option<String>,
    /// Forward this stored message of the session (from any chat): its text, or its file with
    /// its caption, marked as forwarded.
    forward_message_id: Option<String>,
}

/// Send a text or a file into the chat (the predecessor's validation messages). 409 when the
/// session is not connected; 429 over the session's send rate; 404 for media that is not
/// yours or a message to forward that is not in the session's history.
#[utoipa::path(post, path = "/chats/{jid}/messages", tag = "chats", request_body = ChatSendRequest,
    security(("bearer" = [])), params(("jid" = String, Path, description = "the chat's JID (or a phone number)"),
        ("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")),
    responses((status = 202, body = ChatCommandResponse), (status = 400, body = ErrorBody),
        (status = 404, description = "no session", body = ErrorBody),
        (status = 409, description = "the session is not connected", body = ErrorBody),
        (status = 429, body = ErrorBody)))]
async fn send_to_chat(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(jid): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChatSendRequest>,
) -> Result<Response, ApiError> {
    let present = |value: &Option<String>| value.as_deref().is_some_and(|v| !v.trim().is_empty());
    if present(&body.reply_to_message_id) && present(&body.forward_message_id) {
        return Err(ApiError::bad_request(
            "invalid_request",
            "replyToMessageId and forwardMessageId cannot be combined",
        ));
    }
    let has_media = body.media.as_ref().is_some_and(|media| !media.is_null());
    if has_media && present(&body.forward_message_id) {
        return Err(ApiError::bad_request("invalid_request", "media and forwardMessageId cannot be combined"));
    }
    if !present(&body.content) && !has_media && !present(&body.forward_message_id) {
        return Err(ApiError::bad_request("missing_fields", "content or media is required unless forwarding"));
    }
    let media = match body.media.as_ref().filter(|media| !media.is_null()) {
        Some(media) => Some(media_to_send(media, body.ptt.unwrap_or(false))?),
        None => None,
    };
    // A file's caption is `caption`, else `content` (the predecessor's rule).
    let content = match &media {
        Some(_) => body.caption.or(body.content).unwrap_or_default(),
        None => body.content.unwrap_or_default(),
    };
    text_content(&content)?;
    let chat = chat_jid(&jid)?;
    let to = Jid::parse(&chat).map_err(|e| ApiError::bad_request("invalid_jid", format!("jid {e}")))?;
    let optional_id = |value: Option<String>, what: &str| -> Result<Option<String>, ApiError> {
        value.filter(|v| !v.is_empty()).map(|v| message_id(&v, what)).transpose()
    };
    let request = SendRequest {
        to: to.to_string(),
        text: content,
        reply_to: optional_id(body.reply_to_message_id, "replyToMessageId")?,
        client_message_id: optional_id(body.message_id, "messageId")?,
        media,
        forward: optional_id(body.forward_message_id, "forwardMessageId")?,
    };
    let requested = session_param(body.session_id.as_deref())?;
    let key = idempotency::key(&headers)?;
    let scope = format!("POST /chats/{chat}/messages {}", caller.user_id);
    let fingerprint = json!([
        requested,
        request.to,
        request.text,
        request.reply_to,
        request.client_message_id,
        format!("{:?}", request.media),
        request.forward
    ])
    .to_string();
    Ok(idempotency::once(&state, &scope, key, &fingerprint, || async {
        chat_command(
            state.sessions.send_to_chat(caller.user_id, requested, request, |id| state.limiters.check_send(id)).await?,
        )
    })
    .await)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadRequest {
    /// The messages read (those in the chat's history are marked).
    #[schema(required, nullable = false)]
    message_ids: Option<Vec<String>>,
    session_id: Option<String>,
}

/// Mark messages of the chat read: read receipts go to their senders and the chat's unread
/// count drops to 0 (`session.chats.update`).
#[utoipa::path(post, path = "/chats/{jid}/read", tag = "chats", request_body = ReadRequest,
    security(("bearer" = [])), params(("jid" = String, Path, description = "the chat's JID (or a phone number)"),
        ("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")),
    responses((status = 202, body = ChatCommandResponse), (status = 400, body = ErrorBody),
        (status = 404, description = "no session, or none of the messages in the chat", body = ErrorBody),
        (status = 409, description = "the session is not connected", body = ErrorBody)))]
async fn mark_read(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(jid): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ReadRequest>,
) -> Result<Response, ApiError> {
    let ids = body.message_ids.filter(|ids| !ids.is_empty());
    let Some(ids) = ids else { return Err(ApiError::bad_request("missing_fields", "messageIds is required")) };
    if ids.len() > anna_usecases::sessions::MAX_READ_IDS {
        return Err(ApiError::bad_request(
            "too_many_ids",
            format!("messageIds may hold at most {} ids", anna_usecases::sessions::MAX_READ_IDS),
        ));
    }
    let ids = ids.iter().map(|id| message_id(id, "messageIds")).collect::<Result<Vec<_>, _>>()?;
    let chat = chat_jid(&jid)?;
    let requested = session_param(body.session_id.as_deref())?;
    let key = idempotency::key(&headers)?;
    let scope = format!("POST /chats/{chat}/read {}", caller.user_id);
    let fingerprint = json!([requested, ids]).to_string();
    Ok(idempotency::once(&state, &scope, key, &fingerprint, || async {
        chat_command(state.sessions.mark_read(caller.user_id, requested, &chat, &ids).await?)
    })
    .await)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EditRequest {
    /// The new text.
    #[schema(required, nullable = false)]
    content: Option<String>,
    session_id: Option<String>,
}

/// Edit the text of a message this account sent (`session.messages.edit`). 409 for another's
/// message or a deleted one.
#[utoipa::path(patch, path = "/chats/{jid}/messages/{messageId}", tag = "chats", request_body = EditRequest,
    security(("bearer" = [])), params(("jid" = String, Path, description = "the chat's JID (or a phone number)"),
        ("messageId" = String, Path, description = "the WhatsApp message id"),
        ("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")),
    responses((status = 202, body = ChatCommandResponse), (status = 400, body = ErrorBody),
        (status = 404, description = "no session, or no such message in the chat", body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn edit_message(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath((jid, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<EditRequest>,
) -> Result<Response, ApiError> {
    let Some(content) = body.content.filter(|content| !content.trim().is_empty()) else {
        return Err(ApiError::bad_request("missing_fields", "content is required"));
    };
    text_content(&content)?;
    let (chat, id) = (chat_jid(&jid)?, message_id(&id, "messageId")?);
    let requested = session_param(body.session_id.as_deref())?;
    let key = idempotency::key(&headers)?;
    let scope = format!("PATCH /chats/{chat}/messages/{id} {}", caller.user_id);
    let fingerprint = json!([requested, content]).to_string();
    Ok(idempotency::once(&state, &scope, key, &fingerprint, || async {
        chat_command(
            state
                .sessions
                .edit_message(caller.user_id, requested, &chat, &id, &content, |id| state.limiters.check_send(id))
                .await?,
        )
    })
    .await)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeleteRequest {
    session_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionQuery {
    session_id: Option<String>,
}

/// Delete a message for everyone (`session.messages.delete`): one this account sent, or in a
/// group another member's (WhatsApp requires the account to be an admin). The session comes
/// from the body or the query. It stays in the history, flagged.
#[utoipa::path(delete, path = "/chats/{jid}/messages/{messageId}", tag = "chats",
    request_body(content = DeleteRequest, description = "optional"),
    security(("bearer" = [])), params(("jid" = String, Path, description = "the chat's JID (or a phone number)"),
        ("messageId" = String, Path, description = "the WhatsApp message id"),
        ("sessionId" = Option<String>, Query, description = "the session, unless given in the body"),
        ("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")),
    responses((status = 202, body = ChatCommandResponse), (status = 400, body = ErrorBody),
        (status = 404, description = "no session, or no such message in the chat", body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn delete_message(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath((jid, id)): ApiPath<(String, String)>,
    query: Result<Query<SessionQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    OptionalJson(body): OptionalJson<DeleteRequest>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::bad_request("invalid_query", "the query string is not valid"))?;
    let (chat, id) = (chat_jid(&jid)?, message_id(&id, "messageId")?);
    let requested =
        session_param(body.session_id.as_deref().filter(|s| !s.is_empty()).or(query.session_id.as_deref()))?;
    let key = idempotency::key(&headers)?;
    let scope = format!("DELETE /chats/{chat}/messages/{id} {}", caller.user_id);
    let fingerprint = json!([requested]).to_string();
    Ok(idempotency::once(&state, &scope, key, &fingerprint, || async {
        chat_command(
            state
                .sessions
                .delete_message(caller.user_id, requested, &chat, &id, |id| state.limiters.check_send(id))
                .await?,
        )
    })
    .await)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReactRequest {
    /// The emoji; `""` removes this account's reaction (so does `null`, as the predecessor's
    /// clients send it). Required: the predecessor took a missing field as a removal.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, required)]
    emoji: Option<Option<String>>,
    session_id: Option<String>,
}

/// A field that is present, even as null: `Some(None)`; absent: `None` (with `default`).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(deserializer).map(Some)
}

/// Longest reaction accepted, in characters (an emoji with modifiers and joiners is a few).
const MAX_EMOJI_CHARS: usize = 16;

/// React to a message (`session.messages.reaction`); an empty or null `emoji` removes the
/// reaction.
#[utoipa::path(post, path = "/chats/{jid}/messages/{messageId}/reactions", tag = "chats", request_body = ReactRequest,
    security(("bearer" = [])), params(("jid" = String, Path, description = "the chat's JID (or a phone number)"),
        ("messageId" = String, Path, description = "the WhatsApp message id"),
        ("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")),
    responses((status = 202, body = ChatCommandResponse), (status = 400, body = ErrorBody),
        (status = 404, description = "no session, or no such message in the chat", body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn react(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath((jid, id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ReactRequest>,
) -> Result<Response, ApiError> {
    let Some(emoji) = body.emoji else {
        return Err(ApiError::bad_request("missing_fields", "emoji is required (null or \"\" removes the reaction)"));
    };
    let emoji = emoji.as_deref().map(str::trim).filter(|emoji| !emoji.is_empty()).map(str::to_owned);
    if let Some(emoji) = &emoji
        && (emoji.chars().count() > MAX_EMOJI_CHARS
            || emoji.chars().any(|c| c.is_control() || c.is_whitespace() || c.is_ascii_alphabetic()))
    {
        return Err(ApiError::bad_request(
            "invalid_emoji",
            format!("emoji must be one emoji (at most {MAX_EMOJI_CHARS} characters), or empty to remove the reaction"),
        ));
    }
    let (chat, id) = (chat_jid(&jid)?, message_id(&id, "messageId")?);
    let requested = session_param(body.session_id.as_deref())?;
    let key = idempotency::key(&headers)?;
    let scope = format!("POST /chats/{chat}/messages/{id}/reactions {}", caller.user_id);
    let fingerprint = json!([requested, emoji]).to_string();
    Ok(idempotency::once(&state, &scope, key, &fingerprint, || async {
        chat_command(
            state
                .sessions
                .react(caller.user_id, requested, &chat, &id, emoji.as_deref(), |id| state.limiters.check_send(id))
                .await?,
        )
    })
    .await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_name_what_they_quote_and_mentions_name_whom() {
        let message = |id: &str, text: &str, context| StoredMessage {
            tenant_id: Uuid::nil(),
            session_id: Uuid::nil(),
            chat_jid: "120363000000000001@g.us".into(),
            message_id: id.into(),
            from_me: false,
            sender_jid: Some("15550001111@s.whatsapp.net".into()),
            timestamp: time::macros::datetime!(2026-12-06 21:00:00 UTC),
            kind: "text".into(),
            text: Some(text.into()),
            status: None,
            status_at: None,
            edited_at: None,
            deleted_at: None,
            context,
            raw: None,
        };
        let original = message("Q1", "the question", Default::default());
        let answer = message(
            "A1",
            "@ann look",
            anna_domain::session::MessageContext {
                reply_to: Some("Q1".into()),
                reply_to_participant: None,
                mentions: vec!["200015550002222@lid".into(), "15550003333@s.whatsapp.net".into()],
                forwarding_score: None,
            },
        );
        let ann = ContactSummary {
            contact_jid: "15550002222@s.whatsapp.net".into(),
            contact_lid: Some("200015550002222@lid".into()),
            phone_number: None,
            name: None,
            notify: Some("Ann".into()),
            verified_name: None,
            img_url: None,
            status: None,
        };
        let view = MessageView::new(&answer, &[], &[]).quoting(&[original], &[ann]);
        assert_eq!(
            view.reply_to,
            Some(
                json!({"messageId": "Q1", "participant": "15550001111@s.whatsapp.net", "type": "text", "text": "the question"})
            )
        );
        assert_eq!(
            view.mentions,
            vec![
                json!({"jid": "200015550002222@lid", "name": "Ann"}),
                json!({"jid": "15550003333@s.whatsapp.net", "name": null})
            ]
        );
    }

    #[test]
    fn cursors_round_trip_and_refuse_junk() {
        let message = StoredMessage {
            tenant_id: Uuid::nil(),
            session_id: Uuid::nil(),
            chat_jid: "1@s.whatsapp.net".into(),
            message_id: "ABC".into(),
            from_me: false,
            sender_jid: None,
            timestamp: time::macros::datetime!(2026-12-06 21:00:00.123 UTC),
            kind: "text".into(),
            text: None,
            status: None,
            status_at: None,
            edited_at: None,
            deleted_at: None,
            context: Default::default(),
            raw: None,
        };
        let cursor = decode_cursor(&encode_cursor(&message)).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((cursor.timestamp, cursor.message_id.as_str()), (message.timestamp, "ABC"));
        // The predecessor's standard base64, with padding.
        let standard = STANDARD.encode(r#"{"ts":"2026-12-06T21:00:00.123Z","id":"ABC"}"#);
        assert!(decode_cursor(&standard).is_ok());
        let nul = URL_SAFE_NO_PAD.encode("{\"ts\":\"2026-12-06T21:00:00Z\",\"id\":\"a\\u0000b\"}");
        for junk in ["", "!!!", &URL_SAFE_NO_PAD.encode("{}"), &URL_SAFE_NO_PAD.encode(r#"{"ts":"x","id":"a"}"#), &nul]
        {
            assert!(decode_cursor(junk).is_err(), "{junk:?}");
        }
    }
}
