//! Login, refresh rotation and reuse detection, logout, password reset, rate limits, and the
//! absence of secrets in logs.

use serde_json::json;

use crate::helpers::{Backend, link_param, spawn_app, spawn_app_with, unique_email};

const PASSWORD: &str = "correct horse battery";

async fn login_does_not_enumerate(backend: Backend) {
    let app = spawn_app(backend).await;
    let active = unique_email();
    app.active_user(&active, PASSWORD).await;
    let pending = unique_email();
    app.register(&pending, PASSWORD).await;

    let unknown = app.login(&unique_email(), PASSWORD).await;
    let wrong = app.login(&active, "wrong password!").await;
    let pending_wrong = app.login(&pending, "wrong password!").await;
    for reply in [&unknown, &wrong, &pending_wrong] {
        assert_eq!(reply.status, 401);
        assert_eq!(reply.body, json!({"message": "Invalid credentials", "code": "invalid_credentials"}));
    }
    // Only a correct password learns that the account is not verified; no id, no status.
    let pending_right = app.login(&pending, PASSWORD).await;
    assert_eq!(pending_right.status, 403);
    assert!(!pending_right.text.contains("pending"), "{}", pending_right.text);

    let missing = app.post("/auth/login").json(json!({"email": active})).send().await;
    assert_eq!((missing.status, missing.message()), (400, "email and password are required"));
    let bad = app.login("nope", PASSWORD).await;
    assert_eq!(bad.status, 400);

    let ok = app.login(&format!(" {} ", active.to_uppercase()), PASSWORD).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.body["accessTokenExpiresIn"], 900);
    assert!(ok.set_cookie().contains("HttpOnly"));
    let me = app.get("/users/me").bearer(&ok.access_token()).send().await;
    assert_eq!(me.status, 200);
    app.stop().await;
}

async fn refresh_rotates_and_detects_reuse(backend: Backend) {
    let app = spawn_app(backend).await;
    let email = unique_email();
    app.active_user(&email, PASSWORD).await;
    let login = app.login(&email, PASSWORD).await;
    let first = login.cookie_pair();

    let missing = app.post("/auth/refresh").send().await;
    assert_eq!((missing.status, missing.message()), (401, "refresh token is required"));
    let unknown = app.post("/auth/refresh").cookie("refresh_token=deadbeef").send().await;
    assert_eq!((unknown.status, unknown.message()), (401, "Invalid refresh token"));

    let rotated = app.post("/auth/refresh").cookie(&first).send().await;
    assert_eq!(rotated.status, 200, "{rotated:?}");
    let second = rotated.cookie_pair();
    assert_ne!(first, second);
    assert!(rotated.set_cookie().contains("Max-Age=2592000"));
    assert_eq!(app.get("/users/me").bearer(&rotated.access_token()).send().await.status, 200);

    // Presenting the rotated-out token again revokes the whole family, including `second`.
    let reuse = app.post("/auth/refresh").cookie(&first).send().await;
    assert_eq!(reuse.status, 401);
    let after = app.post("/auth/refresh").cookie(&second).send().await;
    assert_eq!(after.status, 401, "family must be revoked after reuse");

    // Another login is another family, unaffected.
    let other = app.login(&email, PASSWORD).await;
    assert_eq!(app.post("/auth/refresh").cookie(&other.cookie_pair()).send().await.status, 200);
    app.stop().await;
}

async fn concurrent_refreshes_exactly_one_wins(backend: Backend) {
    let app = spawn_app(backend).await;
    let email = unique_email();
    app.active_user(&email, PASSWORD).await;
    for _round in 0..3 {
        let cookie = app.login(&email, PASSWORD).await.cookie_pair();
        let (a, b) = tokio::join!(
            app.post("/auth/refresh").cookie(&cookie).send(),
            app.post("/auth/refresh").cookie(&cookie).send()
        );
        let wins = [a.status, b.status].iter().filter(|s| **s == 200).count();
        assert_eq!(wins, 1, "statuses {} and {}", a.status, b.status);
        assert!([a.status, b.status].contains(&401));
    }
    app.stop().await;
}

