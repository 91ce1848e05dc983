//! Outgoing e-mail: the message type, the sender trait and its three implementations
//! (development console, SMTP relay, Resend HTTP API), plus the predecessor's templates.
//!
//! Messages carry one-time secrets (verification codes, reset links), so nothing in this
//! module prints a body, a code, a token, an API key or an SMTP password through `Debug`,
//! `Display` or `tracing`. The console sender is the one deliberate exception: it is the
//! development mailbox and writes the e-mail to standard output.

mod console;
mod memory;
mod resend;
mod smtp;
pub mod templates;

use std::fmt;

pub use console::ConsoleEmailSender;
pub use memory::{MemoryMailbox, verification_code};
pub use resend::ResendEmailSender;
pub use smtp::SmtpEmailSender;

/// One e-mail to deliver, already rendered.
#[derive(Clone, PartialEq, Eq)]
pub struct EmailMessage {
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: String,
    pub tag: EmailTag,
}

impl fmt::Debug for EmailMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailMessage")
            .field("to", &self.to)
            .field("subject", &self.subject)
            .field("tag", &self.tag.kind())
            .finish_non_exhaustive()
    }
}

/// What an e-mail is about. The console sender uses it to print the predecessor's grep-able
/// `[UserVerificationCode]` line, which operators and end-to-end scripts rely on.
#[derive(Clone, PartialEq, Eq)]
pub enum EmailTag {
    Verification { code: String, reason: String },
    PasswordReset,
    Other,
}

impl EmailTag {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Verification { .. } => "verification",
            Self::PasswordReset => "password_reset",
            Self::Other => "other",
        }
    }
}

impl fmt::Debug for EmailTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Verification { reason, .. } => {
                f.debug_struct("Verification").field("reason", reason).finish_non_exhaustive()
            }
            Self::PasswordReset => f.write_str("PasswordReset"),
            Self::Other => f.write_str("Other"),
        }
    }
}

/// Why an e-mail could not be built or delivered. Messages never contain secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmailError {
    /// The sender's configuration is unusable; detected at start-up.
    #[error("invalid e-mail configuration: {0}")]
    InvalidConfig(String),
    /// The message itself cannot be sent (e.g. the recipient is not an address).
    #[error("invalid e-mail message: {0}")]
    InvalidMessage(String),
    /// The provider could not be reached or the exchange failed midway; may be retried.
    #[error("e-mail transport failed: {0}")]
    Transport(String),
    /// The provider answered and refused the message (HTTP status or SMTP reply code).
    #[error("e-mail rejected by the provider ({status}): {message}")]
    Rejected { status: u16, message: String },
}

#[async_trait::async_trait]
pub trait EmailSender: Send + Sync + 'static {
    /// `"console"`, `"smtp"` or `"resend"`.
    fn kind(&self) -> &'static str;

    async fn send(&self, message: &EmailMessage) -> Result<(), EmailError>;
}

/// Shared by the SMTP and Resend senders so both accept the same `from` syntax.
fn parse_from(from: &str) -> Result<lettre::message::Mailbox, EmailError> {
    let trimmed = from.trim();
    if trimmed.is_empty() {
        return Err(EmailError::InvalidConfig("the sender address (from) is empty".to_owned()));
    }
    trimmed.parse().map_err(|e| {
        EmailError::InvalidConfig(format!(
            "the sender address (from) <{trimmed}> is not a mailbox such as \
             \"anna <no-reply@example.com>\" or \"no-reply@example.com\": {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> EmailMessage {
        EmailMessage {
            to: "ana@example.com".to_owned(),
            subject: "Verify your account".to_owned(),
            text: "code 123456 token tok-secret".to_owned(),
            html: "<strong>123456</strong> tok-secret".to_owned(),
            tag: EmailTag::Verification { code: "123456".to_owned(), reason: "signup".to_owned() },
        }
    }

    #[test]
    fn debug_hides_bodies_and_code() {
        let shown = format!("{:?}", message());
        assert!(shown.contains("ana@example.com"));
        assert!(shown.contains("Verify your account"));
        assert!(shown.contains("verification"));
        assert!(!shown.contains("123456"));
        assert!(!shown.contains("tok-secret"));
        let tag = format!("{:?}", message().tag);
        assert!(!tag.contains("123456"));
    }

    #[test]
    fn from_accepts_named_and_bare_mailboxes() {
        assert!(parse_from("anna <no-reply@example.com>").is_ok());
        assert!(parse_from("no-reply@example.com").is_ok());
        assert!(matches!(parse_from("not an address"), Err(EmailError::InvalidConfig(_))));
        assert!(matches!(parse_from("  "), Err(EmailError::InvalidConfig(_))));
    }
}
