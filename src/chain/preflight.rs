//! What `serve` checks of each chain's node before it builds anything (or publishes a policy
//! set, or notes its paymasters for the watchers): that it serves the chain configured, that
//! each paymaster configured serves the EntryPoint configured with it, and that it takes the
//! `eth_getLogs` filters the watcher needs. A node that does not answer in time is logged, and
//! `serve` goes on: the watcher checks again before it reads anything.

use std::time::Duration;

use alloy::primitives::Address;
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::Filter;

use super::client::{error_chain, provider};
use crate::config::ChainConfig;
use crate::userop::ISessionPaymaster;

/// `chain`'s node (none without an `rpc_url`): a node of another chain, a paymaster of another
/// EntryPoint, or a node that refuses `blockHash` log filters is refused (the error says why).
pub async fn check_node(chain: &ChainConfig) -> Result<(), String> {
    let Some(url) = &chain.rpc_url else {
        return Ok(());
    };
    let provider = provider(url)?;
    if let Ok(Ok(serves)) =
        tokio::time::timeout(Duration::from_secs(5), provider.get_chain_id()).await
        && serves != chain.chain_id
    {
        return Err(format!(
            "the rpc_url (--rpc-url) of chain {c} serves chain {serves}, not {c}: settlement \
             would read another chain",
            c = chain.chain_id
        ));
    }
    check_paymasters(&provider, chain).await?;
    check_block_hash_filters(&provider, chain.chain_id).await
}

/// Each paymaster configured for `chain` serves the EntryPoint it is configured with, where its
/// node answers within 5 s: our signature is valid at the paymaster's own EntryPoint, whose
/// events the watcher would not read, so an operation sent there would land unsettled (its
/// reservation released, its cost forgotten) wherever that paymaster has a deposit too. One
/// that does not answer (not deployed yet, a node down) is logged, and serve goes on.
async fn check_paymasters(provider: &DynProvider, chain: &ChainConfig) -> Result<(), String> {
    for ep in &chain.entry_points {
        let Some(paymaster) = ep.paymaster else {
            continue;
        };
        let pm = ISessionPaymaster::new(paymaster, provider);
        let read = pm.entryPoint();
        match tokio::time::timeout(Duration::from_secs(5), read.call()).await {
            Ok(Ok(serves)) if serves != ep.address => {
                return Err(format!(
                    "the paymaster {paymaster} configured for EntryPoint {v} ({a}) on chain {c} \
                     serves EntryPoint {serves}: its signatures would land where the watcher \
                     does not read; configure the paymaster deployed for {a}",
                    v = ep.version,
                    a = ep.address,
                    c = chain.chain_id
                ));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let error = error_chain(&e);
                tracing::warn!(chain_id = chain.chain_id, %paymaster, entry_point = %ep.address, error, "could not read the paymaster's EntryPoint (is it deployed?)");
            }
            Err(_) => {
                tracing::warn!(chain_id = chain.chain_id, %paymaster, "the node did not say the paymaster's EntryPoint within 5 s");
            }
        }
    }
    Ok(())
}

/// The node takes EIP-234 `blockHash` filters in `eth_getLogs`, which the watcher needs (it
/// reads again by hash the blocks near the head whose bloom may hold an event of ours, and
/// fails the poll where it cannot: settlement and releases would stall). Asked of a block 64
/// behind the head (a backend that lags a little still has it), twice a second apart: an
/// answer that the filter is not taken (method or parameters refused, or naming `blockHash`)
/// refuses the start; anything else (a node down, slow or rate-limiting, a backend without
/// the block) is logged, and the watcher finds out at its polls.
async fn check_block_hash_filters(provider: &DynProvider, chain_id: u64) -> Result<(), String> {
    let block = async {
        let head = provider.get_block_number().await?;
        provider
            .get_block_by_number(head.saturating_sub(64).into())
            .await
    };
    let five = Duration::from_secs(5);
    let hash = match tokio::time::timeout(five, block).await {
        Ok(Ok(Some(block))) => block.header.hash,
        other => {
            let why = match other {
                Ok(Err(e)) => error_chain(&e),
                Ok(Ok(None)) => "no block 64 behind its head".into(),
                _ => "no answer within 5 s".into(),
            };
            tracing::warn!(
                chain_id,
                why,
                "could not ask the node for logs by block hash"
            );
            return Ok(());
        }
    };
    let filter = Filter::new().address(Address::ZERO).at_block_hash(hash);
    let mut last = String::new();
    for attempt in 0..2 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let e = match tokio::time::timeout(five, provider.get_logs(&filter)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => {
                last = "no answer within 5 s".into();
                continue;
            }
        };
        let refused = e.as_error_resp().is_some_and(|r| {
            matches!(r.code, -32601 | -32602) || r.message.to_lowercase().contains("blockhash")
        });
        if refused {
            return Err(format!(
                "the rpc_url (--rpc-url) of chain {chain_id} refuses eth_getLogs by blockHash \
                 (EIP-234: {}), which the settlement watcher needs: use a node or provider \
                 that takes it",
                error_chain(&e)
            ));
        }
        last = error_chain(&e);
    }
    tracing::warn!(
        chain_id,
        why = last,
        "could not ask the node for logs by block hash"
    );
    Ok(())
}
