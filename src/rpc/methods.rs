//! The JSON-RPC methods: positional params parsed into types, results formatted for clients.
//! Param and result shapes are documented in docs/rpc.md.

use alloy::primitives::{Address, U256};
use serde::Serialize;
use serde_json::{Value, json};

use super::error::RpcError;
use crate::apikey::ApiKey;
use crate::app::AppState;
use crate::clock::unix_now;
use crate::session::SessionStatus;
use crate::sponsor::{
    Mode, Reason, Rejection, RequestContext, Sponsor, SponsorError, SponsorRequest, Sponsorship,
};
use crate::userop::UserOperation;
use crate::wire::{self, FieldError, to_quantity};

/// Most policy ids one `pm_validateSponsorshipPolicies` call may name (each is a full check).
pub(crate) const MAX_VALIDATE_POLICIES: usize = 20;

/// A method's result: a JSON tree, or a sponsorship's paymaster fields, which the sponsorship
/// methods write out as they are (no tree of owned keys and strings to build, write and drop on
/// every sponsorship).
#[derive(Debug, Serialize)]
#[serde(untagged)]
#[expect(
    clippy::large_enum_variant,
    reason = "one a call, moved a few times: a box would add back an allocation a sponsorship"
)]
pub(crate) enum Output {
    /// Any other result.
    Json(Value),
    /// `pm_sponsorUserOperation`, `pm_getPaymasterStubData`, `pm_getPaymasterData`.
    Paymaster(PaymasterReply),
}

/// The paymaster fields every sponsorship method returns (unpacked form; with
/// `paymasterSignature` in the v0.9 suffix layout), and what each method adds.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PaymasterReply {
    paymaster: Hex<Address>,
    paymaster_data: Shown<alloy::primitives::Bytes>,
    paymaster_verification_gas_limit: Hex<u128>,
    paymaster_post_op_gas_limit: Hex<u128>,
    /// v0.9's suffix layout only.
    #[serde(skip_serializing_if = "Option::is_none")]
    paymaster_signature: Option<Shown<alloy::primitives::Bytes>>,
    // `pm_sponsorUserOperation` only (Pimlico's shape): the operation's gas limits echoed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pre_verification_gas: Option<Hex<U256>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verification_gas_limit: Option<Hex<u128>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    call_gas_limit: Option<Hex<u128>>,
    // `pm_getPaymasterStubData` only (ERC-7677): `isFinal: false`, and who sponsors.
    #[serde(skip_serializing_if = "Option::is_none")]
    is_final: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sponsor: Option<SponsorInfo>,
}

/// ERC-7677's `sponsor` of a stub.
#[derive(Debug, Serialize)]
struct SponsorInfo {
    name: String,
}

/// A number written as a `0x` quantity, as [`to_quantity`] writes it (and an address as
/// lowercase hex), without a string made first.
#[derive(Debug)]
struct Hex<T>(T);

impl<T: std::fmt::LowerHex> Serialize for Hex<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#x}", self.0))
    }
}

/// A value written as its `Display` text, without a string made first.
#[derive(Debug)]
struct Shown<T>(T);

