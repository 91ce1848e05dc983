//! Chat aliases (`session_chat_aliases`, the predecessor's table): WhatsApp addresses a
//! one-to-one chat by the contact's phone JID or by its LID, so one chat can arrive under two
//! addresses. Each address is an alias of a chat key; aliases with one key are one chat, which
//! the chat routes list, page and send to as one.
//!
//! Only a phone JID and a LID make a pair, and the key is the phone JID, never a random one:
//! two units of work linking the same pair at once write the same rows, and a phone number has
//! one LID at a time (a recycled number's new owner does not inherit the former owner's chat).

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
    /// Records that each pair's phone JID and LID name one chat (pairs of anything else are
    /// ignored); a LID the phone JID had before is detached. Rows already right are not
    /// written. Nothing is written for a session that no longer exists.
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
        // Only a phone JID with a LID is a pair; sorted and once each, so units of work linking
        // the same pairs lock their rows in the same order.
        let mut links: Vec<(&str, &str)> = pairs.iter().filter_map(|(a, b)| phone_and_lid(a, b)).collect();
        links.sort_unstable();
        links.dedup();
        for (phone, lid) in links {
            let (phone_key, lid_key) = (self.chat_key(session_id, phone).await?, self.chat_key(session_id, lid).await?);
            if phone_key.as_deref() == Some(phone) && lid_key.as_deref() == Some(phone) {
                continue;
            }
            // A number has one LID at a time: a LID it had before (a recycled number's former
            // owner) becomes a chat of its own again.
            self.tx
                .query(
                    "UPDATE session_chat_aliases SET chat_key = alias, updated_at = $4 \
                     WHERE session_id = $1 AND chat_key = $2 AND alias_type = 'lid' AND alias <> $3",
                )
                .bind_uuid(session_id)
                .bind(phone)
                .bind(lid)
                .bind_time(now)
                .execute()
                .await?;
            for address in [phone, lid] {
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
                    .bind(phone)
                    .bind(address)
                    .bind(alias_type(address))
                    .bind_time(now)
                    .execute()
                    .await?;
            }
        }
        Ok(())
    }
}

/// `(phone JID, LID)` when the two addresses are one of each.
fn phone_and_lid<'a>(a: &'a str, b: &'a str) -> Option<(&'a str, &'a str)> {
    let is_phone = |address: &str| address.ends_with("@s.whatsapp.net") && address.len() > "@s.whatsapp.net".len();
    let is_lid = |address: &str| address.ends_with("@lid") && address.len() > "@lid".len();
    match (is_phone(a), is_lid(b), is_phone(b), is_lid(a)) {
        (true, true, _, _) => Some((a, b)),
        (_, _, true, true) => Some((b, a)),
        _ => None,
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
        assert_eq!(phone_and_lid("2@lid", "1@s.whatsapp.net"), Some(("1@s.whatsapp.net", "2@lid")));
        assert_eq!(phone_and_lid("1@s.whatsapp.net", "2@s.whatsapp.net"), None, "two numbers are two people");
        assert_eq!(phone_and_lid("1@g.us", "2@lid"), None);
        assert_eq!(phone_and_lid("@s.whatsapp.net", "2@lid"), None);
    }
}
