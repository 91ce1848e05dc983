//! Message history: the messages each session sent and received, and per chat its last
//! message and unread count (`session_messages`, `session_chats`, the predecessor's tables).
//! Written in a unit of work by the message-history subscriber ([`MessageWrites`]); read by the
//! chat routes ([`MessageStore`]).

use anna_domain::session::{ChangeKind, HistoryPiece, MessageChange, MessageContext};
use async_trait::async_trait;
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::StoreError;
use crate::sql::{Row, Sql};
use crate::store::{SqlStore, SqlUnitOfWork};

/// One message of a session's history.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub tenant_id: Uuid,
    pub session_id: Uuid,
    pub chat_jid: String,
    pub message_id: String,
    pub from_me: bool,
    pub sender_jid: Option<String>,
    pub timestamp: OffsetDateTime,
    /// `text` for the messages anna handles today.
    pub kind: String,
    pub text: Option<String>,
    pub status: Option<String>,
    pub status_at: Option<OffsetDateTime>,
    pub edited_at: Option<OffsetDateTime>,
    /// When it was deleted for everyone (it stays in the history, flagged).
    pub deleted_at: Option<OffsetDateTime>,
    /// What it answers and whom it mentions.
    pub context: MessageContext,
    /// WhatsApp's record of it, as JSON (see `anna_domain::session::RawMessage`); read only
    /// when asked for.
    pub raw: Option<serde_json::Value>,
}

impl StoredMessage {
    pub fn is_edited(&self) -> bool {
        self.edited_at.is_some()
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }
}

/// What recording messages does to one chat, applied once per chat for a whole batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTouch {
    pub tenant_id: Uuid,
    pub session_id: Uuid,
    pub chat_jid: String,
    /// Names the chat from now on.
    pub chat_name: Option<String>,
    /// The newest of the chat's new messages: its last message, if newer than the stored one.
    pub last: Option<StoredMessage>,
    /// The chat was read: the unread count becomes `unread` instead of growing by it.
    pub read: bool,
    /// The chat was read on the account's phone at this time: what came later stays unread
    /// (see [`MessageWrites::mark_chat_read_on_phone`]).
    pub read_on_phone_at: Option<OffsetDateTime>,
    /// New messages not read (since the read, when there was one).
    pub unread: u32,
}

impl ChatTouch {
    pub fn new(tenant_id: Uuid, session_id: Uuid, chat_jid: &str) -> Self {
        Self {
            tenant_id,
            session_id,
            chat_jid: chat_jid.to_owned(),
            chat_name: None,
            last: None,
            read: false,
            read_on_phone_at: None,
            unread: 0,
        }
    }

    /// Takes a new message of the chat into account.
    pub fn add(&mut self, message: &StoredMessage, unread: bool, chat_name: Option<&str>) {
        if chat_name.is_some() {
            self.chat_name = chat_name.map(str::to_owned);
        }
        if unread {
            self.unread += 1;
        }
        if self
            .last
            .as_ref()
            .is_none_or(|last| (last.timestamp, &last.message_id) < (message.timestamp, &message.message_id))
        {
            self.last = Some(message.clone());
        }
    }

    /// The chat was read: what came before no longer counts as unread.
    pub fn mark_read(&mut self) {
        self.read = true;
        self.unread = 0;
    }

    /// The chat was read on the phone at `at` (the latest such read counts).
    pub fn mark_read_on_phone(&mut self, at: OffsetDateTime) {
        self.read_on_phone_at = Some(self.read_on_phone_at.map_or(at, |known| known.max(at)));
    }
}

/// One emoji on a message, with who put it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactionSummary {
    pub message_id: String,
    pub emoji: String,
    /// The actors, in the order they reacted.
    pub actors: Vec<String>,
}

/// A contact as a message or the phone's history shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactSighting {
    /// The contact's address (its phone JID when known).
    pub jid: String,
    pub lid: Option<String>,
    /// The name in the phone's address book.
    pub name: Option<String>,
    /// The name the contact gave themselves (push name).
    pub notify: Option<String>,
}

/// A contact of a session, as the predecessor's clients read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactSummary {
    pub contact_jid: String,
    pub contact_lid: Option<String>,
    pub phone_number: Option<String>,
    /// The name in the phone's address book.
    pub name: Option<String>,
    /// The name the contact gave themselves (push name).
    pub notify: Option<String>,
    pub verified_name: Option<String>,
    pub img_url: Option<String>,
    pub status: Option<String>,
}

/// A chat of a session, with its latest message.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatSummary {
    pub chat_jid: String,
    pub chat_name: Option<String>,
    pub last_message_id: Option<String>,
    pub last_message_ts: Option<OffsetDateTime>,
    pub last_message_text: Option<String>,
    pub last_message_type: Option<String>,
    pub unread_count: u64,
}

/// Where a page of history ends: the next page holds messages strictly older.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryCursor {
    pub timestamp: OffsetDateTime,
    pub message_id: String,
}

#[async_trait]
pub trait MessageStore: Send + Sync {
    /// The session's chats, latest message first (chats without one last).
    async fn list_chats(&self, session_id: Uuid) -> Result<Vec<ChatSummary>, StoreError>;

