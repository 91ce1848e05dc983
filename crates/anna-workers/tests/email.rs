//! The e-mail senders against real local servers: the testkit's SMTP sink and fake Resend.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anna_domain::user::{IssuedPasswordReset, IssuedVerification};
use anna_testkit::resend_fake::FakeResend;
use anna_testkit::smtp::SmtpSink;
use anna_workers::email::templates::{password_reset_email, verification_email};
use anna_workers::email::{ConsoleEmailSender, EmailError, EmailSender, ResendEmailSender, SmtpEmailSender};
use serde_json::json;
use time::macros::datetime;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);
const CODE: &str = "482913";
/// Long enough that the link line exceeds 76 characters and lettre quoted-printables it.
const TOKEN: &str = "vt_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const API_KEY: &str = "re_test_SuperSecretKey_123";

fn issued() -> IssuedVerification {
    IssuedVerification {
        token: TOKEN.to_owned(),
        code: CODE.to_owned(),
        expires_at: datetime!(2026-01-03 04:05:06.789 UTC),
    }
}

#[tokio::test]
async fn smtp_delivers_a_verification_email() {
    let sink = SmtpSink::start().await;
    let sender = SmtpEmailSender::new(&sink.url(), "anna <no-reply@example.com>").unwrap();
    assert_eq!(sender.kind(), "smtp");
    let user_id = Uuid::new_v4();
    let message = verification_email("http://localhost:3000", user_id, "ana@example.com", &issued(), "signup");

    sender.send(&message).await.unwrap();

    let mails = sink.wait_for_messages(1, WAIT).await;
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.from, "no-reply@example.com");
    assert_eq!(mail.to, vec!["ana@example.com".to_owned()]);
    assert_eq!(mail.header("Subject").as_deref(), Some("Verify your account"));
    assert!(mail.header("From").is_some_and(|f| f.contains("no-reply@example.com")));
    assert!(mail.header("Content-Type").is_some_and(|c| c.starts_with("multipart/alternative")));
    let body = mail.decoded_body();
    assert!(body.contains(&format!("Your verification code is {CODE}")), "{body}");
    assert!(body.contains(&format!("<strong>{CODE}</strong>")), "{body}");
    let link = format!("http://localhost:3000/verify?userId={user_id}&token={TOKEN}");
    assert!(body.contains(&link), "{body}");
    assert!(body.contains("This code expires at 2026-01-03T04:05:06.789Z"), "{body}");
}

#[tokio::test]
async fn smtp_reuses_the_sender_for_several_emails() {
    let sink = SmtpSink::start().await;
    let sender = SmtpEmailSender::new(&sink.url(), "no-reply@example.com").unwrap();
    let reset = IssuedPasswordReset { token: TOKEN.to_owned(), expires_at: datetime!(2026-01-03 04:05:06.789 UTC) };
    for to in ["a@example.com", "b+tag@example.com"] {
        let message = password_reset_email("http://localhost:3000", to, &reset);
        sender.send(&message).await.unwrap();
    }

    let mails = sink.wait_for_messages(2, WAIT).await;
    assert_eq!(mails.len(), 2);
    assert_eq!(mails[1].to, vec!["b+tag@example.com".to_owned()]);
    let body = mails[1].decoded_body();
    assert!(
        body.contains(&format!("http://localhost:3000/reset-password?token={TOKEN}&email=b%2Btag%40example.com")),
        "{body}"
    );
}

