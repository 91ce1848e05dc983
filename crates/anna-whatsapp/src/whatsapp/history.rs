//! A history sync as anna's [`HistoryPiece`]s. The library hands over each chunk of the
//! phone's history compressed; it is read one conversation at a time on a blocking thread and
//! handed on in pieces of at most [`HISTORY_PIECE_MESSAGES`] messages through a bounded
//! channel, so a phone with a large history never sits in memory whole.

use tokio::sync::mpsc;
use whatsapp_rust::types::events::LazyHistorySync;
use whatsapp_rust::wacore::proto_helpers::MessageExt;
use whatsapp_rust::waproto::whatsapp as wa;
use whatsapp_rust::waproto::whatsapp::web_message_info::Status;

use crate::{
    ChangeKind, HISTORY_PIECE_MESSAGES, HistoryChat, HistoryContact, HistoryMessage, HistoryPiece, IncomingMessage,
    Jid, MessageChange,
};

/// Pieces waiting for the worker, per history chunk.
const PIECES_IN_FLIGHT: usize = 2;

/// Reads `chunk` on a blocking thread; its pieces arrive on the returned channel, in order.
pub(crate) fn pieces(chunk: &LazyHistorySync) -> mpsc::Receiver<HistoryPiece> {
    let (tx, rx) = mpsc::channel(PIECES_IN_FLIGHT);
    let chunk = chunk.clone();
    tokio::task::spawn_blocking(move || read(&chunk, &tx));
    rx
}

fn read(chunk: &LazyHistorySync, tx: &mpsc::Sender<HistoryPiece>) {
    let fresh = || HistoryPiece {
        sync_type: sync_type_name(chunk.sync_type()),
        progress: chunk.progress(),
        ..HistoryPiece::default()
    };
    let mut piece = fresh();
    let mut stream = chunk.stream();
    loop {
        match stream.next_conversation() {
            Ok(Some(conversation)) => {
                add_conversation(&mut piece, &conversation);
                for full in full_pieces(&mut piece, fresh) {
                    if tx.blocking_send(full).is_err() {
                        return;
                    }
                }
            }
            Ok(None) => break,
            Err(error) => {
                tracing::warn!(%error, "a history sync chunk could not be read to its end");
                break;
            }
        }
    }
    match stream.remainder() {
        Ok(rest) => add_push_names(&mut piece, &rest.pushnames),
        Err(error) => tracing::warn!(%error, "the push names of a history sync chunk could not be read"),
    }
    if !piece.is_empty() {
        let _ = tx.blocking_send(piece);
    }
}

/// Takes the full pieces out of `piece` (a long conversation is cut too: no piece holds more
/// than [`HISTORY_PIECE_MESSAGES`] messages); what is left stays in `piece`.
fn full_pieces(piece: &mut HistoryPiece, fresh: impl Fn() -> HistoryPiece) -> Vec<HistoryPiece> {
    let mut full = Vec::new();
    while piece.messages.len() >= HISTORY_PIECE_MESSAGES {
        let rest = piece.messages.split_off(HISTORY_PIECE_MESSAGES);
        // The chats and contacts go with the first piece.
        let taken = std::mem::replace(piece, fresh());
        piece.messages = rest;
        full.push(taken);
    }
    full
}

/// WhatsApp's kinds of history sync, as the predecessor named them in its events.
fn sync_type_name(kind: i32) -> String {
    match kind {
        0 => "initial_bootstrap",
        1 => "initial_status_v3",
        2 => "full",
        3 => "recent",
        4 => "push_name",
        5 => "non_blocking_data",
        6 => "on_demand",
        _ => "unknown",
    }
    .into()
}

/// A JID as anna writes it (no device part), or as given when anna has no form for it.
fn normalized(raw: &str) -> String {
    Jid::parse(raw).map_or_else(|_| raw.to_owned(), |jid| jid.to_string())
}

/// Adds a conversation: the chat, and its messages that have content anna keeps (text or a
/// caption, or media without one). Reactions, edits and protocol messages of the history are
/// left out: the phone's history already shows their effect.
fn add_conversation(piece: &mut HistoryPiece, conversation: &wa::Conversation) {
    let chat = normalized(&conversation.id);
    let name = conversation.name.clone().or_else(|| conversation.display_name.clone()).filter(|n| !n.is_empty());
    // The other address of a one-to-one chat: its phone JID when it is kept by LID, its LID
    // when kept by phone.
    let alt = if chat.ends_with("@lid") { conversation.pn_jid.as_deref() } else { conversation.lid_jid.as_deref() };
    let alt = alt.filter(|alt| !alt.is_empty()).map(normalized).filter(|alt| *alt != chat && !chat.ends_with("@g.us"));
    piece.chats.push(HistoryChat { jid: chat.clone(), alt, name, unread_count: conversation.unread_count });
    let mut reactions = Vec::new();
    for history in &conversation.messages {
        let Some(info) = history.message.as_option() else { continue };
        if let Some(message) = history_message(&chat, info) {
            piece.messages.push(message);
        }
        reactions.extend(history_reactions(&chat, info));
    }
    piece.reactions.extend(latest_reactions(reactions));
}

