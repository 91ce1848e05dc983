//! Message history: messages, their status, chats with their last message and unread count,
//! paging by cursor.

use anna_domain::Session;
use anna_domain::session::{
    ChangeKind, HistoryChat, HistoryContact, HistoryMessage, HistoryPiece, MessageChange, RawMessage, ReceivedMessage,
};
use anna_store::{HistoryCursor, ReactionSummary, StoredMessage};

use super::*;
use crate::sessions::insert_user;

conformance!(
    history_is_recorded_paged_and_deleted,
    edits_deletions_reactions_and_reads_change_the_history,
    a_history_sync_is_stored_a_piece_at_a_time,
    messages_expire_by_their_tenants_retention,
    contacts_seen_in_messages_are_kept,
    replies_mentions_and_forwards_are_kept,
    a_read_on_the_phone_leaves_later_messages_unread
);

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
        edited_at: None,
        deleted_at: None,
        context: Default::default(),
        raw: None,
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
    let page = store.list_messages(session.id, a, None, 2, false).await?;
    assert_eq!(page.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), vec!["m3", "m2"]);
    let cursor = HistoryCursor { timestamp: page[1].timestamp, message_id: page[1].message_id.clone() };
    // A message inserted meanwhile at the top does not shift the next page.
    let mut uow = store.begin().await?;
    uow.record_message(&message(&session, a, "m4", t + Duration::seconds(3), false), true, None).await?;
    uow.commit().await?;
    let next = store.list_messages(session.id, a, Some(&cursor), 2, false).await?;
    assert_eq!(next, vec![message(&session, a, "m1", t, false)]);
    // A message's raw form is stored with it, and read only when asked for (on a cursor too).
    let mut uow = store.begin().await?;
    let raw = serde_json::json!({"key": {"remoteJid": a, "id": "m0"}, "message": {"conversation": "text of m0"}});
    let with_raw =
        StoredMessage { raw: Some(raw.clone()), ..message(&session, a, "m0", t - Duration::seconds(1), false) };
    uow.record_message(&with_raw, false, None).await?;
    uow.commit().await?;
    let older = store.list_messages(session.id, a, Some(&cursor), 2, true).await?;
    assert_eq!(older.iter().map(|m| m.raw.clone()).collect::<Vec<_>>(), vec![None, Some(raw)]);
    assert_eq!(store.list_messages(session.id, a, Some(&cursor), 2, false).await?[1].raw, None);

    // Statuses move forward only, whatever their times say (receipts come in whole seconds).
    let mut uow = store.begin().await?;
    assert!(uow.record_message_status(session.id, "s1", "delivered", t + Duration::seconds(8)).await?);
    assert!(uow.record_message_status(session.id, "s1", "read", t + Duration::seconds(9)).await?);
    assert!(!uow.record_message_status(session.id, "s1", "delivered", t + Duration::seconds(10)).await?, "behind");
    assert!(!uow.record_message_status(session.id, "s1", "read", t + Duration::seconds(11)).await?, "as far");
    assert!(!uow.record_message_status(session.id, "nope", "read", t).await?);
    uow.commit().await?;
    let sent = store.list_messages(session.id, b, None, 10, false).await?;
    assert_eq!(sent[0].status.as_deref(), Some("read"));
    assert_eq!(sent[0].status_at, Some(t + Duration::seconds(9)));

    let mut uow = store.begin().await?;
    assert_eq!(uow.delete_message_history(session.id).await?, 7);
    uow.commit().await?;
    assert!(store.list_chats(session.id).await?.is_empty());
    assert!(store.list_messages(session.id, a, None, 10, false).await?.is_empty());

    // The history belongs to its session: deleting the session deletes it.
    let mut uow = store.begin().await?;
    uow.record_message(&message(&session, a, "m9", t, false), true, None).await?;
    assert!(uow.delete_session(session.id).await?);
    uow.commit().await?;
    assert!(store.list_chats(session.id).await?.is_empty());
    assert!(store.list_messages(session.id, a, None, 10, false).await?.is_empty());
    Ok(())
}

fn change(chat: &str, id: &str, actor: &str, at: OffsetDateTime, kind: ChangeKind) -> MessageChange {
    MessageChange { chat: chat.into(), message_id: id.into(), actor: actor.into(), from_me: false, at, kind }
}

