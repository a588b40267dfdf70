//! Settlement from the chain (DESIGN §1): read `UserOperationEvent`s whose paymaster is ours
//! from each EntryPoint, settle each reservation to its `actualGasCost` (found by the event's
//! EntryPoint, sender and nonce, see [`crate::ledger::Ledger::settle`]), and release the
//! reservations of operations that can no longer land.
//!
//! - Logs are read `confirmations` deep, in ranges of at most `max_range` blocks, halved
//!   while the node refuses (providers cap ranges and results) and grown back after successes.
//! - The cursor (last block read, and its hash) is kept in Redis when configured, so a restart
//!   resumes where it stopped. When the cursor block's hash changed (a reorg deeper than
//!   `confirmations`), the watcher reads again from further back; a block read twice settles
//!   nothing twice (a reservation closes once).
//! - Without a cursor (a first start against a Redis that already holds reservations, or an
//!   evicted key), it starts from the block of the oldest open reservation's time, not at the
//!   head: events of operations that landed before it started are not missed.
//! - Reservations are released only by the time of a block that cannot be reorganised away:
//!   the node's `finalized` block, or one `depth` blocks behind the head. If one is released and
//!   its operation lands after all, the event charges its cost back.
//! - Deposits are read on their own, so low-deposit alerts go on while logs fail.
//! - A range's last block is read before its logs and after (a block that changed fails the
//!   poll), and its blocks after the logs answer's last event, near the head, whose bloom may
//!   hold an event of ours are read again by hash (EIP-234): a load-balanced node's backend
//!   that lags may answer logs it does not have with none ([`LAG_CHECK_DEPTH`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::session::redis::RedisConn;
use alloy::eips::BlockNumberOrTag;
use alloy::primitives::{Address, B256, BloomInput, U256};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::Filter;
use alloy::sol_types::SolEvent;
use redis::AsyncCommands;

use crate::clock::unix_now;
use crate::ledger::{
    GRACE_SECS, Landing, MAX_HASHES, landing_key, wei_to_gwei_ceil, wei_to_gwei_floor,
};
use crate::sponsor::deposit::open_against_deposit;
use crate::sponsor::{ChainServed, Sponsor, VALID_AFTER_SKEW_SECS};
use crate::userop::IEntryPoint;
use crate::userop::IEntryPoint::UserOperationEvent;

/// Default for `--log-range`: the most blocks one `eth_getLogs` spans at first.
pub const DEFAULT_LOG_RANGE: u64 = 1000;

/// How far back the watcher reads again when the cursor block was reorganised away (at least:
/// back to the block after the final one when that is further back).
pub const REORG_REWIND: u64 = 128;

/// How far below the head a range's blocks are checked against what its logs answer held
/// (`Watcher::check_coverage`): a load-balanced RPC's backend that lags lacks the blocks near
/// the head, and may answer `eth_getLogs` over them with none rather than an error.
pub const LAG_CHECK_DEPTH: u64 = 256;

/// What can go wrong polling.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The node failed or refused.
    #[error("chain RPC: {0}")]
    Rpc(String),
    /// The cursor or ledger store failed.
    #[error("store: {0}")]
    Store(String),
    /// The node serves another chain than the service signs for: its events and deposits say
    /// nothing of ours, so nothing is read, settled or released until it does.
    #[error(
        "the chain RPC serves chain {serves}, not {expected}: nothing is settled or released until it does"
    )]
    WrongChain {
        /// What the node says.
        serves: u64,
        /// The configured chain.
        expected: u64,
    },
}

/// The last block read: its number and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// Block number.
    pub number: u64,
    /// Its hash when read (`None` from a cursor stored by an older version).
    pub hash: Option<B256>,
}

/// Where the watcher's cursor lives.
#[derive(Debug)]
pub enum Cursor {
    /// In this process (the embedded default).
    Memory(Mutex<Option<Mark>>),
    /// In Redis, under this key: survives restarts, shared by replicas.
    Redis(RedisConn, String),
}

impl Cursor {
    /// A cursor in Redis for `chain_id`.
    pub fn redis(conn: RedisConn, chain_id: u64) -> Self {
        Self::Redis(conn, format!("sp:watcher:{chain_id}:cursor"))
    }

    /// A cursor in this process.
    pub fn memory() -> Self {
        Self::Memory(Mutex::new(None))
    }

