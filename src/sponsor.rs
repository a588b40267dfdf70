//! One sponsorship, start to finish (DESIGN §1): entry point and chain, gas limits, calldata
//! decoding (no I/O); then the session grant (one read, only under a session), the policy,
//! the validity window; then the signature, and the budget reservation (one `EVALSHA`, only
//! when budgets apply) that must succeed before the signature is returned. ERC-20 spending
//! under a session is recorded by compare-and-set before signing. No chain RPC.

use std::sync::Arc;
use std::time::Instant;

use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use alloy::sol_types::SolValue;
use serde_json::{Value, json};

use crate::config::EntryPointConfig;
use crate::ledger::{
    Exhausted, GRACE_SECS, Ledger, Outcome, Reservation, Scope, wei_to_gwei_ceil, wei_to_gwei_floor,
};
use crate::metrics::Metrics;
use crate::policy::calldata::{self, Call, CalldataError};
use crate::policy::live::LivePolicies;
use crate::policy::{OpContext, Policy, PolicySet, Rejection};
use crate::ratelimit::{Limited, RateLimits};
use crate::session::{SessionGrant, SessionStore, SpendCommit, StoreError};
use crate::signer::{Signer, SignerError};
use crate::userop::hash::{paymaster_hash, user_op_hash};
use crate::userop::paymaster_data::{
    PaymasterData, PaymasterDataError, PaymasterGas, ValidityWindow,
};
use crate::userop::v0_7::PaymasterFields;
use crate::userop::{EntryPointVersion, UserOperation};
use crate::wire::{self, FieldError};

/// How far in the past `validAfter` is put. v0.8 requires `block.timestamp > validAfter`, so
/// "now" would fail for an op mined in the same second; and block timestamps may trail our
/// clock. Starting a minute early gives nothing away: `validUntil` is what bounds a signature.
pub const VALID_AFTER_SKEW_SECS: u64 = 60;

/// Stub (ERC-7677 `pm_getPaymasterStubData`, for gas estimation) or final signed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Same checks, final length, a dummy signature; signs nothing.
    Stub,
    /// Signed paymaster data.
    Final,
}

/// One request to the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct SponsorRequest<'a> {
    /// The operation.
    pub op: &'a UserOperation,
    /// The EntryPoint it is for.
    pub entry_point: Address,
    /// The request context.
    pub context: &'a RequestContext,
    /// Stub or final.
    pub mode: Mode,
    /// Sign over the paymaster gas limits the operation already carries (when it names our
    /// paymaster) instead of choosing them. ERC-7677 `pm_getPaymasterData` returns no gas
    /// limits, so the client keeps the ones it has (from the stub, or from a bundler's
    /// estimate), and a signature over other values would fail with AA34.
    pub keep_client_gas: bool,
    /// Policies the caller's API key may use (`None`: any).
    pub allowed_policies: Option<&'a [String]>,
}

/// The request context: third param of `pm_sponsorUserOperation`, fourth of ERC-7677 methods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestContext {
    /// Session grant to sponsor under.
    pub session_id: Option<B256>,
    /// Policy to sponsor under (Pimlico's name, so existing clients work).
    pub sponsorship_policy_id: Option<String>,
    /// Shorter signature lifetime than the policy's.
    pub valid_for_seconds: Option<u64>,
    /// The session key's signature over the request (policies with `require_session_proof`).
    pub session_proof: Option<Bytes>,
}

