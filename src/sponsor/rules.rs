//! A policy's rules over the decoded operation (`Policy::check`); under explain, every rule is
//! run and recorded instead of stopping at the first that refuses.

use super::Rejection;
use super::explain::Trace;
use crate::policy::{OpContext, Policy};

pub(super) fn check(
    policy: &Policy,
    ctx: &OpContext<'_>,
    trace: &mut Trace,
) -> Result<(), Rejection> {
    if !trace.is_on() {
        return policy.check(ctx);
    }
    let mut first = Ok(());
    for (check, outcome) in policy.explain(ctx) {
        trace.record(&policy.id, &check, &outcome);
        if first.is_ok() {
            first = outcome;
        }
    }
    first
}
