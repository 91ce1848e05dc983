//! The simulator, end to end on a real SQLite device store: pairing timings and exhaustion,
//! scan and restart, resume from stored keys, contacts' receipts and replies, injections.

use std::sync::Arc;
use std::time::Duration;

use anna_store::{ConnectOptions, Store};
use anna_whatsapp::simulator::{Simulator, SimulatorConfig};
use anna_whatsapp::{
    ChangeKind, CloseReason, DriverError, DriverEvent, HISTORY_PIECE_MESSAGES, Jid, MessageTarget, OutgoingText,
    Presence, ReceiptStatus, SessionDriver, SessionKey, Simulation,
};
use tokio::sync::mpsc;
use uuid::Uuid;

async fn store() -> Arc<dyn Store> {
    let url = anna_testkit::sqlite::fresh_database_url();
    let store = anna_store::connect(&url, &ConnectOptions::default()).await.unwrap_or_else(|e| panic!("{e}"));
    store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
    store
}

fn fast() -> SimulatorConfig {
    SimulatorConfig {
        first_qr_ttl: Duration::from_millis(150),
        next_qr_ttl: Duration::from_millis(50),
        qr_codes: 3,
        connect_delay: Duration::from_millis(10),
        server_ack_delay: Duration::from_millis(5),
        delivered_delay: Duration::from_millis(10),
        read_delay: Duration::from_millis(15),
        reply_delay: Some(Duration::from_millis(20)),
        history_messages: 0,
        history_chats: 1,
        burst_messages: 25,
    }
}

/// Pairs a new session by a scan; returns its phone.
async fn paired(simulator: &Simulator, session: SessionKey) -> String {
    let (tx, mut events) = mpsc::channel(16);
    let live = simulator.connect(session, tx).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(next(&mut events).await, DriverEvent::Qr { .. }));
    live.simulate(Simulation::Scan).await.unwrap_or_else(|e| panic!("{e}"));
    let DriverEvent::Paired { phone } = next(&mut events).await else { panic!("not paired") };
    assert_eq!(next(&mut events).await, DriverEvent::Closed { reason: CloseReason::RestartRequired });
    phone
}

async fn next(events: &mut mpsc::Receiver<DriverEvent>) -> DriverEvent {
    match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
        Ok(Some(event)) => event,
        other => panic!("no event: {other:?}"),
    }
}

fn key() -> SessionKey {
    SessionKey { session_id: Uuid::new_v4(), tenant_id: Uuid::new_v4() }
}

fn text(to: &str) -> OutgoingText {
    OutgoingText {
        to: Jid::parse(to).unwrap_or_else(|e| panic!("{e}")),
        text: "hello".into(),
        reply_to: None,
        forwarding_score: None,
    }
}