    async fn get(&self) -> Result<Option<Mark>, WatchError> {
        match self {
            Self::Memory(m) => Ok(*m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)),
            Self::Redis(conn, key) => {
                let mut conn = conn.clone();
                let text: Option<String> = conn
                    .get(key)
                    .await
                    .map_err(|e| WatchError::Store(e.to_string()))?;
                // `number:hash`, or a bare number from an older version.
                Ok(text.and_then(|t| {
                    let (number, hash) = t.split_once(':').unwrap_or((&t, ""));
                    Some(Mark {
                        number: number.parse().ok()?,
                        hash: hash.parse().ok(),
                    })
                }))
            }
        }
    }

    async fn set(&self, mark: Mark) -> Result<(), WatchError> {
        match self {
            Self::Memory(m) => {
                *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(mark);
                Ok(())
            }
            Self::Redis(conn, key) => {
                let mut conn = conn.clone();
                let text = match mark.hash {
                    Some(h) => format!("{}:{h}", mark.number),
                    None => mark.number.to_string(),
                };
                conn.set(key, text)
                    .await
                    .map_err(|e| WatchError::Store(e.to_string()))
            }
        }
    }
}

/// Which block's time releases reservations whose signatures expired unused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finality {
    /// The node's `finalized` block.
    Finalized,
    /// The block this many blocks behind the head.
    Depth(u64),
}

impl std::str::FromStr for Finality {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "finalized" => Ok(Self::Finalized),
            n => n
                .parse()
                .map(Self::Depth)
                .map_err(|_| format!("`{s}` is neither `finalized` nor a number of blocks")),
        }
    }
}

/// What one poll did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Poll {
    /// Last block read (the cursor afterwards).
    pub to_block: u64,
    /// Reservations settled to their event's cost.
    pub settled: usize,
    /// Events of ours that no reservation knows (not reserved, or forgotten).
    pub ignored: usize,
    /// Other reservations of a nonce that landed, released: they can never land.
    pub superseded: usize,
    /// Released reservations whose operation landed after all: their cost charged back.
    pub charged_back: usize,
    /// Reservations released as expired.
    pub released: usize,
    /// Whether the cursor block had been reorganised away (logs read again from further back).
    pub reorg: bool,
}

/// The settlement watcher of one chain.
#[derive(Debug)]
pub struct Watcher {
    provider: DynProvider,
    /// (EntryPoint, our paymaster) pairs: their deposits are read; their events, and those of
    /// every pair another replica signs for (`Ledger::watched_paymasters`), settled.
    pairs: Vec<(Address, Address)>,
    low_deposit: U256,
    confirmations: u64,
    finality: Finality,
    start_block: Option<u64>,
    max_range: u64,
    /// Blocks the next `eth_getLogs` spans (halved on refusals, grown back on successes).
    range: AtomicU64,
    cursor: Cursor,
    /// The configured chain.
    chain_id: u64,
    /// Shared with the other chains' watchers (and its slot in it): releases go by the earliest
    /// time every chain has read up to.
    clock: ReleaseClock,
    slot: usize,
}

/// Per chain watched by one process, the time up to which its logs were read and are final.
/// The ledger indexes open reservations by policy and expiry, not by chain, so a release is for
/// every chain at once: it goes by the earliest of these times, and not before every chain has
/// one. An operation that landed before that time on any chain has then been read and settled,
/// not released (a chain whose watcher lags holds every release back; one without a watcher,
/// all of them).
#[derive(Debug, Clone)]
pub struct ReleaseClock(Arc<Vec<AtomicU64>>);

impl ReleaseClock {
    /// A clock for `chains` watched chains (0 each: nothing read yet).
    pub fn new(chains: usize) -> Self {
        Self(Arc::new((0..chains).map(|_| AtomicU64::new(0)).collect()))
    }

    fn read_up_to(&self, slot: usize, time: u64) -> u64 {
        let Some(t) = self.0.get(slot) else {
            // A watcher outside the clock cannot vouch for its chain: release nothing.
            return 0;
        };
        t.store(time, Ordering::Relaxed);
        self.0
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }
}

fn rpc(e: impl std::error::Error + 'static) -> WatchError {
    WatchError::Rpc(super::client::error_chain(&e))
}

fn store(e: impl std::fmt::Display) -> WatchError {
    WatchError::Store(e.to_string())
}

