//! Delivery through an SMTP relay with lettre.

use std::fmt;
use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{EmailError, EmailMessage, EmailSender, parse_from};

/// Bounds both each SMTP command and the whole exchange, so a stuck relay cannot hold a
/// request (or a worker) for longer than this.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends through `smtp://user:pass@host:port`, `smtps://…` (implicit TLS) or
/// `smtp://…?tls=required` (STARTTLS), as lettre's connection URLs define them.
pub struct SmtpEmailSender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// `scheme://host:port` only: the URL's credentials never leave `new`.
    endpoint: String,
}

impl SmtpEmailSender {
    /// Must be called inside a Tokio runtime: lettre's connection pool spawns its reaper
    /// task when the transport is built.
    pub fn new(smtp_url: &str, from: &str) -> Result<Self, EmailError> {
        let from = parse_from(from)?;
        let endpoint = describe_endpoint(smtp_url)?;
        let builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(smtp_url.trim())
            .map_err(|e| EmailError::InvalidConfig(format!("the SMTP URL for {endpoint} is not usable: {e}")))?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(EmailError::InvalidConfig("the SMTP sender must be created inside a Tokio runtime".to_owned()));
        }
        let transport = builder.timeout(Some(SEND_TIMEOUT)).build();
        Ok(Self { transport, from, endpoint })
    }
}

impl fmt::Debug for SmtpEmailSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpEmailSender")
            .field("endpoint", &self.endpoint)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl EmailSender for SmtpEmailSender {
    fn kind(&self) -> &'static str {
        "smtp"
    }

    async fn send(&self, message: &EmailMessage) -> Result<(), EmailError> {
        let to: Mailbox = message.to.trim().parse().map_err(|e| {
            EmailError::InvalidMessage(format!("the recipient <{}> is not an address: {e}", message.to))
        })?;
        let email = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(message.subject.as_str())
            .multipart(MultiPart::alternative_plain_html(message.text.clone(), message.html.clone()))
            .map_err(|e| EmailError::InvalidMessage(format!("could not build the e-mail: {e}")))?;

        match tokio::time::timeout(SEND_TIMEOUT, self.transport.send(email)).await {
            Err(_) => Err(EmailError::Transport(format!(
                "SMTP delivery through {} timed out after {}s",
                self.endpoint,
                SEND_TIMEOUT.as_secs()
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(map_smtp_error(&self.endpoint, &e)),
        }
    }
}

fn map_smtp_error(endpoint: &str, e: &lettre::transport::smtp::Error) -> EmailError {
    match e.status() {
        Some(code) if e.is_permanent() => EmailError::Rejected { status: u16::from(code), message: e.to_string() },
        _ => EmailError::Transport(format!("SMTP delivery through {endpoint} failed: {e}")),
    }
}

/// Validates the URL's shape and keeps only what is safe to show in errors and `Debug`.
fn describe_endpoint(smtp_url: &str) -> Result<String, EmailError> {
    let url = reqwest::Url::parse(smtp_url.trim()).map_err(|e| {
        // The url crate's messages do not quote the input, so no password can leak here.
        EmailError::InvalidConfig(format!("the SMTP URL is not a URL: {e}"))
    })?;
    let scheme = url.scheme();
    if scheme != "smtp" && scheme != "smtps" {
        return Err(EmailError::InvalidConfig(format!(
            "the SMTP URL must start with smtp:// or smtps://, not {scheme}://"
        )));
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(EmailError::InvalidConfig("the SMTP URL has no host".to_owned()));
    };
    Ok(match url.port() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_drops_credentials() {
        let shown = describe_endpoint("smtp://user:hunter2@mail.example.com:2525");
        assert_eq!(shown, Ok("smtp://mail.example.com:2525".to_owned()));
    }

    #[test]
    fn endpoint_rejects_other_schemes_and_garbage() {
        assert!(matches!(describe_endpoint("http://mail.example.com"), Err(EmailError::InvalidConfig(_))));
        assert!(matches!(describe_endpoint("not a url"), Err(EmailError::InvalidConfig(_))));
    }
}