#[tokio::test]
async fn qr_codes_rotate_with_their_timings_then_run_out() {
    let simulator = Simulator::new(store().await, fast());
    let (tx, mut events) = mpsc::channel(16);
    let _live = simulator.connect(key(), tx).await.unwrap_or_else(|e| panic!("{e}"));
    let mut ttls = Vec::new();
    loop {
        match next(&mut events).await {
            DriverEvent::Qr { code, ttl } => {
                assert!(code.starts_with("2@"));
                ttls.push(ttl);
            }
            DriverEvent::Closed { reason } => {
                assert_eq!(reason, CloseReason::QrTimeout);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ttls, vec![Duration::from_millis(150), Duration::from_millis(50), Duration::from_millis(50)]);
}

#[tokio::test]
async fn a_scan_pairs_restarts_and_the_device_resumes_from_the_store() {
    let store = store().await;
    let simulator = Simulator::new(store.clone(), fast());
    let session = key();
    let (tx, mut events) = mpsc::channel(16);
    let live = simulator.connect(session, tx).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(next(&mut events).await, DriverEvent::Qr { .. }));
    assert!(matches!(live.send_text(&text("+1 555 0100 123")).await, Err(DriverError::NotConnected)));
    live.simulate(Simulation::Scan).await.unwrap_or_else(|e| panic!("{e}"));
    let DriverEvent::Paired { phone } = next(&mut events).await else { panic!("not paired") };
    assert!(Jid::parse(&phone).is_ok(), "{phone}");
    assert_eq!(next(&mut events).await, DriverEvent::Closed { reason: CloseReason::RestartRequired });
    assert!(simulator.is_paired(session).await.unwrap_or(false));

    // The restart: a new connection logs in with the stored device, as on another worker.
    let other_worker = Simulator::new(store.clone(), fast());
    let (tx, mut events) = mpsc::channel(16);
    let live = other_worker.connect(session, tx).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next(&mut events).await, DriverEvent::Connected { phone: phone.clone() });

    let sent = live.send_text(&text("+1 555 0100 123")).await.unwrap_or_else(|e| panic!("{e}"));
    let id = sent.message_id.clone();
    // The raw form of the sent message, as the phone would record it.
    let raw = sent.raw.as_ref().map(|raw| raw.as_json().clone()).unwrap_or_default();
    assert_eq!(raw["key"]["id"], id.as_str());
    assert_eq!(
        (raw["key"]["fromMe"].as_bool(), raw["key"]["remoteJid"].as_str()),
        (Some(true), Some("15550100123@s.whatsapp.net"))
    );
    let (mut statuses, mut presences) = (Vec::new(), Vec::new());
    let mut replied = false;
    while statuses.len() < 3 || !replied || !presences.contains(&Presence::Unavailable) {
        match next(&mut events).await {
            DriverEvent::Presence(change) => {
                assert_eq!(
                    (change.chat.as_str(), change.jid.as_str()),
                    ("15550100123@s.whatsapp.net", "15550100123@s.whatsapp.net")
                );
                presences.push(change.presence);
            }
            DriverEvent::Receipt { message_id, status, chat, .. } => {
                assert_eq!(message_id, id);
                assert_eq!(chat, "15550100123@s.whatsapp.net");
                statuses.push(status);
            }
            DriverEvent::Message(message) => {
                assert_eq!(message.sender, "15550100123@s.whatsapp.net");
                let raw = message.raw.as_ref().map(|raw| raw.as_json().clone()).unwrap_or_default();
                assert_eq!(raw["key"]["id"], message.message_id.as_str(), "the reply's raw form names it");
                assert_eq!(raw["message"]["extendedTextMessage"]["contextInfo"]["stanzaId"], id.as_str());
                assert!(message.text.unwrap_or_default().contains("hello"));
                replied = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(statuses, vec![ReceiptStatus::ServerAck, ReceiptStatus::Delivered, ReceiptStatus::Read]);
    assert_eq!(presences, [Presence::Available, Presence::Composing, Presence::Unavailable], "online, typing, gone");

    live.stop().await;
    assert_eq!(next(&mut events).await, DriverEvent::Closed { reason: CloseReason::Stopped });
    live.stop().await;
    assert!(matches!(live.send_text(&text("+1 555 0100 123")).await, Err(DriverError::NotConnected)));
    simulator.wipe(session).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!simulator.is_paired(session).await.unwrap_or(true));
}

#[tokio::test]
async fn injected_drops_logouts_and_bans_close_the_connection_with_their_reason() {
    let store = store().await;
    let simulator = Simulator::new(store, fast());
    let session = key();
    let (tx, mut events) = mpsc::channel(16);
    let live = simulator.connect(session, tx).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(live.simulate(Simulation::Ban).await, Err(DriverError::Invalid(_))));
    let code = live.pair_with_code("+49 151 23456789").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code.len(), 8);
    live.simulate(Simulation::Scan).await.unwrap_or_else(|e| panic!("{e}"));
    let paired = loop {
        if let DriverEvent::Paired { phone } = next(&mut events).await {
            break phone;
        }
    };
    assert_eq!(paired, "4915123456789@s.whatsapp.net", "pairing by code links the given number");

    // A burst: contacts send their messages at once.
    let (tx, mut events) = mpsc::channel(16);
    let live = simulator.connect(session, tx).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(next(&mut events).await, DriverEvent::Connected { .. }));
    live.simulate(Simulation::Burst).await.unwrap_or_else(|e| panic!("{e}"));
    let mut ids = std::collections::HashSet::new();
    while ids.len() < 25 {
        let DriverEvent::Message(message) = next(&mut events).await else { panic!("not a message") };
        assert!(!message.from_me);
        ids.insert(message.message_id);
    }
    live.stop().await;

    for (simulation, expected) in [
        (Simulation::Disconnect, CloseReason::Transient("simulated network drop".into())),
        (Simulation::Logout, CloseReason::LoggedOut("unlinked on the simulated phone".into())),
        (Simulation::Ban, CloseReason::Banned("simulated temporary ban".into())),
    ] {
        let (tx, mut events) = mpsc::channel(16);
        let live = simulator.connect(session, tx).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(next(&mut events).await, DriverEvent::Connected { .. }));
        live.simulate(simulation).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(next(&mut events).await, DriverEvent::Closed { reason: expected });
    }
}

