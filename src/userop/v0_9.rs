//! EntryPoint v0.9: v0.8, plus a paymaster signature that may sit at the end of
//! `paymasterAndData` outside the userOpHash, so the account can sign before the paymaster
//! (`core/UserOperationLib.sol` of `@account-abstraction/contracts@0.9.0-rc.1`):
//!
//! ```text
//! paymasterAndData = paymaster(20) ‖ gas(32) ‖ paymasterData ‖ paymasterSignature ‖ uint16 len ‖ PAYMASTER_SIG_MAGIC
//! userOpHash covers  paymaster(20) ‖ gas(32) ‖ paymasterData ‖ PAYMASTER_SIG_MAGIC
//! ```
//!
//! Also new, and nothing this service has to follow: validity windows may be block numbers
//! (top bit of both `validAfter` and `validUntil`; ours are always timestamps, see
//! `paymaster_data::ValidityWindow`), and `initCode` is ignored for a deployed sender.

use alloy::primitives::{Address, B256, Bytes, address, hex, keccak256};

use super::{PackedUserOperation, VersionSpec};

/// v0.9. The canonical address is that of the final v0.9.0 (viem's `entryPoint09Address`);
/// the npm package is 0.9.0-rc.1, whose EntryPoint deployed with salt 0 lands at
/// [`RC1_ENTRY_POINT`] (DESIGN §7): local stacks use that one.
pub const SPEC: VersionSpec = VersionSpec {
    name: "0.9",
    flag_suffix: "v09",
    canonical_address: address!("0x433709009B8330FDa32311DF1C2AFA402eD8D009"),
    package: "aa09",
    entry_point_salt: B256::ZERO,
    user_op_hash,
    paymaster_signature_suffix: true,
};

/// Where 0.9.0-rc.1's EntryPoint lands through the CREATE2 deployer with salt 0.
pub const RC1_ENTRY_POINT: Address = address!("0x51c9fc6D0502B128dB22762bBa2b9c422Bc41C9B");

/// `keccak256("PaymasterSignature")[:8]`, the last 8 bytes of a `paymasterAndData` that carries
/// a paymaster signature.
pub const PAYMASTER_SIG_MAGIC: [u8; 8] = hex!("22e325a297439656");

/// `uint16 length ‖ PAYMASTER_SIG_MAGIC`.
const SUFFIX_LEN: usize = 2 + PAYMASTER_SIG_MAGIC.len();

/// The paymaster's static fields (address and two gas limits) and the suffix, at least.
const MIN_LEN_WITH_SUFFIX: usize = 52 + SUFFIX_LEN;

/// The length of the paymaster signature at the end of `paymaster_and_data` (0: none), as
/// `UserOperationLib.getPaymasterSignatureLength` reads it; `None` where that reverts (a
/// length reaching into the static fields), so no such operation can be hashed or land.
pub fn paymaster_signature_len(paymaster_and_data: &[u8]) -> Option<usize> {
    let len = paymaster_and_data.len();
    if len < MIN_LEN_WITH_SUFFIX || paymaster_and_data[len - 8..] != PAYMASTER_SIG_MAGIC {
        return Some(0);
    }
    let sig_len = usize::from(u16::from_be_bytes([
        paymaster_and_data[len - SUFFIX_LEN],
        paymaster_and_data[len - SUFFIX_LEN + 1],
    ]));
    (sig_len <= len - MIN_LEN_WITH_SUFFIX).then_some(sig_len)
}

/// `signed_part ‖ signature ‖ uint16(len) ‖ PAYMASTER_SIG_MAGIC`
/// (`UserOperationLib.encodePaymasterSignature`); `None` for a signature longer than a `uint16`.
pub fn with_paymaster_signature(signed_part: &[u8], signature: &[u8]) -> Option<Bytes> {
    let len = u16::try_from(signature.len()).ok()?;
    Some(
        [
            signed_part,
            signature,
            &len.to_be_bytes(),
            &PAYMASTER_SIG_MAGIC,
        ]
        .concat()
        .into(),
    )
}

/// `paymasterDataKeccak`: the hash of `paymaster_and_data` without its paymaster signature and
/// length, magic kept.
fn paymaster_and_data_hash(paymaster_and_data: &[u8]) -> B256 {
    match paymaster_signature_len(paymaster_and_data) {
        Some(sig_len) if sig_len > 0 => {
            let signed = paymaster_and_data.len() - sig_len - SUFFIX_LEN;
            keccak256([&paymaster_and_data[..signed], &PAYMASTER_SIG_MAGIC].concat())
        }
        // `getUserOpHash` reverts for the `None` case: hash the bytes as they are, a hash no
        // landed operation has.
        _ => keccak256(paymaster_and_data),
    }
}

fn user_op_hash(op: &PackedUserOperation, entry_point: Address, chain_id: u64) -> B256 {
    super::v0_8::eip712_user_op_hash(
        op,
        paymaster_and_data_hash(&op.paymasterAndData),
        entry_point,
        chain_id,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_is_keccak_of_its_name() {
        assert_eq!(keccak256("PaymasterSignature")[..8], PAYMASTER_SIG_MAGIC);
    }

    #[test]
    fn suffix_is_read_as_the_entry_point_reads_it() {
        let head = [7u8; 64];
        let sig = [9u8; 65];
        let pad = with_paymaster_signature(&head, &sig).unwrap_or_default();
        assert_eq!(pad.len(), 64 + 65 + 10);
        assert_eq!(paymaster_signature_len(&pad), Some(65));
        // Without the magic, or with a length of 0, there is no suffix.
        assert_eq!(paymaster_signature_len(&pad[..pad.len() - 1]), Some(0));
        let zero = with_paymaster_signature(&head, &[]).unwrap_or_default();
        assert_eq!(paymaster_signature_len(&zero), Some(0));
        // A length reaching into the static fields: the EntryPoint reverts.
        let mut long = pad.to_vec();
        let n = long.len();
        long[n - 10..n - 8].copy_from_slice(&u16::try_from(n - 61).unwrap_or(0).to_be_bytes());
        assert_eq!(paymaster_signature_len(&long), None);
        long[n - 10..n - 8].copy_from_slice(&u16::try_from(n - 62).unwrap_or(0).to_be_bytes());
        assert_eq!(paymaster_signature_len(&long), Some(n - 62));
        assert!(with_paymaster_signature(&head, &vec![0; 65_536]).is_none());
    }

    #[test]
    fn the_paymaster_signature_is_outside_the_hash() {
        let head = [7u8; 64];
        let a = with_paymaster_signature(&head, &[1u8; 65]).unwrap_or_default();
        let b = with_paymaster_signature(&head, &[2u8; 65]).unwrap_or_default();
        assert_eq!(paymaster_and_data_hash(&a), paymaster_and_data_hash(&b));
        assert_eq!(
            paymaster_and_data_hash(&a),
            keccak256([&head[..], &PAYMASTER_SIG_MAGIC].concat())
        );
        assert_ne!(paymaster_and_data_hash(&a), paymaster_and_data_hash(&head));
    }
}