impl Watcher {
    /// Watch the EntryPoints and paymasters of `chain`, one the pipeline serves, through
    /// `provider` (a node of that chain). Without a stored cursor, start at `start_block`, else
    /// before the oldest open reservation, else at the confirmed head. Releases go by the
    /// `finalized` block unless [`Self::with_finality`] says otherwise. From now on every
    /// sponsorship on `chain` is counted against its paymaster's deposit, which this watcher
    /// reads (see [`crate::sponsor::deposit`]).
    pub fn new(
        provider: DynProvider,
        chain: &ChainServed,
        confirmations: u64,
        start_block: Option<u64>,
        cursor: Cursor,
    ) -> Self {
        chain.deposits.track();
        Self {
            provider,
            pairs: chain.paymaster_pairs(),
            low_deposit: U256::ZERO,
            confirmations,
            finality: Finality::Finalized,
            start_block,
            max_range: DEFAULT_LOG_RANGE,
            range: AtomicU64::new(DEFAULT_LOG_RANGE),
            cursor,
            chain_id: chain.chain_id,
            clock: ReleaseClock::new(1),
            slot: 0,
        }
    }

    /// The chain it watches.
    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// The node must serve the configured chain before anything it says is believed: the
    /// paymaster has the same address on every chain, and another chain's silence would
    /// release reservations whose operations landed here. Checked on every poll (one
    /// `eth_chainId`): the endpoint behind a URL can change.
    pub async fn check_chain(&self) -> Result<(), WatchError> {
        let serves = self.provider.get_chain_id().await.map_err(rpc)?;
        if serves != self.chain_id {
            return Err(WatchError::WrongChain {
                serves,
                expected: self.chain_id,
            });
        }
        Ok(())
    }

    /// Report deposits below `wei` as low (`sp_paymaster_deposit_low`, and a warning).
    pub fn with_low_deposit(mut self, wei: U256) -> Self {
        self.low_deposit = wei;
        self
    }

    /// Release by this block's time.
    pub fn with_finality(mut self, finality: Finality) -> Self {
        self.finality = finality;
        self
    }

    /// Release by `clock`, shared with the watchers of the process's other chains, where this
    /// chain is `slot` (see [`ReleaseClock`]); alone, a watcher releases by its own chain.
    pub fn with_release_clock(mut self, clock: ReleaseClock, slot: usize) -> Self {
        self.clock = clock;
        self.slot = slot;
        self
    }

    /// At most `blocks` per `eth_getLogs` (at least 1).
    pub fn with_max_range(mut self, blocks: u64) -> Self {
        self.max_range = blocks.max(1);
        self.range = AtomicU64::new(self.max_range);
        self
    }

    /// Read each paymaster's deposit, and sum the open worst cases charged to it, for
    /// admission (see [`crate::sponsor::deposit`]) and the metrics.
    async fn read_deposits(&self, sponsor: &Sponsor) -> Result<(), WatchError> {
        let policies = watched_policies(sponsor).await?;
        let deposits = &sponsor
            .chain(self.chain_id)
            .map_err(|e| WatchError::Store(e.to_string()))?
            .deposits;
        for (entry_point, paymaster) in &self.pairs {
            let wei = IEntryPoint::new(*entry_point, &self.provider)
                .balanceOf(*paymaster)
                .call()
                .await
                .map_err(rpc)?;
            // What this replica counted before the sum is read: the sum includes it.
            let counted = deposits.counted(*entry_point);
            let open =
                open_against_deposit(sponsor.ledger(), &policies, self.chain_id, *entry_point)
                    .await
                    .map_err(store)?;
            let deposit = wei_to_gwei_floor(wei);
            deposits.observe(*entry_point, deposit, open, counted);
            let low = wei < self.low_deposit;
            if low {
                tracing::warn!(%entry_point, %paymaster, deposit = %wei, threshold = %self.low_deposit, "paymaster deposit is low: top it up");
            }
            // Alert well before admission starts refusing (at the deposit less the margin).
            if open > deposit / 2 {
                tracing::warn!(%entry_point, %paymaster, deposit_gwei = deposit, open_gwei = open, "open reservations hold over half of the paymaster's deposit: top it up");
            }
            sponsor.metrics().deposit(
                self.chain_id,
                &entry_point.to_string(),
                u128::try_from(wei).unwrap_or(u128::MAX),
                low,
                open,
            );
        }
        Ok(())
    }

