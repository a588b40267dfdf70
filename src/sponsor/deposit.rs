//! Deposit-aware admission (part of the reserve step): bundlers refuse a paymaster whose
//! EntryPoint deposit does not cover its pending operations, and a deposit that runs dry
//! strands every signed operation. So the worst cases of the open reservations of each
//! paymaster are kept below its deposit less a margin.
//!
//! The deposit and the open total (the `paymaster:<EntryPoint>` scope that every reservation is
//! also charged to, summed over the policies) are read by the settlement watcher each poll;
//! between two polls this replica adds what it reserved itself. Other replicas' reservations
//! are seen at the next poll: the margin covers them. Without a watcher the deposit is unknown
//! and nothing is refused here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use alloy::primitives::Address;

/// The worst cases of the open reservations charged to the paymaster of `entry_point`, over
/// `policies`, gwei (what the watcher and `status` hold against its deposit).
pub async fn open_against_deposit(
    ledger: &crate::ledger::Ledger,
    policies: &[String],
    chain_id: u64,
    entry_point: Address,
) -> Result<u64, crate::session::StoreError> {
    let scope = paymaster_scope(chain_id, entry_point);
    let mut open = 0u64;
    for policy in policies {
        open = open.saturating_add(ledger.open(policy, &scope).await?);
    }
    Ok(open)
}

/// Default share of a deposit (per cent) kept free of open reservations (`--deposit-margin`).
pub const DEFAULT_MARGIN_PERCENT: u64 = 10;

/// What is known of one paymaster's deposit.
#[derive(Debug, Default)]
struct Entry {
    /// Deposit, gwei (`u64::MAX`: not read yet).
    deposit: AtomicU64,
    /// Open worst cases when the watcher last looked, gwei.
    open: AtomicU64,
    /// What this replica reserved since, gwei.
    local: AtomicU64,
}

/// The deposits of the paymasters served, as the admission check sees them.
#[derive(Debug)]
pub struct DepositGuard {
    /// Whether a watcher reads the deposits (then every sponsorship is reserved, and counted
    /// against its paymaster's deposit).
    tracking: AtomicBool,
    entries: HashMap<Address, Entry>,
    /// Share of the deposit (per cent) never promised to open reservations.
    margin_percent: u64,
}

/// The deposit would not cover an operation on top of the open reservations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepositShort {
    /// Deposit, gwei.
    pub deposit: u64,
    /// Open worst cases, gwei.
    pub open: u64,
    /// This operation's worst case, gwei.
    pub requested: u64,
}

impl DepositGuard {
    /// A guard for the paymasters of these EntryPoints, keeping `margin_percent` of each
    /// deposit free.
    pub fn new(entry_points: impl IntoIterator<Item = Address>, margin_percent: u64) -> Self {
        Self {
            tracking: AtomicBool::new(false),
            entries: entry_points
                .into_iter()
                .map(|ep| {
                    let e = Entry::default();
                    e.deposit.store(u64::MAX, Ordering::Relaxed);
                    (ep, e)
                })
                .collect(),
            margin_percent: margin_percent.min(100),
        }
    }

    /// A watcher reads the deposits from now on.
    pub fn track(&self) {
        self.tracking.store(true, Ordering::Relaxed);
    }

    /// Whether a watcher reads the deposits.
    pub fn tracking(&self) -> bool {
        self.tracking.load(Ordering::Relaxed)
    }

    /// The watcher read `deposit` and summed `open` (both gwei) for `entry_point`'s paymaster.
    pub fn observe(&self, entry_point: Address, deposit: u64, open: u64) {
        if let Some(e) = self.entries.get(&entry_point) {
            e.deposit.store(deposit, Ordering::Relaxed);
            e.open.store(open, Ordering::Relaxed);
            e.local.store(0, Ordering::Relaxed);
        }
    }

    /// Whether `cost` (gwei) more fits under the deposit less the margin.
    pub fn admit(&self, entry_point: Address, cost: u64) -> Result<(), DepositShort> {
        let Some(e) = self.entries.get(&entry_point) else {
            return Ok(());
        };
        let deposit = e.deposit.load(Ordering::Relaxed);
        if deposit == u64::MAX {
            return Ok(());
        }
        let open = e
            .open
            .load(Ordering::Relaxed)
            .saturating_add(e.local.load(Ordering::Relaxed));
        let usable = deposit - deposit / 100 * self.margin_percent;
        if open.saturating_add(cost) > usable {
            return Err(DepositShort {
                deposit,
                open,
                requested: cost,
            });
        }
        Ok(())
    }

    /// This replica reserved `cost` (gwei) on `entry_point`'s paymaster.
    pub fn reserved(&self, entry_point: Address, cost: u64) {
        if let Some(e) = self.entries.get(&entry_point) {
            e.local.fetch_add(cost, Ordering::Relaxed);
        }
    }
}

/// The scope every reservation on `entry_point`'s paymaster on `chain_id` is also charged to
/// (no limit): its `open` part, summed over the policies, is what the deposit must cover. Named
/// by the chain and the EntryPoint's first 6 bytes (`pm:8453:0000000071727de2…` is v0.7's on
/// Base): short, as every reservation record names it; the chain, since the EntryPoint and our
/// paymaster have the same addresses on every chain, and a deposit is one chain's.
pub fn paymaster_scope(chain_id: u64, entry_point: Address) -> String {
    format!("pm:{chain_id}:{}", hex::encode(&entry_point[..6]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_deposit_less_the_margin() {
        let ep = Address::repeat_byte(1);
        let guard = DepositGuard::new([ep], 10);
        assert_eq!(guard.admit(ep, u64::MAX - 1), Ok(()), "unknown deposit");
        guard.observe(ep, 1000, 500);
        assert_eq!(guard.admit(ep, 400), Ok(()));
        guard.reserved(ep, 400);
        assert_eq!(
            guard.admit(ep, 1),
            Err(DepositShort {
                deposit: 1000,
                open: 900,
                requested: 1
            })
        );
        guard.observe(ep, 1000, 100);
        assert_eq!(
            guard.admit(ep, 800),
            Ok(()),
            "the watcher's sum replaces ours"
        );
    }
}
