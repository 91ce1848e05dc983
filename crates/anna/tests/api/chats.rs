//! The message history over REST, on the simulator: what a session sends and receives shows up
//! in `/chats` and `/chats/{jid}/messages`, paged by cursor, for its tenant only.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use crate::sessions::{connected_session, tenant};

const CONTACT: &str = "15550100123@s.whatsapp.net";

/// Polls `path` until `done` holds for its body; returns it.
pub(crate) async fn until(app: &TestApp, token: &str, path: &str, done: impl Fn(&Value) -> bool) -> Value {
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
    // The contact's reply quotes the message it answers, with that one's text.
    assert_eq!(reply["replyTo"]["messageId"], mine["id"], "{reply}");
    assert_eq!(
        (reply["replyTo"]["text"].as_str(), reply["replyTo"]["type"].as_str()),
        (Some("hello history"), Some("text"))
    );
    assert_eq!((mine["replyTo"].clone(), mine["mentions"].clone()), (Value::Null, json!([])));
    // WhatsApp's record of each message only on request: the key names the message and chat.
    assert!(reply.get("raw").is_none() && mine.get("raw").is_none(), "{page}");
    let raw_page = app.get(&format!("{path}&includeRaw=true")).bearer(&token).send().await;
    let (raw_reply, raw_mine) = (&raw_page.body["items"][0]["raw"], &raw_page.body["items"][1]["raw"]);
    assert_eq!(raw_reply["key"], json!({"remoteJid": CONTACT, "fromMe": false, "id": reply["id"]}), "{raw_page:?}");
    assert_eq!(raw_reply["message"]["extendedTextMessage"]["contextInfo"]["stanzaId"], mine["id"]);
    assert_eq!(raw_mine["key"]["fromMe"], true);
    assert_eq!(raw_mine["message"], json!({"conversation": "hello history"}));
    let refused = app.get(&format!("{path}&includeRaw=maybe")).bearer(&token).send().await;
    assert_eq!((refused.status, refused.body["code"].as_str()), (400, Some("invalid_include_raw")));
    // The message events carry it to the history subscriber (sockets and webhooks drop it:
    // see the sessions test and the webhook body's unit test).
    let received = app.events_until(&id, "session.message.received", |found| !found.is_empty()).await;
    assert!(!received.is_empty() && received.iter().all(|event| event.get("raw").is_some_and(Value::is_object)));
    // The contact came online and typed before replying (`session.presence.update`).
    let presences = app.events_until(&id, "session.presence.update", |found| found.len() >= 3).await;
    let presences: Vec<&Value> = presences
        .iter()
        .filter(|p| p["chatJid"] == CONTACT && p["updates"][0]["jid"] == CONTACT)
        .map(|p| &p["updates"][0]["presence"])
        .collect();
    assert_eq!(presences, ["available", "composing", "unavailable"]);

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
    for path in [format!("/chats/{CONTACT}/read"), "/contacts".to_owned(), "/settings/retention".to_owned()] {
        let odd = app.http.delete(format!("{}{path}", app.base)).bearer_auth(&token).send().await;
        assert_eq!(odd.map(|r| r.status().as_u16()).ok(), Some(405), "{path}");
    }

    // Another tenant sees none of it, naming the session or not.
    for path in
        ["/chats".to_owned(), format!("/chats?sessionId={id}"), format!("/chats/{CONTACT}/messages?sessionId={id}")]
    {
        let foreign = app.get(&path).bearer(&other).send().await;
        assert_eq!(foreign.body["sessionId"], Value::Null, "{path}");
        assert_eq!(foreign.body["items"], json!([]), "{path}");
    }
    assert_eq!(app.get("/chats").send().await.status, 401);

    // A reply sent through the API quotes what it answers, too.
    let answered = app
        .post(&format!("/chats/{CONTACT}/messages"))
        .bearer(&token)
        .json(json!({"content": "answering you", "replyToMessageId": reply["id"]}))
        .send()
        .await;
    assert_eq!(answered.status, 202, "{answered:?}");
    let page = until(&app, &token, &path, |body| {
        body["items"].as_array().is_some_and(|items| items.iter().any(|i| i["text"] == "answering you"))
    })
    .await;
    let mine = page["items"].as_array().and_then(|items| items.iter().find(|i| i["text"] == "answering you")).cloned();
    let mine = mine.unwrap_or_default();
    assert_eq!(mine["replyTo"]["messageId"], reply["id"], "{mine}");
    assert!(mine["replyTo"]["text"].as_str().is_some_and(|t| t.starts_with("Simulated reply")), "{mine}");

    // Deleting the session deletes its history.
    let deleted = app.http.delete(format!("{}/sessions/{id}", app.base)).bearer_auth(&token).send().await;
    assert_eq!(deleted.map(|r| r.status().as_u16()).ok(), Some(202));
    until(&app, &token, "/chats", |body| body["sessionId"].is_null()).await;
    // The subscriber applies the deletion event a moment after the session is gone.
    let session = uuid::Uuid::parse_str(&id).unwrap_or_default();
    let mut left = None;
    for _ in 0..200 {
        left = app.store.list_messages(session, CONTACT, None, 10, false).await.ok().map(|m| m.len());
        if left == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, Some(0), "the deleted session's history is gone");
    app.stop().await;
}

