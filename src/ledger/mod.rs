//! The budget ledger: every signed sponsorship first reserves its worst-case cost in each
//! budget scope that applies (the session, the sender per period, the policy per period), in
//! one atomic step, so no burst of concurrent requests can overspend (DESIGN §1, §5).
//!
//! Amounts are kept in gwei, rounded up from wei (a reservation over-counts by less than one
//! gwei, never under-counts; budgets up to 9·10⁶ ether stay exact in Redis and Lua numbers).
//! Periods are fixed UTC windows, `floor(now / period)`. A repeated request for the same
//! operation returns the answer already signed for it and reserves nothing more, unless that
//! signature expires within [`REFRESH_MARGIN_SECS`]: then the reservation is extended to a
//! fresh answer (never released while a signature of it is still valid).
//!
//! Under a session the same atomic step first refuses a revoked session (so a revocation that
//! has answered is never followed by a signature, nor by an answer given before it: a replica
//! may sponsor from a copy of the grant that predates the revocation) and records the
//! operation's ERC-20 spending against the session's caps (uint256 totals, kept as decimal
//! strings).
//!
//! A reservation is closed once: settled to the `actualGasCost` of its `UserOperationEvent`
//! (the chain watcher), or released when a confirmed block is past its `validUntil` without
//! it (the operation can no longer land). Events are matched by (EntryPoint, sender, nonce), not
//! by our hash alone (DESIGN §3, §8): when a nonce lands, every other reservation of it is
//! released, and a cost is never forgotten because the EntryPoint hashed the op differently.
//! Without a chain watcher reservations stay at their worst case (DESIGN: "settle at worst
//! case"): budgets never under-count. Releasing also gives back the token spending.
//!
//! [`memory`] and [`redis`] implement the same semantics; `tests/it/ledger.rs` runs one suite
//! against both.

mod batch;
pub mod memory;
pub mod redis;

/// How the Redis ledger gathers a policy's reservations into calls, and how many it holds
/// (`ledger::batch`; the same again for its checks).
pub use batch::{MAX_BATCH, MAX_IN_FLIGHT, MAX_WAITING};

/// How many calls the Redis ledger made and what they carried ([`Ledger::call_counts`]).
pub use batch::CallCounts;

use std::collections::BTreeMap;

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::sol_types::SolValue;

use crate::session::{SessionGrant, StoreError};
use crate::userop::paymaster_data::PaymasterData;

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
    /// Stable name for errors and keys, e.g. `sender:0x…:20451`, `policy:20451`, or for a
    /// policy of several chains `policy:c8453:20451`.
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
    /// Unix time the current window of a periodic budget began (`None`: no period). On a Redis
    /// a version before 0.3 served, the Redis ledger also reads a sender's counter as such a
    /// version kept it, in windows begun before the first replica of 0.3 ran and in budgets
    /// without a period (`RedisLedger::connect`).
    pub starts_at: Option<u64>,
}

impl Scope {
    /// The cost a reservation may bring this scope's counter to: its limit, at most
    /// [`MAX_EXACT_GWEI`]; none without a limit (then only what is open is held to it).
    pub fn cost_cap(&self) -> Option<u64> {
        self.cost_limit.map(|l| l.min(MAX_EXACT_GWEI))
    }
}

/// The name of the budget scope of a session whose counter is a key of its own (a grant of
/// version 1; a record by id lists it as one byte, see `lib.lua`).
pub fn session_scope_name(id: B256) -> String {
    format!("session:{id}")
}

/// The name of the budget scope of session `grant`. Where its counter is shared
/// ([`SessionGrant::shared_budget`]), `session:<end day>:0x<id>`: in Redis a field of one hash
/// of its policy's sessions that end that UTC day (`ledger::redis::counter_slot`), so a new
/// session makes no key and sets no TTL, and the sessions of one call are read in one command;
/// else [`session_scope_name`]. Fixed for the grant, so every replica counts it in one place.
pub fn session_budget_scope(grant: &SessionGrant) -> String {
    if grant.shared_budget {
        format!(
            "session:{}:{}",
            crate::session::end_day(grant.valid_until),
            grant.session_id
        )
    } else {
        session_scope_name(grant.session_id)
    }
}

