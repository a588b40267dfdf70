//! Step 1, no I/O: the EntryPoint and our paymaster for it, the gas fields, the paymaster gas
//! limits the signature will commit to, and what the operation really calls.

use alloy::primitives::{Address, U256};

use super::{Mode, Reason, Rejection, Sponsor, SponsorError, SponsorRequest};
use crate::policy::OpContext;
use crate::policy::calldata::{self, Call, CalldataError};
use crate::userop::paymaster_data::{PaymasterGas, PaymasterLayout};
use crate::userop::{EntryPointVersion, OpDigests, UserOperation};
use crate::wire::FieldError;

/// The most `paymasterVerificationGasLimit` a client may keep, as a multiple of what this
/// paymaster needs: more only raises the worst case the budgets reserve.
pub(super) const MAX_CLIENT_VERIFICATION_GAS_FACTOR: u128 = 2;

/// What decoding found.
#[derive(Debug)]
pub(super) struct Decoded {
    pub(super) version: EntryPointVersion,
    pub(super) paymaster: Address,
    pub(super) gas: PaymasterGas,
    pub(super) calls: Vec<Call>,
    /// Worst-case cost with `gas` (DESIGN §3).
    pub(super) max_cost: U256,
    /// The operation's initCode and callData hashes, for every digest of it (the paymaster
    /// hash, the idempotency key, the userOpHash).
    pub(super) digests: OpDigests,
}

impl Decoded {
    /// What the policy checks look at.
    pub(super) fn context<'a>(
        &'a self,
        chain_id: u64,
        op: &'a UserOperation,
        now: u64,
    ) -> OpContext<'a> {
        OpContext {
            chain_id,
            version: self.version,
            op,
            calls: &self.calls,
            max_cost: self.max_cost,
            now,
        }
    }
}

pub(super) fn decode(sponsor: &Sponsor, req: SponsorRequest<'_>) -> Result<Decoded, SponsorError> {
    let SponsorRequest {
        op,
        entry_point,
        mode,
        keep_client_gas,
        ..
    } = req;
    let ep = sponsor
        .chain(req.chain_id)?
        .entry_points
        .iter()
        .find(|e| e.address == entry_point)
        .ok_or(SponsorError::UnsupportedEntryPoint(entry_point))?;
    let paymaster = ep
        .paymaster
        .ok_or(SponsorError::PaymasterNotConfigured(ep.version))?;
    if mode == Mode::Final {
        op.require_gas_limits()?;
    }
    if op.eip7702.is_some() && !ep.version.spec().eip7702 {
        return Err(FieldError::invalid(
            "factory",
            format!(
                "EntryPoint v{} has no EIP-7702 accounts (factory 0x7702): use {}",
                ep.version,
                EntryPointVersion::names_where(|s| s.eip7702)
            ),
        )
        .into());
    }
    if mode == Mode::Final
        && let Some(e) = &op.eip7702
        && e.auth.authority(req.chain_id) != Some(op.sender)
    {
        // Whoever else signed it cannot delegate the sender: the bundler's transaction would
        // skip it and the account would run whatever code it has. Stubs are exempt (wallets
        // estimate with a dummy-signed authorization, and a stub signs nothing).
        return Err(FieldError::invalid(
            "eip7702Auth",
            format!(
                "not an authorization by the sender {} for chain {} (or 0)",
                op.sender, req.chain_id
            ),
        )
        .into());
    }
    if req.context.layout == PaymasterLayout::Suffix
        && !ep.version.spec().paymaster_signature_suffix
    {
        return Err(FieldError::invalid(
            "context.paymasterSignature",
            format!(
                "EntryPoint v{} hashes all of paymasterAndData: the signature can only be inline \
                 (a suffix needs {})",
                ep.version,
                EntryPointVersion::names_where(|s| s.paymaster_signature_suffix)
            ),
        )
        .into());
    }
    let calls = calldata::decode(&op.call_data, op.sender).map_err(|e| {
        let reason = match e {
            CalldataError::UnknownAccountCall(_) => Reason::UnknownAccountCall,
            CalldataError::Malformed { .. }
            | CalldataError::TooDeep
            | CalldataError::TooManyCalls
            | CalldataError::TooManyBytes => Reason::MalformedCalldata,
        };
        Rejection::new(reason, "callData", e.to_string())
    })?;
    // "Every call matches a rule" is true of no calls at all: an empty batch would pass every
    // policy (and, with a factory, pay for deploying anything).
    if calls.is_empty() {
        return Err(Rejection::new(
            Reason::NoCalls,
            "callData",
            "the operation makes no call: there is nothing a policy could sponsor",
        )
        .into());
    }
    let gas = paymaster_gas(op, paymaster, keep_client_gas)?;
    Ok(Decoded {
        version: ep.version,
        paymaster,
        gas,
        calls,
        max_cost: op.max_cost(gas),
        digests: op.digests(),
    })
}

/// What this paymaster needs for `op`, or the limits the client keeps (ERC-7677
/// `pm_getPaymasterData`) when they are enough, not far more, and ask for no postOp.
fn paymaster_gas(
    op: &UserOperation,
    paymaster: Address,
    keep_client_gas: bool,
) -> Result<PaymasterGas, FieldError> {
    let needed = PaymasterGas::for_op_size(op.hashed_len());
    let Some(client) = op
        .paymaster
        .as_ref()
        .filter(|p| keep_client_gas && p.paymaster == paymaster)
        .map(|p| p.gas)
    else {
        return Ok(needed);
    };
    if client.verification == 0 {
        return Ok(needed);
    }
    // SessionPaymaster has no postOp: a non-zero limit only pays the EntryPoint's penalty on
    // unused gas to the bundler, out of our deposit.
    if client.post_op != needed.post_op {
        return Err(FieldError::invalid(
            "paymasterPostOpGasLimit",
            format!("must be {}: this paymaster has no postOp", needed.post_op),
        ));
    }
    if client.verification < needed.verification {
        return Err(FieldError::invalid(
            "paymasterVerificationGasLimit",
            format!(
                "{} is below the {} this paymaster needs for this operation",
                client.verification, needed.verification
            ),
        ));
    }
    let cap = needed
        .verification
        .saturating_mul(MAX_CLIENT_VERIFICATION_GAS_FACTOR);
    if client.verification > cap {
        return Err(FieldError::invalid(
            "paymasterVerificationGasLimit",
            format!(
                "{} is above {cap}, {MAX_CLIENT_VERIFICATION_GAS_FACTOR}x what this paymaster needs for this operation",
                client.verification
            ),
        ));
    }
    Ok(client)
}