/// Each actor's latest reaction to each message: the phone may tell one reaction twice (in its
/// message's `reactions` and as a reaction message), and it counts once.
fn latest_reactions(mut reactions: Vec<MessageChange>) -> Vec<MessageChange> {
    reactions.sort_by(|a, b| (&a.message_id, &a.actor).cmp(&(&b.message_id, &b.actor)).then_with(|| b.at.cmp(&a.at)));
    reactions.dedup_by(|later, kept| later.message_id == kept.message_id && later.actor == kept.actor);
    reactions
}

/// The reactions a message of the history carries (its `reactions`), or the one it is (a
/// reaction message). An own reaction is kept only when it names its actor (the account's JID
/// is not in the history), so it never counts twice.
fn history_reactions(chat: &str, info: &wa::WebMessageInfo) -> Vec<MessageChange> {
    let at_ms = |ms: Option<i64>| {
        ms.and_then(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok())
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    let actor_of = |key: &wa::MessageKey| -> Option<(String, bool)> {
        let from_me = key.from_me.unwrap_or(false);
        let actor = key.participant.as_deref().filter(|p| !p.is_empty()).map(normalized);
        match (actor, from_me) {
            (Some(actor), _) => Some((actor, from_me)),
            (None, false) if !chat.ends_with("@g.us") => Some((chat.to_owned(), false)),
            _ => None,
        }
    };
    let mut changes = Vec::new();
    let target = info.key.as_option().and_then(|key| key.id.clone()).filter(|id| !id.is_empty());
    if let Some(target) = target.as_ref() {
        for reaction in &info.reactions {
            let Some((actor, from_me)) = reaction.key.as_option().and_then(actor_of) else { continue };
            changes.push(MessageChange {
                chat: chat.to_owned(),
                message_id: target.clone(),
                actor,
                from_me,
                at: at_ms(reaction.sender_timestamp_ms),
                kind: ChangeKind::Reaction { emoji: reaction.text.clone().filter(|emoji| !emoji.is_empty()) },
            });
        }
    }
    let reaction_message = info.message.as_option().and_then(|m| m.get_base_message().reaction_message.as_option());
    if let (Some(reaction), Some(key)) = (reaction_message, info.key.as_option())
        && let Some(target) = reaction.key.as_option().and_then(|k| k.id.clone()).filter(|id| !id.is_empty())
        && let Some((actor, from_me)) = actor_of(key)
    {
        changes.push(MessageChange {
            chat: chat.to_owned(),
            message_id: target,
            actor,
            from_me,
            at: at_ms(reaction.sender_timestamp_ms),
            kind: ChangeKind::Reaction { emoji: reaction.text.clone().filter(|emoji| !emoji.is_empty()) },
        });
    }
    changes
}

fn history_message(chat: &str, info: &wa::WebMessageInfo) -> Option<HistoryMessage> {
    let key = info.key.as_option()?;
    let message_id = key.id.clone().filter(|id| !id.is_empty())?;
    let content = info.message.as_option()?;
    let base = content.get_base_message();
    if base.reaction_message.is_set() || base.protocol_message.is_set() {
        return None;
    }
    let from_me = key.from_me.unwrap_or(false);
    let sender = key
        .participant
        .as_deref()
        .or(info.participant.as_deref())
        .filter(|participant| !participant.is_empty())
        .map_or_else(|| chat.to_owned(), normalized);
    let seconds = i64::try_from(info.message_timestamp.unwrap_or(0)).unwrap_or(0);
    let status = match info.status {
        _ if !from_me => None,
        Some(Status::PLAYED) => Some("played"),
        Some(Status::READ) => Some("read"),
        Some(Status::DELIVERY_ACK) => Some("delivered"),
        Some(Status::SERVER_ACK) => Some("server_ack"),
        _ => Some("sent"),
    };
    Some(HistoryMessage {
        message: IncomingMessage {
            message_id,
            chat: chat.to_owned(),
            sender,
            push_name: info.push_name.clone().filter(|name| !name.is_empty()),
            text: content.text_content().or_else(|| content.get_caption()).map(str::to_owned),
            from_me,
            timestamp: time::OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            media: None,
            chat_alt: None,
            context: super::media::context_of(content),
            raw: super::raw::of(info),
        },
        status: status.map(str::to_owned),
    })
}

fn add_push_names(piece: &mut HistoryPiece, names: &[wa::Pushname]) {
    for entry in names {
        let (Some(id), Some(name)) = (entry.id.as_deref(), entry.pushname.as_deref()) else { continue };
        if !id.is_empty() && !name.is_empty() {
            piece.contacts.push(HistoryContact { jid: normalized(id), push_name: Some(name.to_owned()), name: None });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use whatsapp_rust::buffa;
    use whatsapp_rust::wacore::proto_helpers::MessageBuilderExt;

    use super::*;

    fn info(id: &str, from_me: bool, message: wa::Message, status: Option<Status>) -> wa::HistorySyncMsg {
        wa::HistorySyncMsg {
            message: buffa::MessageField::some(wa::WebMessageInfo {
                key: buffa::MessageField::some(wa::MessageKey {
                    id: Some(id.into()),
                    from_me: Some(from_me),
                    remote_jid: Some("15551234567@s.whatsapp.net".into()),
                    ..Default::default()
                }),
                message: buffa::MessageField::some(message),
                message_timestamp: Some(1_790_000_000),
                status,
                push_name: (!from_me).then(|| "Ada".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn conversations_become_chats_and_messages() {
        let reaction = wa::Message {
            reaction_message: buffa::MessageField::some(wa::message::ReactionMessage {
                key: buffa::MessageField::some(wa::MessageKey { id: Some("A2".into()), ..Default::default() }),
                text: Some("👍".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let conversation = wa::Conversation {
            id: "15551234567@s.whatsapp.net".into(),
            name: Some("Ada Lovelace".into()),
            unread_count: Some(2),
            messages: vec![
                info("A1", false, wa::Message::text("hello"), None),
                // The phone tells Ada's reaction twice: with A2, and as a message of its own.
                {
                    let mut mine = info("A2", true, wa::Message::text("hi"), Some(Status::READ));
                    if let Some(message) = mine.message.as_option_mut() {
                        message.reactions.push(wa::Reaction {
                            key: buffa::MessageField::some(wa::MessageKey {
                                id: Some("A3".into()),
                                from_me: Some(false),
                                ..Default::default()
                            }),
                            text: Some("👍".into()),
                            sender_timestamp_ms: Some(1_790_000_000_000),
                            ..Default::default()
                        });
                    }
                    mine
                },
                info("A3", false, reaction, None),
            ],
            ..Default::default()
        };
        let mut piece = HistoryPiece::default();
        add_conversation(&mut piece, &conversation);
        add_push_names(
            &mut piece,
            &[wa::Pushname { id: Some("15551234567@s.whatsapp.net".into()), pushname: Some("Ada".into()) }],
        );
        assert_eq!(
            piece.chats,
            vec![HistoryChat {
                jid: "15551234567@s.whatsapp.net".into(),
                alt: None,
                name: Some("Ada Lovelace".into()),
                unread_count: Some(2)
            }]
        );
        assert_eq!(piece.messages.len(), 2, "the reaction is not a message");
        assert_eq!(piece.reactions.len(), 1, "but a reaction to A2, once: {:?}", piece.reactions);
        let reaction = &piece.reactions[0];
        assert_eq!((reaction.message_id.as_str(), reaction.actor.as_str()), ("A2", "15551234567@s.whatsapp.net"));
        assert_eq!(reaction.kind, ChangeKind::Reaction { emoji: Some("👍".into()) });
        let (theirs, mine) = (&piece.messages[0], &piece.messages[1]);
        assert_eq!((theirs.message.text.as_deref(), theirs.status.as_deref()), (Some("hello"), None));
        assert_eq!(theirs.message.sender, "15551234567@s.whatsapp.net");
        assert_eq!(theirs.message.push_name.as_deref(), Some("Ada"));
        let raw = theirs.message.raw.as_ref().expect("the raw message").as_json();
        assert_eq!(raw["key"]["id"], "A1");
        assert_eq!(raw["message"]["conversation"], "hello");
        assert_eq!(raw["pushName"], "Ada");
        assert_eq!((mine.message.from_me, mine.status.as_deref()), (true, Some("read")));
        assert_eq!(mine.message.timestamp.unix_timestamp(), 1_790_000_000);
        assert_eq!(piece.contacts[0].push_name.as_deref(), Some("Ada"));
        assert_eq!(sync_type_name(0), "initial_bootstrap");
    }

    #[test]
    fn a_long_conversation_is_cut_into_bounded_pieces() {
        let conversation = wa::Conversation {
            id: "15551234567@s.whatsapp.net".into(),
            messages: (0..1234).map(|n| info(&format!("M{n}"), n % 2 == 0, wa::Message::text("x"), None)).collect(),
            ..Default::default()
        };
        let mut piece = HistoryPiece::default();
        add_conversation(&mut piece, &conversation);
        let full = full_pieces(&mut piece, HistoryPiece::default);
        let sizes: Vec<usize> = full.iter().map(|p| p.messages.len()).collect();
        assert_eq!(sizes, vec![HISTORY_PIECE_MESSAGES, HISTORY_PIECE_MESSAGES]);
        assert_eq!(piece.messages.len(), 1234 - 2 * HISTORY_PIECE_MESSAGES);
        assert_eq!(full[0].chats.len(), 1, "the chat goes with the first piece");
        assert!(full[1].chats.is_empty() && piece.chats.is_empty());
        assert_eq!(full[1].messages[0].message.message_id, format!("M{HISTORY_PIECE_MESSAGES}"));
    }
}
