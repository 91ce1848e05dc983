//! Media messages: what a received one says of its file (and how to fetch it), and the message
//! that sends an uploaded file. Pure conversions, unit-tested offline; the upload and the
//! download themselves are the client's (`session.rs`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use whatsapp_rust::download::{DownloadParams, MediaType};
use whatsapp_rust::media::{AudioOptions, DocumentOptions, ImageOptions, VideoOptions};
use whatsapp_rust::upload::UploadResponse;
use whatsapp_rust::wacore::proto_helpers::MessageExt;
use whatsapp_rust::waproto::buffa::MessageField;
use whatsapp_rust::waproto::whatsapp as wa;

use crate::{IncomingMedia, MediaKind, OutgoingMedia};

/// A file that refuses to grow past a limit: where a download is written, so a sender who
/// declared a small file cannot make anna store a large one.
pub struct LimitedFile {
    file: std::fs::File,
    limit: u64,
    /// The furthest byte written.
    len: u64,
}

impl LimitedFile {
    pub fn new(file: std::fs::File, limit: u64) -> Self {
        Self { file, limit, len: 0 }
    }

    /// Bytes written.
    pub fn written(&self) -> u64 {
        self.len
    }
}

impl std::io::Write for LimitedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::io::Seek;
        let at = self.file.stream_position()?;
        if at + buf.len() as u64 > self.limit {
            return Err(std::io::Error::other(format!("the file is larger than {} bytes", self.limit)));
        }
        let written = self.file.write(buf)?;
        self.len = self.len.max(at + written as u64);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl std::io::Seek for LimitedFile {
    fn seek(&mut self, position: std::io::SeekFrom) -> std::io::Result<u64> {
        self.file.seek(position)
    }
}

impl whatsapp_rust::download::DownloadWriter for LimitedFile {
    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.len = self.len.min(len);
        Ok(())
    }
}

/// What a message answers and whom it mentions, from its context info (text and media
/// messages carry one).
pub fn context_of(message: &wa::Message) -> crate::MessageContext {
    let base = message.get_base_message();
    let context = base
        .extended_text_message
        .as_option()
        .and_then(|m| m.context_info.as_option())
        .or_else(|| base.image_message.as_option().and_then(|m| m.context_info.as_option()))
        .or_else(|| base.video_message.as_option().and_then(|m| m.context_info.as_option()))
        .or_else(|| base.audio_message.as_option().and_then(|m| m.context_info.as_option()))
        .or_else(|| base.document_message.as_option().and_then(|m| m.context_info.as_option()))
        .or_else(|| base.sticker_message.as_option().and_then(|m| m.context_info.as_option()));
    let Some(context) = context else { return crate::MessageContext::default() };
    crate::MessageContext {
        reply_to: context.stanza_id.clone().filter(|id| !id.is_empty()),
        reply_to_participant: context.participant.clone().filter(|jid| !jid.is_empty()),
        mentions: context.mentioned_jid.iter().filter(|jid| !jid.is_empty()).take(256).cloned().collect(),
        forwarding_score: context
            .is_forwarded
            .filter(|forwarded| *forwarded)
            .map(|_| context.forwarding_score.unwrap_or(1)),
    }
}

/// The library's media type of a kind.
pub fn media_type(kind: MediaKind) -> MediaType {
    match kind {
        MediaKind::Image => MediaType::Image,
        MediaKind::Video => MediaType::Video,
        MediaKind::Audio => MediaType::Audio,
        MediaKind::Document => MediaType::Document,
        MediaKind::Sticker => MediaType::Sticker,
    }
}

/// The CDN fields of a media message, common to every kind.
struct Cdn<'a> {
    direct_path: Option<&'a str>,
    media_key: Option<&'a [u8]>,
    file_sha256: Option<&'a [u8]>,
    file_enc_sha256: Option<&'a [u8]>,
    file_length: Option<u64>,
}

