//! The sponsorship path's copies of grants it read from Redis, or that this replica created
//! (kept as a read at the moment of its write would decode them), so that a session key's
//! next operations skip the grant's round trip (a `GET` per sponsorship otherwise).
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
//! What a copy older than a revocation does change, until this replica drops it (the replica
//! that revoked drops its own once the status is written; a read in flight then may leave one):
//! the request passes the grant's own checks, counts against its rate limits and is signed (the
//! signature is dropped when the ledger refuses) before `session_revoked` comes back, and an
//! explanation shows the grant's checks as passed. Two things the ledger does not see also wait
//! that long (up to [`MAX_AGE_FOLLOWED`]): a grant key deleted by hand (revoke its id anyway,
//! which writes the feed below: docs/operations.md), and, on a Redis Cluster, a revocation whose
//! ledger write and feed entry a failover lost while the grant's own write survived. The same
//! holds for a copy of an earlier grant of the id once another is created under it (its key
//! deleted by hand, or lost in a failover): the ledger reads a revocation where the revoked
//! grant's policy and end day place it, which the copy's may not, so a revocation of the new
//! grant reaches a replica holding the old copy through the feed only.
//!
//! How long a copy is served (at most; a revocation this replica sees, or eviction, drops it
//! sooner):
//! - [`MAX_AGE`] (10 s) after its read, whatever else happens.
//! - Up to [`MAX_AGE_FOLLOWED`] (5 min) while this replica follows the revocation feed (every
//!   revocation is written to a stream that each replica reads every `--policy-poll`,
//!   `RedisSessions::follow_revocations`, dropping the copies it names): only while a read of
//!   the feed that began within the last [`MAX_AGE`] succeeded, in an unbroken run of such
//!   reads that began before the copy's read (a revocation after the copy was read is then
//!   after the feed's place), and only if no revocation was seen between the copy's read and
//!   its keeping (a revocation that overtook the read in flight). So a revocation reaches every
//!   copy within a read of the feed (one `--policy-poll`: 2 s by default), or the copy falls back to
//!   [`MAX_AGE`]: the feed not read (Redis unreachable, a poll slower than [`MAX_AGE`]), lost
//!   (emptied, trimmed unread, or another Redis answering after a failover or restart: `follow.lua` counts it and names the Redis) or given more
//!   revocations at once than it keeps copies. A `--policy-poll` above [`MAX_AGE`] keeps every
//!   copy at [`MAX_AGE`]. One reader at a time (`RedisSessions` holds a lock for each read).
//!
//! Bounded: at most `--session-copies` grants ([`CAPACITY`] by default), and about 4 KiB a
//! copy of them ([`CAPACITY_BYTES`] at least; [`weight`] leaves out each entry's map and
//! bookkeeping, a hundred bytes or so), in two generations (a grant read again moves to the
//! newer one, keeping its age; when the newer is full, by count or by bytes, the whole older
//! one is dropped). A grant's bytes are bounded when it is made (`session::grant`: 64 rules,
//! 256 functions, 8 KiB of signatures), but the largest take tens of times a usual one's.
//! Unknown ids are not remembered: they cost their round trip every time, and cannot fill it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use alloy::primitives::B256;

use super::SessionGrant;

/// Most grants kept (both generations together) by default (`--session-copies`).
pub(crate) const CAPACITY: usize = 65_536;

/// About the most bytes of grants kept (both generations together; [`weight`]): 65,536 usual
/// grants (a few hundred bytes each) fit many times over, and about 12,000 of the largest a
/// grant can be (about 21 KiB each: `tests::the_largest_grant_weighs_about_21_kib`).
pub(crate) const CAPACITY_BYTES: usize = 256 << 20;

/// Longest a copy is served when this replica does not follow the revocation feed (see the
/// module doc for what a stale one changes).
pub(crate) const MAX_AGE: Duration = Duration::from_secs(10);

/// Longest a copy is served while this replica follows the revocation feed (module doc).
pub(crate) const MAX_AGE_FOLLOWED: Duration = Duration::from_secs(300);

