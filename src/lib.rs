//! session-paymaster: an ERC-4337 paymaster service that sponsors session-key operations.
//!
//! # Layout
//! - [`wire`]: strict parsing of JSON-RPC hex quantities, data and addresses.
//! - [`policy`]: policy files, calldata decoding, and the checks an operation must pass.
//! - [`signer`]: the paymaster key: where it comes from, EIP-191 signing.
//! - [`userop`]: user operations (RPC and packed forms), hashes, paymaster data.
pub mod policy;
pub mod signer;
pub mod userop;
pub mod wire;
