//! Media objects (`media_objects`): what anna keeps in its media store, with the tenant and
//! session it belongs to; and the media of messages (`session_message_media`, the
//! predecessor's table), which names its object by `media_id`. The objects themselves are in
//! the media store (anna-media); rows here are written after the object is stored and deleted
//! after it is removed, so a row never names an object that was never written.

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::StoreError;
use crate::sql::{Row, Sql};
use crate::store::{SqlStore, SqlUnitOfWork};

/// An object in the media store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaObject {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub session_id: Uuid,
    pub object_key: String,
    /// `image`, `video`, `audio`, `document` or `sticker`.
    pub kind: String,
    /// The content type, checked against the content.
    pub mime: String,
    pub size: u64,
    /// The name people see.
    pub file_name: String,
    /// Base64 of the SHA-256 of the content.
    pub sha256: String,
    /// `upload` (POST /media) or `message` (a message's media).
    pub source: String,
    pub created_at: OffsetDateTime,
}

/// The media a message carries, as GET pages and `session.messages.media` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMedia {
    pub tenant_id: Uuid,
    pub session_id: Uuid,
    pub chat_jid: String,
    pub message_id: String,
    /// The object in anna's media store; `None` for a predecessor's row, whose `url` is a
    /// public URL of its own.
    pub media_id: Option<Uuid>,
    pub kind: String,
    pub mime: Option<String>,
    pub size: Option<u64>,
    pub file_name: Option<String>,
    /// `/media/<media_id>` (anna's rows: the route that hands out a signed URL), or the
    /// predecessor's public URL.
    pub url: String,
    pub sha256: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Seconds (audio, video).
    pub duration: Option<u32>,
    /// Where the object is in the media store (read from `media_objects`; ignored when
    /// writing).
    pub object_key: Option<String>,
}

#[async_trait]
pub trait MediaStore: Send + Sync {
    async fn find_media_object(&self, id: Uuid) -> Result<Option<MediaObject>, StoreError>;

    /// The media of these messages of the session.
    async fn list_message_media(
        &self,
        session_id: Uuid,
        message_ids: &[String],
    ) -> Result<Vec<MessageMedia>, StoreError>;

