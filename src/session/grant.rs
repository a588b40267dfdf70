//! The session grant: model, admin-request parsing, narrowing against the policy, and the
//! checks every sponsored operation under the session must pass.

use alloy::primitives::{Address, B256, FixedBytes, Signature, U256, keccak256};
use alloy::sol_types::SolValue;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::policy::calldata::Call;
use crate::policy::file::parse_amount_text;
use crate::policy::{FunctionFilter, Policy};
use crate::rejection::{Reason, Rejection};
use crate::userop::UserOperation;

/// Most tokens one grant may cap.
pub const MAX_SPEND_LIMITS: usize = 32;

/// Most `allow` rules a grant lists: a grant is stored whole, read on every sponsorship under it
/// and kept in up to `--session-copies` copies per replica (65,536 by default), so its size is
/// bounded whatever a dapp's backend passes through (the caps below: 8,192 bytes of
/// signatures, 256 functions, and 64 targets and values).
pub const MAX_ALLOW_RULES: usize = 64;
/// Most functions one rule lists (see [`MAX_ALLOW_RULES`]).
pub const MAX_FUNCTIONS_PER_RULE: usize = 64;
/// Longest function signature a rule lists, in bytes.
pub const MAX_FUNCTION_BYTES: usize = 256;
/// Most bytes of function signatures a grant lists, over all its rules.
pub const MAX_GRANT_FUNCTION_BYTES: usize = 8192;
/// Longest a session may run from its creation (since 0.3.9): ten years.
pub const MAX_SESSION_SECS: u64 = 10 * 365 * 86_400;
/// Most functions a grant lists, over all its rules (each a string of its own in every copy:
/// since 0.3.9; short signatures fitted thousands in the bytes above).
pub const MAX_GRANT_FUNCTIONS: usize = 256;

/// Whether a session may still be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    /// Usable within its window.
    Active,
    /// Revoked: refused from the next request on.
    Revoked,
}

/// A session grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionGrant {
    /// Id clients send as `context.sessionId` (e.g. an ERC-7579 Smart Sessions permission id).
    pub session_id: B256,
    /// The smart account (`userOp.sender`).
    pub account: Address,
    /// The session key (signs session proofs).
    pub session_key: Address,
    /// Chain it is valid on.
    pub chain_id: u64,
    /// Policy it narrows.
    pub policy: String,
    /// Unix time it starts.
    pub valid_after: u64,
    /// Unix time it ends.
    pub valid_until: u64,
    /// Active or revoked.
    pub status: SessionStatus,
    /// Narrower permissions than the policy's, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Permissions>,
    /// Smaller budget than the policy's session budget, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<SessionBudget>,
    /// Unix time it was created.
    pub created_at: u64,
    /// Whether its budget's counter is a field of one hash of its policy's sessions that end
    /// the same UTC day (grant version 2, since 0.3.11) rather than a key of its own: fixed
    /// when it is created, so that every replica counts it in one place
    /// ([`crate::ledger::session_budget_scope`]). Not in the admin API's JSON.
    #[serde(skip)]
    pub shared_budget: bool,
}

/// What the session key may do beyond (within) the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Permissions {
    /// Only these calls; `None` inherits the policy's rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<SessionAllow>>,
    /// ERC-20 spend caps per token, over the whole session (the ledger keeps the totals).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spend: Vec<SpendLimit>,
}

/// One allowed target of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionAllow {
    /// Contract.
    pub target: Address,
    /// Canonical signatures or `0x` selectors; `["*"]` for any the policy allows.
    pub functions: Vec<String>,
    /// Most native value per call, in wei.
    #[serde(with = "decimal")]
    pub max_value: U256,
}

/// An ERC-20 spend cap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpendLimit {
    /// Token contract.
    pub token: Address,
    /// Most the session may transfer or approve, in the token's base units.
    #[serde(with = "decimal")]
    pub limit: U256,
}

/// A session's own budget.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionBudget {
    /// Worst-case cost in wei.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "decimal_opt")]
    pub cost: Option<U256>,
    /// Operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<u64>,
}

/// U256 as a decimal string: readable wei amounts.
mod decimal {
    use alloy::primitives::U256;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &U256, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<U256, D::Error> {
        let s = String::deserialize(d)?;
        U256::from_str_radix(&s, 10).map_err(serde::de::Error::custom)
    }
}

