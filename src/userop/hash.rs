//! The hashes: userOpHash per EntryPoint version, and the paymaster hash our signer signs.
//!
//! Both are cross-checked against the contracts on anvil (`tests/it/hashes.rs`):
//! `EntryPoint.getUserOpHash` of v0.7, v0.8 and v0.9, and `SessionPaymaster.getHash`.

use alloy::primitives::{Address, B256, U256, b256, keccak256};
use alloy::sol_types::{SolValue, eip712_domain};

use super::EntryPointVersion;
use super::operation::{OpDigests, PackedUserOperation, PaymasterFields, UserOperation};
use super::paymaster_data::{PaymasterGas, ValidityWindow};

/// The hash the EntryPoint of `version` at `entry_point` on `chain_id` gives `op` with
/// `paymaster` in place of its own paymaster fields (`EntryPoint.getUserOpHash`; each version's
/// module says how). An EIP-7702 account is hashed with the delegate its authorization names.
pub fn user_op_hash(
    version: EntryPointVersion,
    op: &UserOperation,
    paymaster: Option<&PaymasterFields>,
    entry_point: Address,
    chain_id: u64,
) -> B256 {
    user_op_hash_with(version, op, &op.digests(), paymaster, entry_point, chain_id)
}

/// [`user_op_hash`] with `op`'s [`digests`](UserOperation::digests) already computed.
pub fn user_op_hash_with(
    version: EntryPointVersion,
    op: &UserOperation,
    digests: &OpDigests,
    paymaster: Option<&PaymasterFields>,
    entry_point: Address,
    chain_id: u64,
) -> B256 {
    let spec = version.spec();
    let packed = op.pack(paymaster);
    // A version without EIP-7702 hashes such an account's marker as plain initCode bytes
    // (decoding refuses the operation; this is the hash that EntryPoint would give it).
    let plain;
    let digests = if !spec.eip7702 && op.eip7702.is_some() {
        plain = OpDigests {
            init_code: keccak256(&packed.initCode),
            ..*digests
        };
        &plain
    } else {
        digests
    };
    (spec.user_op_hash)(&packed, digests, entry_point, chain_id)
}

/// The fields `UserOperationLib.encode` hashes, with the initCode's and callData's hashes (an
/// EIP-7702 account's initCode hash is its delegate's) and `paymasterAndData`'s (v0.9 leaves
/// its paymaster signature out) given: what every version's userOpHash is built from.
pub(super) fn hashed_fields(
    op: &PackedUserOperation,
    digests: &OpDigests,
    paymaster_and_data_hash: B256,
) -> (Address, U256, B256, B256, B256, U256, B256, B256) {
    (
        op.sender,
        op.nonce,
        digests.init_code,
        digests.call_data,
        op.accountGasLimits,
        op.preVerificationGas,
        op.gasFees,
        paymaster_and_data_hash,
    )
}

/// `keccak256("PackedUserOperation(address sender,uint256 nonce,bytes initCode,bytes callData,bytes32 accountGasLimits,uint256 preVerificationGas,bytes32 gasFees,bytes paymasterAndData)")`
/// (`UserOperationLib.PACKED_USEROP_TYPEHASH` of v0.8 and v0.9).
const PACKED_USEROP_TYPEHASH: B256 =
    b256!("0x29a0bca4af4be3421398da00295e58e6d7de38cb492214754cb6a47507dd6f8e");

/// The EIP-712 userOpHash (v0.8 and later): domain `{name: "ERC4337", version: "1", chainId,
/// verifyingContract: entryPoint}`, `paymasterAndData`'s hash given.
pub(super) fn eip712_user_op_hash(
    op: &PackedUserOperation,
    digests: &OpDigests,
    paymaster_and_data_hash: B256,
    entry_point: Address,
    chain_id: u64,
) -> B256 {
    let (s, n, ic, cd, agl, pvg, fees, pmd) = hashed_fields(op, digests, paymaster_and_data_hash);
    let struct_hash =
        keccak256((PACKED_USEROP_TYPEHASH, s, n, ic, cd, agl, pvg, fees, pmd).abi_encode());
    let domain = eip712_domain! {
        name: "ERC4337",
        version: "1",
        chain_id: chain_id,
        verifying_contract: entry_point,
    };
    // keccak256(0x1901 ‖ domainSeparator ‖ structHash)
    keccak256(
        [
            &[0x19, 0x01][..],
            domain.separator().as_slice(),
            struct_hash.as_slice(),
        ]
        .concat(),
    )
}

/// `SessionPaymaster.getHash(op, validUntil, validAfter)` for `op` carrying our paymaster gas
/// limits (DESIGN §3). The signer signs its EIP-191 form. An EIP-7702 account's delegate stands
/// for its initCode (the v0.8 and later builds read it from the sender's code; v0.7 takes no
/// such account).
pub fn paymaster_hash(
    op: &UserOperation,
    gas: PaymasterGas,
    paymaster: Address,
    chain_id: u64,
    window: ValidityWindow,
) -> B256 {
    paymaster_hash_with(op, &op.digests(), gas, paymaster, chain_id, window)
}

/// [`paymaster_hash`] with `op`'s [`digests`](UserOperation::digests) already computed.
pub fn paymaster_hash_with(
    op: &UserOperation,
    digests: &OpDigests,
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
            digests.init_code,
            digests.call_data,
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
    fn typehash_matches_its_definition() {
        let def = "PackedUserOperation(address sender,uint256 nonce,bytes initCode,bytes callData,bytes32 accountGasLimits,uint256 preVerificationGas,bytes32 gasFees,bytes paymasterAndData)";
        assert_eq!(keccak256(def), PACKED_USEROP_TYPEHASH);
    }

    #[test]
    fn versions_and_chains_give_different_hashes() {
        let op = UserOperation::default();
        let ep = EntryPointVersion::V0_7.canonical_address();
        let a = user_op_hash(EntryPointVersion::V0_7, &op, None, ep, 1);
        assert_ne!(a, user_op_hash(EntryPointVersion::V0_8, &op, None, ep, 1));
        assert_ne!(a, user_op_hash(EntryPointVersion::V0_7, &op, None, ep, 2));
        // v0.9 differs from v0.8 only for an operation with a paymaster signature suffix.
        assert_eq!(
            user_op_hash(EntryPointVersion::V0_8, &op, None, ep, 1),
            user_op_hash(EntryPointVersion::V0_9, &op, None, ep, 1)
        );
    }
}