/// How long before its `validUntil` a stored answer is still handed out again. A repeat of an
/// operation whose signature expires sooner gets a fresh answer instead (when that one is valid
/// longer), and the reservation is extended to it in the same atomic step: one charge covers
/// both signatures (they are for one nonce, which lands once), kept until the later expires.
pub const REFRESH_MARGIN_SECS: u64 = 30;

/// Most open reservations one (EntryPoint, sender, nonce) may have at once under one session:
/// only one of them can land, so more would only hold its budget (variants of one operation
/// with other fees or paymaster gas, made by a stranger who saw one session proof). See also
/// [`MAX_OPEN_PER_NONCE_ANY`].
pub const MAX_OPEN_PER_NONCE: usize = 4;

/// Most open reservations one (EntryPoint, sender, nonce) may have at once, whatever the
/// session: they share one Redis key, which each reservation reads and writes whole. Anyone
/// with an API key could hold a sender's nonce with this many (for a signature's lifetime);
/// fewer would make that cheaper, more would let one key grow.
pub const MAX_OPEN_PER_NONCE_ANY: usize = 16;

/// Most live records one (EntryPoint, sender, nonce) keeps, whatever their state: released and
/// landed ones stay until their signature's end plus [`GRACE_SECS`] (a late event still finds
/// them), and every reservation, stub, settlement and release of the nonce reads them all.
/// Without the cap, a client cycling short-lived variants of one operation (released as they
/// expire, their budget given back) would grow that work without bound. A new record that
/// would pass it makes room: the released records of the earliest validUntil are dropped (only
/// a reorg deeper than the watcher's confirmations could still land one, and its event would
/// match no record); with none released it is refused ([`Outcome::NonceFull`]: at most
/// [`MAX_OPEN_PER_NONCE_ANY`] are open, so the nonce has landed). Dropping rather than refusing
/// keeps a stranger who fills someone's nonce from blocking it. `MAX_RECORDS` in `lib.lua`.
pub const MAX_RECORDS_PER_NONCE: usize = 64;

/// How many userOpHashes one reservation keeps: an answer that would pass it is a new
/// reservation, the old one kept aside, rather than one extended and a hash dropped (an answer
/// whose hash a record dropped would land unknown to it, and a client that ground another
/// operation of the nonce to the same 8 bytes would have that one settled in its place, see
/// settle.lua). `MAX_HASHES` in `lib.lua`.
pub const MAX_HASHES: usize = 8;

/// Budget counters stay below this many gwei (2^53 − 1), the largest integer Lua numbers hold
/// exactly: a reservation that would take a scope's cost past it (or past its limit) is refused
/// as an exhausted budget. A scope without a cost limit is refused only where its open
/// reservations would pass it: its cost counts up to it and stays there. (Its counter may live
/// as long as operations keep coming, as the deposit's does, and its lifetime's costs pass 2^53
/// gwei, nine million of the chain's coin; refusing on those refused every operation after.)
pub const MAX_EXACT_GWEI: u64 = (1 << 53) - 1;

/// A reservation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The policy: all keys of a reservation share its hash tag.
    pub policy: String,
    /// Idempotency key of the operation.
    pub op_key: B256,
    /// Key of `(chain, EntryPoint, sender, nonce)`: a nonce lands once, so settlement finds the
    /// reservations of a landed operation by it, whatever hash the EntryPoint computed
    /// (see [`landing_key`]).
    pub landing_key: B256,
    /// The userOpHashes the answer may land with: among the reservations of one nonce, the one
    /// whose hash the event names is the one that landed. One, or on EntryPoint v0.9 two: the
    /// same signature is valid inline and in the suffix, which the userOpHash leaves out.
    pub user_op_hashes: Vec<B256>,
    /// The signed answer: what a repeat of the operation gets back. Its `valid_until`: once a
    /// confirmed block is later, the op can never land.
    pub answer: PaymasterData,
    /// Worst-case cost, gwei.
    pub cost_gwei: u64,
    /// Scopes charged.
    pub scopes: Vec<Scope>,
    /// The session it is made under: its status is checked and its token spending recorded in
    /// the same atomic step.
    pub session: Option<SessionCharge>,
    /// Unix time the reservation record may be forgotten (signature expiry plus grace).
    pub expires_at: u64,
}

/// What a reservation under a session checks and records on the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCharge {
    /// The session.
    pub id: B256,
    /// Unix time the session's state may be forgotten (its end plus grace).
    pub expires_at: u64,
    /// ERC-20 amounts the operation moves or approves, per capped token.
    pub spend: Vec<TokenCharge>,
}

