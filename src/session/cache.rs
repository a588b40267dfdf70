//! The sponsorship path's copies of grants it read from Redis, so that a session key's next
//! operations skip the grant's round trip (a `GET` per sponsorship otherwise).
//!
//! A copy may be stale in one way only, and that way costs no money:
//! - A grant never changes once written (its id is taken with `SET NX`) except by revocation,
//!   and its key is only ever gone after the grant is [`forgotten`](super::forgotten), which a
//!   copy checks on every read (a re-created id is thus never served from an old copy).
//! - A revocation is written first where the reservation script reads it (the ledger's session
//!   state, `Sponsor::revoke_session`), and every request under a grant runs that script, stubs
//!   and explanations included: a revoked session is refused there whatever the copy says.
//!   A copy only changes which step refuses it. This replica forgets its copy when it revokes;
//!   another replica's copy lives at most [`MAX_AGE`].
//!
//! Bounded: at most [`CAPACITY`] grants, in two generations (a grant read again moves to the
//! newer; when the newer is full the older is dropped), each copy at most [`MAX_AGE`] old.
//! Unknown ids are not remembered: they cost their round trip every time, and cannot fill it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use alloy::primitives::B256;

use super::SessionGrant;

/// Most grants kept (both generations together).
pub const CAPACITY: usize = 65_536;

/// Longest a copy is served: how long another replica's revocation may go unseen before the
/// ledger step (which sees it at once).
pub const MAX_AGE: Duration = Duration::from_secs(30);

/// Copies of grants by id (see the module doc).
#[derive(Debug)]
pub struct GrantCache {
    generations: Mutex<Generations>,
    /// Grants per generation.
    per_generation: usize,
}

#[derive(Debug, Default)]
struct Generations {
    newer: HashMap<B256, Kept>,
    older: HashMap<B256, Kept>,
}

#[derive(Debug, Clone)]
struct Kept {
    grant: Arc<SessionGrant>,
    read_at: Instant,
}

impl Default for GrantCache {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl GrantCache {
    /// A cache of at most `capacity` grants (at least two).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            generations: Mutex::default(),
            per_generation: (capacity / 2).max(1),
        }
    }

    /// The copy of grant `id` read at most [`MAX_AGE`] before `now`.
    pub fn get(&self, id: B256, now: Instant) -> Option<Arc<SessionGrant>> {
        let mut g = self.lock();
        let fresh = |c: &Kept| now.saturating_duration_since(c.read_at) <= MAX_AGE;
        if let Some(c) = g.newer.get(&id) {
            if fresh(c) {
                return Some(c.grant.clone());
            }
            g.newer.remove(&id);
            return None;
        }
        let c = g.older.remove(&id).filter(fresh)?;
        let grant = c.grant.clone();
        self.put(&mut g, id, c);
        Some(grant)
    }

    /// Keep a copy of `grant`, read from the store at `read_at`.
    pub fn insert(&self, grant: Arc<SessionGrant>, read_at: Instant) {
        let id = grant.session_id;
        let mut g = self.lock();
        g.older.remove(&id);
        self.put(&mut g, id, Kept { grant, read_at });
    }

    /// Drop the copy of grant `id` (this replica revoked it).
    pub fn forget(&self, id: B256) {
        let mut g = self.lock();
        g.newer.remove(&id);
        g.older.remove(&id);
    }

    /// Copies kept (both generations).
    pub fn len(&self) -> usize {
        let g = self.lock();
        g.newer.len() + g.older.len()
    }

    /// Whether no copy is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn put(&self, g: &mut Generations, id: B256, copy: Kept) {
        if g.newer.len() >= self.per_generation && !g.newer.contains_key(&id) {
            g.older = std::mem::take(&mut g.newer);
        }
        g.newer.insert(id, copy);
    }

    /// A copy is only ever replaced whole, so a panic elsewhere while it was locked leaves
    /// nothing half-written.
    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionStatus;

    fn grant(n: u8) -> Arc<SessionGrant> {
        Arc::new(SessionGrant {
            session_id: B256::repeat_byte(n),
            account: Default::default(),
            session_key: Default::default(),
            chain_id: 1,
            policy: "p".into(),
            valid_after: 0,
            valid_until: u64::MAX,
            status: SessionStatus::Active,
            permissions: None,
            budget: None,
            created_at: 0,
        })
    }

    #[test]
    fn a_copy_is_served_until_it_is_too_old() {
        let cache = GrantCache::default();
        let t0 = Instant::now();
        cache.insert(grant(1), t0);
        assert_eq!(
            cache
                .get(B256::repeat_byte(1), t0 + MAX_AGE)
                .map(|g| g.session_id),
            Some(B256::repeat_byte(1))
        );
        assert!(cache.get(B256::repeat_byte(2), t0).is_none(), "never read");
        assert!(
            cache
                .get(
                    B256::repeat_byte(1),
                    t0 + MAX_AGE + Duration::from_millis(1)
                )
                .is_none()
        );
        assert!(cache.is_empty(), "a stale copy is dropped when met");
    }

    #[test]
    fn it_holds_at_most_its_capacity_and_keeps_what_is_read() {
        let cache = GrantCache::with_capacity(4);
        let t0 = Instant::now();
        for n in 0..100 {
            cache.insert(grant(n), t0);
            // Grant 0 is read between inserts: it stays however many others pass through.
            assert!(cache.get(B256::repeat_byte(0), t0).is_some(), "after {n}");
            assert!(cache.len() <= 4, "{} copies after {n}", cache.len());
        }
        assert!(cache.get(B256::repeat_byte(99), t0).is_some());
        assert!(cache.get(B256::repeat_byte(50), t0).is_none(), "evicted");
    }

    #[test]
    fn a_revoked_grant_is_forgotten() {
        let cache = GrantCache::default();
        let t0 = Instant::now();
        cache.insert(grant(1), t0);
        cache.forget(B256::repeat_byte(1));
        assert!(cache.get(B256::repeat_byte(1), t0).is_none());
    }
}
