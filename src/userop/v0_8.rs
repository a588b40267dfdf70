//! EntryPoint v0.8: the v0.7 operation, an EIP-712 userOpHash (domain `{name: "ERC4337",
//! version: "1", chainId, verifyingContract: entryPoint}`), EIP-7702 accounts.

use alloy::primitives::{Address, B256, address, b256, keccak256};
use alloy::sol_types::{SolValue, eip712_domain};

use super::{PackedUserOperation, VersionSpec};

/// v0.8.
pub const SPEC: VersionSpec = VersionSpec {
    name: "0.8",
    flag_suffix: "v08",
    canonical_address: address!("0x4337084D9E255Ff0702461CF8895CE9E3b5Ff108"),
    package: "aa08",
    entry_point_salt: b256!("0x0a59dbff790c23c976a548690c27297883cc66b4c67024f9117b0238995e35e9"),
    user_op_hash,
    paymaster_signature_suffix: false,
};

/// `keccak256("PackedUserOperation(address sender,uint256 nonce,bytes initCode,bytes callData,bytes32 accountGasLimits,uint256 preVerificationGas,bytes32 gasFees,bytes paymasterAndData)")`
/// (`UserOperationLib.PACKED_USEROP_TYPEHASH`, the same in v0.9).
const PACKED_USEROP_TYPEHASH: B256 =
    b256!("0x29a0bca4af4be3421398da00295e58e6d7de38cb492214754cb6a47507dd6f8e");

/// The EIP-712 userOpHash of `op`, with `paymasterAndData`'s hash given (v0.9 hashes it
/// differently).
pub(super) fn eip712_user_op_hash(
    op: &PackedUserOperation,
    paymaster_and_data_hash: B256,
    entry_point: Address,
    chain_id: u64,
) -> B256 {
    let (s, n, ic, cd, agl, pvg, fees, pmd) =
        super::v0_7::hashed_fields(op, paymaster_and_data_hash);
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

fn user_op_hash(op: &PackedUserOperation, entry_point: Address, chain_id: u64) -> B256 {
    eip712_user_op_hash(op, keccak256(&op.paymasterAndData), entry_point, chain_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typehash_matches_its_definition() {
        let def = "PackedUserOperation(address sender,uint256 nonce,bytes initCode,bytes callData,bytes32 accountGasLimits,uint256 preVerificationGas,bytes32 gasFees,bytes paymasterAndData)";
        assert_eq!(keccak256(def), PACKED_USEROP_TYPEHASH);
    }
}