/// One capped token's amount in an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenCharge {
    /// The token.
    pub token: Address,
    /// What this operation moves or approves (summed over its calls).
    pub amount: U256,
    /// The session's cap on the total.
    pub limit: U256,
    /// The grant setting that decided, e.g. `session.permissions.spend[0]`.
    pub rule: String,
}

/// A token cap that would be exceeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendExceeded {
    /// The token.
    pub token: Address,
    /// The grant setting.
    pub rule: String,
    /// The cap.
    pub limit: U256,
    /// Signed for so far under the session (open and settled reservations).
    pub spent: U256,
    /// This operation's amount.
    pub requested: U256,
}

/// The key that identifies where an operation lands: `keccak256(abi.encode(chainId,
/// entryPoint, sender, nonce))`. `UserOperationEvent` carries sender and nonce, and the
/// EntryPoint accepts a (sender, nonce) once.
pub fn landing_key(chain_id: u64, entry_point: Address, sender: Address, nonce: U256) -> B256 {
    keccak256((U256::from(chain_id), entry_point, sender, nonce).abi_encode())
}

/// A `UserOperationEvent` of our paymaster, to settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landing {
    /// [`landing_key`] of the event's EntryPoint, sender and nonce.
    pub landing_key: B256,
    /// The event's userOpHash.
    pub user_op_hash: B256,
    /// `actualGasCost`, gwei (rounded up).
    pub actual_gwei: u64,
}

/// What settling one event did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// Reservations settled to the event's cost: 1 when its hash names one; every open
    /// reservation of the nonce when none matches (over-count rather than forget a cost).
    pub settled: usize,
    /// Other reservations of the same nonce, released: they can never land now.
    pub superseded: usize,
    /// Released reservations whose operation landed after all (their release went by a block
    /// time a reorg undid, or the watcher came late): their cost charged back.
    pub charged_back: usize,
    /// Whether one reservation's userOpHash equals the event's (a settled one too: the event
    /// read before).
    pub hash_matched: bool,
    /// Whether any reservation (open or closed) of the event's nonce is known.
    pub known: bool,
    /// Whether the reservations whose hash matched the event's were of more than one
    /// operation, so that each of them was charged (settle.lua: the Redis ledger keeps 8 bytes
    /// of each hash, which a client can grind on EntryPoint v0.9; the memory ledger keeps full
    /// hashes, which name one operation).
    pub ambiguous: bool,
}

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Worst-case cost, gwei.
    Cost,
    /// Operations.
    Ops,
}

impl Resource {
    /// As the reservation script names it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Cost => "cost",
            Self::Ops => "ops",
        }
    }

    /// As clients see it (`data.resource` of `budget_exhausted`).
    pub const fn wire_name(self) -> &'static str {
        match self {
            Self::Cost => "costGwei",
            Self::Ops => "ops",
        }
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A budget that would be exceeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// Scope name.
    pub scope: String,
    /// Setting that decided.
    pub rule: String,
    /// What ran out.
    pub resource: Resource,
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
    /// Already reserved earlier, and its signature is valid long enough (or it landed): the
    /// answer stored with it.
    Existing(PaymasterData),
    /// Over budget: nothing changed.
    Exhausted(Exhausted),
    /// The session was revoked (seen inside the atomic step): nothing changed.
    SessionRevoked,
    /// A session token cap would be exceeded: nothing changed.
    SpendExceeded(SpendExceeded),
    /// The operation's nonce already has [`MAX_OPEN_PER_NONCE`] open reservations under the
    /// session, or [`MAX_OPEN_PER_NONCE_ANY`] in all: nothing changed.
    NoncePending,
    /// The operation's nonce already keeps this many live records ([`MAX_RECORDS_PER_NONCE`]),
    /// none of them released, and this one would add one: nothing changed.
    NonceFull(u64),
}

/// Which of a ledger's calls ([`LedgerCalls`]): a policy's signing runs and its checks are
/// gathered apart (`ledger::batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// Signing runs: what reserves.
    Sign,
    /// Checks: stubs and explanations, which reserve nothing.
    Check,
}

impl CallKind {
    /// Its `kind` label value in `sp_ledger_calls_total` and `sp_ledger_call_operations_total`:
    /// `sign` or `check`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sign => "sign",
            Self::Check => "check",
        }
    }
}

