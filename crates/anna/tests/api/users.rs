//! Registration, verification and the current user.

use serde_json::json;

use crate::helpers::{Backend, code_of, link_param, spawn_app, unique_email};

async fn register_verify_and_me(backend: Backend) {
    let app = spawn_app(backend).await;
    let email = unique_email();
    let id = app.register(&format!("  {} ", email.to_uppercase()), "correct horse battery").await;

    // Events are in the outbox, in order, without secrets in clear.
    let outbox = app.store.outbox_events_for_aggregate(&id).await.unwrap();
    let names: Vec<_> = outbox.iter().map(|r| r.event.event_name.as_str()).collect();
    assert_eq!(names, ["user.registered", "user.verification.token_issued"]);
    assert!(outbox.iter().all(|r| ["pending", "processing", "published"].contains(&r.status.as_str())));

    let mail = app.mailbox.nth_to(&email, 1).await;
    let code = code_of(&mail);
    assert_eq!(mail.subject, "Verify your account");
    assert!(mail.text.contains(&code));
    for row in &outbox {
        assert!(!row.event.payload.to_string().contains(&code), "code leaked into the outbox");
    }
    // Stored hashes, never the code.
    let stored = app.store.find_user_by_id(id.parse().unwrap()).await.unwrap().unwrap();
    assert_ne!(stored.verification_code.as_deref(), Some(code.as_str()));

    let verified = app.post(&format!("/users/{id}/verify")).json(json!({"code": code})).send().await;
    assert_eq!(verified.status, 200, "{verified:?}");
    assert_eq!(verified.body["status"], "active");
    assert_eq!(verified.body["accessTokenExpiresIn"], 900);
    let cookie = verified.set_cookie();
    assert!(cookie.starts_with("refresh_token="), "{cookie}");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=2592000"] {
        assert!(cookie.contains(attribute), "{attribute} missing in {cookie}");
    }
    assert!(!cookie.contains("Secure"));
    let names: Vec<_> =
        app.store.outbox_events_for_aggregate(&id).await.unwrap().into_iter().map(|r| r.event.event_name).collect();
    assert_eq!(names.last().map(String::as_str), Some("user.verified"));
    // The relay publishes every row, and the statistics projection applies each event once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let rows = app.store.outbox_events_for_aggregate(&id).await.unwrap();
        let stats = app.store.event_stats().await.unwrap();
        let counted: i64 = stats.iter().map(|s| s.count).sum();
        if rows.iter().all(|r| r.status == "published" && r.published_at.is_some()) && counted == 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not all published and counted: {rows:?} {stats:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let me = app.get("/users/me").bearer(&verified.access_token()).send().await;
    assert_eq!(me.status, 200);
    assert_eq!(me.body, json!({"id": id, "name": "Test User", "email": email, "status": "active"}));

    let again = app.post(&format!("/users/{id}/verify")).json(json!({"code": code})).send().await;
    assert_eq!(again.status, 409);
    app.stop().await;
}

async fn verify_by_link_token(backend: Backend) {
    let app = spawn_app(backend).await;
    let email = unique_email();
    let id = app.register(&email, "correct horse battery").await;
    let mail = app.mailbox.nth_to(&email, 1).await;
    assert!(mail.text.contains(&format!("http://localhost:3000/verify?userId={id}&token=")), "{}", mail.text);
    let token = link_param(&mail, "token");
    assert_eq!(token.len(), 64);
    let reply = app.post(&format!("/users/{id}/verify")).json(json!({"token": token})).send().await;
    assert_eq!(reply.status, 200, "{reply:?}");
    app.stop().await;
}

