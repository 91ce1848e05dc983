//! The media store's conformance suite: every body runs on the local filesystem and on a real
//! S3-compatible server (s3s-fs on loopback, with signature checking on).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::Duration;

use anna_media::{MediaBackend, MediaError, MediaStorage, ObjectKey, S3Settings, StorageSettings};
use anna_testkit::s3::S3Server;
use bytes::Bytes;
use futures::TryStreamExt;
use time::OffsetDateTime;
use uuid::Uuid;

const SECRET: &[u8] = b"conformance-server-secret";

/// A store of each kind; the S3 server lives as long as the store is used.
enum Backend {
    Local(tempfile::TempDir),
    S3(S3Server),
}

impl Backend {
    fn settings(&self, url_ttl: Duration) -> StorageSettings {
        let backend = match self {
            Self::Local(dir) => MediaBackend::Local { dir: dir.path().join("media") },
            Self::S3(server) => MediaBackend::S3(s3_settings(server, &server.secret_key)),
        };
        StorageSettings { backend, url_ttl, base_url: String::new() }
    }
}

fn s3_settings(server: &S3Server, secret: &str) -> S3Settings {
    S3Settings {
        endpoint: Some(server.endpoint.clone()),
        region: server.region.clone(),
        bucket: server.bucket.clone(),
        access_key: server.access_key.clone(),
        secret_key: secret.to_owned().into(),
        force_path_style: true,
        public_endpoint: None,
        timeout: Duration::from_secs(10),
    }
}

async fn on_each_backend<F, Fut>(body: F)
where
    F: Fn(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    body(Backend::Local(dir)).await;
    body(Backend::S3(S3Server::start().await)).await;
}

fn key(name: &str) -> ObjectKey {
    let mime = match name.rsplit('.').next() {
        Some("png") => "image/png",
        Some("jpg") => "image/jpeg",
        Some("mp4") => "video/mp4",
        _ => "application/octet-stream",
    };
    ObjectKey::new(Uuid::new_v4(), Uuid::new_v4(), mime)
}

#[tokio::test]
async fn what_is_stored_reads_back_whole_and_within_limits() {
    on_each_backend(|backend| async move {
        let media = MediaStorage::open(&backend.settings(Duration::from_secs(60)), SECRET).expect("open");
        let small = key("note.txt");
        media.put_bytes(&small, Bytes::from_static(b"hello"), "text/plain", "attachment").await.expect("put");
        assert_eq!(media.read(&small, 5).await.expect("read").as_ref(), b"hello");
        assert!(matches!(media.read(&small, 4).await, Err(MediaError::TooLarge { limit: 4 })));

        // Larger than the multipart threshold: streamed from a file in parts.
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let big: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(file.path(), &big).expect("write");
        let large = key("video.mp4");
        media.put_file(&large, file.path(), "video/mp4", "inline").await.expect("put file");
        let (size, stream) = media.stream(&large).await.expect("stream");
        assert_eq!(size, big.len() as u64);
        let chunks: Vec<Bytes> = stream.try_collect().await.expect("chunks");
        assert!(chunks.concat() == big, "the object differs from the file");
    })
    .await;
}

#[tokio::test]
async fn deleted_objects_are_gone_and_deleting_twice_is_fine() {
    on_each_backend(|backend| async move {
        let media = MediaStorage::open(&backend.settings(Duration::from_secs(60)), SECRET).expect("open");
        let object = key("a.jpg");
        media.put_bytes(&object, Bytes::from_static(b"x"), "image/jpeg", "inline").await.expect("put");
        media.delete(&object).await.expect("delete");
        assert!(matches!(media.read(&object, 10).await, Err(MediaError::NotFound)));
        media.delete(&object).await.expect("second delete");
        assert!(matches!(media.read(&key("never.jpg"), 10).await, Err(MediaError::NotFound)));
    })
    .await;
}

#[tokio::test]
async fn download_urls_work_until_they_expire_and_only_as_signed() {
    on_each_backend(|backend| async move {
        let media = MediaStorage::open(&backend.settings(Duration::from_secs(120)), SECRET).expect("open");
        let object = key("photo.png");
        media.put_bytes(&object, Bytes::from_static(b"\x89PNG..."), "image/png", "inline").await.expect("put");
        let id = Uuid::new_v4();
        let now = OffsetDateTime::now_utc();
        let signed = media.download_url(id, &object, now).await.expect("sign");
        assert!(signed.expires_at > now && signed.expires_at <= now + Duration::from_secs(180));
        match &backend {
            Backend::S3(_) => {
                assert!(!media.serves_downloads());
                let client = reqwest::Client::new();
                let answer = client.get(&signed.url).send().await.expect("GET the signed URL");
                assert_eq!(answer.status(), 200);
                assert_eq!(answer.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("image/png"));
                assert_eq!(answer.bytes().await.expect("body").as_ref(), b"\x89PNG...");
                let tampered = signed.url.replace(".png", ".jpg");
                assert_eq!(client.get(&tampered).send().await.expect("GET").status(), 403);
                let unsigned = signed.url.split('?').next().unwrap_or_default().to_owned();
                assert_eq!(client.get(&unsigned).send().await.expect("GET").status(), 403);
            }
            Backend::Local(_) => {
                assert!(media.serves_downloads());
                let url = url::Url::parse(&format!("http://anna.test{}", signed.url)).expect("a URL");
                assert_eq!(url.path(), format!("/media/{id}/content"));
                let query: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
                let expires: i64 = query["expires"].parse().expect("expires");
                let signature = &query["signature"];
                assert!(media.check_download_signature(id, expires, signature, now));
                assert!(!media.check_download_signature(Uuid::new_v4(), expires, signature, now), "another object");
                assert!(!media.check_download_signature(id, expires - 60, signature, now), "another expiry");
                assert!(!media.check_download_signature(id, expires, "00", now));
                let later = OffsetDateTime::from_unix_timestamp(expires + 1).expect("time");
                assert!(!media.check_download_signature(id, expires, signature, later), "expired");
                let other_secret =
                    MediaStorage::open(&backend.settings(Duration::from_secs(120)), b"another").expect("open");
                assert!(!other_secret.check_download_signature(id, expires, signature, now));
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_bucket_refuses_expired_urls_and_wrong_credentials() {
    let server = S3Server::start().await;
    let settings = |secret: &str, ttl| StorageSettings {
        backend: MediaBackend::S3(s3_settings(&server, secret)),
        url_ttl: ttl,
        base_url: String::new(),
    };
    let media = MediaStorage::open(&settings(&server.secret_key, Duration::from_secs(1)), SECRET).expect("open");
    let object = key("voice.ogg");
    media.put_bytes(&object, Bytes::from_static(b"OggS"), "audio/ogg", "inline").await.expect("put");
    assert_eq!(std::fs::read(server.object_path(object.as_str())).expect("on disk"), b"OggS");
    let signed = media.download_url(Uuid::new_v4(), &object, OffsetDateTime::now_utc()).await.expect("sign");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let answer = reqwest::get(&signed.url).await.expect("GET");
    assert_eq!(answer.status(), 403, "an expired URL was served");

    let intruder = MediaStorage::open(&settings("not-the-secret", Duration::from_secs(60)), SECRET).expect("open");
    match intruder.read(&object, 100).await {
        Err(MediaError::Storage(_)) => {}
        other => panic!("wrong credentials read the object: {other:?}"),
    }
    let error =
        intruder.put_bytes(&key("x.bin"), Bytes::from_static(b"x"), "application/octet-stream", "attachment").await;
    assert!(matches!(error, Err(MediaError::Storage(_))), "{error:?}");
}