impl RequestContext {
    /// Parse the context object; `null`/absent is empty. Unknown keys are ignored (wallets add
    /// their own) and logged at debug.
    pub fn from_json(value: Option<&Value>) -> Result<Self, FieldError> {
        let Some(obj) = value.filter(|v| !v.is_null()) else {
            return Ok(Self::default());
        };
        let obj = obj
            .as_object()
            .ok_or_else(|| FieldError::invalid("context", "expected a JSON object"))?;
        for key in obj.keys() {
            if !matches!(
                key.as_str(),
                "sessionId" | "sponsorshipPolicyId" | "validForSeconds" | "sessionProof"
            ) {
                tracing::debug!(key, "ignoring unknown context key");
            }
        }
        let valid_for_seconds = match wire::optional(obj, "validForSeconds") {
            None => None,
            Some(v) => Some(v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                FieldError::invalid("context.validForSeconds", "expected a positive integer")
            })?),
        };
        let sponsorship_policy_id = match wire::optional(obj, "sponsorshipPolicyId") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| {
                        FieldError::invalid("context.sponsorshipPolicyId", "expected a string")
                    })?
                    .to_owned(),
            ),
        };
        Ok(Self {
            session_id: wire::optional(obj, "sessionId")
                .map(|v| wire::bytes32("context.sessionId", v))
                .transpose()?,
            sponsorship_policy_id,
            valid_for_seconds,
            session_proof: wire::optional(obj, "sessionProof")
                .map(|v| wire::data("context.sessionProof", v))
                .transpose()?,
        })
    }
}

/// A granted sponsorship.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sponsorship {
    /// Our paymaster contract for the request's EntryPoint.
    pub paymaster: Address,
    /// Gas limits the signature commits to.
    pub gas: PaymasterGas,
    /// Window and signature (a stub signature in [`Mode::Stub`]).
    pub data: PaymasterData,
    /// The policy that accepted the operation.
    pub policy_id: String,
}

