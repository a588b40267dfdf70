//! One sponsorship, start to finish (DESIGN §1), as a pipeline of named steps, one file each,
//! run in this order by [`Sponsor::sponsor`] and, without reserving or signing, by
//! [`Sponsor::explain`] and `pm_validateSponsorshipPolicies` (a stub run):
//!
//! 1. [`decode`]: the request's chain, its EntryPoint and paymaster, gas fields, paymaster gas,
//!    calldata into calls (no I/O).
//! 2. [`session`]: the session grant, when the context names one (the one store read, or a
//!    copy of it this replica read recently: [`crate::session::cache`]).
//! 3. [`select`]: the policy (the session's, the named one, or the first candidate that accepts)
//!    and its rules ([`rules`]).
//! 4. [`session`] again: the grant's own checks (narrowing the policy) and its proof.
//! 5. [`window`]: the signature's validity window.
//! 6. [`rate`]: rate limits (signed sponsorships only). Before the reservation, so a limited
//!    request changes no budget or token total; a repeat of an operation counts as a call.
//! 7. [`sign`]: the paymaster signature (before the reservation, which records the userOpHash
//!    that covers it).
//! 8. [`reserve`]: the paymaster's deposit ([`deposit`], with a watcher), then one atomic
//!    ledger step: the session's status, idempotency, the open reservations of the nonce, the
//!    worst case in every budget scope, the session's token caps. The signature leaves the
//!    process only if this step took the reservation (or found the one made for the same
//!    operation).
//!
//! Refusals carry a [`Reason`] ([`crate::rejection`]). No chain RPC anywhere.

mod decode;
pub mod deposit;
mod explain;
pub use explain::{MAX_CALLS_SHOWN, MAX_CHECKS_SHOWN};
mod rate;
mod reserve;
mod rules;
mod select;
mod session;
mod sign;
mod window;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alloy::primitives::{Address, B256, Bytes};
use serde_json::Value;

pub use self::window::VALID_AFTER_SKEW_SECS;
use crate::config::EntryPointConfig;
use crate::ledger::{Exhausted, GRACE_SECS, Ledger};
use crate::metrics::Metrics;
use crate::policy::live::LivePolicies;
use crate::policy::{Policy, PolicySet};
use crate::ratelimit::{Limited, RateLimits};
pub use crate::rejection::{Reason, Rejection};
use crate::session::{SessionGrant, SessionStore, StoreError};
use crate::signer::{Signer, SignerError};
use crate::userop::paymaster_data::{PaymasterData, PaymasterGas, PaymasterLayout, ValidityWindow};
use crate::userop::{EntryPointVersion, UserOperation};
use crate::wire::{self, FieldError};
use deposit::DepositGuard;
use explain::Trace;
pub(crate) use explain::rejection_fields;

/// Stub (ERC-7677 `pm_getPaymasterStubData`, for gas estimation) or final signed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Same checks, final length, a dummy signature; signs nothing, reserves nothing, and
    /// needs no session proof (there is nothing yet for it to bind).
    Stub,
    /// Signed paymaster data.
    Final,
}