    /// Deposits, then the confirmed blocks since the cursor (settle), then releases. A deposit
    /// failure does not stop settlement, nor a log failure the deposits.
    pub async fn poll_once(&self, sponsor: &Sponsor) -> Result<Poll, WatchError> {
        self.check_chain().await?;
        let serving = sponsor.policies().ids();
        let retired = sponsor
            .ledger()
            .retire_policies(&serving, unix_now())
            .await
            .map_err(store)?;
        for policy in retired {
            tracing::info!(%policy, "no replica noted serving this policy for a day and none of its reservations is open: the watchers leave it");
        }
        let deposits = self.read_deposits(sponsor).await;
        let (mut poll, policies) = self.read_logs(sponsor).await?;
        poll.released = self.release(sponsor, &policies, poll.to_block).await?;
        deposits?;
        Ok(poll)
    }

    /// The confirmed blocks since the cursor, settled; and the policies they were settled in,
    /// read after the head: every policy noted before an operation of it was signed, and so
    /// before it landed in a block up to the head, is among them.
    async fn read_logs(&self, sponsor: &Sponsor) -> Result<(Poll, Vec<String>), WatchError> {
        let head = self.provider.get_block_number().await.map_err(rpc)?;
        let confirmed = head.saturating_sub(self.confirmations);
        let watched = watched_policies(sponsor).await?;
        let policies = watched.as_slice();
        // Read after the head too: a pair is noted before anything is signed for it. This
        // replica's, and every pair a replica noted whose signatures may still land in a block
        // not read yet.
        let pairs = sponsor
            .ledger()
            .watched_paymasters(self.chain_id, &self.pairs)
            .await
            .map_err(store)?;
        let mut entry_points: Vec<Address> = pairs.iter().map(|p| p.0).collect();
        let mut paymasters: Vec<B256> = pairs.iter().map(|p| p.1.into_word()).collect();
        entry_points.sort();
        entry_points.dedup();
        paymasters.sort();
        paymasters.dedup();
        let mut poll = Poll::default();
        // The cursor's block, checked again once the first range after it is read: a
        // reorganisation deeper than the confirmations between the check below and that read
        // would have the range read on a fork that does not hold the cursor's block, and the
        // blocks it replaced never read again.
        let mut cursor_block = None;
        let mut from = match self.cursor.get().await? {
            Some(mark) if self.reorganised(mark).await? => {
                poll.reorg = true;
                // The fork may be deeper than the rewind, but not below the final block: read
                // again from there when it is further back, or a landed operation in the
                // blocks between would never be read (and its reservation released).
                let final_block = self.final_block_number(head).await?;
                let from = mark
                    .number
                    .saturating_sub(REORG_REWIND)
                    .min(final_block.saturating_add(1));
                tracing::warn!(
                    cursor = mark.number,
                    from,
                    "the watcher's last block was reorganised away: reading again from further back"
                );
                from
            }
            Some(mark) => {
                cursor_block = Some(mark);
                mark.number + 1
            }
            None => self.first_block(sponsor, policies, confirmed).await?,
        };
        poll.to_block = from.saturating_sub(1);
        while from <= confirmed && !pairs.is_empty() {
            let span = self.range.load(Ordering::Relaxed).clamp(1, self.max_range);
            let to = confirmed.min(from + span - 1);
            // The hash of the range's last block, read before its logs and again after: one
            // that changed between (a reorganisation deeper than the confirmations, or the
            // backends of a load-balanced RPC on different forks) would have the cursor name
            // one fork over logs read from another, and the reorganisation never seen.
            let before_block = self.block_header(to).await?;
            // (Each EntryPoint with each paymaster: a pair of another EntryPoint's paymaster
            // matches no landing key of ours.)
            let filter = Filter::new()
                .address(entry_points.clone())
                .event_signature(UserOperationEvent::SIGNATURE_HASH)
                .topic3(paymasters.clone())
                .from_block(from)
                .to_block(to);
            let logs = match self.provider.get_logs(&filter).await {
                Ok(logs) => {
                    self.range.store(
                        span.saturating_mul(2).min(self.max_range),
                        Ordering::Relaxed,
                    );
                    logs
                }
                // Providers refuse ranges or results over their caps with an error answer, each
                // with its own message: narrow the range until one block, then give up for
                // this poll. A transport failure (no answer) is not a refusal.
                Err(e) if span > 1 && e.as_error_resp().is_some() => {
                    tracing::info!(error = %e, from, to, span = span / 2, "eth_getLogs refused: halving the range");
                    self.range.store(span / 2, Ordering::Relaxed);
                    continue;
                }
                Err(e) => return Err(rpc(e)),
            };
            // The range's last block with an event in the answer: a node answered it, so it
            // held every block up to there.
            let last_event = logs.iter().filter_map(|l| l.block_number).max();
            for log in logs {
                let entry_point = log.address();
                let Ok(event) = log.log_decode::<UserOperationEvent>() else {
                    continue;
                };
                let e = event.inner.data;
                // Matched by (EntryPoint, sender, nonce): a nonce lands once, whatever hash
                // the EntryPoint computed (DESIGN §3).
                let landing = Landing {
                    landing_key: landing_key(self.chain_id, entry_point, e.sender, e.nonce),
                    user_op_hash: e.userOpHash,
                    actual_gwei: wei_to_gwei_ceil(e.actualGasCost),
                };
                let done = sponsor
                    .ledger()
                    .settle(policies, &landing)
                    .await
                    .map_err(store)?;
                // Already closed (read again after a rewind, or by another replica's watcher)
                // is not news; an event that no reservation of ours knows is.
                if done.settled + done.charged_back == 0 && !done.known {
                    poll.ignored += 1;
                } else if done.settled > 0 && !done.hash_matched {
                    tracing::warn!(user_op_hash = %e.userOpHash, sender = %e.sender, nonce = %e.nonce, settled = done.settled, "landed operation's hash matches none we reserved: settled every reservation of its nonce at its cost");
                }
                if done.ambiguous {
                    tracing::warn!(user_op_hash = %e.userOpHash, sender = %e.sender, nonce = %e.nonce, settled = done.settled, charged_back = done.charged_back, "reservations of several operations of one nonce carry the landed hash's first 8 bytes (ground on purpose, most likely): every one was charged");
                }
                if done.charged_back > 0 {
                    tracing::warn!(user_op_hash = %e.userOpHash, sender = %e.sender, nonce = %e.nonce, "an operation whose reservation was released landed after all: its cost is charged back");
                }
                poll.settled += done.settled;
                poll.superseded += done.superseded;
                poll.charged_back += done.charged_back;
            }
            // The cursor moves only after the range's settlements are stored, and only if the
            // range's last block is the one its logs were read under: otherwise the poll fails
            // (the watcher backs off and reports its lag) and the range is read again at the
            // next one (what was settled of it stays, closed once).
            let after = self.block_hash(to).await?;
            let before = before_block.hash;
            if after != before {
                return Err(WatchError::Rpc(format!(
                    "block {to} changed while the logs up to it were read ({before} then {after}): the range is read again"
                )));
            }
            if let Some(mark) = cursor_block.take()
                && self.reorganised(mark).await?
            {
                return Err(WatchError::Rpc(format!(
                    "the cursor's block {} changed while the range after it was read: the next poll reads again from further back",
                    mark.number
                )));
            }
            let after_last_event = last_event.map_or(from, |n| n.saturating_add(1));
            let checked = after_last_event.max(head.saturating_sub(LAG_CHECK_DEPTH));
            self.check_coverage(checked, to, &before_block, &entry_points, &paymasters)
                .await?;
            self.cursor
                .set(Mark {
                    number: to,
                    hash: Some(after),
                })
                .await?;
            poll.to_block = to;
            from = to + 1;
        }
        Ok((poll, watched))
    }

