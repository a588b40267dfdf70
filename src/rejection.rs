//! Why an operation is not sponsored: one [`Reason`] per wire name, each with its row in
//! docs/rpc.md (a test checks both directions), and the [`Rejection`] that carries it with the
//! setting that decided. A leaf module: the policy and session checks, the pipeline
//! ([`crate::sponsor`]) and the RPC error table all use it.

use std::fmt;

/// The enum, its list and its wire names from one table, so no list can miss a variant.
macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $variant:ident => $wire:literal,)+) => {
        /// A stable, machine-readable reason for a refusal (`error.data.reason` of a -32003
        /// answer, and the `reason` label of `sp_rejections_total`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[doc = $doc])* $variant,)+
        }

        impl Reason {
            /// Every reason, in docs order.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];

            /// The wire name.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $wire,)+
                }
            }
        }
    };
}

reasons! {
    /// `callData` is no account call this paymaster decodes.
    UnknownAccountCall => "unknown_account_call",
    /// A known account call whose arguments do not decode, calls nested too deep, or a
    /// `callData` past the decoder's bounds (too many calls, too many bytes copied).
    MalformedCalldata => "malformed_calldata",
    /// The operation makes no call (an empty batch): nothing a policy could have meant to pay.
    NoCalls => "no_calls",
    /// The operation deploys its account through a factory the policy does not list.
    FactoryNotAllowed => "factory_not_allowed",
    /// An EIP-7702 account delegating to an implementation the policy does not list.
    DelegateNotAllowed => "delegate_not_allowed",
    /// The policy does not list the chain.
    ChainNotAllowed => "chain_not_allowed",
    /// The policy does not list the EntryPoint version.
    EntryPointNotAllowed => "entry_point_not_allowed",
    /// The policy's `active_until` has passed.
    PolicyInactive => "policy_inactive",
    /// `maxFeePerGas` above the policy's cap.
    FeeTooHigh => "fee_too_high",
    /// `maxPriorityFeePerGas` above the policy's cap.
    PriorityFeeTooHigh => "priority_fee_too_high",
    /// Worst-case cost above the policy's cap.
    CostTooHigh => "cost_too_high",
    /// A call's target has no `[[allow]]` rule.
    TargetNotAllowed => "target_not_allowed",
    /// A call's selector is not in its rule's `functions`.
    FunctionNotAllowed => "function_not_allowed",
    /// A call's native value above its rule's `max_value`.
    ValueTooHigh => "value_too_high",
    /// A delegatecall the rule does not allow.
    DelegatecallNotAllowed => "delegatecall_not_allowed",
    /// The sender is on the deny list.
    SenderDenied => "sender_denied",
    /// The sender is not on a non-empty allow list.
    SenderNotAllowed => "sender_not_allowed",
    /// A gas limit above the policy's cap.
    GasLimitTooHigh => "gas_limit_too_high",
    /// `sessionId` names no session grant.
    SessionNotFound => "session_not_found",
    /// The session was revoked.
    SessionRevoked => "session_revoked",
    /// The session has ended.
    SessionExpired => "session_expired",
    /// The session has not started.
    SessionNotYetValid => "session_not_yet_valid",
    /// The sender is not the session's account.
    SessionAccountMismatch => "session_account_mismatch",
    /// The session is for another chain.
    SessionChainMismatch => "session_chain_mismatch",
    /// A call's target is outside the session's own allow-list.
    SessionTargetNotAllowed => "session_target_not_allowed",
    /// A call's function is outside the session's own allow-list.
    SessionFunctionNotAllowed => "session_function_not_allowed",
    /// A call's value is above the session's own cap.
    SessionValueTooHigh => "session_value_too_high",
    /// A session token cap would be exceeded (this operation, or the session's total).
    SpendLimitExceeded => "spend_limit_exceeded",
    /// An unlimited `approve` of a capped token.
    UnlimitedApproval => "unlimited_approval",
    /// A call to a capped token that is not a decodable `transfer`/`transferFrom`/`approve`.
    TokenCallNotAllowed => "token_call_not_allowed",
    /// The session proof is missing, expired or not the session key's signature.
    InvalidSessionProof => "invalid_session_proof",
    /// `sponsorshipPolicyId` names another policy than the session's.
    PolicyMismatch => "policy_mismatch",
    /// The API key may not use the policy.
    PolicyNotAllowed => "policy_not_allowed",
    /// A policy named (by the context or a session) is not loaded.
    UnknownPolicy => "unknown_policy",
    /// The named policy sponsors only operations under a session.
    SessionRequired => "session_required",
    /// No policy sponsors operations without a session here.
    NoPolicy => "no_policy",
    /// Several candidate policies, none accepts.
    NoMatchingPolicy => "no_matching_policy",
    /// A budget would be exceeded.
    BudgetExhausted => "budget_exhausted",
    /// The paymaster's EntryPoint deposit would not cover the operation on top of the open
    /// reservations.
    DepositLow => "deposit_low",
    /// The operation's sender and nonce already have as many open sponsorships as allowed.
    NoncePending => "nonce_pending",
    /// Policy and context leave no time for the signature to be valid.
    EmptyValidityWindow => "empty_validity_window",
    /// The bundler could not estimate the operation's gas (it refused, or did not answer).
    EstimationFailed => "estimation_failed",
}

impl Reason {
    /// The reason with this wire name.
    pub fn from_wire(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| r.as_str() == name)
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

    /// docs/rpc.md's table of `-32003` reasons has a row for every reason, and no row for a
    /// reason that does not exist.
    #[test]
    fn the_docs_table_lists_exactly_the_reasons() -> Result<(), std::io::Error> {
        let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/rpc.md"))?;
        let table = docs
            .split_once("`-32003` reasons")
            .map(|(_, rest)| rest.split("\n\n").nth(1).unwrap_or_default())
            .unwrap_or_default();
        let mut documented = std::collections::BTreeSet::new();
        for row in table.lines().skip(2) {
            let first_column = row.split('|').nth(1).unwrap_or_default();
            for name in first_column.split('`').skip(1).step_by(2) {
                documented.insert(name.to_owned());
            }
        }
        let reasons: std::collections::BTreeSet<_> =
            Reason::ALL.iter().map(|r| r.as_str().to_owned()).collect();
        assert_eq!(reasons.len(), Reason::ALL.len(), "wire names are distinct");
        assert_eq!(documented, reasons, "docs/rpc.md rows vs the Reason enum");
        Ok(())
    }
}
