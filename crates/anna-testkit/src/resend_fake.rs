//! A stand-in for the Resend HTTP API: `POST /emails` is recorded and answered like Resend
//! does, either with success or with a chosen error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;

/// One `POST /emails` as the fake saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// The raw `Authorization` header, e.g. `Bearer re_…`.
    pub authorization: Option<String>,
    /// The JSON body; a body that is not JSON is kept as a JSON string.
    pub body: Value,
}

struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    arrived: Notify,
    failure: Option<(StatusCode, String)>,
}

/// The running server; it stops when this value is dropped.
pub struct FakeResend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl FakeResend {
    /// Answers every `POST /emails` with 200 `{"id":"<uuid>"}`.
    pub async fn start() -> FakeResend {
        Self::spawn(None).await
    }

    /// Answers every `POST /emails` with `status` and Resend's error shape
    /// `{"statusCode":…,"message":…,"name":"validation_error"}`. Panics on a status that
    /// is not a valid HTTP status.
    pub async fn start_failing(status: u16, message: &str) -> FakeResend {
        let status = match StatusCode::from_u16(status) {
            Ok(s) => s,
            Err(e) => panic!("FakeResend: {status} is not an HTTP status: {e}"),
        };
        Self::spawn(Some((status, message.to_owned()))).await
    }

    async fn spawn(failure: Option<(StatusCode, String)>) -> FakeResend {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("FakeResend: could not bind 127.0.0.1:0: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("FakeResend: could not read the bound address: {e}"),
        };
        let shared = Arc::new(Shared { requests: Mutex::new(Vec::new()), arrived: Notify::new(), failure });
        let app = Router::new().route("/emails", post(send_email)).with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "FakeResend: server stopped");
            }
        });
        FakeResend { addr, shared, server }
    }

    /// `http://127.0.0.1:<port>`, to pass as the Resend base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request recorded so far.
    pub async fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().await.clone()
    }

    /// Waits until at least `n` requests have arrived and returns all of them. When
    /// `timeout` elapses first it returns what has arrived, possibly fewer than `n`: assert
    /// on the length. With `n == 0` it waits the whole timeout, to check that nothing came.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            // Registered before the check, so a request landing in between is not missed.
            arrived.as_mut().enable();
            {
                let requests = self.shared.requests.lock().await;
                if n > 0 && requests.len() >= n {
                    return requests.clone();
                }
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.shared.requests.lock().await.clone();
            }
        }
    }
}

impl Drop for FakeResend {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn send_email(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let parsed = serde_json::from_slice::<Value>(&body);
    let is_json = parsed.is_ok();
    let body = parsed.unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    shared.requests.lock().await.push(RecordedRequest { authorization, body });
    shared.arrived.notify_waiters();

    if let Some((status, message)) = &shared.failure {
        return error_response(*status, message);
    }
    if !is_json {
        return error_response(StatusCode::BAD_REQUEST, "Request body is not valid JSON");
    }
    (StatusCode::OK, axum::Json(json!({ "id": uuid::Uuid::new_v4() }))).into_response()
}

fn error_response(status: StatusCode, message: &str) -> Response {
    let body = json!({ "statusCode": status.as_u16(), "message": message, "name": "validation_error" });
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn raw_post(fake: &FakeResend, body: &str) -> String {
        let Ok(mut stream) = tokio::net::TcpStream::connect(fake.addr).await else { panic!("connect failed") };
        let request = format!(
            "POST /emails HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(request.as_bytes()).await;
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response).await;
        response
    }

    #[tokio::test]
    async fn records_and_answers_with_an_id() {
        let fake = FakeResend::start().await;
        let response = raw_post(&fake, r#"{"to":["a@b.c"]}"#).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("\"id\""), "{response}");
        let requests = fake.wait_for_requests(1, Duration::from_secs(5)).await;
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].authorization.as_deref(), Some("Bearer k"));
        assert_eq!(requests[0].body, json!({"to": ["a@b.c"]}));
    }

    #[tokio::test]
    async fn failing_answers_with_resend_error_shape() {
        let fake = FakeResend::start_failing(422, "Invalid `to` field").await;
        let response = raw_post(&fake, "{}").await;
        assert!(response.starts_with("HTTP/1.1 422"), "{response}");
        assert!(response.contains("\"message\":\"Invalid `to` field\""), "{response}");
        assert!(response.contains("\"statusCode\":422"), "{response}");
        assert_eq!(fake.wait_for_requests(1, Duration::from_secs(5)).await.len(), 1);
    }
}
