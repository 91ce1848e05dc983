//! A webhook receiver on loopback whose behaviour tests switch at will: answer with a status,
//! answer slowly, hang without answering, close the connection after reading the request, or
//! redirect. It speaks just enough HTTP/1.1 (keep-alive, `Content-Length` bodies) and records
//! every request it read in full.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How the receiver answers the next requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// This status, with `body`.
    Answer { status: u16, body: String },
    /// This status after a delay.
    Slow { delay: Duration, status: u16 },
    /// Reads the request and never answers (the connection stays open).
    Hang,
    /// Reads the request and closes the connection without a word.
    Close,
    /// 302 to this location.
    Redirect(String),
}

impl Behaviour {
    pub fn ok() -> Self {
        Self::Answer { status: 200, body: "ok".into() }
    }

    pub fn status(status: u16) -> Self {
        Self::Answer { status, body: format!("status {status}") }
    }
}

/// One request as the receiver read it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
    /// Unix time in milliseconds when it arrived.
    pub at_unix_ms: i64,
    /// The behaviour that answered it.
    pub answered_with: Behaviour,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or_default()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

struct Shared {
    behaviour: Mutex<Behaviour>,
    /// Behaviours for the next requests, used before `behaviour`.
    queued: Mutex<Vec<Behaviour>>,
    received: Mutex<Vec<Received>>,
    arrived: Notify,
    /// Records nothing but the count and the arrival times (for benchmarks).
    count_only: bool,
    count: Mutex<Vec<(i64, Vec<u8>)>>,
}

/// The running receiver; it stops when dropped.
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl WebhookReceiver {
    /// Answers 200 until told otherwise.
    pub async fn start() -> Self {
        Self::spawn(false).await
    }

    /// Answers 200 and keeps only arrival times and bodies (for load).
    pub async fn start_counting() -> Self {
        Self::spawn(true).await
    }

    async fn spawn(count_only: bool) -> Self {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(e) => panic!("webhook receiver: cannot bind: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(addr) => addr,
            Err(e) => panic!("webhook receiver: {e}"),
        };
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(Behaviour::ok()),
            queued: Mutex::new(Vec::new()),
            received: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            count_only,
            count: Mutex::new(Vec::new()),
        });
        let server = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((socket, _)) = listener.accept().await {
                    let _ = socket.set_nodelay(true);
                    tokio::spawn(serve(socket, shared.clone()));
                }
            }
        });
        Self { addr, shared, server }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set(&self, behaviour: Behaviour) {
        *lock(&self.shared.behaviour) = behaviour;
    }

    /// The next requests get these behaviours, in order, then the current one again.
    pub fn queue(&self, behaviours: Vec<Behaviour>) {
        lock(&self.shared.queued).extend(behaviours);
    }

    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    /// Arrival times (unix ms) and bodies of a counting receiver.
    pub fn counted(&self) -> Vec<(i64, Vec<u8>)> {
        lock(&self.shared.count).clone()
    }

    pub fn count(&self) -> usize {
        if self.shared.count_only { lock(&self.shared.count).len() } else { lock(&self.shared.received).len() }
    }

    /// Waits until `matching` requests satisfy `filter`; panics after `limit`.
    pub async fn wait_for(
        &self,
        matching: usize,
        limit: Duration,
        filter: impl Fn(&Received) -> bool,
    ) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.arrived.notified();
            let found: Vec<Received> = self.received().into_iter().filter(&filter).collect();
            if found.len() >= matching {
                return found;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "webhook receiver: {} of {matching} expected requests within {limit:?}; got {:#?}",
                    found.len(),
                    self.received().iter().map(|r| (r.header("webhook-id").to_owned(), r.json())).collect::<Vec<_>>()
                );
            }
        }
    }
}

async fn serve(mut socket: TcpStream, shared: Arc<Shared>) {
    let mut buffer: Vec<u8> = Vec::with_capacity(8192);
    loop {
        let Some((path, headers, body)) = read_request(&mut socket, &mut buffer).await else { return };
        let behaviour = {
            let mut queued = lock(&shared.queued);
            if queued.is_empty() { lock(&shared.behaviour).clone() } else { queued.remove(0) }
        };
        if shared.count_only {
            lock(&shared.count).push((unix_ms(), body));
        } else {
            lock(&shared.received).push(Received {
                path,
                headers,
                body,
                at: Instant::now(),
                at_unix_ms: unix_ms(),
                answered_with: behaviour.clone(),
            });
        }
        shared.arrived.notify_waiters();
        let (status, answer_body, location) = match behaviour {
            Behaviour::Answer { status, body } => (status, body, None),
            Behaviour::Slow { delay, status } => {
                tokio::time::sleep(delay).await;
                (status, String::new(), None)
            }
            Behaviour::Hang => {
                // Keeps the connection open until the client gives up.
                let mut sink = [0u8; 1024];
                while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            Behaviour::Close => return,
            Behaviour::Redirect(location) => (302, String::new(), Some(location)),
        };
        let mut head =
            format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n", answer_body.len());
        if let Some(location) = location {
            head.push_str(&format!("location: {location}\r\n"));
        }
        head.push_str("\r\n");
        if socket.write_all(head.as_bytes()).await.is_err() || socket.write_all(answer_body.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads one request (head and `Content-Length` body); `None` at the end of the connection.
async fn read_request(
    socket: &mut TcpStream,
    buffer: &mut Vec<u8>,
) -> Option<(String, HashMap<String, String>, Vec<u8>)> {
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let mut chunk = [0u8; 8192];
        let n = socket.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split(' ').nth(1).unwrap_or_default().to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let body_start = head_end + 4;
    while buffer.len() < body_start + length {
        let mut chunk = [0u8; 8192];
        let n = socket.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer[body_start..body_start + length].to_vec();
    buffer.drain(..body_start + length);
    Some((path, headers, body))
}
