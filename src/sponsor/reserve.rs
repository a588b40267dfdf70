//! Step 8: the one atomic ledger step (DESIGN §1, §5). In one `FCALL` (under load shared with
//! other reservations of the policy, each an atomic step of its own; or one critical
//! section in memory): the session's status (a revocation that has answered is never followed
//! by a signature, nor by an answer given before it); the answer already given for the same
//! operation, if still valid long enough; the worst-case cost in every budget scope; the
//! operation's ERC-20 spending against the session's caps. Stubs and explanations run the same
//! step to check, and reserve nothing.

use std::time::Instant;

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::sol_types::SolValue;

use super::decode::Decoded;
use super::deposit::paymaster_scope;
use super::{Decision, Reason, Rejection, Run, Sponsor, SponsorError, SponsorRequest};
use crate::ledger::{
    GRACE_SECS, MAX_EXACT_GWEI, MAX_OPEN_PER_NONCE, MAX_OPEN_PER_NONCE_ANY, MAX_RECORDS_PER_NONCE,
    Outcome, Reservation, Scope, SessionCharge, TokenCharge, landing_key, wei_to_gwei_ceil,
    wei_to_gwei_floor,
};
use crate::policy::calldata::Call;
use crate::policy::{Budget, Policy};
use crate::session::{SessionGrant, StoreError};
use crate::userop::EntryPointVersion;
use crate::userop::hash::user_op_hash_with;
use crate::userop::paymaster_data::{PaymasterData, PaymasterGas, PaymasterLayout};
use crate::userop::{OpDigests, UserOperation};

