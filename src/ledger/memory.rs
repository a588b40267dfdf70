//! The ledger in this process: the embedded default, with the Redis ledger's semantics.

use std::collections::HashMap;
use std::sync::Mutex;

use alloy::primitives::B256;

use super::{Exhausted, Outcome, Reservation};

/// Budget counters and reservation records behind one lock: a reservation is one critical
/// section, as the Redis script is one atomic step.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// `(policy, scope)` → the counter.
    counters: HashMap<(String, String), Counter>,
    /// `(policy, op key)` → the reservation.
    reservations: HashMap<(String, B256), Record>,
    /// userOpHash → `(policy, op key)`.
    by_user_op_hash: HashMap<B256, (String, B256)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counter {
    cost: u64,
    open: u64,
    ops: u64,
    expires_at: u64,
}

#[derive(Debug)]
struct Record {
    payload: String,
    cost: u64,
    scopes: Vec<String>,
    valid_until: u64,
    open: bool,
    expires_at: u64,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    pub(super) fn reserve(&self, r: &Reservation, check_only: bool, now: u64) -> Outcome {
        // A panic inside cannot leave a half-applied reservation (checks precede all writes).
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.counters.retain(|_, c| c.expires_at > now);
        inner.reservations.retain(|_, rec| rec.expires_at > now);
        if let Some(rec) = inner.reservations.get(&(r.policy.clone(), r.op_key)) {
            return Outcome::Existing(rec.payload.clone());
        }
        for s in &r.scopes {
            let Counter { cost, ops, .. } = inner
                .counters
                .get(&(r.policy.clone(), s.name.clone()))
                .copied()
                .unwrap_or_default();
            let exhausted = |resource: &str, limit, used, requested| {
                Outcome::Exhausted(Exhausted {
                    scope: s.name.clone(),
                    rule: s.rule.clone(),
                    resource: resource.into(),
                    limit,
                    used,
                    requested,
                })
            };
            if let Some(limit) = s
                .cost_limit
                .filter(|&l| cost.saturating_add(r.cost_gwei) > l)
            {
                return exhausted("cost", limit, cost, r.cost_gwei);
            }
            if let Some(limit) = s.ops_limit.filter(|&l| ops.saturating_add(1) > l) {
                return exhausted("ops", limit, ops, 1);
            }
        }
        if check_only {
            return Outcome::Reserved;
        }
        for s in &r.scopes {
            let c = inner
                .counters
                .entry((r.policy.clone(), s.name.clone()))
                .or_default();
            c.cost = c.cost.saturating_add(r.cost_gwei);
            c.open = c.open.saturating_add(r.cost_gwei);
            c.ops = c.ops.saturating_add(1);
            c.expires_at = s.expires_at;
        }
        inner.reservations.insert(
            (r.policy.clone(), r.op_key),
            Record {
                payload: r.payload.clone(),
                cost: r.cost_gwei,
                scopes: r.scopes.iter().map(|s| s.name.clone()).collect(),
                valid_until: r.valid_until,
                open: true,
                expires_at: r.expires_at,
            },
        );
        inner
            .by_user_op_hash
            .insert(r.user_op_hash, (r.policy.clone(), r.op_key));
        Outcome::Reserved
    }

    /// Settle (`Some(actual)`) or release (`None`) the reservation of `user_op_hash`, once.
    pub(super) fn close(&self, user_op_hash: B256, actual: Option<u64>) -> bool {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(key) = inner.by_user_op_hash.get(&user_op_hash).cloned() else {
            return false;
        };
        Self::close_record(&mut inner, &key, actual)
    }

    fn close_record(inner: &mut Inner, key: &(String, B256), actual: Option<u64>) -> bool {
        let Some(rec) = inner.reservations.get_mut(key).filter(|r| r.open) else {
            return false;
        };
        rec.open = false;
        let (reserved, scopes) = (rec.cost, rec.scopes.clone());
        for scope in scopes {
            if let Some(c) = inner.counters.get_mut(&(key.0.clone(), scope)) {
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
        true
    }

    pub(super) fn release_expired(&self, policies: &[String], confirmed_time: u64) -> usize {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let expired: Vec<(String, B256)> = inner
            .reservations
            .iter()
            .filter(|((policy, _), r)| {
                r.open && r.valid_until < confirmed_time && policies.contains(policy)
            })
            .map(|(k, _)| k.clone())
            .collect();
        expired
            .iter()
            .filter(|k| Self::close_record(&mut inner, k, None))
            .count()
    }

    pub(super) fn usage(&self, policy: &str, scope: &str) -> (u64, u64) {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner
            .counters
            .get(&(policy.to_owned(), scope.to_owned()))
            .map_or((0, 0), |c| (c.cost, c.ops))
    }

    pub(super) fn open(&self, policy: &str, scope: &str) -> u64 {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner
            .counters
            .get(&(policy.to_owned(), scope.to_owned()))
            .map_or(0, |c| c.open)
    }
}
