//! Settlement from the chain (DESIGN §1): read `UserOperationEvent`s whose paymaster is ours
//! from each EntryPoint, settle each reservation to its `actualGasCost` (found by the event's
//! EntryPoint, sender and nonce, see [`crate::ledger::Ledger::settle`]), and release the
//! reservations of operations that can no longer land (a confirmed block is past their
//! `validUntil`).
//!
//! Only blocks `confirmations` deep are read, and the cursor (the last block read) is kept in
//! Redis when configured, so a restart resumes where it stopped; a block read twice settles
//! nothing twice (a reservation closes once).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::session::redis::RedisConn;
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::Filter;
use alloy::sol_types::SolEvent;
use redis::AsyncCommands;

use crate::ledger::{Landing, landing_key, wei_to_gwei_ceil};
use crate::sponsor::Sponsor;
use crate::userop::IEntryPoint;
use crate::userop::IEntryPoint::UserOperationEvent;

/// Most blocks one `eth_getLogs` spans.
pub const MAX_BLOCK_RANGE: u64 = 1000;

/// What can go wrong polling.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The node failed or refused.
    #[error("chain RPC: {0}")]
    Rpc(String),
    /// The cursor or ledger store failed.
    #[error("store: {0}")]
    Store(String),
}

/// Where the watcher's cursor lives.
#[derive(Debug)]
pub enum Cursor {
    /// In this process (the embedded default).
    Memory(AtomicU64),
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
        Self::Memory(AtomicU64::new(u64::MAX))
    }

    async fn get(&self) -> Result<Option<u64>, WatchError> {
        match self {
            Self::Memory(a) => Ok(Some(a.load(Ordering::Acquire)).filter(|&b| b != u64::MAX)),
            Self::Redis(conn, key) => {
                let mut conn = conn.clone();
                conn.get(key)
                    .await
                    .map_err(|e| WatchError::Store(e.to_string()))
            }
        }
    }

    async fn set(&self, block: u64) -> Result<(), WatchError> {
        match self {
            Self::Memory(a) => {
                a.store(block, Ordering::Release);
                Ok(())
            }
            Self::Redis(conn, key) => {
                let mut conn = conn.clone();
                conn.set(key, block)
                    .await
                    .map_err(|e| WatchError::Store(e.to_string()))
            }
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
    /// Events of ours that closed nothing (already settled, or not reserved).
    pub ignored: usize,
    /// Other reservations of a nonce that landed, released: they can never land.
    pub superseded: usize,
    /// Reservations released as expired.
    pub released: usize,
}

/// The settlement watcher of one chain.
#[derive(Debug)]
pub struct Watcher {
    provider: DynProvider,
    entry_points: Vec<Address>,
    paymasters: Vec<B256>,
    /// (EntryPoint, our paymaster) pairs, for deposits.
    pairs: Vec<(Address, Address)>,
    low_deposit: U256,
    confirmations: u64,
    start_block: Option<u64>,
    cursor: Cursor,
}

fn rpc(e: impl std::fmt::Display) -> WatchError {
    WatchError::Rpc(e.to_string())
}

impl Watcher {
    /// Watch the EntryPoints and paymasters `sponsor` serves. Without a stored cursor, start at
    /// `start_block`, or at the current confirmed head.
    pub fn new(
        provider: DynProvider,
        sponsor: &Sponsor,
        confirmations: u64,
        start_block: Option<u64>,
        cursor: Cursor,
    ) -> Self {
        let with_paymaster: Vec<_> = sponsor
            .entry_points()
            .iter()
            .filter(|e| e.paymaster.is_some())
            .collect();
        Self {
            provider,
            entry_points: with_paymaster.iter().map(|e| e.address).collect(),
            paymasters: with_paymaster
                .iter()
                .filter_map(|e| e.paymaster)
                .map(|p| p.into_word())
                .collect(),
            pairs: with_paymaster
                .iter()
                .filter_map(|e| Some((e.address, e.paymaster?)))
                .collect(),
            low_deposit: U256::ZERO,
            confirmations,
            start_block,
            cursor,
        }
    }

    /// Report deposits below `wei` as low (`sp_paymaster_deposit_low`, and a warning).
    pub fn with_low_deposit(mut self, wei: U256) -> Self {
        self.low_deposit = wei;
        self
    }

    /// Read each paymaster's deposit into the metrics.
    async fn read_deposits(&self, sponsor: &Sponsor) -> Result<(), WatchError> {
        for (entry_point, paymaster) in &self.pairs {
            let wei = IEntryPoint::new(*entry_point, &self.provider)
                .balanceOf(*paymaster)
                .call()
                .await
                .map_err(rpc)?;
            let low = wei < self.low_deposit;
            if low {
                tracing::warn!(%entry_point, %paymaster, deposit = %wei, threshold = %self.low_deposit, "paymaster deposit is low: top it up");
            }
            sponsor.metrics().deposit(
                &entry_point.to_string(),
                u128::try_from(wei).unwrap_or(u128::MAX),
                low,
            );
        }
        Ok(())
    }

    /// Read the confirmed blocks since the cursor, settle, release, advance the cursor.
    pub async fn poll_once(&self, sponsor: &Sponsor) -> Result<Poll, WatchError> {
        let head = self.provider.get_block_number().await.map_err(rpc)?;
        let confirmed = head.saturating_sub(self.confirmations);
        let mut from = match self.cursor.get().await? {
            Some(done) => done + 1,
            None => self.start_block.unwrap_or(confirmed),
        };
        let mut poll = Poll {
            to_block: from.saturating_sub(1),
            ..Poll::default()
        };
        let policies: Vec<String> = sponsor.policies().iter().map(|p| p.id.clone()).collect();
        while from <= confirmed && !self.entry_points.is_empty() {
            let to = confirmed.min(from + MAX_BLOCK_RANGE - 1);
            let filter = Filter::new()
                .address(self.entry_points.clone())
                .event_signature(UserOperationEvent::SIGNATURE_HASH)
                .topic3(self.paymasters.clone())
                .from_block(from)
                .to_block(to);
            for log in self.provider.get_logs(&filter).await.map_err(rpc)? {
                let entry_point = log.address();
                let Ok(event) = log.log_decode::<UserOperationEvent>() else {
                    continue;
                };
                let e = event.inner.data;
                // Matched by (EntryPoint, sender, nonce): a nonce lands once, whatever hash
                // the EntryPoint computed (DESIGN §3).
                let landing = Landing {
                    landing_key: landing_key(sponsor.chain_id(), entry_point, e.sender, e.nonce),
                    user_op_hash: e.userOpHash,
                    actual_gwei: wei_to_gwei_ceil(e.actualGasCost),
                };
                let done = sponsor
                    .ledger()
                    .settle(&policies, &landing)
                    .await
                    .map_err(|e| WatchError::Store(e.to_string()))?;
                if done.settled == 0 {
                    poll.ignored += 1;
                } else if !done.hash_matched {
                    tracing::warn!(user_op_hash = %e.userOpHash, sender = %e.sender, nonce = %e.nonce, settled = done.settled, "landed operation's hash matches none we reserved: settled every reservation of its nonce at its cost");
                }
                poll.settled += done.settled;
                poll.superseded += done.superseded;
            }
            // The cursor moves only after the range's settlements are stored.
            self.cursor.set(to).await?;
            poll.to_block = to;
            from = to + 1;
        }
        // Operations whose validUntil is before the confirmed head's time can no longer land.
        let block = self
            .provider
            .get_block_by_number(confirmed.into())
            .await
            .map_err(rpc)?;
        if let Some(block) = block {
            poll.released = sponsor
                .ledger()
                .release_expired(&policies, block.header.timestamp)
                .await
                .map_err(|e| WatchError::Store(e.to_string()))?;
        }
        self.read_deposits(sponsor).await?;
        Ok(poll)
    }
}
