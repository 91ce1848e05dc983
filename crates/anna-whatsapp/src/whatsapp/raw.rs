//! The raw message: WhatsApp's own record of a message (`WebMessageInfo`: its key, timestamp,
//! sender's name and the protobuf message) as JSON, stored beside the fields anna reads out of
//! it and returned by the history routes on request (`includeRaw=true`).
//!
//! The JSON follows the protobuf JSON mapping where it matters to readers: lowerCamelCase
//! field names (`extendedTextMessage`, `contextInfo`), byte fields as base64, enum values by
//! name, unset fields and empty lists left out. Field names are whatsapp-rust's, in
//! lowerCamelCase (they match the protobuf names but for a few capitals, `messageC2sTimestamp`),
//! and a `oneof` group is an object named after the group. Key material of every kind (a media
//! message's `mediaKey`, `messageSecret`, sender keys of groups, call and poll keys) and where a
//! file sits on WhatsApp's servers (`directPath`, `url`) are left out: anna stores the files
//! itself, and the raw message travels in events.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};
use serde_value::Value as Typed;
use whatsapp_rust::waproto::whatsapp as wa;

use crate::RawMessage;

/// Fields of a media message (one carrying a media key or a direct path) that locate its file
/// on WhatsApp's servers.
const MEDIA_LOCATION_FIELDS: [&str; 2] = ["url", "staticUrl"];

/// Whether a field holds a secret: key material of any kind (`mediaKey`, `callKey`, `encKey`,
/// `masterKey`, `messageSecret`, … — byte fields named so; a `key` naming a message is kept), a
/// sender key being distributed (group encryption), or where a file sits on WhatsApp's servers
/// (`directPath`, `thumbnailDirectPath`, …).
fn is_secret(name: &str, value: &Value) -> bool {
    let key_material = (name.ends_with("Key") || name.ends_with("Secret") || name == "secret") && value.is_string();
    key_material
        || name.contains("SenderKeyDistribution")
        || name.starts_with("senderKeyDistribution")
        || name == "directPath"
        || name.ends_with("DirectPath")
}

/// The raw form of a message received or sent live: the `WebMessageInfo` the phone would keep.
pub(crate) fn live(
    message: &wa::Message,
    chat: &str,
    id: &str,
    from_me: bool,
    participant: Option<&str>,
    seconds: i64,
    push_name: Option<&str>,
) -> Option<RawMessage> {
    let info = wa::WebMessageInfo {
        key: wa::MessageKey {
            remote_jid: Some(chat.to_owned()),
            from_me: Some(from_me),
            id: Some(id.to_owned()),
            participant: participant.map(str::to_owned),
        }
        .into(),
        message: message.clone().into(),
        message_timestamp: u64::try_from(seconds).ok(),
        push_name: push_name.filter(|name| !name.is_empty()).map(str::to_owned),
        ..Default::default()
    };
    of(&info)
}

/// The raw form of a message of the phone's history, as the phone sent it.
pub(crate) fn of(info: &wa::WebMessageInfo) -> Option<RawMessage> {
    match serde_value::to_value(info) {
        Ok(typed) => json_of(typed).map(RawMessage::new),
        Err(error) => {
            tracing::debug!(%error, "a message could not be turned into its raw form");
            None
        }
    }
}

