//! whatsapp-rust events as anna's [`DriverEvent`]s. A pure function of the event, so the
//! mapping is tested without a connection.

use std::time::Duration;

use time::OffsetDateTime;
use whatsapp_rust::types::events::{ConnectFailureReason, Event};
use whatsapp_rust::types::presence::{ChatPresence, ChatPresenceMedia, ReceiptType};
use whatsapp_rust::wacore::proto_helpers::MessageExt;

use super::convert::to_offset;
use crate::{
    ChangeKind, CloseReason, DriverEvent, IncomingMessage, MessageChange, Presence, PresenceChange, ReceiptStatus,
};

/// What the translation needs besides the event.
pub(crate) struct Context {
    /// The longest validity anna advertises for a QR code.
    pub qr_ttl: Duration,
    /// The account's JID, for `Connected` (the event itself carries none).
    pub own_phone: Option<String>,
}

/// The anna events for one library event, in order; empty for events anna ignores. A
/// [`DriverEvent::Closed`] is always last.
pub(crate) fn translate(event: &Event, context: &Context) -> Vec<DriverEvent> {
    match event {
        Event::PairingQrCode(qr) => {
            vec![DriverEvent::Qr { code: qr.code.clone(), ttl: qr.timeout.min(context.qr_ttl) }]
        }
        Event::PairingCode(code) => vec![DriverEvent::PairCode { code: code.code.clone(), ttl: code.timeout }],
        Event::PairSuccess(success) => vec![DriverEvent::Paired { phone: success.id.to_string() }],
        Event::Connected(_) => vec![DriverEvent::Connected { phone: context.own_phone.clone().unwrap_or_default() }],
        // Unexpected drops only; the library reconnects by itself with backoff.
        Event::Disconnected(disconnected) => vec![DriverEvent::Disconnected {
            reason: CloseReason::Transient(disconnected.reason.to_string()),
            will_retry: true,
        }],
        Event::LoggedOut(logged_out) => {
            vec![closed(CloseReason::LoggedOut(failure_detail(logged_out.reason)))]
        }
        Event::StreamReplaced(_) => vec![closed(CloseReason::Replaced)],
        Event::TemporaryBan(ban) => {
            let seconds = ban.expire.num_seconds();
            vec![closed(CloseReason::Banned(format!("{} (expires in {seconds} s)", ban.code)))]
        }
        Event::ClientOutdated(_) => vec![closed(CloseReason::ClientOutdated)],
        Event::ConnectFailure(failure) => {
            let reason = failure.reason;
            if reason.should_reconnect() {
                vec![DriverEvent::Disconnected {
                    reason: CloseReason::Transient(connect_failure_detail(reason, failure.message.as_deref())),
                    will_retry: true,
                }]
            } else if reason.is_logged_out() {
                vec![closed(CloseReason::LoggedOut(failure_detail(reason)))]
            } else {
                vec![closed(match reason {
                    ConnectFailureReason::TempBanned => CloseReason::Banned(String::new()),
                    ConnectFailureReason::ClientOutdated => CloseReason::ClientOutdated,
                    other => CloseReason::Transient(connect_failure_detail(other, failure.message.as_deref())),
                })]
            }
        }
        // With a pair-code flow running the client keeps going: only a disconnect ends it.
        Event::PairingQrCodesExhausted(exhausted) if exhausted.disconnected => vec![closed(CloseReason::QrTimeout)],
        Event::Messages(batch) => {
            batch.iter().filter_map(|inbound| incoming(&inbound.message, &inbound.info)).collect()
        }
        Event::Receipt(receipt) => {
            // Receipts from our own devices say nothing about the recipient.
            if receipt.source.is_from_me {
                return Vec::new();
            }
            let status = match receipt.r#type {
                ReceiptType::Delivered => ReceiptStatus::Delivered,
                ReceiptType::Read | ReceiptType::Played => ReceiptStatus::Read,
                _ => return Vec::new(),
            };
            let chat = receipt.source.chat.to_non_ad().to_string();
            let at = to_offset(&receipt.timestamp);
            receipt
                .message_ids
                .iter()
                .map(|id| DriverEvent::Receipt { message_id: id.to_string(), chat: chat.clone(), status, at })
                .collect()
        }
        // Reads of a full app-state sync are the past (a reconnect replays them): only live ones.
        Event::MarkChatAsReadUpdate(update) if update.action.read == Some(true) && !update.from_full_sync => {
            vec![DriverEvent::ChatRead { chat: update.jid.to_non_ad().to_string(), at: to_offset(&update.timestamp) }]
        }
        Event::Presence(update) => {
            let contact = update.from.to_non_ad().to_string();
            vec![DriverEvent::Presence(PresenceChange {
                chat: contact.clone(),
                jid: contact,
                presence: if update.unavailable { Presence::Unavailable } else { Presence::Available },
                last_seen: update.last_seen.as_ref().map(to_offset),
            })]
        }
        Event::ChatPresence(update) => {
            let presence = match (update.state, update.media) {
                (ChatPresence::Composing, ChatPresenceMedia::Audio) => Presence::Recording,
                (ChatPresence::Composing, _) => Presence::Composing,
                (ChatPresence::Paused, _) => Presence::Paused,
            };
            vec![DriverEvent::Presence(PresenceChange {
                chat: update.source.chat.to_non_ad().to_string(),
                jid: update.source.sender.to_non_ad().to_string(),
                presence,
                last_seen: None,
            })]
        }
        Event::ServerAck(ack) if ack.class.as_deref() == Some("message") => match &ack.error {
            Some(error) => vec![DriverEvent::SendRejected { message_id: ack.id.clone(), error: error.clone() }],
            None => vec![DriverEvent::Receipt {
                message_id: ack.id.clone(),
                chat: ack.from.as_ref().map(|from| from.to_non_ad().to_string()).unwrap_or_default(),
                status: ReceiptStatus::ServerAck,
                at: ack.timestamp.as_ref().map_or_else(OffsetDateTime::now_utc, to_offset),
            }],
        },
        _ => Vec::new(),
    }
}

