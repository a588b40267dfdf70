//! Prometheus metrics at `GET /metrics` (OpenMetrics text), on the `prometheus-client` crate:
//! requests by method and outcome, rejections by reason, latency histograms (whole request,
//! budget reservation, signing), the settlement watcher's health, gauges set at scrape time
//! (policies, rate-limit keys, budget left, paymaster deposits), and counters brought up at
//! scrape time to totals the ledger keeps (its calls to Redis and what they carried).
//!
//! Every label value comes from a closed set, never verbatim from a client: methods outside
//! the ones served are `other`, outcomes are our error codes, reasons are [`Reason`] wire names
//! (and the few reasons of other error codes). A client cannot grow the exposition.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::ledger::LedgerCalls;
use crate::rejection::Reason;
use crate::rpc::METHODS;
use crate::session::GrantSource;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Outcomes: `ok` and the error codes of `rpc::error`.
const OUTCOMES: [&str; 13] = [
    "ok", "-32700", "-32600", "-32601", "-32602", "-32603", "-32001", "-32002", "-32003", "-32004",
    "-32005", "-32006", "other",
];

/// Reasons of the error codes other than -32003 (whose reasons are [`Reason`]s).
const OTHER_REASONS: [&str; 8] = [
    "rate_limited",
    "unauthorized",
    "unsupported_chain",
    "unsupported_entry_point",
    "paymaster_not_configured",
    "store_unavailable",
    "estimation_busy",
    "invalid_params",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EntryPointLabels {
    chain: u64,
    entry_point: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    policy: String,
    chain: u64,
    resource: &'static str,
}

/// What `/metrics` reads at scrape time.
#[derive(Debug, Default)]
pub struct Scrape {
    /// Policies in force.
    pub policies: usize,
    /// Keys tracked by the rate limiters.
    pub rate_limit_keys: usize,
    /// Seconds since the watcher's last successful poll, when it runs (of several chains', the
    /// most lagging one's).
    pub watcher_lag: Option<u64>,
    /// Per policy-wide budget: `(policy, chain, resource, remaining)`.
    pub budgets: Vec<(String, u64, &'static str, u64)>,
    /// Whether this replica's policy directory differs from the published set it serves.
    pub directory_differs: bool,
    /// Whether reservations are refused because Redis evicts keys, or has.
    pub refusing_for_eviction: bool,
    /// With sessions in Redis, whether this replica follows the revocation feed (its grant
    /// copies may then live up to 5 minutes; else 10 s).
    pub revocations_followed: Option<bool>,
    /// With the ledger in Redis, its calls of the reserve script so far and the operations
    /// they carried, by kind (`Ledger::call_counts`).
    pub ledger_calls: Option<LedgerCalls>,
}

/// A latency histogram in seconds.
#[derive(Debug, Clone)]
pub struct Latency(Histogram);

impl Default for Latency {
    fn default() -> Self {
        Self(Histogram::new(BUCKETS))
    }
}

impl Latency {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// All metrics of one instance.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    rejections: Family<ReasonLabels, Counter>,
    /// Whole JSON-RPC calls.
    pub request_seconds: Latency,
    /// Budget reservations (the ledger step).
    pub reserve_seconds: Latency,
    /// Signatures.
    pub sign_seconds: Latency,
    grant_reads: Family<SourceLabels, Counter>,
    policies: Gauge,
    rate_limit_keys: Gauge,
    budget_remaining: Family<BudgetLabels, Gauge>,
    deposit_wei: Family<EntryPointLabels, Gauge<f64, AtomicU64>>,
    deposit_low: Family<EntryPointLabels, Gauge>,
    open_wei: Family<EntryPointLabels, Gauge<f64, AtomicU64>>,
    watcher_polls_failed: Counter,
    watcher_ignored_events: Counter,
    watcher_lag_seconds: Gauge,
    directory_differs: Gauge,
    refusing_for_eviction: Gauge,
    revocations_followed: Gauge,
    ledger_calls: Family<KindLabels, Counter>,
    ledger_call_operations: Family<KindLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            requests: Family::default(),
            rejections: Family::default(),
            request_seconds: Latency::default(),
            reserve_seconds: Latency::default(),
            sign_seconds: Latency::default(),
            grant_reads: Family::default(),
            policies: Gauge::default(),
            rate_limit_keys: Gauge::default(),
            budget_remaining: Family::default(),
            deposit_wei: Family::default(),
            deposit_low: Family::default(),
            open_wei: Family::default(),
            watcher_polls_failed: Counter::default(),
            watcher_ignored_events: Counter::default(),
            watcher_lag_seconds: Gauge::default(),
            directory_differs: Gauge::default(),
            refusing_for_eviction: Gauge::default(),
            revocations_followed: Gauge::default(),
            ledger_calls: Family::default(),
            ledger_call_operations: Family::default(),
        };
        let r = &mut m.registry;
        r.register(
            "sp_requests",
            "JSON-RPC calls by method and outcome",
            m.requests.clone(),
        );
        r.register(
            "sp_rejections",
            "Calls refused, by reason",
            m.rejections.clone(),
        );
        r.register(
            "sp_request_seconds",
            "JSON-RPC call latency",
            m.request_seconds.0.clone(),
        );
        r.register(
            "sp_reserve_seconds",
            "Budget reservation latency",
            m.reserve_seconds.0.clone(),
        );
        r.register(
            "sp_sign_seconds",
            "Signing latency",
            m.sign_seconds.0.clone(),
        );
        r.register(
            "sp_session_grant_reads",
            "Session grants read for sponsorships, by source: this replica's copy or the store",
            m.grant_reads.clone(),
        );
        r.register("sp_policies", "Policies in force", m.policies.clone());
        r.register(
            "sp_rate_limit_keys",
            "Keys tracked by rate limiters",
            m.rate_limit_keys.clone(),
        );
        r.register(
            "sp_budget_remaining",
            "What is left of each policy budget in its current window",
            m.budget_remaining.clone(),
        );
        r.register(
            "sp_paymaster_deposit_wei",
            "Paymaster deposit in the EntryPoint",
            m.deposit_wei.clone(),
        );
        r.register(
            "sp_paymaster_deposit_low",
            "1 when the deposit is below --low-deposit-wei",
            m.deposit_low.clone(),
        );
        r.register(
            "sp_paymaster_open_wei",
            "Worst cases of the open reservations charged to the paymaster's deposit",
            m.open_wei.clone(),
        );
        r.register(
            "sp_watcher_polls_failed",
            "Settlement watcher polls that failed (chain RPC or store)",
            m.watcher_polls_failed.clone(),
        );
        r.register(
            "sp_watcher_ignored_events",
            "UserOperationEvents of our paymaster that matched no open reservation",
            m.watcher_ignored_events.clone(),
        );
        r.register(
            "sp_policy_directory_differs",
            "1 when this replica's policy directory differs from the published set it serves",
            m.directory_differs.clone(),
        );
        r.register(
            "sp_ledger_refusing_eviction",
            "1 while every reservation is refused because a Redis node evicts keys when full, or has evicted some",
            m.refusing_for_eviction.clone(),
        );
        r.register(
            "sp_session_revocations_followed",
            "With sessions in Redis: 1 while this replica follows the revocation feed (its copies of session grants may live up to 5 minutes), 0 while it does not (10 s). Always 0 without sessions in Redis (no copies)",
            m.revocations_followed.clone(),
        );
        r.register(
            "sp_ledger_calls",
            "Calls of the Redis ledger's reserve script this replica made (failed ones too), by kind: signing runs (sign) or checks (stubs, explanations)",
            m.ledger_calls.clone(),
        );
        r.register(
            "sp_ledger_call_operations",
            "Operations in calls of the Redis ledger's reserve script, whatever their answer (repeats, refusals and checks too), by kind; over sp_ledger_calls_total, operations per call",
            m.ledger_call_operations.clone(),
        );
        r.register(
            "sp_watcher_lag_seconds",
            "Seconds since the settlement watcher's last successful poll",
            m.watcher_lag_seconds.clone(),
        );
        m
    }
}