    /// The hash of block `number`. A node without it (a load-balanced RPC's backend that lags)
    /// fails the poll: a cursor stored without a hash would never see that block reorganised.
    async fn block_hash(&self, number: u64) -> Result<B256, WatchError> {
        Ok(self.block_header(number).await?.hash)
    }

    /// Block `number`'s hash and logs bloom; a node without it fails the poll (as above).
    async fn block_header(&self, number: u64) -> Result<BlockSummary, WatchError> {
        self.provider
            .get_block_by_number(number.into())
            .await
            .map_err(rpc)?
            .map(|b| BlockSummary {
                hash: b.header.hash,
                bloom: b.header.logs_bloom,
            })
            .ok_or_else(|| WatchError::Rpc(format!("the node has no block {number} yet")))
    }

    /// That the logs answer of a range held every event of ours in blocks `from..=to` (those
    /// after its last event, near the head; `last` is block `to`'s): a load-balanced RPC's
    /// backend that lags behind the one that answered the head and the block reads may answer
    /// `eth_getLogs` over blocks it does not have yet with no logs rather than an error, and
    /// the cursor would move past events never read (their reservations released later, the
    /// costs forgotten). Each block whose bloom may hold such an event (the EntryPoint's
    /// address, the event's topic and a paymaster's) has its logs read again by its hash
    /// (EIP-234), which a node without the block refuses: a refusal, or any event found so,
    /// fails the poll, and the range is read again. An answer of none is a bloom's false
    /// positive.
    async fn check_coverage(
        &self,
        from: u64,
        to: u64,
        last: &BlockSummary,
        entry_points: &[Address],
        paymasters: &[B256],
    ) -> Result<(), WatchError> {
        for number in from..=to {
            let block = if number == to {
                *last
            } else {
                self.block_header(number).await?
            };
            if !may_hold_events(&block.bloom, entry_points, paymasters) {
                continue;
            }
            let filter = Filter::new()
                .address(entry_points.to_vec())
                .event_signature(UserOperationEvent::SIGNATURE_HASH)
                .topic3(paymasters.to_vec())
                .at_block_hash(block.hash);
            let found = self.provider.get_logs(&filter).await.map_err(|e| {
                WatchError::Rpc(format!(
                    "the logs of block {number} could not be read by its hash ({}): a backend that lags behind it (the range is read again), or an RPC without EIP-234 `blockHash` log filters (the watcher needs them: use one that has them)",
                    super::client::error_chain(&e)
                ))
            })?;
            if !found.is_empty() {
                return Err(WatchError::Rpc(format!(
                    "block {number} holds {} events of ours that the range's logs did not: a backend that lags; the range is read again",
                    found.len()
                )));
            }
        }
        Ok(())
    }

