//! `EMAIL_PROVIDER`, `SMTP_*`, `RESEND_*`, `APP_BASE_URL`: how e-mails leave and where their
//! links point.

use secrecy::SecretString;

use super::{ConfigError, Vars};

#[derive(Debug, Clone)]
pub struct EmailConfig {
    pub provider: EmailProvider,
    /// Base of the links in e-mails.
    pub app_base_url: String,
}

#[derive(Debug, Clone)]
pub enum EmailProvider {
    /// The development mailbox: e-mails are printed to stdout.
    Console,
    Smtp {
        /// May carry a password.
        url: SecretString,
        from: String,
    },
    Resend {
        api_key: SecretString,
        from: String,
        base_url: String,
    },
}

impl EmailProvider {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Console => "console",
            Self::Smtp { .. } => "smtp",
            Self::Resend { .. } => "resend",
        }
    }
}

pub(super) fn read<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<EmailConfig, ConfigError> {
    Ok(EmailConfig {
        provider: provider(vars)?,
        app_base_url: vars.string("APP_BASE_URL", "http://localhost:3000").trim_end_matches('/').to_owned(),
    })
}

fn provider<F: Fn(&str) -> Option<String>>(vars: &Vars<F>) -> Result<EmailProvider, ConfigError> {
    let smtp_url = vars.secret("SMTP_URL");
    let resend_key = vars.secret("RESEND_API_KEY");
    let default = if smtp_url.is_some() {
        "smtp"
    } else if resend_key.is_some() {
        "resend"
    } else {
        "console"
    };
    match vars.string("EMAIL_PROVIDER", default).to_ascii_lowercase().as_str() {
        "console" => Ok(EmailProvider::Console),
        "smtp" => {
            let url = smtp_url.ok_or_else(|| {
                ConfigError::Inconsistent("EMAIL_PROVIDER=smtp needs SMTP_URL (smtp://user:password@host:port)".into())
            })?;
            Ok(EmailProvider::Smtp { url, from: vars.string("SMTP_FROM", "anna <no-reply@localhost>") })
        }
        "resend" => {
            let api_key = resend_key
                .ok_or_else(|| ConfigError::Inconsistent("EMAIL_PROVIDER=resend needs RESEND_API_KEY".into()))?;
            let from = vars
                .get("RESEND_FROM")
                .ok_or_else(|| ConfigError::Inconsistent("EMAIL_PROVIDER=resend needs RESEND_FROM".into()))?;
            Ok(EmailProvider::Resend {
                api_key,
                from,
                base_url: vars.string("RESEND_BASE_URL", "https://api.resend.com"),
            })
        }
        other => Err(ConfigError::Invalid {
            var: "EMAIL_PROVIDER",
            shown: format!("{other:?}"),
            expected: "console, smtp or resend",
        }),
    }
}
