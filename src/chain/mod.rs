//! Talking to the chain: deterministic deployment of the contracts for local stacks and tests
//! ([`deploy`]), settlement of budget reservations from `UserOperationEvent`s ([`watcher`]),
//! and the paymasters' on-chain state for `session-paymaster status` ([`status`]), all through
//! one RPC client ([`rpc`]: http or https, bounded waits). None is on the sponsorship hot path.

pub mod deploy;
pub mod rpc;
pub mod status;
pub mod watcher;
