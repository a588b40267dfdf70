//! The ledger in this process: the embedded default, with the Redis ledger's semantics
//! (`tests/it/ledger.rs` runs one suite against both).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::{Mutex, MutexGuard};

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::sol_types::SolValue;

use super::{
    Exhausted, Landing, MAX_EXACT_GWEI, MAX_HASHES, MAX_OPEN_PER_NONCE, MAX_OPEN_PER_NONCE_ANY,
    MAX_RECORDS_PER_NONCE, Outcome, REFRESH_MARGIN_SECS, Reservation, Resource, Scope, Settled,
    SpendExceeded,
};
use crate::userop::paymaster_data::PaymasterData;

/// Budget counters, reservation records and session states behind one lock: a reservation is
/// one critical section, as the Redis script is one atomic step.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    inner: Mutex<Inner>,
}

type PolicyKey = (String, B256);

/// A map in [`PARTS`] parts, each key in the part its [`Part::part`] names. A part grows (and
/// copies its entries into a larger table) on its own: one map of half a million reservations
/// did so in one go, and every request waited the 0.4-0.6 s it took (`scripts/bench http`, the
/// embedded default's second window, when it crossed 458,752 records: docs/performance.md).
#[derive(Debug)]
struct Parts<K, V>(Box<[HashMap<K, V>]>);

/// How many parts a [`Parts`] has.
const PARTS: usize = 64;

/// Which part of a [`Parts`] a key is in.
trait Part {
    fn part(&self) -> usize;
}

impl Part for PolicyKey {
    /// Op and landing keys are hashes: their first byte is spread evenly.
    fn part(&self) -> usize {
        usize::from(self.1[0]) % PARTS
    }
}

impl Part for (String, String) {
    /// Scope names share long prefixes and suffixes (`sender:0x…:20789`): all of it is hashed.
    fn part(&self) -> usize {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        self.1.hash(&mut h);
        // Any bits of the hash pick a part as well as the others.
        (h.finish() % PARTS as u64) as usize
    }
}

impl<K, V> Default for Parts<K, V> {
    fn default() -> Self {
        Self((0..PARTS).map(|_| HashMap::new()).collect())
    }
}

impl<K: Part + Eq + std::hash::Hash, V> Parts<K, V> {
    fn get(&self, key: &K) -> Option<&V> {
        self.0[key.part()].get(key)
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.0[key.part()].get_mut(key)
    }

    fn contains_key(&self, key: &K) -> bool {
        self.0[key.part()].contains_key(key)
    }

    fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.0[key.part()].insert(key, value)
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        self.0[key.part()].remove(key)
    }

    fn entry(&mut self, key: K) -> std::collections::hash_map::Entry<'_, K, V> {
        self.0[key.part()].entry(key)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.iter().map(HashMap::len).sum()
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// `(policy, scope)` → the counter.
    counters: Parts<(String, String), Counter>,
    /// `(policy, op key)` → the reservation.
    reservations: Parts<PolicyKey, Record>,
    /// `(policy, landing key)` → the op keys reserved for that nonce.
    landings: Parts<PolicyKey, Vec<B256>>,
    /// `(policy, session id)` → what reservations check and record on the session.
    sessions: HashMap<PolicyKey, SessionState>,
    /// Open reservations per policy, by validUntil: release on expiry and the oldest open one
    /// without a scan. A policy keeps its entry once it has reserved, empty or not: its keys
    /// are every policy reserved under (`watched_policies`).
    open_index: HashMap<String, BTreeSet<(u64, B256)>>,
    /// When each counter, record and session state may be forgotten (as Redis TTLs). Lazy: an
    /// entry whose item was extended or removed since is skipped when it comes up.
    expiry: BinaryHeap<Reverse<(u64, Expiring)>>,
}

/// What an expiry entry forgets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Expiring {
    Counter(String, String),
    Reservation(String, B256),
    Session(String, B256),
}

#[derive(Debug, Default, Clone, Copy)]
struct Counter {
    cost: u64,
    open: u64,
    ops: u64,
    expires_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Settled,
    Released,
}