/// The calls of Redis' reserve script a ledger made, by kind ([`Ledger::call_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerCalls {
    /// Its signing runs'.
    pub sign: CallCounts,
    /// Its checks'.
    pub check: CallCounts,
}

impl LedgerCalls {
    /// Each kind's counts.
    pub fn by_kind(&self) -> [(CallKind, CallCounts); 2] {
        [(CallKind::Sign, self.sign), (CallKind::Check, self.check)]
    }
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

    /// Settle an operation that landed: the open reservations of its nonce in `policies` are
    /// closed, the one whose userOpHash the event names at the event's cost and the others
    /// released. Closing is once: an event read twice settles nothing twice.
    pub async fn settle(
        &self,
        policies: &[String],
        landing: &Landing,
    ) -> Result<Settled, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.settle(policies, landing)),
            Self::Redis(l) => l.settle(policies, landing).await,
        }
    }

    /// Mark session `grant` revoked where reservations see it, until its end plus grace: every
    /// reservation after this returns [`Outcome::SessionRevoked`]. (In Redis where its budget
    /// is shared, reservations read its status in that budget's hash, which this writes too:
    /// [`session_budget_scope`] of the grant decides, as it decides where it is charged.)
    pub async fn revoke_session(&self, grant: &SessionGrant, now: u64) -> Result<(), StoreError> {
        let (policy, id) = (grant.policy.as_str(), grant.session_id);
        let expires_at = grant.valid_until.saturating_add(GRACE_SECS);
        match self {
            Self::Memory(m) => {
                m.revoke_session(policy, id, expires_at);
                Ok(())
            }
            Self::Redis(l) => {
                l.revoke_session(policy, id, &session_budget_scope(grant), expires_at, now)
                    .await
            }
        }
    }

    /// The token amounts signed for under a session (open and settled reservations).
    pub async fn session_spent(
        &self,
        policy: &str,
        session: B256,
    ) -> Result<BTreeMap<Address, U256>, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.session_spent(policy, session)),
            Self::Redis(l) => l.session_spent(policy, session).await,
        }
    }

    /// Whether a new session's budget is to be counted in its end day's shared hash
    /// ([`SessionGrant::shared_budget`], [`session_budget_scope`]): in Redis once every replica
    /// reads such grants (see [`redis::RedisLedger::refresh_record_kind`]); in memory always.
    pub fn sessions_share_budgets(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(l) => l.shared_session_budgets(),
        }
    }

    /// Read again whether records under a session may be written by id, and whether new
    /// sessions may share their budget's counter (Redis: see
    /// [`redis::RedisLedger::refresh_record_kind`]; in memory there is no earlier version).
    pub async fn refresh_record_kind(&self) {
        if let Self::Redis(l) = self {
            l.refresh_record_kind().await;
        }
    }

    /// Read again whether Redis would evict keys when full, or has, refusing reservations while
    /// so (see [`redis::RedisLedger::refresh_eviction`]; memory evicts nothing).
    pub async fn refresh_eviction(&self) {
        if let Self::Redis(l) = self {
            l.refresh_eviction().await;
        }
    }

    /// Whether reservations are refused because Redis would evict keys when full, or has.
    pub fn refusing_for_eviction(&self) -> bool {
        matches!(self, Self::Redis(l) if l.refusing_for_eviction())
    }

    /// The calls of Redis' reserve script made so far and the operations they carried
    /// ([`redis::RedisLedger::call_counts`]); none in memory, which makes no calls.
    pub fn call_counts(&self) -> Option<LedgerCalls> {
        match self {
            Self::Memory(_) => None,
            Self::Redis(l) => Some(l.call_counts()),
        }
    }

    /// Note that this replica serves `policies` (their ids), whose longest `max_validity` is
    /// `longest_validity` (s), before it signs under any of them and again on every policy poll:
    /// every replica's watcher then settles and releases their reservations, also one whose own
    /// set lacks them (see [`Self::watched_policies`]), and one without a cursor goes back far
    /// enough for their signatures ([`Self::longest_validity_noted`]). In memory, reserving
    /// notes the policy, and a watcher's cursor lives as long as its reservations.
    pub async fn serve_policies(
        &self,
        policies: &[String],
        longest_validity: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis(l) => l.serve_policies(policies, longest_validity, now).await,
        }
    }

    /// The longest `max_validity` (s) any replica noted serving ([`Self::serve_policies`]; 0
    /// in memory, where the watcher's cursor starts with the process, before any reservation).
    pub async fn longest_validity_noted(&self) -> Result<u64, StoreError> {
        match self {
            Self::Memory(_) => Ok(0),
            Self::Redis(l) => l.longest_validity_noted().await,
        }
    }

    /// The policies whose reservations a watcher settles and releases: `serving` (this
    /// replica's set), and every other policy a replica noted serving (Redis) or reserved under
    /// (memory), whose reservations may still be open or land. A watcher that read only its own
    /// set ignored the events of a policy another replica serves (during a rolling change of
    /// the set, or a replica refusing a new one), or one removed with operations in flight, and
    /// moved the shared cursor past them: their reservations were then released, the costs of
    /// operations that landed forgotten.
    pub async fn watched_policies(&self, serving: &[String]) -> Result<Vec<String>, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.watched_policies(serving)),
            Self::Redis(l) => l.watched_policies(serving).await,
        }
    }

    /// Stop watching the policies no replica noted serving for [`redis::RETIRED_AFTER_SECS`]
    /// (replicas note theirs on every policy poll) that have no open reservation left (no
    /// expiry index), other than `serving`; the ids retired. In memory, none is (a process
    /// reserves under as many policies as its sets ever held).
    pub async fn retire_policies(
        &self,
        serving: &[String],
        now: u64,
    ) -> Result<Vec<String>, StoreError> {
        match self {
            Self::Memory(_) => Ok(Vec::new()),
            Self::Redis(l) => l.retire_policies(serving, now).await,
        }
    }

    /// Note that this replica signs for `pairs` (EntryPoint, paymaster) on chain `chain_id`,
    /// and that no signature it makes before it notes them again can land after `until`
    /// (now, its longest validity, and a margin): before it signs for any of them, and again on
    /// every policy poll. Every replica's watcher of that chain then reads their events until
    /// a final block it read is later than `until` (see [`Self::watched_paymasters`],
    /// [`Self::forget_paymasters`]). Returns the time up to which the watchers are sure to
    /// read their events: `until`; in memory, where one process's pairs are its watcher's own,
    /// any time (`u64::MAX`).
    pub async fn serve_paymasters(
        &self,
        chain_id: u64,
        pairs: &[(Address, Address)],
        until: u64,
    ) -> Result<u64, StoreError> {
        match self {
            Self::Memory(_) => Ok(u64::MAX),
            Self::Redis(l) => {
                l.serve_paymasters(chain_id, pairs, until).await?;
                Ok(until)
            }
        }
    }

    /// The (EntryPoint, paymaster) pairs whose events a watcher of chain `chain_id` reads:
    /// `own` (its replica's), and every pair a replica noted signing for (Redis) that is not
    /// forgotten yet. Replicas share one cursor per chain: a watcher that read only its own
    /// pairs moved it past the events of a paymaster another replica signs for (a rolling
    /// change of `--paymaster-v0x`), or one this replica signed for before a restart with
    /// another, and their reservations were then released, the costs of operations that
    /// landed forgotten.
    pub async fn watched_paymasters(
        &self,
        chain_id: u64,
        own: &[(Address, Address)],
    ) -> Result<Vec<(Address, Address)>, StoreError> {
        match self {
            Self::Memory(_) => Ok(own.to_vec()),
            Self::Redis(l) => l.watched_paymasters(chain_id, own).await,
        }
    }

    /// Forget the pairs noted on chain `chain_id` whose signatures can land no later than
    /// `before`: the time of a final block the watchers have read, so every block one of
    /// them can land in was read with them. How many were forgotten.
    pub async fn forget_paymasters(&self, chain_id: u64, before: u64) -> Result<usize, StoreError> {
        match self {
            Self::Memory(_) => Ok(0),
            Self::Redis(l) => l.forget_paymasters(chain_id, before).await,
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

    /// The earliest `validUntil` of the open reservations of `policies`: a watcher starting
    /// without a cursor must read the chain from before the oldest of them was made.
    pub async fn oldest_open(&self, policies: &[String]) -> Result<Option<u64>, StoreError> {
        match self {
            Self::Memory(m) => Ok(m.oldest_open(policies)),
            Self::Redis(l) => l.oldest_open(policies).await,
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
