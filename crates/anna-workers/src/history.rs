//! Message history: every message a session sends or receives is stored (`session_messages`),
//! with its delivery status, and each chat keeps its latest message and unread count
//! (`session_chats`). A database subscriber: its writes commit with the applied-event record,
//! so each event is applied once, and a redelivered one changes nothing.

use anna_domain::session::{SESSION_DELETED, SESSION_MESSAGE_RECEIVED, SESSION_MESSAGE_SENT, SESSION_MESSAGE_STATUS};
use anna_store::{StoredMessage, UnitOfWork};
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
        vec![SESSION_MESSAGE_RECEIVED, SESSION_MESSAGE_SENT, SESSION_MESSAGE_STATUS, SESSION_DELETED]
    }

    fn effect(&self) -> Effect {
        Effect::Database
    }

    async fn handle(&self, received: &ReceivedEvent, uow: Option<&mut dyn UnitOfWork>) -> Result<(), HandlerError> {
        let uow = uow.ok_or_else(|| HandlerError::new("database subscriber called without a unit of work"))?;
        let payload = &received.event.payload;
        match received.event.event_name.as_str() {
            SESSION_MESSAGE_RECEIVED => {
                let (tenant_id, session_id) = ids(received)?;
                let from_me = payload.get("fromMe").and_then(Value::as_bool).unwrap_or(false);
                let message = StoredMessage {
                    tenant_id,
                    session_id,
                    chat_jid: text(payload, "chat")?.to_owned(),
                    message_id: text(payload, "messageId")?.to_owned(),
                    from_me,
                    sender_jid: payload.get("from").and_then(Value::as_str).map(str::to_owned),
                    timestamp: time_of(payload, "timestamp")?,
                    kind: "text".into(),
                    text: payload.get("text").and_then(Value::as_str).map(str::to_owned),
                    status: None,
                    status_at: None,
                };
                // A message of one's own (sent from the phone) is not unread; the contact's name
                // names a one-to-one chat (in a group it is the sender's, not the group's).
                let name = payload.get("pushName").and_then(Value::as_str).filter(|name| !name.trim().is_empty());
                let chat_name = name.filter(|_| !from_me && !message.chat_jid.ends_with("@g.us"));
                uow.record_message(&message, !from_me, chat_name).await?;
            }
            SESSION_MESSAGE_SENT => {
                let (tenant_id, session_id) = ids(received)?;
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
                    kind: "text".into(),
                    text: payload.get("text").and_then(Value::as_str).map(str::to_owned),
                    status: Some("sent".into()),
                    status_at: Some(sent_at),
                };
                uow.record_message(&message, false, None).await?;
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
            SESSION_DELETED => {
                let (_, session_id) = ids(received)?;
                uow.delete_message_history(session_id).await?;
            }
            _ => {}
        }
        Ok(())
    }
}
