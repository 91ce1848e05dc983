//! The media store: one [`ObjectStore`] (a directory or a bucket) and the way download URLs
//! are signed for it.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anna_domain::secrets::{SecretHasher, hashes_equal};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{Attribute, Attributes, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::{MediaError, ObjectKey};

/// Where media objects are kept.
#[derive(Debug, Clone)]
pub enum MediaBackend {
    /// A directory of this machine (the embedded shape; several processes need it shared).
    Local { dir: PathBuf },
    /// An S3-compatible bucket.
    S3(S3Settings),
}

/// An S3-compatible bucket (AWS, MinIO, R2, …): the predecessor's `S3_*` settings.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// `https://host[:port]`; unset: AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: SecretString,
    /// `<endpoint>/<bucket>/<key>` instead of `<bucket>.<endpoint host>/<key>`.
    pub force_path_style: bool,
    /// The endpoint as clients reach it, when it differs from the one anna uses (a bucket on a
    /// private network behind a public name): download URLs are signed for it.
    pub public_endpoint: Option<String>,
    /// Longest wait for one request to the bucket.
    pub timeout: Duration,
}

/// How media is stored and handed out.
#[derive(Debug, Clone)]
pub struct StorageSettings {
    pub backend: MediaBackend,
    /// Validity of a download URL.
    pub url_ttl: Duration,
    /// Prefix of the download URLs anna serves itself (local backend), such as
    /// `https://api.example.com`; empty: URLs relative to the API's own address.
    pub base_url: String,
}

/// A download URL and when it stops working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedUrl {
    pub url: String,
    pub expires_at: OffsetDateTime,
}

enum UrlSigner {
    /// The bucket signs (S3 presigned URLs, checked by the bucket).
    Bucket(Box<AmazonS3>),
    /// anna signs, and serves the object itself at `/media/{id}/content`.
    Anna { hasher: SecretHasher, base_url: String },
}

/// The media store.
pub struct MediaStorage {
    objects: Arc<dyn ObjectStore>,
    signer: UrlSigner,
    url_ttl: Duration,
    /// Object attributes (content type, disposition) are kept by buckets only; anna serves
    /// local files with the type recorded in the database.
    keeps_attributes: bool,
}

impl std::fmt::Debug for MediaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaStorage").field("objects", &self.objects.to_string()).finish_non_exhaustive()
    }
}

/// How URLs anna signs name their purpose in the keyed hash.
const URL_PURPOSE: &str = "media-download";
/// Bytes read from a file per write into the store.
const CHUNK: usize = 256 * 1024;
/// Bytes buffered before an upload to a bucket turns into a multipart upload.
const MULTIPART_THRESHOLD: usize = 8 * 1024 * 1024;