/// Copies of grants by id (see the module doc).
#[derive(Debug)]
pub(crate) struct GrantCache {
    generations: Mutex<Generations>,
    /// Grants per generation.
    per_generation: usize,
    /// Bytes of grants per generation ([`weight`]).
    bytes_per_generation: usize,
}

#[derive(Debug, Default)]
struct Generations {
    newer: HashMap<B256, Kept>,
    older: HashMap<B256, Kept>,
    /// The bytes of the grants put in the newer generation since it began (those removed from
    /// it since still counted: an upper bound).
    newer_bytes: usize,
    /// The unbroken run of successful reads of the revocation feed, if one is on.
    follow: Option<FollowRun>,
    /// Revocations seen so far (the feed's and this replica's own): a read that saw a different
    /// count when it began than its copy finds when kept was overtaken by one.
    revocations: u64,
}

/// An unbroken run of successful reads of the revocation feed: each began within [`MAX_AGE`]
/// of the one before.
#[derive(Debug, Clone, Copy)]
struct FollowRun {
    /// When the first began (a copy read before then may predate the feed's place).
    since: Instant,
    /// When the last began: every revocation written before then has dropped its copies.
    last: Instant,
}

#[derive(Debug, Clone)]
struct Kept {
    grant: Arc<SessionGrant>,
    read_at: Instant,
    /// No revocation was seen between its read and its keeping (it may outlive [`MAX_AGE`]).
    unovertaken: bool,
}

/// What a read of a grant from the store noted when it began ([`GrantCache::ticket`]), for
/// keeping its copy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    read_at: Instant,
    revocations: u64,
}

impl Default for GrantCache {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

/// About the bytes a copy of `grant` holds: the grant, its strings and lists.
pub(crate) fn weight(grant: &SessionGrant) -> usize {
    use std::mem::size_of;
    let permissions = grant.permissions.as_ref().map_or(0, |p| {
        let allow = p.allow.as_deref().unwrap_or_default();
        allow
            .iter()
            .map(|r| {
                size_of::<super::grant::SessionAllow>()
                    + r.functions
                        .iter()
                        .map(|f| size_of::<String>() + f.len())
                        .sum::<usize>()
            })
            .sum::<usize>()
            + p.spend.len() * size_of::<super::grant::SpendLimit>()
    });
    size_of::<SessionGrant>() + grant.policy.len() + permissions
}

/// Most copies a dropped generation frees where it was dropped: a larger one (32,768 copies
/// with the default `--session-copies`, millions with one in the millions) is freed on
/// tokio's blocking pool, so that the request that filled the newer generation, and the tasks
/// behind it on its worker, do not wait for it. (By count: about 6,000 of the largest grants,
/// 128 MiB, are still freed in place.)
const FREE_INLINE: usize = 8_192;

/// Free a generation [`GrantCache::put`] dropped (after the lock is released).
fn free(dropped: Option<HashMap<B256, Kept>>) {
    let Some(d) = dropped.filter(|d| d.len() > FREE_INLINE) else {
        return;
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn_blocking(move || drop(d));
        }
        Err(_) => drop(d),
    }
}

