//! Step 5: how long the signature is valid: the policy's `max_validity`, shortened by the
//! session's end, the policy's `active_until`, the context's `validForSeconds` and, under a
//! policy that requires session proofs, the proof's deadline.

use super::{Reason, Rejection, RequestContext, SponsorError};
use crate::policy::Policy;
use crate::session::SessionGrant;
use crate::userop::paymaster_data::ValidityWindow;

/// How far in the past `validAfter` is put. v0.8 requires `block.timestamp > validAfter`, so
/// "now" would fail for an op mined in the same second; and block timestamps may trail our
/// clock. Starting a minute early gives nothing away: `validUntil` is what bounds a signature.
pub const VALID_AFTER_SKEW_SECS: u64 = 60;

pub(super) fn window(
    policy: &Policy,
    grant: Option<&SessionGrant>,
    context: &RequestContext,
    now: u64,
) -> Result<ValidityWindow, SponsorError> {
    let mut valid_until = now.saturating_add(policy.max_validity.as_secs());
    if let Some(grant) = grant {
        valid_until = valid_until.min(grant.valid_until);
    }
    if let Some(end) = policy.active_until {
        valid_until = valid_until.min(end);
    }
    if let Some(secs) = context.valid_for_seconds {
        valid_until = valid_until.min(now.saturating_add(secs));
    }
    if policy.require_session_proof
        && let Some(deadline) = context.session_proof_deadline
    {
        valid_until = valid_until.min(deadline);
    }
    ValidityWindow::new(now.saturating_sub(VALID_AFTER_SKEW_SECS), valid_until)
        .map_err(|e| Rejection::new(Reason::EmptyValidityWindow, "validity", e.to_string()).into())
}
