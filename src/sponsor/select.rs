//! Step 3: which policy sponsors the operation, with its rules checked: the session's (which
//! must be loaded, for this chain, and not contradicted by `sponsorshipPolicyId`), the one the
//! context names, or else the first (by id) of the policies that sponsor without a session
//! here. The API key's policy list applies to all three.

use super::explain::Trace;
use super::{Reason, Rejection, SponsorError, SponsorRequest, rules};
use crate::policy::{OpContext, Policy, PolicySet};
use crate::session::SessionGrant;

pub(super) fn choose<'p>(
    policies: &'p PolicySet,
    req: SponsorRequest<'_>,
    grant: Option<&SessionGrant>,
    ctx: &OpContext<'_>,
    trace: &mut Trace,
) -> Result<&'p Policy, SponsorError> {
    let named = req.context.sponsorship_policy_id.as_deref();
    let policy = match (grant, named) {
        (Some(grant), _) => {
            // Another tenant's session is, to this API key, no session at all.
            if req
                .allowed_policies
                .is_some_and(|ids| !ids.contains(&grant.policy))
            {
                return Err(Rejection::new(
                    Reason::SessionNotFound,
                    "context.sessionId",
                    format!("no session {}", grant.session_id),
                )
                .into());
            }
            session_policy(policies, grant, named, ctx.chain_id)?
        }
        (None, Some(id)) => {
            // The key's list first: to a key limited to some policies, every other id, loaded
            // or not, is the same refusal (which ids another tenant's policies have is not
            // this key's to learn).
            check_allowed(id, req.allowed_policies)?;
            let policy = policies.get(id).ok_or_else(|| {
                Rejection::new(
                    Reason::UnknownPolicy,
                    "context.sponsorshipPolicyId",
                    format!("unknown sponsorship policy `{}`", crate::wire::echo(id)),
                )
            })?;
            if policy.require_session {
                return Err(Rejection::new(
                    Reason::SessionRequired,
                    format!("{}.require_session", policy.id),
                    "this policy sponsors only operations made under a session (context.sessionId)",
                )
                .into());
            }
            policy
        }
        (None, None) => return first_accepting(policies, req.allowed_policies, ctx, trace),
    };
    rules::check(policy, ctx, trace)?;
    Ok(policy)
}

fn session_policy<'p>(
    policies: &'p PolicySet,
    grant: &SessionGrant,
    named: Option<&str>,
    chain_id: u64,
) -> Result<&'p Policy, Rejection> {
    if grant.chain_id != chain_id {
        return Err(Rejection::new(
            Reason::SessionChainMismatch,
            "session.chainId",
            format!("the session is for chain {}", grant.chain_id),
        ));
    }
    let policy = policies.get(&grant.policy).ok_or_else(|| {
        Rejection::new(
            Reason::UnknownPolicy,
            "session.policy",
            format!("the session's policy `{}` is not loaded", grant.policy),
        )
    })?;
    if let Some(id) = named.filter(|id| *id != grant.policy) {
        return Err(Rejection::new(
            Reason::PolicyMismatch,
            "context.sponsorshipPolicyId",
            format!(
                "the session is granted under `{}`, not `{}`",
                grant.policy,
                crate::wire::echo(id)
            ),
        ));
    }
    Ok(policy)
}

/// The first candidate whose rules accept; else why not (one candidate: its own reason).
fn first_accepting<'p>(
    policies: &'p PolicySet,
    allowed: Option<&[String]>,
    ctx: &OpContext<'_>,
    trace: &mut Trace,
) -> Result<&'p Policy, SponsorError> {
    let mut rejections = Vec::new();
    for policy in candidates(policies, ctx).filter(|p| crate::apikey::reaches(allowed, &p.id)) {
        match rules::check(policy, ctx, trace) {
            Ok(()) => return Ok(policy),
            Err(r) => rejections.push(r),
        }
    }
    Err(match rejections.len() {
        0 => Rejection::new(
            Reason::NoPolicy,
            "policies",
            "no policy sponsors operations without a session on this chain and EntryPoint",
        ),
        1 => rejections.remove(0),
        _ => Rejection::new(
            Reason::NoMatchingPolicy,
            "policies",
            rejections
                .iter()
                .map(|r| format!("{}: {} ({})", r.rule, r.reason, r.detail))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
    .into())
}

/// Policies that may sponsor without a session on this chain and EntryPoint version (a policy
/// for another chain is no answer to why an operation was refused).
fn candidates<'p>(
    policies: &'p PolicySet,
    ctx: &OpContext<'_>,
) -> impl Iterator<Item = &'p Policy> {
    let (chain, version) = (ctx.chain_id, ctx.version);
    policies.iter().filter(move |p| {
        !p.require_session && p.chains.contains(&chain) && p.entry_points.contains(&version)
    })
}

/// An API key may be limited to some policies: policy `id` (named by the client, loaded or
/// not) must be one of them.
fn check_allowed(id: &str, allowed: Option<&[String]>) -> Result<(), Rejection> {
    match allowed {
        Some(_) if !crate::apikey::reaches(allowed, id) => Err(Rejection::new(
            Reason::PolicyNotAllowed,
            "apiKey.policies",
            format!(
                "this API key may not use policy `{}`",
                crate::wire::echo(id)
            ),
        )),
        _ => Ok(()),
    }
}
