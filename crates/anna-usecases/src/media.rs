//! Media: files tenants upload to send (`POST /media`), and the download URLs of every object
//! anna keeps (`GET /media/{id}`). The object is stored before its row is written, so a row
//! never names an object that is not there; an object whose row could not be written is
//! removed again.

use std::sync::Arc;

use anna_domain::SessionRef;
use anna_domain::media::{IncomingMedia, StoredMedia};
use anna_media::{MediaError, MediaKind, MediaStorage, ObjectKey, SignedUrl, StagedFile};
use anna_store::{MediaObject, MessageMedia, Store};
use bytes::Bytes;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::Failure;
use crate::sessions::{SessionError, Sessions};

#[derive(Debug, thiserror::Error)]
pub enum MediaUseError {
    /// No session to upload for (none named and none at all, or another tenant's).
    #[error("session not found")]
    NoSession,
    /// Absent, or another tenant's.
    #[error("media not found")]
    NotFound,
    /// The file is not what its kind says.
    #[error("{0}")]
    WrongContent(String),
    /// The media store failed (unreachable bucket, full disk).
    #[error("media storage is unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Failed(#[from] Failure),
}

crate::store_failures!(MediaUseError);

impl From<SessionError> for MediaUseError {
    fn from(error: SessionError) -> Self {
        match error {
            SessionError::Failed(failure) => Self::Failed(failure),
            _ => Self::NoSession,
        }
    }
}

impl From<MediaError> for MediaUseError {
    fn from(error: MediaError) -> Self {
        match error {
            MediaError::WrongContent { .. } => Self::WrongContent(error.to_string()),
            MediaError::NotFound => Self::NotFound,
            other => Self::Unavailable(other.to_string()),
        }
    }
}

/// A file a client sent, received whole.
pub struct Upload {
    pub kind: MediaKind,
    pub file: StagedFile,
    /// The client's file name, if it gave one.
    pub file_name: Option<String>,
    /// The client's content type, believed only for documents of a type anna does not
    /// recognise.
    pub declared_mime: Option<String>,
}

/// How a file is placed in the store: the kind it was sent as, the kind it is served as (a
/// file whose content is not its kind is served as a document), its checked type and the name
/// it was given.
struct Placed<'a> {
    kind: MediaKind,
    served_as: MediaKind,
    mime: String,
    given_name: Option<&'a str>,
}

/// A stored object with a download URL.
#[derive(Debug, Clone)]
pub struct MediaView {
    pub object: MediaObject,
    pub download: SignedUrl,
}

pub struct Media {
    store: Arc<dyn Store>,
    storage: Arc<MediaStorage>,
    sessions: Arc<Sessions>,
}

impl Media {
    pub fn new(store: Arc<dyn Store>, storage: Arc<MediaStorage>, sessions: Arc<Sessions>) -> Self {
        Self { store, storage, sessions }
    }

    pub fn storage(&self) -> &Arc<MediaStorage> {
        &self.storage
    }

    /// Stores an uploaded file for the session the chat routes' rule picks.
    pub async fn upload(
        &self,
        tenant_id: Uuid,
        requested: Option<Uuid>,
        upload: Upload,
    ) -> Result<(Uuid, MediaView), MediaUseError> {
        let session = self.sessions.resolve_for_chats(tenant_id, requested).await?.ok_or(MediaUseError::NoSession)?;
        let object = self.keep(tenant_id, session.id, &upload, "upload").await?;
        let (id, key) = (object.id, ObjectKey::stored(&object.object_key).ok_or(MediaUseError::NotFound)?);
        let download = self.storage.download_url(id, &key, OffsetDateTime::now_utc()).await?;
        Ok((session.id, MediaView { object, download }))
    }

    /// Keeps a file fetched from a URL to send it (checked like an upload), and returns it
    /// whole for sending.
    pub async fn store_fetched(
        &self,
        session: SessionRef,
        fetched: Upload,
    ) -> Result<(MediaObject, Bytes), MediaUseError> {
        let object = self.keep(session.tenant_id, session.id, &fetched, "url").await?;
        let bytes = tokio::fs::read(fetched.file.path())
            .await
            .map_err(|e| MediaUseError::Unavailable(format!("the fetched file: {e}")))?;
        Ok((object, Bytes::from(bytes)))
    }

    /// Checks a received file against its kind, stores it and records its row.
    async fn keep(
        &self,
        tenant_id: Uuid,
        session_id: Uuid,
        upload: &Upload,
        source: &str,
    ) -> Result<MediaObject, MediaUseError> {
        let mime = anna_media::inspect(upload.kind, &upload.file.head, upload.declared_mime.as_deref())?;
        let file = Placed { kind: upload.kind, served_as: upload.kind, mime, given_name: upload.file_name.as_deref() };
        let (object, key) = self.put_object(tenant_id, session_id, &upload.file, file, source).await?;
        if let Err(error) = self.record(&object).await {
            self.forget_object(&key).await;
            return Err(error.into());
        }
        Ok(object)
    }

