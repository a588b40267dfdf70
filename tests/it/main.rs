//! The integration tests: one binary, real dependencies (anvil with the canonical EntryPoints,
//! the service over HTTP on port 0).

// Helpers are `pub` for the sibling test modules of this one binary.
#![allow(unreachable_pub)]

mod apikeys;
mod chains;
mod deploy;
mod e2e;
mod faults;
mod fuzz;
mod hashes;
mod helpers;
mod hostile;
mod ledger;
mod policies;
mod process;
mod ratelimits;
mod rejections;
mod rpc;
mod sessions;
mod watcher;
