//! Users recently loaded to authenticate requests (`AUTH_USER_CACHE_*`).
//!
//! Every authenticated request needs its user: to check that the access token's generation is
//! still accepted (a logout everywhere or a password reset voids older tokens) and to answer
//! `GET /users/me`. Asking the database each time costs a round trip per request, more than the
//! rest of the request's work. A user loaded within the last `ttl` is taken from here instead.
//!
//! A change this process makes to a user (login, logout everywhere, password reset,
//! verification) forgets it at once, and so does every read that started before the change:
//! each user id falls in one of [`STRIPES`] counters, bumped by every change, and an entry is
//! valid only while its counter still has the value it had before the read that loaded it.
//! A change made by another API process is seen after at most `ttl` (a voided access token is
//! refused at most that much later there). A `ttl` of zero asks the database every time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anna_domain::User;
use uuid::Uuid;

/// Counters of changes, each shared by the user ids that fall in it (a change forgets the
/// others of its stripe too: many stripes keep that rare).
const STRIPES: usize = 1024;

pub(crate) struct UserCache {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<Uuid, Cached>>,
    changes: [AtomicU64; STRIPES],
}

struct Cached {
    user: User,
    loaded_at: Instant,
    /// The user's change counter before the read that loaded it.
    changes: u64,
}

/// A read about to load a user: what its change counter was before, and when it began (the
/// entry's age counts from then, so a slow read does not stretch the TTL).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadTicket(u64, Instant);

impl UserCache {
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        Self { ttl, capacity, entries: Mutex::new(HashMap::new()), changes: std::array::from_fn(|_| AtomicU64::new(0)) }
    }

    fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.capacity > 0
    }

    fn counter(&self, id: Uuid) -> &AtomicU64 {
        let stripe = usize::try_from(id.as_u128() % STRIPES as u128).unwrap_or(0);
        &self.changes[stripe]
    }

    /// The user, if loaded within `ttl` and not changed since.
    pub(crate) fn get(&self, id: Uuid) -> Option<User> {
        if !self.enabled() {
            return None;
        }
        let changes = self.counter(id).load(Ordering::Acquire);
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(&id)
            .filter(|cached| cached.changes == changes && cached.loaded_at.elapsed() < self.ttl)
            .map(|cached| cached.user.clone())
    }

    /// Taken before reading a user from the database, handed to [`Self::put`] with what was
    /// read.
    pub(crate) fn ticket(&self, id: Uuid) -> ReadTicket {
        ReadTicket(self.counter(id).load(Ordering::Acquire), Instant::now())
    }

    /// Keeps a user read from the database, unless it changed since the read began. When full,
    /// expired entries go first; if that frees less than a quarter, all go (one scan per
    /// quarter of inserts at most).
    pub(crate) fn put(&self, user: &User, ticket: ReadTicket) {
        if !self.enabled() || self.counter(user.id).load(Ordering::Acquire) != ticket.0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.capacity && !entries.contains_key(&user.id) {
            entries.retain(|_, cached| cached.loaded_at.elapsed() < self.ttl);
            if entries.len() >= self.capacity - self.capacity / 4 {
                entries.clear();
            }
        }
        entries.insert(user.id, Cached { user: user.clone(), loaded_at: ticket.1, changes: ticket.0 });
    }

    /// Forgets the user when dropped: held across the commit of a change to it, so the user is
    /// forgotten whatever becomes of the commit (done, failed, or its request given up).
    pub(crate) fn forget_on_drop(&self, id: Uuid) -> ForgetOnDrop<'_> {
        ForgetOnDrop { cache: self, id }
    }

    /// The user changed (committed): what was loaded before no longer holds.
    pub(crate) fn forget(&self, id: Uuid) {
        self.counter(id).fetch_add(1, Ordering::AcqRel);
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
    }
}

pub(crate) struct ForgetOnDrop<'a> {
    cache: &'a UserCache,
    id: Uuid,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.cache.forget(self.id);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use anna_domain::{Email, UserName};
    use time::OffsetDateTime;

    use super::*;

    fn user() -> User {
        let policy = anna_domain::user::SecretPolicy {
            verification_ttl: time::Duration::hours(1),
            password_reset_ttl: time::Duration::hours(1),
            max_attempts: 5,
        };
        let secrets = anna_domain::secrets::SecretHasher::from_server_secret(b"test");
        let sealer = anna_domain::secrets::Sealer::from_server_secret(b"test");
        let name = UserName::parse("Ada").expect("name");
        let email = Email::parse("ada@example.com").expect("email");
        User::register(name, email, "hash".into(), OffsetDateTime::now_utc(), &policy, &secrets, &sealer).0
    }

    #[test]
    fn a_user_read_is_kept_until_it_changes_or_expires() {
        let cache = UserCache::new(Duration::from_secs(60), 10);
        let ada = user();
        assert!(cache.get(ada.id).is_none());
        let ticket = cache.ticket(ada.id);
        cache.put(&ada, ticket);
        assert_eq!(cache.get(ada.id).map(|u| u.id), Some(ada.id));
        cache.forget(ada.id);
        assert!(cache.get(ada.id).is_none(), "a change forgets it");

        let expired = UserCache::new(Duration::from_nanos(1), 10);
        expired.put(&ada, expired.ticket(ada.id));
        std::thread::sleep(Duration::from_millis(2));
        assert!(expired.get(ada.id).is_none(), "older than the ttl");
    }

    #[test]
    fn a_read_that_began_before_a_change_is_not_kept() {
        let cache = UserCache::new(Duration::from_secs(60), 10);
        let ada = user();
        // The read starts, the user changes and the change commits, then the read returns
        // what it saw before: it must not be served afterwards.
        let ticket = cache.ticket(ada.id);
        cache.forget(ada.id);
        cache.put(&ada, ticket);
        assert!(cache.get(ada.id).is_none());
        cache.put(&ada, cache.ticket(ada.id));
        assert!(cache.get(ada.id).is_some(), "a read after the change is kept");
    }

    #[test]
    fn a_change_forgets_when_its_guard_goes() {
        let cache = UserCache::new(Duration::from_secs(60), 10);
        let ada = user();
        cache.put(&ada, cache.ticket(ada.id));
        {
            let _committing = cache.forget_on_drop(ada.id);
            assert!(cache.get(ada.id).is_some(), "not before the commit is done");
        }
        assert!(cache.get(ada.id).is_none());
    }

    #[test]
    fn bounded_and_off_when_asked() {
        let cache = UserCache::new(Duration::from_secs(60), 2);
        let users: Vec<User> = (0..5).map(|_| user()).collect();
        for user in &users {
            cache.put(user, cache.ticket(user.id));
        }
        assert!(cache.entries.lock().unwrap().len() <= 2);
        assert!(cache.get(users[4].id).is_some(), "the newest is kept");
        let off = UserCache::new(Duration::ZERO, 10);
        off.put(&users[0], off.ticket(users[0].id));
        assert!(off.get(users[0].id).is_none());
    }
}
