//! The demo UI in headless Chromium (Debian's chromium and chromium-driver), driven over
//! WebDriver against the real app with the simulator: sign up, verify with the e-mailed code,
//! create a session, see its QR code as an image, simulate the scan, watch it connect, send a
//! message and see it read and answered, stop, delete. Screenshots of each step are saved in
//! `target/tmp/browser/`. A missing browser is a failure, never a skip.

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::helpers::*;

struct Driver {
    process: tokio::process::Child,
    url: String,
}

async fn start_chromedriver() -> Driver {
    let binary = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!("chromedriver not found: install Debian's chromium and chromium-driver (scripts/test does)")
        });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let process = tokio::process::Command::new(binary)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("chromedriver: {e}"));
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Driver { process, url };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not listen on {port}");
}

async fn browser(driver: &Driver) -> Client {
    let profile = tempdir();
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1280,1000", format!("--user-data-dir={profile}")],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| panic!("WebDriver session: {e}"))
}

fn tempdir() -> String {
    let dir = std::env::temp_dir().join(format!("anna-chromium-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    dir.display().to_string()
}

async fn screenshot(client: &Client, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let png = client.screenshot().await.unwrap_or_else(|e| panic!("screenshot: {e}"));
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap_or_else(|e| panic!("{e}"));
}

async fn text_of(client: &Client, id: &str) -> String {
    match client.find(Locator::Id(id)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until the element's text satisfies `done`.
async fn until_text(client: &Client, id: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    for _ in 0..300 {
        last = text_of(client, id).await;
        if done(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    screenshot(client, &format!("failed-{id}")).await;
    panic!("#{id} never showed {what}; last: {last:?}");
}

async fn fill(client: &Client, id: &str, value: &str) {
    let element = client.find(Locator::Id(id)).await.unwrap_or_else(|e| panic!("#{id}: {e}"));
    element.clear().await.unwrap_or_else(|e| panic!("clear #{id}: {e}"));
    element.send_keys(value).await.unwrap_or_else(|e| panic!("type into #{id}: {e}"));
}

async fn click(client: &Client, id: &str) {
    client
        .find(Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("#{id}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click #{id}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_ui_takes_a_tenant_from_sign_up_to_a_connected_session() {
    let app = spawn_app_with(
        Backend::Sqlite,
        &[("SESSIONS_SIMULATOR_FIRST_QR_MS", "60000"), ("SESSIONS_SIMULATOR_REPLY_MS", "500")],
    )
    .await;
    let driver = start_chromedriver().await;
    let client = browser(&driver).await;
    client.goto(&format!("{}/demo/sessions", app.base)).await.unwrap_or_else(|e| panic!("goto: {e}"));

    let badge = client.find(Locator::Id("simulator-badge")).await.unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..50 {
        if badge.is_displayed().await.unwrap_or(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(badge.is_displayed().await.unwrap_or(false), "the simulator is labelled as such");

    let email = unique_email();
    fill(&client, "signup-name", "Browser <b>Tenant</b>").await;
    fill(&client, "signup-email", &email).await;
    fill(&client, "signup-password", "correct horse battery").await;
    click(&client, "signup").await;
    let code = code_of(&app.mailbox.nth_to(&email, 1).await);
    fill(&client, "verify-code", &code).await;
    click(&client, "verify").await;
    until_text(&client, "who", "signed in", |t| t == "signed in").await;
    until_text(&client, "ws-state", "a connected socket", |t| t == "ws: connected").await;
    screenshot(&client, "01-signed-in").await;

    click(&client, "create-session").await;
    until_text(&client, "detail-status", "pending_qr", |t| t == "pending_qr").await;
    let image = client.find(Locator::Id("qr-image")).await.unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..100 {
        let src = image.attr("src").await.ok().flatten().unwrap_or_default();
        if src.starts_with("blob:") && image.is_displayed().await.unwrap_or(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(image.attr("src").await.ok().flatten().unwrap_or_default().starts_with("blob:"), "the QR is an image");
    let countdown = until_text(&client, "qr-countdown", "a countdown", |t| t.parse::<u32>().is_ok()).await;
    assert!(countdown.parse::<u32>().unwrap_or(0) <= 60);
    screenshot(&client, "02-qr-code").await;

    click(&client, "simulate-scan").await;
    until_text(&client, "detail-status", "connected", |t| t == "connected").await;
    assert!(text_of(&client, "detail-phone").await.ends_with("@s.whatsapp.net"));
    screenshot(&client, "03-connected").await;

    fill(&client, "send-to", "+1 555 0100 123").await;
    fill(&client, "send-text", "<img src=x onerror=alert(1)> hello from the browser").await;
    click(&client, "send").await;
    let messages = until_text(&client, "messages", "a read receipt and a reply", |t| {
        t.contains(": read (") && t.contains("Simulated reply to: <img src=x onerror=alert(1)>")
    })
    .await;
    assert!(messages.contains("15550100123@s.whatsapp.net"), "{messages}");
    // Server text is shown as text: the markup above is visible, not an element.
    assert!(client.find(Locator::Css("#messages img")).await.is_err(), "server text became HTML");
    screenshot(&client, "04-message-read-and-answered").await;

    click(&client, "stop-session").await;
    until_text(&client, "detail-status", "disconnected", |t| t == "disconnected").await;
    click(&client, "delete-session").await;
    client.accept_alert().await.unwrap_or_else(|e| panic!("confirm: {e}"));
    until_text(&client, "session-list", "no session", str::is_empty).await;
    screenshot(&client, "05-deleted").await;

    let sessions =
        app.get("/sessions").bearer(&app.login(&email, "correct horse battery").await.access_token()).send().await;
    assert_eq!(sessions.body["sessions"], json!([]));
    let _ = client.close().await;
    drop(driver.process);
    app.stop().await;
}