    /// Whether the block the cursor names now has another hash.
    async fn reorganised(&self, mark: Mark) -> Result<bool, WatchError> {
        let Some(hash) = mark.hash else {
            return Ok(false);
        };
        let block = self
            .provider
            .get_block_by_number(mark.number.into())
            .await
            .map_err(rpc)?;
        Ok(block.is_none_or(|b| b.header.hash != hash))
    }

    /// Where a watcher without a cursor starts: `start_block` if given; else the first block
    /// at or after the time the oldest open reservation's first answer can have been made;
    /// else, with nothing open, the confirmed head. That time is its `validUntil` less, per
    /// answer a reservation may have been extended to ([`MAX_HASHES`]), the longest validity
    /// any policy granted (this replica's set's, or any a replica noted serving: another
    /// replica's policy, one since removed or shortened) and the grace within which an expired
    /// answer may still be extended, and less the `validAfter` skew.
    async fn first_block(
        &self,
        sponsor: &Sponsor,
        policies: &[String],
        confirmed: u64,
    ) -> Result<u64, WatchError> {
        if let Some(block) = self.start_block {
            return Ok(block);
        }
        let Some(oldest) = sponsor
            .ledger()
            .oldest_open(policies)
            .await
            .map_err(store)?
        else {
            return Ok(confirmed);
        };
        let longest = sponsor.policies().longest_validity().max(
            sponsor
                .ledger()
                .longest_validity_noted()
                .await
                .map_err(store)?,
        );
        let per_answer = longest.saturating_add(GRACE_SECS);
        let since = oldest.saturating_sub(
            per_answer
                .saturating_mul(MAX_HASHES as u64)
                .saturating_add(VALID_AFTER_SKEW_SECS),
        );
        let block = self.block_at(since, confirmed).await?;
        tracing::info!(
            block,
            since,
            "no watcher cursor: starting before the oldest open reservation"
        );
        Ok(block)
    }

    /// The first block in `0..=upto` whose timestamp is at least `time` (binary search).
    async fn block_at(&self, time: u64, upto: u64) -> Result<u64, WatchError> {
        let (mut lo, mut hi) = (0, upto);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let ts = self
                .provider
                .get_block_by_number(mid.into())
                .await
                .map_err(rpc)?
                .map_or(u64::MAX, |b| b.header.timestamp);
            if ts >= time {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo)
    }

    /// The number of the block that cannot be reorganised away (`--finality`), given the head.
    async fn final_block_number(&self, head: u64) -> Result<u64, WatchError> {
        Ok(match self.finality {
            Finality::Depth(depth) => head.saturating_sub(depth),
            Finality::Finalized => self
                .provider
                .get_block_by_number(BlockNumberOrTag::Finalized)
                .await
                .map_err(rpc)?
                .map_or(0, |b| b.header.number),
        })
    }