async fn reuse_grace_window_does_not_revoke(backend: Backend) {
    let app = spawn_app_with(backend, &[("AUTH_REFRESH_REUSE_GRACE_MS", "60000")]).await;
    let email = unique_email();
    app.active_user(&email, PASSWORD).await;
    let first = app.login(&email, PASSWORD).await.cookie_pair();
    let second = app.post("/auth/refresh").cookie(&first).send().await.cookie_pair();
    assert_eq!(app.post("/auth/refresh").cookie(&first).send().await.status, 401);
    assert_eq!(app.post("/auth/refresh").cookie(&second).send().await.status, 200);
    app.stop().await;
}

async fn logout_and_logout_all(backend: Backend) {
    let app = spawn_app(backend).await;
    let email = unique_email();
    app.active_user(&email, PASSWORD).await;
    let one = app.login(&email, PASSWORD).await;
    let logout = app.post("/auth/logout").cookie(&one.cookie_pair()).send().await;
    assert_eq!(logout.status, 204);
    assert!(logout.text.is_empty());
    assert!(logout.set_cookie().contains("Max-Age=0"), "{}", logout.set_cookie());
    assert_eq!(app.post("/auth/refresh").cookie(&one.cookie_pair()).send().await.status, 401);
    // Without a cookie, logout still answers 204.
    assert_eq!(app.post("/auth/logout").send().await.status, 204);

    let a = app.login(&email, PASSWORD).await;
    let b = app.login(&email, PASSWORD).await;
    assert_eq!(app.post("/auth/logout-all").send().await.status, 401);
    for session in [&a, &b] {
        assert_eq!(app.get("/users/me").bearer(&session.access_token()).send().await.status, 200);
        assert_eq!(app.get("/sessions").bearer(&session.access_token()).send().await.status, 200);
    }
    let all = app.post("/auth/logout-all").bearer(&a.access_token()).send().await;
    assert_eq!(all.status, 204);
    assert!(all.set_cookie().contains("Max-Age=0"));
    for session in [&a, &b] {
        assert_eq!(app.post("/auth/refresh").cookie(&session.cookie_pair()).send().await.status, 401);
        // The access tokens stop at once too, on every route, not when they expire.
        for route in ["/users/me", "/sessions", "/webhooks"] {
            let refused = app.get(route).bearer(&session.access_token()).send().await;
            assert_eq!((refused.status, refused.message()), (401, "invalid access token"), "{route}");
        }
    }
    // A new login gets tokens of the new generation.
    let again = app.login(&email, PASSWORD).await;
    assert_eq!(app.get("/users/me").bearer(&again.access_token()).send().await.status, 200);
    let refreshed = app.post("/auth/refresh").cookie(&again.cookie_pair()).send().await;
    assert_eq!(app.get("/sessions").bearer(&refreshed.access_token()).send().await.status, 200);
    app.stop().await;
}

async fn resend_and_reset_do_not_enumerate(backend: Backend) {
    let app = spawn_app(backend).await;
    let active = unique_email();
    app.active_user(&active, PASSWORD).await;
    let pending = unique_email();
    app.register(&pending, PASSWORD).await;
    let unknown = unique_email();
    for route in ["/auth/resend-verification", "/auth/password-reset"] {
        for email in [&active, &pending, &unknown] {
            let started = std::time::Instant::now();
            let reply = app.post(route).json(json!({"email": email})).send().await;
            assert_eq!((reply.status, &reply.body), (200, &json!({"status": "ok"})), "{route} {email}");
            // A floor, never a ceiling: every answer waits out AUTH_UNIFORM_RESPONSE_MS.
            assert!(started.elapsed() >= std::time::Duration::from_millis(250), "{route} {email} answered early");
        }
        let missing = app.post(route).json(json!({})).send().await;
        assert_eq!((missing.status, missing.message()), (400, "email is required"));
    }
    // Only the right e-mails went out: a new code for the pending user, a reset for the active one.
    assert_eq!(app.mailbox.nth_to(&pending, 2).await.subject, "Verify your account");
    assert_eq!(app.mailbox.nth_to(&active, 2).await.subject, "Reset your password");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(app.mailbox.all_to(&active).len(), 2);
    assert_eq!(app.mailbox.all_to(&pending).len(), 2);
    assert!(app.mailbox.all_to(&unknown).is_empty());
    app.stop().await;
}