    /// Which of these objects have a row.
    async fn existing_media_ids(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError>;

    /// Objects of sessions that no longer exist (deleted sessions), oldest first.
    async fn orphaned_media(&self, limit: u32) -> Result<Vec<MediaObject>, StoreError>;

    /// Objects of the session created before `before`, oldest first.
    async fn media_older_than(
        &self,
        session_id: Uuid,
        before: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<MediaObject>, StoreError>;
}

#[async_trait]
pub trait MediaWrites: Send {
    /// Records an object just written to the media store.
    async fn insert_media_object(&mut self, object: &MediaObject) -> Result<(), StoreError>;

    /// Records what media messages carry (one row per message and kind; a repeat replaces it).
    async fn link_message_media(&mut self, media: &[MessageMedia]) -> Result<(), StoreError>;

    /// Forgets objects removed from the media store, and the message media naming them.
    async fn delete_media_objects(&mut self, ids: &[Uuid]) -> Result<u64, StoreError>;
}

/// `SELECT <the columns of a media object> FROM media_objects` and the rest of a query.
macro_rules! select_objects {
    ($($rest:expr),+) => {
        concat!(
            "SELECT id, tenant_id, session_id, object_key, kind, mime, size, file_name, sha256, source, created_at \
             FROM media_objects ",
            $($rest),+
        )
    };
}

#[async_trait]
impl MediaStore for SqlStore {
    async fn find_media_object(&self, id: Uuid) -> Result<Option<MediaObject>, StoreError> {
        let row = self.pool.query(select_objects!("WHERE id = $1")).bind_uuid(id).fetch_optional().await?;
        row.as_ref().map(object_from_row).transpose()
    }

    async fn list_message_media(
        &self,
        session_id: Uuid,
        message_ids: &[String],
    ) -> Result<Vec<MessageMedia>, StoreError> {
        if message_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .pool
            .query(Sql::PerBackend {
                sqlite: "SELECT m.tenant_id, m.session_id, m.chat_jid, m.message_id, m.media_id, m.kind, m.mime, m.size, \
                         m.file_name, m.url, m.sha256, m.width, m.height, m.duration, o.object_key \
                         FROM session_message_media m LEFT JOIN media_objects o ON o.id = m.media_id \
                         WHERE m.session_id = $1 AND m.message_id IN (SELECT value FROM json_each($2)) \
                         ORDER BY m.message_id, m.kind",
                postgres: "SELECT m.tenant_id, m.session_id, m.chat_jid, m.message_id, m.media_id, m.kind, m.mime, m.size, \
                           m.file_name, m.url, m.sha256, m.width, m.height, m.duration, o.object_key \
                           FROM session_message_media m LEFT JOIN media_objects o ON o.id = m.media_id \
                           WHERE m.session_id = $1 AND m.message_id = ANY($2) ORDER BY m.message_id, m.kind",
            })
            .bind_uuid(session_id)
            .bind_text_set(message_ids)
            .fetch_all()
            .await?;
        rows.iter().map(message_media_from_row).collect()
    }

    async fn existing_media_ids(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .pool
            .query(Sql::PerBackend {
                sqlite: "SELECT id FROM media_objects WHERE id IN (SELECT value FROM json_each($1))",
                postgres: "SELECT id FROM media_objects WHERE id = ANY($1)",
            })
            .bind_uuid_set(ids)
            .fetch_all()
            .await?;
        rows.iter().map(|row| row.uuid("id")).collect()
    }

    async fn orphaned_media(&self, limit: u32) -> Result<Vec<MediaObject>, StoreError> {
        let rows = self
            .pool
            .query(select_objects!(
                "WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = media_objects.session_id) \
                 ORDER BY created_at LIMIT $1"
            ))
            .bind(i64::from(limit))
            .fetch_all()
            .await?;
        rows.iter().map(object_from_row).collect()
    }

    async fn media_older_than(
        &self,
        session_id: Uuid,
        before: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<MediaObject>, StoreError> {
        let rows = self
            .pool
            .query(select_objects!("WHERE session_id = $1 AND created_at < $2 ORDER BY created_at LIMIT $3"))
            .bind_uuid(session_id)
            .bind_time(before)
            .bind(i64::from(limit))
            .fetch_all()
            .await?;
        rows.iter().map(object_from_row).collect()
    }
}

#[async_trait]
impl MediaWrites for SqlUnitOfWork {
    async fn insert_media_object(&mut self, object: &MediaObject) -> Result<(), StoreError> {
        self.check_fence(object.session_id).await?;
        self.tx
            .query(
                "INSERT INTO media_objects (id, tenant_id, session_id, object_key, kind, mime, size, file_name, \
                 sha256, source, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind_uuid(object.id)
            .bind_uuid(object.tenant_id)
            .bind_uuid(object.session_id)
            .bind(object.object_key.as_str())
            .bind(object.kind.as_str())
            .bind(object.mime.as_str())
            .bind(i64::try_from(object.size).unwrap_or(i64::MAX))
            .bind(object.file_name.as_str())
            .bind(object.sha256.as_str())
            .bind(object.source.as_str())
            .bind_time(object.created_at)
            .execute()
            .await?;
        Ok(())
    }

    async fn link_message_media(&mut self, media: &[MessageMedia]) -> Result<(), StoreError> {
        let now = OffsetDateTime::now_utc();
        for item in media {
            let small = |value: Option<u32>| value.map(|v| i32::try_from(v).unwrap_or(i32::MAX));
            self.tx
                .query(
                    "INSERT INTO session_message_media (id, tenant_id, session_id, chat_jid, message_id, media_id, \
                     kind, mime, size, file_name, url, sha256, width, height, duration, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $16) \
                     ON CONFLICT (session_id, message_id, kind) DO UPDATE SET media_id = excluded.media_id, \
                     mime = excluded.mime, size = excluded.size, file_name = excluded.file_name, url = excluded.url, \
                     sha256 = excluded.sha256, width = excluded.width, height = excluded.height, \
                     duration = excluded.duration, updated_at = excluded.updated_at",
                )
                .bind_uuid(Uuid::now_v7())
                .bind_uuid(item.tenant_id)
                .bind_uuid(item.session_id)
                .bind(item.chat_jid.as_str())
                .bind(item.message_id.as_str())
                .bind_opt_uuid(item.media_id)
                .bind(item.kind.as_str())
                .bind(item.mime.as_deref())
                .bind(item.size.map(|size| i64::try_from(size).unwrap_or(i64::MAX)))
                .bind(item.file_name.as_deref())
                .bind(item.url.as_str())
                .bind(item.sha256.as_deref())
                .bind(small(item.width))
                .bind(small(item.height))
                .bind(small(item.duration))
                .bind_time(now)
                .execute()
                .await?;
        }
        Ok(())
    }

    async fn delete_media_objects(&mut self, ids: &[Uuid]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.tx
            .query(Sql::PerBackend {
                sqlite: "DELETE FROM session_message_media WHERE media_id IN (SELECT value FROM json_each($1))",
                postgres: "DELETE FROM session_message_media WHERE media_id = ANY($1)",
            })
            .bind_uuid_set(ids)
            .execute()
            .await?;
        let deleted = self
            .tx
            .query(Sql::PerBackend {
                sqlite: "DELETE FROM media_objects WHERE id IN (SELECT value FROM json_each($1))",
                postgres: "DELETE FROM media_objects WHERE id = ANY($1)",
            })
            .bind_uuid_set(ids)
            .execute()
            .await?;
        Ok(deleted)
    }
}

fn object_from_row(row: &Row) -> Result<MediaObject, StoreError> {
    let size: i64 = row.get("size")?;
    Ok(MediaObject {
        id: row.uuid("id")?,
        tenant_id: row.uuid("tenant_id")?,
        session_id: row.uuid("session_id")?,
        object_key: row.get("object_key")?,
        kind: row.get("kind")?,
        mime: row.get("mime")?,
        size: u64::try_from(size).unwrap_or(0),
        file_name: row.get("file_name")?,
        sha256: row.get("sha256")?,
        source: row.get("source")?,
        created_at: row.time("created_at")?,
    })
}

fn message_media_from_row(row: &Row) -> Result<MessageMedia, StoreError> {
    let small = |column: &str| -> Result<Option<u32>, StoreError> {
        Ok(row.get::<Option<i32>>(column)?.and_then(|v| u32::try_from(v).ok()))
    };
    let media_id: Option<String> = match row {
        Row::Sqlite(_) => row.get("media_id")?,
        Row::Postgres(_) => row.get::<Option<Uuid>>("media_id")?.map(|id| id.to_string()),
    };
    Ok(MessageMedia {
        tenant_id: row.uuid("tenant_id")?,
        session_id: row.uuid("session_id")?,
        chat_jid: row.get("chat_jid")?,
        message_id: row.get("message_id")?,
        media_id: media_id
            .map(|id| Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(format!("media_id {id:?}: {e}"))))
            .transpose()?,
        kind: row.get("kind")?,
        mime: row.get("mime")?,
        size: row.get::<Option<i64>>("size")?.and_then(|v| u64::try_from(v).ok()),
        file_name: row.get("file_name")?,
        url: row.get("url")?,
        sha256: row.get("sha256")?,
        width: small("width")?,
        height: small("height")?,
        duration: small("duration")?,
        object_key: row.get("object_key")?,
    })
}
