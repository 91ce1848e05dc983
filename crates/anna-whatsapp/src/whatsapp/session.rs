//! One live connection: a whatsapp-rust `Bot` running on its own task, its events forwarded
//! to the worker's channel, and the [`LiveSession`] operations on its client.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use whatsapp_rust::bot::Bot;
use whatsapp_rust::pair_code::PairCodeOptions;
use whatsapp_rust::types::events::Event;
use whatsapp_rust::upload::UploadOptions;
use whatsapp_rust::{Client, RevokeType};

use super::convert::{build_text_message, message_key, render_qr, to_wa_jid};
use super::events::{Context, translate};
use super::{WhatsAppError, map_send_error};
use crate::{
    CloseReason, DriverError, DriverEvent, HistorySlot, IncomingMedia, Jid, LiveSession, MessageTarget, OutgoingMedia,
    OutgoingText, SentMessage, SessionKey, Simulation,
};

/// How long the run loop's end waits for the event that explains it (events go through the
/// library's ordered mailbox, which may still hold it) before reporting a generic close.
const EXPLAIN_GRACE: Duration = Duration::from_secs(3);
/// `disconnect()` flushes for at most ~5 s; then the run loop ends.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// How long `stop` waits to hand `Closed` to the worker before finishing that in background
/// (the worker may be awaiting `stop` instead of reading its channel).
const CLOSE_HANDOFF: Duration = Duration::from_secs(5);
/// How long `pair_with_code` waits for the socket of a connection still opening.
const SOCKET_WAIT: Duration = Duration::from_secs(20);

pub(crate) struct Settings {
    pub qr_ttl: Duration,
    pub print_qr: bool,
    pub mark_online: bool,
}

/// State shared by the event handler, the run task and the [`LiveSession`].
pub(crate) struct Shared {
    session: SessionKey,
    settings: Settings,
    /// `None` once `Closed` was sent: nothing follows it. The lock also keeps events in order
    /// between the handler and `stop`/`logout`.
    events: Mutex<Option<mpsc::Sender<DriverEvent>>>,
    closed: CancellationToken,
    /// Set by `stop`, `logout` and drop: they report the end themselves (or nobody listens).
    finishing: AtomicBool,
    /// History-sync chunks are read one at a time (each decodes a conversation at a time).
    history: Arc<tokio::sync::Semaphore>,
    /// History pieces on their way to the database.
    history_slots: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    pub(crate) fn new(session: SessionKey, settings: Settings, events: mpsc::Sender<DriverEvent>) -> Self {
        Self {
            session,
            settings,
            events: Mutex::new(Some(events)),
            closed: CancellationToken::new(),
            finishing: AtomicBool::new(false),
            history: Arc::new(tokio::sync::Semaphore::new(1)),
            history_slots: Arc::new(tokio::sync::Semaphore::new(crate::HISTORY_PIECES_IN_FLIGHT)),
        }
    }

    async fn emit(&self, event: DriverEvent) {
        let events = self.events.lock().await;
        if let Some(events) = events.as_ref()
            && events.send(event).await.is_err()
        {
            tracing::debug!(session_id = %self.session.session_id, "the session's event receiver is gone");
        }
    }

    /// Sends `Closed` once; later calls do nothing.
    async fn close(&self, reason: CloseReason) {
        let mut events = self.events.lock().await;
        if let Some(sender) = events.take() {
            tracing::info!(session_id = %self.session.session_id, reason = %reason.label(), "whatsapp connection closed");
            let _ = sender.send(DriverEvent::Closed { reason }).await;
            self.closed.cancel();
        }
    }

    /// The library's event handler (ordered delivery: one event at a time, in order).
    pub(crate) async fn handle(self: Arc<Self>, event: Arc<Event>, client: Arc<Client>) {
        if self.closed.is_cancelled() {
            return;
        }
        if matches!(*event, Event::Connected(_)) && !self.settings.mark_online {
            // The library announces "available" on every connect, which silences the phone's
            // notifications; anna's default is to stay invisible unless told otherwise.
            let client = client.clone();
            let session_id = self.session.session_id;
            tokio::spawn(async move {
                if let Err(e) = client.presence().set_unavailable().await {
                    tracing::debug!(%session_id, error = %e, "could not mark the session unavailable");
                }
            });
        }
        if let Event::HistorySync(chunk) = &*event {
            // Off the library's ordered handler, which must keep delivering live events (its
            // mailbox drops them when full): one chunk at a time per connection, piece by piece.
            let (shared, chunk) = (self.clone(), chunk.clone());
            tokio::spawn(async move {
                let Ok(_one_at_a_time) = shared.history.clone().acquire_owned().await else { return };
                let mut pieces = super::history::pieces(&chunk);
                while let Some(piece) = pieces.recv().await {
                    let Ok(slot) = shared.history_slots.clone().acquire_owned().await else { return };
                    if shared.closed.is_cancelled() {
                        return;
                    }
                    shared.emit(DriverEvent::History(piece, HistorySlot::new(slot))).await;
                }
            });
            return;
        }
        // Only `Connected` carries the account's JID, read from the client.
        let own_phone =
            if matches!(*event, Event::Connected(_)) { client.pn().map(|jid| jid.to_string()) } else { None };
        let context = Context { qr_ttl: self.settings.qr_ttl, own_phone };
        for translated in translate(&event, &context) {
            match translated {
                DriverEvent::Closed { reason } => {
                    self.close(reason).await;
                    return;
                }
                DriverEvent::Qr { code, ttl } => {
                    if self.settings.print_qr {
                        self.print_qr(&code);
                    }
                    self.emit(DriverEvent::Qr { code, ttl }).await;
                }
                other => self.emit(other).await,
            }
        }
    }