/// Reserve for the signed `data` and return what to answer: `data`, or, for a repeat of the
/// same operation, the answer signed for it before.
pub(super) async fn reserve(
    sponsor: &Sponsor,
    req: SponsorRequest<'_>,
    decoded: &Decoded,
    decision: &Decision<'_>,
    data: PaymasterData,
    now: u64,
    run: Run,
) -> Result<PaymasterData, SponsorError> {
    let Decision { policy, grant, .. } = *decision;
    let mut scopes = Sponsor::scopes(policy, grant, req.op.sender, req.chain_id, now);
    let chain = sponsor.chain(req.chain_id)?;
    let deposits = &chain.deposits;
    let tracking_deposit = deposits.tracking();
    // Without budgets, a session or a watched deposit there is nothing to count or re-check.
    if scopes.is_empty() && grant.is_none() && !tracking_deposit {
        return Ok(data);
    }
    let cost_gwei = wei_to_gwei_ceil(decoded.max_cost);
    // Only absurd gas fields under a policy without a cost cap get here.
    if cost_gwei > MAX_EXACT_GWEI {
        return Err(Rejection::new(
            Reason::CostTooHigh,
            "budgets",
            format!("a worst case of {cost_gwei} gwei is more than any budget counts"),
        )
        .into());
    }
    let check_only = run != Run::Sign;
    // Every watcher reads this paymaster's events for as long as this replica last said its
    // signatures may land: none is made to outlast that (the note failed for a grace hour).
    if !check_only && data.window.valid_until > chain.paymasters_noted_until() {
        return Err(SponsorError::Store(StoreError::Unavailable(
            "this replica could not note its paymasters for the settlement watchers lately".into(),
        )));
    }
    // A signing run's worst case is counted against the deposit from here until the ledger
    // answers (kept if it reserves, given back otherwise); a check holds nothing. The refusal
    // names no total: the open reservations are every tenant's.
    let hold = if tracking_deposit {
        let hold = deposits
            .admit(req.entry_point, cost_gwei, !check_only)
            .map_err(|short| {
                tracing::debug!(
                    deposit_gwei = short.deposit,
                    open_gwei = short.open,
                    requested_gwei = short.requested,
                    "deposit_low"
                );
                Rejection::new(
                    Reason::DepositLow,
                    "paymaster.deposit",
                    format!(
                        "the paymaster's EntryPoint deposit less its margin does not cover this \
                         operation ({} gwei) on top of the open reservations",
                        short.requested
                    ),
                )
            })?;
        // It lives as long as the reservations it sums (the ledger only ever extends a scope's
        // lifetime).
        scopes.push(Scope {
            name: paymaster_scope(req.chain_id, req.entry_point),
            rule: "paymaster.deposit".into(),
            cost_limit: None,
            ops_limit: None,
            expires_at: data.window.valid_until.saturating_add(GRACE_SECS),
            resets_at: None,
            starts_at: None,
        });
        Some(hold)
    } else {
        None
    };
    let reservation = Reservation {
        policy: policy.id.clone(),
        op_key: idempotency_key(
            req.chain_id,
            req.entry_point,
            decoded.paymaster,
            req.op,
            &decoded.digests,
            decoded.gas,
        ),
        landing_key: landing_key(req.chain_id, req.entry_point, req.op.sender, req.op.nonce),
        // The hashes the op may have on chain: ours is its only paymaster data. On v0.9 the
        // same signature is valid inline and in the suffix, whichever the client asked for, and
        // the suffix is outside the hash: both are recorded, or an op landed in the other
        // layout would match no reservation.
        user_op_hashes: layouts(decoded.version)
            .iter()
            .map(|&layout| {
                user_op_hash_with(
                    decoded.version,
                    req.op,
                    &decoded.digests,
                    Some(&data.fields(decoded.paymaster, decoded.gas, layout)),
                    req.entry_point,
                    req.chain_id,
                )
            })
            .collect(),
        answer: data.clone(),
        cost_gwei,
        scopes,
        session: grant.map(|g| SessionCharge {
            id: g.session_id,
            expires_at: g.valid_until.saturating_add(GRACE_SECS),
            spend: token_charges(g, &decoded.calls),
        }),
        expires_at: data.window.valid_until.saturating_add(GRACE_SECS),
    };
    let started = Instant::now();
    let outcome = sponsor.ledger.reserve(&reservation, check_only, now).await;
    sponsor.metrics.reserve_seconds.observe(started.elapsed());
    match outcome? {
        Outcome::Reserved => {
            if let Some(hold) = hold {
                hold.reserved();
            }
            Ok(data)
        }
        // The same operation again: the answer signed for it, nothing reserved twice.
        Outcome::Existing(_) if check_only => Ok(data),
        Outcome::Existing(answer) => Ok(answer),
        Outcome::Exhausted(e) => Err(SponsorError::BudgetExhausted(e)),
        Outcome::SessionRevoked => Err(Rejection::new(
            Reason::SessionRevoked,
            "session.status",
            "the session was revoked",
        )
        .into()),
        Outcome::SpendExceeded(e) => Err(Rejection::new(
            Reason::SpendLimitExceeded,
            e.rule,
            format!(
                "{} more of {} on top of {} already signed for under this session exceeds its limit of {}",
                e.requested, e.token, e.spent, e.limit
            ),
        )
        .into()),
        Outcome::NoncePending => Err(Rejection::new(
            Reason::NoncePending,
            "ledger",
            format!(
                "sender {} already has as many sponsorships of nonce {} that may still land as one \
                 nonce may hold ({MAX_OPEN_PER_NONCE} under one session, {MAX_OPEN_PER_NONCE_ANY} in all)",
                req.op.sender, req.op.nonce
            ),
        )
        .into()),
        Outcome::NonceFull(records) => Err(Rejection::new(
            Reason::NoncePending,
            "ledger",
            format!(
                "nonce {} of sender {} has {records} sponsorships on record, none of them \
                 released (at most {MAX_RECORDS_PER_NONCE}; a landed one is kept until \
                 {GRACE_SECS} s after its signature's end): it has landed, use the next nonce",
                req.op.nonce, req.op.sender
            ),
        )
        .into()),
    }
}