    /// Up to `limit` messages of a chat, newest first, older than `before` when given. Stable
    /// under concurrent inserts: a page is defined by its cursor, not by an offset. Their raw
    /// form only with `include_raw`.
    async fn list_messages(
        &self,
        session_id: Uuid,
        chat_jid: &str,
        before: Option<&HistoryCursor>,
        limit: u32,
        include_raw: bool,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// The stored messages among `message_ids` in a chat (any order).
    async fn find_messages(
        &self,
        session_id: Uuid,
        chat_jid: &str,
        message_ids: &[String],
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// A message of the session by its id, in whichever chat (the source of a forward), with
    /// its raw form.
    async fn find_message_in_session(
        &self,
        session_id: Uuid,
        message_id: &str,
    ) -> Result<Option<StoredMessage>, StoreError>;

    /// The session's contacts, by name (address book, then push name), then JID.
    async fn list_contacts(&self, session_id: Uuid) -> Result<Vec<ContactSummary>, StoreError>;

    /// The contacts with these JIDs (or LIDs).
    async fn find_contacts(&self, session_id: Uuid, jids: &[String]) -> Result<Vec<ContactSummary>, StoreError>;

    /// The tenant's own message retention in days, if it set one.
    async fn message_retention(&self, tenant_id: Uuid) -> Result<Option<u32>, StoreError>;

    /// Sessions whose messages expire: each with its retention in days (its tenant's, else
    /// `default_days`; 0 = kept forever, left out).
    async fn sessions_with_retention(&self, default_days: u32) -> Result<Vec<(Uuid, u32)>, StoreError>;

    /// Deletes up to `limit` of the session's messages older than `before` (their reactions
    /// and chats too once nothing newer is left in them). Returns how many messages went.
    async fn purge_messages(&self, session_id: Uuid, before: OffsetDateTime, limit: u32) -> Result<u64, StoreError>;

    /// The current reactions to the given messages, grouped by message and emoji (removed
    /// reactions left out), in the order of their first reaction.
    async fn list_reactions(
        &self,
        session_id: Uuid,
        message_ids: &[String],
    ) -> Result<Vec<ReactionSummary>, StoreError>;
}

/// The message-history half of a unit of work.
#[async_trait]
pub trait MessageWrites: Send {
    /// Stores a new message and moves its chat's last message forward if it is newer;
    /// `unread`: the chat's unread count grows by one. A message already stored keeps its row
    /// (only a newer status is taken). Nothing is written for a session that no longer exists
    /// (a late event of a deleted session). `chat_name`, when given, names the chat from now on.
    /// Returns whether the message was new.
    async fn record_message(
        &mut self,
        message: &StoredMessage,
        unread: bool,
        chat_name: Option<&str>,
    ) -> Result<bool, StoreError>;

    /// Stores a new message only: no chat change (see [`Self::touch_chats`]) and none of the
    /// changes kept for it (see [`Self::apply_pending_changes`]). Returns whether it was new; a
    /// known one only takes a newer status.
    async fn insert_message(&mut self, message: &StoredMessage) -> Result<bool, StoreError>;

    /// Applies, then forgets, the changes kept for these messages of a session (edits,
    /// deletions, statuses that overtook them), in one look for the lot. After the chats were
    /// moved: an edit of a chat's last message also changes the chat's last text.
    async fn apply_pending_changes(&mut self, session_id: Uuid, message_ids: &[String]) -> Result<(), StoreError>;

    /// Moves each chat once: its last message forward, its unread count, its name. In the
    /// order of (session, chat), so units of work touching the same chats never wait for each
    /// other in a cycle.
    async fn touch_chats(&mut self, touches: &mut [ChatTouch]) -> Result<(), StoreError>;

    /// Sets a stored message's delivery status when it is further along than the stored one
    /// (sent, server_ack, delivered, read, played; a rejection is final): receipts arrive out of
    /// order. `false` when the message is already as far, or not stored yet (the status is then
    /// kept and applied when the message is stored).
    async fn record_message_status(
        &mut self,
        session_id: Uuid,
        message_id: &str,
        status: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Applies an edit, a deletion for everyone or a reaction to a stored message. An edit
    /// older than the stored one, or an actor's reaction older than their stored one, changes
    /// nothing (`false`). Events are applied by several readers at once, so a change may
    /// overtake its message: edits and deletions (like statuses, see
    /// [`Self::record_message_status`]) of a message not stored yet are kept and applied when
    /// it is (`false` until then); reactions are stored apart from their message anyway.
    async fn record_message_change(
        &mut self,
        tenant_id: Uuid,
        session_id: Uuid,
        change: &MessageChange,
    ) -> Result<bool, StoreError>;

    /// Stores a piece of a history sync: its messages (those already stored are kept), its
    /// chats (names, the phone's unread counts, the last message moving forward only) and its
    /// contacts. Messages of the history are not unread by themselves: the phone's counts are
    /// taken. Changes kept for its messages are applied. Returns how many messages were new;
    /// `None` for a session that no longer exists (nothing is written).
    async fn record_history(
        &mut self,
        tenant_id: Uuid,
        session_id: Uuid,
        piece: &HistoryPiece,
    ) -> Result<Option<u64>, StoreError>;

    /// Applies kept changes whose message has been stored since (up to `limit` messages), and
    /// forgets those kept since before `expired_before` (their message never came). Returns
    /// (messages changed, changes forgotten).
    async fn settle_pending_changes(
        &mut self,
        limit: u32,
        expired_before: OffsetDateTime,
    ) -> Result<(u64, u64), StoreError>;

    /// Records contacts seen in live messages (their push names, their LIDs); a contact's
    /// address-book name is never replaced by a push name. Sorted by JID first, so units of
    /// work recording the same contacts at once never wait for each other in a cycle.
    async fn record_contacts(
        &mut self,
        tenant_id: Uuid,
        session_id: Uuid,
        contacts: &mut [ContactSighting],
    ) -> Result<(), StoreError>;

    /// Sets (or, with `None`, clears) the tenant's message retention in days.
    async fn set_message_retention(&mut self, tenant_id: Uuid, days: Option<u32>) -> Result<(), StoreError>;

    /// The chat has been read: its unread count is 0. `false` when there is no such chat.
    async fn mark_chat_read(&mut self, session_id: Uuid, chat_jid: &str) -> Result<bool, StoreError>;

    /// The chat was read on the account's phone at `at`: its unread count becomes the number
    /// of received messages newer than `at` (never more than it is: a later read through the
    /// API stands), under every address of the chat (its aliases).
    async fn mark_chat_read_on_phone(
        &mut self,
        session_id: Uuid,
        chat_jid: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Deletes a session's history (the session was deleted).
    async fn delete_message_history(&mut self, session_id: Uuid) -> Result<u64, StoreError>;
}

/// Whether the message being recorded comes after the chat's last one, in history order
/// (timestamp, then message id): the last message only moves forward.
macro_rules! newer_last_message {
    () => {
        "(session_chats.last_message_ts IS NULL OR excluded.last_message_ts > session_chats.last_message_ts \
         OR (excluded.last_message_ts = session_chats.last_message_ts \
         AND excluded.last_message_id > session_chats.last_message_id))"
    };
}

/// `$where`, then `$order` and `$limit`. A predecessor's row without a timestamp shows its
/// creation time (only on Postgres, where its tables may come from the predecessor). Named
/// apart from `timestamp`: an ORDER BY of the output alias would sort the expression and miss
/// the index (a 50-row page of a 10,000-message chat took 16 ms instead of well under 1).
/// `$raw`: the raw message's column (`raw`, `NULL`, or a choice by a parameter): it is large,
/// and read only when asked for.
macro_rules! select_messages {
    ($raw:literal, $where:expr, $order:expr, $limit:literal) => {
        concat!(
            "SELECT tenant_id, session_id, chat_jid, message_id, from_me, sender_jid, \
             COALESCE(timestamp, created_at) AS shown_at, type, text, status, status_at, \
             CASE WHEN is_edited THEN COALESCE(edited_at, updated_at) END AS edited_at, \
             CASE WHEN is_deleted THEN COALESCE(deleted_at, updated_at) END AS deleted_at, \
             reply_to_message_id, reply_to_participant, mentions, forwarding_score, ",
            $raw,
            " AS raw FROM session_messages WHERE ",
            $where,
            $order,
            $limit
        )
    };
}

/// Strictly older than the cursor `($3, $4)`; `timestamp <= $3` first, so the index range
/// starts at the cursor instead of at the newest message.
macro_rules! older_than_cursor {
    () => {
        "session_id = $1 AND chat_jid = $2 AND timestamp <= $3 \
         AND (timestamp < $3 OR (timestamp = $3 AND message_id < $4))"
    };
}

macro_rules! newest_first {
    () => {
        " ORDER BY timestamp DESC, message_id DESC"
    };
}

/// The same order on Postgres, whose NULLs (predecessor rows only) would otherwise come first.
macro_rules! newest_first_pg {
    () => {
        " ORDER BY timestamp DESC NULLS LAST, message_id DESC"
    };
}

/// How far a message got: a status only ever moves up this scale (receipts arrive out of
/// order, and their times come from other clocks, in whole seconds).
macro_rules! status_rank {
    ($status:literal) => {
        concat!(
            "(CASE WHEN ",
            $status,
            " LIKE 'rejected%' THEN 6 WHEN ",
            $status,
            " = 'played' THEN 5 WHEN ",
            $status,
            " = 'read' THEN 4 WHEN ",
            $status,
            " = 'delivered' THEN 3 WHEN ",
            $status,
            " = 'server_ack' THEN 2 WHEN ",
            $status,
            " = 'sent' THEN 1 ELSE 0 END)"
        )
    };
}

#[async_trait]
impl MessageStore for SqlStore {
    async fn list_chats(&self, session_id: Uuid) -> Result<Vec<ChatSummary>, StoreError> {
        let rows = self
            .pool
            .query(
                "SELECT chat_jid, chat_name, last_message_id, last_message_ts, last_message_text, last_message_type, \
                 unread_count FROM session_chats WHERE session_id = $1 \
                 ORDER BY last_message_ts IS NULL, last_message_ts DESC, chat_jid",
            )
            .bind_uuid(session_id)
            .fetch_all()
            .await?;
        rows.iter().map(chat_from_row).collect()
    }

    async fn list_messages(
        &self,
        session_id: Uuid,
        chat_jid: &str,
        before: Option<&HistoryCursor>,
        limit: u32,
        include_raw: bool,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let limit = i64::from(limit.max(1));
        let rows = match before {
            None => {
                self.pool
                    .query(Sql::PerBackend {
                        sqlite: select_messages!(
                            "CASE WHEN $4 THEN raw END",
                            "session_id = $1 AND chat_jid = $2",
                            newest_first!(),
                            " LIMIT $3"
                        ),
                        postgres: select_messages!(
                            "CASE WHEN $4 THEN raw END",
                            "session_id = $1 AND chat_jid = $2",
                            newest_first_pg!(),
                            " LIMIT $3"
                        ),
                    })
                    .bind_uuid(session_id)
                    .bind(chat_jid)
                    .bind(limit)
                    .bind(include_raw)
                    .fetch_all()
                    .await?
            }
            Some(cursor) => {
                self.pool
                    .query(Sql::PerBackend {
                        sqlite: select_messages!(
                            "CASE WHEN $6 THEN raw END",
                            older_than_cursor!(),
                            newest_first!(),
                            " LIMIT $5"
                        ),
                        postgres: select_messages!(
                            "CASE WHEN $6 THEN raw END",
                            older_than_cursor!(),
                            newest_first_pg!(),
                            " LIMIT $5"
                        ),
                    })
                    .bind_uuid(session_id)
                    .bind(chat_jid)
                    .bind_time(cursor.timestamp)
                    .bind(cursor.message_id.as_str())
                    .bind(limit)
                    .bind(include_raw)
                    .fetch_all()
                    .await?
            }
        };
        rows.iter().map(message_from_row).collect()
    }

    async fn message_retention(&self, tenant_id: Uuid) -> Result<Option<u32>, StoreError> {
        let row = self
            .pool
            .query("SELECT message_retention_days FROM tenant_settings WHERE tenant_id = $1")
            .bind_uuid(tenant_id)
            .fetch_optional()
            .await?;
        let days: Option<i32> = match row {
            Some(row) => row.get("message_retention_days")?,
            None => None,
        };
        Ok(days.and_then(|days| u32::try_from(days).ok()))
    }

    async fn sessions_with_retention(&self, default_days: u32) -> Result<Vec<(Uuid, u32)>, StoreError> {
        let rows = self
            .pool
            .query(
                "SELECT s.id AS session_id, COALESCE(t.message_retention_days, $1) AS days FROM sessions s \
                 LEFT JOIN tenant_settings t ON t.tenant_id = s.tenant_id \
                 WHERE COALESCE(t.message_retention_days, $1) > 0",
            )
            .bind(i32::try_from(default_days).unwrap_or(i32::MAX))
            .fetch_all()
            .await?;
        rows.iter()
            .map(|row| {
                let days: i32 = row.get("days")?;
                Ok((row.uuid("session_id")?, u32::try_from(days).unwrap_or(0)))
            })
            .collect()
    }

    async fn purge_messages(&self, session_id: Uuid, before: OffsetDateTime, limit: u32) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Oldest first through (session_id, timestamp): a batch costs its own size.
        let purged = tx
            .query(
                "DELETE FROM session_messages WHERE id IN (SELECT id FROM session_messages \
                 WHERE session_id = $1 AND timestamp < $2 ORDER BY timestamp LIMIT $3)",
            )
            .bind_uuid(session_id)
            .bind_time(before)
            .bind(i64::from(limit.max(1)))
            .execute()
            .await?;
        if purged < u64::from(limit.max(1)) {
            // The last batch: what belonged to the messages gone goes too.
            tx.query("DELETE FROM session_message_reactions WHERE session_id = $1 AND reacted_at < $2")
                .bind_uuid(session_id)
                .bind_time(before)
                .execute()
                .await?;
            tx.query("DELETE FROM session_chats WHERE session_id = $1 AND last_message_ts < $2")
                .bind_uuid(session_id)
                .bind_time(before)
                .execute()
                .await?;
        }
        tx.commit().await?;
        Ok(purged)
    }

    async fn find_message_in_session(
        &self,
        session_id: Uuid,
        message_id: &str,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let row = self
            .pool
            .query(select_messages!("raw", "session_id = $1 AND message_id = $2", "", ""))
            .bind_uuid(session_id)
            .bind(message_id)
            .fetch_optional()
            .await?;
        row.as_ref().map(message_from_row).transpose()
    }

    async fn find_contacts(&self, session_id: Uuid, jids: &[String]) -> Result<Vec<ContactSummary>, StoreError> {
        if jids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .pool
            .query(Sql::PerBackend {
                sqlite: "SELECT contact_jid, contact_lid, phone_number, name, notify, verified_name, img_url, status \
                         FROM session_contacts WHERE session_id = $1 \
                         AND (contact_jid IN (SELECT value FROM json_each($2)) \
                         OR contact_lid IN (SELECT value FROM json_each($2)))",
                postgres: "SELECT contact_jid, contact_lid, phone_number, name, notify, verified_name, img_url, status \
                           FROM session_contacts WHERE session_id = $1 \
                           AND (contact_jid = ANY($2) OR contact_lid = ANY($2))",
            })
            .bind_uuid(session_id)
            .bind_text_set(jids)
            .fetch_all()
            .await?;
        rows.iter().map(contact_from_row).collect()
    }

    async fn list_contacts(&self, session_id: Uuid) -> Result<Vec<ContactSummary>, StoreError> {
        let rows = self
            .pool
            .query(
                "SELECT contact_jid, contact_lid, phone_number, name, notify, verified_name, img_url, status \
                 FROM session_contacts WHERE session_id = $1 \
                 ORDER BY COALESCE(name, notify, verified_name) IS NULL, COALESCE(name, notify, verified_name), \
                 contact_jid",
            )
            .bind_uuid(session_id)
            .fetch_all()
            .await?;
        rows.iter().map(contact_from_row).collect()
    }

    async fn find_messages(
        &self,
        session_id: Uuid,
        chat_jid: &str,
        message_ids: &[String],
    ) -> Result<Vec<StoredMessage>, StoreError> {
        if message_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .pool
            .query(Sql::PerBackend {
                sqlite: select_messages!(
                    "NULL",
                    "session_id = $1 AND chat_jid = $2 AND message_id IN (SELECT value FROM json_each($3))",
                    "",
                    ""
                ),
                postgres: select_messages!(
                    "NULL",
                    "session_id = $1 AND chat_jid = $2 AND message_id = ANY($3)",
                    "",
                    ""
                ),
            })
            .bind_uuid(session_id)
            .bind(chat_jid)
            .bind_text_set(message_ids)
            .fetch_all()
            .await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn list_reactions(
        &self,
        session_id: Uuid,
        message_ids: &[String],
    ) -> Result<Vec<ReactionSummary>, StoreError> {
        if message_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .pool
            .query(Sql::PerBackend {
                sqlite: "SELECT message_id, emoji, actor_jid FROM session_message_reactions \
                         WHERE session_id = $1 AND message_id IN (SELECT value FROM json_each($2)) \
                         AND NOT is_removed AND emoji IS NOT NULL AND emoji <> '' \
                         ORDER BY message_id, reacted_at, actor_jid",
                postgres: "SELECT message_id, emoji, actor_jid FROM session_message_reactions \
                           WHERE session_id = $1 AND message_id = ANY($2) \
                           AND NOT is_removed AND emoji IS NOT NULL AND emoji <> '' \
                           ORDER BY message_id, reacted_at NULLS FIRST, actor_jid",
            })
            .bind_uuid(session_id)
            .bind_text_set(message_ids)
            .fetch_all()
            .await?;
        let mut summaries: Vec<ReactionSummary> = Vec::new();
        for row in &rows {
            let message_id: String = row.get("message_id")?;
            let emoji: String = row.get("emoji")?;
            let actor: String = row.get("actor_jid")?;
            match summaries.iter_mut().find(|s| s.message_id == message_id && s.emoji == emoji) {
                Some(summary) => summary.actors.push(actor),
                None => summaries.push(ReactionSummary { message_id, emoji, actors: vec![actor] }),
            }
        }
        Ok(summaries)
    }
}

impl SqlUnitOfWork {
    /// Moves one chat (see [`MessageWrites::touch_chats`]).
    async fn touch_chat(&mut self, touch: &ChatTouch, now: OffsetDateTime) -> Result<(), StoreError> {
        let Some(last) = &touch.last else {
            if touch.read {
                self.mark_chat_read(touch.session_id, &touch.chat_jid).await?;
            }
            return Ok(());
        };
        let last_text = last.text.clone().unwrap_or_else(|| format!("[{}]", last.kind));
        self.tx
            .query(concat!(
                "INSERT INTO session_chats (id, tenant_id, session_id, chat_jid, last_message_id, last_message_ts, \
                 last_message_text, last_message_type, unread_count, created_at, updated_at, chat_name) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11 \
                 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = $3 AND tenant_id = $2) \
                 ON CONFLICT (session_id, chat_jid) DO UPDATE SET \
                 chat_name = COALESCE(excluded.chat_name, session_chats.chat_name), last_message_id = CASE WHEN ",
                newer_last_message!(),
                " THEN excluded.last_message_id ELSE session_chats.last_message_id END, \
                 last_message_text = CASE WHEN ",
                newer_last_message!(),
                " THEN excluded.last_message_text ELSE session_chats.last_message_text END, \
                 last_message_type = CASE WHEN ",
                newer_last_message!(),
                " THEN excluded.last_message_type ELSE session_chats.last_message_type END, \
                 last_message_ts = CASE WHEN ",
                newer_last_message!(),
                " THEN excluded.last_message_ts ELSE session_chats.last_message_ts END, \
                 unread_count = CASE WHEN $12 THEN excluded.unread_count \
                 ELSE session_chats.unread_count + excluded.unread_count END, updated_at = excluded.updated_at"
            ))
            .bind_uuid(Uuid::now_v7())
            .bind_uuid(touch.tenant_id)
            .bind_uuid(touch.session_id)
            .bind(touch.chat_jid.as_str())
            .bind(last.message_id.as_str())
            .bind_time(last.timestamp)
            .bind(last_text.as_str())
            .bind(last.kind.as_str())
            .bind(i32::try_from(touch.unread).unwrap_or(i32::MAX))
            .bind_time(now)
            .bind(touch.chat_name.as_deref())
            .bind(touch.read)
            .execute()
            .await?;
        Ok(())
    }
}

#[async_trait]
impl MessageWrites for SqlUnitOfWork {
    async fn record_message(
        &mut self,
        message: &StoredMessage,
        unread: bool,
        chat_name: Option<&str>,
    ) -> Result<bool, StoreError> {
        if !self.insert_message(message).await? {
            return Ok(false);
        }
        let mut touch = ChatTouch::new(message.tenant_id, message.session_id, &message.chat_jid);
        touch.add(message, unread, chat_name);
        self.touch_chats(std::slice::from_mut(&mut touch)).await?;
        self.apply_pending_changes(message.session_id, std::slice::from_ref(&message.message_id)).await?;
        Ok(true)
    }

    async fn insert_message(&mut self, message: &StoredMessage) -> Result<bool, StoreError> {
        let now = OffsetDateTime::now_utc();
        // Inserted only when new (and when its session still exists): a message reported twice
        // must not count twice as unread.
        let inserted = self
            .tx
            .query(
                "INSERT INTO session_messages (id, tenant_id, session_id, chat_jid, message_id, from_me, sender_jid, \
                 timestamp, type, text, status, status_at, created_at, updated_at, reply_to_message_id, \
                 reply_to_participant, mentions, forwarding_score, raw) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13, $14, $15, $16, $17, $18 \
                 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = $3 AND tenant_id = $2) \
                 ON CONFLICT (session_id, message_id) DO NOTHING",
            )
            .bind_uuid(Uuid::now_v7())
            .bind_uuid(message.tenant_id)
            .bind_uuid(message.session_id)
            .bind(message.chat_jid.as_str())
            .bind(message.message_id.as_str())
            .bind(message.from_me)
            .bind(message.sender_jid.as_deref())
            .bind_time(message.timestamp)
            .bind(message.kind.as_str())
            .bind(message.text.as_deref())
            .bind(message.status.as_deref())
            .bind_opt_time(message.status_at)
            .bind_time(now)
            .bind(message.context.reply_to.as_deref())
            .bind(message.context.reply_to_participant.as_deref())
            .bind(
                (!message.context.mentions.is_empty()).then(|| serde_json::json!(message.context.mentions).to_string()),
            )
            .bind(message.context.forwarding_score.map(|score| i32::try_from(score).unwrap_or(i32::MAX)))
            .bind_opt_json(message.raw.as_ref())
            .execute()
            .await?;
        if inserted == 0 {
            if let (Some(status), Some(at)) = (message.status.as_deref(), message.status_at) {
                self.record_message_status(message.session_id, &message.message_id, status, at).await?;
            }
            return Ok(false);
        }
        Ok(true)
    }

    async fn apply_pending_changes(&mut self, session_id: Uuid, message_ids: &[String]) -> Result<(), StoreError> {
        if message_ids.is_empty() {
            return Ok(());
        }
        let waiting = self
            .tx
            .query(Sql::PerBackend {
                sqlite: "SELECT DISTINCT message_id FROM session_message_pending \
                         WHERE session_id = $1 AND message_id IN (SELECT value FROM json_each($2))",
                postgres: "SELECT DISTINCT message_id FROM session_message_pending \
                           WHERE session_id = $1 AND message_id = ANY($2)",
            })
            .bind_uuid(session_id)
            .bind_text_set(message_ids)
            .fetch_all()
            .await?;
        for row in &waiting {
            let message_id: String = row.get("message_id")?;
            self.apply_deferred(session_id, &message_id).await?;
        }
        Ok(())
    }

    async fn touch_chats(&mut self, touches: &mut [ChatTouch]) -> Result<(), StoreError> {
        touches.sort_by(|a, b| (a.session_id, &a.chat_jid).cmp(&(b.session_id, &b.chat_jid)));
        let now = OffsetDateTime::now_utc();
        for touch in touches.iter() {
            self.touch_chat(touch, now).await?;
        }
        // Reads on the phone once every chat has its new messages: a read named by one address
        // counts the messages of the batch under the others too.
        for touch in touches.iter() {
            if let Some(at) = touch.read_on_phone_at {
                self.mark_chat_read_on_phone(touch.session_id, &touch.chat_jid, at).await?;
            }
        }
        Ok(())
    }

    async fn mark_chat_read_on_phone(
        &mut self,
        session_id: Uuid,
        chat_jid: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let updated = self
            .tx
            .query(
                "UPDATE session_chats SET unread_count = CASE WHEN later.unread < unread_count \
                 THEN later.unread ELSE unread_count END, updated_at = $4 \
                 FROM (SELECT chat_jid AS address, (SELECT count(*) FROM session_messages m \
                       WHERE m.session_id = $1 AND m.chat_jid = addresses.chat_jid AND NOT m.from_me \
                       AND m.timestamp > $3) AS unread \
                       FROM (SELECT $2 AS chat_jid UNION SELECT alias FROM session_chat_aliases \
                             WHERE session_id = $1 AND chat_key = (SELECT chat_key FROM session_chat_aliases \
                             WHERE session_id = $1 AND alias = $2)) AS addresses) AS later \
                 WHERE session_chats.session_id = $1 AND session_chats.chat_jid = later.address",
            )
            .bind_uuid(session_id)
            .bind(chat_jid)
            .bind_time(at)
            .bind_time(OffsetDateTime::now_utc())
            .execute()
            .await?;
        Ok(updated > 0)
    }

    async fn record_message_status(
        &mut self,
        session_id: Uuid,
        message_id: &str,
        status: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let updated = self
            .tx
            .query(concat!(
                "UPDATE session_messages SET status = $3, status_at = $4, updated_at = $5 \
                 WHERE session_id = $1 AND message_id = $2 AND (status IS NULL OR ",
                status_rank!("status"),
                " < ",
                status_rank!("$3"),
                ")"
            ))
            .bind_uuid(session_id)
            .bind(message_id)
            .bind(status)
            .bind_time(at)
            .bind_time(OffsetDateTime::now_utc())
            .execute()
            .await?;
        if updated == 0 && !self.message_stored(session_id, message_id).await? {
            self.defer(session_id, message_id, Deferred::Status, None, Some(status), at).await?;
        }
        Ok(updated > 0)
    }

    async fn record_message_change(
        &mut self,
        tenant_id: Uuid,
        session_id: Uuid,
        change: &MessageChange,
    ) -> Result<bool, StoreError> {
        let now = OffsetDateTime::now_utc();
        match &change.kind {
            ChangeKind::Edited { text } => {
                let who = Author::of(change);
                let edited = self.apply_edit(session_id, &change.message_id, &who, text.as_deref(), change.at).await?;
                if !edited && !self.message_stored(session_id, &change.message_id).await? {
                    self.defer(session_id, &change.message_id, Deferred::Edit, Some(&who), text.as_deref(), change.at)
                        .await?;
                }
                Ok(edited)
            }
            ChangeKind::Revoked => {
                let who = Author::of(change);
                let deleted = self.apply_revoke(session_id, &change.message_id, &who, change.at).await?;
                if !deleted && !self.message_stored(session_id, &change.message_id).await? {
                    self.defer(session_id, &change.message_id, Deferred::Delete, Some(&who), None, change.at).await?;
                }
                Ok(deleted)
            }
            ChangeKind::Reaction { emoji } => {
                let emoji = emoji.as_deref().filter(|emoji| !emoji.is_empty());
                // A reaction may come before its message (history, offline queues): kept. Only
                // the actor's latest reaction counts; one removed stays, flagged, so an older
                // one arriving late cannot bring it back.
                let applied = self
                    .tx
                    .query(
                        "INSERT INTO session_message_reactions (id, tenant_id, session_id, chat_jid, message_id, \
                         actor_jid, from_me, emoji, reacted_at, is_removed, created_at, updated_at) \
                         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11 \
                         WHERE EXISTS (SELECT 1 FROM sessions WHERE id = $3 AND tenant_id = $2) \
                         ON CONFLICT (session_id, message_id, actor_jid) DO UPDATE SET emoji = excluded.emoji, \
                         reacted_at = excluded.reacted_at, is_removed = excluded.is_removed, \
                         from_me = excluded.from_me, updated_at = excluded.updated_at \
                         WHERE session_message_reactions.reacted_at IS NULL \
                         OR session_message_reactions.reacted_at <= excluded.reacted_at",
                    )
                    .bind_uuid(Uuid::now_v7())
                    .bind_uuid(tenant_id)
                    .bind_uuid(session_id)
                    .bind(change.chat.as_str())
                    .bind(change.message_id.as_str())
                    .bind(change.actor.as_str())
                    .bind(change.from_me)
                    .bind(emoji)
                    .bind_time(change.at)
                    .bind(emoji.is_none())
                    .bind_time(now)
                    .execute()
                    .await?;
                Ok(applied > 0)
            }
        }
    }

    async fn record_history(
        &mut self,
        tenant_id: Uuid,
        session_id: Uuid,
        piece: &HistoryPiece,
    ) -> Result<Option<u64>, StoreError> {
        let now = OffsetDateTime::now_utc();
        let exists = self
            .tx
            .query("SELECT 1 AS present FROM sessions WHERE id = $1 AND tenant_id = $2")
            .bind_uuid(session_id)
            .bind_uuid(tenant_id)
            .fetch_optional()
            .await?
            .is_some();
        if !exists {
            return Ok(None);
        }
        // One statement for the piece's messages: a phone's history is large.
        let rows: Vec<serde_json::Value> = piece
            .messages
            .iter()
            .map(|history| {
                let message = &history.message;
                let millis = crate::sql::to_millis(message.timestamp)?;
                let context = &message.context;
                Ok(json!({
                    "rowId": Uuid::now_v7().to_string(), "chat": message.chat, "id": message.message_id,
                    "fromMe": message.from_me, "sender": (!message.from_me).then_some(&message.sender),
                    "ts": millis, "text": message.text, "status": history.status,
                    "replyTo": context.reply_to, "replyFrom": context.reply_to_participant,
                    "mentions": (!context.mentions.is_empty()).then(|| json!(context.mentions).to_string()),
                    "forward": context.forwarding_score,
                    "raw": message.raw.as_ref().map(anna_domain::session::RawMessage::as_json),
                }))
            })
            .collect::<Result<_, StoreError>>()?;
        let inserted = if rows.is_empty() {
            0
        } else {
            self.tx
                .query(Sql::PerBackend {
                    sqlite: "INSERT INTO session_messages (id, tenant_id, session_id, chat_jid, message_id, from_me, \
                             sender_jid, timestamp, type, text, status, status_at, created_at, updated_at, \
                             reply_to_message_id, reply_to_participant, mentions, forwarding_score, raw) \
                             SELECT json_extract(m.value, '$.rowId'), $1, $2, json_extract(m.value, '$.chat'), \
                             json_extract(m.value, '$.id'), json_extract(m.value, '$.fromMe'), \
                             json_extract(m.value, '$.sender'), json_extract(m.value, '$.ts'), 'text', \
                             json_extract(m.value, '$.text'), json_extract(m.value, '$.status'), \
                             CASE WHEN json_extract(m.value, '$.status') IS NOT NULL \
                             THEN json_extract(m.value, '$.ts') END, $3, $3, json_extract(m.value, '$.replyTo'), \
                             json_extract(m.value, '$.replyFrom'), json_extract(m.value, '$.mentions'), \
                             json_extract(m.value, '$.forward'), json_extract(m.value, '$.raw') \
                             FROM json_each($4) AS m WHERE true \
                             ON CONFLICT (session_id, message_id) DO NOTHING",
                    postgres: "INSERT INTO session_messages (id, tenant_id, session_id, chat_jid, message_id, from_me, \
                               sender_jid, timestamp, type, text, status, status_at, created_at, updated_at, \
                               reply_to_message_id, reply_to_participant, mentions, forwarding_score, raw) \
                               SELECT (m->>'rowId')::uuid, $1, $2, m->>'chat', m->>'id', (m->>'fromMe')::boolean, \
                               m->>'sender', to_timestamp((m->>'ts')::bigint / 1000.0), 'text', m->>'text', \
                               m->>'status', CASE WHEN m->>'status' IS NOT NULL \
                               THEN to_timestamp((m->>'ts')::bigint / 1000.0) END, $3, $3, m->>'replyTo', \
                               m->>'replyFrom', m->>'mentions', (m->>'forward')::integer, \
                               NULLIF(m->'raw', 'null'::jsonb) \
                               FROM jsonb_array_elements($4) AS m \
                               ON CONFLICT (session_id, message_id) DO NOTHING",
                })
                .bind_uuid(tenant_id)
                .bind_uuid(session_id)
                .bind_time(now)
                .bind_json(&serde_json::Value::Array(rows))
                .execute()
                .await?
        };

        // Each chat once: its name and unread count from the phone, its latest message of the
        // piece as the last message (if newer than the stored one).
        let mut chats: Vec<(&str, Option<&str>, Option<u32>, Option<&anna_domain::session::ReceivedMessage>)> =
            piece.chats.iter().map(|chat| (chat.jid.as_str(), chat.name.as_deref(), chat.unread_count, None)).collect();
        for history in &piece.messages {
            let message = &history.message;
            let at = match chats.iter().position(|(jid, ..)| *jid == message.chat) {
                Some(at) => at,
                None => {
                    chats.push((message.chat.as_str(), None, None, None));
                    chats.len() - 1
                }
            };
            let latest = &mut chats[at].3;
            if latest
                .is_none_or(|known| (known.timestamp, &known.message_id) < (message.timestamp, &message.message_id))
            {
                *latest = Some(message);
            }
        }
        for (jid, name, unread, last) in chats {
            let last_text = last.map(|m| m.text.clone().unwrap_or_else(|| "[text]".into()));
            self.tx
                .query(concat!(
                    "INSERT INTO session_chats (id, tenant_id, session_id, chat_jid, chat_name, last_message_id, \
                     last_message_ts, last_message_text, last_message_type, unread_count, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, COALESCE($10, 0), $11, $11) \
                     ON CONFLICT (session_id, chat_jid) DO UPDATE SET \
                     chat_name = COALESCE(excluded.chat_name, session_chats.chat_name), \
                     unread_count = CASE WHEN $10 IS NULL THEN session_chats.unread_count ELSE excluded.unread_count END, \
                     last_message_id = CASE WHEN ",
                    newer_last_message!(),
                    " THEN excluded.last_message_id ELSE session_chats.last_message_id END, \
                     last_message_text = CASE WHEN ",
                    newer_last_message!(),
                    " THEN excluded.last_message_text ELSE session_chats.last_message_text END, \
                     last_message_type = CASE WHEN ",
                    newer_last_message!(),
                    " THEN excluded.last_message_type ELSE session_chats.last_message_type END, \
                     last_message_ts = CASE WHEN ",
                    newer_last_message!(),
                    " THEN excluded.last_message_ts ELSE session_chats.last_message_ts END, \
                     updated_at = excluded.updated_at"
                ))
                .bind_uuid(Uuid::now_v7())
                .bind_uuid(tenant_id)
                .bind_uuid(session_id)
                .bind(jid)
                .bind(name)
                .bind(last.map(|m| m.message_id.as_str()))
                .bind_opt_time(last.map(|m| m.timestamp))
                .bind(last_text.as_deref())
                .bind(last.map(|_| "text"))
                .bind(unread.map(i64::from))
                .bind_time(now)
                .execute()
                .await?;
        }

        let contacts: Vec<ContactSighting> = piece
            .contacts
            .iter()
            .map(|contact| ContactSighting {
                jid: contact.jid.clone(),
                lid: None,
                name: contact.name.clone(),
                notify: contact.push_name.clone(),
            })
            .collect();
        self.upsert_contacts(tenant_id, session_id, &contacts, now).await?;
        if inserted > 0 {
            let ids: Vec<String> = piece.messages.iter().map(|m| m.message.message_id.clone()).collect();
            self.apply_pending_changes(session_id, &ids).await?;
        }
        for reaction in &piece.reactions {
            self.record_message_change(tenant_id, session_id, reaction).await?;
        }
        let aliases: Vec<(String, String)> =
            piece.chats.iter().filter_map(|chat| Some((chat.jid.clone(), chat.alt.clone()?))).collect();
        if !aliases.is_empty() {
            crate::ChatAliasWrites::link_chat_aliases(self, tenant_id, session_id, &aliases).await?;
        }
        Ok(Some(inserted))
    }

    async fn settle_pending_changes(
        &mut self,
        limit: u32,
        expired_before: OffsetDateTime,
    ) -> Result<(u64, u64), StoreError> {
        let rows = self
            .tx
            .query(
                "SELECT DISTINCT p.session_id, p.message_id FROM session_message_pending p \
                 WHERE EXISTS (SELECT 1 FROM session_messages m \
                 WHERE m.session_id = p.session_id AND m.message_id = p.message_id) LIMIT $1",
            )
            .bind(i64::from(limit))
            .fetch_all()
            .await?;
        for row in &rows {
            let message_id: String = row.get("message_id")?;
            self.apply_deferred(row.uuid("session_id")?, &message_id).await?;
        }
        let forgotten = self
            .tx
            .query("DELETE FROM session_message_pending WHERE created_at < $1")
            .bind_time(expired_before)
            .execute()
            .await?;
        Ok((rows.len() as u64, forgotten))
    }

    async fn record_contacts(
        &mut self,
        tenant_id: Uuid,
        session_id: Uuid,
        contacts: &mut [ContactSighting],
    ) -> Result<(), StoreError> {
        contacts.sort_by(|a, b| a.jid.cmp(&b.jid));
        self.upsert_contacts(tenant_id, session_id, contacts, OffsetDateTime::now_utc()).await
    }

    async fn set_message_retention(&mut self, tenant_id: Uuid, days: Option<u32>) -> Result<(), StoreError> {
        let now = OffsetDateTime::now_utc();
        self.tx
            .query(
                "INSERT INTO tenant_settings (tenant_id, message_retention_days, created_at, updated_at) \
                 VALUES ($1, $2, $3, $3) ON CONFLICT (tenant_id) DO UPDATE SET \
                 message_retention_days = excluded.message_retention_days, updated_at = excluded.updated_at",
            )
            .bind_uuid(tenant_id)
            .bind(days.map(|days| i32::try_from(days).unwrap_or(i32::MAX)))
            .bind_time(now)
            .execute()
            .await?;
        Ok(())
    }

    async fn mark_chat_read(&mut self, session_id: Uuid, chat_jid: &str) -> Result<bool, StoreError> {
        let updated = self
            .tx
            .query("UPDATE session_chats SET unread_count = 0, updated_at = $3 WHERE session_id = $1 AND chat_jid = $2")
            .bind_uuid(session_id)
            .bind(chat_jid)
            .bind_time(OffsetDateTime::now_utc())
            .execute()
            .await?;
        Ok(updated > 0)
    }

    async fn delete_message_history(&mut self, session_id: Uuid) -> Result<u64, StoreError> {
        self.tx
            .query("DELETE FROM session_message_pending WHERE session_id = $1")
            .bind_uuid(session_id)
            .execute()
            .await?;
        self.tx.query("DELETE FROM session_contacts WHERE session_id = $1").bind_uuid(session_id).execute().await?;
        self.tx
            .query("DELETE FROM session_message_reactions WHERE session_id = $1")
            .bind_uuid(session_id)
            .execute()
            .await?;
        let messages =
            self.tx.query("DELETE FROM session_messages WHERE session_id = $1").bind_uuid(session_id).execute().await?;
        self.tx.query("DELETE FROM session_chats WHERE session_id = $1").bind_uuid(session_id).execute().await?;
        Ok(messages)
    }
}

/// Who changes a message, and in which chat: a message is changed only in its own chat, and
/// only by whom may change it.
struct Author<'a> {
    chat: &'a str,
    actor: &'a str,
    from_me: bool,
}

impl<'a> Author<'a> {
    fn of(change: &'a MessageChange) -> Self {
        Self { chat: &change.chat, actor: &change.actor, from_me: change.from_me }
    }
}

/// A change kept for a message not stored yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deferred {
    Edit,
    Delete,
    Status,
}

impl Deferred {
    fn as_str(self) -> &'static str {
        match self {
            Self::Edit => "edit",
            Self::Delete => "delete",
            Self::Status => "status",
        }
    }
}

impl SqlUnitOfWork {
    /// Creates or completes contacts (a name seen is kept until a new one is seen), in the
    /// given order; nothing for a session that no longer exists.
    async fn upsert_contacts(
        &mut self,
        tenant_id: Uuid,
        session_id: Uuid,
        contacts: &[ContactSighting],
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        for contact in contacts {
            self.tx
                .query(
                    "INSERT INTO session_contacts (id, tenant_id, session_id, contact_jid, contact_lid, phone_number, \
                     name, notify, created_at, updated_at) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $9 \
                     WHERE EXISTS (SELECT 1 FROM sessions WHERE id = $3) \
                     ON CONFLICT (session_id, contact_jid) DO UPDATE SET \
                     name = COALESCE(excluded.name, session_contacts.name), \
                     notify = COALESCE(excluded.notify, session_contacts.notify), \
                     contact_lid = COALESCE(excluded.contact_lid, session_contacts.contact_lid), \
                     phone_number = COALESCE(excluded.phone_number, session_contacts.phone_number), \
                     updated_at = excluded.updated_at",
                )
                .bind_uuid(Uuid::now_v7())
                .bind_uuid(tenant_id)
                .bind_uuid(session_id)
                .bind(contact.jid.as_str())
                .bind(contact.lid.as_deref())
                .bind(phone_of(&contact.jid))
                .bind(contact.name.as_deref())
                .bind(contact.notify.as_deref())
                .bind_time(now)
                .execute()
                .await?;
        }
        Ok(())
    }

