//! Sponsorship policies: which operations we pay for (DESIGN §5, §6).
//!
//! A policy is loaded from a file ([`file`](mod@file)), the operation's callData is decoded into calls
//! ([`calldata`]), and [`Policy::check`] accepts the operation or names the first rule it
//! breaks. Sessions (which narrow a policy) and budgets (which the ledger enforces) build on
//! this.

pub mod calldata;
pub mod file;
pub mod live;
pub mod publish;

use std::ops::ControlFlow;
use std::time::Duration;

use alloy::primitives::{Address, B256, FixedBytes, U256};

use self::calldata::{Call, CallKind};
use crate::rejection::{Reason, Rejection};
use crate::userop::{EntryPointVersion, UserOperation};

/// A loaded, validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Unique id (`sponsorshipPolicyId` in request contexts).
    pub id: String,
    /// Free text for humans.
    pub description: String,
    /// Chain ids it sponsors on.
    pub chains: Vec<u64>,
    /// EntryPoint versions it sponsors for.
    pub entry_points: Vec<EntryPointVersion>,
    /// Only operations made under a session grant (`context.sessionId`).
    pub require_session: bool,
    /// Sessions must also prove the session key signed the request (`context.sessionProof`).
    pub require_session_proof: bool,
    /// Longest signature lifetime it grants.
    pub max_validity: Duration,
    /// Unix time after which it sponsors nothing (and no signature outlives it).
    pub active_until: Option<u64>,
    /// Most session grants under it live at once (`None`: no bound): the admin API refuses
    /// one more.
    pub max_sessions: Option<u64>,
    /// Per-operation caps.
    pub per_op: PerOpLimits,
    /// Spending budgets per scope (enforced by the budget ledger).
    pub budgets: Budgets,
    /// Most signed sponsorships per sender per window.
    pub rate_per_sender: Option<Rate>,
    /// Most signed sponsorships per session per window.
    pub rate_per_session: Option<Rate>,
    /// Senders always refused, or the only ones served.
    pub senders: SenderLists,
    /// Account factories it pays deployments through (`factory` of an operation with
    /// `initCode`). Empty: it sponsors no deployment, since a factory call runs code no
    /// `[[allow]]` rule sees.
    pub factories: Vec<Address>,
    /// EIP-7702 implementations it pays for (the `eip7702Auth.address` of an operation with
    /// `factory = 0x7702`). Empty: it sponsors no EIP-7702 delegation, since the delegate is the
    /// code that runs the calls the rules check.
    pub delegates: Vec<Address>,
    /// What the operation may call: every call must match one rule.
    pub allow: Vec<AllowRule>,
}

/// A budget: worst-case cost and operation count, over a fixed UTC window (`period`) or, for
/// sessions, the session's lifetime.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Budget {
    /// Wei.
    pub cost: Option<U256>,
    /// Operations.
    pub ops: Option<u64>,
    /// Window length; `None`: no reset.
    pub period: Option<Duration>,
}

/// Budgets by scope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Budgets {
    /// Each session (the most a session grant may ask for).
    pub session: Option<Budget>,
    /// Each sender.
    pub sender: Option<Budget>,
    /// The whole policy.
    pub policy: Option<Budget>,
}

/// At most `count` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Operations.
    pub count: u32,
    /// Window.
    pub per: Duration,
}

/// Sender allow and deny lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderLists {
    /// When non-empty, only these senders.
    pub allow: Vec<Address>,
    /// Never these senders.
    pub deny: Vec<Address>,
}

/// Caps on a single operation (fees and cost in wei).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PerOpLimits {
    /// `verificationGasLimit` cap.
    pub max_verification_gas_limit: Option<u64>,
    /// `callGasLimit` cap.
    pub max_call_gas_limit: Option<u64>,
    /// `preVerificationGas` cap: the EntryPoint pays it in full, used or not, to whoever
    /// submits the bundle (who may be the client).
    pub max_pre_verification_gas: Option<u64>,
    /// Worst-case cost (DESIGN §3).
    pub max_cost: Option<U256>,
    /// `maxFeePerGas` cap.
    pub max_fee_per_gas: Option<U256>,
    /// `maxPriorityFeePerGas` cap.
    pub max_priority_fee_per_gas: Option<U256>,
}

