//! session-paymaster: an ERC-4337 paymaster service that sponsors session-key operations.
//!
//! A JSON-RPC request ([`rpc`]) carries a user operation ([`userop`]); the sponsorship
//! pipeline ([`sponsor`]) decodes what it calls and checks it against the policies
//! ([`policy`]), then signs paymaster data ([`signer`]) that the on-chain SessionPaymaster
//! (`contracts/`) verifies.
//!
//! # Layout
//! - [`admin`]: the admin REST API (session grants), behind a bearer token.
//! - [`apikey`]: API keys of dapp backends (SHA-256 hashes, policies each may use).
//! - [`app`]: state built from config, `router(state)`, `run(listener, shutdown)`.
//! - [`chain`]: deterministic deployment of the contracts (local stacks, tests).
//! - [`config`]: flags and `SP_*` environment variables of `serve`.
//! - [`ratelimit`]: rate limits per API key, sender and session (in memory, bounded).
//! - [`rpc`]: JSON-RPC envelope, methods, and the one error-code table.
//! - [`sponsor`]: one sponsorship from request to signature.
//! - [`ledger`]: budgets: atomic reservations in every scope (memory, Redis).
//! - [`metrics`]: Prometheus metrics (`/metrics`).
//! - [`policy`]: policy files, calldata decoding, and the checks an operation must pass.
//! - [`session`]: session grants, their stores (memory, Redis), and their checks.
//! - [`signer`]: the paymaster key: where it comes from, EIP-191 signing.
//! - [`userop`]: user operations (RPC and packed forms), hashes, paymaster data.
//! - [`wire`]: strict parsing of JSON-RPC hex quantities, data and addresses.

pub mod admin;
pub mod apikey;
pub mod app;
pub mod chain;
pub mod config;
pub mod ledger;
pub mod metrics;
pub mod policy;
pub mod ratelimit;
pub mod rpc;
pub mod session;
pub mod signer;
pub mod sponsor;
pub mod userop;
pub mod wire;