mod decimal_opt {
    use alloy::primitives::U256;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<U256>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<U256>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| U256::from_str_radix(&s, 10).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A problem with one field of an admin request, by JSON path (`$.permissions.allow[0].target`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldIssue {
    /// JSON path of the field.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn issue(path: impl Into<String>, message: impl Into<String>) -> FieldIssue {
    FieldIssue {
        path: path.into(),
        message: message.into(),
    }
}

/// Reads fields of a JSON object, collecting every problem instead of stopping at the first.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: String,
    issues: &'a mut Vec<FieldIssue>,
}

impl Fields<'_> {
    fn at(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    fn get(&mut self, key: &str, required: bool) -> Option<&Value> {
        match self.obj.get(key).filter(|v| !v.is_null()) {
            Some(v) => Some(v),
            None => {
                if required {
                    let path = self.at(key);
                    self.issues.push(issue(path, "required"));
                }
                None
            }
        }
    }

    /// The field `key` read by `read`, or an issue saying what was `expected`.
    fn typed<T>(
        &mut self,
        key: &str,
        required: bool,
        expected: &str,
        read: impl Fn(&Value) -> Option<T>,
    ) -> Option<T> {
        let path = self.at(key);
        let parsed = read(self.get(key, required)?);
        if parsed.is_none() {
            self.issues
                .push(issue(path, format!("expected {expected}")));
        }
        parsed
    }

    fn address(&mut self, key: &str, required: bool) -> Option<Address> {
        self.typed(key, required, "a 0x-prefixed 20-byte address", |v| {
            v.as_str()
                .filter(|s| s.len() == 42 && s.starts_with("0x"))
                .and_then(|s| s.parse().ok())
        })
    }

    fn u64(&mut self, key: &str, required: bool) -> Option<u64> {
        self.typed(key, required, "a non-negative integer", Value::as_u64)
    }

    fn amount(&mut self, key: &str, required: bool) -> Option<U256> {
        let path = self.at(key);
        let v = self.get(key, required)?;
        let parsed = match v {
            Value::Number(n) => n
                .as_u64()
                .map(U256::from)
                .ok_or_else(|| "expected a non-negative integer".to_owned()),
            Value::String(s) => parse_amount_text(s),
            _ => Err(
                "expected wei as a string or integer, or an amount like \"0.1 ether\"".to_owned(),
            ),
        };
        parsed.map_err(|e| self.issues.push(issue(path, e))).ok()
    }
}

fn object<'a>(
    v: &'a Value,
    path: &str,
    issues: &mut Vec<FieldIssue>,
) -> Option<&'a Map<String, Value>> {
    let obj = v.as_object();
    if obj.is_none() {
        issues.push(issue(path, "expected an object"));
    }
    obj
}

/// Reject keys we do not know: a typo must not silently widen or drop a restriction.
fn known_keys(obj: &Map<String, Value>, path: &str, keys: &[&str], issues: &mut Vec<FieldIssue>) {
    for k in obj.keys().filter(|k| !keys.contains(&k.as_str())) {
        issues.push(issue(format!("{path}.{k}"), "unknown field"));
    }
}

impl SessionGrant {
    /// Parse `POST /admin/sessions`. `new_id` supplies an id when the request has none.
    pub fn from_request(
        body: &Value,
        now: u64,
        new_id: impl FnOnce() -> B256,
    ) -> Result<Self, Vec<FieldIssue>> {
        let mut issues = Vec::new();
        let Some(obj) = object(body, "$", &mut issues) else {
            return Err(issues);
        };
        known_keys(
            obj,
            "$",
            &[
                "sessionId",
                "account",
                "sessionKey",
                "chainId",
                "policy",
                "validAfter",
                "validUntil",
                "permissions",
                "budget",
            ],
            &mut issues,
        );
        let mut f = Fields {
            obj,
            path: "$".into(),
            issues: &mut issues,
        };
        let session_id = f.typed(
            "sessionId",
            false,
            "a 0x-prefixed 32-byte hex string",
            |v| {
                v.as_str()
                    .filter(|s| s.len() == 66)
                    .and_then(|s| s.parse::<B256>().ok())
            },
        );
        let account = f.address("account", true);
        let session_key = f.address("sessionKey", true);
        let chain_id = f.u64("chainId", true);
        let policy = f.typed("policy", true, "a policy id", |v| {
            v.as_str().map(str::to_owned)
        });
        let valid_after = f.u64("validAfter", true);
        let valid_until = f.u64("validUntil", true);
        if let (Some(a), Some(u)) = (valid_after, valid_until) {
            if u <= a {
                f.issues
                    .push(issue("$.validUntil", "must be after validAfter"));
            } else if u <= now {
                f.issues.push(issue("$.validUntil", "is in the past"));
            } else if u > now.saturating_add(MAX_SESSION_SECS) {
                // (Past 2106 a listing's 32-bit times saturate, and its index member would
                // never be seen to end.)
                f.issues
                    .push(issue("$.validUntil", "must be at most ten years from now"));
            }
        }
        let permissions = f
            .get("permissions", false)
            .cloned()
            .and_then(|v| parse_permissions(&v, f.issues));
        let budget = f
            .get("budget", false)
            .cloned()
            .and_then(|v| parse_budget(&v, f.issues));

        match (
            account,
            session_key,
            chain_id,
            policy,
            valid_after,
            valid_until,
        ) {
            (
                Some(account),
                Some(session_key),
                Some(chain_id),
                Some(policy),
                Some(valid_after),
                Some(valid_until),
            ) if issues.is_empty() => Ok(Self {
                session_id: session_id.unwrap_or_else(new_id),
                account,
                session_key,
                chain_id,
                policy,
                valid_after,
                valid_until,
                status: SessionStatus::Active,
                permissions,
                budget,
                created_at: now,
                // (Set by the admin API where every replica reads such grants:
                // `Ledger::sessions_share_budgets`.)
                shared_budget: false,
            }),
            _ => Err(issues),
        }
    }