    async fn message_stored(&mut self, session_id: Uuid, message_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .query("SELECT 1 AS present FROM session_messages WHERE session_id = $1 AND message_id = $2")
            .bind_uuid(session_id)
            .bind(message_id)
            .fetch_optional()
            .await?
            .is_some())
    }

    /// Sets a message's text by an edit, unless a later edit is stored. A deleted message
    /// takes it too: changes arrive out of order, and the edit happened before the deletion.
    async fn apply_edit(
        &mut self,
        session_id: Uuid,
        message_id: &str,
        who: &Author<'_>,
        text: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let now = OffsetDateTime::now_utc();
        // Only its sender edits a message: the account its own, a contact theirs.
        let edited = self
            .tx
            .query(
                "UPDATE session_messages SET text = $3, is_edited = true, edited_at = $4, updated_at = $5 \
                 WHERE session_id = $1 AND message_id = $2 AND (edited_at IS NULL OR edited_at <= $4) \
                 AND chat_jid = $6 AND (($7 AND from_me) OR (NOT $7 AND NOT from_me AND sender_jid = $8))",
            )
            .bind_uuid(session_id)
            .bind(message_id)
            .bind(text)
            .bind_time(at)
            .bind_time(now)
            .bind(who.chat)
            .bind(who.from_me)
            .bind(who.actor)
            .execute()
            .await?;
        if edited > 0 {
            // The chat list shows the new text when it is the chat's last message.
            self.tx
                .query(
                    "UPDATE session_chats SET last_message_text = COALESCE($3, '[text]'), updated_at = $4 \
                     WHERE session_id = $1 AND last_message_id = $2",
                )
                .bind_uuid(session_id)
                .bind(message_id)
                .bind(text)
                .bind_time(now)
                .execute()
                .await?;
        }
        Ok(edited > 0)
    }

