//! The body of an upload, read to its end after the handler answered.
//!
//! An upload refused as too large is answered while the client may still be sending (the rest
//! of the file, the multipart's closing boundary, the chunked encoding's last chunk): a server
//! that closes the connection with bytes unread makes the client's kernel see a reset, and the
//! client the reset instead of the 413. The handler reads the body through [`SharedBody`];
//! once it has answered, the middleware reads and drops what it left, within
//! [`DRAIN_WAIT`] — the body is already cut at the upload limit, so this is bounded in bytes
//! and in time.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body::Frame;
use http_body_util::{BodyExt as _, Limited};

/// Longest wait for the rest of an upload after its answer.
pub const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// The body as the handler gets it: cut at the upload limit. Its errors pass through as they
/// are, so the limit's error still tells a 413 from a malformed form.
type Inner = Limited<Body>;

/// A body the handler reads while the middleware keeps a hold on it.
pub struct SharedBody(Arc<Mutex<Option<Inner>>>);

/// The middleware's hold on a [`SharedBody`].
pub struct Rest(Arc<Mutex<Option<Inner>>>);

/// Splits `body` into what the handler reads and what the middleware keeps.
pub fn share(body: Inner) -> (SharedBody, Rest) {
    let shared = Arc::new(Mutex::new(Some(body)));
    (SharedBody(shared.clone()), Rest(shared))
}

impl http_body::Body for SharedBody {
    type Data = Bytes;
    type Error = <Inner as http_body::Body>::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut body = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }
}

impl Rest {
    /// Reads and drops what the handler left of the body (until its end, an error — such as
    /// the upload limit — or [`DRAIN_WAIT`]).
    pub async fn drain(self) {
        let body = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(mut body) = body else { return };
        let _ = tokio::time::timeout(DRAIN_WAIT, async { while let Some(Ok(_)) = body.frame().await {} }).await;
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn what_the_handler_leaves_is_read_after_it() {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            vec![Ok(Bytes::from_static(b"one")), Ok(Bytes::from_static(b"two")), Ok(Bytes::from_static(b"three"))];
        let polled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = polled.clone();
        let stream = futures::stream::iter(chunks).inspect(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let (shared, rest) = share(Limited::new(Body::from_stream(stream), 1024));
        let mut handler_body = Body::new(shared);
        let first = handler_body.frame().await.and_then(Result::ok).and_then(|f| f.into_data().ok());
        assert_eq!(first.as_deref(), Some(&b"one"[..]));
        drop(handler_body);
        rest.drain().await;
        assert_eq!(polled.load(std::sync::atomic::Ordering::SeqCst), 3, "the rest was read");
    }
}
