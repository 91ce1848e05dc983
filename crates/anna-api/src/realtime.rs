//! Realtime: `GET /ws/sessions` streams the caller's session events.
//!
//! Every API process tails the domain-event stream itself (no consumer group: each replica
//! sees every event and serves its own sockets), keeps the most recent events for replays,
//! and fans each `session.*` event out to the sockets of its tenant only, in the predecessor's
//! envelope `{type, sessionId, eventId, occurredOn, payload}`.
//!
//! - Authentication: a single-use ticket (`POST /ws/ticket`, valid `WS_TICKET_TTL_MS`) as
//!   `?ticket=` or as the subprotocol `anna.ticket.<ticket>`; the access token as the
//!   subprotocol `anna.token.<token>` or an `Authorization` header; `?accessToken=` (and
//!   `?token=`) for the predecessor's clients, never logged. The socket closes when the token
//!   behind it expires.
//! - Browsers' `Origin` must be the API's own host or one of `WS_ALLOWED_ORIGINS`.
//! - On connect: a `session.snapshot` of the tenant's sessions; with `?since=<eventId>`, the
//!   events after it first (or `session.replay_unavailable` when it is too old).
//! - A client that falls `WS_CLIENT_BUFFER` events behind is disconnected (close 1013); the
//!   others never wait for it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anna_domain::user::iso;
use anna_streams::{Stream, envelope};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::config::RealtimeConfig;
use crate::error::ApiError;
use crate::extract::AuthUser;
use crate::state::AppState;

const SUBPROTOCOL: &str = "anna";
const TICKET_PROTOCOL_PREFIX: &str = "anna.ticket.";
const TOKEN_PROTOCOL_PREFIX: &str = "anna.token.";
/// Largest message a client may send (clients only send pings and closes).
const MAX_CLIENT_MESSAGE_BYTES: usize = 4096;
/// A socket that cannot take a frame for this long is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// A session event as the feed hands it to sockets.
#[derive(Debug)]
pub struct HubEvent {
    /// Position in this process's feed: tells replayed events from live ones.
    pub seq: u64,
    pub event_id: Uuid,
    pub session_id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub payload: Value,
    /// The JSON text frame, built once for every socket.
    pub frame: String,
}

pub struct Realtime {
    config: RealtimeConfig,
    sender: broadcast::Sender<Arc<HubEvent>>,
    recent: std::sync::Mutex<VecDeque<Arc<HubEvent>>>,
    seq: AtomicU64,
}

