//! The HTTP/1.1 server loop, hardened against slow and idle clients: a connection must deliver
//! a complete request head within `HTTP_HEADER_READ_TIMEOUT_MS` (counted from its start or from
//! the end of its previous exchange, so an idle keep-alive connection closes after it too), a
//! whole request body must arrive within `HTTP_BODY_READ_TIMEOUT_MS`, and at most
//! `HTTP_MAX_CONNECTIONS` connections are open at once (more are closed as soon as they are
//! accepted, and counted). Shutdown stops accepting, lets in-flight exchanges finish, and
//! closes idle connections.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Limits of the HTTP edge.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    /// The same for a media upload (`POST /media`), whose body is far larger.
    pub upload_read_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown`; then waits up to `drain` for open exchanges.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    drain: Duration,
) -> std::io::Result<()> {
    // A deadline for the whole body, not a timeout between chunks: a byte every few seconds
    // must not keep a request open for hours.
    let app =
        app.layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
            let deadline = if anna_api::media::is_upload(request.method(), request.uri().path()) {
                limits.upload_read_timeout
            } else {
                limits.body_read_timeout
            };
            next.run(request.map(|body| axum::body::Body::new(tower_http::timeout::DeadlineBody::new(deadline, body))))
        }));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    // HTTP/1.1 only (behind a proxy, as anna runs, that is what arrives): HTTP/2 needs a
    // protocol sniff that waits for bytes with no timer, and has no idle limit of its own.
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    loop {
        let (stream, remote) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait a little instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("http_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let seen = Arc::new(AtomicBool::new(false));
        let started = seen.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            started.store(true, Ordering::Relaxed);
            request.extensions_mut().insert(ConnectInfo(remote));
            let app = app.clone();
            async move {
                let response = tower::ServiceExt::oneshot(app, request.map(axum::body::Body::new)).await;
                Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
            }
        });
        let io = TokioIo::new(stream);
        let connection = builder.serve_connection_with_upgrades(io, service).into_owned();
        let connection = graceful.watch(connection);
        let silence = limits.header_read_timeout;
        tokio::spawn(async move {
            metrics::gauge!("http_connections_open").increment(1.0);
            let mut connection = std::pin::pin!(connection);
            // A connection that has not delivered a complete first request within the head
            // timeout is closed here, whatever hyper's own timers do.
            let ended = tokio::select! {
                ended = &mut connection => Some(ended),
                () = tokio::time::sleep(silence) => None,
            };
            let ended = match ended {
                Some(ended) => ended,
                None if !seen.load(Ordering::Relaxed) => Ok(()),
                None => connection.await,
            };
            if let Err(error) = ended {
                tracing::debug!(error = %error, %remote, "connection ended with an error");
            }
            metrics::gauge!("http_connections_open").decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(timeout_ms = drain.as_millis() as u64, "open connections did not finish in time");
    }
    Ok(())
}

/// Raises the soft limit of open files to the hard limit, so connections (one descriptor each)
/// are bounded by `HTTP_MAX_CONNECTIONS` rather than by a default of 1,024. Returns the limit
/// in force.
pub fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(error) => {
            tracing::warn!(%error, "cannot raise the open-file limit");
            None
        }
    }
}

/// A connection limit that the open-file limit can hold, leaving room for the database pool,
/// the stream connections and the process's other files.
pub fn check_connection_limit(max_connections: usize, open_files: Option<u64>) {
    const OTHER_FILES: u64 = 256;
    if let Some(limit) = open_files
        && (max_connections as u64).saturating_add(OTHER_FILES) > limit
    {
        tracing::warn!(
            max_connections,
            open_file_limit = limit,
            "HTTP_MAX_CONNECTIONS is close to or above the open-file limit: accepts will fail before the cap"
        );
    }
}