impl MediaStorage {
    /// Opens the store. `server_secret` keys the URLs anna signs itself (the local backend).
    pub fn open(settings: &StorageSettings, server_secret: &[u8]) -> Result<Self, MediaError> {
        let url_ttl = settings.url_ttl;
        match &settings.backend {
            MediaBackend::Local { dir } => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| MediaError::Settings(format!("cannot create {}: {e}", dir.display())))?;
                let store = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| MediaError::Settings(format!("{}: {e}", dir.display())))?
                    .with_automatic_cleanup(true);
                Ok(Self {
                    objects: Arc::new(store),
                    signer: UrlSigner::Anna {
                        hasher: SecretHasher::from_server_secret(server_secret),
                        base_url: settings.base_url.trim_end_matches('/').to_owned(),
                    },
                    url_ttl,
                    keeps_attributes: false,
                })
            }
            MediaBackend::S3(s3) => {
                let bucket = s3_client(s3, s3.endpoint.as_deref())?;
                let signer = match &s3.public_endpoint {
                    Some(public) => s3_client(s3, Some(public))?,
                    None => bucket.clone(),
                };
                Ok(Self {
                    objects: Arc::new(bucket),
                    signer: UrlSigner::Bucket(Box::new(signer)),
                    url_ttl,
                    keeps_attributes: true,
                })
            }
        }
    }

    /// Whether anna serves downloads itself (`/media/{id}/content`), or the bucket does.
    pub fn serves_downloads(&self) -> bool {
        matches!(self.signer, UrlSigner::Anna { .. })
    }

    /// Stores the file at `file` under `key`, streamed (a large file is never in memory).
    pub async fn put_file(
        &self,
        key: &ObjectKey,
        file: &FsPath,
        mime: &str,
        disposition: &str,
    ) -> Result<(), MediaError> {
        let mut source = tokio::fs::File::open(file).await.map_err(|e| MediaError::Storage(e.to_string()))?;
        let mut writer = self.writer(key, mime, disposition);
        let mut chunk = vec![0u8; CHUNK];
        loop {
            let read = match source.read(&mut chunk).await {
                Ok(read) => read,
                Err(error) => {
                    let _ = writer.abort().await;
                    return Err(MediaError::Storage(error.to_string()));
                }
            };
            if read == 0 {
                break;
            }
            if let Err(error) = writer.write_all(&chunk[..read]).await {
                let _ = writer.abort().await;
                return Err(MediaError::Storage(error.to_string()));
            }
        }
        writer.shutdown().await.map_err(|e| MediaError::Storage(e.to_string()))
    }

    /// Stores `bytes` under `key`.
    pub async fn put_bytes(
        &self,
        key: &ObjectKey,
        bytes: Bytes,
        mime: &str,
        disposition: &str,
    ) -> Result<(), MediaError> {
        let mut writer = self.writer(key, mime, disposition);
        if let Err(error) = writer.write_all(&bytes).await {
            let _ = writer.abort().await;
            return Err(MediaError::Storage(error.to_string()));
        }
        writer.shutdown().await.map_err(|e| MediaError::Storage(e.to_string()))
    }

    fn writer(&self, key: &ObjectKey, mime: &str, disposition: &str) -> BufWriter {
        let writer = BufWriter::with_capacity(Arc::clone(&self.objects), path(key), MULTIPART_THRESHOLD);
        if !self.keeps_attributes {
            return writer;
        }
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, mime.to_owned().into());
        attributes.insert(Attribute::ContentDisposition, disposition.to_owned().into());
        attributes.insert(Attribute::CacheControl, "private, max-age=300".into());
        writer.with_attributes(attributes)
    }

    /// The whole object, refused when it is larger than `limit` bytes (nothing read then).
    pub async fn read(&self, key: &ObjectKey, limit: u64) -> Result<Bytes, MediaError> {
        let found = self.objects.get(&path(key)).await?;
        if found.meta.size > limit {
            return Err(MediaError::TooLarge { limit });
        }
        Ok(found.bytes().await?)
    }

    /// The object as a stream of chunks, with its size (for anna's own download route).
    pub async fn stream(
        &self,
        key: &ObjectKey,
    ) -> Result<(u64, BoxStream<'static, Result<Bytes, MediaError>>), MediaError> {
        let found = self.objects.get(&path(key)).await?;
        let size = found.meta.size;
        Ok((size, found.into_stream().map_err(MediaError::from).boxed()))
    }

    /// Removes the object; one already gone is not an error.
    pub async fn delete(&self, key: &ObjectKey) -> Result<(), MediaError> {
        match self.objects.delete(&path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(other) => Err(other.into()),
        }
    }

    /// Up to `limit` objects anna made (`tenants/<tenant>/media/<id>.<ext>`) last written
    /// before `before`, with their media ids, in the store's listing order: the candidates of a
    /// sweep for objects whose row was never written (a crash between the two).
    pub async fn objects_written_before(
        &self,
        before: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<(ObjectKey, Uuid)>, MediaError> {
        let mut listing = self.objects.list(Some(&Path::from("tenants")));
        let mut found = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            let written = OffsetDateTime::from_unix_timestamp(meta.last_modified.timestamp()).unwrap_or(before);
            if written >= before {
                continue;
            }
            let Some(key) = ObjectKey::stored(meta.location.as_ref()) else { continue };
            let id =
                key.as_str().rsplit('/').next().and_then(|name| name.get(..36)).and_then(|id| Uuid::parse_str(id).ok());
            if let Some(id) = id {
                found.push((key, id));
                if found.len() >= limit {
                    break;
                }
            }
        }
        Ok(found)
    }

    /// A URL that downloads the object for [`StorageSettings::url_ttl`] and no longer.
    /// Expiry is rounded up to the minute, so pages read within a minute get the same URLs
    /// (and browsers their cached copies) from anna's signer.
    pub async fn download_url(
        &self,
        media_id: Uuid,
        key: &ObjectKey,
        now: OffsetDateTime,
    ) -> Result<SignedUrl, MediaError> {
        match &self.signer {
            UrlSigner::Bucket(bucket) => {
                let url = bucket.signed_url(http::Method::GET, &path(key), self.url_ttl).await?;
                Ok(SignedUrl { url: url.to_string(), expires_at: now + self.url_ttl })
            }
            UrlSigner::Anna { hasher, base_url } => {
                let expires = (now + self.url_ttl).unix_timestamp();
                let expires = expires + (60 - expires.rem_euclid(60)) % 60;
                let signature = hasher.hash(URL_PURPOSE, &media_id.to_string(), &expires.to_string());
                Ok(SignedUrl {
                    url: format!("{base_url}/media/{media_id}/content?expires={expires}&signature={signature}"),
                    expires_at: OffsetDateTime::from_unix_timestamp(expires).unwrap_or(now),
                })
            }
        }
    }

    /// Whether a URL anna signed for `media_id` is genuine and still valid. Always false for
    /// bucket storage (the bucket checks its own URLs).
    pub fn check_download_signature(&self, media_id: Uuid, expires: i64, signature: &str, now: OffsetDateTime) -> bool {
        let UrlSigner::Anna { hasher, .. } = &self.signer else { return false };
        let longest = now.unix_timestamp() + self.url_ttl.as_secs() as i64 + 60;
        if expires < now.unix_timestamp() || expires > longest {
            return false;
        }
        hashes_equal(&hasher.hash(URL_PURPOSE, &media_id.to_string(), &expires.to_string()), signature)
    }
}

