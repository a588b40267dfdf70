//! Policy files: the TOML schema product teams edit, parsed strictly (DESIGN §5).
//!
//! Every problem is reported with file, line and column, and every problem of every file is
//! collected (a policy set that half-loads is never used). Amounts take wei integers or units
//! (`"30 gwei"`, `"0.1 ether"`); durations humantime (`"10m"`); dates RFC 3339.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy::primitives::{Address, B256, FixedBytes, U256, keccak256};
use serde::Deserialize;
use toml::Spanned;

use super::{
    AllowRule, Budget, Budgets, FunctionFilter, PerOpLimits, Policy, PolicySet, Rate, SenderLists,
};
use crate::userop::EntryPointVersion;

/// Longest policy id: it names every Redis key of the policy (and is packed into records).
pub const MAX_POLICY_ID_LEN: usize = 64;

/// Default signature lifetime when a policy sets no `max_validity`.
pub const DEFAULT_MAX_VALIDITY: Duration = Duration::from_secs(600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    id: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    chains: Vec<u64>,
    entry_points: Vec<Spanned<String>>,
    #[serde(default)]
    require_session: bool,
    #[serde(default)]
    require_session_proof: bool,
    #[serde(default)]
    max_validity: Option<Spanned<String>>,
    #[serde(default)]
    active_until: Option<Spanned<toml::value::Datetime>>,
    #[serde(default)]
    max_sessions: Option<Spanned<u64>>,
    #[serde(default)]
    per_op: PerOpFile,
    #[serde(default)]
    budgets: BudgetsFile,
    #[serde(default)]
    rate: RateFile,
    #[serde(default)]
    senders: SendersFile,
    #[serde(default)]
    factories: Vec<Spanned<String>>,
    #[serde(default)]
    delegates: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<AllowFile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BudgetsFile {
    #[serde(default)]
    session: Option<Spanned<BudgetFile>>,
    #[serde(default)]
    sender: Option<Spanned<BudgetFile>>,
    #[serde(default)]
    policy: Option<Spanned<BudgetFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetFile {
    #[serde(default)]
    cost: Option<Spanned<Amount>>,
    #[serde(default)]
    ops: Option<u64>,
    #[serde(default)]
    period: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RateFile {
    #[serde(default)]
    per_sender: Option<Spanned<String>>,
    #[serde(default)]
    per_session: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SendersFile {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PerOpFile {
    #[serde(default)]
    max_cost: Option<Spanned<Amount>>,
    #[serde(default)]
    max_fee_per_gas: Option<Spanned<Amount>>,
    #[serde(default)]
    max_priority_fee_per_gas: Option<Spanned<Amount>>,
    #[serde(default)]
    max_verification_gas_limit: Option<u64>,
    #[serde(default)]
    max_call_gas_limit: Option<u64>,
    #[serde(default)]
    max_pre_verification_gas: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowFile {
    target: Spanned<String>,
    functions: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    max_value: Option<Spanned<Amount>>,
    #[serde(default)]
    delegatecall: bool,
}

/// An amount as written: a wei integer or a string with an optional unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum Amount {
    Wei(u64),
    Text(String),
}

/// One problem in one policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFileError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line (0 when the problem is the file as a whole).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// The policy files of a set: `(file name, TOML text)`, sorted by name. What is published to
/// Redis, so every replica parses the same text with the same code.
pub type Sources = Vec<(String, String)>;

/// Read every `*.toml` in `dir`, sorted by name.
pub fn read_dir_sources(dir: &Path) -> Result<Sources, Vec<PolicyFileError>> {
    let whole = |message: String| PolicyFileError {
        file: dir.to_owned(),
        line: 0,
        column: 0,
        message,
    };
    let entries = std::fs::read_dir(dir)
        .map_err(|e| vec![whole(format!("cannot read policy directory: {e}"))])?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let mut sources = Vec::with_capacity(paths.len());
    let mut errors = Vec::new();
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match std::fs::read_to_string(&path) {
            Ok(text) => sources.push((name, text)),
            Err(e) => errors.push(PolicyFileError {
                file: path,
                line: 0,
                column: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    if errors.is_empty() {
        Ok(sources)
    } else {
        Err(errors)
    }
}

/// Load every `*.toml` in `dir` (sorted by name) into a policy set, or every problem found.
pub fn load_dir(dir: &Path) -> Result<PolicySet, Vec<PolicyFileError>> {
    load_sources(dir, read_dir_sources(dir)?)
}

/// Parse a set of policy files (`dir` only labels errors), or report every problem of every file.
pub fn load_sources(dir: &Path, sources: Sources) -> Result<PolicySet, Vec<PolicyFileError>> {
    if sources.is_empty() {
        return Err(vec![PolicyFileError {
            file: dir.to_owned(),
            line: 0,
            column: 0,
            message: "no policy files (*.toml): nothing could be sponsored".into(),
        }]);
    }
    let mut errors = Vec::new();
    let mut policies: BTreeMap<String, (PathBuf, Policy)> = BTreeMap::new();
    for (name, src) in &sources {
        let path = dir.join(name);
        match parse(&path, src) {
            Ok(policy) => {
                if let Some((first, _)) = policies.get(&policy.id) {
                    errors.push(PolicyFileError {
                        file: path.clone(),
                        line: 1,
                        column: 1,
                        message: format!(
                            "policy id `{}` is already defined in {}",
                            policy.id,
                            first.display()
                        ),
                    });
                } else {
                    policies.insert(policy.id.clone(), (path, policy));
                }
            }
            Err(mut file_errors) => errors.append(&mut file_errors),
        }
    }
    if errors.is_empty() {
        Ok(PolicySet::new(
            policies.into_values().map(|(_, p)| p).collect(),
            version_of(&sources),
        ))
    } else {
        Err(errors)
    }
}

/// The version of a set: keccak256 over its file names and texts, so identical sets on two
/// replicas have the same version.
pub fn version_of(sources: &Sources) -> B256 {
    let mut buf = Vec::new();
    for (name, text) in sources {
        for part in [name.as_bytes(), text.as_bytes()] {
            buf.extend_from_slice(&(part.len() as u64).to_be_bytes());
            buf.extend_from_slice(part);
        }
    }
    keccak256(buf)
}

/// Parse one policy file's text; `path` is only used in errors.
pub fn parse(path: &Path, src: &str) -> Result<Policy, Vec<PolicyFileError>> {
    let at = |span: std::ops::Range<usize>, message: String| {
        let (line, column) = line_col(src, span.start);
        PolicyFileError {
            file: path.to_owned(),
            line,
            column,
            message,
        }
    };
    let file: PolicyFile = toml::from_str(src).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        vec![at(span, e.message().to_owned())]
    })?;

    let mut errors = Vec::new();
    let mut check = |r: Result<(), PolicyFileError>| {
        if let Err(e) = r {
            errors.push(e);
        }
    };

    let id = file.id.get_ref().clone();
    if id.is_empty()
        || id.len() > MAX_POLICY_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        check(Err(at(
            file.id.span(),
            format!(
                "policy id `{id}` must be 1 to {MAX_POLICY_ID_LEN} letters, digits, `-` and `_`"
            ),
        )));
    }
    if file.chains.is_empty() {
        check(Err(at(
            0..0,
            "`chains` must name at least one chain id".into(),
        )));
    }

    let mut entry_points = Vec::new();
    for ep in &file.entry_points {
        match ep.get_ref().parse::<EntryPointVersion>() {
            Ok(v) => entry_points.push(v),
            Err(e) => check(Err(at(ep.span(), e))),
        }
    }
    if file.entry_points.is_empty() {
        check(Err(at(
            0..0,
            format!(
                "`entry_points` must name at least one version ({})",
                EntryPointVersion::ALL
                    .map(|v| format!("\"{v}\""))
                    .join(", ")
            ),
        )));
    }

    let max_validity = match &file.max_validity {
        None => DEFAULT_MAX_VALIDITY,
        Some(s) => match humantime::parse_duration(s.get_ref()) {
            Ok(d) if d.as_secs() > 0 => d,
            Ok(_) => {
                check(Err(at(s.span(), "max_validity must be at least 1s".into())));
                DEFAULT_MAX_VALIDITY
            }
            Err(e) => {
                check(Err(at(
                    s.span(),
                    format!("invalid duration `{}`: {e}", s.get_ref()),
                )));
                DEFAULT_MAX_VALIDITY
            }
        },
    };

    let active_until =
        file.active_until.as_ref().and_then(|d| {
            match humantime::parse_rfc3339_weak(&d.get_ref().to_string()) {
                Ok(t) => t
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs()),
                Err(e) => {
                    check(Err(at(
                        d.span(),
                        format!("active_until must be an RFC 3339 date-time: {e}"),
                    )));
                    None
                }
            }
        });

    let mut amount = |a: &Option<Spanned<Amount>>, what: &str| -> Option<U256> {
        let a = a.as_ref()?;
        match parse_amount(a.get_ref()) {
            Ok(v) => Some(v),
            Err(e) => {
                check(Err(at(a.span(), format!("{what}: {e}"))));
                None
            }
        }
    };
    let per_op = PerOpLimits {
        max_verification_gas_limit: file.per_op.max_verification_gas_limit,
        max_call_gas_limit: file.per_op.max_call_gas_limit,
        max_pre_verification_gas: file.per_op.max_pre_verification_gas,
        max_cost: amount(&file.per_op.max_cost, "max_cost"),
        max_fee_per_gas: amount(&file.per_op.max_fee_per_gas, "max_fee_per_gas"),
        max_priority_fee_per_gas: amount(
            &file.per_op.max_priority_fee_per_gas,
            "max_priority_fee_per_gas",
        ),
    };
    let mut allow: Vec<AllowRule> = Vec::new();
    let mut rule_errors = Vec::new();
    for rule in &file.allow {
        let target = match parse_address(rule.target.get_ref()) {
            Some(a) => a,
            None => {
                rule_errors.push(at(
                    rule.target.span(),
                    format!(
                        "target `{}` is not a 0x-prefixed 20-byte address",
                        rule.target.get_ref()
                    ),
                ));
                continue;
            }
        };
        if let Some(prev) = allow.iter().position(|r| r.target == target) {
            rule_errors.push(at(
                rule.target.span(),
                format!("target {target} already has a rule (allow[{prev}]): merge them into one"),
            ));
            continue;
        }
        let functions = match parse_functions(rule.functions.get_ref()) {
            Ok(f) => f,
            Err((span, message)) => {
                rule_errors.push(at(span, message));
                continue;
            }
        };
        if rule.functions.get_ref().is_empty() {
            rule_errors.push(at(
                rule.functions.span(),
                "functions is empty: list signatures, selectors, or \"*\"".into(),
            ));
            continue;
        }
        let max_value = match &rule.max_value {
            None => U256::ZERO,
            Some(a) => match parse_amount(a.get_ref()) {
                Ok(v) => v,
                Err(e) => {
                    rule_errors.push(at(a.span(), format!("max_value: {e}")));
                    continue;
                }
            },
        };
        allow.push(AllowRule {
            target,
            functions,
            max_value,
            delegatecall: rule.delegatecall,
        });
    }
    errors.append(&mut rule_errors);

    if let (Some(fee), Some(tip)) = (per_op.max_fee_per_gas, per_op.max_priority_fee_per_gas)
        && tip > fee
    {
        errors.push(at(
            0..0,
            "per_op: max_priority_fee_per_gas exceeds max_fee_per_gas".into(),
        ));
    }
    let mut budget =
        |b: &Option<Spanned<BudgetFile>>, scope: &str, periodic: bool| -> Option<Budget> {
            let b = b.as_ref()?;
            let (span, b) = (b.span(), b.get_ref());
            let cost = b
                .cost
                .as_ref()
                .and_then(|a| match parse_amount(a.get_ref()) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        errors.push(at(a.span(), format!("budgets.{scope}.cost: {e}")));
                        None
                    }
                });
            let period = match (&b.period, periodic) {
                (None, _) => None,
                (Some(p), false) => {
                    errors.push(at(
                        p.span(),
                        format!("budgets.{scope} lasts as long as the session: it takes no period"),
                    ));
                    None
                }
                (Some(p), true) => match humantime::parse_duration(p.get_ref()) {
                    Ok(d) if d.as_secs() > 0 => Some(d),
                    _ => {
                        errors.push(at(
                            p.span(),
                            format!(
                                "budgets.{scope}.period `{}` is not a duration like \"1d\"",
                                p.get_ref()
                            ),
                        ));
                        None
                    }
                },
            };
            if b.cost.is_none() && b.ops.is_none() {
                errors.push(at(
                    span,
                    format!("budgets.{scope} sets neither cost nor ops"),
                ));
            }
            Some(Budget {
                cost,
                ops: b.ops,
                period,
            })
        };
    let budgets = Budgets {
        session: budget(&file.budgets.session, "session", false),
        sender: budget(&file.budgets.sender, "sender", true),
        policy: budget(&file.budgets.policy, "policy", true),
    };
    let mut rate = |r: &Option<Spanned<String>>| {
        r.as_ref().and_then(|r| match parse_rate(r.get_ref()) {
            Ok(rate) => Some(rate),
            Err(e) => {
                errors.push(at(r.span(), e));
                None
            }
        })
    };
    let rate_per_sender = rate(&file.rate.per_sender);
    let rate_per_session = rate(&file.rate.per_session);
    let mut address_list = |items: &[Spanned<String>], what: &str| -> Vec<Address> {
        items
            .iter()
            .filter_map(|a| match parse_address(a.get_ref()) {
                Some(addr) => Some(addr),
                None => {
                    errors.push(at(
                        a.span(),
                        format!(
                            "{what}: `{}` is not a 0x-prefixed 20-byte address",
                            a.get_ref()
                        ),
                    ));
                    None
                }
            })
            .collect()
    };
    let senders = SenderLists {
        allow: address_list(&file.senders.allow, "senders.allow"),
        deny: address_list(&file.senders.deny, "senders.deny"),
    };
    let factories = address_list(&file.factories, "factories");
    let delegates = address_list(&file.delegates, "delegates");
    if let Some(both) = senders.allow.iter().find(|a| senders.deny.contains(a)) {
        errors.push(at(
            0..0,
            format!("senders: {both} is both allowed and denied"),
        ));
    }
    if file.require_session_proof && !file.require_session {
        errors.push(at(
            0..0,
            "require_session_proof needs require_session = true".into(),
        ));
    }

    if allow.is_empty() && errors.is_empty() {
        errors.push(at(
            0..0,
            "no [[allow]] rule: the policy would sponsor nothing".into(),
        ));
    }

    if let Some(m) = &file.max_sessions
        && *m.get_ref() == 0
    {
        errors.push(at(
            m.span(),
            "max_sessions must be at least 1 (leave it out for no bound)".into(),
        ));
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Policy {
        id,
        description: file.description.unwrap_or_default(),
        chains: file.chains,
        entry_points,
        require_session: file.require_session,
        require_session_proof: file.require_session_proof,
        max_validity,
        active_until,
        max_sessions: file.max_sessions.map(Spanned::into_inner),
        per_op,
        budgets,
        rate_per_sender,
        rate_per_session,
        senders,
        factories,
        delegates,
        allow,
    })
}

fn parse_functions(
    items: &[Spanned<String>],
) -> Result<FunctionFilter, (std::ops::Range<usize>, String)> {
    let mut selectors = Vec::new();
    for item in items {
        let s = item.get_ref();
        if s == "*" {
            if items.len() > 1 {
                return Err((
                    item.span(),
                    "\"*\" allows every function: list nothing else beside it".into(),
                ));
            }
            return Ok(FunctionFilter::Any);
        }
        let selector = if let Some(hex_sel) = s.strip_prefix("0x") {
            match hex::decode(hex_sel) {
                Ok(b) if b.len() == 4 => FixedBytes::<4>::from_slice(&b),
                _ => {
                    return Err((
                        item.span(),
                        format!("selector `{s}` must be 4 bytes of hex, e.g. 0xa9059cbb"),
                    ));
                }
            }
        } else {
            validate_signature(s).map_err(|m| (item.span(), m))?;
            FixedBytes::<4>::from_slice(&keccak256(s.as_bytes())[..4])
        };
        if selectors.iter().any(|(sel, _)| *sel == selector) {
            return Err((item.span(), format!("`{s}` is listed twice")));
        }
        selectors.push((selector, s.clone()));
    }
    Ok(FunctionFilter::Selectors(selectors))
}

/// A canonical function signature: `name(type,type)` with no spaces and no `uint`/`int` aliases
/// (they hash to a different selector than the contract's).
fn validate_signature(s: &str) -> Result<(), String> {
    let open = s.find('(').filter(|_| s.ends_with(')'));
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
            && !n.as_bytes()[0].is_ascii_digit()
    };
    let Some(open) = open.filter(|&i| name_ok(&s[..i])) else {
        return Err(format!(
            "`{s}` is not a function signature like `transfer(address,uint256)` or a selector like `0xa9059cbb`"
        ));
    };
    if s.contains(char::is_whitespace) {
        return Err(format!(
            "`{s}`: remove the spaces (the selector hashes the exact text)"
        ));
    }
    let args = &s[open + 1..s.len() - 1];
    for ty in args
        .split([',', '(', ')', '[', ']'])
        .filter(|t| !t.is_empty() && !t.bytes().all(|b| b.is_ascii_digit()))
    {
        if ty == "uint" || ty == "int" || ty == "byte" || ty == "fixed" || ty == "ufixed" {
            return Err(format!(
                "`{s}`: write `{ty}256`/canonical types; aliases change the selector"
            ));
        }
    }
    Ok(())
}

/// Parse `"0.1 ether"`, `"30 gwei"`, `"123 wei"`, `"123"` or a TOML integer into wei.
fn parse_amount(amount: &Amount) -> Result<U256, String> {
    match amount {
        Amount::Wei(n) => Ok(U256::from(*n)),
        Amount::Text(t) => parse_amount_text(t),
    }
}

/// Parse `"0.1 ether"`, `"30 gwei"`, `"123 wei"` or `"123"` into wei.
pub fn parse_amount_text(text: &str) -> Result<U256, String> {
    let text = text.trim();
    let (number, decimals) = match text.rsplit_once(' ') {
        None => (text, 0u32),
        Some((n, unit)) => (
            n.trim(),
            match unit {
                "wei" => 0,
                "gwei" => 9,
                "ether" | "eth" => 18,
                other => {
                    return Err(format!(
                        "unknown unit `{other}` in `{text}` (use wei, gwei or ether)"
                    ));
                }
            },
        ),
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits_ok(int) || !digits_ok(frac) {
        return Err(format!(
            "`{text}` is not an amount like \"0.1 ether\", \"30 gwei\" or \"1000\""
        ));
    }
    if frac.len() > decimals as usize {
        return Err(format!(
            "`{text}` has more decimals than its unit allows (fractions of a wei)"
        ));
    }
    let scaled = format!("{int}{frac:0<width$}", width = decimals as usize);
    U256::from_str_radix(&scaled, 10).map_err(|_| format!("`{text}` is too large"))
}

fn parse_address(s: &str) -> Option<Address> {
    (s.len() == 42 && s.starts_with("0x"))
        .then(|| s.parse().ok())
        .flatten()
}

/// `"20/min"`, `"5/s"`, `"1000/h"`, `"10/1m"`: at most N operations per window.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let err = || format!("rate `{s}` is not like \"20/min\" (per s, min, h, d, or a duration)");
    let (n, per) = s.split_once('/').ok_or_else(err)?;
    let count: u32 = n.trim().parse().ok().filter(|&c| c > 0).ok_or_else(err)?;
    let per = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => humantime::parse_duration(other)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(err)?,
    };
    // GCRA spaces requests by `per / count`: under a nanosecond would be no spacing at all.
    if per / count < Duration::from_nanos(1) {
        return Err(format!("rate `{s}` is over one a nanosecond"));
    }
    Ok(Rate { count, per })
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(src: &str) -> Vec<String> {
        parse(Path::new("p.toml"), src)
            .err()
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const GOOD: &str = r#"
id = "game"
chains = [31337]
entry_points = ["0.7", "0.8"]
max_validity = "5m"
active_until = 2030-01-01T00:00:00Z

[per_op]
max_cost = "0.002 ether"
max_fee_per_gas = "100 gwei"
max_priority_fee_per_gas = 3000000000
max_pre_verification_gas = 120000

[[allow]]
target = "0x1111111111111111111111111111111111111111"
functions = ["makeMove(uint256,uint8)", "0xa9059cbb"]
max_value = "0"
"#;

    #[test]
    fn parses_a_full_policy() -> Result<(), Vec<PolicyFileError>> {
        let p = parse(Path::new("p.toml"), GOOD)?;
        assert_eq!(p.max_validity, Duration::from_secs(300));
        assert_eq!(p.active_until, Some(1_893_456_000));
        assert_eq!(
            p.per_op.max_cost,
            Some(U256::from(2_000_000_000_000_000u64))
        );
        assert_eq!(
            p.per_op.max_priority_fee_per_gas,
            Some(U256::from(3_000_000_000u64))
        );
        assert_eq!(p.per_op.max_pre_verification_gas, Some(120_000));
        let FunctionFilter::Selectors(sel) = &p.allow[0].functions else {
            panic!("selectors")
        };
        assert_eq!(hex::encode(sel[1].0), "a9059cbb");
        assert_eq!(
            sel[0].0,
            FixedBytes::<4>::from_slice(&keccak256("makeMove(uint256,uint8)")[..4])
        );
        Ok(())
    }

    #[test]
    fn max_sessions_is_at_least_one() {
        let with = |n: u64| {
            GOOD.replace(
                "active_until = 2030-01-01T00:00:00Z",
                &format!("active_until = 2030-01-01T00:00:00Z\nmax_sessions = {n}"),
            )
        };
        assert_eq!(
            parse(Path::new("p.toml"), &with(1000)).map(|p| p.max_sessions),
            Ok(Some(1000))
        );
        assert_eq!(
            parse(Path::new("p.toml"), GOOD).map(|p| p.max_sessions),
            Ok(None)
        );
        let errs = errors(&with(0));
        assert!(
            errs.iter()
                .any(|e| e.contains("max_sessions must be at least 1")),
            "{errs:?}"
        );
    }

    #[test]
    fn unknown_keys_report_line_and_column() {
        let errs = errors(&GOOD.replace("max_validity", "max_validty"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("p.toml:5:1:"), "{errs:?}");
        assert!(errs[0].contains("max_validty"), "{errs:?}");
    }

    #[test]
    fn every_problem_is_reported() {
        let src = GOOD
            .replace("\"0.002 ether\"", "\"2 bananas\"")
            .replace("0x1111111111111111111111111111111111111111", "0x1234")
            .replace("\"5m\"", "\"soon\"");
        let errs = errors(&src);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.starts_with("p.toml:5:16:") && e.contains("soon")),
            "{errs:?}"
        );
        assert!(errs.iter().any(|e| e.contains("bananas")), "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("0x1234") && e.starts_with("p.toml:15:")),
            "{errs:?}"
        );
    }

    #[test]
    fn contradictions_and_overlaps_are_errors() {
        let dup = format!(
            "{GOOD}\n[[allow]]\ntarget = \"0x1111111111111111111111111111111111111111\"\nfunctions = [\"*\"]\n"
        );
        assert!(
            errors(&dup)
                .iter()
                .any(|e| e.contains("already has a rule"))
        );
        let tip = GOOD.replace("3000000000", "\"200 gwei\"");
        assert!(
            errors(&tip)
                .iter()
                .any(|e| e.contains("exceeds max_fee_per_gas"))
        );
        for bad in [
            "transfer(address, uint256)",
            "transfer(address,uint)",
            "transfer",
            "0x1234",
        ] {
            let src = GOOD.replace("makeMove(uint256,uint8)", bad);
            assert_eq!(errors(&src).len(), 1, "{bad}");
        }
    }

    #[test]
    fn budgets_rates_and_senders() -> Result<(), Vec<PolicyFileError>> {
        let src = format!(
            "{GOOD}\n[budgets]\nsession = {{ cost = \"0.02 ether\", ops = 500 }}\n\
             sender = {{ cost = \"0.05 ether\", ops = 2000, period = \"1d\" }}\npolicy = {{ cost = \"10 ether\", period = \"30d\" }}\n\
             [rate]\nper_sender = \"20/min\"\n[senders]\ndeny = [\"0x2222222222222222222222222222222222222222\"]\n"
        );
        let p = parse(Path::new("p.toml"), &src)?;
        assert_eq!(p.budgets.session.as_ref().and_then(|b| b.ops), Some(500));
        assert_eq!(
            p.budgets.sender.as_ref().and_then(|b| b.period),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(
            p.budgets.policy.as_ref().and_then(|b| b.cost),
            Some(U256::from(10u64) * U256::from(10u64).pow(U256::from(18u64)))
        );
        assert_eq!(
            p.rate_per_sender,
            Some(super::super::Rate {
                count: 20,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(p.senders.deny.len(), 1);
        // Over one a nanosecond would space nothing (it used to be no limit at all).
        assert!(parse_rate("1000000000/s").is_ok());
        assert!(
            parse_rate("2000000000/s").is_err_and(|e| e.contains("one a nanosecond")),
            "refused"
        );

        let bad = src
            .replace("ops = 500 }", "ops = 500, period = \"1d\" }")
            .replace("20/min", "often")
            .replace(
                "deny = [",
                "allow = [\"0x2222222222222222222222222222222222222222\"]\ndeny = [",
            );
        let errs = errors(&bad);
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs.iter().any(|e| e.contains("takes no period")),
            "{errs:?}"
        );
        assert!(errs.iter().any(|e| e.contains("often")), "{errs:?}");
        assert!(
            errs.iter().any(|e| e.contains("both allowed and denied")),
            "{errs:?}"
        );
        Ok(())
    }

    #[test]
    fn amounts() {
        let t = |s: &str| parse_amount(&Amount::Text(s.into()));
        assert_eq!(t("1 wei"), Ok(U256::from(1)));
        assert_eq!(t("1.5 gwei"), Ok(U256::from(1_500_000_000u64)));
        assert_eq!(t("0.1 ether"), Ok(U256::from(100_000_000_000_000_000u64)));
        assert_eq!(t("42"), Ok(U256::from(42)));
        for bad in [
            "",
            "1.5",
            "1.5 wei",
            "-1 gwei",
            "1 finney",
            "1e18",
            "0.0000000001 gwei",
        ] {
            assert!(t(bad).is_err(), "{bad}");
        }
    }
}
