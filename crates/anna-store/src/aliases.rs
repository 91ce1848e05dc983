//! Chat aliases (`session_chat_aliases`, the predecessor's table): WhatsApp addresses a
//! one-to-one chat by the contact's phone JID or by its LID, so one chat can arrive under two
//! addresses. Each address is an alias of a chat key; aliases with one key are one chat, which
//! the chat routes list, page and send to as one.
//!
//! The key is the chat's preferred address (a phone or group JID rather than a LID), never a
//! random one, so two units of work linking the same pair at once write the same rows.

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::StoreError;
use crate::store::{SqlStore, SqlUnitOfWork};

/// How an address is kind of address: `jid` (phone, group, broadcast), `lid`, or `waid`
/// (anything else) — the predecessor's alias types.
pub fn alias_type(address: &str) -> &'static str {
    match address.rsplit_once('@').map(|(_, server)| server) {
        Some("s.whatsapp.net" | "g.us" | "broadcast") => "jid",
        Some("lid") => "lid",
        _ => "waid",
    }
}

/// Which of a chat's addresses names it: a phone or group JID before a LID, then the smaller.
pub fn preferred<'a>(addresses: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    addresses.into_iter().min_by_key(|address| (alias_type(address) != "jid", alias_type(address) != "lid", *address))
}

#[async_trait]
pub trait ChatAliasStore: Send + Sync {
    /// Every address of the chat `address` names, itself included, the preferred first.
    async fn chat_addresses(&self, session_id: Uuid, address: &str) -> Result<Vec<String>, StoreError>;

    /// The session's aliases: (alias, chat key).
    async fn list_chat_aliases(&self, session_id: Uuid) -> Result<Vec<(String, String)>, StoreError>;
}

#[async_trait]
pub trait ChatAliasWrites: Send {
    /// Records that each pair's two addresses name one chat (merging the chats they named
    /// before). Nothing is written for a session that no longer exists.
    async fn link_chat_aliases(
        &mut self,
        tenant_id: Uuid,
        session_id: Uuid,
        pairs: &[(String, String)],
    ) -> Result<(), StoreError>;
}

#[async_trait]
impl ChatAliasStore for SqlStore {
    async fn chat_addresses(&self, session_id: Uuid, address: &str) -> Result<Vec<String>, StoreError> {
        let rows = self
            .pool
            .query(
                "SELECT alias FROM session_chat_aliases WHERE session_id = $1 AND chat_key = \
                 (SELECT chat_key FROM session_chat_aliases WHERE session_id = $1 AND alias = $2)",
            )
            .bind_uuid(session_id)
            .bind(address)
            .fetch_all()
            .await?;
        let mut addresses: Vec<String> = rows.iter().map(|row| row.get("alias")).collect::<Result<_, _>>()?;
        if !addresses.iter().any(|known| known == address) {
            addresses.push(address.to_owned());
        }
        let first = preferred(addresses.iter().map(String::as_str)).map(str::to_owned);
        addresses.sort_by_key(|known| (Some(known) != first.as_ref(), known.clone()));
        Ok(addresses)
    }

    async fn list_chat_aliases(&self, session_id: Uuid) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self
            .pool
            .query("SELECT alias, chat_key FROM session_chat_aliases WHERE session_id = $1 ORDER BY alias")
            .bind_uuid(session_id)
            .fetch_all()
            .await?;
        rows.iter().map(|row| Ok((row.get("alias")?, row.get("chat_key")?))).collect()
    }
}

#[async_trait]
impl ChatAliasWrites for SqlUnitOfWork {
    async fn link_chat_aliases(
        &mut self,
        tenant_id: Uuid,
        session_id: Uuid,
        pairs: &[(String, String)],
    ) -> Result<(), StoreError> {
        let now = OffsetDateTime::now_utc();
        for (a, b) in pairs.iter().filter(|(a, b)| a != b && !a.is_empty() && !b.is_empty()) {
            let Some(first) = preferred([a.as_str(), b.as_str()]) else { continue };
            let other = if first == a { b } else { a };
            // The chat keeps the key its preferred address has; the other address's chat joins it.
            let key = self.chat_key(session_id, first).await?.unwrap_or_else(|| first.to_owned());
            let joining = self.chat_key(session_id, other).await?;
            for address in [first, other.as_str()] {
                self.tx
                    .query(
                        "INSERT INTO session_chat_aliases (id, tenant_id, session_id, chat_key, alias, alias_type, \
                         created_at, updated_at) SELECT $1, $2, $3, $4, $5, $6, $7, $7 \
                         WHERE EXISTS (SELECT 1 FROM sessions WHERE id = $3) \
                         ON CONFLICT (session_id, alias) DO UPDATE SET chat_key = excluded.chat_key, \
                         updated_at = excluded.updated_at",
                    )
                    .bind_uuid(Uuid::now_v7())
                    .bind_uuid(tenant_id)
                    .bind_uuid(session_id)
                    .bind(key.as_str())
                    .bind(address)
                    .bind(alias_type(address))
                    .bind_time(now)
                    .execute()
                    .await?;
            }
            if let Some(joining) = joining.filter(|joining| *joining != key) {
                self.tx
                    .query(
                        "UPDATE session_chat_aliases SET chat_key = $3, updated_at = $4 \
                         WHERE session_id = $1 AND chat_key = $2",
                    )
                    .bind_uuid(session_id)
                    .bind(joining.as_str())
                    .bind(key.as_str())
                    .bind_time(now)
                    .execute()
                    .await?;
            }
        }
        Ok(())
    }
}

impl SqlUnitOfWork {
    async fn chat_key(&mut self, session_id: Uuid, address: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .tx
            .query("SELECT chat_key FROM session_chat_aliases WHERE session_id = $1 AND alias = $2")
            .bind_uuid(session_id)
            .bind(address)
            .fetch_optional()
            .await?;
        row.map(|row| row.get("chat_key")).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_and_group_addresses_are_preferred_to_lids() {
        assert_eq!(
            preferred(["200015550100123@lid", "15550100123@s.whatsapp.net"]),
            Some("15550100123@s.whatsapp.net")
        );
        assert_eq!(preferred(["b@lid", "a@lid"]), Some("a@lid"));
        assert_eq!(preferred(["x@other", "b@lid"]), Some("b@lid"));
        assert_eq!((alias_type("1@g.us"), alias_type("1@lid"), alias_type("1@newsletter")), ("jid", "lid", "waid"));
    }
}
