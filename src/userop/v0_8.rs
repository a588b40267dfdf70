//! EntryPoint v0.8: the v0.7 operation, an EIP-712 userOpHash, EIP-7702 accounts.

use alloy::primitives::{Address, B256, address, b256, keccak256};

use super::hash::eip712_user_op_hash;
use super::{OpDigests, PackedUserOperation, VersionSpec};

/// v0.8.
pub const SPEC: VersionSpec = VersionSpec {
    name: "0.8",
    flag_suffix: "v08",
    forge_profile: "v08",
    canonical_address: address!("0x4337084D9E255Ff0702461CF8895CE9E3b5Ff108"),
    package: "aa08",
    entry_point_salt: b256!("0x0a59dbff790c23c976a548690c27297883cc66b4c67024f9117b0238995e35e9"),
    package_entry_point: address!("0x4337084D9E255Ff0702461CF8895CE9E3b5Ff108"),
    user_op_hash,
    eip7702: true,
    paymaster_signature_suffix: false,
};

fn user_op_hash(
    op: &PackedUserOperation,
    digests: &OpDigests,
    entry_point: Address,
    chain_id: u64,
) -> B256 {
    let pmd = keccak256(&op.paymasterAndData);
    eip712_user_op_hash(op, digests, pmd, entry_point, chain_id)
}
