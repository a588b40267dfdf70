//! Talking to the chain: deterministic deployment of the contracts for local stacks and tests
//! ([`deploy`]), settlement of budget reservations from `UserOperationEvent`s ([`watcher`]),
//! the paymasters' on-chain state for `session-paymaster status` ([`status`]), and what `serve`
//! checks of each node at start ([`preflight`]), all through one outgoing JSON-RPC client
//! ([`client`]: http or https, bounded waits, which the bundler calls use too). None is on the
//! sponsorship hot path.

pub mod client;
pub mod deploy;
pub mod preflight;
pub mod status;
pub mod watcher;
