//! Media objects and the media of messages.

use anna_domain::Session;
use anna_store::{MediaObject, MessageMedia};

use super::*;
use crate::sessions::insert_user;

conformance!(media_objects_are_recorded_linked_and_forgotten, media_of_deleted_sessions_and_old_media_are_found);

fn object(session: &Session, at: OffsetDateTime, source: &str) -> MediaObject {
    let id = Uuid::new_v4();
    MediaObject {
        id,
        tenant_id: session.tenant_id,
        session_id: session.id,
        object_key: format!("tenants/{}/media/{id}.jpg", session.tenant_id),
        kind: "image".into(),
        mime: "image/jpeg".into(),
        size: 5_000_000_000,
        file_name: "Straße 1.jpg".into(),
        sha256: "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into(),
        source: source.into(),
        created_at: at,
    }
}

fn message_media(object: &MediaObject, message_id: &str) -> MessageMedia {
    MessageMedia {
        tenant_id: object.tenant_id,
        session_id: object.session_id,
        chat_jid: "491111@s.whatsapp.net".into(),
        message_id: message_id.into(),
        media_id: Some(object.id),
        kind: object.kind.clone(),
        mime: Some(object.mime.clone()),
        size: Some(object.size),
        file_name: Some(object.file_name.clone()),
        url: format!("/media/{}", object.id),
        sha256: Some(object.sha256.clone()),
        width: Some(1280),
        height: Some(720),
        duration: None,
        object_key: Some(object.object_key.clone()),
    }
}

async fn session_of(store: &Arc<dyn Store>, email: &str) -> Result<Session, StoreError> {
    let tenant = insert_user(store, email).await?;
    let (session, _) = Session::create(Uuid::new_v4(), tenant, now());
    let mut uow = store.begin().await?;
    uow.insert_session(&session).await?;
    uow.commit().await?;
    Ok(session)
}

async fn media_objects_are_recorded_linked_and_forgotten(store: Arc<dyn Store>) -> TestResult {
    let session = session_of(&store, "media1@example.com").await?;
    let upload = object(&session, now(), "upload");
    let mut uow = store.begin().await?;
    uow.insert_media_object(&upload).await?;
    uow.commit().await?;
    assert_eq!(store.find_media_object(upload.id).await?, Some(upload.clone()));
    assert_eq!(store.find_media_object(Uuid::new_v4()).await?, None);

    // One key, one object.
    let mut uow = store.begin().await?;
    let twin = MediaObject { id: Uuid::new_v4(), ..upload.clone() };
    assert!(uow.insert_media_object(&twin).await.is_err(), "two rows for one object key");
    drop(uow);

    // The same upload sent twice: two messages show it; a repeat of a link replaces it.
    let mut uow = store.begin().await?;
    uow.link_message_media(&[message_media(&upload, "out-1"), message_media(&upload, "out-2")]).await?;
    let mut replaced = message_media(&upload, "out-2");
    replaced.width = Some(640);
    uow.link_message_media(&[replaced.clone()]).await?;
    uow.commit().await?;
    let ids = ["out-1".to_owned(), "out-2".to_owned(), "text-only".to_owned()];
    let shown = store.list_message_media(session.id, &ids).await?;
    assert_eq!(shown, vec![message_media(&upload, "out-1"), replaced]);
    assert_eq!(store.list_message_media(Uuid::new_v4(), &ids).await?, vec![]);
    assert_eq!(store.list_message_media(session.id, &[]).await?, vec![]);

    let mut uow = store.begin().await?;
    assert_eq!(uow.delete_media_objects(&[upload.id]).await?, 1);
    uow.commit().await?;
    assert_eq!(store.find_media_object(upload.id).await?, None);
    assert_eq!(store.list_message_media(session.id, &ids).await?, vec![], "message media of a deleted object");
    Ok(())
}

async fn media_of_deleted_sessions_and_old_media_are_found(store: Arc<dyn Store>) -> TestResult {
    let kept = session_of(&store, "media2@example.com").await?;
    let deleted = session_of(&store, "media3@example.com").await?;
    let t = now();
    let old = object(&kept, t - Duration::days(40), "message");
    let older = object(&kept, t - Duration::days(41), "upload");
    let recent = object(&kept, t - Duration::days(1), "message");
    let orphan = object(&deleted, t, "upload");
    let neighbour = session_of(&store, "media4@example.com").await?;
    let neighbours_old = object(&neighbour, t - Duration::days(50), "message");
    let mut uow = store.begin().await?;
    for item in [&old, &older, &recent, &orphan, &neighbours_old] {
        uow.insert_media_object(item).await?;
    }
    uow.commit().await?;
    let mut uow = store.begin().await?;
    uow.delete_session(deleted.id).await?;
    uow.commit().await?;

    assert_eq!(store.orphaned_media(10).await?, vec![orphan]);
    let expired = store.media_older_than(kept.id, t - Duration::days(30), 10).await?;
    assert_eq!(expired, vec![older.clone(), old]);
    assert_eq!(store.media_older_than(kept.id, t - Duration::days(30), 1).await?, vec![older]);
    Ok(())
}
