//! Where objects live in the store. Every key starts with the tenant, so one tenant's objects
//! can never be named by another's (the predecessor stored profile pictures under one key for
//! all tenants).

use std::fmt;

use uuid::Uuid;

use crate::kind::{MediaKind, extension_for};

/// A key in the media store: `tenants/<tenant>/media/<media id>.<extension>`. The tenant
/// comes first, so one tenant's objects can never be named by another's; the rest of what is
/// known of an object (session, message, file name) is in the database, which keeps keys
/// short (some S3 servers keep per-object files named after the key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// The key of media object `media_id` of `tenant_id`, with the usual extension of `mime`.
    pub fn new(tenant_id: Uuid, media_id: Uuid, mime: &str) -> Self {
        Self(format!("tenants/{tenant_id}/media/{media_id}.{}", extension_for(mime)))
    }

    /// A key read back from the database; `None` if it is not one anna makes (so nothing
    /// stored elsewhere can be reached through it).
    pub fn stored(key: &str) -> Option<Self> {
        let valid = key.starts_with("tenants/")
            && key.len() <= 512
            && key.split('/').all(|segment| !segment.is_empty() && segment != "." && segment != "..")
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
        valid.then(|| Self(key.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The file name shown to people: what the client gave, without control characters, path
/// separators or surrounding blanks, at most 255 characters; or `<kind>-<id>.<ext>` when
/// nothing usable was given (the predecessor's default).
pub fn display_file_name(given: Option<&str>, kind: MediaKind, id: Uuid, mime: &str) -> String {
    let cleaned: String = given
        .unwrap_or_default()
        .chars()
        .map(|c| if c == '/' || c == '\\' { '_' } else { c })
        // Control characters, and the direction overrides that make `exe.pdf` read `fdp.exe`.
        .filter(|c| {
            !c.is_control() && !matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .take(255)
        .collect();
    let cleaned = cleaned.trim();
    if cleaned.is_empty() || cleaned.chars().all(|c| c == '.' || c == '_') {
        format!("{}-{id}.{}", kind.as_str(), extension_for(mime))
    } else {
        cleaned.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_under_the_tenant() {
        let (tenant, id) = (Uuid::new_v4(), Uuid::new_v4());
        let key = ObjectKey::new(tenant, id, "image/jpeg");
        assert_eq!(key.as_str(), format!("tenants/{tenant}/media/{id}.jpg"));
        assert_eq!(ObjectKey::stored(key.as_str()), Some(key.clone()));
        assert!(ObjectKey::new(tenant, id, "x/../../y").as_str().ends_with(".bin"));
    }

    #[test]
    fn only_keys_anna_makes_are_read_back() {
        for bad in ["", "tenants/../x", "other/x", "tenants//x", "tenants/a/./b", "tenants/a b", "https://x/y"] {
            assert_eq!(ObjectKey::stored(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn display_names_keep_what_people_gave_without_paths() {
        let id = Uuid::nil();
        assert_eq!(
            display_file_name(Some("Rechnung März.pdf"), MediaKind::Document, id, "application/pdf"),
            "Rechnung März.pdf"
        );
        assert_eq!(display_file_name(Some("a/b\\c\r\n.txt"), MediaKind::Document, id, "text/plain"), "a_b_c.txt");
        assert_eq!(display_file_name(Some("invoice\u{202e}fdp.exe"), MediaKind::Document, id, "x/y"), "invoicefdp.exe");
        assert_eq!(
            display_file_name(None, MediaKind::Image, id, "image/jpeg"),
            "image-00000000-0000-0000-0000-000000000000.jpg"
        );
        assert_eq!(display_file_name(Some("  "), MediaKind::Audio, id, "audio/mp4").rsplit('.').next(), Some("m4a"));
    }
}