async fn edits_deletions_reactions_and_reads_change_the_history(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "m2@example.com").await?;
    let t = now();
    let (session, _) = Session::create(Uuid::new_v4(), tenant, t);
    let (chat, ann, bob) = ("491111@s.whatsapp.net", "491111@s.whatsapp.net", "493333@s.whatsapp.net");
    let mut uow = store.begin().await?;
    uow.insert_session(&session).await?;
    uow.record_message(&message(&session, chat, "m1", t, false), true, None).await?;
    uow.record_message(&message(&session, chat, "m2", t + Duration::seconds(1), false), true, None).await?;
    uow.commit().await?;
    let edit = |id, text: &str, at| change(chat, id, ann, at, ChangeKind::Edited { text: Some(text.into()) });
    let react = |id, actor, emoji: Option<&str>, at| {
        change(chat, id, actor, at, ChangeKind::Reaction { emoji: emoji.map(str::to_owned) })
    };

    let mut uow = store.begin().await?;
    assert!(
        uow.record_message_change(tenant, session.id, &edit("m2", "second, edited", t + Duration::seconds(5))).await?
    );
    // An older edit arriving late changes nothing.
    assert!(!uow.record_message_change(tenant, session.id, &edit("m2", "stale", t + Duration::seconds(4))).await?);
    assert!(
        uow.record_message_change(
            tenant,
            session.id,
            &change(chat, "m1", ann, t + Duration::seconds(6), ChangeKind::Revoked)
        )
        .await?
    );
    assert!(
        uow.record_message_change(tenant, session.id, &edit("m1", "after deletion", t + Duration::seconds(7))).await?
    );
    assert!(
        uow.record_message_change(tenant, session.id, &react("m2", ann, Some("👍"), t + Duration::seconds(2))).await?
    );
    assert!(
        uow.record_message_change(tenant, session.id, &react("m2", bob, Some("👍"), t + Duration::seconds(3))).await?
    );
    assert!(
        uow.record_message_change(tenant, session.id, &react("m1", bob, Some("😂"), t + Duration::seconds(3))).await?
    );
    // Bob changes his mind on m1, then an older reaction of his arrives late: still removed.
    assert!(uow.record_message_change(tenant, session.id, &react("m1", bob, None, t + Duration::seconds(8))).await?);
    assert!(
        !uow.record_message_change(tenant, session.id, &react("m1", bob, Some("😮"), t + Duration::seconds(4))).await?
    );
    // A reaction to a message not stored yet is kept for it.
    assert!(uow.record_message_change(tenant, session.id, &react("m3", ann, Some("❤️"), t)).await?);
    uow.commit().await?;

    let page = store.list_messages(session.id, chat, None, 10, false).await?;
    let (m2, m1) = (&page[0], &page[1]);
    assert_eq!(
        (m2.text.as_deref(), m2.edited_at, m2.is_deleted()),
        (Some("second, edited"), Some(t + Duration::seconds(5)), false)
    );
    // Edited after its deletion (changes arrive out of order): both are kept.
    assert_eq!(
        (m1.text.as_deref(), m1.is_edited(), m1.deleted_at),
        (Some("after deletion"), true, Some(t + Duration::seconds(6)))
    );
    let chats = store.list_chats(session.id).await?;
    assert_eq!(chats[0].last_message_text.as_deref(), Some("second, edited"), "the last message's new text");
    assert_eq!(chats[0].unread_count, 2);

    // A message is changed only in its chat, by whom may: not by another contact, not by the
    // account (it is Ann's), not through another chat.
    let mut uow = store.begin().await?;
    let by = |actor: &str, from_me: bool, chat: &str, kind| MessageChange {
        chat: chat.into(),
        message_id: "m2".into(),
        actor: actor.into(),
        from_me,
        at: t + Duration::seconds(30),
        kind,
    };
    let forged = ChangeKind::Edited { text: Some("forged".into()) };
    for change in [
        by(bob, false, chat, forged.clone()),
        by("", true, chat, forged.clone()),
        by(ann, false, "other@s.whatsapp.net", forged.clone()),
        by(bob, false, chat, ChangeKind::Revoked),
        by("", true, chat, ChangeKind::Revoked),
    ] {
        assert!(!uow.record_message_change(tenant, session.id, &change).await?, "{change:?}");
    }
    uow.commit().await?;
    let m2 = store.find_messages(session.id, chat, &["m2".into()]).await?;
    assert_eq!((m2[0].text.as_deref(), m2[0].is_deleted()), (Some("second, edited"), false));
    // Kept changes never expire while young; those of messages that never came do.
    let mut uow = store.begin().await?;
    assert_eq!(uow.settle_pending_changes(100, t - Duration::minutes(1)).await?, (0, 0));
    uow.commit().await?;

    // Changes that overtake their message wait for it: the furthest status, the latest edit,
    // the deletion.
    let mut uow = store.begin().await?;
    assert!(!uow.record_message_change(tenant, session.id, &edit("m5", "early edit", t + Duration::seconds(9))).await?);
    assert!(
        !uow.record_message_change(tenant, session.id, &edit("m5", "earlier edit", t + Duration::seconds(8))).await?
    );
    assert!(!uow.record_message_status(session.id, "m6", "read", t + Duration::seconds(9)).await?);
    assert!(!uow.record_message_status(session.id, "m6", "delivered", t + Duration::seconds(10)).await?);
    assert!(!uow.record_message_change(tenant, session.id, &change(chat, "m7", ann, t, ChangeKind::Revoked)).await?);
    uow.commit().await?;
    assert!(store.list_messages(session.id, chat, None, 10, false).await?.iter().all(|m| m.message_id.as_str() < "m5"));
    let mut uow = store.begin().await?;
    for (id, from_me) in [("m5", false), ("m6", true), ("m7", false)] {
        uow.record_message(&message(&session, chat, id, t + Duration::seconds(2), from_me), false, None).await?;
    }
    uow.commit().await?;
    let late = store.find_messages(session.id, chat, &["m5".into(), "m6".into(), "m7".into()]).await?;
    let of = |id: &str| late.iter().find(|m| m.message_id == id).cloned().unwrap_or_else(|| panic!("{id} missing"));
    assert_eq!((of("m5").text, of("m5").edited_at), (Some("early edit".into()), Some(t + Duration::seconds(9))));
    assert_eq!((of("m6").status, of("m6").status_at), (Some("read".into()), Some(t + Duration::seconds(9))));
    assert_eq!(of("m7").deleted_at, Some(t));
    // An edit that overtook what becomes the chat's last message is the chat's last text too.
    let mut uow = store.begin().await?;
    uow.record_message_change(tenant, session.id, &edit("m9", "late edit", t + Duration::seconds(50))).await?;
    uow.record_message(&message(&session, chat, "m9", t + Duration::seconds(40), false), true, None).await?;
    uow.commit().await?;
    assert_eq!(store.list_chats(session.id).await?[0].last_message_text.as_deref(), Some("late edit"));
    let mut uow = store.begin().await?;
    assert!(!uow.record_message_change(tenant, session.id, &edit("never", "x", t)).await?);
    assert_eq!(uow.settle_pending_changes(100, OffsetDateTime::now_utc() + Duration::minutes(1)).await?, (0, 1));
    uow.commit().await?;

    let ids: Vec<String> = ["m1", "m2", "m3"].map(str::to_owned).to_vec();
    let reactions = store.list_reactions(session.id, &ids).await?;
    assert_eq!(
        reactions,
        vec![
            ReactionSummary { message_id: "m2".into(), emoji: "👍".into(), actors: vec![ann.into(), bob.into()] },
            ReactionSummary { message_id: "m3".into(), emoji: "❤️".into(), actors: vec![ann.into()] },
        ]
    );
    let found = store.find_messages(session.id, chat, &ids).await?;
    let mut found: Vec<&str> = found.iter().map(|m| m.message_id.as_str()).collect();
    found.sort_unstable();
    assert_eq!(found, vec!["m1", "m2"]);
    assert!(store.find_messages(session.id, "other@s.whatsapp.net", &ids).await?.is_empty(), "another chat");

    let mut uow = store.begin().await?;
    assert!(uow.mark_chat_read(session.id, chat).await?);
    assert!(!uow.mark_chat_read(session.id, "other@s.whatsapp.net").await?);
    uow.commit().await?;
    assert_eq!(store.list_chats(session.id).await?[0].unread_count, 0);

    // Reactions go with their session's history.
    let mut uow = store.begin().await?;
    uow.delete_message_history(session.id).await?;
    uow.commit().await?;
    assert!(store.list_reactions(session.id, &ids).await?.is_empty());
    Ok(())
}

