//! `session-paymaster status`: what the chain says of each configured paymaster (deposit,
//! stake, owner, whether the service's signer is authorised) next to what the ledger holds
//! against its deposit (the open reservations' worst cases). Read-only; not on the hot path.

use alloy::primitives::{Address, U256};
use alloy::providers::{DynProvider, Provider};
use serde::Serialize;

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
    let rpc = |e: alloy::contract::Error| format!("chain RPC: {e}");
    let deployed = !provider
        .get_code_at(paymaster)
        .await
        .map_err(|e| format!("chain RPC: {e}"))?
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
