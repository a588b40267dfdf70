//! Why an operation is not sponsored: one [`Reason`] per wire name, each with its row in
//! docs/rpc.md (a test reads the docs for every variant), and the [`Rejection`] that carries
//! it with the setting that decided.

use std::fmt;

/// A stable, machine-readable reason for a refusal (`error.data.reason` of a -32003 answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// `callData` is no account call this paymaster decodes.
    UnknownAccountCall,
    /// A known account call whose arguments do not decode.
    MalformedCalldata,
    /// The operation makes no call (an empty batch): nothing a policy could have meant to pay.
    NoCalls,
    /// The operation deploys its account through a factory the policy does not list.
    FactoryNotAllowed,
    /// The policy does not list the chain.
    ChainNotAllowed,
    /// The policy does not list the EntryPoint version.
    EntryPointNotAllowed,
    /// The policy's `active_until` has passed.
    PolicyInactive,
    /// `maxFeePerGas` above the policy's cap.
    FeeTooHigh,
    /// `maxPriorityFeePerGas` above the policy's cap.
    PriorityFeeTooHigh,
    /// Worst-case cost above the policy's cap.
    CostTooHigh,
    /// A call's target has no `[[allow]]` rule.
    TargetNotAllowed,
    /// A call's selector is not in its rule's `functions`.
    FunctionNotAllowed,
    /// A call's native value above its rule's `max_value`.
    ValueTooHigh,
    /// A delegatecall the rule does not allow.
    DelegatecallNotAllowed,
    /// The sender is on the deny list.
    SenderDenied,
    /// The sender is not on a non-empty allow list.
    SenderNotAllowed,
    /// A gas limit above the policy's cap.
    GasLimitTooHigh,
    /// `sessionId` names no session grant.
    SessionNotFound,
    /// The session was revoked.
    SessionRevoked,
    /// The session has ended.
    SessionExpired,
    /// The session has not started.
    SessionNotYetValid,
    /// The sender is not the session's account.
    SessionAccountMismatch,
    /// The session is for another chain.
    SessionChainMismatch,
    /// A call's target is outside the session's own allow-list.
    SessionTargetNotAllowed,
    /// A call's function is outside the session's own allow-list.
    SessionFunctionNotAllowed,
    /// A call's value is above the session's own cap.
    SessionValueTooHigh,
    /// A session token cap would be exceeded (this operation, or the session's total).
    SpendLimitExceeded,
    /// An unlimited `approve` of a capped token.
    UnlimitedApproval,
    /// A call to a capped token that is not a decodable `transfer`/`transferFrom`/`approve`.
    TokenCallNotAllowed,
    /// The session proof is missing, expired or not the session key's signature.
    InvalidSessionProof,
    /// `sponsorshipPolicyId` names another policy than the session's.
    PolicyMismatch,
    /// The API key may not use the policy.
    PolicyNotAllowed,
    /// A policy named (by the context or a session) is not loaded.
    UnknownPolicy,
    /// The named policy sponsors only operations under a session.
    SessionRequired,
    /// No policy sponsors operations without a session here.
    NoPolicy,
    /// Several candidate policies, none accepts.
    NoMatchingPolicy,
    /// A budget would be exceeded.
    BudgetExhausted,
    /// Policy and context leave no time for the signature to be valid.
    EmptyValidityWindow,
    /// The bundler could not estimate the operation's gas (it refused, or did not answer).
    EstimationFailed,
}