/// The JSON of a captured value; `None` for what the protobuf JSON mapping leaves out (unset
/// fields, empty lists).
fn json_of(typed: Typed) -> Option<Value> {
    Some(match typed {
        Typed::Unit | Typed::Option(None) => return None,
        Typed::Option(Some(inner)) | Typed::Newtype(inner) => return json_of(*inner),
        Typed::Bool(value) => Value::Bool(value),
        Typed::U8(value) => value.into(),
        Typed::U16(value) => value.into(),
        Typed::U32(value) => value.into(),
        Typed::U64(value) => value.into(),
        Typed::I8(value) => value.into(),
        Typed::I16(value) => value.into(),
        Typed::I32(value) => value.into(),
        Typed::I64(value) => value.into(),
        Typed::F32(value) => serde_json::Number::from_f64(f64::from(value)).map_or(Value::Null, Value::Number),
        Typed::F64(value) => serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number),
        Typed::Char(value) => Value::String(value.to_string()),
        Typed::String(value) => Value::String(value),
        Typed::Bytes(bytes) => Value::String(STANDARD.encode(bytes)),
        Typed::Seq(items) if items.is_empty() => return None,
        // A `bytes` field (serde sees a list of u8); lists of wider integers stay lists.
        Typed::Seq(items) if items.iter().all(|item| matches!(item, Typed::U8(_))) => {
            let bytes: Vec<u8> =
                items.into_iter().filter_map(|item| if let Typed::U8(b) = item { Some(b) } else { None }).collect();
            Value::String(STANDARD.encode(bytes))
        }
        Typed::Seq(items) => Value::Array(items.into_iter().map(|item| json_of(item).unwrap_or(Value::Null)).collect()),
        Typed::Map(entries) => {
            let mut fields = Map::new();
            let mut locates_a_file = false;
            for (key, value) in entries {
                let name = match key {
                    Typed::String(name) => camel_case(&name),
                    // Map entries with integer keys (`map<uint32, …>`).
                    other => match json_of(other) {
                        Some(Value::Number(number)) => number.to_string(),
                        _ => continue,
                    },
                };
                let Some(value) = json_of(value) else { continue };
                if is_secret(&name, &value) {
                    locates_a_file |= name == "mediaKey" || name == "directPath";
                    continue;
                }
                fields.insert(name, value);
            }
            if locates_a_file {
                for name in MEDIA_LOCATION_FIELDS {
                    fields.remove(name);
                }
            }
            Value::Object(fields)
        }
    })
}