fn closed(reason: CloseReason) -> DriverEvent {
    DriverEvent::Closed { reason }
}

/// A message as anna sees it: an ordinary one, or a change to an earlier one (reactions, edits
/// and deletions travel as messages). Protocol messages of other kinds (key shares, history
/// notifications, app-state keys) are no messages of the chat: `None`.
fn incoming(
    message: &whatsapp_rust::waproto::whatsapp::Message,
    info: &whatsapp_rust::types::message::MessageInfo,
) -> Option<DriverEvent> {
    use whatsapp_rust::waproto::whatsapp::message::protocol_message::Type as ProtocolType;

    let base = message.get_base_message();
    let chat = info.source.chat.to_non_ad().to_string();
    let sender = info.source.sender.to_non_ad().to_string();
    let from_me = info.source.is_from_me;
    let at = to_offset(&info.timestamp);
    let change = |message_id: String, kind| {
        DriverEvent::Changed(MessageChange { chat: chat.clone(), message_id, actor: sender.clone(), from_me, at, kind })
    };
    if let Some(reaction) = base.reaction_message.as_option() {
        let target = reaction.key.as_option().and_then(|key| key.id.clone())?;
        let emoji = reaction.text.clone().filter(|emoji| !emoji.is_empty());
        return Some(change(target, ChangeKind::Reaction { emoji }));
    }
    if let Some(protocol) = base.protocol_message.as_option() {
        let target = protocol.key.as_option().and_then(|key| key.id.clone())?;
        return match protocol.r#type {
            Some(ProtocolType::MessageEdit) => {
                let text = protocol
                    .edited_message
                    .as_option()
                    .and_then(|edited| edited.text_content().or_else(|| edited.get_caption()))
                    .map(str::to_owned);
                Some(change(target, ChangeKind::Edited { text }))
            }
            Some(ProtocolType::Revoke) => Some(change(target, ChangeKind::Revoked)),
            _ => None,
        };
    }
    // A one-to-one chat's other address: the sender's (or, for the account's own messages, the
    // recipient's) phone JID or LID, whichever the chat is not addressed by.
    let alt = if from_me { info.source.recipient_alt.as_ref() } else { info.source.sender_alt.as_ref() };
    let chat_alt =
        alt.filter(|_| !info.source.is_group).map(|alt| alt.to_non_ad().to_string()).filter(|alt| *alt != chat);
    let participant = info.source.is_group.then_some(sender.as_str());
    let raw =
        super::raw::live(message, &chat, &info.id, from_me, participant, at.unix_timestamp(), Some(&info.push_name));
    Some(DriverEvent::Message(Box::new(IncomingMessage {
        message_id: info.id.to_string(),
        chat: chat.clone(),
        sender: sender.clone(),
        push_name: Some(info.push_name.clone()).filter(|name| !name.is_empty()),
        text: message.text_content().or_else(|| message.get_caption()).map(str::to_owned),
        from_me,
        timestamp: at,
        media: super::media::incoming_media(message),
        chat_alt,
        context: super::media::context_of(message),
        raw,
    })))
}