    fn print_qr(&self, code: &str) {
        match render_qr(code) {
            Ok(rendered) => eprintln!("WhatsApp QR code for session {}:\n{rendered}", self.session.session_id),
            Err(e) => tracing::warn!(session_id = %self.session.session_id, error = %e, "could not render the QR code"),
        }
    }
}

/// Runs the bot until its loop ends and makes sure the worker hears about the end.
pub(crate) async fn run(bot: Bot, shared: Arc<Shared>) {
    bot.run().await;
    if shared.finishing.load(Ordering::Acquire) {
        return;
    }
    if tokio::time::timeout(EXPLAIN_GRACE, shared.closed.cancelled()).await.is_err() {
        shared.close(CloseReason::Transient("the client stopped".into())).await;
    }
}

/// A live whatsapp-rust connection.
pub(crate) struct WaLiveSession {
    pub(crate) client: Arc<Client>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) runner: StdMutex<Option<JoinHandle<()>>>,
}

impl WaLiveSession {
    fn take_runner(&self) -> Option<JoinHandle<()>> {
        self.runner.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Disconnects (flushing the keys) and waits for the run loop to end.
    async fn shut_down(&self) {
        self.client.disconnect().await;
        if let Some(mut runner) = self.take_runner()
            && tokio::time::timeout(STOP_WAIT, &mut runner).await.is_err()
        {
            tracing::warn!(session_id = %self.shared.session.session_id, "the whatsapp run loop did not end; aborting it");
            runner.abort();
        }
    }

    /// Sends a built message; its raw form is recorded as the account's phone would keep it.
    async fn send_built(
        &self,
        to: &Jid,
        built: whatsapp_rust::waproto::whatsapp::Message,
    ) -> Result<SentMessage, DriverError> {
        let raw_content = built.clone();
        let sent = self.client.send_message(to_wa_jid(to), built).await.map_err(map_send_error)?;
        let seconds = time::OffsetDateTime::now_utc().unix_timestamp();
        let raw = super::raw::live(&raw_content, &to.to_string(), &sent.message_id, true, None, seconds, None);
        Ok(SentMessage { message_id: sent.message_id, raw })
    }

    fn ensure_open(&self) -> Result<(), DriverError> {
        if self.shared.closed.is_cancelled() || !self.client.is_logged_in() {
            return Err(DriverError::NotConnected);
        }
        Ok(())
    }

    /// Sends `Closed`, waiting a bounded time (see [`CLOSE_HANDOFF`]).
    async fn close(&self, reason: CloseReason) {
        let shared = self.shared.clone();
        let closing = tokio::spawn(async move { shared.close(reason).await });
        let _ = tokio::time::timeout(CLOSE_HANDOFF, closing).await;
    }
}

#[async_trait]
impl LiveSession for WaLiveSession {
    async fn send_text(&self, message: &OutgoingText) -> Result<SentMessage, DriverError> {
        if message.text.is_empty() {
            return Err(DriverError::Invalid("the text is empty".into()));
        }
        if self.shared.closed.is_cancelled() {
            return Err(DriverError::NotConnected);
        }
        let built = build_text_message(&message.text, message.reply_to.as_deref(), message.forwarding_score);
        self.send_built(&message.to, built).await
    }

    async fn send_media(&self, message: &OutgoingMedia) -> Result<SentMessage, DriverError> {
        self.ensure_open()?;
        if message.bytes.is_empty() {
            return Err(DriverError::Invalid("the file is empty".into()));
        }
        let uploaded = self
            .client
            .upload(message.bytes.to_vec(), super::media::media_type(message.kind), UploadOptions::default())
            .await
            .map_err(|e| DriverError::Failed(format!("the upload to WhatsApp failed: {e}")))?;
        let built = super::media::media_message(uploaded, message);
        self.send_built(&message.to, built).await
    }

