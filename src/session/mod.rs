//! Session grants: what a session key may do for an account, stored where every replica sees
//! it (DESIGN §5). A grant can only narrow its policy: the effective allow-list is policy ∩
//! grant, budgets the smaller of both. Revocation is a status change that the very next
//! request reads; the ledger keeps its own copy of it (and the session's token totals) where
//! the reservation script sees it, so a request that read the grant before a revocation is
//! still refused after it, as is one served from a replica's copy of the grant.
//!
//! - [`grant`]: the model, parsing of admin requests (errors with JSON paths), narrowing
//!   checks against the policy, and the per-operation checks.
//! - [`memory`] and [`redis`]: the two stores behind [`SessionStore`]; `codec`: a grant as Redis
//!   stores it; [`cache`]: the copies of grants a replica keeps for sponsorships.

pub(crate) mod cache;
mod codec;
pub mod grant;
pub mod memory;
pub mod redis;

use std::sync::Arc;

use alloy::primitives::{Address, B256};

pub use self::grant::{SessionGrant, SessionStatus};

/// How long a grant is kept after it ends (`validUntil`): the admin API still shows an ended
/// grant for a day; then both stores forget it (its id is unknown, refused like any unknown id).
pub const RETAIN_SECS: u64 = 86_400;

/// Whether `grant` is past the time it is kept.
fn forgotten(grant: &SessionGrant, now: u64) -> bool {
    grant.valid_until.saturating_add(RETAIN_SECS) < now
}

/// A store failure: the request fails closed (no signature), retryably.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Redis unreachable, too slow, or answered an error.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// A stored record does not parse (written by an incompatible version?).
    #[error("session {0} is stored in an unreadable form")]
    Corrupt(B256),
}

/// Where a sponsorship's grant came from (`sp_session_grant_reads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantSource {
    /// This replica's copy ([`cache`]).
    Copy,
    /// The store (Redis, or this process' memory), including ids it does not know.
    Store,
}

impl GrantSource {
    /// Its label value: `copy` or `store`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Store => "store",
        }
    }
}

/// One page of an account's sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Sessions, oldest first.
    pub sessions: Vec<SessionGrant>,
    /// Pass as `cursor` for the next page; `None` on the last.
    pub next_cursor: Option<ListCursor>,
}

/// Where a listing of an account's grants resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListCursor {
    /// After this many entries (the cursors before 0.3.5 gave, still taken; and in Redis, within
    /// the grants 0.1 wrote, which come first). Entries that leave meanwhile shift it.
    Offset(u64),
    /// After this grant's place in the account's order: creation time, then the time it is
    /// forgotten, then id (as its Redis index member orders it). Grants that leave meanwhile
    /// (ended ones leave as any grant is created) shift nothing.
    After(ListPlace),
}

/// A grant's place in its account's listing (see [`ListCursor::After`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListPlace {
    created_at: u32,
    forget_at: u32,
    id: B256,
}

impl ListPlace {
    /// `grant`'s place.
    pub fn of(grant: &SessionGrant) -> Self {
        let u32_of = |t: u64| u32::try_from(t).unwrap_or(u32::MAX);
        Self {
            created_at: u32_of(grant.created_at),
            forget_at: u32_of(grant.valid_until.saturating_add(RETAIN_SECS)),
            id: grant.session_id,
        }
    }

    /// Its 40 bytes, as they follow the account in its index member.
    pub fn to_bytes(self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..4].copy_from_slice(&self.created_at.to_be_bytes());
        out[4..8].copy_from_slice(&self.forget_at.to_be_bytes());
        out[8..].copy_from_slice(self.id.as_slice());
        out
    }

    /// The place of its 40 bytes (as they follow the account in an index member).
    pub(crate) fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; 40] = b.try_into().ok()?;
        Some(Self {
            created_at: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            forget_at: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            id: B256::from_slice(&b[8..]),
        })
    }
}

/// A `cursor` that is neither an offset nor a place this API gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a cursor is a `nextCursor` this API gave (or an offset)")]
pub struct InvalidCursor;

