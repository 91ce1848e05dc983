//! The whole registration flow with real e-mail transports: a local SMTP sink and a local HTTP
//! server standing in for the Resend API.

use std::time::Duration;

use anna_testkit::resend_fake::FakeResend;
use anna_testkit::smtp::SmtpSink;
use serde_json::json;

use crate::helpers::{Backend, spawn_app_with_configured_email, unique_email};

fn six_digit_code_after(text: &str, marker: &str) -> String {
    let start = text.find(marker).unwrap_or_else(|| panic!("{marker:?} not in {text}")) + marker.len();
    text[start..].chars().filter(char::is_ascii_digit).take(6).collect()
}

async fn registration_over_smtp(backend: Backend) {
    let sink = SmtpSink::start().await;
    let url = sink.url();
    let app =
        spawn_app_with_configured_email(backend, &[("SMTP_URL", &url), ("SMTP_FROM", "anna <no-reply@anna.test>")])
            .await;
    let email = unique_email();
    let id = app.register(&email, "correct horse battery").await;
    let mails = sink.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].to, vec![email.clone()]);
    let body = mails[0].decoded_body();
    assert!(body.contains("Verify your account"), "{body}");
    let code = six_digit_code_after(&body, "Your verification code is ");
    let reply = app.post(&format!("/users/{id}/verify")).json(json!({"code": code})).send().await;
    assert_eq!(reply.status, 200, "{reply:?}");
    app.stop().await;
}

async fn registration_over_resend(backend: Backend) {
    let resend = FakeResend::start().await;
    let base = resend.base_url();
    let key = "re_test_key_for_the_fake";
    let app = spawn_app_with_configured_email(
        backend,
        &[("RESEND_API_KEY", key), ("RESEND_FROM", "anna <no-reply@anna.test>"), ("RESEND_BASE_URL", &base)],
    )
    .await;
    let email = unique_email();
    let id = app.register(&email, "correct horse battery").await;
    let requests = resend.wait_for_requests(1, Duration::from_secs(10)).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].authorization.as_deref(), Some(format!("Bearer {key}").as_str()));
    assert_eq!(requests[0].body["to"], json!([email]));
    let text = requests[0].body["text"].as_str().unwrap_or_default().to_owned();
    let code = six_digit_code_after(&text, "Your verification code is ");
    let reply = app.post(&format!("/users/{id}/verify")).json(json!({"code": code})).send().await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(!app.logs.contents().contains(key), "the API key never reaches the logs");
    app.stop().await;
}

async fn failing_provider_loses_nothing(backend: Backend) {
    // The provider refuses: registration still succeeds and a resend can deliver later.
    let resend = FakeResend::start_failing(422, "domain not verified").await;
    let base = resend.base_url();
    let app = spawn_app_with_configured_email(
        backend,
        &[("RESEND_API_KEY", "re_test_key_for_the_fake"), ("RESEND_FROM", "a@anna.test"), ("RESEND_BASE_URL", &base)],
    )
    .await;
    let email = unique_email();
    app.register(&email, "correct horse battery").await;
    assert_eq!(resend.wait_for_requests(1, Duration::from_secs(10)).await.len(), 1);
    let resend_reply = app.post("/auth/resend-verification").json(json!({"email": email})).send().await;
    assert_eq!(resend_reply.status, 200);
    assert_eq!(resend.wait_for_requests(2, Duration::from_secs(10)).await.len(), 2);
    app.stop().await;
}

crate::on_both_backends!(registration_over_smtp, registration_over_resend, failing_provider_loses_nothing);
