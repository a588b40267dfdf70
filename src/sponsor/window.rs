//! Step 5: how long the signature is valid: the policy's `max_validity`, shortened by the
//! session's end, the policy's `active_until`, the context's `validForSeconds` and, under a
//! policy that requires session proofs, the proof's deadline. A v0.9 client that asked for the
//! signature in the suffix keeps the window it already has (and may have signed) when that
//! window lies within this one.

use alloy::primitives::Address;

use super::decode::Decoded;
use super::{Reason, Rejection, SponsorError, SponsorRequest};
use crate::policy::Policy;
use crate::session::SessionGrant;
use crate::userop::PaymasterFields;
use crate::userop::paymaster_data::{PaymasterData, PaymasterLayout, ValidityWindow};

/// How far in the past `validAfter` is put. v0.8 and later require `block.timestamp > validAfter`, so
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
    let sent = (req.context.layout == PaymasterLayout::Suffix)
        .then_some(req.op.paymaster.as_ref())
        .flatten();
    Ok(kept_client_window(sent, decoded.paymaster, now, ours).unwrap_or(ours))
}

/// How old a kept window's start may be: the stub came a little before the final request.
const MAX_KEPT_WINDOW_AGE_SECS: u64 = 3600;

/// In the suffix layout the account signs the userOpHash, which covers `paymasterData` (the
/// window), possibly before asking us for the signature: the window `sent` with our
/// `paymaster` is kept when it ends no later than `ours` and has not ended, and started at most
/// [`MAX_KEPT_WINDOW_AGE_SECS`] ago (not in the future: a start below 2^47 is never read as a
/// v0.9 block range, which takes the top bit of both ends). An earlier start than ours opens
/// nothing: the op cannot land in the past.
fn kept_client_window(
    sent: Option<&PaymasterFields>,
    paymaster: Address,
    now: u64,
    ours: ValidityWindow,
) -> Option<ValidityWindow> {
    let sent = sent.filter(|s| s.paymaster == paymaster)?;
    let theirs = PaymasterData::decode_window(&sent.data).ok()?;
    let open = theirs.valid_until > now && theirs.valid_until <= ours.valid_until;
    let recent = theirs.valid_after <= now
        && theirs.valid_after.saturating_add(MAX_KEPT_WINDOW_AGE_SECS) >= now;
    (open && recent).then_some(theirs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::Bytes;

    const NOW: u64 = 1_800_000_000;

    fn sent(paymaster: Address, after: u64, until: u64) -> PaymasterFields {
        let mut data = until.to_be_bytes()[2..].to_vec();
        data.extend_from_slice(&after.to_be_bytes()[2..]);
        PaymasterFields {
            paymaster,
            data: Bytes::from(data),
            ..Default::default()
        }
    }

    #[test]
    fn a_clients_window_is_kept_only_within_ours() -> Result<(), Box<dyn std::error::Error>> {
        let pm = Address::repeat_byte(9);
        let ours = ValidityWindow::new(NOW - 60, NOW + 600)?;
        let keep = |s: &PaymasterFields| kept_client_window(Some(s), pm, NOW, ours);
        // The stub's window of a few seconds ago: kept.
        let stub = sent(pm, NOW - 65, NOW + 595);
        assert_eq!(keep(&stub), Some(ValidityWindow::new(NOW - 65, NOW + 595)?));
        assert_eq!(keep(&sent(pm, NOW - 60, NOW + 600)), Some(ours));
        for (why, s) in [
            ("ends after ours", sent(pm, NOW - 60, NOW + 601)),
            ("ended", sent(pm, NOW - 600, NOW)),
            ("starts in the future", sent(pm, NOW + 1, NOW + 600)),
            ("started too long ago", sent(pm, NOW - 3601, NOW + 600)),
            ("v0.9 block range", sent(pm, (1 << 47) + 1, (1 << 47) + 2)),
            (
                "another paymaster",
                sent(Address::repeat_byte(8), NOW - 60, NOW + 600),
            ),
        ] {
            assert_eq!(keep(&s), None, "{why}");
        }
        let mut inline = stub.clone();
        inline.data = [stub.data.to_vec(), vec![0; 65]].concat().into();
        assert_eq!(keep(&inline), None, "not a bare window");
        assert_eq!(kept_client_window(None, pm, NOW, ours), None);
        Ok(())
    }
}
