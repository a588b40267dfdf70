//! The JSON-RPC methods: positional params parsed into types, results formatted for clients.
//! Param and result shapes are documented in docs/rpc.md.

use alloy::primitives::Address;
use serde_json::{Value, json};

use super::error::RpcError;
use crate::app::AppState;
use crate::sponsor::{Mode, RequestContext, SponsorRequest, Sponsorship};
use crate::userop::UserOperation;
use crate::wire::{self, FieldError, to_quantity};

/// Run `method` with `params`; `request_id` tags internal errors.
pub(crate) fn call(
    state: &AppState,
    method: &str,
    params: &[Value],
    request_id: &str,
) -> Result<Value, RpcError> {
    match method {
        "eth_chainId" => Ok(json!(to_quantity(state.sponsor.chain_id()))),
        "pm_supportedEntryPoints" => Ok(json!(supported_entry_points(state))),
        "pm_sponsorUserOperation" => {
            let (op, entry_point) = op_and_entry_point(params)?;
            let context = RequestContext::from_json(params.get(2))?;
            let s = sponsor(
                state,
                &op,
                entry_point,
                &context,
                Mode::Final,
                false,
                request_id,
            )?;
            Ok(json!({
                "paymaster": s.paymaster,
                "paymasterData": s.data.encode(),
                "paymasterVerificationGasLimit": to_quantity(s.gas.verification),
                "paymasterPostOpGasLimit": to_quantity(s.gas.post_op),
                "preVerificationGas": to_quantity(op.pre_verification_gas),
                "verificationGasLimit": to_quantity(op.verification_gas_limit),
                "callGasLimit": to_quantity(op.call_gas_limit),
            }))
        }
        "pm_getPaymasterStubData" => {
            let (op, entry_point, context) = erc7677_params(state, params)?;
            let s = sponsor(
                state,
                &op,
                entry_point,
                &context,
                Mode::Stub,
                false,
                request_id,
            )?;
            Ok(json!({
                "paymaster": s.paymaster,
                "paymasterData": s.data.encode(),
                "paymasterVerificationGasLimit": to_quantity(s.gas.verification),
                "paymasterPostOpGasLimit": to_quantity(s.gas.post_op),
                "isFinal": false,
                "sponsor": { "name": state.sponsor_name },
            }))
        }
        "pm_getPaymasterData" => {
            let (op, entry_point, context) = erc7677_params(state, params)?;
            let s = sponsor(
                state,
                &op,
                entry_point,
                &context,
                Mode::Final,
                true,
                request_id,
            )?;
            Ok(json!({
                "paymaster": s.paymaster,
                "paymasterData": s.data.encode(),
                "paymasterVerificationGasLimit": to_quantity(s.gas.verification),
                "paymasterPostOpGasLimit": to_quantity(s.gas.post_op),
            }))
        }
        other => Err(RpcError::method_not_found(other)),
    }
}

fn supported_entry_points(state: &AppState) -> Vec<String> {
    state
        .sponsor
        .entry_points()
        .iter()
        .map(|e| e.address.to_checksum(None))
        .collect()
}

fn sponsor(
    state: &AppState,
    op: &UserOperation,
    entry_point: Address,
    context: &RequestContext,
    mode: Mode,
    keep_client_gas: bool,
    request_id: &str,
) -> Result<Sponsorship, RpcError> {
    let req = SponsorRequest {
        op,
        entry_point,
        context,
        mode,
        keep_client_gas,
    };
    let sponsorship = state
        .sponsor
        .sponsor(req, unix_now())
        .map_err(|e| RpcError::from_sponsor(e, request_id, &supported_entry_points(state)))?;
    tracing::info!(
        request_id,
        sender = %op.sender,
        nonce = %op.nonce,
        policy = %sponsorship.policy_id,
        ?mode,
        valid_until = sponsorship.data.window.valid_until,
        "sponsored"
    );
    Ok(sponsorship)
}

fn param<'a>(params: &'a [Value], index: usize, name: &str) -> Result<&'a Value, FieldError> {
    params
        .get(index)
        .filter(|v| !v.is_null())
        .ok_or_else(|| FieldError::Missing(name.to_owned()))
}

fn op_and_entry_point(params: &[Value]) -> Result<(UserOperation, Address), FieldError> {
    let op = UserOperation::from_json(param(params, 0, "userOp")?)?;
    let entry_point = wire::address("entryPoint", param(params, 1, "entryPoint")?)?;
    Ok((op, entry_point))
}

/// ERC-7677 params: `[userOp, entryPoint, chainId, context]` (context may be absent or null).
fn erc7677_params(
    state: &AppState,
    params: &[Value],
) -> Result<(UserOperation, Address, RequestContext), RpcError> {
    let (op, entry_point) = op_and_entry_point(params)?;
    let chain_id = wire::quantity_u64("chainId", param(params, 2, "chainId")?)?;
    state
        .sponsor
        .check_chain(chain_id)
        .map_err(|e| RpcError::from_sponsor(e, "", &supported_entry_points(state)))?;
    let context = RequestContext::from_json(params.get(3))?;
    Ok((op, entry_point, context))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