    /// A grant may only narrow its policy: every field wider than the policy is an issue.
    pub fn check_within(&self, policy: &Policy) -> Result<(), Vec<FieldIssue>> {
        let mut issues = Vec::new();
        if !policy.chains.contains(&self.chain_id) {
            issues.push(issue(
                "$.chainId",
                format!(
                    "policy `{}` does not sponsor chain {}",
                    policy.id, self.chain_id
                ),
            ));
        }
        if let Some(end) = policy.active_until.filter(|&end| self.valid_until > end) {
            issues.push(issue(
                "$.validUntil",
                format!("past the policy's end ({end})"),
            ));
        }
        if let Some(allow) = self.permissions.as_ref().and_then(|p| p.allow.as_ref()) {
            for (i, rule) in allow.iter().enumerate() {
                let path = format!("$.permissions.allow[{i}]");
                let Some(p_rule) = policy.allow.iter().find(|r| r.target == rule.target) else {
                    issues.push(issue(
                        format!("{path}.target"),
                        format!("policy `{}` does not allow {}", policy.id, rule.target),
                    ));
                    continue;
                };
                if rule.max_value > p_rule.max_value {
                    issues.push(issue(
                        format!("{path}.maxValue"),
                        format!("above the policy's {} wei", p_rule.max_value),
                    ));
                }
                for (j, func) in rule.functions.iter().enumerate() {
                    let ok = match (&p_rule.functions, func.as_str()) {
                        (FunctionFilter::Any, _) => true,
                        (FunctionFilter::Selectors(_), "*") => false,
                        (FunctionFilter::Selectors(list), f) => {
                            selector_of(f).is_some_and(|sel| list.iter().any(|(s, _)| *s == sel))
                        }
                    };
                    if !ok {
                        issues.push(issue(
                            format!("{path}.functions[{j}]"),
                            format!("`{func}` is not allowed by the policy on {}", rule.target),
                        ));
                    }
                }
            }
        }
        if let Some(b) = &self.budget {
            let cap = policy.budgets.session.as_ref();
            if let (Some(cost), Some(max)) = (b.cost, cap.and_then(|c| c.cost))
                && cost > max
            {
                issues.push(issue(
                    "$.budget.cost",
                    format!("above the policy's session budget of {max} wei"),
                ));
            }
            if let (Some(ops), Some(max)) = (b.ops, cap.and_then(|c| c.ops))
                && ops > max
            {
                issues.push(issue(
                    "$.budget.ops",
                    format!("above the policy's session budget of {max} operations"),
                ));
            }
        }
        if issues.is_empty() {
            Ok(())
        } else {
            Err(issues)
        }
    }

