//! `pm_explainSponsorship`: the pipeline run with a [`Trace`] that records what each step
//! found, every check of every policy tried (not only the first failure), and the decision.

use serde_json::{Value, json};

use super::decode::Decoded;
use super::{Rejection, SponsorError, Sponsorship};

/// Most decoded calls an explanation lists (`callCount` says how many there were). One
/// `callData` may make about a thousand calls, and each listed costs its answer about 200
/// bytes.
pub const MAX_CALLS_SHOWN: usize = 64;

/// Most checks an explanation lists (`checksOmitted` counts the others; its `decision` and
/// `rejection` stay whole), besides the first failed check of each policy tried past them, which
/// is always listed. Each policy tried checks every call: without the bound, a thousand calls
/// under a few policies made an answer of megabytes from 2 KB of `callData`.
pub const MAX_CHECKS_SHOWN: usize = 128;

/// What a run records (nothing unless on).
#[derive(Debug, Default)]
pub(super) struct Trace {
    on: bool,
    decoded: Option<Value>,
    checks: Vec<Value>,
    checks_omitted: usize,
    /// The policies whose first failed check is listed.
    failures_listed: Vec<String>,
}

impl Trace {
    pub(super) fn off() -> Self {
        Self::default()
    }

    pub(super) fn on() -> Self {
        Self {
            on: true,
            ..Self::default()
        }
    }

    /// Explaining: record everything; reserve, rate-limit and sign nothing.
    pub(super) fn is_on(&self) -> bool {
        self.on
    }

    pub(super) fn decoded(&mut self, d: &Decoded) {
        if !self.on {
            return;
        }
        let calls: Vec<Value> = d
            .calls
            .iter()
            .take(MAX_CALLS_SHOWN)
            .map(|c| {
                let mut v = json!({
                    "target": c.target,
                    "value": c.value.to_string(),
                    "selector": c.selector(),
                    "kind": format!("{:?}", c.kind).to_lowercase(),
                });
                if let Some(spend) = c.token_spend() {
                    v["tokenSpend"] = json!({ "token": spend.token, "amount": spend.amount.to_string(), "approval": spend.approval });
                }
                v
            })
            .collect();
        self.decoded = Some(json!({
            "callCount": d.calls.len(),
            "calls": calls,
            "paymasterVerificationGasLimit": d.gas.verification.to_string(),
            "maxCost": d.max_cost.to_string(),
        }));
    }

    pub(super) fn record(&mut self, policy: &str, check: &str, outcome: &Result<(), Rejection>) {
        if !self.on {
            return;
        }
        let first_failure = outcome.is_err() && !self.failures_listed.iter().any(|p| p == policy);
        if self.checks.len() >= MAX_CHECKS_SHOWN && !first_failure {
            self.checks_omitted += 1;
            return;
        }
        if first_failure {
            self.failures_listed.push(policy.to_owned());
        }
        let mut v = json!({ "policy": policy, "check": check, "passed": outcome.is_ok() });
        if let Err(r) = outcome {
            v["rejection"] = rejection_fields(r);
        }
        self.checks.push(v);
    }

    /// The answer: what decoding found (when it succeeded), the checks, and the decision.
    pub(super) fn into_json(self, outcome: Result<Sponsorship, SponsorError>) -> Value {
        let mut out = match self.decoded {
            Some(mut decoded) => {
                decoded["checks"] = json!(self.checks);
                decoded["checksOmitted"] = json!(self.checks_omitted);
                decoded
            }
            None => json!({}),
        };
        match outcome {
            Ok(s) => {
                out["decision"] = json!("sponsored");
                out["policy"] = json!(s.policy_id);
                out["validUntil"] = json!(s.data.window.valid_until);
                out["validAfter"] = json!(s.data.window.valid_after);
            }
            Err(e) => {
                out["decision"] = json!("rejected");
                out["error"] = json!(e.to_string());
                out["rejection"] = e.rejection_fields().unwrap_or(Value::Null);
            }
        }
        out
    }
}

/// `{reason, rule, detail, callIndex?}`: how a rejection is shown to clients.
pub(crate) fn rejection_fields(r: &Rejection) -> Value {
    let mut v = json!({ "reason": r.reason.as_str(), "rule": r.rule, "detail": r.detail });
    if let Some(i) = r.call_index {
        v["callIndex"] = json!(i);
    }
    v
}