impl GrantCache {
    /// A cache of at most `capacity` grants (rounded down to an even number, at least 2) and
    /// about [`CAPACITY_BYTES`] of them.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self::with_limits(capacity, CAPACITY_BYTES)
    }

    /// A cache of at most `copies` grants (`--session-copies`; rounded down to an even number)
    /// and about 4 KiB of them a copy on average, [`CAPACITY_BYTES`] at least: the default's
    /// bytes, scaled with its count.
    pub(crate) fn sized(copies: usize) -> Self {
        Self::with_limits(
            copies,
            copies
                .saturating_mul(CAPACITY_BYTES / CAPACITY)
                .max(CAPACITY_BYTES),
        )
    }

    /// A cache of at most `capacity` grants and about `bytes` of them (each halved per
    /// generation).
    pub(crate) fn with_limits(capacity: usize, bytes: usize) -> Self {
        Self {
            generations: Mutex::default(),
            per_generation: (capacity / 2).max(1),
            bytes_per_generation: (bytes / 2).max(1),
        }
    }

    /// Most grants kept (both generations together).
    pub(crate) fn capacity(&self) -> usize {
        self.per_generation * 2
    }

    /// The copy of grant `id`, if it may still be served at `now` (module doc).
    pub(crate) fn get(&self, id: B256, now: Instant) -> Option<Arc<SessionGrant>> {
        let mut g = self.lock();
        // While the feed is followed, copies read since its run began may live longer.
        let followed_since = g
            .follow
            .filter(|f| now.saturating_duration_since(f.last) <= MAX_AGE)
            .map(|f| f.since);
        let fresh = |c: &Kept| {
            let age = now.saturating_duration_since(c.read_at);
            age <= MAX_AGE
                || (age <= MAX_AGE_FOLLOWED
                    && c.unovertaken
                    && followed_since.is_some_and(|since| c.read_at >= since))
        };
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
        free(dropped);
        Some(grant)
    }

    /// What a read of a grant from the store that begins at `now` notes, to keep its copy.
    pub(crate) fn ticket(&self, now: Instant) -> Ticket {
        Ticket {
            read_at: now,
            revocations: self.lock().revocations,
        }
    }

    /// Keep a copy of grant `id`, read from the store by the read that took `ticket`.
    pub(crate) fn insert(&self, id: B256, grant: Arc<SessionGrant>, ticket: Ticket) {
        self.keep(id, grant, ticket, false);
    }

    /// Keep a copy of grant `id`, created by this replica with the write that took `ticket`,
    /// only if the newer generation has room for it: a create does not itself drop the older
    /// generation to keep its own copy. (It does use room that reads would have used: creates
    /// that fill the newer generation bring the next read's turnover sooner, each costing the
    /// sessions whose copies go a `GET` again, never money.) Without room, any copy of an
    /// earlier grant of the id is dropped all the same. Whether it was kept.
    pub(crate) fn insert_created(
        &self,
        id: B256,
        grant: Arc<SessionGrant>,
        ticket: Ticket,
    ) -> bool {
        self.keep(id, grant, ticket, true)
    }

    /// [`Self::insert`], or with `only_with_room` [`Self::insert_created`]: the check and the
    /// keeping under one lock, so that nothing fills the newer generation between them.
    fn keep(
        &self,
        id: B256,
        grant: Arc<SessionGrant>,
        ticket: Ticket,
        only_with_room: bool,
    ) -> bool {
        let mut g = self.lock();
        g.older.remove(&id);
        if only_with_room && self.turns_over(&g, &id, weight(&grant)) {
            // (A copy dropped from the newer generation no longer counts.)
            if let Some(old) = g.newer.remove(&id) {
                g.newer_bytes = g.newer_bytes.saturating_sub(weight(&old.grant));
            }
            return false;
        }
        let copy = Kept {
            grant,
            read_at: ticket.read_at,
            unovertaken: g.revocations == ticket.revocations,
        };
        let dropped = self.put(&mut g, id, copy);
        drop(g);
        debug_assert!(
            !only_with_room || dropped.is_none(),
            "a create turned the generations over"
        );
        free(dropped);
        true
    }

    /// Drop the copy of grant `id`.
    pub(crate) fn forget(&self, id: B256) {
        let mut g = self.lock();
        g.newer.remove(&id);
        g.older.remove(&id);
    }

    /// Drop the copies of these revoked grants (read from the feed, or revoked here); reads in
    /// flight keep theirs for [`MAX_AGE`] only.
    pub(crate) fn revoked(&self, ids: &[B256]) {
        let mut g = self.lock();
        g.revocations = g.revocations.wrapping_add(1);
        for id in ids {
            g.newer.remove(id);
            g.older.remove(id);
        }
    }

    /// A read of the revocation feed that began at `began` succeeded, every revocation in it
    /// seen ([`Self::revoked`]): it extends the run of such reads, or begins one.
    pub(crate) fn followed(&self, began: Instant) {
        let mut g = self.lock();
        g.follow = match g.follow {
            Some(f) if began.saturating_duration_since(f.last) <= MAX_AGE && began >= f.last => {
                Some(FollowRun { last: began, ..f })
            }
            _ => Some(FollowRun {
                since: began,
                last: began,
            }),
        };
    }

    /// Whether copies may be served past [`MAX_AGE`] at `now`: a run of reads of the feed is on,
    /// its last begun within [`MAX_AGE`].
    pub(crate) fn following(&self, now: Instant) -> bool {
        self.lock()
            .follow
            .is_some_and(|f| now.saturating_duration_since(f.last) <= MAX_AGE)
    }

    /// The feed could not be read, or may have lost revocations: copies fall back to
    /// [`MAX_AGE`] until a new run of reads, and those read before it stay there.
    pub(crate) fn unfollowed(&self) {
        self.lock().follow = None;
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

    /// Put `copy` in the newer generation; when that is full (by count, or by bytes with this
    /// copy) it becomes the older one, and the older one is returned, to be freed once the lock
    /// is released (tens of thousands of grants: no request waits on that).
    #[must_use]
    fn put(&self, g: &mut Generations, id: B256, copy: Kept) -> Option<HashMap<B256, Kept>> {
        let mut dropped = None;
        let bytes = weight(&copy.grant);
        if self.turns_over(g, &id, bytes) {
            let newer = std::mem::take(&mut g.newer);
            dropped = Some(std::mem::replace(&mut g.older, newer));
            g.newer_bytes = 0;
        } else if let Some(old) = g.newer.get(&id) {
            // (A copy replaced in the newer generation no longer counts.)
            g.newer_bytes = g.newer_bytes.saturating_sub(weight(&old.grant));
        }
        g.newer_bytes += bytes;
        g.newer.insert(id, copy);
        dropped
    }

    /// Whether putting a copy of `bytes` for `id` in the newer generation turns the
    /// generations over: the newer is full by count (unless it holds `id` already, replaced
    /// in place), or by bytes with this copy in place of any it replaces.
    fn turns_over(&self, g: &Generations, id: &B256, bytes: usize) -> bool {
        let replaced = g.newer.get(id).map_or(0, |old| weight(&old.grant));
        let full = g.newer.len() >= self.per_generation && !g.newer.contains_key(id);
        full || (!g.newer.is_empty()
            && g.newer_bytes.saturating_sub(replaced) + bytes > self.bytes_per_generation)
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
            shared_budget: false,
        })
    }

    #[test]
    fn a_copy_is_served_until_it_is_too_old() {
        let cache = GrantCache::default();
        let t0 = Instant::now();
        cache.insert(B256::repeat_byte(1), grant(1), cache.ticket(t0));
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
            cache.insert(B256::repeat_byte(n), grant(n), cache.ticket(t0));
            // Grant 0 is read between inserts: it stays however many others pass through.
            assert!(cache.get(B256::repeat_byte(0), t0).is_some(), "after {n}");
            assert!(cache.len() <= 4, "{} copies after {n}", cache.len());
        }
        assert!(cache.get(B256::repeat_byte(99), t0).is_some());
        assert!(cache.get(B256::repeat_byte(50), t0).is_none(), "evicted");
    }

    /// Copies of large grants are bounded by their bytes before their count (found by review:
    /// 65,536 copies of the largest grants a dapp's backend may pass through took gigabytes).
    #[test]
    fn it_holds_about_its_bytes_whatever_the_count() {
        use crate::session::grant::{Permissions, SessionAllow};

        let big = |n: u8| {
            let functions = (0..256)
                .map(|j| format!("f{j}_{}()", "a".repeat(26)))
                .collect();
            let allow = vec![SessionAllow {
                target: Default::default(),
                functions,
                max_value: Default::default(),
            }];
            let mut g = (*grant(n)).clone();
            g.permissions = Some(Permissions {
                allow: Some(allow),
                spend: Vec::new(),
            });
            Arc::new(g)
        };
        let one = weight(&big(0));
        assert!(one > 256 * 32, "{one} bytes");
        assert!(weight(&grant(0)) < 300, "{} bytes", weight(&grant(0)));
        // Room for 10 by count, 4 by bytes.
        let cache = GrantCache::with_limits(10, 4 * one);
        let t0 = Instant::now();
        for n in 0..50 {
            cache.insert(B256::repeat_byte(n), big(n), cache.ticket(t0));
            assert!(cache.len() <= 4, "{} copies after {n}", cache.len());
        }
        assert!(cache.get(B256::repeat_byte(49), t0).is_some());
        // Small ones still fill it by count.
        for n in 50..100 {
            cache.insert(B256::repeat_byte(n), grant(n), cache.ticket(t0));
        }
        assert_eq!(cache.len(), 10);
    }

    /// The largest grant `session::grant` lets be made: 64 rules, 256 functions of 8,192 bytes
    /// in all, 32 token caps.
    #[test]
    fn the_largest_grant_weighs_about_21_kib() {
        use crate::session::grant::{
            MAX_ALLOW_RULES, MAX_GRANT_FUNCTION_BYTES, MAX_GRANT_FUNCTIONS, MAX_SPEND_LIMITS,
            Permissions, SessionAllow, SpendLimit,
        };

        let per_function = MAX_GRANT_FUNCTION_BYTES / MAX_GRANT_FUNCTIONS;
        let per_rule = MAX_GRANT_FUNCTIONS / MAX_ALLOW_RULES;
        let allow = (0..MAX_ALLOW_RULES)
            .map(|i| SessionAllow {
                target: Default::default(),
                functions: (0..per_rule)
                    .map(|j| {
                        let head = format!("f{i}_{j}_");
                        format!("{head}{}()", "a".repeat(per_function - head.len() - 2))
                    })
                    .collect(),
                max_value: Default::default(),
            })
            .collect();
        let mut g = (*grant(1)).clone();
        g.policy = "p".repeat(64);
        g.permissions = Some(Permissions {
            allow: Some(allow),
            spend: (0..MAX_SPEND_LIMITS)
                .map(|_| SpendLimit {
                    token: Default::default(),
                    limit: Default::default(),
                })
                .collect(),
        });
        let w = weight(&g);
        assert!((19 << 10..=23 << 10).contains(&w), "{w} bytes");
        assert_eq!(CAPACITY_BYTES / w / 1000, 12, "{w} bytes");
    }

    /// A generation larger than [`FREE_INLINE`] dropped within a runtime is still freed (on the
    /// blocking pool): nothing holds its grants after. (A guard against a leak only: it passes
    /// as well when the generation is freed in place.)
    #[tokio::test]
    async fn a_large_dropped_generation_is_freed() {
        let n = FREE_INLINE + 1;
        let cache = GrantCache::with_capacity(2 * n);
        let now = Instant::now();
        let first = grant(0);
        cache.insert(B256::ZERO, first.clone(), cache.ticket(now));
        // Two generations of n each, then one more: the first generation goes.
        for i in 1..=2 * n {
            let id = B256::from(alloy::primitives::U256::from(i));
            cache.insert(id, grant(1), cache.ticket(now));
        }
        assert!(cache.get(B256::ZERO, now).is_none());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&first) > 1 {
            assert!(
                Instant::now() < deadline,
                "the dropped generation was not freed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A create keeps its copy only where the newer generation has room (by count, and by
    /// bytes): it does not itself turn the generations over, and without room an earlier
    /// grant's copy of the id goes.
    #[test]
    fn a_create_keeps_its_copy_only_where_there_is_room() {
        let cache = GrantCache::with_capacity(4);
        let now = Instant::now();
        let id = |n: u8| B256::repeat_byte(n);
        assert!(cache.insert_created(id(1), grant(1), cache.ticket(now)));
        cache.insert(id(2), grant(2), cache.ticket(now));
        // The newer generation (2) is full: 3 is not kept, and 1 and 2 stay.
        assert!(!cache.insert_created(id(3), grant(3), cache.ticket(now)));
        assert!(cache.get(id(3), now).is_none());
        assert!(cache.get(id(1), now).is_some() && cache.get(id(2), now).is_some());
        // A read's copy still turns the generations over; then a create has room again.
        cache.insert(id(4), grant(4), cache.ticket(now));
        assert!(cache.insert_created(id(5), grant(5), cache.ticket(now)));
        assert_eq!(cache.len(), 4);
        // Without room (the newer generation: 4 and 5), a copy of an earlier grant of the id
        // (2, in the older) is dropped, not kept stale.
        assert!(!cache.insert_created(id(2), grant(6), cache.ticket(now)));
        assert_eq!(cache.len(), 3);
        assert!(cache.get(id(2), now).is_none());
        // Replacing a copy in the newer generation needs no more room.
        assert!(cache.insert_created(id(5), grant(5), cache.ticket(now)));

        // By bytes: room for two copies a generation, whatever the count.
        let one = weight(&grant(1));
        let cache = GrantCache::with_limits(10, 4 * one);
        assert!(cache.insert_created(id(1), grant(1), cache.ticket(now)));
        assert!(cache.insert_created(id(2), grant(2), cache.ticket(now)));
        assert!(!cache.insert_created(id(3), grant(3), cache.ticket(now)));
        assert!(
            cache.insert_created(id(2), grant(2), cache.ticket(now)),
            "a replacement fits"
        );
        assert_eq!(cache.len(), 2);
        // A larger grant of 2 does not fit in 2's place: 2's copy goes, and so do its bytes,
        // which leaves room for 3.
        let larger = Arc::new(SessionGrant {
            policy: "p".repeat(2 * one),
            ..(*grant(2)).clone()
        });
        assert!(!cache.insert_created(id(2), larger, cache.ticket(now)));
        assert!(cache.get(id(2), now).is_none());
        assert!(
            cache.insert_created(id(3), grant(3), cache.ticket(now)),
            "the dropped copy's bytes no longer count"
        );
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn sized_scales_its_bytes_with_its_count() {
        let default = GrantCache::sized(CAPACITY);
        assert_eq!(default.capacity(), CAPACITY);
        assert_eq!(default.bytes_per_generation * 2, CAPACITY_BYTES);
        let small = GrantCache::sized(1_000);
        assert_eq!(small.capacity(), 1_000);
        assert_eq!(
            small.bytes_per_generation * 2,
            CAPACITY_BYTES,
            "never below"
        );
        let large = GrantCache::sized(1_000_000);
        assert_eq!(large.capacity(), 1_000_000);
        assert_eq!(large.bytes_per_generation * 2, 1_000_000 * 4_096);
    }

    #[test]
    fn a_copy_read_often_still_ages() {
        let cache = GrantCache::with_capacity(4);
        let t0 = Instant::now();
        let id = B256::repeat_byte(1);
        cache.insert(id, grant(1), cache.ticket(t0));
        for (n, tenth) in (2u8..=9).zip(0u32..) {
            // Others pass through; the copy moves between generations as it is read.
            cache.insert(B256::repeat_byte(n), grant(n), cache.ticket(t0));
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
            cache.insert(B256::repeat_byte(n), grant(n), cache.ticket(t0));
        }
        // 1 and 2 are in the older generation now, 3 in the newer.
        cache.forget(B256::repeat_byte(1));
        cache.forget(B256::repeat_byte(3));
        assert!(cache.get(B256::repeat_byte(1), t0).is_none());
        assert!(cache.get(B256::repeat_byte(3), t0).is_none());
        assert!(cache.get(B256::repeat_byte(2), t0).is_some());
    }

    /// A cache following the feed from `t0`, read again every 2 s until `until`.
    fn follow_every_2s(cache: &GrantCache, t0: Instant, until: Duration) {
        let mut at = Duration::ZERO;
        while at <= until {
            cache.followed(t0 + at);
            at += Duration::from_secs(2);
        }
    }

    #[test]
    fn a_copy_lives_longer_while_the_feed_is_followed_and_not_past_it() {
        let cache = GrantCache::default();
        let t0 = Instant::now();
        let id = B256::repeat_byte(1);
        cache.followed(t0);
        let read = t0 + Duration::from_millis(1);
        cache.insert(id, grant(1), cache.ticket(read));
        follow_every_2s(&cache, t0, MAX_AGE_FOLLOWED + MAX_AGE);
        let late = read + MAX_AGE_FOLLOWED;
        assert!(
            cache.get(id, late).is_some(),
            "followed: served to its longer age"
        );
        assert!(
            cache.get(id, late + Duration::from_millis(1)).is_none(),
            "and not past it"
        );
    }

    #[test]
    fn a_copy_falls_back_to_max_age_when_the_feed_is_not_read() {
        let t0 = Instant::now();
        let id = B256::repeat_byte(1);
        // The feed's last read began more than MAX_AGE ago: not followed any more.
        let cache = GrantCache::default();
        cache.followed(t0);
        cache.insert(id, grant(1), cache.ticket(t0));
        assert!(cache.get(id, t0 + MAX_AGE).is_some());
        assert!(
            cache
                .get(id, t0 + MAX_AGE + Duration::from_millis(1))
                .is_none()
        );
        // Reads resume: a run begins again, but a copy read before it stays at MAX_AGE.
        let cache = GrantCache::default();
        cache.followed(t0);
        cache.insert(id, grant(1), cache.ticket(t0));
        let resumed = t0 + MAX_AGE + Duration::from_secs(1);
        cache.followed(resumed);
        assert!(
            cache.get(id, resumed + Duration::from_secs(1)).is_none(),
            "read in a run that broke"
        );
        // A read that failed ends the run at once.
        let cache = GrantCache::default();
        follow_every_2s(&cache, t0, Duration::from_secs(20));
        cache.insert(id, grant(1), cache.ticket(t0 + Duration::from_secs(1)));
        cache.unfollowed();
        assert!(cache.get(id, t0 + Duration::from_secs(12)).is_none());
    }

    #[test]
    fn a_copy_read_before_the_feed_was_followed_keeps_max_age() {
        let cache = GrantCache::default();
        let t0 = Instant::now();
        let id = B256::repeat_byte(1);
        cache.insert(id, grant(1), cache.ticket(t0));
        follow_every_2s(
            &cache,
            t0 + Duration::from_millis(1),
            Duration::from_secs(60),
        );
        assert!(cache.get(id, t0 + MAX_AGE).is_some());
        assert!(
            cache
                .get(id, t0 + MAX_AGE + Duration::from_millis(1))
                .is_none()
        );
    }

    #[test]
    fn a_revocation_drops_its_copy_and_one_in_flight_keeps_max_age() {
        let cache = GrantCache::default();
        let t0 = Instant::now();
        follow_every_2s(&cache, t0, Duration::from_secs(60));
        let (revoked, other, in_flight) = (
            B256::repeat_byte(1),
            B256::repeat_byte(2),
            B256::repeat_byte(3),
        );
        cache.insert(revoked, grant(1), cache.ticket(t0));
        cache.insert(other, grant(2), cache.ticket(t0));
        // A read begins, a revocation is seen, then the read's copy is kept.
        let ticket = cache.ticket(t0);
        cache.revoked(&[revoked]);
        cache.insert(in_flight, grant(3), ticket);
        let later = t0 + MAX_AGE + Duration::from_secs(1);
        assert!(cache.get(revoked, t0).is_none(), "dropped");
        assert!(
            cache.get(other, later).is_some(),
            "the others stay followed"
        );
        assert!(cache.get(in_flight, t0 + MAX_AGE).is_some());
        assert!(
            cache.get(in_flight, later).is_none(),
            "overtaken by a revocation: MAX_AGE only"
        );
    }
}