/// Per token the session caps, what these calls move or approve (summed over the calls;
/// `check_op` has refused any other call to a capped token): what the ledger adds to the
/// session's totals, against its cap. A token listed twice counts once, against the lower cap.
fn token_charges(grant: &SessionGrant, calls: &[Call]) -> Vec<TokenCharge> {
    let Some(perms) = &grant.permissions else {
        return Vec::new();
    };
    let mut charges: Vec<TokenCharge> = Vec::new();
    for (j, limit) in perms.spend.iter().enumerate() {
        if let Some(c) = charges.iter_mut().find(|c| c.token == limit.token) {
            c.limit = c.limit.min(limit.limit);
            continue;
        }
        let amount = calls
            .iter()
            .filter(|c| c.target == limit.token)
            .filter_map(Call::token_spend)
            .fold(U256::ZERO, |acc, s| acc.saturating_add(s.amount));
        charges.push(TokenCharge {
            token: limit.token,
            amount,
            limit: limit.limit,
            rule: format!("session.permissions.spend[{j}]"),
        });
    }
    charges.retain(|c| !c.amount.is_zero());
    charges
}

impl Sponsor {
    /// The budget scopes an operation on `chain_id` is charged to: the session (the smaller of
    /// the grant's and the policy's session budget), the sender per period, the whole policy per
    /// period; the last two per chain for a policy of several chains (`policy:c8453:20451`).
    pub fn scopes(
        policy: &Policy,
        session: Option<&SessionGrant>,
        sender: Address,
        chain_id: u64,
        now: u64,
    ) -> Vec<Scope> {
        // Budgets are per chain: a policy of several chains names the chain in its sender and
        // policy scopes (one of a single chain keeps the names it always had; a session is one
        // chain's already).
        let on_chain = |base: String| {
            if policy.chains.len() > 1 {
                format!("{base}:c{chain_id}")
            } else {
                base
            }
        };
        let gwei = |c: Option<U256>| c.map(wei_to_gwei_floor);
        let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut scopes = Vec::new();
        if let Some(grant) = session {
            let p = policy.budgets.session.as_ref();
            let g = grant.budget.as_ref();
            let cost = min(gwei(p.and_then(|b| b.cost)), gwei(g.and_then(|b| b.cost)));
            let ops = min(p.and_then(|b| b.ops), g.and_then(|b| b.ops));
            if cost.is_some() || ops.is_some() {
                scopes.push(Scope {
                    name: crate::ledger::session_budget_scope(grant),
                    rule: format!("{}.budgets.session", policy.id),
                    cost_limit: cost,
                    ops_limit: ops,
                    expires_at: grant.valid_until.saturating_add(GRACE_SECS),
                    resets_at: None,
                    starts_at: None,
                });
            }
        }
        let windowed = |budget: &Budget, base: String, rule: &str| {
            let (name, window, expires_at) = match budget.period.map(|p| p.as_secs().max(1)) {
                Some(p) => {
                    let end = (now / p + 1).saturating_mul(p);
                    (
                        format!("{base}:{}", now / p),
                        Some((now / p * p, end)),
                        end.saturating_add(GRACE_SECS),
                    )
                }
                // No period: the budget never resets; its counter lives as long as the policy
                // (ten years when it sets no end).
                None => (
                    base,
                    None,
                    policy
                        .active_until
                        .map_or(now.saturating_add(10 * 365 * 86_400), |end| {
                            end.saturating_add(GRACE_SECS)
                        }),
                ),
            };
            Scope {
                name,
                rule: format!("{}.budgets.{rule}", policy.id),
                cost_limit: gwei(budget.cost),
                ops_limit: budget.ops,
                expires_at,
                starts_at: window.map(|(start, _)| start),
                resets_at: window.map(|(_, end)| end),
            }
        };
        if let Some(b) = &policy.budgets.sender {
            // Lowercase hex: the ledger stores an address in a scope name as its 20 bytes.
            // (const-hex's vectorised encoder, not the `hex` crate's char by char.)
            let sender = alloy::hex::encode(sender);
            scopes.push(windowed(
                b,
                on_chain(format!("sender:0x{sender}")),
                "sender",
            ));
        }
        if let Some(b) = &policy.budgets.policy {
            scopes.push(windowed(b, on_chain("policy".into()), "policy"));
        }
        scopes
    }
}

