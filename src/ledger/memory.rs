//! The ledger in this process: the embedded default, with the Redis ledger's semantics.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Exhausted, Outcome, Reservation};

/// Budget counters and reservation records behind one lock: a reservation is one critical
/// section, as the Redis script is one atomic step.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// `(policy, scope)` → (cost gwei, ops, expires_at).
    counters: HashMap<(String, String), (u64, u64, u64)>,
    /// `(policy, op key)` → (payload, expires_at).
    reservations: HashMap<(String, alloy::primitives::B256), (String, u64)>,
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
        inner.counters.retain(|_, (_, _, exp)| *exp > now);
        inner.reservations.retain(|_, (_, exp)| *exp > now);
        if let Some((payload, _)) = inner.reservations.get(&(r.policy.clone(), r.op_key)) {
            return Outcome::Existing(payload.clone());
        }
        for s in &r.scopes {
            let (cost, ops, _) = inner
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
            let entry = inner
                .counters
                .entry((r.policy.clone(), s.name.clone()))
                .or_insert((0, 0, s.expires_at));
            entry.0 = entry.0.saturating_add(r.cost_gwei);
            entry.1 = entry.1.saturating_add(1);
            entry.2 = s.expires_at;
        }
        inner.reservations.insert(
            (r.policy.clone(), r.op_key),
            (r.payload.clone(), r.expires_at),
        );
        Outcome::Reserved
    }

    pub(super) fn usage(&self, policy: &str, scope: &str) -> (u64, u64) {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner
            .counters
            .get(&(policy.to_owned(), scope.to_owned()))
            .map_or((0, 0), |(c, o, _)| (*c, *o))
    }
}
