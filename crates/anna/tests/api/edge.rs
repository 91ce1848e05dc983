//! The HTTP edge against slow, idle and too many connections, over raw sockets.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{Backend, TestApp, spawn_app_with};

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.base.trim_start_matches("http://")).await.unwrap_or_else(|e| panic!("connect: {e}"))
}

/// Reads until the server closes the connection; returns what it said and how long it took.
async fn until_closed(socket: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&answer).into_owned(), closed.then(|| started.elapsed()))
}

async fn slow_and_idle_connections_are_closed_in_time(backend: Backend) {
    let app =
        spawn_app_with(backend, &[("HTTP_HEADER_READ_TIMEOUT_MS", "600"), ("HTTP_BODY_READ_TIMEOUT_MS", "600")]).await;
    let mut idle = connect(&app).await;
    let mut half_head = connect(&app).await;
    half_head.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await.unwrap_or_else(|e| panic!("{e}"));
    let mut slow_body = connect(&app).await;
    slow_body
        .write_all(b"POST /auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"em")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut kept_alive = connect(&app).await;
    kept_alive.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap_or_else(|e| panic!("{e}"));

    // Normal requests are served meanwhile.
    for _ in 0..5 {
        assert_eq!(app.get("/healthz").send().await.status, 200);
    }
    for (name, socket) in [
        ("idle", &mut idle),
        ("half-sent head", &mut half_head),
        ("slow body", &mut slow_body),
        ("keep-alive", &mut kept_alive),
    ] {
        let (answer, closed_after) = until_closed(socket, Duration::from_secs(5)).await;
        let closed_after = closed_after.unwrap_or_else(|| panic!("{name}: still open after 5 s ({answer:?})"));
        assert!(closed_after < Duration::from_secs(3), "{name}: closed after {closed_after:?}");
        if name == "keep-alive" {
            assert!(answer.starts_with("HTTP/1.1 200"), "{name}: answered first: {answer:?}");
        }
    }
    assert_eq!(app.get("/healthz").send().await.status, 200);
    app.stop().await;
}

async fn connections_beyond_the_cap_are_closed_at_once(backend: Backend) {
    let app = spawn_app_with(backend, &[("HTTP_MAX_CONNECTIONS", "4"), ("HTTP_HEADER_READ_TIMEOUT_MS", "1500")]).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect(&app).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = connect(&app).await;
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let (answer, closed_after) = until_closed(&mut extra, Duration::from_secs(5)).await;
    assert!(answer.is_empty(), "served beyond the cap: {answer:?}");
    assert!(closed_after.is_some_and(|d| d < Duration::from_secs(1)), "closed at once: {closed_after:?}");
    // Once the held connections time out, requests are served again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.get("/healthz").send().await.status, 200);
    let metrics = app.get("/metrics").send().await.text;
    assert!(metrics.contains("http_connections_refused_total"), "refusals are counted");
    app.stop().await;
}

crate::on_both_backends!(slow_and_idle_connections_are_closed_in_time, connections_beyond_the_cap_are_closed_at_once);