    /// Checks on every operation sponsored under this session (after the policy's own). On a
    /// capped token only countable calls pass; the amounts themselves, added to what the session
    /// already spent, are checked and recorded by the ledger, atomically with the reservation.
    pub fn check_op(&self, op: &UserOperation, calls: &[Call], now: u64) -> Result<(), Rejection> {
        let reject = |reason, rule: &str, detail: String| {
            Rejection::new(reason, format!("session.{rule}"), detail)
        };
        match self.status {
            SessionStatus::Revoked => {
                return Err(reject(
                    Reason::SessionRevoked,
                    "status",
                    "the session was revoked".into(),
                ));
            }
            SessionStatus::Active => {}
        }
        if now < self.valid_after {
            return Err(reject(
                Reason::SessionNotYetValid,
                "validAfter",
                format!("starts at {}", self.valid_after),
            ));
        }
        if now >= self.valid_until {
            return Err(reject(
                Reason::SessionExpired,
                "validUntil",
                format!("ended at {}", self.valid_until),
            ));
        }
        if op.sender != self.account {
            return Err(reject(
                Reason::SessionAccountMismatch,
                "account",
                format!("the session belongs to {}, not {}", self.account, op.sender),
            ));
        }
        let Some(perms) = &self.permissions else {
            return Ok(());
        };
        if let Some(allow) = &perms.allow {
            // Each rule's selectors, made once per operation when a call first needs them (a
            // signature's is a keccak: an operation of 1,024 calls would otherwise make one per
            // call and listed function).
            let mut selectors: Vec<Option<Selectors>> = vec![None; allow.len()];
            for (i, call) in calls.iter().enumerate() {
                let Some((j, rule)) = allow
                    .iter()
                    .enumerate()
                    .find(|(_, r)| r.target == call.target)
                else {
                    return Err(reject(
                        Reason::SessionTargetNotAllowed,
                        "permissions.allow",
                        format!("the session does not allow calls to {}", call.target),
                    )
                    .at_call(i));
                };
                let listed = selectors[j].get_or_insert_with(|| Selectors::of(&rule.functions));
                let func_ok = listed.any
                    || call
                        .selector()
                        .is_some_and(|sel| listed.selectors.contains(&sel));
                if !func_ok {
                    return Err(reject(
                        Reason::SessionFunctionNotAllowed,
                        &format!("permissions.allow[{j}].functions"),
                        format!(
                            "the session does not allow this function on {}",
                            call.target
                        ),
                    )
                    .at_call(i));
                }
                if call.value > rule.max_value {
                    return Err(reject(
                        Reason::SessionValueTooHigh,
                        &format!("permissions.allow[{j}].maxValue"),
                        format!("value {} wei exceeds {} wei", call.value, rule.max_value),
                    )
                    .at_call(i));
                }
            }
        }
        for (j, limit) in perms.spend.iter().enumerate() {
            let rule = format!("permissions.spend[{j}]");
            for (i, call) in calls.iter().enumerate() {
                if call.target != limit.token {
                    continue;
                }
                // On a capped token only a plain call to `transfer`, `transferFrom` or `approve`
                // whose arguments decode is counted; anything else on it could move tokens
                // without counting (`increaseAllowance`, `permit`, `transferAndCall`, …).
                let Some(spend) = call.token_spend() else {
                    return Err(reject(
                        Reason::TokenCallNotAllowed,
                        &rule,
                        format!(
                            "the session caps {}: only transfer, transferFrom and approve with \
                             well-formed arguments may be called on it",
                            limit.token
                        ),
                    )
                    .at_call(i));
                };
                if spend.approval && spend.amount == U256::MAX {
                    return Err(reject(
                        Reason::UnlimitedApproval,
                        &rule,
                        format!(
                            "unlimited approval of {} while the session has a spend limit",
                            limit.token
                        ),
                    )
                    .at_call(i));
                }
            }
        }
        Ok(())
    }

    /// Whether `proof` is the session key's EIP-191 signature over [`proof_digest`] (DESIGN §5):
    /// without it a leaked API key could spend a user's session budget.
    pub fn proof_is_valid(
        &self,
        proof: &[u8],
        entry_point: Address,
        op: &UserOperation,
        deadline: u64,
    ) -> bool {
        let digest = proof_digest(self.chain_id, entry_point, op, self.session_id, deadline);
        Signature::from_raw(proof)
            .ok()
            .and_then(|sig| sig.recover_address_from_msg(digest.as_slice()).ok())
            .is_some_and(|signer| signer == self.session_key)
    }

    /// The permissions in force: the session's own rules where it set them, else the policy's.
    pub fn effective_permissions(&self, policy: &Policy) -> Value {
        let allow = match self.permissions.as_ref().and_then(|p| p.allow.as_ref()) {
            Some(rules) => json!(rules),
            None => json!(policy
                .allow
                .iter()
                .map(|r| json!({
                    "target": r.target,
                    "functions": match &r.functions {
                        FunctionFilter::Any => vec!["*".to_owned()],
                        FunctionFilter::Selectors(list) => list.iter().map(|(_, text)| text.clone()).collect(),
                    },
                    "maxValue": r.max_value.to_string(),
                }))
                .collect::<Vec<_>>()),
        };
        let spend = self
            .permissions
            .as_ref()
            .map(|p| json!(p.spend))
            .unwrap_or_else(|| json!([]));
        json!({ "allow": allow, "spend": spend })
    }
}

/// The digest a session proof signs (before the EIP-191 prefix): every field of the operation
/// the paymaster signature covers, except the paymaster's own, and a deadline (unix seconds)
/// after which the proof is refused and which no signature made with it outlives:
///
/// ```text
/// keccak256(abi.encode(chainId, entryPoint, sender, nonce, keccak256(initCode),
///   keccak256(callData), accountGasLimits, preVerificationGas, gasFees, sessionId, deadline))
/// ```
///
/// So an observed proof cannot be replayed with other fees, gas limits or factory, nor later.
pub fn proof_digest(
    chain_id: u64,
    entry_point: Address,
    op: &UserOperation,
    session_id: B256,
    deadline: u64,
) -> B256 {
    keccak256(
        (
            op.bound_fields(chain_id, entry_point, &op.digests()),
            session_id,
            U256::from(deadline),
        )
            .abi_encode(),
    )
}

/// What a rule's `functions` allow: every function (`*`), or these selectors.
#[derive(Clone)]
struct Selectors {
    any: bool,
    selectors: Vec<FixedBytes<4>>,
}

impl Selectors {
    fn of(functions: &[String]) -> Self {
        Self {
            any: functions.iter().any(|f| f == "*"),
            selectors: functions.iter().filter_map(|f| selector_of(f)).collect(),
        }
    }
}