async fn registration_input_errors(backend: Backend) {
    let app = spawn_app(backend).await;
    let email = unique_email();
    let cases = [
        (json!({"email": email, "password": "long enough"}), 400, "name, email and password are required"),
        (json!({"name": "", "email": email, "password": "long enough"}), 400, "name, email and password are required"),
        (
            json!({"name": "A", "email": "foo", "password": "long enough"}),
            400,
            "<UserEmail> does not allow the value <foo>",
        ),
        (
            json!({"name": "A", "email": email, "password": "short"}),
            400,
            "password must be between 8 and 128 characters",
        ),
        (json!({"name": "A", "email": email, "password": email}), 400, "password must not be the e-mail address"),
        (json!({"name": 5, "email": email, "password": "long enough"}), 422, ""),
    ];
    for (body, status, message) in cases {
        let reply = app.post("/users").json(body.clone()).send().await;
        assert_eq!(reply.status, status, "{body} -> {reply:?}");
        assert!(reply.message().contains(message), "{body} -> {reply:?}");
        assert!(reply.body["code"].is_string());
    }
    // Content type, malformed JSON, size.
    let reply = app.post("/users").raw("application/x-www-form-urlencoded", "name=a&email=b&password=c").send().await;
    assert_eq!(reply.status, 415);
    let reply = app.post("/users").raw("application/json", "{\"name\": ").send().await;
    assert_eq!(reply.status, 400);
    assert!(!reply.message().is_empty());
    // Refused from the announced length, before any of the body is read.
    let answer = app
        .raw_answer(
            "POST /users HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: 204800\r\nconnection: close\r\n\r\n{\"name\": \"",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // A client-chosen id is ignored; duplicates (after normalisation) are 409.
    let chosen = uuid::Uuid::new_v4().to_string();
    let reply = app
        .post("/users")
        .json(json!({"id": chosen, "name": "A", "email": email, "password": "long enough", "extra": true}))
        .send()
        .await;
    assert_eq!(reply.status, 201);
    assert_ne!(reply.body["id"], chosen);
    let reply = app
        .post("/users")
        .json(json!({"name": "B", "email": format!(" {} ", email.to_uppercase()), "password": "other password"}))
        .send()
        .await;
    assert_eq!(reply.status, 409, "{reply:?}");
    app.stop().await;
}

async fn verification_errors_and_brute_force_cut_off(backend: Backend) {
    let app = spawn_app_max_attempts(backend).await;
    let bad_id = app.post("/users/not-a-uuid/verify").json(json!({"code": "123456"})).send().await;
    assert_eq!(bad_id.status, 400);
    let unknown = uuid::Uuid::new_v4();
    let missing = app.post(&format!("/users/{unknown}/verify")).json(json!({"code": "123456"})).send().await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.message(), format!("The user {unknown} does not exist"));

    let email = unique_email();
    let id = app.register(&email, "correct horse battery").await;
    let code = code_of(&app.mailbox.nth_to(&email, 1).await);
    let empty = app.post(&format!("/users/{id}/verify")).json(json!({})).send().await;
    assert_eq!((empty.status, empty.message()), (400, "token or code is required"));

    let wrong = if code == "000000" { "000001" } else { "000000" };
    for attempt in 1..=5 {
        let reply = app.post(&format!("/users/{id}/verify")).json(json!({"code": wrong})).send().await;
        assert_eq!(reply.status, 400, "attempt {attempt}");
        if attempt < 5 {
            assert_eq!(reply.message(), format!("Verification token does not match for user {id}"));
        }
    }
    // The fifth wrong attempt voided the code: even the right one fails now.
    let reply = app.post(&format!("/users/{id}/verify")).json(json!({"code": code})).send().await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["code"], "verification_void");

    // A new code must be requested; it works.
    let resend = app.post("/auth/resend-verification").json(json!({"email": email})).send().await;
    assert_eq!(resend.status, 200);
    let new_code = code_of(&app.mailbox.nth_to(&email, 2).await);
    let reply = app.post(&format!("/users/{id}/verify")).json(json!({"code": new_code})).send().await;
    assert_eq!(reply.status, 200, "{reply:?}");
    app.stop().await;
}

