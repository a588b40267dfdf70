//! Step 7: the paymaster signature over `SessionPaymaster.getHash` (DESIGN §3), or stub data
//! of the same length. It is made before the reservation because the reservation records the
//! userOpHash, which covers it; it leaves the process only once the reservation took it.

use std::time::Instant;

use super::decode::Decoded;
use super::{Run, Sponsor, SponsorError, SponsorRequest};
use crate::userop::hash::paymaster_hash_with;
use crate::userop::paymaster_data::{PaymasterData, ValidityWindow};

pub(super) fn sign(
    sponsor: &Sponsor,
    req: SponsorRequest<'_>,
    decoded: &Decoded,
    window: ValidityWindow,
    run: Run,
) -> Result<PaymasterData, SponsorError> {
    if run != Run::Sign {
        return Ok(PaymasterData::stub(window));
    }
    let hash = paymaster_hash_with(
        req.op,
        &decoded.digests,
        decoded.gas,
        decoded.paymaster,
        req.chain_id,
        window,
    );
    let started = Instant::now();
    let signature = sponsor.signer.sign_eip191(hash)?;
    sponsor.metrics.sign_seconds.observe(started.elapsed());
    Ok(PaymasterData { window, signature })
}
