//! What a file is: the kinds WhatsApp sends, and the check that a file's bytes are what its
//! kind says (the declared content type is never trusted; the first bytes are read).

use crate::MediaError;

pub use anna_domain::media::MediaKind;

/// How many leading bytes [`inspect`] needs to recognise every accepted format.
pub const SNIFF_BYTES: usize = 8192;

/// The content type a file of `kind` is sent with, from its sniffed type; `None` when WhatsApp
/// would not take it as this kind.
fn accepted(kind: MediaKind, sniffed: &str) -> Option<&'static str> {
    match (kind, sniffed) {
        (MediaKind::Image, "image/jpeg") => Some("image/jpeg"),
        (MediaKind::Image, "image/png") => Some("image/png"),
        (MediaKind::Image | MediaKind::Sticker, "image/webp") => Some("image/webp"),
        (MediaKind::Video, "video/mp4" | "video/x-m4v") => Some("video/mp4"),
        (MediaKind::Audio, "audio/ogg" | "audio/opus") => Some("audio/ogg; codecs=opus"),
        (MediaKind::Audio, "audio/mpeg") => Some("audio/mpeg"),
        (MediaKind::Audio, "audio/m4a" | "video/mp4") => Some("audio/mp4"),
        (MediaKind::Audio, "audio/aac") => Some("audio/aac"),
        (MediaKind::Audio, "audio/amr") => Some("audio/amr"),
        _ => None,
    }
}

/// Whether a file already typed `mime` (by [`inspect`]) may be sent as `kind`: any file as a
/// document, else only the formats WhatsApp takes as that kind.
pub fn sendable_as(kind: MediaKind, mime: &str) -> bool {
    let essence = |m: &str| m.split(';').next().unwrap_or(m).trim().to_ascii_lowercase();
    let wanted = essence(mime);
    let formats: &[&str] = match kind {
        MediaKind::Document => return true,
        MediaKind::Image => &["image/jpeg", "image/png", "image/webp"],
        MediaKind::Sticker => &["image/webp"],
        MediaKind::Video => &["video/mp4"],
        MediaKind::Audio => &["audio/ogg", "audio/mpeg", "audio/mp4", "audio/aac", "audio/amr"],
    };
    formats.iter().any(|format| essence(format) == wanted)
}

/// What WhatsApp accepts as `kind`, for error messages.
fn accepted_list(kind: MediaKind) -> &'static str {
    match kind {
        MediaKind::Image => "JPEG, PNG or WebP",
        MediaKind::Sticker => "WebP",
        MediaKind::Video => "MP4",
        MediaKind::Audio => "Ogg/Opus, MP3, M4A, AAC or AMR",
        MediaKind::Document => "any file",
    }
}
/// The content type of a file of `kind` whose first bytes are `head` (at least
/// [`SNIFF_BYTES`] of them, or the whole file). Images, videos, audio and stickers must be
/// one of the formats WhatsApp takes as that kind; a document may be anything, typed by its
/// content when it is recognised, else by `declared` when that is a well-formed type, else
/// `application/octet-stream`.
pub fn inspect(kind: MediaKind, head: &[u8], declared: Option<&str>) -> Result<String, MediaError> {
    let sniffed = infer::get(head).map(|found| found.mime_type());
    if kind == MediaKind::Document {
        let mime = match sniffed {
            Some(mime) => mime.to_owned(),
            None => declared.and_then(well_formed_mime).unwrap_or_else(|| "application/octet-stream".to_owned()),
        };
        return Ok(mime);
    }
    match sniffed.and_then(|mime| accepted(kind, mime)) {
        Some(mime) => Ok(mime.to_owned()),
        None => Err(MediaError::WrongContent {
            kind: kind.as_str(),
            expected: accepted_list(kind),
            found: sniffed.unwrap_or("an unrecognised format").to_owned(),
        }),
    }
}

