//! Media of messages: the kinds WhatsApp sends, what a driver reports of a received file, and
//! what anna stored of one.

use serde_json::{Value, json};
use uuid::Uuid;

/// The kinds of media WhatsApp messages carry (the predecessor's `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaKind {
    Image,
    Video,
    Audio,
    Document,
    Sticker,
}

impl MediaKind {
    pub const ALL: [MediaKind; 5] = [Self::Image, Self::Video, Self::Audio, Self::Document, Self::Sticker];

    /// `image`, `video`, `audio`, `document` or `sticker`, in any case.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        Self::ALL.into_iter().find(|kind| kind.as_str().eq_ignore_ascii_case(value))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Video => "video",
            Self::Audio => "audio",
            Self::Document => "document",
            Self::Sticker => "sticker",
        }
    }

    /// The message type WhatsApp gives a message of this kind (the history's `type`).
    pub fn message_type(self) -> &'static str {
        match self {
            Self::Image => "imageMessage",
            Self::Video => "videoMessage",
            Self::Audio => "audioMessage",
            Self::Document => "documentMessage",
            Self::Sticker => "stickerMessage",
        }
    }

    /// The kind of a WhatsApp message type, when it is a media message.
    pub fn from_message_type(message_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.message_type() == message_type)
    }

    /// Whether a browser may show it in place (everything but documents, which are served as
    /// attachments whatever they contain).
    pub fn shown_inline(self) -> bool {
        !matches!(self, Self::Document)
    }
}

/// The media a received message carries, as the driver reports it.
#[derive(Clone, PartialEq, Eq)]
pub struct IncomingMedia {
    pub kind: MediaKind,
    /// The type the sender declared.
    pub mime: Option<String>,
    pub file_name: Option<String>,
    /// The size the sender declared.
    pub size: Option<u64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Seconds (audio, video).
    pub duration: Option<u32>,
    /// What the driver needs to fetch it — for WhatsApp the CDN path and the file's key. It
    /// stays in the worker's memory: it is never written into an event.
    pub download: Value,
}

/// Without the download handle (WhatsApp's key to the file), so no log line shows it.
impl std::fmt::Debug for IncomingMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingMedia")
            .field("kind", &self.kind)
            .field("mime", &self.mime)
            .field("file_name", &self.file_name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl IncomingMedia {
    /// What an event says of the media before it is downloaded (no download keys).
    pub fn summary(&self) -> Value {
        json!({
            "kind": self.kind.as_str(), "mime": self.mime, "fileName": self.file_name, "size": self.size,
            "width": self.width, "height": self.height, "duration": self.duration,
        })
    }
}

/// A media object anna stored for a message: what `session.messages.media` and pages show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMedia {
    pub media_id: Uuid,
    pub message_id: String,
    pub chat: String,
    pub kind: MediaKind,
    pub mime: String,
    pub size: u64,
    pub file_name: String,
    /// Base64 of the SHA-256 of the content.
    pub sha256: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub duration: Option<u32>,
}

impl StoredMedia {
    /// The predecessor's media item, with anna's id; `url` is the API route that hands out a
    /// signed download URL (an event outlives any signed URL).
    pub fn to_json(&self) -> Value {
        json!({
            "messageId": self.message_id, "chatJid": self.chat, "mediaId": self.media_id.to_string(),
            "kind": self.kind.as_str(), "mime": self.mime, "size": self.size, "fileName": self.file_name,
            "url": format!("/media/{}", self.media_id), "sha256": self.sha256, "width": self.width,
            "height": self.height, "duration": self.duration,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_in_any_case_and_nothing_else() {
        assert_eq!(MediaKind::parse("IMAGE"), Some(MediaKind::Image));
        assert_eq!(MediaKind::parse(" sticker "), Some(MediaKind::Sticker));
        assert_eq!(MediaKind::parse("gif"), None);
        assert_eq!(MediaKind::parse(""), None);
        for kind in MediaKind::ALL {
            assert_eq!(MediaKind::from_message_type(kind.message_type()), Some(kind));
        }
    }

    #[test]
    fn events_never_carry_download_keys() {
        let media = IncomingMedia {
            kind: MediaKind::Image,
            mime: Some("image/jpeg".into()),
            file_name: None,
            size: Some(10),
            width: Some(1),
            height: Some(1),
            duration: None,
            download: json!({"mediaKey": "secret-key"}),
        };
        assert!(!media.summary().to_string().contains("secret-key"));
        assert!(!format!("{media:?}").contains("secret-key"), "a log line would show the key");
    }
}