/// The file a message carries, if it is a media message: what it says of the file, and the
/// CDN path and keys to fetch and decrypt it (kept out of events by the caller).
pub fn incoming_media(message: &wa::Message) -> Option<IncomingMedia> {
    let base = message.get_base_message();
    let blank = || IncomingMedia {
        kind: MediaKind::Document,
        mime: None,
        file_name: None,
        size: None,
        width: None,
        height: None,
        duration: None,
        download: Value::Null,
    };
    let (media, cdn) = if let Some(image) = base.image_message.as_option() {
        let media = IncomingMedia {
            kind: MediaKind::Image,
            mime: image.mimetype.clone(),
            width: image.width,
            height: image.height,
            ..blank()
        };
        (
            media,
            Cdn {
                direct_path: image.direct_path.as_deref(),
                media_key: image.media_key.as_deref(),
                file_sha256: image.file_sha256.as_deref(),
                file_enc_sha256: image.file_enc_sha256.as_deref(),
                file_length: image.file_length,
            },
        )
    } else if let Some(video) = base.video_message.as_option() {
        let media = IncomingMedia {
            kind: MediaKind::Video,
            mime: video.mimetype.clone(),
            width: video.width,
            height: video.height,
            duration: video.seconds,
            ..blank()
        };
        (
            media,
            Cdn {
                direct_path: video.direct_path.as_deref(),
                media_key: video.media_key.as_deref(),
                file_sha256: video.file_sha256.as_deref(),
                file_enc_sha256: video.file_enc_sha256.as_deref(),
                file_length: video.file_length,
            },
        )
    } else if let Some(audio) = base.audio_message.as_option() {
        let media =
            IncomingMedia { kind: MediaKind::Audio, mime: audio.mimetype.clone(), duration: audio.seconds, ..blank() };
        (
            media,
            Cdn {
                direct_path: audio.direct_path.as_deref(),
                media_key: audio.media_key.as_deref(),
                file_sha256: audio.file_sha256.as_deref(),
                file_enc_sha256: audio.file_enc_sha256.as_deref(),
                file_length: audio.file_length,
            },
        )
    } else if let Some(document) = base.document_message.as_option() {
        let media = IncomingMedia {
            kind: MediaKind::Document,
            mime: document.mimetype.clone(),
            file_name: document.file_name.clone(),
            ..blank()
        };
        (
            media,
            Cdn {
                direct_path: document.direct_path.as_deref(),
                media_key: document.media_key.as_deref(),
                file_sha256: document.file_sha256.as_deref(),
                file_enc_sha256: document.file_enc_sha256.as_deref(),
                file_length: document.file_length,
            },
        )
    } else if let Some(sticker) = base.sticker_message.as_option() {
        let media = IncomingMedia {
            kind: MediaKind::Sticker,
            mime: sticker.mimetype.clone(),
            width: sticker.width,
            height: sticker.height,
            ..blank()
        };
        (
            media,
            Cdn {
                direct_path: sticker.direct_path.as_deref(),
                media_key: sticker.media_key.as_deref(),
                file_sha256: sticker.file_sha256.as_deref(),
                file_enc_sha256: sticker.file_enc_sha256.as_deref(),
                file_length: sticker.file_length,
            },
        )
    } else {
        return None;
    };
    let b64 = |bytes: Option<&[u8]>| bytes.map(|b| STANDARD.encode(b));
    Some(IncomingMedia {
        size: cdn.file_length,
        download: json!({
            "directPath": cdn.direct_path, "mediaKey": b64(cdn.media_key), "fileSha256": b64(cdn.file_sha256),
            "fileEncSha256": b64(cdn.file_enc_sha256), "fileLength": cdn.file_length,
        }),
        ..media
    })
}

/// What the client needs to fetch and decrypt a received file; `None` when the message did not
/// say (a file WhatsApp no longer holds, or a message of another client's making).
pub fn download_params(media: &IncomingMedia) -> Option<DownloadParams> {
    let field = |name: &str| media.download.get(name).and_then(Value::as_str);
    let bytes = |name: &str| field(name).and_then(|value| STANDARD.decode(value).ok());
    Some(DownloadParams::encrypted(
        field("directPath").filter(|path| !path.is_empty())?,
        &bytes("mediaKey")?,
        &bytes("fileSha256")?,
        &bytes("fileEncSha256")?,
        media.download.get("fileLength").and_then(Value::as_u64)?,
        media_type(media.kind),
    ))
}

