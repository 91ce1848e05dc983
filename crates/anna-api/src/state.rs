//! Shared state of the API: the backends, the use-cases, the edge's own settings and limiters.

use std::sync::Arc;

use anna_store::Store;
use anna_streams::Stream;
use anna_usecases::{Accounts, Media, Sessions, Webhooks};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ApiConfig;
use crate::rate_limit::{RateLimiters, SharedBudgets};
use crate::realtime::Realtime;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Arc<dyn Store>,
    /// The domain-event stream, which realtime feeds tail.
    pub stream: Arc<dyn Stream>,
    /// Users and authentication.
    pub accounts: Arc<Accounts>,
    /// WhatsApp sessions.
    pub sessions: Arc<Sessions>,
    /// Webhook endpoints and their delivery logs.
    pub webhooks: Arc<Webhooks>,
    /// Uploads and downloads of media objects.
    pub media: Arc<Media>,
    /// Uploads being received now (`MEDIA_UPLOAD_CONCURRENCY`).
    pub uploads: Arc<tokio::sync::Semaphore>,
    /// The session-event feed of the WebSockets.
    pub realtime: Arc<Realtime>,
    pub config: ApiConfig,
    pub limiters: RateLimiters,
    /// Work that outlives a request; drained on shutdown.
    pub background: TaskTracker,
    /// Cancelled when the process shuts down.
    pub shutdown: CancellationToken,
    pub metrics: Option<PrometheusHandle>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The use-cases the routes call.
pub struct UseCases {
    pub accounts: Arc<Accounts>,
    pub sessions: Arc<Sessions>,
    pub webhooks: Arc<Webhooks>,
    pub media: Arc<Media>,
}

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        stream: Arc<dyn Stream>,
        usecases: UseCases,
        config: ApiConfig,
        shared_budgets: Option<SharedBudgets>,
        metrics: Option<PrometheusHandle>,
        shutdown: CancellationToken,
    ) -> Self {
        let limiters = match shared_budgets {
            Some(shared) => RateLimiters::shared(config.rate_limit, shared),
            None => RateLimiters::new(config.rate_limit),
        };
        let realtime = Arc::new(Realtime::new(config.realtime.clone()));
        let UseCases { accounts, sessions, webhooks, media } = usecases;
        Self(Arc::new(Inner {
            store,
            stream,
            accounts,
            sessions,
            webhooks,
            media,
            uploads: Arc::new(tokio::sync::Semaphore::new(config.media_upload_concurrency.max(1))),
            realtime,
            config,
            limiters,
            background: TaskTracker::new(),
            shutdown,
            metrics,
        }))
    }
}