async fn a_history_sync_is_stored_a_piece_at_a_time(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "m3@example.com").await?;
    let t = now();
    let (session, _) = Session::create(Uuid::new_v4(), tenant, t);
    let (ann, bob) = ("491111@s.whatsapp.net", "492222@s.whatsapp.net");
    let mut uow = store.begin().await?;
    uow.insert_session(&session).await?;
    // A live message of Ann's, newer than the history, already counted unread.
    uow.record_message(&message(&session, ann, "live", t + Duration::seconds(60), false), true, None).await?;
    uow.commit().await?;
    let history = |id: &str, chat: &str, at: OffsetDateTime, from_me: bool| HistoryMessage {
        message: ReceivedMessage {
            message_id: id.into(),
            chat: chat.into(),
            sender: chat.into(),
            push_name: None,
            text: Some(format!("old {id}")),
            from_me,
            timestamp: at,
            media: None,
            chat_alt: None,
            context: Default::default(),
            // WhatsApp's record of the message, kept with it.
            raw: Some(RawMessage::new(serde_json::json!({"key": {"id": id}, "message": {"conversation": "old"}}))),
        },
        status: from_me.then(|| "read".to_owned()),
    };
    let piece = HistoryPiece {
        sync_type: "initial_bootstrap".into(),
        progress: Some(50),
        chats: vec![
            HistoryChat { jid: ann.into(), alt: None, name: Some("Ann".into()), unread_count: Some(3) },
            HistoryChat {
                jid: "120363000000000001@g.us".into(),
                alt: None,
                name: Some("Quiet group".into()),
                unread_count: None,
            },
        ],
        messages: vec![
            history("h1", ann, t, false),
            // An answer to h1 that was forwarded before, mentioning Bob.
            HistoryMessage {
                message: ReceivedMessage {
                    context: anna_domain::session::MessageContext {
                        reply_to: Some("h1".into()),
                        reply_to_participant: Some(ann.into()),
                        mentions: vec![bob.into()],
                        forwarding_score: Some(2),
                    },
                    ..history("h2", ann, t + Duration::seconds(1), true).message
                },
                status: Some("read".into()),
            },
            history("h3", bob, t + Duration::seconds(2), false),
            history("h3", bob, t + Duration::seconds(2), false),
        ],
        contacts: vec![
            HistoryContact { jid: bob.into(), push_name: Some("Bob".into()), name: None },
            HistoryContact { jid: ann.into(), push_name: Some("Annie".into()), name: Some("Ann Smith".into()) },
        ],
        // Ann reacted to the account's message.
        reactions: vec![MessageChange {
            chat: ann.into(),
            message_id: "h2".into(),
            actor: ann.into(),
            from_me: false,
            at: t + Duration::seconds(5),
            kind: ChangeKind::Reaction { emoji: Some("❤️".into()) },
        }],
    };
    let mut uow = store.begin().await?;
    assert_eq!(uow.record_history(tenant, session.id, &piece).await?, Some(3), "a message given twice is stored once");
    uow.commit().await?;
    // Sent again (a resent chunk): nothing new, nothing doubled.
    let mut uow = store.begin().await?;
    assert_eq!(uow.record_history(tenant, session.id, &piece).await?, Some(0));
    // A session that no longer exists gets nothing.
    let (gone, _) = Session::create(Uuid::new_v4(), tenant, t);
    assert_eq!(uow.record_history(tenant, gone.id, &piece).await?, None);
    uow.commit().await?;

    let chats = store.list_chats(session.id).await?;
    let summary: Vec<(&str, Option<&str>, Option<&str>, u64)> = chats
        .iter()
        .map(|c| (c.chat_jid.as_str(), c.chat_name.as_deref(), c.last_message_id.as_deref(), c.unread_count))
        .collect();
    assert_eq!(
        summary,
        vec![
            (ann, Some("Ann"), Some("live"), 3),
            (bob, None, Some("h3"), 0),
            ("120363000000000001@g.us", Some("Quiet group"), None, 0),
        ],
        "the phone's unread counts; the last message only moves forward"
    );
    let page = store.list_messages(session.id, ann, None, 10, false).await?;
    assert_eq!(page.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), vec!["live", "h2", "h1"]);
    assert!(page.iter().all(|m| m.raw.is_none()), "the raw message is read only when asked for");
    let with_raw = store.list_messages(session.id, ann, None, 10, true).await?;
    assert_eq!(with_raw[0].raw, None, "none was kept for the live message");
    assert_eq!(with_raw[2].raw, Some(serde_json::json!({"key": {"id": "h1"}, "message": {"conversation": "old"}})));
    let answer = &page[1].context;
    assert_eq!((answer.reply_to.as_deref(), answer.reply_to_participant.as_deref()), (Some("h1"), Some(ann)));
    assert_eq!((answer.mentions.clone(), answer.forwarding_score), (vec![bob.to_owned()], Some(2)));
    assert_eq!(page[2].context, anna_domain::session::MessageContext::default());
    let reactions = store.list_reactions(session.id, &["h2".to_owned()]).await?;
    assert_eq!(
        reactions,
        vec![ReactionSummary { message_id: "h2".into(), emoji: "❤️".into(), actors: vec![ann.to_owned()] }],
        "the history's reactions, once though the piece came twice"
    );
    assert_eq!(
        (page[1].from_me, page[1].status.as_deref(), page[1].status_at),
        (true, Some("read"), Some(t + Duration::seconds(1)))
    );
    assert_eq!((page[2].sender_jid.as_deref(), page[2].text.as_deref()), (Some(ann), Some("old h1")));
    assert_eq!(page[2].timestamp, t);

    let contacts = store.list_contacts(session.id).await?;
    let names: Vec<[Option<&str>; 4]> = contacts
        .iter()
        .map(|c| [Some(c.contact_jid.as_str()), c.name.as_deref(), c.notify.as_deref(), c.phone_number.as_deref()])
        .collect();
    assert_eq!(
        names,
        vec![
            [Some(ann), Some("Ann Smith"), Some("Annie"), Some("+491111")],
            [Some(bob), None, Some("Bob"), Some("+492222")]
        ]
    );
    let mut uow = store.begin().await?;
    uow.delete_message_history(session.id).await?;
    uow.commit().await?;
    assert!(store.list_contacts(session.id).await?.is_empty());
    Ok(())
}

