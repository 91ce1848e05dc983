//! The predecessor's e-mails, in plain text and HTML.
//!
//! Every interpolated value is URL-encoded inside links and HTML-escaped inside the HTML
//! part: addresses and base URLs come from users and configuration, not from us.

use anna_domain::user::{IssuedPasswordReset, IssuedVerification, iso};
use uuid::Uuid;

use super::{EmailMessage, EmailTag};

pub fn verification_email(
    app_base_url: &str,
    user_id: Uuid,
    email: &str,
    issued: &IssuedVerification,
    reason: &str,
) -> EmailMessage {
    let link = format!(
        "{}/verify?userId={}&token={}",
        base(app_base_url),
        percent_encode(&user_id.to_string()),
        percent_encode(&issued.token)
    );
    let expires = iso(issued.expires_at);
    let text =
        format!("Your verification code is {code}\n{link}\nThis code expires at {expires}\n", code = issued.code);
    let html = format!(
        "<p>Your verification code is <strong>{code}</strong></p>\n\
         <p><a href=\"{href}\">{label}</a></p>\n\
         <p>This code expires at {expires}</p>\n",
        code = html_escape(&issued.code),
        href = html_escape(&link),
        label = html_escape(&link),
        expires = html_escape(&expires),
    );
    EmailMessage {
        to: email.to_owned(),
        subject: "Verify your account".to_owned(),
        text,
        html,
        tag: EmailTag::Verification { code: issued.code.clone(), reason: reason.to_owned() },
    }
}

pub fn password_reset_email(app_base_url: &str, email: &str, issued: &IssuedPasswordReset) -> EmailMessage {
    let link = format!(
        "{}/reset-password?token={}&email={}",
        base(app_base_url),
        percent_encode(&issued.token),
        percent_encode(email)
    );
    let expires = iso(issued.expires_at);
    let text = format!("Reset your password using this link:\n{link}\nThis link expires at {expires}\n");
    let html = format!(
        "<p>Reset your password using this link:</p>\n\
         <p><a href=\"{href}\">{label}</a></p>\n\
         <p>This link expires at {expires}</p>\n",
        href = html_escape(&link),
        label = html_escape(&link),
        expires = html_escape(&expires),
    );
    EmailMessage {
        to: email.to_owned(),
        subject: "Reset your password".to_owned(),
        text,
        html,
        tag: EmailTag::PasswordReset,
    }
}

/// A configured base URL may end with `/`; links must not get `//verify`.
fn base(app_base_url: &str) -> &str {
    app_base_url.trim().trim_end_matches('/')
}

/// RFC 3986 query-value encoding: unreserved characters stay, every other UTF-8 byte
/// becomes `%XX` (so `+`, `&`, `=` and `@` cannot change the query's meaning).
fn percent_encode(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0F)]));
        }
    }
    out
}

fn html_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_unreserved_only() {
        assert_eq!(percent_encode("aZ09-._~"), "aZ09-._~");
        assert_eq!(percent_encode("a+b@c.d&e=f g/h"), "a%2Bb%40c.d%26e%3Df%20g%2Fh");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn html_escaping_covers_markup_and_quotes() {
        assert_eq!(html_escape(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }
}
