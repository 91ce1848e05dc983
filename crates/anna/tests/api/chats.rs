//! The message history over REST, on the simulator: what a session sends and receives shows up
//! in `/chats` and `/chats/{jid}/messages`, paged by cursor, for its tenant only.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use crate::sessions::{connected_session, tenant};

const CONTACT: &str = "15550100123@s.whatsapp.net";

/// Polls `path` until `done` holds for its body; returns it.
async fn until(app: &TestApp, token: &str, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut body = Value::Null;
    for _ in 0..300 {
        let reply = app.get(path).bearer(token).send().await;
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
        body = reply.body;
        if done(&body) {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} never got there: {body}");
}

async fn history_of_sent_and_received_messages(backend: Backend) {
    let app = spawn_app(backend).await;
    let token = tenant(&app).await;
    let other = tenant(&app).await;
    let none = app.get("/chats").bearer(&token).send().await;
    assert_eq!((none.status, &none.body), (200, &json!({"sessionId": null, "items": []})));

    let id = connected_session(&app, &token).await;
    let sent = app
        .post(&format!("/sessions/{id}/messages"))
        .bearer(&token)
        .json(json!({"to": "+1 555 0100 123", "content": "hello history"}))
        .send()
        .await;
    assert_eq!(sent.status, 202, "{sent:?}");

    // The contact replies; both messages are in the history, the reply unread.
    let chats = until(&app, &token, "/chats", |body| body["items"][0]["unreadCount"] == 1).await;
    assert_eq!(chats["sessionId"], id.as_str());
    let chat = &chats["items"][0];
    assert_eq!(chat["chatJid"], CONTACT);
    assert_eq!(chat["chatName"], "Simulated contact 15550100123", "named by the contact's push name");
    assert!(chat["lastMessageText"].as_str().unwrap_or_default().contains("hello history"), "{chat}");
    assert!(chat["lastMessageTs"].is_string());
    let path = format!("/chats/{CONTACT}/messages?sessionId={id}");
    let page = until(&app, &token, &path, |body| {
        body["items"].as_array().is_some_and(|items| items.len() == 2 && items[1]["status"] == "read")
    })
    .await;
    let (reply, mine) = (&page["items"][0], &page["items"][1]);
    assert_eq!((reply["fromMe"].as_bool(), mine["fromMe"].as_bool()), (Some(false), Some(true)), "newest first");
    assert_eq!(mine["text"], "hello history");
    assert_eq!(mine["type"], "text");
    assert!(mine["statusAt"].is_string() && mine["timestamp"].is_string());
    assert_eq!(reply["senderJid"], CONTACT);
    assert_eq!((reply["isDeleted"].as_bool(), reply["reactions"].clone()), (Some(false), json!([])));
    assert_eq!(page["nextCursor"], Value::Null, "a page that is not full is the last");

    // A page at a time; the phone number names the same chat.
    let first = app.get("/chats/+15550100123/messages?limit=1").bearer(&token).send().await;
    assert_eq!(first.body["items"][0]["id"], reply["id"], "{first:?}");
    let cursor = first.body["nextCursor"].as_str().unwrap_or_default().to_owned();
    assert!(!cursor.is_empty());
    let second = app.get(&format!("/chats/{CONTACT}/messages?limit=1&cursor={cursor}")).bearer(&token).send().await;
    assert_eq!(second.body["items"][0]["id"], mine["id"]);
    let cursor = second.body["nextCursor"].as_str().unwrap_or_default().to_owned();
    let third = app.get(&format!("/chats/{CONTACT}/messages?limit=1&cursor={cursor}")).bearer(&token).send().await;
    assert_eq!(third.body["items"], json!([]));

    // Bad input is refused with what is wrong.
    for (query, code) in
        [("sessionId=nope", "invalid_id"), ("cursor=%21%21", "invalid_cursor"), ("limit=many", "invalid_limit")]
    {
        let refused = app.get(&format!("/chats/{CONTACT}/messages?{query}")).bearer(&token).send().await;
        assert_eq!((refused.status, refused.body["code"].as_str()), (400, Some(code)), "{query}");
    }
    assert_eq!(app.get(&format!("/chats/{CONTACT}/messages?limit=1000")).bearer(&token).send().await.status, 200);
    for jid in ["a%00b", &"9".repeat(300)] {
        let refused = app.get(&format!("/chats/{jid}/messages")).bearer(&token).send().await;
        assert_eq!((refused.status, refused.body["code"].as_str()), (400, Some("invalid_jid")), "{jid}");
    }
    let odd = app.http.put(format!("{}/chats/{CONTACT}/messages", app.base)).bearer_auth(&token).send().await;
    assert_eq!(odd.map(|r| r.status().as_u16()).ok(), Some(405));

    // Another tenant sees none of it, naming the session or not.
    for path in
        ["/chats".to_owned(), format!("/chats?sessionId={id}"), format!("/chats/{CONTACT}/messages?sessionId={id}")]
    {
        let foreign = app.get(&path).bearer(&other).send().await;
        assert_eq!(foreign.body["sessionId"], Value::Null, "{path}");
        assert_eq!(foreign.body["items"], json!([]), "{path}");
    }
    assert_eq!(app.get("/chats").send().await.status, 401);

    // Deleting the session deletes its history.
    let deleted = app.http.delete(format!("{}/sessions/{id}", app.base)).bearer_auth(&token).send().await;
    assert_eq!(deleted.map(|r| r.status().as_u16()).ok(), Some(202));
    until(&app, &token, "/chats", |body| body["sessionId"].is_null()).await;
    // The subscriber applies the deletion event a moment after the session is gone.
    let session = uuid::Uuid::parse_str(&id).unwrap_or_default();
    let mut left = None;
    for _ in 0..200 {
        left = app.store.list_messages(session, CONTACT, None, 10).await.ok().map(|m| m.len());
        if left == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, Some(0), "the deleted session's history is gone");
    app.stop().await;
}

crate::on_both_backends!(history_of_sent_and_received_messages);
