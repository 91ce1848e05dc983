//! Message history: messages, their status, chats with their last message and unread count,
//! paging by cursor.

use anna_domain::Session;
use anna_store::{HistoryCursor, StoredMessage};

use super::*;
use crate::sessions::insert_user;

conformance!(history_is_recorded_paged_and_deleted);

fn message(session: &Session, chat: &str, id: &str, at: OffsetDateTime, from_me: bool) -> StoredMessage {
    StoredMessage {
        tenant_id: session.tenant_id,
        session_id: session.id,
        chat_jid: chat.into(),
        message_id: id.into(),
        from_me,
        sender_jid: (!from_me).then(|| chat.to_owned()),
        timestamp: at,
        kind: "text".into(),
        text: Some(format!("text of {id}")),
        status: from_me.then(|| "sent".to_owned()),
        status_at: from_me.then_some(at),
    }
}

async fn history_is_recorded_paged_and_deleted(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "m1@example.com").await?;
    let t = now();
    let (session, _) = Session::create(Uuid::new_v4(), tenant, t);
    let mut uow = store.begin().await?;
    uow.insert_session(&session).await?;
    uow.commit().await?;
    let (a, b) = ("491111@s.whatsapp.net", "492222@s.whatsapp.net");

    let mut uow = store.begin().await?;
    assert!(uow.record_message(&message(&session, a, "m1", t, false), true, Some("Ann")).await?);
    assert!(uow.record_message(&message(&session, a, "m3", t + Duration::seconds(1), false), true, None).await?);
    assert!(uow.record_message(&message(&session, a, "m2", t + Duration::seconds(1), false), true, None).await?);
    assert!(uow.record_message(&message(&session, b, "s1", t + Duration::seconds(2), true), false, None).await?);
    // Reported twice: stored once, counted once.
    assert!(!uow.record_message(&message(&session, a, "m1", t, false), true, None).await?);
    // An older message arriving late does not move the chat's last message back.
    assert!(uow.record_message(&message(&session, b, "s0", t - Duration::seconds(5), false), true, None).await?);
    // A session that does not exist (deleted before its late events) gets nothing.
    let (gone, _) = Session::create(Uuid::new_v4(), tenant, t);
    assert!(!uow.record_message(&message(&gone, a, "x1", t, false), true, None).await?);
    uow.commit().await?;

    let chats = store.list_chats(session.id).await?;
    let summary: Vec<(&str, Option<&str>, u64)> =
        chats.iter().map(|c| (c.chat_jid.as_str(), c.last_message_id.as_deref(), c.unread_count)).collect();
    assert_eq!(summary, vec![(b, Some("s1"), 1), (a, Some("m3"), 3)], "latest first");
    assert_eq!(chats[0].last_message_text.as_deref(), Some("text of s1"));
    assert_eq!((chats[0].chat_name.as_deref(), chats[1].chat_name.as_deref()), (None, Some("Ann")), "kept once known");
    assert!(store.list_chats(gone.id).await?.is_empty());

    // Newest first; equal timestamps by message id; a cursor continues strictly older.
    let page = store.list_messages(session.id, a, None, 2).await?;
    assert_eq!(page.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), vec!["m3", "m2"]);
    let cursor = HistoryCursor { timestamp: page[1].timestamp, message_id: page[1].message_id.clone() };
    // A message inserted meanwhile at the top does not shift the next page.
    let mut uow = store.begin().await?;
    uow.record_message(&message(&session, a, "m4", t + Duration::seconds(3), false), true, None).await?;
    uow.commit().await?;
    let next = store.list_messages(session.id, a, Some(&cursor), 2).await?;
    assert_eq!(next, vec![message(&session, a, "m1", t, false)]);

    // Statuses move forward only, whatever their times say (receipts come in whole seconds).
    let mut uow = store.begin().await?;
    assert!(uow.record_message_status(session.id, "s1", "delivered", t + Duration::seconds(8)).await?);
    assert!(uow.record_message_status(session.id, "s1", "read", t + Duration::seconds(9)).await?);
    assert!(!uow.record_message_status(session.id, "s1", "delivered", t + Duration::seconds(10)).await?, "behind");
    assert!(!uow.record_message_status(session.id, "s1", "read", t + Duration::seconds(11)).await?, "as far");
    assert!(!uow.record_message_status(session.id, "nope", "read", t).await?);
    uow.commit().await?;
    let sent = store.list_messages(session.id, b, None, 10).await?;
    assert_eq!(sent[0].status.as_deref(), Some("read"));
    assert_eq!(sent[0].status_at, Some(t + Duration::seconds(9)));

    let mut uow = store.begin().await?;
    assert_eq!(uow.delete_message_history(session.id).await?, 6);
    uow.commit().await?;
    assert!(store.list_chats(session.id).await?.is_empty());
    assert!(store.list_messages(session.id, a, None, 10).await?.is_empty());

    // The history belongs to its session: deleting the session deletes it.
    let mut uow = store.begin().await?;
    uow.record_message(&message(&session, a, "m9", t, false), true, None).await?;
    assert!(uow.delete_session(session.id).await?);
    uow.commit().await?;
    assert!(store.list_chats(session.id).await?.is_empty());
    assert!(store.list_messages(session.id, a, None, 10).await?.is_empty());
    Ok(())
}