/// Why an operation is not sponsored.
#[derive(Debug, thiserror::Error)]
pub enum SponsorError {
    /// A parameter is malformed.
    #[error(transparent)]
    InvalidParams(#[from] FieldError),
    /// The request names a chain we do not serve.
    #[error("chain {requested} is not supported (this instance serves chain {served})")]
    UnsupportedChain {
        /// Asked for.
        requested: u64,
        /// Served.
        served: u64,
    },
    /// The request names an EntryPoint we do not serve.
    #[error("EntryPoint {0} is not supported")]
    UnsupportedEntryPoint(Address),
    /// We serve the EntryPoint but have no paymaster deployed for it.
    #[error("no paymaster is configured for EntryPoint v{0}")]
    PaymasterNotConfigured(EntryPointVersion),
    /// `sponsorshipPolicyId` names no loaded policy.
    #[error("unknown sponsorship policy `{0}`")]
    UnknownPolicy(String),
    /// A policy (or the calldata decoder) refused the operation.
    #[error("{}: {}", .0.reason, .0.detail)]
    Rejected(Rejection),
    /// The window computed from policy and context is empty.
    #[error(transparent)]
    Window(#[from] PaymasterDataError),
    /// The signer failed: internal.
    #[error(transparent)]
    Signer(#[from] SignerError),
    /// A rate limit was hit.
    #[error("rate limited by {}: retry in {:?}", .0.scope, .0.retry_after)]
    RateLimited(Limited),
    /// A budget would be exceeded.
    #[error("budget exhausted: {} {} of {} (used {}, requested {})", .0.scope, .0.resource, .0.limit, .0.used, .0.requested)]
    BudgetExhausted(Exhausted),
    /// The session store failed: nothing is signed; the client may retry.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the I/O-free checks produce.
struct Prepared {
    version: EntryPointVersion,
    paymaster: Address,
    gas: PaymasterGas,
    calls: Vec<Call>,
}

impl Prepared {
    fn context<'a>(&'a self, chain_id: u64, op: &'a UserOperation, now: u64) -> OpContext<'a> {
        OpContext {
            chain_id,
            version: self.version,
            op,
            calls: &self.calls,
            max_cost: op.max_cost(self.gas),
            now,
        }
    }
}

/// What the pipeline decided, before signing.
struct Decision {
    /// The policy set the decision was taken on (so later steps use the same one, without
    /// reading the live set again).
    policies: Arc<PolicySet>,
    policy_id: String,
    window: ValidityWindow,
    /// Budget scopes to reserve in.
    scopes: Vec<Scope>,
    /// Token spending to record under the session.
    spend: Option<SpendCommit>,
}

/// The sponsorship pipeline and what it needs.
#[derive(Debug)]
pub struct Sponsor {
    chain_id: u64,
    entry_points: Vec<EntryPointConfig>,
    policies: LivePolicies,
    signer: Signer,
    sessions: SessionStore,
    ledger: Ledger,
    limits: RateLimits,
    metrics: Metrics,
}

impl Sponsor {
    /// Assemble the pipeline.
    pub fn new(
        chain_id: u64,
        entry_points: Vec<EntryPointConfig>,
        policies: PolicySet,
        signer: Signer,
        sessions: SessionStore,
        ledger: Ledger,
        limits: RateLimits,
    ) -> Self {
        Self {
            chain_id,
            entry_points,
            policies: LivePolicies::new(policies),
            signer,
            sessions,
            ledger,
            limits,
            metrics: Metrics::default(),
        }
    }

    /// Budgets.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Rate limits.
    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// Metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Session grants.
    pub fn sessions(&self) -> &SessionStore {
        &self.sessions
    }

    /// Chain id served.
    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// EntryPoints served.
    pub fn entry_points(&self) -> &[EntryPointConfig] {
        &self.entry_points
    }

    /// The signer (its address goes into SessionPaymaster's signer set).
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The policy set in force (a snapshot).
    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies.current()
    }

    /// The live policy set, to offer new sets to.
    pub fn live_policies(&self) -> &LivePolicies {
        &self.policies
    }

    /// Refuse a request for another chain (ERC-7677 passes the chain id explicitly).
    pub fn check_chain(&self, requested: u64) -> Result<(), SponsorError> {
        if requested == self.chain_id {
            Ok(())
        } else {
            Err(SponsorError::UnsupportedChain {
                requested,
                served: self.chain_id,
            })
        }
    }

    /// Decide, and in [`Mode::Final`] sign, the paymaster data for `op` at `now` (unix seconds).
    pub async fn sponsor(
        &self,
        req: SponsorRequest<'_>,
        now: u64,
    ) -> Result<Sponsorship, SponsorError> {
        let prepared = self.prepare(req)?;
        let decision = self.decide_and_record(req, &prepared, now).await?;
        // Rate limits count signed sponsorships (stubs and explanations are free).
        if req.mode == Mode::Final
            && let Some(policy) = decision.policies.get(&decision.policy_id)
        {
            self.limits
                .check_policy(policy, req.op.sender, req.context.session_id)
                .map_err(SponsorError::RateLimited)?;
        }
        let window = decision.window;
        let data = match req.mode {
            Mode::Stub => PaymasterData::stub(window),
            Mode::Final => {
                let hash = paymaster_hash(
                    req.op,
                    prepared.gas,
                    prepared.paymaster,
                    self.chain_id,
                    window,
                );
                let started = Instant::now();
                let signature = self.signer.sign_eip191(hash)?;
                self.metrics.sign_seconds.observe(started.elapsed());
                PaymasterData { window, signature }
            }
        };
        let sponsorship = Sponsorship {
            paymaster: prepared.paymaster,
            gas: prepared.gas,
            data,
            policy_id: decision.policy_id,
        };
        if decision.scopes.is_empty() {
            return Ok(sponsorship);
        }
        // One atomic ledger step: the signature leaves this process only if the budgets took
        // its worst case. A stub checks the budgets and reserves nothing.
        let reservation = Reservation {
            policy: sponsorship.policy_id.clone(),
            op_key: idempotency_key(self.chain_id, req.entry_point, req.op, prepared.gas),
            cost_gwei: wei_to_gwei_ceil(req.op.max_cost(prepared.gas)),
            scopes: decision.scopes,
            payload: stored_answer(&sponsorship),
            // The hash the op will have on chain: ours is its only paymaster data.
            user_op_hash: user_op_hash(
                prepared.version,
                &req.op.pack(Some(&PaymasterFields {
                    paymaster: sponsorship.paymaster,
                    gas: sponsorship.gas,
                    data: sponsorship.data.encode(),
                })),
                req.entry_point,
                self.chain_id,
            ),
            valid_until: window.valid_until,
            expires_at: window.valid_until.saturating_add(GRACE_SECS),
        };
        let started = Instant::now();
        let outcome = self
            .ledger
            .reserve(&reservation, req.mode == Mode::Stub, now)
            .await;
        self.metrics.reserve_seconds.observe(started.elapsed());
        match outcome? {
            Outcome::Reserved => Ok(sponsorship),
            // The same operation again: the answer already signed for it, nothing reserved twice.
            Outcome::Existing(payload) if req.mode == Mode::Final => stored_sponsorship(&payload)
                .ok_or_else(|| {
                    StoreError::Unavailable("unreadable reservation record".into()).into()
                }),
            Outcome::Existing(_) => Ok(sponsorship),
            Outcome::Exhausted(e) => Err(SponsorError::BudgetExhausted(e)),
        }
    }

    /// The budget scopes an operation is charged to: the session (the smaller of the grant's
    /// and the policy's session budget), the sender per period, the whole policy per period.
    pub fn scopes(
        policy: &Policy,
        session: Option<&SessionGrant>,
        sender: Address,
        now: u64,
    ) -> Vec<Scope> {
        let gwei = |c: Option<U256>| c.map(wei_to_gwei_floor);
        let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut scopes = Vec::new();
        if let Some(grant) = session {
            let p = policy.budgets.session.as_ref();
            let g = grant.budget.as_ref();
            let cost = min(gwei(p.and_then(|b| b.cost)), gwei(g.and_then(|b| b.cost)));
            let ops = min(p.and_then(|b| b.ops), g.and_then(|b| b.ops));
            if cost.is_some() || ops.is_some() {
                scopes.push(Scope {
                    name: format!("session:{}", grant.session_id),
                    rule: format!("{}.budgets.session", policy.id),
                    cost_limit: cost,
                    ops_limit: ops,
                    expires_at: grant.valid_until.saturating_add(GRACE_SECS),
                    resets_at: None,
                });
            }
        }
        let windowed = |budget: &crate::policy::Budget, base: String, rule: &str| {
            let (name, resets_at, expires_at) = match budget.period.map(|p| p.as_secs().max(1)) {
                Some(p) => {
                    let end = (now / p + 1).saturating_mul(p);
                    (
                        format!("{base}:{}", now / p),
                        Some(end),
                        end.saturating_add(GRACE_SECS),
                    )
                }
                // No period: the budget never resets; keep its counter for ten years.
                None => (base, None, now.saturating_add(10 * 365 * 86_400)),
            };
            Scope {
                name,
                rule: format!("{}.budgets.{rule}", policy.id),
                cost_limit: gwei(budget.cost),
                ops_limit: budget.ops,
                expires_at,
                resets_at,
            }
        };
        if let Some(b) = &policy.budgets.sender {
            scopes.push(windowed(b, format!("sender:{sender}"), "sender"));
        }
        if let Some(b) = &policy.budgets.policy {
            scopes.push(windowed(b, "policy".into(), "policy"));
        }
        scopes
    }

    /// Decide; in [`Mode::Final`], also record the session's token spending before anything is
    /// signed (fail closed: a failure after this point over-counts, never under-counts). The
    /// record is a compare-and-set; when a concurrent sponsorship of the same session won, the
    /// decision is taken again on fresh totals, a few times, then the client is asked to retry.
    async fn decide_and_record(
        &self,
        req: SponsorRequest<'_>,
        prepared: &Prepared,
        now: u64,
    ) -> Result<Decision, SponsorError> {
        const ATTEMPTS: usize = 4;
        for _ in 0..ATTEMPTS {
            let decision = self.decide(req, prepared, now).await?;
            match (req.mode, &decision.spend) {
                (Mode::Final, Some(commit)) => {
                    if self.sessions.commit_spend(commit).await? {
                        return Ok(decision);
                    }
                }
                _ => return Ok(decision),
            }
        }
        Err(rejected(
            "spend_conflict",
            "session.permissions.spend",
            "concurrent sponsorships kept changing this session's spending: retry".into(),
        ))
    }

    /// What [`Self::sponsor`] would decide and why: the decoded calls, every check of every
    /// candidate policy (and of the session), and the decision. Signs and reserves nothing.
    pub async fn explain(&self, req: SponsorRequest<'_>, now: u64) -> Value {
        let prepared = match self.prepare(req) {
            Ok(p) => p,
            Err(e) => {
                return json!({ "decision": "rejected", "error": e.to_string(), "rejection": rejection_json(&e) });
            }
        };
        let ctx = prepared.context(self.chain_id, req.op, now);
        let policies = self.policies.current();
        let named = req.context.sponsorship_policy_id.as_deref();
        let session = match req.context.session_id {
            Some(id) => self.sessions.get(id).await.ok().flatten(),
            None => None,
        };
        let checked: Vec<&Policy> = match (&session, named) {
            (Some(grant), _) => policies.get(&grant.policy).into_iter().collect(),
            (None, Some(id)) => policies.get(id).into_iter().collect(),
            (None, None) => candidates(&policies, &ctx)
                .filter(|p| req.allowed_policies.is_none_or(|ids| ids.contains(&p.id)))
                .collect(),
        };
        let checks: Vec<Value> = checked
            .iter()
            .flat_map(|p| {
                p.explain(&ctx).into_iter().map(|(check, outcome)| {
                    let mut v =
                        json!({ "policy": p.id, "check": check, "passed": outcome.is_ok() });
                    if let Err(r) = outcome {
                        v["rejection"] = rejection_fields(&r);
                    }
                    v
                })
            })
            .collect();
        let calls: Vec<Value> = prepared
            .calls
            .iter()
            .map(|c| {
                let mut v = json!({
                    "target": c.target,
                    "value": c.value.to_string(),
                    "selector": c.selector(),
                    "kind": format!("{:?}", c.kind).to_lowercase(),
                });
                if let Some(spend) = c.token_spend() {
                    v["tokenSpend"] = json!({ "token": spend.token, "amount": spend.amount.to_string(), "approval": spend.approval });
                }
                v
            })
            .collect();
        let mut out = json!({
            "calls": calls,
            "paymasterVerificationGasLimit": prepared.gas.verification.to_string(),
            "maxCost": ctx.max_cost.to_string(),
            "checks": checks,
        });
        match self.decide(req, &prepared, now).await {
            Ok(d) => {
                out["decision"] = json!("sponsored");
                out["policy"] = json!(d.policy_id);
                out["validUntil"] = json!(d.window.valid_until);
                out["validAfter"] = json!(d.window.valid_after);
            }
            Err(e) => {
                out["decision"] = json!("rejected");
                out["error"] = json!(e.to_string());
                out["rejection"] = rejection_json(&e);
            }
        }
        out
    }

    /// The checks that need no I/O: EntryPoint, paymaster, gas fields, calldata, paymaster gas.
    fn prepare(&self, req: SponsorRequest<'_>) -> Result<Prepared, SponsorError> {
        let SponsorRequest {
            op,
            entry_point,
            mode,
            keep_client_gas,
            ..
        } = req;
        let ep = self
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
        let calls = calldata::decode(&op.call_data, op.sender).map_err(|e| {
            rejected(
                match e {
                    CalldataError::UnknownAccountCall(_) => "unknown_account_call",
                    CalldataError::Malformed { .. } | CalldataError::TooDeep => {
                        "malformed_calldata"
                    }
                },
                "callData",
                e.to_string(),
            )
        })?;
        let needed = PaymasterGas::for_op_size(op.hashed_len());
        let client_gas = op
            .paymaster
            .as_ref()
            .filter(|p| keep_client_gas && p.paymaster == paymaster)
            .map(|p| p.gas);
        let gas = match client_gas {
            Some(g) if g.verification >= needed.verification => g,
            Some(g) if g.verification > 0 => {
                return Err(FieldError::invalid(
                    "paymasterVerificationGasLimit",
                    format!(
                        "{} is below the {} this paymaster needs for this operation",
                        g.verification, needed.verification
                    ),
                )
                .into());
            }
            _ => needed,
        };
        Ok(Prepared {
            version: ep.version,
            paymaster,
            gas,
            calls,
        })
    }

    /// Session, policy and validity window.
    async fn decide(
        &self,
        req: SponsorRequest<'_>,
        prepared: &Prepared,
        now: u64,
    ) -> Result<Decision, SponsorError> {
        let SponsorRequest {
            op,
            entry_point,
            context,
            ..
        } = req;
        let ctx = prepared.context(self.chain_id, op, now);
        // The one store read of the hot path, after the checks that need no I/O.
        let session = match context.session_id {
            None => None,
            Some(id) => Some(self.sessions.get(id).await?.ok_or_else(|| {
                rejected(
                    "session_not_found",
                    "context.sessionId",
                    format!("no session {id}"),
                )
            })?),
        };
        let policies = self.policies.current();
        let policy = match &session {
            Some(grant) => {
                let policy = self.check_session(&policies, grant, context, &ctx, entry_point)?;
                check_allowed(policy, req.allowed_policies)?;
                policy
            }
            None => select_policy(&policies, context, &ctx, req.allowed_policies)?,
        };

        let mut valid_until = now.saturating_add(policy.max_validity.as_secs());
        if let Some(grant) = &session {
            valid_until = valid_until.min(grant.valid_until);
        }
        if let Some(end) = policy.active_until {
            valid_until = valid_until.min(end);
        }
        if let Some(secs) = context.valid_for_seconds {
            valid_until = valid_until.min(now.saturating_add(secs));
        }
        let window = ValidityWindow::new(now.saturating_sub(VALID_AFTER_SKEW_SECS), valid_until)?;
        let policy_id = policy.id.clone();
        let scopes = Self::scopes(policy, session.as_ref(), op.sender, now);
        Ok(Decision {
            policy_id,
            window,
            scopes,
            spend: session
                .as_ref()
                .and_then(|g| g.spend_commit(&prepared.calls)),
            policies,
        })
    }

    /// The session's policy, after the policy's checks, the session's, and its proof.
    fn check_session<'p>(
        &self,
        policies: &'p PolicySet,
        grant: &SessionGrant,
        context: &RequestContext,
        ctx: &OpContext<'_>,
        entry_point: Address,
    ) -> Result<&'p Policy, SponsorError> {
        if grant.chain_id != self.chain_id {
            return Err(rejected(
                "session_chain_mismatch",
                "session.chainId",
                format!("the session is for chain {}", grant.chain_id),
            ));
        }
        let policy = policies.get(&grant.policy).ok_or_else(|| {
            rejected(
                "unknown_policy",
                "session.policy",
                format!("the session's policy `{}` is not loaded", grant.policy),
            )
        })?;
        if let Some(id) = context
            .sponsorship_policy_id
            .as_ref()
            .filter(|id| **id != grant.policy)
        {
            return Err(rejected(
                "policy_mismatch",
                "context.sponsorshipPolicyId",
                format!(
                    "the session is granted under `{}`, not `{id}`",
                    grant.policy
                ),
            ));
        }
        policy.check(ctx).map_err(SponsorError::Rejected)?;
        grant
            .check_op(ctx.op, ctx.calls, ctx.now)
            .map_err(SponsorError::Rejected)?;
        if policy.require_session_proof {
            let valid = context
                .session_proof
                .as_ref()
                .is_some_and(|proof| grant.proof_is_valid(proof, entry_point, ctx.op));
            if !valid {
                return Err(rejected(
                    "invalid_session_proof",
                    &format!("{}.require_session_proof", policy.id),
                    "context.sessionProof is missing or not signed by the session key".into(),
                ));
            }
        }
        Ok(policy)
    }
}

/// The named policy, or the first (by id) that accepts the operation.
fn select_policy<'p>(
    policies: &'p PolicySet,
    context: &RequestContext,
    ctx: &OpContext<'_>,
    allowed: Option<&[String]>,
) -> Result<&'p Policy, SponsorError> {
    if let Some(id) = &context.sponsorship_policy_id {
        let policy = policies
            .get(id)
            .ok_or_else(|| SponsorError::UnknownPolicy(id.clone()))?;
        check_allowed(policy, allowed)?;
        if policy.require_session {
            return Err(session_required(policy));
        }
        policy.check(ctx).map_err(SponsorError::Rejected)?;
        return Ok(policy);
    }
    let mut rejections = Vec::new();
    let candidates =
        candidates(policies, ctx).filter(|p| allowed.is_none_or(|ids| ids.contains(&p.id)));
    for policy in candidates {
        match policy.check(ctx) {
            Ok(()) => return Ok(policy),
            Err(r) => rejections.push(r),
        }
    }
    Err(SponsorError::Rejected(match rejections.len() {
        0 => Rejection {
            reason: "no_policy",
            rule: "policies".into(),
            detail: "no policy sponsors operations without a session on this chain and EntryPoint"
                .into(),
            call_index: None,
        },
        // One candidate: its own reason is the most useful answer.
        1 => rejections.remove(0),
        _ => Rejection {
            reason: "no_matching_policy",
            rule: "policies".into(),
            detail: rejections
                .iter()
                .map(|r| format!("{}: {} ({})", r.rule, r.reason, r.detail))
                .collect::<Vec<_>>()
                .join("; "),
            call_index: None,
        },
    }))
}

