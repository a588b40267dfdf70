//! The sponsorship path's copies of grants it read from Redis, so that a session key's next
//! operations skip the grant's round trip (a `GET` per sponsorship otherwise).
//!
//! A copy never decides whether money is spent under a grant:
//! - A grant never changes once written (its id is taken with `SET NX`) except by revocation,
//!   and its key expires only after the grant is [`forgotten`](super::forgotten), which a copy
//!   is checked for on every read (window and status checks also run on every request).
//! - A revocation is written first where the reservation script reads it (the ledger's session
//!   state, `Sponsor::revoke_session`), and every request under a grant runs that script,
//!   stubs and explanations included, before anything else it does (even handing back an
//!   answer given before): a revoked session is refused there whatever the copy says.
//!
//! What a copy older than a revocation does change, for at most [`MAX_AGE`] (the replica that
//! revoked forgets its copy once the status is written; a read in flight then may leave one):
//! the request passes the grant's own checks, counts against its rate limits and is signed (the
//! signature is dropped when the ledger refuses) before `session_revoked` comes back, and an
//! explanation shows the grant's checks as passed. Two things the ledger does not see also wait up to [`MAX_AGE`]: a grant
//! key deleted by hand (revoke instead: docs/operations.md), and, on a Redis Cluster, a
//! revocation whose ledger write a failover lost while the grant's own write survived.
//!
//! Bounded: at most [`CAPACITY`] grants, in two generations (a grant read again moves to the
//! newer one, keeping its age; when the newer is full the older is dropped). Unknown ids are not
//! remembered: they cost their round trip every time, and cannot fill it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use alloy::primitives::B256;

use super::SessionGrant;

/// Most grants kept (both generations together).
pub(crate) const CAPACITY: usize = 65_536;

/// Longest a copy is served (see the module doc for what a stale one changes).
pub(crate) const MAX_AGE: Duration = Duration::from_secs(10);

/// Copies of grants by id (see the module doc).
#[derive(Debug)]
pub(crate) struct GrantCache {
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
    /// A cache of at most `capacity` grants (rounded down to an even number, at least 2).
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            generations: Mutex::default(),
            per_generation: (capacity / 2).max(1),
        }
    }

    /// The copy of grant `id` read at most [`MAX_AGE`] before `now`.
    pub(crate) fn get(&self, id: B256, now: Instant) -> Option<Arc<SessionGrant>> {
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
        let dropped = self.put(&mut g, id, c);
        drop(g);
        drop(dropped);
        Some(grant)
    }

    /// Keep a copy of grant `id`, read from the store at `read_at`.
    pub(crate) fn insert(&self, id: B256, grant: Arc<SessionGrant>, read_at: Instant) {
        let mut g = self.lock();
        g.older.remove(&id);
        let dropped = self.put(&mut g, id, Kept { grant, read_at });
        drop(g);
        drop(dropped);
    }

    /// Drop the copy of grant `id` (this replica revokes or creates it).
    pub(crate) fn forget(&self, id: B256) {
        let mut g = self.lock();
        g.newer.remove(&id);
        g.older.remove(&id);
    }

    /// Copies kept (both generations).
    #[cfg(test)]
    fn len(&self) -> usize {
        let g = self.lock();
        g.newer.len() + g.older.len()
    }

    /// Whether no copy is kept.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Put `copy` in the newer generation; when that is full it becomes the older one, and the
    /// older one is returned, to be freed once the lock is released (tens of thousands of
    /// grants: no request waits on that).
    #[must_use]
    fn put(&self, g: &mut Generations, id: B256, copy: Kept) -> Option<HashMap<B256, Kept>> {
        let mut dropped = None;
        if g.newer.len() >= self.per_generation && !g.newer.contains_key(&id) {
            let newer = std::mem::take(&mut g.newer);
            dropped = Some(std::mem::replace(&mut g.older, newer));
        }
        g.newer.insert(id, copy);
        dropped
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
        cache.insert(B256::repeat_byte(1), grant(1), t0);
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
            cache.insert(B256::repeat_byte(n), grant(n), t0);
            // Grant 0 is read between inserts: it stays however many others pass through.
            assert!(cache.get(B256::repeat_byte(0), t0).is_some(), "after {n}");
            assert!(cache.len() <= 4, "{} copies after {n}", cache.len());
        }
        assert!(cache.get(B256::repeat_byte(99), t0).is_some());
        assert!(cache.get(B256::repeat_byte(50), t0).is_none(), "evicted");
    }

    #[test]
    fn a_copy_read_often_still_ages() {
        let cache = GrantCache::with_capacity(4);
        let t0 = Instant::now();
        let id = B256::repeat_byte(1);
        cache.insert(id, grant(1), t0);
        for (n, tenth) in (2u8..=9).zip(0u32..) {
            // Others pass through; the copy moves between generations as it is read.
            cache.insert(B256::repeat_byte(n), grant(n), t0);
            assert!(
                cache.get(id, t0 + MAX_AGE / 10 * tenth).is_some(),
                "read {n}"
            );
        }
        assert!(
            cache
                .get(id, t0 + MAX_AGE + Duration::from_millis(1))
                .is_none(),
            "its age counts from the store read, not from the last hit"
        );
    }

    #[test]
    fn a_forgotten_copy_is_gone_from_either_generation() {
        let cache = GrantCache::with_capacity(4);
        let t0 = Instant::now();
        for n in 1..=3 {
            cache.insert(B256::repeat_byte(n), grant(n), t0);
        }
        // 1 and 2 are in the older generation now, 3 in the newer.
        cache.forget(B256::repeat_byte(1));
        cache.forget(B256::repeat_byte(3));
        assert!(cache.get(B256::repeat_byte(1), t0).is_none());
        assert!(cache.get(B256::repeat_byte(3), t0).is_none());
        assert!(cache.get(B256::repeat_byte(2), t0).is_some());
    }
}