async fn spawn_app_max_attempts(backend: Backend) -> crate::helpers::TestApp {
    crate::helpers::spawn_app_with(backend, &[("AUTH_MAX_SECRET_ATTEMPTS", "5")]).await
}

async fn expired_code_is_refused(backend: Backend) {
    let app = crate::helpers::spawn_app_with(backend, &[("AUTH_VERIFICATION_TTL_MS", "1")]).await;
    let email = unique_email();
    let id = app.register(&email, "correct horse battery").await;
    let code = code_of(&app.mailbox.nth_to(&email, 1).await);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let reply = app.post(&format!("/users/{id}/verify")).json(json!({"code": code})).send().await;
    assert_eq!(reply.status, 400);
    assert!(reply.message().starts_with(&format!("Verification token for user {id} expired at ")), "{reply:?}");
    app.stop().await;
}

async fn me_requires_a_valid_bearer_token(backend: Backend) {
    let app = spawn_app(backend).await;
    let none = app.get("/users/me").send().await;
    assert_eq!((none.status, none.message()), (401, "missing access token"));
    let junk = app.get("/users/me").bearer("junk").send().await;
    assert_eq!((junk.status, junk.message()), (401, "invalid access token"));
    let (_, verified) = app.active_user(&unique_email(), "correct horse battery").await;
    let scheme =
        app.get("/users/me").header("authorization", &format!("Token {}", verified.access_token())).send().await;
    assert_eq!(scheme.status, 401, "only the Bearer scheme is accepted");
    let bearer = format!("Bearer {}", verified.access_token());
    let twice =
        app.get("/users/me").header("authorization", &bearer).header("authorization", "Bearer junk").send().await;
    assert_eq!((twice.status, twice.body["code"].as_str()), (400, Some("duplicate_authorization")), "{twice:?}");
    let me = app.get("/users/me").header("authorization", &bearer).send().await;
    assert_eq!(me.status, 200);
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
    ] {
        assert_eq!(me.headers.get(name).and_then(|v| v.to_str().ok()), Some(value), "{name}");
    }
    assert!(me.headers.contains_key("content-security-policy"));
    app.stop().await;
}

crate::on_both_backends!(
    registration_is_idempotent_with_a_key,
    register_verify_and_me,
    verify_by_link_token,
    registration_input_errors,
    verification_errors_and_brute_force_cut_off,
    expired_code_is_refused,
    me_requires_a_valid_bearer_token,
    control_and_invisible_characters_are_refused,
    look_alike_addresses_do_not_make_second_accounts,
);

/// NUL and other control characters in names and e-mails: a 400 on every route that takes
/// them, on both backends (Postgres cannot store NUL), and nothing stored.
async fn control_and_invisible_characters_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let password = "correct horse battery";
    for email in ["nul\u{0}@example.com", "esc\u{1b}@example.com", "c1\u{85}@example.com", "zw\u{200b}sp@example.com"] {
        let routes = [
            ("/users", json!({"name": "A", "email": email, "password": password})),
            ("/auth/login", json!({"email": email, "password": password})),
            ("/auth/resend-verification", json!({"email": email})),
            ("/auth/password-reset", json!({"email": email})),
            ("/auth/password-reset/confirm", json!({"email": email, "token": "t", "newPassword": "another password"})),
        ];
        for (route, body) in routes {
            let reply = app.post(route).json(body).send().await;
            assert_eq!(reply.status, 400, "{route} {email:?} -> {reply:?}");
            assert_eq!(reply.body["code"], "invalid_email", "{route} {email:?} -> {reply:?}");
            assert!(!reply.text.contains('\u{0}') && !reply.text.contains("\\u0000"), "echoed: {}", reply.text);
        }
    }
    let reply = app
        .post("/users")
        .json(json!({"name": "Ada\u{0}", "email": unique_email(), "password": password}))
        .send()
        .await;
    assert_eq!((reply.status, reply.body["code"].as_str()), (400, Some("invalid_name")), "{reply:?}");
    // A 10,000-character address is refused with a short excerpt, not echoed whole.
    let long = format!("{}@example.com", "x".repeat(10_000));
    let reply = app.post("/users").json(json!({"name": "A", "email": long, "password": password})).send().await;
    assert_eq!(reply.status, 400);
    assert!(reply.text.len() < 400, "{} bytes", reply.text.len());
    app.stop().await;
}