/// One `[[allow]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    /// Contract the account may call.
    pub target: Address,
    /// Functions it may call there.
    pub functions: FunctionFilter,
    /// Most native value per call.
    pub max_value: U256,
    /// Whether the account may delegatecall the target (its code then runs as the account:
    /// allow only audited library contracts).
    pub delegatecall: bool,
}

/// Which functions a rule allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FunctionFilter {
    /// `"*"`: any function, and plain value transfers.
    Any,
    /// These selectors, with the text they were written as.
    Selectors(Vec<(FixedBytes<4>, String)>),
}

/// Everything a policy looks at.
#[derive(Debug)]
pub struct OpContext<'a> {
    /// Chain the operation is for.
    pub chain_id: u64,
    /// EntryPoint version.
    pub version: EntryPointVersion,
    /// The operation.
    pub op: &'a UserOperation,
    /// Its decoded calls.
    pub calls: &'a [Call],
    /// Its worst-case cost with our paymaster gas.
    pub max_cost: U256,
    /// Unix time now.
    pub now: u64,
}

/// One of a policy's checks, as `explain` names it.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// A check of the whole operation (`chain`, `sender`, `max_cost`, ...).
    Named(&'static str),
    /// The allow rules over the operation's call at this index (`calls[i]`).
    Call(usize),
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Named(name) => f.write_str(name),
            Self::Call(i) => write!(f, "calls[{i}]"),
        }
    }
}

impl Policy {
    /// Accept the operation or name the first rule it breaks.
    pub fn check(&self, ctx: &OpContext<'_>) -> Result<(), Rejection> {
        let mut first = Ok(());
        self.evaluate(ctx, &mut |_, outcome| match outcome {
            Ok(()) => ControlFlow::Continue(()),
            Err(r) => {
                first = Err(r);
                ControlFlow::Break(())
            }
        });
        first
    }

    /// Every check and its outcome, without stopping at the first failure
    /// (`pm_explainSponsorship`).
    pub fn explain(&self, ctx: &OpContext<'_>) -> Vec<(String, Result<(), Rejection>)> {
        let mut all = Vec::new();
        self.evaluate(ctx, &mut |check, outcome| {
            all.push((check.to_string(), outcome));
            ControlFlow::Continue(())
        });
        all
    }