    /// Puts a staged file into the store under a new key; the row is the caller's to write.
    async fn put_object(
        &self,
        tenant_id: Uuid,
        session_id: Uuid,
        file: &StagedFile,
        placed: Placed<'_>,
        source: &str,
    ) -> Result<(MediaObject, ObjectKey), MediaUseError> {
        let id = Uuid::now_v7();
        let key = ObjectKey::new(tenant_id, id, &placed.mime);
        let file_name = anna_media::display_file_name(placed.given_name, placed.kind, id, &placed.mime);
        let disposition = content_disposition(placed.served_as, &file_name);
        self.storage.put_file(&key, file.path(), &placed.mime, &disposition).await?;
        let object = MediaObject {
            id,
            tenant_id,
            session_id,
            object_key: key.as_str().to_owned(),
            kind: placed.served_as.as_str().to_owned(),
            mime: placed.mime,
            size: file.size,
            file_name,
            sha256: file.sha256.clone(),
            source: source.into(),
            created_at: OffsetDateTime::now_utc(),
        };
        Ok((object, key))
    }

    /// Removes an object whose row could not be written (the sweep would, later).
    async fn forget_object(&self, key: &ObjectKey) {
        if let Err(cleanup) = self.storage.delete(key).await {
            tracing::warn!(key = %key, error = %cleanup, "a file whose row failed stays in the media store");
        }
    }

    async fn record(&self, object: &MediaObject) -> Result<(), anna_store::StoreError> {
        let mut uow = self.store.begin().await?;
        uow.insert_media_object(object).await?;
        uow.commit().await
    }

    /// One of the tenant's objects with a fresh download URL.
    pub async fn find(&self, tenant_id: Uuid, id: Uuid) -> Result<MediaView, MediaUseError> {
        let object = self.owned(tenant_id, id).await?;
        let key = ObjectKey::stored(&object.object_key).ok_or(MediaUseError::NotFound)?;
        let download = self.storage.download_url(id, &key, OffsetDateTime::now_utc()).await?;
        Ok(MediaView { object, download })
    }

    /// A stored object of the tenant's, whole, to send as `kind`: refused when it is not the
    /// tenant's, not of a format WhatsApp takes as `kind`, or larger than `limit`.
    pub async fn load_for_send(
        &self,
        tenant_id: Uuid,
        id: Uuid,
        kind: MediaKind,
        limit: u64,
    ) -> Result<(MediaObject, Bytes), MediaUseError> {
        let object = self.owned(tenant_id, id).await?;
        if !anna_media::sendable_as(kind, &object.mime) {
            return Err(MediaUseError::WrongContent(format!(
                "media {id} is {}, which cannot be sent as {}",
                object.mime,
                kind.as_str()
            )));
        }
        let key = ObjectKey::stored(&object.object_key).ok_or(MediaUseError::NotFound)?;
        let bytes = self.storage.read(&key, limit).await.map_err(|error| match error {
            MediaError::TooLarge { limit } => {
                MediaUseError::WrongContent(format!("media {id} is larger than {limit} bytes"))
            }
            other => other.into(),
        })?;
        Ok((object, bytes))
    }

    /// Whether a message of the session has its media stored already.
    pub async fn has_media(&self, session: SessionRef, message_id: &str) -> Result<bool, MediaUseError> {
        Ok(!self.store.list_message_media(session.id, &[message_id.to_owned()]).await?.is_empty())
    }

    /// Stores the file of a received message and records it with `session.messages.media`, in
    /// one unit of work. A file whose content is not its kind is kept as a document (served as
    /// an attachment). `Ok(None)`: the session is gone; nothing is kept.
    pub async fn store_received(
        &self,
        session: SessionRef,
        message_id: &str,
        chat: &str,
        media: &IncomingMedia,
        file: StagedFile,
    ) -> Result<Option<StoredMedia>, MediaUseError> {
        let declared = media.mime.as_deref();
        let (served_as, mime) = match anna_media::inspect(media.kind, &file.head, declared) {
            Ok(mime) => (media.kind, mime),
            Err(_) => (MediaKind::Document, anna_media::inspect(MediaKind::Document, &file.head, declared)?),
        };
        let placed = Placed { kind: media.kind, served_as, mime, given_name: media.file_name.as_deref() };
        let (object, key) = self.put_object(session.tenant_id, session.id, &file, placed, "message").await?;
        let stored = StoredMedia {
            media_id: object.id,
            message_id: message_id.to_owned(),
            chat: chat.to_owned(),
            kind: media.kind,
            mime: object.mime.clone(),
            size: object.size,
            file_name: object.file_name.clone(),
            sha256: object.sha256.clone(),
            width: media.width,
            height: media.height,
            duration: media.duration,
        };
        let recorded = self.record_received(session, &object, &stored, object.created_at).await;
        if !matches!(recorded, Ok(true)) {
            self.forget_object(&key).await;
        }
        Ok(recorded?.then_some(stored))
    }