async fn messages_expire_by_their_tenants_retention(store: Arc<dyn Store>) -> TestResult {
    let t = now();
    let (short, keeper) = (insert_user(&store, "m4@example.com").await?, insert_user(&store, "m5@example.com").await?);
    let (brief, _) = Session::create(Uuid::new_v4(), short, t);
    let (kept, _) = Session::create(Uuid::new_v4(), keeper, t);
    let chat = "491111@s.whatsapp.net";
    let mut uow = store.begin().await?;
    for session in [&brief, &kept] {
        uow.insert_session(session).await?;
        for n in 0..5 {
            let old = message(session, chat, &format!("old{n}"), t - Duration::days(3) + Duration::seconds(n), false);
            uow.record_message(&old, true, None).await?;
        }
        uow.record_message_change(
            session.tenant_id,
            session.id,
            &change(chat, "old0", chat, t - Duration::days(3), ChangeKind::Reaction { emoji: Some("👍".into()) }),
        )
        .await?;
        uow.record_message(&message(session, "492222@s.whatsapp.net", "new", t, false), true, None).await?;
    }
    uow.set_message_retention(short, Some(2)).await?;
    uow.commit().await?;
    assert_eq!(store.message_retention(short).await?, Some(2));
    assert_eq!(store.message_retention(keeper).await?, None);

    // No default: only the tenant that chose a retention has expiring sessions.
    assert_eq!(store.sessions_with_retention(0).await?, vec![(brief.id, 2)]);
    let mut both = store.sessions_with_retention(30).await?;
    both.sort();
    let mut expected = vec![(brief.id, 2), (kept.id, 30)];
    expected.sort();
    assert_eq!(both, expected, "the operator's default for the others");

    // In batches, oldest first; the chat emptied by it and its reactions go with the last one.
    let cutoff = t - Duration::days(2);
    assert_eq!(store.purge_messages(brief.id, cutoff, 2).await?, 2);
    let left = store.list_messages(brief.id, chat, None, 10, false).await?;
    assert_eq!(left.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), vec!["old4", "old3", "old2"]);
    assert_eq!(store.purge_messages(brief.id, cutoff, 2).await?, 2);
    assert_eq!(store.purge_messages(brief.id, cutoff, 2).await?, 1);
    assert!(store.list_messages(brief.id, chat, None, 10, false).await?.is_empty());
    let chats: Vec<String> = store.list_chats(brief.id).await?.into_iter().map(|c| c.chat_jid).collect();
    assert_eq!(chats, vec!["492222@s.whatsapp.net".to_owned()], "the newer chat stays");
    assert!(store.list_reactions(brief.id, &["old0".into()]).await?.is_empty());
    assert_eq!(store.list_messages(kept.id, chat, None, 10, false).await?.len(), 5, "another tenant's are not touched");

    let mut uow = store.begin().await?;
    uow.set_message_retention(short, None).await?;
    uow.commit().await?;
    assert_eq!(store.message_retention(short).await?, None);
    Ok(())
}