#[derive(Debug)]
struct Record {
    state: State,
    /// The operation's idempotency key: its key here, but for a record kept aside (renamed).
    op: B256,
    landing_key: B256,
    cost: u64,
    scopes: Vec<String>,
    answer: PaymasterData,
    /// The userOpHash of every answer the reservation was extended to.
    user_op_hashes: Vec<B256>,
    session: Option<B256>,
    spend: Vec<(Address, U256)>,
    expires_at: u64,
}

#[derive(Debug, Default)]
struct SessionState {
    revoked: bool,
    spent: BTreeMap<Address, U256>,
    expires_at: u64,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every operation checks before it writes, so a panic inside cannot leave a
        // half-applied reservation: a poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A reservation at `now` (benches measure it without the async wrapper).
    pub fn reserve_now(&self, r: &Reservation, now: u64) -> Outcome {
        self.reserve(r, false, now)
    }

    pub(super) fn reserve(&self, r: &Reservation, check_only: bool, now: u64) -> Outcome {
        let mut inner = self.lock();
        inner.prune(now);
        let key = (r.policy.clone(), r.op_key);
        // A revoked session gets nothing, not even an answer given before (reserve.lua).
        let session = r.session.as_ref().map(|s| (r.policy.clone(), s.id));
        if let Some(state) = session.as_ref().and_then(|k| inner.sessions.get(k))
            && state.revoked
        {
            return Outcome::SessionRevoked;
        }
        let existing = inner
            .reservations
            .get(&key)
            .map(|rec| (rec.state, rec.answer.clone()));
        match &existing {
            Some((State::Settled, answer)) => return Outcome::Existing(answer.clone()),
            Some((State::Open, answer))
                if answer.window.valid_until >= now.saturating_add(REFRESH_MARGIN_SECS)
                    || answer.window.valid_until >= r.answer.window.valid_until =>
            {
                return Outcome::Existing(answer.clone());
            }
            _ => {}
        }
        let scope_names: Vec<String> = r.scopes.iter().map(|s| s.name.clone()).collect();
        let charge_session = r.session.as_ref().map(|s| s.id);
        // A released record of this operation is replaced below; anything else adds one.
        let adds = !matches!(existing, Some((State::Released, _)));
        if let Some((State::Open, _)) = &existing {
            let same = inner.reservations.get(&key).is_some_and(|rec| {
                rec.scopes == scope_names
                    && rec.session == charge_session
                    && rec.user_op_hashes.len() + r.user_op_hashes.len() <= MAX_HASHES
            });
            if same {
                // About to expire: extend this reservation to the fresh answer (see reserve.lua;
                // one whose hashes would pass MAX_HASHES is kept aside instead, below).
                if !check_only && let Some(rec) = inner.reservations.get_mut(&key) {
                    let before = rec.answer.window.valid_until;
                    rec.answer = r.answer.clone();
                    rec.user_op_hashes.extend(&r.user_op_hashes);
                    rec.expires_at = rec.expires_at.max(r.expires_at);
                    let expires_at = rec.expires_at;
                    inner.open_move(
                        &r.policy,
                        (before, r.op_key),
                        (r.answer.window.valid_until, r.op_key),
                    );
                    inner.expire_at(
                        expires_at,
                        Expiring::Reservation(r.policy.clone(), r.op_key),
                    );
                    // Its counters live as long as it now does (as reserve.lua's refresh).
                    for s in &r.scopes {
                        inner.extend_counter(&r.policy, s);
                    }
                }
                return Outcome::Reserved;
            }
        }
        // Another window or session, or extended as often as it keeps hashes (an open record
        // that is not the same): it stays as it is under a key of its own, and this request is
        // a new one (see reserve.lua); done once every check below has passed, as reserve.lua
        // writes nothing it refuses.
        let renamed = matches!(existing, Some((State::Open, _)));
        // As reserve.lua: a nonce keeps at most so many live records; a new one that would pass
        // the cap makes room by dropping the released records of the earliest validUntil, and
        // is refused when none is released.
        let landing = (r.policy.clone(), r.landing_key);
        let count = inner.landings.get(&landing).map_or(0, Vec::len);
        let mut evict = None;
        if adds && count >= MAX_RECORDS_PER_NONCE {
            evict = inner
                .records_of(&landing)
                .filter(|(_, rec)| rec.state == State::Released)
                .map(|(_, rec)| rec.answer.window.valid_until)
                .min();
            if evict.is_none() {
                return Outcome::NonceFull(u64::try_from(count).unwrap_or(u64::MAX));
            }
        }
        // As reserve.lua: a nonce holds at most so many open reservations, and fewer per session
        // (this operation's own open record, here, is one that is to stay under a key of its own:
        // it counts, in a check too).
        let open_sessions: Vec<Option<B256>> = inner
            .records_of(&landing)
            .filter(|(_, rec)| rec.state == State::Open)
            .map(|(_, rec)| rec.session)
            .collect();
        if open_sessions.len() >= MAX_OPEN_PER_NONCE_ANY {
            return Outcome::NoncePending;
        }
        if let Some(id) = charge_session
            && open_sessions.iter().filter(|s| **s == Some(id)).count() >= MAX_OPEN_PER_NONCE
        {
            return Outcome::NoncePending;
        }
        for s in &r.scopes {
            let Counter {
                cost, ops, open, ..
            } = inner
                .counters
                .get(&(r.policy.clone(), s.name.clone()))
                .copied()
                .unwrap_or_default();
            let exhausted = |resource, limit, used, requested| {
                Outcome::Exhausted(Exhausted {
                    scope: s.name.clone(),
                    rule: s.rule.clone(),
                    resource,
                    limit,
                    used,
                    requested,
                })
            };
            // As in Redis: counters stay exact integers in Lua numbers (see MAX_EXACT_GWEI).
            match s.cost_cap() {
                Some(limit) if cost.saturating_add(r.cost_gwei) > limit => {
                    return exhausted(Resource::Cost, limit, cost, r.cost_gwei);
                }
                None if open.saturating_add(r.cost_gwei) > MAX_EXACT_GWEI => {
                    return exhausted(Resource::Cost, MAX_EXACT_GWEI, open, r.cost_gwei);
                }
                _ => {}
            }
            if let Some(limit) = s.ops_limit.filter(|&l| ops.saturating_add(1) > l) {
                return exhausted(Resource::Ops, limit, ops, 1);
            }
        }
        if let Some(charge) = &r.session {
            let spent = session.as_ref().and_then(|k| inner.sessions.get(k));
            for t in &charge.spend {
                let spent = spent
                    .and_then(|s| s.spent.get(&t.token))
                    .copied()
                    .unwrap_or_default();
                if spent.saturating_add(t.amount) > t.limit {
                    return Outcome::SpendExceeded(SpendExceeded {
                        token: t.token,
                        rule: t.rule.clone(),
                        limit: t.limit,
                        spent,
                        requested: t.amount,
                    });
                }
            }
        }
        if check_only {
            return Outcome::Reserved;
        }
        if renamed && let Some(rec) = inner.reservations.remove(&key) {
            let valid_until = rec.answer.window.valid_until;
            let kept = (
                r.policy.clone(),
                keccak256((r.op_key, U256::from(valid_until)).abi_encode()),
            );
            // In its place, as reserve.lua renames it.
            if let Some(ops) = inner.landings.get_mut(&landing) {
                for op in ops.iter_mut().filter(|op| **op == r.op_key) {
                    *op = kept.1;
                }
            }
            inner.open_move(&r.policy, (valid_until, r.op_key), (valid_until, kept.1));
            inner.expire_at(
                rec.expires_at,
                Expiring::Reservation(kept.0.clone(), kept.1),
            );
            inner.reservations.insert(kept, rec);
        }
        if let Some(oldest) = evict {
            let dropped: Vec<B256> = inner
                .records_of(&landing)
                .filter(|(_, rec)| {
                    rec.state == State::Released && rec.answer.window.valid_until == oldest
                })
                .map(|(op, _)| op)
                .collect();
            for op in &dropped {
                inner.reservations.remove(&(r.policy.clone(), *op));
            }
            if let Some(ops) = inner.landings.get_mut(&landing) {
                ops.retain(|op| !dropped.contains(op));
            }
        }
        for s in &r.scopes {
            let c = inner
                .counters
                .entry((r.policy.clone(), s.name.clone()))
                .or_default();
            // (Without a cost limit it stays at the most a counter holds, as in Redis.)
            c.cost = c.cost.saturating_add(r.cost_gwei).min(MAX_EXACT_GWEI);
            c.open = c.open.saturating_add(r.cost_gwei);
            c.ops = c.ops.saturating_add(1);
            inner.extend_counter(&r.policy, s);
        }
        let mut spend = Vec::new();
        if let (Some(charge), Some(k)) = (&r.session, session) {
            let state = inner.sessions.entry(k.clone()).or_default();
            let extended = state.expires_at != charge.expires_at;
            state.expires_at = charge.expires_at;
            for t in &charge.spend {
                let total = state.spent.entry(t.token).or_default();
                *total = total.saturating_add(t.amount);
                spend.push((t.token, t.amount));
            }
            if extended {
                inner.expire_at(charge.expires_at, Expiring::Session(k.0, k.1));
            }
        }
        inner.open_move(
            &r.policy,
            (0, B256::ZERO),
            (r.answer.window.valid_until, r.op_key),
        );
        inner.expire_at(
            r.expires_at,
            Expiring::Reservation(r.policy.clone(), r.op_key),
        );
        inner.reservations.insert(
            key,
            Record {
                state: State::Open,
                op: r.op_key,
                landing_key: r.landing_key,
                cost: r.cost_gwei,
                scopes: scope_names,
                answer: r.answer.clone(),
                user_op_hashes: r.user_op_hashes.clone(),
                session: r.session.as_ref().map(|s| s.id),
                spend,
                expires_at: r.expires_at,
            },
        );
        let ops = inner
            .landings
            .entry((r.policy.clone(), r.landing_key))
            .or_default();
        if !ops.contains(&r.op_key) {
            ops.push(r.op_key);
        }
        Outcome::Reserved
    }

