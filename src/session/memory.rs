//! Sessions in this process: the embedded default (`serve` without Redis).

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use alloy::primitives::{Address, B256};

use super::{ListCursor, ListPlace, Page, SessionGrant, SessionStatus, forgotten};
use crate::clock::unix_now;

/// Grants by id, and per account in creation order.
#[derive(Debug, Default)]
pub struct MemorySessions {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<B256, SessionGrant>,
    by_account: BTreeMap<Address, Vec<B256>>,
    /// Grants held when every account's forgotten grants are next swept out.
    next_sweep: usize,
    /// Per policy, how many grants end on each UTC day (`super::end_day`): its live grants
    /// are those of today and after.
    live: HashMap<String, BTreeMap<u64, u64>>,
}

/// Fewest grants held before the first sweep.
const FIRST_SWEEP: usize = 1024;

impl Inner {
    /// Forget `account`'s grants past the time they are kept, and, each time the grants held
    /// have doubled since the last sweep, every account's (as the Redis store drops the ended
    /// grants of the index bucket a new grant goes into): a grant per account that never gets
    /// another one stays no longer than that. Listings resume after a grant's place
    /// ([`ListCursor::After`]), which nothing leaving shifts.
    fn prune(&mut self, account: Address, now: u64) {
        let by_id = &mut self.by_id;
        if let Some(ids) = self.by_account.get_mut(&account) {
            ids.retain(|id| {
                let gone = by_id.get(id).is_none_or(|g| forgotten(g, now));
                if gone {
                    by_id.remove(id);
                }
                !gone
            });
        }
        if by_id.len() < self.next_sweep.max(FIRST_SWEEP) {
            return;
        }
        by_id.retain(|_, g| !forgotten(g, now));
        self.by_account.retain(|_, ids| {
            ids.retain(|id| by_id.contains_key(id));
            !ids.is_empty()
        });
        self.next_sweep = by_id.len().saturating_mul(2);
    }
}

impl MemorySessions {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-written grant (inserts are single
        // operations), so a poisoned lock is still consistent.
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn create(&self, grant: &SessionGrant, most: Option<u64>) -> super::Created {
        let now = unix_now();
        let mut inner = self.write();
        inner.prune(grant.account, now);
        if inner.by_id.contains_key(&grant.session_id) {
            return super::Created::Exists;
        }
        let days = inner.live.entry(grant.policy.clone()).or_default();
        *days = days.split_off(&super::end_day(now));
        let live: u64 = days.values().sum();
        if most.is_some_and(|most| live >= most) {
            return super::Created::Full { live };
        }
        *days.entry(super::end_day(grant.valid_until)).or_default() += 1;
        inner.by_id.insert(grant.session_id, grant.clone());
        inner
            .by_account
            .entry(grant.account)
            .or_default()
            .push(grant.session_id);
        super::Created::Created
    }

    pub(super) fn get(&self, id: B256) -> Option<SessionGrant> {
        let inner = self.read();
        let grant = inner.by_id.get(&id)?;
        (!forgotten(grant, unix_now())).then(|| grant.clone())
    }

    pub(super) fn revoke(&self, id: B256) -> Option<SessionGrant> {
        let mut inner = self.write();
        let grant = inner.by_id.get_mut(&id)?;
        if forgotten(grant, unix_now()) {
            return None;
        }
        grant.status = SessionStatus::Revoked;
        Some(grant.clone())
    }

    pub(super) fn list_by_account(
        &self,
        account: Address,
        cursor: ListCursor,
        limit: usize,
    ) -> Page {
        let inner = self.read();
        let mut grants: Vec<&SessionGrant> = inner
            .by_account
            .get(&account)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|id| inner.by_id.get(id))
            .collect();
        grants.sort_by_key(|g| ListPlace::of(g));
        let start = match cursor {
            ListCursor::Offset(n) => usize::try_from(n).unwrap_or(usize::MAX).min(grants.len()),
            ListCursor::After(place) => grants.partition_point(|g| ListPlace::of(g) <= place),
        };
        let end = start.saturating_add(limit).min(grants.len());
        let page = &grants[start..end];
        let now = unix_now();
        Page {
            sessions: page
                .iter()
                .filter(|g| !forgotten(g, now))
                .map(|g| (*g).clone())
                .collect(),
            next_cursor: page
                .last()
                .filter(|_| end < grants.len())
                .map(|g| ListCursor::After(ListPlace::of(g))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionStatus;

    fn ended(i: u32) -> SessionGrant {
        let mut account = [0u8; 20];
        account[..4].copy_from_slice(&i.to_be_bytes());
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        SessionGrant {
            session_id: B256::from(id),
            account: Address::from(account),
            session_key: Address::repeat_byte(0x5e),
            chain_id: 1,
            policy: "p".into(),
            valid_after: 0,
            valid_until: 1_000_000,
            status: SessionStatus::Active,
            permissions: None,
            budget: None,
            created_at: 1,
            shared_budget: false,
        }
    }

    /// Accounts that each get one grant, ended: they leave once the grants held have doubled,
    /// not only when their own account gets another.
    #[test]
    fn ended_grants_of_other_accounts_are_swept() {
        let store = MemorySessions::new();
        for i in 0..5_000 {
            assert_eq!(
                store.create(&ended(i), None),
                super::super::Created::Created
            );
        }
        let inner = store.read();
        assert!(inner.by_id.len() <= FIRST_SWEEP, "{}", inner.by_id.len());
        assert_eq!(inner.by_account.len(), inner.by_id.len());
    }
}
