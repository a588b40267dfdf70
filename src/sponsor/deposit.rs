//! Deposit-aware admission (part of the reserve step): bundlers refuse a paymaster whose
//! EntryPoint deposit does not cover its pending operations, and a deposit that runs dry
//! strands every signed operation. So the worst cases of the open reservations of each
//! paymaster are kept below its deposit less a margin.
//!
//! The deposit and the open total (the `paymaster:<EntryPoint>` scope that every reservation is
//! also charged to, summed over the policies) are read by the settlement watcher each poll;
//! between two polls this replica adds what it reserved itself, and what it admitted and is
//! still reserving (a [`Hold`]: requests in flight at once each see the others). Other
//! replicas' reservations are seen at the next poll: the margin covers them, as it covers a
//! request dropped after the ledger wrote its reservation (its client gone, or a timeout),
//! whose hold is given back and whose reservation is counted from the next poll. Without a
//! watcher the deposit is unknown and nothing is refused here.

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
    /// What this replica admitted and is reserving now (its holds), gwei.
    pending: AtomicU64,
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

    /// What this replica has counted as reserved on `entry_point`'s paymaster since the last
    /// [`Self::observe`], gwei: taken by the watcher before it sums the open reservations.
    pub fn counted(&self, entry_point: Address) -> u64 {
        self.entries
            .get(&entry_point)
            .map_or(0, |e| e.local.load(Ordering::Acquire))
    }

    /// The watcher read `deposit` and summed `open` (both gwei) for `entry_point`'s paymaster,
    /// having taken [`Self::counted`] = `counted` before it began the sum: that much of this
    /// replica's count is in the sum now, and what it counted since stays counted (a
    /// reservation made while the sum was read is counted twice until the next poll, rather
    /// than not at all).
    pub fn observe(&self, entry_point: Address, deposit: u64, open: u64, counted: u64) {
        if let Some(e) = self.entries.get(&entry_point) {
            e.deposit.store(deposit, Ordering::Relaxed);
            e.open.store(open, Ordering::Release);
            let _ = e
                .local
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                    Some(l.saturating_sub(counted))
                });
        }
    }

    /// Whether `cost` (gwei) more fits under the deposit less the margin, counting what this
    /// replica is reserving now. If so and `hold`, it is held (counted) until the [`Hold`] is
    /// [kept](Hold::reserved) or dropped (given back); a check that reserves nothing (a stub,
    /// an explanation) passes `false` and holds nothing.
    pub fn admit(
        &self,
        entry_point: Address,
        cost: u64,
        hold: bool,
    ) -> Result<Hold<'_>, DepositShort> {
        let none = Hold {
            entry: None,
            cost,
            kept: false,
        };
        let Some(e) = self.entries.get(&entry_point) else {
            return Ok(none);
        };
        let deposit = e.deposit.load(Ordering::Relaxed);
        if deposit == u64::MAX {
            return Ok(none);
        }
        let usable = deposit - deposit / 100 * self.margin_percent;
        // Checked and held in one step: two requests in flight cannot both take the last room.
        let held = e
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |pending| {
                (e.committed(pending).saturating_add(cost) <= usable).then(|| {
                    if hold {
                        pending.saturating_add(cost)
                    } else {
                        pending
                    }
                })
            });
        match held {
            Ok(_) if !hold => Ok(none),
            Ok(_) => Ok(Hold {
                entry: Some(e),
                cost,
                kept: false,
            }),
            Err(pending) => Err(DepositShort {
                deposit,
                open: e.committed(pending),
                requested: cost,
            }),
        }
    }
}

impl Entry {
    /// What the deposit is promised to, gwei: the open reservations the watcher summed, this
    /// replica's since, and `pending` (its holds).
    fn committed(&self, pending: u64) -> u64 {
        self.open
            .load(Ordering::Relaxed)
            .saturating_add(self.local.load(Ordering::Relaxed))
            .saturating_add(pending)
    }
}

/// An admitted cost this replica is reserving: counted against the deposit until it is
/// [kept](Hold::reserved) as reserved, or given back (dropped: the ledger refused it, failed,
/// or the request was dropped while it waited). A request dropped after the ledger wrote its
/// reservation is thus counted from the watcher's next sum, as another replica's is: the
/// margin's (keeping it instead would let a client that hangs up, or a request refused
/// before it reached the ledger, hold room for nothing until that sum).
#[derive(Debug)]
#[must_use = "dropping a hold gives its room back"]
pub struct Hold<'a> {
    entry: Option<&'a Entry>,
    cost: u64,
    kept: bool,
}

impl Hold<'_> {
    /// The ledger reserved it: counted as this replica's until the watcher's next sum.
    pub fn reserved(mut self) {
        self.kept = true;
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.entry {
            if self.kept {
                // Counted as reserved before the hold leaves: the total never dips between.
                e.local.fetch_add(self.cost, Ordering::AcqRel);
            }
            let _ = e
                .pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    Some(p.saturating_sub(self.cost))
                });
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
        assert!(
            guard.admit(ep, u64::MAX - 1, true).is_ok(),
            "unknown deposit"
        );
        guard.observe(ep, 1000, 500, 0);
        guard.admit(ep, 400, true).expect("fits").reserved();
        assert_eq!(
            guard.admit(ep, 1, true).err(),
            Some(DepositShort {
                deposit: 1000,
                open: 900,
                requested: 1
            })
        );
        guard.observe(ep, 1000, 100, guard.counted(ep));
        assert!(
            guard.admit(ep, 800, true).is_ok(),
            "the watcher's sum replaces what was counted before it"
        );
    }

    /// Requests in flight at once each see what the others hold: of 100 admitted before any is
    /// reserved, 9 fit; once 2 are kept and the rest given back, 7 more do.
    #[test]
    fn requests_in_flight_share_the_room_left() {
        let ep = Address::repeat_byte(1);
        let guard = DepositGuard::new([ep], 10);
        guard.observe(ep, 1000, 0, 0);
        let holds: Vec<_> = (0..100)
            .filter_map(|_| guard.admit(ep, 100, true).ok())
            .collect();
        assert_eq!(holds.len(), 9, "900 gwei usable, 100 each");
        let short = guard.admit(ep, 100, true).err();
        assert_eq!(short.map(|s| s.open), Some(900));
        // A check holds nothing.
        assert!(guard.admit(ep, 100, false).is_err());
        // Two kept as reserved, the others given back (refused by the ledger, or dropped).
        let mut holds = holds.into_iter();
        for hold in holds.by_ref().take(2) {
            hold.reserved();
        }
        drop(holds);
        let again: Vec<_> = (0..100)
            .filter_map(|_| guard.admit(ep, 100, true).ok())
            .collect();
        assert_eq!(again.len(), 7, "200 counted, 700 left");
        drop(again);
        assert!(
            guard.admit(ep, 100, false).is_ok(),
            "a check passes while room is left"
        );
    }

    #[test]
    fn holds_are_shared_between_threads() {
        let ep = Address::repeat_byte(1);
        let guard = DepositGuard::new([ep], 0);
        guard.observe(ep, 1000, 0, 0);
        let admitted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if let Ok(hold) = guard.admit(ep, 7, true) {
                            hold.reserved();
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 1000 / 7);
    }
}