    pub(super) fn settle(&self, policies: &[String], landing: &Landing) -> Settled {
        let mut inner = self.lock();
        let records = |inner: &Inner, policy: &String| -> Vec<PolicyKey> {
            inner
                .landings
                .get(&(policy.clone(), landing.landing_key))
                .into_iter()
                .flatten()
                .map(|op| (policy.clone(), *op))
                .collect()
        };
        // The operation of a record in `state` carrying the event's hash.
        let matched = |inner: &Inner, k: &PolicyKey, state: State| {
            inner
                .reservations
                .get(k)
                .filter(|r| r.state == state && r.user_op_hashes.contains(&landing.user_op_hash))
                .map(|r| r.op)
        };
        // Whether a settled record among `keys` carries the event's hash: the event, read before.
        let read_before = |inner: &Inner, keys: &[PolicyKey]| {
            keys.iter()
                .any(|k| matched(inner, k, State::Settled).is_some())
        };
        // As settle.lua: where the event's hash is (an open record anywhere, or a settled one;
        // else only a released one, else nowhere) decides, then each policy settles, per
        // operation.
        let all: Vec<PolicyKey> = policies.iter().flat_map(|p| records(&inner, p)).collect();
        let open_found = all
            .iter()
            .any(|k| matched(&inner, k, State::Open).is_some())
            || read_before(&inner, &all);
        let released_found = all
            .iter()
            .any(|k| matched(&inner, k, State::Released).is_some());
        let none = !open_found && !released_found;
        let mut out = Settled {
            hash_matched: open_found,
            known: all.iter().any(|k| inner.reservations.contains_key(k)),
            ..Settled::default()
        };
        for policy in policies {
            let keys = records(&inner, policy);
            // Each operation's first open match, settled; each other operation's first
            // released match, charged back; but none of an operation whose settled record
            // carries the hash (the event, read before: charged then). With no other match, the
            // open records (made since) are released.
            let landed: Vec<B256> = keys
                .iter()
                .filter_map(|k| matched(&inner, k, State::Settled))
                .collect();
            let (mut settle, mut settled_ops) = (Vec::new(), landed.clone());
            for k in &keys {
                if let Some(op) = matched(&inner, k, State::Open)
                    && !settled_ops.contains(&op)
                {
                    settled_ops.push(op);
                    settle.push(k.clone());
                }
            }
            let (mut back, mut back_ops) = (Vec::new(), Vec::new());
            for k in keys.iter().filter(|_| !none) {
                if let Some(op) = matched(&inner, k, State::Released)
                    && !settled_ops.contains(&op)
                    && !back_ops.contains(&op)
                {
                    back_ops.push(op);
                    back.push(k.clone());
                }
            }
            out.ambiguous |= settle.len() + back.len() > 1;
            for k in &back {
                out.charged_back += usize::from(inner.charge_back(k, landing.actual_gwei));
            }
            let open: Vec<PolicyKey> = keys
                .into_iter()
                .filter(|k| {
                    inner
                        .reservations
                        .get(k)
                        .is_some_and(|r| r.state == State::Open)
                })
                .collect();
            for k in &open {
                if none || settle.contains(k) {
                    out.settled += usize::from(inner.close(k, Some(landing.actual_gwei)));
                } else {
                    out.superseded += usize::from(inner.close(k, None));
                }
            }
        }
        out.hash_matched |= out.charged_back > 0;
        out
    }