async fn password_reset_flow(backend: Backend) {
    let app = spawn_app(backend).await;
    let email = unique_email();
    let (id, _) = app.active_user(&email, PASSWORD).await;
    let session = app.login(&email, PASSWORD).await;
    assert_eq!(app.get("/users/me").bearer(&session.access_token()).send().await.status, 200);
    assert_eq!(app.post("/auth/password-reset").json(json!({"email": email})).send().await.status, 200);
    let mail = app.mailbox.nth_to(&email, 2).await;
    let token = link_param(&mail, "token");
    assert!(mail.text.contains("/reset-password?token="), "{}", mail.text);

    let confirm = |token: String, password: &str| {
        app.post("/auth/password-reset/confirm")
            .json(json!({"email": email, "token": token, "newPassword": password}))
            .send()
    };
    let missing = app.post("/auth/password-reset/confirm").json(json!({"email": email})).send().await;
    assert_eq!((missing.status, missing.message()), (400, "email, token and newPassword are required"));
    let wrong = confirm("f".repeat(64), "a new password").await;
    assert_eq!((wrong.status, wrong.message()), (400, "invalid password reset request"));
    let weak = confirm(token.clone(), "short").await;
    assert_eq!(weak.status, 400);
    let done = confirm(token.clone(), "a new password").await;
    assert_eq!((done.status, &done.body), (200, &json!({"status": "ok"})), "{done:?}");
    let reused = confirm(token, "another password").await;
    assert_eq!(reused.status, 400, "a reset token works once");

    assert_eq!(app.login(&email, PASSWORD).await.status, 401);
    assert_eq!(app.login(&email, "a new password").await.status, 200);
    // Every refresh and access token that existed before the reset is revoked.
    assert_eq!(app.post("/auth/refresh").cookie(&session.cookie_pair()).send().await.status, 401);
    assert_eq!(app.get("/users/me").bearer(&session.access_token()).send().await.status, 401);
    let fresh = app.login(&email, "a new password").await;
    assert_eq!(app.get("/users/me").bearer(&fresh.access_token()).send().await.status, 200);
    let names: Vec<_> =
        app.store.outbox_events_for_aggregate(&id).await.unwrap().into_iter().map(|r| r.event.event_name).collect();
    assert!(names.contains(&"user.password_reset.requested".to_owned()));
    assert_eq!(names.last().map(String::as_str), Some("user.password_reset.completed"));
    app.stop().await;
}

async fn reset_token_brute_force_cut_off(backend: Backend) {
    let app = spawn_app(backend).await;
    let email = unique_email();
    app.active_user(&email, PASSWORD).await;
    app.post("/auth/password-reset").json(json!({"email": email})).send().await;
    let token = link_param(&app.mailbox.nth_to(&email, 2).await, "token");
    for _ in 0..5 {
        let reply = app
            .post("/auth/password-reset/confirm")
            .json(json!({"email": email, "token": "0".repeat(64), "newPassword": "a new password"}))
            .send()
            .await;
        assert_eq!(reply.status, 400);
    }
    let late = app
        .post("/auth/password-reset/confirm")
        .json(json!({"email": email, "token": token, "newPassword": "a new password"}))
        .send()
        .await;
    assert_eq!(late.status, 400, "the token is void after 5 wrong attempts");
    app.stop().await;
}