    /// Release the reservations whose `validUntil` is before the time of the block that
    /// cannot be reorganised away, and whose logs were read (up to `read_to`): an operation that
    /// landed before that time has then been settled, not released, whatever its hash.
    async fn release(
        &self,
        sponsor: &Sponsor,
        policies: &[String],
        read_to: u64,
    ) -> Result<usize, WatchError> {
        let tag = match self.finality {
            Finality::Finalized => BlockNumberOrTag::Finalized,
            Finality::Depth(depth) => {
                let head = self.provider.get_block_number().await.map_err(rpc)?;
                BlockNumberOrTag::Number(head.saturating_sub(depth))
            }
        };
        let Some(mut block) = self.provider.get_block_by_number(tag).await.map_err(rpc)? else {
            return Ok(0);
        };
        if block.header.number > read_to {
            let Some(read) = self
                .provider
                .get_block_by_number(BlockNumberOrTag::Number(read_to))
                .await
                .map_err(rpc)?
            else {
                return Ok(0);
            };
            block = read;
        }
        // A pair whose signatures all expired before this block (final, and read) has no
        // event left in a block not read.
        let forgotten = sponsor
            .ledger()
            .forget_paymasters(self.chain_id, block.header.timestamp)
            .await
            .map_err(store)?;
        if forgotten > 0 {
            tracing::info!(
                forgotten,
                "paymasters no replica signs for any more, whose signatures have all expired: the watchers leave them"
            );
        }
        let time = self.clock.read_up_to(self.slot, block.header.timestamp);
        if time == 0 {
            return Ok(0);
        }
        sponsor
            .ledger()
            .release_expired(policies, time)
            .await
            .map_err(store)
    }
}

/// The policies a poll settles and releases: this replica's, and every other one whose
/// reservations may still be open or land (`Ledger::watched_policies`: another replica's during
/// a rolling change of the set, or one removed with operations in flight).
async fn watched_policies(sponsor: &Sponsor) -> Result<Vec<String>, WatchError> {
    sponsor
        .ledger()
        .watched_policies(&sponsor.policies().ids())
        .await
        .map_err(store)
}

/// What the watcher reads of a block: its hash, and its logs bloom.
#[derive(Clone, Copy)]
struct BlockSummary {
    hash: B256,
    bloom: alloy::primitives::Bloom,
}

/// Whether a block's logs bloom may hold a `UserOperationEvent` of one of `entry_points` for
/// one of `paymasters` (its third topic). False: it holds none.
fn may_hold_events(
    bloom: &alloy::primitives::Bloom,
    entry_points: &[Address],
    paymasters: &[B256],
) -> bool {
    let has = |bytes: &[u8]| bloom.contains_input(BloomInput::Raw(bytes));
    has(UserOperationEvent::SIGNATURE_HASH.as_slice())
        && entry_points.iter().any(|a| has(a.as_slice()))
        && paymasters.iter().any(|p| has(p.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bloom holds an event of ours only with the EntryPoint, the event's topic and one of
    /// our paymasters all in it.
    #[test]
    fn a_bloom_may_hold_our_events_only_with_all_three() {
        let (entry_point, paymaster) = (Address::repeat_byte(0xe7), Address::repeat_byte(0x9a));
        let topic = paymaster.into_word();
        let topics = [
            UserOperationEvent::SIGNATURE_HASH,
            B256::repeat_byte(1),
            B256::repeat_byte(2),
            topic,
        ];
        let mut bloom = alloy::primitives::Bloom::default();
        bloom.accrue_raw_log(entry_point, &topics);
        assert!(may_hold_events(&bloom, &[entry_point], &[topic]));
        let other = Address::repeat_byte(0x33);
        assert!(
            !may_hold_events(&bloom, &[other], &[topic]),
            "another EntryPoint"
        );
        assert!(
            !may_hold_events(&bloom, &[entry_point], &[other.into_word()]),
            "another paymaster"
        );
        let mut no_event = alloy::primitives::Bloom::default();
        no_event.accrue_raw_log(entry_point, &[B256::repeat_byte(3), topic]);
        assert!(
            !may_hold_events(&no_event, &[entry_point], &[topic]),
            "another event"
        );
        assert!(!may_hold_events(&bloom, &[], &[topic]), "no pair watched");
    }
}
