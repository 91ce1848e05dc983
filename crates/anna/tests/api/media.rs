//! Media over REST: uploads checked for what they are, downloads only through signed URLs, for
//! the tenant only — on the local filesystem (SQLite shape) and on a real S3-compatible server
//! started by the test (Postgres shape).

use anna_testkit::s3::S3Server;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::sessions::{connected_session, tenant};

/// A 1×1 PNG.
pub(crate) const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89\0\0\0\rIDATx\x9cc\xf8\xff\xff?\0\x05\xfe\x02\xfe\xa7\x35\x81\x84\0\0\0\0IEND\xaeB`\x82";

/// One part of a multipart form: name, file name, content type, content.
pub(crate) type Part<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

/// A `multipart/form-data` body, written out by hand so tests control every byte.
pub(crate) fn form(parts: &[Part<'_>]) -> (String, Vec<u8>) {
    let boundary = "anna-test-boundary-7d9f";
    let mut body = Vec::new();
    for (name, file_name, content_type, content) in parts {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes());
        if let Some(file_name) = file_name {
            body.extend_from_slice(format!("; filename=\"{file_name}\"").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        if let Some(content_type) = content_type {
            body.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub(crate) async fn upload(app: &TestApp, token: &str, parts: &[Part<'_>]) -> Reply {
    let (content_type, body) = form(parts);
    app.post("/media").bearer(token).raw(&content_type, body).send().await
}

/// The S3 settings of a test server.
pub(crate) fn s3_vars(server: &S3Server) -> Vec<(&'static str, String)> {
    vec![
        ("S3_ENDPOINT", server.endpoint.clone()),
        ("S3_BUCKET", server.bucket.clone()),
        ("S3_ACCESS_KEY", server.access_key.clone()),
        ("S3_SECRET_KEY", server.secret_key.clone()),
        ("S3_REGION", server.region.clone()),
        ("S3_FORCE_PATH_STYLE", "true".into()),
    ]
}

/// The app of a backend with its media store: a directory on SQLite, a bucket on Postgres.
pub(crate) async fn media_app(backend: Backend, extra: &[(&str, &str)]) -> (TestApp, Option<S3Server>) {
    let server = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(S3Server::start().await),
    };
    let owned = server.as_ref().map(s3_vars).unwrap_or_default();
    let mut vars: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    vars.extend_from_slice(extra);
    (spawn_app_with(backend, &vars).await, server)
}

/// Follows a download redirect; returns the status, content type and bytes at its end.
pub(crate) async fn download(app: &TestApp, token: &str, media_id: &str) -> (u16, String, Vec<u8>) {
    let no_redirects = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let found = no_redirects.get(format!("{}/media/{media_id}", app.base)).bearer_auth(token).send().await.unwrap();
    if found.status() != 302 {
        return (found.status().as_u16(), String::new(), Vec::new());
    }
    let location = found.headers()["location"].to_str().unwrap().to_owned();
    let url = if location.starts_with('/') { format!("{}{location}", app.base) } else { location };
    // No token: the signed URL is the permission.
    let answer = no_redirects.get(&url).send().await.unwrap();
    let status = answer.status().as_u16();
    let content_type =
        answer.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    (status, content_type, answer.bytes().await.unwrap().to_vec())
}

async fn uploads_are_checked_stored_and_downloaded_by_their_tenant_only(backend: Backend) {
    let (app, _bucket) = media_app(backend, &[("MEDIA_MAX_UPLOAD_BYTES", "300000")]).await;
    let token = tenant(&app).await;
    let other = tenant(&app).await;
    let nobody = tenant(&app).await;
    let session = connected_session(&app, &token).await;

    // Larger than the API's JSON body limit (64 KiB), within the upload limit.
    let mut photo = PNG.to_vec();
    photo.resize(200_000, 0);
    let stored = upload(
        &app,
        &token,
        &[("kind", None, None, b"IMAGE"), ("file", Some("Urlaub/Straße 1.png"), Some("text/html"), &photo)],
    )
    .await;
    assert_eq!(stored.status, 201, "{stored:?}");
    assert_eq!(stored.body["sessionId"], session.as_str());
    let media = &stored.body["media"];
    assert_eq!(
        (media["kind"].as_str(), media["mime"].as_str()),
        (Some("image"), Some("image/png")),
        "typed by content"
    );
    assert_eq!(media["size"], 200_000);
    assert_eq!(media["fileName"], "Urlaub_Straße 1.png");
    assert!(media["sha256"].as_str().is_some_and(|s| s.len() == 44), "{media}");
    assert!(media["url"].is_string() && media["urlExpiresAt"].is_string(), "{media}");
    let id = media["id"].as_str().unwrap_or_default().to_owned();

    let (status, content_type, bytes) = download(&app, &token, &id).await;
    assert_eq!((status, content_type.as_str()), (200, "image/png"));
    assert!(bytes == photo, "the download differs from the upload");
    // The URL in the upload's answer works too, without a token.
    let url = media["url"].as_str().unwrap_or_default();
    let url = if url.starts_with('/') { format!("{}{url}", app.base) } else { url.to_owned() };
    assert_eq!(reqwest::get(&url).await.map(|r| r.status().as_u16()).ok(), Some(200));
    // A URL signed for one object does not open another, nor a changed signature.
    if backend == Backend::Sqlite {
        let tampered = url.replace("signature=", "signature=0");
        assert_eq!(reqwest::get(&tampered).await.map(|r| r.status().as_u16()).ok(), Some(404));
        let unsigned = url.split('?').next().unwrap_or_default().to_owned();
        assert_eq!(reqwest::get(&unsigned).await.map(|r| r.status().as_u16()).ok(), Some(404));
    }

    // Another tenant can neither download it nor upload into the session.
    assert_eq!(download(&app, &other, &id).await.0, 404);
    assert_eq!(download(&app, &token, &uuid::Uuid::new_v4().to_string()).await.0, 404);
    assert_eq!(download(&app, &token, "not-an-id").await.0, 400);
    let foreign = upload(
        &app,
        &other,
        &[
            ("kind", None, None, b"image"),
            ("sessionId", None, None, session.as_bytes()),
            ("file", Some("a.png"), None, PNG),
        ],
    )
    .await;
    assert_eq!((foreign.status, foreign.message()), (404, "session not found"));
    let sessionless =
        upload(&app, &nobody, &[("kind", None, None, b"image"), ("file", Some("a.png"), None, PNG)]).await;
    assert_eq!((sessionless.status, sessionless.message()), (404, "session not found"));
    assert_eq!(app.post("/media").send().await.status, 401);

    // Bad forms get what is wrong, in the predecessor's words where it had them.
    let kind_required = "kind is required (image|video|audio|document|sticker)";
    for (parts, status, message) in [
        (vec![("file", Some("a.png"), None, PNG)], 400, kind_required),
        (vec![("kind", None, None, b"gif".as_slice()), ("file", Some("a.png"), None, PNG)], 400, kind_required),
        (vec![("kind", None, None, b"image".as_slice())], 400, "file is required"),
    ] {
        let refused = upload(&app, &token, &parts).await;
        assert_eq!((refused.status, refused.message()), (status, message), "{parts:?}");
    }
    let html = upload(
        &app,
        &token,
        &[
            ("kind", None, None, b"image"),
            ("file", Some("x.png"), Some("image/png"), b"<html><script>alert(1)</script>"),
        ],
    )
    .await;
    assert_eq!((html.status, html.body["code"].as_str()), (400, Some("invalid_file")), "{html:?}");
    assert!(html.message().contains("not a valid image"), "{html:?}");
    let sticker = upload(&app, &token, &[("kind", None, None, b"sticker"), ("file", Some("s.png"), None, PNG)]).await;
    assert_eq!(sticker.status, 400, "stickers are WebP: {sticker:?}");
    let two =
        upload(&app, &token, &[("kind", None, None, b"image"), ("file", None, None, PNG), ("file", None, None, PNG)])
            .await;
    assert_eq!(two.status, 400, "{two:?}");
    let long_kind = vec![b'x'; 1000];
    let long = upload(&app, &token, &[("kind", None, None, &long_kind), ("file", None, None, PNG)]).await;
    assert_eq!(long.status, 400, "{long:?}");
    let not_a_form = app.post("/media").bearer(&token).json(json!({"kind": "image"})).send().await;
    assert_eq!(not_a_form.status, 415, "{not_a_form:?}");
    let broken =
        app.post("/media").bearer(&token).raw("multipart/form-data; boundary=x", "--x\r\nnonsense").send().await;
    assert_eq!(broken.status, 400, "{broken:?}");
    // As an attacker would: odd methods, NUL bytes, an id that is no UUID, forged signatures.
    for (method, path) in
        [("DELETE", "/media".to_owned()), ("PUT", format!("/media/{id}")), ("POST", format!("/media/{id}/content"))]
    {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let odd = app.http.request(method, format!("{}{path}", app.base)).bearer_auth(&token).send().await.unwrap();
        assert_eq!(odd.status(), 405, "{path}");
    }
    for parts in [
        vec![("kind", None, None, b"ima\0ge".as_slice()), ("file", None, None, PNG)],
        vec![("kind", None, None, b"image".as_slice()), ("sessionId", None, None, b"\0"), ("file", None, None, PNG)],
        vec![
            ("kind", None, None, b"image".as_slice()),
            ("sessionId", None, None, &[0xff, 0xfe]),
            ("file", None, None, PNG),
        ],
    ] {
        let refused = upload(&app, &token, &parts).await;
        assert_eq!(refused.status, 400, "{parts:?}: {refused:?}");
    }
    for path in [
        format!("/media/{id}/content?expires=99999999999&signature={}", "a".repeat(10_000)),
        format!("/media/{id}/content?expires=-1&signature=00"),
        "/media/not-an-id/content?expires=1&signature=00".to_owned(),
        format!("/media/{id}/content?expires=1%00&signature=00"),
    ] {
        assert_eq!(reqwest::get(format!("{}{path}", app.base)).await.unwrap().status(), 404, "{path}");
    }

    // Over the limit: refused before reading when announced, while reading when not.
    let big = vec![0u8; 300_001];
    // Larger than the limit and the multipart framing's room together: refused by its announced
    // length, before it is read.
    let answer = app
        .raw_answer(&format!(
            "POST /media HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
             content-type: multipart/form-data; boundary=b\r\ncontent-length: 400000\r\nconnection: close\r\n\r\n--b\r\n"
        ))
        .await;
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("payload_too_large"), "{answer}");
    // Within the framing's room but over the file limit: refused as the file is counted.
    let counted =
        upload(&app, &token, &[("kind", None, None, b"document"), ("file", Some("big.bin"), None, &big)]).await;
    assert_eq!((counted.status, counted.body["code"].as_str()), (413, Some("file_too_large")), "{counted:?}");
    // A body that never shows a part boundary is cut at the limit too, not buffered whole (which
    // would end in a 400 once all of it was read). The server stops reading at the limit, so the
    // client, still sending, may see the connection reset before it reads the 413.
    let endless: Vec<Result<Vec<u8>, std::io::Error>> = (0..40).map(|_| Ok(vec![b'x'; 16 * 1024])).collect();
    let unbounded = app
        .http
        .post(format!("{}/media", app.base))
        .bearer_auth(&token)
        .header("content-type", "multipart/form-data; boundary=never")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(endless)))
        .send()
        .await;
    match unbounded {
        Ok(answer) => assert_eq!(answer.status(), 413, "{answer:?}"),
        Err(reset) => assert!(reset.is_request() || reset.is_body() || reset.is_connect(), "{reset:?}"),
    }
    let (content_type, body) = form(&[("kind", None, None, b"document"), ("file", Some("big.bin"), None, &big)]);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(16 * 1024).map(|c| Ok(c.to_vec())).collect();
    let streamed = app
        .post("/media")
        .bearer(&token)
        .raw(&content_type, reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    assert_eq!((streamed.status, streamed.body["code"].as_str()), (413, Some("file_too_large")), "{streamed:?}");

    // A document may be anything, and is downloaded as an attachment.
    let csv = upload(
        &app,
        &token,
        &[("kind", None, None, b"document"), ("file", Some("r.csv"), Some("text/csv"), b"a,b\n1,2\n")],
    )
    .await;
    assert_eq!((csv.status, csv.body["media"]["mime"].as_str()), (201, Some("text/csv")), "{csv:?}");
    let (status, _, bytes) = download(&app, &token, csv.body["media"]["id"].as_str().unwrap_or_default()).await;
    assert_eq!((status, bytes.as_slice()), (200, b"a,b\n1,2\n".as_slice()));
    if backend == Backend::Sqlite {
        // A URL signed for the photo does not open the document.
        let csv_id = csv.body["media"]["id"].as_str().unwrap_or_default();
        let swapped = url.replace(&id, csv_id);
        assert_eq!(reqwest::get(&swapped).await.map(|r| r.status().as_u16()).ok(), Some(404));
    }

    // The same upload with the same Idempotency-Key is stored once.
    let (content_type, body) = form(&[("kind", None, None, b"image"), ("file", Some("k.png"), None, PNG)]);
    let first = app
        .post("/media")
        .bearer(&token)
        .header("idempotency-key", "upload-1")
        .raw(&content_type, body.clone())
        .send()
        .await;
    let again =
        app.post("/media").bearer(&token).header("idempotency-key", "upload-1").raw(&content_type, body).send().await;
    assert_eq!((first.status, again.status), (201, 201));
    assert_eq!(first.body["media"]["id"], again.body["media"]["id"]);
    assert_eq!(again.headers.get("idempotent-replayed").and_then(|v| v.to_str().ok()), Some("true"));
    app.stop().await;
}

const CONTACT: &str = "15550100123@s.whatsapp.net";

/// The first page of the contact's chat, once `done` holds for its items.
async fn chat_until(app: &TestApp, token: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let path = format!("/chats/{CONTACT}/messages");
    let page =
        crate::chats::until(app, token, &path, |body| body["items"].as_array().is_some_and(|items| done(items))).await;
    page["items"].as_array().cloned().unwrap_or_default()
}

/// Downloads a page item's media through the signed URL the page gave.
async fn fetch_shown(app: &TestApp, item: &Value) -> Vec<u8> {
    let url = item["media"]["url"].as_str().unwrap_or_default();
    let url = if url.starts_with('/') { format!("{}{url}", app.base) } else { url.to_owned() };
    let answer = reqwest::get(&url).await.unwrap();
    assert_eq!(answer.status(), 200, "{url}");
    answer.bytes().await.unwrap().to_vec()
}

/// Upload → send → the contact sends it back → download; a contact's own document; the
/// events name the media without the keys to fetch it.
async fn media_is_sent_received_and_downloaded(backend: Backend) {
    let (app, _bucket) = media_app(backend, &[]).await;
    let token = tenant(&app).await;
    let other = tenant(&app).await;
    let session = connected_session(&app, &token).await;
    let uploaded = upload(&app, &token, &[("kind", None, None, b"image"), ("file", Some("dot.png"), None, PNG)]).await;
    assert_eq!(uploaded.status, 201, "{uploaded:?}");
    let media_id = uploaded.body["media"]["id"].as_str().unwrap_or_default().to_owned();

    // Sent by id, with a caption; the simulated contact sends the same file back (#echo).
    let sent = app
        .post(&format!("/chats/{CONTACT}/messages"))
        .bearer(&token)
        .json(json!({"media": {"kind": "image", "id": media_id}, "caption": "look #echo"}))
        .send()
        .await;
    assert_eq!(sent.status, 202, "{sent:?}");
    let items =
        chat_until(&app, &token, |items| items.len() == 2 && items.iter().all(|item| item["media"].is_object())).await;
    let (echo, mine) = (&items[0], &items[1]);
    assert_eq!(
        (mine["fromMe"].as_bool(), mine["type"].as_str(), mine["text"].as_str()),
        (Some(true), Some("imageMessage"), Some("look #echo"))
    );
    assert_eq!(mine["media"]["mediaId"], media_id.as_str(), "the upload is the sent message's media");
    assert_eq!((mine["media"]["kind"].as_str(), mine["media"]["mime"].as_str()), (Some("image"), Some("image/png")));
    assert_eq!(echo["fromMe"], false);
    assert_eq!(echo["type"], "imageMessage");
    assert_ne!(echo["media"]["mediaId"], media_id.as_str(), "the received file is an object of its own");
    assert_eq!(echo["media"]["size"], PNG.len());
    assert!(fetch_shown(&app, mine).await == PNG && fetch_shown(&app, echo).await == PNG, "a file changed on the way");
    let received_id = echo["media"]["mediaId"].as_str().unwrap_or_default().to_owned();

    // Forwarded to another chat: the same file, marked as a forward; an unknown id is a 404.
    let other_contact = "15550100124@s.whatsapp.net";
    for source in [echo["id"].clone(), json!("nope")] {
        let forwarded = app
            .post(&format!("/chats/{other_contact}/messages"))
            .bearer(&token)
            .json(json!({"forwardMessageId": source}))
            .send()
            .await;
        let expected = if source == "nope" { 404 } else { 202 };
        assert_eq!(forwarded.status, expected, "{forwarded:?}");
    }
    let path = format!("/chats/{other_contact}/messages");
    let page = crate::chats::until(&app, &token, &path, |body| {
        body["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i["fromMe"] == true && i["media"].is_object()))
    })
    .await;
    let items = page["items"].as_array().cloned().unwrap_or_default();
    let forward = items.iter().find(|i| i["fromMe"] == true).cloned().unwrap_or_default();
    assert_eq!(forward["media"]["mediaId"], received_id.as_str(), "{forward}");
    assert_eq!(forward["forward"], json!({"isForwarded": true, "forwardingScore": 1}));
    assert_eq!(forward["type"], "imageMessage");
    assert_eq!(download(&app, &token, &received_id).await.0, 200);
    assert_eq!(download(&app, &other, &received_id).await.0, 404, "another tenant's media");

    // A voice note forwarded goes on as a voice note: WhatsApp's record of it says so.
    let ogg: &[u8] =
        b"OggS\0\x02\0\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\0\0\0\0\x01\x13OpusHead\x01\x01\x38\x01\x80\xbb\0\0\0\0\0";
    let voice = upload(&app, &token, &[("kind", None, None, b"audio"), ("file", Some("note.ogg"), None, ogg)]).await;
    assert_eq!(voice.status, 201, "{voice:?}");
    let voice_id = voice.body["media"]["id"].as_str().unwrap_or_default().to_owned();
    let spoken = app
        .post(&format!("/chats/{other_contact}/messages"))
        .bearer(&token)
        .json(json!({"media": {"kind": "audio", "id": voice_id}, "ptt": true}))
        .send()
        .await;
    assert_eq!(spoken.status, 202, "{spoken:?}");
    let raw_path = format!("{path}?includeRaw=true");
    let with_raw = |body: &Value, media_id: &str, forwarded: bool| {
        body["items"].as_array().and_then(|items| {
            items.iter().find(|i| i["media"]["mediaId"] == media_id && i["forward"].is_object() == forwarded).cloned()
        })
    };
    let page = crate::chats::until(&app, &token, &raw_path, |body| with_raw(body, &voice_id, false).is_some()).await;
    let note = with_raw(&page, &voice_id, false).unwrap_or_default();
    assert_eq!(note["raw"]["message"]["audioMessage"]["ptt"], true, "{note}");
    let forwarded = app
        .post(&format!("/chats/{CONTACT}/messages"))
        .bearer(&token)
        .json(json!({"forwardMessageId": note["id"]}))
        .send()
        .await;
    assert_eq!(forwarded.status, 202, "{forwarded:?}");
    let raw_path = format!("/chats/{CONTACT}/messages?includeRaw=true");
    let page = crate::chats::until(&app, &token, &raw_path, |body| with_raw(body, &voice_id, true).is_some()).await;
    let again = with_raw(&page, &voice_id, true).unwrap_or_default();
    assert_eq!(again["raw"]["message"]["audioMessage"]["ptt"], true, "{again}");
    assert_eq!(again["raw"]["message"]["audioMessage"]["contextInfo"]["isForwarded"], true, "{again}");

    // The events: the download's `session.messages.media`, and no download keys anywhere.
    let events = app.store.outbox_events_for_aggregate(&session).await.unwrap();
    // (The image forwarded to the other contact carries the echo's "#echo" too: that contact
    // sends it back in its own time, so only the first chat's downloads are counted.)
    let stored: Vec<&Value> = events
        .iter()
        .filter(|r| r.event.event_name == "session.messages.media")
        .map(|r| &r.event.payload)
        .filter(|payload| payload["media"][0]["chatJid"] == CONTACT)
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["media"][0]["mediaId"], received_id.as_str());
    assert_eq!(stored[0]["media"][0]["url"], format!("/media/{received_id}"));
    for record in &events {
        let text = record.event.payload.to_string();
        assert!(!text.contains("simulatedPath") && !text.contains("mediaKey"), "{text}");
    }

    // A contact's own file: a document, shown with its name.
    let asked = app
        .post(&format!("/chats/{CONTACT}/messages"))
        .bearer(&token)
        .json(json!({"content": "a #document please"}))
        .send()
        .await;
    assert_eq!(asked.status, 202);
    let items = chat_until(&app, &token, |items| {
        items.first().is_some_and(|item| item["type"] == "documentMessage" && item["media"].is_object())
    })
    .await;
    assert_eq!(
        (items[0]["media"]["fileName"].as_str(), items[0]["media"]["mime"].as_str()),
        (Some("report.pdf"), Some("application/pdf"))
    );
    assert!(fetch_shown(&app, &items[0]).await.starts_with(b"%PDF"));

    // What cannot be sent is refused before anything is enqueued.
    let foreign = app
        .post(&format!("/chats/{CONTACT}/messages"))
        .bearer(&other)
        .json(json!({"media": {"kind": "image", "id": media_id}}))
        .send()
        .await;
    assert_eq!(foreign.status, 404, "{foreign:?}");
    let pdf_id = items[0]["media"]["mediaId"].as_str().unwrap_or_default();
    let as_image = app
        .post(&format!("/chats/{CONTACT}/messages"))
        .bearer(&token)
        .json(json!({"media": {"kind": "image", "id": pdf_id}}))
        .send()
        .await;
    assert_eq!(as_image.status, 400, "a PDF sent as an image: {as_image:?}");
    for media in [
        json!({"kind": "gif", "id": media_id}),
        json!({"kind": "image"}),
        json!({"kind": "image", "id": "x"}),
        json!("image"),
        json!({"kind": "image", "url": "ftp://example.com/a.png"}),
    ] {
        let refused =
            app.post(&format!("/chats/{CONTACT}/messages")).bearer(&token).json(json!({"media": media})).send().await;
        assert_eq!(refused.status, 400, "{media}: {refused:?}");
    }
    let combined = app
        .post(&format!("/chats/{CONTACT}/messages"))
        .bearer(&token)
        .json(json!({"media": {"kind": "image", "id": media_id}, "forwardMessageId": "x"}))
        .send()
        .await;
    assert_eq!((combined.status, combined.message()), (400, "media and forwardMessageId cannot be combined"));
    // The download URL `POST /media` answered names the upload too (the predecessor's two steps).
    let by_url = app
        .post(&format!("/sessions/{session}/messages"))
        .bearer(&token)
        .json(json!({"to": CONTACT, "media": {"kind": "image", "url": uploaded.body["media"]["url"]}}))
        .send()
        .await;
    assert_eq!(by_url.status, 202, "{by_url:?}");
    chat_until(&app, &token, |items| {
        items.iter().filter(|i| i["fromMe"] == true && i["media"]["mediaId"] == media_id.as_str()).count() == 2
    })
    .await;
    app.stop().await;
}

/// A file server on loopback that counts its requests.
async fn file_server(body: &'static [u8]) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let router = axum::Router::new().route(
        "/{*path}",
        axum::routing::get(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { ([("content-type", "image/png")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}"), hits)
}

/// A file at a URL is fetched by the worker — unless the URL points to this machine or a private
/// network, which is refused before any connection.
async fn media_at_urls_are_fetched_under_the_address_policy(backend: Backend) {
    use std::sync::atomic::Ordering;
    let (server, hits) = file_server(PNG).await;
    let (guarded, _bucket) = media_app(backend, &[]).await;
    let token = tenant(&guarded).await;
    let session = connected_session(&guarded, &token).await;
    for url in [format!("{server}/dot.png"), server.replace("127.0.0.1", "localhost") + "/dot.png"] {
        let sent = guarded
            .post(&format!("/chats/{CONTACT}/messages"))
            .bearer(&token)
            .json(json!({"media": {"kind": "image", "url": url}}))
            .send()
            .await;
        assert_eq!(sent.status, 202, "{sent:?}");
    }
    let failed = guarded.events_until(&session, "session.message.failed", |found| found.len() == 2).await;
    let reasons: Vec<&str> = failed.iter().map(|p| p["reason"].as_str().unwrap_or_default()).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons.iter().all(|reason| reason.contains("may not reach")), "{reasons:?}");
    guarded.stop().await;
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the guarded app reached the loopback server");

    // Allowed by the operator's setting: fetched, kept as the tenant's media, sent.
    let (open, _bucket) = media_app(backend, &[("MEDIA_FETCH_ALLOW_PRIVATE", "true")]).await;
    let token = tenant(&open).await;
    connected_session(&open, &token).await;
    let sent = open
        .post(&format!("/chats/{CONTACT}/messages"))
        .bearer(&token)
        .json(json!({"media": {"kind": "image", "url": format!("{server}/photos/dot.png")}, "caption": "from a URL"}))
        .send()
        .await;
    assert_eq!(sent.status, 202, "{sent:?}");
    let items =
        chat_until(&open, &token, |items| items.iter().any(|i| i["fromMe"] == true && i["media"].is_object())).await;
    let mine = items.iter().find(|i| i["fromMe"] == true).unwrap();
    assert_eq!((mine["media"]["fileName"].as_str(), mine["text"].as_str()), (Some("dot.png"), Some("from a URL")));
    assert!(fetch_shown(&open, mine).await == PNG);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    open.stop().await;
}

/// The media store the app uses, opened a second time by the test.
fn storage_of(app: &TestApp) -> anna_media::MediaStorage {
    let config = anna::config::Config::from_vars(&anna::config::Vars::new(|k: &str| app.env.get(k).cloned())).unwrap();
    anna_media::MediaStorage::open(&config.media, b"integration-test-secret-integration-test").unwrap()
}

/// An object of `days` ago in the session's store, with its row.
async fn old_object(
    app: &TestApp,
    storage: &anna_media::MediaStorage,
    tenant: uuid::Uuid,
    session: uuid::Uuid,
    days: i64,
) -> anna_store::MediaObject {
    let id = uuid::Uuid::now_v7();
    let key = anna_media::ObjectKey::new(tenant, id, "image/png");
    storage.put_bytes(&key, bytes::Bytes::from_static(PNG), "image/png", "inline").await.unwrap();
    let object = anna_store::MediaObject {
        id,
        tenant_id: tenant,
        session_id: session,
        object_key: key.as_str().to_owned(),
        kind: "image".into(),
        mime: "image/png".into(),
        size: PNG.len() as u64,
        file_name: "old.png".into(),
        sha256: "x".into(),
        source: "message".into(),
        created_at: time::OffsetDateTime::now_utc() - time::Duration::days(days),
    };
    let mut uow = app.store.begin().await.unwrap();
    uow.insert_media_object(&object).await.unwrap();
    uow.commit().await.unwrap();
    object
}

async fn gone(app: &TestApp, storage: &anna_media::MediaStorage, object: &anna_store::MediaObject) -> bool {
    let key = anna_media::ObjectKey::stored(&object.object_key).unwrap();
    for _ in 0..200 {
        let row = app.store.find_media_object(object.id).await.unwrap();
        let file = storage.read(&key, u64::MAX).await;
        if row.is_none() && matches!(file, Err(anna_media::MediaError::NotFound)) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// Media older than the tenant's retention goes, object and row; a deleted session's media goes
/// with it; another tenant's stays.
async fn media_goes_with_retention_and_with_its_session(backend: Backend) {
    let upkeep = [
        ("MESSAGES_UPKEEP_INTERVAL_MS", "100"),
        ("MESSAGES_RETENTION_INTERVAL_MS", "200"),
        ("MESSAGES_RETENTION_BATCH", "2"),
        ("MEDIA_SWEEP_INTERVAL_MS", "200"),
    ];
    let (app, bucket) = media_app(backend, &upkeep).await;
    let storage = storage_of(&app);
    let (token, other) = (tenant(&app).await, tenant(&app).await);
    let (mine, theirs) = (connected_session(&app, &token).await, connected_session(&app, &other).await);
    let me = app.get("/users/me").bearer(&token).send().await.body["id"].as_str().unwrap().parse().unwrap();
    let them = app.get("/users/me").bearer(&other).send().await.body["id"].as_str().unwrap().parse().unwrap();
    let (mine, theirs): (uuid::Uuid, uuid::Uuid) = (mine.parse().unwrap(), theirs.parse().unwrap());
    let set = app.put("/settings/retention").bearer(&token).json(json!({"messageRetentionDays": 10})).send().await;
    assert_eq!(set.status, 200, "{set:?}");

    let mut expired = Vec::new();
    for _ in 0..5 {
        expired.push(old_object(&app, &storage, me, mine, 40).await);
    }
    let kept_recent = old_object(&app, &storage, me, mine, 2).await;
    let kept_theirs = old_object(&app, &storage, them, theirs, 40).await;
    for object in &expired {
        assert!(gone(&app, &storage, object).await, "expired media stayed: {}", object.id);
    }
    let key = |o: &anna_store::MediaObject| anna_media::ObjectKey::stored(&o.object_key).unwrap();
    assert!(app.store.find_media_object(kept_recent.id).await.unwrap().is_some());
    assert!(storage.read(&key(&kept_theirs), u64::MAX).await.is_ok(), "another tenant's media was purged");

    // Deleting the session deletes its media from the store.
    let deleted = app.http.delete(format!("{}/sessions/{mine}", app.base)).bearer_auth(&token).send().await;
    assert_eq!(deleted.map(|r| r.status().as_u16()).ok(), Some(202));
    assert!(gone(&app, &storage, &kept_recent).await, "a deleted session's media stayed");
    assert!(app.store.find_media_object(kept_theirs.id).await.unwrap().is_some());

    // Objects whose row was never written (a crash between the two) go an hour after they were
    // written; younger ones stay (their row may be on its way), and so do recorded ones.
    let on_disk = |key: &anna_media::ObjectKey| match &bucket {
        Some(server) => server.object_path(key.as_str()),
        None => std::path::PathBuf::from(&app.env["MEDIA_DIR"]).join(key.as_str()),
    };
    let stray_old = anna_media::ObjectKey::new(them, uuid::Uuid::now_v7(), "image/png");
    let stray_new = anna_media::ObjectKey::new(them, uuid::Uuid::now_v7(), "image/png");
    for stray in [&stray_old, &stray_new] {
        storage.put_bytes(stray, bytes::Bytes::from_static(PNG), "image/png", "inline").await.unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    for path in [on_disk(&stray_old), on_disk(&key(&kept_theirs))] {
        let file =
            std::fs::File::options().write(true).open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        file.set_modified(two_hours_ago).unwrap();
    }
    let mut swept = false;
    for _ in 0..200 {
        if matches!(storage.read(&stray_old, u64::MAX).await, Err(anna_media::MediaError::NotFound)) {
            swept = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(swept, "an old object without a row stayed");
    assert!(storage.read(&stray_new, u64::MAX).await.is_ok(), "a young object without a row was swept");
    assert!(storage.read(&key(&kept_theirs), u64::MAX).await.is_ok(), "a recorded object was swept");
    app.stop().await;
}

crate::on_both_backends!(
    uploads_are_checked_stored_and_downloaded_by_their_tenant_only,
    media_is_sent_received_and_downloaded,
    media_at_urls_are_fetched_under_the_address_policy,
    media_goes_with_retention_and_with_its_session
);