impl<T: std::fmt::Display> Serialize for Shown<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// Run `method` with `params` on the chain the path names (`path_chain`, or none); `request_id`
/// tags internal errors.
pub(crate) async fn call(
    state: &AppState,
    key: Option<&ApiKey>,
    path_chain: Option<u64>,
    method: &str,
    params: &[Value],
    request_id: &str,
) -> Result<Output, RpcError> {
    // A path that names a chain not served is refused whatever the method.
    if let Some(chain) = path_chain {
        state
            .sponsor
            .chain(chain)
            .map_err(|e| RpcError::from_sponsor(e, "", &[]))?;
    }
    match method {
        "eth_chainId" => Ok(Output::Json(json!(to_quantity(chain_of(
            state, path_chain
        )?)))),
        "pm_supportedEntryPoints" => Ok(Output::Json(json!(supported_entry_points(
            state,
            chain_of(state, path_chain)?
        )))),
        "pm_sponsorUserOperation" => {
            let chain = chain_of(state, path_chain)?;
            let (mut op, entry_point) = op_and_entry_point(params)?;
            let context = RequestContext::from_json(params.get(2))?;
            if needs_estimate(&op) {
                let at = (chain, entry_point);
                estimate_gas(state, key, &mut op, at, &context, request_id).await?;
            }
            let s = sponsor(
                state,
                request(key, chain, &op, entry_point, &context, Mode::Final),
                request_id,
            )
            .await?;
            // Pimlico's shape: the paymaster fields, and the op's gas limits echoed.
            Ok(Output::Paymaster(PaymasterReply {
                pre_verification_gas: Some(Hex(op.pre_verification_gas)),
                verification_gas_limit: Some(Hex(op.verification_gas_limit)),
                call_gas_limit: Some(Hex(op.call_gas_limit)),
                ..paymaster_fields(&s)
            }))
        }
        "pm_getPaymasterStubData" => {
            let (chain, op, entry_point, context) = erc7677_params(state, path_chain, params)?;
            let s = sponsor(
                state,
                request(key, chain, &op, entry_point, &context, Mode::Stub),
                request_id,
            )
            .await?;
            Ok(Output::Paymaster(PaymasterReply {
                is_final: Some(false),
                sponsor: Some(SponsorInfo {
                    name: state.sponsor_name.clone(),
                }),
                ..paymaster_fields(&s)
            }))
        }
        "pm_getPaymasterData" => {
            let (chain, op, entry_point, context) = erc7677_params(state, path_chain, params)?;
            let req = SponsorRequest {
                keep_client_gas: true,
                ..request(key, chain, &op, entry_point, &context, Mode::Final)
            };
            Ok(Output::Paymaster(paymaster_fields(
                &sponsor(state, req, request_id).await?,
            )))
        }
        "pm_getSessionStatus" => session_status(state, key, params, request_id)
            .await
            .map(Output::Json),
        "pm_validateSponsorshipPolicies" => {
            // Pimlico's method: which of the named policies would sponsor this operation.
            let chain = chain_of(state, path_chain)?;
            let (op, entry_point) = op_and_entry_point(params)?;
            let ids = param(params, 2, "sponsorshipPolicyIds")?
                .as_array()
                .ok_or_else(|| {
                    FieldError::invalid("sponsorshipPolicyIds", "expected an array of policy ids")
                })?;
            if ids.len() > MAX_VALIDATE_POLICIES {
                return Err(FieldError::invalid(
                    "sponsorshipPolicyIds",
                    format!("at most {MAX_VALIDATE_POLICIES} ids per call"),
                )
                .into());
            }
            let policies = state.sponsor.policies();
            let ids = ids
                .iter()
                .map(|id| {
                    id.as_str().ok_or_else(|| {
                        FieldError::invalid("sponsorshipPolicyIds", "expected strings")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            // Each id is a full check (the operation decoded and hashed again): only the ids
            // that could answer are run, each once. An unknown id, or one the key may not use,
            // would be refused anyway, and says nothing either way (another tenant's id looks
            // like none).
            let allowed = key.and_then(|k| k.policies.as_deref());
            let may_use =
                |id: &str| policies.get(id).is_some() && crate::apikey::reaches(allowed, id);
            let mut run: Vec<&str> = Vec::with_capacity(ids.len());
            for id in ids {
                if may_use(id) && !run.contains(&id) {
                    run.push(id);
                }
            }
            let mut willing = Vec::new();
            for (i, id) in run.into_iter().enumerate() {
                // Each counts against the key's rate, as a call would (the first was counted
                // with the call itself).
                if i > 0
                    && let Some(k) = key
                {
                    state
                        .sponsor
                        .limits()
                        .check_api_key(&k.name)
                        .map_err(|l| RpcError::rate_limited(&l))?;
                }
                let context = RequestContext {
                    sponsorship_policy_id: Some(id.to_owned()),
                    ..RequestContext::default()
                };
                // A stub run: every check, the budgets checked but nothing reserved or signed.
                let req = request(key, chain, &op, entry_point, &context, Mode::Stub);
                if state.sponsor.sponsor(req, unix_now()).await.is_ok() {
                    willing.push(json!({
                        "sponsorshipPolicyId": id,
                        "data": {
                            "name": id,
                            "author": state.sponsor_name,
                            "icon": null,
                            "description": policies.get(id).map(|p| p.description.clone()),
                        }
                    }));
                }
            }
            Ok(Output::Json(json!(willing)))
        }
        "pm_explainSponsorship" => {
            let chain = chain_of(state, path_chain)?;
            let (op, entry_point) = op_and_entry_point(params)?;
            let context = RequestContext::from_json(params.get(2))?;
            state
                .sponsor
                .explain(
                    request(key, chain, &op, entry_point, &context, Mode::Final),
                    unix_now(),
                )
                .await
                .map(Output::Json)
                .map_err(|e| RpcError::from_sponsor(e, request_id, &[]))
        }
        other => Err(RpcError::method_not_found(other)),
    }
}

/// `[sessionId]` → the grant's status, window, policy and effective permissions. A session under
/// a policy the API key may not use is, to that key, no session at all.
async fn session_status(
    state: &AppState,
    key: Option<&ApiKey>,
    params: &[Value],
    request_id: &str,
) -> Result<Value, RpcError> {
    let id = wire::bytes32("sessionId", param(params, 0, "sessionId")?)?;
    let allowed = key.and_then(|k| k.policies.as_deref());
    let grant = state
        .sponsor
        .sessions()
        .get(id)
        .await
        .map_err(|e| RpcError::from_sponsor(e.into(), request_id, &[]))?
        .filter(|g| crate::apikey::reaches(allowed, &g.policy))
        .ok_or_else(|| {
            RpcError::from_sponsor(
                SponsorError::Rejected(Rejection::new(
                    Reason::SessionNotFound,
                    "sessionId",
                    format!("no session {id}"),
                )),
                request_id,
                &[],
            )
        })?;
    let now = unix_now();
    let status = match grant.status {
        SessionStatus::Revoked => "revoked",
        SessionStatus::Active if now >= grant.valid_until => "expired",
        SessionStatus::Active if now < grant.valid_after => "pending",
        SessionStatus::Active => "active",
    };
    let policies = state.sponsor.policies();
    let policy = policies.get(&grant.policy);
    let permissions = policy.map(|p| grant.effective_permissions(p));
    // The budgets this session's next operation would be charged to, and how much is left.
    let mut budgets = Vec::new();
    for scope in policy
        .map(|p| Sponsor::scopes(p, Some(&grant), grant.account, grant.chain_id, now))
        .unwrap_or_default()
    {
        let ledger = state.sponsor.ledger();
        let failed =
            |e: crate::session::StoreError| RpcError::from_sponsor(e.into(), request_id, &[]);
        let (used_cost, used_ops) = ledger
            .usage(&grant.policy, &scope.name)
            .await
            .map_err(failed)?;
        let reserved = ledger
            .open(&grant.policy, &scope.name)
            .await
            .map_err(failed)?;
        let amount = |limit: Option<u64>, used: u64| json!({ "limit": limit, "used": used, "remaining": limit.map(|l| l.saturating_sub(used)) });
        budgets.push(json!({
            "scope": scope.name,
            "rule": scope.rule,
            "costGwei": amount(scope.cost_limit, used_cost),
            "reservedGwei": reserved,
            "spentGwei": used_cost.saturating_sub(reserved),
            "ops": amount(scope.ops_limit, used_ops),
            "resetsAt": scope.resets_at,
        }));
    }
    let spent = state
        .sponsor
        .ledger()
        .session_spent(&grant.policy, grant.session_id)
        .await
        .map_err(|e| RpcError::from_sponsor(e.into(), request_id, &[]))?;
    Ok(json!({
        "sessionId": grant.session_id,
        "status": status,
        "account": grant.account,
        "sessionKey": grant.session_key,
        "chainId": to_quantity(grant.chain_id),
        "policy": grant.policy,
        "validAfter": grant.valid_after,
        "validUntil": grant.valid_until,
        "effectivePermissions": permissions,
        "budget": grant.budget,
        "budgets": budgets,
        "spent": spent.iter().map(|(token, amount)| (token.to_string(), json!(amount.to_string()))).collect::<serde_json::Map<_, _>>(),
    }))
}

/// Gas limits absent or zero: the op was not estimated yet.
fn needs_estimate(op: &UserOperation) -> bool {
    op.verification_gas_limit == 0 || op.call_gas_limit == 0 || op.pre_verification_gas.is_zero()
}

/// Fill the op's gas limits from the configured bundler's `eth_estimateUserOperationGas`, run
/// with our stub paymaster data (same length and validation path as the final data). The stub
/// runs every check first, so nothing outside the policies is sent to the bundler.
async fn estimate_gas(
    state: &AppState,
    key: Option<&ApiKey>,
    op: &mut UserOperation,
    (chain, entry_point): (u64, Address),
    context: &RequestContext,
    request_id: &str,
) -> Result<(), RpcError> {
    let Some((_, bundler, slots)) = state.bundlers.iter().find(|(c, ..)| *c == chain) else {
        return Err(FieldError::invalid(
            "callGasLimit",
            format!(
                "gas limits are missing: set verificationGasLimit, callGasLimit and \
                 preVerificationGas (this service has no bundler configured to estimate them on \
                 chain {chain})"
            ),
        )
        .into());
    };
    let stub = sponsor(
        state,
        request(key, chain, op, entry_point, context, Mode::Stub),
        request_id,
    )
    .await?;
    // (After the stub: an operation no policy takes asks nothing of the bundler.)
    let _slot = slots
        .try_take(key.map_or("", |k| k.name.as_str()))
        .map_err(RpcError::estimation_busy)?;
    let mut probe = op.clone();
    probe.paymaster = Some(stub.data.fields(stub.paymaster, stub.gas, stub.layout));
    let estimate = tokio::time::timeout(
        state.bundler_timeout,
        bundler.request::<_, Value>(
            "eth_estimateUserOperationGas",
            (probe.to_json(), entry_point),
        ),
    )
    .await
    .unwrap_or_else(|_| {
        Err(alloy::transports::TransportErrorKind::custom_str(&format!(
            "no answer within {:?}",
            state.bundler_timeout
        )))
    });
    let estimate: Value = estimate.map_err(|e| {
        // The bundler's own refusal is the client's to read; a transport failure is ours
        // (its text may carry the bundler URL and key): logged, and named only by kind.
        let reason = match e.as_error_resp() {
            // (Cut: a revert's data, which the account's code chooses, may be long.)
            Some(refusal) => crate::wire::cut(&refusal.message, 512),
            None => {
                tracing::warn!(request_id, error = %crate::chain::client::error_chain(&e), "the bundler did not answer");
                format!("the bundler did not answer (request {request_id})")
            }
        };
        RpcError::estimation_failed(reason)
    })?;
    let quantity = |field: &str, bits| -> Result<U256, RpcError> {
        let v = estimate.get(field).ok_or_else(|| {
            RpcError::internal(request_id, &format!("bundler estimate lacks {field}"))
        })?;
        wire::quantity(field, v, bits).map_err(|e| RpcError::internal(request_id, &e))
    };
    op.pre_verification_gas = quantity("preVerificationGas", 120)?;
    op.verification_gas_limit = quantity("verificationGasLimit", 128)?.to::<u128>();
    op.call_gas_limit = quantity("callGasLimit", 128)?.to::<u128>();
    tracing::debug!(request_id, "gas estimated by the bundler");
    Ok(())
}

fn request<'a>(
    key: Option<&'a ApiKey>,
    chain_id: u64,
    op: &'a UserOperation,
    entry_point: Address,
    context: &'a RequestContext,
    mode: Mode,
) -> SponsorRequest<'a> {
    SponsorRequest {
        chain_id,
        op,
        entry_point,
        context,
        mode,
        keep_client_gas: false,
        allowed_policies: key.and_then(|k| k.policies.as_deref()),
    }
}

/// The paymaster fields every sponsorship method returns, and nothing else.
fn paymaster_fields(s: &Sponsorship) -> PaymasterReply {
    let fields = s.data.fields(s.paymaster, s.gas, s.layout);
    PaymasterReply {
        paymaster: Hex(fields.paymaster),
        paymaster_data: Shown(fields.data),
        paymaster_verification_gas_limit: Hex(fields.gas.verification),
        paymaster_post_op_gas_limit: Hex(fields.gas.post_op),
        paymaster_signature: fields.signature.map(Shown),
        pre_verification_gas: None,
        verification_gas_limit: None,
        call_gas_limit: None,
        is_final: None,
        sponsor: None,
    }
}

/// The EntryPoints served on `chain` (none on a chain not served).
fn supported_entry_points(state: &AppState, chain: u64) -> Vec<String> {
    state.sponsor.chain(chain).map_or_else(
        |_| Vec::new(),
        |c| {
            c.entry_points
                .iter()
                .map(|e| e.address.to_checksum(None))
                .collect()
        },
    )
}

/// The chain a method without a chain parameter is for: the path's, which must be served, or
/// the only one served.
fn chain_of(state: &AppState, path_chain: Option<u64>) -> Result<u64, RpcError> {
    let chains = state.sponsor.chains();
    match (path_chain, chains) {
        (Some(chain), _) => state
            .sponsor
            .chain(chain)
            .map(|c| c.chain_id)
            .map_err(|e| RpcError::from_sponsor(e, "", &[])),
        (None, [only]) => Ok(only.chain_id),
        (None, many) => Err(FieldError::invalid(
            "chainId",
            format!(
                "this service serves chains {:?}: send the request to /{{chainId}}",
                many.iter().map(|c| c.chain_id).collect::<Vec<_>>()
            ),
        )
        .into()),
    }
}

async fn sponsor(
    state: &AppState,
    req: SponsorRequest<'_>,
    request_id: &str,
) -> Result<Sponsorship, RpcError> {
    let sponsorship = state.sponsor.sponsor(req, unix_now()).await.map_err(|e| {
        RpcError::from_sponsor(e, request_id, &supported_entry_points(state, req.chain_id))
    })?;
    tracing::info!(
        request_id,
        sender = %req.op.sender,
        nonce = %req.op.nonce,
        policy = %sponsorship.policy_id,
        mode = ?req.mode,
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
/// The chain must be served, and be the path's when the path names one.
fn erc7677_params(
    state: &AppState,
    path_chain: Option<u64>,
    params: &[Value],
) -> Result<(u64, UserOperation, Address, RequestContext), RpcError> {
    let (op, entry_point) = op_and_entry_point(params)?;
    let chain_id = wire::quantity_u64("chainId", param(params, 2, "chainId")?)?;
    if let Some(path) = path_chain
        && path != chain_id
    {
        return Err(FieldError::invalid(
            "chainId",
            format!("{chain_id:#x}, but the request was sent to chain {path}'s path"),
        )
        .into());
    }
    state
        .sponsor
        .chain(chain_id)
        .map_err(|e| RpcError::from_sponsor(e, "", &[]))?;
    let context = RequestContext::from_json(params.get(3))?;
    Ok((chain_id, op, entry_point, context))
}

#[cfg(test)]
mod tests {
    /// Every method in `rpc::METHODS` is dispatched, and no other: a name the list lacks would
    /// be labelled `other` in the metrics, one it has but `call` lacks would be a lie.
    #[test]
    fn the_method_list_is_what_call_dispatches() {
        let source = include_str!("methods.rs");
        let dispatched: Vec<&str> = source
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix('"')?
                    .split_once("\" =>")
                    .map(|(m, _)| m)
            })
            .collect();
        assert_eq!(dispatched, super::super::METHODS.to_vec());
    }

    /// The written reply is what the tree of strings it replaced wrote: lowercase `0x` hex,
    /// quantities without leading zeros (`0x0` for none), and each method's fields only.
    #[test]
    fn paymaster_replies_write_each_methods_fields_as_quantities() {
        use super::{Hex, Output, PaymasterReply, Shown, SponsorInfo};
        use alloy::primitives::{Bytes, U256, address};
        use serde_json::json;

        let fields = || PaymasterReply {
            paymaster: Hex(address!("00000000000000000000000000000000000AbCdE")),
            paymaster_data: Shown(Bytes::from(vec![0x00, 0xab, 0x01])),
            paymaster_verification_gas_limit: Hex(0x1_0000),
            paymaster_post_op_gas_limit: Hex(0),
            paymaster_signature: None,
            pre_verification_gas: None,
            verification_gas_limit: None,
            call_gas_limit: None,
            is_final: None,
            sponsor: None,
        };
        let written = |reply| serde_json::to_value(Output::Paymaster(reply)).expect("writes");
        let base = json!({
            "paymaster": "0x00000000000000000000000000000000000abcde",
            "paymasterData": "0x00ab01",
            "paymasterVerificationGasLimit": "0x10000",
            "paymasterPostOpGasLimit": "0x0",
        });
        assert_eq!(written(fields()), base);

        let mut sponsored = base.clone();
        sponsored["paymasterSignature"] = json!("0x");
        sponsored["preVerificationGas"] = json!("0xc350");
        sponsored["verificationGasLimit"] = json!("0x1");
        sponsored["callGasLimit"] = json!("0xffffffffffffffffffffffffffffffff");
        let reply = PaymasterReply {
            paymaster_signature: Some(Shown(Bytes::new())),
            pre_verification_gas: Some(Hex(U256::from(50_000))),
            verification_gas_limit: Some(Hex(1)),
            call_gas_limit: Some(Hex(u128::MAX)),
            ..fields()
        };
        assert_eq!(written(reply), sponsored);

        let mut stub = base;
        stub["isFinal"] = json!(false);
        stub["sponsor"] = json!({"name": "a \"quoted\" sponsor"});
        let reply = PaymasterReply {
            is_final: Some(false),
            sponsor: Some(SponsorInfo {
                name: "a \"quoted\" sponsor".into(),
            }),
            ..fields()
        };
        assert_eq!(written(reply), stub);
        assert_eq!(
            serde_json::to_value(Output::Json(json!([1]))).expect("writes"),
            json!([1])
        );
    }
}
