//! `session-paymaster status`: what the chain says of each configured paymaster (deposit,
//! stake, owner, whether the service's signer is authorised) next to what the ledger holds
//! against its deposit (the open reservations' worst cases). Read-only; not on the hot path.

use alloy::primitives::{Address, U256};
use alloy::providers::{DynProvider, Provider};
use serde::Serialize;

use super::client::error_chain;
use crate::config::{ChainConfig, Config};
use crate::ledger::Ledger;
use crate::ledger::redis::RedisLedger;
use crate::policy::file::load_dir;
use crate::signer::{KeySource, Signer};
use crate::sponsor::deposit::open_against_deposit;
use crate::userop::{EntryPointVersion, IEntryPoint, ISessionPaymaster};

/// One paymaster, as the chain sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymasterStatus {
    /// EntryPoint version.
    pub version: String,
    /// The EntryPoint.
    pub entry_point: Address,
    /// The paymaster.
    pub paymaster: Address,
    /// Whether code is deployed at the paymaster's address (nothing else is read without it).
    pub deployed: bool,
    /// Its owner (signers, stake, deposit).
    pub owner: Option<Address>,
    /// An owner it was offered to who has not accepted yet.
    pub pending_owner: Option<Address>,
    /// Its EntryPoint deposit, wei (decimal).
    pub deposit_wei: String,
    /// Whether it is staked (bundlers need it: ERC-7562).
    pub staked: bool,
    /// Its stake, wei (decimal).
    pub stake_wei: String,
    /// Its stake's unstake delay, seconds.
    pub unstake_delay_secs: u32,
    /// When an unlocked stake may be withdrawn (0: not unlocked).
    pub withdraw_time: u64,
    /// The service's signer and whether the paymaster honours it (`None`: no key configured).
    pub signer: Option<SignerStatus>,
    /// Every signer the paymaster honours (`None`: a build without `signers()`): a key
    /// rotated out must be gone from here.
    pub signers: Option<Vec<Address>>,
    /// Worst cases of the open reservations charged to this paymaster, wei (`None`: no Redis).
    pub open_reservations_wei: Option<String>,
    /// What to look at: an undeployed paymaster, an unauthorised signer, no stake, open
    /// reservations above half the deposit.
    pub warnings: Vec<String>,
}

/// The configured signer, as the paymaster sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SignerStatus {
    /// Its address.
    pub address: Address,
    /// `isSigner(address)`.
    pub authorised: bool,
}

/// Read `paymaster` (serving `entry_point` of `version`) on the chain `provider` reaches;
/// `signer` is the service's, `open_gwei` what the ledger holds against the deposit.
pub async fn paymaster_status(
    provider: &DynProvider,
    version: EntryPointVersion,
    entry_point: Address,
    paymaster: Address,
    signer: Option<Address>,
    open_gwei: Option<u64>,
) -> Result<PaymasterStatus, String> {
    let rpc = |e: alloy::contract::Error| format!("chain RPC: {}", error_chain(&e));
    let deployed = !provider
        .get_code_at(paymaster)
        .await
        .map_err(|e| format!("chain RPC: {}", error_chain(&e)))?
        .is_empty();
    let info = IEntryPoint::new(entry_point, provider)
        .getDepositInfo(paymaster)
        .call()
        .await
        .map_err(rpc)?;
    let open_wei = open_gwei.map(|g| U256::from(g) * U256::from(1_000_000_000u64));
    let mut status = PaymasterStatus {
        version: version.to_string(),
        entry_point,
        paymaster,
        deployed,
        owner: None,
        pending_owner: None,
        deposit_wei: info.deposit.to_string(),
        staked: info.staked,
        stake_wei: info.stake.to_string(),
        unstake_delay_secs: info.unstakeDelaySec,
        withdraw_time: info.withdrawTime.to::<u64>(),
        signer: None,
        signers: None,
        open_reservations_wei: open_wei.map(|w| w.to_string()),
        warnings: Vec::new(),
    };
    if !deployed {
        status
            .warnings
            .push("no code at the paymaster's address".into());
        return Ok(status);
    }
    let pm = ISessionPaymaster::new(paymaster, provider);
    status.owner = Some(pm.owner().call().await.map_err(rpc)?);
    // A paymaster deployed before two-step ownership has no pendingOwner: left out.
    status.pending_owner = pm.pendingOwner().call().await.ok().filter(|a| !a.is_zero());
    if let Some(address) = signer {
        let authorised = pm.isSigner(address).call().await.map_err(rpc)?;
        if !authorised {
            status.warnings.push(format!(
                "the service's signer {address} is not a signer of this paymaster: its sponsorships fail (AA34)"
            ));
        }
        status.signer = Some(SignerStatus {
            address,
            authorised,
        });
    }
    // A paymaster deployed before the signer list has no signers(): left out.
    status.signers = pm.signers().call().await.ok();
    if let (Some(all), Some(SignerStatus { address, .. })) = (&status.signers, &status.signer) {
        let others = all.iter().filter(|a| *a != address).count();
        if others > 0 {
            status.warnings.push(format!(
                "{others} other signer(s) can sign for this paymaster: remove any no replica uses (docs/operations.md, key rotation)"
            ));
        }
    }
    if !info.staked {
        status
            .warnings
            .push("not staked: bundlers drop its operations (ERC-7562)".into());
    }
    if let Some(open) = open_wei
        && open > info.deposit / U256::from(2)
    {
        status
            .warnings
            .push("open reservations hold over half the deposit: top it up".into());
    }
    Ok(status)
}