/// The items of a chat's first page.
async fn page_until(app: &TestApp, token: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let body = until(app, token, &format!("/chats/{CONTACT}/messages"), |body| {
        body["items"].as_array().is_some_and(|items| done(items))
    })
    .await;
    body["items"].as_array().cloned().unwrap_or_default()
}

fn by_id<'a>(items: &'a [Value], id: &str) -> &'a Value {
    items.iter().find(|item| item["id"] == id).unwrap_or(&Value::Null)
}

/// Sends, edits, deletes, reacts and reads through the chat routes; the simulated contact
/// reacts, edits and deletes its reply; all of it lands in the history, for its tenant only.
async fn edits_deletions_reactions_and_reads(backend: Backend) {
    let app = spawn_app(backend).await;
    let token = tenant(&app).await;
    let other = tenant(&app).await;
    let id = connected_session(&app, &token).await;
    let phone = app.get(&format!("/sessions/{id}")).bearer(&token).send().await.body["phone"].clone();

    let sent = app
        .post(&format!("/chats/{CONTACT}/messages"))
        .bearer(&token)
        .json(json!({"content": "hi #react #edit #delete", "messageId": "mine-1"}))
        .send()
        .await;
    assert_eq!((sent.status, sent.body["sessionId"].as_str()), (202, Some(id.as_str())), "{sent:?}");
    assert!(sent.body["commandId"].is_string());

    // The contact reacts to the message, replies, edits its reply, then deletes it.
    let items = page_until(&app, &token, |items| {
        items.len() == 2
            && items[0]["isDeleted"] == true
            && items[1]["reactions"].as_array().is_some_and(|r| !r.is_empty())
    })
    .await;
    let (reply, mine) = (&items[0], &items[1]);
    assert_eq!(mine["reactions"], json!([{"messageId": mine["id"], "emoji": "👍", "count": 1, "actors": [CONTACT]}]));
    assert_eq!((reply["isEdited"].as_bool(), reply["text"].as_str()), (Some(true), Some("Simulated reply, edited")));
    assert!(reply["editedAt"].is_string() && reply["deletedAt"].is_string(), "{reply}");
    let (mine_id, reply_id) =
        (mine["id"].as_str().unwrap_or_default().to_owned(), reply["id"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        until(&app, &token, "/chats", |body| body["items"][0]["unreadCount"] == 1).await["items"][0]["chatJid"],
        CONTACT
    );

    // Reading the chat resets its unread count.
    let read =
        app.post(&format!("/chats/{CONTACT}/read")).bearer(&token).json(json!({"messageIds": [reply_id]})).send().await;
    assert_eq!(read.status, 202, "{read:?}");
    until(&app, &token, "/chats", |body| body["items"][0]["unreadCount"] == 0).await;

    // Our own edit, reaction (then its removal) and deletion.
    let edited = app
        .patch(&format!("/chats/{CONTACT}/messages/{mine_id}"))
        .bearer(&token)
        .json(json!({"content": "hi, edited"}))
        .send()
        .await;
    assert_eq!(edited.status, 202, "{edited:?}");
    let items = page_until(&app, &token, |items| by_id(items, &mine_id)["text"] == "hi, edited").await;
    assert_eq!(by_id(&items, &mine_id)["isEdited"], true);
    let reactions = format!("/chats/{CONTACT}/messages/{reply_id}/reactions");
    // A deleted message takes no reaction; the message we sent does.
    let refused = app.post(&reactions).bearer(&token).json(json!({"emoji": "❤️"})).send().await;
    assert_eq!((refused.status, refused.body["code"].as_str()), (409, Some("message_conflict")), "{refused:?}");
    let on_mine = format!("/chats/{CONTACT}/messages/{mine_id}/reactions");
    assert_eq!(app.post(&on_mine).bearer(&token).json(json!({"emoji": " ❤️ "})).send().await.status, 202);
    let items =
        page_until(&app, &token, |items| by_id(items, &mine_id)["reactions"].as_array().is_some_and(|r| r.len() == 2))
            .await;
    let heart = by_id(&items, &mine_id)["reactions"].as_array().into_iter().flatten().find(|r| r["emoji"] == "❤️");
    assert_eq!(heart, Some(&json!({"messageId": mine_id, "emoji": "❤️", "count": 1, "actors": [phone]})));
    assert_eq!(app.post(&on_mine).bearer(&token).json(json!({"emoji": null})).send().await.status, 202);
    page_until(&app, &token, |items| by_id(items, &mine_id)["reactions"].as_array().is_some_and(|r| r.len() == 1))
        .await;
    let deleted =
        app.delete(&format!("/chats/{CONTACT}/messages/{mine_id}?sessionId={id}")).bearer(&token).send().await;
    assert_eq!(deleted.status, 202, "{deleted:?}");
    page_until(&app, &token, |items| by_id(items, &mine_id)["isDeleted"] == true).await;

    // Each change is a domain event for webhooks and sockets.
    let session = uuid::Uuid::parse_str(&id).unwrap_or_default();
    let names: Vec<String> = app
        .store
        .outbox_events_for_aggregate(&session.to_string())
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|row| row.event.event_name)
        .collect();
    for name in
        ["session.messages.edit", "session.messages.delete", "session.messages.reaction", "session.chats.update"]
    {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }

    // What cannot be done is refused with why.
    let message = format!("/chats/{CONTACT}/messages/{reply_id}");
    let cases: Vec<(Req<'_>, u16, &str)> = vec![
        (
            app.patch(&message).json(json!({"content": "not mine"})),
            409,
            "only messages sent by this account can be edited",
        ),
        (app.patch(&format!("/chats/{CONTACT}/messages/nope")).json(json!({"content": "x"})), 404, "message not found"),
        (app.patch(&message).json(json!({})), 400, "content is required"),
        (app.delete(&format!("/chats/{CONTACT}/messages/{mine_id}")), 409, "the message is deleted already"),
        (app.post(&format!("/chats/{CONTACT}/read")).json(json!({})), 400, "messageIds is required"),
        (app.post(&format!("/chats/{CONTACT}/read")).json(json!({"messageIds": ["nope"]})), 404, "message not found"),
        (app.post(&on_mine).json(json!({})), 400, "emoji is required (null or \"\" removes the reaction)"),
        (app.post(&on_mine).json(json!({"emoji": "thumbs up"})), 400, ""),
        (
            app.post(&format!("/chats/{CONTACT}/messages"))
                .json(json!({"content": "x", "replyToMessageId": "a", "forwardMessageId": "b"})),
            400,
            "replyToMessageId and forwardMessageId cannot be combined",
        ),
        (
            app.post(&format!("/chats/{CONTACT}/messages")).json(json!({})),
            400,
            "content or media is required unless forwarding",
        ),
        (
            app.post(&format!("/chats/{CONTACT}/messages")).json(json!({"media": {"kind": "image", "url": "x"}})),
            400,
            "media url must be an http(s) URL of at most 2048 characters",
        ),
        (app.post(&format!("/chats/{CONTACT}/messages/a%00b/reactions")).json(json!({"emoji": "👍"})), 400, ""),
        (app.post(&format!("/chats/{CONTACT}/read")).json(json!({"messageIds": vec!["x"; 1001]})), 400, ""),
        (app.patch(&format!("/chats/{CONTACT}/messages/{}", "9".repeat(300))).json(json!({"content": "x"})), 400, ""),
        (app.post(&on_mine).json(json!({"emoji": "👍".repeat(17)})), 400, ""),
        (app.post(&on_mine).json(json!({"emoji": "👍\u{0}"})), 400, ""),
        (app.patch(&message).json(json!({"content": "a\u{0}b"})), 400, "content must not contain control characters"),
    ];
    for (request, status, text) in cases {
        let refused = request.bearer(&token).send().await;
        assert_eq!(refused.status, status, "{refused:?}");
        if !text.is_empty() {
            assert_eq!(refused.message(), text, "{refused:?}");
        }
    }
    // A body over HTTP_MAX_BODY_BYTES is refused from its announced length, before it is read.
    let answer = app
        .raw_answer(&format!(
            "POST /chats/{CONTACT}/messages HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
             content-type: application/json\r\ncontent-length: 70000\r\nconnection: close\r\n\r\n{{\"content\": \""
        ))
        .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Another tenant reaches none of it: no session of theirs, and naming ours is the same 404.
    for session_id in [None, Some(id.as_str())] {
        let query = session_id.map(|s| format!("?sessionId={s}")).unwrap_or_default();
        let with = |body: Value| match session_id {
            Some(s) => {
                let mut body = body;
                body["sessionId"] = json!(s);
                body
            }
            None => body,
        };
        let requests = vec![
            app.post(&format!("/chats/{CONTACT}/messages")).json(with(json!({"content": "x"}))),
            app.post(&format!("/chats/{CONTACT}/read")).json(with(json!({"messageIds": [reply_id]}))),
            app.patch(&format!("/chats/{CONTACT}/messages/{mine_id}")).json(with(json!({"content": "x"}))),
            app.delete(&format!("/chats/{CONTACT}/messages/{reply_id}{query}")),
            app.post(&format!("/chats/{CONTACT}/messages/{mine_id}/reactions")).json(with(json!({"emoji": "👍"}))),
        ];
        for request in requests {
            let refused = request.bearer(&other).send().await;
            assert_eq!((refused.status, refused.message()), (404, "session not found"), "{refused:?}");
        }
    }
    app.stop().await;
}

/// After pairing, the phone's history arrives: chats with the phone's unread counts, their
/// messages, the contacts; events tell its progress, not its messages.
async fn the_phone_history_arrives_after_pairing(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[("SESSIONS_SIMULATOR_HISTORY_MESSAGES", "1200"), ("SESSIONS_SIMULATOR_HISTORY_CHATS", "3")],
    )
    .await;
    let token = tenant(&app).await;
    let other = tenant(&app).await;
    let id = connected_session(&app, &token).await;
    let chats =
        until(&app, &token, "/chats", |body| body["items"].as_array().is_some_and(|items| items.len() == 3)).await;
    let first = "15550200000@s.whatsapp.net";
    assert!(chats["items"].as_array().into_iter().flatten().any(|chat| chat["chatJid"] == first), "{chats}");
    let contacts =
        until(&app, &token, "/contacts", |body| body["items"].as_array().is_some_and(|items| items.len() == 3)).await;
    assert_eq!(contacts["sessionId"], id.as_str());
    assert_eq!(
        contacts["items"][0],
        json!({"contactJid": first, "contactLid": null, "phoneNumber": "+15550200000", "name": null,
            "notify": "History contact 0", "verifiedName": null, "imgUrl": null, "status": null})
    );

    // Every message of the history, a page at a time: 400 in the first chat.
    let session = uuid::Uuid::parse_str(&id).unwrap_or_default();
    let (mut seen, mut reacted) = (0, 0);
    let mut cursor = String::new();
    for _ in 0..100 {
        let page = app.get(&format!("/chats/{first}/messages?limit=200&cursor={cursor}")).bearer(&token).send().await;
        let items = page.body["items"].as_array().cloned().unwrap_or_default();
        seen += items.len();
        reacted += items.iter().filter(|item| item["reactions"][0]["emoji"] == "❤️").count();
        match page.body["nextCursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None if seen == 400 && reacted == 134 => break,
            // Still arriving: start over.
            None => {
                (seen, reacted, cursor) = (0, 0, String::new());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(seen, 400);
    assert_eq!(reacted, 134, "the reactions of the history (every ninth message's)");

    // Progress summaries, never the messages themselves.
    let mut synced = 0;
    for _ in 0..100 {
        let events = app.store.outbox_events_for_aggregate(&session.to_string()).await.unwrap_or_default();
        let summaries: Vec<_> = events
            .iter()
            .filter(|row| row.event.event_name == "session.history.sync")
            .map(|row| &row.event.payload)
            .collect();
        synced = summaries.iter().map(|p| p["messagesCount"].as_u64().unwrap_or(0)).sum::<u64>();
        if synced == 1200 {
            assert!(summaries.iter().all(|p| p.get("messages").is_none() && p["syncType"] == "initial_bootstrap"));
            assert_eq!(summaries.last().map(|p| p["progress"].clone()), Some(json!(100)));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(synced, 1200);

    // Another tenant's contacts are not to be seen.
    let foreign = app.get(&format!("/contacts?sessionId={id}")).bearer(&other).send().await;
    assert_eq!((foreign.status, &foreign.body), (200, &json!({"sessionId": null, "items": []})));
    assert_eq!(app.get("/contacts?sessionId=nope").bearer(&token).send().await.status, 400);
    app.stop().await;
}

/// Every stored message of a session: (chat, timestamp).
async fn stored(app: &TestApp, session: uuid::Uuid) -> Vec<time::OffsetDateTime> {
    let mut all = Vec::new();
    for chat in app.store.list_chats(session).await.unwrap_or_default() {
        let page = app.store.list_messages(session, &chat.chat_jid, None, 10_000, false).await.unwrap_or_default();
        all.extend(page.into_iter().map(|m| m.timestamp));
    }
    all
}

/// A tenant chooses how long its messages are kept; older ones are purged, another tenant's
/// are not.
async fn messages_past_the_tenants_retention_are_purged(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[
            ("MESSAGES_UPKEEP_INTERVAL_MS", "100"),
            ("MESSAGES_RETENTION_INTERVAL_MS", "200"),
            ("MESSAGES_RETENTION_BATCH", "7"),
        ],
    )
    .await;
    let (token, other) = (tenant(&app).await, tenant(&app).await);
    let default = app.get("/settings/retention").bearer(&token).send().await;
    assert_eq!(
        (default.status, &default.body),
        (200, &json!({"messageRetentionDays": null, "defaultDays": 0, "effectiveDays": null}))
    );
    for (body, status) in [
        (json!({"messageRetentionDays": 0}), 400),
        (json!({"messageRetentionDays": 3651}), 400),
        (json!({}), 400),
        (json!({"messageRetentionDays": "ten"}), 422),
    ] {
        let refused = app.put("/settings/retention").bearer(&token).json(body.clone()).send().await;
        assert_eq!(refused.status, status, "{body}");
    }

    // Both tenants' phones send 60 messages of the last 30 days.
    let (mine, theirs) = (connected_session(&app, &token).await, connected_session(&app, &other).await);
    let (mine, theirs) =
        (uuid::Uuid::parse_str(&mine).unwrap_or_default(), uuid::Uuid::parse_str(&theirs).unwrap_or_default());
    for session in [mine, theirs] {
        for _ in 0..200 {
            if stored(&app, session).await.len() == 60 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(stored(&app, session).await.len(), 60);
    }

    let set = app.put("/settings/retention").bearer(&token).json(json!({"messageRetentionDays": 10})).send().await;
    assert_eq!(set.status, 200, "{set:?}");
    let shown = app.get("/settings/retention").bearer(&token).send().await;
    assert_eq!(shown.body, json!({"messageRetentionDays": 10, "defaultDays": 0, "effectiveDays": 10}));
    let cutoff = time::OffsetDateTime::now_utc() - time::Duration::days(10);
    let mut left = Vec::new();
    for _ in 0..200 {
        left = stored(&app, mine).await;
        if left.iter().all(|at| *at >= cutoff - time::Duration::minutes(1)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(left.iter().all(|at| *at >= cutoff - time::Duration::minutes(1)), "{left:?}");
    assert!((15..=25).contains(&left.len()), "about a third of 30 days is kept: {}", left.len());
    assert_eq!(stored(&app, theirs).await.len(), 60, "another tenant's history is not touched");
    app.stop().await;
}

/// A contact that answers by its LID (`#lid`) is still one chat: listed once under its phone
/// JID, paged, read, reacted to and sent to under either address.
async fn a_chat_known_by_phone_and_lid_is_one_chat(backend: Backend) {
    let app = spawn_app(backend).await;
    let token = tenant(&app).await;
    let id = connected_session(&app, &token).await;
    let lid = anna_whatsapp::simulator::lid_of(CONTACT);
    let sent =
        app.post(&format!("/chats/{CONTACT}/messages")).bearer(&token).json(json!({"content": "hi #lid"})).send().await;
    assert_eq!(sent.status, 202, "{sent:?}");
    let chats = until(&app, &token, "/chats", |body| body["items"][0]["unreadCount"] == 1).await;
    let items = chats["items"].as_array().cloned().unwrap_or_default();
    let of_contact =
        |items: &[Value]| items.iter().filter(|i| i["chatJid"] == CONTACT || i["chatJid"] == lid.as_str()).count();
    assert_eq!(of_contact(&items), 1, "one chat, not one per address: {chats}");
    assert_eq!(items[0]["chatJid"], CONTACT, "named by its phone JID");
    assert!(items[0]["lastMessageText"].as_str().unwrap_or_default().starts_with("Simulated reply"), "{chats}");
    assert_eq!(items[0]["chatName"], "Simulated contact 15550100123");
    // The contact is known from its message: its push name, its phone number and its LID.
    let contacts = until(&app, &token, "/contacts", |body| {
        body["items"].as_array().is_some_and(|items| items.iter().any(|c| c["contactJid"] == CONTACT))
    })
    .await;
    let contact =
        contacts["items"].as_array().and_then(|items| items.iter().find(|c| c["contactJid"] == CONTACT)).cloned();
    let contact = contact.unwrap_or_default();
    assert_eq!(contact["notify"], "Simulated contact 15550100123", "{contact}");
    assert_eq!(
        (contact["contactLid"].as_str(), contact["phoneNumber"].as_str()),
        (Some(lid.as_str()), Some("+15550100123"))
    );

    let by_lid = until(&app, &token, &format!("/chats/{lid}/messages"), |body| {
        body["items"].as_array().is_some_and(|i| i.len() == 2)
    })
    .await;
    let by_phone = app.get(&format!("/chats/{CONTACT}/messages")).bearer(&token).send().await;
    // The same messages (their statuses may move on between the two reads).
    let ids = |items: &Value| -> Vec<Value> {
        items.as_array().map(|items| items.iter().map(|i| i["id"].clone()).collect()).unwrap_or_default()
    };
    assert_eq!(ids(&by_lid["items"]), ids(&by_phone.body["items"]), "both addresses page the same chat");
    let reply = by_lid["items"][0]["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(by_lid["items"][0]["fromMe"], false);
    let paged = app.get(&format!("/chats/{lid}/messages?limit=1")).bearer(&token).send().await;
    let cursor = paged.body["nextCursor"].as_str().unwrap_or_default().to_owned();
    let older = app.get(&format!("/chats/{CONTACT}/messages?limit=1&cursor={cursor}")).bearer(&token).send().await;
    assert_eq!(older.body["items"][0]["text"], "hi #lid", "a cursor of one address pages the other");

    // Commands find the message under either address; a send to the LID goes to the phone JID.
    let reacted = app
        .post(&format!("/chats/{CONTACT}/messages/{reply}/reactions"))
        .bearer(&token)
        .json(json!({"emoji": "👍"}))
        .send()
        .await;
    assert_eq!(reacted.status, 202, "{reacted:?}");
    let read =
        app.post(&format!("/chats/{CONTACT}/read")).bearer(&token).json(json!({"messageIds": [reply]})).send().await;
    assert_eq!(read.status, 202, "{read:?}");
    until(&app, &token, "/chats", |body| body["items"][0]["unreadCount"] == 0).await;
    let again =
        app.post(&format!("/chats/{lid}/messages")).bearer(&token).json(json!({"content": "to the lid"})).send().await;
    assert_eq!(again.status, 202, "{again:?}");
    let sent = app.events_until(&id, "session.message.sent", |found| found.len() == 2).await;
    let sent_to: Vec<&Value> = sent.iter().map(|p| &p["chat"]).collect();
    assert_eq!(sent_to, [CONTACT, CONTACT]);
    let chats = until(&app, &token, "/chats", |body| {
        body["items"][0]["lastMessageText"]
            .as_str()
            .is_some_and(|t| t.contains("to the lid") || t.starts_with("Simulated reply to: to the lid"))
    })
    .await;
    assert_eq!(of_contact(chats["items"].as_array().map(Vec::as_slice).unwrap_or_default()), 1, "{chats}");
    app.stop().await;
}

crate::on_both_backends!(
    a_chat_known_by_phone_and_lid_is_one_chat,
    messages_past_the_tenants_retention_are_purged,
    history_of_sent_and_received_messages,
    edits_deletions_reactions_and_reads,
    the_phone_history_arrives_after_pairing
);
