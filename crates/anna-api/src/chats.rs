//! `/chats`: the message history of a tenant's session — its chats with their last message and
//! unread count, and each chat's messages, newest first, a page at a time. The session is the
//! one `sessionId` names (when it is the caller's) or, without it, the caller's first connected
//! session, else the newest (the predecessor's rule); with none, the lists are empty
//! (`sessionId: null`).

use anna_domain::user::iso;
use anna_store::{ChatSummary, HistoryCursor, StoredMessage};
use anna_whatsapp::Jid;
use axum::extract::{Query, State};
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
use crate::extract::{ApiPath, AuthUser, parse_uuid};
use crate::state::AppState;

/// Messages per page: the predecessor's default and bounds.
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 200;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_chats)).routes(routes!(list_messages))
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

/// A message as the predecessor's clients read it. Edits, deletes, reactions, media, replies,
/// forwards and mentions are not recorded yet: their fields say so (false, null, empty).
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
    #[schema(value_type = Vec<Object>)]
    pub reactions: Vec<Value>,
    #[schema(value_type = Option<Object>)]
    pub media: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub reply_to: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub forward: Option<Value>,
    #[schema(value_type = Vec<Object>)]
    pub mentions: Vec<Value>,
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
            is_edited: false,
            edited_at: None,
            is_deleted: false,
            deleted_at: None,
            reactions: Vec::new(),
            media: None,
            reply_to: None,
            forward: None,
            mentions: Vec::new(),
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
        ("cursor" = Option<String>, Query, description = "nextCursor of the previous page")),
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
    let chat = chat_jid(&jid)?;
    let page = match state.sessions.chat_messages(caller.user_id, requested, &chat, cursor.as_ref(), limit).await? {
        Some((session_id, messages)) => {
            let full = messages.len() == usize::try_from(limit).unwrap_or(usize::MAX);
            MessagePage {
                session_id: Some(session_id.to_string()),
                next_cursor: messages.last().filter(|_| full).map(encode_cursor),
                items: messages.iter().map(MessageView::from).collect(),
            }
        }
        None => MessagePage { session_id: None, items: Vec::new(), next_cursor: None },
    };
    Ok(axum::Json(page).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

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