/// `type/subtype` (parameters dropped), lower case, when it is made of the characters a
/// media type may have; anything else is not worth keeping.
fn well_formed_mime(declared: &str) -> Option<String> {
    let essence = declared.split(';').next()?.trim().to_ascii_lowercase();
    let (top, sub) = essence.split_once('/')?;
    let token = |part: &str| {
        !part.is_empty()
            && part.len() <= 64
            && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    (token(top) && token(sub)).then_some(essence)
}

/// The usual file extension of a content type (the predecessor's map), for names anna makes up.
pub fn extension_for(mime: &str) -> &str {
    let essence = mime.split(';').next().unwrap_or(mime).trim();
    match essence {
        "image/jpeg" => "jpg",
        "image/png" => "png",
        "image/webp" => "webp",
        "video/mp4" => "mp4",
        "audio/ogg" => "ogg",
        "audio/mpeg" => "mp3",
        "audio/mp4" => "m4a",
        "application/pdf" => "pdf",
        _ => match essence.split_once('/') {
            Some((_, sub)) if !sub.is_empty() && sub.bytes().all(|b| b.is_ascii_alphanumeric()) && sub.len() <= 10 => {
                sub
            }
            _ => "bin",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";
    const JPEG: &[u8] = b"\xff\xd8\xff\xe0\0\x10JFIF\0\x01\x01\0\0\x01\0\x01\0\0";
    const PDF: &[u8] = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n";
    const HTML: &[u8] = b"<html><script>alert(1)</script></html>";

    #[test]
    fn an_image_must_be_an_image_whatever_it_claims() {
        assert_eq!(inspect(MediaKind::Image, PNG, Some("text/html")).ok().as_deref(), Some("image/png"));
        assert_eq!(inspect(MediaKind::Image, JPEG, None).ok().as_deref(), Some("image/jpeg"));
        let refused = inspect(MediaKind::Image, HTML, Some("image/png"));
        assert!(matches!(refused, Err(MediaError::WrongContent { kind: "image", .. })), "{refused:?}");
        let pdf_as_video = inspect(MediaKind::Video, PDF, Some("video/mp4"));
        match pdf_as_video {
            Err(MediaError::WrongContent { found, .. }) => assert_eq!(found, "application/pdf"),
            other => panic!("a PDF passed as a video: {other:?}"),
        }
        assert!(inspect(MediaKind::Sticker, PNG, None).is_err(), "stickers are WebP");
        assert!(sendable_as(MediaKind::Image, "image/png") && sendable_as(MediaKind::Document, "image/png"));
        assert!(!sendable_as(MediaKind::Sticker, "image/png") && !sendable_as(MediaKind::Video, "application/pdf"));
        assert!(sendable_as(MediaKind::Audio, "audio/ogg; codecs=opus") && sendable_as(MediaKind::Audio, "audio/mp4"));
    }

    #[test]
    fn documents_take_anything_typed_by_content_first() {
        assert_eq!(inspect(MediaKind::Document, PDF, Some("text/plain")).ok().as_deref(), Some("application/pdf"));
        assert_eq!(
            inspect(MediaKind::Document, b"plain words", Some("Text/CSV; charset=utf-8")).ok().as_deref(),
            Some("text/csv")
        );
        assert_eq!(
            inspect(MediaKind::Document, b"plain words", Some("text/csv\r\nX-Injected: 1")).ok().as_deref(),
            Some("application/octet-stream"),
            "a declared type that is not one is dropped"
        );
        assert_eq!(inspect(MediaKind::Document, b"", None).ok().as_deref(), Some("application/octet-stream"));
    }

    #[test]
    fn extensions_follow_the_predecessors_map() {
        assert_eq!(extension_for("image/jpeg"), "jpg");
        assert_eq!(extension_for("audio/mpeg"), "mp3");
        assert_eq!(extension_for("audio/mp4"), "m4a");
        assert_eq!(extension_for("audio/ogg; codecs=opus"), "ogg");
        assert_eq!(extension_for("text/csv"), "csv");
        assert_eq!(extension_for("application/vnd.openxmlformats-officedocument.wordprocessingml.document"), "bin");
        assert_eq!(extension_for("nonsense"), "bin");
    }
}
