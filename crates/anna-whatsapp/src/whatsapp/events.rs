//! whatsapp-rust events as anna's [`DriverEvent`]s. A pure function of the event, so the
//! mapping is tested without a connection.

use std::time::Duration;

use time::OffsetDateTime;
use whatsapp_rust::types::events::{ConnectFailureReason, Event};
use whatsapp_rust::types::presence::ReceiptType;
use whatsapp_rust::wacore::proto_helpers::MessageExt;

use super::convert::to_offset;
use crate::{CloseReason, DriverEvent, IncomingMessage, ReceiptStatus};

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
        Event::Messages(batch) => batch.iter().map(|inbound| incoming(&inbound.message, &inbound.info)).collect(),
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

fn incoming(
    message: &whatsapp_rust::waproto::whatsapp::Message,
    info: &whatsapp_rust::types::message::MessageInfo,
) -> DriverEvent {
    DriverEvent::Message(IncomingMessage {
        message_id: info.id.to_string(),
        chat: info.source.chat.to_non_ad().to_string(),
        sender: info.source.sender.to_non_ad().to_string(),
        push_name: Some(info.push_name.clone()).filter(|name| !name.is_empty()),
        text: message.text_content().map(str::to_owned),
        from_me: info.source.is_from_me,
        timestamp: to_offset(&info.timestamp),
    })
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
}