/// The message that sends an uploaded file, quoting `reply_to` when given.
pub fn media_message(upload: UploadResponse, message: &OutgoingMedia) -> wa::Message {
    let context = super::convert::outgoing_context(message.reply_to.as_deref(), message.forwarding_score).map(Box::new);
    let mime = Some(message.mime.clone());
    match message.kind {
        MediaKind::Image => whatsapp_rust::media::image_message(
            upload,
            ImageOptions {
                caption: message.caption.clone(),
                mimetype: mime,
                jpeg_thumbnail: None,
                context_info: context,
            },
        ),
        MediaKind::Video => whatsapp_rust::media::video_message(
            upload,
            VideoOptions {
                caption: message.caption.clone(),
                mimetype: mime,
                context_info: context,
                ..Default::default()
            },
        ),
        MediaKind::Audio => whatsapp_rust::media::audio_message(
            upload,
            AudioOptions { mimetype: mime, ptt: Some(message.ptt), context_info: context, ..Default::default() },
        ),
        MediaKind::Document => whatsapp_rust::media::document_message(
            upload,
            DocumentOptions {
                mimetype: mime,
                file_name: Some(message.file_name.clone()),
                title: Some(message.file_name.clone()),
                caption: message.caption.clone(),
                context_info: context,
                ..Default::default()
            },
        ),
        // The library has no builder for stickers.
        MediaKind::Sticker => wa::Message {
            sticker_message: MessageField::some(wa::message::StickerMessage {
                url: Some(upload.url),
                direct_path: Some(upload.direct_path),
                media_key: Some(upload.media_key.to_vec()),
                file_sha256: Some(upload.file_sha256.to_vec()),
                file_enc_sha256: Some(upload.file_enc_sha256.to_vec()),
                file_length: Some(upload.file_length),
                media_key_timestamp: Some(upload.media_key_timestamp),
                mimetype: mime,
                is_animated: Some(whatsapp_rust::webp::is_animated(&message.bytes)),
                context_info: context.map(|c| MessageField::some(*c)).unwrap_or_default(),
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whatsapp_rust::wacore::proto_helpers::MessageBuilderExt;

    #[test]
    fn a_received_image_says_what_it_is_and_how_to_fetch_it() {
        let message = wa::Message {
            image_message: MessageField::some(wa::message::ImageMessage {
                mimetype: Some("image/jpeg".into()),
                caption: Some("look".into()),
                file_length: Some(1234),
                width: Some(640),
                height: Some(480),
                direct_path: Some("/v/t62/abc".into()),
                media_key: Some(vec![1; 32]),
                file_sha256: Some(vec![2; 32]),
                file_enc_sha256: Some(vec![3; 32]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let media = incoming_media(&message).unwrap_or_else(|| panic!("no media found"));
        assert_eq!(media.kind, MediaKind::Image);
        assert_eq!((media.size, media.width, media.height), (Some(1234), Some(640), Some(480)));
        assert_eq!(media.mime.as_deref(), Some("image/jpeg"));
        assert!(!media.summary().to_string().contains("mediaKey"), "the key would reach events");
        let params = download_params(&media).unwrap_or_else(|| panic!("no download params"));
        assert_eq!(params.direct_path, "/v/t62/abc");
        assert_eq!(params.media_key.as_deref(), Some([1u8; 32].as_slice()));
        assert_eq!(params.file_length, 1234);
    }

    #[test]
    fn replies_and_mentions_come_from_the_context_info() {
        let message = wa::Message::text_with_context(
            "hi @ann",
            wa::ContextInfo {
                stanza_id: Some("3EB0QUOTED".into()),
                participant: Some("15550001111@s.whatsapp.net".into()),
                mentioned_jid: vec!["15550002222@s.whatsapp.net".into()],
                ..Default::default()
            },
        );
        let context = context_of(&message);
        assert_eq!(context.reply_to.as_deref(), Some("3EB0QUOTED"));
        assert_eq!(context.reply_to_participant.as_deref(), Some("15550001111@s.whatsapp.net"));
        assert_eq!(context.mentions, ["15550002222@s.whatsapp.net"]);
        assert_eq!(context_of(&wa::Message::text("plain")), crate::MessageContext::default());
        let forwarded = wa::Message::text_with_context(
            "fwd",
            wa::ContextInfo { is_forwarded: Some(true), forwarding_score: Some(4), ..Default::default() },
        );
        assert_eq!(context_of(&forwarded).forwarding_score, Some(4));
        let outgoing = super::super::convert::outgoing_context(None, Some(2)).unwrap_or_default();
        assert_eq!((outgoing.is_forwarded, outgoing.forwarding_score, outgoing.stanza_id), (Some(true), Some(2), None));
    }

    #[test]
    fn a_limited_file_refuses_to_grow_past_its_limit() {
        use std::io::{Seek, Write};
        use whatsapp_rust::download::DownloadWriter;
        let file = tempfile::tempfile().unwrap_or_else(|e| panic!("{e}"));
        let mut limited = LimitedFile::new(file, 10);
        assert!(limited.write_all(b"0123456789").is_ok());
        assert!(limited.write_all(b"x").is_err(), "past the limit");
        assert!(limited.truncate(0).is_ok() && limited.rewind().is_ok());
        assert_eq!(limited.written(), 0);
        assert!(limited.write_all(b"again").is_ok(), "a retry starts over");
        assert_eq!(limited.written(), 5);
    }

    #[test]
    fn a_document_keeps_its_name_and_text_is_no_media() {
        let message = wa::Message {
            document_message: MessageField::some(wa::message::DocumentMessage {
                file_name: Some("Rechnung.pdf".into()),
                mimetype: Some("application/pdf".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let media = incoming_media(&message).unwrap_or_else(|| panic!("no media found"));
        assert_eq!((media.kind, media.file_name.as_deref()), (MediaKind::Document, Some("Rechnung.pdf")));
        assert!(download_params(&media).is_none(), "no CDN fields, nothing to fetch");
        assert!(incoming_media(&wa::Message::text("hi")).is_none());
    }
}