/// Idempotency key of an operation (DESIGN §5): chain, EntryPoint, and the operation without
/// its paymaster data and signature, but with the paymaster gas limits the answer commits to.
pub fn idempotency_key(
    chain_id: u64,
    entry_point: Address,
    op: &UserOperation,
    gas: PaymasterGas,
) -> B256 {
    keccak256(
        (
            U256::from(chain_id),
            entry_point,
            op.sender,
            op.nonce,
            keccak256(op.init_code()),
            keccak256(&op.call_data),
            op.account_gas_limits(),
            op.pre_verification_gas,
            op.gas_fees(),
            U256::from(gas.verification),
            U256::from(gas.post_op),
        )
            .abi_encode(),
    )
}

/// What a repeat of the same operation gets back.
fn stored_answer(s: &Sponsorship) -> String {
    json!({
        "paymaster": s.paymaster,
        "data": s.data.encode(),
        "verification": s.gas.verification.to_string(),
        "postOp": s.gas.post_op.to_string(),
        "policy": s.policy_id,
    })
    .to_string()
}

fn stored_sponsorship(payload: &str) -> Option<Sponsorship> {
    let v: Value = serde_json::from_str(payload).ok()?;
    let data = hex::decode(v["data"].as_str()?.trim_start_matches("0x")).ok()?;
    Some(Sponsorship {
        paymaster: v["paymaster"].as_str()?.parse().ok()?,
        gas: PaymasterGas {
            verification: v["verification"].as_str()?.parse().ok()?,
            post_op: v["postOp"].as_str()?.parse().ok()?,
        },
        data: PaymasterData::decode(&data).ok()?,
        policy_id: v["policy"].as_str()?.to_owned(),
    })
}

