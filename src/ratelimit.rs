//! Rate limits (GCRA, with `governor`): per API key (`--rate-per-key`), and per sender and per
//! session as each policy's `[rate]` says. Keyed limiters live in memory, one per (policy,
//! scope, rate); keys fully replenished are evicted by [`RateLimits::evict_stale`] (run every
//! minute by `serve`), so memory stays bounded by the keys active within one window, and each
//! limiter tracks at most [`MAX_TRACKED`] keys: a new sender per request (anyone with a key may
//! name any sender a policy admits) under a `per_sender = "10/d"` would otherwise add an entry
//! a request, kept hours (a key leaves once its allowance is whole again). A limiter that is
//! full stops limiting until an eviction makes room: it cannot tell a key it tracks from a new
//! one without adding it, and refusing every request would let one client (with a key that
//! may sit in a dapp's web page) shut a policy down for hours. Rates are not what bounds money:
//! the budgets in the ledger do, full limiter or not.
//!
//! Limits are per instance: N replicas allow N times the rate (DESIGN keeps Redis for money,
//! not for rate limits; budgets are what bound spending).

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::primitives::{Address, B256};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::policy::{Policy, Rate};

type Keyed<K, C> = RateLimiter<K, DashMapStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// A limit was hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// Which limit, e.g. `apiKey:shop` or `game.rate.per_sender`.
    pub scope: String,
    /// When a retry can succeed.
    pub retry_after: Duration,
}

/// Most keys one limiter tracks.
pub const MAX_TRACKED: usize = 1 << 20;

fn quota(rate: Rate) -> Option<Quota> {
    let burst = NonZeroU32::new(rate.count)?;
    // (A rate over one a nanosecond is refused at parsing; were one here, it would be held to
    // one a nanosecond rather than become no limit at all.)
    Quota::with_period((rate.per / rate.count).max(Duration::from_nanos(1)))
        .map(|q| q.allow_burst(burst))
}

/// The keys a policy's limiters are keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subject {
    Sender(Address),
    Session(B256),
}

/// One policy's limiter: (policy id, `per_sender` or `per_session`, rate). A changed rate in a
/// new policy set gets a new limiter.
type PolicyLimit = (String, &'static str, Rate);

/// A policy's limiter, and whether it was full when last looked at (its size is summed over
/// its shards' locks: looked at every `every` checks, and at each eviction, so it may pass its
/// cap by that many keys).
struct PolicyLimiter<C: Clock> {
    keyed: Keyed<Subject, C>,
    checks: AtomicUsize,
    every: usize,
    full: AtomicBool,
}

/// All rate limiters of one instance.
pub struct RateLimits<C: Clock = DefaultClock> {
    clock: C,
    per_key: Option<Keyed<String, C>>,
    by_policy: Mutex<HashMap<PolicyLimit, Arc<PolicyLimiter<C>>>>,
    /// Most keys a policy's limiter tracks ([`MAX_TRACKED`]).
    max_tracked: usize,
}

impl<C: Clock + Clone> std::fmt::Debug for RateLimits<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("tracked", &self.len())
            .finish()
    }
}