/// Idempotency key of an operation (DESIGN §5): chain, EntryPoint, and the operation without
/// its paymaster data and signature (an EIP-7702 account's delegate included), but with the
/// paymaster gas limits the answer commits to, and (since 0.3.9) the paymaster it is signed
/// for: after the paymaster configured changes, a repeat got the answer stored for the old
/// one, which the new one's address beside it made invalid (`AA34`) until it was about to
/// expire (found by review).
fn idempotency_key(
    chain_id: u64,
    entry_point: Address,
    paymaster: Address,
    op: &UserOperation,
    digests: &OpDigests,
    gas: PaymasterGas,
) -> B256 {
    keccak256(
        (
            op.bound_fields(chain_id, entry_point, digests),
            U256::from(gas.verification),
            U256::from(gas.post_op),
            paymaster,
        )
            .abi_encode(),
    )
}

/// Where a signature of ours may sit in an operation of `version`.
fn layouts(version: EntryPointVersion) -> &'static [PaymasterLayout] {
    if version.spec().paymaster_signature_suffix {
        &[PaymasterLayout::Inline, PaymasterLayout::Suffix]
    } else {
        &[PaymasterLayout::Inline]
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use alloy::primitives::{Address, B256};

    use super::Sponsor;
    use crate::session::{SessionGrant, SessionStatus};

    /// A shared session budget is counted in `sp:{P}:budget:sender:d<day>`, a key of the form
    /// a sender's window hash has (`ledger::redis::counter_slot`): no sender or policy scope may
    /// ever be named `…:d<digits>`, in any shape of policy, or it would share that hash.
    #[test]
    fn no_sender_or_policy_scope_is_named_as_a_days_sessions_are() {
        let grant = SessionGrant {
            session_id: B256::repeat_byte(0x5e),
            account: Address::repeat_byte(1),
            session_key: Address::repeat_byte(2),
            chain_id: 8453,
            policy: "p".into(),
            valid_after: 0,
            valid_until: 1_800_086_400,
            status: SessionStatus::Active,
            permissions: None,
            budget: None,
            created_at: 0,
            shared_budget: true,
        };
        for (chains, period) in [
            ("[8453]", ""),
            ("[8453]", ", period = \"1d\""),
            ("[8453, 1]", ""),
            ("[8453, 1]", ", period = \"1h\""),
        ] {
            let text = format!(
                "id = \"p\"\nchains = {chains}\nentry_points = [\"0.7\"]\n\
                 [budgets]\nsession = {{ ops = 5 }}\nsender = {{ ops = 5{period} }}\n\
                 policy = {{ ops = 5{period} }}\n[[allow]]\ntarget = \"{}\"\nfunctions = [\"*\"]\n",
                Address::repeat_byte(3)
            );
            let policy = crate::policy::file::parse(Path::new("p.toml"), &text)
                .unwrap_or_else(|e| panic!("{e:?}"));
            let scopes = Sponsor::scopes(&policy, Some(&grant), grant.account, 8453, 1_800_000_000);
            assert_eq!(scopes.len(), 3, "{chains} {period}");
            assert!(
                scopes[0].name.starts_with("session:20834:0x"),
                "{}",
                scopes[0].name
            );
            for s in &scopes[1..] {
                let days = s.name.split(':').any(|part| {
                    part.strip_prefix('d')
                        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                });
                assert!(!days, "{}", s.name);
            }
        }
    }
}