    async fn apply_revoke(
        &mut self,
        session_id: Uuid,
        message_id: &str,
        who: &Author<'_>,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // Its sender deletes a message for everyone; in a group an admin may delete anyone's
        // (WhatsApp checks the admin).
        let deleted = self
            .tx
            .query(
                "UPDATE session_messages SET is_deleted = true, deleted_at = $3, updated_at = $4 \
                 WHERE session_id = $1 AND message_id = $2 AND NOT is_deleted AND chat_jid = $5 \
                 AND (($6 AND from_me) OR (NOT $6 AND NOT from_me AND sender_jid = $7) OR chat_jid LIKE '%@g.us')",
            )
            .bind_uuid(session_id)
            .bind(message_id)
            .bind_time(at)
            .bind_time(OffsetDateTime::now_utc())
            .bind(who.chat)
            .bind(who.from_me)
            .bind(who.actor)
            .execute()
            .await?;
        Ok(deleted > 0)
    }

    /// Keeps a change of a message not stored yet (the furthest status, the latest edit), for
    /// [`Self::apply_deferred`]. Nothing is kept for a session that no longer exists.
    async fn defer(
        &mut self,
        session_id: Uuid,
        message_id: &str,
        kind: Deferred,
        who: Option<&Author<'_>>,
        value: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.tx
            .query(concat!(
                "INSERT INTO session_message_pending (session_id, message_id, kind, value, at, created_at, \
                 chat_jid, actor_jid, from_me) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = $1) \
                 ON CONFLICT (session_id, message_id, kind) DO UPDATE SET value = excluded.value, at = excluded.at, \
                 chat_jid = excluded.chat_jid, actor_jid = excluded.actor_jid, from_me = excluded.from_me \
                 WHERE (excluded.kind = 'edit' AND excluded.at >= session_message_pending.at) \
                 OR (excluded.kind = 'status' AND ",
                status_rank!("excluded.value"),
                " > ",
                status_rank!("session_message_pending.value"),
                ")"
            ))
            .bind_uuid(session_id)
            .bind(message_id)
            .bind(kind.as_str())
            .bind(value)
            .bind_time(at)
            .bind_time(OffsetDateTime::now_utc())
            .bind(who.map(|who| who.chat))
            .bind(who.map(|who| who.actor))
            .bind(who.is_some_and(|who| who.from_me))
            .execute()
            .await?;
        Ok(())
    }