/// The selector a function entry names: `0x12345678` or a canonical signature.
fn selector_of(f: &str) -> Option<FixedBytes<4>> {
    match f.strip_prefix("0x") {
        Some(h) => hex::decode(h)
            .ok()
            .filter(|b| b.len() == 4)
            .map(|b| FixedBytes::from_slice(&b)),
        None => f
            .contains('(')
            .then(|| FixedBytes::from_slice(&keccak256(f.as_bytes())[..4])),
    }
}

fn parse_permissions(v: &Value, issues: &mut Vec<FieldIssue>) -> Option<Permissions> {
    let obj = object(v, "$.permissions", issues)?;
    known_keys(obj, "$.permissions", &["allow", "spend"], issues);
    let mut perms = Permissions::default();
    if let Some(allow) = obj.get("allow").filter(|v| !v.is_null()) {
        let Some(items) = allow.as_array() else {
            issues.push(issue("$.permissions.allow", "expected an array"));
            return None;
        };
        if items.is_empty() {
            issues.push(issue(
                "$.permissions.allow",
                "empty: omit it to inherit the policy's rules",
            ));
        }
        if items.len() > MAX_ALLOW_RULES {
            issues.push(issue(
                "$.permissions.allow",
                format!("at most {MAX_ALLOW_RULES} rules"),
            ));
            return None;
        }
        let mut rules = Vec::new();
        let mut function_bytes = 0usize;
        for (i, item) in items.iter().enumerate() {
            let path = format!("$.permissions.allow[{i}]");
            let Some(o) = object(item, &path, issues) else {
                continue;
            };
            known_keys(o, &path, &["target", "functions", "maxValue"], issues);
            let mut f = Fields {
                obj: o,
                path: path.clone(),
                issues,
            };
            let target = f.address("target", true);
            let max_value = f.amount("maxValue", false).unwrap_or_default();
            let functions: Vec<String> = match f.get("functions", true).cloned() {
                Some(Value::Array(fs)) if fs.len() > MAX_FUNCTIONS_PER_RULE => {
                    f.issues.push(issue(
                        format!("{path}.functions"),
                        format!("at most {MAX_FUNCTIONS_PER_RULE} functions"),
                    ));
                    Vec::new()
                }
                Some(Value::Array(fs)) if !fs.is_empty() => {
                    // Each function once (a selector however spelled), and `*` alone: a copy of
                    // the grant is kept per replica, and every call checked against its list.
                    let mut seen: Vec<FixedBytes<4>> = Vec::new();
                    let listed: Vec<String> = fs
                        .iter()
                        .enumerate()
                        .filter_map(|(j, x)| {
                            let at = format!("{path}.functions[{j}]");
                            if x.as_str().is_some_and(|s| s.len() > MAX_FUNCTION_BYTES) {
                                f.issues.push(issue(at, format!("at most {MAX_FUNCTION_BYTES} bytes")));
                                return None;
                            }
                            let s = x.as_str();
                            let selector = s.and_then(selector_of);
                            let Some(s) = s.filter(|s| *s == "*" || selector.is_some()) else {
                                f.issues.push(issue(at, "expected a signature like `transfer(address,uint256)`, a selector, or \"*\""));
                                return None;
                            };
                            if s == "*" && fs.len() > 1 {
                                f.issues.push(issue(at, "\"*\" allows every function: list it alone"));
                                return None;
                            }
                            if let Some(sel) = selector {
                                if seen.contains(&sel) {
                                    f.issues.push(issue(at, format!("selector {sel} listed twice")));
                                    return None;
                                }
                                seen.push(sel);
                            }
                            Some(s.to_owned())
                        })
                        .collect();
                    listed
                }
                Some(_) => {
                    f.issues.push(issue(
                        format!("{path}.functions"),
                        "expected a non-empty array",
                    ));
                    Vec::new()
                }
                None => Vec::new(),
            };
            function_bytes += functions.iter().map(String::len).sum::<usize>();
            if let Some(target) = target {
                if rules.iter().any(|r: &SessionAllow| r.target == target) {
                    issues.push(issue(
                        format!("{path}.target"),
                        "listed twice: merge the rules",
                    ));
                }
                rules.push(SessionAllow {
                    target,
                    functions,
                    max_value,
                });
            }
        }
        if function_bytes > MAX_GRANT_FUNCTION_BYTES {
            issues.push(issue(
                "$.permissions.allow",
                format!(
                    "{function_bytes} bytes of function signatures: at most {MAX_GRANT_FUNCTION_BYTES} in all"
                ),
            ));
            return None;
        }
        let functions: usize = rules.iter().map(|r| r.functions.len()).sum();
        if functions > MAX_GRANT_FUNCTIONS {
            issues.push(issue(
                "$.permissions.allow",
                format!("{functions} functions: at most {MAX_GRANT_FUNCTIONS} in all"),
            ));
            return None;
        }
        perms.allow = Some(rules);
    }
    if let Some(spend) = obj.get("spend").filter(|v| !v.is_null()) {
        let Some(items) = spend.as_array() else {
            issues.push(issue("$.permissions.spend", "expected an array"));
            return None;
        };
        // Each reservation under the session records an amount per capped token.
        if items.len() > MAX_SPEND_LIMITS {
            issues.push(issue(
                "$.permissions.spend",
                format!("at most {MAX_SPEND_LIMITS} tokens"),
            ));
            return None;
        }
        for (i, item) in items.iter().enumerate() {
            let path = format!("$.permissions.spend[{i}]");
            let Some(o) = object(item, &path, issues) else {
                continue;
            };
            known_keys(o, &path, &["token", "limit"], issues);
            let mut f = Fields {
                obj: o,
                path,
                issues,
            };
            if let (Some(token), Some(limit)) = (f.address("token", true), f.amount("limit", true))
            {
                // A cap applies to calls to the token's address: one on an address no call
                // targets as a token would cap nothing, while the grant reads as capped.
                if token.is_zero() || token == NATIVE_PLACEHOLDER {
                    f.issues.push(issue(
                        format!("{}.token", f.path),
                        "not a token contract (native value is capped per call by `maxValue`)",
                    ));
                    continue;
                }
                perms.spend.push(SpendLimit { token, limit });
            }
        }
    }
    Some(perms)
}