/// Fullwidth letters fold onto the ASCII account; look-alike letters from other scripts and
/// dotted capitals are refused in the local part; a non-ASCII domain is stored in punycode.
async fn look_alike_addresses_do_not_make_second_accounts(backend: Backend) {
    let app = spawn_app(backend).await;
    let password = "correct horse battery";
    let local = format!("ascii{}", uuid::Uuid::new_v4().simple());
    let ascii = format!("{local}@example.com");
    assert_eq!(
        app.post("/users").json(json!({"name": "A", "email": ascii, "password": password})).send().await.status,
        201
    );
    let fullwidth: String = local.chars().map(|c| char::from_u32(u32::from(c) + 0xFEE0).unwrap_or(c)).collect();
    let reply = app
        .post("/users")
        .json(json!({"name": "B", "email": format!("{fullwidth}@example.com"), "password": password}))
        .send()
        .await;
    assert_eq!(reply.status, 409, "fullwidth letters are the same address: {reply:?}");
    for email in [format!("\u{430}{local}@example.com"), format!("\u{130}{local}@example.com")] {
        let reply = app.post("/users").json(json!({"name": "C", "email": email, "password": password})).send().await;
        assert_eq!(reply.status, 400, "{email:?} -> {reply:?}");
        assert!(reply.message().contains("must be ASCII"), "{reply:?}");
    }
    let reply = app
        .post("/users")
        .json(json!({"name": "D", "email": format!("{local}@b\u{fc}cher.example"), "password": password}))
        .send()
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let stored = app.store.find_user_by_email(&format!("{local}@xn--bcher-kva.example")).await;
    assert!(stored.unwrap_or_else(|e| panic!("{e}")).is_some(), "stored in its ASCII form");
    app.stop().await;
}

async fn registration_is_idempotent_with_a_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let email = unique_email();
    let body = json!({"name": "Idem", "email": email, "password": "correct horse battery"});
    let first = app.post("/users").header("idempotency-key", "signup-42").json(body.clone()).send().await;
    assert_eq!(first.status, 201);
    // A retry (the first answer was lost on the way): the same answer, and no second user.
    let again = app.post("/users").header("idempotency-key", "signup-42").json(body.clone()).send().await;
    assert_eq!((again.status, &again.body), (201, &first.body));
    assert_eq!(again.headers.get("idempotent-replayed").and_then(|v| v.to_str().ok()), Some("true"));
    app.mailbox.nth_to(&email, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(app.mailbox.all_to(&email).len(), 1, "one registration, one e-mail");
    // The same key with another body is refused; no key means no replay (409: e-mail taken).
    let other = json!({"name": "Idem", "email": unique_email(), "password": "correct horse battery"});
    let reused = app.post("/users").header("idempotency-key", "signup-42").json(other).send().await;
    assert_eq!((reused.status, reused.body["code"].as_str()), (422, Some("idempotency_key_reused")));
    assert_eq!(app.post("/users").json(body.clone()).send().await.status, 409);
    // Error answers are replayed too; malformed keys are a 400.
    let bad = json!({"name": "Idem", "email": "not-an-email", "password": "correct horse battery"});
    for _ in 0..2 {
        let reply = app.post("/users").header("idempotency-key", "bad-1").json(bad.clone()).send().await;
        assert_eq!(reply.status, 400);
    }
    let malformed = app.post("/users").header("idempotency-key", &"k".repeat(300)).json(body).send().await;
    assert_eq!((malformed.status, malformed.body["code"].as_str()), (400, Some("invalid_idempotency_key")));
    app.stop().await;
}
