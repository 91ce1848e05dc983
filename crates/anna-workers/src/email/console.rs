//! The development mailbox: e-mails go to standard output instead of the network.

use std::io::Write;

use super::{EmailError, EmailMessage, EmailSender, EmailTag};

/// Prints each e-mail to standard output.
///
/// Standard output rather than `tracing`: the body holds live codes and links, and log
/// pipelines ship, index and retain what they see. A developer reads stdout; nothing else
/// should.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsoleEmailSender;

impl ConsoleEmailSender {
    pub fn new() -> Self {
        Self
    }
}

#[async_trait::async_trait]
impl EmailSender for ConsoleEmailSender {
    fn kind(&self) -> &'static str {
        "console"
    }

    async fn send(&self, message: &EmailMessage) -> Result<(), EmailError> {
        let rendered = render(message);
        // One locked write so concurrent e-mails never interleave line by line.
        let mut out = std::io::stdout().lock();
        out.write_all(rendered.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| EmailError::Transport(format!("could not write to stdout: {e}")))
    }
}

fn render(message: &EmailMessage) -> String {
    let mut out = String::new();
    if let EmailTag::Verification { code, reason } = &message.tag {
        out.push_str(&format!("[UserVerificationCode] email={} code={} reason={}\n", message.to, code, reason));
    }
    out.push_str(&format!("----- e-mail to=<{}> subject=\"{}\" -----\n", message.to, message.subject));
    out.push_str(&message.text);
    if !message.text.ends_with('\n') {
        out.push('\n');
    }
    out.push_str("----- end of e-mail -----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_starts_with_the_predecessors_line() {
        let message = EmailMessage {
            to: "ana@example.com".to_owned(),
            subject: "Verify your account".to_owned(),
            text: "Your verification code is 123456\nhttp://x/verify?userId=1&token=t".to_owned(),
            html: "<p>ignored</p>".to_owned(),
            tag: EmailTag::Verification { code: "123456".to_owned(), reason: "signup".to_owned() },
        };
        let out = render(&message);
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("[UserVerificationCode] email=ana@example.com code=123456 reason=signup"));
        assert_eq!(lines.next(), Some("----- e-mail to=<ana@example.com> subject=\"Verify your account\" -----"));
        assert_eq!(lines.next(), Some("Your verification code is 123456"));
        assert_eq!(lines.next(), Some("http://x/verify?userId=1&token=t"));
        assert_eq!(lines.next(), Some("----- end of e-mail -----"));
        assert_eq!(lines.next(), None);
        assert!(!out.contains("ignored"));
    }

    #[test]
    fn other_mail_has_no_code_line() {
        let message = EmailMessage {
            to: "ana@example.com".to_owned(),
            subject: "Reset your password".to_owned(),
            text: "link\n".to_owned(),
            html: String::new(),
            tag: EmailTag::PasswordReset,
        };
        let out = render(&message);
        assert!(out.starts_with("----- e-mail to=<ana@example.com>"));
        assert!(!out.contains("[UserVerificationCode]"));
        assert!(out.ends_with("link\n----- end of e-mail -----\n"));
    }
}