impl Metrics {
    /// One JSON-RPC call of `method` ended `ok` (`None`) or with error `code`.
    pub fn request(&self, method: &str, code: Option<i64>, took: Duration) {
        let method = METHODS
            .iter()
            .copied()
            .find(|m| *m == method)
            .unwrap_or("other");
        let outcome = match code {
            None => "ok",
            Some(code) => {
                let code = code.to_string();
                OUTCOMES
                    .iter()
                    .copied()
                    .find(|o| *o == code)
                    .unwrap_or("other")
            }
        };
        self.requests
            .get_or_create(&RequestLabels { method, outcome })
            .inc();
        self.request_seconds.observe(took);
    }

    /// A sponsorship read its session grant from this replica's copy or from the store.
    pub fn grant_read(&self, from: GrantSource) {
        self.grant_reads
            .get_or_create(&SourceLabels {
                source: from.as_str(),
            })
            .inc();
    }

    /// A call was refused for `reason` (the `reason` of its error data); anything not in the
    /// closed set counts as `other`.
    pub fn rejection(&self, reason: &str) {
        let reason = Reason::from_wire(reason)
            .map(Reason::as_str)
            .or_else(|| OTHER_REASONS.iter().copied().find(|r| *r == reason))
            .unwrap_or("other");
        self.rejections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The paymaster deposit of `entry_point` as last read from the chain, whether it is
    /// below the configured threshold, and the open worst cases charged to it (gwei).
    pub fn deposit(&self, chain: u64, entry_point: &str, wei: u128, low: bool, open_gwei: u64) {
        let labels = EntryPointLabels {
            chain,
            entry_point: entry_point.to_owned(),
        };
        self.deposit_wei.get_or_create(&labels).set(wei as f64);
        self.deposit_low.get_or_create(&labels).set(i64::from(low));
        self.open_wei
            .get_or_create(&labels)
            .set(open_gwei as f64 * 1e9);
    }

    /// A watcher poll failed.
    pub fn watcher_failed(&self) {
        self.watcher_polls_failed.inc();
    }

    /// Events of ours that closed no reservation.
    pub fn watcher_ignored(&self, events: usize) {
        self.watcher_ignored_events
            .inc_by(u64::try_from(events).unwrap_or(u64::MAX));
    }

    /// The exposition, with the gauges read at scrape time.
    pub fn render(&self, scrape: &Scrape) -> String {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.policies.set(gauge(scrape.policies as u64));
        self.rate_limit_keys
            .set(gauge(scrape.rate_limit_keys as u64));
        self.directory_differs
            .set(i64::from(scrape.directory_differs));
        self.refusing_for_eviction
            .set(i64::from(scrape.refusing_for_eviction));
        if let Some(followed) = scrape.revocations_followed {
            self.revocations_followed.set(i64::from(followed));
        }
        if let Some(lag) = scrape.watcher_lag {
            self.watcher_lag_seconds.set(gauge(lag));
        }
        // The ledger keeps the totals; each counter is brought up to its total (two scrapes at
        // once cannot add a call twice, nor take one back).
        if let Some(calls) = scrape.ledger_calls {
            for (kind, counts) in calls.by_kind() {
                let labels = KindLabels {
                    kind: kind.as_str(),
                };
                self.ledger_calls
                    .get_or_create(&labels)
                    .inner()
                    .fetch_max(counts.calls, Ordering::Relaxed);
                self.ledger_call_operations
                    .get_or_create(&labels)
                    .inner()
                    .fetch_max(counts.operations, Ordering::Relaxed);
            }
        }
        // A policy removed since the last scrape has no budget any more.
        self.budget_remaining.clear();
        for (policy, chain, resource, remaining) in &scrape.budgets {
            self.budget_remaining
                .get_or_create(&BudgetLabels {
                    policy: policy.clone(),
                    chain: *chain,
                    resource,
                })
                .set(gauge(*remaining));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::CallCounts;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.request("pm_sponsorUserOperation", None, Duration::from_micros(300));
        m.request("pm_sponsorUserOperation", None, Duration::from_millis(3));
        m.request("evil\"name", Some(-32601), Duration::from_micros(50));
        m.rejection("fee_too_high");
        m.deposit(8453, "0xabc", 5, true, 3);
        let text = m.render(&Scrape {
            policies: 4,
            rate_limit_keys: 7,
            watcher_lag: Some(3),
            budgets: vec![("p".into(), 8453, "ops", 9)],
            directory_differs: true,
            refusing_for_eviction: true,
            revocations_followed: Some(true),
            ledger_calls: Some(LedgerCalls {
                sign: CallCounts {
                    calls: 3,
                    operations: 70,
                },
                check: CallCounts {
                    calls: 1,
                    operations: 2,
                },
            }),
        });
        for line in [
            "sp_requests_total{method=\"pm_sponsorUserOperation\",outcome=\"ok\"} 2",
            "sp_requests_total{method=\"other\",outcome=\"-32601\"} 1",
            "sp_rejections_total{reason=\"fee_too_high\"} 1",
            "sp_request_seconds_bucket{le=\"0.0005\"} 2",
            "sp_request_seconds_bucket{le=\"+Inf\"} 3",
            "sp_policies 4",
            "sp_rate_limit_keys 7",
            "sp_paymaster_deposit_low{chain=\"8453\",entry_point=\"0xabc\"} 1",
            "sp_budget_remaining{policy=\"p\",chain=\"8453\",resource=\"ops\"} 9",
            "sp_watcher_lag_seconds 3",
            "sp_policy_directory_differs 1",
            "sp_ledger_refusing_eviction 1",
            "sp_session_revocations_followed 1",
            "sp_ledger_calls_total{kind=\"sign\"} 3",
            "sp_ledger_call_operations_total{kind=\"sign\"} 70",
            "sp_ledger_calls_total{kind=\"check\"} 1",
            "sp_ledger_call_operations_total{kind=\"check\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        // Each counter is brought up to the ledger's total: a scrape of the same total again
        // adds nothing, a lower one (read before a scrape that ran first) takes nothing back.
        let scraped = |sign_calls: u64| {
            let text = m.render(&Scrape {
                ledger_calls: Some(LedgerCalls {
                    sign: CallCounts {
                        calls: sign_calls,
                        operations: 70,
                    },
                    check: CallCounts::default(),
                }),
                ..Scrape::default()
            });
            text.lines()
                .find_map(|l| l.strip_prefix("sp_ledger_calls_total{kind=\"sign\"} "))
                .map(str::to_owned)
        };
        assert_eq!(scraped(3).as_deref(), Some("3"));
        assert_eq!(scraped(2).as_deref(), Some("3"));
        assert_eq!(scraped(5).as_deref(), Some("5"));
    }

    /// Client text never becomes a label: 99 more invented methods and reasons after the first
    /// add no series.
    #[test]
    fn labels_come_from_closed_sets() {
        let m = Metrics::default();
        let invent = |i: usize| {
            m.request(&format!("pm_invented{i}"), Some(-32601), Duration::ZERO);
            m.rejection(&format!("expected a hex quantity, got {i}"));
        };
        invent(0);
        let first = m.render(&Scrape::default()).len();
        (1..100).for_each(invent);
        let text = m.render(&Scrape::default());
        assert!(text.contains("sp_requests_total{method=\"other\",outcome=\"-32601\"} 100"));
        assert!(text.contains("sp_rejections_total{reason=\"other\"} 100"));
        assert!(
            text.len() <= first + 64, // counts gain digits; no line is added
            "grew from {first} to {} bytes",
            text.len()
        );
    }
}