/// One request to the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct SponsorRequest<'a> {
    /// The chain it is for (one the pipeline serves: [`Sponsor::chain`]).
    pub chain_id: u64,
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
    /// The session key's signature over the operation (policies with `require_session_proof`;
    /// see [`crate::session::grant::proof_digest`]).
    pub session_proof: Option<Bytes>,
    /// Unix time after which `session_proof` is refused; signed by it, and no paymaster
    /// signature made with the proof outlives it.
    pub session_proof_deadline: Option<u64>,
    /// `paymasterSignature: "suffix"` (v0.9): the signature outside the userOpHash, so the
    /// account can sign in parallel; `"inline"` (default): inside `paymasterData`.
    pub layout: PaymasterLayout,
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
                "sessionId"
                    | "sponsorshipPolicyId"
                    | "validForSeconds"
                    | "sessionProof"
                    | "sessionProofDeadline"
                    | "paymasterSignature"
            ) {
                tracing::debug!(key, "ignoring unknown context key");
            }
        }
        let positive = |field: &str, name: &str| -> Result<Option<u64>, FieldError> {
            wire::optional(obj, field)
                .map(|v| {
                    v.as_u64()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| FieldError::invalid(name, "expected a positive integer"))
                })
                .transpose()
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
            valid_for_seconds: positive("validForSeconds", "context.validForSeconds")?,
            session_proof: wire::optional(obj, "sessionProof")
                .map(|v| wire::data("context.sessionProof", v))
                .transpose()?,
            session_proof_deadline: positive(
                "sessionProofDeadline",
                "context.sessionProofDeadline",
            )?,
            layout: match wire::optional(obj, "paymasterSignature").map(Value::as_str) {
                None | Some(Some("inline")) => PaymasterLayout::Inline,
                Some(Some("suffix")) => PaymasterLayout::Suffix,
                Some(_) => {
                    return Err(FieldError::invalid(
                        "context.paymasterSignature",
                        "expected \"inline\" or \"suffix\"",
                    ));
                }
            },
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
    /// Where the signature goes (the request's, checked against the EntryPoint version).
    pub layout: PaymasterLayout,
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
    #[error("chain {requested} is not supported (this instance serves {served:?})")]
    UnsupportedChain {
        /// Asked for.
        requested: u64,
        /// Served.
        served: Vec<u64>,
    },
    /// The request names an EntryPoint we do not serve.
    #[error("EntryPoint {0} is not supported")]
    UnsupportedEntryPoint(Address),
    /// We serve the EntryPoint but have no paymaster deployed for it.
    #[error("no paymaster is configured for EntryPoint v{0}")]
    PaymasterNotConfigured(EntryPointVersion),
    /// A step of the pipeline refused the operation.
    #[error("{}: {}", .0.reason, .0.detail)]
    Rejected(Rejection),
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

impl SponsorError {
    /// How a refusal by a step of the pipeline is shown to clients: `error.data` of a -32003
    /// answer and `rejection` of an explanation, `{reason, rule, detail, callIndex?}` (a budget
    /// adds `scope, resource, limit, used, requested`). `None` for errors that are not refusals.
    pub fn rejection_fields(&self) -> Option<Value> {
        match self {
            Self::Rejected(r) => Some(rejection_fields(r)),
            Self::BudgetExhausted(e) => Some(serde_json::json!({
                "reason": Reason::BudgetExhausted.as_str(),
                "rule": e.rule,
                "detail": format!("{} {} limit {} reached (used {}, this operation {})", e.scope, e.resource, e.limit, e.used, e.requested),
                "scope": e.scope,
                "resource": e.resource.wire_name(),
                "limit": e.limit,
                "used": e.used,
                "requested": e.requested,
            })),
            _ => None,
        }
    }
}

impl From<Rejection> for SponsorError {
    fn from(r: Rejection) -> Self {
        Self::Rejected(r)
    }
}

/// The sponsorship pipeline and what its steps use: one for every chain served (sessions,
/// policies, budgets and the signer are shared; EntryPoints, paymasters and their deposits are
/// each chain's).
#[derive(Debug)]
pub struct Sponsor {
    chains: Vec<ChainServed>,
    policies: LivePolicies,
    signer: Signer,
    sessions: SessionStore,
    ledger: Ledger,
    limits: RateLimits,
    metrics: Metrics,
}

/// One chain the pipeline serves.
#[derive(Debug)]
pub struct ChainServed {
    /// Its id.
    pub chain_id: u64,
    /// Its EntryPoints and our paymaster for each.
    pub entry_points: Vec<EntryPointConfig>,
    /// The paymasters' deposits, as admission sees them (its watcher fills them in).
    pub deposits: DepositGuard,
    /// Until when (Unix s) the watchers are sure to read this chain's paymasters' events, as
    /// last noted ([`Sponsor::serve_paymasters`]): no signature is made to outlast it.
    paymasters_noted_until: AtomicU64,
}

