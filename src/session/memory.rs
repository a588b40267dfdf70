//! Sessions in this process: the embedded default (`serve` without Redis).

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use alloy::primitives::{Address, B256};

use super::{Page, SessionGrant, SessionStatus, forgotten};
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
}

impl Inner {
    /// Forget `account`'s grants past the time they are kept, as the Redis store does when the
    /// account gets a new grant (only that account's: another account's listing keeps its
    /// offsets).
    fn prune(&mut self, account: Address, now: u64) {
        let Some(ids) = self.by_account.get_mut(&account) else {
            return;
        };
        let by_id = &mut self.by_id;
        ids.retain(|id| {
            let gone = by_id.get(id).is_none_or(|g| forgotten(g, now));
            if gone {
                by_id.remove(id);
            }
            !gone
        });
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

    pub(super) fn create(&self, grant: &SessionGrant) -> bool {
        let mut inner = self.write();
        inner.prune(grant.account, unix_now());
        if inner.by_id.contains_key(&grant.session_id) {
            return false;
        }
        inner.by_id.insert(grant.session_id, grant.clone());
        inner
            .by_account
            .entry(grant.account)
            .or_default()
            .push(grant.session_id);
        true
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

    pub(super) fn list_by_account(&self, account: Address, cursor: u64, limit: usize) -> Page {
        let inner = self.read();
        let ids = inner
            .by_account
            .get(&account)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let start = usize::try_from(cursor).unwrap_or(usize::MAX).min(ids.len());
        let end = start.saturating_add(limit).min(ids.len());
        let now = unix_now();
        Page {
            sessions: ids[start..end]
                .iter()
                .filter_map(|id| inner.by_id.get(id))
                .filter(|g| !forgotten(g, now))
                .cloned()
                .collect(),
            next_cursor: (end < ids.len()).then_some(end as u64),
        }
    }
}
