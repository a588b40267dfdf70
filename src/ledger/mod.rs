//! The budget ledger: every signed sponsorship first reserves its worst-case cost in each
//! budget scope that applies (the session, the sender per period, the policy per period), in
//! one atomic step, so no burst of concurrent requests can overspend (DESIGN §1, §5).
//!
//! Amounts are kept in gwei, rounded up from wei (a reservation over-counts by less than one
//! gwei, never under-counts; budgets up to 9·10⁶ ether stay exact in Redis and Lua numbers).
//! Periods are fixed UTC windows, `floor(now / period)`. A repeated request for the same
//! operation returns the answer already signed for it and reserves nothing more.
//!
//! A reservation is closed once: settled to the `actualGasCost` of its `UserOperationEvent`
//! (the chain watcher), or released when a confirmed block is past its `validUntil` without
//! it (the operation can no longer land). Without a chain watcher it stays at its worst case
//! (DESIGN: "settle at worst case"): budgets never under-count.
//!
//! [`memory`] and [`redis`] implement the same semantics; `tests/it/ledger.rs` runs one suite
//! against both.

pub mod memory;
pub mod redis;

use alloy::primitives::{B256, U256};

use crate::session::StoreError;

/// How long reservation records and budget counters outlive the window they count.
pub const GRACE_SECS: u64 = 3600;

/// One wei amount in gwei, rounded up.
pub fn wei_to_gwei_ceil(wei: U256) -> u64 {
    let gwei = wei.div_ceil(U256::from(1_000_000_000u64));
    u64::try_from(gwei).unwrap_or(u64::MAX)
}

/// A budget limit in gwei, rounded down (never allows more than configured).
pub fn wei_to_gwei_floor(wei: U256) -> u64 {
    u64::try_from(wei / U256::from(1_000_000_000u64)).unwrap_or(u64::MAX)
}

/// One budget counter an operation is charged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Stable name for errors and keys, e.g. `sender:0x…:20451` or `policy:20451`.
    pub name: String,
    /// Which setting it comes from, e.g. `mint.budgets.sender`.
    pub rule: String,
    /// Cost limit, gwei.
    pub cost_limit: Option<u64>,
    /// Operation count limit.
    pub ops_limit: Option<u64>,
    /// Unix time the counter may be forgotten (end of its window or session, plus grace).
    pub expires_at: u64,
    /// Unix time a periodic budget starts afresh (`None`: it never resets).
    pub resets_at: Option<u64>,
}

/// A reservation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The policy: all keys of a reservation share its hash tag.
    pub policy: String,
    /// Idempotency key of the operation.
    pub op_key: B256,
    /// The userOpHash the operation will have on chain (settlement finds it by this).
    pub user_op_hash: B256,
    /// The signature's validUntil: once a confirmed block is later, the op can never land.
    pub valid_until: u64,
    /// Worst-case cost, gwei.
    pub cost_gwei: u64,
    /// Scopes charged.
    pub scopes: Vec<Scope>,
    /// The answer to return for a repeat of this operation.
    pub payload: String,
    /// Unix time the reservation record may be forgotten (signature expiry plus grace).
    pub expires_at: u64,
}

/// A budget that would be exceeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// Scope name.
    pub scope: String,
    /// Setting that decided.
    pub rule: String,
    /// `cost` (gwei) or `ops`.
    pub resource: String,
    /// The limit.
    pub limit: u64,
    /// Used so far.
    pub used: u64,
    /// This operation's amount.
    pub requested: u64,
}

/// What a reservation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Reserved in every scope (or, checking only, would fit).
    Reserved,
    /// Already reserved earlier: the stored answer.
    Existing(String),
    /// Over budget: nothing changed.
    Exhausted(Exhausted),
}

/// Where budgets are kept.
#[derive(Debug)]
pub enum Ledger {
    /// In this process (embedded default).
    Memory(memory::MemoryLedger),
    /// Redis (shared by replicas; runs on Redis Cluster).
    Redis(redis::RedisLedger),
}

impl Ledger {
    /// Reserve `r` atomically in every scope, or report the first exhausted one. With
    /// `check_only`, change nothing (ERC-7677 stub data).
    pub async fn reserve(
        &self,
        r: &Reservation,
        check_only: bool,
        now: u64,
    ) -> Result<Outcome, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.reserve(r, check_only, now)),
            Self::Redis(l) => l.reserve(r, check_only, now).await,
        }
    }

    /// Settle the reservation of `user_op_hash` to `actual_gwei`. `false` if unknown (not ours,
    /// or the record expired) or already closed: settling twice changes nothing.
    /// `policies` are the ids whose reservations may hold it.
    pub async fn settle(
        &self,
        policies: &[String],
        user_op_hash: B256,
        actual_gwei: u64,
    ) -> Result<bool, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.close(user_op_hash, Some(actual_gwei))),
            Self::Redis(l) => l.settle(policies, user_op_hash, actual_gwei).await,
        }
    }

    /// Release every open reservation of `policies` whose `validUntil` is before
    /// `confirmed_time` (a confirmed block's timestamp). Returns how many were released.
    pub async fn release_expired(
        &self,
        policies: &[String],
        confirmed_time: u64,
    ) -> Result<usize, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.release_expired(policies, confirmed_time)),
            Self::Redis(l) => l.release_expired(policies, confirmed_time).await,
        }
    }

    /// The part of a scope's used cost (gwei) that is still open reservations at their worst
    /// case (the rest is settled, actual cost).
    pub async fn open(&self, policy: &str, scope: &str) -> Result<u64, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.open(policy, scope)),
            Self::Redis(l) => l.open(policy, scope).await,
        }
    }

    /// Used cost (gwei) and ops of a scope of `policy`, for status and tests.
    pub async fn usage(&self, policy: &str, scope: &str) -> Result<(u64, u64), StoreError> {
        match self {
            Self::Memory(m) => Ok(m.usage(policy, scope)),
            Self::Redis(l) => l.usage(policy, scope).await,
        }
    }
}
