//! Prometheus metrics, rendered as text at `GET /metrics`: requests by method and outcome,
//! rejections by reason, latency histograms (whole request, budget reservation, signing), and
//! gauges (policies loaded, rate-limit keys tracked, paymaster deposits read by the watcher).
//!
//! A handful of atomics and one small map: recording is a lock of a few nanoseconds, nothing
//! on the hot path allocates once a (method, outcome) pair has been seen.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// All metrics of one instance.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String), u64>>,
    rejections: Mutex<BTreeMap<String, u64>>,
    deposits: Mutex<BTreeMap<String, (u128, bool)>>,
    /// Whole JSON-RPC calls.
    pub request_seconds: Histogram,
    /// Budget reservations (the ledger step).
    pub reserve_seconds: Histogram,
    /// Signatures.
    pub sign_seconds: Histogram,
}

fn bump<K: Ord + Clone>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    let mut map = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *map.entry(key).or_insert(0) += 1;
}

/// Escape a label value (Prometheus text format).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// One JSON-RPC call of `method` ended with `outcome` (`ok` or an error code).
    pub fn request(&self, method: &str, outcome: &str, took: Duration) {
        // Unknown method names are client input: fold them so they cannot grow the map.
        let method = if method.starts_with("pm_") || method.starts_with("eth_") {
            method
        } else {
            "other"
        };
        bump(&self.requests, (method.to_owned(), outcome.to_owned()));
        self.request_seconds.observe(took);
    }

    /// A sponsorship was refused for `reason` (a stable code).
    pub fn rejection(&self, reason: &str) {
        bump(&self.rejections, reason.to_owned());
    }

    /// The paymaster deposit of `entry_point` as last read from the chain, and whether it is
    /// below the configured threshold.
    pub fn deposit(&self, entry_point: &str, wei: u128, low: bool) {
        let mut map = self
            .deposits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(entry_point.to_owned(), (wei, low));
    }

    /// The text exposition, with the gauges the caller reads at scrape time.
    pub fn render(&self, policies: usize, rate_limit_keys: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP sp_requests_total JSON-RPC calls by method and outcome.\n# TYPE sp_requests_total counter"
        );
        for ((method, outcome), n) in self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "sp_requests_total{{method=\"{}\",outcome=\"{}\"}} {n}",
                label(method),
                label(outcome)
            );
        }
        let _ = writeln!(
            out,
            "# HELP sp_rejections_total Sponsorships refused, by reason.\n# TYPE sp_rejections_total counter"
        );
        for (reason, n) in self
            .rejections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "sp_rejections_total{{reason=\"{}\"}} {n}",
                label(reason)
            );
        }
        self.request_seconds
            .render(&mut out, "sp_request_seconds", "JSON-RPC call latency.");
        self.reserve_seconds.render(
            &mut out,
            "sp_reserve_seconds",
            "Budget reservation latency.",
        );
        self.sign_seconds
            .render(&mut out, "sp_sign_seconds", "Signing latency.");
        let _ = writeln!(
            out,
            "# HELP sp_policies Policies in force.\n# TYPE sp_policies gauge\nsp_policies {policies}"
        );
        let _ = writeln!(
            out,
            "# HELP sp_rate_limit_keys Keys tracked by rate limiters.\n# TYPE sp_rate_limit_keys gauge\nsp_rate_limit_keys {rate_limit_keys}"
        );
        let deposits = self
            .deposits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(
            out,
            "# HELP sp_paymaster_deposit_wei Paymaster deposit in the EntryPoint.\n# TYPE sp_paymaster_deposit_wei gauge"
        );
        for (ep, (wei, _)) in deposits.iter() {
            let _ = writeln!(
                out,
                "sp_paymaster_deposit_wei{{entry_point=\"{ep}\"}} {wei}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP sp_paymaster_deposit_low 1 when the deposit is below --low-deposit-wei.\n# TYPE sp_paymaster_deposit_low gauge"
        );
        for (ep, (_, low)) in deposits.iter() {
            let _ = writeln!(
                out,
                "sp_paymaster_deposit_low{{entry_point=\"{ep}\"}} {}",
                u8::from(*low)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.request("pm_sponsorUserOperation", "ok", Duration::from_micros(300));
        m.request("pm_sponsorUserOperation", "ok", Duration::from_millis(3));
        m.request("evil\"name", "-32601", Duration::from_micros(50));
        m.rejection("fee_too_high");
        m.deposit("0xabc", 5, true);
        let text = m.render(4, 7);
        assert!(
            text.contains("sp_requests_total{method=\"pm_sponsorUserOperation\",outcome=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("sp_requests_total{method=\"other\",outcome=\"-32601\"} 1"),
            "{text}"
        );
        assert!(text.contains("sp_rejections_total{reason=\"fee_too_high\"} 1"));
        assert!(
            text.contains("sp_request_seconds_bucket{le=\"0.0005\"} 2"),
            "{text}"
        );
        assert!(text.contains("sp_request_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("sp_policies 4") && text.contains("sp_rate_limit_keys 7"));
        assert!(text.contains("sp_paymaster_deposit_low{entry_point=\"0xabc\"} 1"));
    }
}