    async fn download_media(&self, media: &IncomingMedia, limit: u64, into: std::fs::File) -> Result<u64, DriverError> {
        self.ensure_open()?;
        let params = super::media::download_params(media)
            .ok_or_else(|| DriverError::Invalid("the message does not say where its file is".into()))?;
        if params.file_length > limit {
            return Err(DriverError::Invalid(format!("the file is larger than {limit} bytes")));
        }
        // The declared length is the sender's word: the writer itself refuses to grow past the
        // limit, whatever arrives.
        let written = self
            .client
            .download_from_params_to_writer(&params, super::media::LimitedFile::new(into, limit))
            .await
            .map_err(|e| DriverError::Failed(format!("the download from WhatsApp failed: {e}")))?;
        Ok(written.written())
    }

    async fn mark_read(&self, chat: &Jid, messages: &[MessageTarget]) -> Result<(), DriverError> {
        self.ensure_open()?;
        let wa_chat = to_wa_jid(chat);
        // One receipt per sender: in a group, the receipt names whose messages were read.
        let mut by_sender: Vec<(Option<&Jid>, Vec<&str>)> = Vec::new();
        for message in messages.iter().filter(|message| !message.from_me) {
            let sender = message.sender.as_ref().filter(|_| chat.is_group());
            match by_sender.iter_mut().find(|(known, _)| *known == sender) {
                Some((_, ids)) => ids.push(&message.message_id),
                None => by_sender.push((sender, vec![&message.message_id])),
            }
        }
        for (sender, ids) in by_sender {
            let sender = sender.map(to_wa_jid);
            self.client
                .mark_as_read(&wa_chat, sender.as_ref(), &ids)
                .await
                .map_err(|e| DriverError::Failed(format!("read receipts failed: {e}")))?;
        }
        Ok(())
    }

    async fn edit_text(&self, target: &MessageTarget, text: &str) -> Result<(), DriverError> {
        self.ensure_open()?;
        if !target.from_me {
            return Err(DriverError::Invalid("only messages sent by this account can be edited".into()));
        }
        if text.is_empty() {
            return Err(DriverError::Invalid("the text is empty".into()));
        }
        self.client
            .edit_message(to_wa_jid(&target.chat), target.message_id.clone(), build_text_message(text, None, None))
            .await
            .map_err(map_send_error)?;
        Ok(())
    }

    async fn revoke(&self, target: &MessageTarget) -> Result<(), DriverError> {
        self.ensure_open()?;
        let revoke = match (&target.sender, target.from_me) {
            (_, true) => RevokeType::Sender,
            (Some(sender), false) if target.chat.is_group() => RevokeType::Admin { original_sender: to_wa_jid(sender) },
            _ => {
                return Err(DriverError::Invalid(
                    "only messages sent by this account (or, as a group admin, a member's) can be deleted for everyone"
                        .into(),
                ));
            }
        };
        self.client
            .revoke_message(to_wa_jid(&target.chat), target.message_id.clone(), revoke)
            .await
            .map_err(map_send_error)
    }

    async fn react(&self, target: &MessageTarget, emoji: &str) -> Result<(), DriverError> {
        self.ensure_open()?;
        self.client.send_reaction(to_wa_jid(&target.chat), message_key(target), emoji).await.map_err(map_send_error)?;
        Ok(())
    }

    async fn pair_with_code(&self, phone: &str) -> Result<String, DriverError> {
        let digits = crate::jid::phone_digits(phone).map_err(|e| DriverError::Invalid(format!("phone number {e}")))?;
        if self.shared.closed.is_cancelled() {
            return Err(DriverError::NotConnected);
        }
        if self.client.is_logged_in() {
            return Err(DriverError::Invalid("the session is already paired".into()));
        }
        self.client.wait_for_socket(SOCKET_WAIT).await.map_err(|_| DriverError::NotConnected)?;
        let options = PairCodeOptions { phone_number: digits, ..Default::default() };
        let code = self
            .client
            .pair_with_code(options)
            .await
            .map_err(|e| DriverError::from(WhatsAppError::PairCode(e.to_string())))?;
        Ok(code)
    }

    async fn logout(&self) -> Result<(), DriverError> {
        if self.shared.closed.is_cancelled() || !self.client.is_logged_in() {
            return Err(DriverError::NotConnected);
        }
        self.shared.finishing.store(true, Ordering::Release);
        // Sends the unlink request, dispatches `LoggedOut` (which the handler may already turn
        // into `Closed`), then disconnects.
        self.client.logout().await;
        self.shut_down().await;
        self.close(CloseReason::LoggedOut(String::new())).await;
        Ok(())
    }

    async fn stop(&self) {
        if self.shared.finishing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shut_down().await;
        self.close(CloseReason::Stopped).await;
    }

    async fn simulate(&self, _simulation: Simulation) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("whatsapp"))
    }
}

impl Drop for WaLiveSession {
    fn drop(&mut self) {
        // Dropped without `stop`: a client left running would race the next one on the same
        // keys, so end it (disconnect still flushes); nobody is left to tell.
        if self.shared.finishing.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            runtime.spawn(async move { client.disconnect().await });
        } else if let Some(runner) = self.take_runner() {
            runner.abort();
        }
    }
}
