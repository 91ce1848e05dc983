//! Message history at scale: `--messages` stored in one session over `--chats` chats through
//! the store's own write path (the history subscriber's), `--batch` per transaction; then pages
//! of `GET /chats/{jid}/messages` as the route reads them — the newest page, and pages deep in
//! the history (continued from a cursor) — and the chat list, at that size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anna_domain::Session;
use anna_store::{HistoryCursor, Store, StoredMessage};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::events::open_shape;
use crate::process::Server;
use crate::stats::Summary;

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// Messages stored before the reads.
    #[arg(long, default_value_t = 1_000_000)]
    messages: usize,
    /// Chats they are spread over.
    #[arg(long, default_value_t = 100)]
    chats: usize,
    /// Messages per transaction while storing.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Page reads per kind.
    #[arg(long, default_value_t = 2000)]
    reads: usize,
    /// Only these shapes (embedded, distributed).
    #[arg(long, value_delimiter = ',', default_value = "distributed,embedded")]
    shapes: Vec<String>,
    /// Also read the pages over HTTP, from a real `anna serve` on the same database (its
    /// binary next to this one).
    #[arg(long)]
    http: bool,
}

fn chat(n: usize) -> String {
    format!("49151{n:08}@s.whatsapp.net")
}

async fn fill(store: &Arc<dyn Store>, session: &Session, args: &HistoryArgs) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let base = OffsetDateTime::now_utc() - time::Duration::days(365);
    let mut stored = 0;
    while stored < args.messages {
        let mut uow = store.begin().await?;
        for n in stored..(stored + args.batch).min(args.messages) {
            let (chat_jid, message_id) = (chat(n % args.chats.max(1)), format!("3EB0{n:016X}"));
            let text = format!("message number {n} of the benchmark history");
            // The raw message a phone records for a plain text, as the drivers keep it.
            let raw = serde_json::json!({
                "key": {"remoteJid": chat_jid, "fromMe": n % 3 == 0, "id": message_id},
                "messageTimestamp": base.unix_timestamp(), "pushName": "Benchmark contact",
                "message": {"conversation": text},
            });
            let message = StoredMessage {
                tenant_id: session.tenant_id,
                session_id: session.id,
                chat_jid,
                message_id,
                from_me: n % 3 == 0,
                sender_jid: None,
                // About 32 a second: many messages share a timestamp, and pages must break ties.
                timestamp: base + time::Duration::seconds(i64::try_from(n).unwrap_or(0) * 31 / 1000),
                kind: "text".into(),
                text: Some(text),
                status: None,
                status_at: None,
                edited_at: None,
                deleted_at: None,
                context: Default::default(),
                raw: Some(raw),
            };
            uow.record_message(&message, n % 3 != 0, None).await?;
        }
        uow.commit().await?;
        stored = (stored + args.batch).min(args.messages);
    }
    Ok(started.elapsed())
}

