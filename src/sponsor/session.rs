//! Steps 2 and 4: the session grant the context names (the one store read of the hot path, or
//! this replica's recent copy: [`crate::session::cache`]), then, once its policy is chosen, the
//! grant's own checks and the session key's proof.

use std::sync::Arc;

use super::explain::Trace;
use super::{Mode, Reason, Rejection, RequestContext, Sponsor, SponsorError, SponsorRequest};
use crate::policy::{OpContext, Policy};
use crate::session::SessionGrant;

pub(super) async fn load(
    sponsor: &Sponsor,
    context: &RequestContext,
) -> Result<Option<Arc<SessionGrant>>, SponsorError> {
    let Some(id) = context.session_id else {
        return Ok(None);
    };
    let (grant, source) = sponsor.sessions.get_for_sponsorship(id).await?;
    sponsor.metrics.grant_read(source);
    let grant = grant.ok_or_else(|| {
        Rejection::new(
            Reason::SessionNotFound,
            "context.sessionId",
            format!("no session {id}"),
        )
    })?;
    Ok(Some(grant))
}

/// The grant narrows `policy` (whose own rules passed): window, account, permissions, token
/// caps for this operation, and, when the policy asks for it on a signed request, the proof.
pub(super) fn check(
    grant: &SessionGrant,
    policy: &Policy,
    req: SponsorRequest<'_>,
    ctx: &OpContext<'_>,
    trace: &mut Trace,
) -> Result<(), SponsorError> {
    let outcome = grant
        .check_op(ctx.op, ctx.calls, ctx.now)
        .and_then(|()| check_proof(grant, policy, req, ctx.now));
    trace.record(&policy.id, "session", &outcome);
    Ok(outcome?)
}

/// Stubs sign nothing, so they need no proof (their gas fields are not final yet, and the
/// proof binds them).
fn check_proof(
    grant: &SessionGrant,
    policy: &Policy,
    req: SponsorRequest<'_>,
    now: u64,
) -> Result<(), Rejection> {
    if !policy.require_session_proof || req.mode == Mode::Stub {
        return Ok(());
    }
    let reject = |detail: &str| {
        Rejection::new(
            Reason::InvalidSessionProof,
            format!("{}.require_session_proof", policy.id),
            detail,
        )
    };
    let (Some(proof), Some(deadline)) = (
        &req.context.session_proof,
        req.context.session_proof_deadline,
    ) else {
        return Err(reject(
            "context.sessionProof and context.sessionProofDeadline are required",
        ));
    };
    if now > deadline {
        return Err(reject("context.sessionProofDeadline has passed"));
    }
    if !grant.proof_is_valid(proof, req.entry_point, req.op, deadline) {
        return Err(reject(
            "context.sessionProof is not the session key's signature of this operation and deadline",
        ));
    }
    Ok(())
}