impl Realtime {
    pub fn new(config: RealtimeConfig) -> Self {
        let (sender, _) = broadcast::channel(config.client_buffer.max(1));
        Self { config, sender, recent: std::sync::Mutex::new(VecDeque::new()), seq: AtomicU64::new(0) }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<HubEvent>> {
        self.sender.subscribe()
    }

    fn publish(&self, event: DecodedEvent) {
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        let frame = json!({
            "type": event.name,
            "sessionId": event.session_id.to_string(),
            "eventId": event.event_id.to_string(),
            "occurredOn": iso(event.occurred_on),
            "payload": event.payload,
        })
        .to_string();
        let hub_event = Arc::new(HubEvent {
            seq,
            event_id: event.event_id,
            session_id: event.session_id,
            tenant_id: event.tenant_id,
            name: event.name,
            payload: event.payload,
            frame,
        });
        if self.config.replay_events > 0
            && let Ok(mut recent) = self.recent.lock()
        {
            if recent.len() >= self.config.replay_events {
                recent.pop_front();
            }
            recent.push_back(hub_event.clone());
        }
        // No receiver is fine: nobody is watching.
        let _ = self.sender.send(hub_event);
        metrics::counter!("ws_events_fanned_out_total").increment(1);
    }

    /// The tenant's recent events after `event_id` (up to `until_seq`), or `None` when that
    /// event is no longer (or never was) among the recent ones.
    fn replay(&self, tenant: Uuid, event_id: Uuid, until_seq: u64) -> Option<Vec<Arc<HubEvent>>> {
        let recent = self.recent.lock().ok()?;
        let start = recent.iter().position(|e| e.event_id == event_id)?;
        Some(recent.iter().skip(start + 1).filter(|e| e.tenant_id == tenant && e.seq <= until_seq).cloned().collect())
    }

    fn current_seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Tails the event stream until `shutdown`, starting after its newest entry.
    pub async fn run_feed(self: Arc<Self>, stream: Arc<dyn Stream>, shutdown: CancellationToken) {
        let name = self.config.stream.clone();
        let mut after = loop {
            match stream.last_id(&name).await {
                Ok(last) => break last.unwrap_or_else(|| "0".into()),
                Err(error) => {
                    tracing::warn!(%error, "Realtime feed cannot read the event stream; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        loop {
            let read = tokio::select! {
                () = shutdown.cancelled() => return,
                read = stream.read_after(&name, &after, 256, Duration::from_secs(5)) => read,
            };
            match read {
                Ok(entries) => {
                    for entry in entries {
                        after = entry.id.clone();
                        if let Some(event) = decode(&entry.fields) {
                            self.publish(event);
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "Realtime feed read failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
}

struct DecodedEvent {
    event_id: Uuid,
    session_id: Uuid,
    tenant_id: Uuid,
    name: String,
    occurred_on: OffsetDateTime,
    payload: Value,
}

/// A `session.*` event with a tenant; anything else is not for sockets.
fn decode(fields: &anna_streams::Fields) -> Option<DecodedEvent> {
    let event = envelope::from_fields(fields).ok()?;
    if !event.event_name.starts_with("session.") {
        return None;
    }
    let tenant = event.tenant_id.as_deref().or_else(|| event.payload["tenantId"].as_str())?;
    Some(DecodedEvent {
        event_id: event.event_id,
        session_id: Uuid::parse_str(&event.aggregate_id).ok()?,
        tenant_id: Uuid::parse_str(tenant).ok()?,
        name: event.event_name,
        occurred_on: event.occurred_on,
        payload: anna_domain::events::tenant_payload(&event.payload),
    })
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(issue_ticket)).route("/ws/sessions", axum::routing::get(ws_sessions))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TicketResponse {
    /// Single use, valid `WS_TICKET_TTL_MS` (30 s by default): `GET /ws/sessions?ticket=…`.
    pub ticket: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct TicketClaims {
    /// The user.
    sub: Uuid,
    /// When the access token it was issued for expires (Unix seconds).
    tok: i64,
    /// When the ticket expires (Unix milliseconds).
    exp: i64,
    /// Makes it single-use.
    nonce: Uuid,
    /// The generation of the user's tokens it was issued under: a logout-all or a password
    /// reset since voids it too.
    #[serde(default)]
    tg: i64,
}

/// A single-use ticket for `GET /ws/sessions`, so the access token never appears in a URL.
#[utoipa::path(post, path = "/ws/ticket", tag = "realtime", security(("bearer" = [])),
    responses((status = 200, body = TicketResponse)))]
async fn issue_ticket(State(state): State<AppState>, AuthUser(caller): AuthUser) -> Result<Response, ApiError> {
    let ttl = state.config.realtime.ticket_ttl;
    let claims = TicketClaims {
        sub: caller.user_id,
        tok: caller.expires_at,
        exp: (OffsetDateTime::now_utc() + time::Duration::try_from(ttl).unwrap_or(time::Duration::SECOND * 30))
            .unix_timestamp()
            .saturating_mul(1000),
        nonce: Uuid::new_v4(),
        tg: caller.user.as_ref().map_or(0, |user| user.token_generation),
    };
    let body = URL_SAFE_NO_PAD.encode(json!(claims).to_string());
    let mac = state.accounts.keyed_hash("ws-ticket", "", &body);
    Ok(axum::Json(TicketResponse { ticket: format!("{body}.{mac}") }).into_response())
}

/// Who a ticket is for, if it is genuine, unexpired and unused (the first use consumes it,
/// on every replica: uses are recorded in the database).
async fn redeem_ticket(state: &AppState, ticket: &str) -> Option<(Uuid, i64, i64)> {
    let (body, mac) = ticket.split_once('.')?;
    if !anna_domain::secrets::hashes_equal(&state.accounts.keyed_hash("ws-ticket", "", body), mac) {
        return None;
    }
    let claims: TicketClaims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()?;
    let now = OffsetDateTime::now_utc();
    if claims.exp < now.unix_timestamp().saturating_mul(1000) {
        return None;
    }
    if !state.accounts.accepts_token_generation(claims.sub, claims.tg).await.ok()? {
        return None;
    }
    let claim = state.store.claim_idempotency_key("ws-ticket", &claims.nonce.to_string(), "", now).await.ok()?;
    matches!(claim, anna_store::IdempotencyClaim::Claimed).then_some((claims.sub, claims.tok, claims.tg))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WsQuery {
    ticket: Option<String>,
    access_token: Option<String>,
    token: Option<String>,
    since: Option<String>,
}

fn origin_allowed(headers: &HeaderMap, config: &RealtimeConfig) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        // Not a browser: Origin protects browsers' users from other sites, nothing else.
        return true;
    };
    let origin = origin.trim_end_matches('/');
    if config.allowed_origins.iter().any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

async fn ws_sessions(
    State(state): State<AppState>,
    Query(query): Query<WsQuery>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if !origin_allowed(&headers, &state.config.realtime) {
        return ApiError::new(StatusCode::FORBIDDEN, "origin_not_allowed", "this origin may not open the feed")
            .into_response();
    }
    let protocols: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    let ticket = query
        .ticket
        .clone()
        .or_else(|| protocols.iter().find_map(|p| p.strip_prefix(TICKET_PROTOCOL_PREFIX).map(str::to_owned)));
    let token = protocols
        .iter()
        .find_map(|p| p.strip_prefix(TOKEN_PROTOCOL_PREFIX).map(str::to_owned))
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim().to_owned())
        })
        .or(query.access_token.clone())
        .or(query.token.clone())
        .filter(|t| !t.is_empty());
    let caller = match (ticket, token) {
        (Some(ticket), _) => redeem_ticket(&state, &ticket).await,
        (None, Some(token)) => match state.accounts.authenticate(&token).await {
            Ok(caller) => caller.map(|c| (c.user_id, c.expires_at, c.user.as_ref().map_or(0, |u| u.token_generation))),
            Err(failure) => return ApiError::from(failure).into_response(),
        },
        (None, None) => {
            return ApiError::unauthorized("missing_access_token", "missing access token").into_response();
        }
    };
    let Some((tenant, expires_at, generation)) = caller else {
        return ApiError::unauthorized("invalid_access_token", "invalid access token or ticket").into_response();
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(_) => {
            return ApiError::bad_request("upgrade_failed", "upgrade failed: not a WebSocket request").into_response();
        }
    };
    let since = match query.since.as_deref().map(Uuid::parse_str).transpose() {
        Ok(since) => since,
        Err(_) => return ApiError::bad_request("invalid_since", "since must be an event id (UUID)").into_response(),
    };
    // Clients have nothing to say on this socket: a small cap keeps a hostile one from making
    // the server buffer megabytes per frame.
    let upgrade = upgrade.max_message_size(MAX_CLIENT_MESSAGE_BYTES).max_frame_size(MAX_CLIENT_MESSAGE_BYTES);
    let upgrade =
        if protocols.iter().any(|p| p.starts_with(SUBPROTOCOL)) { upgrade.protocols([SUBPROTOCOL]) } else { upgrade };
    let state_for_socket = state.clone();
    upgrade.on_upgrade(move |socket| async move {
        metrics::gauge!("ws_connections").increment(1.0);
        serve_socket(state_for_socket, socket, Feed { tenant, expires_at, generation }, since).await;
        metrics::gauge!("ws_connections").decrement(1.0);
    })
}

async fn send_text(socket: &mut WebSocket, text: String) -> bool {
    matches!(tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await, Ok(Ok(())))
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame { code, reason: reason.into() };
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
}

/// Whose feed a socket carries, and until when.
struct Feed {
    tenant: Uuid,
    /// When the access token expires (Unix seconds).
    expires_at: i64,
    /// The generation of the user's tokens: checked every `WS_REVOCATION_CHECK_MS`.
    generation: i64,
}

async fn serve_socket(state: AppState, mut socket: WebSocket, feed: Feed, since: Option<Uuid>) {
    let Feed { tenant, expires_at, generation } = feed;
    let realtime = state.realtime.clone();
    // Subscribed before the snapshot is read, so nothing falls between the two.
    let mut live = realtime.subscribe();
    let seen = realtime.current_seq();
    let sessions = match state.sessions.list(tenant).await {
        Ok(sessions) => sessions,
        Err(error) => {
            tracing::warn!(%error, "WebSocket snapshot failed");
            return close(&mut socket, 1011, "snapshot unavailable").await;
        }
    };
    let snapshot = json!({
        "type": "session.snapshot",
        "occurredOn": iso(OffsetDateTime::now_utc()),
        "payload": { "tenantId": tenant.to_string(), "sessions": sessions.iter().map(crate::sessions::SessionView::from).collect::<Vec<_>>() },
    });
    if !send_text(&mut socket, snapshot.to_string()).await {
        return;
    }
    if let Some(since) = since {
        match realtime.replay(tenant, since, seen) {
            Some(missed) => {
                for event in missed {
                    if !send_text(&mut socket, event.frame.clone()).await {
                        return;
                    }
                }
            }
            None => {
                let gap = json!({"type": "session.replay_unavailable", "payload": {"since": since.to_string()}});
                if !send_text(&mut socket, gap.to_string()).await {
                    return;
                }
            }
        }
    }
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let expiry = tokio::time::sleep(Duration::from_secs(u64::try_from(expires_at - now).unwrap_or(0)));
    tokio::pin!(expiry);
    let mut revocation_checks = tokio::time::interval(state.config.realtime.revocation_check);
    revocation_checks.reset();
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return close(&mut socket, 1001, "server shutting down").await,
            () = &mut expiry => return close(&mut socket, 4001, "access token expired").await,
            _ = revocation_checks.tick() => {
                // A database that does not answer keeps the socket open: it is checked again.
                if matches!(state.accounts.accepts_token_generation(tenant, generation).await, Ok(false)) {
                    return close(&mut socket, 4001, "access revoked").await;
                }
            }
            event = live.recv() => match event {
                Ok(event) if event.tenant_id == tenant && event.seq > seen => {
                    if !send_text(&mut socket, event.frame.clone()).await {
                        metrics::counter!("ws_clients_dropped_total", "why" => "send").increment(1);
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    metrics::counter!("ws_clients_dropped_total", "why" => "slow").increment(1);
                    return close(&mut socket, 1013, "too slow: reconnect with ?since=").await;
                }
                Err(broadcast::error::RecvError::Closed) => return close(&mut socket, 1001, "feed stopped").await,
            },
            incoming = socket.recv() => match incoming {
                // Client messages carry nothing; pings are answered by the library.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_against_the_host_and_the_allow_list() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "anna.example:8080".parse().unwrap_or_else(|e| panic!("{e}")));
        let config =
            RealtimeConfig { allowed_origins: vec!["https://app.example".into()], ..RealtimeConfig::default() };
        assert!(origin_allowed(&headers, &config), "no Origin: not a browser");
        headers.insert(header::ORIGIN, "http://anna.example:8080".parse().unwrap_or_else(|e| panic!("{e}")));
        assert!(origin_allowed(&headers, &config));
        headers.insert(header::ORIGIN, "https://app.example".parse().unwrap_or_else(|e| panic!("{e}")));
        assert!(origin_allowed(&headers, &config));
        headers.insert(header::ORIGIN, "https://evil.example".parse().unwrap_or_else(|e| panic!("{e}")));
        assert!(!origin_allowed(&headers, &config));
    }
}