async fn rate_limits_answer_429(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[
            ("RATE_LIMIT_ENABLED", "true"),
            ("RATE_LIMIT_PER_IP_PER_MINUTE", "3"),
            ("RATE_LIMIT_PER_ACCOUNT_PER_MINUTE", "2"),
        ],
    )
    .await;
    // Per account: the third login about one e-mail is refused, whatever the password.
    let email = unique_email();
    for _ in 0..2 {
        assert_eq!(app.login(&email, PASSWORD).await.status, 401);
    }
    let limited = app.login(&email, PASSWORD).await;
    assert_eq!(limited.status, 429);
    let retry_after: u64 =
        limited.headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // Per IP: the fourth login from this client is refused, for any e-mail.
    let limited = app.login(&unique_email(), PASSWORD).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    // Other limited routes have their own budgets.
    for _ in 0..3 {
        assert_eq!(app.post("/auth/password-reset").json(json!({"email": unique_email()})).send().await.status, 200);
    }
    assert_eq!(app.post("/auth/password-reset").json(json!({"email": unique_email()})).send().await.status, 429);
    app.stop().await;
}

async fn forwarded_for_is_used_only_from_trusted_proxies(backend: Backend) {
    let app = spawn_app_with(
        backend,
        &[("RATE_LIMIT_ENABLED", "true"), ("RATE_LIMIT_PER_IP_PER_MINUTE", "1"), ("TRUSTED_PROXIES", "127.0.0.1/32")],
    )
    .await;
    // Behind a trusted proxy each forwarded client has its own budget.
    for client in ["203.0.113.1", "203.0.113.2"] {
        let reply = app
            .post("/auth/resend-verification")
            .header("x-forwarded-for", client)
            .json(json!({"email": unique_email()}))
            .send()
            .await;
        assert_eq!(reply.status, 200);
    }
    let again = app
        .post("/auth/resend-verification")
        .header("x-forwarded-for", "203.0.113.1")
        .json(json!({"email": unique_email()}))
        .send()
        .await;
    assert_eq!(again.status, 429);
    app.stop().await;

    // Without trust, the header is ignored: one budget for the peer.
    let app = spawn_app_with(backend, &[("RATE_LIMIT_ENABLED", "true"), ("RATE_LIMIT_PER_IP_PER_MINUTE", "1")]).await;
    let first = app
        .post("/auth/resend-verification")
        .header("x-forwarded-for", "203.0.113.1")
        .json(json!({"email": unique_email()}))
        .send()
        .await;
    let second = app
        .post("/auth/resend-verification")
        .header("x-forwarded-for", "203.0.113.2")
        .json(json!({"email": unique_email()}))
        .send()
        .await;
    assert_eq!((first.status, second.status), (200, 429));
    app.stop().await;
}

async fn no_secrets_in_logs(backend: Backend) {
    let app = spawn_app(backend).await;
    let email = unique_email();
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let id = app.register(&email, &password).await;
    let mail = app.mailbox.nth_to(&email, 1).await;
    let code = crate::helpers::code_of(&mail);
    let link_token = link_param(&mail, "token");
    let verified = app.post(&format!("/users/{id}/verify")).json(json!({"code": code})).send().await;
    let login = app.login(&email, &password).await;
    let refreshed = app.post("/auth/refresh").cookie(&login.cookie_pair()).send().await;
    app.post("/auth/password-reset").json(json!({"email": email})).send().await;
    let reset_token = link_param(&app.mailbox.nth_to(&email, 2).await, "token");
    let new_password = format!("new-{}", uuid::Uuid::new_v4().simple());
    app.post("/auth/password-reset/confirm")
        .json(json!({"email": email, "token": reset_token, "newPassword": new_password}))
        .send()
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    let logs = app.logs.contents();
    assert!(logs.contains(&id), "the flow must have been logged at all");
    assert!(logs.contains("request_id"), "request logs carry the request id");
    let cookie_value = |pair: String| pair.split_once('=').map(|(_, v)| v.to_owned()).unwrap_or_default();
    let secrets = [
        ("password", password),
        ("new password", new_password),
        ("verification code in context", format!("code={code}")),
        ("link token", link_token),
        ("reset token", reset_token),
        ("access token", verified.access_token()),
        ("refresh cookie", cookie_value(login.cookie_pair())),
        ("rotated refresh cookie", cookie_value(refreshed.cookie_pair())),
    ];
    for (what, secret) in secrets {
        assert!(!secret.is_empty(), "{what} missing");
        assert!(!logs.contains(&secret), "{what} appears in the logs");
    }
    app.stop().await;
}