#[tokio::test]
async fn smtp_refuses_a_bad_url_without_echoing_the_password() {
    for url in [
        "not a url",
        "http://user:hunter2@mail.example.com",
        "smtp://user:hunter2@/",
        "smtp://user:hunter2@mail.example.com?tls=sometimes",
    ] {
        match SmtpEmailSender::new(url, "no-reply@example.com") {
            Err(EmailError::InvalidConfig(reason)) => {
                assert!(!reason.contains("hunter2"), "{url}: {reason}");
                assert!(reason.contains("SMTP URL"), "{url}: {reason}");
            }
            other => panic!("{url}: expected InvalidConfig, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn smtp_refuses_a_bad_from() {
    for from in ["", "not an address", "anna <no-reply>"] {
        match SmtpEmailSender::new("smtp://127.0.0.1:2525", from) {
            Err(EmailError::InvalidConfig(reason)) => {
                assert!(reason.contains("sender address"), "{from}: {reason}");
            }
            other => panic!("{from:?}: expected InvalidConfig, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn smtp_sender_debug_hides_credentials() {
    let sender = SmtpEmailSender::new("smtp://mailer:hunter2@127.0.0.1:2525", "anna <no-reply@example.com>").unwrap();
    let shown = format!("{sender:?}");
    assert!(shown.contains("127.0.0.1:2525"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("mailer"), "{shown}");
}

#[tokio::test]
async fn smtp_unreachable_server_is_a_transport_error() {
    // Bind then drop, so the port is almost certainly closed.
    let port = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let sender = SmtpEmailSender::new(&format!("smtp://127.0.0.1:{port}"), "no-reply@example.com").unwrap();
    let message = verification_email("http://localhost:3000", Uuid::nil(), "ana@example.com", &issued(), "signup");
    match sender.send(&message).await {
        Err(EmailError::Transport(reason)) => {
            assert!(!reason.contains(CODE) && !reason.contains(TOKEN), "{reason}");
        }
        other => panic!("expected Transport, got {other:?}"),
    }
}

#[tokio::test]
async fn resend_posts_the_message_with_the_bearer_key() {
    let fake = FakeResend::start().await;
    let sender =
        ResendEmailSender::new(API_KEY.to_owned(), "anna <no-reply@example.com>".to_owned(), &fake.base_url()).unwrap();
    assert_eq!(sender.kind(), "resend");
    let message = verification_email("http://localhost:3000", Uuid::nil(), "ana@example.com", &issued(), "signup");

    sender.send(&message).await.unwrap();

    let requests = fake.wait_for_requests(1, WAIT).await;
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.authorization.as_deref(), Some(format!("Bearer {API_KEY}").as_str()));
    assert_eq!(
        request.body,
        json!({
            "from": "anna <no-reply@example.com>",
            "to": ["ana@example.com"],
            "subject": "Verify your account",
            "html": message.html,
            "text": message.text,
        })
    );
}

#[tokio::test]
async fn resend_accepts_a_base_url_with_a_trailing_slash() {
    let fake = FakeResend::start().await;
    let sender =
        ResendEmailSender::new(API_KEY.to_owned(), "no-reply@example.com".to_owned(), &format!("{}/", fake.base_url()))
            .unwrap();
    let message = verification_email("http://localhost:3000", Uuid::nil(), "ana@example.com", &issued(), "signup");
    sender.send(&message).await.unwrap();
    assert_eq!(fake.wait_for_requests(1, WAIT).await.len(), 1);
}

#[tokio::test]
async fn resend_refusal_is_rejected_with_its_message() {
    let fake = FakeResend::start_failing(422, "Invalid `to` field.").await;
    let sender =
        ResendEmailSender::new(API_KEY.to_owned(), "no-reply@example.com".to_owned(), &fake.base_url()).unwrap();
    let message = verification_email("http://localhost:3000", Uuid::nil(), "ana@example.com", &issued(), "signup");

    let err = sender.send(&message).await.unwrap_err();

    assert_eq!(err, EmailError::Rejected { status: 422, message: "Invalid `to` field.".to_owned() });
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(API_KEY), "{shown}");
}

#[tokio::test]
async fn resend_unreachable_server_is_a_transport_error_without_the_key() {
    let port = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let sender = ResendEmailSender::new(
        API_KEY.to_owned(),
        "no-reply@example.com".to_owned(),
        &format!("http://127.0.0.1:{port}"),
    )
    .unwrap();
    let message = verification_email("http://localhost:3000", Uuid::nil(), "ana@example.com", &issued(), "signup");
    match sender.send(&message).await {
        Err(err @ EmailError::Transport(_)) => {
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains(API_KEY), "{shown}");
        }
        other => panic!("expected Transport, got {other:?}"),
    }
}

#[test]
fn resend_refuses_bad_configuration() {
    let bad = [
        (String::new(), "no-reply@example.com", "https://api.resend.com"),
        (API_KEY.to_owned(), "not an address", "https://api.resend.com"),
        (API_KEY.to_owned(), "no-reply@example.com", "not a url"),
        (format!("{API_KEY}\n"), "no-reply@example.com", "ftp://api.resend.com"),
        ("re_bad\u{7}key".to_owned(), "no-reply@example.com", "https://api.resend.com"),
    ];
    for (key, from, base) in bad {
        match ResendEmailSender::new(key, from.to_owned(), base) {
            Err(err @ EmailError::InvalidConfig(_)) => {
                let shown = format!("{err} {err:?}");
                assert!(!shown.contains("re_test_") && !shown.contains("re_bad"), "{shown}");
            }
            other => panic!("{from} {base}: expected InvalidConfig, got {other:?}"),
        }
    }
}

#[test]
fn debug_output_never_shows_secrets() {
    let message = verification_email("http://localhost:3000", Uuid::nil(), "ana@example.com", &issued(), "signup");
    let shown = format!("{message:?}");
    assert!(shown.contains("ana@example.com"), "{shown}");
    assert!(shown.contains("Verify your account"), "{shown}");
    assert!(!shown.contains(CODE), "{shown}");
    assert!(!shown.contains(TOKEN), "{shown}");

    let reset = password_reset_email(
        "http://localhost:3000",
        "ana@example.com",
        &IssuedPasswordReset { token: TOKEN.to_owned(), expires_at: datetime!(2026-01-03 04:05:06.789 UTC) },
    );
    let shown = format!("{reset:?}");
    assert!(!shown.contains(TOKEN), "{shown}");

    let resend =
        ResendEmailSender::new(API_KEY.to_owned(), "no-reply@example.com".to_owned(), "https://api.resend.com")
            .unwrap();
    let shown = format!("{resend:?}");
    assert!(shown.contains("api.resend.com"), "{shown}");
    assert!(!shown.contains(API_KEY), "{shown}");

    let console = ConsoleEmailSender::new();
    assert_eq!(console.kind(), "console");
    assert!(!format!("{console:?}").contains(CODE));
}

#[tokio::test]
async fn console_sender_accepts_every_message() {
    let message = verification_email("http://localhost:3000", Uuid::nil(), "ana@example.com", &issued(), "signup");
    ConsoleEmailSender::new().send(&message).await.unwrap();
}

mod templates {
    use anna_workers::email::EmailTag;

    use super::*;

    fn awkward() -> IssuedVerification {
        IssuedVerification {
            token: "tok+en/=&x".to_owned(),
            code: "012345".to_owned(),
            expires_at: datetime!(2026-01-03 04:05:06.789 UTC),
        }
    }

    #[test]
    fn verification_text_has_the_predecessors_three_lines() {
        let message =
            verification_email("https://app.example.com/", Uuid::nil(), "ana@example.com", &awkward(), "signup");
        assert_eq!(message.to, "ana@example.com");
        assert_eq!(message.subject, "Verify your account");
        let lines: Vec<&str> = message.text.lines().collect();
        assert_eq!(
            lines,
            vec![
                "Your verification code is 012345",
                "https://app.example.com/verify?userId=00000000-0000-0000-0000-000000000000&token=tok%2Ben%2F%3D%26x",
                "This code expires at 2026-01-03T04:05:06.789Z",
            ]
        );
        assert_eq!(message.tag, EmailTag::Verification { code: "012345".to_owned(), reason: "signup".to_owned() });
    }

    #[test]
    fn verification_html_escapes_and_links() {
        let message = verification_email(
            "https://app.example.com/?a=\"<b>",
            Uuid::nil(),
            "ana@example.com",
            &awkward(),
            "resend",
        );
        assert!(message.html.contains("<strong>012345</strong>"), "{}", message.html);
        assert!(
            message.html.contains(
                "<a href=\"https://app.example.com/?a=&quot;&lt;b&gt;/verify?userId=00000000-0000-0000-0000-000000000000&amp;token=tok%2Ben%2F%3D%26x\">"
            ),
            "{}",
            message.html
        );
        assert!(!message.html.contains("\"<b>"), "{}", message.html);
        assert!(message.html.contains("This code expires at 2026-01-03T04:05:06.789Z"));
    }

    #[test]
    fn verification_html_escapes_the_code() {
        let issued = IssuedVerification { code: "<i>1</i>".to_owned(), ..awkward() };
        let message = verification_email("http://x", Uuid::nil(), "a@b.c", &issued, "signup");
        assert!(message.html.contains("<strong>&lt;i&gt;1&lt;/i&gt;</strong>"), "{}", message.html);
    }

    #[test]
    fn reset_link_encodes_the_address_and_hides_the_bare_token() {
        let issued = IssuedPasswordReset {
            token: "reset-token-123".to_owned(),
            expires_at: datetime!(2026-01-03 04:05:06.789 UTC),
        };
        let message = password_reset_email("http://localhost:3000", "a+b@example.com", &issued);
        assert_eq!(message.to, "a+b@example.com");
        assert_eq!(message.subject, "Reset your password");
        assert_eq!(message.tag, EmailTag::PasswordReset);
        let link = "http://localhost:3000/reset-password?token=reset-token-123&email=a%2Bb%40example.com";
        assert!(message.text.lines().any(|l| l == link), "{}", message.text);
        assert!(message.text.lines().any(|l| l == "This link expires at 2026-01-03T04:05:06.789Z"), "{}", message.text);
        assert!(!message.text.lines().any(|l| l.trim() == "reset-token-123"));
        assert!(message.html.contains(&format!("href=\"{}\"", link.replace('&', "&amp;"))), "{}", message.html);
    }

    #[test]
    fn reset_html_escapes_the_address() {
        let issued = IssuedPasswordReset { token: "t".to_owned(), expires_at: datetime!(2026-01-03 04:05:06.789 UTC) };
        let message = password_reset_email("http://localhost:3000", "<x>@example.com", &issued);
        assert!(!message.html.contains("<x>"), "{}", message.html);
        assert!(message.html.contains("email=%3Cx%3E%40example.com"), "{}", message.html);
    }
}