impl ChainServed {
    /// Until when the watchers are sure to read the events of this chain's paymasters.
    pub fn paymasters_noted_until(&self) -> u64 {
        self.paymasters_noted_until.load(Ordering::Acquire)
    }

    /// (EntryPoint, our paymaster) of each EntryPoint with a paymaster: what this replica signs
    /// for on the chain.
    pub fn paymaster_pairs(&self) -> Vec<(Address, Address)> {
        self.entry_points
            .iter()
            .filter_map(|e| Some((e.address, e.paymaster?)))
            .collect()
    }
}

impl Sponsor {
    /// Assemble the pipeline for `chains` (each with its EntryPoints).
    pub fn new(
        chains: Vec<(u64, Vec<EntryPointConfig>)>,
        policies: PolicySet,
        signer: Signer,
        sessions: SessionStore,
        ledger: Ledger,
        limits: RateLimits,
    ) -> Self {
        // In memory the process's own watcher reads its own paymasters, whenever; with Redis,
        // nothing is signed before [`Self::serve_paymasters`] noted them.
        let noted_until = match ledger {
            Ledger::Memory(_) => u64::MAX,
            Ledger::Redis(_) => 0,
        };
        Self {
            chains: chains
                .into_iter()
                .map(|(chain_id, entry_points)| ChainServed {
                    chain_id,
                    deposits: DepositGuard::new(
                        entry_points.iter().map(|e| e.address),
                        deposit::DEFAULT_MARGIN_PERCENT,
                    ),
                    entry_points,
                    paymasters_noted_until: AtomicU64::new(noted_until),
                })
                .collect(),
            policies: LivePolicies::new(policies),
            signer,
            sessions,
            ledger,
            limits,
            metrics: Metrics::default(),
        }
    }