impl RateLimits {
    /// Limits on the real clock, with an optional per-API-key rate.
    pub fn new(per_key: Option<Rate>) -> Self {
        Self::with_clock(per_key, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    /// Limits on `clock` (tests use a fake one).
    pub fn with_clock(per_key: Option<Rate>, clock: C) -> Self {
        let per_key = per_key
            .and_then(quota)
            .map(|q| RateLimiter::dashmap_with_clock(q, clock.clone()));
        Self {
            clock,
            per_key,
            by_policy: Mutex::new(HashMap::new()),
            max_tracked: MAX_TRACKED,
        }
    }

    /// The same, each policy's limiter tracking at most `max` keys.
    pub fn with_max_tracked(mut self, max: usize) -> Self {
        self.max_tracked = max;
        self
    }

    fn check<K: Hash + Eq + Clone>(
        &self,
        limiter: &Keyed<K, C>,
        key: &K,
        scope: impl FnOnce() -> String,
    ) -> Result<(), Limited> {
        limiter.check_key(key).map_err(|not_until| Limited {
            scope: scope(),
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// One request by the API key named `name`.
    pub fn check_api_key(&self, name: &str) -> Result<(), Limited> {
        match &self.per_key {
            Some(limiter) => self.check(limiter, &name.to_owned(), || format!("apiKey:{name}")),
            None => Ok(()),
        }
    }

    fn limiter(
        &self,
        policy: &str,
        scope: &'static str,
        rate: Rate,
    ) -> Option<Arc<PolicyLimiter<C>>> {
        let mut map = self
            .by_policy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (policy.to_owned(), scope, rate);
        if let Some(l) = map.get(&key) {
            return Some(Arc::clone(l));
        }
        let limiter = Arc::new(PolicyLimiter {
            keyed: RateLimiter::dashmap_with_clock(quota(rate)?, self.clock.clone()),
            checks: AtomicUsize::new(0),
            every: (self.max_tracked / 4096).clamp(1, 256),
            full: AtomicBool::new(false),
        });
        map.insert(key, Arc::clone(&limiter));
        Some(limiter)
    }

    /// One signed sponsorship under `policy` for `sender` (and `session`).
    pub fn check_policy(
        &self,
        policy: &Policy,
        sender: Address,
        session: Option<B256>,
    ) -> Result<(), Limited> {
        // Whether `limiter` limits: not while it is full (see the module doc).
        let limiting = |limiter: &PolicyLimiter<C>, scope: &str| {
            if limiter
                .checks
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(limiter.every)
            {
                let tracked = limiter.keyed.len();
                let full = tracked >= self.max_tracked;
                let was_full = limiter.full.swap(full, Ordering::Relaxed);
                if full && !was_full {
                    tracing::warn!(policy = %policy.id, scope, tracked, "rate limiter full: not limiting until its next eviction makes room (budgets still bound spending)");
                }
            }
            !limiter.full.load(Ordering::Relaxed)
        };
        if let Some(limiter) = policy
            .rate_per_sender
            .and_then(|r| self.limiter(&policy.id, "per_sender", r))
            && limiting(&limiter, "per_sender")
        {
            self.check(&limiter.keyed, &Subject::Sender(sender), || {
                format!("{}.rate.per_sender", policy.id)
            })?;
        }
        if let (Some(id), Some(limiter)) = (
            session,
            policy
                .rate_per_session
                .and_then(|r| self.limiter(&policy.id, "per_session", r)),
        ) && limiting(&limiter, "per_session")
        {
            self.check(&limiter.keyed, &Subject::Session(id), || {
                format!("{}.rate.per_session", policy.id)
            })?;
        }
        Ok(())
    }

    /// Forget keys whose allowance is whole again (they would start afresh anyway).
    pub fn evict_stale(&self) {
        if let Some(l) = &self.per_key {
            l.retain_recent();
            l.shrink_to_fit();
        }
        let map = self
            .by_policy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for l in map.values() {
            l.keyed.retain_recent();
            l.keyed.shrink_to_fit();
            l.full
                .store(l.keyed.len() >= self.max_tracked, Ordering::Relaxed);
        }
    }

    /// Keys tracked across all limiters.
    pub fn len(&self) -> usize {
        let map = self
            .by_policy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.per_key.as_ref().map_or(0, |l| l.len())
            + map.values().map(|l| l.keyed.len()).sum::<usize>()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::file::parse;
    use governor::clock::FakeRelativeClock;

    fn policy() -> Policy {
        let src = r#"
id = "p"
chains = [1]
entry_points = ["0.7"]
[rate]
per_sender = "3/min"
per_session = "2/min"
[[allow]]
target = "0x1111111111111111111111111111111111111111"
functions = ["*"]
"#;
        parse(std::path::Path::new("p.toml"), src).unwrap_or_else(|e| panic!("{e:?}"))
    }

    #[test]
    fn per_sender_and_per_session_limits_recover() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(None, clock.clone());
        let (p, a, b) = (policy(), Address::repeat_byte(1), Address::repeat_byte(2));
        for _ in 0..3 {
            assert!(limits.check_policy(&p, a, None).is_ok());
        }
        let hit = limits.check_policy(&p, a, None).unwrap_err();
        assert_eq!(hit.scope, "p.rate.per_sender");
        assert_eq!(
            hit.retry_after,
            Duration::from_secs(20),
            "one request per 20 s replenishes"
        );
        assert!(
            limits.check_policy(&p, b, None).is_ok(),
            "another sender is not affected"
        );
        clock.advance(Duration::from_secs(20));
        assert!(limits.check_policy(&p, a, None).is_ok(), "recovered");

        let s = Some(B256::repeat_byte(9));
        assert!(limits.check_policy(&p, Address::repeat_byte(3), s).is_ok());
        assert!(limits.check_policy(&p, Address::repeat_byte(4), s).is_ok());
        assert_eq!(
            limits
                .check_policy(&p, Address::repeat_byte(5), s)
                .unwrap_err()
                .scope,
            "p.rate.per_session"
        );
    }

    #[test]
    fn a_full_limiter_stops_growing_and_limiting_until_evicted() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(None, clock.clone()).with_max_tracked(3);
        let p = policy();
        let sender = |i: u8| Address::repeat_byte(i);
        for _ in 0..3 {
            assert!(limits.check_policy(&p, sender(1), None).is_ok());
        }
        assert!(limits.check_policy(&p, sender(2), None).is_ok());
        assert!(limits.check_policy(&p, sender(3), None).is_ok());
        // Full: a fourth sender is not tracked, and the first is not limited (3/min used).
        assert!(limits.check_policy(&p, sender(4), None).is_ok());
        assert!(limits.check_policy(&p, sender(1), None).is_ok());
        assert_eq!(limits.len(), 3, "no key added while full");
        clock.advance(Duration::from_secs(61));
        limits.evict_stale();
        for _ in 0..3 {
            assert!(limits.check_policy(&p, sender(1), None).is_ok());
        }
        assert_eq!(
            limits
                .check_policy(&p, sender(1), None)
                .map_err(|l| l.scope),
            Err("p.rate.per_sender".to_owned()),
            "limiting again once evicted"
        );
    }

    #[test]
    fn a_million_senders_do_not_stay_in_memory() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(
            Some(Rate {
                count: 10,
                per: Duration::from_secs(1),
            }),
            clock.clone(),
        );
        let p = policy();
        for i in 0u32..1_000_000 {
            let mut a = [0u8; 20];
            a[..4].copy_from_slice(&i.to_be_bytes());
            assert!(limits.check_policy(&p, Address::from(a), None).is_ok());
        }
        assert_eq!(limits.len(), 1_000_000);
        clock.advance(Duration::from_secs(61)); // past one full window
        limits.evict_stale();
        assert_eq!(limits.len(), 0, "stale keys evicted");
    }
}
