//! Health, readiness, metrics, the OpenAPI document and the docs page.

use serde_json::json;

use crate::helpers::{Backend, spawn_app, spawn_app_with, unique_email};

async fn health_readiness_and_request_ids(backend: Backend) {
    let app = spawn_app(backend).await;
    let health = app.get("/healthz").send().await;
    assert_eq!((health.status, &health.body), (200, &json!({"status": "ok"})));
    let ready = app.get("/readyz").send().await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.body["database"], "ok");
    assert_eq!(ready.body["streams"], "ok");
    let id = health.headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert_eq!(id.len(), 36, "x-request-id is a UUID: {id:?}");
    let unknown = app.get("/nope").send().await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.body["code"], "not_found");
    // Every error has the JSON shape: a wrong method, a path that does not decode.
    let wrong_method = app.get("/auth/login").send().await;
    assert_eq!((wrong_method.status, wrong_method.body["code"].as_str()), (405, Some("method_not_allowed")));
    assert!(wrong_method.headers.get("allow").is_some(), "{wrong_method:?}");
    let bad_path = app.post("/users/%FF%FE/verify").json(json!({"code": "123456"})).send().await;
    assert_eq!((bad_path.status, bad_path.body["code"].as_str()), (400, Some("invalid_path")), "{bad_path:?}");
    app.stop().await;
}

async fn readiness_fails_when_the_database_is_gone(backend: Backend) {
    let app = spawn_app(backend).await;
    app.store.close().await;
    let ready = app.get("/readyz").send().await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body["database"], "unreachable");
    app.stop().await;
}

async fn metrics_by_route_template(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, verified) = app.active_user(&unique_email(), "correct horse battery").await;
    app.get("/users/me").bearer(&verified.access_token()).send().await;
    let metrics = app.get("/metrics").send().await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.headers["content-type"].to_str().unwrap_or_default().starts_with("text/plain"));
    let text = metrics.text;
    assert!(text.contains("http_requests_total{"), "{text}");
    assert!(text.contains("route=\"/users/{id}/verify\""), "route templates, not raw paths");
    assert!(text.contains("route=\"/users/me\""));
    assert!(text.contains("http_request_duration_seconds_bucket{"));
    // The sessions worker of this process reports the partitions it holds (every one: it is
    // alone in its fleet).
    let mut text = text;
    for _ in 0..100 {
        if text.contains("sessions_partitions_held") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        text = app.get("/metrics").send().await.text;
    }
    assert!(text.contains("sessions_partitions_held"), "{text}");
    app.stop().await;
}

