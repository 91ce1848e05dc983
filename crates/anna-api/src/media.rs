//! `/media`: files a tenant uploads to send (`POST /media`, multipart), and the download of any
//! object anna keeps — uploads and the media of received messages. Objects are private: `GET
//! /media/{id}` (with the bearer token) answers with a redirect to a short-lived signed URL,
//! which a browser can also use directly (an `<img src>`). With local storage, anna serves that
//! URL itself (`/media/{id}/content?expires=…&signature=…`); with a bucket, the bucket does.

use anna_domain::user::iso;
use anna_media::{MediaError, MediaKind, Staging};
use anna_usecases::media::content_disposition;
use anna_usecases::{MediaUseError, MediaView, Upload};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiPath, AuthUser, parse_uuid};
use crate::idempotency;
use crate::state::AppState;

/// The upload route's own body limit replaces the API's (`HTTP_MAX_BODY_BYTES`): the file is
/// checked against `MEDIA_MAX_UPLOAD_BYTES` as it arrives.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(upload))
        .layer(DefaultBodyLimit::disable())
        .merge(OpenApiRouter::new().routes(routes!(find)).routes(routes!(content)))
}

/// Whether a request is a media upload, which has limits of its own (body size, time to
/// send it).
pub fn is_upload(method: &axum::http::Method, path: &str) -> bool {
    method == axum::http::Method::POST && path == "/media"
}

/// Room for the multipart framing and the small fields around the file.
pub const MULTIPART_OVERHEAD: u64 = 64 * 1024;
/// Longest value of a text field of the form (`kind`, `sessionId`).
const MAX_FIELD_BYTES: usize = 256;
/// Fields a form may have; more is not a client anna knows.
const MAX_FIELDS: usize = 8;

/// A stored object as clients see it (the predecessor's `{kind, url, mime, fileName, size}`,
/// plus its id, checksum and when the URL stops working).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaInfo {
    /// Send it with `media: {"kind": …, "id": …}`; download it with `GET /media/{id}`.
    pub id: String,
    pub kind: String,
    /// A signed download URL, valid until `urlExpiresAt` (`MEDIA_URL_TTL_MS`).
    pub url: String,
    pub url_expires_at: String,
    /// The content type, found from the content.
    pub mime: String,
    pub file_name: String,
    pub size: u64,
    /// Base64 of the SHA-256 of the content.
    pub sha256: String,
    pub created_at: String,
}

impl From<&MediaView> for MediaInfo {
    fn from(view: &MediaView) -> Self {
        Self {
            id: view.object.id.to_string(),
            kind: view.object.kind.clone(),
            url: view.download.url.clone(),
            url_expires_at: iso(view.download.expires_at),
            mime: view.object.mime.clone(),
            file_name: view.object.file_name.clone(),
            size: view.object.size,
            sha256: view.object.sha256.clone(),
            created_at: iso(view.object.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadResponse {
    pub session_id: String,
    pub media: MediaInfo,
}

/// The multipart form of `POST /media` (documentation only: the handler reads the parts as
/// they arrive).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// The file; its content decides its type, whatever it is called.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// `image`, `video`, `audio`, `document` or `sticker`.
    kind: String,
    /// The session it is for; default: the first connected one, else the newest.
    #[schema(nullable = false)]
    session_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UploadQuery {
    session_id: Option<String>,
}

impl From<MediaUseError> for ApiError {
    fn from(error: MediaUseError) -> Self {
        let message = error.to_string();
        match error {
            MediaUseError::NoSession => Self::not_found("session_not_found", "session not found"),
            MediaUseError::NotFound => Self::not_found("media_not_found", "media not found"),
            MediaUseError::WrongContent(_) => Self::bad_request("invalid_file", message),
            MediaUseError::Unavailable(cause) => Self::unavailable(cause),
            MediaUseError::Failed(failure) => failure.into(),
        }
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "file_too_large", format!("file is too large (at most {limit} bytes)"))
}

fn form_error(error: axum::extract::multipart::MultipartError, limit: u64) -> ApiError {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return too_large(limit);
    }
    ApiError::bad_request("invalid_form", format!("the multipart form cannot be read: {}", error.body_text()))
}

/// Upload a file to send later (multipart: `file`, `kind`, `sessionId`). The content is
/// checked against the kind (an image must be JPEG, PNG or WebP, whatever its name or declared
/// type); larger than `MEDIA_MAX_UPLOAD_BYTES` is a 413.
#[utoipa::path(post, path = "/media", tag = "media", security(("bearer" = [])),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    params(("sessionId" = Option<String>, Query, description = "the session, if not in the form"),
        ("Idempotency-Key" = Option<String>, Header, description = "repeats of a request with this key get the first answer")),
    responses((status = 201, body = UploadResponse),
        (status = 400, description = "kind or file missing, the file is not what its kind says, not a multipart form", body = ErrorBody),
        (status = 404, description = "no session", body = ErrorBody),
        (status = 413, description = "larger than MEDIA_MAX_UPLOAD_BYTES", body = ErrorBody),
        (status = 503, description = "the media store is unavailable", body = ErrorBody)))]
