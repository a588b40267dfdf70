//! What the benches share (`mod common;` in each).

use alloy::primitives::{Address, U256, address, keccak256};
use alloy::sol;
use alloy::sol_types::SolCall;
use session_paymaster::userop::UserOperation;

sol! {
    function execute(address dest, uint256 value, bytes func);
}

/// A SimpleAccount operation of `sender` calling `increment()` on the demo Counter (the one
/// `policies/dev-counter.toml` and the bench policies allow), with gas limits and fees set, as
/// a client sends it for a final signature.
pub(crate) fn counter_op(sender: Address, nonce: u64) -> UserOperation {
    UserOperation {
        sender,
        nonce: U256::from(nonce),
        call_data: executeCall {
            dest: address!("0xCF3b87F3D9d62cdF4723D97D8139156c6b2AB4B3"),
            value: U256::ZERO,
            func: keccak256("increment()")[..4].to_vec().into(),
        }
        .abi_encode()
        .into(),
        call_gas_limit: 100_000,
        verification_gas_limit: 200_000,
        pre_verification_gas: U256::from(50_000),
        max_fee_per_gas: 2_000_000_000,
        max_priority_fee_per_gas: 1_000_000_000,
        ..Default::default()
    }
}