    /// Applies, then forgets, the changes kept for a message that is now stored.
    async fn apply_deferred(&mut self, session_id: Uuid, message_id: &str) -> Result<(), StoreError> {
        let rows = self
            .tx
            .query(
                "SELECT kind, value, at, chat_jid, actor_jid, from_me FROM session_message_pending \
                 WHERE session_id = $1 AND message_id = $2",
            )
            .bind_uuid(session_id)
            .bind(message_id)
            .fetch_all()
            .await?;
        if rows.is_empty() {
            return Ok(());
        }
        for row in &rows {
            let kind: String = row.get("kind")?;
            let value: Option<String> = row.get("value")?;
            let at = row.time("at")?;
            let (chat, actor): (Option<String>, Option<String>) = (row.get("chat_jid")?, row.get("actor_jid")?);
            let who = Author {
                chat: chat.as_deref().unwrap_or_default(),
                actor: actor.as_deref().unwrap_or_default(),
                from_me: row.get("from_me")?,
            };
            match kind.as_str() {
                "edit" => {
                    self.apply_edit(session_id, message_id, &who, value.as_deref(), at).await?;
                }
                "delete" => {
                    self.apply_revoke(session_id, message_id, &who, at).await?;
                }
                _ => {
                    if let Some(status) = value.as_deref() {
                        self.record_message_status(session_id, message_id, status, at).await?;
                    }
                }
            }
        }
        self.tx
            .query("DELETE FROM session_message_pending WHERE session_id = $1 AND message_id = $2")
            .bind_uuid(session_id)
            .bind(message_id)
            .execute()
            .await?;
        Ok(())
    }
}