fn path(key: &ObjectKey) -> Path {
    Path::from(key.as_str())
}

/// A client of the bucket at `endpoint` (virtual-hosted unless path style is forced).
fn s3_client(s3: &S3Settings, endpoint: Option<&str>) -> Result<AmazonS3, MediaError> {
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&s3.bucket)
        .with_region(&s3.region)
        .with_access_key_id(&s3.access_key)
        .with_secret_access_key(s3.secret_key.expose_secret())
        .with_retry(RetryConfig { max_retries: 3, retry_timeout: s3.timeout, ..RetryConfig::default() })
        .with_client_options(
            ClientOptions::new().with_timeout(s3.timeout).with_connect_timeout(Duration::from_secs(5)),
        );
    if let Some(endpoint) = endpoint {
        let endpoint = endpoint.trim_end_matches('/');
        let parsed = url::Url::parse(endpoint)
            .map_err(|e| MediaError::Settings(format!("the S3 endpoint is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(MediaError::Settings("the S3 endpoint must be an http:// or https:// URL".into()));
        }
        builder = builder.with_allow_http(parsed.scheme() == "http");
        builder = if s3.force_path_style {
            builder.with_endpoint(endpoint).with_virtual_hosted_style_request(false)
        } else {
            let mut virtual_host = parsed.clone();
            let host = format!("{}.{}", s3.bucket, parsed.host_str().unwrap_or_default());
            virtual_host
                .set_host(Some(&host))
                .map_err(|e| MediaError::Settings(format!("the bucket cannot be a host name: {e}")))?;
            builder.with_endpoint(virtual_host.as_str().trim_end_matches('/')).with_virtual_hosted_style_request(true)
        };
    }
    builder.build().map_err(|e| MediaError::Settings(e.to_string()))
}