    pub(super) fn release_expired(&self, policies: &[String], confirmed_time: u64) -> usize {
        let mut inner = self.lock();
        // validUntil < confirmed_time: the EntryPoint can no longer accept the operation.
        let expired: Vec<PolicyKey> = policies
            .iter()
            .filter_map(|policy| Some((policy, inner.open_index.get(policy)?)))
            .flat_map(|(policy, open)| {
                open.range(..(confirmed_time, B256::ZERO))
                    .map(move |(_, op)| (policy.clone(), *op))
            })
            .collect();
        expired.iter().filter(|k| inner.close(k, None)).count()
    }

    /// `serving`, and every other policy reserved under (see `Ledger::watched_policies`).
    pub(super) fn watched_policies(&self, serving: &[String]) -> Vec<String> {
        let inner = self.lock();
        let mut out = serving.to_vec();
        let mut others: Vec<&String> = inner
            .open_index
            .keys()
            .filter(|p| !serving.contains(p))
            .collect();
        others.sort();
        out.extend(others.into_iter().cloned());
        out
    }

    pub(super) fn oldest_open(&self, policies: &[String]) -> Option<u64> {
        let inner = self.lock();
        policies
            .iter()
            .filter_map(|p| inner.open_index.get(p)?.first().map(|(at, _)| *at))
            .min()
    }