pub async fn run(args: HistoryArgs) -> anyhow::Result<()> {
    for name in &args.shapes {
        let shape = open_shape(name).await?;
        let store = shape.store.clone();
        // Over HTTP the session belongs to a registered tenant of a running anna.
        let server = if args.http {
            let mut vars = vec![("DATABASE_URL", shape.database_url.clone())];
            if name == "distributed" {
                vars.push(("REDIS_URL", anna_testkit::redis::shared_url()));
            }
            let server = Server::start(None, &vars)?;
            let client = reqwest::Client::new();
            let email = format!("bench-{}@example.com", Uuid::new_v4().simple());
            let token = server.active_user(&client, &email, "correct horse battery").await?;
            let me: serde_json::Value =
                client.get(format!("{}/users/me", server.base)).bearer_auth(&token).send().await?.json().await?;
            let id = me["id"].as_str().and_then(|id| Uuid::parse_str(id).ok());
            Some((server, client, token, id.ok_or_else(|| anyhow::anyhow!("no user id: {me}"))?))
        } else {
            None
        };
        let tenant = server.as_ref().map_or_else(Uuid::new_v4, |(.., id)| *id);
        let (mut session, _) = Session::create(Uuid::new_v4(), tenant, OffsetDateTime::now_utc());
        // Not to be connected by the running anna.
        session.status = anna_domain::SessionStatus::Disconnected;
        let mut uow = store.begin().await?;
        uow.insert_session(&session).await?;
        uow.commit().await?;
        let took = fill(&store, &session, &args).await?;
        println!(
            "{}: stored {} messages over {} chats in {:.1} s: {:.0} messages/s ({} per transaction)",
            shape.label,
            args.messages,
            args.chats,
            took.as_secs_f64(),
            args.messages as f64 / took.as_secs_f64().max(f64::EPSILON),
            args.batch
        );
        println!("{}", Summary::header());
        // Newest page of a chat, as a client opening it.
        let mut latencies = Vec::with_capacity(args.reads);
        let started = Instant::now();
        for n in 0..args.reads {
            let at = Instant::now();
            let page = store.list_messages(session.id, &chat(n % args.chats.max(1)), None, 50, false).await?;
            latencies.push(at.elapsed());
            anyhow::ensure!(page.len() == 50, "a full first page");
        }
        println!(
            "{}",
            Summary::from_latencies(format!("{} first page", shape.label), latencies, 0, started.elapsed()).row()
        );
        // Deep pages: continued from a cursor in the middle of a chat's history.
        let per_chat = args.messages / args.chats.max(1);
        let mut cursors = Vec::new();
        for n in 0..args.chats.max(1) {
            let page = store
                .list_messages(
                    session.id,
                    &chat(n),
                    None,
                    u32::try_from(per_chat / 2).unwrap_or(u32::MAX).clamp(1, 5000),
                    false,
                )
                .await?;
            if let Some(last) = page.last() {
                cursors
                    .push((chat(n), HistoryCursor { timestamp: last.timestamp, message_id: last.message_id.clone() }));
            }
        }
        let mut latencies = Vec::with_capacity(args.reads);
        let started = Instant::now();
        for n in 0..args.reads {
            let (chat, cursor) = &cursors[n % cursors.len()];
            let at = Instant::now();
            let page = store.list_messages(session.id, chat, Some(cursor), 50, false).await?;
            latencies.push(at.elapsed());
            anyhow::ensure!(page.len() == 50, "a full deep page");
        }
        println!(
            "{}",
            Summary::from_latencies(format!("{} deep page", shape.label), latencies, 0, started.elapsed()).row()
        );
        if let Some((server, client, token, _)) = &server {
            http_pages(server, client, token, session.id, &cursors, &args, shape.label).await?;
        }
        let mut latencies = Vec::with_capacity(args.reads / 10);
        let started = Instant::now();
        for _ in 0..(args.reads / 10).max(1) {
            let at = Instant::now();
            let chats = store.list_chats(session.id).await?;
            latencies.push(at.elapsed());
            anyhow::ensure!(chats.len() == args.chats.max(1), "every chat listed");
        }
        println!(
            "{}",
            Summary::from_latencies(format!("{} chat list", shape.label), latencies, 0, started.elapsed()).row()
        );
        store.close().await;
    }
    Ok(())
}

/// The same pages through `GET /chats/{jid}/messages` of a running anna: newest pages, and
/// pages continued from a cursor deep in the history (the route's own cursor format).
async fn http_pages(
    server: &Server,
    client: &reqwest::Client,
    token: &str,
    session: Uuid,
    cursors: &[(String, HistoryCursor)],
    args: &HistoryArgs,
    label: &str,
) -> anyhow::Result<()> {
    use base64::Engine;
    use time::format_description::well_known::Rfc3339;

    for deep in [false, true] {
        let mut latencies = Vec::with_capacity(args.reads);
        let started = Instant::now();
        for n in 0..args.reads {
            let (chat, cursor) = &cursors[n % cursors.len()];
            let mut url = format!("{}/chats/{chat}/messages?sessionId={session}&limit=50", server.base);
            if deep {
                let at = cursor.timestamp.format(&Rfc3339)?;
                let raw = serde_json::json!({"ts": at, "id": cursor.message_id}).to_string();
                url.push_str(&format!("&cursor={}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)));
            }
            let at = Instant::now();
            let page: serde_json::Value = client.get(&url).bearer_auth(token).send().await?.json().await?;
            latencies.push(at.elapsed());
            anyhow::ensure!(page["items"].as_array().is_some_and(|items| items.len() == 50), "a full page: {page}");
        }
        let kind = if deep { "deep page over HTTP" } else { "first page over HTTP" };
        println!("{}", Summary::from_latencies(format!("{label} {kind}"), latencies, 0, started.elapsed()).row());
    }
    Ok(())
}