/// A Rust field name (`extended_text_message`) or oneof variant (`ImageMessage`) as the
/// protobuf JSON names it (`extendedTextMessage`, `imageMessage`).
fn camel_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper_next = false;
    for (index, ch) in name.chars().enumerate() {
        if ch == '_' {
            upper_next = index > 0;
        } else if upper_next {
            out.extend(ch.to_uppercase());
            upper_next = false;
        } else if index == 0 {
            out.extend(ch.to_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn text_message(text: &str) -> wa::Message {
        wa::Message {
            extended_text_message: wa::message::ExtendedTextMessage {
                text: Some(text.to_owned()),
                context_info: wa::ContextInfo {
                    stanza_id: Some("3EB0QUOTED".into()),
                    mentioned_jid: vec!["15550100999@s.whatsapp.net".into()],
                    ..Default::default()
                }
                .into(),
                ..Default::default()
            }
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn names_fields_as_protobuf_json_and_leaves_unset_ones_out() {
        let raw = live(
            &text_message("hello"),
            "15550100123@s.whatsapp.net",
            "3EB0ABC",
            false,
            None,
            1_790_000_000,
            Some("Ada"),
        )
        .expect("raw");
        let json = raw.as_json();
        assert_eq!(
            json["key"],
            serde_json::json!({"remoteJid": "15550100123@s.whatsapp.net", "fromMe": false, "id": "3EB0ABC"})
        );
        assert_eq!(json["messageTimestamp"], 1_790_000_000);
        assert_eq!(json["pushName"], "Ada");
        let text = &json["message"]["extendedTextMessage"];
        assert_eq!(text["text"], "hello");
        assert_eq!(text["contextInfo"]["stanzaId"], "3EB0QUOTED");
        assert_eq!(text["contextInfo"]["mentionedJid"], serde_json::json!(["15550100999@s.whatsapp.net"]));
        // Unset fields are not written as nulls: the text message has a handful of fields.
        assert!(json["message"].as_object().expect("object").len() == 1, "{json}");
        assert!(!json.to_string().contains("null"), "{json}");
    }

    #[test]
    fn bytes_are_base64_and_what_opens_a_file_is_left_out() {
        let message = wa::Message {
            image_message: wa::message::ImageMessage {
                url: Some("https://mmg.example.invalid/enc".into()),
                mimetype: Some("image/jpeg".into()),
                caption: Some("look".into()),
                media_key: Some(vec![7; 32]),
                direct_path: Some("/v/t62/abc".into()),
                file_sha256: Some(vec![1, 2, 3]),
                jpeg_thumbnail: Some(vec![0xff, 0xd8, 0xff]),
                width: Some(640),
                scan_lengths: vec![1, 2, 3],
                ..Default::default()
            }
            .into(),
            message_context_info: wa::MessageContextInfo { message_secret: Some(vec![9; 32]), ..Default::default() }
                .into(),
            ..Default::default()
        };
        let raw = live(&message, "15550100123@s.whatsapp.net", "3EB0IMG", true, None, 1, None).expect("raw");
        let image = &raw.as_json()["message"]["imageMessage"];
        assert_eq!(image["caption"], "look");
        assert_eq!(image["fileSha256"], "AQID");
        assert_eq!(image["jpegThumbnail"], "/9j/");
        assert_eq!(image["width"], 640);
        assert_eq!(image["scanLengths"], serde_json::json!([1, 2, 3]), "a list of integers stays a list");
        for hidden in ["mediaKey", "directPath", "url"] {
            assert!(image.get(hidden).is_none(), "{hidden} must not be in the raw message: {image}");
        }
        assert!(raw.as_json()["message"]["messageContextInfo"].get("messageSecret").is_none());
        assert!(!raw.as_json().to_string().contains("mmg.example.invalid"));
    }

    #[test]
    fn key_material_of_every_kind_is_left_out() {
        let message = wa::Message {
            conversation: Some("hello group".into()),
            sender_key_distribution_message: wa::message::SenderKeyDistributionMessage {
                group_id: Some("120363000000000001@g.us".into()),
                axolotl_sender_key_distribution_message: Some(vec![5; 64]),
            }
            .into(),
            call: wa::message::Call { call_key: Some(vec![6; 32]), ..Default::default() }.into(),
            poll_creation_message: wa::message::PollCreationMessage {
                enc_key: Some(vec![7; 32]),
                name: Some("Lunch?".into()),
                ..Default::default()
            }
            .into(),
            ..Default::default()
        };
        let raw =
            live(&message, "120363000000000001@g.us", "3EB0G", false, Some("15550100123@s.whatsapp.net"), 1, None)
                .expect("raw");
        let json = raw.as_json();
        assert_eq!(json["message"]["conversation"], "hello group");
        assert_eq!(json["message"]["pollCreationMessage"]["name"], "Lunch?");
        assert!(json["message"].get("senderKeyDistributionMessage").is_none(), "{json}");
        assert!(json["message"]["call"].get("callKey").is_none(), "{json}");
        assert!(json["message"]["pollCreationMessage"].get("encKey").is_none(), "{json}");
        assert_eq!(json["key"]["participant"], "15550100123@s.whatsapp.net", "a message's key is no secret");
        for secret in ["BQUF", "BgYG", "BwcH"] {
            assert!(!json.to_string().contains(secret), "{secret} in {json}");
        }
    }

    #[test]
    fn enums_by_name_and_history_status_kept() {
        let info = wa::WebMessageInfo {
            key: wa::MessageKey { id: Some("3EB0H".into()), from_me: Some(true), ..Default::default() }.into(),
            status: Some(wa::web_message_info::Status::READ),
            message: wa::Message { conversation: Some("old".into()), ..Default::default() }.into(),
            ..Default::default()
        };
        let json = of(&info).expect("raw").into_json();
        assert_eq!(json["status"], "READ");
        assert_eq!(json["message"], serde_json::json!({"conversation": "old"}));
    }

    #[test]
    fn camel_case_of_fields_and_variants() {
        assert_eq!(camel_case("extended_text_message"), "extendedTextMessage");
        assert_eq!(camel_case("file_sha256"), "fileSha256");
        assert_eq!(camel_case("ImageMessage"), "imageMessage");
        assert_eq!(camel_case("id"), "id");
    }
}
