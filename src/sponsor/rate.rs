//! Step 6: rate limits (per API key at the HTTP layer; here per sender and per session, from
//! the policy's `[rate]`). Only signed sponsorships count: stubs and explanations are free.
//! Checked before the reservation, so a limited request changes no budget and no token total
//! (the reservation step is also where a repeat is recognised, so a repeat counts as a call).

use super::{Sponsor, SponsorError, SponsorRequest};
use crate::policy::Policy;

pub(super) fn check(
    sponsor: &Sponsor,
    policy: &Policy,
    req: SponsorRequest<'_>,
) -> Result<(), SponsorError> {
    sponsor
        .limits
        .check_policy(policy, req.op.sender, req.context.session_id)
        .map_err(SponsorError::RateLimited)
}