#[tokio::test]
async fn the_phone_sends_its_history_once_after_pairing_in_bounded_pieces() {
    let store = store().await;
    let config = SimulatorConfig { history_messages: 1234, history_chats: 3, ..fast() };
    let simulator = Simulator::new(store.clone(), config);
    let session = key();
    paired(&simulator, session).await;

    let (tx, mut events) = mpsc::channel(4);
    let live = simulator.connect(session, tx).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(next(&mut events).await, DriverEvent::Connected { .. }));
    // No more pieces in flight than the worker has stored: two held, the third waits.
    let (first, second) = (next(&mut events).await, next(&mut events).await);
    assert!(matches!((&first, &second), (DriverEvent::History(..), DriverEvent::History(..))));
    assert!(tokio::time::timeout(Duration::from_millis(300), events.recv()).await.is_err(), "a third piece came");
    let mut held = vec![first, second].into_iter();
    let (mut ids, mut chats, mut contacts, mut progress) = (std::collections::HashSet::new(), 0, 0, Vec::new());
    while progress.last() != Some(&Some(100)) {
        let event = match held.next() {
            Some(event) => event,
            None => next(&mut events).await,
        };
        let DriverEvent::History(piece, _slot) = event else { panic!("not history") };
        assert!(piece.messages.len() <= HISTORY_PIECE_MESSAGES);
        assert_eq!(piece.sync_type, "initial_bootstrap");
        chats += piece.chats.len();
        contacts += piece.contacts.len();
        for history in piece.messages {
            assert_eq!(history.status.is_some(), history.message.from_me, "own messages carry their status");
            assert!(ids.insert(history.message.message_id), "ids are unique");
        }
        progress.push(piece.progress);
    }
    assert_eq!((ids.len(), chats, contacts), (1234, 3, 3));
    assert_eq!(progress, vec![Some(40), Some(81), Some(100)]);
    // The phone notes that the history went out.
    for _ in 0..100 {
        let creds = store.load_creds(session.session_id).await.unwrap_or_else(|e| panic!("{e}"));
        if creds.is_some_and(|creds| creds["simulatedDevice"].get("historySeed").is_none()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    live.stop().await;

    // Sent once: the next connection brings none.
    let (tx, mut events) = mpsc::channel(4);
    let live = simulator.connect(session, tx).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(next(&mut events).await, DriverEvent::Connected { .. }));
    live.stop().await;
    assert_eq!(next(&mut events).await, DriverEvent::Closed { reason: CloseReason::Stopped });
}

#[tokio::test]
async fn contacts_react_edit_and_delete_when_asked_and_own_changes_are_checked() {
    let simulator = Simulator::new(store().await, fast());
    let session = key();
    let phone = paired(&simulator, session).await;
    let (tx, mut events) = mpsc::channel(16);
    let live = simulator.connect(session, tx).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next(&mut events).await, DriverEvent::Connected { phone });
    let message = OutgoingText { text: "hi #react #edit #delete".into(), ..text("+1 555 0100 123") };
    let id = live.send_text(&message).await.unwrap_or_else(|e| panic!("{e}")).message_id;
    let (mut reply, mut changes) = (None, Vec::new());
    while changes.len() < 3 {
        match next(&mut events).await {
            DriverEvent::Message(message) => reply = Some(message.message_id),
            DriverEvent::Changed(change) => {
                assert_eq!((change.chat.as_str(), change.from_me), ("15550100123@s.whatsapp.net", false));
                changes.push((change.message_id, change.kind));
            }
            _ => {}
        }
    }
    let reply = reply.unwrap_or_default();
    assert_eq!(
        changes,
        vec![
            (id.clone(), ChangeKind::Reaction { emoji: Some("👍".into()) }),
            (reply.clone(), ChangeKind::Edited { text: Some("Simulated reply, edited".into()) }),
            (reply.clone(), ChangeKind::Revoked),
        ]
    );

    let chat = Jid::parse("+1 555 0100 123").unwrap_or_else(|e| panic!("{e}"));
    let mine = MessageTarget { chat: chat.clone(), message_id: id, from_me: true, sender: None };
    let theirs = MessageTarget { chat, message_id: reply, from_me: false, sender: None };
    assert!(live.edit_text(&mine, "fixed").await.is_ok());
    assert!(matches!(live.edit_text(&theirs, "fixed").await, Err(DriverError::Invalid(_))));
    assert!(matches!(live.revoke(&theirs).await, Err(DriverError::Invalid(_))));
    assert!(live.revoke(&mine).await.is_ok() && live.react(&theirs, "").await.is_ok());
    assert!(live.mark_read(&theirs.chat, std::slice::from_ref(&theirs)).await.is_ok());
    live.stop().await;
    assert!(matches!(live.react(&mine, "👍").await, Err(DriverError::NotConnected)));
}