/// The detail of a logout reason; empty for the plain "unlinked" case.
fn failure_detail(reason: ConnectFailureReason) -> String {
    match reason {
        ConnectFailureReason::LoggedOut => String::new(),
        ConnectFailureReason::AccountLocked => "account_locked".into(),
        ConnectFailureReason::UnknownLogout => "unknown_logout".into(),
        other => format!("{other:?}"),
    }
}

fn connect_failure_detail(reason: ConnectFailureReason, message: Option<&str>) -> String {
    match message {
        Some(message) if !message.is_empty() => format!("connect failure {reason:?}: {message}"),
        _ => format!("connect failure {reason:?}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use whatsapp_rust::types::events::{
        ConnectFailure, Connected, LoggedOut, PairSuccess, PairingQrCode, PairingQrCodesExhausted, ServerAck,
        StreamReplaced,
    };

    fn context() -> Context {
        Context { qr_ttl: Duration::from_secs(30), own_phone: Some("15551234567:7@s.whatsapp.net".into()) }
    }

    #[test]
    fn a_chat_read_on_the_phone_is_read() {
        use whatsapp_rust::Jid as WaJid;
        use whatsapp_rust::types::events::MarkChatAsReadUpdate;
        use whatsapp_rust::waproto::whatsapp::sync_action_value::MarkChatAsReadAction;
        let update = |read| {
            Event::MarkChatAsReadUpdate(
                MarkChatAsReadUpdate::builder()
                    .jid(WaJid::pn("15550001111"))
                    .timestamp(whatsapp_rust::chrono::Utc::now())
                    .action(Box::new(MarkChatAsReadAction { read: Some(read), ..Default::default() }))
                    .from_full_sync(false)
                    .build(),
            )
        };
        let translated = translate(&update(true), &context());
        assert!(
            matches!(translated.as_slice(), [DriverEvent::ChatRead { chat, .. }] if chat == "15550001111@s.whatsapp.net"),
            "{translated:?}"
        );
        assert!(translate(&update(false), &context()).is_empty(), "marked unread changes nothing");
    }

    #[test]
    fn presence_says_who_is_online_typing_or_recording() {
        use whatsapp_rust::Jid as WaJid;
        use whatsapp_rust::types::events::{ChatPresenceUpdate, PresenceUpdate};
        use whatsapp_rust::types::message::MessageSource;

        let offline =
            Event::Presence(PresenceUpdate::builder().from(WaJid::pn("15550001111")).unavailable(true).build());
        let translated = translate(&offline, &context());
        let [DriverEvent::Presence(change)] = translated.as_slice() else { panic!("no presence") };
        assert_eq!((change.chat.as_str(), change.presence), ("15550001111@s.whatsapp.net", Presence::Unavailable));
        let group = MessageSource {
            chat: WaJid::group("120363000000000001"),
            sender: WaJid::pn("15550002222"),
            is_group: true,
            ..Default::default()
        };
        for (state, media, expected) in [
            (ChatPresence::Composing, ChatPresenceMedia::Text, Presence::Composing),
            (ChatPresence::Composing, ChatPresenceMedia::Audio, Presence::Recording),
            (ChatPresence::Paused, ChatPresenceMedia::Text, Presence::Paused),
        ] {
            let typing = Event::ChatPresence(
                ChatPresenceUpdate::builder().source(group.clone()).state(state).media(media).build(),
            );
            let translated = translate(&typing, &context());
            let [DriverEvent::Presence(change)] = translated.as_slice() else { panic!("no chat presence") };
            assert_eq!(change.chat, "120363000000000001@g.us");
            assert_eq!((change.jid.as_str(), change.presence), ("15550002222@s.whatsapp.net", expected));
        }
    }

    #[test]
    fn qr_codes_use_the_shorter_ttl() {
        let long = Event::PairingQrCode(
            PairingQrCode::builder().code("2@A,B,C,D,9".into()).timeout(Duration::from_secs(60)).build(),
        );
        assert_eq!(
            translate(&long, &context()),
            vec![DriverEvent::Qr { code: "2@A,B,C,D,9".into(), ttl: Duration::from_secs(30) }]
        );
        let short =
            Event::PairingQrCode(PairingQrCode::builder().code("2@E".into()).timeout(Duration::from_secs(20)).build());
        assert_eq!(
            translate(&short, &context()),
            vec![DriverEvent::Qr { code: "2@E".into(), ttl: Duration::from_secs(20) }]
        );
    }

    #[test]
    fn pairing_and_connection() {
        let paired = Event::PairSuccess(
            PairSuccess::builder()
                .id("15551234567:7@s.whatsapp.net".parse().unwrap())
                .lid("100000012345678:7@lid".parse().unwrap())
                .business_name(String::new())
                .platform("android".into())
                .build(),
        );
        assert_eq!(
            translate(&paired, &context()),
            vec![DriverEvent::Paired { phone: "15551234567:7@s.whatsapp.net".into() }]
        );
        let connected = Event::Connected(Connected::builder().build());
        assert_eq!(
            translate(&connected, &context()),
            vec![DriverEvent::Connected { phone: "15551234567:7@s.whatsapp.net".into() }]
        );
    }

    #[test]
    fn terminal_events_close() {
        let logged_out =
            Event::LoggedOut(LoggedOut::builder().on_connect(false).reason(ConnectFailureReason::LoggedOut).build());
        assert_eq!(translate(&logged_out, &context()), vec![closed(CloseReason::LoggedOut(String::new()))]);
        let replaced = Event::StreamReplaced(StreamReplaced::builder().build());
        assert_eq!(translate(&replaced, &context()), vec![closed(CloseReason::Replaced)]);
        let exhausted = Event::PairingQrCodesExhausted(PairingQrCodesExhausted::builder().disconnected(true).build());
        assert_eq!(translate(&exhausted, &context()), vec![closed(CloseReason::QrTimeout)]);
        let still_pairing =
            Event::PairingQrCodesExhausted(PairingQrCodesExhausted::builder().disconnected(false).build());
        assert!(translate(&still_pairing, &context()).is_empty());
    }

    #[test]
    fn connect_failures_close_unless_the_library_retries() {
        let failure = |reason| Event::ConnectFailure(ConnectFailure::builder().reason(reason).build());
        assert!(matches!(
            translate(&failure(ConnectFailureReason::ServiceUnavailable), &context())[..],
            [DriverEvent::Disconnected { will_retry: true, .. }]
        ));
        assert_eq!(
            translate(&failure(ConnectFailureReason::AccountLocked), &context()),
            vec![closed(CloseReason::LoggedOut("account_locked".into()))]
        );
        assert_eq!(
            translate(&failure(ConnectFailureReason::ClientOutdated), &context()),
            vec![closed(CloseReason::ClientOutdated)]
        );
        assert!(matches!(
            translate(&failure(ConnectFailureReason::BadUserAgent), &context())[..],
            [DriverEvent::Closed { reason: CloseReason::Transient(_) }]
        ));
    }

    #[test]
    fn server_acks_of_messages_are_receipts_or_rejections() {
        let ack = |class: &str, error: Option<&str>| {
            Event::ServerAck(
                ServerAck::builder()
                    .id("3EB0AA".into())
                    .maybe_class(Some(class.into()))
                    .maybe_from(Some("15550001111@s.whatsapp.net".parse().unwrap()))
                    .maybe_error(error.map(str::to_owned))
                    .build(),
            )
        };
        assert!(matches!(
            &translate(&ack("message", None), &context())[..],
            [DriverEvent::Receipt { message_id, chat, status: ReceiptStatus::ServerAck, .. }]
                if message_id == "3EB0AA" && chat == "15550001111@s.whatsapp.net"
        ));
        assert_eq!(
            translate(&ack("message", Some("463")), &context()),
            vec![DriverEvent::SendRejected { message_id: "3EB0AA".into(), error: "463".into() }]
        );
        assert!(translate(&ack("receipt", None), &context()).is_empty());
    }

    mod messages {
        use whatsapp_rust::Jid as WaJid;
        use whatsapp_rust::buffa;
        use whatsapp_rust::types::message::{MessageInfo, MessageSource};
        use whatsapp_rust::wacore::proto_helpers::MessageBuilderExt;
        use whatsapp_rust::waproto::whatsapp as wa;
        use whatsapp_rust::waproto::whatsapp::message::protocol_message::Type as ProtocolType;

        use super::super::incoming;
        use crate::{ChangeKind, DriverEvent};

        fn info() -> MessageInfo {
            MessageInfo {
                source: MessageSource {
                    chat: WaJid::pn("15551234567"),
                    sender: WaJid::pn("15551234567"),
                    ..Default::default()
                },
                id: "3EB0NEW".into(),
                push_name: "Ada".into(),
                ..Default::default()
            }
        }

        fn key(id: &str) -> wa::MessageKey {
            wa::MessageKey {
                id: Some(id.into()),
                remote_jid: Some("15551234567@s.whatsapp.net".into()),
                ..Default::default()
            }
        }

        fn change_of(message: wa::Message) -> (String, ChangeKind) {
            match incoming(&message, &info()) {
                Some(DriverEvent::Changed(change)) => {
                    assert_eq!(change.chat, "15551234567@s.whatsapp.net");
                    assert_eq!(change.actor, "15551234567@s.whatsapp.net");
                    (change.message_id, change.kind)
                }
                other => panic!("not a change: {other:?}"),
            }
        }

        #[test]
        fn texts_are_messages() {
            match incoming(&wa::Message::text("hello"), &info()) {
                Some(DriverEvent::Message(message)) => {
                    assert_eq!(message.text.as_deref(), Some("hello"));
                    assert_eq!(message.message_id, "3EB0NEW");
                    assert_eq!(message.push_name.as_deref(), Some("Ada"));
                }
                other => panic!("{other:?}"),
            }
        }

        #[test]
        fn a_chat_addressed_by_lid_names_its_phone_jid() {
            let mut by_lid = info();
            by_lid.source.chat = WaJid::lid("200015551234567");
            by_lid.source.sender = WaJid::lid("200015551234567");
            by_lid.source.sender_alt = Some(WaJid::pn("15551234567"));
            let Some(DriverEvent::Message(message)) = incoming(&wa::Message::text("hi"), &by_lid) else {
                panic!("not a message")
            };
            assert_eq!(message.chat, "200015551234567@lid");
            assert_eq!(message.chat_alt.as_deref(), Some("15551234567@s.whatsapp.net"));
            let Some(DriverEvent::Message(plain)) = incoming(&wa::Message::text("hi"), &info()) else {
                panic!("not a message")
            };
            assert_eq!(plain.chat_alt, None);
        }

        #[test]
        fn reactions_edits_and_revokes_are_changes_of_their_target() {
            let reaction = |emoji: &str| wa::Message {
                reaction_message: buffa::MessageField::some(wa::message::ReactionMessage {
                    key: buffa::MessageField::some(key("3EB0OLD")),
                    text: Some(emoji.into()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            assert_eq!(
                change_of(reaction("👍")),
                ("3EB0OLD".into(), ChangeKind::Reaction { emoji: Some("👍".into()) })
            );
            assert_eq!(change_of(reaction("")), ("3EB0OLD".into(), ChangeKind::Reaction { emoji: None }));

            let protocol = |kind, edited: Option<wa::Message>| wa::Message {
                protocol_message: buffa::MessageField::some(wa::message::ProtocolMessage {
                    key: buffa::MessageField::some(key("3EB0OLD")),
                    r#type: Some(kind),
                    edited_message: edited.map_or_else(buffa::MessageField::none, buffa::MessageField::some),
                    ..Default::default()
                }),
                ..Default::default()
            };
            assert_eq!(
                change_of(protocol(ProtocolType::MessageEdit, Some(wa::Message::text("fixed")))),
                ("3EB0OLD".into(), ChangeKind::Edited { text: Some("fixed".into()) })
            );
            assert_eq!(change_of(protocol(ProtocolType::Revoke, None)), ("3EB0OLD".into(), ChangeKind::Revoked));
        }

        #[test]
        fn other_protocol_messages_are_not_chat_messages() {
            let key_share = wa::Message {
                protocol_message: buffa::MessageField::some(wa::message::ProtocolMessage {
                    key: buffa::MessageField::some(key("3EB0OLD")),
                    r#type: Some(ProtocolType::AppStateSyncKeyShare),
                    ..Default::default()
                }),
                ..Default::default()
            };
            assert!(incoming(&key_share, &info()).is_none());
        }
    }
}