/// The address wallets and aggregators use for native ether in token lists (no contract).
const NATIVE_PLACEHOLDER: Address =
    alloy::primitives::address!("0xEeeeeEeeeEeEeeEeEeEeeEEEeeeeEeeeeeeeEEeE");

fn parse_budget(v: &Value, issues: &mut Vec<FieldIssue>) -> Option<SessionBudget> {
    let obj = object(v, "$.budget", issues)?;
    known_keys(obj, "$.budget", &["cost", "ops"], issues);
    let mut f = Fields {
        obj,
        path: "$.budget".into(),
        issues,
    };
    Some(SessionBudget {
        cost: f.amount("cost", false),
        ops: f.u64("ops", false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::calldata::Erc20;
    use alloy::sol_types::SolCall;

    const TOKEN: Address = Address::repeat_byte(0x70);
    const GAME: Address = Address::repeat_byte(0x60);
    const ACCOUNT: Address = Address::repeat_byte(0xac);

    fn grant() -> SessionGrant {
        SessionGrant {
            session_id: B256::repeat_byte(1),
            account: ACCOUNT,
            session_key: Address::repeat_byte(0x5e),
            chain_id: 31337,
            policy: "p".into(),
            valid_after: 100,
            valid_until: 200,
            status: SessionStatus::Active,
            permissions: Some(Permissions {
                allow: Some(vec![
                    SessionAllow {
                        target: GAME,
                        functions: vec!["move(uint8)".into()],
                        max_value: U256::ZERO,
                    },
                    SessionAllow {
                        target: TOKEN,
                        functions: vec!["*".into()],
                        max_value: U256::ZERO,
                    },
                ]),
                spend: vec![SpendLimit {
                    token: TOKEN,
                    limit: U256::from(100),
                }],
            }),
            budget: None,
            created_at: 0,
            shared_budget: false,
        }
    }

    fn transfer(amount: u64) -> Call {
        Call::new(
            TOKEN,
            U256::ZERO,
            Erc20::transferCall {
                to: ACCOUNT,
                amount: U256::from(amount),
            }
            .abi_encode()
            .into(),
        )
    }

    #[test]
    fn op_checks() {
        let op = UserOperation {
            sender: ACCOUNT,
            ..Default::default()
        };
        let game_move = Call::new(
            GAME,
            U256::ZERO,
            keccak256("move(uint8)")[..4].to_vec().into(),
        );
        let approve = |amount| {
            Call::new(
                TOKEN,
                U256::ZERO,
                Erc20::approveCall {
                    spender: ACCOUNT,
                    amount,
                }
                .abi_encode()
                .into(),
            )
        };
        type Expected = Option<(Reason, Option<usize>)>;
        let rows: Vec<(&str, Vec<Call>, u64, Expected)> = vec![
            ("move", vec![game_move.clone()], 150, None),
            ("spend within", vec![transfer(60), transfer(40)], 150, None),
            // Amounts, summed and added to the session's total, are the ledger's to check.
            (
                "spend over, summed",
                vec![transfer(60), transfer(41)],
                150,
                None,
            ),
            (
                "unlimited approval",
                vec![approve(U256::MAX)],
                150,
                Some((Reason::UnlimitedApproval, Some(0))),
            ),
            (
                "bounded approval",
                vec![approve(U256::from(100))],
                150,
                None,
            ),
            (
                "other function on a capped token",
                vec![Call::new(
                    TOKEN,
                    U256::ZERO,
                    keccak256("increaseAllowance(address,uint256)")[..4]
                        .to_vec()
                        .into(),
                )],
                150,
                Some((Reason::TokenCallNotAllowed, Some(0))),
            ),
            (
                "transfer that does not decode",
                vec![Call::new(
                    TOKEN,
                    U256::ZERO,
                    transfer(1).data[..36].to_vec().into(),
                )],
                150,
                Some((Reason::TokenCallNotAllowed, Some(0))),
            ),
            (
                "other target",
                vec![Call::new(
                    Address::ZERO,
                    U256::ZERO,
                    vec![1, 2, 3, 4].into(),
                )],
                150,
                Some((Reason::SessionTargetNotAllowed, Some(0))),
            ),
            (
                "other function",
                vec![Call::new(GAME, U256::ZERO, vec![1, 2, 3, 4].into())],
                150,
                Some((Reason::SessionFunctionNotAllowed, Some(0))),
            ),
            (
                "value",
                vec![Call::new(GAME, U256::from(1), game_move.data.clone())],
                150,
                Some((Reason::SessionValueTooHigh, Some(0))),
            ),
            (
                "early",
                vec![game_move.clone()],
                99,
                Some((Reason::SessionNotYetValid, None)),
            ),
            (
                "late",
                vec![game_move.clone()],
                200,
                Some((Reason::SessionExpired, None)),
            ),
        ];
        for (name, calls, now, expected) in rows {
            let got = grant()
                .check_op(&op, &calls, now)
                .err()
                .map(|r| (r.reason, r.call_index));
            assert_eq!(got, expected, "{name}");
        }
        let revoked = SessionGrant {
            status: SessionStatus::Revoked,
            ..grant()
        };
        assert_eq!(
            revoked.check_op(&op, &[], 150).err().map(|r| r.reason),
            Some(Reason::SessionRevoked)
        );
    }

    /// The proof digest is a wire format wallets compute: the flat `abi.encode` of docs/rpc.md,
    /// whatever helper builds it.
    #[test]
    fn proof_digest_is_the_documented_flat_encoding() {
        let op = UserOperation {
            sender: ACCOUNT,
            nonce: U256::from(7),
            factory: Some(Address::repeat_byte(0xfa)),
            factory_data: vec![1, 2].into(),
            call_data: vec![3, 4, 5].into(),
            call_gas_limit: 11,
            verification_gas_limit: 12,
            pre_verification_gas: U256::from(13),
            max_fee_per_gas: 14,
            max_priority_fee_per_gas: 15,
            ..Default::default()
        };
        let (ep, id) = (Address::repeat_byte(0xee), B256::repeat_byte(0x1d));
        let flat = keccak256(
            (
                U256::from(31337u64),
                ep,
                op.sender,
                op.nonce,
                keccak256(op.init_code()),
                keccak256(&op.call_data),
                op.account_gas_limits(),
                op.pre_verification_gas,
                op.gas_fees(),
                id,
                U256::from(99u64),
            )
                .abi_encode(),
        );
        assert_eq!(proof_digest(31337, ep, &op, id, 99), flat);
    }

    #[test]
    fn stored_form_round_trips() -> Result<(), serde_json::Error> {
        let g = SessionGrant {
            budget: Some(SessionBudget {
                cost: Some(U256::from(10).pow(U256::from(18))),
                ops: Some(5),
            }),
            ..grant()
        };
        let json = serde_json::to_string(&g)?;
        assert!(json.contains("\"cost\":\"1000000000000000000\""), "{json}");
        assert_eq!(serde_json::from_str::<SessionGrant>(&json)?, g);
        Ok(())
    }

    #[test]
    fn request_parsing_generates_ids_and_checks_windows() {
        let body = json!({
            "account": ACCOUNT, "sessionKey": ACCOUNT, "chainId": 31337, "policy": "p",
            "validAfter": 10, "validUntil": 5
        });
        let issues = SessionGrant::from_request(&body, 0, || B256::ZERO).unwrap_err();
        assert_eq!(issues[0].path, "$.validUntil");
        let mut ok = body.clone();
        ok["validUntil"] = json!(MAX_SESSION_SECS + 1);
        let issues = SessionGrant::from_request(&ok, 0, || B256::ZERO).unwrap_err();
        assert_eq!(
            (issues[0].path.as_str(), issues[0].message.as_str()),
            ("$.validUntil", "must be at most ten years from now")
        );
        ok["validUntil"] = json!(MAX_SESSION_SECS);
        assert!(SessionGrant::from_request(&ok, 0, || B256::ZERO).is_ok());
        ok["validUntil"] = json!(50);
        let g = SessionGrant::from_request(&ok, 0, || B256::repeat_byte(3)).unwrap();
        assert_eq!(
            (g.session_id, g.status),
            (B256::repeat_byte(3), SessionStatus::Active)
        );
    }

    /// A rule lists each function once, however spelled, and `*` alone: a copy of the grant is
    /// kept per replica and every call checked against its lists (found by review: 64 `*`s a
    /// rule, or one function 63 times over before the one that matched, each call a keccak).
    #[test]
    fn a_rule_lists_each_function_once_and_star_alone() {
        let issues = |functions: Value| -> Vec<String> {
            let body = json!({
                "account": ACCOUNT, "sessionKey": ACCOUNT, "chainId": 31337, "policy": "p",
                "validAfter": 0, "validUntil": 50,
                "permissions": { "allow": [{ "target": ACCOUNT, "functions": functions }] }
            });
            match SessionGrant::from_request(&body, 0, || B256::ZERO) {
                Ok(_) => Vec::new(),
                Err(issues) => issues
                    .into_iter()
                    .map(|i| format!("{}: {}", i.path, i.message))
                    .collect(),
            }
        };
        let increment = format!("0x{}", hex::encode(&keccak256("increment()")[..4]));
        assert_eq!(
            issues(json!(["increment()", increment])),
            vec![format!(
                "$.permissions.allow[0].functions[1]: selector {increment} listed twice"
            )]
        );
        assert_eq!(
            issues(json!(["*", "*"])),
            vec![
                "$.permissions.allow[0].functions[0]: \"*\" allows every function: list it alone",
                "$.permissions.allow[0].functions[1]: \"*\" allows every function: list it alone",
            ]
        );
        assert_eq!(issues(json!(["increment()", "*"])).len(), 1);
        assert_eq!(issues(json!(["*"])), Vec::<String>::new());
        assert_eq!(
            issues(json!(["increment()", "decrement()"])),
            Vec::<String>::new()
        );
    }

    /// A grant's size is bounded: rules, functions a rule, a function's bytes, and all of them.
    #[test]
    fn a_grants_permissions_are_bounded() {
        let grant = |rules: usize, functions: usize, chars: usize| {
            let allow: Vec<Value> = (0..rules)
                .map(|i| {
                    // Signatures of exactly `chars` bytes: `f<j>_aaa…()`.
                    let fs: Vec<String> = (0..functions)
                        .map(|j| {
                            let head = format!("f{j}_");
                            format!("{head}{}()", "a".repeat(chars - head.len() - 2))
                        })
                        .collect();
                    json!({ "target": format!("0x{:040x}", i + 1), "functions": fs })
                })
                .collect();
            let body = json!({
                "account": ACCOUNT, "sessionKey": ACCOUNT, "chainId": 31337, "policy": "p",
                "validAfter": 0, "validUntil": 50, "permissions": { "allow": allow }
            });
            SessionGrant::from_request(&body, 0, || B256::ZERO).map_err(|issues| {
                issues
                    .into_iter()
                    .map(|i| format!("{}: {}", i.path, i.message))
                    .collect::<Vec<_>>()
            })
        };
        // 64 rules of 2 functions of 64 bytes: 8,192 bytes in all, the most a grant takes.
        let ok = grant(MAX_ALLOW_RULES, 2, 64);
        assert!(ok.is_ok(), "{:?}", ok.err());
        // 64 rules of 4 functions, 256 in all (of 10 bytes: 2,560); of 5, 320.
        assert!(grant(MAX_ALLOW_RULES, 4, 10).is_ok());
        assert!(grant(1, MAX_FUNCTIONS_PER_RULE, 64).is_ok());
        let refused = |r: Result<SessionGrant, Vec<String>>, says: &str| {
            assert!(
                r.as_ref()
                    .is_err_and(|e| e.iter().any(|m| m.contains(says))),
                "{says}: {:?}",
                r.err()
            );
        };
        refused(grant(MAX_ALLOW_RULES + 1, 1, 10), "at most 64 rules");
        refused(
            grant(MAX_ALLOW_RULES, 5, 10),
            "320 functions: at most 256 in all",
        );
        refused(
            grant(1, MAX_FUNCTIONS_PER_RULE + 1, 10),
            "at most 64 functions",
        );
        refused(grant(MAX_ALLOW_RULES, 3, 64), "at most 8192 in all");
        assert!(grant(1, 1, MAX_FUNCTION_BYTES).is_ok(), "256 bytes");
        refused(grant(1, 1, MAX_FUNCTION_BYTES + 1), "at most 256 bytes");
    }

    /// A spend cap on an address no call targets as a token (the zero address, the native
    /// placeholder wallets use) would cap nothing while the grant reads as capped.
    #[test]
    fn a_spend_cap_must_name_a_token_contract() {
        let grant = |token: &str| {
            let body = json!({
                "account": ACCOUNT, "sessionKey": ACCOUNT, "chainId": 31337, "policy": "p",
                "validAfter": 10, "validUntil": 50,
                "permissions": { "spend": [{ "token": token, "limit": "100" }] }
            });
            SessionGrant::from_request(&body, 0, || B256::ZERO)
        };
        for token in [
            "0x0000000000000000000000000000000000000000",
            "0xEeeeeEeeeEeEeeEeEeEeeEEEeeeeEeeeeeeeEEeE",
            "0xeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
        ] {
            let issues = grant(token).expect_err(token);
            assert_eq!(issues[0].path, "$.permissions.spend[0].token", "{token}");
        }
        assert!(grant("0x1111111111111111111111111111111111111111").is_ok());
    }
}