async fn contacts_seen_in_messages_are_kept(store: Arc<dyn Store>) -> TestResult {
    use anna_store::ContactSighting;
    let tenant = insert_user(&store, "contacts@example.com").await?;
    let (session, _) = Session::create(Uuid::new_v4(), tenant, now());
    let mut uow = store.begin().await?;
    uow.insert_session(&session).await?;
    uow.commit().await?;
    let seen = |jid: &str, lid: Option<&str>, name: Option<&str>, notify: Option<&str>| ContactSighting {
        jid: jid.into(),
        lid: lid.map(str::to_owned),
        name: name.map(str::to_owned),
        notify: notify.map(str::to_owned),
    };
    let mut uow = store.begin().await?;
    uow.record_contacts(
        tenant,
        session.id,
        &mut [seen("15550001111@s.whatsapp.net", None, Some("Ann (work)"), Some("Ann"))],
    )
    .await?;
    // Seen again in a message: a new push name and the LID; the address-book name stays.
    uow.record_contacts(
        tenant,
        session.id,
        &mut [
            seen("15550002222@s.whatsapp.net", None, None, Some("Bob")),
            seen("15550001111@s.whatsapp.net", Some("2001@lid"), None, Some("Annie")),
        ],
    )
    .await?;
    uow.commit().await?;
    let contacts = store.list_contacts(session.id).await?;
    let ann = contacts
        .iter()
        .find(|c| c.contact_jid == "15550001111@s.whatsapp.net")
        .ok_or(StoreError::Corrupt("no Ann".into()))?;
    assert_eq!((ann.name.as_deref(), ann.notify.as_deref()), (Some("Ann (work)"), Some("Annie")));
    assert_eq!((ann.contact_lid.as_deref(), ann.phone_number.as_deref()), (Some("2001@lid"), Some("+15550001111")));
    assert_eq!(contacts.len(), 2);
    // Found by JID or by LID (mention names), in this session only.
    let found =
        store.find_contacts(session.id, &["2001@lid".to_owned(), "15550002222@s.whatsapp.net".to_owned()]).await?;
    let mut jids: Vec<&str> = found.iter().map(|c| c.contact_jid.as_str()).collect();
    jids.sort_unstable();
    assert_eq!(jids, ["15550001111@s.whatsapp.net", "15550002222@s.whatsapp.net"]);
    assert!(store.find_contacts(Uuid::new_v4(), &["2001@lid".to_owned()]).await?.is_empty());

    // A session deleted meanwhile gets nothing (no error: a late event).
    let (gone, _) = Session::create(Uuid::new_v4(), tenant, now());
    let mut uow = store.begin().await?;
    uow.record_contacts(tenant, gone.id, &mut [seen("15550003333@s.whatsapp.net", None, None, Some("C"))]).await?;
    uow.commit().await?;
    assert!(store.list_contacts(gone.id).await?.is_empty());
    Ok(())
}

