//! Delivery through the Resend HTTP API (`POST /emails`).

use std::fmt;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};

use super::{EmailError, EmailMessage, EmailSender, parse_from};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Enough of an error body to explain a refusal without copying a whole HTML error page.
const MAX_ERROR_CHARS: usize = 500;

pub struct ResendEmailSender {
    client: reqwest::Client,
    /// `Bearer <key>`, marked sensitive so reqwest and hyper never print it.
    authorization: HeaderValue,
    from: String,
    endpoint: reqwest::Url,
}

impl ResendEmailSender {
    /// `base_url` is `https://api.resend.com` in production; tests point it at a fake.
    pub fn new(api_key: String, from: String, base_url: &str) -> Result<Self, EmailError> {
        let api_key = api_key.trim();
        if api_key.is_empty() {
            return Err(EmailError::InvalidConfig("the Resend API key is empty".to_owned()));
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {api_key}")).map_err(|_| {
            EmailError::InvalidConfig("the Resend API key contains characters not allowed in an HTTP header".to_owned())
        })?;
        authorization.set_sensitive(true);

        parse_from(&from)?;
        let endpoint = emails_endpoint(base_url)?;
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| EmailError::InvalidConfig(format!("could not build the HTTP client: {e}")))?;
        Ok(Self { client, authorization, from: from.trim().to_owned(), endpoint })
    }
}

impl fmt::Debug for ResendEmailSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResendEmailSender")
            .field("endpoint", &self.endpoint.as_str())
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize)]
struct SendEmailRequest<'a> {
    from: &'a str,
    to: [&'a str; 1],
    subject: &'a str,
    html: &'a str,
    text: &'a str,
}

#[async_trait::async_trait]
impl EmailSender for ResendEmailSender {
    fn kind(&self) -> &'static str {
        "resend"
    }

    async fn send(&self, message: &EmailMessage) -> Result<(), EmailError> {
        let body = SendEmailRequest {
            from: &self.from,
            to: [message.to.trim()],
            subject: &message.subject,
            html: &message.html,
            text: &message.text,
        };
        let response = self
            .client
            .post(self.endpoint.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .json(&body)
            .send()
            .await
            .map_err(|e| EmailError::Transport(format!("Resend request failed: {e}")))?;

        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // A failure to read the error body must not hide the status, which is what matters.
        let raw = response.text().await.unwrap_or_default();
        Err(EmailError::Rejected { status: status.as_u16(), message: rejection_message(status, &raw) })
    }
}

fn rejection_message(status: reqwest::StatusCode, raw: &str) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(raw)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned));
    let message = from_json.unwrap_or_else(|| raw.trim().to_owned());
    if message.is_empty() {
        return status.canonical_reason().unwrap_or("no reason given").to_owned();
    }
    message.chars().take(MAX_ERROR_CHARS).collect()
}

fn emails_endpoint(base_url: &str) -> Result<reqwest::Url, EmailError> {
    let trimmed = base_url.trim().trim_end_matches('/');
    let url = reqwest::Url::parse(&format!("{trimmed}/emails"))
        .map_err(|e| EmailError::InvalidConfig(format!("the Resend base URL <{trimmed}> is not a URL: {e}")))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(EmailError::InvalidConfig(format!("the Resend base URL <{trimmed}> must use http or https")));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_appends_emails_once() {
        let url = emails_endpoint("https://api.resend.com/");
        assert_eq!(url.map(|u| u.to_string()), Ok("https://api.resend.com/emails".to_owned()));
        assert!(matches!(emails_endpoint("ftp://x"), Err(EmailError::InvalidConfig(_))));
        assert!(matches!(emails_endpoint(""), Err(EmailError::InvalidConfig(_))));
    }

    #[test]
    fn rejection_prefers_the_json_message() {
        let status = reqwest::StatusCode::UNPROCESSABLE_ENTITY;
        let raw = r#"{"statusCode":422,"message":"Invalid `to` field","name":"validation_error"}"#;
        assert_eq!(rejection_message(status, raw), "Invalid `to` field");
        assert_eq!(rejection_message(status, "plain words"), "plain words");
        assert_eq!(rejection_message(status, ""), "Unprocessable Entity");
    }
}