async fn upload(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    headers: HeaderMap,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|_| ApiError::bad_request("invalid_query", "the query string is not valid"))?;
    let mut form = form.map_err(|_| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be multipart/form-data",
        )
    })?;
    let Ok(_receiving) = state.uploads.clone().try_acquire_owned() else {
        let mut busy =
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "too many uploads at once; retry in a moment");
        busy.retry_after_secs = Some(1);
        return Err(busy);
    };
    let limit = state.config.media_max_upload_bytes;
    // A refused upload's unread rest is read by the body-limit middleware after this answers.
    let (kind, session, file) = read_form(&mut form, limit, query.session_id).await?;
    let kind = kind.as_deref().and_then(MediaKind::parse).ok_or_else(|| {
        ApiError::bad_request("invalid_kind", "kind is required (image|video|audio|document|sticker)")
    })?;
    let Some((staged, file_name, declared_mime)) = file else {
        return Err(ApiError::bad_request("missing_file", "file is required"));
    };
    let requested = session.as_deref().filter(|s| !s.is_empty()).map(|s| parse_uuid(s, "sessionId")).transpose()?;
    let key = idempotency::key(&headers)?;
    let scope = format!("POST /media {}", caller.user_id);
    let fingerprint = json!([requested, kind.as_str(), staged.sha256, staged.size, file_name]).to_string();
    let upload = Upload { kind, file: staged, file_name, declared_mime };
    Ok(idempotency::once(&state, &scope, key, &fingerprint, || async {
        let (session_id, view) = state.media.upload(caller.user_id, requested, upload).await?;
        let body = UploadResponse { session_id: session_id.to_string(), media: MediaInfo::from(&view) };
        Ok((StatusCode::CREATED, json!(body)))
    })
    .await)
}

/// The fields of an upload form: kind, session, and the file staged with its name and declared type.
type FormParts = (Option<String>, Option<String>, Option<(anna_media::StagedFile, Option<String>, Option<String>)>);

/// Reads the form's fields as they arrive, the file staged to a temporary file.
async fn read_form(form: &mut Multipart, limit: u64, session: Option<String>) -> Result<FormParts, ApiError> {
    let (mut kind, mut session, mut file) = (None, session, None);
    let mut fields = 0;
    while let Some(mut field) = form.next_field().await.map_err(|e| form_error(e, limit))? {
        fields += 1;
        if fields > MAX_FIELDS {
            return Err(ApiError::bad_request("invalid_form", format!("the form has more than {MAX_FIELDS} fields")));
        }
        match field.name().unwrap_or_default() {
            "file" if file.is_none() => {
                let file_name = field.file_name().map(str::to_owned);
                let declared_mime = field.content_type().map(str::to_owned);
                let mut staging = Staging::new(limit).await.map_err(ApiError::unavailable)?;
                while let Some(chunk) = field.chunk().await.map_err(|e| form_error(e, limit))? {
                    staging.write(&chunk).await.map_err(|error| match error {
                        MediaError::TooLarge { limit } => too_large(limit),
                        other => ApiError::unavailable(other),
                    })?;
                }
                let staged = staging.finish().await.map_err(ApiError::unavailable)?;
                file = Some((staged, file_name, declared_mime));
            }
            "kind" => kind = Some(small_field(field).await?),
            "sessionId" => session = Some(small_field(field).await?),
            "file" => return Err(ApiError::bad_request("invalid_form", "send one file per upload")),
            // Other fields are read and forgotten, within the limits.
            _ => drop(small_field(field).await?),
        }
    }
    Ok((kind, session, file))
}