impl std::str::FromStr for ListCursor {
    type Err = InvalidCursor;

    /// A decimal offset, or `0x` and a place's 80 hex digits.
    fn from_str(s: &str) -> Result<Self, InvalidCursor> {
        if let Some(hex) = s.strip_prefix("0x") {
            let bytes = alloy::hex::decode(hex).map_err(|_| InvalidCursor)?;
            return ListPlace::from_bytes(&bytes)
                .map(Self::After)
                .ok_or(InvalidCursor);
        }
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidCursor);
        }
        // (Redis takes an offset up to i64::MAX.)
        s.parse::<u64>()
            .ok()
            .filter(|&n| i64::try_from(n).is_ok())
            .map(Self::Offset)
            .ok_or(InvalidCursor)
    }
}

impl std::fmt::Display for ListCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Offset(n) => write!(f, "{n}"),
            Self::After(place) => write!(f, "0x{}", alloy::hex::encode(place.to_bytes())),
        }
    }
}

/// Where grants live: in this process (embedded default) or in Redis (shared by replicas).
#[derive(Debug)]
pub enum SessionStore {
    /// In memory: one process only.
    Memory(memory::MemorySessions),
    /// Redis.
    Redis(redis::RedisSessions),
}

/// What [`SessionStore::create_within`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Stored.
    Created,
    /// The id is taken: nothing was written over.
    Exists,
    /// Its policy already has this many live grants, its most: nothing was stored.
    Full {
        /// The policy's live grants.
        live: u64,
    },
}

/// The UTC day (days since the epoch) in which a grant valid until `valid_until` ends: a
/// policy's live grants are counted by it ([`SessionStore::create_within`]), and a shared
/// session budget's counter in its hash ([`crate::ledger::session_budget_scope`]).
pub(crate) fn end_day(valid_until: u64) -> u64 {
    valid_until / 86_400
}

impl SessionStore {
    /// Store a new grant; `false` when the id is taken (nothing is overwritten).
    pub async fn create(&self, grant: &SessionGrant) -> Result<bool, StoreError> {
        Ok(self.create_within(grant, None).await? == Created::Created)
    }

    /// Store a new grant unless its policy already has `most` grants live (created and not
    /// ended: a revoked one counts until its `validUntil`, and a grant counts until the end
    /// of the UTC day it ends in); `None`: no bound. Every grant is counted, bound or not, so
    /// that a bound set later counts those created before it.
    pub async fn create_within(
        &self,
        grant: &SessionGrant,
        most: Option<u64>,
    ) -> Result<Created, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.create(grant, most)),
            Self::Redis(r) => r.create(grant, most).await,
        }
    }

    /// The grant with this id.
    pub async fn get(&self, id: B256) -> Result<Option<SessionGrant>, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.get(id)),
            Self::Redis(r) => r.get(id).await,
        }
    }

    /// The grant with this id, for a sponsorship, and where it came from: from Redis, a copy
    /// of this replica's when it is recent enough ([`cache`]: the ledger step, not this read,
    /// refuses a revoked session).
    pub async fn get_for_sponsorship(
        &self,
        id: B256,
    ) -> Result<(Option<Arc<SessionGrant>>, GrantSource), StoreError> {
        match self {
            Self::Memory(m) => Ok((m.get(id).map(Arc::new), GrantSource::Store)),
            Self::Redis(r) => r.get_for_sponsorship(id).await,
        }
    }

    /// Mark revoked; the updated grant, or `None` if unknown. Idempotent.
    pub async fn revoke(&self, id: B256) -> Result<Option<SessionGrant>, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.revoke(id)),
            Self::Redis(r) => r.revoke(id).await,
        }
    }

    /// An account's sessions, oldest first, `limit` at a time from `cursor`.
    pub async fn list_by_account(
        &self,
        account: Address,
        cursor: ListCursor,
        limit: usize,
    ) -> Result<Page, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.list_by_account(account, cursor, limit)),
            Self::Redis(r) => r.list_by_account(account, cursor, limit).await,
        }
    }
}
