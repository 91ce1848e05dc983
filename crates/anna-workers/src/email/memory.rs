//! A test double: keeps every message in memory instead of delivering it. Never selected by
//! configuration; tests and benchmarks construct it to read codes and links.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use super::{EmailError, EmailMessage, EmailSender, EmailTag};

#[derive(Default)]
pub struct MemoryMailbox {
    messages: Mutex<Vec<EmailMessage>>,
    arrived: Notify,
}

#[async_trait::async_trait]
impl EmailSender for MemoryMailbox {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn send(&self, message: &EmailMessage) -> Result<(), EmailError> {
        self.messages.lock().unwrap_or_else(|e| e.into_inner()).push(message.clone());
        self.arrived.notify_waiters();
        Ok(())
    }
}

impl MemoryMailbox {
    /// Every message sent to `to`, oldest first.
    pub fn all_to(&self, to: &str) -> Vec<EmailMessage> {
        self.messages.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|m| m.to == to).cloned().collect()
    }

    /// Waits up to `timeout` for the `n`-th message (1-based) sent to `to`.
    pub async fn wait_for(&self, to: &str, n: usize, timeout: Duration) -> Option<EmailMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            if let Some(message) = self.all_to(to).into_iter().nth(n.saturating_sub(1)) {
                return Some(message);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// The six-digit code of a verification e-mail.
pub fn verification_code(message: &EmailMessage) -> Option<&str> {
    match &message.tag {
        EmailTag::Verification { code, .. } => Some(code),
        _ => None,
    }
}