async fn outdated_password_hashes_are_replaced_at_login(backend: Backend) {
    use anna_domain::password::{Argon2Cost, PasswordHasher};
    let app = spawn_app(backend).await;
    let email = unique_email();
    let (id, _) = app.active_user(&email, PASSWORD).await;
    let id: uuid::Uuid = id.parse().unwrap();
    // As the predecessor (or an older cost setting) would have stored it.
    let old = PasswordHasher::new(Argon2Cost { memory_kib: 2048, iterations: 2, parallelism: 1 }).unwrap();
    let mut uow = app.store.begin().await.unwrap();
    let mut user = uow.find_user_by_id(id).await.unwrap().unwrap();
    user.password_hash = old.hash(PASSWORD).unwrap();
    uow.update_user(&user).await.unwrap();
    uow.commit().await.unwrap();

    assert_eq!(app.login(&email, PASSWORD).await.status, 200);
    let stored = app.store.find_user_by_id(id).await.unwrap().unwrap().password_hash;
    assert!(stored.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{stored}");
    assert_eq!(app.login(&email, PASSWORD).await.status, 200, "the new hash verifies");
    app.stop().await;
}

/// Two API processes on one database: a user the second one loaded serves its requests without
/// a database round trip, and a logout everywhere through the first one reaches it within
/// `AUTH_USER_CACHE_TTL_MS` — never later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_everywhere_reaches_other_api_processes_within_the_user_cache_ttl() {
    let first = spawn_app(Backend::Postgres).await;
    let database_url = first.env.get("DATABASE_URL").cloned().unwrap_or_default();
    let second = crate::helpers::spawn_app_roles(
        Backend::Postgres,
        &[("DATABASE_URL", &database_url), ("AUTH_USER_CACHE_TTL_MS", "300")],
        anna::app::Roles::API,
    )
    .await;
    let email = unique_email();
    first.active_user(&email, PASSWORD).await;
    let session = first.login(&email, PASSWORD).await;
    assert_eq!(second.get("/users/me").bearer(&session.access_token()).send().await.status, 200);
    let all = first.post("/auth/logout-all").bearer(&session.access_token()).send().await;
    assert_eq!(all.status, 204);
    assert_eq!(first.get("/users/me").bearer(&session.access_token()).send().await.status, 401, "at once here");
    // The other process refuses it as soon as its copy of the user is older than its TTL.
    let started = std::time::Instant::now();
    let mut refused = false;
    while !refused && started.elapsed() < std::time::Duration::from_secs(10) {
        refused = second.get("/users/me").bearer(&session.access_token()).send().await.status == 401;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(refused, "the voided token is still accepted by the other process");
    // A new login there is accepted at once: a cached user refusing a newer token is read again.
    let again = first.login(&email, PASSWORD).await;
    assert_eq!(second.get("/users/me").bearer(&again.access_token()).send().await.status, 200);
    // The next request there is answered from its copy of the user (the tests' apps share one
    // metrics registry; the first one is idle meanwhile).
    let hits = || async {
        let metrics = second.get("/metrics").send().await.text;
        metrics
            .lines()
            .find(|line| line.starts_with("auth_user_cache_hits_total"))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or_default()
    };
    let mut answered_from_copy = false;
    for _ in 0..10 {
        let before = hits().await;
        for _ in 0..2 {
            assert_eq!(second.get("/users/me").bearer(&again.access_token()).send().await.status, 200);
        }
        answered_from_copy = hits().await > before;
        if answered_from_copy {
            break;
        }
    }
    assert!(answered_from_copy, "every request read its user");
    second.stop().await;
    first.stop().await;
}

crate::on_both_backends!(
    outdated_password_hashes_are_replaced_at_login,
    login_does_not_enumerate,
    refresh_rotates_and_detects_reuse,
    concurrent_refreshes_exactly_one_wins,
    reuse_grace_window_does_not_revoke,
    logout_and_logout_all,
    resend_and_reset_do_not_enumerate,
    password_reset_flow,
    reset_token_brute_force_cut_off,
    rate_limits_answer_429,
    forwarded_for_is_used_only_from_trusted_proxies,
    no_secrets_in_logs,
);
