//! Pure conversions between anna's types and whatsapp-rust's: JIDs, outgoing messages, QR
//! rendering, timestamps. No client needed, so all of it is unit-tested offline.

use qrcode::QrCode;
use qrcode::render::unicode::Dense1x2;
use time::OffsetDateTime;
use whatsapp_rust::Jid as WaJid;
use whatsapp_rust::Server;
use whatsapp_rust::chrono::{DateTime, Utc};
use whatsapp_rust::wacore::proto_helpers::MessageBuilderExt;
use whatsapp_rust::waproto::whatsapp as wa;

use super::WhatsAppError;
use crate::jid::{GROUP_SERVER, Jid, JidError, LID_SERVER, USER_SERVER};

/// anna's JID as the library's (an account address: device 0).
pub fn to_wa_jid(jid: &Jid) -> WaJid {
    match jid.server() {
        GROUP_SERVER => WaJid::group(jid.user()),
        LID_SERVER => WaJid::lid(jid.user()),
        _ => WaJid::pn(jid.user()),
    }
}

/// The library's JID as anna's, dropping the device part. Only people (phone or LID) and
/// groups have an anna form; broadcasts, newsletters and the like are refused.
pub fn from_wa_jid(jid: &WaJid) -> Result<Jid, JidError> {
    let server = match jid.server {
        Server::Pn => USER_SERVER,
        Server::Lid => LID_SERVER,
        Server::Group => GROUP_SERVER,
        other => return Err(JidError::UnknownServer(other.as_str().to_owned())),
    };
    Jid::parse(&format!("{}@{server}", jid.user))
}

/// The message `send_text` sends. A reply quotes by message id only: the contract carries no
/// copy of the quoted message, and WhatsApp clients resolve the quote from their own history
/// by its stanza id (same chat, so no `remote_jid`).
pub fn build_text_message(text: &str, reply_to: Option<&str>, forwarding_score: Option<u32>) -> wa::Message {
    match outgoing_context(reply_to, forwarding_score) {
        None => wa::Message::text(text),
        Some(context) => wa::Message::text_with_context(text, context),
    }
}

/// The context of a message anna sends: the message it quotes, and whether it is a forward.
pub fn outgoing_context(reply_to: Option<&str>, forwarding_score: Option<u32>) -> Option<wa::ContextInfo> {
    if reply_to.is_none() && forwarding_score.is_none() {
        return None;
    }
    Some(wa::ContextInfo {
        stanza_id: reply_to.map(str::to_owned),
        is_forwarded: forwarding_score.map(|_| true),
        forwarding_score,
        ..Default::default()
    })
}

/// How WhatsApp addresses a stored message (reactions): in groups, another member's message
/// also names its sender.
pub fn message_key(target: &crate::MessageTarget) -> wa::MessageKey {
    wa::MessageKey {
        remote_jid: Some(target.chat.to_string()),
        from_me: Some(target.from_me),
        id: Some(target.message_id.clone()),
        participant: target
            .sender
            .as_ref()
            .filter(|_| target.chat.is_group() && !target.from_me)
            .map(|sender| sender.to_string()),
    }
}

/// The QR payload as text blocks for a terminal (two modules per character row).
pub fn render_qr(code: &str) -> Result<String, WhatsAppError> {
    let qr = QrCode::new(code.as_bytes()).map_err(|e| WhatsAppError::Qr(e.to_string()))?;
    Ok(qr.render::<Dense1x2>().quiet_zone(true).build())
}

pub(crate) fn to_offset(at: &DateTime<Utc>) -> OffsetDateTime {
    let nanos = i128::from(at.timestamp_millis()) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or_else(|_| OffsetDateTime::now_utc())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use whatsapp_rust::wacore::proto_helpers::MessageExt;

    #[test]
    fn message_keys_name_the_sender_only_for_members_of_groups() {
        let group = Jid::parse("120363021033254949@g.us").unwrap();
        let member = Jid::parse("15551234567@s.whatsapp.net").unwrap();
        let target = crate::MessageTarget {
            chat: group.clone(),
            message_id: "3EB0AA".into(),
            from_me: false,
            sender: Some(member.clone()),
        };
        let key = message_key(&target);
        assert_eq!(key.remote_jid.as_deref(), Some("120363021033254949@g.us"));
        assert_eq!(key.participant.as_deref(), Some("15551234567@s.whatsapp.net"));
        assert_eq!(key.from_me, Some(false));
        let own = message_key(&crate::MessageTarget { from_me: true, ..target.clone() });
        assert_eq!(own.participant, None);
        let direct = message_key(&crate::MessageTarget { chat: member, ..target });
        assert_eq!(direct.participant, None);
    }

    #[test]
    fn jids_convert_both_ways() {
        for text in ["15551234567@s.whatsapp.net", "120363021033254949@g.us", "100000012345678@lid"] {
            let ours = Jid::parse(text).unwrap();
            let theirs = to_wa_jid(&ours);
            assert_eq!(theirs.to_string(), text);
            assert_eq!(from_wa_jid(&theirs).unwrap(), ours);
        }
        let phone = to_wa_jid(&Jid::parse("+1 555 123 4567").unwrap());
        assert!(phone.is_pn());
        assert_eq!(phone.device, 0);
    }

    #[test]
    fn device_jids_lose_their_device() {
        let theirs: WaJid = "15551234567:12@s.whatsapp.net".parse().unwrap();
        assert_eq!(from_wa_jid(&theirs).unwrap().to_string(), "15551234567@s.whatsapp.net");
        let lid: WaJid = "100000012345678:3@lid".parse().unwrap();
        assert_eq!(from_wa_jid(&lid).unwrap().to_string(), "100000012345678@lid");
    }

    #[test]
    fn other_servers_have_no_anna_form() {
        let status: WaJid = "status@broadcast".parse().unwrap();
        assert!(matches!(from_wa_jid(&status), Err(JidError::UnknownServer(_))));
    }

    #[test]
    fn a_plain_text_is_a_conversation() {
        let message = build_text_message("hello", None, None);
        assert_eq!(message.conversation.as_deref(), Some("hello"));
        assert!(message.extended_text_message.as_option().is_none());
        assert_eq!(message.text_content(), Some("hello"));
    }

    #[test]
    fn a_reply_quotes_the_message_id() {
        let message = build_text_message("yes", Some("3EB0ABCDEF"), None);
        assert!(message.conversation.is_none());
        let extended = message.extended_text_message.as_option().unwrap();
        assert_eq!(extended.text.as_deref(), Some("yes"));
        let context = extended.context_info.as_option().unwrap();
        assert_eq!(context.stanza_id.as_deref(), Some("3EB0ABCDEF"));
        assert!(context.remote_jid.is_none());
        assert_eq!(message.text_content(), Some("yes"));
    }

    #[test]
    fn qr_codes_render_as_text_blocks() {
        let rendered = render_qr("2@FAKEREF,TVGRbase64=,HAImbase64=,H0Sobase64=,9").unwrap();
        let lines: Vec<&str> = rendered.lines().collect();
        assert!(lines.len() > 10);
        assert!(lines.iter().all(|line| line.chars().count() == lines[0].chars().count()));
        assert!(rendered.contains('█') || rendered.contains('▀') || rendered.contains('▄'));
    }

    #[test]
    fn timestamps_keep_milliseconds() {
        let at = DateTime::<Utc>::from_timestamp_millis(1_700_000_000_123).unwrap();
        let converted = to_offset(&at);
        assert_eq!(converted.unix_timestamp(), 1_700_000_000);
        assert_eq!(converted.millisecond(), 123);
    }
}
