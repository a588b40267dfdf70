//! Talking to the chain. Today: deterministic deployment of the contracts ([`deploy`]) for
//! local stacks and tests. The ledger issue adds the `UserOperationEvent` watcher here.

pub mod deploy;