    /// Run the checks in order, handing each outcome to `visit`, which may stop the run. A
    /// check's name is only made into text where it is shown (`explain`): `check`, on every
    /// sponsorship, allocates nothing for the checks that pass.
    fn evaluate(
        &self,
        ctx: &OpContext<'_>,
        visit: &mut dyn FnMut(Check, Result<(), Rejection>) -> ControlFlow<()>,
    ) {
        let reject = |reason, setting: &str, detail: String| {
            Rejection::new(reason, format!("{}.{setting}", self.id), detail)
        };
        let ok_or = |pass: bool, r: &dyn Fn() -> Rejection| if pass { Ok(()) } else { Err(r()) };
        macro_rules! visit {
            ($check:expr, $outcome:expr) => {
                if visit($check, $outcome).is_break() {
                    return;
                }
            };
        }
        visit!(
            Check::Named("chain"),
            ok_or(self.chains.contains(&ctx.chain_id), &|| {
                reject(
                    Reason::ChainNotAllowed,
                    "chains",
                    format!("chain {} is not in {:?}", ctx.chain_id, self.chains),
                )
            })
        );
        visit!(
            Check::Named("entry_point"),
            ok_or(self.entry_points.contains(&ctx.version), &|| {
                reject(
                    Reason::EntryPointNotAllowed,
                    "entry_points",
                    format!("EntryPoint v{} is not allowed", ctx.version),
                )
            })
        );
        visit!(
            Check::Named("active"),
            ok_or(
                self.active_until.is_none_or(|until| ctx.now < until),
                &|| {
                    reject(
                        Reason::PolicyInactive,
                        "active_until",
                        format!("the policy ended at unix time {:?}", self.active_until),
                    )
                }
            )
        );
        let sender = ctx.op.sender;
        visit!(
            Check::Named("sender"),
            if self.senders.deny.contains(&sender) {
                Err(reject(
                    Reason::SenderDenied,
                    "senders.deny",
                    format!("sender {sender} is denied"),
                ))
            } else if !self.senders.allow.is_empty() && !self.senders.allow.contains(&sender) {
                Err(reject(
                    Reason::SenderNotAllowed,
                    "senders.allow",
                    format!("sender {sender} is not on the allow list"),
                ))
            } else {
                Ok(())
            }
        );
        visit!(
            Check::Named("factory"),
            match ctx.op.factory {
                Some(factory) if !self.factories.contains(&factory) => Err(reject(
                    Reason::FactoryNotAllowed,
                    "factories",
                    format!("deployment through factory {factory} is not sponsored"),
                )),
                _ => Ok(()),
            }
        );
        visit!(
            Check::Named("delegate"),
            match ctx.op.eip7702.as_ref().map(|e| e.auth.address) {
                Some(delegate) if !self.delegates.contains(&delegate) => Err(reject(
                    Reason::DelegateNotAllowed,
                    "delegates",
                    format!("EIP-7702 delegation to {delegate} is not sponsored"),
                )),
                _ => Ok(()),
            }
        );
        let gas_caps = [
            (
                "verification_gas_limit",
                "per_op.max_verification_gas_limit",
                ctx.op.verification_gas_limit,
                self.per_op.max_verification_gas_limit,
            ),
            (
                "call_gas_limit",
                "per_op.max_call_gas_limit",
                ctx.op.call_gas_limit,
                self.per_op.max_call_gas_limit,
            ),
            (
                "pre_verification_gas",
                "per_op.max_pre_verification_gas",
                u128::try_from(ctx.op.pre_verification_gas).unwrap_or(u128::MAX),
                self.per_op.max_pre_verification_gas,
            ),
        ];
        for (name, setting, value, cap) in gas_caps {
            visit!(
                Check::Named(name),
                match cap.filter(|&cap| value > u128::from(cap)) {
                    Some(cap) => Err(reject(
                        Reason::GasLimitTooHigh,
                        setting,
                        format!("{value} gas exceeds the cap of {cap}")
                    )),
                    None => Ok(()),
                }
            );
        }
        let caps = [
            (
                "max_fee_per_gas",
                Reason::FeeTooHigh,
                "per_op.max_fee_per_gas",
                U256::from(ctx.op.max_fee_per_gas),
                self.per_op.max_fee_per_gas,
            ),
            (
                "max_priority_fee_per_gas",
                Reason::PriorityFeeTooHigh,
                "per_op.max_priority_fee_per_gas",
                U256::from(ctx.op.max_priority_fee_per_gas),
                self.per_op.max_priority_fee_per_gas,
            ),
            (
                "max_cost",
                Reason::CostTooHigh,
                "per_op.max_cost",
                ctx.max_cost,
                self.per_op.max_cost,
            ),
        ];
        for (name, reason, setting, value, cap) in caps {
            visit!(
                Check::Named(name),
                match cap.filter(|cap| value > *cap) {
                    Some(cap) => Err(reject(
                        reason,
                        setting,
                        format!("{value} wei exceeds the cap of {cap} wei")
                    )),
                    None => Ok(()),
                }
            );
        }
        for (i, call) in ctx.calls.iter().enumerate() {
            let outcome = self
                .check_call(call)
                .map_err(|(reason, setting, detail)| Rejection {
                    call_index: Some(i),
                    ..reject(reason, &setting, detail)
                });
            visit!(Check::Call(i), outcome);
        }
    }

    fn check_call(&self, call: &Call) -> Result<(), (Reason, String, String)> {
        let Some((i, rule)) = self
            .allow
            .iter()
            .enumerate()
            .find(|(_, r)| r.target == call.target)
        else {
            return Err((
                Reason::TargetNotAllowed,
                "allow".into(),
                format!("no rule allows calls to {}", call.target),
            ));
        };
        let allowed = match (&rule.functions, call.selector()) {
            (FunctionFilter::Any, _) => true,
            (FunctionFilter::Selectors(list), Some(sel)) => list.iter().any(|(s, _)| *s == sel),
            (FunctionFilter::Selectors(_), None) => false,
        };
        if !allowed {
            let what = call.selector().map_or_else(
                || "a call without a selector".to_owned(),
                |s| format!("selector {s}"),
            );
            return Err((
                Reason::FunctionNotAllowed,
                format!("allow[{i}].functions"),
                format!("{what} on {} is not allowed", call.target),
            ));
        }
        if call.kind == CallKind::DelegateCall && !rule.delegatecall {
            return Err((
                Reason::DelegatecallNotAllowed,
                format!("allow[{i}].delegatecall"),
                format!("delegatecall to {} is not allowed", call.target),
            ));
        }
        if call.value > rule.max_value {
            return Err((
                Reason::ValueTooHigh,
                format!("allow[{i}].max_value"),
                format!("value {} wei exceeds {} wei", call.value, rule.max_value),
            ));
        }
        Ok(())
    }
}