impl Reason {
    /// Every reason, in docs order.
    pub const ALL: [Self; 39] = [
        Self::UnknownAccountCall,
        Self::MalformedCalldata,
        Self::NoCalls,
        Self::FactoryNotAllowed,
        Self::ChainNotAllowed,
        Self::EntryPointNotAllowed,
        Self::PolicyInactive,
        Self::FeeTooHigh,
        Self::PriorityFeeTooHigh,
        Self::CostTooHigh,
        Self::TargetNotAllowed,
        Self::FunctionNotAllowed,
        Self::ValueTooHigh,
        Self::DelegatecallNotAllowed,
        Self::SenderDenied,
        Self::SenderNotAllowed,
        Self::GasLimitTooHigh,
        Self::SessionNotFound,
        Self::SessionRevoked,
        Self::SessionExpired,
        Self::SessionNotYetValid,
        Self::SessionAccountMismatch,
        Self::SessionChainMismatch,
        Self::SessionTargetNotAllowed,
        Self::SessionFunctionNotAllowed,
        Self::SessionValueTooHigh,
        Self::SpendLimitExceeded,
        Self::UnlimitedApproval,
        Self::TokenCallNotAllowed,
        Self::InvalidSessionProof,
        Self::PolicyMismatch,
        Self::PolicyNotAllowed,
        Self::UnknownPolicy,
        Self::SessionRequired,
        Self::NoPolicy,
        Self::NoMatchingPolicy,
        Self::BudgetExhausted,
        Self::EmptyValidityWindow,
        Self::EstimationFailed,
    ];

    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UnknownAccountCall => "unknown_account_call",
            Self::MalformedCalldata => "malformed_calldata",
            Self::NoCalls => "no_calls",
            Self::FactoryNotAllowed => "factory_not_allowed",
            Self::ChainNotAllowed => "chain_not_allowed",
            Self::EntryPointNotAllowed => "entry_point_not_allowed",
            Self::PolicyInactive => "policy_inactive",
            Self::FeeTooHigh => "fee_too_high",
            Self::PriorityFeeTooHigh => "priority_fee_too_high",
            Self::CostTooHigh => "cost_too_high",
            Self::TargetNotAllowed => "target_not_allowed",
            Self::FunctionNotAllowed => "function_not_allowed",
            Self::ValueTooHigh => "value_too_high",
            Self::DelegatecallNotAllowed => "delegatecall_not_allowed",
            Self::SenderDenied => "sender_denied",
            Self::SenderNotAllowed => "sender_not_allowed",
            Self::GasLimitTooHigh => "gas_limit_too_high",
            Self::SessionNotFound => "session_not_found",
            Self::SessionRevoked => "session_revoked",
            Self::SessionExpired => "session_expired",
            Self::SessionNotYetValid => "session_not_yet_valid",
            Self::SessionAccountMismatch => "session_account_mismatch",
            Self::SessionChainMismatch => "session_chain_mismatch",
            Self::SessionTargetNotAllowed => "session_target_not_allowed",
            Self::SessionFunctionNotAllowed => "session_function_not_allowed",
            Self::SessionValueTooHigh => "session_value_too_high",
            Self::SpendLimitExceeded => "spend_limit_exceeded",
            Self::UnlimitedApproval => "unlimited_approval",
            Self::TokenCallNotAllowed => "token_call_not_allowed",
            Self::InvalidSessionProof => "invalid_session_proof",
            Self::PolicyMismatch => "policy_mismatch",
            Self::PolicyNotAllowed => "policy_not_allowed",
            Self::UnknownPolicy => "unknown_policy",
            Self::SessionRequired => "session_required",
            Self::NoPolicy => "no_policy",
            Self::NoMatchingPolicy => "no_matching_policy",
            Self::BudgetExhausted => "budget_exhausted",
            Self::EmptyValidityWindow => "empty_validity_window",
            Self::EstimationFailed => "estimation_failed",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the reason, the setting that decided, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable machine-readable reason.
    pub reason: Reason,
    /// The policy (or grant) and setting, e.g. `game.allow` or `session.permissions.spend[0]`.
    pub rule: String,
    /// Human-readable detail.
    pub detail: String,
    /// Index of the offending call in the decoded batch.
    pub call_index: Option<usize>,
}

impl Rejection {
    /// A rejection not tied to one call.
    pub fn new(reason: Reason, rule: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            reason,
            rule: rule.into(),
            detail: detail.into(),
            call_index: None,
        }
    }

    /// The same, pointing at call `index` of the decoded batch.
    pub fn at_call(self, index: usize) -> Self {
        Self {
            call_index: Some(index),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/rpc.md has a row for every reason, and names none that does not exist.
    #[test]
    fn every_reason_has_its_docs_row() -> Result<(), std::io::Error> {
        let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/rpc.md"))?;
        for reason in Reason::ALL {
            assert!(
                docs.contains(&format!("`{reason}`")),
                "docs/rpc.md has no row for `{reason}`"
            );
        }
        let names: std::collections::BTreeSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len(), "wire names are distinct");
        Ok(())
    }
}