    /// Keep `percent` of each paymaster's deposit free of open reservations (default
    /// [`deposit::DEFAULT_MARGIN_PERCENT`]).
    pub fn with_deposit_margin(mut self, percent: u64) -> Self {
        for chain in &mut self.chains {
            chain.deposits =
                DepositGuard::new(chain.entry_points.iter().map(|e| e.address), percent);
        }
        self
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

    /// The chains served, in configuration order.
    pub fn chains(&self) -> &[ChainServed] {
        &self.chains
    }

    /// Note the (EntryPoint, paymaster) pairs of every chain served (`Ledger::serve_paymasters`),
    /// as signing, until they are noted again, signatures that land no later than `now` plus
    /// the longest validity of `set` and the grace hour (which covers the policy poll between
    /// two notes and the replicas' clocks): at start, before `set` comes into force, and on
    /// every policy poll. A signature that would outlast the last note is refused
    /// (`sponsor::reserve`): a replica that cannot note them (its Redis key's node down) stops
    /// signing before a watcher could forget them.
    pub async fn serve_paymasters(&self, set: &PolicySet, now: u64) -> Result<(), StoreError> {
        let until = now
            .saturating_add(set.longest_validity())
            .saturating_add(GRACE_SECS);
        // Each chain's pairs are a key of their own (on a Cluster, maybe on a node of their
        // own): one that fails does not keep the others from being noted.
        let mut failed = None;
        for chain in &self.chains {
            match self
                .ledger
                .serve_paymasters(chain.chain_id, &chain.paymaster_pairs(), until)
                .await
            {
                Ok(noted) => {
                    chain
                        .paymasters_noted_until
                        .fetch_max(noted, Ordering::AcqRel);
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// The chain `chain_id`, or why it is not served.
    pub fn chain(&self, chain_id: u64) -> Result<&ChainServed, SponsorError> {
        self.chains
            .iter()
            .find(|c| c.chain_id == chain_id)
            .ok_or_else(|| SponsorError::UnsupportedChain {
                requested: chain_id,
                served: self.chains.iter().map(|c| c.chain_id).collect(),
            })
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

    /// Decide, and in [`Mode::Final`] sign, the paymaster data for `op` at `now` (unix seconds).
    pub async fn sponsor(
        &self,
        req: SponsorRequest<'_>,
        now: u64,
    ) -> Result<Sponsorship, SponsorError> {
        let run = match req.mode {
            Mode::Final => Run::Sign,
            Mode::Stub => Run::Stub,
        };
        self.run(req, now, run, &mut Trace::off()).await
    }

    /// What [`Self::sponsor`] would decide and why: the decoded calls, every check of every
    /// policy considered (and of the session), and the decision; budgets and token caps are
    /// checked, nothing is reserved or signed. A failure of ours (the store, the signer) is no
    /// decision: it is the error, answered as every method answers it (its text, which may
    /// name Redis' nodes, only in the log).
    pub async fn explain(&self, req: SponsorRequest<'_>, now: u64) -> Result<Value, SponsorError> {
        let mut trace = Trace::on();
        match self.run(req, now, Run::Explain, &mut trace).await {
            Err(e @ (SponsorError::Store(_) | SponsorError::Signer(_))) => Err(e),
            outcome => Ok(trace.into_json(outcome)),
        }
    }

    /// Revoke a session: first where reservations see it (so no signature follows once this
    /// returns, even for a request that read the grant before), then the grant itself. The
    /// updated grant, or `None` if unknown.
    pub async fn revoke_session(
        &self,
        id: B256,
        now: u64,
    ) -> Result<Option<SessionGrant>, StoreError> {
        let Some(grant) = self.sessions.get(id).await? else {
            // Unknown here, but other replicas may hold a copy (its key deleted by hand): the
            // revocation feed tells them to drop it.
            return self.sessions.revoke(id).await;
        };
        self.ledger.revoke_session(&grant, now).await?;
        self.sessions.revoke(id).await
    }

    /// The pipeline (module doc), to the end `run` asks for; `trace` records what each step
    /// found (explain).
    async fn run(
        &self,
        req: SponsorRequest<'_>,
        now: u64,
        run: Run,
        trace: &mut Trace,
    ) -> Result<Sponsorship, SponsorError> {
        let decoded = decode::decode(self, req)?;
        trace.decoded(&decoded);
        let ctx = decoded.context(req.chain_id, req.op, now);
        let grant = session::load(self, req.context).await?;
        let grant = grant.as_deref();
        let policies = self.policies.current();
        let policy = select::choose(&policies, req, grant, &ctx, trace)?;
        if let Some(grant) = grant {
            session::check(grant, policy, req, &ctx, trace)?;
        }
        let decision = Decision {
            policy,
            grant,
            window: window::window(policy, grant, req, &decoded, now)?,
        };
        if run == Run::Sign {
            rate::check(self, policy, req)?;
        }
        let data = sign::sign(self, req, &decoded, decision.window, run)?;
        let data = reserve::reserve(self, req, &decoded, &decision, data, now, run).await?;
        Ok(Sponsorship {
            paymaster: decoded.paymaster,
            gas: decoded.gas,
            data,
            layout: req.context.layout,
            policy_id: policy.id.clone(),
        })
    }
}

/// How far a run goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Every step; the signature is made and the reservation taken.
    Sign,
    /// Every check; stub data, budgets checked, nothing reserved (ERC-7677 stub, validate).
    Stub,
    /// As a stub, with every check recorded (`pm_explainSponsorship`).
    Explain,
}

/// What steps 3 to 5 decided.
#[derive(Debug)]
struct Decision<'a> {
    policy: &'a Policy,
    grant: Option<&'a SessionGrant>,
    window: ValidityWindow,
}