/// A text field of the form, at most [`MAX_FIELD_BYTES`].
async fn small_field(mut field: axum::extract::multipart::Field<'_>) -> Result<String, ApiError> {
    let name = field.name().unwrap_or("a field").to_owned();
    let mut value = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| form_error(e, 0))? {
        value.extend_from_slice(&chunk);
        if value.len() > MAX_FIELD_BYTES {
            return Err(ApiError::bad_request(
                "invalid_form",
                format!("{name} is longer than {MAX_FIELD_BYTES} bytes"),
            ));
        }
    }
    String::from_utf8(value).map_err(|_| ApiError::bad_request("invalid_form", format!("{name} is not UTF-8 text")))
}

/// Download one of your media objects: a redirect (302) to a signed URL valid for
/// `MEDIA_URL_TTL_MS`.
#[utoipa::path(get, path = "/media/{id}", tag = "media", security(("bearer" = [])),
    params(("id" = String, Path, description = "the media id")),
    responses((status = 302, description = "Location: the signed download URL"),
        (status = 400, body = ErrorBody), (status = 404, description = "no such media of yours", body = ErrorBody)))]
async fn find(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = parse_uuid(&id, "id")?;
    let view = state.media.find(caller.user_id, id).await?;
    let location = HeaderValue::from_str(&view.download.url).map_err(ApiError::internal)?;
    Ok((StatusCode::FOUND, [(header::LOCATION, location)]).into_response())
}

#[derive(Debug, Deserialize)]
struct SignedQuery {
    expires: Option<String>,
    signature: Option<String>,
}

/// The content of a media object, through a URL anna signed (local storage). No token: the
/// signature is the permission, and it expires. A wrong, expired or missing signature is a 404.
#[utoipa::path(get, path = "/media/{id}/content", tag = "media",
    params(("id" = String, Path, description = "the media id"),
        ("expires" = i64, Query, description = "from the signed URL"),
        ("signature" = String, Query, description = "from the signed URL")),
    responses((status = 200, description = "the file", content_type = "application/octet-stream"),
        (status = 404, description = "no such media, or the URL is not valid (any more)", body = ErrorBody)))]
async fn content(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    query: Result<Query<SignedQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found("media_not_found", "media not found");
    let id = uuid::Uuid::parse_str(&id).map_err(|_| not_found())?;
    let Ok(Query(query)) = query else { return Err(not_found()) };
    let expires = query.expires.and_then(|e| e.parse::<i64>().ok()).ok_or_else(not_found)?;
    let signature = query.signature.filter(|s| s.len() <= 128).ok_or_else(not_found)?;
    let (object, key) = state.media.signed_download(id, expires, &signature).await?;
    let (size, stream) = state.media.storage().stream(&key).await.map_err(MediaUseError::from)?;
    let kind = MediaKind::parse(&object.kind).unwrap_or(MediaKind::Document);
    let mime = if kind.shown_inline() { object.mime.as_str() } else { "application/octet-stream" };
    let mut response = Body::from_stream(stream.map(|chunk| chunk.map_err(std::io::Error::other))).into_response();
    let headers = response.headers_mut();
    let value = |text: &str| {
        HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
    };
    headers.insert(header::CONTENT_TYPE, value(mime));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(disposition) = HeaderValue::from_str(&content_disposition(kind, &object.file_name)) {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=300"));
    Ok(response)
}
