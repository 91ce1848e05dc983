//! Runs a process's long-lived tasks (the HTTP server, relay loops, stream readers, upkeep) and
//! notices when one of them ends by itself. A task that fails, panics or stops before shutdown
//! was requested stops the whole process — the other tasks are shut down gracefully and the
//! process exits non-zero — instead of the process limping on without it.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

pub struct Supervisor {
    tasks: JoinSet<anyhow::Result<()>>,
    names: HashMap<Id, String>,
    shutdown: CancellationToken,
}

impl Supervisor {
    /// Tasks watch `shutdown` and return when it is cancelled; the supervisor cancels it when
    /// a task fails.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self { tasks: JoinSet::new(), names: HashMap::new(), shutdown }
    }

    pub fn spawn(&mut self, name: impl Into<String>, task: impl Future<Output = anyhow::Result<()>> + Send + 'static) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name.into());
    }

    /// How many tasks run.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Waits until every task has ended. Returns the first failure: a task that returned an
    /// error, panicked, or returned before shutdown was requested.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_failure: Option<anyhow::Error> = None;
        while let Some(joined) = self.tasks.join_next_with_id().await {
            let (id, outcome) = match joined {
                Ok((id, outcome)) => (id, outcome),
                Err(error) => {
                    let id = error.id();
                    let cause = if error.is_panic() {
                        anyhow::anyhow!("panicked: {}", panic_message(error.into_panic()))
                    } else {
                        anyhow::anyhow!("was cancelled")
                    };
                    (id, Err(cause))
                }
            };
            let name = self.names.remove(&id).unwrap_or_else(|| "task".into());
            let failure = match outcome {
                Ok(()) if self.shutdown.is_cancelled() => None,
                Ok(()) => Some(anyhow::anyhow!("{name} stopped on its own")),
                Err(error) => Some(error.context(format!("{name} failed"))),
            };
            if let Some(failure) = failure {
                tracing::error!(task = %name, error = format!("{failure:#}"), "a task of this process ended: shutting down");
                self.shutdown.cancel();
                first_failure.get_or_insert(failure);
            }
        }
        first_failure.map_or(Ok(()), Err)
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".into()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn until_shutdown(token: &CancellationToken) -> impl Future<Output = anyhow::Result<()>> + use<> {
        let token = token.clone();
        async move {
            token.cancelled().await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_clean_shutdown_is_success() {
        let shutdown = CancellationToken::new();
        let mut supervisor = Supervisor::new(shutdown.clone());
        supervisor.spawn("a", until_shutdown(&shutdown));
        supervisor.spawn("b", until_shutdown(&shutdown));
        shutdown.cancel();
        assert!(supervisor.wait().await.is_ok());
    }

    #[tokio::test]
    async fn a_panicking_task_stops_the_others_and_is_reported() {
        let shutdown = CancellationToken::new();
        let mut supervisor = Supervisor::new(shutdown.clone());
        supervisor.spawn("survivor", until_shutdown(&shutdown));
        supervisor.spawn("relay", async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("boom");
        });
        let outcome = tokio::time::timeout(Duration::from_secs(5), supervisor.wait()).await;
        let error = outcome.unwrap_or_else(|_| panic!("the survivor was not stopped")).err();
        let message = error.map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(message.contains("relay") && message.contains("boom"), "{message}");
        assert!(shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn a_failing_task_stops_the_others_and_is_reported() {
        let shutdown = CancellationToken::new();
        let mut supervisor = Supervisor::new(shutdown.clone());
        supervisor.spawn("survivor", until_shutdown(&shutdown));
        supervisor.spawn("consumer", async { Err(anyhow::anyhow!("stream gone")) });
        let message = supervisor.wait().await.err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(message.contains("consumer failed") && message.contains("stream gone"), "{message}");
    }

    #[tokio::test]
    async fn a_task_that_returns_before_shutdown_is_a_failure() {
        let shutdown = CancellationToken::new();
        let mut supervisor = Supervisor::new(shutdown.clone());
        supervisor.spawn("quitter", async { Ok(()) });
        let message = supervisor.wait().await.err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(message.contains("quitter stopped on its own"), "{message}");
    }
}
