//! session-paymaster: an ERC-4337 paymaster service that sponsors session-key operations.
//!
//! A JSON-RPC request ([`rpc`], authenticated by [`apikey`], limited by [`ratelimit`])
//! carries a user operation ([`userop`]). The sponsorship pipeline ([`sponsor`]) decodes what
//! it calls and checks it against the policies ([`policy`]) and the session grant
//! ([`session`]), reserves its worst case in the budgets ([`ledger`]), and signs paymaster
//! data ([`signer`]) that the on-chain SessionPaymaster (`contracts/`) verifies. A watcher
//! ([`chain`]) settles the budgets from the chain.
//!
//! # Layout
//! - [`admin`]: the admin REST API (session grants), behind a bearer token.
//! - [`apikey`]: API keys of dapp backends (SHA-256 hashes, policies each may use).
//! - [`app`]: state built from config, `router(state)`, background tasks (policy watcher,
//!   settlement watcher, rate-limit eviction).
//! - [`chain`]: deployment of the contracts (local stacks, and `deploy` for real chains); the
//!   settlement watcher; `status`, what the chain says of the paymasters; the one outgoing
//!   JSON-RPC client (chain nodes, bundlers).
//! - [`clock`]: the wall clock, in the seconds the EntryPoint counts.
//! - [`config`]: `serve`'s options: flags, `SP_*` environment, configuration file.
//! - [`ledger`]: budgets: atomic reservations in every scope, settlement (memory, Redis).
//! - [`metrics`]: Prometheus metrics (`/metrics`).
//! - [`policy`]: policy files, calldata decoding, the checks, live and published sets.
//! - [`ratelimit`]: rate limits per API key, sender and session (in memory, bounded).
//! - [`rejection`]: why an operation is refused: the [`rejection::Reason`] enum, one wire
//!   name and one docs row each.
//! - [`rpc`]: JSON-RPC envelope, methods, and the one error-code table.
//! - [`server`]: the HTTP server loop, `run(listener, router, shutdown, limits)`: deadlines for
//!   headers, idle connections and requests, a cap on connections.
//! - [`session`]: session grants, their stores (memory, Redis, the shared Redis connection).
//! - [`signer`]: the paymaster key: where it comes from, EIP-191 signing (k256's ECDSA, the
//!   nonce inverted blinded: `signer::ecdsa`).
//! - [`sponsor`]: one sponsorship from request to signature, as a pipeline of named steps.
//! - [`userop`]: user operations (RPC and packed forms), hashes, paymaster data.
//! - [`wire`]: strict parsing of JSON-RPC hex quantities, data and addresses.

pub mod admin;
pub mod apikey;
pub mod app;
pub mod chain;
pub mod clock;
pub mod config;
pub mod ledger;
pub mod metrics;
pub mod policy;
pub mod ratelimit;
pub mod rejection;
pub mod rpc;
pub mod server;
pub mod session;
pub mod signer;
pub mod sponsor;
pub mod userop;
pub mod wire;
