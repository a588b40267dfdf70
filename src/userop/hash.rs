//! The hashes: userOpHash per EntryPoint version, and the paymaster hash our signer signs.
//!
//! Both are cross-checked against the contracts on anvil (`tests/it/hashes.rs`):
//! `EntryPoint.getUserOpHash` of v0.7, v0.8 and v0.9, and `SessionPaymaster.getHash`.

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::sol_types::SolValue;

use super::EntryPointVersion;
use super::operation::{PackedUserOperation, UserOperation};
use super::paymaster_data::{PaymasterGas, ValidityWindow};

/// The hash the EntryPoint of `version` at `entry_point` on `chain_id` gives `op`
/// (`EntryPoint.getUserOpHash`; each version's module says how).
/// (The EIP-7702 initCode override of v0.8 and v0.9 is not needed: such operations are refused
/// at parsing.)
pub fn user_op_hash(
    version: EntryPointVersion,
    op: &PackedUserOperation,
    entry_point: Address,
    chain_id: u64,
) -> B256 {
    (version.spec().user_op_hash)(op, entry_point, chain_id)
}

/// `SessionPaymaster.getHash(op, validUntil, validAfter)` for `op` carrying our paymaster gas
/// limits (DESIGN §3). The signer signs its EIP-191 form.
pub fn paymaster_hash(
    op: &UserOperation,
    gas: PaymasterGas,
    paymaster: Address,
    chain_id: u64,
    window: ValidityWindow,
) -> B256 {
    // abi.encode(uint256(bytes32(paymasterAndData[20:52]))): the two uint128 gas limits as one word.
    let paymaster_gas = (U256::from(gas.verification) << 128) | U256::from(gas.post_op);
    keccak256(
        (
            op.sender,
            op.nonce,
            keccak256(op.init_code()),
            keccak256(&op.call_data),
            op.account_gas_limits(),
            paymaster_gas,
            op.pre_verification_gas,
            op.gas_fees(),
            U256::from(chain_id),
            paymaster,
            U256::from(window.valid_until),
            U256::from(window.valid_after),
        )
            .abi_encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_chains_give_different_hashes() {
        let op = UserOperation::default().pack(None);
        let ep = EntryPointVersion::V0_7.canonical_address();
        let a = user_op_hash(EntryPointVersion::V0_7, &op, ep, 1);
        assert_ne!(a, user_op_hash(EntryPointVersion::V0_8, &op, ep, 1));
        assert_ne!(a, user_op_hash(EntryPointVersion::V0_7, &op, ep, 2));
        // v0.9 differs from v0.8 only for an operation with a paymaster signature suffix.
        assert_eq!(
            user_op_hash(EntryPointVersion::V0_8, &op, ep, 1),
            user_op_hash(EntryPointVersion::V0_9, &op, ep, 1)
        );
    }
}
