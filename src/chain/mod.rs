//! Talking to the chain: deterministic deployment of the contracts for local stacks and tests
//! ([`deploy`]), and settlement of budget reservations from `UserOperationEvent`s ([`watcher`]).
//! Neither is on the sponsorship hot path.

pub mod deploy;
pub mod watcher;