async fn replies_mentions_and_forwards_are_kept(store: Arc<dyn Store>) -> TestResult {
    use anna_domain::session::MessageContext;
    let tenant = insert_user(&store, "context@example.com").await?;
    let (session, _) = Session::create(Uuid::new_v4(), tenant, now());
    let mut uow = store.begin().await?;
    uow.insert_session(&session).await?;
    uow.commit().await?;
    let group = "120363000000000001@g.us";
    let mut answer = message(&session, group, "A1", now(), false);
    answer.context = MessageContext {
        reply_to: Some("Q1".into()),
        reply_to_participant: Some("15550001111@s.whatsapp.net".into()),
        mentions: vec!["15550002222@s.whatsapp.net".into(), "2001@lid".into()],
        forwarding_score: Some(3),
    };
    let plain = message(&session, group, "P1", now(), true);
    let mut uow = store.begin().await?;
    assert!(uow.insert_message(&answer).await?);
    assert!(uow.insert_message(&plain).await?);
    uow.commit().await?;
    let page = store.list_messages(session.id, group, None, 10, false).await?;
    let stored = page.iter().find(|m| m.message_id == "A1").ok_or(StoreError::Corrupt("no A1".into()))?;
    assert_eq!(stored.context, answer.context);
    let plain_stored = page.iter().find(|m| m.message_id == "P1").ok_or(StoreError::Corrupt("no P1".into()))?;
    assert_eq!(plain_stored.context, MessageContext::default());
    // Found by id in the session, whichever its chat (the source of a forward); not elsewhere.
    assert_eq!(store.find_message_in_session(session.id, "A1").await?.map(|m| m.chat_jid), Some(group.to_owned()));
    assert_eq!(store.find_message_in_session(session.id, "nope").await?, None);
    assert_eq!(store.find_message_in_session(Uuid::new_v4(), "A1").await?, None);
    Ok(())
}