    async fn record_received(
        &self,
        session: SessionRef,
        object: &MediaObject,
        stored: &StoredMedia,
        now: OffsetDateTime,
    ) -> Result<bool, anna_store::StoreError> {
        let mut uow = self.store.begin().await?;
        if uow.find_session(session.id).await?.is_none() {
            return Ok(false);
        }
        uow.insert_media_object(object).await?;
        let event = session.messages_media(std::slice::from_ref(stored), "download", now);
        uow.append_events(&crate::traced([event])).await?;
        uow.commit().await?;
        Ok(true)
    }

    /// The object, when it is the tenant's.
    pub async fn owned(&self, tenant_id: Uuid, id: Uuid) -> Result<MediaObject, MediaUseError> {
        let object = self.store.find_media_object(id).await?.ok_or(MediaUseError::NotFound)?;
        if object.tenant_id != tenant_id {
            return Err(MediaUseError::NotFound);
        }
        Ok(object)
    }

    /// The object a URL anna signed points to, when the signature holds (local storage only:
    /// a bucket checks its own URLs).
    pub async fn signed_download(
        &self,
        id: Uuid,
        expires: i64,
        signature: &str,
    ) -> Result<(MediaObject, ObjectKey), MediaUseError> {
        if !self.storage.check_download_signature(id, expires, signature, OffsetDateTime::now_utc()) {
            return Err(MediaUseError::NotFound);
        }
        let object = self.store.find_media_object(id).await?.ok_or(MediaUseError::NotFound)?;
        let key = ObjectKey::stored(&object.object_key).ok_or(MediaUseError::NotFound)?;
        Ok((object, key))
    }

    /// The media of a page of messages, each of anna's objects with a fresh download URL (the
    /// predecessor's rows keep their own URL).
    pub async fn of_messages(
        &self,
        session_id: Uuid,
        message_ids: &[String],
    ) -> Result<Vec<(MessageMedia, Option<SignedUrl>)>, MediaUseError> {
        let media = self.store.list_message_media(session_id, message_ids).await?;
        let now = OffsetDateTime::now_utc();
        let mut shown = Vec::with_capacity(media.len());
        for item in media {
            let key = item.object_key.as_deref().and_then(ObjectKey::stored);
            let url = match (item.media_id, key) {
                (Some(id), Some(key)) => Some(self.storage.download_url(id, &key, now).await?),
                _ => None,
            };
            // A row whose object was purged meanwhile is not shown.
            if item.media_id.is_some() && url.is_none() {
                continue;
            }
            shown.push((item, url));
        }
        Ok(shown)
    }
}

/// The media id in a download URL anna handed out — `/media/{id}/content?…` (signed by anna)
/// or `…/tenants/{tenant}/media/{id}.{ext}?…` (presigned by a bucket) — so a client that sends
/// the URL `POST /media` answered sends that upload (the predecessor's two steps). Only a
/// candidate: the caller checks that the object is the tenant's, and fetches the URL otherwise.
pub fn own_media_id(url: &str) -> Option<Uuid> {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').collect();
    let at = segments.iter().rposition(|segment| *segment == "media")?;
    let next = segments.get(at + 1)?;
    let signed = url.contains("signature=") || url.contains("X-Amz-Signature=");
    let own = (segments.get(at + 2) == Some(&"content") && segments.len() == at + 3)
        || (at >= 2 && segments[at - 2] == "tenants" && segments.len() == at + 2);
    let id = next.get(..36).and_then(|id| Uuid::parse_str(id).ok())?;
    (own && signed).then_some(id)
}

/// `inline` for what browsers may show, `attachment` for documents, with the file name in
/// both the plain (ASCII, quotes escaped) and the RFC 5987 form.
pub fn content_disposition(kind: MediaKind, file_name: &str) -> String {
    let ascii: String = file_name
        .chars()
        .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' })
        .collect();
    let encoded: String = file_name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let disposition = if kind.shown_inline() { "inline" } else { "attachment" };
    format!("{disposition}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anna_recognises_its_own_download_urls() {
        let id = Uuid::now_v7();
        let tenant = Uuid::new_v4();
        for url in [
            format!("/media/{id}/content?expires=1&signature=ab"),
            format!("https://api.example.com/media/{id}/content?expires=1&signature=ab"),
            format!("http://127.0.0.1:9000/media/tenants/{tenant}/media/{id}.png?X-Amz-Signature=ab&X-Amz-Date=1"),
        ] {
            assert_eq!(own_media_id(&url), Some(id), "{url}");
        }
        for url in [
            format!("/media/{id}/content"),
            format!("https://cdn.example.com/media/{id}.png"),
            format!("https://example.com/media/{id}/other?signature=ab"),
            "https://example.com/photo.png".to_owned(),
        ] {
            assert_eq!(own_media_id(&url), None, "{url}");
        }
    }

    #[test]
    fn dispositions_cannot_be_broken_out_of() {
        assert_eq!(
            content_disposition(MediaKind::Document, "a\"b\\c ü.pdf"),
            "attachment; filename=\"a_b_c _.pdf\"; filename*=UTF-8''a%22b%5Cc%20%C3%BC.pdf"
        );
        assert!(content_disposition(MediaKind::Image, "x.jpg").starts_with("inline;"));
    }
}