/// Policies that may sponsor without a session on this chain and EntryPoint version (a policy
/// for another chain is no answer to why an operation was refused).
fn candidates<'p>(
    policies: &'p PolicySet,
    ctx: &OpContext<'_>,
) -> impl Iterator<Item = &'p Policy> {
    let (chain, version) = (ctx.chain_id, ctx.version);
    policies.iter().filter(move |p| {
        !p.require_session && p.chains.contains(&chain) && p.entry_points.contains(&version)
    })
}

/// `{reason, rule, detail, callIndex?}`: how a rejection is shown to clients.
pub(crate) fn rejection_fields(r: &Rejection) -> Value {
    let mut v = json!({ "reason": r.reason, "rule": r.rule, "detail": r.detail });
    if let Some(i) = r.call_index {
        v["callIndex"] = json!(i);
    }
    v
}

fn rejection_json(e: &SponsorError) -> Value {
    match e {
        SponsorError::Rejected(r) => rejection_fields(r),
        _ => Value::Null,
    }
}

/// An API key may be limited to some policies.
fn check_allowed(policy: &Policy, allowed: Option<&[String]>) -> Result<(), SponsorError> {
    match allowed {
        Some(ids) if !ids.contains(&policy.id) => Err(rejected(
            "policy_not_allowed",
            "apiKey.policies",
            format!("this API key may not use policy `{}`", policy.id),
        )),
        _ => Ok(()),
    }
}

fn rejected(reason: &'static str, rule: &str, detail: String) -> SponsorError {
    SponsorError::Rejected(Rejection {
        reason,
        rule: rule.to_owned(),
        detail,
        call_index: None,
    })
}

fn session_required(policy: &Policy) -> SponsorError {
    SponsorError::Rejected(Rejection {
        reason: "session_required",
        rule: format!("{}.require_session", policy.id),
        detail: "this policy sponsors only operations made under a session (context.sessionId)"
            .into(),
        call_index: None,
    })
}