async fn a_read_on_the_phone_leaves_later_messages_unread(store: Arc<dyn Store>) -> TestResult {
    let tenant = insert_user(&store, "phone-read@example.com").await?;
    let t = now();
    let (session, _) = Session::create(Uuid::new_v4(), tenant, t);
    let (phone, lid) = ("15550100123@s.whatsapp.net", "200015550100123@lid");
    let mut uow = store.begin().await?;
    uow.insert_session(&session).await?;
    // One chat under two addresses: messages under its LID and under its phone JID.
    uow.record_message(&message(&session, lid, "l1", t, false), true, None).await?;
    uow.record_message(&message(&session, lid, "l2", t + Duration::seconds(10), false), true, None).await?;
    uow.record_message(&message(&session, lid, "own", t + Duration::seconds(11), true), false, None).await?;
    uow.record_message(&message(&session, phone, "p1", t + Duration::seconds(5), false), true, None).await?;
    uow.link_chat_aliases(tenant, session.id, &[(phone.to_owned(), lid.to_owned())]).await?;
    uow.commit().await?;
    let unread = |chats: Vec<anna_store::ChatSummary>| -> Vec<(String, u64)> {
        let mut unread: Vec<(String, u64)> = chats.into_iter().map(|c| (c.chat_jid, c.unread_count)).collect();
        unread.sort();
        unread
    };
    assert_eq!(unread(store.list_chats(session.id).await?), vec![(phone.to_owned(), 1), (lid.to_owned(), 2)]);

    // Read on the phone at 7 s, named by the phone JID: under both addresses, what came later
    // (l2; the account's own message does not count) stays unread.
    let mut uow = store.begin().await?;
    assert!(uow.mark_chat_read_on_phone(session.id, phone, t + Duration::seconds(7)).await?);
    uow.commit().await?;
    assert_eq!(unread(store.list_chats(session.id).await?), vec![(phone.to_owned(), 0), (lid.to_owned(), 1)]);
    // An older read arriving late changes nothing: a read never makes messages unread again.
    let mut uow = store.begin().await?;
    uow.mark_chat_read_on_phone(session.id, lid, t - Duration::seconds(100)).await?;
    uow.commit().await?;
    assert_eq!(unread(store.list_chats(session.id).await?), vec![(phone.to_owned(), 0), (lid.to_owned(), 1)]);
    let mut uow = store.begin().await?;
    uow.mark_chat_read_on_phone(session.id, lid, t + Duration::seconds(20)).await?;
    assert!(!uow.mark_chat_read_on_phone(session.id, "49000@s.whatsapp.net", t).await?, "no such chat");
    uow.commit().await?;
    assert_eq!(unread(store.list_chats(session.id).await?), vec![(phone.to_owned(), 0), (lid.to_owned(), 0)]);
    Ok(())
}