/// What `status` prints: the chain and each configured paymaster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// The chain the RPC serves (the configuration's).
    pub chain_id: u64,
    /// One per configured paymaster.
    pub paymasters: Vec<PaymasterStatus>,
}

/// Read every paymaster `chain` (one of `config`'s) names through `rpc_url`: the node must
/// serve that chain; the signer is the configured key's (none for a dev signer); the open
/// reservations come from Redis when configured, over the policies of the policy directory and
/// every other one a replica served (as the watchers count them).
pub async fn report(
    config: &Config,
    chain: &ChainConfig,
    rpc_url: &str,
) -> Result<StatusReport, String> {
    let provider = super::client::provider(rpc_url)?;
    let chain_id = provider
        .get_chain_id()
        .await
        .map_err(|e| format!("chain RPC: {}", error_chain(&e)))?;
    if chain_id != chain.chain_id {
        return Err(format!(
            "the RPC serves chain {chain_id}, the configuration's is {}",
            chain.chain_id
        ));
    }
    // The configured key's address only (a dev signer is random: nothing to check).
    let signer = match &config.signer {
        KeySource::Ephemeral => None,
        source => Some(
            Signer::load(source.clone())
                .map_err(|e| e.to_string())?
                .address(),
        ),
    };
    let ledger = match &config.redis_url {
        Some(url) => Some(Ledger::Redis(RedisLedger::new(
            crate::session::redis::connect(url, config.redis_timeout)
                .await
                .map_err(|e| format!("Redis: {}", error_chain(&e)))?,
        ))),
        None => None,
    };
    let policies: Vec<String> = load_dir(&config.policies_dir)
        .map(|set| set.ids())
        .map_err(|_| {
            format!(
                "the policies in {} do not load",
                config.policies_dir.display()
            )
        })?;
    // As the watchers count them: every policy a replica served, not only the directory's.
    let policies = match &ledger {
        Some(ledger) => ledger
            .watched_policies(&policies)
            .await
            .map_err(|e| e.to_string())?,
        None => policies,
    };
    let mut paymasters = Vec::new();
    for ep in &chain.entry_points {
        let Some(paymaster) = ep.paymaster else {
            continue;
        };
        let open = match &ledger {
            Some(ledger) => Some(
                open_against_deposit(ledger, &policies, chain.chain_id, ep.address)
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        paymasters.push(
            paymaster_status(&provider, ep.version, ep.address, paymaster, signer, open).await?,
        );
    }
    Ok(StatusReport {
        chain_id,
        paymasters,
    })
}