/// The phone number of a person's JID (`+<digits>`), none for groups and LIDs.
fn phone_of(jid: &str) -> Option<String> {
    let (user, server) = jid.split_once('@')?;
    (server == "s.whatsapp.net" && !user.is_empty() && user.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("+{user}"))
}

fn contact_from_row(row: &Row) -> Result<ContactSummary, StoreError> {
    Ok(ContactSummary {
        contact_jid: row.get("contact_jid")?,
        contact_lid: row.get("contact_lid")?,
        phone_number: row.get("phone_number")?,
        name: row.get("name")?,
        notify: row.get("notify")?,
        verified_name: row.get("verified_name")?,
        img_url: row.get("img_url")?,
        status: row.get("status")?,
    })
}

fn message_from_row(row: &Row) -> Result<StoredMessage, StoreError> {
    Ok(StoredMessage {
        tenant_id: row.uuid("tenant_id")?,
        session_id: row.uuid("session_id")?,
        chat_jid: row.get("chat_jid")?,
        message_id: row.get("message_id")?,
        from_me: row.get("from_me")?,
        sender_jid: row.get("sender_jid")?,
        timestamp: row.time("shown_at")?,
        kind: row.get::<Option<String>>("type")?.unwrap_or_else(|| "text".into()),
        text: row.get("text")?,
        status: row.get("status")?,
        status_at: row.opt_time("status_at")?,
        edited_at: row.opt_time("edited_at")?,
        deleted_at: row.opt_time("deleted_at")?,
        context: MessageContext {
            reply_to: row.get("reply_to_message_id")?,
            reply_to_participant: row.get("reply_to_participant")?,
            mentions: row
                .get::<Option<String>>("mentions")?
                .and_then(|json| serde_json::from_str(&json).ok())
                .unwrap_or_default(),
            forwarding_score: row.get::<Option<i32>>("forwarding_score")?.and_then(|score| u32::try_from(score).ok()),
        },
        raw: row.opt_json("raw")?,
    })
}

fn chat_from_row(row: &Row) -> Result<ChatSummary, StoreError> {
    let unread: i32 = row.get("unread_count")?;
    Ok(ChatSummary {
        chat_jid: row.get("chat_jid")?,
        chat_name: row.get("chat_name")?,
        last_message_id: row.get("last_message_id")?,
        last_message_ts: row.opt_time("last_message_ts")?,
        last_message_text: row.get("last_message_text")?,
        last_message_type: row.get("last_message_type")?,
        unread_count: u64::try_from(unread).unwrap_or(0),
    })
}
