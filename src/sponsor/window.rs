//! Step 5: how long the signature is valid: the policy's `max_validity`, shortened by the
//! session's end, the policy's `active_until`, the context's `validForSeconds` and, under a
//! policy that requires session proofs, the proof's deadline. A v0.9 client that asked for the
//! signature in the suffix keeps the window it already has (and may have signed) when that
//! window lies within this one.

use super::decode::Decoded;
use super::{Reason, Rejection, SponsorError, SponsorRequest};
use crate::policy::Policy;
use crate::session::SessionGrant;
use crate::userop::paymaster_data::{PaymasterData, PaymasterLayout, ValidityWindow};

/// How far in the past `validAfter` is put. v0.8 requires `block.timestamp > validAfter`, so
/// "now" would fail for an op mined in the same second; and block timestamps may trail our
/// clock. Starting a minute early gives nothing away: `validUntil` is what bounds a signature.
pub const VALID_AFTER_SKEW_SECS: u64 = 60;

pub(super) fn window(
    policy: &Policy,
    grant: Option<&SessionGrant>,
    req: SponsorRequest<'_>,
    decoded: &Decoded,
    now: u64,
) -> Result<ValidityWindow, SponsorError> {
    let context = req.context;
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
    let ours = ValidityWindow::new(now.saturating_sub(VALID_AFTER_SKEW_SECS), valid_until)
        .map_err(|e| Rejection::new(Reason::EmptyValidityWindow, "validity", e.to_string()))?;
    Ok(kept_client_window(req, decoded, now, ours).unwrap_or(ours))
}

/// In the suffix layout the account signs the userOpHash, which covers `paymasterData` (the
/// window), possibly before asking us for the signature: the window it sent with our paymaster
/// is kept when it ends no later than ours and is still open. Its start may be anything: an
/// earlier one opens nothing (the op cannot land in the past), a later one only delays it. Its
/// end bounds it below 2^47, so it is never read as a v0.9 block range (top bit of both ends).
fn kept_client_window(
    req: SponsorRequest<'_>,
    decoded: &Decoded,
    now: u64,
    ours: ValidityWindow,
) -> Option<ValidityWindow> {
    if req.context.layout != PaymasterLayout::Suffix {
        return None;
    }
    let sent = req.op.paymaster.as_ref()?;
    if sent.paymaster != decoded.paymaster {
        return None;
    }
    let theirs = PaymasterData::decode_window(&sent.data).ok()?;
    (theirs.valid_until <= ours.valid_until && theirs.valid_until > now).then_some(theirs)
}