/// The loaded policies, by id.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<Policy>,
    version: B256,
}

impl PolicySet {
    /// A set from policies with distinct ids (sorted by id), with the version of its sources.
    pub fn new(mut policies: Vec<Policy>, version: B256) -> Self {
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        Self { policies, version }
    }

    /// Hash of the files it was loaded from (`file::version_of`).
    pub fn version(&self) -> B256 {
        self.version
    }

    /// The policy with this id.
    pub fn get(&self, id: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.id == id)
    }

    /// Every policy, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.policies.iter()
    }

    /// The longest `max_validity` of its policies (s; 0 with none): no signature made under
    /// this set lives longer.
    pub fn longest_validity(&self) -> u64 {
        self.policies
            .iter()
            .map(|p| p.max_validity.as_secs())
            .max()
            .unwrap_or(0)
    }

    /// Every policy's id, in order.
    pub fn ids(&self) -> Vec<String> {
        self.policies.iter().map(|p| p.id.clone()).collect()
    }

    /// How many policies are loaded.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether no policy is loaded.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{Bytes, keccak256};

    const TARGET: Address = Address::repeat_byte(0x11);
    const FACTORY: Address = Address::repeat_byte(0xfa);
    const DELEGATE: Address = Address::repeat_byte(0xd1);

    fn eip7702(delegate: Address) -> crate::userop::eip7702::Eip7702 {
        crate::userop::eip7702::Eip7702 {
            marker: Bytes::from_static(&[0x77, 0x02]),
            auth: crate::userop::eip7702::Eip7702Auth {
                address: delegate,
                chain_id: U256::ZERO,
                nonce: 0,
                r: U256::from(1u64),
                s: U256::from(1u64),
                y_parity: 0,
            },
        }
    }

    fn policy() -> Policy {
        Policy {
            id: "p".into(),
            description: String::new(),
            chains: vec![31337],
            entry_points: vec![EntryPointVersion::V0_7],
            require_session: false,
            require_session_proof: false,
            max_validity: Duration::from_secs(600),
            active_until: Some(2_000),
            max_sessions: None,
            per_op: PerOpLimits {
                max_cost: Some(U256::from(1_000_000u64)),
                max_fee_per_gas: Some(U256::from(100u64)),
                max_priority_fee_per_gas: Some(U256::from(10u64)),
                max_verification_gas_limit: Some(500),
                max_call_gas_limit: Some(600),
                max_pre_verification_gas: Some(700),
            },
            budgets: Budgets::default(),
            rate_per_sender: None,
            rate_per_session: None,
            senders: SenderLists {
                allow: vec![],
                deny: vec![Address::repeat_byte(0xdd)],
            },
            factories: vec![FACTORY],
            delegates: vec![DELEGATE],
            allow: vec![AllowRule {
                target: TARGET,
                functions: FunctionFilter::Selectors(vec![(
                    FixedBytes::from_slice(&keccak256("increment()")[..4]),
                    "increment()".into(),
                )]),
                max_value: U256::from(5u64),
                delegatecall: false,
            }],
        }
    }

    fn call(target: Address, sig: &str, value: u64) -> Call {
        Call::new(
            target,
            U256::from(value),
            Bytes::copy_from_slice(&keccak256(sig)[..4]),
        )
    }

    /// Each row: a change to a good context, and the reason (and call index) it must produce.
    #[test]
    fn rule_table() {
        type Mutate = fn(&mut UserOperation, &mut Vec<Call>, &mut u64, &mut u64, &mut U256);
        type Expected = Option<(Reason, Option<usize>)>;
        let rows: Vec<(&str, Mutate, Expected)> = vec![
            ("good", |_, _, _, _, _| {}, None),
            (
                "chain",
                |_, _, chain, _, _| *chain = 1,
                Some((Reason::ChainNotAllowed, None)),
            ),
            (
                "ended",
                |_, _, _, now, _| *now = 2_000,
                Some((Reason::PolicyInactive, None)),
            ),
            (
                "fee",
                |op, _, _, _, _| op.max_fee_per_gas = 101,
                Some((Reason::FeeTooHigh, None)),
            ),
            (
                "tip",
                |op, _, _, _, _| op.max_priority_fee_per_gas = 11,
                Some((Reason::PriorityFeeTooHigh, None)),
            ),
            (
                "cost",
                |_, _, _, _, cost| *cost = U256::from(1_000_001u64),
                Some((Reason::CostTooHigh, None)),
            ),
            (
                "target",
                |_, calls, _, _, _| calls.push(call(Address::repeat_byte(0x22), "increment()", 0)),
                Some((Reason::TargetNotAllowed, Some(1))),
            ),
            (
                "function",
                |_, calls, _, _, _| calls[0] = call(TARGET, "drain()", 0),
                Some((Reason::FunctionNotAllowed, Some(0))),
            ),
            (
                "no selector",
                |_, calls, _, _, _| calls[0].data = Bytes::new(),
                Some((Reason::FunctionNotAllowed, Some(0))),
            ),
            (
                "value",
                |_, calls, _, _, _| calls[0].value = U256::from(6u64),
                Some((Reason::ValueTooHigh, Some(0))),
            ),
            (
                "listed factory",
                |op, _, _, _, _| op.factory = Some(FACTORY),
                None,
            ),
            (
                "unlisted factory",
                |op, _, _, _, _| op.factory = Some(Address::repeat_byte(0xfb)),
                Some((Reason::FactoryNotAllowed, None)),
            ),
            (
                "listed delegate",
                |op, _, _, _, _| op.eip7702 = Some(eip7702(DELEGATE)),
                None,
            ),
            (
                "unlisted delegate",
                |op, _, _, _, _| op.eip7702 = Some(eip7702(Address::repeat_byte(0xde))),
                Some((Reason::DelegateNotAllowed, None)),
            ),
            (
                "denied sender",
                |op, _, _, _, _| op.sender = Address::repeat_byte(0xdd),
                Some((Reason::SenderDenied, None)),
            ),
            (
                "verification gas",
                |op, _, _, _, _| op.verification_gas_limit = 501,
                Some((Reason::GasLimitTooHigh, None)),
            ),
            (
                "call gas",
                |op, _, _, _, _| op.call_gas_limit = 601,
                Some((Reason::GasLimitTooHigh, None)),
            ),
            (
                "pre-verification gas",
                |op, _, _, _, _| op.pre_verification_gas = U256::from(701u64),
                Some((Reason::GasLimitTooHigh, None)),
            ),
            (
                "delegatecall",
                |_, calls, _, _, _| calls[0].kind = CallKind::DelegateCall,
                Some((Reason::DelegatecallNotAllowed, Some(0))),
            ),
        ];
        for (name, mutate, expected) in rows {
            let mut op = UserOperation {
                max_fee_per_gas: 100,
                max_priority_fee_per_gas: 10,
                ..Default::default()
            };
            let mut calls = vec![call(TARGET, "increment()", 5)];
            let (mut chain, mut now, mut cost) = (31337, 1_000, U256::from(1_000_000u64));
            mutate(&mut op, &mut calls, &mut chain, &mut now, &mut cost);
            let ctx = OpContext {
                chain_id: chain,
                version: EntryPointVersion::V0_7,
                op: &op,
                calls: &calls,
                max_cost: cost,
                now,
            };
            let got = policy().check(&ctx).err().map(|r| (r.reason, r.call_index));
            assert_eq!(got, expected, "{name}");
        }
        let ctx_v08 = OpContext {
            chain_id: 31337,
            version: EntryPointVersion::V0_8,
            op: &UserOperation::default(),
            calls: &[],
            max_cost: U256::ZERO,
            now: 0,
        };
        assert_eq!(
            policy().check(&ctx_v08).err().map(|r| r.reason),
            Some(Reason::EntryPointNotAllowed)
        );
    }
}