/// Odd methods and paths from a hostile client add no series to the metrics and no long lines
/// to the logs.
async fn odd_methods_and_paths_do_not_grow_the_metrics(backend: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app(backend).await;
    let marker = format!("Z{}", uuid::Uuid::new_v4().simple());
    for i in 0..1000 {
        let method = reqwest::Method::from_bytes(format!("M{i}{marker}").as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let reply = app.http.request(method, format!("{}/healthz", app.base)).send().await;
        assert!(reply.is_ok());
        let path = format!("/{marker}/{i}");
        assert_eq!(app.get(&path).send().await.status, 404);
    }
    // One request with a 20,000-character method, over a raw socket.
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap_or_else(|e| panic!("{e}"));
    let long_method = format!("M{marker}{}", "X".repeat(20_000));
    socket
        .write_all(format!("{long_method} /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), socket.read_to_end(&mut answer)).await;

    let metrics = app.get("/metrics").send().await.text;
    assert!(!metrics.contains(&marker), "a client's method or path became a label");
    assert!(metrics.contains("method=\"other\""), "odd methods count as other");
    assert!(metrics.contains("route=\"unmatched\""), "unknown paths count as unmatched");
    let longest = app.logs.contents().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4_000, "a log line of {longest} bytes");
    app.stop().await;
}

/// What the OpenAPI document says against what the routes answer: for every POST with a JSON
/// body, the answers to a body of another type, malformed JSON, an empty object and a value of
/// the wrong shape are documented, with the error shape; required fields are required.
async fn the_openapi_document_tells_the_truth(backend: Backend) {
    let app = spawn_app(backend).await;
    let doc = app.get("/openapi.json").send().await.body;
    let paths = doc["paths"].as_object().cloned().unwrap_or_default();
    let mut checked = 0;
    for (path, item) in paths {
        let Some(post) = item.get("post") else { continue };
        let Some(body) = post.get("requestBody") else { continue };
        let url = path.replace("{id}", &uuid::Uuid::new_v4().to_string());
        let schema = body["content"]["application/json"]["schema"]["$ref"].as_str().unwrap_or_default();
        let schema = &doc["components"]["schemas"][schema.trim_start_matches("#/components/schemas/")];
        // Every field is either required or documented as optional (nullable): a field the
        // route needs is never left looking optional.
        let required: Vec<&str> =
            schema["required"].as_array().map(|r| r.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
        if !path.ends_with("/verify") {
            for (name, property) in schema["properties"].as_object().cloned().unwrap_or_default() {
                let nullable = property["type"].as_array().is_some_and(|t| t.iter().any(|t| t == "null"));
                assert!(
                    required.contains(&name.as_str()) || nullable,
                    "{path}: {name} is neither required nor optional: {schema}"
                );
                assert!(
                    !(required.contains(&name.as_str()) && nullable),
                    "{path}: {name} is required yet nullable: {schema}"
                );
            }
        }
        let replies = [
            ("another content type", app.post(&url).raw("text/plain", "hello").send().await),
            ("malformed JSON", app.post(&url).raw("application/json", "{\"email\": ").send().await),
            ("an empty object", app.post(&url).json(json!({})).send().await),
            ("an array", app.post(&url).json(json!([])).send().await),
        ];
        for (what, reply) in replies {
            let documented = post["responses"].get(reply.status.to_string()).is_some();
            assert!(documented, "{path}: {what} answered {} which the document does not list", reply.status);
            assert!(reply.status >= 400, "{path}: {what} accepted");
            assert!(reply.body["message"].is_string() && reply.body["code"].is_string(), "{path}: {what}: {reply:?}");
        }
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} routes with a JSON body");
    app.stop().await;
}

async fn metrics_can_move_to_their_own_port(backend: Backend) {
    let app = spawn_app_with(backend, &[("METRICS_PORT", "0")]).await;
    assert_eq!(app.get("/healthz").send().await.status, 200);
    assert_eq!(app.get("/metrics").send().await.status, 404, "not on the public port");
    let addr = app.metrics_addr.unwrap_or_else(|| panic!("metrics port not bound"));
    let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    assert!(text.contains("http_requests_total"), "{text}");
    app.stop().await;
}

async fn openapi_and_docs(backend: Backend) {
    let app = spawn_app(backend).await;
    let page = app.get("/docs/").send().await;
    let csp = page.headers.get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(page.headers.get("x-frame-options").and_then(|v| v.to_str().ok()), Some("DENY"));
    let doc = app.get("/openapi.json").send().await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.body["openapi"], "3.1.0");
    for path in [
        "/users",
        "/users/{id}/verify",
        "/users/me",
        "/auth/login",
        "/auth/refresh",
        "/auth/logout",
        "/auth/logout-all",
        "/auth/resend-verification",
        "/auth/password-reset",
        "/auth/password-reset/confirm",
        "/healthz",
        "/readyz",
    ] {
        assert!(doc.body["paths"][path].is_object(), "{path} missing from the OpenAPI document");
    }
    let docs = app.get("/docs/").send().await;
    assert_eq!(docs.status, 200);
    assert!(docs.text.to_lowercase().contains("swagger"), "docs page");
    assert!(!docs.text.contains("cdn."), "docs assets are embedded, nothing from a CDN");
    let bundle = app.get("/docs/swagger-ui-bundle.js").send().await;
    assert_eq!(bundle.status, 200);
    app.stop().await;
}

async fn events_metrics_and_trace_context(backend: Backend) {
    let app = spawn_app(backend).await;
    let email = unique_email();
    // The caller's trace continues through the outbox into the stream entries.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let reply = app
        .post("/users")
        .header("traceparent", &format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(json!({"name": "T", "email": email, "password": "correct horse battery"}))
        .send()
        .await;
    assert_eq!(reply.status, 201);
    let id = reply.body["id"].as_str().unwrap_or_default().to_owned();
    let rows = app.store.outbox_events_for_aggregate(&id).await.unwrap();
    assert!(!rows.is_empty());
    for row in &rows {
        let traceparent = row.event.traceparent.clone().unwrap_or_default();
        assert!(traceparent.starts_with(&format!("00-{trace_id}-")), "{traceparent:?}");
        assert_eq!(traceparent.len(), 55);
    }
    app.mailbox.nth_to(&email, 1).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = app.get("/metrics").send().await.text;
        let ready = [
            "outbox_dispatch_total{",
            "events_processed_total{",
            "event_processing_duration_ms_bucket{",
            "event_end_to_end_latency_seconds_bucket{",
            "outbox_dispatch_duration_ms_bucket{",
            // The e-mail's own subscriber, not only the first one to report.
            "subscriber=\"SendUserVerificationEmailOnUserVerificationTokenIssued\"",
        ]
        .iter()
        .all(|m| text.contains(m));
        if ready {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "event metrics missing:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    app.stop().await;
}

crate::on_both_backends!(
    events_metrics_and_trace_context,
    health_readiness_and_request_ids,
    readiness_fails_when_the_database_is_gone,
    metrics_by_route_template,
    odd_methods_and_paths_do_not_grow_the_metrics,
    the_openapi_document_tells_the_truth,
    metrics_can_move_to_their_own_port,
    openapi_and_docs,
);