    pub(super) fn revoke_session(&self, policy: &str, session: B256, expires_at: u64) {
        let mut inner = self.lock();
        let state = inner
            .sessions
            .entry((policy.to_owned(), session))
            .or_default();
        state.revoked = true;
        state.expires_at = state.expires_at.max(expires_at);
        let expires_at = state.expires_at;
        inner.expire_at(expires_at, Expiring::Session(policy.to_owned(), session));
    }

    pub(super) fn session_spent(&self, policy: &str, session: B256) -> BTreeMap<Address, U256> {
        self.lock()
            .sessions
            .get(&(policy.to_owned(), session))
            .map(|s| {
                s.spent
                    .iter()
                    .filter(|(_, a)| !a.is_zero())
                    .map(|(t, a)| (*t, *a))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(super) fn usage(&self, policy: &str, scope: &str) -> (u64, u64) {
        self.lock()
            .counters
            .get(&(policy.to_owned(), scope.to_owned()))
            .map_or((0, 0), |c| (c.cost, c.ops))
    }

    pub(super) fn open(&self, policy: &str, scope: &str) -> u64 {
        self.lock()
            .counters
            .get(&(policy.to_owned(), scope.to_owned()))
            .map_or(0, |c| c.open)
    }
}

impl Inner {
    /// Forget what has outlived what it accounts for (as Redis TTLs do): only what is due,
    /// in expiry order, so a reservation costs the same however many records are kept.
    fn prune(&mut self, now: u64) {
        while let Some(Reverse((at, _))) = self.expiry.peek()
            && *at <= now
        {
            let Some(Reverse((_, item))) = self.expiry.pop() else {
                break;
            };
            match item {
                Expiring::Counter(policy, scope) => {
                    let key = (policy, scope);
                    match self.counters.get(&key).map(|c| c.expires_at) {
                        Some(at) if at <= now => {
                            self.counters.remove(&key);
                        }
                        // Made to live longer since: its one entry moves to its end.
                        Some(at) => self.expire_at(at, Expiring::Counter(key.0, key.1)),
                        None => {}
                    }
                }
                Expiring::Session(policy, id) => {
                    let key = (policy, id);
                    if self.sessions.get(&key).is_some_and(|s| s.expires_at <= now) {
                        self.sessions.remove(&key);
                    }
                }
                Expiring::Reservation(policy, op) => {
                    let key = (policy, op);
                    // Only a record still due (not extended since) is forgotten.
                    if self
                        .reservations
                        .get(&key)
                        .is_none_or(|r| r.expires_at > now)
                    {
                        continue;
                    }
                    let Some(rec) = self.reservations.remove(&key) else {
                        continue;
                    };
                    if rec.state == State::Open {
                        self.open_move(
                            &key.0,
                            (rec.answer.window.valid_until, op),
                            (0, B256::ZERO),
                        );
                    }
                    let landing = (key.0, rec.landing_key);
                    if let Some(ops) = self.landings.get_mut(&landing) {
                        ops.retain(|o| *o != op);
                        if ops.is_empty() {
                            self.landings.remove(&landing);
                        }
                    }
                }
            }
        }
    }

    /// The records of nonce `landing` (a policy and a landing key), with the op keys they are
    /// kept under.
    fn records_of<'a>(
        &'a self,
        landing: &'a PolicyKey,
    ) -> impl Iterator<Item = (B256, &'a Record)> {
        self.landings
            .get(landing)
            .into_iter()
            .flatten()
            .filter_map(|op| Some((*op, self.reservations.get(&(landing.0.clone(), *op))?)))
    }

    /// A counter's lifetime only ever grows (as `EXPIRE … GT` in Redis); a counter gone is not
    /// brought back. A counter has one entry in the expiry heap, made with it and moved to its
    /// end when it comes due (`prune`): an end that moves every second (a budget without a
    /// period lives ten years from now; the deposit's scope as long as the latest signature)
    /// would otherwise add an entry per reservation, each kept until its own far end.
    fn extend_counter(&mut self, policy: &str, s: &Scope) {
        let key = (policy.to_owned(), s.name.clone());
        let Some(c) = self.counters.get_mut(&key) else {
            return;
        };
        if s.expires_at > c.expires_at {
            // (A new counter's end is 0: it has no entry yet.)
            let scheduled = c.expires_at != 0;
            c.expires_at = s.expires_at;
            if !scheduled {
                self.expire_at(s.expires_at, Expiring::Counter(key.0, key.1));
            }
        }
    }

    fn expire_at(&mut self, at: u64, item: Expiring) {
        self.expiry.push(Reverse((at, item)));
    }

    /// Move an entry of `policy`'s open index from `from` to `to`; a zero validUntil stands
    /// for "none" on either side.
    fn open_move(&mut self, policy: &str, from: (u64, B256), to: (u64, B256)) {
        let open = self.open_index.entry(policy.to_owned()).or_default();
        if from.0 != 0 {
            open.remove(&from);
        }
        if to.0 != 0 {
            open.insert(to);
        }
    }

    /// Charge back a released reservation whose operation landed after all, once.
    fn charge_back(&mut self, key: &PolicyKey, actual: u64) -> bool {
        let Some(rec) = self
            .reservations
            .get_mut(key)
            .filter(|r| r.state == State::Released)
        else {
            return false;
        };
        rec.state = State::Settled;
        let (scopes, session, spend) = (rec.scopes.clone(), rec.session, rec.spend.clone());
        for scope in scopes {
            if let Some(c) = self.counters.get_mut(&(key.0.clone(), scope)) {
                c.cost = c.cost.saturating_add(actual);
                c.ops = c.ops.saturating_add(1);
            }
        }
        if let Some(state) = session.and_then(|id| self.sessions.get_mut(&(key.0.clone(), id))) {
            for (token, amount) in spend {
                let total = state.spent.entry(token).or_default();
                *total = total.saturating_add(amount);
            }
        }
        true
    }

    /// Settle (`Some(actual)`) or release (`None`) an open reservation, once.
    fn close(&mut self, key: &PolicyKey, actual: Option<u64>) -> bool {
        let Some(rec) = self
            .reservations
            .get_mut(key)
            .filter(|r| r.state == State::Open)
        else {
            return false;
        };
        rec.state = if actual.is_some() {
            State::Settled
        } else {
            State::Released
        };
        let valid_until = rec.answer.window.valid_until;
        let (reserved, scopes) = (rec.cost, rec.scopes.clone());
        let (session, spend) = (rec.session, rec.spend.clone());
        self.open_move(&key.0, (valid_until, key.1), (0, B256::ZERO));
        for scope in scopes {
            if let Some(c) = self.counters.get_mut(&(key.0.clone(), scope)) {
                c.cost = c
                    .cost
                    .saturating_sub(reserved)
                    .saturating_add(actual.unwrap_or(0));
                c.open = c.open.saturating_sub(reserved);
                if actual.is_none() {
                    c.ops = c.ops.saturating_sub(1);
                }
            }
        }
        if actual.is_none()
            && let Some(state) = session.and_then(|id| self.sessions.get_mut(&(key.0.clone(), id)))
        {
            for (token, amount) in spend {
                if let Some(total) = state.spent.get_mut(&token) {
                    *total = total.saturating_sub(amount);
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::userop::paymaster_data::ValidityWindow;

    /// A budget whose end moves every second (one without a period lives ten years from now)
    /// keeps one entry in the expiry heap, not one per reservation: each would stay ten years.
    #[test]
    fn a_counter_whose_end_moves_keeps_one_expiry_entry() {
        const NOW: u64 = 1_800_000_000;
        const TEN_YEARS: u64 = 10 * 365 * 86_400;
        let ledger = MemoryLedger::new();
        let reservation = |i: u64, now: u64| Reservation {
            policy: "p".into(),
            op_key: keccak256(i.to_be_bytes()),
            landing_key: keccak256([i.to_be_bytes(), 1u64.to_be_bytes()].concat()),
            cost_gwei: 1,
            scopes: vec![Scope {
                name: "policy".into(),
                rule: "p.budgets.policy".into(),
                cost_limit: None,
                ops_limit: None,
                expires_at: now + TEN_YEARS,
                resets_at: None,
                starts_at: None,
            }],
            user_op_hashes: vec![keccak256([i.to_be_bytes(), 2u64.to_be_bytes()].concat())],
            answer: PaymasterData {
                window: ValidityWindow {
                    valid_after: now - 60,
                    valid_until: now + 10,
                },
                signature: [0; 65],
            },
            session: None,
            expires_at: now + 10 + super::super::GRACE_SECS,
        };
        // A reservation a second for two hours: each forgotten an hour after its end.
        for i in 0..7_200 {
            let now = NOW + i;
            assert_eq!(
                ledger.reserve_now(&reservation(i, now), now),
                Outcome::Reserved
            );
        }
        let inner = ledger.lock();
        let counted = inner.reservations.len() + inner.counters.len() + inner.sessions.len();
        assert_eq!(inner.counters.len(), 1);
        assert!(
            inner.expiry.len() <= counted,
            "{} expiry entries for {counted} things that expire",
            inner.expiry.len()
        );
        let end = inner
            .counters
            .get(&("p".to_owned(), "policy".to_owned()))
            .map(|c| c.expires_at);
        assert_eq!(
            end,
            Some(NOW + 7_199 + TEN_YEARS),
            "its end moved with each"
        );
    }
}
