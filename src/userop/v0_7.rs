//! EntryPoint v0.7: userOpHash `keccak256(abi.encode(keccak256(encode(op)), entryPoint, chainId))`.

use alloy::primitives::{Address, B256, U256, address, b256, keccak256};
use alloy::sol_types::SolValue;

use super::hash::hashed_fields;
use super::{OpDigests, PackedUserOperation, VersionSpec};

/// v0.7.
pub const SPEC: VersionSpec = VersionSpec {
    name: "0.7",
    flag_suffix: "v07",
    forge_profile: "default",
    canonical_address: address!("0x0000000071727De22E5E9d8BAf0edAc6f37da032"),
    package: "aa07",
    entry_point_salt: b256!("0x90d8084deab30c2a37c45e8d47f49f2f7965183cb6990a98943ef94940681de3"),
    package_entry_point: address!("0x0000000071727De22E5E9d8BAf0edAc6f37da032"),
    user_op_hash,
    eip7702: false,
    paymaster_signature_suffix: false,
};

fn user_op_hash(
    op: &PackedUserOperation,
    digests: &OpDigests,
    entry_point: Address,
    chain_id: u64,
) -> B256 {
    let pmd = keccak256(&op.paymasterAndData);
    let inner = keccak256(hashed_fields(op, digests, pmd).abi_encode());
    keccak256((inner, entry_point, U256::from(chain_id)).abi_encode())
}
